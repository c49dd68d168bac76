//! The ledger's files on disk: where they live, whose they must be, and the agent's lock.
//!
//! Every file of the ledger lives in `state.dir/private/`, a directory the agent creates with
//! mode 0700. `state.dir` itself may be shared (a Kubernetes `emptyDir` is 0777, a volume with
//! `fsGroup` is group-writable and owned by root), so nothing is created or opened in it by a
//! name that someone else could have planted; only `private/` is, without following a link.
//!
//! - The private directory must be a directory (not a link) that belongs to the agent's
//!   effective uid. A mode that lets others in (kubelet's `fsGroup` adds group write on every
//!   mount) is narrowed to 0700 before anything in it is trusted.
//! - Each ledger file in it (`ledger.sqlite3` and SQLite's `-wal`, `-shm`, `-journal`) must be
//!   absent or a regular file of the agent's uid with one name (no hard link into another
//!   agent's ledger); a looser mode is narrowed to 0600. A new ledger is created 0600 with
//!   `O_CREAT | O_EXCL | O_NOFOLLOW`, and SQLite gives its side files the ledger's mode.
//! - The lock is `flock` on the private directory itself, held by the writer thread: there is
//!   no lock file to delete, and every path that reaches the same directory (a symlinked
//!   `state.dir`, a bind mount) meets the same lock. A lock on the ledger file would need a
//!   second descriptor on it, and closing that descriptor would drop the POSIX locks SQLite
//!   holds on the file in this process; the directory carries no SQLite lock.
//! - SQLite opens by path, and the private directory's name sits in `state.dir`, where others
//!   may be able to rename entries. So after each open the ledger checks that SQLite's new
//!   descriptor is on the very file it checked: the number of this process's descriptors on
//!   that file (from `/proc/self/fd`) must have grown by one. After the first reads, the `-wal`
//!   and `-shm` that SQLite opened must be the checked ones too.
//!
//! Files are only inspected through `O_PATH` descriptors, which read nothing and, unlike a
//! normal descriptor, drop no POSIX lock of this process when they are closed.
//!
//! Before this layout the ledger was `state.dir/ledger.sqlite3` with a lock file
//! `state.dir/meterd.lock`. At the first start such a ledger is moved into the private
//! directory (see [`PrivateDir::open_locked`]).

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use super::{LedgerError, LEDGER_FILE};

#[cfg(test)]
mod tests;

/// The agent's private directory inside `state.dir`.
pub const PRIVATE_DIR: &str = "private";
/// The files SQLite keeps beside a database, by suffix.
const SIDE_SUFFIXES: [&str; 3] = ["-wal", "-shm", "-journal"];
/// The lock file of the layout before the private directory; taken only while moving.
const OLD_LOCK_FILE: &str = "meterd.lock";

/// Where the ledger of `state_dir` lives.
pub fn ledger_path(state_dir: &Path) -> PathBuf {
    state_dir.join(PRIVATE_DIR).join(LEDGER_FILE)
}

/// A file's identity: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(m: &Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// What the files are for: the agent, which writes and must own them, or `meterd records`,
/// which reads (often as root) and creates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Agent,
    Inspect,
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn refuse(path: &Path, why: impl std::fmt::Display) -> LedgerError {
    LedgerError::Unsafe(format!("{}: {why}", path.display()))
}

fn io_failure(what: &str, path: &Path, e: impl Into<io::Error>) -> LedgerError {
    let e: io::Error = e.into();
    if e.kind() == io::ErrorKind::StorageFull {
        LedgerError::Full(format!("cannot {what} {}: {e}", path.display()))
    } else {
        LedgerError::Unavailable(format!("cannot {what} {}: {e}", path.display()))
    }
}

/// `name` in `dir` as an `O_PATH` descriptor, without following a link.
fn peek(dir: &File, name: &str) -> Result<Option<File>, Errno> {
    match rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(File::from(fd))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Checks the entry `name` of `dir`: absent, or a regular file with one name, of our uid when
/// the agent uses it. Returns its identity and mode.
fn inspect(
    dir: &File,
    dir_path: &Path,
    name: &str,
    purpose: Purpose,
) -> Result<Option<(FileId, u32)>, LedgerError> {
    let path = dir_path.join(name);
    let Some(file) = peek(dir, name).map_err(|e| io_failure("inspect", &path, e))? else {
        return Ok(None);
    };
    let meta = file
        .metadata()
        .map_err(|e| io_failure("inspect", &path, e))?;
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Err(refuse(
            &path,
            "is a symbolic link; meterd never follows a link to its ledger files",
        ));
    }
    if !kind.is_file() {
        return Err(refuse(&path, "is not a regular file"));
    }
    if purpose == Purpose::Agent && meta.uid() != euid() {
        return Err(refuse(
            &path,
            format!(
                "belongs to uid {}, but meterd runs as uid {}; only the agent's own files are used",
                meta.uid(),
                euid()
            ),
        ));
    }
    if meta.nlink() != 1 {
        return Err(refuse(
            &path,
            format!(
                "has {} names (hard links); a ledger file must have exactly one",
                meta.nlink()
            ),
        ));
    }
    Ok(Some((FileId::of(&meta), meta.mode())))
}

/// How many of this process's descriptors are open on `id`.
pub(super) fn descriptors_on(id: FileId) -> Result<usize, LedgerError> {
    let fds = Path::new("/proc/self/fd");
    let entries = std::fs::read_dir(fds).map_err(|e| {
        io_failure(
            "list this process's open files (to check what SQLite opened) in",
            fds,
            e,
        )
    })?;
    Ok(entries
        .filter_map(Result::ok)
        // A descriptor closed meanwhile fails to stat; it is not SQLite's new one.
        .filter_map(|entry| std::fs::metadata(entry.path()).ok())
        .filter(|meta| FileId::of(meta) == id)
        .count())
}

/// The directory that holds the ledger, opened without following a link and checked. For the
/// agent it is `state.dir/private` and carries the agent's lock for as long as it lives.
pub(super) struct PrivateDir {
    dir: File,
    path: PathBuf,
    purpose: Purpose,
}

impl PrivateDir {
    /// Creates (0700) or opens `state_dir/private`, checks it, takes the agent's lock on it and
    /// moves a ledger of the old layout (`state_dir/ledger.sqlite3`) into it.
    ///
    /// The move happens only when the private directory holds no ledger yet, while the old
    /// lock file is held too (so an older meterd still running on the old layout is refused
    /// as a second agent), and only when the old ledger and its side files are regular files of
    /// the agent's uid with one name. The side files move first and the ledger last, each with
    /// one `rename`, so an interrupted move is completed at the next start. When both places
    /// hold a ledger the agent refuses to start and names both.
    pub(super) fn open_locked(state_dir: &Path) -> Result<PrivateDir, LedgerError> {
        // `state.dir` is the operator's path and may be a link (systemd's `DynamicUser` makes
        // `/var/lib/meterd` one); nothing below it is followed.
        std::fs::create_dir_all(state_dir)
            .map_err(|e| io_failure("create the state dir", state_dir, e))?;
        let state =
            File::open(state_dir).map_err(|e| io_failure("open the state dir", state_dir, e))?;
        let path = state_dir.join(PRIVATE_DIR);
        match rustix::fs::mkdirat(&state, PRIVATE_DIR, Mode::RWXU) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(io_failure("create", &path, e)),
        }
        let private = Self::open_dir(&state, path, Purpose::Agent)?;
        match private.dir.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::Locked(private.path.display().to_string()))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io_failure("lock", &private.path, e))
            }
        }
        private.move_old_layout(&state, state_dir)?;
        Ok(private)
    }

    /// The directory that holds an existing ledger, for reading only: the private directory,
    /// or `state_dir` itself while a ledger of the old layout has not been moved yet.
    pub(super) fn open_for_reading(state_dir: &Path) -> Result<PrivateDir, LedgerError> {
        let state =
            File::open(state_dir).map_err(|e| io_failure("open the state dir", state_dir, e))?;
        let path = state_dir.join(PRIVATE_DIR);
        if peek(&state, PRIVATE_DIR)
            .map_err(|e| io_failure("inspect", &path, e))?
            .is_some()
        {
            let private = Self::open_dir(&state, path, Purpose::Inspect)?;
            if private.inspect(LEDGER_FILE)?.is_some() {
                return Ok(private);
            }
        }
        Ok(PrivateDir {
            dir: state,
            path: state_dir.to_owned(),
            purpose: Purpose::Inspect,
        })
    }

    fn open_dir(state: &File, path: PathBuf, purpose: Purpose) -> Result<PrivateDir, LedgerError> {
        let fd = rustix::fs::openat(
            state,
            PRIVATE_DIR,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            // A link fails with ELOOP, or with ENOTDIR since the link itself is no directory.
            Errno::LOOP | Errno::NOTDIR => {
                let link = peek(state, PRIVATE_DIR)
                    .ok()
                    .flatten()
                    .and_then(|f| f.metadata().ok())
                    .is_some_and(|m| m.file_type().is_symlink());
                if link {
                    refuse(
                        &path,
                        "is a symbolic link; the private directory must be a real directory",
                    )
                } else {
                    refuse(&path, "is not a directory")
                }
            }
            e => io_failure("open", &path, e),
        })?;
        let dir = File::from(fd);
        let meta = dir
            .metadata()
            .map_err(|e| io_failure("inspect", &path, e))?;
        if purpose == Purpose::Agent {
            if meta.uid() != euid() {
                return Err(refuse(
                    &path,
                    format!(
                        "belongs to uid {}, but meterd runs as uid {}; the private directory must be the agent's own",
                        meta.uid(),
                        euid()
                    ),
                ));
            }
            if meta.mode() & 0o077 != 0 {
                // Narrowed before any entry is checked: from here on only we can add one.
                dir.set_permissions(std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| io_failure("narrow the mode of", &path, e))?;
                tracing::warn!(
                    dir = %path.display(),
                    mode = format!("{:o}", meta.mode() & 0o7777),
                    "narrowed the ledger's private directory to mode 0700"
                );
            }
        }
        Ok(PrivateDir { dir, path, purpose })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Checks the entry `name`; for the agent, a mode that lets others in is narrowed to 0600.
    pub(super) fn inspect(&self, name: &str) -> Result<Option<FileId>, LedgerError> {
        let Some((id, mode)) = inspect(&self.dir, &self.path, name, self.purpose)? else {
            return Ok(None);
        };
        if self.purpose == Purpose::Agent && mode & 0o077 != 0 {
            // A regular file of ours in a directory only we can change: the name is safe.
            rustix::fs::chmodat(&self.dir, name, Mode::RUSR | Mode::WUSR, AtFlags::empty())
                .map_err(|e| io_failure("narrow the mode of", &self.path.join(name), e))?;
            tracing::warn!(
                file = %self.path.join(name).display(),
                mode = format!("{:o}", mode & 0o7777),
                "narrowed a ledger file's mode to 0600"
            );
        }
        Ok(Some(id))
    }

    /// Checks the ledger's side files (`-wal`, `-shm`, `-journal`) of `db`.
    pub(super) fn inspect_side_files(&self, db: &str) -> Result<(), LedgerError> {
        for suffix in SIDE_SUFFIXES {
            self.inspect(&format!("{db}{suffix}"))?;
        }
        Ok(())
    }

    /// After SQLite's first reads: its `-wal` (one per connection) and `-shm` (one per
    /// process) must be the files checked in this directory.
    pub(super) fn expect_side_files_open(&self, connections: usize) -> Result<(), LedgerError> {
        for (suffix, at_least) in [("-wal", connections), ("-shm", 1)] {
            let name = format!("{LEDGER_FILE}{suffix}");
            let path = self.path.join(&name);
            let id = self
                .inspect(&name)?
                .ok_or_else(|| refuse(&path, "is missing although SQLite opened it"))?;
            if descriptors_on(id)? < at_least {
                return Err(swapped(&path));
            }
        }
        Ok(())
    }

    /// Removes a leftover file (`O_PATH` peeks never follow; `unlinkat` removes the name).
    pub(super) fn remove(&self, name: &str) -> Result<bool, LedgerError> {
        match rustix::fs::unlinkat(&self.dir, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(io_failure("remove", &self.path.join(name), e)),
        }
    }

    /// Creates `name`, mode 0600; fails if anything (a link included) has that name.
    pub(super) fn create(&self, name: &str) -> Result<(File, FileId), LedgerError> {
        let path = self.path.join(name);
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::RUSR | Mode::WUSR,
        )
        .map_err(|e| io_failure("create", &path, e))?;
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| io_failure("inspect", &path, e))?;
        Ok((file, FileId::of(&meta)))
    }

    pub(super) fn rename(&self, from: &str, to: &str) -> Result<(), LedgerError> {
        rustix::fs::renameat(&self.dir, from, &self.dir, to)
            .map_err(|e| io_failure("rename", &self.path.join(from), e))
    }

    pub(super) fn sync(&self) -> Result<(), LedgerError> {
        self.dir
            .sync_all()
            .map_err(|e| io_failure("fsync", &self.path, e))
    }

    fn move_old_layout(&self, state: &File, state_dir: &Path) -> Result<(), LedgerError> {
        let old = state_dir.join(LEDGER_FILE);
        if peek(state, LEDGER_FILE)
            .map_err(|e| io_failure("inspect", &old, e))?
            .is_none()
        {
            return Ok(());
        }
        let new = self.path.join(LEDGER_FILE);
        if self.inspect(LEDGER_FILE)?.is_some() {
            return Err(refuse(
                &old,
                format!(
                    "a ledger of the old layout is here and another one is at {}; keep the one with \
                     the unsent usage at {} and move the other aside",
                    new.display(),
                    new.display()
                ),
            ));
        }
        // An older meterd running on the old layout holds this lock.
        let lock_path = state_dir.join(OLD_LOCK_FILE);
        let lock = rustix::fs::openat(
            state,
            OLD_LOCK_FILE,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::RUSR | Mode::WUSR,
        )
        .map_err(|e| match e {
            Errno::LOOP => refuse(&lock_path, "is a symbolic link"),
            e => io_failure("open", &lock_path, e),
        })?;
        let lock = File::from(lock);
        let meta = lock
            .metadata()
            .map_err(|e| io_failure("inspect", &lock_path, e))?;
        if !meta.file_type().is_file() || meta.uid() != euid() {
            return Err(refuse(
                &lock_path,
                "is not a regular file of the agent's uid",
            ));
        }
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::Locked(lock_path.display().to_string()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_failure("lock", &lock_path, e)),
        }
        // Everything that moves is checked before anything moves.
        let names: Vec<String> = SIDE_SUFFIXES
            .iter()
            .map(|s| format!("{LEDGER_FILE}{s}"))
            .chain([LEDGER_FILE.to_owned()])
            .collect();
        let mut moving = Vec::new();
        for name in &names {
            if inspect(state, state_dir, name, Purpose::Agent)?.is_some() {
                if name != LEDGER_FILE && self.inspect(name)?.is_some() {
                    return Err(refuse(
                        &self.path.join(name),
                        format!(
                            "is in the way of moving {} here; move one of them aside",
                            state_dir.join(name).display()
                        ),
                    ));
                }
                moving.push(name);
            }
        }
        // Side files first, the ledger last: a ledger is never here without its WAL.
        for name in moving {
            rustix::fs::renameat(state, name.as_str(), &self.dir, name.as_str())
                .map_err(|e| io_failure("move", &state_dir.join(name), e))?;
        }
        self.sync()?;
        state
            .sync_all()
            .map_err(|e| io_failure("fsync", state_dir, e))?;
        tracing::info!(from = %old.display(), to = %new.display(), "moved the ledger into the agent's private directory");
        Ok(())
    }
}

fn swapped(path: &Path) -> LedgerError {
    refuse(
        path,
        "SQLite opened a different file than the one meterd checked; something replaced the \
         private directory while meterd started (can other users rename entries in state.dir?)",
    )
}

/// Fails unless one more descriptor of this process is open on `id` than `before`: the one
/// SQLite just opened by `path`.
pub(super) fn expect_opened(path: &Path, id: FileId, before: usize) -> Result<(), LedgerError> {
    if descriptors_on(id)? == before + 1 {
        Ok(())
    } else {
        Err(swapped(path))
    }
}
