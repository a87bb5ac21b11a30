//! End-to-end benchmarks against the real daemon binary (over its socket) and the real
//! private engine of `scripts/test-env.sh`. One JSON line of figures per scenario.
//!
//! `cargo bench --bench e2e -- <scenario> [--json]`; scenarios: warm_hit, dedup, fanout,
//! layer_repeat, layer_touch, cold_vs_docker, rss_1g (or `all`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lambda_imaged::client::{self, proto};

// The integration tests' helpers (engine events, unique names) serve the benchmarks too.
#[path = "../tests/support/mod.rs"]
mod support;

use proto::build_event::Event;
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
    for name in wanted {
        let figures = runtime.block_on(run(name));
        if !json_only {
            eprintln!("{name}:");
        }
        println!("{figures}");
    }
}

async fn run(name: &str) -> Value {
    match name {
        "warm_hit" => warm_hit().await,
        "dedup" => dedup().await,
        "fanout" => fanout().await,
        "layer_repeat" => layer_repeat().await,
        "layer_touch" => layer_touch().await,
        "cold_vs_docker" => cold_vs_docker().await,
        "rss_1g" => rss_1g().await,
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
    fn start() -> Daemon {
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
        for _ in 0..400 {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Daemon { child, socket, dir }
    }

    /// Peak resident set size so far, in bytes (VmHWM).
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    }

    async fn stats(&self) -> proto::Stats {
        let mut client = client::connect(&self.socket).await.unwrap();
        client
            .get_info(proto::GetInfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .stats
            .unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn request(name: &str, path: &Path) -> proto::BuildRequest {
    proto::BuildRequest {
        runtime: "python3.12".into(),
        layers: vec![proto::Layer {
            name: name.into(),
            path: path.display().to_string(),
        }],
        skip_pull_image: true,
        ..Default::default()
    }
}

/// Runs one Build to Completed; panics on failure.
async fn build_on(
    client: &mut client::ImageBuilderClient<tonic::transport::Channel>,
    request: proto::BuildRequest,
) -> proto::Completed {
    let mut stream = client.build(request).await.unwrap().into_inner();
    while let Some(event) = stream.message().await.unwrap() {
        if let Some(Event::Completed(done)) = event.event {
            return done;
        }
    }
    panic!("stream ended without Completed");
}

async fn build(socket: &Path, request: proto::BuildRequest) -> proto::Completed {
    let mut client = client::connect(socket).await.unwrap();
    build_on(&mut client, request).await
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

async fn warm_hit() -> Value {
    let daemon = Daemon::start();
    let layer = daemon.dir.path().join("layer");
    small_layer(&layer);
    let req = request(&unique("warm"), &layer);
    let mut client = client::connect(&daemon.socket).await.unwrap();
    let first = build_on(&mut client, req.clone()).await;
    for _ in 0..100 {
        build_on(&mut client, req.clone()).await; // warm up
    }
    let mut samples = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let started = Instant::now();
        let done = build_on(&mut client, req.clone()).await;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
        assert!(done.cached);
    }
    samples.sort_by(f64::total_cmp);
    rmi(&[first.tag]);
    json!({
        "scenario": "warm_hit", "requests": samples.len(),
        "p50_us": percentile(&samples, 0.5).round(), "p99_us": percentile(&samples, 0.99).round(),
        "max_us": samples.last().copied().unwrap_or(0.0).round(),
        "target": {"p50_us": 300, "p99_us": 1000},
    })
}

async fn dedup() -> Value {
    let daemon = Daemon::start();
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
    for task in tasks {
        ids.push(task.await.unwrap().image_id);
    }
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    ids.dedup();
    let tag = build(&daemon.socket, req).await.tag;
    let builds = engine_builds_of(std::slice::from_ref(&tag), &since);
    rmi(&[tag, single.tag]);
    json!({
        "scenario": "dedup", "clients": 64, "engine_builds": builds, "distinct_image_ids": ids.len(),
        "wall_ms": wall_ms.round(), "single_wall_ms": single_ms.round(),
        "ratio": (wall_ms / single_ms * 100.0).round() / 100.0,
        "target": {"engine_builds": 1, "ratio": 1.1},
    })
}

async fn fanout() -> Value {
    let daemon = Daemon::start();
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
        "scenario": "fanout", "clients": 200, "tags": tags.len(), "completed": completed,
        "engine_builds": builds, "wall_ms": wall_ms.round(), "daemon_peak_rss_mib": peak / (1 << 20),
        "target": {"engine_builds": 20, "completed": 200},
    })
}

async fn layer_repeat() -> Value {
    let daemon = Daemon::start();
    let layer = daemon.dir.path().join("big");
    make_layer(&layer, 4000, 200 << 20);
    let req = request(&unique("big"), &layer);
    let started = Instant::now();
    let first = build(&daemon.socket, req.clone()).await;
    let first_ms = started.elapsed().as_secs_f64() * 1000.0;
    // Let the layer's files age past the stat cache's racy window (git's rule).
    tokio::time::sleep(Duration::from_secs(3)).await;
    build(&daemon.socket, req.clone()).await;
    let mut samples = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let done = build(&daemon.socket, req.clone()).await;
        assert!(done.cached);
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    rmi(&[first.tag]);
    json!({
        "scenario": "layer_repeat", "layer_mib": 200, "layer_files": 4000,
        "first_ms": first_ms.round(), "repeat_p50_ms": (percentile(&samples, 0.5) * 10.0).round() / 10.0,
        "repeat_max_ms": (samples.last().copied().unwrap_or(0.0) * 10.0).round() / 10.0,
        "target": {"repeat_p50_ms": 40},
    })
}

async fn layer_touch() -> Value {
    let daemon = Daemon::start();
    let layer = daemon.dir.path().join("big");
    make_layer(&layer, 4000, 200 << 20);
    let req = request(&unique("touch"), &layer);
    let first = build(&daemon.socket, req.clone()).await;
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
        "reason": proto::reason_name(done.reason), "changed_layer": done.changed_layer,
        "files_rehashed": after.files_hashed - before.files_hashed,
        "bytes_rehashed": after.bytes_hashed - before.bytes_hashed,
        "target": {"files_rehashed": 1},
    })
}

async fn cold_vs_docker() -> Value {
    let daemon = Daemon::start();
    let rie = PathBuf::from(std::env::var("LAMBDA_IMAGED_RIE_DIR").unwrap())
        .join("aws-lambda-rie-x86_64");
    // Same amount of fresh, never-seen content for each, so neither hits the engine's cache.
    let ours = daemon.dir.path().join("ours");
    make_layer(&ours, 4000, 200 << 20);
    let theirs = daemon.dir.path().join("ctx");
    make_layer(&theirs.join("opt"), 4000, 200 << 20);
    std::fs::copy(&rie, theirs.join("aws-lambda-rie")).unwrap();
    std::fs::write(
        theirs.join("Dockerfile"),
        "FROM public.ecr.aws/lambda/python:3.12-x86_64\nCOPY aws-lambda-rie /var/rapid/aws-lambda-rie\nCOPY opt/ /opt/\nLABEL io.lambda-imaged.bench=1\n",
    )
    .unwrap();
    // Drop the page cache influence: both read their files once before.
    for dir in [&ours, &theirs] {
        let _ = Command::new("cat").arg("/dev/null").status();
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "find {} -type f -exec cat {{}} + > /dev/null",
                dir.display()
            ))
            .status();
    }
    let tag = unique("bench/docker:");
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
    let docker_ms = started.elapsed().as_secs_f64() * 1000.0;
    let started = Instant::now();
    let done = build(&daemon.socket, request(&unique("cold"), &ours)).await;
    let daemon_ms = started.elapsed().as_secs_f64() * 1000.0;
    rmi(&[tag, done.tag]);
    json!({
        "scenario": "cold_vs_docker", "layer_mib": 200, "layer_files": 4000,
        "daemon_ms": daemon_ms.round(), "docker_build_ms": docker_ms.round(),
        "ratio": (daemon_ms / docker_ms * 100.0).round() / 100.0, "target": {"ratio": 1.05},
    })
}

async fn rss_1g() -> Value {
    let daemon = Daemon::start();
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
        "daemon_peak_rss_mib": (peak as f64 / (1 << 20) as f64 * 10.0).round() / 10.0,
        "daemon_rss_before_mib": (baseline as f64 / (1 << 20) as f64 * 10.0).round() / 10.0,
        "target": {"daemon_peak_rss_mib": 64},
    })
}
