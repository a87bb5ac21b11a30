//! Layer sources against the real private engine (scripts/test-env.sh): zip layers (detected
//! by content, extracted once, crash-safe), hostile archives, the stat cache that keeps
//! unchanged layers from rebuilding, and Prune.
//!
//! Zips are written by `tests/fixtures/layers/mkzip.py` (stdlib `zipfile`), which writes any
//! entry name, mode and duplicate a hostile archive needs.

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lambda_imaged::client::{self, Client, proto};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::*;
use tonic::Code;

const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFIFO: u32 = 0o010_000;
const S_IFCHR: u32 = 0o020_000;
const MIB: u64 = 1 << 20;

/// Removes the containers and images a test made, even when it panics.
#[derive(Default)]
struct Cleanup {
    containers: Vec<String>,
    images: Vec<String>,
}

impl Cleanup {
    fn image(&mut self, reference: &str) {
        self.images.push(reference.to_owned());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for container in &self.containers {
            docker(&["rm", "-f", container]);
        }
        for image in &self.images {
            rmi_all(image);
        }
    }
}

/// Writes the zip `entries` (see mkzip.py for the keys) to `out`.
fn make_zip(out: &Path, entries: Value) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/layers/mkzip.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (installed by scripts/test-env.sh)");
    let spec = json!({ "out": out, "entries": entries });
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(spec.to_string().as_bytes()).unwrap();
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "mkzip.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// sha256 of a file, hex.
fn sha256_file(path: &Path) -> String {
    let mut hasher = Sha256::new();
    std::io::copy(&mut fs::File::open(path).unwrap(), &mut hasher).unwrap();
    hex::encode(hasher.finalize())
}

/// Names in `<cache>/layers` (none when it does not exist), sorted; the store's format
/// marker is not a layer.
fn layer_entries(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(cache.join("layers"))
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name != ".format")
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Regular files under `dir` and their total size.
fn files_under(dir: &Path) -> (usize, u64) {
    let mut count = 0;
    let mut bytes = 0;
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            let (c, b) = files_under(&entry.path());
            count += c;
            bytes += b;
        } else if kind.is_file() {
            count += 1;
            bytes += entry.metadata().unwrap().len();
        }
    }
    (count, bytes)
}

/// Every path under `dir` with its content (files, truncated) or link target, for messages.
fn describe_tree(dir: &Path) -> String {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(entries) = fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(dir).unwrap().display().to_string();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_symlink() {
                out.push(format!(
                    "{rel} -> {}",
                    fs::read_link(&path).unwrap().display()
                ));
            } else {
                let text = fs::read(&path).unwrap_or_default();
                let shown = String::from_utf8_lossy(&text[..text.len().min(40)]).into_owned();
                out.push(format!("{rel} = {shown:?}"));
            }
        }
    }
    out.sort();
    out.join(", ")
}

/// The daemon's counters.
async fn stats(daemon: &TestDaemon) -> proto::Stats {
    daemon
        .client()
        .await
        .get_info(proto::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .stats
        .expect("GetInfo carries stats")
}

/// A zip made on Windows by a tool that writes no attributes at all (create_system 0,
/// external_attr 0), holding the bootstrap fixture and a message, named `layer.bin`: the
/// daemon detects it by content, the bootstrap is 0755 and answers through the real RIE; a
/// second request is cached and reuses the one extracted directory.
#[tokio::test(flavor = "multi_thread")]
async fn zip_layer_made_on_windows_runs_through_the_rie_and_is_extracted_once() {
    let daemon = TestDaemon::start().await;
    let cache = daemon.dir.path().join("cache");
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("layer.bin");
    let bootstrap = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bootstrap");
    make_zip(
        &archive,
        json!([
            { "name": "bootstrap", "file": bootstrap },
            { "name": "message.txt", "text": "hello from a zip made on Windows" },
        ]),
    );
    let digest = sha256_file(&archive);
    let name = unique("zip");
    let request = zip_request(&[(&name, &archive)]);

    let mut cleanup = Cleanup::default();
    let first = build(&daemon.socket, request.clone()).await;
    let done = first.completed().clone();
    cleanup.image(&done.tag);
    assert!(!done.cached);
    assert_eq!(done.reason, proto::Reason::Missing as i32);
    assert_eq!(
        layer_entries(&cache),
        vec![digest.clone()],
        "extracted into layers/<sha256 of the zip>"
    );
    let extracted = cache.join("layers").join(&digest);
    let inode = fs::metadata(extracted.join("bootstrap")).unwrap().ino();

    let modes = run_in_image(&done.tag, "stat -c '%a %n' /opt/bootstrap /opt/message.txt");
    assert_eq!(
        modes.lines().collect::<Vec<_>>(),
        ["755 /opt/bootstrap", "755 /opt/message.txt"],
        "entries without Unix modes are 0755"
    );
    let response = invoke_through_rie(&done.tag).await;
    assert_eq!(
        response,
        r#"{"echo":{"ping":1},"layer":"hello from a zip made on Windows"}"#
    );

    let since = now_stamp();
    let again = build(&daemon.socket, request).await;
    let again = again.completed();
    assert!(again.cached, "{again:?}");
    assert_eq!(again.reason, proto::Reason::UpToDate as i32);
    assert_eq!(again.image_id, done.image_id);
    assert_eq!(engine_builds(&done.tag, &since), 0);
    assert_eq!(
        layer_entries(&cache),
        [digest],
        "one extracted dir, no temp dirs"
    );
    assert_eq!(
        fs::metadata(extracted.join("bootstrap")).unwrap().ino(),
        inode,
        "not extracted again"
    );
    daemon.stop().await;
}

/// Zips made on Windows by Explorer or 7-Zip (MS-DOS attributes, e.g. 0x20 "archive") or by
/// Python's zipfile on Windows (create_system 0, st_mode 0o100666 in the high word) carry no
/// Unix execute bit either: their bootstrap must still come out 0755 (SAM #1014, #1846).
#[tokio::test(flavor = "multi_thread")]
async fn zip_with_msdos_attributes_keeps_bootstrap_executable() {
    let daemon = TestDaemon::start().await;
    let cache = daemon.dir.path().join("cache");
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("explorer.zip");
    let bootstrap = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bootstrap");
    make_zip(
        &archive,
        json!([
            { "name": "bootstrap", "file": bootstrap, "dos_attr": 0x20 },
            { "name": "bin/tool", "text": "#!/bin/sh\necho tool\n",
              "dos_attr": (0o100_666u32 << 16) | 0x20 },
        ]),
    );
    let name = unique("dos");
    let mut cleanup = Cleanup::default();
    let done = build(&daemon.socket, zip_request(&[(&name, &archive)]))
        .await
        .completed()
        .clone();
    cleanup.image(&done.tag);
    let extracted = cache.join("layers").join(sha256_file(&archive));
    let mode = |rel: &str| {
        fs::metadata(extracted.join(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    let on_disk = (mode("bootstrap"), mode("bin/tool"));
    let in_image = run_in_image(&done.tag, "stat -c '%a %n' /opt/bootstrap /opt/bin/tool");
    daemon.stop().await;
    assert_eq!(
        on_disk,
        (0o755, 0o755),
        "extracted modes of bootstrap, bin/tool (octal {:o}, {:o})",
        on_disk.0,
        on_disk.1
    );
    assert_eq!(
        in_image.lines().collect::<Vec<_>>(),
        ["755 /opt/bootstrap", "755 /opt/bin/tool"]
    );
}

/// One hostile archive: what it holds, the entry the error must name, and paths outside the
/// cache that must not exist afterwards.
struct Hostile {
    label: &'static str,
    entries: Value,
    entry: String,
    /// Words the message must also contain.
    words: Vec<&'static str>,
    outside: Vec<PathBuf>,
    /// Served by the daemon with low limits.
    limited: bool,
}

/// Every hostile archive (zip-slip, absolute, drive-letter and backslash paths, a directory
/// and a file under one name, writing through a symlink, fifos, devices, a ratio bomb,
/// a bomb lying about its size, too many bytes, too many entries) is INVALID_ARGUMENT naming
/// the entry; nothing is written outside the cache and no partial or temp layer is left. Links
/// pointing outside the layer (relative, absolute, through a chain of links) are kept as links,
/// as Lambda keeps them, and never followed on the host: the image holds the links, not the
/// host's files. The daemon keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_zips_are_rejected_naming_the_entry_and_leave_nothing() {
    let daemon = TestDaemon::start().await;
    let limited = TestDaemon::start_with(|config| {
        config.zip_limits.max_bytes = 4 * MIB;
        config.zip_limits.max_entries = 8;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let u = unique("");
    let slip_target = PathBuf::from(format!("/tmp/lambda-imaged-evil-slip-{u}"));
    let backslash_target = PathBuf::from(format!("/tmp/lambda-imaged-evil-bs-{u}"));
    let absolute_target = PathBuf::from(format!("/tmp/lambda-imaged-evil-abs-{u}"));
    // A real directory outside: writing through a link to it would succeed if allowed.
    let link_target = dir.path().join("outside");
    fs::create_dir(&link_target).unwrap();
    let ok = json!({ "name": "ok.txt", "text": "harmless", "mode": S_IFREG | 0o644 });
    let file = |name: &str| json!({ "name": name, "text": "pwned", "mode": S_IFREG | 0o644 });
    let link =
        |name: &str, target: &str| json!({ "name": name, "text": target, "mode": S_IFLNK | 0o777 });
    let deep_slip = format!("{}tmp/lambda-imaged-evil-slip-{u}", "../".repeat(24));
    let backslash_slip = format!("{}tmp\\lambda-imaged-evil-bs-{u}", "..\\".repeat(24));
    let cases = vec![
        Hostile {
            label: "parent",
            entries: json!([ok, file(&format!("../evil-{u}"))]),
            entry: format!("../evil-{u}"),
            words: vec![],
            outside: vec![
                daemon.dir.path().join(format!("cache/layers/evil-{u}")),
                daemon.dir.path().join(format!("cache/evil-{u}")),
            ],
            limited: false,
        },
        Hostile {
            label: "deep zip-slip",
            entries: json!([ok, file(&deep_slip)]),
            entry: deep_slip.clone(),
            words: vec![],
            outside: vec![slip_target.clone()],
            limited: false,
        },
        Hostile {
            label: "absolute",
            entries: json!([ok, file(absolute_target.to_str().unwrap())]),
            entry: absolute_target.display().to_string(),
            words: vec![],
            outside: vec![absolute_target.clone()],
            limited: false,
        },
        Hostile {
            label: "drive letter",
            entries: json!([ok, { "name": format!("C:\\evil-{u}"), "text": "pwned" }]),
            entry: format!("C:\\evil-{u}"),
            words: vec![],
            outside: vec![],
            limited: false,
        },
        Hostile {
            label: "backslash zip-slip",
            entries: json!([ok, { "name": backslash_slip, "text": "pwned" }]),
            entry: backslash_slip.clone(),
            words: vec![],
            outside: vec![backslash_target.clone()],
            limited: false,
        },
        Hostile {
            label: "directory and file with one path",
            entries: json!([ok, { "name": "same/", "mode": 0o040_755 }, file("same")]),
            entry: "same".into(),
            words: vec!["duplicate"],
            outside: vec![],
            limited: false,
        },
        Hostile {
            label: "through a link",
            entries: json!([
                ok,
                link("escape", link_target.to_str().unwrap()),
                file("escape/pwned")
            ]),
            entry: "escape/pwned".into(),
            words: vec![],
            outside: vec![link_target.join("pwned")],
            limited: false,
        },
        Hostile {
            label: "fifo",
            entries: json!([ok, { "name": "pipe", "mode": S_IFIFO | 0o644 }]),
            entry: "pipe".into(),
            words: vec![],
            outside: vec![],
            limited: false,
        },
        Hostile {
            label: "device",
            entries: json!([ok, { "name": "dev/null", "mode": S_IFCHR | 0o666 }]),
            entry: "dev/null".into(),
            words: vec![],
            outside: vec![],
            limited: false,
        },
        Hostile {
            label: "ratio bomb",
            entries: json!([ok, { "name": "zeros.bin", "zeros": 300 * MIB, "deflate": true, "mode": S_IFREG | 0o644 }]),
            entry: "zeros.bin".into(),
            words: vec!["max_zip_ratio"],
            outside: vec![],
            limited: false,
        },
        Hostile {
            label: "bomb lying about its size",
            entries: json!([ok, { "name": "liar.bin", "zeros": 64 * MIB, "deflate": true, "lie_size": 1024, "mode": S_IFREG | 0o644 }]),
            entry: "liar.bin".into(),
            words: vec![],
            outside: vec![],
            limited: false,
        },
        Hostile {
            label: "too many bytes",
            entries: json!([
                { "name": "part-1", "random": 2 * MIB, "mode": S_IFREG | 0o644 },
                { "name": "part-2", "random": 2 * MIB, "mode": S_IFREG | 0o644 },
                { "name": "part-3", "random": 2 * MIB, "mode": S_IFREG | 0o644 },
            ]),
            entry: "part-3".into(),
            words: vec!["max_zip_bytes"],
            outside: vec![],
            limited: true,
        },
    ];
    let mut cleanup = Cleanup::default();
    let mut failures = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let archive = dir.path().join(format!("hostile-{index}.zip"));
        make_zip(&archive, case.entries.clone());
        let serving = if case.limited { &limited } else { &daemon };
        let cache = serving.dir.path().join("cache");
        let before = layer_entries(&cache);
        let name = unique("hostile");
        let outcome = build(&serving.socket, zip_request(&[(&name, &archive)])).await;
        let quoted = format!("{:?}", case.entry);
        match &outcome.result {
            Ok(completed) => {
                cleanup.image(&completed.tag);
                let extracted = cache.join("layers").join(sha256_file(&archive));
                failures.push(format!(
                    "{}: accepted as {}, extracted: {}",
                    case.label,
                    completed.tag,
                    describe_tree(&extracted)
                ));
            }
            Err(status) => {
                let message = status.message();
                eprintln!("{}: {:?} {message}", case.label, status.code());
                let named = message.contains(&case.entry) || message.contains(&quoted);
                if status.code() != Code::InvalidArgument
                    || !named
                    || !message.contains("rejected")
                    || !case.words.iter().all(|w| message.contains(w))
                {
                    failures.push(format!(
                        "{}: {:?} {message:?} (want INVALID_ARGUMENT naming {quoted}, \"rejected\", {:?})",
                        case.label,
                        status.code(),
                        case.words
                    ));
                }
            }
        }
        for path in &case.outside {
            if fs::symlink_metadata(path).is_ok() {
                let _ = fs::remove_file(path);
                failures.push(format!("{}: wrote {}", case.label, path.display()));
            }
        }
        // Compared with before the case, so one accepted archive does not hide the others.
        let left = layer_entries(&cache);
        if left != before && outcome.result.is_err() {
            failures.push(format!(
                "{}: left {left:?} in {}/layers",
                case.label,
                cache.display()
            ));
        }
    }
    assert_eq!(
        fs::read_dir(&link_target).unwrap().count(),
        0,
        "nothing written through the link"
    );

    // Too many entries: refused before anything is extracted.
    let archive = dir.path().join("many.zip");
    let entries: Vec<Value> = (0..9)
        .map(|i| json!({ "name": format!("f{i}"), "text": "x", "mode": S_IFREG | 0o644 }))
        .collect();
    make_zip(&archive, Value::Array(entries));
    let outcome = build(&limited.socket, zip_request(&[(&unique("many"), &archive)])).await;
    let status = outcome.status();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(
        status.message().contains("max_zip_entries"),
        "{}",
        status.message()
    );
    assert!(layer_entries(&limited.dir.path().join("cache")).is_empty());

    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Links out of the layer are links in the image, never the host's files they name.
    let archive = dir.path().join("links-out.zip");
    make_zip(
        &archive,
        json!([
            ok,
            link("lib/passwd", "../../../../../../../../etc/passwd"),
            link("shadow", "/etc/shadow"),
            { "name": "a/", "mode": 0o040_755 },
            link("a/b", ".."),
            link("x", "a/b/.."),
        ]),
    );
    let name = unique("linksout");
    let outcome = build(&daemon.socket, zip_request(&[(&name, &archive)])).await;
    let tag = outcome.completed().tag.clone();
    cleanup.image(&tag);
    let listing = run_in_image(
        &tag,
        "for l in lib/passwd shadow a/b x; do echo \"$l $(readlink /opt/$l)\"; done; \
         [ -L /opt/shadow ] && echo shadow-is-a-link",
    );
    assert_eq!(
        listing,
        "lib/passwd ../../../../../../../../etc/passwd\nshadow /etc/shadow\na/b ..\nx a/b/..\n\
         shadow-is-a-link\n"
    );

    // Still serving: a harmless zip builds.
    let archive = dir.path().join("fine.zip");
    make_zip(&archive, json!([ok]));
    let name = unique("fine");
    let fine = build(&daemon.socket, zip_request(&[(&name, &archive)])).await;
    cleanup.image(&fine.completed().tag);
    limited.stop().await;
    daemon.stop().await;
}

/// A Build that may be cut off by the daemon dying: its Completed, or how it ended.
async fn build_until_cut(
    socket: PathBuf,
    request: proto::BuildRequest,
) -> Result<proto::Completed, String> {
    let mut client = Client::connect(&socket).await.map_err(|e| e.to_string())?;
    client
        .build_with(request, |_| {})
        .await
        .map_err(|status| status.to_string())
}

/// kill -9 of the daemon binary while it extracts a big zip leaves only a `.tmp-*` dir; the
/// restarted daemon removes it, the same request succeeds, and `layers/` then holds only the
/// complete `<sha256>` dir with every file of the archive.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_extraction_leaves_no_partial_layer() {
    let mut entry_bytes = 256 * 1024u64;
    let entries = 256usize;
    for attempt in 1..=4 {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("big.zip");
        let spec: Vec<Value> = (0..entries)
            .map(|i| {
                json!({ "name": format!("data/{:02}/f{i:04}.bin", i % 16), "random": entry_bytes,
                        "mode": S_IFREG | 0o644 })
            })
            .collect();
        make_zip(&archive, Value::Array(spec));
        let digest = sha256_file(&archive);
        let name = unique("big");
        let request = zip_request(&[(&name, &archive)]);

        // The restart below runs in the same dir: the same socket and cache.
        let mut daemon = support::daemon::Daemon::builder()
            .in_dir(dir.path())
            .start()
            .await;
        let (socket, cache) = (daemon.socket().to_owned(), daemon.cache());
        let started = Instant::now();
        let task = tokio::spawn(build_until_cut(socket.clone(), request.clone()));
        let mut seen = None;
        while started.elapsed() < Duration::from_secs(300) && !task.is_finished() {
            if let Some(temp) = layer_entries(&cache)
                .into_iter()
                .find(|n| n.starts_with(".tmp-"))
            {
                seen = Some(temp);
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        daemon.kill_9();
        let cut = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the client notices the daemon died")
            .unwrap();
        let left = layer_entries(&cache);
        let Some(temp) = seen.filter(|_| !left.contains(&digest)) else {
            // Extraction finished before the kill: try again with a bigger archive.
            eprintln!(
                "attempt {attempt}: {entries} x {entry_bytes} B extracted before the kill \
                 (left {left:?}, build {cut:?}); growing the archive"
            );
            if let Ok(done) = cut {
                rmi_all(&done.tag);
            }
            entry_bytes *= 2;
            continue;
        };
        assert!(cut.is_err(), "the build was cut off: {cut:?}");
        assert_eq!(
            left,
            vec![temp.clone()],
            "killed mid-extraction: only the temp dir exists"
        );

        let daemon = support::daemon::Daemon::builder()
            .in_dir(dir.path())
            .start()
            .await;
        assert_eq!(
            layer_entries(&cache),
            Vec::<String>::new(),
            "the leftover temp dir is removed at start-up"
        );
        let mut cleanup = Cleanup::default();
        let outcome = build(&socket, request.clone()).await;
        let done = match &outcome.result {
            Ok(done) => {
                cleanup.image(&done.tag);
                done.clone()
            }
            Err(status) => panic!(
                "after the restart: {:?} {}; log: {}",
                status.code(),
                status.message(),
                daemon.log()
            ),
        };
        assert_eq!(
            layer_entries(&cache),
            vec![digest.clone()],
            "only the complete layer, no .tmp-*"
        );
        let (count, bytes) = files_under(&cache.join("layers").join(&digest));
        assert_eq!(count, entries, "every file of the archive");
        assert_eq!(bytes, entries as u64 * entry_bytes);
        let in_image = run_in_image(&done.tag, "find /opt -type f | wc -l");
        drop(daemon);
        assert_eq!(in_image.trim(), entries.to_string());
        return;
    }
    panic!("extraction always finished before the daemon could be killed");
}

/// An unchanged directory layer costs no engine build and no file reads; a file whose mtime
/// alone changed is re-hashed alone and rebuilds (the image keeps file times); a content
/// change rebuilds with LAYER_CHANGED naming that layer and re-hashes exactly that one file.
#[tokio::test(flavor = "multi_thread")]
async fn unchanged_layer_is_not_rebuilt_and_only_a_touched_file_is_rehashed() {
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    for i in 0..20 {
        write_file(
            &a.join(format!("lib/a{i}.py")),
            &format!("# module a{i}\n{}", "x".repeat(4096)),
            0o644,
        );
    }
    for i in 0..10 {
        write_file(&b.join(format!("data/b{i}.txt")), &format!("b{i}"), 0o644);
    }
    write_file(&b.join("message.txt"), "before", 0o644);
    let created = SystemTime::now();
    let (na, nb) = (unique("a"), unique("b"));
    let request = zip_request(&[(&na, &a), (&nb, &b)]);

    let mut cleanup = Cleanup::default();
    let first = build(&daemon.socket, request.clone()).await;
    let tag = first.completed().tag.clone();
    cleanup.image(&tag);
    assert!(!first.completed().cached);

    // Files changed within the daemon's racy window (2 s, like git's index) are re-read on
    // every request; wait until the layer's timestamps are old enough to be trusted.
    let settled = created + Duration::from_secs(3);
    while SystemTime::now() < settled {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let warm = build(&daemon.socket, request.clone()).await;
    assert!(warm.completed().cached, "{:?}", warm.completed());

    let before = stats(&daemon).await;
    let since = now_stamp();
    let unchanged = build(&daemon.socket, request.clone()).await;
    let unchanged = unchanged.completed().clone();
    assert!(unchanged.cached);
    assert_eq!(unchanged.reason, proto::Reason::UpToDate as i32);
    assert_eq!(
        engine_builds(&tag, &since),
        0,
        "an unchanged layer must not build"
    );
    let after_unchanged = stats(&daemon).await;
    assert_eq!(
        after_unchanged.files_hashed, before.files_hashed,
        "an unchanged layer reads no file"
    );
    assert_eq!(after_unchanged.bytes_hashed, before.bytes_hashed);
    assert_eq!(after_unchanged.cache_hits, before.cache_hits + 1);

    // mtime only: the time is part of the image (a `.pyc` is checked against its source's
    // time), so the layer changed: rebuilt naming layer b, the one file re-hashed, the image
    // carrying the new time.
    let touched = b.join("message.txt");
    let new_time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    fs::File::options()
        .write(true)
        .open(&touched)
        .unwrap()
        .set_modified(new_time)
        .unwrap();
    // Its ctime is now: wait out the racy window, so the one walk that hashes it remembers it.
    let settled = SystemTime::now() + Duration::from_secs(3);
    while SystemTime::now() < settled {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let since = now_stamp();
    let retimed = build(&daemon.socket, request.clone()).await;
    let retimed = retimed.completed().clone();
    assert!(!retimed.cached, "a new time rebuilds: {retimed:?}");
    assert_eq!(retimed.reason, proto::Reason::LayerChanged as i32);
    assert_eq!(retimed.changed_layer, nb);
    assert_eq!(engine_builds(&tag, &since), 1);
    let after_touch = stats(&daemon).await;
    assert_eq!(after_touch.files_hashed, after_unchanged.files_hashed + 1);
    assert_eq!(
        run_in_image(&retimed.tag, "stat -c %Y /opt/message.txt"),
        "1700000000\n"
    );

    // New content: rebuild naming layer b; only that file read.
    write_file(&touched, "after the change", 0o644);
    let since = now_stamp();
    let changed = build(&daemon.socket, request.clone()).await;
    let changed = changed.completed().clone();
    assert!(!changed.cached);
    assert_eq!(changed.reason, proto::Reason::LayerChanged as i32);
    assert_eq!(changed.changed_layer, nb);
    assert_eq!(engine_builds(&tag, &since), 1);
    let after_change = stats(&daemon).await;
    assert_eq!(
        after_change.files_hashed,
        after_touch.files_hashed + 1,
        "exactly the changed file is re-hashed"
    );
    assert_eq!(
        after_change.bytes_hashed,
        after_touch.bytes_hashed + "after the change".len() as u64
    );
    assert_eq!(
        run_in_image(&changed.tag, "cat /opt/message.txt"),
        "after the change"
    );
    daemon.stop().await;
}

/// The daemon's last-use record for `tag` under `cache`.
fn use_record(cache: &Path, tag: &str) -> PathBuf {
    cache
        .join("used")
        .join(hex::encode(Sha256::digest(tag.as_bytes())))
}

/// A daemon of the prune tests, its cache dir, and a temp dir for layers.
async fn prune_setup() -> (TestDaemon, PathBuf, tempfile::TempDir) {
    let daemon = TestDaemon::start().await;
    let cache = daemon.dir.path().join("cache");
    (daemon, cache, tempfile::tempdir().unwrap())
}

/// The engine's size of image `tag` (`.Size`: every layer, the base's included), in bytes.
fn engine_size(tag: &str) -> u64 {
    docker_ok(&["image", "inspect", "-f", "{{.Size}}", tag])
        .trim()
        .parse()
        .unwrap()
}

/// A layer `<dir>/deps` with `bytes` of noise (from `seed`) in `python/blob.bin`.
fn deps_layer(dir: &Path, bytes: u64, seed: u64) -> PathBuf {
    let deps = dir.join("deps");
    fs::create_dir_all(deps.join("python")).unwrap();
    fs::write(deps.join("python/blob.bin"), noise(bytes as usize, seed)).unwrap();
    deps
}

/// Prune through the RPC: what was last used more than `seconds` ago, for real or as a dry run.
async fn prune_older_than(
    client: &mut client::ImageBuilderClient<tonic::transport::Channel>,
    seconds: u64,
    dry_run: bool,
) -> proto::PruneResponse {
    client
        .prune(proto::PruneRequest {
            older_than_seconds: seconds,
            keep_storage_bytes: 0,
            dry_run,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Waits for the daemon's own record of `tag`'s use (written off the request path).
async fn recorded(cache: &Path, tag: &str) {
    let path = use_record(cache, tag);
    let what = format!(
        "the daemon to record the use of {tag} in {}",
        path.display()
    );
    until(&what, Duration::from_secs(30), || {
        fs::read_to_string(&path).is_ok_and(|text| text == tag)
    })
    .await;
}

/// Makes `tag` look last used at `when`: waits for the daemon's own record ([`recorded`]) or,
/// for an image the daemon never saw, writes one.
async fn age_record(cache: &Path, tag: &str, when: SystemTime, ours: bool) {
    let path = use_record(cache, tag);
    if ours {
        recorded(cache, tag).await;
    } else {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, tag).unwrap();
    }
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(when)
        .unwrap();
}

/// Prune removes only images this daemon built that no container uses, and extracted layers
/// not used lately: a foreign image (even one named like SAM's, with an old use record), one
/// of ours a created container uses, and a recently used image and layer of ours survive;
/// dry-run (RPC and lambda-imagectl) reports without removing; once the container is gone
/// its image goes too.
///
/// The test engine is shared with parallel tests, so "old" here means a use record in 1971
/// and prune runs with a 50-year age limit: no image of any other test can match it.
#[tokio::test(flavor = "multi_thread")]
async fn prune_removes_only_our_unused_images() {
    let daemon = TestDaemon::start().await;
    let cache = daemon.dir.path().join("cache");
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let mut ours = Vec::new();
    let mut digests = Vec::new();
    // Zip layers for two of them, so prune has extracted layers to consider too.
    for (label, zipped) in [("old-free", true), ("old-busy", false), ("recent", true)] {
        let layer = if zipped {
            let archive = dir.path().join(format!("{label}.zip"));
            make_zip(
                &archive,
                json!([{ "name": "marker.txt", "text": unique(label), "mode": S_IFREG | 0o644 }]),
            );
            digests.push(sha256_file(&archive));
            archive
        } else {
            let layer = dir.path().join(label);
            write_file(&layer.join("marker.txt"), &unique(label), 0o644);
            layer
        };
        let name = unique(label);
        let done = build(&daemon.socket, zip_request(&[(&name, &layer)]))
            .await
            .completed()
            .clone();
        cleanup.image(&done.tag);
        ours.push(done);
    }
    let (free, busy, recent) = (ours[0].clone(), ours[1].clone(), ours[2].clone());
    let (free_layer, recent_layer) = (digests[0].clone(), digests[1].clone());
    let container_name = unique("lambda-imaged-prune-");
    docker_ok(&["create", "--name", &container_name, &busy.tag, "/bin/true"]);
    cleanup.containers.push(container_name.clone());

    let base = "public.ecr.aws/lambda/python:3.12-x86_64";
    let foreign = format!("lambda-imaged-test/{}:1", unique("foreign-"));
    docker_ok(&["tag", base, &foreign]);
    cleanup.image(&foreign);
    // Named like a SAM image, its own image id, a label — but not ours.
    let sam_like = format!("samcli/lambda-python:3.12-x86_64-{}", unique("sam"));
    cleanup.image(&sam_like);
    {
        use std::io::Write;
        let mut child = Command::new("docker")
            .args(["build", "-q", "-t", &sam_like, "-"])
            .env("DOCKER_HOST", engine_host())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(
                format!("FROM {base}\nLABEL io.lambda-imaged.test=\"{sam_like}\"\n").as_bytes(),
            )
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let ancient = UNIX_EPOCH + Duration::from_secs(365 * 86_400);
    age_record(&cache, &free.tag, ancient, true).await;
    age_record(&cache, &busy.tag, ancient, true).await;
    age_record(&cache, &foreign, ancient, false).await;
    age_record(&cache, &sam_like, ancient, false).await;
    // The recent image's record is written in the background too: without it, prune would
    // count the image as last used when it was created (the stand-in base's 1970).
    recorded(&cache, &recent.tag).await;
    // An extracted layer's last use is its directory's mtime.
    fs::File::open(cache.join("layers").join(&free_layer))
        .unwrap()
        .set_modified(ancient)
        .unwrap();
    assert_eq!(layer_entries(&cache), {
        let mut both = vec![free_layer.clone(), recent_layer.clone()];
        both.sort();
        both
    });
    let older_than = 50 * 365 * 86_400;
    let present = |reference: &str| docker(&["image", "inspect", reference]).status.success();

    let ctl = Command::new(env!("CARGO_BIN_EXE_lambda-imagectl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["prune", "--older-than", "50y", "--dry-run"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&ctl.stdout).into_owned();
    assert_eq!(
        ctl.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ctl.stderr)
    );
    let listed: Vec<&str> = printed
        .lines()
        .filter(|l| l.starts_with("image") || l.starts_with("layer"))
        .collect();
    assert_eq!(
        listed,
        [
            format!("image  {}", free.tag),
            format!("layer  {free_layer}")
        ],
        "{printed}"
    );
    assert!(printed.contains("would free"), "{printed}");

    let mut client = daemon.client().await;
    let dry = prune_older_than(&mut client, older_than, true).await;
    assert_eq!(dry.images_removed, vec![free.tag.clone()]);
    assert_eq!(dry.layers_removed, vec![free_layer.clone()]);
    assert!(dry.bytes_freed > 0);
    assert!(present(&free.tag), "dry run removed nothing");
    assert_eq!(layer_entries(&cache).len(), 2, "dry run removed no layer");

    let report = prune_older_than(&mut client, older_than, false).await;
    let outcome = (
        report.images_removed.clone(),
        present(&free.image_id),
        present(&busy.tag),
        present(&recent.tag),
        present(&foreign),
        present(&sam_like),
    );
    let layers_left = layer_entries(&cache);

    // The container gone, its image is unused and goes at the next prune.
    docker_ok(&["rm", &container_name]);
    let second = prune_older_than(&mut client, older_than, false).await;
    let busy_gone = !present(&busy.image_id);
    daemon.stop().await;
    assert_eq!(
        outcome,
        (vec![free.tag.clone()], false, true, true, true, true),
        "(removed, free present, busy present, recent present, foreign present, SAM-like present)"
    );
    assert!(report.bytes_freed > 0);
    assert_eq!(report.layers_removed, [free_layer]);
    assert_eq!(layers_left, [recent_layer], "the recently used layer stays");
    assert_eq!(second.images_removed, vec![busy.tag.clone()]);
    assert!(busy_gone);
}

/// Prune counts a layer our images share once and leaves the base out. Two images share a
/// 16 MiB deps layer (each has its own small code layer): with only the older one due, a dry
/// run would free just its code layer (not its whole size, base and deps included, as the
/// engine reports it); with both due, the deps layer once plus the code layers (and the RIE
/// layer if no other image of ours on this engine holds it). Dry runs only: the engine is
/// shared with parallel tests.
#[tokio::test(flavor = "multi_thread")]
async fn prune_counts_shared_layers_once() {
    const DEPS: u64 = 16 * MIB;
    let (daemon, cache, dir) = prune_setup().await;
    let mut cleanup = Cleanup::default();
    let deps = deps_layer(dir.path(), DEPS, 0xdeb5);
    let deps_name = unique("deps");
    let mut built = Vec::new();
    for code in ["code-a", "code-b"] {
        let layer = dir.path().join(code);
        write_file(&layer.join("python/app.py"), &unique(code), 0o644);
        let name = unique(code);
        let request = zip_request(&[(&deps_name, &deps), (&name, &layer)]);
        let done = build(&daemon.socket, request).await.completed().clone();
        cleanup.image(&done.tag);
        built.push(done);
    }
    let (a, b) = (&built[0], &built[1]);
    assert!(
        engine_size(&a.tag) > DEPS,
        "the engine counts the base and deps in each image"
    );

    let ancient = UNIX_EPOCH + Duration::from_secs(365 * 86_400);
    let older_than = 50 * 365 * 86_400;
    let mut client = daemon.client().await;
    age_record(&cache, &a.tag, ancient, true).await;
    let first = prune_older_than(&mut client, older_than, true).await;
    age_record(&cache, &b.tag, ancient + Duration::from_secs(60), true).await;
    let both = prune_older_than(&mut client, older_than, true).await;
    daemon.stop().await;

    assert_eq!(first.images_removed, vec![a.tag.clone()]);
    assert!(
        first.bytes_freed < MIB,
        "only a's code layer is a's alone: {} bytes",
        first.bytes_freed
    );
    assert_eq!(both.images_removed, [a.tag.clone(), b.tag.clone()]);
    assert!(
        (DEPS..DEPS + 12 * MIB).contains(&both.bytes_freed),
        "the shared deps layer counts once (plus code and at most the RIE): {} bytes",
        both.bytes_freed
    );
}

/// A delta image holds its previous image's layers at their real sizes: one image with its own
/// 4 MiB deps layer, then a code edit (a delta over it; the old image is removed as
/// superseded). With the new image due, a dry run would free the deps layer too, since no
/// other image holds it.
#[tokio::test(flavor = "multi_thread")]
async fn prune_counts_a_delta_images_inherited_layers() {
    const DEPS: u64 = 4 * MIB;
    let (daemon, cache, dir) = prune_setup().await;
    let mut cleanup = Cleanup::default();
    let deps = deps_layer(dir.path(), DEPS, 0xde17a);
    let code = dir.path().join("code");
    write_file(&code.join("python/app.py"), "version = 1\n", 0o644);
    let request = zip_request(&[(&unique("deps"), &deps), (&unique("code"), &code)]);
    let first = build(&daemon.socket, request.clone())
        .await
        .completed()
        .clone();
    cleanup.image(&first.tag);
    write_file(&code.join("python/app.py"), "version = 2\n", 0o644);
    let edited = build(&daemon.socket, request).await;
    let second = edited.completed().clone();
    assert_ne!(second.image_id, first.image_id);
    assert!(
        bytes_sent(&edited.events) < MIB,
        "the edit was a delta: {edited:?}"
    );
    until(
        "the superseded image removed",
        Duration::from_secs(60),
        || {
            !docker(&["image", "inspect", &first.image_id])
                .status
                .success()
        },
    )
    .await;
    let ancient = UNIX_EPOCH + Duration::from_secs(365 * 86_400);
    age_record(&cache, &second.tag, ancient, true).await;
    let mut client = daemon.client().await;
    let dry = prune_older_than(&mut client, 50 * 365 * 86_400, true).await;
    daemon.stop().await;
    assert_eq!(dry.images_removed, vec![second.tag.clone()]);
    assert!(
        dry.bytes_freed >= DEPS,
        "the inherited deps layer is counted: {} bytes",
        dry.bytes_freed
    );
    let whole = engine_size(&second.tag);
    assert!(
        dry.bytes_freed < whole,
        "counted by layer (base left out), not as the whole image ({whole} bytes): {} bytes",
        dry.bytes_freed
    );
}

/// Two concurrent requests (different layer names, so different builds) naming the same zip
/// extract it once: both succeed and the cache holds one extracted layer.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_for_one_zip_extract_it_once() {
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("shared.zip");
    let entries: Vec<Value> = (0..200)
        .map(|i| json!({ "name": format!("pkg/f{i}.txt"), "text": "x".repeat(20_000), "mode": 0o100_644 }))
        .collect();
    make_zip(&archive, Value::Array(entries));
    let mut cleanup = Cleanup::default();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (socket, name) = (daemon.socket.clone(), unique("samezip"));
        let archive = archive.clone();
        clients.push(tokio::spawn(async move {
            build(&socket, zip_request(&[(&name, &archive)])).await
        }));
    }
    for client in clients {
        let outcome = client.await.unwrap();
        cleanup.images.push(outcome.completed().tag.clone());
    }
    let cache = daemon.dir.path().join("cache");
    assert_eq!(
        layer_entries(&cache),
        [sha256_file(&archive)],
        "one extraction, no temp dirs"
    );
    drop(cleanup);
    daemon.stop().await;
}
