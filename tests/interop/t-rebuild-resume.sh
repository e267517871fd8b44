#!/usr/bin/env bash
# t-rebuild-resume: an interrupted full copy resumes where it stopped.
#
# What it proves, and how:
#   - two agents on loopback, 256 MiB data partitions created WITHOUT --blank (both
#     Inconsistent, "just created"); alpha's data partition is filled with random data
#     first, so the copy has something to prove; the copy is capped at 48 MiB/s
#     (resync_rate) so that it can be interrupted;
#   - `mirrorctl rebuild db --full --from alpha` starts the copy; once a quarter has
#     crossed, `mirrorctl break` on alpha interrupts it (a disconnect), and `mirrorctl
#     rebuild` lifts the break: the copy goes on from where it stopped (the regions not
#     yet copied are still dirty in alpha's journal), it does not start again;
#   - once half has crossed, the SOURCE agent is killed with SIGKILL and restarted: the
#     dirty set survived in its journal, so the copy goes on again;
#   - at each interruption alpha's journal trails the copy by a bounded lag (progress
#     not yet durable: at most 32 MiB), and in all alpha sends the volume once plus at
#     most that lag per interruption: it never starts over;
#   - beta ends UpToDate and the two data partitions are identical.
# mirrordisk-only.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$SERVER" != mirrordisk ]; then
	pass "t-rebuild-resume (mirrordisk-only: $SERVER has no node agent)"
	exit 0
fi
require qemu-img
MIRRORCTL=${MIRRORCTL:-$(dirname "$MIRRORDISK")/mirrorctl}
[ -x "$MIRRORCTL" ] || fail "mirrorctl binary $MIRRORCTL not found"

DATA_MIB=256
DATA_BYTES=$((DATA_MIB * 1024 * 1024))
# What one interruption may cost again: the resync progress not yet durable on the
# source (cleared bits trail the copy by at most RESYNC_CLEAN_BATCH_BYTES = 8 MiB, plus
# the sync point in flight, another 8 MiB) and the in-flight window (16 x 1 MiB).
LAG_MAX=$((32 * 1024 * 1024))
OVERLAP_MAX=$((2 * LAG_MAX))

# shellcheck source=tests/interop/agent_lib.sh
. "$(dirname "$0")/agent_lib.sh"
two_node_config rebuild-resume 'resync_rate = "48M"'
truncate -s $((DATA_MIB + 64))M "$S/alpha.img" "$S/beta.img"
"$MIRRORCTL" create "$S/alpha.img" --mirror db --node 1 --peer 2 --data-size "${DATA_MIB}M" >/dev/null
"$MIRRORCTL" create "$S/beta.img" --mirror db --node 2 --peer 1 --data-size "${DATA_MIB}M" >/dev/null
OFF=$("$MIRRORCTL" inspect "$S/alpha.img" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["layout"]["data_offset"])')
dd if=/dev/urandom of="$S/alpha.img" bs=1M count="$DATA_MIB" seek="$OFF" oflag=seek_bytes conv=notrunc status=none

sent() { jget alpha "m['engine_stats']['resync_bytes_sent']"; }

# ---- 1. both new; the full copy from alpha starts.
start_agent alpha
start_agent beta
wait_for alpha "m['connection']['state']" waiting-for-operator 15
check_eq "beta disk state before the copy" "$(jget beta "m['disk_state']")" Inconsistent
"$MIRRORCTL" rebuild db --full --from alpha --config "$T/cluster.toml" >"$T/rebuild.out" ||
	fail "rebuild --full failed: $(cat "$T/rebuild.out")"
wait_for alpha "m['resync'] is not None and m['resync']['full']" True 10

# ---- 2. a quarter copied: break (disconnect), then lift it.
wait_for alpha "m['engine_stats']['resync_bytes_sent'] >= $((DATA_BYTES / 4))" True 30
"$MIRRORCTL" break db --socket "$T/alpha.sock" >/dev/null || fail "break failed"
wait_for alpha "m['connection']['link']['state']" broken 10
sent_at_break=$(sent)
dirty=$(jget alpha "m['dirty_bytes']")
note "interrupted by a break after $sent_at_break bytes; alpha's journal still holds $dirty dirty bytes"
[ "$dirty" -lt "$DATA_BYTES" ] || fail "nothing was cleared from alpha's journal by the copied part ($dirty dirty)"
[ "$dirty" -le $((DATA_BYTES - sent_at_break + LAG_MAX)) ] ||
	fail "alpha's journal ($dirty dirty bytes) trails the copy ($sent_at_break sent) by more than $LAG_MAX bytes"
[ "$dirty" -ge $((DATA_BYTES - sent_at_break)) ] ||
	fail "alpha's journal ($dirty dirty bytes) lost regions that were never sent ($sent_at_break sent)"
check_eq "beta still Inconsistent while interrupted" "$(jget beta "m['disk_state']")" Inconsistent
"$MIRRORCTL" rebuild db --socket "$T/alpha.sock" >/dev/null || fail "rebuild (lift the break) failed"
wait_for alpha "m['resync'] is not None" True 15
decision=$(jget alpha "m['decision']['text']")
note "after the break: $decision"
check_eq "the resumed copy is not a new full copy" "$(jget alpha "m['decision']['full_copy']")" False

# ---- 3. half copied: kill -9 the source, restart it.
# (alpha's engine statistics count from its start: the break did not reset them.)
wait_for alpha "m['engine_stats']['resync_bytes_sent'] >= $((DATA_BYTES / 2))" True 30
sent_before_kill=$(sent)
kill -KILL "${PIDS[alpha]}"
wait "${PIDS[alpha]}" 2>/dev/null || true
note "source killed after $sent_before_kill bytes in all"
start_agent alpha
wait_for alpha "m['resync'] is not None or m['dirty_bytes'] == 0" True 15
dirty=$(jget alpha "m['dirty_bytes']")
note "restarted source: $dirty dirty bytes left to copy; $(jget alpha "m['decision']['text']")"
[ "$dirty" -lt $((DATA_BYTES - DATA_BYTES / 4)) ] ||
	fail "the restarted source has $dirty dirty bytes: the copy started over"
wait_for beta "m['disk_state']" UpToDate 60
wait_for alpha "m['dirty_bytes']" 0 30
total=$((sent_before_kill + $(sent)))
note "in all alpha sent $total bytes for a $DATA_BYTES-byte volume ($(awk "BEGIN{printf \"%.2f\", $total / $DATA_BYTES}") volumes)"
[ "$total" -ge "$DATA_BYTES" ] || fail "sent $total bytes, less than the volume"
[ "$total" -le $((DATA_BYTES + OVERLAP_MAX)) ] ||
	fail "sent $total bytes: more than the volume + $OVERLAP_MAX, the copy did not resume where it stopped"
pass "the copy resumed twice and sent the volume once (+$((total - DATA_BYTES)) bytes of overlap)"

# ---- 4. identical.
stop_agent alpha
stop_agent beta
qemu-img compare \
	--image-opts "driver=raw,offset=$OFF,size=$DATA_BYTES,file.filename=$S/alpha.img" \
	"driver=raw,offset=$OFF,size=$DATA_BYTES,file.filename=$S/beta.img" >"$T/compare.out" 2>&1 ||
	fail "the data partitions differ: $(cat "$T/compare.out")"
pass "data partitions identical"
pass t-rebuild-resume
