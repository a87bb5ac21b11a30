//! The daemon binary and `lambda-imagectl` as scripts use them: JSON shapes, exit codes,
//! socket handling. No engine is needed: DOCKER_HOST points at a socket nobody serves.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts the real binary on a temp socket and waits until it answers.
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let child = spawn_daemon(&socket, dir.path());
        wait_for_socket(&socket);
        Daemon {
            child,
            socket,
            _dir: dir,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_daemon(socket: &Path, dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lambda-imaged"))
        .arg("--socket")
        .arg(socket)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--rie-dir")
        .arg(dir.join("no-rie-here"))
        .env_remove("LAMBDA_IMAGED_SOCKET")
        .env(
            "DOCKER_HOST",
            format!("unix://{}/no-engine.sock", dir.display()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for_socket(socket: &Path) {
    for _ in 0..300 {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the daemon did not start listening on {}", socket.display());
}

fn ctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lambda-imagectl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

fn stdout_json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
}

/// `resolve --json` prints SAM's tag, base and our Dockerfile with no engine at all.
#[test]
fn resolve_json_without_an_engine() {
    let daemon = Daemon::start();
    let layer = tempfile::tempdir().unwrap();
    let a = layer.path().join("layerA");
    let b = layer.path().join("layerB");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let output = ctl(
        &daemon.socket,
        &[
            "resolve",
            "--runtime",
            "python3.12",
            "--layer",
            a.to_str().unwrap(),
            "--layer",
            &format!("layerB={}", b.display()),
            "--json",
        ],
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let plan = stdout_json(&output);
    assert_eq!(
        plan["tag"],
        "samcli/lambda-python:3.12-x86_64-826cc3a931cbea33312dcc046"
    );
    assert_eq!(
        plan["base_image"],
        "public.ecr.aws/lambda/python:3.12-x86_64"
    );
    assert!(
        plan["dockerfile"]
            .as_str()
            .unwrap()
            .starts_with("FROM public.ecr.aws/lambda/python:3.12-x86_64\n")
    );
    assert_eq!(plan["layers"][0]["name"], "layerA");
    assert_eq!(plan["layers"][0]["path"], a.display().to_string());

    let output = ctl(
        &daemon.socket,
        &[
            "resolve",
            "--package-type",
            "image",
            "--image",
            &format!("localhost:5000/team/fn@sha256:{}", "0".repeat(64)),
            "--arch",
            "arm64",
            "--json",
        ],
    );
    assert_eq!(
        stdout_json(&output)["tag"],
        "localhost:5000/team/fn:rapid-arm64"
    );

    // A relative --layer path is made absolute by the CLI.
    let output = Command::new(env!("CARGO_BIN_EXE_lambda-imagectl"))
        .current_dir(layer.path())
        .args([
            "--socket",
            daemon.socket.to_str().unwrap(),
            "resolve",
            "--runtime",
            "nodejs20.x",
            "--layer",
            "layerA",
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(
        stdout_json(&output)["layers"][0]["path"],
        a.display().to_string()
    );
}

/// Exit codes: 1 when the daemon answers with an error (code and message on stderr),
/// 2 for usage errors, 3 when the socket cannot be reached (message names it).
#[test]
fn exit_codes() {
    let daemon = Daemon::start();
    let output = ctl(&daemon.socket, &["resolve", "--runtime", "cobol1.0"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("INVALID_ARGUMENT") && stderr.contains("python3.12"),
        "{stderr}"
    );

    let output = ctl(
        &daemon.socket,
        &["resolve", "--runtime", "go1.x", "--arch", "arm64"],
    );
    assert_eq!(output.status.code(), Some(1));

    let output = ctl(
        &daemon.socket,
        &[
            "resolve",
            "--layer",
            "/nonexistent/dir",
            "--runtime",
            "python3.12",
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("NOT_FOUND"));

    let output = ctl(&daemon.socket, &["resolve", "--arch", "sparc"]);
    assert_eq!(output.status.code(), Some(2));
    let output = ctl(&daemon.socket, &["frobnicate"]);
    assert_eq!(output.status.code(), Some(2));

    let missing = daemon.socket.with_file_name("nobody-here.sock");
    let output = ctl(&missing, &["resolve", "--runtime", "python3.12"]);
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("nobody-here.sock"));

    // build --json ends a failure with an error object on stdout.
    let output = ctl(
        &daemon.socket,
        &["build", "--runtime", "python3.12", "--json"],
    );
    assert_eq!(output.status.code(), Some(1));
    let last = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let last: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["type"], "error");
    // The RIE is checked first: this daemon's --rie-dir is empty.
    assert_eq!(last["code"], "FAILED_PRECONDITION", "{last}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("scripts/fetch-rie.sh"),
        "{last}"
    );
}

/// A socket file left by a dead daemon is replaced; a live daemon is refused with a clear
/// message; SIGTERM stops the daemon with exit 0 and removes its socket file.
#[test]
fn socket_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    // A stale socket file: bound, then its owner gone.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut first = spawn_daemon(&socket, dir.path());
    wait_for_socket(&socket);
    assert_eq!(
        ctl(&socket, &["resolve", "--runtime", "python3.12"])
            .status
            .code(),
        Some(0)
    );

    let second = spawn_daemon(&socket, dir.path())
        .wait_with_output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already serving"), "{stderr}");
    // The refused daemon did not take the socket away.
    assert_eq!(
        ctl(&socket, &["resolve", "--runtime", "python3.12"])
            .status
            .code(),
        Some(0)
    );

    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let status = first.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists(), "socket file removed on exit");
}
