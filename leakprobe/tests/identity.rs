//! The target's identity: a recycled PID is never traced or reported, and leakprobe's own
//! panic leaves nothing behind. Privileged: run as root, one at a time.

mod common;

use std::{path::Path, time::Duration};

use common::*;
use serde_json::Value;

/// Starts `path` so that it gets PID `pid` (just freed), by setting the kernel's last PID
/// just below it. Other processes may take it first, so this retries.
fn spawn_on_pid(pid: i32, path: &Path) -> Target {
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("write ns_last_pid (root)");
        let t = Target::spawn(path);
        if t.pid() == pid {
            return t;
        }
    }
    panic!("could not get PID {pid} for the newcomer");
}

/// A file of the frames, for telling the two programs apart.
fn files(report: &Value) -> Vec<String> {
    sites(report)
        .iter()
        .flat_map(|s| s["frames"].as_array().unwrap().iter())
        .filter_map(|f| f["file"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn recycled_pid_after_exit_is_neither_traced_nor_reported() {
    require_root();
    let original = c_target("alloc_funcs.c", "alloc_funcs");
    let newcomer = build_target("allocators.c", "alloc_plain", "gcc", NOFP_C);
    let mut a = Target::spawn(&original);
    let pid = a.pid();
    let p = pid.to_string();
    let mut lp = Leakprobe::start(&["attach", "--pid", &p, "--interval", "1s", "--format", "json"]);
    lp.wait_attached();
    a.leak();
    // The original dies and its PID goes at once to another program, which allocates.
    drop(a);
    let mut b = spawn_on_pid(pid, &newcomer);
    b.leak();
    let (code, out, err) = lp.finish();
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["target"]["ended_by"], "target-exited", "{err}");
    assert_eq!(report["target"]["exe"].as_str().unwrap(), original.to_str().unwrap());
    let files = files(&report);
    assert!(files.iter().any(|f| f.ends_with("alloc_funcs.c")), "the original's sites are reported");
    assert!(!files.iter().any(|f| f.ends_with("allocators.c")), "the newcomer's allocations were reported");
    assert_all_gone("after the original exited");
    // The newcomer runs on, untouched.
    b.leak();
    assert!(b.is_running());
}

#[test]
fn pid_recycled_while_attaching_is_caught_right_after_attach() {
    require_root();
    let original = c_target("alloc_funcs.c", "alloc_funcs");
    let newcomer = build_target("allocators.c", "alloc_plain", "gcc", NOFP_C);
    let a = Target::spawn(&original);
    let pid = a.pid();
    let p = pid.to_string();
    // Identity checked, pidfd open, programs loaded: then a pause just before the probes
    // attach, in which the original dies and its PID is recycled.
    let mut lp = Leakprobe::start_env(
        &["attach", "--pid", &p, "--interval", "1s", "--format", "json"],
        &[("LEAKPROBE_TEST_PAUSE_BEFORE_ATTACH_MS", "3000")],
    );
    lp.wait_for("pausing");
    drop(a);
    let mut b = spawn_on_pid(pid, &newcomer);
    let (code, out, err) = lp.finish();
    assert_eq!(code, 2, "leakprobe must refuse, not trace the newcomer:\n{err}");
    assert!(err.contains("exited while the probes were being attached"), "{err}");
    assert!(out.is_empty(), "no report about the newcomer: {out}");
    assert_all_gone("after refusing the recycled PID");
    b.leak();
    assert!(b.is_running());
}

#[test]
fn own_panic_while_attached_leaves_nothing_behind() {
    require_root();
    let bin = c_target("alloc_funcs.c", "alloc_funcs");
    let mut target = Target::spawn(&bin);
    let p = target.pid().to_string();
    let mut lp = Leakprobe::start_env(
        &["attach", "--pid", &p, "--interval", "1s"],
        &[("LEAKPROBE_TEST_PANIC_AFTER_ATTACH", "1")],
    );
    lp.wait_attached();
    assert!(our_links() > 0, "no links while attached");
    let (code, _, err) = lp.finish();
    assert_eq!(code, 101, "a panic exits with Rust's status 101:\n{err}");
    assert!(err.contains("panicked") && err.contains("LEAKPROBE_TEST_PANIC_AFTER_ATTACH"), "{err}");
    assert_all_gone("after leakprobe panicked");
    // The target works on, and without probes: nothing of ours runs on its allocations.
    std::thread::sleep(Duration::from_millis(100));
    target.leak();
    assert!(target.is_running());
}
