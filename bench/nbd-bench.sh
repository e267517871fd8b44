#!/usr/bin/env bash
# NBD server benchmark: fio's nbd engine against `mirrordisk serve`, nbdkit (file
# plugin) and qemu-nbd, serving the same fully written backing file (tmpfs and/or ext4),
# interleaved over several rounds. Prints a markdown summary (medians, ratios, CPU per
# I/O, peak RSS, verdict against the issue's targets) and keeps every run's raw numbers.
# See bench/README.md for what each number means.
#
# Usage: bench/nbd-bench.sh [--servers LIST] [--backing tmpfs|disk|both] [--rounds N]
#        [--runtime S] [--ramp S] [--quick] [--results DIR] ...   (--help for all)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=bench/lib.sh
source "$SCRIPT_DIR/lib.sh"

COMMAND_LINE=""
for var in MIRRORDISK NBDKIT_FILE_OPTS QEMU_NBD_EXTRA; do
    [[ -n ${!var:-} ]] && COMMAND_LINE+="$var=$(printf '%q' "${!var}") "
done
COMMAND_LINE+="bench/nbd-bench.sh"
for arg in "$@"; do
    [[ $arg =~ ^[A-Za-z0-9_./:,=+-]+$ ]] && COMMAND_LINE+=" $arg" || COMMAND_LINE+=" $(printf '%q' "$arg")"
done

usage() {
    cat <<EOF
Usage: bench/nbd-bench.sh [options]

  --servers LIST     comma-separated, from mirrordisk,nbdkit,qemu-nbd (default: all three)
  --backing WHICH    tmpfs, disk or both (default: both)
  --rounds N         interleaved rounds; medians are over rounds (default: 5)
  --runtime S        measured seconds per fio run (default: 8)
  --ramp S           fio ramp_time, excluded from every number (default: 1)
  --size-mib N       backing file size (default: 1024)
  --workloads LIST   timed workloads (default: all five):
                     randwrite-4k-qd32,randread-4k-qd32,write-1m-qd16,read-1m-qd16,write-4k-qd1
  --no-mem           skip the memory-only runs (4K randwrite QD128, 4 MiB write QD32)
  --quick            smoke test: 1 round, 3 s runtime, tmpfs only (explicit options win)
  --results DIR      where raw results go (default: bench/results/<timestamp>/)
  --tmpfs-dir DIR    (default: /dev/shm)       --disk-dir DIR   (default: /var/tmp)
  --port-base N      first TCP port tried; each run gets a fresh one (default: 41000)
  --server-cpu N     CPU every server is confined to (default: 0)
  --fio-cpu N        CPU fio is pinned to (default: 1)
  --nice N           niceness of every server and of fio (default: -20, so that other
                     people's builds on a shared machine disturb little; 0 for none)
  --quiet-wait S     before each run, wait up to S s for both CPUs to be idle (<= 10 %
                     busy), e.g. for someone's build to end; 0 disables (default: 10)

Environment: MIRRORDISK (default: target/release/mirrordisk),
             NBDKIT_FILE_OPTS (extra file-plugin parameters, default: none),
             QEMU_NBD_EXTRA (extra qemu-nbd flags, default: none).
EOF
}

servers="" backing="" rounds="" runtime="" ramp="" size_mib="" results="" quick=0
workloads="" mem=1 tmpfs_dir=/dev/shm disk_dir=/var/tmp port_base=41000
server_cpu=0 fio_cpu=1 quiet_wait=10 nice=-20
while (($#)); do
    case $1 in
        --servers) servers=$2; shift 2 ;;
        --backing) backing=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        --ramp) ramp=$2; shift 2 ;;
        --size-mib) size_mib=$2; shift 2 ;;
        --workloads) workloads=$2; shift 2 ;;
        --no-mem) mem=0; shift ;;
        --quick) quick=1; shift ;;
        --results) results=$2; shift 2 ;;
        --tmpfs-dir) tmpfs_dir=$2; shift 2 ;;
        --disk-dir) disk_dir=$2; shift 2 ;;
        --port-base) port_base=$2; shift 2 ;;
        --server-cpu) server_cpu=$2; shift 2 ;;
        --fio-cpu) fio_cpu=$2; shift 2 ;;
        --quiet-wait) quiet_wait=$2; shift 2 ;;
        --nice) nice=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; bench_die "unknown option: $1" ;;
    esac
done
if ((quick)); then
    : "${rounds:=1}" "${runtime:=3}" "${backing:=tmpfs}"
fi
: "${servers:=mirrordisk,nbdkit,qemu-nbd}" "${backing:=both}" "${rounds:=5}"
: "${runtime:=8}" "${ramp:=1}" "${size_mib:=1024}"
: "${workloads:=randwrite-4k-qd32,randread-4k-qd32,write-1m-qd16,read-1m-qd16,write-4k-qd1}"
MIRRORDISK=${MIRRORDISK:-$REPO_ROOT/target/release/mirrordisk}
read -r -a NBDKIT_OPTS <<<"${NBDKIT_FILE_OPTS:-}"
read -r -a QEMU_NBD_OPTS <<<"${QEMU_NBD_EXTRA:-}"

# name rw bs iodepth kind. kind picks the headline metric: iops, bw (MB/s) or lat (p50
# completion latency); "mem" runs are only for peak RSS.
declare -A WORKLOAD_SPEC=(
    [randwrite-4k-qd32]="randwrite 4k 32 iops"
    [randread-4k-qd32]="randread 4k 32 iops"
    [write-1m-qd16]="write 1m 16 bw"
    [read-1m-qd16]="read 1m 16 bw"
    [write-4k-qd1]="write 4k 1 lat"
    [randwrite-4k-qd128]="randwrite 4k 128 mem"
    [write-4m-qd32]="write 4m 32 mem"
)
MEM_WORKLOADS=(randwrite-4k-qd128 write-4m-qd32)

# ---------------------------------------------------------------- checks

IFS=, read -r -a SERVERS <<<"$servers"
IFS=, read -r -a WORKLOADS <<<"$workloads"
case $backing in
    tmpfs) BACKINGS=(tmpfs) ;;
    disk) BACKINGS=(disk) ;;
    both) BACKINGS=(tmpfs disk) ;;
    *) bench_die "--backing must be tmpfs, disk or both" ;;
esac
[[ $rounds =~ ^[1-9][0-9]*$ ]] || bench_die "--rounds must be a positive integer"
[[ $runtime =~ ^[1-9][0-9]*$ ]] || bench_die "--runtime must be a positive integer (seconds)"
[[ $ramp =~ ^[0-9]+$ ]] || bench_die "--ramp must be a non-negative integer (seconds)"
[[ $quiet_wait =~ ^[0-9]+$ ]] || bench_die "--quiet-wait must be a non-negative integer (seconds)"
if ! [[ $nice =~ ^-?[0-9]+$ ]] || ((nice < -20 || nice > 19)); then
    bench_die "--nice must be in -20..19"
fi
nice_adj=$((nice - $(nice))) # `nice -n` is relative to our own niceness
[[ $(nice -n "$nice_adj" nice 2>/dev/null) == "$nice" ]] ||
    bench_die "cannot run at niceness $nice (not root?); use --nice $(nice)"
for w in "${WORKLOADS[@]}"; do
    [[ -n ${WORKLOAD_SPEC[$w]:-} ]] || bench_die "unknown workload: $w"
done
for tool in fio taskset awk; do
    command -v "$tool" >/dev/null || bench_die "$tool not found (apt-get install -y fio util-linux)"
done
[[ -x /usr/bin/python3 ]] || bench_die "/usr/bin/python3 not found"
for s in "${SERVERS[@]}"; do
    case $s in
        mirrordisk)
            [[ -x $MIRRORDISK ]] || bench_die "mirrordisk binary not found at $MIRRORDISK" \
                "(cargo build --release, set MIRRORDISK, or use --servers nbdkit,qemu-nbd)" ;;
        nbdkit) command -v nbdkit >/dev/null || bench_die "nbdkit not found (apt-get install -y nbdkit)" ;;
        qemu-nbd) command -v qemu-nbd >/dev/null || bench_die "qemu-nbd not found (apt-get install -y qemu-utils)" ;;
        *) bench_die "unknown server: $s (mirrordisk, nbdkit, qemu-nbd)" ;;
    esac
done
online=$(nproc --all)
((server_cpu < online && fio_cpu < online && server_cpu != fio_cpu)) ||
    bench_die "need two distinct online CPUs (server $server_cpu, fio $fio_cpu, $online online)"

results=${results:-$REPO_ROOT/bench/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$results/json" "$results/logs"
# Run a copy: a `cargo build` during the benchmark must not mix two builds in one table.
MIRRORDISK_SOURCE=$MIRRORDISK
if [[ " ${SERVERS[*]} " == *" mirrordisk "* ]]; then
    cp -p -- "$MIRRORDISK" "$results/mirrordisk"
    MIRRORDISK=$results/mirrordisk
fi
CSV=$results/runs.csv
: >"$results/summary.md"

# ---------------------------------------------------------------- cleanup

SERVER_PID=""
declare -A BACKING_FILE=()
cleanup() {
    local rc=$?
    [[ -n $SERVER_PID ]] && bench_stop_pid "$SERVER_PID"
    SERVER_PID=""
    local f
    for f in "${BACKING_FILE[@]}"; do rm -f -- "$f"; done
    [[ -n ${results:-} ]] && rm -f -- "$results/mirrordisk"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- servers

# Every server: started fresh for each fio run as `nice -n ADJ taskset -c $server_cpu CMD`,
# on a port no socket has used yet, and stopped (SIGTERM) once its CPU time and peak RSS
# are read.
server_command() { # NAME FILE PORT -> prints the command, one word a line
    local name=$1 file=$2 port=$3
    case $name in
        mirrordisk) printf '%s\n' "$MIRRORDISK" serve "$file" --listen "127.0.0.1:$port" ;;
        # File plugin defaults: cache=default (page cache), fadvise=normal, 16 threads.
        nbdkit) printf '%s\n' nbdkit -f -i 127.0.0.1 -p "$port" file "$file" "${NBDKIT_OPTS[@]}" ;;
        # -t: stay up after fio disconnects, so its CPU and RSS can still be read;
        # -e 16: up to 16 clients; discard and detect-zeroes spelled out at their defaults.
        qemu-nbd) printf '%s\n' qemu-nbd -f raw --cache=none --aio=io_uring \
            --discard=ignore --detect-zeroes=off -b 127.0.0.1 -p "$port" -e 16 -t \
            "${QEMU_NBD_OPTS[@]}" "$file" ;;
    esac
}

NEXT_PORT=$port_base
take_port() {
    while ! bench_port_free "$NEXT_PORT"; do NEXT_PORT=$((NEXT_PORT + 1)); done
    PORT=$NEXT_PORT
    NEXT_PORT=$((NEXT_PORT + 1))
}

start_server() { # NAME FILE LOG -> SERVER_PID, PORT
    local name=$1 file=$2 log=$3 cmd
    take_port
    mapfile -t cmd < <(server_command "$name" "$file" "$PORT")
    printf '$ nice -n %s taskset -c %s %s\n' "$nice_adj" "$server_cpu" "${cmd[*]}" >>"$log"
    nice -n "$nice_adj" taskset -c "$server_cpu" "${cmd[@]}" </dev/null >>"$log" 2>&1 &
    SERVER_PID=$!
    if ! bench_wait_listening "$SERVER_PID" "$PORT" 20; then
        bench_log "  $name did not listen on 127.0.0.1:$PORT within 20 s; log: $log"
        tail -n 20 "$log" >&2 || true
        bench_stop_pid "$SERVER_PID"
        SERVER_PID=""
        return 1
    fi
}

# ---------------------------------------------------------------- one run

FAILED_RUNS=0
run_one() { # BACKING ROUND WORKLOAD SERVER POSITION
    local backing=$1 round=$2 workload=$3 server=$4 position=$5
    local rw bs qd kind file tag
    read -r rw bs qd kind <<<"${WORKLOAD_SPEC[$workload]}"
    file=${BACKING_FILE[$backing]}
    tag="$backing-r$round-$workload-$server"
    # Dirty pages left by the previous run (buffered servers on ext4) are written back
    # now, not during the next server's run.
    [[ $backing == disk ]] && sync -f "$file"
    ((quiet_wait > 0)) && bench_py quiet --cpus "$server_cpu,$fio_cpu" --timeout "$quiet_wait"
    if ! start_server "$server" "$file" "$results/logs/$tag.server.log"; then
        FAILED_RUNS=$((FAILED_RUNS + 1))
        return 0
    fi
    if ! bench_py run --pid "$SERVER_PID" --fio-cpu "$fio_cpu" --server-cpu "$server_cpu" \
        --nice "$nice_adj" \
        --timeout $((runtime + ramp + 60)) \
        --json "$results/json/$tag.json" --log "$results/logs/$tag.fio.log" --csv "$CSV" \
        --meta "backing=$backing" --meta "round=$round" --meta "workload=$workload" \
        --meta "server=$server" --meta "position=$position" --meta "kind=$kind" \
        --meta "rw=$rw" --meta "bs=$bs" --meta "iodepth=$qd" --meta "port=$PORT" \
        -- fio --name="$workload" --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --time_based --runtime="$runtime" \
        --ramp_time="$ramp" --norandommap --randrepeat=1 --cpus_allowed="$fio_cpu" \
        --output-format=json --output="$results/json/$tag.json"; then
        FAILED_RUNS=$((FAILED_RUNS + 1))
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            local rc=0
            wait "$SERVER_PID" 2>/dev/null || rc=$?
            echo "# server exited with status $rc$( ((rc > 128)) && echo " (signal $((rc - 128)))")" >>"$results/logs/$tag.server.log"
            bench_log "    $server exited with status $rc$( ((rc > 128)) && echo " (signal $((rc - 128)))")"
        fi
    fi
    bench_stop_pid "$SERVER_PID"
    SERVER_PID=""
    sleep 0.3
}

rotated() { # OFFSET -> the servers, starting at OFFSET mod count
    local n=${#SERVERS[@]} i
    for ((i = 0; i < n; i++)); do printf '%s\n' "${SERVERS[(($1 + i) % n)]}"; done
}

# ---------------------------------------------------------------- header

fs_type() { stat -f -c %T "$1"; }
version_of() {
    case $1 in
        mirrordisk) printf '%s, built %s, sha256 %.12s, tree at git %s%s, run as a copy' \
            "$MIRRORDISK_SOURCE" "$(date -u -r "$MIRRORDISK" +%Y-%m-%dT%H:%M:%SZ)" \
            "$(sha256sum <"$MIRRORDISK")" \
            "$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" \
            "$(git -C "$REPO_ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' + local changes')" ;;
        nbdkit) nbdkit --version | head -n 1 ;;
        qemu-nbd) qemu-nbd --version | head -n 1 ;;
    esac
}
{
    echo "## NBD server benchmark"
    echo
    echo '```'
    echo "$COMMAND_LINE"
    echo '```'
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); host: $(uname -n); kernel $(uname -r);" \
        "$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), $online CPUs"
    echo "- $(fio --version); servers confined to CPU $server_cpu (taskset), fio pinned to CPU $fio_cpu," \
        "both at niceness $nice"
    echo "- rounds $rounds (servers rotate within each round), runtime ${runtime} s after ramp ${ramp} s," \
        "backing ${size_mib} MiB of random data: ${BACKINGS[*]}"
    for s in "${SERVERS[@]}"; do
        mapfile -t cmd < <(server_command "$s" FILE PORT)
        echo "- $s: $(version_of "$s"): \`nice -n $nice taskset -c $server_cpu ${cmd[*]}\`"
    done
    echo "- fio: \`nice -n $nice taskset -c $fio_cpu fio --ioengine=nbd --uri=nbd://127.0.0.1:PORT/ --rw=RW --bs=BS" \
        "--iodepth=QD --time_based --runtime=$runtime --ramp_time=$ramp --norandommap --randrepeat=1" \
        "--cpus_allowed=$fio_cpu --output-format=json\`"
    echo "- raw results: $results/runs.csv"
    echo
} | tee "$results/header.md"

# ---------------------------------------------------------------- backings

make_backing() { # BACKING
    local which=$1 dir file
    [[ $which == tmpfs ]] && dir=$tmpfs_dir || dir=$disk_dir
    [[ -d $dir ]] || bench_die "$dir does not exist"
    if [[ $which == tmpfs && $(fs_type "$dir") != tmpfs ]]; then
        bench_die "$dir is not tmpfs ($(fs_type "$dir"))"
    fi
    if [[ $which == disk && $(fs_type "$dir") == tmpfs ]]; then
        bench_die "$dir is tmpfs; --disk-dir must be on a disk file system"
    fi
    file=$dir/mirrordisk-bench-$$.img
    BACKING_FILE[$which]=$file
    bench_log "writing ${size_mib} MiB of random data to $file ($(fs_type "$dir"))"
    if [[ $which == disk && -n ${BACKING_FILE[tmpfs]:-} ]]; then
        cp -- "${BACKING_FILE[tmpfs]}" "$file"
    else
        head -c "${size_mib}M" /dev/urandom >"$file"
    fi
    sync -f "$file"
}

# ---------------------------------------------------------------- main

started=$SECONDS
for b in "${BACKINGS[@]}"; do make_backing "$b"; done

for b in "${BACKINGS[@]}"; do
    for ((r = 1; r <= rounds; r++)); do
        for wi in "${!WORKLOADS[@]}"; do
            w=${WORKLOADS[$wi]}
            bench_log "[$b round $r/$rounds] $w"
            pos=0
            while read -r s; do
                pos=$((pos + 1))
                run_one "$b" "$r" "$w" "$s" "$pos"
            done < <(rotated $((r - 1 + wi)))
        done
    done
    if ((mem)); then
        for wi in "${!MEM_WORKLOADS[@]}"; do
            w=${MEM_WORKLOADS[$wi]}
            bench_log "[$b memory] $w"
            pos=0
            while read -r s; do
                pos=$((pos + 1))
                run_one "$b" mem "$w" "$s" "$pos"
            done < <(rotated "$wi")
        done
    fi
done

elapsed=$((SECONDS - started))
{
    if [[ -s $CSV ]]; then
        bench_py summary --csv "$CSV" --servers "$servers" \
            --backings "$(IFS=,; echo "${BACKINGS[*]}")" --workloads "$workloads"
    else
        echo "No run completed."
    fi
    echo "Wall time: $((elapsed / 60)) min $((elapsed % 60)) s; $FAILED_RUNS failed run(s)."
} | tee "$results/summary.body.md"
cat "$results/header.md" "$results/summary.body.md" >"$results/summary.md"
rm -f "$results/header.md" "$results/summary.body.md"
bench_log "summary: $results/summary.md"
((FAILED_RUNS == 0))
