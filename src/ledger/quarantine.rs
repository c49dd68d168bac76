//! Quarantine: a damaged ledger is moved aside, never deleted (`meterd ledger quarantine`,
//! `state.quarantine_damaged`).

use std::path::{Path, PathBuf};

use super::{files, ledger_path, LedgerError, LEDGER_FILE, PRIVATE_DIR};

/// The prefix of a quarantined ledger's name: `ledger.sqlite3.quarantined-<UTC time>`.
pub const QUARANTINE_PREFIX: &str = "ledger.sqlite3.quarantined-";

/// Moves the ledger of `dir` aside, never deleting it: `ledger.sqlite3` and its side files
/// become `ledger.sqlite3.quarantined-<time>` (`-wal`, `-shm`), so the agent starts empty and
/// the old file stays readable (`meterd records --ledger`). Takes the agent's lock, so it
/// refuses while an agent runs. The side files move first and the ledger last; a move
/// interrupted between them is finished under the same name by the next run.
pub fn quarantine(dir: &Path, now: i64) -> Result<PathBuf, LedgerError> {
    let private = files::PrivateDir::open_locked(dir)?;
    if private.inspect(LEDGER_FILE)?.is_none() {
        return Err(LedgerError::Unavailable(format!(
            "no ledger at {} to quarantine",
            ledger_path(dir).display()
        )));
    }
    let names = quarantine_names(private.path())?;
    // A side file whose ledger is not beside it: an interrupted quarantine to finish.
    let orphan = names.iter().find_map(|n| {
        let base = n.strip_suffix("-wal").or_else(|| n.strip_suffix("-shm"))?;
        (!names.iter().any(|m| m == base)).then(|| base.to_owned())
    });
    let name = match orphan {
        Some(base) => base,
        None => {
            let stamp = rfc3339_compact(now);
            let mut name = format!("{QUARANTINE_PREFIX}{stamp}");
            let mut n = 1;
            while names.iter().any(|m| m.starts_with(&name)) {
                n += 1;
                name = format!("{QUARANTINE_PREFIX}{stamp}-{n}");
            }
            name
        }
    };
    for suffix in ["-wal", "-shm"] {
        let side = format!("{LEDGER_FILE}{suffix}");
        if private.inspect(&side)?.is_some() {
            private.rename(&side, &format!("{name}{suffix}"))?;
        }
    }
    private.rename(LEDGER_FILE, &name)?;
    private.sync()?;
    Ok(private.path().join(name))
}

/// Quarantined ledgers (not their side files) in the state directory's private directory:
/// the `meterd_ledger_quarantined_files` gauge, which alerts until someone moves them away.
pub fn quarantined_ledgers(dir: &Path) -> Vec<PathBuf> {
    let private = dir.join(PRIVATE_DIR);
    quarantine_names(&private)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !n.ends_with("-wal") && !n.ends_with("-shm"))
        .map(|n| private.join(n))
        .collect()
}

fn quarantine_names(private: &Path) -> Result<Vec<String>, LedgerError> {
    let entries = std::fs::read_dir(private)
        .map_err(|e| LedgerError::Unavailable(format!("{}: {e}", private.display())))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(QUARANTINE_PREFIX))
        .collect();
    names.sort();
    Ok(names)
}

/// `2026-12-02T15:11:00Z` as `20261202T151100Z`, for file names.
fn rfc3339_compact(t: i64) -> String {
    crate::clock::rfc3339(t).replace(['-', ':'], "")
}
