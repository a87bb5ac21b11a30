//! Lambda's own rules for layers (issue 25): what Lambda accepts is accepted, in the image as
//! Lambda would lay it out (compared entry by entry with the same tree given as a directory),
//! and what Lambda would refuse at deploy or fail at run time still builds, with a warning of
//! a stable code in the event stream.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use lambda_imaged::client::proto;
use proto::build_event::Event;
use serde_json::{Value, json};
use support::rmi_all;
use support::tree::{assert_same, expected_opt, image_opt, set_time};
use support::{OutcomeExt, TestDaemon, build, unique, warnings_with_code, zip_request};

/// The MS-DOS time every entry of [`py_zip`] carries (2020-01-02T03:04:06, read as UTC).
const ENTRY_TIME: i64 = 1_577_934_246;

/// Writes the zip `out` with Python's own `zipfile`, entry by entry as `entries` says (a JSON
/// list). Keys: `name`; `stored`, the name the header stores when it is not `name`;
/// `encoding` of the stored name's bytes (`ascii` default, `utf-8`, `cp437`); `utf8_flag`
/// (general purpose bit 11; default: set when the stored name is not ASCII, as zipfile does);
/// `unicode_path` (an Info-ZIP 0x7075 field holding `name` in UTF-8 with the stored name's
/// CRC-32; `"bad_crc"` for one whose CRC does not match); `hex` (content as hex bytes); `create_system` (default 3, Unix;
/// 0: made on Windows, no Unix mode, extracted 0755); `text` or `zeros` (content); `mode` (Unix
/// `st_mode`, create_system 3; absent: 0o100644); `deflate`. Duplicate names are written as
/// given.
fn py_zip(out: &Path, entries: Value) {
    const SCRIPT: &str = r#"
import json, struct, sys, warnings, zipfile, zlib
spec = json.loads(sys.argv[1])
warnings.simplefilter("ignore")

class Info(zipfile.ZipInfo):
    # zipfile resets flag_bits when it opens an entry for writing: set bit 11 here.
    def _encodeFilenameFlags(self):
        return self.raw_name, self.flag_bits | (0x800 if self.utf8 else 0)

with zipfile.ZipFile(spec["out"], "w") as archive:
    for entry in spec["entries"]:
        info = Info(entry["name"], date_time=(2020, 1, 2, 3, 4, 6))
        name = entry["name"]
        stored = entry.get("stored", name)
        info.raw_name = stored.encode(entry.get("encoding", "ascii"))
        info.utf8 = entry.get("utf8_flag", not stored.isascii())
        upath = entry.get("unicode_path")
        if upath:
            crc = zlib.crc32(info.raw_name) ^ (1 if upath == "bad_crc" else 0)
            data = b"\x01" + struct.pack("<I", crc) + name.encode("utf-8")
            info.extra = struct.pack("<HH", 0x7075, len(data)) + data
        info.create_system = entry.get("create_system", 3)
        if info.create_system == 3:
            info.external_attr = entry.get("mode", 0o100644) << 16
        else:
            info.external_attr = 0x20  # the "archive" attribute Explorer and 7-Zip write
        info.compress_type = zipfile.ZIP_DEFLATED if entry.get("deflate") else zipfile.ZIP_STORED
        with archive.open(info, mode="w") as dest:
            if "zeros" in entry:
                left = entry["zeros"]
                while left > 0:
                    n = min(left, 1 << 20)
                    dest.write(bytes(n))
                    left -= n
            elif "hex" in entry:
                dest.write(bytes.fromhex(entry["hex"]))
            else:
                dest.write(entry.get("text", "").encode("utf-8"))
"#;
    let spec = json!({ "out": out, "entries": entries });
    let output = Command::new("python3")
        .args(["-c", SCRIPT, &spec.to_string()])
        .output()
        .expect("python3 runs (installed by scripts/test-env.sh)");
    assert!(
        output.status.success(),
        "python3 zipfile failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// [`py_zip`] into `dir/name`; returns its path.
fn zip_in(dir: &Path, name: &str, entries: Value) -> std::path::PathBuf {
    let out = dir.join(name);
    py_zip(&out, entries);
    out
}

/// Writes `files` (path, content) into the directory `root` as a layer: 0644, the entries'
/// time, so it is the tree the zips of these tests must give.
fn dir_layer(root: std::path::PathBuf, files: &[(&str, &str)]) -> std::path::PathBuf {
    for (path, content) in files {
        let path = root.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, content).unwrap();
        set_time(&path, ENTRY_TIME);
    }
    root
}

/// Removes the images a test made.
#[derive(Default)]
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for tag in &self.0 {
            rmi_all(tag);
        }
    }
}

impl Cleanup {
    /// Builds `layers` on `daemon`, keeps the tag for removal, and asserts the image's `/opt`
    /// is the tree of the directory `expected`.
    async fn built_like(
        &mut self,
        what: &str,
        daemon: &TestDaemon,
        layers: &[(&str, &Path)],
        expected: &Path,
    ) -> support::Outcome {
        let outcome = build(&daemon.socket, zip_request(layers)).await;
        let tag = outcome.completed().tag.clone();
        self.0.push(tag.clone());
        assert_same(what, &image_opt(&tag), &expected_opt(&[expected]));
        outcome
    }
}

/// A test's daemon, its temp dir, and what it must remove.
async fn scene() -> (TestDaemon, tempfile::TempDir, Cleanup) {
    let daemon = TestDaemon::start().await;
    (daemon, tempfile::tempdir().unwrap(), Cleanup::default())
}

/// Asserts `text` holds every one of `parts`.
fn assert_holds(what: &str, text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{what}: {part:?} missing: {text}");
    }
}

/// Builds the zip `archive` alone and asserts INVALID_ARGUMENT whose message holds `parts`.
async fn assert_refused(daemon: &TestDaemon, archive: &Path, parts: &[&str]) {
    let outcome = build(
        &daemon.socket,
        zip_request(&[(&unique("refused"), archive)]),
    )
    .await;
    let status = outcome.status();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_holds("refusal", status.message(), parts);
}

/// A zip storing a path twice (Python's zipfile writes it, as serverless and esbuild do) is
/// accepted: the later entry of the same kind wins, also when the names differ only by `./`,
/// and one `duplicate_zip_entry` warning names the paths whose bytes differ and says what
/// Lambda does — on the first build and on a cache hit alike. A directory and a file under
/// one path stay INVALID_ARGUMENT naming the entry.
#[tokio::test(flavor = "multi_thread")]
async fn the_later_of_repeated_zip_entries_wins_with_a_warning() {
    let (daemon, dir, mut cleanup) = scene().await;
    let archive = zip_in(
        dir.path(),
        "dups.zip",
        json!([
            { "name": "handler.py", "text": "old = 1\n" },
            { "name": "same.txt", "text": "same\n" },
            { "name": "lib/util.py", "text": "v = 1\n" },
            { "name": "handler.py", "text": "new = 2\n", "deflate": true },
            { "name": "same.txt", "text": "same\n" },
            { "name": "./lib/util.py", "text": "v = 2\n" },
        ]),
    );
    let expected = dir_layer(
        dir.path().join("expected"),
        &[
            ("handler.py", "new = 2\n"),
            ("same.txt", "same\n"),
            ("lib/util.py", "v = 2\n"),
        ],
    );
    let name = unique("dups");
    for round in ["first build", "cache hit"] {
        let outcome = cleanup
            .built_like(round, &daemon, &[(&name, &archive)], &expected)
            .await;
        let warnings = warnings_with_code(&outcome, "duplicate_zip_entry");
        assert_eq!(warnings.len(), 1, "{round}: {warnings:?}");
        let text = &warnings[0];
        let layer = format!("layer {name:?}");
        assert_holds(
            round,
            text,
            &[
                &layer,
                "2 path(s)",
                "\"handler.py\"",
                "\"./lib/util.py\"",
                "later entry is used, as Lambda does",
            ],
        );
        assert!(!text.contains("same.txt"), "{round}: {text}");
    }

    let clash = zip_in(
        dir.path(),
        "clash.zip",
        json!([
            { "name": "same/", "mode": 0o040_755 },
            { "name": "same", "text": "a file" },
        ]),
    );
    assert_refused(&daemon, &clash, &["\"same\"", "duplicate name"]).await;
    daemon.stop().await;
}

/// Entry names are decoded as the zip format says: UTF-8 with flag bit 11, or from an Info-ZIP
/// Unicode Path field whose CRC matches the stored name (the stored name when it does not);
/// without either, a Windows tool's name as CP437 (`täglich.txt`, as Python's zipfile reads
/// it), a Unix-made name's UTF-8 bytes as they are (Info-ZIP), other bytes as CP437 (`ä.txt`
/// and `ö.txt` stay two files); a backslash is part of a name. The image's `/opt` is the
/// same tree as the directory holding these names, byte for byte in every name.
#[tokio::test(flavor = "multi_thread")]
async fn zip_names_decode_as_the_format_says_like_the_same_directory() {
    let (daemon, dir, mut cleanup) = scene().await;
    let archive = zip_in(
        dir.path(),
        "names.zip",
        json!([
            { "name": "täglich.txt", "encoding": "cp437", "utf8_flag": false, "create_system": 0, "text": "cp437" },
            { "name": "├ñ-windows.txt", "stored": "ä-windows.txt", "encoding": "utf-8", "utf8_flag": false, "create_system": 0, "text": "w" },
            { "name": "ü-unix.txt", "encoding": "utf-8", "utf8_flag": false, "text": "u" },
            { "name": "ä.txt", "encoding": "cp437", "utf8_flag": false, "text": "a" },
            { "name": "ö.txt", "encoding": "cp437", "utf8_flag": false, "text": "o" },
            { "name": "größe/daten.txt", "encoding": "utf-8", "text": "utf-8 flag" },
            { "name": "café.txt", "stored": "caf_.txt", "unicode_path": true, "text": "upath" },
            { "name": "naïve.txt", "stored": "na_ve.txt", "unicode_path": "bad_crc", "text": "bad" },
            { "name": "win\\path.txt", "text": "backslash" },
        ]),
    );
    let expected = dir_layer(
        dir.path().join("expected"),
        &[
            ("täglich.txt", "cp437"),
            ("├ñ-windows.txt", "w"),
            ("ü-unix.txt", "u"),
            ("ä.txt", "a"),
            ("ö.txt", "o"),
            ("größe/daten.txt", "utf-8 flag"),
            ("café.txt", "upath"),
            ("na_ve.txt", "bad"),
            ("win\\path.txt", "backslash"),
        ],
    );
    // Made on Windows without modes: extracted executable (SAM #1014).
    for windows in ["täglich.txt", "├ñ-windows.txt"] {
        fs::set_permissions(expected.join(windows), fs::Permissions::from_mode(0o755)).unwrap();
    }
    cleanup
        .built_like(
            "decoded names",
            &daemon,
            &[(&unique("names"), &archive)],
            &expected,
        )
        .await;

    let hostile = zip_in(
        dir.path(),
        "hostile.zip",
        json!([{ "name": "a\\..\\..\\evil", "text": "x" }]),
    );
    assert_refused(&daemon, &hostile, &["'..'"]).await;
    daemon.stop().await;
}

/// The zip-bomb guard refuses no layer Lambda accepts: an 8 MiB pre-allocated database of
/// zeros (about 1025:1) is in the image as it is, while a 1 GiB file of zeros (more than
/// Lambda's whole unzipped limit) is INVALID_ARGUMENT naming the entry and `max_zip_ratio`,
/// refused from the central directory: nothing of it is extracted into the cache.
#[tokio::test(flavor = "multi_thread")]
async fn a_sparse_database_builds_and_a_gigabyte_bomb_is_refused_unextracted() {
    const MIB: u64 = 1 << 20;
    let (daemon, dir, mut cleanup) = scene().await;
    let archive = zip_in(
        dir.path(),
        "sqlite.zip",
        json!([{ "name": "data/cache.db", "zeros": 8 * MIB, "deflate": true }]),
    );
    let ratio = 8 * MIB / fs::metadata(&archive).unwrap().len();
    assert!(ratio > 1000, "the archive is compressed {ratio}:1");
    let expected = dir.path().join("expected");
    fs::create_dir_all(expected.join("data")).unwrap();
    fs::write(expected.join("data/cache.db"), vec![0u8; 8 << 20]).unwrap();
    set_time(&expected.join("data/cache.db"), ENTRY_TIME);
    let name = unique("sqlite");
    cleanup
        .built_like("sparse database", &daemon, &[(&name, &archive)], &expected)
        .await;

    let bomb = zip_in(
        dir.path(),
        "bomb.zip",
        json!([{ "name": "bomb.bin", "zeros": 1024 * MIB, "deflate": true }]),
    );
    assert_refused(
        &daemon,
        &bomb,
        &["\"bomb.bin\"", "rejected", "max_zip_ratio"],
    )
    .await;
    let layers = daemon.dir.path().join("cache/layers");
    let mut left: Vec<String> = fs::read_dir(&layers)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".format")
        .collect();
    left.sort();
    assert_eq!(
        left.len(),
        1,
        "only the database's layer is extracted: {left:?}"
    );
    daemon.stop().await;
}

/// The little-endian ELF header of an executable for `machine` (62 x86_64, 183 aarch64), as
/// far as the daemon reads it, in hex.
fn elf_for(machine: u16) -> String {
    let mut header = b"\x7fELF\x02\x01\x01".to_vec();
    header.resize(18, 0);
    header.extend_from_slice(&machine.to_le_bytes());
    header.resize(64, 0);
    hex::encode(header)
}

/// What Lambda would refuse at deploy or fail on at run time still builds, with one warning
/// per kind and layer: files without read permission (in a zip: for the owner, publish
/// refused, and for others, unreadable at run time; in a directory: for others) as
/// `unreadable_in_lambda`; six layers as `too_many_layers`; an extension built for arm64 in an
/// x86_64 function as `extension_arch_mismatch` (an x86_64 bootstrap is fine). `Completed`
/// repeats the stream's warnings. The image has the files readable; a cache hit warns the
/// same again.
#[tokio::test(flavor = "multi_thread")]
async fn what_lambda_would_refuse_builds_with_one_warning_per_kind() {
    let (daemon, dir, mut cleanup) = scene().await;
    let zipped = zip_in(
        dir.path(),
        "rules.zip",
        json!([
            { "name": "private.txt", "text": "owner cannot read", "mode": 0o100_200 },
            { "name": "group.txt", "text": "others cannot read", "mode": 0o100_640 },
            { "name": "fine.txt", "text": "fine", "mode": 0o100_644 },
            { "name": "bootstrap", "hex": elf_for(62), "mode": 0o100_755 },
            { "name": "extensions/arm-ext", "hex": elf_for(183), "mode": 0o100_755 },
        ]),
    );
    let plain = dir_layer(
        dir.path().join("plain"),
        &[("secret.txt", "for the owner only")],
    );
    fs::set_permissions(plain.join("secret.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    let mut layers: Vec<(String, std::path::PathBuf)> = (0..4)
        .map(|index| {
            let layer = dir.path().join(format!("small-{index}"));
            let layer = dir_layer(layer, &[(&format!("small-{index}.txt"), "x")]);
            (unique("small"), layer)
        })
        .collect();
    let (zip_name, dir_name) = (unique("zipped"), unique("plain"));
    layers.push((dir_name.clone(), plain));
    layers.push((zip_name.clone(), zipped));
    let request: Vec<(&str, &Path)> = layers
        .iter()
        .map(|(name, path)| (name.as_str(), path.as_path()))
        .collect();
    for round in ["first build", "cache hit"] {
        let outcome = build(&daemon.socket, zip_request(&request)).await;
        let tag = outcome.completed().tag.clone();
        cleanup.0.push(tag.clone());
        // Completed repeats every warning of the stream, in order.
        let pair = |w: &proto::Warning| (w.code.clone(), w.message.clone());
        let streamed: Vec<(String, String)> = outcome
            .events
            .iter()
            .filter_map(|e| match &e.event {
                Some(Event::Warning(w)) => Some(pair(w)),
                _ => None,
            })
            .collect();
        let completed: Vec<(String, String)> =
            outcome.completed().warnings.iter().map(pair).collect();
        assert_eq!(completed, streamed, "{round}");
        let unreadable = warnings_with_code(&outcome, "unreadable_in_lambda");
        assert_eq!(unreadable.len(), 2, "{round}: {unreadable:?}");
        let zip_text = unreadable
            .iter()
            .find(|w| w.contains(&format!("layer {zip_name:?}")))
            .unwrap_or_else(|| panic!("{round}: no warning for the zip: {unreadable:?}"));
        assert_holds(
            round,
            zip_text,
            &[
                "1 file(s) without read permission for their owner (\"private.txt\")",
                "Some files do not have read permissions",
                "1 file(s) without read permission for others (\"group.txt\")",
                "aws-sam-cli#2344",
            ],
        );
        assert!(!zip_text.contains("fine.txt"), "{zip_text}");
        let dir_text = unreadable
            .iter()
            .find(|w| w.contains(&format!("layer {dir_name:?}")))
            .unwrap_or_else(|| panic!("{round}: no warning for the directory: {unreadable:?}"));
        assert!(
            dir_text.contains("for others (\"secret.txt\")"),
            "{round}: {dir_text}"
        );
        let many = warnings_with_code(&outcome, "too_many_layers");
        assert_eq!(many.len(), 1, "{round}: {many:?}");
        assert!(
            many[0].contains("6 layers") && many[0].contains("at most 5"),
            "{many:?}"
        );
        let arch = warnings_with_code(&outcome, "extension_arch_mismatch");
        assert_eq!(arch.len(), 1, "{round}: {arch:?}");
        assert_holds(
            round,
            &arch[0],
            &[
                "\"/opt/extensions/arm-ext\"",
                "for arm64",
                "function is x86_64",
                "Extension.LaunchError",
            ],
        );
        assert!(!arch[0].contains("/opt/bootstrap"), "{}", arch[0]);
        assert!(warnings_with_code(&outcome, "layers_too_large").is_empty());

        let opt = image_opt(&tag);
        for (path, mode) in [
            ("private.txt", 0o644),
            ("group.txt", 0o644),
            ("secret.txt", 0o644),
            ("extensions/arm-ext", 0o755),
        ] {
            assert_eq!(opt[path].mode, mode, "{round}: /opt/{path}");
        }
    }
    daemon.stop().await;
}

/// A layer writing into a directory that an earlier zip layer ships without write permission
/// for its owner still builds, with an `unreadable_in_lambda` warning naming the file and the
/// earlier layer (Lambda refuses the function: "Some files need to be overridden by layers but
/// don't have write permissions"); the image's directory is 0755 and holds both files.
#[tokio::test(flavor = "multi_thread")]
async fn writing_into_a_directory_an_earlier_zip_locked_warns() {
    let (daemon, dir, mut cleanup) = scene().await;
    let locked = zip_in(
        dir.path(),
        "locked.zip",
        json!([
            { "name": "python/", "mode": 0o040_555 },
            { "name": "python/base.py", "text": "base" },
        ]),
    );
    let writer = dir_layer(dir.path().join("writer"), &[("python/extra.py", "extra")]);
    let expected = dir_layer(
        dir.path().join("expected"),
        &[("python/base.py", "base"), ("python/extra.py", "extra")],
    );
    let (locked_name, writer_name) = (unique("locked"), unique("writer"));
    let outcome = cleanup
        .built_like(
            "locked directory",
            &daemon,
            &[(&locked_name, &locked), (&writer_name, &writer)],
            &expected,
        )
        .await;
    let warnings = warnings_with_code(&outcome, "unreadable_in_lambda");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let (writer_layer, locked_layer) =
        (format!("layer {writer_name:?}"), format!("{locked_name:?}"));
    assert_holds(
        "locked directory",
        &warnings[0],
        &[
            &writer_layer,
            "\"python/extra.py\"",
            &locked_layer,
            "Some files need to be overridden by layers",
        ],
    );
    daemon.stop().await;
}

/// A zip layer the client may not read is PERMISSION_DENIED naming the file and the client's
/// uid (aws-sam-cli#1491), not INVALID_ARGUMENT "neither a directory nor a zip archive": the
/// CLI run as `nobody` against a daemon that allows it.
#[tokio::test(flavor = "multi_thread")]
async fn a_zip_layer_the_client_may_not_read_is_permission_denied() {
    const NOBODY: u32 = 65534;
    let daemon = TestDaemon::start_with(|config| config.allow_uids = vec![NOBODY]).await;
    let open = |path: &Path, mode| fs::set_permissions(path, fs::Permissions::from_mode(mode));
    open(daemon.dir.path(), 0o755).unwrap();
    open(&daemon.socket, 0o666).unwrap();
    let dir = tempfile::tempdir().unwrap();
    open(dir.path(), 0o755).unwrap();
    let archive = zip_in(
        dir.path(),
        "private.zip",
        json!([{ "name": "a.txt", "text": "a" }]),
    );
    open(&archive, 0o600).unwrap();
    let layer = format!("{}={}", unique("private"), archive.display());
    let output = tokio::process::Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
            env!("CARGO_BIN_EXE_lambda-imagectl"),
            "--socket",
            daemon.socket.to_str().unwrap(),
            "build",
            "--runtime",
            "python3.12",
            "--skip-pull-image",
            "--layer",
            &layer,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let (path, uid) = (archive.display().to_string(), format!("uid {NOBODY}"));
    assert_holds(
        "unreadable zip",
        &stderr,
        &["PERMISSION_DENIED", &path, &uid, "zip archive"],
    );
    daemon.stop().await;
}
