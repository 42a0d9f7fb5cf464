//! Roots: where a pointer that keeps a block alive can live, named so that a holder can be
//! reported ("global cache_head in leaky", "the stack of thread 812", "rbx of thread 813").
//!
//! Conservative, so the scan never invents a leak: every thread's registers (general and
//! vector), each stack from its stack pointer (less the red zone) to the end of its mapping,
//! TLS, the writable segments of every module, and every other readable writable mapping,
//! including heap memory that is not a tracked block (blocks from before attach may point at
//! tracked ones). Pure: built from the parsed mappings and the stopped threads.

use std::collections::HashMap;

use super::snapshot::{Reg, Region, StopPlace, ThreadState};

/// What a root is, for the report.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RootKind {
    /// A thread's registers (general and vector).
    Registers { tid: i32 },
    /// A thread's stack, from its stack pointer up.
    Stack { tid: i32 },
    /// The red zone just below a thread's stack pointer (a leaf function may keep data
    /// there, so it is scanned; stale copies are common, so it is scanned last).
    RedZone { tid: i32 },
    /// A thread's TLS and thread control block (just below and at its thread pointer).
    Tls { tid: i32 },
    /// A module's writable data (`.data`, `.bss`, the GOT).
    Module { path: String },
    /// The brk heap outside the tracked blocks (untracked blocks, allocator metadata).
    Heap,
    /// Another anonymous writable mapping (mmap regions, other arenas, thread stacks' unused
    /// parts are not included).
    Anonymous { name: String, start: u64 },
    /// A shared or file-backed writable mapping that is no module's.
    File { path: String },
    /// A pointer a Python program holds under a name (`module app, global cache`): marked
    /// before every other root.
    Python { name: String, value: u64 },
}

impl RootKind {
    /// The short kind name used in JSON (`roots` by kind).
    pub fn class(&self) -> &'static str {
        match self {
            RootKind::Registers { .. } => "registers",
            RootKind::Stack { .. } | RootKind::RedZone { .. } => "stack",
            RootKind::Tls { .. } => "tls",
            RootKind::Module { .. } => "module_data",
            RootKind::Heap => "heap",
            RootKind::Anonymous { .. } => "anonymous",
            RootKind::File { .. } => "file",
            RootKind::Python { .. } => "python",
        }
    }
}

/// The roots of one snapshot: ranges to scan and register values, each tagged with an index
/// into `kinds`.
#[derive(Debug, Default)]
pub struct Roots {
    pub kinds: Vec<RootKind>,
    /// (start, end, root): non-overlapping, in scanning order (see [`build`]).
    pub ranges: Vec<(u64, u64, u32)>,
    /// (root, the registers and their values), one entry per thread.
    pub values: Vec<(u32, Vec<(Reg, u64)>)>,
}

impl Roots {
    fn id(&mut self, kind: RootKind) -> u32 {
        if let Some(i) = self.kinds.iter().position(|k| *k == kind) {
            return i as u32;
        }
        self.kinds.push(kind);
        (self.kinds.len() - 1) as u32
    }

    /// Bytes of memory roots per kind class.
    pub fn bytes_by_class(&self) -> std::collections::BTreeMap<&'static str, u64> {
        let mut out = std::collections::BTreeMap::new();
        for (s, e, id) in &self.ranges {
            *out.entry(self.kinds[*id as usize].class()).or_default() += e - s;
        }
        out
    }
}

/// Bytes below the thread pointer counted as TLS (glibc puts the static TLS blocks there),
/// and above it (its `struct pthread`).
#[derive(Clone, Copy, Debug)]
pub struct TlsSpan {
    pub below: u64,
    pub above: u64,
}

impl Default for TlsSpan {
    /// Used only when a thread's DTV cannot be read.
    fn default() -> Self {
        TlsSpan { below: 512, above: 2304 }
    }
}

/// The red zone under the stack pointer that a leaf function may use (System V x86-64).
const RED_ZONE: u64 = 128;

/// The registers a thread stopped at a call boundary may still need: the callee-saved ones
/// (System V x86-64) and the stack pointer. Everything else was the caller's to save.
const CALLEE_SAVED: [&str; 7] = ["rbx", "rbp", "rsp", "r12", "r13", "r14", "r15"];

/// The register values of a thread that can hold a live pointer, given where it stopped.
pub fn live_values(t: &ThreadState) -> Vec<(Reg, u64)> {
    match t.stop {
        StopPlace::Anywhere => t.values.clone(),
        StopPlace::Syscall | StopPlace::FunctionEntry => t
            .values
            .iter()
            .filter(|(r, _)| matches!(r, Reg::Gp(n) if CALLEE_SAVED.contains(n)))
            .copied()
            .collect(),
    }
}

/// What the roots are built from, besides the mappings and threads.
#[derive(Clone, Debug)]
pub struct Layout<'a> {
    /// Memory of ours in the target (the in-process stub's data, whose pointer set would
    /// otherwise hold every sampled block).
    pub exclude: &'a [(u64, u64)],
    pub tls: TlsSpan,
    /// Per module path: where its writable data ends in memory (the end of its last writable
    /// `PT_LOAD`, `.bss` included). The anonymous mapping after a module's file mappings is its
    /// `.bss` only up to there: the kernel merges whatever anonymous mapping comes next (an
    /// allocator's arena) into the same line of /proc/PID/maps. A module missing here keeps
    /// the whole anonymous mapping.
    pub data_ends: &'a HashMap<String, u64>,
}

/// Builds the roots.
pub fn build(regions: &[Region], threads: &[ThreadState], layout: &Layout<'_>) -> Roots {
    let (exclude, tls) = (layout.exclude, layout.tls);
    let mut roots = Roots::default();
    // (start, end, priority, root or None to skip): higher priority wins where spans overlap.
    let mut spans: Vec<Span> = Vec::new();
    let mut prev: Option<&Region> = None;
    for r in regions {
        let after = prev.filter(|p| p.end == r.start);
        prev = Some(r);
        if !r.scannable() || !r.writable || r.is_empty() {
            continue;
        }
        // .bss past the file's end: the anonymous mapping right after a module's data, up to
        // the end its program headers give; past that, plain anonymous memory.
        if let Some(p) =
            after.filter(|p| r.name.is_empty() && p.name.starts_with('/') && is_module_path(&p.name))
        {
            let end = layout.data_ends.get(&p.name).map_or(r.end, |e| (*e).clamp(r.start, r.end));
            if end > r.start {
                let id = roots.id(RootKind::Module { path: p.name.clone() });
                spans.push((r.start, end, 1, Some(id)));
            }
            if end < r.end {
                let id = roots.id(RootKind::Anonymous { name: String::new(), start: end });
                spans.push((end, r.end, 1, Some(id)));
            }
            continue;
        }
        let kind = match r.name.as_str() {
            "[heap]" => RootKind::Heap,
            // The main thread's (the lowest tid); its live part is re-tagged below.
            "[stack]" => RootKind::Stack { tid: threads.iter().map(|t| t.tid).min().unwrap_or(0) },
            n if n.starts_with('/') => {
                if is_module_path(n) {
                    RootKind::Module { path: n.to_string() }
                } else {
                    RootKind::File { path: n.to_string() }
                }
            }
            n => RootKind::Anonymous { name: n.to_string(), start: r.start },
        };
        let id = roots.id(kind);
        spans.push((r.start, r.end, 1, Some(id)));
    }
    for t in threads {
        let Some(r) = regions.iter().find(|r| r.start <= t.rsp && t.rsp < r.end) else { continue };
        // A stack mapping: the main one, or a thread's (its TCB sits at the top). The part
        // below the stack pointer is dead. A stack elsewhere (a coroutine's, inside a heap
        // block) is left to its mapping's rules.
        let is_stack = r.name == "[stack]" || (r.start <= t.fs_base && t.fs_base < r.end);
        if is_stack && r.writable && r.scannable() {
            // At a call boundary the red zone belongs to callees that have returned: dead.
            let red_zone = if t.stop == StopPlace::Anywhere { RED_ZONE } else { 0 };
            let live = t.rsp.saturating_sub(red_zone).max(r.start);
            let sp = t.rsp.clamp(live, r.end);
            let id = roots.id(RootKind::Stack { tid: t.tid });
            let red = roots.id(RootKind::RedZone { tid: t.tid });
            spans.push((r.start, live, 2, None));
            spans.push((live, sp, 2, Some(red)));
            spans.push((sp, r.end, 2, Some(id)));
        }
    }
    for t in threads.iter().filter(|t| t.fs_base != 0) {
        let (lo, hi) =
            t.tls.unwrap_or((t.fs_base.saturating_sub(tls.below), t.fs_base.saturating_add(tls.above)));
        // Only within readable writable memory.
        for r in regions.iter().filter(|r| r.writable && r.scannable() && r.start < hi && lo < r.end) {
            let id = roots.id(RootKind::Tls { tid: t.tid });
            spans.push((lo.max(r.start), hi.min(r.end), 3, Some(id)));
        }
    }
    for &(s, e) in exclude {
        spans.push((s, e, 4, None));
    }
    // The order of scanning decides which holder is named when several hold a block: the most
    // telling first (a global, TLS, a live stack slot), stale-prone places last.
    let mut ranges = flatten(&spans);
    let rank = |k: &RootKind| match k {
        RootKind::Python { .. } | RootKind::Module { .. } => 0,
        RootKind::Tls { .. } => 1,
        RootKind::Stack { .. } => 2,
        RootKind::Heap | RootKind::Anonymous { .. } | RootKind::File { .. } => 3,
        RootKind::RedZone { .. } | RootKind::Registers { .. } => 4,
    };
    ranges.sort_by_key(|r| (rank(&roots.kinds[r.2 as usize]), r.0));
    roots.ranges = ranges;
    for t in threads {
        let id = roots.id(RootKind::Registers { tid: t.tid });
        roots.values.push((id, live_values(t)));
    }
    roots
}

/// A mapped file that is code and data of the program (an ELF module), not a data file.
fn is_module_path(p: &str) -> bool {
    let name = p.rsplit('/').next().unwrap_or(p);
    !p.starts_with("/dev/") && !p.starts_with("/memfd:") && (name.contains(".so") || !name.contains('.'))
}

/// (start, end, priority, root or None to skip).
type Span = (u64, u64, u8, Option<u32>);

/// Non-overlapping pieces of the spans, each taking the highest-priority span over it (later
/// spans win ties); pieces whose winner is a skip are dropped; neighbours with one root merge.
fn flatten(spans: &[Span]) -> Vec<(u64, u64, u32)> {
    let mut cuts: Vec<u64> = spans.iter().flat_map(|s| [s.0, s.1]).collect();
    cuts.sort_unstable();
    cuts.dedup();
    // Spans sorted by start, to scan only those that can cover a piece.
    let mut by_start: Vec<&Span> = spans.iter().filter(|s| s.0 < s.1).collect();
    by_start.sort_by_key(|s| s.0);
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    let mut active: Vec<(usize, &Span)> = Vec::new();
    let mut next = 0;
    for w in cuts.windows(2) {
        let (lo, hi) = (w[0], w[1]);
        while next < by_start.len() && by_start[next].0 <= lo {
            active.push((next, by_start[next]));
            next += 1;
        }
        active.retain(|(_, s)| s.1 > lo);
        let winner = active.iter().filter(|(_, s)| s.0 <= lo && hi <= s.1).max_by_key(|(i, s)| (s.2, *i));
        let Some(id) = winner.and_then(|(_, s)| s.3) else { continue };
        match out.last_mut() {
            Some(last) if last.1 == lo && last.2 == id => last.1 = hi,
            _ => out.push((lo, hi, id)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(start: u64, end: u64, w: bool, name: &str) -> Region {
        Region {
            start,
            end,
            readable: true,
            writable: w,
            executable: false,
            shared: false,
            offset: 0,
            name: name.into(),
            dontfork: false,
            wipeonfork: false,
            device: false,
        }
    }

    #[test]
    fn kinds_stacks_tls_and_exclusions() {
        let regions = vec![
            region(0x1000, 0x2000, false, "/usr/bin/app"),
            region(0x2000, 0x3000, true, "/usr/bin/app"),
            region(0x3000, 0x4000, true, ""), // its .bss
            region(0x10000, 0x20000, true, "[heap]"),
            region(0x40000, 0x50000, true, ""), // a thread's stack, its TCB at the top
            region(0x60000, 0x70000, true, "[anon:cache]"),
            region(0x70000, 0x71000, true, "/var/lib/app/data.db"),
            region(0x7ff000, 0x800000, true, "[stack]"),
            region(0x900000, 0x901000, false, "[vvar]"),
        ];
        let threads = vec![
            ThreadState {
                tid: 10,
                stop: StopPlace::Anywhere,
                rsp: 0x7ff800,
                rip: 0,
                fs_base: 0x3800,
                values: vec![(Reg::Gp("rbx"), 0x10010)],
                tls: None,
            },
            ThreadState {
                tid: 11,
                stop: StopPlace::Anywhere,
                rsp: 0x48000,
                rip: 0,
                fs_base: 0x4f000,
                values: vec![],
                tls: Some((0x4ef00, 0x4f080)),
            },
        ];
        let tls = TlsSpan { below: 0x100, above: 0x80 };
        let ends = HashMap::new();
        let layout = Layout { exclude: &[(0x60800, 0x60900)], tls, data_ends: &ends };
        let roots = build(&regions, &threads, &layout);
        let kind_at = |a: u64| {
            roots
                .ranges
                .iter()
                .find(|(s, e, _)| *s <= a && a < *e)
                .map(|(_, _, id)| roots.kinds[*id as usize].clone())
        };
        let app = RootKind::Module { path: "/usr/bin/app".into() };
        assert_eq!(kind_at(0x1800), None, "read-only text is no root");
        assert_eq!(kind_at(0x2800), Some(app.clone()));
        assert_eq!(kind_at(0x3100), Some(app), ".bss belongs to its module");
        assert_eq!(kind_at(0x3780), Some(RootKind::Tls { tid: 10 }), "the main thread's TLS, below fs");
        assert_eq!(kind_at(0x10008), Some(RootKind::Heap));
        assert_eq!(kind_at(0x44000), None, "below the stack pointer is dead");
        assert_eq!(kind_at(0x48000 - 64), Some(RootKind::RedZone { tid: 11 }), "the red zone counts");
        assert_eq!(kind_at(0x4f040), Some(RootKind::Tls { tid: 11 }));
        assert_eq!(kind_at(0x4ef00), Some(RootKind::Tls { tid: 11 }), "from the DTV's lowest block");
        assert_eq!(kind_at(0x4eef8), Some(RootKind::Stack { tid: 11 }));
        assert_eq!(kind_at(0x4ff00), Some(RootKind::Stack { tid: 11 }));
        assert_eq!(kind_at(0x60850), None, "our own memory is excluded");
        assert!(matches!(kind_at(0x60900), Some(RootKind::Anonymous { .. })));
        assert_eq!(kind_at(0x70010), Some(RootKind::File { path: "/var/lib/app/data.db".into() }));
        assert_eq!(kind_at(0x7ff000), None);
        assert_eq!(kind_at(0x7ffc00), Some(RootKind::Stack { tid: 10 }));
        assert_eq!(kind_at(0x900000), None);
        assert_eq!(kind_at(0x7ff800 - 8), Some(RootKind::RedZone { tid: 10 }));
        // Disjoint; globals scanned first, red zones last.
        let mut sorted = roots.ranges.clone();
        sorted.sort_unstable();
        assert!(sorted.windows(2).all(|w| w[0].1 <= w[1].0), "{:x?}", roots.ranges);
        assert!(matches!(roots.kinds[roots.ranges[0].2 as usize], RootKind::Module { .. }));
        assert!(matches!(roots.kinds[roots.ranges.last().unwrap().2 as usize], RootKind::RedZone { .. }));
        assert_eq!(roots.values.len(), 2);
        assert_eq!(roots.kinds[roots.values[0].0 as usize], RootKind::Registers { tid: 10 });
    }

    #[test]
    fn bss_ends_where_the_program_headers_say_and_call_boundaries_drop_dead_state() {
        let regions = vec![
            region(0x1000, 0x2000, false, "/usr/lib/liblzma.so.5"),
            region(0x2000, 0x3000, true, "/usr/lib/liblzma.so.5"),
            // Its .bss (to 0x3400) merged with an allocator's arena after it.
            region(0x3000, 0x9000, true, ""),
            region(0x7ff000, 0x800000, true, "[stack]"),
        ];
        let thread = |stop| ThreadState {
            tid: 10,
            stop,
            rsp: 0x7ff800,
            rip: 0,
            fs_base: 0,
            values: vec![
                (Reg::Gp("rbx"), 0x10),
                (Reg::Gp("rdx"), 0x20),
                (Reg::Vector { bank: "xmm", index: 0, lane: 0 }, 0x30),
            ],
            tls: None,
        };
        let ends = HashMap::from([("/usr/lib/liblzma.so.5".to_string(), 0x3400)]);
        let layout = Layout { exclude: &[], tls: TlsSpan::default(), data_ends: &ends };
        for stop in [StopPlace::Anywhere, StopPlace::Syscall, StopPlace::FunctionEntry] {
            let roots = build(&regions, &[thread(stop)], &layout);
            let kind_at = |a: u64| {
                roots
                    .ranges
                    .iter()
                    .find(|(s, e, _)| *s <= a && a < *e)
                    .map(|(_, _, id)| roots.kinds[*id as usize].clone())
            };
            assert_eq!(kind_at(0x33f8), Some(RootKind::Module { path: "/usr/lib/liblzma.so.5".into() }));
            assert_eq!(kind_at(0x3400), Some(RootKind::Anonymous { name: String::new(), start: 0x3400 }));
            assert_eq!(kind_at(0x8ff8), Some(RootKind::Anonymous { name: String::new(), start: 0x3400 }));
            let values: Vec<u64> = roots.values[0].1.iter().map(|v| v.1).collect();
            if stop == StopPlace::Anywhere {
                assert_eq!(kind_at(0x7ff800 - 8), Some(RootKind::RedZone { tid: 10 }));
                assert_eq!(values, [0x10, 0x20, 0x30]);
            } else {
                assert_eq!(kind_at(0x7ff800 - 8), None, "{stop:?}: the red zone is dead");
                assert_eq!(values, [0x10], "{stop:?}: only callee-saved registers");
            }
        }
        // Without the program headers the whole anonymous mapping stays the module's.
        let none = HashMap::new();
        let roots = build(&regions, &[thread(StopPlace::Anywhere)], &Layout { data_ends: &none, ..layout });
        assert!(roots.ranges.iter().any(|(s, e, id)| *s <= 0x8ff8
            && 0x8ff8 < *e
            && matches!(roots.kinds[*id as usize], RootKind::Module { .. })));
    }
}
