//! **Layer: tracking model.** Pure arithmetic over what the kernel side counted: call sites,
//! growth, trends and verdicts, sampling weights. May use only `leakprobe-common`; no I/O.
//!
//! The tracking model: call site totals over time, growth and ages. Pure arithmetic, no I/O:
//! it consumes [`Sample`]s (read from the kernel maps in production, built by hand in tests).

pub mod sampling;
pub mod trend;

use std::collections::HashMap;

use leakprobe_common::{AllocKind, HeapTotal, SiteCounters, SiteKey, counter};

use trend::{Fit, RunVerdict, Series, Trend};

/// Drop and activity counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; counter::COUNT as usize]);

impl Counters {
    pub fn get(&self, idx: u32) -> u64 {
        self.0.get(idx as usize).copied().unwrap_or(0)
    }
}

/// Outstanding blocks of one site as seen in the live-block map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveSummary {
    /// Timestamp (CLOCK_MONOTONIC ns) of the oldest outstanding block.
    pub oldest_ns: u64,
    /// Blocks at least `min_age` old, and their bytes.
    pub aged_count: u64,
    pub aged_bytes: u64,
}

/// One reading of the kernel maps.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// CLOCK_MONOTONIC ns when the sample was taken.
    pub at_ns: u64,
    pub sites: Vec<(SiteKey, SiteCounters)>,
    pub live: HashMap<SiteKey, LiveSummary>,
    pub counters: Counters,
    /// The process's memory as the kernel sees it, when it could be read.
    pub memory: Option<ProcMemory>,
    /// The whole tracked heap and its high-water mark.
    pub heap: HeapTotal,
}

/// Resident memory from /proc/PID/status and smaps_rollup, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcMemory {
    pub rss: u64,
    pub anon: u64,
    pub file: u64,
}

/// The process over time, one point per sample (thinned when long; see [`trend::Series`]).
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    /// RSS, anonymous and file-backed resident bytes.
    pub rss: Series,
    pub anon: Series,
    pub file: Series,
    /// Tracked live heap: bytes allocated since attach through the hooks and not freed.
    pub heap: Series,
    /// Of which anonymous mmap regions.
    pub mmap: Series,
    /// Allocation and free calls per second over each interval.
    pub alloc_rate: Series,
    pub free_rate: Series,
}

#[derive(Clone, Debug)]
struct SiteState {
    now: SiteCounters,
    prev: SiteCounters,
    live: Option<LiveSummary>,
    /// Outstanding bytes at each sample.
    history: Series,
    /// When its counters last changed (CLOCK_MONOTONIC ns).
    changed_ns: u64,
}

/// What evicted sites had done before they were forgotten: the totals stay whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub sites: u64,
    pub allocated_bytes: u64,
    pub allocated_count: u64,
    pub freed_bytes: u64,
    pub freed_count: u64,
}

/// A call site's figures at the latest sample.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteStats {
    pub key: SiteKey,
    pub kind: Option<AllocKind>,
    pub outstanding_bytes: u64,
    pub outstanding_count: u64,
    pub allocated_bytes: u64,
    pub allocated_count: u64,
    pub freed_bytes: u64,
    pub freed_count: u64,
    /// Allocations and frees since the previous sample.
    pub interval_allocs: u64,
    pub interval_frees: u64,
    /// Net change of outstanding bytes over the whole window, per second.
    pub growth_bytes_per_s: f64,
    /// Age of the oldest outstanding block, if the live map was read.
    pub oldest_age_s: Option<f64>,
    /// The most it held at once since attach (bytes; blocks, counted on their own).
    pub peak_bytes: u64,
    pub peak_count: u64,
    /// Allocations freed by their thread before its next allocation or free call.
    pub temporary_count: u64,
    /// What its outstanding bytes did over the trailing half of the window.
    pub trend: Trend,
    pub fit: Option<Fit>,
}

/// The sites of several processes merged per build: one entry per stack and allocation
/// function (forked workers share their stack ids), its figures summed and its key's tgid 0.
/// What the live view and the metrics show by default, so that the same site in N workers is
/// one series, not N under one label set. A site in one process only is kept as it is.
pub fn merge_processes(sites: &[SiteStats]) -> Vec<SiteStats> {
    let mut by_stack: HashMap<(u64, u32), Vec<&SiteStats>> = HashMap::new();
    for s in sites {
        by_stack.entry((s.key.stack_id, s.key.kind)).or_default().push(s);
    }
    let mut out: Vec<SiteStats> = by_stack
        .into_values()
        .map(|group| match group.as_slice() {
            [one] => (*one).clone(),
            many => merged(many),
        })
        .collect();
    out.sort_by_key(|s| s.key);
    out
}

fn merged(group: &[&SiteStats]) -> SiteStats {
    let first = group[0];
    let sum = |f: fn(&SiteStats) -> u64| group.iter().map(|s| f(s)).sum::<u64>();
    let growing = group.iter().find(|s| s.trend == Trend::Growing);
    SiteStats {
        key: SiteKey { tgid: 0, ..first.key },
        kind: first.kind,
        outstanding_bytes: sum(|s| s.outstanding_bytes),
        outstanding_count: sum(|s| s.outstanding_count),
        allocated_bytes: sum(|s| s.allocated_bytes),
        allocated_count: sum(|s| s.allocated_count),
        freed_bytes: sum(|s| s.freed_bytes),
        freed_count: sum(|s| s.freed_count),
        interval_allocs: sum(|s| s.interval_allocs),
        interval_frees: sum(|s| s.interval_frees),
        growth_bytes_per_s: group.iter().map(|s| s.growth_bytes_per_s).sum(),
        oldest_age_s: group.iter().filter_map(|s| s.oldest_age_s).reduce(f64::max),
        // Each process's peak came at its own time: their sum bounds the merged peak.
        peak_bytes: sum(|s| s.peak_bytes),
        peak_count: sum(|s| s.peak_count),
        temporary_count: sum(|s| s.temporary_count),
        trend: growing.map_or(first.trend, |s| s.trend),
        // The growing member's fit, its slope the total of every member's.
        fit: growing.or(Some(&first)).and_then(|s| s.fit).map(|f| Fit {
            slope_per_s: group.iter().filter_map(|s| s.fit).map(|f| f.slope_per_s).sum(),
            ..f
        }),
    }
}

/// Tracks every call site from the moment probes went live.
#[derive(Debug)]
pub struct Tracker {
    start_ns: u64,
    last_ns: u64,
    min_age_ns: u64,
    sites: HashMap<SiteKey, SiteState>,
    counters: Counters,
    samples: usize,
    /// Probe hits per second over the last interval, and the highest seen.
    last_hit_rate: f64,
    peak_hit_rate: f64,
    timeline: Timeline,
    /// When and at what counts the last timeline point was recorded, and its spacing.
    rate_base: (u64, Counters),
    last_dt: f64,
    evicted: Evicted,
    /// The whole tracked heap at the latest sample, with its peak.
    heap: HeapTotal,
}

/// The tracked heap's high-water mark.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HeapPeak {
    pub bytes: u64,
    pub count: u64,
    /// Seconds after the probes went live.
    pub at_s: f64,
}

impl Tracker {
    /// `start_ns` is when the probes went live; every site had nothing outstanding then.
    /// With `min_age_ns` > 0, outstanding figures count only blocks at least that old.
    pub fn new(start_ns: u64, min_age_ns: u64) -> Self {
        Tracker {
            start_ns,
            last_ns: start_ns,
            min_age_ns,
            sites: HashMap::new(),
            counters: Counters::default(),
            samples: 0,
            last_hit_rate: 0.0,
            peak_hit_rate: 0.0,
            timeline: Timeline::default(),
            rate_base: (start_ns, Counters::default()),
            last_dt: 0.0,
            evicted: Evicted::default(),
            heap: HeapTotal::default(),
        }
    }

    /// The tracked heap's peak since attach, if anything was allocated.
    pub fn heap_peak(&self) -> Option<HeapPeak> {
        let h = &self.heap;
        (h.peak_bytes > 0).then(|| HeapPeak {
            bytes: h.peak_bytes,
            count: h.peak_count,
            at_s: h.peak_at_ns.saturating_sub(self.start_ns) as f64 / 1e9,
        })
    }

    pub fn ingest(&mut self, sample: Sample) {
        if sample.heap.peak_bytes >= self.heap.peak_bytes {
            self.heap = sample.heap;
        }
        for state in self.sites.values_mut() {
            state.prev = state.now;
            state.live = None;
        }
        for (key, counters) in sample.sites {
            let state = self.sites.entry(key).or_insert(SiteState {
                now: SiteCounters::default(),
                prev: SiteCounters::default(),
                live: None,
                history: Series::default(),
                changed_ns: sample.at_ns,
            });
            if state.now != counters {
                state.changed_ns = sample.at_ns;
            }
            state.now = counters;
        }
        let t = sample.at_ns.saturating_sub(self.start_ns) as f64 / 1e9;
        let hits = |c: &Counters| c.get(counter::ALLOC_CALLS) + c.get(counter::FREE_CALLS);
        let dt = sample.at_ns.saturating_sub(self.rate_base.0) as f64 / 1e9;
        // A sample right after the previous one (the final reading at a tick) adds no point:
        // rates over a sliver of time are noise, and a repeated point reads as "not rising".
        let record = self.samples == 0 || dt >= 0.25 * self.last_dt;
        let (mut heap, mut mmap) = (0u64, 0u64);
        for (key, state) in &mut self.sites {
            let outstanding = state.now.alloc_bytes.saturating_sub(state.now.free_bytes);
            if record {
                state.history.push(t, outstanding as f64);
            }
            heap += outstanding;
            if AllocKind::from_u32(key.kind) == Some(AllocKind::Mmap) {
                mmap += outstanding;
            }
        }
        for (key, live) in sample.live {
            if let Some(state) = self.sites.get_mut(&key) {
                state.live = Some(live);
            }
        }
        if record {
            let base = &self.rate_base.1;
            let rate = |idx: u32| {
                if dt > 0.0 {
                    sample.counters.get(idx).saturating_sub(base.get(idx)) as f64 / dt
                } else {
                    0.0
                }
            };
            let tl = &mut self.timeline;
            tl.heap.push(t, heap as f64);
            tl.mmap.push(t, mmap as f64);
            tl.alloc_rate.push(t, rate(counter::ALLOC_CALLS));
            tl.free_rate.push(t, rate(counter::FREE_CALLS));
            if let Some(m) = sample.memory {
                tl.rss.push(t, m.rss as f64);
                tl.anon.push(t, m.anon as f64);
                tl.file.push(t, m.file as f64);
            }
            if dt > 0.0 {
                self.last_hit_rate = hits(&sample.counters).saturating_sub(hits(base)) as f64 / dt;
                self.peak_hit_rate = self.peak_hit_rate.max(self.last_hit_rate);
            }
            self.rate_base = (sample.at_ns, sample.counters);
            self.last_dt = dt;
        }
        self.counters = sample.counters;
        self.last_ns = self.last_ns.max(sample.at_ns);
        self.samples += 1;
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Seconds from probes live to the latest sample.
    pub fn window_s(&self) -> f64 {
        self.last_ns.saturating_sub(self.start_ns) as f64 / 1e9
    }

    /// Allocation and free probe hits per second over the last interval.
    pub fn last_hit_rate(&self) -> f64 {
        self.last_hit_rate
    }

    pub fn peak_hit_rate(&self) -> f64 {
        self.peak_hit_rate
    }

    /// Mean probe hits per second over the window.
    pub fn mean_hit_rate(&self) -> f64 {
        let w = self.window_s();
        let hits = self.counters.get(counter::ALLOC_CALLS) + self.counters.get(counter::FREE_CALLS);
        if w > 0.0 { hits as f64 / w } else { 0.0 }
    }

    pub fn min_age_ns(&self) -> u64 {
        self.min_age_ns
    }

    /// A site's outstanding bytes at each sample (seconds since attach, bytes).
    pub fn site_history(&self, key: &SiteKey) -> Option<&[(f64, f64)]> {
        self.sites.get(key).map(|s| s.history.points())
    }

    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// The run's verdict (leak / fragmentation / stable / not enough data) and the numbers
    /// behind it, from the tracked heap and RSS over the trailing half of the window.
    pub fn verdict(&self) -> (RunVerdict, String) {
        trend::run_verdict(self.timeline.heap.points(), self.timeline.rss.points())
    }

    /// Every site, largest outstanding growth first (ties: more allocations first, then key,
    /// so the order is stable).
    pub fn sites(&self) -> Vec<SiteStats> {
        let window = self.window_s();
        let mut out: Vec<SiteStats> = self
            .sites
            .iter()
            .map(|(key, s)| {
                let mut outstanding_count = s.now.alloc_count.saturating_sub(s.now.free_count);
                let mut outstanding_bytes = s.now.alloc_bytes.saturating_sub(s.now.free_bytes);
                if self.min_age_ns > 0 {
                    let live = s.live.unwrap_or_default();
                    outstanding_count = live.aged_count;
                    outstanding_bytes = live.aged_bytes;
                }
                let oldest_age_s = s
                    .live
                    .filter(|l| l.oldest_ns > 0)
                    .map(|l| self.last_ns.saturating_sub(l.oldest_ns) as f64 / 1e9);
                // Nothing was outstanding when the probes went live, so the net change over
                // the window is what is outstanding now.
                let growth_bytes_per_s = if window > 0.0 { outstanding_bytes as f64 / window } else { 0.0 };
                let (trend, fit) = trend::trend(s.history.points(), &trend::HEAP);
                SiteStats {
                    key: *key,
                    kind: AllocKind::from_u32(key.kind),
                    outstanding_bytes,
                    outstanding_count,
                    allocated_bytes: s.now.alloc_bytes,
                    allocated_count: s.now.alloc_count,
                    freed_bytes: s.now.free_bytes,
                    freed_count: s.now.free_count,
                    interval_allocs: s.now.alloc_count.saturating_sub(s.prev.alloc_count),
                    interval_frees: s.now.free_count.saturating_sub(s.prev.free_count),
                    growth_bytes_per_s,
                    oldest_age_s: if outstanding_count > 0 { oldest_age_s } else { None },
                    // A site whose counters come from elsewhere (V8's profile) has no kernel
                    // peak: what it holds now is the least its peak can be.
                    peak_bytes: s.now.peak_bytes.max(outstanding_bytes),
                    peak_count: s.now.peak_count.max(outstanding_count),
                    temporary_count: s.now.temporary_count,
                    trend,
                    fit,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            b.outstanding_bytes
                .cmp(&a.outstanding_bytes)
                .then(b.allocated_count.cmp(&a.allocated_count))
                .then(a.key.cmp(&b.key))
        });
        out
    }

    pub fn totals(&self) -> Totals {
        Totals::of(&self.sites())
    }

    /// Sites that have ended: nothing outstanding, and no call for `idle_ns` (their counters
    /// unchanged since), with the counters they were last seen at.
    pub fn ended_sites(&self, idle_ns: u64) -> Vec<(SiteKey, SiteCounters)> {
        self.sites
            .iter()
            .filter(|(_, s)| {
                s.now.alloc_count <= s.now.free_count
                    && s.now.alloc_bytes <= s.now.free_bytes
                    && self.last_ns.saturating_sub(s.changed_ns) >= idle_ns
            })
            .map(|(k, s)| (*k, s.now))
            .collect()
    }

    /// Forgets these sites (their kernel entries are gone): their history goes, their totals
    /// move to [`Tracker::evicted`]. A site seen again later starts afresh.
    pub fn evict(&mut self, keys: &[SiteKey]) {
        for key in keys {
            if let Some(s) = self.sites.remove(key) {
                let e = &mut self.evicted;
                e.sites += 1;
                e.allocated_bytes += s.now.alloc_bytes;
                e.allocated_count += s.now.alloc_count;
                e.freed_bytes += s.now.free_bytes;
                e.freed_count += s.now.free_count;
            }
        }
    }

    pub fn evicted(&self) -> Evicted {
        self.evicted
    }

    /// The stacks of the sites still tracked.
    pub fn stacks_in_use(&self) -> std::collections::HashSet<u64> {
        self.sites.keys().map(|k| k.stack_id).collect()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub outstanding_bytes: u64,
    pub outstanding_count: u64,
    pub allocated_count: u64,
    pub freed_count: u64,
    pub sites: usize,
    pub growing_sites: usize,
}

impl Totals {
    /// The sums over `sites` (as [`Tracker::sites`] returns them).
    pub fn of(sites: &[SiteStats]) -> Totals {
        Totals {
            outstanding_bytes: sites.iter().map(|s| s.outstanding_bytes).sum(),
            outstanding_count: sites.iter().map(|s| s.outstanding_count).sum(),
            allocated_count: sites.iter().map(|s| s.allocated_count).sum(),
            freed_count: sites.iter().map(|s| s.freed_count).sum(),
            sites: sites.len(),
            growing_sites: sites.iter().filter(|s| s.outstanding_bytes > 0).count(),
        }
    }
}

/// The drop counters that mean figures may be incomplete, with the words a report uses.
pub const DROP_KINDS: &[(u32, &str, &str)] = &[
    (
        counter::LIVE_MAP_FULL,
        "live_map_full",
        "allocations not tracked: live-block map full (raise --max-live)",
    ),
    (counter::STACK_MAP_FULL, "stack_map_full", "stacks not stored: stack map full"),
    (counter::SITE_MAP_FULL, "site_map_full", "call-site totals not created: site map full"),
    (counter::IN_FLIGHT_FULL, "in_flight_full", "calls not tracked: in-flight map full (too many threads)"),
    (counter::MISSED_RETURN, "missed_returns", "entries whose return was never seen"),
    (counter::MISSED_FREE, "missed_frees", "addresses reused while live (a free went unseen)"),
    (counter::STACK_READ_ERROR, "stack_errors", "stacks that could not be read"),
    (
        counter::UNTRACKED_ALLOCATOR_CALLS,
        "untracked_allocator_calls",
        "calls into an allocator the target's calls do not bind to (shadowed): not tracked",
    ),
    (
        counter::SCAN_FREES_LOST,
        "scan_frees_lost",
        "blocks freed while a scan read the tracker that it could not keep (scanned as untracked memory)",
    ),
    (
        counter::PROCESSES_DROPPED,
        "processes_dropped",
        "children forked while --max-processes were traced: they ran untraced (raise --max-processes)",
    ),
];

/// Counters that are expected in normal operation, reported for context.
pub const INFO_KINDS: &[(u32, &str, &str)] = &[
    (counter::UNKNOWN_FREE, "unknown_frees", "frees of blocks allocated before attach (or untracked)"),
    (counter::STACK_TRUNCATED, "truncated_stacks", "stacks cut at the maximum depth"),
    (
        counter::STACK_NO_UNWIND_INFO,
        "stacks_without_unwind_info",
        "stacks that ended at code without unwind information",
    ),
    (counter::UNKNOWN_MUNMAP, "unknown_munmaps", "munmaps of regions not tracked as anonymous mmaps"),
    (counter::ALLOC_CALLS, "alloc_calls", "allocation calls seen"),
    (counter::FREE_CALLS, "free_calls", "free calls seen"),
    (counter::FAILED_ALLOCS, "failed_allocs", "allocations that failed (NULL)"),
    (counter::UNSAMPLED_ALLOCS, "unsampled_allocs", "allocations passed over by sampling"),
    (
        counter::PY_ARENA_MMAPS,
        "python_arena_mmaps",
        "pymalloc arenas mapped (not sites: the objects in them are tracked one by one)",
    ),
    (
        counter::FORK_EVENTS_LOST,
        "fork_events_lost",
        "children whose fork report was lost (ring full): found at the next interval instead",
    ),
];

/// Sum of the drop counters: non-zero means the report is degraded.
pub fn total_drops(c: &Counters) -> u64 {
    DROP_KINDS.iter().map(|(idx, _, _)| c.get(*idx)).sum()
}

/// How call sites are ranked: `--sort` in the text report, the `s` key in `top`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    /// Net growth per second: the trailing fit's slope, else outstanding over the window.
    #[default]
    Growth,
    /// Outstanding bytes (heaptrack's "leaked").
    Outstanding,
    /// The most a site held at once.
    Peak,
    /// Allocation calls.
    Calls,
    /// Allocations freed before their thread's next allocation or free call.
    Temporary,
}

/// The figures a ranking reads.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RankFigures {
    pub growth_bytes_per_s: f64,
    pub outstanding_bytes: u64,
    pub peak_bytes: u64,
    pub calls: u64,
    pub temporary: u64,
}

impl SortBy {
    pub const ALL: [SortBy; 5] =
        [SortBy::Growth, SortBy::Outstanding, SortBy::Peak, SortBy::Calls, SortBy::Temporary];

    pub fn next(self) -> SortBy {
        let i = SortBy::ALL.iter().position(|s| *s == self).unwrap_or(0);
        SortBy::ALL[(i + 1) % SortBy::ALL.len()]
    }

    pub fn name(self) -> &'static str {
        match self {
            SortBy::Growth => "growth",
            SortBy::Outstanding => "outstanding",
            SortBy::Peak => "peak",
            SortBy::Calls => "calls",
            SortBy::Temporary => "temporary",
        }
    }

    /// Higher ranks first.
    pub fn score(self, f: &RankFigures) -> f64 {
        match self {
            SortBy::Growth => f.growth_bytes_per_s,
            SortBy::Outstanding => f.outstanding_bytes as f64,
            SortBy::Peak => f.peak_bytes as f64,
            SortBy::Calls => f.calls as f64,
            SortBy::Temporary => f.temporary as f64,
        }
    }

    /// Orders `items` best first by this ranking, ties by outstanding bytes (stable).
    pub fn sort<T>(self, items: &mut [T], figures: impl Fn(&T) -> RankFigures) {
        items.sort_by(|a, b| {
            let (fa, fb) = (figures(a), figures(b));
            self.score(&fb).total_cmp(&self.score(&fa)).then(fb.outstanding_bytes.cmp(&fa.outstanding_bytes))
        });
    }
}

/// Net growth per second as sites are ranked: the trailing fit's slope when there is one,
/// else the outstanding bytes over the whole window.
pub fn growth_rate(fit: Option<Fit>, over_window: f64) -> f64 {
    match fit {
        Some(f) if f.slope_per_s.is_finite() => f.slope_per_s,
        _ => over_window,
    }
}

impl SiteStats {
    pub fn figures(&self) -> RankFigures {
        RankFigures {
            growth_bytes_per_s: growth_rate(self.fit, self.growth_bytes_per_s),
            outstanding_bytes: self.outstanding_bytes,
            peak_bytes: self.peak_bytes,
            calls: self.allocated_count,
            temporary: self.temporary_count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_process(stack_id: u64, tgid: u32, bytes: u64, growing: bool) -> SiteStats {
        SiteStats {
            key: SiteKey { stack_id, kind: AllocKind::Malloc as u32, tgid },
            kind: Some(AllocKind::Malloc),
            outstanding_bytes: bytes,
            outstanding_count: bytes / 100,
            allocated_bytes: bytes,
            allocated_count: bytes / 100,
            freed_bytes: 0,
            freed_count: 0,
            interval_allocs: 1,
            interval_frees: 0,
            growth_bytes_per_s: bytes as f64 / 10.0,
            oldest_age_s: Some(bytes as f64 / 1000.0),
            peak_bytes: bytes,
            peak_count: bytes / 100,
            temporary_count: 0,
            trend: if growing { Trend::Growing } else { Trend::Stable },
            fit: growing.then_some(Fit {
                slope_per_s: bytes as f64 / 10.0,
                r2: 0.9,
                rising_fraction: 1.0,
                change: bytes as f64,
                points: 10,
                span_s: 10.0,
                last: bytes as f64,
            }),
        }
    }

    /// One stack in three workers is one site with their sums, growing if any grows; a stack
    /// of one process stays as it is.
    #[test]
    fn the_same_stack_in_several_processes_merges_per_build() {
        let sites = vec![
            in_process(7, 11, 1000, true),
            in_process(7, 12, 3000, false),
            in_process(7, 13, 2000, true),
            in_process(9, 12, 500, false),
        ];
        let merged = merge_processes(&sites);
        assert_eq!(merged.len(), 2);
        let m = merged.iter().find(|s| s.key.stack_id == 7).unwrap();
        assert_eq!(
            (m.key.tgid, m.outstanding_bytes, m.outstanding_count, m.interval_allocs),
            (0, 6000, 60, 3)
        );
        assert_eq!((m.growth_bytes_per_s, m.trend, m.oldest_age_s), (600.0, Trend::Growing, Some(3.0)));
        assert_eq!(m.fit.map(|f| f.slope_per_s), Some(300.0), "the growing members' slopes summed");
        let alone = merged.iter().find(|s| s.key.stack_id == 9).unwrap();
        assert_eq!(alone, &sites[3], "a site of one process is kept as it is");
    }

    fn key(id: u64) -> SiteKey {
        SiteKey { stack_id: id, kind: AllocKind::Malloc as u32, tgid: 0 }
    }

    fn counters(ac: u64, ab: u64, fc: u64, fb: u64) -> SiteCounters {
        SiteCounters {
            alloc_count: ac,
            alloc_bytes: ab,
            free_count: fc,
            free_bytes: fb,
            ..Default::default()
        }
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn outstanding_and_growth_over_window() {
        let mut t = Tracker::new(10 * S, 0);
        t.ingest(Sample {
            at_ns: 15 * S,
            sites: vec![(key(1), counters(10, 1000, 0, 0)), (key(2), counters(100, 6400, 100, 6400))],
            ..Default::default()
        });
        t.ingest(Sample {
            at_ns: 20 * S,
            sites: vec![(key(1), counters(20, 2000, 0, 0)), (key(2), counters(300, 19200, 300, 19200))],
            ..Default::default()
        });
        let sites = t.sites();
        assert_eq!(sites[0].key, key(1));
        assert_eq!(sites[0].outstanding_bytes, 2000);
        assert_eq!(sites[0].outstanding_count, 20);
        assert_eq!(sites[0].interval_allocs, 10);
        assert!((sites[0].growth_bytes_per_s - 200.0).abs() < 1e-9);
        // Churn: everything freed, no growth.
        assert_eq!(sites[1].outstanding_bytes, 0);
        assert_eq!(sites[1].growth_bytes_per_s, 0.0);
        assert_eq!(sites[1].interval_allocs, 200);
        assert_eq!(sites[1].interval_frees, 200);
        let totals = t.totals();
        assert_eq!(totals.outstanding_bytes, 2000);
        assert_eq!(totals.growing_sites, 1);
        assert!((t.window_s() - 10.0).abs() < 1e-9);
    }

    #[test]
    fn min_age_uses_live_map_figures_and_ages() {
        let mut t = Tracker::new(0, 5 * S);
        let mut live = HashMap::new();
        live.insert(key(1), LiveSummary { oldest_ns: 2 * S, aged_count: 3, aged_bytes: 300 });
        t.ingest(Sample {
            at_ns: 10 * S,
            sites: vec![(key(1), counters(5, 500, 0, 0))],
            live,
            ..Default::default()
        });
        let s = &t.sites()[0];
        assert_eq!((s.outstanding_count, s.outstanding_bytes), (3, 300));
        assert_eq!(s.oldest_age_s, Some(8.0));
    }

    #[test]
    fn drops_are_summed_and_info_counters_are_not_drops() {
        let mut c = Counters::default();
        c.0[counter::UNKNOWN_FREE as usize] = 7;
        c.0[counter::ALLOC_CALLS as usize] = 100;
        assert_eq!(total_drops(&c), 0);
        c.0[counter::LIVE_MAP_FULL as usize] = 2;
        c.0[counter::MISSED_RETURN as usize] = 1;
        assert_eq!(total_drops(&c), 3);
    }

    #[test]
    fn hit_rates_per_interval() {
        let mut t = Tracker::new(0, 0);
        let with_hits = |at_ns: u64, allocs: u64, frees: u64| {
            let mut c = Counters::default();
            c.0[counter::ALLOC_CALLS as usize] = allocs;
            c.0[counter::FREE_CALLS as usize] = frees;
            Sample { at_ns, counters: c, ..Default::default() }
        };
        t.ingest(with_hits(2 * S, 1000, 1000));
        assert_eq!(t.last_hit_rate(), 1000.0);
        t.ingest(with_hits(3 * S, 11_000, 11_000));
        assert_eq!(t.last_hit_rate(), 20_000.0);
        t.ingest(with_hits(4 * S, 11_000, 11_000));
        assert_eq!(t.last_hit_rate(), 0.0);
        assert_eq!(t.peak_hit_rate(), 20_000.0);
        assert_eq!(t.mean_hit_rate(), 22_000.0 / 4.0);
    }

    #[test]
    fn free_counts_above_allocs_never_underflow() {
        let mut t = Tracker::new(0, 0);
        t.ingest(Sample { at_ns: S, sites: vec![(key(1), counters(1, 10, 2, 20))], ..Default::default() });
        assert_eq!(t.sites()[0].outstanding_bytes, 0);
    }

    #[test]
    fn timeline_and_trend_from_samples() {
        let mut t = Tracker::new(0, 0);
        let mut calls = Counters::default();
        for i in 1..=8u64 {
            calls.0[counter::ALLOC_CALLS as usize] = 100 * i;
            t.ingest(Sample {
                at_ns: i * S,
                sites: vec![(key(1), counters(10 * i, 10_000 * i, 0, 0))],
                counters: calls,
                memory: Some(ProcMemory { rss: (8 << 20) + 12_000 * i, anon: 1 << 19, file: 1 << 19 }),
                ..Default::default()
            });
        }
        // The final reading lands 1 ms after the last tick: no extra point, no rate spike.
        calls.0[counter::ALLOC_CALLS as usize] += 50;
        t.ingest(Sample {
            at_ns: 8 * S + 1_000_000,
            sites: vec![(key(1), counters(85, 85_000, 0, 0))],
            counters: calls,
            ..Default::default()
        });
        let tl = t.timeline();
        assert_eq!(tl.heap.points().len(), 8);
        assert_eq!(tl.heap.last(), Some(80_000.0));
        assert!(tl.alloc_rate.points().iter().all(|p| p.1 == 100.0), "{:?}", tl.alloc_rate.points());
        assert_eq!(t.peak_hit_rate(), 100.0);
        let site = &t.sites()[0];
        assert_eq!(site.outstanding_bytes, 85_000, "totals still take the final reading");
        assert_eq!(site.trend, Trend::Growing);
        assert!((site.fit.unwrap().slope_per_s - 10_000.0).abs() < 1e-6);
        assert_eq!(t.verdict().0, RunVerdict::Leak);
    }

    #[test]
    fn ended_sites_are_idle_and_empty_and_eviction_keeps_totals() {
        let mut t = Tracker::new(0, 0);
        let s = |at_s: u64, sites: Vec<(SiteKey, SiteCounters)>| Sample {
            at_ns: at_s * 1_000_000_000,
            sites,
            ..Default::default()
        };
        // Site 1: allocated and freed at 1 s, then idle. Site 2: still holds a block.
        // Site 3: empty but still busy.
        for at in 1..=10 {
            let busy = counters(at, at * 10, at, at * 10);
            t.ingest(s(
                at,
                vec![(key(1), counters(5, 50, 5, 50)), (key(2), counters(2, 20, 1, 10)), (key(3), busy)],
            ));
        }
        let ended = t.ended_sites(5_000_000_000);
        assert_eq!(ended, vec![(key(1), counters(5, 50, 5, 50))]);
        assert!(t.ended_sites(60_000_000_000).is_empty(), "not idle for a minute yet");
        t.evict(&[key(1)]);
        assert_eq!(t.sites().len(), 2);
        let in_use = t.stacks_in_use();
        assert!(!in_use.contains(&1) && in_use.contains(&2));
        assert_eq!(
            t.evicted(),
            Evicted { sites: 1, allocated_bytes: 50, allocated_count: 5, freed_bytes: 50, freed_count: 5 }
        );
        // Seen again (its kernel entry recreated from zero): a new site.
        t.ingest(s(11, vec![(key(1), counters(1, 8, 0, 0)), (key(2), counters(2, 20, 1, 10))]));
        let again = t.sites().into_iter().find(|x| x.key == key(1)).unwrap();
        assert_eq!((again.outstanding_bytes, again.allocated_count), (8, 1));
    }

    #[test]
    fn counters_are_64_bit_and_do_not_wrap() {
        // Sums far beyond 32 bits (an hour at 10M allocations/s of 4 KiB blocks).
        let (n, bytes) = (36_000_000_000u64, 36_000_000_000u64 * 4096);
        let mut t = Tracker::new(0, 0);
        t.ingest(Sample {
            at_ns: S,
            sites: vec![(key(1), counters(n, bytes, n - 7, bytes - 7 * 4096))],
            ..Default::default()
        });
        let s = &t.sites()[0];
        assert_eq!((s.allocated_count, s.allocated_bytes), (n, bytes));
        assert_eq!((s.outstanding_count, s.outstanding_bytes), (7, 7 * 4096));
        // The kernel-side fields are u64 too.
        let c = SiteCounters::default();
        let _: [u64; 4] = [c.alloc_count, c.alloc_bytes, c.free_count, c.free_bytes];
    }

    #[test]
    fn rankings_order_by_their_figure_and_cycle() {
        let f = |g: f64, out: u64, peak: u64, calls: u64, temp: u64| RankFigures {
            growth_bytes_per_s: g,
            outstanding_bytes: out,
            peak_bytes: peak,
            calls,
            temporary: temp,
        };
        let items = [f(5.0, 10, 100, 3, 0), f(1.0, 50, 60, 9, 7), f(9.0, 20, 20, 1, 2)];
        let order = |by: SortBy| {
            let mut v: Vec<usize> = (0..items.len()).collect();
            by.sort(&mut v, |i| items[*i]);
            v
        };
        assert_eq!(order(SortBy::Growth), [2, 0, 1]);
        assert_eq!(order(SortBy::Outstanding), [1, 2, 0]);
        assert_eq!(order(SortBy::Peak), [0, 1, 2]);
        assert_eq!(order(SortBy::Calls), [1, 0, 2]);
        assert_eq!(order(SortBy::Temporary), [1, 2, 0]);
        let mut s = SortBy::Growth;
        let names: Vec<&str> = (0..6)
            .map(|_| {
                let n = s.name();
                s = s.next();
                n
            })
            .collect();
        assert_eq!(names, ["growth", "outstanding", "peak", "calls", "temporary", "growth"]);
    }
}
