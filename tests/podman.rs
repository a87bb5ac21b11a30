//! The daemon against Podman's Docker-compatible service (Debian's `podman` 4.3, a private
//! `--root/--runroot/--tmpdir`, file events): a build, a cached hit, a one-file edit sent as a
//! delta, and the image's contents checked with `podman image mount` (containers cannot start
//! in this sandbox). Fails with the reason when Podman cannot run; it never passes silently.

mod support;

use lambda_imaged::client::proto;
use support::podman::Podman;
use support::tree::set_time;
use support::{OutcomeExt, TestDaemon, build, bytes_sent, unique, write_file, zip_request};

/// Podman: a build, a cached hit, a one-file edit loaded as a delta (a few KiB sent, not the
/// layer), contents, modes and times checked in the image.
#[tokio::test(flavor = "multi_thread")]
async fn podman_builds_hits_and_loads_an_edit_as_a_delta() {
    let podman = Podman::start();
    podman.load_from_docker("public.ecr.aws/lambda/python:3.12-x86_64");
    let host = format!("unix://{}", podman.socket().display());
    let daemon = TestDaemon::start_with(|config| config.engine_host = host).await;
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    let big = "x".repeat(1 << 20);
    write_file(&layer.join("python/big.bin"), &big, 0o644);
    write_file(&layer.join("python/m.py"), "VALUE = 1\n", 0o644);
    set_time(&layer.join("python/m.py"), 1_650_000_000);
    write_file(&layer.join("bootstrap"), "#!/bin/sh\n", 0o700);
    let name = unique("podman");
    let request = zip_request(&[(&name, &layer)]);

    let first = build(&daemon.socket, request.clone()).await;
    let tag = first.completed().tag.clone();
    assert!(!first.completed().cached);
    assert!(
        bytes_sent(&first.events) > 1 << 20,
        "the first build sends the layer"
    );
    let m = podman.read_in_image(&tag, "/opt/python/m.py").unwrap();
    assert_eq!(m, ("VALUE = 1\n".into(), 0o644, 1_650_000_000));
    let bootstrap = podman.read_in_image(&tag, "/opt/bootstrap").unwrap();
    assert_eq!(bootstrap.1, 0o755);
    let rie = podman
        .read_in_image(&tag, "/var/rapid/aws-lambda-rie")
        .unwrap();
    assert_eq!(rie.1, 0o755);

    let hit = build(&daemon.socket, request.clone()).await;
    assert!(hit.completed().cached, "{:?}", hit.completed());

    write_file(&layer.join("python/m.py"), "VALUE = 2\n", 0o644);
    set_time(&layer.join("python/m.py"), 1_650_000_002);
    std::fs::remove_file(layer.join("bootstrap")).unwrap();
    let edited = build(&daemon.socket, request).await;
    let done = edited.completed();
    assert_eq!(done.reason, proto::Reason::LayerChanged as i32);
    assert!(
        bytes_sent(&edited.events) < 64 << 10,
        "an edit sends a delta, not the layer: {} bytes",
        bytes_sent(&edited.events)
    );
    let m = podman.read_in_image(&tag, "/opt/python/m.py").unwrap();
    assert_eq!(m, ("VALUE = 2\n".into(), 0o644, 1_650_000_002));
    assert_eq!(podman.read_in_image(&tag, "/opt/bootstrap"), None);
    assert_eq!(
        podman
            .read_in_image(&tag, "/opt/python/big.bin")
            .unwrap()
            .0
            .len(),
        big.len()
    );
    daemon.stop().await;
}
