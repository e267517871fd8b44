#!/usr/bin/env bash
# t-agent-basic: two node agents on loopback keep one mirror's two disks identical.
#
# What it proves, and how:
#   - a bad configuration or a missing device is refused with one error line naming
#     the field or file, exit status non-zero, no socket left behind;
#   - wrong secret on one side: the handshake is refused and logged on both agents,
#     the disks stay new (generation "just created", Inconsistent), nothing is copied;
#   - `mirrorctl status` works while the peer agent is down (peer unknown,
#     disconnected);
#   - with the right secret both agents connect and wait for the operator; an
#     inactive node refuses NBD clients with "mirror db is not active on this node";
#     activating an Inconsistent disk is refused;
#   - `mirrorctl rebuild db --full --from alpha` copies alpha to beta (status --json
#     polled, bounded, until beta is UpToDate); then alpha is activated and written
#     through its NBD export with nbdcopy (random data over the whole export) and
#     qemu-io (patterns, unaligned 512-byte writes, write-zeroes, discard, FUA,
#     pipelined aio writes) and fio (randwrite QD32, verify=crc32c), read back through
#     the export;
#   - both agents stop on SIGTERM with exit status 0; the two data partitions are
#     compared with `qemu-img compare` (raw driver with the data partition's offset and
#     size): identical. The CLUSTER partitions differ by design and are not compared.
#   - restarted, the agents reconnect in sync (both UpToDate, nothing dirty).
# mirrordisk-only: the reference servers have no agent.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$SERVER" != mirrordisk ]; then
	pass "t-agent-basic (mirrordisk-only: $SERVER has no node agent)"
	exit 0
fi
require qemu-io qemu-img nbdinfo nbdcopy fio
MIRRORCTL=${MIRRORCTL:-$(dirname "$MIRRORDISK")/mirrorctl}
[ -x "$MIRRORCTL" ] || fail "mirrorctl binary $MIRRORCTL not found"

DISK_MIB=96
A_DISK=$S/alpha.img
B_DISK=$S/beta.img
SECRET=$T/secret
OTHER_SECRET=$T/other-secret
CONFIG=$T/cluster.toml
head -c 32 /dev/urandom | base64 >"$SECRET"
head -c 32 /dev/urandom | base64 >"$OTHER_SECRET"
chmod 600 "$SECRET" "$OTHER_SECRET"

A_REPL=$(free_port)
B_REPL=$(free_port)
A_NBD=$(free_port)
B_NBD=$(free_port)

write_config() { # FILE SECRET-FILE [BETA-DEVICE]
	cat >"$1" <<EOF
# Written by t-agent-basic: two agents on one machine.
[cluster]
name = "interop"
secret_file = "$2"

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
peer_timeout_ms = 3000

[mirror.node.alpha]
device = "$A_DISK"
replication = ["127.0.0.1:$A_REPL"]
nbd_listen = "127.0.0.1:$A_NBD"

[mirror.node.beta]
device = "${3:-$B_DISK}"
replication = ["127.0.0.1:$B_REPL"]
nbd_listen = "127.0.0.1:$B_NBD"
EOF
}

declare -A AGENT_PID=()

start_agent() { # NODE [CONFIG]
	local node=$1 config=${2:-$CONFIG}
	echo "==== start $node ($config)" >>"$T/server-$node.log"
	"$MIRRORDISK" agent --config "$config" --node "$node" </dev/null >>"$T/server-$node.log" 2>&1 &
	AGENT_PID[$node]=$!
	track_pid "${AGENT_PID[$node]}"
	wait_until 10 "$MIRRORCTL" status --socket "$T/$node.sock" >/dev/null 2>&1 ||
		fail "agent $node did not answer on its admin socket within 10 s"
}

stop_agent() { # NODE: SIGTERM, bounded wait, exit status 0
	local node=$1 pid=${AGENT_PID[$1]} rc=0 i
	kill -TERM "$pid"
	for ((i = 0; i < 200; i++)); do
		_alive "$pid" || break
		sleep 0.05
	done
	_alive "$pid" && fail "agent $node did not stop within 10 s of SIGTERM"
	wait "$pid" || rc=$?
	check_eq "agent $node exit status after SIGTERM" "$rc" 0
	[ -e "$T/$node.sock" ] && fail "agent $node left its admin socket behind"
	unset "AGENT_PID[$node]"
}

status_json() { "$MIRRORCTL" status --json --socket "$T/$1.sock"; }

# jget NODE EXPR: a value from NODE's status (EXPR is Python on `m`, the first mirror).
jget() {
	status_json "$1" | "$PYTHON" -c "import json,sys; m=json.load(sys.stdin)['mirrors'][0]; v=$2; print(json.dumps(v) if isinstance(v,(bool,type(None))) else v)"
}

# wait_status NODE EXPR WANT TIMEOUT_S
wait_status() {
	local node=$1 expr=$2 want=$3 timeout_s=$4
	wait_until "$timeout_s" bash -c "[ \"\$(\"$MIRRORCTL\" status --json --socket '$T/$node.sock' | \"$PYTHON\" -c \"import json,sys; m=json.load(sys.stdin)['mirrors'][0]; print($expr)\")\" = '$want' ]" ||
		fail "$node: $expr did not become '$want' within $timeout_s s (now: $(jget "$node" "$expr"))"
	pass "$node: $expr = $want"
}

data_sha() { # DISK: sha256 of the data partition only
	local off size
	off=$("$MIRRORCTL" inspect "$1" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["layout"]["data_offset"])')
	size=$("$MIRRORCTL" inspect "$1" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["layout"]["data_bytes"])')
	tail -c +$((off + 1)) "$1" | head -c "$size" | sha256sum | cut -d' ' -f1
}

truncate -s "${DISK_MIB}M" "$A_DISK" "$B_DISK"
"$MIRRORCTL" create "$A_DISK" --mirror db --node 1 --peer 2 >/dev/null
"$MIRRORCTL" create "$B_DISK" --mirror db --node 2 --peer 1 >/dev/null

# ---- 1. bad configuration and missing device: one clear error, nothing left behind.
write_config "$T/typo.toml" "$SECRET"
sed -i 's/^peer_timeout_ms/peer_timeout_msec/' "$T/typo.toml"
rc=0
"$MIRRORDISK" agent --config "$T/typo.toml" --node alpha >"$T/typo.out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] || fail "an agent with a misspelt field started"
[ "$(grep -c error "$T/typo.out")" -eq 1 ] || fail "expected one error line: $(cat "$T/typo.out")"
grep -q 'peer_timeout_msec' "$T/typo.out" || fail "the error does not name the field: $(cat "$T/typo.out")"
[ -e "$T/alpha.sock" ] && fail "a refused agent left its admin socket"
pass "misspelt field refused: $(cat "$T/typo.out")"
write_config "$T/nodevice.toml" "$SECRET" "$S/missing.img"
rc=0
"$MIRRORDISK" agent --config "$T/nodevice.toml" --node beta >"$T/nodevice.out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] || fail "an agent with a missing device started"
grep -q "missing.img" "$T/nodevice.out" || fail "the error does not name the device: $(cat "$T/nodevice.out")"
pass "missing device refused: $(cat "$T/nodevice.out")"
chmod 644 "$SECRET"
rc=0
"$MIRRORDISK" agent --config "$T/nodevice.toml" --node alpha >"$T/secret.out" 2>&1 || rc=$?
chmod 600 "$SECRET"
[ "$rc" -ne 0 ] && grep -q "chmod 600" "$T/secret.out" || fail "a world-readable secret was accepted: $(cat "$T/secret.out")"
pass "world-readable secret refused"
A_SHA0=$(data_sha "$A_DISK")
B_SHA0=$(data_sha "$B_DISK")

# ---- 2. wrong secret on beta: refused and logged on both sides, nothing written.
write_config "$CONFIG" "$SECRET"
write_config "$T/wrong.toml" "$OTHER_SECRET"
start_agent alpha
start_agent beta "$T/wrong.toml"
wait_until 15 grep -q "authentication" "$T/server-alpha.log" ||
	fail "alpha did not log the failed authentication"
wait_until 15 grep -q "authentication" "$T/server-beta.log" ||
	fail "beta did not log the failed authentication"
pass "wrong secret: both agents logged the authentication failure"
check_eq "alpha connection with the wrong secret" "$(jget alpha "m['connection']['state']")" disconnected
check_eq "alpha generation with the wrong secret" "$(jget alpha "m['generations']['current']")" 0000000000000004
rc=0
"$MIRRORCTL" rebuild db --full --from alpha --socket "$T/alpha.sock" >"$T/rebuild.out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] && grep -q "not connected" "$T/rebuild.out" || fail "rebuild without a peer: $(cat "$T/rebuild.out")"
n=$(grep -c "authentication" "$T/server-alpha.log")
[ "$n" -le 3 ] || fail "the authentication failure was logged $n times (each retry?)"
stop_agent beta
stop_agent alpha
check_eq "alpha data partition after the wrong-secret run" "$(data_sha "$A_DISK")" "$A_SHA0"
check_eq "beta data partition after the wrong-secret run" "$(data_sha "$B_DISK")" "$B_SHA0"

# ---- 3. status with the peer agent down.
start_agent alpha
check_eq "alpha status, peer down: connection" "$(jget alpha "m['connection']['state']")" disconnected
check_eq "alpha status, peer down: peer" "$(jget alpha "m['peer']")" null
check_eq "alpha status, peer down: role" "$(jget alpha "m['role']")" Secondary
"$MIRRORCTL" status --socket "$T/alpha.sock" >"$T/status-down.txt" || fail "human status failed with the peer down"
grep -q "beta: unknown" "$T/status-down.txt" || fail "human status: $(cat "$T/status-down.txt")"
pass "status works with the peer down"

# ---- 4. connect; inactive nodes refuse NBD clients; the first full copy.
start_agent beta
wait_status alpha "m['connection']['state']" waiting-for-operator 15
wait_status beta "m['connection']['state']" waiting-for-operator 15
rc=0
qemu-img info "nbd://127.0.0.1:$A_NBD/db" >"$T/refused.out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] || fail "inactive alpha served an NBD client"
grep -q "mirror db is not active on this node (alpha)" "$T/refused.out" ||
	fail "inactive refusal message: $(cat "$T/refused.out")"
pass "inactive node refuses NBD clients: $(grep 'not active' "$T/refused.out")"
nbdinfo "nbd://127.0.0.1:$B_NBD/db" >/dev/null 2>&1 && fail "inactive beta served nbdinfo"
rc=0
"$MIRRORCTL" activate db --socket "$T/alpha.sock" >"$T/activate.out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] || fail "an Inconsistent disk was activated"
pass "activating an Inconsistent disk is refused: $(cat "$T/activate.out")"
"$MIRRORCTL" rebuild db --full --from alpha --config "$CONFIG" || fail "rebuild --full --from alpha failed"
wait_status beta "m['disk_state']" UpToDate 60
wait_status alpha "m['connection']['state']" connected 30
check_eq "alpha disk state after the full copy" "$(jget alpha "m['disk_state']")" UpToDate

# ---- 5. activate alpha and write through its export.
"$MIRRORCTL" activate db --config "$CONFIG" --node alpha || fail "activate alpha failed"
check_eq "alpha export open" "$(jget alpha "m['export']['open']")" true
URI="nbd://127.0.0.1:$A_NBD/db"
size=$(nbdinfo --size "$URI")
head -c "$size" /dev/urandom >"$T/random.bin"
nbdcopy --flush "$T/random.bin" "$URI" || fail "nbdcopy into alpha's export failed"
nbdcopy "$URI" "$T/readback.bin" || fail "nbdcopy out of alpha's export failed"
cmp -s "$T/random.bin" "$T/readback.bin" || fail "alpha's export does not read back what nbdcopy wrote"
pass "nbdcopy: $size random bytes written and read back through alpha"
qemu-io -f raw "$URI" \
	-c "write -P 0x5a 0 1M" \
	-c "write -f -P 0x6b 4M 64k" \
	-c "write -P 0x7c 2105856 512" \
	-c "write -P 0x7d 2109952 1536" \
	-c "write -z 16M 1M" \
	-c "discard 20M 1M" \
	-c "aio_write -P 0x21 24M 64k" -c "aio_write -P 0x22 25M 64k" -c "aio_write -P 0x23 26M 64k" \
	-c "aio_flush" -c "flush" >"$T/qemu-io.out" || fail "qemu-io writes failed: $(cat "$T/qemu-io.out")"
qemu-io -f raw "$URI" \
	-c "read -P 0x5a 0 1M" -c "read -P 0x6b 4M 64k" -c "read -P 0x7c 2105856 512" \
	-c "read -P 0x7d 2109952 1536" -c "read -P 0 16M 1M" -c "read -P 0 20M 1M" \
	-c "read -P 0x22 25M 64k" >"$T/qemu-io-read.out" || fail "qemu-io read-back failed: $(cat "$T/qemu-io-read.out")"
grep -q "Pattern verification failed" "$T/qemu-io-read.out" && fail "qemu-io read back other data"
pass "qemu-io patterns, unaligned writes, zeroes and discard read back through alpha"
# fio's verify workload through the replicated export: random writes of mixed sizes at
# QD 32 (beyond the qemu-io ranges), each block checksummed and read back by fio.
timeout 120 fio --name=agent-verify --ioengine=nbd --uri="$URI" --rw=randwrite \
	--bsrange=4k-64k --iodepth=32 --offset=32M --size=48M --verify=crc32c \
	--verify_fatal=1 --do_verify=1 --randrepeat=0 --verify_state_save=0 >"$T/fio.out" 2>&1 ||
	fail "fio verify through alpha failed: $(tail -5 "$T/fio.out")"
pass "fio randwrite QD32 with verify=crc32c through the replicated export"
wait_status alpha "m['in_flight']['awaiting_peer_acks']" 0 10
check_eq "alpha dirty bytes while connected" "$(jget alpha "m['dirty_bytes']")" 0
check_eq "beta disk state while alpha is active" "$(jget beta "m['disk_state']")" UpToDate
check_eq "beta sees alpha as" "$(jget beta "m['peer']['role']")" Primary
rc=0
qemu-img info "nbd://127.0.0.1:$B_NBD/db" >"$T/refused-b.out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] && grep -q "not active on this node (beta)" "$T/refused-b.out" ||
	fail "secondary beta did not refuse: $(cat "$T/refused-b.out")"
"$MIRRORCTL" deactivate db --socket "$T/alpha.sock" || fail "deactivate alpha failed"
check_eq "alpha role after deactivate" "$(jget alpha "m['role']")" Secondary

# ---- 6. stop both; the data partitions are identical.
stop_agent alpha
stop_agent beta
off=$("$MIRRORCTL" inspect "$A_DISK" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["layout"]["data_offset"])')
check_eq "beta data partition offset" \
	"$("$MIRRORCTL" inspect "$B_DISK" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["layout"]["data_offset"])')" "$off"
qemu-img compare \
	--image-opts "driver=raw,offset=$off,size=$size,file.filename=$A_DISK" \
	"driver=raw,offset=$off,size=$size,file.filename=$B_DISK" ||
	fail "the data partitions differ"
pass "data partitions identical ($size bytes at offset $off)"
tail -c +$((off + 1)) "$A_DISK" | head -c "$size" | cmp -s - "$T/readback.bin" &&
	fail "alpha's data partition still equals the nbdcopy image: the qemu-io writes are missing"

# ---- 7. restart: in sync at once.
start_agent alpha
start_agent beta
wait_status alpha "m['connection']['state']" connected 15
wait_status beta "m['disk_state']" UpToDate 15
check_eq "alpha dirty bytes after restart" "$(jget alpha "m['dirty_bytes']")" 0
stop_agent alpha
stop_agent beta
pass t-agent-basic
