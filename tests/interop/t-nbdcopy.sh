#!/usr/bin/env bash
# t-nbdcopy: bulk copies in and out with libnbd's nbdcopy are byte-exact, over one
# connection and over several (multi-conn), with small and maximum-size requests.
#
# How: the export is 96 MiB; each round copies a fresh 64 MiB random file into it
# with different nbdcopy settings (-C 1 --synchronous; -C 4 with 32 MiB requests and
# --flush; default settings over the unix socket), copies the whole export back out
# to a file and compares it (cmp) with the input followed by 32 MiB of zeros: the
# tail was never written, so it is also the "copy out of a sparse region" check, done
# once more on its own (the tail alone, to a file and to null:). Fresh random data per
# round means a stale copy cannot pass. After the server stops the backing file itself
# must equal the last input plus zeros. Files live in /dev/shm (speed).
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"
require nbdcopy nbdinfo

MIB=$((1024 * 1024))
truncate -s $((96 * MIB)) "$S/disk.img"
start_server "$S/disk.img" --name vol-copy

multi=$(nbdinfo --can multi-conn "$NBD_URI" && echo yes || echo no)
note "server advertises multi-conn: $multi (nbdcopy -C 4 falls back to 1 connection without it)"

round() { # LABEL DEST-URI NBDCOPY-OPTIONS...
	local label=$1 uri=$2
	shift 2
	random_file "$S/in.bin" 64
	cp "$S/in.bin" "$S/expect.bin"
	truncate -s $((96 * MIB)) "$S/expect.bin"
	timeout 120 nbdcopy "$@" "$S/in.bin" "$uri" || fail "$label: nbdcopy in ($*) failed"
	rm -f "$S/out.bin"
	timeout 120 nbdcopy "$@" "$uri" "$S/out.bin" || fail "$label: nbdcopy out ($*) failed"
	check_eq "$label: copied-out size" "$(stat -c %s "$S/out.bin")" $((96 * MIB))
	cmp "$S/out.bin" "$S/expect.bin" || fail "$label: data copied out differs from data copied in"
	pass "$label: 64 MiB in, 96 MiB out, identical (zeros after 64 MiB)"
}

round "one connection, synchronous" "$NBD_URI" --connections=1 --synchronous
round "4 connections, 32 MiB requests, flush" "$NBD_URI" --connections=4 --request-size=33554432 --flush
round "defaults, 16 requests in flight, unix socket" "$NBD_UNIX_URI" --requests=16

# Copy out of the never-written region alone, through a subrange-limited source:
# nbdcopy has no offset option, so read the tail with nbdcopy to stdout and skip.
timeout 60 nbdcopy "$NBD_URI" - | tail -c $((32 * MIB)) >"$S/tail.bin" ||
	fail "nbdcopy out to stdout failed"
truncate -s $((32 * MIB)) "$S/zeros.bin"
cmp "$S/tail.bin" "$S/zeros.bin" || fail "never-written tail of the export is not zeros"
pass "never-written 32 MiB tail reads as zeros (nbdcopy to stdout)"
timeout 60 nbdcopy "$NBD_URI" null: || fail "nbdcopy to null: failed"
pass "nbdcopy to null:"

stop_server
cmp "$S/disk.img" "$S/expect.bin" || fail "backing file differs from the last input + zeros"
pass "backing file equals last input + zero tail"
pass "t-nbdcopy"
