//! Trees compared entry by entry: an image's filesystem read from `docker export`, and what
//! Lambda's `/opt` must hold for given directory layers.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// One entry of a file tree: what Lambda's `/opt` must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// 'd' directory, 'f' regular file, 'l' symbolic link.
    pub kind: char,
    /// Permission bits (links: not compared, 0).
    pub mode: u32,
    /// File size in bytes (0 otherwise).
    pub size: u64,
    /// sha256 of a file's bytes, a link's target, "" for a directory.
    pub content: String,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
}

/// The entries under `/opt` (paths relative to it) of `image`, read from `docker export`.
pub fn image_opt(image: &str) -> BTreeMap<String, Node> {
    image_tree(image, "opt")
}

/// The entries under `/<top>` (paths relative to it) of `image`, read from `docker export`.
pub fn image_tree(image: &str, top: &str) -> BTreeMap<String, Node> {
    image_tree_at(&super::engine_host(), image, top)
}

/// [`image_tree`] of an image in the engine at `host` (a second engine of a fleet test).
pub fn image_tree_at(host: &str, image: &str, top: &str) -> BTreeMap<String, Node> {
    use super::dockerd::{docker_at, docker_at_ok};
    let prefix = format!("{top}/");
    let id = docker_at_ok(host, &["create", image, "/bin/true"])
        .trim()
        .to_owned();
    let exported = docker_at(host, &["export", &id]);
    docker_at_ok(host, &["rm", &id]);
    assert!(exported.status.success(), "docker export {image} failed");
    let mut archive = tar::Archive::new(exported.stdout.as_slice());
    let mut tree = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let Some(rel) = path.strip_prefix(&prefix) else {
            continue;
        };
        let rel = rel.trim_end_matches('/').to_owned();
        if rel.is_empty() {
            continue;
        }
        let header = entry.header().clone();
        let mtime = header.mtime().unwrap();
        let node = match header.entry_type() {
            tar::EntryType::Directory => dir_node(header.mode().unwrap(), mtime),
            tar::EntryType::Symlink => {
                let target = entry.link_name().unwrap().unwrap();
                link_node(target.as_os_str().as_encoded_bytes(), mtime)
            }
            tar::EntryType::Regular => {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).unwrap();
                file_node(&bytes, header.mode().unwrap(), mtime)
            }
            other => panic!("{image}: /{top}/{rel} is a {other:?}"),
        };
        tree.insert(rel, node);
    }
    tree
}

pub fn dir_node(mode: u32, mtime: u64) -> Node {
    Node {
        kind: 'd',
        mode: mode & 0o7777,
        size: 0,
        content: String::new(),
        mtime,
    }
}

pub fn link_node(target: &[u8], mtime: u64) -> Node {
    Node {
        kind: 'l',
        mode: 0,
        size: 0,
        content: hex::encode(Sha256::digest(target)),
        mtime,
    }
}

pub fn file_node(bytes: &[u8], mode: u32, mtime: u64) -> Node {
    Node {
        kind: 'f',
        mode: mode & 0o7777,
        size: bytes.len() as u64,
        content: hex::encode(Sha256::digest(bytes)),
        mtime,
    }
}

/// What Lambda puts in `/opt` for these directory layers, merged in order (a later layer's
/// entry replaces a file or a whole subtree; directories merge), with the daemon's documented
/// normalisation: modes 0755 / 0644, directories time 0, files and links their own time.
pub fn expected_opt(layers: &[&Path]) -> BTreeMap<String, Node> {
    let mut merged: BTreeMap<String, Node> = BTreeMap::new();
    for layer in layers {
        let mut entries = BTreeMap::new();
        collect(layer, "", &mut entries);
        for (path, node) in entries {
            if node.kind != 'd' || merged.get(&path).is_some_and(|n| n.kind != 'd') {
                let prefix = format!("{path}/");
                merged.retain(|p, _| !p.starts_with(&prefix));
            }
            merged.insert(path, node);
        }
    }
    merged
}

pub fn collect(dir: &Path, rel: &str, out: &mut BTreeMap<String, Node>) {
    for item in fs::read_dir(dir).unwrap() {
        let item = item.unwrap();
        let name = item.file_name().into_string().unwrap();
        let rel = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let meta = fs::symlink_metadata(item.path()).unwrap();
        let mtime = u64::try_from(meta.mtime()).unwrap();
        if meta.is_dir() {
            out.insert(rel.clone(), dir_node(0o755, 0));
            collect(&item.path(), &rel, out);
        } else if meta.file_type().is_symlink() {
            let target = fs::read_link(item.path()).unwrap();
            out.insert(rel, link_node(target.as_os_str().as_encoded_bytes(), mtime));
        } else {
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            out.insert(rel, file_node(&fs::read(item.path()).unwrap(), mode, mtime));
        }
    }
}

/// Asserts two trees are equal, listing every differing path.
pub fn assert_same(what: &str, got: &BTreeMap<String, Node>, want: &BTreeMap<String, Node>) {
    let mut diffs = Vec::new();
    for (path, node) in want {
        match got.get(path) {
            Some(have) if have == node => {}
            Some(have) => diffs.push(format!("{path:?}: have {have:?}, want {node:?}")),
            None => diffs.push(format!("{path:?}: missing (want {node:?})")),
        }
    }
    for path in got.keys().filter(|p| !want.contains_key(*p)) {
        diffs.push(format!("{path:?}: unexpected {:?}", got[path]));
    }
    assert!(diffs.is_empty(), "{what}:\n{}", diffs.join("\n"));
}

/// Sets `path`'s (or a link's own) modification time.
pub fn set_time(path: &Path, seconds: i64) {
    let time = filetime::FileTime::from_unix_time(seconds, 0);
    filetime::set_symlink_file_times(path, time, time).unwrap();
}
