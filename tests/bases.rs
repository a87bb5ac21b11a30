//! Base image freshness against the real engine and the real `docker-registry` that
//! `scripts/test-env.sh` runs on loopback: a base pushed there is pulled through the mirror
//! prefix and used; a new base under the same tag is picked up after the TTL (reason
//! base_changed, its files in the image) and not before; an unreachable registry leaves
//! requests working from the local base with a `base_unverified` warning; concurrent requests
//! due for a check share one; concurrent requests for a missing base share one pull.
//!
//! The daemon reaches the registry through a small TCP proxy (`support/registry.rs`), which counts the
//! manifest requests that pass, and can hold them (to keep a check in flight while requests
//! arrive) or refuse connections (a registry that stopped answering).

mod support;

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lambda_imaged::client::{LayerArg, RequestBuilder, proto};
use proto::build_event::Event;
use support::registry::{Proxy, registry};
use support::*;

/// The generous bound of every poll below (a busy 2-core machine is slow, never stuck).
const DEADLINE: Duration = Duration::from_secs(45);

/// Manifest requests for `<repo>/python:3.12-x86_64` through `proxy` (see
/// [`Proxy::manifest_requests_for`]).
fn manifest_requests(proxy: &Proxy, repo: &str) -> usize {
    proxy.manifest_requests_for(&format!("{repo}/python"), "3.12-x86_64")
}

/// A base `<registry>/<repo>/python:3.12-x86_64` pushed to the real registry: the busybox
/// stand-in, plus `/marker` holding `marker` when given (a new base under the same tag).
fn push_base(repo: &str, marker: Option<&str>) {
    let name = format!("{}/{repo}/python:3.12-x86_64", registry());
    match marker {
        None => {
            docker_ok(&["tag", "public.ecr.aws/lambda/python:3.12-x86_64", &name]);
        }
        Some(marker) => {
            docker_build(
                &name,
                "FROM public.ecr.aws/lambda/python:3.12-x86_64\nCOPY marker /marker\n",
                &[("marker", marker, 0o644)],
            );
        }
    }
    docker_ok(&["push", &name]);
    // Only the daemon's pull (through the proxy) puts the base under the mirrored name.
    docker_ok(&["rmi", &name]);
}

/// A python3.12 request with one uniquely named layer (a tag of its own), pulling allowed.
fn request(layer_name: &str, layer: &Path) -> proto::BuildRequest {
    RequestBuilder::zip("python3.12")
        .layer(LayerArg::new(layer_name, layer))
        .finish()
        .unwrap()
}

/// What every test starts from: a proxy, a unique repository pushed with the stand-in base,
/// a daemon taking bases from the proxy with `ttl`, and a layer.
struct Setup {
    proxy: Proxy,
    repo: String,
    daemon: TestDaemon,
    layer_name: String,
    layer: tempfile::TempDir,
}

impl Setup {
    async fn start(ttl: Duration) -> Setup {
        let proxy = Proxy::start(registry()).await;
        let repo = unique("bases");
        push_base(&repo, None);
        let mirror = format!("{}/{repo}", proxy.addr);
        let daemon = TestDaemon::start_with(|config| {
            config.base_check_ttl = ttl;
            config.base_image_mirror = Some(mirror);
        })
        .await;
        let layer = tempfile::tempdir().unwrap();
        write_file(&layer.path().join("python/m.py"), "x = 1\n", 0o644);
        Setup {
            proxy,
            repo,
            daemon,
            layer_name: unique("layer"),
            layer,
        }
    }

    async fn build(&self) -> Outcome {
        build(
            &self.daemon.socket,
            request(&self.layer_name, self.layer.path()),
        )
        .await
    }

    fn mirrored_base(&self) -> String {
        format!("{}/{}/python:3.12-x86_64", self.proxy.addr, self.repo)
    }

    async fn finish(self, tag: &str) {
        let base = self.mirrored_base();
        self.daemon.stop().await;
        let _ = docker(&["rmi", tag]);
        let _ = docker(&["rmi", &base]);
    }
}

/// The first request pulls the base through the mirror; a new base pushed under the same tag
/// is not looked at before the TTL (1 h here): no registry request, no rebuild, no warning.
#[tokio::test]
async fn a_pulled_base_is_used_and_not_checked_before_the_ttl() {
    let setup = Setup::start(Duration::from_secs(3600)).await;
    // Resolve shows the mirrored base; the tag is SAM's.
    let plan = lambda_imaged::client::Client::connect(&setup.daemon.socket)
        .await
        .unwrap()
        .resolve(RequestBuilder::zip("python3.12").finish().unwrap())
        .await
        .unwrap();
    assert_eq!(plan.base_image, setup.mirrored_base());
    assert_eq!(plan.tag, "public.ecr.aws/lambda/python:3.12-rapid-x86_64");
    let first = setup.build().await;
    let done = first.completed().clone();
    assert_eq!(done.reason, proto::Reason::Missing as i32);
    let pulled = manifest_requests(&setup.proxy, &setup.repo);
    assert!(pulled >= 1, "the base was pulled through the mirror");
    let base_id = docker_ok(&["image", "inspect", "-f", "{{.Id}}", &setup.mirrored_base()]);
    assert!(!base_id.trim().is_empty());
    let pulling = format!("pulling {}", setup.mirrored_base());
    assert!(
        first
            .events
            .iter()
            .any(|e| matches!(&e.event, Some(Event::Log(log)) if log.text == pulling)),
        "the pull is reported: {first:?}"
    );

    push_base(&setup.repo, Some("new"));
    for _ in 0..3 {
        let again = setup.build().await;
        assert_eq!(again.completed().reason, proto::Reason::UpToDate as i32);
        assert!(
            warnings_with_code(&again, "base_unverified").is_empty(),
            "{again:?}"
        );
    }
    assert_eq!(
        manifest_requests(&setup.proxy, &setup.repo),
        pulled,
        "no registry request before the TTL"
    );
    setup.finish(&done.tag).await;
}

/// After the TTL (1 s), requests are answered at once from the local base (with a
/// base_unverified warning while the check is due) and the base is checked in the background;
/// once the new base is pulled, the next request rebuilds with base_changed and the new base's
/// file is in the image.
#[tokio::test]
async fn a_new_base_is_picked_up_after_the_ttl() {
    let setup = Setup::start(Duration::from_secs(1)).await;
    let first = setup.build().await.completed().clone();
    push_base(&setup.repo, Some("second base"));
    let saw_unverified = &AtomicBool::new(false);
    let changed = &Mutex::new(None);
    let setup_ref = &setup;
    until_async("a base_changed rebuild", DEADLINE, || async move {
        let outcome = setup_ref.build().await;
        if !warnings_with_code(&outcome, "base_unverified").is_empty() {
            saw_unverified.store(true, Ordering::SeqCst);
        }
        let done = outcome.completed().clone();
        if done.reason == proto::Reason::BaseChanged as i32 {
            *changed.lock().unwrap() = Some(done);
            return true;
        }
        assert_eq!(done.reason, proto::Reason::UpToDate as i32, "{done:?}");
        false
    })
    .await;
    let saw_unverified = saw_unverified.load(Ordering::SeqCst);
    let changed = changed
        .lock()
        .unwrap()
        .take()
        .expect("until returned on it");
    assert!(
        saw_unverified,
        "a request served while the check was due says so"
    );
    assert_eq!(changed.tag, first.tag);
    assert_ne!(changed.image_id, first.image_id);
    assert_eq!(run_in_image(&changed.tag, "cat /marker"), "second base");
    setup.finish(&changed.tag).await;
}

/// A registry that stopped answering: every request still succeeds from the local base, and
/// once the failed check is in, the warning names the registry's error.
#[tokio::test]
async fn an_unreachable_registry_leaves_the_local_base_in_use() {
    let setup = Setup::start(Duration::from_secs(1)).await;
    let first = setup.build().await.completed().clone();
    setup.proxy.refuse.store(true, Ordering::SeqCst);
    let message = &Mutex::new(None);
    let (setup_ref, first_ref) = (&setup, &first);
    until_async(
        "a warning naming the failed check",
        DEADLINE,
        || async move {
            let outcome = setup_ref.build().await;
            let done = outcome.completed();
            assert_eq!(done.reason, proto::Reason::UpToDate as i32, "{done:?}");
            assert_eq!(done.image_id, first_ref.image_id);
            let unverified = warnings_with_code(&outcome, "base_unverified");
            assert!(
                unverified.len() <= 1,
                "one warning per request: {unverified:?}"
            );
            let found = unverified
                .into_iter()
                .find(|m| m.contains("could not be checked"));
            let done = found.is_some();
            *message.lock().unwrap() = found;
            done
        },
    )
    .await;
    let message = message
        .lock()
        .unwrap()
        .take()
        .expect("until returned on it");
    assert!(message.contains(&setup.mirrored_base()), "{message}");
    setup.finish(&first.tag).await;
}

/// 20 concurrent requests, all due for a check (TTL 0) while the registry holds the first
/// check: all are answered from the local base without waiting, and the registry sees the
/// manifest requests of exactly one check.
#[tokio::test]
async fn concurrent_due_requests_share_one_check() {
    let setup = Setup::start(Duration::ZERO).await;
    let first = setup.build().await.completed().clone();
    let before = manifest_requests(&setup.proxy, &setup.repo);
    setup.proxy.open.send_replace(false);
    let handles: Vec<_> = (0..20)
        .map(|_| {
            spawn_build(
                &setup.daemon.socket,
                request(&setup.layer_name, setup.layer.path()),
            )
        })
        .collect();
    for handle in handles {
        let outcome = handle.await.unwrap();
        let done = outcome.completed();
        assert_eq!(done.image_id, first.image_id);
        assert_eq!(
            warnings_with_code(&outcome, "base_unverified").len(),
            1,
            "{outcome:?}"
        );
    }
    // Every request has its answer while the check is still held at the proxy.
    until("the check to reach the registry", DEADLINE, || {
        setup.proxy.held.load(Ordering::SeqCst) > 0
    })
    .await;
    setup.proxy.open.send_replace(true);
    until("the held check to complete", DEADLINE, || {
        manifest_requests(&setup.proxy, &setup.repo) != before
    })
    .await;
    // The 20 requests above started exactly one check. (A request after it completes would
    // start the next one: the TTL is 0.)
    assert_eq!(manifest_requests(&setup.proxy, &setup.repo) - before, 1);
    setup.finish(&first.tag).await;
}

/// Podman's service has no distribution API: after its one answer (404), the base counts as
/// current: no more base_unverified warnings and no rebuild, however many requests come, even
/// with a TTL of 0.
#[tokio::test(flavor = "multi_thread")]
async fn an_engine_without_the_distribution_api_counts_the_base_as_current() {
    let podman = support::podman::Podman::start();
    podman.load_from_docker("public.ecr.aws/lambda/python:3.12-x86_64");
    let host = format!("unix://{}", podman.socket().display());
    let daemon = TestDaemon::start_with(|config| {
        config.engine_host = host;
        config.base_check_ttl = Duration::ZERO;
    })
    .await;
    let layer = tempfile::tempdir().unwrap();
    write_file(&layer.path().join("python/m.py"), "x = 1\n", 0o644);
    let name = unique("podman");
    let first = build(&daemon.socket, request(&name, layer.path())).await;
    let first = first.completed().clone();
    assert_eq!(first.reason, proto::Reason::Missing as i32);
    // The first request found the check due and started it; poll until it has answered.
    let (socket, name_ref, path, first_ref) = (&daemon.socket, &name, layer.path(), &first);
    until_async(
        "the base to be verified on Podman",
        DEADLINE,
        || async move {
            let outcome = build(socket, request(name_ref, path)).await;
            assert_eq!(outcome.completed().image_id, first_ref.image_id);
            warnings_with_code(&outcome, "base_unverified").is_empty()
        },
    )
    .await;
    for _ in 0..3 {
        let outcome = build(&daemon.socket, request(&name, layer.path())).await;
        let done = outcome.completed();
        assert_eq!(done.reason, proto::Reason::UpToDate as i32, "{done:?}");
        assert!(
            warnings_with_code(&outcome, "base_unverified").is_empty(),
            "{outcome:?}"
        );
    }
    daemon.stop().await;
}

/// 20 concurrent requests with different tags whose base is missing share one pull: each is
/// told it started or joined the pull, every one completes on the same base, and the registry
/// sees the manifest request of one pull.
#[tokio::test]
async fn concurrent_requests_for_a_missing_base_share_one_pull() {
    let setup = Setup::start(Duration::from_secs(3600)).await;
    // Hold the registry until every request has reached the pull.
    setup.proxy.open.send_replace(false);
    let (reached, mut reached_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let pulling = format!("pulling {}", setup.mirrored_base());
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let (socket, reached, pulling) = (
                setup.daemon.socket.clone(),
                reached.clone(),
                pulling.clone(),
            );
            let request = request(&unique("layer"), setup.layer.path());
            tokio::spawn(async move {
                let mut client = lambda_imaged::client::Client::connect(&socket)
                    .await
                    .unwrap();
                client
                    .build_with(request, |event| match &event.event {
                        Some(Event::Log(log)) if log.text.starts_with(&pulling) => {
                            let _ = reached.send(log.text.clone());
                        }
                        _ => {}
                    })
                    .await
            })
        })
        .collect();
    let mut texts = Vec::new();
    while texts.len() < 20 {
        let text = tokio::time::timeout(DEADLINE, reached_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} requests reached the pull", texts.len()))
            .unwrap();
        texts.push(text);
    }
    assert_eq!(
        texts.iter().filter(|t| **t == pulling).count(),
        1,
        "one request started the pull, the others joined it: {texts:?}"
    );
    setup.proxy.open.send_replace(true);
    let mut tags = Vec::new();
    for handle in handles {
        let done = handle.await.unwrap().expect("the build succeeds");
        assert_eq!(done.reason, proto::Reason::Missing as i32);
        tags.push(done.tag);
    }
    assert_eq!(
        manifest_requests(&setup.proxy, &setup.repo),
        1,
        "the registry saw one pull"
    );
    for tag in &tags[1..] {
        let _ = docker(&["rmi", tag]);
    }
    setup.finish(&tags[0]).await;
}
