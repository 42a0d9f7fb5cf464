//! Full stacks on binaries built without frame pointers (-O2 C and C++, Rust release), walked
//! in BPF with the modules' .eh_frame tables. Privileged: run as root, one at a time.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn c_without_frame_pointers_reaches_main_with_exact_accounting() {
    require_root();
    let src = "alloc_funcs.c";
    let bin = build_target(src, "alloc_funcs_nofp", "gcc", NOFP_C);
    let mut target = Target::spawn(&bin);
    let report = attach_json(&mut target, "3s", |t| t.leak());
    assert_no_drops(&report);
    for (func, bytes, count) in [
        ("leak_malloc", 4000, 4),
        ("leak_calloc", 3000, 3),
        ("leak_realloc", 4096, 2),
        ("leak_mmap", 131072, 2),
    ] {
        let mine: Vec<&Value> = sites(&report).iter().filter(|s| frame0(s) == func).collect();
        assert!(!mine.is_empty(), "no site for {func}");
        for s in &mine {
            // Named function, called from main through do_leaks: two levels.
            assert_chain(s, &[func, "do_leaks", "main"], src);
            assert_eq!(s["stack_end"], "complete", "{func}: {}", s["stack_end"]);
        }
        let (b, c, _, _) = sum(mine.into_iter());
        assert_eq!((b, c), (bytes, count), "{func}");
    }
    let line = line_of(src, "void leak_malloc(");
    let s = sites(&report).iter().find(|s| frame0(s) == "leak_malloc").unwrap();
    assert_eq!(s["frames"][0]["line"].as_u64(), Some(line));
    // libc.so.6 carries no DWARF: a line for its frame comes from the separate debug file
    // (libc6-dbg, found by build-id under /usr/lib/debug).
    let libc_frame = s["frames"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"] == "__libc_start_call_main")
        .expect("libc frame");
    assert!(libc_frame["line"].as_u64().is_some(), "no line from separate debug info: {libc_frame}");
}

#[test]
fn cxx_without_frame_pointers_unwinds_through_libstdcxx() {
    require_root();
    let src = "cxx_target.cpp";
    let bin = build_target(src, "cxx_target_nofp", "g++", NOFP_C);
    let mut target = Target::spawn(&bin);
    let report = attach_json(&mut target, "3s", |t| t.leak());
    assert_no_drops(&report);
    let all = sites(&report);
    let by = |func: &str| -> Vec<&Value> { all.iter().filter(|s| frame0(s) == func).collect() };

    let arrays = by("leak_array()");
    assert_eq!(sum(arrays.iter().copied()).0, 5 * 3000);
    for s in &arrays {
        assert_chain(s, &["leak_array()", "main"], src);
    }
    let news = by("leak_new(int)");
    assert_eq!(sum(news.iter().copied()).1, 4);
    for s in &news {
        assert_chain(s, &["leak_new(int)", "main"], src);
    }
    // make_shared's allocation is inlined std:: code inside keep_shared.
    let shared: Vec<&Value> =
        all.iter().filter(|s| s["function"] == "operator new" && has_frame(s, "keep_shared(int)")).collect();
    assert_eq!(sum(shared.iter().copied()).1, 3, "make_shared control blocks");
    for s in &shared {
        assert_chain(s, &["keep_shared(int)", "main"], src);
    }
    // std::string buffers are allocated inside libstdc++ (no frame pointers there either):
    // the walk must go through it to cache_insert and main.
    let strings: Vec<&Value> = all
        .iter()
        .filter(|s| frame0(s).starts_with("std::__cxx11::basic_string") && has_frame(s, "cache_insert(int)"))
        .collect();
    let (b, c, _, _) = sum(strings.iter().copied());
    assert_eq!((b, c), (50 * 201, 50), "string buffers of the 50 cached values");
    for s in &strings {
        assert_chain(s, &["cache_insert(int)", "main"], src);
        let libstdcxx = s["frames"][0]["module"].as_str().unwrap_or("");
        assert!(libstdcxx.contains("libstdc++"), "innermost frame in {libstdcxx}");
    }
}

#[test]
fn rust_release_without_frame_pointers() {
    require_root();
    let src = "rust_target.rs";
    let bin = build_target(src, "rust_target_release", "rustc", &["-C", "opt-level=3", "-g"]);
    let mut target = Target::spawn(&bin);
    let report = attach_json(&mut target, "3s", |t| t.leak());
    assert_no_drops(&report);
    let all = sites(&report);
    let user = |s: &Value, name: &str| has_frame(s, name) && has_frame(s, "rust_target::main");
    let boxes: Vec<&Value> = all.iter().filter(|s| user(s, "rust_target::leak_box")).collect();
    assert_eq!((sum(boxes.iter().copied()).0, sum(boxes.iter().copied()).1), (3 * 4096, 3));
    for s in &boxes {
        assert_chain(s, &["rust_target::leak_box", "rust_target::main"], src);
    }
    let vecs: Vec<&Value> = all.iter().filter(|s| user(s, "rust_target::grow_registry")).collect();
    let (b, c, _, _) = sum(vecs.iter().copied());
    assert_eq!((b, c), (20 * 1500, 20), "Vec buffers kept in the registry");
    for s in &vecs {
        assert_chain(s, &["rust_target::grow_registry", "rust_target::main"], src);
    }
}

#[test]
fn stripped_and_unwind_less_code_end_visibly() {
    require_root();
    let src = "alloc_funcs.c";
    // No symbols: frames still unwind (.eh_frame stays), names become module+offset.
    let stripped = build_target(src, "alloc_funcs_stripped", "gcc", &["-O2", "-s"]);
    let mut target = Target::spawn(&stripped);
    let report = attach_json(&mut target, "3s", |t| t.leak());
    assert_no_drops(&report);
    let mmaps: Vec<&Value> = sites(&report)
        .iter()
        .filter(|s| s["function"] == "mmap" && s["outstanding_bytes"].as_u64() > Some(0))
        .collect();
    assert_eq!(sum(mmaps.iter().copied()).0, 2 * 65536, "accounting without symbols");
    for s in &mmaps {
        let f0 = frame0(s);
        assert!(f0.starts_with("[unknown] alloc_funcs_stripped+0x"), "frame 0: {f0}");
        assert!(has_frame(s, "__libc_start_call_main"), "stack did not unwind through the stripped code");
    }

    // No unwind tables and no frame pointers: the stack ends after frame 0, and says so.
    let bare = build_target(
        src,
        "alloc_funcs_bare",
        "gcc",
        &["-O2", "-g", "-fomit-frame-pointer", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables"],
    );
    let mut target = Target::spawn(&bare);
    let report = attach_json(&mut target, "3s", |t| t.leak());
    assert_no_drops(&report);
    let s = sites(&report).iter().find(|s| frame0(s) == "leak_malloc").expect("leak_malloc site");
    assert_eq!(s["stack_end"], "no-unwind-info");
    assert!(report["activity"]["stacks_without_unwind_info"].as_u64() > Some(0));
    let (b, c, _, _) = sum(sites(&report).iter().filter(|s| frame0(s) == "leak_malloc"));
    assert_eq!((b, c), (4000, 4));
}

/// A C host (no C++ runtime) attached to, then made to dlopen the plugin built from `src`
/// and to leak through it: the JSON report, checked for drops.
fn leak_from_plugin_loaded_after_attach(src: &str, name: &str, compiler: &str) -> Value {
    let plugin = build_target(src, name, compiler, &["-O2", "-g", "-shared", "-fPIC"]);
    let host = build_target("dlopen_host.c", "dlopen_host", "gcc", NOFP_C);
    let mut target = Target::spawn(&host);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", target.pid())).unwrap();
    assert!(!maps.contains("libstdc++"), "the host must start without a C++ runtime");
    let report = attach_json(&mut target, "6s", |t| {
        t.send(&format!("dlopen {}", plugin.display()));
        t.expect("loaded");
        // A new library's rows (and a late C++ runtime's probes) come at the next interval
        // (1 s); loading libstdc++'s rows and attaching its probes takes a while longer.
        std::thread::sleep(std::time::Duration::from_millis(3000));
        t.leak();
    });
    assert_no_drops(&report);
    report
}

#[test]
fn library_loaded_after_attach_gets_unwind_rows_and_symbols() {
    require_root();
    let report = leak_from_plugin_loaded_after_attach("plugin.c", "libplugin.so", "gcc");
    let leaks: Vec<&Value> = sites(&report).iter().filter(|s| has_frame(s, "plugin_leak_inner")).collect();
    let (b, c, _, _) = sum(leaks.iter().copied());
    assert_eq!((b, c), (8 * 4096, 8));
    for s in &leaks {
        assert_chain(s, &["plugin_leak_inner", "plugin_leak", "call_plugin", "main"], "");
        assert_eq!(s["stack_end"], "complete");
    }
}

#[test]
fn cxx_runtime_loaded_after_attach_gets_its_operator_new_probes() {
    require_root();
    let report = leak_from_plugin_loaded_after_attach("plugin_cxx.cpp", "libplugin_cxx.so", "g++");
    let new_probe = report["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["function"] == "_Znwm" && p["module"].as_str().is_some_and(|m| m.contains("libstdc++")))
        .cloned();
    assert!(
        new_probe.as_ref().is_some_and(|p| p["attached"] == true),
        "late operator new probe: {new_probe:?}"
    );
    let leaks: Vec<&Value> =
        sites(&report).iter().filter(|s| has_frame(s, "plugin_cxx_leak_inner")).collect();
    assert!(leaks.iter().all(|s| s["function"] == "operator new"), "{leaks:?}");
    let (b, c, _, _) = sum(leaks.iter().copied());
    assert_eq!((b, c), (8 * 4096, 8), "each block once, as operator new");
    for s in &leaks {
        assert_chain(s, &["plugin_cxx_leak_inner", "plugin_leak", "call_plugin", "main"], "");
    }
}

/// Stacks that do not fit the walker's windows (it copies the stack 4 KiB at a time, four
/// times at most, then reads word by word): a 12 KiB frame, 40 frames of ~700 B (28 KiB), and
/// a new thread's stack, whose top is a few frames above the allocation (a window must stop
/// there, not fault). Each still reaches its root, with exact bytes, in both modes.
#[test]
fn stacks_larger_than_the_walkers_windows_reach_their_roots() {
    require_root();
    let src = "deep_stacks.c";
    let bin = build_target(src, "deep_stacks_nofp", "gcc", NOFP_C);
    for mode in [&[][..], &["--in-process", "--sample-bytes", "1"][..]] {
        let mut target = Target::spawn(&bin);
        let mut args = vec!["--duration", "3s", "--format", "json"];
        args.extend_from_slice(mode);
        let report = attach_report(&mut target, &args, |t| t.leak());
        assert_no_drops(&report);
        let mine: Vec<&Value> = sites(&report).iter().filter(|s| frame0(s) == "leak_here").collect();
        let by = |caller: &str| -> &Value {
            let s: Vec<&&Value> = mine.iter().filter(|s| has_frame(s, caller)).collect();
            assert_eq!(s.len(), 1, "{mode:?}: sites through {caller}: {}", s.len());
            s[0]
        };
        for (caller, chain) in [
            ("leak_under_big_frame", &["leak_here", "leak_under_big_frame", "main"][..]),
            ("leak_deep", &["leak_here", "leak_deep", "main"][..]),
            ("leak_in_thread", &["leak_here", "leak_in_thread"][..]),
        ] {
            let s = by(caller);
            assert_chain(s, chain, src);
            assert_eq!(s["stack_end"], "complete", "{mode:?} {caller}: {}", s["stack_end"]);
            assert_eq!(sum(std::iter::once(s)).0, 3000, "{mode:?} {caller}");
        }
        let deep = by("leak_deep")["frames"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["function"] == "leak_deep")
            .count();
        assert_eq!(deep, 41, "{mode:?}: every recursion level is a frame");
    }
}
