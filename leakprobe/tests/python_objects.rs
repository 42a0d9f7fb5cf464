//! The Python object census (issue 23): `leakprobe attach --scan` on a running CPython counts
//! its live objects by type from outside, and the counts agree with the program's own
//! `gc.get_objects()` taken just before. One case per interpreter: Debian's python3.11 and
//! pyenv's 3.9, 3.10, 3.12, 3.13. Privileged: run as root, one at a time.

mod common;

use std::{collections::HashMap, path::Path};

use common::*;
use serde_json::Value;

const BURSTS: u64 = 3;

/// The program's own `gc.get_objects()` by `module.qualname`.
fn truth(path: &Path) -> HashMap<String, u64> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| {
            let (k, n) = l.rsplit_once(' ')?;
            Some((k.to_string(), n.parse().ok()?))
        })
        .collect()
}

/// Per `module.qualname`: (objects on the collector's lists, all objects).
fn census_types(report: &Value) -> (HashMap<String, u64>, HashMap<String, u64>, &Value) {
    let scan = &report["scan"];
    let objects = &scan["python_objects"];
    assert!(objects.is_object(), "no python_objects in the scan: {scan}");
    assert!(objects["error"].is_null(), "census error: {}", objects["error"]);
    let (mut tracked, mut all) = (HashMap::new(), HashMap::new());
    for t in objects["types"].as_array().expect("types") {
        let name = format!("{}.{}", t["module"].as_str().unwrap(), t["qualname"].as_str().unwrap());
        let count = t["count"].as_u64().unwrap();
        tracked.insert(name.clone(), count - t["untracked"].as_u64().unwrap());
        all.insert(name, count);
    }
    (tracked, all, objects)
}

fn case(python: &Path) {
    case_with(python, false);
}

/// Cycles of two `Node`s (with their `__dict__`s before 3.11) in the census's cycle report.
fn node_pairs(objects: &Value) -> u64 {
    objects["cycles"]
        .as_array()
        .expect("cycles")
        .iter()
        .filter(|c| {
            c["objects"].as_array().is_some_and(|o| {
                o.iter().any(|x| x["type"] == "__main__.Node" && x["count"] == 2)
                    && o.iter().all(|x| x["type"] == "__main__.Node" || x["type"] == "dict")
            })
        })
        .map(|c| c["count"].as_u64().unwrap_or(0))
        .sum()
}

fn spawn(python: &Path, truth_file: &Path, extra: &[&str]) -> Target {
    let script = repo_root().join("tests/targets/py_objects.py");
    let burst = BURSTS.to_string();
    let mut args = vec![script.to_str().unwrap(), truth_file.to_str().unwrap(), &burst];
    args.extend_from_slice(extra);
    Target::spawn_full(python, &args, &[])
}

/// `pprof`: also write a profile and read it back with the real `go tool pprof`.
fn case_with(python: &Path, pprof: bool) {
    require_root();
    assert!(python.exists(), "{} is missing", python.display());
    let dir = tempfile::tempdir().unwrap();
    let truth_file = dir.path().join("truth.txt");
    let mut t = spawn(python, &truth_file, &[]);
    let profile = dir.path().join("census.pb.gz");
    let mut args = vec!["--duration", "1s", "--scan", "--format", "json"];
    if pprof {
        args.extend(["--pprof", profile.to_str().unwrap()]);
    }
    let report = attach_report(&mut t, &args, |_| {});
    let mut want = truth(&truth_file);
    let blocks_want = want.remove("sys.getallocatedblocks").expect("the program's block count");
    let (got, all, objects) = census_types(&report);
    let version = python.display();

    // The collector is off in the program, and the census says so.
    assert_eq!(objects["gc_enabled"], Value::Bool(false), "{version}");
    // Every Node of the cycles, none missing: the collector never ran.
    assert_eq!(got.get("__main__.Node").copied(), Some(2000 * BURSTS), "{version}: Node");
    // And the cycles themselves: pairs that only reach each other, which the collector, off,
    // will never free. The marking is conservative: a stale word left in the interpreter's
    // memory may still seem to reach a pair. The free lists' slots past their count, pymalloc's
    // arena table's unused slots and slack and (3.11+) the frame stack past its top are dead to
    // it; what is left is 2-10 pairs of 3000 (a live C stack word into the compiler's arena of
    // the main module, a dead tuple in untracked memory).
    let pairs = node_pairs(objects);
    assert!(
        (990 * BURSTS..=1000 * BURSTS).contains(&pairs),
        "{version}: {pairs} Node pairs reported as cycles, {} made: {}",
        1000 * BURSTS,
        objects["cycles"]
    );
    let fate = objects["cycles_fate"].as_str().unwrap_or("");
    assert!(fate.contains("disabled"), "{version}: {fate}");
    // Each type the program counted agrees within 1% (a handful of objects is allowed for the
    // types that only have a few: the program's last look itself makes some).
    let mut checked = 0;
    for (k, &n) in &want {
        let g = got.get(k).copied().unwrap_or(0);
        let tolerance = (n as f64 * 0.01).max(3.0);
        assert!(
            (g as f64 - n as f64).abs() <= tolerance,
            "{version}: {k}: census {g}, gc.get_objects() {n}\n(census: {got:?})"
        );
        checked += 1;
    }
    assert!(checked > 10, "{version}: only {checked} types in the ground truth");
    let total_want: u64 = want.values().sum();
    let untracked = objects["untracked_objects"].as_u64().unwrap();
    let tracked_got = objects["objects"].as_u64().unwrap() - untracked;
    let err = tracked_got as f64 / total_want as f64 - 1.0;
    assert!(
        err.abs() <= 0.01,
        "{version}: {tracked_got} objects on the lists, gc.get_objects() {total_want} ({err:+.4})"
    );

    // pymalloc's arenas: every block in use, as the interpreter counts them itself.
    assert!(objects["arenas_not_walked"].is_null(), "{version}: {}", objects["arenas_not_walked"]);
    assert_eq!(objects["bad_pools"], 0, "{version}");
    let blocks = objects["blocks"].as_u64().unwrap();
    let err = blocks as f64 / blocks_want as f64 - 1.0;
    assert!(
        err.abs() <= 0.02,
        "{version}: {blocks} blocks walked, sys.getallocatedblocks() {blocks_want} ({err:+.4})"
    );
    // The cache's bytearrays (not tracked by the collector) are found in the arenas.
    let bytearrays = all.get("builtins.bytearray").copied().unwrap_or(0);
    assert!(
        (200 * BURSTS..=200 * BURSTS + 5).contains(&bytearrays),
        "{version}: {bytearrays} bytearrays, the cache holds {}",
        200 * BURSTS
    );
    // str: the cache's keys at least, and the interpreter's own names.
    let strs = all.get("builtins.str").copied().unwrap_or(0);
    // Nothing found by its shape alone may be a type without a name.
    assert!(all.keys().all(|k| !k.starts_with('?')), "{version}: {all:?}");
    assert!(strs > 200 * BURSTS + 1000, "{version}: only {strs} str");
    println!(
        "{version}: {tracked_got} objects on the lists (gc.get_objects() {total_want}), {untracked} more in the arenas \
         ({strs} str, {bytearrays} bytearray); {blocks} blocks (sys.getallocatedblocks() {blocks_want}); \
         {pairs} of {} Node pairs found as cycles",
        1000 * BURSTS
    );
    if pprof {
        let out = std::process::Command::new("go")
            .args(["tool", "pprof", "-top", "-sample_index=inuse_objects"])
            .arg(&profile)
            .output()
            .expect("go tool pprof (cargo xtask setup installs golang)");
        let top = String::from_utf8_lossy(&out.stdout);
        let node =
            top.lines().find(|l| l.trim_end().ends_with(" __main__.Node")).unwrap_or_else(|| panic!("{top}"));
        assert!(node.split_whitespace().next() == Some(&(2000 * BURSTS).to_string()), "{node}");
    }
}

/// With the collector on, a collection frees the cycles: none is reported after it.
#[test]
fn debian_python3_11_cycles_a_collection_freed_are_not_reported() {
    require_root();
    let python = Path::new("/usr/bin/python3.11");
    let dir = tempfile::tempdir().unwrap();
    let truth_file = dir.path().join("truth.txt");
    let mut t = spawn(python, &truth_file, &["gc-on"]);
    let report = attach_report(&mut t, &["--duration", "1s", "--scan", "--format", "json"], |_| {});
    let want = truth(&truth_file);
    let (got, _, objects) = census_types(&report);
    assert_eq!(objects["gc_enabled"], Value::Bool(true));
    assert_eq!(want.get("__main__.Node"), None, "the collection freed every Node");
    assert_eq!(got.get("__main__.Node"), None, "{objects}");
    assert_eq!(node_pairs(objects), 0, "{}", objects["cycles"]);
}

/// `--backrefs Node --backrefs-svg`: the Node pairs drawn as objgraph's show_backrefs draws
/// them (each Node referred to by its peer, no root), in a picture Chromium renders.
#[test]
fn debian_python3_11_backrefs_draw_the_node_pairs() {
    require_root();
    let python = Path::new("/usr/bin/python3.11");
    let dir = tempfile::tempdir().unwrap();
    let truth_file = dir.path().join("truth.txt");
    let svg = dir.path().join("refs.svg");
    let mut t = spawn(python, &truth_file, &[]);
    let args = [
        "--duration",
        "1s",
        "--backrefs",
        "Node",
        "--backrefs-svg",
        svg.to_str().unwrap(),
        "--format",
        "json",
    ];
    let report = attach_report(&mut t, &args, |_| {});
    let b = &report["scan"]["python_objects"]["backrefs"];
    assert_eq!(b["found"], 2000 * BURSTS, "{b}");
    assert_eq!(b["drawn"], 5, "{b}");
    let nodes = b["nodes"].as_array().unwrap();
    let edges: Vec<(usize, usize)> = serde_json::from_value(b["edges"].clone()).unwrap();
    for (i, n) in nodes.iter().enumerate().filter(|(_, n)| n["kind"] == "target") {
        assert_eq!(n["label"], "__main__.Node", "{b}");
        // Its peer refers to it, and it to its peer: a cycle of two.
        let peer =
            edges.iter().find(|e| e.1 == i).map(|e| e.0).unwrap_or_else(|| panic!("no referrer of {i}: {b}"));
        assert_eq!(nodes[peer]["label"], "__main__.Node", "{b}");
        assert!(edges.contains(&(i, peer)), "{i} and {peer} are no cycle: {b}");
    }
    assert!(nodes.iter().all(|n| n["kind"] != "root"), "the pairs are unreachable: {b}");
    let dom = chromium_dom(&svg, &dir.path().join("chromium"));
    assert!(
        dom.contains(&format!("References to 5 of {} Node objects: no root reaches them", 2000 * BURSTS)),
        "{dom}"
    );
    assert_eq!(dom.matches(">__main__.Node</text>").count(), nodes.len(), "{dom}");
}

#[test]
fn debian_python3_11_census_agrees_with_gc_get_objects() {
    case_with(Path::new("/usr/bin/python3.11"), true);
}

#[test]
fn pyenv_3_9_census_agrees_with_gc_get_objects() {
    case(&pyenv("3.9", "python3.9"));
}

#[test]
fn pyenv_3_10_census_agrees_with_gc_get_objects() {
    case(&pyenv("3.10", "python3.10"));
}

#[test]
fn pyenv_3_12_census_agrees_with_gc_get_objects() {
    case(&pyenv("3.12", "python3.12"));
}

#[test]
fn pyenv_3_13_census_agrees_with_gc_get_objects() {
    case(&pyenv("3.13", "python3.13"));
}
