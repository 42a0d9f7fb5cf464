#!/usr/bin/env bash
# What one sample costs leakprobe's eBPF programs, by program: the kernel's own accounting
# (kernel.bpf_stats_enabled: run_time_ns / run_cnt per program, read with bpftool) while
# `leakprobe attach --in-process --sample-bytes B` follows an allocation-heavy target.
# The trap that enters a program is not in these figures; bench/trap_cost.sh measures it.
#
# Usage: bench/sample_cost.sh [LEAKPROBE] [python|c|node] [SAMPLE_BYTES|exact] [EXTRA leakprobe args...]
#   (root). LEAKPROBE defaults to target/release/leakprobe: give two builds' binaries in turn
#   to compare them on the same target. Prints one Markdown row per program that ran.
set -euo pipefail
cd "$(dirname "$0")/.."
lp=${1:-target/release/leakprobe}
kind=${2:-python}
bytes=${3:-512KiB}
shift $(($# < 3 ? $# : 3))
command -v bpftool >/dev/null || { echo "bpftool missing: cargo xtask setup (or apt-get install bpftool)" >&2; exit 1; }
work=$(mktemp -d)
was=$(sysctl -n kernel.bpf_stats_enabled)
trap 'sysctl -q kernel.bpf_stats_enabled="$was"; kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

case $kind in
    python) target=(python3.11 bench/py_alloc.py 3) ;;
    c) gcc -O2 -o "$work/loop" bench/alloc_loop.c -lpthread; target=("$work/loop" 2000000 10 1) ;;
    node) target=(node bench/node_alloc.js 3) ;;
    *) echo "kind: python, c or node" >&2; exit 2 ;;
esac
mkfifo "$work/in"
exec 3<>"$work/in"
"${target[@]}" <&3 >"$work/out" 2>"$work/err" &
pid=$!
until grep -q ready "$work/out"; do sleep 0.1; done
# "exact": full tracking with uprobes (every call runs the programs), no stub.
if [ "$bytes" = exact ]; then mode=(); else mode=(--in-process --sample-bytes "$bytes"); fi
"$lp" attach --pid "$pid" "${mode[@]}" --duration 60s "$@" >/dev/null 2>"$work/lp" &
lpid=$!
until grep -q "attached" "$work/lp"; do
    kill -0 "$lpid" 2>/dev/null || { cat "$work/lp" >&2; exit 1; }
    sleep 0.1
done
sleep 1
sysctl -q kernel.bpf_stats_enabled=1
bpftool prog show -j >"$work/before"
echo go >&3
until [ "$(wc -l <"$work/out")" -ge 2 ]; do sleep 0.1; done
bpftool prog show -j >"$work/after"
sysctl -q kernel.bpf_stats_enabled="$was"
kill -INT "$lpid"; wait "$lpid" || true
echo "target: ${target[*]} -> $(tail -1 "$work/out")"
python3 - "$work/before" "$work/after" <<'EOF'
import json, sys
before = {p["id"]: p for p in json.load(open(sys.argv[1]))}
print("| program | runs | ns per run | ms in all |\n|---|---|---|---|")
for p in json.load(open(sys.argv[2])):
    q = before.get(p["id"], {})
    n = p.get("run_cnt", 0) - q.get("run_cnt", 0)
    t = p.get("run_time_ns", 0) - q.get("run_time_ns", 0)
    if n:
        print(f"| {p.get('name', '?')} | {n} | {t / n:,.0f} | {t / 1e6:,.1f} |")
EOF
