//! The reachability scan (issue 13) against valgrind: each case of `tests/targets/scan_cases.cpp`
//! (and of `scan_heuristics.cpp`) keeps its blocks in one known way; `leakprobe run --scan`
//! must classify them as `valgrind --leak-check=full` does, with the same counts, and
//! attaching to the running program must agree too. Privileged: run as root, one at a time.
//!
//! The comparisons print a row per case (`case | valgrind | leakprobe | agree?`, and for a
//! disagreement who leakprobe says holds the blocks) before they assert, so that one run
//! tells every case's result.

mod common;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

const CASES: &[(&str, &str)] = &[
    // (case, the function whose blocks are compared)
    ("definite", "leak_definite"),
    ("interior", "leak_interior"),
    ("list", "grow_list"),
    ("map", "grow_map"),
    ("ring", "make_ring"),
    ("register", "hold_in_register"),
    ("stack", "hold_on_stack"),
    ("tls", "hold_in_tls"),
    ("mmap", "hold_in_mmap"),
    ("dontfork", "hold_in_special_mmap"),
    ("wipeonfork", "hold_in_special_mmap"),
    // Issue 21.
    ("self", "leak_self_ref"),
    ("deadstack", "stash_dead"),
    ("redzone", "hold_in_red_zone"),
    ("unaligned", "leak_unaligned"),
    ("bigheld", "hold_big"),
    ("biglost", "leak_big"),
    ("scratch", "leak_to_scratch"),
    ("dlclose", "make_pairs_via_plugin"),
    ("maintls", "hold_in_main_tls"),
    ("key", "hold_in_key"),
    ("joined", "stash_joined"),
    ("coroutine", "coroutine_body"),
];

/// The cases of `scan_heuristics.cpp` (issue 21): blocks reached from a global only through
/// an interior pointer, in the layouts valgrind's heuristics call still reachable.
const HEURISTIC_CASES: &[(&str, &str)] =
    &[("string", "hold_strings"), ("newarray", "hold_new_arrays"), ("multi", "hold_second_bases")];

/// Cases whose blocks are held in a way that exists only when the program calls exit(): not
/// compared in a live attach. `scratch` keeps its pointers in a global until main moves them
/// into caller-saved registers to call exit().
const AT_EXIT_ONLY: &[&str] = &["scratch"];

const CLASSES: [&str; 4] = ["definitely_lost", "indirectly_lost", "possibly_lost", "reachable"];

fn target() -> PathBuf {
    // The "dlclose" case loads the library from the directory of the binary. With frame
    // pointers: it allocates right after dlopen, before leakprobe has loaded its unwind rows
    // (at the next interval), and the stacks must still reach the host's frame that the
    // comparison selects (unwinding a library loaded late is unwind.rs's subject, not this).
    build_target(
        "scan_plugin.c",
        "libscan_plugin.so",
        "gcc",
        &["-O2", "-g", "-shared", "-fPIC", "-fno-omit-frame-pointer"],
    );
    build_target("scan_cases.cpp", "scan_cases", "g++", &["-O2", "-g", "-fomit-frame-pointer", "-pthread"])
}

fn heuristics_target() -> PathBuf {
    build_target(
        "scan_heuristics.cpp",
        "scan_heuristics",
        "g++",
        &["-O2", "-g", "-fomit-frame-pointer", "-D_GLIBCXX_USE_CXX11_ABI=0"],
    )
}

/// Every case with its binary: (binary, case, function).
fn every_case() -> Vec<(PathBuf, &'static str, &'static str)> {
    let (cases, heuristics) = (target(), heuristics_target());
    CASES
        .iter()
        .map(|&(c, f)| (cases.clone(), c, f))
        .chain(HEURISTIC_CASES.iter().map(|&(c, f)| (heuristics.clone(), c, f)))
        .collect()
}

type Classes = BTreeMap<&'static str, (u64, u64)>;

/// `definitely_lost 640 B/10, indirectly_lost 480 B/10` (bytes/blocks), or `none`.
fn show(c: &Classes) -> String {
    if c.is_empty() {
        return "none".into();
    }
    c.iter().map(|(k, (b, n))| format!("{k} {b} B/{n}")).collect::<Vec<_>>().join(", ")
}

/// Who leakprobe says holds `func`'s blocks: each site's classes and `held_by` entries.
fn holders(report: &Value, func: &str) -> String {
    let mut out = Vec::new();
    for s in sites(report).iter().filter(|s| has_frame(s, func) && s["function"] != "mmap") {
        let held: Vec<String> = s["held_by"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|h| {
                        format!(
                            "{} {:?} ({} blocks, {} B, chain {})",
                            h["kind"].as_str().unwrap_or("?"),
                            h["holder"].as_str().unwrap_or("?"),
                            h["blocks"],
                            h["bytes"],
                            h["chain"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(format!(
            "        site {} ({} of {}): reachability {}; held_by [{}]",
            s["stack_id"].as_str().unwrap_or("?"),
            s["function"].as_str().unwrap_or("?"),
            s["outstanding_count"],
            s["reachability"],
            held.join("; ")
        ));
    }
    if out.is_empty() { "        (no site of it in the report)".into() } else { out.join("\n") }
}

/// Runs `f`, turning a panic into its message: one case's failure must not hide the others'.
fn attempt<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into())
    })
}

/// Prints the table, then fails naming every case that did not agree.
fn print_then_assert(title: &str, header: &str, rows: &[String], failed: &[String]) {
    println!("{title}\n{header}\n{}", rows.join("\n"));
    assert!(failed.is_empty(), "{title}: {} case(s) disagree: {}", failed.len(), failed.join(", "));
}

/// (class -> (bytes, blocks)) of valgrind's loss records whose stack holds `func`.
///
/// Valgrind's client memory starts at 4 GiB: by default its heap sits at 0x4000000 and up, the
/// range of small integers (ELF hashes of symbol versions in ld.so's data, say), which it
/// then takes for interior pointers into megabyte blocks (such blocks came out "possibly
/// lost" in `biglost`). A real process's heap is never there, so neither is valgrind's here.
fn valgrind_classes(bin: &std::path::Path, case: &str, func: &str) -> Classes {
    let xml = tempfile::NamedTempFile::new().unwrap();
    let out = fed(Command::new("valgrind")
        .args(["--aspace-minaddr=0x100000000", "--leak-check=full", "--show-leak-kinds=all", "--xml=yes"])
        .arg(format!("--xml-file={}", xml.path().display()))
        .arg(bin)
        .arg(case));
    assert!(out.status.success(), "valgrind run of {case}: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(xml.path()).unwrap();
    let tag = |s: &str, t: &str| -> Option<String> {
        let a = s.find(&format!("<{t}>"))? + t.len() + 2;
        let b = a + s[a..].find(&format!("</{t}>"))?;
        Some(s[a..b].to_string())
    };
    let mut out = BTreeMap::new();
    for record in text.split("<error>").skip(1) {
        let record = &record[..record.find("</error>").unwrap_or(record.len())];
        let class = match tag(record, "kind").as_deref() {
            Some("Leak_DefinitelyLost") => "definitely_lost",
            Some("Leak_IndirectlyLost") => "indirectly_lost",
            Some("Leak_PossiblyLost") => "possibly_lost",
            Some("Leak_StillReachable") => "reachable",
            _ => continue,
        };
        if !record.contains(&format!("<fn>{func}")) {
            continue;
        }
        let mut bytes: u64 = tag(record, "leakedbytes").and_then(|v| v.parse().ok()).unwrap_or(0);
        // A definitely lost record's bytes include the indirectly lost blocks it leads:
        // "1,920 (720 direct, 1,200 indirect) bytes in 10 blocks are definitely lost".
        if let Some(text) = tag(record, "text")
            && let Some(open) = text.find('(')
            && let Some(direct) = text[open + 1..].split(" direct").next()
            && let Ok(d) = direct.replace(',', "").parse()
        {
            bytes = d;
        }
        let blocks: u64 = tag(record, "leakedblocks").and_then(|v| v.parse().ok()).unwrap_or(0);
        let e = out.entry(class).or_insert((0, 0));
        e.0 += bytes;
        e.1 += blocks;
    }
    out
}

/// The same, from a leakprobe report: the sites whose stack holds `func`.
fn leakprobe_classes(report: &Value, func: &str) -> Classes {
    let mut out = BTreeMap::new();
    // mmap regions are roots, not blocks (as in valgrind).
    for s in sites(report).iter().filter(|s| has_frame(s, func) && s["function"] != "mmap") {
        let r = &s["reachability"];
        assert!(r.is_object(), "no reachability for a site of {func}: {s}");
        for class in CLASSES {
            let (b, c) = (r[class]["bytes"].as_u64().unwrap_or(0), r[class]["count"].as_u64().unwrap_or(0));
            if c > 0 {
                let e = out.entry(class).or_insert((0, 0));
                e.0 += b;
                e.1 += c;
            }
        }
    }
    out
}

/// Runs `cmd` (a scan case, directly or under a tool) fed "leak" then "exit" on stdin.
fn fed(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (installed by cargo xtask setup?)"));
    {
        use std::io::Write as _;
        writeln!(child.stdin.as_mut().unwrap(), "leak\nexit").unwrap();
    }
    child.wait_with_output().unwrap()
}

/// `leakprobe run --scan ARGS -- scan_cases CASE`, fed "leak" then "exit".
fn run_case(bin: &std::path::Path, case: &str, args: &[&str]) -> std::process::Output {
    fed(Command::new(leakprobe_bin()).args(["run", "--scan"]).args(args).arg("--").arg(bin).arg(case))
}

/// `leakprobe run --scan` on one case: its JSON report.
fn run_scan(bin: &std::path::Path, case: &str) -> Value {
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let path = out_file.path().to_str().unwrap().to_string();
    let out = run_case(bin, case, &["--format", "json", "--output", &path]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn run_scan_classes_agree_with_valgrind_on_every_case() {
    require_root();
    let (mut rows, mut failed) = (Vec::new(), Vec::new());
    for (bin, case, func) in every_case() {
        let expected = valgrind_classes(&bin, case, func);
        let got = attempt(|| {
            let report = run_scan(&bin, case);
            assert_eq!(report["target"]["exit_status"].as_i64(), Some(0), "{case}: exit status");
            let scan = &report["scan"];
            assert!(scan["pause_ms"].as_f64().is_some_and(|p| p > 0.0), "{case}: {scan}");
            (leakprobe_classes(&report, func), report)
        });
        let agree = !expected.is_empty() && got.as_ref().is_ok_and(|(g, _)| *g == expected);
        let shown = match &got {
            Ok((g, _)) => show(g),
            Err(e) => format!("FAILED: {e}"),
        };
        let valgrind = if expected.is_empty() {
            format!("none (valgrind saw no block of {func})")
        } else {
            show(&expected)
        };
        rows.push(format!("{case:<10} | {valgrind} | {shown} | {}", if agree { "yes" } else { "NO" }));
        if !agree {
            if let Ok((_, report)) = &got {
                rows.push(holders(report, func));
            }
            failed.push(case.to_string());
        }
    }
    print_then_assert(
        "run --scan vs valgrind, classes of each case's blocks (bytes/blocks)",
        "case       | valgrind | leakprobe | agree?",
        &rows,
        &failed,
    );
}

#[test]
fn the_global_lists_holder_is_named_and_the_ring_is_a_cycle() {
    require_root();
    let bin = target();
    let report = run_scan(&bin, "list");
    let list = sites(&report).iter().find(|s| has_frame(s, "grow_list")).expect("grow_list's site");
    let holder = &list["held_by"][0];
    assert_eq!(holder["kind"], "global", "{list}");
    assert!(holder["holder"].as_str().unwrap().contains("cache_head"), "{holder}");
    assert_eq!(holder["blocks"].as_u64(), Some(10), "{holder}");
    assert_eq!(holder["chain"].as_u64(), Some(10), "each node linked from the previous one: {holder}");

    let report = run_scan(&bin, "ring");
    let cycles = report["scan"]["cycles"].as_array().unwrap();
    assert_eq!(cycles.len(), 10, "one cycle per Session <-> Connection ring: {cycles:?}");
    assert!(cycles.iter().all(|c| c["blocks"] == 2), "{cycles:?}");
    let ring = sites(&report).iter().filter(|s| has_frame(s, "make_ring")).collect::<Vec<_>>();
    assert!(ring.iter().all(|s| s["verdict"] == "CYCLE"), "{ring:?}");

    let report = run_scan(&bin, "definite");
    assert_eq!(report["verdict"]["kind"], "leak", "{}", report["verdict"]);
    let leak = sites(&report).iter().find(|s| has_frame(s, "leak_definite")).unwrap();
    assert_eq!(leak["verdict"], "LEAK");
}

/// Attached to the running program (blocks tracked from attach on), the classes are the
/// same as in run mode, and as valgrind's (except for the cases that exist only at exit()).
#[test]
fn live_attach_scan_agrees_with_run_mode() {
    require_root();
    let (mut rows, mut failed) = (Vec::new(), Vec::new());
    for (bin, case, func) in every_case().into_iter().filter(|(_, c, _)| !AT_EXIT_ONLY.contains(c)) {
        let expected = valgrind_classes(&bin, case, func);
        let run = attempt(|| leakprobe_classes(&run_scan(&bin, case), func));
        let got = attempt(|| {
            let mut t = Target::spawn_with_args(&bin, &[case]);
            let report =
                attach_report(&mut t, &["--duration", "2s", "--format", "json", "--scan"], |t| t.leak());
            assert!(report["scan"]["method"] == "clone", "{}", report["scan"]);
            t.send("exit");
            assert!(t.child.wait().unwrap().success(), "{case}: the target exits 0 after the scan");
            (leakprobe_classes(&report, func), report)
        });
        let agree = !expected.is_empty()
            && run.as_ref().is_ok_and(|r| *r == expected)
            && got.as_ref().is_ok_and(|(g, _)| *g == expected);
        let run_shown = match &run {
            Ok(r) => show(r),
            Err(e) => format!("FAILED: {e}"),
        };
        let shown = match &got {
            Ok((g, _)) => show(g),
            Err(e) => format!("FAILED: {e}"),
        };
        rows.push(format!(
            "{case:<10} | {} | {run_shown} | {shown} | {}",
            show(&expected),
            if agree { "yes" } else { "NO" }
        ));
        if !agree {
            if let Ok((_, report)) = &got {
                rows.push(holders(report, func));
            }
            failed.push(case.to_string());
        }
    }
    print_then_assert(
        "attach --scan vs run --scan vs valgrind, classes of each case's blocks (bytes/blocks)",
        "case       | valgrind | run --scan | attach --scan | agree?",
        &rows,
        &failed,
    );
}

/// 21 SIGKILLs of leakprobe during periodic scans of a target whose 16 threads allocate
/// without pause, with every probe attached: each time no thread is left stopped, nothing
/// traces it, and no snapshot child (running or zombie) is left under it; it runs on and
/// exits 0. The stops and the clone are the ptrace helper's, which holds no probe: the
/// longest time any thread stays stopped after a kill is bounded by the stop under way, not
/// by the kernel's uprobe teardown (~0.1 s per probe). Measured every millisecond, printed,
/// and held to 100 ms.
#[test]
fn twenty_sigkills_during_scans_leave_no_stopped_thread_and_no_child() {
    require_root();
    let bin =
        build_target("threads.c", "threads_nofp", "gcc", &["-O2", "-g", "-fomit-frame-pointer", "-pthread"]);
    let mut target = Target::spawn(&bin);
    target.send("spin");
    target.expect("spinning");
    let pid = target.pid();
    let pid_s = pid.to_string();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let (mut during_snapshot, mut during_stop) = (0, 0);
    let mut worst = StopsAfterKill::default();
    let mut slowest_clean = Duration::ZERO;
    let mut probes = usize::MAX;
    for i in 0..21 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Every third round holds each stop 150 ms (within --max-pause 1s) and kills inside it.
        let inside_stop = i % 3 == 2;
        let env: &[(&str, &str)] = if inside_stop {
            &[("LEAKPROBE_TEST_STOP_HOLD_MS", "150")]
        } else {
            &[("LEAKPROBE_TEST_SCAN_HOLD_MS", "300")]
        };
        let mut lp = Leakprobe::start_env(
            &["attach", "--pid", &pid_s, "--scan-every", "1s", "--interval", "1s", "--max-pause", "1s"],
            env,
        );
        lp.wait_attached();
        probes = probes.min(our_links());
        let deadline = Instant::now() + Duration::from_secs(20);
        match i % 3 {
            // Within the snapshot's life: it appears under the target at the first scan, ~1 s
            // in, and lives 300 ms more.
            0 => {
                while children_of(pid).is_empty() {
                    assert!(Instant::now() < deadline, "round {i}: no scan within 20 s");
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(Duration::from_millis(x % 300));
            }
            // Anywhere in the first 1.6 s: stopping, cloning, marking, reaping, between scans.
            1 => std::thread::sleep(Duration::from_millis(x % 1600)),
            // Inside the scan's stop.
            _ => {
                while stopped_threads(pid).0 == 0 {
                    assert!(Instant::now() < deadline, "round {i}: no stop within 20 s");
                    std::thread::sleep(Duration::from_micros(200));
                }
                std::thread::sleep(Duration::from_millis(x % 100));
            }
        }
        if !children_of(pid).is_empty() {
            during_snapshot += 1;
        }
        let stopped_at_kill = stopped_threads(pid).0 > 0;
        lp.child.kill().unwrap();
        let killed = Instant::now();
        during_stop += stopped_at_kill as usize;
        let stops =
            watch_stops_after_kill(pid, killed, Duration::from_secs(10), &format!("kill #{i}"), || {
                stopped_threads(pid).1 == "0" && children_of(pid).is_empty()
            });
        if stops.longest() > worst.longest() {
            worst = stops;
        }
        slowest_clean = slowest_clean.max(stops.clean);
        let _ = lp.finish();
        assert!(target.is_running(), "target died after kill #{i}");
    }
    println!(
        "21 kills with {probes} probes attached: {during_stop} inside a stop, {during_snapshot} while a \
         snapshot child existed; longest stop after a kill {:?} (until every thread ran {:?}, later \
         stops {:?}); slowest clean-up (no tracer, no child) {slowest_clean:?}",
        worst.longest(),
        worst.first,
        worst.later
    );
    assert!(probes >= 12, "only {probes} probes attached: the kill did not face the slow teardown");
    assert!(during_stop >= 5, "only {during_stop} kills landed inside a stop: the test did not test it");
    assert!(
        during_snapshot >= 3,
        "only {during_snapshot} kills hit a live snapshot: the test did not test it"
    );
    assert!(
        worst.longest() <= Duration::from_millis(100),
        "a thread stayed stopped {:?} after a kill: {worst:?}",
        worst.longest()
    );
    assert_all_gone("after 21 SIGKILLs during scans");
    target.send("exit");
    assert_eq!(target.child.wait().unwrap().code(), Some(0));
}

/// A target whose seccomp filter denies clone: no snapshot can be forked in it, so its
/// memory is copied while it is stopped, within --max-pause; with a bound too small for that
/// the scan is refused, saying why, and the target runs on.
#[test]
fn a_target_that_may_not_clone_is_copied_within_the_pause_or_refused() {
    require_root();
    let bin = build_target("seccomp_leak.c", "seccomp_leak", "gcc", NOFP_C);
    let mut t = Target::spawn(&bin);
    let status = std::fs::read_to_string(format!("/proc/{}/status", t.pid())).unwrap();
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "the filter is on");
    let report = attach_report(&mut t, &["--duration", "2s", "--format", "json", "--scan"], |t| t.leak());
    let scan = &report["scan"];
    assert_eq!(scan["method"], "stopped-copy", "{scan}");
    assert!(scan["no_clone_why"].as_str().unwrap().contains("seccomp"), "{scan}");
    let pause = scan["pause_ms"].as_f64().unwrap();
    assert!(pause <= 200.0, "paused {pause} ms, over the default --max-pause");
    let dropped = leakprobe_classes(&report, "drop_blocks");
    assert_eq!(dropped.get("definitely_lost"), Some(&(1000, 10)), "{dropped:?}");
    let kept = leakprobe_classes(&report, "keep_blocks");
    assert_eq!(kept.get("reachable"), Some(&(2000, 10)), "{kept:?}");

    // 1 ms cannot hold a copy of its memory: refused, the target untouched.
    let (code, out, err) = attach_with(
        &mut t,
        &["--duration", "1s", "--format", "json", "--scan", "--max-pause", "1ms"],
        |_| {},
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("scan failed") && err.contains("--max-pause"), "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(report["scan"].is_null());
    assert_eq!(stopped_threads(t.pid()), (0, "0".to_string()));
    t.leak();
    t.send("exit");
    assert_eq!(t.child.wait().unwrap().code(), Some(0));
}

/// `--scan-every`: a scan per second feeds the timeline; the chart marks them; snapshots carry
/// the latest classes, and `diff` compares them; pprof samples carry a `reachability` label.
#[test]
fn periodic_scans_reach_the_chart_the_snapshots_diff_and_pprof() {
    require_root();
    let bin = target();
    let dir = tempfile::tempdir().unwrap();
    let (svg, snaps, pprof) =
        (dir.path().join("t.svg"), dir.path().join("snaps"), dir.path().join("p.pb.gz"));
    let mut t = Target::spawn_with_args(&bin, &["definite"]);
    let args = [
        "--duration",
        "4s",
        "--format",
        "json",
        "--scan-every",
        "1s",
        "--snapshot-every",
        "1s",
        "--snapshot-dir",
        snaps.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
        "--pprof",
        pprof.to_str().unwrap(),
    ];
    let report = attach_report(&mut t, &args, |t| {
        t.leak();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        t.leak();
    });
    let history = report["scan"]["history"].as_array().unwrap();
    assert!(history.len() >= 3, "one scan per second and one at the end: {history:?}");
    let lost: Vec<u64> = history.iter().map(|p| p["definitely_lost_bytes"].as_u64().unwrap()).collect();
    assert!(lost.first() < lost.last(), "the leak grows between scans: {lost:?}");
    assert_eq!(*lost.last().unwrap(), 2000, "20 blocks of 100 B lost at the end");
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.contains("scan: definitely lost"), "the chart marks the scans");

    // The first snapshot with a scan against the last: the classes grew.
    let mut files: Vec<_> = std::fs::read_dir(&snaps).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let first = files
        .iter()
        .find(|f| std::fs::read_to_string(f).unwrap().contains("\"reachability\""))
        .expect("a snapshot with a scan");
    let last = files.last().unwrap();
    assert_ne!(first, last, "{files:?}");
    let out = run_leakprobe(&["diff", first.to_str().unwrap(), last.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("scan classes, A -> B: definitely lost 1000 B -> 1.95 KiB"), "{text}");

    // pprof: go tool pprof sees the label.
    let tags = Command::new("go").args(["tool", "pprof", "-tags"]).arg(&pprof).output().unwrap();
    let tags = String::from_utf8_lossy(&tags.stdout);
    assert!(tags.contains("reachability") && tags.contains("definitely_lost"), "{tags}");
    t.send("exit");
    assert!(t.child.wait().unwrap().success());
}

/// `run --scan --fail-on-leak N` gates on definitely lost bytes: a program that leaks fails
/// (exit 1), one whose memory is all still referenced passes.
#[test]
fn fail_on_leak_with_a_scan_judges_definitely_lost_bytes() {
    require_root();
    let bin = target();
    for (case, code) in [("definite", 1), ("list", 0)] {
        let out = run_case(&bin, case, &["--fail-on-leak", "0"]);
        assert_eq!(out.status.code(), Some(code), "{case}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `run --scan` stops the command at exit() (SIGSTOP from eBPF). If leakprobe is SIGKILLed
/// then, in the middle of the scan, the command must not stay stopped: the guard continues
/// it (and keeps doing so while the kernel removes the dead leakprobe's probe), and it ends.
#[test]
fn sigkill_while_the_command_is_stopped_at_exit_lets_it_finish() {
    require_root();
    let bin = target();
    let mut lp = Leakprobe::start_env(
        &["run", "--scan", "--", bin.to_str().unwrap(), "definite"],
        &[("LEAKPROBE_TEST_SCAN_HOLD_MS", "3000")],
    );
    // Its stdin is null: the command reads EOF at once and calls exit().
    lp.wait_for("called exit()");
    let pid = loop {
        if let Some(&p) = children_named(lp.child.id() as i32, "scan_cases").first() {
            break p;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    std::thread::sleep(Duration::from_millis(500)); // inside the scan's hold
    assert_eq!(stopped_threads(pid).0, 1, "stopped at exit() for the scan");
    let probes = our_links();
    lp.child.kill().unwrap();
    let killed = Instant::now();
    // Until it has exited (a zombie until init reaps it, then gone). The guard's pipe comes
    // before every probe's descriptor: it continues the command before the kernel has closed
    // the probes, and again each time the exit probe stops it until then.
    let stops = watch_stops_after_kill(pid, killed, Duration::from_secs(10), "stopped at exit()", || {
        state_of(pid).is_none_or(|s| s == 'Z')
    });
    println!(
        "with {probes} probes attached, the command stayed stopped {:?} after the SIGKILL (later stops \
         {:?}) and ended {:?} after it",
        stops.first, stops.later, stops.clean
    );
    let _ = lp.finish();
    assert!(probes >= 12, "only {probes} probes attached");
    assert!(
        stops.longest() <= Duration::from_millis(100),
        "stopped {:?} after the kill: {stops:?}",
        stops.longest()
    );
}
