//! Command-line flags (clap) and their validation into a [`Config`] before anything runs.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::model::SortBy;
use crate::report::suppress::Suppressions;
use crate::target::allocator::{AllocatorKind, Choice};

const EXAMPLES: &str = "\
Examples:
  # Watch a live server for 60 s and print the growing call sites
  leakprobe attach --pid 4242 --duration 60s

  # Run until Ctrl-C, reporting every 10 s, only blocks older than 30 s
  leakprobe attach --pid 4242 --interval 10s --min-age 30s

  # JSON for scripts
  leakprobe attach --pid 4242 --duration 30s --format json --output leak.json

  # A busy server: sample, and detach if probes fire over 200k times a second
  leakprobe attach --pid 4242 --sample-bytes 512KiB --max-overhead 200000

  # A hot server: decide sampling inside it (a stub placed with ptrace, removed at detach):
  # unsampled calls never trap; nginx kept its full throughput here
  leakprobe attach --pid 4242 --in-process --sample-bytes 512KiB --duration 1h

  # A JSON snapshot every minute for `leakprobe diff`, and a chart of RSS vs heap at the end
  leakprobe attach --pid 4242 --snapshot-every 1m --snapshot-dir /tmp/snaps --plot mem.svg

  # Hand the leak to other tools: pprof (go tool pprof, Pyroscope, Parca, speedscope),
  # a flame graph of outstanding bytes, and its folded stacks
  leakprobe attach --pid 4242 --duration 60s --pprof leak.pb.gz --flamegraph leak.svg --folded leak.folded

  # A pre-fork server (nginx, gunicorn, php-fpm): the master and every worker, those
  # forked later too (recycled workers), each with its own sites, and merged per build
  leakprobe attach --pid 4242 --children --duration 60s

  # The same pool for an hour, cheaply: a stub in every worker (forked ones inherit it)
  leakprobe attach --pid 4242 --children --in-process --sample-bytes 512KiB --duration 1h

  # A few processes by PID
  leakprobe attach --pid 4242,4243,4250 --duration 60s

  # Why do the workers keep it? Each process scanned in turn, each paused on its own
  leakprobe attach --pid 4242 --children --duration 60s --scan

  # A container or a systemd service: its processes, those that join it, none that leave
  leakprobe attach --cgroup /sys/fs/cgroup/system.slice/app.service --duration 60s

  # Trace a command from its first allocation; fail (exit 1) if over 1 MiB is left
  leakprobe run --fail-on-leak 1MiB -- ./my-test --case 7

  # Why is it kept? Classify the growing sites as leaked (unreachable), held (and by what),
  # or a cycle, with a pause of the target bounded by --max-pause (200 ms)
  leakprobe attach --pid 4242 --duration 60s --scan

  # A Valgrind-style CI check without a rebuild: fail if anything is definitely lost at exit
  leakprobe run --scan --fail-on-leak 0 -- ./my-test --case 7

  # The same gate with known leaks suppressed (LSan's leak:PATTERN lines, or Valgrind's
  # Memcheck:Leak blocks); they are listed apart, with their bytes
  leakprobe run --scan --fail-on-leak 0 --suppressions known.supp -- ./my-test < input.txt

  # LeakSanitizer's report and exit status (23, or LSAN_OPTIONS=exitcode=N), for LSan scripts
  leakprobe run --format lsan -- ./my-test

  # heaptrack's rankings: the sites that peaked highest, or made the most temporaries
  leakprobe run --sort peak -- ./my-test

  # Watch for days: per-site series for Prometheus at http://127.0.0.1:9464/metrics
  # (Grafana dashboard and alert rules in docs/monitoring/), one snapshot an hour, 48 kept
  leakprobe attach --pid 4242 --sample-bytes 512KiB --metrics 9464 \\
      --snapshot-every 1h --snapshot-dir /var/tmp/snaps --snapshot-keep 48

  # Live in the terminal: sites by growth, sparklines, the verdict (q to detach)
  leakprobe top --pid 4242

  # Compare two JSON reports or snapshots: which call sites grew in between
  leakprobe diff before.json after.json

  # Node.js: JavaScript frames are in every native stack already; add the JS heap itself
  # (objects, closures, strings) from V8's sampling heap profiler, through the inspector,
  # which leakprobe opens on 127.0.0.1 and closes again (see --js-heap's help first)
  leakprobe attach --pid 4242 --duration 60s --js-heap

Existing output files are replaced only if leakprobe wrote them; anything else needs --force
(owner and mode kept), and /etc, /usr, /boot, /proc, /sys, /dev need --allow-system-path.

Exit status: 0 done, 1 outstanding growth above --fail-on-leak (23 or LSAN_OPTIONS's exitcode
with --format lsan), 2 error (nothing attached).";

/// Find growing allocation call sites in a live process, without restarting it.
///
/// leakprobe puts eBPF uprobes on the target's allocation functions, tracks every outstanding
/// block with its stack, and reports which call sites hold growing memory. When it exits,
/// every probe is gone and the target runs on untouched.
#[derive(Debug, Parser)]
#[command(name = "leakprobe", version, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More logging on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// No progress lines on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to a running process by PID.
    #[command(after_help = EXAMPLES)]
    Attach {
        /// The processes to trace: one PID, a comma-separated list, or --pid repeated.
        #[arg(short, long, required_unless_present = "cgroup", value_delimiter = ',', num_args = 1..)]
        pid: Vec<i32>,
        #[command(flatten)]
        opts: TraceOpts,
    },
    /// Start a command held until the probes are live, and trace it from its first allocation.
    #[command(after_help = EXAMPLES)]
    Run {
        #[command(flatten)]
        opts: TraceOpts,
        /// The command and its arguments (after `--`).
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// What is in a process's glibc heap now, and what of it is garbage (blocks from before attach).
    ///
    /// Every chunk is walked; blocks from before any attach are grouped by C++ type or size
    /// and classified as definitely, indirectly or possibly lost, or reachable (and by what).
    /// Short for `attach --scan --census --duration 200ms`: the target pauses once, for
    /// --max-pause at most.
    #[command(after_help = CENSUS_EXAMPLES)]
    Census {
        /// The process to take the census of.
        #[arg(short, long)]
        pid: i32,
        #[command(flatten)]
        opts: TraceOpts,
    },
    /// Compare two JSON reports or snapshots per call site: what grew between them.
    #[command(after_help = DIFF_EXAMPLES)]
    Diff(DiffArgs),
    /// A live terminal view of a running process: call sites sorted by growth, RSS against
    /// the tracked heap, the verdict.
    ///
    /// Keys: s sort (growth, outstanding, peak, calls, temporary), / filter by function, module or
    /// allocator, f freeze, w write a snapshot, q quit (detaches; the target runs on).
    #[command(after_help = TOP_EXAMPLES)]
    Top {
        /// The processes to watch: one PID, a comma-separated list, or --pid repeated.
        #[arg(short, long, required_unless_present = "cgroup", value_delimiter = ',', num_args = 1..)]
        pid: Vec<i32>,
        #[command(flatten)]
        opts: TraceOpts,
    },
    /// Check this kernel and these privileges for every feature leakprobe uses.
    ///
    /// One line per feature: ok, warn (an optional feature is missing: what degrades is named)
    /// or FAIL (a required one is missing: tracing would be refused). Exit status 0 when every
    /// required check passes, 1 otherwise.
    #[command(after_help = DOCTOR_EXAMPLES)]
    Doctor(DoctorArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions(CompletionsArgs),
    /// Write the man pages (roff) generated from these flags: leakprobe.1 to stdout, or every
    /// page (one per subcommand) into --out-dir. Used by `cargo xtask dist`.
    #[command(hide = true)]
    Manpage(ManpageArgs),
}

const DOCTOR_EXAMPLES: &str = "\
Examples:
  # Can leakprobe run here, and what would be missing?
  sudo leakprobe doctor

  # For a fleet inventory
  sudo leakprobe doctor --format json | jq '.checks[] | select(.status != \"ok\")'";

const COMPLETIONS_EXAMPLES: &str = "\
Examples:
  # bash, for the current user
  leakprobe completions bash > ~/.local/share/bash-completion/completions/leakprobe
  # zsh (a directory in $fpath)
  leakprobe completions zsh > ~/.zfunc/_leakprobe
  # fish
  leakprobe completions fish > ~/.config/fish/completions/leakprobe.fish

The Debian package installs all three system-wide.";

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = DoctorFormat::Text)]
    pub format: DoctorFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DoctorFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to write the script for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManpageArgs {
    /// Write leakprobe.1 and one page per subcommand (leakprobe-attach.1, ...) here.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

const TOP_EXAMPLES: &str = "\
Examples:
  # Watch a server live, refreshed every second
  leakprobe top --pid 4242

  # A hot server: sample inside it, and serve Prometheus metrics at the same time
  leakprobe top --pid 4242 --in-process --sample-bytes 512KiB --metrics 9464

  # Snapshots on `w` go to /tmp/snaps (default: ./leakprobe-top-PID)
  leakprobe top --pid 4242 --snapshot-dir /tmp/snaps

The terminal is restored on every exit, a crash included. With --output, the final report is
written there when you quit.";

const CENSUS_EXAMPLES: &str = "\
Examples:
  # The server has leaked for days: what is in its heap, and what of it is unreachable?
  leakprobe census --pid 4242

  # As JSON, and as a pprof profile whose stacks are the types and sizes
  leakprobe census --pid 4242 --format json --output census.json --pprof census.pb.gz

glibc only (jemalloc, tcmalloc, mimalloc and musl keep their heaps differently).";

const DIFF_EXAMPLES: &str = "\
Call sites are matched by allocation function and symbolized frames; two snapshots of one
attach (same PID, start time and window) by stack id, and their NEW and FREED counts are then
the exact allocations and frees between the two. Largest growth first.

Examples:
  # Two reports of the same server, before and after a load test
  leakprobe attach --pid 4242 --duration 60s --format json --output before.json
  leakprobe attach --pid 4242 --duration 60s --format json --output after.json
  leakprobe diff before.json after.json

  # Two snapshots of one attach, as JSON for scripts
  leakprobe diff --format json --output growth.json snaps/0001.json snaps/0010.json

  # Another build (refused without --force: call sites may have moved)
  leakprobe diff --force v1.json v2.json

Exit status: 0 done, 2 error (unreadable, malformed or mismatched files).";

/// `leakprobe diff A.json B.json`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The earlier report or snapshot (leakprobe/v1 JSON).
    #[arg(value_name = "A.json")]
    pub a: PathBuf,
    /// The later one.
    #[arg(value_name = "B.json")]
    pub b: PathBuf,
    /// Output format (json: the leakprobe/diff/v1 object, docs/json-schema.md).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Changed call sites shown in the text form.
    #[arg(long, default_value_t = 10, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub top: u32,
    /// Write the comparison here instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Compare files of different programs or builds anyway, and replace an --output file that
    /// leakprobe did not write (its owner and mode are kept).
    #[arg(long)]
    pub force: bool,
    /// Allow --output inside /etc, /usr, /boot, /proc, /sys or /dev.
    #[arg(long)]
    pub allow_system_path: bool,
}

impl DiffArgs {
    /// What may happen to an existing --output file.
    pub fn output_policy(&self) -> crate::output::Policy {
        crate::output::Policy { force: self.force, allow_system_path: self.allow_system_path }
    }
}

/// How stacks are walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Unwind {
    /// .eh_frame tables for every module; frame pointers where a module has none.
    Dwarf,
    /// Frame pointers only: cheaper, but stacks through code without them come out short.
    Fp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Formats of the trace report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
    /// LeakSanitizer's report.
    Lsan,
}

/// LeakSanitizer's default exit status on a leak.
pub const LSAN_EXITCODE: u8 = 23;

/// What leakprobe takes from `LSAN_OPTIONS` (`exitcode=N:suppressions=FILE`, `:` or space
/// separated, as the sanitizers read it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LsanOptions {
    pub exitcode: Option<u8>,
    pub suppressions: Option<PathBuf>,
}

impl LsanOptions {
    pub fn parse(value: &str) -> Result<LsanOptions, ConfigError> {
        let mut o = LsanOptions::default();
        for item in value.split([':', ' ', ',']).filter(|i| !i.is_empty()) {
            let Some((k, v)) = item.split_once('=') else { continue };
            let v = v.trim_matches(['"', '\'']);
            match k {
                "exitcode" => {
                    o.exitcode = Some(v.parse().map_err(|_| ConfigError::LsanOptions {
                        item: item.to_string(),
                        why: "exitcode must be 0-255",
                    })?)
                }
                "suppressions" => o.suppressions = Some(PathBuf::from(v)),
                _ => {}
            }
        }
        Ok(o)
    }
}

#[derive(Debug, Args)]
pub struct TraceOpts {
    /// Stop after this long (e.g. 30s, 5m). Default: until Ctrl-C, SIGTERM or the target exits.
    #[arg(short, long, value_name = "D")]
    pub duration: Option<String>,
    /// How often to read the maps and print progress [default: 5s (top: 1s); with a --duration
    /// under 50s (top: 10s), a tenth of it, rounded down to 100ms and at least 100ms, so that
    /// the run has enough samples for a verdict].
    #[arg(short, long, value_name = "I")]
    pub interval: Option<String>,
    /// Call sites shown in full in the text report.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub top: usize,
    /// Count only blocks at least this old as outstanding (e.g. 30s).
    #[arg(long, value_name = "A")]
    pub min_age: Option<String>,
    /// Report format. lsan: LeakSanitizer's report (`Direct leak of N byte(s) in M
    /// object(s) allocated from:` ... `SUMMARY:`), for scripts written for LSan; implies --scan
    /// and --fail-on-leak 0, and exits with LSAN_OPTIONS's exitcode (23 if unset) on a leak;
    /// LSAN_OPTIONS's suppressions=FILE is read too.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    pub format: ReportFormat,
    /// Order of the call sites in the text report: growth (bytes/s now), outstanding,
    /// peak (the most held at once), calls, temporary (freed before the thread's next
    /// allocation). `top`'s `s` key cycles through the same.
    #[arg(long, value_enum, default_value_t = SortBy::Outstanding, value_name = "BY")]
    pub sort: SortBy,
    /// Known leaks to leave out of --fail-on-leak and the verdict (still listed, with their
    /// bytes, as suppressed). LeakSanitizer's format (`leak:PATTERN`, matched against every
    /// frame's function, file and module; `*` wildcards) or Valgrind's (`{ name
    /// Memcheck:Leak fun:... obj:... ... }`). Repeatable. Suppressions that matched nothing
    /// are named at the end.
    #[arg(long, value_name = "FILE")]
    pub suppressions: Vec<PathBuf>,
    /// Write the report here instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Exit with status 1 if outstanding growth exceeds this (e.g. 0, 4096, 10MiB).
    #[arg(long, value_name = "BYTES")]
    pub fail_on_leak: Option<String>,
    /// Outstanding blocks tracked at once; more are counted as dropped.
    #[arg(long, default_value_t = 1 << 20, value_name = "N")]
    pub max_live: u32,
    /// Distinct stacks (call sites) tracked; more are counted as dropped.
    #[arg(long, default_value_t = 1 << 15, value_name = "N")]
    pub max_stacks: u32,
    /// Frames captured per stack (1-64). Each frame costs one unwind-table lookup (two
    /// binary searches) and one user-memory read per allocation.
    #[arg(long, default_value_t = 48, value_name = "N")]
    pub max_stack: u32,
    /// Sample allocations, about one per this many bytes allocated (e.g. 512KiB), instead of
    /// tracking every one: far cheaper, and every figure becomes an unbiased estimate.
    #[arg(long, value_name = "BYTES")]
    pub sample_bytes: Option<String>,
    /// Decide sampling inside the target, so unsampled calls never trap: a small stub is mapped
    /// into it with ptrace (no function of the target is called) and its GOT slots for the
    /// allocation family point at it until detach. With --sample-bytes only sampled calls reach
    /// a probe; without, every call reaches one (one trap per call, no return probe). With
    /// --children or --cgroup, each process of the first one's build and layout gets a stub
    /// (one stop each), and children forked later run their parent's.
    #[arg(long)]
    pub in_process: bool,
    /// Follow the target's children too: those it has now (and theirs), and every process it
    /// forks while traced, from its first instruction (a helper of ours traces them with
    /// ptrace, fork and exec events only, and holds each newborn until its probes are live:
    /// 250 ms at most, 8 a second at most; gdb cannot attach to them meanwhile). Each process gets its own sites and verdict; processes running one build
    /// are also merged. A child that calls exec is reported up to its exec.
    #[arg(long)]
    pub children: bool,
    /// Every process in a cgroup v2 directory (a container, a systemd service: e.g.
    /// /sys/fs/cgroup/system.slice/nginx.service), and each one that joins it while traced;
    /// a process that leaves it is traced no more. With --pid, those too.
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
    /// The most processes traced at once (--pid lists, --children, --cgroup): further ones run
    /// untraced, and are counted and reported.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_processes: u32,
    /// Overhead budget in probe hits (allocations + frees) per second: above it, leakprobe
    /// detaches, reports what it saw, and says why. Each hit costs the target ~1.8 us here.
    #[arg(long, value_name = "HITS_PER_S")]
    pub max_overhead: Option<u64>,
    /// Benchmarking only: attach programs that do nothing, on the same functions, at their
    /// entries (the cost floor of a naive tracer). Tracks nothing.
    #[arg(long, hide_short_help = true)]
    pub noop: bool,
    /// How to walk stacks.
    #[arg(long, value_enum, default_value_t = Unwind::Dwarf)]
    pub unwind: Unwind,
    /// Unwind-table rows loaded for all of the target's modules (16 bytes each).
    #[arg(long, default_value_t = 1 << 21, value_name = "N")]
    pub max_unwind_rows: u32,
    /// Write a JSON snapshot (the leakprobe/v1 report so far) this often, into
    /// --snapshot-dir; compare two with `leakprobe diff`. Rounded up to whole intervals.
    #[arg(long, value_name = "I", requires = "snapshot_dir")]
    pub snapshot_every: Option<String>,
    /// Directory for snapshots, named snapshot-PID-NNNN.json, each written atomically
    /// (complete or absent). Created if missing; an existing one must be empty or hold only
    /// leakprobe's snapshots (or pass --force). `top` writes one there on `w`.
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,
    /// Keep only the newest N snapshots this session wrote, deleting older ones (for
    /// attaches that last days).
    #[arg(long, value_name = "N", requires = "snapshot_dir")]
    pub snapshot_keep: Option<usize>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics while tracing: per call site
    /// (the top --metrics-top by growth) and for the process. A bare PORT binds to loopback.
    #[arg(long, value_name = "[ADDR:]PORT", help_heading = "Live")]
    pub metrics: Option<String>,
    /// Call sites given their own series in --metrics, the fastest growing first (bounds
    /// the series' cardinality).
    #[arg(long, default_value_t = 20, value_name = "N", help_heading = "Live")]
    pub metrics_top: usize,
    /// With several processes (--pid A,B, --children, --cgroup): one series per call site and
    /// process, with a `pid` label, instead of one per site merged across the processes of a
    /// build (the default, which keeps the cardinality of a pool of workers that of one).
    #[arg(long, requires = "metrics", help_heading = "Live")]
    pub metrics_per_process: bool,
    /// Forget call sites with nothing outstanding and no call for this long: their stacks
    /// leave the kernel's map (room for new ones) and leakprobe's memory; counted in the
    /// report as evicted. Keeps long attaches bounded.
    #[arg(long, default_value = "10m", value_name = "D", help_heading = "Live")]
    pub evict_after: String,
    /// Draw the timeline at the end (RSS, anonymous and file RSS, tracked heap, mmap'd bytes,
    /// and the top growing call sites) as a chart: FILE.svg or FILE.png.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Which allocator to hook (auto: the one the target's malloc binds to).
    /// One of auto, glibc, jemalloc, tcmalloc, mimalloc, musl.
    #[arg(long, value_name = "NAME", default_value = "auto")]
    pub allocator: String,
    /// Hook the allocator in this mapped library (a path, file name or soname prefix, e.g.
    /// libjemalloc.so.2) instead of the detected one.
    #[arg(long, value_name = "PATH_OR_SONAME")]
    pub lib: Option<String>,
    /// Replace output files (--output, --pprof, --flamegraph, --folded, --plot) and use a
    /// --snapshot-dir that leakprobe did not write. Without it those are refused; its own
    /// earlier outputs are always replaced. A replaced file keeps its owner and mode.
    #[arg(long)]
    pub force: bool,
    /// Allow outputs inside /etc, /usr, /boot, /proc, /sys or /dev (refused even with --force).
    #[arg(long)]
    pub allow_system_path: bool,
    /// Reachability scan: classify the tracked blocks as definitely, indirectly or possibly
    /// lost (no pointer reaches them) or still reachable, and name what holds the growing
    /// sites. attach: once, at the end of the window; run: when the command calls exit(),
    /// before its atexit handlers and destructors. The target pauses for --max-pause at most
    /// (a copy-on-write snapshot is forked inside it and read afterwards). With several
    /// processes (--children, --pid A,B, --cgroup) each one is scanned in turn, paused on its
    /// own. With --fail-on-leak the gate is on definitely lost bytes.
    #[arg(long)]
    pub scan: bool,
    /// attach: scan this often too (e.g. 1m), feeding the timeline. Implies --scan.
    #[arg(long, value_name = "I")]
    pub scan_every: Option<String>,
    /// With --scan: walk the whole glibc heap too, every chunk, so that blocks allocated
    /// before attach are classified as well (grouped by C++ type or by size), with the heap's
    /// in-use and free bytes. glibc only.
    #[arg(long)]
    pub census: bool,
    /// With --scan on a CPython target: draw the shortest reference paths from roots (module
    /// globals, stacks) to a few objects of this type, as objgraph's show_backrefs does: in
    /// the report, and as a picture with --backrefs-svg. A class name (Node) or module and
    /// name (app.Node). Implies --scan.
    #[arg(long, value_name = "TYPE")]
    pub backrefs: Option<String>,
    /// Node.js: also sample the JavaScript heap (objects, closures, strings, which JIT code
    /// allocates inline with no call to hook) with V8's own sampling heap profiler, through
    /// the inspector, as sites of their own. If the inspector is not open, leakprobe opens it
    /// with SIGUSR1 on the target's port (--inspect-port, default 127.0.0.1:9229) after
    /// checking nothing else holds it, and closes it at the end, on Ctrl-C, on a crash, and
    /// through its guard if killed. WHILE IT IS OPEN, ANY LOCAL PROCESS OR USER THAT CAN
    /// REACH THE TARGET'S LOOPBACK CAN RUN CODE IN IT: the inspector has no authentication.
    /// Do not use it on a host or network namespace shared with untrusted users, and keep
    /// the session short. An inspector the target already had open is used and left open.
    #[arg(long)]
    pub js_heap: bool,
    /// Node.js: leave the JavaScript frames out of the native stacks (they are in by
    /// default); for comparing their cost.
    #[arg(long)]
    pub no_js_frames: bool,
    /// Node.js: take a V8 heap snapshot at the start and at the end, and report Chrome
    /// DevTools' Comparison view (per constructor: #new, #deleted, #delta, sizes) with the
    /// shortest retainer path of the top growing ones. Implies --js-heap. EACH SNAPSHOT
    /// STOPS THE EVENT LOOP (the report gives the pauses: measured, 7.5 s for 100 MiB of
    /// small objects, about 100 s for 1 GiB) and leakprobe needs about twice the heap in
    /// memory while it reads one.
    #[arg(long)]
    pub js_heap_snapshot: bool,
    /// With --js-heap: V8's mean sampling interval in bytes. 128KiB keeps a loaded server's
    /// cost near its throughput goal (docs/benchmarks.md); DevTools' 32KiB is finer (better
    /// on small leaks over a short run) and costs about 10% more.
    #[arg(long, default_value = "128KiB", value_name = "BYTES")]
    pub js_heap_interval: String,
    /// With --js-heap: how often V8's live samples are fetched (and once at the end). EACH
    /// FETCH MAKES V8 RUN A FULL GARBAGE COLLECTION first (the inspector asks for it), which
    /// stops the event loop (the report gives how long): fetching often costs a loaded
    /// server a good part of its throughput (docs/benchmarks.md).
    #[arg(long, default_value = "10s", value_name = "D")]
    pub js_heap_poll: String,
    /// The longest the target may stay stopped for a scan (e.g. 200ms): the scan is abandoned
    /// rather than exceed it.
    #[arg(long, default_value = "200ms", value_name = "D")]
    pub max_pause: String,
    #[command(flatten)]
    pub export: ExportOpts,
}

/// `--js-heap`'s settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsHeapConfig {
    /// V8's mean sampling interval, in bytes.
    pub interval: u64,
    /// How often the live samples are fetched.
    pub poll: Duration,
}

/// Extra files written after the report, for other tools.
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Export")]
pub struct ExportOpts {
    /// Write a gzipped pprof profile (inuse_space, inuse_objects, alloc_space, alloc_objects)
    /// for go tool pprof, Pyroscope, Parca or speedscope.
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<PathBuf>,
    /// Write an SVG flame graph of outstanding bytes by stack.
    #[arg(long, value_name = "FILE.svg")]
    pub flamegraph: Option<PathBuf>,
    /// Write the folded stacks of outstanding bytes (root first, `;`-separated, then bytes).
    #[arg(long, value_name = "FILE")]
    pub folded: Option<PathBuf>,
    /// With --backrefs: write its paths as an SVG picture (roots on top, the objects at the
    /// bottom), for a browser.
    #[arg(long, value_name = "FILE.svg")]
    pub backrefs_svg: Option<PathBuf>,
}

/// The formats of [`ExportOpts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportKind {
    Pprof,
    Flamegraph,
    Folded,
    BackrefsSvg,
}

impl ExportKind {
    pub fn flag(self) -> &'static str {
        match self {
            ExportKind::Pprof => "--pprof",
            ExportKind::Flamegraph => "--flamegraph",
            ExportKind::Folded => "--folded",
            ExportKind::BackrefsSvg => "--backrefs-svg",
        }
    }
}

impl ExportOpts {
    /// Each file asked for, with its format.
    pub fn paths(&self) -> impl Iterator<Item = (ExportKind, &PathBuf)> {
        [
            (ExportKind::Pprof, &self.pprof),
            (ExportKind::Flamegraph, &self.flamegraph),
            (ExportKind::Folded, &self.folded),
            (ExportKind::BackrefsSvg, &self.backrefs_svg),
        ]
        .into_iter()
        .filter_map(|(kind, p)| p.as_ref().map(|p| (kind, p)))
    }
}

fn parse_allocator(v: &str) -> Result<Option<AllocatorKind>, ConfigError> {
    if v == "auto" {
        return Ok(None);
    }
    <AllocatorKind as ValueEnum>::from_str(v, true)
        .map(Some)
        .map_err(|_| ConfigError::Allocator { value: v.to_string() })
}

#[derive(Debug, Error)]
pub enum ConfigError {
    /// `diff` reads files; it has no trace configuration.
    #[error("`leakprobe diff` traces nothing")]
    NotATrace,
    #[error("invalid {flag} value {value:?}: {reason} (examples: 500ms, 5s, 2m, 1h)")]
    Duration { flag: &'static str, value: String, reason: String },
    #[error("LSAN_OPTIONS: {item:?}: {why}")]
    LsanOptions { item: String, why: &'static str },
    #[error("--suppressions {path}: {reason}")]
    Suppressions { path: PathBuf, reason: String },
    #[error("invalid --fail-on-leak value {value:?}: {reason} (examples: 0, 4096, 64KiB, 10MiB)")]
    Bytes { value: String, reason: String },
    #[error("invalid {flag} value {value:?}: {reason} (examples: 64KiB, 512KiB, 1MiB)")]
    Size { flag: &'static str, value: String, reason: String },
    #[error("{flag} must be between {min} and {max}")]
    Range { flag: &'static str, min: u64, max: u64 },
    #[error(
        "invalid --allocator value {value:?}: expected auto, glibc, jemalloc, tcmalloc, mimalloc or musl"
    )]
    Allocator { value: String },
    #[error("{flag} must be greater than zero")]
    Zero { flag: &'static str },
    #[error("--plot {0}: the file name must end in .svg or .png")]
    PlotFormat(PathBuf),
    #[error("{flag} cannot be combined with --in-process: {why}")]
    InProcess { flag: &'static str, why: &'static str },
    #[error("{flag} cannot be combined with --scan: {why}")]
    Scan { flag: &'static str, why: &'static str },
    #[error("{first} and {second} name the same file {path:?}")]
    SamePath { first: &'static str, second: &'static str, path: PathBuf },
    #[error("{flag} needs {needs}")]
    Needs { flag: &'static str, needs: &'static str },
    #[error("invalid --metrics value {value:?}: {reason}")]
    Metrics { value: String, reason: String },
    #[error(
        "{flag} cannot be combined with {other} yet: {other} works on one process (name that PID alone \
         with --pid, or leave {other} out)"
    )]
    OneProcess { flag: &'static str, other: &'static str },
    #[error("--cgroup {dir}: {reason}")]
    Cgroup { dir: PathBuf, reason: String },
}

/// The processes in cgroup v2 directory `dir` now (its `cgroup.procs`).
pub fn cgroup_members(dir: &std::path::Path) -> Result<Vec<i32>, ConfigError> {
    let err = |reason: String| ConfigError::Cgroup { dir: dir.to_path_buf(), reason };
    let procs = dir.join("cgroup.procs");
    let text = std::fs::read_to_string(&procs).map_err(|e| {
        err(format!(
            "cannot read {} ({e}): give a cgroup v2 directory, e.g. /sys/fs/cgroup/system.slice/app.service \
             (see /proc/PID/cgroup for a process's)",
            procs.display()
        ))
    })?;
    let mut pids: Vec<i32> = text.split_whitespace().filter_map(|p| p.parse().ok()).collect();
    pids.sort_unstable();
    Ok(pids)
}

/// The first process of the cgroup (--cgroup without --pid).
fn cgroup_first(dir: Option<&std::path::Path>) -> Result<i32, ConfigError> {
    let dir = dir.ok_or(ConfigError::Needs { flag: "attach", needs: "--pid or --cgroup" })?;
    cgroup_members(dir)?.first().copied().ok_or_else(|| ConfigError::Cgroup {
        dir: dir.to_path_buf(),
        reason: "no process in it now (leakprobe traces the processes of a cgroup that has one)".into(),
    })
}

/// What to trace.
#[derive(Clone, Debug)]
pub enum Mode {
    Attach { pid: i32 },
    Run { command: Vec<String> },
}

/// When and how to scan.
#[derive(Clone, Debug)]
pub struct ScanConfig {
    /// Periodic scans (attach), rounded up to whole intervals.
    pub every: Option<Duration>,
    pub max_pause: Duration,
    /// `--census`: the whole glibc heap too.
    pub census: bool,
    /// `--backrefs TYPE`: a CPython target's paths from roots to objects of this type.
    pub backrefs: Option<String>,
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    pub duration: Option<Duration>,
    pub interval: Duration,
    pub top: usize,
    pub min_age: Duration,
    pub format: ReportFormat,
    pub sort: SortBy,
    /// Known leaks, from --suppressions (and LSAN_OPTIONS with --format lsan).
    pub suppressions: Suppressions,
    /// The exit status when --fail-on-leak trips: 1, or LSan's with --format lsan.
    pub leak_exit_code: u8,
    pub output: Option<PathBuf>,
    pub fail_on_leak: Option<u64>,
    pub max_live: u32,
    pub max_stacks: u32,
    pub max_stack: u32,
    pub max_unwind_rows: u32,
    pub unwind: Unwind,
    /// Mean bytes between samples; 0 = track every allocation.
    pub sample_bytes: u64,
    pub max_overhead: Option<u64>,
    pub noop: bool,
    /// Snapshots: when, where, how many to keep.
    pub snapshots: Option<Snapshots>,
    pub plot: Option<PathBuf>,
    pub quiet: bool,
    /// --pprof, --flamegraph, --folded.
    pub exports: ExportOpts,
    /// `--allocator` / `--lib`.
    pub allocator: Choice,
    /// `--force` / `--allow-system-path`: what may happen to existing output paths.
    pub output_policy: crate::output::Policy,
    /// `--in-process`.
    pub in_process: bool,
    /// `--pid A,B,C`: the processes after the first (`mode` has the first).
    pub more_pids: Vec<i32>,
    /// `--children`.
    pub children: bool,
    /// `--cgroup DIR`.
    pub cgroup: Option<PathBuf>,
    /// `--max-processes`.
    pub max_processes: u32,
    /// `--scan` / `--scan-every`: scan at the end (or at exit() in run mode), and periodically.
    pub scan: Option<ScanConfig>,
    /// `--js-heap`: V8's sampling heap profiler (attach only).
    pub js_heap: Option<JsHeapConfig>,
    /// `--js-heap-snapshot`: two heap snapshots, compared.
    pub js_heap_snapshot: bool,
    /// JavaScript frames in native stacks (`--no-js-frames` turns them off).
    pub js_frames: bool,
    /// `--metrics`: where to serve Prometheus metrics, and how many sites get series.
    pub metrics: Option<std::net::SocketAddr>,
    pub metrics_top: usize,
    /// `--metrics-per-process`: a `pid` label on the per-site series.
    pub metrics_per_process: bool,
    /// `--evict-after`: how long a site with nothing outstanding may stay idle.
    pub evict_after: Duration,
    /// `top`: a terminal view draws the session (no progress lines on stderr).
    pub live_view: bool,
    /// The command line, recorded in the report.
    pub args: Vec<String>,
}

/// `--snapshot-every`, `--snapshot-dir`, `--snapshot-keep`.
#[derive(Clone, Debug)]
pub struct Snapshots {
    /// A whole number of intervals; none: only on request (`top`'s `w`).
    pub every: Option<Duration>,
    pub dir: PathBuf,
    /// Keep the newest N this session wrote.
    pub keep: Option<usize>,
}

/// Samples a bounded run aims for when no --interval is given: the verdict needs
/// [`SAMPLES_FOR_VERDICT`](crate::model::trend::SAMPLES_FOR_VERDICT), and three more absorb
/// timer jitter and a final reading that lands on the last tick.
pub const AUTO_SAMPLES: u32 = crate::model::trend::SAMPLES_FOR_VERDICT as u32 + 3;

/// The shortest interval chosen for the user: each sample walks the site map and reads
/// /proc (smaps_rollup takes the target's mmap lock).
pub const MIN_AUTO_INTERVAL: Duration = Duration::from_millis(100);

/// The interval when none is given: 5 s (1 s for `top`), or short enough that `duration`
/// yields [`AUTO_SAMPLES`] samples, rounded down to 100 ms and no shorter than
/// [`MIN_AUTO_INTERVAL`].
pub fn default_interval(duration: Option<Duration>, live_view: bool) -> Duration {
    let longest = if live_view { Duration::from_secs(1) } else { Duration::from_secs(5) };
    let Some(d) = duration else { return longest };
    let step = MIN_AUTO_INTERVAL.as_millis() as u64;
    let fit = Duration::from_millis((d / AUTO_SAMPLES).as_millis() as u64 / step * step);
    fit.clamp(MIN_AUTO_INTERVAL, longest)
}

fn duration(flag: &'static str, v: &str) -> Result<Duration, ConfigError> {
    let err = |reason: String| ConfigError::Duration { flag, value: v.to_string(), reason };
    // A bare number means seconds.
    if let Ok(secs) = v.parse::<f64>() {
        if !(secs.is_finite() && secs >= 0.0) {
            return Err(err("must be a non-negative number of seconds".into()));
        }
        return Ok(Duration::from_secs_f64(secs));
    }
    humantime::parse_duration(v).map_err(|e| err(e.to_string()))
}

impl TryFrom<Cli> for Config {
    type Error = ConfigError;

    fn try_from(cli: Cli) -> Result<Self, Self::Error> {
        let live_view = matches!(cli.command, Command::Top { .. });
        let (mode, more_pids, opts) = match cli.command {
            Command::Attach { pid, opts } | Command::Top { pid, opts } if pid.is_empty() => {
                let first = cgroup_first(opts.cgroup.as_deref())?;
                (Mode::Attach { pid: first }, Vec::new(), opts)
            }
            Command::Attach { pid, opts } => (Mode::Attach { pid: pid[0] }, pid[1..].to_vec(), opts),
            Command::Run { opts, command } => (Mode::Run { command }, Vec::new(), opts),
            Command::Census { pid, mut opts } => {
                opts.scan = true;
                opts.census = true;
                opts.duration.get_or_insert_with(|| "200ms".into());
                (Mode::Attach { pid }, Vec::new(), opts)
            }
            Command::Top { pid, opts } => (Mode::Attach { pid: pid[0] }, pid[1..].to_vec(), opts),
            Command::Diff(_) | Command::Doctor(_) | Command::Completions(_) | Command::Manpage(_) => {
                return Err(ConfigError::NotATrace);
            }
        };
        let duration_opt = opts.duration.as_deref().map(|d| duration("--duration", d)).transpose()?;
        if duration_opt.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::Zero { flag: "--duration" });
        }
        let interval = match opts.interval.as_deref() {
            Some(v) => duration("--interval", v)?,
            None => default_interval(duration_opt, live_view),
        };
        if interval.is_zero() {
            return Err(ConfigError::Zero { flag: "--interval" });
        }
        let min_age =
            opts.min_age.as_deref().map(|d| duration("--min-age", d)).transpose()?.unwrap_or_default();
        let mut fail_on_leak = opts
            .fail_on_leak
            .as_deref()
            .map(|v| {
                parse_size::parse_size(v)
                    .map_err(|e| ConfigError::Bytes { value: v.to_string(), reason: e.to_string() })
            })
            .transpose()?;
        let lsan = match (opts.format, std::env::var("LSAN_OPTIONS")) {
            (ReportFormat::Lsan, Ok(v)) => LsanOptions::parse(&v)?,
            _ => LsanOptions::default(),
        };
        let mut suppression_files = opts.suppressions.clone();
        suppression_files.extend(lsan.suppressions.clone());
        let suppressions = read_suppressions(&suppression_files)?;
        let leak_exit_code = if opts.format == ReportFormat::Lsan {
            // As an LSan build fails on any leak.
            fail_on_leak.get_or_insert(0);
            lsan.exitcode.unwrap_or(LSAN_EXITCODE)
        } else {
            1
        };
        let sample_bytes = match opts.sample_bytes.as_deref() {
            None => 0,
            Some(v) => {
                let n = parse_size::parse_size(v).map_err(|e| ConfigError::Size {
                    flag: "--sample-bytes",
                    value: v.to_string(),
                    reason: e.to_string(),
                })?;
                if n == 0 || n > crate::model::sampling::MAX_SAMPLE_BYTES {
                    return Err(ConfigError::Range {
                        flag: "--sample-bytes",
                        min: 1,
                        max: crate::model::sampling::MAX_SAMPLE_BYTES,
                    });
                }
                n
            }
        };
        if opts.max_live == 0 {
            return Err(ConfigError::Zero { flag: "--max-live" });
        }
        if opts.max_stacks == 0 {
            return Err(ConfigError::Zero { flag: "--max-stacks" });
        }
        if opts.max_stack == 0 || opts.max_stack as usize > leakprobe_common::MAX_STACK_DEPTH {
            return Err(ConfigError::Range {
                flag: "--max-stack",
                min: 1,
                max: leakprobe_common::MAX_STACK_DEPTH as u64,
            });
        }
        if opts.top == 0 {
            return Err(ConfigError::Zero { flag: "--top" });
        }
        let snapshots = match (opts.snapshot_every.as_deref(), opts.snapshot_dir) {
            (Some(every), Some(dir)) => {
                let every = duration("--snapshot-every", every)?;
                if every.is_zero() {
                    return Err(ConfigError::Zero { flag: "--snapshot-every" });
                }
                Some(Snapshots { every: Some(every), dir, keep: opts.snapshot_keep })
            }
            // top writes one on `w`.
            (None, Some(dir)) if live_view => Some(Snapshots { every: None, dir, keep: opts.snapshot_keep }),
            (None, Some(_)) => {
                return Err(ConfigError::Needs { flag: "--snapshot-dir", needs: "--snapshot-every" });
            }
            _ => None, // clap requires the directory with --snapshot-every
        };
        if opts.snapshot_keep == Some(0) {
            return Err(ConfigError::Zero { flag: "--snapshot-keep" });
        }
        let metrics = opts
            .metrics
            .as_deref()
            .map(|v| {
                crate::live::metrics::parse_addr(v)
                    .map_err(|reason| ConfigError::Metrics { value: v.to_string(), reason })
            })
            .transpose()?;
        if opts.metrics_top == 0 {
            return Err(ConfigError::Zero { flag: "--metrics-top" });
        }
        let evict_after = duration("--evict-after", &opts.evict_after)?;
        if evict_after.is_zero() {
            return Err(ConfigError::Zero { flag: "--evict-after" });
        }
        if let Some(plot) = &opts.plot {
            let ext = plot.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
            if !matches!(ext.as_deref(), Some("svg" | "png")) {
                return Err(ConfigError::PlotFormat(plot.clone()));
            }
        }
        if opts.in_process && opts.noop {
            return Err(ConfigError::InProcess {
                flag: "--noop",
                why: "it measures uprobes at the functions",
            });
        }
        if opts.export.backrefs_svg.is_some() && opts.backrefs.is_none() {
            return Err(ConfigError::Needs { flag: "--backrefs-svg", needs: "--backrefs TYPE" });
        }
        if opts.backrefs.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(ConfigError::Needs { flag: "--backrefs", needs: "a type name (Node, app.Node)" });
        }
        let js_heap = if opts.js_heap || opts.js_heap_snapshot {
            if matches!(mode, Mode::Run { .. }) {
                return Err(ConfigError::Needs {
                    flag: "--js-heap",
                    needs: "attach (a running Node.js process)",
                });
            }
            let v = &opts.js_heap_interval;
            let n = parse_size::parse_size(v).map_err(|e| ConfigError::Size {
                flag: "--js-heap-interval",
                value: v.to_string(),
                reason: e.to_string(),
            })?;
            if !(1..=1 << 30).contains(&n) {
                return Err(ConfigError::Range { flag: "--js-heap-interval", min: 1, max: 1 << 30 });
            }
            let poll = duration("--js-heap-poll", &opts.js_heap_poll)?;
            if poll.is_zero() {
                return Err(ConfigError::Zero { flag: "--js-heap-poll" });
            }
            Some(JsHeapConfig { interval: n, poll })
        } else {
            None
        };
        let scan = if opts.scan
            || opts.scan_every.is_some()
            || opts.census
            || opts.backrefs.is_some()
            || opts.format == ReportFormat::Lsan
        {
            let max_pause = duration("--max-pause", &opts.max_pause)?;
            if max_pause.is_zero() {
                return Err(ConfigError::Zero { flag: "--max-pause" });
            }
            let every = opts.scan_every.as_deref().map(|v| duration("--scan-every", v)).transpose()?;
            if every.is_some_and(|d| d.is_zero()) {
                return Err(ConfigError::Zero { flag: "--scan-every" });
            }
            if opts.noop {
                return Err(ConfigError::Scan { flag: "--noop", why: "it tracks no blocks to classify" });
            }
            if every.is_some() && matches!(mode, Mode::Run { .. }) {
                return Err(ConfigError::Scan {
                    flag: "--scan-every",
                    why: "run scans once, when the command calls exit(); use attach for periodic scans",
                });
            }
            Some(ScanConfig { every, max_pause, census: opts.census, backrefs: opts.backrefs.clone() })
        } else {
            None
        };
        let many = !more_pids.is_empty() || opts.children || opts.cgroup.is_some();
        let flag = match (opts.children, opts.cgroup.is_some()) {
            (true, _) => "--children",
            (false, true) => "--cgroup",
            _ => "--pid with several processes",
        };
        if let Some(dir) = &opts.cgroup {
            cgroup_members(dir)?;
        }
        if many {
            if !(1..=4096).contains(&opts.max_processes) {
                return Err(ConfigError::Range { flag: "--max-processes", min: 1, max: 4096 });
            }
            // A scan goes through every process; its heap walk's report and its drawing are
            // one process's.
            let one_process_only = [
                (opts.census, "--census"),
                (opts.backrefs.is_some(), "--backrefs"),
                (js_heap.is_some(), "--js-heap"),
            ];
            if let Some((_, other)) = one_process_only.iter().find(|(on, _)| *on) {
                return Err(ConfigError::OneProcess { flag, other });
            }
        }
        let exports = opts.export;
        // Two outputs into one file would leave only the last one.
        let outputs: Vec<(&'static str, &PathBuf)> = opts
            .output
            .as_ref()
            .map(|p| ("--output", p))
            .into_iter()
            .chain(exports.paths().map(|(k, p)| (k.flag(), p)))
            .collect();
        for (i, (first, a)) in outputs.iter().enumerate() {
            if let Some((second, _)) = outputs[i + 1..].iter().find(|(_, b)| b == a) {
                return Err(ConfigError::SamePath { first, second, path: (*a).clone() });
            }
        }
        Ok(Config {
            mode,
            duration: duration_opt,
            interval,
            top: opts.top,
            min_age,
            format: opts.format,
            sort: opts.sort,
            suppressions,
            leak_exit_code,
            output: opts.output,
            fail_on_leak,
            max_live: opts.max_live,
            max_stacks: opts.max_stacks,
            max_stack: opts.max_stack,
            max_unwind_rows: opts.max_unwind_rows,
            unwind: opts.unwind,
            sample_bytes,
            max_overhead: opts.max_overhead,
            noop: opts.noop,
            snapshots,
            plot: opts.plot,
            quiet: cli.quiet,
            exports,
            allocator: Choice { allocator: parse_allocator(&opts.allocator)?, lib: opts.lib },
            in_process: opts.in_process,
            more_pids,
            children: opts.children,
            cgroup: opts.cgroup.clone(),
            max_processes: opts.max_processes,
            scan,
            js_heap,
            js_heap_snapshot: opts.js_heap_snapshot,
            js_frames: !opts.no_js_frames,
            metrics,
            metrics_top: opts.metrics_top,
            metrics_per_process: opts.metrics_per_process,
            evict_after,
            live_view,
            output_policy: crate::output::Policy {
                force: opts.force,
                allow_system_path: opts.allow_system_path,
            },
            args: std::env::args().collect(),
        })
    }
}

/// Reads and parses every suppression file, in order.
fn read_suppressions(paths: &[PathBuf]) -> Result<Suppressions, ConfigError> {
    let mut all = Suppressions::default();
    for path in paths {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Suppressions { path: path.clone(), reason: e.to_string() })?;
        let name = path.display().to_string();
        let parsed = Suppressions::parse(&name, &text)
            .map_err(|e| ConfigError::Suppressions { path: path.clone(), reason: e.to_string() })?;
        all.extend(parsed);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        Config::try_from(cli).map_err(|e| e.to_string())
    }

    #[test]
    fn several_pids_and_children() {
        let c = parse(&["leakprobe", "attach", "--pid", "12,13", "--pid", "14"]).unwrap();
        assert!(matches!(c.mode, Mode::Attach { pid: 12 }));
        assert_eq!(c.more_pids, vec![13, 14]);
        assert!(!c.children);
        let c = parse(&["leakprobe", "attach", "--pid", "12", "--children", "--max-processes", "8"]).unwrap();
        assert!(c.children && c.more_pids.is_empty() && c.max_processes == 8);
        let c = parse(&["leakprobe", "run", "--children", "--", "make", "-j4"]).unwrap();
        assert!(c.children);
        for (args, other) in [
            (&["--children", "--scan", "--census"][..], "--census"),
            (&["--children", "--js-heap"][..], "--js-heap"),
        ] {
            let mut all = vec!["leakprobe", "attach", "--pid", "12"];
            all.extend_from_slice(args);
            let e = parse(&all).unwrap_err();
            assert!(e.contains(other) && e.contains("one process"), "{e}");
        }
        let e = parse(&["leakprobe", "attach", "--pid", "12,13", "--backrefs", "app.Node"]).unwrap_err();
        assert!(e.contains("--pid with several processes") && e.contains("--backrefs"), "{e}");
        let c = parse(&["leakprobe", "attach", "--pid", "12,13", "--scan-every", "1m"]).unwrap();
        assert!(c.scan.is_some() && c.more_pids == vec![13]);
        let c = parse(&["leakprobe", "attach", "--pid", "12", "--children", "--in-process"]).unwrap();
        assert!(c.children && c.in_process);
        let e =
            parse(&["leakprobe", "attach", "--pid", "12", "--children", "--max-processes", "0"]).unwrap_err();
        assert!(e.contains("--max-processes"), "{e}");
    }

    #[test]
    fn attach_defaults() {
        let c = parse(&["leakprobe", "attach", "--pid", "12"]).unwrap();
        assert!(matches!(c.mode, Mode::Attach { pid: 12 }));
        assert_eq!(c.interval, Duration::from_secs(5));
        assert_eq!(c.duration, None);
        assert_eq!(c.top, 10);
        assert_eq!(c.format, ReportFormat::Text);
    }

    #[test]
    fn live_flags() {
        let c = parse(&["leakprobe", "attach", "--pid", "12"]).unwrap();
        assert_eq!((c.metrics, c.metrics_top, c.live_view), (None, 20, false));
        assert_eq!(c.evict_after, Duration::from_secs(600));
        let c = parse(&["leakprobe", "attach", "--pid", "12", "--metrics", "9464", "--metrics-top", "5"])
            .unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9464".parse().unwrap()), "a bare port is loopback");
        assert_eq!(c.metrics_top, 5);
        let c = parse(&["leakprobe", "run", "--metrics", "0.0.0.0:9464", "--", "true"]).unwrap();
        assert_eq!(c.metrics, Some("0.0.0.0:9464".parse().unwrap()));
        let e = parse(&["leakprobe", "attach", "--pid", "1", "--metrics", "localhost"]).unwrap_err();
        assert!(e.contains("--metrics") && e.contains("9464"), "{e}");
        assert!(
            parse(&["leakprobe", "attach", "--pid", "1", "--metrics-top", "0"])
                .unwrap_err()
                .contains("--metrics-top")
        );
        // top: a live view, refreshed every second; snapshots on `w` need only the directory.
        let c = parse(&["leakprobe", "top", "--pid", "7", "--snapshot-dir", "/tmp/s"]).unwrap();
        assert!(c.live_view && matches!(c.mode, Mode::Attach { pid: 7 }));
        assert_eq!(c.interval, Duration::from_secs(1));
        assert!(c.snapshots.as_ref().is_some_and(|s| s.every.is_none()));
        let e = parse(&["leakprobe", "attach", "--pid", "7", "--snapshot-dir", "/tmp/s"]).unwrap_err();
        assert!(e.contains("--snapshot-every"), "{e}");
        let e = parse(&[
            "leakprobe",
            "attach",
            "--pid",
            "7",
            "--snapshot-every",
            "1m",
            "--snapshot-dir",
            "/tmp/s",
            "--snapshot-keep",
            "0",
        ])
        .unwrap_err();
        assert!(e.contains("--snapshot-keep"), "{e}");
        assert!(
            parse(&["leakprobe", "attach", "--pid", "7", "--evict-after", "0"])
                .unwrap_err()
                .contains("--evict-after")
        );
    }

    #[test]
    fn durations_and_sizes() {
        let c = parse(&[
            "leakprobe",
            "attach",
            "-p",
            "1",
            "--duration",
            "1m",
            "--interval",
            "250ms",
            "--min-age",
            "3",
            "--fail-on-leak",
            "64KiB",
        ])
        .unwrap();
        assert_eq!(c.duration, Some(Duration::from_secs(60)));
        assert_eq!(c.interval, Duration::from_millis(250));
        assert_eq!(c.min_age, Duration::from_secs(3));
        assert_eq!(c.fail_on_leak, Some(65536));
    }

    #[test]
    fn the_interval_fits_the_duration_unless_given() {
        let interval = |args: &[&str]| {
            let mut all = vec!["leakprobe"];
            all.extend_from_slice(args);
            parse(&all).unwrap().interval
        };
        let ms = Duration::from_millis;
        // Unbounded: the long-standing defaults.
        assert_eq!(interval(&["attach", "-p", "1"]), ms(5000));
        assert_eq!(interval(&["top", "-p", "1"]), ms(1000));
        // Bounded: enough samples for a verdict, in whole tenths of a second.
        assert_eq!(interval(&["attach", "-p", "1", "--duration", "10s"]), ms(1000));
        assert_eq!(interval(&["attach", "-p", "1", "--duration", "8s"]), ms(800));
        assert_eq!(interval(&["attach", "-p", "1", "--duration", "3.5"]), ms(300));
        assert_eq!(interval(&["run", "--duration", "2s", "--", "true"]), ms(200));
        // Long runs keep the default; very short ones stop at the floor.
        assert_eq!(interval(&["attach", "-p", "1", "--duration", "1h"]), ms(5000));
        assert_eq!(interval(&["top", "-p", "1", "--duration", "1m"]), ms(1000));
        assert_eq!(interval(&["attach", "-p", "1", "--duration", "300ms"]), MIN_AUTO_INTERVAL);
        assert_eq!(interval(&["census", "-p", "1"]), MIN_AUTO_INTERVAL);
        // Given: kept as given, even when it leaves too few samples.
        assert_eq!(interval(&["attach", "-p", "1", "--duration", "10s", "--interval", "5s"]), ms(5000));
        // A bounded run at the chosen interval has samples to spare.
        for d in [1.0, 2.0, 8.0, 10.0, 17.3, 30.0, 49.9] {
            let i = default_interval(Some(Duration::from_secs_f64(d)), false).as_secs_f64();
            let samples = (d / i).floor() as usize;
            assert!(samples >= crate::model::trend::SAMPLES_FOR_VERDICT + 2, "{d} s at {i} s: {samples}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        assert!(
            parse(&["leakprobe", "attach", "-p", "1", "--duration", "soon"])
                .unwrap_err()
                .contains("--duration")
        );
        assert!(
            parse(&["leakprobe", "attach", "-p", "1", "--interval", "0"]).unwrap_err().contains("--interval")
        );
        assert!(
            parse(&["leakprobe", "attach", "-p", "1", "--fail-on-leak", "lots"])
                .unwrap_err()
                .contains("--fail-on-leak")
        );
        assert!(parse(&["leakprobe", "attach", "-p", "x"]).is_err());
        assert!(parse(&["leakprobe", "run"]).is_err());
        assert!(
            parse(&["leakprobe", "attach", "-p", "1", "--allocator", "dlmalloc"])
                .unwrap_err()
                .contains("--allocator")
        );
    }

    #[test]
    fn allocator_choice() {
        let c = parse(&["leakprobe", "attach", "-p", "1"]).unwrap();
        assert_eq!(c.allocator, Choice::default());
        let c = parse(&[
            "leakprobe",
            "attach",
            "-p",
            "1",
            "--allocator",
            "jemalloc",
            "--lib",
            "libjemalloc.so.2",
        ])
        .unwrap();
        assert_eq!(c.allocator.allocator, Some(AllocatorKind::Jemalloc));
        assert_eq!(c.allocator.lib.as_deref(), Some("libjemalloc.so.2"));
    }

    #[test]
    fn diff_takes_two_files() {
        let cli = Cli::try_parse_from(["leakprobe", "diff", "--force", "a.json", "b.json"]).unwrap();
        let Command::Diff(d) = cli.command else { panic!("not diff") };
        assert_eq!((d.a, d.b), (PathBuf::from("a.json"), PathBuf::from("b.json")));
        assert!(d.force);
        assert_eq!((d.top, d.format), (10, Format::Text));
        assert!(Cli::try_parse_from(["leakprobe", "diff", "a.json"]).is_err());
        assert!(Cli::try_parse_from(["leakprobe", "diff", "--top", "0", "a", "b"]).is_err());
    }

    #[test]
    fn export_paths() {
        let c =
            parse(&["leakprobe", "attach", "-p", "1", "--pprof", "a.pb.gz", "--folded", "a.folded"]).unwrap();
        let got: Vec<_> = c.exports.paths().map(|(k, p)| (k.flag(), p.to_str().unwrap())).collect();
        assert_eq!(got, [("--pprof", "a.pb.gz"), ("--folded", "a.folded")]);
        let err =
            parse(&["leakprobe", "attach", "-p", "1", "--output", "x", "--flamegraph", "x"]).unwrap_err();
        assert!(err.contains("--output") && err.contains("--flamegraph"), "{err}");
    }

    #[test]
    fn run_takes_command_after_dashes() {
        let c = parse(&["leakprobe", "run", "--duration", "2s", "--", "ls", "-l"]).unwrap();
        match c.mode {
            Mode::Run { command } => assert_eq!(command, vec!["ls", "-l"]),
            other => panic!("{other:?}"),
        }
    }
}
