//! Faults of the daemon itself, on the real engine: SIGKILL of the daemon binary mid-build and
//! mid-stream followed by a restart on the same socket, a full cache file system, the limit on
//! connections per uid, and the daemon running out of file descriptors.
//!
//! Each test asserts what a user would observe: the status a client gets, what the engine
//! holds (the fingerprint label, the `/opt` tree), what is left in the cache directory, and
//! that the daemon answers afterwards.

mod support;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lambda_imaged::client::{self, Client, proto};
use proto::build_event::Event;
use support::daemon::{Daemon, answers};
use support::rmi_all;
use support::tree::{assert_same, expected_opt, image_opt, set_time};
use support::{
    OutcomeExt, TestDaemon, build, docker, docker_ok, noise, unique, until, until_async,
    zip_request,
};
use tokio::sync::mpsc;
use tonic::Code;

/// How long anything may take on a busy 2-core machine before the test fails.
const DEADLINE: Duration = Duration::from_secs(300);
/// The fingerprint label the daemon puts on every image it makes.
const FINGERPRINT_LABEL: &str = "io.lambda-imaged.fingerprint";

/// Removes the images a test made, also when it fails.
#[derive(Default)]
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for tag in &self.0 {
            rmi_all(tag);
        }
    }
}

/// A directory layer with one big file of `big` bytes, small files, a nested dir and a link,
/// all with fixed times.
fn big_layer(dir: &Path, big: usize) -> PathBuf {
    let layer = dir.join("layer");
    fs::create_dir_all(layer.join("python/pkg")).unwrap();
    fs::write(layer.join("python/pkg/blob.bin"), noise(big, big as u64)).unwrap();
    fs::write(layer.join("python/pkg/__init__.py"), "VALUE = 1\n").unwrap();
    fs::write(layer.join("python/readme.txt"), "a layer\n").unwrap();
    std::os::unix::fs::symlink("pkg/__init__.py", layer.join("python/entry.py")).unwrap();
    for path in [
        "python/pkg/blob.bin",
        "python/pkg/__init__.py",
        "python/readme.txt",
        "python/entry.py",
        "python/pkg",
        "python",
    ] {
        set_time(&layer.join(path), 1_700_000_000);
    }
    layer
}

/// Every `.tmp-*` name under `dir`, relative to it.
fn temp_leftovers(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") || name.contains(".tmp-") {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&path, root, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The fingerprint label of `tag` in the engine.
fn fingerprint_of(tag: &str) -> String {
    let format = format!("{{{{index .Config.Labels \"{FINGERPRINT_LABEL}\"}}}}");
    let label = docker_ok(&["image", "inspect", "--format", &format, tag])
        .trim()
        .to_owned();
    assert!(label.len() > 16, "{tag} carries a fingerprint: {label:?}");
    label
}

/// When to kill the daemon.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// Once the client holds the Accepted event: the stream is open and the build runs (the
    /// big layer is being walked and hashed).
    Streaming,
    /// Once a ContextProgress event says the image is part-way to the engine (`bytes_total`
    /// 0: the writer has not finished), i.e. while the load streams.
    Loading,
}

impl KillAt {
    fn reached(self, event: &Event) -> bool {
        match (self, event) {
            (KillAt::Streaming, Event::Accepted(_)) => true,
            (KillAt::Loading, Event::ContextProgress(p)) => p.bytes_total == 0 && p.bytes_sent > 0,
            _ => false,
        }
    }
}

/// SIGKILL of the daemon at `at`, then a restart on the same socket and cache: the stale socket
/// file does not stop it, temp files of interrupted writes are removed, nothing is tagged from
/// the cut build, and the retried request builds an image with the same fingerprint and the
/// same `/opt` tree as a clean run on a fresh daemon and cache.
async fn kill_then_restart(at: KillAt) {
    let mut big = 64 << 20;
    for attempt in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        let layer = big_layer(dir.path(), big);
        let name = unique("killed");
        let request = zip_request(&[(&name, &layer)]);
        let mut cleanup = Cleanup::default();

        // The restart below runs in the same dir: the same socket and cache.
        let mut daemon = Daemon::builder().in_dir(dir.path()).start().await;
        let (socket, cache) = (daemon.socket().to_owned(), daemon.cache());
        let tag = client::connect(&socket)
            .await
            .unwrap()
            .resolve(request.clone())
            .await
            .unwrap()
            .into_inner()
            .tag;
        let (tx, mut events) = mpsc::unbounded_channel();
        let stream = tokio::spawn({
            let (socket, request) = (socket.clone(), request.clone());
            async move {
                let mut client = Client::connect(&socket).await.unwrap();
                client
                    .build_with(request, |event| {
                        let _ = tx.send(event.event.clone());
                    })
                    .await
            }
        });
        let reached = tokio::time::timeout(DEADLINE, async {
            while let Some(event) = events.recv().await {
                if event.as_ref().is_some_and(|e| at.reached(e)) {
                    return true;
                }
            }
            false
        })
        .await
        .expect("the build reports progress within the deadline");
        if !reached {
            // The stream ended before the kill point (the load was faster than one progress
            // tick): try again with a bigger layer.
            let ended = stream.await.unwrap();
            eprintln!("attempt {attempt}: {big} B layer: no {at:?} point before {ended:?}");
            if let Ok(done) = ended {
                cleanup.0.push(done.tag);
            }
            big *= 2;
            continue;
        }
        daemon.kill_9();
        let cut = tokio::time::timeout(DEADLINE, stream)
            .await
            .expect("the client notices the daemon died")
            .unwrap();
        let status = cut.expect_err("the stream was cut by the kill");
        // The connection breaks under the stream (hyper: UNKNOWN "error reading a body" or
        // UNAVAILABLE); the client says so as UNAVAILABLE.
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status
                .message()
                .contains("connection to lambda-imaged broke"),
            "{status:?}"
        );
        cleanup.0.push(tag.clone());
        assert!(
            !docker(&["image", "inspect", &tag]).status.success(),
            "nothing is tagged {tag} from the cut build"
        );
        assert!(
            fs::symlink_metadata(&socket).is_ok(),
            "SIGKILL leaves the socket file behind"
        );

        // Leftovers of writes a kill can cut short (the timing of a real cut is not ours to
        // choose); the restart must remove them, and never read them.
        for (sub, leftover) in [
            ("images", ".tmp-0123.json-abc"),
            ("diff-ids", ".tmp-0123-abc"),
            ("layers/.tmp-0123-abc/python", "half.py"),
            ("", "statcache.v1.tmp-4242"),
        ] {
            fs::create_dir_all(cache.join(sub)).unwrap();
            fs::write(cache.join(sub).join(leftover), b"{\"half").unwrap();
        }
        let daemon = Daemon::builder().in_dir(dir.path()).start().await;
        assert_eq!(
            temp_leftovers(&cache),
            Vec::<String>::new(),
            "the restart removed every temp file"
        );
        let retried = build(&socket, request.clone()).await;
        let retried = match &retried.result {
            Ok(done) => done.clone(),
            Err(status) => panic!(
                "the retry after the restart: {:?} {}; log: {}",
                status.code(),
                status.message(),
                daemon.log()
            ),
        };
        assert_eq!(retried.tag, tag);
        assert!(!retried.cached, "the cut build left no image to reuse");
        let fingerprint = fingerprint_of(&tag);
        let tree = image_opt(&tag);
        assert_same("after the restart", &tree, &expected_opt(&[&layer]));
        drop(daemon);

        // A clean run: a fresh daemon and cache, the image gone from the engine.
        rmi_all(&tag);
        let clean = Daemon::builder().start().await;
        let done = build(clean.socket(), request).await;
        assert_eq!(done.completed().tag, tag);
        assert_eq!(
            fingerprint_of(&tag),
            fingerprint,
            "same fingerprint as a clean run"
        );
        assert_same("a clean run", &image_opt(&tag), &tree);
        drop(clean);
        return;
    }
    panic!("the build never reached {at:?} before it completed, even with a {big} B layer");
}

/// SIGKILL while the client reads the event stream, then a restart: see [`kill_then_restart`].
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_streaming_then_restart_builds_the_clean_image() {
    kill_then_restart(KillAt::Streaming).await;
}

/// SIGKILL while the image is being loaded into the engine, then a restart: see
/// [`kill_then_restart`].
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_load_then_restart_builds_the_clean_image() {
    kill_then_restart(KillAt::Loading).await;
}

/// A size-limited tmpfs, unmounted (lazily, in case something still holds it) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes at `path`; fails the test, naming the reason, when that
    /// is impossible (the test needs root and mount(2); it never passes without the mount).
    fn mount(path: &Path, size: u64) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("the mount command runs");
        assert!(
            output.status.success(),
            "the disk-full test needs a size-limited tmpfs (run as root with CAP_SYS_ADMIN): \
             mount failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Tmpfs(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A stored (uncompressed) zip at `path` with `entries` of random bytes.
fn write_zip(path: &Path, entries: &[(&str, usize)]) {
    let mut zip = zip::ZipWriter::new(fs::File::create(path).unwrap());
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .unix_permissions(0o644);
    for (i, (name, size)) in entries.iter().enumerate() {
        zip.start_file(*name, options).unwrap();
        zip.write_all(&noise(*size, 7 + i as u64 + *size as u64))
            .unwrap();
    }
    zip.finish().unwrap();
}

/// The files under `dir` with their bytes, by relative path, sorted.
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for entry in fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                walk(&path, root, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.push((rel, fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A cache on a full file system: a zip layer whose extraction does not fit gets
/// RESOURCE_EXHAUSTED naming the cache setting (never the cache's path), no temp file is
/// left, the layer extracted before is intact, and the next small request succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_cache_disk_is_resource_exhausted_and_recoverable() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small-disk");
    let disk = Tmpfs::mount(&mount, 8 << 20);
    let cache = mount.join("cache");
    let daemon = TestDaemon::start_with(|config| config.cache_dir = cache.clone()).await;
    let mut cleanup = Cleanup::default();

    let small = dir.path().join("small.zip");
    write_zip(
        &small,
        &[("python/a.bin", 256 << 10), ("python/b.txt", 100)],
    );
    let first = build(&daemon.socket, zip_request(&[(&unique("small"), &small)])).await;
    cleanup.0.push(first.completed().tag.clone());
    let layers = cache.join("layers");
    let before: Vec<_> = fs::read_dir(&layers)
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    assert_eq!(before.len(), 1, "one extracted layer: {before:?}");
    let kept = contents(&before[0]);

    let huge = dir.path().join("huge.zip");
    write_zip(
        &huge,
        &[
            ("python/1.bin", 4 << 20),
            ("python/2.bin", 4 << 20),
            ("python/3.bin", 4 << 20),
        ],
    );
    let huge_name = unique("huge");
    let refused = build(&daemon.socket, zip_request(&[(&huge_name, &huge)])).await;
    let status = refused.status();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let message = status.message();
    assert!(message.contains(&huge_name), "names the layer: {message}");
    assert!(
        message.contains("--cache-dir"),
        "names the setting: {message}"
    );
    assert!(
        !message.contains(&mount.display().to_string()),
        "no internal path: {message}"
    );

    assert_eq!(
        temp_leftovers(&cache),
        Vec::<String>::new(),
        "the failed extraction left no temp file"
    );
    assert_eq!(contents(&before[0]), kept, "the older layer is intact");

    let again = build(&daemon.socket, zip_request(&[(&unique("again"), &small)])).await;
    cleanup.0.push(again.completed().tag.clone());
    let other = dir.path().join("other.zip");
    write_zip(&other, &[("python/c.bin", 512 << 10)]);
    let next = build(&daemon.socket, zip_request(&[(&unique("next"), &other)])).await;
    cleanup.0.push(next.completed().tag.clone());
    assert!(!next.completed().cached, "a new layer, built");

    daemon.stop().await;
    drop(disk);
}

/// A uid's connections beyond `max_connections_per_uid` are closed on accept (the client gets
/// the connection end); the ones within it keep working, and closing one lets a new one in.
#[tokio::test(flavor = "multi_thread")]
async fn connections_per_uid_are_bounded() {
    let daemon = TestDaemon::start_with(|config| config.max_connections_per_uid = 3).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut client = client::connect(&daemon.socket).await.unwrap();
        client.get_info(proto::GetInfoRequest {}).await.unwrap();
        open.push(client);
    }
    let over = match client::connect(&daemon.socket).await {
        Ok(mut client) => client
            .get_info(proto::GetInfoRequest {})
            .await
            .map(|_| ())
            .map_err(|status| status.code()),
        Err(_) => Err(Code::Unavailable),
    };
    // The daemon closes it unanswered; how the client words that depends on when the close
    // overtakes the call (refused before the call: UNAVAILABLE; mid-call: CANCELLED or, for a
    // reset, UNKNOWN). Never an answer.
    assert!(
        matches!(
            over,
            Err(Code::Unavailable | Code::Cancelled | Code::Unknown)
        ),
        "the fourth connection is refused: {over:?}"
    );
    for client in &mut open {
        client.get_info(proto::GetInfoRequest {}).await.unwrap();
    }

    open.pop();
    until_async(
        "a new connection to be let in once one closed",
        DEADLINE,
        || answers(&daemon.socket),
    )
    .await;
    drop(open);
    daemon.stop().await;
}

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A daemon out of file descriptors (EMFILE on accept) keeps running without spinning, and
/// answers again, with its descriptors back near the baseline, once the connections close.
#[tokio::test(flavor = "multi_thread")]
async fn the_accept_loop_survives_running_out_of_file_descriptors() {
    const NOFILE: u64 = 64;
    let mut daemon = Daemon::builder()
        .args(["--max-connections-per-uid", "1000"])
        .nofile(NOFILE)
        .start()
        .await;
    let socket = daemon.socket().to_owned();
    let pid = daemon.pid();
    let baseline = daemon.fds();
    assert!(
        baseline < NOFILE as usize - 8,
        "room to accept some connections"
    );

    // Twice the limit: the rest wait in the listen backlog while accept fails with EMFILE.
    let held: Vec<_> = (0..2 * NOFILE)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    until("the daemon to reach its descriptor limit", DEADLINE, || {
        daemon.fds() as u64 >= NOFILE - 1
    })
    .await;

    // Out of descriptors with connections pending: the loop backs off instead of retrying
    // at once. A spinning loop burns a core; a backing-off one next to nothing.
    // A measuring window, not synchronisation: nothing is waited for, CPU time is sampled.
    let window = Duration::from_secs(3);
    let ticks_before = cpu_ticks(pid);
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let spent = cpu_ticks(pid) - ticks_before;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        (spent as f64 / per_second as f64) < elapsed / 4.0,
        "the daemon used {spent} ticks of CPU in {elapsed:.1}s while out of descriptors \
         (spinning on accept?): {}",
        daemon.log()
    );
    daemon.assert_running("the window out of descriptors to end");

    drop(held);
    until_async("the daemon to answer again", DEADLINE, || answers(&socket)).await;
    until(
        "the daemon's descriptors to be back near the baseline",
        DEADLINE,
        || daemon.fds() <= baseline + 4,
    )
    .await;
}
