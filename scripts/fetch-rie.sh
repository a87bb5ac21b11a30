#!/usr/bin/env bash
# Fetches the real AWS Lambda runtime interface emulator (RIE) binaries that lambda-imaged puts
# into every image, from the pinned aws-sam-cli wheel (which ships them), and checks their
# sha256. Usage: scripts/fetch-rie.sh [DIR]   (default: /var/cache/lambda-imaged/rie)
# Writes DIR/aws-lambda-rie-x86_64 and DIR/aws-lambda-rie-arm64, mode 0755.
set -euo pipefail

SAM_CLI_VERSION=1.170.0
SAM_CLI_WHEEL_SHA256=24ebaf5ecba38dc1758089968cb89ab61e124b84e92a344fc7a2771a47f4d0bf
RIE_X86_64_SHA256=6b1e686e62ab2baf5759c412c4864276ef2a88b094fca53ec070637ccba9b9a5
RIE_ARM64_SHA256=ec2e5d09633d853834c008b1ef264bf834b258a94d551d2b2074966494b39a21

dir=${1:-/var/cache/lambda-imaged/rie}
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }
if sha_ok "$dir/aws-lambda-rie-x86_64" "$RIE_X86_64_SHA256" && sha_ok "$dir/aws-lambda-rie-arm64" "$RIE_ARM64_SHA256"; then
	echo "RIE already present in $dir"
	exit 0
fi
command -v unzip >/dev/null || { echo "fetch-rie: unzip is required (apt-get install unzip)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary :all: "aws-sam-cli==$SAM_CLI_VERSION" -d "$tmp"
whl="$tmp/aws_sam_cli-$SAM_CLI_VERSION-py3-none-any.whl"
sha_ok "$whl" "$SAM_CLI_WHEEL_SHA256" || { echo "fetch-rie: sha256 mismatch for $(basename "$whl")" >&2; exit 1; }
unzip -q -j -o "$whl" 'samcli/local/rapid/aws-lambda-rie-*' -d "$tmp/rie"
mkdir -p "$dir"
for arch in x86_64 arm64; do
	if [ $arch = x86_64 ]; then want=$RIE_X86_64_SHA256; else want=$RIE_ARM64_SHA256; fi
	sha_ok "$tmp/rie/aws-lambda-rie-$arch" "$want" || { echo "fetch-rie: sha256 mismatch for aws-lambda-rie-$arch" >&2; exit 1; }
	install -m 0755 "$tmp/rie/aws-lambda-rie-$arch" "$dir/.aws-lambda-rie-$arch.tmp"
	mv -f "$dir/.aws-lambda-rie-$arch.tmp" "$dir/aws-lambda-rie-$arch"
done
echo "RIE fetched into $dir (aws-sam-cli $SAM_CLI_VERSION)"
