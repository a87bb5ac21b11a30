//! What Docker's containerd image store holds of an image: the layer descriptors of its
//! manifest (digest, media type, size). An OCI image layout archive that leaves a layer out
//! must still describe it, by the blob the content store has (`assemble::oci_layout`): for a
//! base loaded from a `docker save`, the uncompressed tar (digest = diff ID); for a base pulled
//! from a registry, the registry's gzip or zstd blob (engine-facts.md, "What the containerd
//! store accepts").
//!
//! The Docker API has no call that returns a manifest's layers (`GET /images/{ref}/json?
//! manifests=1`, API 1.48, gives only the manifest's own descriptor), so they are read from the
//! image's export (`GET /images/{id}/get`): an OCI layout whose `blobs/sha256/` hold the
//! image's index or manifest under its ID. The export is read only until the manifest is found
//! (blobs come in digest order) and the answer is remembered per image ID, so a base costs one
//! export per daemon run.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use futures_util::TryStreamExt;
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};

use super::Engine;
use crate::error::{Error, Result};

/// Manifests and indexes are small JSON documents; a blob larger than this is a layer or a
/// config and is skipped while reading an export.
const MAX_DOCUMENT: u64 = 1 << 20;
/// Images whose manifest facts are remembered; the map is emptied when it would grow past this
/// (bases are few; a re-read costs one export).
const REMEMBERED: usize = 64;

/// What an image's manifest says, as far as we need it.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestFacts {
    /// The config's digest (`sha256:<hex>`): the image ID on Docker's classic store and on
    /// Podman, and the same bytes wherever the image went, so a store-independent identity.
    pub config: String,
    /// The layers' descriptors, bottom first.
    pub layers: Vec<Descriptor>,
}

impl Engine {
    /// The manifest facts of image `id` for `architecture` (an index's manifest is chosen by
    /// platform: `linux` and this architecture): its config digest and its layer descriptors,
    /// with Docker media types given their OCI names ([`oci_media_type`]). Read once per image
    /// from its export and remembered. Errors: the engine's (UNAVAILABLE,
    /// FAILED_PRECONDITION), or FAILED_PRECONDITION when the export holds no manifest for it.
    pub async fn manifest_facts(&self, id: &str, architecture: &str) -> Result<Arc<ManifestFacts>> {
        if let Some(known) = crate::sync::lock(&self.manifests).get(id) {
            return Ok(known.clone());
        }
        let client = self
            .client()
            .await?
            .with_timeout(self.build_timeout.saturating_add(super::CALL_TIMEOUT));
        let stream = client
            .export_image(id)
            .map_err(|err| std::io::Error::other(err.to_string()));
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
        let (id_owned, arch) = (id.to_owned(), architecture.to_owned());
        let facts = crate::sync::blocking(move || read_export(reader, &id_owned, &arch)).await?;
        let facts = Arc::new(facts);
        let mut remembered = crate::sync::lock(&self.manifests);
        if remembered.len() >= REMEMBERED {
            remembered.clear();
        }
        remembered.insert(id.to_owned(), facts.clone());
        Ok(facts)
    }
}

/// The manifest facts of image `id` from an export (an OCI layout tar): reads
/// `blobs/sha256/*` until the document named `id` (a manifest, or an index and then its
/// manifest for `linux` / `architecture`) is found; the rest of the stream is not read.
fn read_export(reader: impl Read, id: &str, architecture: &str) -> Result<ManifestFacts> {
    let failed = |what: String| {
        Error::FailedPrecondition(format!(
            "reading the layers of image {id} from its export: {what}"
        ))
    };
    let mut archive = tar::Archive::new(reader);
    let mut documents: HashMap<String, Vec<u8>> = HashMap::new();
    for entry in archive.entries().map_err(|err| failed(err.to_string()))? {
        let mut entry = entry.map_err(|err| failed(err.to_string()))?;
        let path = entry.path().map_err(|err| failed(err.to_string()))?;
        let Some(hex) = path
            .to_str()
            .and_then(|p| p.strip_prefix("blobs/sha256/"))
            .map(str::to_owned)
        else {
            continue;
        };
        if entry.size() > MAX_DOCUMENT {
            continue;
        }
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|err| failed(err.to_string()))?;
        if bytes.first() != Some(&b'{') {
            continue;
        }
        documents.insert(format!("sha256:{hex}"), bytes);
        if let Some(found) = facts_of(&documents, id, architecture) {
            return found.map_err(failed);
        }
    }
    Err(failed("the export holds no manifest for it".into()))
}

/// The manifest facts of document `id` in `documents`: `None` while a document it needs is
/// not there yet; an error for a document that is not a manifest or an index, or an index
/// with no manifest for `linux` / `architecture`.
fn facts_of(
    documents: &HashMap<String, Vec<u8>>,
    id: &str,
    architecture: &str,
) -> Option<std::result::Result<ManifestFacts, String>> {
    let bytes = documents.get(id)?;
    let value: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(value) => value,
        Err(err) => return Some(Err(format!("{id} is not JSON: {err}"))),
    };
    if value.get("manifests").is_some() {
        let index = match ImageIndex::from_reader(bytes.as_slice()) {
            Ok(index) => index,
            Err(err) => return Some(Err(format!("index {id}: {err}"))),
        };
        let chosen = index.manifests().iter().find(|manifest| {
            manifest.platform().as_ref().is_some_and(|platform| {
                platform.os().to_string() == "linux"
                    && platform.architecture().to_string() == architecture
            })
        });
        return match chosen {
            Some(manifest) => facts_of(documents, manifest.digest().as_ref(), architecture),
            None => Some(Err(format!(
                "index {id} has no manifest for linux/{architecture}"
            ))),
        };
    }
    Some(
        ImageManifest::from_reader(bytes.as_slice())
            .map(|manifest| ManifestFacts {
                config: manifest.config().digest().to_string(),
                layers: manifest.layers().iter().map(with_oci_media_type).collect(),
            })
            .map_err(|err| format!("manifest {id}: {err}")),
    )
}

fn with_oci_media_type(layer: &Descriptor) -> Descriptor {
    let mut layer = layer.clone();
    layer.set_media_type(oci_media_type(layer.media_type()));
    layer
}

/// The OCI name of a layer media type: Docker's `application/vnd.docker.image.rootfs.diff.tar`
/// and `...diff.tar.gzip` are the same bytes as OCI's `application/vnd.oci.image.layer.v1.tar`
/// and `...v1.tar+gzip` (OCI image spec, "Docker compatibility"); every other type is kept.
fn oci_media_type(media_type: &MediaType) -> MediaType {
    match media_type.to_string().as_str() {
        "application/vnd.docker.image.rootfs.diff.tar" => MediaType::ImageLayer,
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => MediaType::ImageLayerGzip,
        _ => media_type.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(builder: &mut tar::Builder<Vec<u8>>, bytes: &[u8]) -> String {
        use sha2::Digest;
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o444);
        builder
            .append_data(&mut header, format!("blobs/sha256/{hex}"), bytes)
            .unwrap();
        format!("sha256:{hex}")
    }

    fn manifest(layer_digest: &str, media_type: &str) -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:{c}","size":10}},"layers":[{{"mediaType":"{media_type}","digest":"{layer_digest}","size":2232320}}]}}"#,
            c = "c".repeat(64)
        )
        .into_bytes()
    }

    /// A loaded base's export (Docker 28.5 with the containerd store, `docker save` shape): the
    /// manifest named by the image ID gives the layers, with the Docker media type renamed.
    #[test]
    fn the_manifest_named_by_the_id_gives_the_layers() {
        let layer = format!("sha256:{}", "2".repeat(64));
        let mut builder = tar::Builder::new(Vec::new());
        blob(&mut builder, &vec![0; 4096]);
        let id = blob(
            &mut builder,
            &manifest(&layer, "application/vnd.docker.image.rootfs.diff.tar"),
        );
        let tar = builder.into_inner().unwrap();
        let facts = read_export(tar.as_slice(), &id, "amd64").unwrap();
        assert_eq!(facts.config, format!("sha256:{}", "c".repeat(64)));
        let layers = facts.layers;
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].digest().to_string(), layer);
        assert_eq!(layers[0].size(), 2232320);
        assert_eq!(layers[0].media_type(), &MediaType::ImageLayer);
        let missing = read_export(
            tar.as_slice(),
            &format!("sha256:{}", "9".repeat(64)),
            "amd64",
        );
        assert!(
            matches!(missing, Err(Error::FailedPrecondition(_))),
            "{missing:?}"
        );
    }

    /// A pulled multi-platform base is an index: the manifest for linux and the architecture
    /// asked for is chosen, whichever order the blobs come in; gzip layers keep their digest.
    #[test]
    fn an_index_picks_the_manifest_of_the_architecture() {
        let (amd, arm) = (
            format!("sha256:{}", "a".repeat(64)),
            format!("sha256:{}", "b".repeat(64)),
        );
        let gzip = "application/vnd.docker.image.rootfs.diff.tar.gzip";
        let (amd_manifest, arm_manifest) = (manifest(&amd, gzip), manifest(&arm, gzip));
        let digest = |bytes: &[u8]| {
            use sha2::Digest;
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
        };
        let entry = |bytes: &[u8], arch: &str| {
            format!(
                r#"{{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"{}","size":{},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#,
                digest(bytes),
                bytes.len()
            )
        };
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{},{}]}}"#,
            entry(&amd_manifest, "amd64"),
            entry(&arm_manifest, "arm64")
        );
        let mut builder = tar::Builder::new(Vec::new());
        let id = blob(&mut builder, index.as_bytes());
        blob(&mut builder, &arm_manifest);
        blob(&mut builder, &amd_manifest);
        let tar = builder.into_inner().unwrap();
        let layers = read_export(tar.as_slice(), &id, "arm64").unwrap().layers;
        assert_eq!(layers[0].digest().to_string(), arm);
        assert_eq!(layers[0].media_type(), &MediaType::ImageLayerGzip);
        let none = read_export(tar.as_slice(), &id, "s390x");
        assert!(matches!(none, Err(Error::FailedPrecondition(m)) if m.contains("linux/s390x")));
    }
}
