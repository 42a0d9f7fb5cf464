"""An allocation-heavy CPython workload for the benchmark harness (bench/harness.py).

py_alloc.py SECONDS: warms up, prints "ready", waits for a line on stdin (the harness attaches
a tracer meanwhile), then allocates for SECONDS and prints "OPS ops/s BYTES malloc-B/op": the
second figure is the mean size of the objects over 512 B (pymalloc's limit: those are the
ones malloc serves) per op, what --sample-bytes counts down.

One op builds one object of a mixed kind (bytes, str, bytearray, list, tuple, dict) whose
size is drawn log-uniformly from 16 B to 64 KiB (small ones from pymalloc's arenas, those
over 512 B from malloc): most are dropped at once, one in 64 replaces a slot of a 4096-slot
ring (outstanding, bounded), and one in 4096 is kept for good (a slow leak).
"""
import math
import random
import select
import sys
import time

rng = random.Random(1234)
SIZES = [int(math.exp(rng.uniform(math.log(16), math.log(65536)))) for _ in range(4096)]
ring = [None] * 4096
kept = []


def make(i, n):
    kind = i % 6
    if kind == 0:
        return b"x" * n
    if kind == 1:
        return "y" * n
    if kind == 2:
        return bytearray(n)
    if kind == 3:
        return [i] * (n // 8 + 1)
    if kind == 4:
        return tuple(range(n // 64 + 1))
    return {k: i for k in range(n // 256 + 1)}


def run(seconds):
    ops = 0
    i = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        for _ in range(1024):
            o = make(i, SIZES[i & 4095])
            if i % 64 == 0:
                ring[(i >> 6) & 4095] = o
            if i % 4096 == 0:
                kept.append(o)
            i += 1
        ops += 1024
        now = time.perf_counter()
        if now >= end:
            return ops / (now - t0)


def malloc_bytes_per_op():
    n = 6 * len(SIZES)  # every (kind, size) pair once
    return sum(s for s in (sys.getsizeof(make(i, SIZES[i & 4095])) for i in range(n)) if s > 512) / n


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    per_op = malloc_bytes_per_op()
    run(0.3)  # warm-up: arenas, the ring filled
    print("ready", flush=True)
    # Waiting, a small allocation every 50 ms: an injector that breaks on malloc to get in
    # (memray attach through lldb) finds one.
    while not select.select([sys.stdin], [], [], 0.05)[0]:
        bytearray(1024)
    if not sys.stdin.readline():
        return
    print(f"{run(seconds):.0f} ops/s {per_op:.0f} malloc-B/op", flush=True)
    sys.stdin.readline()  # the harness kills us; a closed stdin ends us


if __name__ == "__main__":
    main()
