#!/usr/bin/env bash
# t-demo: `mirrordisk demo` runs the whole story on its own and cleans up after itself.
#
# What it proves, and how:
#   - bad arguments (a size out of range, a size that is not one, a --dir that is not
#     empty) get one error line and a non-zero exit, and change nothing;
#   - `mirrordisk demo --dir DIR --size 64M` exits 0; its report says the two data
#     partitions are identical and the rebuild after the outage sent well under 10 %
#     of the volume (differential); the agents it started are gone, their admin
#     sockets removed, and DIR keeps the disks, configuration and logs;
#   - `mirrordisk demo --keep-running` (no --dir, TMPDIR pointed into $T) says when the
#     cluster is up; then the export it names answers nbdinfo and `mirrorctl status`
#     the socket it names; SIGINT makes it stop both agents and exit 0, and its
#     temporary folder (disks, sockets, logs) is gone.
# mirrordisk-only: the demo is mirrordisk's own.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$SERVER" != mirrordisk ]; then
	pass "t-demo (mirrordisk-only: $SERVER has no demo)"
	exit 0
fi
require nbdinfo
MIRRORCTL=${MIRRORCTL:-$(dirname "$MIRRORDISK")/mirrorctl}
[ -x "$MIRRORCTL" ] || fail "mirrorctl binary $MIRRORCTL not found"

# Every pid the demo printed as an agent's ("alpha pid N").
agent_pids() { grep -o '[a-z]* pid [0-9]*' "$1" | awk '{print $3}' | sort -u; }

no_agents_left() { # OUTPUT-FILE
	local pid
	for pid in $(agent_pids "$1"); do
		_alive "$pid" && fail "agent pid $pid is still running after the demo exited"
	done
	return 0
}

# ---- 1. bad arguments: one error line, non-zero exit, nothing made.
bad() { # WHAT ARGS...: must fail with one error line
	local what=$1 rc=0
	shift
	"$MIRRORDISK" demo "$@" >"$T/bad.out" 2>&1 || rc=$?
	[ "$rc" -ne 0 ] || fail "$what: the demo accepted it"
	[ "$(grep -ci error "$T/bad.out")" -eq 1 ] || fail "$what: expected one error line: $(cat "$T/bad.out")"
	pass "$what refused: $(grep -i error "$T/bad.out")"
}
bad "--size 1M" --size 1M --dir "$T/bad1"
grep -q -- "--size" "$T/bad.out" || fail "the size error does not name --size"
[ -e "$T/bad1" ] && fail "a refused demo made its --dir"
bad "--size lots" --size lots
mkdir "$T/full"
echo keep >"$T/full/precious"
bad "a non-empty --dir" --dir "$T/full"
grep -q "not empty" "$T/bad.out" || fail "the --dir error does not say why: $(cat "$T/bad.out")"
if [ "$(ls "$T/full")" != precious ] || [ "$(cat "$T/full/precious")" != keep ]; then
	fail "a refused demo touched its --dir"
fi

# ---- 2. the whole demo in a given folder.
DIR=$T/run
rc=0
timeout -k 5 240 "$MIRRORDISK" demo --dir "$DIR" --size 64M </dev/null >"$T/demo.out" 2>"$T/demo.err" || rc=$?
sed 's/^/    | /' "$T/demo.out" >&2
[ "$rc" -eq 0 ] || fail "the demo exited with $rc: $(tail -n 30 "$T/demo.err")"
pass "the demo exited 0"
grep -Eq '^ *data partitions +identical' "$T/demo.out" ||
	fail "the report does not say the data partitions are identical"
pass "report: $(grep -E '^ *data partitions' "$T/demo.out" | sed 's/^ *//')"
pct=$(grep -E '^ *rebuild ' "$T/demo.out" | grep -oE '\(([0-9.]+) %\)' | tr -d '()% ')
[ -n "$pct" ] || fail "the report has no rebuild percentage"
awk -v p="$pct" 'BEGIN { exit !(p > 0 && p < 10) }' ||
	fail "the rebuild sent $pct % of the volume: not differential"
pass "the rebuild sent $pct % of the volume"
no_agents_left "$T/demo.out"
[ -n "$(agent_pids "$T/demo.out")" ] || fail "the demo printed no agent pids"
if pgrep -f -- "$DIR/cluster.toml" >/dev/null; then
	fail "processes using $DIR/cluster.toml are still running: $(pgrep -af -- "$DIR/cluster.toml")"
fi
for f in alpha.sock beta.sock; do
	[ -e "$DIR/$f" ] && fail "$DIR/$f was left behind"
done
for f in alpha.img beta.img cluster.toml secret alpha.log beta.log; do
	[ -e "$DIR/$f" ] || fail "--dir: $DIR/$f was not kept"
done
pass "nothing left running, no sockets left; $DIR keeps disks, configuration and logs"
# The disks really are mirrordisk disks, in sync, as the report says.
"$MIRRORCTL" inspect "$DIR/alpha.img" >"$T/inspect.out" || fail "mirrorctl inspect alpha.img failed"
grep -q "UpToDate" "$T/inspect.out" || fail "alpha's disk is not UpToDate: $(cat "$T/inspect.out")"

# ---- 3. --keep-running in a temporary folder, stopped with SIGINT.
mkdir "$T/tmp"
TMPDIR=$T/tmp "$MIRRORDISK" demo --keep-running --size 64M </dev/null >"$T/keep.out" 2>"$T/keep.err" &
DEMO=$!
track_pid "$DEMO"
wait_until 180 grep -qs "The cluster is up" "$T/keep.out" ||
	fail "--keep-running never said the cluster is up: $(tail -n 20 "$T/keep.out") $(tail -n 20 "$T/keep.err")"
for pid in $(agent_pids "$T/keep.out"); do track_pid "$pid"; done
pass "--keep-running: the cluster is up"
uri=$(grep -E '^ *export +nbdinfo' "$T/keep.out" | grep -o 'nbd://127.0.0.1:[0-9]*/db' | head -n 1)
[ -n "$uri" ] || fail "--keep-running printed no NBD address"
size=$(nbdinfo --size "$uri") || fail "nbdinfo $uri failed while the demo kept running"
pass "nbdinfo $uri: $size bytes"
sock=$(grep -oE -- '--socket [^ ;]*beta\.sock' "$T/keep.out" | head -n 1 | cut -d' ' -f2)
[ -n "$sock" ] || fail "--keep-running printed no admin socket"
"$MIRRORCTL" status --socket "$sock" >"$T/status.out" || fail "mirrorctl status --socket $sock failed"
grep -q "Primary" "$T/status.out" || fail "beta is not active: $(cat "$T/status.out")"
pass "mirrorctl status --socket $sock answers: beta is Primary"
demo_dir=$(dirname "$sock")
kill -INT "$DEMO"
gone() { ! _alive "$1"; }
wait_until 90 gone "$DEMO" ||
	fail "the demo did not exit within 90 s of SIGINT"
rc=0
wait "$DEMO" || rc=$?
[ "$rc" -eq 0 ] || fail "after SIGINT the demo exited with $rc: $(tail -n 20 "$T/keep.err")"
pass "SIGINT: the demo exited 0"
no_agents_left "$T/keep.out"
[ -e "$demo_dir" ] && fail "the temporary folder $demo_dir was left behind: $(ls -la "$demo_dir")"
[ -z "$(ls -A "$T/tmp")" ] || fail "the demo left files in TMPDIR: $(ls -A "$T/tmp")"
pass "no agents, sockets or files left after SIGINT"
pass t-demo
