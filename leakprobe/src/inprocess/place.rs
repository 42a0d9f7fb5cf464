//! Where the stub's code goes in the target: within a rel32 branch of the functions it
//! forwards to, so that an unsampled call passes on with a direct jump (see
//! [`super::stub::in_reach`]). Pure: the caller reads `/proc/PID/maps` and `stat`.
//!
//! A spot is taken at the top or the bottom of a free gap between two mappings, one page away
//! from each, and never where the process's memory grows into:
//! - not above the program break's start (`start_brk`) within [`BRK_ROOM`] of the heap's end,
//!   so `brk` keeps the room it had;
//! - not just below a mapping that grows down (`[stack]`).
//!
//! Of the spots that reach every target, the nearest one wins. None: the caller maps
//! anywhere and the stub reaches its functions through the data page, as before.

use super::stub::in_reach;

const PAGE: u64 = 4096;

/// Room kept free above the heap's end (or the program break's start): what `brk` may still
/// want. glibc falls back to mmap when `brk` is blocked, but a leak tool must not change how a
/// program's heap grows.
pub const BRK_ROOM: u64 = 1 << 30;

/// A mapping of the target, as `/proc/PID/maps` lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// `[stack]`: grows down into the gap below it.
    pub grows_down: bool,
}

/// The target's layout: its mappings in address order, and where its heap may grow.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub regions: Vec<Region>,
    /// `[start_brk, end of [heap] or start_brk)` from `/proc/PID/stat` and the maps.
    pub brk: Option<(u64, u64)>,
    /// `vm.mmap_min_addr`: nothing may be mapped below it.
    pub min_addr: u64,
}

impl Layout {
    /// The layouts of several processes as one: a spot free in it is free in each of them
    /// (their mappings together, the widest heap room). Empty if any is unknown.
    pub fn union(layouts: impl IntoIterator<Item = Layout>) -> Layout {
        let mut out = Layout::default();
        for l in layouts {
            if l.regions.is_empty() {
                return Layout::default();
            }
            out.regions.extend(l.regions);
            out.brk = match (out.brk, l.brk) {
                (Some((s1, e1)), Some((s2, e2))) => Some((s1.min(s2), e1.max(e2))),
                (a, b) => a.or(b),
            };
            out.min_addr = out.min_addr.max(l.min_addr);
        }
        out.regions.sort_by_key(|r| r.start);
        out
    }

    /// True when `[at, at + len)` lies in the room the heap may grow into.
    fn in_brk_room(&self, at: u64, len: u64) -> bool {
        self.brk.is_some_and(|(start, end)| at < end.saturating_add(BRK_ROOM) && at + len > start)
    }

    /// The free gaps between mappings, each with whether the mapping above grows down.
    fn gaps(&self) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
        let mut below = self.min_addr.max(PAGE);
        let mut out = Vec::new();
        for r in &self.regions {
            if r.start > below {
                out.push((below, r.start, r.grows_down));
            }
            below = below.max(r.end);
        }
        // Above the last mapping: the top of user space (47 bits).
        let top = 1u64 << 47;
        if top > below {
            out.push((below, top - PAGE, false));
        }
        out.into_iter()
    }
}

/// A page-aligned address for `len` bytes of code from which every one of `targets` is in
/// rel32 reach, nearest to them; `None` if no free gap allows one.
pub fn near_spot(layout: &Layout, targets: &[u64], len: u64) -> Option<u64> {
    // Unknown mappings: nothing is known free.
    if layout.regions.is_empty() {
        return None;
    }
    let (&lo, &hi) = (targets.iter().min()?, targets.iter().max()?);
    let len = len.div_ceil(PAGE) * PAGE;
    let mut best: Option<(u64, u64)> = None;
    for (gap_lo, gap_hi, above_grows_down) in layout.gaps() {
        // One page free on each side.
        if gap_hi < gap_lo + len + 2 * PAGE {
            continue;
        }
        let bottom = gap_lo + PAGE;
        let top = gap_hi - PAGE - len;
        let spots = [Some(bottom), (!above_grows_down).then_some(top)];
        for at in spots.into_iter().flatten() {
            if layout.in_brk_room(at, len) || !targets.iter().all(|&t| in_reach(at, t)) {
                continue;
            }
            let distance = hi.abs_diff(at).max(lo.abs_diff(at + len));
            if best.is_none_or(|(_, d)| distance < d) {
                best = Some((at, distance));
            }
        }
    }
    best.map(|(at, _)| at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spot_for_several_processes_is_free_in_each() {
        let libc = 0x7f00_0010_0000;
        let master = Layout {
            regions: vec![region(0x5555_0000_0000, 0x5555_0001_0000), region(libc, libc + 0x20_0000)],
            brk: None,
            min_addr: 65536,
        };
        let alone = near_spot(&master, &[libc], LEN).unwrap();
        // A worker loaded a library (NSS) right where the master's spot would be.
        let mut worker = master.clone();
        worker.regions.insert(1, region(alone - 0x1000, alone + 0x2_0000));
        let both = near_spot(&Layout::union([master.clone(), worker.clone()]), &[libc], LEN).unwrap();
        for l in [&master, &worker] {
            assert!(
                l.regions.iter().all(|r| both + LEN + PAGE <= r.start || r.end + PAGE <= both),
                "{both:#x}"
            );
        }
        // An unknown layout among them: nothing is known free.
        assert!(near_spot(&Layout::union([master, Layout::default()]), &[libc], LEN).is_none());
    }

    fn region(start: u64, end: u64) -> Region {
        Region { start, end, grows_down: false }
    }

    const LEN: u64 = 1 << 16;

    #[test]
    fn a_non_pie_python_gets_the_room_below_its_executable() {
        // Debian's python3.11: the executable at 0x400000, its break somewhere above, the
        // libraries and the stack far away.
        let layout = Layout {
            regions: vec![
                region(0x40_0000, 0xa8_5000),
                region(0xa8_5000, 0xaca_000),
                region(0x387a_8000, 0x3883_3000),
                region(0x7f69_6e24_5000, 0x7f69_6e4a_b000),
                Region { start: 0x7ffd_0000_0000, end: 0x7ffd_0002_1000, grows_down: true },
            ],
            brk: Some((0x387a_8000, 0x3883_3000)),
            min_addr: 0x1_0000,
        };
        let at = near_spot(&layout, &[0x50_a08f, 0x57_624c], LEN).unwrap();
        assert_eq!(at, 0x40_0000 - PAGE - LEN);
        assert!(in_reach(at, 0x50_a08f));
    }

    #[test]
    fn a_library_gets_a_spot_below_the_lowest_mapping_never_in_the_heap_room() {
        let libc = 0x7f00_1000_0000;
        let layout = Layout {
            regions: vec![
                region(0x5555_0000_0000, 0x5555_0010_0000),
                region(0x5555_0100_0000, 0x5555_0200_0000),
                region(libc, libc + 0x20_0000),
                region(libc + 0x20_0000, libc + 0x40_0000),
            ],
            brk: Some((0x5555_0100_0000, 0x5555_0200_0000)),
            min_addr: 0x1_0000,
        };
        let at = near_spot(&layout, &[libc + 0x9_0000], LEN).unwrap();
        assert_eq!(at, libc - PAGE - LEN);
        // Everything above the heap within BRK_ROOM is refused even when it is the only gap.
        let tight = Layout { regions: layout.regions[..2].to_vec(), ..layout.clone() };
        let heap_end = 0x5555_0200_0000;
        let spot = near_spot(&tight, &[heap_end + 0x1000], LEN);
        assert!(spot.is_none_or(|at| at < 0x5555_0100_0000 || at >= heap_end + BRK_ROOM), "{spot:x?}");
    }

    #[test]
    fn no_spot_when_nothing_free_is_in_reach_and_never_below_a_stack() {
        let t = 0x7f00_0000_0000;
        // Mapped solid for 4 GiB around the target, but for a gap just below the stack.
        let layout = Layout {
            regions: vec![
                region(t - (2 << 30), t + 0x1000),
                Region { start: t + 0x1000 + LEN + 4 * PAGE, end: t + (2 << 30), grows_down: true },
            ],
            brk: None,
            min_addr: 0x1_0000,
        };
        // The bottom of the gap is fine; its top (under the stack) is never taken.
        assert_eq!(near_spot(&layout, &[t], LEN), Some(t + 0x1000 + PAGE));
        let full = Layout { regions: vec![region(t - (2 << 30), t + (2 << 30))], ..layout };
        assert_eq!(near_spot(&full, &[t], LEN), None);
        // Targets 4 GiB apart: no single spot reaches both.
        let empty = Layout { regions: vec![region(0x1000_0000, 0x1000_1000)], ..Layout::default() };
        assert_eq!(near_spot(&empty, &[t, t + (4 << 30)], LEN), None);
        // Mappings unknown: no spot at all.
        assert_eq!(near_spot(&Layout::default(), &[0x40_0000], LEN), None);
    }
}
