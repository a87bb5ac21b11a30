//! Replacing a file in the cache atomically, one way for every writer: a temp file beside it
//! (`.tmp-<name>-<random>`), written and renamed over the file, so a reader (or a restarted
//! daemon) sees the old file or the new one, never a part. A [`Durability::Synced`] write also
//! fsyncs the file before the rename and the directory after it, so the new file survives a
//! power cut; records that only save work and are written on a build's path skip that. Leftover temp files are never read; [`remove_temp_files`]
//! clears them at start-up.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// How every temp file's name starts.
pub const TEMP_PREFIX: &str = ".tmp-";

/// Whether a [`write`] waits for the disk (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Renamed only: a power cut may lose the new file (never leave a part of it).
    Renamed,
    /// File and directory fsynced.
    Synced,
}

/// Writes `bytes` to `dir/name` atomically (module doc), creating `dir` when missing.
/// Errors: the I/O error of the step that failed; the temp file is removed then.
pub fn write(dir: &Path, name: &str, bytes: &[u8], durability: Durability) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let temp = dir.join(format!(
        "{TEMP_PREFIX}{name}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let written = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        if durability == Durability::Synced {
            file.sync_all()?;
        }
        fs::rename(&temp, dir.join(name))?;
        if durability == Durability::Synced {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

/// Removes the temp files in `dir` (names starting with [`TEMP_PREFIX`], or with one of
/// `legacy`: temp names an older daemon used), leftovers of a write cut short by a crash.
pub fn remove_temp_files(dir: &Path, legacy: &[&str]) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TEMP_PREFIX) || legacy.iter().any(|prefix| name.starts_with(prefix)) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("images");
        write(&sub, "a.json", b"one", Durability::Synced).unwrap();
        write(&sub, "a.json", b"two", Durability::Renamed).unwrap();
        assert_eq!(fs::read(sub.join("a.json")).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(&sub)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.json"]);
        fs::write(sub.join(".tmp-a.json-123"), "half").unwrap();
        fs::write(sub.join("old.tmp-9"), "half").unwrap();
        remove_temp_files(&sub, &["old.tmp-"]);
        let names: Vec<_> = fs::read_dir(&sub)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.json"]);
        assert!(
            write(&sub.join("a.json"), "x", b"y", Durability::Renamed).is_err(),
            "a file is no directory"
        );
    }
}
