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
                !h.contains("which no root was found to reach") && !h.contains("untracked heap memory at"),
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

/// The demo's scan, as `cargo xtask demo` makes it: the session list's holder.
fn demo_holder_lines(before_attach: std::time::Duration) -> (String, Vec<String>) {
    let mut demo = Demo::start();
    demo.drive();
    // Logins served before attach: their sessions are memory from before attach.
    std::thread::sleep(before_attach);
    let pid = demo.pid().to_string();
    let out = run_leakprobe(&["attach", "--pid", &pid, "--duration", "2s", "--scan"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let held: Vec<String> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("held by"))
        .map(|l| l.trim().to_string())
        .collect();
    (text, held)
}

#[test]
fn the_demo_names_the_global_session_list_twenty_times_in_a_row() {
    require_root();
    for run in 0..20 {
        let (text, held) = demo_holder_lines(std::time::Duration::ZERO);
        assert!(text.contains("held by global sessions"), "run {run}: {held:#?}\n{text}");
        assert!(!text.contains("untracked heap memory"), "run {run}: {held:#?}");
    }
}

#[test]
fn the_demo_after_serving_before_attach_still_names_the_global_session_list() {
    require_root();
    for run in 0..3 {
        let (text, held) = demo_holder_lines(std::time::Duration::from_secs(2));
        assert!(text.contains("held by global sessions"), "run {run}: {held:#?}\n{text}");
        assert!(
            !text.contains("untracked heap memory") && !text.contains("which no root was found to reach"),
            "run {run}: {held:#?}"
        );
    }
}
