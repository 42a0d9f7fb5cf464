//! Holders on a server that ran before leakprobe came (issue 21): what holds the blocks
//! allocated since attach is mostly memory from before attach (a queue's head, a map's bucket
//! array), and the structure changes while it is scanned. Every run must name the program's
//! global as the root of the holder chain, never "untracked heap memory" or the allocator.
//! Each case runs 10 times, with glibc (whose heap is walked) and with jemalloc (whose is not:
//! untracked memory is followed back). Privileged: run as root, one at a time.

mod common;

use common::*;
use serde_json::Value;

const RUNS: usize = 10;

fn target(jemalloc: bool) -> std::path::PathBuf {
    let (name, extra): (&str, &[&str]) =
        if jemalloc { ("holders_jemalloc", &["-Wl,--no-as-needed", "-ljemalloc"]) } else { ("holders", &[]) };
    let mut flags = vec!["-O2", "-g", "-fomit-frame-pointer", "-pthread"];
    flags.extend_from_slice(extra);
    build_target("holders.c", name, "gcc", &flags)
}

/// The first holder of the site allocating in `func`, from a fresh attach with a scan.
fn holders_of(jemalloc: bool, mode: &str, func: &str) -> Vec<String> {
    let mut t = Target::spawn_with_args(&target(jemalloc), &[mode]);
    let report: Value = attach_report(
        &mut t,
        &["--duration", "1500ms", "--interval", "500ms", "--scan", "--format", "json"],
        |_| {},
    );
    let site = sites(&report)
        .iter()
        .filter(|s| has_frame(s, func))
        .max_by_key(|s| s["reachability"]["reachable"]["bytes"].as_u64().unwrap_or(0))
        .unwrap_or_else(|| panic!("no site of {func} in {report}"));
    site["held_by"]
        .as_array()
        .unwrap_or_else(|| panic!("no holders for {func}: {site}"))
        .iter()
        .map(|h| h["holder"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Runs `mode` RUNS times; each run's largest holder must start at `global` (the program's
/// variable), and no holder may stop at untracked memory.
fn check(jemalloc: bool, mode: &str, func: &str, global: &str) {
    require_root();
    let mut rows = Vec::new();
    for run in 0..RUNS {
        let holders = holders_of(jemalloc, mode, func);
        let first = holders.first().cloned().unwrap_or_default();
        rows.push(format!("run {run}: {first}"));
        assert!(
            first.starts_with(&format!("global {global}")),
            "{mode} ({}), run {run}: the chain's root is not {global}: {holders:#?}\n{}",
            if jemalloc { "jemalloc" } else { "glibc" },
            rows.join("\n")
        );
        for h in &holders {
            assert!(
                !h.contains("which no root reaches") && !h.contains("untracked heap memory at"),
                "run {run}: {h}"
            );
            assert!(!h.contains("libjemalloc") && !h.contains("main_arena"), "run {run}: {h}");
        }
    }
    eprintln!("{mode} ({}):\n{}", if jemalloc { "jemalloc" } else { "glibc" }, rows.join("\n"));
}

#[test]
fn a_list_pushed_without_pause_is_held_by_its_global_glibc() {
    check(false, "list", "list_push", "list_");
}

#[test]
fn a_list_pushed_without_pause_is_held_by_its_global_jemalloc() {
    check(true, "list", "list_push", "list_");
}

#[test]
fn a_fifo_from_before_attach_is_held_by_its_head_glibc() {
    check(false, "fifo", "enqueue", "queue_head");
}

#[test]
fn a_fifo_from_before_attach_is_held_by_its_head_jemalloc() {
    check(true, "fifo", "enqueue", "queue_head");
}

#[test]
fn a_hash_map_with_buckets_from_before_attach_is_held_by_its_global_glibc() {
    check(false, "map", "map_insert", "table");
}

#[test]
fn a_hash_map_with_buckets_from_before_attach_is_held_by_its_global_jemalloc() {
    check(true, "map", "map_insert", "table");
}
