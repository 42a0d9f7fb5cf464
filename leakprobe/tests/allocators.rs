//! Other allocators: the hooks go where the target's calls really bind (jemalloc, tcmalloc,
//! mimalloc linked or preloaded, musl, static executables), their own APIs and sized frees
//! are seen, and what is not hooked is said loudly. Privileged: run as root, one at a time.

mod common;

use common::*;
use serde_json::Value;

const SRC: &str = "allocators.c";

/// Outstanding (bytes, count) per leaking function of `tests/targets/allocators.c`, as its
/// header comment specifies them: per round.
const PLAIN_LEAKS: &[(&str, u64, u64)] = &[
    ("leak_malloc", 4000, 4),
    ("leak_calloc", 3000, 3),
    ("leak_realloc", 4096, 2),
    ("leak_posix_memalign", 1536, 3),
    ("leak_aligned_alloc", 2048, 2),
];
const API_LEAKS: &[(&str, u64, u64)] =
    &[("leak_api", 8192, 2), ("leak_api_realloc", 3000, 1), ("leak_new", 600, 3)];

/// Frees per round: churn() frees 4 blocks x 500, churn_api() 4 x 300.
const PLAIN_FREES: u64 = 2000;
const API_FREES: u64 = 1200;

fn c_flags(extra: &[&'static str]) -> Vec<&'static str> {
    let mut f = NOFP_C.to_vec();
    f.extend_from_slice(extra);
    f
}

/// allocators.c built with `define` and linked against the allocator library `lib`.
fn linked(name: &str, define: &'static str, lib: &'static str) -> std::path::PathBuf {
    build_target(SRC, name, "gcc", &c_flags(&[define, "-Wl,--no-as-needed", lib]))
}

/// Traces one `leak` round and checks the figures exactly: every leak at its own call site,
/// nothing else outstanding, every free seen (none unknown), no drops. Returns the report.
fn check_exact(target: &mut Target, with_api: bool, args: &[&str]) -> Value {
    let mut all = vec!["--duration", "4s", "--format", "json"];
    all.extend_from_slice(args);
    let (code, out, err) = attach_with(target, &all, |t| t.leak());
    assert_eq!(code, 0, "leakprobe failed:\n{err}");
    let report: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{out}\n{err}"));
    let leaks: Vec<_> = PLAIN_LEAKS.iter().chain(if with_api { API_LEAKS } else { &[] }).collect();
    let mut want_total = 0;
    for (func, bytes, count) in &leaks {
        let (b, c, _, _) = sum(sites(&report).iter().filter(|s| in_function(s, func)));
        assert_eq!((b, c), (*bytes, *count), "{func}: outstanding (bytes, objects)\n{err}");
        want_total += bytes;
    }
    assert_eq!(report["totals"]["outstanding_bytes"].as_u64(), Some(want_total), "nothing else outstanding");
    let frees = PLAIN_FREES + if with_api { API_FREES } else { 0 };
    assert_eq!(report["activity"]["free_calls"].as_u64(), Some(frees), "every free seen once");
    assert_eq!(report["activity"]["unknown_frees"].as_u64(), Some(0), "no free seen twice or unmatched");
    assert_no_drops(&report);
    report
}

/// Whether a frame of the site is exactly in `func`.
fn in_function(site: &Value, func: &str) -> bool {
    site["frames"].as_array().unwrap().iter().any(|f| f["function"] == func)
}

fn assert_allocator(report: &Value, name: &str, module_part: &str) {
    let a = &report["allocator"];
    assert_eq!(a["name"], name, "{a}");
    assert!(
        a["module"].as_str().unwrap().contains(module_part),
        "allocator module {} lacks {module_part}",
        a["module"]
    );
    assert!(a["warning"].is_null(), "{a}");
    // Every probe of the C family sits on the allocator's module.
    for p in report["probes"].as_array().unwrap() {
        if ["malloc", "free", "calloc", "realloc"].contains(&p["function"].as_str().unwrap())
            && !p["watch_only"].as_bool().unwrap()
        {
            assert!(p["module"].as_str().unwrap().contains(module_part), "{p}");
        }
    }
}

#[test]
fn jemalloc_linked_with_its_own_api_and_sized_frees() {
    require_root();
    let bin = linked("alloc_jemalloc", "-DUSE_JEMALLOC", "-ljemalloc");
    let mut target = Target::spawn(&bin);
    let report = check_exact(&mut target, true, &[]);
    assert_allocator(&report, "jemalloc", "libjemalloc.so.2");
    // glibc's malloc is shadowed: watched, and never called here.
    assert!(
        report["allocator"]["shadowed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m.as_str().unwrap().contains("libc.so"))
    );
    assert_eq!(report["drops"]["untracked_allocator_calls"].as_u64(), Some(0));
    // jemalloc's malloc opens with `cmp $0x1000,%rdi; ja`: its probes sit on the emulated
    // `ja`, and the figures above stayed exact.
    let probe = |f: &str| report["probes"].as_array().unwrap().iter().find(|p| p["function"] == f).cloned();
    let malloc = probe("malloc").unwrap();
    assert!(malloc["offset"].as_u64().unwrap() > 0 && malloc["placement"].is_string(), "{malloc}");
    // operator delete(void*) is `jmp free@plt`: probed once, at free.
    let dl = report["probes"].as_array().unwrap().iter().find(|p| p["function"] == "_ZdlPv").unwrap();
    assert_eq!(dl["alias_of"], "free", "{dl}");
    assert!(sites(&report).iter().any(|s| s["function"] == "mallocx" && has_frame(s, "leak_api")));
    assert!(sites(&report).iter().any(|s| s["function"] == "operator new" && has_frame(s, "leak_new")));
    assert_all_gone("after the jemalloc trace");
}

#[test]
fn tcmalloc_linked_and_preloaded() {
    require_root();
    let bin = linked("alloc_tcmalloc", "-DUSE_TCMALLOC", "-ltcmalloc_minimal");
    let mut target = Target::spawn(&bin);
    let report = check_exact(&mut target, true, &[]);
    assert_allocator(&report, "tcmalloc", "libtcmalloc_minimal.so.4");
    drop(target);

    // Preloaded into a program built for glibc: the calls bind to tcmalloc, not glibc.
    let plain = build_target(SRC, "alloc_plain", "gcc", NOFP_C);
    let lib = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4";
    let mut target = Target::spawn_env(&plain, &[("LD_PRELOAD", lib)]);
    let report = check_exact(&mut target, false, &[]);
    assert_allocator(&report, "tcmalloc", "libtcmalloc_minimal.so.4");
    assert_all_gone("after the tcmalloc traces");
}

#[test]
fn mimalloc_linked_with_its_own_api() {
    require_root();
    let bin = linked("alloc_mimalloc", "-DUSE_MIMALLOC", "-lmimalloc");
    let mut target = Target::spawn(&bin);
    let report = check_exact(&mut target, true, &[]);
    assert_allocator(&report, "mimalloc", "libmimalloc.so.2");
    assert_all_gone("after the mimalloc trace");
}

#[test]
fn musl_dynamic() {
    require_root();
    let bin = build_target(SRC, "alloc_musl", "musl-gcc", NOFP_C);
    let mut target = Target::spawn(&bin);
    let report = check_exact(&mut target, false, &[]);
    assert_allocator(&report, "musl", "musl");
    assert_all_gone("after the musl trace");
}

#[test]
fn static_executables_are_hooked_in_themselves() {
    require_root();
    for (compiler, name, kind) in
        [("musl-gcc", "alloc_musl_static", "musl"), ("gcc", "alloc_glibc_static", "glibc")]
    {
        let bin = build_target(SRC, name, compiler, &c_flags(&["-static"]));
        let mut target = Target::spawn(&bin);
        let report = check_exact(&mut target, false, &[]);
        assert_allocator(&report, kind, name);
        assert_eq!(report["allocator"]["static_executable"], true);
    }
    assert_all_gone("after the static traces");
}

#[test]
fn overrides_and_what_is_not_hooked_is_said() {
    require_root();
    let bin = linked("alloc_jemalloc", "-DUSE_JEMALLOC", "-ljemalloc");
    let mut target = Target::spawn(&bin);
    let pid = target.pid().to_string();
    let refused = |args: &[&str], needle: &str| {
        let mut all = vec!["attach", "--pid", &pid, "--duration", "1s"];
        all.extend_from_slice(args);
        let out = run_leakprobe(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: stderr lacks {needle:?}:\n{stderr}");
        assert_all_gone(&format!("after refusing {args:?}"));
    };
    refused(&["--allocator", "mimalloc"], "maps no mimalloc");
    refused(&["--lib", "libnosuch.so"], "maps no such library");
    refused(&["--lib", "libjemalloc.so.2", "--allocator", "tcmalloc"], "not tcmalloc");
    refused(&["--allocator", "dlmalloc"], "--allocator");

    // --lib by soname: the same as detected.
    let report = check_exact(&mut target, true, &["--lib", "libjemalloc.so.2"]);
    assert_eq!(report["allocator"]["chosen_by"], "--lib");
    assert_allocator(&report, "jemalloc", "libjemalloc.so.2");

    // Forcing glibc on a jemalloc program: jemalloc's malloc is then the shadowed one, and
    // every call into it is counted; the report is degraded and warns, never a silent zero.
    let (code, out, err) =
        attach_with(&mut target, &["--duration", "4s", "--format", "json", "--allocator", "glibc"], |t| {
            t.leak()
        });
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["allocator"]["name"], "glibc");
    let untracked = report["drops"]["untracked_allocator_calls"].as_u64().unwrap();
    // At least churn()'s 500 malloc + 500 calloc + 1000 realloc calls.
    assert!(untracked >= 2000, "untracked calls {untracked}");
    assert_eq!(report["degraded"], true);
    // jemalloc's own API (mallocx, ...) is still hooked: glibc does not define it.
    assert!(sites(&report).iter().any(|s| s["function"] == "mallocx"));
    let (code, text, err) =
        attach_with(&mut target, &["--duration", "3s", "--allocator", "glibc"], |t| t.leak());
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("DEGRADED") && text.contains("shadowed"), "{text}");
    assert_all_gone("after the override traces");
}

/// The same exact figures through the in-process stub (issue 12): the C family through the
/// GOT, each allocator's own API (mallocx, its operator new, sized frees) still on uprobes.
#[test]
fn other_allocators_are_exact_in_process() {
    require_root();
    let in_process = ["--in-process"];
    for (name, define, lib, api, module) in [
        ("alloc_jemalloc", "-DUSE_JEMALLOC", "-ljemalloc", true, "libjemalloc.so.2"),
        ("alloc_tcmalloc", "-DUSE_TCMALLOC", "-ltcmalloc_minimal", true, "libtcmalloc_minimal.so.4"),
        ("alloc_mimalloc", "-DUSE_MIMALLOC", "-lmimalloc", true, "libmimalloc.so.2"),
    ] {
        let mut target = Target::spawn(&linked(name, define, lib));
        let report = check_exact(&mut target, api, &in_process);
        assert_eq!(report["allocator"]["module"].as_str().map(|m| m.contains(module)), Some(true), "{name}");
        assert!(report["in_process"]["restored_slots"].as_u64().unwrap() > 0, "{name}");
    }
    // Preloaded into a program built for glibc: every C-family call binds to the allocator.
    let plain = build_target(SRC, "alloc_plain", "gcc", NOFP_C);
    for (name, lib, module) in [
        ("tcmalloc", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "libtcmalloc_minimal.so.4"),
        ("jemalloc", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "libjemalloc.so.2"),
        ("mimalloc", "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2", "libmimalloc.so.2"),
    ] {
        let mut target = Target::spawn_env(&plain, &[("LD_PRELOAD", lib)]);
        let report = check_exact(&mut target, false, &in_process);
        assert_allocator(&report, name, module);
    }
    let musl = build_target(SRC, "alloc_musl", "musl-gcc", NOFP_C);
    let mut target = Target::spawn(&musl);
    check_exact(&mut target, false, &in_process);
    assert_all_gone("after the in-process allocator traces");
}
