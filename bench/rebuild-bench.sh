#!/usr/bin/env bash
# Rebuild benchmark (issue 5's targets), two `mirrordisk agent`s on loopback (alpha and
# beta), disks on tmpfs created --blank and filled with the same random data:
#   full copy     `mirrorctl rebuild db --full --from alpha` (the admin request
#                 rebuild-full), timed from the request to beta UpToDate;
#   differential  `mirrorctl break db` on alpha, PERCENT % of the volume written through
#                 alpha's export as distinct scattered 4 KiB blocks, `mirrorctl rebuild db`
#                 on alpha, timed from link up (the reconnect excluded) to beta UpToDate;
#                 the bytes the resync sent against the bytes written; the ratio to the
#                 full copy (target: <= 3 %);
#   under load    fio 4K randwrite QD32 on alpha's export, idle mirror against the same
#                 run with a full rebuild started after fio's ramp (target: >= 0.5x the
#                 idle IOPS while the rebuild runs, and the rebuild completes).
# Every agent confined to one CPU, fio, libnbd and the status poller on the other.
# Prints a markdown summary with a verdict per target and keeps the raw numbers.
# See bench/README.md ("Rebuild benchmark").
#
# Usage: bench/rebuild-bench.sh [--rounds N] [--quick] ... (--help)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=bench/lib.sh
source "$SCRIPT_DIR/lib.sh"

COMMAND_LINE=""
for var in MIRRORDISK MIRRORCTL; do
    [[ -n ${!var:-} ]] && COMMAND_LINE+="$var=$(printf '%q' "${!var}") "
done
COMMAND_LINE+="bench/rebuild-bench.sh"
for arg in "$@"; do
    [[ $arg =~ ^[A-Za-z0-9_./:,=+-]+$ ]] && COMMAND_LINE+=" $arg" || COMMAND_LINE+=" $(printf '%q' "$arg")"
done

die() { printf 'rebuild-bench: %s\n' "$*" >&2; exit 2; }

usage() {
    cat <<EOF
Usage: bench/rebuild-bench.sh [options]

  --rounds N           full copy + differential rounds; medians over rounds (default: 5)
  --load-rounds N      idle/rebuild fio pairs, 0 for none (default: the same as --rounds)
  --size-mib N         data size of the full/differential volume (default: 1024)
  --percent P          share of the volume dirtied before the differential rebuild, as
                       distinct 4 KiB blocks (default: 1)
  --load-size-mib N    data size of the volume for the run under load (default: 4096:
                       a 1 GiB full copy can be over before fio has measured much)
  --load-resync-rate R resync_rate for the run under load (e.g. 200M; default: none, the
                       adaptive pacing only)
  --runtime S          measured seconds per fio run (default: 8)
  --ramp S             fio ramp_time, excluded from every number (default: 1)
  --no-diff            skip the full copy / differential rounds
  --full-on KIND       what the full rebuilds copy onto: "new" (default), a pair whose
                       metadata was made again with \`mirrorctl create --force\` (not
                       --blank): both disks wait for their first full copy, the documented
                       use of \`rebuild --full\`; or "in-sync", an in-sync pair (and, under
                       load, the rebuild sent once fio's ramp is over)
  --quick              smoke test: 1 round, 3 s runtime (explicit options win)
  --results DIR        where raw results go (default: bench/results/<timestamp>-rebuild/)
  --tmpfs-dir DIR      (default: /dev/shm)
  --disk-dir DIR       the disks in DIR on a disk filesystem instead (information: the
                       agents open them O_DIRECT, the volume's disk bounds both copies)
  --port-base N        first TCP port tried; each pair start gets fresh ones (default: 45000)
  --server-cpu N       CPU both agents are confined to (default: 0)
  --fio-cpu N          CPU fio, libnbd and the status poller run on (default: 1)
  --nice N             niceness of the agents, fio and the poller (default: -20)
  --quiet-wait S       before each measurement, wait up to S s for both CPUs to be idle
                       (default: 10)
  --poll-ms N          status poll interval while timing (default: 10)

Environment: MIRRORDISK, MIRRORCTL (default: target/release/…).
EOF
}

rounds="" load_rounds="" size_mib=1024 percent=1 load_size_mib=4096 load_rate="" runtime=""
ramp=1 diff=1 full_on=new quick=0 results="" tmpfs_dir=/dev/shm on_disk=0 port_base=45000 server_cpu=0 fio_cpu=1
nice=-20 quiet_wait=10 poll_ms=10
while (($#)); do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --load-rounds) load_rounds=$2; shift 2 ;;
        --size-mib) size_mib=$2; shift 2 ;;
        --percent) percent=$2; shift 2 ;;
        --load-size-mib) load_size_mib=$2; shift 2 ;;
        --load-resync-rate) load_rate=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        --ramp) ramp=$2; shift 2 ;;
        --no-diff) diff=0; shift ;;
        --full-on) full_on=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        --results) results=$2; shift 2 ;;
        --tmpfs-dir) tmpfs_dir=$2; shift 2 ;;
        --disk-dir) tmpfs_dir=$2; on_disk=1; shift 2 ;;
        --port-base) port_base=$2; shift 2 ;;
        --server-cpu) server_cpu=$2; shift 2 ;;
        --fio-cpu) fio_cpu=$2; shift 2 ;;
        --nice) nice=$2; shift 2 ;;
        --quiet-wait) quiet_wait=$2; shift 2 ;;
        --poll-ms) poll_ms=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done
if ((quick)); then
    : "${rounds:=1}" "${runtime:=3}"
fi
: "${rounds:=5}" "${load_rounds:=$rounds}" "${runtime:=8}"
MIRRORDISK=${MIRRORDISK:-$REPO_ROOT/target/release/mirrordisk}
MIRRORCTL=${MIRRORCTL:-$(dirname "$MIRRORDISK")/mirrorctl}

# ---------------------------------------------------------------- checks

for v in rounds runtime size_mib load_size_mib poll_ms; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v//_/-} must be a positive integer"
done
for v in load_rounds ramp quiet_wait; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "--${v//_/-} must be a non-negative integer"
done
[[ $percent =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--percent must be a number"
[[ -z $load_rate || $load_rate =~ ^[0-9]+[KMG]?(/s)?$ ]] || die "--load-resync-rate: e.g. 200M, 1G/s, 512K"
((diff || load_rounds > 0)) || die "nothing to do (--no-diff and --load-rounds 0)"
[[ $full_on == new || $full_on == in-sync ]] || die "--full-on must be new or in-sync"
if ! [[ $nice =~ ^-?[0-9]+$ ]] || ((nice < -20 || nice > 19)); then
    die "--nice must be in -20..19"
fi
nice_adj=$((nice - $(nice)))
[[ $(nice -n "$nice_adj" nice 2>/dev/null) == "$nice" ]] ||
    die "cannot run at niceness $nice (not root?); use --nice $(nice)"
export REPL_PY_NICE=$nice
for tool in fio taskset awk dd cmp; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
[[ -x /usr/bin/python3 ]] || die "/usr/bin/python3 not found"
if ((diff)); then
    /usr/bin/python3 -c 'import nbd' 2>/dev/null ||
        die "python3-libnbd not found for /usr/bin/python3 (apt-get install -y python3-libnbd)"
fi
[[ -x $MIRRORDISK && -x $MIRRORCTL ]] ||
    die "mirrordisk/mirrorctl not found at $MIRRORDISK, $MIRRORCTL (cargo build --release)"
fs_kind=$(stat -f -c %T "$tmpfs_dir")
if ((on_disk)); then
    [[ $fs_kind != tmpfs ]] || die "--disk-dir $tmpfs_dir is tmpfs (use --tmpfs-dir)"
else
    [[ $fs_kind == tmpfs ]] || die "$tmpfs_dir is not tmpfs (--disk-dir runs on a disk filesystem)"
fi
online=$(nproc --all)
((server_cpu < online && fio_cpu < online && server_cpu != fio_cpu)) ||
    die "need two distinct online CPUs (server $server_cpu, fio $fio_cpu, $online online)"
# Two disks at a time (the small pair is removed before the large one is made), each
# the data size plus the metadata (a few MiB; 256 MiB of margin), plus a seed file.
need_mib=0
((diff)) && need_mib=$((3 * size_mib + 512))
((load_rounds > 0 && 3 * load_size_mib + 512 > need_mib)) && need_mib=$((3 * load_size_mib + 512))
avail_mib=$(($(stat -f -c '%a * %S' "$tmpfs_dir") / 1048576))
((avail_mib >= need_mib)) ||
    die "$tmpfs_dir has $avail_mib MiB free, $need_mib MiB needed (--load-size-mib smaller?)"

results=${results:-$REPO_ROOT/bench/results/$(date +%Y%m%d-%H%M%S)-rebuild}
mkdir -p "$results/json" "$results/logs"
# Run copies: a `cargo build` during the benchmark must not mix two builds.
MIRRORDISK_SOURCE=$MIRRORDISK
cp -p -- "$MIRRORDISK" "$results/mirrordisk"
cp -p -- "$MIRRORCTL" "$results/mirrorctl"
MIRRORDISK=$results/mirrordisk
MIRRORCTL=$results/mirrorctl
FULL_CSV=$results/full.csv
DIFF_CSV=$results/diff.csv
LOAD_CSV=$results/load.csv
WORK=$(mktemp -d "$tmpfs_dir/mirrordisk-rebuild-bench.XXXXXX")

# ---------------------------------------------------------------- cleanup

ALPHA_PID="" BETA_PID=""
cleanup() {
    local rc=$?
    [[ -n $ALPHA_PID ]] && bench_stop_pid "$ALPHA_PID"
    [[ -n $BETA_PID ]] && bench_stop_pid "$BETA_PID"
    [[ -n ${WORK:-} ]] && rm -rf -- "$WORK"
    [[ -n ${results:-} ]] && rm -f -- "$results/mirrordisk" "$results/mirrorctl"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# bench/lib.sh's repl_start_pair and repl_stop_pair use these.
REPL_WORK=$WORK REPL_NICE_ADJ=$nice_adj REPL_SERVER_CPU=$server_cpu REPL_NEXT_PORT=$port_base
REPL_RESYNC_RATE=""
poll_s=$(awk -v ms="$poll_ms" 'BEGIN { print ms / 1000 }')
# Status poll interval during the fio runs of part (c): alpha's write counter and beta's
# state, in both runs alike.
LOAD_POLL_MS=20
load_poll_s=$(awk -v ms="$LOAD_POLL_MS" 'BEGIN { print ms / 1000 }')
FAILED=0
quiet() { ((quiet_wait == 0)) || bench_py quiet --cpus "$server_cpu,$fio_cpu" --timeout "$quiet_wait"; }
fail() { bench_log "  $*"; FAILED=$((FAILED + 1)); }

# make_pair SIZE_MIB: alpha.img and beta.img in WORK, created --blank, the same random
# data in both data partitions. Sets DATA_OFFSET, DATA_BYTES.
make_pair() {
    local mib=$1
    rm -f -- "$WORK/alpha.img" "$WORK/beta.img" "$WORK/seed.img"
    DATA_BYTES=$((mib * 1048576))
    DATA_OFFSET=$(repl_data_offset "$MIRRORCTL" "$WORK" "$mib")
    bench_log "creating the pair: $mib MiB data partitions at offset $DATA_OFFSET, the same random data"
    head -c "${mib}M" /dev/urandom >"$WORK/seed.img"
    repl_make_disks "$MIRRORCTL" "$WORK" "$mib" "$WORK/seed.img" "$DATA_OFFSET"
    rm -f -- "$WORK/seed.img"
}

# check_identical WHAT: after the agents stopped, the two data partitions must be equal.
IDENTICAL=()
check_identical() {
    if repl_data_identical "$WORK" "$DATA_OFFSET" "$DATA_BYTES"; then
        IDENTICAL+=("$1: yes")
    else
        IDENTICAL+=("$1: NO")
        fail "$1: the data partitions of alpha and beta differ"
    fi
}

# ---------------------------------------------------------------- full + differential

BLOCKS=0
diff_round() { # ROUND
    local r=$1 prefix=$results/logs/r$1-diff out mode=""
    if [[ $full_on == new ]]; then
        mode=new
        repl_new_metadata "$MIRRORCTL" "$WORK" "$size_mib" 2>>"$prefix.alpha.log" ||
            { fail "round $r: mirrorctl create failed (see $prefix.alpha.log)"; return 0; }
    fi
    if ! repl_start_pair "$prefix" "$mode"; then
        fail "round $r: the pair did not start (see $prefix.*.log)"
        repl_stop_pair "$prefix" || true
        return 0
    fi
    # (a) Full copy, both inactive.
    quiet
    repl_py full-copy --source "$WORK/alpha.sock" --target "$WORK/beta.sock" --mirror db --from alpha \
        --bytes "$DATA_BYTES" --pid "$ALPHA_PID" --pid "$BETA_PID" --server-cpu "$server_cpu" \
        --client-cpu "$fio_cpu" --interval "$poll_s" --timeout 600 --csv "$FULL_CSV" \
        --meta "round=$r" --meta "method=mirror" --meta "position=1" ||
        fail "round $r: the full copy failed"
    # (b) Alpha active; break, dirty PERCENT % of the volume, rebuild.
    if ! repl_py wait --socket "$WORK/alpha.sock" --until 'in_sync(m)' --timeout 30 >/dev/null \
        2>>"$prefix.alpha.log" || ! repl_activate_alpha "$prefix"; then
        fail "round $r: alpha could not be activated after the full copy (see $prefix.alpha.log)"
        repl_stop_pair "$prefix" || true
        return 0
    fi
    if ! repl_py admin --socket "$WORK/alpha.sock" --json '{"command":"break","mirror":"db"}' \
        >>"$prefix.alpha.log" 2>&1 ||
        ! repl_py wait --socket "$WORK/alpha.sock" --until "m['connection']['link']['state'] == 'broken'" \
            --timeout 10 >/dev/null 2>>"$prefix.alpha.log" ||
        ! repl_py wait --socket "$WORK/beta.sock" --until "m['connection']['state'] == 'disconnected'" \
            --timeout 10 >/dev/null 2>>"$prefix.beta.log"; then
        fail "round $r: break failed (see $prefix.alpha.log)"
        repl_stop_pair "$prefix" || true
        return 0
    fi
    if ! out=$(repl_py scatter --uri "nbd://127.0.0.1:$NBD_PORT/db" --count "$BLOCKS" --seed "$r" \
        2>>"$prefix.scatter.log"); then
        fail "round $r: the scattered writes failed (see $prefix.scatter.log)"
        repl_stop_pair "$prefix" || true
        return 0
    fi
    echo "$out" >>"$prefix.scatter.log"
    bench_log "    scattered writes: $out"
    quiet
    repl_py diff-rebuild --source "$WORK/alpha.sock" --target "$WORK/beta.sock" --mirror db \
        --written $((BLOCKS * 4096)) --pid "$ALPHA_PID" --pid "$BETA_PID" --client-cpu "$fio_cpu" \
        --interval "$poll_s" --timeout 120 --csv "$DIFF_CSV" --meta "round=$r" ||
        fail "round $r: the differential rebuild failed"
    repl_stop_pair "$prefix" || fail "round $r: an agent did not stop cleanly"
    sleep 0.3
}

# ---------------------------------------------------------------- under load

load_run() { # ROUND PHASE
    local r=$1 phase=$2 tag=r$1-load-$2 rebuild=()
    if [[ $phase == rebuild ]]; then
        rebuild=(--rebuild-from alpha --bytes "$DATA_BYTES")
        [[ $full_on == new ]] && rebuild+=(--new-pair)
    fi
    quiet
    repl_py load-run --source "$WORK/alpha.sock" --target "$WORK/beta.sock" --mirror db "${rebuild[@]}" \
        --ramp "$ramp" --pid "$ALPHA_PID" --pid "$BETA_PID" --server-cpu "$server_cpu" \
        --fio-cpu "$fio_cpu" --interval "$load_poll_s" --timeout $((runtime + ramp + 60)) --rebuild-timeout 900 \
        --json "$results/json/$tag.json" --log "$results/logs/$tag.fio.log" --csv "$LOAD_CSV" \
        --meta "round=$r" --meta "phase=$phase" \
        -- fio --name="randwrite-4k-qd32-$phase" --ioengine=nbd --uri="nbd://127.0.0.1:$NBD_PORT/db" \
        --rw=randwrite --bs=4k --iodepth=32 --time_based --runtime="$runtime" --ramp_time="$ramp" \
        --norandommap --randrepeat=1 --cpus_allowed="$fio_cpu" \
        --output-format=json --output="$results/json/$tag.json" ||
        fail "round $r: the $phase run failed"
}

# load_phase ROUND PHASE: a pair of its own for each run. idle: in sync, alpha active.
# rebuild, --full-on new: fresh metadata, both waiting; load-run sends rebuild-full,
# activates alpha, then starts fio. rebuild, --full-on in-sync: as idle, and load-run
# sends rebuild-full once fio's ramp is over.
load_phase() {
    local r=$1 phase=$2 prefix=$results/logs/r$1-load-$2 mode=activate
    if [[ $phase == rebuild && $full_on == new ]]; then
        mode=new
        repl_new_metadata "$MIRRORCTL" "$WORK" "$load_size_mib" 2>>"$prefix.alpha.log" ||
            { fail "load round $r: mirrorctl create failed (see $prefix.alpha.log)"; return 0; }
    fi
    if ! repl_start_pair "$prefix" "$mode"; then
        fail "load round $r ($phase): the pair did not start (see $prefix.*.log)"
        repl_stop_pair "$prefix" || true
        return 0
    fi
    load_run "$r" "$phase"
    repl_stop_pair "$prefix" || fail "load round $r ($phase): an agent did not stop cleanly"
    sleep 0.3
}

load_round() { # ROUND: idle first in odd rounds, rebuild first in even ones
    if (($1 % 2)); then
        load_phase "$1" idle
        load_phase "$1" rebuild
    else
        load_phase "$1" rebuild
        load_phase "$1" idle
    fi
}

# ---------------------------------------------------------------- header

BLOCKS=$(awk -v mib="$size_mib" -v p="$percent" 'BEGIN { printf "%d", mib * 256 * p / 100 }')
((!diff || BLOCKS > 0)) || die "--percent $percent of $size_mib MiB is less than one 4 KiB block"
load_note=""
[[ -n $load_rate ]] && load_note="resync_rate = \"$load_rate\""
if [[ $full_on == new ]]; then
    full_desc="a new pair (\`mirrorctl create --force\` again on both disks, not --blank, data kept: both wait for this first full copy)"
    load_desc="on a new pair, \`rebuild-full\` from alpha, alpha activated at once (during the copy), then fio started"
else
    full_desc="an in-sync pair"
    load_desc="on an in-sync pair with alpha active, \`rebuild-full\` from alpha sent when fio's ramp ends"
fi
started=$SECONDS
{
    echo "## Rebuild benchmark"
    echo
    echo '```'
    echo "$COMMAND_LINE"
    echo '```'
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); host: $(uname -n); kernel $(uname -r);" \
        "$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), $online CPUs;" \
        "load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- mirrordisk: $MIRRORDISK_SOURCE, built $(date -u -r "$MIRRORDISK" +%Y-%m-%dT%H:%M:%SZ)," \
        "sha256 $(sha256sum <"$MIRRORDISK" | cut -c1-12), tree at git" \
        "$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO_ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' + local changes'), run as a copy"
    echo "- two agents, \`nice -n $nice taskset -c $server_cpu mirrordisk agent --config CLUSTER.toml --node alpha|beta\`" \
        "(config: bench/lib.sh repl_write_config, one replication path on loopback), disks on $fs_kind ($tmpfs_dir)" \
        "created with \`mirrorctl create … --blank\` and filled with the same random data; alpha active;" \
        "the poller, libnbd and fio on CPU $fio_cpu at niceness $nice"
    if ((diff)); then
        echo "- full copy / differential: $rounds round(s) on a ${size_mib} MiB volume, a fresh pair of agents" \
            "per round; status polled every $poll_ms ms; full copy on $full_desc, both inactive;" \
            "then alpha activated, \`break\` on alpha, $percent % dirtied = $BLOCKS distinct random 4 KiB" \
            "blocks (python3-libnbd, QD 32, then FLUSH) written through alpha's export, \`rebuild\` on alpha"
    fi
    if ((load_rounds > 0)); then
        echo "- under load: $load_rounds round(s) on a ${load_size_mib} MiB volume${load_note:+ ($load_note)}," \
            "idle and rebuild runs alternating first, a fresh pair of agents per run; \`fio --ioengine=nbd" \
            "--rw=randwrite --bs=4k --iodepth=32 --time_based --runtime=$runtime --ramp_time=$ramp" \
            "--norandommap --randrepeat=1 --cpus_allowed=$fio_cpu\`; rebuild run: $load_desc"
    fi
    echo "- raw results: $results/"
    echo
} | tee "$results/header.md"

# ---------------------------------------------------------------- main

head -c 32 /dev/urandom | base64 >"$WORK/secret"
chmod 600 "$WORK/secret"
diff_bytes=0
if ((diff)); then
    make_pair "$size_mib"
    diff_bytes=$DATA_BYTES
    for ((r = 1; r <= rounds; r++)); do
        bench_log "[full copy + differential $r/$rounds]"
        diff_round "$r"
    done
    check_identical "full/differential pair"
fi
load_bytes=0
if ((load_rounds > 0)); then
    REPL_RESYNC_RATE=$load_rate
    make_pair "$load_size_mib"
    load_bytes=$DATA_BYTES
    for ((r = 1; r <= load_rounds; r++)); do
        bench_log "[under load $r/$load_rounds]"
        load_round "$r"
    done
    check_identical "load pair"
fi

elapsed=$((SECONDS - started))
{
    if [[ -s $FULL_CSV || -s $DIFF_CSV || -s $LOAD_CSV ]]; then
        repl_py summary-rebuild --full-csv "$FULL_CSV" --diff-csv "$DIFF_CSV" --load-csv "$LOAD_CSV" \
            --volume-bytes "$diff_bytes" --percent "$percent" --load-volume-bytes "$load_bytes" \
            --load-note "$load_note" --poll-ms "$poll_ms" --load-poll-ms "$LOAD_POLL_MS"
    else
        echo "No measurement completed."
    fi
    if ((${#IDENTICAL[@]})); then
        echo "Data partitions of alpha and beta identical at the end: $(printf '%s; ' "${IDENTICAL[@]}" | sed 's/; $//')"
    fi
    echo
    echo "Wall time: $((elapsed / 60)) min $((elapsed % 60)) s; $FAILED failed step(s);" \
        "load average at the end $(cut -d' ' -f1-3 /proc/loadavg)."
} | tee "$results/summary.body.md"
cat "$results/header.md" "$results/summary.body.md" >"$results/summary.md"
rm -f "$results/header.md" "$results/summary.body.md"
bench_log "summary: $results/summary.md"
((FAILED == 0))
