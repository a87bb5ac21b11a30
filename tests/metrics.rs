//! Prometheus metrics over the opt-in HTTP listener, after real builds in the private engine.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use lambda_imaged::client::proto;
use lambda_imaged::config::Config;
use lambda_imaged::listener::Listener;
use lambda_imaged::server::{Daemon, ServeError};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// One HTTP/1.1 request to the metrics listener: (status line, body).
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    let response = tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .expect("the metrics listener answered within 60 s");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP response with headers");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// The value of the series line `series` (name and labels exactly as exposed).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split(' ').next()?.parse().ok()
    })
}

/// A config on the test engine with metrics on an ephemeral loopback port.
fn metrics_config(dir: &std::path::Path) -> Config {
    let mut config = Config::new(dir.join("d.sock"), dir.join("cache"));
    config.engine_host = engine_host();
    config.rie_dir = rie_dir();
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    // No keep-warm rebuilds among the counted requests.
    config.keep_warm = std::time::Duration::ZERO;
    config
}

/// A miss, a hit and a failing request are counted exactly: requests, builds by reason and
/// outcome, one cache hit, one observation in each latency histogram, the bytes the build
/// streamed to the engine, nothing left in flight or queued; other paths are 404; a second
/// daemon asked to listen on the same port refuses to start, naming the address.
#[tokio::test(flavor = "multi_thread")]
async fn scrape_counts_a_miss_a_hit_and_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let config = metrics_config(dir.path());
    let listener = Listener::open(&config.socket, None, config.socket_reach())
        .await
        .unwrap();
    let mut daemon = Daemon::new(config);
    let addr = daemon
        .bind_metrics()
        .await
        .unwrap()
        .expect("metrics are on");
    assert_ne!(addr.port(), 0, "the bound port is reported");
    let socket = dir.path().join("d.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(daemon.serve(listener, async {
        let _ = stopped.await;
    }));

    let (status, before) = http_get(addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        value(&before, "lambda_imaged_builds_in_flight"),
        Some(0.0),
        "{before}"
    );

    let layer = tempfile::tempdir().unwrap();
    write_file(&layer.path().join("app.py"), &unique("content "), 0o644);
    let request = zip_request(&[(&unique("m"), layer.path())]);
    let miss = build(&socket, request.clone()).await;
    assert_eq!(miss.completed().reason, proto::Reason::Missing as i32);
    let sent = bytes_sent(&miss.events);
    assert!(sent > 0, "the miss streamed an image to the engine");
    let hit = build(&socket, request).await;
    assert!(hit.completed().cached);

    let mut failing = zip_request(&[]);
    failing.package_type = proto::PackageType::Image as i32;
    failing.image = format!("lambda-imaged-test/{}:missing", unique("nobase"));
    failing.skip_pull_image = true;
    let failed = build(&socket, failing).await;
    assert_eq!(failed.status().code(), Code::NotFound);

    let (status, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let expected = [
        ("lambda_imaged_requests_total{joined=\"false\"}", 3.0),
        (
            "lambda_imaged_builds_total{reason=\"missing\",outcome=\"completed\"}",
            1.0,
        ),
        (
            "lambda_imaged_builds_total{reason=\"up_to_date\",outcome=\"completed\"}",
            1.0,
        ),
        (
            "lambda_imaged_builds_total{reason=\"undecided\",outcome=\"failed\"}",
            1.0,
        ),
        ("lambda_imaged_cache_hits_total", 1.0),
        ("lambda_imaged_build_duration_seconds_count", 1.0),
        ("lambda_imaged_hit_duration_seconds_count", 1.0),
        ("lambda_imaged_engine_bytes_sent_total", sent as f64),
        ("lambda_imaged_builds_in_flight", 0.0),
        ("lambda_imaged_build_queue_depth", 0.0),
        ("lambda_imaged_registry_cache_hits_total", 0.0),
        ("lambda_imaged_registry_cache_misses_total", 0.0),
        ("lambda_imaged_registry_cache_push_failures_total", 0.0),
    ];
    for (series, want) in expected {
        assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
    }
    assert!(
        !text.contains("joined=\"true\""),
        "no request joined another: {text}"
    );
    // The build's latency lies within the time the test took; the +Inf bucket holds it.
    assert_eq!(
        value(
            &text,
            "lambda_imaged_build_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        Some(1.0),
        "{text}"
    );

    let (status, _) = http_get(addr, "/other").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    let taken = tempfile::tempdir().unwrap();
    let mut second = metrics_config(taken.path());
    second.metrics_listen = Some(addr);
    let second_listener = Listener::open(&second.socket, None, second.socket_reach())
        .await
        .unwrap();
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        Daemon::new(second).serve(second_listener, std::future::pending()),
    )
    .await
    .expect("a refused bind ends serve at once");
    match refused {
        Err(ServeError::Metrics(err)) => {
            let message = err.to_string();
            assert!(message.contains(&addr.to_string()), "{message}");
            assert!(message.contains("metrics_listen"), "{message}");
        }
        other => panic!("expected a metrics bind error, got {other:?}"),
    }

    let _ = stop.send(());
    served.await.unwrap().unwrap();
}
