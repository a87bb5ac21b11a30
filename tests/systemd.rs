//! The daemon as systemd runs it: the unit files pass `systemd-analyze verify` (and keep their
//! security exposure low), the daemon serves on a socket passed by `systemd-socket-activate`
//! and leaves that socket file alone, and it reports `READY=1` / `STOPPING=1` on
//! `NOTIFY_SOCKET`.
//!
//! Needs the `systemd` Debian package (systemd-analyze, systemd-socket-activate); systemd need
//! not be PID 1. A missing tool fails the test with instructions; nothing is skipped. No engine
//! is needed: DOCKER_HOST points at a socket nobody serves.

mod support;

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::{text, until_blocking};

/// Longest any single wait in these tests may take (a busy 2-core machine included).
const WAIT: Duration = Duration::from_secs(30);

const DAEMON: &str = env!("CARGO_BIN_EXE_lambda-imaged");
const CTL: &str = env!("CARGO_BIN_EXE_lambda-imagectl");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The absolute path of a systemd tool; panics with set-up instructions when it is missing.
fn systemd_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: these tests need the `systemd` Debian package \
                 (apt-get install -y systemd; scripts/test-env.sh installs it). \
                 systemd does not have to be PID 1."
            )
        })
}

/// Runs `cmd` to its end, at most `limit`; kills it and panics if it takes longer.
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            // SAFETY: signalling our own child, which has not been reaped (it is still running).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{cmd:?} did not finish within {limit:?}");
        }
    }
}

/// `lambda-imagectl --socket <socket> resolve --runtime python3.12 --json`, bounded.
fn resolve(socket: &Path) -> Output {
    let mut cmd = Command::new(CTL);
    cmd.arg("--socket")
        .arg(socket)
        .args(["resolve", "--runtime", "python3.12", "--json"]);
    output_within(cmd, WAIT)
}

fn assert_resolves(socket: &Path, daemon: &Daemon) {
    let output = resolve(socket);
    assert_eq!(
        output.status.code(),
        Some(0),
        "resolve failed: {}\ndaemon log:\n{}",
        text(&output.stderr),
        daemon.log()
    );
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&output.stdout)));
    assert_eq!(plan["runtime"], "python3.12", "{plan}");
    assert!(
        plan["tag"].as_str().is_some_and(|t| !t.is_empty()),
        "{plan}"
    );
}

fn dead_engine(dir: &Path) -> String {
    format!("unix://{}/no-engine.sock", dir.display())
}

/// `KEY=VALUE` lines of a unit file (comments and section headers left out).
fn settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter(|l| !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn setting<'a>(all: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    all.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Copies the units in `from` into a temp dir with ExecStart pointing at the binary cargo
/// built (verify checks that the ExecStart binary exists and is executable) and the socket's
/// group set to `root` (systemd 252's verify does not resolve groups, but a group that
/// exists keeps this independent of the machine and of newer versions).
fn staged_units(from: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["lambda-imaged.service", "lambda-imaged.socket"] {
        let unit = std::fs::read_to_string(from.join(name))
            .unwrap_or_else(|e| panic!("{}: {e}", from.join(name).display()));
        assert!(
            name.ends_with(".socket") || unit.contains("ExecStart=/usr/local/bin/lambda-imaged "),
            "{name}: ExecStart must run /usr/local/bin/lambda-imaged (scripts/install.sh \
             rewrites it for another PREFIX)"
        );
        let unit = unit
            .replace(
                "ExecStart=/usr/local/bin/lambda-imaged ",
                &format!("ExecStart={DAEMON} "),
            )
            .replace("SocketGroup=lambda-imaged", "SocketGroup=root");
        std::fs::write(dir.path().join(name), unit).unwrap();
    }
    dir
}

fn verify(analyze: &Path, units: &Path, user: bool, runtime_dir: &Path) {
    let mut cmd = Command::new(analyze);
    if user {
        cmd.arg("--user");
    }
    // Errors in our units only (not in sockets.target and friends of this machine).
    cmd.args(["verify", "--recursive-errors=no", "--man=no"])
        .arg(units.join("lambda-imaged.socket"))
        .arg(units.join("lambda-imaged.service"))
        // A user manager needs a runtime dir; harmless for the system one.
        .env("XDG_RUNTIME_DIR", runtime_dir)
        .env_remove("SYSTEMD_UNIT_PATH");
    let output = output_within(cmd, WAIT);
    let stderr = text(&output.stderr);
    assert!(
        output.status.success(),
        "systemd-analyze{} verify failed ({}):\n{stderr}{}",
        if user { " --user" } else { "" },
        output.status,
        text(&output.stdout)
    );
    // Warnings about our units fail too, even where verify's exit status forgives them.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("lambda-imaged"))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warned:\n{}",
        ours.join("\n")
    );
}

/// The exposure score `systemd-analyze security --offline=true` gives a unit file.
fn exposure(analyze: &Path, unit: &Path, user: bool, runtime_dir: &Path) -> f64 {
    let mut cmd = Command::new(analyze);
    if user {
        cmd.arg("--user");
    }
    cmd.args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .env("XDG_RUNTIME_DIR", runtime_dir);
    let output = output_within(cmd, WAIT);
    let stdout = text(&output.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure level from systemd-analyze security:\n{stdout}{}",
                text(&output.stderr)
            )
        });
    line.split(": ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"))
}

/// The system units: verify passes, and the settings the design requires are there.
#[test]
fn system_units_verify() {
    let analyze = systemd_tool("systemd-analyze");
    let shipped = repo().join("systemd");
    let service = std::fs::read_to_string(shipped.join("lambda-imaged.service")).unwrap();
    let socket = std::fs::read_to_string(shipped.join("lambda-imaged.socket")).unwrap();
    let s = settings(&service);
    for (key, value) in [
        ("Type", "notify"),
        ("RuntimeDirectory", "lambda-imaged"),
        ("RuntimeDirectoryPreserve", "yes"),
        ("CacheDirectory", "lambda-imaged"),
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "read-only"),
        ("Also", "lambda-imaged.socket"),
    ] {
        assert_eq!(setting(&s, key), [value], "lambda-imaged.service: {key}=");
    }
    // PrivateTmp= would hide clients' layer paths under /tmp (design.md §5).
    assert!(
        setting(&s, "PrivateTmp").is_empty(),
        "PrivateTmp= must not be set"
    );
    let k = settings(&socket);
    for (key, value) in [
        ("ListenStream", "/run/lambda-imaged/lambda-imaged.sock"),
        ("SocketMode", "0660"),
        ("SocketGroup", "lambda-imaged"),
        ("WantedBy", "sockets.target"),
    ] {
        assert_eq!(setting(&k, key), [value], "lambda-imaged.socket: {key}=");
    }

    let staged = staged_units(&shipped);
    let runtime = tempfile::tempdir().unwrap();
    verify(&analyze, staged.path(), false, runtime.path());

    let score = exposure(
        &analyze,
        &staged.path().join("lambda-imaged.service"),
        false,
        runtime.path(),
    );
    assert!(
        score <= 3.0,
        "systemd-analyze security rates lambda-imaged.service {score} (was 2.4): hardening lost?"
    );
}

/// The per-user units verify in a user manager.
#[test]
fn user_units_verify() {
    let analyze = systemd_tool("systemd-analyze");
    let shipped = repo().join("systemd/user");
    let k = settings(&std::fs::read_to_string(shipped.join("lambda-imaged.socket")).unwrap());
    assert_eq!(setting(&k, "ListenStream"), ["%t/lambda-imaged.sock"]);
    let s = settings(&std::fs::read_to_string(shipped.join("lambda-imaged.service")).unwrap());
    assert_eq!(setting(&s, "Type"), ["notify"]);
    assert!(
        setting(&s, "PrivateTmp").is_empty(),
        "PrivateTmp= must not be set"
    );

    let staged = staged_units(&shipped);
    let runtime = tempfile::tempdir().unwrap();
    verify(&analyze, staged.path(), true, runtime.path());
}

/// Under `systemd-socket-activate` the daemon serves on the passed socket (it binds nothing
/// itself, not even its --socket path), and on SIGTERM it exits 0 leaving the socket file in
/// place: the file belongs to whoever passed the socket (systemd removes it with
/// RemoveOnStop=; systemd-socket-activate exec()s the daemon and so never unlinks it).
#[test]
fn serves_a_socket_passed_by_systemd_socket_activate() {
    let activate = systemd_tool("systemd-socket-activate");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");

    let mut cmd = Command::new(&activate);
    cmd.arg("--listen")
        .arg(&socket)
        // systemd-socket-activate passes on only TERM, PATH, USER and HOME, plus these.
        .arg(format!("--setenv=DOCKER_HOST={}", dead_engine(dir.path())))
        .arg("--setenv=RUST_LOG=info")
        .arg("--setenv=NO_COLOR=1");
    let mut daemon = Daemon::builder()
        .in_dir(dir.path())
        .launcher(cmd)
        .no_engine()
        .rie(&dir.path().join("rie"))
        .spawn();
    // Its own --socket, which it must not bind.
    let decoy = daemon.socket().to_owned();

    // systemd-socket-activate binds first and exec()s the daemon on the first connection.
    let what = format!("{} to appear", socket.display());
    until_blocking(what, WAIT, || {
        daemon.assert_running("systemd-socket-activate to listen");
        socket.exists()
    });

    assert_resolves(&socket, &daemon);
    // Same pid, now the daemon (exec); it answers again on the same socket.
    assert_resolves(&socket, &daemon);
    let log = daemon.log();
    assert!(
        log.contains("Execing"),
        "not activated through the socket:\n{log}"
    );
    assert!(
        !decoy.exists(),
        "the daemon bound its own --socket although systemd passed one"
    );

    daemon.terminate();
    let status = daemon.wait_exit_blocking(WAIT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status; log:\n{}",
        daemon.log()
    );
    assert!(
        std::fs::symlink_metadata(&socket).is_ok(),
        "the daemon removed {} although it did not create it",
        socket.display()
    );
    assert!(!decoy.exists());
}

/// `--allow-uid` under socket activation: a passed socket other users cannot connect to
/// (0660 here) makes the daemon refuse to start, saying to set `SocketMode=0666`; on a 0666
/// socket the allowed uid, in no group, resolves.
#[test]
fn allow_uid_under_socket_activation_needs_a_socket_everyone_may_connect_to() {
    use std::os::unix::fs::PermissionsExt;
    let allowed = 54_321u32;
    let start = |mode: u32| {
        let activate = systemd_tool("systemd-socket-activate");
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("activated.sock");
        let mut cmd = Command::new(&activate);
        cmd.arg("--listen")
            .arg(&socket)
            .arg(format!("--setenv=DOCKER_HOST={}", dead_engine(dir.path())))
            .arg("--setenv=NO_COLOR=1");
        let daemon = Daemon::builder()
            .in_dir(dir.path())
            .launcher(cmd)
            .no_engine()
            .rie(&dir.path().join("rie"))
            .args(["--allow-uid", &allowed.to_string()])
            .spawn();
        until_blocking(format!("{} to appear", socket.display()), WAIT, || {
            socket.exists()
        });
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, socket, daemon)
    };

    let (_dir, socket, mut refused) = start(0o660);
    // The first connection makes systemd-socket-activate exec the daemon, which refuses.
    let _ = std::os::unix::net::UnixStream::connect(&socket);
    let status = refused.wait_exit_blocking(WAIT);
    let log = refused.log();
    assert!(!status.success(), "started on a 0660 socket:\n{log}");
    assert!(log.contains("SocketMode=0666"), "{log}");

    let (_dir, socket, daemon) = start(0o666);
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={allowed}"))
        .arg(format!("--regid={allowed}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(CTL)
        .arg("--socket")
        .arg(&socket)
        .args(["resolve", "--runtime", "python3.12", "--json"]);
    let output = output_within(cmd, WAIT);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}\nlog:\n{}",
        text(&output.stderr),
        daemon.log()
    );
}

/// Reads datagrams from `notify` until one has the line `want`; panics after WAIT or when the
/// daemon exits first. Returns every line seen.
fn read_until(notify: &UnixDatagram, daemon: &mut Daemon, want: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + WAIT;
    let mut buf = vec![0u8; 4096];
    loop {
        match notify.recv(&mut buf) {
            Ok(n) => {
                let msg = text(&buf[..n]);
                let found = msg.lines().any(|l| l == want);
                seen.extend(msg.lines().map(str::to_owned));
                if found {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading NOTIFY_SOCKET: {e}"),
        }
        if want != "STOPPING=1" {
            daemon.assert_running(want);
        }
        assert!(
            Instant::now() < deadline,
            "no {want} on NOTIFY_SOCKET within {WAIT:?} (got {seen:?}); daemon log:\n{}",
            daemon.log()
        );
    }
}

/// Reads every datagram already queued on `notify` into `seen`, without waiting.
fn drain(notify: &UnixDatagram, seen: &mut Vec<String>) {
    notify.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 4096];
    loop {
        match notify.recv(&mut buf) {
            Ok(n) => seen.extend(text(&buf[..n]).lines().map(str::to_owned)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("reading NOTIFY_SOCKET: {e}"),
        }
    }
    notify.set_nonblocking(false).unwrap();
}

/// With NOTIFY_SOCKET set the daemon sends READY=1 once its socket accepts connections and
/// STOPPING=1 on SIGTERM, then exits 0 (and removes the socket file it bound itself).
#[test]
fn notifies_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let socket = dir.path().join("d.sock");

    let mut daemon = Daemon::builder()
        .in_dir(dir.path())
        .no_engine()
        .missing_rie()
        .args(["--shutdown-timeout", "10"])
        .env("NOTIFY_SOCKET", &notify_path)
        .spawn();
    assert_eq!(daemon.socket(), socket);

    let mut seen = Vec::new();
    read_until(&notify, &mut daemon, "READY=1", &mut seen);
    // READY=1 means clients can connect now, without retrying.
    UnixStream::connect(&socket).unwrap_or_else(|e| {
        panic!(
            "READY=1 was sent but {} refuses connections: {e}",
            socket.display()
        )
    });
    assert_resolves(&socket, &daemon);
    // Everything the daemon sent so far is queued on the datagram socket (a send enqueues
    // it): read it all before SIGTERM, so a stray STOPPING=1 cannot go unseen.
    drain(&notify, &mut seen);
    assert!(
        !seen.iter().any(|l| l == "STOPPING=1"),
        "STOPPING=1 before SIGTERM: {seen:?}"
    );

    daemon.terminate();
    read_until(&notify, &mut daemon, "STOPPING=1", &mut seen);
    let status = daemon.wait_exit_blocking(WAIT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status; log:\n{}",
        daemon.log()
    );
    assert!(
        !socket.exists(),
        "the daemon left the socket file it bound itself"
    );
    // The process is gone: whatever else it sent is queued already.
    drain(&notify, &mut seen);
    let ready = seen.iter().filter(|l| *l == "READY=1").count();
    assert_eq!(ready, 1, "READY=1 sent {ready} times: {seen:?}");
}
