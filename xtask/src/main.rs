//! Project tasks: `cargo xtask setup | demo | test`.
//!
//! `setup` installs what building and testing need on a fresh Debian machine (the nightly
//! rust-src, LLVM 22 and bpf-linker, bpftool and friends). It is idempotent and quiet when
//! there is nothing to do; `demo` and `test` run it first.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "leakprobe project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain parts and packages the build and tests need (idempotent).
    Setup,
    /// Build leakprobe, start the bundled leaky server, attach, drive its leak, print the report.
    Demo {
        /// How long to trace.
        #[arg(long, default_value = "10s")]
        duration: String,
    },
    /// Run the benchmark harness (bench/harness.py) and update docs/benchmarks.md (root).
    Bench,
    /// Run every test (unit and privileged integration tests; needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Demo { duration } => {
            setup()?;
            demo(&duration)
        }
        Task::Bench => {
            setup()?;
            install_missing(BENCH_PACKAGES)?;
            status(Command::new("python3").arg(root().join("bench/harness.py")))
        }
        Task::Test { args } => {
            setup()?;
            test(&args)
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

/// Debian packages: LLVM 22 to build bpf-linker, bpftool for the detach checks, compilers and
/// the static libc for test targets, libc's separate debug info (the tests check that it is
/// used), setpriv for the privilege test, a TrueType font for --plot's labels, the tools
/// that open the exports in the tests (`go tool pprof` from golang-go, headless chromium for
/// the flame graph), and the other allocators the tests trace (jemalloc, tcmalloc, mimalloc,
/// musl, Debian's redis-server on jemalloc), valgrind, whose leak classes the scan's
/// tests compare with, and for the live-monitoring tests a real Prometheus (with promtool)
/// and tmux (to drive `leakprobe top`).
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "bpftool",
    "gcc",
    "g++",
    "libc6-dev",
    "libc6-dbg",
    "util-linux",
    "fonts-dejavu-core",
    "golang-go",
    "chromium",
    "libjemalloc2",
    "libjemalloc-dev",
    "libtcmalloc-minimal4",
    "libgoogle-perftools-dev",
    "libmimalloc2.0",
    "libmimalloc-dev",
    "musl-tools",
    "redis-server",
    "redis-tools",
    "valgrind",
    "prometheus",
    "tmux",
];

/// Only the benchmark harness needs these: a real server and its load generator.
const BENCH_PACKAGES: &[&str] = &["nginx-light", "wrk", "heaptrack", "python3"];

fn install_missing(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        eprintln!("xtask setup: installing {}", missing.join(" "));
        status(Command::new("apt-get").args(["update", "-qq"]))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}

fn setup() -> anyhow::Result<()> {
    install_missing(PACKAGES)?;

    let components = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("rustup is needed (the nightly toolchain builds the eBPF programs)")?;
    if !String::from_utf8_lossy(&components.stdout).lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask setup: adding rust-src to the nightly toolchain");
        status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }

    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("0.13"));
    if !linker_ok {
        eprintln!("xtask setup: building bpf-linker 0.13 against LLVM 22 (about 2 minutes)");
        let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
        status(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    "0.13.0",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("PATH", path),
        )?;
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the integration tests load eBPF programs: run `cargo xtask test` as root");
    }
    // Privileged tests share kernel state (uprobes, bpftool listings): one at a time.
    status(
        Command::new("cargo")
            .current_dir(root())
            .args(["test", "--workspace", "--exclude", "leakprobe-ebpf"])
            .args(extra)
            .args(["--", "--test-threads=1"]),
    )?;
    // The demo is part of what must work on a fresh machine.
    demo("6s")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn demo(duration: &str) -> anyhow::Result<()> {
    let root = root();
    status(Command::new("cargo").current_dir(&root).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "leakprobe",
    ]))?;
    let out_dir = root.join("target/demo");
    std::fs::create_dir_all(&out_dir)?;
    // Our own directory: outputs of an older leakprobe (from before outputs carried the
    // authorship mark) would be refused, so start clean.
    for name in ["timeline.png", "flamegraph.svg", "leak.pb.gz"] {
        let _ = std::fs::remove_file(out_dir.join(name));
    }
    let server = out_dir.join("leaky_server");
    // Built like a production server: optimized, no frame pointers.
    status(Command::new("gcc").args(["-O2", "-g", "-o"]).arg(&server).arg(root.join("demo/leaky_server.c")))?;

    let mut srv = Command::new(&server).stdout(Stdio::piped()).spawn().context("starting the demo server")?;
    let mut first = String::new();
    BufReader::new(srv.stdout.take().expect("piped")).read_line(&mut first)?;
    // "listening on 127.0.0.1:PORT pid PID"
    let port: u16 = first
        .split_whitespace()
        .nth(2)
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("unexpected server banner {first:?}"))?;
    let pid = srv.id();
    eprintln!("xtask demo: leaky_server is PID {pid} on 127.0.0.1:{port}");

    let result = (|| -> anyhow::Result<String> {
        let mut lp = Command::new(root.join("target/release/leakprobe"))
            .args([
                "attach",
                "--pid",
                &pid.to_string(),
                "--duration",
                duration,
                "--interval",
                "1s",
                "--top",
                "5",
                // Why each site keeps its memory: a true leak, or held (and by what).
                "--scan",
                "--plot",
            ])
            .arg(out_dir.join("timeline.png"))
            .arg("--flamegraph")
            .arg(out_dir.join("flamegraph.svg"))
            .arg("--pprof")
            .arg(out_dir.join("leak.pb.gz"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting leakprobe")?;
        // Wait until the probes are live, echoing leakprobe's progress.
        let mut err = BufReader::new(lp.stderr.take().expect("piped"));
        loop {
            let mut line = String::new();
            if err.read_line(&mut line)? == 0 {
                bail!("leakprobe exited before attaching");
            }
            eprint!("{line}");
            if line.contains("attached") {
                break;
            }
        }
        let echo = std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                eprintln!("{line}");
            }
        });
        // Traffic until leakprobe ends: logins (accumulate), uploads without a checksum (leak),
        // health checks.
        let mut i = 0u32;
        while lp.try_wait()?.is_none() {
            let path = match i % 4 {
                0 => format!("/login?user=user{i}"),
                1 => "/upload".to_string(),
                _ => "/health".to_string(),
            };
            if let Err(e) = request(port, &path) {
                if lp.try_wait()?.is_some() {
                    break;
                }
                return Err(e);
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!("xtask demo: sent {i} requests");
        eprintln!(
            "xtask demo: timeline chart {}, flame graph {}, pprof profile {}",
            out_dir.join("timeline.png").display(),
            out_dir.join("flamegraph.svg").display(),
            out_dir.join("leak.pb.gz").display()
        );
        let mut report = String::new();
        lp.stdout.take().expect("piped").read_to_string(&mut report)?;
        let st = lp.wait()?;
        let _ = echo.join();
        if !st.success() {
            bail!("leakprobe failed with {st}");
        }
        Ok(report)
    })();
    let _ = srv.kill();
    let _ = srv.wait();
    let report = result?;
    println!("{report}");
    // The demo doubles as a smoke test: the two bugs must be on top, the upload copy a true
    // leak and the sessions held by their global list.
    for needle in ["parse_upload", "session_create", "LEAK: ", "held by global sessions"] {
        if !report.contains(needle) {
            bail!("demo report does not name {needle}");
        }
    }
    Ok(())
}

fn request(port: u16, path: &str) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("connecting to the demo server")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // One write, so the server's single read() gets the whole request.
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: demo\r\n\r\n").as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(())
}
