//! Back through untracked memory: when what holds tracked blocks is heap memory that no
//! tracker knows (blocks from before attach on an allocator without a heap walk, or
//! allocator data), find what holds *that*, as far as pointers go, up to a real root: a
//! global, TLS, a live stack slot or a register.
//!
//! Untracked memory has no block boundaries, so each step asks: which pointers point at or
//! just below this address (the start of the object that contains it, or an interior
//! pointer into it)? Their places are the next step: a real root ends the walk, untracked
//! memory goes on. Breadth-first, so the chain found is a shortest one, and bounded.
//!
//! Pure: the roots, and a [`Memory`] to read them.

use std::collections::HashSet;

use super::mark::{Memory, RootRef, RootSlot};

/// A root range, and what a walk does there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
    pub root: u32,
    pub role: Role,
}

/// What a pointer found in a range means for a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A real root: a walk can end here. Lower ranks are better answers: a walk that finds a
    /// root of rank 2 (a thread's TLS, where an allocator keeps its caches of free slots)
    /// goes on looking for one of rank 0 (a program's global).
    Root(u8),
    /// Untracked heap memory: the walk goes on through it.
    Untracked,
    /// The allocator's own data (its arenas' tables point at every slab): no answer, and no
    /// way on.
    DeadEnd,
}

/// Where a pointer was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Place {
    Word(u64),
    Value { root: u32, index: u32 },
}

/// The end of a walk back from an untracked word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// The real root that reaches it, and its rank (see [`Role::Root`]).
    pub root: RootRef,
    pub rank: u8,
    /// How many untracked objects lie between that root and the word (the word's own
    /// object included).
    pub objects: u64,
}

/// How far an object may extend below the word it holds: a pointer to anything further down
/// is not taken as pointing at the same object.
const WINDOW: u64 = 64 << 10;
/// Distinct pointed-to addresses tried per step when the nearest one alone (the start of the
/// word's object, as a rule) leads nowhere.
const WIDER: usize = 3;

/// Limits, so that a huge heap costs bounded time and memory.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Pointers into untracked memory kept in the index.
    pub max_pointers: usize,
    /// Places visited per walk.
    pub max_visits: usize,
    /// Places visited by all walks together: past it walks find nothing (and say so).
    pub max_total_visits: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_pointers: 4 << 20, max_visits: 1 << 20, max_total_visits: 4 << 20 }
    }
}

/// Whether `a` lies in one of the sorted, disjoint `(start, end)` ranges.
pub fn contains(sorted: &[(u64, u64)], a: u64) -> bool {
    let i = sorted.partition_point(|r| r.0 <= a);
    i > 0 && a < sorted[i - 1].1
}

/// Every pointer into untracked memory, by the address it points at.
pub struct Index {
    ranges: Vec<Range>,
    /// (pointed-to address, where the pointer is), sorted.
    pointers: Vec<(u64, Place)>,
    /// The index stopped at `max_pointers`: walks may miss a path.
    pub truncated: bool,
    limits: Limits,
    /// The rank of a register as an answer (see [`Role::Root`]).
    value_rank: u8,
    /// What is left of [`Limits::max_total_visits`].
    visits_left: std::cell::Cell<usize>,
}

impl Index {
    /// Reads every root range and register value once. `values`: (root, the values).
    pub fn build(
        ranges: &[Range],
        values: &[(u32, Vec<u64>)],
        value_rank: u8,
        mem: &mut dyn Memory,
        limits: Limits,
    ) -> Index {
        let mut ranges = ranges.to_vec();
        ranges.sort_by_key(|r| r.start);
        let mut untracked: Vec<(u64, u64)> =
            ranges.iter().filter(|r| r.role == Role::Untracked).map(|r| (r.start, r.end)).collect();
        untracked.sort_unstable();
        let inside = |v: u64| contains(&untracked, v);
        let mut pointers = Vec::new();
        let mut truncated = false;
        for (root, vals) in values {
            for (index, v) in vals.iter().enumerate() {
                if inside(*v) {
                    pointers.push((*v, Place::Value { root: *root, index: index as u32 }));
                }
            }
        }
        let mut buf = vec![0u8; 1 << 20];
        'ranges: for r in &ranges {
            let mut at = r.start & !7;
            while at < r.end {
                let len = (r.end - at).min(buf.len() as u64) as usize & !7;
                if len == 0 {
                    break;
                }
                // A chunk that fails as a whole is retried page by page.
                let pieces: Vec<(u64, usize)> = if mem.read(at, &mut buf[..len]).is_ok() {
                    vec![(at, len)]
                } else {
                    (0..len).step_by(4096).map(|o| (at + o as u64, 4096.min(len - o))).collect()
                };
                for (p, plen) in pieces {
                    let off = (p - at) as usize;
                    if plen < len && mem.read(p, &mut buf[off..off + plen]).is_err() {
                        continue;
                    }
                    for (i, w) in buf[off..off + plen].chunks_exact(8).enumerate() {
                        let v = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
                        if v != 0 && inside(v) {
                            if pointers.len() >= limits.max_pointers {
                                truncated = true;
                                break 'ranges;
                            }
                            pointers.push((v, Place::Word(p + 8 * i as u64)));
                        }
                    }
                }
                at += len as u64;
            }
        }
        pointers.sort_unstable_by_key(|p| p.0);
        let visits_left = std::cell::Cell::new(limits.max_total_visits);
        Index { ranges, pointers, truncated, limits, value_rank, visits_left }
    }

    fn range_of(&self, addr: u64) -> Option<&Range> {
        let i = self.ranges.partition_point(|r| r.start <= addr);
        (i > 0 && addr < self.ranges[i - 1].end).then(|| &self.ranges[i - 1])
    }

    /// The places of the pointers to the `nearest` distinct addresses at or below `addr`.
    fn referrers(&self, addr: u64, nearest: usize) -> impl Iterator<Item = Place> + '_ {
        let end = self.pointers.partition_point(|p| p.0 <= addr);
        let lo = addr.saturating_sub(WINDOW);
        let mut distinct = 0;
        let mut last = None;
        self.pointers[..end]
            .iter()
            .rev()
            .take_while(move |p| {
                if last != Some(p.0) {
                    distinct += 1;
                    last = Some(p.0);
                }
                p.0 >= lo && distinct <= nearest
            })
            .map(|p| p.1)
    }

    /// The address that stands for the object holding the untracked word at `addr`: the
    /// nearest address at or below it that something points at (its start, as a rule), or
    /// `addr` itself.
    pub fn object_of(&self, addr: u64) -> u64 {
        let end = self.pointers.partition_point(|p| p.0 <= addr);
        match end.checked_sub(1).map(|i| self.pointers[i].0) {
            Some(v) if addr - v < WINDOW => v,
            _ => addr,
        }
    }

    /// Walks back from the untracked word at `addr` to the nearest real root: through the
    /// start of each object (the nearest pointed-to address below), and if that finds none,
    /// through a few more candidates per step.
    pub fn follow(&self, addr: u64) -> Option<Found> {
        self.walk(addr, 1).or_else(|| self.walk(addr, WIDER))
    }

    /// Breadth-first from `addr`: the best-ranked root found, the nearest of its rank.
    fn walk(&self, addr: u64, nearest: usize) -> Option<Found> {
        let mut seen: HashSet<u64> = HashSet::from([addr]);
        let mut level = vec![addr];
        let mut objects = 1;
        let mut best: Option<(u8, Found)> = None;
        while !level.is_empty() && seen.len() < self.limits.max_visits {
            let left = self.visits_left.get().saturating_sub(level.len());
            self.visits_left.set(left);
            if left == 0 {
                break;
            }
            let mut next = Vec::new();
            for &x in &level {
                for place in self.referrers(x, nearest) {
                    let (rank, root) = match place {
                        Place::Value { root, index } => {
                            (self.value_rank, RootRef { root, slot: RootSlot::Value { index } })
                        }
                        Place::Word(w) => match self.range_of(w).map(|r| (r.role, r.root)) {
                            Some((Role::Root(rank), root)) => {
                                (rank, RootRef { root, slot: RootSlot::Word { addr: w } })
                            }
                            Some((Role::Untracked, _)) => {
                                if seen.insert(w) {
                                    next.push(w);
                                }
                                continue;
                            }
                            _ => continue,
                        },
                    };
                    if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                        best = Some((rank, Found { root, rank, objects }));
                    }
                    if rank == 0 {
                        return best.map(|b| b.1);
                    }
                }
            }
            level = next;
            objects += 1;
        }
        best.map(|b| b.1)
    }

    /// Whether walks were cut short by a limit (the index's size or the visits' budget).
    pub fn cut_short(&self) -> bool {
        self.truncated || self.visits_left.get() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::mark::Unreadable;

    /// Memory as (address, words) pieces; zero elsewhere.
    struct Mem(Vec<(u64, Vec<u64>)>);

    impl Memory for Mem {
        fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Unreadable> {
            for (i, b) in buf.chunks_exact_mut(8).enumerate() {
                let a = addr + 8 * i as u64;
                let w = self
                    .0
                    .iter()
                    .find(|(s, w)| *s <= a && a < s + 8 * w.len() as u64)
                    .map_or(0, |(s, w)| w[((a - s) / 8) as usize]);
                b.copy_from_slice(&w.to_le_bytes());
            }
            Ok(())
        }
    }

    const GLOBALS: u64 = 0x1000;
    const HEAP: u64 = 0x10_0000;
    const ALLOCATOR: u64 = 0x2000;
    const TLS: u64 = 0x3000;

    fn ranges() -> Vec<Range> {
        vec![
            Range { start: GLOBALS, end: GLOBALS + 0x100, root: 0, role: Role::Root(0) },
            Range { start: TLS, end: TLS + 0x100, root: 3, role: Role::Root(2) },
            Range { start: HEAP, end: HEAP + 0x10_0000, root: 1, role: Role::Untracked },
            Range { start: ALLOCATOR, end: ALLOCATOR + 0x100, root: 2, role: Role::DeadEnd },
        ]
    }

    #[test]
    fn a_queue_from_before_attach_leads_back_to_its_global_head() {
        // head -> node0 -> node1 -> ... -> node999; nodes of 32 bytes, `next` at +8. A tracked
        // block is held by node999.next.
        let n = 1000u64;
        let mut heap = vec![0u64; (n * 4) as usize];
        for i in 0..n - 1 {
            heap[(i * 4 + 1) as usize] = HEAP + (i + 1) * 32;
        }
        let mut globals = vec![0u64; 32];
        globals[3] = HEAP; // head
        // The allocator's table points at the last node's slab: no answer. A thread's cache of
        // free slots points at the last node too: a worse answer than the global.
        let allocator = vec![HEAP + (n - 1) * 32];
        let tls = vec![HEAP + (n - 1) * 32];
        let mut mem = Mem(vec![(GLOBALS, globals), (HEAP, heap), (ALLOCATOR, allocator), (TLS, tls)]);
        let index = Index::build(&ranges(), &[], 1, &mut mem, Limits::default());
        let holder = HEAP + (n - 1) * 32 + 8;
        let found = index.follow(holder).expect("reaches the head");
        assert_eq!(found.root, RootRef { root: 0, slot: RootSlot::Word { addr: GLOBALS + 24 } });
        assert_eq!((found.objects, found.rank), (n, 0));
    }

    #[test]
    fn a_bucket_array_is_followed_to_the_global_that_points_at_its_start() {
        // A 4 KiB bucket array from before attach; the holder is bucket 300.
        let mut globals = vec![0u64; 32];
        globals[5] = HEAP + 0x2000;
        let mut mem = Mem(vec![(GLOBALS, globals), (HEAP + 0x2000, vec![0u64; 512])]);
        let index = Index::build(&ranges(), &[], 1, &mut mem, Limits::default());
        let found = index.follow(HEAP + 0x2000 + 300 * 8).unwrap();
        assert_eq!(found.root, RootRef { root: 0, slot: RootSlot::Word { addr: GLOBALS + 40 } });
        assert_eq!(found.objects, 1);
    }

    #[test]
    fn a_register_ends_the_walk_and_nothing_reaching_it_says_none() {
        let mut mem = Mem(vec![(GLOBALS, vec![0u64; 32]), (HEAP, vec![0u64; 64])]);
        let regs = vec![(7u32, vec![0x42, HEAP + 0x40])];
        let index = Index::build(&ranges(), &regs, 1, &mut mem, Limits::default());
        let found = index.follow(HEAP + 0x48).unwrap();
        assert_eq!(found.root, RootRef { root: 7, slot: RootSlot::Value { index: 1 } });
        // Below the only pointer: nothing points at or below it within the window.
        assert_eq!(index.follow(HEAP + 0x38), None);
    }

    #[test]
    fn a_cycle_of_untracked_objects_with_no_root_ends() {
        // a.next = b, b.next = a, nothing else.
        let heap = vec![0, HEAP + 0x100, 0, 0];
        let mut heap2 = vec![0u64; 4];
        heap2[1] = HEAP;
        let mut mem = Mem(vec![(GLOBALS, vec![0u64; 32]), (HEAP, heap), (HEAP + 0x100, heap2)]);
        let index = Index::build(&ranges(), &[], 1, &mut mem, Limits::default());
        assert_eq!(index.follow(HEAP + 8), None);
    }
}
