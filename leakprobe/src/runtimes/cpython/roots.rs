//! What a Python program holds, in its own names: its classes' attributes (`class
//! app.Registry, attribute items`), every module's globals (`module app, global cache`), the
//! variables of every thread's frames (`local rows in handle (app.py:30), thread 812`) and
//! the collector's `gc.garbage`, marked in that order. The reachability scan marks from these
//! before any other root, so that a block a module global reaches is held by that global,
//! not by the interpreter's data that reaches every module, and what only a running
//! function holds is named by its variable, not by the data stack's memory.
//!
//! Pure: reads the target's memory through [`Memory`]. Only the names of namespaces'
//! entries are kept (identifiers), never a value's contents.

use leakprobe_common::py_frame;

use super::{
    objects::{self, Frames, HEAPTYPE, ObjectLayout, ObjectsError, TP_DICT, TP_FLAGS, Target, TypeNames},
    walk,
};
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
/// `Py_TPFLAGS_TYPE_SUBCLASS`: the object is a type.
const TYPE_SUBCLASS: u64 = 1 << 31;
/// Attributes read per class, and variables per frame.
const MAX_ATTRIBUTES: u64 = 1 << 16;
const MAX_LOCALS: i32 = 1 << 16;
/// `PyTupleObject.ob_item`.
const TUPLE_ITEMS: u64 = 24;

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

/// Classes' attributes, every module's globals (in `sys.modules` order), the threads' frames'
/// variables and `gc.garbage`'s items. `threads` are the process's (thread pointer, kernel
/// id): before 3.11 a thread state knows its thread by its `pthread_self()` only.
pub fn named_roots(mem: &dyn Memory, t: &Target, threads: &[(u64, i32)]) -> Result<Roots, ObjectsError> {
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
    let mut globals_of = Vec::new();
    for (key, module) in entries.unwrap_or_default() {
        out.modules += 1;
        let name = printable_name(string(key));
        let globals = mem
            .read_u64(module.wrapping_add(MD_DICT))
            .filter(|&d| d != 0)
            .and_then(|d| objects::dict_entries(mem, l, d, MAX_GLOBALS));
        match globals {
            Some(g) => globals_of.push((name, g)),
            None => out.unreadable_modules += 1,
        }
    }
    for (module, globals) in &globals_of {
        for &(k, v) in globals {
            let Some(attributes) = class_attributes(mem, l, v, module, &string) else { continue };
            let class = printable_name(string(k));
            for (a, value) in attributes {
                push(
                    &mut out,
                    format!("class {module}.{class}, attribute {}", printable_name(string(a))),
                    value,
                );
            }
        }
    }
    for (module, globals) in &globals_of {
        for &(k, v) in globals {
            push(&mut out, format!("module {module}, global {}", printable_name(string(k))), v);
        }
    }
    if let Some(f) = &t.frames {
        for (name, value) in frame_locals(mem, f, threads, &string) {
            push(&mut out, name, value);
        }
    }
    if let Some(items) = garbage(mem, l, interp) {
        for v in items {
            push(&mut out, "gc.garbage".to_string(), v);
        }
    }
    Ok(out)
}

/// A class defined in `module` (its `__module__` says so: an imported class is named where
/// it is defined): its own attributes, `__module__` and `__doc__` and the like included.
fn class_attributes(
    mem: &dyn Memory,
    l: &ObjectLayout,
    obj: u64,
    module: &str,
    string: &dyn Fn(u64) -> Option<String>,
) -> Option<Vec<(u64, u64)>> {
    let tp = mem.read_u64(obj.wrapping_add(8)).filter(|&tp| tp != 0)?;
    let meta_flags = mem.read_u64(tp.wrapping_add(TP_FLAGS))?;
    let flags = mem.read_u64(obj.wrapping_add(TP_FLAGS))?;
    if meta_flags & TYPE_SUBCLASS == 0 || flags & HEAPTYPE == 0 {
        return None;
    }
    let dict = mem.read_u64(obj.wrapping_add(TP_DICT)).filter(|&d| d != 0)?;
    let entries = objects::dict_entries(mem, l, dict, MAX_ATTRIBUTES)?;
    let defined_here = entries
        .iter()
        .any(|&(k, v)| string(k).as_deref() == Some("__module__") && string(v).as_deref() == Some(module));
    defined_here.then_some(entries)
}

/// Every thread's frames' variables: `local NAME in FUNCTION (FILE:LINE), thread TID`, the
/// innermost frame first. A variable not set yet (NULL) is left out.
fn frame_locals(
    mem: &dyn Memory,
    f: &Frames,
    threads: &[(u64, i32)],
    string: &dyn Fn(u64) -> Option<String>,
) -> Vec<(String, u64)> {
    let mut resolver = super::code::CodeResolver::new(f.layout.code, f.types);
    let mut out = Vec::new();
    for tstate in walk::thread_states(mem, &f.config) {
        let tid = match f.layout.tstate_native_thread_id {
            Some(o) => mem.read_u64(tstate.wrapping_add(o)),
            None => mem.read_u64(tstate.wrapping_add(f.layout.tstate_thread_id)).and_then(|me| {
                threads.iter().find(|(fs, _)| *fs == me && me != 0).map(|(_, tid)| *tid as u64)
            }),
        };
        let thread = tid.map_or_else(String::new, |tid| format!(", thread {tid}"));
        for (frame, word) in walk::frames_of(mem, &f.config, tstate).0 {
            let code = py_frame::code(word);
            let at = resolver.resolve(mem, code, py_frame::pos(word)).map_or_else(
                || "a Python function".to_string(),
                |p| {
                    let file = p.file.rsplit('/').next().unwrap_or(&p.file).to_string();
                    super::code::PyFrame { file, ..p }.to_string()
                },
            );
            for (name, value) in variables(mem, f, frame, code) {
                out.push((format!("local {} in {at}{thread}", printable_name(string(name))), value));
            }
        }
    }
    out
}

/// A frame's set variables: (the name's str, the value).
fn variables(mem: &dyn Memory, f: &Frames, frame: u64, code: u64) -> Vec<(u64, u64)> {
    let c = &f.layout.code;
    let Some(n) = mem.read_i32(code.wrapping_add(c.nlocals)).filter(|n| (0..=MAX_LOCALS).contains(n)) else {
        return Vec::new();
    };
    let n = n as u64;
    let names = mem.read_u64(code.wrapping_add(c.localnames)).unwrap_or(0);
    // The names' tuple must have them all.
    if names == 0 || mem.read_u64(names.wrapping_add(OB_SIZE)).is_none_or(|len| len < n) {
        return Vec::new();
    }
    let words = |addr: u64| {
        mem.read_vec(addr, (n * 8) as usize)
            .map(|raw| {
                raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect()
            })
            .unwrap_or_default()
    };
    let keys: Vec<u64> = words(names.wrapping_add(TUPLE_ITEMS));
    let values: Vec<u64> = words(frame.wrapping_add(f.layout.frame_localsplus));
    keys.into_iter().zip(values).filter(|&(_, v)| v != 0).collect()
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
