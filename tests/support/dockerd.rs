//! A second private engine on this machine, for fleet tests (design.md §7): its own `--host`,
//! `--data-root`, `--exec-root` and `--pidfile` under `$LAMBDA_IMAGED_TEST_DIR/engine-b`,
//! `--iptables=false` (else it rewrites the first engine's DOCKER chains) and its own bridge
//! created with `ip link add … type bridge` (`--bridge=none` would delete the shared
//! `docker0`).
//!
//! nextest runs every test in a process of its own, so the engine is started by the first test
//! that needs it and reused by the rest (and by later runs): a file lock serialises the start,
//! and a start that fails panics with the reason and the tail of its log. Like the main test
//! engine, it keeps running afterwards; `scripts/test-env.sh stop` ends it and removes its
//! bridge (BRIDGE below; the script names it too).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the engine may take to answer after its start on a busy machine.
const START_DEADLINE: Duration = Duration::from_secs(120);

/// The second engine: where it is reached, and its state directory.
pub struct SecondEngine {
    /// `unix:///…/engine-b/docker.sock`, for `DOCKER_HOST` and `Config::engine_host`.
    pub host: String,
    pub dir: PathBuf,
}

fn state_dir() -> PathBuf {
    let base = std::env::var("LAMBDA_IMAGED_TEST_DIR").unwrap_or_else(|_| {
        panic!("LAMBDA_IMAGED_TEST_DIR is not set: run `eval \"$(scripts/test-env.sh)\"` first")
    });
    PathBuf::from(base).join("engine-b")
}

/// The bridge of the second engine (at most 15 characters).
const BRIDGE: &str = "limg-fleet-b";

/// Runs the docker CLI against `host`.
pub fn docker_at(host: &str, args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .env("DOCKER_HOST", host)
        .output()
        .expect("the docker CLI runs (installed by scripts/test-env.sh)")
}

/// Runs the docker CLI against `host` and returns stdout; panics with stderr on failure.
pub fn docker_at_ok(host: &str, args: &[&str]) -> String {
    let output = docker_at(host, args);
    assert!(
        output.status.success(),
        "DOCKER_HOST={host} docker {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn answering(host: &str) -> bool {
    docker_at(host, &["version", "--format", "{{.Server.Version}}"])
        .status
        .success()
}

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(args)
        .output()
        .expect("`ip` runs (iproute2, installed by scripts/test-env.sh)")
}

/// The second engine, started if it is not running yet, holding `images` copied from the
/// main test engine (`docker save | docker load`) when it lacks them.
pub fn second_engine(images: &[&str]) -> SecondEngine {
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("docker.sock");
    let host = format!("unix://{}", sock.display());
    let lock = std::fs::File::create(dir.join("start.lock")).unwrap();
    // SAFETY: flock on a descriptor this function owns; released when `lock` is dropped.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    if !answering(&host) {
        start(&dir, &host);
    }
    for image in images {
        if docker_at(&host, &["image", "inspect", image])
            .status
            .success()
        {
            continue;
        }
        let saved = Command::new("docker")
            .args(["save", image])
            .env("DOCKER_HOST", super::engine_host())
            .output()
            .unwrap();
        assert!(saved.status.success(), "docker save {image} failed");
        let mut load = Command::new("docker")
            .arg("load")
            .env("DOCKER_HOST", &host)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        load.stdin.take().unwrap().write_all(&saved.stdout).unwrap();
        assert!(
            load.wait().unwrap().success(),
            "docker load of {image} into {host} failed"
        );
    }
    drop(lock);
    SecondEngine { host, dir }
}

// The engine is meant to outlive this process (see the module doc): it is not waited for
// once it answers.
#[allow(clippy::zombie_processes)]
fn start(dir: &std::path::Path, host: &str) {
    let _ = std::fs::remove_file(dir.join("docker.sock"));
    let _ = std::fs::remove_file(dir.join("dockerd.pid"));
    // dockerd reuses the containerd named in this pidfile while that pid exists. A killed
    // engine's containerd gets SIGKILL too (moby starts it with a parent-death signal) and then
    // stays a zombie until init reaps it; dockerd would wait for a socket that never comes
    // ("timeout waiting for containerd to start"). So: give it a moment to die, and drop the
    // pidfile once its process has ended. One still running after that is left to be reused.
    let containerd_pid = dir.join("exec/containerd/containerd.pid");
    if let Ok(pid) = std::fs::read_to_string(&containerd_pid)
        && let Ok(pid) = pid.trim().parse::<i32>()
    {
        // A pid that now names another program (reused) is as stale as one that ended.
        let containerd = || {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "containerd")
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while containerd() && !has_ended(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if has_ended(pid) || !containerd() {
            let _ = std::fs::remove_file(&containerd_pid);
        }
    }
    if !ip(&["link", "show", BRIDGE]).status.success() {
        let added = ip(&["link", "add", BRIDGE, "type", "bridge"]);
        assert!(
            added.status.success(),
            "cannot create bridge {BRIDGE} for the second engine: {}",
            String::from_utf8_lossy(&added.stderr)
        );
    }
    let addresses =
        String::from_utf8_lossy(&ip(&["-4", "-o", "addr", "show", "dev", BRIDGE]).stdout)
            .into_owned();
    if addresses.trim().is_empty() {
        let used = String::from_utf8_lossy(&ip(&["-4", "-o", "addr", "show"]).stdout).into_owned()
            + &String::from_utf8_lossy(&ip(&["-4", "route", "show"]).stdout);
        let cidr = (200..255)
            .map(|x| format!("172.30.{x}.1/24"))
            .find(|cidr| !used.contains(&cidr[..cidr.len() - 4]))
            .expect("a free 172.30.X.0/24 for the second engine's bridge");
        let added = ip(&["addr", "add", &cidr, "dev", BRIDGE]);
        assert!(
            added.status.success(),
            "ip addr add {cidr} dev {BRIDGE} failed"
        );
    }
    ip(&["link", "set", BRIDGE, "up"]);
    let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
    let mut command = Command::new("dockerd");
    command
        .arg("--host")
        .arg(host)
        .arg("--data-root")
        .arg(dir.join("data"))
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("dockerd.pid"))
        .args(["--iptables=false", "--bridge", BRIDGE])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // Its own process group: it outlives this test process, for the next tests to reuse.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start the second dockerd: {err}"));
    let deadline = Instant::now() + START_DEADLINE;
    while !answering(host) {
        let tail = || {
            let log = std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the second dockerd exited during start-up ({status}):\n{}",
                tail()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "the second dockerd did not answer on {host} within {START_DEADLINE:?}:\n{}",
                tail()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Whether the engine process `pid` has ended. A process this test process started and has not
/// waited for stays a zombie after it dies (its `/proc/<pid>` remains until it is reaped), so it
/// is reaped here when it is our child, and a zombie counts as ended when it is not.
pub fn has_ended(pid: i32) -> bool {
    // SAFETY: waitpid(2) on one pid with WNOHANG: it reaps that pid only if it is our exited
    // child and otherwise returns at once (0 while it runs, -1/ECHILD when it is not ours).
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state is the first field after the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// A TCP forwarder on loopback to the engine socket at `host` (`unix://…`) that carries what
/// the client sends at most `rate` bytes a second per connection (a slow link to a remote
/// engine; answers pass at full speed). Runs until the test's runtime ends.
pub async fn throttled(host: &str, rate: f64) -> String {
    let socket = PathBuf::from(host.strip_prefix("unix://").expect("a unix:// engine"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let socket = socket.clone();
            tokio::spawn(async move {
                let Ok(engine) = tokio::net::UnixStream::connect(&socket).await else {
                    return;
                };
                let (mut from_client, mut to_client) = tcp.into_split();
                let (mut from_engine, mut to_engine) = engine.into_split();
                let up = async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let started = tokio::time::Instant::now();
                    let mut passed = 0u64;
                    while let Ok(n) = from_client.read(&mut buf).await {
                        if n == 0 || to_engine.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        passed += n as u64;
                        // The throttle itself (not a synchronisation): the next read waits
                        // until the link's rate allows what has passed so far.
                        let due = Duration::from_secs_f64(passed as f64 / rate);
                        tokio::time::sleep_until(started + due).await;
                    }
                    let _ = to_engine.shutdown().await;
                };
                let down = async move {
                    let _ = tokio::io::copy(&mut from_engine, &mut to_client).await;
                    let _ = to_client.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    format!("tcp://{addr}")
}
