#!/usr/bin/env bash
# t-wrong-mirror: a peer whose disk does not match is refused at the handshake, on both
# sides, with a clear log line, and neither disk is written.
#
# What it proves, and how:
#   - a control first: alpha alone (no peer) started and stopped cleanly. Every start
#     legitimately writes the CLUSTER partition: recovery writes a fresh journal
#     snapshot into the other slot before admitting anything (docs/on-disk-format.md
#     §4.3 step 5; a clean stop would also cool a hot activity log). The test records
#     which metadata areas the control touched (4 KiB blocks mapped onto the layout
#     from `mirrorctl inspect --json`; measured: the snapshot slots only). "Nothing
#     written" below means: the data partition is byte-identical, no metadata area
#     outside the control's set changed, and the metadata's meaning (generations, disk
#     state, role, flags, dirty regions) is identical;
#   - beta's disk created with the same --mirror name but another mirror UUID
#     (`--uuid`): both agents log "disk belongs to another mirror", neither links
#     (links_established 0, disconnected), nothing written on either disk;
#   - beta's disk created with another --mirror name: beta's agent refuses to start
#     with one error line naming the device and both names, exit status non-zero, no
#     socket left, the whole file byte-identical (the check comes before any write);
#   - a data-size mismatch (beta created with a larger --data-size): "data size
#     mismatch" logged on both sides with both sizes, nothing written;
#   - a bitmap granularity mismatch (--granularity 64K on beta): "bitmap granularity
#     mismatch" on both sides, nothing written;
#   - a logical block size mismatch (beta on a loop device with 4096-byte sectors,
#     alpha on a file with 512): "logical block size mismatch" on both sides, nothing
#     written (needs root for losetup);
#   - each refusal is logged a bounded number of times (the link logs a problem once
#     until it is up again, not once per retry);
#   - finally a matching beta connects at once and in sync with the untouched alpha.
#   Not covered end to end: "no common protocol version" — the agent always offers
#   the one range this build speaks (VersionRange::SUPPORTED) and has no knob to change
#   it; the unit tests in src/core/repl/handshake.rs cover the refusal (and the block
#   size and granularity mismatches) on the handshake machine itself.
# mirrordisk-only.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$SERVER" != mirrordisk ]; then
	pass "t-wrong-mirror (mirrordisk-only: $SERVER has no node agent)"
	exit 0
fi
MIRRORCTL=${MIRRORCTL:-$(dirname "$MIRRORDISK")/mirrorctl}
[ -x "$MIRRORCTL" ] || fail "mirrorctl binary $MIRRORCTL not found"
ROOT=false
if [ "$(id -u)" -eq 0 ]; then
	require losetup
	ROOT=true
elif [ "$CI" = true ]; then
	fail "needs root for the block-size case (losetup)"
fi

head -c 32 /dev/urandom | base64 >"$T/secret"
chmod 600 "$T/secret"
A_REPL=$(free_port)
B_REPL=$(free_port)

write_config() { # FILE BETA-DEVICE
	cat >"$1" <<EOF
[cluster]
name = "wrong-mirror"
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

[mirror.node.alpha]
device = "$S/alpha.img"
replication = ["127.0.0.1:$A_REPL"]

[mirror.node.beta]
device = "$2"
replication = ["127.0.0.1:$B_REPL"]
EOF
}

declare -A PIDS=()
start_agent() { # NODE CONFIG
	echo "==== start $1 ($2)" >>"$T/server-$1.log"
	"$MIRRORDISK" agent --config "$2" --node "$1" </dev/null >>"$T/server-$1.log" 2>&1 &
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
jget() { # NODE EXPR (Python on m)
	"$MIRRORCTL" status --json --socket "$T/$1.sock" |
		"$PYTHON" -c "import json,sys; m=json.load(sys.stdin)['mirrors'][0]; print($2)"
}
wait_for() { # NODE EXPR WANT TIMEOUT_S
	wait_until "$4" bash -c "[ \"\$(\"$MIRRORCTL\" status --json --socket '$T/$1.sock' | \"$PYTHON\" -c \"import json,sys; m=json.load(sys.stdin)['mirrors'][0]; print($2)\")\" = '$3' ]" ||
		fail "$1: $2 did not become '$3' within $4 s (now: $(jget "$1" "$2"))"
	pass "$1: $2 = $3"
}

# areas.py BEFORE AFTER: the metadata areas (and "data") in which AFTER differs from
# BEFORE, 4 KiB block by block, on the layout BEFORE's superblock records. Snapshot
# slots A and B are one area: a start writes whichever is older.
cat >"$T/areas.py" <<'EOF'
import json, subprocess, sys
before, after, ctl = sys.argv[1], sys.argv[2], sys.argv[3]
layout = json.loads(subprocess.check_output([ctl, "inspect", before, "--json"]))["layout"]
areas = [("superblock", 0, 8192)]
for name, key in [("activity-log", "al"), ("snapshot", "snapshot_a"), ("snapshot", "snapshot_b"), ("log", "log")]:
    areas.append((name, layout[key]["offset"], layout[key]["offset"] + layout[key]["size"]))
areas.append(("data", layout["data_offset"], layout["data_offset"] + layout["data_bytes"]))
def area(offset):
    for name, start, end in areas:
        if start <= offset < end:
            return name
    return "unused"
changed = set()
with open(before, "rb") as a, open(after, "rb") as b:
    offset = 0
    while True:
        x, y = a.read(1 << 20), b.read(1 << 20)
        if not x and not y:
            break
        if x != y:
            for i in range(0, max(len(x), len(y)), 4096):
                if x[i:i + 4096] != y[i:i + 4096]:
                    changed.add(area(offset + i))
        offset += 1 << 20
print(" ".join(sorted(changed)) or "nothing")
EOF
# meaning DEVICE: what the metadata says, without the parts every start rewrites.
meaning() {
	"$MIRRORCTL" inspect "$1" --json | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)
j = d["journal"]
print(json.dumps([d["mirror_uuid"], d["generations"], d["disk_state"], d["role"], d["flags"],
                  j["dirty_regions"], j["dirty_bytes"], d["recovery_error"]]))'
}
# snap NAME DEVICE: remember DEVICE's bytes and meaning before a run.
snap() {
	cp --sparse=always "$2" "$S/$1.before"
	meaning "$2" >"$T/$1.meaning"
}
# untouched WHAT NAME DEVICE: DEVICE changed only where every start writes.
untouched() {
	local what=$1 name=$2 device=$3 changed a
	changed=$("$PYTHON" "$T/areas.py" "$S/$name.before" "$device" "$MIRRORCTL")
	for a in $changed; do
		case " $STARTUP_AREAS " in
		*" $a "*) ;;
		*) fail "$what: $name's $a changed (a start alone changes only: $STARTUP_AREAS)" ;;
		esac
	done
	check_eq "$what: $name's metadata meaning" "$(meaning "$device")" "$(cat "$T/$name.meaning")"
	pass "$what: $name's data partition untouched (changed areas: $changed)"
	rm -f "$S/$name.before"
}
# refused WHAT BETA-DEVICE TEXT: both agents start, both log TEXT, neither links,
# nothing is written.
refused() {
	local what=$1 device=$2 text=$3 node n
	write_config "$T/$what.toml" "$device"
	snap alpha "$S/alpha.img"
	snap beta "$device"
	: >"$T/server-alpha.log"
	: >"$T/server-beta.log"
	start_agent alpha "$T/$what.toml"
	start_agent beta "$T/$what.toml"
	for node in alpha beta; do
		wait_until 15 grep -q "$text" "$T/server-$node.log" ||
			fail "$what: $node did not log '$text': $(tail -n 5 "$T/server-$node.log")"
	done
	for node in alpha beta; do
		pass "$what: $node logged: $(grep -m1 "$text" "$T/server-$node.log" | sed -E 's/^[^ ]+ +[A-Z]+ [^ ]+ //')"
	done
	for node in alpha beta; do
		check_eq "$what: $node connection" "$(jget "$node" "m['connection']['state']")" disconnected
		check_eq "$what: $node links established" "$(jget "$node" "m['connection']['link']['links_established']")" 0
		case "$(jget "$node" "m['connection']['link']['last_problem']")" in
		*"$text"*) pass "$what: $node status names the problem" ;;
		*) fail "$what: $node status last_problem: $(jget "$node" "m['connection']['link']['last_problem']")" ;;
		esac
	done
	check_eq "$what: alpha generation" "$(jget alpha "m['generations']['current']")" "$GEN_A"
	stop_agent alpha
	stop_agent beta
	for node in alpha beta; do
		n=$(grep -c "$text" "$T/server-$node.log")
		[ "$n" -le 4 ] || fail "$what: $node logged the refusal $n times (once per retry?)"
	done
	untouched "$what" alpha "$S/alpha.img"
	untouched "$what" beta "$device"
}

truncate -s 96M "$S/alpha.img"
"$MIRRORCTL" create "$S/alpha.img" --mirror db --node 1 --peer 2 --data-size 64M --blank >/dev/null

# ---- 0. control: what a start and a clean stop write by themselves.
write_config "$T/alone.toml" "$S/nobody.img"
snap alpha "$S/alpha.img"
start_agent alpha "$T/alone.toml"
GEN_A=$(jget alpha "m['generations']['current']")
stop_agent alpha
STARTUP_AREAS=$("$PYTHON" "$T/areas.py" "$S/alpha.before" "$S/alpha.img" "$MIRRORCTL")
note "a start and a clean stop alone write: $STARTUP_AREAS"
case " $STARTUP_AREAS " in *" data "* | *" unused "*) fail "a start alone wrote outside the metadata areas: $STARTUP_AREAS" ;; esac
check_eq "control: alpha's metadata meaning" "$(meaning "$S/alpha.img")" "$(cat "$T/alpha.meaning")"

# ---- 1. another mirror UUID under the same name.
truncate -s 96M "$S/beta-uuid.img"
"$MIRRORCTL" create "$S/beta-uuid.img" --mirror db --node 2 --peer 1 --data-size 64M --blank \
	--uuid 0badc0de-0000-4000-8000-000000000001 >/dev/null
refused uuid "$S/beta-uuid.img" "disk belongs to another mirror"

# ---- 2. another mirror name: refused before anything is opened for writing.
truncate -s 96M "$S/beta-name.img"
"$MIRRORCTL" create "$S/beta-name.img" --mirror other --node 2 --peer 1 --data-size 64M --blank >/dev/null
write_config "$T/name.toml" "$S/beta-name.img"
sum0=$(sha "$S/beta-name.img")
rc=0
"$MIRRORDISK" agent --config "$T/name.toml" --node beta >"$T/name.out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] || fail "an agent started on another mirror's disk"
[ "$(grep -c error "$T/name.out")" -eq 1 ] || fail "expected one error line: $(cat "$T/name.out")"
grep -q 'beta-name.img holds mirror "other", not "db"' "$T/name.out" || fail "the error does not name the device and both mirrors: $(cat "$T/name.out")"
[ -e "$T/beta.sock" ] && fail "a refused agent left its admin socket"
check_eq "another mirror's disk, whole file" "$(sha "$S/beta-name.img")" "$sum0"
pass "another mirror name refused at start: $(cat "$T/name.out")"

# ---- 3. data size mismatch.
truncate -s 160M "$S/beta-size.img"
"$MIRRORCTL" create "$S/beta-size.img" --mirror db --node 2 --peer 1 --data-size 128M --blank >/dev/null
refused size "$S/beta-size.img" "data size mismatch"
grep -q "134217728" "$T/server-alpha.log" && grep -q "67108864" "$T/server-alpha.log" ||
	fail "the data size refusal does not give both sizes"

# ---- 4. granularity mismatch.
truncate -s 96M "$S/beta-gran.img"
"$MIRRORCTL" create "$S/beta-gran.img" --mirror db --node 2 --peer 1 --data-size 64M --blank \
	--granularity 64K >/dev/null
refused granularity "$S/beta-gran.img" "bitmap granularity mismatch"

# ---- 5. logical block size mismatch: a loop device with 4096-byte sectors.
if $ROOT; then
	check_eq "alpha's logical block" "$("$MIRRORCTL" inspect "$S/alpha.img" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["layout"]["logical_block_bytes"])')" 512
	truncate -s 96M "$S/beta-4k.img"
	LOOP=$(losetup --find --show --sector-size 4096 "$S/beta-4k.img")
	track_loop "$LOOP"
	"$MIRRORCTL" create "$LOOP" --mirror db --node 2 --peer 1 --data-size 64M --blank >/dev/null
	check_eq "beta's logical block" "$("$MIRRORCTL" inspect "$LOOP" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["layout"]["logical_block_bytes"])')" 4096
	refused block "$LOOP" "logical block size mismatch"
	losetup -d "$LOOP"
else
	note "block size case skipped: needs root (losetup)"
fi

# ---- 6. a matching beta connects in sync with the untouched alpha.
truncate -s 96M "$S/beta.img"
"$MIRRORCTL" create "$S/beta.img" --mirror db --node 2 --peer 1 --data-size 64M --blank >/dev/null
write_config "$T/good.toml" "$S/beta.img"
start_agent alpha "$T/good.toml"
start_agent beta "$T/good.toml"
wait_for alpha "m['connection']['state']" connected 15
wait_for beta "m['disk_state']" UpToDate 15
check_eq "alpha generation after all the refusals" "$(jget alpha "m['generations']['current']")" "$GEN_A"
check_eq "alpha dirty bytes" "$(jget alpha "m['dirty_bytes']")" 0
stop_agent alpha
stop_agent beta
pass t-wrong-mirror
