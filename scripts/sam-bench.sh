#!/usr/bin/env bash
# Benchmark: wall time of `sam local invoke` (AWS SAM CLI, pinned) with a 200 MB / 4,000-file
# template layer, first and repeated, with and without lambda-imaged, plus the same invoke with
# a one-file layer. Prints one JSON line (keys in clients/python/bench/sam_bench.py):
#   {"bench": "sam_invoke", "plain_first_s": …, "plain_repeat_s": …, "daemon_first_s": …,
#    "daemon_repeat_s": …, "tiny_layer_repeat_s": …, "ratio": …, …}
#
# Usage (as root): scripts/sam-bench.sh [prewarm]
#   prewarm               instead: lambda-imaged-prewarm on a 10-function template, parallel vs
#                         one image at a time (clients/python/bench/prewarm_bench.py)
#   LAMBDA_IMAGED_BIN     daemon binary [default: <cargo target dir>/release/lambda-imaged, built here]
#   SAM_BENCH_REPEATS     repeated invokes per case, median reported [3]
#   SAM_BENCH_LAYER_BYTES, SAM_BENCH_LAYER_FILES   the big layer [200000000, 4000]
# Uses the private dockerd of scripts/test-env.sh and the venv of clients/python/sam-venv.sh.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

eval "$(bash "$root/scripts/test-env.sh")"
venv=$(bash "$root/clients/python/sam-venv.sh")

if [ -z "${LAMBDA_IMAGED_BIN:-}" ]; then
	(cd "$root" && cargo build --quiet --release --locked --bins)
	# Wherever CARGO_TARGET_DIR (or a cargo config) puts the build.
	target_dir=$(cd "$root" && cargo metadata --locked --no-deps --format-version 1 | jq -er .target_directory)
	export LAMBDA_IMAGED_BIN=$target_dir/release/lambda-imaged
fi

export LAMBDA_IMAGED_TEST_ENV_LOADED=1 PYTHONDONTWRITEBYTECODE=1
unset LAMBDA_IMAGED_SOCKET LAMBDA_IMAGED
bench=sam_bench
if [ "${1:-}" = prewarm ]; then
	bench=prewarm_bench
fi
exec timeout --kill-after=30 1800 "$venv/bin/python" "$root/clients/python/bench/$bench.py"
