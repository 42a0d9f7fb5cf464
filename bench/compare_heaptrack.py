#!/usr/bin/env python3
"""Compare leakprobe's stacks with heaptrack's for the same run of the same process.

For each test target built without frame pointers (-O2 C and C++, Rust release), one run:
start it, attach `heaptrack -p` (gdb injection) and `leakprobe attach` together, trigger its
leaks, let it exit. Then, for every leaking call site, compare the function names from the
leaking function down to main as heaptrack_print and leakprobe's JSON report show them.
heaptrack's own interposer frame (libheaptrack_inject) is skipped in leakprobe's stacks.
Only blocks still allocated at exit are heaptrack "leaks", so sites freed by destructors at
exit (the C++ cache, the Rust registry) cannot be compared this way.

Usage (root, after `cargo xtask setup`): bench/compare_heaptrack.py
Exit status 1 if any site differs.
"""
import json, os, re, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LP = os.path.join(ROOT, "target/release/leakprobe")
TARGETS = [
    ("alloc_funcs.c", ["gcc", "-O2", "-g"], ["leak_malloc", "leak_calloc", "leak_realloc", "leak_posix_memalign"]),
    ("cxx_target.cpp", ["g++", "-O2", "-g"], ["leak_array()", "leak_new(int)"]),
    ("rust_target.rs", ["rustc", "-C", "opt-level=3", "-g"], ["rust_target::leak_box"]),
]


def heaptrack_stacks(path):
    """Leaked-allocation stacks from heaptrack_print: lists of function names, innermost first."""
    out = subprocess.run(["heaptrack_print", "-l", "1", "-p", "0", "-a", "0", "-T", "0", path],
                         capture_output=True, text=True).stdout
    stacks, group, cur = [], None, None
    for line in out.splitlines():
        if re.match(r"^\S.* leaked over \d+ calls from$", line):
            group, cur = [], None
        elif re.match(r"^\s*\S.* leaked over \d+ calls from:$", line):
            cur = list(group)
            stacks.append(cur)
        elif group is not None and not line.startswith(" ") and line and cur is None:
            group.append(line.strip())
        elif cur is not None and re.match(r"^    \S", line) and not line.strip().startswith(("at ", "in ")):
            cur.append(line.strip())
    return stacks


def until(names, end="main"):
    """Frames up to and including the first that ends with `end`."""
    out = []
    for n in names:
        out.append(n)
        if n == end or n.endswith("::" + end):
            break
    return out


def norm(name):
    # heaptrack prints Rust names with the hash suffix stripped the same way; drop generics noise.
    return re.sub(r"::h[0-9a-f]{16}$", "", name)


def main():
    work = tempfile.mkdtemp()
    subprocess.run(["cargo", "build", "--quiet", "--release", "-p", "leakprobe"], cwd=ROOT, check=True)
    failures = 0
    print("| target | leaking function | heaptrack -p frames | leakprobe frames | same |")
    print("|---|---|---|---|---|")
    for src, cc, funcs in TARGETS:
        exe = os.path.join(work, src.split(".")[0])
        subprocess.run(cc + ["-o", exe, os.path.join(ROOT, "tests/targets", src)], check=True)
        target = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert target.stdout.readline().strip() == "ready"
        os.chdir(work)
        ht = subprocess.Popen(["heaptrack", "-p", str(target.pid)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        zst = None
        for line in ht.stdout:
            m = re.search(r'output will be written to "([^"]+)"', line)
            zst = m.group(1) if m else zst
            if "injection finished" in line:
                break
        lp = subprocess.Popen([LP, "attach", "--pid", str(target.pid), "--format", "json", "--interval", "1s"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while "attached" not in lp.stderr.readline():
            pass
        target.stdin.write("leak\n"); target.stdin.flush()
        assert target.stdout.readline().strip() == "done"
        time.sleep(1.5)
        target.stdin.write("exit\n"); target.stdin.flush()
        target.wait()
        report = json.loads(lp.communicate()[0])
        ht.wait()
        hstacks = [[norm(n) for n in s] for s in heaptrack_stacks(zst)]
        for func in funcs:
            h = next((until(s[s.index(func):]) for s in hstacks if func in s), None)
            l = None
            for site in report["sites"]:
                names = [f["function"] or "?" for f in site["frames"]
                         if "libheaptrack" not in (f["module"] or "")]
                if site["outstanding_bytes"] > 0 and func in names:
                    l = until(names[names.index(func):])
                    break
            same = h is not None and h == l
            failures += not same
            print(f"| {src} | {func} | {' → '.join(h or ['(none)'])} | {' → '.join(l or ['(none)'])} | {'yes' if same else 'NO'} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
