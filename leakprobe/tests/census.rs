//! The census (issue 14): every chunk of a live process's glibc heap, with the blocks from
//! before attach classified and typed. Targets leak *before* leakprobe attaches.
//! Privileged: run as root, one at a time.

mod common;

use common::*;
use serde_json::Value;

fn target() -> std::path::PathBuf {
    build_target("scan_cases.cpp", "scan_cases", "g++", &["-O2", "-g", "-fomit-frame-pointer", "-pthread"])
}

/// `leakprobe census --pid` on a target that ran `case` once before: the JSON report.
fn census_of(t: &mut Target, extra: &[&str]) -> Value {
    let pid = t.pid().to_string();
    let mut args = vec!["census", "--pid", &pid, "--format", "json"];
    args.extend_from_slice(extra);
    let out = run_leakprobe(&args);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn census(report: &Value) -> &Value {
    let c = &report["scan"]["census"];
    assert!(c.is_object(), "no census in {}", report["scan"]);
    c
}

fn group<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"].as_str().is_some_and(|n| n.contains(name)))
        .unwrap_or_else(|| panic!("no group {name} in {}", c["groups"]))
}

fn class(g: &Value, class: &str) -> (u64, u64) {
    let r = &g["reachability"][class];
    (r["bytes"].as_u64().unwrap_or(0), r["count"].as_u64().unwrap_or(0))
}

#[test]
fn blocks_leaked_before_attach_are_found_exactly_and_the_list_is_held() {
    require_root();
    let bin = target();
    // 10 x malloc(100), dropped: 104 usable bytes each.
    let mut t = Target::spawn_with_args(&bin, &["definite"]);
    t.leak();
    let report = census_of(&mut t, &[]);
    let c = census(&report);
    assert!(c["walk_errors"].as_array().unwrap().is_empty(), "{c}");
    assert_eq!(class(group(c, "104-byte"), "definitely_lost"), (1040, 10), "{c}");
    assert_eq!(c["untracked"]["definitely_lost"]["count"].as_u64(), Some(10), "nothing else is lost: {c}");
    assert_eq!(report["verdict"]["kind"], "leak", "{}", report["verdict"]);
    // Nothing was seen growing in 0.2 s: the scan alone found it (the text says DEFINITELY
    // LOST, not GROWING).
    assert_eq!(report["verdict"]["basis"], "scan", "{}", report["verdict"]);
    assert!(report["verdict"]["summary"].as_str().unwrap().contains("found by the scan"));
    t.send("exit");

    // The global list (10 x calloc(1, 64): 72 usable bytes), held by `cache_head`.
    let mut t = Target::spawn_with_args(&bin, &["list"]);
    t.leak();
    let c = census(&census_of(&mut t, &[])).clone();
    let g = group(&c, "72-byte");
    assert_eq!(class(g, "reachable"), (720, 10), "{g}");
    let h = &g["held_by"][0];
    assert!(h["holder"].as_str().unwrap().contains("cache_head"), "{h}");
    assert_eq!(h["chain"].as_u64(), Some(10), "{h}");
    t.send("exit");
}

/// Small blocks freed just before the census sit in the thread cache and the fastbins,
/// where they look in use to a chunk walk: none may count as leaked.
#[test]
fn tcache_and_fastbin_chunks_are_never_leaks() {
    require_root();
    let mut t = Target::spawn_with_args(&target(), &["churn"]);
    t.leak();
    let c = census(&census_of(&mut t, &[])).clone();
    assert!(c["cached_free"]["count"].as_u64().unwrap() >= 7, "tcache/fastbin chunks found: {c}");
    for k in ["definitely_lost", "indirectly_lost", "possibly_lost"] {
        assert_eq!(c["untracked"][k]["count"].as_u64(), Some(0), "{k}: {c}");
    }
    t.send("exit");
}

/// C++: leaked polymorphic objects and unreachable shared_ptr rings are named by type.
#[test]
fn cxx_objects_and_shared_ptr_cycles_are_named_by_type() {
    require_root();
    let bin = target();
    let mut t = Target::spawn_with_args(&bin, &["objects"]);
    t.leak();
    let c = census(&census_of(&mut t, &[])).clone();
    let w = group(&c, "Widget");
    assert_eq!(w["kind"], "type");
    assert_eq!(class(w, "definitely_lost").1, 10, "{w}");
    t.send("exit");

    let mut t = Target::spawn_with_args(&bin, &["ring"]);
    t.leak();
    let dir = tempfile::tempdir().unwrap();
    let pprof = dir.path().join("census.pb.gz");
    let report = census_of(&mut t, &["--pprof", pprof.to_str().unwrap()]);
    // The pprof profile's stacks are the types, under one root frame.
    let traces =
        std::process::Command::new("go").args(["tool", "pprof", "-traces"]).arg(&pprof).output().unwrap();
    let traces = String::from_utf8_lossy(&traces.stdout);
    assert!(
        traces.contains("shared_ptr control block of Session")
            && traces.contains("[heap from before attach]"),
        "{traces}"
    );
    let c = census(&report);
    let (s, k) = (group(c, "control block of Session"), group(c, "control block of Connection"));
    assert_eq!(class(s, "definitely_lost").1 + class(k, "definitely_lost").1, 10, "{s} {k}");
    assert_eq!(class(s, "indirectly_lost").1 + class(k, "indirectly_lost").1, 10, "{s} {k}");
    let cycles = report["scan"]["cycles"].as_array().unwrap();
    assert_eq!(cycles.len(), 10, "{cycles:?}");
    t.send("exit");
}

/// Against glibc's own figures: the target prints `malloc_info` at rest, the census's in-use
/// bytes (as malloc_info counts them) agree within 1%.
#[test]
fn in_use_bytes_agree_with_malloc_info() {
    require_root();
    let mut t = Target::spawn_with_args(&target(), &["info"]);
    t.send("leak");
    let mut xml = String::new();
    loop {
        let line = t.read_line();
        if line.trim() == "done" {
            break;
        }
        xml.push_str(&line);
        xml.push('\n');
    }
    // The totals after the last </heap>: system less fast and rest (rest includes the top).
    let tail = &xml[xml.rfind("</heap>").expect("malloc_info XML")..];
    let attr = |tag: &str| -> u64 {
        let at = tail.find(tag).unwrap_or_else(|| panic!("{tag} in {tail}"));
        let s = &tail[at..];
        let v = &s[s.find("size=\"").unwrap() + 6..];
        v[..v.find('"').unwrap()].parse().unwrap()
    };
    let glibc_in_use =
        attr("<system type=\"current\"") - attr("<total type=\"fast\"") - attr("<total type=\"rest\"");
    let c = census(&census_of(&mut t, &[])).clone();
    let ours = c["malloc_info_in_use_bytes"].as_u64().unwrap();
    let diff = (ours as f64 - glibc_in_use as f64).abs() / glibc_in_use as f64;
    println!("malloc_info in use {glibc_in_use} B, census {ours} B ({:.3}%)", diff * 100.0);
    assert!(diff <= 0.01, "census {ours} vs malloc_info {glibc_in_use}");
    t.send("exit");
}

/// A chunk header overwritten: that heap's walk stops with a counted error, leakprobe does
/// not crash, and the report says the figures of that heap are incomplete.
#[test]
fn a_corrupted_heap_gives_a_counted_walk_error() {
    require_root();
    let mut t = Target::spawn_with_args(&target(), &["corrupt"]);
    t.leak();
    let report = census_of(&mut t, &[]);
    let c = census(&report);
    let errors = c["walk_errors"].as_array().unwrap();
    assert!(!errors.is_empty(), "{c}");
    println!("walk error: {}", errors[0]);
    let _ = t.child.kill();
    let _ = t.child.wait();
}

/// Not glibc: said plainly, nothing attached.
#[test]
fn census_of_another_allocator_is_refused_plainly() {
    require_root();
    let bin = build_target(
        "allocators.c",
        "alloc_jemalloc",
        "gcc",
        &["-O2", "-g", "-DUSE_JEMALLOC", "-Wl,--no-as-needed", "-ljemalloc"],
    );
    let mut t = Target::spawn(&bin);
    let pid = t.pid().to_string();
    let out = run_leakprobe(&["census", "--pid", &pid]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("census not supported for jemalloc"), "{err}");
    let _ = t.child.kill();
    let _ = t.child.wait();
}

/// `attach --scan --census`: blocks leaked before attach are joined to the call site that
/// allocates the same type (or size) since attach, named as their likely origin.
#[test]
fn a_group_from_before_attach_is_joined_to_the_site_that_allocates_it_now() {
    require_root();
    let bin = target();
    for (case, name, site) in
        [("objects", "Widget", "leak_widgets"), ("definite", "104-byte", "leak_definite")]
    {
        let mut t = Target::spawn_with_args(&bin, &[case]);
        t.leak(); // before attach: untracked
        let report =
            attach_report(&mut t, &["--duration", "2s", "--format", "json", "--scan", "--census"], |t| {
                t.leak()
            });
        let g = group(census(&report), name);
        assert_eq!(
            class(g, "definitely_lost").1,
            10,
            "only the blocks from before attach are untracked: {g}"
        );
        let origin = g["likely_origin"].as_str().unwrap_or_default();
        assert!(origin.contains(site), "{case}: likely origin {origin:?}");
        // The tracked ones are the site's own, lost too.
        let tracked = sites(&report).iter().find(|s| has_frame(s, site)).expect("the tracked site");
        assert_eq!(tracked["reachability"]["definitely_lost"]["count"].as_u64(), Some(10), "{tracked}");
        t.send("exit");
    }
}
