//! Layer sources walked into one merged `/opt` tree, and content digests.
//!
//! Each layer is walked without following links blindly (design §2):
//! - A directory layer's link whose target stays inside the layer is kept as a link. An
//!   absolute link into `/opt` is kept too: it names a place in the function's filesystem
//!   (`bin/php -> /opt/bref/bin/php`), not on the host. Any other link is dereferenced with the
//!   client's rights, as SAM does (pnpm-style layers rely on it); a link whose target does not
//!   exist is kept as it is (Lambda keeps dangling links); loops are an error naming the link.
//! - Inside a directory reached through a dereferenced link, a link is judged by where it
//!   really points on the host: kept only if its target lies inside that followed tree (so it
//!   still resolves at its place in the image), otherwise followed too (a pnpm workspace link
//!   `@scope/shared -> ../../packages/shared` inside a linked `node_modules`).
//! - A zip layer's links are kept exactly as the archive has them, wherever they point, and
//!   never followed on the host (Lambda extracts them as they are; `archive.rs`).
//!
//! Sockets, fifos and devices are skipped with a warning. Modes are normalised: directories
//! and files with any execute bit become 0755, other files 0644; setuid/setgid/sticky never
//! survive. Files and links keep their own modification time (whole seconds; Python's `.pyc`
//! validity depends on it); directories carry time 0, since an editor's temporary file would
//! otherwise change them without changing the layer. Later layers win, as in Lambda.
//!
//! File contents are hashed through a [`StatCache`] (see `stat_cache.rs`), so an unchanged layer
//! costs one walk and no reads.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::archive::{ZipStore, is_zip};
use crate::error::{Error, Result};
use crate::lambda_rules::{self, Found};
use crate::resolve::{Arch, LayerSpec};
use crate::stat_cache::{StatCache, StatKey, open_regular};

/// Limits on what one request may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most entries (files, dirs, links) across all layers.
    pub max_entries: usize,
    /// Most bytes of file content across all layers.
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 500_000,
            max_bytes: 8 << 30,
        }
    }
}

/// Deepest directory nesting a layer may have (links followed included).
const MAX_DEPTH: usize = 128;
/// Skipped special files warned about one by one, per layer.
const MAX_SKIP_WARNINGS: usize = 20;
/// Longest path inside a layer.
const MAX_PATH_BYTES: usize = 4096;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    /// A regular file read from `source` (the file itself, or a link's dereferenced target).
    File {
        source: PathBuf,
        size: u64,
        /// The file's identity when walked; it must be the same file when hashed and when
        /// streamed, or the image could hold other bytes than its fingerprint says.
        key: StatKey,
        /// sha256 of its bytes, filled in once the layer is hashed (zeros before).
        digest: [u8; 32],
    },
    /// A link kept as a link; `target` as written (relative, stays inside the layer).
    Symlink {
        target: PathBuf,
    },
}

/// One entry of the merged tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path under /opt, '/'-separated, no leading slash.
    pub path: String,
    pub kind: Kind,
    /// Normalised mode: 0o755 or 0o644 (0o777 for links).
    pub mode: u32,
    /// Modification time in whole seconds since the epoch (0 before it): the file's or the
    /// link's own (a dereferenced link's target's); 0 for directories. Part of the layer
    /// digest, so an image never pairs a `.pyc` with a source of another time.
    pub mtime: u64,
    /// Index of the layer the entry comes from.
    pub layer: usize,
    /// True when the entry lives in the daemon's own extracted-layer cache (a zip layer the
    /// peer was allowed to read); such files are read with the daemon's rights.
    pub from_cache: bool,
}

/// A problem that does not fail the build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub code: &'static str,
    pub message: String,
}

/// The merged `/opt` tree plus what the walk noticed.
#[derive(Debug, Default)]
pub struct Tree {
    /// Entries by path; BTreeMap order is the tar order (a parent sorts before its children).
    pub entries: BTreeMap<String, Entry>,
    pub warnings: Vec<Warning>,
    /// Per layer: its content digest (hex), in request order.
    pub layer_digests: Vec<String>,
    /// Per layer: its own entries, sorted by path, in request order (an image layer each).
    pub layers: Vec<Vec<Entry>>,
}

fn normalised_mode(mode: u32, is_dir: bool) -> u32 {
    if is_dir || mode & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// Walks every layer and merges them in order.
pub fn walk(
    layers: &[LayerSpec],
    limits: Limits,
    cache: &StatCache,
    zips: &ZipStore,
) -> Result<Tree> {
    let mut tree = Tree::default();
    // Directories earlier layers ship without owner write, and the layer that ships each.
    let mut locked: BTreeMap<String, String> = BTreeMap::new();
    let mut budget = Budget {
        limits,
        entries: 0,
        bytes: 0,
    };
    for (index, layer) in layers.iter().enumerate() {
        let mut root = layer.path.clone();
        let mut from_cache = false;
        let mut meta = fs::metadata(&root)
            .map_err(|err| Error::io(&format!("layer {:?}:", layer.name), &root, &err))?;
        let mut locked_here = Vec::new();
        if meta.is_file() && zip_layer(&layer.name, &root)? {
            let (extracted, findings) = zips.extracted(&layer.name, &layer.path, cache)?;
            locked_here.clone_from(&findings.locked_dirs);
            tree.warnings
                .extend(findings.notes.iter().map(|note| Warning {
                    code: note.code,
                    message: format!("layer {:?}: {}", layer.name, note.text),
                }));
            root = extracted;
            from_cache = true;
            meta = fs::metadata(&root)
                .map_err(|err| Error::io("reading extracted layer", &root, &err))?;
        }
        if !meta.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "layers[{index}].path: {} is neither a directory nor a zip archive",
                layer.path.display()
            )));
        }
        let mut walker = Walker {
            layer: index,
            name: &layer.name,
            entries: Vec::new(),
            warnings: &mut tree.warnings,
            budget: &mut budget,
            stack: HashSet::new(),
            from_cache,
            skips: 0,
            owner_denied: Found::default(),
            others_denied: Found::default(),
            locked_dirs: Vec::new(),
            frame: Frame {
                rel: String::new(),
                is_layer: true,
            },
        };
        let mut entries = if from_cache {
            // Our own cache: read with the daemon's rights (the archive was read as the peer).
            crate::access::as_daemon(|| walker.dir(&root, "", &meta).map(|()| walker.entries))?
        } else {
            walker.dir(&root, "", &meta)?;
            if let Some(text) =
                lambda_rules::unreadable(&walker.owner_denied, &walker.others_denied)
            {
                walker.warnings.push(Warning {
                    code: lambda_rules::UNREADABLE,
                    message: format!("layer {:?}: the directory has {text}", layer.name),
                });
            }
            locked_here = std::mem::take(&mut walker.locked_dirs);
            walker.entries
        };
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let digest = if from_cache {
            crate::access::as_daemon(|| layer_digest(&mut entries, cache))?
        } else {
            layer_digest(&mut entries, cache)?
        };
        tree.layer_digests.push(digest);
        if let Some(message) = writes_into_locked(&mut locked, &layer.name, &entries, locked_here) {
            tree.warnings.push(Warning {
                code: lambda_rules::UNREADABLE,
                message,
            });
        }
        for entry in &entries {
            merge(&mut tree.entries, entry.clone());
        }
        tree.layers.push(entries);
    }
    deploy_limits(&mut tree, layers.len());
    Ok(tree)
}

/// The warning for layer `name` when its `entries` are written into a directory an earlier
/// layer ships without owner write (`locked`); then `locked` as it is after this layer, which
/// ships `locked_here` without owner write (a directory it ships writable is no longer locked).
fn writes_into_locked(
    locked: &mut BTreeMap<String, String>,
    name: &str,
    entries: &[Entry],
    locked_here: Vec<String>,
) -> Option<String> {
    let mut found = Found::default();
    let mut owners: Vec<&str> = Vec::new();
    for entry in entries {
        let parent = entry.path.rsplit_once('/').map_or("", |(dir, _)| dir);
        if let Some(owner) = locked.get(parent) {
            found.add(&entry.path);
            if !owners.contains(&owner.as_str()) {
                owners.push(owner);
            }
        }
    }
    let message = lambda_rules::writes_into_locked(&found, &owners)
        .map(|text| format!("layer {name:?}: {text}"));
    let here: HashSet<&str> = locked_here.iter().map(String::as_str).collect();
    for entry in entries.iter().filter(|e| e.kind == Kind::Dir) {
        if !here.contains(entry.path.as_str()) {
            locked.remove(&entry.path);
        }
    }
    for dir in locked_here {
        locked.insert(dir, name.to_owned());
    }
    message
}

/// Lambda's deploy limits on the request's layers as warnings: more than five layers, more
/// than 262,144,000 bytes unzipped (each layer's files counted, as Lambda counts them).
fn deploy_limits(tree: &mut Tree, layers: usize) {
    if let Some(message) = lambda_rules::too_many_layers(layers) {
        tree.warnings.push(Warning {
            code: "too_many_layers",
            message,
        });
    }
    let bytes: u64 = tree
        .layers
        .iter()
        .flatten()
        .map(|entry| match &entry.kind {
            Kind::File { size, .. } => *size,
            _ => 0,
        })
        .sum();
    if let Some(message) = lambda_rules::too_large(bytes) {
        tree.warnings.push(Warning {
            code: "layers_too_large",
            message,
        });
    }
}

/// The `extension_arch_mismatch` warning for the merged tree: `/opt/bootstrap` and the files
/// directly in `/opt/extensions/` (where Lambda looks for a custom runtime and for
/// extensions) that are ELF executables for another architecture than `arch`. Files of the
/// daemon's cache are read with its rights, others with the calling thread's (the peer's);
/// each content once (`cache`, by its digest).
pub fn arch_warnings(tree: &Tree, arch: Arch, cache: &StatCache) -> Vec<Warning> {
    let (ours, machine) = match arch {
        Arch::X86_64 => ("x86_64", lambda_rules::EM_X86_64),
        Arch::Arm64 => ("arm64", lambda_rules::EM_AARCH64),
    };
    let mut others: BTreeMap<u16, Found> = BTreeMap::new();
    let extensions = tree
        .entries
        .range::<str, _>((
            std::ops::Bound::Included("extensions/"),
            std::ops::Bound::Excluded("extensions0"),
        ))
        .filter(|(path, _)| !path["extensions/".len()..].contains('/'));
    let launched = tree
        .entries
        .get_key_value("bootstrap")
        .into_iter()
        .chain(extensions);
    for (path, entry) in launched {
        let Kind::File { source, digest, .. } = &entry.kind else {
            continue;
        };
        let read = || -> Result<Vec<u8>> {
            let mut header = Vec::with_capacity(20);
            std::io::Read::take(open_regular(source)?, 20)
                .read_to_end(&mut header)
                .map_err(|err| Error::io("reading", source, &err))?;
            Ok(header)
        };
        let found = cache.elf_machine(digest, || {
            let header = if entry.from_cache {
                crate::access::as_daemon(read)
            } else {
                read()
            };
            header.ok().and_then(|h| lambda_rules::elf_machine(&h))
        });
        if let Some(found) = found
            && found != machine
        {
            others
                .entry(found)
                .or_default()
                .add(&format!("/opt/{path}"));
        }
    }
    others
        .into_iter()
        .filter_map(|(found, paths)| {
            let their = match found {
                lambda_rules::EM_X86_64 => "x86_64".to_owned(),
                lambda_rules::EM_AARCH64 => "arm64".to_owned(),
                other => format!("ELF machine {other}"),
            };
            lambda_rules::arch_mismatch(&paths, ours, &their)
        })
        .map(|message| Warning {
            code: "extension_arch_mismatch",
            message,
        })
        .collect()
}

/// True when the layer file at `path` is a zip archive; opened by the calling thread (the
/// peer), so one the peer may not read is `ReadDenied` naming the layer and the file (aws-sam-cli
/// #1491: the type check must not swallow the open error).
fn zip_layer(name: &str, path: &Path) -> Result<bool> {
    is_zip(path).map_err(|err| match err {
        Error::ReadDenied { path, .. } => Error::ReadDenied {
            what: format!("layer {name:?}: reading the zip archive"),
            path,
        },
        other => other,
    })
}

/// Inserts `entry`, a later layer's, over what is there: a non-directory replaces a whole
/// subtree; a directory merges with an existing one.
fn merge(entries: &mut BTreeMap<String, Entry>, entry: Entry) {
    if entry.kind != Kind::Dir {
        let prefix = format!("{}/", entry.path);
        let doomed: Vec<String> = entries
            .range(prefix.clone()..)
            .take_while(|(path, _)| path.starts_with(&prefix))
            .map(|(path, _)| path.clone())
            .collect();
        for path in doomed {
            entries.remove(&path);
        }
    }
    entries.insert(entry.path.clone(), entry);
}

struct Budget {
    limits: Limits,
    entries: usize,
    bytes: u64,
}

impl Budget {
    fn add(&mut self, bytes: u64) -> Result<()> {
        self.entries += 1;
        self.bytes += bytes;
        if self.entries > self.limits.max_entries {
            return Err(Error::ResourceExhausted(format!(
                "layers hold more than max_layer_entries = {} files and directories",
                self.limits.max_entries
            )));
        }
        if self.bytes > self.limits.max_bytes {
            return Err(Error::ResourceExhausted(format!(
                "layers hold more than max_layer_bytes = {} bytes",
                self.limits.max_bytes
            )));
        }
        Ok(())
    }
}

struct Walker<'a> {
    layer: usize,
    name: &'a str,
    entries: Vec<Entry>,
    warnings: &'a mut Vec<Warning>,
    budget: &'a mut Budget,
    /// (dev, ino) of the directories being walked: a dereferenced link back into one is a loop.
    stack: HashSet<(u64, u64)>,
    from_cache: bool,
    /// Special files skipped so far in this layer.
    skips: usize,
    /// Files Lambda could not read (`lambda_rules::note_readability`), by rule.
    owner_denied: Found,
    others_denied: Found,
    /// The layer's directories without owner write (see `writes_into_locked`).
    locked_dirs: Vec<String>,
    /// The tree links are judged against: the layer itself, or, while walking a directory
    /// reached through a dereferenced link, that directory.
    frame: Frame,
}

/// Where a walked tree sits: links inside it whose target stays inside it are kept as links.
#[derive(Debug, Clone)]
struct Frame {
    /// The tree's path below the layer root ("" for the layer itself).
    rel: String,
    /// True for the layer itself; false for a followed directory.
    is_layer: bool,
}

impl Frame {
    /// `rel` (a path below the layer root inside this frame) relative to the frame's root.
    fn inner<'r>(&self, rel: &'r str) -> &'r str {
        if self.rel.is_empty() {
            rel
        } else {
            rel.strip_prefix(&self.rel)
                .and_then(|rest| rest.strip_prefix('/'))
                .unwrap_or(rel)
        }
    }
}

/// Seconds since the epoch of `meta`'s modification time; 0 for times before it.
fn mtime_of(meta: &fs::Metadata) -> u64 {
    u64::try_from(meta.mtime()).unwrap_or(0)
}

impl Walker<'_> {
    fn dir(&mut self, dir: &Path, rel: &str, meta: &fs::Metadata) -> Result<()> {
        // The walk recurses (also through dereferenced links): bound it, so a chain of links
        // cannot exhaust the thread's stack.
        if rel.len() > MAX_PATH_BYTES || rel.matches('/').count() >= MAX_DEPTH {
            return Err(Error::InvalidArgument(format!(
                "layer {:?}: {rel:?} is nested deeper than {MAX_DEPTH} directories or longer \
                 than {MAX_PATH_BYTES} bytes (a chain of links?)",
                self.name
            )));
        }
        let id = (meta.dev(), meta.ino());
        if !self.stack.insert(id) {
            return Err(Error::InvalidArgument(format!(
                "layer {:?}: link loop at {}; remove or fix the link",
                self.name,
                dir.display()
            )));
        }
        let read = fs::read_dir(dir).map_err(|err| Error::io("reading layer dir", dir, &err))?;
        let mut names = Vec::new();
        for item in read {
            let item = item.map_err(|err| Error::io("reading layer dir", dir, &err))?;
            names.push(item.file_name());
        }
        names.sort();
        for name in names {
            let Some(name_str) = name.to_str() else {
                return Err(Error::InvalidArgument(format!(
                    "layer {:?}: file name {:?} under {} is not UTF-8",
                    self.name,
                    name,
                    dir.display()
                )));
            };
            let path = dir.join(&name);
            let child_rel = if rel.is_empty() {
                name_str.to_owned()
            } else {
                format!("{rel}/{name_str}")
            };
            let meta = fs::symlink_metadata(&path)
                .map_err(|err| Error::io("reading layer entry", &path, &err))?;
            self.entry(&path, child_rel, &meta)?;
        }
        self.stack.remove(&id);
        Ok(())
    }

    fn entry(&mut self, path: &Path, rel: String, meta: &fs::Metadata) -> Result<()> {
        let file_type = meta.file_type();
        if file_type.is_dir() {
            self.budget.add(0)?;
            if meta.permissions().mode() & 0o200 == 0 {
                self.locked_dirs.push(rel.clone());
            }
            self.push(rel.clone(), Kind::Dir, 0o755, 0);
            return self.dir(path, &rel, meta);
        }
        if file_type.is_file() {
            self.budget.add(meta.len())?;
            lambda_rules::note_readability(
                meta.permissions().mode(),
                &rel,
                &mut self.owner_denied,
                &mut self.others_denied,
            );
            let mode = normalised_mode(meta.permissions().mode(), false);
            let kind = Kind::File {
                source: path.to_owned(),
                size: meta.len(),
                key: StatKey::of(meta),
                digest: [0; 32],
            };
            self.push(rel, kind, mode, mtime_of(meta));
            return Ok(());
        }
        if file_type.is_symlink() {
            return self.symlink(path, rel, meta);
        }
        let message = format!(
            "layer {:?}: skipped {} (a socket, fifo or device cannot be part of an image)",
            self.name,
            path.display()
        );
        self.skipped(message)
    }

    /// Notes a skipped special file: it counts against the entry limit, and only the first
    /// [`MAX_SKIP_WARNINGS`] get a warning of their own.
    fn skipped(&mut self, message: String) -> Result<()> {
        self.budget.add(0)?;
        self.skips += 1;
        match self.skips.cmp(&MAX_SKIP_WARNINGS) {
            std::cmp::Ordering::Less => {
                self.warnings.push(Warning {
                    code: "skipped_special_file",
                    message,
                });
            }
            std::cmp::Ordering::Equal => self.warnings.push(Warning {
                code: "skipped_special_file",
                message: format!(
                    "layer {:?}: more sockets, fifos or devices skipped; not listed one by one",
                    self.name
                ),
            }),
            std::cmp::Ordering::Greater => {}
        }
        Ok(())
    }

    /// A link at `path` (`link` is its own metadata): kept, or dereferenced (module doc).
    fn symlink(&mut self, path: &Path, rel: String, link: &fs::Metadata) -> Result<()> {
        let target =
            fs::read_link(path).map_err(|err| Error::io("reading layer link", path, &err))?;
        let keep = self.from_cache
            || stays_inside(self.frame.inner(&rel), &target)
            || (self.frame.is_layer && target.starts_with("/opt"));
        if keep {
            self.budget.add(0)?;
            self.push(rel, Kind::Symlink { target }, 0o777, mtime_of(link));
            return Ok(());
        }
        // Points outside: dereference, as SAM does, with the client's rights.
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            // Nothing there on the host: keep the link as it is, as Lambda would; it may
            // resolve in the function's filesystem.
            Err(err) if matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                self.budget.add(0)?;
                self.push(rel, Kind::Symlink { target }, 0o777, mtime_of(link));
                return Ok(());
            }
            Err(err) => {
                return Err(match err.raw_os_error() {
                    Some(libc::ELOOP) => Error::InvalidArgument(format!(
                        "layer {:?}: link loop at {}; remove or fix the link",
                        self.name,
                        path.display()
                    )),
                    Some(libc::EACCES) => Error::PermissionDenied(format!(
                        "layer {:?}: link {} points to {}, which the client may not read",
                        self.name,
                        path.display(),
                        target.display()
                    )),
                    _ => Error::NotFound(format!(
                        "layer {:?}: link {} points to {}, which cannot be read ({err})",
                        self.name,
                        path.display(),
                        target.display()
                    )),
                });
            }
        };
        let real = fs::canonicalize(path).map_err(|err| Error::io("resolving link", path, &err))?;
        if meta.is_dir() {
            self.budget.add(0)?;
            self.push(rel.clone(), Kind::Dir, 0o755, 0);
            // Links inside the followed tree are judged against it (module doc).
            let outer = std::mem::replace(
                &mut self.frame,
                Frame {
                    rel: rel.clone(),
                    is_layer: false,
                },
            );
            let walked = self.dir(&real, &rel, &meta);
            self.frame = outer;
            return walked;
        }
        if meta.is_file() {
            self.budget.add(meta.len())?;
            let mode = normalised_mode(meta.permissions().mode(), false);
            self.push(
                rel,
                Kind::File {
                    source: real,
                    size: meta.len(),
                    key: StatKey::of(&meta),
                    digest: [0; 32],
                },
                mode,
                mtime_of(&meta),
            );
            return Ok(());
        }
        let message = format!(
            "layer {:?}: skipped link {} to a socket, fifo or device",
            self.name,
            path.display()
        );
        self.skipped(message)
    }

    fn push(&mut self, path: String, kind: Kind, mode: u32, mtime: u64) {
        self.entries.push(Entry {
            path,
            kind,
            mode,
            mtime,
            layer: self.layer,
            from_cache: self.from_cache,
        });
    }
}

/// True when a link at `rel` (relative to the layer root) with `target` resolves, lexically,
/// to a path inside the layer.
fn stays_inside(rel: &str, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    // Depth of the link's parent directory below the root.
    let mut depth = rel.matches('/').count() as i64;
    for component in target.components() {
        match component {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// The digest of one layer's entries (paths, kinds, modes, times, link targets, file bytes).
/// Also records each file's own digest in its entry.
fn layer_digest(entries: &mut [Entry], cache: &StatCache) -> Result<String> {
    let mut hasher = Sha256::new();
    for entry in entries {
        hasher.update(entry.path.as_bytes());
        hasher.update([0]);
        match &mut entry.kind {
            Kind::Dir => hasher.update(b"d"),
            Kind::File {
                source,
                key,
                digest,
                ..
            } => {
                hasher.update(format!("f{:o} {}", entry.mode, entry.mtime));
                *digest = cache.file_digest_of(source, key)?;
                hasher.update(*digest);
            }
            Kind::Symlink { target } => {
                hasher.update(format!("l{} ", entry.mtime));
                hasher.update(target.as_os_str().as_encoded_bytes());
            }
        }
        hasher.update([0]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn write(path: &Path, content: &str, mode: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn zips() -> ZipStore {
        ZipStore::open(
            std::env::temp_dir().join("lambda-imaged-unit-zips"),
            Default::default(),
        )
    }

    fn spec(name: &str, path: &Path) -> LayerSpec {
        LayerSpec {
            name: name.to_owned(),
            path: path.to_owned(),
        }
    }

    #[test]
    fn later_layers_win_and_modes_are_normalised() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        write(&a.join("shared.txt"), "from a", 0o600);
        write(&a.join("only_a/x"), "x", 0o4755);
        write(&a.join("replaced/child"), "gone", 0o644);
        write(&b.join("shared.txt"), "from b", 0o640);
        write(&b.join("bin/tool"), "#!/bin/sh", 0o700);
        write(&b.join("replaced"), "now a file", 0o644);
        let cache = StatCache::default();
        let tree = walk(
            &[spec("a", &a), spec("b", &b)],
            Limits::default(),
            &cache,
            &zips(),
        )
        .unwrap();
        let paths: Vec<&str> = tree.entries.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/tool",
                "only_a",
                "only_a/x",
                "replaced",
                "shared.txt"
            ]
        );
        assert_eq!(tree.entries["shared.txt"].layer, 1);
        assert_eq!(tree.entries["shared.txt"].mode, 0o644);
        assert_eq!(
            tree.entries["only_a/x"].mode, 0o755,
            "setuid dropped, exec kept"
        );
        assert_eq!(tree.entries["bin/tool"].mode, 0o755);
        assert_eq!(tree.layer_digests.len(), 2);
    }

    #[test]
    fn links_inside_stay_links_outside_are_dereferenced_loops_fail() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        let outside = dir.path().join("outside");
        write(&layer.join("lib/real.so"), "elf", 0o755);
        write(&outside.join("pkg/index.js"), "js", 0o644);
        symlink("lib/real.so", layer.join("inside")).unwrap();
        symlink("../outside/pkg", layer.join("node_modules")).unwrap();
        symlink("../../outside/pkg", layer.join("lib/escape")).unwrap();
        let cache = StatCache::default();
        let tree = walk(&[spec("l", &layer)], Limits::default(), &cache, &zips()).unwrap();
        assert_eq!(
            tree.entries["inside"].kind,
            Kind::Symlink {
                target: PathBuf::from("lib/real.so")
            }
        );
        assert_eq!(tree.entries["node_modules"].kind, Kind::Dir);
        assert!(matches!(
            tree.entries["node_modules/index.js"].kind,
            Kind::File { .. }
        ));
        assert_eq!(
            tree.entries["lib/escape"].kind,
            Kind::Dir,
            "escaping link dereferenced"
        );

        let looped = dir.path().join("looped");
        fs::create_dir_all(&looped).unwrap();
        symlink(&looped, looped.join("self")).unwrap();
        let err = walk(&[spec("loop", &looped)], Limits::default(), &cache, &zips()).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("loop")),
            "{err:?}"
        );
    }

    /// Links Lambda keeps as links stay links: absolute into /opt, dangling ones. Inside a
    /// followed directory, a link is judged by where it points on the host: one inside the
    /// followed tree stays a link, a pnpm workspace link out of it is followed.
    #[test]
    fn links_are_judged_where_they_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        let project = dir.path().join("project");
        write(&layer.join("bref/bin/php"), "elf", 0o755);
        fs::create_dir_all(layer.join("bin")).unwrap();
        symlink("/opt/bref/bin/php", layer.join("bin/php")).unwrap();
        symlink("../../lib64/libnothere.so.6", layer.join("bin/libc")).unwrap();
        write(&project.join("packages/shared/index.js"), "shared", 0o644);
        write(&project.join("node_modules/dep/index.js"), "dep", 0o644);
        fs::create_dir_all(project.join("node_modules/@scope")).unwrap();
        symlink(
            "../../packages/shared",
            project.join("node_modules/@scope/shared"),
        )
        .unwrap();
        symlink("dep/index.js", project.join("node_modules/main.js")).unwrap();
        fs::create_dir_all(layer.join("nodejs")).unwrap();
        symlink(
            project.join("node_modules"),
            layer.join("nodejs/node_modules"),
        )
        .unwrap();
        let cache = StatCache::default();
        let tree = walk(&[spec("l", &layer)], Limits::default(), &cache, &zips()).unwrap();
        let kind = |p: &str| tree.entries[p].kind.clone();
        let link = |t: &str| Kind::Symlink {
            target: PathBuf::from(t),
        };
        assert_eq!(kind("bin/php"), link("/opt/bref/bin/php"));
        assert_eq!(kind("bin/libc"), link("../../lib64/libnothere.so.6"));
        assert_eq!(kind("nodejs/node_modules"), Kind::Dir);
        assert_eq!(kind("nodejs/node_modules/main.js"), link("dep/index.js"));
        assert_eq!(kind("nodejs/node_modules/@scope/shared"), Kind::Dir);
        assert!(matches!(
            kind("nodejs/node_modules/@scope/shared/index.js"),
            Kind::File { .. }
        ));
    }

    /// Files keep their own time, directories carry 0, and a change of time alone changes the
    /// layer's digest (a `.pyc` is never paired with a source of another time).
    #[test]
    fn times_are_kept_and_part_of_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        write(&layer.join("pkg/m.py"), "x = 1", 0o644);
        let at = |seconds| filetime::FileTime::from_unix_time(seconds, 0);
        filetime::set_file_mtime(layer.join("pkg/m.py"), at(1_600_000_000)).unwrap();
        let cache = StatCache::default();
        let first = walk(&[spec("l", &layer)], Limits::default(), &cache, &zips()).unwrap();
        assert_eq!(first.entries["pkg/m.py"].mtime, 1_600_000_000);
        assert_eq!(first.entries["pkg"].mtime, 0);
        filetime::set_file_mtime(layer.join("pkg/m.py"), at(1_600_000_002)).unwrap();
        let second = walk(&[spec("l", &layer)], Limits::default(), &cache, &zips()).unwrap();
        assert_ne!(first.layer_digests, second.layer_digests);
    }

    #[test]
    fn digest_changes_with_content_and_limits_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        write(&layer.join("f"), "one", 0o644);
        let cache = StatCache::default();
        let first = walk(&[spec("l", &layer)], Limits::default(), &cache, &zips()).unwrap();
        write(&layer.join("f"), "two", 0o644);
        let second = walk(&[spec("l", &layer)], Limits::default(), &cache, &zips()).unwrap();
        assert_ne!(first.layer_digests, second.layer_digests);
        let tight = Limits {
            max_entries: 10,
            max_bytes: 2,
        };
        let err = walk(&[spec("l", &layer)], tight, &cache, &zips()).unwrap_err();
        assert!(matches!(&err, Error::ResourceExhausted(m) if m.contains("max_layer_bytes")));
    }

    /// Fifos are skipped with a bounded number of warnings and count against the entry limit.
    #[test]
    fn special_files_are_skipped_counted_and_warned_about_boundedly() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        fs::create_dir_all(&layer).unwrap();
        write(&layer.join("real.txt"), "x", 0o644);
        for index in 0..30 {
            let path = std::ffi::CString::new(
                layer
                    .join(format!("fifo{index}"))
                    .as_os_str()
                    .as_encoded_bytes(),
            )
            .unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
        }
        let tree = walk(
            &[spec("l", &layer)],
            Limits::default(),
            &StatCache::default(),
            &zips(),
        )
        .unwrap();
        assert_eq!(tree.entries.keys().collect::<Vec<_>>(), ["real.txt"]);
        assert_eq!(tree.warnings.len(), MAX_SKIP_WARNINGS);
        let tight = Limits {
            max_entries: 10,
            max_bytes: 1 << 20,
        };
        let err = walk(&[spec("l", &layer)], tight, &StatCache::default(), &zips()).unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err:?}");
    }

    /// A zip layer the peer may not read is PERMISSION_DENIED naming the layer, the file and
    /// the peer's uid, not "neither a directory nor a zip archive" (aws-sam-cli#1491).
    #[test]
    fn an_unreadable_zip_layer_is_permission_denied_naming_the_file_and_the_peer() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let archive = dir.path().join("private.zip");
        write(&archive, "PK\x03\x04 not for others", 0o600);
        let peer = crate::access::Peer::new(65534, 65534, None);
        let err = crate::access::as_peer(&peer, || {
            walk(
                &[spec("secret", &archive)],
                Limits::default(),
                &StatCache::default(),
                &zips(),
            )
        })
        .map_err(|err| crate::access::denied_for(&peer, err))
        .unwrap_err();
        let Error::PermissionDenied(message) = &err else {
            panic!("not PERMISSION_DENIED: {err:?}");
        };
        for part in ["\"secret\"", &archive.display().to_string(), "uid 65534"] {
            assert!(message.contains(part), "{part} missing: {message}");
        }
    }

    /// The deploy limits count each layer's files (not the merged tree): more than five layers
    /// and more than 262,144,000 bytes unzipped each warn once.
    #[test]
    fn deploy_limits_warn_once_past_lambdas_limits() {
        let file = |path: &str, size: u64, layer: usize| Entry {
            path: path.to_owned(),
            kind: Kind::File {
                source: PathBuf::from("/nonexistent"),
                size,
                key: StatKey::default(),
                digest: [0; 32],
            },
            mode: 0o644,
            mtime: 0,
            layer,
            from_cache: false,
        };
        let mut tree = Tree {
            layers: vec![
                vec![file("a", 131_072_000, 0)],
                vec![file("a", 131_072_000, 1)],
            ],
            ..Tree::default()
        };
        deploy_limits(&mut tree, 5);
        assert!(tree.warnings.is_empty(), "{:?}", tree.warnings);
        tree.layers[1][0] = file("a", 131_072_001, 1);
        deploy_limits(&mut tree, 6);
        let codes: Vec<&str> = tree.warnings.iter().map(|w| w.code).collect();
        assert_eq!(codes, ["too_many_layers", "layers_too_large"]);
        assert!(
            tree.warnings[1].message.contains("262144001 bytes"),
            "{:?}",
            tree.warnings
        );
    }

    /// A later layer writing into a directory an earlier layer ships without owner write is
    /// an `unreadable_in_lambda` warning naming the files and the earlier layer (Lambda: "Some
    /// files need to be overridden by layers but don't have write permissions"); the image's
    /// directory is 0755; a later layer writing elsewhere says nothing.
    #[test]
    fn writing_into_a_directory_an_earlier_layer_locked_warns() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        write(&a.join("python/base.py"), "base", 0o644);
        fs::set_permissions(a.join("python"), fs::Permissions::from_mode(0o555)).unwrap();
        write(&b.join("python/extra.py"), "extra", 0o644);
        write(&c.join("other/x"), "x", 0o644);
        let cache = StatCache::default();
        let tree = walk(
            &[
                spec("locked", &a),
                spec("writer", &b),
                spec("elsewhere", &c),
            ],
            Limits::default(),
            &cache,
            &zips(),
        )
        .unwrap();
        fs::set_permissions(a.join("python"), fs::Permissions::from_mode(0o755)).unwrap();
        let warnings: Vec<&Warning> = tree
            .warnings
            .iter()
            .filter(|w| w.code == lambda_rules::UNREADABLE)
            .collect();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let text = &warnings[0].message;
        for part in [
            "layer \"writer\"",
            "\"python/extra.py\"",
            "\"locked\"",
            "overridden",
        ] {
            assert!(text.contains(part), "{part} missing: {text}");
        }
        assert_eq!(tree.entries["python"].mode, 0o755);
    }

    #[test]
    fn link_target_check_is_lexical() {
        assert!(stays_inside("a/link", Path::new("../b")));
        assert!(!stays_inside("link", Path::new("../b")));
        assert!(!stays_inside("a/link", Path::new("/etc/passwd")));
        assert!(stays_inside("a/b/link", Path::new("../../c")));
        assert!(!stays_inside("a/link", Path::new("x/../../../y")));
    }
}
