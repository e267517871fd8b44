#!/usr/bin/env bash
# t-verify: online verify finds exactly the blocks that differ behind the mirror's back,
# and `rebuild` copies exactly those.
#
# What it proves, and how:
#   - two agents on loopback, 256 MiB data partitions created --blank; alpha active
#     writes patterns and random data through its export (qemu-io, replicated); both
#     agents stop cleanly (SIGTERM) and the data partitions are identical;
#   - with the agents down, beta's DATA partition is damaged directly (offset =
#     data_offset from `mirrorctl inspect --json`): six 4 KiB blocks overwritten with
#     random data — the first block, its neighbour (two adjacent regions count as two),
#     blocks inside and outside the written area, the last block of the partition —
#     and one more block with a single byte flipped;
#   - restarted, the agents connect "in sync" (the generations cannot know); activated
#     alpha runs `mirrorctl verify db --wait`: it reports exactly 7 differing regions
#     and 7 × 4096 bytes (command output and status `verify`), the whole volume
#     verified; alpha's status dirty bytes equal those bytes; the data stays served;
#   - `mirrorctl rebuild db` on alpha copies them: a differential resync that sends
#     exactly those bytes (within one 1 MiB chunk of slack, as t-rebuild-diff), after
#     which a second verify finds 0 differing regions, and after a clean stop the two
#     data partitions are identical (qemu-img compare) and hold what alpha wrote.
# mirrordisk-only.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$SERVER" != mirrordisk ]; then
	pass "t-verify (mirrordisk-only: $SERVER has no node agent)"
	exit 0
fi
require qemu-io qemu-img nbdcopy
MIRRORCTL=${MIRRORCTL:-$(dirname "$MIRRORDISK")/mirrorctl}
[ -x "$MIRRORCTL" ] || fail "mirrorctl binary $MIRRORCTL not found"

DATA_BYTES=$((256 * 1024 * 1024))
BLOCK=4096
SLACK=$((1024 * 1024))

# shellcheck source=tests/interop/agent_lib.sh
. "$(dirname "$0")/agent_lib.sh"
two_node_config verify
truncate -s 288M "$S/alpha.img" "$S/beta.img"
"$MIRRORCTL" create "$S/alpha.img" --mirror db --node 1 --peer 2 --data-size 256M --blank >/dev/null
"$MIRRORCTL" create "$S/beta.img" --mirror db --node 2 --peer 1 --data-size 256M --blank >/dev/null
OFF=$("$MIRRORCTL" inspect "$S/beta.img" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["layout"]["data_offset"])')

data_opts() { echo "driver=raw,offset=$OFF,size=$DATA_BYTES,file.filename=$1"; }
compare_data() { # WHAT [EXPECT-DIFFERENT]
	qemu-img compare --image-opts "$(data_opts "$S/alpha.img")" "$(data_opts "$S/beta.img")" >"$T/compare.out" 2>&1 ||
		fail "$1: the data partitions differ: $(cat "$T/compare.out")"
	pass "$1: data partitions identical"
}
URI="nbd://127.0.0.1:$A_NBD/db"

# ---- 1. in sync, alpha active, data written; clean stop.
start_agent alpha
start_agent beta
wait_for alpha "m['connection']['state']" connected 15
"$MIRRORCTL" activate db --socket "$T/alpha.sock" >/dev/null || fail "activate alpha failed"
random_file "$T/random.bin" 8
qemu-io -f raw "$URI" -c "write -P 0x5a 0 16M" -c "write -P 0x3c 100M 1M" -c "flush" >"$T/qio.out" 2>&1 ||
	fail "qemu-io writes failed: $(cat "$T/qio.out")"
nbdcopy --flush "$T/random.bin" "$URI" || fail "nbdcopy into alpha failed"
wait_for alpha "m['in_flight']['awaiting_peer_acks']" 0 10
stop_agent alpha
stop_agent beta
compare_data "before the damage"

# ---- 2. damage beta's data partition behind the mirror's back.
# Whole blocks: the first, its neighbour and block 1000 (random data), block 25650
# (the 0x3c pattern), block 40000 (never written), the last block. Plus one byte
# flipped in block 3000 (the 0x5a pattern).
LAST=$((DATA_BYTES / BLOCK - 1))
DAMAGED=(0 1 1000 25650 40000 "$LAST")
for b in "${DAMAGED[@]}"; do
	head -c "$BLOCK" /dev/urandom | dd of="$S/beta.img" bs="$BLOCK" seek=$((OFF / BLOCK + b)) conv=notrunc status=none
done
FLIP=$((OFF + 3000 * BLOCK + 123))
"$PYTHON" - "$S/beta.img" "$FLIP" <<'EOF'
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2]))
    byte = f.read(1)[0]
    f.seek(int(sys.argv[2]))
    f.write(bytes([byte ^ 0xFF]))
EOF
REGIONS=$((${#DAMAGED[@]} + 1))
BYTES=$((REGIONS * BLOCK))
qemu-img compare -q --image-opts "$(data_opts "$S/alpha.img")" "$(data_opts "$S/beta.img")" 2>/dev/null &&
	fail "the damage did not change beta's data partition"
note "beta damaged in $REGIONS blocks (${DAMAGED[*]} and one byte of block 3000)"

# ---- 3. restart: "in sync" by the generations; verify finds exactly the damage.
start_agent alpha
start_agent beta
wait_for alpha "m['connection']['state']" connected 15
check_eq "alpha dirty bytes before verify" "$(jget alpha "m['dirty_bytes']")" 0
"$MIRRORCTL" activate db --socket "$T/alpha.sock" >/dev/null || fail "activate alpha failed"
"$MIRRORCTL" verify db --wait --socket "$T/alpha.sock" >"$T/verify.out" 2>&1 ||
	fail "verify --wait failed: $(cat "$T/verify.out")"
note "$(cat "$T/verify.out")"
grep -q "verified $DATA_BYTES of $DATA_BYTES bytes" "$T/verify.out" || fail "verify did not cover the volume: $(cat "$T/verify.out")"
grep -q ": $REGIONS differing regions ($BYTES bytes)" "$T/verify.out" || fail "verify output: $(cat "$T/verify.out")"
grep -q "mirrorctl rebuild db" "$T/verify.out" || fail "verify does not say how to copy them: $(cat "$T/verify.out")"
check_eq "status verify differing_regions" "$(jget alpha "m['verify']['differing_regions']")" "$REGIONS"
check_eq "status verify differing_bytes" "$(jget alpha "m['verify']['differing_bytes']")" "$BYTES"
check_eq "status verify running" "$(jget alpha "m['verify']['running']")" False
check_eq "alpha dirty bytes after verify" "$(jget alpha "m['dirty_bytes']")" "$BYTES"
check_eq "beta untouched by verify (resync bytes received)" "$(jget beta "m['engine_stats']['resync_bytes_received']")" 0
check_eq "alpha export open during verify" "$(jget alpha "m['export']['open']")" True

# ---- 4. rebuild on alpha copies exactly those regions; a second verify finds nothing.
sent0=$(jget alpha "m['engine_stats']['resync_bytes_sent']")
"$MIRRORCTL" rebuild db --socket "$T/alpha.sock" >"$T/rebuild.out" 2>&1 || fail "rebuild failed: $(cat "$T/rebuild.out")"
note "$(cat "$T/rebuild.out")"
wait_for alpha "m['dirty_bytes']" 0 30
wait_for alpha "m['connection']['state']" connected 30
wait_for beta "m['disk_state']" UpToDate 30
sent=$(($(jget alpha "m['engine_stats']['resync_bytes_sent']") - sent0))
note "the rebuild sent $sent bytes for $BYTES differing"
[ "$sent" -ge "$BYTES" ] && [ "$sent" -le $((BYTES + SLACK)) ] ||
	fail "the rebuild sent $sent bytes for $BYTES differing (tolerance +$SLACK)"
pass "the rebuild copied the differing regions ($sent bytes)"
check_eq "decision full_copy" "$(jget alpha "m['decision']['full_copy']")" False
"$MIRRORCTL" verify db --wait --socket "$T/alpha.sock" >"$T/verify2.out" 2>&1 ||
	fail "second verify failed: $(cat "$T/verify2.out")"
grep -q ": 0 differing regions (0 bytes)" "$T/verify2.out" || fail "second verify: $(cat "$T/verify2.out")"
pass "second verify: $(cat "$T/verify2.out")"
check_eq "alpha dirty bytes after the second verify" "$(jget alpha "m['dirty_bytes']")" 0
"$MIRRORCTL" deactivate db --socket "$T/alpha.sock" >/dev/null || fail "deactivate alpha failed"
stop_agent alpha
stop_agent beta
compare_data "after the rebuild"
qemu-io --image-opts "$(data_opts "$S/beta.img")" -c "read -P 0x3c 100M 1M" -c "read -P 0 $((LAST * BLOCK)) $BLOCK" >"$T/qio.out" 2>&1 ||
	fail "qemu-io on beta's partition failed: $(cat "$T/qio.out")"
grep -q "Pattern verification failed" "$T/qio.out" && fail "beta's partition does not hold alpha's data"
cmp -s -n $((8 * 1024 * 1024)) -i "$OFF:0" "$S/beta.img" "$T/random.bin" ||
	fail "beta's partition does not start with the random data alpha wrote"
pass t-verify
