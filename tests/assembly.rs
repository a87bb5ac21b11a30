//! Images assembled from layers and loaded (issue 13): an edit becomes a delta layer over the
//! previous image whose `/opt` is exactly a full assembly's and the source tree's; a layer the
//! engine lost is sent again; functions sharing a first layer share it in the engine; the delta
//! chain stays bounded. Everything is checked in images the real engine holds.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use lambda_imaged::client::proto;
use proto::build_event::Event;
use support::rmi_all;
use support::tree::{Node, assert_same, expected_opt, image_opt, image_tree, set_time};
use support::{
    Later, OutcomeExt, TestDaemon, build, bytes_sent, docker_ok, unique, until, write_file,
    zip_request,
};

/// Layers of an image, from the engine.
fn layer_count(image: &str) -> usize {
    docker_ok(&["image", "inspect", "-f", "{{len .RootFS.Layers}}", image])
        .trim()
        .parse()
        .unwrap()
}

/// The status lines of a stream.
fn status_lines(events: &[proto::BuildEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Log(l)) => Some(l.text.clone()),
            _ => None,
        })
        .collect()
}

/// A small deterministic generator (xorshift), so a failing sequence can be replayed from the
/// seed printed with it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Every path under `root` (files, links, directories), sorted.
fn paths(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for item in fs::read_dir(&dir).unwrap() {
            let path = item.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                stack.push(path);
            }
            out.push(rel);
        }
    }
    out.sort();
    out
}

/// Removes whatever is at `path` (a file, a link or a directory tree).
fn remove(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path).unwrap(),
        Ok(_) => fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
}

/// One random edit of the layer at `root`; returns what it did.
fn edit(root: &Path, rng: &mut Rng, step: usize) -> String {
    let existing = paths(root);
    let pick = |rng: &mut Rng| existing[rng.below(existing.len())].clone();
    let stamp = 1_600_000_000 + step as i64 * 1000;
    match rng.below(8) {
        0 => {
            let mut dirs: Vec<String> = existing
                .iter()
                .filter(|p| fs::symlink_metadata(root.join(p)).unwrap().is_dir())
                .cloned()
                .collect();
            dirs.push(String::new());
            let dir = dirs[rng.below(dirs.len())].clone();
            let path = root.join(dir).join(format!("added{step}.py"));
            write_file(&path, &format!("added at step {step}\n"), 0o644);
            set_time(&path, stamp);
            format!("add {}", path.display())
        }
        1 => {
            let target = pick(rng);
            let path = root.join(&target);
            if fs::symlink_metadata(&path).unwrap().is_file() {
                fs::write(&path, format!("changed at step {step}\n")).unwrap();
                set_time(&path, stamp);
            }
            format!("change {target}")
        }
        2 => {
            let target = pick(rng);
            remove(&root.join(&target));
            format!("delete {target}")
        }
        3 => {
            let target = pick(rng);
            let path = root.join(&target);
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_file() {
                let mode = if meta.permissions().mode() & 0o111 != 0 {
                    0o644
                } else {
                    0o755
                };
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            }
            format!("chmod {target}")
        }
        4 => {
            // file <-> directory
            let target = pick(rng);
            let path = root.join(&target);
            let was_dir = fs::symlink_metadata(&path).unwrap().is_dir();
            remove(&path);
            if was_dir {
                write_file(&path, "was a directory\n", 0o644);
                set_time(&path, stamp);
            } else {
                write_file(&path.join("inside.txt"), "was a file\n", 0o644);
                set_time(&path.join("inside.txt"), stamp);
            }
            format!("file<->dir {target}")
        }
        5 => {
            // file <-> link
            let target = pick(rng);
            let path = root.join(&target);
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                remove(&path);
                write_file(&path, "was a link\n", 0o644);
                set_time(&path, stamp);
            } else if meta.is_file() {
                remove(&path);
                symlink("../somewhere/else", &path).unwrap();
                set_time(&path, stamp);
            }
            format!("file<->link {target}")
        }
        6 => {
            let target = pick(rng);
            let from = root.join(&target);
            let to = from.with_file_name(format!("renamed{step}"));
            fs::rename(&from, &to).unwrap();
            format!("rename {target}")
        }
        _ => {
            let path = root.join(format!("empty{step}"));
            fs::create_dir_all(&path).unwrap();
            format!("empty dir {}", path.display())
        }
    }
}

/// The layer the equivalence test starts from.
fn seed_layer(root: &Path) {
    for (index, path) in [
        "bootstrap",
        "pkg/a.py",
        "pkg/b.py",
        "pkg/sub/c.py",
        "data/d.txt",
        "data/e.txt",
        "top.txt",
    ]
    .iter()
    .enumerate()
    {
        let mode = if *path == "bootstrap" { 0o755 } else { 0o644 };
        write_file(&root.join(path), &format!("{path} v0\n"), mode);
        set_time(&root.join(path), 1_500_000_000 + index as i64);
    }
    symlink("pkg/a.py", root.join("alias.py")).unwrap();
}

/// After each of 32 random edits (add, change, delete, chmod, file<->directory, file<->link,
/// rename, empty directory) the rebuilt image's `/opt` equals the source tree and a fresh full
/// assembly of the same tree (by another daemon, with no memory of earlier images), entry by
/// entry (path, type, mode, size, sha256, link target, time); `/var/rapid` holds one RIE at
/// 0755; deltas were used, squashed at least once at the bound, and the chain stays bounded.
#[tokio::test(flavor = "multi_thread")]
async fn every_delta_image_equals_a_full_assembly_and_the_source() {
    let daemon = TestDaemon::start().await;
    let fresh = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    seed_layer(&layer);
    let name = unique("equiv");
    let request = zip_request(&[(&name, &layer)]);
    let first = build(&daemon.socket, request.clone()).await;
    let tag = first.completed().tag.clone();
    let base_layers = layer_count("public.ecr.aws/lambda/python:3.12-x86_64");
    let rie = fs::read(support::rie_dir().join("aws-lambda-rie-x86_64")).unwrap();
    let seed = 0x5eed_1234_u64;
    let mut rng = Rng(seed);
    let mut deltas = 0;
    let mut squashes = 0;
    let mut longest = 0;
    let mut full_tags = Vec::new();
    for step in 0..32 {
        let what = edit(&layer, &mut rng, step);
        let outcome = build(&daemon.socket, request.clone()).await;
        let done = outcome.completed();
        if done.cached {
            // Some edits change nothing the image holds (chmod of a directory, ...).
            continue;
        }
        if status_lines(&outcome.events)
            .iter()
            .any(|l| l.contains(" delta ") && l.contains(" over "))
        {
            deltas += 1;
        }
        if status_lines(&outcome.events)
            .iter()
            .any(|l| l.contains("the earlier deltas squashed"))
        {
            squashes += 1;
        }
        let context = format!("seed {seed:#x}, step {step} ({what})");
        let got = image_opt(&tag);
        assert_same(
            &format!("{context}: image vs source"),
            &got,
            &expected_opt(&[&layer]),
        );
        let full_name = unique("full");
        let full = build(&fresh.socket, zip_request(&[(&full_name, &layer)])).await;
        let full_tag = full.completed().tag.clone();
        assert_same(
            &format!("{context}: delta image vs full assembly"),
            &got,
            &image_opt(&full_tag),
        );
        full_tags.push(full_tag);
        let rapid: BTreeMap<String, Node> = image_tree(&tag, "var/rapid");
        assert_eq!(rapid.len(), 1, "{context}: {rapid:?}");
        let rie_node = &rapid["aws-lambda-rie"];
        assert_eq!((rie_node.kind, rie_node.mode), ('f', 0o755), "{context}");
        assert_eq!(rie_node.size, rie.len() as u64, "{context}");
        longest = longest.max(layer_count(&tag));
    }
    assert!(deltas >= 10, "only {deltas} builds were deltas");
    assert!(
        squashes >= 1,
        "the chain never reached its bound ({deltas} deltas)"
    );
    // Each superseded image went, and its listing with it: only the current one stays.
    let listings = daemon.dir.path().join("cache/images");
    let listed = || {
        fs::read_dir(&listings)
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count()
    };
    let what = Later(|| {
        let kept = listed();
        format!("one listing, not {kept}, kept in {}", listings.display())
    });
    until(what, std::time::Duration::from_secs(60), || listed() == 1).await;
    assert!(
        longest <= base_layers + 2 + 8,
        "{longest} layers: the delta chain is not bounded"
    );
    let mut tags = vec![tag];
    tags.extend(full_tags);
    for tag in &tags {
        rmi_all(tag);
    }
    fresh.stop().await;
    daemon.stop().await;
}

/// When every image that held a layer is removed behind the daemon's back (`docker rmi`), the
/// next build that would have reused it is refused by the engine; the daemon sends every layer
/// again (`layers_resent`) and the build succeeds with the right contents.
#[tokio::test(flavor = "multi_thread")]
async fn a_layer_removed_behind_our_back_is_sent_again() {
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    write_file(&layer.join("data/one.txt"), &unique("content"), 0o644);
    let name = unique("gone");
    let request = zip_request(&[(&name, &layer)]);
    let first = build(&daemon.socket, request.clone()).await;
    let tag = first.completed().tag.clone();
    // Every image holding the layer goes; the daemon still remembers its chain.
    rmi_all(&tag);
    let again = build(&daemon.socket, request).await;
    let done = again.completed();
    assert!(!done.cached);
    let warned = again
        .events
        .iter()
        .any(|e| matches!(&e.event, Some(Event::Warning(w)) if w.code == "layers_resent"));
    let lines = status_lines(&again.events);
    // Either the engine refused and everything was resent, or the layer was sent at once.
    assert!(
        warned
            || lines
                .iter()
                .any(|l| l.contains(&name) && l.ends_with(": sending")),
        "{lines:?}"
    );
    assert_same(
        "after the resend",
        &image_opt(&done.tag),
        &expected_opt(&[&layer]),
    );
    rmi_all(&done.tag);
    daemon.stop().await;
}

/// The layers of two functions that share a first layer, under `dir`: `deps` (20 files of
/// about 1 MB, 20 MB in all, with the byte count) and each function's own small `a` and `b`.
fn two_functions_layers(dir: &Path) -> (PathBuf, u64, PathBuf, PathBuf) {
    let deps = dir.join("deps");
    let chunk = unique("deps").repeat(1 << 16);
    for index in 0..20 {
        write_file(&deps.join(format!("lib/m{index}.bin")), &chunk, 0o644);
    }
    let (code_a, code_b) = (dir.join("a"), dir.join("b"));
    write_file(&code_a.join("handler.py"), "A = 1\n", 0o644);
    write_file(&code_b.join("handler.py"), "B = 2\n", 0o644);
    (deps, (chunk.len() * 20) as u64, code_a, code_b)
}

/// Two functions of one runtime whose layer lists start with the same 20 MB layer: the second
/// build sends no byte of the shared layer (it is referenced), only its own small one.
#[tokio::test(flavor = "multi_thread")]
async fn functions_sharing_a_first_layer_send_it_once() {
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (deps, deps_bytes, code_a, code_b) = two_functions_layers(dir.path());
    let deps_name = unique("deps");
    let (na, nb) = (unique("codea"), unique("codeb"));
    let first = build(
        &daemon.socket,
        zip_request(&[(&deps_name, &deps), (&na, &code_a)]),
    )
    .await;
    assert!(
        bytes_sent(&first.events) > deps_bytes,
        "the first build sends the deps"
    );
    let second = build(
        &daemon.socket,
        zip_request(&[(&deps_name, &deps), (&nb, &code_b)]),
    )
    .await;
    let sent = bytes_sent(&second.events);
    assert!(
        sent < deps_bytes / 10,
        "the second build sent {sent} bytes for a {deps_bytes}-byte shared layer: {:?}",
        status_lines(&second.events)
    );
    assert!(
        status_lines(&second.events)
            .iter()
            .any(|l| l.contains(&format!("layer {deps_name:?}: reused"))),
        "{:?}",
        status_lines(&second.events)
    );
    assert_same(
        "second function",
        &image_opt(&second.completed().tag),
        &expected_opt(&[&deps, &code_b]),
    );
    for outcome in [&first, &second] {
        rmi_all(&outcome.completed().tag);
    }
    daemon.stop().await;
}

/// The image's layer diff IDs, bottom first.
fn diff_ids(image: &str) -> Vec<String> {
    docker_ok(&["image", "inspect", "-f", "{{json .RootFS.Layers}}", image])
        .trim()
        .parse::<serde_json::Value>()
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect()
}

/// A shared first layer survives edits: after three one-file edits of the 20 MB deps layer
/// (function A's image is then a delta chain over its first build), function B, whose layer
/// list starts with the same deps, still sends no byte of them: it is a delta over A's image
/// (all of A's layers, and so no new storage for the deps, plus one layer of its own /opt
/// differences), and holds exactly its own layers.
#[tokio::test(flavor = "multi_thread")]
async fn a_shared_first_layer_is_not_resent_after_edits() {
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (deps, deps_bytes, code_a, code_b) = two_functions_layers(dir.path());
    let deps_name = unique("deps");
    let (na, nb) = (unique("codea"), unique("codeb"));
    let function_a = zip_request(&[(&deps_name, &deps), (&na, &code_a)]);
    let mut last_a = build(&daemon.socket, function_a.clone()).await;
    for edit in 0..3 {
        write_file(
            &deps.join(format!("lib/m{edit}.bin")),
            &unique("edit"),
            0o644,
        );
        last_a = build(&daemon.socket, function_a.clone()).await;
        let sent = bytes_sent(&last_a.events);
        assert!(
            sent < deps_bytes / 10,
            "edit {edit} of A was a delta: {sent} bytes"
        );
    }
    let a = last_a.completed().clone();
    let second = build(
        &daemon.socket,
        zip_request(&[(&deps_name, &deps), (&nb, &code_b)]),
    )
    .await;
    let b = second.completed().clone();
    let sent = bytes_sent(&second.events);
    assert!(
        sent < deps_bytes / 10,
        "B sent {sent} bytes for a {deps_bytes}-byte shared layer edited three times: {:?}",
        status_lines(&second.events)
    );
    let (a_layers, b_layers) = (diff_ids(&a.image_id), diff_ids(&b.image_id));
    assert_eq!(
        b_layers[..a_layers.len()],
        a_layers[..],
        "B keeps every layer of A (no new storage for the deps)"
    );
    assert_eq!(
        b_layers.len(),
        a_layers.len() + 1,
        "plus one layer of its own"
    );
    assert_same(
        "B after A's edits",
        &image_opt(&b.tag),
        &expected_opt(&[&deps, &code_b]),
    );
    assert_same(
        "A after its edits",
        &image_opt(&a.tag),
        &expected_opt(&[&deps, &code_a]),
    );
    for done in [&a, &b] {
        rmi_all(&done.tag);
    }
    daemon.stop().await;
}
