#!/usr/bin/env bash
# t-nbdinfo: what the server advertises in the handshake is what a real client sees.
#
# How: serve a 64 MiB + 4 KiB file (a size that is not a power of two, so a server that
# rounds is caught) and read it back with `nbdinfo --json` over TCP and over the unix
# socket: export size, export name, the transmission flags (flush, FUA, trim, zero,
# cache, multi-conn, read-only), and the block-size constraints; `nbdinfo --list`
# must list the export by name; `--read-only` must turn is_read_only on.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"
require nbdinfo

SIZE=$((64 * 1024 * 1024 + 4096))
truncate -s "$SIZE" "$S/disk.img"
start_server "$S/disk.img" --name vol-info

flag() { nbdinfo_json_get "$T/info.json" "export.$1"; }

check_info() { # URI LABEL
	nbdinfo --json "$1" >"$T/info.json" || fail "nbdinfo --json $1 failed"
	check_eq "$2 export-size" "$(flag export-size)" "$SIZE"
	check_eq "$2 export-name" "$(flag export-name)" vol-info
	check_eq "$2 is_read_only" "$(flag is_read_only)" false
	# Every server we compare against advertises these for a writable file export.
	local f
	for f in can_flush can_fua can_trim can_zero can_cache can_multi_conn; do
		check_eq "$2 $f" "$(flag "$f")" true
	done
	if [ "$SERVER" = mirrordisk ]; then
		# nbdkit's file plugin does not advertise fast zero (it cannot promise the
		# zeroing is fast); mirrordisk answers fast-zero honestly (fallocate or
		# ENOTSUP), so it advertises the flag.
		check_eq "$2 can_fast_zero" "$(flag can_fast_zero)" true
		# Block sizes: nbdkit 1.32's file plugin sends no NBD_INFO_BLOCK_SIZE and
		# qemu-nbd says minimum 1, so these exact values are ours: minimum = the
		# backing's logical block (512 or 4096), preferred = page, maximum = 32 MiB.
		local min
		min=$(flag block_size_minimum)
		case "$min" in 512 | 4096) pass "$2 block_size_minimum = $min" ;; *)
			fail "$2 block_size_minimum: expected 512 or 4096, got '$min'" ;; esac
		check_eq "$2 block_size_preferred" "$(flag block_size_preferred)" 4096
		check_eq "$2 block_size_maximum" "$(flag block_size_maximum)" 33554432
	elif [ "$SERVER" = qemu-nbd ]; then
		check_eq "$2 block_size_maximum" "$(flag block_size_maximum)" 33554432
	fi
}

check_info "$NBD_URI" tcp
check_info "$NBD_UNIX_URI" unix

# --size alone, and the `--can` query forms the client scripts use.
check_eq "nbdinfo --size" "$(nbdinfo --size "$NBD_URI")" "$SIZE"
nbdinfo --can connect "$NBD_URI" || fail "nbdinfo --can connect: not connectable"
nbdinfo --can flush "$NBD_URI" || fail "nbdinfo --can flush: says no"
if nbdinfo --is read-only "$NBD_URI"; then fail "nbdinfo --is read-only: yes on a writable export"; fi
pass "nbdinfo --can/--is queries"

# NBD_OPT_LIST through nbdinfo --list: the export is listed by its name.
nbdinfo --list --json "$NBD_URI" >"$T/list.json" || fail "nbdinfo --list failed"
names=$("$PYTHON" -c 'import json,sys; print(" ".join(e["export-name"] for e in json.load(open(sys.argv[1]))["exports"]))' "$T/list.json")
check_eq "nbdinfo --list export names" "$names" vol-info
nbdinfo --list "$NBD_UNIX_URI" | grep -q 'export="vol-info"' || fail "nbdinfo --list over unix socket does not show vol-info"
pass "nbdinfo --list over unix socket shows vol-info"

stop_server

# Read-only export.
start_server "$S/disk.img" --name vol-info --read-only
for uri in "$NBD_URI" "$NBD_UNIX_URI"; do
	nbdinfo --json "$uri" >"$T/info.json" || fail "nbdinfo --json $uri failed"
	check_eq "read-only is_read_only ($uri)" "$(flag is_read_only)" true
	check_eq "read-only export-size ($uri)" "$(flag export-size)" "$SIZE"
done
nbdinfo --is read-only "$NBD_URI" || fail "nbdinfo --is read-only: no on a --read-only export"
pass "read-only export"
stop_server
pass "t-nbdinfo"
