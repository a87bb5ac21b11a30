//! Binds the daemon's Unix socket, or adopts one systemd passed (`LISTEN_FDS`).
//!
//! A socket file left by a dead daemon is replaced; a live daemon on it is refused. Only a
//! socket we bound is unlinked on exit, never one systemd owns.

use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// A listening socket and whether we own its file.
pub struct Listener {
    pub listener: UnixListener,
    /// The path we serve on (as bound, or as configured when systemd passed the socket).
    pub path: PathBuf,
    /// Removes the socket file on drop when we bound it ourselves.
    pub guard: Option<RemoveOnDrop>,
}

/// Unlinks a socket file we created.
pub struct RemoveOnDrop(PathBuf);

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("another lambda-imaged is already serving on {0}; stop it or pick another --socket")]
    InUse(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("systemd passed {0} sockets; lambda-imaged serves exactly one")]
    TooManyFds(usize),
}

impl Listener {
    /// Uses the systemd-passed socket if there is one (`LISTEN_PID` checked by `sd-notify`),
    /// else binds `path` with mode 0660.
    pub async fn open(path: &Path, group: Option<u32>) -> Result<Listener, ListenError> {
        let io = |source| ListenError::Io {
            path: path.to_owned(),
            source,
        };
        let fds: Vec<_> = sd_notify::listen_fds().map_err(io)?.collect();
        match fds.as_slice() {
            [] => {}
            [fd] => {
                // SAFETY: systemd passed this descriptor to us (LISTEN_PID matched) and nothing
                // else in the process owns it.
                let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(*fd) };
                std_listener.set_nonblocking(true).map_err(io)?;
                let listener = UnixListener::from_std(std_listener).map_err(io)?;
                let path = listener
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(Path::to_owned))
                    .unwrap_or_else(|| path.to_owned());
                return Ok(Listener {
                    listener,
                    path,
                    guard: None,
                });
            }
            more => return Err(ListenError::TooManyFds(more.len())),
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        if std::fs::symlink_metadata(path).is_ok() {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(ListenError::InUse(path.to_owned()));
            }
            // Nobody answers: a stale file from a daemon that died.
            std::fs::remove_file(path).map_err(io)?;
        }
        let listener = UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(io)?;
        }
        Ok(Listener {
            listener,
            path: path.to_owned(),
            guard: Some(RemoveOnDrop(path.to_owned())),
        })
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        // Best effort at exit; a leftover file is replaced by the next start anyway.
        let _ = std::fs::remove_file(&self.0);
    }
}
