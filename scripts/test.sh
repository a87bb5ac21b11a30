#!/usr/bin/env bash
# Runs every check of lambda-imaged against real parts (design.md §7), as root:
#
#   bash scripts/test.sh
#
# 1. scripts/test-env.sh: packages, the private dockerd, the RIE and the stand-in base images
#    (state dir $LAMBDA_IMAGED_TEST_DIR, default /tmp/lambda-imaged-test; left running for the
#    next run: `scripts/test-env.sh stop` stops it).
# 2. cargo fmt --check
# 3. cargo clippy --all-targets --locked -- -D warnings
# 4. cargo nextest run --locked --no-fail-fast   (+ cargo test --doc --locked: nextest runs no
#    doctests), or cargo test --locked --no-fail-fast when cargo-nextest is not installed.
# Stops at the first stage that fails; the exit status is that stage's (non-zero).
# Extra arguments go to the test runner, e.g. `bash scripts/test.sh build_` (a filter).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

T0=$SECONDS
STAGE_T0=$SECONDS
STAGE=""

stage() {
	STAGE=$1
	STAGE_T0=$SECONDS
	printf '\n==> %s\n' "$STAGE"
}
passed() { printf -- '--> ok: %s (%ss)\n' "$STAGE" "$((SECONDS - STAGE_T0))"; }
fail() {
	local rc=$1
	shift
	printf '\n--> FAILED (exit %s): %s (%ss)\n' "$rc" "$STAGE" "$((SECONDS - STAGE_T0))" >&2
	[ $# -eq 0 ] || printf 'test.sh: %s\n' "$*" >&2
	exit "$rc"
}
# Runs one stage's command; a failure ends the script with its exit status.
run() {
	local rc=0
	"$@" || rc=$?
	[ "$rc" -eq 0 ] || fail "$rc"
}
# Like run, keeping a copy of the output in $LOG for the closing count.
LOGDIR=$(mktemp -d)
trap 'rm -rf "$LOGDIR"' EXIT
run_logged() {
	local log=$1 rc=0
	shift
	"$@" 2>&1 | tee "$LOGDIR/$log" || rc=${PIPESTATUS[0]}
	[ "$rc" -eq 0 ] || fail "$rc"
}
PASSED=0
count() { # count FILE REGEX [GROUP]: adds the number REGEX captures (sed -E; group 1 by default)
	local n
	n=$(sed -nE "s/$2/\\${3:-1}/p" "$LOGDIR/$1" | tail -n1)
	PASSED=$((PASSED + ${n:-0}))
}

[ "$(id -u)" -eq 0 ] || {
	echo "test.sh: run as root (it installs packages and starts a private dockerd)" >&2
	exit 1
}

# ---------------------------------------------------------------- toolchain
stage "toolchain"
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
	export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || fail 1 "cargo not found: install Rust first, e.g.
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y && . \"\$HOME/.cargo/env\""
if ! command -v cc >/dev/null; then
	echo "installing a C linker (gcc, libc6-dev)"
	export DEBIAN_FRONTEND=noninteractive
	apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null || fail $? "apt-get update failed"
	apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends gcc libc6-dev >/dev/null ||
		fail $? "apt-get install gcc libc6-dev failed"
fi
# rustfmt and clippy: add them only if missing (rustup needs the network for that).
for component in fmt clippy; do
	if ! cargo "$component" --version >/dev/null 2>&1; then
		name=$([ "$component" = fmt ] && echo rustfmt || echo clippy)
		command -v rustup >/dev/null || fail 1 "cargo $component is missing and there is no rustup to add $name"
		echo "adding the $name component (rustup component add $name)"
		rustup component add "$name" || fail $? "rustup component add $name failed (offline?)"
		cargo "$component" --version >/dev/null 2>&1 || fail 1 "cargo $component still does not run"
	fi
done
if cargo nextest --version >/dev/null 2>&1; then NEXTEST=1; else NEXTEST=""; fi
echo "$(cargo --version); $(cargo fmt --version); $(cargo clippy --version)"
echo "test runner: $([ -n "$NEXTEST" ] && cargo nextest --version 2>/dev/null | head -n1 || echo 'cargo test (cargo-nextest not installed)')"
passed

# ---------------------------------------------------------------- test environment
stage "test environment (scripts/test-env.sh, state dir ${LAMBDA_IMAGED_TEST_DIR:-/tmp/lambda-imaged-test})"
rc=0
env_lines=$(scripts/test-env.sh) || rc=$?
[ "$rc" -eq 0 ] || fail "$rc" "scripts/test-env.sh failed (see above)"
eval "$env_lines"
export DOCKER_HOST LAMBDA_IMAGED_TEST_DIR LAMBDA_IMAGED_RIE_DIR
if [ -z "${DOCKER_HOST:-}" ] || [ -z "${LAMBDA_IMAGED_RIE_DIR:-}" ]; then
	fail 1 "scripts/test-env.sh did not print DOCKER_HOST and LAMBDA_IMAGED_RIE_DIR"
fi
printf '%s\n' "$env_lines"
passed

# ---------------------------------------------------------------- checks
stage "cargo fmt --check"
run cargo fmt --check
passed

stage "cargo clippy --all-targets --locked -- -D warnings"
run cargo clippy --all-targets --locked -- -D warnings
passed

if [ -n "$NEXTEST" ]; then
	stage "cargo nextest run --locked --no-fail-fast $*"
	run_logged nextest cargo nextest run --locked --no-fail-fast "$@"
	count nextest '.*Summary .* ([0-9]+) tests run: ([0-9]+) passed.*' 2
	passed

	stage "cargo test --doc --locked"
	run_logged doc cargo test --doc --locked
	count doc '^test result: ok\. ([0-9]+) passed.*'
	passed
else
	stage "cargo test --locked --no-fail-fast $*"
	run cargo test --locked --no-fail-fast "$@"
	passed
fi

# The Python client and the AWS SAM CLI integration (issue 8): pinned SAM in a venv, the real
# daemon, the private engine. Skipped only when a test filter was given for the Rust tests.
if [ $# -eq 0 ]; then
	stage "clients/python/run-tests.sh (Python client + AWS SAM CLI integration)"
	run_logged pytest bash clients/python/run-tests.sh
	count pytest '^=*? *([0-9]+) passed.*'
	passed
fi

printf '\ntest.sh: all stages passed in %ss\n' "$((SECONDS - T0))"
# The plain closing count (every stage above stops the script on a failure).
printf '%s passed, 0 failed\n' "$PASSED"
