//! `leakprobe diff` on real reports: two attaches to a leaking target, then the real binary
//! compares them. Privileged (the attaches): run as root, one at a time.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// big_leak.c leaks this much from leak_block() on each "leak".
const ROUND_BYTES: i64 = 64 << 20;
const ROUND_BLOCKS: i64 = 65536;

fn diff(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["diff"];
    all.extend_from_slice(args);
    let out = run_leakprobe(&all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Attaches for `duration` with the report written to `out`, leaking `rounds` times inside
/// the window.
fn attach_to_file(target: &mut Target, out: &Path, duration: &str, rounds: usize) -> Value {
    let path = out.to_str().unwrap();
    let (code, stdout, err) =
        attach_with(target, &["--duration", duration, "--format", "json", "--output", path], |t| {
            for _ in 0..rounds {
                t.leak();
            }
        });
    assert_eq!(code, 0, "leakprobe failed:\n{err}");
    assert!(stdout.is_empty(), "the report went to stdout despite --output: {stdout}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    assert_no_drops(&report);
    report
}

fn write_json(dir: &Path, name: &str, v: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(v).unwrap()).unwrap();
    p
}

#[test]
fn two_attaches_show_the_leak_delta_and_bad_files_are_refused() {
    require_root();
    let bin = build_target("big_leak.c", "big_leak", "gcc", NOFP_C);
    let mut target = Target::spawn(&bin);
    let dir = tempfile::tempdir().unwrap();
    let (a_path, b_path) = (dir.path().join("a.json"), dir.path().join("b.json"));
    // One round of leaks in A's window, two in B's: B kept 64 MiB more from leak_block.
    let a = attach_to_file(&mut target, &a_path, "3s", 1);
    let b = attach_to_file(&mut target, &b_path, "4s", 2);
    let leak_a = sum(sites(&a).iter().filter(|s| has_frame(s, "leak_block")));
    let leak_b = sum(sites(&b).iter().filter(|s| has_frame(s, "leak_block")));
    assert_eq!((leak_a.0, leak_a.1), (ROUND_BYTES as u64, ROUND_BLOCKS as u64));
    assert_eq!((leak_b.0, leak_b.1), (2 * ROUND_BYTES as u64, 2 * ROUND_BLOCKS as u64));
    let (a_s, b_s) = (a_path.to_str().unwrap(), b_path.to_str().unwrap());

    // JSON: exact deltas, matched across the two attaches by frames.
    let (code, out, err) = diff(&["--format", "json", a_s, b_s]);
    assert_eq!(code, 0, "{err}");
    let d: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{out}"));
    assert_eq!(d["schema"], "leakprobe/diff/v1");
    assert_eq!(d["comparison"], "separate-windows");
    assert_eq!(d["matched_by"], "frames");
    let ds = d["sites"].as_array().unwrap();
    let top = &ds[0];
    assert!(has_frame(top, "leak_block"), "top site is not leak_block: {top}");
    assert_eq!(top["status"], "both", "leak_block not matched across the attaches: {top}");
    assert_eq!(top["delta_bytes"].as_i64(), Some(ROUND_BYTES));
    assert_eq!(top["delta_count"].as_i64(), Some(ROUND_BLOCKS));
    // Separate windows: B's allocations are all new to A; leak_block frees nothing.
    assert_eq!(top["new_count"].as_i64(), Some(2 * ROUND_BLOCKS));
    assert_eq!(top["new_bytes"].as_i64(), Some(2 * ROUND_BYTES));
    assert_eq!(top["freed_count"].as_i64(), Some(0));
    // The churn frees all it allocates: matched, no delta.
    for s in ds.iter().filter(|s| has_frame(s, "churn")) {
        assert_eq!(s["status"], "both", "churn not matched: {s}");
        assert_eq!((s["delta_bytes"].as_i64(), s["delta_count"].as_i64()), (Some(0), Some(0)));
    }
    // Nothing else grew by as much.
    assert!(ds[1..].iter().all(|s| s["delta_bytes"].as_i64().unwrap() < ROUND_BYTES / 100), "{out}");

    // Text: the table's first row is leak_block with its delta.
    let (code, text, err) = diff(&["--top", "3", a_s, b_s]);
    assert_eq!(code, 0, "{err}");
    eprintln!("{text}");
    let row = text.lines().find(|l| l.trim_start().starts_with("#1 ")).expect("a table row");
    assert!(row.contains("+64.0 MiB") && row.contains("+65536") && row.contains("leak_block"), "{text}");
    assert!(text.contains("separate windows") && text.contains("SUMMARY: "), "{text}");

    // --output writes the same; a symlink there is refused.
    let out_path = dir.path().join("d.json");
    let (code, stdout, err) = diff(&["--format", "json", "-o", out_path.to_str().unwrap(), a_s, b_s]);
    assert_eq!((code, stdout.as_str()), (0, ""), "{err}");
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    assert_eq!(written["sites"][0]["delta_bytes"].as_i64(), Some(ROUND_BYTES));
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&out_path, &link).unwrap();
    let (code, _, err) = diff(&["-o", link.to_str().unwrap(), a_s, b_s]);
    assert_eq!(code, 2);
    assert!(err.contains("symlink"), "{err}");
    // Our own earlier diff is replaced; someone else's file is not (issue 10).
    let (code, _, err) = diff(&["--format", "json", "-o", out_path.to_str().unwrap(), a_s, b_s]);
    assert_eq!(code, 0, "{err}");
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "keep me\n").unwrap();
    let (code, _, err) = diff(&["-o", notes.to_str().unwrap(), a_s, b_s]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not written by leakprobe") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "keep me\n");

    // A truncated file: exit 2, its name and the position, no panic.
    // Cut just after a comma: a cut inside a number ("12" of "125") would read as an invalid
    // number, not as a file that ends early.
    let full = std::fs::read_to_string(&b_path).unwrap();
    let cut = &full[..=full[..full.len() / 2].rfind(',').unwrap()];
    let trunc = dir.path().join("truncated.json");
    std::fs::write(&trunc, cut).unwrap();
    let (code, _, err) = diff(&[a_s, trunc.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    let want = format!("{}: line {}, column ", trunc.display(), cut.lines().count());
    assert!(err.contains(&want) && err.contains("ends early"), "want {want:?} in:\n{err}");
    assert!(!err.contains("panicked"), "{err}");

    // Another build of the program: refused, then compared with --force.
    let mut other = b.clone();
    other["target"]["build_id"] = Value::from("0123456789abcdef0123456789abcdef01234567");
    other["target"]["exe"] = Value::from("/usr/local/bin/other");
    let other_path = write_json(dir.path(), "other.json", &other);
    let o_s = other_path.to_str().unwrap();
    let (code, out, err) = diff(&[a_s, o_s]);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("different builds") && err.contains("--force"), "{err}");
    let (code, out, err) = diff(&["--force", a_s, o_s]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("warning: compared anyway (--force)"), "{out}");

    // Not a leakprobe/v1 report (a diff of diffs): refused even with --force.
    let (code, _, err) = diff(&["--force", out_path.to_str().unwrap(), b_s]);
    assert_eq!(code, 2);
    assert!(err.contains("not a leakprobe/v1 report") && err.contains("leakprobe/diff/v1"), "{err}");
}

/// Messages go to stderr without panicking when nobody reads it any more (`2>&1 | head -1`
/// that quit, a closed log pipe): the run ends with its own status (2, a refused file here),
/// not Rust's 101 from a panicking `eprintln!`. The pipe's read end is closed before the
/// child starts, so its first write fails for sure.
#[test]
fn a_closed_stderr_leaves_the_exit_status_alone() {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    let status = std::process::Command::new(leakprobe_bin())
        .args(["diff", "/nonexistent/a.json", "/nonexistent/b.json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(write))
        .status()
        .expect("leakprobe runs");
    assert_eq!(status.code(), Some(2), "{status}");
}
