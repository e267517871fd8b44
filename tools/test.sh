#!/usr/bin/env bash
# tools/test.sh: THE test command of mirrordisk. Runs every check CI runs, in order,
# and stops at the first failing stage.
#
#   ./tools/test.sh                          all stages
#   ./tools/test.sh --only fmt,clippy        just these stages
#   ./tools/test.sh --skip fuzz              all but these (repeatable, comma lists)
#   ./tools/test.sh --only interop t-nbdinfo t-qemu-io     some interop tests
#   SERVER=nbdkit ./tools/test.sh --only interop           against a reference server
#   ./tools/test.sh --list                   stages and interop tests
#
# Stages: fmt, clippy, build (release binaries), unit (cargo test --release: unit,
# tidy, corpus replay, simulation), interop (tests/interop/t-*.sh against real NBD
# clients, each under a timeout), fuzz (every cargo-fuzz target for FUZZ_SECONDS).
# Before the stages, `setup` installs what the selected stages need if it is missing
# (Debian packages, rustup components, cargo-fuzz); --no-install skips that.
#
# Environment: SERVER (mirrordisk | nbdkit | qemu-nbd, default mirrordisk),
# MIRRORDISK (server binary), CI (true: a skipped interop test is a failure),
# FUZZ_SECONDS (per target, default 20), INTEROP_TIMEOUT_S (per test, default 300).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ALL_STAGES=(fmt clippy build unit interop fuzz)
export SERVER=${SERVER:-mirrordisk}
export CI=${CI:-false}
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
INTEROP_TIMEOUT_S=${INTEROP_TIMEOUT_S:-300}
FUZZ_STAGE_BUDGET_S=480
INTEROP_STAGE_BUDGET_S=300
INSTALL=true
# `mount` holds losetup on Debian 12 (always installed; listed so that is explicit).
APT_PACKAGES=(libnbd-bin nbdkit fio fuse3 e2fsprogs qemu-utils iproute2 python3-libnbd util-linux mount)

usage() {
	sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

die() {
	printf '\ntools/test.sh: %s\n' "$*" >&2
	exit 2
}

# ---------------------------------------------------------------------------------
# Arguments

ONLY=()
SKIP=()
TESTS=()
LIST=false
split_into() { # ARRAY-NAME "a,b,c"
	local -n arr=$1
	local IFS=,
	local x
	for x in $2; do [ -n "$x" ] && arr+=("$x"); done
	return 0
}
while [ $# -gt 0 ]; do
	case "$1" in
	--only) [ $# -ge 2 ] || die "--only needs STAGE[,STAGE]"; split_into ONLY "$2"; shift 2 ;;
	--only=*) split_into ONLY "${1#--only=}"; shift ;;
	--skip) [ $# -ge 2 ] || die "--skip needs STAGE[,STAGE]"; split_into SKIP "$2"; shift 2 ;;
	--skip=*) split_into SKIP "${1#--skip=}"; shift ;;
	--server) [ $# -ge 2 ] || die "--server needs a name"; SERVER=$2; shift 2 ;;
	--server=*) SERVER=${1#--server=}; shift ;;
	--no-install) INSTALL=false; shift ;;
	--list) LIST=true; shift ;;
	-h | --help) usage; exit 0 ;;
	-*) die "unknown option '$1' (see --help)" ;;
	*) TESTS+=("$1"); shift ;;
	esac
done
export SERVER
case "$SERVER" in mirrordisk | nbdkit | qemu-nbd) ;; *) die "SERVER must be mirrordisk, nbdkit or qemu-nbd, not '$SERVER'" ;; esac

is_stage() { local s; for s in "${ALL_STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
for s in "${ONLY[@]}" "${SKIP[@]}"; do is_stage "$s" || die "unknown stage '$s' (stages: ${ALL_STAGES[*]})"; done

STAGES=()
for s in "${ALL_STAGES[@]}"; do
	if [ "${#ONLY[@]}" -gt 0 ]; then
		keep=false
		for o in "${ONLY[@]}"; do [ "$o" = "$s" ] && keep=true; done
		$keep || continue
	fi
	for k in "${SKIP[@]}"; do [ "$k" = "$s" ] && continue 2; done
	STAGES+=("$s")
done
selected() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

# Interop tests: all tests/interop/t-*.sh, or the ones named (t-foo, t-foo.sh, foo).
ALL_TESTS=()
for f in tests/interop/t-*.sh; do [ -e "$f" ] && ALL_TESTS+=("$(basename "$f" .sh)"); done
INTEROP_TESTS=()
if [ "${#TESTS[@]}" -gt 0 ]; then
	for t in "${TESTS[@]}"; do
		t=$(basename "$t" .sh)
		[ "${t#t-}" = "$t" ] && t=t-$t
		[ -f "tests/interop/$t.sh" ] || die "no interop test '$t' (have: ${ALL_TESTS[*]})"
		INTEROP_TESTS+=("$t")
	done
	selected interop || die "interop tests named (${TESTS[*]}) but the interop stage is not selected"
else
	INTEROP_TESTS=("${ALL_TESTS[@]}")
fi

if $LIST; then
	echo "stages: ${ALL_STAGES[*]}"
	echo "interop tests: ${ALL_TESTS[*]}"
	exit 0
fi
[ "${#STAGES[@]}" -gt 0 ] || die "no stage selected"

# ---------------------------------------------------------------------------------
# Reporting

SUMMARY=()   # "name|result|seconds"
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
banner() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
T_START=$(now)

print_summary() {
	local row name result t
	printf '\n%-28s %-8s %9s\n' "stage / test" result seconds
	printf '%-28s %-8s %9s\n' "----------------------------" "--------" "---------"
	for row in "${SUMMARY[@]}"; do
		IFS='|' read -r name result t <<<"$row"
		printf '%-28s %-8s %9s\n' "$name" "$result" "$t"
	done
	local s ran
	for s in "${STAGES[@]}"; do
		ran=false
		for row in "${SUMMARY[@]}"; do [ "${row%%|*}" = "$s" ] && ran=true; done
		$ran || printf '%-28s %-8s %9s\n' "$s" "not run" "-"
	done
	printf '%-28s %-8s %9s\n' total "" "$(secs "$T_START" "$(now)")"
	printf '(SERVER=%s CI=%s)\n' "$SERVER" "$CI"
}

FAILED_STAGE=
on_exit() {
	local rc=$?
	rm -f "${STAGE_ROWS:-}" "${PATTERN_FILE:-}"
	[ "${#SUMMARY[@]}" -gt 0 ] && print_summary
	if [ "$rc" -ne 0 ] && [ -n "$FAILED_STAGE" ]; then
		printf '\nFAILED: stage %s. Rerun it alone with: ./tools/test.sh --only %s\n' "$FAILED_STAGE" "$FAILED_STAGE" >&2
	fi
	exit "$rc"
}
trap on_exit EXIT

# run_stage NAME: run stage_NAME in a subshell with set -e in force, time it, record.
# A stage may add rows under its own (the interop tests) by appending
# "name|result|seconds" lines to $STAGE_ROWS.
STAGE_ROWS=$(mktemp /tmp/mirrordisk-test-rows.XXXXXX)
run_stage() {
	local name=$1 t0 rc=0 row
	banner "stage $name"
	t0=$(now)
	: >"$STAGE_ROWS"
	set +e
	(
		set -euo pipefail
		"stage_$name"
	)
	rc=$?
	set -e
	local t
	t=$(secs "$t0" "$(now)")
	local result=PASS
	[ "$rc" -eq 0 ] || result=FAIL
	SUMMARY+=("$name|$result|$t")
	while read -r row; do SUMMARY+=("  $row"); done <"$STAGE_ROWS"
	if [ "$rc" -eq 0 ]; then
		printf '<== stage %s: PASS (%s s)\n' "$name" "$t"
	else
		FAILED_STAGE=$name
		printf '<== stage %s: FAIL (exit %s, %s s)\n' "$name" "$rc" "$t" >&2
		exit 1
	fi
}

# ---------------------------------------------------------------------------------
# Setup: install what the selected stages need, only if it is missing.

as_root() {
	if [ "$(id -u)" -eq 0 ]; then "$@"
	elif command -v sudo >/dev/null; then sudo "$@"
	else die "need root to run: $*"; fi
}

interop_tools_missing() {
	local t missing=()
	for t in nbdinfo nbdcopy nbdfuse nbdsh nbdkit fio fusermount3 mkfs.ext4 e2fsck \
		qemu-io qemu-img qemu-nbd ip losetup mount mountpoint setpriv fstrim timeout; do
		command -v "$t" >/dev/null 2>&1 || missing+=("$t")
	done
	/usr/bin/python3 -c 'import nbd' 2>/dev/null || missing+=(python3-libnbd)
	echo "${missing[*]}"
}

stage_setup() {
	if selected interop; then
		local missing
		missing=$(interop_tools_missing)
		if [ -n "$missing" ]; then
			echo "missing: $missing; installing: ${APT_PACKAGES[*]}"
			as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
			as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${APT_PACKAGES[@]}"
			missing=$(interop_tools_missing)
			[ -z "$missing" ] || { echo "still missing after apt-get install: $missing" >&2; return 1; }
		else
			echo "interop tools: all present"
		fi
	fi
	if selected fmt && ! cargo fmt --version >/dev/null 2>&1; then
		rustup component add rustfmt
	fi
	if selected clippy && ! cargo clippy --version >/dev/null 2>&1; then
		rustup component add clippy
	fi
	if selected fuzz && ! cargo fuzz --version >/dev/null 2>&1; then
		echo "installing cargo-fuzz (about a minute)"
		cargo install cargo-fuzz --locked
	fi
	echo "rust: $(rustc --version)"
}

# ---------------------------------------------------------------------------------
# Stages

stage_fmt() {
	echo "+ cargo fmt --all -- --check"
	cargo fmt --all -- --check || { echo "formatting differs: run 'cargo fmt --all'" >&2; return 1; }
}

stage_clippy() {
	echo "+ cargo clippy --all-targets -- -D warnings"
	cargo clippy --all-targets -- -D warnings
}

stage_build() {
	echo "+ cargo build --release --bins"
	cargo build --release --bins
}

stage_unit() {
	echo "+ cargo test --release"
	cargo test --release
}

# Processes whose command line names one of our per-run temp roots: only tests we
# started can have them. Used to detect (and end, by pid) leaks after a test. The
# roots go to grep through a pattern file, so grep's own command line does not match.
PATTERN_FILE=$(mktemp /tmp/mirrordisk-test-pattern.XXXXXX)
pids_using() { # ROOT...
	printf '%s\n' "$@" >"$PATTERN_FILE"
	grep -alsFf "$PATTERN_FILE" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 | grep -vxF -e "$$" -e "$BASHPID" || true
}

# After a test: nothing it made may survive it (rule: every test cleans up, even on
# failure). Returns 1 and describes the leak if something did.
check_leaks() { # TMPROOT SHMROOT
	local leaks=() root m
	for root in "$1" "$2"; do
		while read -r _ m _; do
			case "$m" in "$root"/*) leaks+=("mount $m") ;; esac
		done </proc/mounts
		while read -r dev; do leaks+=("loop $dev"); done < <(losetup -a 2>/dev/null | grep -F -- "$root" | cut -d: -f1)
		local p
		for p in $(pids_using "$root"); do leaks+=("process $p: $({ tr '\0' ' ' <"/proc/$p/cmdline"; } 2>/dev/null)"); done
		[ -z "$(ls -A "$root" 2>/dev/null)" ] || leaks+=("files left in $root: $(find "$root" -mindepth 1 -maxdepth 1 -printf "%f ")")
	done
	[ "${#leaks[@]}" -eq 0 ] && return 0
	printf '    LEAK: %s\n' "${leaks[@]}" >&2
	return 1
}

kill_tree() { # PID: stop it first (no respawn), then its descendants, then kill it
	local c
	kill -STOP "$1" 2>/dev/null || true
	for c in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$c"; done
	kill -KILL "$1" 2>/dev/null || true
}

# Undo what a killed or leaky test left: its recorded cleanup state first, then any
# process still naming our temp roots (by pid), then the directories.
sweep() { # TMPROOT SHMROOT
	local root p
	bash tests/interop/lib.sh sweep "$1" || true
	for root in "$1" "$2"; do
		for p in $(pids_using "$root"); do kill_tree "$p"; done
		while read -r _ m _; do
			case "$m" in "$root"/*) umount -l "$m" 2>/dev/null || true ;; esac
		done < <(tac /proc/mounts)
		for dev in $(losetup -a 2>/dev/null | grep -F -- "$root" | cut -d: -f1); do losetup -d "$dev" 2>/dev/null || true; done
		rm -rf -- "${root:?}"/* 2>/dev/null || true
	done
}

stage_interop() {
	if [ "$SERVER" = mirrordisk ]; then
		local bin=${MIRRORDISK:-$ROOT/target/release/mirrordisk}
		[ -x "$bin" ] || { echo "server binary $bin is missing: run the build stage (or SERVER=nbdkit to test the tests)" >&2; return 1; }
		echo "server: $bin (built $(date -r "$bin" '+%F %T'))"
	else
		echo "server: $SERVER (reference server: this validates the tests, not mirrordisk)"
	fi
	local tmproot shmroot
	tmproot=$(mktemp -d /tmp/mirrordisk-interop.XXXXXX)
	shmroot=$(mktemp -d /dev/shm/mirrordisk-interop.XXXXXX)
	export INTEROP_TMPROOT=$tmproot INTEROP_SHMROOT=$shmroot
	# shellcheck disable=SC2064 # expand now: these are this stage's roots
	trap "sweep '$tmproot' '$shmroot'; rm -rf -- '$tmproot' '$shmroot'" EXIT
	local t rc t0 dt result failed=() stage_t0
	stage_t0=$(now)
	for t in "${INTEROP_TESTS[@]}"; do
		printf '\n--- %s (SERVER=%s)\n' "$t" "$SERVER"
		t0=$(now)
		rc=0
		timeout -k 10 "$INTEROP_TIMEOUT_S" bash "tests/interop/$t.sh" >"$tmproot/.log" 2>&1 || rc=$?
		dt=$(secs "$t0" "$(now)")
		sed 's/^/    /' "$tmproot/.log"
		rm -f "$tmproot/.log"
		case "$rc" in
		0) result=PASS ;;
		77) result=SKIP ;;
		124 | 137) result=TIMEOUT ;;
		*) result=FAIL ;;
		esac
		if [ "$result" = TIMEOUT ]; then
			echo "    $t did not finish within ${INTEROP_TIMEOUT_S} s; sweeping what it left" >&2
			sweep "$tmproot" "$shmroot"
		fi
		if ! check_leaks "$tmproot" "$shmroot"; then
			[ "$result" = PASS ] && result=LEAK
			sweep "$tmproot" "$shmroot"
		fi
		if [ "$result" = SKIP ] && [ "$CI" = true ]; then result=FAIL; echo "    SKIP under CI=true counts as a failure" >&2; fi
		printf '<-- %s: %s (%s s)\n' "$t" "$result" "$dt"
		echo "$t|$result|$dt" >>"$STAGE_ROWS"
		case "$result" in PASS | SKIP) ;; *) failed+=("$t:$result") ;; esac
	done
	local total
	total=$(secs "$stage_t0" "$(now)")
	if awk -v t="$total" -v b="$INTEROP_STAGE_BUDGET_S" 'BEGIN { exit !(t > b) }'; then
		echo "WARNING: interop stage took $total s, over its ${INTEROP_STAGE_BUDGET_S} s budget" >&2
	fi
	if [ "${#failed[@]}" -gt 0 ]; then
		echo "interop failures: ${failed[*]}" >&2
		return 1
	fi
}

fuzz_needs_nightly() { grep -qiE 'only accepted on the nightly|requires a nightly|nightly compiler|-Z.*nightly' "$1"; }

stage_fuzz() {
	local stage_t0
	stage_t0=$(now)
	[ -f fuzz/Cargo.toml ] || { echo "fuzz/Cargo.toml not found: no fuzz targets to run" >&2; return 1; }
	local targets log
	targets=$(cd fuzz && cargo fuzz list)
	[ -n "$targets" ] || { echo "cargo fuzz list found no targets in fuzz/" >&2; return 1; }
	echo "targets: $(echo "$targets" | tr '\n' ' ')"
	log=$(mktemp /tmp/mirrordisk-fuzz-build.XXXXXX)
	# cargo-fuzz builds with -Zsanitizer=address, which a stable rustc refuses unless
	# RUSTC_BOOTSTRAP=1. Decide before the first build: a failed probe would be cached
	# in fuzz/target/.rustc_info.json (keyed without RUSTC_BOOTSTRAP) and poison the
	# retry; if a build still asks for nightly, retry with that cache off.
	if ! rustc -vV | grep -qE '^release: .*-(nightly|dev)'; then
		echo "stable rustc: using RUSTC_BOOTSTRAP=1 for cargo fuzz"
		export RUSTC_BOOTSTRAP=1
	fi
	echo "+ cargo fuzz build"
	if ! (cd fuzz && cargo fuzz build) >"$log" 2>&1; then
		if fuzz_needs_nightly "$log"; then
			echo "cargo fuzz asked for nightly: retrying with RUSTC_BOOTSTRAP=1 CARGO_CACHE_RUSTC_INFO=0"
			export RUSTC_BOOTSTRAP=1 CARGO_CACHE_RUSTC_INFO=0
			(cd fuzz && cargo fuzz build) >"$log" 2>&1 || {
				tail -n 40 "$log" >&2
				rm -f "$log"
				return 1
			}
		else
			tail -n 40 "$log" >&2
			rm -f "$log"
			return 1
		fi
	fi
	tail -n 1 "$log"
	rm -f "$log"
	local corpus t seeds rc
	corpus=$(mktemp -d /tmp/mirrordisk-fuzz-corpus.XXXXXX)
	# shellcheck disable=SC2064
	trap "rm -rf -- '$corpus'" EXIT
	for t in $targets; do
		# New inputs go to a scratch corpus; the checked-in corpus (if any) only seeds it,
		# so a run never dirties the work tree. Crashes land in fuzz/artifacts/ (ignored).
		mkdir -p "$corpus/$t"
		seeds=()
		[ -d "fuzz/corpus/$t" ] && seeds=("$ROOT/fuzz/corpus/$t")
		echo "+ cargo fuzz run $t -- -max_total_time=$FUZZ_SECONDS"
		rc=0
		(cd fuzz && timeout -k 10 $((FUZZ_SECONDS + 300)) cargo fuzz run "$t" "$corpus/$t" "${seeds[@]}" -- \
			-max_total_time="$FUZZ_SECONDS" -print_final_stats=1) >"$corpus/$t.log" 2>&1 || rc=$?
		grep -E '^(Done|stat::number_of_executed_units|#[0-9]+.*DONE)' "$corpus/$t.log" | tail -n 2 || true
		if [ "$rc" -ne 0 ]; then
			tail -n 60 "$corpus/$t.log" >&2
			echo "fuzz target $t failed (exit $rc); a crashing input is in fuzz/artifacts/$t/; reproduce with: (cd fuzz && cargo fuzz run $t fuzz/artifacts/$t/<file>)" >&2
			return 1
		fi
	done
	local total
	total=$(secs "$stage_t0" "$(now)")
	if awk -v t="$total" -v b="$FUZZ_STAGE_BUDGET_S" 'BEGIN { exit !(t > b) }'; then
		echo "WARNING: fuzz stage took $total s, over its ${FUZZ_STAGE_BUDGET_S} s budget (lower FUZZ_SECONDS?)" >&2
	fi
}

# ---------------------------------------------------------------------------------

echo "mirrordisk tests: stages ${STAGES[*]} (SERVER=$SERVER CI=$CI)"
if $INSTALL; then run_stage setup; fi
for s in "${STAGES[@]}"; do
	run_stage "$s"
done
printf '\nALL PASSED: %s\n' "${STAGES[*]}"
