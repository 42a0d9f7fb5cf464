#!/usr/bin/env bash
# Added cost per malloc+free pair with leakprobe attached, in one run:
#   - the loop built with frame pointers and without (gcc -O2 -fomit-frame-pointer),
#   - leakprobe walking frame pointers (--unwind fp) or .eh_frame tables (--unwind dwarf).
# The allocations happen DEPTH calls below main, so stacks are DEPTH+4 frames deep.
# Usage: bench/overhead.sh [PAIRS] [DEPTH]   (root, after `cargo xtask setup`)
# Prints a Markdown table (medians of 3 runs per row).
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-100000}
depth=${2:-16}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cargo build --quiet --release -p leakprobe
lp=target/release/leakprobe
gcc -O2 -fno-omit-frame-pointer -o "$work/loop_fp" bench/alloc_loop.c
gcc -O2 -fomit-frame-pointer -o "$work/loop_nofp" bench/alloc_loop.c

# measure LABEL BINARY [leakprobe args...]: median ns/pair of 3 runs.
measure() {
    local label=$1 bin=$2; shift 2
    rm -f "$work/in"; mkfifo "$work/in"
    exec 3<>"$work/in"
    "$bin" "$pairs" "$depth" <&3 >"$work/out" &
    local target=$! tracer=""
    sleep 0.3
    if [ $# -gt 0 ]; then
        "$lp" attach --pid "$target" --interval 1s "$@" >"$work/report" 2>"$work/err" &
        tracer=$!
        until grep -q attached "$work/err"; do sleep 0.2; done
    fi
    for _ in 1 2 3; do
        echo go >&3
        local want=$(( $(grep -ac 'ns/pair' "$work/out") + 1 ))
        until [ "$(grep -ac 'ns/pair' "$work/out")" -ge "$want" ]; do sleep 0.1; done
    done
    [ -n "$tracer" ] && { kill -INT "$tracer"; wait "$tracer" || true; }
    local med
    med=$(grep -ao '[0-9.]* ns/pair' "$work/out" | awk '{print $1}' | sort -n | sed -n 2p)
    kill "$target"; wait "$target" 2>/dev/null || true
    exec 3>&-
    printf '| %s | %s |\n' "$label" "$med"
}

echo "pairs=$pairs depth=$depth kernel=$(uname -r) cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\""
echo
echo "| configuration | ns per malloc+free pair |"
echo "|---|---|"
measure "no tracer, loop with frame pointers" "$work/loop_fp"
measure "no tracer, loop without frame pointers" "$work/loop_nofp"
measure "leakprobe --unwind fp, loop with frame pointers" "$work/loop_fp" --unwind fp
measure "leakprobe --unwind dwarf, loop with frame pointers" "$work/loop_fp" --unwind dwarf
measure "leakprobe --unwind dwarf, loop without frame pointers" "$work/loop_nofp" --unwind dwarf
measure "leakprobe --unwind fp, loop without frame pointers (short stacks)" "$work/loop_nofp" --unwind fp
measure "leakprobe --sample-bytes 512KiB (dwarf), loop without frame pointers" "$work/loop_nofp" --sample-bytes 512KiB
