#!/usr/bin/env bash
# Runs the Python client's tests (pytest) against real parts: the pinned AWS SAM CLI in a venv
# (sam-venv.sh), the private dockerd + RIE + stand-in base images of scripts/test-env.sh, and
# the daemon binary (LAMBDA_IMAGED_BIN, default target/debug/lambda-imaged, built here with
# `cargo build --bins` unless LAMBDA_IMAGED_BIN is set). Run as root, like test-env.sh.
#
#   clients/python/run-tests.sh [PYTEST ARGS...]
#
# Exit status: pytest's (non-zero on any failure); its summary line is the last line printed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

# The engine first: test-env.sh also installs docker.io and python3-venv where missing.
eval "$(bash "$root/scripts/test-env.sh")"
state=${LAMBDA_IMAGED_TEST_DIR:-/tmp/lambda-imaged-test}

venv=$(bash "$here/sam-venv.sh")

if [ -z "${LAMBDA_IMAGED_BIN:-}" ]; then
	(cd "$root" && cargo build --quiet --bins)
	export LAMBDA_IMAGED_BIN=$root/target/debug/lambda-imaged
fi

export LAMBDA_IMAGED_TEST_ENV_LOADED=1 # conftest.py: the exports above are in place
export PYTHONDONTWRITEBYTECODE=1       # keep __pycache__ out of the tree
unset LAMBDA_IMAGED_SOCKET LAMBDA_IMAGED
cd "$here"
# A temp dir of this run's own (short: the daemons' sockets live under pytest's tmp_path),
# removed at the end: SAM CLI leaves its build lock files (*.building.status) in the temp dir.
tmp=$(mktemp -d /tmp/limg-py.XXXXXX)
chmod 0755 "$tmp" # (a test connects as another user to a socket under it)
trap 'rm -rf "$tmp"' EXIT
export TMPDIR=$tmp
# Every test bounds its own waits; this bounds the whole run.
rc=0
timeout --kill-after=30 1800 "$venv/bin/python" -m pytest -o "cache_dir=$state/py/pytest-cache" \
	-q -rfE tests "$@" || rc=$?
exit "$rc"
