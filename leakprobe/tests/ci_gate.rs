//! heaptrack's four numbers per site (calls, peak, leaked, temporary) against real heaptrack,
//! the peak in every tracking mode, suppressions in LSan's and Valgrind's formats against
//! real LSan and Valgrind, and `--format lsan` against LSan's own report (issue 26).

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use common::*;
use serde_json::Value;

fn cases() -> PathBuf {
    cxx_target("heaptrack_cases.cpp", "heaptrack_cases")
}

fn scratch_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// `leakprobe run ARGS -- CMD...` with the JSON report: (report, stderr).
fn run_json(args: &[&str], cmd: &[&str]) -> (Value, String) {
    let mut all = vec!["run", "--format", "json"];
    all.extend_from_slice(args);
    all.push("--");
    all.extend_from_slice(cmd);
    let out = run_leakprobe(&all);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "leakprobe {all:?} failed:\n{err}");
    let report =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}); stderr:\n{err}"));
    (report, err)
}

/// heaptrack's figures for the stacks through `function`, by cost type (allocations,
/// leaked, peak, temporary), from `heaptrack_print -F` (one folded stack per line, outermost
/// first, `function (file)` frames, the cost last).
fn heaptrack_figures(dir: &Path, cmd: &[&str], function: &str) -> BTreeMap<&'static str, u64> {
    let base = dir.join("trace");
    let out = output(Command::new("heaptrack").arg("-o").arg(&base).args(cmd));
    assert!(out.status.success(), "heaptrack failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let trace = dir.join("trace.zst");
    let trace = if trace.exists() { trace } else { dir.join("trace.gz") };
    let mut figures = BTreeMap::new();
    for cost in ["allocations", "leaked", "peak", "temporary"] {
        let folded = dir.join(format!("{cost}.folded"));
        let out = output(
            Command::new("heaptrack_print")
                .arg("-f")
                .arg(&trace)
                .arg("-F")
                .arg(&folded)
                .args(["--flamegraph-cost-type", cost]),
        );
        assert!(out.status.success(), "heaptrack_print failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let text = std::fs::read_to_string(&folded).unwrap();
        let total: u64 = text
            .lines()
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(stack, _)| stack.split(';').any(|f| f.trim().split(" (").next() == Some(function)))
            .map(|(_, n)| n.trim().parse::<u64>().unwrap())
            .sum();
        figures.insert(cost, total);
    }
    figures
}

/// leakprobe's figures for the sites through `function`, named as heaptrack names them.
fn our_figures(report: &Value, function: &str) -> BTreeMap<&'static str, u64> {
    let through: Vec<&Value> = sites(report)
        .iter()
        .filter(|s| s["frames"].as_array().unwrap().iter().any(|f| f["function"].as_str() == Some(function)))
        .collect();
    if through.is_empty() {
        let stacks: Vec<String> = sites(report)
            .iter()
            .map(|s| {
                let names: Vec<&str> =
                    s["frames"].as_array().unwrap().iter().filter_map(|f| f["function"].as_str()).collect();
                format!("{} B: {} {}", s["outstanding_bytes"], names.join(" <- "), s["frames"])
            })
            .collect();
        panic!("no site through {function} in:\n{}\nwarnings: {}", stacks.join("\n"), report["warnings"]);
    }
    let total = |k: &str| through.iter().map(|s| s[k].as_u64().unwrap_or(0)).sum::<u64>();
    BTreeMap::from([
        ("allocations", total("allocated_count")),
        ("leaked", total("outstanding_bytes")),
        ("peak", total("peak_bytes")),
        ("temporary", total("temporary_count")),
    ])
}

fn within(ours: u64, theirs: u64, fraction: f64) -> bool {
    (ours as f64 - theirs as f64).abs() <= theirs as f64 * fraction
}

/// The seed's heaptrack case (a cache of 100,000 1000-byte strings, never freed): calls, peak
/// and leaked through process_item equal heaptrack's within 1%; the run's text report
/// opens with heaptrack_print's rankings, process_item at the top of calls, peak and leaked.
#[test]
fn the_seeds_cache_reads_as_heaptrack_reads_it() {
    require_root();
    let exe = cases();
    let exe_s = exe.to_str().unwrap();
    let dir = scratch_dir("ci_gate_seed");
    let theirs = heaptrack_figures(&dir, &[exe_s, "seed"], "process_item(int)");
    let (report, _) = run_json(&[], &[exe_s, "seed"]);
    let ours = our_figures(&report, "process_item(int)");
    println!("process_item(int): heaptrack {theirs:?}, leakprobe {ours:?}");
    assert!(theirs["allocations"] >= 200_000, "heaptrack saw the string and the map node: {theirs:?}");
    for k in ["allocations", "leaked", "peak"] {
        assert!(within(ours[k], theirs[k], 0.01), "{k}: leakprobe {} vs heaptrack {}", ours[k], theirs[k]);
    }
    assert_no_drops(&report);

    let out = run_leakprobe(&["run", "--", exe_s, "seed"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for title in ["MOST CALLS TO ALLOCATION FUNCTIONS", "PEAK MEMORY CONSUMERS", "MOST MEMORY LEAKED"] {
        let first = text
            .lines()
            .skip_while(|l| !l.starts_with(title))
            .nth(1)
            .unwrap_or_else(|| panic!("no {title} ranking in:\n{text}"));
        assert!(first.contains("process_item(int)"), "{title}'s first site: {first}");
    }
}

/// 5,000 buffers each freed before the next allocation: heaptrack's temporary count and
/// ours are the same, and sampling says it cannot count them rather than print 0.
#[test]
fn temporaries_are_counted_as_heaptrack_counts_them() {
    require_root();
    let exe = cases();
    let exe_s = exe.to_str().unwrap();
    let dir = scratch_dir("ci_gate_temporaries");
    let theirs = heaptrack_figures(&dir, &[exe_s, "temporaries"], "scratch(int)");
    let (report, _) = run_json(&[], &[exe_s, "temporaries"]);
    let ours = our_figures(&report, "scratch(int)");
    println!("scratch(int): heaptrack {theirs:?}, leakprobe {ours:?}");
    assert_eq!(theirs["temporary"], 5000);
    assert_eq!(ours["temporary"], theirs["temporary"]);
    assert_eq!(ours["allocations"], theirs["allocations"]);

    let (sampled, _) = run_json(&["--sample-bytes", "4KiB"], &[exe_s, "temporaries"]);
    assert!(
        sites(&sampled).iter().all(|s| s.get("temporary_count").is_none()),
        "sampling sees no calls between samples: no temporary count"
    );
    let text = String::from_utf8_lossy(
        &run_leakprobe(&["run", "--sort", "temporary", "--", exe_s, "temporaries"]).stdout,
    )
    .into_owned();
    let block =
        text.split("Call sites by temporary").nth(1).unwrap_or_else(|| panic!("no --sort section:\n{text}"));
    let first = block.lines().find(|l| l.starts_with("#1 ")).unwrap();
    let body: String = block
        .lines()
        .skip_while(|l| *l != first)
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(body.contains("scratch(int)") && body.contains("5000 temporary"), "--sort temporary:\n{body}");
}

/// One site grows to 10 MiB, frees it all, grows to 4 MiB: its peak is 10 MiB exactly while 4
/// MiB is outstanding, in full tracking and in-process; within 10% when sampled either way.
/// The whole heap's peak is at least the site's, and pprof carries the peak as a label.
#[test]
fn a_sites_peak_survives_its_frees_in_every_mode() {
    require_root();
    const MIB: u64 = 1 << 20;
    let exe = cases();
    let exe_s = exe.to_str().unwrap();
    let modes: [(&[&str], bool); 4] = [
        (&[], true),
        (&["--in-process"], true),
        (&["--sample-bytes", "16KiB"], false),
        (&["--in-process", "--sample-bytes", "16KiB"], false),
    ];
    for (args, exact) in modes {
        let (report, err) = run_json(args, &[exe_s, "peaks"]);
        println!("{args:?}: leakprobe said:\n{err}");
        let ours = our_figures(&report, "grow_block()");
        println!("{args:?}: {ours:?}, heap peak {}", report["totals"]["peak_bytes"]);
        if exact {
            assert_eq!(ours["peak"], 10 * MIB, "{args:?}");
            assert_eq!(ours["leaked"], 4 * MIB, "{args:?}");
            assert!(report["totals"]["peak_bytes"].as_u64().unwrap() >= 10 * MIB, "{args:?}");
        } else {
            assert!(within(ours["peak"], 10 * MIB, 0.10), "{args:?}: peak {}", ours["peak"]);
            assert!(within(ours["leaked"], 4 * MIB, 0.10), "{args:?}: outstanding {}", ours["leaked"]);
        }
    }

    let home = scratch_dir("ci_gate_pprof");
    let pb = home.join("peaks.pb.gz");
    let out = run_leakprobe(&["run", "--pprof", pb.to_str().unwrap(), "--", exe_s, "peaks"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let traces = go_pprof(&home, &["-traces"], &pb);
    let block = traces
        .split("-----------+")
        .find(|b| b.contains("grow_block()"))
        .unwrap_or_else(|| panic!("grow_block() not in -traces:\n{traces}"));
    assert!(block.contains("peak_bytes:  10MB"), "go tool pprof -traces shows the peak label:\n{block}");
}

/// The suppression test's program built as is and with -fsanitize=leak (gcc's liblsan), -O0
/// so that neither malloc is elided.
fn two_leaks() -> (PathBuf, PathBuf) {
    let plain = build_target("two_leaks.c", "two_leaks", "gcc", &["-O0", "-g"]);
    let lsan = build_target("two_leaks.c", "two_leaks_lsan", "gcc", &["-O0", "-g", "-fsanitize=leak"]);
    (plain, lsan)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A program with two leaks (400 B from leak_a, 1000 B from leak_b): with both known the gate
/// passes, with one known it fails; the suppressed leak is listed with its bytes and a rule
/// that matched nothing is named. The very same files do the same to the program built with
/// LeakSanitizer, and the Valgrind-format file to Valgrind's memcheck.
#[test]
fn suppressions_keep_the_gate_green_as_lsan_and_valgrind_read_them() {
    require_root();
    let (plain, lsan) = two_leaks();
    let dir = scratch_dir("ci_gate_supp");
    let one = write(&dir, "one.supp", "# the known one\nleak:leak_a\nleak:never_called_anywhere\n");
    let both = write(&dir, "both.supp", "leak:leak_a\nleak:leak_b\n");
    let vg_both = write(
        &dir,
        "both.vg.supp",
        "{\n   known_a\n   Memcheck:Leak\n   match-leak-kinds: definite\n   fun:malloc\n   fun:leak_a\n   ...\n}\n\
         {\n   known_b\n   Memcheck:Leak\n   fun:malloc\n   fun:leak_b\n   fun:main\n}\n",
    );
    let gate = |supp: &Path| {
        let out = run_leakprobe(&[
            "run",
            "--scan",
            "--fail-on-leak",
            "0",
            "--suppressions",
            supp.to_str().unwrap(),
            "--",
            plain.to_str().unwrap(),
        ]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, text, err) = gate(&both);
    assert_eq!(code, Some(0), "both leaks known: the gate passes\n{text}\n{err}");
    let (code, _, err) = gate(&vg_both);
    assert_eq!(code, Some(0), "the Valgrind file suppresses both too\n{err}");
    let (code, text, err) = gate(&one);
    assert_eq!(code, Some(1), "leak_b is not known: the gate fails\n{text}\n{err}");
    let suppressed =
        text.split("SUPPRESSED").nth(1).unwrap_or_else(|| panic!("no SUPPRESSED section:\n{text}"));
    assert!(suppressed.contains("leak:leak_a") && suppressed.contains("400 B"), "{suppressed}");
    assert!(
        err.contains("suppression leak:never_called_anywhere") && err.contains("matched nothing"),
        "{err}"
    );

    // The same files, read by LeakSanitizer itself.
    let lsan_run = |supp: &Path| {
        output(Command::new(&lsan).env("LSAN_OPTIONS", format!("suppressions={}", supp.display())))
    };
    assert_eq!(lsan_run(&both).status.code(), Some(0), "LSan with both known");
    let out = lsan_run(&one);
    let lsan_err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(23), "LSan with one known:\n{lsan_err}");
    assert!(lsan_err.contains("leak_b") && !lsan_err.contains("in leak_a "), "{lsan_err}");

    // And the Valgrind file by Valgrind.
    let vg = |supp: Option<&Path>| {
        let mut cmd = Command::new("valgrind");
        cmd.args(["--leak-check=full", "--errors-for-leak-kinds=definite", "--error-exitcode=9", "-q"]);
        if let Some(s) = supp {
            cmd.arg(format!("--suppressions={}", s.display()));
        }
        output(cmd.arg(&plain)).status.code()
    };
    assert_eq!(vg(None), Some(9), "valgrind finds the leaks unsuppressed");
    assert_eq!(vg(Some(&vg_both)), Some(0), "valgrind with the same Valgrind file");
}

/// LSan's report as lines: the `Direct leak of ...` header, then per frame (function,
/// `file:line` basename) from #1 on (#0 is the interceptor), up to the first frame without a
/// source line on either side.
fn lsan_blocks(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut blocks = Vec::new();
    for chunk in text.split("\n\n") {
        let mut lines = chunk.lines().skip_while(|l| !l.contains(" leak of "));
        let Some(head) = lines.next() else { continue };
        let frames = lines
            .filter_map(|l| {
                let rest = l.trim().split_once(" in ")?.1;
                let (func, place) = rest.rsplit_once(' ')?;
                let place = place.rsplit('/').next()?.to_string();
                Some((func.to_string(), place))
            })
            .collect();
        blocks.push((head.to_string(), frames));
    }
    blocks
}

/// The seed's `new int[100]` (-O0): `--format lsan` prints LSan's block, `Direct leak of 400
/// byte(s) in 1 object(s)` with leak_example() at main.cpp's line 4, frame for frame as LSan
/// prints it for the same program, the SUMMARY line, and LSan's exit status (23, or
/// LSAN_OPTIONS's exitcode).
#[test]
fn the_lsan_format_reads_as_lsans_own_report() {
    require_root();
    let plain = build_target("lsan_example.cpp", "lsan_example", "g++", &["-O0", "-g"]);
    let lsan =
        build_target("lsan_example.cpp", "lsan_example_lsan", "g++", &["-O0", "-g", "-fsanitize=leak"]);
    let theirs = output(&mut Command::new(&lsan));
    let their_text = String::from_utf8_lossy(&theirs.stderr).into_owned();
    assert_eq!(theirs.status.code(), Some(23), "{their_text}");

    let ours = run_leakprobe(&["run", "--format", "lsan", "--", plain.to_str().unwrap()]);
    let our_text = String::from_utf8_lossy(&ours.stdout).into_owned();
    assert_eq!(ours.status.code(), Some(23), "{our_text}\n{}", String::from_utf8_lossy(&ours.stderr));
    assert!(our_text.contains("ERROR: LeakSanitizer: detected memory leaks"), "{our_text}");
    assert!(our_text.contains("SUMMARY: leakprobe: 400 byte(s) leaked in 1 allocation(s)."), "{our_text}");

    let (t, o) = (lsan_blocks(&their_text), lsan_blocks(&our_text));
    assert_eq!(t.len(), 1, "LSan's blocks: {their_text}");
    assert_eq!(o.len(), 1, "our blocks: {our_text}");
    assert_eq!(o[0].0, "Direct leak of 400 byte(s) in 1 object(s) allocated from:");
    assert_eq!(o[0].0, t[0].0);
    let line = line_of("lsan_example.cpp", "new int[100]");
    assert_eq!(o[0].1[1], ("leak_example()".to_string(), format!("lsan_example.cpp:{line}")), "{our_text}");
    // Frame for frame, from #1 (LSan's #0 is its interceptor), where both name a function
    // and a source line.
    let compared = t[0].1[1..]
        .iter()
        .zip(&o[0].1[1..])
        .take_while(|(a, b)| a.1.contains(':') && b.1.contains(':'))
        .inspect(|(a, b)| assert_eq!(a, b, "LSan:\n{their_text}\nleakprobe:\n{our_text}"))
        .count();
    assert!(compared >= 3, "compared {compared} frames:\nLSan:\n{their_text}\nleakprobe:\n{our_text}");

    let out = Command::new(leakprobe_bin())
        .args(["run", "--format", "lsan", "--", plain.to_str().unwrap()])
        .env("LSAN_OPTIONS", "exitcode=5")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "LSAN_OPTIONS=exitcode=5");
}

/// The README's reproduce_leak.sh, run as written: exit 0 when every leak is in known.supp,
/// 1 (and the report left behind) when one is not.
#[test]
fn the_readmes_reproduction_script_gates_as_documented() {
    require_root();
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let block = readme
        .split("<!-- reproduce_leak.sh: begin")
        .nth(1)
        .and_then(|r| r.split("<!-- reproduce_leak.sh: end").next())
        .expect("the README's reproduce_leak.sh block");
    let script = block.split("```sh\n").nth(1).and_then(|r| r.split("```").next()).expect("its sh fence");
    let (plain, _) = two_leaks();
    let dir = scratch_dir("ci_gate_recipe");
    let sh = write(&dir, "reproduce_leak.sh", script);
    let input = write(&dir, "input.txt", "");
    let path = format!(
        "{}:{}",
        leakprobe_bin().parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = |known: &str| {
        write(&dir, "known.supp", known);
        let _ = std::fs::remove_file(dir.join("leak-report.txt"));
        let out =
            output(Command::new("sh").arg(&sh).arg(&plain).arg(&input).current_dir(&dir).env("PATH", &path));
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run("leak:leak_a\nleak:leak_b\n");
    assert_eq!(code, Some(0), "both leaks known:\n{err}");
    let (code, err) = run("leak:leak_a\n");
    assert_eq!(code, Some(1), "leak_b is new:\n{err}");
    assert!(err.contains("new leak: see leak-report.txt"), "{err}");
    let report = std::fs::read_to_string(dir.join("leak-report.txt")).unwrap();
    assert!(report.contains("leak_b") && report.contains("SUPPRESSED"), "{report}");
}
