#!/usr/bin/env bash
# Runs every check of lambda-imaged against real parts (design.md §7), as root:
#
#   bash scripts/test.sh
#
# 0. the Rust toolchain: Cargo.toml's rust-version (1.89: the locked zip crate needs it) or newer, checked
#    before anything is installed.
# 1. scripts/test-env.sh: packages, the private dockerd, the RIE and the stand-in base images
#    (state dir $LAMBDA_IMAGED_TEST_DIR, default /tmp/lambda-imaged-test; left running for the
#    next run: `scripts/test-env.sh stop` stops it).
# 2. cargo fmt --check
# 3. cargo clippy --all-targets --locked -- -D warnings
# 4. cargo fetch --locked (every target's crates: cargo metadata needs them), then
#    cargo deny --offline check licenses bans sources (deny.toml). Advisories are not checked
#    here: CI cannot fetch the RustSec database (deny.toml says how to check them against a
#    snapshot).
# 5. the Rust tests: cargo nextest run --locked --no-fail-fast, then cargo test --doc --locked
#    (nextest runs no doctests); with LAMBDA_IMAGED_TEST_RUNNER=cargo-test,
#    cargo test --locked --no-fail-fast (unit, integration and doctests in one run).
# cargo-deny and cargo-nextest are installed, pinned, when missing (CARGO_*_VERSION below).
# 6. the engine matrix: the engine-dependent suites again on Docker 28.5's and 26.1's
#    containerd image store (MATRIX_* below).
# 7. clients/python/run-tests.sh: the Python client and the AWS SAM CLI integration.
# Stages 0-4 stop the script at their first failure. The test stages (5-7) all run to their
# end even when one fails; then a table gives each stage's passed and failed counts, read from
# the runner's own summary (nextest's "Summary" line, the sum of cargo test's per-binary
# "test result:" lines, pytest's closing line), or says that a stage could not be counted or
# was skipped, and the total. The exit status is the first failing stage's (0 if none failed).
# Extra arguments go to the Rust test runner, e.g. `bash scripts/test.sh build_` (a filter);
# with them, the doctests (on either path) and the Python stage are skipped, and say so.
# LAMBDA_IMAGED_TEST_RUNNER=cargo-test takes the cargo test path even with nextest installed.
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
LOGDIR=$(mktemp -d)
trap 'rm -rf "$LOGDIR"' EXIT

# ---------------------------------------------------------------- counting
# Each test stage adds one line to COUNTS (printed at the end) and its numbers to PASSED and
# FAILED; a stage whose output holds no summary to read is named in UNCOUNTED instead, and a
# stage that did not run in SKIPPED. TEST_RC is the first failing test stage's exit status.
COUNTS=()
PASSED=0
FAILED=0
UNCOUNTED=""
SKIPPED=""
TEST_RC=0

no_colour() { sed 's/\x1b\[[0-9;]*[A-Za-z]//g' "$1"; }

# Each *_counts LOG prints "PASSED FAILED [SKIPPED [GAP]]", or nothing when LOG holds no
# summary; GAP (free text) says what the count leaves out.
# nextest's closing line: "Summary [ 1.2s] 94 tests run: 93 passed, 1 failed, 0 skipped"
# (skipped = filtered out). Every test run that did not pass (failed, timed out, crashed)
# counts as failed.
nextest_counts() {
	local line run passed
	line=$(no_colour "$1" | grep -E '^ *Summary \[.*\] +[0-9]+ tests? run:' | tail -n1 || true)
	[ -n "$line" ] || return 0
	run=$(sed -nE 's/.*\] +([0-9]+) tests? run:.*/\1/p' <<<"$line")
	passed=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$line")
	echo "${passed:-0} $((run - ${passed:-0}))"
}
# cargo test prints one "test result: ok. 5 passed; 0 failed; 1 ignored; ..." per test binary,
# doctests included: their sum. (A binary that crashed or did not build prints none.)
cargo_test_counts() {
	no_colour "$1" | awk '/^test result: / {
		n++
		for (i = 1; i < NF; i++) {
			if ($(i + 1) ~ /^passed;/) p += $i
			if ($(i + 1) ~ /^failed;/) f += $i
		}
	} END { if (n) print p + 0, f + 0 }'
}
# The same, for a cargo test run that should have run the doctests too: says so if it did not.
cargo_test_all_counts() {
	local counts
	counts=$(cargo_test_counts "$1")
	[ -n "$counts" ] || return 0
	if no_colour "$1" | grep -q '^ *Doc-tests '; then
		echo "$counts"
	else
		echo "$counts 0 no doctests ran (cargo printed no Doc-tests section)"
	fi
}
# pytest's closing line, with or without the ='s of the non -q form:
# "1 failed, 30 passed, 2 skipped, 1 error in 95.12s (0:01:35)". Errors count as failed.
pytest_counts() {
	local line
	line=$(no_colour "$1" | grep -E '^=* *(no tests ran|[0-9]+ [a-z]+(, [0-9]+ [a-z]+)*) in [0-9.]+s' | tail -n1 || true)
	[ -n "$line" ] || return 0
	awk '{
		for (i = 1; i < NF; i++) {
			w = $(i + 1); sub(/,$/, "", w)
			if (w == "passed") p += $i
			if (w == "failed" || w == "error" || w == "errors") f += $i
			if (w == "skipped") s += $i
		}
	} END { print p + 0, f + 0, s + 0 }' <<<"$line"
}

# Runs one test stage to its end, keeping its output for the count; never exits.
# test_stage NAME COUNTER CMD...   (NAME: the stage's name in the closing table)
test_stage() {
	local name=$1 counter=$2 log rc=0 counts p f s gap note=""
	shift 2
	stage "$name: $*"
	log=$LOGDIR/stage-${#COUNTS[@]}.log
	"$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
	counts=$("$counter" "$log")
	if [ -z "$counts" ]; then
		UNCOUNTED+="${UNCOUNTED:+, }$name"
		COUNTS+=("$name: not counted: its output holds no summary (exit $rc)")
	else
		read -r p f s gap <<<"$counts"
		PASSED=$((PASSED + p))
		FAILED=$((FAILED + f))
		[ "${s:-0}" -eq 0 ] || note=", $s skipped by the tests themselves"
		if [ -n "$gap" ]; then
			UNCOUNTED+="${UNCOUNTED:+, }$name"
			note+="; $gap"
		elif [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
			# e.g. cargo test: a binary that crashed or did not build reports nothing.
			UNCOUNTED+="${UNCOUNTED:+, }$name"
			note+="; exit $rc with no failed test counted: some tests reported nothing (see above)"
		fi
		COUNTS+=("$name: $p passed, $f failed$note")
	fi
	if [ "$rc" -eq 0 ]; then
		passed
	else
		[ "$TEST_RC" -ne 0 ] || TEST_RC=$rc
		printf '\n--> FAILED (exit %s): %s (%ss); going on with the other test stages\n' \
			"$rc" "$STAGE" "$((SECONDS - STAGE_T0))" >&2
	fi
}
skip_stage() { # skip_stage NAME COMMAND REASON
	SKIPPED+="${SKIPPED:+, }$1"
	COUNTS+=("$1: skipped: $3")
	printf '\n==> %s: %s\n--> skipped: %s\n' "$1" "$2" "$3"
}

[ "$(id -u)" -eq 0 ] || {
	echo "test.sh: run as root (it installs packages and starts a private dockerd)" >&2
	exit 1
}

# ---------------------------------------------------------------- toolchain
stage "toolchain"
# Before anything is installed: an old cargo would fail only after minutes of set-up.
# (rustup's ~/.cargo/bin comes first, as its env script does, ahead of Debian's /usr/bin/cargo.)
RUST_MIN=$(sed -nE 's/^rust-version *= *"([0-9.]+)".*/\1/p' Cargo.toml)
[ -n "$RUST_MIN" ] || fail 1 "Cargo.toml has no rust-version"
if [ -x "$HOME/.cargo/bin/cargo" ] && [[ ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
	export PATH="$HOME/.cargo/bin:$PATH"
fi
RUST_HELP="install Rust $RUST_MIN or newer with rustup (Debian bookworm's cargo and rustc packages, 1.65/1.63, are too old for edition 2024); rustup needs ca-certificates and curl:
  apt-get install -y ca-certificates curl
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y && . \"\$HOME/.cargo/env\""
for tool in cargo rustc; do
	command -v "$tool" >/dev/null || fail 1 "$tool not found: $RUST_HELP"
	version=$("$tool" --version | awk '{ print $2 }') # "1.95.0", "1.96.0-nightly"
	version=${version%%-*}
	if [ "$(printf '%s\n%s\n' "$RUST_MIN" "$version" | sort -V | head -n1)" != "$RUST_MIN" ]; then
		fail 1 "$(command -v "$tool") is $version, older than $RUST_MIN (Cargo.toml rust-version): $RUST_HELP"
	fi
done
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
FORCE_CARGO_TEST=""
case "${LAMBDA_IMAGED_TEST_RUNNER:-}" in
"" | nextest) ;;
cargo-test) FORCE_CARGO_TEST=1 ;;
*) fail 1 "LAMBDA_IMAGED_TEST_RUNNER=${LAMBDA_IMAGED_TEST_RUNNER}: use nextest (the default) or cargo-test" ;;
esac
# The cargo tools the checks use, pinned: installed from crates.io with `cargo install --locked`
# when missing (into $CARGO_HOME/bin, where cargo finds its subcommands), so a fresh machine
# runs what CI runs. Bump them here; a newer one already installed is used as it is.
CARGO_DENY_VERSION=0.20.2    # ~3.5 min to compile on 2 cores
CARGO_NEXTEST_VERSION=0.9.143 # ~4 min; the version CI's machine image ships
# ensure_cargo_tool NAME VERSION: cargo-NAME runs, or is installed at VERSION.
ensure_cargo_tool() {
	local name=$1 version=$2
	if cargo "$name" --version >/dev/null 2>&1; then
		return 0
	fi
	echo "installing cargo-$name $version (cargo install --locked cargo-$name@$version)"
	run cargo install --locked --quiet "cargo-$name@$version"
	cargo "$name" --version >/dev/null 2>&1 || fail 1 "cargo $name does not run after cargo install"
}
# nextest runs each test in a process of its own (a test's memory or signal handlers are its
# own) with the test groups of .config/nextest.toml; cargo test runs one binary's tests as
# threads of one process. Both paths are kept; nextest is the one CI and fresh machines take.
NEXTEST=""
if [ -z "$FORCE_CARGO_TEST" ]; then
	ensure_cargo_tool nextest "$CARGO_NEXTEST_VERSION"
	NEXTEST=1
fi
echo "$(cargo --version); $(cargo fmt --version); $(cargo clippy --version)"
echo "test runner: $([ -n "$NEXTEST" ] && cargo nextest --version 2>/dev/null | head -n1 || echo 'cargo test')"
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

stage "cargo deny --offline check licenses bans sources"
ensure_cargo_tool deny "$CARGO_DENY_VERSION"
# cargo deny reads the graph through `cargo metadata`, which resolves every target's
# dependencies (Windows-only ones too: anstyle-wincon, windows-sys), so a build's downloads are
# not enough. `cargo fetch --locked` downloads every crate Cargo.lock names, for all targets,
# from crates.io; the check itself then runs offline. deny.toml's [graph] targets still limit
# what is checked to the platforms we ship.
run cargo fetch --locked --quiet
# Duplicate versions are warnings (deny.toml); a passing run shows only errors and the verdict.
run cargo deny --offline --log-level error check licenses bans sources
passed

# ---------------------------------------------------------------- tests
if [ -n "$NEXTEST" ]; then
	test_stage "Rust tests (nextest)" nextest_counts cargo nextest run --locked --no-fail-fast "$@"
	if [ $# -eq 0 ]; then
		test_stage "doctests" cargo_test_counts cargo test --doc --locked
	else
		skip_stage "doctests" "cargo test --doc --locked" "a test filter was given (it is nextest's)"
	fi
else
	echo
	echo "test.sh: the Rust tests run under cargo test: cargo-nextest is set aside (LAMBDA_IMAGED_TEST_RUNNER=cargo-test)"
	if [ $# -eq 0 ]; then
		test_stage "Rust tests and doctests (cargo test)" cargo_test_all_counts \
			cargo test --locked --no-fail-fast
	else
		test_stage "Rust tests (cargo test)" cargo_test_counts cargo test --locked --no-fail-fast "$@"
		# (cargo runs no doctests when given a test name filter: rust-lang/cargo#6981)
		skip_stage "doctests" "cargo test" "a test filter was given (cargo test then runs no doctests)"
	fi
fi

# The engine matrix (issue 22): the engine-dependent suites again on Docker's containerd image
# store (the default of Docker 29 and Docker Desktop), Docker 28.5 and 26.1 as test-env.sh
# starts them; tests/engines.rs already ran on every engine in the main stage. Not repeated
# there: fleet and faults (they start or kill a second 20.10 engine of their own), service,
# cli and metrics (no engine-specific path), interop and fidelity (20.10 is their reference).
MATRIX_SUITES=(build assembly dedup image_functions layers bases shared_tag)
MATRIX_ENGINES=(docker28-containerd docker26-containerd)
# The DOCKER_HOST of engine $1 in LAMBDA_IMAGED_TEST_ENGINES ("name=host=version ...").
engine_host() {
	local entry
	for entry in ${LAMBDA_IMAGED_TEST_ENGINES:-}; do
		[ "${entry%%=*}" = "$1" ] || continue
		entry=${entry#*=}
		printf '%s\n' "${entry%%=*}"
		return 0
	done
	return 1
}
for name in "${MATRIX_ENGINES[@]}"; do
	suites=()
	for suite in "${MATRIX_SUITES[@]}"; do suites+=(--test "$suite"); done
	if [ -z "$NEXTEST" ] || [ $# -ne 0 ]; then
		skip_stage "suites on $name" "cargo nextest run ${suites[*]}" \
			"the matrix runs under nextest and without a test filter"
		continue
	fi
	host=$(engine_host "$name") || fail 1 "engine $name is not in LAMBDA_IMAGED_TEST_ENGINES"
	test_stage "suites on $name" nextest_counts \
		env DOCKER_HOST="$host" cargo nextest run --locked --no-fail-fast "${suites[@]}"
done

# The Python client and the AWS SAM CLI integration (issue 8): pinned SAM in a venv, the real
# daemon, the private engine.
PY_STAGE="Python client + SAM CLI"
if [ $# -eq 0 ]; then
	# With the daemon binary of this build, wherever CARGO_TARGET_DIR (or a cargo config) puts it.
	python_tests() {
		local target_dir
		cargo build --locked --bins || return
		target_dir=$(cargo metadata --locked --no-deps --format-version 1 | jq -er .target_directory) ||
			return
		echo "LAMBDA_IMAGED_BIN=$target_dir/debug/lambda-imaged bash clients/python/run-tests.sh"
		LAMBDA_IMAGED_BIN="$target_dir/debug/lambda-imaged" bash clients/python/run-tests.sh
	}
	test_stage "$PY_STAGE" pytest_counts python_tests
else
	skip_stage "$PY_STAGE" "clients/python/run-tests.sh" "a test filter was given (it selects Rust tests only)"
fi

# ---------------------------------------------------------------- counts
printf "\ntest counts (from each runner's own summary):\n"
printf '  %s\n' "${COUNTS[@]}"
total="$PASSED passed, $FAILED failed"
[ -z "$UNCOUNTED" ] || total+="; incomplete: not (fully) counted: $UNCOUNTED"
[ -z "$SKIPPED" ] || total+="; skipped: $SKIPPED"
printf 'total: %s\n' "$total"
if [ "$TEST_RC" -ne 0 ]; then
	printf '\ntest.sh: FAILED (exit %s) after %ss: a test stage failed (see above)\n' "$TEST_RC" "$((SECONDS - T0))" >&2
	exit "$TEST_RC"
fi
printf '\ntest.sh: every stage that ran passed, in %ss%s\n' "$((SECONDS - T0))" "${SKIPPED:+ (some were skipped: see the counts)}"
