//! Project tasks: `cargo xtask setup | demo | test | dist | prebuild | bench`.
//!
//! `setup` installs what building and testing need on a fresh Debian machine (the nightly
//! rust-src, LLVM 22 and bpf-linker, bpftool and friends). It is idempotent and quiet when
//! there is nothing to do. `demo` installs only what the demo needs: without bpf-linker the
//! build uses the committed eBPF object (see leakprobe/build.rs), so no LLVM is installed
//! unless that object is stale. `test` installs everything, builds `dist`, and runs every test.

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
    /// Build the release artifacts into target/dist (or $CARGO_TARGET_DIR/dist): the static
    /// musl binary, the Debian package (man pages, completions), SHA256SUMS.
    Dist,
    /// Rebuild the committed eBPF object (leakprobe-ebpf/prebuilt) with the toolchain, after
    /// changing leakprobe-ebpf or leakprobe-common.
    Prebuild,
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
            let t = Step::start("installing the demo's packages", "a few seconds; ~30 s on a fresh machine");
            install_missing(DEMO_PACKAGES)?;
            t.done();
            build_for_demo()?;
            demo(&duration)
        }
        Task::Dist => {
            install_missing(DEMO_PACKAGES)?;
            dist()
        }
        Task::Prebuild => {
            setup()?;
            prebuild()
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

/// What the demo needs: a C compiler and headers for the leaky server, a TrueType font for
/// --plot's labels.
const DEMO_PACKAGES: &[&str] = &["gcc", "libc6-dev", "fonts-dejavu-core"];

/// What building the eBPF object from source needs: LLVM 22 to build bpf-linker.
const TOOLCHAIN_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev"];

/// Test-only Debian packages: bpftool for the detach checks, compilers for test targets,
/// libc's separate debug info (the tests check that it is used), setpriv, unshare and capsh for
/// the privilege and packaging tests, man-db for the man page test, the tools that open the
/// exports in the tests (`go tool pprof` from golang-go, headless chromium for the flame
/// graph), the other allocators the tests trace (jemalloc, tcmalloc, mimalloc, musl, Debian's
/// redis-server on jemalloc), valgrind, whose leak classes the scan's tests compare with,
/// heaptrack, whose per-site figures the issue-26 tests compare with, and
/// for the live-monitoring tests a real Prometheus (with promtool) and tmux (to drive
/// `leakprobe top`), and Debian's CPython 3.11 for the scan's module-data test.
/// musl-tools is also what the static build links with.
const TEST_PACKAGES: &[&str] = &[
    "bpftool",
    "g++",
    "libc6-dbg",
    "util-linux",
    "libcap2-bin",
    "man-db",
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
    "heaptrack",
    "prometheus",
    "tmux",
    "python3.11",
    // gunicorn (PyPI) goes into a venv of it for the several-processes tests.
    "python3.11-venv",
    "nodejs",
];

/// Only the benchmark harness needs these: a real server and its load generator; for the
/// CPython tables, python3.11-venv (memray comes from PyPI into a venv of Debian's python3.11)
/// and the debuggers `heaptrack -p` and `memray attach` inject through (gdb, or lldb where
/// gdb cannot call into the target).
const BENCH_PACKAGES: &[&str] =
    &["nginx-light", "wrk", "heaptrack", "python3", "python3.11-venv", "gdb", "lldb"];

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

/// Everything: the demo's packages, the test packages and the eBPF toolchain.
fn setup() -> anyhow::Result<()> {
    install_missing(DEMO_PACKAGES)?;
    install_missing(TEST_PACKAGES)?;
    setup_toolchain()
}

/// The nightly rust-src, LLVM 22 and bpf-linker: what building the eBPF object needs.
fn setup_toolchain() -> anyhow::Result<()> {
    install_missing(TOOLCHAIN_PACKAGES)?;

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
    // The packaging tests (leakprobe/tests/dist.rs) try the artifacts as a user would.
    dist()?;
    // Privileged tests share kernel state (uprobes, bpftool listings): one at a time.
    status(
        Command::new("cargo")
            .current_dir(root())
            .args(["test", "--workspace", "--exclude", "leakprobe-ebpf"])
            .args(extra)
            .args(["--", "--test-threads=1"]),
    )?;
    // The demo is part of what must work on a fresh machine: built as `cargo xtask demo` builds it.
    build_for_demo()?;
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
    let out_dir = target_dir().join("demo");
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
        let mut lp = Command::new(target_dir().join("release/leakprobe"))
            .args([
                "attach",
                "--pid",
                &pid.to_string(),
                "--duration",
                duration,
                // No --interval: it fits the duration (a tenth of it), so even the 6 s demo
                // in `cargo xtask test` gets enough points for a trend.
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

/// One step of a long task: a line when it starts, with what it usually takes, and one when it
/// ends, so the minutes of a first build are never silent.
struct Step {
    what: &'static str,
    start: std::time::Instant,
}

impl Step {
    fn start(what: &'static str, expected: &str) -> Step {
        eprintln!("xtask: {what} (expected: {expected})");
        Step { what, start: std::time::Instant::now() }
    }

    fn done(self) {
        eprintln!("xtask: {} done in {:.0} s", self.what, self.start.elapsed().as_secs_f64());
    }
}

/// The build's target directory: $CARGO_TARGET_DIR if set, else target/ in the workspace.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { root().join(d) }
        }
        _ => root().join("target"),
    }
}

fn has_bpf_linker() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("0.13"))
}

fn cargo_build(args: &[&str]) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root()).arg("build").args(args);
    c
}

/// The demo's build. Without bpf-linker it uses the committed eBPF object (no LLVM needed); if
/// that object is stale, it installs the eBPF toolchain and builds again.
fn build_for_demo() -> anyhow::Result<()> {
    let linker = has_bpf_linker();
    let expected = if target_dir().join("release/leakprobe").exists() {
        "seconds if nothing changed"
    } else if linker {
        "about 3.5 min from scratch on 2 cores, eBPF object included"
    } else {
        "about 3 min from scratch on 2 cores, with the committed eBPF object"
    };
    let t = Step::start("building leakprobe (release)", expected);
    let built = cargo_build(&["--release", "-p", "leakprobe"]).status().context("running cargo build")?;
    if !built.success() {
        if linker {
            bail!("cargo build failed");
        }
        eprintln!(
            "xtask: the committed eBPF object does not match the sources: installing the eBPF toolchain"
        );
        let t2 = Step::start("installing LLVM 22, rust-src and bpf-linker", "about 3 min");
        setup_toolchain()?;
        t2.done();
        status(&mut cargo_build(&["--release", "-p", "leakprobe"]))?;
    }
    t.done();
    Ok(())
}

/// `cargo xtask prebuild`: builds the eBPF object with the toolchain and commits-ready copies
/// it, with the record of its inputs, into leakprobe-ebpf/prebuilt.
fn prebuild() -> anyhow::Result<()> {
    let dir = root().join("leakprobe-ebpf/prebuilt");
    let t = Step::start("building the eBPF object with the toolchain", "about 1 min");
    status(
        cargo_build(&["-p", "leakprobe"]).env("LEAKPROBE_EBPF", "build").env("LEAKPROBE_EBPF_EXPORT", &dir),
    )?;
    t.done();
    let obj = dir.join("leakprobe-ebpf.o");
    let size = std::fs::metadata(&obj).with_context(|| format!("{} was not written", obj.display()))?.len();
    eprintln!("xtask prebuild: wrote {} ({size} bytes) and its inputs record; commit both", obj.display());
    Ok(())
}

const MUSL: &str = "x86_64-unknown-linux-musl";

/// `cargo xtask dist`: the static binary, the Debian package and SHA256SUMS in target/dist.
fn dist() -> anyhow::Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let target = target_dir();
    let installed = Command::new("rustup").args(["target", "list", "--installed"]).output()?;
    if !String::from_utf8_lossy(&installed.stdout).lines().any(|l| l.trim() == MUSL) {
        status(Command::new("rustup").args(["target", "add", MUSL]))?;
    }
    let t =
        Step::start("building the static binary (release, musl)", "about 2.5 min from scratch on 2 cores");
    // Plain static, not static-pie: no loader, no relocation at start, and `ldd` says "not a
    // dynamic executable". musl and every crate are linked in; the eBPF object is embedded.
    status(cargo_build(&["--release", "-p", "leakprobe", "--target", MUSL]).env(
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS",
        "-C target-feature=+crt-static -C relocation-model=static",
    ))?;
    t.done();
    let release = target.join(MUSL).join("release");
    let bin = release.join("leakprobe");
    let ldd = Command::new("ldd").arg(&bin).output().context("running ldd")?;
    let ldd_text =
        format!("{}{}", String::from_utf8_lossy(&ldd.stdout), String::from_utf8_lossy(&ldd.stderr));
    if !ldd_text.contains("not a dynamic executable") {
        bail!("{} is not static: ldd says {ldd_text}", bin.display());
    }

    // Man pages and completions, generated by the binary itself from its clap definitions.
    let gen_dir = release.join("gen");
    let _ = std::fs::remove_dir_all(&gen_dir);
    let man = gen_dir.join("man");
    status(Command::new(&bin).arg("manpage").arg("--out-dir").arg(&man))?;
    for page in std::fs::read_dir(&man)? {
        status(Command::new("gzip").args(["-9nf"]).arg(page?.path()))?;
    }
    let comp = gen_dir.join("completions");
    std::fs::create_dir_all(&comp)?;
    for (shell, file) in [("bash", "leakprobe"), ("zsh", "_leakprobe"), ("fish", "leakprobe.fish")] {
        let out = Command::new(&bin).args(["completions", shell]).output()?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!("`leakprobe completions {shell}` failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::write(comp.join(file), out.stdout)?;
    }

    let dist = target.join("dist");
    let _ = std::fs::remove_dir_all(&dist);
    std::fs::create_dir_all(&dist)?;
    let static_name = format!("leakprobe-{version}-x86_64-linux-musl");
    std::fs::copy(&bin, dist.join(&static_name))?;
    status(Command::new("strip").arg(dist.join(&static_name)))?;

    let deb_ok = Command::new("cargo").args(["deb", "--version"]).output().is_ok_and(|o| o.status.success());
    if !deb_ok {
        let t = Step::start("installing cargo-deb", "about 2 min");
        status(Command::new("cargo").args(["install", "cargo-deb", "--locked"]))?;
        t.done();
    }
    let t = Step::start("building the Debian package", "a few seconds");
    status(
        Command::new("cargo")
            .current_dir(root())
            .args(["deb", "-p", "leakprobe", "--no-build", "--target", MUSL, "-o"])
            .arg(&dist),
    )?;
    t.done();

    let mut artifacts: Vec<String> = std::fs::read_dir(&dist)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    artifacts.sort();
    let sums = Command::new("sha256sum").current_dir(&dist).args(&artifacts).output()?;
    if !sums.status.success() {
        bail!("sha256sum failed");
    }
    std::fs::write(dist.join("SHA256SUMS"), &sums.stdout)?;
    eprintln!("xtask dist: wrote {}:", dist.display());
    for a in artifacts.iter().chain(std::iter::once(&"SHA256SUMS".to_string())) {
        let len = std::fs::metadata(dist.join(a))?.len();
        eprintln!("  {a} ({:.1} MiB)", len as f64 / (1024.0 * 1024.0));
    }
    Ok(())
}
