//! The daemon binary and `lambda-imagectl` as scripts use them: JSON shapes, exit codes,
//! socket handling. Most tests need no engine (DOCKER_HOST points at a socket nobody serves);
//! the ones that pin `build`, `ls`, `info`, `prune` and `health` output run the daemon on the
//! private engine of `scripts/test-env.sh`.
//!
//! The output tests pin every byte scripts may rely on: JSON lines are compact with sorted keys
//! (checked by re-serialising), each object's keys and enum spellings are compared whole, and
//! only values that differ per run (ids, times, sizes) are masked.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use regex::Regex;
use serde_json::{Value, json};
use support::daemon::Daemon;
use support::text;

/// How long a daemon may take to exit (refused, or after SIGTERM) on a busy machine.
const EXIT_WITHIN: Duration = Duration::from_secs(60);

/// The real binary with no engine (a socket nobody serves) and no RIE, answering.
fn no_engine_daemon() -> Daemon {
    Daemon::builder().no_engine().missing_rie().start_blocking()
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
    let daemon = no_engine_daemon();
    let layer = tempfile::tempdir().unwrap();
    let a = layer.path().join("layerA");
    let b = layer.path().join("layerB");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let output = ctl(
        daemon.socket(),
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
        daemon.socket(),
        &[
            "resolve",
            "--package-type",
            "image",
            "--image",
            &format!("localhost:5000/team/fn@sha256:{}", "0".repeat(64)),
            "--arch",
            "arm64",
            "--layer",
            &format!("unused={}", a.display()),
            "--json",
        ],
    );
    let plan = stdout_json(&output);
    assert_eq!(plan["tag"], "localhost:5000/team/fn:rapid-arm64");
    assert_eq!(plan["layers"], json!([]), "an IMAGE function has no layers");
    assert_eq!(
        plan["ignored_layers"],
        json!([{"name": "unused", "path": a.display().to_string()}])
    );

    // A relative --layer path is made absolute by the CLI.
    let output = Command::new(env!("CARGO_BIN_EXE_lambda-imagectl"))
        .current_dir(layer.path())
        .args([
            "--socket",
            daemon.socket().to_str().unwrap(),
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
    let daemon = no_engine_daemon();
    let output = ctl(daemon.socket(), &["resolve", "--runtime", "cobol1.0"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("INVALID_ARGUMENT") && stderr.contains("python3.12"),
        "{stderr}"
    );

    let output = ctl(
        daemon.socket(),
        &["resolve", "--runtime", "go1.x", "--arch", "arm64"],
    );
    assert_eq!(output.status.code(), Some(1));

    let output = ctl(
        daemon.socket(),
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

    let output = ctl(daemon.socket(), &["resolve", "--arch", "sparc"]);
    assert_eq!(output.status.code(), Some(2));
    let output = ctl(daemon.socket(), &["frobnicate"]);
    assert_eq!(output.status.code(), Some(2));

    let missing = daemon.socket().with_file_name("nobody-here.sock");
    let output = ctl(&missing, &["resolve", "--runtime", "python3.12"]);
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("nobody-here.sock"));

    // build --json ends a failure with an error object on stdout.
    let output = ctl(
        daemon.socket(),
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
    let in_dir = || {
        Daemon::builder()
            .in_dir(dir.path())
            .no_engine()
            .missing_rie()
    };
    let mut first = in_dir().start_blocking();
    assert_eq!(first.socket(), socket);
    assert_eq!(
        ctl(&socket, &["resolve", "--runtime", "python3.12"])
            .status
            .code(),
        Some(0)
    );

    let mut second = in_dir().spawn();
    let refused = second.wait_exit_blocking(EXIT_WITHIN);
    assert!(!refused.success());
    let stderr = second.log();
    assert!(stderr.contains("already serving"), "{stderr}");
    // The refused daemon did not take the socket away.
    assert_eq!(
        ctl(&socket, &["resolve", "--runtime", "python3.12"])
            .status
            .code(),
        Some(0)
    );

    first.terminate();
    let status = first.wait_exit_blocking(EXIT_WITHIN);
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists(), "socket file removed on exit");
}

/// Parses one line of `--json` output and checks it is printed as the CLI always printed it:
/// compact, keys sorted (re-serialising a `Value` yields exactly that form).
fn json_line(line: &str) -> Value {
    let value: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: not one JSON object: {line}"));
    assert_eq!(
        serde_json::to_string(&value).unwrap(),
        line,
        "JSON output is compact with sorted keys"
    );
    value
}

/// Replaces the value of `key` in `object` (which must have it) with a placeholder.
fn mask(object: &mut Value, key: &str) {
    assert!(object.get(key).is_some(), "no {key:?} in {object}");
    let slot = &mut object[key];
    *slot = json!("*");
}

/// Asserts the command exited with `code`, showing its output otherwise.
fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// `resolve` prints the plan as JSON and as text exactly as before.
#[test]
fn resolve_output_is_pinned() {
    let daemon = no_engine_daemon();
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("lay.zip");
    std::fs::write(&layer, b"").unwrap();
    let layer = layer.display().to_string();
    let args = [
        "resolve",
        "--runtime",
        "python3.12",
        "--layer",
        &layer,
        "--invoke-image",
        "f=example.com/emu:1",
        "--function-name",
        "f",
    ];
    let output = ctl(daemon.socket(), &args);
    assert_exit(&output, 0);
    let stdout = text(&output.stdout);
    let tag_line = stdout.lines().next().unwrap();
    let tag = tag_line.strip_prefix("tag:        ").unwrap();
    assert_eq!(
        stdout,
        format!(
            "tag:        {tag}\nbase image: example.com/emu:1\nplatform:   linux/amd64\n\
             layer:      lay = {layer}\nDockerfile:\n  FROM example.com/emu:1\n  \
             COPY aws-lambda-rie /var/rapid/aws-lambda-rie\n  COPY opt/ /opt/\n"
        )
    );

    let output = ctl(daemon.socket(), &[&args[..], &["--json"]].concat());
    assert_exit(&output, 0);
    let stdout = text(&output.stdout);
    assert_eq!(stdout.lines().count(), 1);
    let plan = json_line(stdout.trim_end());
    assert_eq!(
        plan,
        json!({
            "architecture": "x86_64", "base_image": "example.com/emu:1",
            "dockerfile": "FROM example.com/emu:1\nCOPY aws-lambda-rie /var/rapid/aws-lambda-rie\nCOPY opt/ /opt/\n",
            "invoke_image_used": true, "layers": [{"name": "lay", "path": layer}],
            "ignored_layers": [],
            "package_type": "ZIP", "platform": "linux/amd64", "runtime": "python3.12", "tag": tag,
        })
    );
}

/// Bad `--layer` arguments are usage errors (exit 2) naming the argument.
#[test]
fn layer_argument_errors_are_pinned() {
    let daemon = no_engine_daemon();
    for (layer, stderr) in [
        (
            "/",
            "error: --layer \"/\": cannot derive a name from the path; use NAME=PATH\n",
        ),
        ("x=", "error: --layer \"x=\": the path is empty\n"),
    ] {
        let output = ctl(
            daemon.socket(),
            &["resolve", "--runtime", "python3.12", "--layer", layer],
        );
        assert_exit(&output, 2);
        assert_eq!(text(&output.stderr), stderr);
        assert_eq!(text(&output.stdout), "");
    }
}

/// Without an engine: `health` says NOT_SERVING with exit 1, `info` names the unreachable
/// engine, and a usage error in `prune` exits 2 naming the flag.
#[test]
fn health_info_and_prune_usage_without_an_engine() {
    let daemon = no_engine_daemon();
    let output = ctl(daemon.socket(), &["health"]);
    assert_exit(&output, 1);
    assert_eq!(text(&output.stdout), "NOT_SERVING\n");
    assert_eq!(text(&output.stderr), "");

    let output = ctl(daemon.socket(), &["info"]);
    assert_exit(&output, 0);
    let stdout = text(&output.stdout);
    let pattern = Regex::new(
        r"^lambda-imaged \S+\nengine:  unreachable at unix://\S+/no-engine\.sock: .+\nsocket:  \S+\ncache:   \S+ \(\d+ bytes\)\nrie:     x86_64 \S+ MISSING\nrie:     arm64 \S+ MISSING\n(limit:   \w+ = \d+\n)+$",
    )
    .unwrap();
    assert!(pattern.is_match(&stdout), "{stdout}");

    let output = ctl(daemon.socket(), &["prune", "--older-than", "soon"]);
    assert_exit(&output, 2);
    assert_eq!(
        text(&output.stderr),
        "error: --older-than \"soon\": expected number at 0; e.g. 30m, 12h, 7d\n"
    );
    let output = ctl(daemon.socket(), &["prune", "--keep-storage", "lots"]);
    assert_exit(&output, 2);
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with("error: --keep-storage \"lots\": ")
            && stderr.ends_with("; e.g. 500MB, 10GiB\n"),
        "{stderr}"
    );

    // An unreachable daemon under build --json: exit 3, the message on stderr and as the
    // closing error object on stdout.
    let missing = daemon.socket().with_file_name("nobody-here.sock");
    let output = ctl(&missing, &["build", "--runtime", "python3.12", "--json"]);
    assert_exit(&output, 3);
    let stdout = text(&output.stdout);
    let mut error = json_line(stdout.trim_end());
    let message = error["message"].as_str().unwrap().to_owned();
    assert!(
        message.starts_with(&format!(
            "cannot reach lambda-imaged at {}: ",
            missing.display()
        )),
        "{message}"
    );
    assert_eq!(text(&output.stderr), format!("error: {message}\n"));
    mask(&mut error, "message");
    assert_eq!(
        error,
        json!({"code": "UNAVAILABLE", "message": "*", "type": "error"})
    );
}

/// Every event line of `build --json` (accepted, context progress, log, completed for a fresh,
/// a cached and a forced build, and the closing error object), the human and quiet renderings
/// of a build, and `ls`, `info`, `prune --dry-run` and `health` on a real engine.
#[test]
fn build_ls_info_prune_health_output_is_pinned() {
    // No grace for answers: prune --dry-run below may list the image just built.
    let daemon = Daemon::builder()
        .args(["--answer-grace", "0s"])
        .start_blocking();
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("lay");
    std::fs::create_dir_all(&layer).unwrap();
    std::fs::write(layer.join("m.txt"), support::unique("cli")).unwrap();
    // A long name: its log lines run past the 160 characters a human line shows.
    let name = format!("{}{}", support::unique("cli"), "-long".repeat(30));
    let layer_arg = format!("{name}={}", layer.display());
    let build = [
        "build",
        "--runtime",
        "python3.12",
        "--skip-pull-image",
        "--layer",
        &layer_arg,
    ];
    struct Rmi(Option<String>);
    impl Drop for Rmi {
        fn drop(&mut self) {
            if let Some(tag) = &self.0 {
                support::rmi_all(tag);
            }
        }
    }
    let mut rmi = Rmi(None);

    // A fresh build, as JSON Lines.
    let output = ctl(daemon.socket(), &[&build[..], &["--json"]].concat());
    assert_exit(&output, 0);
    assert_eq!(text(&output.stderr), "");
    let lines: Vec<Value> = text(&output.stdout).lines().map(json_line).collect();
    let mut accepted = lines.first().unwrap().clone();
    let build_id = accepted["build_id"].as_str().unwrap().to_owned();
    let tag = accepted["tag"].as_str().unwrap().to_owned();
    rmi.0 = Some(tag.clone());
    mask(&mut accepted, "build_id");
    assert_eq!(
        accepted,
        json!({"build_id": "*", "joined": false, "tag": tag, "type": "accepted"})
    );
    for line in &lines {
        assert_eq!(line["build_id"], build_id.as_str(), "{line}");
    }
    let of_type = |kind: &str| -> Vec<Value> {
        lines
            .iter()
            .filter(|l| l["type"] == kind)
            .cloned()
            .collect()
    };
    let progress = of_type("context_progress");
    let last = progress.last().expect("context progress events").clone();
    assert!(last["bytes_sent"].as_u64().unwrap() > 0);
    assert_eq!(last["bytes_sent"], last["bytes_total"]);
    let mut last = last;
    mask(&mut last, "build_id");
    mask(&mut last, "bytes_sent");
    mask(&mut last, "bytes_total");
    assert_eq!(
        last,
        json!({"build_id": "*", "bytes_sent": "*", "bytes_total": "*", "type": "context_progress"})
    );
    let logs = of_type("log");
    let mut first_log = logs.first().expect("log events").clone();
    mask(&mut first_log, "build_id");
    assert_eq!(
        first_log,
        json!({"build_id": "*", "kind": "status", "step": 1,
               "text": "layer 1/2 runtime interface emulator: sending", "type": "log"})
    );
    let completed = |line: &Value, cached: bool, reason: &str| {
        let mut line = line.clone();
        assert!(line["image_id"].as_str().unwrap().starts_with("sha256:"));
        assert!(line["duration_ms"].is_u64());
        let hex = line["image_id"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        assert_eq!(line["pinned_tag"], format!("{tag}-{}", &hex[..16]).as_str());
        for key in ["build_id", "image_id", "duration_ms", "pinned_tag"] {
            mask(&mut line, key);
        }
        mask(&mut line["config"], "env");
        assert_eq!(
            line,
            json!({
                "build_id": "*", "cached": cached, "changed_layer": "",
                "config": {"architecture": "amd64", "cmd": [], "entrypoint": ["/lambda-entrypoint.sh"],
                           "env": "*", "working_dir": "/var/task"},
                "duration_ms": "*", "image_id": "*", "pinned_tag": "*", "reason": reason, "tag": tag,
                "type": "completed",
            })
        );
    };
    assert_eq!(lines.last().unwrap()["type"], "completed");
    completed(lines.last().unwrap(), false, "missing");
    let known = [
        "accepted",
        "queued",
        "log",
        "pull_progress",
        "context_progress",
        "warning",
        "completed",
    ];
    assert!(
        lines
            .iter()
            .all(|l| known.contains(&l["type"].as_str().unwrap()))
    );

    // Cached, as JSON: accepted then completed.
    let output = ctl(daemon.socket(), &[&build[..], &["--json"]].concat());
    assert_exit(&output, 0);
    let lines: Vec<Value> = text(&output.stdout).lines().map(json_line).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    completed(&lines[1], true, "up_to_date");
    let image_id = lines[1]["image_id"].as_str().unwrap().to_owned();
    let short = &image_id["sha256:".len().."sha256:".len() + 12];

    // Cached, human: the outcome on stdout, the rest on stderr.
    let output = ctl(daemon.socket(), &build);
    assert_exit(&output, 0);
    assert_eq!(
        text(&output.stdout),
        format!("{tag} is up to date ({short})\n")
    );
    let stderr = text(&output.stderr);
    let accepted = Regex::new(&format!(
        "^{} accepted \\(build [0-9a-f-]{{36}}\\)\n$",
        regex::escape(&tag)
    ))
    .unwrap();
    assert!(accepted.is_match(&stderr), "{stderr}");

    // Forced, human: engine lines indented on stderr, context size in IEC units.
    let output = ctl(
        daemon.socket(),
        &[&build[..], &["--force-image-build"]].concat(),
    );
    assert_exit(&output, 0);
    let stdout = text(&output.stdout);
    let built = Regex::new(&format!(
        "^built {} \\([0-9a-f]{{12}}\\) in \\d+\\.\\d s, because forced\n$",
        regex::escape(&tag)
    ))
    .unwrap();
    assert!(built.is_match(&stdout), "{stdout}");
    let stderr = text(&output.stderr);
    let mut stderr_lines = stderr.lines();
    let first = stderr_lines.next().unwrap();
    assert!(
        first.starts_with(&format!("{tag} accepted (build ")),
        "{stderr}"
    );
    let line = Regex::new(r"^(  .*|context: \d+(\.\d KiB| B|\.\d MiB) sent)$").unwrap();
    for rest in stderr_lines {
        assert!(line.is_match(rest), "{rest:?} in\n{stderr}");
    }
    assert!(
        stderr.contains("\n  layer 1/2 runtime interface emulator: reused\n"),
        "{stderr}"
    );
    assert!(
        Regex::new(r"\ncontext: \d+(\.\d KiB| B|\.\d MiB) sent\n")
            .unwrap()
            .is_match(&stderr),
        "{stderr}"
    );
    // Lines longer than 160 characters end in "..." after 160 of them.
    let label = stderr
        .lines()
        .find(|l| l.starts_with("  layer 2/2 layer \"cli"))
        .unwrap_or_else(|| panic!("no line for the long layer name in\n{stderr}"));
    assert_eq!(label.chars().count(), 2 + 160 + 3, "{label}");
    assert!(label.ends_with("..."));

    // Quiet: only the outcome.
    let output = ctl(daemon.socket(), &[&build[..], &["-q"]].concat());
    assert_exit(&output, 0);
    assert_eq!(
        text(&output.stdout),
        format!("{tag} is up to date ({short})\n")
    );
    assert_eq!(text(&output.stderr), "");

    // A failed build under --json: the error object closes stdout, exit 1.
    let output = ctl(
        daemon.socket(),
        &[
            "build",
            "--runtime",
            "python3.12",
            "--layer",
            "/nonexistent/x",
            "--json",
        ],
    );
    assert_exit(&output, 1);
    assert_eq!(
        text(&output.stdout),
        "{\"code\":\"NOT_FOUND\",\"message\":\"layers[0].path: /nonexistent/x does not exist\",\"type\":\"error\"}\n"
    );
    assert_eq!(
        text(&output.stderr),
        "error: NOT_FOUND: layers[0].path: /nonexistent/x does not exist\n"
    );

    // ls: the three builds above (newest first), as JSON and as a table.
    let output = ctl(daemon.socket(), &["ls", "--json"]);
    assert_exit(&output, 0);
    let stdout = text(&output.stdout);
    assert_eq!(stdout.lines().count(), 1);
    let mut list = json_line(stdout.trim_end());
    let recent = list["recent"].as_array_mut().unwrap();
    assert!(recent.len() >= 2, "{stdout}");
    for summary in recent.iter_mut() {
        assert!(
            summary["finished_unix_ms"].as_u64().unwrap()
                >= summary["started_unix_ms"].as_u64().unwrap()
        );
        // How many clients are still attached when a build ends is a race: a count, unpinned.
        assert!(summary["subscribers"].is_u64());
        for key in [
            "build_id",
            "started_unix_ms",
            "finished_unix_ms",
            "subscribers",
        ] {
            mask(summary, key);
        }
    }
    assert_eq!(list["recent"][0]["image_id"], image_id.as_str());
    mask(&mut list["recent"][0], "image_id");
    assert_eq!(
        list["recent"][0],
        json!({"background": false, "build_id": "*", "error": "", "finished_unix_ms": "*", "image_id": "*",
               "started_unix_ms": "*", "state": "succeeded", "subscribers": "*", "tag": tag})
    );
    assert_eq!(list["in_flight"], json!([]));
    let output = ctl(daemon.socket(), &["ls"]);
    assert_exit(&output, 0);
    let stdout = text(&output.stdout);
    let mut rows = stdout.lines();
    assert_eq!(
        rows.next().unwrap(),
        "STATE      BUILD ID                             SUBS TAG"
    );
    let row = Regex::new(&format!(
        "^succeeded  [0-9a-f-]{{36}} [ \\d]{{3}}\\d {}$",
        regex::escape(&tag)
    ))
    .unwrap();
    let rows: Vec<&str> = rows.collect();
    assert!(
        rows.len() >= 2 && rows.iter().all(|r| row.is_match(r)),
        "{stdout}"
    );

    // info: JSON with every field, and the text form.
    let output = ctl(daemon.socket(), &["info", "--json"]);
    assert_exit(&output, 0);
    let stdout = text(&output.stdout);
    let mut info = json_line(stdout.trim_end());
    assert_eq!(info["engine"]["reachable"], true);
    for key in ["name", "version", "api_version", "distribution_api"] {
        mask(&mut info["engine"], key);
    }
    for rie in info["rie"].as_array_mut().unwrap() {
        assert_eq!(rie["sha256"].as_str().unwrap().len(), 64);
        mask(rie, "sha256");
    }
    for key in [
        "requests",
        "joined",
        "cache_hits",
        "engine_builds",
        "failures",
        "files_hashed",
        "bytes_hashed",
    ] {
        assert!(info["stats"][key].is_u64(), "{key}");
        mask(&mut info["stats"], key);
    }
    for key in ["version", "cache_bytes", "limits"] {
        mask(&mut info, key);
    }
    let rie_dir = support::rie_dir();
    let cache_dir = daemon.socket().with_file_name("cache");
    // The engine's own architecture, plus those this kernel's binfmt_misc runs (the engine is
    // local); without binfmt_misc, exactly the native one. The rule is unit-tested in engine.rs.
    let native = match support::docker_ok(&["version", "-f", "{{.Server.Arch}}"]).trim() {
        "amd64" => "x86_64",
        "arm64" => "arm64",
        other => panic!("the test engine runs on {other}, not a Lambda architecture"),
    };
    let architectures = info["engine"]["architectures"].clone();
    let listed: Vec<&str> = architectures
        .as_array()
        .expect("engine.architectures is a list")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(listed.contains(&native), "{listed:?}");
    assert!(
        listed == ["x86_64"] || listed == ["arm64"] || listed == ["x86_64", "arm64"],
        "{listed:?}"
    );
    let binfmt_on = std::fs::read_to_string("/proc/sys/fs/binfmt_misc/status")
        .is_ok_and(|status| status.trim() == "enabled");
    if !binfmt_on {
        assert_eq!(listed, [native], "no binfmt_misc: the native one only");
    }
    let runs = listed.join(" ");
    assert_eq!(
        info,
        json!({
            "cache_bytes": "*", "cache_dir": cache_dir.display().to_string(),
            "capabilities": ["build", "resolve", "list_builds", "dedup", "fingerprint", "streamed_context"],
            "engine": {"api_version": "*", "architectures": architectures, "distribution_api": "*", "error": "",
                       "host": support::engine_host(), "image_store": "classic",
                       "name": "*", "reachable": true, "version": "*"},
            "limits": "*",
            "rie": [
                {"architecture": "x86_64", "path": rie_dir.join("aws-lambda-rie-x86_64").display().to_string(),
                 "present": true, "sha256": "*"},
                {"architecture": "arm64", "path": rie_dir.join("aws-lambda-rie-arm64").display().to_string(),
                 "present": true, "sha256": "*"},
            ],
            "socket_path": daemon.socket().display().to_string(),
            "stats": {"bytes_hashed": "*", "cache_hits": "*", "engine_builds": "*", "failures": "*",
                      "files_hashed": "*", "joined": "*", "requests": "*"},
            "version": "*",
        })
    );
    let output = ctl(daemon.socket(), &["info"]);
    assert_exit(&output, 0);
    let stdout = text(&output.stdout);
    let pattern = Regex::new(&format!(
        "^lambda-imaged \\S+\nengine:  \\S+ \\S+ \\(API \\S+\\) at {}\nstore:   classic\nruns:    {}\nsocket:  {}\ncache:   {} \\(\\d+ bytes\\)\nrie:     x86_64 \\S+ [0-9a-f]{{64}}\nrie:     arm64 \\S+ [0-9a-f]{{64}}\n(limit:   \\w+ = \\d+\n)+$",
        regex::escape(&support::engine_host()),
        runs,
        regex::escape(&daemon.socket().display().to_string()),
        regex::escape(&cache_dir.display().to_string()),
    ))
    .unwrap();
    assert!(pattern.is_match(&stdout), "{stdout}");
    let limits: Vec<&str> = stdout.lines().filter(|l| l.starts_with("limit:")).collect();
    let mut sorted = limits.clone();
    sorted.sort();
    assert_eq!(limits, sorted, "limits are printed sorted");

    // prune --dry-run lists our image (others' may appear too: the engine is shared).
    let output = ctl(daemon.socket(), &["prune", "--dry-run"]);
    assert_exit(&output, 0);
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains(&format!("\nimage  {tag}\n"))
            || stdout.starts_with(&format!("image  {tag}\n")),
        "{stdout}"
    );
    let pattern = Regex::new(r"^((image|layer)  \S+\n)*would free \d+ bytes\n$").unwrap();
    assert!(pattern.is_match(&stdout), "{stdout}");

    let output = ctl(daemon.socket(), &["health"]);
    assert_exit(&output, 0);
    assert_eq!(text(&output.stdout), "SERVING\n");
}
