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

use std::collections::{HashMap, HashSet};

use super::mark::{Memory, RootRef, RootSlot};

/// A root range, and whether it is untracked heap memory (to be followed through) or a real
/// root (where a walk ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
    pub root: u32,
    pub untracked: bool,
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
    /// The real root that reaches it.
    pub root: RootRef,
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_pointers: 4 << 20, max_visits: 1 << 20 }
    }
}

/// Every pointer into untracked memory, by the address it points at.
pub struct Index {
    ranges: Vec<Range>,
    /// (pointed-to address, where the pointer is), sorted.
    pointers: Vec<(u64, Place)>,
    /// The index stopped at `max_pointers`: walks may miss a path.
    pub truncated: bool,
    limits: Limits,
}

impl Index {
    /// Reads every root range and register value once. `values`: (root, the values).
    pub fn build(
        ranges: &[Range],
        values: &[(u32, Vec<u64>)],
        mem: &mut dyn Memory,
        limits: Limits,
    ) -> Index {
        let mut ranges = ranges.to_vec();
        ranges.sort_by_key(|r| r.start);
        let mut untracked: Vec<(u64, u64)> =
            ranges.iter().filter(|r| r.untracked).map(|r| (r.start, r.end)).collect();
        untracked.sort_unstable();
        let inside = |v: u64| {
            let i = untracked.partition_point(|r| r.0 <= v);
            i > 0 && v < untracked[i - 1].1
        };
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
        Index { ranges, pointers, truncated, limits }
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

    /// Walks back from the untracked word at `addr` to the nearest real root: through the
    /// start of each object (the nearest pointed-to address below), and if that finds none,
    /// through a few more candidates per step.
    pub fn follow(&self, addr: u64) -> Option<Found> {
        self.walk(addr, 1).or_else(|| self.walk(addr, WIDER))
    }

    fn walk(&self, addr: u64, nearest: usize) -> Option<Found> {
        let mut seen: HashSet<u64> = HashSet::from([addr]);
        let mut level = vec![addr];
        let mut objects = 1;
        while !level.is_empty() && seen.len() < self.limits.max_visits {
            let mut next = Vec::new();
            for &x in &level {
                for place in self.referrers(x, nearest) {
                    match place {
                        Place::Value { root, index } => {
                            return Some(Found {
                                root: RootRef { root, slot: RootSlot::Value { index } },
                                objects,
                            });
                        }
                        Place::Word(w) => match self.range_of(w) {
                            Some(r) if !r.untracked => {
                                return Some(Found {
                                    root: RootRef { root: r.root, slot: RootSlot::Word { addr: w } },
                                    objects,
                                });
                            }
                            Some(_) if seen.insert(w) => next.push(w),
                            _ => {}
                        },
                    }
                }
            }
            level = next;
            objects += 1;
        }
        None
    }

    /// [`Index::follow`] for many words, each walked once.
    pub fn follow_all(&self, addrs: impl IntoIterator<Item = u64>) -> HashMap<u64, Option<Found>> {
        let mut out = HashMap::new();
        for a in addrs {
            out.entry(a).or_insert_with(|| self.follow(a));
        }
        out
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

    fn ranges() -> Vec<Range> {
        vec![
            Range { start: GLOBALS, end: GLOBALS + 0x100, root: 0, untracked: false },
            Range { start: HEAP, end: HEAP + 0x10_0000, root: 1, untracked: true },
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
        let mut mem = Mem(vec![(GLOBALS, globals), (HEAP, heap)]);
        let index = Index::build(&ranges(), &[], &mut mem, Limits::default());
        let holder = HEAP + (n - 1) * 32 + 8;
        let found = index.follow(holder).expect("reaches the head");
        assert_eq!(found.root, RootRef { root: 0, slot: RootSlot::Word { addr: GLOBALS + 24 } });
        assert_eq!(found.objects, n);
    }

    #[test]
    fn a_bucket_array_is_followed_to_the_global_that_points_at_its_start() {
        // A 4 KiB bucket array from before attach; the holder is bucket 300.
        let mut globals = vec![0u64; 32];
        globals[5] = HEAP + 0x2000;
        let mut mem = Mem(vec![(GLOBALS, globals), (HEAP + 0x2000, vec![0u64; 512])]);
        let index = Index::build(&ranges(), &[], &mut mem, Limits::default());
        let found = index.follow(HEAP + 0x2000 + 300 * 8).unwrap();
        assert_eq!(found.root, RootRef { root: 0, slot: RootSlot::Word { addr: GLOBALS + 40 } });
        assert_eq!(found.objects, 1);
    }

    #[test]
    fn a_register_ends_the_walk_and_nothing_reaching_it_says_none() {
        let mut mem = Mem(vec![(GLOBALS, vec![0u64; 32]), (HEAP, vec![0u64; 64])]);
        let regs = vec![(7u32, vec![0x42, HEAP + 0x40])];
        let index = Index::build(&ranges(), &regs, &mut mem, Limits::default());
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
        let index = Index::build(&ranges(), &[], &mut mem, Limits::default());
        assert_eq!(index.follow(HEAP + 8), None);
    }
}
