//! Output safety (issue 10): leakprobe, run as root, never replaces a file it did not write,
//! never writes into system directories by accident, and replaces its own earlier outputs.

mod common;

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use common::*;

/// Bytes, owner, group and mode of a file.
fn state(path: &Path) -> (Vec<u8>, u32, u32, u32) {
    let meta = std::fs::metadata(path).unwrap();
    (std::fs::read(path).unwrap(), meta.uid(), meta.gid(), meta.mode() & 0o7777)
}

/// A file that is not ours: a copy of /etc/passwd, owned by someone else, mode 0640.
fn foreign_file(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy("/etc/passwd", &path).unwrap();
    std::os::unix::fs::chown(&path, Some(1234), Some(2345)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    path
}

/// Runs `attach` on a live target with `extra` flags and asserts: exit 2, the refusal names
/// `flag` and what to do, nothing was attached, and `untouched` is byte-, owner- and
/// mode-identical.
fn assert_refused_untouched(extra: &[&str], flag: &str, needle: &str, untouched: &Path) {
    let bin = c_target("alloc_funcs.c", "alloc_funcs");
    let target = Target::spawn(&bin);
    let before = state(untouched);
    let pid = target.pid().to_string();
    let mut args = vec!["attach", "--pid", &pid, "--duration", "1s"];
    args.extend_from_slice(extra);
    let out = run_leakprobe(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: want exit 2; stderr:\n{err}");
    assert!(err.contains(flag) && err.contains(needle), "{args:?}: stderr lacks {flag:?}/{needle:?}:\n{err}");
    assert!(err.contains("nothing was attached"), "{err}");
    assert!(!err.contains("root:x:0:0"), "the refusal must not quote the file: {err}");
    assert!(before == state(untouched), "{} changed", untouched.display());
    assert_all_gone(&format!("after refusing {flag}"));
}

#[test]
fn unrelated_files_are_refused_untouched() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let passwd = foreign_file(dir.path(), "passwd");
    let p = passwd.to_str().unwrap();
    assert_refused_untouched(&["--output", p], "--output", "--force", &passwd);
    assert_refused_untouched(&["--pprof", p], "--pprof", "not written by leakprobe", &passwd);
    // Someone else's SVG.
    let svg = dir.path().join("diagram.svg");
    std::fs::write(&svg, "<?xml version=\"1.0\"?><svg xmlns=\"http://www.w3.org/2000/svg\"/>\n").unwrap();
    let s = svg.to_str().unwrap();
    assert_refused_untouched(&["--plot", s], "--plot", "--force", &svg);
    assert_refused_untouched(&["--flamegraph", s], "--flamegraph", "--force", &svg);
    assert_refused_untouched(&["--folded", p], "--folded", "--force", &passwd);

    // A file in a fake `etc/` root (not the real /etc: refused as unrelated, not as system).
    let fake_etc = dir.path().join("root/etc");
    std::fs::create_dir_all(&fake_etc).unwrap();
    let hosts = foreign_file(&fake_etc, "hosts");
    assert_refused_untouched(&["--output", hosts.to_str().unwrap()], "--output", "--force", &hosts);

    // A non-empty directory of someone else's files.
    let snaps = dir.path().join("snaps");
    std::fs::create_dir(&snaps).unwrap();
    let notes = foreign_file(&snaps, "notes.txt");
    assert_refused_untouched(
        &["--snapshot-every", "1s", "--snapshot-dir", snaps.to_str().unwrap()],
        "--snapshot-dir",
        "did not write",
        &notes,
    );
    assert_eq!(std::fs::read_dir(&snaps).unwrap().count(), 1, "nothing added to {}", snaps.display());
}

#[test]
fn system_directories_are_refused_even_with_force() {
    require_root();
    let bin = c_target("alloc_funcs.c", "alloc_funcs");
    let target = Target::spawn(&bin);
    let pid = target.pid().to_string();
    let path = format!("/etc/leakprobe-test-{}.txt", std::process::id());
    let out = run_leakprobe(&["attach", "--pid", &pid, "--duration", "1s", "--force", "--output", &path]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--allow-system-path") && err.contains("/etc"), "{err}");
    assert!(!Path::new(&path).exists(), "{path} was created");
    // /etc/passwd itself, with --force: refused, untouched.
    let before = state(Path::new("/etc/passwd"));
    let out =
        run_leakprobe(&["attach", "--pid", &pid, "--duration", "1s", "--force", "--output", "/etc/passwd"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(before == state(Path::new("/etc/passwd")), "/etc/passwd changed");
    assert_all_gone("after refusing a system path");
}

#[test]
fn our_own_outputs_are_replaced_and_force_keeps_owner_and_mode() {
    require_root();
    let bin = c_target("alloc_funcs.c", "alloc_funcs");
    let mut target = Target::spawn(&bin);
    let pid = target.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (report, svg_plot, png_plot, flame, pprof, folded) =
        (p("report.txt"), p("plot.svg"), p("plot.png"), p("flame.svg"), p("leak.pb.gz"), p("leak.folded"));
    let mut run = |plot: &str, extra: &[&str]| {
        let mut args = vec![
            "attach",
            "--pid",
            &pid,
            "--duration",
            "2s",
            "--interval",
            "1s",
            "--output",
            &report,
            "--plot",
            plot,
            "--flamegraph",
            &flame,
            "--pprof",
            &pprof,
            "--folded",
            &folded,
        ];
        args.extend_from_slice(extra);
        let mut lp = Leakprobe::start(&args);
        lp.wait_attached();
        target.leak();
        let (code, _, err) = lp.finish();
        assert_eq!(code, 0, "{args:?}:\n{err}");
    };
    run(&svg_plot, &[]);
    run(&png_plot, &[]);
    // Every write is a new inode renamed into place: the inode tells a rewrite apart.
    let ino = |f: &String| std::fs::metadata(f).unwrap().ino();
    let files = [&report, &svg_plot, &png_plot, &flame, &pprof, &folded];
    let first: Vec<u64> = files.iter().map(|f| ino(f)).collect();
    // Every one of them is ours now: a second run replaces them without --force.
    run(&svg_plot, &[]);
    run(&png_plot, &[]);
    for (f, before) in files.iter().zip(&first) {
        assert_ne!(ino(f), *before, "{f} was not rewritten");
    }
    assert!(std::fs::read_to_string(&folded).unwrap().starts_with("# leakprobe "));

    // --force on an unrelated file: replaced with a report, owner and mode kept.
    let passwd = foreign_file(dir.path(), "passwd");
    let (_, uid, gid, mode) = state(&passwd);
    let out = run_leakprobe(&[
        "attach",
        "--pid",
        &pid,
        "--duration",
        "1s",
        "--force",
        "--output",
        passwd.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let (bytes, uid2, gid2, mode2) = state(&passwd);
    assert!(bytes.starts_with(b"leakprobe "), "not replaced by the report");
    assert_eq!((uid2, gid2, mode2), (uid, gid, mode));
    assert_all_gone("after the own-outputs runs");
}
