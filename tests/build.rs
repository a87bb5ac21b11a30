//! Real builds through the daemon into the real private engine (scripts/test-env.sh).

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use lambda_imaged::client::proto;
use proto::build_event::Event;
use support::registry::registry;
use support::*;
use tokio::sync::Semaphore;
use tonic::Code;

/// Two layers, the later one winning, with a bootstrap and a setuid file.
fn two_layers(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let a = dir.join("a");
    let b = dir.join("b");
    write_file(&a.join("message.txt"), "from layer a", 0o644);
    write_file(&a.join("only_a.txt"), "a", 0o600);
    write_file(&a.join("bin/suid"), "#!/bin/sh\necho hi\n", 0o4755);
    write_file(&b.join("message.txt"), "from layer b", 0o640);
    write_file(&b.join("bootstrap"), &bootstrap_fixture(), 0o700);
    std::os::unix::fs::symlink("message.txt", b.join("link.txt")).unwrap();
    (a, b)
}

/// A build with two layers yields an image holding the right RIE at 0755, one merged /opt
/// with the later layer winning and modes normalised; a repeat is cached with no engine build;
/// changing one byte rebuilds with LAYER_CHANGED; `docker rmi` behind the daemon's back is
/// noticed and the next request rebuilds.
#[tokio::test(flavor = "multi_thread")]
async fn build_contents_cache_and_invalidation() {
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_layers(dir.path());
    let (na, nb) = (unique("a"), unique("b"));
    let request = zip_request(&[(&na, &a), (&nb, &b)]);

    let first = build(&daemon.socket, request.clone()).await;
    let done = first.completed().clone();
    assert!(!done.cached);
    assert_eq!(done.reason, proto::Reason::Missing as i32);
    assert!(
        done.tag.starts_with("samcli/lambda-python:3.12-x86_64-"),
        "{}",
        done.tag
    );
    assert!(
        done.image_id.starts_with("sha256:") && done.image_id.len() == 71,
        "{}",
        done.image_id
    );
    assert_eq!(done.config.as_ref().unwrap().architecture, "amd64");
    assert!(matches!(first.events[0].event, Some(Event::Accepted(_))));
    assert!(
        first
            .events
            .iter()
            .any(|e| matches!(&e.event, Some(Event::Log(l)) if l.text.starts_with("layer 3/3 layer ") && l.text.ends_with(": sending")))
    );
    assert!(
        first
            .events
            .iter()
            .any(|e| matches!(&e.event, Some(Event::ContextProgress(p)) if p.bytes_total > 0))
    );

    let rie_sha = {
        let out = Command::new("sha256sum")
            .arg(rie_dir().join("aws-lambda-rie-x86_64"))
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    let report = run_in_image(
        &done.tag,
        "stat -c '%a %n' /var/rapid/aws-lambda-rie /opt/bootstrap /opt/message.txt /opt/only_a.txt /opt/bin/suid; \
         sha256sum /var/rapid/aws-lambda-rie; cat /opt/message.txt; echo; readlink /opt/link.txt; \
         ls /var/rapid; find / -xdev -perm -4000 -path '/opt/*'",
    );
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(
        &lines[..5],
        [
            "755 /var/rapid/aws-lambda-rie",
            "755 /opt/bootstrap",
            "644 /opt/message.txt",
            "644 /opt/only_a.txt",
            "755 /opt/bin/suid",
        ],
        "{report}"
    );
    assert!(lines[5].starts_with(&rie_sha), "the x86_64 RIE: {report}");
    assert_eq!(lines[6], "from layer b", "the later layer wins");
    assert_eq!(lines[7], "message.txt", "links inside a layer stay links");
    assert_eq!(lines[8], "aws-lambda-rie", "no second RIE: {report}");
    assert_eq!(lines.len(), 9, "no setuid file under /opt: {report}");

    // Repeat: cached, and the engine did not build.
    let since = now_stamp();
    let again = build(&daemon.socket, request.clone()).await;
    assert!(again.completed().cached);
    assert_eq!(again.completed().reason, proto::Reason::UpToDate as i32);
    assert_eq!(again.completed().image_id, done.image_id);
    docker_ok(&["image", "inspect", &again.completed().image_id]);
    assert_eq!(
        engine_builds(&done.tag, &since),
        0,
        "a cached request must not build"
    );

    // One byte changed in layer b: rebuild naming that layer, new content in the image.
    write_file(&b.join("message.txt"), "from layer B", 0o640);
    let since = now_stamp();
    let changed = build(&daemon.socket, request.clone()).await;
    let changed = changed.completed();
    assert!(!changed.cached);
    assert_eq!(changed.reason, proto::Reason::LayerChanged as i32);
    assert_eq!(changed.changed_layer, nb);
    assert_ne!(changed.image_id, done.image_id);
    assert_eq!(engine_builds(&done.tag, &since), 1);
    assert_eq!(
        run_in_image(&changed.tag, "cat /opt/message.txt"),
        "from layer B"
    );
    // The superseded image is removed (no container used it), on a task after the answer.
    until(
        "the superseded image to be removed",
        Duration::from_secs(60),
        || {
            !docker(&["image", "inspect", &done.image_id])
                .status
                .success()
        },
    )
    .await;

    // Removed behind the daemon's back: the very next request rebuilds. A "cached" answer
    // would name an image that no longer exists.
    rmi_all(&changed.tag);
    let rebuilt = build(&daemon.socket, request.clone()).await;
    let rebuilt = rebuilt.completed();
    assert!(
        !rebuilt.cached,
        "cached answer for a removed image: {rebuilt:?}"
    );
    assert_eq!(rebuilt.reason, proto::Reason::Missing as i32);
    docker_ok(&["image", "inspect", &rebuilt.tag]);
    rmi_all(&rebuilt.tag);
    daemon.stop().await;
}

/// The built image runs the function through the real RIE: an HTTP invoke on 127.0.0.1
/// returns the bootstrap's answer, including the layer's file.
#[tokio::test(flavor = "multi_thread")]
async fn end_to_end_invoke_through_the_rie() {
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("fn");
    write_file(&layer.join("bootstrap"), &bootstrap_fixture(), 0o755);
    write_file(&layer.join("message.txt"), "hello from the layer", 0o644);
    let name = unique("fn");
    let done = build(&daemon.socket, zip_request(&[(&name, &layer)]))
        .await
        .completed()
        .clone();

    let response = invoke_through_rie(&done.tag).await;
    rmi_all(&done.tag);
    assert_eq!(
        response,
        r#"{"echo":{"ping":1},"layer":"hello from the layer"}"#
    );
    daemon.stop().await;
}

/// Bad requests get the status of design §4, and the daemon keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_statuses() {
    let daemon = TestDaemon::start().await;
    let mut request = zip_request(&[]);
    request.runtime = "python2.7".into();
    let outcome = build(&daemon.socket, request).await;
    assert_eq!(outcome.status().code(), Code::InvalidArgument);
    assert!(
        outcome.status().message().contains("python3.12"),
        "{}",
        outcome.status().message()
    );

    let outcome = build(
        &daemon.socket,
        zip_request(&[("x", Path::new("/nonexistent/layer"))]),
    )
    .await;
    assert_eq!(outcome.status().code(), Code::NotFound);
    assert!(outcome.status().message().contains("/nonexistent/layer"));

    let mut request = zip_request(&[]);
    request.package_type = proto::PackageType::Image as i32;
    request.image = format!("lambda-imaged-test/{}:missing", unique("nobase"));
    request.skip_pull_image = true;
    let outcome = build(&daemon.socket, request.clone()).await;
    assert_eq!(outcome.status().code(), Code::NotFound);
    assert!(outcome.status().message().contains(&request.image));

    let mut huge = zip_request(&[]);
    huge.function_name = "f".repeat(2 << 20);
    let outcome = build(&daemon.socket, huge).await;
    assert_eq!(outcome.status().code(), Code::ResourceExhausted);
    assert!(outcome.status().message().contains("max_request_bytes"));

    // Still serving.
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("l/f"), "x", 0o644);
    let name = unique("ok");
    let ok = build(
        &daemon.socket,
        zip_request(&[(&name, &dir.path().join("l"))]),
    )
    .await;
    rmi_all(&ok.completed().tag);
    daemon.stop().await;
}

/// A load the engine itself refuses is FAILED_PRECONDITION carrying the engine's text: here
/// the base image (and so its layers, which are never sent) is removed while the build waits
/// for its slot. Resending our own layers cannot help (base layers are never sent), so the
/// engine's refusal is reported; the in-flight slot is cleared.
#[tokio::test(flavor = "multi_thread")]
async fn engine_failure_carries_the_engine_message() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write_file(&root.join("etc/base-marker"), &unique("marker"), 0o644);
    let base = format!("lambda-imaged-test/{}:vanishing", unique("base"));
    let tar = Command::new("tar")
        .args(["-C"])
        .arg(&root)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    let mut import = Command::new("docker")
        .args(["import", "-", &base])
        .env("DOCKER_HOST", engine_host())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    import.stdin.take().unwrap().write_all(&tar.stdout).unwrap();
    assert!(import.wait().unwrap().success());

    let gate = Arc::new(Semaphore::new(0));
    let hooks_gate = gate.clone();
    let daemon =
        TestDaemon::start_with(move |config| config.hooks.before_build = Some(hooks_gate)).await;
    let request = proto::BuildRequest {
        package_type: proto::PackageType::Image as i32,
        image: base.clone(),
        skip_pull_image: true,
        ..Default::default()
    };
    let pending = spawn_build(&daemon.socket, request);
    // Running: it holds its build slot, so it has inspected the base and is at the gate.
    until(
        "the build to reach its slot",
        Duration::from_secs(60),
        || first_build_running(&daemon.builds),
    )
    .await;
    // The build inspected the base and waits at the gate: take the base away, then let it go.
    docker_ok(&["rmi", "-f", &base]);
    gate.add_permits(2);
    let outcome = pending.await.unwrap();
    if let Ok(done) = &outcome.result {
        // Docker 26's containerd store keeps a removed image's blobs until its garbage
        // collector runs: the load that names them can still succeed. Then the image must be
        // whole (every blob its manifest names is there), and only there.
        let info = docker_ok(&["info", "--format", "{{json .DriverStatus}}"]);
        assert!(
            info.contains("containerd.snapshotter"),
            "the build succeeded without its base on a classic store: {done:?}"
        );
        let saved = docker(&["save", &done.tag]);
        assert!(saved.status.success(), "{done:?}: a blob is missing");
        docker_ok(&["rmi", &done.tag]);
        daemon.stop().await;
        return;
    }
    let status = outcome.status();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{}",
        status.message()
    );
    assert!(
        status.message().starts_with("the engine failed: "),
        "{}",
        status.message()
    );
    assert_eq!(daemon.builds.in_flight(), 0);
    daemon.stop().await;
}

/// With the engine unreachable, Build is UNAVAILABLE and Resolve still works.
#[tokio::test(flavor = "multi_thread")]
async fn engine_down_is_unavailable_and_resolve_still_works() {
    let dead = tempfile::tempdir().unwrap();
    let host = format!("unix://{}/nothing.sock", dead.path().display());
    let daemon = TestDaemon::start_with(|config| config.engine_host = host).await;
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("l/f"), "x", 0o644);
    let request = zip_request(&[("l", &dir.path().join("l"))]);
    let outcome = build(&daemon.socket, request.clone()).await;
    assert_eq!(
        outcome.status().code(),
        Code::Unavailable,
        "{}",
        outcome.status().message()
    );
    assert!(outcome.status().message().contains("nothing.sock"));
    let plan = daemon
        .client()
        .await
        .resolve(request)
        .await
        .unwrap()
        .into_inner();
    assert!(plan.tag.starts_with("samcli/lambda-python:3.12-x86_64-"));
    assert_eq!(daemon.builds.in_flight(), 0);
    daemon.stop().await;
}

/// An image that already has the tag but not our fingerprint label (someone else built it) is
/// not trusted: the daemon rebuilds it, with reason MISSING.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_image_under_our_tag_is_rebuilt() {
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("l/message.txt"), "ours", 0o644);
    let request = zip_request(&[(&unique("foreign"), &dir.path().join("l"))]);
    let plan = daemon
        .client()
        .await
        .resolve(request.clone())
        .await
        .unwrap()
        .into_inner();
    docker_ok(&["tag", "public.ecr.aws/lambda/python:3.12-x86_64", &plan.tag]);
    let outcome = build(&daemon.socket, request).await;
    let done = outcome.completed();
    assert!(!done.cached);
    assert_eq!(done.reason, proto::Reason::Missing as i32);
    assert_eq!(run_in_image(&done.tag, "cat /opt/message.txt"), "ours");
    rmi_all(&done.tag);
    daemon.stop().await;
}

/// A base missing from the engine is pulled before the build (never by the build itself):
/// pull progress is streamed and the image builds; a base that no registry has is NOT_FOUND
/// naming it.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_base_is_pulled_and_an_unpullable_one_is_not_found() {
    let daemon = TestDaemon::start().await;
    let image = format!("{}/lambda-imaged-test/{}:1", registry(), unique("pulled"));
    docker_ok(&["tag", "public.ecr.aws/lambda/python:3.12-x86_64", &image]);
    docker_ok(&["push", &image]);
    docker_ok(&["rmi", "--no-prune", &image]);
    assert!(!docker(&["image", "inspect", &image]).status.success());

    let request = proto::BuildRequest {
        package_type: proto::PackageType::Image as i32,
        image: image.clone(),
        skip_pull_image: false,
        ..Default::default()
    };
    let outcome = build(&daemon.socket, request.clone()).await;
    let done = outcome.completed().clone();
    assert!(
        outcome.events.iter().any(
            |e| matches!(&e.event, Some(Event::Log(l)) if l.text == format!("pulling {image}"))
        )
    );
    docker_ok(&["image", "inspect", &image]);
    let repository = image.strip_suffix(":1").unwrap();
    assert_eq!(
        done.tag,
        format!("{repository}:rapid-x86_64"),
        "registry port kept in the tag"
    );
    rmi_all(&done.tag);
    docker(&["rmi", "--no-prune", &image]);

    let missing = format!("{}/lambda-imaged-test/{}:1", registry(), unique("nowhere"));
    let request = proto::BuildRequest {
        image: missing.clone(),
        ..request
    };
    let outcome = build(&daemon.socket, request).await;
    assert_eq!(
        outcome.status().code(),
        Code::NotFound,
        "{}",
        outcome.status().message()
    );
    assert!(outcome.status().message().contains(&missing));
    daemon.stop().await;
}
