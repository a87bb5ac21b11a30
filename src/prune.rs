//! Removing what this daemon made: its images (found by its label, never anything else, never
//! one a container uses) and unused extracted layers, least recently used first.
//!
//! Last use lives in the daemon's own record, `<cache>/used/<sha256(tag)>` (its mtime), since
//! an image's labels cannot change without a rebuild; an extracted layer's last use is its
//! directory's mtime (touched whenever a request uses it).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::engine::Engine;
use crate::error::Result;
use crate::fingerprint::FINGERPRINT_LABEL;

/// What to remove.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Only what was last used longer ago than this (None: any age).
    pub older_than: Option<Duration>,
    /// Then remove least recently used until at most this many bytes remain (None: no cap).
    pub keep_bytes: Option<u64>,
    pub dry_run: bool,
    /// A build may be running: leave extracted layers and images' untagged parents (build
    /// cache it may be using) alone.
    pub keep_layers: bool,
}

/// What was (or would be) removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub images: Vec<String>,
    pub layers: Vec<String>,
    pub bytes: u64,
}

/// Records that `tag` was used now (fire and forget: a missed record only makes prune think
/// the image is older than it is).
pub fn record_use(cache_dir: &Path, tag: &str) {
    let dir = cache_dir.join("used");
    let path = dir.join(hex::encode(Sha256::digest(tag.as_bytes())));
    let now = SystemTime::now();
    if fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(now))
        .is_ok()
    {
        return;
    }
    let _ = fs::create_dir_all(&dir).and_then(|()| fs::write(&path, tag));
}

fn last_use(cache_dir: &Path, tag: &str) -> Option<SystemTime> {
    let path = cache_dir
        .join("used")
        .join(hex::encode(Sha256::digest(tag.as_bytes())));
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

struct Candidate {
    kind: Kind,
    name: String,
    bytes: u64,
    last_use: SystemTime,
}

enum Kind {
    Image { id: String, tags: Vec<String> },
    Layer(PathBuf),
}

/// Applies `policy`; returns what it removed (or would).
pub async fn prune(engine: &Engine, cache_dir: &Path, policy: Policy) -> Result<Report> {
    let in_use = engine.images_in_use().await?;
    let mut candidates = Vec::new();
    let mut total: u64 = 0;
    for image in engine.labelled_images(FINGERPRINT_LABEL).await? {
        total += image.size;
        if in_use.contains(&image.id) {
            continue;
        }
        let created =
            UNIX_EPOCH + Duration::from_secs(u64::try_from(image.created_unix).unwrap_or(0));
        let last = image
            .tags
            .iter()
            .filter_map(|t| last_use(cache_dir, t))
            .max()
            .unwrap_or(created);
        let name = image
            .tags
            .first()
            .cloned()
            .unwrap_or_else(|| image.id.clone());
        candidates.push(Candidate {
            kind: Kind::Image {
                id: image.id,
                tags: image.tags,
            },
            name,
            bytes: image.size,
            last_use: last,
        });
    }
    let layers_dir = cache_dir.join("layers");
    if let Ok(entries) = fs::read_dir(&layers_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let bytes = dir_size(&path);
            total += bytes;
            if policy.keep_layers {
                continue;
            }
            let last = fs::metadata(&path)
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH);
            candidates.push(Candidate {
                kind: Kind::Layer(path),
                name,
                bytes,
                last_use: last,
            });
        }
    }
    candidates.sort_by_key(|c| c.last_use);
    let now = SystemTime::now();
    let mut report = Report::default();
    let mut remaining = total;
    for candidate in candidates {
        let old_enough = policy
            .older_than
            .is_none_or(|age| now.duration_since(candidate.last_use).unwrap_or_default() >= age);
        let over_cap = policy.keep_bytes.is_some_and(|cap| remaining > cap);
        let wanted = match (policy.older_than.is_some(), policy.keep_bytes.is_some()) {
            (false, false) => true,
            (true, false) => old_enough,
            (false, true) => over_cap,
            (true, true) => old_enough || over_cap,
        };
        if !wanted {
            continue;
        }
        let removed = policy.dry_run
            || match &candidate.kind {
                Kind::Image { id, .. } => {
                    let removed = engine.remove_image(id, !policy.keep_layers).await.is_ok();
                    if removed {
                        crate::image_store::remove_listing(cache_dir, id);
                    }
                    removed
                }
                Kind::Layer(path) => remove_layer(path),
            };
        if !removed {
            continue;
        }
        remaining = remaining.saturating_sub(candidate.bytes);
        report.bytes += candidate.bytes;
        match candidate.kind {
            Kind::Image { tags, .. } => {
                for tag in &tags {
                    if !policy.dry_run {
                        let _ = fs::remove_file(
                            cache_dir
                                .join("used")
                                .join(hex::encode(Sha256::digest(tag.as_bytes()))),
                        );
                    }
                }
                report.images.push(candidate.name);
            }
            Kind::Layer(_) => report.layers.push(candidate.name),
        }
    }
    Ok(report)
}

/// Renames first so a half-removed layer is never mistaken for a complete one.
fn remove_layer(path: &Path) -> bool {
    let Some(parent) = path.parent() else {
        return false;
    };
    let doomed = parent.join(format!(".tmp-doomed-{}", uuid::Uuid::new_v4().simple()));
    if fs::rename(path, &doomed).is_err() {
        return false;
    }
    let _ = fs::remove_dir_all(&doomed);
    true
}

/// Bytes of regular files under `path` (links not followed).
pub fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => dir_size(&entry.path()),
            Ok(t) if t.is_file() => entry.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}
