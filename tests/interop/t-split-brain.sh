#!/usr/bin/env bash
# t-split-brain: both nodes wrote while apart — detected, reported, nothing copied
# until the operator says which side gives up its changes.
#
# What it proves, and how:
#   - two agents on loopback, 256 MiB data partitions created --blank (in sync at
#     once), a split_brain_hook that appends one line per run to a file per node;
#     alpha is activated and writes a common pattern (replicated);
#   - forced-permit on the secondary while the peer is connected and active is
#     refused: without --yes by mirrorctl itself with the risk explained (exit status
#     non-zero, the agent is not even asked), with --yes by the agent ("the peer is
#     active"); beta stays Secondary with its generation unchanged;
#   - `mirrorctl break db` on alpha parts the nodes; `forced-permit db --yes` on beta
#     (disconnected now) activates it with a new generation marked forced; both write
#     different data through their own exports (qemu-io patterns: regions only alpha
#     writes, regions only beta writes, one region both write);
#   - `mirrorctl rebuild db` on alpha lifts the break and the nodes reconnect while
#     both are still active: the split brain is reported on both nodes — status
#     `problem` ("split brain: ...") and `split_brain`, one ERROR line "SPLIT BRAIN" in
#     each log — and the hook runs exactly once per node (with MIRRORDISK_NODE, _PEER,
#     _MIRROR and _EVENT=SPLIT_BRAIN), although the dialers meet the same split brain
#     again and again (status links_established keeps growing: polled, bounded);
#   - nothing is copied: resync bytes are 0 on both nodes, each export still reads
#     back its own writes and not the other side's;
#   - `mirrorctl deactivate db` + `mirrorctl resolve db --discard-local` on beta: the
#     next connect is a differential copy from alpha (status decision "resolved",
#     full_copy false) of exactly the union of both journals (the bytes either side
#     wrote, within one 1 MiB resync chunk; far below the volume), the split brain is
#     over ("split brain over" logged, status split_brain null), the hook did not run
#     again; then the two data partitions are identical (qemu-img compare) and beta's
#     holds alpha's writes and none of its own (qemu-io pattern reads on the file);
#   - after_split_brain = "discard-zero-changes" (agents restarted with it): beta is
#     forced-permitted during a break but writes nothing and is deactivated, alpha
#     writes: at reconnect beta becomes the target of a differential copy by itself
#     (decision names the policy), no split brain is reported, no hook runs, and the
#     partitions end identical.
# mirrordisk-only.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$SERVER" != mirrordisk ]; then
	pass "t-split-brain (mirrordisk-only: $SERVER has no node agent)"
	exit 0
fi
require qemu-io qemu-img
MIRRORCTL=${MIRRORCTL:-$(dirname "$MIRRORDISK")/mirrorctl}
[ -x "$MIRRORCTL" ] || fail "mirrorctl binary $MIRRORCTL not found"

DATA_BYTES=$((256 * 1024 * 1024))
SLACK=$((1024 * 1024))

head -c 32 /dev/urandom | base64 >"$T/secret"
chmod 600 "$T/secret"
A_REPL=$(free_port)
B_REPL=$(free_port)
A_NBD=$(free_port)
B_NBD=$(free_port)
cat >"$T/sb-hook.sh" <<EOF
#!/bin/sh
# One line per run, one file per node.
echo "\$MIRRORDISK_NODE \$MIRRORDISK_EVENT \$MIRRORDISK_MIRROR \$MIRRORDISK_PEER" >>"$T/hook-\$MIRRORDISK_NODE.log"
EOF
chmod 755 "$T/sb-hook.sh"

write_config() { # FILE POLICY
	cat >"$1" <<EOF
[cluster]
name = "split-brain"
secret_file = "$T/secret"

[[node]]
name = "alpha"
id = 1
admin_socket = "$T/alpha.sock"

[[node]]
name = "beta"
id = 2
admin_socket = "$T/beta.sock"

[[mirror]]
name = "db"
peer_timeout_ms = 2000
after_split_brain = "$2"
split_brain_hook = "$T/sb-hook.sh"

[mirror.node.alpha]
device = "$S/alpha.img"
replication = ["127.0.0.1:$A_REPL"]
nbd_listen = "127.0.0.1:$A_NBD"

[mirror.node.beta]
device = "$S/beta.img"
replication = ["127.0.0.1:$B_REPL"]
nbd_listen = "127.0.0.1:$B_NBD"
EOF
}
write_config "$T/cluster.toml" disconnect
write_config "$T/zero.toml" discard-zero-changes
truncate -s 288M "$S/alpha.img" "$S/beta.img"
"$MIRRORCTL" create "$S/alpha.img" --mirror db --node 1 --peer 2 --data-size 256M --blank >/dev/null
"$MIRRORCTL" create "$S/beta.img" --mirror db --node 2 --peer 1 --data-size 256M --blank >/dev/null
OFF=$("$MIRRORCTL" inspect "$S/alpha.img" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["layout"]["data_offset"])')

declare -A PIDS=()
start_agent() { # NODE [CONFIG]
	echo "==== start $1" >>"$T/server-$1.log"
	"$MIRRORDISK" agent --config "${2:-$T/cluster.toml}" --node "$1" </dev/null >>"$T/server-$1.log" 2>&1 &
	PIDS[$1]=$!
	track_pid "${PIDS[$1]}"
	wait_until 10 "$MIRRORCTL" status --socket "$T/$1.sock" >/dev/null 2>&1 ||
		fail "agent $1 did not answer within 10 s"
}
stop_agent() { # NODE: SIGTERM, exit 0
	local rc=0
	kill -TERM "${PIDS[$1]}"
	wait "${PIDS[$1]}" || rc=$?
	check_eq "agent $1 exit status after SIGTERM" "$rc" 0
}
ctl() { # NODE ARGS...: mirrorctl against NODE's agent
	local node=$1
	shift
	"$MIRRORCTL" "$@" --socket "$T/$node.sock"
}
jget() { # NODE EXPR (Python on m)
	"$MIRRORCTL" status --json --socket "$T/$1.sock" |
		"$PYTHON" -c "import json,sys; m=json.load(sys.stdin)['mirrors'][0]; print($2)"
}
wait_for() { # NODE EXPR WANT TIMEOUT_S
	wait_until "$4" bash -c "[ \"\$(\"$MIRRORCTL\" status --json --socket '$T/$1.sock' | \"$PYTHON\" -c \"import json,sys; m=json.load(sys.stdin)['mirrors'][0]; print($2)\")\" = '$3' ]" ||
		fail "$1: $2 did not become '$3' within $4 s (now: $(jget "$1" "$2"))"
	pass "$1: $2 = $3"
}
qio() { # WHAT URI-OR-IMAGE-OPTS qemu-io commands...: run them, no pattern mismatch allowed
	local what=$1 target=$2 args=() c
	shift 2
	for c in "$@"; do args+=(-c "$c"); done
	if [[ "$target" == nbd://* ]]; then
		qemu-io -f raw "$target" "${args[@]}" >"$T/qio.out" 2>&1 || fail "$what: qemu-io failed: $(cat "$T/qio.out")"
	else
		qemu-io --image-opts "$target" "${args[@]}" >"$T/qio.out" 2>&1 || fail "$what: qemu-io failed: $(cat "$T/qio.out")"
	fi
	grep -q "Pattern verification failed" "$T/qio.out" && fail "$what: read back other data: $(grep -B1 'Pattern verification failed' "$T/qio.out" | head -4)"
	pass "$what"
}
data_opts() { echo "driver=raw,offset=$OFF,size=$DATA_BYTES,file.filename=$1"; }
compare_data() { # WHAT
	qemu-img compare --image-opts "$(data_opts "$S/alpha.img")" "$(data_opts "$S/beta.img")" >"$T/compare.out" 2>&1 ||
		fail "$1: the data partitions differ: $(cat "$T/compare.out")"
	pass "$1: data partitions identical"
}
hook_runs() { # NODE: lines the hook wrote for NODE
	if [ -f "$T/hook-$1.log" ]; then wc -l <"$T/hook-$1.log"; else echo 0; fi
}
sb_errors() { # NODE: ERROR lines announcing a split brain
	grep -c ' ERROR .*SPLIT BRAIN' "$T/server-$1.log" || true
}
A_URI="nbd://127.0.0.1:$A_NBD/db"
B_URI="nbd://127.0.0.1:$B_NBD/db"

# ---- 1. in sync, alpha active, a common pattern replicated.
start_agent alpha
start_agent beta
wait_for alpha "m['connection']['state']" connected 15
ctl alpha activate db >/dev/null || fail "activate alpha failed"
qio "common pattern written through alpha" "$A_URI" "write -P 0x11 0 1M" "flush"
wait_for alpha "m['in_flight']['awaiting_peer_acks']" 0 10

# ---- 2. forced-permit on the secondary while the peer is connected and active: refused.
gen0=$(jget beta "m['generations']['current']")
rc=0
ctl beta forced-permit db >"$T/fp-noyes.out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] || fail "forced-permit without --yes succeeded: $(cat "$T/fp-noyes.out")"
grep -q "split brain" "$T/fp-noyes.out" && grep -q -- "--yes" "$T/fp-noyes.out" ||
	fail "forced-permit without --yes does not explain the risk: $(cat "$T/fp-noyes.out")"
pass "forced-permit without --yes refused (exit $rc) with the risk explained"
rc=0
ctl beta activate db --force >"$T/force-noyes.out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] && grep -q -- "--yes" "$T/force-noyes.out" ||
	fail "activate --force without --yes: $(cat "$T/force-noyes.out")"
pass "activate --force without --yes refused"
rc=0
ctl beta forced-permit db --yes >"$T/fp-active.out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] || fail "forced-permit succeeded while the peer is connected and active: $(cat "$T/fp-active.out")"
grep -q "refused" "$T/fp-active.out" && grep -qi "peer is active" "$T/fp-active.out" ||
	fail "forced-permit refusal does not say why: $(cat "$T/fp-active.out")"
pass "forced-permit --yes refused with the peer active: $(cat "$T/fp-active.out")"
check_eq "beta role after the refused forced-permit" "$(jget beta "m['role']")" Secondary
check_eq "beta generation after the refused forced-permit" "$(jget beta "m['generations']['current']")" "$gen0"
check_eq "beta forced_permit after the refusal" "$(jget beta "m['forced_permit']")" None
check_eq "still connected after the refusal" "$(jget alpha "m['connection']['state']")" connected

# ---- 3. apart: break on alpha, forced-permit on beta, both write.
ctl alpha break db >/dev/null || fail "break failed"
wait_for alpha "m['connection']['link']['state']" broken 10
wait_for beta "m['connection']['state']" disconnected 10
ctl beta forced-permit db --yes >"$T/fp.out" 2>&1 || fail "forced-permit on disconnected beta failed: $(cat "$T/fp.out")"
grep -q "marked forced" "$T/fp.out" || fail "forced-permit message: $(cat "$T/fp.out")"
note "$(cat "$T/fp.out")"
check_eq "beta role after forced-permit" "$(jget beta "m['role']")" Primary
check_eq "beta forced_permit recorded" "$(jget beta "'yes' if m['forced_permit'] else 'no'")" yes
grep -q "FORCED-PERMIT" "$T/server-beta.log" || fail "the forced-permit is not logged"
# alpha only: 1M+64k, 8M+4k; beta only: 2M+64k, 9M+4k; both: 16M+64k.
qio "alpha writes while apart" "$A_URI" \
	"write -P 0xa1 1M 64k" "write -P 0xa2 8M 4k" "write -P 0xa3 16M 64k" "flush"
qio "beta writes while apart" "$B_URI" \
	"write -P 0xb1 2M 64k" "write -P 0xb2 9M 4k" "write -P 0xb3 16M 64k" "flush"
EACH=$(((64 + 4 + 64) * 1024))
UNION=$(((64 + 4 + 64 + 64 + 4) * 1024))
check_eq "alpha dirty bytes while apart" "$(jget alpha "m['dirty_bytes']")" "$EACH"
check_eq "beta dirty bytes while apart" "$(jget beta "m['dirty_bytes']")" "$EACH"

# ---- 4. reconnect with both active: split brain reported once per node, nothing copied.
ctl alpha rebuild db >/dev/null || fail "rebuild (lift the break) failed"
for node in alpha beta; do
	wait_for "$node" "'yes' if m['split_brain'] else 'no'" yes 15
	problem=$(jget "$node" "m['problem']")
	case "$problem" in
	"split brain:"*) pass "$node status problem: $problem" ;;
	*) fail "$node status problem is not a split brain: $problem" ;;
	esac
done
for node in alpha beta; do
	wait_until 10 bash -c "[ -f '$T/hook-$node.log' ] && [ \$(wc -l <'$T/hook-$node.log') -ge 1 ]" ||
		fail "the split-brain hook did not run on $node"
	wait_for "$node" "str((m['split_brain'] or {}).get('hook')).startswith('exit status 0')" True 10
done
# The dialers keep meeting the same split brain: wait for two more connects.
links0=$(jget alpha "m['connection']['link']['links_established']")
wait_for alpha "m['connection']['link']['links_established'] >= $links0 + 2" True 20
for node in alpha beta; do
	check_eq "$node: hook runs for one split brain" "$(hook_runs "$node")" 1
	check_eq "$node: SPLIT BRAIN error lines" "$(sb_errors "$node")" 1
	check_eq "$node: resync bytes sent during the split brain" "$(jget "$node" "m['engine_stats']['resync_bytes_sent']")" 0
	check_eq "$node: resync bytes received during the split brain" "$(jget "$node" "m['engine_stats']['resync_bytes_received']")" 0
	check_eq "$node: export still open" "$(jget "$node" "m['export']['open']")" True
done
check_eq "alpha hook environment" "$(cat "$T/hook-alpha.log")" "alpha SPLIT_BRAIN db beta"
check_eq "beta hook environment" "$(cat "$T/hook-beta.log")" "beta SPLIT_BRAIN db alpha"
"$MIRRORCTL" status --socket "$T/alpha.sock" >"$T/status-sb.txt"
grep -qi "split brain" "$T/status-sb.txt" || fail "human status does not show the split brain: $(cat "$T/status-sb.txt")"
qio "alpha still reads its own writes, not beta's" "$A_URI" \
	"read -P 0x11 0 1M" "read -P 0xa1 1M 64k" "read -P 0xa2 8M 4k" "read -P 0xa3 16M 64k" \
	"read -P 0 2M 64k" "read -P 0 9M 4k"
qio "beta still reads its own writes, not alpha's" "$B_URI" \
	"read -P 0x11 0 1M" "read -P 0xb1 2M 64k" "read -P 0xb2 9M 4k" "read -P 0xb3 16M 64k" \
	"read -P 0 1M 64k" "read -P 0 8M 4k"

# ---- 5. resolve on beta: differential copy of both journals from alpha.
ctl beta deactivate db >/dev/null || fail "deactivate beta failed"
check_eq "beta role after deactivate" "$(jget beta "m['role']")" Secondary
sent0=$(jget alpha "m['engine_stats']['resync_bytes_sent']")
ctl beta resolve db --discard-local >"$T/resolve.out" 2>&1 || fail "resolve failed: $(cat "$T/resolve.out")"
note "$(cat "$T/resolve.out")"
wait_for beta "m['disk_state']" UpToDate 30
wait_for alpha "m['connection']['state']" connected 30
wait_for alpha "m['dirty_bytes']" 0 30
decision=$(jget alpha "m['decision']['text']")
note "alpha's connect decision: $decision"
case "$decision" in
*"resolved: the peer discards its changes"*) pass "the connect applied the resolution" ;;
*) fail "unexpected decision after the resolution: $decision" ;;
esac
check_eq "decision full_copy" "$(jget alpha "m['decision']['full_copy']")" False
sent=$(($(jget alpha "m['engine_stats']['resync_bytes_sent']") - sent0))
note "resync sent $sent bytes for a union of $UNION bytes written apart"
[ "$sent" -ge "$UNION" ] || fail "the resync sent $sent bytes, less than the $UNION both sides wrote"
[ "$sent" -le $((UNION + SLACK)) ] || fail "the resync sent $sent bytes, more than the $UNION written + $SLACK"
pass "differential: $sent bytes for a $DATA_BYTES-byte volume"
for node in alpha beta; do
	wait_for "$node" "m['split_brain']" None 10
	grep -q "split brain over" "$T/server-$node.log" || fail "$node did not log the end of the split brain"
	check_eq "$node: hook runs after the resolution" "$(hook_runs "$node")" 1
done
qio "alpha's writes after the resolution" "$A_URI" \
	"read -P 0x11 0 1M" "read -P 0xa1 1M 64k" "read -P 0xa2 8M 4k" "read -P 0xa3 16M 64k" \
	"read -P 0 2M 64k" "read -P 0 9M 4k"
ctl alpha deactivate db >/dev/null || fail "deactivate alpha failed"
stop_agent alpha
stop_agent beta
compare_data "after the resolution"
qio "beta's data partition holds alpha's writes and none of its own" "$(data_opts "$S/beta.img")" \
	"read -P 0x11 0 1M" "read -P 0xa1 1M 64k" "read -P 0xa2 8M 4k" "read -P 0xa3 16M 64k" \
	"read -P 0 2M 64k" "read -P 0 9M 4k"

# ---- 6. after_split_brain = "discard-zero-changes": the side without changes yields.
start_agent alpha "$T/zero.toml"
start_agent beta "$T/zero.toml"
wait_for alpha "m['connection']['state']" connected 15
check_eq "policy in status" "$(jget alpha "m['after_split_brain']")" discard-zero-changes
ctl alpha activate db >/dev/null || fail "activate alpha failed"
ctl alpha break db >/dev/null || fail "break failed"
wait_for beta "m['connection']['state']" disconnected 10
ctl beta forced-permit db --yes >/dev/null || fail "forced-permit on beta failed"
ctl beta deactivate db >/dev/null || fail "deactivate beta failed"
qio "alpha writes while apart (beta wrote nothing)" "$A_URI" "write -P 0xc1 32M 64k" "flush"
sent0=$(jget alpha "m['engine_stats']['resync_bytes_sent']")
ctl alpha rebuild db >/dev/null || fail "rebuild (lift the break) failed"
wait_for beta "m['disk_state']" UpToDate 30
wait_for alpha "m['connection']['state']" connected 30
wait_for alpha "m['dirty_bytes']" 0 30
decision=$(jget alpha "m['decision']['text']")
note "alpha's connect decision: $decision"
case "$decision" in
*"discard-zero-changes"*) pass "discard-zero-changes resolved it" ;;
*) fail "unexpected decision with discard-zero-changes: $decision" ;;
esac
sent=$(($(jget alpha "m['engine_stats']['resync_bytes_sent']") - sent0))
[ "$sent" -ge $((64 * 1024)) ] && [ "$sent" -le $((64 * 1024 + SLACK)) ] ||
	fail "discard-zero-changes copied $sent bytes for 65536 written"
pass "discard-zero-changes copied $sent bytes"
for node in alpha beta; do
	check_eq "$node: no split brain reported" "$(jget "$node" "m['split_brain']")" None
	check_eq "$node: hook runs (unchanged)" "$(hook_runs "$node")" 1
	check_eq "$node: SPLIT BRAIN error lines (unchanged)" "$(sb_errors "$node")" 1
done
ctl alpha deactivate db >/dev/null || fail "deactivate alpha failed"
stop_agent alpha
stop_agent beta
compare_data "after discard-zero-changes"
qio "beta holds alpha's write" "$(data_opts "$S/beta.img")" "read -P 0xc1 32M 64k"
pass t-split-brain
