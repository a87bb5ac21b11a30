//! File identity, content hashing and the stat cache.
//!
//! A file's identity is its [`StatKey`]: (device, inode, size, mtime, ctime), as in git's
//! index. [`StatCache`] remembers each file's sha256 under that key, so an unchanged file costs
//! one `fstat` and no reads; it is persisted across restarts. Both the layer walk
//! (`layers.rs`) and zip extraction (`archive.rs`) hash through it, and the image archive
//! (`assemble.rs`) uses [`StatKey`] to check it sends the very file that was hashed.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::atomic_file;
use crate::error::{Error, Result};

/// The (device, inode, size, mtime, ctime) key of git's index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl StatKey {
    /// The key of `meta`.
    pub fn of(meta: &fs::Metadata) -> StatKey {
        StatKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// File timestamps come from a coarse clock: a file changed within this window of being hashed
/// may keep the same key, so its hash is not remembered (git's "racy" entries).
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Per-file content hashes keyed by stat data.
#[derive(Debug, Default)]
pub struct StatCache {
    files: Mutex<HashMap<PathBuf, (StatKey, [u8; 32])>>,
    /// Files read and hashed (misses), for GetInfo and the benchmarks.
    pub files_hashed: AtomicU64,
    /// Bytes read for hashing.
    pub bytes_hashed: AtomicU64,
    /// Entries added since the last save.
    dirty: AtomicBool,
    /// The ELF machine of contents already looked at, by sha256 (`None`: not an ELF file), so
    /// a warm request does not read `/opt/bootstrap` and `/opt/extensions/*` again. In memory.
    elf_machines: Mutex<HashMap<[u8; 32], Option<u16>>>,
}

/// Contents whose ELF machine is remembered; the map is emptied when it would grow past this.
const MAX_ELF_MACHINES: usize = 4096;

/// On-disk form of the stat cache. A file of another version, or one that does not parse, is
/// ignored (and replaced at the next save), never trusted.
#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted {
    version: u32,
    /// (path, dev, ino, size, mtime_ns, ctime_ns, sha256 hex)
    entries: Vec<(PathBuf, u64, u64, u64, i128, i128, String)>,
}

const PERSISTED_VERSION: u32 = 1;

impl StatCache {
    /// Loads the cache saved at `path`; anything unreadable gives an empty cache.
    pub fn load(path: &Path) -> StatCache {
        remove_temp_files(path);
        let cache = StatCache::default();
        let Ok(bytes) = fs::read(path) else {
            return cache;
        };
        let Ok(persisted) = serde_json::from_slice::<Persisted>(&bytes) else {
            tracing::warn!(path = %path.display(), "ignoring an unreadable stat cache");
            return cache;
        };
        if persisted.version != PERSISTED_VERSION {
            tracing::warn!(path = %path.display(), version = persisted.version, "ignoring a stat cache of another version");
            return cache;
        }
        let mut files = cache.lock();
        for (file, dev, ino, size, mtime_ns, ctime_ns, digest) in persisted.entries {
            let mut bytes = [0u8; 32];
            if hex::decode_to_slice(&digest, &mut bytes).is_ok() {
                files.insert(
                    file,
                    (
                        StatKey {
                            dev,
                            ino,
                            size,
                            mtime_ns,
                            ctime_ns,
                        },
                        bytes,
                    ),
                );
            }
        }
        drop(files);
        cache
    }

    /// Drops the entries of files that no longer exist (`lstat` says ENOENT or ENOTDIR), so a
    /// long-running daemon does not keep, in memory and on disk, every file of every layer
    /// directory a client ever built from and then deleted (a CI runner's checkouts, temp
    /// dirs). One `lstat` per entry, as the daemon itself (the entries' paths were read with a
    /// client's rights: a file we cannot see now is kept). Returns how many were dropped; the
    /// next save writes the smaller cache.
    pub fn forget_missing(&self) -> usize {
        let paths: Vec<PathBuf> = self.lock().keys().cloned().collect();
        let gone: Vec<PathBuf> = paths
            .into_iter()
            .filter(|path| match fs::symlink_metadata(path) {
                Ok(_) => false,
                Err(err) => matches!(err.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)),
            })
            .collect();
        if gone.is_empty() {
            return 0;
        }
        let mut files = self.lock();
        for path in &gone {
            files.remove(path);
        }
        drop(files);
        self.dirty.store(true, Ordering::Relaxed);
        gone.len()
    }

    /// Saves the cache atomically (temp file, fsync, rename) if it changed since the last save.
    pub fn save_if_dirty(&self, path: &Path) -> Result<()> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let entries = self
            .lock()
            .iter()
            .map(|(file, (k, digest))| {
                (
                    file.clone(),
                    k.dev,
                    k.ino,
                    k.size,
                    k.mtime_ns,
                    k.ctime_ns,
                    hex::encode(digest),
                )
            })
            .collect();
        let persisted = Persisted {
            version: PERSISTED_VERSION,
            entries,
        };
        let bytes = serde_json::to_vec(&persisted)
            .map_err(|err| Error::Internal(format!("serialising the stat cache: {err}")))?;
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(Error::Internal(format!(
                "stat cache path {} has no directory and name",
                path.display()
            )));
        };
        atomic_file::write(
            dir,
            &name.to_string_lossy(),
            &bytes,
            atomic_file::Durability::Synced,
        )
        .map_err(|err| {
            self.dirty.store(true, Ordering::Relaxed);
            Error::io("saving the stat cache", path, &err)
        })
    }
}

/// Removes the temp files of `path` a killed daemon left (see [`atomic_file`]; and
/// `<stem>.tmp-<pid>`, the name daemons before it used); they are never read.
fn remove_temp_files(path: &Path) {
    let (Some(parent), Some(stem)) = (path.parent(), path.file_stem()) else {
        return;
    };
    let legacy = format!("{}.tmp-", stem.to_string_lossy());
    atomic_file::remove_temp_files(parent, &[&legacy]);
}

impl StatCache {
    /// The sha256 of `path`'s content, from the cache when its stat key is unchanged. The
    /// file is opened either way (with the calling thread's rights), so a cached digest is
    /// never handed out for a file the caller could not read.
    /// The ELF machine of the content with sha256 `digest`, from `read` the first time that
    /// content is seen (same bytes, same answer), remembered after.
    pub fn elf_machine(
        &self,
        digest: &[u8; 32],
        read: impl FnOnce() -> Option<u16>,
    ) -> Option<u16> {
        if let Some(known) = crate::sync::lock(&self.elf_machines).get(digest) {
            return *known;
        }
        let machine = read();
        let mut known = crate::sync::lock(&self.elf_machines);
        if known.len() >= MAX_ELF_MACHINES {
            known.clear();
        }
        known.insert(*digest, machine);
        machine
    }

    pub fn file_digest(&self, path: &Path) -> Result<[u8; 32]> {
        let (mut file, meta) = open_regular_with_meta(path)?;
        self.digest_with_meta(path, &mut file, &meta)
    }

    /// Like [`StatCache::file_digest`], failing when the file is no longer the one walked.
    pub fn file_digest_of(&self, path: &Path, walked: &StatKey) -> Result<[u8; 32]> {
        let (mut file, now) = open_regular_with_meta(path)?;
        if StatKey::of(&now) != *walked {
            return Err(changed_under_us(path));
        }
        self.digest_with_meta(path, &mut file, &now)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (StatKey, [u8; 32])>> {
        // A panic while holding this lock leaves a plain map behind; it is still consistent.
        crate::sync::lock(&self.files)
    }
}

impl StatCache {
    /// Like [`StatCache::file_digest`] for a file already open (so the digest is of exactly
    /// what will be read from it); leaves the file positioned at its start.
    pub fn digest_of_open(&self, path: &Path, file: &mut File) -> Result<[u8; 32]> {
        let meta = file
            .metadata()
            .map_err(|err| Error::io("reading", path, &err))?;
        self.digest_with_meta(path, file, &meta)
    }

    /// [`StatCache::digest_of_open`] with `file`'s metadata already read (one `fstat` per
    /// file on a warm hit, not three).
    fn digest_with_meta(
        &self,
        path: &Path,
        file: &mut File,
        meta: &fs::Metadata,
    ) -> Result<[u8; 32]> {
        use std::io::Seek;
        let key = StatKey::of(meta);
        if let Some((cached, digest)) = self.lock().get(path)
            && *cached == key
        {
            return Ok(*digest);
        }
        let started = SystemTime::now();
        tracing::debug!(path = %path.display(), size = key.size, "hashing");
        // Never more than the size just seen: a file growing under us cannot keep us reading.
        let digest = hash_reader(path, &mut Read::take(&mut *file, key.size))?;
        file.rewind()
            .map_err(|err| Error::io("reading", path, &err))?;
        self.files_hashed.fetch_add(1, Ordering::Relaxed);
        self.bytes_hashed.fetch_add(key.size, Ordering::Relaxed);
        if settled(&key, started) {
            self.lock().insert(path.to_owned(), (key, digest));
            self.dirty.store(true, Ordering::Relaxed);
        }
        Ok(digest)
    }
}

fn settled(key: &StatKey, started: SystemTime) -> bool {
    let started_ns = started
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i128;
    key.ctime_ns.max(key.mtime_ns) + (RACY_WINDOW.as_nanos() as i128) < started_ns
}

/// The error for a layer file that changed while a request was reading it.
pub fn changed_under_us(path: &Path) -> Error {
    Error::FileChanged(path.to_owned())
}

/// Opens a file that must be a regular file. O_NONBLOCK so that a path swapped for a fifo
/// cannot hang the reading thread; a device or fifo is refused after the open.
pub fn open_regular(path: &Path) -> Result<File> {
    open_regular_with_meta(path).map(|(file, _)| file)
}

/// [`open_regular`], with the metadata it checked.
fn open_regular_with_meta(path: &Path) -> Result<(File, fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|err| Error::io("reading layer file", path, &err))?;
    let meta = file
        .metadata()
        .map_err(|err| Error::io("reading", path, &err))?;
    if !meta.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a regular file (a fifo, socket or device cannot be part of an image)",
            path.display()
        )));
    }
    Ok((file, meta))
}

fn hash_reader(path: &Path, file: &mut impl Read) -> Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(Error::io("reading", path, &err)),
        };
        hasher.update(&buffer[..read]);
    }
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries of files that are gone (deleted, or under a path that is now a file) are
    /// forgotten, and the next save writes the smaller cache; existing files are kept.
    #[test]
    fn forget_missing_drops_only_files_that_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("kept");
        fs::write(&kept, "content").unwrap();
        let deleted = dir.path().join("deleted");
        let under_a_file = kept.join("child");
        let cache = StatCache::default();
        let key = StatKey::of(&fs::metadata(&kept).unwrap());
        for path in [&kept, &deleted, &under_a_file] {
            cache.lock().insert(path.clone(), (key, [7; 32]));
        }
        assert_eq!(cache.forget_missing(), 2);
        assert_eq!(cache.forget_missing(), 0, "nothing more to forget");
        let saved = dir.path().join("statcache.json");
        cache.save_if_dirty(&saved).unwrap();
        let loaded = StatCache::load(&saved);
        let files = loaded.lock();
        assert_eq!(files.len(), 1);
        assert!(files.contains_key(&kept));
    }

    /// The cache survives a save and load; a corrupt or foreign-version file is ignored.
    #[test]
    fn stat_cache_persists_atomically_and_distrusts_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, "content").unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(old)
            .unwrap();
        // ctime cannot be set back: wait out the racy window instead (bounded).
        std::thread::sleep(RACY_WINDOW + Duration::from_millis(100));
        let cache = StatCache::default();
        let digest = cache.file_digest(&file).unwrap();
        let saved = dir.path().join("statcache.json");
        cache.save_if_dirty(&saved).unwrap();
        let loaded = StatCache::load(&saved);
        assert_eq!(loaded.file_digest(&file).unwrap(), digest);
        assert_eq!(
            loaded.files_hashed.load(Ordering::Relaxed),
            0,
            "served from the loaded cache"
        );
        fs::write(&saved, b"{not json").unwrap();
        assert_eq!(StatCache::load(&saved).lock().len(), 0);
        fs::write(&saved, br#"{"version":99,"entries":[]}"#).unwrap();
        assert_eq!(StatCache::load(&saved).lock().len(), 0);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temp files left: {names:?}");
    }
}
