//! End-to-end benchmarks against the real daemon binary (over its socket) and the real
//! private engine of `scripts/test-env.sh`. One JSON line of figures per scenario.
//!
//! `cargo bench --bench e2e -- <scenario> [--json]`; scenarios: warm_hit, dedup, fanout,
//! layer_repeat, layer_touch, cold_vs_docker, rss_1g (or `all`).
//!
//! Each line holds the scenario's correctness figures (engine builds, completed streams, files
//! re-hashed, ...), its speed figures, and `failures`: every correctness figure that was wrong.
//! Any failure makes the bench exit 1 once all scenarios ran; speed targets (`target`) are
//! informational and never fail it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lambda_imaged::client::{Client, LayerArg, RequestBuilder, proto};

// The integration tests' helpers (engine events, unique names) serve the benchmarks too.
#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::{Value, json};
use support::{engine_builds_of, now_stamp, unique};

const SCENARIOS: &[&str] = &[
    "warm_hit",
    "dedup",
    "fanout",
    "layer_repeat",
    "layer_touch",
    "cold_vs_docker",
    "rss_1g",
];

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let json_only = std::env::args().any(|a| a == "--json");
    let wanted: Vec<&str> = match args.first().map(String::as_str) {
        None | Some("all") => SCENARIOS.to_vec(),
        Some(name) if SCENARIOS.contains(&name) => vec![name],
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
}

async fn run(name: &str, checks: &mut Checks) -> Value {
    match name {
        "warm_hit" => warm_hit(checks).await,
        "dedup" => dedup(checks).await,
        "fanout" => fanout(checks).await,
        "layer_repeat" => layer_repeat(checks).await,
        "layer_touch" => layer_touch(checks).await,
        "cold_vs_docker" => cold_vs_docker(checks).await,
        "rss_1g" => rss_1g(checks).await,
        _ => unreachable!("checked in main"),
    }
}

/// The daemon binary on a temp socket, with its own cache dir.
struct Daemon {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts the binary and waits (up to 60 s) until it answers on its socket.
    async fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let rie = std::env::var("LAMBDA_IMAGED_RIE_DIR")
            .expect("run `eval \"$(scripts/test-env.sh)\"` first");
        assert!(
            std::env::var("DOCKER_HOST").is_ok(),
            "DOCKER_HOST is not set: run scripts/test-env.sh first"
        );
        let child = Command::new(env!("CARGO_BIN_EXE_lambda-imaged"))
            .arg("--socket")
            .arg(&socket)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--rie-dir")
            .arg(rie)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let daemon = Daemon { child, socket, dir };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        if let Err(err) = Client::connect_waiting(&daemon.socket, deadline).await {
            panic!("the daemon did not come up: {err}");
        }
        daemon
    }

    /// A new connection to the daemon.
    async fn client(&self) -> Client {
        Client::connect(&self.socket).await.unwrap()
    }

    /// Peak resident set size so far, in bytes (VmHWM); panics when it cannot be read, since a
    /// missing figure must not pass for a small one.
    fn peak_rss(&self) -> u64 {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("cannot read the daemon's peak RSS from {path}: {err}"));
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no VmHWM line with a size in kB in {path}:\n{status}"));
        kib * 1024
    }

    async fn stats(&self) -> proto::Stats {
        self.client()
            .await
            .info()
            .await
            .unwrap()
            .stats
            .expect("GetInfo carries stats")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// A layer of `files` files totalling about `bytes`, pseudo-random (incompressible, unique).
fn make_layer(path: &Path, files: usize, bytes: usize) {
    let per_file = bytes / files;
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut buffer = vec![0u8; per_file];
    for index in 0..files {
        let dir = path.join(format!("pkg{:03}", index / 100));
        std::fs::create_dir_all(&dir).unwrap();
        for chunk in buffer.chunks_mut(8) {
            // xorshift64: fast, good enough to defeat compression and dedup.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let bytes = seed.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        std::fs::write(dir.join(format!("file{index:05}.bin")), &buffer).unwrap();
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
/// answered cached, with no engine build.
async fn warm_hit(checks: &mut Checks) -> Value {
    let daemon = Daemon::start().await;
    let layer = daemon.dir.path().join("layer");
    small_layer(&layer);
    let req = request(&unique("warm"), &layer);
    let mut client = daemon.client().await;
    let first = build_on(&mut client, req.clone()).await;
    let since = now_stamp();
    let mut cached = 0;
    for _ in 0..100 {
        cached += usize::from(build_on(&mut client, req.clone()).await.cached); // warm up
    }
    let mut samples = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let started = Instant::now();
        let done = build_on(&mut client, req.clone()).await;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
        cached += usize::from(done.cached);
    }
    samples.sort_by(f64::total_cmp);
    let builds = engine_builds_of(std::slice::from_ref(&first.tag), &since);
    rmi(&[first.tag]);
    json!({
        "scenario": "warm_hit", "requests": samples.len(),
        "cached": checks.equal("cached answers", cached, 2100),
        "engine_builds": checks.equal("engine builds after the first", builds, 0),
        "p50_us": percentile(&samples, 0.5).round(), "p99_us": percentile(&samples, 0.99).round(),
        "max_us": samples.last().copied().unwrap_or(0.0).round(),
        "target": {"p50_us": 300, "p99_us": 1000},
    })
}

/// 64 concurrent identical requests for a new tag: one engine build, one image for all, in
/// about the time of one build alone.
async fn dedup(checks: &mut Checks) -> Value {
    let daemon = Daemon::start().await;
    let (one, two) = (daemon.dir.path().join("one"), daemon.dir.path().join("two"));
    make_layer(&one, 200, 20 << 20);
    make_layer(&two, 200, 20 << 20);
    let single_started = Instant::now();
    let single = build(&daemon.socket, request(&unique("single"), &one)).await;
    let single_ms = single_started.elapsed().as_secs_f64() * 1000.0;

    let req = request(&unique("dedup"), &two);
    let since = now_stamp();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (socket, req) = (daemon.socket.clone(), req.clone());
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
        "target": {"ratio": 1.1},
    })
}

/// 200 concurrent streams over 20 new tags: 20 engine builds, every stream completed.
async fn fanout(checks: &mut Checks) -> Value {
    let daemon = Daemon::start().await;
    let mut requests = Vec::new();
    for index in 0..20 {
        let path = daemon.dir.path().join(format!("l{index}"));
        small_layer(&path);
        requests.push(request(&unique("fan"), &path));
    }
    let since = now_stamp();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client_index in 0..200 {
        let (socket, req) = (daemon.socket.clone(), requests[client_index % 20].clone());
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
    let daemon = Daemon::start().await;
    let layer = daemon.dir.path().join("big");
    make_layer(&layer, 4000, 200 << 20);
    let req = request(&unique("big"), &layer);
    let started = Instant::now();
    let first = build(&daemon.socket, req.clone()).await;
    let first_ms = started.elapsed().as_secs_f64() * 1000.0;
    // Let the layer's files age past the stat cache's racy window (git's rule): a wait for a
    // file-time property, not synchronisation.
    tokio::time::sleep(Duration::from_secs(3)).await;
    build(&daemon.socket, req.clone()).await;
    let before = daemon.stats().await;
    let mut samples = Vec::new();
    let mut cached = 0;
    for _ in 0..20 {
        let started = Instant::now();
        let done = build(&daemon.socket, req.clone()).await;
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
        "target": {"repeat_p50_ms": 40},
    })
}

/// One file of that layer changed: exactly that file is re-hashed and the rebuild says
/// `layer_changed`, naming the layer.
async fn layer_touch(checks: &mut Checks) -> Value {
    let daemon = Daemon::start().await;
    let layer = daemon.dir.path().join("big");
    make_layer(&layer, 4000, 200 << 20);
    let name = unique("touch");
    let req = request(&name, &layer);
    let first = build(&daemon.socket, req.clone()).await;
    // Past the stat cache's racy window, as in layer_repeat.
    tokio::time::sleep(Duration::from_secs(3)).await;
    build(&daemon.socket, req.clone()).await; // settle the stat cache
    let before = daemon.stats().await;
    let touched = layer.join("pkg000/file00000.bin");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&touched)
        .unwrap();
    file.write_all(b"touched").unwrap();
    drop(file);
    let started = Instant::now();
    let done = build(&daemon.socket, req).await;
    let rebuild_ms = started.elapsed().as_secs_f64() * 1000.0;
    let after = daemon.stats().await;
    rmi(&[first.tag]);
    json!({
        "scenario": "layer_touch", "rebuild_ms": rebuild_ms.round(),
        "reason": checks.equal("reason", proto::reason_name(done.reason), "layer_changed"),
        "changed_layer": checks.equal("changed layer", done.changed_layer, name),
        "files_rehashed": checks.equal("files re-hashed", after.files_hashed - before.files_hashed, 1),
        "bytes_rehashed": after.bytes_hashed - before.bytes_hashed,
    })
}

/// How many times `cold_vs_docker` builds each way; the order alternates between repetitions
/// so neither side always runs on a cache the other warmed.
const COLD_REPETITIONS: usize = 2;

/// A cold build of 200 MB of never-seen content by the daemon vs `docker build --no-cache` of
/// the same amount, alternating which goes first.
async fn cold_vs_docker(checks: &mut Checks) -> Value {
    let daemon = Daemon::start().await;
    let rie = PathBuf::from(std::env::var("LAMBDA_IMAGED_RIE_DIR").unwrap())
        .join("aws-lambda-rie-x86_64");
    let mut runs = Vec::new();
    let mut fresh = 0;
    for repetition in 0..COLD_REPETITIONS {
        // Same amount of fresh, never-seen content for each, so neither hits the engine's cache.
        let base = daemon.dir.path().join(format!("rep{repetition}"));
        let ours = base.join("ours");
        make_layer(&ours, 4000, 200 << 20);
        let theirs = base.join("ctx");
        make_layer(&theirs.join("opt"), 4000, 200 << 20);
        std::fs::copy(&rie, theirs.join("aws-lambda-rie")).unwrap();
        std::fs::write(
            theirs.join("Dockerfile"),
            "FROM public.ecr.aws/lambda/python:3.12-x86_64\nCOPY aws-lambda-rie /var/rapid/aws-lambda-rie\nCOPY opt/ /opt/\nLABEL io.lambda-imaged.bench=1\n",
        )
        .unwrap();
        // Both read their files once before, so the page cache favours neither.
        for dir in [&ours, &theirs] {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "find {} -type f -exec cat {{}} + > /dev/null",
                    dir.display()
                ))
                .status();
        }
        let docker_first = repetition % 2 == 0;
        let (mut docker_ms, mut daemon_ms) = (0.0, 0.0);
        let tag = unique("bench/docker:");
        let mut done = None;
        for turn in 0..2 {
            if (turn == 0) == docker_first {
                let started = Instant::now();
                let out = Command::new("docker")
                    .args(["build", "--no-cache", "-q", "-t", &tag])
                    .arg(&theirs)
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
                done = Some(build(&daemon.socket, request(&unique("cold"), &ours)).await);
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
        "runs": runs, "ratio": (mean * 100.0).round() / 100.0, "target": {"ratio": 1.05},
    })
}

/// The daemon's peak RSS while it builds a 1 GiB layer (read from /proc; unreadable fails).
async fn rss_1g(checks: &mut Checks) -> Value {
    let daemon = Daemon::start().await;
    let layer = daemon.dir.path().join("huge");
    make_layer(&layer, 64, 1 << 30);
    let baseline = daemon.peak_rss();
    let started = Instant::now();
    let done = build(&daemon.socket, request(&unique("huge"), &layer)).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let peak = daemon.peak_rss();
    rmi(&[done.tag]);
    json!({
        "scenario": "rss_1g", "layer_mib": 1024, "build_ms": ms.round(),
        "built": checks.equal("built (not cached)", !done.cached, true),
        "daemon_peak_rss_mib": (peak as f64 / (1 << 20) as f64 * 10.0).round() / 10.0,
        "daemon_rss_before_mib": (baseline as f64 / (1 << 20) as f64 * 10.0).round() / 10.0,
        "target": {"daemon_peak_rss_mib": 64},
    })
}
