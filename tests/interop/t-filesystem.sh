#!/usr/bin/env bash
# t-filesystem: a real kernel filesystem on the export survives write, unmount, fsck
# and remount with every file intact.
#
# How (DESIGN §8: no nbd kernel module here): nbdfuse exposes the export as a file,
# losetup turns that file into a block device, mkfs.ext4 formats it, and it is mounted.
# A few hundred files of mixed sizes (~100 MiB) are written and their sha256 recorded;
# half are deleted and more written (block reuse), fstrim sends discards down the stack
# (ext4 -> loop -> nbdfuse -> NBD TRIM), then sync, umount, `e2fsck -fn` must be clean,
# remount, every checksum must match. Finally the whole stack is torn down, the server
# stopped, and the backing file itself is fsck'd and mounted read-only through its own
# loop device (no NBD at all) to prove the data reached it. The EXIT trap in lib.sh
# tears down in order (umount, losetup -d, fusermount3 -u, kill nbdfuse, server) even
# on failure. Backing file in /dev/shm (speed).
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"
require nbdfuse losetup mkfs.ext4 e2fsck fusermount3 mountpoint fstrim sha256sum
[ "$(id -u)" -eq 0 ] || {
	[ "$CI" = true ] && fail "needs root (losetup, mount)"
	_say "SKIP [$TEST_NAME]: needs root (losetup, mount)"
	exit 77
}
[ -e /dev/fuse ] || fail "/dev/fuse is missing"

SIZE=$((512 * 1024 * 1024))
truncate -s "$SIZE" "$S/disk.img"
start_server "$S/disk.img" --name vol-fs

mkdir "$T/fuse" "$T/mnt"
nbdfuse "$T/fuse/nbd" "$NBD_URI" </dev/null >"$T/nbdfuse.log" 2>&1 &
track_pid $!
track_fuse "$T/fuse"
wait_until 10 test -e "$T/fuse/nbd" || fail "nbdfuse did not create $T/fuse/nbd within 10 s: $(cat "$T/nbdfuse.log")"
check_eq "nbdfuse file size" "$(stat -c %s "$T/fuse/nbd")" "$SIZE"

LOOP=$(losetup --find --show --direct-io=off "$T/fuse/nbd")
track_loop "$LOOP"
note "loop device $LOOP on $T/fuse/nbd"

# lazy init off: no ext4lazyinit thread writing behind our back after mount.
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$LOOP" || fail "mkfs.ext4 failed"
pass "mkfs.ext4 on $LOOP"
mount -t ext4 "$LOOP" "$T/mnt" || fail "mount $LOOP failed"
track_mount "$T/mnt"

# Files: sizes from 0 B to 1 MiB, skewed small, in nested directories; seed fixed.
write_files() { # PREFIX COUNT SEED
	"$PYTHON" - "$T/mnt" "$1" "$2" "$3" <<'EOF'
import os, random, sys
root, prefix, count, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
total = 0
for i in range(count):
    d = os.path.join(root, prefix, f"d{i % 17:02d}", f"e{i % 5}")
    os.makedirs(d, exist_ok=True)
    size = rng.choice([0, 1, 511, 4095, 4096, 4097, 65536 + 7]) if i % 4 == 0 else int(rng.random() ** 2 * 1024 * 1024)
    with open(os.path.join(d, f"f{i:04d}.bin"), "wb") as f:
        f.write(os.urandom(size))
    total += size
print(total)
EOF
}
sums() { (cd "$T/mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }

bytes_a=$(write_files a 300 1) || fail "writing file set a failed"
pass "wrote 300 files, $((bytes_a / 1024 / 1024)) MiB (set a)"
# Delete every other file of set a, then write set b into the freed blocks.
find "$T/mnt/a" -name 'f*[02468].bin' -delete
bytes_b=$(write_files b 200 2) || fail "writing file set b failed"
pass "deleted half of set a, wrote 200 more files, $((bytes_b / 1024 / 1024)) MiB (set b)"
sums >"$T/sums"
nfiles=$(wc -l <"$T/sums")
[ "$nfiles" -eq 350 ] || fail "expected 350 files, found $nfiles"
# Discard free space: TRIM through loop and nbdfuse must not touch live data.
fstrim -v "$T/mnt" >"$T/fstrim.out" 2>&1 || fail "fstrim failed: $(cat "$T/fstrim.out")"
pass "fstrim: $(cat "$T/fstrim.out")"
sync -f "$T/mnt"
umount "$T/mnt" || fail "umount failed"
pass "sync and umount"

e2fsck -fn "$LOOP" >"$T/fsck.out" 2>&1 || {
	cat "$T/fsck.out" >&2
	fail "e2fsck -fn on $LOOP is not clean (exit $?)"
}
pass "e2fsck -fn clean through NBD ($(tail -n1 "$T/fsck.out"))"

mount -t ext4 "$LOOP" "$T/mnt" || fail "remount failed"
(cd "$T/mnt" && sha256sum --quiet -c "$T/sums") || fail "checksums differ after remount through NBD"
pass "all $nfiles checksums match after remount through NBD"
umount "$T/mnt"
losetup -d "$LOOP"
fusermount3 -u "$T/fuse"
stop_server

# The backing file alone, without NBD: fsck and mount read-only through a fresh loop.
e2fsck -fn "$S/disk.img" >"$T/fsck2.out" 2>&1 || {
	cat "$T/fsck2.out" >&2
	fail "e2fsck -fn on the backing file is not clean"
}
pass "e2fsck -fn clean on the backing file itself"
LOOP2=$(losetup --find --show --read-only "$S/disk.img")
track_loop "$LOOP2"
mount -t ext4 -o ro,noload "$LOOP2" "$T/mnt" || fail "mounting the backing file read-only failed"
track_mount "$T/mnt"
(cd "$T/mnt" && sha256sum --quiet -c "$T/sums") || fail "checksums differ reading the backing file directly"
pass "all $nfiles checksums match reading the backing file directly"
umount "$T/mnt"
losetup -d "$LOOP2"
pass "t-filesystem"
