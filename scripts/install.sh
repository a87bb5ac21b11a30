#!/usr/bin/env bash
# Installs lambda-imaged as a systemd service: both binaries, the system and user units, the
# `lambda-imaged` group that may use the socket, and the Lambda RIE. Idempotent: run it again
# to upgrade (then `systemctl restart lambda-imaged.service`).
#
# Usage (as root, from a checkout):
#   scripts/install.sh [--bin-dir DIR] [--no-rie]
#
#   --bin-dir DIR  take prebuilt lambda-imaged and lambda-imagectl from DIR instead of running
#                  `cargo build --release --locked --bins` (e.g. when cargo is not root's)
#   --no-rie       do not fetch the RIE into /var/cache/lambda-imaged/rie (scripts/fetch-rie.sh)
#
# Environment:
#   PREFIX   where binaries and docs go (default /usr/local: $PREFIX/bin, $PREFIX/share/doc);
#            the units' ExecStart= is rewritten to match
#   DESTDIR  stage everything under this directory (packaging); then no group is created and
#            systemctl is not run
#   CARGO    the cargo to build with (default: cargo)
#
# Installs:
#   $PREFIX/bin/lambda-imaged, $PREFIX/bin/lambda-imagectl
#   /etc/systemd/system/lambda-imaged.{service,socket}   (system daemon, group lambda-imaged)
#   /etc/systemd/user/lambda-imaged.{service,socket}     (optional per-user daemon)
#   $PREFIX/share/doc/lambda-imaged/README.md
#   /var/cache/lambda-imaged/rie/aws-lambda-rie-{x86_64,arm64}
# systemctl daemon-reload runs only when systemd is the running init (PID 1).
set -euo pipefail
umask 022

GROUP=lambda-imaged
BINS=(lambda-imaged lambda-imagectl)

die() {
	echo "install.sh: error: $*" >&2
	exit 1
}
say() { echo "install.sh: $*"; }

usage() {
	sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

bin_dir=""
fetch_rie=1
while [ $# -gt 0 ]; do
	case "$1" in
	--bin-dir)
		[ $# -ge 2 ] || die "--bin-dir needs a directory"
		bin_dir=$2
		shift 2
		;;
	--bin-dir=*)
		bin_dir=${1#--bin-dir=}
		shift
		;;
	--no-rie)
		fetch_rie=""
		shift
		;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		usage >&2
		die "unknown argument: $1"
		;;
	esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=${PREFIX:-/usr/local}
PREFIX=${PREFIX%/}
case "$PREFIX" in /*) ;; *) die "PREFIX must be absolute: $PREFIX" ;; esac
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
# PREFIX goes into a sed replacement below.
[[ "$PREFIX" != *[\|\&\\]* ]] || die "PREFIX must not contain | & or a backslash: $PREFIX"

SYSTEM_UNITS=/etc/systemd/system
USER_UNITS=/etc/systemd/user
DOC_DIR=$PREFIX/share/doc/lambda-imaged
CACHE_DIR=/var/cache/lambda-imaged

if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
	die "run as root (or set DESTDIR to stage the files somewhere you can write)"
fi

# ---------------------------------------------------------------- binaries
if [ -z "$bin_dir" ]; then
	cargo=${CARGO:-cargo}
	command -v "$cargo" >/dev/null || die "$cargo not found: install Rust, or pass --bin-dir with prebuilt binaries"
	say "building: $cargo build --release --locked --bins"
	(cd "$REPO" && "$cargo" build --release --locked --bins)
	bin_dir=${CARGO_TARGET_DIR:-$REPO/target}/release
fi
for b in "${BINS[@]}"; do
	if ! [ -f "$bin_dir/$b" ] || ! [ -x "$bin_dir/$b" ]; then
		die "no executable $bin_dir/$b"
	fi
done

# Copies $1 to $2 with mode $3, atomically (a running daemon keeps its old binary).
put() {
	local src=$1 dst=$2 mode=$3 tmp
	mkdir -p "$(dirname "$dst")"
	tmp="$(dirname "$dst")/.$(basename "$dst").install.$$"
	install -m "$mode" "$src" "$tmp"
	mv -f "$tmp" "$dst"
}

for b in "${BINS[@]}"; do
	put "$bin_dir/$b" "$DESTDIR$PREFIX/bin/$b" 0755
done
say "installed ${BINS[*]} into $DESTDIR$PREFIX/bin"

# ---------------------------------------------------------------- units
# The units name /usr/local; rewrite for another PREFIX.
put_unit() {
	local src=$1 dst=$2 tmp
	tmp=$(mktemp)
	sed -e "s|/usr/local/bin/|$PREFIX/bin/|g" -e "s|/usr/local/share/doc/|$PREFIX/share/doc/|g" "$src" >"$tmp"
	put "$tmp" "$dst" 0644
	rm -f "$tmp"
}

for u in lambda-imaged.service lambda-imaged.socket; do
	put_unit "$REPO/systemd/$u" "$DESTDIR$SYSTEM_UNITS/$u"
	put_unit "$REPO/systemd/user/$u" "$DESTDIR$USER_UNITS/$u"
done
say "installed units into $DESTDIR$SYSTEM_UNITS and $DESTDIR$USER_UNITS"

if [ -f "$REPO/README.md" ]; then
	put "$REPO/README.md" "$DESTDIR$DOC_DIR/README.md" 0644
else
	put "$REPO/systemd/README.md" "$DESTDIR$DOC_DIR/README.md" 0644
fi

# ---------------------------------------------------------------- group
if [ -n "$DESTDIR" ]; then
	say "DESTDIR set: not creating the $GROUP group (create it on the target: groupadd --system $GROUP)"
elif getent group "$GROUP" >/dev/null; then
	say "group $GROUP exists"
else
	command -v groupadd >/dev/null || die "groupadd not found: create the system group $GROUP yourself"
	groupadd --system "$GROUP"
	say "created system group $GROUP"
fi

# ---------------------------------------------------------------- RIE
mkdir -p "$DESTDIR$CACHE_DIR"
chmod 0755 "$DESTDIR$CACHE_DIR"
if [ -n "$fetch_rie" ]; then
	"$REPO/scripts/fetch-rie.sh" "$DESTDIR$CACHE_DIR/rie" ||
		die "fetching the RIE failed; retry, or pass --no-rie and run scripts/fetch-rie.sh $CACHE_DIR/rie later"
else
	say "--no-rie: run scripts/fetch-rie.sh $CACHE_DIR/rie before the first build"
fi

# ---------------------------------------------------------------- systemd
if [ -z "$DESTDIR" ] && command -v systemd-analyze >/dev/null; then
	systemd-analyze verify --man=no --recursive-errors=no \
		"$SYSTEM_UNITS/lambda-imaged.socket" "$SYSTEM_UNITS/lambda-imaged.service" ||
		die "systemd-analyze verify rejects the installed units"
fi

# sd_booted(): systemd is the running init exactly when /run/systemd/system exists.
if [ -n "$DESTDIR" ]; then
	say "DESTDIR set: not running systemctl"
elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
	systemctl daemon-reload
	cat <<-EOF
		install.sh: done. Start the daemon (on first connection) and at every boot:
		    systemctl enable --now lambda-imaged.socket
		  Let a user build images (as powerful as the docker group!):
		    usermod -aG $GROUP USER        # then log in again
		  After an upgrade:
		    systemctl restart lambda-imaged.service
		  Per-user daemon instead, as that user:
		    systemctl --user enable --now lambda-imaged.socket
	EOF
	if systemctl is-active --quiet lambda-imaged.service; then
		say "lambda-imaged.service is running the old binary: systemctl restart lambda-imaged.service"
	fi
else
	say "systemd is not the running init (PID 1 is $(cat /proc/1/comm 2>/dev/null || echo unknown)): skipped systemctl daemon-reload"
	say "on a systemd machine: systemctl daemon-reload && systemctl enable --now lambda-imaged.socket"
fi
