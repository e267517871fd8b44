#!/usr/bin/env bash
# Replication benchmark (issue 4's targets): fio's nbd engine against
#   replicated  two `mirrordisk agent`s on loopback (alpha primary, beta secondary), each
#               with a tmpfs disk whose data partition is SIZE (1 GiB), blank-created and
#               in sync; fio writes through alpha's NBD export;
#   serve       `mirrordisk serve` on a single tmpfs file of SIZE (no replication);
#   qemu-nbd    and nbdkit: the same single file, as in bench/nbd-bench.sh;
# interleaved over several rounds, every server (both agents included) confined to the
# same CPU, fio on another. Then the full copy: `mirrorctl rebuild --full --from alpha`
# timed to in-sync, against `nbdcopy` between two qemu-nbd exports of the same two data
# partitions. Prints a markdown summary with a verdict per target and keeps the raw
# numbers. See bench/README.md ("Replication benchmark").
#
# Usage: bench/replication-bench.sh [--rounds N] [--runtime S] [--quick] ... (--help)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=bench/lib.sh
source "$SCRIPT_DIR/lib.sh"

COMMAND_LINE=""
for var in MIRRORDISK MIRRORCTL NBDKIT_FILE_OPTS QEMU_NBD_EXTRA; do
    [[ -n ${!var:-} ]] && COMMAND_LINE+="$var=$(printf '%q' "${!var}") "
done
COMMAND_LINE+="bench/replication-bench.sh"
for arg in "$@"; do
    [[ $arg =~ ^[A-Za-z0-9_./:,=+-]+$ ]] && COMMAND_LINE+=" $arg" || COMMAND_LINE+=" $(printf '%q' "$arg")"
done

die() { printf 'replication-bench: %s\n' "$*" >&2; exit 2; }

usage() {
    cat <<EOF
Usage: bench/replication-bench.sh [options]

  --servers LIST     comma-separated, from replicated,serve,qemu-nbd,nbdkit (default: all)
  --workloads LIST   from write-1m-qd16,randwrite-4k-qd32,write-4k-qd1 (default: all)
  --rounds N         interleaved rounds; medians are over rounds (default: 5)
  --copy-rounds N    full-copy rounds (mirror rebuild vs nbdcopy), 0 for none
                     (default: the same as --rounds)
  --runtime S        measured seconds per fio run (default: 8)
  --ramp S           fio ramp_time, excluded from every number (default: 1)
  --size-mib N       data size of every disk and file (default: 1024)
  --quick            smoke test: 1 round, 3 s runtime, 1 copy round (explicit options win)
  --results DIR      where raw results go (default: bench/results/<timestamp>-replication/)
  --tmpfs-dir DIR    (default: /dev/shm)
  --port-base N      first TCP port tried; each server start gets fresh ones (default: 43000)
  --server-cpu N     CPU every server and both agents are confined to (default: 0)
  --fio-cpu N        CPU fio, nbdcopy and the status poller run on (default: 1)
  --nice N           niceness of servers, agents, fio, nbdcopy and the poller (default: -20)
  --quiet-wait S     before each run, wait up to S s for both CPUs to be idle (default: 10)
  --poll-ms N        status poll interval while timing the full copy (default: 10)

Environment: MIRRORDISK, MIRRORCTL (default: target/release/…), NBDKIT_FILE_OPTS,
             QEMU_NBD_EXTRA (as in nbd-bench.sh).
EOF
}

servers="" workloads="" rounds="" copy_rounds="" runtime="" ramp="" size_mib="" results=""
quick=0 tmpfs_dir=/dev/shm port_base=43000 server_cpu=0 fio_cpu=1 quiet_wait=10 nice=-20 poll_ms=10
while (($#)); do
    case $1 in
        --servers) servers=$2; shift 2 ;;
        --workloads) workloads=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --copy-rounds) copy_rounds=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        --ramp) ramp=$2; shift 2 ;;
        --size-mib) size_mib=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        --results) results=$2; shift 2 ;;
        --tmpfs-dir) tmpfs_dir=$2; shift 2 ;;
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
    : "${rounds:=1}" "${runtime:=3}" "${copy_rounds:=1}"
fi
: "${servers:=replicated,serve,qemu-nbd,nbdkit}" "${rounds:=5}" "${copy_rounds:=$rounds}"
: "${runtime:=8}" "${ramp:=1}" "${size_mib:=1024}"
: "${workloads:=write-1m-qd16,randwrite-4k-qd32,write-4k-qd1}"
MIRRORDISK=${MIRRORDISK:-$REPO_ROOT/target/release/mirrordisk}
MIRRORCTL=${MIRRORCTL:-$(dirname "$MIRRORDISK")/mirrorctl}
read -r -a NBDKIT_OPTS <<<"${NBDKIT_FILE_OPTS:-}"
read -r -a QEMU_NBD_OPTS <<<"${QEMU_NBD_EXTRA:-}"

declare -A WORKLOAD_SPEC=(
    [write-1m-qd16]="write 1m 16 bw"
    [randwrite-4k-qd32]="randwrite 4k 32 iops"
    [write-4k-qd1]="write 4k 1 lat"
)

# ---------------------------------------------------------------- checks

IFS=, read -r -a SERVERS <<<"$servers"
IFS=, read -r -a WORKLOADS <<<"$workloads"
for v in rounds runtime size_mib poll_ms; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v//_/-} must be a positive integer"
done
for v in copy_rounds ramp quiet_wait; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "--${v//_/-} must be a non-negative integer"
done
if ! [[ $nice =~ ^-?[0-9]+$ ]] || ((nice < -20 || nice > 19)); then
    die "--nice must be in -20..19"
fi
nice_adj=$((nice - $(nice)))
[[ $(nice -n "$nice_adj" nice 2>/dev/null) == "$nice" ]] ||
    die "cannot run at niceness $nice (not root?); use --nice $(nice)"
export REPL_PY_NICE=$nice
for w in "${WORKLOADS[@]}"; do
    [[ -n ${WORKLOAD_SPEC[$w]:-} ]] || die "unknown workload: $w"
done
for tool in fio taskset awk dd cmp; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
[[ -x /usr/bin/python3 ]] || die "/usr/bin/python3 not found"
need_md=0 need_qemu=$((copy_rounds > 0))
for s in "${SERVERS[@]}"; do
    case $s in
        replicated | serve) need_md=1 ;;
        nbdkit) command -v nbdkit >/dev/null || die "nbdkit not found (apt-get install -y nbdkit)" ;;
        qemu-nbd) need_qemu=1 ;;
        *) die "unknown server: $s (replicated, serve, qemu-nbd, nbdkit)" ;;
    esac
done
((copy_rounds > 0)) && need_md=1
if ((need_md)); then
    [[ -x $MIRRORDISK && -x $MIRRORCTL ]] ||
        die "mirrordisk/mirrorctl not found at $MIRRORDISK, $MIRRORCTL (cargo build --release)"
fi
if ((need_qemu)); then
    command -v qemu-nbd >/dev/null || die "qemu-nbd not found (apt-get install -y qemu-utils)"
fi
if ((copy_rounds > 0)); then
    command -v nbdcopy >/dev/null || die "nbdcopy not found (apt-get install -y libnbd-bin)"
fi
[[ $(stat -f -c %T "$tmpfs_dir") == tmpfs ]] || die "$tmpfs_dir is not tmpfs"
online=$(nproc --all)
((server_cpu < online && fio_cpu < online && server_cpu != fio_cpu)) ||
    die "need two distinct online CPUs (server $server_cpu, fio $fio_cpu, $online online)"

results=${results:-$REPO_ROOT/bench/results/$(date +%Y%m%d-%H%M%S)-replication}
mkdir -p "$results/json" "$results/logs"
# Run copies: a `cargo build` during the benchmark must not mix two builds.
MIRRORDISK_SOURCE=$MIRRORDISK
if ((need_md)); then
    cp -p -- "$MIRRORDISK" "$results/mirrordisk"
    cp -p -- "$MIRRORCTL" "$results/mirrorctl"
    MIRRORDISK=$results/mirrordisk
    MIRRORCTL=$results/mirrorctl
fi
CSV=$results/runs.csv
COPY_CSV=$results/copy.csv
WORK=$(mktemp -d "$tmpfs_dir/mirrordisk-repl-bench.XXXXXX")

# ---------------------------------------------------------------- cleanup

SERVER_PIDS=()
ALPHA_PID="" BETA_PID=""
cleanup() {
    local rc=$? p
    for p in "${SERVER_PIDS[@]}"; do bench_stop_pid "$p"; done
    [[ -n $ALPHA_PID ]] && bench_stop_pid "$ALPHA_PID"
    [[ -n $BETA_PID ]] && bench_stop_pid "$BETA_PID"
    [[ -n ${WORK:-} ]] && rm -rf -- "$WORK"
    [[ -n ${results:-} ]] && rm -f -- "$results/mirrordisk" "$results/mirrorctl"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- ports and the pair

# bench/lib.sh's repl_take_port, repl_start_pair and repl_stop_pair use these.
REPL_WORK=$WORK REPL_NICE_ADJ=$nice_adj REPL_SERVER_CPU=$server_cpu REPL_NEXT_PORT=$port_base
take_port() { repl_take_port; }

# ---------------------------------------------------------------- single-file servers

server_command() { # NAME FILE PORT
    local name=$1 file=$2 port=$3
    case $name in
        serve) printf '%s\n' "$MIRRORDISK" serve "$file" --listen "127.0.0.1:$port" ;;
        nbdkit) printf '%s\n' nbdkit -f -i 127.0.0.1 -p "$port" file "$file" "${NBDKIT_OPTS[@]}" ;;
        qemu-nbd) printf '%s\n' qemu-nbd -f raw --cache=none --aio=io_uring \
            --discard=ignore --detect-zeroes=off -b 127.0.0.1 -p "$port" -e 16 -t \
            "${QEMU_NBD_OPTS[@]}" "$file" ;;
    esac
}

# qemu-nbd on a data partition (OFFSET, SIZE) of FILE, the same flags otherwise.
qemu_part_command() { # FILE PORT OFFSET SIZE
    printf '%s\n' qemu-nbd --cache=none --aio=io_uring --discard=ignore --detect-zeroes=off \
        -b 127.0.0.1 -p "$2" -e 16 -t "${QEMU_NBD_OPTS[@]}" --image-opts \
        "driver=raw,offset=$3,size=$4,file.driver=file,file.filename=$1"
}

start_cmd() { # LOG CMD... -> appends the pid to SERVER_PIDS; waits for PORT to listen
    local log=$1 pid
    shift
    printf '$ nice -n %s taskset -c %s %s\n' "$nice_adj" "$server_cpu" "$*" >>"$log"
    nice -n "$nice_adj" taskset -c "$server_cpu" "$@" </dev/null >>"$log" 2>&1 &
    pid=$!
    SERVER_PIDS+=("$pid")
    if ! bench_wait_listening "$pid" "$PORT" 20; then
        bench_log "  $(basename "$1") did not listen on 127.0.0.1:$PORT within 20 s; log: $log"
        tail -n 20 "$log" >&2 || true
        return 1
    fi
}

stop_servers() {
    local p
    for p in "${SERVER_PIDS[@]}"; do bench_stop_pid "$p"; done
    SERVER_PIDS=()
}

# ---------------------------------------------------------------- one fio run

FAILED_RUNS=0
run_one() { # ROUND WORKLOAD SERVER POSITION
    local round=$1 workload=$2 server=$3 position=$4 rw bs qd kind tag prefix cmd pids=()
    read -r rw bs qd kind <<<"${WORKLOAD_SPEC[$workload]}"
    tag="r$round-$workload-$server"
    prefix=$results/logs/$tag
    ((quiet_wait > 0)) && bench_py quiet --cpus "$server_cpu,$fio_cpu" --timeout "$quiet_wait"
    local uri
    if [[ $server == replicated ]]; then
        if ! repl_start_pair "$prefix" activate; then
            FAILED_RUNS=$((FAILED_RUNS + 1))
            echo "$round,$workload,$server,$position,$kind,$rw,$bs,$qd,start-failed" >>"$results/failed.csv"
            repl_stop_pair "$prefix" || true
            return 0
        fi
        pids=(--pid "$ALPHA_PID" --pid "$BETA_PID")
        uri="nbd://127.0.0.1:$NBD_PORT/db"
    else
        take_port
        mapfile -t cmd < <(server_command "$server" "$WORK/single.img" "$PORT")
        if ! start_cmd "$prefix.server.log" "${cmd[@]}"; then
            FAILED_RUNS=$((FAILED_RUNS + 1))
            echo "$round,$workload,$server,$position,$kind,$rw,$bs,$qd,start-failed" >>"$results/failed.csv"
            stop_servers
            return 0
        fi
        pids=(--pid "${SERVER_PIDS[0]}")
        uri="nbd://127.0.0.1:$PORT/"
    fi
    if ! repl_py run "${pids[@]}" --fio-cpu "$fio_cpu" --server-cpu "$server_cpu" \
        --timeout $((runtime + ramp + 60)) \
        --json "$results/json/$tag.json" --log "$prefix.fio.log" --csv "$CSV" \
        --meta "round=$round" --meta "workload=$workload" --meta "server=$server" \
        --meta "position=$position" --meta "kind=$kind" --meta "rw=$rw" --meta "bs=$bs" \
        --meta "iodepth=$qd" --meta "port=${uri#nbd://127.0.0.1:}" \
        -- fio --name="$workload" --ioengine=nbd --uri="$uri" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --time_based --runtime="$runtime" \
        --ramp_time="$ramp" --norandommap --randrepeat=1 --cpus_allowed="$fio_cpu" \
        --output-format=json --output="$results/json/$tag.json"; then
        FAILED_RUNS=$((FAILED_RUNS + 1))
    fi
    if [[ $server == replicated ]]; then
        repl_stop_pair "$prefix" || FAILED_RUNS=$((FAILED_RUNS + 1))
    else
        stop_servers
    fi
    sleep 0.3
}

rotated() { # OFFSET
    local n=${#SERVERS[@]} i
    for ((i = 0; i < n; i++)); do printf '%s\n' "${SERVERS[(($1 + i) % n)]}"; done
}

# ---------------------------------------------------------------- full copies

copy_mirror() { # ROUND POSITION
    local round=$1 position=$2 prefix=$results/logs/r$1-copy-mirror
    ((quiet_wait > 0)) && bench_py quiet --cpus "$server_cpu,$fio_cpu" --timeout "$quiet_wait"
    # The first full copy after `mirrorctl create` (its documented use): fresh metadata
    # on both disks, the data partitions untouched; both agents wait for the operator.
    if ! repl_new_metadata "$MIRRORCTL" "$WORK" "$size_mib" 2>>"$prefix.alpha.log" ||
        ! repl_start_pair "$prefix" new; then
        FAILED_RUNS=$((FAILED_RUNS + 1))
        repl_stop_pair "$prefix" || true
        return 0
    fi
    repl_py full-copy --source "$WORK/alpha.sock" --target "$WORK/beta.sock" --mirror db --from alpha \
        --bytes "$DATA_BYTES" --pid "$ALPHA_PID" --pid "$BETA_PID" --server-cpu "$server_cpu" --client-cpu "$fio_cpu" \
        --interval "$(awk -v ms="$poll_ms" 'BEGIN { print ms / 1000 }')" --timeout 600 --csv "$COPY_CSV" \
        --meta "round=$round" --meta "method=mirror" --meta "position=$position" ||
        FAILED_RUNS=$((FAILED_RUNS + 1))
    repl_stop_pair "$prefix" || FAILED_RUNS=$((FAILED_RUNS + 1))
    sleep 0.3
}

copy_nbdcopy() { # ROUND POSITION
    local round=$1 position=$2 prefix=$results/logs/r$1-copy-nbdcopy cmd p_src p_dst
    ((quiet_wait > 0)) && bench_py quiet --cpus "$server_cpu,$fio_cpu" --timeout "$quiet_wait"
    take_port; p_src=$PORT
    mapfile -t cmd < <(qemu_part_command "$WORK/alpha.img" "$p_src" "$DATA_OFFSET" "$DATA_BYTES")
    if start_cmd "$prefix.src.log" "${cmd[@]}"; then
        take_port; p_dst=$PORT
        mapfile -t cmd < <(qemu_part_command "$WORK/beta.img" "$p_dst" "$DATA_OFFSET" "$DATA_BYTES")
        if start_cmd "$prefix.dst.log" "${cmd[@]}"; then
            echo "\$ nice -n $nice_adj taskset -c $fio_cpu nbdcopy --flush nbd://127.0.0.1:$p_src/ nbd://127.0.0.1:$p_dst/" >>"$prefix.log"
            repl_py copy-run --pid "${SERVER_PIDS[0]}" --pid "${SERVER_PIDS[1]}" --bytes "$DATA_BYTES" \
                --server-cpu "$server_cpu" --client-cpu "$fio_cpu" --timeout 600 \
                --log "$prefix.log" --csv "$COPY_CSV" \
                --meta "round=$round" --meta "method=nbdcopy" --meta "position=$position" \
                -- nbdcopy --flush "nbd://127.0.0.1:$p_src/" "nbd://127.0.0.1:$p_dst/" ||
                FAILED_RUNS=$((FAILED_RUNS + 1))
        else
            FAILED_RUNS=$((FAILED_RUNS + 1))
        fi
    else
        FAILED_RUNS=$((FAILED_RUNS + 1))
    fi
    stop_servers
    sleep 0.3
}

# ---------------------------------------------------------------- header

version_of() {
    case $1 in
        replicated | serve) printf '%s, built %s, sha256 %.12s, tree at git %s%s, run as a copy' \
            "$MIRRORDISK_SOURCE" "$(date -u -r "$MIRRORDISK" +%Y-%m-%dT%H:%M:%SZ)" \
            "$(sha256sum <"$MIRRORDISK")" \
            "$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" \
            "$(git -C "$REPO_ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' + local changes')" ;;
        nbdkit) nbdkit --version | head -n 1 ;;
        qemu-nbd) qemu-nbd --version | head -n 1 ;;
    esac
}
started=$SECONDS
{
    echo "## Replication benchmark"
    echo
    echo '```'
    echo "$COMMAND_LINE"
    echo '```'
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); host: $(uname -n); kernel $(uname -r);" \
        "$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), $online CPUs;" \
        "load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- $(fio --version); every server (both agents of the replicated pair included) confined to CPU" \
        "$server_cpu (taskset), fio, nbdcopy and the status poller on CPU $fio_cpu, all at niceness $nice"
    echo "- rounds $rounds (servers rotate within each round), runtime ${runtime} s after ramp ${ramp} s;" \
        "full-copy rounds $copy_rounds; every disk and file ${size_mib} MiB of random data on tmpfs ($tmpfs_dir)"
    for s in "${SERVERS[@]}"; do
        case $s in
            replicated) echo "- replicated: $(version_of replicated): two agents," \
                "\`nice -n $nice taskset -c $server_cpu mirrordisk agent --config CLUSTER.toml --node alpha|beta\`" \
                "(config: bench/lib.sh repl_write_config; one replication path, no resync_rate), disks" \
                "created with \`mirrorctl create … --data-size ${size_mib}M --blank\`, alpha activated," \
                "fio on \`nbd://127.0.0.1:PORT/db\`; CPU = both agents" ;;
            *)
                mapfile -t cmd < <(server_command "$s" FILE PORT)
                echo "- $s: $(version_of "$s"): \`nice -n $nice taskset -c $server_cpu ${cmd[*]}\`" ;;
        esac
    done
    echo "- fio: \`fio --ioengine=nbd --uri=URI --rw=RW --bs=BS --iodepth=QD --time_based" \
        "--runtime=$runtime --ramp_time=$ramp --norandommap --randrepeat=1 --cpus_allowed=$fio_cpu\`"
    if ((copy_rounds > 0)); then
        mapfile -t cmd < <(qemu_part_command FILE PORT OFFSET SIZE)
        echo "- full copy: mirror = \`mirrorctl rebuild db --full --from alpha\` (admin request rebuild-full)" \
            "on a new pair (\`mirrorctl create --force\` on both disks again, not --blank: both wait for" \
            "this first full copy; the data partitions are kept), timed from the request to the first answer of beta's status (polled" \
            "every $poll_ms ms) showing beta UpToDate, connected, no resync (then, untimed, alpha must agree:" \
            "in sync, nothing dirty); rate = data size / that time; nbdcopy = $(nbdcopy --version | head -n 1):" \
            "\`nbdcopy --flush nbd://SRC nbd://DST\` between \`${cmd[*]}\` on alpha's and on beta's disk (each" \
            "confined to CPU $server_cpu), timed from start to exit"
    fi
    echo "- raw results: $results/"
    echo
} | tee "$results/header.md"

# ---------------------------------------------------------------- files

bench_log "writing ${size_mib} MiB of random data to $WORK/single.img"
head -c "${size_mib}M" /dev/urandom >"$WORK/single.img"
head -c 32 /dev/urandom | base64 >"$WORK/secret"
chmod 600 "$WORK/secret"
DATA_BYTES=$((size_mib * 1048576))
DATA_OFFSET=0
if ((need_md)); then
    DATA_OFFSET=$(repl_data_offset "$MIRRORCTL" "$WORK" "$size_mib")
    bench_log "creating the mirror pair (data partition at offset $DATA_OFFSET, the same random data)"
    repl_make_disks "$MIRRORCTL" "$WORK" "$size_mib" "$WORK/single.img" "$DATA_OFFSET"
fi

# ---------------------------------------------------------------- main

for ((r = 1; r <= rounds; r++)); do
    for wi in "${!WORKLOADS[@]}"; do
        w=${WORKLOADS[$wi]}
        bench_log "[round $r/$rounds] $w"
        pos=0
        while read -r s; do
            pos=$((pos + 1))
            run_one "$r" "$w" "$s" "$pos"
        done < <(rotated $((r - 1 + wi)))
    done
done
for ((r = 1; r <= copy_rounds; r++)); do
    bench_log "[full copy $r/$copy_rounds]"
    if ((r % 2)); then
        copy_mirror "$r" 1
        copy_nbdcopy "$r" 2
    else
        copy_nbdcopy "$r" 1
        copy_mirror "$r" 2
    fi
done

# Sanity: after every replicated write and every copy, both data partitions are equal.
identical=""
if ((need_md)); then
    if repl_data_identical "$WORK" "$DATA_OFFSET" "$DATA_BYTES"; then
        identical="yes"
    else
        identical="NO"
        FAILED_RUNS=$((FAILED_RUNS + 1))
    fi
fi

elapsed=$((SECONDS - started))
{
    if [[ -s $CSV || -s $COPY_CSV ]]; then
        repl_py summary-repl --csv "$CSV" --copy-csv "$COPY_CSV" --servers "$servers" --workloads "$workloads"
    else
        echo "No run completed."
    fi
    [[ -s $results/failed.csv ]] && echo "WARNING: server start failures: $(tr '\n' ';' <"$results/failed.csv")"
    [[ -n $identical ]] && echo "Data partitions of alpha and beta identical at the end: $identical"
    echo
    echo "Wall time: $((elapsed / 60)) min $((elapsed % 60)) s; $FAILED_RUNS failed step(s);" \
        "load average at the end $(cut -d' ' -f1-3 /proc/loadavg)."
} | tee "$results/summary.body.md"
cat "$results/header.md" "$results/summary.body.md" >"$results/summary.md"
rm -f "$results/header.md" "$results/summary.body.md"
bench_log "summary: $results/summary.md"
((FAILED_RUNS == 0))
