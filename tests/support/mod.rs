//! Test support: a daemon on a temp socket backed by the real private engine that
//! `scripts/test-env.sh` starts (DOCKER_HOST), in this process ([`TestDaemon`]) or as the real
//! binary ([`daemon::Daemon`]); the one poll ([`until`]); helpers that ask the engine itself.
//!
//! Tests that need the engine fail loudly when it is missing; they are never skipped.

#![allow(dead_code)]

pub mod daemon;
pub mod dockerd;
pub mod fault_proxy;
pub mod podman;
pub mod registry;
pub mod tree;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lambda_imaged::client::{self, Client, ImageBuilderClient, LayerArg, RequestBuilder, proto};
use lambda_imaged::config::Config;
use lambda_imaged::listener::Listener;
use lambda_imaged::server::Builds;
use lambda_imaged::server::Daemon;
use proto::build_event::Event;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// The engine the tests use; panics with instructions when it is not configured.
pub fn engine_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| {
        panic!("DOCKER_HOST is not set: run `eval \"$(scripts/test-env.sh)\"` (or scripts/test.sh) first")
    })
}

/// The directory holding the real RIE binaries.
pub fn rie_dir() -> PathBuf {
    let dir = PathBuf::from(std::env::var("LAMBDA_IMAGED_RIE_DIR").unwrap_or_else(|_| {
        panic!("LAMBDA_IMAGED_RIE_DIR is not set: run `eval \"$(scripts/test-env.sh)\"` first")
    }));
    assert!(
        dir.join("aws-lambda-rie-x86_64").is_file(),
        "no RIE in {}",
        dir.display()
    );
    dir
}

/// A daemon running in this process on a temp socket.
pub struct TestDaemon {
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    pub builds: Arc<Builds>,
    /// Its background tasks (what runs, what the shutdown drain cut off).
    pub tasks: lambda_imaged::server::Tasks,
    /// What it answered and the superseded images it has yet to remove.
    pub retirements: Arc<lambda_imaged::retire::Retirements>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestDaemon {
    /// A daemon on the test engine.
    pub async fn start() -> TestDaemon {
        Self::start_with(|_| {}).await
    }

    /// A daemon on the test engine, with `tweak` applied to its config.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestDaemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let mut config = Config::new(socket.clone(), dir.path().join("cache"));
        config.engine_host = engine_host();
        config.rie_dir = rie_dir();
        // Superseded images go as soon as nothing uses them (the suites that check removal and
        // prune expect that); tests of the grace itself set their own.
        config.answer_grace = Duration::ZERO;
        // Off unless `tweak` turns it on: background rebuilds would race with counted builds.
        config.keep_warm = Duration::ZERO;
        tweak(&mut config);
        let listener = Listener::open(&config.socket, None, config.socket_reach())
            .await
            .unwrap();
        let daemon = Daemon::new(config);
        let builds = daemon.builds.clone();
        let tasks = daemon.tasks();
        let retirements = daemon.retirements();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            daemon
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        TestDaemon {
            socket,
            dir,
            builds,
            tasks,
            retirements,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A typed client.
    pub async fn client(&self) -> ImageBuilderClient<Channel> {
        client::connect(&self.socket).await.unwrap()
    }

    /// Stops the daemon and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// A unique, valid name for this test run (tags must not collide between parallel tests).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        uuid::Uuid::new_v4().simple().to_string().get(..12).unwrap()
    )
}

/// A ZIP python3.12 request with the given layers (name, path), never pulling.
pub fn zip_request(layers: &[(&str, &Path)]) -> proto::BuildRequest {
    layers
        .iter()
        .fold(
            RequestBuilder::zip("python3.12").skip_pull_image(true),
            |request, (name, path)| request.layer(LayerArg::new(*name, *path)),
        )
        .finish()
        .expect("the test's working directory exists")
}

/// Every event of one Build stream, and how it ended.
pub use client::Outcome;

/// What the tests ask of an [`Outcome`]: panicking accessors and the events all clients share.
pub trait OutcomeExt {
    /// The Completed event; panics with the status otherwise.
    fn completed(&self) -> &proto::Completed;
    /// The status the stream ended with; panics if it succeeded.
    fn status(&self) -> &tonic::Status;
    /// The events without build-specific variation (Accepted.joined differs between clients).
    fn shared_events(&self) -> Vec<Event>;
}

impl OutcomeExt for Outcome {
    fn completed(&self) -> &proto::Completed {
        match &self.result {
            Ok(completed) => completed,
            Err(status) => panic!("build failed: {:?}: {}", status.code(), status.message()),
        }
    }

    fn status(&self) -> &tonic::Status {
        match &self.result {
            Ok(completed) => panic!("expected a failure, got {completed:?}"),
            Err(status) => status,
        }
    }

    fn shared_events(&self) -> Vec<Event> {
        self.events
            .iter()
            .filter_map(|e| e.event.clone())
            .filter(|e| !matches!(e, Event::Accepted(_)))
            .collect()
    }
}

/// Runs one Build to its end on a connection of its own (the client checks that the stream
/// ends with Completed or a status, and nothing follows Completed).
pub async fn build(socket: &Path, request: proto::BuildRequest) -> Outcome {
    Client::connect(socket).await.unwrap().build(request).await
}

/// Starts one Build on a task of its own (for concurrent clients); its handle yields the outcome.
pub fn spawn_build(
    socket: &Path,
    request: proto::BuildRequest,
) -> tokio::task::JoinHandle<Outcome> {
    let socket = socket.to_owned();
    tokio::spawn(async move { build(&socket, request).await })
}

/// Removes `reference` on the engine at `host` together with the pinned tags (our images with
/// layers carry one: `<tag>-<16 hex digits of the ID>`, which `docker rmi <tag>` would leave
/// behind), keeping untagged parents; other names of the image (a base tagged under another
/// name, say) are left alone, so the image goes only when those were its only names. Nothing
/// happens when there is no such image.
pub fn rmi_all_on(host: &str, reference: &str) {
    // `{{json}}`, not `join`: the containerd store's inspect gives the template no []string.
    let inspected = docker_on(
        host,
        &[
            "image",
            "inspect",
            "--format",
            "{{.Id}} {{json .RepoTags}}",
            reference,
        ],
    );
    if !inspected.status.success() {
        return;
    }
    let text = String::from_utf8_lossy(&inspected.stdout).into_owned();
    let (id, tags) = text.trim().split_once(' ').unwrap_or((text.trim(), "[]"));
    let tags: Vec<String> = serde_json::from_str(tags).unwrap_or_default();
    let hex = id.trim_start_matches("sha256:");
    let pin_end = format!("-{}", hex.get(..16).unwrap_or(hex));
    let mut names = vec![reference.to_owned()];
    names.extend(tags.into_iter().filter(|tag| tag.ends_with(&pin_end)));
    let mut args = vec!["rmi", "-f", "--no-prune"];
    args.extend(names.iter().map(String::as_str));
    docker_on(host, &args);
}

/// [`rmi_all_on`] on the test engine.
pub fn rmi_all(reference: &str) {
    rmi_all_on(&engine_host(), reference)
}

/// Runs the docker CLI against the test engine.
pub fn docker(args: &[&str]) -> Output {
    docker_on(&engine_host(), args)
}

/// Runs the docker CLI against the engine at `host` (a `DOCKER_HOST` value).
pub fn docker_on(host: &str, args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .env("DOCKER_HOST", host)
        .output()
        .expect("the docker CLI runs (installed by scripts/test-env.sh)")
}

/// Runs the docker CLI and returns stdout; panics with stderr on failure.
pub fn docker_ok(args: &[&str]) -> String {
    docker_ok_on(&engine_host(), args)
}

/// [`docker_ok`] against the engine at `host`.
pub fn docker_ok_on(host: &str, args: &[&str]) -> String {
    let output = docker_on(host, args);
    assert!(
        output.status.success(),
        "docker {args:?} on {host} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A moment to count engine events from, for [`engine_builds`]: the current time, at which a
/// subscription to the engine's image events is opened and kept until the count reads it.
///
/// A live subscription, not a later `docker events --since` query: the engine replays only its
/// last 256 events, and tests running in parallel on the shared engine can produce more than
/// that during one build, so a later query could miss a build.
pub fn now_stamp() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let stamp = format!("{}.{:09}", now.as_secs(), now.subsec_nanos());
    // `--since stamp` also replays what happened while the CLI was starting.
    let mut child = Command::new("docker")
        .args(["events", "--since", &stamp])
        .args(["--filter", "type=image", "--filter", "type=volume"])
        .args(["--format", EVENT_FORMAT])
        .env("DOCKER_HOST", engine_host())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the docker CLI runs (installed by scripts/test-env.sh)");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    EVENT_WATCHES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((stamp.clone(), EventWatch { child, lines }));
    stamp
}

/// One line per engine event: type, action, actor id, actor name (a tag for `image tag`).
const EVENT_FORMAT: &str = "{{.Type}} {{.Action}} {{.Actor.ID}} {{.Actor.Attributes.name}}";

/// How long the engine may take to show the marker event on a busy machine.
const EVENTS_DEADLINE: Duration = Duration::from_secs(120);

/// Subscriptions opened by [`now_stamp`], by the stamp it returned; taken by the count.
static EVENT_WATCHES: std::sync::Mutex<Vec<(String, EventWatch)>> =
    std::sync::Mutex::new(Vec::new());

/// A running `docker events` and the lines it printed; the process ends with it.
struct EventWatch {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many builds the engine itself tagged `tag` between `since` (from [`now_stamp`]) and
/// now (Docker emits one image `tag` event per successful build, cached ones included).
pub fn engine_builds(tag: &str, since: &str) -> usize {
    engine_builds_of(&[tag.to_owned()], since)
}

/// Like [`engine_builds`], summed over `tags`.
///
/// Exact, with no waiting on a clock: it creates a marker volume (a `volume create` event)
/// and reads the subscription up to that event. The engine delivers events in order, so
/// every event of what finished before this call has been counted by then; a marker that
/// does not show within [`EVENTS_DEADLINE`] fails the test.
pub fn engine_builds_of(tags: &[String], since: &str) -> usize {
    let watch = {
        let mut watches = EVENT_WATCHES.lock().unwrap_or_else(|p| p.into_inner());
        let at = watches
            .iter()
            .position(|(stamp, _)| stamp == since)
            .unwrap_or_else(|| {
                panic!("`since` ({since}) must come from now_stamp(), once per count")
            });
        watches.swap_remove(at).1
    };
    let marker = unique("lambda-imaged-test-marker-");
    docker_ok(&["volume", "create", &marker]);
    let deadline = std::time::Instant::now() + EVENTS_DEADLINE;
    let mut builds = 0;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = match watch.lines.recv_timeout(left) {
            Ok(line) => line,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                docker(&["volume", "rm", &marker]);
                panic!(
                    "the engine did not report creating volume {marker} within {EVENTS_DEADLINE:?}"
                )
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                docker(&["volume", "rm", &marker]);
                let mut watch = watch;
                let mut stderr = String::new();
                if let Some(mut pipe) = watch.child.stderr.take() {
                    use std::io::Read;
                    let _ = pipe.read_to_string(&mut stderr);
                }
                panic!("`docker events --since {since}` ended before the marker event: {stderr}")
            }
        };
        let mut fields = line.splitn(4, ' ');
        let (kind, action, id, name) = (
            fields.next().unwrap_or_default(),
            fields.next().unwrap_or_default(),
            fields.next().unwrap_or_default(),
            fields.next().unwrap_or_default(),
        );
        if (kind, action, id) == ("volume", "create", marker.as_str()) {
            break;
        }
        let ours = tags
            .iter()
            .any(|tag| name == tag || name.ends_with(&format!("/{tag}")));
        if (kind, action) == ("image", "tag") && ours {
            builds += 1;
        }
    }
    docker_ok(&["volume", "rm", &marker]);
    builds
}

/// Runs `script` with busybox sh in `image` and returns its stdout.
pub fn run_in_image(image: &str, script: &str) -> String {
    docker_ok(&[
        "run",
        "--rm",
        "--entrypoint",
        "/bin/sh",
        image,
        "-c",
        script,
    ])
}

/// Output bytes as text, for messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A layer directory `dir/name` with one file, `message.txt`, holding `content`.
pub fn layer(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    write_file(&path.join("message.txt"), content, 0o644);
    path
}

/// Writes `content` to `path` with `mode`, creating parents.
pub fn write_file(path: &Path, content: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The bootstrap fixture (busybox-sh runtime API loop).
pub fn bootstrap_fixture() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bootstrap"))
        .unwrap()
}

/// Runs `tag` with the real RIE and invokes the function once over HTTP; returns the answer.
pub async fn invoke_through_rie(tag: &str) -> String {
    invoke_through_rie_running(tag, &["/opt/bootstrap"]).await
}

/// Like [`invoke_through_rie`], with the RIE running `command` as the runtime (as SAM runs an
/// IMAGE function: the RIE, then the image's ENTRYPOINT and CMD).
pub async fn invoke_through_rie_running(tag: &str, command: &[&str]) -> String {
    invoke_through_rie_on(&engine_host(), tag, command).await
}

/// [`invoke_through_rie_running`] on the engine at `host`.
pub async fn invoke_through_rie_on(host: &str, tag: &str, command: &[&str]) -> String {
    let docker_ok = |args: &[&str]| docker_ok_on(host, args);
    let docker = |args: &[&str]| docker_on(host, args);
    let output = docker_ok(&["network", "inspect", "bridge", "--format", "{{.Name}}"]);
    assert_eq!(
        output.trim(),
        "bridge",
        "the engine needs its default bridge to publish ports"
    );
    let container = docker_ok(
        &[
            "run",
            "-d",
            "--rm",
            "-p",
            "127.0.0.1::8080",
            "--entrypoint",
            "/var/rapid/aws-lambda-rie",
            tag,
        ]
        .into_iter()
        .chain(command.iter().copied())
        .collect::<Vec<_>>(),
    );
    let container = container.trim().to_owned();
    let port = docker_ok(&["port", &container, "8080/tcp"]);
    let address = port.lines().next().unwrap().trim().to_owned();
    let url = format!("http://{address}/2015-03-31/functions/function/invocations");
    let response = &std::sync::Mutex::new(String::new());
    let what = Later(|| {
        let logs = docker(&["logs", &container]);
        format!(
            "an answer from the RIE; container log: {}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        )
    });
    /// Removes the container, also when the wait fails.
    struct Removed<'a>(&'a str, &'a str);
    impl Drop for Removed<'_> {
        fn drop(&mut self) {
            docker_on(self.0, &["rm", "-f", self.1]);
        }
    }
    let _removed = Removed(host, &container);
    until_async(what, RIE_ANSWER_WITHIN, || {
        let url = &url;
        async move {
            let out = Command::new("curl")
                .args(["-s", "-m", "10", "-XPOST", url, "-d", r#"{"ping":1}"#])
                .output()
                .unwrap();
            let answer = String::from_utf8_lossy(&out.stdout).into_owned();
            let done = out.status.success() && !answer.is_empty();
            *response.lock().unwrap() = answer;
            done
        }
    })
    .await;
    response.lock().unwrap().clone()
}

/// How long the RIE in a fresh container may take to answer its first invocation.
const RIE_ANSWER_WITHIN: Duration = Duration::from_secs(120);

/// The last ContextProgress of a stream: the bytes sent to the engine.
pub fn bytes_sent(events: &[proto::BuildEvent]) -> u64 {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(proto::build_event::Event::ContextProgress(p)) => Some(p.bytes_sent),
            _ => None,
        })
        .next_back()
        .unwrap_or(0)
}

/// `size` bytes that do not compress (xorshift64), so a layer really costs its size to send.
pub fn noise(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(size);
    out
}

/// Builds `tag` with the classic builder from `dockerfile` and the `files` (name, content,
/// mode) beside it.
pub fn docker_build(tag: &str, dockerfile: &str, files: &[(&str, &str, u32)]) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
    for (name, content, mode) in files {
        write_file(&dir.path().join(name), content, *mode);
    }
    let output = Command::new("docker")
        .args(["build", "-q", "-t", tag])
        .arg(dir.path())
        .env("DOCKER_HOST", engine_host())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "docker build {tag}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The messages of `outcome`'s `Warning` events whose code is `code`.
pub fn warnings_with_code(outcome: &Outcome, code: &str) -> Vec<String> {
    outcome
        .events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Warning(w)) if w.code == code => Some(w.message.clone()),
            _ => None,
        })
        .collect()
}

/// Environment variable set in the child process [`in_own_process`] starts.
const OWN_PROCESS_ENV: &str = "LAMBDA_IMAGED_TEST_OWN_PROCESS";

/// Runs test `name` (its full path in this test binary, e.g. `"slow_reader_is_dropped"`) in a
/// process of its own, for a test that measures its process (RSS, peak RSS, open files):
/// under `cargo test` every test of a binary shares one process, so another test's memory
/// would count. Returns true in that child, where the caller goes on with its body; in the
/// caller's process it runs this binary again with `--exact NAME`, waits, panics unless the
/// child passed (its output is shown) and returns false, so the caller returns. Under nextest
/// each test already has its own process; the re-run costs one process start.
pub fn in_own_process(name: &str) -> bool {
    if std::env::var_os(OWN_PROCESS_ENV).is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let output = std::process::Command::new(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(OWN_PROCESS_ENV, "1")
        .output()
        .expect("running the test binary again");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{text}");
    assert!(
        output.status.success() && text.contains("1 passed"),
        "{name} in its own process: {}",
        output.status
    );
    false
}

/// A message made when it is shown: [`until`] shows it on timeout, so it can say what the
/// state was then (`Later(|| format!("{} left", count()))`).
pub struct Later<F>(pub F);

impl<F: Fn() -> String> std::fmt::Display for Later<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&(self.0)())
    }
}

/// The one poll of the tests: checks `check` every 50 ms until it holds; panics naming `what`
/// once `deadline` has passed. For states the daemon or an engine reaches on its own (a
/// subscriber count, a health status, a file), never as a sleep standing in for an event.
pub async fn until(
    what: impl std::fmt::Display,
    deadline: Duration,
    mut check: impl FnMut() -> bool,
) {
    until_async(what, deadline, || std::future::ready(check())).await;
}

/// [`until`] for a check that awaits (an RPC, a health probe).
pub async fn until_async<F, Fut>(what: impl std::fmt::Display, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`until`] outside an async runtime (blocking the calling thread between checks).
pub fn until_blocking(
    what: impl std::fmt::Display,
    deadline: Duration,
    mut check: impl FnMut() -> bool,
) {
    let started = std::time::Instant::now();
    while !check() {
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True when the first build `builds` lists is running (it holds its build slot).
pub fn first_build_running(builds: &Builds) -> bool {
    builds
        .list()
        .0
        .first()
        .is_some_and(|b| b.phase == lambda_imaged::server::Phase::Running)
}
