//! pymalloc's arenas, pools and blocks, read from outside: every block in use, which is where
//! the objects the cycle collector does not track (str, int, bytes, bytearray, and untracked
//! tuples) live. Pure: reads through a [`Memory`].
//!
//! `arenas` is an array of `maxarenas` `struct arena_object` (48 bytes: `address`,
//! `pool_address`, `nfreepools`, `ntotalpools`, ...); an unused slot has `address == 0`. An
//! arena's pools start at its first `POOL_SIZE` boundary and were carved up to
//! `pool_address`. Each pool starts with a 48-byte `pool_header` (`ref.count` blocks in use,
//! the `freeblock` list, `szidx`, `nextoffset`); its blocks of `(szidx + 1) × 16` bytes follow.
//! A block below `nextoffset` that is not on the pool's free list is in use.
//!
//! Geometry per version (docs/design/cpython-census-layouts.md §2): 3.9 has 256 KiB arenas of
//! 4 KiB pools; 3.10 to 3.13, 1 MiB arenas of 16 KiB pools. A pool whose header does not check
//! out (a size class out of range, a free list leaving the pool, a count that disagrees with
//! its blocks) is skipped and counted, never guessed at.

use crate::runtimes::Memory;

/// `sizeof(struct pool_header)`: the first block's offset in its pool.
pub const POOL_OVERHEAD: u64 = 48;
/// `sizeof(struct arena_object)`.
pub const ARENA_OBJECT: u64 = 48;
/// pymalloc's size classes are 16 bytes apart, up to 512.
pub const ALIGNMENT: u64 = 16;
pub const SIZE_CLASSES: u32 = 32;
/// More arena slots than this is not a table we believe (1 Mi arenas of 1 MiB: 1 TiB).
pub const MAX_ARENAS: u32 = 1 << 20;

/// Where the arena table is and the geometry of one version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arenas {
    /// The `arenas` pointer's value: the array of `arena_object`s.
    pub table: u64,
    pub maxarenas: u32,
    pub arena_size: u64,
    pub pool_size: u64,
}

impl Arenas {
    /// The geometry of 3.`minor`, with the table read from `arenas_ptr` and `maxarenas_at`.
    pub fn read(mem: &dyn Memory, minor: u8, arenas_ptr: u64, maxarenas_at: u64) -> Option<Arenas> {
        let (arena_size, pool_size) = if minor <= 9 { (256 << 10, 4 << 10) } else { (1 << 20, 16 << 10) };
        let table = mem.read_u64(arenas_ptr)?;
        let maxarenas = mem.read_u32(maxarenas_at)?;
        (table != 0 && maxarenas <= MAX_ARENAS).then_some(Arenas { table, maxarenas, arena_size, pool_size })
    }
}

/// Before 3.12, the ELF addresses of pymalloc's file-static `arenas` and `maxarenas`: from the
/// symbol table when the file has one (pyenv's builds), else from the two RIP-relative loads
/// that open `_PyObject_DebugMallocStats`'s loop over the arenas (Debian's stripped build
/// exports only that function: `mov maxarenas(%rip),%r13d; ...; mov arenas(%rip),%r8`).
pub fn static_arenas(image: &[u8]) -> Result<(u64, u64), String> {
    const FUNCTION: &str = "_PyObject_DebugMallocStats";
    let syms = crate::target::elf::symbols_in(image, |n| matches!(n, "arenas" | "maxarenas" | FUNCTION))
        .map_err(|e| e.to_string())?;
    if let (Some(a), Some(m)) = (syms.get("arenas"), syms.get("maxarenas")) {
        return Ok((a.address, m.address));
    }
    let f = syms.get(FUNCTION).ok_or(format!("no {FUNCTION} and no arenas symbol"))?;
    let code = code_at(image, f.address, f.size.clamp(64, 4096))
        .ok_or(format!("{FUNCTION}'s code is not in the file"))?;
    arena_loads(code, f.address).ok_or(format!("{FUNCTION} does not load maxarenas then arenas"))
}

/// The bytes of the file's code at `vaddr`.
fn code_at(image: &[u8], vaddr: u64, len: u64) -> Option<&[u8]> {
    use object::{Object as _, ObjectSection as _};
    let file = object::File::parse(image).ok()?;
    let sec = file.sections().find(|s| s.address() <= vaddr && vaddr < s.address() + s.size())?;
    let data = sec.data().ok()?;
    let off = (vaddr - sec.address()) as usize;
    data.get(off..(off + len as usize).min(data.len()))
}

/// The first 32-bit RIP-relative load (`maxarenas`) and, within the next few instructions, a
/// 64-bit one just after it in memory (`arenas`): `(arenas, maxarenas)`.
pub fn arena_loads(code: &[u8], ip: u64) -> Option<(u64, u64)> {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
    let mut d = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut maxarenas: Option<(u64, usize)> = None;
    for (n, i) in d.iter().enumerate().take(400) {
        if i.mnemonic() != Mnemonic::Mov || i.op_count() != 2 || i.op1_kind() != OpKind::Memory {
            continue;
        }
        if i.memory_base() != Register::RIP || i.op0_kind() != OpKind::Register {
            continue;
        }
        let at = i.ip_rel_memory_address();
        let bits = i.op0_register().size() * 8;
        match maxarenas {
            None if bits == 32 => maxarenas = Some((at, n)),
            Some((m, first)) if bits == 64 && at > m && at <= m + 32 && n <= first + 8 => {
                return Some((at, m));
            }
            _ => {}
        }
    }
    None
}

/// What the walk found besides the blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Walk {
    pub arenas: u64,
    pub pools: u64,
    pub blocks: u64,
    /// Pools whose header or free list did not check out, and arena slots whose address is
    /// no user-space page: their blocks are not reported.
    pub bad_pools: u64,
    /// The memory whose every block in use was reported (whole arenas, or the good pools of
    /// an arena with a bad one), in address order: it holds nothing else.
    pub known: Vec<(u64, u64)>,
    /// The table's unused slots (`address == 0`), in address order. The table grows by
    /// realloc and only a new slot's `address` and `nextarena` are set: its other words are
    /// whatever the memory held before (a freed list's items, say). No references.
    pub unused_slots: Vec<(u64, u64)>,
    /// The table itself: `(start, end)` (its allocation may be larger: the rest is stale).
    pub table: (u64, u64),
}

/// Calls `each(block, size, bytes)` for every block in use, with the block's bytes (at most
/// `want` of them, from its start) read from one read of its pool.
pub fn walk(mem: &dyn Memory, a: &Arenas, want: usize, each: &mut dyn FnMut(u64, u64, &[u8])) -> Walk {
    let mut out = Walk::default();
    let Some(table) = mem.read_vec(a.table, (a.maxarenas as u64 * ARENA_OBJECT) as usize) else {
        return out;
    };
    out.table = (a.table, a.table + a.maxarenas as u64 * ARENA_OBJECT);
    for (i, slot) in table.chunks_exact(ARENA_OBJECT as usize).enumerate() {
        let word = |off: usize| u64::from_le_bytes(slot[off..off + 8].try_into().unwrap_or_default());
        let (address, carved) = (word(0), word(8));
        if address == 0 {
            let at = a.table + i as u64 * ARENA_OBJECT;
            match out.unused_slots.last_mut() {
                Some(last) if last.1 == at => last.1 = at + ARENA_OBJECT,
                _ => out.unused_slots.push((at, at + ARENA_OBJECT)),
            }
            continue;
        }
        // An arena is an mmap of user space: anything else is no arena (counted as a pool
        // that did not check out).
        if address % 4096 != 0 || address >= 1 << 47 {
            out.bad_pools += 1;
            continue;
        }
        out.arenas += 1;
        let first = address.div_ceil(a.pool_size) * a.pool_size;
        let end = carved.min(address + a.arena_size);
        let mut pool = first;
        let mut good = Vec::new();
        while pool + a.pool_size <= end {
            out.pools += 1;
            let page = mem.read_vec(pool, a.pool_size as usize);
            match page.as_deref().and_then(|p| Some((p, pool_blocks(pool, p, a.pool_size)?))) {
                Some((page, blocks)) => {
                    for (b, size) in blocks {
                        out.blocks += 1;
                        let off = (b - pool) as usize;
                        each(b, size, &page[off..off + (size as usize).min(want)]);
                    }
                    good.push((pool, pool + a.pool_size));
                }
                None => out.bad_pools += 1,
            }
            pool += a.pool_size;
        }
        // Beyond the pools carved so far, and before the first, nothing is in use.
        if good.len() as u64 == (end.saturating_sub(first)) / a.pool_size {
            out.known.push((address, address + a.arena_size));
        } else {
            out.known.extend(good);
        }
    }
    out.known.sort_unstable();
    out
}

/// The blocks in use in one pool (its bytes `page`), with their size; `None` if its header
/// or free list does not check out. An empty pool (count 0) has none.
pub fn pool_blocks(pool: u64, page: &[u8], pool_size: u64) -> Option<Vec<(u64, u64)>> {
    let u32_at = |off: usize| u32::from_le_bytes(page[off..off + 4].try_into().unwrap_or_default());
    let u64_at = |off: usize| u64::from_le_bytes(page[off..off + 8].try_into().unwrap_or_default());
    let (count, freeblock, szidx, nextoffset) = (u32_at(0), u64_at(8), u32_at(36), u64::from(u32_at(40)));
    if count == 0 {
        return Some(Vec::new());
    }
    if szidx >= SIZE_CLASSES || nextoffset > pool_size || nextoffset < POOL_OVERHEAD {
        return None;
    }
    let size = (u64::from(szidx) + 1) * ALIGNMENT;
    let slots = ((nextoffset - POOL_OVERHEAD) / size) as usize;
    let mut free = vec![false; slots];
    let mut at = freeblock;
    let mut steps = 0;
    while at != 0 {
        let off = at.checked_sub(pool + POOL_OVERHEAD)?;
        if off % size != 0 || (off / size) as usize >= slots || steps > slots {
            return None;
        }
        free[(off / size) as usize] = true;
        at = u64_at((at - pool) as usize);
        steps += 1;
    }
    let used: Vec<(u64, u64)> = free
        .iter()
        .enumerate()
        .filter(|(_, f)| !**f)
        .map(|(i, _)| (pool + POOL_OVERHEAD + i as u64 * size, size))
        .collect();
    (used.len() == count as usize).then_some(used)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: u64 = 16 << 10;

    /// A pool at `at` of blocks of `size`: `carved` blocks carved, `free` of them (by index)
    /// on the free list, newest first.
    fn pool(at: u64, size: u64, carved: u64, free: &[u64]) -> Vec<u8> {
        let mut p = vec![0u8; POOL as usize];
        let count = (carved - free.len() as u64) as u32;
        p[0..4].copy_from_slice(&count.to_le_bytes());
        let block = |i: u64| at + POOL_OVERHEAD + i * size;
        let mut head = 0u64;
        for &i in free.iter().rev() {
            let off = (block(i) - at) as usize;
            p[off..off + 8].copy_from_slice(&head.to_le_bytes());
            head = block(i);
        }
        p[8..16].copy_from_slice(&head.to_le_bytes());
        p[36..40].copy_from_slice(&((size / ALIGNMENT - 1) as u32).to_le_bytes());
        p[40..44].copy_from_slice(&((POOL_OVERHEAD + carved * size) as u32).to_le_bytes());
        p
    }

    #[test]
    fn blocks_in_use_are_the_carved_ones_off_the_free_list() {
        let at = 0x7f00_0000_4000;
        let p = pool(at, 64, 5, &[1, 3]);
        let used = pool_blocks(at, &p, POOL).unwrap();
        let offsets: Vec<u64> = used.iter().map(|(b, _)| (b - at - POOL_OVERHEAD) / 64).collect();
        assert_eq!(offsets, [0, 2, 4]);
        assert!(used.iter().all(|&(_, s)| s == 64));
        // An empty pool has none.
        assert_eq!(pool_blocks(at, &pool(at, 64, 3, &[0, 1, 2]), POOL).map(|v| v.len()), Some(0));
    }

    #[test]
    fn a_pool_that_does_not_check_out_gives_no_blocks() {
        let at = 0x7f00_0000_4000;
        // The count disagrees with the blocks.
        let mut p = pool(at, 64, 5, &[1]);
        p[0..4].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(pool_blocks(at, &p, POOL), None);
        // A free list that leaves the pool.
        let mut p = pool(at, 64, 5, &[1]);
        p[8..16].copy_from_slice(&0x1234u64.to_le_bytes());
        assert_eq!(pool_blocks(at, &p, POOL), None);
        // A free list that loops.
        let mut p = pool(at, 32, 4, &[0, 2]);
        let first = (POOL_OVERHEAD) as usize;
        p[first..first + 8].copy_from_slice(&(at + POOL_OVERHEAD).to_le_bytes());
        assert_eq!(pool_blocks(at, &p, POOL), None);
        // A size class out of range.
        let mut p = pool(at, 64, 5, &[]);
        p[36..40].copy_from_slice(&40u32.to_le_bytes());
        assert_eq!(pool_blocks(at, &p, POOL), None);
    }

    #[test]
    fn debian_311_arenas_from_its_malloc_stats_code() {
        // /usr/bin/python3.11 (3.11.2-6+deb12u6) from 0x470c6e: the fprintf of the header, then
        // `mov 0x653986(%rip),%r13d` (maxarenas, 0xac4618) and `mov 0x65398c(%rip),%r8`
        // (arenas, 0xac4628).
        let hex =
            "e85de7faff31c0b94000000031f6488d9424b0000000488934244531c9448b2d863965004889d74c8b058c396500";
        let code: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        assert_eq!(arena_loads(&code, 0x470c6e), Some((0xac4628, 0xac4618)));
        // Without the 64-bit load after it: nothing.
        assert_eq!(arena_loads(&code[..code.len() - 7], 0x470c6e), None);
    }

    struct Mem(Vec<(u64, Vec<u8>)>);

    impl Memory for Mem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            self.0.iter().any(|(at, bytes)| {
                let off = addr.wrapping_sub(*at) as usize;
                addr >= *at && off + buf.len() <= bytes.len() && {
                    buf.copy_from_slice(&bytes[off..off + buf.len()]);
                    true
                }
            })
        }
    }

    #[test]
    fn the_walk_visits_every_carved_pool_of_every_arena_in_use() {
        // An arena not aligned to a pool: its first pool is at the next boundary.
        let arena: u64 = 0x7f00_0010_1000;
        let first = 0x7f00_0010_4000;
        let second = first + POOL;
        let mut image = vec![0u8; (3 * POOL) as usize];
        let base = first;
        image[..POOL as usize].copy_from_slice(&pool(first, 32, 3, &[1]));
        image[POOL as usize..2 * POOL as usize].copy_from_slice(&pool(second, 512, 2, &[]));
        let mut table = vec![0u8; 3 * ARENA_OBJECT as usize];
        // Slot 0 unused; slot 1 the arena, carved up to the end of the second pool.
        table[48..56].copy_from_slice(&arena.to_le_bytes());
        table[56..64].copy_from_slice(&(second + POOL).to_le_bytes());
        let mem = Mem(vec![(0x1000, table), (base, image)]);
        let a = Arenas { table: 0x1000, maxarenas: 3, arena_size: 1 << 20, pool_size: POOL };
        let mut seen = Vec::new();
        let w = walk(&mem, &a, 16, &mut |b, size, bytes| seen.push((b, size, bytes.len())));
        // Every carved pool checked out: the whole arena is known.
        assert_eq!(
            w,
            Walk {
                arenas: 1,
                pools: 2,
                blocks: 4,
                bad_pools: 0,
                known: vec![(arena, arena + (1 << 20))],
                // Slots 0 and 2 are unused: their words are no references.
                unused_slots: vec![(0x1000, 0x1000 + ARENA_OBJECT), (0x1000 + 96, 0x1000 + 144)],
                table: (0x1000, 0x1000 + 144),
            }
        );
        assert_eq!(
            seen,
            [
                (first + 48, 32, 16),
                (first + 48 + 64, 32, 16),
                (second + 48, 512, 16),
                (second + 48 + 512, 512, 16)
            ]
        );
    }

    #[test]
    fn an_arena_with_a_bad_pool_is_known_only_in_its_good_pools() {
        let arena: u64 = 0x7f00_0010_0000;
        let (first, second) = (arena, arena + POOL);
        let mut image = vec![0u8; (2 * POOL) as usize];
        image[..POOL as usize].copy_from_slice(&pool(first, 32, 3, &[]));
        // The second pool's header claims a size class that does not exist.
        image[POOL as usize + 36] = 200;
        image[POOL as usize] = 1;
        let mut table = vec![0u8; ARENA_OBJECT as usize];
        table[0..8].copy_from_slice(&arena.to_le_bytes());
        table[8..16].copy_from_slice(&(second + POOL).to_le_bytes());
        let mem = Mem(vec![(0x1000, table), (arena, image)]);
        let a = Arenas { table: 0x1000, maxarenas: 1, arena_size: 1 << 20, pool_size: POOL };
        let w = walk(&mem, &a, 16, &mut |_, _, _| {});
        assert_eq!((w.pools, w.bad_pools, w.blocks), (2, 1, 3));
        assert_eq!(w.known, vec![(first, first + POOL)]);
    }
}
