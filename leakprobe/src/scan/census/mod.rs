//! **The heap census:** every chunk of glibc's malloc in a snapshot, in use or free, read
//! without debug symbols (the target's libc is usually stripped of them).
//!
//! The tracked blocks tell us what was allocated while we watched; the census tells what the
//! allocator holds right now, including what was allocated before we attached and what lies in
//! its caches. It is pure: it reads memory only through [`Memory`](crate::scan::mark::Memory)
//! and gets the mappings as [`Region`](crate::scan::snapshot::Region)s, so it runs over a
//! copy-on-write snapshot as well as over test images.
//!
//! # What is found
//! - **The main arena's brk heap** (`[heap]`), walked chunk by chunk from its start to the top
//!   chunk. A chunk is in use when the next chunk's `PREV_INUSE` bit is set.
//! - **`main_arena`**, without symbols: a word in libc's writable data equal to the heap's top
//!   (or pointing into the heap, when its walk stopped early), validated as a `malloc_state`
//!   (see [`glibc`] for the checks); failing that, the ring member in libc's data of another
//!   arena found by its `heap_info`.
//! - **The other arenas**, through `main_arena`'s `next` ring, and each of their heaps (64 MiB
//!   aligned mappings that start with a `heap_info`), walked the same way; an arena's older
//!   heaps end in fenceposts, its current one in its top chunk.
//! - **The per-thread caches** (`tcache_perthread_struct`, glibc 2.26 to 2.41), found by their
//!   shape, and the chunks in their lists ([`ChunkState::TcacheFree`]).
//! - **The fastbins** of every validated arena ([`ChunkState::FastbinFree`]). Chunks in tcache
//!   and fastbins look in use by the `PREV_INUSE` bit; the census does not report them in use
//!   as long as their lists check out (a list that does not stops with a [`WalkError`], and
//!   the chunks after the break look in use).
//! - **mmapped chunks** at the start of anonymous mappings, one after another, and any chunk a
//!   tracked pointer names ([`mmapped_chunk_at`]).
//!
//! # What is not found, and why
//! - A main arena that is not contiguous (`brk` failed or was moved by a foreign `sbrk`, and
//!   glibc went on in mmapped memory): only the `[heap]` part is walked, up to the fenceposts.
//! - A brk heap that does not start with a chunk (the program called `sbrk` itself before the
//!   first `malloc`): its walk stops with an error.
//! - mmapped chunks in an anonymous mapping that the kernel merged after other data, and those
//!   that `memalign` moved inside their mapping (the census then names the mapping's first
//!   header): with no list of them in glibc, only a tracked pointer finds these.
//! - Without `main_arena` (or with glibc older than 2.27, whose `malloc_state` differs), no
//!   fastbins and no other arenas: fastbin-sized chunks that look in use are counted in
//!   [`Totals::maybe_fastbin`] too, and the notes say so.
//! - The tcache of glibc 2.42 and later (a new layout): its chunks look in use; a note says so.
//!
//! A heap that does not check out stops *that* walk with a [`WalkError`], counted; the other
//! heaps are still walked, and [`HeapSpan::complete`] says which ones were walked to the end.
//!
//! Results hold addresses, sizes, states and counts, never memory contents.

pub mod glibc;

use thiserror::Error;

pub use glibc::{census, mmapped_chunk_at};

/// The target's glibc version, which decides layouts: safe-linking from 2.32, the tcache
/// count type (8 bits before 2.30, 16 after), the `heap_info` size (48 bytes from 2.35).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GlibcVersion {
    pub major: u32,
    pub minor: u32,
}

impl GlibcVersion {
    pub const fn new(major: u32, minor: u32) -> Self {
        GlibcVersion { major, minor }
    }

    /// "2.36" or "2.36.9" (as [`crate::target::elf::glibc_version`] gives it).
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.trim().split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        Some(GlibcVersion { major, minor })
    }

    pub(crate) fn at_least(self, major: u32, minor: u32) -> bool {
        self >= GlibcVersion::new(major, minor)
    }
}

/// What a chunk is to the allocator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum ChunkState {
    /// Held by the program.
    InUse = 0,
    /// Free in a bin (the next chunk's `PREV_INUSE` bit is clear).
    Free = 1,
    /// Free in a thread's tcache (looks in use to the chunk walk).
    TcacheFree = 2,
    /// Free in an arena's fastbin (looks in use to the chunk walk).
    FastbinFree = 3,
    /// A chunk in a mapping of its own (`IS_MMAPPED`), held by the program.
    Mmapped = 4,
    /// The arena's top chunk: the unused end of its current heap.
    Top = 5,
    /// A thread's `tcache_perthread_struct`: in use, but by malloc itself.
    TcacheStruct = 6,
}

impl ChunkState {
    const ALL: [ChunkState; 7] = [
        ChunkState::InUse,
        ChunkState::Free,
        ChunkState::TcacheFree,
        ChunkState::FastbinFree,
        ChunkState::Mmapped,
        ChunkState::Top,
        ChunkState::TcacheStruct,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ChunkState::InUse => "in_use",
            ChunkState::Free => "free",
            ChunkState::TcacheFree => "tcache_free",
            ChunkState::FastbinFree => "fastbin_free",
            ChunkState::Mmapped => "mmapped",
            ChunkState::Top => "top",
            ChunkState::TcacheStruct => "tcache_struct",
        }
    }
}

/// One chunk, in 16 bytes (a 1 GiB heap of 64-byte blocks is 16 million of them): chunk sizes
/// are multiples of 16, so the state rides in the size's low bits, as glibc's flags do.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    user: u64,
    size_state: u64,
}

impl Chunk {
    pub(crate) fn new(user: u64, chunk_size: u64, state: ChunkState) -> Self {
        Chunk { user, size_state: (chunk_size & !15) | state as u64 }
    }

    /// The pointer the program got (the chunk's address plus 16).
    pub fn user(&self) -> u64 {
        self.user
    }

    /// Where the chunk's header starts.
    pub fn addr(&self) -> u64 {
        self.user - 16
    }

    /// The whole chunk, header included.
    pub fn chunk_size(&self) -> u64 {
        self.size_state & !15
    }

    pub fn state(&self) -> ChunkState {
        ChunkState::ALL.get((self.size_state & 15) as usize).copied().unwrap_or(ChunkState::InUse)
    }

    /// What `malloc_usable_size` would say: the chunk less its size word (the next chunk's
    /// `prev_size` is usable), less both header words for an mmapped one; 0 for the top.
    pub fn usable(&self) -> u64 {
        match self.state() {
            ChunkState::Mmapped => self.chunk_size().saturating_sub(16),
            ChunkState::Top => 0,
            _ => self.chunk_size().saturating_sub(8),
        }
    }

    pub(crate) fn set_state(&mut self, state: ChunkState) {
        self.size_state = (self.size_state & !15) | state as u64;
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Chunk({:#x}, {:#x}, {})", self.user, self.chunk_size(), self.state().name())
    }
}

/// A count of chunks and their bytes (whole chunk sizes, as `malloc_info` counts them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub count: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.count += 1;
        self.bytes += bytes;
    }

    fn merge(&mut self, o: Tally) {
        self.count += o.count;
        self.bytes += o.bytes;
    }
}

/// Chunks by state, for one arena or the whole census.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub in_use: Tally,
    pub free: Tally,
    pub tcache_free: Tally,
    pub fastbin_free: Tally,
    pub top: Tally,
    pub mmapped: Tally,
    pub tcache_structs: Tally,
    /// In-use chunks of fastbin sizes in arenas whose fastbins could not be read: some of
    /// them may be free. Also counted in `in_use`.
    pub maybe_fastbin: Tally,
    /// Heap bytes in no chunk: `heap_info`, an arena's `malloc_state`, alignment, fenceposts.
    pub overhead_bytes: u64,
}

impl Totals {
    fn count(&mut self, c: &Chunk) {
        let size = c.chunk_size();
        match c.state() {
            ChunkState::InUse => self.in_use.add(size),
            ChunkState::Free => self.free.add(size),
            ChunkState::TcacheFree => self.tcache_free.add(size),
            ChunkState::FastbinFree => self.fastbin_free.add(size),
            ChunkState::Mmapped => self.mmapped.add(size),
            ChunkState::Top => self.top.add(size),
            ChunkState::TcacheStruct => self.tcache_structs.add(size),
        }
    }

    fn merge(&mut self, o: &Totals) {
        self.in_use.merge(o.in_use);
        self.free.merge(o.free);
        self.tcache_free.merge(o.tcache_free);
        self.fastbin_free.merge(o.fastbin_free);
        self.top.merge(o.top);
        self.mmapped.merge(o.mmapped);
        self.tcache_structs.merge(o.tcache_structs);
        self.maybe_fastbin.merge(o.maybe_fastbin);
        self.overhead_bytes += o.overhead_bytes;
    }
}

/// One heap of an arena: the brk heap, or a `heap_info` mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapSpan {
    pub start: u64,
    pub end: u64,
    /// Where the first chunk starts (after `heap_info`, and the arena's `malloc_state`).
    pub first_chunk: u64,
    /// Walked to its end (top chunk or fenceposts) with no error.
    pub complete: bool,
}

/// One arena: `main_arena` or one of the ring's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arena {
    /// Its `malloc_state`; None for a main arena that was not found.
    pub base: Option<u64>,
    pub main: bool,
    /// In address order; an arena's first heap holds its `malloc_state`.
    pub heaps: Vec<HeapSpan>,
    /// `system_mem`, when the `malloc_state` was read.
    pub system_bytes: Option<u64>,
    /// The top chunk's address.
    pub top: Option<u64>,
    pub top_bytes: u64,
    /// The fastbins were followed (the `malloc_state` was read and validated).
    pub fastbins_read: bool,
    pub totals: Totals,
}

/// Which part of the census a [`WalkError`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// A heap's chunk walk.
    Walk,
    /// Reading an arena, its ring or its heaps.
    Arena,
    /// A tcache list.
    Tcache,
    /// A fastbin list.
    Fastbin,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Walk => "heap walk",
            Phase::Arena => "arena",
            Phase::Tcache => "tcache list",
            Phase::Fastbin => "fastbin list",
        })
    }
}

/// What did not check out. Each stops the walk or list it was found in.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Violation {
    /// The memory could not be read (unmapped, or absent from the snapshot).
    #[error("memory that could not be read")]
    Unreadable,
    /// A chunk, or its header, would end past its heap's end.
    #[error("a chunk that runs past the end of its heap")]
    PastEnd,
    /// A size under `MINSIZE` (32) or not a multiple of 16 (zero included: no walk loops).
    #[error("a chunk size under 32 bytes or not a multiple of 16")]
    BadSize,
    /// A free chunk's size and the next chunk's `prev_size` differ.
    #[error("a free chunk whose size is not the next chunk's prev_size")]
    PrevSize,
    /// `IS_MMAPPED` on a chunk inside a heap.
    #[error("the mmapped bit on a chunk inside a heap")]
    MmappedInHeap,
    /// `NON_MAIN_ARENA` on a chunk of the brk heap.
    #[error("the non-main-arena bit on a chunk of the main heap")]
    NonMainInMain,
    /// Fenceposts where the heap should go on, or fenceposts that do not close the heap: the
    /// heap is not contiguous there.
    #[error("a fencepost where the heap should go on (the heap is not contiguous)")]
    Fencepost,
    /// An arena's older heap whose last chunk is not followed by fenceposts.
    #[error("an older heap of an arena that does not end in fenceposts")]
    NoFencepost,
    /// The walk reached the heap's end, or went past the arena's top, without meeting it.
    #[error("the walk did not meet the arena's top chunk")]
    TopMissed,
    /// The top chunk ends short of its heap's end.
    #[error("a top chunk that does not reach the end of its heap")]
    TopShort,
    /// `main_arena.top` is not the last chunk of the brk heap.
    #[error("main_arena's top is not the last chunk of the brk heap")]
    TopMismatch,
    /// An arena of the ring does not look like a `malloc_state`.
    #[error("an arena in the ring that does not look like a malloc_state")]
    BadArena,
    /// The ring of arenas loops without coming back to `main_arena`, or is too long.
    #[error("the ring of arenas does not come back to main_arena")]
    RingBroken,
    /// A `heap_info` that names another arena, has an implausible size, or loops.
    #[error("a heap_info that does not name its arena or has an implausible size")]
    BadHeapInfo,
    /// A free-list pointer not aligned to 16.
    #[error("a free-list pointer not aligned to 16 bytes")]
    Misaligned,
    /// A free-list entry that is not a chunk of the list's size that looks in use.
    #[error("a free-list entry that is not a chunk of the list's size class")]
    NotAChunk,
    /// A fastbin entry outside its arena's heaps.
    #[error("a fastbin entry outside its arena's heaps")]
    OtherArena,
    /// A chunk on two free lists, or a list that loops.
    #[error("a chunk on two free lists, or a list that loops")]
    DoubleListed,
    /// A tcache list whose length is not its count.
    #[error("a tcache list whose length disagrees with its count")]
    CountMismatch,
    /// A tcache entry whose `key` is not the thread cache's (glibc 2.29+).
    #[error("a tcache entry whose key is not the cache's")]
    KeyMismatch,
    /// A list that runs on through memory no walk reached, past the hard cap.
    #[error("a free list longer than the hard cap")]
    TooLong,
}

/// One walk or list that stopped, and where.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq, Hash)]
#[error("{during} of the heap at {heap_start:#x} stopped at {at:#x}: {what}")]
pub struct WalkError {
    /// The heap whose walk or list stopped (for an arena or a fastbin list: its first heap;
    /// 0 when not known).
    pub heap_start: u64,
    pub at: u64,
    pub during: Phase,
    pub what: Violation,
}

/// Everything the census found.
#[derive(Clone, Debug, Default)]
pub struct Census {
    /// `main_arena` first, then in the order of its `next` ring (as `malloc_info` lists them).
    pub arenas: Vec<Arena>,
    /// Every chunk, in address order.
    pub chunks: Vec<Chunk>,
    /// The per-thread caches (user addresses of their `tcache_perthread_struct`).
    pub tcaches: Vec<u64>,
    /// All arenas, and mmapped chunks.
    pub totals: Totals,
    pub errors: Vec<WalkError>,
    pub main_arena: Option<u64>,
    /// What was not read, and why.
    pub notes: Vec<&'static str>,
}

impl Census {
    /// The chunk whose user pointer is `user`.
    pub fn chunk_at(&self, user: u64) -> Option<&Chunk> {
        self.chunks.binary_search_by_key(&user, |c| c.user).ok().map(|i| &self.chunks[i])
    }

    /// The chunk whose bytes (header included) hold `addr`.
    pub fn containing(&self, addr: u64) -> Option<&Chunk> {
        let i = self.chunks.partition_point(|c| c.addr() <= addr);
        let c = self.chunks.get(i.checked_sub(1)?)?;
        (addr < c.addr() + c.chunk_size()).then_some(c)
    }

    /// Heaps whose walk stopped before their end.
    pub fn incomplete_heaps(&self) -> impl Iterator<Item = u64> + '_ {
        self.arenas.iter().flat_map(|a| a.heaps.iter()).filter(|h| !h.complete).map(|h| h.start)
    }
}
