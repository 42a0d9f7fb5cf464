//! The pure marking and classification model: valgrind memcheck's leak checker
//! (`memcheck/mc_leakcheck.c`) over a snapshot, with one seam to I/O ([`Memory`]).
//!
//! Given the tracked blocks, the roots and a way to read the snapshot, [`mark`] classifies every
//! block as valgrind does with `--leak-check=full` and its default `--leak-check-heuristics=all`:
//!
//! 1. **Reachable** blocks are reached from a root through a chain of start pointers (or interior
//!    pointers that a heuristic accepts as start pointers). Marked breadth-first, so each block's
//!    [`Retainer`] chain is a shortest one.
//! 2. **Possibly lost** blocks are reached from roots only through chains that contain a plain
//!    interior pointer. Their chain is the shortest definite prefix (a root or reachable block)
//!    followed by possibly lost blocks.
//! 3. The rest is lost. In address order, each block still unreached leads a clique: everything
//!    unreached that it points to, directly or not (start or interior pointers), is **indirectly
//!    lost** under it, earlier leaders included. The leaders left are **definitely lost**.
//!
//! Then, for the caller's report: per call site tallies, who holds each site's reachable blocks
//! (a root word or another site, with the longest run of same-site links), and the cycles
//! (strongly connected components) among lost blocks.
//!
//! Everything is iterative (queues, explicit stacks), pointer lookup is a binary search over
//! sorted starts behind a range check, and memory is read in coalesced chunks of up to 1 MiB.
//!
//! Where valgrind's behaviour depends on its scan order or on what we cannot see, we decide:
//! - Classes do not depend on order (valgrind upgrades a Possible block found later through a
//!   start pointer and rescans it, `lc_push_without_clique_if_a_chunk_ptr`), so we mark in two
//!   passes instead: start/heuristic pointers from roots and reachable blocks first, then
//!   everything else. Same sets, each block read once.
//! - The heuristic recorded for a reachable block is the one of the first definite pointer that
//!   reached it, cleared by any start pointer from a root or reachable block. Valgrind keeps the
//!   heuristic of an interior pointer seen while the block was still Possible if only one later
//!   start pointer upgrades it; we do not reproduce that order-dependent leftover.
//! - Valgrind counts `ex->heuristic` in its "of which reachable via heuristic" lines whatever the
//!   block's state (`print_results`), so a Possible block whose pointer matched a heuristic is
//!   counted there too. We keep the two apart: [`Tallies::reachable_via`] and
//!   [`Tallies::possible_via`]; valgrind's figure is their sum.
//! - Valgrind scans only words whose V bits say "defined"; we cannot know definedness, so stale
//!   pointers in uninitialised memory count for us and not for it.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::ops::Range;

use thiserror::Error;

const WORD: u64 = 8;
/// Valgrind's page: the multipleinheritance heuristic ignores words below it, and we retry
/// failed reads page by page.
const PAGE: u64 = 4096;
/// The largest read: few system calls, a bounded buffer, and a bounded batch of pointers found.
const CHUNK: u64 = 1 << 20;
/// Blocks this close are read in one call: copying 2 KiB costs about what one more read does.
const COALESCE_GAP: u64 = 2048;

const NONE: u32 = u32::MAX;

// Block states during marking. The clique pass turns Unreached into Leader or Indirect.
const UNREACHED: u8 = 0;
const REACHABLE: u8 = 1;
const POSSIBLE: u8 = 2;
const LEADER: u8 = 3;
const INDIRECT: u8 = 4;
/// Indirect now, a clique leader before: its members move to its new leader.
const ABSORBED: u8 = 5;

// What a block's parent is.
const P_NONE: u8 = 0;
const P_WORD: u8 = 1;
const P_VALUE: u8 = 2;
const P_BLOCK: u8 = 3;

/// A tracked heap block: an allocation whose call site we know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Block {
    pub start: u64,
    pub size: u64,
    /// The caller's call site id.
    pub site: u32,
}

/// Memory to scan for pointers, one aligned 8-byte word at a time (as valgrind does).
///
/// Words that overlap a tracked block are not root memory and are skipped: a whole mapping (a
/// heap arena, say) may be passed and only the gaps between blocks are scanned. Valgrind never
/// scans its client heap at all, so pass heap mappings only if their gaps should count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootRange {
    pub start: u64,
    pub len: u64,
    /// The caller's id for this root ("stack of thread 5", "globals of libfoo.so"...).
    pub root: u32,
}

/// Literal root values: a thread's general-purpose registers and each 8-byte lane of its vector
/// registers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RootValues {
    pub root: u32,
    pub values: Vec<u64>,
}

/// Everything the marking starts from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Roots {
    /// Scanned in this order, then `values`; the first pointer found becomes the retainer.
    pub ranges: Vec<RootRange>,
    pub values: Vec<RootValues>,
    /// Roots that name a retainer only for what the others do not reach at all (untracked heap
    /// memory: what holds a block there is better told by the global that reaches it through
    /// tracked blocks). Scanned after everything the others reach is marked. The classes do
    /// not depend on it, only the retainers.
    pub weak: Vec<RootRange>,
    /// Stale-prone places (a thread's red zone), scanned with `values` (registers), after the
    /// weak roots when there are any: a block that a global reaches through untracked memory
    /// is named by that chain, not by a register that happens to hold its address at the stop.
    pub late: Vec<RootRange>,
    /// Named values marked from before all the others, breadth-first among themselves: a
    /// runtime's own roots (a Python module's globals), so that what they reach is held by
    /// them, not by the interpreter's data that reaches them too.
    pub first: Vec<RootValues>,
}

/// Memory that belongs to a block though it lies before its start (a Python object's
/// pre-header, which holds its attributes, sits before its collector header; the block starts
/// at the object, where its references point): scanned as the block's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// The caller's block index.
    pub block: usize,
    pub start: u64,
    pub end: u64,
}

/// A read of the snapshot failed (unmapped, or gone): counted and skipped, never fatal.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("the snapshot's memory could not be read there")]
pub struct Unreadable;

/// The one seam to I/O: reads the snapshot's memory. The production reader reads
/// `/proc/PID/mem` of a copy-on-write child; tests use plain vectors.
pub trait Memory {
    /// Fills all of `buf` from `addr`, or fails as a whole. Calls are at most 1 MiB.
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Unreadable>;
}

/// Valgrind's heuristics that accept some interior pointers as start pointers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Heuristic {
    /// A pointer 3 words into `length capacity refcount chars[capacity+1]` (libstdc++'s old
    /// COW `std::string`).
    StdString,
    /// A pointer 8 bytes in, after a 64-bit "rest of the block" length (sqlite).
    Length64,
    /// A pointer 8 bytes in, after an element count that divides the rest (C++ `new T[n]`).
    NewArray,
    /// A pointer at a second vtable pointer inside an object whose first word is one too.
    MultipleInheritance,
}

impl Heuristic {
    /// In valgrind's order of testing (the first that matches wins).
    pub const ALL: [Heuristic; 4] =
        [Heuristic::StdString, Heuristic::Length64, Heuristic::NewArray, Heuristic::MultipleInheritance];

    /// Valgrind's name, as in `--leak-check-heuristics`.
    pub fn name(self) -> &'static str {
        match self {
            Heuristic::StdString => "stdstring",
            Heuristic::Length64 => "length64",
            Heuristic::NewArray => "newarray",
            Heuristic::MultipleInheritance => "multipleinheritance",
        }
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(code: u8) -> Option<Heuristic> {
        Heuristic::ALL.get(usize::from(code).checked_sub(1)?).copied()
    }
}

/// Which heuristics are on; the default, like valgrind's, is all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heuristics {
    pub stdstring: bool,
    pub length64: bool,
    pub newarray: bool,
    pub multipleinheritance: bool,
}

impl Heuristics {
    pub const ALL: Heuristics =
        Heuristics { stdstring: true, length64: true, newarray: true, multipleinheritance: true };
    pub const NONE: Heuristics =
        Heuristics { stdstring: false, length64: false, newarray: false, multipleinheritance: false };
}

impl Default for Heuristics {
    fn default() -> Self {
        Heuristics::ALL
    }
}

/// How to mark, and how much to report.
pub struct Options<'a> {
    pub heuristics: Heuristics,
    /// Whether an address is a vtable, for the multipleinheritance heuristic. Valgrind's test: it
    /// lies in a readable file mapping and its first 20 words hold at least two non-null words,
    /// all of them into executable file mappings. Without it the heuristic never matches.
    pub is_vtable: Option<&'a mut dyn FnMut(u64) -> bool>,
    /// Holders listed per site; the rest are summed in [`SiteSummary::holders_rest`].
    pub max_holders: usize,
    /// Cycles listed; the rest are summed in [`Cycles::rest`].
    pub max_cycles: usize,
    /// The one address inside a block of `(start, size)` that the allocator itself points at,
    /// if any: glibc's next chunk header sits in a block's last bytes (the requested size runs
    /// into it), and its arena's `top` or a free chunk's links point there. Such a pointer is
    /// the allocator's, not the program's: valgrind, whose malloc keeps no such pointers,
    /// never sees it.
    pub allocator_tail: Option<fn(u64, u64) -> Option<u64>>,
    /// Edges among lost blocks kept for the clique and cycle passes (4 bytes each). Past it the
    /// clique pass reads lost blocks again (same classes, slower) and cycles may be missed
    /// ([`Cycles::complete`] says so).
    pub max_lost_edges: usize,
    /// Holders by the object rather than the word: maps a root word's address (with its root)
    /// to the address that stands for it, so that the 4096 words of one bucket array are one
    /// holder. None: every word is its own.
    pub holder_word: Option<&'a mut dyn FnMut(u32, u64) -> u64>,
    /// Of the pointers in [`Roots::weak`], those to follow first: given a word's root and
    /// address, true if it is a better retainer (untracked memory that a global reaches, say,
    /// rather than an allocator's bookkeeping that points at every slab). Only the retainers
    /// depend on it.
    pub prefer_weak: Option<&'a mut dyn FnMut(u32, u64) -> bool>,
    /// Memory scanned as a block's though it lies before the block (see [`Prefix`]); each
    /// must end at or before its block's start and after the previous block's end.
    pub prefixes: &'a [Prefix],
    /// CPython 3.11/3.12 keep an instance's attribute values in a block of their own and point
    /// `k` bytes into it, past a prefix whose last byte is `k`: such a pointer counts as a
    /// start pointer.
    pub prefixed_starts: bool,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            heuristics: Heuristics::ALL,
            is_vtable: None,
            allocator_tail: None,
            max_holders: 16,
            max_cycles: 1000,
            max_lost_edges: 32 << 20,
            holder_word: None,
            prefer_weak: None,
            prefixes: &[],
            prefixed_starts: false,
        }
    }
}

/// Why the blocks could not be marked. Unreadable memory is not an error: it is counted.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MarkError {
    /// Block indices are 32-bit to keep per-block state small on heaps with millions of blocks.
    #[error("{count} tracked blocks are more than the scan can index (at most {max})")]
    TooManyBlocks { count: usize, max: usize },
    /// A block ends past the top of the address space: the block table is corrupt.
    #[error("tracked block {index} at {start:#x} of {size} bytes wraps around the address space")]
    BlockWraps { index: usize, start: u64, size: u64 },
    /// Two blocks share bytes or a start address (a zero-size block counts as one byte, as in
    /// valgrind's lookup): the block table is stale, e.g. a missed free. Drop one and retry.
    #[error("tracked blocks {first} and {second} overlap; the block table is stale (a missed free?)")]
    Overlap { first: usize, second: usize },
    /// A prefix that is not before its block, or runs into the previous one.
    #[error("the prefix of block {block} ({start:#x}-{end:#x}) is not just before it")]
    BadPrefix { block: usize, start: u64, end: u64 },
}

/// A block's class, valgrind's four leak kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    Reachable,
    PossiblyLost,
    IndirectlyLost,
    DefinitelyLost,
}

/// Where in a root a pointer was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RootSlot {
    /// The address of the word in a [`RootRange`].
    Word { addr: u64 },
    /// The index of the value in a [`RootValues`].
    Value { index: u32 },
}

/// A pointer's place in a root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RootRef {
    pub root: u32,
    pub slot: RootSlot,
}

/// Through what a block was first reached. Block indices are the caller's (input order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Retainer {
    /// Definitely lost: nothing reaches it (or it leads a cycle).
    None,
    /// A root word or register points at it.
    Root(RootRef),
    /// The word at `offset` in block `index` points at it.
    Block { index: usize, offset: u64 },
    /// Indirectly lost: `leader` is the definitely lost block of its clique; `parent` the lost
    /// block that pointed at it when the clique was gathered.
    Clique { leader: usize, parent: usize },
}

/// The verdict on one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockOutcome {
    pub class: Class,
    pub retainer: Retainer,
    /// Blocks from the root to this one, itself included (1: a root points at it); 0 when lost.
    pub depth: u32,
    /// Reachable: the heuristic that made it so (none if a start pointer reaches it too).
    /// Possibly lost: the heuristic its retaining pointer matched (valgrind counts it too).
    pub heuristic: Option<Heuristic>,
    /// Definitely lost: the bytes of its clique's indirectly lost blocks (valgrind's
    /// "N (D direct, I indirect) bytes").
    pub indirect_bytes: u64,
}

/// Blocks and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tally {
    pub blocks: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.blocks += 1;
        self.bytes += bytes;
    }
}

/// Valgrind's leak summary for a set of blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tallies {
    pub reachable: Tally,
    pub possibly_lost: Tally,
    pub indirectly_lost: Tally,
    pub definitely_lost: Tally,
    /// Bytes of the indirectly lost blocks that the definitely lost blocks lead.
    pub definitely_lost_indirect_bytes: u64,
    /// Reachable blocks by the heuristic that made them reachable, in [`Heuristic::ALL`] order.
    pub reachable_via: [Tally; 4],
    /// Possibly lost blocks whose retaining pointer matched a heuristic. Valgrind's "of which
    /// reachable via heuristic" lines count these too: its figure is `reachable_via` plus this.
    pub possible_via: [Tally; 4],
}

impl Tallies {
    /// The tally of one class.
    pub fn class(&self, class: Class) -> Tally {
        match class {
            Class::Reachable => self.reachable,
            Class::PossiblyLost => self.possibly_lost,
            Class::IndirectlyLost => self.indirectly_lost,
            Class::DefinitelyLost => self.definitely_lost,
        }
    }

    fn add(&mut self, o: &BlockOutcome, size: u64) {
        match o.class {
            Class::Reachable => self.reachable.add(size),
            Class::PossiblyLost => self.possibly_lost.add(size),
            Class::IndirectlyLost => self.indirectly_lost.add(size),
            Class::DefinitelyLost => {
                self.definitely_lost.add(size);
                self.definitely_lost_indirect_bytes += o.indirect_bytes;
            }
        }
        if let Some(h) = o.heuristic {
            match o.class {
                Class::Reachable => self.reachable_via[h as usize].add(size),
                Class::PossiblyLost => self.possible_via[h as usize].add(size),
                _ => {}
            }
        }
    }
}

/// What holds a run of reachable blocks of a site: the first thing up their retainer chains that
/// is not a block of the same site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HeldBy {
    Root(RootRef),
    /// A reachable block of another site.
    Site(u32),
}

/// The reachable blocks of a site held by one holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub by: HeldBy,
    pub blocks: u64,
    pub bytes: u64,
    /// The longest run of same-site blocks, each linked from the previous one, starting at the
    /// holder: 1 when it points at all of them directly, 1000 for a 1000-node list.
    pub longest_chain: u64,
    /// A block of the site that the holder points at directly, the nearest to a root (the
    /// caller's index): its retainers are the path from the root.
    pub example: usize,
}

/// What a bounded list left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rest {
    /// Entries left out.
    pub count: u64,
    pub blocks: u64,
    pub bytes: u64,
}

/// One call site's blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteSummary {
    pub site: u32,
    pub tallies: Tallies,
    /// Who holds its reachable blocks, most bytes first, at most [`Options::max_holders`].
    pub holders: Vec<Holder>,
    pub holders_rest: Rest,
}

/// Blocks and bytes of one site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteCount {
    pub site: u32,
    pub blocks: u64,
    pub bytes: u64,
}

/// A strongly connected component of lost blocks: two or more, or one pointing at itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cycle {
    pub blocks: u64,
    pub bytes: u64,
    /// The member at the lowest address (the caller's index).
    pub first: usize,
    /// Most blocks first.
    pub sites: Vec<SiteCount>,
}

/// Cycles of the same make-up: as many blocks of each site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CycleShape {
    /// (site, blocks of it in each cycle), by site.
    pub sites: Vec<(u32, u64)>,
    /// Cycles of this shape, and their blocks and bytes in all.
    pub count: u64,
    pub blocks: u64,
    pub bytes: u64,
    /// The member at the lowest address of one of them (the caller's index).
    pub example: usize,
}

/// The cycles among lost blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cycles {
    /// Most bytes first, at most [`Options::max_cycles`].
    pub list: Vec<Cycle>,
    pub rest: Rest,
    /// Every cycle (the listed and the rest) by shape, most cycles first, at most
    /// [`Options::max_cycles`] shapes; the others summed in `shapes_rest`.
    pub shapes: Vec<CycleShape>,
    pub shapes_rest: Rest,
    /// False when [`Options::max_lost_edges`] was reached: some cycles may be missing.
    pub complete: bool,
    /// Distinct pointer edges among lost blocks kept, and dropped over the limit.
    pub edges: u64,
    pub edges_dropped: u64,
}

/// What was scanned in one root id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RootStats {
    /// Words scanned (8 bytes each).
    pub words: u64,
    /// Register values looked at.
    pub values: u64,
    /// Bytes of the root ranges skipped because tracked blocks cover them.
    pub covered_bytes: u64,
    pub unreadable_bytes: u64,
    pub unreadable_ranges: u64,
}

/// Counters of the work done; no clocks in the model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub blocks: u64,
    pub block_bytes: u64,
    /// Words scanned in root ranges and in blocks, register values looked at.
    pub root_words: u64,
    pub block_words: u64,
    pub root_values: u64,
    /// Scanned words and values that pointed into a tracked block.
    pub pointers: u64,
    /// Unreadable memory, roots and blocks together; adjacent pages make one range.
    pub unreadable_bytes: u64,
    pub unreadable_ranges: u64,
    /// Heuristic checks that could not read the words they needed (then no heuristic applies).
    pub heuristic_unreadable: u64,
    /// Calls to [`Memory::read`] and the bytes they asked for.
    pub reads: u64,
    pub bytes_read: u64,
    pub roots: BTreeMap<u32, RootStats>,
}

/// The result of [`mark`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marking {
    /// One per input block, in input order.
    pub blocks: Vec<BlockOutcome>,
    /// Valgrind's leak summary over all blocks.
    pub totals: Tallies,
    /// By site id.
    pub sites: Vec<SiteSummary>,
    pub cycles: Cycles,
    pub stats: Stats,
}

/// Classifies `blocks` from `roots`, reading the snapshot through `mem` (see the module doc).
pub fn mark(
    blocks: &[Block],
    roots: &Roots,
    mem: &mut dyn Memory,
    opts: Options<'_>,
) -> Result<Marking, MarkError> {
    let mut heap = Heap::new(blocks, opts.prefixes)?;
    heap.tail = opts.allocator_tail;
    let n = heap.ext.len();
    let mut m = Marker {
        heap: &heap,
        rd: Reader::new(mem),
        test: HeuristicTest { set: opts.heuristics, is_vtable: opts.is_vtable, memo: IntMap::default() },
        st: vec![UNREACHED; n],
        heur: vec![0; n],
        pkind: vec![P_NONE; n],
        pref: vec![NONE; n],
        pat: vec![0; n],
        depth: vec![NONE; n],
        stats: Stats {
            blocks: n as u64,
            block_bytes: heap.ext.iter().map(|e| e.size).sum(),
            ..Stats::default()
        },
        hits: Vec::new(),
        prefixed_starts: opts.prefixed_starts,
    };

    let (order, seeds) = m.mark_reachable(roots, opts.prefer_weak);
    m.mark_possible(&seeds);
    let lost: Vec<u32> = (0..n as u32).filter(|&b| m.st[b as usize] == UNREACHED).collect();
    let graph = m.lost_graph(&lost, opts.max_lost_edges);
    let leader = m.cliques(&lost, &graph);

    let outcomes = m.outcomes(&leader);
    let cycles = cycles(&heap, &lost, &graph, opts.max_cycles);
    let (totals, sites) = m.summaries(blocks, &outcomes, &order, opts.max_holders, opts.holder_word);
    let mut stats = m.stats;
    stats.unreadable_bytes = m.rd.unreadable_bytes;
    stats.unreadable_ranges = m.rd.unreadable_ranges;
    stats.reads = m.rd.reads;
    stats.bytes_read = m.rd.bytes_read;
    stats.heuristic_unreadable = m.rd.word_failures;
    Ok(Marking { blocks: outcomes, totals, sites, cycles, stats })
}

/// The tracked blocks sorted by address, for pointer lookup.
struct Heap {
    /// Start and size side by side: a lookup touches one cache line, not two.
    ext: Vec<Extent>,
    /// Sorted index -> the caller's index, and the block's site.
    caller: Vec<u32>,
    site: Vec<u32>,
    /// Every block lies in [lo, hi): most words are rejected by this alone.
    lo: u64,
    hi: u64,
    /// Runs of blocks with no wide gap, each with a bucket table, so that a lookup searches
    /// a handful of blocks instead of millions (a plain binary search made marking 3x slower).
    clusters: Vec<Cluster>,
    /// Per cluster, bucket `k` -> the first block that ends after the bucket's start; one more
    /// entry closes each cluster's table.
    buckets: Vec<u32>,
    /// See [`Options::allocator_tail`].
    tail: Option<fn(u64, u64) -> Option<u64>>,
    /// (sorted index, start, end) of each block's [`Prefix`], by sorted index.
    prefixes: Vec<(u32, u64, u64)>,
}

#[derive(Clone, Copy, Debug)]
struct Extent {
    start: u64,
    size: u64,
}

/// Blocks `first..end` span `[lo, hi)`, cut into buckets of `1 << shift` bytes.
struct Cluster {
    lo: u64,
    hi: u64,
    shift: u32,
    table: usize,
    end: u32,
}

/// A gap wider than this starts a new cluster: buckets over it would be empty.
const CLUSTER_GAP: u64 = 1 << 20;

impl Heap {
    fn new(blocks: &[Block], prefixes: &[Prefix]) -> Result<Heap, MarkError> {
        let max = NONE as usize;
        if blocks.len() >= max {
            return Err(MarkError::TooManyBlocks { count: blocks.len(), max: max - 1 });
        }
        // Sorting the keys themselves, not indices into `blocks`, keeps the sort cache-friendly.
        let mut keyed: Vec<(u64, u32)> =
            blocks.iter().enumerate().map(|(i, b)| (b.start, i as u32)).collect();
        keyed.sort_unstable();
        let mut heap = Heap {
            ext: Vec::with_capacity(blocks.len()),
            caller: keyed.into_iter().map(|(_, i)| i).collect(),
            site: Vec::with_capacity(blocks.len()),
            lo: u64::MAX,
            hi: 0,
            clusters: Vec::new(),
            buckets: Vec::new(),
            tail: None,
            prefixes: Vec::new(),
        };
        let mut prev: Option<(usize, u64)> = None;
        for &i in &heap.caller {
            let b = blocks[i as usize];
            // A zero-size block still owns its start address (valgrind's find_chunk_for).
            let end = b.start.checked_add(b.size.max(1)).ok_or(MarkError::BlockWraps {
                index: i as usize,
                start: b.start,
                size: b.size,
            })?;
            if let Some((p, pend)) = prev
                && b.start < pend
            {
                return Err(MarkError::Overlap { first: p, second: i as usize });
            }
            prev = Some((i as usize, end));
            heap.ext.push(Extent { start: b.start, size: b.size });
            heap.site.push(b.site);
            heap.lo = heap.lo.min(b.start);
            heap.hi = heap.hi.max(end);
        }
        heap.index();
        heap.set_prefixes(blocks, prefixes)?;
        Ok(heap)
    }

    fn set_prefixes(&mut self, blocks: &[Block], prefixes: &[Prefix]) -> Result<(), MarkError> {
        if prefixes.is_empty() {
            return Ok(());
        }
        let mut sorted_of = vec![NONE; blocks.len()];
        for (k, &i) in self.caller.iter().enumerate() {
            sorted_of[i as usize] = k as u32;
        }
        for p in prefixes {
            let bad = MarkError::BadPrefix { block: p.block, start: p.start, end: p.end };
            let k = *sorted_of.get(p.block).ok_or(bad.clone())?;
            let prev_end =
                k.checked_sub(1).map_or(0, |j| self.ext[j as usize].start + self.ext[j as usize].size);
            if p.start >= p.end || p.end > self.ext[k as usize].start || p.start < prev_end {
                return Err(bad);
            }
            self.prefixes.push((k, p.start, p.end));
        }
        self.prefixes.sort_unstable();
        Ok(())
    }

    /// The aligned words of block `b`'s prefix, if it has one.
    fn prefix_words(&self, b: u32) -> Option<(u64, u64)> {
        if self.prefixes.is_empty() {
            return None;
        }
        let i = self.prefixes.binary_search_by_key(&b, |p| p.0).ok()?;
        let (_, s, e) = self.prefixes[i];
        Some((up8(s)?, e & !(WORD - 1)))
    }

    fn lookup_end(&self, b: usize) -> u64 {
        self.ext[b].start + self.ext[b].size.max(1)
    }

    /// Builds the clusters and their bucket tables: about two buckets per block.
    fn index(&mut self) {
        let n = self.ext.len();
        let mut first = 0;
        while first < n {
            let mut end = first + 1;
            let mut hi = self.lookup_end(first);
            while end < n && self.ext[end].start - hi <= CLUSTER_GAP {
                hi = self.lookup_end(end);
                end += 1;
            }
            let lo = self.ext[first].start;
            let want = 2 * (end - first) as u64;
            let mut shift = 4;
            while (hi - lo) >> shift > want {
                shift += 1;
            }
            let table = self.buckets.len();
            let mut j = first;
            for k in 0..=((hi - lo) >> shift) + 1 {
                let offset = u64::try_from(u128::from(k) << shift).unwrap_or(u64::MAX);
                let bucket_start = lo.saturating_add(offset);
                while j < end && self.lookup_end(j) <= bucket_start {
                    j += 1;
                }
                self.buckets.push(j as u32);
            }
            self.clusters.push(Cluster { lo, hi, shift, table, end: end as u32 });
            first = end;
        }
    }

    /// The block that `p` points at or into.
    #[inline]
    fn find(&self, p: u64) -> Option<u32> {
        let (k, end) = self.bucket(p)?;
        self.search(p, self.buckets[k] as usize, self.buckets[k + 1] as usize, end)
    }

    /// The bucket where `p` would be, and the end of its cluster; `None` for most non-pointers.
    #[inline]
    fn bucket(&self, p: u64) -> Option<(usize, u32)> {
        if p < self.lo || p >= self.hi {
            return None;
        }
        let c = match self.clusters.as_slice() {
            [only] => only,
            all => &all[all.partition_point(|c| c.lo <= p).checked_sub(1)?],
        };
        if p >= c.hi {
            return None;
        }
        Some((c.table + ((p - c.lo) >> c.shift) as usize, c.end))
    }

    /// Searches bucket `[first, next]`: its blocks, and the one that starts in it and runs into
    /// the next bucket.
    #[inline]
    fn search(&self, p: u64, first: usize, next: usize, cluster_end: u32) -> Option<u32> {
        let end = (next + 1).min(cluster_end as usize);
        let i = first + self.ext.get(first..end)?.partition_point(|e| e.start <= p).checked_sub(1)?;
        let e = self.ext[i];
        if self.tail.is_some_and(|t| t(e.start, e.size) == Some(p)) {
            return None;
        }
        (p - e.start < e.size.max(1)).then_some(i as u32)
    }

    /// The aligned words wholly inside block `b` (valgrind rounds the start up, the end down).
    fn words(&self, b: u32) -> (u64, u64) {
        let (s, e) = (self.ext[b as usize].start, self.ext[b as usize].start + self.ext[b as usize].size);
        (up8(s).unwrap_or(e), e & !(WORD - 1))
    }
}

fn up8(a: u64) -> Option<u64> {
    Some(a.checked_add(WORD - 1)? & !(WORD - 1))
}

/// A multiplicative hasher for our integer keys: SipHash took a tenth of the marking time on
/// heaps with millions of blocks. The keys are our own ids and addresses inside tracked blocks;
/// a target crafting collisions could at worst slow its own scan.
#[derive(Clone, Copy, Default)]
struct IntHasher(u64);

impl std::hash::Hasher for IntHasher {
    fn finish(&self) -> u64 {
        // Fold the high half in: the table indexes with the low bits, and pointers' low bits
        // are zeros.
        let m = u128::from(self.0) * 0x9e37_79b9_7f4a_7c15;
        (m as u64) ^ ((m >> 64) as u64)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// Who holds a pointer that was found.
#[derive(Clone, Copy, Debug)]
enum Src {
    Block(u32),
    Word(u32),
    Value(u32),
}

/// A scanned word (or value) that points into tracked block `target`.
#[derive(Clone, Copy, Debug)]
struct Hit {
    from: Src,
    /// The word's address; for a root value, its index.
    at: u64,
    value: u64,
    target: u32,
}

/// Aligned memory to read; `tag` says whose it is (a block index or a root id).
#[derive(Clone, Copy, Debug)]
struct Span {
    start: u64,
    end: u64,
    tag: u32,
}

/// Pushes `[start, end)` in pieces of at most [`CHUNK`], so that each read and each batch of
/// pointers found stays bounded however large a block or root is.
fn push_span(spans: &mut Vec<Span>, start: u64, end: u64, tag: u32) {
    let mut s = start;
    while s < end {
        let e = end.min(s.saturating_add(CHUNK));
        spans.push(Span { start: s, end: e, tag });
        s = e;
    }
}

/// Groups sorted spans into reads: neighbours closer than [`COALESCE_GAP`], within [`CHUNK`].
fn groups(spans: &[Span]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = spans.get(i)?;
        let begin = i;
        let mut end = first.end;
        i += 1;
        while let Some(s) = spans.get(i)
            && s.start >= end
            && s.start - end <= COALESCE_GAP
            && s.end - first.start <= CHUNK
        {
            end = s.end;
            i += 1;
        }
        Some(begin..i)
    })
}

/// Reads through [`Memory`] in chunks, falling back to pages, counting what fails.
struct Reader<'m> {
    mem: &'m mut dyn Memory,
    buf: Vec<u8>,
    reads: u64,
    bytes_read: u64,
    unreadable_bytes: u64,
    unreadable_ranges: u64,
    /// Where the last unreadable piece ended, to count adjacent pages as one range.
    bad_end: u64,
    word_failures: u64,
}

impl<'m> Reader<'m> {
    fn new(mem: &'m mut dyn Memory) -> Self {
        Reader {
            mem,
            buf: Vec::new(),
            reads: 0,
            bytes_read: 0,
            unreadable_bytes: 0,
            unreadable_ranges: 0,
            bad_end: u64::MAX,
            word_failures: 0,
        }
    }

    /// Reads `[s, e)` (at most [`CHUNK`]) into the front of `buf`.
    fn fill(&mut self, s: u64, e: u64) -> bool {
        let len = (e - s) as usize;
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        self.reads += 1;
        self.bytes_read += e - s;
        self.mem.read(s, &mut self.buf[..len]).is_ok()
    }

    fn bad(&mut self, s: u64, e: u64) {
        self.unreadable_bytes += e - s;
        if s != self.bad_end {
            self.unreadable_ranges += 1;
        }
        self.bad_end = e;
    }

    /// Reads a group of spans in one call, or span by span and page by page if that fails, and
    /// hands each readable piece to `f`.
    fn read_group(&mut self, spans: &[Span], mut f: impl FnMut(&Span, u64, &[u8])) {
        let (Some(first), Some(last)) = (spans.first(), spans.last()) else { return };
        if self.fill(first.start, last.end) {
            for s in spans {
                f(s, s.start, &self.buf[(s.start - first.start) as usize..(s.end - first.start) as usize]);
            }
            return;
        }
        for s in spans {
            if spans.len() > 1 && self.fill(s.start, s.end) {
                f(s, s.start, &self.buf[..(s.end - s.start) as usize]);
                continue;
            }
            if s.start / PAGE == (s.end - 1) / PAGE {
                self.bad(s.start, s.end); // a single page just failed: no need to retry it
                continue;
            }
            let mut p = s.start;
            while p < s.end {
                let e = s.end.min((p / PAGE + 1) * PAGE);
                if self.fill(p, e) {
                    f(s, p, &self.buf[..(e - p) as usize]);
                } else {
                    self.bad(p, e);
                }
                p = e;
            }
        }
    }

    /// One word for a heuristic; valgrind's checks simply fail on unreadable words.
    fn word(&mut self, addr: u64) -> Option<u64> {
        let mut w = [0u8; 8];
        self.reads += 1;
        self.bytes_read += WORD;
        match self.mem.read(addr, &mut w) {
            Ok(()) => Some(u64::from_ne_bytes(w)),
            Err(Unreadable) => {
                self.word_failures += 1;
                None
            }
        }
    }
}

/// Pushes a hit for every word of `bytes` (read at `addr`) that points into a block.
fn scan_words(heap: &Heap, from: Src, addr: u64, bytes: &[u8], hits: &mut Vec<Hit>) -> u64 {
    // Lookups go in stages over a batch of words: the table loads of a batch are independent
    // and overlap in the memory system, where one word at a time waits for each miss in turn.
    const BATCH: usize = 32;
    let (words, _) = bytes.as_chunks::<8>();
    let mut value = [0u64; BATCH];
    let mut at = [0u64; BATCH];
    let mut bucket = [(0usize, 0u32); BATCH];
    let mut bounds = [(0u32, 0u32); BATCH];
    for (c, chunk) in words.chunks(BATCH).enumerate() {
        let base = addr + WORD * (c * BATCH) as u64;
        let mut m = 0;
        for (j, w) in chunk.iter().enumerate() {
            let v = u64::from_ne_bytes(*w);
            if let Some(b) = heap.bucket(v) {
                (value[m], at[m], bucket[m]) = (v, base + WORD * j as u64, b);
                m += 1;
            }
        }
        for j in 0..m {
            let k = bucket[j].0;
            bounds[j] = (heap.buckets[k], heap.buckets[k + 1]);
        }
        // Touch each bucket's first block the same way, so that the search finds it cached.
        let mut touch = 0u64;
        for &(first, _) in &bounds[..m] {
            touch ^= heap.ext.get(first as usize).map_or(0, |e| e.start);
        }
        std::hint::black_box(touch);
        for j in 0..m {
            let (first, next) = bounds[j];
            if let Some(target) = heap.search(value[j], first as usize, next as usize, bucket[j].1) {
                hits.push(Hit { from, at: at[j], value: value[j], target });
            }
        }
    }
    words.len() as u64
}

/// Valgrind's `heuristic_reachedness`, memoized per pointer value (a pure function of it).
struct HeuristicTest<'v> {
    set: Heuristics,
    is_vtable: Option<&'v mut dyn FnMut(u64) -> bool>,
    memo: IntMap<u64, u8>,
}

impl HeuristicTest<'_> {
    /// The heuristic code (0: none) for interior pointer `ptr` into block `b`.
    fn check(&mut self, heap: &Heap, rd: &mut Reader, ptr: u64, b: u32) -> u8 {
        if self.set == Heuristics::NONE {
            return 0;
        }
        // Most interior pointers sit where no heuristic looks: answer those without the memo.
        let (start, size) = (heap.ext[b as usize].start, heap.ext[b as usize].size);
        let at = ptr.wrapping_sub(start);
        let mi = self.set.multipleinheritance
            && self.is_vtable.is_some()
            && ptr.is_multiple_of(WORD)
            && at.checked_add(WORD).is_some_and(|e| e <= size);
        if at != WORD && at != 3 * WORD && !mi {
            return 0;
        }
        if let Some(&h) = self.memo.get(&ptr) {
            return h;
        }
        let h = self.compute(heap, rd, ptr, b).map_or(0, Heuristic::code);
        self.memo.insert(ptr, h);
        h
    }

    fn compute(&mut self, heap: &Heap, rd: &mut Reader, ptr: u64, b: u32) -> Option<Heuristic> {
        let (start, size) = (heap.ext[b as usize].start, heap.ext[b as usize].size);
        // Valgrind reads only aligned words, and only inside the block (the rest is red zone).
        if !start.is_multiple_of(WORD) || ptr <= start {
            return None;
        }
        let mut first: Option<Option<u64>> = None;
        let mut first_word = |rd: &mut Reader| *first.get_or_insert_with(|| rd.word(start));
        if self.set.stdstring && start.checked_add(3 * WORD) == Some(ptr) {
            // length, capacity, refcount, then capacity + 1 chars (the last a NUL).
            if let Some(capacity) = rd.word(start + WORD)
                && (3 * WORD).wrapping_add(capacity).wrapping_add(1) == size
                && let Some(length) = first_word(rd)
                && length <= capacity
            {
                return Some(Heuristic::StdString);
            }
        }
        if self.set.length64
            && start.checked_add(WORD) == Some(ptr)
            && let Some(len) = first_word(rd)
            && len > 0
            && size - WORD == len
        {
            return Some(Heuristic::Length64);
        }
        if self.set.newarray
            && start.checked_add(WORD) == Some(ptr)
            && let Some(count) = first_word(rd)
            && count > 0
            && (size - WORD).is_multiple_of(count)
        {
            return Some(Heuristic::NewArray);
        }
        if self.set.multipleinheritance
            && let Some(is_vtable) = self.is_vtable.as_mut()
            && ptr.is_multiple_of(WORD)
            && ptr.checked_add(WORD).is_some_and(|e| e <= start + size)
            && let Some(inner) = rd.word(ptr)
            && inner.is_multiple_of(WORD)
            && inner >= PAGE
            && let Some(outer) = first_word(rd)
            && outer.is_multiple_of(WORD)
            && outer >= PAGE
            && is_vtable(inner)
            && is_vtable(outer)
        {
            return Some(Heuristic::MultipleInheritance);
        }
        None
    }
}

/// The edges among lost blocks, by lost ordinal (lost blocks in address order).
struct LostGraph {
    /// Block index -> lost ordinal, [`NONE`] when not lost.
    ord: Vec<u32>,
    /// Ordinal `o` points at `adj[off[o]..off[o + 1]]` (sorted, distinct ordinals).
    off: Vec<usize>,
    adj: Vec<u32>,
    complete: bool,
    dropped: u64,
}

impl LostGraph {
    fn flush(&mut self, o: u32, targets: &mut Vec<u32>, budget: usize) {
        if o == NONE {
            return;
        }
        targets.sort_unstable();
        targets.dedup();
        while self.off.len() <= o as usize {
            self.off.push(self.adj.len());
        }
        if self.complete && self.adj.len() + targets.len() <= budget {
            self.adj.extend_from_slice(targets);
        } else {
            self.complete = false;
            self.dropped += targets.len() as u64;
        }
        targets.clear();
    }

    fn targets(&self, o: usize) -> &[u32] {
        &self.adj[self.off[o]..self.off[o + 1]]
    }
}

/// Marking state, per block in address order.
struct Marker<'h, 'm, 'v> {
    heap: &'h Heap,
    rd: Reader<'m>,
    test: HeuristicTest<'v>,
    st: Vec<u8>,
    /// Heuristic code (0: none).
    heur: Vec<u8>,
    /// The parent: kind, block index or root id, word address or value index.
    pkind: Vec<u8>,
    pref: Vec<u32>,
    pat: Vec<u64>,
    depth: Vec<u32>,
    stats: Stats,
    hits: Vec<Hit>,
    /// See [`Options::prefixed_starts`].
    prefixed_starts: bool,
}

impl Marker<'_, '_, '_> {
    /// A pointer to the start of block `t`, or (see [`Options::prefixed_starts`]) just past
    /// the prefix whose last byte says how long it is.
    fn is_start(&mut self, t: usize, value: u64) -> bool {
        let start = self.heap.ext[t].start;
        if value == start {
            return true;
        }
        let k = value - start;
        if !self.prefixed_starts || !k.is_multiple_of(8) || k > 256 {
            return false;
        }
        self.rd.word(value - 8).is_some_and(|w| (w >> 56) == k)
    }

    fn set_parent(&mut self, t: usize, h: &Hit) {
        let (kind, r) = match h.from {
            Src::Block(b) => (P_BLOCK, b),
            Src::Word(r) => (P_WORD, r),
            Src::Value(r) => (P_VALUE, r),
        };
        self.pkind[t] = kind;
        self.pref[t] = r;
        self.pat[t] = h.at;
    }

    /// Scans `[start, start+len)` minus the words that overlap tracked blocks, a window of
    /// [`CHUNK`] bytes at a time (a heap arena passed as a root has a gap between every two
    /// blocks: listing them all first could take gigabytes).
    fn scan_root_range(&mut self, r: &RootRange, on_hits: &mut dyn FnMut(&mut Self, &[Hit])) {
        let heap = self.heap;
        let end = r.start.saturating_add(r.len) & !(WORD - 1);
        let Some(ws) = up8(r.start).filter(|&ws| ws < end) else { return };
        let (bad_bytes, bad_ranges) = (self.rd.unreadable_bytes, self.rd.unreadable_ranges);
        let mut spans = Vec::new();
        let (mut words, mut gap_bytes) = (0, 0);
        // `cur`: the first word not yet known to overlap a block; `k`: the next block to look at.
        let mut cur = ws;
        let mut k = heap.ext.partition_point(|e| e.start < ws).saturating_sub(1);
        let mut window = ws;
        while window < end {
            let window_end = end.min(window.saturating_add(CHUNK));
            spans.clear();
            while let Some(e) = heap.ext.get(k)
                && e.start < window_end
            {
                k += 1;
                let block_end = e.start + e.size;
                if block_end <= cur || e.size == 0 {
                    continue;
                }
                let gap_end = e.start & !(WORD - 1);
                if gap_end > cur {
                    push_span(&mut spans, cur, gap_end, r.root);
                }
                cur = up8(block_end).unwrap_or(end).max(cur);
            }
            if cur < window_end {
                push_span(&mut spans, cur, window_end, r.root);
            }
            cur = cur.max(window_end);
            window = window_end;
            gap_bytes += spans.iter().map(|s| s.end - s.start).sum::<u64>();
            for g in groups(&spans) {
                let mut hits = std::mem::take(&mut self.hits);
                hits.clear();
                self.rd.read_group(&spans[g], |_, a, bytes| {
                    words += scan_words(heap, Src::Word(r.root), a, bytes, &mut hits)
                });
                self.stats.pointers += hits.len() as u64;
                on_hits(self, &hits);
                self.hits = hits;
            }
        }
        self.stats.root_words += words;
        let rs = self.stats.roots.entry(r.root).or_default();
        rs.words += words;
        rs.covered_bytes += end - ws - gap_bytes;
        rs.unreadable_bytes += self.rd.unreadable_bytes - bad_bytes;
        rs.unreadable_ranges += self.rd.unreadable_ranges - bad_ranges;
    }

    /// Scans the words of `blocks` (sorted by address), one batch of hits per read, listing the
    /// spans to read a few thousand blocks at a time.
    fn scan_blocks(&mut self, blocks: &[u32], on_hits: &mut dyn FnMut(&mut Self, &[Hit])) {
        let heap = self.heap;
        let mut spans = Vec::new();
        let mut words = 0;
        for batch in blocks.chunks(4096) {
            spans.clear();
            for &b in batch {
                if let Some((s, e)) = heap.prefix_words(b) {
                    push_span(&mut spans, s, e, b);
                }
                let (s, e) = heap.words(b);
                push_span(&mut spans, s, e, b);
            }
            for g in groups(&spans) {
                let mut hits = std::mem::take(&mut self.hits);
                hits.clear();
                self.rd.read_group(&spans[g], |s, a, bytes| {
                    words += scan_words(heap, Src::Block(s.tag), a, bytes, &mut hits)
                });
                self.stats.pointers += hits.len() as u64;
                on_hits(self, &hits);
                self.hits = hits;
            }
        }
        self.stats.block_words += words;
    }

    /// Pass 1: breadth-first from the roots along start and heuristic pointers. Returns the
    /// reachable blocks in the order reached, and the blocks that plain interior pointers from
    /// roots or reachable blocks point at (the seeds of pass 2), shallowest first.
    fn mark_reachable(
        &mut self,
        roots: &Roots,
        mut prefer_weak: Option<&mut dyn FnMut(u32, u64) -> bool>,
    ) -> (Vec<u32>, Vec<u32>) {
        let mut next = Vec::new();
        let mut seeds = Vec::new();
        let mut order = Vec::new();
        // The named roots first, and all they reach.
        let first = self.value_hits(&roots.first);
        for h in &first {
            self.definite(h, 1, &mut next, &mut seeds);
        }
        self.spread(&mut next, &mut seeds, &mut order);
        let mut on_root = |m: &mut Self, hits: &[Hit]| {
            for h in hits {
                m.definite(h, 1, &mut next, &mut seeds);
            }
        };
        // The weak roots' pointers, the preferred ones first (read before any marking: they do
        // not depend on it).
        let mut weak_hits: Vec<Hit> = Vec::new();
        for r in &roots.weak {
            self.scan_root_range(r, &mut |_: &mut Self, hits: &[Hit]| weak_hits.extend_from_slice(hits));
        }
        let (first, later): (Vec<Hit>, Vec<Hit>) =
            weak_hits.into_iter().partition(|h| match (&mut prefer_weak, h.from) {
                (Some(f), Src::Word(root)) => f(root, h.at),
                _ => false,
            });
        // Registers and red zones: with untracked memory among the roots, after it (a block
        // that a global reaches through untracked memory is named by that chain, not by a
        // register that held its address at the stop); else with the others.
        let mut late_hits: Vec<Hit> = Vec::new();
        for r in &roots.late {
            self.scan_root_range(r, &mut |_: &mut Self, hits: &[Hit]| late_hits.extend_from_slice(hits));
        }
        late_hits.extend(self.value_hits(&roots.values));
        for r in &roots.ranges {
            self.scan_root_range(r, &mut on_root);
        }
        let phases = if roots.weak.is_empty() {
            on_root(self, &late_hits);
            [first, later, Vec::new()]
        } else {
            [first, later, late_hits]
        };
        self.spread(&mut next, &mut seeds, &mut order);
        for hits in phases {
            for h in &hits {
                self.definite(h, 1, &mut next, &mut seeds);
            }
            self.spread(&mut next, &mut seeds, &mut order);
        }
        (order, seeds)
    }

    /// The root values that point into blocks.
    fn value_hits(&mut self, values: &[RootValues]) -> Vec<Hit> {
        let mut hits = Vec::new();
        for v in values {
            for (i, &value) in v.values.iter().enumerate() {
                if let Some(target) = self.heap.find(value) {
                    let at = u64::try_from(i).unwrap_or(u64::MAX);
                    hits.push(Hit { from: Src::Value(v.root), at, value, target });
                    self.stats.pointers += 1;
                }
            }
            self.stats.root_values += v.values.len() as u64;
            self.stats.roots.entry(v.root).or_default().values += v.values.len() as u64;
        }
        hits
    }

    /// Breadth-first from the blocks in `next` (reached at depth 1) along start pointers.
    fn spread(&mut self, next: &mut Vec<u32>, seeds: &mut Vec<u32>, order: &mut Vec<u32>) {
        let mut depth = 1;
        while !next.is_empty() {
            let mut frontier = std::mem::take(next);
            frontier.sort_unstable(); // address order: neighbours share reads
            order.extend_from_slice(&frontier);
            depth += 1;
            self.scan_blocks(&frontier, &mut |m, hits| {
                for h in hits {
                    m.definite(h, depth, next, seeds);
                }
            });
        }
    }

    /// A pointer from a root or a reachable block (valgrind's `is_prior_definite`).
    fn definite(&mut self, h: &Hit, depth: u32, next: &mut Vec<u32>, seeds: &mut Vec<u32>) {
        let t = h.target as usize;
        let start = self.is_start(t, h.value);
        if self.st[t] == REACHABLE {
            if start {
                self.heur[t] = 0; // reached by a real start pointer after all
            }
            return;
        }
        let heur = if start { 0 } else { self.test.check(self.heap, &mut self.rd, h.value, h.target) };
        if start || heur != 0 {
            self.st[t] = REACHABLE;
            self.heur[t] = heur;
            self.depth[t] = depth;
            self.set_parent(t, h);
            next.push(h.target);
        } else if self.depth[t] == NONE {
            self.depth[t] = depth; // a tentative parent: the block may still become reachable
            self.set_parent(t, h);
            seeds.push(h.target);
        }
    }

    /// Pass 2: breadth-first from the seeds along any pointer, to blocks not reachable: these
    /// are possibly lost. Seeds join at their own depth, so chains stay shortest.
    fn mark_possible(&mut self, seeds: &[u32]) {
        let mut si = 0;
        let mut next: Vec<u32> = Vec::new();
        let mut next_depth = NONE;
        let mut frontier = Vec::new();
        loop {
            while let Some(&s) = seeds.get(si)
                && self.st[s as usize] != UNREACHED
            {
                si += 1;
            }
            let seed_depth = seeds.get(si).map_or(NONE, |&s| self.depth[s as usize]);
            let depth = if next.is_empty() { seed_depth } else { seed_depth.min(next_depth) };
            if depth == NONE {
                break;
            }
            frontier.clear();
            if next_depth == depth {
                for b in next.drain(..) {
                    self.visit_possible(b, depth, &mut frontier);
                }
            }
            while let Some(&s) = seeds.get(si)
                && self.depth[s as usize] <= depth
            {
                si += 1;
                self.visit_possible(s, depth, &mut frontier);
            }
            frontier.sort_unstable();
            next_depth = depth + 1;
            self.scan_blocks(&frontier, &mut |m, hits| {
                for h in hits {
                    let t = h.target as usize;
                    if m.st[t] != UNREACHED || m.depth[t] <= next_depth {
                        continue;
                    }
                    m.depth[t] = next_depth;
                    m.set_parent(t, h);
                    // Valgrind records the heuristic of any interior pointer, even from a
                    // possibly lost block (which cannot make the target reachable).
                    m.heur[t] = if h.value == m.heap.ext[t].start {
                        0
                    } else {
                        m.test.check(m.heap, &mut m.rd, h.value, h.target)
                    };
                    next.push(h.target);
                }
            });
        }
    }

    fn visit_possible(&mut self, b: u32, depth: u32, frontier: &mut Vec<u32>) {
        if self.st[b as usize] == UNREACHED && self.depth[b as usize] == depth {
            self.st[b as usize] = POSSIBLE;
            frontier.push(b);
        }
    }

    /// Reads every lost block once, in address order, and keeps the edges among lost blocks.
    fn lost_graph(&mut self, lost: &[u32], budget: usize) -> LostGraph {
        let mut ord = vec![NONE; self.st.len()];
        for (o, &b) in lost.iter().enumerate() {
            ord[b as usize] = o as u32;
        }
        let mut g = LostGraph { ord, off: vec![0], adj: Vec::new(), complete: true, dropped: 0 };
        let mut cur = NONE;
        let mut targets = Vec::new();
        self.scan_blocks(lost, &mut |_, hits| {
            for h in hits {
                let Src::Block(s) = h.from else { continue };
                let so = g.ord[s as usize];
                if so != cur {
                    g.flush(cur, &mut targets, budget);
                    cur = so;
                }
                let t = g.ord[h.target as usize];
                if t != NONE {
                    targets.push(t);
                }
            }
        });
        g.flush(cur, &mut targets, budget);
        while g.off.len() <= lost.len() {
            g.off.push(g.adj.len());
        }
        g
    }

    /// The lost blocks block `b` points at (block indices), from the graph or, past the edge
    /// limit, by reading `b` again.
    fn successors(&mut self, b: u32, lost: &[u32], g: &LostGraph, out: &mut Vec<u32>) {
        out.clear();
        if g.complete {
            out.extend(g.targets(g.ord[b as usize] as usize).iter().map(|&o| lost[o as usize]));
            return;
        }
        let (words, pointers) = (self.stats.block_words, self.stats.pointers);
        self.scan_blocks(&[b], &mut |_, hits| {
            out.extend(hits.iter().map(|h| h.target).filter(|&t| g.ord[t as usize] != NONE));
        });
        // The same words again: count them once.
        (self.stats.block_words, self.stats.pointers) = (words, pointers);
        out.sort_unstable();
        out.dedup();
    }

    /// Pass 3, valgrind's cliques: in address order, each block still unreached leads the
    /// unreached blocks it reaches, earlier leaders included. Returns each lost block's final
    /// leader ([`NONE`] for leaders and for blocks not lost).
    fn cliques(&mut self, lost: &[u32], g: &LostGraph) -> Vec<u32> {
        let mut leader = vec![NONE; self.st.len()];
        let mut queue = Vec::new();
        let mut succ = Vec::new();
        for &i in lost {
            if self.st[i as usize] != UNREACHED {
                continue;
            }
            self.st[i as usize] = LEADER;
            queue.clear();
            queue.push(i);
            let mut qi = 0;
            while let Some(&x) = queue.get(qi) {
                qi += 1;
                self.successors(x, lost, g, &mut succ);
                for &y in &succ {
                    let yu = y as usize;
                    let absorbed = match self.st[yu] {
                        UNREACHED => INDIRECT,
                        // An earlier leader: already gathered its clique, which moves here.
                        LEADER if y != i => ABSORBED,
                        _ => continue,
                    };
                    self.st[yu] = absorbed;
                    leader[yu] = i;
                    self.pkind[yu] = P_BLOCK;
                    self.pref[yu] = x;
                    if absorbed == INDIRECT {
                        queue.push(y);
                    }
                }
            }
        }
        // A leader is absorbed only by a later one: resolve from the top down.
        for &b in lost.iter().rev() {
            let l = leader[b as usize];
            if self.st[b as usize] == ABSORBED && self.st[l as usize] == ABSORBED {
                leader[b as usize] = leader[l as usize];
            }
        }
        for &b in lost {
            let l = leader[b as usize];
            if self.st[b as usize] == INDIRECT && self.st[l as usize] == ABSORBED {
                leader[b as usize] = leader[l as usize];
            }
        }
        leader
    }

    /// Per-block verdicts, in the caller's order.
    fn outcomes(&self, leader: &[u32]) -> Vec<BlockOutcome> {
        let heap = self.heap;
        let n = heap.ext.len();
        let mut indirect = vec![0u64; n];
        for b in 0..n {
            if matches!(self.st[b], INDIRECT | ABSORBED) && leader[b] != NONE {
                indirect[leader[b] as usize] += heap.ext[b].size;
            }
        }
        let none = BlockOutcome {
            class: Class::DefinitelyLost,
            retainer: Retainer::None,
            depth: 0,
            heuristic: None,
            indirect_bytes: 0,
        };
        let mut out = vec![none; n];
        for b in 0..n {
            let class = match self.st[b] {
                REACHABLE => Class::Reachable,
                POSSIBLE => Class::PossiblyLost,
                INDIRECT | ABSORBED => Class::IndirectlyLost,
                _ => Class::DefinitelyLost,
            };
            let (pref, pat) = (self.pref[b], self.pat[b]);
            let retainer = match (class, self.pkind[b]) {
                (Class::IndirectlyLost, _) if leader[b] != NONE && pref != NONE => Retainer::Clique {
                    leader: heap.caller[leader[b] as usize] as usize,
                    parent: heap.caller[pref as usize] as usize,
                },
                (Class::Reachable | Class::PossiblyLost, P_WORD) => {
                    Retainer::Root(RootRef { root: pref, slot: RootSlot::Word { addr: pat } })
                }
                (Class::Reachable | Class::PossiblyLost, P_VALUE) => Retainer::Root(RootRef {
                    root: pref,
                    slot: RootSlot::Value { index: u32::try_from(pat).unwrap_or(u32::MAX) },
                }),
                (Class::Reachable | Class::PossiblyLost, P_BLOCK) => Retainer::Block {
                    index: heap.caller[pref as usize] as usize,
                    offset: pat.saturating_sub(heap.ext[pref as usize].start),
                },
                _ => Retainer::None,
            };
            let reached = matches!(class, Class::Reachable | Class::PossiblyLost);
            out[heap.caller[b] as usize] = BlockOutcome {
                class,
                retainer,
                depth: if reached { self.depth[b] } else { 0 },
                heuristic: if reached { Heuristic::from_code(self.heur[b]) } else { None },
                indirect_bytes: if class == Class::DefinitelyLost { indirect[b] } else { 0 },
            };
        }
        out
    }

    /// Totals, and per site: tallies and who holds the reachable blocks. `order` lists the
    /// reachable blocks parents first, so each block's holder is its parent's (memoized).
    fn summaries(
        &self,
        blocks: &[Block],
        outcomes: &[BlockOutcome],
        order: &[u32],
        max_holders: usize,
        mut holder_word: Option<&mut dyn FnMut(u32, u64) -> u64>,
    ) -> (Tallies, Vec<SiteSummary>) {
        let heap = self.heap;
        let site = |b: u32| heap.site[b as usize];
        let mut totals = Tallies::default();
        let mut sites: BTreeMap<u32, SiteSummary> = BTreeMap::new();
        for (b, o) in blocks.iter().zip(outcomes) {
            totals.add(o, b.size);
            sites
                .entry(b.site)
                .or_insert_with(|| SiteSummary {
                    site: b.site,
                    tallies: Tallies::default(),
                    holders: Vec::new(),
                    holders_rest: Rest::default(),
                })
                .tallies
                .add(o, b.size);
        }

        let mut keys: Vec<HeldBy> = Vec::new();
        let mut key_ids: IntMap<HeldBy, u32> = IntMap::default();
        let mut intern = |k: HeldBy| {
            *key_ids.entry(k).or_insert_with(|| {
                keys.push(k);
                (keys.len() - 1) as u32
            })
        };
        let mut holder = vec![NONE; heap.ext.len()];
        let mut run = vec![0u64; heap.ext.len()];
        // (site, holder) -> blocks, bytes, longest chain, first block
        let mut agg: IntMap<(u32, u32), (u64, u64, u64, u32)> = IntMap::default();
        for &b in order {
            let bu = b as usize;
            let (pref, pat) = (self.pref[bu], self.pat[bu]);
            let (h, r) = match self.pkind[bu] {
                P_BLOCK if site(pref) == site(b) && holder[pref as usize] != NONE => {
                    (holder[pref as usize], run[pref as usize] + 1)
                }
                P_BLOCK => (intern(HeldBy::Site(site(pref))), 1),
                P_WORD => {
                    let addr = holder_word.as_mut().map_or(pat, |f| f(pref, pat));
                    (intern(HeldBy::Root(RootRef { root: pref, slot: RootSlot::Word { addr } })), 1)
                }
                P_VALUE => {
                    let index = u32::try_from(pat).unwrap_or(u32::MAX);
                    (intern(HeldBy::Root(RootRef { root: pref, slot: RootSlot::Value { index } })), 1)
                }
                _ => continue,
            };
            holder[bu] = h;
            run[bu] = r;
            let e = agg.entry((site(b), h)).or_insert((0, 0, 0, b));
            e.0 += 1;
            e.1 += heap.ext[bu].size;
            e.2 = e.2.max(r);
        }
        let mut per_site: IntMap<u32, Vec<Holder>> = IntMap::default();
        for ((s, h), (blocks, bytes, longest_chain, first)) in agg {
            let by = keys[h as usize];
            let example = heap.caller[first as usize] as usize;
            per_site.entry(s).or_default().push(Holder { by, blocks, bytes, longest_chain, example });
        }
        for (s, mut hs) in per_site {
            hs.sort_unstable_by(|a, b| {
                b.bytes.cmp(&a.bytes).then(b.blocks.cmp(&a.blocks)).then(a.by.cmp(&b.by))
            });
            let mut rest = Rest::default();
            for h in hs.iter().skip(max_holders) {
                rest.count += 1;
                rest.blocks += h.blocks;
                rest.bytes += h.bytes;
            }
            hs.truncate(max_holders);
            if let Some(summary) = sites.get_mut(&s) {
                summary.holders = hs;
                summary.holders_rest = rest;
            }
        }
        (totals, sites.into_values().collect())
    }
}

/// The strongly connected components among lost blocks (iterative Tarjan) that are cycles.
fn cycles(heap: &Heap, lost: &[u32], g: &LostGraph, max: usize) -> Cycles {
    let n = lost.len();
    let mut list = Vec::new();
    let mut index = vec![NONE; n];
    let mut low = vec![0u32; n];
    let mut on_stack = vec![false; n];
    let mut stack: Vec<u32> = Vec::new();
    let mut call: Vec<(u32, usize)> = Vec::new();
    let mut next_index = 0u32;
    for r in 0..n {
        if index[r] != NONE {
            continue;
        }
        index[r] = next_index;
        low[r] = next_index;
        next_index += 1;
        stack.push(r as u32);
        on_stack[r] = true;
        call.push((r as u32, g.off[r]));
        while let Some((v, e)) = call.last_mut() {
            let v = *v as usize;
            if *e < g.off[v + 1] {
                let w = g.adj[*e] as usize;
                *e += 1;
                if index[w] == NONE {
                    index[w] = next_index;
                    low[w] = next_index;
                    next_index += 1;
                    stack.push(w as u32);
                    on_stack[w] = true;
                    call.push((w as u32, g.off[w]));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            call.pop();
            if let Some(&(p, _)) = call.last() {
                low[p as usize] = low[p as usize].min(low[v]);
            }
            if low[v] != index[v] {
                continue;
            }
            let pos = stack.iter().rposition(|&x| x as usize == v).unwrap_or(0);
            let members = &stack[pos..];
            for &x in members {
                on_stack[x as usize] = false;
            }
            if members.len() >= 2 || g.targets(v).binary_search(&(v as u32)).is_ok() {
                list.push(cycle(heap, lost, members));
            }
            stack.truncate(pos);
        }
    }
    list.sort_unstable_by(|a, b| {
        b.bytes.cmp(&a.bytes).then(b.blocks.cmp(&a.blocks)).then(a.first.cmp(&b.first))
    });
    let (shapes, shapes_rest) = shapes(&list, max);
    let mut rest = Rest::default();
    for c in list.iter().skip(max) {
        rest.count += 1;
        rest.blocks += c.blocks;
        rest.bytes += c.bytes;
    }
    list.truncate(max);
    Cycles {
        list,
        rest,
        shapes,
        shapes_rest,
        complete: g.complete,
        edges: g.adj.len() as u64,
        edges_dropped: g.dropped,
    }
}

/// The cycles by shape, most cycles first, at most `max` shapes.
fn shapes(list: &[Cycle], max: usize) -> (Vec<CycleShape>, Rest) {
    let mut by: HashMap<Vec<(u32, u64)>, CycleShape> = HashMap::new();
    for c in list {
        let mut key: Vec<(u32, u64)> = c.sites.iter().map(|s| (s.site, s.blocks)).collect();
        key.sort_unstable();
        let e = by.entry(key.clone()).or_insert(CycleShape {
            sites: key,
            count: 0,
            blocks: 0,
            bytes: 0,
            example: c.first,
        });
        e.count += 1;
        e.blocks += c.blocks;
        e.bytes += c.bytes;
        e.example = e.example.min(c.first);
    }
    let mut shapes: Vec<CycleShape> = by.into_values().collect();
    shapes.sort_unstable_by(|a, b| {
        b.count.cmp(&a.count).then(b.bytes.cmp(&a.bytes)).then(a.sites.cmp(&b.sites))
    });
    let mut rest = Rest::default();
    for s in shapes.iter().skip(max) {
        rest.count += s.count;
        rest.blocks += s.blocks;
        rest.bytes += s.bytes;
    }
    shapes.truncate(max);
    (shapes, rest)
}

fn cycle(heap: &Heap, lost: &[u32], members: &[u32]) -> Cycle {
    let mut sites: BTreeMap<u32, SiteCount> = BTreeMap::new();
    let mut bytes = 0;
    let mut lowest = NONE;
    for &o in members {
        let b = lost[o as usize];
        lowest = lowest.min(b);
        let size = heap.ext[b as usize].size;
        bytes += size;
        let site = heap.site[b as usize];
        let c = sites.entry(site).or_insert(SiteCount { site, blocks: 0, bytes: 0 });
        c.blocks += 1;
        c.bytes += size;
    }
    let mut sites: Vec<SiteCount> = sites.into_values().collect();
    sites.sort_by(|a, b| b.blocks.cmp(&a.blocks).then(a.site.cmp(&b.site)));
    Cycle { blocks: members.len() as u64, bytes, first: heap.caller[lowest as usize] as usize, sites }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The snapshot as plain vectors: mapped regions; everything else is unreadable.
    #[derive(Default)]
    struct Fake {
        regions: BTreeMap<u64, Vec<u8>>,
    }

    impl Fake {
        fn map(&mut self, start: u64, len: u64) {
            self.regions.insert(start, vec![0; len as usize]);
        }

        fn put(&mut self, addr: u64, value: u64) {
            let (s, r) = self.regions.range_mut(..=addr).next_back().expect("mapped");
            let off = (addr - s) as usize;
            r[off..off + 8].copy_from_slice(&value.to_ne_bytes());
        }
    }

    impl Memory for Fake {
        fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Unreadable> {
            let (mut a, mut done) = (addr, 0);
            while done < buf.len() {
                let (&s, r) = self.regions.range(..=a).next_back().ok_or(Unreadable)?;
                let off = (a - s) as usize;
                if off >= r.len() {
                    return Err(Unreadable);
                }
                let n = (r.len() - off).min(buf.len() - done);
                buf[done..done + n].copy_from_slice(&r[off..off + n]);
                done += n;
                a += n as u64;
            }
            Ok(())
        }
    }

    const GLOBALS: u64 = 0x1000;
    const GLOBAL_ROOT: u32 = 1;
    const HEAP: u64 = 0x10_0000;

    /// A process: one page of globals (root 1) and a 1 MiB heap mapping that is not a root.
    struct World {
        mem: Fake,
        blocks: Vec<Block>,
        roots: Roots,
    }

    impl World {
        fn new() -> Self {
            let mut mem = Fake::default();
            mem.map(GLOBALS, PAGE);
            mem.map(HEAP, 1 << 20);
            let ranges = vec![RootRange { start: GLOBALS, len: PAGE, root: GLOBAL_ROOT }];
            World { mem, blocks: Vec::new(), roots: Roots { ranges, ..Roots::default() } }
        }

        /// A block at `HEAP + off`; returns its index.
        fn block(&mut self, off: u64, size: u64, site: u32) -> usize {
            self.blocks.push(Block { start: HEAP + off, size, site });
            self.blocks.len() - 1
        }

        fn at(&self, b: usize) -> u64 {
            self.blocks[b].start
        }

        /// Global word `slot` holds `value`.
        fn global(&mut self, slot: u64, value: u64) {
            self.mem.put(GLOBALS + 8 * slot, value);
        }

        /// The word at `offset` in block `b` holds `value`.
        fn word(&mut self, b: usize, offset: u64, value: u64) {
            self.mem.put(self.at(b) + offset, value);
        }

        fn run(&mut self) -> Marking {
            self.run_with(Options::default())
        }

        fn run_with(&mut self, opts: Options<'_>) -> Marking {
            mark(&self.blocks, &self.roots, &mut self.mem, opts).expect("marks")
        }
    }

    fn classes(m: &Marking) -> Vec<Class> {
        m.blocks.iter().map(|o| o.class).collect()
    }

    fn global_ref(slot: u64) -> Retainer {
        Retainer::Root(RootRef { root: GLOBAL_ROOT, slot: RootSlot::Word { addr: GLOBALS + 8 * slot } })
    }

    fn site(m: &Marking, site: u32) -> &SiteSummary {
        m.sites.iter().find(|s| s.site == site).expect("site present")
    }

    use Class::{DefinitelyLost as DL, IndirectlyLost as IL, PossiblyLost as PL, Reachable as R};

    #[test]
    fn a_block_nothing_points_at_is_definitely_lost() {
        let mut w = World::new();
        let leak = w.block(0, 32, 1);
        let kept = w.block(0x40, 24, 2);
        w.global(0, w.at(kept));
        let m = w.run();
        assert_eq!(classes(&m), [DL, R]);
        assert_eq!(m.blocks[leak].retainer, Retainer::None);
        assert_eq!(m.blocks[kept].retainer, global_ref(0));
        assert_eq!(m.blocks[kept].depth, 1);
        assert_eq!(m.totals.definitely_lost, Tally { blocks: 1, bytes: 32 });
        assert_eq!(m.totals.reachable, Tally { blocks: 1, bytes: 24 });
        assert_eq!(site(&m, 1).tallies.definitely_lost, Tally { blocks: 1, bytes: 32 });
    }

    #[test]
    fn an_interior_pointer_alone_makes_a_block_possibly_lost() {
        let mut w = World::new();
        let b = w.block(0, 64, 1);
        w.global(0, w.at(b) + 16); // not an offset any heuristic looks at
        let m = w.run();
        assert_eq!(classes(&m), [PL]);
        assert_eq!(m.blocks[b].retainer, global_ref(0));
        assert_eq!(m.blocks[b].heuristic, None);
        assert_eq!(m.totals.possibly_lost, Tally { blocks: 1, bytes: 64 });
    }

    #[test]
    fn a_list_held_by_a_global_has_that_global_as_its_holder() {
        let mut w = World::new();
        let nodes: Vec<usize> = (0..1000).map(|i| w.block(32 * i, 16, 7)).collect();
        let tail_child = w.block(32 * 1000, 48, 9);
        for pair in nodes.windows(2) {
            w.word(pair[0], 0, w.at(pair[1]));
        }
        w.word(nodes[999], 8, w.at(tail_child));
        w.global(3, w.at(nodes[0]));
        let m = w.run();
        assert!(m.blocks.iter().all(|o| o.class == R));
        assert_eq!(m.blocks[nodes[0]].retainer, global_ref(3));
        assert_eq!(m.blocks[nodes[500]].retainer, Retainer::Block { index: nodes[499], offset: 0 });
        assert_eq!(m.blocks[nodes[999]].depth, 1000);
        assert_eq!(m.blocks[tail_child].retainer, Retainer::Block { index: nodes[999], offset: 8 });
        let list = site(&m, 7);
        assert_eq!(
            list.holders,
            [Holder {
                by: HeldBy::Root(RootRef { root: GLOBAL_ROOT, slot: RootSlot::Word { addr: GLOBALS + 24 } }),
                blocks: 1000,
                bytes: 16_000,
                longest_chain: 1000,
                example: nodes[0],
            }]
        );
        assert_eq!(list.holders_rest, Rest::default());
        assert_eq!(
            site(&m, 9).holders,
            [Holder { by: HeldBy::Site(7), blocks: 1, bytes: 48, longest_chain: 1, example: tail_child }]
        );
    }

    #[test]
    fn rings_have_one_definite_leader_and_are_reported_as_cycles() {
        let mut w = World::new();
        let (a, b) = (w.block(0, 16, 1), w.block(0x20, 32, 1));
        w.word(a, 0, w.at(b));
        w.word(b, 8, w.at(a));
        let (x, y, z) = (w.block(0x100, 16, 2), w.block(0x200, 16, 3), w.block(0x300, 16, 3));
        w.word(x, 0, w.at(y));
        w.word(y, 0, w.at(z) + 4); // interior pointers count the same for lost blocks
        w.word(z, 0, w.at(x));
        let m = w.run();
        assert_eq!(classes(&m), [DL, IL, DL, IL, IL]);
        assert_eq!(m.blocks[a].indirect_bytes, 32);
        assert_eq!(m.blocks[b].retainer, Retainer::Clique { leader: a, parent: a });
        assert_eq!(m.blocks[x].indirect_bytes, 32);
        assert_eq!(m.blocks[z].retainer, Retainer::Clique { leader: x, parent: y });
        assert_eq!(m.totals.definitely_lost, Tally { blocks: 2, bytes: 32 });
        assert_eq!(m.totals.indirectly_lost, Tally { blocks: 3, bytes: 64 });
        assert_eq!(m.totals.definitely_lost_indirect_bytes, 64);
        assert_eq!(
            m.cycles.list,
            // Equal bytes: more blocks first.
            [
                Cycle {
                    blocks: 3,
                    bytes: 48,
                    first: x,
                    sites: vec![
                        SiteCount { site: 3, blocks: 2, bytes: 32 },
                        SiteCount { site: 2, blocks: 1, bytes: 16 }
                    ],
                },
                Cycle {
                    blocks: 2,
                    bytes: 48,
                    first: a,
                    sites: vec![SiteCount { site: 1, blocks: 2, bytes: 48 }]
                },
            ]
        );
        assert!(m.cycles.complete);
    }

    #[test]
    fn cycles_of_the_same_make_up_are_one_shape_even_past_the_listed_ones() {
        // 30 pairs of one site and 5 triples of another; only 10 cycles are listed.
        let mut w = World::new();
        for i in 0..30 {
            let (a, b) = (w.block(i * 0x100, 16, 1), w.block(i * 0x100 + 0x20, 16, 1));
            w.word(a, 0, w.at(b));
            w.word(b, 0, w.at(a));
        }
        for i in 0..5 {
            let base = 0x8000 + i * 0x100;
            let (x, y, z) = (w.block(base, 16, 2), w.block(base + 0x20, 16, 2), w.block(base + 0x40, 16, 3));
            w.word(x, 0, w.at(y));
            w.word(y, 0, w.at(z));
            w.word(z, 0, w.at(x));
        }
        let m = w.run_with(Options { max_cycles: 10, ..Options::default() });
        assert_eq!(m.cycles.list.len(), 10);
        let counts: Vec<(u64, u64)> = m.cycles.shapes.iter().map(|s| (s.count, s.bytes)).collect();
        assert_eq!(counts, [(30, 30 * 32), (5, 5 * 48)]);
        assert_eq!(m.cycles.shapes[0].sites, [(1, 2)]);
        assert_eq!(m.cycles.shapes[1].sites, [(2, 2), (3, 1)]);
        assert_eq!(m.cycles.shapes_rest, Rest::default());
    }

    #[test]
    fn a_block_pointing_at_itself_is_a_cycle_and_a_chain_is_not() {
        let mut w = World::new();
        let s = w.block(0, 16, 1);
        w.word(s, 0, w.at(s));
        let (p, q) = (w.block(0x100, 16, 2), w.block(0x200, 16, 2));
        w.word(p, 0, w.at(q));
        let m = w.run();
        assert_eq!(classes(&m), [DL, DL, IL]);
        assert_eq!(m.cycles.list.len(), 1);
        assert_eq!(m.cycles.list[0].first, s);
    }

    #[test]
    fn a_later_leader_takes_over_an_earlier_clique() {
        // Valgrind gathers cliques in address order: A (lowest) leads B first, then C, which
        // points at A, takes A and with it B.
        let mut w = World::new();
        let a = w.block(0, 16, 1);
        let c = w.block(0x100, 24, 3);
        let b = w.block(0x200, 40, 2);
        w.word(a, 0, w.at(b));
        w.word(c, 8, w.at(a));
        let m = w.run();
        assert_eq!(classes(&m), [IL, DL, IL]);
        assert_eq!(m.blocks[c].indirect_bytes, 56);
        assert_eq!(m.blocks[a].retainer, Retainer::Clique { leader: c, parent: c });
        assert_eq!(m.blocks[b].retainer, Retainer::Clique { leader: c, parent: a });
        assert!(m.cycles.list.is_empty());
        assert_eq!(m.totals.definitely_lost_indirect_bytes, 56);
    }

    #[test]
    fn a_possibly_lost_block_found_later_by_a_start_pointer_is_reachable() {
        let mut w = World::new();
        let b = w.block(0, 64, 1);
        let x = w.block(0x100, 16, 2);
        let child = w.block(0x200, 16, 3);
        w.global(0, w.at(b) + 40); // scanned first: b would be Possible
        w.global(1, w.at(x));
        w.word(x, 0, w.at(b)); // a start pointer from a reachable block, one level deeper
        w.word(b, 16, w.at(child)); // so b's children are reachable too
        let m = w.run();
        assert_eq!(classes(&m), [R, R, R]);
        assert_eq!(m.blocks[b].retainer, Retainer::Block { index: x, offset: 0 });
        assert_eq!(m.blocks[b].depth, 2);
        assert_eq!(m.blocks[child].retainer, Retainer::Block { index: b, offset: 16 });
        assert_eq!(m.blocks[b].heuristic, None);
    }

    #[test]
    fn a_start_pointer_inside_a_possibly_lost_block_leaves_its_target_possibly_lost() {
        let mut w = World::new();
        let p = w.block(0, 64, 1);
        let c = w.block(0x100, 16, 2);
        let cc = w.block(0x200, 16, 2);
        w.global(0, w.at(p) + 40);
        w.word(p, 8, w.at(c));
        w.word(c, 0, w.at(cc));
        let m = w.run();
        assert_eq!(classes(&m), [PL, PL, PL]);
        assert_eq!(m.blocks[c].retainer, Retainer::Block { index: p, offset: 8 });
        assert_eq!(m.blocks[cc].depth, 3);
    }

    #[test]
    fn possibly_lost_chains_are_shortest() {
        // t is first met 3 levels deep through a reachable chain, but a possibly lost block
        // one level down points at it: its chain goes through that one.
        let mut w = World::new();
        let (r1, r2) = (w.block(0, 16, 1), w.block(0x100, 16, 1));
        let p = w.block(0x200, 64, 2);
        let t = w.block(0x300, 64, 3);
        w.global(0, w.at(r1));
        w.word(r1, 0, w.at(r2));
        w.word(r2, 0, w.at(t) + 40);
        w.global(1, w.at(p) + 40);
        w.word(p, 0, w.at(t));
        let m = w.run();
        assert_eq!(classes(&m), [R, R, PL, PL]);
        assert_eq!(m.blocks[t].retainer, Retainer::Block { index: p, offset: 0 });
        assert_eq!(m.blocks[t].depth, 2);
    }

    const VT1: u64 = 0x40_1000;
    const VT2: u64 = 0x40_2000;

    /// A block reached only through `offset`, with `words` at its start; returns its class and
    /// heuristic.
    fn through(
        size: u64,
        words: &[(u64, u64)],
        offset: u64,
        opts: Options<'_>,
    ) -> (Class, Option<Heuristic>) {
        let mut w = World::new();
        let b = w.block(0, size, 1);
        for &(off, v) in words {
            w.word(b, off, v);
        }
        w.global(0, w.at(b) + offset);
        let m = w.run_with(opts);
        (m.blocks[b].class, m.blocks[b].heuristic)
    }

    #[test]
    fn stdstring_heuristic() {
        // length 10, capacity 15, refcount, 16 chars: 24 + 15 + 1 bytes.
        let yes = through(40, &[(0, 10), (8, 15)], 24, Options::default());
        assert_eq!(yes, (R, Some(Heuristic::StdString)));
        let longer_than_capacity = through(40, &[(0, 20), (8, 15)], 24, Options::default());
        assert_eq!(longer_than_capacity, (PL, None));
        let wrong_size = through(48, &[(0, 10), (8, 15)], 24, Options::default());
        assert_eq!(wrong_size, (PL, None));
    }

    #[test]
    fn length64_heuristic() {
        assert_eq!(through(48, &[(0, 40)], 8, Options::default()), (R, Some(Heuristic::Length64)));
        assert_eq!(through(48, &[(0, 41)], 8, Options::default()), (PL, None));
        assert_eq!(through(48, &[(0, 40)], 16, Options::default()), (PL, None));
    }

    #[test]
    fn newarray_heuristic() {
        // 3 elements of 16 bytes after the count (a length64 match would be 48).
        assert_eq!(through(56, &[(0, 3)], 8, Options::default()), (R, Some(Heuristic::NewArray)));
        assert_eq!(through(56, &[(0, 5)], 8, Options::default()), (PL, None));
        assert_eq!(through(56, &[(0, 0)], 8, Options::default()), (PL, None));
    }

    #[test]
    fn multipleinheritance_heuristic() {
        let words = [(0, VT1), (16, VT2)];
        let mut vtables = |a: u64| a == VT1 || a == VT2;
        let opts = Options { is_vtable: Some(&mut vtables), ..Options::default() };
        assert_eq!(through(32, &words, 16, opts), (R, Some(Heuristic::MultipleInheritance)));
        // No vtable test from the caller: the heuristic cannot match.
        assert_eq!(through(32, &words, 16, Options::default()), (PL, None));
        let mut only_one = |a: u64| a == VT1;
        let opts = Options { is_vtable: Some(&mut only_one), ..Options::default() };
        assert_eq!(through(32, &words, 16, opts), (PL, None));
        // Words below the first page are never vtables, whatever the caller says.
        let mut all = |_: u64| true;
        let opts = Options { is_vtable: Some(&mut all), ..Options::default() };
        assert_eq!(through(32, &[(0, VT1), (16, 0x800)], 16, opts), (PL, None));
    }

    #[test]
    fn heuristics_can_be_turned_off() {
        let opts = Options { heuristics: Heuristics::NONE, ..Options::default() };
        assert_eq!(through(48, &[(0, 40)], 8, opts), (PL, None));
    }

    #[test]
    fn heuristic_counts_follow_valgrind() {
        let mut w = World::new();
        let h = w.block(0, 48, 1); // length64
        let both = w.block(0x100, 48, 2); // length64, and a start pointer too
        let p = w.block(0x200, 64, 3); // possibly lost
        let under_p = w.block(0x300, 48, 4); // length64 pointer from a possibly lost block
        for b in [h, both, under_p] {
            w.word(b, 0, 40);
        }
        w.global(0, w.at(h) + 8);
        w.global(1, w.at(both) + 8);
        w.global(2, w.at(both));
        w.global(3, w.at(p) + 40);
        w.word(p, 8, w.at(under_p) + 8);
        let m = w.run();
        assert_eq!(classes(&m), [R, R, PL, PL]);
        assert_eq!(m.blocks[h].heuristic, Some(Heuristic::Length64));
        assert_eq!(m.blocks[both].heuristic, None);
        assert_eq!(m.blocks[under_p].heuristic, Some(Heuristic::Length64));
        let l64 = Heuristic::Length64 as usize;
        assert_eq!(m.totals.reachable_via[l64], Tally { blocks: 1, bytes: 48 });
        assert_eq!(m.totals.possible_via[l64], Tally { blocks: 1, bytes: 48 });
        assert_eq!(site(&m, 1).tallies.reachable_via[l64], Tally { blocks: 1, bytes: 48 });
    }

    #[test]
    fn registers_alone_can_hold_blocks() {
        let mut w = World::new();
        w.roots.ranges.clear();
        let (a, b, c) = (w.block(0, 16, 1), w.block(0x100, 64, 1), w.block(0x200, 16, 1));
        w.roots.values.push(RootValues { root: 5, values: vec![0, 0xdead_beef, w.at(a), w.at(b) + 40] });
        let m = w.run();
        assert_eq!(classes(&m), [R, PL, DL]);
        let reg = |index| Retainer::Root(RootRef { root: 5, slot: RootSlot::Value { index } });
        assert_eq!(m.blocks[a].retainer, reg(2));
        assert_eq!(m.blocks[b].retainer, reg(3));
        assert_eq!(m.blocks[c].retainer, Retainer::None);
        assert_eq!(m.stats.root_values, 4);
        assert_eq!(m.stats.roots[&5].values, 4);
    }

    #[test]
    fn a_root_range_over_tracked_blocks_is_scanned_only_in_the_gaps() {
        let mut w = World::new();
        w.roots.ranges.push(RootRange { start: HEAP, len: 1 << 20, root: 2 });
        let unreached = w.block(0x1000, 64, 1);
        let target = w.block(0x2000, 16, 2);
        let odd = w.block(0x3000, 12, 3); // its last word is partly outside it
        let odd_target = w.block(0x4000, 16, 4);
        let gap_target = w.block(0x5000, 16, 5);
        w.word(unreached, 8, w.at(target)); // block memory: not a root
        w.word(odd, 8, w.at(odd_target)); // the word straddling the block's end: neither
        w.mem.put(HEAP + 0x8000, w.at(gap_target)); // a gap word: a root
        let m = w.run();
        assert_eq!(classes(&m), [DL, IL, DL, DL, R]);
        assert_eq!(
            m.blocks[gap_target].retainer,
            Retainer::Root(RootRef { root: 2, slot: RootSlot::Word { addr: HEAP + 0x8000 } })
        );
        let heap_root = m.stats.roots[&2];
        assert_eq!(heap_root.covered_bytes, 64 + 16 + 16 + 16 + 16);
        assert_eq!(heap_root.words * 8 + heap_root.covered_bytes, 1 << 20);
    }

    #[test]
    fn blocks_across_root_windows_stay_out_of_the_roots() {
        // Root ranges are scanned 1 MiB at a time; blocks may straddle the windows.
        const BIG: u64 = 0x100_0000;
        let mut w = World::new();
        w.mem.map(BIG, 3 << 20);
        w.roots.ranges.push(RootRange { start: BIG, len: 3 << 20, root: 2 });
        let straddles = Block { start: BIG + (1 << 20) - 0x20, size: 0x60, site: 1 };
        let spans_a_window = Block { start: BIG + (2 << 20) - 0x10, size: (1 << 20) + 0x8, site: 2 };
        let target = w.block(0, 16, 3);
        let gap_target = w.block(0x100, 16, 4);
        w.blocks.extend([straddles, spans_a_window]);
        w.mem.put(straddles.start + 0x28, w.at(target)); // past the window edge, inside the block
        w.mem.put(spans_a_window.start + (1 << 20), w.at(target));
        w.mem.put(straddles.start + 0x60, w.at(gap_target)); // the word right after it: a root
        let m = w.run();
        // Only the lost blocks point at `target`: it is lost under the lower one.
        assert_eq!(classes(&m), [IL, R, DL, DL]);
        let r = m.stats.roots[&2];
        assert_eq!(r.covered_bytes, straddles.size + spans_a_window.size);
        assert_eq!(r.words * 8 + r.covered_bytes, 3 << 20);
    }

    #[test]
    fn unreadable_memory_is_counted_and_skipped() {
        let mut w = World::new();
        // Globals, a hole, then a readable page: one root range across all three.
        w.mem.map(GLOBALS + 2 * PAGE, PAGE);
        w.roots.ranges[0].len = 3 * PAGE;
        let kept = w.block(0, 16, 1);
        w.mem.put(GLOBALS + 2 * PAGE + 64, w.at(kept));
        // Tracked blocks whose memory is gone.
        let gone = Block { start: 0x90_0000, size: 64, site: 2 };
        let gone_child = Block { start: 0x90_1000, size: 48, site: 3 };
        w.blocks.push(gone);
        w.blocks.push(gone_child);
        w.global(0, gone.start);
        w.global(1, gone_child.start + 8); // the length64 test cannot read it
        let m = w.run();
        assert_eq!(classes(&m), [R, R, PL]);
        let globals = m.stats.roots[&GLOBAL_ROOT];
        assert_eq!((globals.unreadable_bytes, globals.unreadable_ranges), (PAGE, 1));
        assert_eq!(m.stats.unreadable_bytes, PAGE + 64 + 48);
        assert_eq!(m.stats.unreadable_ranges, 3);
        assert!(m.stats.heuristic_unreadable >= 1);
    }

    #[test]
    fn reads_are_coalesced_and_chunked() {
        let mut w = World::new();
        // A 3 MiB root range with nothing tracked in it: 3 reads of 1 MiB.
        w.mem.map(0x100_0000, 3 << 20);
        w.roots.ranges = vec![RootRange { start: 0x100_0000, len: 3 << 20, root: 2 }];
        // 500 neighbouring blocks, all pointed at from it: one level, read together.
        for i in 0..500 {
            let b = w.block(64 * i, 48, 1);
            w.mem.put(0x100_0000 + 8 * i, w.at(b));
        }
        let m = w.run();
        assert!(m.blocks.iter().all(|o| o.class == R));
        assert_eq!(m.stats.root_words, (3 << 20) / 8);
        assert!(m.stats.reads <= 5, "{} reads", m.stats.reads);
    }

    #[test]
    fn holders_are_bounded_and_the_rest_is_counted() {
        let mut w = World::new();
        for i in 0..5 {
            let b = w.block(0x100 * i, 16 * (i + 1), 3);
            w.global(i, w.at(b));
        }
        let m = w.run_with(Options { max_holders: 2, ..Options::default() });
        let s = site(&m, 3);
        let bytes: Vec<u64> = s.holders.iter().map(|h| h.bytes).collect();
        assert_eq!(bytes, [80, 64]);
        assert_eq!(s.holders_rest, Rest { count: 3, blocks: 3, bytes: 48 + 32 + 16 });
    }

    #[test]
    fn cycles_are_bounded_and_the_rest_is_counted() {
        let mut w = World::new();
        for i in 0..4 {
            let (a, b) = (w.block(0x100 * i, 16, 1), w.block(0x100 * i + 0x40, 16 * (i + 1), 1));
            w.word(a, 0, w.at(b));
            w.word(b, 0, w.at(a));
        }
        let m = w.run_with(Options { max_cycles: 1, ..Options::default() });
        assert_eq!(m.cycles.list.len(), 1);
        assert_eq!(m.cycles.list[0].bytes, 16 + 64);
        assert_eq!(m.cycles.rest, Rest { count: 3, blocks: 6, bytes: 3 * 16 + 16 + 32 + 48 });
    }

    #[test]
    fn zero_size_blocks_are_found_by_their_start() {
        let mut w = World::new();
        let (z, lost) = (w.block(0, 0, 1), w.block(0x10, 0, 1));
        w.global(0, w.at(z));
        let m = w.run();
        assert_eq!(classes(&m), [R, DL]);
        assert_eq!(m.blocks[lost].retainer, Retainer::None);
    }

    #[test]
    fn overlapping_blocks_are_refused() {
        let blocks = [
            Block { start: 0x1000, size: 32, site: 1 },
            Block { start: 0x2000, size: 0, site: 1 },
            Block { start: 0x1010, size: 8, site: 1 },
        ];
        let err = mark(&blocks, &Roots::default(), &mut Fake::default(), Options::default());
        assert_eq!(err, Err(MarkError::Overlap { first: 0, second: 2 }));
        let same_start =
            [Block { start: 0x2000, size: 0, site: 1 }, Block { start: 0x2000, size: 8, site: 1 }];
        let err = mark(&same_start, &Roots::default(), &mut Fake::default(), Options::default());
        assert!(matches!(err, Err(MarkError::Overlap { .. })));
        let wraps = [Block { start: u64::MAX - 4, size: 8, site: 1 }];
        let err = mark(&wraps, &Roots::default(), &mut Fake::default(), Options::default());
        assert!(matches!(err, Err(MarkError::BlockWraps { index: 0, .. })));
    }

    #[test]
    fn named_first_roots_hold_what_they_reach_before_any_global_does() {
        // A global reaches a table that holds a list; a named value holds the list too.
        let mut w = World::new();
        let table = w.block(0, 64, 1);
        let list = w.block(0x100, 64, 2);
        let item = w.block(0x200, 64, 3);
        w.global(0, w.at(table));
        w.word(table, 8, w.at(list));
        w.word(list, 0, w.at(item));
        let through_global = w.run();
        assert_eq!(through_global.blocks[list].retainer, Retainer::Block { index: table, offset: 8 });
        w.roots.first = vec![RootValues { root: 7, values: vec![0x1234, w.at(list)] }];
        let m = w.run();
        let named = Retainer::Root(RootRef { root: 7, slot: RootSlot::Value { index: 1 } });
        assert_eq!(m.blocks[list].retainer, named);
        assert_eq!(m.blocks[item].retainer, Retainer::Block { index: list, offset: 0 });
        assert_eq!(
            site(&m, 2).holders[0].by,
            HeldBy::Root(RootRef { root: 7, slot: RootSlot::Value { index: 1 } })
        );
        assert_eq!(classes(&m), vec![R, R, R]);
    }

    #[test]
    fn a_prefix_is_scanned_as_its_blocks_and_the_gap_after_it_is_not() {
        // An object at +32 of its allocation: its pre-header (+0..16) points at a value, its
        // collector header (+16..32) links to a neighbour; only the first is a reference.
        let mut w = World::new();
        let obj = w.block(0x20, 32, 1);
        let value = w.block(0x100, 16, 2);
        let neighbour = w.block(0x200, 16, 3);
        w.global(0, w.at(obj));
        w.mem.put(HEAP, w.at(value));
        w.mem.put(HEAP + 0x10, w.at(neighbour));
        assert_eq!(classes(&w.run()), vec![R, DL, DL]);
        let prefixes = [Prefix { block: obj, start: HEAP, end: HEAP + 0x10 }];
        let m = w.run_with(Options { prefixes: &prefixes, ..Options::default() });
        assert_eq!(classes(&m), vec![R, R, DL]);
        // A word of the prefix is at offset 0 of its block.
        assert_eq!(m.blocks[value].retainer, Retainer::Block { index: obj, offset: 0 });
        // A prefix that runs into its block is refused.
        let bad = [Prefix { block: obj, start: HEAP, end: HEAP + 0x28 }];
        let err = mark(&w.blocks, &w.roots, &mut w.mem, Options { prefixes: &bad, ..Options::default() });
        assert!(matches!(err, Err(MarkError::BadPrefix { .. })));
    }

    #[test]
    fn a_pointer_past_a_prefix_that_says_its_length_is_a_start_pointer_when_asked() {
        let mut w = World::new();
        let values = w.block(0, 48, 1);
        // 3.11's values: an 8-byte prefix whose last byte is 8, then the values.
        w.word(values, 0, 8u64 << 56);
        w.global(0, w.at(values) + 8);
        let other = w.block(0x100, 48, 2);
        w.word(other, 0, 16u64 << 56); // says 16, pointed at +8: no
        w.global(1, w.at(other) + 8);
        assert_eq!(classes(&w.run()), vec![PL, PL]);
        let m = w.run_with(Options { prefixed_starts: true, ..Options::default() });
        assert_eq!(classes(&m), vec![R, PL]);
    }

    #[test]
    fn results_hold_no_memory_contents() {
        const SECRET: u64 = 0x5ec7_e75e_c7e7_1234;
        let mut w = World::new();
        let b = w.block(0, 64, 1);
        let lost = w.block(0x100, 64, 1);
        w.global(0, w.at(b));
        w.global(1, SECRET);
        w.word(b, 8, SECRET);
        w.word(lost, 16, SECRET);
        let shown = format!("{:?}", w.run());
        for needle in [format!("{SECRET}"), format!("{SECRET:x}"), format!("{SECRET:#x}")] {
            assert!(!shown.contains(&needle), "the secret appears in {shown}");
        }
    }

    #[test]
    fn a_million_node_list_and_ring_need_no_deep_stack() {
        const N: u64 = 1_000_000;
        const BASE: u64 = 0x1000_0000;
        let mut mem = Fake::default();
        mem.map(GLOBALS, PAGE);
        // A reachable list, then a lost ring, 16 bytes a node.
        let mut region = vec![0u8; (2 * N * 16) as usize];
        for i in 0..2 * N {
            let next = match i {
                _ if i == N - 1 => 0,
                _ if i == 2 * N - 1 => BASE + N * 16,
                _ => BASE + (i + 1) * 16,
            };
            region[(i * 16) as usize..(i * 16 + 8) as usize].copy_from_slice(&next.to_ne_bytes());
        }
        mem.regions.insert(BASE, region);
        mem.put(GLOBALS, BASE);
        let blocks: Vec<Block> =
            (0..2 * N).map(|i| Block { start: BASE + i * 16, size: 16, site: 1 }).collect();
        let roots =
            Roots { ranges: vec![RootRange { start: GLOBALS, len: PAGE, root: 1 }], ..Roots::default() };
        let m = mark(&blocks, &roots, &mut mem, Options::default()).expect("marks");
        let s = site(&m, 1);
        assert_eq!(s.tallies.reachable.blocks, N);
        assert_eq!(s.holders[0].longest_chain, N);
        assert_eq!(s.tallies.definitely_lost.blocks, 1);
        assert_eq!(s.tallies.indirectly_lost.blocks, N - 1);
        assert_eq!(m.cycles.list.len(), 1);
        assert_eq!(m.cycles.list[0].blocks, N);
    }

    /// Valgrind's algorithm as its source reads (depth-first, states upgraded in place, blocks
    /// rescanned), written independently of the model, without heuristics.
    struct Valgrind<'a> {
        blocks: &'a [Block],
        by_addr: Vec<usize>,
        mem: &'a mut Fake,
        state: Vec<Class>,
        pending: Vec<bool>,
        stack: Vec<usize>,
        leader: Vec<Option<usize>>,
    }

    impl Valgrind<'_> {
        fn find(&self, p: u64) -> Option<usize> {
            self.by_addr.iter().copied().find(|&i| {
                let b = self.blocks[i];
                p >= b.start && p - b.start < b.size.max(1)
            })
        }

        fn words(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
            let mut out = Vec::new();
            let mut a = start.div_ceil(8) * 8;
            while a + 8 <= end {
                let mut w = [0u8; 8];
                if self.mem.read(a, &mut w).is_ok() {
                    out.push((a, u64::from_ne_bytes(w)));
                }
                a += 8;
            }
            out
        }

        fn push(&mut self, b: usize) {
            if !self.pending[b] {
                self.pending[b] = true;
                self.stack.push(b);
            }
        }

        // Unreached is DL here, Possible PL, Reachable R, IndirectLeak IL.
        fn push_unless_clique(&mut self, p: u64, prior_definite: bool) {
            let Some(b) = self.find(p) else { return };
            if self.state[b] == R {
                return;
            }
            if p == self.blocks[b].start && prior_definite {
                self.state[b] = R;
                self.push(b);
            } else if self.state[b] == DL {
                self.state[b] = PL;
                self.push(b);
            }
        }

        fn run(blocks: &[Block], roots: &Roots, mem: &mut Fake) -> (Vec<Class>, Vec<Option<usize>>) {
            let n = blocks.len();
            let mut by_addr: Vec<usize> = (0..n).collect();
            by_addr.sort_by_key(|&i| blocks[i].start);
            let mut v = Valgrind {
                blocks,
                by_addr,
                mem,
                state: vec![DL; n],
                pending: vec![false; n],
                stack: Vec::new(),
                leader: vec![None; n],
            };
            for r in &roots.ranges {
                for (a, value) in v.words(r.start, r.start + r.len) {
                    let in_block =
                        blocks.iter().any(|b| b.size > 0 && a < b.start + b.size && a + 8 > b.start);
                    if !in_block {
                        v.push_unless_clique(value, true);
                    }
                }
            }
            for r in &roots.values {
                for &value in &r.values {
                    v.push_unless_clique(value, true);
                }
            }
            while let Some(b) = v.stack.pop() {
                v.pending[b] = false;
                let definite = v.state[b] != PL;
                for (_, value) in v.words(blocks[b].start, blocks[b].start + blocks[b].size) {
                    v.push_unless_clique(value, definite);
                }
            }
            for i in v.by_addr.clone() {
                if v.state[i] != DL {
                    continue;
                }
                v.push(i);
                while let Some(b) = v.stack.pop() {
                    v.pending[b] = false;
                    for (_, value) in v.words(blocks[b].start, blocks[b].start + blocks[b].size) {
                        if let Some(t) = v.find(value)
                            && v.state[t] == DL
                            && t != i
                        {
                            v.push(t);
                            v.state[t] = IL;
                            v.leader[t] = Some(i);
                        }
                    }
                }
            }
            let mut leaders = vec![None; n];
            for (b, l) in leaders.iter_mut().enumerate() {
                let mut cur = v.leader[b];
                while let Some(c) = cur
                    && v.state[c] == IL
                {
                    cur = v.leader[c];
                }
                *l = cur;
            }
            (v.state, leaders)
        }
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A random heap: blocks of odd sizes with random start and interior pointers and junk,
    /// roots in globals, registers and the heap's gaps.
    fn random_world(rng: &mut Rng) -> World {
        let mut w = World::new();
        w.roots.ranges.push(RootRange { start: HEAP, len: 0x4000, root: 2 });
        let n = 1 + rng.below(40);
        let mut off = 0;
        for _ in 0..n {
            off += 8 * rng.below(4);
            let size = [0, 5, 8, 12, 16, 24, 40, 64][rng.below(8) as usize];
            w.block(off, size, rng.below(4) as u32);
            off += size.max(1).div_ceil(16) * 16;
        }
        let pointer = |rng: &mut Rng, w: &World| -> u64 {
            let b = w.blocks[rng.below(n) as usize];
            match rng.below(10) {
                0..4 => b.start,
                4..7 => b.start + rng.below(b.size.max(1)),
                7 => HEAP + rng.below(0x4000),
                _ => 0,
            }
        };
        for i in 0..n as usize {
            let b = w.blocks[i];
            let mut a = b.start.div_ceil(8) * 8;
            while a + 8 <= b.start + b.size {
                let p = pointer(rng, &w);
                w.mem.put(a, p);
                a += 8;
            }
        }
        for slot in 0..rng.below(4) {
            if rng.below(2) == 0 {
                let p = pointer(rng, &w);
                w.global(slot, p);
            } else {
                let p = pointer(rng, &w);
                let gap = (off + 8 * slot).div_ceil(8) * 8;
                w.mem.put(HEAP + gap, p);
            }
        }
        let values = (0..rng.below(3)).map(|_| pointer(rng, &w)).collect();
        w.roots.values.push(RootValues { root: 3, values });
        w
    }

    #[test]
    fn classes_and_cliques_match_valgrinds_algorithm_on_random_heaps() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for round in 0..400 {
            let mut w = random_world(&mut rng);
            let (want, leaders) = Valgrind::run(&w.blocks, &w.roots, &mut w.mem);
            for max_lost_edges in [usize::MAX, 0] {
                let opts = Options { heuristics: Heuristics::NONE, max_lost_edges, ..Options::default() };
                let m = w.run_with(opts);
                assert_eq!(classes(&m), want, "round {round}");
                for (b, o) in m.blocks.iter().enumerate() {
                    if let Retainer::Clique { leader, .. } = o.retainer {
                        assert_eq!(Some(leader), leaders[b], "round {round} block {b}");
                    }
                }
                let indirect: u64 = m.blocks.iter().map(|o| o.indirect_bytes).sum();
                assert_eq!(indirect, m.totals.indirectly_lost.bytes, "round {round}");
                assert_eq!(m.cycles.complete, max_lost_edges != 0 || m.cycles.edges_dropped == 0);
            }
        }
    }

    #[test]
    fn weak_roots_hold_only_what_the_others_do_not_reach_and_preferred_ones_first() {
        // A list of 3 blocks (site 1) from a global; untracked memory at WEAK also points at
        // its last block. Two more blocks (site 2) are reached only from untracked memory: one
        // from an allocator's table (ALLOC_TABLE), one from an object a global reaches
        // (PREFERRED), whose pointer comes later in memory.
        const WEAK: u64 = 0x70_0000;
        let mut w = World::new();
        w.mem.map(WEAK, PAGE);
        w.roots.weak.push(RootRange { start: WEAK, len: PAGE, root: 7 });
        let n: Vec<usize> = (0..3).map(|i| w.block(i * 64, 32, 1)).collect();
        w.global(0, w.at(n[0]));
        w.word(n[0], 0, w.at(n[1]));
        w.word(n[1], 0, w.at(n[2]));
        w.mem.put(WEAK, w.at(n[2]));
        let a = w.block(0x1000, 32, 2);
        let b = w.block(0x1040, 32, 2);
        w.word(a, 0, w.at(b));
        w.mem.put(WEAK + 8, w.at(a)); // the allocator's table
        w.mem.put(WEAK + 0x100, w.at(b)); // the preferred object
        let without = w.run();
        let mut prefer = |root: u32, addr: u64| root == 7 && addr == WEAK + 0x100;
        let with = w.run_with(Options { prefer_weak: Some(&mut prefer), ..Options::default() });
        for m in [&without, &with] {
            // The list is held by the global through its own blocks, not by the weak word.
            assert!(matches!(m.blocks[n[2]].retainer, Retainer::Block { index, .. } if index == n[1]));
            assert!(m.blocks.iter().all(|o| o.class == Class::Reachable));
        }
        let root_of = |m: &Marking, i: usize| match m.blocks[i].retainer {
            Retainer::Root(RootRef { slot: RootSlot::Word { addr }, .. }) => Some(addr),
            _ => None,
        };
        assert_eq!(root_of(&without, a), Some(WEAK + 8), "in memory order without a preference");
        assert_eq!(root_of(&with, b), Some(WEAK + 0x100), "the preferred word first");
        assert!(matches!(with.blocks[a].retainer, Retainer::Root(_)), "a is still reached from its own word");

        // A register holding b's address at the stop: untracked memory still names b's holder
        // (a global reaches it through there); with no weak roots, the register does.
        w.roots.values.push(RootValues { root: 9, values: vec![w.at(b)] });
        let mut prefer = |root: u32, addr: u64| root == 7 && addr == WEAK + 0x100;
        let with = w.run_with(Options { prefer_weak: Some(&mut prefer), ..Options::default() });
        assert_eq!(root_of(&with, b), Some(WEAK + 0x100), "the preferred word before a register");
        let unpreferred = w.run();
        assert!(
            !matches!(
                unpreferred.blocks[b].retainer,
                Retainer::Root(RootRef { slot: RootSlot::Value { .. }, .. })
            ),
            "any weak word before a register: {:?}",
            unpreferred.blocks[b].retainer
        );
        w.roots.weak.clear();
        let alone = w.run();
        assert!(
            matches!(alone.blocks[b].retainer, Retainer::Root(RootRef { slot: RootSlot::Value { .. }, .. })),
            "{:?}",
            alone.blocks[b].retainer
        );
    }
}
