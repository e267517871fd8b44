#!/usr/bin/env bash
# t-qemu-io: QEMU's NBD client (the one VMs use) reads back exactly what it wrote.
#
# How: qemu-io -f raw against the export runs pattern writes (plain and FUA, `write -f`),
# 512-aligned writes that straddle 4 KiB boundaries, write-zeroes (with and without
# unmap), discard and flush, and reads each range back with `read -P` pattern checks
# (qemu-io exits 1 when a pattern check fails); a never-written area reads as zeros; the
# last 4 KiB and the last 512 bytes are writable; writes past the end fail. Each qemu-io
# command runs in its own invocation so a failure names the command. Every write is
# mirrored into a local model file, and after the server stops the backing file must
# equal the model byte for byte (cmp), so nothing was written anywhere else.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"
require qemu-io

MIB=$((1024 * 1024))
SIZE=$((64 * MIB))
truncate -s "$SIZE" "$S/disk.img"
truncate -s "$SIZE" "$T/model.img"
start_server "$S/disk.img" --name vol-qio

qio() { # run one qemu-io command; print its output to $T/qio.out
	qemu-io -f raw "$NBD_URI" -c "$1" >"$T/qio.out" 2>&1
}
ok() { # CMD: must succeed (exit 0, no "failed" in the output)
	if ! qio "$1" || grep -qi 'failed' "$T/qio.out"; then
		cat "$T/qio.out" >&2
		fail "qemu-io '$1' failed"
	fi
	pass "qemu-io '$1'"
}
bad() { # CMD: must fail
	if qio "$1" && ! grep -qi 'failed' "$T/qio.out"; then
		cat "$T/qio.out" >&2
		fail "qemu-io '$1' succeeded but must fail"
	fi
	pass "qemu-io '$1' fails as it must ($(head -n1 "$T/qio.out"))"
}
model() { # OFF LEN BYTE: apply the same write to the model
	"$PYTHON" - "$T/model.img" "$1" "$2" "$3" <<'EOF'
import sys
path, off, n, byte = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4], 0)
with open(path, "r+b") as f:
    f.seek(off)
    f.write(bytes([byte]) * n)
EOF
}
w() { # OFF LEN BYTE [qemu-io write flags]: write, record in the model, read back
	ok "write ${4:-} -P $3 $1 $2"
	model "$1" "$2" "$3"
	ok "read -P $3 $1 $2"
}

# Plain and FUA pattern writes.
w 0 "$MIB" 0xab
w "$MIB" "$MIB" 0xcd -f
w $((2 * MIB + 4096)) 65536 0x3c -f

# 512-aligned, not 4 KiB-aligned: within one 4K block, and straddling two.
w 4608 1536 0x11
w $((8192 - 512)) 1024 0x22 -f
w $((3 * MIB + 512)) $((5 * 4096 + 512)) 0x33
# The neighbours of those writes are untouched.
ok "read -P 0xab 4096 512"
ok "read -P 0xab 6144 1536"
ok "read -P 0xab 8704 3584"
ok "read -P 0 $((3 * MIB)) 512"
ok "read -P 0 $((3 * MIB + 512 + 5 * 4096 + 512)) 3584"

# Never-written area reads as zeros.
ok "read -P 0 $((32 * MIB)) $MIB"

# The last 4 KiB and the last 512 bytes.
w $((SIZE - 4096)) 4096 0x5a
w $((SIZE - 512)) 512 0x77 -f
ok "read -P 0x5a $((SIZE - 4096)) 3584"

# Write-zeroes, with and without unmap; then the range reads as zeros.
w $((40 * MIB)) $((2 * MIB)) 0x99
ok "write -z $((40 * MIB)) $MIB"
model $((40 * MIB)) "$MIB" 0
ok "write -z -u $((41 * MIB)) $MIB"
model $((41 * MIB)) "$MIB" 0
ok "read -P 0 $((40 * MIB)) $((2 * MIB))"
# Write-zeroes straddling 4K boundaries at 512 granularity.
ok "write -z $((2 * MIB + 4096 + 512)) 8192"
model $((2 * MIB + 4096 + 512)) 8192 0
ok "read -P 0x3c $((2 * MIB + 4096)) 512"
ok "read -P 0 $((2 * MIB + 4096 + 512)) 8192"
ok "read -P 0x3c $((2 * MIB + 4096 + 512 + 8192)) 4096"

# Discard and flush succeed. (Discarded contents are unspecified by NBD, so the area
# is rewritten afterwards rather than checked.)
ok "discard $((48 * MIB)) $MIB"
w $((48 * MIB)) "$MIB" 0x44
ok "flush"

# Past the end: a write that starts at the end, and one that crosses it.
bad "write -P 0x66 $SIZE 512"
bad "write -P 0x66 $((SIZE - 512)) 1024"
bad "write -P 0x66 $((SIZE + MIB)) 4096"
# ... and they did not disturb the last block.
ok "read -P 0x77 $((SIZE - 512)) 512"

# Several commands in one session (one connection, pipelined aio writes).
qemu-io -f raw "$NBD_URI" \
	-c "aio_write -P 0x55 $((50 * MIB)) 65536" \
	-c "aio_write -f -P 0x56 $((50 * MIB + 65536)) 65536" \
	-c "aio_write -P 0x57 $((50 * MIB + 131072)) 65536" \
	-c aio_flush \
	-c "read -P 0x55 $((50 * MIB)) 65536" \
	-c "read -P 0x56 $((50 * MIB + 65536)) 65536" \
	-c "read -P 0x57 $((50 * MIB + 131072)) 65536" >"$T/qio.out" 2>&1 ||
	{
		cat "$T/qio.out" >&2
		fail "pipelined aio_write session failed"
	}
grep -qi failed "$T/qio.out" && fail "pipelined aio_write session: $(grep -i failed "$T/qio.out")"
model $((50 * MIB)) 65536 0x55
model $((50 * MIB + 65536)) 65536 0x56
model $((50 * MIB + 131072)) 65536 0x57
pass "pipelined aio_write session"

stop_server
cmp "$S/disk.img" "$T/model.img" || fail "backing file differs from the model of the writes above"
pass "backing file equals the model byte for byte"
check_eq "backing file size" "$(stat -c %s "$S/disk.img")" "$SIZE"
pass "t-qemu-io"
