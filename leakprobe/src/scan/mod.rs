//! **Layer: the reachability scan.** Why memory is kept: capture a consistent picture of the
//! live process ([`snapshot`], through the ptrace layer), name the places a pointer can live
//! ([`roots`]), mark from them ([`mark`], pure), and classify each tracked block as
//! definitely, indirectly or possibly lost, or still reachable, with what holds it.
//!
//! capture → roots → mark → name the holders → release. The target is paused only in the
//! capture; everything after it reads the copy-on-write snapshot. The marking follows
//! valgrind's `memcheck/mc_leakcheck.c`, so that its counts agree with `valgrind
//! --leak-check=full`.
//!
//! Words are read only to follow pointers: results hold addresses, sizes, indices, symbols
//! and counts, never memory contents (they may be secrets).

pub mod backref;
pub mod census;
pub mod mark;
pub mod python;
pub mod roots;
pub mod snapshot;

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use thiserror::Error;

use crate::symbolize::data::DataSymbols;
use mark::{HeldBy, RootRef, RootSlot};
use roots::RootKind;
use snapshot::{Snapshot, SnapshotError};

#[derive(Debug, Error)]
pub enum ScanError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("marking the tracked blocks")]
    Mark(#[from] mark::MarkError),
}

/// What to scan.
pub struct Request {
    pub pid: i32,
    /// Memory of ours in the target, never a root (the in-process stub's data).
    pub exclude: Vec<(u64, u64)>,
    pub max_pause: Duration,
    /// Never inject a clone: copy the memory while stopped (tests; seccomp'd targets).
    pub no_clone: bool,
    /// Code ranges at the entry of a function the target stopped itself at (exit() in `run
    /// --scan`): a thread there is at a call boundary (see [`snapshot::StopPlace`]).
    pub function_entries: Vec<(u64, u64)>,
    /// The allocator's own pointer into a block's tail (see [`mark::Options::allocator_tail`]):
    /// [`glibc_next_chunk`] for glibc.
    pub allocator_tail: Option<fn(u64, u64) -> Option<u64>>,
    /// Also walk the whole glibc heap ([`census`]) and classify its untracked blocks (from
    /// before attach), grouped by type or size.
    pub census: Option<census::GlibcVersion>,
    /// The allocator's module (its path as the target maps it): its data points at every
    /// slab, so a holder is never followed back to it.
    pub allocator_module: Option<String>,
    /// Tests only: how long the snapshot child lives before the marking (SIGKILL tests).
    pub hold_after_capture: Duration,
    /// A CPython target: also take the census of its live objects by type.
    pub python: Option<crate::runtimes::cpython::objects::Target>,
    /// `--backrefs TYPE`: draw the paths from roots to a few Python objects of this type.
    pub backrefs: Option<String>,
}

/// The tracked blocks as they were at the capture's instant; `site` indexes the caller's
/// table of call sites, and census groups take the ids from `first_group` on.
pub struct Tracked {
    pub blocks: Vec<mark::Block>,
    pub first_group: u32,
}

/// What an untracked block is, as far as can be told without its stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupKey {
    /// A C++ object, by the vtable its first word points at (demangled class name).
    Type(String),
    /// Anything else, by its usable size.
    Size(u64),
    /// A Python object, by its type (`app.Node`, `dict`).
    Python(String),
    /// A pymalloc block that holds no object (a list's items, a dict's keys), by its size.
    PythonStorage(u64),
}

impl std::fmt::Display for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupKey::Type(t) => f.write_str(t),
            GroupKey::Size(n) => write!(f, "{n}-byte blocks"),
            GroupKey::Python(t) => write!(f, "Python {t}"),
            GroupKey::PythonStorage(n) => write!(f, "{n}-byte pymalloc blocks"),
        }
    }
}

/// The census's part of a scan.
pub struct CensusResult {
    /// What was walked (chunks dropped after use: they can be millions).
    pub arenas: Vec<census::Arena>,
    pub totals: census::Totals,
    pub errors: Vec<census::WalkError>,
    pub notes: Vec<&'static str>,
    pub main_arena_found: bool,
    /// Heap bytes no longer scanned as roots (every chunk in them is known).
    pub heaps_excluded: u64,
    /// The type of tracked sites' blocks (by site id), for naming a group's likely origin.
    pub tracked_types: HashMap<u32, String>,
}

/// glibc: where the chunk after a block of `size` bytes at `start` begins, if that lies
/// inside the block's requested size (the next chunk's `prev_size` field is the last word a
/// block may use). Chunks are `size + 8` rounded up to 16, at least 32, and start 16 bytes
/// before the block.
pub fn glibc_next_chunk(start: u64, size: u64) -> Option<u64> {
    let chunk = size.checked_add(8 + 15)? & !15;
    let next = (start - 16).checked_add(chunk.max(32))?;
    (next > start && next < start + size).then_some(next)
}

/// What a holder is, in the user's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderName {
    /// "global", "stack", "register", "tls", "heap", "anonymous", "file" or "site".
    pub kind: &'static str,
    /// e.g. `global cache_head (scan_cases)`, `r12 of thread 812 (worker)`.
    pub name: String,
    /// A stack slot: a code address of the frame that holds it (a return address into that
    /// function, or the thread's instruction pointer for the innermost frame), to symbolize.
    pub frame_ip: Option<u64>,
}

/// The scan's result and what it cost.
pub struct Outcome {
    pub marking: mark::Marking,
    pub method: snapshot::Method,
    pub no_clone_why: Option<String>,
    /// The target's pause for the capture, and for reaping the snapshot child.
    pub pause: Duration,
    pub reap_pause: Duration,
    /// From the capture's start to the end of the release.
    pub duration: Duration,
    pub threads: usize,
    /// Root bytes per kind class ("stack", "module_data"...).
    pub root_bytes: BTreeMap<&'static str, u64>,
    /// Memory the snapshot lacked and could not copy (DONTFORK regions over the budget).
    pub unread_bytes: u64,
    /// Every root holder named.
    pub holders: HashMap<RootRef, HolderName>,
    /// The blocks marked: the request's, then the census's untracked ones.
    pub blocks: Vec<mark::Block>,
    pub census: Option<CensusResult>,
    /// The CPython object census, from the same picture.
    pub python: Option<
        Result<crate::runtimes::cpython::objects::Census, crate::runtimes::cpython::objects::ObjectsError>,
    >,
    /// What the Python heap added to the marking.
    pub python_heap: Option<PythonHeap>,
    /// The groups of untracked blocks (the glibc census's, then the Python heap's): group `i`
    /// is site `first_group + i`.
    pub groups: Vec<GroupKey>,
    /// `--backrefs`: the paths to a few objects of the type asked for, roots named.
    pub backrefs: Option<python::Graph>,
}

/// The groups of untracked blocks, each a site id after the tracked ones.
struct Groups {
    first: u32,
    keys: Vec<GroupKey>,
    index: HashMap<GroupKey, u32>,
}

impl Groups {
    fn new(first: u32) -> Self {
        Groups { first, keys: Vec::new(), index: HashMap::new() }
    }

    fn site(&mut self, key: GroupKey) -> u32 {
        if let Some(&s) = self.index.get(&key) {
            return s;
        }
        self.keys.push(key.clone());
        let s = self.first + self.keys.len() as u32 - 1;
        self.index.insert(key, s);
        s
    }
}

/// What the Python heap added to the marking: its blocks, its objects in blocks already
/// there, and the names it holds them by.
#[derive(Clone, Debug, Default)]
pub struct PythonHeap {
    /// pymalloc blocks added (objects and storage).
    pub blocks: u64,
    /// Tracked or malloc blocks found to hold a Python object (marked from the object on).
    pub objects_in_blocks: u64,
    /// Named roots (module globals, gc.garbage) and the modules read.
    pub roots: u64,
    pub modules: u64,
    pub roots_dropped: u64,
    /// Why the named roots could not be read, if they could not.
    pub roots_error: Option<String>,
    /// Tracked sites whose blocks are Python objects: the type of the first one seen.
    pub tracked_types: HashMap<u32, String>,
    /// Lists' item arrays scanned up to the list's length only.
    pub trimmed_item_arrays: u64,
}

impl crate::runtimes::Memory for Snapshot {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        Snapshot::read(self, addr, buf)
    }
}

/// Reads the snapshot for the marking; words in `dead` (sorted, disjoint) read as zero: stale
/// slots the program itself no longer counts as references (a free list's past its count).
struct SnapMem<'a>(&'a Snapshot, &'a [(u64, u64)]);

impl mark::Memory for SnapMem<'_> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), mark::Unreadable> {
        if !self.0.read(addr, buf) {
            return Err(mark::Unreadable);
        }
        zero_dead(self.1, addr, buf);
        Ok(())
    }
}

/// Zeroes the bytes of `buf` (read at `addr`) that fall in `dead`'s ranges.
fn zero_dead(dead: &[(u64, u64)], addr: u64, buf: &mut [u8]) {
    let end = addr.saturating_add(buf.len() as u64);
    let first = dead.partition_point(|&(_, e)| e <= addr);
    for &(s, e) in dead[first..].iter().take_while(|&&(s, _)| s < end) {
        let (from, to) = (s.max(addr) - addr, e.min(end) - addr);
        buf[from as usize..to as usize].fill(0);
    }
}

/// A scan in two phases: [`Captured::take`] stops the target for its picture, and
/// [`Captured::mark`] classifies the blocks that were live at that instant (which the caller
/// reads from its tracker in between, knowing [`Captured::stopped_at_ns`]).
pub struct Captured<'a> {
    req: &'a Request,
    snap: Snapshot,
    t0: Instant,
}

impl<'a> Captured<'a> {
    /// Stops the target, pictures it and resumes it: the only pause until the release.
    pub fn take(req: &'a Request) -> Result<Self, ScanError> {
        let t0 = Instant::now();
        let opts = snapshot::CaptureOptions {
            max_pause: req.max_pause,
            no_clone: req.no_clone,
            function_entries: req.function_entries.clone(),
            ..Default::default()
        };
        let snap = snapshot::capture(req.pid, &opts)?;
        std::thread::sleep(req.hold_after_capture);
        Ok(Captured { req, snap, t0 })
    }

    /// When every thread was stopped (CLOCK_MONOTONIC ns, the kernel side's clock).
    pub fn stopped_at_ns(&self) -> u64 {
        self.snap.stopped_at_ns
    }

    /// Marks `tracked` over the picture, names the holders, and releases the picture.
    pub fn mark(self, tracked: Tracked) -> Result<Outcome, ScanError> {
        let Captured { req, snap, t0 } = self;
        let mut threads = snap.threads.clone();
        for t in threads.iter_mut() {
            t.tls = tls_range(&snap, t.fs_base);
        }
        let mut blocks = tracked.blocks;
        let mut exclude = req.exclude.clone();
        // The stacks glibc keeps of threads that have exited: dead memory, as below a live
        // thread's stack pointer.
        exclude.extend(dead_thread_stacks(&snap));
        let mut groups = Groups::new(tracked.first_group);
        let census = req.census.map(|v| take_census(&snap, v, &mut groups, &mut blocks, &mut exclude));
        let mut py = req.python.as_ref().map(|t| {
            python::take(
                &snap,
                t,
                &mut python::Into { groups: &mut groups, blocks: &mut blocks, exclude: &mut exclude },
            )
        });
        let data_ends = module_data_ends(&snap);
        let layout =
            roots::Layout { exclude: &exclude, tls: roots::TlsSpan::default(), data_ends: &data_ends };
        let mut roots = roots::build(&snap.regions, &threads, &layout);
        let first = py.as_mut().map_or_else(Vec::new, |p| p.named_roots(&mut roots));
        let prefixes = py.as_ref().map_or(&[][..], |p| &p.prefixes);
        let dead = py.as_ref().map_or(&[][..], |p| &p.dead);
        let marker =
            Marker { snap: &snap, blocks: &blocks, roots: &roots, first: &first, prefixes, dead, req };
        // Marked again, following untracked memory back, only if some of it holds blocks.
        let mut marking = marker.mark(None)?;
        let weak_held = marking.sites.iter().flat_map(|s| &s.holders).any(|h| match h.by {
            HeldBy::Root(r) => roots.kinds.get(r.root as usize).is_some_and(is_untracked),
            HeldBy::Site(_) => false,
        });
        let back = weak_held.then(|| back_index(&roots, &snap, req.allocator_module.as_deref(), &blocks));
        if back.is_some() {
            marking = marker.mark(back.as_ref())?;
        }
        let mut backrefs = match (req.backrefs.as_deref(), req.python.as_ref(), py.as_ref()) {
            (Some(asked), Some(target), Some(p)) => {
                let view = python::Backrefs {
                    snap: &snap,
                    marking: &marking,
                    blocks: &blocks,
                    groups: &groups.keys,
                    first_group: groups.first,
                    heap: &p.heap,
                    target,
                    prefixes: &p.prefixes,
                };
                Some(view.build(asked))
            }
            _ => None,
        };
        let graph_roots = backrefs.as_ref().map_or_else(Vec::new, python::Graph::roots);
        let holders = name_holders(&marking, &roots, &snap, back.as_ref(), req.python.as_ref(), &graph_roots);
        if let Some(g) = backrefs.as_mut() {
            g.name_roots(&holders);
        }
        let (python, python_heap) = match py {
            Some(p) => (Some(p.census), Some(p.heap)),
            None => (None, None),
        };
        let root_bytes = roots.bytes_by_class();
        let (method, no_clone_why, pause, threads) =
            (snap.method, snap.no_clone_why.clone(), snap.pause, snap.threads.len());
        let unread_bytes = snap.unread.iter().map(|(s, e)| e - s).sum();
        let reap_pause = snap.release(req.max_pause)?;
        Ok(Outcome {
            marking,
            method,
            no_clone_why,
            pause,
            reap_pause,
            duration: t0.elapsed(),
            threads,
            root_bytes,
            unread_bytes,
            holders,
            blocks,
            census,
            python,
            python_heap,
            groups: groups.keys,
            backrefs,
        })
    }
}

/// The marking itself, over the snapshot.
struct Marker<'a> {
    snap: &'a Snapshot,
    blocks: &'a [mark::Block],
    roots: &'a roots::Roots,
    /// Named roots marked before all others (a Python program's globals).
    first: &'a [mark::RootValues],
    prefixes: &'a [mark::Prefix],
    /// Words read as zero (see [`SnapMem`]).
    dead: &'a [(u64, u64)],
    req: &'a Request,
}

impl Marker<'_> {
    fn mark(&self, back: Option<&backref::Index>) -> Result<mark::Marking, ScanError> {
        mark_roots(self, back)
    }
}

fn mark_roots(mk: &Marker<'_>, back: Option<&backref::Index>) -> Result<mark::Marking, ScanError> {
    let (snap, blocks, roots) = (mk.snap, mk.blocks, mk.roots);
    // Untracked heap memory holds only what no global, stack or register reaches.
    let (weak, strong): (Vec<_>, Vec<_>) = roots
        .ranges
        .iter()
        .map(|&(s, e, root)| mark::RootRange { start: s, len: e - s, root })
        .partition(|r| is_untracked(&roots.kinds[r.root as usize]));
    let (late, strong): (Vec<_>, Vec<_>) = strong.into_iter().partition(|r| {
        matches!(
            roots.kinds[r.root as usize],
            roots::RootKind::RedZone { .. } | roots::RootKind::Registers { .. }
        )
    });
    let mroots = mark::Roots {
        ranges: strong,
        late,
        values: roots
            .values
            .iter()
            .map(|(root, v)| mark::RootValues { root: *root, values: v.iter().map(|x| x.1).collect() })
            .collect(),
        weak,
        first: mk.first.to_vec(),
    };
    let mut mem = SnapMem(snap, mk.dead);
    let mut vtable = |a: u64| is_vtable(snap, a);
    // A holder in untracked memory is the object there, not each of its words.
    let mut holder_word = |root: u32, addr: u64| match back {
        Some(index) if is_untracked(&roots.kinds[root as usize]) => index.object_of(addr),
        _ => addr,
    };
    // Of untracked memory, what a global or a stack reaches through it holds first.
    let mut memo: HashMap<u64, bool> = HashMap::new();
    let mut prefer = |root: u32, addr: u64| match back {
        Some(index) if is_untracked(&roots.kinds[root as usize]) => {
            let object = index.object_of(addr);
            *memo.entry(object).or_insert_with(|| index.follow(object).is_some_and(|f| f.rank <= 1))
        }
        _ => false,
    };
    let options = mark::Options {
        is_vtable: Some(&mut vtable),
        allocator_tail: mk.req.allocator_tail,
        holder_word: Some(&mut holder_word),
        prefer_weak: Some(&mut prefer),
        prefixes: mk.prefixes,
        prefixed_starts: mk.req.python.as_ref().is_some_and(|t| matches!(t.layout.minor, 11 | 12)),
        ..mark::Options::default()
    };
    Ok(mark::mark(blocks, &mroots, &mut mem, options)?)
}

/// Where each mapped module's writable data ends in memory, from its program headers (see
/// [`roots::Layout::data_ends`]).
fn module_data_ends(snap: &Snapshot) -> HashMap<String, u64> {
    let mut first: HashMap<&str, (u64, u64)> = HashMap::new();
    for r in snap.regions.iter().filter(|r| r.name.starts_with('/')) {
        let e = first.entry(r.name.as_str()).or_insert((r.start, r.offset));
        if r.offset < e.1 {
            *e = (r.start, r.offset);
        }
    }
    first
        .into_iter()
        .filter_map(|(path, (start, offset))| {
            let file = crate::target::target_path(snap.pid, std::path::Path::new(path));
            let loads = crate::target::elf::loads(&file).ok()?;
            Some((path.to_string(), crate::target::elf::data_end(&loads, start, offset)?))
        })
        .collect()
}

/// Walks the glibc heap of the snapshot; adds every in-use chunk that is not a tracked block
/// to `blocks` (grouped by type or size), and the heaps walked whole to `exclude` (their free
/// chunks' stale pointers are no references, and every block in them is known).
fn take_census(
    snap: &Snapshot,
    v: census::GlibcVersion,
    groups: &mut Groups,
    blocks: &mut Vec<mark::Block>,
    exclude: &mut Vec<(u64, u64)>,
) -> CensusResult {
    let c = census::census(&mut SnapMem(snap, &[]), &snap.regions, v);
    let mut tracked: Vec<(u64, u64)> = blocks.iter().map(|b| (b.start, b.start + b.size.max(1))).collect();
    tracked.sort_unstable();
    let overlaps_tracked = |s: u64, e: u64| {
        let i = tracked.partition_point(|t| t.0 < e);
        i > 0 && tracked[i - 1].1 > s
    };
    let mut types = Typer::new(snap);
    // Tracked blocks typed too (a bounded number), so that a group of untracked `Session`s
    // can be joined to the call site that allocates `Session`s now.
    let mut tracked_types: HashMap<u32, String> = HashMap::new();
    for b in blocks.iter().take(1 << 17) {
        if !tracked_types.contains_key(&b.site)
            && let Some(t) = types.of(b.start)
        {
            tracked_types.insert(b.site, t);
        }
    }
    for ch in c
        .chunks
        .iter()
        .filter(|ch| matches!(ch.state(), census::ChunkState::InUse | census::ChunkState::Mmapped))
    {
        let (start, size) = (ch.user(), ch.usable());
        if overlaps_tracked(start, start + size.max(1)) {
            continue;
        }
        let key = types.of(start).map_or(GroupKey::Size(size), GroupKey::Type);
        let site = groups.site(key);
        blocks.push(mark::Block { start, size, site });
    }
    let mut heaps_excluded = 0;
    let incomplete: Vec<u64> = c.incomplete_heaps().collect();
    for a in &c.arenas {
        for h in a.heaps.iter().filter(|h| h.complete && !incomplete.contains(&h.start)) {
            exclude.push((h.start, h.end));
            heaps_excluded += h.end - h.start;
        }
    }
    CensusResult {
        arenas: c.arenas.clone(),
        totals: c.totals,
        errors: c.errors.clone(),
        notes: c.notes.clone(),
        main_arena_found: c.main_arena.is_some(),
        heaps_excluded,
        tracked_types,
    }
}

/// The variables of the target's modules by run-time address: a global that holds a block,
/// a vtable that types one.
struct Globals {
    pid: i32,
    data: DataSymbols,
    /// Per module file: where its file offset 0 is mapped.
    bases: HashMap<String, u64>,
}

impl Globals {
    fn new(snap: &Snapshot) -> Self {
        let mut bases: HashMap<String, u64> = HashMap::new();
        for r in snap.regions.iter().filter(|r| r.name.starts_with('/')) {
            let b = r.start.saturating_sub(r.offset);
            bases.entry(r.name.clone()).and_modify(|x| *x = (*x).min(b)).or_insert(b);
        }
        Globals { pid: snap.pid, data: DataSymbols::default(), bases }
    }

    fn base(&self, module: &str) -> Option<u64> {
        self.bases.get(module).copied()
    }

    /// The variable at `addr` in `module` (its path as the target maps it).
    fn variable(&mut self, module: &str, addr: u64) -> Option<crate::symbolize::data::Variable> {
        let base = self.base(module)?;
        let file = crate::target::target_path(self.pid, std::path::Path::new(module));
        self.data.lookup(&file, base, addr)
    }
}

/// Names C++ objects by the vtable their first word points at.
struct Typer<'a> {
    snap: &'a Snapshot,
    globals: Globals,
    /// A first word seen before, and what it named.
    memo: HashMap<u64, Option<String>>,
}

impl<'a> Typer<'a> {
    fn new(snap: &'a Snapshot) -> Self {
        Typer { snap, globals: Globals::new(snap), memo: HashMap::new() }
    }

    fn of(&mut self, block: u64) -> Option<String> {
        let mut w = [0u8; 8];
        if !self.snap.read(block, &mut w) {
            return None;
        }
        let word = u64::from_le_bytes(w);
        if word < 4096 || !word.is_multiple_of(8) {
            return None;
        }
        if let Some(t) = self.memo.get(&word) {
            return t.clone();
        }
        let t = self.lookup(word);
        self.memo.insert(word, t.clone());
        t
    }

    fn lookup(&mut self, word: u64) -> Option<String> {
        let r =
            self.snap.regions.iter().find(|r| r.start <= word && word < r.end && r.name.starts_with('/'))?;
        let v = self.globals.variable(&r.name, word)?;
        let class = v.name.strip_prefix("vtable for ")?;
        // make_shared's control block holds the object: name the object.
        Some(match class.strip_prefix("std::_Sp_counted_ptr_inplace<") {
            Some(rest) => format!("shared_ptr control block of {}", first_template_arg(rest)),
            None => class.to_string(),
        })
    }
}

/// `Session, std::allocator<void>, ...>` -> `Session` (nested angle brackets respected).
fn first_template_arg(s: &str) -> &str {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '<' => depth += 1,
            '>' if depth == 0 => return &s[..i],
            '>' => depth -= 1,
            ',' if depth == 0 => return &s[..i],
            _ => {}
        }
    }
    s
}

/// Valgrind's vtable test (for the multipleinheritance heuristic), in its order: the address
/// lies in a readable file mapping, and walking its first 20 words (within that mapping),
/// null words skipped, two point into executable file-backed code before any word points
/// elsewhere. (A vtable is followed by the next one's offset-to-top and type info: the walk
/// stops at the second function pointer, before those.)
fn is_vtable(snap: &Snapshot, addr: u64) -> bool {
    let region = |a: u64| snap.regions.iter().find(|r| r.start <= a && a < r.end && r.name.starts_with('/'));
    let Some(home) = region(addr).filter(|r| r.readable) else { return false };
    if !addr.is_multiple_of(8) {
        return false;
    }
    let len = (home.end - addr).min(160) as usize & !7;
    let mut buf = [0u8; 160];
    if len == 0 || !snap.read(addr, &mut buf[..len]) {
        return false;
    }
    let mut functions = 0;
    for w in buf[..len].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))) {
        if w == 0 {
            continue;
        }
        if !region(w).is_some_and(|r| r.executable) {
            return false;
        }
        functions += 1;
        if functions == 2 {
            return true;
        }
    }
    false
}

/// Thread stacks with no thread: glibc caches the stack of a thread that has exited (joined or
/// detached) for reuse. Such a mapping sits right above its guard page, and near its top is a
/// thread control block that points at itself (`tcb` and `self`), which no live thread's thread
/// pointer names.
fn dead_thread_stacks(snap: &Snapshot) -> Vec<(u64, u64)> {
    let live: Vec<u64> = snap.threads.iter().map(|t| t.fs_base).collect();
    let mut out = Vec::new();
    for w in snap.regions.windows(2) {
        let (guard, r) = (&w[0], &w[1]);
        let guarded = guard.end == r.start && !guard.readable && !guard.writable && guard.name.is_empty();
        if !guarded || !r.name.is_empty() || !r.writable || !r.scannable() || r.len() < 64 << 10 {
            continue;
        }
        let top = 16 << 10;
        let lo = r.end - top.min(r.len());
        let mut buf = vec![0u8; (r.end - lo) as usize];
        if !snap.read(lo, &mut buf) {
            continue;
        }
        let word = |a: u64| {
            let o = (a - lo) as usize;
            buf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        };
        let tcb = (lo..r.end - 24).step_by(64).find(|&t| word(t) == Some(t) && word(t + 16) == Some(t));
        if let Some(t) = tcb
            && !live.contains(&t)
        {
            out.push((r.start, r.end));
        }
    }
    out
}

/// A thread's static TLS and thread control block, from its DTV (glibc and musl keep the DTV
/// pointer in the second word of the TCB; each entry is 16 bytes, the count sits just before
/// the first): from the lowest TLS block below the thread pointer to the end of the TCB. None
/// if the words do not look like a DTV.
fn tls_range(snap: &Snapshot, fs_base: u64) -> Option<(u64, u64)> {
    let word = |a: u64| {
        let mut b = [0u8; 8];
        snap.read(a, &mut b).then(|| u64::from_le_bytes(b))
    };
    if fs_base == 0 || word(fs_base)? != fs_base {
        return None; // the TCB's first word points at itself on x86-64
    }
    let dtv = word(fs_base + 8)?;
    let entries = word(dtv.checked_sub(16)?)?.min(64);
    let lowest = (1..=entries)
        .filter_map(|i| word(dtv + 16 * i))
        .filter(|p| *p < fs_base && fs_base - p < 1 << 20)
        .min()?;
    // struct pthread (glibc ~2.3 KiB) or musl's, above the thread pointer.
    Some((lowest & !63, fs_base + 2304))
}

/// The frame that owns stack slot `addr`: the nearest return address below it (pushed when
/// that frame called the next one), found as a word pointing into executable file-backed code.
/// None when the slot is in the innermost frame. A heuristic: a stale code pointer can mislead
/// it, so the report says "in" a function, not which local.
fn frame_of(snap: &Snapshot, sp: u64, addr: u64) -> Option<u64> {
    let lo = sp.max(addr.saturating_sub(64 << 10)) & !7;
    let len = addr.checked_sub(lo)? as usize;
    let mut buf = vec![0u8; len];
    if len == 0 || !snap.read(lo, &mut buf) {
        return None;
    }
    buf.chunks_exact(8).rev().map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).find(|w| {
        snap.regions.iter().any(|r| r.executable && r.name.starts_with('/') && r.start <= *w && *w < r.end)
    })
}

fn thread_name(pid: i32, tid: i32) -> String {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
    match comm.trim() {
        "" => format!("thread {tid}"),
        c => format!("thread {tid} ({c})"),
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Names every root that holds something: globals by symbol, registers and stacks by thread.
///
/// Untracked heap memory (a block from before attach that no heap walk knows, or allocator
/// data) is no answer by itself: it is followed back ([`backref`]) to the real root that
/// reaches it, and named as the chain from there.
fn name_holders(
    marking: &mark::Marking,
    roots: &roots::Roots,
    snap: &Snapshot,
    back: Option<&backref::Index>,
    python: Option<&crate::runtimes::cpython::objects::Target>,
    extra: &[RootRef],
) -> HashMap<RootRef, HolderName> {
    let mut globals = Globals::new(snap);
    let mut py_names =
        python.map(|t| crate::runtimes::cpython::objects::TypeNames::new(&t.layout, t.unicode_type));
    let mut out = HashMap::new();
    // The sites' holders, and the roots of the paths to the blocks other sites hold.
    let refs: Vec<RootRef> = marking
        .sites
        .iter()
        .flat_map(|s| s.holders.iter())
        .filter_map(|h| match h.by {
            HeldBy::Root(r) => Some(r),
            HeldBy::Site(_) => path_root(marking, h.example),
        })
        .chain(extra.iter().copied())
        .collect();
    let untracked = |r: &RootRef| roots.kinds.get(r.root as usize).is_some_and(is_untracked);
    for r in refs {
        if out.contains_key(&r) {
            continue;
        }
        let Some(name) = name_root(r, roots, snap, &mut globals) else { continue };
        // A Python name: what it holds, in a few words.
        if let (Some(RootKind::Python { value, .. }), Some(names)) =
            (roots.kinds.get(r.root as usize), py_names.as_mut())
            && let Some(what) = crate::runtimes::cpython::roots::describe(snap, names, *value)
        {
            out.insert(r, HolderName { name: format!("{} ({what})", name.name), ..name });
            continue;
        }
        let name = match (back, r.slot) {
            (Some(index), RootSlot::Word { addr }) if untracked(&r) => match index.follow(addr) {
                Some(found) => match name_root(found.root, roots, snap, &mut globals) {
                    Some(root) => HolderName {
                        kind: root.kind,
                        name: format!(
                            "{} -> {} untracked heap {} (from before attach, or allocator data)",
                            root.name,
                            found.objects,
                            if found.objects == 1 { "object" } else { "objects" }
                        ),
                        frame_ip: root.frame_ip,
                    },
                    None => name,
                },
                None => HolderName {
                    name: format!(
                        "{}, which no root was found to reach{}",
                        name.name,
                        if index.cut_short() { " (the search was cut short)" } else { "" }
                    ),
                    ..name
                },
            },
            _ => name,
        };
        out.insert(r, name);
    }
    out
}

/// Block `b`'s retainers, nearest first (the blocks up the chain, `b` not included), and the
/// root they end at; no root when they end at a lost block, or run past a million steps.
pub fn retainers(marking: &mark::Marking, mut b: usize) -> (Vec<usize>, Option<RootRef>) {
    let mut chain = Vec::new();
    for _ in 0..1_000_000 {
        match marking.blocks.get(b).map(|o| o.retainer) {
            Some(mark::Retainer::Block { index, .. }) => {
                chain.push(index);
                b = index;
            }
            Some(mark::Retainer::Root(r)) => return (chain, Some(r)),
            _ => break,
        }
    }
    (chain, None)
}

/// The root at the end of block `b`'s retainers, if they end at one.
pub fn path_root(marking: &mark::Marking, b: usize) -> Option<RootRef> {
    retainers(marking, b).1
}

/// Heap memory that no tracker knows: a root only for what nothing else reaches, and a holder
/// that is followed back to the root that reaches it.
fn is_untracked(kind: &RootKind) -> bool {
    matches!(kind, RootKind::Heap | RootKind::Anonymous { .. })
}

/// The pointers into untracked heap memory, to follow holders back through it.
/// Blocks (tracked, or found by the heap walk) are walked through too: a Python object in a
/// pymalloc arena is held by a dict's table in a malloc'd block.
fn back_index(
    roots: &roots::Roots,
    snap: &Snapshot,
    allocator: Option<&str>,
    blocks: &[mark::Block],
) -> backref::Index {
    let mut ranges: Vec<backref::Range> = roots
        .ranges
        .iter()
        .map(|&(start, end, root)| backref::Range {
            start,
            end,
            root,
            role: match &roots.kinds[root as usize] {
                k if is_untracked(k) => backref::Role::Untracked,
                RootKind::Module { path } if allocator.is_some_and(|a| a == path) => backref::Role::DeadEnd,
                // A program's variables first; TLS last (allocators keep caches of free slots
                // there, which point next to live objects).
                RootKind::Module { .. } => backref::Role::Root(0),
                RootKind::Stack { .. } | RootKind::File { .. } => backref::Role::Root(1),
                _ => backref::Role::Root(2),
            },
        })
        .collect();
    // Those not inside untracked root memory already (jemalloc's blocks lie in its arenas).
    let mut untracked: Vec<(u64, u64)> =
        ranges.iter().filter(|r| r.role == backref::Role::Untracked).map(|r| (r.start, r.end)).collect();
    untracked.sort_unstable();
    let covered = |a: u64| backref::contains(&untracked, a);
    ranges.extend(blocks.iter().filter(|b| b.size > 0 && !covered(b.start)).map(|b| backref::Range {
        start: b.start,
        end: b.start + b.size,
        root: u32::MAX,
        role: backref::Role::Untracked,
    }));
    let values: Vec<(u32, Vec<u64>)> =
        roots.values.iter().map(|(root, v)| (*root, v.iter().map(|x| x.1).collect())).collect();
    backref::Index::build(&ranges, &values, 1, &mut SnapMem(snap, &[]), backref::Limits::default())
}

/// One root slot in the user's words: a global by symbol, a register or stack slot by thread.
fn name_root(r: RootRef, roots: &roots::Roots, snap: &Snapshot, globals: &mut Globals) -> Option<HolderName> {
    let kind = roots.kinds.get(r.root as usize)?;
    Some(match (kind, r.slot) {
        (RootKind::Registers { tid }, RootSlot::Value { index }) => {
            let reg = roots
                .values
                .iter()
                .find(|(id, _)| *id == r.root)
                .and_then(|(_, v)| v.get(index as usize))
                .map_or_else(|| "a register".to_string(), |(reg, _)| reg.to_string());
            HolderName {
                kind: "register",
                name: format!("{reg} of {}", thread_name(snap.pid, *tid)),
                frame_ip: None,
            }
        }
        (RootKind::Stack { tid }, RootSlot::Word { addr }) => {
            let thread = snap.threads.iter().find(|t| t.tid == *tid);
            let sp = thread.map_or(0, |t| t.rsp);
            let at = if addr >= sp { format!("sp+{:#x}", addr - sp) } else { format!("sp-{:#x}", sp - addr) };
            HolderName {
                kind: "stack",
                name: format!("the stack of {} ({at})", thread_name(snap.pid, *tid)),
                frame_ip: frame_of(snap, sp, addr).or(thread.map(|t| t.rip)),
            }
        }
        (RootKind::RedZone { tid }, _) => HolderName {
            kind: "stack",
            name: format!("the red zone below the stack pointer of {}", thread_name(snap.pid, *tid)),
            frame_ip: None,
        },
        (RootKind::Tls { tid }, _) => HolderName {
            kind: "tls",
            name: format!("the TLS of {}", thread_name(snap.pid, *tid)),
            frame_ip: None,
        },
        (RootKind::Module { path }, RootSlot::Word { addr }) => {
            let base = globals.base(path).unwrap_or(0);
            let module = file_name(path);
            match globals.variable(path, addr) {
                Some(v) if v.offset == 0 => HolderName {
                    kind: "global",
                    name: format!("global {} ({module})", v.name),
                    frame_ip: None,
                },
                Some(v) => HolderName {
                    kind: "global",
                    name: format!("global {}+{:#x} ({module})", v.name, v.offset),
                    frame_ip: None,
                },
                None => HolderName {
                    kind: "global",
                    name: format!("data of {module} at +{:#x} (no symbol)", addr.saturating_sub(base)),
                    frame_ip: None,
                },
            }
        }
        (RootKind::Heap, RootSlot::Word { addr }) => HolderName {
            kind: "heap",
            name: format!(
                "untracked heap memory at {addr:#x} (a block from before attach, or allocator data)"
            ),
            frame_ip: None,
        },
        (RootKind::Anonymous { name, start }, _) => {
            let end =
                snap.regions.iter().find(|x| x.start <= *start && *start < x.end).map_or(*start, |x| x.end);
            let label = if name.is_empty() { String::new() } else { format!(" {name}") };
            HolderName {
                kind: "anonymous",
                name: format!("anonymous mapping{label} {start:#x}-{end:#x} ({} KiB)", (end - start) / 1024),
                frame_ip: None,
            }
        }
        (RootKind::File { path }, _) => {
            HolderName { kind: "file", name: format!("file mapping {path}"), frame_ip: None }
        }
        (RootKind::Python { name, .. }, _) => {
            HolderName { kind: "python", name: name.clone(), frame_ip: None }
        }
        (k, _) => HolderName { kind: k.class(), name: format!("{k:?}"), frame_ip: None },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dead ranges read as zero wherever a read meets them; the rest reads as it is.
    #[test]
    fn dead_words_read_as_zero() {
        let dead = [(0x1008, 0x1010), (0x1018, 0x1030)];
        let mut buf = [0xffu8; 0x30];
        zero_dead(&dead, 0x1000, &mut buf);
        assert!(buf[..8].iter().all(|&b| b == 0xff));
        assert!(buf[8..16].iter().all(|&b| b == 0));
        assert!(buf[16..24].iter().all(|&b| b == 0xff));
        assert!(buf[24..].iter().all(|&b| b == 0));
        // A read inside one range, and one past them all.
        let mut w = [0xffu8; 4];
        zero_dead(&dead, 0x101c, &mut w);
        assert_eq!(w, [0; 4]);
        let mut w = [0xffu8; 8];
        zero_dead(&dead, 0x1030, &mut w);
        assert_eq!(w, [0xff; 8]);
    }

    #[test]
    fn template_args() {
        assert_eq!(
            first_template_arg("Session, std::allocator<void>, (__gnu_cxx::_Lock_policy)2>"),
            "Session"
        );
        assert_eq!(
            first_template_arg("std::vector<int, std::allocator<int> >, A>"),
            "std::vector<int, std::allocator<int> >"
        );
    }

    #[test]
    fn glibc_next_chunk_lies_in_the_last_word_only() {
        // 100 bytes: a 112-byte chunk at start-16, the next at start+96, inside the block.
        assert_eq!(glibc_next_chunk(0x1010, 100), Some(0x1010 + 96));
        // 24 bytes: a 32-byte chunk, the next at start+16, inside.
        assert_eq!(glibc_next_chunk(0x1010, 24), Some(0x1010 + 16));
        // 16 and 96 bytes: the next chunk starts at or past the block's end.
        assert_eq!(glibc_next_chunk(0x1010, 16), None);
        assert_eq!(glibc_next_chunk(0x1010, 96), None);
    }

    #[test]
    fn the_allocators_tail_pointer_does_not_hold_a_block() {
        // A lost 100-byte block whose only "pointer" is glibc's arena top at its tail.
        struct Mem(Vec<u8>, u64);
        impl mark::Memory for Mem {
            fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), mark::Unreadable> {
                let off = addr.checked_sub(self.1).ok_or(mark::Unreadable)? as usize;
                buf.copy_from_slice(self.0.get(off..off + buf.len()).ok_or(mark::Unreadable)?);
                Ok(())
            }
        }
        let blocks = [mark::Block { start: 0x10010, size: 100, site: 0 }];
        let mut bytes = vec![0u8; 0x200];
        bytes[..8].copy_from_slice(&(0x10010u64 + 96).to_le_bytes());
        let roots = mark::Roots {
            ranges: vec![mark::RootRange { start: 0x20000, len: 0x200, root: 0 }],
            ..mark::Roots::default()
        };
        let class = |tail: Option<fn(u64, u64) -> Option<u64>>| {
            let opts = mark::Options { allocator_tail: tail, ..mark::Options::default() };
            mark::mark(&blocks, &roots, &mut Mem(bytes.clone(), 0x20000), opts).unwrap().blocks[0].class
        };
        assert_eq!(class(None), mark::Class::PossiblyLost);
        assert_eq!(class(Some(glibc_next_chunk)), mark::Class::DefinitelyLost);
    }
}
