"""Wall time of `sam local invoke` with a big template layer, with and without lambda-imaged.

Run by scripts/sam-bench.sh (which prepares the engine, the venv and the daemon binary).
Prints one JSON line on stdout; progress on stderr. Figures are seconds of wall time of the
whole `sam` process (start-up, template, build, container run, response), median of
SAM_BENCH_REPEATS (default 3) for the repeated invokes:

  plain_first_s        SAM alone, the big layer's image does not exist yet
  plain_repeat_s       SAM alone, again (SAM rebuilds on every invoke with a local layer)
  tiny_layer_repeat_s  SAM alone, a one-file layer, repeated (the floor SAM can reach)
  daemon_first_s       with the daemon, the big layer's image does not exist yet
  daemon_repeat_s      with the daemon, unchanged layer (no build)
  daemon_tiny_repeat_s with the daemon, the one-file layer, repeated
  ratio                plain_repeat_s / daemon_repeat_s
  daemon_repeat_over_tiny_s  daemon_repeat_s - tiny_layer_repeat_s (goal: at most 0.2)
"""

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import Daemon, SamProject, docker, engine_tag_events  # noqa: E402

LAYER_FILES = int(os.environ.get("SAM_BENCH_LAYER_FILES", 4000))
LAYER_BYTES = int(os.environ.get("SAM_BENCH_LAYER_BYTES", 200 * 1000 * 1000))
REPEATS = int(os.environ.get("SAM_BENCH_REPEATS", 3))


def log(msg):
    print(f"sam-bench: {msg}", file=sys.stderr, flush=True)


def fill_layer(layer: Path, files: int, total: int) -> None:
    """`files` files of random (incompressible) bytes, `total` bytes in all, 100 per directory."""
    size = total // files
    for i in range(files):
        d = layer / "node_modules" / f"pkg{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i % 100:03d}.bin").write_bytes(os.urandom(size))


def timed_invoke(project: SamProject, socket=None):
    started = time.monotonic()
    response, stderr = project.invoke({"bench": True}, socket=socket)
    elapsed = time.monotonic() - started
    assert response["layer"] == "bench", response
    if socket is not None:
        assert "Warning" not in stderr, stderr
    return elapsed


def first_and_repeats(project: SamProject, socket=None):
    docker("image", "rm", "-f", project.tag, check=False)
    first = timed_invoke(project, socket)
    repeats = [timed_invoke(project, socket) for _ in range(REPEATS)]
    return first, statistics.median(repeats), repeats


def main():
    work = Path(tempfile.mkdtemp(prefix="limg-bench-"))
    big = SamProject(work / "big", message="bench")
    tiny = SamProject(work / "tiny", message="bench")
    log(f"writing a {LAYER_BYTES / 1e6:.0f} MB / {LAYER_FILES}-file layer")
    fill_layer(big.root / "layer", LAYER_FILES, LAYER_BYTES)
    results = {}
    daemon = Daemon(Path(os.environ["LAMBDA_IMAGED_BIN"]), work)
    try:
        log("SAM alone, big layer")
        results["plain_first_s"], results["plain_repeat_s"], plain = first_and_repeats(big)
        log("SAM alone, tiny layer")
        _, results["tiny_layer_repeat_s"], tiny_plain = first_and_repeats(tiny)

        daemon.start()
        log("with lambda-imaged, big layer")
        since = time.time()
        results["daemon_first_s"], results["daemon_repeat_s"], with_daemon = first_and_repeats(big, daemon.socket)
        builds = engine_tag_events(big.tag, since, time.time())
        assert builds == 1, f"{builds} engine builds with the daemon, expected 1"
        log("with lambda-imaged, tiny layer")
        _, results["daemon_tiny_repeat_s"], _ = first_and_repeats(tiny, daemon.socket)
    finally:
        daemon.stop()
        big.cleanup()
        tiny.cleanup()
        import shutil

        shutil.rmtree(work, ignore_errors=True)

    results["ratio"] = results["plain_repeat_s"] / results["daemon_repeat_s"]
    results["daemon_repeat_over_tiny_s"] = results["daemon_repeat_s"] - results["tiny_layer_repeat_s"]
    out = {"bench": "sam_invoke", **{k: round(v, 3) for k, v in results.items()}}
    out.update(
        {
            "plain_repeats_s": [round(x, 3) for x in plain],
            "daemon_repeats_s": [round(x, 3) for x in with_daemon],
            "tiny_repeats_s": [round(x, 3) for x in tiny_plain],
            "layer_bytes": LAYER_BYTES,
            "layer_files": LAYER_FILES,
            "repeats": REPEATS,
            "sam_cli_version": _sam_version(),
        }
    )
    print(json.dumps(out), flush=True)


def _sam_version():
    from importlib.metadata import version

    return version("aws-sam-cli")


if __name__ == "__main__":
    main()
