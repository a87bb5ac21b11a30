//! Standard gRPC clients with default options over the daemon's Unix socket (issue 15, item 1):
//! Python grpcio (which sends the socket path, percent-encoded, as `:authority`) and Node's
//! @grpc/grpc-js (which sends `localhost`). Each lists services through reflection, asks
//! health, calls Resolve (a good and a refused request) and runs a Build stream to Completed;
//! what they see must match what our Rust client sees.
//!
//! The clients are real: grpcio from `$LAMBDA_IMAGED_TEST_DIR/venv` and @grpc/grpc-js from
//! `$LAMBDA_IMAGED_TEST_DIR/node/node_modules`, both installed by scripts/test-env.sh.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use lambda_imaged::client::{self, LayerArg, RequestBuilder};
use support::*;
use tokio::process::Command;

/// Longest a client script may take (a busy 2-core CI machine included).
const WAIT: Duration = Duration::from_secs(120);

fn test_dir() -> PathBuf {
    PathBuf::from(std::env::var("LAMBDA_IMAGED_TEST_DIR").unwrap_or_else(|_| {
        panic!("LAMBDA_IMAGED_TEST_DIR is not set: run `eval \"$(scripts/test-env.sh)\"` first")
    }))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/service")
        .join(name)
}

/// Runs a client script to its end and returns its `key: value` lines; panics with its output
/// when it fails.
async fn run_client(mut cmd: Command) -> Vec<(String, String)> {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let output = match tokio::time::timeout(WAIT, cmd.output()).await {
        Ok(output) => output.unwrap_or_else(|e| panic!("{cmd:?} cannot run: {e}")),
        Err(_) => panic!("{cmd:?} did not finish within {WAIT:?}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{cmd:?} failed:\n{stdout}\n{stderr}"
    );
    stdout
        .lines()
        .filter_map(|line| line.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// What our own client sees for the same calls: the tag Resolve gives, the refused request's
/// code and the tag the Build completes with.
struct Expected {
    resolve_tag: String,
    refused_code: String,
    build_tag: String,
}

async fn expected(socket: &Path, layer: &Path) -> Expected {
    let mut daemon = client::connect(socket).await.unwrap();
    let resolve_tag = daemon
        .resolve(RequestBuilder::zip("python3.12").finish().unwrap())
        .await
        .unwrap()
        .into_inner()
        .tag;
    let refused = daemon
        .resolve(RequestBuilder::zip("cobol1.0").finish().unwrap())
        .await
        .expect_err("cobol1.0 is refused");
    let refused_code = format!("{:?}", refused.code());
    let request = RequestBuilder::zip("python3.12")
        .skip_pull_image(true)
        .layer(LayerArg::new("interop", layer))
        .finish()
        .unwrap();
    let build_tag = build(socket, request).await.completed().tag.clone();
    Expected {
        resolve_tag,
        refused_code,
        build_tag,
    }
}

/// Checks a client's findings against our client's, for the reflection listing `reflection`.
fn check(client: &str, found: &[(String, String)], want: &Expected, reflection: &str) {
    let field = |key: &str| {
        found
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{client} printed no {key}: {found:?}"))
    };
    let services: Vec<&str> = field("services").split(' ').collect();
    for service in [
        "lambda_imaged.v1.ImageBuilder",
        "grpc.health.v1.Health",
        reflection,
    ] {
        assert!(services.contains(&service), "{client}: {services:?}");
    }
    assert_eq!(field("health"), "SERVING", "{client}");
    assert_eq!(field("tag"), want.resolve_tag, "{client}");
    // tonic's Code debug name (InvalidArgument) against gRPC's (INVALID_ARGUMENT).
    assert_eq!(
        field("resolve_error").replace('_', "").to_lowercase(),
        want.refused_code.to_lowercase(),
        "{client}"
    );
    assert_eq!(field("build_error"), "none", "{client}");
    let events: Vec<&str> = field("build_events").split(' ').collect();
    assert_eq!(events.first(), Some(&"accepted"), "{client}: {events:?}");
    assert_eq!(events.last(), Some(&"completed"), "{client}: {events:?}");
    assert_eq!(field("build_tag"), want.build_tag, "{client}");
}

/// A small layer unique to this test run (so its image is built by this run).
fn layer(dir: &Path) -> PathBuf {
    let layer = dir.join("interop-layer");
    std::fs::create_dir_all(&layer).unwrap();
    std::fs::write(layer.join("run.txt"), unique("interop")).unwrap();
    layer
}

/// grpcio with default options: its `:authority` is the percent-encoded socket path.
#[tokio::test(flavor = "multi_thread")]
async fn grpcio_with_default_options_is_served() {
    let python = test_dir().join("venv/bin/python3");
    assert!(
        python.is_file(),
        "no {}: run scripts/test-env.sh (it installs grpcio there)",
        python.display()
    );
    let daemon = TestDaemon::start().await;
    let layer = layer(daemon.dir.path());
    let want = expected(&daemon.socket, &layer).await;
    let mut cmd = Command::new(&python);
    // (no __pycache__ next to the fixture, in the clone)
    cmd.env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(fixture("interop.py"))
        .arg(&daemon.socket)
        .arg(&layer);
    let found = run_client(cmd).await;
    check(
        "grpcio",
        &found,
        &want,
        "grpc.reflection.v1alpha.ServerReflection",
    );
    daemon.stop().await;
}

/// @grpc/grpc-js with default options (target `unix:PATH`).
#[tokio::test(flavor = "multi_thread")]
async fn grpc_js_with_default_options_is_served() {
    let modules = test_dir().join("node/node_modules");
    assert!(
        modules.join("@grpc/grpc-js").is_dir(),
        "no @grpc/grpc-js in {}: run scripts/test-env.sh (it installs it there with npm)",
        modules.display()
    );
    let daemon = TestDaemon::start().await;
    let layer = layer(daemon.dir.path());
    let want = expected(&daemon.socket, &layer).await;
    let mut cmd = Command::new("node");
    cmd.arg(fixture("interop.js"))
        .arg(&daemon.socket)
        .arg(&layer)
        .env("NODE_PATH", &modules);
    let found = run_client(cmd).await;
    check(
        "grpc-js",
        &found,
        &want,
        "grpc.reflection.v1.ServerReflection",
    );
    daemon.stop().await;
}
