# shellcheck shell=bash
# Helpers for bench/nbd-bench.sh: logging, TCP port checks through /proc (no probe
# connections: a probe would count as a client and could end a server that exits on
# its last disconnect), process control, and the Python part (one fio run with server
# CPU sampling, and the summary). Sourced, never executed.

bench_log() { printf '%s\n' "$*" >&2; }
bench_die() { printf 'nbd-bench: %s\n' "$*" >&2; exit 2; }

# Prints the TCP states (hex, as in /proc/net/tcp) of every IPv4/IPv6 socket whose
# local port is $1, one a line; nothing when the port is unused.
bench_port_states() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v hex="$hex" 'FNR > 1 { split($2, a, ":"); if (a[length(a)] == hex) print $4 }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

bench_port_free() { [[ -z "$(bench_port_states "$1")" ]]; }
bench_port_listening() { bench_port_states "$1" | grep -qx '0A'; }

# bench_wait_listening PID PORT TIMEOUT_S: waits until PORT is in LISTEN state while
# PID is alive. Returns 1 if PID exits or the timeout passes first.
bench_wait_listening() {
    local pid=$1 port=$2 deadline=$((SECONDS + $3))
    while ((SECONDS < deadline)); do
        kill -0 "$pid" 2>/dev/null || return 1
        bench_port_listening "$port" && return 0
        sleep 0.05
    done
    return 1
}

# bench_stop_pid PID: SIGTERM, up to 5 s grace, then SIGKILL; reaps it.
bench_stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}

# bench_py run|summary ARGS...: the Python half. Kept here so the benchmark stays
# two shell files; /usr/bin/python3 (stdlib only) so a pyenv shim cannot change it.
bench_py() {
    /usr/bin/python3 - "$@" <<'PY'
import argparse, csv, json, math, os, statistics, subprocess, sys, time

HZ = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL_S = 0.02

# ---------------------------------------------------------------- /proc readers

def stat_fields(path):
    with open(path) as f:
        s = f.read()
    # Field 2 (comm) may contain spaces; everything after the last ')' is field 3 on.
    return s[s.rindex(")") + 2:].split()

def cpu_ticks(pid):
    """utime + stime of the whole thread group, in clock ticks, and the state letter.
    /proc/PID/stat sums every live thread (io_uring io-wq and sqpoll workers are
    threads of the process) plus the threads that already exited."""
    f = stat_fields(f"/proc/{pid}/stat")
    return int(f[11]) + int(f[12]), f[0]

def status_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    return out

def thread_cpus(pid, allowed, seen):
    """Adds each thread's allowed CPU list and the CPU it last ran on."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list:"):
                        allowed.add(line.split(":", 1)[1].strip())
            seen.add(stat_fields(f"/proc/{pid}/task/{tid}/stat")[36])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass

def cpu_jiffies(cpus):
    """{cpu: (busy, softirq)} from /proc/stat, busy = user+nice+system+irq+softirq."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *v = line.split()
            if name[3:] and int(name[3:]) in cpus:
                v = [int(x) for x in v]
                out[int(name[3:])] = (v[0] + v[1] + v[2] + v[5] + v[6], v[6])
    return out

def tcp_counters():
    """System-wide TCP retransmitted segments and retransmission timeouts: on loopback
    these come from receive-queue pruning when a receiver is starved, and explain
    multi-second stalls (the RTO backs off from 200 ms)."""
    out = {}
    for path, keys in (("/proc/net/snmp", ("RetransSegs",)), ("/proc/net/netstat", ("TCPTimeouts",))):
        with open(path) as f:
            lines = f.read().splitlines()
        for head, vals in zip(lines[::2], lines[1::2]):
            names, values = head.split()[1:], vals.split()[1:]
            for k, v in zip(names, values):
                if k in keys:
                    out[k] = int(v)
    return out

def cmd_quiet(argv):
    """Waits until the benchmark CPUs are idle (other people's builds finished), at
    most --timeout seconds; then goes on anyway, saying so."""
    ap = argparse.ArgumentParser(prog="bench_py quiet")
    ap.add_argument("--cpus", required=True)
    ap.add_argument("--busy-pct-max", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, required=True)
    a = ap.parse_args(argv)
    cpus = {int(c) for c in a.cpus.split(",")}
    start = time.time()
    said = False
    while True:
        j0, t0 = cpu_jiffies(cpus), time.time()
        time.sleep(0.5)
        j1, t1 = cpu_jiffies(cpus), time.time()
        busy = {c: 100 * (j1[c][0] - j0[c][0]) / HZ / (t1 - t0) for c in cpus}
        if all(b <= a.busy_pct_max for b in busy.values()):
            if said:
                print("    quiet after %.0f s" % (t1 - start), file=sys.stderr)
            return 0
        if t1 - start >= a.timeout:
            print("    CPUs still busy after %.0f s (%s); running anyway" % (
                t1 - start, ", ".join("cpu%d %.0f%%" % kv for kv in sorted(busy.items()))),
                file=sys.stderr)
            return 0
        if not said:
            print("    waiting for other load to end (%s)" % ", ".join(
                "cpu%d %.0f%%" % kv for kv in sorted(busy.items())), file=sys.stderr)
            said = True

def interp(samples, t):
    """CPU ticks at time t, linear between the two samples around it (clamped)."""
    if t <= samples[0][0]:
        return samples[0][1]
    for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
        if t0 <= t <= t1:
            return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)
    return samples[-1][1]

# ---------------------------------------------------------------- one fio run

CSV_FIELDS = [
    "backing", "round", "workload", "server", "position", "kind", "rw", "bs", "iodepth",
    "status", "runtime_s", "ios", "iops", "bw_MBps", "clat_p50_us", "clat_p99_us",
    "clat_mean_us", "server_cpu_s", "server_cpu_us_per_io", "server_cpu_util_pct",
    "server_cpu_total_s", "fio_cpu_pct", "foreign_server_cpu_pct", "foreign_fio_cpu_pct",
    "softirq_server_cpu_pct", "tcp_retrans_segs", "tcp_timeouts", "rss_idle_kib", "rss_peak_kib", "threads",
    "cpus_allowed", "cpus_seen", "port", "json",
]

def cmd_run(argv):
    ap = argparse.ArgumentParser(prog="bench_py run")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--fio-cpu", type=int, required=True)
    ap.add_argument("--server-cpu", type=int, required=True)
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--timeout", type=float, required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--meta", action="append", default=[], help="KEY=VALUE for the CSV row")
    ap.add_argument("fio", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    fio = a.fio[1:] if a.fio[:1] == ["--"] else a.fio
    row = dict(kv.split("=", 1) for kv in a.meta)
    row["json"] = os.path.basename(a.json)

    # The runner is client-side: it shares fio's CPU, never the server's.
    os.sched_setaffinity(0, {a.fio_cpu})
    pid = a.pid
    ticks_before, _ = cpu_ticks(pid)
    row["rss_idle_kib"] = status_kib(pid).get("VmRSS", "")
    allowed, seen = set(), set()
    thread_cpus(pid, allowed, seen)

    status = "ok"
    tcp_before = tcp_counters()
    with open(a.log, "ab") as log:
        p = subprocess.Popen(["nice", "-n", str(a.nice), "taskset", "-c", str(a.fio_cpu)] + fio,
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        t_launch = time.time()
        samples = [(t_launch, ticks_before)]
        cpus = {a.server_cpu, a.fio_cpu}
        jiffies = [(t_launch, cpu_jiffies(cpus))]
        last_affinity = t_launch
        while p.poll() is None:
            now = time.time()
            if now - jiffies[-1][0] >= 0.1:
                jiffies.append((now, cpu_jiffies(cpus)))
            try:
                ticks, state = cpu_ticks(pid)
            except (FileNotFoundError, ProcessLookupError):
                state = "gone"
            if state in ("Z", "X", "gone"):
                status = "server-died"
                p.kill()
                break
            samples.append((now, ticks))
            if now - last_affinity > 0.5:
                thread_cpus(pid, allowed, seen)
                last_affinity = now
            if now - t_launch > a.timeout:
                # fio's nbd engine can spin forever when the server misbehaves.
                status = "timeout"
                p.kill()
                break
            time.sleep(SAMPLE_INTERVAL_S)
        rc = p.wait()
    tcp_after = tcp_counters()
    row["tcp_retrans_segs"] = tcp_after["RetransSegs"] - tcp_before["RetransSegs"]
    row["tcp_timeouts"] = tcp_after["TCPTimeouts"] - tcp_before["TCPTimeouts"]
    try:
        ticks_after, _ = cpu_ticks(pid)
        samples.append((time.time(), ticks_after))
        jiffies.append((time.time(), cpu_jiffies(cpus)))
        st = status_kib(pid)
        thread_cpus(pid, allowed, seen)
        row["rss_peak_kib"] = st.get("VmHWM", "")
        row["threads"] = st.get("Threads", "")
        row["server_cpu_total_s"] = "%.3f" % ((ticks_after - ticks_before) / HZ)
    except (FileNotFoundError, ProcessLookupError):
        status = "server-died"
    row["cpus_allowed"] = "|".join(sorted(allowed))
    row["cpus_seen"] = "|".join(sorted(seen, key=int))

    if status == "ok":
        try:
            with open(a.json) as f:
                text = f.read()
            d = json.loads(text[text.index("{"):])
            job = d["jobs"][0]
            if rc != 0 or job["error"] != 0:
                status = "fio-error"
        except (OSError, ValueError, KeyError, IndexError):
            status = "fio-error"
    if status == "ok":
        side = "read" if "read" in row["rw"] else "write"
        x = job[side]
        clat = x["clat_ns"]
        runtime_s = job["job_runtime"] / 1000.0
        # fio writes "timestamp_ms" just after the last I/O (measured 10-25 ms later:
        # the disconnect); the measured window is the job_runtime before it. Ramp-up
        # I/Os are not in fio's counts, so they must not be in the CPU either.
        t_end = d["timestamp_ms"] / 1000.0
        cpu_s = (interp(samples, t_end) - interp(samples, t_end - runtime_s)) / HZ

        def cpu_pct(cpu, index):
            series = [(t, j[cpu][index]) for t, j in jiffies]
            used = interp(series, t_end) - interp(series, t_end - runtime_s)
            return 100 * used / HZ / runtime_s
        fio_pct = job["usr_cpu"] + job["sys_cpu"]
        # What else ran on the two CPUs during the window: other people's work, and
        # interrupts not taken in the context of the server or fio. Near 0 is clean.
        row["foreign_server_cpu_pct"] = "%.1f" % (cpu_pct(a.server_cpu, 0) - 100 * cpu_s / runtime_s)
        row["foreign_fio_cpu_pct"] = "%.1f" % (cpu_pct(a.fio_cpu, 0) - fio_pct)
        row["softirq_server_cpu_pct"] = "%.1f" % cpu_pct(a.server_cpu, 1)
        ios = x["total_ios"]
        row.update({
            "runtime_s": "%.3f" % runtime_s,
            "ios": ios,
            "iops": "%.1f" % x["iops"],
            "bw_MBps": "%.2f" % (x["bw_bytes"] / 1e6),
            "clat_p50_us": "%.2f" % (clat["percentile"]["50.000000"] / 1000),
            "clat_p99_us": "%.2f" % (clat["percentile"]["99.000000"] / 1000),
            "clat_mean_us": "%.2f" % (clat["mean"] / 1000),
            "server_cpu_s": "%.3f" % cpu_s,
            "server_cpu_us_per_io": "%.3f" % (cpu_s * 1e6 / ios) if ios else "",
            "server_cpu_util_pct": "%.1f" % (100 * cpu_s / runtime_s) if runtime_s else "",
            "fio_cpu_pct": "%.1f" % fio_pct,
        })
    row["status"] = status

    new = not os.path.exists(a.csv)
    with open(a.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)

    if status != "ok":
        print(f"    {row['server']}: {status} (see {a.log})", file=sys.stderr)
        return 1
    kind = row["kind"]
    main = {"iops": "%s IOPS" % fmt_iops(float(row["iops"])),
            "bw": "%s MB/s" % fmt_bw(float(row["bw_MBps"])),
            "lat": "p50 %s us" % fmt_lat(float(row["clat_p50_us"])),
            "mem": "%s IOPS, %s MB/s" % (fmt_iops(float(row["iops"])),
                                          fmt_bw(float(row["bw_MBps"])))}[kind]
    print("    %-10s %-22s cpu %7.2f us/io (%5.1f%%)  fio %5.1f%%  rss %5s MiB  other load %s%%/%s%%%s" % (
        row["server"], main, float(row["server_cpu_us_per_io"]),
        float(row["server_cpu_util_pct"]), float(row["fio_cpu_pct"]),
        fmt_mib(row["rss_peak_kib"]), row["foreign_server_cpu_pct"],
        row["foreign_fio_cpu_pct"],
        "  tcp retransmits %d (timeouts %d)" % (row["tcp_retrans_segs"], row["tcp_timeouts"])
        if row["tcp_retrans_segs"] else ""), file=sys.stderr)
    return 0

# ---------------------------------------------------------------- summary

LABELS = {
    "randwrite-4k-qd32": "4K randwrite QD32",
    "randread-4k-qd32": "4K randread QD32",
    "write-1m-qd16": "1 MiB seq write QD16",
    "read-1m-qd16": "1 MiB seq read QD16",
    "write-4k-qd1": "4K write QD1 latency",
    "randwrite-4k-qd128": "4K randwrite QD128",
    "write-4m-qd32": "4 MiB seq write QD32",
}
UNITS = {"iops": "IOPS", "bw": "MB/s", "lat": "p50 µs"}
SUBJECT, REFERENCE, OTHER = "mirrordisk", "nbdkit", "qemu-nbd"
PERF_RATIO_MIN = 0.95      # each workload, subject vs nbdkit
GEOMEAN_RATIO_MIN = 1.00   # geometric mean of the five ratios vs nbdkit
RSS_QD128_MIB_MAX = 64     # absolute peak RSS, 4K randwrite QD128
BUFFER_POOL_MIB_MAX = 64   # BUFFER_POOL_BYTES_MAX: peak minus idle RSS, large writes
# RSS also grows by what is not buffer memory: code and data first touched during I/O,
# the per-connection socket read buffer (256 KiB), io_uring rings. A server that fills
# its pool exactly must not fail for those.
NON_POOL_GROWTH_MIB_MAX = 8
FOREIGN_PCT_WARN = 10      # other load on a benchmark CPU worth a warning

def fmt_iops(v):
    return "%.1fk" % (v / 1000) if v >= 1000 else "%.0f" % v

def fmt_bw(v):
    return "%.0f" % v

def fmt_lat(v):
    return "%.1f" % v

def fmt_mib(kib):
    return "%.1f" % (int(kib) / 1024) if str(kib).strip() else "?"

def metric(row, kind):
    return float({"iops": row["iops"], "bw": row["bw_MBps"], "lat": row["clat_p50_us"]}[kind])

def ratio(kind, ours, theirs):
    """Higher is better for every ratio printed: latency is inverted."""
    if not ours or not theirs:
        return None
    return theirs / ours if kind == "lat" else ours / theirs

def spread(values):
    m = statistics.median(values)
    return 100 * (max(values) - min(values)) / 2 / m if m and len(values) > 1 else 0.0

def cell(kind, values):
    if not values:
        return "–"
    m = statistics.median(values)
    text = {"iops": fmt_iops, "bw": fmt_bw, "lat": fmt_lat}[kind](m)
    return text + (" ±%.0f%%" % spread(values) if len(values) > 1 else "")

def fmt_ratio(r):
    return "%.2f" % r if r is not None else "–"

def cmd_summary(argv):
    ap = argparse.ArgumentParser(prog="bench_py summary")
    ap.add_argument("--csv", required=True)
    ap.add_argument("--servers", required=True)
    ap.add_argument("--backings", required=True)
    ap.add_argument("--workloads", required=True)
    ap.add_argument("--mem-workloads", default="")
    a = ap.parse_args(argv)
    servers = a.servers.split(",")
    backings = a.backings.split(",")
    with open(a.csv) as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]

    def runs(backing, workload, server):
        return [r for r in ok if (r["backing"], r["workload"], r["server"]) == (backing, workload, server)]

    others = [s for s in servers if s != REFERENCE]
    ratio_cols = [(s, REFERENCE) for s in others if REFERENCE in servers]
    if SUBJECT in servers and OTHER in servers:
        ratio_cols.append((SUBJECT, OTHER))
    judged = SUBJECT in servers and REFERENCE in servers
    out = []
    verdicts = []

    for backing in backings:
        judge = judged and backing == "tmpfs"
        workloads = [w for w in a.workloads.split(",") if any(runs(backing, w, s) for s in servers)]
        if not workloads:
            continue
        kinds = {w: runs(backing, w, s)[0]["kind"] for w in workloads for s in servers if runs(backing, w, s)}
        n_rounds = max(len(runs(backing, w, s)) for w in workloads for s in servers)
        out.append(f"### {backing}: median of {n_rounds} round(s), ± is half the min–max spread\n")
        head = ["workload", "unit"] + servers + ["%s/%s" % rc for rc in ratio_cols]
        if judge:
            head.append("≥ %.2f× %s" % (PERF_RATIO_MIN, REFERENCE))
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        logs = {rc: [] for rc in ratio_cols}
        for w in workloads:
            kind = kinds[w]
            med = {}
            line = [LABELS.get(w, w), UNITS[kind]]
            for s in servers:
                vals = [metric(r, kind) for r in runs(backing, w, s)]
                med[s] = statistics.median(vals) if vals else None
                line.append(cell(kind, vals))
            for rc in ratio_cols:
                r = ratio(kind, med[rc[0]], med[rc[1]])
                logs[rc].append(r)
                line.append(fmt_ratio(r))
            if judge:
                r = ratio(kind, med[SUBJECT], med[REFERENCE])
                passed = r is not None and r >= PERF_RATIO_MIN
                line.append("PASS" if passed else "FAIL")
                verdicts.append((f"{backing} {LABELS.get(w, w)} ≥ {PERF_RATIO_MIN}× nbdkit", passed))
            out.append("| " + " | ".join(line) + " |")
        line = ["geometric mean of ratios", ""] + [""] * len(servers)
        geo = {}
        for rc in ratio_cols:
            vals = logs[rc]
            geo[rc] = (math.exp(sum(math.log(v) for v in vals) / len(vals))
                       if vals and all(vals) else None)
            line.append(fmt_ratio(geo[rc]))
        if judge:
            g = geo[(SUBJECT, REFERENCE)]
            passed = g is not None and g >= GEOMEAN_RATIO_MIN and len(logs[(SUBJECT, REFERENCE)]) == 5
            line.append(("PASS" if passed else "FAIL") + " (≥ %.2f)" % GEOMEAN_RATIO_MIN)
            verdicts.append((f"{backing} geometric mean ≥ {GEOMEAN_RATIO_MIN}× nbdkit (5 workloads)", passed))
        out.append("| " + " | ".join(line) + " |")
        if not judge and judged:
            out.append("\n(Targets are judged on tmpfs only; the disk rows are for information:"
                       " nbdkit's default file plugin goes through the page cache, O_DIRECT servers do not.)")
        out.append("")

        # CPU per I/O
        out.append(f"### {backing}: server CPU per I/O (µs, median), in brackets server / fio CPU utilisation\n")
        head = ["workload"] + servers
        cpu_cols = [rc for rc in ratio_cols]
        head += ["%s/%s" % rc for rc in cpu_cols]
        if judge:
            head.append("≤ %s" % REFERENCE)
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for w in workloads:
            med = {}
            line = [LABELS.get(w, w)]
            for s in servers:
                rs = runs(backing, w, s)
                if not rs:
                    med[s] = None
                    line.append("–")
                    continue
                med[s] = statistics.median(float(r["server_cpu_us_per_io"]) for r in rs)
                su = statistics.median(float(r["server_cpu_util_pct"]) for r in rs)
                fu = statistics.median(float(r["fio_cpu_pct"]) for r in rs)
                line.append("%.2f (%.0f%% / %.0f%%)" % (med[s], su, fu))
            for rc in cpu_cols:
                line.append("%.2f" % (med[rc[0]] / med[rc[1]]) if med[rc[0]] and med[rc[1]] else "–")
            if judge:
                passed = med[SUBJECT] is not None and med[REFERENCE] is not None and med[SUBJECT] <= med[REFERENCE]
                line.append("PASS" if passed else "FAIL")
                verdicts.append((f"{backing} {LABELS.get(w, w)} CPU/IO ≤ nbdkit", passed))
            out.append("| " + " | ".join(line) + " |")
        out.append("\n(Lower is better; the ratio column is CPU per I/O of the first server over the second.)\n")

        # Memory
        mem_workloads = [w for w in ["randwrite-4k-qd128", "write-1m-qd16", "write-4m-qd32"]
                         if any(runs(backing, w, s) for s in servers)]
        if mem_workloads:
            out.append(f"### {backing}: peak RSS (VmHWM, MiB, highest over runs; idle RSS before fio in brackets)\n")
            head = ["workload"] + servers + (["%s target" % SUBJECT] if SUBJECT in servers else [])
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            for w in mem_workloads:
                line = [LABELS.get(w, w)]
                peak_subject = idle_subject = None
                for s in servers:
                    rs = runs(backing, w, s)
                    if not rs:
                        line.append("–")
                        continue
                    peak = max(int(r["rss_peak_kib"]) for r in rs) / 1024
                    idle = max(int(r["rss_idle_kib"]) for r in rs) / 1024
                    growth = max(int(r["rss_peak_kib"]) - int(r["rss_idle_kib"]) for r in rs) / 1024
                    if s == SUBJECT:
                        peak_subject, idle_subject, growth_subject = peak, idle, growth
                    line.append("%.1f (%.1f)" % (peak, idle))
                if SUBJECT in servers:
                    if peak_subject is None:
                        line.append("–")
                    elif w == "randwrite-4k-qd128":
                        passed = peak_subject < RSS_QD128_MIB_MAX
                        line.append("%s: peak < %d MiB" % ("PASS" if passed else "FAIL", RSS_QD128_MIB_MAX))
                        verdicts.append((f"{backing} RSS at 4K QD128 < {RSS_QD128_MIB_MAX} MiB", passed))
                    else:
                        passed = growth_subject <= BUFFER_POOL_MIB_MAX + NON_POOL_GROWTH_MIB_MAX
                        line.append("%s: peak − idle = %.1f ≤ %d + %d MiB" % (
                            "PASS" if passed else "FAIL", growth_subject, BUFFER_POOL_MIB_MAX,
                            NON_POOL_GROWTH_MIB_MAX))
                        verdicts.append((f"{backing} {LABELS.get(w, w)} RSS growth ≤ BUFFER_POOL_BYTES_MAX + {NON_POOL_GROWTH_MIB_MAX} MiB", passed))
                out.append("| " + " | ".join(line) + " |")
            out.append("")

    # Threads that were allowed or seen outside the server CPU.
    stray = sorted({(r["server"], r["cpus_allowed"], r["cpus_seen"]) for r in ok
                    if r["cpus_allowed"] not in ("0", "") or r["cpus_seen"] not in ("0", "")})
    if stray:
        out.append("WARNING: server threads allowed or seen on other CPUs than 0: " +
                   "; ".join("%s allowed %s seen %s" % s for s in stray) + "\n")
    busy = [r for r in ok if max(float(r["foreign_server_cpu_pct"] or 0),
                                 float(r["foreign_fio_cpu_pct"] or 0)) > FOREIGN_PCT_WARN]
    if busy:
        out.append("WARNING: %d of %d run(s) shared a benchmark CPU with other load (> %d%% of a CPU;"
                   " column foreign_*_cpu_pct of runs.csv): %s\n" % (
                       len(busy), len(ok), FOREIGN_PCT_WARN,
                       ", ".join(sorted({"%s/%s" % (r["backing"], r["server"]) for r in busy}))))
    stalled = [r for r in ok if int(r.get("tcp_timeouts") or 0) > 0]
    if stalled:
        out.append("WARNING: %d run(s) saw TCP retransmission timeouts on the machine (multi-second"
                   " stalls on loopback when a receiver is starved): %s\n" % (
                       len(stalled), ", ".join("%s r%s %s %s" % (r["backing"], r["round"], r["workload"],
                                                                 r["server"]) for r in stalled)))
    if bad:
        out.append("WARNING: %d run(s) failed and are left out of the medians: %s\n" % (
            len(bad), "; ".join("%s r%s %s %s: %s" % (r["backing"], r["round"], r["workload"],
                                                      r["server"], r["status"]) for r in bad)))
    if verdicts:
        failed = [v for v, p in verdicts if not p]
        out.append("**Verdict (%s vs %s): %s** — %d of %d criteria met%s\n" % (
            SUBJECT, REFERENCE, "PASS" if not failed else "FAIL",
            len(verdicts) - len(failed), len(verdicts),
            ("; failing: " + "; ".join(failed)) if failed else ""))
    print("\n".join(out))
    return 0

if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    sys.exit({"run": cmd_run, "summary": cmd_summary, "quiet": cmd_quiet}[cmd](rest))
PY
}
