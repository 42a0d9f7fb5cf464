//! What a Python program holds, in its own names: every module's globals (`module app,
//! global cache`) and the collector's `gc.garbage`. The reachability scan marks from these
//! before any other root, so that a block a module global reaches is held by that global,
//! not by the interpreter's data that reaches every module.
//!
//! Pure: reads the target's memory through [`Memory`]. Only the names of namespaces'
//! entries are kept (identifiers), never a value's contents.

use super::objects::{self, ObjectLayout, ObjectsError, Target, TypeNames};
use crate::runtimes::Memory;

/// `PyModuleObject.md_dict`, the same in 3.9–3.13.
const MD_DICT: u64 = 16;
/// Modules read at most from `sys.modules`, and globals per module.
const MAX_MODULES: u64 = 1 << 16;
const MAX_GLOBALS: u64 = 1 << 20;
/// Named roots kept at most: beyond them the rest of the program's globals are still
/// reached, through the interpreter's data.
pub const MAX_ROOTS: usize = 1 << 21;
/// `PyListObject.ob_item`; `ob_size` is at 16 in every var-sized object.
const LIST_ITEMS: u64 = 24;
const OB_SIZE: u64 = 16;
/// `PySetObject.used`.
const SET_USED: u64 = 24;
/// `PyDictObject.ma_used`.
const DICT_USED: u64 = 16;

/// One named root: a pointer the program holds under a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedRoot {
    /// `module app, global cache`, `gc.garbage`.
    pub name: String,
    pub value: u64,
}

/// The program's named roots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Roots {
    pub roots: Vec<NamedRoot>,
    pub modules: u64,
    /// Modules whose globals could not be read (no dict, or a dict that does not check out).
    pub unreadable_modules: u64,
    /// Roots left out past [`MAX_ROOTS`].
    pub dropped: u64,
}

/// Where `sys.modules` is, per version (docs/design/cpython-census-layouts.md §4.1).
fn modules_offset(minor: u8) -> Option<u64> {
    match minor {
        9 | 10 => Some(856),
        11 => Some(888),
        12 => Some(944),
        13 => Some(7656),
        _ => None,
    }
}

pub use crate::runtimes::printable_name;

/// Every module's globals and `gc.garbage`'s items, in `sys.modules` order.
pub fn named_roots(mem: &dyn Memory, t: &Target) -> Result<Roots, ObjectsError> {
    let l = &t.layout;
    let interp = objects::main_interpreter(mem, l, t.py_runtime)?;
    let mut out = Roots::default();
    let push = |out: &mut Roots, name: String, value: u64| {
        if out.roots.len() < MAX_ROOTS {
            out.roots.push(NamedRoot { name, value });
        } else {
            out.dropped += 1;
        }
    };
    let string = |addr: u64| super::code::read_str(mem, addr, &l.str_layout, t.unicode_type);
    let modules = modules_offset(l.minor).and_then(|off| mem.read_u64(interp.wrapping_add(off)));
    let entries = modules.and_then(|m| objects::dict_entries(mem, l, m, MAX_MODULES));
    for (key, module) in entries.unwrap_or_default() {
        out.modules += 1;
        let name = printable_name(string(key));
        let globals = mem
            .read_u64(module.wrapping_add(MD_DICT))
            .filter(|&d| d != 0)
            .and_then(|d| objects::dict_entries(mem, l, d, MAX_GLOBALS));
        let Some(globals) = globals else {
            out.unreadable_modules += 1;
            continue;
        };
        for (k, v) in globals {
            push(&mut out, format!("module {name}, global {}", printable_name(string(k))), v);
        }
    }
    if let Some(items) = garbage(mem, l, interp) {
        for v in items {
            push(&mut out, "gc.garbage".to_string(), v);
        }
    }
    Ok(out)
}

/// The items of `gc.garbage` (a list).
fn garbage(mem: &dyn Memory, l: &ObjectLayout, interp: u64) -> Option<Vec<u64>> {
    let list = mem.read_u64(interp.wrapping_add(l.interp_gc + objects::GC_GARBAGE)).filter(|&x| x != 0)?;
    let n = mem.read_u64(list.wrapping_add(OB_SIZE)).filter(|&n| n <= 1 << 24)?;
    let items = mem.read_u64(list.wrapping_add(LIST_ITEMS)).filter(|&x| x != 0 || n == 0)?;
    let raw = mem.read_vec(items, usize::try_from(n * 8).ok()?)?;
    Some(raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect())
}

/// What an object is, in a few words: `dict, 414 entries`, `list, 100 items`, `Node`.
/// Only its type and size are read.
pub fn describe(mem: &dyn Memory, names: &mut TypeNames, obj: u64) -> Option<String> {
    let tp = mem.read_u64(obj.wrapping_add(8)).filter(|&tp| tp != 0)?;
    let name = names.name(mem, tp);
    let count = |off: u64| mem.read_u64(obj.wrapping_add(off)).filter(|&n| n < 1 << 40);
    let q = name.qualname.as_str();
    let size = match (name.module.as_str(), q) {
        ("builtins", "dict") => count(DICT_USED).map(|n| format!("{n} {}", plural(n, "entry", "entries"))),
        ("builtins", "list" | "tuple") => {
            count(OB_SIZE).map(|n| format!("{n} {}", plural(n, "item", "items")))
        }
        ("builtins", "set" | "frozenset") => {
            count(SET_USED).map(|n| format!("{n} {}", plural(n, "item", "items")))
        }
        _ => None,
    };
    Some(match size {
        Some(s) => format!("{name}, {s}"),
        None => name.to_string(),
    })
}

fn plural<'a>(n: u64, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_identifier_like_keys_are_printed() {
        assert_eq!(printable_name(Some("cache".into())), "cache");
        assert_eq!(printable_name(Some("os.path".into())), "os.path");
        assert_eq!(printable_name(Some("password=hunter2".into())), "<key>");
        assert_eq!(printable_name(Some("a b".into())), "<key>");
        assert_eq!(printable_name(Some(String::new())), "<key>");
        assert_eq!(printable_name(None), "<key>");
    }
}
