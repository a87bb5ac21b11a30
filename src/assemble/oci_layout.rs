//! The image as an OCI image layout archive, for Docker's containerd image store (Docker 26+
//! with `containerd-snapshotter`, the default of Docker 29 and Docker Desktop).
//!
//! Layout (OCI image spec, "Image Layout"): `oci-layout`, then `blobs/sha256/<hex>` for each
//! layer sent, the config and the manifest, then `index.json` naming the manifest. That store
//! imports every layer file a docker archive lists, but an OCI layout's manifest may name a
//! blob its content store already holds without carrying it (engine-facts.md, "What the
//! containerd store accepts"): the base's layers (by the descriptors of the base's own
//! manifest: uncompressed for a loaded base, the registry's gzip or zstd blobs for a pulled
//! one) and our layers it holds (uncompressed: digest = diff ID) are named, not sent.
//!
//! A blob's name is its digest and comes before its bytes, so a layer that is sent is written
//! twice: once through sha256 into a counting sink (its digest and size), then into the
//! archive, hashed again and compared. Our layers are sent uncompressed: that store keeps a
//! layer's blob and its unpacked snapshot, so gzip would save about half a layer's disk at the
//! price of compressing every edit on the build path (a 200 MB layer costs seconds of CPU).
//!
//! The index carries no image name: a load that fails to unpack must not move the tag (Docker
//! 28 keeps a named image it could not unpack); the pipeline tags the loaded manifest digest.

use std::str::FromStr;

use oci_spec::image::{
    Descriptor, DescriptorBuilder, Digest, ImageIndexBuilder, ImageManifestBuilder, MediaType,
    PlatformBuilder,
};
use sha2::{Digest as _, Sha256};

use super::{
    Assembled, ChanWriter, CountingWriter, DiffId, HashingWriter, Spec, end_of_archive,
    image_config, outer_file, outer_header, pad, write_layer,
};
use crate::error::{Error, Result};

/// `oci-layout`'s content (OCI image spec, "oci-layout file").
const LAYOUT_VERSION: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Writes the OCI layout of `spec` over the base whose layers are `base_layers` (its
/// manifest's descriptors, bottom first; none is sent). Errors: the base's descriptors do not
/// match its diff IDs in number; a layer file changed while it was read twice; the upload
/// stopped.
pub(super) fn write(
    spec: &Spec,
    base_layers: &[Descriptor],
    out: &mut ChanWriter,
) -> Result<Assembled> {
    if base_layers.len() != spec.base_diff_ids.len() {
        return Err(Error::FailedPrecondition(format!(
            "the base image's manifest names {} layers, its config {}",
            base_layers.len(),
            spec.base_diff_ids.len()
        )));
    }
    outer_file(out, "oci-layout", LAYOUT_VERSION)?;
    let mut descriptors = base_layers.to_vec();
    let mut diff_ids = spec.base_diff_ids.clone();
    let mut ours = Vec::new();
    let mut layer_bytes_sent = 0;
    for layer in &spec.layers {
        let diff_id = match (&layer.known, layer.skip) {
            (Some(known), true) => known.clone(),
            _ => {
                let diff_id = send_layer(&layer.label, &layer.items, out)?;
                layer_bytes_sent += diff_id.size;
                diff_id
            }
        };
        descriptors.push(descriptor(
            MediaType::ImageLayer,
            &diff_id.digest,
            diff_id.size,
        )?);
        diff_ids.push(diff_id.digest.clone());
        ours.push(diff_id);
    }
    let config = image_config(spec, &diff_ids);
    let config_bytes = serde_json::to_vec(&config).map_err(encoding("the image config"))?;
    let config_digest = put_blob(out, &config_bytes)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(
            MediaType::ImageConfig,
            &config_digest,
            config_bytes.len() as u64,
        )?)
        .layers(descriptors)
        .build()
        .map_err(encoding("the manifest"))?;
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(encoding("the manifest"))?;
    let manifest_digest = put_blob(out, &manifest_bytes)?;
    let platform = PlatformBuilder::default()
        .architecture(text(&config, "architecture").unwrap_or("amd64"))
        .os(text(&config, "os").unwrap_or("linux"))
        .build()
        .map_err(encoding("the platform"))?;
    let mut entry = descriptor(
        MediaType::ImageManifest,
        &manifest_digest,
        manifest_bytes.len() as u64,
    )?;
    entry.set_platform(Some(platform));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![entry])
        .build()
        .map_err(encoding("the index"))?;
    let index_bytes = serde_json::to_vec(&index).map_err(encoding("the index"))?;
    outer_file(out, "index.json", &index_bytes)?;
    end_of_archive(out)?;
    Ok(Assembled {
        image_id: manifest_digest,
        diff_ids,
        layers: ours,
        layer_bytes_sent,
    })
}

/// Sends one layer as a blob: its digest and size from a first pass, then its bytes, checked
/// against the first pass.
fn send_layer(label: &str, items: &[super::Item], out: &mut ChanWriter) -> Result<DiffId> {
    let mut first = HashingWriter::new(CountingWriter(0));
    write_layer(items, &mut first, false)?;
    let expected = first.finish();
    outer_header(out, &blob_name(&expected.digest), expected.size)?;
    let mut hashing = HashingWriter::new(&mut *out);
    write_layer(items, &mut hashing, false)?;
    let sent = hashing.finish();
    if sent != expected {
        // Every file is the one walked (same size and stat key, both passes), so only a
        // rewrite in place within one second does this.
        return Err(Error::Unavailable(format!(
            "{label}: a file changed while the layer was sent; build again"
        )));
    }
    pad(out, sent.size)?;
    Ok(sent)
}

/// Writes `bytes` as a blob; returns its digest (`sha256:<hex>`).
fn put_blob(out: &mut ChanWriter, bytes: &[u8]) -> Result<String> {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
    outer_file(out, &blob_name(&digest), bytes)?;
    Ok(digest)
}

/// `blobs/sha256/<hex>` for digest `sha256:<hex>`.
fn blob_name(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

fn descriptor(media_type: MediaType, digest: &str, size: u64) -> Result<Descriptor> {
    let digest = Digest::from_str(digest)
        .map_err(|err| Error::Internal(format!("digest {digest}: {err}")))?;
    DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest)
        .size(size)
        .build()
        .map_err(encoding("a descriptor"))
}

fn text<'a>(config: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    config.get(key).and_then(serde_json::Value::as_str)
}

fn encoding<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> Error {
    move |err| Error::Internal(format!("encoding {what}: {err}"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Read;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::access::Peer;
    use crate::assemble::{Format, Item, Layer};

    /// Runs the writer into memory.
    fn archive(spec: Spec) -> (Assembled, Vec<u8>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let producer = super::super::produce(spec, Arc::new(AtomicU64::new(0)));
            let chunks: Vec<_> = futures_util::StreamExt::collect(producer.stream).await;
            let bytes: Vec<u8> = chunks
                .into_iter()
                .flat_map(|c| c.unwrap().to_vec())
                .collect();
            (producer.done.await.unwrap().unwrap(), bytes)
        })
    }

    /// The layout holds `oci-layout`, the sent layer's blob named by its digest, the config and
    /// the manifest, and `index.json` last; the base's layer and a held layer are named in the
    /// manifest, not sent; the image ID is the manifest's digest.
    #[test]
    fn only_what_the_store_lacks_is_in_the_layout() {
        let base_layer = descriptor(
            MediaType::ImageLayerGzip,
            &format!("sha256:{}", "b".repeat(64)),
            1234,
        )
        .unwrap();
        let held = DiffId {
            digest: format!("sha256:{}", "e".repeat(64)),
            size: 3072,
        };
        let spec = Spec {
            base_diff_ids: vec![format!("sha256:{}", "d".repeat(64))],
            base_config: serde_json::json!({"architecture": "arm64", "os": "linux", "config": {}}),
            labels: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
            layers: vec![
                Layer {
                    label: "held".into(),
                    items: Arc::new(Vec::new()),
                    known: Some(held.clone()),
                    skip: true,
                },
                Layer {
                    label: "new".into(),
                    items: Arc::new(vec![Item::Dir { path: "opt".into() }]),
                    known: None,
                    skip: false,
                },
            ],
            peer: Peer::new(crate::access::own_uid(), 0, None),
            format: Format::OciLayout {
                base_layers: Arc::new(vec![base_layer]),
            },
        };
        let (assembled, bytes) = archive(spec);
        let mut names = Vec::new();
        let mut blobs = BTreeMap::new();
        let mut tar = tar::Archive::new(bytes.as_slice());
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut content = Vec::new();
            entry.read_to_end(&mut content).unwrap();
            if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                assert_eq!(hex::encode(Sha256::digest(&content)), hex, "{name}");
            }
            blobs.insert(name.clone(), content);
            names.push(name);
        }
        assert_eq!(names.len(), 5, "{names:?}");
        assert_eq!(names[0], "oci-layout");
        assert_eq!(names[4], "index.json");
        let sent = &assembled.layers[1];
        assert_eq!(names[1], blob_name(&sent.digest));
        assert_eq!(assembled.layers[0], held);
        let index: serde_json::Value = serde_json::from_slice(&blobs["index.json"]).unwrap();
        let entry = &index["manifests"][0];
        assert_eq!(entry["digest"], assembled.image_id.as_str());
        assert_eq!(entry["platform"]["architecture"], "arm64");
        assert!(
            entry.get("annotations").is_none(),
            "no name: the tag moves only after"
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&blobs[&blob_name(&assembled.image_id)]).unwrap();
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 3);
        assert_eq!(
            layers[0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        assert_eq!(layers[0]["size"], 1234);
        assert_eq!(layers[1]["digest"], held.digest.as_str());
        assert_eq!(layers[2]["digest"], sent.digest.as_str());
        assert_eq!(layers[2]["size"], sent.size);
        let config: serde_json::Value = serde_json::from_slice(
            &blobs[&blob_name(manifest["config"]["digest"].as_str().unwrap())],
        )
        .unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"],
            serde_json::json!([
                format!("sha256:{}", "d".repeat(64)),
                held.digest,
                sent.digest
            ])
        );
        assert_eq!(assembled.layer_bytes_sent, sent.size);
    }
}
