#!/usr/bin/env bash
# t-serve-errors: `mirrordisk serve` refuses bad input with one clear error and
# changes nothing (DESIGN §7: "Bad config or bad input gets one clear error naming the
# field, and changes nothing").
#
# How: run `mirrordisk serve` (bounded by `timeout`, so a server that wrongly starts
# is caught as "did not exit") with: a missing backing file, a directory, an empty
# file, a missing PATH, an unknown option, several invalid --listen values, a port
# already taken by another listener, a unix socket in a missing directory, and (as the
# unprivileged user nobody, because root bypasses file permissions) a backing file it
# may not write without --read-only. Each must exit non-zero, not by a signal and
# not with a panic, print exactly one line containing "error" that names the culprit,
# leave no unix socket behind and nothing listening, and leave the backing file's
# sha256, size, mode and mtime as they were. The permission case has a control: the
# same file and user with --read-only must serve, so the refusal was about the
# permission. mirrordisk-only: the reference servers have other CLIs.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$SERVER" != mirrordisk ]; then
	note "t-serve-errors tests mirrordisk's own command line; nothing to test for SERVER=$SERVER"
	pass "t-serve-errors (not applicable to $SERVER)"
	exit 0
fi
require nbdinfo
[ -x "$MIRRORDISK" ] || fail "server binary $MIRRORDISK not found (run ./tools/test.sh --only build)"

truncate -s $((16 * 1024 * 1024)) "$T/good.img"
printf 'mirrordisk' | dd of="$T/good.img" bs=1 seek=4096 conv=notrunc status=none
: >"$T/empty.img"
mkdir "$T/adir"

fingerprint() { # what "changes nothing" means for a path: content, size, mode, mtime
	if [ -d "$1" ]; then
		stat -c '%F %a %Y' "$1"
		ls -A "$1"
	else
		stat -c '%F %s %a %Y %y' "$1"
		sha "$1"
	fi
}

# refuse LABEL CULPRIT WATCHED-PATH -- SERVE-ARGS...
# CULPRIT: a string the error line must contain (case-insensitive).
refuse() {
	local label=$1 culprit=$2 watched=$3
	shift 4
	local port sock before after rc=0
	port=$(free_port)
	sock=$T/refused.sock
	rm -f "$sock"
	before=$( [ -e "$watched" ] && fingerprint "$watched" || echo absent)
	# Substitute placeholders so every case gets a fresh port and socket path.
	local args=() a
	for a in "$@"; do
		a=${a//@PORT@/$port}
		a=${a//@SOCK@/$sock}
		args+=("$a")
	done
	timeout -k 2 10 "${RUN_AS[@]}" "$MIRRORDISK" "${args[@]}" >"$T/out" 2>"$T/err" || rc=$?
	after=$( [ -e "$watched" ] && fingerprint "$watched" || echo absent)
	local shown="mirrordisk ${args[*]}"
	if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
		fail "$label: '$shown' did not exit within 10 s (did it start serving?)"
	fi
	[ "$rc" -ne 0 ] || fail "$label: '$shown' exited 0, expected a refusal"
	[ "$rc" -lt 128 ] || fail "$label: '$shown' died of signal $((rc - 128)) (abort/panic?); stderr: $(head -c 2000 "$T/err")"
	if grep -qiE 'panicked|RUST_BACKTRACE' "$T/err"; then
		fail "$label: '$shown' panicked: $(head -n 5 "$T/err")"
	fi
	[ -s "$T/err" ] || fail "$label: '$shown' exited $rc with nothing on stderr"
	local n
	n=$(grep -ci 'error' "$T/err" || true)
	if [ "$n" -ne 1 ]; then
		cat "$T/err" >&2
		fail "$label: expected exactly one error line on stderr, got $n (above)"
	fi
	local line
	line=$(grep -i 'error' "$T/err")
	if ! grep -qiF -- "$culprit" <<<"$line"; then
		fail "$label: the error line does not name '$culprit': $line"
	fi
	[ "$before" = "$after" ] || fail "$label: $watched changed: before [$before] after [$after]"
	[ ! -e "$sock" ] || fail "$label: left a unix socket behind at $sock"
	if _tcp_answers "$port"; then fail "$label: something is listening on $port after the refusal"; fi
	pass "$label: exit $rc: $line"
}

RUN_AS=()
L=(--listen 127.0.0.1:@PORT@ --unix @SOCK@)

refuse "missing backing file" "$T/nope.img" "$T/nope.img" -- serve "$T/nope.img" "${L[@]}"
refuse "backing is a directory" "$T/adir" "$T/adir" -- serve "$T/adir" "${L[@]}"
refuse "empty backing file" "$T/empty.img" "$T/empty.img" -- serve "$T/empty.img" "${L[@]}"
refuse "no PATH given" "" "$T/good.img" -- serve "${L[@]}"
refuse "unknown option" "--bogus" "$T/good.img" -- serve "$T/good.img" "${L[@]}" --bogus
for bad in 127.0.0.1:notaport 127.0.0.1:99999 999.1.1.1:10809 127.0.0.1 ""; do
	refuse "invalid --listen '$bad'" "$bad" "$T/good.img" -- \
		serve "$T/good.img" --listen "$bad" --unix @SOCK@
done
refuse "unix socket in a missing directory" "$T/no-such-dir" "$T/good.img" -- \
	serve "$T/good.img" --listen 127.0.0.1:@PORT@ --unix "$T/no-such-dir/s.sock"

# A port someone else holds: a plain listener in Python, tracked for cleanup.
busy=$(free_port)
"$PYTHON" -c 'import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(); time.sleep(300)' "$busy" &
track_pid $!
wait_until 10 _tcp_answers "$busy" || fail "helper listener on $busy did not come up"
refuse "port already in use" "$busy" "$T/good.img" -- \
	serve "$T/good.img" --listen "127.0.0.1:$busy" --unix @SOCK@

# Permissions: root ignores file modes, so run as nobody. A 0444 file owned by root
# cannot be opened for writing by nobody: serving it writable must be refused.
# $T (and the runner's dir above it) are 0700, so nobody needs a directory of its own
# that it can reach: a fresh one directly in /tmp, removed by the EXIT trap.
SHARED=$(mktemp -d /tmp/mirrordisk-serve-errors-shared.XXXXXX)
track_dir "$SHARED"
chmod 0777 "$SHARED"
cp "$T/good.img" "$SHARED/ro.img"
chmod 0444 "$SHARED/ro.img"
if [ "$(id -u)" -ne 0 ]; then
	note "not root: cannot switch to nobody; the permission case is not tested"
elif ! setpriv --reuid=65534 --regid=65534 --clear-groups test -x "$MIRRORDISK"; then
	# (not reachable when the binary lives under a 0700 directory, e.g. /root)
	note "nobody cannot execute $MIRRORDISK (directory permissions); the permission case is not tested"
else
	RUN_AS=(setpriv --reuid=65534 --regid=65534 --clear-groups)
	# Precondition, so the refusal below is about the file's mode and nothing else:
	# nobody can read the file but not write it.
	"${RUN_AS[@]}" test -r "$SHARED/ro.img" || fail "precondition: nobody cannot read $SHARED/ro.img"
	if "${RUN_AS[@]}" test -w "$SHARED/ro.img"; then fail "precondition: nobody can write $SHARED/ro.img"; fi
	refuse "backing not writable (0444, as nobody), no --read-only" "$SHARED/ro.img" "$SHARED/ro.img" -- \
		serve "$SHARED/ro.img" --listen 127.0.0.1:@PORT@ --unix "$SHARED/x.sock"
	# Control: the same user and file with --read-only serves.
	port=$(free_port)
	"${RUN_AS[@]}" "$MIRRORDISK" serve "$SHARED/ro.img" --listen "127.0.0.1:$port" \
		--unix "$SHARED/ro.sock" --name ro --read-only </dev/null >"$T/server.log" 2>&1 &
	track_pid $!
	wait_until 10 _tcp_answers "$port" || fail "control: --read-only as nobody did not start: $(cat "$T/server.log")"
	nbdinfo --is read-only "nbd://127.0.0.1:$port/ro" || fail "control: export is not read-only"
	pass "control: the same file served --read-only as nobody works"
	RUN_AS=()
fi
pass "t-serve-errors"
