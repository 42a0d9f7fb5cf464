//! The reachability scan in the report: each call site's blocks by class and what holds them,
//! the scan's own figures, and the verdicts they refine. Pure.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Report;
use crate::model::trend::{Basis, RunVerdict, Trend};

/// Bytes and blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClassTally {
    pub bytes: u64,
    pub count: u64,
}

impl ClassTally {
    pub fn add(&mut self, bytes: u64, count: u64) {
        self.bytes += bytes;
        self.count += count;
    }
}

/// Blocks by valgrind's leak classes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Reachability {
    /// No pointer reaches them (the leaders of lost groups).
    pub definitely_lost: ClassTally,
    /// Reached only from definitely lost blocks.
    pub indirectly_lost: ClassTally,
    /// Reached, but only through pointers into their middle.
    pub possibly_lost: ClassTally,
    /// Reached from a root through pointers to their starts.
    pub reachable: ClassTally,
}

impl Reachability {
    pub fn lost_bytes(&self) -> u64 {
        self.definitely_lost.bytes + self.indirectly_lost.bytes
    }

    pub fn add(&mut self, other: &Reachability) {
        self.definitely_lost.add(other.definitely_lost.bytes, other.definitely_lost.count);
        self.indirectly_lost.add(other.indirectly_lost.bytes, other.indirectly_lost.count);
        self.possibly_lost.add(other.possibly_lost.bytes, other.possibly_lost.count);
        self.reachable.add(other.reachable.bytes, other.reachable.count);
    }
}

/// What holds some of a site's reachable blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Holder {
    /// "global", "stack", "register", "tls", "heap", "anonymous", "file" or "site".
    pub kind: String,
    /// e.g. `global cache_head (leaky)`, `r12 of thread 812 (worker)`, or for "site" the
    /// holding site's leaf function and stack id.
    pub holder: String,
    pub blocks: u64,
    pub bytes: u64,
    /// The longest run of this site's blocks each linked from the previous one, from the
    /// holder: 1 when it points at them all directly, 1000 for a 1000-node list.
    pub chain: u64,
}

/// A group of lost blocks that point at each other.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Cycle {
    pub blocks: u64,
    pub bytes: u64,
    /// The call sites in it, most blocks first.
    pub sites: Vec<CycleSite>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CycleSite {
    pub stack_id: String,
    /// Its allocation function and innermost caller, e.g. `operator new in make_ring`.
    pub site: String,
    pub blocks: u64,
}

/// One scan of the run, for the timeline (--scan-every).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScanPoint {
    /// Seconds since the probes went live.
    pub t_s: f64,
    pub pause_ms: f64,
    pub definitely_lost_bytes: u64,
    pub indirectly_lost_bytes: u64,
    pub possibly_lost_bytes: u64,
    pub reachable_bytes: u64,
}

/// The scan: how the picture was taken, what it cost the target, what was read.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Scan {
    /// Seconds since the probes went live.
    pub at_s: f64,
    /// "clone" (a copy-on-write snapshot forked inside the target) or "stopped-copy".
    pub method: String,
    /// Why there was no clone, for a stopped copy.
    pub no_clone_why: Option<String>,
    /// The target's pause for the capture, and for reaping the snapshot child.
    pub pause_ms: f64,
    pub reap_pause_ms: f64,
    /// The whole scan, capture to release.
    pub duration_ms: f64,
    pub threads: u64,
    /// Bytes read from the snapshot (roots and blocks).
    pub bytes_read: u64,
    /// Tracked blocks classified (the sampled ones, with --sample-bytes).
    pub blocks_scanned: u64,
    /// Root bytes by kind: stack, tls, module_data, heap, anonymous, file; and registers
    /// (values looked at).
    pub roots: BTreeMap<String, u64>,
    /// Memory that could not be read (counted, skipped): a root there could hold a block we
    /// call lost.
    pub unreadable_bytes: u64,
    pub totals: Reachability,
    /// Groups of lost blocks pointing at each other, most bytes first.
    pub cycles: Vec<Cycle>,
    /// Cycles left out of the list.
    pub cycles_rest: u64,
    /// False when the edge budget ran out: some cycles may be missing.
    pub cycles_complete: bool,
    /// Every scan of the run, oldest first.
    pub history: Vec<ScanPoint>,
    /// `--census`: the whole heap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub census: Option<Census>,
    /// A CPython target: its live objects by type, from the same picture.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python_objects: Option<PythonObjects>,
    /// Several processes: each one's scan (they stop one at a time); the figures above are
    /// their sum, and `pause_ms` the longest single pause.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<ProcessScan>,
}

/// One process's scan in a session of several.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessScan {
    pub pid: u32,
    pub pause_ms: f64,
    pub duration_ms: f64,
    pub blocks_scanned: u64,
    pub totals: Reachability,
    /// Why it could not be scanned (it ended, another tracer holds it, the pause bound).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Cycles kept in a merged scan; the rest are counted in `cycles_rest`.
const MERGED_CYCLES: usize = 1000;

impl Scan {
    /// The scans of several processes, one at a time, as one: their figures added (a pause is
    /// the longest one: each process stops on its own), cycles and Python types together, and
    /// each process's own line. `None` when none of them could be scanned.
    pub fn merged(at_s: f64, parts: Vec<(u32, Result<Scan, String>)>) -> Option<Scan> {
        let mut out = Scan { at_s, cycles_complete: true, ..Scan::default() };
        let mut methods = std::collections::BTreeSet::new();
        for (pid, part) in parts {
            let sc = match part {
                Ok(sc) => sc,
                Err(error) => {
                    out.processes.push(ProcessScan { pid, error: Some(error), ..ProcessScan::default() });
                    continue;
                }
            };
            out.processes.push(ProcessScan {
                pid,
                pause_ms: sc.pause_ms,
                duration_ms: sc.duration_ms,
                blocks_scanned: sc.blocks_scanned,
                totals: sc.totals,
                error: None,
            });
            methods.insert(sc.method.clone());
            out.no_clone_why = out.no_clone_why.or(sc.no_clone_why);
            out.pause_ms = out.pause_ms.max(sc.pause_ms);
            out.reap_pause_ms = out.reap_pause_ms.max(sc.reap_pause_ms);
            out.duration_ms += sc.duration_ms;
            out.threads += sc.threads;
            out.bytes_read += sc.bytes_read;
            out.blocks_scanned += sc.blocks_scanned;
            for (k, v) in sc.roots {
                *out.roots.entry(k).or_default() += v;
            }
            out.unreadable_bytes += sc.unreadable_bytes;
            out.totals.add(&sc.totals);
            out.cycles.extend(sc.cycles);
            out.cycles_rest += sc.cycles_rest;
            out.cycles_complete &= sc.cycles_complete;
            match (out.python_objects.as_mut(), sc.python_objects) {
                (Some(p), Some(q)) => p.absorb(q),
                (None, q) => out.python_objects = q,
                (_, None) => {}
            }
        }
        if out.processes.iter().all(|p| p.error.is_some()) {
            return None;
        }
        // The one method every process was scanned with, else "mixed".
        out.method =
            if methods.len() == 1 { methods.pop_first().unwrap_or_default() } else { "mixed".into() };
        out.cycles.sort_by_key(|c| std::cmp::Reverse(c.bytes));
        if out.cycles.len() > MERGED_CYCLES {
            out.cycles_rest += (out.cycles.len() - MERGED_CYCLES) as u64;
            out.cycles.truncate(MERGED_CYCLES);
        }
        Some(out)
    }

    /// Its point on the scans' timeline.
    pub fn point(&self) -> ScanPoint {
        ScanPoint {
            t_s: self.at_s,
            pause_ms: self.pause_ms,
            definitely_lost_bytes: self.totals.definitely_lost.bytes,
            indirectly_lost_bytes: self.totals.indirectly_lost.bytes,
            possibly_lost_bytes: self.totals.possibly_lost.bytes,
            reachable_bytes: self.totals.reachable.bytes,
        }
    }
}

/// CPython's live objects by type, as `objgraph.show_most_common_types` and `show_growth`
/// give them: every tracked container from the cycle collector's lists, and the small objects
/// no list holds from pymalloc's arenas.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PythonObjects {
    /// Where they were found: "gc lists", or "gc lists and pymalloc arenas".
    pub source: String,
    /// Objects counted: generations 0-2 (what `gc.get_objects()` lists) and, when the arenas
    /// were walked, the small objects no list holds (str, int, bytearray, untracked tuples).
    pub objects: u64,
    /// Of `objects`, those on no list: found in pymalloc's arenas, or (`outside_arenas`) in
    /// malloc's blocks the scan knows (over 512 bytes).
    pub untracked_objects: u64,
    pub outside_arenas: u64,
    /// Why the arenas were not walked (then only the lists' containers are counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arenas_not_walked: Option<String>,
    /// The walk: arenas, pools, blocks in use, and pools skipped because their header did
    /// not check out.
    pub arenas: u64,
    pub pools: u64,
    pub blocks: u64,
    pub bad_pools: u64,
    pub bytes: u64,
    /// `gc.isenabled()`.
    pub gc_enabled: bool,
    /// Objects per generation, and in the permanent one (`gc.freeze()`).
    pub generations: [u64; 3],
    pub permanent: u64,
    /// `len(gc.garbage)`.
    pub garbage: u64,
    /// Every type, most objects first.
    pub types: Vec<PythonType>,
    /// Groups of Python objects that reach only each other (no root reaches them), by
    /// make-up, most cycles first: with the collector off, or for types it cannot free,
    /// they stay forever; with it on, its next collection frees them.
    pub cycles: Vec<PythonCycle>,
    /// `--backrefs TYPE`: the paths from roots to a few objects of the type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backrefs: Option<Backrefs>,
    /// What the collector will do with them: "the cycle collector is disabled
    /// (gc.disable()): they are never freed", or "the next collection frees them".
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cycles_fate: String,
    /// Why there is no census this time (the collector was running, a list did not check out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The paths from roots to a few objects of one type (objgraph's `show_backrefs`), from the
/// scan's marking: each node a root, an object on a path, or one of the objects asked for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Backrefs {
    /// The type asked for.
    pub r#type: String,
    /// Objects of it in the snapshot, and those drawn.
    pub found: u64,
    pub drawn: u64,
    pub nodes: Vec<BackrefNode>,
    /// (from, to) node indices: `from` holds a pointer to `to`.
    pub edges: Vec<(usize, usize)>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackrefNode {
    pub label: String,
    /// "root", "object" or "target".
    pub kind: String,
}

/// Cycles of Python objects of one make-up.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PythonCycle {
    /// How many such cycles.
    pub count: u64,
    /// The objects in each, by type: "__main__.Node" 2.
    pub objects: Vec<PythonCycleObjects>,
    /// Blocks and bytes of all of them, their storage (dict values, list items) included.
    pub blocks: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PythonCycleObjects {
    /// `module.qualname` (`dict` for builtins).
    pub r#type: String,
    pub count: u64,
    /// Where they were allocated: a Python call site if they were tracked, else "from before
    /// attach".
    pub allocated: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PythonType {
    /// `type.__module__`.
    pub module: String,
    /// `type.__qualname__`.
    pub qualname: String,
    pub count: u64,
    /// Of `count`, objects on no collector list (found in pymalloc's arenas): `count -
    /// untracked` is what `gc.get_objects()` lists of this type.
    pub untracked: u64,
    /// `sys.getsizeof` summed (the object itself, not what it points to).
    pub bytes: u64,
    /// Change in count since the previous census of the session (`show_growth`); absent on
    /// the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count_change: Option<i64>,
    /// The call sites tracked since attach whose blocks are objects of this type (at most 3):
    /// where such objects are made now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
}

impl PythonObjects {
    /// Each type's change in count since `prev` (a type new since then counts from 0).
    pub fn set_changes(&mut self, prev: &PythonObjects) {
        if self.error.is_some() || prev.error.is_some() {
            return;
        }
        let before: std::collections::HashMap<(&str, &str), u64> =
            prev.types.iter().map(|t| ((t.module.as_str(), t.qualname.as_str()), t.count)).collect();
        for t in &mut self.types {
            let was = before.get(&(t.module.as_str(), t.qualname.as_str())).copied().unwrap_or(0);
            t.count_change = Some(t.count as i64 - was as i64);
        }
    }
}

impl PythonObjects {
    /// Another process's objects added to these: by type (`module.qualname`), and the heap's
    /// figures summed.
    pub fn absorb(&mut self, other: PythonObjects) {
        if other.error.is_some() && self.error.is_none() && self.objects == 0 {
            *self = other;
            return;
        }
        if other.error.is_some() {
            return;
        }
        self.objects += other.objects;
        self.untracked_objects += other.untracked_objects;
        self.outside_arenas += other.outside_arenas;
        self.arenas_not_walked = self.arenas_not_walked.take().or(other.arenas_not_walked);
        self.arenas += other.arenas;
        self.pools += other.pools;
        self.blocks += other.blocks;
        self.bad_pools += other.bad_pools;
        self.bytes += other.bytes;
        self.gc_enabled &= other.gc_enabled;
        for (g, o) in self.generations.iter_mut().zip(other.generations) {
            *g += o;
        }
        self.permanent += other.permanent;
        self.garbage += other.garbage;
        for t in other.types {
            match self.types.iter_mut().find(|m| m.module == t.module && m.qualname == t.qualname) {
                Some(m) => {
                    m.count += t.count;
                    m.untracked += t.untracked;
                    m.bytes += t.bytes;
                    for site in t.sites {
                        if !m.sites.contains(&site) && m.sites.len() < 3 {
                            m.sites.push(site);
                        }
                    }
                }
                None => self.types.push(t),
            }
        }
        self.types.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(b.count.cmp(&a.count)));
        self.cycles.extend(other.cycles);
        self.cycles.sort_by_key(|c| std::cmp::Reverse(c.bytes));
        if self.cycles_fate.is_empty() {
            self.cycles_fate = other.cycles_fate;
        }
    }
}

impl PythonType {
    /// `qualname`, or `module.qualname` outside builtins.
    pub fn label(&self) -> String {
        if self.module == "builtins" {
            self.qualname.clone()
        } else {
            format!("{}.{}", self.module, self.qualname)
        }
    }
}

/// `--census`: the whole glibc heap, every chunk, and what the untracked blocks (from before
/// attach) are.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Census {
    pub arenas: u64,
    /// Memory the arenas hold from the system (`system_mem`; the brk heap's extent when its
    /// arena could not be read).
    pub arena_bytes: u64,
    /// Chunks held by the program (mmapped ones included), whole chunk sizes.
    pub in_use: ClassTally,
    /// Free chunks: in bins, in the threads' caches and the fastbins (fragmentation inside the
    /// heap), and the top chunks.
    pub free: ClassTally,
    pub cached_free: ClassTally,
    pub top_bytes: u64,
    pub mmapped: ClassTally,
    /// What glibc's own `malloc_info` calls in use (its `system` less `fast` and `rest`): the
    /// program's chunks, the thread caches' chunks and the caches themselves, and heap bytes
    /// in no chunk (arena headers). For comparing with glibc's figures.
    pub malloc_info_in_use_bytes: u64,
    /// The untracked blocks by class (the tracked ones are in the sites).
    pub untracked: Reachability,
    /// Untracked blocks grouped by type (C++ vtable) or usable size, most lost bytes first,
    /// then most reachable.
    pub groups: Vec<CensusGroup>,
    pub groups_rest: u64,
    /// Walks or lists that stopped on bad metadata: their heaps' figures are incomplete.
    pub walk_errors: Vec<String>,
    pub notes: Vec<String>,
    pub main_arena_found: bool,
}

/// Untracked blocks of one type or size.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CensusGroup {
    /// `Session`, `shared_ptr control block of Session`, or `104-byte blocks`.
    pub group: String,
    /// "type" or "size".
    pub kind: String,
    pub reachability: Reachability,
    pub held_by: Vec<Holder>,
    /// A call site tracked since attach that allocates blocks of this type or size: where
    /// these probably came from.
    pub likely_origin: Option<String>,
}

/// One site's scan result, keyed like the report's sites.
#[derive(Clone, Debug, Default)]
pub struct SiteResult {
    pub stack_id: String,
    pub function: String,
    pub reachability: Reachability,
    pub holders: Vec<Holder>,
    /// Its lost bytes that sit in cycles.
    pub cycle_bytes: u64,
    /// The process it is in (several processes: sites of one stack in two workers are two).
    pub pid: u32,
}

/// A site's verdict from its classes and its trend.
pub fn site_verdict(trend: Trend, r: &Reachability, cycle_bytes: u64) -> &'static str {
    let lost = r.lost_bytes();
    let held = r.reachable.bytes;
    if lost > 0 && lost >= held {
        return if cycle_bytes * 2 >= lost { "CYCLE" } else { "LEAK" };
    }
    // Only interior pointers reach them: valgrind's "possibly lost", a leak more often than not.
    if r.possibly_lost.bytes > 0 && r.possibly_lost.bytes >= held.max(lost) {
        return "LEAK";
    }
    // Reachable memory is stable or accumulating by its trend alone: a site with too few
    // points is not judged, however much it holds.
    match trend {
        Trend::Growing => "ACCUMULATION",
        Trend::Stable => "STABLE",
        Trend::NotEnoughData => "NOT ENOUGH DATA",
    }
}

/// Puts the scan into the report: classes, holders and verdicts per site, and the run verdict
/// refined (a growing heap still referenced is ACCUMULATION; lost memory mostly in cycles is
/// CYCLE; definitely lost memory is a LEAK even when nothing grows, with [`Basis::Scan`]).
pub fn apply(report: &mut Report, scan: Scan, results: Vec<SiteResult>) {
    let mut by_key: std::collections::HashMap<(String, String), Vec<SiteResult>> =
        std::collections::HashMap::new();
    for r in results {
        by_key.entry((r.stack_id.clone(), r.function.clone())).or_default().push(r);
    }
    let (mut growing_lost, mut growing_held, mut growing_cycle) = (0u64, 0u64, 0u64);
    let mut top_holder: Option<(u64, String)> = None;
    for site in report.sites.iter_mut() {
        let Some(same) = by_key.get_mut(&(site.stack_id.clone(), site.function.clone())) else { continue };
        // One process traced: its sites carry no pid.
        let Some(at) = same.iter().position(|r| site.pid.is_none_or(|p| p == r.pid)) else { continue };
        let r = same.swap_remove(at);
        site.verdict = Some(site_verdict(site.trend, &r.reachability, r.cycle_bytes).to_string());
        if site.trend == Trend::Growing {
            growing_lost += r.reachability.lost_bytes() + r.reachability.possibly_lost.bytes;
            growing_held += r.reachability.reachable.bytes;
            growing_cycle += r.cycle_bytes;
            if let Some(h) = r.holders.first()
                && top_holder.as_ref().is_none_or(|(b, _)| h.bytes > *b)
            {
                top_holder = Some((h.bytes, h.holder.clone()));
            }
        }
        site.reachability = Some(r.reachability);
        site.held_by = r.holders;
    }
    // With a census, blocks from before attach count too.
    let mut t = scan.totals;
    if let Some(c) = &scan.census {
        t.add(&c.untracked);
    }
    let v = &mut report.verdict;
    match v.kind {
        RunVerdict::Leak if growing_held > growing_lost => {
            v.kind = RunVerdict::Accumulation;
            v.summary = format!(
                "{}; the scan finds the growing memory still referenced ({} reachable vs {} lost){}",
                v.summary,
                crate::report::text::human_bytes(growing_held),
                crate::report::text::human_bytes(growing_lost),
                top_holder.map(|(_, h)| format!(", held mostly by {h}")).unwrap_or_default()
            );
        }
        RunVerdict::Leak if growing_lost > 0 && growing_cycle * 2 >= growing_lost => {
            v.kind = RunVerdict::Cycle;
            v.summary = format!(
                "{}; the scan finds the growing memory unreachable, {} of it in cycles of blocks \
                 pointing at each other",
                v.summary,
                crate::report::text::human_bytes(growing_cycle)
            );
        }
        RunVerdict::Leak => {
            v.summary = format!(
                "{}; the scan finds {} definitely lost (no pointer reaches it){}",
                v.summary,
                crate::report::text::human_bytes(t.definitely_lost.bytes),
                if growing_held > 0 {
                    format!(
                        ", and {} of the growth still referenced{}",
                        crate::report::text::human_bytes(growing_held),
                        top_holder.map(|(_, h)| format!(" (mostly by {h})")).unwrap_or_default()
                    )
                } else {
                    String::new()
                }
            );
        }
        // Nothing was seen growing: a leak all the same, but on the scan's word alone.
        RunVerdict::Stable | RunVerdict::NotEnoughData if t.definitely_lost.bytes > 0 => {
            let growth = if v.kind == RunVerdict::Stable {
                format!("no steady growth in {:.1} s", report.window.duration_s)
            } else {
                format!("no growth measured in {:.1} s", report.window.duration_s)
            };
            v.kind = RunVerdict::Leak;
            v.basis = Basis::Scan;
            v.summary = format!(
                "{} in {} at the scan, no pointer reaches them{} (found by the scan; {growth})",
                crate::report::text::human_bytes(t.definitely_lost.bytes),
                crate::report::text::plural(t.definitely_lost.count, "block", "blocks"),
                if t.indirectly_lost.bytes > 0 {
                    format!(
                        ", and {} indirectly lost through them",
                        crate::report::text::human_bytes(t.indirectly_lost.bytes)
                    )
                } else {
                    String::new()
                }
            );
        }
        _ => {}
    }
    report.scan = Some(scan);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(def: u64, ind: u64, pos: u64, reach: u64) -> Reachability {
        let t = |b| ClassTally { bytes: b, count: u64::from(b > 0) };
        Reachability {
            definitely_lost: t(def),
            indirectly_lost: t(ind),
            possibly_lost: t(pos),
            reachable: t(reach),
        }
    }

    #[test]
    fn verdicts_follow_the_classes() {
        assert_eq!(site_verdict(Trend::Growing, &r(1000, 0, 0, 0), 0), "LEAK");
        assert_eq!(site_verdict(Trend::NotEnoughData, &r(720, 1200, 0, 0), 1920), "CYCLE");
        assert_eq!(site_verdict(Trend::Growing, &r(0, 0, 640, 0), 0), "LEAK");
        assert_eq!(site_verdict(Trend::Growing, &r(0, 0, 0, 64000), 0), "ACCUMULATION");
        assert_eq!(site_verdict(Trend::Stable, &r(10, 0, 0, 64000), 0), "STABLE");
        assert_eq!(site_verdict(Trend::NotEnoughData, &r(0, 0, 0, 0), 0), "NOT ENOUGH DATA");
    }

    /// Issue 21: an 8 s run at 5 s intervals printed `growth 2.43 MiB/s` and then `STABLE` for
    /// a site whose trend had too few points.
    #[test]
    fn a_site_too_short_to_judge_is_not_stable() {
        assert_eq!(site_verdict(Trend::NotEnoughData, &r(0, 0, 0, 19 << 20), 0), "NOT ENOUGH DATA");
        let mut rep = crate::report::export::testing::report();
        rep.sites[0].growth_bytes_per_s = 2.43 * 1024.0 * 1024.0;
        let result = SiteResult {
            stack_id: rep.sites[0].stack_id.clone(),
            function: rep.sites[0].function.clone(),
            reachability: r(0, 0, 0, 4000),
            ..Default::default()
        };
        apply(&mut rep, Scan::default(), vec![result]);
        assert_eq!(rep.sites[0].verdict.as_deref(), Some("NOT ENOUGH DATA"));
        let text = crate::report::text::render(&rep, 10, crate::model::SortBy::Outstanding);
        assert!(text.contains("  NOT ENOUGH DATA: 3.91 KiB reachable in 1 block (too few samples"), "{text}");
        assert!(!text.contains("STABLE"), "{text}");
    }

    /// Issue 21: `census` 0.2 s after attach printed `LEAK / GROWING` for 40 B the scan found.
    #[test]
    fn a_leak_only_the_scan_found_is_not_called_growing() {
        let verdict_line = |rep: &Report| {
            let text = crate::report::text::render(rep, 10, crate::model::SortBy::Outstanding);
            text.lines().find(|l| l.starts_with("VERDICT")).unwrap().to_string()
        };
        let scan = || Scan { totals: r(40, 0, 0, 0), ..Default::default() };
        // Too few samples for a trend (the test report's window is 2.5 s).
        let mut rep = crate::report::export::testing::report();
        assert_eq!(rep.verdict.kind, RunVerdict::NotEnoughData);
        apply(&mut rep, scan(), Vec::new());
        assert_eq!((rep.verdict.kind, rep.verdict.basis), (RunVerdict::Leak, Basis::Scan));
        assert_eq!(
            verdict_line(&rep),
            "VERDICT: LEAK / DEFINITELY LOST: 40 B in 1 block at the scan, no pointer reaches them \
             (found by the scan; no growth measured in 2.5 s)"
        );
        // JSON: the kind stays "leak"; the basis is added.
        let v: serde_json::Value = serde_json::from_str(&crate::report::to_json(&rep).unwrap()).unwrap();
        assert_eq!((&v["verdict"]["kind"], &v["verdict"]["basis"]), (&"leak".into(), &"scan".into()));
        // A flat heap: measured, and not growing.
        let mut rep = crate::report::export::testing::report();
        rep.verdict.kind = RunVerdict::Stable;
        apply(&mut rep, scan(), Vec::new());
        let line = verdict_line(&rep);
        assert!(line.starts_with("VERDICT: LEAK / DEFINITELY LOST: 40 B"), "{line}");
        assert!(line.ends_with("(found by the scan; no steady growth in 2.5 s)"), "{line}");
        // A fitted growth keeps its GROWING, with the scan's finding added.
        let mut rep = crate::report::export::testing::report();
        rep.verdict.kind = RunVerdict::Leak;
        rep.verdict.summary = "tracked heap +300.6 KiB over the last 4 s".into();
        apply(&mut rep, scan(), Vec::new());
        assert_eq!((rep.verdict.kind, rep.verdict.basis), (RunVerdict::Leak, Basis::Trend));
        assert!(verdict_line(&rep).starts_with("VERDICT: LEAK / GROWING: tracked heap +300.6 KiB"));
        // Reports written before the basis existed read as drawn from the trend.
        let old: crate::report::Verdict =
            serde_json::from_str(r#"{"kind": "leak", "summary": "x"}"#).unwrap();
        assert_eq!(old.label(), "LEAK / GROWING");
    }

    /// Three workers' scans as one: classes added, the longest pause, a failed one named with
    /// why, cycles and Python types together; a site of one stack in two workers keeps each
    /// worker's own classes.
    #[test]
    fn scans_of_several_processes_merge() {
        let py = |n: u64| PythonObjects {
            objects: n,
            types: vec![PythonType {
                module: "app".into(),
                qualname: "Node".into(),
                count: n,
                bytes: 56 * n,
                ..Default::default()
            }],
            ..Default::default()
        };
        let one = |pause: f64, def: u64, cycles: u64| Scan {
            method: "clone".into(),
            pause_ms: pause,
            duration_ms: 10.0,
            blocks_scanned: 5,
            totals: r(def, 0, 0, 100),
            cycles: (0..cycles).map(|i| Cycle { blocks: 2, bytes: 64 + i, sites: Vec::new() }).collect(),
            cycles_complete: true,
            python_objects: Some(py(def)),
            ..Default::default()
        };
        let m = Scan::merged(
            7.0,
            vec![(10, Ok(one(2.0, 1000, 2))), (11, Err("it has ended".into())), (12, Ok(one(5.5, 3000, 1)))],
        )
        .unwrap();
        assert_eq!((m.at_s, m.pause_ms, m.duration_ms, m.blocks_scanned), (7.0, 5.5, 20.0, 10));
        assert_eq!(m.totals.definitely_lost, ClassTally { bytes: 4000, count: 2 });
        assert_eq!(m.totals.reachable.bytes, 200);
        assert_eq!(m.method, "clone");
        assert_eq!(m.cycles.len(), 3);
        assert_eq!(m.cycles[0].bytes, 65, "largest cycle first");
        let pids: Vec<(u32, bool)> = m.processes.iter().map(|p| (p.pid, p.error.is_some())).collect();
        assert_eq!(pids, vec![(10, false), (11, true), (12, false)]);
        assert_eq!(m.processes[2].totals.definitely_lost.bytes, 3000);
        let p = m.python_objects.as_ref().unwrap();
        assert_eq!(
            (p.objects, p.types.len(), p.types[0].count, p.types[0].bytes),
            (4000, 1, 4000, 56 * 4000)
        );
        assert_eq!(m.point().definitely_lost_bytes, 4000);
        assert!(Scan::merged(1.0, vec![(10, Err("gone".into()))]).is_none());

        let mut rep = crate::report::export::testing::report();
        rep.sites.truncate(1);
        let mut other = rep.sites[0].clone();
        rep.sites[0].pid = Some(10);
        other.pid = Some(12);
        rep.sites.push(other);
        let result = |pid, def| SiteResult {
            stack_id: rep.sites[0].stack_id.clone(),
            function: rep.sites[0].function.clone(),
            reachability: r(def, 0, 0, 0),
            pid,
            ..Default::default()
        };
        let results = vec![result(12, 3000), result(10, 1000)];
        apply(&mut rep, m, results);
        let lost: Vec<u64> =
            rep.sites.iter().map(|s| s.reachability.map_or(0, |r| r.definitely_lost.bytes)).collect();
        assert_eq!(lost, vec![1000, 3000]);
        let text = crate::report::text::render(&rep, 10, crate::model::SortBy::Outstanding);
        assert!(text.contains("3 processes scanned one at a time"), "{text}");
        assert!(text.contains("PID 11: not scanned: it has ended"), "{text}");
    }
}
