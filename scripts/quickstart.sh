#!/usr/bin/env bash
# Quick start for lambda-imaged on a fresh Debian machine (as root): from nothing to a Lambda
# function answering through the real AWS Lambda RIE, in one command.
#
#   bash scripts/quickstart.sh
#
# 0. the Rust toolchain: Cargo.toml's rust-version (1.89: the locked zip crate needs it) or newer, via rustup,
#    checked before anything is installed.
# 1. scripts/test-env.sh engine: packages, a private dockerd, the RIE binaries and busybox stand-ins
#    for the public.ecr.aws/lambda/* base images (the internet's images are not needed). Its
#    state dir is $LAMBDA_IMAGED_TEST_DIR (default /tmp/lambda-imaged-quickstart, apart from
#    the tests' /tmp/lambda-imaged-test).
# 2. cargo build --release --locked --bins
# 3. lambda-imaged on a temporary socket and cache dir (log: $LAMBDA_IMAGED_TEST_DIR/lambda-imaged.log)
# 4. lambda-imagectl build --runtime python3.12 --layer fn=<dir with bootstrap + message.txt>,
#    twice: the second one is answered from the cache ("... is up to date").
# 5. docker run the image like SAM does (--entrypoint /var/rapid/aws-lambda-rie), invoke it with
#    curl and check the answer.
# On exit (success or not) the container, the daemon and the temporary files are removed, and
# if this script started the private dockerd it is stopped, with the registry beside it and the
# bridge test-env.sh created for it (set LAMBDA_IMAGED_KEEP_ENGINE=1 to keep them). The state
# dir stays, as a cache for the next run. Exit status 0 only if the function answered as expected.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export LAMBDA_IMAGED_TEST_DIR=${LAMBDA_IMAGED_TEST_DIR:-/tmp/lambda-imaged-quickstart}
D=$LAMBDA_IMAGED_TEST_DIR
DAEMON_LOG="$D/lambda-imaged.log"
HEALTH_WAIT_SECS=60
INVOKE_WAIT_SECS=30

T0=$SECONDS
WORK=""
DAEMON_PID=""
CONTAINER=""
ENGINE_STARTED=""
DONE=""

step() { printf '\n==> [%3ss] %s\n' "$((SECONDS - T0))" "$*"; }
die() {
	echo >&2
	echo "quickstart: FAILED: $*" >&2
	exit 1
}

cleanup() {
	local rc=$? i
	trap - EXIT INT TERM
	set +e
	if [ -n "$CONTAINER" ]; then
		docker rm -f "$CONTAINER" >/dev/null 2>&1
	fi
	if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
		kill -TERM "$DAEMON_PID" 2>/dev/null
		for ((i = 0; i < 300; i++)); do
			kill -0 "$DAEMON_PID" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$DAEMON_PID" 2>/dev/null; then
			echo "quickstart: lambda-imaged $DAEMON_PID did not stop within 30 s of SIGTERM; killing it" >&2
			kill -KILL "$DAEMON_PID" 2>/dev/null
		fi
		wait "$DAEMON_PID" 2>/dev/null
	fi
	if [ "$rc" -ne 0 ] && [ -f "$DAEMON_LOG" ] && [ -n "$DAEMON_PID" ]; then
		echo "--- tail of the daemon log $DAEMON_LOG" >&2
		tail -n 30 "$DAEMON_LOG" >&2
	fi
	[ -z "$WORK" ] || rm -rf "$WORK"
	if [ -n "$ENGINE_STARTED" ]; then
		if [ -n "${LAMBDA_IMAGED_KEEP_ENGINE:-}" ]; then
			echo "quickstart: leaving the private dockerd running (DOCKER_HOST=unix://$D/docker.sock;" \
				"stop it with: LAMBDA_IMAGED_TEST_DIR=$D scripts/test-env.sh stop)"
		else
			LAMBDA_IMAGED_TEST_DIR=$D "$ROOT/scripts/test-env.sh" stop ||
				echo "quickstart: stopping the private dockerd failed" >&2
		fi
	fi
	if [ -z "$DONE" ] && [ "$rc" -eq 0 ]; then
		rc=1
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'echo "quickstart: interrupted" >&2; exit 130' INT
trap 'echo "quickstart: terminated" >&2; exit 143' TERM

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts a private dockerd)"

# ---------------------------------------------------------------- toolchain
# Before anything is installed: an old cargo would fail only after minutes of set-up.
# (rustup's ~/.cargo/bin comes first, as its env script does, ahead of Debian's /usr/bin/cargo.)
RUST_MIN=$(sed -nE 's/^rust-version *= *"([0-9.]+)".*/\1/p' Cargo.toml)
[ -n "$RUST_MIN" ] || die "Cargo.toml has no rust-version"
if [ -x "$HOME/.cargo/bin/cargo" ] && [[ ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
	export PATH="$HOME/.cargo/bin:$PATH"
fi
RUST_HELP="install Rust $RUST_MIN or newer with rustup (Debian bookworm's cargo and rustc packages, 1.65/1.63, are too old for edition 2024); rustup needs ca-certificates and curl:
  apt-get install -y ca-certificates curl
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y && . \"\$HOME/.cargo/env\""
for tool in cargo rustc; do
	command -v "$tool" >/dev/null || die "$tool not found: $RUST_HELP"
	version=$("$tool" --version | awk '{ print $2 }') # "1.95.0", "1.96.0-nightly"
	version=${version%%-*}
	if [ "$(printf '%s\n%s\n' "$RUST_MIN" "$version" | sort -V | head -n1)" != "$RUST_MIN" ]; then
		die "$(command -v "$tool") is $version, older than $RUST_MIN (Cargo.toml rust-version): $RUST_HELP"
	fi
done
echo "toolchain: $(cargo --version), $(rustc --version) (needs $RUST_MIN or newer)"
if ! command -v cc >/dev/null; then
	step "installing a C linker (gcc, libc6-dev)"
	export DEBIAN_FRONTEND=noninteractive
	apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null ||
		die "apt-get update failed"
	apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends gcc libc6-dev >/dev/null ||
		die "apt-get install gcc libc6-dev failed"
fi

# ---------------------------------------------------------------- engine, RIE, base images
step "preparing the engine, the RIE and the base images (scripts/test-env.sh, state dir $D)"
if ! LAMBDA_IMAGED_TEST_DIR=$D scripts/test-env.sh status; then
	ENGINE_STARTED=1 # (set before starting, so that a half-started one is stopped as well)
fi
# `engine`: only what a build and an invoke need (no registry, Podman, Node or gRPC tools).
env_lines=$(LAMBDA_IMAGED_TEST_DIR=$D scripts/test-env.sh engine) ||
	die "scripts/test-env.sh engine failed (see above)"
eval "$env_lines"
if [ -z "${DOCKER_HOST:-}" ] || [ -z "${LAMBDA_IMAGED_RIE_DIR:-}" ]; then
	die "scripts/test-env.sh did not print DOCKER_HOST and LAMBDA_IMAGED_RIE_DIR"
fi
echo "engine: DOCKER_HOST=$DOCKER_HOST ($(docker version -f '{{.Server.Version}}' 2>/dev/null || echo '?'))$([ -n "$ENGINE_STARTED" ] && echo ', started for this run')"
echo "RIE:    $LAMBDA_IMAGED_RIE_DIR"

# ---------------------------------------------------------------- build the binaries
step "cargo build --release --locked --bins"
cargo build --release --locked --bins || die "cargo build failed"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
if ! [ -x "$BIN/lambda-imaged" ] || ! [ -x "$BIN/lambda-imagectl" ]; then
	die "no lambda-imaged / lambda-imagectl in $BIN"
fi

# ---------------------------------------------------------------- start the daemon
WORK=$(mktemp -d /tmp/lambda-imaged-quickstart.XXXXXX)
SOCK="$WORK/lambda-imaged.sock"
ctl() { "$BIN/lambda-imagectl" --socket "$SOCK" "$@"; }

step "starting lambda-imaged (socket $SOCK, log $DAEMON_LOG)"
mkdir -p "$WORK/cache"
NO_COLOR=1 "$BIN/lambda-imaged" --socket "$SOCK" --cache-dir "$WORK/cache" --rie-dir "$LAMBDA_IMAGED_RIE_DIR" \
	>"$DAEMON_LOG" 2>&1 </dev/null &
DAEMON_PID=$!
health=""
for ((i = 0; i < HEALTH_WAIT_SECS * 4; i++)); do
	kill -0 "$DAEMON_PID" 2>/dev/null || die "lambda-imaged exited during start-up"
	if [ -S "$SOCK" ]; then
		health=$(ctl health 2>/dev/null) && break
	fi
	health=""
	sleep 0.25
done
[ "$health" = SERVING ] ||
	die "lambda-imaged did not report SERVING within ${HEALTH_WAIT_SECS}s (last: '${health:-no answer}'; lambda-imagectl health: $(ctl health 2>&1 || true))"
echo "health: $health (pid $DAEMON_PID)"
ctl info || die "lambda-imagectl info failed"

# ---------------------------------------------------------------- a function layer
LAYER="$WORK/fn"
MESSAGE="Hello from the quickstart layer, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
mkdir -p "$LAYER"
install -m 0755 tests/fixtures/bootstrap "$LAYER/bootstrap"
printf '%s\n' "$MESSAGE" >"$LAYER/message.txt"
BUILD_ARGS=(--runtime python3.12 --layer "fn=$LAYER")

step "lambda-imagectl resolve ${BUILD_ARGS[*]}"
ctl resolve "${BUILD_ARGS[@]}" || die "lambda-imagectl resolve failed"
TAG=$(ctl resolve --json "${BUILD_ARGS[@]}" | jq -er .tag) || die "no tag in lambda-imagectl resolve --json"

# --skip-pull-image, as `sam local invoke --skip-pull-image`: the base is the local busybox
# stand-in, which no registry here can confirm. Without it the daemon would check the base
# against public.ecr.aws in the background (once per --base-check-ttl) and, that registry being
# out of reach, warn `base_unverified` while it serves the local base.
step "lambda-imagectl build --skip-pull-image ${BUILD_ARGS[*]}"
ctl build --skip-pull-image "${BUILD_ARGS[@]}" || die "lambda-imagectl build failed (exit $?)"

step "lambda-imagectl build --skip-pull-image ${BUILD_ARGS[*]}   (again: answered from the cache)"
# (stdout captured, then printed: `tee /dev/stderr` would truncate a log file stderr points at)
out=$(ctl build --skip-pull-image "${BUILD_ARGS[@]}") ||
	die "the second lambda-imagectl build failed (exit $?)"
! grep -q "warning" <<<"$out" || die "the second build warned: $out"
printf '%s\n' "$out"
grep -q "is up to date" <<<"$out" || die "the second build was not reported as up to date: $out"
docker image inspect "$TAG" >/dev/null 2>&1 || die "the engine has no image $TAG"

# ---------------------------------------------------------------- run it and invoke it
step "docker run $TAG through the RIE"
CONTAINER="lambda-imaged-quickstart-$$"
docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
# 127.0.0.1::8080: the engine picks a free host port (no race with a port picked beforehand).
docker run -d --name "$CONTAINER" -p 127.0.0.1::8080 \
	--entrypoint /var/rapid/aws-lambda-rie "$TAG" /opt/bootstrap >/dev/null ||
	die "docker run $TAG failed"
PORT=$(docker port "$CONTAINER" 8080/tcp | head -n1)
PORT=${PORT##*:}
[[ "$PORT" =~ ^[0-9]+$ ]] || die "no host port published for $CONTAINER"
URL="http://127.0.0.1:$PORT/2015-03-31/functions/function/invocations"
EVENT='{"hello":"world"}'
echo "container $CONTAINER, RIE on 127.0.0.1:$PORT"

step "curl -XPOST $URL -d '$EVENT'"
# The published port accepts connections before the RIE listens: retry (bounded).
response=""
for ((i = 0; i < INVOKE_WAIT_SECS * 5; i++)); do
	response=$(curl -sf --max-time 10 -XPOST "$URL" -d "$EVENT" 2>/dev/null) && break
	response=""
	[ "$(docker inspect -f '{{.State.Running}}' "$CONTAINER" 2>/dev/null)" = true ] || break
	sleep 0.2
done
if [ -z "$response" ]; then
	echo "--- docker logs $CONTAINER" >&2
	docker logs "$CONTAINER" >&2 || true
	die "no answer from the function at $URL within ${INVOKE_WAIT_SECS}s"
fi
echo
echo "Function response:"
echo "  $response"
echo
if ! grep -qF "\"layer\":\"$MESSAGE\"" <<<"$response" || ! grep -qF "\"echo\":$EVENT" <<<"$response"; then
	echo "--- docker logs $CONTAINER" >&2
	docker logs "$CONTAINER" >&2 || true
	die "the response does not echo the event and carry the layer's message \"$MESSAGE\""
fi
DONE=1
echo "quickstart: OK in $((SECONDS - T0)) s: lambda-imaged built $TAG, and the function answered with the layer's message."
