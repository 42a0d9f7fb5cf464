//! The session's side of the reachability scan: the kernel's live blocks in, the report's
//! per-site classes, holders and cycles out.

use std::collections::HashMap;

use anyhow::Context as _;
use leakprobe_common::{AllocKind, COUNT_SCALE, LiveBlock, SiteKey};

use super::{StackCache, site_frames};
use crate::{
    kernel::probe::Probes,
    report::scan::{
        Census, CensusGroup, ClassTally, Cycle, CycleSite, Holder, Reachability, Scan, ScanPoint, SiteResult,
    },
    scan::{self, mark},
    symbolize::Symbolizer,
};

/// One scan's results, ready for the report.
#[derive(Clone)]
pub struct Done {
    pub scan: Scan,
    pub sites: Vec<SiteResult>,
}

/// The blocks to classify: every tracked heap block (mmap regions are roots, not blocks, as in
/// valgrind). A stale entry overlapping a newer block at the same place (its free went
/// unseen) is dropped.
fn blocks(live: Vec<(u64, LiveBlock)>) -> (Vec<mark::Block>, Vec<LiveBlock>, Vec<SiteKey>, u64) {
    let mut live: Vec<(u64, LiveBlock)> =
        live.into_iter().filter(|(_, b)| AllocKind::from_u32(b.kind) != Some(AllocKind::Mmap)).collect();
    live.sort_unstable_by_key(|(a, _)| *a);
    let mut kept: Vec<(u64, LiveBlock)> = Vec::with_capacity(live.len());
    let mut stale = 0;
    for (addr, b) in live {
        if let Some((last_addr, last)) = kept.last_mut()
            && addr < *last_addr + last.size.max(1)
        {
            stale += 1;
            if b.timestamp_ns > last.timestamp_ns {
                *last_addr = addr;
                *last = b;
            }
            continue;
        }
        kept.push((addr, b));
    }
    let mut keys: Vec<SiteKey> = Vec::new();
    let mut index: HashMap<SiteKey, u32> = HashMap::new();
    let mut out = Vec::with_capacity(kept.len());
    let mut weights = Vec::with_capacity(kept.len());
    for (addr, b) in kept {
        let key = SiteKey { stack_id: b.stack_id, kind: b.kind, tgid: b.tgid };
        let site = *index.entry(key).or_insert_with(|| {
            keys.push(key);
            (keys.len() - 1) as u32
        });
        out.push(mark::Block { start: addr, size: b.size, site });
        weights.push(b);
    }
    (out, weights, keys, stale)
}

/// A site in a few words: its allocation function and the innermost frame that is the
/// program's own (not the allocator's, not the C++ library's plumbing).
pub fn site_label(key: &SiteKey, stacks: &StackCache, symbolizer: &mut Symbolizer) -> String {
    let func = AllocKind::from_u32(key.kind).map_or("alloc", |k| k.name());
    let (frames, _) = site_frames(key, stacks, symbolizer);
    // A Python site: its innermost Python line.
    if let Some(f) = frames.iter().find(|f| f.runtime.is_some()) {
        let file = f.file.as_deref().map_or("?", |p| p.rsplit('/').next().unwrap_or(p));
        let line = f.line.map_or_else(String::new, |l| format!(":{l}"));
        return format!("{func} in {} ({file}{line})", f.function.as_deref().unwrap_or("?"));
    }
    let plumbing = |f: &str| {
        f.starts_with("std::")
            || f.starts_with("__gnu_cxx::")
            || f.starts_with("operator new")
            || f.starts_with("alloc::")
            || f.starts_with("__rust")
            || f.contains("malloc")
    };
    let caller = frames
        .iter()
        .filter_map(|f| f.function.as_deref())
        .find(|f| !plumbing(f))
        .or_else(|| frames.first().and_then(|f| f.function.as_deref()))
        .unwrap_or("?");
    format!("{func} in {caller}")
}

/// What a scan of the session's target needs besides the probes.
#[derive(Clone)]
pub struct Setup {
    pub pid: i32,
    /// Our own memory in the target (never a root).
    pub exclude: Vec<(u64, u64)>,
    pub max_pause: std::time::Duration,
    /// The target's malloc is glibc's: chunk headers in blocks' tails.
    pub glibc: bool,
    /// Walk the glibc heap: untracked chunks (from before attach) become blocks.
    pub census: Option<scan::census::GlibcVersion>,
    /// Code ranges of functions the target stops itself at (exit()).
    pub function_entries: Vec<(u64, u64)>,
    /// The allocator's module, as the target maps it.
    pub allocator_module: Option<String>,
    /// `--backrefs TYPE`.
    pub backrefs: Option<String>,
    /// The session's CPython addresses hold in this process (the first, or forked from it):
    /// its Python objects are counted too.
    pub python_objects: bool,
}

fn blocks_word(n: u64) -> &'static str {
    if n == 1 { "block" } else { "blocks" }
}

/// Holders that read the same (several objects from before attach that one global reaches)
/// are one holder: their blocks and bytes added, most bytes first.
fn merge_same_holders(holders: Vec<Holder>) -> Vec<Holder> {
    let mut out: Vec<Holder> = Vec::with_capacity(holders.len());
    for h in holders {
        match out.iter_mut().find(|o| o.kind == h.kind && o.holder == h.holder) {
            Some(o) => {
                o.blocks += h.blocks;
                o.bytes += h.bytes;
                o.chain = o.chain.max(h.chain);
            }
            None => out.push(h),
        }
    }
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(b.blocks.cmp(&a.blocks)));
    out
}

/// A root holder in the report's words (kind, name); a stack slot names the function whose
/// frame holds it.
fn root_name(out: &scan::Outcome, r: mark::RootRef, symbolizer: &mut Symbolizer) -> (String, String) {
    match out.holders.get(&r) {
        Some(n) => {
            let func =
                n.frame_ip.and_then(|ip| symbolizer.symbolize(&[ip]).into_iter().find_map(|f| f.function));
            let name = match func {
                Some(f) => format!("{}, in {f}", n.name),
                None => n.name.clone(),
            };
            (n.kind.to_string(), name)
        }
        None => ("root".to_string(), format!("root {}", r.root)),
    }
}

/// A scan and the tracked blocks it classified (with their weights and call sites).
struct Scanned {
    out: scan::Outcome,
    tracked_blocks: Vec<mark::Block>,
    weights: Vec<LiveBlock>,
    keys: Vec<SiteKey>,
}

/// Stops the target for its picture, reads the tracker as it was at that instant (the scan's
/// window in the kernel), and marks.
fn scan_at_stop(
    setup: &Setup,
    probes: &mut Probes,
    python: Option<crate::runtimes::cpython::objects::Target>,
) -> anyhow::Result<Scanned> {
    let req = scan::Request {
        pid: setup.pid,
        exclude: setup.exclude.clone(),
        max_pause: setup.max_pause,
        no_clone: false,
        function_entries: setup.function_entries.clone(),
        allocator_tail: setup.glibc.then_some(scan::glibc_next_chunk as fn(u64, u64) -> Option<u64>),
        census: setup.census,
        allocator_module: setup.allocator_module.clone(),
        hold_after_capture: super::test_hook("LEAKPROBE_TEST_SCAN_HOLD_MS"),
        python,
        backrefs: setup.backrefs.clone(),
    };
    probes.open_scan_window().context("opening the scan's window in the tracker")?;
    let captured = match scan::Captured::take(&req) {
        Ok(c) => c,
        Err(e) => {
            let _ = probes.close_scan_window();
            return Err(e.into());
        }
    };
    let at_ns = captured.stopped_at_ns();
    let live = probes
        .narrow_scan_window(at_ns)
        .and_then(|()| probes.live_blocks_at(setup.pid as u32, at_ns))
        .context("reading the tracked blocks as they were at the stop");
    let (live, put_back) = match live {
        Ok(l) => l,
        Err(e) => {
            let _ = probes.close_scan_window();
            return Err(e);
        }
    };
    if put_back > 0 {
        tracing::info!("{put_back} blocks freed since the stop were put back into the scan's picture");
    }
    let (blocks, weights, keys, stale) = blocks(live);
    if stale > 0 {
        tracing::info!("{stale} stale tracked blocks overlapped newer ones and were left out of the scan");
    }
    let tracked_blocks = blocks.clone();
    let out = captured.mark(scan::Tracked { blocks, first_group: keys.len() as u32 })?;
    Ok(Scanned { out, tracked_blocks, weights, keys })
}

/// Scans the target now and turns the result into report pieces. The tracked blocks are
/// those live at the instant the target stopped: the kernel keeps what is freed while the
/// scan's window is open, so a block allocated or freed just before the stop is seen as the
/// stopped target had it, however long reading the tracker takes.
pub fn run(
    setup: &Setup,
    probes: &mut Probes,
    at_s: f64,
    history: &mut Vec<ScanPoint>,
    stacks: &StackCache,
    symbolizer: &mut Symbolizer,
) -> anyhow::Result<Done> {
    let python =
        stacks.python.as_ref().filter(|_| setup.python_objects).and_then(|p| p.names.objects_target());
    let Scanned { out, tracked_blocks, weights, keys } = scan_at_stop(setup, probes, python)?;
    let m = &out.marking;
    if tracing::enabled!(tracing::Level::TRACE) {
        for (o, b) in m.blocks.iter().zip(&out.blocks) {
            tracing::trace!(
                "scan: block {:#x}+{} {:?} retained by {:?}",
                b.start,
                b.size,
                o.class,
                o.retainer
            );
        }
    }
    let tallies = Tallies::of(m, &tracked_blocks, &weights, keys.len());
    let mut names = Names::new(&out, &keys, stacks, symbolizer);
    let (cycles, cycle_bytes) = names.cycles(&tallies);
    let (results, census_groups) = names.sites(&tallies, &cycle_bytes);

    let mut roots: std::collections::BTreeMap<String, u64> =
        out.root_bytes.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    roots.insert("registers".into(), m.stats.root_values);
    let totals = tallies.totals;
    let census = out.census.as_ref().map(|c| {
        let mut origin_label = |site: u32| names.label(site);
        census_summary(c, census_groups, &tracked_blocks, &mut origin_label)
    });
    let mut scan = Scan {
        at_s,
        method: out.method.name().into(),
        no_clone_why: out.no_clone_why.clone(),
        pause_ms: out.pause.as_secs_f64() * 1e3,
        reap_pause_ms: out.reap_pause.as_secs_f64() * 1e3,
        duration_ms: out.duration.as_secs_f64() * 1e3,
        threads: out.threads as u64,
        bytes_read: m.stats.bytes_read,
        blocks_scanned: m.stats.blocks,
        roots,
        unreadable_bytes: m.stats.unreadable_bytes + out.unread_bytes,
        totals,
        cycles,
        cycles_rest: m.cycles.rest.count,
        cycles_complete: m.cycles.complete,
        history: Vec::new(),
        census,
        python_objects: out.python.as_ref().map(|c| python_report(c, &mut names, setup)),
        processes: Vec::new(),
    };
    push_bounded(history, scan.point());
    scan.history = history.clone();
    Ok(Done { scan, sites: results })
}

/// Scans several processes one at a time (each one stopped on its own, within the pause
/// bound) and merges what they found; a process that cannot be scanned is named with why.
/// `between(pid, before)` is called before and after each one's scan (the follower lets go
/// of it and takes it back).
pub fn run_each(
    setups: Vec<Setup>,
    probes: &mut Probes,
    at_s: f64,
    history: &mut Vec<ScanPoint>,
    stacks: &StackCache,
    symbolizer: &mut Symbolizer,
    mut between: impl FnMut(u32, bool),
) -> anyhow::Result<Done> {
    let n = setups.len();
    let mut parts = Vec::with_capacity(n);
    let mut sites = Vec::new();
    for (i, setup) in setups.iter().enumerate() {
        let pid = setup.pid as u32;
        crate::progress::spinner(format!("scanning PID {pid}'s memory for pointers ({} of {n})", i + 1));
        between(pid, true);
        let mut own = Vec::new();
        let done = run(setup, probes, at_s, &mut own, stacks, symbolizer);
        between(pid, false);
        crate::progress::done();
        parts.push((
            pid,
            done.map(|d| {
                sites.extend(d.sites);
                d.scan
            })
            .map_err(|e| format!("{e:#}")),
        ));
    }
    let failed: Vec<String> =
        parts.iter().filter_map(|(pid, p)| p.as_ref().err().map(|e| format!("PID {pid}: {e}"))).collect();
    let Some(mut scan) = Scan::merged(at_s, parts) else {
        anyhow::bail!("no process could be scanned: {}", failed.join("; "));
    };
    push_bounded(history, scan.point());
    scan.history = history.clone();
    Ok(Done { scan, sites })
}

/// Scans every minute for days: the history stays bounded like every other series (the
/// newest point and every other older one).
fn push_bounded(history: &mut Vec<ScanPoint>, point: ScanPoint) {
    if history.len() >= crate::model::trend::MAX_POINTS {
        let mut i = 0;
        history.retain(|_| {
            i += 1;
            i % 2 == 1
        });
    }
    history.push(point);
}

/// Classes per tracked site, weighted (an estimate per block when sampling), and in all.
struct Tallies {
    per_site: Vec<Reachability>,
    /// The raw bytes of each site's blocks that the scan classified.
    raw_bytes: Vec<u64>,
    totals: Reachability,
}

impl Tallies {
    fn of(m: &mark::Marking, blocks: &[mark::Block], weights: &[LiveBlock], sites: usize) -> Tallies {
        let mut t = Tallies {
            per_site: vec![Reachability::default(); sites],
            raw_bytes: vec![0u64; sites],
            totals: Reachability::default(),
        };
        for ((o, b), w) in m.blocks.iter().zip(blocks).zip(weights) {
            let r = &mut t.per_site[b.site as usize];
            t.raw_bytes[b.site as usize] += b.size;
            let (bytes, count) = (w.weight_bytes, w.weight_count);
            let (site_class, total_class) = match o.class {
                mark::Class::DefinitelyLost => (&mut r.definitely_lost, &mut t.totals.definitely_lost),
                mark::Class::IndirectlyLost => (&mut r.indirectly_lost, &mut t.totals.indirectly_lost),
                mark::Class::PossiblyLost => (&mut r.possibly_lost, &mut t.totals.possibly_lost),
                mark::Class::Reachable => (&mut r.reachable, &mut t.totals.reachable),
            };
            site_class.add(bytes, count);
            total_class.add(bytes, count);
        }
        // Counts were summed in 1/COUNT_SCALE units.
        let unscale = |r: &mut Reachability| {
            for c in [&mut r.definitely_lost, &mut r.indirectly_lost, &mut r.possibly_lost, &mut r.reachable]
            {
                c.count = c.count.div_ceil(COUNT_SCALE);
            }
        };
        t.per_site.iter_mut().for_each(unscale);
        unscale(&mut t.totals);
        t
    }

    /// What `raw` bytes of `site`'s blocks stand for, estimated; a census group's (a site id
    /// past the tracked ones) are exact.
    fn weighted(&self, site: u32, raw: u64) -> u64 {
        let i = site as usize;
        let (Some(r), Some(&all)) = (self.per_site.get(i), self.raw_bytes.get(i)) else { return raw };
        let est = r.lost_bytes() + r.possibly_lost.bytes + r.reachable.bytes;
        if all == 0 { raw } else { (raw as f64 * est as f64 / all as f64).round() as u64 }
    }
}

/// Names for what the marking found: sites (tracked, or the census's groups of untracked
/// blocks, whose ids come after the tracked ones), roots, and chains between them.
struct Names<'a> {
    out: &'a scan::Outcome,
    keys: &'a [SiteKey],
    groups: &'a [scan::GroupKey],
    stacks: &'a StackCache,
    symbolizer: &'a mut Symbolizer,
    labels: HashMap<u32, String>,
    /// Each site's first holder and its reachable blocks: a site held by another site's
    /// blocks is shown through them to the root.
    first: HashMap<u32, (mark::HeldBy, u64)>,
}

impl<'a> Names<'a> {
    fn new(
        out: &'a scan::Outcome,
        keys: &'a [SiteKey],
        stacks: &'a StackCache,
        symbolizer: &'a mut Symbolizer,
    ) -> Self {
        let first = out
            .marking
            .sites
            .iter()
            .filter_map(|s| Some((s.site, (s.holders.first()?.by, s.tallies.reachable.blocks))))
            .collect();
        Names { out, keys, groups: &out.groups, stacks, symbolizer, labels: HashMap::new(), first }
    }

    fn group_of(&self, site: u32) -> Option<&'a scan::GroupKey> {
        let groups: &'a [scan::GroupKey] = self.groups;
        site.checked_sub(self.keys.len() as u32).and_then(|g| groups.get(g as usize))
    }

    fn label(&mut self, site: u32) -> String {
        if let Some(l) = self.labels.get(&site) {
            return l.clone();
        }
        let l = match self.keys.get(site as usize) {
            Some(key) => site_label(key, self.stacks, self.symbolizer),
            None => self.group_of(site).map_or_else(|| "?".into(), |g| format!("{g} from before attach")),
        };
        self.labels.insert(site, l.clone());
        l
    }

    fn stack_of(&self, site: u32) -> String {
        self.keys.get(site as usize).map_or_else(String::new, |k| format!("{:016x}", k.stack_id))
    }

    fn describe(&mut self, site: u32, blocks: u64) -> String {
        match self.group_of(site) {
            Some(scan::GroupKey::Size(n)) => {
                format!("{blocks} {n}-byte {} from before attach", blocks_word(blocks))
            }
            Some(g) => format!("{blocks} {} of {g} from before attach", blocks_word(blocks)),
            None => {
                let (label, stack) = (self.label(site), self.stack_of(site));
                format!("{blocks} {} of {label} (stack {stack})", blocks_word(blocks))
            }
        }
    }

    fn root(&mut self, r: mark::RootRef) -> (String, String) {
        root_name(self.out, r, self.symbolizer)
    }

    /// A site held by `other`'s blocks: up the other sites' first holders to a root, root
    /// first ("global queue (app) -> 12000 16-byte blocks from before attach -> ..."). Bounded;
    /// a loop stops it.
    fn chain_from(&mut self, site: u32, other: u32) -> String {
        let mut parts = Vec::new();
        let mut seen = vec![site];
        let mut cur = other;
        loop {
            let (by, n) = self.first.get(&cur).copied().unwrap_or((mark::HeldBy::Site(cur), 0));
            parts.push(self.describe(cur, n));
            seen.push(cur);
            match by {
                mark::HeldBy::Root(r) => {
                    parts.push(self.root(r).1);
                    break;
                }
                mark::HeldBy::Site(next) if !seen.contains(&next) && parts.len() < 8 => cur = next,
                mark::HeldBy::Site(_) => break,
            }
        }
        parts.reverse();
        parts.join(" -> ")
    }

    /// The marking's cycles in the report's words, and each tracked site's bytes in them.
    fn cycles(&mut self, tallies: &Tallies) -> (Vec<Cycle>, Vec<u64>) {
        let m = &self.out.marking;
        let mut cycle_bytes = vec![0u64; self.keys.len()];
        let mut cycles = Vec::new();
        for c in &m.cycles.list {
            let mut sites = Vec::new();
            let mut bytes = 0;
            for s in &c.sites {
                let est = tallies.weighted(s.site, s.bytes);
                if let Some(b) = cycle_bytes.get_mut(s.site as usize) {
                    *b += est;
                }
                bytes += est;
                sites.push(CycleSite {
                    stack_id: self.stack_of(s.site),
                    site: self.label(s.site),
                    blocks: s.blocks,
                });
            }
            cycles.push(Cycle { blocks: c.blocks, bytes, sites });
        }
        (cycles, cycle_bytes)
    }

    /// Whether the blocks of `site` are Python objects.
    fn is_python_object(&self, site: u32) -> bool {
        matches!(self.group_of(site), Some(scan::GroupKey::Python(_)))
            || self.out.python_heap.as_ref().is_some_and(|p| p.tracked_types.contains_key(&site))
    }

    /// A step of a Python path: a Python object by its type (and where it was allocated, if
    /// tracked), anything else as [`Self::describe`] has it.
    fn python_step(&mut self, site: u32, run: u64) -> String {
        if let Some(scan::GroupKey::Python(t)) = self.group_of(site) {
            return if run > 1 { format!("{t} (a chain of {run})") } else { t.clone() };
        }
        let ty = self.out.python_heap.as_ref().and_then(|p| p.tracked_types.get(&site).cloned());
        match ty {
            Some(t) => format!("{t} ({})", self.label(site)),
            None => self.describe(site, run),
        }
    }

    /// The path from a root to block `example`, root first, in Python's terms: the actual
    /// retainers of that block (not each site's main holder), runs of one site as one step,
    /// an object's separate storage (a dict's keys, a list's items) left out. `None` when the
    /// path does not end at a root.
    fn python_path(&mut self, example: usize) -> Option<(String, String)> {
        let (chain, root) = scan::retainers(&self.out.marking, example);
        let mut steps: Vec<(u32, u64)> = Vec::new();
        for &index in &chain {
            let site = self.out.blocks.get(index)?.site;
            match steps.last_mut() {
                Some((last, n)) if *last == site => *n += 1,
                _ => steps.push((site, 1)),
            }
        }
        let (kind, root_name) = self.root(root?);
        if tracing::enabled!(tracing::Level::DEBUG) {
            self.debug_path(example, &root_name, &steps, &chain);
        }
        let mut parts = vec![root_name];
        // After a Python root, its value is the first step: the root's name says what it is.
        let mut after_object = kind == "python";
        let mut skip_first = kind == "python";
        for (site, run) in steps.into_iter().rev() {
            if std::mem::take(&mut skip_first) && run == 1 {
                continue;
            }
            let object = self.is_python_object(site);
            if !object && after_object {
                continue;
            }
            after_object = object;
            parts.push(self.python_step(site, run));
        }
        Some((kind, parts.join(" -> ")))
    }

    /// `-vv`: a holder's path as it was found, every step and where each pointer sits.
    fn debug_path(&mut self, example: usize, root: &str, steps: &[(u32, u64)], chain: &[usize]) {
        let raw: Vec<String> = steps.iter().rev().map(|&(s, n)| format!("{} x{n}", self.label(s))).collect();
        let at: Vec<String> = chain
            .iter()
            .take(20)
            .map(|&i| format!("{:#x} (size {})", self.out.blocks[i].start, self.out.blocks[i].size))
            .collect();
        tracing::debug!("path of block {example}: {root} -> {} [{}]", raw.join(" -> "), at.join(" <- "));
    }

    /// The marking's cycles that hold Python objects, by the objects' make-up (their storage
    /// left out of it), most cycles first.
    fn python_cycles(&mut self) -> Vec<crate::report::scan::PythonCycle> {
        use crate::report::scan::{PythonCycle, PythonCycleObjects};
        let mut by: Vec<PythonCycle> = Vec::new();
        for shape in &self.out.marking.cycles.shapes {
            let mut objects: Vec<PythonCycleObjects> = Vec::new();
            for &(site, n) in &shape.sites {
                let (ty, allocated) = match self.group_of(site) {
                    Some(scan::GroupKey::Python(t)) => (t.clone(), "from before attach".to_string()),
                    _ => {
                        match self.out.python_heap.as_ref().and_then(|p| p.tracked_types.get(&site).cloned())
                        {
                            Some(t) => (t, self.label(site)),
                            None => continue,
                        }
                    }
                };
                objects.push(PythonCycleObjects { r#type: ty, count: n, allocated });
            }
            if objects.is_empty() {
                continue;
            }
            objects.sort_by(|a, b| b.count.cmp(&a.count).then(a.r#type.cmp(&b.r#type)));
            match by.iter_mut().find(|c| c.objects == objects) {
                Some(c) => {
                    c.count += shape.count;
                    c.blocks += shape.blocks;
                    c.bytes += shape.bytes;
                }
                None => by.push(PythonCycle {
                    count: shape.count,
                    objects,
                    blocks: shape.blocks,
                    bytes: shape.bytes,
                }),
            }
        }
        by.sort_by(|a, b| b.count.cmp(&a.count).then(b.bytes.cmp(&a.bytes)));
        by
    }

    fn holders(&mut self, s: &mark::SiteSummary, tallies: &Tallies) -> Vec<Holder> {
        let python = self.out.python_heap.is_some();
        let holders = s
            .holders
            .iter()
            .map(|h| {
                let (kind, holder) = match h.by {
                    mark::HeldBy::Root(r) => self.root(r),
                    mark::HeldBy::Site(other) => {
                        match python.then(|| self.python_path(h.example)).flatten() {
                            Some(path) => path,
                            None => ("site".to_string(), self.chain_from(s.site, other)),
                        }
                    }
                };
                Holder {
                    kind,
                    holder,
                    blocks: h.blocks,
                    bytes: tallies.weighted(s.site, h.bytes),
                    chain: h.longest_chain,
                }
            })
            .collect();
        merge_same_holders(holders)
    }

    /// Each tracked site's classes and holders, and the census's groups of untracked blocks,
    /// classed from the marking's own tallies.
    fn sites(&mut self, tallies: &Tallies, cycle_bytes: &[u64]) -> (Vec<SiteResult>, Vec<CensusGroup>) {
        let m = &self.out.marking;
        let mut results = Vec::new();
        let mut census_groups = Vec::new();
        for s in &m.sites {
            let holders = self.holders(s, tallies);
            let i = s.site as usize;
            match self.keys.get(i).copied() {
                Some(key) => results.push(SiteResult {
                    stack_id: format!("{:016x}", key.stack_id),
                    function: AllocKind::from_u32(key.kind)
                        .map_or_else(|| format!("kind {}", key.kind), |k| k.name().into()),
                    reachability: tallies.per_site[i],
                    holders,
                    cycle_bytes: cycle_bytes[i],
                    pid: key.tgid,
                }),
                None => {
                    let Some(g) = self.group_of(s.site) else { continue };
                    let t = &s.tallies;
                    let tally = |x: mark::Tally| ClassTally { bytes: x.bytes, count: x.blocks };
                    census_groups.push(CensusGroup {
                        group: g.to_string(),
                        kind: if matches!(g, scan::GroupKey::Type(_)) { "type" } else { "size" }.into(),
                        reachability: Reachability {
                            definitely_lost: tally(t.definitely_lost),
                            indirectly_lost: tally(t.indirectly_lost),
                            possibly_lost: tally(t.possibly_lost),
                            reachable: tally(t.reachable),
                        },
                        held_by: holders,
                        likely_origin: None,
                    });
                }
            }
        }
        (results, census_groups)
    }
}

/// The census in the report: the heap's totals, the untracked blocks by class, and the
/// groups, each joined to a tracked call site that allocates the same type or size now.
fn census_summary(
    c: &scan::CensusResult,
    mut groups: Vec<CensusGroup>,
    tracked: &[mark::Block],
    label: &mut dyn FnMut(u32) -> String,
) -> Census {
    let t = &c.totals;
    let tally = |x: scan::census::Tally| ClassTally { bytes: x.bytes, count: x.count };
    let mut untracked = Reachability::default();
    for g in &groups {
        untracked.add(&g.reachability);
    }
    // Usable size of a glibc chunk for a request of `n` bytes.
    let usable = |n: u64| ((n + 8 + 15) & !15).max(32) - 8;
    let mut by_size: HashMap<u64, HashMap<u32, u64>> = HashMap::new();
    for b in tracked {
        *by_size.entry(usable(b.size)).or_default().entry(b.site).or_default() += 1;
    }
    let most = |m: &HashMap<u32, u64>| {
        m.iter().max_by_key(|(site, n)| (**n, std::cmp::Reverse(**site))).map(|(s, _)| *s)
    };
    for g in groups.iter_mut() {
        let origin = if g.kind == "type" {
            c.tracked_types.iter().filter(|(_, t)| **t == g.group).map(|(s, _)| *s).min()
        } else {
            g.group
                .split('-')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .and_then(|n| by_size.get(&n))
                .and_then(most)
        };
        g.likely_origin = origin.map(&mut *label);
    }
    groups.sort_by_key(|g| {
        let r = &g.reachability;
        (std::cmp::Reverse(r.lost_bytes() + r.possibly_lost.bytes), std::cmp::Reverse(r.reachable.bytes))
    });
    const LISTED: usize = 50;
    let groups_rest = groups.len().saturating_sub(LISTED) as u64;
    groups.truncate(LISTED);
    Census {
        arenas: c.arenas.len() as u64,
        arena_bytes: c
            .arenas
            .iter()
            .map(|a| a.system_bytes.unwrap_or_else(|| a.heaps.iter().map(|h| h.end - h.start).sum()))
            .sum(),
        in_use: {
            let mut x = tally(t.in_use);
            x.add(t.mmapped.bytes, t.mmapped.count);
            x
        },
        free: tally(t.free),
        cached_free: {
            let mut x = tally(t.tcache_free);
            x.add(t.fastbin_free.bytes, t.fastbin_free.count);
            x
        },
        top_bytes: t.top.bytes,
        mmapped: tally(t.mmapped),
        malloc_info_in_use_bytes: t.in_use.bytes
            + t.tcache_free.bytes
            + t.tcache_structs.bytes
            + t.overhead_bytes,
        untracked,
        groups,
        groups_rest,
        walk_errors: c.errors.iter().map(|e| e.to_string()).collect(),
        notes: c.notes.iter().map(|n| n.to_string()).collect(),
        main_arena_found: c.main_arena_found,
    }
}

/// The Python part of a scan's report: the census, its cycles, the `--backrefs` graph, and
/// each type joined to the tracked sites that make it now.
fn python_report(
    c: &Result<crate::runtimes::cpython::objects::Census, crate::runtimes::cpython::objects::ObjectsError>,
    names: &mut Names,
    setup: &Setup,
) -> crate::report::scan::PythonObjects {
    let out = names.out;
    let mut p = python_objects(c);
    if let Ok(c) = c {
        p.cycles = names.python_cycles();
        if !p.cycles.is_empty() {
            p.cycles_fate = cycles_fate(c.enabled).into();
        }
    }
    p.backrefs = setup.backrefs.as_ref().map(|t| backrefs(t, out.backrefs.as_ref()));
    if let Some(heap) = &out.python_heap {
        for t in p.types.iter_mut() {
            let name = t.label();
            let mut sites: Vec<u32> =
                heap.tracked_types.iter().filter(|(_, ty)| **ty == name).map(|(s, _)| *s).collect();
            sites.sort_unstable();
            t.sites = sites.into_iter().take(3).map(|s| names.label(s)).collect();
        }
    }
    p
}

/// The scan's backrefs graph as the report gives it.
fn backrefs(asked: &str, g: Option<&scan::python::Graph>) -> crate::report::scan::Backrefs {
    use crate::report::scan::{BackrefNode, Backrefs};
    let Some(g) = g else { return Backrefs { r#type: asked.to_string(), ..Backrefs::default() } };
    Backrefs {
        r#type: asked.to_string(),
        found: g.found,
        drawn: g.nodes.iter().filter(|n| n.target).count() as u64,
        nodes: g
            .nodes
            .iter()
            .map(|n| BackrefNode {
                label: n.label.clone(),
                kind: match (n.kind, n.target) {
                    (_, true) => "target",
                    (scan::python::NodeKind::Root(_), _) => "root",
                    _ => "object",
                }
                .into(),
            })
            .collect(),
        edges: g.edges.clone(),
    }
}

/// What becomes of cycles of Python objects, by the collector's state.
fn cycles_fate(enabled: bool) -> &'static str {
    if enabled {
        "the cycle collector is enabled: its next collection frees them (not a leak, unless they keep coming)"
    } else {
        "the cycle collector is disabled (gc.disable()): they are never freed"
    }
}

/// The CPython census as the report gives it.
fn python_objects(
    c: &Result<crate::runtimes::cpython::objects::Census, crate::runtimes::cpython::objects::ObjectsError>,
) -> crate::report::scan::PythonObjects {
    use crate::report::scan::{PythonObjects, PythonType};
    match c {
        Ok(c) => PythonObjects {
            source: if c.arenas.is_ok() { "gc lists and pymalloc arenas" } else { "gc lists" }.into(),
            objects: c.objects(),
            untracked_objects: c.arenas.as_ref().map_or(0, |a| a.objects) + c.outside_arenas,
            outside_arenas: c.outside_arenas,
            arenas_not_walked: c.arenas.as_ref().err().cloned(),
            arenas: c.arenas.as_ref().map_or(0, |a| a.walk.arenas),
            pools: c.arenas.as_ref().map_or(0, |a| a.walk.pools),
            blocks: c.arenas.as_ref().map_or(0, |a| a.walk.blocks),
            bad_pools: c.arenas.as_ref().map_or(0, |a| a.walk.bad_pools),
            bytes: c.rows.iter().map(|r| r.bytes).sum(),
            gc_enabled: c.enabled,
            generations: c.generations,
            permanent: c.permanent,
            garbage: c.garbage,
            types: c
                .rows
                .iter()
                .map(|r| PythonType {
                    module: r.name.module.clone(),
                    qualname: r.name.qualname.clone(),
                    count: r.count,
                    untracked: r.untracked,
                    bytes: r.bytes,
                    count_change: None,
                    sites: Vec::new(),
                })
                .collect(),
            ..PythonObjects::default()
        },
        Err(e) => PythonObjects {
            source: "gc lists".into(),
            error: Some(e.to_string()),
            ..PythonObjects::default()
        },
    }
}
