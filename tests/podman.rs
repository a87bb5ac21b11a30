//! The daemon against Podman's Docker-compatible service (Debian's `podman` 4.3, a private
//! `--root/--runroot/--tmpdir`, file events): a build, a cached hit, a one-file edit sent as a
//! delta, and the image's contents checked with `podman image mount` (containers cannot start
//! in this sandbox). Fails with the reason when Podman cannot run; it never passes silently.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lambda_imaged::client::proto;
use proto::build_event::Event;
use support::tree::set_time;
use support::{OutcomeExt, TestDaemon, build, unique, write_file, zip_request};

/// A private Podman service, stopped (and its image mounts undone) when dropped.
struct Podman {
    dir: tempfile::TempDir,
    service: Child,
}

impl Podman {
    fn storage_args(&self) -> Vec<String> {
        let d = self.dir.path();
        vec![
            format!("--root={}", d.join("root").display()),
            format!("--runroot={}", d.join("run").display()),
            format!("--tmpdir={}", d.join("tmp").display()),
            "--storage-driver=overlay".into(),
            "--cgroup-manager=cgroupfs".into(),
            "--events-backend=file".into(),
        ]
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("podman.sock")
    }

    /// Starts the service and waits (up to 60 s) until it answers `_ping`.
    fn start() -> Podman {
        let dir = tempfile::tempdir().unwrap();
        let mut podman = Podman {
            service: Command::new("true").spawn().unwrap(),
            dir,
        };
        let socket = podman.socket();
        let service = Command::new("podman")
            .args(podman.storage_args())
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("podman cannot start ({err}): install Debian's podman (scripts/test-env.sh does)")
            });
        podman.service = service;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ping = Command::new("curl")
                .args(["-sf", "--unix-socket"])
                .arg(&socket)
                .arg("http://d/_ping")
                .output()
                .unwrap();
            if ping.status.success() {
                return podman;
            }
            if let Ok(Some(status)) = podman.service.try_wait() {
                let mut log = String::new();
                if let Some(mut stderr) = podman.service.stderr.take() {
                    use std::io::Read;
                    let _ = stderr.read_to_string(&mut log);
                }
                panic!("podman system service exited ({status}): {log}");
            }
            assert!(
                Instant::now() < deadline,
                "podman did not answer within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `podman <args>` on this service's storage; panics with its stderr on failure.
    fn run(&self, args: &[&str]) -> String {
        let output = Command::new("podman")
            .args(self.storage_args())
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Copies `image` from the test's Docker engine into Podman.
    fn load_from_docker(&self, image: &str) {
        let save = Command::new("docker")
            .args(["save", image])
            .env("DOCKER_HOST", support::engine_host())
            .output()
            .unwrap();
        assert!(save.status.success(), "docker save {image}");
        let mut load = Command::new("podman")
            .args(self.storage_args())
            .args(["load", "-q"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        load.stdin.take().unwrap().write_all(&save.stdout).unwrap();
        assert!(load.wait().unwrap().success(), "podman load {image}");
    }

    /// Reads `path` inside `image` through `podman image mount`; `None` when absent.
    fn read_in_image(&self, image: &str, path: &str) -> Option<(String, u32, i64)> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let root = PathBuf::from(self.run(&["image", "mount", image]).trim());
        let file = root.join(path.trim_start_matches('/'));
        let found = std::fs::symlink_metadata(&file).ok().map(|meta| {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            (text, meta.permissions().mode() & 0o7777, meta.mtime())
        });
        self.run(&["image", "unmount", image]);
        found
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.service.kill();
        let _ = self.service.wait();
        // Undo any overlay mount left under the private root before the temp dir goes.
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path().join("root/overlay"))
            .status();
    }
}

fn sent(events: &[proto::BuildEvent]) -> u64 {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::ContextProgress(p)) => Some(p.bytes_sent),
            _ => None,
        })
        .next_back()
        .unwrap_or(0)
}

/// Podman: a build, a cached hit, a one-file edit loaded as a delta (a few KiB sent, not the
/// layer), contents, modes and times checked in the image.
#[tokio::test(flavor = "multi_thread")]
async fn podman_builds_hits_and_loads_an_edit_as_a_delta() {
    let podman = Podman::start();
    podman.load_from_docker("public.ecr.aws/lambda/python:3.12-x86_64");
    let host = format!("unix://{}", podman.socket().display());
    let daemon = TestDaemon::start_with(|config| config.engine_host = host).await;
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    let big = "x".repeat(1 << 20);
    write_file(&layer.join("python/big.bin"), &big, 0o644);
    write_file(&layer.join("python/m.py"), "VALUE = 1\n", 0o644);
    set_time(&layer.join("python/m.py"), 1_650_000_000);
    write_file(&layer.join("bootstrap"), "#!/bin/sh\n", 0o700);
    let name = unique("podman");
    let request = zip_request(&[(&name, &layer)]);

    let first = build(&daemon.socket, request.clone()).await;
    let tag = first.completed().tag.clone();
    assert!(!first.completed().cached);
    assert!(
        sent(&first.events) > 1 << 20,
        "the first build sends the layer"
    );
    let m = podman.read_in_image(&tag, "/opt/python/m.py").unwrap();
    assert_eq!(m, ("VALUE = 1\n".into(), 0o644, 1_650_000_000));
    let bootstrap = podman.read_in_image(&tag, "/opt/bootstrap").unwrap();
    assert_eq!(bootstrap.1, 0o755);
    let rie = podman
        .read_in_image(&tag, "/var/rapid/aws-lambda-rie")
        .unwrap();
    assert_eq!(rie.1, 0o755);

    let hit = build(&daemon.socket, request.clone()).await;
    assert!(hit.completed().cached, "{:?}", hit.completed());

    write_file(&layer.join("python/m.py"), "VALUE = 2\n", 0o644);
    set_time(&layer.join("python/m.py"), 1_650_000_002);
    std::fs::remove_file(layer.join("bootstrap")).unwrap();
    let edited = build(&daemon.socket, request).await;
    let done = edited.completed();
    assert_eq!(done.reason, proto::Reason::LayerChanged as i32);
    assert!(
        sent(&edited.events) < 64 << 10,
        "an edit sends a delta, not the layer: {} bytes",
        sent(&edited.events)
    );
    let m = podman.read_in_image(&tag, "/opt/python/m.py").unwrap();
    assert_eq!(m, ("VALUE = 2\n".into(), 0o644, 1_650_000_002));
    assert_eq!(podman.read_in_image(&tag, "/opt/bootstrap"), None);
    assert_eq!(
        podman
            .read_in_image(&tag, "/opt/python/big.bin")
            .unwrap()
            .0
            .len(),
        big.len()
    );
    daemon.stop().await;
}
