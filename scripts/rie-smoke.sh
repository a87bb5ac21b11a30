#!/usr/bin/env bash
# End-to-end check of the test environment without lambda-imaged: build an image by hand the
# way lambda-imaged does (FROM base + RIE at /var/rapid/aws-lambda-rie + /opt), run it like
# SAM does (--entrypoint /var/rapid/aws-lambda-rie), invoke it and check the answer.
#
# Usage: scripts/rie-smoke.sh [host-port]     (default 9000; prints the response on success)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
eval "$("$here/test-env.sh")"
port=${1:-9000}
img=lambda-imaged-smoke:latest
name=lambda-imaged-smoke-$$
ctx=$(mktemp -d)
trap 'docker rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$ctx"' EXIT

mkdir -p "$ctx/opt"
install -m 0755 "$LAMBDA_IMAGED_RIE_DIR/aws-lambda-rie-x86_64" "$ctx/aws-lambda-rie"
install -m 0755 "$here/../tests/fixtures/bootstrap" "$ctx/opt/bootstrap"
printf 'from layer "B"\n' >"$ctx/opt/message.txt"
cat >"$ctx/Dockerfile" <<'EOF'
FROM public.ecr.aws/lambda/python:3.12-x86_64
COPY aws-lambda-rie /var/rapid/aws-lambda-rie
COPY opt/ /opt/
EOF
out=$(DOCKER_BUILDKIT=0 docker build -q -t "$img" "$ctx" 2>&1) || {
	printf '%s\n' "$out" >&2
	exit 1
}

docker run -d --name "$name" -p "127.0.0.1:$port:8080" \
	--entrypoint /var/rapid/aws-lambda-rie "$img" /opt/bootstrap >/dev/null

# The published port accepts connections before the RIE listens: retry the invoke (<= 10 s).
want='{"echo":{"x":1},"layer":"from layer \"B\""}'
got=""
for ((i = 0; i < 100; i++)); do
	got=$(curl -sf -XPOST "http://127.0.0.1:$port/2015-03-31/functions/function/invocations" \
		-d '{"x":1}' 2>/dev/null) && break
	sleep 0.1
done
if [ "$got" != "$want" ]; then
	echo "rie-smoke: got '$got', want '$want'" >&2
	docker logs "$name" >&2 || true
	exit 1
fi
echo "$got"
