"""Four threads allocating and freeing Python objects without pause: dicts, tuples, strings,
lists that grow (realloc), bytearrays on both sides of pymalloc's 512-byte limit, and a
bounded set of objects kept for a while. Every object is checked after it is built.

Prints `ready` once the threads run. On stdin: `check` prints `ok N` (N objects checked so
far) or `errors ...`; `trace` and `untrace` start and stop tracemalloc (which wraps the
allocator tables); `exit` stops the threads, checks the kept objects once more, prints
`bye N` and exits 0 (1 if anything was wrong).
"""
import sys
import threading

THREADS = 4
stop = threading.Event()
checked = [0] * THREADS
errors = []


def build(k, i):
    d = {"k": k, "i": i, "s": "x%d" % i}
    t = tuple(range(i % 17))
    parts = [str(j) for j in range(i % 23)]
    grown = []
    for j in range(i % 40):
        grown.append((j, k))
    b = bytearray(i % 700)
    b.extend(b"y" * (i % 50))
    s = "-".join(parts)
    return d, t, parts, grown, b, s


def verify(k, i, obj):
    d, t, parts, grown, b, s = obj
    return (
        d["s"] == "x%d" % i
        and d["k"] == k
        and t == tuple(range(i % 17))
        and parts == [str(j) for j in range(i % 23)]
        and len(grown) == i % 40
        and len(b) == i % 700 + i % 50
        and s == "-".join(parts)
    )


def work(k):
    kept = {}
    i = 0
    while not stop.is_set():
        obj = build(k, i)
        if not verify(k, i, obj):
            errors.append((k, i))
        kept[i % 500] = (i, obj)
        i += 1
        checked[k] = i
    for i, obj in kept.values():
        if not verify(k, i, obj):
            errors.append((k, i, "kept"))


threads = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
for t in threads:
    t.start()
print("ready", flush=True)
for line in sys.stdin:
    word = line.strip()
    if word == "check":
        print("errors %r" % errors[:5] if errors else "ok %d" % sum(checked), flush=True)
    elif word == "trace":
        import tracemalloc

        tracemalloc.start()
        print("tracing", flush=True)
    elif word == "untrace":
        import tracemalloc

        tracemalloc.stop()
        print("untraced", flush=True)
    elif word == "exit":
        break
stop.set()
for t in threads:
    t.join()
print("errors %r" % errors[:5] if errors else "bye %d" % sum(checked), flush=True)
sys.exit(1 if errors else 0)
