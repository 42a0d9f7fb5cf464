//! Verdicts on real growth patterns (tests/targets/trends.c, built without frame pointers),
//! snapshots written while running, and the timeline chart. Privileged: run as root, one at a
//! time.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn trends_target() -> PathBuf {
    build_target("trends.c", "trends", "gcc", NOFP_C)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("leakprobe-trends-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Attaches with a 500 ms interval and `args`, starts the pattern once probes are live
/// (`after_go` runs next), and returns leakprobe's exit code, stdout and stderr.
fn trace(mode: &str, args: &[&str], after_go: impl FnOnce(&mut Target)) -> (i32, String, String) {
    let mut cmd = vec!["--interval", "500ms"];
    cmd.extend_from_slice(args);
    let mut target = Target::spawn_with_args(&trends_target(), &[mode]);
    attach_with(&mut target, &cmd, |t| {
        t.send("go");
        after_go(t);
    })
}

fn site_by_frame0<'a>(report: &'a Value, name: &str) -> &'a Value {
    sites(report).iter().find(|s| frame0(s) == name).unwrap_or_else(|| panic!("no site in {name}"))
}

#[test]
fn steady_leak_is_a_leak_with_its_site_on_top_and_snapshots_on_disk() {
    require_root();
    let dir = scratch("leak");
    let snaps = dir.join("snaps");
    let plot = dir.join("timeline.svg");
    let (code, out, err) = trace(
        "leak",
        &[
            "--duration",
            "6s",
            "--format",
            "json",
            "--snapshot-every",
            "2s",
            "--snapshot-dir",
            snaps.to_str().unwrap(),
            "--plot",
            plot.to_str().unwrap(),
        ],
        |_| {},
    );
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_no_drops(&report);
    assert_eq!(report["verdict"]["kind"], "leak", "{}", report["verdict"]);
    let top = &sites(&report)[0];
    assert_eq!(frame0(top), "leak_sessions", "the leaking site is on top");
    assert_eq!(top["trend"], "growing");
    let fit = &top["fit"];
    assert!(fit["r2"].as_f64().unwrap() > 0.9, "{fit}");
    // 64 KiB every 100 ms: the slope is near 640 KiB/s (loose: the target sleeps, we sample).
    let slope = fit["slope_per_s"].as_f64().unwrap();
    assert!((400e3..900e3).contains(&slope), "slope {slope} B/s");
    assert_eq!(top["outstanding_bytes"].as_u64().unwrap(), 4096 * top["outstanding_count"].as_u64().unwrap());

    // The reproduction record.
    assert!(report["target"]["build_id"].as_str().is_some_and(|b| b.len() >= 16), "{}", report["target"]);
    assert!(report["target"]["start_time"].is_string());
    assert!(report["host"]["kernel"].as_str().is_some_and(|k| !k.is_empty()));
    assert!(report["host"]["libc_version"].as_str().is_some_and(|v| v.starts_with("2.")));
    assert!(report["modules"].as_array().unwrap().iter().any(|m| m["build_id"].is_string()));

    // Timeline: a point per sample, RSS present and the tracked heap rising.
    let tl = report["timeline"].as_array().unwrap();
    assert!(tl.len() >= 8, "{} points", tl.len());
    assert!(tl.iter().all(|p| p["rss_bytes"].as_u64().is_some_and(|r| r > 0)));
    let heap: Vec<u64> = tl.iter().map(|p| p["heap_bytes"].as_u64().unwrap()).collect();
    assert!(heap.last() > heap.first(), "{heap:?}");

    // Snapshots: complete JSON each, numbered, nothing temporary left behind, and the leak's
    // outstanding bytes rise from one to the next in whole rounds of 16 x 4 KiB.
    let mut files: Vec<PathBuf> = std::fs::read_dir(&snaps).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into()).collect();
    assert!(names.len() >= 2, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("snapshot-") && n.ends_with(".json")), "{names:?}");
    let leaked: Vec<u64> = files
        .iter()
        .map(|f| {
            let snap: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
            assert_eq!(snap["schema"], "leakprobe/v1");
            assert_eq!(snap["target"]["ended_by"], "running");
            sum(sites(&snap).iter().filter(|s| frame0(s) == "leak_sessions")).0
        })
        .collect();
    assert!(leaked.windows(2).all(|w| w[1] > w[0] && (w[1] - w[0]) % 65536 == 0), "{leaked:?}");

    // `leakprobe diff` of the first and last snapshot: one run, so the leak's delta is exact.
    let (first, last) = (&files[0], &files[files.len() - 1]);
    let out = run_leakprobe(&["diff", first.to_str().unwrap(), last.to_str().unwrap(), "--format", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let diff: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(diff["comparison"], "same-run");
    let top = &diff["sites"][0];
    assert_eq!(top["frames"][0]["function"], "leak_sessions", "{top}");
    let delta = leaked[leaked.len() - 1] - leaked[0];
    assert_eq!(top["delta_bytes"].as_u64(), Some(delta), "{top}");
    assert_eq!(top["delta_count"].as_u64(), Some(delta / 4096), "{top}");
    assert_eq!(top["new_count"].as_u64(), Some(delta / 4096), "nothing freed in between: {top}");
    assert_eq!(top["freed_count"].as_u64(), Some(0), "{top}");

    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("<svg") && svg.contains("tracked heap") && svg.contains("leak_sessions"), "plot");

    // The leaked blocks hold a secret; no output may contain target memory.
    const SECRET: &str = "hunter2-SESSION-SECRET-7f3a9c";
    assert!(!report.to_string().contains(SECRET) && !svg.contains(SECRET), "report or plot holds memory");
    for f in &files {
        assert!(!std::fs::read_to_string(f).unwrap().contains(SECRET), "snapshot holds target memory");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rss_growth_with_a_flat_heap_is_fragmentation_not_a_leak() {
    require_root();
    let (code, out, err) = trace("frag", &["--duration", "7s"], |_| {});
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("VERDICT: FRAGMENTATION / ALLOCATOR RETENTION"), "{out}");
    assert!(!out.contains("VERDICT: LEAK"), "{out}");
    let (code, out, err) = trace("frag", &["--duration", "7s", "--format", "json"], |_| {});
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["verdict"]["kind"], "fragmentation", "{}", report["verdict"]);
    let rss = &report["verdict"]["rss_fit"];
    assert!(rss["change"].as_f64().unwrap() > 2.0 * 1024.0 * 1024.0, "RSS grew: {rss}");
    // The block is allocated and freed every round: nothing outstanding, and it is seen.
    let site = site_by_frame0(&report, "retain_round");
    assert_eq!(site["outstanding_bytes"], 0);
    assert!(site["allocated_count"].as_u64().unwrap() >= 20);
}

/// Issue 21: `--duration 10s` with no `--interval` used to sample twice (every 5 s) and say
/// NOT ENOUGH DATA; the interval now fits the duration.
#[test]
fn a_ten_second_run_without_an_interval_gets_a_verdict() {
    require_root();
    let mut target = Target::spawn_with_args(&trends_target(), &["leak"]);
    let pid = target.pid().to_string();
    let mut lp = Leakprobe::start(&["attach", "--pid", &pid, "--duration", "10s", "--format", "json"]);
    lp.wait_attached();
    target.send("go");
    let (code, out, err) = lp.finish();
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["window"]["interval_s"], 1.0, "{}", report["window"]);
    assert_ne!(report["verdict"]["kind"], "not-enough-data", "{}", report["verdict"]);
    assert_eq!(report["verdict"]["kind"], "leak", "{}", report["verdict"]);
    assert_eq!(report["verdict"]["basis"], "trend", "{}", report["verdict"]);
    assert_eq!(site_by_frame0(&report, "leak_sessions")["trend"], "growing");
}

#[test]
fn a_bounded_cache_is_stable_once_full() {
    require_root();
    let (code, out, err) = trace("cache", &["--duration", "8s", "--format", "json"], |t| t.expect("filled"));
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["verdict"]["kind"], "stable", "{}", report["verdict"]);
    let site = site_by_frame0(&report, "cache_value");
    assert_eq!(site["trend"], "stable", "{site}");
    // Full: as many outstanding values as slots replaced since attach, never more than 2000.
    let count = site["outstanding_count"].as_u64().unwrap();
    assert!((1..=2000).contains(&count), "{count}");
    assert_eq!(site["outstanding_bytes"].as_u64().unwrap(), 1024 * count);
}

#[test]
fn plot_png_and_bad_flags() {
    require_root();
    let dir = scratch("png");
    let png = dir.join("t.png");
    let (code, _, err) = trace("leak", &["--duration", "3s", "--plot", png.to_str().unwrap()], |_| {});
    assert_eq!(code, 0, "{err}");
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000, "{} bytes", bytes.len());
    // Refused before attaching: an unknown plot format, and a snapshot period without a dir.
    let out = run_leakprobe(&["attach", "--pid", "1", "--plot", "x.jpg"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(".svg or .png"));
    let out = run_leakprobe(&["attach", "--pid", "1", "--snapshot-every", "5s"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--snapshot-dir"));
    assert!(!Path::new("x.jpg").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_leakprobe_never_leaves_a_partial_snapshot() {
    require_root();
    let dir = scratch("kill");
    let mut target = Target::spawn_with_args(&trends_target(), &["cache"]);
    target.send("go");
    let pid = target.pid().to_string();
    let mut written = 0;
    for round in 0..6u64 {
        let snaps = dir.join(format!("r{round}"));
        let mut lp = Leakprobe::start(&[
            "attach",
            "--pid",
            &pid,
            "--interval",
            "100ms",
            "--snapshot-every",
            "100ms",
            "--snapshot-dir",
            snaps.to_str().unwrap(),
        ]);
        lp.wait_attached();
        // Spread the kills over the write cycle.
        std::thread::sleep(std::time::Duration::from_millis(300 + round * 137));
        lp.child.kill().unwrap();
        lp.child.wait().unwrap();
        for entry in std::fs::read_dir(&snaps).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.starts_with("snapshot-") && name.ends_with(".json"), "stray file {name}");
            let snap: Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
                .unwrap_or_else(|e| panic!("{name} is not complete JSON: {e}"));
            assert_eq!(snap["schema"], "leakprobe/v1");
            written += 1;
        }
        assert_all_gone("after SIGKILL during snapshots");
    }
    assert!(written >= 6, "only {written} snapshots were written before the kills");
    assert!(target.is_running(), "the target survives");
    let _ = std::fs::remove_dir_all(&dir);
}
