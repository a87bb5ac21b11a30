//! The daemon as a service (issue 7): who may use the socket and whose rights layers are read
//! with, graceful shutdown, health that follows the engine, reflection for a client without
//! our protos, and the config file.
//!
//! Runs as root (CI does): the access tests create the system user `lambda-imaged-test-user`
//! and the group `lambda-imaged-test` when missing and run `lambda-imagectl` as that user with
//! `setpriv`. The engine is taken away and given back through a byte-forwarding proxy in front
//! of the test engine's socket, which can also hold build requests at the engine's door.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lambda_imaged::client::{self, proto};
use lambda_imaged::server::{Builds, Phase};
use serde_json::Value;
use support::daemon::Daemon;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Longest any single wait may take (a busy 2-core CI machine included).
const WAIT: Duration = Duration::from_secs(60);
const DAEMON: &str = env!("CARGO_BIN_EXE_lambda-imaged");
const CTL: &str = env!("CARGO_BIN_EXE_lambda-imagectl");
/// The unprivileged user the access tests run clients as.
const USER: &str = "lambda-imaged-test-user";
/// A group for `--socket-group`.
const GROUP: &str = "lambda-imaged-test";
const SERVICE: &str = "lambda_imaged.v1.ImageBuilder";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "tests/service.rs creates a user and a group and switches to that user: run it as root \
         (scripts/test.sh does in CI)"
    );
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A temp dir anyone may traverse (the unprivileged user reaches sockets and layers in it).
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    dir
}

/// Runs a short system command (id, getent, useradd, groupadd) and returns its output.
fn system(program: &str, args: &[&str]) -> Output {
    std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} cannot run: {e}"))
}

/// Field `field` (`:`-separated) of what `program args` prints, as a number, if it succeeds.
fn number_from(program: &str, args: &[&str], field: usize) -> Option<u32> {
    let out = system(program, args);
    if !out.status.success() {
        return None;
    }
    text(&out.stdout)
        .trim()
        .split(':')
        .nth(field)
        .and_then(|n| n.trim().parse().ok())
}

/// The unprivileged test user's (uid, gid), created when missing. Idempotent; test processes
/// running in parallel may race on the lock of /etc/passwd, so a failed `useradd` is retried.
fn test_user() -> (u32, u32) {
    require_root();
    let mut last = String::new();
    for _ in 0..100 {
        if let (Some(uid), Some(gid)) = (
            number_from("id", &["-u", USER], 0),
            number_from("id", &["-g", USER], 0),
        ) {
            return (uid, gid);
        }
        let out = system("useradd", &["--system", "--no-create-home", USER]);
        if !out.status.success() {
            last = text(&out.stderr);
            // Another test process holds the passwd lock or just created the user.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("could not create the user {USER}: {last}");
}

/// The gid of the test group, created when missing (`groupadd -f` is idempotent; retried on
/// lock contention like `test_user`).
fn test_group() -> u32 {
    require_root();
    let mut last = String::new();
    for _ in 0..100 {
        if let Some(gid) = number_from("getent", &["group", GROUP], 2) {
            return gid;
        }
        let out = system("groupadd", &["-f", GROUP]);
        if !out.status.success() {
            last = text(&out.stderr);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("could not create the group {GROUP}: {last}");
}

/// `lambda-imagectl --socket <socket>` as root.
fn ctl(socket: &Path) -> Command {
    let mut cmd = Command::new(CTL);
    cmd.arg("--socket").arg(socket);
    cmd
}

/// `lambda-imagectl --socket <socket>` as `uid`/`gid` with exactly the supplementary `groups`.
fn ctl_as(uid: u32, gid: u32, groups: &[u32], socket: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    cmd.arg("--").arg(CTL).arg("--socket").arg(socket);
    cmd
}

/// Runs `cmd` to its end (bounded by WAIT; killed on timeout).
async fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    match tokio::time::timeout(WAIT, cmd.output()).await {
        Ok(output) => output.unwrap_or_else(|e| panic!("{cmd:?} cannot run: {e}")),
        Err(_) => panic!("{cmd:?} did not finish within {WAIT:?}"),
    }
}

/// Exit code, stdout, stderr.
fn parts(output: &Output) -> (Option<i32>, String, String) {
    (
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

/// The JSON objects `build --json` printed.
fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// True when the engine has an image tagged `tag`.
fn image_exists(tag: &str) -> bool {
    docker(&["image", "inspect", "--format", "{{.Id}}", tag])
        .status
        .success()
}

/// The real daemon binary with the test RIE and `extra` flags (the engine is the test engine
/// unless `extra` names another), in a temp dir anyone may traverse, accepting connections.
async fn bin(extra: &[&str]) -> Daemon {
    Daemon::builder()
        .readable_by_all()
        .args(extra)
        .start()
        .await
}

/// A stand-in for the engine's socket that forwards bytes to the real one. The test can take
/// the engine away (close the socket and every open connection) and bring it back, and can
/// hold build requests (`POST /…/build`) at the engine's door until released.
struct EngineProxy {
    path: PathBuf,
    target: PathBuf,
    shared: Arc<ProxyShared>,
    accept: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

struct ProxyShared {
    connections: Mutex<Vec<JoinHandle<()>>>,
    hold_builds: AtomicBool,
    held: AtomicUsize,
    release: watch::Sender<bool>,
}

impl EngineProxy {
    /// A proxy (not yet listening) in front of the test engine.
    fn new(hold_builds: bool) -> EngineProxy {
        let host = engine_host();
        let target = PathBuf::from(
            host.strip_prefix("unix://")
                .unwrap_or_else(|| panic!("the test engine must be a unix socket, not {host}")),
        );
        let dir = tempfile::tempdir().unwrap();
        EngineProxy {
            path: dir.path().join("engine.sock"),
            target,
            shared: Arc::new(ProxyShared {
                connections: Mutex::new(Vec::new()),
                hold_builds: AtomicBool::new(hold_builds),
                held: AtomicUsize::new(0),
                release: watch::channel(false).0,
            }),
            accept: None,
            _dir: dir,
        }
    }

    /// The address the daemon is given.
    fn host(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Starts listening (again).
    fn start(&mut self) {
        assert!(self.accept.is_none(), "already listening");
        let listener = UnixListener::bind(&self.path).unwrap();
        let (target, shared) = (self.target.clone(), self.shared.clone());
        self.accept = Some(tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let connection = tokio::spawn(forward(client, target.clone(), shared.clone()));
                shared.connections.lock().unwrap().push(connection);
            }
        }));
    }

    /// The engine goes away: no socket, and every open connection is cut.
    async fn stop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            // Wait until the accept loop is gone, so it registers no further connection.
            let _ = accept.await;
        }
        for connection in self.shared.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }

    /// How many build requests have been held so far.
    fn held(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Lets held (and later) build requests through.
    fn release(&self) {
        self.shared.release.send_replace(true);
    }
}

impl Drop for EngineProxy {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        for connection in self.shared.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

/// True when `chunk` carries the request line of an engine build (`POST /v1.xx/build?…`).
fn is_build_request(chunk: &[u8]) -> bool {
    let text = String::from_utf8_lossy(chunk);
    text.lines().any(|line| {
        line.starts_with("POST /")
            && (line.contains("/build?")
                || line.contains("/build ")
                || line.contains("/images/load"))
    })
}

/// Forwards one connection both ways; client bytes of a held build wait for the release.
async fn forward(client: UnixStream, target: PathBuf, shared: Arc<ProxyShared>) {
    let Ok(engine) = UnixStream::connect(&target).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut engine_read, mut engine_write) = engine.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if shared.hold_builds.load(Ordering::SeqCst) && is_build_request(&buf[..n]) {
                shared.held.fetch_add(1, Ordering::SeqCst);
                let mut released = shared.release.subscribe();
                let _ = released.wait_for(|r| *r).await;
            }
            if engine_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = engine_write.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut engine_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(up, down);
}

/// The status the daemon's health service reports for `service`.
async fn health(socket: &Path, service: &str) -> ServingStatus {
    let channel = client::channel(socket).await.unwrap();
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("health check of {service:?} failed: {s:?}"))
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown)
}

/// Polls until both the overall and the ImageBuilder health are `want`.
async fn until_health(socket: &Path, want: ServingStatus) {
    until_async(&format!("health {}", want.as_str_name()), WAIT, || async {
        health(socket, "").await == want && health(socket, SERVICE).await == want
    })
    .await;
}

/// A layer that resolves (its directory exists) but fails while it is walked, before its build
/// needs a build slot: a link loop (INVALID_ARGUMENT "link loop" after Accepted; a dangling
/// link would not do: it is kept as a link, as Lambda keeps it).
fn dangling_layer(dir: &Path) -> PathBuf {
    let path = dir.join("dangling");
    std::fs::create_dir_all(&path).unwrap();
    std::os::unix::fs::symlink(path.join("link"), path.join("link")).unwrap();
    path
}

/// True when the only build in flight has its build slot (it is at, or about to reach, the
/// before-build gate; the engine has not been asked to build).
fn held_at_gate(builds: &Builds) -> bool {
    let (in_flight, _) = builds.list();
    in_flight.len() == 1 && in_flight[0].phase == Phase::Running
}

/// A daemon in this process whose builds wait at the before-build gate for a permit.
async fn gated_daemon(gate: &Arc<Semaphore>, shutdown_timeout: Duration) -> TestDaemon {
    let gate = gate.clone();
    TestDaemon::start_with(move |config| {
        config.hooks.before_build = Some(gate);
        config.shutdown_timeout = shutdown_timeout;
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Access control
// ---------------------------------------------------------------------------------------------

/// A peer that is not allowed gets PERMISSION_DENIED (exit 1) for resolve and build even when
/// the socket file itself lets it connect (a misconfigured 0666 socket).
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_is_not_allowed_is_denied_even_on_an_open_socket() {
    let (uid, gid) = test_user();
    let daemon = bin(&[]).await;
    chmod(daemon.socket(), 0o666);

    let output =
        run(ctl_as(uid, gid, &[], daemon.socket()).args(["resolve", "--runtime", "python3.12"]))
            .await;
    let (code, _, stderr) = parts(&output);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("PERMISSION_DENIED") && stderr.contains(&format!("uid {uid}")),
        "{stderr}"
    );

    let output = run(ctl_as(uid, gid, &[], daemon.socket()).args([
        "build",
        "--runtime",
        "python3.12",
        "--skip-pull-image",
        "--json",
    ]))
    .await;
    let (code, stdout, stderr) = parts(&output);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");
    let last = json_lines(&stdout)
        .pop()
        .expect("an error object on stdout");
    assert_eq!(last["type"], "error");
    assert_eq!(last["code"], "PERMISSION_DENIED");

    // The daemon itself works: root is always allowed.
    let output = run(ctl(daemon.socket()).args(["resolve", "--runtime", "python3.12"])).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

/// The mode bits of `path`.
fn socket_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// `--allow-uid` alone lets that uid in: the socket is 0666 (0660 without the flag), the
/// allowed uid in no group at all resolves, and a uid that is neither allowed nor in a group
/// connects but is PERMISSION_DENIED, named.
#[tokio::test(flavor = "multi_thread")]
async fn allow_uid_alone_lets_exactly_that_uid_in() {
    let (uid, gid) = test_user();
    let plain = bin(&[]).await;
    assert_eq!(
        socket_mode(plain.socket()),
        0o660,
        "no flag: root and the socket group"
    );
    let daemon = bin(&["--allow-uid", &uid.to_string()]).await;
    assert_eq!(socket_mode(daemon.socket()), 0o666);
    let resolve = ["resolve", "--runtime", "python3.12", "--json"];
    let output = run(ctl_as(uid, gid, &[], daemon.socket()).args(resolve)).await;
    let (code, stdout, stderr) = parts(&output);
    assert_eq!(code, Some(0), "{stderr}\nlog:\n{}", daemon.log());
    assert!(stdout.contains("python:3.12-rapid-x86_64"), "{stdout}");
    // A uid no account has, in no group.
    let stranger = 54_321;
    let output = run(ctl_as(stranger, stranger, &[], daemon.socket()).args(resolve)).await;
    let (code, _, stderr) = parts(&output);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("PERMISSION_DENIED") && stderr.contains(&format!("uid {stranger}")),
        "{stderr}"
    );
}

/// With `--allow-uid` the user may resolve and build, but layers are read with its own rights:
/// a root-only layer directory and a link to /etc/shadow are PERMISSION_DENIED naming the path
/// (and no image gets the tag), while a layer only the user can read is built into the image.
#[tokio::test(flavor = "multi_thread")]
async fn an_allowed_peer_reads_layers_only_with_its_own_rights() {
    let (uid, gid) = test_user();
    let uid_flag = uid.to_string();
    let daemon = bin(&["--allow-uid", &uid_flag]).await;
    // With --allow-uid the socket file is 0666: the daemon's own check is the gate.
    assert_eq!(socket_mode(daemon.socket()), 0o666);
    let layers = open_tempdir();

    // Root's: 0700, the user cannot even list it.
    let root_only = layer(layers.path(), "root-only", "root's secret");
    chmod(&root_only, 0o700);
    // The user's own directory, with a link to a file only root (and group shadow) can read.
    let shadow = layers.path().join("shadow");
    std::fs::create_dir(&shadow).unwrap();
    assert!(
        Path::new("/etc/shadow").is_file(),
        "this test needs /etc/shadow"
    );
    std::os::unix::fs::symlink("/etc/shadow", shadow.join("passwords")).unwrap();
    std::os::unix::fs::lchown(shadow.join("passwords"), Some(uid), Some(gid)).unwrap();
    std::os::unix::fs::chown(&shadow, Some(uid), Some(gid)).unwrap();
    // The user's own private layer: 0700 dir and 0600 file, readable by the user (and root).
    let private = layer(layers.path(), "private", "the user's own");
    chmod(&private.join("message.txt"), 0o600);
    chmod(&private, 0o700);
    std::os::unix::fs::chown(private.join("message.txt"), Some(uid), Some(gid)).unwrap();
    std::os::unix::fs::chown(&private, Some(uid), Some(gid)).unwrap();

    let as_user = || ctl_as(uid, gid, &[], daemon.socket());
    let output = run(as_user().args(["resolve", "--runtime", "python3.12", "--json"])).await;
    let (code, stdout, stderr) = parts(&output);
    assert_eq!(code, Some(0), "{stderr}\nlog:\n{}", daemon.log());
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap()["tag"],
        "public.ecr.aws/lambda/python:3.12-rapid-x86_64"
    );

    // Resolves the tag of a request with one layer, as the user.
    let tag_of = |layer: String| async move {
        let output = run(as_user().args([
            "resolve",
            "--runtime",
            "python3.12",
            "--json",
            "--layer",
            &layer,
        ]))
        .await;
        let (code, stdout, stderr) = parts(&output);
        assert_eq!(code, Some(0), "{stderr}");
        serde_json::from_str::<Value>(&stdout).unwrap()["tag"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let build_as_user = |layer: String| async move {
        run(as_user().args([
            "build",
            "--runtime",
            "python3.12",
            "--skip-pull-image",
            "--json",
            "--layer",
            &layer,
        ]))
        .await
    };

    // A directory the user cannot read.
    let spec = format!("{}={}", unique("rootonly"), root_only.display());
    let tag = tag_of(spec.clone()).await;
    let output = build_as_user(spec).await;
    let (code, _, stderr) = parts(&output);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");
    assert!(
        stderr.contains(&root_only.display().to_string()),
        "the message names the path: {stderr}"
    );
    assert!(!image_exists(&tag), "no image tagged {tag}");

    // A link out of the layer to /etc/shadow.
    let spec = format!("{}={}", unique("shadow"), shadow.display());
    let tag = tag_of(spec.clone()).await;
    let output = build_as_user(spec).await;
    let (code, _, stderr) = parts(&output);
    let baked = image_exists(&tag);
    rmi_all(&tag);
    assert!(!baked, "/etc/shadow was baked into {tag}");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");
    assert!(
        stderr.contains("/etc/shadow"),
        "the message names the path: {stderr}"
    );

    // A layer the user can read (and only the user, besides root).
    let spec = format!("{}={}", unique("private"), private.display());
    let output = build_as_user(spec).await;
    let (code, stdout, stderr) = parts(&output);
    assert_eq!(code, Some(0), "{stderr}\nlog:\n{}", daemon.log());
    let completed = json_lines(&stdout)
        .into_iter()
        .find(|e| e["type"] == "completed")
        .unwrap_or_else(|| panic!("no completed event: {stdout}"));
    let tag = completed["tag"].as_str().unwrap().to_owned();
    let content = run_in_image(&tag, "cat /opt/message.txt");
    rmi_all(&tag);
    assert_eq!(content, "the user's own");
}

/// `--socket-group` makes the socket file 0660 owned by that group: a member of the group may
/// resolve, the same user outside the group cannot even connect (exit 3, path named).
#[tokio::test(flavor = "multi_thread")]
async fn socket_group_owns_the_socket_and_lets_members_in() {
    let (uid, gid) = test_user();
    let group = test_group();
    let daemon = bin(&["--socket-group", GROUP]).await;

    let meta = std::fs::metadata(daemon.socket()).unwrap();
    assert_eq!(meta.gid(), group, "socket group");
    assert_eq!(meta.mode() & 0o7777, 0o660, "socket mode {:o}", meta.mode());

    let output = run(ctl_as(uid, gid, &[group], daemon.socket()).args([
        "resolve",
        "--runtime",
        "python3.12",
    ]))
    .await;
    let (code, _, stderr) = parts(&output);
    assert_eq!(code, Some(0), "a member may use the daemon: {stderr}");

    let output =
        run(ctl_as(uid, gid, &[], daemon.socket()).args(["resolve", "--runtime", "python3.12"]))
            .await;
    let (code, _, stderr) = parts(&output);
    assert_eq!(code, Some(3), "a non-member cannot connect: {stderr}");
    assert!(
        stderr.contains(&daemon.socket().display().to_string()),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------------------------

/// On shutdown, new builds get UNAVAILABLE while the build in flight goes on; released, every
/// client attached to it receives Completed (none is cut off with UNAVAILABLE), and only then
/// does serving end (socket file removed).
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_refuses_new_builds_and_finishes_those_in_flight() {
    const CLIENTS: usize = 8;
    let gate = Arc::new(Semaphore::new(0));
    let daemon = gated_daemon(&gate, Duration::from_secs(60)).await;
    let dir = tempfile::tempdir().unwrap();
    let request = zip_request(&[(&unique("drain"), &layer(dir.path(), "l", "drain"))]);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| spawn_build(&daemon.socket, request.clone()))
        .collect();
    let (socket, builds) = (daemon.socket.clone(), daemon.builds.clone());
    until_async(
        "the build to be held at the gate with every client",
        WAIT,
        || async {
            held_at_gate(&builds)
                && builds.list().0[0].subscribers == u32::try_from(CLIENTS).unwrap()
        },
    )
    .await;
    let tag = builds.list().0[0].tag.clone();

    // Same path as SIGTERM: the serve future's shutdown signal, then the drain.
    let serving = tokio::spawn(daemon.stop());
    // A probe that fails before it needs a build slot: INVALID_ARGUMENT until the drain starts.
    let probe = dangling_layer(dir.path());
    until_async(
        "new builds to be refused with UNAVAILABLE",
        WAIT,
        || async {
            let outcome = build(&socket, zip_request(&[(&unique("probe"), &probe)])).await;
            let code = outcome.status().code();
            assert!(
                matches!(code, Code::InvalidArgument | Code::Unavailable),
                "{:?}",
                outcome.status()
            );
            code == Code::Unavailable
        },
    )
    .await;
    let refused = build(
        &socket,
        zip_request(&[(&unique("late"), &layer(dir.path(), "late", "late"))]),
    )
    .await;
    assert_eq!(refused.status().code(), Code::Unavailable);
    assert!(
        refused.status().message().contains("shutting down"),
        "{}",
        refused.status().message()
    );
    assert!(refused.events.is_empty(), "refused before Accepted");
    assert!(
        clients.iter().all(|c| !c.is_finished()),
        "the held build's clients are still waiting"
    );
    assert!(
        !serving.is_finished(),
        "serving waits for the build in flight"
    );

    gate.add_permits(1);
    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.push(
            tokio::time::timeout(WAIT, client)
                .await
                .expect("the held build finishes once released")
                .unwrap(),
        );
    }
    rmi_all(&tag);
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err())
        .map(|s| format!("{:?}: {}", s.code(), s.message()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {CLIENTS} clients of a build that completed during the drain got {failed:?}",
        failed.len()
    );
    let completed = outcomes[0].completed().clone();
    assert!(!completed.cached);
    assert!(completed.image_id.starts_with("sha256:"));
    for outcome in &outcomes {
        assert_eq!(outcome.completed().image_id, completed.image_id);
    }
    tokio::time::timeout(WAIT, serving)
        .await
        .expect("serving ends after the drain")
        .unwrap();
    assert!(!socket.exists(), "socket file removed");
}

/// When a build outlasts the shutdown timeout (1 s here), its client's stream ends with
/// UNAVAILABLE "daemon shutting down" and serving ends; the engine never built the image.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_timeout_ends_waiting_streams_with_unavailable() {
    let gate = Arc::new(Semaphore::new(0));
    let daemon = gated_daemon(&gate, Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let request = zip_request(&[(&unique("timeout"), &layer(dir.path(), "l", "timeout"))]);
    let in_flight = spawn_build(&daemon.socket, request);
    let builds = daemon.builds.clone();
    until_async("the build to be held at the gate", WAIT, || async {
        held_at_gate(&builds)
    })
    .await;
    let tag = builds.list().0[0].tag.clone();

    let stopped_at = Instant::now();
    let serving = tokio::spawn(daemon.stop());
    let outcome = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("the client's stream ends")
        .unwrap();
    let waited = stopped_at.elapsed();
    let status = outcome.status();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("daemon shutting down"),
        "{}",
        status.message()
    );
    assert!(
        matches!(
            outcome.events.first().and_then(|e| e.event.as_ref()),
            Some(proto::build_event::Event::Accepted(_))
        ),
        "the stream had started"
    );
    assert!(
        waited >= Duration::from_millis(900),
        "the stream was ended after {waited:?}, before the 1 s shutdown timeout"
    );
    tokio::time::timeout(WAIT, serving)
        .await
        .expect("serving ends after the shutdown timeout")
        .unwrap();
    assert!(
        !image_exists(&tag),
        "the held build never reached the engine"
    );
}

/// SIGTERM to the real daemon while the engine is building: new builds get UNAVAILABLE, the
/// build in flight completes and each of its clients (lambda-imagectl) gets Completed, then
/// the daemon exits 0 and removes its socket.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_build_lets_it_complete_then_exits_0() {
    const CLIENTS: usize = 3;
    let mut proxy = EngineProxy::new(true);
    proxy.start();
    let engine = proxy.host();
    let mut daemon = bin(&["--engine", &engine, "--shutdown-timeout", "60s"]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = layer(dir.path(), "l", "sigterm");
    let spec = format!("{}={}", unique("sigterm"), path.display());
    let request = ["--runtime", "python3.12", "--layer", &spec];
    let output = run(ctl(daemon.socket())
        .arg("resolve")
        .args(request)
        .arg("--json"))
    .await;
    let tag = serde_json::from_slice::<Value>(&output.stdout).unwrap()["tag"]
        .as_str()
        .unwrap()
        .to_owned();
    let clients: Vec<Child> = (0..CLIENTS)
        .map(|_| {
            ctl(daemon.socket())
                .arg("build")
                .args(request)
                .args(["--skip-pull-image", "--json"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        })
        .collect();
    let socket = daemon.socket().to_owned();
    until_async(
        "the engine build to be held with every client",
        WAIT,
        || async {
            let output = run(ctl(&socket).args(["ls", "--json"])).await;
            let list: Value = serde_json::from_slice(&output.stdout).unwrap();
            proxy.held() == 1 && list["in_flight"][0]["subscribers"] == CLIENTS
        },
    )
    .await;

    daemon.terminate();
    // A probe that fails before it needs a build slot: INVALID_ARGUMENT until the drain starts.
    let probe = dangling_layer(dir.path());
    until_async(
        "new builds to be refused with UNAVAILABLE",
        WAIT,
        || async {
            let spec = format!("{}={}", unique("probe"), probe.display());
            let output = run(ctl(&socket).args([
                "build",
                "--runtime",
                "python3.12",
                "--skip-pull-image",
                "--layer",
                &spec,
            ]))
            .await;
            let (code, _, stderr) = parts(&output);
            assert!(
                stderr.contains("INVALID_ARGUMENT") || stderr.contains("UNAVAILABLE"),
                "exit {code:?}: {stderr}"
            );
            code == Some(1) && stderr.contains("UNAVAILABLE")
        },
    )
    .await;
    assert!(
        daemon.exited().is_none(),
        "the daemon waits for the build in flight; log:\n{}",
        daemon.log()
    );

    proxy.release();
    let mut outputs = Vec::new();
    for client in clients {
        outputs.push(
            tokio::time::timeout(WAIT, client.wait_with_output())
                .await
                .expect("the held client finishes")
                .unwrap(),
        );
    }
    let built = image_exists(&tag);
    rmi_all(&tag);
    assert!(built, "the engine built {tag}");
    for output in &outputs {
        let (code, stdout, stderr) = parts(output);
        assert_eq!(
            code,
            Some(0),
            "a client of the build that completed during the drain failed: {stderr}\nlog:\n{}",
            daemon.log()
        );
        let events = json_lines(&stdout);
        let completed = events
            .iter()
            .find(|e| e["type"] == "completed")
            .unwrap_or_else(|| panic!("no completed event: {stdout}"));
        assert_eq!(completed["tag"], tag.as_str());
        assert_eq!(completed["cached"], false);
    }
    assert_eq!(
        daemon.wait_exit(WAIT).await.code(),
        Some(0),
        "exit status; log:\n{}",
        daemon.log()
    );
    assert!(!socket.exists(), "socket file removed on exit");
}

// ---------------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------------

/// Health follows the engine with no daemon restart: SERVING while it answers, NOT_SERVING
/// once it goes away (for "" and lambda_imaged.v1.ImageBuilder, and as `lambda-imagectl
/// health`'s output and exit code) while Resolve keeps working, SERVING again when it is back,
/// and builds work again.
#[tokio::test(flavor = "multi_thread")]
async fn health_follows_the_engine() {
    let mut proxy = EngineProxy::new(false);
    proxy.start();
    let engine = proxy.host();
    let daemon = TestDaemon::start_with(move |config| config.engine_host = engine).await;
    until_health(&daemon.socket, ServingStatus::Serving).await;
    let output = run(ctl(&daemon.socket).arg("health")).await;
    assert_eq!(parts(&output).0, Some(0));
    assert_eq!(parts(&output).1.trim(), "SERVING");

    proxy.stop().await;
    until_health(&daemon.socket, ServingStatus::NotServing).await;
    let output = run(ctl(&daemon.socket).arg("health")).await;
    assert_eq!(parts(&output).0, Some(1), "{}", parts(&output).2);
    assert_eq!(parts(&output).1.trim(), "NOT_SERVING");
    let plan = daemon
        .client()
        .await
        .resolve(zip_request(&[]))
        .await
        .expect("Resolve needs no engine")
        .into_inner();
    assert_eq!(plan.tag, "public.ecr.aws/lambda/python:3.12-rapid-x86_64");

    proxy.start();
    until_health(&daemon.socket, ServingStatus::Serving).await;
    let output = run(ctl(&daemon.socket).arg("health")).await;
    assert_eq!(parts(&output).0, Some(0));
    assert_eq!(parts(&output).1.trim(), "SERVING");
    let dir = tempfile::tempdir().unwrap();
    let request = zip_request(&[(&unique("back"), &layer(dir.path(), "l", "back"))]);
    let outcome = build(&daemon.socket, request).await;
    let completed = outcome.completed().clone();
    rmi_all(&completed.tag);
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Reflection
// ---------------------------------------------------------------------------------------------

/// A python with grpcio, grpcio-reflection and grpcio-health-checking; fails with set-up
/// instructions when there is none.
fn python_with_grpc() -> PathBuf {
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("LAMBDA_IMAGED_TEST_DIR") {
        candidates.push(PathBuf::from(dir).join("venv/bin/python3"));
    }
    candidates.push(PathBuf::from("python3"));
    for python in &candidates {
        let ok = std::process::Command::new(python)
            .args([
                "-c",
                "import grpc, grpc_reflection, grpc_health, google.protobuf",
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return python.clone();
        }
    }
    panic!(
        "no python with grpcio (tried {candidates:?}): run scripts/test-env.sh, which installs \
         the PyPI packages grpcio grpcio-reflection grpcio-health-checking protobuf \
         (by hand: python3 -m pip install grpcio grpcio-reflection grpcio-health-checking protobuf)"
    );
}

/// The service names reflection v1 (what grpcurl speaks) lists.
async fn reflection_v1_services(socket: &Path) -> Vec<String> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let channel = client::channel(socket).await.unwrap();
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1 answers")
        .into_inner();
    let response = responses.message().await.unwrap().expect("one response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection v1 response: {other:?}"),
    }
}

/// A client we did not write — Python grpcio with grpcio-reflection (v1alpha) — lists
/// lambda_imaged.v1.ImageBuilder, builds requests from the reflected descriptors, gets SAM's
/// tag from Resolve and the status codes of bad requests, and reads health SERVING; reflection
/// v1 lists the same services.
#[tokio::test(flavor = "multi_thread")]
async fn a_reflection_client_without_our_protos_resolves() {
    let python = python_with_grpc();
    let daemon = TestDaemon::start().await;
    until_health(&daemon.socket, ServingStatus::Serving).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/service/reflect.py");
    let dangling = dangling_layer(daemon.dir.path());
    let output = run(Command::new(&python)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(&script)
        .arg(&daemon.socket)
        .arg(&dangling))
    .await;
    let (code, stdout, stderr) = parts(&output);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("no {key} in:\n{stdout}"))
            .to_owned()
    };
    let services = field("services");
    for service in [
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.split(' ').any(|s| s == service), "{services}");
    }
    assert_eq!(field("methods"), "Build GetInfo ListBuilds Prune Resolve");
    assert_eq!(
        field("tag"),
        "public.ecr.aws/lambda/python:3.12-rapid-x86_64"
    );
    assert_eq!(
        field("base_image"),
        "public.ecr.aws/lambda/python:3.12-x86_64"
    );
    assert_eq!(field("resolve_error"), "INVALID_ARGUMENT");
    assert_eq!(field("build_error"), "INVALID_ARGUMENT");
    assert_eq!(field("build_events"), "accepted");
    assert_eq!(field("health"), "SERVING");

    let v1 = reflection_v1_services(&daemon.socket).await;
    for service in [
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(v1.iter().any(|s| s == service), "{v1:?}");
    }
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// `--config FILE --print-config` prints the file's values with flags overriding them (a
/// flag's list replaces the file's) and creates nothing; an unknown key stops the daemon at
/// start-up with a non-zero exit naming the key.
#[tokio::test(flavor = "multi_thread")]
async fn config_file_with_flag_overrides_and_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        format!(
            "socket = \"{d}/file.sock\"\n\
             cache_dir = \"{d}/cache-from-file\"\n\
             engine = \"unix://{d}/engine-from-file.sock\"\n\
             build_timeout = \"2m\"\n\
             shutdown_timeout = \"5s\"\n\
             max_zip_ratio = 50\n\
             allow_uid = [1234]\n\
             log_format = \"json\"\n"
        ),
    )
    .unwrap();
    let daemon = || {
        let mut cmd = Command::new(DAEMON);
        cmd.env_remove("LAMBDA_IMAGED_SOCKET")
            .env_remove("LAMBDA_IMAGED_RIE_DIR")
            .env("DOCKER_HOST", format!("unix://{d}/docker-host.sock"));
        cmd
    };
    let output = run(daemon()
        .arg("--config")
        .arg(&file)
        .arg("--print-config")
        .args(["--build-timeout", "30s", "--allow-uid", "5678"])
        .arg("--socket")
        .arg(dir.path().join("flag.sock")))
    .await;
    let (code, stdout, stderr) = parts(&output);
    assert_eq!(code, Some(0), "{stderr}");
    let printed: toml::Table = toml::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let get = |key: &str| {
        printed
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in:\n{stdout}"))
            .clone()
    };
    let s = |v: &str| toml::Value::String(v.to_owned());
    assert_eq!(get("socket"), s(&format!("{d}/flag.sock")), "flag wins");
    assert_eq!(get("cache_dir"), s(&format!("{d}/cache-from-file")));
    assert_eq!(get("rie_dir"), s(&format!("{d}/cache-from-file/rie")));
    assert_eq!(
        get("engine"),
        s(&format!("unix://{d}/engine-from-file.sock"))
    );
    assert_eq!(get("build_timeout"), s("30s"), "flag wins");
    assert_eq!(get("shutdown_timeout"), s("5s"));
    assert_eq!(get("max_zip_ratio"), toml::Value::Integer(50));
    assert_eq!(
        get("allow_uid"),
        toml::Value::Array(vec![toml::Value::Integer(5678)]),
        "a flag's list replaces the file's"
    );
    assert_eq!(get("log_format"), s("json"));
    assert!(
        !dir.path().join("cache-from-file").exists(),
        "--print-config creates nothing"
    );
    assert!(
        !dir.path().join("flag.sock").exists(),
        "--print-config does not listen"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!("socket = \"{d}/bad.sock\"\nbuild_timeuot = \"2m\"\n"),
    )
    .unwrap();
    let output = run(daemon().arg("--config").arg(&bad)).await;
    let (code, _, stderr) = parts(&output);
    assert_ne!(code, Some(0), "an unknown key must stop the daemon");
    assert!(code.is_some(), "exited, not killed");
    assert!(stderr.contains("build_timeuot"), "names the key: {stderr}");
    assert!(!dir.path().join("bad.sock").exists(), "never listened");
}

// ---------------------------------------------------------------------------------------------
// A refused socket (issue 15, item 2)
// ---------------------------------------------------------------------------------------------

/// A user the socket's permissions keep out is told so, not asked whether the daemon runs
/// (exit 3): permission denied, the socket's owner, group and mode, and the group to join;
/// when the socket's group is root's, that only root may connect and how to open it up.
#[tokio::test(flavor = "multi_thread")]
async fn a_user_outside_the_socket_group_is_told_permission_denied_and_what_to_do() {
    let (uid, gid) = test_user();
    test_group();
    let daemon = bin(&["--socket-group", GROUP]).await;
    let resolve_as_user = || async {
        let output = run(ctl_as(uid, gid, &[], daemon.socket()).args([
            "resolve",
            "--runtime",
            "python3.12",
        ]))
        .await;
        let (code, _, stderr) = parts(&output);
        assert_eq!(code, Some(3), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "cannot reach lambda-imaged at {}: permission denied",
                daemon.socket().display()
            )),
            "{stderr}"
        );
        assert!(!stderr.contains("is the daemon running"), "{stderr}");
        stderr
    };

    let stderr = resolve_as_user().await;
    for part in [
        format!("owned by root:{GROUP} with mode 0660"),
        format!("user {USER} (uid {uid}) is not in group {GROUP}"),
        format!("sudo usermod -aG {GROUP} {USER}"),
    ] {
        assert!(stderr.contains(&part), "no {part:?} in: {stderr}");
    }

    // The user is listed in the socket's group, but this session does not have it yet (as
    // right after `usermod -aG`): log in again.
    let joined = joined_group();
    std::os::unix::fs::chown(daemon.socket(), None, Some(joined)).unwrap();
    let stderr = resolve_as_user().await;
    for part in [
        format!("is a member of {JOINED_GROUP} but this login session is not yet"),
        format!("newgrp {JOINED_GROUP}"),
    ] {
        assert!(stderr.contains(&part), "no {part:?} in: {stderr}");
    }

    // The socket's group is root's: joining it is not the advice.
    std::os::unix::fs::chown(daemon.socket(), None, Some(0)).unwrap();
    let stderr = resolve_as_user().await;
    for part in [
        "owned by root:root with mode 0660",
        "only root may connect",
        "--socket-group",
    ] {
        assert!(stderr.contains(part), "no {part:?} in: {stderr}");
    }
}

/// A group the test user is listed in (in /etc/group), created when missing.
const JOINED_GROUP: &str = "lambda-imaged-test-joined";

/// The gid of [`JOINED_GROUP`], created with the test user as a member when missing;
/// retried on lock contention like `test_user`.
fn joined_group() -> u32 {
    let mut last = String::new();
    for _ in 0..100 {
        let listed = text(&system("getent", &["group", JOINED_GROUP]).stdout)
            .trim()
            .rsplit(':')
            .next()
            .is_some_and(|members| members.split(',').any(|m| m == USER));
        if let (true, Some(gid)) = (listed, number_from("getent", &["group", JOINED_GROUP], 2)) {
            return gid;
        }
        let out = system("groupadd", &["-f", JOINED_GROUP]);
        let out = if out.status.success() {
            system("usermod", &["-aG", JOINED_GROUP, USER])
        } else {
            out
        };
        if !out.status.success() {
            last = text(&out.stderr);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("could not create the group {JOINED_GROUP} with {USER} in it: {last}");
}

/// A build whose background work (its last-use record) is held at a gate when the daemon is
/// told to stop: with the gate opened, the drain waits for it and the record is on disk once
/// the daemon has stopped; with the gate shut, the drain gives up at --shutdown-timeout and
/// names the task it cut off (tasks.rs). The shutdown is the one the binary runs on SIGTERM.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_waits_for_background_work_or_names_what_it_cut_off() {
    for opened in [true, false] {
        let gate = Arc::new(Semaphore::new(0));
        let hooked = gate.clone();
        // The cache outlives the daemon's own temp dir, which goes with it.
        let cache = tempfile::tempdir().unwrap();
        let cache_dir = cache.path().join("cache");
        let configured = cache_dir.clone();
        let daemon = TestDaemon::start_with(move |config| {
            config.cache_dir = configured;
            config.hooks.background = Some(hooked);
            config.shutdown_timeout = Duration::from_secs(if opened { 120 } else { 2 });
        })
        .await;
        let layer = daemon.dir.path().join("layer");
        write_file(&layer.join("message.txt"), &unique("drain"), 0o644);
        let mut request = zip_request(&[("drain", &layer)]);
        request.skip_pull_image = true;
        let built = build(&daemon.socket, request).await;
        let tag = built.completed().tag.clone();
        let record = format!("last-use record of {tag}");
        assert!(
            daemon.tasks.running().contains(&record),
            "held at the gate: {:?}",
            daemon.tasks.running()
        );
        let used = cache_dir.join("used");
        let records = |dir: &Path| std::fs::read_dir(dir).map_or(0, |d| d.count());
        assert_eq!(records(&used), 0, "not written while held");
        let tasks = daemon.tasks.clone();
        let stopping = tokio::spawn(daemon.stop());
        if opened {
            gate.add_permits(1000);
        }
        stopping.await.unwrap();
        if opened {
            assert!(tasks.cut_off().is_empty(), "{:?}", tasks.cut_off());
            assert_eq!(
                records(&used),
                1,
                "the record was written before the daemon stopped"
            );
        } else {
            assert!(
                tasks.cut_off().contains(&record),
                "named as cut off: {:?}",
                tasks.cut_off()
            );
        }
        rmi_all(&tag);
    }
}
