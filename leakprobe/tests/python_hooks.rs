//! CPython's allocator tables pointed at the stub (issue 22): what happens to a live
//! interpreter when leakprobe is killed while they are patched, attached and detached again
//! and again, or when another tool wraps them meanwhile. Privileged: run as root, one at a
//! time.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::*;
use leakprobe::runtimes::cpython::{self, allocators};
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3.11";

fn storm() -> Target {
    let script = repo_root().join("tests/targets/py_storm.py");
    Target::spawn_full(Path::new(PYTHON), &[script.to_str().unwrap()], &[])
}

/// The MEM and OBJ tables' eight function words: (address, value now).
fn table_words(pid: i32) -> Vec<(u64, u64)> {
    let rt = cpython::detect(pid).expect("detect").expect("CPython");
    let mem = leakprobe::ptrace::Mem::open(pid).unwrap();
    let found = allocators::find_allocators_in(&rt, &mem).expect("the allocator tables");
    let mut out = Vec::new();
    for d in [allocators::Domain::Mem, allocators::Domain::Obj] {
        let s = found.slot(d);
        for k in 1..=4u64 {
            let at = s.addr + 8 * k;
            out.push((at, mem.read_u64(at).unwrap()));
        }
    }
    out
}

fn words_now(pid: i32, words: &[(u64, u64)]) -> Vec<u64> {
    let mem = leakprobe::ptrace::Mem::open(pid).unwrap();
    words.iter().map(|(a, _)| mem.read_u64(*a).unwrap()).collect()
}

/// Waits until every word holds its value from `before` again; fails past a second from
/// `since`. Returns how long it took.
fn wait_restored(pid: i32, before: &[(u64, u64)], since: Instant, what: &str) -> Duration {
    loop {
        let now = words_now(pid, before);
        if now.iter().zip(before).all(|(v, b)| *v == b.1) {
            return since.elapsed();
        }
        assert!(since.elapsed() < Duration::from_secs(1), "{what}: tables not restored in 1 s: {now:x?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The storm's own verdict, then its exit: `bye N` and status 0.
fn storm_exits_clean(mut t: Target) {
    t.send("check");
    let l = t.read_line();
    assert!(l.starts_with("ok "), "the storm's check: {l}");
    t.send("exit");
    let l = t.read_line();
    assert!(l.starts_with("bye "), "the storm's last word: {l}");
    let status = t.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// 100 SIGKILLs of leakprobe at random points (while stopping the interpreter, mapping the
/// tables' stub, patching, tracing; exact and in-process by turns; a quarter held until a stop,
/// a quarter until the tables are patched) under four threads
/// allocating without pause: each time the eight words come back within a second, no thread
/// stays stopped past the 200 ms pause bound, nothing of ours stays loaded; at the end the storm's every
/// object checked right and Python exits 0.
#[test]
fn a_hundred_sigkills_under_a_python_storm_leave_the_interpreter_correct() {
    require_root();
    let target = storm();
    let pid = target.pid();
    let before = table_words(pid);
    let pid_s = pid.to_string();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let kills = 100;
    let (mut worst, mut patched_at_kill, mut inside_stop) = (StopsAfterKill::default(), 0, 0);
    for i in 0..kills {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Attaching takes about a second here: kills spread over three land on every step.
        let delay = Duration::from_millis(x % 3000);
        let in_stop = i % 4 == 3;
        // A quarter of the kills wait for the patch, so that the patched state is hit however
        // long attaching takes on this machine (a slow host made random delays miss it).
        let after_patch = i % 4 == 2;
        let env: &[(&str, &str)] = if in_stop { &[("LEAKPROBE_TEST_STOP_HOLD_MS", "100")] } else { &[] };
        let mut args = vec!["attach", "--pid", &pid_s, "--interval", "1s"];
        if i % 2 == 1 {
            args.push("--in-process");
        }
        let mut lp = Leakprobe::start_env(&args, env);
        if in_stop {
            let deadline = Instant::now() + Duration::from_secs(10);
            while stopped_threads(pid).0 == 0 {
                assert!(Instant::now() < deadline, "kill #{i}: no stop within 10 s");
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(Duration::from_millis(x % 40));
        } else if after_patch {
            let deadline = Instant::now() + Duration::from_secs(20);
            while words_now(pid, &before).iter().zip(&before).all(|(v, b)| *v == b.1) {
                assert!(Instant::now() < deadline, "kill #{i}: tables not patched within 20 s");
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(x % 1000));
        } else {
            std::thread::sleep(delay);
        }
        inside_stop += usize::from(stopped_threads(pid).0 > 0);
        patched_at_kill += usize::from(words_now(pid, &before).iter().zip(&before).any(|(v, b)| *v != b.1));
        lp.child.kill().unwrap();
        let killed = Instant::now();
        let what = format!("kill #{i} at {delay:?}");
        let stops = watch_stops_after_kill(pid, killed, Duration::from_secs(10), &what, || true);
        if stops.longest() > worst.longest() {
            worst = stops;
        }
        wait_restored(pid, &before, killed, &what);
        let _ = lp.finish();
    }
    println!(
        "{kills} kills, {patched_at_kill} with the tables patched, {inside_stop} inside a stop; the longest \
         stop after a kill: {:?}",
        worst.longest()
    );
    assert!(
        patched_at_kill >= kills / 4,
        "only {patched_at_kill} kills landed while the tables were patched"
    );
    assert!(inside_stop >= kills / 8, "only {inside_stop} kills landed inside a stop");
    // The bound leakprobe promises is the install's pause bound (200 ms, IN_PROCESS_MAX_PAUSE),
    // which the helper keeps on its own clock: a debug build on a loaded CI host once took
    // 124 ms to finish the step under way after the kill (typically under 15 ms here).
    assert!(worst.longest() <= Duration::from_millis(200), "{worst:?}");
    assert_all_gone("after 100 SIGKILLs with CPython's tables patched");
    storm_exits_clean(target);
}

/// Attach, detach, attach again, 20 times (exact and in-process by turns): while attached the
/// eight words lead into the stub, after each detach they hold the interpreter's own
/// functions again, and the storm runs on unharmed.
#[test]
fn twenty_attach_detach_cycles_put_the_tables_back_every_time() {
    require_root();
    let mut target = storm();
    let pid = target.pid();
    let before = table_words(pid);
    for i in 0..20 {
        let mut args = vec!["--duration", "1s", "--format", "json"];
        if i % 2 == 1 {
            args.push("--in-process");
        }
        let mut during = Vec::new();
        let report = attach_report(&mut target, &args, |_| {
            during = words_now(pid, &before);
        });
        assert!(
            during.iter().zip(&before).all(|(v, b)| v != &b.1),
            "cycle {i}: not every word led into the stub while attached: {during:x?}"
        );
        assert_eq!(report["runtime"]["allocators"]["restored"], 8, "cycle {i}");
        assert_eq!(words_now(pid, &before), before.iter().map(|b| b.1).collect::<Vec<_>>(), "cycle {i}");
    }
    assert_all_gone("after 20 attach/detach cycles");
    storm_exits_clean(target);
}

/// tracemalloc started while attached wraps the tables over our stub: at detach those words
/// are left as they are (said in the report), the stub stays, switched off, passing calls
/// on; tracemalloc runs and stops again as if we had never been there, and the next attach
/// finds the interpreter's own functions.
#[test]
fn tables_wrapped_while_attached_are_left_to_their_wrapper() {
    require_root();
    let mut target = storm();
    let pid = target.pid();
    let before = table_words(pid);
    let report = attach_report(&mut target, &["--duration", "2s", "--format", "json"], |t| {
        t.send("trace");
        t.expect("tracing");
    });
    let alloc: &Value = &report["runtime"]["allocators"];
    let left: Vec<&Value> = alloc["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["reason"].as_str().is_some_and(|r| r.contains("wrapped since")))
        .collect();
    assert_eq!(left.len(), 8, "every wrapped word is named: {alloc:#}");
    assert_eq!(alloc["restored"], 0, "{alloc:#}");
    target.send("check");
    assert!(target.read_line().starts_with("ok "));
    // tracemalloc puts back what it wrapped, our inert stub, and Python goes on through it.
    target.send("untrace");
    target.expect("untraced");
    target.send("check");
    assert!(target.read_line().starts_with("ok "));
    // Attached again: the stub of last time is what the tables hold, another tool's function
    // in leakprobe's eyes, so they are left alone this time, and the session says so.
    let report = attach_report(&mut target, &["--duration", "1s", "--format", "json"], |_| {});
    let why = report["runtime"]["allocators"]["left_alone"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("earlier leakprobe"), "{:#}", report["runtime"]);
    assert_ne!(words_now(pid, &before), before.iter().map(|b| b.1).collect::<Vec<_>>());
    storm_exits_clean(target);
}

/// A CPython whose layout leakprobe does not know (3.8) is named, its frames and tables left
/// alone with one line, and the session runs on with native stacks.
#[test]
fn an_unknown_cpython_is_refused_in_one_line_and_traced_natively() {
    require_root();
    let python = Path::new("/root/.pyenv/versions/3.8.18/bin/python3.8");
    assert!(python.exists(), "{} is missing", python.display());
    let mut t = Target::spawn_full(
        python,
        &[
            "-c",
            "import sys\nprint('ready', flush=True)\nkeep=[]\nfor l in sys.stdin:\n    keep.extend(bytearray(4096) for _ in range(100))\n    print('done', flush=True)",
        ],
        &[],
    );
    let pid = t.pid().to_string();
    let mut lp = Leakprobe::start(&["attach", "--pid", &pid, "--duration", "2s", "--format", "json"]);
    lp.wait_attached();
    t.send("go");
    t.expect("done");
    let (code, out, err) = lp.finish();
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("CPython 3.8")).collect();
    assert_eq!(lines.len(), 1, "one line names the interpreter and why: {err}");
    assert!(lines[0].contains("native frames only"), "{}", lines[0]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(report.get("runtime").is_none());
    let (bytes, _, _, _) = sum(sites(&report).iter().filter(|s| s["function"] == "malloc"));
    assert!(bytes >= 100 * 4096, "the native sites are there: {bytes} B");
    let _ = t.child.kill();
}
