#!/usr/bin/python3
"""multiconn.py: the multi-conn promise holds. A server that advertises
NBD_FLAG_CAN_MULTI_CONN promises that a FLUSH on any connection makes every write
completed on any connection durable and visible to all of them; nbdcopy, qemu and
the kernel client rely on it to spread I/O over several connections.

Run by t-multiconn.sh with NBD_URI, NBD_SIZE and EXPECT_IMAGE in the environment.

1. Three handles: write on #1 (no FUA), FLUSH on #2, read on #3 sees the data;
   100 rounds at random offsets with fresh random data.
2. Four handles, each in its own thread, keep 16 aio writes in flight over
   interleaved, disjoint 64 KiB regions (1024 writes, 64 MiB in total); then one
   FLUSH on handle #1 only; then a fresh connection reads everything back and must
   see every byte. The expected image is written to EXPECT_IMAGE so the shell can
   compare the backing file too.
"""

import os
import random
import sys
import threading

import nbd

URI = os.environ["NBD_URI"]
SIZE = int(os.environ["NBD_SIZE"])
EXPECT_IMAGE = os.environ["EXPECT_IMAGE"]
KIB = 1024
MIB = 1024 * KIB
QD = 16


def connect():
    h = nbd.NBD()
    h.connect_uri(URI)
    return h


def main():
    rng = random.Random(int(os.environ.get("SEED", "4242")))
    hs = [connect() for _ in range(3)]
    if not hs[0].can_multi_conn():
        sys.exit("FAIL: server does not advertise multi-conn")
    for h in hs:
        assert h.get_size() == SIZE

    image = bytearray(SIZE)

    # 1. write on #1, flush on #2, read on #3
    for i in range(100):
        n = rng.choice([512, 4096, 65536])
        off = rng.randrange(0, (SIZE - n) // 512) * 512
        data = os.urandom(n)
        hs[0].pwrite(data, off)
        hs[1].flush()
        got = hs[2].pread(n, off)
        if got != data:
            sys.exit(f"FAIL: round {i}: read on connection 3 after write on 1 and flush on 2 "
                     f"differs ({n} bytes at {off})")
        image[off : off + n] = data
    print("  ok write on #1, flush on #2, read on #3: 100 rounds", flush=True)
    for h in hs:
        h.shutdown()

    # 2. four connections writing concurrently with aio, one flush, fresh verify
    region = 64 * KIB
    nconn = 4
    regions = SIZE // region
    plan = [[] for _ in range(nconn)]
    for r in range(regions):
        plan[r % nconn].append(r * region)  # interleaved: neighbours on other conns
    payload = {off: os.urandom(region) for offs in plan for off in offs}
    handles = [connect() for _ in range(nconn)]
    errors = []
    max_in_flight = [0] * nconn

    def writer(idx):
        h = handles[idx]
        try:
            bufs = {}
            order = plan[idx][:]
            rng_local = random.Random(idx)
            rng_local.shuffle(order)
            for off in order:
                while h.aio_in_flight() >= QD:
                    h.poll(-1)
                    retire(h, bufs)
                bufs[h.aio_pwrite(nbd.Buffer.from_bytearray(payload[off]), off)] = off
                max_in_flight[idx] = max(max_in_flight[idx], h.aio_in_flight())
                retire(h, bufs)
            while h.aio_in_flight() > 0:
                h.poll(-1)
                retire(h, bufs)
            retire(h, bufs)
            if bufs:
                raise RuntimeError(f"{len(bufs)} writes never retired")
        except Exception as e:  # noqa: BLE001
            errors.append(f"connection {idx}: {e}")

    def retire(h, bufs):
        while bufs:  # peek raises when nothing is unretired
            c = h.aio_peek_command_completed()
            if c <= 0:
                return
            h.aio_command_completed(c)  # raises if the write failed
            del bufs[c]

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(nconn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        if t.is_alive():
            sys.exit("FAIL: a writer thread did not finish within 120 s")
    if errors:
        sys.exit("FAIL: " + "; ".join(errors))
    print(f"  ok {regions} x 64 KiB writes over {nconn} connections, "
          f"max in flight per connection {max_in_flight}", flush=True)
    handles[0].flush()  # one flush, on one connection, covers all four
    for h in handles:
        h.shutdown()
    for off, data in payload.items():
        image[off : off + region] = data

    fresh = connect()
    step = 8 * MIB
    for off in range(0, SIZE, step):
        got = fresh.pread(step, off)
        if got != image[off : off + step]:
            bad = next(i for i in range(step) if got[i] != image[off + i])
            sys.exit(f"FAIL: fresh connection reads different data at offset {off + bad}")
    fresh.shutdown()
    print("  ok fresh connection after one flush sees all 64 MiB", flush=True)
    with open(EXPECT_IMAGE, "wb") as f:
        f.write(image)


if __name__ == "__main__":
    main()
