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

# =====================================================================================
# Replication and rebuild benchmarks (bench/replication-bench.sh, bench/rebuild-bench.sh).
# Everything below is only used by those two scripts; nbd-bench.sh does not call it.
# =====================================================================================

# repl_wait_socket PID SOCKET TIMEOUT_S: waits until a unix socket file exists while PID
# is alive (an agent's admin socket appears once every listener is bound).
repl_wait_socket() {
    local pid=$1 sock=$2 deadline=$((SECONDS + $3))
    while ((SECONDS < deadline)); do
        kill -0 "$pid" 2>/dev/null || return 1
        [[ -S $sock ]] && return 0
        sleep 0.02
    done
    return 1
}

# repl_data_offset MIRRORCTL DIR SIZE_MIB: prints the data partition offset that
# `mirrorctl create --data-size SIZE_MIB` gives (found on a sparse probe file).
repl_data_offset() {
    local ctl=$1 dir=$2 size_mib=$3 probe
    probe=$dir/probe.img
    truncate -s "$((size_mib + 256))M" "$probe"
    "$ctl" create "$probe" --mirror db --node 1 --peer 2 --data-size "${size_mib}M" >/dev/null
    "$ctl" inspect "$probe" --json |
        /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["layout"]["data_offset"])'
    rm -f -- "$probe"
}

# repl_make_disks MIRRORCTL DIR SIZE_MIB SEED_FILE OFFSET: DIR/alpha.img and
# DIR/beta.img, mirror "db" (node ids 1 and 2), created --blank (UpToDate, same
# generation), then the same SEED_FILE (random data) written into both data partitions,
# so that they really are identical and nothing is sparse.
repl_make_disks() {
    local ctl=$1 dir=$2 size_mib=$3 seed=$4 off=$5 node peer n
    for n in alpha beta; do
        if [[ $n == alpha ]]; then node=1 peer=2; else node=2 peer=1; fi
        rm -f -- "$dir/$n.img"
        truncate -s "$((off + size_mib * 1048576))" "$dir/$n.img"
        "$ctl" create "$dir/$n.img" --mirror db --node "$node" --peer "$peer" \
            --data-size "${size_mib}M" --blank >/dev/null
        dd if="$seed" of="$dir/$n.img" bs=1M oflag=seek_bytes seek="$off" conv=notrunc status=none
    done
}

# repl_write_config FILE DIR A_REPL B_REPL A_NBD B_NBD [RESYNC_RATE]: a two-node
# cluster on loopback (nodes alpha and beta, mirror db), disks DIR/alpha.img and
# DIR/beta.img, admin sockets DIR/alpha.sock and DIR/beta.sock, secret DIR/secret.
# Without RESYNC_RATE (e.g. "200M") the resync is paced by its adaptive in-flight
# window only.
repl_write_config() {
    local file=$1 dir=$2 rate_line=""
    [[ -n ${7:-} ]] && rate_line="resync_rate = \"$7\""
    cat >"$file" <<EOF
# Written by bench/lib.sh repl_write_config: two agents on one machine.
[cluster]
name = "bench"
secret_file = "$dir/secret"

[[node]]
name = "alpha"
id = 1
admin_socket = "$dir/alpha.sock"

[[node]]
name = "beta"
id = 2
admin_socket = "$dir/beta.sock"

[[mirror]]
name = "db"
$rate_line

[mirror.node.alpha]
device = "$dir/alpha.img"
replication = ["127.0.0.1:$3"]
nbd_listen = "127.0.0.1:$5"

[mirror.node.beta]
device = "$dir/beta.img"
replication = ["127.0.0.1:$4"]
nbd_listen = "127.0.0.1:$6"
EOF
}

# repl_stop_agent PID LOG: SIGTERM, up to 15 s for the agent's drain, then SIGKILL;
# appends the exit status to LOG. Returns 1 unless it exited 0 on its own.
repl_stop_agent() {
    local pid=$1 log=$2 i rc=0
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" 2>/dev/null || rc=$?
        echo "# agent had already exited, status $rc" >>"$log"
        return 1
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        echo "# agent did not stop within 15 s of SIGTERM: killed" >>"$log"
        return 1
    fi
    wait "$pid" 2>/dev/null || rc=$?
    echo "# agent exited with status $rc" >>"$log"
    ((rc == 0))
}

# ------------------------------------------------------------------ the mirror pair
# The helpers below share these globals, set by the calling script:
#   MIRRORDISK        the agent binary            REPL_WORK       the tmpfs work dir
#   REPL_NICE_ADJ     `nice -n` adjustment        REPL_SERVER_CPU the agents' CPU
#   REPL_NEXT_PORT    next TCP port to try        REPL_RESYNC_RATE  optional resync_rate
# and set ALPHA_PID, BETA_PID (empty when stopped) and NBD_PORT (alpha's export).

# repl_take_port: PORT = the next port from REPL_NEXT_PORT on that no socket uses.
repl_take_port() {
    while ! bench_port_free "$REPL_NEXT_PORT"; do REPL_NEXT_PORT=$((REPL_NEXT_PORT + 1)); done
    PORT=$REPL_NEXT_PORT
    REPL_NEXT_PORT=$((REPL_NEXT_PORT + 1))
}

# repl_start_pair LOG_PREFIX [activate|new]: a fresh config (fresh ports) for the disks
# in REPL_WORK, both agents started as `nice -n ADJ taskset -c CPU mirrordisk agent`
# (logs LOG_PREFIX.alpha.log, LOG_PREFIX.beta.log), both in sync; with "activate",
# alpha is then made primary and its export is open on NBD_PORT; with "new" (after
# repl_new_metadata), both wait for the operator's first `rebuild --full` instead of
# being in sync. Returns 1 (saying why) if a step fails; the caller then runs
# repl_stop_pair.
repl_start_pair() {
    local prefix=$1 activate=${2:-} a_repl b_repl b_nbd node pid until='in_sync(m)'
    [[ $activate == new ]] && until="m['connection']['state'] == 'waiting-for-operator'"
    repl_take_port; a_repl=$PORT
    repl_take_port; b_repl=$PORT
    repl_take_port; NBD_PORT=$PORT
    repl_take_port; b_nbd=$PORT
    repl_write_config "$REPL_WORK/cluster.toml" "$REPL_WORK" "$a_repl" "$b_repl" "$NBD_PORT" "$b_nbd" \
        "${REPL_RESYNC_RATE:-}"
    for node in alpha beta; do
        printf '$ nice -n %s taskset -c %s %s agent --config %s --node %s\n' "$REPL_NICE_ADJ" \
            "$REPL_SERVER_CPU" "$MIRRORDISK" "$REPL_WORK/cluster.toml" "$node" >>"$prefix.$node.log"
        nice -n "$REPL_NICE_ADJ" taskset -c "$REPL_SERVER_CPU" "$MIRRORDISK" agent \
            --config "$REPL_WORK/cluster.toml" --node "$node" </dev/null >>"$prefix.$node.log" 2>&1 &
        pid=$!
        if [[ $node == alpha ]]; then ALPHA_PID=$pid; else BETA_PID=$pid; fi
    done
    for node in alpha beta; do
        [[ $node == alpha ]] && pid=$ALPHA_PID || pid=$BETA_PID
        if ! repl_wait_socket "$pid" "$REPL_WORK/$node.sock" 20; then
            bench_log "  agent $node did not open its admin socket within 20 s; log: $prefix.$node.log"
            tail -n 20 "$prefix.$node.log" >&2 || true
            return 1
        fi
    done
    for node in alpha beta; do
        if ! repl_py wait --socket "$REPL_WORK/$node.sock" --until "$until" --timeout 30 >/dev/null \
            2>>"$prefix.$node.log"; then
            bench_log "  agent $node: not $until within 30 s (see $prefix.$node.log):"
            tail -n 1 "$prefix.$node.log" >&2
            return 1
        fi
    done
    if [[ $activate == activate ]]; then
        repl_activate_alpha "$prefix" || return 1
    fi
}

# repl_activate_alpha LOG_PREFIX: alpha made primary, its export open on NBD_PORT.
repl_activate_alpha() {
    local prefix=$1
    if ! repl_py admin --socket "$REPL_WORK/alpha.sock" --json '{"command":"activate","mirror":"db"}' \
        >>"$prefix.alpha.log" 2>&1; then
        bench_log "  activate alpha failed: $(tail -n 1 "$prefix.alpha.log")"
        return 1
    fi
    if ! repl_py wait --socket "$REPL_WORK/alpha.sock" \
        --until "m['export']['open'] and m['role'] == 'Primary'" \
        --timeout 10 >/dev/null 2>>"$prefix.alpha.log" ||
        ! bench_wait_listening "$ALPHA_PID" "$NBD_PORT" 10; then
        bench_log "  alpha's export did not open; log: $prefix.alpha.log"
        return 1
    fi
}

# repl_stop_pair LOG_PREFIX: deactivates alpha if it is primary (so that no side stops
# while the other is primary: a clean, in-sync pair for the next start), then SIGTERM
# to both. Returns 1 if a step failed (the logs say which).
repl_stop_pair() {
    local prefix=$1 ok=0
    if [[ -n ${ALPHA_PID:-} ]] && kill -0 "$ALPHA_PID" 2>/dev/null &&
        [[ $(repl_py get --socket "$REPL_WORK/alpha.sock" --expr "m['role']" 2>/dev/null) == Primary ]]; then
        repl_py admin --socket "$REPL_WORK/alpha.sock" --json '{"command":"deactivate","mirror":"db"}' \
            >>"$prefix.alpha.log" 2>&1 || { bench_log "  deactivate alpha failed (see $prefix.alpha.log)"; ok=1; }
    fi
    if [[ -n ${ALPHA_PID:-} ]]; then repl_stop_agent "$ALPHA_PID" "$prefix.alpha.log" || ok=1; fi
    ALPHA_PID=""
    if [[ -n ${BETA_PID:-} ]]; then repl_stop_agent "$BETA_PID" "$prefix.beta.log" || ok=1; fi
    BETA_PID=""
    ((ok == 0)) || bench_log "  an agent did not stop cleanly (see $prefix.*.log)"
    return "$ok"
}

# repl_new_metadata MIRRORCTL DIR SIZE_MIB: `mirrorctl create --force` (without --blank)
# on DIR/alpha.img and DIR/beta.img again: fresh metadata, both disks new (Inconsistent,
# "just created"), the data partitions untouched. The agents then wait for the first
# full copy, `mirrorctl rebuild db --full --from NODE`, its documented use.
repl_new_metadata() {
    local ctl=$1 dir=$2 size_mib=$3
    "$ctl" create "$dir/alpha.img" --mirror db --node 1 --peer 2 --data-size "${size_mib}M" --force >/dev/null &&
        "$ctl" create "$dir/beta.img" --mirror db --node 2 --peer 1 --data-size "${size_mib}M" --force >/dev/null
}

# repl_data_identical DIR OFFSET BYTES: whether the data partitions of DIR/alpha.img
# and DIR/beta.img are equal (the agents stopped).
repl_data_identical() {
    cmp -s -i "$2:$2" -n "$3" -- "$1/alpha.img" "$1/beta.img"
}

# repl_py SUBCOMMAND ARGS...: the Python half of the replication and rebuild benchmarks.
#   admin       one request to an agent's admin socket (JSON line in, JSON line out)
#   get         one value from a node's status (Python expression on m, the first mirror)
#   wait        poll a node's status until an expression holds (bounded)
#   run         one fio run, CPU of one or more server processes sampled (like bench_py run)
#   full-copy   `rebuild-full` on the source's admin socket, timed to the target UpToDate
#   copy-run    one nbdcopy between two servers, timed, with the servers' CPU
#   diff-rebuild  `rebuild` on the source after a break: time from link up to the
#               target UpToDate (the reconnect apart), bytes the resync sent
#   scatter     N distinct random 4 KiB writes through libnbd (python3-libnbd), QD 32
#   load-run    fio against the primary, optionally with a full rebuild started at the
#               end of fio's ramp and polled to the target UpToDate; the primary's write
#               counter is sampled throughout
#   summary-repl, summary-rebuild   the markdown summaries
repl_py() {
    /usr/bin/python3 - "$@" <<'PY'
import argparse, csv, json, math, os, socket, statistics, subprocess, sys, time

HZ = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------- /proc readers

def stat_fields(path):
    with open(path) as f:
        s = f.read()
    return s[s.rindex(")") + 2:].split()

def ticks_of(pid):
    """utime + stime of a whole thread group (live and exited threads, io_uring
    workers included), in clock ticks; None once the process is gone or a zombie."""
    try:
        f = stat_fields(f"/proc/{pid}/stat")
    except (FileNotFoundError, ProcessLookupError):
        return None
    if f[0] in ("Z", "X"):
        return None
    return int(f[11]) + int(f[12])

def ticks_sum(pids):
    vals = [ticks_of(p) for p in pids]
    return None if any(v is None for v in vals) else sum(vals)

def status_kib(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "Threads"):
                    out[k] = int(v.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out

def thread_cpus(pid, allowed, seen):
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

def busy_pct(j0, j1, cpu, seconds):
    return 100.0 * (j1[cpu][0] - j0[cpu][0]) / HZ / seconds if seconds > 0 else 0.0

def tcp_counters():
    out = {}
    for path, keys in (("/proc/net/snmp", ("RetransSegs",)), ("/proc/net/netstat", ("TCPTimeouts",))):
        with open(path) as f:
            lines = f.read().splitlines()
        for head, vals in zip(lines[::2], lines[1::2]):
            for k, v in zip(head.split()[1:], vals.split()[1:]):
                if k in keys:
                    out[k] = int(v)
    return out

def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]

def interp(samples, t):
    if t <= samples[0][0]:
        return samples[0][1]
    for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
        if t0 <= t <= t1:
            return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)
    return samples[-1][1]

def self_cpu_s():
    t = os.times()
    return t.user + t.system

# ---------------------------------------------------------------- admin socket

def admin(sock, obj, timeout=30.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock)
        s.sendall((json.dumps(obj) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    return json.loads(buf)

def node_status(sock):
    r = admin(sock, {"command": "status"})
    if not r.get("ok"):
        raise RuntimeError(r.get("error", "status failed"))
    return r["status"]

def first_mirror(sock):
    return node_status(sock)["mirrors"][0]

def in_sync(m):
    """Both sides UpToDate, connected, no resync, nothing dirty: the mirror is
    redundant. The peer's disk state is as last heard, hence dirty_bytes == 0 too."""
    p = m.get("peer") or {}
    return (m["connection"]["state"] == "connected" and m["resync"] is None
            and m["disk_state"] == "UpToDate" and p.get("disk_state") == "UpToDate"
            and m["dirty_bytes"] == 0)

def target_done(m):
    """The target of a copy is done: UpToDate, connected, no resync running."""
    return (m["disk_state"] == "UpToDate" and m["resync"] is None
            and m["connection"]["state"] == "connected")

def brief(m):
    p = m.get("peer") or {}
    r = m.get("resync")
    return "role %s disk %s peer %s conn %s (link %s) dirty %d%s%s" % (
        m["role"], m["disk_state"], p.get("disk_state", "unknown"), m["connection"]["state"],
        m["connection"]["link"]["state"], m["dirty_bytes"],
        (" resync %s %s/%s" % (r["role"], r["done_bytes"], r["total_bytes"])) if r else "",
        (" problem: %s" % m["problem"]) if m.get("problem") else "")

def cmd_admin(argv):
    ap = argparse.ArgumentParser(prog="repl_py admin")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    r = admin(a.socket, json.loads(a.json))
    if not r.get("ok"):
        print(r.get("error", json.dumps(r)), file=sys.stderr)
        return 1
    print(r.get("message", ""))
    return 0

def cmd_get(argv):
    ap = argparse.ArgumentParser(prog="repl_py get")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--expr", required=True)
    a = ap.parse_args(argv)
    s = node_status(a.socket)
    m = s["mirrors"][0]
    v = eval(a.expr, {"m": m, "s": s, "in_sync": in_sync, "brief": brief})
    print(json.dumps(v) if isinstance(v, (bool, type(None), dict, list)) else v)
    return 0

def cmd_wait(argv):
    ap = argparse.ArgumentParser(prog="repl_py wait")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--until", required=True, help="Python expression on m (first mirror) and s")
    ap.add_argument("--timeout", type=float, required=True)
    ap.add_argument("--interval", type=float, default=0.02)
    a = ap.parse_args(argv)
    start = time.time()
    last = "no answer"
    while True:
        try:
            s = node_status(a.socket)
            m = s["mirrors"][0]
            if eval(a.until, {"m": m, "s": s, "in_sync": in_sync}):
                print("%.3f" % (time.time() - start))
                return 0
            last = brief(m)
        except (OSError, ValueError, RuntimeError) as e:
            last = "no answer (%s)" % e
        if time.time() - start > a.timeout:
            print("timeout after %.0f s waiting for %s on %s; last status: %s" % (
                a.timeout, a.until, a.socket, last), file=sys.stderr)
            return 1
        time.sleep(a.interval)

# ---------------------------------------------------------------- CSV

def append_row(path, fields, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)

def meta_dict(meta):
    return dict(kv.split("=", 1) for kv in meta)

# ---------------------------------------------------------------- one fio run

RUN_FIELDS = [
    "round", "workload", "server", "position", "kind", "rw", "bs", "iodepth",
    "status", "runtime_s", "ios", "iops", "bw_MBps", "clat_p50_us", "clat_p99_us",
    "clat_mean_us", "server_cpu_s", "server_cpu_us_per_io", "server_cpu_util_pct",
    "server_cpu_total_s", "fio_cpu_pct", "foreign_server_cpu_pct", "foreign_fio_cpu_pct",
    "softirq_server_cpu_pct", "tcp_retrans_segs", "tcp_timeouts", "loadavg",
    "rss_idle_kib", "rss_peak_kib", "rss_peak_kib_each", "threads", "pids",
    "cpus_allowed", "cpus_seen", "port", "json",
]

def cmd_run(argv):
    """bench_py run, for a server made of several processes (the two agents): CPU is
    the sum over --pid, sampled every 20 ms, taken over fio's measured window."""
    ap = argparse.ArgumentParser(prog="repl_py run")
    ap.add_argument("--pid", type=int, action="append", required=True)
    ap.add_argument("--fio-cpu", type=int, required=True)
    ap.add_argument("--server-cpu", type=int, required=True)
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--timeout", type=float, required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--meta", action="append", default=[])
    ap.add_argument("fio", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    fio = a.fio[1:] if a.fio[:1] == ["--"] else a.fio
    row = meta_dict(a.meta)
    row["json"] = os.path.basename(a.json)
    row["pids"] = "|".join(map(str, a.pid))
    os.sched_setaffinity(0, {a.fio_cpu})
    pids = a.pid
    ticks_before = ticks_sum(pids)
    row["rss_idle_kib"] = sum(status_kib(p).get("VmRSS", 0) for p in pids)
    allowed, seen = set(), set()
    for p in pids:
        thread_cpus(p, allowed, seen)
    status = "ok" if ticks_before is not None else "server-died"
    tcp_before = tcp_counters()
    cpus = {a.server_cpu, a.fio_cpu}
    rc = None
    if status == "ok":
        with open(a.log, "ab") as log:
            p = subprocess.Popen(["nice", "-n", str(a.nice), "taskset", "-c", str(a.fio_cpu)] + fio,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            t_launch = time.time()
            samples = [(t_launch, ticks_before)]
            jiffies = [(t_launch, cpu_jiffies(cpus))]
            last_affinity = t_launch
            while p.poll() is None:
                now = time.time()
                if now - jiffies[-1][0] >= 0.1:
                    jiffies.append((now, cpu_jiffies(cpus)))
                ticks = ticks_sum(pids)
                if ticks is None:
                    status = "server-died"
                    p.kill()
                    break
                samples.append((now, ticks))
                if now - last_affinity > 0.5:
                    for q in pids:
                        thread_cpus(q, allowed, seen)
                    last_affinity = now
                if now - t_launch > a.timeout:
                    status = "timeout"
                    p.kill()
                    break
                time.sleep(0.02)
            rc = p.wait()
    tcp_after = tcp_counters()
    row["tcp_retrans_segs"] = tcp_after["RetransSegs"] - tcp_before["RetransSegs"]
    row["tcp_timeouts"] = tcp_after["TCPTimeouts"] - tcp_before["TCPTimeouts"]
    row["loadavg"] = loadavg()
    if status == "ok":
        ticks_after = ticks_sum(pids)
        if ticks_after is None:
            status = "server-died"
        else:
            samples.append((time.time(), ticks_after))
            jiffies.append((time.time(), cpu_jiffies(cpus)))
            sts = [status_kib(q) for q in pids]
            for q in pids:
                thread_cpus(q, allowed, seen)
            row["rss_peak_kib"] = sum(st.get("VmHWM", 0) for st in sts)
            row["rss_peak_kib_each"] = "|".join(str(st.get("VmHWM", "")) for st in sts)
            row["threads"] = sum(st.get("Threads", 0) for st in sts)
            row["server_cpu_total_s"] = "%.3f" % ((ticks_after - ticks_before) / HZ)
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
        x = job["read" if "read" in row["rw"] else "write"]
        clat = x["clat_ns"]
        runtime_s = job["job_runtime"] / 1000.0
        t_end = d["timestamp_ms"] / 1000.0
        cpu_s = (interp(samples, t_end) - interp(samples, t_end - runtime_s)) / HZ

        def cpu_pct(cpu, index):
            series = [(t, j[cpu][index]) for t, j in jiffies]
            used = interp(series, t_end) - interp(series, t_end - runtime_s)
            return 100 * used / HZ / runtime_s
        fio_pct = job["usr_cpu"] + job["sys_cpu"]
        row["foreign_server_cpu_pct"] = "%.1f" % (cpu_pct(a.server_cpu, 0) - 100 * cpu_s / runtime_s)
        row["foreign_fio_cpu_pct"] = "%.1f" % (cpu_pct(a.fio_cpu, 0) - fio_pct)
        row["softirq_server_cpu_pct"] = "%.1f" % cpu_pct(a.server_cpu, 1)
        ios = x["total_ios"]
        row.update({
            "runtime_s": "%.3f" % runtime_s, "ios": ios, "iops": "%.1f" % x["iops"],
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
    append_row(a.csv, RUN_FIELDS, row)
    if status != "ok":
        print(f"    {row.get('server')}: {status} (see {a.log})", file=sys.stderr)
        return 1
    main = {"iops": "%.1fk IOPS" % (float(row["iops"]) / 1000),
            "bw": "%.0f MB/s" % float(row["bw_MBps"]),
            "lat": "p50 %.1f us" % float(row["clat_p50_us"])}[row["kind"]]
    print("    %-10s %-16s cpu %7.2f us/io (%5.1f%%)  fio %5.1f%%  rss %5.1f MiB  other load %s%%/%s%%%s" % (
        row["server"], main, float(row["server_cpu_us_per_io"]), float(row["server_cpu_util_pct"]),
        float(row["fio_cpu_pct"]), int(row["rss_peak_kib"]) / 1024, row["foreign_server_cpu_pct"],
        row["foreign_fio_cpu_pct"],
        "  tcp retransmits %d (timeouts %d)" % (row["tcp_retrans_segs"], row["tcp_timeouts"])
        if row["tcp_retrans_segs"] else ""), file=sys.stderr)
    return 0

# ---------------------------------------------------------------- full copies

COPY_FIELDS = [
    "round", "method", "position", "status", "bytes", "seconds", "seconds_lo", "MBps",
    "polls", "resync_bytes_sent", "resync_bytes_received", "server_cpu_s", "client_cpu_s",
    "server_cpu_util_pct", "foreign_server_cpu_pct", "foreign_client_cpu_pct",
    "tcp_retrans_segs", "tcp_timeouts", "loadavg", "decision", "note",
]

def finish_copy_row(row, j0, j1, elapsed, cpus, server_cpu_s, client_cpu_s, tcp0):
    server_cpu, client_cpu = cpus
    row["server_cpu_s"] = "%.3f" % server_cpu_s
    row["client_cpu_s"] = "%.3f" % client_cpu_s
    row["server_cpu_util_pct"] = "%.1f" % (100 * server_cpu_s / elapsed)
    row["foreign_server_cpu_pct"] = "%.1f" % (busy_pct(j0, j1, server_cpu, elapsed) - 100 * server_cpu_s / elapsed)
    row["foreign_client_cpu_pct"] = "%.1f" % (busy_pct(j0, j1, client_cpu, elapsed) - 100 * client_cpu_s / elapsed)
    tcp1 = tcp_counters()
    row["tcp_retrans_segs"] = tcp1["RetransSegs"] - tcp0["RetransSegs"]
    row["tcp_timeouts"] = tcp1["TCPTimeouts"] - tcp0["TCPTimeouts"]
    row["loadavg"] = loadavg()

def wait_source_in_sync(sock, timeout=10.0):
    """Untimed, after the target is UpToDate: the source must agree (connected, no
    resync, peer UpToDate, nothing dirty). Returns (mirror status, ok)."""
    deadline = time.time() + timeout
    while True:
        m = first_mirror(sock)
        if in_sync(m):
            return m, True
        if time.time() > deadline:
            return m, False
        time.sleep(0.01)

def decision_text(m):
    d = m.get("decision") or {}
    return d.get("text", "")

def cmd_full_copy(argv):
    """`rebuild-full` on the source's admin socket (the request `mirrorctl rebuild
    MIRROR --full --from NODE` sends), on a new pair (both waiting for the operator) or
    an in-sync one, timed from just before the request to the first answer of the
    TARGET's status, polled every --interval, that shows the target UpToDate,
    connected, no resync running, once the copy was seen to start (the target was seen
    not UpToDate or running a resync). seconds is that upper bound; seconds_lo the time
    of the last answer that did not show it. MBps is --bytes (the volume) over seconds.
    A failed measurement: the link went down meanwhile (link-dropped), or the target
    received less resync data than the volume (short-copy). Then, untimed, the source
    must agree (in_sync). The poller runs on the client CPU; its CPU is client_cpu_s."""
    ap = argparse.ArgumentParser(prog="repl_py full-copy")
    ap.add_argument("--source", required=True, help="source agent's admin socket")
    ap.add_argument("--target", required=True, help="target agent's admin socket")
    ap.add_argument("--mirror", required=True)
    ap.add_argument("--from", dest="from_node", required=True)
    ap.add_argument("--bytes", type=int, required=True, help="volume size, for the rate")
    ap.add_argument("--pid", type=int, action="append", required=True)
    ap.add_argument("--server-cpu", type=int, required=True)
    ap.add_argument("--client-cpu", type=int, required=True)
    ap.add_argument("--interval", type=float, default=0.01)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--meta", action="append", default=[])
    a = ap.parse_args(argv)
    os.sched_setaffinity(0, {a.client_cpu})
    row = meta_dict(a.meta)
    row["bytes"] = a.bytes
    ms, mt = first_mirror(a.source), first_mirror(a.target)
    waiting = all(m["connection"]["state"] == "waiting-for-operator" for m in (ms, mt))
    if not waiting and not (in_sync(ms) and target_done(mt)):
        row["status"] = "not-ready-before"
        row["note"] = "source: %s; target: %s" % (brief(ms), brief(mt))
        append_row(a.csv, COPY_FIELDS, row)
        print("    neither new nor in sync before the copy: " + row["note"], file=sys.stderr)
        return 1
    sent0 = ms["engine_stats"]["resync_bytes_sent"]
    recv0 = mt["engine_stats"]["resync_bytes_received"]
    links0 = mt["connection"]["link"]["links_established"]
    cpus = (a.server_cpu, a.client_cpu)
    tcp0 = tcp_counters()
    ticks0, self0, j0 = ticks_sum(a.pid), self_cpu_s(), cpu_jiffies(set(cpus))
    t0 = time.time()
    r = admin(a.source, {"command": "rebuild-full", "mirror": a.mirror, "from": a.from_node})
    if not r.get("ok"):
        row["status"] = "refused"
        row["note"] = r.get("error", "")
        append_row(a.csv, COPY_FIELDS, row)
        print("    rebuild refused: " + row["note"], file=sys.stderr)
        return 1
    polls, last_not_done, started, recv = 0, t0, False, 0
    status, note = "ok", ""
    while True:
        time.sleep(a.interval)
        try:
            mt = first_mirror(a.target)
        except (OSError, ValueError, RuntimeError) as e:
            status, note, now = "no-answer", str(e), time.time()
            break
        now = time.time()
        polls += 1
        recv = mt["engine_stats"]["resync_bytes_received"] - recv0
        if mt["connection"]["link"]["links_established"] != links0:
            status, note = "link-dropped", "the link went down during the copy: " + brief(mt)
            break
        # Started: the target left UpToDate or runs a resync (receiving bytes is not
        # enough: a target that does not know it is one would look done at once).
        if mt["resync"] is not None or mt["disk_state"] != "UpToDate":
            started = True
        if (started or recv >= a.bytes) and target_done(mt):
            break
        last_not_done = now
        if now - t0 > a.timeout:
            status, note = "timeout", brief(mt)
            break
    elapsed = now - t0
    ticks1, self1, j1 = ticks_sum(a.pid), self_cpu_s(), cpu_jiffies(set(cpus))
    row.update({"status": status, "note": note, "seconds": "%.4f" % elapsed,
                "seconds_lo": "%.4f" % (last_not_done - t0), "polls": polls,
                "resync_bytes_received": recv, "MBps": "%.1f" % (a.bytes / elapsed / 1e6)})
    if ticks1 is None:
        row["status"] = "server-died"
    else:
        finish_copy_row(row, j0, j1, elapsed, cpus, (ticks1 - ticks0) / HZ, self1 - self0, tcp0)
    if row["status"] == "ok" and recv < a.bytes:
        row["status"], row["note"] = "short-copy", "beta received %d B of resync data for a %d B volume" % (recv, a.bytes)
    if row["status"] == "ok":
        ms, agreed = wait_source_in_sync(a.source)
        if not agreed:
            row["status"], row["note"] = "source-not-in-sync", brief(ms)
    else:
        ms = first_mirror(a.source)
    row["resync_bytes_sent"] = ms["engine_stats"]["resync_bytes_sent"] - sent0
    row["decision"] = decision_text(ms)
    append_row(a.csv, COPY_FIELDS, row)
    if row["status"] != "ok":
        print("    full copy: %s %s" % (row["status"], row.get("note", "")), file=sys.stderr)
        return 1
    print("    %-10s %6.3f s (> %.3f s)  %6.0f MB/s  agents cpu %.2f s (%.0f%%)  resync sent %d B  other load %s%%/%s%%" % (
        row.get("method", "mirror"), elapsed, last_not_done - t0, float(row["MBps"]),
        float(row["server_cpu_s"]), float(row["server_cpu_util_pct"]), row["resync_bytes_sent"],
        row["foreign_server_cpu_pct"], row["foreign_client_cpu_pct"]), file=sys.stderr)
    return 0

def cmd_copy_run(argv):
    """One client copy (nbdcopy) between servers --pid: wall time of the client,
    servers' CPU over it, the client's own CPU from its rusage."""
    ap = argparse.ArgumentParser(prog="repl_py copy-run")
    ap.add_argument("--pid", type=int, action="append", required=True)
    ap.add_argument("--bytes", type=int, required=True)
    ap.add_argument("--server-cpu", type=int, required=True)
    ap.add_argument("--client-cpu", type=int, required=True)
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--log", required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--meta", action="append", default=[])
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    os.sched_setaffinity(0, {a.client_cpu})
    row = meta_dict(a.meta)
    cpus = (a.server_cpu, a.client_cpu)
    tcp0 = tcp_counters()
    ticks0, j0 = ticks_sum(a.pid), cpu_jiffies(set(cpus))
    status = "ok"
    with open(a.log, "ab") as log:
        t0 = time.time()
        p = subprocess.Popen(["nice", "-n", str(a.nice), "taskset", "-c", str(a.client_cpu)] + cmd,
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        while True:
            pid, st, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - t0 > a.timeout:
                p.kill()
                pid, st, ru = os.wait4(p.pid, 0)
                status = "timeout"
                break
            time.sleep(0.002)
        elapsed = time.time() - t0
    ticks1, j1 = ticks_sum(a.pid), cpu_jiffies(set(cpus))
    if status == "ok" and os.waitstatus_to_exitcode(st) != 0:
        status = "client-error"
    if ticks1 is None:
        status = "server-died"
    row.update({"status": status, "seconds": "%.4f" % elapsed, "seconds_lo": "%.4f" % elapsed,
                "bytes": a.bytes, "MBps": "%.1f" % (a.bytes / elapsed / 1e6), "polls": "",
                "resync_bytes_sent": ""})
    if ticks1 is not None:
        finish_copy_row(row, j0, j1, elapsed, cpus, (ticks1 - ticks0) / HZ, ru.ru_utime + ru.ru_stime, tcp0)
    append_row(a.csv, COPY_FIELDS, row)
    if status != "ok":
        print("    %s: %s (see %s)" % (row.get("method"), status, a.log), file=sys.stderr)
        return 1
    print("    %-10s %6.3f s  %6.0f MB/s  servers cpu %.2f s (%.0f%%)  client cpu %.2f s  other load %s%%/%s%%" % (
        row.get("method"), elapsed, float(row["MBps"]), float(row["server_cpu_s"]),
        float(row["server_cpu_util_pct"]), float(row["client_cpu_s"]),
        row["foreign_server_cpu_pct"], row["foreign_client_cpu_pct"]), file=sys.stderr)
    return 0

# ---------------------------------------------------------------- differential rebuild

DIFF_FIELDS = [
    "round", "kind", "status", "seconds", "seconds_lo", "reconnect_s", "total_s",
    "saw_resync", "dirty_bytes_before", "written_bytes", "resync_bytes_sent",
    "resync_bytes_received", "polls", "epoch", "server_cpu_s", "decision", "full_copy",
    "loadavg", "note",
]

def cmd_diff_rebuild(argv):
    """After `break` on the source and writes there: sends `rebuild` to the source (the
    request `mirrorctl rebuild MIRROR` sends: it lifts the break, the source dials at
    once, the connect decides a differential copy), then polls the TARGET's status every
    --interval. The clock starts when the new link is up: the target's link reports its
    own age (up_ms, counted from the end of the authenticated handshake), so the time
    is exact at each answer and independent of the reconnect (dialling, backoff,
    handshake), which is reported apart (reconnect_s, from the request to link up).
    seconds = up_ms in the first answer showing the target UpToDate, connected, no
    resync (an upper bound); seconds_lo = up_ms in the last answer on that link that
    did not (a lower bound; 0 if the first answer on the link already showed it).
    total_s: wall time from the request to that first answer."""
    ap = argparse.ArgumentParser(prog="repl_py diff-rebuild")
    ap.add_argument("--source", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--mirror", required=True)
    ap.add_argument("--written", type=int, default=0)
    ap.add_argument("--pid", type=int, action="append", default=[])
    ap.add_argument("--client-cpu", type=int, required=True)
    ap.add_argument("--interval", type=float, default=0.01)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--meta", action="append", default=[])
    a = ap.parse_args(argv)
    os.sched_setaffinity(0, {a.client_cpu})
    row = meta_dict(a.meta)
    row.update({"kind": "differential", "written_bytes": a.written})
    ms, mt = first_mirror(a.source), first_mirror(a.target)
    if ms["connection"]["link"].get("broken") is None or mt["connection"]["state"] != "disconnected":
        row.update({"status": "not-broken-before", "note": "source: %s; target: %s" % (brief(ms), brief(mt))})
        append_row(a.csv, DIFF_FIELDS, row)
        print("    the link is not broken before the rebuild: " + row["note"], file=sys.stderr)
        return 1
    sent0 = ms["engine_stats"]["resync_bytes_sent"]
    recv0 = mt["engine_stats"]["resync_bytes_received"]
    links0 = mt["connection"]["link"]["links_established"]
    row["dirty_bytes_before"] = ms["dirty_bytes"]
    polls, lo_ms, done_ms, link_up_wall, saw_resync, epoch = 0, 0, None, None, False, None
    status, note = "ok", ""
    ticks0 = ticks_sum(a.pid) if a.pid else None
    t0 = time.time()
    r = admin(a.source, {"command": "rebuild", "mirror": a.mirror})
    if not r.get("ok"):
        row.update({"status": "refused", "note": r.get("error", "")})
        append_row(a.csv, DIFF_FIELDS, row)
        print("    rebuild refused: " + row["note"], file=sys.stderr)
        return 1
    while True:
        try:
            mt = first_mirror(a.target)
        except (OSError, ValueError, RuntimeError) as e:
            status, note = "no-answer", str(e)
            break
        now = time.time()
        polls += 1
        link = mt["connection"]["link"]
        if link["links_established"] > links0 and link["state"] == "connected" and link.get("up_ms") is not None:
            if epoch is None:
                epoch = link.get("epoch")
                link_up_wall = now - link["up_ms"] / 1000.0
            elif link.get("epoch") != epoch or link["links_established"] > links0 + 1:
                status, note = "link-dropped", "the link went down during the resync (epoch %s -> %s)" % (epoch, link.get("epoch"))
                break
            if mt["resync"] is not None:
                saw_resync = True
            if target_done(mt):
                done_ms = link["up_ms"]
                break
            lo_ms = link["up_ms"]
        if now - t0 > a.timeout:
            status, note = "timeout", brief(mt)
            break
        time.sleep(a.interval)
    t_done = time.time()
    row.update({"status": status, "note": note, "polls": polls, "epoch": epoch if epoch is not None else "",
                "saw_resync": int(saw_resync), "loadavg": loadavg(),
                "resync_bytes_received": mt["engine_stats"]["resync_bytes_received"] - recv0 if status != "no-answer" else ""})
    if status == "ok":
        row["seconds"] = "%.4f" % (done_ms / 1000.0)
        row["seconds_lo"] = "%.4f" % (lo_ms / 1000.0)
        row["reconnect_s"] = "%.4f" % (link_up_wall - t0)
        row["total_s"] = "%.4f" % (t_done - t0)
        ticks1 = ticks_sum(a.pid) if a.pid else None
        if ticks0 is not None and ticks1 is not None:
            row["server_cpu_s"] = "%.3f" % ((ticks1 - ticks0) / HZ)
        ms, agreed = wait_source_in_sync(a.source)
        if not agreed:
            row["status"], row["note"] = "source-not-in-sync", brief(ms)
    else:
        ms = first_mirror(a.source)
    row["resync_bytes_sent"] = ms["engine_stats"]["resync_bytes_sent"] - sent0
    row["decision"] = decision_text(ms)
    row["full_copy"] = int(bool((ms.get("decision") or {}).get("full_copy")))
    append_row(a.csv, DIFF_FIELDS, row)
    if row["status"] != "ok":
        print("    differential: %s: %s" % (row["status"], row["note"]), file=sys.stderr)
        return 1
    print("    differential %.1f ms from link up (> %.1f ms)%s, reconnect %.1f ms; resync sent %d B"
          " (dirty before %d B, written %d B); %d polls; decision: %s" % (
              done_ms, lo_ms, "" if saw_resync else " [resync never observed running]",
              1000 * float(row["reconnect_s"]), row["resync_bytes_sent"], int(row["dirty_bytes_before"]),
              a.written, polls, row["decision"]), file=sys.stderr)
    return 0

def cmd_scatter(argv):
    """COUNT distinct 4 KiB blocks (--bs) chosen at random (seeded) over the export,
    each written once with random data, QD --depth through libnbd's async API, then a
    FLUSH. Prints a JSON line: count, bytes, size, seconds."""
    ap = argparse.ArgumentParser(prog="repl_py scatter")
    ap.add_argument("--uri", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    import nbd, random
    h = nbd.NBD()
    h.connect_uri(a.uri)
    size = h.get_size()
    rnd = random.Random(a.seed)
    blocks = rnd.sample(range(size // a.bs), a.count)
    errors = []

    def done(error):
        if error.value != 0:
            errors.append(error.value)
        return 1
    t0 = time.time()
    for b in blocks:
        while h.aio_in_flight() >= a.depth:
            h.poll(-1)
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(rnd.randbytes(a.bs))), b * a.bs, completion=done)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.flush()
    h.shutdown()
    if errors:
        print("scatter: %d of %d writes failed" % (len(errors), a.count), file=sys.stderr)
        return 1
    print(json.dumps({"count": a.count, "bytes": a.count * a.bs, "size": size,
                      "seconds": round(time.time() - t0, 3)}))
    return 0

# ---------------------------------------------------------------- rebuild under load

LOAD_FIELDS = [
    "round", "phase", "status", "fio_iops", "fio_runtime_s", "server_iops", "window_s",
    "rebuild_s", "rebuild_done_during_fio", "rebuild_bytes", "clat_p50_us", "clat_p99_us",
    "agents_cpu_util_pct", "fio_cpu_pct", "foreign_server_cpu_pct", "foreign_fio_cpu_pct",
    "tcp_retrans_segs", "tcp_timeouts", "polls", "fio_start_after_request_s", "loadavg", "note",
]
LOAD_WINDOW_MIN_S = 1.0

def cmd_load_run(argv):
    """fio against the primary's (source's) export; the source's and the target's
    status are polled every --interval throughout (in both kinds of run, so that the
    polling costs the agents the same): the source's engine write counter (one per NBD
    write) gives the application's write rate over any window.
    --rebuild-from NODE: a full rebuild (`rebuild-full`) runs during fio, and the poll
    goes on after fio until the target is UpToDate (the rebuild completed;
    --rebuild-timeout otherwise). With --new-pair (both disks freshly created, waiting
    for the operator), the rebuild is requested first, then the source is activated,
    then fio starts; otherwise (an in-sync, active pair) the rebuild is requested when
    fio's ramp is over.
    server_iops: idle run, over fio's measured window; rebuild run, over the part of
    fio's measured window during which the rebuild ran (until the first answer showing
    the target UpToDate), which must last LOAD_WINDOW_MIN_S at least."""
    ap = argparse.ArgumentParser(prog="repl_py load-run")
    ap.add_argument("--source", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--mirror", required=True)
    ap.add_argument("--rebuild-from", default="")
    ap.add_argument("--new-pair", action="store_true")
    ap.add_argument("--bytes", type=int, default=0, help="volume size: a full copy receives at least this")
    ap.add_argument("--ramp", type=float, required=True)
    ap.add_argument("--pid", type=int, action="append", required=True)
    ap.add_argument("--server-cpu", type=int, required=True)
    ap.add_argument("--fio-cpu", type=int, required=True)
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--timeout", type=float, required=True)
    ap.add_argument("--rebuild-timeout", type=float, default=600)
    ap.add_argument("--json", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--meta", action="append", default=[])
    ap.add_argument("fio", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    fio = a.fio[1:] if a.fio[:1] == ["--"] else a.fio
    os.sched_setaffinity(0, {a.fio_cpu})
    row = meta_dict(a.meta)
    cpus = {a.server_cpu, a.fio_cpu}
    m0, mt0 = first_mirror(a.source), first_mirror(a.target)
    new = a.rebuild_from and a.new_pair
    if new:
        ready = all(m["connection"]["state"] == "waiting-for-operator" for m in (m0, mt0))
    else:
        ready = in_sync(m0) and target_done(mt0) and m0["export"]["open"]
    if not ready:
        row.update({"status": "not-ready-before", "note": "source: %s; target: %s" % (brief(m0), brief(mt0))})
        append_row(a.csv, LOAD_FIELDS, row)
        print("    not ready before the run: " + row["note"], file=sys.stderr)
        return 1
    sent0 = m0["engine_stats"]["resync_bytes_sent"]
    recv0 = mt0["engine_stats"]["resync_bytes_received"]
    links0 = mt0["connection"]["link"]["links_established"]
    tcp0 = tcp_counters()
    samples = []          # (t, writes, agents' ticks)
    jiffies = []
    status, note = "ok", ""
    t_req = t_done = None
    started = False
    polls = 0

    def request_rebuild():
        r = admin(a.source, {"command": "rebuild-full", "mirror": a.mirror, "from": a.rebuild_from})
        return None if r.get("ok") else "rebuild-full refused: " + r.get("error", "")

    if new:
        t_req = time.time()
        err = request_rebuild()
        if err is None:
            r = admin(a.source, {"command": "activate", "mirror": a.mirror})
            err = None if r.get("ok") else "activate refused: " + r.get("error", "")
        while err is None and not first_mirror(a.source)["export"]["open"]:
            if time.time() - t_req > 10:
                err = "the export did not open within 10 s"
            time.sleep(0.005)
        if err is not None:
            row.update({"status": "refused", "note": err})
            append_row(a.csv, LOAD_FIELDS, row)
            print("    " + err, file=sys.stderr)
            return 1
        row["fio_start_after_request_s"] = "%.3f" % (time.time() - t_req)
    with open(a.log, "ab") as log:
        p = subprocess.Popen(["nice", "-n", str(a.nice), "taskset", "-c", str(a.fio_cpu)] + fio,
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        t_launch = time.time()
        rc = None
        while True:
            try:
                m = first_mirror(a.source)
                now = time.time()
                mt = first_mirror(a.target)
            except (OSError, ValueError, RuntimeError) as e:
                status, note = "no-answer", str(e)
                p.kill()
                break
            polls += 1
            tk = ticks_sum(a.pid)
            if tk is None:
                status = "server-died"
                p.kill()
                break
            samples.append((now, m["engine_stats"]["writes"], tk))
            if not jiffies or now - jiffies[-1][0] >= 0.1:
                jiffies.append((now, cpu_jiffies(cpus)))
            if mt["connection"]["link"]["links_established"] != links0:
                status, note = "link-dropped", "the replication link went down during the run: " + brief(mt)
                break
            if t_req is not None and t_done is None:
                if mt["resync"] is not None or mt["disk_state"] != "UpToDate":
                    started = True
                if started and target_done(mt):
                    t_done = time.time()
            if a.rebuild_from and t_req is None and now - t_launch >= a.ramp:
                t_req = time.time()
                err = request_rebuild()
                if err is not None:
                    status, note = "refused", err
                    p.kill()
                    break
            if rc is None:
                rc = p.poll()
            if rc is not None and (not a.rebuild_from or t_done is not None):
                break
            if rc is None and now - t_launch > a.timeout:
                status = "timeout"
                p.kill()
                break
            if t_req is not None and t_done is None and now - t_req > a.rebuild_timeout:
                status, note = "rebuild-timeout", brief(mt)
                break
            time.sleep(a.interval)
        if rc is None:
            rc = p.wait()
    tcp1 = tcp_counters()
    row.update({"tcp_retrans_segs": tcp1["RetransSegs"] - tcp0["RetransSegs"],
                "tcp_timeouts": tcp1["TCPTimeouts"] - tcp0["TCPTimeouts"], "loadavg": loadavg(),
                "polls": polls})
    job = None
    if status in ("ok", "rebuild-timeout"):
        try:
            with open(a.json) as f:
                text = f.read()
            d = json.loads(text[text.index("{"):])
            job = d["jobs"][0]
            if rc != 0 or job["error"] != 0:
                status = "fio-error"
        except (OSError, ValueError, KeyError, IndexError):
            status = "fio-error"
    if job is not None and status in ("ok", "rebuild-timeout"):
        x = job["write"]
        runtime_s = job["job_runtime"] / 1000.0
        t_end = d["timestamp_ms"] / 1000.0
        w0, w1 = t_end - runtime_s, t_end
        if a.rebuild_from and t_req is not None:
            w0 = max(w0, t_req)
            if t_done is not None:
                w1 = min(w1, t_done)
        ws = [(t, w) for t, w, _ in samples]
        ts = [(t, k) for t, _, k in samples]
        window = w1 - w0
        row.update({
            "fio_iops": "%.1f" % x["iops"], "fio_runtime_s": "%.3f" % runtime_s,
            "clat_p50_us": "%.2f" % (x["clat_ns"]["percentile"]["50.000000"] / 1000),
            "clat_p99_us": "%.2f" % (x["clat_ns"]["percentile"]["99.000000"] / 1000),
            "fio_cpu_pct": "%.1f" % (job["usr_cpu"] + job["sys_cpu"]),
            "window_s": "%.3f" % window,
        })
        if window > 0:
            row["server_iops"] = "%.1f" % ((interp(ws, w1) - interp(ws, w0)) / window)
            agents = (interp(ts, w1) - interp(ts, w0)) / HZ / window * 100
            row["agents_cpu_util_pct"] = "%.1f" % agents

            def cpu_pct(cpu):
                series = [(t, j[cpu][0]) for t, j in jiffies]
                return 100 * (interp(series, w1) - interp(series, w0)) / HZ / window
            row["foreign_server_cpu_pct"] = "%.1f" % (cpu_pct(a.server_cpu) - agents)
            row["foreign_fio_cpu_pct"] = "%.1f" % (cpu_pct(a.fio_cpu) - float(row["fio_cpu_pct"]))
        if window < LOAD_WINDOW_MIN_S and status == "ok":
            note = ("the rebuild overlapped fio's measured window by only %.3f s (< %.1f s): use a larger"
                    " volume (--load-size-mib) or a resync_rate cap (--load-resync-rate)" % (window, LOAD_WINDOW_MIN_S))
            status = "short-window"
    if a.rebuild_from and t_req is not None:
        if t_done is not None:
            row["rebuild_s"] = "%.3f" % (t_done - t_req)
            if job is not None:
                row["rebuild_done_during_fio"] = int(t_done <= d["timestamp_ms"] / 1000.0)
            ms, agreed = wait_source_in_sync(a.source)
            if not agreed and status == "ok":
                status, note = "source-not-in-sync", brief(ms)
        else:
            ms = first_mirror(a.source)
        row["rebuild_bytes"] = ms["engine_stats"]["resync_bytes_sent"] - sent0
        recv = first_mirror(a.target)["engine_stats"]["resync_bytes_received"] - recv0
        if t_done is not None and recv < a.bytes and status == "ok":
            status, note = "short-copy", "beta received %d B of resync data for a %d B volume" % (recv, a.bytes)
    row.update({"status": status, "note": note})
    append_row(a.csv, LOAD_FIELDS, row)
    if status != "ok":
        print("    %s: %s %s (see %s)" % (row.get("phase"), status, note, a.log), file=sys.stderr)
        return 1
    print("    %-8s fio %6.1fk IOPS, server %6.1fk IOPS over %.2f s%s  agents cpu %s%%  fio %s%%  other load %s%%/%s%%" % (
        row["phase"], float(row["fio_iops"]) / 1000, float(row["server_iops"]) / 1000, window,
        ("; rebuild %s s (%s)" % (row.get("rebuild_s"), "done during fio" if row.get("rebuild_done_during_fio") else "outlasted fio"))
        if a.rebuild_from else "", row["agents_cpu_util_pct"], row["fio_cpu_pct"],
        row["foreign_server_cpu_pct"], row["foreign_fio_cpu_pct"]), file=sys.stderr)
    return 0

# ---------------------------------------------------------------- summaries

FOREIGN_PCT_WARN = 10

def med(vals):
    return statistics.median(vals) if vals else None

def spread(values):
    m = statistics.median(values)
    return 100 * (max(values) - min(values)) / 2 / m if m and len(values) > 1 else 0.0

def fmt(v, kind):
    if v is None:
        return "–"
    return {"iops": lambda x: "%.1fk" % (x / 1000), "bw": lambda x: "%.0f" % x,
            "lat": lambda x: "%.1f" % x, "MBps": lambda x: "%.0f" % x}[kind](v)

def cell(vals, kind):
    if not vals:
        return "–"
    return fmt(med(vals), kind) + (" ±%.0f%%" % spread(vals) if len(vals) > 1 else "")

def verdict(ok):
    return "PASS" if ok else "FAIL"

def read_csv(path):
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))

LABELS = {"write-1m-qd16": "1 MiB seq write QD16", "randwrite-4k-qd32": "4K randwrite QD32",
          "write-4k-qd1": "4K write QD1 latency"}
UNITS = {"iops": "IOPS", "bw": "MB/s", "lat": "p50 µs"}
REPL, SERVE, QEMU, NBDKIT = "replicated", "serve", "qemu-nbd", "nbdkit"
VS_QEMU_MIN, VS_NBDKIT_MIN, CPU_RATIO_MAX, QD1_EXTRA_US_MAX, COPY_RATIO_MIN = 0.9, 0.45, 2.3, 100.0, 1.0

def cmd_summary_repl(argv):
    ap = argparse.ArgumentParser(prog="repl_py summary-repl")
    ap.add_argument("--csv", required=True)
    ap.add_argument("--copy-csv", default="")
    ap.add_argument("--servers", required=True)
    ap.add_argument("--workloads", required=True)
    a = ap.parse_args(argv)
    servers = a.servers.split(",")
    rows = read_csv(a.csv)
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]

    def runs(w, s):
        return [r for r in ok if r["workload"] == w and r["server"] == s]

    def metric(r):
        return float({"iops": r["iops"], "bw": r["bw_MBps"], "lat": r["clat_p50_us"]}[r["kind"]])

    out, verdicts = [], []
    workloads = [w for w in a.workloads.split(",") if any(runs(w, s) for s in servers)]
    n_rounds = max([len(runs(w, s)) for w in workloads for s in servers] or [0])
    judged = REPL in servers
    out.append("### Throughput and latency: median of %d round(s), ± is half the min–max spread\n" % n_rounds)
    ratio_cols = [(REPL, s) for s in (QEMU, NBDKIT, SERVE) if s in servers and REPL in servers]
    head = ["workload", "unit"] + servers + ["%s/%s" % rc for rc in ratio_cols]
    if judged:
        head.append("target")
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for w in workloads:
        kind = next(r["kind"] for s in servers for r in runs(w, s))
        m = {s: med([metric(r) for r in runs(w, s)]) for s in servers}
        line = [LABELS.get(w, w), UNITS[kind]] + [cell([metric(r) for r in runs(w, s)], kind) for s in servers]
        for x, y in ratio_cols:
            if m[x] and m[y]:
                line.append("%.2f" % (m[y] / m[x] if kind == "lat" else m[x] / m[y]))
            else:
                line.append("–")
        if judged:
            texts = []
            if kind in ("iops", "bw"):
                for ref, lim in ((QEMU, VS_QEMU_MIN), (NBDKIT, VS_NBDKIT_MIN)):
                    if ref in servers:
                        passed = bool(m[REPL] and m[ref] and m[REPL] / m[ref] >= lim)
                        texts.append("%s ≥ %.2f× %s" % (verdict(passed), lim, ref))
                        verdicts.append(("%s ≥ %.2f× %s" % (LABELS.get(w, w), lim, ref), passed))
            elif kind == "lat" and SERVE in servers:
                passed = bool(m[REPL] is not None and m[SERVE] is not None and m[REPL] <= m[SERVE] + QD1_EXTRA_US_MAX)
                extra = (m[REPL] - m[SERVE]) if m[REPL] is not None and m[SERVE] is not None else float("nan")
                texts.append("%s: %s − serve = %+.1f µs ≤ +%.0f µs" % (verdict(passed), REPL, extra, QD1_EXTRA_US_MAX))
                verdicts.append(("QD1 4K write p50 ≤ serve + %.0f µs" % QD1_EXTRA_US_MAX, passed))
            line.append("; ".join(texts) or "–")
        out.append("| " + " | ".join(line) + " |")
    out.append("\n(Latency ratios are theirs / ours, so higher is better for every ratio.)\n")

    out.append("### Server CPU time per I/O (µs, median); in brackets server / fio CPU utilisation\n")
    out.append("The replicated server's CPU is both agents' (primary + secondary), all threads.\n")
    head = ["workload"] + servers + (["replicated/serve", "≤ %.1f× serve" % CPU_RATIO_MAX] if judged and SERVE in servers else [])
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for w in workloads:
        line = [LABELS.get(w, w)]
        cm = {}
        for s in servers:
            rs = runs(w, s)
            if not rs:
                cm[s] = None
                line.append("–")
                continue
            cm[s] = med([float(r["server_cpu_us_per_io"]) for r in rs])
            line.append("%.2f (%.0f%% / %.0f%%)" % (cm[s], med([float(r["server_cpu_util_pct"]) for r in rs]),
                                                   med([float(r["fio_cpu_pct"]) for r in rs])))
        if judged and SERVE in servers:
            if cm[REPL] and cm[SERVE]:
                rt = cm[REPL] / cm[SERVE]
                passed = rt <= CPU_RATIO_MAX
                line += ["%.2f" % rt, verdict(passed)]
            else:
                passed = False
                line += ["–", "FAIL"]
            verdicts.append(("%s CPU/IO ≤ %.1f× serve" % (LABELS.get(w, w), CPU_RATIO_MAX), passed))
        out.append("| " + " | ".join(line) + " |")
    out.append("")

    # Memory, for information.
    out.append("### Peak RSS (MiB, highest over runs; the replicated column is primary + secondary)\n")
    out.append("| workload | " + " | ".join(servers) + " |")
    out.append("|" + "---|" * (len(servers) + 1))
    for w in workloads:
        line = [LABELS.get(w, w)]
        for s in servers:
            rs = runs(w, s)
            line.append("%.1f" % (max(int(r["rss_peak_kib"]) for r in rs) / 1024) if rs else "–")
        out.append("| " + " | ".join(line) + " |")
    out.append("")

    copies = read_csv(a.copy_csv)
    if copies:
        cok = [r for r in copies if r["status"] == "ok"]
        mir = [r for r in cok if r["method"] == "mirror"]
        nbc = [r for r in cok if r["method"] == "nbdcopy"]
        out.append("### Full copy of the %s MiB data partition: median of %d round(s)\n" % (
            (int(cok[0]["bytes"]) >> 20) if cok else "?", max(len(mir), len(nbc))))
        out.append("| method | seconds | MB/s | servers' CPU s (util) | client CPU s | resync bytes sent |")
        out.append("|---|---|---|---|---|---|")
        for name, rs, label in (("mirror", mir, "mirrordisk `rebuild --full --from alpha` (2 agents)"),
                                ("nbdcopy", nbc, "`nbdcopy` qemu-nbd → qemu-nbd")):
            if not rs:
                out.append("| %s | – | – | – | – | – |" % label)
                continue
            out.append("| %s | %s | %s | %.2f (%.0f%%) | %.2f | %s |" % (
                label, "%.3f" % med([float(r["seconds"]) for r in rs]) +
                (" ±%.0f%%" % spread([float(r["seconds"]) for r in rs]) if len(rs) > 1 else ""),
                cell([float(r["MBps"]) for r in rs], "MBps"),
                med([float(r["server_cpu_s"]) for r in rs]), med([float(r["server_cpu_util_pct"]) for r in rs]),
                med([float(r["client_cpu_s"]) for r in rs]),
                (str(int(med([float(r["resync_bytes_sent"]) for r in rs]))) if rs[0]["resync_bytes_sent"] else "–")))
        mm, nm = med([float(r["MBps"]) for r in mir]), med([float(r["MBps"]) for r in nbc])
        if mm and nm:
            passed = mm / nm >= COPY_RATIO_MIN
            out.append("\nmirror / nbdcopy rate: **%.2f** — %s (≥ %.1f×)\n" % (mm / nm, verdict(passed), COPY_RATIO_MIN))
            out.append("(The mirror's time runs to the first status answer showing beta UpToDate, an upper"
                       " bound; the last answer before it came at %.3f s (median), so the rate is at most"
                       " %.0f MB/s.)\n" % (med([float(r["seconds_lo"]) for r in mir]),
                                            med([int(r["bytes"]) / float(r["seconds_lo"]) / 1e6 for r in mir
                                                 if float(r["seconds_lo"]) > 0] or [0])))
        else:
            passed = False
            out.append("\nmirror / nbdcopy rate: – (missing runs) — FAIL\n")
        verdicts.append(("full copy ≥ %.1f× nbdcopy" % COPY_RATIO_MIN, passed))
        bad += [dict(r, workload="full-copy", server=r["method"]) for r in copies if r["status"] != "ok"]
        busy_c = [r for r in cok if max(float(r["foreign_server_cpu_pct"] or 0), float(r["foreign_client_cpu_pct"] or 0)) > FOREIGN_PCT_WARN]
        if busy_c:
            out.append("WARNING: %d of %d copy run(s) shared a benchmark CPU with other load (> %d%%): %s\n" % (
                len(busy_c), len(cok), FOREIGN_PCT_WARN, ", ".join("r%s %s (%s%%/%s%%)" % (
                    r["round"], r["method"], r["foreign_server_cpu_pct"], r["foreign_client_cpu_pct"]) for r in busy_c)))

    stray = sorted({(r["server"], r["cpus_allowed"], r["cpus_seen"]) for r in ok
                    if set(r["cpus_allowed"].split("|")) - {"0"} or set(r["cpus_seen"].split("|")) - {"0"}})
    if stray:
        out.append("WARNING: server threads allowed or seen on other CPUs than 0: " +
                   "; ".join("%s allowed %s seen %s" % s for s in stray) + "\n")
    busy = [r for r in ok if max(float(r["foreign_server_cpu_pct"] or 0), float(r["foreign_fio_cpu_pct"] or 0)) > FOREIGN_PCT_WARN]
    if busy:
        out.append("WARNING: %d of %d fio run(s) shared a benchmark CPU with other load (> %d%% of a CPU;"
                   " foreign_*_cpu_pct in runs.csv): %s\n" % (len(busy), len(ok), FOREIGN_PCT_WARN,
                   ", ".join(sorted({r["server"] for r in busy}))))
    stalled = [r for r in ok if int(r.get("tcp_timeouts") or 0) > 0]
    if stalled:
        out.append("WARNING: %d run(s) saw TCP retransmission timeouts: %s\n" % (
            len(stalled), ", ".join("r%s %s %s" % (r["round"], r["workload"], r["server"]) for r in stalled)))
    if bad:
        out.append("WARNING: %d run(s) failed and are left out of the medians: %s\n" % (
            len(bad), "; ".join("r%s %s %s: %s" % (r["round"], r["workload"], r["server"], r["status"]) for r in bad)))
    if verdicts:
        failed = [v for v, p in verdicts if not p]
        out.append("**Verdict (issue 4 targets): %s** — %d of %d criteria met%s\n" % (
            "PASS" if not failed else "FAIL", len(verdicts) - len(failed), len(verdicts),
            ("; failing: " + "; ".join(failed)) if failed else ""))
    print("\n".join(out))
    return 0

DIFF_RATIO_MAX, LOAD_RATIO_MIN = 0.03, 0.5

def cmd_summary_rebuild(argv):
    ap = argparse.ArgumentParser(prog="repl_py summary-rebuild")
    ap.add_argument("--full-csv", required=True)
    ap.add_argument("--diff-csv", required=True)
    ap.add_argument("--load-csv", default="")
    ap.add_argument("--volume-bytes", type=int, required=True)
    ap.add_argument("--percent", required=True)
    ap.add_argument("--load-volume-bytes", type=int, default=0)
    ap.add_argument("--load-note", default="")
    ap.add_argument("--poll-ms", type=float, required=True)
    ap.add_argument("--load-poll-ms", type=float, required=True)
    a = ap.parse_args(argv)
    out, verdicts, bad = [], [], []
    frows, drows = read_csv(a.full_csv), read_csv(a.diff_csv)
    full = [r for r in frows if r["status"] == "ok"]
    diff = [r for r in drows if r["status"] == "ok"]
    bad += [dict(r, what="full copy") for r in frows if r["status"] != "ok"]
    bad += [dict(r, what="differential") for r in drows if r["status"] != "ok"]
    vol = a.volume_bytes
    if frows or drows:
        written = int(diff[0]["written_bytes"]) if diff else 0
        out.append("### Differential vs full rebuild: %d MiB volume, %s %% dirtied as %d scattered"
                   " 4 KiB writes (%d B = %.4f %%); median of %d round(s)\n" % (
                       vol >> 20, a.percent, written // 4096, written, 100 * written / vol,
                       max(len(full), len(diff))))
        out.append("Both clocks stop at the first status answer of beta (polled every %g ms) showing it"
                   " UpToDate, connected, no resync running. Full copy: from the `rebuild-full` request."
                   " Differential: from link up (the agent's own link age, so exact at each answer;"
                   " the reconnect after `rebuild`, backoff included, is excluded and shown apart)."
                   " Each time is given as lower–upper bound: the last answer not done, the first"
                   " answer done.\n" % a.poll_ms)
        out.append("| round | full copy s | full MB/s | differential ms | reconnect ms (excluded) | request → UpToDate ms | resync bytes sent (% of volume) | decision | differential / full |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for rd in sorted({r["round"] for r in full + diff}, key=int):
            f = [r for r in full if r["round"] == rd]
            d = [r for r in diff if r["round"] == rd]
            f, d = (f[0] if f else None), (d[0] if d else None)
            out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                rd,
                "%.3f–%.3f" % (float(f["seconds_lo"]), float(f["seconds"])) if f else "–",
                "%.0f" % float(f["MBps"]) if f else "–",
                "%.1f–%.1f" % (1000 * float(d["seconds_lo"]), 1000 * float(d["seconds"])) if d else "–",
                "%.1f" % (1000 * float(d["reconnect_s"])) if d else "–",
                "%.1f" % (1000 * float(d["total_s"])) if d else "–",
                "%s (%.3f %%)" % (d["resync_bytes_sent"], 100 * int(d["resync_bytes_sent"]) / vol) if d else "–",
                ("full" if d["full_copy"] == "1" else "differential") if d else "–",
                "%.2f–%.2f %%" % (100 * float(d["seconds_lo"]) / float(f["seconds"]),
                                  100 * float(d["seconds"]) / float(f["seconds_lo"])) if f and d else "–"))
        f_hi, f_lo = med([float(r["seconds"]) for r in full]), med([float(r["seconds_lo"]) for r in full])
        d_hi, d_lo = med([float(r["seconds"]) for r in diff]), med([float(r["seconds_lo"]) for r in diff])
        if f_hi and d_hi:
            sent = med([int(r["resync_bytes_sent"]) for r in diff])
            r_hi, r_lo = d_hi / f_lo, d_lo / f_hi
            passed = r_hi <= DIFF_RATIO_MAX
            out.append("| **median** | **%.3f–%.3f** | %.0f | **%.1f–%.1f** | %.1f | %.1f | %d (%.3f %%) | | **%.2f–%.2f %%** |" % (
                f_lo, f_hi, vol / f_hi / 1e6, 1000 * d_lo, 1000 * d_hi,
                1000 * med([float(r["reconnect_s"]) for r in diff]), 1000 * med([float(r["total_s"]) for r in diff]),
                sent, 100 * sent / vol, 100 * r_lo, 100 * r_hi))
            out.append("\ndifferential / full (upper bound: differential upper / full lower): **%.2f %%** — %s (≤ %.0f %%)%s\n" % (
                100 * r_hi, verdict(passed), 100 * DIFF_RATIO_MAX,
                " (the lower bound, %.2f %%, passes: the poll interval decides; try a smaller --poll-ms)" % (100 * r_lo)
                if not passed and r_lo <= DIFF_RATIO_MAX else ""))
            for d in diff:
                w, s = int(d["written_bytes"]), int(d["resync_bytes_sent"])
                if d["full_copy"] == "1":
                    out.append("WARNING: round %s: the connect decided a FULL copy: %s\n" % (d["round"], d["decision"]))
                if int(d["dirty_bytes_before"]) != w:
                    out.append("WARNING: round %s: %d dirty bytes before the rebuild for %d written\n" % (
                        d["round"], int(d["dirty_bytes_before"]), w))
                if s < w:
                    out.append("WARNING: round %s: the resync sent %d B, less than the %d B written\n" % (d["round"], s, w))
            never = [r for r in diff if r["saw_resync"] != "1"]
            if never:
                out.append("(%d differential run(s) finished between two polls: the resync was never seen"
                           " running, only beta UpToDate after it; the lower bound is then 0.)\n" % len(never))
        else:
            passed = False
            out.append("\ndifferential / full: – (missing runs) — FAIL\n")
        verdicts.append(("differential rebuild ≤ %.0f %% of the full copy" % (100 * DIFF_RATIO_MAX), passed))
    loads = read_csv(a.load_csv)
    if loads:
        lok = [r for r in loads if r["status"] == "ok"]
        bad += [dict(r, what="load " + r.get("phase", "")) for r in loads if r["status"] != "ok"]
        idle = [r for r in lok if r["phase"] == "idle"]
        reb = [r for r in lok if r["phase"] == "rebuild"]
        out.append("### Application 4K randwrite QD32 during a full rebuild vs idle mirror: %d MiB volume%s;"
                   " median of %d round(s)\n" % (a.load_volume_bytes >> 20,
                                                  (", " + a.load_note) if a.load_note else "",
                                                  max(len(idle), len(reb))))
        out.append("server IOPS: alpha's engine write counter (one per NBD write), polled (with beta's"
                   " status) every %g ms in both runs, over"
                   " fio's measured window (idle) or over the part of it while the rebuild ran, until the"
                   " first answer showing beta UpToDate (rebuild). fio IOPS: fio's whole measured"
                   " window (for the rebuild run it includes any time after the rebuild ended).\n" % a.load_poll_ms)
        starts = [float(r["fio_start_after_request_s"]) for r in reb if r.get("fio_start_after_request_s")]
        if starts:
            out.append("The rebuild ran on a new pair: `rebuild-full` first, then alpha activated, then fio"
                       " started (%.3f s after the request, median); fio's ramp ran during the rebuild,"
                       " outside the measured window.\n" % med(starts))
        out.append("| round | idle fio IOPS | idle server IOPS | rebuild fio IOPS | rebuild server IOPS (window s) | rebuild s | rebuild completed | p99 µs idle / rebuild | ratio (server) |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for rd in sorted({r["round"] for r in loads}, key=int):
            i = [r for r in idle if r["round"] == rd]
            b = [r for r in reb if r["round"] == rd]
            i, b = (i[0] if i else None), (b[0] if b else None)
            out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                rd, fmt(float(i["fio_iops"]), "iops") if i else "–",
                fmt(float(i["server_iops"]), "iops") if i else "–",
                fmt(float(b["fio_iops"]), "iops") if b else "–",
                "%s (%.2f)" % (fmt(float(b["server_iops"]), "iops"), float(b["window_s"])) if b else "–",
                b["rebuild_s"] if b and b["rebuild_s"] else "–",
                ("yes (%s fio)" % ("during" if b["rebuild_done_during_fio"] == "1" else "after")) if b and b["rebuild_s"] else "no",
                "%.0f / %.0f" % (float(i["clat_p99_us"]), float(b["clat_p99_us"])) if i and b else "–",
                "%.2f" % (float(b["server_iops"]) / float(i["server_iops"])) if i and b else "–"))
        im = med([float(r["server_iops"]) for r in idle])
        bm = med([float(r["server_iops"]) for r in reb])
        ifm = med([float(r["fio_iops"]) for r in idle])
        bfm = med([float(r["fio_iops"]) for r in reb])
        rebuild_rows = [r for r in loads if r["phase"] == "rebuild"]
        completed = bool(rebuild_rows) and all(r.get("rebuild_s") for r in rebuild_rows)
        if im and bm:
            passed = bm / im >= LOAD_RATIO_MIN and completed
            out.append("| **median** | %s | %s | %s | %s | %s | %s | | **%.2f** |" % (
                fmt(ifm, "iops"), fmt(im, "iops"), fmt(bfm, "iops"), fmt(bm, "iops"),
                "%.3f" % med([float(r["rebuild_s"]) for r in reb]),
                "all" if completed else "NOT ALL", bm / im))
            out.append("\nIOPS during the rebuild / idle (server counter): **%.2f** — %s (≥ %.1f× and every rebuild"
                       " completed); fio's whole-window ratio: %.2f\n" % (
                           bm / im, verdict(passed), LOAD_RATIO_MIN, bfm / ifm))
        else:
            passed = False
            out.append("\nIOPS during the rebuild / idle: – (missing runs) — FAIL\n")
        verdicts.append(("IOPS during a rebuild ≥ %.1f× idle, and the rebuild completes" % LOAD_RATIO_MIN, passed))
        busy = [r for r in lok if max(float(r["foreign_server_cpu_pct"] or 0), float(r["foreign_fio_cpu_pct"] or 0)) > FOREIGN_PCT_WARN]
        if busy:
            out.append("WARNING: %d of %d load run(s) shared a benchmark CPU with other load (> %d%%): %s\n" % (
                len(busy), len(lok), FOREIGN_PCT_WARN, ", ".join("r%s %s (%s%%/%s%%)" % (
                    r["round"], r["phase"], r["foreign_server_cpu_pct"], r["foreign_fio_cpu_pct"]) for r in busy)))
    stalled = [r for r in full + diff + [r for r in loads if r["status"] == "ok"] if int(r.get("tcp_timeouts") or 0) > 0]
    if stalled:
        out.append("WARNING: %d measurement(s) saw TCP retransmission timeouts on the machine\n" % len(stalled))
    if bad:
        out.append("WARNING: %d measurement(s) failed and are left out: %s\n" % (
            len(bad), "; ".join("r%s %s: %s %s" % (r["round"], r["what"], r["status"], r.get("note", "")) for r in bad)))
    if verdicts:
        failed = [v for v, p in verdicts if not p]
        out.append("**Verdict (issue 5 targets): %s** — %d of %d criteria met%s\n" % (
            "PASS" if not failed else "FAIL", len(verdicts) - len(failed), len(verdicts),
            ("; failing: " + "; ".join(failed)) if failed else ""))
    print("\n".join(out))
    return 0

if __name__ == "__main__":
    # REPL_PY_NICE: the absolute niceness of this helper, and so of what it starts (fio,
    # nbdcopy): the poller must not lag behind other people's builds either.
    if os.environ.get("REPL_PY_NICE"):
        os.setpriority(os.PRIO_PROCESS, 0, int(os.environ["REPL_PY_NICE"]))
    cmd, rest = sys.argv[1], sys.argv[2:]
    sys.exit({"admin": cmd_admin, "get": cmd_get, "wait": cmd_wait, "run": cmd_run,
              "full-copy": cmd_full_copy, "copy-run": cmd_copy_run, "diff-rebuild": cmd_diff_rebuild,
              "scatter": cmd_scatter, "load-run": cmd_load_run,
              "summary-repl": cmd_summary_repl, "summary-rebuild": cmd_summary_rebuild}[cmd](rest))
PY
}
