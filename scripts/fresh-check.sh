#!/usr/bin/env bash
# The fresh-machine check (issue 20): runs the README's two commands as a newcomer would, from
# a fresh clone of the committed HEAD in a new directory, with an empty cargo home and new state
# directories for the engines, as CI does (CI=true, no stdin). Run it as root before you stop:
#
#   bash scripts/fresh-check.sh [quickstart|test|ci|all]   # default: all (quickstart, then test)
#
# `ci` runs `bash .ci/run` instead of `scripts/test.sh`. Everything it makes is under one new
# directory W (printed first): W/repo (the clone), W/cargo-home, W/state-quickstart,
# W/state-test, W/*.log. Packages apt-get installs stay installed (that is the one cache a
# second run on this machine keeps: the first run on a new machine also installs them). The
# engines the commands start are stopped by the commands themselves (quickstart.sh, .ci/run) or
# here (test.sh leaves them running for the next run); W is removed at the end unless
# LAMBDA_IMAGED_KEEP_FRESH=1 (or a command failed: then it is kept for a look).
# Prints each command's wall time and its closing lines; exit status 0 only if all passed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
what=${1:-all}
case "$what" in quickstart | test | ci | all) ;; *)
	echo "usage: $0 [quickstart|test|ci|all]" >&2
	exit 2
	;;
esac
[ "$(id -u)" -eq 0 ] || {
	echo "fresh-check.sh: run as root (the commands install packages and start engines)" >&2
	exit 1
}

W=$(mktemp -d /tmp/lambda-imaged-fresh.XXXXXX)
# World-traversable like /tmp/lambda-imaged-test (mkdir's default): one test runs a client as
# another user, with the state dir's venv.
chmod 0755 "$W"
echo "fresh-check: working in $W (HEAD $(git -C "$ROOT" rev-parse --short HEAD))"
git clone --quiet "$ROOT" "$W/repo"
mkdir "$W/cargo-home"
rc=0

# run_one NAME STATE-DIR CMD...: one command in the clone, as CI runs it.
run_one() {
	local name=$1 state=$2 t0=$SECONDS one=0
	shift 2
	echo "fresh-check: $name: $* (CARGO_HOME=$W/cargo-home, LAMBDA_IMAGED_TEST_DIR=$state)"
	(cd "$W/repo" && env CI=true CARGO_HOME="$W/cargo-home" LAMBDA_IMAGED_TEST_DIR="$state" \
		"$@" </dev/null >"$W/$name.log" 2>&1) || one=$?
	echo "fresh-check: $name: exit $one after $((SECONDS - t0)) s; its last lines:"
	tail -n 12 "$W/$name.log" | sed 's/^/    /'
	[ "$one" -eq 0 ] || rc=$one
}

if [ "$what" = quickstart ] || [ "$what" = all ]; then
	run_one quickstart "$W/state-quickstart" bash scripts/quickstart.sh
fi
if [ "$what" = test ] || [ "$what" = all ]; then
	run_one test "$W/state-test" bash scripts/test.sh
	LAMBDA_IMAGED_TEST_DIR="$W/state-test" bash "$W/repo/scripts/test-env.sh" stop </dev/null || rc=1
fi
if [ "$what" = ci ]; then
	run_one ci "$W/state-test" bash .ci/run
fi

if [ "$rc" -eq 0 ] && [ -z "${LAMBDA_IMAGED_KEEP_FRESH:-}" ]; then
	# A stopped dockerd can leave its data root mounted on itself: unmount what is under W.
	awk -v w="$W/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
		umount -l "$m" || true
	done
	rm -rf "$W"
	echo "fresh-check: OK (removed $W)"
else
	echo "fresh-check: $([ "$rc" -eq 0 ] && echo OK || echo "FAILED (exit $rc)"); logs kept in $W"
fi
exit "$rc"
