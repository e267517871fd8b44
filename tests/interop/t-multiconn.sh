#!/usr/bin/env bash
# t-multiconn: writes on one connection are visible on another after a FLUSH on any
# connection, as NBD_FLAG_CAN_MULTI_CONN promises, also with concurrent aio writers.
#
# How: multiconn.py (python3-libnbd) against a 64 MiB export: write on #1 / flush on
# #2 / read on #3 for 100 rounds; then 4 threads, one connection each, 16 aio writes
# in flight, 64 MiB of interleaved 64 KiB regions; one flush; a fresh connection reads
# it all back. After the server stops, the backing file must equal the expected image
# (so the data reached the file, not just the server's memory). /dev/shm (speed).
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"
require python3-libnbd

SIZE=$((64 * 1024 * 1024))
truncate -s "$SIZE" "$S/disk.img"
start_server "$S/disk.img" --name vol-mc
NBD_SIZE=$SIZE EXPECT_IMAGE=$S/expect.img timeout -k 5 180 "$PYTHON" "$INTEROP_DIR/multiconn.py" ||
	fail "multiconn.py failed (above)"
stop_server
cmp "$S/disk.img" "$S/expect.img" || fail "backing file differs from what the clients wrote"
pass "backing file equals what the clients wrote"
pass "t-multiconn"
