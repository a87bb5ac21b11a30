#!/usr/bin/env bash
# Test environment for lambda-imaged: a private dockerd, the real Lambda RIE binaries and a
# busybox stand-in for the public.ecr.aws/lambda/* base images (design.md §7).
#
# Usage (as root):
#   eval "$(scripts/test-env.sh)"     # prepare (idempotent) and print `export` lines
#   scripts/test-env.sh engine        # the same, with only what a build and an invoke need
#                                     # (the quickstart's: no registry, Podman, Node, gRPC tools)
#   . "$LAMBDA_IMAGED_TEST_DIR/env"   # the same lines, written to a file
#   scripts/test-env.sh stop          # stop the private dockerd and registry this script
#                                     # started, and remove the bridge it created (if any);
#                                     # also the tests' second engine (engine-b) and its bridge
#   scripts/test-env.sh status        # exit 0 if the private dockerd answers
#
# State dir D = ${LAMBDA_IMAGED_TEST_DIR:-/tmp/lambda-imaged-test}:
#   docker.sock  dockerd.pid  dockerd.log  data/  exec/   private dockerd
#   wheel/       the aws-sam-cli wheel (pinned, sha256-checked)
#   rie/         aws-lambda-rie-x86_64, aws-lambda-rie-arm64 (0755, sha256-checked)
#   env          export lines: DOCKER_HOST, LAMBDA_IMAGED_TEST_DIR, LAMBDA_IMAGED_RIE_DIR
#   bridge.created  the bridge / address created for our dockerd (removed by `stop`)
#
# Only the export lines go to stdout; everything else is quiet unless something fails.
# /var/run/docker.sock and any other engine are never touched. If another dockerd is
# running, ours gets its own bridge (limg-<hash of D>) and --iptables=false (design.md §7).
set -euo pipefail

D=${LAMBDA_IMAGED_TEST_DIR:-/tmp/lambda-imaged-test}
SOCK="$D/docker.sock"
PIDFILE="$D/dockerd.pid"
LOG="$D/dockerd.log"
RIE_DIR="$D/rie"

# The RIE comes from the aws-sam-cli wheel (samcli/local/rapid/). Bump all four together.
SAM_CLI_VERSION=1.170.0
SAM_CLI_WHEEL=aws_sam_cli-${SAM_CLI_VERSION}-py3-none-any.whl
SAM_CLI_WHEEL_SHA256=24ebaf5ecba38dc1758089968cb89ab61e124b84e92a344fc7a2771a47f4d0bf
RIE_X86_64_SHA256=6b1e686e62ab2baf5759c412c4864276ef2a88b094fca53ec070637ccba9b9a5
RIE_ARM64_SHA256=ec2e5d09633d853834c008b1ef264bf834b258a94d551d2b2074966494b39a21

# Stand-in base image. Bump BASE_RECIPE when the rootfs/import recipe below changes.
BASE_IMAGE=lambda-base:busybox
BASE_RECIPE=2
BASE_LABEL=io.lambda-imaged.test-base

# Bridge used only when another dockerd is running on this machine: one per state dir
# (name from a hash of D), on a free 172.31.X.0/24. Both can be overridden.
D_HASH=$(printf '%s' "$D" | sha256sum | cut -c1-8)
ALT_BRIDGE=${LAMBDA_IMAGED_TEST_BRIDGE:-limg-$D_HASH}
ALT_BRIDGE_CIDR=${LAMBDA_IMAGED_TEST_BRIDGE_CIDR:-}

DOCKER_WAIT_SECS=60
# What start_daemon added to the host's network, one line each: "link NAME" (a bridge it
# created) or "addr NAME CIDR" (an address it put on a bridge that already existed).
BRIDGE_RECORD="$D/bridge.created"

die() {
	echo "test-env.sh: error: $*" >&2
	exit 1
}
note() { [ -z "${LAMBDA_IMAGED_TEST_VERBOSE:-}" ] || echo "test-env.sh: $*" >&2; }

# Run a command quietly; on failure show its output and die.
quiet() {
	local out
	if ! out=$("$@" 2>&1); then
		printf '%s\n' "$out" >&2
		die "command failed: $*"
	fi
}

unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH

dk() { docker -H "unix://$SOCK" "$@"; }

# pid from pidfile $1 (default: ours) if it is a live dockerd started with it, else empty.
our_pid() {
	local pid pidfile=${1:-$PIDFILE}
	[ -s "$pidfile" ] || return 0
	pid=$(cat "$pidfile" 2>/dev/null) || return 0
	[[ "$pid" =~ ^[0-9]+$ ]] || return 0
	[ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 0
	# A stale pidfile must never name some other engine's dockerd.
	tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--pidfile $pidfile " || return 0
	echo "$pid"
}

answering() { [ -S "$SOCK" ] && timeout 10 docker -H "unix://$SOCK" version >/dev/null 2>&1; }

# True while process $1 runs: it exists and is not a zombie. A dockerd that exited but whose
# parent does not reap it (a CI container whose first process reaps nothing) stays in /proc in
# state Z (proc(5), /proc/<pid>/stat field 3) and holds nothing: it has stopped.
running() {
	local stat state
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	state=${stat##*) } # field 2, the command name, is in parentheses and may hold spaces
	state=${state%% *}
	[ "$state" != Z ] && [ "$state" != X ]
}

# Stops dockerd $1: SIGTERM, up to 45 s (it stops its containers, up to 15 s each in
# parallel, then containerd), then SIGKILL. Dies if it survives that.
end_dockerd() {
	local pid=$1 i
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 450; i++)); do
		running "$pid" || break
		sleep 0.1
	done
	if running "$pid"; then
		echo "test-env.sh: dockerd $pid did not stop in 45 s; sending SIGKILL" >&2
		kill -KILL "$pid" 2>/dev/null || true
		for ((i = 0; i < 100; i++)); do
			running "$pid" || break
			sleep 0.1
		done
	fi
	running "$pid" && die "dockerd $pid survived SIGKILL for 10 s; not removing its bridge"
	return 0
}

stop_daemon() {
	local pid
	pid=$(our_pid)
	if [ -z "$pid" ]; then
		note "no private dockerd running (pidfile $PIDFILE)"
	else
		end_dockerd "$pid"
	fi
	rm -f "$PIDFILE"
	remove_bridge
}

# The second engine that tests/support/dockerd.rs starts for the fleet and restart tests, in
# $D/engine-b with its own bridge (the name is BRIDGE there), which it created. The bridge
# goes too, unless some dockerd still runs on it (another state dir's second engine).
SECOND_PIDFILE="${D%/}/engine-b/dockerd.pid"
SECOND_BRIDGE=limg-fleet-b
stop_second_engine() {
	local pid
	pid=$(our_pid "$SECOND_PIDFILE")
	[ -z "$pid" ] || end_dockerd "$pid"
	rm -f "$SECOND_PIDFILE"
	ip link show "$SECOND_BRIDGE" >/dev/null 2>&1 || return 0
	if pgrep -f -- "--bridge $SECOND_BRIDGE" >/dev/null; then
		note "a dockerd still uses bridge $SECOND_BRIDGE; leaving it"
	else
		ip link delete "$SECOND_BRIDGE" type bridge || note "could not delete bridge $SECOND_BRIDGE"
	fi
}

# Removes what start_daemon added to the host's network ($BRIDGE_RECORD), nothing else: a
# bridge or address that existed before is left alone. Called once our dockerd is gone.
remove_bridge() {
	local kind name cidr deleted=" "
	[ -f "$BRIDGE_RECORD" ] || return 0
	if answering; then
		echo "test-env.sh: a dockerd still answers on $SOCK; leaving its bridge ($BRIDGE_RECORD)" >&2
		return 0
	fi
	while read -r kind name cidr; do
		case "$kind" in
		link)
			if ip link show "$name" >/dev/null 2>&1; then
				quiet ip link delete "$name" type bridge
			fi
			deleted+="$name "
			;;
		addr)
			# (deleting a bridge took its addresses with it)
			if [[ "$deleted" != *" $name "* ]] && ip -4 -o addr show dev "$name" 2>/dev/null | grep -qF " $cidr "; then
				quiet ip addr del "$cidr" dev "$name"
			fi
			;;
		esac
	done <"$BRIDGE_RECORD"
	rm -f "$BRIDGE_RECORD"
}

# ---------------------------------------------------------------- packages
# ensure_packages PROFILE: `engine` (a build and an invoke: the quickstart) or `tests` (every
# test's tools as well).
ensure_packages() {
	local profile=$1 want=() missing=() p
	# The engine and the RIE: dockerd, the stand-in base, the wheel (pip) and its unzip; jq and
	# curl for the scripts; ip, flock, pgrep for this one.
	want=(docker.io busybox-static curl unzip jq iproute2 util-linux procps)
	command -v python3 >/dev/null || want+=(python3)
	if ! python3 -m pip --version >/dev/null 2>&1; then
		want+=(python3-venv)
	fi
	if [ "$profile" = tests ]; then
		# systemd: systemd-analyze and systemd-socket-activate for tests/systemd.rs (nothing is
		# started); zip for the layer-fidelity corpus; passwd for the access tests' users.
		want+=(podman zip systemd passwd docker-registry)
		# Node and npm for tests/interop.rs (a @grpc/grpc-js client), unless a Node is installed.
		command -v npm >/dev/null || want+=(nodejs npm)
		# python3-venv for the gRPC tools' and SAM CLI's venvs.
		python3 -c 'import ensurepip' 2>/dev/null || want+=(python3-venv)
	fi
	for p in "${want[@]}"; do
		dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	# shellcheck disable=SC2207
	missing=($(printf '%s\n' "${missing[@]}" | sort -u))
	note "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	quiet apt-get -o DPkg::Lock::Timeout=600 update
	quiet apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${missing[@]}"
}

# ---------------------------------------------------------------- dockerd
another_dockerd() {
	local mine p
	mine=$(our_pid)
	for p in $(pgrep -x dockerd 2>/dev/null || true); do
		[ "$p" = "$mine" ] || return 0
	done
	return 1
}

# First 172.31.X.1/24 (X from the hash of D, then upwards) that no interface or route uses.
free_cidr() {
	local start=$((0x${D_HASH:0:2} % 254 + 1)) i x used
	used=$(ip -4 -o addr show; ip -4 route show)
	for ((i = 0; i < 254; i++)); do
		x=$(((start - 1 + i) % 254 + 1))
		grep -q "172\.31\.$x\." <<<"$used" || {
			echo "172.31.$x.1/24"
			return 0
		}
	done
	die "no free 172.31.X.0/24 for bridge $ALT_BRIDGE (set LAMBDA_IMAGED_TEST_BRIDGE_CIDR)"
}

start_daemon() {
	local args i pid cidr
	if answering; then
		return 0
	fi
	pid=$(our_pid)
	if [ -n "$pid" ]; then
		# Started earlier but not answering yet (or wedged): give it the same bounded wait.
		note "dockerd $pid exists but does not answer yet"
	else
		mkdir -p "$D/data" "$D/exec"
		rm -f "$SOCK" "$PIDFILE" # stale: our dockerd is not running

		args=(--host "unix://$SOCK" --data-root "$D/data" --exec-root "$D/exec" --pidfile "$PIDFILE")
		if another_dockerd; then
			# Sharing docker0 / the DOCKER iptables chains would disturb the other engine.
			# What is created here is written to $BRIDGE_RECORD first, for `stop` to remove.
			if ! ip link show "$ALT_BRIDGE" >/dev/null 2>&1; then
				echo "link $ALT_BRIDGE" >>"$BRIDGE_RECORD"
				quiet ip link add "$ALT_BRIDGE" type bridge
			fi
			if [ -z "$(ip -4 -o addr show dev "$ALT_BRIDGE")" ]; then
				cidr=${ALT_BRIDGE_CIDR:-$(free_cidr)}
				echo "addr $ALT_BRIDGE $cidr" >>"$BRIDGE_RECORD"
				quiet ip addr add "$cidr" dev "$ALT_BRIDGE"
			fi
			quiet ip link set "$ALT_BRIDGE" up
			args+=(--bridge "$ALT_BRIDGE" --iptables=false)
			note "another dockerd is running: using bridge $ALT_BRIDGE, --iptables=false"
		fi
		note "starting dockerd ${args[*]}"
		# setsid: survives the caller's process group being killed; -w keeps $! == its pid's
		# parent alive exactly as long as dockerd. 9>&- : must not inherit the lock.
		nohup setsid -w dockerd "${args[@]}" >>"$LOG" 2>&1 </dev/null 9>&- &
		pid=$!
	fi
	for ((i = 0; i < DOCKER_WAIT_SECS * 4; i++)); do
		answering && return 0
		if ! running "$pid"; then
			echo "--- tail of $LOG" >&2
			tail -n 30 "$LOG" >&2 || true
			die "dockerd exited during start-up"
		fi
		sleep 0.25
	done
	echo "--- tail of $LOG" >&2
	tail -n 30 "$LOG" >&2 || true
	die "dockerd did not answer on $SOCK within ${DOCKER_WAIT_SECS}s"
}

# ---------------------------------------------------------------- RIE
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }


ensure_rie() {
	local whl="$D/wheel/$SAM_CLI_WHEEL" tmp a sum want pip
	if sha_ok "$RIE_DIR/aws-lambda-rie-x86_64" "$RIE_X86_64_SHA256" &&
		sha_ok "$RIE_DIR/aws-lambda-rie-arm64" "$RIE_ARM64_SHA256"; then
		chmod 0755 "$RIE_DIR"/aws-lambda-rie-x86_64 "$RIE_DIR"/aws-lambda-rie-arm64
		return 0
	fi
	mkdir -p "$D/wheel" "$RIE_DIR"
	if ! sha_ok "$whl" "$SAM_CLI_WHEEL_SHA256"; then
		rm -f "$whl"
		if python3 -m pip --version >/dev/null 2>&1; then
			pip=(python3 -m pip)
		else
			[ -x "$D/venv/bin/pip" ] || quiet python3 -m venv "$D/venv"
			pip=("$D/venv/bin/pip")
		fi
		quiet "${pip[@]}" download --quiet --disable-pip-version-check --no-deps \
			--only-binary :all: "aws-sam-cli==$SAM_CLI_VERSION" -d "$D/wheel"
		[ -f "$whl" ] || die "pip did not produce $whl (got: $(ls "$D/wheel"))"
		sum=$(sha256sum "$whl" | cut -d' ' -f1)
		if [ "$sum" != "$SAM_CLI_WHEEL_SHA256" ]; then
			mv "$whl" "$whl.bad"
			die "sha256 mismatch for $SAM_CLI_WHEEL: got $sum, want $SAM_CLI_WHEEL_SHA256 (kept as $whl.bad)"
		fi
	fi
	tmp=$(mktemp -d "$D/rie.tmp.XXXXXX")
	quiet unzip -q -o -j "$whl" samcli/local/rapid/aws-lambda-rie-x86_64 \
		samcli/local/rapid/aws-lambda-rie-arm64 -d "$tmp"
	for a in x86_64 arm64; do
		if [ $a = x86_64 ]; then want=$RIE_X86_64_SHA256; else want=$RIE_ARM64_SHA256; fi
		sum=$(sha256sum "$tmp/aws-lambda-rie-$a" | cut -d' ' -f1)
		if [ "$sum" != "$want" ]; then
			rm -rf "$tmp"
			die "sha256 mismatch for aws-lambda-rie-$a from $SAM_CLI_WHEEL: got $sum, want $want"
		fi
		chmod 0755 "$tmp/aws-lambda-rie-$a"
		mv -f "$tmp/aws-lambda-rie-$a" "$RIE_DIR/aws-lambda-rie-$a"
	done
	rm -rf "$tmp"
}

# ---------------------------------------------------------------- registry
# A real registry on loopback (insecure-allowed by default) for the pull tests.
# The port follows the state dir, so the quickstart's and the tests' environments never share.
REGISTRY=127.0.0.1:${LAMBDA_IMAGED_TEST_REGISTRY_PORT:-$((5100 + 16#${D_HASH:0:4} % 800))}
REGISTRY_PIDFILE=$D/registry.pid
registry_answering() { curl -fsS -m 5 "http://$REGISTRY/v2/" >/dev/null 2>&1; }
ensure_registry() {
	local i
	registry_answering && return 0
	mkdir -p "$D/registry"
	cat >"$D/registry/config.yml" <<-EOF
		version: 0.1
		log:
		  level: warn
		storage:
		  filesystem:
		    rootdirectory: $D/registry/data
		  delete:
		    enabled: true
		http:
		  addr: $REGISTRY
	EOF
	setsid docker-registry serve "$D/registry/config.yml" >"$D/registry/log" 2>&1 </dev/null 9>&- &
	echo $! >"$REGISTRY_PIDFILE"
	for ((i = 0; i < 100; i++)); do
		registry_answering && return 0
		sleep 0.1
	done
	die "docker-registry did not answer on $REGISTRY: $(tail -n 5 "$D/registry/log")"
}
stop_registry() {
	local pid
	pid=$(cat "$REGISTRY_PIDFILE" 2>/dev/null || true)
	if [ -n "$pid" ] && grep -q docker-registry "/proc/$pid/cmdline" 2>/dev/null; then
		kill "$pid" 2>/dev/null || true
	fi
	rm -f "$REGISTRY_PIDFILE"
}

# ---------------------------------------------------------------- python gRPC tools
# tests/service.rs talks to the daemon through reflection with a client we did not write
# (grpcio + grpcio-reflection); it uses $D/venv/bin/python3.
ensure_grpc_python() {
	if [ -x "$D/venv/bin/python3" ] &&
		"$D/venv/bin/python3" -c 'import grpc, grpc_reflection, grpc_health, google.protobuf' 2>/dev/null; then
		return 0
	fi
	[ -x "$D/venv/bin/pip" ] || quiet python3 -m venv "$D/venv"
	quiet "$D/venv/bin/pip" install --quiet --disable-pip-version-check \
		grpcio grpcio-reflection grpcio-health-checking protobuf
}

# ---------------------------------------------------------------- node gRPC client
# tests/interop.rs runs a Node client with default options: @grpc/grpc-js and
# @grpc/proto-loader from npm, in $D/node/node_modules (pinned; bump them together).
GRPC_JS_VERSION=1.14.7
PROTO_LOADER_VERSION=0.8.1
ensure_grpc_node() {
	local have
	have=$(node -e 'process.stdout.write(require(process.argv[1]).version)' \
		"$D/node/node_modules/@grpc/grpc-js/package.json" 2>/dev/null || true)
	[ "$have" = "$GRPC_JS_VERSION" ] && [ -f "$D/node/node_modules/@grpc/proto-loader/package.json" ] &&
		return 0
	mkdir -p "$D/node"
	quiet npm install --prefix "$D/node" --no-audit --no-fund --loglevel=error \
		"@grpc/grpc-js@$GRPC_JS_VERSION" "@grpc/proto-loader@$PROTO_LOADER_VERSION"
}

# ---------------------------------------------------------------- base image
# Every public.ecr.aws/lambda/<name:tag> SAM can ask for (design.md §1), as name:tag without
# the arch suffix; single-arch ones (x86_64 only) are listed in SINGLE_ARCH.
BASE_TAGS=(
	nodejs:16 nodejs:18 nodejs:20 nodejs:22 nodejs:24
	python:3.8 python:3.9 python:3.10 python:3.11 python:3.12 python:3.13 python:3.14
	ruby:3.2 ruby:3.3 ruby:3.4 ruby:4.0
	java:8.al2 java:8.al2023 java:11 java:11.al2023 java:17 java:17.al2023 java:21 java:25
	dotnet:6 dotnet:8 dotnet:10
	provided:al2 provided:al2023
)
SINGLE_ARCH=(go:1 provided:alami)

all_refs() {
	local t
	for t in "${BASE_TAGS[@]}"; do
		echo "public.ecr.aws/lambda/$t-x86_64"
		echo "public.ecr.aws/lambda/$t-arm64"
	done
	for t in "${SINGLE_ARCH[@]}"; do
		echo "public.ecr.aws/lambda/$t"        # design §1: no arch suffix for these
		echo "public.ecr.aws/lambda/$t-x86_64" # cheap extra, in case a test appends it
	done
}

# The entrypoint mirrors the real base images' /lambda-entrypoint.sh: outside Lambda
# (AWS_LAMBDA_RUNTIME_API unset) run the RIE, which finds /var/task/bootstrap,
# /opt/bootstrap or /var/runtime/bootstrap itself; inside, run the bootstrap directly.
# Tests should still pass --entrypoint /var/rapid/aws-lambda-rie, as SAM does.
write_rootfs() {
	local r=$1 a p
	mkdir -p "$r/bin" "$r/sbin" "$r/usr/bin" "$r/usr/sbin" "$r/etc" "$r/root" \
		"$r/var/task" "$r/var/runtime" "$r/var/rapid" "$r/opt" "$r/tmp" "$r/dev" "$r/proc" "$r/sys"
	chmod 1777 "$r/tmp"
	cp /bin/busybox "$r/bin/busybox"
	chmod 0755 "$r/bin/busybox"
	for a in $(/bin/busybox --list); do
		[ "$a" = busybox ] || ln -sf busybox "$r/bin/$a"
	done
	# Also at their usual places (/usr/bin/env, /sbin/ip, ...), for scripts with full paths.
	for p in $(/bin/busybox --list-full); do
		case "$p" in bin/*) continue ;; esac
		[ -e "$r/$p" ] || ln -s /bin/busybox "$r/$p"
	done
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$r/etc/passwd"
	printf 'root:x:0:\nnogroup:x:65534:\n' >"$r/etc/group"
	cat >"$r/lambda-entrypoint.sh" <<-'EOF'
		#!/bin/sh
		if [ -z "${AWS_LAMBDA_RUNTIME_API:-}" ]; then
		    exec /var/rapid/aws-lambda-rie "$@"
		fi
		for b in /var/task/bootstrap /opt/bootstrap /var/runtime/bootstrap; do
		    [ -x "$b" ] && exec "$b" "$@"
		done
		echo "lambda-entrypoint.sh: no bootstrap" >&2
		exit 127
	EOF
	chmod 0755 "$r/lambda-entrypoint.sh"
}

ensure_base() {
	local have tmp
	have=$(dk image inspect -f "{{index .Config.Labels \"$BASE_LABEL\"}}" "$BASE_IMAGE" 2>/dev/null || true)
	if [ "$have" != "$BASE_RECIPE" ]; then
		note "creating $BASE_IMAGE (recipe $BASE_RECIPE)"
		tmp=$(mktemp -d "$D/rootfs.XXXXXX")
		write_rootfs "$tmp"
		if ! tar -C "$tmp" --numeric-owner --owner=0 --group=0 -c . |
			dk import \
				-c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
				-c 'ENV LANG=en_US.UTF-8 TZ=:/etc/localtime' \
				-c 'ENV LAMBDA_TASK_ROOT=/var/task LAMBDA_RUNTIME_DIR=/var/runtime' \
				-c 'WORKDIR /var/task' \
				-c "LABEL $BASE_LABEL=$BASE_RECIPE" \
				-c 'ENTRYPOINT ["/lambda-entrypoint.sh"]' \
				- "$BASE_IMAGE" >/dev/null; then
			rm -rf "$tmp"
			die "docker import of $BASE_IMAGE failed"
		fi
		rm -rf "$tmp"
	fi
	tag_bases "$SOCK"
}

# Tags the stand-in base in the engine on socket file $1 as every public.ecr.aws/lambda ref.
tag_bases() {
	local sock=$1 id want=() ref rid repo tag
	id=$(docker -H "unix://$sock" image inspect -f '{{.Id}}' "$BASE_IMAGE")
	# Tag whatever is missing or points elsewhere, via the API directly (one curl per tag is
	# ~20x cheaper than one docker CLI process per tag).
	declare -A cur=()
	while read -r ref rid; do
		cur[$ref]=$rid
	done < <(docker -H "unix://$sock" image ls --no-trunc --format '{{.Repository}}:{{.Tag}} {{.ID}}' 'public.ecr.aws/lambda/*')
	while read -r ref; do
		[ "${cur[$ref]:-}" = "$id" ] || want+=("$ref")
	done < <(all_refs)
	for ref in "${want[@]}"; do
		repo=${ref%:*}
		tag=${ref##*:}
		curl -fsS --unix-socket "$sock" -X POST \
			"http://localhost/images/$id/tag?repo=$repo&tag=$tag" >/dev/null ||
			die "tagging $BASE_IMAGE as $ref failed ($sock)"
	done
}

# ---------------------------------------------------------------- today's engines (issue 22)
# Docker 26 and 28 beside Debian's 20.10, as private engines: Debian trixie's docker.io 26.1.5
# (+ containerd 1.7) on the containerd image store, and sid's docker.io 28.x (+ containerd 2.x)
# on the containerd store and on the classic one. Their debs are fetched with apt-get from the
# Debian mirror this machine's own apt sources name (a private sources file, lists and cache
# under $D/engines: the system's apt state is not touched) and unpacked with dpkg-deb; nothing
# is installed. Each engine: $D/<name>/{docker.sock,data,exec,dockerd.pid,dockerd.log}, its
# own bridge (never --bridge=none: it deletes docker0), --iptables=false. sid moves: the
# version fetched is recorded in $D/<name>/version and printed; a missing engine fails here.
# name suite store
NEW_ENGINES=(
	"docker26-containerd trixie containerd"
	"docker28-containerd sid containerd"
	"docker28-classic sid classic"
)

# The Debian mirror of this machine's apt sources (deb822 or one-line format).
debian_mirror() {
	local uri
	uri=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
	[ -n "$uri" ] || uri=$(awk '$1 == "deb" && $0 ~ /debian/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' \
		/etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
	[ -n "$uri" ] || die "no Debian mirror in /etc/apt/sources.list*: cannot fetch the newer engines"
	echo "$uri"
}

# Unpacks suite $1's docker.io and containerd into $D/engines/$1/root (once).
ensure_engine_debs() {
	local suite=$1 dir="$D/engines/$1" apt f
	[ -x "$dir/root/usr/sbin/dockerd" ] && [ -x "$dir/root/usr/bin/containerd" ] && return 0
	rm -rf "$dir"
	mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/debs" "$dir/root"
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(debian_mirror) $suite main" >"$dir/sources.list"
	apt=(apt-get -q -o "Dir::Etc::sourcelist=$dir/sources.list" -o Dir::Etc::sourceparts=-
		-o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o APT::Sandbox::User=root)
	quiet "${apt[@]}" update
	(cd "$dir/debs" && quiet "${apt[@]}" download docker.io containerd)
	for f in "$dir"/debs/*.deb; do
		quiet dpkg-deb -x "$f" "$dir/root"
	done
	[ -x "$dir/root/usr/sbin/dockerd" ] || die "no dockerd in $suite's docker.io"
}

# Starts engine $1 (suite $2, store $3) if it does not answer; prints nothing.
start_new_engine() {
	local name=$1 suite=$2 store=$3 dir="$D/$1" sock pid bridge cidr i
	sock="$dir/docker.sock"
	if [ -S "$sock" ] && timeout 10 docker -H "unix://$sock" version >/dev/null 2>&1; then
		return 0
	fi
	ensure_engine_debs "$suite"
	mkdir -p "$dir/data" "$dir/exec"
	pid=$(our_pid "$dir/dockerd.pid")
	[ -z "$pid" ] || end_dockerd "$pid"
	# (a containerd pidfile left by a killed engine would make the new one wait for it)
	rm -f "$sock" "$dir/dockerd.pid" "$dir/exec/containerd/containerd.pid"
	bridge="limg-${D_HASH:0:4}-${name:6:2}${store:0:2}"
	if ! ip link show "$bridge" >/dev/null 2>&1; then
		echo "$bridge" >"$dir/bridge.created"
		quiet ip link add "$bridge" type bridge
		cidr=$(free_cidr)
		quiet ip addr add "$cidr" dev "$bridge"
	fi
	quiet ip link set "$bridge" up
	if [ "$store" = containerd ]; then
		echo '{"features": {"containerd-snapshotter": true}}' >"$dir/daemon.json"
	else
		echo '{"features": {"containerd-snapshotter": false}}' >"$dir/daemon.json"
	fi
	# dockerd starts its own containerd (and shims) from PATH: the suite's first.
	PATH="$D/engines/$suite/root/usr/bin:$D/engines/$suite/root/usr/sbin:$PATH" \
		nohup setsid -w dockerd --host "unix://$sock" --data-root "$dir/data" --exec-root "$dir/exec" \
		--pidfile "$dir/dockerd.pid" --config-file "$dir/daemon.json" --bridge "$bridge" \
		--iptables=false --ip6tables=false >>"$dir/dockerd.log" 2>&1 </dev/null 9>&- &
	pid=$!
	for ((i = 0; i < DOCKER_WAIT_SECS * 4; i++)); do
		if timeout 10 docker -H "unix://$sock" version >/dev/null 2>&1; then
			docker -H "unix://$sock" version -f '{{.Server.Version}}' >"$dir/version"
			return 0
		fi
		if ! running "$pid"; then
			tail -n 30 "$dir/dockerd.log" >&2 || true
			die "$name (dockerd from $suite) exited during start-up"
		fi
		sleep 0.25
	done
	tail -n 30 "$dir/dockerd.log" >&2 || true
	die "$name (dockerd from $suite) did not answer on $sock within ${DOCKER_WAIT_SECS}s"
}

# Every new engine up, with the stand-in bases (copied from our engine: docker save | load).
ensure_new_engines() {
	local spec name suite store sock id
	for spec in "${NEW_ENGINES[@]}"; do
		read -r name suite store <<<"$spec"
		start_new_engine "$name" "$suite" "$store"
		sock="unix://$D/$name/docker.sock"
		id=$(docker -H "$sock" image inspect -f "{{index .Config.Labels \"$BASE_LABEL\"}}" "$BASE_IMAGE" 2>/dev/null || true)
		if [ "$id" != "$BASE_RECIPE" ]; then
			dk save "$BASE_IMAGE" | docker -H "$sock" load >/dev/null ||
				die "loading $BASE_IMAGE into $name failed"
		fi
		tag_bases "$D/$name/docker.sock"
	done
}

stop_new_engines() {
	local spec name dir pid bridge
	for spec in "${NEW_ENGINES[@]}"; do
		read -r name _ _ <<<"$spec"
		dir="$D/$name"
		pid=$(our_pid "$dir/dockerd.pid")
		[ -z "$pid" ] || end_dockerd "$pid"
		rm -f "$dir/dockerd.pid"
		if [ -f "$dir/bridge.created" ]; then
			bridge=$(cat "$dir/bridge.created")
			if ip link show "$bridge" >/dev/null 2>&1; then
				quiet ip link delete "$bridge" type bridge
			fi
			rm -f "$dir/bridge.created"
		fi
	done
}

# The export lines of the new engines: LAMBDA_IMAGED_TEST_ENGINES="name=unix://sock=version ...".
new_engines_env() {
	local spec name list=""
	for spec in "${NEW_ENGINES[@]}"; do
		read -r name _ _ <<<"$spec"
		list+="${list:+ }$name=unix://$D/$name/docker.sock=$(cat "$D/$name/version" 2>/dev/null || echo unknown)"
	done
	echo "export LAMBDA_IMAGED_TEST_ENGINES=\"$list\""
}

# ---------------------------------------------------------------- smoke check
# A container must start and a port published on 127.0.0.1 must answer from the host.
verify_containers() {
	local name="lambda-imaged-test-env-check" port i body=""
	dk rm -f "$name" >/dev/null 2>&1 || true
	quiet dk run -d --name "$name" --entrypoint /bin/sh -p 127.0.0.1::8080 "$BASE_IMAGE" \
		-c 'echo ok >/tmp/index.html && exec httpd -f -p 8080 -h /tmp'
	port=$(dk port "$name" 8080/tcp | head -n1)
	port=${port##*:}
	for ((i = 0; i < 50; i++)); do
		body=$(curl -fsS --max-time 2 "http://127.0.0.1:$port/" 2>/dev/null || true)
		[ "$body" = ok ] && break
		sleep 0.1
	done
	dk rm -f "$name" >/dev/null 2>&1 || true
	if [ "$body" != ok ]; then
		echo "--- tail of $LOG" >&2
		tail -n 20 "$LOG" >&2 || true
		die "a container port published on 127.0.0.1:$port does not answer (bridge/iptables?)"
	fi
}

write_env() {
	local f="$D/env" tmp
	tmp=$(mktemp "$D/env.XXXXXX")
	cat >"$tmp" <<-EOF
		export DOCKER_HOST=unix://$SOCK
		export LAMBDA_IMAGED_TEST_DIR=$D
		export LAMBDA_IMAGED_RIE_DIR=$RIE_DIR
		export LAMBDA_IMAGED_TEST_REGISTRY=$REGISTRY
	EOF
	[ "$1" != tests ] || new_engines_env >>"$tmp"
	chmod 0644 "$tmp"
	mv -f "$tmp" "$f"
	cat "$f"
}

main() {
	local cmd=${1:-up} started=""
	[ "$(id -u)" -eq 0 ] || die "run as root (dockerd, apt-get)"
	case "$D" in /*) ;; *) die "LAMBDA_IMAGED_TEST_DIR must be absolute: $D" ;; esac
	mkdir -p "$D"
	# One instance at a time per state dir (tests may call this in parallel).
	exec 9>"$D/.lock"
	flock 9
	case "$cmd" in
	up | start | "" | engine)
		local profile=tests
		[ "$cmd" != engine ] || profile=engine
		ensure_packages "$profile"
		if ! answering; then
			start_daemon
			started=1
		fi
		ensure_rie
		ensure_base
		if [ "$profile" = tests ]; then
			ensure_grpc_python
			ensure_grpc_node
			ensure_registry
		fi
		# Checked after every start, and on request; a live daemon that answered is trusted.
		if [ -n "$started" ] || [ -n "${LAMBDA_IMAGED_TEST_VERIFY:-}" ]; then
			verify_containers
		fi
		[ "$profile" != tests ] || ensure_new_engines
		write_env "$profile"
		;;
	stop)
		stop_registry
		stop_new_engines
		stop_second_engine
		stop_daemon
		;;
	status) answering ;;
	env) [ -f "$D/env" ] && cat "$D/env" ;;
	*) die "usage: $0 [up|engine|stop|status|env]" ;;
	esac
}

main "$@"
