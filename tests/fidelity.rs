//! Layers laid out as Lambda lays them out (issue 12): file times kept, zip links kept as
//! links wherever they point, links inside followed directories judged where they resolve,
//! input the daemon cannot represent refused naming the layer and entry, and a zip layer giving
//! the same `/opt` as the same tree given as a directory — compared entry by entry in the
//! images the real engine holds (`docker export`).

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use lambda_imaged::client::proto;
use proto::build_event::Event;
use sha2::{Digest, Sha256};
use support::rmi_all;
use support::tree::{Node, assert_same, expected_opt, image_opt, link_node, set_time};
use support::{OutcomeExt, TestDaemon, build, docker, docker_ok, unique, write_file, zip_request};

/// A corpus layer: names with spaces, non-ASCII and a long path, an empty directory, an
/// executable, and (unless `windows`) links inside, absolute into /opt, climbing out of the
/// layer and dangling. Every file and link gets its own even-second time (MS-DOS times have
/// 2-second steps). `windows`: no links and every file executable, as a mode-less zip entry
/// is extracted (0755).
fn make_corpus(root: &Path, windows: bool) {
    let file_mode = if windows { 0o755 } else { 0o644 };
    let long = format!(
        "{}/{}.txt",
        ["segment-of-a-long-path"; 10].join("/"),
        "n".repeat(120)
    );
    let files: Vec<(String, String, u32)> = vec![
        ("bootstrap".into(), "#!/bin/sh\necho hi\n".into(), 0o755),
        ("data/readme.txt".into(), "read me\n".into(), file_mode),
        (
            "name with spaces/file one.txt".into(),
            "spaces\n".into(),
            file_mode,
        ),
        ("ünïcødé/日本語.txt".into(), "unicode\n".into(), file_mode),
        ("bref/bin/php".into(), "php binary\n".into(), 0o755),
        ("python/pkg/m.py".into(), "VALUE = 42\n".into(), file_mode),
        (long, "long\n".into(), file_mode),
    ];
    for (path, content, mode) in &files {
        write_file(&root.join(path), content, *mode);
    }
    fs::create_dir_all(root.join("empty")).unwrap();
    if !windows {
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("lib")).unwrap();
        symlink("../data/readme.txt", root.join("lib/inside")).unwrap();
        symlink("/opt/bref/bin/php", root.join("bin/php")).unwrap();
        symlink("../../lib64/libc.so.6", root.join("lib/libc.so.6")).unwrap();
        symlink("nothing-here.txt", root.join("dangling")).unwrap();
        symlink("/opt/shared/node_modules", root.join("node_modules")).unwrap();
    }
    let mut stamp = 1_600_000_000;
    let mut paths: Vec<PathBuf> = Vec::new();
    walk_paths(root, &mut paths);
    paths.sort();
    for path in paths {
        if !fs::symlink_metadata(&path).unwrap().is_dir() {
            set_time(&path, stamp);
            stamp += 86_402;
        }
    }
}

fn walk_paths(dir: &Path, out: &mut Vec<PathBuf>) {
    for item in fs::read_dir(dir).unwrap() {
        let path = item.unwrap().path();
        if fs::symlink_metadata(&path).unwrap().is_dir() {
            walk_paths(&path, out);
        }
        out.push(path);
    }
}

/// Zips `src` into `out` in `style`: "unix" / "windows" with Python's zipfile, "infozip" with
/// Debian's Info-ZIP `zip -r -y` (links stored as links, extended timestamps).
fn zip_tree(style: &str, src: &Path, out: &Path) {
    let status = if style == "infozip" {
        Command::new("zip")
            .args(["-q", "-r", "-y"])
            .arg(out)
            .arg(".")
            .current_dir(src)
            .status()
            .expect("Info-ZIP zip runs (Debian package zip, installed by scripts/test-env.sh)")
    } else {
        Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/layers/zipdir.py"))
            .args([style])
            .arg(src)
            .arg(out)
            .status()
            .unwrap()
    };
    assert!(
        status.success(),
        "zipping {} ({style}) failed",
        src.display()
    );
}

/// Builds one image from `layers` (name, path) and returns its `/opt`.
async fn built_opt(daemon: &TestDaemon, layers: &[(&str, &Path)]) -> BTreeMap<String, Node> {
    let outcome = build(&daemon.socket, zip_request(layers)).await;
    let tag = outcome.completed().tag.clone();
    let opt = image_opt(&tag);
    rmi_all(&tag);
    opt
}

/// A zip layer and the same tree as a directory give the same `/opt` — paths, types, modes,
/// sizes, contents, link targets and times — for zips written by Python's zipfile, by
/// Info-ZIP `zip -y` and as Windows tools write them, with a later layer replacing a file with
/// a directory, a directory with a file, and back; and both equal the merged source trees.
#[tokio::test(flavor = "multi_thread")]
async fn zip_and_directory_layers_give_the_same_opt() {
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    make_corpus(&base, false);
    // A file becomes a directory, a directory becomes a file.
    let over = dir.path().join("over");
    write_file(
        &over.join("data/readme.txt/now-a-dir.txt"),
        "dir now\n",
        0o644,
    );
    write_file(&over.join("empty"), "a file now\n", 0o644);
    set_time(&over.join("data/readme.txt/now-a-dir.txt"), 1_700_000_000);
    set_time(&over.join("empty"), 1_700_000_002);
    // And back: the directory is a file again.
    let back = dir.path().join("back");
    write_file(&back.join("data/readme.txt"), "a file again\n", 0o644);
    set_time(&back.join("data/readme.txt"), 1_700_000_004);
    let sources = [base.as_path(), over.as_path(), back.as_path()];
    let want = expected_opt(&sources);
    assert_eq!(want["data/readme.txt"].kind, 'f');
    assert_eq!(want["empty"].kind, 'f');

    let n = |s: &str| unique(s);
    let (b, o, k) = (n("base"), n("over"), n("back"));
    let from_dirs = built_opt(&daemon, &[(&b, &base), (&o, &over), (&k, &back)]).await;
    assert_same("directory layers vs the merged sources", &from_dirs, &want);

    for style in ["unix", "infozip"] {
        let zips: Vec<PathBuf> = sources
            .iter()
            .enumerate()
            .map(|(index, src)| {
                let out = dir.path().join(format!("{style}-{index}.zip"));
                zip_tree(style, src, &out);
                out
            })
            .collect();
        let names: Vec<String> = (0..3).map(|i| n(&format!("{style}{i}"))).collect();
        let layers: Vec<(&str, &Path)> = names
            .iter()
            .zip(&zips)
            .map(|(name, path)| (name.as_str(), path.as_path()))
            .collect();
        let from_zips = built_opt(&daemon, &layers).await;
        assert_same(
            &format!("{style} zips vs directories"),
            &from_zips,
            &from_dirs,
        );
    }

    // Windows-made entries carry no modes: every file is extracted 0755, and no links.
    let windows = dir.path().join("windows");
    make_corpus(&windows, true);
    let archive = dir.path().join("windows.zip");
    zip_tree("windows", &windows, &archive);
    let (w, wz) = (n("windir"), n("winzip"));
    let from_dir = built_opt(&daemon, &[(&w, &windows)]).await;
    assert_same(
        "windows directory vs source",
        &from_dir,
        &expected_opt(&[&windows]),
    );
    let from_zip = built_opt(&daemon, &[(&wz, &archive)]).await;
    assert_same("windows zip vs directory", &from_zip, &from_dir);
    daemon.stop().await;
}

/// A `.pyc` in a layer is valid in the image: the source's time in the image is the one the
/// `.pyc` was compiled against (its header), so Python uses it instead of recompiling.
#[tokio::test(flavor = "multi_thread")]
async fn compiled_python_stays_valid_in_the_image() {
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    write_file(&layer.join("python/m.py"), "VALUE = 1\n", 0o644);
    set_time(&layer.join("python/m.py"), 1_650_000_000);
    let status = Command::new("python3")
        .args(["-m", "py_compile"])
        .arg(layer.join("python/m.py"))
        .status()
        .unwrap();
    assert!(status.success());
    let archive = dir.path().join("layer.zip");
    zip_tree("infozip", &layer, &archive);
    for source in [&layer, &archive] {
        let name = unique("py");
        let opt = built_opt(&daemon, &[(&name, source.as_path())]).await;
        let source_node = &opt["python/m.py"];
        let (pyc_path, _) = opt
            .iter()
            .find(|(p, _)| p.starts_with("python/__pycache__/m.") && p.ends_with(".pyc"))
            .expect("the .pyc is in the image");
        let pyc = fs::read(layer.join(pyc_path)).unwrap();
        let compiled_against = u32::from_le_bytes(pyc[8..12].try_into().unwrap());
        assert_eq!(
            source_node.mtime,
            u64::from(compiled_against),
            "{}: m.py's time in the image differs from the one its .pyc was compiled against",
            source.display()
        );
        assert_eq!(opt[pyc_path].content, hex::encode(Sha256::digest(&pyc)));
    }
    daemon.stop().await;
}

/// A zip entry typed as a link whose "target" is a 5 KB script (a broken packer) is
/// INVALID_ARGUMENT naming the layer and the entry, never INTERNAL, never a cache path.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_stored_as_a_link_is_refused_naming_the_entry() {
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let script = "#!/bin/sh\necho a line of a long script\n".repeat(130);
    assert!(script.len() > 5000);
    // No host file system holds such a link: write the entry with zipfile directly.
    let archive = dir.path().join("broken.zip");
    let writer = "import zipfile, sys\n\
                  z = zipfile.ZipFile(sys.argv[1], 'w')\n\
                  i = zipfile.ZipInfo('bin/tool')\n\
                  i.create_system = 3\n\
                  i.external_attr = 0o120777 << 16\n\
                  z.writestr(i, sys.argv[2])\n\
                  z.close()\n";
    let status = Command::new("python3")
        .args(["-c", writer])
        .arg(&archive)
        .arg(&script)
        .status()
        .unwrap();
    assert!(status.success());
    let outcome = build(&daemon.socket, zip_request(&[("BrokenPacker", &archive)])).await;
    let status = outcome.status();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let message = status.message();
    assert!(
        message.contains("BrokenPacker") && message.contains("bin/tool"),
        "{message}"
    );
    let cache = daemon.dir.path().display().to_string();
    assert!(!message.contains(&cache), "names a daemon path: {message}");
    daemon.stop().await;
}

/// A directory layer whose `nodejs/node_modules` links to a project's `node_modules` (followed,
/// as SAM does) holding a workspace link `@scope/shared -> ../../packages/shared`: the inner
/// link is followed too (it would dangle at its place in the image), while a link inside the
/// followed tree stays a link; the image holds the package's files.
#[tokio::test(flavor = "multi_thread")]
async fn links_inside_a_followed_directory_resolve_in_the_image() {
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("project");
    write_file(
        &project.join("packages/shared/index.js"),
        "module.exports = 'shared';\n",
        0o644,
    );
    write_file(&project.join("node_modules/dep/index.js"), "dep\n", 0o644);
    fs::create_dir_all(project.join("node_modules/@scope")).unwrap();
    symlink(
        "../../packages/shared",
        project.join("node_modules/@scope/shared"),
    )
    .unwrap();
    symlink("dep/index.js", project.join("node_modules/main.js")).unwrap();
    let layer = dir.path().join("layer");
    fs::create_dir_all(layer.join("nodejs")).unwrap();
    symlink(
        project.join("node_modules"),
        layer.join("nodejs/node_modules"),
    )
    .unwrap();
    let name = unique("node");
    let opt = built_opt(&daemon, &[(&name, &layer)]).await;
    let shared = &opt["nodejs/node_modules/@scope/shared/index.js"];
    assert_eq!(shared.kind, 'f');
    assert_eq!(
        shared.content,
        hex::encode(Sha256::digest(b"module.exports = 'shared';\n"))
    );
    assert_eq!(opt["nodejs/node_modules/@scope/shared"].kind, 'd');
    assert_eq!(
        opt["nodejs/node_modules/main.js"],
        link_node(b"dep/index.js", opt["nodejs/node_modules/main.js"].mtime)
    );
    daemon.stop().await;
}

/// Layers given to an IMAGE function are not used (Lambda refuses them, SAM ignores them): the
/// build succeeds without them, a `layers_ignored` warning names them, and `/opt` stays empty.
#[tokio::test(flavor = "multi_thread")]
async fn layers_on_an_image_function_are_ignored_with_a_warning() {
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("layer/marker.txt"), "unused\n", 0o644);
    let repo = format!("lambda-imaged-test/{}", unique("imagefn"));
    let image = format!("{repo}:v1");
    docker_ok(&["tag", "public.ecr.aws/lambda/python:3.12-x86_64", &image]);
    let mut request = zip_request(&[("UnusedLayer", &dir.path().join("layer"))]);
    request.package_type = proto::PackageType::Image as i32;
    request.runtime.clear();
    request.image = image.clone();
    let outcome = build(&daemon.socket, request).await;
    let tag = outcome.completed().tag.clone();
    assert_eq!(tag, format!("{repo}:rapid-x86_64"));
    let warnings: Vec<&proto::Warning> = outcome
        .events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Warning(w)) => Some(w),
            _ => None,
        })
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.code == "layers_ignored" && w.message.contains("UnusedLayer")),
        "{warnings:?}"
    );
    let opt = image_opt(&tag);
    docker(&["rmi", "-f", &tag, &image]);
    assert!(opt.is_empty(), "/opt holds {opt:?}");
    daemon.stop().await;
}
