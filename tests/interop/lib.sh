# shellcheck shell=bash
# Shared helpers for the interop tests (tests/interop/t-*.sh). Source it first:
#
#     . "$(dirname "$0")/lib.sh"
#
# What it gives a test:
#   - strict mode (set -euo pipefail) and a per-test temp dir $T (mktemp -d, under
#     $INTEROP_TMPROOT or /tmp, i.e. ext4) plus $S, a per-test dir in /dev/shm (under
#     $INTEROP_SHMROOT if set) for backing files where speed matters. Both are
#     removed on exit.
#   - one EXIT trap that undoes everything the test started, in dependency order, even
#     when the test fails or is interrupted: unmount filesystems, detach loop devices,
#     unmount nbdfuse and kill it, kill servers and other helpers, remove temp dirs.
#     Every resource is recorded in $T/.cleanup as soon as it exists, so the runner can
#     replay the same cleanup if the whole test had to be killed (`lib.sh sweep DIR`).
#   - require TOOL...      missing tool: CI=true -> fail; otherwise SKIP, exit 77.
#   - free_port            an unused TCP port on 127.0.0.1.
#   - start_server BACKING [--name EXPORT] [--read-only] [other mirrordisk args]
#                          starts $SERVER (mirrordisk | nbdkit | qemu-nbd) on
#                          127.0.0.1:PORT and a unix socket, waits (bounded) until it
#                          answers, and exports NBD_URI, NBD_SOCK, NBD_UNIX_URI,
#                          NBD_PORT, NBD_EXPORT.
#   - stop_server          stops it (TERM, bounded wait, KILL).
#   - fail MSG / pass MSG / note MSG, check_eq WHAT GOT WANT, nbdinfo_json_get.
#   - track_pid / track_mount / track_loop / track_fuse / track_dir to register more.
#
# The server under test is $SERVER (default mirrordisk, binary $MIRRORDISK, default
# target/release/mirrordisk). nbdkit and qemu-nbd are reference servers: every test is
# validated against them, so a failure against mirrordisk is mirrordisk's.

set -euo pipefail

INTEROP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$INTEROP_DIR/../.." && pwd)
SERVER=${SERVER:-mirrordisk}
MIRRORDISK=${MIRRORDISK:-$REPO_ROOT/target/release/mirrordisk}
# python3-libnbd is a Debian package: use Debian's python, not a pyenv shim on PATH.
PYTHON=${PYTHON:-/usr/bin/python3}
CI=${CI:-false}
SERVER_START_TIMEOUT_S=${SERVER_START_TIMEOUT_S:-10}

_say() { printf '%s\n' "$*" >&2; }
note() { _say "  .. $*"; }
pass() { _say "  ok $*"; }
fail() {
	_say "FAIL [${TEST_NAME:-?}]: $*"
	exit 1
}
check_eq() { # WHAT GOT WANT
	if [ "$2" != "$3" ]; then
		fail "$1: expected '$3', got '$2'"
	fi
	pass "$1 = $3"
}

# ---------------------------------------------------------------------------------
# Cleanup. State lines: "<kind> <arg>", kinds mount|loop|fuse|pid|dir.

# Is PID a live process (not a zombie)? Zombies are our unreaped children: gone.
_alive() {
	local state
	[ -r "/proc/$1/stat" ] || return 1
	state=$(sed -E 's/^.*\) (.).*$/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
	[ "$state" != Z ] && [ "$state" != X ]
}

# Kill one process by id: TERM, wait up to ~5 s, then KILL. Reap it if it is ours.
_kill_pid() {
	local pid=$1 i
	_alive "$pid" || {
		wait "$pid" 2>/dev/null || true
		return 0
	}
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do
		_alive "$pid" || break
		sleep 0.05
	done
	if _alive "$pid"; then
		_say "  .. cleanup: pid $pid ignored SIGTERM for 5 s, sending SIGKILL"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	wait "$pid" 2>/dev/null || true
}

_umount() {
	local m=$1 i
	for ((i = 0; i < 20; i++)); do
		mountpoint -q "$m" 2>/dev/null || return 0
		umount "$m" 2>/dev/null && return 0
		sleep 0.1
	done
	_say "  .. cleanup: umount $m failed, detaching lazily"
	umount -l "$m" 2>/dev/null || true
}

_unfuse() {
	local m=$1 i
	for ((i = 0; i < 20; i++)); do
		mountpoint -q "$m" 2>/dev/null || return 0
		fusermount3 -u "$m" 2>/dev/null && return 0
		sleep 0.1
	done
	_say "  .. cleanup: fusermount3 -u $m failed, detaching lazily"
	fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
}

_unloop() {
	local dev=$1 i
	for ((i = 0; i < 20; i++)); do
		losetup "$dev" >/dev/null 2>&1 || return 0
		losetup -d "$dev" 2>/dev/null && return 0
		sleep 0.1
	done
	_say "  .. cleanup: losetup -d $dev failed"
}

# Undo everything recorded in a state file, in dependency order: a filesystem sits on
# a loop device, which sits on the nbdfuse file, which needs nbdfuse and the server.
cleanup_state() {
	local f=$1 kind arg
	[ -f "$f" ] || return 0
	while read -r kind arg; do [ "$kind" = mount ] && _umount "$arg"; done < <(tac "$f")
	while read -r kind arg; do [ "$kind" = loop ] && _unloop "$arg"; done < <(tac "$f")
	while read -r kind arg; do [ "$kind" = fuse ] && _unfuse "$arg"; done < <(tac "$f")
	while read -r kind arg; do [ "$kind" = pid ] && _kill_pid "$arg"; done < <(tac "$f")
	while read -r kind arg; do
		# The state file lives in one of these dirs; remove dirs last.
		[ "$kind" = dir ] && case "$arg" in /tmp/* | /dev/shm/*) rm -rf -- "$arg" ;; esac
	done < <(tac "$f")
	return 0
}

# `lib.sh sweep DIR...`: the runner replays a killed test's cleanup from its state.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	if [ "${1:-}" = sweep ]; then
		shift
		for d in "$@"; do
			for f in "$d"/*/.cleanup "$d"/.cleanup; do
				[ -f "$f" ] && cleanup_state "$f"
			done
		done
		exit 0
	fi
	echo "usage: lib.sh sweep DIR... (otherwise source it from a test)" >&2
	exit 2
fi

TEST_NAME=${TEST_NAME:-$(basename "$0" .sh)}
if [ -n "${INTEROP_TMPROOT:-}" ]; then
	mkdir -p "$INTEROP_TMPROOT"
	T=$(mktemp -d "$INTEROP_TMPROOT/$TEST_NAME.XXXXXX")
else
	T=$(mktemp -d "/tmp/mirrordisk-$TEST_NAME.XXXXXX")
fi
STATE=$T/.cleanup
echo "dir $T" >"$STATE"
S=$(mktemp -d "${INTEROP_SHMROOT:-/dev/shm}/mirrordisk-$TEST_NAME.XXXXXX")
echo "dir $S" >>"$STATE"

track_pid() { echo "pid $1" >>"$STATE"; }
track_mount() { echo "mount $1" >>"$STATE"; }
track_loop() { echo "loop $1" >>"$STATE"; }
track_fuse() { echo "fuse $1" >>"$STATE"; }
track_dir() { echo "dir $1" >>"$STATE"; }

_on_exit() {
	local rc=$?
	set +e
	trap - EXIT
	if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ]; then
		for log in "$T"/server*.log; do
			[ -s "$log" ] || continue
			_say "---- last lines of $(basename "$log") ($SERVER) ----"
			tail -n 30 "$log" >&2
		done
	fi
	cleanup_state "$STATE"
	exit "$rc"
}
trap _on_exit EXIT
# A signal (the runner's timeout, ^C) must still run the cleanup above.
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

# ---------------------------------------------------------------------------------

require() {
	local missing=() t
	for t in "$@"; do
		case "$t" in
		python3-libnbd)
			"$PYTHON" -c 'import nbd' 2>/dev/null || missing+=("$t")
			;;
		*) command -v "$t" >/dev/null 2>&1 || missing+=("$t") ;;
		esac
	done
	[ "${#missing[@]}" -eq 0 ] && return 0
	if [ "$CI" = true ]; then
		fail "required tool(s) missing: ${missing[*]} (CI=true: a missing tool is a failure; run ./tools/test.sh, which installs them)"
	fi
	_say "################################################################"
	_say "SKIP [$TEST_NAME]: required tool(s) missing: ${missing[*]}"
	_say "################################################################"
	exit 77
}

free_port() {
	"$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# Bounded poll: until CMD succeeds, or TIMEOUT_S elapses (then return 1).
wait_until() { # TIMEOUT_S CMD...
	local timeout_s=$1 deadline
	shift
	deadline=$((SECONDS + timeout_s))
	until "$@"; do
		[ "$SECONDS" -lt "$deadline" ] || return 1
		sleep 0.05
	done
}

_tcp_answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# nbdinfo --json VALUE lookup: nbdinfo_json_get FILE KEY (top level) or
# nbdinfo_json_get FILE export.KEY (first export).
nbdinfo_json_get() {
	"$PYTHON" - "$1" "$2" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
key = sys.argv[2]
if key.startswith("export."):
    d = d["exports"][0]
    key = key[len("export."):]
v = d.get(key, "<absent>")
print(json.dumps(v) if isinstance(v, bool) else v)
EOF
}

SERVER_PIDS=()

# _start_one LOGNAME CMD...: start one server process in the background, record it.
_start_one() {
	local log=$1
	shift
	"$@" </dev/null >>"$T/$log" 2>&1 &
	local pid=$!
	track_pid "$pid"
	SERVER_PIDS+=("$pid")
}

_server_died() {
	local pid
	for pid in "${SERVER_PIDS[@]}"; do
		_alive "$pid" || return 0
	done
	return 1
}

_wait_ready() { # PORT SOCK
	local port=$1 sock=$2 deadline=$((SECONDS + SERVER_START_TIMEOUT_S))
	while :; do
		if _server_died; then return 2; fi
		if _tcp_answers "$port" && [ -S "$sock" ]; then return 0; fi
		[ "$SECONDS" -lt "$deadline" ] || return 1
		sleep 0.05
	done
}

# start_server BACKING [--name EXPORT] [--read-only] [extra mirrordisk args...]
start_server() {
	local backing=$1
	shift
	local export=disk0 ro=false extra=() a
	while [ $# -gt 0 ]; do
		a=$1
		shift
		case "$a" in
		--name)
			export=$1
			shift
			;;
		--name=*) export=${a#--name=} ;;
		--read-only) ro=true ;;
		*) extra+=("$a") ;;
		esac
	done
	[ -e "$backing" ] || fail "start_server: backing file $backing does not exist"
	if [ "$SERVER" != mirrordisk ] && [ "${#extra[@]}" -gt 0 ]; then
		fail "start_server: extra args (${extra[*]}) only make sense for SERVER=mirrordisk"
	fi
	local port sock rc
	for _ in 1 2 3; do
		port=$(free_port)
		_SERVER_STARTS=$((${_SERVER_STARTS:-0} + 1))
		sock=$T/nbd.$_SERVER_STARTS.sock
		SERVER_PIDS=()
		echo "==== start #$_SERVER_STARTS: $SERVER $backing export=$export read-only=$ro" |
			tee -a "$T/server.log" >>"$T/server-unix.log"
		case "$SERVER" in
		mirrordisk)
			[ -x "$MIRRORDISK" ] || fail "server binary $MIRRORDISK not found (run ./tools/test.sh --only build, or set MIRRORDISK=)"
			local args=(serve "$backing" --listen "127.0.0.1:$port" --unix "$sock" --name "$export")
			$ro && args+=(--read-only)
			_start_one server.log "$MIRRORDISK" "${args[@]}" "${extra[@]}"
			;;
		nbdkit)
			# nbdkit 1.32 serves either TCP (-p) or a unix socket (-U) per process, so
			# run two on the same file: the file plugin has no private cache, so both
			# see one page cache and stay coherent. --exit-with-parent: no orphans.
			# The exportname filter makes nbdkit list exactly EXPORT and refuse other
			# names, as mirrordisk does (the bare file plugin accepts any name).
			local common=(--exit-with-parent -f -e "$export" --filter=exportname)
			$ro && common+=(-r)
			local plugin=(file "$backing" exportname="$export" exportname-list=explicit
				exportname-strict=true)
			_start_one server.log nbdkit "${common[@]}" -i 127.0.0.1 -p "$port" "${plugin[@]}"
			_start_one server-unix.log nbdkit "${common[@]}" -U "$sock" "${plugin[@]}"
			;;
		qemu-nbd)
			# Likewise one listener per process; image locking off so two processes
			# can open the file, default cache=writeback (the host page cache, shared).
			# --shared: allow several clients (multi-conn, nbdcopy -C 4).
			local img="driver=raw,file.driver=file,file.filename=$backing,file.locking=off"
			local common=(--image-opts -t -e 16 -x "$export" --discard=unmap)
			$ro && common+=(-r)
			_start_one server.log qemu-nbd "${common[@]}" -b 127.0.0.1 -p "$port" "$img"
			_start_one server-unix.log qemu-nbd "${common[@]}" -k "$sock" "$img"
			;;
		*) fail "unknown SERVER=$SERVER (mirrordisk | nbdkit | qemu-nbd)" ;;
		esac
		rc=0
		_wait_ready "$port" "$sock" || rc=$?
		if [ "$rc" -eq 0 ]; then
			NBD_PORT=$port
			NBD_SOCK=$sock
			NBD_EXPORT=$export
			NBD_URI="nbd://127.0.0.1:$port/$export"
			NBD_UNIX_URI="nbd+unix:///$export?socket=$sock"
			export NBD_PORT NBD_SOCK NBD_EXPORT NBD_URI NBD_UNIX_URI
			note "$SERVER serving $backing at $NBD_URI and $NBD_SOCK"
			return 0
		fi
		local pid
		for pid in "${SERVER_PIDS[@]}"; do _kill_pid "$pid"; done
		if [ "$rc" -eq 2 ] && grep -qi 'in use' "$T"/server*.log 2>/dev/null; then
			note "port $port was taken meanwhile; retrying with another"
			continue
		fi
		[ "$rc" -eq 2 ] && fail "$SERVER exited during start-up (log above)"
		fail "$SERVER did not answer on 127.0.0.1:$port and $sock within ${SERVER_START_TIMEOUT_S} s"
	done
	fail "could not start $SERVER after 3 attempts"
}

stop_server() {
	local pid
	for pid in "${SERVER_PIDS[@]}"; do _kill_pid "$pid"; done
	SERVER_PIDS=()
}

# Fill FILE with SIZE_MIB MiB of random data (fast: one urandom read per 1 MiB).
random_file() { # FILE SIZE_MIB
	head -c "$(($2 * 1024 * 1024))" /dev/urandom >"$1"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }
