//! Images assembled from content-addressed layers, as a `docker save`-style archive produced
//! while the engine loads it (`POST /images/load`): no build, no temp file, flat memory.
//!
//! An image is the base image's layers, one RIE layer (per architecture, byte-identical in
//! every image we make, right above the base so every image of one base shares it), then one
//! layer per Lambda layer in request order, or, for an edit, the previous image's layers plus
//! one delta layer. The engine's overlay order gives "a later layer wins"; its rules (a file
//! hides a directory below it, a directory hides a file, directories merge) are the merged-/opt
//! rule of `layers.rs`, so no whiteout is needed between full layers. A delta layer carries the
//! added and changed entries plus a whiteout (`.wh.<name>`) per removed one. Every layer lists
//! the parent directories of what it holds (0755, time 0), so a directory's attributes never
//! depend on which layer created it.
//!
//! Archive layout: `<n>/layer.tar` per layer in order, then `<config digest>.json` and
//! `manifest.json` last (both engines read the whole archive before the manifest, so the layer
//! digests computed while streaming can go into the config). A layer the engine already has
//! (its chain: the layer and all below it, moby `image/tarexport/load.go`) is sent as a
//! zero-size entry: Docker's classic image store checks the chain before opening the file and
//! Podman 4.3 does not read a layer it has (engine-facts.md, "Loading images").
//!
//! Layer tars are deterministic: entries sorted, owner 0:0, the entry's mode and time; so the
//! same content gives the same diff ID on every machine.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::Stream;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::access::{self, Peer};
use crate::error::{Error, Result};
use crate::stat_cache::{StatKey, changed_under_us, open_regular};

mod oci_layout;

const CHUNK: usize = 64 * 1024;
const CHUNKS_IN_FLIGHT: usize = 8;

/// One entry of a layer tar; `path` is the full path in the image, no leading `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A directory, always 0755 and time 0.
    Dir { path: String },
    /// A regular file read from `source` when sent; it must still match `key`.
    File {
        path: String,
        source: PathBuf,
        size: u64,
        key: StatKey,
        /// 0o755 or 0o644.
        mode: u32,
        /// Seconds since the epoch.
        mtime: u64,
        /// Read with the daemon's rights (our extracted-zip cache, the RIE), not the peer's.
        as_daemon: bool,
    },
    /// A symbolic link kept as a link.
    Link {
        path: String,
        target: PathBuf,
        mtime: u64,
    },
    /// A whiteout: hides `path` (and everything under it) of the layers below; written as an
    /// empty file `.wh.<name>` beside it (the OCI / Docker whiteout form).
    Whiteout { path: String },
}

/// A layer's identity once its tar is known: `sha256:<hex>` of the uncompressed tar, and its
/// length in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffId {
    pub digest: String,
    pub size: u64,
}

/// One layer of the image above the base.
#[derive(Debug, Clone)]
pub struct Layer {
    /// For events: "runtime interface emulator", `layer "Deps"`, "delta over sha256:…".
    pub label: String,
    pub items: Arc<Vec<Item>>,
    /// The diff ID, when known before sending (recorded from an earlier assembly).
    pub known: Option<DiffId>,
    /// Send a zero-size entry: the engine has this layer's chain. Only with `known`.
    pub skip: bool,
}

/// What the image is made of besides its layers.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The base image's diff IDs, bottom first (never sent: the base is in the engine).
    pub base_diff_ids: Vec<String>,
    /// The base image's config: `os`, `architecture`, `variant` and the `config` object
    /// (Env, Entrypoint, Cmd, WorkingDir, User, Labels, ...) in Docker's JSON form.
    pub base_config: Value,
    /// Labels added to the base's (ours win).
    pub labels: BTreeMap<String, String>,
    /// Our layers, bottom first.
    pub layers: Vec<Layer>,
    /// Whose rights layer files are read with (`None`: the daemon's own).
    pub peer: Peer,
    /// The archive's format, by the engine's image store.
    pub format: Format,
}

/// What a load may leave out of the archive: decided by the engine's image store (engine.rs,
/// `ImageStoreKind`; engine-facts.md, "Loading images" and "Today's engines").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// A layer whose chain the engine holds (Docker's classic store, Podman: the docker
    /// archive's zero-size entries).
    Chains,
    /// A layer whose chain the engine holds and whose uncompressed blob its content store is
    /// known to hold (`image_store.rs`, `note_blobs`): Docker's containerd store, OCI layout. A
    /// chain alone is not enough there: a pulled image holds the chain under compressed blobs,
    /// and a manifest naming a blob the store lacks loads but cannot be pushed or saved.
    ChainsAndBlobs,
    /// Nothing: every layer of ours is sent.
    Nothing,
}

/// How the archive is laid out, and so how a layer is left out of it.
#[derive(Debug, Clone)]
pub enum Format {
    /// `docker save` layout (`manifest.json`, `<n>/layer.tar`): Docker's classic store and
    /// Podman; a layer whose chain the engine holds is a zero-size entry, base layers always.
    DockerArchive,
    /// OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/<hex>`): Docker's containerd
    /// store, which imports every file a docker archive lists but loads a manifest naming blobs
    /// its content store holds ([`oci_layout`]). `base_layers`: the base's layer descriptors,
    /// as its own manifest names them (from the engine's export of it).
    OciLayout {
        base_layers: Arc<Vec<oci_spec::image::Descriptor>>,
    },
}

/// What was assembled.
#[derive(Debug, Clone)]
pub struct Assembled {
    /// The image ID the engine will give it: `sha256:<hex>` of the config (docker archive) or
    /// of the manifest (OCI layout, the containerd store's ID).
    pub image_id: String,
    /// Every layer's diff ID, base first.
    pub diff_ids: Vec<String>,
    /// Our layers' diff IDs (as computed or known), bottom first.
    pub layers: Vec<DiffId>,
    /// Layer tar bytes sent (zero-size entries count 0).
    pub layer_bytes_sent: u64,
}

/// A started producer: the archive stream for the engine, and the producer's own result.
pub struct Producer {
    pub stream: std::pin::Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send + 'static>>,
    pub done: JoinHandle<Result<Assembled>>,
}

/// Starts writing the archive; `sent` counts the bytes handed to the engine.
pub fn produce(spec: Spec, sent: Arc<AtomicU64>) -> Producer {
    let (tx, mut rx) = mpsc::channel::<io::Result<Bytes>>(CHUNKS_IN_FLIGHT);
    let done = tokio::task::spawn_blocking(move || {
        let mut writer = ChanWriter {
            tx: tx.clone(),
            buffer: Vec::with_capacity(CHUNK),
            sent,
        };
        // Layer files are opened with the requesting peer's rights, again: a file swapped for
        // a link between the walk and now is judged by the kernel as the peer.
        let result = access::as_peer(&spec.peer, || write_archive(&spec, &mut writer)).and_then(
            |assembled| {
                writer
                    .flush_chunk()
                    .map_err(|err| Error::Internal(format!("sending the image: {err}")))?;
                Ok(assembled)
            },
        );
        if let Err(err) = &result {
            // Fail the upload so the engine does not load a truncated archive.
            let _ = tx.blocking_send(Err(io::Error::other(err.to_string())));
        }
        result
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Producer {
        stream: Box::pin(stream),
        done,
    }
}

/// The chain IDs of `diff_ids` (OCI image spec: ChainID(L0) = DiffID(L0),
/// ChainID(L0..Ln) = sha256(ChainID(L0..Ln-1) + " " + DiffID(Ln))), bottom first.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chains: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let chain = chain_id(chains.last().map(String::as_str), diff_id);
        chains.push(chain);
    }
    chains
}

/// The chain ID of the layer `diff_id` over the chain `below` (none: the bottom layer).
pub fn chain_id(below: Option<&str>, diff_id: &str) -> String {
    match below {
        None => diff_id.to_owned(),
        Some(below) => format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{below} {diff_id}").as_bytes()))
        ),
    }
}

fn write_archive(spec: &Spec, out: &mut ChanWriter) -> Result<Assembled> {
    match &spec.format {
        Format::DockerArchive => write_docker_archive(spec, out),
        Format::OciLayout { base_layers } => oci_layout::write(spec, base_layers, out),
    }
}

fn write_docker_archive(spec: &Spec, out: &mut ChanWriter) -> Result<Assembled> {
    let base = spec.base_diff_ids.len();
    let mut manifest_layers = Vec::new();
    let mut diff_ids = spec.base_diff_ids.clone();
    let mut ours = Vec::new();
    let mut layer_bytes_sent = 0;
    for index in 0..base {
        let name = format!("{index}/layer.tar");
        outer_header(out, &name, 0)?;
        manifest_layers.push(name);
    }
    for (offset, layer) in spec.layers.iter().enumerate() {
        let name = format!("{}/layer.tar", base + offset);
        let diff_id = match (&layer.known, layer.skip) {
            (Some(known), true) => {
                outer_header(out, &name, 0)?;
                known.clone()
            }
            _ => {
                let size = layer_size(&layer.items)?;
                outer_header(out, &name, size)?;
                let mut hashing = HashingWriter::new(&mut *out);
                write_layer(&layer.items, &mut hashing, false)?;
                let computed = hashing.finish();
                if computed.size != size {
                    // Only a file that changed size between the two passes does this, and
                    // ExactFile already refuses that; keep the archive honest regardless.
                    return Err(Error::Internal(format!(
                        "{}: layer tar of {} bytes, {size} announced",
                        layer.label, computed.size
                    )));
                }
                pad(out, size)?;
                layer_bytes_sent += size;
                computed
            }
        };
        diff_ids.push(diff_id.digest.clone());
        ours.push(diff_id);
        manifest_layers.push(name);
    }
    let config = image_config(spec, &diff_ids);
    let config_bytes = serde_json::to_vec(&config)
        .map_err(|err| Error::Internal(format!("encoding the image config: {err}")))?;
    let config_digest = hex::encode(Sha256::digest(&config_bytes));
    let config_name = format!("{config_digest}.json");
    outer_file(out, &config_name, &config_bytes)?;
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": Value::Null,
        "Layers": manifest_layers,
    }]);
    let manifest_bytes = serde_json::to_vec(&manifest)
        .map_err(|err| Error::Internal(format!("encoding the manifest: {err}")))?;
    outer_file(out, "manifest.json", &manifest_bytes)?;
    end_of_archive(out)?;
    Ok(Assembled {
        image_id: format!("sha256:{config_digest}"),
        diff_ids,
        layers: ours,
        layer_bytes_sent,
    })
}

/// The image config: the base's, with our labels and layers; created when the base was (a
/// time that says something to `docker images` and prune, yet the same for the same inputs,
/// so the same inputs give the same image ID); no history.
fn image_config(spec: &Spec, diff_ids: &[String]) -> Value {
    let config = run_config(&spec.base_config, &spec.labels);
    let mut image = json!({
        "architecture": spec.base_config.get("architecture").cloned().unwrap_or(json!("amd64")),
        "os": spec.base_config.get("os").cloned().unwrap_or(json!("linux")),
        "config": config,
        "created": spec
            .base_config
            .get("created")
            .filter(|c| c.as_str().is_some_and(|c| !c.is_empty()))
            .cloned()
            .unwrap_or(json!("1970-01-01T00:00:00Z")),
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    if let Some(variant) = spec
        .base_config
        .get("variant")
        .filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
    {
        image["variant"] = variant.clone();
    }
    image
}

/// The `config` object of an image we make over a base with config `base_config` (Docker's
/// JSON form, as in [`Spec::base_config`]): the base's, with `labels` added to its labels (ours
/// win). What a registry-cache pull is checked against, too (`registry_cache.rs`).
pub fn run_config(base_config: &Value, labels: &BTreeMap<String, String>) -> Value {
    let mut config = base_config
        .get("config")
        .cloned()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    let mut merged: BTreeMap<String, Value> = config
        .get("Labels")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    for (key, value) in labels {
        merged.insert(key.clone(), Value::String(value.clone()));
    }
    config["Labels"] = json!(merged);
    config
}

/// The diff ID (and length) the layer tar of `items` has, without sending it: the same writer
/// over a hashing sink, so every file is read (with the calling thread's rights; items marked
/// `as_daemon` with the daemon's) and must still be the file that was walked. Errors: a file
/// unreadable or changed since the walk, a path the tar format cannot hold.
pub fn layer_diff_id(items: &[Item]) -> Result<DiffId> {
    let mut hashing = HashingWriter::new(io::sink());
    write_layer(items, &mut hashing, false)?;
    Ok(hashing.finish())
}

/// The exact length of the layer tar of `items`: the same writer over a counting sink, with
/// zeros for file contents (nothing is read). Errors: only the writer's own (a path the tar
/// format cannot hold).
pub fn layer_size(items: &[Item]) -> Result<u64> {
    let mut counter = CountingWriter(0);
    write_layer(items, &mut counter, true)?;
    Ok(counter.0)
}

/// Writes the layer tar of `items` into `out`. `dry`: file contents are zeros of the file's
/// size and nothing is opened, so only the length is right (for [`layer_size`]).
fn write_layer(items: &[Item], out: &mut impl Write, dry: bool) -> Result<()> {
    let mut tar = tar::Builder::new(out);
    for item in items {
        match item {
            Item::Dir { path } => {
                let mut header = header(tar::EntryType::Directory, 0o755, 0, 0);
                tar.append_data(&mut header, format!("{path}/"), io::empty())
                    .map_err(tar_error)?;
            }
            Item::File {
                path,
                source,
                size,
                key,
                mode,
                mtime,
                as_daemon,
            } => {
                let mut header = header(tar::EntryType::Regular, *mode, *size, *mtime);
                if dry {
                    // Length only.
                    let zeros = io::repeat(0).take(*size);
                    tar.append_data(&mut header, path, zeros)
                        .map_err(tar_error)?;
                    continue;
                }
                let file = if *as_daemon {
                    access::as_daemon(|| open_exact(source))?
                } else {
                    open_exact(source)?
                };
                // The very file that was walked and hashed, or the image would not match its
                // fingerprint.
                if file.size != *size || file.key != *key {
                    return Err(changed_under_us(source));
                }
                tar.append_data(&mut header, path, file)
                    .map_err(tar_error)?;
            }
            Item::Link {
                path,
                target,
                mtime,
            } => {
                let mut header = header(tar::EntryType::Symlink, 0o777, 0, *mtime);
                tar.append_link(&mut header, path, target)
                    .map_err(tar_error)?;
            }
            Item::Whiteout { path } => {
                let (parent, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
                let whiteout = if parent.is_empty() {
                    format!(".wh.{name}")
                } else {
                    format!("{parent}/.wh.{name}")
                };
                let mut header = header(tar::EntryType::Regular, 0o644, 0, 0);
                tar.append_data(&mut header, whiteout, io::empty())
                    .map_err(tar_error)?;
            }
        }
    }
    tar.into_inner().map_err(tar_error)?;
    Ok(())
}

/// A GNU header with fixed owner; `mtime` in seconds since the epoch.
fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(mtime);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// The outer archive's header for an entry of `size` bytes (names are short: `<n>/layer.tar`).
fn outer_header(out: &mut ChanWriter, name: &str, size: u64) -> Result<()> {
    let mut header = header(tar::EntryType::Regular, 0o644, size, 0);
    header
        .set_path(name)
        .map_err(|err| Error::Internal(format!("archive entry {name}: {err}")))?;
    header.set_cksum();
    out.write_all(header.as_bytes()).map_err(send_error)
}

fn outer_file(out: &mut ChanWriter, name: &str, bytes: &[u8]) -> Result<()> {
    outer_header(out, name, bytes.len() as u64)?;
    out.write_all(bytes).map_err(send_error)?;
    pad(out, bytes.len() as u64)
}

/// The end of the outer archive: two zero blocks.
fn end_of_archive(out: &mut ChanWriter) -> Result<()> {
    out.write_all(&[0; 1024]).map_err(send_error)
}

/// Pads an entry of `size` bytes to the 512-byte block.
fn pad(out: &mut ChanWriter, size: u64) -> Result<()> {
    let rest = (512 - size % 512) % 512;
    out.write_all(&vec![0; rest as usize]).map_err(send_error)
}

fn send_error(err: io::Error) -> Error {
    Error::Unavailable(format!("image upload stopped: {err}"))
}

fn tar_error(err: io::Error) -> Error {
    // A source that failed with our own error (ExactFile: the file changed under us) carries
    // it through the io::Error; keep its kind.
    if let Some(ours) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
    {
        return ours.clone();
    }
    send_error(err)
}

/// A file that must yield exactly `size` bytes: a layer file that shrinks or grows while it is
/// streamed would otherwise corrupt the archive.
struct ExactFile {
    file: File,
    path: PathBuf,
    size: u64,
    key: StatKey,
    remaining: u64,
}

/// Opens `path` (a regular file, no link followed) for exactly its current size.
fn open_exact(path: &Path) -> Result<ExactFile> {
    let file = open_regular(path)?;
    let meta = file
        .metadata()
        .map_err(|err| Error::io("reading", path, &err))?;
    let (size, key) = (meta.len(), StatKey::of(&meta));
    Ok(ExactFile {
        file,
        path: path.to_owned(),
        size,
        key,
        remaining: size,
    })
}

impl Read for ExactFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let limit = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let read = self.file.read(&mut buf[..limit])?;
        if read == 0 {
            return Err(io::Error::other(changed_under_us(&self.path)));
        }
        self.remaining -= read as u64;
        Ok(read)
    }
}

/// Counts what is written.
struct CountingWriter(u64);

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Hashes and counts what passes through to `inner`.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    fn finish(self) -> DiffId {
        DiffId {
            digest: format!("sha256:{}", hex::encode(self.hasher.finalize())),
            size: self.size,
        }
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Collects writes into 64 KiB chunks and hands them to the async side.
struct ChanWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buffer: Vec<u8>,
    sent: Arc<AtomicU64>,
}

impl ChanWriter {
    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(CHUNK),
        ));
        let len = chunk.len() as u64;
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the engine stopped reading"))?;
        self.sent.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

impl Write for ChanWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buffer.len();
        let take = room.min(buf.len());
        self.buffer.extend_from_slice(&buf[..take]);
        if self.buffer.len() == CHUNK {
            self.flush_chunk()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
