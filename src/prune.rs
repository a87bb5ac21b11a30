//! Removing what this daemon made: its images (found by its label, never anything else, never
//! one a container uses) and unused extracted layers, least recently used first.
//!
//! Bytes are counted by layer chain, each once, without the base's ([`footprint`]): the
//! engine's own per-image size counts the base and every shared layer in every image.
//!
//! Last use lives in the daemon's own record, `<cache>/used/<sha256(tag)>` (its mtime), since
//! an image's labels cannot change without a rebuild; an extracted layer's last use is its
//! directory's mtime (touched whenever a request uses it).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use std::collections::{HashMap, HashSet};

use crate::assemble::chain_ids;
use crate::config::layout;
use crate::engine::{Engine, LabelledImage};
use crate::error::Result;
use crate::fingerprint::FINGERPRINT_LABEL;
use crate::image_store::{Listing, read_listing, remove_listing};

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
    let path = use_record(cache_dir, tag);
    let now = SystemTime::now();
    if fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(now))
        .is_ok()
    {
        return;
    }
    let _ = fs::create_dir_all(cache_dir.join(layout::USED)).and_then(|()| fs::write(&path, tag));
}

/// `<cache>/used/<sha256(tag)>`: the record of `tag`'s last use (its mtime).
fn use_record(cache_dir: &Path, tag: &str) -> PathBuf {
    cache_dir
        .join(layout::USED)
        .join(hex::encode(Sha256::digest(tag.as_bytes())))
}

fn last_use(cache_dir: &Path, tag: &str) -> Option<SystemTime> {
    fs::metadata(use_record(cache_dir, tag))
        .and_then(|m| m.modified())
        .ok()
}

struct Candidate {
    kind: Kind,
    name: String,
    last_use: SystemTime,
}

enum Kind {
    /// An image and its share of storage ([`footprint`]).
    Image {
        id: String,
        tags: Vec<String>,
        chains: Vec<(String, u64)>,
    },
    /// An extracted layer directory and its bytes.
    Layer(PathBuf, u64),
}

/// One image's share of the engine's storage: its layer chains above the base, with each
/// layer tar's bytes (from the listing the daemon kept when it made the image). By chain, not
/// by diff ID, since the engine stores a layer once per chain (the layer and every layer below
/// it: engine-facts.md): images that share lower layers share those chains, and the base's
/// chains are left out (pruning our images never frees them).
///
/// Without layer sizes (a delta image pulled from the registry cache, or one an older daemon made)
/// it is the engine's size of the whole image, base included, as a share of its own: an
/// overstatement, so such an image goes sooner, never later.
fn footprint(
    image: &LabelledImage,
    diff_ids: Option<&[String]>,
    listing: Option<&Listing>,
) -> Vec<(String, u64)> {
    if let (Some(diff_ids), Some(listing)) = (diff_ids, listing) {
        let ours = listing.layer_bytes.len();
        if ours > 0 && ours <= diff_ids.len() {
            let chains = chain_ids(diff_ids);
            return chains[chains.len() - ours..]
                .iter()
                .cloned()
                .zip(listing.layer_bytes.iter().copied())
                .collect();
        }
    }
    vec![(format!("image {}", image.id), image.size)]
}

/// The storage our images hold, by chain: its bytes and how many images hold it.
#[derive(Debug, Default)]
struct Storage {
    chains: HashMap<String, (u64, usize)>,
    /// Bytes of every chain held, each once.
    total: u64,
}

impl Storage {
    fn hold(&mut self, chains: &[(String, u64)]) {
        for (chain, bytes) in chains {
            let (held, holders) = self.chains.entry(chain.clone()).or_insert((0, 0));
            // Records of one chain agree; should one not, the larger size counts.
            if *bytes > *held {
                self.total += *bytes - *held;
                *held = *bytes;
            }
            *holders += 1;
        }
    }

    /// Bytes of every chain held, each once.
    fn total(&self) -> u64 {
        self.total
    }

    /// Lets go of an image's chains; returns the bytes of those no other image holds.
    fn release(&mut self, chains: &[(String, u64)]) -> u64 {
        let mut freed = 0;
        for (chain, _) in chains {
            if let Some((bytes, holders)) = self.chains.get_mut(chain) {
                *holders -= 1;
                if *holders == 0 {
                    freed += *bytes;
                    self.chains.remove(chain);
                }
            }
        }
        self.total -= freed;
        freed
    }
}

/// Applies `policy`; returns what it removed (or would). Bytes are counted by layer chain
/// ([`footprint`]): a layer several of our images share counts once, and is freed with the
/// last of them; the base's layers are not counted.
/// Images in `answered` (recent answers, `retire.rs`) are kept like those a container uses: a
/// client may be about to start one.
pub async fn prune(
    engine: &Engine,
    cache_dir: &Path,
    policy: Policy,
    answered: &HashSet<String>,
) -> Result<Report> {
    let mut in_use = engine.images_in_use().await?;
    in_use.extend(answered.iter().cloned());
    let mut candidates = Vec::new();
    let mut storage = Storage::default();
    for image in engine.labelled_images(FINGERPRINT_LABEL).await? {
        let info = engine.inspect(&image.id).await.ok().flatten();
        let listing = read_listing(cache_dir, &image.id);
        let chains = footprint(
            &image,
            info.as_ref().map(|i| i.diff_ids.as_slice()),
            listing.as_ref(),
        );
        storage.hold(&chains);
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
        // Named by its tag, not its pinned tag (`retire.rs`).
        let name = image
            .tags
            .iter()
            .find(|tag| !crate::retire::is_pin_of(tag, &image.id))
            .or(image.tags.first())
            .cloned()
            .unwrap_or_else(|| image.id.clone());
        candidates.push(Candidate {
            kind: Kind::Image {
                id: image.id,
                tags: image.tags,
                chains,
            },
            name,
            last_use: last,
        });
    }
    let mut layer_bytes = 0;
    let layers_dir = cache_dir.join(layout::LAYERS);
    if let Ok(entries) = fs::read_dir(&layers_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let bytes = dir_size(&path);
            layer_bytes += bytes;
            if policy.keep_layers {
                continue;
            }
            let last = fs::metadata(&path)
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH);
            candidates.push(Candidate {
                kind: Kind::Layer(path, bytes),
                name,
                last_use: last,
            });
        }
    }
    candidates.sort_by_key(|c| c.last_use);
    let now = SystemTime::now();
    let mut report = Report::default();
    for candidate in candidates {
        let old_enough = policy
            .older_than
            .is_none_or(|age| now.duration_since(candidate.last_use).unwrap_or_default() >= age);
        let over_cap = policy
            .keep_bytes
            .is_some_and(|cap| storage.total() + layer_bytes > cap);
        let wanted = match (policy.older_than.is_some(), policy.keep_bytes.is_some()) {
            (false, false) => true,
            (true, false) => old_enough,
            (false, true) => over_cap,
            (true, true) => old_enough || over_cap,
        };
        if !wanted {
            continue;
        }
        match candidate.kind {
            Kind::Image { id, tags, chains } => {
                if !policy.dry_run {
                    // By each name first: an image with a pinned tag has two.
                    if engine
                        .remove_named(&id, &tags, !policy.keep_layers)
                        .await
                        .is_err()
                    {
                        continue;
                    }
                    remove_listing(cache_dir, &id);
                    for tag in &tags {
                        let _ = fs::remove_file(use_record(cache_dir, tag));
                    }
                }
                report.bytes += storage.release(&chains);
                report.images.push(candidate.name);
            }
            Kind::Layer(path, bytes) => {
                if !policy.dry_run && !remove_layer(&path) {
                    continue;
                }
                layer_bytes -= bytes;
                report.bytes += bytes;
                report.layers.push(candidate.name);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, size: u64) -> LabelledImage {
        LabelledImage {
            id: id.into(),
            tags: vec![],
            size,
            created_unix: 0,
        }
    }

    fn listing(layer_bytes: &[u64]) -> Listing {
        Listing {
            layer_bytes: layer_bytes.to_vec(),
            ..Listing::default()
        }
    }

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| format!("sha256:{n}")).collect()
    }

    /// Our layers are the top of the image's chains; the base's chains are not ours. Without
    /// sizes the whole image counts, as a share of its own.
    #[test]
    fn a_footprint_is_the_chains_above_the_base() {
        let diff_ids = ids(&["base1", "base2", "rie", "deps"]);
        let chains = chain_ids(&diff_ids);
        let ours = footprint(
            &image("sha256:a", 999),
            Some(&diff_ids),
            Some(&listing(&[10, 200])),
        );
        assert_eq!(
            ours,
            vec![(chains[2].clone(), 10), (chains[3].clone(), 200)]
        );
        for unknown in [
            footprint(&image("sha256:a", 999), Some(&diff_ids), None),
            footprint(&image("sha256:a", 999), None, Some(&listing(&[10]))),
            footprint(
                &image("sha256:a", 999),
                Some(&diff_ids),
                Some(&listing(&[])),
            ),
            footprint(
                &image("sha256:a", 999),
                Some(&ids(&["x"])),
                Some(&listing(&[1, 2])),
            ),
        ] {
            assert_eq!(unknown, vec![("image sha256:a".to_owned(), 999)]);
        }
    }

    /// Two images sharing base, RIE and a deps layer, each with its own code layer: the shared
    /// chains count once, the first image's removal frees only its code layer, the last
    /// one's frees the rest.
    #[test]
    fn shared_chains_count_once_and_go_with_the_last_image() {
        let a = ids(&["base", "rie", "deps", "code-a"]);
        let b = ids(&["base", "rie", "deps", "code-b"]);
        let sizes = listing(&[10, 200, 1]);
        let fa = footprint(&image("sha256:a", 0), Some(&a), Some(&sizes));
        let fb = footprint(&image("sha256:b", 0), Some(&b), Some(&sizes));
        let mut storage = Storage::default();
        storage.hold(&fa);
        storage.hold(&fb);
        assert_eq!(storage.total(), 10 + 200 + 1 + 1);
        assert_eq!(storage.release(&fa), 1, "only code-a goes");
        assert_eq!(storage.total(), 10 + 200 + 1);
        assert_eq!(storage.release(&fb), 10 + 200 + 1);
        assert_eq!(storage.total(), 0);
    }

    /// Two records of one chain that disagree: the larger counts, once.
    #[test]
    fn a_chain_counts_at_its_largest_record() {
        let mut storage = Storage::default();
        storage.hold(&[("chain".to_owned(), 5)]);
        storage.hold(&[("chain".to_owned(), 7)]);
        storage.hold(&[("chain".to_owned(), 6)]);
        assert_eq!(storage.total(), 7);
        assert_eq!(storage.release(&[("chain".to_owned(), 5)]), 0);
        assert_eq!(storage.release(&[("chain".to_owned(), 7)]), 0);
        assert_eq!(storage.release(&[("chain".to_owned(), 6)]), 7);
        assert_eq!(storage.total(), 0);
    }
}
