//! Zip layer sources, extracted once into the content-addressed cache `layers/<sha256>/`.
//!
//! A zip is detected by its content (the local-file magic), not its name. Extraction goes into
//! a temporary directory that is renamed into place only when complete, so a crash never
//! leaves a half layer that is later trusted (leftover `.tmp-*` directories are removed at
//! start-up and never read). Rejected, naming the entry: absolute, drive-letter and `..`
//! paths (zip-slip), entries below a symlink entry (writing through a link), links pointing
//! outside the layer, duplicate names, devices/fifos/sockets, and bombs (limits on total
//! bytes, entry count and compression ratio). Modes follow design §2: anything executable
//! 0755, other files 0644, directories 0755; an entry without Unix modes (zips made on
//! Windows) is made 0755, so a `bootstrap` zipped on Windows still runs.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::layers::{StatCache, StatKey, changed_under_us, open_regular};

/// Limits on what one archive may extract to.
#[derive(Debug, Clone, Copy)]
pub struct ZipLimits {
    /// Most bytes an archive may extract to.
    pub max_bytes: u64,
    /// Most entries in an archive.
    pub max_entries: usize,
    /// Largest compression ratio (uncompressed / compressed) for entries over 1 MiB.
    pub max_ratio: u64,
}

impl Default for ZipLimits {
    fn default() -> Self {
        ZipLimits {
            max_bytes: 4 << 30,
            max_entries: 200_000,
            max_ratio: 200,
        }
    }
}

/// True when `path` is a regular file that starts like a zip archive.
pub fn is_zip(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    open_regular(path)
        .ok()
        .is_some_and(|mut f| f.read_exact(&mut magic).is_ok())
        && (magic == *b"PK\x03\x04" || magic == *b"PK\x05\x06")
}

/// The extracted-layer cache.
#[derive(Debug)]
pub struct ZipStore {
    root: PathBuf,
    limits: ZipLimits,
    /// One lock per archive digest: two requests for the same zip extract it once.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl ZipStore {
    /// A store under `root` (`<cache>/layers`); removes leftovers of interrupted extractions.
    pub fn open(root: PathBuf, limits: ZipLimits) -> ZipStore {
        if let Ok(entries) = fs::read_dir(&root) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        ZipStore {
            root,
            limits,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// Where extracted layers live.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The extracted directory for the zip at `archive`, extracting it if needed.
    ///
    /// The archive is opened (and hashed) by the calling thread, so with the requesting
    /// peer's rights when called inside `access::as_peer`; the cache is written with the
    /// daemon's own rights.
    pub fn extracted(&self, name: &str, archive: &Path, cache: &StatCache) -> Result<PathBuf> {
        let mut file = open_regular(archive)?;
        let before = file
            .metadata()
            .map_err(|err| Error::io("reading", archive, &err))?;
        let digest = hex::encode(cache.digest_of_open(archive, &mut file)?);
        // The archive is the client's and may be rewritten while we read it twice (hash, then
        // extract): the cache entry is published only if it is still the same file after.
        let check = file
            .try_clone()
            .map_err(|err| Error::io("reading", archive, &err))?;
        let unchanged = move || {
            check
                .metadata()
                .is_ok_and(|now| StatKey::of(&now) == StatKey::of(&before))
        };
        crate::access::as_daemon(|| self.extract_once(name, archive, file, &digest, &unchanged))
    }

    fn extract_once(
        &self,
        name: &str,
        archive: &Path,
        file: File,
        digest: &str,
        unchanged: &dyn Fn() -> bool,
    ) -> Result<PathBuf> {
        let target = self.root.join(digest);
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(digest.to_owned()).or_default().clone()
        };
        let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        if target.is_dir() {
            touch(&target);
            return Ok(target);
        }
        fs::create_dir_all(&self.root).map_err(|err| Error::io("creating", &self.root, &err))?;
        let temp = self
            .root
            .join(format!(".tmp-{digest}-{}", uuid::Uuid::new_v4().simple()));
        let result = extract(name, archive, file, digest, &temp, self.limits).and_then(|()| {
            if unchanged() {
                Ok(())
            } else {
                Err(changed_under_us(archive))
            }
        });
        if let Err(err) = result {
            let _ = fs::remove_dir_all(&temp);
            return Err(err);
        }
        fs::rename(&temp, &target).map_err(|err| {
            let _ = fs::remove_dir_all(&temp);
            Error::io("publishing extracted layer", &target, &err)
        })?;
        sync_dir(&self.root);
        Ok(target)
    }
}

/// Marks an extracted layer as used now (its directory mtime is its last use, for prune).
fn touch(dir: &Path) {
    let _ = File::open(dir).and_then(|f| f.set_modified(std::time::SystemTime::now()));
}

fn sync_dir(dir: &Path) {
    let _ = File::open(dir).and_then(|f| f.sync_all());
}

fn bad(name: &str, entry: &str, why: &str) -> Error {
    Error::InvalidArgument(format!(
        "layer {name:?}: zip entry {entry:?} rejected: {why}"
    ))
}

/// Checks an entry name and returns its normalised relative path.
fn safe_path(name: &str, raw: &str) -> Result<PathBuf> {
    let text = raw.replace('\\', "/");
    let bytes = text.as_bytes();
    if text.starts_with('/')
        || (bytes.len() >= 2 && bytes[1] == b':' && bytes[0].is_ascii_alphabetic())
    {
        return Err(bad(name, raw, "absolute or drive-letter path"));
    }
    if text.contains('\0') {
        return Err(bad(name, raw, "NUL in the name"));
    }
    let mut path = PathBuf::new();
    for component in Path::new(&text).components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(bad(name, raw, "'..' would write outside the layer"));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad(name, raw, "absolute path"));
            }
        }
    }
    if path.as_os_str().is_empty() {
        return Err(bad(name, raw, "empty path"));
    }
    Ok(path)
}

const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;

fn extract(
    name: &str,
    archive: &Path,
    file: File,
    digest: &str,
    temp: &Path,
    limits: ZipLimits,
) -> Result<()> {
    let mut zip = zip::ZipArchive::new(io::BufReader::new(file)).map_err(|err| {
        Error::InvalidArgument(format!(
            "layer {name:?}: {} is not a readable zip: {err}",
            archive.display()
        ))
    })?;
    // The zip crate keys entries by name, so duplicates would be merged silently.
    if zip.has_duplicate_names() {
        return Err(Error::InvalidArgument(format!(
            "layer {name:?}: zip {} rejected: it holds duplicate entry names",
            archive.display()
        )));
    }
    if zip.len() > limits.max_entries {
        return Err(Error::InvalidArgument(format!(
            "layer {name:?}: the zip has {} entries, more than max_zip_entries = {}",
            zip.len(),
            limits.max_entries
        )));
    }
    fs::create_dir(temp).map_err(|err| Error::io("creating", temp, &err))?;
    let mut seen = HashSet::new();
    let mut links: Vec<(PathBuf, PathBuf, String)> = Vec::new();
    let mut link_paths = HashSet::new();
    let mut total: u64 = 0;
    for index in 0..zip.len() {
        let mut entry = zip.by_index(index).map_err(|err| {
            Error::InvalidArgument(format!(
                "layer {name:?}: zip entry #{index} is unreadable: {err}"
            ))
        })?;
        let raw = String::from_utf8_lossy(entry.name_raw()).into_owned();
        let rel = safe_path(name, &raw)?;
        if !seen.insert(rel.clone()) {
            return Err(bad(name, &raw, "duplicate name"));
        }
        if rel.ancestors().skip(1).any(|a| link_paths.contains(a)) {
            return Err(bad(
                name,
                &raw,
                "it would be written through a symlink entry",
            ));
        }
        // Only an archive made on Unix carries Unix modes; for others (Explorer, 7-Zip, Python
        // on Windows: "MS-DOS" entries) the zip crate invents 0o664, which would make a
        // Windows-zipped bootstrap non-executable (SAM #1014). Treat them as mode-less.
        let mode = if entry.system() == zip::System::Unix {
            entry.unix_mode()
        } else {
            None
        };
        let kind = mode.map(|m| m & S_IFMT).unwrap_or(0);
        let is_dir = entry.is_dir() || kind == S_IFDIR;
        let is_link = kind == S_IFLNK;
        if kind != 0 && !is_dir && !is_link && kind != S_IFREG {
            return Err(bad(
                name,
                &raw,
                "device, fifo or socket entries are not allowed",
            ));
        }
        let dest = temp.join(&rel);
        if is_dir {
            fs::create_dir_all(&dest).map_err(|err| Error::io("extracting", &dest, &err))?;
            continue;
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|err| Error::io("extracting", parent, &err))?;
        }
        let size = entry.size();
        total = total.saturating_add(size);
        if total > limits.max_bytes {
            return Err(bad(
                name,
                &raw,
                &format!(
                    "the archive extracts to more than max_zip_bytes = {}",
                    limits.max_bytes
                ),
            ));
        }
        let compressed = entry.compressed_size().max(1);
        if size > (1 << 20) && size / compressed > limits.max_ratio {
            return Err(bad(
                name,
                &raw,
                &format!(
                    "compression ratio {}:1 exceeds max_zip_ratio = {}",
                    size / compressed,
                    limits.max_ratio
                ),
            ));
        }
        if is_link {
            let mut target = String::new();
            entry
                .by_ref()
                .take(4096)
                .read_to_string(&mut target)
                .map_err(|err| bad(name, &raw, &err.to_string()))?;
            links.push((rel.clone(), PathBuf::from(target), raw));
            link_paths.insert(rel);
            continue;
        }
        // create_new + O_NOFOLLOW: never write through anything already there.
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&dest)
            .map_err(|err| Error::io("extracting", &dest, &err))?;
        // Never trust the declared size: read at most one byte more than it says.
        let written = io::copy(&mut entry.by_ref().take(size + 1), &mut out)
            .map_err(|err| bad(name, &raw, &format!("cannot decompress: {err}")))?;
        if written != size {
            return Err(bad(name, &raw, "its data does not match its declared size"));
        }
        out.flush()
            .map_err(|err| Error::io("extracting", &dest, &err))?;
        // No Unix permission bits at all: made on Windows; assume executable (SAM #1014).
        let executable = mode.is_none_or(|m| m & 0o777 == 0 || m & 0o111 != 0);
        let perm = if executable { 0o755 } else { 0o644 };
        fs::set_permissions(&dest, fs::Permissions::from_mode(perm))
            .map_err(|err| Error::io("extracting", &dest, &err))?;
    }
    // Links last, so nothing is ever written through one.
    for (rel, target, raw) in links {
        let depth = rel.components().count() as i64 - 1;
        let mut level = depth;
        let mut inside = !target.is_absolute();
        for component in target.components() {
            match component {
                Component::ParentDir => level -= 1,
                Component::Normal(_) => level += 1,
                _ => {}
            }
            inside &= level >= 0;
        }
        if !inside {
            return Err(bad(name, &raw, "symlink points outside the layer"));
        }
        // A target walking through another link (`x -> a/b/..` with `a/b -> ..`) could still
        // leave the layer: no link may be an intermediate step of another link's target.
        let mut current = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        let steps: Vec<Component> = target.components().collect();
        for (index, component) in steps.iter().enumerate() {
            match component {
                Component::ParentDir => {
                    current.pop();
                }
                Component::Normal(part) => {
                    current.push(part);
                    if index + 1 < steps.len() && link_paths.contains(&current) {
                        return Err(bad(
                            name,
                            &raw,
                            "symlink target passes through another symlink",
                        ));
                    }
                }
                _ => {}
            }
        }
        let dest = temp.join(&rel);
        std::os::unix::fs::symlink(&target, &dest)
            .map_err(|err| Error::io("extracting", &dest, &err))?;
    }
    // Directories 0755 regardless of the archive.
    set_dir_modes(temp)?;
    sync_dir(temp);
    tracing::info!(layer = name, archive = %archive.display(), digest, bytes = total, "extracted zip layer");
    Ok(())
}

fn set_dir_modes(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .map_err(|err| Error::io("extracting", dir, &err))?;
    for entry in fs::read_dir(dir)
        .map_err(|err| Error::io("extracting", dir, &err))?
        .flatten()
    {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            set_dir_modes(&entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use zip::write::SimpleFileOptions;

    use super::*;

    fn make_zip(path: &Path, entries: &[(&str, &[u8], Option<u32>)]) {
        let mut writer = zip::ZipWriter::new(File::create(path).unwrap());
        for (name, data, mode) in entries {
            let mut options =
                SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
            if let Some(mode) = mode {
                options = options.unix_permissions(*mode);
            }
            if let Some(target) = name.strip_prefix("link:") {
                let (link, to) = target.split_once("->").unwrap();
                writer.add_symlink(link, to, options).unwrap();
                continue;
            }
            writer.start_file(*name, options).unwrap();
            writer.write_all(data).unwrap();
        }
        writer.finish().unwrap();
    }

    fn store(dir: &Path) -> ZipStore {
        ZipStore::open(dir.join("layers"), ZipLimits::default())
    }

    #[test]
    fn extracts_once_with_normalised_modes() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("layer.bin");
        make_zip(
            &archive,
            &[
                ("bootstrap", b"#!/bin/sh", Some(0o700)),
                ("lib/data.txt", b"data", Some(0o4666)),
                ("link:lib/alias->data.txt", b"", None),
            ],
        );
        assert!(is_zip(&archive), "detected by content, not by name");
        let store = store(dir.path());
        let cache = StatCache::default();
        let out = store.extracted("l", &archive, &cache).unwrap();
        let mode = |p: &str| {
            fs::symlink_metadata(out.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("bootstrap"), 0o755);
        assert_eq!(mode("lib/data.txt"), 0o644);
        assert_eq!(mode("lib"), 0o755);
        assert_eq!(
            fs::read_link(out.join("lib/alias")).unwrap(),
            PathBuf::from("data.txt")
        );
        let again = store.extracted("l", &archive, &cache).unwrap();
        assert_eq!(out, again);
        assert_eq!(
            fs::read_dir(store.root()).unwrap().count(),
            1,
            "no temp dirs left"
        );
    }

    /// One entry of a hand-made archive: its name exactly as stored, its bytes (a link's
    /// target for a link), and its Unix `st_mode` (`None`: made on Windows, no Unix modes).
    struct Raw<'a>(&'a str, &'a [u8], Option<u32>);

    /// The bytes of a stored (uncompressed) zip holding `entries` exactly as given: unlike a
    /// zip writer, this refuses nothing (`..`, absolute and drive names, duplicates, links,
    /// fifos), so every hostile case reaches the extractor. Layout: APPNOTE 6.3.10 §4.3.
    fn hand_zip(entries: &[Raw]) -> Vec<u8> {
        fn u16le(out: &mut Vec<u8>, v: usize) {
            out.extend_from_slice(&u16::try_from(v).unwrap().to_le_bytes());
        }
        fn u32le(out: &mut Vec<u8>, v: u64) {
            out.extend_from_slice(&u32::try_from(v).unwrap().to_le_bytes());
        }
        let mut out = Vec::new();
        let mut central = Vec::new();
        for Raw(name, data, mode) in entries {
            let offset = out.len() as u64;
            let crc = u64::from(crc32fast::hash(data));
            let size = data.len() as u64;
            // Shared by both headers: version needed, flags, method (stored), time, date
            // (1980-01-01), crc, sizes, name length, extra length.
            let mut common = Vec::new();
            for v in [20, 0, 0, 0, 0x21] {
                u16le(&mut common, v);
            }
            for v in [crc, size, size] {
                u32le(&mut common, v);
            }
            u16le(&mut common, name.len());
            u16le(&mut common, 0);

            u32le(&mut out, 0x0403_4b50);
            out.extend_from_slice(&common);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);

            u32le(&mut central, 0x0201_4b50);
            // Version made by: host 3 (Unix) carries st_mode in the external attributes.
            u16le(
                &mut central,
                if mode.is_some() { (3 << 8) | 20 } else { 20 },
            );
            central.extend_from_slice(&common);
            for v in [0, 0, 0] {
                u16le(&mut central, v); // comment length, disk, internal attributes
            }
            u32le(&mut central, u64::from(mode.unwrap_or(0)) << 16);
            u32le(&mut central, offset);
            central.extend_from_slice(name.as_bytes());
        }
        let central_offset = out.len() as u64;
        out.extend_from_slice(&central);
        u32le(&mut out, 0x0605_4b50);
        for v in [0, 0, entries.len(), entries.len()] {
            u16le(&mut out, v);
        }
        u32le(&mut out, central.len() as u64);
        u32le(&mut out, central_offset);
        u16le(&mut out, 0);
        out
    }

    /// The hand-made archive is a valid zip (files, links, Windows entries extract as
    /// written), so the rejections below are the extractor's, not a reader's failure.
    #[test]
    fn hand_made_archives_extract_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("plain.zip");
        fs::write(
            &archive,
            hand_zip(&[
                Raw("bin/run", b"#!/bin/sh", Some(0o100_700)),
                Raw("bin/alias", b"run", Some(0o120_777)),
                Raw("readme", b"made on windows", None),
            ]),
        )
        .unwrap();
        let out = store(dir.path())
            .extracted("plain", &archive, &StatCache::default())
            .unwrap();
        assert_eq!(fs::read(out.join("bin/run")).unwrap(), b"#!/bin/sh");
        assert_eq!(
            fs::read_link(out.join("bin/alias")).unwrap(),
            PathBuf::from("run")
        );
        assert_eq!(fs::read(out.join("readme")).unwrap(), b"made on windows");
    }

    /// Every hostile archive is rejected for its own reason, and nothing is left in the cache
    /// root or beside it.
    #[test]
    fn malicious_archives_are_rejected_and_nothing_is_left() {
        const FILE: Option<u32> = Some(0o100_644);
        const LINK: Option<u32> = Some(0o120_777);
        let dir = tempfile::tempdir().unwrap();
        // (label, entries, the reason the error must give)
        let cases: Vec<(&str, Vec<Raw>, &str)> = vec![
            ("zip-slip", vec![Raw("../evil", b"x", FILE)], "'..'"),
            ("absolute", vec![Raw("/etc/evil", b"x", FILE)], "absolute"),
            ("drive", vec![Raw("C:\\evil", b"x", FILE)], "drive-letter"),
            (
                "backslash-slip",
                vec![Raw("a\\..\\..\\evil", b"x", FILE)],
                "'..'",
            ),
            (
                "duplicate",
                vec![Raw("a", b"x", FILE), Raw("a", b"y", FILE)],
                "duplicate entry names",
            ),
            (
                "duplicate-after-normalising",
                vec![Raw("a/b", b"x", FILE), Raw("a/./b", b"y", FILE)],
                "duplicate name",
            ),
            (
                "through-link",
                vec![Raw("d", b"/tmp", LINK), Raw("d/evil", b"x", FILE)],
                "written through a symlink",
            ),
            (
                "link-outside",
                vec![Raw("l", b"../../etc/passwd", LINK)],
                "points outside",
            ),
            (
                "absolute-link",
                vec![Raw("l", b"/etc/passwd", LINK)],
                "points outside",
            ),
            ("fifo", vec![Raw("pipe", b"", Some(0o010_644))], "fifo"),
        ];
        for (label, entries, why) in cases {
            let archive = dir.path().join(format!("{label}.zip"));
            fs::write(&archive, hand_zip(&entries)).unwrap();
            let store = store(dir.path());
            let Err(err) = store.extracted(label, &archive, &StatCache::default()) else {
                panic!("{label}: accepted");
            };
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.contains("rejected") && m.contains(why)),
                "{label}: {err:?}"
            );
            // `../evil` from the temp dir lands in the cache root itself: nothing may be there.
            let left: Vec<_> = fs::read_dir(store.root())
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "{label}: left {left:?} in the cache root");
        }
        // Two levels up from the temp dir is the directory holding the cache root.
        let mut beside: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".zip"))
            .collect();
        beside.sort();
        assert_eq!(beside, ["layers"], "nothing written beside the cache root");
    }

    #[test]
    fn bombs_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("bomb.zip");
        let zeros = vec![0u8; 8 << 20];
        make_zip(&archive, &[("zeros", &zeros, Some(0o644))]);
        let store = ZipStore::open(
            dir.path().join("layers"),
            ZipLimits {
                max_ratio: 100,
                ..Default::default()
            },
        );
        let err = store
            .extracted("bomb", &archive, &StatCache::default())
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("max_zip_ratio")),
            "{err:?}"
        );
        let store = ZipStore::open(
            dir.path().join("layers"),
            ZipLimits {
                max_bytes: 1 << 20,
                max_ratio: 1 << 20,
                ..Default::default()
            },
        );
        let err = store
            .extracted("bomb", &archive, &StatCache::default())
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("max_zip_bytes")),
            "{err:?}"
        );
    }

    #[test]
    fn leftover_temp_dirs_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("layers");
        fs::create_dir_all(root.join(".tmp-abc-123/partial")).unwrap();
        fs::create_dir_all(root.join("0123")).unwrap();
        let store = ZipStore::open(root.clone(), ZipLimits::default());
        let names: Vec<_> = fs::read_dir(store.root())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["0123"]);
    }
}
