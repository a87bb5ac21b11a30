"""Wall time of `lambda-imaged-prewarm` on a 10-function template (3 layers, 2 runtimes, ten
distinct images), against the sum of the single builds and the slowest single build.

Run by `scripts/sam-bench.sh prewarm` (which prepares the engine, the venv and the daemon
binary). Prints one JSON line on stdout; progress on stderr. Each run is cold: a daemon with a
cache of its own, the ten images removed from the engine first.

  parallel_s        wall time of the prewarm, --jobs 4 (SAM reading the template included)
  sequential_s      wall time of the prewarm, --jobs 1 (each image built alone)
  sum_single_s      sum of the per-image build times of the --jobs 1 run
  slowest_single_s  the slowest of those
  speedup           sequential_s / parallel_s
  ready             images ready in each run (correct: 10 and 10, exit status 0 both times)
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import BOOTSTRAP, FINGERPRINT_LABEL, Daemon, docker, image_label  # noqa: E402

LAYER_FILES = int(os.environ.get("PREWARM_BENCH_LAYER_FILES", 400))
LAYER_BYTES = int(os.environ.get("PREWARM_BENCH_LAYER_BYTES", 20 * 1000 * 1000))
PREWARM = Path(sys.executable).with_name("lambda-imaged-prewarm")

# (runtime, layers) for the ten functions: five layer lists over three layers, two runtimes.
LAYER_LISTS = [["A"], ["B"], ["C"], ["A", "B"], ["A", "B", "C"]]
RUNTIMES = ["provided.al2023", "python3.12"]


def log(msg):
    print(f"prewarm-bench: {msg}", file=sys.stderr, flush=True)


def write_project(root: Path, suffix: str) -> None:
    (root / "fn").mkdir(parents=True)
    (root / "fn" / "bootstrap").write_bytes(BOOTSTRAP.read_bytes())
    os.chmod(root / "fn" / "bootstrap", 0o755)
    lines = ["AWSTemplateFormatVersion: '2010-09-09'", "Transform: AWS::Serverless-2016-10-31", "Resources:"]
    n = 0
    for runtime in RUNTIMES:
        for layers in LAYER_LISTS:
            n += 1
            refs = ", ".join(f"!Ref Bench{name}{suffix}" for name in layers)
            lines += [
                f"  Fn{n}:",
                "    Type: AWS::Serverless::Function",
                "    Properties:",
                f"      Runtime: {runtime}",
                "      Handler: bootstrap",
                "      CodeUri: fn/",
                f"      Layers: [{refs}]",
            ]
    for name in ("A", "B", "C"):
        layer = root / "layers" / name
        for i in range(LAYER_FILES):
            d = layer / f"pkg{i // 100:03d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"file{i % 100:03d}.bin").write_bytes(os.urandom(LAYER_BYTES // LAYER_FILES))
        lines += [
            f"  Bench{name}{suffix}:",
            "    Type: AWS::Serverless::LayerVersion",
            "    Properties:",
            f"      ContentUri: layers/{name}/",
        ]
    (root / "template.yaml").write_text("\n".join(lines) + "\n")


def prewarm(root: Path, daemon: Daemon, jobs: int):
    """(wall seconds, exit status, ready events)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDA_IMAGED")}
    env.update(SAM_CLI_TELEMETRY="0", AWS_EC2_METADATA_DISABLED="true")
    started = time.monotonic()
    proc = subprocess.run(
        [str(PREWARM), "--json", "--skip-pull-image", "--socket", daemon.socket, "--jobs", str(jobs)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    elapsed = time.monotonic() - started
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0:
        log(proc.stderr[-2000:])
    return elapsed, proc.returncode, [e for e in events if e["event"] == "ready"]


def cold_run(root: Path, work: Path, jobs: int, tags):
    docker("image", "rm", "-f", *tags, check=False)
    daemon = Daemon(Path(os.environ["LAMBDA_IMAGED_BIN"]), work / f"jobs{jobs}").start()
    try:
        return prewarm(root, daemon, jobs)
    finally:
        daemon.stop()


def main():
    work = Path(tempfile.mkdtemp(prefix="limg-prewarm-bench-"))
    root = work / "app"
    write_project(root, os.urandom(4).hex())
    log(f"10 functions over 3 layers of {LAYER_BYTES / 1e6:.0f} MB / {LAYER_FILES} files")
    (work / "jobs4").mkdir()
    (work / "jobs1").mkdir()
    parallel_s, parallel_rc, parallel_ready = cold_run(root, work, 4, [])
    tags = sorted(e["tag"] for e in parallel_ready)
    log(f"--jobs 4: {parallel_s:.2f} s; now --jobs 1")
    sequential_s, sequential_rc, sequential_ready = cold_run(root, work, 1, tags)
    singles = [e["seconds"] for e in sequential_ready]
    labelled = sum(1 for tag in tags if image_label(tag, FINGERPRINT_LABEL))
    docker("image", "rm", "-f", *tags, check=False)
    ok = (parallel_rc, sequential_rc, len(parallel_ready), len(sequential_ready), labelled) == (0, 0, 10, 10, 10)
    print(
        json.dumps(
            {
                "bench": "prewarm",
                "functions": 10,
                "images": len(tags),
                "layer_mb": LAYER_BYTES / 1e6,
                "layer_files": LAYER_FILES,
                "parallel_s": round(parallel_s, 2),
                "sequential_s": round(sequential_s, 2),
                "sum_single_s": round(sum(singles), 2),
                "slowest_single_s": round(max(singles, default=0.0), 2),
                "speedup": round(sequential_s / parallel_s, 2) if parallel_s else None,
                "ready": [len(parallel_ready), len(sequential_ready)],
                "exit_status": [parallel_rc, sequential_rc],
                "images_by_the_daemon": labelled,
                "ok": ok,
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
