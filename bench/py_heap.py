"""A Python heap of MIB MiB of small objects, with a thread that watches the clock.

py_heap.py MIB: builds lists of (int, str) tuples until pymalloc holds about MIB MiB, starts a
thread that records the longest gap between two looks at the clock (the pause it suffered),
prints "ready BLOCKS", then reads commands: "reset" clears the longest gap, "gap" prints it in
microseconds, "exit" ends."""
import sys
import threading
import time

mib = int(sys.argv[1])
keep = []
while sys.getallocatedblocks() * 50 < mib << 20:
    keep.append([(i, str(i)) for i in range(100000)])
longest = 0.0


def watch():
    global longest
    last = time.monotonic()
    while True:
        t = time.monotonic()
        longest = max(longest, t - last)
        last = t


threading.Thread(target=watch, daemon=True).start()
sys.setswitchinterval(0.0005)
print("ready", sys.getallocatedblocks(), flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "reset":
        longest = 0.0
        print("ok", flush=True)
    elif cmd == "gap":
        print(int(longest * 1e6), flush=True)
    elif cmd == "exit":
        break
