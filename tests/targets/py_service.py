"""A Python service with the leaks of a real one, driven on stdin (one command per line).

`burst N` runs N requests; each request:
  - caches a 48 KiB bytearray per user in a global dict  (cache_user)
  - appends a row of 1000 ints to a global list          (add_row)
  - keeps small tuples and strings in a registry dict    (register)
  - appends a closure to a listeners list                (listen)
  - makes temporaries that are all freed                 (scratch)
  - parses a JSON body whose object hook keeps a buffer   (parse -> _json -> keep): the C
    extension's frames sit between two Python frames
then prints `done N` and, with `--tracemalloc` on the command line, tracemalloc's
`compare_to(before, 'lineno')` for this file as JSON lines `{"line": L, "size": B, "count": C}`
before `done`. `threads N` runs the burst in N threads at once (the leaks are shared).
With `--burst-after SECONDS N` it runs one burst of N after SECONDS, waits 1.5 s, then exits
with no finalization (for `run`).
"""
import json
import sys
import threading

TRACE = "--tracemalloc" in sys.argv
if TRACE:
    import tracemalloc

    tracemalloc.start(1)

cache = {}
rows = []
registry = {}
listeners = []
kept = []
PAYLOAD = json.dumps([{"user": i} for i in range(4)])


def cache_user(user):
    cache[user] = bytearray(48 * 1024)


def add_row():
    rows.append([0] * 1000)


def register(user):
    registry[user] = (user, "user-%d" % user, (user, user + 1))


def listen(user):
    listeners.append(lambda event: (user, event))


def scratch():
    tmp = bytearray(64 * 1024)
    parts = [str(i) for i in range(200)]
    return len(tmp) + len(parts)


def keep(obj):
    kept.append(bytearray(16 * 1024))
    return obj


def parse(user):
    return json.loads(PAYLOAD, object_hook=keep)


def handle(user):
    cache_user(user)
    add_row()
    register(user)
    listen(user)
    scratch()
    parse(user)


def burst(start, n):
    for user in range(start, start + n):
        handle(user)


def report(before):
    after = tracemalloc.take_snapshot()
    me = tracemalloc.Filter(True, __file__)
    for stat in after.filter_traces([me]).compare_to(before.filter_traces([me]), "lineno"):
        frame = stat.traceback[0]
        print(json.dumps({"line": frame.lineno, "size": stat.size_diff, "count": stat.count_diff}))


def main():
    next_user = 0
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        before = tracemalloc.take_snapshot() if TRACE else None
        if words[0] == "burst":
            n = int(words[1])
            burst(next_user, n)
            next_user += n
        elif words[0] == "threads":
            k, n = int(words[1]), int(words[2])
            workers = [threading.Thread(target=burst, args=(next_user + i * n, n)) for i in range(k)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            next_user += k * n
        elif words[0] == "exit":
            return
        if before is not None:
            report(before)
        print("done", words[0], flush=True)


if "--burst-after" in sys.argv:
    at = sys.argv.index("--burst-after")
    import time

    time.sleep(float(sys.argv[at + 1]))
    burst(0, int(sys.argv[at + 2]))
    # Alive a little longer (a tracer names the Python frames while the process is there), then
    # no interpreter finalization: what the burst keeps is still held at the exit.
    time.sleep(1.5)
    import os

    os._exit(0)
else:
    main()
