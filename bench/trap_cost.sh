#!/usr/bin/env bash
# What the uprobe trap alone costs per malloc+free pair, by where the probe sits: BPF-less
# perf uprobes (bench/trap_probe.c) on this machine's libc, against bench/alloc_loop.
# Usage: bench/trap_cost.sh [PAIRS]   (root). Prints a Markdown table (median of 3 runs per row).
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-200000}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
gcc -O2 -o "$work/loop" bench/alloc_loop.c -lpthread
gcc -O2 -o "$work/trap_probe" bench/trap_probe.c
libc=$(awk '$6 ~ /libc\.so\.6$/ {print $6; exit}' /proc/self/maps)
nm -D "$libc" >"$work/syms"
sym() { awk -v s="$1" '$3 == s"@@GLIBC_2.2.5" || $3 == s {print "0x"$1; exit}' "$work/syms"; }
malloc=$(sym malloc); free=$(sym free)
# First instruction of free that the kernel emulates (push), as leakprobe's placement picks it.
objdump -d --no-show-raw-insn "$libc" --start-address="$free" --stop-address=$((free + 32)) >"$work/free.s"
free_push=0x$(awk '/push/ {sub(":", "", $1); print $1; exit}' "$work/free.s")

measure() {
    local label=$1; shift
    rm -f "$work/in"; mkfifo "$work/in"; exec 3<>"$work/in"
    "$work/loop" "$pairs" 0 <&3 >"$work/out" &
    local target=$! holder=""
    sleep 0.3
    if [ $# -gt 0 ]; then
        sleep 600 | "$work/trap_probe" "$target" "$libc" "$@" >"$work/tp" &
        holder=$!
        until grep -q attached "$work/tp"; do sleep 0.1; done
    fi
    for i in 1 2 3; do
        echo go >&3
        until [ "$(grep -c ns/pair "$work/out")" -ge "$i" ]; do sleep 0.05; done
    done
    [ -n "$holder" ] && { pkill -P $$ -x sleep || true; wait "$holder" || true; }
    kill "$target"; wait "$target" 2>/dev/null || true; exec 3>&-
    printf '| %s | %s |\n' "$label" "$(grep -o '[0-9.]* ns' "$work/out" | sort -n | sed -n 2p)"
}

echo "libc=$libc malloc=$malloc free=$free free_push=$free_push kernel=$(uname -r)"
echo
echo "| probes (no BPF program) | ns per malloc+free pair |"
echo "|---|---|"
measure "none"
measure "uprobe at malloc entry" "$malloc"
measure "uprobe + uretprobe at malloc" "$malloc" "${malloc}r"
measure "uprobe at free entry (single-stepped)" "$free"
measure "uprobe at free's first push (emulated)" "$free_push"
measure "naive floor: malloc uprobe+uretprobe, free entry" "$malloc" "${malloc}r" "$free"
measure "placed floor: malloc uprobe+uretprobe, free push" "$malloc" "${malloc}r" "$free_push"
