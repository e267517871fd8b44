#!/usr/bin/python3
"""A write workload that records only acknowledged writes, for crash tests.

    acked_writes.py write URI LOG [MAX_WRITES]
        QD32 random writes (4 KiB..64 KiB, 4 KiB aligned, in 64 KiB slots, never two in
        flight on one slot) until the server goes away or MAX_WRITES complete. Each
        write's payload is derived from (offset, sequence) so it can be verified. LOG
        gets "S offset length sequence" when a write is issued and "A offset length
        sequence" (flushed) only once its reply has arrived.
    acked_writes.py covered LOG RANGES_JSON
        Checks that every logged write lies inside the dirty ranges (inspect --regions).
    acked_writes.py verify URI LOG [RANGES_JSON]
        Checks that every slot holds the payload of its last acknowledged write, except
        that a write still in flight when the server died may have landed after it
        (wholly or per 4 KiB block): it was never acknowledged, so either is correct.
        With RANGES_JSON: an in-flight write that landed (any block of it) must lie
        inside the dirty ranges — the activity log's promise for unfinished writes.
"""
import json
import os
import random
import sys

import nbd

SLOT = 64 * 1024
QD = 32


def payload(offset, length, seq):
    # 8-byte words carrying the sequence and the offset: distinct per write and per place.
    words = bytearray()
    for i in range(0, length, 8):
        words += ((seq << 40) ^ (offset + i)).to_bytes(8, "little")
    return bytes(words[:length])


def write(uri, log_path, max_writes):
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    slots = size // SLOT
    busy = set()
    log = open(log_path, "a", buffering=1)
    rng = random.Random(os.getpid())
    state = {"seq": 0, "done": 0}

    def start():
        while True:
            slot = rng.randrange(slots)
            if slot not in busy:
                break
        busy.add(slot)
        blocks = rng.randint(1, SLOT // 4096)
        first = rng.randint(0, SLOT // 4096 - blocks)
        offset = slot * SLOT + first * 4096
        length = blocks * 4096
        seq = state["seq"]
        state["seq"] += 1
        buf = nbd.Buffer.from_bytearray(bytearray(payload(offset, length, seq)))
        log.write(f"S {offset} {length} {seq}\n")

        def done(error, slot=slot, offset=offset, length=length, seq=seq):
            busy.discard(slot)
            if error.value == 0:
                log.write(f"A {offset} {length} {seq}\n")
                log.flush()
                state["done"] += 1
            return 1

        h.aio_pwrite(buf, offset, completion=done)

    try:
        while max_writes == 0 or state["done"] < max_writes:
            while h.aio_in_flight() < QD:
                start()
            h.poll(-1)
            while h.aio_peek_command_completed():
                h.aio_command_completed(h.aio_peek_command_completed())
    except nbd.Error as e:
        print(f"acked_writes: stopped after {state['done']} acknowledged writes: {e}", file=sys.stderr)
        return
    h.flush()
    h.shutdown()
    print(f"acked_writes: {state['done']} acknowledged writes", file=sys.stderr)


def read_log(log_path, kind="A"):
    """The (offset, length, seq) of every logged write of `kind` (A: acknowledged,
    S: issued). A torn last line (the writer died mid-write) is ignored."""
    out = []
    with open(log_path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4 and parts[0] == kind:
                out.append(tuple(int(x) for x in parts[1:]))
    return out


def covered(log_path, ranges_path):
    ranges, starts = load_ranges(ranges_path)
    missing = 0
    writes = read_log(log_path)
    for offset, length, _ in writes:
        # ranges are maximal runs, so a covered write lies inside one range
        if not inside(ranges, starts, offset, length):
            missing += 1
            if missing <= 5:
                print(f"not covered: [{offset}, {offset + length})", file=sys.stderr)
    print(f"covered: {len(writes) - missing}/{len(writes)} acknowledged writes inside {len(ranges)} dirty ranges")
    sys.exit(1 if missing or not writes else 0)


def load_ranges(ranges_path):
    ranges = sorted(json.load(open(ranges_path))["dirty_ranges"])
    return ranges, [r[0] for r in ranges]


def inside(ranges, starts, offset, length):
    import bisect
    i = bisect.bisect_right(starts, offset) - 1
    return i >= 0 and ranges[i][0] <= offset and offset + length <= ranges[i][1]


def verify(uri, log_path, ranges_path=None):
    last = {}
    for offset, length, seq in read_log(log_path, "A"):
        slot = offset // SLOT
        if slot not in last or last[slot][2] < seq:
            last[slot] = (offset, length, seq)
    # At most one write per slot is in flight at a time, so at most one issued after a
    # slot's last acknowledged write: the one in flight when the server died.
    acked = {seq for _, _, seq in read_log(log_path, "A")}
    unfinished = [w for w in read_log(log_path, "S") if w[2] not in acked]
    in_flight = {}
    for offset, length, seq in unfinished:
        slot = offset // SLOT
        if slot in last and seq > last[slot][2]:
            in_flight[slot] = (offset, length, seq)
    h = nbd.NBD()
    h.connect_uri(uri)
    bad = 0
    for slot, (offset, length, seq) in last.items():
        got = h.pread(length, offset)
        want = payload(offset, length, seq)
        if got == want:
            continue
        alt = in_flight.get(slot)
        ok = alt is not None
        for block in range(0, length, 4096) if ok else ():
            at = offset + block
            piece = got[block:block + 4096]
            if piece == want[block:block + 4096]:
                continue
            a_off, a_len, a_seq = alt
            within = a_off <= at and at + 4096 <= a_off + a_len
            if not (within and piece == payload(a_off, a_len, a_seq)[at - a_off:at - a_off + 4096]):
                ok = False
                break
        if not ok:
            bad += 1
            if bad <= 5:
                print(f"lost: write #{seq} at [{offset}, {offset + length})", file=sys.stderr)
    landed_uncovered = 0
    if ranges_path:
        ranges, starts = load_ranges(ranges_path)
        for offset, length, seq in unfinished:
            if inside(ranges, starts, offset, length):
                continue
            got = h.pread(length, offset)
            mine = payload(offset, length, seq)
            if any(got[b:b + 4096] == mine[b:b + 4096] for b in range(0, length, 4096)):
                landed_uncovered += 1
                print(f"unfinished write #{seq} landed outside the dirty set: [{offset}, {offset + length})", file=sys.stderr)
        bad += landed_uncovered
    h.shutdown()
    print(f"verified: {len(last) - bad}/{len(last)} slots hold their last acknowledged write "
          f"({len(unfinished)} writes were unfinished at the crash)")
    sys.exit(1 if bad or not last else 0)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "write":
        write(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 0)
    elif mode == "covered":
        covered(sys.argv[2], sys.argv[3])
    elif mode == "verify":
        verify(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    else:
        sys.exit(__doc__)
