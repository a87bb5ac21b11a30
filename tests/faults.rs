//! The engine failing mid-build, many clients at once, clients that leave or stop reading:
//! every scenario runs against the real engine behind the fault proxy
//! (`support/fault_proxy.rs`), which injects the fault and counts the engine calls. Builds are
//! held at known points with the proxy's `Hang` (a gate the test opens), never with sleeps.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use lambda_imaged::client::{self, Client, proto};
use lambda_imaged::server::Builds;
use proto::build_event::Event;
use support::fault_proxy::{self, Fault, FaultProxy};
use support::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// The engine's load endpoint: where the image goes in, so where a fault hurts most.
const LOAD: &str = "/images/load";

/// Generous bound for states the daemon reaches on its own on a busy 2-core machine.
const DEADLINE: Duration = Duration::from_secs(90);

fn subscribers(builds: &Builds) -> u32 {
    builds.list().0.iter().map(|s| s.subscribers).sum()
}

/// A daemon whose engine is the proxy, with `tweak` applied.
async fn daemon_behind(
    proxy: &FaultProxy,
    tweak: impl FnOnce(&mut lambda_imaged::config::Config),
) -> TestDaemon {
    let host = proxy.host();
    TestDaemon::start_with(move |config| {
        config.engine_host = host;
        tweak(config);
    })
    .await
}

/// A request for a new tag with one small layer of its own.
fn new_request(dir: &Path, prefix: &str) -> proto::BuildRequest {
    let name = unique(prefix);
    let path = layer(dir, &name, &name);
    zip_request(&[(&name, &path)])
}

/// A Build stream read by hand: its Accepted event has arrived, nothing more is read.
async fn open_stream(
    socket: &Path,
    request: proto::BuildRequest,
) -> tonic::Streaming<proto::BuildEvent> {
    let mut client = client::connect(socket).await.unwrap();
    let mut stream = client.build(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(Event::Accepted(_))), "{first:?}");
    stream
}

/// Reads `stream` to its end: the Completed event, or the status it ended with.
async fn finish_stream(
    stream: &mut tonic::Streaming<proto::BuildEvent>,
) -> (usize, Result<proto::Completed, tonic::Status>) {
    let mut events = 0;
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                events += 1;
                if let Some(Event::Completed(done)) = event.event {
                    return (events, Ok(done));
                }
            }
            Ok(None) => panic!("the stream ended with neither Completed nor a status"),
            Err(status) => return (events, Err(status)),
        }
    }
}

/// `count` Build streams for `request` at once, each read to its end.
async fn concurrent_builds(
    socket: &Path,
    request: &proto::BuildRequest,
    count: usize,
) -> Vec<Outcome> {
    let clients: Vec<_> = (0..count)
        .map(|_| spawn_build(socket, request.clone()))
        .collect();
    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.push(client.await.unwrap());
    }
    outcomes
}

/// Asserts every outcome failed with `code` within `within` of `started`, naming the engine.
fn assert_all_failed(
    outcomes: &[Outcome],
    code: Code,
    host: &str,
    started: Instant,
    within: Duration,
) {
    for outcome in outcomes {
        let status = outcome.status();
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(
            status.message().contains(host) || status.message().contains("--build-timeout"),
            "the status names the engine or the limit: {}",
            status.message()
        );
    }
    assert!(
        started.elapsed() < within,
        "every subscriber was told within {within:?} (took {:?})",
        started.elapsed()
    );
}

/// Three concurrent requests for `request` while the engine answers `path` with HTTP 500 and
/// `text`: each gets FAILED_PRECONDITION with the engine's text and address, within
/// [`DEADLINE`]; the engine saw the call; the fault is then lifted.
async fn three_fail_on_http_500(
    proxy: &FaultProxy,
    daemon: &TestDaemon,
    request: &proto::BuildRequest,
    path: &str,
    text: &str,
) -> Vec<Outcome> {
    proxy.set(path, Fault::Error500(text.into()));
    let started = Instant::now();
    let outcomes = concurrent_builds(&daemon.socket, request, 3).await;
    assert_all_failed(
        &outcomes,
        Code::FailedPrecondition,
        &proxy.host(),
        started,
        DEADLINE,
    );
    for outcome in &outcomes {
        let message = outcome.status().message();
        assert!(message.contains(text), "{message}");
    }
    assert!(proxy.count(path) >= 1);
    proxy.clear();
    outcomes
}

/// After a fault: the slot is free, a retry builds, the daemon still answers GetInfo.
async fn assert_recovers(daemon: &TestDaemon, request: proto::BuildRequest) {
    until("an empty in-flight table", DEADLINE, || {
        daemon.builds.in_flight() == 0
    })
    .await;
    let retry = build(&daemon.socket, request).await;
    let done = retry.completed();
    assert!(!done.cached, "the retry built: {done:?}");
    let info = Client::connect(&daemon.socket)
        .await
        .unwrap()
        .info()
        .await
        .unwrap();
    assert!(info.engine.unwrap().reachable);
    rmi_all(&done.tag);
}

/// HTTP 500 on the load: every subscriber gets FAILED_PRECONDITION with the engine's text and
/// address; the slot is cleared and a retry after the fault builds.
#[tokio::test(flavor = "multi_thread")]
async fn engine_500_on_load_reaches_every_subscriber() {
    let proxy = FaultProxy::start().await;
    let daemon = daemon_behind(&proxy, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let request = new_request(dir.path(), "f500");
    three_fail_on_http_500(
        &proxy,
        &daemon,
        &request,
        LOAD,
        "simulated engine failure: disk I/O error",
    )
    .await;
    assert_recovers(&daemon, request).await;
    daemon.stop().await;
}

/// HTTP 500 on the base pull (`POST /images/create`, where the engine reports a registry it
/// could not pull from): every request for the missing base gets a status naming the engine
/// and its text, the shared pull's slot is cleared, and once the fault is gone a retry pulls
/// the base from the registry and builds.
#[tokio::test(flavor = "multi_thread")]
async fn engine_500_on_the_base_pull_reaches_every_request_then_a_retry_pulls() {
    const PULL: &str = "/images/create";
    let repo = unique("fpull");
    let pushed = format!(
        "{}/{repo}/python:3.12-x86_64",
        support::registry::registry()
    );
    docker_ok(&["tag", "public.ecr.aws/lambda/python:3.12-x86_64", &pushed]);
    docker_ok(&["push", &pushed]);
    docker_ok(&["rmi", &pushed]);
    let proxy = FaultProxy::start().await;
    let mirror = format!("{}/{repo}", support::registry::registry());
    let daemon = daemon_behind(&proxy, move |config| {
        config.base_image_mirror = Some(mirror)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let name = unique("fpull");
    let request = client::RequestBuilder::zip("python3.12")
        .layer(client::LayerArg::new(
            &name,
            layer(dir.path(), &name, &name),
        ))
        .finish()
        .unwrap();
    let outcomes = three_fail_on_http_500(
        &proxy,
        &daemon,
        &request,
        PULL,
        "simulated registry failure: 503 Service Unavailable",
    )
    .await;
    for outcome in &outcomes {
        let message = outcome.status().message();
        assert!(
            message.contains(&repo),
            "the status names the base: {message}"
        );
    }
    until("an empty in-flight table", DEADLINE, || {
        daemon.builds.in_flight() == 0
    })
    .await;
    let retry = build(&daemon.socket, request).await;
    let done = retry.completed();
    assert_eq!(done.reason, proto::Reason::Missing as i32, "{retry:?}");
    let pulling = format!("pulling {pushed}");
    assert!(
        retry
            .events
            .iter()
            .any(|e| matches!(&e.event, Some(Event::Log(l)) if l.text == pulling)),
        "the retry pulled the base: {retry:?}"
    );
    docker_ok(&["image", "inspect", &pushed]);
    daemon.stop().await;
    rmi_all(&done.tag);
    docker(&["rmi", "-f", &pushed]);
}

/// The load's answer cut midway: UNAVAILABLE naming the engine and saying the connection
/// broke; a retry builds.
#[tokio::test(flavor = "multi_thread")]
async fn truncated_load_answer_is_unavailable() {
    let proxy = FaultProxy::start().await;
    let daemon = daemon_behind(&proxy, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let request = new_request(dir.path(), "fcut");
    proxy.set(LOAD, Fault::CutAfter(8));
    let started = Instant::now();
    let outcomes = concurrent_builds(&daemon.socket, &request, 2).await;
    assert_all_failed(
        &outcomes,
        Code::Unavailable,
        &proxy.host(),
        started,
        DEADLINE,
    );
    assert!(
        outcomes[0].status().message().contains("broke mid-answer"),
        "{}",
        outcomes[0].status().message()
    );
    proxy.clear();
    assert_recovers(&daemon, request).await;
    daemon.stop().await;
}

/// A load the engine never answers: DEADLINE_EXCEEDED naming --build-timeout, to every
/// subscriber, within the timeout (plus a margin for a busy machine); a retry builds.
#[tokio::test(flavor = "multi_thread")]
async fn hung_engine_hits_the_build_timeout() {
    let timeout = Duration::from_secs(10);
    let proxy = FaultProxy::start().await;
    let daemon = daemon_behind(&proxy, |config| config.build_timeout = timeout).await;
    let dir = tempfile::tempdir().unwrap();
    let request = new_request(dir.path(), "fhang");
    proxy.set(LOAD, Fault::Hang);
    let started = Instant::now();
    let outcomes = concurrent_builds(&daemon.socket, &request, 2).await;
    assert_all_failed(
        &outcomes,
        Code::DeadlineExceeded,
        &proxy.host(),
        started,
        timeout + Duration::from_secs(30),
    );
    proxy.clear();
    assert_recovers(&daemon, request).await;
    daemon.stop().await;
}

/// The engine "restarts" mid-load (every connection cut, new ones refused): subscribers get
/// UNAVAILABLE naming the engine; health says NOT_SERVING and GetInfo reachable=false while it
/// is down, and a request then is UNAVAILABLE at once; once it is back, health is SERVING
/// and a retry builds.
#[tokio::test(flavor = "multi_thread")]
async fn engine_restart_mid_build() {
    let proxy = FaultProxy::start().await;
    let daemon = daemon_behind(&proxy, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let request = new_request(dir.path(), "frestart");
    let mut watcher = Client::connect(&daemon.socket).await.unwrap();
    health_becomes(&mut watcher, ServingStatus::Serving).await;
    proxy.set(LOAD, Fault::Hang);
    let clients: Vec<_> = (0..2)
        .map(|_| spawn_build(&daemon.socket, request.clone()))
        .collect();
    proxy.wait_for(LOAD, 1, DEADLINE).await;
    let started = Instant::now();
    proxy.refuse();
    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.push(client.await.unwrap());
    }
    assert_all_failed(
        &outcomes,
        Code::Unavailable,
        &proxy.host(),
        started,
        DEADLINE,
    );
    until("an empty in-flight table", DEADLINE, || {
        daemon.builds.in_flight() == 0
    })
    .await;

    health_becomes(&mut watcher, ServingStatus::NotServing).await;
    let info = watcher.info().await.unwrap().engine.unwrap();
    assert!(!info.reachable, "{info:?}");
    assert!(!info.error.is_empty());
    let other = new_request(dir.path(), "fdown");
    let down = build(&daemon.socket, other).await;
    assert_eq!(
        down.status().code(),
        Code::Unavailable,
        "{}",
        down.status().message()
    );
    assert!(down.status().message().contains(&proxy.host()));

    proxy.clear();
    proxy.restore();
    health_becomes(&mut watcher, ServingStatus::Serving).await;
    assert_recovers(&daemon, request).await;
    daemon.stop().await;
}

/// 200 concurrent Build streams over 20 new tags: exactly 20 engine loads, all 200 complete,
/// one image id per tag; the process's file descriptors return to their baseline (less the
/// engine connections the daemon's client keeps pooled, which the proxy counts).
#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_streams_twenty_tags() {
    let proxy = FaultProxy::start().await;
    let daemon = daemon_behind(&proxy, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    // Warm up: the RIE layer and the engine connection pool exist before the baseline.
    let warm = build(&daemon.socket, new_request(dir.path(), "fwarm")).await;
    rmi_all(&warm.completed().tag);
    until("an empty in-flight table", DEADLINE, || {
        daemon.builds.in_flight() == 0
    })
    .await;
    let adjusted = || fault_proxy::open_fds() - 2 * proxy.open_connections();
    let baseline = adjusted();
    let loads_before = proxy.count(LOAD);
    let builds_before = daemon
        .builds
        .stats
        .engine_builds
        .load(std::sync::atomic::Ordering::Relaxed);

    let requests: Vec<_> = (0..20).map(|_| new_request(dir.path(), "fload")).collect();
    let clients: Vec<_> = (0..200)
        .map(|i| spawn_build(&daemon.socket, requests[i % 20].clone()))
        .collect();
    let mut ids: HashMap<String, Vec<String>> = HashMap::new();
    // A build whose engine lost a layer chain it relied on (another test's images removed
    // meanwhile on the shared engine) loads once more with every layer (`layers_resent`,
    // README "How images are made"): a second load of the same build, not a second build.
    let mut resent: HashMap<String, Vec<String>> = HashMap::new();
    for client in clients {
        let outcome = client.await.unwrap();
        let done = outcome.completed();
        resent.insert(
            done.tag.clone(),
            warnings_with_code(&outcome, "layers_resent"),
        );
        ids.entry(done.tag.clone())
            .or_default()
            .push(done.image_id.clone());
    }
    assert!(
        resent.values().all(|warnings| warnings.len() <= 1),
        "at most one resend per build: {resent:?}"
    );
    let resends = resent.values().map(Vec::len).sum::<usize>();
    assert_eq!(ids.len(), 20, "20 tags");
    for (tag, images) in &ids {
        assert_eq!(images.len(), 10, "{tag}: 10 clients completed");
        assert!(
            images.iter().all(|id| id == &images[0]),
            "{tag}: one image id: {images:?}"
        );
    }
    assert_eq!(
        proxy.count(LOAD) - loads_before,
        20 + resends,
        "exactly one engine load per tag, plus the resends: {resent:?}"
    );
    let builds = daemon
        .builds
        .stats
        .engine_builds
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(builds - builds_before, 20, "exactly 20 engine builds");

    until("file descriptors back to the baseline", DEADLINE, || {
        adjusted() <= baseline
    })
    .await;
    eprintln!(
        "fds: baseline {baseline}, after {} (pooled engine connections: {})",
        adjusted(),
        proxy.open_connections()
    );
    for tag in ids.keys() {
        rmi_all(tag);
    }
    daemon.stop().await;
}

/// Cancel one, cancel all (BuildKit's flightcontrol cases, decided differently): 4 of 5
/// subscribers leave mid-build, the build finishes and the 5th gets Completed from one engine
/// load. When every subscriber leaves, the build still runs to its end (a build is never
/// cancelled by its clients; the image is what the next request wants): a request arriving
/// meanwhile joins it, and one after it is a cache hit, with no further load.
#[tokio::test(flavor = "multi_thread")]
async fn leaving_subscribers_cancel_nothing() {
    let proxy = FaultProxy::start().await;
    let daemon = daemon_behind(&proxy, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();

    let request = new_request(dir.path(), "fcancel");
    proxy.set(LOAD, Fault::Hang);
    let mut streams = Vec::new();
    for _ in 0..5 {
        streams.push(open_stream(&daemon.socket, request.clone()).await);
    }
    proxy.wait_for(LOAD, 1, DEADLINE).await;
    until("5 subscribers", DEADLINE, || {
        subscribers(&daemon.builds) == 5
    })
    .await;
    let mut last = streams.pop().unwrap();
    drop(streams);
    until("4 subscribers gone", DEADLINE, || {
        subscribers(&daemon.builds) == 1
    })
    .await;
    proxy.clear();
    let (_, done) = finish_stream(&mut last).await;
    let done = done.unwrap_or_else(|s| panic!("the 5th failed: {s:?}"));
    assert!(!done.cached);
    assert_eq!(proxy.count(LOAD), 1, "one engine load");
    // That image stays until the end: it holds the RIE layer's chain, which the next build
    // references from the daemon's memory. Removed now, the build after it would race the
    // engine's removal event and could be refused and resent (a third load: issue 20).
    let first_tag = done.tag;

    let request = new_request(dir.path(), "fcancelall");
    proxy.set(LOAD, Fault::Hang);
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(open_stream(&daemon.socket, request.clone()).await);
    }
    proxy.wait_for(LOAD, 2, DEADLINE).await;
    drop(streams);
    until("every subscriber gone", DEADLINE, || {
        subscribers(&daemon.builds) == 0
    })
    .await;
    assert_eq!(daemon.builds.in_flight(), 1, "the build is still in flight");
    let joiner = spawn_build(&daemon.socket, request.clone());
    until("the joiner attached", DEADLINE, || {
        subscribers(&daemon.builds) == 1
    })
    .await;
    proxy.clear();
    let joined = joiner.await.unwrap();
    assert!(
        matches!(&joined.events[0].event, Some(Event::Accepted(a)) if a.joined),
        "the next request joined the abandoned build"
    );
    assert!(!joined.completed().cached);
    until("an empty in-flight table", DEADLINE, || {
        daemon.builds.in_flight() == 0
    })
    .await;
    let after = build(&daemon.socket, request).await;
    assert!(
        after.completed().cached,
        "the abandoned build's image serves the next request"
    );
    assert_eq!(after.completed().image_id, joined.completed().image_id);
    assert_eq!(proxy.count(LOAD), 2, "no further load");
    rmi_all(&after.completed().tag);
    rmi_all(&first_tag);
    daemon.stop().await;
}

/// A subscriber that stops reading while the engine prints 32 MiB: the others finish with the
/// whole (bounded) log; the stalled one is ended with RESOURCE_EXHAUSTED naming the reason;
/// the event log stays within its caps and memory stays bounded.
#[tokio::test(flavor = "multi_thread")]
async fn slow_reader_is_dropped_and_memory_stays_bounded() {
    // The memory figures are this test's alone: under cargo test the other fault tests (two
    // hundred streams, 32 MiB logs) share the process and its peak RSS.
    let own = tokio::task::block_in_place(|| {
        in_own_process("slow_reader_is_dropped_and_memory_stays_bounded")
    });
    if !own {
        return;
    }
    let proxy = FaultProxy::start().await;
    let stall = Duration::from_secs(3);
    let daemon = daemon_behind(&proxy, |config| config.client_stall_timeout = stall).await;
    let dir = tempfile::tempdir().unwrap();
    let request = new_request(dir.path(), "fslow");
    let (rss_before, _) = fault_proxy::rss();
    proxy.set(LOAD, Fault::Inflate(32 << 20));
    let mut slow = open_stream(&daemon.socket, request.clone()).await;
    let readers: Vec<_> = (0..3)
        .map(|_| spawn_build(&daemon.socket, request.clone()))
        .collect();
    let mut image = None;
    let mut tag = String::new();
    for reader in readers {
        let outcome = reader.await.unwrap();
        let done = outcome.completed().clone();
        assert!(
            outcome.events.len() <= lambda_imaged::server::MAX_EVENTS + 16,
            "the log is capped: {} events",
            outcome.events.len()
        );
        assert!(
            outcome
                .events
                .iter()
                .any(|e| matches!(&e.event, Some(Event::Warning(w)) if w.code == "log_truncated"))
        );
        assert!(image.get_or_insert(done.image_id.clone()) == &done.image_id);
        tag = done.tag;
    }
    until("the stalled client to be let go", DEADLINE, || {
        daemon
            .builds
            .stats
            .slow_clients_dropped
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    })
    .await;
    let (read, ended) = finish_stream(&mut slow).await;
    let status = ended.expect_err("the stalled client is not served to the end");
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("did not read events for 3s"),
        "{}",
        status.message()
    );
    let (rss_after, peak) = fault_proxy::rss();
    eprintln!(
        "slow reader: {read} events read late; RSS before {} MiB, after {} MiB, peak {} MiB",
        rss_before >> 20,
        rss_after >> 20,
        peak >> 20
    );
    assert!(
        peak.saturating_sub(rss_before) < 256 << 20,
        "memory bounded: peak {} MiB over a {} MiB start",
        peak >> 20,
        rss_before >> 20
    );
    rmi_all(&tag);
    daemon.stop().await;
}

/// Polls the daemon's health until it is `want`.
async fn health_becomes(watcher: &mut Client, want: ServingStatus) {
    let what = format!("health {want:?}");
    until_async(&what, DEADLINE, || {
        let mut watcher = watcher.clone();
        async move { watcher.health().await.unwrap() == want }
    })
    .await;
}

/// A real engine restart, not a model of one: the second private dockerd
/// (`support/dockerd.rs`) is killed with SIGKILL while the image streams into it, then started
/// again. The subscriber gets UNAVAILABLE naming the engine, the in-flight slot is cleared,
/// health is NOT_SERVING while the engine is down and SERVING once it is back, and the retry
/// builds the image (nothing was tagged from the cut load). Runs alone with the fleet tests
/// (`.config/nextest.toml`, group `engine-b`): they share that engine.
#[tokio::test(flavor = "multi_thread")]
async fn a_real_engine_killed_mid_load_then_restarted() {
    const BASE: &str = "public.ecr.aws/lambda/python:3.12-x86_64";
    let engine = tokio::task::spawn_blocking(|| support::dockerd::second_engine(&[BASE]))
        .await
        .unwrap();
    let host = engine.host.clone();
    let daemon = TestDaemon::start_with(move |config| config.engine_host = host).await;
    let mut watcher = Client::connect(&daemon.socket).await.unwrap();
    health_becomes(&mut watcher, ServingStatus::Serving).await;

    let dir = tempfile::tempdir().unwrap();
    let name = unique("frealrestart");
    let layer = dir.path().join(&name);
    // 128 MiB of noise: the load takes seconds, so SIGKILL lands while it streams.
    write_file(&layer.join("python/marker.txt"), &name, 0o644);
    std::fs::write(layer.join("python/blob.bin"), noise(128 << 20, 0x5eed)).unwrap();
    let request = zip_request(&[(&name, &layer)]);
    let mut stream = open_stream(&daemon.socket, request.clone()).await;
    loop {
        let event = stream
            .message()
            .await
            .expect("the stream broke before the load began")
            .expect("the stream ended before the load began");
        match event.event {
            Some(Event::ContextProgress(p)) if p.bytes_total == 0 && p.bytes_sent > 0 => break,
            Some(Event::Completed(done)) => {
                panic!("the load finished before the engine could be killed: {done:?}")
            }
            _ => {}
        }
    }
    let pid: i32 = std::fs::read_to_string(engine.dir.join("dockerd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) with the pid from the second engine's own pidfile.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    until("the killed engine's process to end", DEADLINE, || {
        support::dockerd::has_ended(pid)
    })
    .await;

    let (_, result) = finish_stream(&mut stream).await;
    let status = result.expect_err("a build whose engine was killed mid-load completed");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status.message().contains(&engine.host),
        "the status names the engine: {}",
        status.message()
    );
    assert!(killed.elapsed() < DEADLINE, "the status came late");
    until("an empty in-flight table", DEADLINE, || {
        daemon.builds.in_flight() == 0
    })
    .await;
    health_becomes(&mut watcher, ServingStatus::NotServing).await;
    let info = watcher.info().await.unwrap().engine.unwrap();
    assert!(!info.reachable, "{info:?}");

    let engine = tokio::task::spawn_blocking(|| support::dockerd::second_engine(&[BASE]))
        .await
        .unwrap();
    health_becomes(&mut watcher, ServingStatus::Serving).await;
    let retry = build(&daemon.socket, request).await;
    let done = retry.completed();
    assert_eq!(done.reason, proto::Reason::Missing as i32, "{retry:?}");
    let opt = support::tree::image_tree_at(&engine.host, &done.tag, "opt");
    assert_eq!(opt["python/marker.txt"].size, name.len() as u64, "{opt:?}");
    assert_eq!(opt["python/blob.bin"].size, 128 << 20, "{opt:?}");
    daemon.stop().await;
}

/// A warm hit makes one engine round trip: the tag's inspect (every hit confirms its image
/// with the engine), on the daemon's kept connection. The base may be inspected again only
/// when an image event (any client's, on this shared engine) emptied the daemon's index.
#[tokio::test(flavor = "multi_thread")]
async fn a_warm_hit_is_one_engine_inspect_on_a_kept_connection() {
    const HITS: usize = 50;
    let proxy = FaultProxy::start().await;
    let daemon = daemon_behind(&proxy, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let request = new_request(dir.path(), "fwarm");
    let mut client = Client::connect(&daemon.socket).await.unwrap();
    let first = client.build(request.clone()).await;
    let tag = first.completed().tag.clone();
    // The first hit settles what a build leaves for later (the pooled connection, the index).
    assert!(client.build(request.clone()).await.completed().cached);
    let (counts, connections) = (proxy.counts(), proxy.accepted_connections());
    for _ in 0..HITS {
        assert!(client.build(request.clone()).await.completed().cached);
    }
    let mut calls: HashMap<String, usize> = proxy.counts();
    for (path, before) in counts {
        *calls.entry(path).or_default() -= before;
    }
    calls.retain(|_, n| *n > 0);
    let tag_inspect = format!("/images/{tag}/json");
    let base_inspect = "/images/public.ecr.aws/lambda/python:3.12-x86_64/json";
    assert_eq!(calls.remove(&tag_inspect), Some(HITS), "{calls:?}");
    assert!(calls.remove(base_inspect).unwrap_or(0) <= HITS, "{calls:?}");
    assert!(
        calls.is_empty(),
        "engine calls besides the inspects: {calls:?}"
    );
    assert_eq!(
        proxy.accepted_connections(),
        connections,
        "hits opened engine connections"
    );
    docker(&["rmi", "-f", "--no-prune", &tag]);
    daemon.stop().await;
}
