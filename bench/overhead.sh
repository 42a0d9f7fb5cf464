#!/usr/bin/env bash
# Added cost per malloc+free pair: bench/alloc_loop without leakprobe, attached, and after
# detach, in one run. Usage: bench/overhead.sh [PAIRS]   (run as root after `cargo xtask setup`)
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-200000}
work=$(mktemp -d)
trap 'kill $target 2>/dev/null || true; rm -rf "$work"' EXIT
cargo build --quiet --release -p leakprobe
gcc -O2 -o "$work/alloc_loop" bench/alloc_loop.c
mkfifo "$work/in"
exec 3<>"$work/in"
"$work/alloc_loop" "$pairs" <&3 >"$work/out" &
target=$!
sleep 0.3
round() { # label, seconds to wait per run
    : >"$work/out"
    for _ in 1 2 3; do echo go >&3; sleep "$2"; done
    printf '%-14s %s\n' "$1" "$(grep -ao '[0-9.]* ns/pair' "$work/out" | sort -n | sed -n 2p)"
}
round "no tracer" 0.5
target/release/leakprobe attach --pid "$target" --interval 1s -q >/dev/null 2>&1 &
lp=$!
sleep 3
round "leakprobe" "$(awk "BEGIN{print $pairs/40000+1}")"
kill -INT "$lp"; wait "$lp" || true
round "after detach" 0.5
