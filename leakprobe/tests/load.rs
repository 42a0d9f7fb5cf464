//! Load and capacity: many threads allocating at once, a live-block map too small for the
//! target, and a forked child. Privileged: run as root, one at a time.

mod common;

use common::*;

fn threads_target() -> std::path::PathBuf {
    build_target("threads.c", "threads", "gcc", &["-O2", "-g", "-pthread"])
}

#[test]
fn sixty_four_threads_exact_accounting() {
    require_root();
    let mut target = Target::spawn(&threads_target());
    let report = attach_json(&mut target, "3s", |t| t.leak());
    assert_no_drops(&report);
    let (bytes, count, _, _) = sum(sites(&report).iter().filter(|s| frame0(s) == "thread_leak"));
    assert_eq!((bytes, count), (64 * 100 * 100, 64 * 100), "leaked by 64 threads");
    let churn = sum(sites(&report).iter().filter(|s| frame0(s) == "worker"));
    assert_eq!((churn.0, churn.1), (0, 0), "per-thread churn is all freed");
    assert!(churn.2 >= 64 * 1000, "churn allocations seen: {}", churn.2);
}

#[test]
fn a_full_live_map_is_counted_degraded_and_invents_no_leak() {
    require_root();
    let mut target = Target::spawn(&threads_target());
    let (code, out, err) = attach_with(
        &mut target,
        &["--duration", "3s", "--format", "json", "--max-live", "500"],
        Target::leak,
    );
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["degraded"], true);
    let full = report["drops"]["live_map_full"].as_u64().unwrap();
    assert!(full > 0, "live_map_full should count the overflow");
    // Only recorded blocks are counted, so outstanding can never exceed what really leaked.
    let (bytes, count, _, _) = sum(sites(&report).iter().filter(|s| frame0(s) == "thread_leak"));
    assert!(count <= 6400 && bytes == count * 100, "outstanding {count} blocks / {bytes} B");
    let churn = sum(sites(&report).iter().filter(|s| frame0(s) == "worker"));
    assert_eq!((churn.0, churn.1), (0, 0), "a dropped block must not show as a leak");
    // And the text report says so loudly.
    let mut target = Target::spawn(&threads_target());
    let (_, text, _) = attach_with(&mut target, &["--duration", "2s", "--max-live", "500"], Target::leak);
    assert!(text.contains("DEGRADED REPORT"), "{text}");
    assert!(text.contains("live-block map full"), "{text}");
}

#[test]
fn forked_children_are_not_counted_and_not_harmed() {
    require_root();
    let mut target = Target::spawn(&threads_target());
    let report = attach_json(&mut target, "3s", |t| {
        t.send("fork");
        t.expect("forked 0");
    });
    assert_no_drops(&report);
    assert!(
        !sites(&report).iter().any(|s| has_frame(s, "child_leak")),
        "the child's allocations were counted"
    );
    assert!(target.is_running());
}

#[test]
fn exec_ends_the_trace_and_the_new_image_is_not_counted() {
    require_root();
    let mut target = Target::spawn(&threads_target());
    let pid = target.pid().to_string();
    let mut lp = Leakprobe::start(&["attach", "--pid", &pid, "--interval", "1s", "--format", "json"]);
    lp.wait_attached();
    target.send("exec");
    target.expect("ready"); // the new image
    target.leak(); // must not be counted: it is another program now
    let (code, out, err) = lp.finish();
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["target"]["ended_by"], "target-exec");
    assert!(!sites(&report).iter().any(|s| has_frame(s, "thread_leak")), "new image counted");
    assert_all_gone("after exec");
    assert!(target.is_running());
}

#[test]
fn repeated_sigkill_under_16_allocating_threads_leaves_nothing_and_no_harm() {
    require_root();
    let mut target = Target::spawn(&threads_target());
    target.send("spin");
    target.expect("spinning");
    let rate = |t: &mut Target| -> u64 {
        t.send("rate");
        t.read_line().strip_prefix("rate ").and_then(|r| r.parse().ok()).expect("rate line")
    };
    let before = rate(&mut target);
    let pid = target.pid().to_string();
    // Kill points spread over loading, attaching and tracing.
    let delays_ms = [50u64, 300, 700, 1200, 2000, 2600, 3500, 900];
    for (i, delay) in delays_ms.iter().enumerate() {
        let lp = Leakprobe::start(&["attach", "--pid", &pid, "--interval", "1s"]);
        std::thread::sleep(std::time::Duration::from_millis(*delay));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(lp.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = lp.finish();
        assert_all_gone(&format!("after SIGKILL #{i} at {delay} ms"));
        assert!(target.is_running(), "target died after kill #{i}");
    }
    let after = rate(&mut target);
    eprintln!(
        "target malloc/free pairs per second: before {before}, after {} kills {after}",
        delays_ms.len()
    );
    assert!(after > 0, "the target stopped allocating");
}
