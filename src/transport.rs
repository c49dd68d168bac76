//! The agent's listeners: the local API's TCP socket, its Unix socket (mode 0660, a stale
//! socket file replaced, a live one refused) and the metrics listener.

use std::path::PathBuf;

use tokio::net::{TcpListener, UnixListener};

use crate::agent::AgentError;
use crate::config::Config;

/// The sockets the local API is served on.
#[derive(Debug, Default)]
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub unix: Option<UnixSocket>,
    /// `server.metrics_listen`: `/metrics`, `/healthz` and `/readyz` only, for a scraper.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds what the configuration asks for. The Unix socket gets mode 0660.
    pub async fn bind(config: &Config) -> Result<Self, AgentError> {
        let bind = |addr: std::net::SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| AgentError::Listen {
                    what: addr.to_string(),
                    detail: e.to_string(),
                })
        };
        let mut listeners = Listeners::default();
        if let Some(addr) = config.listen_addr() {
            listeners.tcp = Some(bind(addr).await?);
        }
        if let Ok(addr) = config.server.metrics_listen.parse::<std::net::SocketAddr>() {
            listeners.metrics = Some(bind(addr).await?);
        }
        if !config.server.unix_socket.is_empty() {
            listeners.unix = Some(UnixSocket::bind(&PathBuf::from(
                &config.server.unix_socket,
            ))?);
        }
        Ok(listeners)
    }
}

/// The local API's Unix socket. Dropping it removes the socket file, if it is still ours.
#[derive(Debug)]
pub struct UnixSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
    /// The socket file's inode, so a socket another process bound since is left alone.
    inode: u64,
}

impl UnixSocket {
    /// Binds with mode 0660. A socket file already there is replaced only when nothing answers
    /// on it (left by a process that died); a live one belongs to another agent and is refused.
    pub fn bind(path: &std::path::Path) -> Result<Self, AgentError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
        let err = |detail: String| AgentError::Listen {
            what: path.display().to_string(),
            detail,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(err("a file that is not a socket is in the way".to_owned()));
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(err(
                        "another process is serving on this socket (is another meterd running with the same server.unix_socket?)"
                            .to_owned(),
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(|e| err(e.to_string()))?;
                }
                Err(e) => return Err(err(format!("cannot tell whether the socket is in use: {e}"))),
            }
        }
        let listener = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| err(e.to_string()))?;
        let inode = std::fs::symlink_metadata(path)
            .map_err(|e| err(e.to_string()))?
            .ino();
        Ok(Self {
            listener: Some(listener),
            path: path.to_owned(),
            inode,
        })
    }

    pub(crate) fn take_listener(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove the socket");
            }
        }
    }
}
