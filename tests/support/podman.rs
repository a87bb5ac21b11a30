//! A private Podman service (Debian's `podman` 4.3, private `--root/--runroot/--tmpdir`, file
//! events) for tests that run the daemon against Podman's Docker-compatible API. It fails with
//! the reason when Podman cannot run; it never passes silently. (The same helper as in
//! tests/podman.rs, shared here so other test files can use it.)

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private Podman service, stopped (and its image mounts undone) when dropped.
pub struct Podman {
    dir: tempfile::TempDir,
    service: Child,
}

impl Podman {
    pub fn storage_args(&self) -> Vec<String> {
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

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("podman.sock")
    }

    /// Starts the service and waits (up to 60 s) until it answers `_ping`.
    pub fn start() -> Podman {
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
    pub fn run(&self, args: &[&str]) -> String {
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
    pub fn load_from_docker(&self, image: &str) {
        let save = Command::new("docker")
            .args(["save", image])
            .env("DOCKER_HOST", super::engine_host())
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
    pub fn read_in_image(&self, image: &str, path: &str) -> Option<(String, u32, i64)> {
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
        // Undo any overlay mount left under the private root before the temp dir goes (usually
        // there is none: umount's "not mounted" is not worth printing).
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path().join("root/overlay"))
            .stderr(Stdio::null())
            .status();
    }
}
