//! --pprof, --flamegraph and --folded on a real leaking target, each opened by the tool it is
//! for: `go tool pprof` (Debian golang-go), headless Chromium (Debian chromium), and the folded
//! text itself. Privileged: run as root, one at a time (`cargo xtask test` does both).

mod common;

use common::*;
use serde_json::Value;

const SRC: &str = "alloc_funcs.c";
/// What alloc_funcs.c leaks through leak_malloc per round: 4 blocks of 1000 bytes.
const LEAK_MALLOC: (u64, u64) = (4 * 1000, 4);

/// Outstanding (bytes, count) of the JSON report's sites whose leaf is `func`.
fn outstanding_of(report: &Value, func: &str) -> (u64, u64) {
    let (b, c, _, _) = sum(sites(report).iter().filter(|s| frame0(s) == func));
    (b, c)
}

/// 4000 -> "4,000", as inferno prints counts.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn pprof_flamegraph_and_folded_of_a_real_leak() {
    require_root();
    let bin = build_target(SRC, "alloc_funcs_nofp", "gcc", NOFP_C);
    let dir = tempfile::tempdir().unwrap();
    let (pprof, svg, folded) =
        (dir.path().join("leak.pb.gz"), dir.path().join("leak.svg"), dir.path().join("leak.folded"));
    let mut target = Target::spawn(&bin);
    let (code, out, err) = attach_with(
        &mut target,
        &[
            "--duration",
            "3s",
            "--format",
            "json",
            "--pprof",
            pprof.to_str().unwrap(),
            "--flamegraph",
            svg.to_str().unwrap(),
            "--folded",
            folded.to_str().unwrap(),
        ],
        |t| t.leak(),
    );
    assert_eq!(code, 0, "leakprobe failed:\n{err}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{out}"));
    assert_no_drops(&report);
    // The JSON report of the same run agrees with what the target is known to leak.
    assert_eq!(outstanding_of(&report, "leak_malloc"), LEAK_MALLOC);
    let total = report["totals"]["outstanding_bytes"].as_u64().unwrap();

    // (a) pprof: the real go tool pprof reads it; leak_malloc is the leaf of its bytes.
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let space =
        go_pprof(&home, &["-top", "-sample_index=inuse_space", "-unit=byte", "-nodecount=1000"], &pprof);
    eprintln!("go tool pprof -top -sample_index=inuse_space:\n{space}");
    assert_eq!(
        top_row(&space, "leak_malloc"),
        (format!("{}B", LEAK_MALLOC.0).as_str(), format!("{}B", LEAK_MALLOC.0).as_str())
    );
    // Every leak is under main.
    assert_eq!(top_row(&space, "main").1, format!("{total}B"));
    let objects = go_pprof(&home, &["-top", "-sample_index=inuse_objects", "-nodecount=1000"], &pprof);
    eprintln!("go tool pprof -top -sample_index=inuse_objects:\n{objects}");
    let n = LEAK_MALLOC.1.to_string();
    assert_eq!(top_row(&objects, "leak_malloc"), (n.as_str(), n.as_str()));
    // The allocation function is a label of each sample.
    let tags = go_pprof(&home, &["-tags", "-sample_index=inuse_objects"], &pprof);
    assert!(tags.contains("allocator") && tags.contains("malloc") && tags.contains("mmap"), "{tags}");

    // (b) flame graph: Chromium renders it, and the leaking frame is in the document, with
    // its bytes in the tooltip inferno writes.
    let dom = chromium_dom(&svg, &dir.path().join("chromium"));
    let tooltip = format!("leak_malloc ({} bytes", thousands(LEAK_MALLOC.0));
    assert!(dom.contains(&tooltip), "{tooltip:?} not in Chromium's DOM of the flame graph:\n{dom}");
    assert!(dom.contains("Outstanding memory by call site"), "title missing");

    // (c) folded: the leaking stack's line, root first, ends in the allocator, exact bytes.
    let text = std::fs::read_to_string(&folded).unwrap();
    let line = text
        .lines()
        .find(|l| l.rsplit_once(' ').is_some_and(|(stack, _)| stack.ends_with(";leak_malloc;malloc")))
        .unwrap_or_else(|| panic!("no leak_malloc stack in the folded file:\n{text}"));
    assert!(line.contains("main;do_leaks;leak_malloc;malloc "), "{line}");
    assert_eq!(line.rsplit_once(' ').unwrap().1, LEAK_MALLOC.0.to_string());
    // Every outstanding byte is on some line, once.
    // The first line is leakprobe's authorship mark, a comment that readers skip.
    assert!(text.starts_with("# leakprobe "), "{text}");
    let sum: u64 = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum();
    assert_eq!(sum, total);
}

#[test]
fn export_paths_are_checked_before_attaching() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("link.svg");
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).unwrap();
    let bin = build_target(SRC, "alloc_funcs_nofp", "gcc", NOFP_C);
    let target = Target::spawn(&bin);
    let out = run_leakprobe(&[
        "attach",
        "--pid",
        &target.pid().to_string(),
        "--flamegraph",
        link.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("symlink") && err.contains("nothing was attached"), "{err}");
    assert!(!dir.path().join("elsewhere").exists());
    assert_all_gone("after a refused export path");
}
