#!/usr/bin/env bash
# t-journal-crash: the CLUSTER partition never forgets a write a client saw
# acknowledged, even when the server is killed with kill -9 mid-workload.
#
# How: `mirrorctl create` on an 8 GiB sparse file; `mirrordisk serve --broken` (journaling, as
# during a mirror break); acked_writes.py runs QD32 random writes and logs each write
# only after its reply; once it has logged enough, kill -9 the server. Then
# `mirrorctl inspect --json --regions` must show every logged write inside the dirty
# ranges, and after a restart every 64 KiB slot must hold its last acknowledged write.
# In both modes, a write in flight at the kill that nevertheless reached the disk must
# lie inside the dirty set (the activity log's hot extents, merged at recovery). In
# connected mode (no --broken) acknowledged writes need not stay dirty — once a sync
# point made them durable their extent may go cold — so only the journaling run checks
# that every acknowledged write is dirty.
# mirrordisk-only: the reference servers have no CLUSTER partition.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$SERVER" != mirrordisk ]; then
	pass "t-journal-crash (mirrordisk-only: no CLUSTER partition in $SERVER)"
	exit 0
fi
require /usr/bin/python3
/usr/bin/python3 -c 'import nbd' 2>/dev/null || fail "python3-libnbd is missing"
MIRRORCTL=${MIRRORCTL:-$(dirname "$MIRRORDISK")/mirrorctl}
[ -x "$MIRRORCTL" ] || fail "mirrorctl binary $MIRRORCTL not found"
HERE=$(cd "$(dirname "$0")" && pwd)

crash_run() { # MODE-ARGS... : create, serve, write, kill -9, check coverage and data
	local journaling=false
	[ "${1:-}" = --broken ] && journaling=true
	local disk=$S/disk.img log=$T/acked.log
	rm -f "$disk" "$log"
	# 8 GiB sparse: 2048 activity-log extents, more than the 1024 slots, so extents are
	# evicted and the coverage check in connected mode is not trivially "everything".
	truncate -s 8G "$disk"
	"$MIRRORCTL" create "$disk" --mirror crash --node 1 --peer 2 >/dev/null
	start_server "$disk" "$@"
	local server_pid=${SERVER_PIDS[0]}
	/usr/bin/python3 "$HERE/acked_writes.py" write "$NBD_URI" "$log" 2>"$T/writer.err" &
	local writer=$!
	track_pid "$writer"
	# Let a few thousand writes complete, then crash the server under load.
	wait_until 60 bash -c "n=\$(grep -c '^A ' '$log' 2>/dev/null); [ \"\${n:-0}\" -ge 3000 ]" ||
		fail "the workload did not get going (see $T/writer.err)"
	kill -9 "$server_pid"
	wait "$writer" 2>/dev/null || true
	local acked
	acked=$(grep -c '^A ' "$log")
	note "server killed with $acked acknowledged writes logged ($(tail -n1 "$T/writer.err"))"
	"$MIRRORCTL" inspect "$disk" --json --regions >"$T/inspect.json" || fail "inspect after the crash failed"
	if $journaling; then
		/usr/bin/python3 "$HERE/acked_writes.py" covered "$log" "$T/inspect.json" ||
			fail "an acknowledged write is missing from the dirty set after kill -9 ($*)"
		pass "every acknowledged write is dirty after kill -9 ($*)"
	fi
	start_server "$disk" "$@"
	/usr/bin/python3 "$HERE/acked_writes.py" verify "$NBD_URI" "$log" "$T/inspect.json" ||
		fail "an acknowledged write was lost, or an unfinished one escaped the dirty set ($*)"
	pass "every acknowledged write is readable after restart, unfinished ones are dirty ($*)"
	stop_server
}

crash_run --broken
crash_run
pass t-journal-crash
