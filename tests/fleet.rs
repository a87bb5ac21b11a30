//! A fleet sharing its images through a registry (`--registry-cache`), on real parts: two
//! private engines on this machine (the main test engine and a second one, see
//! `support/dockerd.rs`), the real `docker-registry` on loopback that `scripts/test-env.sh`
//! runs, and two daemons: A on the main engine, B on the second.
//!
//! What is proved: A builds and pushes; B, asked for the same function, pulls instead of
//! building (REGISTRY_HIT, no engine build, the same image and `/opt`); a layer changed on B
//! is built there as a delta, which is not pushed; an image under the cache tag that is not
//! what the request builds (a changed `/opt` file, a changed config field) is refused, removed
//! and built locally, and the genuine image pushed back; a push finishes at SIGTERM, or is
//! named as cut off when held past the shutdown timeout; an unreachable registry leaves both
//! building locally with a warning; ten concurrent requests on B share one lookup and one
//! pull (counted at a proxy in front of the registry); a registry that needs basic auth is
//! used with credentials from the docker config file named by DOCKER_CONFIG (real daemon
//! processes for that one, so the variable is theirs alone).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use lambda_imaged::client::proto;
use lambda_imaged::config::RegistryCachePolicy as Policy;
use proto::build_event::Event;
use support::daemon::Daemon;
use support::dockerd::{SecondEngine, docker_at_ok, second_engine, throttled};
use support::registry::{
    Proxy, cache_reference, http_status, manifest_status, push_of, pushed, registry,
};
use support::tree::{assert_same, image_opt, image_tree_at};
use support::*;

/// The generous bound of every poll below (a push of a small image on a busy 2-core machine
/// takes seconds, never minutes).
const DEADLINE: Duration = Duration::from_secs(180);

/// The stand-in base every request here uses (`skip_pull_image`), copied into engine B.
const BASE: &str = "public.ecr.aws/lambda/python:3.12-x86_64";

/// A daemon using `cache` as its registry cache, on the main engine or on `engine`, looking
/// up every image (`--registry-cache-policy always`: the tests' layers are small, so `auto`
/// would build them).
async fn daemon(cache: &str, engine: Option<&SecondEngine>) -> TestDaemon {
    daemon_with(cache, engine.map(|e| e.host.clone()), Policy::Always).await
}

/// A daemon using `cache` with `policy`, on the main engine or on the one at `host`.
async fn daemon_with(cache: &str, host: Option<String>, policy: Policy) -> TestDaemon {
    let cache = cache.to_owned();
    TestDaemon::start_with(move |config| {
        config.registry_cache = Some(cache);
        config.registry_cache_policy = policy;
        if let Some(host) = host {
            config.engine_host = host;
        }
    })
    .await
}

/// The registry cache series of `daemon`'s metrics (what `GET /metrics` serves):
/// (hits, misses, push failures).
fn registry_metrics(daemon: &TestDaemon) -> (u64, u64, u64) {
    let all = registry_series(daemon);
    (all[0], all[1], all[2])
}

/// Images under the cache tag `daemon` refused (`registry_cache_mismatches_total`).
fn mismatches(daemon: &TestDaemon) -> u64 {
    registry_series(daemon)[3]
}

/// Hits, misses, push failures and mismatches, as `GET /metrics` serves them.
fn registry_series(daemon: &TestDaemon) -> [u64; 4] {
    let text = daemon.builds.metrics().render();
    let value = |series: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    [
        value("lambda_imaged_registry_cache_hits_total"),
        value("lambda_imaged_registry_cache_misses_total"),
        value("lambda_imaged_registry_cache_push_failures_total"),
        value("lambda_imaged_registry_cache_mismatches_total"),
    ]
}

/// A function whose one layer others may read, in a temp dir: (the dir, the layer, the
/// request), its file's content starting with `prefix`.
fn function(prefix: &str) -> (tempfile::TempDir, PathBuf, proto::BuildRequest) {
    let dir = tempfile::tempdir().unwrap();
    let layer = shared_layer(dir.path(), &format!("x = '{}'\n", unique(prefix)));
    let request = zip_request(&[(&unique("deps"), &layer)]);
    (dir, layer, request)
}

/// Two daemons sharing `cache`: A on the main engine, B on a second one holding the base.
struct Fleet {
    engine_b: SecondEngine,
    a: TestDaemon,
    b: TestDaemon,
}

async fn fleet(cache: &str) -> Fleet {
    let engine_b = second_engine(&[BASE]);
    let a = daemon(cache, None).await;
    let b = daemon(cache, Some(&engine_b)).await;
    Fleet { engine_b, a, b }
}

/// A layer others may read (so its image may be shared): `python/mod.py` holding `content`.
fn shared_layer(root: &Path, content: &str) -> PathBuf {
    let layer = root.join("layer");
    std::fs::create_dir_all(layer.join("python")).unwrap();
    for dir in [root, &layer, &layer.join("python")] {
        set_mode(dir, 0o755);
    }
    write_file(&layer.join("python/mod.py"), content, 0o644);
    layer
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn engine_builds(daemon: &TestDaemon) -> u64 {
    daemon
        .builds
        .stats
        .engine_builds
        .load(std::sync::atomic::Ordering::SeqCst)
}

fn warnings(outcome: &Outcome) -> Vec<String> {
    outcome
        .events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Warning(w)) => Some(w.code.clone()),
            _ => None,
        })
        .collect()
}

/// A builds and pushes; B pulls the same image instead of building it (REGISTRY_HIT, pull
/// progress, no engine build, the same image id and /opt); a layer changed on B is built there
/// (a delta over the pulled image) and not pushed, so A builds that one itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_builds_each_image_once() {
    let cache = format!("{}/{}", registry(), unique("fleet-"));
    let Fleet { engine_b, a, b } = fleet(&cache).await;
    let (_dir, layer, request) = function("v1-");

    let built = build(&a.socket, request.clone()).await.completed().clone();
    assert_eq!(built.reason, proto::Reason::Missing as i32);
    let reference = cache_reference(&engine_host(), &built.tag, &cache);
    pushed(&a.socket, &reference).await;

    let hit = build(&b.socket, request.clone()).await;
    let pulled = hit.completed();
    assert_eq!(pulled.reason, proto::Reason::RegistryHit as i32, "{hit:?}");
    assert!(!pulled.cached);
    assert_eq!(engine_builds(&b), 0, "B built instead of pulling");
    assert_eq!(
        pulled.image_id, built.image_id,
        "the same image on both engines"
    );
    assert!(
        hit.events
            .iter()
            .any(|e| matches!(&e.event, Some(Event::PullProgress(p)) if p.image == reference)),
        "no pull progress of {reference}"
    );
    assert_same(
        "B's /opt",
        &image_tree_at(&engine_b.host, &pulled.tag, "opt"),
        &image_opt(&built.tag),
    );
    // B keeps the pulled image's listing with the layer sizes A recorded when it built it
    // (prune counts it by layer, as A does).
    let layer_bytes = |daemon: &TestDaemon| -> serde_json::Value {
        let name = format!("{}.json", built.image_id.trim_start_matches("sha256:"));
        let path = daemon.dir.path().join("cache/images").join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("no listing at {}: {err}", path.display()));
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["layer_bytes"].clone()
    };
    assert_eq!(layer_bytes(&b), layer_bytes(&a));
    assert_eq!(
        layer_bytes(&a).as_array().map(Vec::len),
        Some(2),
        "RIE + one layer"
    );
    // Only SAM's tag names the pulled image on B.
    let tags = docker_at_ok(
        &engine_b.host,
        &["image", "inspect", "--format", "{{.RepoTags}}", &pulled.tag],
    );
    assert!(!tags.contains(&cache), "{tags}");

    write_file(
        &layer.join("python/mod.py"),
        &format!("x = '{}'\n", unique("v2-")),
        0o644,
    );
    let edit = build(&b.socket, request.clone()).await;
    let rebuilt = edit.completed().clone();
    assert_eq!(rebuilt.reason, proto::Reason::LayerChanged as i32);
    assert_eq!(engine_builds(&b), 1);
    // B knows the pulled image's /opt (its fingerprint covers the tree): the edit is a delta
    // over it, as after a local build.
    assert!(
        edit.events
            .iter()
            .any(|e| matches!(&e.event, Some(Event::Log(l)) if l.text.contains("delta 1/"))),
        "the edit after a registry hit was not a delta: {edit:?}"
    );
    // A delta is not pushed (a peer could not check it against its files): A, asked for the
    // edited function, finds nothing and builds it itself.
    let before = engine_builds(&a);
    let local = build(&a.socket, request).await.completed().clone();
    assert_eq!(local.reason, proto::Reason::LayerChanged as i32);
    assert_eq!(local.image_id, rebuilt.image_id, "{local:?}");
    assert_eq!(engine_builds(&a), before + 1, "A pulled B's delta");
    // A: two misses (its first build, the edit); B: a hit, then a miss (the changed layer).
    assert_eq!(
        registry_metrics(&a),
        (0, 2, 0),
        "A's hits, misses, push failures"
    );
    assert_eq!(
        registry_metrics(&b),
        (1, 1, 0),
        "B's hits, misses, push failures"
    );
    a.stop().await;
    b.stop().await;
}

/// A registry cache that does not answer (a closed port) leaves both daemons building
/// locally: the build succeeds with a `registry_cache_unavailable` warning, and the
/// background push fails in ListBuilds, not in the client's stream.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_registry_leaves_builds_local() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cache = format!("{}/fleet", closed.local_addr().unwrap());
    drop(closed);
    let Fleet { engine_b, a, b } = fleet(&cache).await;
    let (_dir, _, request) = function("down-");
    for (daemon, host) in [(&a, engine_host()), (&b, engine_b.host.clone())] {
        let outcome = build(&daemon.socket, request.clone()).await;
        let done = outcome.completed();
        assert_eq!(done.reason, proto::Reason::Missing as i32);
        assert_eq!(engine_builds(daemon), 1);
        assert!(
            warnings(&outcome).contains(&"registry_cache_unavailable".to_owned()),
            "{:?}",
            warnings(&outcome)
        );
        let reference = cache_reference(&host, &done.tag, &cache);
        let push = push_of(&daemon.socket, &reference).await;
        assert_eq!(push.state, proto::BuildState::Failed as i32);
        assert!(!push.error.is_empty());
        // The lookup failed (neither hit nor miss); the push failure is counted.
        assert_eq!(registry_metrics(daemon), (0, 0, 1));
    }
    a.stop().await;
    b.stop().await;
}

/// Ten concurrent requests for one function on B share one registry lookup and one pull:
/// the manifest is asked for by its tag twice in all (the lookup, then the pull), the image
/// config blob twice (the engine's distribution API reads it to report the platform, then
/// the pull), no blob is fetched twice, and no request builds.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_share_one_lookup_and_one_pull() {
    let proxy = Proxy::start(registry()).await;
    let repo = unique("fleet-");
    let cache = format!("{}/{repo}", proxy.addr);
    let Fleet {
        engine_b: _engine_b,
        a,
        b,
    } = fleet(&cache).await;
    let (_dir, _, request) = function("ten-");
    let built = build(&a.socket, request.clone()).await.completed().clone();
    let reference = cache_reference(&engine_host(), &built.tag, &cache);
    pushed(&a.socket, &reference).await;
    let fingerprint_tag = reference.rsplit(':').next().unwrap().to_owned();
    let by_tag = format!(" /v2/{repo}/manifests/{fingerprint_tag} ");
    let config_blob = format!(
        " /v2/{repo}/blobs/{} ",
        docker_at_ok(
            &engine_host(),
            &["image", "inspect", "--format", "{{.Id}}", &built.tag]
        )
        .trim()
    );
    let (tags_before, configs_before) = (
        proxy.requests(&by_tag).len(),
        proxy
            .requests(&config_blob)
            .iter()
            .filter(|l| l.starts_with("GET "))
            .count(),
    );

    let clients: Vec<_> = (0..10)
        .map(|_| spawn_build(&b.socket, request.clone()))
        .collect();
    for client in clients {
        let done = client.await.unwrap().completed().clone();
        assert_eq!(done.reason, proto::Reason::RegistryHit as i32);
        assert_eq!(done.image_id, built.image_id);
    }
    assert_eq!(engine_builds(&b), 0);
    let lookups_and_pulls = proxy.requests(&by_tag).len() - tags_before;
    let config_gets = proxy
        .requests(&config_blob)
        .iter()
        .filter(|l| l.starts_with("GET "))
        .count()
        - configs_before;
    let blob_gets: Vec<String> = proxy
        .requests(&format!(" /v2/{repo}/blobs/"))
        .into_iter()
        .filter(|l| l.starts_with("GET ") && !l.contains(&config_blob))
        .collect();
    let distinct: std::collections::BTreeSet<&String> = blob_gets.iter().collect();
    assert_eq!(
        distinct.len(),
        blob_gets.len(),
        "a layer was pulled twice: {blob_gets:?}"
    );
    assert_eq!(
        lookups_and_pulls,
        2,
        "manifest requests by tag: {:?}",
        proxy.requests(&by_tag)
    );
    assert_eq!(
        config_gets, 2,
        "the image config was read {config_gets} times"
    );
    a.stop().await;
    b.stop().await;
}

/// A `docker-registry` started here on a free loopback port, requiring basic auth (htpasswd
/// with a bcrypt line for `user`); stopped on drop.
struct AuthRegistry {
    addr: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl AuthRegistry {
    async fn start(user: &str, password: &str) -> AuthRegistry {
        let dir = tempfile::tempdir().unwrap();
        let hash = bcrypt::hash(password, 4).unwrap();
        std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\nauth:\n  htpasswd:\n    realm: fleet\n    path: {}\n",
            dir.path().join("data").display(),
            dir.path().join("htpasswd").display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry runs (installed by scripts/test-env.sh)");
        let mut registry = AuthRegistry {
            addr,
            child,
            _dir: dir,
        };
        let what = format!("the auth registry on {} to answer 401", registry.addr);
        until_async(what, DEADLINE, || {
            if let Ok(Some(status)) = registry.child.try_wait() {
                let log = std::fs::read_to_string(registry._dir.path().join("log"));
                panic!("docker-registry exited ({status}): {log:?}");
            }
            let addr = registry.addr.clone();
            async move { anonymous_status(&addr).await == Some(401) }
        })
        .await;
        registry
    }
}

/// The HTTP status of an anonymous `GET /v2/` (None while nothing answers).
async fn anonymous_status(addr: &str) -> Option<u16> {
    http_status(addr, "/v2/", "").await
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real daemon binary, run with `--registry-cache cache` on the engine at `host`, with
/// `DOCKER_CONFIG` set to `docker_config`.
async fn daemon_process(host: &str, cache: &str, docker_config: &Path) -> Daemon {
    Daemon::builder()
        .engine(host)
        .args([
            "--registry-cache",
            cache,
            "--registry-cache-policy",
            "always",
        ])
        .env("DOCKER_CONFIG", docker_config)
        .start()
        .await
}

/// A registry that needs basic auth: a daemon without credentials is refused (it builds
/// locally, with a warning); daemons given a docker config file through DOCKER_CONFIG (`auths`
/// with a base64 `auth`) push to it and pull from it.
#[tokio::test(flavor = "multi_thread")]
async fn a_registry_with_basic_auth_takes_credentials_from_the_docker_config() {
    let engine_b = second_engine(&[BASE]);
    let password = unique("pw-");
    let registry = AuthRegistry::start("fleet", &password).await;
    let cache = format!("{}/{}", registry.addr, unique("fleet-"));
    let config_dir = tempfile::tempdir().unwrap();
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("fleet:{password}"),
    );
    std::fs::write(
        config_dir.path().join("config.json"),
        format!(
            "{{\"auths\": {{\"{}\": {{\"auth\": \"{auth}\"}}}}}}",
            registry.addr
        ),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layer = shared_layer(dir.path(), &format!("x = '{}'\n", unique("auth-")));

    // No credentials (this process has no DOCKER_CONFIG, and root no ~/.docker).
    let anonymous = daemon(&cache, None).await;
    let refused = build(&anonymous.socket, zip_request(&[(&unique("anon"), &layer)])).await;
    assert_eq!(refused.completed().reason, proto::Reason::Missing as i32);
    assert!(
        warnings(&refused).contains(&"registry_cache_unavailable".to_owned()),
        "{:?}",
        warnings(&refused)
    );
    anonymous.stop().await;

    let request = zip_request(&[(&unique("deps"), &layer)]);
    let b = daemon_process(&engine_b.host, &cache, config_dir.path()).await;
    let built = b.client().await.build(request.clone()).await;
    let built = built.completed().clone();
    assert_eq!(built.reason, proto::Reason::Missing as i32);
    let reference = cache_reference(&engine_b.host, &built.tag, &cache);
    let push = push_of(b.socket(), &reference).await;
    assert_eq!(
        push.state,
        proto::BuildState::Succeeded as i32,
        "{}",
        push.error
    );

    let a = daemon_process(&engine_host(), &cache, config_dir.path()).await;
    let mut client = a.client().await;
    let hit = client.build(request).await;
    assert_eq!(
        hit.completed().reason,
        proto::Reason::RegistryHit as i32,
        "{hit:?}"
    );
    assert_eq!(hit.completed().image_id, built.image_id);
    let stats = client.info().await.unwrap().stats.unwrap();
    assert_eq!(stats.engine_builds, 0, "A built instead of pulling");
}

/// Pushes `image` (built on the main engine) to the registry as `reference`, then removes
/// that name from the main engine.
fn push_as(image: &str, reference: &str) {
    docker_ok(&["tag", image, reference]);
    docker_ok(&["push", reference]);
    docker_ok(&["rmi", reference]);
}

/// A pushes the genuine image; then someone who can write to the repository replaces it with
/// an image built `FROM` it (so its labels, fingerprint included, are the genuine ones)
/// changed by `dockerfile_tail`. B refuses it (a `registry_cache_mismatch` warning naming the
/// reference and `named`, counted), removes it, builds locally with A's `/opt`, and pushes the
/// genuine image back, which B then pulls and adopts.
async fn a_forged_image_is_refused(
    dockerfile_tail: &str,
    files: &[(&str, &str, u32)],
    named: &str,
) {
    let cache = format!("{}/{}", registry(), unique("forged-"));
    let Fleet { engine_b, a, b } = fleet(&cache).await;
    let (_dir, _, request) = function("genuine-");
    let built = build(&a.socket, request.clone()).await.completed().clone();
    let reference = cache_reference(&engine_host(), &built.tag, &cache);
    pushed(&a.socket, &reference).await;

    let forged = unique("forged-image:");
    docker_build(
        &forged,
        &format!("FROM {}\n{dockerfile_tail}", built.tag),
        files,
    );
    let forged_id = docker_ok(&["image", "inspect", "--format", "{{.Id}}", &forged]);
    push_as(&forged, &reference);
    docker_ok(&["rmi", &forged]);

    let refused = build(&b.socket, request.clone()).await;
    let done = refused.completed().clone();
    assert_eq!(done.reason, proto::Reason::Missing as i32, "{refused:?}");
    let warned = warnings_with_code(&refused, "registry_cache_mismatch");
    assert!(
        warned.len() == 1 && warned[0].contains(&reference) && warned[0].contains(named),
        "{warned:?}"
    );
    assert_eq!(engine_builds(&b), 1, "B adopted the forged image");
    assert_eq!(done.image_id, built.image_id, "B built the genuine image");
    assert_same(
        "B's /opt",
        &image_tree_at(&engine_b.host, &done.tag, "opt"),
        &image_opt(&built.tag),
    );
    assert!(
        !docker_on(&engine_b.host, &["image", "inspect", forged_id.trim()])
            .status
            .success(),
        "the forged image stayed on B"
    );
    assert_eq!(mismatches(&b), 1);
    assert_eq!(registry_metrics(&b).0, 0, "a refused image is no hit");

    // B pushed the genuine image back: B itself, without the image, now pulls and adopts it.
    pushed(&b.socket, &reference).await;
    docker_ok_on(&engine_b.host, &["rmi", &done.tag]);
    let hit = pulled_as(&b, request, &built).await;
    assert!(warnings_with_code(&hit, "registry_cache_mismatch").is_empty());
    assert_eq!((registry_metrics(&b).0, mismatches(&b)), (1, 1));
    a.stop().await;
    b.stop().await;
}

/// A forged image whose `/opt` holds a changed file (an extra layer over the genuine image's)
/// is refused, naming the layer above the expected ones.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_with_a_changed_opt_file_is_refused() {
    let evil = [("mod.py", "x = 'forged'\n", 0o644)];
    a_forged_image_is_refused("COPY mod.py /opt/python/mod.py\n", &evil, "layer 4 (").await;
}

/// A forged image with the genuine layers but a changed config field (an `ENV` line, which
/// adds no layer) is refused, naming the field.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_with_a_changed_config_field_is_refused() {
    a_forged_image_is_refused("ENV PYTHONPATH=/tmp/forged\n", &[], "config Env is").await;
}

/// SIGTERM right after a build: the daemon finishes the build's push within the shutdown
/// timeout before it exits, and the image is in the registry afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn a_push_in_flight_at_sigterm_is_finished() {
    let repository = unique("sigterm-");
    let cache = format!("{}/{repository}", registry());
    let mut daemon = Daemon::builder()
        .args(["--registry-cache", &cache, "--shutdown-timeout", "120s"])
        .start()
        .await;
    let (_dir, _, request) = function("term-");
    let built = daemon
        .client()
        .await
        .build(request)
        .await
        .completed()
        .clone();
    daemon.terminate();
    let status = daemon.wait_exit(DEADLINE).await;
    assert!(status.success(), "{status}; its log:\n{}", daemon.log());
    let reference = cache_reference(&engine_host(), &built.tag, &cache);
    let fp_tag = reference.rsplit(':').next().unwrap();
    assert_eq!(
        manifest_status(&registry(), &repository, fp_tag).await,
        Some(200),
        "not in the registry after the shutdown; the daemon's log:\n{}",
        daemon.log()
    );
    assert!(!daemon.log().contains("cut off"), "{}", daemon.log());
}

/// A push held at its gate past `--shutdown-timeout` is cut off, and the drain names it (the
/// names it logs).
#[tokio::test(flavor = "multi_thread")]
async fn a_push_held_past_the_shutdown_timeout_is_named_as_cut_off() {
    let cache = format!("{}/{}", registry(), unique("cutoff-"));
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let (held, configured) = (gate.clone(), cache.clone());
    let daemon = TestDaemon::start_with(move |config| {
        config.registry_cache = Some(configured);
        config.shutdown_timeout = Duration::from_secs(2);
        config.hooks.before_push = Some(held);
    })
    .await;
    let (_dir, _, request) = function("held-");
    let built = build(&daemon.socket, request).await.completed().clone();
    let reference = cache_reference(&engine_host(), &built.tag, &cache);
    let what = format!("the push of {reference} to reach its gate");
    let builds = daemon.builds.clone();
    until(what, DEADLINE, || {
        builds.list().0.iter().any(|s| s.tag == reference)
    })
    .await;
    let tasks = daemon.tasks.clone();
    daemon.stop().await;
    let name = format!("registry-cache push of {reference}");
    assert!(tasks.cut_off().contains(&name), "{:?}", tasks.cut_off());
    gate.add_permits(1);
}

/// `request` built on `a` (the main engine), once its push to `cache` succeeded.
async fn built_and_pushed(
    a: &TestDaemon,
    cache: &str,
    request: proto::BuildRequest,
) -> proto::Completed {
    let built = build(&a.socket, request).await.completed().clone();
    pushed(
        &a.socket,
        &cache_reference(&engine_host(), &built.tag, cache),
    )
    .await;
    built
}

/// `request` answered on `b` as a REGISTRY_HIT of the image `built`; the outcome.
async fn pulled_as(
    b: &TestDaemon,
    request: proto::BuildRequest,
    built: &proto::Completed,
) -> Outcome {
    let hit = build(&b.socket, request).await;
    let done = hit.completed();
    assert_eq!(done.reason, proto::Reason::RegistryHit as i32, "{hit:?}");
    assert_eq!(done.image_id, built.image_id);
    hit
}

/// The status lines of `outcome` that say whether the registry cache was looked in.
fn policy_lines(outcome: &Outcome) -> Vec<String> {
    outcome
        .events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Log(l)) if l.text.starts_with("registry cache") => Some(l.text.clone()),
            _ => None,
        })
        .collect()
}

/// True when `outcome` reports pulling anything.
fn pulled_anything(outcome: &Outcome) -> bool {
    outcome
        .events
        .iter()
        .any(|e| matches!(&e.event, Some(Event::PullProgress(_))))
}

/// Under `auto`, a runner with the files and an engine on a local socket builds a small image
/// rather than pull it, though the registry has it: no lookup, no pull, and the events say
/// why.
#[tokio::test(flavor = "multi_thread")]
async fn auto_builds_when_building_is_cheaper() {
    let cache = format!("{}/{}", registry(), unique("auto-local-"));
    let engine_b = second_engine(&[BASE]);
    let a = daemon(&cache, None).await;
    let b = daemon_with(&cache, Some(engine_b.host.clone()), Policy::Auto).await;
    let (_dir, _, request) = function("cheap-");
    built_and_pushed(&a, &cache, request.clone()).await;

    let local = build(&b.socket, request).await;
    assert_eq!(local.completed().reason, proto::Reason::Missing as i32);
    assert_eq!(engine_builds(&b), 1);
    assert!(!pulled_anything(&local), "{local:?}");
    let lines = policy_lines(&local);
    assert!(
        lines.len() == 1 && lines[0].starts_with("registry cache skipped: local build of"),
        "{lines:?}"
    );
    assert_eq!(registry_metrics(&b), (0, 0, 0), "B looked the image up");
    a.stop().await;
    b.stop().await;
}

/// A function whose layer holds `bytes` of incompressible content besides `mod.py`.
fn heavy_function(prefix: &str, bytes: usize) -> (tempfile::TempDir, proto::BuildRequest) {
    let (dir, layer, _) = function(prefix);
    let blob = layer.join("python/blob.bin");
    std::fs::write(&blob, noise(bytes, bytes as u64 ^ 0x5eed)).unwrap();
    set_mode(&blob, 0o644);
    let request = zip_request(&[(&unique("heavy"), &layer)]);
    (dir, request)
}

/// Under `auto`, a runner whose engine is behind a slow link (4 MB/s, measured by its own
/// first build) pulls what the registry has instead of sending it: a REGISTRY_HIT, and the
/// events say why.
#[tokio::test(flavor = "multi_thread")]
async fn auto_pulls_when_the_engine_is_behind_a_slow_link() {
    let cache = format!("{}/{}", registry(), unique("auto-slow-"));
    let engine_b = second_engine(&[BASE]);
    let slow = throttled(&engine_b.host, 4e6).await;
    let a = daemon(&cache, None).await;
    let b = daemon_with(&cache, Some(slow), Policy::Auto).await;
    let (_first_dir, first) = heavy_function("first-", 4 << 20);
    let learned = build(&b.socket, first).await;
    assert_eq!(learned.completed().reason, proto::Reason::Missing as i32);
    let (_dir, request) = heavy_function("pulled-", 4 << 20);
    let built = built_and_pushed(&a, &cache, request.clone()).await;

    let hit = pulled_as(&b, request, &built).await;
    assert_eq!(
        engine_builds(&b),
        1,
        "only the first function was built on B"
    );
    let lines = policy_lines(&hit);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("registry cache: looking up: pull of")),
        "{lines:?}"
    );
    // The local estimate is the measured link's (13 MiB at <= 4 MB/s: over 3 s), not the
    // 12.5 MB/s assumed for a TCP engine before any load (about 1 s).
    let local_seconds: f64 = lines[0]
        .split("estimated at ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("no local estimate in {lines:?}"));
    assert!(local_seconds > 2.0, "{lines:?}");
    a.stop().await;
    b.stop().await;
}
