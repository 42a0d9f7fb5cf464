//! **Layer: reporting.** One `Report` (the leakprobe/v1 schema) built from the model, and every
//! rendering of it: text, JSON, diff, pprof, flame graph, chart. Pure: returns bytes, writes nothing.
//!
//! The report: one data structure (the `leakprobe/v1` JSON schema, see docs/json-schema.md)
//! and its renderings.

pub mod diff;
pub mod export;
pub mod lsan;
pub mod plot;
pub mod processes;
pub mod scan;
pub mod suppress;

pub mod text;

use leakprobe_common::stack_end;
use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::{
    kernel::probe::ProbeStatus,
    model::{
        DROP_KINDS, INFO_KINDS, SiteStats, Tracker, total_drops,
        trend::{Basis, Fit, RunVerdict, Trend},
    },
    symbolize::Frame,
    target::Identity,
};

pub const SCHEMA: &str = "leakprobe/v1";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub schema: Cow<'static, str>,
    #[serde(default)]
    pub leakprobe: Tool,
    /// Where it ran: kernel and the target's libc.
    #[serde(default)]
    pub host: Host,
    pub target: Target,
    /// The allocator the target's malloc binds to, and where it was hooked.
    #[serde(default)]
    pub allocator: Allocator,
    pub window: Window,
    #[serde(default)]
    pub probes: Vec<Probe>,
    #[serde(default)]
    pub totals: Totals,
    /// Every drop counter; all zero in a complete report.
    #[serde(default)]
    pub drops: std::collections::BTreeMap<Cow<'static, str>, u64>,
    /// Counters that are normal in operation, for context.
    #[serde(default)]
    pub activity: std::collections::BTreeMap<Cow<'static, str>, u64>,
    /// True when any drop counter is non-zero: figures may be incomplete.
    #[serde(default)]
    pub degraded: bool,
    /// Sampling: when on, every byte and count figure is an unbiased estimate.
    #[serde(default)]
    pub sampling: Sampling,
    /// How often the probes fired: what tracing cost the target.
    #[serde(default)]
    pub overhead: Overhead,
    /// Leak, fragmentation, stable, or not enough data: the run's verdict and why.
    #[serde(default)]
    pub verdict: Verdict,
    /// The process over time, one point per sample (older points thinned in long runs).
    #[serde(default)]
    pub timeline: Vec<TimelinePoint>,
    /// Every call site that allocated in the window, largest outstanding growth first.
    pub sites: Vec<Site>,
    /// The target's executable mappings at the end of the window, with build-ids: what the
    /// frames' addresses refer to.
    #[serde(default)]
    pub modules: Vec<Module>,
    /// `--in-process`: what was placed in the target and what it counted; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_process: Option<InProcess>,
    /// `--scan`: the last reachability scan (pause, what was read, the classes, cycles);
    /// absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan: Option<scan::Scan>,
    /// `--suppressions`: what each rule took out, and the rules that matched nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressions: Option<suppress::Applied>,
    /// A language runtime found in the target (CPython), and what was done with it; absent
    /// when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeInfo>,
    /// `--js-heap`: V8's sampling heap profiler and the inspector it went through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub js_heap: Option<JsHeapInfo>,
    /// Several processes (`--pid A,B,C`, `--children`): each one, ended ones included; empty
    /// when one process was traced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<processes::Process>,
    /// The sites merged across processes of one build, largest growth first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged: Vec<processes::MergedSite>,
}

pub use processes::Process;

/// `--js-heap`: how the JavaScript heap was sampled, and the inspector's window.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JsHeapInfo {
    /// V8's mean sampling interval.
    pub sampling_interval_bytes: u64,
    /// The inspector's port (loopback).
    pub port: u16,
    /// Whether leakprobe opened it (with SIGUSR1) and so closed it again; false: it was open
    /// already, and was left open.
    pub opened_by_leakprobe: bool,
    /// How long it was open because of leakprobe (or used, when it was open already).
    pub open_s: f64,
    /// Why closing it failed, if it did.
    pub close_error: Option<String>,
    /// Profiles that could not be fetched, and the last reason.
    pub failed_polls: u64,
    pub last_error: Option<String>,
    /// Sampled objects alive at the end.
    pub live_samples: u64,
    /// Profiles fetched, and how long a fetch took (V8 builds the profile on the target's
    /// main thread, so that is about how long it held up the event loop).
    pub polls: u64,
    pub poll_ms_mean: f64,
    pub poll_ms_max: f64,
    /// `--js-heap-snapshot`: how long each heap snapshot stopped the event loop.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshot_pauses_ms: Vec<f64>,
    /// `--js-heap-snapshot`: DevTools' Comparison view of the last snapshot against the
    /// first, per constructor, most growth first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Vec<crate::runtimes::v8::snapshot::ComparisonRow>>,
}

/// A language runtime in the target: its frames in the stacks, its allocator hooked.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeInfo {
    /// "CPython" or "V8".
    pub name: String,
    pub version: String,
    /// The executable or library it lives in.
    pub module: String,
    /// Stacks (distinct ones) whose walk of the runtime's frames ended early, by why:
    /// "max-depth" (more frames than are kept) or "bad-frame" (a frame that did not read as
    /// one: its callers are missing).
    pub walks_cut: std::collections::BTreeMap<String, u64>,
    /// Its own allocator (CPython's tables); none for V8, whose heap is not hooked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocators: Option<PythonAllocators>,
}

/// CPython's allocator tables: the function words pointed at the stub, or why they were left
/// alone; the pauses, the stub's counters, and what stays in the target.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PythonAllocators {
    /// Words pointed at the stub, per function.
    pub hooked: Vec<PatchedSlots>,
    /// Why the tables were not hooked (another tool's hooks, PYTHONMALLOC=malloc, ...).
    pub left_alone: Option<String>,
    /// Words left alone, and why (including words wrapped by another tool while attached).
    pub skipped: Vec<SkippedSlot>,
    pub map_pause_ms: f64,
    pub restore_pause_ms: Option<f64>,
    /// Words put back at detach (null: the target had ended).
    pub restored: Option<u64>,
    pub stub_sampled_allocs: u64,
    pub stub_sampled_frees: u64,
    pub stub_set_full: u64,
    /// pymalloc's arena allocator's code, whose mmaps are not sites; null if not found.
    pub arena_allocator: Option<String>,
    pub left_in_target: String,
}

/// The in-process sampler: the GOT slots that pointed at the stub, the pauses, the stub's
/// own counters, and what stays in the target.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct InProcess {
    /// Slots patched, per module and function.
    pub patched: Vec<PatchedSlots>,
    /// Slots left alone, and why: calls through them were not seen.
    pub skipped: Vec<SkippedSlot>,
    /// The target's pauses: mapping the stub and restoring the GOT (null if not restored:
    /// the target had exited). Patching needs no stop: `patch_ms` is how long writing the
    /// slots took while the target ran.
    pub map_pause_ms: f64,
    #[serde(rename = "patch_ms")]
    pub patch_pause_ms: f64,
    pub restore_pause_ms: Option<f64>,
    pub restored_slots: Option<u64>,
    /// Sampled allocations and frees the stub followed, and samples its pointer set could not
    /// hold (non-zero: sampling stopped, the report is DEGRADED).
    pub stub_sampled_allocs: u64,
    pub stub_sampled_frees: u64,
    pub stub_set_full: u64,
    /// Slots that lost the stub's address to their original value while attached (a lazy
    /// bind racing the patch) and were put back at the next interval: calls through them in
    /// between were not seen.
    pub repatched_slots: u64,
    /// Modules mapped after attach (dlopen) whose slots were patched at a later interval.
    pub late: Vec<LatePatch>,
    /// What stays in the target after detach.
    pub left_in_target: String,
    /// `run --in-process`: the command was held at its entry point while the stub went in,
    /// so allocations made before it (the libraries' constructors) were not seen.
    pub from_entry: bool,
}

/// Modules patched after the start: their allocations between loading and patching were not
/// seen.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LatePatch {
    pub modules: Vec<String>,
    pub slots: u64,
    /// Patched at this time since attach; the modules appeared after `since_s`.
    pub at_s: f64,
    pub since_s: f64,
    pub pause_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PatchedSlots {
    pub module: String,
    pub function: String,
    pub slots: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SkippedSlot {
    pub module: String,
    pub function: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Verdict {
    /// "leak", "fragmentation", "stable" or "not-enough-data".
    pub kind: RunVerdict,
    /// The numbers behind it, in a sentence.
    pub summary: String,
    /// The fits it was drawn from (trailing half of the window).
    pub heap_fit: Option<Fit>,
    pub rss_fit: Option<Fit>,
    /// "trend" (the fits), or "scan": a leak the scan found with no growth fitted. Reports
    /// written before the field read as "trend".
    pub basis: Basis,
}

impl Verdict {
    /// How the text report prints the kind.
    pub fn label(&self) -> &'static str {
        self.kind.label_on(self.basis)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct TimelinePoint {
    /// Seconds since the probes went live.
    pub t_s: f64,
    /// Resident memory (VmRSS) and its anonymous and file-backed parts (smaps_rollup); null
    /// when /proc could not be read.
    pub rss_bytes: Option<u64>,
    pub anon_bytes: Option<u64>,
    pub file_bytes: Option<u64>,
    /// Tracked live heap: allocated through the hooks since attach and not freed.
    pub heap_bytes: u64,
    /// Of which anonymous mmap regions.
    pub mmap_bytes: u64,
    /// Allocation and free calls per second over the interval before the point.
    pub allocs_per_s: f64,
    pub frees_per_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Host {
    /// `uname -r`.
    pub kernel: String,
    /// The target's libc file and its glibc version, when it is glibc.
    pub libc: Option<String>,
    pub libc_version: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Module {
    /// The path as the target sees it.
    pub path: String,
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
    /// GNU build-id (hex), when the file has one.
    pub build_id: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Sampling {
    /// Mean bytes between sampled allocations; 0 when every allocation was tracked.
    pub sample_bytes: u64,
    pub estimated: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Overhead {
    /// Allocation and free probe hits per second: mean over the window, and the highest
    /// interval.
    pub mean_hits_per_s: f64,
    pub peak_hits_per_s: f64,
    /// --max-overhead, if set.
    pub max_hits_per_s: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Tool {
    pub version: Cow<'static, str>,
    pub args: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub pid: i32,
    pub exe: String,
    /// The executable's GNU build-id (hex), when it has one.
    pub build_id: Option<String>,
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// When the target process started (UTC, RFC 3339): with the PID, it names one process.
    pub start_time: Option<String>,
    /// Why tracing ended: "duration", "signal", "target-exited", "target-exec".
    #[serde(default)]
    pub ended_by: String,
    /// Exit status, when the target was our child (`run` mode) and exited.
    pub exit_status: Option<i32>,
    /// Started by `leakprobe run` (traced from its first instruction), not attached to.
    #[serde(default)]
    pub is_run: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Allocator {
    /// glibc, jemalloc, tcmalloc, mimalloc, musl, or other.
    pub name: Cow<'static, str>,
    /// The module the target's malloc binds to (the executable itself when static).
    pub module: String,
    /// "auto", "--allocator" or "--lib".
    pub chosen_by: Cow<'static, str>,
    pub static_executable: bool,
    /// Other allocators hooked through their own names (a `_rjem_` jemalloc in the
    /// executable, say).
    pub also: Vec<OtherAllocator>,
    /// Modules whose malloc/calloc/realloc the target's calls do not bind to: calls into them
    /// are counted in `drops.untracked_allocator_calls`, never silently ignored.
    pub shadowed: Vec<String>,
    /// Set when no allocation call was seen at all: a zero here is not proof of no
    /// allocation.
    pub warning: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct OtherAllocator {
    pub name: Cow<'static, str>,
    pub module: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Window {
    /// When the probes went live (UTC, RFC 3339).
    pub start: String,
    pub duration_s: f64,
    #[serde(default)]
    pub interval_s: f64,
    #[serde(default)]
    pub samples: usize,
    /// With --min-age, outstanding figures count only blocks at least this old.
    #[serde(default)]
    pub min_age_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Probe {
    pub function: String,
    pub module: String,
    pub required: bool,
    pub attached: bool,
    pub error: Option<String>,
    /// Another name for `alias_of` (same address); its calls are reported under that name.
    pub alias_of: Option<String>,
    /// Bytes past the function's start where the entry probe sits (0: at entry).
    pub offset: u64,
    /// Why it sits there, when not at entry.
    pub placement: Option<String>,
    /// A shadowed definition: hits are counted as untracked, not tracked.
    pub watch_only: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Totals {
    pub outstanding_bytes: u64,
    pub outstanding_count: u64,
    pub allocated_count: u64,
    pub freed_count: u64,
    pub sites: usize,
    pub growing_sites: usize,
    /// Call sites forgotten after they ended (`--evict-after`); their allocations and frees
    /// are still in `allocated_count` and `freed_count`.
    pub evicted_sites: u64,
    /// The most the tracked heap held at once since attach, and when (seconds into the
    /// window).
    pub peak_bytes: u64,
    pub peak_count: u64,
    pub peak_at_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Site {
    /// The allocation function: malloc, calloc, ..., "operator new", mmap.
    pub function: String,
    pub outstanding_bytes: u64,
    pub outstanding_count: u64,
    pub allocated_bytes: u64,
    pub allocated_count: u64,
    pub freed_bytes: u64,
    pub freed_count: u64,
    #[serde(default)]
    pub interval_allocs: u64,
    #[serde(default)]
    pub interval_frees: u64,
    #[serde(default)]
    pub growth_bytes_per_s: f64,
    pub oldest_age_s: Option<f64>,
    /// The most it held at once since attach (heaptrack's "peak"): bytes, and blocks on
    /// their own.
    #[serde(default)]
    pub peak_bytes: u64,
    #[serde(default)]
    pub peak_count: u64,
    /// Allocations freed by their thread before its next allocation or free call
    /// (heaptrack's "temporary"); absent when sampling, which cannot see the calls between.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporary_count: Option<u64>,
    /// "growing", "stable" or "not-enough-data": outstanding bytes over the trailing half of
    /// the window, and the fit behind it.
    #[serde(default)]
    pub trend: Trend,
    pub fit: Option<Fit>,
    #[serde(default)]
    pub stack_id: String,
    /// The stack was cut at the maximum depth (--max-stack).
    #[serde(default)]
    pub truncated: bool,
    /// How the stack ends: "complete", "max-depth", or "no-unwind-info" (the outermost frame
    /// shown is in code without unwind information and without a usable frame pointer).
    #[serde(default)]
    pub stack_end: Cow<'static, str>,
    /// Innermost first.
    #[serde(default)]
    pub frames: Vec<Frame>,
    /// `--scan`: its blocks by class at the last scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachability: Option<scan::Reachability>,
    /// `--scan`: what holds its reachable blocks, most bytes first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_by: Vec<scan::Holder>,
    /// `--scan`: LEAK, ACCUMULATION, CYCLE, STABLE or NOT ENOUGH DATA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// The suppression that matched it (`leak:PATTERN`, or a Valgrind block's name): left
    /// out of --fail-on-leak and the verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<String>,
    /// Several processes traced: the process it is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// What the session knows besides the tracker.
pub struct Context<'a> {
    pub identity: &'a Identity,
    /// `leakprobe run`, not `attach`.
    pub is_run: bool,
    pub args: Vec<String>,
    pub start_wall: std::time::SystemTime,
    pub interval_s: f64,
    pub probes: &'a [ProbeStatus],
    pub ended_by: &'a str,
    pub exit_status: Option<i32>,
    pub sample_bytes: u64,
    pub max_overhead: Option<u64>,
    pub host: Host,
    pub modules: Vec<Module>,
    pub allocator: &'a crate::target::allocator::Plan,
    /// Several processes are traced: each site names its process.
    pub per_process: bool,
}

pub fn build(
    ctx: &Context<'_>,
    tracker: &Tracker,
    mut stack_of: impl FnMut(&SiteStats) -> (Vec<Frame>, u32),
) -> Report {
    let counters = tracker.counters();
    let stats = tracker.sites();
    let t = crate::model::Totals::of(&stats);
    let sites = stats
        .into_iter()
        .map(|s| {
            let (frames, end) = stack_of(&s);
            Site {
                function: s
                    .kind
                    .map(|k| k.name().to_string())
                    .unwrap_or_else(|| format!("kind {}", s.key.kind)),
                outstanding_bytes: s.outstanding_bytes,
                outstanding_count: s.outstanding_count,
                allocated_bytes: s.allocated_bytes,
                allocated_count: s.allocated_count,
                freed_bytes: s.freed_bytes,
                freed_count: s.freed_count,
                interval_allocs: s.interval_allocs,
                interval_frees: s.interval_frees,
                growth_bytes_per_s: s.growth_bytes_per_s,
                oldest_age_s: s.oldest_age_s,
                peak_bytes: s.peak_bytes,
                peak_count: s.peak_count,
                temporary_count: (ctx.sample_bytes == 0).then_some(s.temporary_count),
                trend: s.trend,
                fit: s.fit,
                stack_id: format!("{:016x}", s.key.stack_id),
                truncated: end == stack_end::MAX_DEPTH,
                stack_end: Cow::Borrowed(match end {
                    stack_end::MAX_DEPTH => "max-depth",
                    stack_end::NO_UNWIND_INFO => "no-unwind-info",
                    _ => "complete",
                }),
                frames,
                reachability: None,
                held_by: Vec::new(),
                verdict: None,
                suppressed: None,
                pid: ctx.per_process.then_some(s.key.tgid),
            }
        })
        .collect::<Vec<_>>();
    let (kind, summary) = tracker.verdict();
    let peak = tracker.heap_peak();
    let tl = tracker.timeline();
    let heap_from = crate::model::trend::trailing_from(tl.heap.points());
    let rss_from = crate::model::trend::trailing_from(tl.rss.points());
    Report {
        schema: SCHEMA.into(),
        leakprobe: Tool { version: env!("CARGO_PKG_VERSION").into(), args: ctx.args.clone() },
        host: ctx.host.clone(),
        target: Target {
            pid: ctx.identity.pid,
            exe: ctx.identity.exe.clone(),
            build_id: ctx
                .modules
                .iter()
                .find(|m| m.path == ctx.identity.exe)
                .and_then(|m| m.build_id.clone()),
            cmdline: ctx.identity.cmdline.clone(),
            start_time: ctx.identity.start_time.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            ended_by: ctx.ended_by.to_string(),
            exit_status: ctx.exit_status,
            is_run: ctx.is_run,
        },
        allocator: {
            let plan = ctx.allocator;
            let alloc_calls = counters.get(leakprobe_common::counter::ALLOC_CALLS);
            Allocator {
                name: plan.allocator.name().into(),
                module: plan.module.path.display().to_string(),
                chosen_by: plan.chosen_by.into(),
                static_executable: plan.static_exe,
                also: plan
                    .also
                    .iter()
                    .map(|(k, m)| OtherAllocator {
                        name: k.name().into(),
                        module: m.path.display().to_string(),
                    })
                    .collect(),
                shadowed: plan.watch.iter().map(|m| m.module.path.display().to_string()).collect(),
                warning: (alloc_calls == 0 && ctx.sample_bytes == 0 && !ctx.probes.is_empty()).then(|| {
                    "no allocation call was seen through the hooked functions: if the target \
                     allocated, it did so through something not hooked (an inlined or custom \
                     allocator, raw mmap); try --allocator or --lib"
                        .to_string()
                }),
            }
        },
        window: Window {
            start: humantime::format_rfc3339_seconds(ctx.start_wall).to_string(),
            duration_s: tracker.window_s(),
            interval_s: ctx.interval_s,
            samples: tracker.samples(),
            min_age_s: tracker.min_age_ns() as f64 / 1e9,
        },
        probes: ctx
            .probes
            .iter()
            .map(|p| Probe {
                function: p.function.to_string(),
                module: p.module.display().to_string(),
                required: p.required,
                attached: p.attached(),
                error: p.error.clone(),
                alias_of: p.alias_of.map(str::to_string),
                offset: p.placement.map_or(0, |(o, _)| o),
                placement: p.placement.map(|(_, why)| why.to_string()),
                watch_only: p.watch_only,
            })
            .collect(),
        totals: Totals {
            outstanding_bytes: t.outstanding_bytes,
            outstanding_count: t.outstanding_count,
            allocated_count: t.allocated_count + tracker.evicted().allocated_count,
            freed_count: t.freed_count + tracker.evicted().freed_count,
            sites: t.sites,
            growing_sites: t.growing_sites,
            evicted_sites: tracker.evicted().sites,
            peak_bytes: peak.map_or(0, |p| p.bytes),
            peak_count: peak.map_or(0, |p| p.count),
            peak_at_s: peak.map_or(0.0, |p| p.at_s),
        },
        drops: DROP_KINDS.iter().map(|(i, name, _)| (Cow::Borrowed(*name), counters.get(*i))).collect(),
        activity: INFO_KINDS.iter().map(|(i, name, _)| (Cow::Borrowed(*name), counters.get(*i))).collect(),
        degraded: total_drops(counters) > 0,
        sampling: Sampling { sample_bytes: ctx.sample_bytes, estimated: ctx.sample_bytes > 0 },
        overhead: Overhead {
            mean_hits_per_s: tracker.mean_hit_rate(),
            peak_hits_per_s: tracker.peak_hit_rate(),
            max_hits_per_s: ctx.max_overhead,
        },
        verdict: Verdict {
            kind,
            summary,
            heap_fit: crate::model::trend::fit(tl.heap.points(), heap_from),
            rss_fit: crate::model::trend::fit(tl.rss.points(), rss_from),
            basis: Basis::Trend,
        },
        timeline: timeline(tl),
        sites,
        modules: ctx.modules.clone(),
        in_process: None,
        runtime: None,
        js_heap: None,
        scan: None,
        suppressions: None,
        processes: Vec::new(),
        merged: Vec::new(),
    }
}

/// Joins the series on their sample times.
fn timeline(tl: &crate::model::Timeline) -> Vec<TimelinePoint> {
    let at = |s: &crate::model::trend::Series| -> std::collections::HashMap<u64, f64> {
        s.points().iter().map(|(t, y)| (t.to_bits(), *y)).collect()
    };
    let (rss, anon, file, mmap, allocs, frees) =
        (at(&tl.rss), at(&tl.anon), at(&tl.file), at(&tl.mmap), at(&tl.alloc_rate), at(&tl.free_rate));
    tl.heap
        .points()
        .iter()
        .map(|(t, heap)| {
            let k = t.to_bits();
            TimelinePoint {
                t_s: *t,
                rss_bytes: rss.get(&k).map(|v| *v as u64),
                anon_bytes: anon.get(&k).map(|v| *v as u64),
                file_bytes: file.get(&k).map(|v| *v as u64),
                heap_bytes: *heap as u64,
                mmap_bytes: mmap.get(&k).map_or(0, |v| *v as u64),
                allocs_per_s: allocs.get(&k).copied().unwrap_or(0.0),
                frees_per_s: frees.get(&k).copied().unwrap_or(0.0),
            }
        })
        .collect()
}

pub fn to_json(report: &Report) -> serde_json::Result<String> {
    let mut s = serde_json::to_string_pretty(report)?;
    s.push('\n');
    Ok(s)
}
