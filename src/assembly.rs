//! What to send the engine: the layers of one image above its base, planned from what the
//! daemon remembers (`image_store`) and the request's inputs. Pure over the image store: no
//! engine I/O, no file reads but the RIE's `stat` (and, for a registry-cache pull, the hashing
//! reads of [`expected_layers`]).
//!
//! Three shapes (design.md, "How images are made"):
//! - **full**: one RIE layer and one layer per Lambda layer; a bottom run of layers whose
//!   diff IDs are known and whose chains the engine holds is referenced, not sent.
//! - **delta**: the previous image's layers, referenced, plus one layer of what changed in
//!   `/opt` (added and changed entries, whiteouts for removed ones), while the deltas since
//!   the last full assembly carry at most max(1/[`MAX_DELTA_SHARE`] of the tree's bytes,
//!   [`DELTA_ALLOWANCE`]).
//! - **squash**: once [`MAX_DELTA_DEPTH`] deltas are stacked, the last full assembly's layers
//!   plus one delta of everything changed since it.

use std::path::Path;
use std::sync::Arc;

use crate::access::Peer;
use crate::assemble::{self, Reuse};
use crate::engine::ImageInfo;
use crate::error::{Error, Result};
use crate::fingerprint::Parts;
use crate::image_store::{self, ImageStore, Listing};
use crate::layers::Tree;
use crate::resolve::RIE_IMAGE_PATH;
use crate::stat_cache::StatKey;

/// Deltas stacked on one full assembly before they are squashed into one (over the same full
/// layers), which keeps the chain far below the engines' layer limits (Docker 125, overlay 128).
pub const MAX_DELTA_DEPTH: u32 = 8;
/// Deltas stop once their bytes together exceed this share of the full layers' bytes (1/N)
/// and [`DELTA_ALLOWANCE`]: past that, a full assembly costs little more than the deltas.
pub const MAX_DELTA_SHARE: u64 = 4;
/// Delta bytes always allowed, however small the layers (a full resend of a few MiB is cheap,
/// but a delta is cheaper still).
pub const DELTA_ALLOWANCE: u64 = 4 << 20;

/// True when the next image over one `previous_depth` deltas deep squashes them.
pub fn squashes(previous_depth: u32) -> bool {
    previous_depth >= MAX_DELTA_DEPTH
}

/// True while deltas of `delta_bytes` (file content, together since the last full assembly)
/// over a tree of `full_bytes` are cheaper than a full assembly: at most
/// max(`full_bytes` / [`MAX_DELTA_SHARE`], [`DELTA_ALLOWANCE`]).
pub fn delta_allowed(full_bytes: u64, delta_bytes: u64) -> bool {
    delta_bytes <= (full_bytes / MAX_DELTA_SHARE).max(DELTA_ALLOWANCE)
}

/// True when a layer with diff ID `known` over the chain `chain` may be left out under
/// `reuse`.
fn held(reuse: Reuse, images: &ImageStore, chain: &str, known: &assemble::DiffId) -> bool {
    match reuse {
        Reuse::Chains => images.has_chain(chain),
        Reuse::ChainsAndBlobs => {
            images.has_chain(chain) && images.blob_size(&known.digest) == Some(known.size)
        }
        Reuse::Nothing => false,
    }
}

/// The images an assembly may go over, all of them present in the engine.
#[derive(Debug, Clone, Copy)]
pub struct Over<'a> {
    /// The base image.
    pub base: &'a ImageInfo,
    /// The image the tag names now.
    pub existing: Option<&'a ImageInfo>,
    /// Another tag's image whose request started with the same layer contents
    /// ([`ImageStore::sibling`]): a function whose layer list starts like another's.
    pub sibling: Option<&'a ImageInfo>,
}

/// The assembly of the image for `parts`: a delta (or squash) over `over.existing`, the image
/// the tag names now, when one can be made; else whichever sends fewer bytes of a full
/// assembly (its held bottom layers referenced) and a delta over `over.sibling` (so a shared
/// layer that lives in another image as a delta chain after edits is still not resent).
/// `rie` is the RIE file, `tree` the merged `/opt` (none without layers); `reuse`: what the
/// engine's loader may be spared. Errors: the RIE cannot be `stat`ed.
pub fn plan(
    images: &ImageStore,
    parts: &Parts,
    rie: &Path,
    tree: Option<&Tree>,
    over: Over<'_>,
    reuse: Reuse,
) -> Result<Assembly> {
    if let Some(own) = delta(images, parts, tree, over.base, over.existing, reuse) {
        return Ok(own);
    }
    let full = full(images, parts, rie, tree, over.base, reuse)?;
    let sibling = over
        .sibling
        .filter(|sibling| {
            over.existing
                .is_none_or(|existing| existing.id != sibling.id)
        })
        .and_then(|sibling| delta(images, parts, tree, over.base, Some(sibling), reuse))
        .filter(|delta| bytes_to_send(delta) < bytes_to_send(&full));
    Ok(sibling.unwrap_or(full))
}

/// Roughly what sending `assembly` costs in bytes: each entry of the layers not left out (a
/// 512-byte tar header) plus its file content.
fn bytes_to_send(assembly: &Assembly) -> u64 {
    assembly
        .layers
        .iter()
        .filter(|layer| !layer.skip)
        .flat_map(|layer| layer.items.iter())
        .map(|item| match item {
            assemble::Item::File { size, .. } => 512 + size,
            _ => 512,
        })
        .sum()
}

/// The layers of one image above its base, and what to remember once it is loaded.
pub struct Assembly {
    pub layers: Vec<assemble::Layer>,
    /// Per layer: the content key its diff ID is recorded under (none for deltas and reused
    /// layers of a previous image).
    pub keys: Vec<Option<String>>,
    /// The image's `/opt`, for the next delta.
    pub listing: Listing,
}

/// The listing of a full assembly of `parts` with `/opt` = `tree`: its own root (the RIE layer
/// and one layer per Lambda layer), depth 0; layer sizes are added once the image is loaded.
pub fn full_listing(parts: &Parts, tree: Option<&Tree>) -> Listing {
    let mut listing = Listing {
        base: parts.base.clone(),
        rie: parts.rie.clone(),
        root_layers: 1 + tree.map_or(0, |t| t.layers.len()),
        labels: std::iter::once(RIE_LABEL.to_owned())
            .chain(parts.layers.iter().map(|(name, _)| layer_label(name)))
            .collect(),
        ..Listing::default()
    };
    if let Some(tree) = tree {
        listing.set_tree(&tree.entries);
    }
    listing
}

/// The RIE layer's items: `/var/rapid/aws-lambda-rie`, 0755, time 0, from `rie`.
pub fn rie_items(rie: &Path) -> Result<Vec<assemble::Item>> {
    let meta = std::fs::metadata(rie)
        .map_err(|err| Error::io("reading the runtime interface emulator", rie, &err))?;
    Ok(vec![
        assemble::Item::Dir { path: "var".into() },
        assemble::Item::Dir {
            path: "var/rapid".into(),
        },
        assemble::Item::File {
            path: RIE_IMAGE_PATH.trim_start_matches('/').into(),
            source: rie.to_owned(),
            size: meta.len(),
            key: StatKey::of(&meta),
            mode: 0o755,
            mtime: 0,
            as_daemon: true,
        },
    ])
}

/// What events call the RIE layer, and Lambda layer `name`.
pub const RIE_LABEL: &str = "runtime interface emulator";

fn layer_label(name: &str) -> String {
    format!("layer {name:?}")
}

/// A full assembly: the RIE layer and one layer per Lambda layer. A prefix of layers whose
/// diff IDs are known and that the engine holds (`reuse`) is referenced, not sent.
pub fn full(
    images: &ImageStore,
    parts: &Parts,
    rie: &Path,
    tree: Option<&Tree>,
    base: &ImageInfo,
    reuse: Reuse,
) -> Result<Assembly> {
    let planned = full_layers(parts, rie, tree)?;
    let listing = full_listing(parts, tree);
    // The chain under the next layer; extended one layer at a time while every layer so far is
    // known (a layer after an unknown one is never skipped).
    let mut chain = assemble::chain_ids(&base.diff_ids).pop();
    let mut all_held = true;
    let mut assembly = Assembly {
        layers: Vec::new(),
        keys: Vec::new(),
        listing,
    };
    for (label, items, key) in planned {
        let known = images.diff_id(&key);
        if let Some(known) = &known {
            let next = assemble::chain_id(chain.as_deref(), &known.digest);
            all_held &= held(reuse, images, &next, known);
            chain = Some(next);
        } else {
            all_held = false;
        }
        assembly.layers.push(assemble::Layer {
            label,
            items: Arc::new(items),
            skip: all_held,
            known,
        });
        assembly.keys.push(Some(key));
    }
    Ok(assembly)
}

/// The layers of a full assembly, bottom first: (label, items, content key) for the RIE layer
/// and one per Lambda layer. Errors: the RIE cannot be `stat`ed.
fn full_layers(
    parts: &Parts,
    rie: &Path,
    tree: Option<&Tree>,
) -> Result<Vec<(String, Vec<assemble::Item>, String)>> {
    let mut planned = vec![(
        RIE_LABEL.to_owned(),
        rie_items(rie)?,
        image_store::rie_key(&parts.rie),
    )];
    if let Some(tree) = tree {
        for ((name, _), (entries, digest)) in parts
            .layers
            .iter()
            .zip(tree.layers.iter().zip(&tree.layer_digests))
        {
            planned.push((
                layer_label(name),
                image_store::layer_items(entries),
                image_store::layer_key(digest),
            ));
        }
    }
    Ok(planned)
}

/// The layers a full assembly of `parts` (RIE, `tree`) puts above the base, bottom first, as
/// (label, diff ID): computed from the request's own files, never from an image, so that what
/// a registry-cache pull holds can be checked against them (`registry_cache.rs`). A diff ID
/// this daemon recorded for the same content (its own earlier assembly) is taken as recorded;
/// the others are computed by writing the layer over a hashing sink ([`assemble::layer_diff_id`]:
/// every file read with `peer`'s rights, on the blocking pool), and recorded, so the image is
/// read once per content. Errors: the RIE cannot be `stat`ed, a layer file cannot be read or
/// changed since the walk.
pub async fn expected_layers(
    images: &ImageStore,
    parts: &Parts,
    rie: &Path,
    tree: Option<&Tree>,
    peer: &Peer,
) -> Result<Vec<(String, assemble::DiffId)>> {
    let planned = full_layers(parts, rie, tree)?;
    let known: Vec<Option<assemble::DiffId>> = planned
        .iter()
        .map(|(_, _, key)| images.diff_id(key).filter(|d| d.size > 0))
        .collect();
    let unknown: Vec<Vec<assemble::Item>> = planned
        .iter()
        .zip(&known)
        .filter(|(_, known)| known.is_none())
        .map(|((_, items, _), _)| items.clone())
        .collect();
    let peer = peer.clone();
    let mut computed = crate::sync::blocking(move || {
        crate::access::as_peer(&peer, || {
            unknown
                .iter()
                .map(|items| assemble::layer_diff_id(items))
                .collect::<Result<Vec<_>>>()
        })
    })
    .await?
    .into_iter();
    let mut layers = Vec::with_capacity(planned.len());
    for ((label, _, key), known) in planned.into_iter().zip(known) {
        let diff_id = match known {
            Some(known) => known,
            None => {
                let diff_id = computed
                    .next()
                    .ok_or_else(|| Error::Internal("a layer's diff ID was not computed".into()))?;
                images.record_diff_id(&key, &diff_id);
                diff_id
            }
        };
        layers.push((label, diff_id));
    }
    Ok(layers)
}

/// A delta over the image the tag names now, when it is ours, on the same base and RIE, with
/// its listing kept and the engine able to reuse layers: its layers plus one layer of what
/// changed in `/opt`. Once the chain is [`MAX_DELTA_DEPTH`] deep, the deltas are
/// squashed: the last full assembly's layers plus one delta of everything changed since it, so
/// the chain stays short without resending the big layers. `None` (a full assembly) when the
/// deltas would carry more than max(¼ of the layers' bytes, 4 MiB).
fn delta(
    images: &ImageStore,
    parts: &Parts,
    tree: Option<&Tree>,
    base: &ImageInfo,
    existing: Option<&ImageInfo>,
    reuse: Reuse,
) -> Option<Assembly> {
    let (existing, tree) = (existing?, tree?);
    if reuse == Reuse::Nothing || !existing.diff_ids.starts_with(&base.diff_ids) {
        return None;
    }
    let previous = images.listing(&existing.id)?;
    if previous.base != parts.base || previous.rie != parts.rie {
        return None;
    }
    let ours = &existing.diff_ids[base.diff_ids.len()..];
    // What the new delta goes over: the whole previous image, or (squashing) its full part.
    let squash = squashes(previous.depth);
    let (over, kept_layers, kept_bytes, depth) = if squash {
        let root = previous.root_entries.as_ref()?;
        (root, previous.root_layers.min(ours.len()), 0, 1)
    } else {
        (
            &previous.entries,
            ours.len(),
            previous.delta_bytes,
            previous.depth + 1,
        )
    };
    let (items, bytes) = image_store::delta_items(over, &tree.entries);
    let mut listing = Listing {
        depth: if items.is_empty() && !squash {
            previous.depth
        } else {
            depth
        },
        delta_bytes: kept_bytes + bytes,
        base: parts.base.clone(),
        rie: parts.rie.clone(),
        root_layers: previous.root_layers,
        root_entries: Some(
            previous
                .root_entries
                .clone()
                .unwrap_or_else(|| previous.entries.clone()),
        ),
        ..Listing::default()
    };
    listing.set_tree(&tree.entries);
    if !delta_allowed(listing.full_bytes, listing.delta_bytes) {
        return None;
    }
    let mut assembly = Assembly {
        layers: Vec::new(),
        keys: Vec::new(),
        listing,
    };
    // The kept layers' tar sizes, for prune, when the previous listing has them (0: unknown).
    let sizes = (previous.layer_bytes.len() == ours.len()).then_some(&previous.layer_bytes);
    for (index, diff_id) in ours[..kept_layers].iter().enumerate() {
        let label = previous
            .labels
            .get(index)
            .cloned()
            .unwrap_or_else(|| "layer of the previous image".into());
        // On the containerd store a kept layer is named by its blob, which must be there.
        let size = match reuse {
            Reuse::ChainsAndBlobs => images.blob_size(diff_id)?,
            _ => sizes.map_or(0, |sizes| sizes[index]),
        };
        assembly.layers.push(assemble::Layer {
            label,
            items: Arc::new(Vec::new()),
            known: Some(assemble::DiffId {
                digest: diff_id.clone(),
                size,
            }),
            skip: true,
        });
        assembly.keys.push(None);
    }
    if !items.is_empty() {
        let squashed = if squash {
            ", the earlier deltas squashed"
        } else {
            ""
        };
        assembly.layers.push(assemble::Layer {
            label: format!(
                "delta {}/{} over {} ({} entries, {}{squashed})",
                assembly.listing.depth,
                MAX_DELTA_DEPTH,
                short_id(&existing.id),
                items.len(),
                bytesize::ByteSize::b(bytes)
            ),
            items: Arc::new(items),
            known: None,
            skip: false,
        });
        assembly.keys.push(None);
    }
    assembly.listing.labels = assembly.layers.iter().map(|l| l.label.clone()).collect();
    Some(assembly)
}

/// The first 12 hex digits of an image id.
pub fn short_id(id: &str) -> &str {
    let hex = id.trim_start_matches("sha256:");
    hex.get(..12).unwrap_or(hex)
}

/// After a registry-cache hit: the pulled image's chains are held by the engine now, and its
/// listing is this request's tree: it was checked to be exactly the full assembly of it (the
/// base, the RIE layer and one layer per Lambda layer, each with the diff ID of
/// [`expected_layers`], whose lengths `layers` carries). So the next edit here is a delta, as
/// after a local build, and prune counts its layers by those lengths (the writer is
/// deterministic: the same tars as on the machine that built it).
pub fn remember_pulled(
    images: &ImageStore,
    parts: &Parts,
    tree: Option<&Tree>,
    pulled: &ImageInfo,
    layers: &[assemble::DiffId],
) {
    images.note_chains(&pulled.diff_ids);
    if tree.is_none() {
        return;
    }
    let mut listing = full_listing(parts, tree);
    listing.layer_bytes = layers.iter().map(|l| l.size).collect();
    images.record_listing(&pulled.id, &listing);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::layers::{Entry, Kind};

    const MIB: u64 = 1 << 20;

    /// A file of `size` bytes at `/opt/<path>` whose content is told by `seed`.
    fn file(path: &str, size: u64, seed: u8) -> Entry {
        Entry {
            path: path.into(),
            kind: Kind::File {
                source: PathBuf::from("/nonexistent").join(path),
                size,
                key: StatKey::default(),
                digest: [seed; 32],
            },
            mode: 0o644,
            mtime: 1,
            layer: 0,
            from_cache: false,
        }
    }

    fn tree(files: &[Entry]) -> Tree {
        let entries: BTreeMap<String, Entry> =
            files.iter().map(|e| (e.path.clone(), e.clone())).collect();
        Tree {
            entries,
            warnings: Vec::new(),
            layer_digests: vec!["layer-digest".into()],
            layers: vec![files.to_vec()],
        }
    }

    fn parts() -> Parts {
        Parts {
            base: "sha256:base".into(),
            rie: "rie".into(),
            dockerfile: "d".into(),
            layers: vec![("Deps".into(), "layer-digest".into())],
        }
    }

    fn image(id: &str, diff_ids: &[&str]) -> ImageInfo {
        ImageInfo {
            id: id.into(),
            diff_ids: diff_ids.iter().map(|d| d.to_string()).collect(),
            ..ImageInfo::default()
        }
    }

    /// The store remembers `existing` as made from `previous` (a full assembly when `depth`
    /// is 0, else `depth` deltas over the full tree `root`).
    fn remember(
        images: &ImageStore,
        existing: &ImageInfo,
        previous: &Tree,
        root: &Tree,
        depth: u32,
    ) {
        let mut listing = full_listing(&parts(), Some(root));
        listing.set_tree(&previous.entries);
        listing.depth = depth;
        if depth > 0 {
            listing.root_entries = Some(full_listing(&parts(), Some(root)).entries);
        }
        images.record_listing(&existing.id, &listing);
    }

    #[test]
    fn deltas_squash_at_depth_eight() {
        assert!(!squashes(MAX_DELTA_DEPTH - 1));
        assert!(squashes(MAX_DELTA_DEPTH));
        assert_eq!(MAX_DELTA_DEPTH, 8);
    }

    #[test]
    fn deltas_carry_at_most_a_quarter_of_the_bytes_or_four_mib() {
        // A 200 MiB tree: deltas up to 50 MiB together.
        assert!(delta_allowed(200 * MIB, 50 * MIB));
        assert!(!delta_allowed(200 * MIB, 50 * MIB + 1));
        // A small tree: 4 MiB are always allowed.
        assert!(delta_allowed(MIB, 4 * MIB));
        assert!(!delta_allowed(MIB, 4 * MIB + 1));
        assert!(delta_allowed(0, 0));
    }

    /// An image store that remembers the previous image of a tag: base `b1`, then the RIE and
    /// a 16 MiB `deps` layer (files `a`, 12 MiB, and `b`, 4 MiB); the store's dir, the store,
    /// the base and that image.
    fn previous_image() -> (tempfile::TempDir, ImageStore, ImageInfo, ImageInfo) {
        let dir = tempfile::tempdir().unwrap();
        let images = ImageStore::open(dir.path());
        let base = image("sha256:base", &["sha256:b1"]);
        let existing = image("sha256:prev", &["sha256:b1", "sha256:rie", "sha256:deps"]);
        let before = tree(&[file("a", 12 * MIB, 1), file("b", 4 * MIB, 2)]);
        remember(&images, &existing, &before, &before, 0);
        (dir, images, base, existing)
    }

    /// The delta (or squash) of `tree` over `existing`, with the test's parts.
    fn over_previous(
        images: &ImageStore,
        tree: &Tree,
        base: &ImageInfo,
        existing: &ImageInfo,
        reuse: Reuse,
    ) -> Option<Assembly> {
        delta(images, &parts(), Some(tree), base, Some(existing), reuse)
    }

    /// One changed file of a 16 MiB layer: the previous image's layers are referenced and one
    /// delta layer carries the change; a change past the allowance is a full assembly.
    #[test]
    fn an_edit_is_a_delta_over_the_previous_image_until_it_is_too_big() {
        let (_dir, images, base, existing) = previous_image();

        let edited = tree(&[file("a", 12 * MIB, 1), file("b", 4 * MIB, 3)]);
        let made = over_previous(&images, &edited, &base, &existing, Reuse::Chains)
            .expect("a 4 MiB change of a 16 MiB tree is a delta");
        let skipped: Vec<bool> = made.layers.iter().map(|l| l.skip).collect();
        assert_eq!(
            skipped,
            [true, true, false],
            "RIE and deps referenced, the delta sent"
        );
        assert_eq!(made.listing.depth, 1);
        assert_eq!(made.listing.delta_bytes, 4 * MIB);
        assert_eq!(
            made.layers[2].items.len(),
            2,
            "opt/ and opt/b: {:?}",
            made.layers[2].items
        );

        let rewritten = tree(&[file("a", 12 * MIB, 9), file("b", 4 * MIB, 2)]);
        assert!(
            over_previous(&images, &rewritten, &base, &existing, Reuse::Chains).is_none(),
            "12 MiB of 16 is past a quarter: a full assembly"
        );
        assert!(
            over_previous(&images, &edited, &base, &existing, Reuse::Nothing).is_none(),
            "an engine that needs every layer gets no delta"
        );
    }

    /// On Docker's containerd store a kept layer is named by its uncompressed blob: a delta
    /// needs every kept layer's blob known to the content store (its size comes from there),
    /// and the same chain held through a pulled image's compressed blobs is not enough.
    #[test]
    fn on_the_containerd_store_a_delta_needs_the_kept_layers_blobs() {
        let (_dir, images, base, existing) = previous_image();
        images.note_chains(&existing.diff_ids);
        let edited = tree(&[file("a", 12 * MIB, 1), file("b", 4 * MIB, 3)]);
        let delta_now = || over_previous(&images, &edited, &base, &existing, Reuse::ChainsAndBlobs);
        assert!(delta_now().is_none(), "no blob known: a full assembly");
        let rie = assemble::DiffId {
            digest: "sha256:rie".into(),
            size: 3072,
        };
        images.note_blobs(std::slice::from_ref(&rie));
        assert!(delta_now().is_none(), "one kept blob of two known");
        let deps = assemble::DiffId {
            digest: "sha256:deps".into(),
            size: 16 * MIB + 10240,
        };
        images.note_blobs(std::slice::from_ref(&deps));
        let made = delta_now().expect("both blobs known: a delta");
        let kept: Vec<_> = made.layers[..2].iter().map(|l| l.known.clone()).collect();
        assert_eq!(kept, [Some(rie), Some(deps)], "named by their blobs' sizes");
        images.forget_chains();
        assert!(delta_now().is_none(), "forgotten with the chains");
    }

    /// At depth 8 the next image keeps only the last full assembly's layers and carries one
    /// delta of everything changed since it, at depth 1.
    #[test]
    fn a_squash_keeps_the_full_layers_and_one_delta_since_them() {
        let dir = tempfile::tempdir().unwrap();
        let images = ImageStore::open(dir.path());
        let base = image("sha256:base", &["sha256:b1"]);
        let mut diff_ids = vec!["sha256:b1", "sha256:rie", "sha256:deps"];
        let deltas: Vec<String> = (0..MAX_DELTA_DEPTH)
            .map(|i| format!("sha256:d{i}"))
            .collect();
        diff_ids.extend(deltas.iter().map(String::as_str));
        let existing = image("sha256:deep", &diff_ids);
        let root = tree(&[file("a", 12 * MIB, 1), file("b", MIB, 2)]);
        let now = tree(&[file("a", 12 * MIB, 1), file("b", MIB, 5)]);
        remember(&images, &existing, &now, &root, MAX_DELTA_DEPTH);

        let next = tree(&[file("a", 12 * MIB, 1), file("b", MIB, 6)]);
        let squash =
            over_previous(&images, &next, &base, &existing, Reuse::Chains).expect("a squash");
        let kept: Vec<_> = squash
            .layers
            .iter()
            .filter(|l| l.skip)
            .map(|l| l.known.as_ref().unwrap().digest.clone())
            .collect();
        assert_eq!(
            kept,
            ["sha256:rie", "sha256:deps"],
            "the full assembly's layers only"
        );
        assert_eq!(squash.layers.len(), 3, "plus one delta");
        assert_eq!(squash.listing.depth, 1);
        assert_eq!(
            squash.listing.delta_bytes, MIB,
            "the delta is against the full tree"
        );
    }

    /// A function whose first layer is another tag's (edited since, so its content lives in
    /// that tag's image as a delta chain) is a delta over that image when that sends fewer
    /// bytes than a full assembly, and a full assembly when the other image shares too little.
    #[test]
    fn a_shared_prefix_is_a_delta_over_the_sibling_when_that_sends_less() {
        let (dir, images, base, sibling) = previous_image();
        let rie = dir.path().join("rie");
        std::fs::write(&rie, b"rie").unwrap();
        let plan_of = |tree: &Tree| {
            let over = Over {
                base: &base,
                existing: None,
                sibling: Some(&sibling),
            };
            plan(&images, &parts(), &rie, Some(tree), over, Reuse::Chains).unwrap()
        };
        // The sibling's deps as they are now plus this function's own 1 MiB file.
        let shared = tree(&[
            file("a", 12 * MIB, 1),
            file("b", 4 * MIB, 2),
            file("own", MIB, 4),
        ]);
        let made = plan_of(&shared);
        let skipped: Vec<bool> = made.layers.iter().map(|l| l.skip).collect();
        assert_eq!(
            skipped,
            [true, true, false],
            "the sibling's layers kept: {skipped:?}"
        );
        assert!(bytes_to_send(&made) < 2 * MIB);
        assert_eq!(made.listing.depth, 1);
        // Nothing in common: a full assembly (RIE and the layer, both unknown, sent).
        let other = tree(&[file("x", 16 * MIB, 7)]);
        let full = plan_of(&other);
        assert_eq!(full.layers.len(), 2);
        assert!(full.layers.iter().all(|l| !l.skip));
        assert_eq!(full.listing.depth, 0);
    }
}
