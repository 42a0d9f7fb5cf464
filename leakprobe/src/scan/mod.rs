//! **Layer: reachability scan.** Tells a true leak (no pointer to the block is left) apart from
//! accumulation (still reachable), the way valgrind's memcheck and LSan do, on a live process.
//!
//! The stages read one way: capture (stop the world, registers), snapshot (a copy-on-write child
//! whose memory we read), roots (stacks, globals, TLS, registers), then [`mark`]: the pure
//! marking and classification model, which follows valgrind's `memcheck/mc_leakcheck.c` so that
//! its counts agree with `valgrind --leak-check=full`, and adds who holds the reachable blocks and
//! which lost blocks form cycles.
//!
//! The model reads words only to follow pointers: its results hold addresses, sizes, indices and
//! counts, never memory contents (they may be secrets).

pub mod mark;

pub use mark::{
    Block, BlockOutcome, Class, Cycle, Cycles, HeldBy, Heuristic, Heuristics, Holder, MarkError, Marking,
    Memory, Options, Rest, Retainer, RootRange, RootRef, RootSlot, RootStats, RootValues, Roots, SiteCount,
    SiteSummary, Stats, Tallies, Tally, Unreadable, mark,
};
