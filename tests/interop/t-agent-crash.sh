#!/usr/bin/env bash
# t-agent-crash: a node killed mid-workload never costs an acknowledged write.
#
# How: two agents on loopback, disks created --blank (connected in sync at once).
#  1. kill -9 the SECONDARY while acked_writes.py writes through the primary (QD32,
#     every write logged only after its reply): the primary keeps serving, status
#     shows it disconnected with dirty bytes growing; the secondary is restarted, the
#     differential resync runs, and after a deactivate and SIGTERM the two data
#     partitions are identical (qemu-img compare on the data partitions).
#  2. kill -9 the PRIMARY mid-workload: the secondary survives (Consistent, peer gone);
#     it is stopped, and `mirrordisk serve --read-only` on its device must hold every
#     write the client saw acknowledged (acked_writes.py verify; a write still in flight
#     at the kill may or may not have landed).
# mirrordisk-only.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$SERVER" != mirrordisk ]; then
	pass "t-agent-crash (mirrordisk-only: $SERVER has no node agent)"
	exit 0
fi
require qemu-img /usr/bin/python3
/usr/bin/python3 -c 'import nbd' 2>/dev/null || fail "python3-libnbd is missing"
MIRRORCTL=${MIRRORCTL:-$(dirname "$MIRRORDISK")/mirrorctl}
[ -x "$MIRRORCTL" ] || fail "mirrorctl binary $MIRRORCTL not found"
HERE=$(cd "$(dirname "$0")" && pwd)

# shellcheck source=tests/interop/agent_lib.sh
. "$(dirname "$0")/agent_lib.sh"
two_node_config crash
truncate -s 160M "$S/alpha.img" "$S/beta.img"
"$MIRRORCTL" create "$S/alpha.img" --mirror db --node 1 --peer 2 --blank >/dev/null
"$MIRRORCTL" create "$S/beta.img" --mirror db --node 2 --peer 1 --blank >/dev/null

acked_count() { grep -c '^A ' "$1" 2>/dev/null || true; }
wait_acked() { # LOG COUNT
	wait_until 60 bash -c "n=\$(grep -c '^A ' '$1' 2>/dev/null); [ \"\${n:-0}\" -ge $2 ]" ||
		fail "the workload did not reach $2 acknowledged writes"
}
compare_data() { # WHAT
	local off size
	read -r off size < <("$MIRRORCTL" inspect "$S/alpha.img" --json |
		"$PYTHON" -c 'import json,sys; d=json.load(sys.stdin)["layout"]; print(d["data_offset"], d["data_bytes"])')
	qemu-img compare \
		--image-opts "driver=raw,offset=$off,size=$size,file.filename=$S/alpha.img" \
		"driver=raw,offset=$off,size=$size,file.filename=$S/beta.img" ||
		fail "$1: the data partitions differ"
	pass "$1: data partitions identical"
}

# ---- 1. the secondary dies mid-workload.
start_agent alpha
start_agent beta
wait_for alpha "m['connection']['state']" connected 15
"$MIRRORCTL" activate db --socket "$T/alpha.sock" >/dev/null || fail "activate alpha failed"
URI="nbd://127.0.0.1:$A_NBD/db"
/usr/bin/python3 "$HERE/acked_writes.py" write "$URI" "$T/acked1.log" 12000 2>"$T/writer1.err" &
WRITER=$!
track_pid "$WRITER"
wait_acked "$T/acked1.log" 2000
kill -9 "${PIDS[beta]}"
wait "${PIDS[beta]}" 2>/dev/null || true
note "beta killed with $(acked_count "$T/acked1.log") acknowledged writes"
wait_for alpha "m['connection']['state']" disconnected 10
before=$(jget alpha "m['dirty_bytes']")
sleep 1
after=$(jget alpha "m['dirty_bytes']")
[ "$after" -gt 0 ] && [ "$after" -ge "$before" ] || fail "dirty bytes while broken: $before then $after"
check_eq "alpha still serving" "$(jget alpha "m['export']['open']")" True
pass "primary keeps serving with the secondary dead; dirty bytes $before -> $after"
start_agent beta
wait "$WRITER" || fail "the writer failed: $(cat "$T/writer1.err")"
wait_for alpha "m['connection']['state']" connected 60
wait_for beta "m['disk_state']" UpToDate 30
check_eq "alpha dirty after the resync" "$(jget alpha "m['dirty_bytes']")" 0
full=$(jget alpha "m['engine_stats']['resync_bytes_sent']")
note "differential resync: $full bytes"
"$MIRRORCTL" deactivate db --socket "$T/alpha.sock" >/dev/null || fail "deactivate failed"
stop_agent alpha
stop_agent beta
compare_data "after the secondary's crash and resync"

# ---- 2. the primary dies mid-workload; the secondary holds every acknowledged write.
start_agent alpha
start_agent beta
wait_for alpha "m['connection']['state']" connected 30
"$MIRRORCTL" activate db --socket "$T/alpha.sock" >/dev/null || fail "activate alpha failed"
/usr/bin/python3 "$HERE/acked_writes.py" write "$URI" "$T/acked2.log" 2>"$T/writer2.err" &
WRITER=$!
track_pid "$WRITER"
wait_acked "$T/acked2.log" 3000
kill -9 "${PIDS[alpha]}"
wait "${PIDS[alpha]}" 2>/dev/null || true
wait "$WRITER" 2>/dev/null || true
note "alpha killed with $(acked_count "$T/acked2.log") acknowledged writes ($(tail -n1 "$T/writer2.err"))"
wait_for beta "m['connection']['state']" disconnected 10
check_eq "beta disk state without its primary" "$(jget beta "m['disk_state']")" Consistent
stop_agent beta
start_server "$S/beta.img" --name db --read-only
/usr/bin/python3 "$HERE/acked_writes.py" verify "$NBD_URI" "$T/acked2.log" ||
	fail "an acknowledged write is missing on the secondary after the primary's kill -9"
stop_server
pass "every acknowledged write is on the secondary after the primary's kill -9"
pass t-agent-crash
