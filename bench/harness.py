#!/usr/bin/env python3
"""leakprobe's benchmark harness: `cargo xtask bench` (root).

Measures, in one run, side by side and interleaved (round 1: every configuration, round 2:
every configuration, ...; medians reported):
  * an allocation-heavy loop (bench/alloc_loop.c, -O2 without frame pointers, 16 calls deep,
    1 and 2 threads): ns per malloc+free pair with no tracer, the no-op uprobe floor on the
    same hooks (`leakprobe --noop`), leakprobe full tracking, leakprobe sampled (512 KiB),
    and `heaptrack -p`;
  * Debian's nginx driven by wrk on loopback: requests/s and p99 latency, same tracers;
  * leakprobe's own CPU time and peak RSS while tracking 1M outstanding blocks;
  * time from launching `leakprobe attach` to probes live and to the first report, and
    detach time;
  * the target's pauses when the in-process stub is installed and removed, at 4 and 64
    threads;
  * the reachability scan: the target's pause (seen by a thread of its own spinning on the
    clock) and the whole scan's time, for heaps of 64 MiB and 1 GiB at 4 and 64 threads.
  * a 10-minute soak (BENCH_ONLY=soak, or SOAK_S seconds): 1M outstanding blocks churning at
    64 call sites while leakprobe stays attached with --metrics scraped every 10 s; its RSS
    over time, which must stay flat after the first minute.
  * CPython (Debian's python3.11): an allocation-heavy loop (bench/py_alloc.py, ops/s) and an
    http.server (bench/py_http.py) under wrk (requests/s, p99), with no tracer, leakprobe
    in-process sampled (Python frames), leakprobe exact, `heaptrack -p` and `memray attach`
    (from PyPI, in a venv of that python3.11 at MEMRAY_VENV, /var/tmp/leakprobe-bench-venv,
    made here if missing); goal: sampled in-process keeps >= 90% of the baseline on both.
    A tracer that cannot run gets a row saying why.
  * several processes (BENCH_ONLY=processes): attach time for 1 and for 64 workers of one
    build, what following children costs a spawning parent (fork+exec, fork, vfork), and
    nginx with 4 workers followed with --children under wrk (uprobes, and in-process).
BENCH_ONLY=scan (or soak, python, pycensus, node, processes; or `harness.py --only NAME`) runs only that one (and updates only its block of docs/benchmarks.md).
node: NODE_SNAPSHOT_MIB=100,1024 picks the snapshot heaps, NODE_SNAPSHOT_ROUNDS their rounds (a 1 GiB snapshot stops Node for ~100 s).
Writes the tables into docs/benchmarks.md between the harness markers and prints them.
"""
import os, re, resource, shutil, signal, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LP = os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "release/leakprobe")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
PAIRS = 100_000
WORK = tempfile.mkdtemp(prefix="leakprobe-bench-")


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


class TracerError(Exception):
    """A tracer that could not be started on the target: its own words, for the table's row."""


def _kill(p):
    """Ends a tracer we started: its whole process group when it has one of its own
    (heaptrack's shell, its zstd and the fifo it would wait on forever after a failed
    injection)."""
    if getattr(p, "group", False):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for f in (f"/tmp/heaptrack_fifo{p.pid}",):
            if os.path.exists(f):
                os.remove(f)
    elif p.poll() is None:
        p.kill()
    p.wait()


def _watch(p, stream, marker, timeout, kind):
    """Reads stream (drained to its end by a thread, so that the tracer never blocks on a full
    pipe) until a line containing marker; raises TracerError with the tracer's last words if
    it exits or stays silent for timeout seconds first."""
    import threading
    p.lines, found = [], threading.Event()

    def drain():
        for line in stream:
            p.lines.append(line.rstrip())
            if marker in line:
                found.set()
        found.set()
    p.drainer = threading.Thread(target=drain, daemon=True)
    p.drainer.start()
    if not found.wait(timeout) or not any(marker in line for line in p.lines):
        _kill(p)
        last = [line for line in p.lines if line.strip()][-3:]
        raise TracerError(f"{kind} did not start ({'timed out' if p.returncode == -9 else f'exit {p.returncode}'}): "
                          + (" / ".join(last) or "no output"))


MEMRAY_VENV = os.environ.get("MEMRAY_VENV", "/var/tmp/leakprobe-bench-venv")
# How memray attach gets in: gdb, then lldb if gdb cannot call into the target (python_table
# drops a method that failed, and says why).
MEMRAY_METHODS = ["gdb", "lldb"]


def start_tracer(kind, pid):
    """Starts a tracer on pid; returns a handle once its probes are live. Raises TracerError
    (or FileNotFoundError when the tracer is not installed) if it cannot get there."""
    if kind == "none":
        return None
    if kind == "heaptrack":
        p = subprocess.Popen(["heaptrack", "-p", str(pid)], cwd=WORK, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        p.group = True
        _watch(p, p.stdout, "injection finished", 120, "heaptrack -p")
        # heaptrack says "injection finished" even when gdb could not call into the target.
        failed = [line for line in p.lines if "No symbol \"heaptrack_inject\"" in line
                  or line.startswith(("Couldn't", "Cannot", "warning: Error"))]
        if failed:
            _kill(p)
            raise TracerError("heaptrack -p: injection through gdb failed: " + " / ".join(dict.fromkeys(failed)))
        return p
    if kind == "memray":
        # memray attach injects itself through a debugger and runs `import memray` in the target,
        # so the target must be the venv's interpreter; -o: the tracker writes a file and
        # the command returns once tracking runs (without it, a live TUI).
        memray = os.path.join(MEMRAY_VENV, "bin/memray")
        if not os.path.exists(memray):
            raise TracerError(f"memray not installed in {MEMRAY_VENV}")
        out = os.path.join(WORK, f"memray-{pid}.bin")
        method = MEMRAY_METHODS[0]
        # Its own session: on a timeout the debugger it started goes too.
        m = subprocess.Popen([memray, "attach", "--verbose", "--method", method, "-f", "-o", out, str(pid)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        m.group = True
        try:
            text, _ = m.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            _kill(m)
            try:
                os.kill(pid, signal.SIGCONT)  # a debugger killed while it held the target
            except ProcessLookupError:
                pass
            raise TracerError(f"memray attach --method {method}: no answer in 120 s")
        r = subprocess.CompletedProcess(m.args, m.returncode, text, "")
        if r.returncode != 0:
            text = r.stdout + r.stderr
            # --verbose has the debugger's own words: the line that stopped it.
            cause = [line for line in text.splitlines() if re.search(r"^(Error|Couldn't|Cannot|error:|warning:)|"
                                                                     r"not found|Permission", line.strip())]
            last = [line for line in text.splitlines() if line.strip()][-1:]
            raise TracerError(f"memray attach --method {method} failed (exit {r.returncode}): "
                              + " / ".join(dict.fromkeys(line.strip() for line in cause[-3:] + last)))
        return r
    args = {"noop": ["--noop"], "full": [], "sampled": ["--sample-bytes", "512KiB"],
            "inproc_full": ["--in-process"],
            "inproc_sampled": ["--in-process", "--sample-bytes", "512KiB"],
            "inproc_stub_only": ["--in-process", "--sample-bytes", "1TiB"],
            "inproc_sampled_prev": ["--in-process", "--sample-bytes", "512KiB"]}[kind]
    lp = os.environ["LP_PREV"] if kind == "inproc_sampled_prev" else LP
    p = subprocess.Popen([lp, "attach", "--pid", str(pid), "--interval", "2s"] + args,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _watch(p, p.stderr, "attached", 120, "leakprobe")
    return p


def stop_tracer(kind, p):
    if p is None:
        return
    if kind in ("heaptrack", "memray"):
        return  # ends with its target
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill(); p.wait()
    p.drainer.join(timeout=10)


TRACERS = [("none", "no tracer"), ("noop", "no-op uprobes on the same hooks (naive floor)"),
           ("full", "leakprobe, full tracking"), ("sampled", "leakprobe --sample-bytes 512KiB"),
           ("inproc_full", "leakprobe --in-process (exact)"),
           ("inproc_sampled", "leakprobe --in-process --sample-bytes 512KiB"),
           ("heaptrack", "heaptrack -p")]


def loop_once(loop, kind, threads):
    p = subprocess.Popen([loop, str(PAIRS), "16", str(threads)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    try:
        t = start_tracer(kind, p.pid)
    except (TracerError, FileNotFoundError) as e:
        p.kill(); p.wait()
        return e
    p.stdin.write("go\n"); p.stdin.flush()
    ns = float(p.stdout.readline().split()[0])
    if kind == "heaptrack":
        p.kill(); p.wait(); t.wait()
    else:
        stop_tracer(kind, t)
        p.kill(); p.wait()
    return ns


def failed(values):
    """Why a tracer's rounds could not be measured (its first failure), or None."""
    errs = [v for v in values if isinstance(v, Exception)]
    return str(errs[0]) if errs else None


def alloc_loop_table():
    loop = os.path.join(WORK, "alloc_loop")
    sh("gcc", "-O2", "-pthread", "-o", loop, os.path.join(ROOT, "bench/alloc_loop.c"))
    rows, ratios = [], []
    for threads in (1, 2):
        res = {k: [] for k, _ in TRACERS}
        for _ in range(ROUNDS):
            for kind, _ in TRACERS:
                res[kind].append(loop_once(loop, kind, threads))
        base = statistics.median(res["none"])
        floor = statistics.median(res["noop"])
        for kind, label in TRACERS:
            if (why := failed(res[kind])) is not None:
                rows.append(f"| {threads} | {label} | not measured: {why} | | | |")
                continue
            m = statistics.median(res[kind])
            added = m - base
            rows.append(f"| {threads} | {label} | {m:.1f} | {added:.1f} | "
                        f"{(added / (floor - base)) if kind != 'none' else 0:.2f} | {m / base:.0f}x |")
        ips = statistics.median(res["inproc_sampled"]) - base
        ipf = statistics.median(res["inproc_full"]) - base
        vs_heaptrack = ("n/a (heaptrack -p not measured)" if failed(res["heaptrack"]) is not None
                        else f"{ips / (statistics.median(res['heaptrack']) - base):.3f} (goal <= 0.1)")
        ratios.append(f"| {threads} | {vs_heaptrack} | {ipf / (floor - base):.2f} (goal <= 0.5) |")
    head = ("| threads | configuration | ns per pair (median) | added ns | added / naive floor's added | slowdown |\n"
            "|---|---|---|---|---|---|")
    goals = ("| threads | in-process sampled added / heaptrack -p added | in-process exact added / naive floor's added |\n"
             "|---|---|---|")
    return head + "\n" + "\n".join(rows) + "\n\n" + goals + "\n" + "\n".join(ratios)


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {work};
  proxy_temp_path {work};
  fastcgi_temp_path {work};
  uwsgi_temp_path {work};
  scgi_temp_path {work};
  server {{
    listen 127.0.0.1:18089;
    location / {{ root {work}/www; }}
  }}
}}
"""


def server_table(res, rate_label, p99_label):
    """res: tracer kind -> [(requests/s, p99 ms)] per round. Medians, relative to no tracer."""
    base = statistics.median(r for r, _ in res["none"])
    rows = []
    for kind, label in TRACERS:
        if kind not in res:
            continue
        if (why := failed(res[kind])) is not None:
            rows.append(f"| {label} | not measured: {why} | | |")
            continue
        rps = statistics.median(r for r, _ in res[kind])
        p99 = statistics.median(p for _, p in res[kind])
        rows.append(f"| {label} | {rps:.0f} | {100 * rps / base:.1f}% | {p99:.2f} |")
    return f"| configuration | {rate_label} | of baseline | {p99_label} |\n|---|---|---|---|\n" + "\n".join(rows)


def nginx_table():
    if not shutil.which("nginx") or not shutil.which("wrk"):
        return "(nginx or wrk missing: `apt-get install nginx-light wrk`)"
    os.makedirs(os.path.join(WORK, "www"), exist_ok=True)
    with open(os.path.join(WORK, "www/index.html"), "w") as f:
        f.write("x" * 2048)
    conf = os.path.join(WORK, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(work=WORK))
    res = {k: [] for k, _ in TRACERS if k != "noop"}
    for _ in range(max(2, ROUNDS - 1)):
        for kind in res:
            master = subprocess.Popen(["nginx", "-c", conf], stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            worker = int(subprocess.run(["pgrep", "-P", str(master.pid)], capture_output=True,
                                        text=True).stdout.split()[0])
            try:
                t = start_tracer(kind, worker)
            except (TracerError, FileNotFoundError) as e:
                res[kind].append(e)
                master.send_signal(signal.SIGQUIT); master.wait()
                continue
            out = subprocess.run(["wrk", "-t2", "-c32", "-d8s", "--latency", "http://127.0.0.1:18089/"],
                                 capture_output=True, text=True).stdout
            rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
            p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
            p99_ms = float(p99.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[p99.group(2)]
            res[kind].append((rps, p99_ms))
            if kind == "heaptrack":
                master.send_signal(signal.SIGQUIT); master.wait(); t.wait()
            else:
                stop_tracer(kind, t)
                master.send_signal(signal.SIGQUIT); master.wait()
    return server_table(res, "requests/s (median)", "p99 latency ms")


def redis_table():
    if not shutil.which("redis-server") or not shutil.which("redis-benchmark"):
        return "(redis missing: `apt-get install redis-server redis-tools`)"
    port = "26390"
    res = {k: [] for k, _ in TRACERS if k != "noop"}
    for _ in range(max(2, ROUNDS - 1)):
        for kind in res:
            srv = subprocess.Popen(["redis-server", "--port", port, "--save", "", "--appendonly", "no",
                                    "--dir", WORK], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(50):
                if subprocess.run(["redis-cli", "-p", port, "ping"], capture_output=True,
                                  text=True).stdout.strip() == "PONG":
                    break
                time.sleep(0.1)
            try:
                t = start_tracer(kind, srv.pid)
            except (TracerError, FileNotFoundError) as e:
                res[kind].append(e)
                srv.terminate(); srv.wait()
                continue
            out = subprocess.run(["redis-benchmark", "-p", port, "-t", "set,get", "-n", "200000", "-c", "32",
                                  "-d", "256", "-r", "100000", "--csv"], capture_output=True, text=True).stdout
            rows = [line.replace('"', "").split(",") for line in out.splitlines()[1:] if line.strip()]
            rps = statistics.mean(float(r[1]) for r in rows)
            p99 = max(float(r[6]) for r in rows)
            res[kind].append((rps, p99))
            if kind == "heaptrack":
                srv.terminate(); srv.wait(); t.wait()
            else:
                stop_tracer(kind, t)
                srv.terminate(); srv.wait()
    return server_table(res, "SET+GET requests/s (median of mean)", "p99 latency ms (worse of SET, GET)")


MANY = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static void *volatile keep[1000000];
int main(void) { char l[16]; setvbuf(stdout, NULL, _IONBF, 0); printf("ready\n");
  while (fgets(l, sizeof l, stdin)) { if (!strncmp(l, "go", 2)) {
    for (int i = 0; i < 1000000; i++) keep[i] = malloc(64); printf("done\n"); } else break; } }
"""


def own_cost_table():
    src = os.path.join(WORK, "many.c")
    with open(src, "w") as f:
        f.write(MANY)
    exe = os.path.join(WORK, "many")
    sh("gcc", "-O2", "-o", exe, src)
    p = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    t0 = time.monotonic()
    lp = subprocess.Popen([LP, "attach", "--pid", str(p.pid), "--interval", "5s", "--duration", "12s",
                           "--format", "json"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in lp.stderr:
        if "attached" in line:
            break
    attach_s = time.monotonic() - t0
    p.stdin.write("go\n"); p.stdin.flush(); p.stdout.readline()
    lp.stderr.read()
    _, status, ru = os.wait4(lp.pid, 0)
    p.kill(); p.wait()
    cpu = ru.ru_utime + ru.ru_stime
    rss_mib = ru.ru_maxrss / 1024
    return (f"| tracking 1 000 000 outstanding blocks (12 s, samples every 5 s) | CPU {cpu:.1f} s | "
            f"peak RSS {rss_mib:.0f} MiB | attach {attach_s:.1f} s |")


SPIN = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
void *volatile sink;
#include <unistd.h>
static int duty;
/* busy: allocate without pause; duty: like request handlers, 200 pairs then 1 ms asleep. */
static void *spin(void *a) { (void)a; for (int i = 0;; i++) { void *p = malloc(64); sink = p; free(p);
  if (duty && i % 200 == 0) usleep(1000); } return 0; }
int main(int argc, char **argv) { int n = atoi(argv[1]); duty = argc > 2; pthread_t t;
  for (int i = 0; i < n; i++) pthread_create(&t, 0, spin, 0);
  setvbuf(stdout, NULL, _IONBF, 0); printf("ready\n"); getchar(); return 0; }
"""


def pause_table():
    """The target's pauses when the in-process stub goes in (map, then patch) and comes out,
    with every thread busy allocating: leakprobe measures each from the first interrupt to
    the last thread resumed."""
    src = os.path.join(WORK, "spin.c")
    with open(src, "w") as f:
        f.write(SPIN)
    exe = os.path.join(WORK, "spin")
    sh("gcc", "-O2", "-pthread", "-o", exe, src)
    rows = []
    for threads, mode in ((4, "busy"), (64, "busy"), (4, "duty"), (64, "duty")):
        maps, patches, restores = [], [], []
        for _ in range(ROUNDS):
            argv = [exe, str(threads)] + (["duty"] if mode == "duty" else [])
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            p.stdout.readline()
            out = subprocess.run([LP, "attach", "--pid", str(p.pid), "--in-process", "--duration", "1s",
                                  "--interval", "1s", "--format", "json"], capture_output=True, text=True)
            import json
            ip = json.loads(out.stdout)["in_process"]
            maps.append(ip["map_pause_ms"]); patches.append(ip["patch_ms"])
            restores.append(ip["restore_pause_ms"] or float("nan"))
            p.kill(); p.wait()
        med = statistics.median
        what = "allocating without pause" if mode == "busy" else "200 pairs, then 1 ms asleep"
        rows.append(f"| {threads} + main, {what} | {med(maps):.1f} | {med(patches):.1f} | {med(restores):.1f} | "
                    f"{max(maps + restores):.1f} |")
    return ("| threads | pause: map stub, ms (median) | write GOT slots (no stop), ms | pause: restore GOT, ms | longest pause of all rounds, ms |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows))


SCAN_TARGET = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
/* scan_heap MIB THREADS: THREADS-1 idle threads (server-like, blocked), one thread spinning on
 * the clock that records the longest gap it sees (the pause it suffered). "alloc" builds a
 * heap of MIB MiB of 64 B-4 KiB blocks: nine in ten kept in a global list, one in ten dropped.
 * "reset" clears the longest gap; "gap" prints it in microseconds. */
struct node { struct node *next; };
struct node *kept;
static volatile long long longest;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static long long now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }
static void *idle(void *a) { (void)a; pthread_mutex_lock(&mu); for (;;) pthread_cond_wait(&cv, &mu); return 0; }
static void *clockwatch(void *a) { (void)a; long long last = now_ns(); for (;;) { long long t = now_ns();
  if (t - last > longest) longest = t - last; last = t; } return 0; }
int main(int argc, char **argv) { long mib = atol(argv[1]); int n = atoi(argv[2]); pthread_t t;
  for (int i = 0; i < n - 1; i++) pthread_create(&t, 0, idle, 0);
  pthread_create(&t, 0, clockwatch, 0);
  setvbuf(stdout, NULL, _IONBF, 0); printf("ready\n"); char line[32]; unsigned r = 12345;
  while (fgets(line, sizeof line, stdin)) {
    if (!strncmp(line, "alloc", 5)) { long long left = mib << 20; long blocks = 0;
      while (left > 0) { r = r * 1103515245 + 12345; size_t sz = 64 + (r >> 8) % 4032;
        struct node *b = malloc(sz); memset(b, 0, sz); left -= sz; blocks++;
        if (blocks % 10) { b->next = kept; kept = b; } }
      printf("allocated %ld\n", blocks); }
    else if (!strncmp(line, "reset", 5)) { longest = 0; printf("ok\n"); }
    else if (!strncmp(line, "gap", 3)) printf("%lld\n", longest / 1000);
    else if (!strncmp(line, "exit", 4)) return 0; }
  return 0; }
"""


def scan_table():
    """The reachability scan: the pause a thread of the target sees while leakprobe scans it
    (capture and reap), and the scan's own time, per heap size and thread count."""
    import json
    src = os.path.join(WORK, "scan_heap.c")
    with open(src, "w") as f:
        f.write(SCAN_TARGET)
    exe = os.path.join(WORK, "scan_heap")
    sh("gcc", "-O2", "-pthread", "-o", exe, src)
    rows, census_rows = [], []
    for mib, threads in ((64, 4), (64, 64), (1024, 4), (1024, 64)):
        seen, pauses, reaps, totals, blocks = [], [], [], [], []
        c_pause, c_total, c_seen, c_chunks = [], [], [], []
        for _ in range(ROUNDS):
            p = subprocess.Popen([exe, str(mib), str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
            p.stdout.readline()
            out = os.path.join(WORK, "scan.json")
            lp = subprocess.Popen([LP, "attach", "--pid", str(p.pid), "--scan", "--interval", "1s", "--format", "json",
                                   "--output", out, "--force"], stderr=subprocess.PIPE, text=True)
            for line in lp.stderr:
                if "attached" in line:
                    break
            p.stdin.write("alloc\n"); p.stdin.flush(); p.stdout.readline()
            p.stdin.write("reset\n"); p.stdin.flush(); p.stdout.readline()
            lp.send_signal(signal.SIGINT)
            lp.stderr.read()
            lp.wait()
            p.stdin.write("gap\n"); p.stdin.flush()
            seen.append(int(p.stdout.readline()) / 1000)
            sc = json.load(open(out))["scan"]
            pauses.append(sc["pause_ms"]); reaps.append(sc["reap_pause_ms"]); totals.append(sc["duration_ms"] / 1000)
            blocks.append(sc["blocks_scanned"])
            # The census of the same heap, nothing tracked: every chunk walked and classified.
            p.stdin.write("reset\n"); p.stdin.flush(); p.stdout.readline()
            cen = subprocess.run([LP, "census", "--pid", str(p.pid), "--format", "json"], capture_output=True, text=True)
            cs = json.loads(cen.stdout)["scan"]
            p.stdin.write("gap\n"); p.stdin.flush()
            c_seen.append(int(p.stdout.readline()) / 1000)
            c_pause.append(cs["pause_ms"]); c_total.append(cs["duration_ms"] / 1000)
            c_chunks.append(cs["census"]["in_use"]["count"])
            p.stdin.write("exit\n"); p.stdin.flush(); p.wait()
        med = statistics.median
        rows.append(f"| {mib} MiB, {med(blocks):,.0f} blocks | {threads} | {med(pauses):.1f} | {med(reaps):.1f} | "
                    f"{med(seen):.1f} (max {max(seen):.1f}) | {med(totals):.2f} s ({med(totals) * 1024 / mib:.1f} s/GiB) |")
        census_rows.append(f"| {mib} MiB, {med(c_chunks):,.0f} chunks in use | {threads} | {med(c_pause):.1f} | "
                           f"{med(c_seen):.1f} (max {max(c_seen):.1f}) | {med(c_total):.2f} s |")
    return ("| heap | threads | pause: capture (stop, registers, clone), ms | pause: reap, ms | longest gap a "
            "spinning thread of the target saw, ms | whole scan |\n|---|---|---|---|---|---|\n" + "\n".join(rows)
            + "\n\n`leakprobe census --pid` of the same heaps (every chunk walked and classified) "
            ":\n\n| heap | threads | pause: capture, ms | longest gap the target "
            "saw, ms | census (capture to release) |\n|---|---|---|---|---|\n" + "\n".join(census_rows))


SOAK_TARGET = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define SLOTS 1000000
static void *slot[SLOTS];
void *volatile sink;
/* 64 call sites: the same allocation reached through 0..63 frames of recursion. */
__attribute__((noinline)) void *site(int depth, size_t n) {
  if (depth > 0) { void *p = site(depth - 1, n); __asm__ volatile("" ::: "memory"); return p; }
  void *p = malloc(n); memset(p, 1, n < 64 ? n : 64); return p;
}
static unsigned long long rng = 88172645463325252ULL;
static unsigned long long next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }
int main(int argc, char **argv) {
  long rate = argc > 1 ? atol(argv[1]) : 50000; /* churn pairs per second */
  for (long i = 0; i < SLOTS; i++) slot[i] = site(i % 64, 16 + i % 240);
  setvbuf(stdout, NULL, _IONBF, 0); printf("ready\n");
  struct timespec nap = {0, 1000000}; /* 1 ms */
  long per_ms = rate / 1000;
  unsigned long long ops = 0;
  for (;;) {
    for (long k = 0; k < per_ms; k++) {
      unsigned long long r = next();
      long i = r % SLOTS;
      free(slot[i]);
      slot[i] = site((r >> 20) % 64, 16 + (r >> 32) % 496);
      ops++;
    }
    nanosleep(&nap, NULL);
  }
}
"""


def pycensus_table():
    """The Python object census and marking of a large CPython heap (Debian python3.11): the
    target's pause, the longest gap a thread of it saw, the scan's time and leakprobe's peak
    memory."""
    import json
    rows = []
    for mib in (64, 1024):
        pauses, seen, totals, rss, objects = [], [], [], [], []
        for _ in range(ROUNDS):
            p = subprocess.Popen(["python3.11", os.path.join(ROOT, "bench/py_heap.py"), str(mib)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            p.stdout.readline()
            p.stdin.write("reset\n"); p.stdin.flush(); p.stdout.readline()
            out = os.path.join(WORK, "pyscan.json")
            lp = subprocess.Popen([LP, "attach", "--pid", str(p.pid), "--scan", "--duration", "1s", "--format",
                                   "json", "--output", out, "--force"], stderr=subprocess.DEVNULL)
            _, status, usage = os.wait4(lp.pid, 0)
            p.stdin.write("gap\n"); p.stdin.flush()
            seen.append(int(p.stdout.readline()) / 1000)
            p.stdin.write("exit\n"); p.stdin.flush(); p.wait()
            if status != 0:
                continue
            sc = json.load(open(out))["scan"]
            pauses.append(sc["pause_ms"] + sc["reap_pause_ms"])
            totals.append(sc["duration_ms"] / 1000)
            rss.append(usage.ru_maxrss / 1024)
            objects.append(sc["python_objects"]["objects"])
        if not pauses:
            rows.append(f"| {mib} MiB | failed | | | | |")
            continue
        med = statistics.median
        rows.append(f"| {mib} MiB, {med(objects):,.0f} objects | {med(pauses):.1f} | {med(seen):.1f} (max {max(seen):.1f}) "
                    f"| {med(totals):.1f} s | {med(rss):,.0f} MiB |")
    return ("`leakprobe attach --scan` of a CPython heap of small objects (bench/py_heap.py): the census by type, "
            "the arena walk and the marking all read the copy-on-write snapshot, so the target stops only for the "
            "capture.\n\n| Python heap | pause: capture and reap, ms | longest gap a thread of the target saw, ms "
            "| whole scan | leakprobe peak RSS |\n|---|---|---|---|---|\n" + "\n".join(rows))


def soak_table():
    """leakprobe's RSS while it stays attached to a churning heap of 1M outstanding blocks."""
    import urllib.request
    duration = int(os.environ.get("SOAK_S", "600"))
    src = os.path.join(WORK, "soak.c")
    with open(src, "w") as f:
        f.write(SOAK_TARGET)
    exe = os.path.join(WORK, "soak")
    sh("gcc", "-O2", "-o", exe, src)
    p = subprocess.Popen([exe, "50000"], stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    port = 19000 + os.getpid() % 1000
    lp = subprocess.Popen([LP, "attach", "--pid", str(p.pid), "--interval", "5s", "--metrics", str(port),
                           "--evict-after", "1m"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in lp.stderr:
        if "attached" in line:
            break
    t0 = time.monotonic()
    points = []  # (seconds, leakprobe RSS KiB, target allocation calls)
    while (t := time.monotonic() - t0) < duration:
        time.sleep(10)
        rss = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{lp.pid}/status").read()).group(1))
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        calls = int(float(re.search(r"^leakprobe_allocations_total (\S+)", body, re.M).group(1)))
        points.append((time.monotonic() - t0, rss, calls))
    stat = open(f"/proc/{lp.pid}/stat").read().rsplit(")", 1)[1].split()
    cpu_s = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    lp.send_signal(signal.SIGINT)
    lp.communicate(timeout=120)
    p.kill(); p.wait()
    settle = min(60, duration / 2)  # the first minute (shorter trial runs: the first half)
    base = next(r for s, r, _ in points if s >= settle)
    after = [r for s, r, _ in points if s >= settle]
    dev = max(abs(r - base) for r in after) / base * 100
    calls_s = (points[-1][2] - points[0][2]) / (points[-1][0] - points[0][0])
    rows = "\n".join(f"| {s:.0f} | {r / 1024:.1f} | {c:,} |" for s, r, c in points[::6] + [points[-1]])
    return (f"Target: 1 000 000 outstanding blocks (16-512 B) from 64 call sites, churned at ~50 000 "
            f"free+malloc pairs/s (measured {calls_s:,.0f} allocations/s through the probes), for "
            f"{duration / 60:.0f} min; leakprobe attached with `--interval 5s --metrics PORT --evict-after 1m`, "
            f"scraped every 10 s.\n\n"
            f"**leakprobe's RSS after the first minute stayed within {dev:.1f}% of its value at 1 minute "
            f"({base / 1024:.1f} MiB): min {min(after) / 1024:.1f} MiB, max {max(after) / 1024:.1f} MiB.** "
            f"leakprobe's own CPU: {cpu_s:.0f} s over {points[-1][0]:.0f} s ({cpu_s / points[-1][0] * 100:.1f}% of a core).\n\n"
            "| time, s | leakprobe RSS, MiB | allocation calls seen |\n|---|---|---|\n" + rows)


def timing_table():
    loop = os.path.join(WORK, "alloc_loop")
    attach, first, detach, gone = [], [], [], []
    for _ in range(ROUNDS):
        p = subprocess.Popen([loop, "1000", "0", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        p.stdout.readline()
        t0 = time.monotonic()
        out = subprocess.run([LP, "attach", "--pid", str(p.pid), "--duration", "1s", "--interval", "1s", "-v"],
                             capture_output=True, text=True)
        total = time.monotonic() - t0
        # The kernel's teardown finishes in leakprobe's child after leakprobe itself returns.
        while "perf_event" in subprocess.run(["bpftool", "link", "show"], capture_output=True, text=True).stdout:
            time.sleep(0.05)
        gone.append(time.monotonic() - t0 - total)
        m = re.search(r"detached in ([\d.]+)(ms|s)", out.stderr)
        d = float(m.group(1)) * (1e-3 if m.group(2) == "ms" else 1) if m else float("nan")
        # Launch to first report = total: probes live, one interval, detach, report.
        first.append(total)
        detach.append(d)
        attach.append(total - 1.0 - d)
        p.kill(); p.wait()
    med = statistics.median
    return ("| attach (launch to probes live) | first report (attach --duration 1s) | detach (leakprobe waits) "
            "| probes gone (after leakprobe exits) |\n|---|---|---|---|\n"
            f"| {med(attach):.1f} s | {med(first):.1f} s | {med(detach):.2f} s | {med(gone):.1f} s |")


PY_BASE = "/usr/bin/python3.11"  # Debian's CPython; memray's venv is made from it
PY_TRACERS = [("none", "no tracer"),
              ("inproc_sampled", "leakprobe --in-process --sample-bytes 512KiB (Python frames)"),
              ("full", "leakprobe attach (exact: a uprobe on every call)"),
              ("heaptrack", "heaptrack -p"),
              ("memray", "memray attach -o FILE")]
# BENCH_PY_TRACERS=none,inproc_sampled: only those rows (for quick comparisons; the table in
# docs/benchmarks.md is made with all of them).
# LP_PREV=path/to/an/earlier/leakprobe: a row for that build too, side by side with this one.
if os.environ.get("LP_PREV"):
    PY_TRACERS.insert(2, ("inproc_sampled_prev", f"the same, with {os.environ['LP_PREV']} (an earlier build)"))
# inproc_stub_only (the stub's cost without samples: --sample-bytes 1TiB) is only there if named.
if os.environ.get("BENCH_PY_TRACERS"):
    PY_TRACERS = [t for t in PY_TRACERS + [("inproc_stub_only", "leakprobe --in-process, no samples (1 TiB)")]
                  if t[0] in os.environ["BENCH_PY_TRACERS"].split(",")]
PY_ALLOC_S = 3
HTTP_S = 4
HTTP_PORT = 18090
HTTP_CONNS = 4
# On 2 cores, the server on CPU 0 and wrk on CPU 1: unpinned, where the scheduler put the
# server's threads and wrk made the baseline alone vary 2x between rounds (7.9k-17k
# requests/s); pinned, mostly within 10% (an odd round still jumps: hence the range column).
HTTP_PIN = os.cpu_count() >= 2 and shutil.which("taskset") is not None


def python_setup():
    """The target interpreter: the memray venv's python (Debian's python3.11 underneath, so
    every configuration runs the same binary and memray attach can import memray in it), made
    here if missing. Returns (python, why memray cannot run or None)."""
    if not os.path.exists(PY_BASE):
        return None, f"{PY_BASE} missing (`apt-get install python3.11 python3.11-venv`)"
    vpy = os.path.join(MEMRAY_VENV, "bin/python")
    try:
        if not os.path.exists(vpy):
            sh(PY_BASE, "-m", "venv", MEMRAY_VENV, capture_output=True, text=True)
        if subprocess.run([vpy, "-c", "import memray"], capture_output=True).returncode != 0:
            sh(os.path.join(MEMRAY_VENV, "bin/pip"), "install", "-q", "memray", capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        last = " / ".join((e.stderr or e.stdout or "").strip().splitlines()[-2:])
        return PY_BASE, f"no memray venv: `{' '.join(map(str, e.cmd))}` failed: {last}"
    except OSError as e:
        return PY_BASE, f"no memray venv: {e}"
    if os.path.realpath(vpy) != os.path.realpath(PY_BASE):
        return PY_BASE, f"{MEMRAY_VENV} is not a venv of {PY_BASE} (remove it to have it remade)"
    return vpy, None


def py_once(kind, argv, measure, notes):
    """One target, one tracer, one measurement. Returns measure's result, or raises
    TracerError / FileNotFoundError when the tracer could not start. The target and the
    tracer are gone on return."""
    errlog = os.path.join(WORK, "py-target.err")
    with open(errlog, "w") as err:
        target = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    target.errlog = errlog
    t = None
    try:
        if target.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{argv} did not start")
        t = start_tracer(kind, target.pid)
        return measure(target)
    finally:
        if t is not None and kind not in ("heaptrack", "memray"):
            stop_tracer(kind, t)  # detached first: the target outlives leakprobe
            said = [line for line in t.lines if "CPython" in line or "Python frames" in line]
            notes.setdefault(kind, said[0] if said else "leakprobe said nothing of CPython: native frames only")
        target.kill(); target.wait()
        if kind == "heaptrack" and t is not None:
            try:
                t.wait(timeout=120)
            except subprocess.TimeoutExpired:
                _kill(t)
            t.drainer.join(timeout=10)
        for f in os.listdir(WORK):  # heaptrack's and memray's recordings
            if f.startswith(("heaptrack.", "memray-")):
                os.remove(os.path.join(WORK, f))


def _last_err(target):
    lines = [line.strip() for line in open(target.errlog, errors="replace") if line.strip()]
    return lines[-1] if lines else "no error output"


def py_alloc_measure(target):
    try:
        target.stdin.write("go\n"); target.stdin.flush()
    except BrokenPipeError:
        pass
    line = target.stdout.readline()
    if not line:
        raise RuntimeError(f"the target died under the tracer (status {target.wait()}): {_last_err(target)}")
    f = line.split()
    return float(f[0]), float(f[2])  # ops/s, bytes served by malloc per op


def _cpu_s(pid):
    """user + system CPU seconds of pid so far (every thread; uprobe traps and the eBPF
    programs they run are charged to it too)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def py_http_measure(target, seconds=HTTP_S):
    """requests/s, p99 ms, and the server's CPU per request in µs: throughput on 2 shared
    cores can jump between rounds, CPU per request is the steadier measure of a tracer's cost."""
    cpu0 = _cpu_s(target.pid)
    pin = ["taskset", "-c", "1"] if HTTP_PIN else []
    out = subprocess.run(pin + ["wrk", "-t1", f"-c{HTTP_CONNS}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{HTTP_PORT}/"],
                         capture_output=True, text=True).stdout
    if target.poll() is not None:
        raise RuntimeError(f"the target died under the tracer (status {target.returncode}): {_last_err(target)}")
    cpu = _cpu_s(target.pid) - cpu0
    n = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    if not rps or not p99 or not n or "Non-2xx" in out:
        raise RuntimeError("wrk: " + " / ".join(out.strip().splitlines()[-3:]))
    return (float(rps.group(1)), float(p99.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[p99.group(2)],
            cpu / int(n.group(1)) * 1e6 if n and int(n.group(1)) else float("nan"))


def python_table():
    """CPython's cost under each tracer: an allocation-heavy loop (ops/s) and an http.server
    under wrk (requests/s, p99), interleaved rounds, medians. A tracer that cannot run gets a
    row saying why."""
    py, memray_why = python_setup()
    if py is None:
        return f"(not measured: {memray_why})"
    if not shutil.which("wrk"):
        return "(wrk missing: `apt-get install wrk`)"
    here = os.path.dirname(os.path.abspath(__file__))
    workloads = [
        ("alloc", [py, os.path.join(here, "py_alloc.py"), str(PY_ALLOC_S)], py_alloc_measure),
        ("http", (["taskset", "-c", "0"] if HTTP_PIN else []) + [py, os.path.join(here, "py_http.py"), str(HTTP_PORT)],
         py_http_measure),
    ]
    res = {w: {k: [] for k, _ in PY_TRACERS} for w, _, _ in workloads}
    why = {w: {} for w, _, _ in workloads}  # workload -> tracer kind -> why not measured
    if memray_why:
        for w, _, _ in workloads:
            why[w]["memray"] = memray_why
    notes, memray_failed = {}, []
    for _ in range(ROUNDS):
        for w, argv, measure in workloads:
            for kind, _ in PY_TRACERS:
                if kind in why[w]:
                    continue
                try:
                    try:
                        res[w][kind].append(py_once(kind, argv, measure, notes))
                    except TracerError as e:
                        if kind != "memray" or len(MEMRAY_METHODS) < 2:
                            raise
                        # That debugger cannot get in here: the next one, on a fresh target.
                        memray_failed.append(str(e))
                        MEMRAY_METHODS.pop(0)
                        res[w][kind].append(py_once(kind, argv, measure, notes))
                except FileNotFoundError as e:
                    why[w][kind] = f"not installed ({e.filename})"
                except (TracerError, RuntimeError, subprocess.TimeoutExpired) as e:
                    why[w][kind] = str(e)
    med = statistics.median
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")
    out, kept = [], {}
    memray_ran = any(res[w].get("memray") for w in res)
    volume = ""
    if res["alloc"]["none"]:
        rate, per_op = med(r[0] for r in res["alloc"]["none"]), res["alloc"]["none"][0][1]
        volume = (f" At baseline that is {rate * per_op / 1e9:.1f} GB/s in objects over 512 B (malloc's, "
                  f"{per_op:,.0f} B per op): about {rate * per_op / 524288:,.0f} samples/s at 512 KiB.")
    for w, _, _ in workloads:
        base = med(r[0] for r in res[w]["none"]) if res[w]["none"] else None
        rows = []
        for kind, label in PY_TRACERS:
            if kind == "memray" and memray_ran:
                label += f" (injected through {MEMRAY_METHODS[0]})"
            rs = res[w][kind]
            if kind in why[w] or not rs or not base:
                reason = why[w].get(kind, "no baseline")
                rows.append(f"| {label} | not measured: {cell(reason)} | |{' | |' if w == 'http' else ''} |")
                continue
            rate = med(r[0] for r in rs)
            kept[(w, kind)] = 100 * rate / base
            spread = f"{min(r[0] for r in rs):,.0f}-{max(r[0] for r in rs):,.0f}"
            p99 = f" | {med(r[1] for r in rs):.2f} | {med(r[2] for r in rs):.0f}" if w == "http" else ""
            rows.append(f"| {label} | {rate:,.0f} | {100 * rate / base:.1f}%{p99} | {spread} |")
        if w == "alloc":
            out.append(f"#### Allocation-heavy CPython loop (bench/py_alloc.py: bytes, str, bytearray, list, "
                       f"tuple, dict of 16 B-64 KiB, log-uniform; most dropped, 1/64 in a 4096-slot ring, "
                       f"1/4096 kept), {PY_ALLOC_S} s per configuration.{volume}\n\n"
                       "| configuration | ops/s (median) | of baseline | ops/s, range over rounds |\n"
                       "|---|---|---|---|\n" + "\n".join(rows))
        else:
            out.append(f"#### http.server (bench/py_http.py: ThreadingHTTPServer, HTTP/1.1 keep-alive, "
                       f"a 1.7 KiB JSON body built per request) under wrk -t1 -c{HTTP_CONNS} -d{HTTP_S}s"
                       + (", the server pinned to CPU 0 (with any thread a tracer runs inside it, as memray's "
                          "writer), wrk to CPU 1" if HTTP_PIN else "") + "\n\n"
                       "| configuration | requests/s (median) | of baseline | p99 latency ms (median) | "
                       "server CPU per request, µs (median) | requests/s, range over rounds |\n"
                       "|---|---|---|---|---|---|\n" + "\n".join(rows))
    goal = []
    for w, name in (("alloc", "allocation loop"), ("http", "http.server")):
        k = kept.get((w, "inproc_sampled"))
        goal.append(f"{name} {k:.1f}% ({'met' if k >= 90 else 'NOT met'})" if k is not None
                    else f"{name} not measured")
    said = notes.get("inproc_sampled") or notes.get("full")
    head_memray = ""
    if memray_failed:
        head_memray = (" " + "; ".join(cell(e) for e in memray_failed) + f"; so memray attach was tried through "
                       f"{MEMRAY_METHODS[0]}{'' if memray_ran else ' (which failed too: see the rows)'} "
                       "(`heaptrack -p` has no other way in than gdb).")
    elif memray_ran:
        head_memray = f" memray attach ran through {MEMRAY_METHODS[0]}."
    head = (f"Target: Debian's CPython ({os.path.realpath(py)}, run as {py}; the same binary for every "
            f"configuration). Configurations interleaved within each round; each run starts a fresh "
            f"target, attaches the tracer once the target says ready, then measures.\n\n"
            f"**Goal: sampled in-process with Python frames (`leakprobe attach --pid P --in-process "
            f"--sample-bytes 512KiB`) keeps >= 90% of baseline throughput on both: "
            + ", ".join(goal) + ".**" + (f" leakprobe at attach: `{said.strip()}`." if said else "")
            + head_memray)
    return head + "\n\n" + "\n\n".join(out)


NODE = "/usr/bin/node"
# Node's runs are longer than the Python server's, after a warm-up of their own: 4 s runs
# of a cold server varied by 20% from round to round (the JIT warming up in the window).
NODE_HTTP_S, NODE_WARMUP_S = 10, 2
NODE_TRACERS = [
    ("none", "no tracer", []),
    ("native", "leakprobe --in-process --sample-bytes 512KiB --no-js-frames (native stacks only)",
     ["--in-process", "--sample-bytes", "512KiB", "--no-js-frames"]),
    ("js", "leakprobe --in-process --sample-bytes 512KiB (JavaScript frames)",
     ["--in-process", "--sample-bytes", "512KiB"]),
    ("js_heap", "leakprobe --in-process --sample-bytes 512KiB --js-heap (and the JS heap: the defaults, 128 KiB, polled every 10 s)",
     ["--in-process", "--sample-bytes", "512KiB", "--js-heap"]),
    ("js_heap_32k", "leakprobe --in-process --sample-bytes 512KiB --js-heap --js-heap-interval 32KiB (DevTools' interval)",
     ["--in-process", "--sample-bytes", "512KiB", "--js-heap", "--js-heap-interval", "32KiB"]),
    ("js_heap_2s", "leakprobe --in-process --sample-bytes 512KiB --js-heap --js-heap-poll 2s (a full GC every 2 s)",
     ["--in-process", "--sample-bytes", "512KiB", "--js-heap", "--js-heap-poll", "2s"]),
    ("exact_native", "leakprobe exact, --no-js-frames", ["--no-js-frames"]),
    ("exact_js", "leakprobe exact, JavaScript frames", []),
]
# BENCH_NODE_TRACERS=none,exact_native,exact_js: only those rows (quick comparisons).
if os.environ.get("BENCH_NODE_TRACERS"):
    NODE_TRACERS = [t for t in NODE_TRACERS if t[0] in os.environ["BENCH_NODE_TRACERS"].split(",")]


def node_once(args):
    """One fresh bench/node_http.js under wrk, with leakprobe attached with args (None: no
    tracer): (requests/s, p99 ms, server CPU µs per request)."""
    pin = ["taskset", "-c", "0"] if HTTP_PIN else []
    target = subprocess.Popen(pin + [NODE, os.path.join(ROOT, "bench/node_http.js"), str(HTTP_PORT)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    target.errlog = os.devnull
    lp = None
    try:
        if target.stdout.readline().strip() != "ready":
            raise RuntimeError("bench/node_http.js did not start")
        subprocess.run((["taskset", "-c", "1"] if HTTP_PIN else []) + ["wrk", "-t1", f"-c{HTTP_CONNS}", f"-d{NODE_WARMUP_S}s",
                        f"http://127.0.0.1:{HTTP_PORT}/"], capture_output=True)
        if args is not None:
            lp = subprocess.Popen([LP, "attach", "--pid", str(target.pid), "--interval", "2s"] + args,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _watch(lp, lp.stderr, "--js-heap: opened" if "--js-heap" in args else "attached", 120, "leakprobe")
        return py_http_measure(target, NODE_HTTP_S)
    finally:
        if lp is not None:
            stop_tracer("leakprobe", lp)
        target.kill(); target.wait()


def node_snapshot_pauses():
    """--js-heap-snapshot on Node heaps of 100 MiB and 1 GiB: each snapshot's pause, and
    leakprobe's peak memory."""
    import json
    rows = []
    for mib in [int(m) for m in os.environ.get("NODE_SNAPSHOT_MIB", "100,1024").split(",") if m.strip()]:
        pauses, rss = [], []
        for _ in range(int(os.environ.get("NODE_SNAPSHOT_ROUNDS", ROUNDS))):
            t = subprocess.Popen([NODE, "--max-old-space-size=8192", os.path.join(ROOT, "bench/node_heap.js"), str(mib)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            t.stdout.readline()
            out = os.path.join(WORK, "snap.json")
            lp = subprocess.Popen([LP, "attach", "--pid", str(t.pid), "--in-process", "--sample-bytes", "512KiB",
                                   "--js-heap-snapshot", "--duration", "1s", "--format", "json", "--output", out,
                                   "--force"], stderr=subprocess.DEVNULL)
            _, status, usage = os.wait4(lp.pid, 0)
            t.kill(); t.wait()
            if status != 0:
                continue
            pauses.extend(json.load(open(out))["js_heap"]["snapshot_pauses_ms"])
            rss.append(usage.ru_maxrss / 1024)
        if not pauses:
            rows.append(f"| {mib} MiB | failed | | |")
            continue
        med = statistics.median
        rows.append(f"| {mib} MiB | {med(pauses):,.0f} ms | {max(pauses):,.0f} ms | {med(rss):,.0f} MiB |")
    return ("`leakprobe attach --in-process --sample-bytes 512KiB --js-heap-snapshot` on bench/node_heap.js (small "
            "objects): V8 stops the event loop for each of the two snapshots (measured from the request to the last "
            f"chunk received; {os.environ.get('NODE_SNAPSHOT_ROUNDS', ROUNDS)} round(s)). Under exact tracking (every malloc a uprobe) the same snapshots take several times "
            "longer: V8 allocates as it writes them.\n\n| V8 heap | pause per snapshot (median) | longest | leakprobe peak RSS "
            "|\n|---|---|---|---|\n" + "\n".join(rows))


def node_table():
    """Node's cost: an http server under wrk with JavaScript frames or not, with the JS heap
    sampled or not; then the heap snapshots' pauses."""
    if not os.path.exists(NODE):
        return f"(not measured: {NODE} missing)"
    if not shutil.which("wrk"):
        return "(wrk missing: `apt-get install wrk`)"
    res = {k: [] for k, _, _ in NODE_TRACERS}
    why = {}
    for _ in range(ROUNDS):
        for kind, _, args in NODE_TRACERS:
            if kind in why:
                continue
            try:
                res[kind].append(node_once(None if kind == "none" else args))
            except (TracerError, RuntimeError, subprocess.TimeoutExpired) as e:
                why[kind] = str(e)
    med = statistics.median
    base = med(r[0] for r in res["none"]) if res["none"] else None
    rows, kept, cpu = [], {}, {}
    for kind, label, _ in NODE_TRACERS:
        rs = res[kind]
        if kind in why or not rs or not base:
            rows.append(f"| {label} | not measured: {why.get(kind, 'no baseline')} | | | | |")
            continue
        rate = med(r[0] for r in rs)
        kept[kind], cpu[kind] = 100 * rate / base, med(r[2] for r in rs)
        rows.append(f"| {label} | {rate:,.0f} | {kept[kind]:.1f}% | {med(r[1] for r in rs):.2f} | {cpu[kind]:.0f} "
                    f"| {min(r[0] for r in rs):,.0f}-{max(r[0] for r in rs):,.0f} |")
    goals = []
    if "js_heap" in kept:
        goals.append(f"--js-heap sampling keeps {kept['js_heap']:.1f}% of baseline throughput "
                     f"({'met' if kept['js_heap'] >= 90 else 'NOT met'}: >= 90%)")
    for mode, a, b in (("sampled", "native", "js"), ("exact", "exact_native", "exact_js")):
        if a in cpu and b in cpu:
            more = 100 * (cpu[b] / cpu[a] - 1)
            goals.append(f"JavaScript frames cost {more:+.1f}% server CPU per request over native-only stacks, "
                         f"{mode} ({'met' if more <= 5 else 'NOT met'}: <= 5%)")
    return (f"Target: {NODE} ({subprocess.run([NODE, '--version'], capture_output=True, text=True).stdout.strip()}) "
            f"running bench/node_http.js (a 20-item JSON body and a Buffer per request, nothing kept) under "
            f"wrk -t1 -c{HTTP_CONNS} -d{NODE_HTTP_S}s after a {NODE_WARMUP_S} s warm-up before attaching"
            + (", the server pinned to CPU 0, wrk to CPU 1" if HTTP_PIN else "")
            + ". Configurations interleaved within each round, a fresh server each run.\n\n**"
            + "; ".join(goals) + ".**\n\n| configuration | requests/s (median) | of baseline | p99 latency ms | "
            "server CPU per request, µs | requests/s, range over rounds |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\n" + node_snapshot_pauses())


PREFORK_SRC = os.path.join(ROOT, "tests/targets/prefork.c")


def _prefork(workers):
    """tests/targets/prefork.c with `workers` workers (no leak, no recycling): (master, worker pids)."""
    exe = os.path.join(WORK, "prefork")
    if not os.path.exists(exe):
        sh("gcc", "-O2", "-g", "-o", exe, PREFORK_SRC)
    m = subprocess.Popen([exe, str(workers), "64", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    m.stdout.readline()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = subprocess.run(["pgrep", "-P", str(m.pid)], capture_output=True, text=True).stdout.split()
        if len(kids) >= workers:
            return m, [int(k) for k in kids]
        time.sleep(0.05)
    raise RuntimeError("prefork workers did not start")


def _attach_seconds(args):
    """Launch of `leakprobe attach ARGS --duration 1s` to its "attached" line (every probe live)."""
    t0 = time.monotonic()
    p = subprocess.Popen([LP, "attach"] + args + ["--duration", "1s", "--interval", "1s"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _watch(p, p.stderr, "attached", 300, "leakprobe")
    took = time.monotonic() - t0
    p.wait()
    p.drainer.join(timeout=10)
    _wait_teardowns()
    return took


def _wait_teardowns():
    """Our probes of a run that ended are torn down in the background: wait for a quiet kernel."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and subprocess.run(["pgrep", "-x", "leakprobe"],
                                                          capture_output=True).returncode == 0:
        time.sleep(0.1)


SPAWN_N = 100
SPAWNERS = {
    # fork without exec (a pre-fork master replacing a worker): held until its probes are live.
    "fork, the child exits (python3 os.fork)": [
        "python3", "-c", "import os,sys; sys.stdin.readline()\n"
        f"for _ in range({SPAWN_N}):\n pid = os.fork()\n if pid == 0: os._exit(0)\n os.waitpid(pid, 0)"],
    # fork + exec (a shell's child): held until its probes are live, let go at its exec.
    "fork+exec (python3 os.fork, os.execv /bin/true)": [
        "python3", "-c", "import os,sys; sys.stdin.readline()\n"
        f"for _ in range({SPAWN_N}):\n pid = os.fork()\n if pid == 0: os.execv('/bin/true', ['true'])\n"
        " os.waitpid(pid, 0)"],
    # vfork + exec (posix_spawn, Python's subprocess, dash): never held.
    "vfork+exec (python3 subprocess.run /bin/true)": [
        "python3", "-c", "import subprocess,sys; sys.stdin.readline()\n"
        f"for _ in range({SPAWN_N}): subprocess.run(['/bin/true'])"],
}


def _spawn_ms(argv, traced):
    """Milliseconds per child of a spawning loop, with or without `leakprobe --children` on it."""
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    time.sleep(0.2)
    t = None
    if traced:
        t = subprocess.Popen([LP, "attach", "--pid", str(p.pid), "--children", "--interval", "1s"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _watch(t, t.stderr, "attached", 120, "leakprobe")
    t0 = time.monotonic()
    p.stdin.write("go\n"); p.stdin.flush()
    p.wait()
    ms = (time.monotonic() - t0) * 1e3 / SPAWN_N
    if t is not None:
        stop_tracer("full", t)
        _wait_teardowns()
    return ms


NGINX4_CONF = NGINX_CONF.replace("worker_processes 1;", "worker_processes 4;")


def _nginx4_once(kind):
    conf = os.path.join(WORK, "nginx4.conf")
    with open(conf, "w") as f:
        f.write(NGINX4_CONF.format(work=WORK))
    os.makedirs(os.path.join(WORK, "www"), exist_ok=True)
    with open(os.path.join(WORK, "www/index.html"), "w") as f:
        f.write("x" * 2048)
    master = subprocess.Popen(["nginx", "-c", conf], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    t = None
    try:
        if kind != "none":
            extra = {"full": [], "sampled": ["--sample-bytes", "512KiB"], "inproc": ["--in-process"],
                     "inproc_sampled": ["--in-process", "--sample-bytes", "512KiB"]}[kind]
            t = subprocess.Popen([LP, "attach", "--pid", str(master.pid), "--children", "--interval", "2s"] + extra,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _watch(t, t.stderr, "attached", 120, "leakprobe")
        out = subprocess.run(["wrk", "-t2", "-c32", "-d8s", "--latency", "http://127.0.0.1:18089/"],
                             capture_output=True, text=True).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
        return rps, float(p99.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[p99.group(2)]
    finally:
        stop_tracer("full", t)
        master.send_signal(signal.SIGQUIT); master.wait()
        _wait_teardowns()


def processes_table():
    """Several processes: attach time for 1 and 64 workers of one build; what following
    children costs a spawning parent (each child held at birth until its probes are live);
    nginx with 4 workers followed with --children under wrk (uprobes, and in-process). with uprobes and in-process."""
    med = statistics.median
    one, many = [], []
    for _ in range(ROUNDS):
        m, workers = _prefork(64)
        try:
            one.append(_attach_seconds(["--pid", str(workers[0])]))
            many.append(_attach_seconds(["--pid", str(m.pid), "--children"]))
        finally:
            m.stdin.close(); m.wait()
    out = ["| attach, 1 worker | attach, master + 64 workers (`--children`) | ratio |", "|---|---|---|",
           f"| {med(one):.2f} s | {med(many):.2f} s | {med(many) / med(one):.2f}x |", ""]
    out += ["| spawning parent (100 children) | ms per child, untraced | followed (`--children`) | added per child |",
            "|---|---|---|---|"]
    for label, argv in SPAWNERS.items():
        base, traced = [], []
        for _ in range(ROUNDS):
            base.append(_spawn_ms(argv, False))
            traced.append(_spawn_ms(argv, True))
        out.append(f"| {label} | {med(base):.2f} | {med(traced):.2f} | +{med(traced) - med(base):.2f} ms |")
    out.append("")
    if not shutil.which("nginx") or not shutil.which("wrk"):
        out.append("(nginx or wrk missing: `apt-get install nginx-light wrk`)")
        return "\n".join(out)
    res = {"none": [], "full": [], "sampled": [], "inproc": [], "inproc_sampled": []}
    for _ in range(max(2, ROUNDS - 1)):
        for kind in res:
            res[kind].append(_nginx4_once(kind))
    base = med(r for r, _ in res["none"])
    out += ["| nginx, 4 workers, wrk -t2 -c32 -d8s | requests/s (median) | of baseline | p99 ms |", "|---|---|---|---|"]
    for kind, label in (("none", "no tracer"), ("full", "leakprobe --children (exact)"),
                        ("sampled", "leakprobe --children --sample-bytes 512KiB"),
                        ("inproc", "leakprobe --children --in-process (exact)"),
                        ("inproc_sampled", "leakprobe --children --in-process --sample-bytes 512KiB")):
        rps = med(r for r, _ in res[kind])
        out.append(f"| {label} | {rps:,.0f} | {rps / base:.0%} | {med(p for _, p in res[kind]):.2f} |")
    return "\n".join(out)


def update_doc(begin, end, text):
    path = os.path.join(ROOT, "docs/benchmarks.md")
    doc = open(path).read()
    block = f"{begin}\n{text}\n{end}"
    doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S) \
        if begin in doc else doc.rstrip("\n") + f"\n\n{block}\n"
    open(path, "w").write(doc)


def main():
    sh("cargo", "build", "--quiet", "--release", "-p", "leakprobe", cwd=ROOT)
    # Sections with a block of their own in docs/benchmarks.md, runnable alone (BENCH_ONLY=name).
    only = os.environ.get("BENCH_ONLY") or None
    if "--only" in sys.argv[1:-1]:
        only = sys.argv[sys.argv.index("--only") + 1]
    for name, table, how in (("soak", soak_table, "one run"), ("scan", scan_table, f"{ROUNDS} rounds, medians"),
                             ("python", python_table, f"{ROUNDS} interleaved rounds, medians"),
                             ("pycensus", pycensus_table, f"{ROUNDS} rounds, medians"),
                             ("node", node_table, f"{ROUNDS} interleaved rounds, medians"),
                             ("processes", processes_table, f"{ROUNDS} rounds, medians")):
        if only not in (None, name):
            continue
        text = (f"Command: `BENCH_ONLY={name} cargo xtask bench` (bench/harness.py `{table.__name__}`, {how}). "
                f"Date {time.strftime('%Y-%m-%d')}, kernel {os.uname().release}, {os.cpu_count()} CPUs.\n\n"
                + table())
        print(text)
        update_doc(f"<!-- harness-{name}:begin -->", f"<!-- harness-{name}:end -->", text)
    if only is not None:
        shutil.rmtree(WORK, ignore_errors=True)
        return 0
    cpu = open("/proc/cpuinfo").read()
    model = re.search(r"model name\s*:\s*(.*)", cpu).group(1)
    header = (f"Command: `cargo xtask bench` (bench/harness.py, {ROUNDS} interleaved rounds, medians). "
              f"Date {time.strftime('%Y-%m-%d')}, kernel {os.uname().release}, {os.cpu_count()} x {model}.")
    sections = [
        header,
        "### Allocation loop (100 000 malloc/free pairs per thread, 16 B-4 KiB, no frame pointers)",
        alloc_loop_table(),
        "### nginx (Debian nginx-light, 1 worker, 2 KiB static file) under wrk -t2 -c32 -d8s",
        nginx_table(),
        "### redis-server (Debian 7.0, jemalloc) under redis-benchmark -t set,get -n 200000 -c 32 -d 256",
        redis_table(),
        "### leakprobe's own cost",
        "| scenario | CPU | memory | |\n|---|---|---|---|\n" + own_cost_table(),
        "### Attach, first report, detach (glibc target, 12 probe points)",
        timing_table(),
        "### In-process install and removal: the target's pauses (2 cores; all threads busy, or server-like)",
        pause_table(),
    ]
    text = "\n\n".join(sections)
    print(text)
    path = os.path.join(ROOT, "docs/benchmarks.md")
    doc = open(path).read()
    begin, end = "<!-- harness:begin -->", "<!-- harness:end -->"
    block = f"{begin}\n{text}\n{end}"
    doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S) \
        if begin in doc else doc.replace("# Benchmarks\n", f"# Benchmarks\n\n## Harness (latest run)\n\n{block}\n", 1)
    open(path, "w").write(doc)
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
