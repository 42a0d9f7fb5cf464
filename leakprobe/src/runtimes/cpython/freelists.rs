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

/// The dict, keys-table and list free lists, as offsets from the interpreter state; `None`
/// for 3.9 (file-static: [`static_lists`]) and unknown versions.
pub fn in_interpreter(minor: u8) -> Option<[FreeList; 3]> {
    let l = |items, count| FreeList { items, count };
    Some(match minor {
        10 => [l(10688, 11328), l(11336, 11976), l(10040, 10680)],
        11 => [l(4520, 5160), l(5168, 5808), l(3872, 4512)],
        12 => [l(270736, 272016), l(271376, 272020), l(270072, 270712)],
        13 => [l(11856, 12496), l(12504, 13144), l(11208, 11848)],
        _ => return None,
    })
}

/// 3.9: the file-static free lists, from the module's symbol table (ELF addresses).
pub fn static_lists(image: &[u8]) -> Result<[FreeList; 3], String> {
    use crate::target::elf::file_locals;
    let dict = file_locals(image, "dictobject.c", |n| {
        matches!(n, "free_list" | "numfree" | "keys_free_list" | "numfreekeys")
    })
    .map_err(|e| e.to_string())?;
    let list = file_locals(image, "listobject.c", |n| matches!(n, "free_list" | "numfree"))
        .map_err(|e| e.to_string())?;
    let at =
        |m: &std::collections::HashMap<String, crate::target::elf::SymbolAddr>, name: &str, file: &str| {
            m.get(name).map(|s| s.address).ok_or(format!("no {name} in {file}'s symbols"))
        };
    Ok([
        FreeList {
            items: at(&dict, "free_list", "dictobject.c")?,
            count: at(&dict, "numfree", "dictobject.c")?,
        },
        FreeList {
            items: at(&dict, "keys_free_list", "dictobject.c")?,
            count: at(&dict, "numfreekeys", "dictobject.c")?,
        },
        FreeList {
            items: at(&list, "free_list", "listobject.c")?,
            count: at(&list, "numfree", "listobject.c")?,
        },
    ])
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

    #[test]
    fn slots_past_each_count_are_stale() {
        let mem = FakeMem::default();
        let interp = 0x10_0000;
        let lists: Vec<FreeList> = in_interpreter(11)
            .unwrap()
            .iter()
            .map(|f| FreeList { items: interp + f.items, count: interp + f.count })
            .collect();
        mem.put(interp, &vec![0u8; 6000]);
        mem.put(lists[0].count, &3i32.to_le_bytes());
        mem.put(lists[1].count, &80i32.to_le_bytes());
        mem.put(lists[2].count, &(-1i32).to_le_bytes());
        assert_eq!(stale_slots(&mem, &lists), vec![(lists[0].items + 24, lists[0].items + 640)]);
        // Every version's lists are 80 slots apart from their count, or past it.
        for minor in 10..=13 {
            for f in in_interpreter(minor).unwrap() {
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
        let lists = static_lists(&image).unwrap();
        for (i, f) in lists.iter().enumerate() {
            assert!(f.items % 8 == 0 && f.count % 4 == 0, "{f:?}");
            assert!(f.count < f.items || f.count >= f.items + 8 * SLOTS, "{f:?}");
            assert!(lists[i + 1..].iter().all(|g| g.items.abs_diff(f.items) >= 8 * SLOTS), "{lists:?}");
        }
    }
}
