//! Binds the daemon's Unix socket, or adopts one systemd passed (`LISTEN_FDS`).
//!
//! A socket file left by a dead daemon is replaced; a live daemon on it is refused. Only a
//! socket we bound is unlinked on exit, never one systemd owns.
//!
//! [`accept`] turns the listener into the server's stream of connections: at most
//! `max_connections_per_uid` open at once per peer uid (a connection over it is closed at once,
//! with a log line naming the uid and the setting), and accept errors (EMFILE when the daemon
//! is out of file descriptors, ENFILE, ENOMEM) back off and retry rather than spin or end
//! the server.

use std::collections::HashMap;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::{Connected, UdsConnectInfo};

/// First pause after an accept error that is not about one connection (EMFILE, ...).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between accept attempts while they keep failing.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

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
    /// `--allow-uid` / `--allow-gid` were given, but systemd passed a socket not every local
    /// user may connect to: the allowed ids outside its group could not even connect.
    #[error(
        "--allow-uid/--allow-gid need a socket every local user may connect to (each call is \
         then checked against the caller's credentials), but systemd passed {path} with mode \
         {mode:04o}: set SocketMode=0666 in lambda-imaged.socket, or drop the flags and use \
         the socket group"
    )]
    Unreachable { path: PathBuf, mode: u32 },
}

/// Who may connect to the socket file. Connecting is only the first gate: every call is then
/// checked against the peer's kernel-given credentials (`SO_PEERCRED`, `access::Policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Mode 0660: root and the socket group (`--socket-group`, systemd's `SocketGroup=`).
    Group,
    /// Mode 0666: every local user may connect, and the credential check is the only gate;
    /// with `--allow-uid` / `--allow-gid`, whose ids need not be in the socket group. Others
    /// get PERMISSION_DENIED on every call, within the per-uid connection limit.
    Everyone,
}

impl Reach {
    /// The socket file's mode.
    pub fn mode(self) -> u32 {
        match self {
            Reach::Group => 0o660,
            Reach::Everyone => 0o666,
        }
    }
}

impl Listener {
    /// The socket file's group when it is not root's (the group `--socket-group` or systemd's
    /// `SocketGroup=` gave it): its members may call (see `access::Policy`). `None` when the
    /// file cannot be read or belongs to group 0.
    pub fn socket_gid(&self) -> Option<u32> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path)
            .ok()
            .map(|m| m.gid())
            .filter(|gid| *gid != 0)
    }

    /// Uses the systemd-passed socket if there is one (`LISTEN_PID` checked by `sd-notify`;
    /// refused when `reach` is [`Reach::Everyone`] and its mode lets others not connect), else
    /// binds `path` with `reach`'s mode and `group`.
    pub async fn open(
        path: &Path,
        group: Option<u32>,
        reach: Reach,
    ) -> Result<Listener, ListenError> {
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
                if reach == Reach::Everyone {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(&path).map_err(io)?.permissions().mode() & 0o7777;
                    if mode & 0o006 != 0o006 {
                        return Err(ListenError::Unreachable { path, mode });
                    }
                }
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
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(reach.mode()))
            .map_err(io)?;
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

/// Open connections per peer uid, shared by the accept loop and every [`Connection`]'s slot.
type OpenPerUid = Arc<Mutex<HashMap<u32, usize>>>;

/// An accepted connection that counts against its peer uid's limit until it is dropped (when
/// the server is done with it: the client closed it, or the daemon stopped).
pub struct Connection {
    stream: UnixStream,
    _slot: Slot,
}

/// One of a uid's open connections; gives its place back on drop.
struct Slot {
    uid: u32,
    open: OpenPerUid,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = crate::sync::lock(&self.open);
        if let Some(count) = open.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// The server's connections from `listener`: never ends and never yields an error (the
/// `Result` is what tonic's `serve_with_incoming` takes).
///
/// - A peer uid with `max_per_uid` connections open gets its next one closed at once (a
///   warning names the uid and `max_connections_per_uid`); its client sees the connection
///   end (our client reports UNAVAILABLE). A connection whose peer credentials cannot be
///   read is closed too: the service could not check it.
/// - Errors about one connection (ECONNABORTED, EINTR, ...) are skipped. Any other accept
///   error (EMFILE, ENFILE, ENOBUFS, ENOMEM) pauses accepting for 5 ms, doubling up to 1 s,
///   until an accept succeeds: the pending connections wait in the socket's backlog instead
///   of the loop spinning on a listener that stays readable. It is logged once when it starts
///   and once when accepting works again.
pub fn accept(
    listener: UnixListener,
    max_per_uid: usize,
) -> impl Stream<Item = io::Result<Connection>> {
    let open = OpenPerUid::default();
    futures_util::stream::unfold((listener, open), move |(listener, open)| async move {
        let connection = next_connection(&listener, &open, max_per_uid).await;
        Some((Ok(connection), (listener, open)))
    })
}

/// Accepts until a connection within its uid's limit arrives (see [`accept`]).
async fn next_connection(
    listener: &UnixListener,
    open: &OpenPerUid,
    max_per_uid: usize,
) -> Connection {
    let mut backoff: Option<Duration> = None;
    let mut failures = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) if is_per_connection(&err) => continue,
            Err(err) => {
                failures += 1;
                let pause = match backoff {
                    None => {
                        tracing::warn!(error = %err, "accepting connections failed; backing off until it works again (out of file descriptors? raise LimitNOFILE)");
                        ACCEPT_BACKOFF_MIN
                    }
                    Some(last) => (last * 2).min(ACCEPT_BACKOFF_MAX),
                };
                backoff = Some(pause);
                // A back-off, not synchronisation: the listener stays readable while the
                // error lasts, so retrying at once would spin.
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        if backoff.take().is_some() {
            tracing::info!(failures, "accepting connections again");
            failures = 0;
        }
        let uid = match stream.peer_cred() {
            Ok(cred) => cred.uid(),
            Err(err) => {
                tracing::warn!(error = %err, "connection closed: its peer credentials cannot be read");
                continue;
            }
        };
        let mut counts = crate::sync::lock(open);
        let count = counts.entry(uid).or_insert(0);
        if *count >= max_per_uid {
            drop(counts);
            tracing::warn!(
                uid,
                limit = max_per_uid,
                "connection closed: uid {uid} already has {max_per_uid} connections open \
                 (max_connections_per_uid); close some, or raise the setting"
            );
            continue;
        }
        *count += 1;
        drop(counts);
        return Connection {
            stream,
            _slot: Slot {
                uid,
                open: open.clone(),
            },
        };
    }
}

/// Accept errors that concern one connection only (it went away before we took it): the next
/// accept may succeed at once.
fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EINTR | libc::EPROTO | libc::EAGAIN)
    )
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The socket's own peer credentials, for the service's access check.
impl Connected for Connection {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;

    use super::*;

    /// A uid at its limit gets its next connection closed; closing one frees a place.
    #[tokio::test]
    async fn connections_per_uid_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let incoming = accept(UnixListener::bind(&path).unwrap(), 2);
        tokio::pin!(incoming);
        let first = UnixStream::connect(&path).await.unwrap();
        let _second = UnixStream::connect(&path).await.unwrap();
        let a = incoming.next().await.unwrap().unwrap();
        let _b = incoming.next().await.unwrap().unwrap();

        // Over the limit: the daemon closes it, which the client reads as the end.
        let mut third = UnixStream::connect(&path).await.unwrap();
        let mut byte = [0u8; 1];
        tokio::select! {
            accepted = incoming.next() => panic!("a third connection was let in: {}", accepted.is_some()),
            read = third.read(&mut byte) => assert!(
                matches!(read, Ok(0) | Err(_)),
                "the third connection was closed: {read:?}"
            ),
        }

        drop((first, a));
        let _fourth = UnixStream::connect(&path).await.unwrap();
        let d = incoming.next().await.unwrap().unwrap();
        assert_eq!(crate::sync::lock(&d._slot.open).get(&d._slot.uid), Some(&2));
    }
}
