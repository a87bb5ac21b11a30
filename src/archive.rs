//! Zip layer sources, extracted once into the content-addressed cache `layers/<sha256>/`.
//!
//! A zip is detected by its content (the local-file magic), not its name. Extraction goes into
//! a temporary directory that is renamed into place only when complete, so a crash never
//! leaves a half layer that is later trusted (leftover `.tmp-*` directories are removed at
//! start-up and never read). Rejected, naming the entry: absolute, drive-letter and `..`
//! paths (zip-slip), entries below a symlink entry (writing through a link), a link entry over
//! a directory other entries are inside, link targets a link cannot hold (longer than 4095
//! bytes, empty, or with NUL: a file a broken packer stored as a link), a directory and a file
//! under one path, devices/fifos/sockets, and bombs ([`ZipLimits`]: absolute sizes, the ratio
//! only far away). Every refusal is INVALID_ARGUMENT naming the layer and the entry, never a
//! path of the daemon's cache. Every entry is judged from the central directory before
//! anything is written ([`survey`]); a path stored twice is the later entry's, as in Lambda.
//! Names are decoded as the format says ([`decode_name`]).
//!
//! Links are extracted as they are, wherever they point (`bin/php -> /opt/bref/bin/php`,
//! `lib/x -> ../../lib64/x`): Lambda does the same and they resolve inside the function's
//! filesystem. They are never followed on the host: nothing is written through one (links
//! are created last, files with `O_NOFOLLOW`), and the walk of an extracted layer keeps every
//! link as a link (`layers.rs`).
//!
//! File and link times are the entry's: the Info-ZIP extended-timestamp field (`UT`, UTC
//! seconds) where present, else the MS-DOS time read as UTC. Python checks each `.pyc`
//! against its source's mtime, so erasing times would recompile every module on each invoke.
//! Modes follow design §2: anything executable 0755, other files 0644, directories 0755; an
//! entry without Unix modes (zips made on Windows) is made 0755, so a `bootstrap` zipped on
//! Windows still runs.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use zip::unstable::read::ZipIterable;

use crate::error::{Error, Result};
use crate::lambda_rules::{self, Found};
use crate::stat_cache::{StatCache, StatKey, changed_under_us, open_regular};

/// Limits on what one archive may extract to: the zip-bomb guard.
///
/// The guard is by absolute sizes, checked on the central directory before anything is
/// written (a bomb is refused in the time it takes to read its directory): the declared
/// unzipped bytes of the whole archive, the entry count, and, while extracting, each entry's
/// bytes against its declared size (a bomb lying about its size stops one byte past it). The
/// defaults are far beyond any layer Lambda accepts (262,144,000 bytes unzipped for a function
/// and its layers together, Lambda quotas), so no real layer reaches them.
///
/// The compression ratio is only a secondary signal, for entries larger than [`RATIO_FROM`]:
/// real files reach deflate's own limit of about 1030:1 (a pre-allocated SQLite database of
/// zeros, issue 25), so a ratio alone says nothing about a file Lambda could hold.
#[derive(Debug, Clone, Copy)]
pub struct ZipLimits {
    /// Most bytes an archive may extract to (default 4 GiB, 16 times Lambda's limit).
    pub max_bytes: u64,
    /// Most entries in an archive (default 200,000).
    pub max_entries: usize,
    /// Largest compression ratio (uncompressed / compressed) of an entry larger than
    /// [`RATIO_FROM`] (default 200).
    pub max_ratio: u64,
}

/// Entries larger than this (256 MiB: more than Lambda's whole unzipped limit of 262,144,000
/// bytes, so no layer Lambda accepts holds one) are checked against `max_zip_ratio`; a 1 GiB
/// file of zeros (ratio about 1030:1) is refused before a byte of it is written.
pub const RATIO_FROM: u64 = 256 << 20;

impl Default for ZipLimits {
    fn default() -> Self {
        ZipLimits {
            max_bytes: 4 << 30,
            max_entries: 200_000,
            max_ratio: 200,
        }
    }
}

/// The layout of an extracted layer; bumped when extraction changes what it writes (2: entry
/// times kept, links kept wherever they point; 3: names decoded as the format says, a
/// backslash kept as part of a name).
pub const FORMAT: &str = "3";
/// The file under the store's root that records the [`FORMAT`] of what is in it.
const FORMAT_MARKER: &str = ".format";
/// The longest link target Linux stores (`PATH_MAX` minus the NUL).
const MAX_LINK_TARGET: u64 = 4095;

/// True when the regular file at `path` starts like a zip archive (the local-file or
/// end-of-central-directory signature, APPNOTE 4.3.7 and 4.3.16).
///
/// # Errors
/// The file cannot be opened by the calling thread (`ReadDenied` when it lacks the right, so a
/// zip layer the peer may not read is PERMISSION_DENIED naming it, not "not a zip archive").
pub fn is_zip(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 4];
    let mut file = open_regular(path)?;
    Ok(file.read_exact(&mut magic).is_ok() && (magic == *b"PK\x03\x04" || magic == *b"PK\x05\x06"))
}

/// The extracted-layer cache.
#[derive(Debug)]
pub struct ZipStore {
    root: PathBuf,
    limits: ZipLimits,
    /// One lock per archive digest being extracted or checked: two requests for the same zip
    /// extract it once. An entry lives only while someone holds it ([`DigestLock`]).
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// What each extracted archive warns about, by digest, so a cache hit warns as the
    /// extraction did (one build, one set of warnings). Derived data: after a restart, or once
    /// the map is cleared at [`MAX_REMEMBERED_NOTES`], a hit reads the central directory again.
    notes: Mutex<HashMap<String, Arc<Findings>>>,
}

/// Archives whose warnings are remembered before the memo starts afresh.
const MAX_REMEMBERED_NOTES: usize = 4096;

/// What the central directory says beyond the files: the notes, and what a later layer needs
/// to know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    /// Warnings about the archive.
    pub notes: Vec<Note>,
    /// Directories the archive ships without write permission for their owner (Lambda refuses
    /// a later layer that writes into one; `lambda_rules::locked_dirs`).
    pub locked_dirs: Vec<String>,
}

/// Something an archive does that Lambda would refuse or handle differently, worth a warning;
/// without the layer's name (one archive may be several layers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The warning's stable code (README, "What it does, and where it differs from SAM").
    pub code: &'static str,
    /// What was found and what Lambda does, with the rule's source.
    pub text: String,
}

impl ZipStore {
    /// A store under `root` (`<cache>/layers`); removes leftovers of interrupted extractions,
    /// and every entry extracted by another [`FORMAT`] (they are derived data: the next
    /// request extracts its archive again).
    pub fn open(root: PathBuf, limits: ZipLimits) -> ZipStore {
        let marker = root.join(FORMAT_MARKER);
        let current = fs::read_to_string(&marker).is_ok_and(|text| text.trim() == FORMAT);
        if let Ok(entries) = fs::read_dir(&root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(".tmp-") || (!current && !name.starts_with('.')) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        if !current && fs::create_dir_all(&root).is_ok() {
            let _ = fs::write(&marker, FORMAT);
        }
        ZipStore {
            root,
            limits,
            locks: Mutex::new(HashMap::new()),
            notes: Mutex::new(HashMap::new()),
        }
    }

    /// Where extracted layers live.
    #[cfg(test)]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The extracted directory for the zip at `archive`, extracting it if needed, and what
    /// the archive warns about (the same on every call, extracted or found in the cache).
    ///
    /// The archive is opened (and hashed) by the calling thread, so with the requesting
    /// peer's rights when called inside `access::as_peer`; the cache is written with the
    /// daemon's own rights.
    pub fn extracted(
        &self,
        name: &str,
        archive: &Path,
        cache: &StatCache,
    ) -> Result<(PathBuf, Arc<Findings>)> {
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
    ) -> Result<(PathBuf, Arc<Findings>)> {
        let target = self.root.join(digest);
        let entry = DigestLock::enter(&self.locks, digest);
        // Declared after `entry`, so dropped before it: the digest's lock is released before
        // its map entry is considered for removal.
        let _guard = crate::sync::lock(&entry.lock);
        if target.is_dir() {
            touch(&target);
            let known = crate::sync::lock(&self.notes).get(digest).cloned();
            let notes = match known {
                Some(notes) => notes,
                None => {
                    let mut zip = open_zip(name, archive, file, self.limits)?;
                    self.remember(digest, survey(name, &mut zip, self.limits)?.findings)
                }
            };
            return Ok((target, notes));
        }
        fs::create_dir_all(&self.root).map_err(|err| Error::io("creating", &self.root, &err))?;
        let temp = self
            .root
            .join(format!(".tmp-{digest}-{}", uuid::Uuid::new_v4().simple()));
        let result = extract(name, archive, file, digest, &temp, self.limits).and_then(|notes| {
            if unchanged() {
                Ok(notes)
            } else {
                Err(changed_under_us(archive))
            }
        });
        let notes = match result {
            Ok(notes) => notes,
            Err(err) => {
                let _ = fs::remove_dir_all(&temp);
                return Err(err);
            }
        };
        fs::rename(&temp, &target).map_err(|err| {
            let _ = fs::remove_dir_all(&temp);
            Error::io("publishing extracted layer", &target, &err)
        })?;
        sync_dir(&self.root);
        Ok((target, self.remember(digest, notes)))
    }

    /// Remembers archive `digest`'s findings (see [`ZipStore::notes`]).
    fn remember(&self, digest: &str, findings: Findings) -> Arc<Findings> {
        let notes = Arc::new(findings);
        let mut memo = crate::sync::lock(&self.notes);
        if memo.len() >= MAX_REMEMBERED_NOTES {
            memo.clear();
        }
        memo.insert(digest.to_owned(), notes.clone());
        notes
    }
}

/// A holder of one digest's lock in [`ZipStore::locks`]; removes the map entry on drop when no
/// one else holds it, so the map holds only digests in use, not every digest ever seen.
///
/// Invariant: the `Arc` is cloned out of the map only under the map's mutex, and the count is
/// read under it too, so a strong count of 2 (the map's and ours) means no other request holds
/// or waits for this lock, and none can get it before the entry is gone.
struct DigestLock<'a> {
    locks: &'a Mutex<HashMap<String, Arc<Mutex<()>>>>,
    digest: String,
    lock: Arc<Mutex<()>>,
}

impl<'a> DigestLock<'a> {
    fn enter(locks: &'a Mutex<HashMap<String, Arc<Mutex<()>>>>, digest: &str) -> DigestLock<'a> {
        let lock = crate::sync::lock(locks)
            .entry(digest.to_owned())
            .or_default()
            .clone();
        DigestLock {
            locks,
            digest: digest.to_owned(),
            lock,
        }
    }
}

impl Drop for DigestLock<'_> {
    fn drop(&mut self) {
        let mut locks = crate::sync::lock(self.locks);
        if Arc::strong_count(&self.lock) == 2 {
            locks.remove(&self.digest);
        }
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

/// An I/O failure while writing entry `entry` into the cache, named by the entry (the cache
/// path means nothing to the client): a full disk is RESOURCE_EXHAUSTED, a shape the file
/// system cannot hold (a name too long, a link over a directory, ...) is the archive's fault.
fn write_failed(name: &str, entry: &str, err: &io::Error) -> Error {
    match err.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => {
            Error::cache_full(&format!("layer {name:?}: extracting zip entry {entry:?}"))
        }
        Some(libc::EEXIST) => bad(
            name,
            entry,
            "its path is already taken by an entry of another kind (a link or file over a \
             directory that other entries are inside?)",
        ),
        Some(
            libc::ENAMETOOLONG
            | libc::ENOTDIR
            | libc::EISDIR
            | libc::ELOOP
            | libc::EINVAL
            | libc::EILSEQ,
        ) => bad(
            name,
            entry,
            &format!("it cannot be written as a file: {err}"),
        ),
        _ => Error::Internal(format!(
            "layer {name:?}: extracting zip entry {entry:?} failed: {err}"
        )),
    }
}

/// The entry's modification time: the extended-timestamp field (UTC seconds, written by
/// Info-ZIP and most Unix tools) where present, else its MS-DOS time read as UTC; the epoch
/// when the entry has no valid time.
fn entry_mtime(entry: &zip::read::ZipFile<'_, impl Read>) -> SystemTime {
    let extended = entry.extra_data_fields().find_map(|field| match field {
        zip::ExtraField::ExtendedTimestamp(stamp) => stamp.mod_time(),
        _ => None,
    });
    if let Some(seconds) = extended {
        return UNIX_EPOCH + Duration::from_secs(u64::from(seconds));
    }
    entry
        .last_modified()
        .and_then(|dos| time::PrimitiveDateTime::try_from(dos).ok())
        .and_then(|civil| u64::try_from(civil.assume_utc().unix_timestamp()).ok())
        .map_or(UNIX_EPOCH, |seconds| {
            UNIX_EPOCH + Duration::from_secs(seconds)
        })
}

/// General purpose flag bit 11, "language encoding": the name (and comment) are UTF-8
/// (APPNOTE 6.3.10 §4.4.4 and appendix D).
const LANGUAGE_ENCODING: u16 = 1 << 11;

/// An entry's name decoded as the zip format says (APPNOTE 6.3.10 §4.4.4, appendix D):
/// 1. UTF-8 when the language-encoding flag (bit 11) is set. An Info-ZIP Unicode Path extra
///    field (0x7075, APPNOTE §4.6.9) whose CRC-32 matches the stored name counts as such: the
///    zip crate checks the CRC, puts the field's name in `raw` and sets the flag (a field
///    whose CRC does not match is ignored, as APPNOTE says).
/// 2. Otherwise, for an entry made on Unix (`made_on_unix`: "version made by" host 3), the
///    stored bytes when they are UTF-8: Info-ZIP `unzip` takes a Unix-made name's bytes as they
///    are, and Info-ZIP `zip` on Linux writes UTF-8 names without the flag, so this is what
///    Lambda gives such a layer (`tests/fidelity.rs`).
/// 3. Otherwise IBM code page 437, the format's own encoding, as Python's `zipfile`
///    (`ZipFile._RealGetContents`) and Info-ZIP read names from DOS and Windows tools.
///
/// Never lossy: a name flagged UTF-8 that is not is refused, naming its bytes.
fn decode_name(name: &str, raw: &[u8], flags: u16, made_on_unix: bool) -> Result<String> {
    if flags & LANGUAGE_ENCODING == 0 {
        if made_on_unix && let Ok(text) = std::str::from_utf8(raw) {
            return Ok(text.to_owned());
        }
        return Ok(oem_cp::decode_string_complete_table(
            raw,
            &oem_cp::code_table::DECODING_TABLE_CP437,
        ));
    }
    String::from_utf8(raw.to_vec()).map_err(|_| {
        Error::InvalidArgument(format!(
            "layer {name:?}: zip entry \"{}\" rejected: its flags say its name is UTF-8 \
             (bit 11) but it is not; repack the layer",
            raw.escape_ascii()
        ))
    })
}

/// Checks a decoded entry name and returns its normalised relative path.
///
/// A name is a name: `/` separates directories, and a backslash is part of a file name, as in
/// a directory layer and as Python's `zipfile` and Lambda take it on Linux, so a zip and a
/// directory holding the same tree give the same image. Refused, as hostile: absolute paths,
/// drive letters, NUL, and `..` as a component, also between backslashes (`..\\..\\x` is a
/// zip-slip for every tool that takes `\\` as a separator, such as Info-ZIP for archives made on
/// Windows, and no real layer has such a name).
fn safe_path(name: &str, raw: &str) -> Result<PathBuf> {
    let text = raw;
    let bytes = text.as_bytes();
    if text.starts_with('/')
        || text.starts_with('\\')
        || (bytes.len() >= 2 && bytes[1] == b':' && bytes[0].is_ascii_alphabetic())
    {
        return Err(bad(name, raw, "absolute or drive-letter path"));
    }
    if text.contains('\0') {
        return Err(bad(name, raw, "NUL in the name"));
    }
    if text.split(['/', '\\']).any(|part| part == "..") {
        return Err(bad(name, raw, "'..' would write outside the layer"));
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

/// What one entry of the central directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    Dir,
    File,
    Link,
}

/// One central-directory entry, judged before anything is written.
#[derive(Debug)]
struct Planned {
    /// The entry's name as decoded (for messages).
    shown: String,
    /// Where it goes below the layer root.
    rel: PathBuf,
    kind: EntryKind,
    /// Its Unix `st_mode`, when the archive was made on Unix.
    mode: Option<u32>,
    /// Declared uncompressed size.
    size: u64,
    /// Declared CRC-32 of the data (a link's: of its target).
    crc: u32,
    /// False when a later entry of the same path replaces it: it is not extracted.
    wins: bool,
}

/// The plan of a whole archive: every entry in central-directory order, and its notes.
#[derive(Debug)]
struct Survey {
    entries: Vec<Planned>,
    findings: Findings,
}

/// Reads the central directory and decides every entry before anything is written: names
/// checked (zip-slip), kinds (no devices), which entry of a repeated name wins, sizes against
/// the limits, nothing below a link entry; and what the archive warns about.
///
/// Repeated names follow Python's `zipfile` and Info-ZIP `unzip -o`, which Lambda and SAM's
/// extractor agree with (serverless#12890): entries are extracted in order, so the later entry
/// of a path replaces the earlier. A directory and a file or link under one path cannot both
/// be had and stay a refusal.
fn survey<R: Read + io::Seek>(
    name: &str,
    zip: &mut ZipIterable<R>,
    limits: ZipLimits,
) -> Result<Survey> {
    let mut entries: Vec<Planned> = Vec::with_capacity(zip.len().min(limits.max_entries));
    let mut latest: HashMap<PathBuf, usize> = HashMap::new();
    let mut differing = Found::default();
    let files = zip.files().map_err(|err| unreadable_zip(name, &err))?;
    for (index, entry) in files.enumerate() {
        let entry = entry.map_err(|err| {
            Error::InvalidArgument(format!(
                "layer {name:?}: zip entry #{index} is unreadable: {err}"
            ))
        })?;
        let unix = entry.system() == zip::System::Unix;
        let shown = decode_name(name, entry.name_raw(), entry.flags().as_u16(), unix)?;
        let rel = safe_path(name, &shown)?;
        // Only an archive made on Unix carries Unix modes; for others (Explorer, 7-Zip, Python
        // on Windows: "MS-DOS" entries) the zip crate invents 0o664, which would make a
        // Windows-zipped bootstrap non-executable (SAM #1014). Treat them as mode-less.
        let mode = if unix { entry.unix_mode() } else { None };
        let kind = match mode.map_or(0, |m| m & S_IFMT) {
            _ if entry.is_dir() => EntryKind::Dir,
            S_IFDIR => EntryKind::Dir,
            S_IFLNK => EntryKind::Link,
            0 | S_IFREG => EntryKind::File,
            _ => {
                return Err(bad(
                    name,
                    &shown,
                    "device, fifo or socket entries are not allowed",
                ));
            }
        };
        check_ratio(
            name,
            &shown,
            (entry.size(), entry.compressed_size()),
            limits,
        )?;
        if let Some(&earlier) = latest.get(&rel) {
            let before = &mut entries[earlier];
            if (before.kind == EntryKind::Dir) != (kind == EntryKind::Dir) {
                return Err(bad(
                    name,
                    &shown,
                    &format!(
                        "duplicate name: {:?} is also a {}, and a directory and a file or link \
                         cannot share a path",
                        before.shown,
                        if before.kind == EntryKind::Dir {
                            "directory"
                        } else {
                            "file or link"
                        },
                    ),
                ));
            }
            // Same kind, size and CRC-32: the same bytes, for a warning's purpose.
            if kind != EntryKind::Dir
                && (before.kind, before.size, before.crc) != (kind, entry.size(), entry.crc32())
            {
                differing.add(&shown);
            }
            before.wins = false;
        }
        latest.insert(rel.clone(), index);
        entries.push(Planned {
            shown,
            rel,
            kind,
            mode,
            size: entry.size(),
            crc: entry.crc32(),
            wins: true,
        });
    }
    check_total(name, &entries, limits)?;
    check_links(name, &entries)?;
    let findings = findings(&entries, &differing);
    Ok(Survey { entries, findings })
}
/// The winning entries' sizes together stay within `max_zip_bytes`, or the first entry past it
/// is named.
fn check_total(name: &str, entries: &[Planned], limits: ZipLimits) -> Result<()> {
    let mut total: u64 = 0;
    for planned in entries.iter().filter(|e| e.wins) {
        total = total.saturating_add(planned.size);
        if total > limits.max_bytes {
            return Err(bad(
                name,
                &planned.shown,
                &format!(
                    "the archive extracts to more than max_zip_bytes = {}",
                    limits.max_bytes
                ),
            ));
        }
    }
    Ok(())
}

/// No winning entry lies below a winning link entry (it would be written through the link).
fn check_links(name: &str, entries: &[Planned]) -> Result<()> {
    let links: HashSet<&Path> = entries
        .iter()
        .filter(|e| e.wins && e.kind == EntryKind::Link)
        .map(|e| e.rel.as_path())
        .collect();
    if !links.is_empty()
        && let Some(through) = entries
            .iter()
            .find(|e| e.wins && e.rel.ancestors().skip(1).any(|a| links.contains(a)))
    {
        return Err(bad(
            name,
            &through.shown,
            "it would be written through a symlink entry",
        ));
    }
    Ok(())
}

/// What the surveyed archive warns about (differing repeated names, files Lambda cannot read)
/// and the directories it ships without owner write.
fn findings(entries: &[Planned], differing: &Found) -> Findings {
    let mut notes = Vec::new();
    if differing.count() > 0 {
        notes.push(Note {
            code: "duplicate_zip_entry",
            text: format!(
                "the zip stores {} path(s) more than once with different contents ({}); the \
                 later entry is used, as Lambda does (entries are extracted in order, so the \
                 later replaces the earlier, as with Python's zipfile and Info-ZIP unzip)",
                differing.count(),
                differing.listed()
            ),
        });
    }
    let (mut owner, mut others) = (Found::default(), Found::default());
    for planned in entries
        .iter()
        .filter(|e| e.wins && e.kind == EntryKind::File)
    {
        if let Some(mode) = planned.mode {
            lambda_rules::note_readability(mode, &planned.shown, &mut owner, &mut others);
        }
    }
    if let Some(text) = lambda_rules::unreadable(&owner, &others) {
        notes.push(Note {
            code: lambda_rules::UNREADABLE,
            text: format!("the zip has {text}"),
        });
    }
    let locked_dirs = entries
        .iter()
        .filter(|e| e.wins && e.kind == EntryKind::Dir)
        .filter(|e| e.mode.is_some_and(|mode| mode & 0o200 == 0))
        .map(|e| e.rel.to_string_lossy().into_owned())
        .collect();
    Findings { notes, locked_dirs }
}

/// Extracts the zip in `file` into `temp` (a new directory) as [`survey`] planned it; returns
/// the archive's notes.
fn extract(
    name: &str,
    archive: &Path,
    file: File,
    digest: &str,
    temp: &Path,
    limits: ZipLimits,
) -> Result<Findings> {
    let mut zip = open_zip(name, archive, file, limits)?;
    let Survey { entries, findings } = survey(name, &mut zip, limits)?;
    fs::create_dir(temp).map_err(|err| {
        Error::io(
            &format!("layer {name:?}: creating the directory to extract into"),
            temp,
            &err,
        )
    })?;
    let mut links: Vec<(&Planned, PathBuf, SystemTime)> = Vec::new();
    let mut total: u64 = 0;
    let files = zip.files().map_err(|err| unreadable_zip(name, &err))?;
    let mut planned = entries.iter();
    while let Some(entry) = files.next() {
        let entry = entry.map_err(|err| unreadable_zip(name, &err))?;
        let Some(plan) = planned.next() else {
            return Err(changed_under_us(archive));
        };
        if !plan.wins {
            continue;
        }
        let shown = plan.shown.as_str();
        let dest = temp.join(&plan.rel);
        if plan.kind == EntryKind::Dir {
            fs::create_dir_all(&dest).map_err(|err| write_failed(name, shown, &err))?;
            continue;
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|err| write_failed(name, shown, &err))?;
        }
        let mut entry = entry
            .with_reader(files.reader_mut(), zip::read::ZipReadOptions::new())
            .map_err(|err| bad(name, shown, &format!("cannot be read: {err}")))?;
        if entry.size() != plan.size {
            return Err(changed_under_us(archive));
        }
        let mtime = entry_mtime(&entry);
        total = total.saturating_add(plan.size);
        if plan.kind == EntryKind::Link {
            let target = link_target(&mut entry, name, shown, plan.size)?;
            links.push((plan, target, mtime));
            continue;
        }
        write_entry(
            &mut entry,
            &dest,
            (name, shown),
            (plan.size, mtime, plan.mode),
        )?;
    }
    // Links last, so nothing is ever written through one. They are kept as they are, wherever
    // they point (Lambda does the same); nothing on the host ever follows them.
    for (plan, target, mtime) in links {
        let (dest, shown) = (temp.join(&plan.rel), plan.shown.as_str());
        std::os::unix::fs::symlink(&target, &dest)
            .map_err(|err| write_failed(name, shown, &err))?;
        let mtime = filetime::FileTime::from_system_time(mtime);
        filetime::set_symlink_file_times(&dest, mtime, mtime)
            .map_err(|err| write_failed(name, shown, &err))?;
    }
    // Directories 0755 regardless of the archive.
    set_dir_modes(temp)?;
    sync_dir(temp);
    tracing::info!(layer = name, archive = %archive.display(), digest, bytes = total, "extracted zip layer");
    Ok(findings)
}

/// INVALID_ARGUMENT for an archive whose central directory cannot be read.
fn unreadable_zip(name: &str, err: &zip::result::ZipError) -> Error {
    Error::InvalidArgument(format!("layer {name:?}: the zip cannot be read: {err}"))
}

/// The zip at `archive`, refused when unreadable or with more than `max_zip_entries` entries.
/// Read entry by entry from the central directory ([`ZipIterable`] keeps every entry of a
/// repeated name; the crate's `ZipArchive` keys entries by name and merges them).
fn open_zip(
    name: &str,
    archive: &Path,
    file: File,
    limits: ZipLimits,
) -> Result<ZipIterable<io::BufReader<File>>> {
    let zip = ZipIterable::try_new(io::BufReader::new(file), zip::read::Config::default())
        .map_err(|err| {
            Error::InvalidArgument(format!(
                "layer {name:?}: {} is not a readable zip: {err}",
                archive.display()
            ))
        })?;
    if zip.len() > limits.max_entries {
        return Err(Error::InvalidArgument(format!(
            "layer {name:?}: the zip has {} entries, more than max_zip_entries = {}",
            zip.len(),
            limits.max_entries
        )));
    }
    Ok(zip)
}

/// Refuses entry `raw` when it (`size`, `compressed` bytes; over [`RATIO_FROM`]) is
/// compressed more than `max_zip_ratio` to 1 (a zip bomb; see [`ZipLimits`]).
fn check_ratio(
    name: &str,
    raw: &str,
    (size, compressed): (u64, u64),
    limits: ZipLimits,
) -> Result<()> {
    let compressed = compressed.max(1);
    if size > RATIO_FROM && size / compressed > limits.max_ratio {
        return Err(bad(
            name,
            raw,
            &format!(
                "it declares {size} bytes compressed {}:1, more than max_zip_ratio = {} for an \
                 entry over {RATIO_FROM} bytes (a zip bomb?)",
                size / compressed,
                limits.max_ratio
            ),
        ));
    }
    Ok(())
}

/// The target of link entry `raw` (`size` bytes declared): at most [`MAX_LINK_TARGET`] bytes,
/// never empty, no NUL.
fn link_target(entry: &mut impl Read, name: &str, raw: &str, size: u64) -> Result<PathBuf> {
    if size > MAX_LINK_TARGET {
        return Err(bad(
            name,
            raw,
            &format!(
                "it is a symbolic link whose target is {size} bytes, longer than the \
                 {MAX_LINK_TARGET} a link can hold (a file stored as a link by a broken \
                 packer?); repack the layer"
            ),
        ));
    }
    let mut target = Vec::new();
    entry
        .take(MAX_LINK_TARGET + 1)
        .read_to_end(&mut target)
        .map_err(|err| bad(name, raw, &format!("cannot decompress: {err}")))?;
    if target.is_empty() || target.contains(&0) {
        return Err(bad(
            name,
            raw,
            "it is a symbolic link with an empty target or a NUL in it; repack the layer",
        ));
    }
    Ok(PathBuf::from(std::ffi::OsString::from_vec(target)))
}

/// Writes file entry `raw` of layer `name` to `dest` (a new file: never through anything
/// already there), checking its data against its declared `size`, with its `mtime` and a mode
/// of 0755 or 0644 from its Unix `mode` (none: made on Windows, taken as executable).
fn write_entry(
    entry: &mut impl Read,
    dest: &Path,
    (name, raw): (&str, &str),
    (size, mtime, mode): (u64, SystemTime, Option<u32>),
) -> Result<()> {
    // create_new + O_NOFOLLOW: never write through anything already there.
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(dest)
        .map_err(|err| write_failed(name, raw, &err))?;
    // Never trust the declared size: read at most one byte more than it says.
    // An error with an errno is the system's (a full cache, on writing); the decompressor's
    // own errors carry none and are the archive's fault.
    let written = io::copy(&mut entry.take(size + 1), &mut out).map_err(|err| {
        if err.raw_os_error().is_some() {
            write_failed(name, raw, &err)
        } else {
            bad(name, raw, &format!("cannot decompress: {err}"))
        }
    })?;
    if written != size {
        return Err(bad(name, raw, "its data does not match its declared size"));
    }
    out.flush()
        .and_then(|()| out.set_modified(mtime))
        .map_err(|err| write_failed(name, raw, &err))?;
    // No Unix permission bits at all: made on Windows; assume executable (SAM #1014).
    let executable = mode.is_none_or(|m| m & 0o777 == 0 || m & 0o111 != 0);
    let perm = if executable { 0o755 } else { 0o644 };
    out.set_permissions(fs::Permissions::from_mode(perm))
        .map_err(|err| write_failed(name, raw, &err))
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
        assert!(
            is_zip(&archive).unwrap(),
            "detected by content, not by name"
        );
        let store = store(dir.path());
        let cache = StatCache::default();
        let out = store.extracted("l", &archive, &cache).unwrap().0;
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
        let again = store.extracted("l", &archive, &cache).unwrap().0;
        assert_eq!(out, again);
        let left: Vec<String> = fs::read_dir(store.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name != FORMAT_MARKER)
            .collect();
        assert_eq!(left.len(), 1, "no temp dirs left: {left:?}");
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
            .unwrap()
            .0;
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
                "directory-and-file",
                vec![Raw("a/", b"", Some(0o040_755)), Raw("a", b"y", FILE)],
                "duplicate name",
            ),
            (
                "link-replaced-then-written-through",
                vec![
                    Raw("d", b"x", FILE),
                    Raw("d", b"/tmp", LINK),
                    Raw("d/evil", b"x", FILE),
                ],
                "written through a symlink",
            ),
            (
                "through-link",
                vec![Raw("d", b"/tmp", LINK), Raw("d/evil", b"x", FILE)],
                "written through a symlink",
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
            assert!(
                left.iter().all(|n| n == FORMAT_MARKER),
                "{label}: left {left:?} in the cache root"
            );
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

    /// Names decode as the zip format says: UTF-8 with flag bit 11; without it, a Unix-made
    /// entry's UTF-8 bytes as they are (Info-ZIP), anything else as IBM code page 437
    /// (`t\x84glich.txt` from a Windows tool is `täglich.txt`, and a Windows tool's UTF-8
    /// bytes read as Python's zipfile reads them); never a lossy replacement. A
    /// backslash is part of a name; `..` between backslashes, a leading backslash and drive
    /// letters are still refused.
    #[test]
    fn names_decode_as_the_format_says_and_hostile_ones_stay_refused() {
        for unix in [false, true] {
            assert_eq!(
                decode_name("l", b"t\x84glich.txt", 0, unix).unwrap(),
                "täglich.txt"
            );
            assert_eq!(decode_name("l", b"\x94\xe1", 0, unix).unwrap(), "öß");
            assert_eq!(
                decode_name("l", "täglich.txt".as_bytes(), LANGUAGE_ENCODING, unix).unwrap(),
                "täglich.txt"
            );
        }
        assert_eq!(decode_name("l", "ä".as_bytes(), 0, false).unwrap(), "├ñ");
        assert_eq!(decode_name("l", "ä".as_bytes(), 0, true).unwrap(), "ä");
        let Err(Error::InvalidArgument(message)) =
            decode_name("l", b"t\x84glich.txt", LANGUAGE_ENCODING, true)
        else {
            panic!("a name flagged UTF-8 that is not must be refused");
        };
        assert!(
            message.contains("t\\x84glich.txt") && message.contains("UTF-8"),
            "{message}"
        );
        assert_eq!(
            safe_path("l", "dir\\file.txt").unwrap(),
            PathBuf::from("dir\\file.txt")
        );
        for hostile in [
            "..\\evil",
            "a\\..\\..\\evil",
            "\\abs",
            "C:\\x",
            "c:x",
            "../x",
            "/x",
        ] {
            assert!(safe_path("l", hostile).is_err(), "{hostile:?} accepted");
        }
    }

    /// A path stored twice: the later entry of the same kind wins (also after normalising,
    /// and a link replacing a file), one `duplicate_zip_entry` note lists the paths whose
    /// bytes differ, byte-identical repeats are not mentioned, and a cache hit says the same.
    #[test]
    fn the_later_of_repeated_names_wins_with_one_note() {
        const FILE: Option<u32> = Some(0o100_644);
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("dups.zip");
        fs::write(
            &archive,
            hand_zip(&[
                Raw("a.txt", b"first", FILE),
                Raw("same.txt", b"same", FILE),
                Raw("lib/b", b"first", FILE),
                Raw("a.txt", b"second", FILE),
                Raw("same.txt", b"same", FILE),
                Raw("lib/./b", b"second", FILE),
                Raw("run", b"#!/bin/sh", FILE),
                Raw("run", b"a.txt", Some(0o120_777)),
            ]),
        )
        .unwrap();
        let store = store(dir.path());
        let (out, found) = store
            .extracted("dups", &archive, &StatCache::default())
            .unwrap();
        assert_eq!(fs::read(out.join("a.txt")).unwrap(), b"second");
        assert_eq!(fs::read(out.join("lib/b")).unwrap(), b"second");
        assert_eq!(fs::read(out.join("same.txt")).unwrap(), b"same");
        assert_eq!(
            fs::read_link(out.join("run")).unwrap(),
            PathBuf::from("a.txt")
        );
        let notes = &found.notes;
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert_eq!(notes[0].code, "duplicate_zip_entry");
        let text = &notes[0].text;
        for part in [
            "3 path(s)",
            "\"a.txt\"",
            "\"lib/./b\"",
            "\"run\"",
            "later entry",
        ] {
            assert!(text.contains(part), "{part} missing: {text}");
        }
        assert!(!text.contains("same.txt"), "{text}");
        let fresh = ZipStore::open(store.root().to_owned(), ZipLimits::default());
        let (again, hit) = fresh
            .extracted("dups", &archive, &StatCache::default())
            .unwrap();
        assert_eq!((again, &*hit), (out, &*found), "a cache hit warns the same");
    }

    /// An 8 MiB pre-allocated database of zeros (1025:1) is extracted with the default
    /// limits; the ratio counts only for entries over [`RATIO_FROM`]; the declared total is
    /// refused against `max_zip_bytes` naming the entry.
    #[test]
    fn the_bomb_guard_is_by_size_with_the_ratio_far_away() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("sqlite.zip");
        let zeros = vec![0u8; 8 << 20];
        make_zip(&archive, &[("cache.db", &zeros, Some(0o644))]);
        let (out, _) = store(dir.path())
            .extracted("db", &archive, &StatCache::default())
            .unwrap();
        assert_eq!(fs::metadata(out.join("cache.db")).unwrap().len(), 8 << 20);

        let limits = ZipLimits::default();
        assert!(check_ratio("l", "db", (8 << 20, 8 << 10), limits).is_ok());
        assert!(check_ratio("l", "big", (RATIO_FROM, 1), limits).is_ok());
        let err = check_ratio("l", "bomb", (1 << 30, 1 << 20), limits).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("max_zip_ratio") && m.contains("\"bomb\"")),
            "{err:?}"
        );

        let store = ZipStore::open(
            dir.path().join("small"),
            ZipLimits {
                max_bytes: 1 << 20,
                ..Default::default()
            },
        );
        let err = store
            .extracted("bomb", &archive, &StatCache::default())
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("max_zip_bytes") && m.contains("cache.db")),
            "{err:?}"
        );
    }

    #[test]
    fn leftover_temp_dirs_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("layers");
        fs::create_dir_all(root.join(".tmp-abc-123/partial")).unwrap();
        fs::create_dir_all(root.join("0123")).unwrap();
        fs::write(root.join(FORMAT_MARKER), FORMAT).unwrap();
        let store = ZipStore::open(root.clone(), ZipLimits::default());
        let mut names: Vec<_> = fs::read_dir(store.root())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        assert_eq!(names, [FORMAT_MARKER, "0123"]);
    }

    /// Layers extracted by another format (or before formats were recorded) are removed at
    /// open, so an extraction that erased times or refused links is never reused.
    #[test]
    fn layers_of_another_format_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("layers");
        fs::create_dir_all(root.join("0123/bin")).unwrap();
        let store = ZipStore::open(root.clone(), ZipLimits::default());
        assert!(!root.join("0123").exists());
        assert_eq!(
            fs::read_to_string(store.root().join(FORMAT_MARKER)).unwrap(),
            FORMAT
        );
        fs::write(root.join(FORMAT_MARKER), "1").unwrap();
        fs::create_dir_all(root.join("4567")).unwrap();
        ZipStore::open(root.clone(), ZipLimits::default());
        assert!(!root.join("4567").exists());
    }

    /// Entry times are kept (extended timestamp first, else the MS-DOS time as UTC); links are
    /// kept wherever they point, with their own time; a link entry whose "target" is longer
    /// than a link can hold is INVALID_ARGUMENT naming the layer and the entry.
    #[test]
    fn times_and_links_are_kept_and_oversized_links_refused() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("times.zip");
        let mut writer = zip::ZipWriter::new(File::create(&archive).unwrap());
        let dos = zip::DateTime::from_date_and_time(2021, 3, 4, 5, 6, 8).unwrap();
        let options = SimpleFileOptions::default()
            .unix_permissions(0o644)
            .last_modified_time(dos);
        writer.start_file("m.py", options).unwrap();
        writer.write_all(b"x = 1\n").unwrap();
        writer
            .add_symlink("php", "/opt/bref/bin/php", options)
            .unwrap();
        writer
            .add_symlink("libc.so.6", "../../lib64/libc.so.6", options)
            .unwrap();
        writer.finish().unwrap();
        let store = store(dir.path());
        let out = store
            .extracted("l", &archive, &StatCache::default())
            .unwrap()
            .0;
        // 2021-03-04T05:06:08Z
        let expected = 1_614_834_368;
        let mtime = |p: &str| {
            use std::os::unix::fs::MetadataExt;
            fs::symlink_metadata(out.join(p)).unwrap().mtime()
        };
        assert_eq!(mtime("m.py"), expected);
        assert_eq!(mtime("php"), expected);
        assert_eq!(
            fs::read_link(out.join("php")).unwrap(),
            PathBuf::from("/opt/bref/bin/php")
        );
        assert_eq!(
            fs::read_link(out.join("libc.so.6")).unwrap(),
            PathBuf::from("../../lib64/libc.so.6")
        );

        let broken = dir.path().join("broken.zip");
        let script = "#!/bin/sh\necho hello\n".repeat(300);
        make_zip(&broken, &[(&format!("link:bin/tool->{script}"), b"", None)]);
        let err = store
            .extracted("Broken", &broken, &StatCache::default())
            .unwrap_err();
        let Error::InvalidArgument(message) = &err else {
            panic!("not INVALID_ARGUMENT: {err:?}");
        };
        assert!(
            message.contains("\"Broken\"") && message.contains("bin/tool"),
            "{message}"
        );
        assert!(
            !message.contains(&dir.path().display().to_string()),
            "{message}"
        );
    }

    /// The per-digest locks do not pile up: an entry lives while someone holds it, and goes
    /// with its last holder (after an extraction, a cache hit, or a failure alike).
    #[test]
    fn digest_locks_are_removed_with_their_last_holder() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let held = |store: &ZipStore| store.locks.lock().unwrap().len();
        {
            let first = DigestLock::enter(&store.locks, "abc");
            let second = DigestLock::enter(&store.locks, "abc");
            assert!(
                Arc::ptr_eq(&first.lock, &second.lock),
                "one lock per digest"
            );
            let other = DigestLock::enter(&store.locks, "def");
            assert_eq!(held(&store), 2);
            drop(first);
            assert_eq!(held(&store), 2, "still held by the second request");
            drop(second);
            assert_eq!(held(&store), 1);
            drop(other);
        }
        assert_eq!(held(&store), 0);

        let archive = dir.path().join("layer.zip");
        make_zip(&archive, &[("bootstrap", b"#!/bin/sh", Some(0o755))]);
        let cache = StatCache::default();
        store.extracted("l", &archive, &cache).unwrap();
        store.extracted("l", &archive, &cache).unwrap();
        let bad = dir.path().join("bad.zip");
        make_zip(&bad, &[("../evil", b"x", Some(0o644))]);
        assert!(store.extracted("bad", &bad, &cache).is_err());
        assert_eq!(
            held(&store),
            0,
            "extract, hit and failure leave no lock behind"
        );
    }
}
