#!/usr/bin/env bash
# t-agent-paths: a mirror with two mirror-connect networks survives the loss of one.
#
# How: two network namespaces (one per node) joined by two veth pairs, one per path
# (10.x.0.0/24 and 10.x.1.0/24); each agent runs in its namespace; both disks are
# created --blank, so they connect in sync. alpha is activated and fio writes through
# its export (from inside alpha's namespace) with a per-I/O latency log. Mid-run,
# path 0's veth is taken down. The link must time out (peer_timeout_ms = 1000), come
# back on path 1 (status shows path 1, connected), resync only the writes that were
# in flight (a differential resync: dirty bytes far below the disk size, never a full
# copy), and no write may stall much longer than the timeout. After both agents stop,
# the two data partitions must be identical.
# mirrordisk-only; needs root (network namespaces).
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$SERVER" != mirrordisk ]; then
	pass "t-agent-paths (mirrordisk-only: $SERVER has no node agent)"
	exit 0
fi
require ip fio qemu-img
[ "$(id -u)" -eq 0 ] || {
	[ "$CI" = true ] && fail "needs root (network namespaces)"
	_say "SKIP [$TEST_NAME]: needs root (network namespaces)"
	exit 77
}
MIRRORCTL=${MIRRORCTL:-$(dirname "$MIRRORDISK")/mirrorctl}
[ -x "$MIRRORCTL" ] || fail "mirrorctl binary $MIRRORCTL not found"

# Namespaces are not among lib.sh's tracked resources: remove them here, then run the
# shared cleanup (which kills the agents) with the test's exit status intact.
NS_A=mdpa$$
NS_B=mdpb$$
NET=$((100 + $$ % 100))
_remove_namespaces() {
	ip netns del "$NS_A" 2>/dev/null || true
	ip netns del "$NS_B" 2>/dev/null || true
}
trap 'rc=$?; set +e; cleanup_state "$STATE"; _remove_namespaces; (exit $rc); _on_exit' EXIT

for ns in "$NS_A" "$NS_B"; do
	ip netns add "$ns" || fail "cannot create network namespace $ns"
	ip -n "$ns" link set lo up
done
for p in 0 1; do
	ip link add "mdp$p-$$" type veth peer name "mdq$p-$$" || fail "cannot create veth pair"
	ip link set "mdp$p-$$" netns "$NS_A"
	ip link set "mdq$p-$$" netns "$NS_B"
	ip -n "$NS_A" addr add "10.$NET.$p.1/24" dev "mdp$p-$$"
	ip -n "$NS_B" addr add "10.$NET.$p.2/24" dev "mdq$p-$$"
	ip -n "$NS_A" link set "mdp$p-$$" up
	ip -n "$NS_B" link set "mdq$p-$$" up
done

head -c 32 /dev/urandom | base64 >"$T/secret"
chmod 600 "$T/secret"
truncate -s 192M "$S/alpha.img" "$S/beta.img"
cat >"$T/cluster.toml" <<EOF
[cluster]
name = "paths"
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
peer_timeout_ms = 1000

[mirror.node.alpha]
device = "$S/alpha.img"
replication = ["10.$NET.0.1:7789", "10.$NET.1.1:7789"]
nbd_listen = "127.0.0.1:10809"

[mirror.node.beta]
device = "$S/beta.img"
replication = ["10.$NET.0.2:7789", "10.$NET.1.2:7789"]
nbd_listen = "127.0.0.1:10810"
EOF
"$MIRRORCTL" create "$S/alpha.img" --mirror db --node 1 --peer 2 --blank >/dev/null
"$MIRRORCTL" create "$S/beta.img" --mirror db --node 2 --peer 1 --blank >/dev/null

declare -A PIDS=()
start_agent() { # NODE NAMESPACE
	ip netns exec "$2" "$MIRRORDISK" agent --config "$T/cluster.toml" --node "$1" \
		</dev/null >>"$T/server-$1.log" 2>&1 &
	PIDS[$1]=$!
	track_pid "${PIDS[$1]}"
	wait_until 10 "$MIRRORCTL" status --socket "$T/$1.sock" >/dev/null 2>&1 ||
		fail "agent $1 did not answer within 10 s"
}
jget() { # NODE EXPR (Python on m, the mirror's status)
	"$MIRRORCTL" status --json --socket "$T/$1.sock" |
		"$PYTHON" -c "import json,sys; m=json.load(sys.stdin)['mirrors'][0]; print($2)"
}
wait_for() { # NODE EXPR WANT TIMEOUT_S
	wait_until "$4" bash -c "[ \"\$(\"$MIRRORCTL\" status --json --socket '$T/$1.sock' | \"$PYTHON\" -c \"import json,sys; m=json.load(sys.stdin)['mirrors'][0]; print($2)\")\" = '$3' ]" ||
		fail "$1: $2 did not become '$3' within $4 s (now: $(jget "$1" "$2"))"
	pass "$1: $2 = $3"
}

start_agent alpha "$NS_A"
start_agent beta "$NS_B"
wait_for alpha "m['connection']['state']" connected 15
check_eq "path in use at start" "$(jget alpha "m['connection']['link']['path']")" 0
check_eq "alpha disk state (--blank pair)" "$(jget alpha "m['disk_state']")" UpToDate
"$MIRRORCTL" activate db --socket "$T/alpha.sock" || fail "activate alpha failed"

ip netns exec "$NS_A" timeout 60 fio --name=paths --ioengine=nbd \
	--uri=nbd://127.0.0.1:10809/db --rw=randwrite --bs=4k --iodepth=8 --size=160M \
	--runtime=10 --time_based=1 --write_lat_log="$T/lat" --log_avg_msec=0 \
	>"$T/fio.out" 2>&1 &
FIO=$!
track_pid "$FIO"
sleep 3
note "taking path 0 down"
ip -n "$NS_A" link set "mdp0-$$" down
wait_for alpha "m['connection']['link']['path']" 1 15
wait_for alpha "m['connection']['state']" connected 30
wait "$FIO" || fail "fio failed across the path failover: $(tail -5 "$T/fio.out")"
links=$(jget alpha "m['connection']['link']['links_established']")
[ "$links" -ge 2 ] || fail "expected a second link, status says $links"
resynced=$(jget alpha "m['engine_stats']['resync_bytes_sent']")
note "differential resync after the failover: $resynced bytes"
[ "$resynced" -lt $((64 * 1024 * 1024)) ] || fail "the failover cost a large resync ($resynced bytes)"
check_eq "alpha dirty bytes after the failover" "$(jget alpha "m['dirty_bytes']")" 0
worst_us=$(cut -d, -f2 "$T"/lat_clat.*.log | sort -n | tail -1)
worst_us=$((worst_us / 1000))
note "slowest write: $worst_us us"
[ "$worst_us" -lt 5000000 ] || fail "a write stalled $worst_us us across the failover (bound: peer_timeout_ms plus reconnect)"
pass "path 0 lost: link back on path 1, writes stalled at most $((worst_us / 1000)) ms"

"$MIRRORCTL" deactivate db --socket "$T/alpha.sock" >/dev/null || fail "deactivate failed"
for node in alpha beta; do
	kill -TERM "${PIDS[$node]}"
	rc=0
	wait "${PIDS[$node]}" || rc=$?
	check_eq "agent $node exit status" "$rc" 0
done
read -r off size < <("$MIRRORCTL" inspect "$S/alpha.img" --json |
	"$PYTHON" -c 'import json,sys; d=json.load(sys.stdin)["layout"]; print(d["data_offset"], d["data_bytes"])')
qemu-img compare \
	--image-opts "driver=raw,offset=$off,size=$size,file.filename=$S/alpha.img" \
	"driver=raw,offset=$off,size=$size,file.filename=$S/beta.img" ||
	fail "the data partitions differ after the path failover"
pass "data partitions identical after the path failover"
pass t-agent-paths
