"""A Python program whose objects the census counts (tests/python_objects.rs).

py_objects.py TRUTH_FILE [BURSTS [gc-on]]: runs BURSTS bursts (default 3), each keeping
- 1000 two-object cycles of Node (the cycle collector is off: gc.disable()),
- 5000 small tuples in a registry dict,
- 200 bytearrays of 48 KiB in a global dict cache,
- 100 closures in a listeners list,
then (with gc-on: turns the collector on and collects, which frees the cycles) writes its
own ground truth to TRUTH_FILE (gc.get_objects() counted by type as
"module.qualname count" lines, and "sys.getallocatedblocks N": pymalloc's blocks in use),
prints
"ready" and idles without making objects until killed.
"""
import gc
import sys
import time

gc.disable()


class Node:
    def __init__(self, name):
        self.name = name
        self.peer = None


cache = {}
registry = {}
listeners = []


def make_cycles(burst):
    keep = []
    for i in range(1000):
        a, b = Node(i), Node(-i)
        a.peer, b.peer = b, a
        keep.append(a)
    # Dropped: the cycles are now reachable only from each other.
    del keep


def fill_registry(burst):
    for i in range(5000):
        registry[(burst, i)] = (i, i + 1)


def fill_cache(burst):
    for i in range(200):
        cache[f"user-{burst}-{i}"] = bytearray(48 * 1024)


def add_listeners(burst):
    for i in range(100):
        def handler(event, i=i, burst=burst):
            return event, i, burst
        listeners.append(handler)


def truth(path):
    import os
    counts = {}
    objects = gc.get_objects()
    for o in objects:
        t = type(o)
        key = f"{t.__module__}.{t.__qualname__}"
        counts[key] = counts.get(key, 0) + 1
    del objects, o, t
    lines = [f"{k} {n}\n" for k, n in sorted(counts.items())]
    # pymalloc's own count of its blocks in use, once the list above is gone.
    lines.append(f"sys.getallocatedblocks {sys.getallocatedblocks()}\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.rename(path + ".tmp", path)


def main():
    path = sys.argv[1]
    bursts = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    for b in range(bursts):
        make_cycles(b)
        fill_registry(b)
        fill_cache(b)
        add_listeners(b)
    if len(sys.argv) > 3 and sys.argv[3] == "gc-on":
        gc.enable()
        gc.collect()
    truth(path)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)


main()
