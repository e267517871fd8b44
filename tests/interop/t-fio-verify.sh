#!/usr/bin/env bash
# t-fio-verify: under deep queues and mixed sizes, every block reads back as written.
#
# How: fio's nbd engine (libnbd, one connection, many requests in flight) runs jobs
# with verify=crc32c: each block carries a header (offset, seed, checksum), and after
# the write phase fio reads everything back and fails on the first mismatch
# (verify_fatal). Jobs: 4 KiB random writes at QD32 over 256 MiB; then the server is
# restarted and a separate verify-only pass re-reads that job's blocks through a new
# process (so they reached the backing file, not just a cache); 1 MiB sequential
# writes at QD16; random read/write with block sizes from 512 B to 64 KiB at QD16,
# again re-verified after a restart. Each fio run is bounded by `timeout`: the nbd
# engine can spin forever if the server dies (DESIGN §8). Backing in /dev/shm (speed).
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"
require fio

SIZE=256M
truncate -s "$SIZE" "$S/disk.img"
start_server "$S/disk.img" --name vol-fio

FIO_TIMEOUT_S=${FIO_TIMEOUT_S:-120}
run_fio() { # LABEL FIO-ARGS...
	local label=$1 rc=0
	shift
	# In $T: fio drops *-verify.state files in its working directory on failure.
	(cd "$T" && timeout -k 5 "$FIO_TIMEOUT_S" fio --name="$label" --ioengine=nbd --uri="$NBD_URI" \
		--size="$SIZE" --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 \
		--group_reporting "$@") >"$T/fio.out" 2>&1 || rc=$?
	if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
		tail -n 20 "$T/fio.out" >&2
		fail "$label: fio did not finish within ${FIO_TIMEOUT_S} s (hung client or server)"
	fi
	if [ "$rc" -ne 0 ] || grep -qiE 'verify:|bad magic|crc32c: verify failed|err= *[1-9]' "$T/fio.out"; then
		tail -n 40 "$T/fio.out" >&2
		fail "$label: fio exited $rc or reported a verify error (fio ${*})"
	fi
	grep -qE 'err= *0' "$T/fio.out" || fail "$label: fio output has no 'err= 0' summary"
	pass "$label: $(grep -oE '(read|write): IOPS=[^,]*' "$T/fio.out" | tr '\n' ' ')"
}

J1=(--rw=randwrite --bs=4k --iodepth=32 --randseed=11)
run_fio randwrite-4k-qd32 "${J1[@]}"
stop_server
start_server "$S/disk.img" --name vol-fio
run_fio randwrite-4k-qd32-verify-only "${J1[@]}" --verify_only=1
# The verify-only pass must catch damage, or it proves nothing: flip one block in the
# backing file behind the server's back, expect a failure, then restore it.
stop_server
cp "$S/disk.img" "$T/disk.good"
dd if=/dev/urandom of="$S/disk.img" bs=4096 seek=777 count=1 conv=notrunc status=none
start_server "$S/disk.img" --name vol-fio
if (cd "$T" && timeout -k 5 "$FIO_TIMEOUT_S" fio --name=must-fail --ioengine=nbd --uri="$NBD_URI" \
	--size="$SIZE" --verify=crc32c --verify_fatal=1 --verify_state_save=0 "${J1[@]}" --verify_only=1) \
	>"$T/fio.out" 2>&1; then
	fail "verify-only pass did not notice a corrupted block: the verification is vacuous"
fi
pass "verify-only pass detects a corrupted block (control)"
stop_server
cp "$T/disk.good" "$S/disk.img"
rm -f "$T/disk.good"
start_server "$S/disk.img" --name vol-fio

run_fio seqwrite-1m-qd16 --rw=write --bs=1M --iodepth=16 --randseed=22

J3=(--rw=randrw --bsrange=512-64k --iodepth=16 --randseed=33)
run_fio randrw-512-64k-qd16 "${J3[@]}"
stop_server
start_server "$S/disk.img" --name vol-fio
run_fio randrw-512-64k-verify-only "${J3[@]}" --verify_only=1
stop_server
pass "t-fio-verify"
