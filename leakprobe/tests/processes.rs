//! Several processes in one session (issue 25): a pre-fork server's workers with --children,
//! workers recycled while traced, and independent processes listed with --pid A,B.

mod common;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

const LEAK: u64 = 1000;

/// `prefork WORKERS LEAK RECYCLE`, and the port it listens on.
struct Server {
    child: Child,
    _stdin: ChildStdin,
    port: u16,
}

impl Server {
    fn start(workers: u32, recycle: u32) -> Server {
        let exe = c_target("prefork.c", "prefork");
        let mut child = Command::new(exe)
            .args([workers.to_string(), LEAK.to_string(), recycle.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start prefork");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("port ").and_then(|p| p.parse().ok()).expect("port line");
        let stdin = child.stdin.take().unwrap();
        // Every worker is up (and has accepted nothing yet).
        let deadline = Instant::now() + Duration::from_secs(10);
        while children_of(child.id() as i32).len() < workers as usize {
            assert!(Instant::now() < deadline, "the workers never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        Server { child, _stdin: stdin, port }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// One request: which worker served it.
    fn request(&self) -> u32 {
        let mut c = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        c.write_all(b"GET\n").unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        reply
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("reply {reply:?}"))
    }

    /// `n` requests spread over `over`: requests served per worker.
    fn load(&self, n: u32, over: Duration) -> BTreeMap<u32, u64> {
        let mut served = BTreeMap::new();
        let start = Instant::now();
        for i in 0..n {
            *served.entry(self.request()).or_default() += 1;
            let due = over.mul_f64(f64::from(i + 1) / f64::from(n));
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        served
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The master stopped first (it would fork replacements for the workers killed), then
        // the workers (a master killed outright leaves them running), then the master.
        // SAFETY: kill with a valid signal on the server we started.
        unsafe { libc::kill(self.pid(), libc::SIGSTOP) };
        for w in children_of(self.pid()) {
            // SAFETY: kill with a valid signal on a worker of the server we started.
            unsafe { libc::kill(w, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Outstanding bytes through remember_request, by pid.
fn leaked_by_pid(report: &Value) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for s in sites(report).iter().filter(|s| has_frame(s, "remember_request")) {
        let pid = s["pid"].as_u64().unwrap_or_else(|| panic!("a site without its pid: {s}")) as u32;
        *out.entry(pid).or_default() += s["outstanding_bytes"].as_u64().unwrap();
    }
    out
}

fn processes(report: &Value) -> BTreeMap<u32, &Value> {
    report["processes"]
        .as_array()
        .unwrap_or_else(|| panic!("no processes in the report"))
        .iter()
        .map(|p| (p["pid"].as_u64().unwrap() as u32, p))
        .collect()
}

/// Every worker's leak is exactly the requests it served.
fn assert_each_leaked_what_it_served(served: &BTreeMap<u32, u64>, report: &Value, err: &str) {
    let leaked = leaked_by_pid(report);
    for (pid, n) in served {
        assert_eq!(
            leaked.get(pid).copied(),
            Some(n * LEAK),
            "PID {pid} served {n}; leaked {leaked:?}\n{err}"
        );
    }
}

/// The merged site through `remember_request`.
fn merged_leak(report: &Value) -> &Value {
    report["merged"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["frames"].as_array().unwrap().iter().any(|f| f["function"] == "remember_request"))
        .unwrap_or_else(|| panic!("no merged site through remember_request: {}", report["merged"]))
}

/// `attach --pid MASTER --children` for `duration` while `n` requests are spread over `over`:
/// requests served per worker, the JSON report, and leakprobe's stderr.
fn follow(server: &Server, duration: &str, n: u32, over: Duration) -> (BTreeMap<u32, u64>, Value, String) {
    follow_with(server, duration, n, over, &[])
}

/// [`follow`] with more arguments for leakprobe.
fn follow_with(
    server: &Server,
    duration: &str,
    n: u32,
    over: Duration,
    more: &[&str],
) -> (BTreeMap<u32, u64>, Value, String) {
    let master = server.pid().to_string();
    let mut args = vec!["attach", "--pid", &master, "--children", "--duration", duration, "--format", "json"];
    args.extend_from_slice(more);
    // A debug build attaches a child's probes in up to ~150 ms here, near the follower's 250 ms
    // bound: these tests check that a held child loses nothing, so the bound is raised.
    // Its own log too, printed only when a test fails.
    let env = [("LEAKPROBE_TEST_MAX_HOLD_MS", "2000"), ("RUST_LOG", "leakprobe=info")];
    let mut lp = Leakprobe::start_env(&args, &env);
    lp.wait_attached();
    let served = server.load(n, over);
    let (code, out, err) = lp.finish();
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {err}"));
    (served, report, err)
}

/// nginx's shape: a master and 4 workers, each leaking 1000 bytes a request. `attach --pid
/// MASTER --children` traces all five, and each worker's leak is exactly what it served; the
/// merged site has all four workers and their total.
#[test]
fn every_worker_of_a_prefork_server_is_traced_with_its_own_bytes() {
    require_root();
    let server = Server::start(4, 0);
    let (served, report, err) = follow(&server, "5s", 400, Duration::from_secs(3));
    let procs = processes(&report);
    println!("served {served:?}; processes {:?}", procs.keys());
    assert_eq!(procs.len(), 5, "the master and its 4 workers: {err}");
    for w in children_of(server.pid()) {
        assert_eq!(procs[&(w as u32)]["origin"], "child", "{}", procs[&(w as u32)]);
    }
    assert_each_leaked_what_it_served(&served, &report, "");
    let merged = merged_leak(&report);
    let total: u64 = served.values().sum();
    assert_eq!(merged["outstanding_bytes"].as_u64(), Some(total * LEAK));
    assert_eq!(merged["pids"].as_array().unwrap().len(), served.len());
    assert_no_drops(&report);
}

/// `--scan` with `--children`: each process is scanned on its own (the follower lends it to
/// the scan's stop and takes it back), every worker's leak is found reachable through the
/// `cache` global in full, and the workers stay followed between scans: what they leak after
/// the first scan is still counted exactly, and none is stopped or traced at the end.
#[test]
fn scan_goes_through_every_worker_one_at_a_time() {
    require_root();
    let server = Server::start(4, 0);
    let (served, report, err) = follow_with(
        &server,
        "6s",
        400,
        Duration::from_secs(4),
        &["--scan-every", "2s", "--max-pause", "500ms"],
    );
    let procs = processes(&report);
    assert_eq!(procs.len(), 5, "the master and its 4 workers: {err}");
    let scan = &report["scan"];
    let scanned: BTreeMap<u32, &Value> = scan["processes"]
        .as_array()
        .unwrap_or_else(|| panic!("no per-process scans: {scan}"))
        .iter()
        .map(|p| (p["pid"].as_u64().unwrap() as u32, p))
        .collect();
    assert_eq!(scanned.keys().collect::<Vec<_>>(), procs.keys().collect::<Vec<_>>(), "{err}");
    for (pid, p) in &scanned {
        assert!(p.get("error").is_none(), "PID {pid}: {p}\n{err}");
        assert!(p["pause_ms"].as_f64().unwrap() < 500.0, "PID {pid}: {p}");
    }
    assert!(scan["history"].as_array().unwrap().len() >= 2, "periodic scans and the last: {scan}");
    // Exact bytes after two scans: following went on between them.
    assert_each_leaked_what_it_served(&served, &report, &err);
    for s in sites(&report).iter().filter(|s| has_frame(s, "remember_request")) {
        let pid = s["pid"].as_u64().unwrap();
        let reach = &s["reachability"];
        assert_eq!(
            reach["reachable"]["bytes"].as_u64(),
            s["outstanding_bytes"].as_u64(),
            "PID {pid}: every cached entry is reachable: {reach}"
        );
        let holder = s["held_by"][0]["holder"].as_str().unwrap_or_default();
        assert!(holder.contains("cache"), "PID {pid}: held by {}", s["held_by"]);
    }
    let merged = merged_leak(&report);
    let total: u64 = served.values().sum();
    assert_eq!(merged["reachability"]["reachable"]["bytes"].as_u64(), Some(total * LEAK), "{merged}");
    for w in std::iter::once(server.pid()).chain(children_of(server.pid())) {
        let (stopped, tracer) = stopped_threads(w);
        assert_eq!((stopped, tracer.as_str()), (0, "0"), "PID {w} after the session");
    }
    assert_no_drops(&report);
}

/// Workers recycled every 50 requests while traced: every worker that served a request is in
/// the report, each ended one with what it held. Each child is held at birth until its probes
/// are live, so the leaks seen are exactly those served.
#[test]
fn recycled_workers_are_followed_and_none_is_lost() {
    require_root();
    // The previous tests' probes are torn down in the background, under the kernel lock that
    // attaching a child's probes needs: wait for a quiet kernel, as a server would have. (With
    // teardowns in flight a child can be held for its whole MAX_HOLD: docs/design/multi-process.md.)
    wait_for_teardowns();
    let server = Server::start(4, 50);
    let (served, report, err) = follow(&server, "8s", 1000, Duration::from_secs(5));
    let procs = processes(&report);
    let leaked = leaked_by_pid(&report);
    println!("served by {} workers, {} processes traced", served.len(), procs.len());
    assert!(served.len() >= 20, "1000 requests, recycled every 50: {served:?}");
    for (pid, n) in &served {
        assert!(procs.contains_key(pid), "PID {pid} served requests but is not in the report:\n{err}");
        assert_eq!(leaked.get(pid).copied(), Some(n * LEAK), "PID {pid} served {n} requests:\n{err}");
    }
    let ended = procs.values().filter(|p| p["ended_by"] == "exited").count();
    assert!(ended >= served.len() - 4, "{ended} ended of {}", served.len());
    let forked: Vec<&Value> = procs.values().copied().filter(|p| p["origin"] == "forked").collect();
    let held: Vec<f64> = forked.iter().filter_map(|p| p["held_ms"].as_f64()).collect();
    println!("held at birth: {held:?} ms");
    for p in &forked {
        assert_eq!(p["blind_ms"].as_f64(), Some(0.0), "a forked worker ran before its probes: {p}");
    }
    let total: u64 = served.values().sum::<u64>() * LEAK;
    let seen: u64 = leaked.values().sum();
    assert_eq!(seen, total, "seen {seen} of {total} bytes");
}

/// The GOT slots of malloc and free in `pid` that lead into a stub of ours (its code mapping).
fn slots_into_stub(pid: i32) -> Vec<(u64, &'static str)> {
    let stubs = leakprobe::inprocess::install::stub_ranges(pid);
    let Ok(mem) = leakprobe::ptrace::Mem::open(pid) else { return Vec::new() };
    let Ok(plan) = leakprobe::inprocess::got::plan_pid(pid, |a| mem.read_u64(a).ok()) else {
        return Vec::new();
    };
    plan.slots
        .iter()
        .filter(|s| matches!(s.function, "malloc" | "free"))
        .filter(|s| mem.read_u64(s.address).is_ok_and(|v| stubs.iter().any(|(lo, hi)| v >= *lo && v < *hi)))
        .map(|s| (s.address, s.function))
        .collect()
}

/// `--in-process` across a recycled pool: the workers there at the start get a stub each, those
/// forked since run their parent's (inherited with the GOT, and given sampling draws of their
/// own). Every worker's leak is exact, and at the end no process's GOT leads into a stub.
#[test]
fn in_process_follows_recycled_workers_exactly_and_puts_every_got_back() {
    require_root();
    wait_for_teardowns();
    let server = Server::start(4, 50);
    let (served, report, err) = follow_with(&server, "8s", 1000, Duration::from_secs(5), &["--in-process"]);
    let procs = processes(&report);
    let leaked = leaked_by_pid(&report);
    assert!(served.len() >= 20, "1000 requests, recycled every 50: {served:?}");
    for (pid, n) in &served {
        assert_eq!(leaked.get(pid).copied(), Some(n * LEAK), "PID {pid} served {n} requests:\n{err}");
        let stub = &procs[pid]["stub"];
        let how = if procs[pid]["origin"] == "forked" { "inherited" } else { "mapped" };
        assert_eq!(stub["how"], how, "{}", procs[pid]);
        assert!(stub["slots"].as_u64() >= Some(2), "{}", procs[pid]);
    }
    // Those still running at the end had their GOT put back; the others ended with theirs.
    let running: Vec<&Value> = procs.values().copied().filter(|p| p["ended_by"].is_null()).collect();
    assert_eq!(running.len(), 5, "the master and 4 workers run at the end:\n{err}");
    for p in running {
        assert_eq!(p["stub"]["restored"], p["stub"]["slots"], "{p}");
    }
    for pid in children_of(server.pid()).into_iter().chain([server.pid()]) {
        assert_eq!(slots_into_stub(pid), vec![], "PID {pid} still leads into a stub");
    }
    assert_eq!(server.load(20, Duration::from_millis(100)).values().sum::<u64>(), 20);
    assert_no_drops(&report);
}

/// Sampled in-process across a recycled pool: each newborn samples with draws of its own, so
/// the estimates of 20 workers add up (with the parent's draws copied into every child, they
/// erred together: 42% of the bytes in one run).
#[test]
fn in_process_sampled_estimates_add_up_across_recycled_workers() {
    require_root();
    wait_for_teardowns();
    let server = Server::start(4, 50);
    let more = ["--in-process", "--sample-bytes", "4KiB"];
    let (served, report, err) = follow_with(&server, "8s", 1000, Duration::from_secs(5), &more);
    let total: u64 = served.values().sum::<u64>() * LEAK;
    let seen: u64 = leaked_by_pid(&report).values().sum();
    let sampled: u64 = processes(&report).values().filter_map(|p| p["stub"]["sampled_allocs"].as_u64()).sum();
    println!("estimated {seen} of {total} bytes from {sampled} samples");
    // ~217 samples of 1000-byte blocks at 4 KiB: a standard error of ~6%.
    let ratio = seen as f64 / total as f64;
    assert!((0.75..=1.25).contains(&ratio), "estimated {seen} of {total} bytes:\n{err}");
}

/// A SIGKILL of leakprobe while a master and 8 workers run its stub: each one's guard puts
/// its GOT back within a second, every request is answered, nothing of ours stays loaded.
#[test]
fn sigkill_in_process_across_eight_workers_puts_every_got_back() {
    require_root();
    wait_for_teardowns();
    let server = Server::start(8, 0);
    let all: Vec<i32> = children_of(server.pid()).into_iter().chain([server.pid()]).collect();
    let master = server.pid().to_string();
    let mut lp =
        Leakprobe::start(&["attach", "--pid", &master, "--children", "--in-process", "--duration", "60s"]);
    lp.wait_attached();
    for pid in &all {
        assert!(!slots_into_stub(*pid).is_empty(), "PID {pid} does not run the stub while attached");
    }
    let (load, restored) = std::thread::scope(|s| {
        let h = s.spawn(|| server.load(300, Duration::from_millis(600)));
        std::thread::sleep(Duration::from_millis(200));
        let killed = Instant::now();
        // SAFETY: kill with a valid signal on the leakprobe we started.
        unsafe { libc::kill(lp.child.id() as i32, libc::SIGKILL) };
        while all.iter().any(|p| !slots_into_stub(*p).is_empty()) && killed.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let restored = killed.elapsed();
        (h.join().unwrap(), restored)
    });
    let _ = lp.child.wait();
    println!("every GOT put back {restored:?} after the SIGKILL");
    for pid in &all {
        assert_eq!(slots_into_stub(*pid), vec![], "PID {pid} still leads into a stub");
    }
    assert!(restored < Duration::from_secs(1), "the guards took {restored:?}");
    assert_eq!(load.values().sum::<u64>(), 300, "every request answered across the kill");
    assert_all_gone("after the kill");
    assert_eq!(server.load(40, Duration::from_millis(100)).values().sum::<u64>(), 40);
}

/// Two servers started on their own (two layouts, ASLR apart): `--pid A,B` traces both
/// workers, and each one's stack is symbolized in its own layout.
#[test]
fn independent_processes_are_traced_each_in_its_own_layout() {
    require_root();
    let (a, b) = (Server::start(1, 0), Server::start(1, 0));
    let wa = children_of(a.pid())[0];
    let wb = children_of(b.pid())[0];
    let pids = format!("{wa},{wb}");
    let mut lp = Leakprobe::start(&["attach", "--pid", &pids, "--duration", "3s", "--format", "json"]);
    lp.wait_attached();
    let (na, nb) = (a.load(30, Duration::from_millis(500)), b.load(70, Duration::from_millis(500)));
    let (code, out, err) = lp.finish();
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {err}"));
    let procs = processes(&report);
    assert_ne!(procs[&(wa as u32)]["layout"], procs[&(wb as u32)]["layout"]);
    let leaked = leaked_by_pid(&report);
    assert_eq!(leaked.get(&(wa as u32)).copied(), Some(na[&(wa as u32)] * LEAK), "{leaked:?}");
    assert_eq!(leaked.get(&(wb as u32)).copied(), Some(nb[&(wb as u32)] * LEAK), "{leaked:?}");
}

/// A SIGKILL of leakprobe while it follows a master and 8 workers under load: every process
/// runs on and answers, and nothing of ours stays loaded.
#[test]
fn sigkill_while_following_eight_workers_leaves_them_all_running() {
    require_root();
    let server = Server::start(8, 0);
    let workers = children_of(server.pid());
    let master = server.pid().to_string();
    for round in 0..3 {
        let mut lp = Leakprobe::start(&["attach", "--pid", &master, "--children", "--duration", "60s"]);
        lp.wait_attached();
        let load = std::thread::scope(|s| {
            let h = s.spawn(|| server.load(300, Duration::from_millis(600)));
            std::thread::sleep(Duration::from_millis(100 + 150 * round));
            // SAFETY: kill with a valid signal on the leakprobe we started.
            unsafe { libc::kill(lp.child.id() as i32, libc::SIGKILL) };
            h.join().unwrap()
        });
        let _ = lp.child.wait();
        assert_eq!(load.values().sum::<u64>(), 300, "every request answered across the kill");
        assert_all_gone(&format!("round {round}"));
        assert_eq!(children_of(server.pid()), workers, "the same 8 workers, none lost");
        for w in workers.iter().chain([&server.pid()]) {
            assert!(matches!(state_of(*w), Some('S' | 'R')), "{w} is {:?}", state_of(*w));
            assert_eq!(stopped_threads(*w).1, "0", "{w} is still traced (the follower is gone)");
        }
    }
    // And they still serve.
    assert_eq!(server.load(40, Duration::from_millis(100)).values().sum::<u64>(), 40);
}

/// A worker held at birth when leakprobe is SIGKILLed goes on at once: the follower reads EOF
/// and exits, and the kernel lets go of every process it traced. No request is lost.
#[test]
fn sigkill_while_a_child_is_held_at_birth_lets_it_run() {
    require_root();
    // "Nothing of ours loaded" afterwards: the previous tests' teardowns finish first.
    wait_for_teardowns();
    // One worker, recycled every 5 requests: the 6th request waits for a held newborn.
    let server = Server::start(1, 5);
    let master = server.pid().to_string();
    let mut lp = Leakprobe::start_env(
        &["attach", "--pid", &master, "--children", "--duration", "60s"],
        // Neither leakprobe nor the follower lets it go on its own within the test.
        &[("LEAKPROBE_TEST_RELEASE_PAUSE_MS", "60000"), ("LEAKPROBE_TEST_MAX_HOLD_MS", "60000")],
    );
    lp.wait_attached();
    let (load, waited) = std::thread::scope(|s| {
        let h = s.spawn(|| server.load(12, Duration::from_millis(300)));
        lp.wait_for("LEAKPROBE_TEST_RELEASE_PAUSE_MS: pausing");
        let newborn = children_of(server.pid());
        assert_eq!(newborn.len(), 1, "one worker at a time: {newborn:?}");
        let (stopped, tracer) = stopped_threads(newborn[0]);
        assert_eq!(stopped, 1, "the newborn worker {} is held (tracer {tracer})", newborn[0]);
        let killed = Instant::now();
        // SAFETY: kill with a valid signal on the leakprobe we started.
        unsafe { libc::kill(lp.child.id() as i32, libc::SIGKILL) };
        let load = h.join().unwrap();
        (load, killed.elapsed())
    });
    let _ = lp.child.wait();
    println!("the held worker served again {waited:?} after the kill");
    assert!(waited < Duration::from_secs(30), "let go by the kill, not by a timeout: {waited:?}");
    assert_eq!(load.values().sum::<u64>(), 12, "every request answered: {load:?}");
    assert!(load.len() >= 2, "served by the recycled workers: {load:?}");
    assert_all_gone("after the kill");
    for w in children_of(server.pid()).into_iter().chain([server.pid()]) {
        assert_eq!(stopped_threads(w), (0, "0".to_string()), "{w} is stopped or still traced");
    }
}

/// The leaking site's `leakprobe_site_outstanding_bytes` series in a scrape: (pid label, value).
fn outstanding_series(scrape: &str, function: &str) -> Vec<(Option<u32>, u64)> {
    let needle = format!("function=\"{function}\"");
    scrape
        .lines()
        .filter(|l| l.starts_with("leakprobe_site_outstanding_bytes{") && l.contains(&needle))
        .filter_map(|l| {
            let pid = l.split("pid=\"").nth(1).and_then(|r| r.split('"').next()).and_then(|p| p.parse().ok());
            Some((pid, l.rsplit(' ').next()?.parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// The metrics of a pool: one series per site, merged across the workers, by default (the
/// cardinality of one process); one per worker with a `pid` label on --metrics-per-process,
/// each with the bytes that worker leaked.
#[test]
fn metrics_merge_the_workers_unless_asked_per_process() {
    require_root();
    let server = Server::start(3, 0);
    let master = server.pid().to_string();
    let mut served_so_far: BTreeMap<u32, u64> = BTreeMap::new();
    for per_process in [false, true] {
        let port = free_port();
        let p = port.to_string();
        let mut args = vec!["attach", "--pid", &master, "--children", "--interval", "1s", "--metrics", &p];
        args.extend(["--duration", "8s"]);
        if per_process {
            args.push("--metrics-per-process");
        }
        let mut lp = Leakprobe::start(&args);
        lp.wait_attached();
        let served = server.load(60, Duration::from_millis(600));
        for (pid, n) in &served {
            *served_so_far.entry(*pid).or_default() += n;
        }
        let total: u64 = served.values().sum::<u64>() * LEAK;
        let deadline = Instant::now() + Duration::from_secs(6);
        let series = loop {
            let scrape = http(port, "GET", "/metrics").map(|r| r.1).unwrap_or_default();
            let series = outstanding_series(&scrape, "remember_request");
            if series.iter().map(|s| s.1).sum::<u64>() == total || Instant::now() > deadline {
                break series;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        match per_process {
            false => assert_eq!(series, [(None, total)], "one merged series, the pool's total"),
            true => {
                let mut expect: Vec<(Option<u32>, u64)> =
                    served.iter().map(|(pid, n)| (Some(*pid), n * LEAK)).collect();
                let mut got = series.clone();
                expect.sort_unstable();
                got.sort_unstable();
                assert_eq!(got, expect, "one series per worker, each with its own bytes");
            }
        }
        let (code, _, err) = lp.finish();
        assert_eq!(code, 0, "{err}");
    }
    assert!(served_so_far.len() >= 2, "the load reached several workers: {served_so_far:?}");
}

/// A cgroup v2 directory this test creates (and removes), under the unified hierarchy.
struct Cgroup(std::path::PathBuf);

impl Cgroup {
    fn new() -> Cgroup {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.controllers").exists())
            .expect("a cgroup v2 hierarchy");
        let dir = root.join(format!("leakprobe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a cgroup");
        Cgroup(dir)
    }

    fn enter(&self, pid: i32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("move into the cgroup");
    }

    fn leave(&self, pid: i32) {
        let parent = self.0.parent().unwrap().join("cgroup.procs");
        std::fs::write(parent, pid.to_string()).expect("move out of the cgroup");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for pid in std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default().split_whitespace()
        {
            let _ = std::fs::write(self.0.parent().unwrap().join("cgroup.procs"), pid);
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `--cgroup DIR`: a process in it from the start is traced until it leaves; one that joins
/// while traced is traced from then on; what a process allocates outside is not counted.
#[test]
fn a_cgroups_members_are_traced_while_they_are_members() {
    require_root();
    let (a, b) = (Server::start(1, 0), Server::start(1, 0));
    let (wa, wb) = (children_of(a.pid())[0], children_of(b.pid())[0]);
    let cg = Cgroup::new();
    cg.enter(wa);
    let dir = cg.0.to_str().unwrap().to_string();
    let mut lp = Leakprobe::start(&[
        "attach",
        "--cgroup",
        &dir,
        "--interval",
        "200ms",
        "--duration",
        "30s",
        "--format",
        "json",
    ]);
    lp.wait_attached();
    let a_inside = a.load(20, Duration::from_millis(200))[&(wa as u32)];
    b.load(5, Duration::from_millis(50)); // B, outside: not traced
    cg.enter(wb);
    lp.wait_for(&format!("PID {wb} joined"));
    let b_inside = b.load(30, Duration::from_millis(200))[&(wb as u32)];
    cg.leave(wa);
    lp.wait_for(&format!("PID {wa} left"));
    a.load(40, Duration::from_millis(200)); // A, outside again: not counted
    // SAFETY: SIGINT ends the session with its report.
    unsafe { libc::kill(lp.child.id() as i32, libc::SIGINT) };
    let (code, out, err) = lp.finish();
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {err}"));
    let procs = processes(&report);
    assert_eq!(procs[&(wa as u32)]["ended_by"], "left the cgroup");
    assert_eq!(procs[&(wb as u32)]["origin"], "cgroup");
    let leaked = leaked_by_pid(&report);
    assert_eq!(leaked.get(&(wa as u32)).copied(), Some(a_inside * LEAK), "A while a member only: {leaked:?}");
    assert_eq!(leaked.get(&(wb as u32)).copied(), Some(b_inside * LEAK), "B from its joining: {leaked:?}");
}

/// gunicorn from PyPI, in a venv of Debian's /usr/bin/python3.11 made once under the test's target dir.
fn gunicorn() -> std::path::PathBuf {
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("venv-gunicorn");
    let bin = venv.join("bin/gunicorn");
    if !bin.exists() {
        let made = Command::new("/usr/bin/python3.11")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3.11 -m venv");
        assert!(made.success(), "python3.11 -m venv (Debian's python3.11-venv)");
        let pip = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "gunicorn==27.0.1"])
            .status()
            .expect("pip");
        assert!(pip.success(), "pip install gunicorn (PyPI must be reachable)");
    }
    bin
}

/// A gunicorn master and its sync workers, stopped (all of them) when dropped.
struct Gunicorn {
    master: Child,
    port: u16,
}

impl Gunicorn {
    fn start(workers: u32) -> Gunicorn {
        let port = free_port();
        let master = Command::new(gunicorn())
            .args(["-w", &workers.to_string(), "-b", &format!("127.0.0.1:{port}"), "--chdir"])
            .arg(repo_root().join("tests/targets"))
            .arg("py_gunicorn_app:app")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gunicorn");
        let g = Gunicorn { master, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while children_of(g.pid()).len() < workers as usize || http(port, "GET", "/warmup").is_err() {
            assert!(Instant::now() < deadline, "gunicorn's workers never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
        g
    }

    fn pid(&self) -> i32 {
        self.master.id() as i32
    }

    /// `n` requests spread over `over`: requests served per worker.
    fn load(&self, n: u32, over: Duration) -> BTreeMap<u32, u64> {
        let mut served = BTreeMap::new();
        let start = Instant::now();
        for i in 0..n {
            let (status, body) = http(self.port, "GET", "/").expect("request");
            assert_eq!(status, 200, "{body}");
            let pid = body.trim().strip_prefix("pid ").and_then(|p| p.parse().ok()).expect("pid line");
            *served.entry(pid).or_default() += 1;
            if let Some(wait) = over.mul_f64(f64::from(i + 1) / f64::from(n)).checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        served
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        let workers = children_of(self.pid());
        // SAFETY: kill with valid signals on the server we started and its workers.
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        for w in workers {
            // SAFETY: as above.
            unsafe { libc::kill(w, libc::SIGKILL) };
        }
        let _ = self.master.wait();
    }
}

/// gunicorn's pre-fork workers running a Python app that caches a 48 KiB bytearray per
/// request: `attach --pid MASTER --children --scan` names the leaking line (`cache_user`, its
/// file and line) in each worker, with the bytes that worker cached, under the app's own
/// frames, and the module global that holds them.
#[test]
fn gunicorn_workers_each_show_the_leaking_python_line() {
    require_root();
    wait_for_teardowns();
    let server = Gunicorn::start(4);
    let src = std::fs::read_to_string(repo_root().join("tests/targets/py_gunicorn_app.py")).unwrap();
    let line = src.lines().position(|l| l.contains("bytearray(48 * 1024)")).unwrap() as u64 + 1;
    let master = server.pid().to_string();
    let mut lp = Leakprobe::start_env(
        &["attach", "--pid", &master, "--children", "--duration", "8s", "--scan", "--format", "json"],
        &[("LEAKPROBE_TEST_MAX_HOLD_MS", "2000")],
    );
    lp.wait_attached();
    let served = server.load(200, Duration::from_secs(3));
    let (code, out, err) = lp.finish();
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {err}"));
    let mut cached: BTreeMap<u32, u64> = BTreeMap::new();
    for s in sites(&report) {
        let python: Vec<&Value> =
            s["frames"].as_array().unwrap().iter().filter(|f| f["runtime"] == "python").collect();
        let Some(inner) = python.first() else { continue };
        if inner["function"] != "cache_user" {
            continue;
        }
        assert_eq!(inner["line"].as_u64(), Some(line), "{inner}");
        assert!(inner["file"].as_str().unwrap().ends_with("py_gunicorn_app.py"), "{inner}");
        assert_eq!(python.get(1).map(|f| &f["function"]), Some(&Value::from("app")), "{s}");
        *cached.entry(s["pid"].as_u64().unwrap() as u32).or_default() +=
            s["outstanding_bytes"].as_u64().unwrap();
        // Each worker's scan names the module global, through the Python objects of a worker
        // that imported the app after its fork (another layout, the master's interpreter).
        if s["outstanding_bytes"].as_u64() > Some(0) {
            let holder = s["held_by"][0]["holder"].as_str().unwrap_or_default();
            assert!(
                holder.starts_with("module py_gunicorn_app, global CACHE (dict, "),
                "PID {}: {}",
                s["pid"],
                s["held_by"]
            );
        }
    }
    let scanned = report["scan"]["processes"].as_array().map_or(0, Vec::len);
    assert!(scanned > served.len(), "the master and every worker scanned: {}", report["scan"]);
    println!("served {served:?}; cached by leakprobe {cached:?}");
    assert!(served.len() >= 2, "gunicorn spread 200 requests over its workers: {served:?}");
    for (pid, n) in &served {
        // A bytearray of 48 KiB is a 49,153-byte buffer from malloc (its object header and the
        // dict's entries are pymalloc's, not hooked with several processes).
        let want = n * 49_153;
        let got = cached.get(pid).copied().unwrap_or(0);
        assert!(
            got >= want && got <= want + want / 10 + 64 * 1024,
            "PID {pid} served {n} requests: {got} bytes at cache_user (want {want}):\n{err}"
        );
    }
}
