//! **Layer: live monitoring.** What a running session shows while it traces: the
//! [`View`] (built each interval from the tracking model, pure), the Prometheus exporter
//! ([`metrics`]) and the terminal view ([`top`]).
//!
//! The session publishes one [`View`] per interval on a watch channel ([`Tap`]); the exporter
//! and the terminal view only read it, so a scrape or a redraw never waits for the session and
//! the session never waits for them.

pub mod metrics;
pub mod top;

use std::sync::Arc;

use leakprobe_common::SiteKey;

use crate::model::{Counters, DROP_KINDS, INFO_KINDS, SiteStats, SortBy, Tracker, total_drops};
use crate::report::scan::{Reachability, site_verdict};
use crate::symbolize::Frame;

/// Points of each site's sparkline kept in a [`View`].
pub const SPARK_POINTS: usize = 60;

/// How a site is named outside the report: a short id that stays the same across scrapes (and
/// across attaches to the same binaries), its leaf function, and where that is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Label {
    /// 12 hex digits: see [`site_id`].
    pub id: String,
    /// The function that called the allocator (the first frame), or `[unknown] module+0xoffset`
    /// (the offset in the module's file).
    pub function: String,
    /// `file:line` of that call, when known.
    pub location: String,
    /// The file name of the module it is in.
    pub module: String,
}

/// The id of a call site: FNV-1a over its allocation function and its symbolized frames
/// (module file name, function, file, line; for a frame with no symbol, its address, which the
/// caller turns into the offset in its file). It depends on neither the kernel's stack id nor
/// where the modules were mapped, so it is the same at every scrape, after a re-attach and on
/// every replica running the same build.
pub fn site_id(allocator: &str, frames: &[Frame]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(allocator.as_bytes());
    for f in frames {
        let module = f.module.as_deref().map(file_name).unwrap_or("");
        eat(module.as_bytes());
        match &f.function {
            Some(func) => {
                eat(func.as_bytes());
                eat(f.file.as_deref().unwrap_or("").as_bytes());
                eat(&f.line.unwrap_or(0).to_le_bytes());
            }
            None => eat(&f.address.to_le_bytes()),
        }
    }
    format!("{:012x}", h >> 16)
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The label of a site with these frames (innermost first).
pub fn label(allocator: &str, frames: &[Frame]) -> Label {
    // The innermost Python frame names a Python site (tracemalloc's grouping by line).
    let first = Frame::headline(frames);
    let module = first.and_then(|f| f.module.as_deref()).map(file_name).unwrap_or("").to_string();
    let function = match first {
        Some(Frame { function: Some(f), .. }) => f.clone(),
        Some(f) if !module.is_empty() => format!("[unknown] {module}+{:#x}", f.address),
        Some(f) => format!("{:#x}", f.address),
        None => "[no stack]".into(),
    };
    let location = match first {
        Some(Frame { file: Some(file), line, .. }) => {
            format!("{}:{}", file_name(file), line.unwrap_or(0))
        }
        _ => String::new(),
    };
    Label { id: site_id(allocator, frames), function, location, module }
}

/// A site's classes at the latest scan, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Classes {
    pub definitely_lost: u64,
    pub indirectly_lost: u64,
    pub possibly_lost: u64,
    pub reachable: u64,
}

impl Classes {
    pub fn of(r: &Reachability) -> Classes {
        Classes {
            definitely_lost: r.definitely_lost.bytes,
            indirectly_lost: r.indirectly_lost.bytes,
            possibly_lost: r.possibly_lost.bytes,
            reachable: r.reachable.bytes,
        }
    }
}

/// One call site as the live views show it.
#[derive(Clone, Debug, PartialEq)]
pub struct Site {
    /// Its figures, as the model has them.
    pub stats: SiteStats,
    pub label: Label,
    /// The allocation function (malloc, operator new, mmap...).
    pub allocator: &'static str,
    /// Net growth per second, what sites are ranked by: the slope of the trailing fit when
    /// there is one, else the outstanding bytes over the whole window.
    pub growth_bytes_per_s: f64,
    /// Outstanding bytes, oldest first, at most [`SPARK_POINTS`].
    pub history: Vec<u64>,
    /// From the latest scan, if one was made.
    pub classes: Option<Classes>,
    /// The site's verdict after a scan (LEAK, ACCUMULATION...) or its trend.
    pub verdict: &'static str,
}

/// A counter with the name the exporter and the report use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Count {
    pub name: &'static str,
    pub value: u64,
}

/// Everything the live views show, as of one interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    pub pid: i32,
    pub exe: String,
    /// Seconds since the probes went live.
    pub window_s: f64,
    /// Set when the session is over: why it ended.
    pub ended: Option<String>,
    pub rss: Option<u64>,
    pub anon_rss: Option<u64>,
    /// Tracked live heap and, of it, anonymous mmap regions.
    pub heap: u64,
    pub mmap: u64,
    pub alloc_calls: u64,
    pub free_calls: u64,
    /// Calls per second over the last interval.
    pub alloc_rate: f64,
    pub free_rate: f64,
    /// Probe hits per second over the last interval, and what they cost the target: seconds of
    /// its CPU per second, at the measured cost per hit.
    pub hit_rate: f64,
    pub overhead: f64,
    /// Mean bytes between samples; 0 when every allocation is tracked.
    pub sample_bytes: u64,
    pub drops: Vec<Count>,
    pub events: Vec<Count>,
    pub dropped_total: u64,
    /// Sites tracked, and sites evicted since attach (nothing outstanding, idle).
    pub sites_tracked: usize,
    pub sites_evicted: u64,
    /// The top sites by growth, largest first. With several processes, merged per build: a
    /// site in N workers is one (its key's tgid 0); a site in one process only keeps its tgid.
    pub sites: Vec<Site>,
    /// With several processes: each process's own top sites (their key's tgid is the PID).
    pub process_sites: Vec<Site>,
    /// Processes in the session, ended ones included (1 for one process).
    pub processes: usize,
    /// The run's verdict.
    pub verdict: String,
    /// Seconds since attach of the latest scan, with the whole process's classes.
    pub scan_at_s: Option<f64>,
    pub scan_totals: Option<Classes>,
    /// A CPython target: its most numerous object types at the latest scan.
    pub python_objects: Vec<PythonTypeCount>,
    /// A line for the terminal view (a snapshot written, a scan done...).
    pub status: String,
}

/// One Python object type's count at a scan, for `leakprobe_python_objects{type}`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PythonTypeCount {
    /// `qualname`, or `module.qualname` outside builtins.
    pub name: String,
    pub count: u64,
    pub bytes: u64,
}

/// The cost of one probe hit on this machine's uprobes (docs/benchmarks.md). In-process, calls
/// that reach no probe cost the stub's few nanoseconds, which this leaves out.
pub const UPROBE_HIT_COST_S: f64 = 1.8e-6;

/// What the views are built from, besides the tracker.
pub struct Inputs<'a> {
    pub pid: i32,
    pub exe: &'a str,
    pub sample_bytes: u64,
    /// Most sites to include.
    pub top: usize,
    pub sites_evicted: u64,
    /// Per site key: its classes at the latest scan, and its bytes in cycles.
    pub scanned: &'a dyn Fn(&SiteKey) -> Option<(Reachability, u64)>,
    pub scan_at_s: Option<f64>,
    pub scan_totals: Option<Classes>,
    pub python_objects: Vec<PythonTypeCount>,
}

/// Builds the view of one interval. `label` names a site (it symbolizes; cached by the caller).
/// `processes`: how many the session has had; with more than one, `sites` are merged per build
/// ([`crate::model::merge_processes`]) and each process's own go to `process_sites`.
pub fn compose(
    tracker: &Tracker,
    sites: &[SiteStats],
    processes: usize,
    inputs: &Inputs<'_>,
    mut label: impl FnMut(&SiteStats) -> Label,
) -> View {
    let tl = tracker.timeline();
    let counters: &Counters = tracker.counters();
    let mut view_site = |s: &SiteStats| {
        let history = match s.key.tgid {
            // Merged: the sum of the members' series is not kept; the sparkline stays empty.
            0 if processes > 1 => Vec::new(),
            _ => tracker
                .site_history(&s.key)
                .map(|h| h.iter().rev().take(SPARK_POINTS).rev().map(|p| p.1 as u64).collect())
                .unwrap_or_default(),
        };
        let scanned = (inputs.scanned)(&s.key);
        let verdict = match &scanned {
            Some((r, cycle_bytes)) => site_verdict(s.trend, r, *cycle_bytes),
            None => s.trend.label(),
        };
        Site {
            stats: s.clone(),
            label: label(s),
            allocator: s.kind.map_or("unknown", |k| k.name()),
            growth_bytes_per_s: growth(s),
            history,
            classes: scanned.map(|(r, _)| Classes::of(&r)),
            verdict,
        }
    };
    let (view_sites, process_sites) = match processes > 1 {
        true => {
            let merged = crate::model::merge_processes(sites);
            let own: Vec<Site> = chosen(sites, inputs.top).into_iter().map(&mut view_site).collect();
            (chosen(&merged, inputs.top).into_iter().map(&mut view_site).collect(), own)
        }
        false => (chosen(sites, inputs.top).into_iter().map(&mut view_site).collect(), Vec::new()),
    };
    let (verdict, _) = tracker.verdict();
    let last = |s: &crate::model::trend::Series| s.last().unwrap_or(0.0);
    let alloc_calls = counters.get(leakprobe_common::counter::ALLOC_CALLS);
    let free_calls = counters.get(leakprobe_common::counter::FREE_CALLS);
    let hit_rate = tracker.last_hit_rate();
    View {
        pid: inputs.pid,
        exe: inputs.exe.to_string(),
        window_s: tracker.window_s(),
        ended: None,
        rss: tl.rss.last().map(|v| v as u64),
        anon_rss: tl.anon.last().map(|v| v as u64),
        heap: last(&tl.heap) as u64,
        mmap: last(&tl.mmap) as u64,
        alloc_calls,
        free_calls,
        alloc_rate: last(&tl.alloc_rate),
        free_rate: last(&tl.free_rate),
        hit_rate,
        overhead: hit_rate * UPROBE_HIT_COST_S,
        sample_bytes: inputs.sample_bytes,
        drops: DROP_KINDS.iter().map(|(idx, name, _)| Count { name, value: counters.get(*idx) }).collect(),
        events: INFO_KINDS.iter().map(|(idx, name, _)| Count { name, value: counters.get(*idx) }).collect(),
        dropped_total: total_drops(counters),
        sites_tracked: sites.len(),
        sites_evicted: inputs.sites_evicted,
        sites: view_sites,
        process_sites,
        processes,
        verdict: verdict.label().to_string(),
        scan_at_s: inputs.scan_at_s,
        scan_totals: inputs.scan_totals,
        python_objects: inputs.python_objects.clone(),
        status: String::new(),
    }
}

/// The growth a site is ranked by.
fn growth(s: &SiteStats) -> f64 {
    crate::model::growth_rate(s.fit, s.growth_bytes_per_s)
}

/// The `top` fastest growing sites, first and in that order (what the metrics export), then
/// those in the top `top` by every other ranking (what `top`'s sort key can bring up).
fn chosen(sites: &[SiteStats], top: usize) -> Vec<&SiteStats> {
    let mut ranked: Vec<&SiteStats> = sites.iter().collect();
    ranked.sort_by(|a, b| {
        growth(b)
            .total_cmp(&growth(a))
            .then(b.outstanding_bytes.cmp(&a.outstanding_bytes))
            .then(a.key.cmp(&b.key))
    });
    let mut out: Vec<&SiteStats> = ranked.iter().take(top).copied().collect();
    for by in SortBy::ALL.into_iter().filter(|b| *b != SortBy::Growth) {
        let mut other = ranked.clone();
        by.sort(&mut other, |s| s.figures());
        for s in other.into_iter().take(top).filter(|s| by.score(&s.figures()) > 0.0) {
            if !out.iter().any(|o| o.key == s.key) {
                out.push(s);
            }
        }
    }
    out
}

/// What the terminal view asks of the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Write the report so far as a snapshot.
    Snapshot,
    /// Detach and end the session.
    Quit,
}

/// The session's end of the live channel: it publishes views and hears requests.
pub struct Tap {
    pub views: tokio::sync::watch::Sender<Arc<View>>,
    pub requests: tokio::sync::mpsc::UnboundedReceiver<Request>,
}

/// The viewers' end.
#[derive(Clone)]
pub struct Viewer {
    pub views: tokio::sync::watch::Receiver<Arc<View>>,
    pub requests: tokio::sync::mpsc::UnboundedSender<Request>,
}

/// A connected pair.
pub fn channel() -> (Tap, Viewer) {
    let (vtx, vrx) = tokio::sync::watch::channel(Arc::new(View::default()));
    let (rtx, rrx) = tokio::sync::mpsc::unbounded_channel();
    (Tap { views: vtx, requests: rrx }, Viewer { views: vrx, requests: rtx })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: Option<&str>, address: u64, line: u32) -> Frame {
        Frame {
            address,
            function: function.map(str::to_string),
            file: function.map(|_| "/src/server.c".to_string()),
            line: function.map(|_| line),
            module: Some("/usr/bin/server".into()),
            inlined: false,
            runtime: None,
            column: None,
        }
    }

    #[test]
    fn site_ids_ignore_where_modules_were_mapped_but_not_what_the_stack_is() {
        let a = [frame(Some("parse"), 0x5555_0000_1000, 40), frame(Some("main"), 0x5555_0000_2000, 99)];
        let b = [frame(Some("parse"), 0x7777_0000_1000, 40), frame(Some("main"), 0x7777_0000_2000, 99)];
        assert_eq!(site_id("malloc", &a), site_id("malloc", &b));
        assert_eq!(site_id("malloc", &a).len(), 12);
        assert_ne!(site_id("malloc", &a), site_id("calloc", &a));
        let c = [frame(Some("parse"), 0x5555_0000_1000, 41), frame(Some("main"), 0x5555_0000_2000, 99)];
        assert_ne!(site_id("malloc", &a), site_id("malloc", &c));
        // Unsymbolized frames fall back on the address.
        let d = [frame(None, 0x1000, 0)];
        let e = [frame(None, 0x2000, 0)];
        assert_ne!(site_id("malloc", &d), site_id("malloc", &e));
    }

    #[test]
    fn labels_name_the_caller_and_its_line() {
        let l = label("malloc", &[frame(Some("parse_upload"), 0x1000, 40)]);
        assert_eq!(l.function, "parse_upload");
        assert_eq!(l.location, "server.c:40");
        assert_eq!(l.module, "server");
        let l = label("malloc", &[frame(None, 0x1000, 0)]);
        assert_eq!(l.function, "[unknown] server+0x1000");
        assert_eq!(label("malloc", &[]).function, "[no stack]");
    }

    fn not_scanned(_: &SiteKey) -> Option<(Reachability, u64)> {
        None
    }

    /// Inputs of a session with no scan, showing the `top` sites.
    fn unscanned(top: usize) -> Inputs<'static> {
        Inputs {
            pid: 7,
            exe: "/bin/x",
            sample_bytes: 0,
            top,
            sites_evicted: 0,
            scanned: &not_scanned,
            scan_at_s: None,
            scan_totals: None,
            python_objects: Vec::new(),
        }
    }

    #[test]
    fn several_processes_are_merged_per_build_and_kept_per_process() {
        use leakprobe_common::SiteCounters;
        let key = |tgid| SiteKey { stack_id: 5, kind: 0, tgid };
        let mut t = Tracker::new(0, 0);
        for i in 1..4u64 {
            let grow = |per| SiteCounters { alloc_count: i, alloc_bytes: per * i, ..Default::default() };
            t.ingest(crate::model::Sample {
                at_ns: i * 1_000_000_000,
                sites: vec![(key(101), grow(100)), (key(102), grow(300))],
                ..Default::default()
            });
        }
        let inputs = unscanned(10);
        let label = |_: &SiteStats| Label::default();
        let v = compose(&t, &t.sites(), 3, &inputs, label);
        assert_eq!(v.sites.len(), 1, "one site per build");
        assert_eq!((v.sites[0].stats.key.tgid, v.sites[0].stats.outstanding_bytes), (0, 1200));
        let mut own: Vec<(u32, u64)> =
            v.process_sites.iter().map(|s| (s.stats.key.tgid, s.stats.outstanding_bytes)).collect();
        own.sort_unstable();
        assert_eq!(own, [(101, 300), (102, 900)]);
        // One process: nothing merged, nothing twice.
        let v = compose(&t, &t.sites(), 1, &inputs, label);
        assert_eq!((v.sites.len(), v.process_sites.len()), (2, 0));
    }

    #[test]
    fn compose_ranks_by_growth_and_bounds_sites_and_sparklines() {
        use leakprobe_common::SiteCounters;
        let key = |id| SiteKey { stack_id: id, kind: 0, tgid: 0 };
        let mut t = Tracker::new(0, 0);
        for i in 0..100u64 {
            let grow = SiteCounters {
                alloc_count: i,
                alloc_bytes: 1000 * i,
                free_count: 0,
                free_bytes: 0,
                ..Default::default()
            };
            let big_flat = SiteCounters {
                alloc_count: 1,
                alloc_bytes: 1 << 20,
                free_count: 0,
                free_bytes: 0,
                ..Default::default()
            };
            let small = SiteCounters {
                alloc_count: i,
                alloc_bytes: 10 * i,
                free_count: 0,
                free_bytes: 0,
                ..Default::default()
            };
            t.ingest(crate::model::Sample {
                at_ns: (i + 1) * 1_000_000_000,
                sites: vec![(key(1), grow), (key(2), big_flat), (key(3), small)],
                ..Default::default()
            });
        }
        let sites = t.sites();
        let inputs = unscanned(2);
        let v = compose(&t, &sites, 1, &inputs, |s| Label {
            id: format!("{}", s.key.stack_id),
            ..Label::default()
        });
        // The top two by growth first (what the metrics export), then the flat site, which
        // tops the outstanding and peak rankings (what `top`'s sort key can bring up).
        assert_eq!(v.sites.len(), 3);
        // The steady 1000 B/s grower first, though the flat site holds more.
        assert_eq!(v.sites[0].stats.key, key(1));
        assert_eq!(v.sites[1].stats.key, key(3));
        assert_eq!(v.sites[2].stats.key, key(2));
        assert!(v.sites[0].growth_bytes_per_s > 900.0);
        assert_eq!(v.sites[0].history.len(), SPARK_POINTS);
        assert_eq!(*v.sites[0].history.last().unwrap(), 99_000);
        assert_eq!(v.sites_tracked, 3);
        assert_eq!(v.drops.len(), DROP_KINDS.len());
    }
}
