//! What every build shares: built from the config by its owner ([`Shared::new`]), its parts
//! read by the pipeline's steps (fields visible to `pipeline` only) and, through a few
//! accessors, by the service.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::archive::ZipStore;
use crate::base::Freshness;
use crate::config::{Config, TestHooks, layout};
use crate::engine::Engine;
use crate::image_store::ImageStore;
use crate::layers::Limits;
use crate::registry_cache::RegistryCache;
use crate::resolve::{Arch, LayerSpec};
use crate::retire::Retirements;
use crate::stat_cache::StatCache;
use crate::tag_hints::{MAX_TAG_HINTS, TagHints};
use crate::tasks::Tasks;

/// What every build shares, built from the config by [`Shared::new`]; the service reads
/// the few parts it needs through accessors.
pub struct Shared {
    pub(super) engine: Arc<Engine>,
    pub(super) stat_cache: Arc<StatCache>,
    pub(super) zips: Arc<ZipStore>,
    pub(super) rie_dir: PathBuf,
    pub(super) limits: Limits,
    pub(super) build_timeout: Duration,
    /// The cache directory (last-use records live under it).
    pub(super) cache_dir: PathBuf,
    /// When each tag's use was last written to disk (bounded, see [`TagHints`]).
    pub(super) last_recorded: TagHints<()>,
    /// Prune our images down to this many bytes after each build (`--max-cache-size`).
    pub(super) max_cache_bytes: Option<u64>,
    /// Test hooks (see `config::TestHooks`).
    pub(super) hooks: TestHooks,
    /// Entries each tag's layers had at its last walk (decides inline vs blocking pool;
    /// bounded, see [`TagHints`]).
    pub(super) walk_sizes: TagHints<usize>,
    /// Bounds concurrent layer walks (hashing), one per CPU and at least two.
    pub(super) walks: Semaphore,
    /// Diff IDs, chains the engine holds, image listings (for sending only what it lacks).
    pub(super) images: ImageStore,
    /// Base image freshness checks, shared by every request (`--base-check-ttl`).
    pub(super) freshness: Arc<Freshness>,
    /// `--base-image-mirror`: ZIP bases come from `<prefix>/<name:tag>` (see `resolve`).
    pub(super) base_mirror: Option<String>,
    /// `--registry-cache`: images are looked up before cold builds and pushed after builds.
    pub(super) registry_cache: Option<RegistryCache>,
    /// Background work, awaited at shutdown (see `tasks.rs`).
    pub(super) tasks: Tasks,
    /// What was answered, and the superseded images waiting for removal (`retire.rs`).
    pub(super) retire: Arc<Retirements>,
    /// The layer set each tag was last asked for with (for the `shared_tag` warning; bounded,
    /// see [`TagHints`]).
    pub(super) tag_layers: TagHints<Arc<Vec<LayerSpec>>>,
}

impl Shared {
    /// The shared build state for `config`, over `engine`. Reads the persisted stat cache and
    /// cleans the image store's temp files (see [`ImageStore::open`]); no engine I/O.
    pub fn new(config: &Config, engine: Arc<Engine>) -> Shared {
        let cache_dir = &config.cache_dir;
        Shared {
            engine,
            stat_cache: Arc::new(StatCache::load(&cache_dir.join(layout::STAT_CACHE_FILE))),
            zips: Arc::new(ZipStore::open(
                cache_dir.join(layout::LAYERS),
                config.zip_limits,
            )),
            rie_dir: config.rie_dir.clone(),
            limits: config.limits,
            build_timeout: config.build_timeout,
            cache_dir: cache_dir.clone(),
            max_cache_bytes: config.max_cache_bytes,
            last_recorded: TagHints::new(MAX_TAG_HINTS),
            hooks: config.hooks.clone(),
            walks: Semaphore::new(config.max_parallel_builds.max(2)),
            walk_sizes: TagHints::new(MAX_TAG_HINTS),
            images: ImageStore::open(cache_dir),
            freshness: Arc::new(Freshness::new(config.base_check_ttl)),
            base_mirror: config.base_image_mirror.clone(),
            registry_cache: config.registry_cache.as_deref().and_then(|repository| {
                // `into_config` validated flag and file; a Config built in code may not be.
                RegistryCache::new(repository, config.registry_cache_share_private)
                    .map(|mut cache| {
                        cache.policy = config.registry_cache_policy;
                        cache
                    })
                    .map_err(|why| {
                        tracing::error!(repository, "registry cache disabled: {why}");
                    })
                    .ok()
            }),
            tasks: Tasks::new(config.hooks.background.clone()),
            retire: Arc::new(Retirements::new(config.answer_grace)),
            tag_layers: TagHints::new(MAX_TAG_HINTS),
        }
    }

    /// The daemon's background tasks (the drain at shutdown waits for them).
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// What was answered and what waits for removal (its `run` is the daemon's to spawn).
    pub fn retire(&self) -> &Arc<Retirements> {
        &self.retire
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &std::path::Path {
        &self.cache_dir
    }

    /// The engine every build talks to.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The stat cache (its counters are in `GetInfo`'s stats).
    pub fn stat_cache(&self) -> &Arc<StatCache> {
        &self.stat_cache
    }

    /// `--base-image-mirror`, for resolving requests.
    pub fn base_mirror(&self) -> Option<&str> {
        self.base_mirror.as_deref()
    }

    /// Where the RIE for `arch` is read from.
    pub fn rie_path(&self, arch: Arch) -> PathBuf {
        rie_path(&self.rie_dir, arch)
    }

    /// The layer walk's limits (`--max-layer-entries`, `--max-layer-bytes`).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// `--build-timeout`.
    pub fn build_timeout(&self) -> Duration {
        self.build_timeout
    }

    /// Where the stat cache is saved.
    pub fn stat_cache_path(&self) -> PathBuf {
        self.cache_dir.join(layout::STAT_CACHE_FILE)
    }
}

/// Where the RIE for `arch` is read from.
pub fn rie_path(rie_dir: &std::path::Path, arch: Arch) -> PathBuf {
    rie_dir.join(format!("aws-lambda-rie-{}", arch.as_str()))
}
