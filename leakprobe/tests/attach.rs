//! Attach by PID to real targets (C, C++, Rust) and check exact accounting per call site.
//! Privileged: run as root, one at a time (`cargo xtask test` does both).

mod common;

use common::*;
use serde_json::Value;

const SRC: &str = "alloc_funcs.c";

/// (leaking function, allocation functions it may be reported under, bytes, count)
const C_LEAKS: &[(&str, &[&str], u64, u64)] = &[
    ("leak_malloc", &["malloc"], 4 * 1000, 4),
    ("leak_calloc", &["calloc"], 3 * 1000, 3),
    ("leak_realloc", &["realloc"], 2 * 2048, 2),
    ("leak_reallocarray", &["reallocarray"], 2 * 1000, 2),
    ("leak_posix_memalign", &["posix_memalign"], 3 * 512, 3),
    ("leak_aligned_alloc", &["aligned_alloc"], 2 * 1024, 2),
    // glibc's memalign and aligned_alloc are one function; it is reported under one name.
    ("leak_memalign", &["memalign", "aligned_alloc"], 2 * 768, 2),
    ("leak_valloc", &["valloc"], 5000, 1),
    ("leak_pvalloc", &["pvalloc"], 3000, 1),
    ("leak_mmap", &["mmap"], 2 * 65536, 2),
];

fn check_c_report(report: &Value) {
    assert_eq!(report["schema"], "leakprobe/v1");
    assert_no_drops(report);
    let all = sites(report);
    let mut expected_total = 0;
    for (func, kinds, bytes, count) in C_LEAKS {
        let mine: Vec<&Value> = all.iter().filter(|s| frame0(s) == *func).collect();
        assert!(!mine.is_empty(), "no call site for {func}");
        for s in &mine {
            let kind = s["function"].as_str().unwrap();
            assert!(kinds.contains(&kind), "{func} reported as {kind}, want one of {kinds:?}");
            let f = &s["frames"][0];
            assert!(f["file"].as_str().unwrap().ends_with(SRC), "{func}: file {}", f["file"]);
            let line = line_of(SRC, &format!("void {func}("));
            let got = f["line"].as_u64().unwrap();
            assert!(got >= line && got <= line + 3, "{func}: line {got}, function starts at {line}");
            assert!(
                has_frame(s, "do_leaks") && has_frame(s, "main"),
                "{func}: stack does not reach main: {}",
                s["frames"]
            );
        }
        let (b, c, _, _) = sum(mine.into_iter());
        assert_eq!((b, c), (*bytes, *count), "{func}: outstanding bytes and count");
        expected_total += bytes;
    }
    // realloc's seed blocks are freed by realloc: allocated, then all freed.
    let seed = sum(all.iter().filter(|s| frame0(s) == "seed_for_realloc"));
    assert_eq!(seed, (0, 0, 2, 2), "seed_for_realloc: (outstanding bytes, count, allocated, freed)");
    // The churn frees everything it allocates: no growth.
    let churn: Vec<&Value> = all.iter().filter(|s| frame0(s) == "churn").collect();
    let (b, c, allocated, freed) = sum(churn.iter().copied());
    assert_eq!((b, c), (0, 0), "churn has outstanding memory");
    assert_eq!(allocated, freed);
    assert!(allocated >= 500 * 5 + 10, "churn allocations seen: {allocated}");
    for s in churn {
        assert_eq!(s["growth_bytes_per_s"].as_f64(), Some(0.0));
    }
    assert_eq!(
        report["totals"]["outstanding_bytes"].as_u64(),
        Some(expected_total),
        "nothing else may be outstanding"
    );
}

#[test]
fn c_target_exact_accounting_per_function() {
    require_root();
    let bin = c_target(SRC, "alloc_funcs");
    let mut target = Target::spawn(&bin);
    let report = attach_json(&mut target, "3s", |t| t.leak());
    check_c_report(&report);
    assert_eq!(report["target"]["pid"].as_i64(), Some(target.pid() as i64));
    assert_eq!(report["target"]["ended_by"], "duration");
    // Every libc hook attached (aliases say so).
    for p in report["probes"].as_array().unwrap() {
        assert!(p["attached"] == true || !p["alias_of"].is_null(), "probe not attached: {p}");
    }
    // Detached: the target is unharmed and keeps working.
    assert!(target.is_running());
    target.leak();
}

/// The same exact figures through the in-process stub (issue 12), on the target built without
/// frame pointers: GOT slots instead of uprobes at the functions, one report site per call.
#[test]
fn c_target_exact_accounting_in_process_without_frame_pointers() {
    require_root();
    // No frame pointers; no sibling calls either, since a tail call changes which function is
    // frame 0 for any tracer (seed_for_realloc's malloc would belong to leak_realloc).
    let flags = ["-O2", "-g", "-fomit-frame-pointer", "-fno-optimize-sibling-calls"];
    let bin = build_target(SRC, "alloc_funcs_nofp_nosib", "gcc", &flags);
    let mut target = Target::spawn(&bin);
    let report =
        attach_report(&mut target, &["--duration", "3s", "--format", "json", "--in-process"], |t| t.leak());
    check_c_report(&report);
    let ip = &report["in_process"];
    assert!(ip["patched"].as_array().is_some_and(|p| !p.is_empty()), "{ip}");
    assert!(ip["restored_slots"].as_u64().unwrap() > 0, "{ip}");
    assert_eq!(ip["stub_set_full"].as_u64(), Some(0));
    assert!(target.is_running());
    target.leak();
}

#[test]
fn cxx_target_new_array_and_cache_growth() {
    require_root();
    let src = "cxx_target.cpp";
    let bin = cxx_target(src, "cxx_target");
    let mut target = Target::spawn(&bin);
    let report = attach_json(&mut target, "3s", |t| t.leak());
    assert_no_drops(&report);
    let all = sites(&report);

    let arrays: Vec<&Value> = all.iter().filter(|s| frame0(s) == "leak_array()").collect();
    assert!(arrays.iter().all(|s| s["function"] == "operator new[]"), "new[] sites: {arrays:?}");
    assert_eq!(sum(arrays.iter().copied()).0, 5 * 3000);
    assert_eq!(sum(arrays.iter().copied()).1, 5);
    let line = line_of(src, "void leak_array()");
    assert_eq!(arrays[0]["frames"][0]["line"].as_u64(), Some(line));

    // One hash node per cached key, allocated from cache_insert through operator new.
    let nodes: Vec<&Value> = all
        .iter()
        .filter(|s| {
            s["function"] == "operator new"
                && has_frame(s, "cache_insert")
                && frame0(s).contains("_Hash_node<std::pair<int const")
        })
        .collect();
    let (bytes, count, _, _) = sum(nodes.iter().copied());
    assert_eq!(count, 50, "hash nodes outstanding");
    assert_eq!(bytes % 50, 0);

    // Temporaries in churn() are all freed.
    let churn = sum(all.iter().filter(|s| has_frame(s, "churn()")));
    assert_eq!((churn.0, churn.1), (0, 0));
    assert!(churn.2 >= 300);
}

#[test]
fn rust_target_box_leak_and_registry() {
    require_root();
    let bin = rust_target("rust_target.rs", "rust_target");
    let mut target = Target::spawn(&bin);
    let report = attach_json(&mut target, "3s", |t| t.leak());
    assert_no_drops(&report);
    let all = sites(&report);
    let innermost_user = |s: &Value, name: &str| {
        // Inlined alloc:: frames come first; the first frame of ours names the call site.
        s["frames"].as_array().unwrap().iter().find_map(|f| {
            let func = f["function"].as_str()?;
            func.starts_with("rust_target::").then(|| func == name)
        }) == Some(true)
    };
    let boxes = sum(all.iter().filter(|s| innermost_user(s, "rust_target::leak_box")));
    assert_eq!((boxes.0, boxes.1), (3 * 4096, 3));
    let registry = sum(all.iter().filter(|s| innermost_user(s, "rust_target::grow_registry")));
    assert_eq!((registry.0, registry.1), (20 * 1500, 20));
    let churn = sum(all.iter().filter(|s| innermost_user(s, "rust_target::churn")));
    assert_eq!((churn.0, churn.1), (0, 0));
    assert!(churn.2 >= 600, "churn allocations: {}", churn.2);
    let leak_box = all.iter().find(|s| innermost_user(s, "rust_target::leak_box")).unwrap();
    let f = leak_box["frames"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"] == "rust_target::leak_box")
        .unwrap();
    assert!(f["file"].as_str().unwrap().ends_with("rust_target.rs"));
    assert!(f["line"].as_u64().is_some());
    assert!(has_frame(leak_box, "rust_target::main"));
}

/// `leakprobe run [extra] -- alloc_funcs`, fed "leak" then "exit": its JSON report.
fn run_mode_report(extra: &[&str]) -> Value {
    let bin = c_target(SRC, "alloc_funcs");
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let path = out_file.path().to_str().unwrap().to_string();
    let mut child = std::process::Command::new(leakprobe_bin())
        .args(["run", "--interval", "1s", "--format", "json", "--output", &path])
        .args(extra)
        .args(["--", bin.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let stdin = child.stdin.as_mut().unwrap();
        writeln!(stdin, "leak\nexit").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(report["target"]["ended_by"], "target-exited");
    assert_eq!(report["target"]["exit_status"].as_i64(), Some(0));
    assert_no_drops(&report);
    for (func, _, bytes, count) in C_LEAKS {
        let (b, c, _, _) = sum(sites(&report).iter().filter(|s| frame0(s) == *func));
        assert_eq!((b, c), (*bytes, *count), "{func}");
    }
    // Held from the start: stdio's buffer, allocated before main's loop, is seen too.
    assert!(sites(&report).iter().any(|s| has_frame(s, "_IO_file_doallocate")), "startup allocations missed");
    // Symbols resolved although the target had exited by report time.
    assert!(sites(&report).iter().any(|s| frame0(s) == "leak_malloc"));
    report
}

#[test]
fn run_mode_traces_from_the_first_allocation() {
    require_root();
    let report = run_mode_report(&[]);
    assert!(report["in_process"].is_null());
}

/// `run --in-process`: the command is held at its entry point (after relocation, so its GOT
/// is bound) while the stub goes in; exact from main on.
#[test]
fn run_in_process_holds_the_command_at_its_entry_point_and_is_exact() {
    require_root();
    let report = run_mode_report(&["--in-process"]);
    let ip = &report["in_process"];
    assert_eq!(ip["from_entry"], true, "{ip}");
    assert!(ip["patched"].as_array().is_some_and(|p| !p.is_empty()), "{ip}");
    // Exact mode: every call reached a report site; the stub sampled nothing.
    assert_eq!(ip["stub_sampled_allocs"].as_u64(), Some(0), "{ip}");
}

#[test]
fn target_in_its_own_mount_namespace_with_its_own_libc() {
    require_root();
    let bin = c_target(SRC, "alloc_funcs");
    // The target's libc is a copy bind-mounted over the usual path inside a private mount
    // namespace: another inode than the host's file at that path. Probes must go to the file
    // the target maps (through /proc/PID/root), or nothing would be seen.
    let dir = tempfile::tempdir().unwrap();
    let libc = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5).map(str::to_string))
        .find(|p| p.contains("/libc.so"))
        .expect("libc path");
    let copy = dir.path().join("libc-copy.so.6");
    std::fs::copy(&libc, &copy).unwrap();
    let script = format!("mount --bind {} {libc} && exec {}", copy.display(), bin.display());
    let wrapper = dir.path().join("in-namespace.sh");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec unshare --mount --propagation private sh -c '{script}'\n"),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut target = Target::spawn(&wrapper);
    let ns_self = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let ns_target = std::fs::read_link(format!("/proc/{}/ns/mnt", target.pid())).unwrap();
    assert_ne!(ns_self, ns_target, "target is not in its own mount namespace");
    let inode_of = |maps: &str| -> String {
        maps.lines()
            .find(|l| l.ends_with(&libc))
            .and_then(|l| l.split_whitespace().nth(4))
            .unwrap_or_default()
            .to_string()
    };
    let host = inode_of(&std::fs::read_to_string("/proc/self/maps").unwrap());
    let theirs = inode_of(&std::fs::read_to_string(format!("/proc/{}/maps", target.pid())).unwrap());
    assert_ne!(host, theirs, "the target should map its own copy of libc");
    let report = attach_json(&mut target, "3s", |t| t.leak());
    assert_no_drops(&report);
    check_c_report(&report);
}

/// C++ and Rust targets through the in-process stub, built without frame pointers. operator
/// new reaches malloc through the C++ runtime's GOT, so blocks are reported under `malloc`,
/// with operator new as the innermost frame; the figures stay exact.
#[test]
fn cxx_and_rust_targets_exact_in_process_without_frame_pointers() {
    require_root();
    let src = "cxx_target.cpp";
    let bin = build_target(src, "cxx_target_nofp", "g++", &["-O2", "-g", "-fomit-frame-pointer"]);
    let mut target = Target::spawn(&bin);
    let report =
        attach_report(&mut target, &["--duration", "3s", "--format", "json", "--in-process"], |t| t.leak());
    assert_no_drops(&report);
    let all = sites(&report);
    let arrays = sum(all.iter().filter(|s| has_frame(s, "leak_array()")));
    assert_eq!((arrays.0, arrays.1), (5 * 3000, 5), "operator new[] from leak_array");
    // Frame 0 is operator new; frame 1, the node allocator (not the bucket array's).
    let nodes: Vec<&Value> = all
        .iter()
        .filter(|s| {
            frame0(s).starts_with("operator new")
                && has_frame(s, "cache_insert")
                && s["frames"][1]["function"]
                    .as_str()
                    .is_some_and(|f| f.contains("_Hash_node<std::pair<int const"))
        })
        .collect();
    assert_eq!(sum(nodes.iter().copied()).1, 50, "hash nodes outstanding");
    let churn = sum(all.iter().filter(|s| has_frame(s, "churn()")));
    assert_eq!((churn.0, churn.1), (0, 0));
    assert!(churn.2 >= 300);
    drop(target);

    let bin = build_target("rust_target.rs", "rust_target_release", "rustc", &["-C", "opt-level=2", "-g"]);
    let mut target = Target::spawn(&bin);
    let report =
        attach_report(&mut target, &["--duration", "3s", "--format", "json", "--in-process"], |t| t.leak());
    assert_no_drops(&report);
    let all = sites(&report);
    let boxes = sum(all.iter().filter(|s| has_frame(s, "rust_target::leak_box")));
    assert_eq!((boxes.0, boxes.1), (3 * 4096, 3));
    let registry = sum(all.iter().filter(|s| has_frame(s, "rust_target::grow_registry")));
    assert_eq!((registry.0, registry.1), (20 * 1500, 20));
    let churn = sum(all.iter().filter(|s| has_frame(s, "rust_target::churn")));
    assert_eq!((churn.0, churn.1), (0, 0));
}
