#!/usr/bin/env bash
# Prints the path of a venv with the pinned AWS SAM CLI, pytest, grpcio-tools and this package
# installed from this tree (made once, then reused; the package is reinstalled every time).
# Used by run-tests.sh and scripts/sam-bench.sh.
#
#   venv=$(clients/python/sam-venv.sh)
#
# Location: $LAMBDA_IMAGED_SAM_VENV, default
# ${LAMBDA_IMAGED_TEST_DIR:-/tmp/lambda-imaged-test}/py/sam-$SAM_CLI_VERSION (the test state dir
# of scripts/test-env.sh). Progress goes to stderr, only the path to stdout.
set -euo pipefail

# Bump together with scripts/test-env.sh (whose RIE comes from the same wheel).
SAM_CLI_VERSION=1.170.0
GRPCIO_TOOLS_VERSION=1.85.1 # as in generate.sh

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=${LAMBDA_IMAGED_TEST_DIR:-/tmp/lambda-imaged-test}
venv=${LAMBDA_IMAGED_SAM_VENV:-$state/py/sam-$SAM_CLI_VERSION}

ready() {
	"$venv/bin/python" - "$SAM_CLI_VERSION" "$GRPCIO_TOOLS_VERSION" <<-'EOF' >/dev/null 2>&1
		import sys
		from importlib.metadata import version
		assert version("aws-sam-cli") == sys.argv[1]
		assert version("grpcio-tools") == sys.argv[2]
		for name in ("pytest", "boto3", "hatchling", "grpcio", "protobuf"):
		    version(name)
	EOF
}

pip() {
	"$venv/bin/python" -m pip --disable-pip-version-check --quiet "$@" >&2
}

if ! ready; then
	echo "sam-venv.sh: making $venv (aws-sam-cli==$SAM_CLI_VERSION)" >&2
	mkdir -p "$(dirname "$venv")"
	python3 -m venv --clear "$venv" >&2
	pip install --upgrade pip
	pip install "aws-sam-cli==$SAM_CLI_VERSION" "grpcio-tools==$GRPCIO_TOOLS_VERSION" \
		"pytest>=8" boto3 hatchling "grpcio>=$GRPCIO_TOOLS_VERSION" "protobuf>=7.35.1,<8"
	ready || {
		echo "sam-venv.sh: $venv is incomplete after installing" >&2
		exit 1
	}
fi
# This tree's package, every time (no build isolation: hatchling is in the venv already).
pip install --no-deps --no-build-isolation --force-reinstall "$here"
echo "$venv"
