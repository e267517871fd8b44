#!/usr/bin/env bash
# t-rebuild-diff: after `mirrorctl break`, only what changed crosses the wire.
#
# What it proves, and how:
#   - two agents on loopback, 1 GiB data partitions created --blank (in sync at once);
#     alpha is activated;
#   - `mirrorctl break db` on alpha closes the link and keeps it closed: status shows
#     "broken by operator" (JSON and human), beta stays disconnected although it keeps
#     dialling (alpha turns it away), and the data stays served on alpha;
#   - exactly X % (2 %) of the volume is written through alpha's export as scattered,
#     distinct 4 KiB blocks of random data (python3-libnbd, QD 32): alpha's journal
#     holds exactly those bytes (the bitmap granularity is 4 KiB, so one write = one
#     region: the count is exact, not approximate);
#   - `mirrorctl rebuild db` on alpha lifts the break; the connect decides a
#     differential copy from alpha (status "decision"), and the bytes the resync sent
#     (engine_stats.resync_bytes_sent) equal the bytes written, within one resync
#     chunk (1 MiB = 0.1 % of the volume: slack for a chunk re-sent after a hiccup; on
#     a quiet run the count is exact);
#   - the two data partitions are then identical (qemu-img compare on the data
#     partitions) and hold the written blocks (they differ from the blank start).
# mirrordisk-only.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$SERVER" != mirrordisk ]; then
	pass "t-rebuild-diff (mirrordisk-only: $SERVER has no node agent)"
	exit 0
fi
require qemu-img python3-libnbd
MIRRORCTL=${MIRRORCTL:-$(dirname "$MIRRORDISK")/mirrorctl}
[ -x "$MIRRORCTL" ] || fail "mirrorctl binary $MIRRORCTL not found"

PERCENT=${REBUILD_DIFF_PERCENT:-2}
DATA_BYTES=$((1024 * 1024 * 1024))
BLOCK=4096
WRITES=$((DATA_BYTES / BLOCK * PERCENT / 100))
SLACK=$((1024 * 1024))

# shellcheck source=tests/interop/agent_lib.sh
. "$(dirname "$0")/agent_lib.sh"
two_node_config rebuild-diff
truncate -s 1088M "$S/alpha.img" "$S/beta.img"
"$MIRRORCTL" create "$S/alpha.img" --mirror db --node 1 --peer 2 --data-size 1G --blank >/dev/null
"$MIRRORCTL" create "$S/beta.img" --mirror db --node 2 --peer 1 --data-size 1G --blank >/dev/null

compare_data() { # WHAT
	qemu-img compare \
		--image-opts "driver=raw,offset=$OFF,size=$DATA_BYTES,file.filename=$S/alpha.img" \
		"driver=raw,offset=$OFF,size=$DATA_BYTES,file.filename=$S/beta.img" >"$T/compare.out" 2>&1 ||
		fail "$1: the data partitions differ: $(cat "$T/compare.out")"
	pass "$1: data partitions identical"
}
OFF=$("$MIRRORCTL" inspect "$S/alpha.img" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["layout"]["data_offset"])')

# The workload: COUNT distinct random 4 KiB blocks, random data, QD 32, then FLUSH.
cat >"$T/scatter.py" <<'EOF'
import os, random, sys
import nbd
uri, count = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
blocks = h.get_size() // 4096
chosen = random.Random(os.getpid()).sample(range(blocks), count)
errors = []
def done(error):
    if error.value != 0:
        errors.append(error.value)
    return 1
for b in chosen:
    while h.aio_in_flight() >= 32:
        h.poll(-1)
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(os.urandom(4096))), b * 4096, completion=done)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
h.shutdown()
if errors:
    sys.exit(f"scatter: {len(errors)} writes failed")
print(len(chosen))
EOF

# ---- 1. in sync; alpha active.
start_agent alpha
start_agent beta
wait_for alpha "m['connection']['state']" connected 15
"$MIRRORCTL" activate db --socket "$T/alpha.sock" >/dev/null || fail "activate alpha failed"
URI="nbd://127.0.0.1:$A_NBD/db"

# ---- 2. break on alpha.
"$MIRRORCTL" break db --socket "$T/alpha.sock" >"$T/break.out" || fail "break failed: $(cat "$T/break.out")"
note "$(cat "$T/break.out")"
wait_for alpha "m['connection']['link']['state']" broken 10
wait_for beta "m['connection']['state']" disconnected 10
check_eq "status JSON names the operator" "$(jget alpha "'by' if m['connection']['link']['broken']['by'] else 'nobody'")" by
"$MIRRORCTL" status --socket "$T/alpha.sock" >"$T/status-broken.txt"
grep -q "BROKEN BY OPERATOR" "$T/status-broken.txt" || fail "human status does not show the break: $(cat "$T/status-broken.txt")"
grep -q "replication link broken by the operator" "$T/server-alpha.log" || fail "the break is not logged"
pass "status shows the break: $(grep -o 'BROKEN BY OPERATOR[^;]*' "$T/status-broken.txt")"
# beta keeps dialling (backoff) and is turned away: still apart after a few attempts.
sleep 2
check_eq "beta still disconnected while broken" "$(jget beta "m['connection']['state']")" disconnected
check_eq "alpha still disconnected while broken" "$(jget alpha "m['connection']['state']")" disconnected
check_eq "alpha export open while broken" "$(jget alpha "m['export']['open']")" True

# ---- 3. write exactly PERCENT % of the volume as scattered 4 KiB blocks.
t0=$SECONDS
n=$("$PYTHON" "$T/scatter.py" "$URI" "$WRITES") || fail "the scattered writes failed"
check_eq "4 KiB blocks written" "$n" "$WRITES"
note "$WRITES blocks ($((WRITES * BLOCK)) bytes, $PERCENT % of $DATA_BYTES) written in $((SECONDS - t0)) s"
check_eq "alpha dirty bytes = bytes written" "$(jget alpha "m['dirty_bytes']")" $((WRITES * BLOCK))
check_eq "beta untouched during the break (resync bytes received)" "$(jget beta "m['engine_stats']['resync_bytes_received']")" 0

# ---- 4. rebuild on alpha: break lifted, differential copy of exactly the changes.
sent0=$(jget alpha "m['engine_stats']['resync_bytes_sent']")
ms0=$(date +%s%3N)
"$MIRRORCTL" rebuild db --socket "$T/alpha.sock" >"$T/rebuild.out" || fail "rebuild failed: $(cat "$T/rebuild.out")"
note "$(cat "$T/rebuild.out")"
wait_for beta "m['disk_state']" UpToDate 60
wait_for alpha "m['connection']['state']" connected 30
wait_for alpha "m['dirty_bytes']" 0 30
ms1=$(date +%s%3N)
decision=$(jget alpha "m['decision']['text']")
note "alpha's connect decision: $decision"
case "$decision" in
*"differential copy from this node"*) pass "the connect decided a differential copy from alpha" ;;
*) fail "unexpected decision: $decision" ;;
esac
check_eq "decision full_copy" "$(jget alpha "m['decision']['full_copy']")" False
sent=$(($(jget alpha "m['engine_stats']['resync_bytes_sent']") - sent0))
want=$((WRITES * BLOCK))
note "resync sent $sent bytes for $want bytes written ($(awk "BEGIN{printf \"%.3f\", $sent * 100 / $DATA_BYTES}") % of the volume; rebuild to UpToDate in $((ms1 - ms0)) ms incl. reconnect)"
[ "$sent" -ge "$want" ] || fail "the resync sent $sent bytes, less than the $want written"
[ "$sent" -le $((want + SLACK)) ] || fail "the resync sent $sent bytes, more than the $want written + $SLACK"
pass "bytes sent = bytes written ($sent vs $want, tolerance +$SLACK)"
check_eq "beta received what alpha sent" "$(jget beta "m['engine_stats']['resync_bytes_received']")" "$sent"

# ---- 5. identical data partitions.
"$MIRRORCTL" deactivate db --socket "$T/alpha.sock" >/dev/null || fail "deactivate failed"
stop_agent alpha
stop_agent beta
compare_data "after the differential rebuild"
qemu-img compare -q --image-opts "driver=raw,offset=$OFF,size=$DATA_BYTES,file.filename=$S/alpha.img" \
	"driver=null-co,size=$DATA_BYTES,read-zeroes=on" 2>/dev/null &&
	fail "alpha's data partition is still all zeros: the writes are missing"
pass t-rebuild-diff
