//! The fleet's registry cache (`--registry-cache REGISTRY/REPO`): daemons that share a registry
//! build each image once. Before a cold build the image's content fingerprint is looked up in
//! the registry (one manifest request); when another daemon pushed it, it is pulled and tagged
//! instead of built. After a build the image is pushed in the background.
//!
//! The tag is `fp-<fingerprint>` (sha256 of [`crate::fingerprint::Parts`]: base image id, RIE
//! digest, Dockerfile digest, layer names and every layer file's content, mode and mtime), so
//! an image found under it has exactly the content a local build would make. Assembled layers
//! are deterministic, so every daemon pushes the same blobs for one fingerprint.
//!
//! Every registry call goes through the engine (distribution API, pull, push), never straight
//! to the registry: the engine already decides TLS or plain HTTP (plain only for loopback and
//! the registries its `insecure-registries` lists), honours its mirrors and proxies, and takes
//! the credentials we resolve from the docker config as `X-Registry-Auth`. The lookup is the
//! engine's `GET /distribution/<ref>/json`: one manifest request (HEAD/GET with the manifest
//! list and OCI index Accept headers, so the registry never converts to schema 1), answered
//! in milliseconds by a registry on the same network; it is bounded by [`LOOKUP_TIMEOUT`] so
//! an unreachable registry costs a cold build at most that much.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::auth::DockerCredentials;

use crate::builds::{Builds, Reporter};
use crate::engine::{Engine, RegistryError};
use crate::fingerprint::FINGERPRINT_LABEL;
use crate::layers::{Kind, Tree};
use crate::outcome::{Event, LogKind};
use crate::reference::ImageRef;
use crate::resolve::LayerSpec;

/// Longest a registry lookup may take before the build goes ahead locally.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Where images are shared, and what may be shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryCache {
    /// `REGISTRY/REPO`, e.g. `registry.example.com:5000/lambda-cache`.
    repository: String,
    /// The registry host, as docker config files key credentials (`host[:port]`;
    /// `https://index.docker.io/v1/` for Docker Hub).
    server: String,
    /// `--registry-cache-share-private`: also push images built from files others cannot read.
    pub share_private: bool,
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
        })
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

/// Before a cold build: the image with `fingerprint` from the registry, pulled and tagged as
/// `tag`, with its fingerprint label checked. `None` (build locally) on a miss, and on any
/// failure, which is reported as a `registry_cache_unavailable` warning.
pub async fn fetch(
    engine: &Engine,
    cache: &RegistryCache,
    fingerprint: &str,
    tag: &ImageRef,
    pull_limit: Duration,
    reporter: &Reporter,
) -> Option<String> {
    let warn = |message: String| {
        tracing::warn!(tag = tag.as_str(), "{message}");
        reporter.emit(Event::Warning {
            code: "registry_cache_unavailable".into(),
            message,
        });
    };
    let reference = match cache.reference(fingerprint) {
        Ok(reference) => reference,
        Err(err) => {
            warn(format!("registry cache: {err}; building locally"));
            return None;
        }
    };
    let credentials = cache.credentials().await;
    let looked = tokio::time::timeout(
        LOOKUP_TIMEOUT,
        engine.registry_lookup(reference.as_str(), credentials.clone()),
    )
    .await;
    match looked {
        Ok(Ok(Some(_digest))) => {
            reporter.metrics().registry_hits.inc();
        }
        Ok(Ok(None)) => {
            reporter.metrics().registry_misses.inc();
            return None;
        }
        Ok(Err(RegistryError::Unsupported)) => {
            warn(format!(
                "registry cache {}: the engine has no distribution API; building locally",
                cache.repository
            ));
            return None;
        }
        Ok(Err(err)) => {
            warn(format!(
                "registry cache {} could not be asked for {}: {err}; building locally",
                cache.repository,
                reference.as_str()
            ));
            return None;
        }
        Err(_) => {
            warn(format!(
                "registry cache {} did not answer within {LOOKUP_TIMEOUT:?}; building locally",
                cache.repository
            ));
            return None;
        }
    }
    reporter.emit(Event::Log {
        kind: LogKind::Status,
        text: format!("pulling {} from the registry cache", reference.as_str()),
        step: 0,
    });
    let pulled = tokio::time::timeout(
        pull_limit,
        engine.pull_as(&reference, "", credentials, |item| {
            crate::base::report_pull(reporter, reference.as_str(), item)
        }),
    )
    .await;
    match pulled {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            warn(format!(
                "pulling {} from the registry cache failed: {err}; building locally",
                reference.as_str()
            ));
            return None;
        }
        Err(_) => {
            warn(format!(
                "pulling {} from the registry cache took longer than --build-timeout; \
                 building locally",
                reference.as_str()
            ));
            return None;
        }
    }
    let adopted = adopt(engine, &reference, fingerprint, tag).await;
    // The cache reference was only a way in: untag it (the image stays under `tag`), so the
    // image has one name and is removed like any other once superseded.
    if let Err(err) = engine.untag(reference.as_str()).await {
        tracing::debug!(reference = reference.as_str(), error = %err, "untagging failed");
    }
    match adopted {
        Ok(id) => Some(id),
        Err(message) => {
            warn(message);
            None
        }
    }
}

/// Tags the pulled image as `tag` once its fingerprint label says it is what was asked for.
async fn adopt(
    engine: &Engine,
    reference: &ImageRef,
    fingerprint: &str,
    tag: &ImageRef,
) -> Result<String, String> {
    let pulled = match engine.inspect_fresh(reference.as_str()).await {
        Ok(Some(pulled)) => pulled,
        Ok(None) => return Err(format!("{} vanished after its pull", reference.as_str())),
        Err(err) => return Err(format!("inspecting {}: {err}", reference.as_str())),
    };
    let label = pulled.labels.get(FINGERPRINT_LABEL).map(String::as_str);
    if label != Some(fingerprint) {
        return Err(format!(
            "{} carries fingerprint {label:?}, not {fingerprint}; the registry cache holds a \
             foreign image under our tag; building locally",
            reference.as_str()
        ));
    }
    engine
        .tag(&pulled.id, tag)
        .await
        .map_err(|err| format!("tagging {} as {}: {err}", pulled.id, tag.as_str()))?;
    Ok(pulled.id)
}

/// After a build: pushes `image_id` as the image with `fingerprint`, on a task of its own (the
/// client's stream is not held). Listed by ListBuilds under the cache reference while it runs
/// and in the history once done; a failure is a logged warning and a failed entry there.
/// Unless `--registry-cache-share-private`, an image with a layer file others cannot read is
/// not pushed (see [`shareable`]); the log says which file.
pub fn push_in_background(
    tasks: &crate::tasks::Tasks,
    engine: Arc<Engine>,
    builds: Arc<Builds>,
    cache: RegistryCache,
    image_id: String,
    fingerprint: String,
    layers: (Vec<LayerSpec>, Option<Arc<Tree>>),
) {
    tasks.spawn(format!("registry-cache push of {image_id}"), async move {
        let reference = match cache.reference(&fingerprint) {
            Ok(reference) => reference,
            Err(err) => {
                tracing::warn!(error = %err, "registry cache push skipped");
                return;
            }
        };
        if !cache.share_private {
            let (specs, tree) = layers;
            let checked = tokio::task::spawn_blocking(move || shareable(&specs, tree.as_deref()))
                .await
                .unwrap_or_else(|err| Err(format!("the privacy check failed: {err}")));
            if let Err(why) = checked {
                tracing::warn!(
                    image = image_id,
                    reference = reference.as_str(),
                    "not pushed to the registry cache: {why}; others on the fleet could read \
                     it (pass --registry-cache-share-private to share such images)"
                );
                return;
            }
        }
        let id = builds.push_started(reference.as_str());
        let result = push(&engine, &cache, &reference, &image_id).await;
        if let Err(err) = &result {
            builds.metrics().registry_push_failures.inc();
            tracing::warn!(
                image = image_id, reference = reference.as_str(), error = %err,
                "pushing to the registry cache failed; the image stays local"
            );
        } else {
            tracing::info!(
                image = image_id,
                reference = reference.as_str(),
                "pushed to the registry cache"
            );
        }
        builds.push_finished(&id, result.map(|()| image_id));
    });
}

async fn push(
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
}
