#!/usr/bin/env bash
# t-mirrorctl: `mirrorctl create` refuses what it must (and writes nothing then),
# `mirrorctl inspect` reports what is on disk, survives one damaged superblock copy and
# refuses two, and `serve` keeps the CLUSTER partition out of the export.
#
# How: on files under $T: create on a file holding an ext4 filesystem (refused, file
# unchanged; accepted with --force), on a device too small, with node == peer, with a
# bad granularity; create twice (second refused); inspect --json fields; corrupt
# superblock copy B then A with dd and inspect again; two disks of different sizes
# created with the same --data-size get the same data size and mirror UUID; serve
# exports exactly the data partition and its writes land after the CLUSTER partition;
# serve --read-only leaves the CLUSTER partition byte-identical; serve --broken on a
# file without metadata is refused. mirrordisk-only.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$SERVER" != mirrordisk ]; then
	pass "t-mirrorctl (mirrordisk-only)"
	exit 0
fi
require mkfs.ext4 qemu-io nbdinfo
MIRRORCTL=${MIRRORCTL:-$(dirname "$MIRRORDISK")/mirrorctl}
[ -x "$MIRRORCTL" ] || fail "mirrorctl binary $MIRRORCTL not found"
json() { /usr/bin/python3 -c "import json,sys; d=json.load(open('$1')); print(eval('d' + sys.argv[1]))" "$2"; }
refused() { # WHAT CMD...: must exit non-zero with one error line
	local what=$1 rc=0
	shift
	"$@" >"$T/out" 2>"$T/err" || rc=$?
	[ "$rc" -ne 0 ] || fail "$what: accepted, expected a refusal"
	grep -q 'error' "$T/err" || fail "$what: no error message: $(cat "$T/err")"
	pass "$what refused: $(head -n1 "$T/err")"
}

# A filesystem is never overwritten without --force, and nothing is written.
truncate -s 256M "$T/fs.img"
mkfs.ext4 -q -F "$T/fs.img"
before=$(sha "$T/fs.img")
refused "create on an ext4 filesystem" "$MIRRORCTL" create "$T/fs.img" --mirror m --node 1 --peer 2
check_eq "ext4 image unchanged" "$(sha "$T/fs.img")" "$before"
grep -q 'ext2/3/4' "$T/err" || fail "the refusal does not name the filesystem: $(cat "$T/err")"
"$MIRRORCTL" create "$T/fs.img" --mirror m --node 1 --peer 2 --force >/dev/null
pass "create --force overwrites it"

truncate -s 1M "$T/tiny.img"
refused "create on a 1 MiB device" "$MIRRORCTL" create "$T/tiny.img" --mirror m --node 1 --peer 2
truncate -s 256M "$T/a.img"
refused "create with node == peer" "$MIRRORCTL" create "$T/a.img" --mirror m --node 1 --peer 1
refused "create with granularity 3000" "$MIRRORCTL" create "$T/a.img" --mirror m --node 1 --peer 2 --granularity 3000
check_eq "refusals wrote nothing" "$(sha "$T/a.img")" "$(truncate -s 256M "$T/zero.img" && sha "$T/zero.img")"

"$MIRRORCTL" create "$T/a.img" --mirror db --node 1 --peer 2 >/dev/null
refused "a second create on the same disk" "$MIRRORCTL" create "$T/a.img" --mirror db --node 1 --peer 2
"$MIRRORCTL" inspect "$T/a.img" --json >"$T/a.json"
check_eq "inspect: name" "$(json "$T/a.json" "['name']")" db
check_eq "inspect: node" "$(json "$T/a.json" "['node_id']")" 1
check_eq "inspect: disk state" "$(json "$T/a.json" "['disk_state']")" Inconsistent
check_eq "inspect: dirty regions" "$(json "$T/a.json" "['journal']['dirty_regions']")" 0

# Disks of different sizes pair when created with the same --data-size.
truncate -s 300M "$T/b.img"
"$MIRRORCTL" create "$T/a.img" --mirror pair --node 1 --peer 2 --data-size 200M --force >/dev/null
"$MIRRORCTL" create "$T/b.img" --mirror pair --node 2 --peer 1 --data-size 200M >/dev/null
"$MIRRORCTL" inspect "$T/a.img" --json >"$T/a.json"
"$MIRRORCTL" inspect "$T/b.img" --json >"$T/b.json"
check_eq "same data size" "$(json "$T/a.json" "['layout']['data_bytes']")" "$(json "$T/b.json" "['layout']['data_bytes']")"
check_eq "same mirror uuid" "$(json "$T/a.json" "['mirror_uuid']")" "$(json "$T/b.json" "['mirror_uuid']")"
check_eq "data size" "$(json "$T/a.json" "['layout']['data_bytes']")" $((200 * 1024 * 1024))

# One damaged superblock copy is survived and named; two are a clear error.
in_use=$(json "$T/a.json" "['superblock_copy_in_use']")
other=$([ "$in_use" = A ] && echo 1 || echo 0) # block of the copy not in use
dd if=/dev/urandom of="$T/a.img" bs=4096 seek="$other" count=1 conv=notrunc status=none
"$MIRRORCTL" inspect "$T/a.img" --json >"$T/a2.json" || fail "inspect with one damaged copy failed"
check_eq "copy in use after damaging the other" "$(json "$T/a2.json" "['superblock_copy_in_use']")" "$in_use"
dd if=/dev/urandom of="$T/a.img" bs=4096 seek=$((1 - other)) count=1 conv=notrunc status=none
refused "inspect with both copies damaged" "$MIRRORCTL" inspect "$T/a.img"

# serve exports only the data partition; writes land after the CLUSTER partition.
"$MIRRORCTL" create "$T/b.img" --mirror pair --node 2 --peer 1 --data-size 200M --force >/dev/null
"$MIRRORCTL" inspect "$T/b.img" --json >"$T/b.json"
offset=$(json "$T/b.json" "['layout']['data_offset']")
start_server "$T/b.img"
check_eq "export size = data partition" "$(nbdinfo --size "$NBD_URI")" $((200 * 1024 * 1024))
qemu-io -f raw -c 'write -P 0x5a 0 64k' "$NBD_URI" >/dev/null
stop_server
cmp -n 65536 -i "$offset:0" "$T/b.img" <(head -c 65536 /dev/zero | tr '\0' '\132') ||
	fail "the write did not land at the data partition's offset $offset"
pass "a write at export offset 0 landed at device offset $offset"

head -c "$offset" "$T/b.img" | sha256sum >"$T/meta.sum"
start_server "$T/b.img" --read-only
qemu-io -r -f raw -c 'read -P 0x5a 0 64k' "$NBD_URI" >/dev/null || fail "read-only serve: data not readable"
stop_server
check_eq "read-only serve left the CLUSTER partition alone" "$(head -c "$offset" "$T/b.img" | sha256sum)" "$(cat "$T/meta.sum")"

truncate -s 64M "$T/plain.img"
refused "serve --broken without metadata" timeout 10 "$MIRRORDISK" serve "$T/plain.img" --listen 127.0.0.1:"$(free_port)" --broken
pass t-mirrorctl
