//! Today's engines (issue 22): Docker 26.1 (Debian trixie) on the containerd image store, and
//! Docker 28.5 (Debian sid) on the containerd store and on the classic one, each a private
//! engine that `scripts/test-env.sh` starts (`LAMBDA_IMAGED_TEST_ENGINES`). On each: a cold
//! build, a hit, a one-file edit, the image's `/opt` as the layer holds it, an invoke through
//! the real RIE, and no untagged image left behind. A missing engine fails the test.

mod support;

use std::path::Path;

use lambda_imaged::client::{InvokeImageArg, LayerArg, RequestBuilder, proto};
use support::*;

/// The engine named `name` in `LAMBDA_IMAGED_TEST_ENGINES` ("name=host=version ..."): its
/// `DOCKER_HOST` and the version test-env.sh recorded.
fn engine(name: &str) -> (String, String) {
    let list = std::env::var("LAMBDA_IMAGED_TEST_ENGINES").unwrap_or_else(|_| {
        panic!("LAMBDA_IMAGED_TEST_ENGINES is not set: run `eval \"$(scripts/test-env.sh)\"` first")
    });
    list.split_whitespace()
        .find_map(|entry| {
            let mut parts = entry.splitn(3, '=');
            (parts.next() == Some(name)).then(|| {
                let host = parts.next().unwrap_or_default().to_owned();
                let version = parts.next().unwrap_or("unknown").to_owned();
                (host, version)
            })
        })
        .unwrap_or_else(|| panic!("engine {name} is not in LAMBDA_IMAGED_TEST_ENGINES={list:?}"))
}

/// Image IDs of the engine's untagged images.
fn dangling(host: &str) -> Vec<String> {
    docker_ok_on(
        host,
        &[
            "images",
            "--quiet",
            "--no-trunc",
            "--filter",
            "dangling=true",
        ],
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

fn request(layer: &Path) -> proto::BuildRequest {
    zip_request(&[("fn", layer)])
}

/// Cold build, hit, one-file edit, `/opt` checked in the image, invoke through the RIE, and
/// no untagged image left (the superseded one is removed) on engine `name`.
async fn builds_hits_and_edits_on(name: &str, store: &str) {
    let (host, version) = engine(name);
    eprintln!("{name}: Docker {version} at {host}");
    let info = docker_ok_on(&host, &["info", "--format", "{{json .DriverStatus}}"]);
    assert_eq!(
        info.contains("containerd.snapshotter"),
        store == "containerd",
        "{name} should use the {store} image store: {info}"
    );
    let before = dangling(&host);
    let engine_host = host.clone();
    let daemon = TestDaemon::start_with(move |config| config.engine_host = engine_host).await;
    let info = lambda_imaged::client::Client::connect(&daemon.socket)
        .await
        .unwrap()
        .info()
        .await
        .unwrap();
    let reported = info.engine.unwrap_or_default().image_store;
    assert_eq!(reported, store, "{name}: GetInfo names the image store");
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join(unique("engines"));
    write_file(&layer.join("bootstrap"), &bootstrap_fixture(), 0o755);
    write_file(&layer.join("message.txt"), "first\n", 0o644);

    let cold = build(&daemon.socket, request(&layer)).await;
    let cold = cold.completed().clone();
    assert!(!cold.cached, "{name}: the first build is cold");
    let hit = build(&daemon.socket, request(&layer)).await;
    assert!(hit.completed().cached, "{name}: the second is a hit");
    assert_eq!(hit.completed().image_id, cold.image_id);

    write_file(&layer.join("message.txt"), "second\n", 0o644);
    let edited = build(&daemon.socket, request(&layer)).await;
    let edit = edited.completed().clone();
    // Every store gets a delta (the changed file): a docker archive with zero-size entries on
    // the classic store, an OCI layout naming the held blobs on the containerd store.
    let sent = bytes_sent(&edited.events);
    assert!(
        sent < 1 << 20,
        "{name}: a one-file edit is a delta: {sent} bytes sent"
    );
    let delta = edited.events.iter().any(|event| {
        matches!(&event.event, Some(proto::build_event::Event::Log(log)) if log.text.contains("delta 1/"))
    });
    assert!(delta, "{name}: the edit is reported as a delta layer");
    assert!(!edit.cached, "{name}: an edit rebuilds");
    assert_eq!(
        proto::reason_name(edit.reason),
        "layer_changed",
        "{name}: {edit:?}"
    );
    assert_ne!(edit.image_id, cold.image_id);
    let tagged = docker_ok_on(&host, &["image", "inspect", "-f", "{{.Id}}", &edit.tag]);
    assert_eq!(
        tagged.trim(),
        edit.image_id,
        "{name}: the tag names the image we reported"
    );
    let opt = docker_ok_on(
        &host,
        &[
            "run",
            "--rm",
            "--entrypoint",
            "/bin/sh",
            &edit.tag,
            "-c",
            "cat /opt/message.txt; stat -c '%a %n' /opt/bootstrap /var/rapid/aws-lambda-rie",
        ],
    );
    assert_eq!(
        opt, "second\n755 /opt/bootstrap\n755 /var/rapid/aws-lambda-rie\n",
        "{name}: the image's files"
    );
    if store == "containerd" {
        assert_complete(&host, &edit.tag);
    }
    let answer = invoke_through_rie_on(&host, &edit.tag, &["/opt/bootstrap"]).await;
    assert!(
        answer.contains("second"),
        "{name}: the function answered {answer}"
    );

    daemon.stop().await;
    // The superseded image is removed in the background after the edit.
    let what = format!("{name}: no untagged image of ours left");
    until(&what, std::time::Duration::from_secs(60), || {
        dangling(&host).iter().all(|id| before.contains(id))
    })
    .await;
    rmi_all_on(&host, &edit.tag);
}

#[tokio::test(flavor = "multi_thread")]
async fn docker26_containerd_store_builds_hits_and_edits() {
    builds_hits_and_edits_on("docker26-containerd", "containerd").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn docker28_containerd_store_builds_hits_and_edits() {
    builds_hits_and_edits_on("docker28-containerd", "containerd").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn docker28_classic_store_builds_hits_and_edits() {
    builds_hits_and_edits_on("docker28-classic", "classic").await;
}

/// `docker save` of `tag` succeeds only when the engine's content store holds every blob the
/// image's manifest names: on the containerd store, the proof that a load which left blobs out
/// named only blobs that are there (a manifest naming a missing one loads and runs over the
/// existing snapshots, but cannot be saved or pushed).
fn assert_complete(host: &str, tag: &str) {
    let saved = docker_on(host, &["save", tag]);
    assert!(
        saved.status.success(),
        "{tag}: docker save fails, a blob is missing: {}",
        String::from_utf8_lossy(&saved.stderr)
    );
}

/// `/opt/message.txt` of `tag` on `host`.
fn message_in(host: &str, tag: &str) -> String {
    let args = [
        "run",
        "--rm",
        "--entrypoint",
        "/bin/cat",
        tag,
        "/opt/message.txt",
    ];
    docker_ok_on(host, &args)
}

/// A base image of its own in the test registry, pushed (gzip) by the classic engine: the
/// busybox stand-in's files exported from a container and imported as one new layer (its
/// diff ID is new: a base whose layers the engine under test already unpacked would be pulled
/// without its layer blobs, which that store then lists as unavailable).
fn pushed_base() -> String {
    let base = format!("{}/{}/base:1", registry::registry(), unique("engines-"));
    let container = docker_ok(&["create", "lambda-base:busybox"]);
    let container = container.trim();
    let mut export = std::process::Command::new("docker")
        .args(["export", container])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let import = std::process::Command::new("docker")
        .args(["import", "--change", "WORKDIR /var/task", "-", &base])
        .stdin(export.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(
        export.wait().unwrap().success(),
        "docker export {container}"
    );
    assert!(import.status.success(), "docker import: {import:?}");
    docker_ok(&["rm", container]);
    docker_ok(&["push", &base]);
    docker_ok(&["rmi", &base]);
    base
}

/// Over a base the daemon pulls from the test registry (gzip blobs: pushed by the classic
/// engine), on the containerd store: a cold build names the base's gzip blobs, an edit is a
/// delta, and after `docker rmi` of our image (the blobs we relied on go with it) the next
/// build still succeeds with every blob present.
async fn over_a_pulled_base_and_after_rmi_on(name: &str) {
    let (host, version) = engine(name);
    eprintln!("{name}: Docker {version} at {host}");
    let base = pushed_base();
    let before = dangling(&host);
    let engine_host = host.clone();
    let daemon = TestDaemon::start_with(move |config| config.engine_host = engine_host).await;
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join(unique("pulled"));
    write_file(&layer.join("bootstrap"), &bootstrap_fixture(), 0o755);
    // A layer name of its own: SAM's tag hashes layer names, and the other test on this
    // engine builds a layer named "fn".
    let layer_name = unique("pulled-");
    let request = || {
        RequestBuilder::zip("python3.12")
            .invoke_image(InvokeImageArg {
                function: None,
                image: base.clone(),
            })
            .layer(LayerArg::new(&layer_name, &layer))
            .finish()
            .unwrap()
    };
    write_file(&layer.join("message.txt"), "one\n", 0o644);
    let cold = build(&daemon.socket, request()).await;
    let tag = cold.completed().tag.clone();
    assert_complete(&host, &tag);
    assert_eq!(message_in(&host, &tag), "one\n");

    write_file(&layer.join("message.txt"), "two\n", 0o644);
    let edited = build(&daemon.socket, request()).await;
    let sent = bytes_sent(&edited.events);
    assert!(
        sent < 1 << 20,
        "{name}: the edit over a pulled base is a delta: {sent} bytes"
    );
    assert_complete(&host, &tag);
    assert_eq!(message_in(&host, &tag), "two\n");

    // Our image goes behind the daemon's back, and with it our layers' blobs (the superseded
    // image is removed in the background first).
    until(
        "the superseded image removed",
        std::time::Duration::from_secs(60),
        || dangling(&host).iter().all(|id| before.contains(id)),
    )
    .await;
    rmi_all_on(&host, &tag);
    write_file(&layer.join("message.txt"), "three\n", 0o644);
    let again = build(&daemon.socket, request()).await;
    eprintln!(
        "{name}: after rmi: {} bytes sent, warnings {:?}",
        bytes_sent(&again.events),
        warnings_with_code(&again, "layers_resent")
    );
    assert_eq!(again.completed().tag, tag);
    let tagged = docker_ok_on(&host, &["image", "inspect", "-f", "{{.Id}}", &tag]);
    assert_eq!(tagged.trim(), again.completed().image_id);
    assert_complete(&host, &tag);
    assert_eq!(message_in(&host, &tag), "three\n");

    daemon.stop().await;
    until(
        "no untagged image of ours left",
        std::time::Duration::from_secs(60),
        || dangling(&host).iter().all(|id| before.contains(id)),
    )
    .await;
    rmi_all_on(&host, &tag);
    docker_ok_on(&host, &["rmi", &base]);
}

#[tokio::test(flavor = "multi_thread")]
async fn docker28_containerd_store_deltas_over_a_pulled_base_and_after_rmi() {
    over_a_pulled_base_and_after_rmi_on("docker28-containerd").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn docker26_containerd_store_deltas_over_a_pulled_base_and_after_rmi() {
    over_a_pulled_base_and_after_rmi_on("docker26-containerd").await;
}

/// The registry cache across stores: an image built on Docker 28's containerd store and pushed
/// is a `REGISTRY_HIT` on its classic store with the same `/opt` (fingerprints name the base
/// by its config digest on every store); one built cold there is right back on the containerd
/// store. (Image IDs differ by store: the config digest there, the manifest digest here. An
/// edit is a delta, which is never pushed.)
#[tokio::test(flavor = "multi_thread")]
async fn the_registry_cache_is_shared_between_the_containerd_and_classic_stores() {
    let (containerd, _) = engine("docker28-containerd");
    let (classic, _) = engine("docker28-classic");
    let cache = format!("{}/{}", registry::registry(), unique("stores-"));
    let start = |host: String| {
        let cache = cache.clone();
        TestDaemon::start_with(move |config| {
            config.engine_host = host;
            config.registry_cache = Some(cache);
            config.registry_cache_policy = lambda_imaged::config::RegistryCachePolicy::Always;
        })
    };
    let (a, b) = (
        start(containerd.clone()).await,
        start(classic.clone()).await,
    );
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    write_file(&layer.join("message.txt"), "from containerd\n", 0o644);
    for path in [dir.path(), &layer] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let request = zip_request(&[(&unique("shared-"), &layer)]);

    let built = build(&a.socket, request.clone()).await.completed().clone();
    assert_eq!(built.reason, proto::Reason::Missing as i32);
    registry::pushed(
        &a.socket,
        &registry::cache_reference(&containerd, &built.tag, &cache),
    )
    .await;
    let hit = build(&b.socket, request.clone()).await.completed().clone();
    assert_eq!(hit.reason, proto::Reason::RegistryHit as i32, "{hit:?}");
    assert_eq!(message_in(&classic, &hit.tag), "from containerd\n");
    assert_eq!(
        tree::image_tree_at(&classic, &hit.tag, "opt"),
        tree::image_tree_at(&containerd, &built.tag, "opt"),
        "the same /opt on both stores"
    );

    write_file(&layer.join("message.txt"), "from classic\n", 0o644);
    let request = zip_request(&[(&unique("back-"), &layer)]);
    let rebuilt = build(&b.socket, request.clone()).await.completed().clone();
    assert_eq!(rebuilt.reason, proto::Reason::Missing as i32);
    registry::pushed(
        &b.socket,
        &registry::cache_reference(&classic, &rebuilt.tag, &cache),
    )
    .await;
    // Back on the containerd store the image is right whichever way it came: a hit when the
    // engine fetches the pushed (gzip) blobs; a local build when it already has those layers
    // unpacked from our uncompressed blobs, skips the fetch and then lists the pulled image
    // without its content (containerd's unpacker; README, "Engines tested").
    let back = build(&a.socket, request).await;
    let reason = proto::reason_name(back.completed().reason);
    eprintln!(
        "classic -> containerd: {reason}, warnings {:?}",
        warnings_with_code(&back, "registry_cache_unavailable")
    );
    assert!(warnings_with_code(&back, "registry_cache_mismatch").is_empty());
    let back = back.completed().clone();
    assert!(["registry_hit", "missing"].contains(&reason), "{back:?}");
    assert_eq!(message_in(&containerd, &back.tag), "from classic\n");
    assert_complete(&containerd, &back.tag);

    a.stop().await;
    b.stop().await;
    rmi_all_on(&containerd, &back.tag);
    rmi_all_on(&containerd, &built.tag);
    rmi_all_on(&classic, &rebuilt.tag);
    rmi_all_on(&classic, &hit.tag);
}
