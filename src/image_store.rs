//! What the daemon remembers about the images it assembled, to send the engine only what it
//! lacks: each layer's diff ID by its content, the layer chains the engine is known to hold,
//! and each image's `/opt` listing (for delta layers).
//!
//! - Diff IDs: `<cache>/diff-ids/<key>` (`sha256:<hex> <size>`), keyed by the layer's content
//!   (a Lambda layer's content digest, the RIE's digest), so an unchanged layer is referenced
//!   without reading or sending it, also after a restart.
//! - Chains: in memory; filled from the base and the previous image (inspected: they exist
//!   now) and from each load. A chain removed behind our back (`docker rmi` of every image that
//!   used it, `image prune`) makes the engine refuse the load: the pipeline then sends every
//!   layer, and [`ImageStore::forget_chains`] empties the set.
//! - Listings: `<cache>/images/<image id hex>.json`, the merged `/opt` of an image we made plus
//!   its delta depth and sizes; written atomically (temp file + rename), removed with the
//!   image (superseded, or pruned).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::assemble::{DiffId, Item, chain_ids};
use crate::atomic_file;
use crate::config::layout;
use crate::layers::{Entry, Kind};

/// Chains remembered; the set is emptied when it grows past this (a miss costs a resend).
const MAX_CHAINS: usize = 100_000;
/// Diff IDs kept in memory; the map is emptied when it grows past this (a miss reads the
/// record from disk again), so a daemon that sees new layer contents for months stays small.
const MAX_DIFF_IDS_IN_MEMORY: usize = 100_000;

/// One entry of an image's `/opt` listing: what must be equal for two trees to be equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    /// 'd', 'f' or 'l'.
    pub kind: char,
    pub mode: u32,
    pub mtime: u64,
    pub size: u64,
    /// A file's sha256 (hex), a link's target; empty for a directory.
    pub content: String,
}

/// The listing of one image we made.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Listing {
    /// Deltas above the last full assembly (0 for a full one).
    pub depth: u32,
    /// Bytes of the deltas above the last full assembly.
    pub delta_bytes: u64,
    /// Bytes of file content in the full tree.
    pub full_bytes: u64,
    /// The base image and RIE it was made on: a delta needs both unchanged.
    pub base: String,
    pub rie: String,
    /// What each of the image's layers above the base is, bottom first (for events).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Merged `/opt`, by path relative to it.
    pub entries: BTreeMap<String, Listed>,
    /// How many of the image's layers above the base are its last full assembly's (RIE + one
    /// per Lambda layer); deltas sit above them.
    #[serde(default)]
    pub root_layers: usize,
    /// The `/opt` of that full assembly, which squashed deltas are computed against; `None`
    /// when this image is the full assembly itself.
    #[serde(default)]
    pub root_entries: Option<BTreeMap<String, Listed>>,
    /// The length in bytes of each of the image's layer tars above the base, bottom first:
    /// what `prune` counts per layer chain. Empty in listings an older daemon wrote.
    #[serde(default)]
    pub layer_bytes: Vec<u64>,
}

impl Listing {
    /// Sets the merged `/opt` this listing describes, and its bytes of file content.
    pub fn set_tree(&mut self, tree: &BTreeMap<String, Entry>) {
        self.entries = tree.iter().map(|(p, e)| (p.clone(), listed(e))).collect();
        self.full_bytes = tree
            .values()
            .map(|e| match &e.kind {
                Kind::File { size, .. } => *size,
                _ => 0,
            })
            .sum();
    }
}

/// The daemon's memory of assembled images (module doc).
#[derive(Debug)]
pub struct ImageStore {
    dir: PathBuf,
    diff_ids: Mutex<HashMap<String, DiffId>>,
    chains: Mutex<HashSet<String>>,
    /// Uncompressed layer blobs of ours that Docker's containerd content store holds, by
    /// digest (= diff ID), with their size in bytes: what an OCI-layout load may leave out
    /// there (`assemble.rs`, `Reuse::ChainsAndBlobs`). In memory only:
    /// after a restart each tag's first build there sends its layers once.
    blobs: Mutex<HashMap<String, u64>>,
    /// The last image we made for each layer-content prefix ([`prefix_key`]: base, RIE and
    /// the content digests of the request's first k layers, for every k), by image ID: what a
    /// function whose layer list starts like another's can be made as a delta over
    /// (`assembly::plan`). In memory only: after a restart each prefix is learned again from
    /// the next build that makes it.
    prefixes: Mutex<HashMap<String, String>>,
}

/// The key of one layer-content prefix: sha256 over the base, the RIE and the first layers'
/// content digests (hex).
fn prefix_key(base: &str, rie: &str, digests: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in [base, rie].into_iter().chain(digests.iter().copied()) {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())
}

impl ImageStore {
    /// A store under the daemon's cache dir. Temp files a killed daemon left (`.tmp-*`, never
    /// read) are removed.
    pub fn open(cache_dir: &Path) -> ImageStore {
        for sub in [layout::DIFF_IDS, layout::IMAGES] {
            atomic_file::remove_temp_files(&cache_dir.join(sub), &[]);
        }
        ImageStore {
            dir: cache_dir.to_owned(),
            diff_ids: Mutex::default(),
            chains: Mutex::default(),
            blobs: Mutex::default(),
            prefixes: Mutex::default(),
        }
    }

    /// Notes that image `id`, made over `base` with RIE `rie`, holds exactly the layers of
    /// content `digests` (a request's layers, in order, merged): it becomes the image of every
    /// prefix of that list.
    pub fn record_prefixes(&self, base: &str, rie: &str, digests: &[&str], id: &str) {
        let mut prefixes = crate::sync::lock(&self.prefixes);
        if prefixes.len() > MAX_CHAINS {
            prefixes.clear();
        }
        for k in 1..=digests.len() {
            prefixes.insert(prefix_key(base, rie, &digests[..k]), id.to_owned());
        }
    }

    /// The image made for the longest prefix of `digests` (over `base` and `rie`) that one
    /// was recorded for, with the length of that prefix: the image whose `/opt` shares the
    /// most leading layers with a request of those layers.
    pub fn sibling(&self, base: &str, rie: &str, digests: &[&str]) -> Option<(String, usize)> {
        let prefixes = crate::sync::lock(&self.prefixes);
        (1..=digests.len()).rev().find_map(|k| {
            prefixes
                .get(&prefix_key(base, rie, &digests[..k]))
                .map(|id| (id.clone(), k))
        })
    }

    /// The diff ID recorded for content `key`, if any.
    pub fn diff_id(&self, key: &str) -> Option<DiffId> {
        if let Some(found) = crate::sync::lock(&self.diff_ids).get(key) {
            return Some(found.clone());
        }
        let text = fs::read_to_string(self.dir.join(layout::DIFF_IDS).join(key)).ok()?;
        let (digest, size) = text.trim().split_once(' ')?;
        let found = DiffId {
            digest: digest.to_owned(),
            size: size.parse().ok()?,
        };
        self.remember_diff_id(key, &found);
        Some(found)
    }

    /// Records the diff ID of content `key` (best effort: a lost record costs one resend).
    pub fn record_diff_id(&self, key: &str, diff_id: &DiffId) {
        self.remember_diff_id(key, diff_id);
        let text = format!("{} {}\n", diff_id.digest, diff_id.size);
        let _ = atomic_file::write(
            &self.dir.join(layout::DIFF_IDS),
            key,
            text.as_bytes(),
            // (an optimisation written on the build path: no fsync, as before)
            atomic_file::Durability::Renamed,
        );
    }

    fn remember_diff_id(&self, key: &str, diff_id: &DiffId) {
        let mut diff_ids = crate::sync::lock(&self.diff_ids);
        if diff_ids.len() >= MAX_DIFF_IDS_IN_MEMORY && !diff_ids.contains_key(key) {
            diff_ids.clear();
        }
        diff_ids.insert(key.to_owned(), diff_id.clone());
    }

    /// Notes that the engine holds every chain of `diff_ids` (an image with them exists).
    pub fn note_chains(&self, diff_ids: &[String]) {
        let mut chains = crate::sync::lock(&self.chains);
        if chains.len() > MAX_CHAINS {
            chains.clear();
        }
        chains.extend(chain_ids(diff_ids));
    }

    /// True when the engine is known to hold the chain ending at `chain`.
    pub fn has_chain(&self, chain: &str) -> bool {
        crate::sync::lock(&self.chains).contains(chain)
    }

    /// Forgets every chain and blob: the engine lost one we relied on.
    pub fn forget_chains(&self) {
        crate::sync::lock(&self.chains).clear();
        crate::sync::lock(&self.blobs).clear();
    }

    /// Notes that the containerd content store holds these uncompressed layer blobs of ours
    /// (an image we loaded with them exists).
    pub fn note_blobs(&self, layers: &[DiffId]) {
        let mut blobs = crate::sync::lock(&self.blobs);
        if blobs.len() > MAX_CHAINS {
            blobs.clear();
        }
        blobs.extend(layers.iter().map(|l| (l.digest.clone(), l.size)));
    }

    /// The size of the uncompressed layer blob `digest` when the content store is known to
    /// hold it ([`ImageStore::note_blobs`]).
    pub fn blob_size(&self, digest: &str) -> Option<u64> {
        crate::sync::lock(&self.blobs).get(digest).copied()
    }

    /// The listing of image `id`, if we made it and kept it.
    pub fn listing(&self, id: &str) -> Option<Listing> {
        read_listing(&self.dir, id)
    }

    /// Keeps the listing of image `id` (best effort: without it the next edit is a full
    /// assembly).
    pub fn record_listing(&self, id: &str, listing: &Listing) {
        if let Ok(bytes) = serde_json::to_vec(listing) {
            let name = format!("{}.json", id.trim_start_matches("sha256:"));
            if let Err(err) = atomic_file::write(
                &self.dir.join(layout::IMAGES),
                &name,
                &bytes,
                atomic_file::Durability::Renamed,
            ) {
                tracing::warn!(image = id, error = %err, "could not keep the image's listing");
            }
        }
    }
}

/// `<cache>/images/<image id hex>.json`: where the listing of image `id` is kept.
fn listing_path(cache_dir: &Path, id: &str) -> PathBuf {
    cache_dir
        .join(layout::IMAGES)
        .join(format!("{}.json", id.trim_start_matches("sha256:")))
}

/// The listing of image `id` under `cache_dir`, if it was made there and kept.
pub fn read_listing(cache_dir: &Path, id: &str) -> Option<Listing> {
    let text = fs::read(listing_path(cache_dir, id)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Removes the listing of image `id` (the image is gone), if there is one.
pub fn remove_listing(cache_dir: &Path, id: &str) {
    let _ = fs::remove_file(listing_path(cache_dir, id));
}

/// The content key of a Lambda layer's image layer: its tar is a function of its entries,
/// which its content digest covers.
pub fn layer_key(content_digest: &str) -> String {
    hex::encode(Sha256::digest(format!("lambda-layer v1\0{content_digest}")))
}

/// The content key of the RIE layer.
pub fn rie_key(rie_digest: &str) -> String {
    hex::encode(Sha256::digest(format!("rie v1\0{rie_digest}")))
}

/// The image path of `rel` under `/opt`.
fn opt_path(rel: &str) -> String {
    format!("opt/{rel}")
}

/// An entry of the walked tree as a layer item.
pub fn item_of(entry: &Entry) -> Item {
    let path = opt_path(&entry.path);
    match &entry.kind {
        Kind::Dir => Item::Dir { path },
        Kind::File {
            source, size, key, ..
        } => Item::File {
            path,
            source: source.clone(),
            size: *size,
            key: *key,
            mode: entry.mode,
            mtime: entry.mtime,
            as_daemon: entry.from_cache,
        },
        Kind::Symlink { target } => Item::Link {
            path,
            target: target.clone(),
            mtime: entry.mtime,
        },
    }
}

/// The image layer of one Lambda layer: `opt/` and its entries.
pub fn layer_items(entries: &[Entry]) -> Vec<Item> {
    let mut items = vec![Item::Dir { path: "opt".into() }];
    items.extend(entries.iter().map(item_of));
    items
}

/// The listing entry of `entry` (its digest filled by the walk).
pub fn listed(entry: &Entry) -> Listed {
    match &entry.kind {
        Kind::Dir => Listed {
            kind: 'd',
            mode: 0o755,
            mtime: 0,
            size: 0,
            content: String::new(),
        },
        Kind::File { size, digest, .. } => Listed {
            kind: 'f',
            mode: entry.mode,
            mtime: entry.mtime,
            size: *size,
            content: hex::encode(digest),
        },
        Kind::Symlink { target } => Listed {
            kind: 'l',
            mode: 0o777,
            mtime: entry.mtime,
            size: 0,
            content: target.to_string_lossy().into_owned(),
        },
    }
}

/// A delta layer turning the tree `old` into `new` (merged `/opt` trees): the added and
/// changed entries, a whiteout per removed entry whose parent stays a directory (a removed or
/// replaced parent hides its children already), and the parent directories of all of them.
/// Returns the items (sorted, parents first) and the bytes of file content they carry.
pub fn delta_items(
    old: &BTreeMap<String, Listed>,
    new: &BTreeMap<String, Entry>,
) -> (Vec<Item>, u64) {
    let mut changed: BTreeMap<String, Item> = BTreeMap::new();
    let mut bytes = 0;
    for (path, entry) in new {
        let now = listed(entry);
        if old.get(path) == Some(&now) {
            continue;
        }
        if let Kind::File { size, .. } = &entry.kind {
            bytes += size;
        }
        changed.insert(opt_path(path), item_of(entry));
    }
    for path in old.keys().filter(|p| !new.contains_key(*p)) {
        let parent_stays_dir = match path.rsplit_once('/') {
            None => true,
            Some((parent, _)) => {
                new.get(parent).is_some_and(|e| e.kind == Kind::Dir)
                    && old.get(parent).is_some_and(|l| l.kind == 'd')
            }
        };
        if parent_stays_dir {
            let image_path = opt_path(path);
            changed.insert(image_path.clone(), Item::Whiteout { path: image_path });
        }
    }
    // Parents first, each once: every ancestor of a changed path is a directory in `new`.
    let mut items: BTreeMap<String, Item> = BTreeMap::new();
    for path in changed.keys() {
        let mut ancestor = path.as_str();
        while let Some((parent, _)) = ancestor.rsplit_once('/') {
            items.entry(parent.to_owned()).or_insert_with(|| Item::Dir {
                path: parent.to_owned(),
            });
            ancestor = parent;
        }
    }
    items.extend(changed);
    (items.into_values().collect(), bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stat_cache::StatKey;

    /// The in-memory diff IDs stay under their cap however many layer contents pass; a record
    /// dropped from memory is read from disk again.
    #[test]
    fn diff_ids_in_memory_are_bounded_and_backed_by_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path());
        let id = |i: usize| DiffId {
            digest: format!("sha256:{i:064x}"),
            size: i as u64,
        };
        for i in 0..=MAX_DIFF_IDS_IN_MEMORY {
            store.remember_diff_id(&format!("key{i}"), &id(i));
        }
        assert_eq!(
            crate::sync::lock(&store.diff_ids).len(),
            1,
            "emptied at the cap, then the new one"
        );
        store.record_diff_id("on-disk", &id(7));
        crate::sync::lock(&store.diff_ids).clear();
        assert_eq!(store.diff_id("on-disk"), Some(id(7)));
        assert_eq!(store.diff_id("never-recorded"), None);
    }

    fn file(path: &str, content: &str, mtime: u64) -> Entry {
        Entry {
            path: path.into(),
            kind: Kind::File {
                source: PathBuf::from("/nonexistent").join(path),
                size: content.len() as u64,
                key: StatKey::default(),
                digest: Sha256::digest(content.as_bytes()).into(),
            },
            mode: 0o644,
            mtime,
            layer: 0,
            from_cache: false,
        }
    }

    fn dir(path: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: Kind::Dir,
            mode: 0o755,
            mtime: 0,
            layer: 0,
            from_cache: false,
        }
    }

    fn tree(entries: Vec<Entry>) -> BTreeMap<String, Entry> {
        entries.into_iter().map(|e| (e.path.clone(), e)).collect()
    }

    /// A delta holds exactly what changed, whiteouts for what went (not for the children of a
    /// removed or replaced directory), and the parents of each.
    #[test]
    fn deltas_hold_changes_whiteouts_and_parents() {
        let old = tree(vec![
            dir("a"),
            file("a/keep", "k", 1),
            file("a/edit", "one", 1),
            file("a/gone", "g", 1),
            dir("b"),
            file("b/x", "x", 1),
            dir("c"),
            file("c/y", "y", 1),
            file("top", "t", 1),
        ]);
        let old: BTreeMap<String, Listed> =
            old.iter().map(|(p, e)| (p.clone(), listed(e))).collect();
        let new = tree(vec![
            dir("a"),
            file("a/keep", "k", 1),
            file("a/edit", "two", 1),
            file("a/new", "n", 5),
            // b removed; c replaced by a file; top only retimed.
            file("c", "now a file", 1),
            file("top", "t", 2),
        ]);
        let (items, bytes) = delta_items(&old, &new);
        let shown: Vec<String> = items
            .iter()
            .map(|i| match i {
                Item::Dir { path } => format!("d {path}"),
                Item::File { path, .. } => format!("f {path}"),
                Item::Link { path, .. } => format!("l {path}"),
                Item::Whiteout { path } => format!("w {path}"),
            })
            .collect();
        assert_eq!(
            shown,
            [
                "d opt",
                "d opt/a",
                "f opt/a/edit",
                "w opt/a/gone",
                "f opt/a/new",
                "w opt/b",
                "f opt/c",
                "f opt/top"
            ]
        );
        assert_eq!(bytes, 3 + 1 + 10 + 1);
    }

    /// Chains seen are remembered until forgotten; diff IDs survive a new store on the same dir.
    #[test]
    fn chains_and_diff_ids_are_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path());
        let ids = vec!["sha256:a".to_owned(), "sha256:b".to_owned()];
        store.note_chains(&ids);
        let chains = chain_ids(&ids);
        assert!(store.has_chain(&chains[1]));
        store.forget_chains();
        assert!(!store.has_chain(&chains[1]));
        let id = DiffId {
            digest: "sha256:c".into(),
            size: 3,
        };
        store.record_diff_id("k", &id);
        assert_eq!(ImageStore::open(dir.path()).diff_id("k"), Some(id));
    }
}
