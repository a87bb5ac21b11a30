#!/usr/bin/env bash
# Regenerates the Python stubs of the lambda-imaged API from proto/ (committed under
# src/lambda_imaged_client/v1/). Run it after every change to the .proto files; the test
# tests/test_stubs.py fails while the committed stubs are stale.
#
# Usage: clients/python/generate.sh [OUT_DIR]
#   OUT_DIR  where the lambda_imaged_client/v1/*_pb2*.py(i) files go [default: clients/python/src]
#
# The generator is pinned (GRPCIO_TOOLS_VERSION): the same version always writes the same bytes,
# which is what the staleness test compares. If $PYTHON (default python3) lacks that exact
# grpcio-tools, a venv is made once under ${XDG_CACHE_HOME:-~/.cache}/lambda-imaged/.
set -euo pipefail

GRPCIO_TOOLS_VERSION=1.85.1

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$here/src}
python=${PYTHON:-python3}

has_tools() {
	"$1" - "$GRPCIO_TOOLS_VERSION" <<-'EOF' >/dev/null 2>&1
		import sys
		from importlib.metadata import version
		import grpc_tools.protoc  # noqa: F401
		sys.exit(version("grpcio-tools") != sys.argv[1])
	EOF
}

if ! has_tools "$python"; then
	venv=${XDG_CACHE_HOME:-$HOME/.cache}/lambda-imaged/grpcio-tools-$GRPCIO_TOOLS_VERSION
	if ! has_tools "$venv/bin/python"; then
		echo "generate.sh: installing grpcio-tools==$GRPCIO_TOOLS_VERSION into $venv" >&2
		python3 -m venv "$venv"
		"$venv/bin/pip" install --quiet --disable-pip-version-check "grpcio-tools==$GRPCIO_TOOLS_VERSION"
	fi
	python=$venv/bin/python
fi

mkdir -p "$out"
# The virtual import path (-Ilambda_imaged_client/v1=...) makes the generated modules import
# each other as `lambda_imaged_client.v1.*`, so they live inside the package. Message and
# service names keep the proto package, `lambda_imaged.v1`.
cd "$root"
"$python" -m grpc_tools.protoc \
	-Ilambda_imaged_client/v1=proto/lambda_imaged/v1 \
	--python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
	proto/lambda_imaged/v1/image_builder.proto
