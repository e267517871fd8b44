#!/usr/bin/env bash
# bench/journal-bench.sh: what tracking differences costs. Random 4 KiB writes at QD32
# over a 64 GiB sparse file on tmpfs — far beyond the activity log's 4 GiB coverage, so
# nearly every write touches a cold extent — against `mirrordisk serve` in three modes,
# interleaved over ROUNDS rounds, each on a fresh file:
#   plain    the file served bare (no CLUSTER partition)
#   al       `mirrorctl create` + serve: activity log only (as when connected)
#   journal  `mirrorctl create` + serve --broken: every write sets its journal bits
#            durably before it is acknowledged (as during a mirror break)
# The server is confined to CPU 0, fio to CPU 1. Reports the median IOPS of each mode,
# the ratios to plain (target: journal >= 0.8x), and activity-log transactions and
# journal commits per second from the engine statistics `serve` logs at shutdown.
#
#   bench/journal-bench.sh [--rounds N] [--runtime S] [--size SIZE]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=3 RUNTIME=10 SIZE=64G
while [ $# -gt 0 ]; do
	case "$1" in
	--rounds) ROUNDS=$2; shift 2 ;;
	--runtime) RUNTIME=$2; shift 2 ;;
	--size) SIZE=$2; shift 2 ;;
	*) echo "usage: $0 [--rounds N] [--runtime S] [--size SIZE]" >&2; exit 2 ;;
	esac
done
MD=${MIRRORDISK:-target/release/mirrordisk}
CTL=${MIRRORCTL:-target/release/mirrorctl}
[ -x "$MD" ] && [ -x "$CTL" ] || cargo build --release --bins --quiet
DIR=$(mktemp -d /dev/shm/mirrordisk-journal-bench.XXXXXX)
SERVER=""
cleanup() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
echo "# command: $0 --rounds $ROUNDS --runtime $RUNTIME --size $SIZE"
echo "# $(date -u +%FT%TZ) $(uname -r), $(nproc) CPUs"
printf '%-8s %-6s %10s %12s %14s\n' mode round iops al_tx_per_s journal_commits_per_s
declare -A RESULTS
for round in $(seq 1 "$ROUNDS"); do
	for mode in plain al journal; do
		rm -f "$DIR/disk.img"
		truncate -s "$SIZE" "$DIR/disk.img"
		args=()
		case $mode in
		al) "$CTL" create "$DIR/disk.img" --mirror bench --node 1 --peer 2 >/dev/null ;;
		journal) "$CTL" create "$DIR/disk.img" --mirror bench --node 1 --peer 2 >/dev/null; args=(--broken) ;;
		esac
		port=$((20000 + RANDOM % 20000))
		taskset -c 0 "$MD" serve "$DIR/disk.img" --listen "127.0.0.1:$port" "${args[@]}" 2>"$DIR/server.log" &
		SERVER=$!
		for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
		iops=$(fio --name=j --ioengine=nbd --uri="nbd://127.0.0.1:$port/" --rw=randwrite --bs=4k \
			--iodepth=32 --time_based --runtime="$RUNTIME" --ramp_time=1 --norandommap \
			--randrepeat=0 --cpus_allowed=1 --output-format=json 2>/dev/null |
			sed -n '/^{/,$p' | /usr/bin/python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))')
		kill "$SERVER"
		wait "$SERVER" || true
		SERVER=""
		read -r al commits < <(/usr/bin/python3 - "$DIR/server.log" "$RUNTIME" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read()
m = re.search(r'stats=(\{.*\}) ', text) or re.search(r'stats=(\{.*\})', text)
if not m:
    print("- -")
else:
    meta = json.loads(m.group(1))["meta"]
    secs = float(sys.argv[2]) + 1
    print(round(meta["al_transactions"] / secs), round(meta["journal"]["commits"] / secs))
PY
)
		printf '%-8s %-6s %10s %12s %14s\n' "$mode" "$round" "$iops" "$al" "$commits"
		RESULTS[$mode]+="$iops "
	done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
plain=$(echo "${RESULTS[plain]}" | median)
al=$(echo "${RESULTS[al]}" | median)
journal=$(echo "${RESULTS[journal]}" | median)
echo
echo "| mode | median IOPS | ratio to plain |"
echo "|---|---|---|"
for m in plain al journal; do
	v=$(echo "${RESULTS[$m]}" | median)
	printf '| %s | %s | %s |\n' "$m" "$v" "$(awk -v a="$v" -v b="$plain" 'BEGIN{printf "%.2fx", a/b}')"
done
awk -v j="$journal" -v p="$plain" 'BEGIN{ if (j >= 0.8 * p) print "journal >= 0.8x plain: PASS"; else print "journal >= 0.8x plain: FAIL" }'
