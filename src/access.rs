//! Who may use the daemon, and reading layers with the requesting peer's own rights.
//!
//! The socket is as strong as the engine's: whoever can talk to it can make the engine build.
//! Every request's peer credentials (SO_PEERCRED) are checked against the allowed uids and
//! gids. Layer files are then read *as the peer*: the blocking thread doing the reads switches
//! its filesystem uid, gid and supplementary groups to the peer's (`setfsuid`, `setfsgid` and
//! the raw `setgroups` syscall are per thread on Linux) and switches back when done. The kernel
//! itself then decides every open, link and directory walk, so there is no check-then-open
//! race, and a client in the group cannot bake `/etc/shadow` into an image.

use std::collections::HashSet;

use crate::error::{Error, Result};

/// The credentials of a requesting process.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups, from `/proc/<pid>/status`.
    pub groups: Vec<u32>,
}

impl Peer {
    /// The peer with its supplementary groups read from procfs (empty if the process is gone).
    /// A peer running as the daemon's own user needs none: it may call ([`Policy::new`]), and
    /// its layers are read with the daemon's rights ([`as_peer`]); so its requests, warm hits
    /// above all, skip the procfs read.
    pub fn new(uid: u32, gid: u32, pid: Option<i32>) -> Peer {
        let groups = pid
            .filter(|_| uid != own_uid())
            .map(|pid| supplementary_groups(pid, uid, gid))
            .unwrap_or_default();
        Peer {
            uid,
            gid,
            pid,
            groups,
        }
    }
}

/// The groups of process `pid`, if it is still the process that connected: the pid in
/// SO_PEERCRED may have been reused by another process since, so the status file's effective
/// uid and gid must match the peer's; otherwise no supplementary groups (fewer rights).
fn supplementary_groups(pid: i32, uid: u32, gid: u32) -> Vec<u32> {
    // procfs gives no size: read into room for the whole file (about 1.5 KiB), not by
    // doubling from 32 bytes (eight reads).
    let mut status = String::with_capacity(4096);
    let read = std::fs::File::open(format!("/proc/{pid}/status"))
        .and_then(|mut file| std::io::Read::read_to_string(&mut file, &mut status));
    if read.is_err() {
        return Vec::new();
    }
    let effective = |key: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    if effective("Uid:") != Some(uid) || effective("Gid:") != Some(gid) {
        return Vec::new();
    }
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| {
            groups
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Which peers may use the daemon.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub uids: HashSet<u32>,
    pub gids: HashSet<u32>,
}

impl Policy {
    /// root, the daemon's own uid, and the socket group (if any), plus what was configured.
    pub fn new(allow_uids: &[u32], allow_gids: &[u32], socket_gid: Option<u32>) -> Policy {
        let mut uids: HashSet<u32> = allow_uids.iter().copied().collect();
        uids.insert(0);
        uids.insert(own_uid());
        let mut gids: HashSet<u32> = allow_gids.iter().copied().collect();
        gids.extend(socket_gid);
        Policy { uids, gids }
    }

    /// PERMISSION_DENIED unless `peer` is allowed.
    pub fn check(&self, peer: &Peer) -> Result<()> {
        let allowed = self.uids.contains(&peer.uid)
            || self.gids.contains(&peer.gid)
            || peer.groups.iter().any(|g| self.gids.contains(g));
        if allowed {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "uid {} (gid {}) may not use lambda-imaged; ask an administrator to add you to the \
             socket group or to --allow-uid",
            peer.uid, peer.gid
        )))
    }
}

/// The daemon's effective uid.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Runs `f` on this thread with the filesystem rights of `peer` (or unchanged when the peer is
/// the daemon's own user). Must run on a thread of its own (a
/// blocking-pool thread), never on an async worker, since the rights are per thread.
pub fn as_peer<T>(peer: &Peer, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let own = own_uid();
    if peer.uid == own {
        return f();
    }
    if own != 0 {
        return Err(Error::PermissionDenied(format!(
            "this lambda-imaged runs as uid {own} and can read layers only for that user, not for \
             uid {}; run the daemon as root or as the client's user",
            peer.uid
        )));
    }
    let guard = Switched::enter(peer)?;
    let result = f();
    drop(guard);
    result
}

/// Runs `f` with the daemon's own rights while inside [`as_peer`] (to use the cache).
pub fn as_daemon<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let saved = Saved::current();
    if saved.fsuid == own_uid() && saved.groups.is_none() {
        return f();
    }
    if !Saved::root().apply() {
        return Err(Error::Internal(
            "could not take the daemon's own filesystem rights".into(),
        ));
    }
    let result = f();
    if !saved.apply() {
        // Fail closed: never go on reading for the peer with the daemon's rights.
        Saved::root().apply();
        CURRENT.with(|current| *current.borrow_mut() = None);
        return Err(Error::Internal(
            "could not return to the client's filesystem rights".into(),
        ));
    }
    result
}

/// This thread's filesystem credentials.
#[derive(Clone)]
struct Saved {
    fsuid: u32,
    fsgid: u32,
    /// `None` when the thread has the process's own groups.
    groups: Option<Vec<u32>>,
}

thread_local! {
    /// The credentials [`Switched`] gave this thread; `None`: the daemon's own.
    static CURRENT: std::cell::RefCell<Option<Saved>> = const { std::cell::RefCell::new(None) };
}

impl Saved {
    fn current() -> Saved {
        CURRENT.with(|current| current.borrow().clone().unwrap_or_else(Saved::root))
    }

    fn root() -> Saved {
        // SAFETY: getegid has no preconditions and cannot fail.
        Saved {
            fsuid: own_uid(),
            fsgid: unsafe { libc::getegid() },
            groups: None,
        }
    }

    /// Sets this thread's filesystem credentials; false if any part did not take.
    fn apply(&self) -> bool {
        let groups = match &self.groups {
            Some(groups) => groups.clone(),
            None => process_groups(),
        };
        // SAFETY: plain syscalls on this thread's credentials with a valid buffer; querying
        // with an invalid id (u32::MAX) changes nothing and returns the current value.
        unsafe {
            let set = libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) == 0;
            libc::setfsgid(self.fsgid);
            libc::setfsuid(self.fsuid);
            let fsgid = libc::setfsgid(u32::MAX) as u32;
            let fsuid = libc::setfsuid(u32::MAX) as u32;
            set && fsgid == self.fsgid && fsuid == self.fsuid
        }
    }
}

fn process_groups() -> Vec<u32> {
    // The process's groups as the daemon started with them (what the raw syscall restores).
    static GROUPS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    GROUPS
        .get_or_init(|| {
            // SAFETY: getgroups with a correctly sized buffer.
            unsafe {
                let n = libc::getgroups(0, std::ptr::null_mut());
                let mut groups = vec![0 as libc::gid_t; usize::try_from(n).unwrap_or(0)];
                let n = libc::getgroups(n, groups.as_mut_ptr());
                groups.truncate(usize::try_from(n).unwrap_or(0));
                groups
            }
        })
        .clone()
}

/// Switched credentials; switches back on drop (also on panic).
struct Switched;

impl Switched {
    fn enter(peer: &Peer) -> Result<Switched> {
        process_groups();
        let target = Saved {
            fsuid: peer.uid,
            fsgid: peer.gid,
            groups: Some(peer.groups.clone()),
        };
        target.apply();
        // setfsuid reports the previous value; asking again tells whether it took.
        // SAFETY: querying with an invalid id changes nothing and returns the current value.
        let now = unsafe { libc::setfsuid(u32::MAX) } as u32;
        if now != peer.uid {
            Saved::root().apply();
            return Err(Error::Internal(format!(
                "could not take the filesystem rights of uid {}",
                peer.uid
            )));
        }
        CURRENT.with(|current| *current.borrow_mut() = Some(target));
        Ok(Switched)
    }
}

impl Drop for Switched {
    fn drop(&mut self) {
        CURRENT.with(|current| *current.borrow_mut() = None);
        Saved::root().apply();
    }
}

/// Turns a permission error met while reading as the peer into a clear PERMISSION_DENIED that
/// names the peer's uid: a refused open ([`Error::ReadDenied`]) says what and which path, any
/// other refusal keeps its message. Other errors pass through.
pub fn denied_for(peer: &Peer, err: Error) -> Error {
    let what = match err {
        Error::ReadDenied { what, path } => format!("{what} {}", path.display()),
        Error::PermissionDenied(message) => message,
        other => return other,
    };
    Error::PermissionDenied(format!(
        "{what}; uid {} cannot read it, and the daemon reads layers only with the client's own rights",
        peer.uid
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The groups of a process are read from its procfs status (this test's own, matching
    /// getgroups(2)); a peer running as the daemon's own user is not asked for them, and one
    /// whose pid now belongs to another user gets none.
    #[test]
    fn groups_are_read_only_for_peers_of_another_user() {
        let pid = i32::try_from(std::process::id()).unwrap();
        // SAFETY: getegid and getgroups write at most `len` entries into `mine`.
        let (gid, mut mine) = unsafe {
            let gid = libc::getegid();
            let mut mine = vec![0; 256];
            let len = libc::getgroups(256, mine.as_mut_ptr());
            mine.truncate(usize::try_from(len).unwrap());
            (gid, mine)
        };
        let mut read = supplementary_groups(pid, own_uid(), gid);
        read.sort_unstable();
        mine.sort_unstable();
        assert_eq!(read, mine);
        assert!(Peer::new(own_uid(), gid, Some(pid)).groups.is_empty());
        assert!(supplementary_groups(pid, own_uid().wrapping_add(1), gid).is_empty());
    }

    #[test]
    fn policy_allows_root_own_uid_and_groups() {
        let policy = Policy::new(&[1234], &[500], Some(600));
        let peer = |uid, gid, groups: &[u32]| Peer {
            uid,
            gid,
            pid: None,
            groups: groups.to_vec(),
        };
        assert!(policy.check(&peer(0, 0, &[])).is_ok());
        assert!(policy.check(&peer(own_uid(), 99, &[])).is_ok());
        assert!(policy.check(&peer(1234, 99, &[])).is_ok());
        assert!(policy.check(&peer(4321, 500, &[])).is_ok());
        assert!(policy.check(&peer(4321, 99, &[7, 600])).is_ok());
        let denied = policy.check(&peer(4321, 99, &[7])).unwrap_err();
        assert!(matches!(denied, Error::PermissionDenied(m) if m.contains("uid 4321")));
    }

    /// Fails with instructions unless the tests run as root (CI does), instead of checking
    /// something weaker.
    fn require_root() {
        assert_eq!(
            own_uid(),
            0,
            "src/access.rs tests switch a thread's filesystem rights to another user: run them \
             as root (scripts/test.sh does in CI)"
        );
    }

    /// A daemon that is not root reads for its own user only, and refuses any other uid with
    /// PERMISSION_DENIED naming both uids. As root this runs on a thread that gave up root
    /// (credentials are per thread to the kernel; the raw syscall skips glibc's all-threads
    /// broadcast), so it is checked on every run.
    #[test]
    fn a_daemon_that_is_not_root_refuses_other_users() {
        let check = || {
            let own = own_uid();
            assert_ne!(own, 0, "this check needs a uid other than root");
            let me = Peer {
                uid: own,
                gid: 65534,
                pid: None,
                groups: vec![],
            };
            assert_eq!(as_peer(&me, || Ok(7)).unwrap(), 7);
            let other = Peer { uid: own + 1, ..me };
            let Err(Error::PermissionDenied(message)) = as_peer(&other, || Ok(())) else {
                panic!("a non-root daemon must refuse to read for uid {}", own + 1);
            };
            assert!(
                message.contains(&format!("uid {own}"))
                    && message.contains(&format!("uid {}", own + 1)),
                "{message}"
            );
        };
        if own_uid() != 0 {
            check();
            return;
        }
        std::thread::spawn(move || {
            // Effective uid 65534 on this thread only; real and saved stay 0. The thread ends
            // right after, taking its credentials with it.
            // SAFETY: setresuid takes plain integers; -1 (as u32) leaves the real uid alone.
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, u32::MAX, 65534u32, 0u32) };
            assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
            check();
        })
        .join()
        .unwrap();
        assert_eq!(own_uid(), 0, "only the spawned thread gave up root");
    }

    /// As root, a thread reading as an unprivileged peer cannot open a root-only file, and the
    /// thread's own rights come back afterwards.
    #[test]
    fn reads_happen_with_the_peers_rights() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let nobody = Peer {
            uid: 65534,
            gid: 65534,
            pid: None,
            groups: vec![],
        };
        let read = std::thread::spawn(move || {
            let as_nobody =
                as_peer(&nobody, || Ok(std::fs::read(&secret).map_err(|e| e.kind()))).unwrap();
            let written =
                as_peer(&nobody, || as_daemon(|| Ok(std::fs::read(&secret).is_ok()))).unwrap();
            let after = std::fs::read(&secret).is_ok();
            (as_nobody, written, after)
        })
        .join()
        .unwrap();
        assert_eq!(read.0, Err(std::io::ErrorKind::PermissionDenied));
        assert!(read.1, "as_daemon restores the daemon's rights inside");
        assert!(read.2, "rights restored after");
    }
}
