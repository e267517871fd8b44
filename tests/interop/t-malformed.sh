#!/usr/bin/env bash
# t-malformed: bad requests and bad handshakes get the errors the NBD spec names, and
# cost the connection only where the spec says they must.
#
# How: malformed.py (python3-libnbd with strict mode off, plus a hand-written client
# on a plain socket) against a 64 MiB writable export, then against the same file
# served --read-only; see malformed.py for the list of checks. Afterwards the backing
# file is checked for writes that should never have landed (the refused writes used
# distinctive byte patterns; the read-only phase must change nothing).
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"
require python3-libnbd

SIZE=$((64 * 1024 * 1024))
truncate -s "$SIZE" "$S/disk.img"
export NBD_SIZE=$SIZE SERVER

start_server "$S/disk.img" --name vol-bad
timeout -k 5 240 "$PYTHON" "$INTEROP_DIR/malformed.py" rw || fail "malformed.py rw reported failures (above)"
stop_server

# The write-past-end attempts used 0xee; the file must not have grown or changed size.
check_eq "backing size after the rw phase" "$(stat -c %s "$S/disk.img")" "$SIZE"
before=$(sha "$S/disk.img")

start_server "$S/disk.img" --name vol-bad --read-only
timeout -k 5 120 "$PYTHON" "$INTEROP_DIR/malformed.py" ro || fail "malformed.py ro reported failures (above)"
stop_server
check_eq "backing sha256 after the read-only phase" "$(sha "$S/disk.img")" "$before"
pass "t-malformed"
