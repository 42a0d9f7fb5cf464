//! The interpreter's free lists of dicts, dicts' keys tables and lists: arrays of 80 slots
//! and a count. A slot past the count is stale: it held an object that was handed out again
//! and is live now, and the marking must not take it for a reference (a `Node` pair whose
//! dict was once on the list would look reachable from the interpreter's data). The stale
//! slots are given to the marking as words that read as zero.
//!
//! Where they are, per version (`gdb -batch -ex 'print/d (long)&((PyInterpreterState*)0)->
//! dict_state.numfree'` and the like on the pyenv builds' `libpython3.X.so.1.0`): in the
//! interpreter state from 3.10 on; file-static in `dictobject.c` and `listobject.c` in 3.9,
//! found in the symbol table. Pure: reads through [`Memory`].

use crate::runtimes::Memory;

/// `PyDict_MAXFREELIST`, `PyList_MAXFREELIST`: the same in 3.9–3.13.
pub const SLOTS: u64 = 80;

/// One array free list: where its slots start and where its `int` count is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeList {
    pub items: u64,
    pub count: u64,
}

/// The free lists whose stale words the marking must not follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeLists {
    /// The dict, keys-table and list arrays.
    pub arrays: [FreeList; 3],
    /// 3.9/3.10: the frame objects' free list, a chain through `f_back`: `items` is where its
    /// head pointer is. Frames on it keep their value stacks' last words.
    pub frames: Option<FreeList>,
}

impl FreeLists {
    /// Every address moved by `by` (offsets to an interpreter state, ELF addresses to runtime
    /// ones).
    pub fn moved(self, by: u64) -> FreeLists {
        let m = |f: FreeList| FreeList { items: f.items.wrapping_add(by), count: f.count.wrapping_add(by) };
        FreeLists { arrays: self.arrays.map(m), frames: self.frames.map(m) }
    }
}

/// `PyCodeObject.co_zombieframe` (3.9 only): the frame object a code keeps for its next call,
/// with the value stack its last call left.
pub const CO_ZOMBIEFRAME_39: u64 = 128;
/// Frames followed at most on the frame free list (`PyFrame_MAXFREELIST` is 200).
const MAX_FREE_FRAMES: u64 = 256;

/// The free lists as offsets from the interpreter state; `None` for 3.9 (file-static:
/// [`static_lists`]) and unknown versions.
pub fn in_interpreter(minor: u8) -> Option<FreeLists> {
    let l = |items, count| FreeList { items, count };
    Some(match minor {
        10 => FreeLists {
            arrays: [l(10688, 11328), l(11336, 11976), l(10040, 10680)],
            frames: Some(l(11984, 11992)),
        },
        11 => FreeLists { arrays: [l(4520, 5160), l(5168, 5808), l(3872, 4512)], frames: None },
        12 => FreeLists { arrays: [l(270736, 272016), l(271376, 272020), l(270072, 270712)], frames: None },
        13 => FreeLists { arrays: [l(11856, 12496), l(12504, 13144), l(11208, 11848)], frames: None },
        _ => return None,
    })
}

/// 3.9: the file-static free lists, from the module's symbol table (ELF addresses).
pub fn static_lists(image: &[u8]) -> Result<FreeLists, String> {
    use crate::target::elf::file_locals;
    let dict = file_locals(image, "dictobject.c", |n| {
        matches!(n, "free_list" | "numfree" | "keys_free_list" | "numfreekeys")
    })
    .map_err(|e| e.to_string())?;
    let list = file_locals(image, "listobject.c", |n| matches!(n, "free_list" | "numfree"))
        .map_err(|e| e.to_string())?;
    let frame = file_locals(image, "frameobject.c", |n| matches!(n, "free_list" | "numfree"))
        .map_err(|e| e.to_string())?;
    type Syms = std::collections::HashMap<String, crate::target::elf::SymbolAddr>;
    let at = |m: &Syms, name: &str, file: &str| {
        m.get(name).map(|s| s.address).ok_or(format!("no {name} in {file}'s symbols"))
    };
    let list_of = |m: &Syms, items: &str, count: &str, file: &str| -> Result<FreeList, String> {
        Ok(FreeList { items: at(m, items, file)?, count: at(m, count, file)? })
    };
    Ok(FreeLists {
        arrays: [
            list_of(&dict, "free_list", "numfree", "dictobject.c")?,
            list_of(&dict, "keys_free_list", "numfreekeys", "dictobject.c")?,
            list_of(&list, "free_list", "numfree", "listobject.c")?,
        ],
        frames: list_of(&frame, "free_list", "numfree", "frameobject.c").ok(),
    })
}

/// The frames on the frame free list (`f_back` at `back` links them), at most its count.
pub fn free_frames(mem: &dyn Memory, list: FreeList, back: u64) -> Vec<u64> {
    let Some(n) = mem.read_i32(list.count).and_then(|n| u64::try_from(n).ok()) else { return Vec::new() };
    let mut out = Vec::new();
    let mut f = mem.read_u64(list.items).unwrap_or(0);
    while f != 0 && (out.len() as u64) < n.min(MAX_FREE_FRAMES) && !out.contains(&f) {
        out.push(f);
        f = mem.read_u64(f.wrapping_add(back)).unwrap_or(0);
    }
    out
}

/// The stale slots of `lists` (absolute addresses): `[items + 8 * count, items + 8 * SLOTS)`
/// each, sorted. A count that does not read, or reads out of range, leaves its list alone.
pub fn stale_slots(mem: &dyn Memory, lists: &[FreeList]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = lists
        .iter()
        .filter_map(|f| {
            let n = u64::try_from(mem.read_i32(f.count)?).ok().filter(|&n| n <= SLOTS)?;
            (n < SLOTS).then(|| (f.items + 8 * n, f.items + 8 * SLOTS))
        })
        .collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtimes::cpython::code::tests::FakeMem;

    /// The frame free list is followed through `f_back` for its count, no further.
    #[test]
    fn free_frames_follow_the_chain_for_its_count() {
        let mem = FakeMem::default();
        let list = FreeList { items: 0x1000, count: 0x1008 };
        mem.put_u64(0x1000, 0x2000);
        mem.put(0x1008, &2i32.to_le_bytes());
        for (f, back) in [(0x2000u64, 0x3000u64), (0x3000, 0x4000), (0x4000, 0)] {
            mem.put(f, &[0; 64]);
            mem.put_u64(f + 24, back);
        }
        assert_eq!(free_frames(&mem, list, 24), vec![0x2000, 0x3000]);
        mem.put(0x1008, &(-1i32).to_le_bytes());
        assert!(free_frames(&mem, list, 24).is_empty());
    }

    #[test]
    fn slots_past_each_count_are_stale() {
        let mem = FakeMem::default();
        let interp = 0x10_0000;
        let lists = in_interpreter(11).unwrap().moved(interp).arrays;
        mem.put(interp, &vec![0u8; 6000]);
        mem.put(lists[0].count, &3i32.to_le_bytes());
        mem.put(lists[1].count, &80i32.to_le_bytes());
        mem.put(lists[2].count, &(-1i32).to_le_bytes());
        assert_eq!(stale_slots(&mem, &lists), vec![(lists[0].items + 24, lists[0].items + 640)]);
        // Every version's lists are 80 slots apart from their count, or past it.
        for minor in 10..=13 {
            for f in in_interpreter(minor).unwrap().arrays {
                assert!(f.count >= f.items + 8 * SLOTS, "3.{minor}: {f:?}");
            }
        }
        assert_eq!(in_interpreter(9), None);
    }

    /// 3.9's static lists, told apart by their source file: three different arrays, each
    /// with its count outside its slots (the machine image's pyenv 3.9).
    #[test]
    fn pyenv_3_9_static_free_lists_are_found_per_file() {
        let home = std::env::var("HOME").unwrap_or_default();
        let Some(lib) = std::fs::read_dir(format!("{home}/.pyenv/versions"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("lib/libpython3.9.so.1.0"))
            .find(|p| p.exists())
        else {
            eprintln!("no pyenv 3.9 here: nothing to check");
            return;
        };
        let image = std::fs::read(&lib).unwrap();
        let all = static_lists(&image).unwrap();
        assert!(all.frames.is_some(), "frameobject.c's free list");
        let lists = all.arrays;
        for (i, f) in lists.iter().enumerate() {
            assert!(f.items % 8 == 0 && f.count % 4 == 0, "{f:?}");
            assert!(f.count < f.items || f.count >= f.items + 8 * SLOTS, "{f:?}");
            assert!(lists[i + 1..].iter().all(|g| g.items.abs_diff(f.items) >= 8 * SLOTS), "{lists:?}");
        }
    }
}
