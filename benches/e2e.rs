//! End-to-end benchmarks against the real daemon binary (over its socket) and the real
//! private engine of `scripts/test-env.sh`. One JSON line of figures per scenario.
//!
//! `cargo bench --bench e2e -- <scenario> [--json]`; scenarios: warm_hit, dedup, fanout,
//! layer_repeat, layer_touch, layer_delete, layer_add, multi_layer, shared_prefix, delta_chain,
//! cold_vs_docker, rss_1g, base_check, base_changed, fleet, keep_warm (or `all`); soak (10 minutes, or
//! `--soak-secs=N` / `LAMBDA_IMAGED_SOAK_SECS`; never part of `all`).
//!
//! Each line holds the scenario's correctness figures (engine builds, completed streams, files
//! re-hashed, the image's file contents, ...), its speed figures, and `failures`: every
//! correctness figure that was wrong. Any failure makes the bench exit 1 once all scenarios
//! ran; speed targets (`target_*`, printed next to the figure they bound, from the table of
//! issue 13) are informational and never fail it.
//!
//! "Bytes sent" is the last `ContextProgress.bytes_sent` of a build's stream: the whole image
//! archive the daemon streamed into the engine's loader (manifest, config and the layer tars
//! it did not reference as already held).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lambda_imaged::client::{Client, LayerArg, RequestBuilder, proto};
use proto::build_event::Event;

// The integration tests' helpers (engine events, unique names) serve the benchmarks too.
#[path = "../tests/support/mod.rs"]
mod support;

use support::daemon::Daemon;
use support::registry::registry;

use serde_json::{Value, json};
use support::{docker_ok, engine_builds_of, now_stamp, run_in_image, unique};

const SCENARIOS: &[&str] = &[
    "warm_hit",
    "dedup",
    "fanout",
    "layer_repeat",
    "layer_touch",
    "layer_delete",
    "layer_add",
    "multi_layer",
    "shared_prefix",
    "shared_prefix_edited",
    "delta_chain",
    "cold_vs_docker",
    "rss_1g",
    "base_check",
    "base_changed",
    "fleet",
    "keep_warm",
];

/// Scenarios run only when named.
const ON_DEMAND: &[&str] = &["soak"];

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let json_only = std::env::args().any(|a| a == "--json");
    let wanted: Vec<&str> = match args.first().map(String::as_str) {
        None | Some("all") => SCENARIOS.to_vec(),
        Some(name) if SCENARIOS.contains(&name) || ON_DEMAND.contains(&name) => vec![name],
        Some(name) => {
            eprintln!(
                "unknown scenario {name:?}; one of: {}, all",
                SCENARIOS.join(", ")
            );
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut wrong = Vec::new();
    for name in wanted {
        let mut checks = Checks::default();
        let mut figures = runtime.block_on(run(name, &mut checks));
        if !json_only {
            eprintln!("{name}:");
        }
        figures["failures"] = json!(checks.failures);
        println!("{figures}");
        wrong.extend(checks.failures.iter().map(|f| format!("{name}: {f}")));
    }
    if !wrong.is_empty() {
        for failure in &wrong {
            eprintln!("FAILED {failure}");
        }
        std::process::exit(1);
    }
}

/// A scenario's correctness checks; a wrong figure is recorded, and fails the run at the end
/// (after the figures are printed, so a wrong run still shows what it measured).
#[derive(Default)]
struct Checks {
    failures: Vec<String>,
}

impl Checks {
    /// Records a failure when `actual` is not `expected`; returns `actual` for the figures.
    fn equal<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, actual: T, expected: T) -> T {
        if actual != expected {
            self.failures
                .push(format!("{what} is {actual:?}, expected {expected:?}"));
        }
        actual
    }

    /// Records a failure when `actual` exceeds `limit`; returns `actual` for the figures.
    fn at_most<T: PartialOrd + std::fmt::Debug>(&mut self, what: &str, actual: T, limit: T) -> T {
        if actual > limit {
            self.failures
                .push(format!("{what} is {actual:?}, more than {limit:?}"));
        }
        actual
    }

    /// The bytes `built` sent to the engine; a rebuild whose stream carried no ContextProgress
    /// is recorded as a failure (the load path reports one before every Completed it loads).
    fn bytes_sent(&mut self, what: &str, built: &Built) -> u64 {
        match built.bytes_sent() {
            Some(bytes) => bytes,
            None => {
                self.failures.push(format!(
                    "{what}: no ContextProgress event in the build's stream"
                ));
                0
            }
        }
    }
}

async fn run(name: &str, checks: &mut Checks) -> Value {
    match name {
        "warm_hit" => warm_hit(checks).await,
        "dedup" => dedup(checks).await,
        "fanout" => fanout(checks).await,
        "layer_repeat" => layer_repeat(checks).await,
        "layer_touch" => layer_edit(checks, Edit::Touch).await,
        "layer_delete" => layer_edit(checks, Edit::Delete).await,
        "layer_add" => layer_edit(checks, Edit::Add).await,
        "multi_layer" => multi_layer(checks).await,
        "shared_prefix" => shared_prefix(checks, 0).await,
        "shared_prefix_edited" => shared_prefix(checks, 3).await,
        "delta_chain" => delta_chain(checks).await,
        "cold_vs_docker" => cold_vs_docker(checks).await,
        "rss_1g" => rss_1g(checks).await,
        "base_check" => base_check(checks).await,
        "base_changed" => base_changed(checks).await,
        "keep_warm" => keep_warm(checks).await,
        "soak" => soak(checks).await,
        "fleet" => fleet(checks).await,
        _ => unreachable!("checked in main"),
    }
}

/// The daemon binary on the test engine, logging warnings only, with `extra` flags.
async fn daemon_with(extra: &[&str]) -> Daemon {
    Daemon::builder()
        .env("RUST_LOG", "warn")
        .args(extra)
        .start()
        .await
}

/// A ZIP python3.12 request with one layer, never pulling.
fn request(name: &str, path: &Path) -> proto::BuildRequest {
    RequestBuilder::zip("python3.12")
        .skip_pull_image(true)
        .layer(LayerArg::new(name, path))
        .finish()
        .expect("the working directory exists")
}

/// Runs one Build to Completed on `client`; panics with the status on failure.
async fn build_on(client: &mut Client, request: proto::BuildRequest) -> proto::Completed {
    match client.build_with(request, |_| {}).await {
        Ok(done) => done,
        Err(status) => panic!("build failed: {:?}: {}", status.code(), status.message()),
    }
}

/// Runs one Build to Completed on a connection of its own.
async fn build(socket: &Path, request: proto::BuildRequest) -> proto::Completed {
    build_on(&mut Client::connect(socket).await.unwrap(), request).await
}

/// One Build run to Completed, with every event of its stream and its wall time.
struct Built {
    done: proto::Completed,
    events: Vec<proto::BuildEvent>,
    ms: f64,
}

impl Built {
    /// The last `ContextProgress.bytes_sent` of the stream: the archive bytes the engine was
    /// sent. None when the stream had no ContextProgress (nothing was loaded).
    fn bytes_sent(&self) -> Option<u64> {
        self.events.iter().rev().find_map(|e| match &e.event {
            Some(Event::ContextProgress(progress)) => Some(progress.bytes_sent),
            _ => None,
        })
    }

    /// The status lines "layer i/n <label>: reused|sending", one per layer of the image above
    /// its base.
    fn layer_lines(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match &e.event {
                Some(Event::Log(log))
                    if log.kind == proto::LogKind::Status as i32
                        && log.text.starts_with("layer ")
                        && (log.text.ends_with(": reused") || log.text.ends_with(": sending")) =>
                {
                    Some(log.text.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// True when the line for the layer labelled `label` says it was reused (not sent).
    fn reused(&self, label: &str) -> bool {
        let line = format!(" {label}: reused");
        self.layer_lines().iter().any(|l| l.ends_with(&line))
    }

    /// True when the image was a delta over the previous one (a "delta i/n over" layer was sent).
    fn is_delta(&self) -> bool {
        self.layer_lines()
            .iter()
            .any(|l| l.contains(" delta ") && l.contains(" over ") && l.ends_with(": sending"))
    }

    fn reason(&self) -> &'static str {
        proto::reason_name(self.done.reason)
    }
}

/// Runs one Build to Completed on a connection of its own, keeping its events; the time
/// includes connecting (what a client pays). Panics with the status on failure.
async fn build_events(socket: &Path, request: proto::BuildRequest) -> Built {
    let started = Instant::now();
    let outcome = Client::connect(socket).await.unwrap().build(request).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match outcome.result {
        Ok(done) => Built {
            done,
            events: outcome.events,
            ms,
        },
        Err(status) => panic!("build failed: {:?}: {}", status.code(), status.message()),
    }
}

/// Pseudo-random bytes (xorshift64): fast, good enough to defeat compression and dedup.
struct Noise(u64);

impl Noise {
    /// Seeded from the clock, so every run writes content the engine never saw.
    fn new() -> Noise {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Noise(nanos | 1)
    }

    fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// A layer of `files` files totalling about `bytes` (`pkgNNN/fileNNNNN.bin`, 100 a
/// directory), pseudo-random (incompressible, unique).
fn make_layer(path: &Path, files: usize, bytes: usize) {
    let mut noise = Noise::new();
    let mut buffer = vec![0u8; bytes / files];
    for index in 0..files {
        let dir = path.join(format!("pkg{:03}", index / 100));
        std::fs::create_dir_all(&dir).unwrap();
        noise.fill(&mut buffer);
        std::fs::write(dir.join(format!("file{index:05}.bin")), &buffer).unwrap();
    }
}

/// The size of one file of a [`make_layer`] layer of 200 MiB in 4,000 files: 52,428 bytes.
const BIG_FILE_BYTES: usize = (200 << 20) / 4000;

/// Writes `bytes` bytes of new pseudo-random content to `path` (replacing it when it exists).
fn write_random(path: &Path, bytes: usize) {
    let mut buffer = vec![0u8; bytes];
    Noise::new().fill(&mut buffer);
    std::fs::write(path, &buffer).unwrap();
}

/// The sha256 (hex) of a host file.
fn host_sha256(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// The sha256 (hex) of `path` inside `image` (its `sha256sum`), or "absent" when the image has
/// no such file.
fn image_sha256(image: &str, path: &str) -> String {
    let out = run_in_image(
        image,
        &format!("if [ -e {path} ]; then sha256sum {path}; else echo absent; fi"),
    );
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// How many layers the engine lists for `image` (`RootFS.Layers`).
fn layer_count(image: &str) -> usize {
    let out = docker_ok(&["image", "inspect", "-f", "{{len .RootFS.Layers}}", image]);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("layer count of {image}: {out:?}"))
}

/// The base image of every bench request (python3.12 on x86_64, as SAM resolves it).
const BASE_IMAGE: &str = "public.ecr.aws/lambda/python:3.12-x86_64";

/// A daemon that built a 200 MB / 4,000-file layer (reason missing), with the stat cache
/// settled: the state a rebuild after an edit starts from.
struct BigLayer {
    daemon: Daemon,
    layer: PathBuf,
    name: String,
    request: proto::BuildRequest,
    tag: String,
}

impl BigLayer {
    async fn prepare(prefix: &str) -> BigLayer {
        Self::prepare_with(prefix, &[]).await
    }

    /// [`BigLayer::prepare`] on a daemon started with `extra` flags.
    async fn prepare_with(prefix: &str, extra: &[&str]) -> BigLayer {
        let daemon = daemon_with(extra).await;
        let layer = daemon.dir().join("big");
        make_layer(&layer, 4000, 200 << 20);
        let name = unique(prefix);
        let request = request(&name, &layer);
        let first = build(daemon.socket(), request.clone()).await;
        // Let the layer's files age past the stat cache's racy window (git's rule): a wait for
        // a file-time property, not synchronisation.
        tokio::time::sleep(Duration::from_secs(3)).await;
        build(daemon.socket(), request.clone()).await; // settle the stat cache
        BigLayer {
            daemon,
            layer,
            name,
            request,
            tag: first.tag,
        }
    }
}

fn small_layer(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::write(path.join("message.txt"), unique("bench")).unwrap();
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn rmi(tags: &[String]) {
    for tag in tags {
        let _ = Command::new("docker")
            .args(["rmi", "-f", "--no-prune", tag])
            .output();
    }
}

/// 2,000 sequential requests for an up-to-date image on one connection: every one is
/// answered cached, with no engine build. Each is followed by one raw engine inspect of the
/// same image over the same engine socket (a bollard client made as the daemon makes its own),
/// so both see the same machine load: the hit confirms its tag with one such inspect, and the
/// ratio of the two p50s is what the rest of a hit costs (target at most 2). For scale, a third
/// figure: the same inspect over bollard's own `connect_with_host`, a new connection per call.
async fn warm_hit(checks: &mut Checks) -> Value {
    let daemon = daemon_with(&[]).await;
    let layer = daemon.dir().join("layer");
    small_layer(&layer);
    let req = request(&unique("warm"), &layer);
    let mut client = daemon.client().await;
    let first = build_on(&mut client, req.clone()).await;
    let engine = raw_engine().await;
    let unpooled = bollard::Docker::connect_with_host(&support::engine_host()).unwrap();
    let unpooled = unpooled.negotiate_version().await.unwrap();
    let since = now_stamp();
    let mut cached = 0;
    let mut raw_ids = std::collections::BTreeSet::new();
    for _ in 0..100 {
        cached += usize::from(build_on(&mut client, req.clone()).await.cached); // warm up
        raw_ids.insert(raw_inspect(&engine, &first.tag).await.0);
    }
    let (mut samples, mut raw) = (Vec::with_capacity(2000), Vec::with_capacity(2000));
    let mut new_connection = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let started = Instant::now();
        let done = build_on(&mut client, req.clone()).await;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
        cached += usize::from(done.cached);
        let (id, us) = raw_inspect(&engine, &first.tag).await;
        raw.push(us);
        raw_ids.insert(id);
        let (id, us) = raw_inspect(&unpooled, &first.tag).await;
        new_connection.push(us);
        raw_ids.insert(id);
    }
    for sorted in [&mut samples, &mut raw, &mut new_connection] {
        sorted.sort_by(f64::total_cmp);
    }
    let builds = engine_builds_of(std::slice::from_ref(&first.tag), &since);
    rmi(&[first.tag]);
    let (p50, raw_p50) = (percentile(&samples, 0.5), percentile(&raw, 0.5));
    let raw_ids: Vec<String> = raw_ids.into_iter().collect();
    json!({
        "scenario": "warm_hit", "requests": samples.len(),
        "cached": checks.equal("cached answers", cached, 2100),
        "engine_builds": checks.equal("engine builds after the first", builds, 0),
        "raw_inspect_ids": checks.equal("image IDs the raw inspects saw", raw_ids, vec![first.image_id]),
        "p50_us": p50.round(), "p99_us": percentile(&samples, 0.99).round(),
        "max_us": samples.last().copied().unwrap_or(0.0).round(),
        "raw_inspect_p50_us": raw_p50.round(), "raw_inspect_p99_us": percentile(&raw, 0.99).round(),
        "ratio_p50": (p50 / raw_p50 * 100.0).round() / 100.0,
        "raw_inspect_new_connection_p50_us": percentile(&new_connection, 0.5).round(),
        "target_ratio_p50": 2, "target_p50_us": 300, "target_p99_us": 1000,
    })
}

/// A bollard client for the engine at `$DOCKER_HOST` (a `unix://` socket), made as the daemon
/// makes its own (`lambda_imaged::unix_client`, API version negotiated).
async fn raw_engine() -> bollard::Docker {
    let host = support::engine_host();
    let path = host
        .strip_prefix("unix://")
        .expect("warm_hit needs a unix:// engine");
    let engine = lambda_imaged::unix_client(Path::new(path), 60).unwrap();
    engine.negotiate_version().await.unwrap()
}

/// One engine inspect of `image`: the image ID it answered and how long it took (µs).
async fn raw_inspect(engine: &bollard::Docker, image: &str) -> (String, f64) {
    let started = Instant::now();
    let inspected = engine.inspect_image(image).await.unwrap();
    let us = started.elapsed().as_secs_f64() * 1e6;
    (inspected.id.unwrap_or_default(), us)
}

/// 64 concurrent identical requests for a new tag: one engine build, one image for all, in
/// about the time of one build alone.
async fn dedup(checks: &mut Checks) -> Value {
    let daemon = daemon_with(&[]).await;
    let (one, two) = (daemon.dir().join("one"), daemon.dir().join("two"));
    make_layer(&one, 200, 20 << 20);
    make_layer(&two, 200, 20 << 20);
    let single_started = Instant::now();
    let single = build(daemon.socket(), request(&unique("single"), &one)).await;
    let single_ms = single_started.elapsed().as_secs_f64() * 1000.0;

    let req = request(&unique("dedup"), &two);
    let since = now_stamp();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (socket, req) = (daemon.socket().to_owned(), req.clone());
        tasks.push(tokio::spawn(async move { build(&socket, req).await }));
    }
    let mut ids = Vec::new();
    let mut tags = Vec::new();
    for task in tasks {
        let done = task.await.unwrap();
        ids.push(done.image_id);
        tags.push(done.tag);
    }
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    let completed = ids.len();
    ids.sort();
    ids.dedup();
    tags.sort();
    tags.dedup();
    let builds = engine_builds_of(&tags, &since);
    tags.push(single.tag);
    rmi(&tags);
    json!({
        "scenario": "dedup", "clients": 64,
        "completed": checks.equal("completed streams", completed, 64),
        "engine_builds": checks.equal("engine builds", builds, 1),
        "distinct_image_ids": checks.equal("distinct image ids", ids.len(), 1),
        "wall_ms": wall_ms.round(), "single_wall_ms": single_ms.round(),
        "ratio": (wall_ms / single_ms * 100.0).round() / 100.0,
        "target_ratio": 1.1,
    })
}

/// 200 concurrent streams over 20 new tags: 20 engine builds, every stream completed.
async fn fanout(checks: &mut Checks) -> Value {
    let daemon = daemon_with(&[]).await;
    let mut requests = Vec::new();
    for index in 0..20 {
        let path = daemon.dir().join(format!("l{index}"));
        small_layer(&path);
        requests.push(request(&unique("fan"), &path));
    }
    let since = now_stamp();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client_index in 0..200 {
        let (socket, req) = (
            daemon.socket().to_owned(),
            requests[client_index % 20].clone(),
        );
        tasks.push(tokio::spawn(async move { build(&socket, req).await }));
    }
    let mut tags = Vec::new();
    for task in tasks {
        tags.push(task.await.unwrap().tag);
    }
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    let completed = tags.len();
    tags.sort();
    tags.dedup();
    let builds = engine_builds_of(&tags, &since);
    let peak = daemon.peak_rss();
    rmi(&tags);
    json!({
        "scenario": "fanout", "clients": 200,
        "tags": checks.equal("distinct tags", tags.len(), 20),
        "completed": checks.equal("completed streams", completed, 200),
        "engine_builds": checks.equal("engine builds", builds, 20),
        "wall_ms": wall_ms.round(), "daemon_peak_rss_mib": peak / (1 << 20),
    })
}

/// A 200 MB / 4,000-file layer requested again unchanged: answered cached without re-hashing
/// a file.
async fn layer_repeat(checks: &mut Checks) -> Value {
    let daemon = daemon_with(&[]).await;
    let layer = daemon.dir().join("big");
    make_layer(&layer, 4000, 200 << 20);
    let req = request(&unique("big"), &layer);
    let started = Instant::now();
    let first = build(daemon.socket(), req.clone()).await;
    let first_ms = started.elapsed().as_secs_f64() * 1000.0;
    // Let the layer's files age past the stat cache's racy window (git's rule): a wait for a
    // file-time property, not synchronisation.
    tokio::time::sleep(Duration::from_secs(3)).await;
    build(daemon.socket(), req.clone()).await;
    let before = daemon.stats().await;
    let mut samples = Vec::new();
    let mut cached = 0;
    for _ in 0..20 {
        let started = Instant::now();
        let done = build(daemon.socket(), req.clone()).await;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        cached += usize::from(done.cached);
    }
    let after = daemon.stats().await;
    samples.sort_by(f64::total_cmp);
    rmi(&[first.tag]);
    json!({
        "scenario": "layer_repeat", "layer_mib": 200, "layer_files": 4000,
        "cached": checks.equal("cached repeats", cached, 20),
        "files_rehashed": checks.equal("files re-hashed by the repeats", after.files_hashed - before.files_hashed, 0),
        "first_ms": first_ms.round(), "repeat_p50_ms": (percentile(&samples, 0.5) * 10.0).round() / 10.0,
        "repeat_max_ms": (samples.last().copied().unwrap_or(0.0) * 10.0).round() / 10.0,
        "target_repeat_p50_ms": 40,
    })
}

/// Which one-file edit [`layer_edit`] makes to the 200 MB layer.
#[derive(Clone, Copy)]
enum Edit {
    /// One 52 KB file gets new content of the same size.
    Touch,
    /// One 52 KB file is removed.
    Delete,
    /// A new 52 KB file appears.
    Add,
}

/// One file of the 200 MB / 4,000-file layer changed, removed or added: the rebuild says
/// `layer_changed` naming the layer, re-hashes only what changed, is a delta that sends about
/// the file's size, and the image holds the new tree (the file's content checked in the image
/// against the host file, or its absence).
async fn layer_edit(checks: &mut Checks, edit: Edit) -> Value {
    let scenario = match edit {
        Edit::Touch => "layer_touch",
        Edit::Delete => "layer_delete",
        Edit::Add => "layer_add",
    };
    let big = BigLayer::prepare("edit").await;
    let relative = match edit {
        Edit::Touch | Edit::Delete => "pkg000/file00000.bin",
        Edit::Add => "pkg000/added.bin",
    };
    let host_file = big.layer.join(relative);
    let before = big.daemon.stats().await;
    match edit {
        Edit::Touch | Edit::Add => write_random(&host_file, BIG_FILE_BYTES),
        Edit::Delete => std::fs::remove_file(&host_file).unwrap(),
    }
    let built = build_events(big.daemon.socket(), big.request.clone()).await;
    let after = big.daemon.stats().await;
    let sent = checks.bytes_sent("the rebuild", &built);
    let in_image = image_sha256(&built.done.tag, &format!("/opt/{relative}"));
    let expected = match edit {
        Edit::Touch | Edit::Add => host_sha256(&host_file),
        Edit::Delete => "absent".to_owned(),
    };
    let rehashed_expected = match edit {
        Edit::Touch | Edit::Add => 1,
        Edit::Delete => 0,
    };
    let delta = built.is_delta();
    rmi(&[big.tag]);
    json!({
        "scenario": scenario, "layer_mib": 200, "layer_files": 4000,
        "file": relative, "file_bytes": BIG_FILE_BYTES,
        "rebuild_ms": built.ms.round(), "target_rebuild_ms": 300,
        "bytes_sent": sent, "target_bytes_sent": 1 << 20,
        "delta": delta,
        "reason": checks.equal("reason", built.reason(), "layer_changed"),
        "changed_layer": checks.equal("changed layer", built.done.changed_layer.clone(), big.name),
        "files_rehashed": checks.equal("files re-hashed", after.files_hashed - before.files_hashed, rehashed_expected),
        "bytes_rehashed": after.bytes_hashed - before.bytes_hashed,
        "image_file": checks.equal("the file in the image (sha256, or absent)", in_image, expected),
        "layers": built.layer_lines(),
    })
}

/// Two Lambda layers, a 200 MB / 4,000-file dependencies layer and a 1 MB / 100-file code
/// layer (under `/opt/app`); five code files changed: the rebuild names the code layer,
/// re-hashes the five files, reuses the dependencies layer and holds the new contents.
async fn multi_layer(checks: &mut Checks) -> Value {
    let daemon = daemon_with(&[]).await;
    let (deps, code) = (daemon.dir().join("deps"), daemon.dir().join("code"));
    make_layer(&deps, 4000, 200 << 20);
    make_layer(&code.join("app"), 100, 1 << 20);
    let (deps_name, code_name) = (unique("deps"), unique("code"));
    let req = RequestBuilder::zip("python3.12")
        .skip_pull_image(true)
        .layer(LayerArg::new(&deps_name, &deps))
        .layer(LayerArg::new(&code_name, &code))
        .finish()
        .expect("the working directory exists");
    let first = build(daemon.socket(), req.clone()).await;
    // Past the stat cache's racy window, as in layer_repeat.
    tokio::time::sleep(Duration::from_secs(3)).await;
    build(daemon.socket(), req.clone()).await; // settle the stat cache
    let before = daemon.stats().await;
    let changed: Vec<String> = (0..5)
        .map(|i| format!("app/pkg000/file{i:05}.bin"))
        .collect();
    for relative in &changed {
        write_random(&code.join(relative), (1 << 20) / 100);
    }
    let built = build_events(daemon.socket(), req).await;
    let after = daemon.stats().await;
    let sent = checks.bytes_sent("the rebuild", &built);
    let mut contents_match = 0;
    for relative in &changed {
        let in_image = image_sha256(&built.done.tag, &format!("/opt/{relative}"));
        contents_match += usize::from(in_image == host_sha256(&code.join(relative)));
    }
    let deps_reused = built.reused(&format!("layer {deps_name:?}"));
    rmi(&[first.tag]);
    json!({
        "scenario": "multi_layer", "deps_mib": 200, "deps_files": 4000, "code_mib": 1, "code_files": 100,
        "files_changed": changed.len(),
        "rebuild_ms": built.ms.round(), "target_rebuild_ms": 300,
        "bytes_sent": sent, "target_bytes_sent": 2 << 20,
        "delta": built.is_delta(),
        "reason": checks.equal("reason", built.reason(), "layer_changed"),
        "changed_layer": checks.equal("changed layer", built.done.changed_layer.clone(), code_name),
        "files_rehashed": checks.equal("files re-hashed", after.files_hashed - before.files_hashed, 5),
        "deps_reused": checks.equal("the dependencies layer reused (status line)", deps_reused, true),
        "image_files_matching": checks.equal("changed files whose content in the image is the host's", contents_match, changed.len()),
        "layers": built.layer_lines(),
    })
}

/// Bytes the engine's data directory holds (`du -sb`), for a growth figure that shows the
/// whole engine (noisy: other users of the shared test engine write there too).
fn data_dir_bytes() -> u64 {
    let dir = PathBuf::from(std::env::var("LAMBDA_IMAGED_TEST_DIR").unwrap()).join("data");
    let out = Command::new("du").arg("-sb").arg(&dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("du -sb {}: {:?}", dir.display(), out))
}

/// The bytes of `image_id`'s layers that no other image holds (`Size - SharedSize` of the
/// engine's `GET /system/df`, what `docker system df -v` prints as UNIQUE SIZE): the disk an
/// image's build added, unaffected by what other users of the engine do meanwhile. Asked with
/// curl over the engine's socket: the CLI cannot print `-v` as JSON on Docker 20.10, and
/// bollard's types follow a newer API whose answer has another shape.
fn unique_size(image_id: &str) -> u64 {
    let host = std::env::var("DOCKER_HOST").unwrap();
    let socket = host
        .strip_prefix("unix://")
        .unwrap_or_else(|| panic!("DOCKER_HOST {host} is not a unix:// socket"));
    let out = Command::new("curl")
        .args(["-sSf", "--unix-socket", socket, "http://engine/system/df"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "GET /system/df: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let usage: Value = serde_json::from_slice(&out.stdout).unwrap();
    let image = usage["Images"]
        .as_array()
        .and_then(|images| images.iter().find(|i| i["Id"] == image_id))
        .unwrap_or_else(|| panic!("{image_id} is not in the engine's /system/df"));
    let (size, shared) = (image["Size"].as_u64(), image["SharedSize"].as_u64());
    match (size, shared) {
        (Some(size), Some(shared)) => size.saturating_sub(shared),
        _ => panic!("no Size / SharedSize for {image_id} in /system/df: {image}"),
    }
}

/// A second function of the same runtime whose layer list starts with the same 200 MB layer
/// as the first's and differs after it (its own 1 MB layer, another name, so another SAM
/// tag): the shared layer is referenced, not sent, its files are not hashed again, and the
/// engine stores only the small one.
/// Two functions whose layer lists start with the same 200 MB layer: the second one's first
/// build, after `edits` one-file edits of that layer (each rebuilt for the first function, whose
/// image is then a delta chain), sends only its own layer (issue 24: a shared prefix survives
/// edits).
async fn shared_prefix(checks: &mut Checks, edits: usize) -> Value {
    let daemon = daemon_with(&[]).await;
    let deps = daemon.dir().join("deps");
    let (code_a, code_b) = (daemon.dir().join("a"), daemon.dir().join("b"));
    make_layer(&deps, 4000, 200 << 20);
    make_layer(&code_a.join("app"), 100, 1 << 20);
    make_layer(&code_b.join("app"), 100, 1 << 20);
    let deps_name = unique("deps");
    let function = |code_name: String, code: &Path| {
        RequestBuilder::zip("python3.12")
            .skip_pull_image(true)
            .layer(LayerArg::new(&deps_name, &deps))
            .layer(LayerArg::new(code_name, code))
            .finish()
            .expect("the working directory exists")
    };
    // The layers were written long before in real use: let them age past the stat cache's
    // racy window (a wait for a file-time property, not synchronisation), so the first build
    // remembers their hashes and the second hashes only its own layer.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let code_a_name = unique("code-a");
    let mut first = build(daemon.socket(), function(code_a_name.clone(), &code_a)).await;
    for edit in 0..edits {
        write_random(
            &deps.join(format!("pkg000/file{edit:05}.bin")),
            BIG_FILE_BYTES,
        );
        // Past the stat cache's racy window again (as above), so the second function's build
        // hashes only its own layer.
        tokio::time::sleep(Duration::from_secs(3)).await;
        first = build(daemon.socket(), function(code_a_name.clone(), &code_a)).await;
    }
    let before = daemon.stats().await;
    // Engine disk use is measured two ways. The checked-against-target figure is the second
    // image's unique size from the engine's own accounting (`/system/df`: its layers that no
    // other image holds), because the test engine is shared and other helpers' images come
    // and go in its data directory meanwhile; `du -sb` of that directory is printed too, as
    // the literal (noisy) growth.
    let du_before = data_dir_bytes();
    let built = build_events(daemon.socket(), function(unique("code-b"), &code_b)).await;
    let du_after = data_dir_bytes();
    let after = daemon.stats().await;
    let sent = checks.bytes_sent("the second build", &built);
    let unique_bytes = unique_size(&built.done.image_id);
    let deps_reused = built.reused(&format!("layer {deps_name:?}"));
    let distinct = built.done.tag != first.tag;
    rmi(&[first.tag, built.done.tag.clone()]);
    json!({
        "scenario": if edits == 0 { "shared_prefix" } else { "shared_prefix_edited" },
        "shared_mib": 200, "shared_files": 4000, "own_mib": 1, "edits_first": edits,
        "build_ms": built.ms.round(), "target_build_ms": 500,
        "bytes_sent": sent, "target_bytes_sent": 2 << 20,
        "engine_disk_growth_bytes": unique_bytes, "target_engine_disk_growth_bytes": 2 << 20,
        "data_dir_growth_bytes": i128::from(du_after) - i128::from(du_before),
        "reason": checks.equal("reason", built.reason(), "missing"),
        "distinct_tags": checks.equal("the two functions have distinct tags", distinct, true),
        "shared_layer_reused": checks.equal("the shared 200 MB layer reused (status line)", deps_reused, true),
        "files_hashed": checks.equal("files hashed by the second build (its own layer's 100)", after.files_hashed - before.files_hashed, 100),
        "layers": built.layer_lines(),
    })
}

/// Successive one-file edits in `delta_chain`.
const CHAIN_EDITS: usize = 20;

/// Deltas the daemon stacks before it writes a full layer again (`MAX_DELTA_DEPTH`).
const MAX_DELTAS: usize = 8;

/// 20 successive one-file edits of the 200 MB layer, building after each: every build is
/// `layer_changed`, and the image never holds more than base + RIE + layer + 8 delta layers
/// (the daemon writes a full layer once the chain is 8 deltas deep).
async fn delta_chain(checks: &mut Checks) -> Value {
    let big = BigLayer::prepare("chain").await;
    let base_layers = layer_count(BASE_IMAGE);
    let mut samples = Vec::new();
    let mut layer_counts = Vec::new();
    let mut sent = Vec::new();
    let mut changed = 0;
    let mut full = 0;
    for edit in 0..CHAIN_EDITS {
        write_random(
            &big.layer.join(format!("pkg001/file{:05}.bin", 100 + edit)),
            BIG_FILE_BYTES,
        );
        let built = build_events(big.daemon.socket(), big.request.clone()).await;
        samples.push(built.ms);
        sent.push(checks.bytes_sent(&format!("build {}", edit + 1), &built));
        changed += usize::from(built.reason() == "layer_changed");
        full += usize::from(!built.is_delta());
        layer_counts.push(layer_count(&built.done.tag));
    }
    let max_layers = layer_counts.iter().copied().max().unwrap_or(0);
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    rmi(&[big.tag]);
    json!({
        "scenario": "delta_chain", "layer_mib": 200, "layer_files": 4000, "edits": CHAIN_EDITS,
        "p50_ms": percentile(&sorted, 0.5).round(), "max_ms": sorted.last().copied().unwrap_or(0.0).round(),
        "target_max_ms": 300,
        "build_ms": samples.iter().map(|ms| ms.round()).collect::<Vec<_>>(),
        "bytes_sent": sent, "full_assemblies": full,
        "layer_counts": layer_counts, "base_layers": base_layers,
        "layer_changed": checks.equal("builds with reason layer_changed", changed, CHAIN_EDITS),
        "max_layers": checks.at_most("layers of an image in the chain", max_layers, base_layers + 2 + MAX_DELTAS),
    })
}

/// How many times `cold_vs_docker` builds each way; the order alternates between repetitions
/// so neither side always runs on a cache the other warmed.
const COLD_REPETITIONS: usize = 2;

/// A cold assembly of 200 MB of never-seen content by the daemon vs `docker build --no-cache`
/// (classic builder) of the same files, alternating which goes first. The daemon's layer is
/// the build context's `opt/` directory itself, so both read the very same files.
async fn cold_vs_docker(checks: &mut Checks) -> Value {
    let daemon = daemon_with(&[]).await;
    let rie = PathBuf::from(std::env::var("LAMBDA_IMAGED_RIE_DIR").unwrap())
        .join("aws-lambda-rie-x86_64");
    let mut runs = Vec::new();
    let mut fresh = 0;
    for repetition in 0..COLD_REPETITIONS {
        // Fresh, never-seen content for each repetition, so neither hits the engine's cache.
        let base = daemon.dir().join(format!("rep{repetition}"));
        let context = base.join("ctx");
        let opt = context.join("opt");
        make_layer(&opt, 4000, 200 << 20);
        std::fs::copy(&rie, context.join("aws-lambda-rie")).unwrap();
        std::fs::write(
            context.join("Dockerfile"),
            format!(
                "FROM {BASE_IMAGE}\nCOPY aws-lambda-rie /var/rapid/aws-lambda-rie\nCOPY opt/ /opt/\nLABEL io.lambda-imaged.bench=1\n"
            ),
        )
        .unwrap();
        // Read once before, so the page cache holds the files for whichever goes first.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "find {} -type f -exec cat {{}} + > /dev/null",
                context.display()
            ))
            .status();
        let docker_first = repetition % 2 == 0;
        let (mut docker_ms, mut daemon_ms) = (0.0, 0.0);
        let tag = unique("bench/docker:");
        let mut done = None;
        for turn in 0..2 {
            if (turn == 0) == docker_first {
                let started = Instant::now();
                let out = Command::new("docker")
                    .args(["build", "--no-cache", "-q", "-t", &tag])
                    .arg(&context)
                    .env("DOCKER_BUILDKIT", "0")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                docker_ms = started.elapsed().as_secs_f64() * 1000.0;
            } else {
                let started = Instant::now();
                done = Some(build(daemon.socket(), request(&unique("cold"), &opt)).await);
                daemon_ms = started.elapsed().as_secs_f64() * 1000.0;
            }
        }
        let done = done.expect("the daemon's turn ran");
        fresh += usize::from(!done.cached && proto::reason_name(done.reason) == "missing");
        rmi(&[tag, done.tag]);
        std::fs::remove_dir_all(&base).unwrap();
        runs.push(json!({
            "first": if docker_first { "docker" } else { "daemon" },
            "daemon_ms": daemon_ms.round(), "docker_build_ms": docker_ms.round(),
            "ratio": (daemon_ms / docker_ms * 100.0).round() / 100.0,
        }));
    }
    let ratios: Vec<f64> = runs.iter().filter_map(|r| r["ratio"].as_f64()).collect();
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    json!({
        "scenario": "cold_vs_docker", "layer_mib": 200, "layer_files": 4000,
        "cold_builds": checks.equal("daemon builds that were cold (not cached, reason missing)", fresh, COLD_REPETITIONS),
        "runs": runs, "ratio": (mean * 100.0).round() / 100.0, "target_ratio": 0.8,
    })
}

/// The daemon's peak RSS while it builds a 1 GiB layer (read from /proc; unreadable fails).
async fn rss_1g(checks: &mut Checks) -> Value {
    let daemon = daemon_with(&[]).await;
    let layer = daemon.dir().join("huge");
    make_layer(&layer, 64, 1 << 30);
    let baseline = daemon.peak_rss();
    let started = Instant::now();
    let done = build(daemon.socket(), request(&unique("huge"), &layer)).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let peak = daemon.peak_rss();
    rmi(&[done.tag]);
    json!({
        "scenario": "rss_1g", "layer_mib": 1024, "build_ms": ms.round(),
        "built": checks.equal("built (not cached)", !done.cached, true),
        "daemon_peak_rss_mib": (peak as f64 / (1 << 20) as f64 * 10.0).round() / 10.0,
        "daemon_rss_before_mib": (baseline as f64 / (1 << 20) as f64 * 10.0).round() / 10.0,
        "target_daemon_peak_rss_mib": 64,
    })
}

/// Pushes a python3.12 base to `<registry>/<repo>/python:3.12-x86_64`: the stand-in base, plus
/// `/marker` holding `marker` when given (a new base under the same tag). The local name is
/// removed again, so only the daemon's pull brings it back.
fn push_base(repo: &str, marker: Option<&str>) {
    let name = format!("{}/{repo}/python:3.12-x86_64", registry());
    match marker {
        None => {
            docker_ok(&["tag", BASE_IMAGE, &name]);
        }
        Some(marker) => {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("marker"), marker).unwrap();
            std::fs::write(
                dir.path().join("Dockerfile"),
                format!("FROM {BASE_IMAGE}\nCOPY marker /marker\n"),
            )
            .unwrap();
            let output = Command::new("docker")
                .args(["build", "-q", "-t", &name])
                .arg(dir.path())
                .env("DOCKER_BUILDKIT", "0")
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "docker build: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    docker_ok(&["push", &name]);
    docker_ok(&["rmi", &name]);
}

/// How many `base_unverified` warnings a stream carried.
fn unverified(built: &Built) -> usize {
    built
        .events
        .iter()
        .filter(|e| matches!(&e.event, Some(Event::Warning(w)) if w.code == "base_unverified"))
        .count()
}

/// Warm hits while the base's freshness check is due all the time (`--base-check-ttl 10ms`,
/// the base from the local registry through `--base-image-mirror`), alternating with warm hits
/// that skip the check (`skip_pull_image`, i.e. `warm_hit`) on the same daemon and tag, 1,000
/// each: the checked ones must stay within 10 % of the others (p50). Every answer is cached.
async fn base_check(checks: &mut Checks) -> Value {
    let repo = unique("bench-base");
    push_base(&repo, None);
    let mirror = format!("{}/{repo}", registry());
    let daemon = daemon_with(&["--base-check-ttl", "10ms", "--base-image-mirror", &mirror]).await;
    let layer = daemon.dir().join("layer");
    small_layer(&layer);
    let name = unique("check");
    let unchecked = request(&name, &layer);
    let mut checked = unchecked.clone();
    checked.skip_pull_image = false;
    let first = build_events(daemon.socket(), checked.clone()).await; // pulls the base
    let since = now_stamp();
    let mut client = daemon.client().await;
    let (mut cached, mut warned) = (0, 0);
    let time = |client: &mut Client, request: proto::BuildRequest| {
        let mut client = client.clone();
        async move {
            let started = Instant::now();
            let outcome = client.build(request).await;
            let us = started.elapsed().as_secs_f64() * 1e6;
            let done = outcome.result.expect("build succeeds");
            let built = Built {
                done,
                events: outcome.events,
                ms: us / 1000.0,
            };
            (us, built)
        }
    };
    for _ in 0..100 {
        time(&mut client, checked.clone()).await; // warm up
        time(&mut client, unchecked.clone()).await;
    }
    let (mut with_check, mut without) = (Vec::new(), Vec::new());
    for _ in 0..1000 {
        let (us, built) = time(&mut client, checked.clone()).await;
        with_check.push(us);
        cached += usize::from(built.done.cached);
        warned += unverified(&built);
        let (us, built) = time(&mut client, unchecked.clone()).await;
        without.push(us);
        cached += usize::from(built.done.cached);
    }
    with_check.sort_by(f64::total_cmp);
    without.sort_by(f64::total_cmp);
    let builds = engine_builds_of(std::slice::from_ref(&first.done.tag), &since);
    let base = format!("{mirror}/python:3.12-x86_64");
    drop(daemon);
    rmi(&[first.done.tag.clone(), base]);
    let (p50, p50_warm) = (percentile(&with_check, 0.5), percentile(&without, 0.5));
    json!({
        "scenario": "base_check", "requests": with_check.len() + without.len(),
        "cached": checks.equal("cached answers", cached, 2000),
        "engine_builds": checks.equal("engine builds after the first", builds, 0),
        "base_unverified_warnings": warned,
        "p50_us": p50.round(), "p99_us": percentile(&with_check, 0.99).round(),
        "warm_hit_p50_us": p50_warm.round(), "warm_hit_p99_us": percentile(&without, 0.99).round(),
        "p50_ratio": (p50 / p50_warm * 100.0).round() / 100.0,
        "target_p50_ratio": 1.1,
    })
}

/// A function with a 20 MB / 400-file layer on a base from the local registry
/// (`--base-check-ttl 1s`); a new base is pushed under the same tag, and requests go on until
/// one rebuilds with base_changed: how long that took after the push, the rebuild's own time,
/// and the bytes it sent. The new base's file and the layer's files are in the image.
async fn base_changed(checks: &mut Checks) -> Value {
    let repo = unique("bench-base");
    push_base(&repo, None);
    // The daemon names the registry `localhost:<port>`, so its pulled base is not the
    // `127.0.0.1:<port>` name `push_base` builds, pushes and removes.
    let mirror = format!(
        "{}/{repo}",
        registry().replacen("127.0.0.1:", "localhost:", 1)
    );
    assert!(
        mirror.starts_with("localhost:"),
        "the bench expects the registry on 127.0.0.1: {mirror}"
    );
    let daemon = daemon_with(&["--base-check-ttl", "1s", "--base-image-mirror", &mirror]).await;
    let layer = daemon.dir().join("deps");
    make_layer(&layer, 400, 20 << 20);
    let mut req = request(&unique("changed"), &layer);
    req.skip_pull_image = false;
    let first = build_events(daemon.socket(), req.clone()).await;
    let full_bytes = checks.bytes_sent("first build", &first);
    push_base(&repo, Some("second base"));
    let pushed = Instant::now();
    let deadline = pushed + Duration::from_secs(120);
    let mut requests = 0;
    let mut first_after_push = None;
    let changed = loop {
        let built = build_events(daemon.socket(), req.clone()).await;
        requests += 1;
        // The first request after the TTL is answered from the local base (the check runs
        // in the background); only a later one rebuilds.
        first_after_push.get_or_insert(built.reason());
        if built.reason() != "up_to_date" || Instant::now() > deadline {
            break built;
        }
        // Poll gently: each request is a warm hit while the check and pull run.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let after_push_ms = pushed.elapsed().as_secs_f64() * 1000.0;
    let reason = checks.equal("reason", changed.reason(), "base_changed");
    checks.equal(
        "the first request after the push",
        first_after_push,
        Some("up_to_date"),
    );
    let bytes = checks.bytes_sent("base_changed rebuild", &changed);
    let marker = run_in_image(&changed.done.tag, "cat /marker");
    let sample = layer.join("pkg000/file00000.bin");
    let same_file =
        image_sha256(&changed.done.tag, "/opt/pkg000/file00000.bin") == host_sha256(&sample);
    let base = format!("{mirror}/python:3.12-x86_64");
    drop(daemon);
    rmi(&[changed.done.tag.clone(), base]);
    json!({
        "scenario": "base_changed", "reason": reason,
        "marker": checks.equal("the new base's /marker", marker.as_str(), "second base"),
        "layer_file_intact": checks.equal("a layer file's sha256 in the image", same_file, true),
        "requests_until_rebuild": requests,
        "seconds_after_push": (after_push_ms / 10.0).round() / 100.0,
        "rebuild_ms": changed.ms.round(), "rebuild_bytes_sent": bytes,
        "first_build_bytes_sent": full_bytes,
    })
}

/// How long `soak` runs: `--soak-secs=N`, else `LAMBDA_IMAGED_SOAK_SECS`, else 10 minutes.
fn soak_duration() -> Duration {
    let from_arg = std::env::args().find_map(|a| {
        a.strip_prefix("--soak-secs=")
            .map(|v| v.parse::<u64>().expect("--soak-secs takes whole seconds"))
    });
    let from_env = std::env::var("LAMBDA_IMAGED_SOAK_SECS").ok().map(|v| {
        v.parse::<u64>()
            .expect("LAMBDA_IMAGED_SOAK_SECS takes whole seconds")
    });
    Duration::from_secs(from_arg.or(from_env).unwrap_or(600))
}

/// Least-squares slope of `points` (x in minutes), per minute.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let num: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}

/// What one soak request was expected to do, and what it did.
#[derive(Default)]
struct SoakTally {
    /// Ended with neither Completed nor a status, or its task died.
    lost: usize,
    /// Completed with another tag or image id than its tag's, or failed while no fault was on.
    misserved: usize,
    requests: usize,
}

impl SoakTally {
    /// Records a request that must complete with `expected_id` (when known) for `tag`.
    fn served(
        &mut self,
        outcome: &support::Outcome,
        tag: &str,
        expected_id: Option<&str>,
    ) -> Option<String> {
        self.requests += 1;
        match &outcome.result {
            Ok(done) if done.tag == tag && expected_id.is_none_or(|id| id == done.image_id) => {
                Some(done.image_id.clone())
            }
            Ok(done) => {
                eprintln!("soak: mis-served {tag}: {done:?}");
                self.misserved += 1;
                None
            }
            Err(status)
                if status.code() == tonic::Code::Internal
                    && status.message().contains("without") =>
            {
                self.lost += 1;
                None
            }
            Err(status) => {
                eprintln!("soak: {tag} failed with no fault on: {status:?}");
                self.misserved += 1;
                None
            }
        }
    }
}

/// Mixed traffic through the fault proxy for [`soak_duration`]: each round sends warm hits
/// (timed), one new build shared by three clients, one client that leaves mid-build (and a
/// follow-up for its tag), and every fourth round an engine fault on a new build (HTTP 500,
/// answer cut short, connection dropped, or an engine restart), which must fail with a status
/// and then succeed once lifted. Fails on daemon panics, a dead daemon, and lost or
/// mis-served requests; reports RSS and fd slopes (after the first minute) and p99 hit
/// latency.
async fn soak(checks: &mut Checks) -> Value {
    use support::fault_proxy::{Fault, FaultProxy};
    let duration = soak_duration();
    let proxy = FaultProxy::start().await;
    let mut daemon = Daemon::builder()
        .engine(&proxy.host())
        .env("RUST_LOG", "warn")
        .start()
        .await;
    let socket = daemon.socket().to_owned();
    let mut tally = SoakTally::default();
    let mut tags = Vec::new();
    let new_request = || {
        let name = unique("soak");
        let path = daemon.dir().join(&name);
        small_layer(&path);
        request(&name, &path)
    };
    // Warm tags served as hits all along.
    let mut warm = Vec::new();
    for _ in 0..4 {
        let req = new_request();
        let done = build(&socket, req.clone()).await;
        tags.push(done.tag.clone());
        warm.push((req, done.tag, done.image_id));
    }
    let (fds_start, rss_start) = (daemon.fds(), daemon.rss());
    let started = Instant::now();
    let mut samples: Vec<(f64, f64, f64)> = Vec::new();
    let mut hits_ms = Vec::new();
    let (mut rounds, mut faults, mut fault_statuses, mut disconnects) =
        (0usize, 0usize, 0usize, 0usize);
    while started.elapsed() < duration {
        rounds += 1;
        // Hits, a shared new build and a leaver, all at once.
        let mut hits = Vec::new();
        for i in 0..8 {
            let (req, tag, id) = warm[i % warm.len()].clone();
            let socket = socket.clone();
            hits.push(tokio::spawn(async move {
                let t = Instant::now();
                let outcome = Client::connect(&socket).await.unwrap().build(req).await;
                (outcome, tag, id, t.elapsed().as_secs_f64() * 1000.0)
            }));
        }
        let shared = new_request();
        let sharers: Vec<_> = (0..3)
            .map(|_| support::spawn_build(&socket, shared.clone()))
            .collect();
        let leaving = new_request();
        let leaver = {
            let (socket, req) = (socket.clone(), leaving.clone());
            tokio::spawn(async move {
                let mut client = lambda_imaged::client::connect(&socket).await.unwrap();
                let mut stream = client.build(req).await.unwrap().into_inner();
                // Leaves right after Accepted.
                stream.message().await.ok().flatten().is_some()
            })
        };
        for hit in hits {
            match hit.await {
                Ok((outcome, tag, id, ms)) => {
                    if tally.served(&outcome, &tag, Some(&id)).is_some() {
                        hits_ms.push(ms);
                    }
                }
                Err(_) => tally.lost += 1,
            }
        }
        let mut shared_id: Option<String> = None;
        for sharer in sharers {
            match sharer.await {
                Ok(outcome) => {
                    let tag = outcome
                        .result
                        .as_ref()
                        .map(|d| d.tag.clone())
                        .unwrap_or_default();
                    if let Some(id) = tally.served(&outcome, &tag, shared_id.as_deref()) {
                        shared_id.get_or_insert(id);
                        tags.push(tag);
                    }
                }
                Err(_) => tally.lost += 1,
            }
        }
        if !matches!(leaver.await, Ok(true)) {
            tally.lost += 1;
        }
        disconnects += 1;
        let follow = support::build(&socket, leaving).await;
        let tag = follow
            .result
            .as_ref()
            .map(|d| d.tag.clone())
            .unwrap_or_default();
        if tally.served(&follow, &tag, None).is_some() {
            tags.push(tag);
        }

        if rounds % 4 == 0 {
            faults += 1;
            let req = new_request();
            let kind = (rounds / 4) % 4;
            match kind {
                0 => proxy.set("/images/load", Fault::Error500("soak: injected".into())),
                1 => proxy.set("/images/load", Fault::CutAfter(8)),
                2 => proxy.set("/images/load", Fault::Drop),
                _ => proxy.refuse(),
            }
            let failed = support::build(&socket, req.clone()).await;
            tally.requests += 1;
            match &failed.result {
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::FailedPrecondition
                    ) =>
                {
                    fault_statuses += 1
                }
                Err(status)
                    if status.code() == tonic::Code::Internal
                        && status.message().contains("without") =>
                {
                    tally.lost += 1
                }
                other => {
                    eprintln!("soak: fault {kind} gave {other:?}");
                    tally.misserved += 1;
                }
            }
            proxy.clear();
            proxy.restore();
            // Health back (the watcher reconnects on its own), then the retry must build.
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut client = daemon.client().await;
            while client.health().await.ok()
                != Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
            {
                assert!(
                    Instant::now() < deadline,
                    "health never came back after fault {kind}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let retry = support::build(&socket, req).await;
            let tag = retry
                .result
                .as_ref()
                .map(|d| d.tag.clone())
                .unwrap_or_default();
            if tally.served(&retry, &tag, None).is_some() {
                tags.push(tag);
            }
        }
        let (fds, rss) = (daemon.fds(), daemon.rss());
        samples.push((
            started.elapsed().as_secs_f64() / 60.0,
            fds as f64,
            rss as f64,
        ));
    }
    let (fds_end, rss_end) = (daemon.fds(), daemon.rss());
    let alive = daemon.exited().is_none();
    let log = daemon.log();
    let panics = log.matches("panicked").count();
    // Slopes after the first minute (or the second half of a shorter run): start-up growth
    // (pools, caches filling) is not a leak.
    let skip = (duration.as_secs_f64() / 60.0 / 2.0).min(1.0);
    let late: Vec<_> = samples.iter().filter(|s| s.0 >= skip).collect();
    let fd_slope = slope(&late.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>());
    let rss_slope = slope(&late.iter().map(|s| (s.0, s.2 / 1024.0)).collect::<Vec<_>>());
    hits_ms.sort_by(f64::total_cmp);
    let p99 = if hits_ms.is_empty() {
        0.0
    } else {
        percentile(&hits_ms, 0.99)
    };
    tags.sort();
    tags.dedup();
    rmi(&tags);
    json!({
        "scenario": "soak", "seconds": started.elapsed().as_secs(), "rounds": rounds,
        "requests": tally.requests, "hits": hits_ms.len(), "disconnects": disconnects,
        "faults": faults,
        "fault_statuses": checks.equal("faults answered with a status", fault_statuses, faults),
        "panics": checks.equal("daemon panics", panics, 0),
        "daemon_alive": checks.equal("daemon alive", alive, true),
        "lost": checks.equal("lost requests", tally.lost, 0),
        "misserved": checks.equal("mis-served requests", tally.misserved, 0),
        "fds_start": fds_start, "fds_end": fds_end,
        "fd_slope_per_min": (fd_slope * 100.0).round() / 100.0,
        "rss_start_mib": rss_start >> 20, "rss_end_mib": rss_end >> 20,
        "rss_slope_kib_per_min": rss_slope.round(),
        "hit_p99_ms": (p99 * 10.0).round() / 10.0,
    })
}

/// The daemon binary on the engine at `host`, sharing images through `--registry-cache cache`
/// under `--registry-cache-policy policy`.
async fn fleet_daemon(host: &str, cache: &str, policy: &str) -> Daemon {
    Daemon::builder()
        .engine(host)
        .env("RUST_LOG", "warn")
        .args(["--registry-cache", cache, "--registry-cache-policy", policy])
        .start()
        .await
}

/// How fast the link to engine B is in the slow case (bytes/s): a remote engine on a 160 Mbit/s
/// link.
const SLOW_LINK: f64 = 20e6;

/// Waits (up to 10 min) for A's push of `reference` to be listed as ended; whether it
/// succeeded, and the wait in ms.
async fn wait_for_push(a: &Daemon, reference: &str) -> (bool, f64) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let mut client = a.client().await;
    let push = loop {
        let listed = client.list_builds().await.unwrap();
        if let Some(push) = listed.recent.into_iter().find(|s| s.tag == reference) {
            break Some(push);
        }
        if Instant::now() > deadline {
            break None;
        }
        // Polling ListBuilds for the bench's figure; not a synchronisation of the daemon.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pushed = push.is_some_and(|p| p.state == proto::BuildState::Succeeded as i32);
    (pushed, started.elapsed().as_secs_f64() * 1000.0)
}

/// The seconds the "checked" status line says the check of a pulled image took (its layers'
/// diff IDs computed from the files), if there is one.
fn check_seconds(built: &Built) -> Option<f64> {
    built.events.iter().find_map(|e| match &e.event {
        Some(Event::Log(log)) if log.text.contains(" checked: ") => log
            .text
            .split("computed in ")
            .nth(1)?
            .split(' ')
            .next()?
            .parse()
            .ok(),
        _ => None,
    })
}

/// The registry cache under `--registry-cache-policy auto`, 200 MB / 4,000-file layer, two
/// engines (`tests/support/dockerd.rs`), the test registry. A builds cold and pushes. Then on
/// engine B: (slow) behind a 20 MB/s link the daemon pulls (`registry_hit`), compared with a
/// local cold build over the same link (`never`); (local) on its Unix socket it builds
/// (`missing`, no lookup), compared with A's cold build. Between the cases B's images are
/// removed, and their layers with them. Correctness: A built and pushed, the slow runner hit
/// with A's image id and no engine build, the local one built it with the same image id. The
/// check of the pulled image (its layers' diff IDs from the files) is reported separately.
async fn fleet(checks: &mut Checks) -> Value {
    let engine_b = support::dockerd::second_engine(&[BASE_IMAGE]);
    let slow = support::dockerd::throttled(&engine_b.host, SLOW_LINK).await;
    let cache = format!("{}/{}", registry(), unique("bench-fleet-"));
    let a = fleet_daemon(&support::engine_host(), &cache, "auto").await;
    // Readable by others: only such layers are shared (see the README's security note).
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let layer = root.path().join("layer");
    make_layer(&layer, 4000, 200 << 20);
    let request = request(&unique("fleet"), &layer);

    let cold = build_events(a.socket(), request.clone()).await;
    let fingerprint = docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{index .Config.Labels \"io.lambda-imaged.fingerprint\"}}",
        &cold.done.tag,
    ]);
    let reference = format!("{cache}:fp-{}", fingerprint.trim());
    let (pushed, push_ms) = wait_for_push(&a, &reference).await;
    let remove_on_b = |tag: &str| {
        let _ = support::dockerd::docker_at(&engine_b.host, &["rmi", tag]);
    };

    let b_slow = fleet_daemon(&slow, &cache, "auto").await;
    let slow_pull = build_events(b_slow.socket(), request.clone()).await;
    let slow_builds = b_slow.stats().await.engine_builds;
    drop(b_slow);
    remove_on_b(&slow_pull.done.tag);
    let b_never = fleet_daemon(&slow, &cache, "never").await;
    let slow_build = build_events(b_never.socket(), request.clone()).await;
    drop(b_never);
    remove_on_b(&slow_build.done.tag);

    let b_local = fleet_daemon(&engine_b.host, &cache, "auto").await;
    let local = build_events(b_local.socket(), request).await;
    drop(b_local);
    remove_on_b(&local.done.tag);
    rmi(std::slice::from_ref(&cold.done.tag));
    let ratio = |x: f64, y: f64| (x / y * 100.0).round() / 100.0;
    json!({
        "scenario": "fleet", "layer_mib": 200, "layer_files": 4000,
        "slow_link_mb_s": SLOW_LINK / 1e6,
        "a_reason": checks.equal("A's build reason", cold.reason(), "missing"),
        "a_pushed": checks.equal("A's push succeeded (ListBuilds)", pushed, true),
        "slow_reason": checks.equal("B's reason behind the slow link", slow_pull.reason(), "registry_hit"),
        "slow_engine_builds": checks.equal("engine builds on B behind the slow link", slow_builds, 0),
        "slow_same_image": checks.equal("B's pulled image id is A's", slow_pull.done.image_id == cold.done.image_id, true),
        "slow_build_reason": checks.equal("B's reason with policy never", slow_build.reason(), "missing"),
        "local_reason": checks.equal("B's reason on its Unix socket", local.reason(), "missing"),
        "local_same_image": checks.equal("B's local image id is A's", local.done.image_id == cold.done.image_id, true),
        "cold_build_ms": cold.ms.round(), "push_ms": push_ms.round(),
        "slow_pull_ms": slow_pull.ms.round(), "slow_build_ms": slow_build.ms.round(),
        "slow_ratio": ratio(slow_pull.ms, slow_build.ms), "slow_target_ratio": 0.5,
        "local_ms": local.ms.round(),
        "local_ratio": ratio(local.ms, cold.ms), "local_target_ratio": 1.1,
        "check_s": check_seconds(&slow_pull), "check_target_s": 0.5,
    })
}

/// Keep-warm on the 200 MB / 4,000-file layer (`--keep-warm 1h`): 20 times one 52 KB file
/// gets new content, timed from the write to the background rebuild's end (ListBuilds, polled
/// every 2 ms); then the daemon's CPU while it watches the layer idle for 60 s (its
/// /proc/PID/stat times) and its inotify watches (GetInfo). Correct when every edit is one
/// background rebuild and the next request is a hit holding the last edit.
async fn keep_warm(checks: &mut Checks) -> Value {
    let big = BigLayer::prepare_with("keepwarm", &["--keep-warm", "1h"]).await;
    let mut client = big.daemon.client().await;
    let path = big.layer.display().to_string();
    let watched = |info: &proto::GetInfoResponse| {
        info.keep_warm
            .as_ref()
            .is_some_and(|k| k.sources.iter().any(|s| s.path == path))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !watched(&client.info().await.unwrap()) {
        assert!(Instant::now() < deadline, "the layer was never watched");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut samples = Vec::new();
    for edit in 0..20 {
        let before = background_done(&mut client, &big.tag).await;
        let file = big.layer.join(format!("pkg000/file{edit:05}.bin"));
        let started = Instant::now();
        write_random(&file, BIG_FILE_BYTES);
        let deadline = started + Duration::from_secs(60);
        while background_done(&mut client, &big.tag).await == before {
            assert!(Instant::now() < deadline, "edit {edit} was not rebuilt");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let last = big.layer.join("pkg000/file00019.bin");
    let info = client.info().await.unwrap().keep_warm.unwrap_or_default();
    let cpu_before = cpu_seconds(big.daemon.pid());
    let idle = Instant::now();
    // The measurement window itself (what the daemon costs while nothing changes).
    tokio::time::sleep(Duration::from_secs(60)).await;
    let cpu_percent =
        (cpu_seconds(big.daemon.pid()) - cpu_before) / idle.elapsed().as_secs_f64() * 100.0;
    let next = build(big.daemon.socket(), big.request.clone()).await;
    let in_image = image_sha256(&big.tag, "/opt/pkg000/file00019.bin");
    let after = client.info().await.unwrap().keep_warm.unwrap_or_default();
    samples.sort_by(f64::total_cmp);
    rmi(std::slice::from_ref(&big.tag));
    json!({
        "scenario": "keep_warm", "layer_mib": 200, "layer_files": 4000, "edits": 20,
        "file_bytes": BIG_FILE_BYTES,
        "write_to_ready_p50_ms": percentile(&samples, 0.5).round(),
        "write_to_ready_max_ms": samples.last().copied().unwrap_or(0.0).round(),
        "target_write_to_ready_p50_ms": 500,
        "idle_cpu_percent": (cpu_percent * 100.0).round() / 100.0,
        "target_idle_cpu_percent": 1,
        "inotify_watches": info.inotify_watches,
        "rebuilds": checks.equal("background rebuilds (one per edit)", after.rebuilds, 20),
        "next_request_cached": checks.equal("the request after the edits is a hit", next.cached, true),
        "image_file": checks.equal("the last edit in the image (sha256)", in_image, host_sha256(&last)),
    })
}

/// Finished background rebuilds of `tag` in ListBuilds' history.
async fn background_done(client: &mut Client, tag: &str) -> usize {
    let builds = client.list_builds().await.unwrap();
    builds
        .recent
        .iter()
        .filter(|b| b.tag == tag && b.background)
        .count()
}

/// User plus system CPU seconds of process `pid` so far (/proc/PID/stat, fields 14 and 15).
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / per_second
}
