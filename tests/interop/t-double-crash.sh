#!/usr/bin/env bash
# t-double-crash: both nodes killed at once costs a differential resync, not a full one.
#
# What it proves, and how:
#   - two agents on loopback, 1 GiB data partitions created --blank; alpha active;
#   - a QD 32 workload (random 4 KiB..64 KiB writes, acked_writes.py) runs through
#     alpha's export, confined to the first WORKLOAD_MIB MiB of the volume (as an
#     application's working set is), and BOTH agents are killed with SIGKILL mid-run
#     (the secondary first, then the primary in the same instant: a power cut);
#   - restarted, the nodes reconnect by the crashed-primary rule (same current
#     generation, alpha crashed while primary): the copy is the union of both journals,
#     which recovery filled with the hot activity-log extents. Status says the copy is
#     differential ("decision", "full_copy": false, the resync's "full": false), and
#     the bytes sent are far below the volume: at most the working set rounded out to
#     4 MiB extents (< 10 % of the volume here);
#   - every write the client saw acknowledged is on both disks (acked_writes.py verify
#     through each node's export after the resync), and the two data partitions are
#     identical (qemu-img compare on the data partitions).
# mirrordisk-only.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$SERVER" != mirrordisk ]; then
	pass "t-double-crash (mirrordisk-only: $SERVER has no node agent)"
	exit 0
fi
require qemu-img python3-libnbd
MIRRORCTL=${MIRRORCTL:-$(dirname "$MIRRORDISK")/mirrorctl}
[ -x "$MIRRORCTL" ] || fail "mirrorctl binary $MIRRORCTL not found"
HERE=$(cd "$(dirname "$0")" && pwd)

DATA_BYTES=$((1024 * 1024 * 1024))
WORKLOAD_MIB=64
LIMIT=$((DATA_BYTES / 10))

# shellcheck source=tests/interop/agent_lib.sh
. "$(dirname "$0")/agent_lib.sh"
two_node_config double-crash
truncate -s 1088M "$S/alpha.img" "$S/beta.img"
"$MIRRORCTL" create "$S/alpha.img" --mirror db --node 1 --peer 2 --data-size 1G --blank >/dev/null
"$MIRRORCTL" create "$S/beta.img" --mirror db --node 2 --peer 1 --data-size 1G --blank >/dev/null
OFF=$("$MIRRORCTL" inspect "$S/alpha.img" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["layout"]["data_offset"])')

wait_acked() { # LOG COUNT
	wait_until 60 bash -c "n=\$(grep -c '^A ' '$1' 2>/dev/null); [ \"\${n:-0}\" -ge $2 ]" ||
		fail "the workload did not reach $2 acknowledged writes"
}

# acked_writes.py spreads its writes over the whole export; a copy of it with its slot
# count capped confines them to the first WORKLOAD_MIB MiB (the working set).
sed "s/    slots = size \/\/ SLOT/    slots = min(size, $WORKLOAD_MIB * 1024 * 1024) \/\/ SLOT/" \
	"$HERE/acked_writes.py" >"$T/acked_writes.py"
grep -q "min(size, $WORKLOAD_MIB" "$T/acked_writes.py" || fail "could not confine the workload (acked_writes.py changed?)"

# ---- 1. in sync, alpha active, workload running; kill -9 both.
start_agent alpha
start_agent beta
wait_for alpha "m['connection']['state']" connected 15
"$MIRRORCTL" activate db --socket "$T/alpha.sock" >/dev/null || fail "activate alpha failed"
URI="nbd://127.0.0.1:$A_NBD/db"
"$PYTHON" "$T/acked_writes.py" write "$URI" "$T/acked.log" 2>"$T/writer.err" &
WRITER=$!
track_pid "$WRITER"
wait_acked "$T/acked.log" 4000
check_eq "connected while writing" "$(jget alpha "m['connection']['state']")" connected
kill -9 "${PIDS[beta]}" "${PIDS[alpha]}"
wait "${PIDS[beta]}" 2>/dev/null || true
wait "${PIDS[alpha]}" 2>/dev/null || true
wait "$WRITER" 2>/dev/null || true
acked=$(grep -c '^A ' "$T/acked.log")
note "both agents killed (SIGKILL) with $acked acknowledged writes ($(tail -n1 "$T/writer.err"))"

# ---- 2. restart both: differential resync from the crashed primary.
ms0=$(date +%s%3N)
start_agent alpha
start_agent beta
wait_for alpha "m['connection']['state']" connected 60
wait_for beta "m['disk_state']" UpToDate 60
wait_for alpha "m['dirty_bytes']" 0 30
ms1=$(date +%s%3N)
decision=$(jget alpha "m['decision']['text']")
note "alpha's connect decision: $decision"
check_eq "decision full_copy" "$(jget alpha "m['decision']['full_copy']")" False
case "$decision" in
*"full copy"*) fail "a full copy after a double crash: $decision" ;;
*"rule 40"*) pass "crashed-primary rule: $decision" ;;
*) note "decision (not rule 40, still differential): $decision" ;;
esac
"$MIRRORCTL" status --socket "$T/alpha.sock" >"$T/status-after.txt"
grep -q "decision" "$T/status-after.txt" || fail "human status does not show the decision"
sent=$(jget alpha "m['engine_stats']['resync_bytes_sent']")
recv=$(jget beta "m['engine_stats']['resync_bytes_received']")
note "resync: alpha sent $sent bytes, beta received $recv ($(awk "BEGIN{printf \"%.2f\", $sent * 100 / $DATA_BYTES}") % of the volume); restart to in-sync $((ms1 - ms0)) ms"
[ "$sent" -le "$LIMIT" ] || fail "the resync sent $sent bytes: not differential (limit $LIMIT)"
[ "$sent" -le $(((WORKLOAD_MIB + 8) * 1024 * 1024)) ] || fail "the resync sent $sent bytes, more than the working set rounded to extents"
pass "differential: $sent bytes sent, far below the $DATA_BYTES-byte volume"
check_eq "bytes received = bytes sent" "$recv" "$sent"

# ---- 3. every acknowledged write is on both; the data partitions are identical.
"$MIRRORCTL" activate db --socket "$T/alpha.sock" >/dev/null || fail "activate alpha after the restart failed"
"$PYTHON" "$HERE/acked_writes.py" verify "$URI" "$T/acked.log" ||
	fail "an acknowledged write is missing on alpha after the double crash"
"$MIRRORCTL" deactivate db --socket "$T/alpha.sock" >/dev/null || fail "deactivate alpha failed"
wait_for beta "m['peer']['role']" Secondary 10
"$MIRRORCTL" activate db --socket "$T/beta.sock" >/dev/null || fail "activate beta failed"
"$PYTHON" "$HERE/acked_writes.py" verify "nbd://127.0.0.1:$B_NBD/db" "$T/acked.log" ||
	fail "an acknowledged write is missing on beta after the double crash"
"$MIRRORCTL" deactivate db --socket "$T/beta.sock" >/dev/null || fail "deactivate beta failed"
stop_agent alpha
stop_agent beta
qemu-img compare \
	--image-opts "driver=raw,offset=$OFF,size=$DATA_BYTES,file.filename=$S/alpha.img" \
	"driver=raw,offset=$OFF,size=$DATA_BYTES,file.filename=$S/beta.img" >"$T/compare.out" 2>&1 ||
	fail "the data partitions differ: $(cat "$T/compare.out")"
pass "data partitions identical after the double crash"
pass t-double-crash
