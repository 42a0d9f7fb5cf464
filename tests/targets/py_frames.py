"""Target of leakprobe/tests/cpython_frames.rs: blocks in sys.stdin.readline() at a known
Python stack and prints, on one line of JSON, what the interpreter itself says that stack
is, innermost first:

- "frames": from sys._getframe(): id(f_code), co_qualname (3.11+) or co_name, co_name,
  co_filename, f_lineno;
- "stack": traceback.extract_stack() (reversed to innermost first);
- "entries": the functions that a C function called (each runs in its own C evaluation
  loop): <module> (run by the C main), the sort key (called by sorted()) and the generator
  (resumed by next());
- the main thread's ids, a worker thread's ids (blocked in worker()), and the version.

The stack: <module> -> main -> Klass.method -> grüße (Latin-1 name) -> 函数 (UCS-2 name)
-> sorted(key=𠀀 (UCS-4 name)) -> next(gen()) -> block, which prints and blocks on the same
line, so that the line of its frame is the same when printed and while blocked. The calls span several
lines, so that a position a few instructions off would name another line.
"""
import json
import sys
import threading
import traceback


def report(frame, stack):
    frames = []
    f = frame
    while f is not None:
        c = f.f_code
        frames.append(
            {
                "code": id(c),
                "function": getattr(c, "co_qualname", c.co_name),
                "name": c.co_name,
                "file": c.co_filename,
                "line": f.f_lineno,
            }
        )
        f = f.f_back
    return json.dumps(
        {
            "version": list(sys.version_info[:3]),
            "native_tid": threading.get_native_id(),
            "pthread": threading.get_ident(),
            "frames": frames,
            "stack": [{"file": s.filename, "line": s.lineno, "name": s.name} for s in reversed(stack)],
            "entries": ["<module>", "𠀀", "gen"],
            "worker_native_tid": WORKER["native_tid"],
            "worker_pthread": WORKER["pthread"],
        }
    )


def block(a, b):
    print(report(sys._getframe(), traceback.extract_stack())); sys.stdout.flush(); sys.stdin.readline()  # noqa: E702


def gen(a, b):
    block(
        a,
        b)
    yield 1


def 𠀀(x):
    return next(
        gen(
            x,
            x))


def 函数():
    return sorted(
        [1],
        key=𠀀,
    )


def grüße(a, b):
    return 函数(
    )


class Klass:
    def method(self, a):
        return grüße(
            a,
            a + 1)


WORKER = {}
WORKER_READY = threading.Event()
WORKER_STOP = threading.Event()


def worker():
    WORKER["native_tid"] = threading.get_native_id()
    WORKER["pthread"] = threading.get_ident()
    WORKER_READY.set()
    WORKER_STOP.wait()


def main():
    # A second thread, started first: the main thread's state is then not the head of the
    # interpreter's thread list (new states go in front), so finding it follows `next`.
    threading.Thread(target=worker, daemon=True).start()
    WORKER_READY.wait()
    k = Klass()
    k.method(
        1)


main()
