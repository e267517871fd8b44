#!/usr/bin/env bash
# t-unix-socket: the unix-socket listener serves the same export as TCP, with the
# same data, to libnbd and QEMU clients.
#
# How: serve a 32 MiB file; the socket path must be a socket. nbdinfo and qemu-img
# info over nbd+unix:// report the size and name; qemu-io writes a pattern over the
# unix socket and reads it back over TCP, and the other way round (both listeners
# reach one disk); nbdcopy copies random data in over the socket and out again (cmp).
# After the server stops, the backing file must hold exactly what was written.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"
require nbdinfo qemu-io qemu-img nbdcopy

MIB=$((1024 * 1024))
SIZE=$((32 * MIB))
truncate -s "$SIZE" "$S/disk.img"
start_server "$S/disk.img" --name vol-unix
[ -S "$NBD_SOCK" ] || fail "$NBD_SOCK is not a unix socket"
pass "$NBD_SOCK is a socket"

nbdinfo --json "$NBD_UNIX_URI" >"$T/info.json" || fail "nbdinfo over the unix socket failed"
check_eq "nbdinfo (unix) export-size" "$(nbdinfo_json_get "$T/info.json" export.export-size)" "$SIZE"
check_eq "nbdinfo (unix) export-name" "$(nbdinfo_json_get "$T/info.json" export.export-name)" vol-unix
qemu-img info --output=json "$NBD_UNIX_URI" >"$T/qinfo.json" || fail "qemu-img info over the unix socket failed"
check_eq "qemu-img info (unix) virtual-size" \
	"$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["virtual-size"])' "$T/qinfo.json")" "$SIZE"

qio() { # URI CMD: one qemu-io command that must succeed with no "failed" line
	if ! qemu-io -f raw "$1" -c "$2" >"$T/qio.out" 2>&1 || grep -qi failed "$T/qio.out"; then
		cat "$T/qio.out" >&2
		fail "qemu-io '$2' on $1 failed"
	fi
	pass "qemu-io '$2' on ${1%%://*}"
}
qio "$NBD_UNIX_URI" "write -f -P 0x61 0 $MIB"
qio "$NBD_URI" "read -P 0x61 0 $MIB"
qio "$NBD_URI" "write -P 0x62 $MIB $MIB"
qio "$NBD_UNIX_URI" "read -P 0x62 $MIB $MIB"
qio "$NBD_UNIX_URI" "read -P 0 $((2 * MIB)) $MIB"
qio "$NBD_UNIX_URI" "flush"

# nbdcopy in over the socket, out over the socket: random data, byte-exact.
# It overwrites the first 16 MiB (the qemu-io patterns included); the rest is zeros.
random_file "$S/in.bin" 16
cp "$S/in.bin" "$S/expect.bin"
truncate -s "$SIZE" "$S/expect.bin"
timeout 60 nbdcopy "$S/in.bin" "$NBD_UNIX_URI" || fail "nbdcopy into the unix socket failed"
timeout 60 nbdcopy "$NBD_UNIX_URI" "$S/out.bin" || fail "nbdcopy out of the unix socket failed"
cmp "$S/out.bin" "$S/expect.bin" || fail "data copied out over the unix socket differs"
pass "nbdcopy in and out over the unix socket: identical"

stop_server
cmp "$S/disk.img" "$S/expect.bin" || fail "backing file differs from what was written"
pass "backing file holds exactly what was written"
pass "t-unix-socket"
