//! Live Python objects by type, read from outside the interpreter: the census of the
//! collector's object lists. Pure: reads a (snapshot of the) target through a [`Memory`].
//!
//! The main interpreter (`_PyRuntime.interpreters.main`) holds the cycle collector's state:
//! three generations and the permanent one, each a circular list of `PyGC_Head`s
//! (`_gc_next`, `_gc_prev`) with the object 16 bytes after its head. Every tracked container
//! is on exactly one list. Each object's type is read from `ob_type`, and named as Python
//! names it: a heap type (a class) by `ht_qualname` and the `__module__` in its dict, a
//! static type by `tp_name` (`"module.Name"`, or a builtin's bare name).
//!
//! Offsets: docs/design/cpython-census-layouts.md (§1 the GC lists, §3 types, §4.3 dicts),
//! each verified from DWARF, disassembly and a live self-read on 3.9–3.13.
//!
//! Objects on no list (str, int, bytes, bytearray, and containers the collector untracked)
//! are found by walking pymalloc's arenas ([`super::pymalloc`]): a block in use holds an
//! object at +0 (non-GC), +16 (after its GC head) or +32 (with the 3.11+ pre-header) only if
//! the object is referenced, its type is a ready, named type, and the GC flag and the sizes
//! agree with the offset. Tracked GC objects met there are left to the lists.
//!
//! A list is read only while the collector is not running (`collecting == 0`): during a
//! collection its links carry flags and reference counts. A list whose back links do not
//! check out stops that walk with a [`ObjectsError`], never with made-up objects.
//!
//! Results hold types, counts and sizes, and names of types: never object contents.

use std::collections::HashMap;

use thiserror::Error;

use super::{
    PyVersion,
    layout::{CodeLayout, OB_SIZE, OB_TYPE, TP_BASICSIZE, TP_NAME},
};
use crate::runtimes::Memory;

/// `tp_itemsize`, `tp_flags`, `tp_dict`.
const TP_ITEMSIZE: u64 = 40;
pub(super) const TP_FLAGS: u64 = 168;
pub(super) const TP_DICT: u64 = 264;
/// `Py_TPFLAGS_HEAPTYPE`, `Py_TPFLAGS_HAVE_GC`, `Py_TPFLAGS_MANAGED_DICT` (3.11+),
/// `Py_TPFLAGS_MANAGED_WEAKREF` (3.12+).
pub(super) const HEAPTYPE: u64 = 1 << 9;
const HAVE_GC: u64 = 1 << 14;
const MANAGED_DICT: u64 = 1 << 4;
const MANAGED_WEAKREF: u64 = 1 << 3;
/// 3.13: `Py_TPFLAGS_INLINE_VALUES`, an instance's attribute values right after it.
const INLINE_VALUES: u64 = 1 << 2;
/// `PyGC_Head`'s size: the object follows it.
pub const GC_HEAD: u64 = 16;
/// Objects walked at most, over every list: a bound on a corrupt or enormous heap.
pub const MAX_OBJECTS: u64 = 64 << 20;
/// Dict entries read at most when looking up a class's `__module__`.
const MAX_CLASS_DICT: u64 = 4096;

/// Where the object census reads, per version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectLayout {
    /// `_PyRuntime.interpreters.main`.
    pub runtime_interp_main: u64,
    /// `PyInterpreterState.gc` (`struct _gc_runtime_state`).
    pub interp_gc: u64,
    /// `PyHeapTypeObject.ht_qualname`.
    pub ht_qualname: u64,
    /// Flags whose objects carry a 16-byte pre-header before the GC head (3.11: a managed
    /// dict; 3.12+: a managed dict or weakref list).
    pub preheader_flags: u64,
    /// 3.12+: `int` keeps its digit count in `lv_tag >> 3`, not in `ob_size`.
    pub int_lv_tag: bool,
    /// 3.11+: dict keys in the compact layout (`dk_log2_size`, indices at 32).
    pub dict_311: bool,
    /// For reading `str` objects (type names).
    pub str_layout: CodeLayout,
    /// Where pymalloc's arena table is, from the interpreter (3.12+); before 3.12 it is
    /// file-static and comes from the executable ([`Target::static_arenas`]).
    pub arenas: Option<ArenasAt>,
    pub minor: u8,
}

/// pymalloc's `arenas` pointer and `maxarenas`, from the main interpreter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArenasAt {
    /// 3.12: `interp->obmalloc` is inline; `arenas` and `maxarenas` at these offsets.
    Inline { arenas: u64, maxarenas: u64 },
    /// 3.13: `interp->obmalloc` is a pointer at `state`; the fields at these offsets in it.
    Behind { state: u64, arenas: u64, maxarenas: u64 },
}

/// Offsets in `struct _gc_runtime_state`, the same in 3.9–3.13.
mod gc {
    pub const ENABLED: u64 = 12;
    pub const GENERATIONS: u64 = 24;
    pub const GENERATION_STRIDE: u64 = 24;
    pub const PERMANENT: u64 = 104;
    pub const COLLECTING: u64 = 200;
    pub const GARBAGE: u64 = 208;
}

/// `gc.garbage` in `struct _gc_runtime_state`.
pub const GC_GARBAGE: u64 = gc::GARBAGE;

impl ObjectLayout {
    /// The verified table for 3.`minor`; `None` for any other version.
    pub fn for_version(v: PyVersion) -> Option<ObjectLayout> {
        let code = super::Layout::for_version(v.major, v.minor)?.code;
        let (runtime_interp_main, interp_gc, ht_qualname) = match (v.major, v.minor) {
            (3, 9) => (40, 616, 856),
            (3, 10) => (40, 616, 864),
            (3, 11) => (48, 648, 864),
            (3, 12) => (48, 112, 872),
            (3, 13) => (640, 7400, 872),
            _ => return None,
        };
        let preheader_flags = match v.minor {
            ..=10 => 0,
            11 => MANAGED_DICT,
            _ => MANAGED_DICT | MANAGED_WEAKREF,
        };
        Some(ObjectLayout {
            runtime_interp_main,
            interp_gc,
            ht_qualname,
            preheader_flags,
            int_lv_tag: v.minor >= 12,
            dict_311: v.minor >= 11,
            str_layout: code,
            arenas: match v.minor {
                12 => Some(ArenasAt::Inline { arenas: 4472, maxarenas: 4480 }),
                13 => Some(ArenasAt::Behind { state: 10800, arenas: 512, maxarenas: 520 }),
                _ => None,
            },
            minor: v.minor,
        })
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ObjectsError {
    #[error("the main interpreter could not be read at {addr:#x}")]
    NoInterpreter { addr: u64 },
    #[error("the cycle collector was running at the snapshot: its lists are being rearranged")]
    Collecting,
    #[error("the {list} list broke after {walked} objects at {at:#x}: {why}")]
    BrokenList { list: &'static str, walked: u64, at: u64, why: &'static str },
    #[error("more than {MAX_OBJECTS} objects: the census stopped there")]
    TooMany,
}

/// A type as Python names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TypeName {
    /// `type.__module__` (`builtins` for the builtins).
    pub module: String,
    /// `type.__qualname__`.
    pub qualname: String,
}

impl std::fmt::Display for TypeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.module == "builtins" {
            f.write_str(&self.qualname)
        } else {
            write!(f, "{}.{}", self.module, self.qualname)
        }
    }
}

/// One type's objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TypeTally {
    pub count: u64,
    /// Of `count`, objects on no collector list (found in pymalloc's arenas).
    pub untracked: u64,
    /// What `sys.getsizeof` would sum: the object with its GC head and pre-header.
    pub bytes: u64,
}

/// The census of the collector's lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcCensus {
    /// Per type address, its tally (the generations 0-2: what `gc.get_objects()` lists).
    pub by_type: HashMap<u64, TypeTally>,
    /// Objects in the permanent generation (`gc.freeze()`, and 3.12's static types' tuples).
    pub permanent: u64,
    /// `gc.isenabled()`.
    pub enabled: bool,
    /// `len(gc.garbage)`.
    pub garbage: u64,
    /// Objects per generation.
    pub generations: [u64; 3],
}

/// Where to take a census: what the runtime's detection found.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub layout: ObjectLayout,
    /// `&_PyRuntime`.
    pub py_runtime: u64,
    /// `&PyUnicode_Type`.
    pub unicode_type: u64,
    /// Before 3.12: the addresses of pymalloc's file-static `arenas` and `maxarenas`.
    pub static_arenas: Option<(u64, u64)>,
    /// The threads' frames, whose variables are named roots; `None`: not read.
    pub frames: Option<Frames>,
    /// 3.9: the file-static free lists (runtime addresses).
    pub static_free_lists: Option<super::freelists::FreeLists>,
}

/// How to walk the threads' frames and read their variables' names.
#[derive(Clone, Copy, Debug)]
pub struct Frames {
    pub config: leakprobe_common::PyConfig,
    pub layout: super::layout::Layout,
    pub types: super::code::TypeAddrs,
}

/// One type's row in a census.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeRow {
    pub name: TypeName,
    pub count: u64,
    /// Of `count`, objects on no collector list.
    pub untracked: u64,
    pub bytes: u64,
}

/// The census as reported: rows by count (as `objgraph.show_most_common_types`), largest
/// first, same-named types merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Census {
    pub rows: Vec<TypeRow>,
    pub enabled: bool,
    pub garbage: u64,
    pub permanent: u64,
    pub generations: [u64; 3],
    /// The arena walk: what it covered, and the objects it added (not on the collector's
    /// lists); or why there was none.
    pub arenas: Result<ArenaSummary, String>,
    /// Objects on no collector list found outside the arenas (over 512 bytes: malloc's
    /// blocks), added with [`Census::add_outside`].
    pub outside_arenas: u64,
}

/// What the walk of pymalloc's arenas found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArenaSummary {
    pub walk: super::pymalloc::Walk,
    /// Objects found in blocks that no collector list holds (str, int, bytearray, untracked
    /// tuples...).
    pub objects: u64,
    /// Blocks in use that hold no recognisable object (an object's own storage, such as a
    /// list's item array or a dict's keys; or free-list entries).
    pub other_blocks: u64,
}

impl Census {
    /// Objects counted: the collector's generations and, when walked, the arenas' others.
    pub fn objects(&self) -> u64 {
        self.generations.iter().sum::<u64>()
            + self.arenas.as_ref().map_or(0, |a| a.objects)
            + self.outside_arenas
    }

    /// Objects on no collector list that live outside the arenas (a str or bytes over 512
    /// bytes, which malloc serves), found in the blocks the scan knows: per type, the count
    /// and the bytes of their blocks.
    pub fn add_outside(&mut self, objects: impl IntoIterator<Item = (TypeName, u64, u64)>) {
        for (name, count, bytes) in objects {
            self.outside_arenas += count;
            match self.rows.iter_mut().find(|r| r.name == name) {
                Some(r) => {
                    r.count += count;
                    r.untracked += count;
                    r.bytes += bytes;
                }
                None => self.rows.push(TypeRow { name, count, untracked: count, bytes }),
            }
        }
        self.rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));
    }
}

/// Takes the census of the collector's lists and of pymalloc's arenas, and names the types.
/// With `blocks`, also hands over every pymalloc block in use (for the reachability scan).
pub fn census(
    mem: &dyn Memory,
    t: &Target,
    blocks: Option<&mut dyn FnMut(PyBlock)>,
) -> Result<Census, ObjectsError> {
    let interp = main_interpreter(mem, &t.layout, t.py_runtime)?;
    let GcCensus { mut by_type, permanent, enabled, garbage, generations } =
        gc_census(mem, &t.layout, interp)?;
    let mut names = TypeNames::new(&t.layout, t.unicode_type);
    let arenas =
        arenas_of(mem, t, interp).map(|a| arena_census(mem, &t.layout, &names, &a, &mut by_type, blocks));
    let mut merged: HashMap<TypeName, TypeTally> = HashMap::new();
    for (tp, tally) in &by_type {
        let e = merged.entry(names.name(mem, *tp)).or_default();
        e.count += tally.count;
        e.untracked += tally.untracked;
        e.bytes += tally.bytes;
    }
    let mut rows: Vec<TypeRow> = merged
        .into_iter()
        .map(|(name, t)| TypeRow { name, count: t.count, untracked: t.untracked, bytes: t.bytes })
        .collect();
    rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));
    Ok(Census { rows, enabled, garbage, permanent, generations, arenas, outside_arenas: 0 })
}

/// pymalloc's arena table, for this version.
fn arenas_of(mem: &dyn Memory, t: &Target, interp: u64) -> Result<super::pymalloc::Arenas, String> {
    let (arenas, maxarenas) = match (t.layout.arenas, t.static_arenas) {
        (Some(ArenasAt::Inline { arenas, maxarenas }), _) => (interp + arenas, interp + maxarenas),
        (Some(ArenasAt::Behind { state, arenas, maxarenas }), _) => {
            let s =
                mem.read_u64(interp + state).filter(|&s| s != 0).ok_or("interp->obmalloc cannot be read")?;
            (s.wrapping_add(arenas), s.wrapping_add(maxarenas))
        }
        (None, Some(at)) => at,
        (None, None) => {
            return Err(format!(
                "pymalloc's arena table was not found in CPython 3.{}'s file (no symbol, and its stats code did not say)",
                t.layout.minor
            ));
        }
    };
    super::pymalloc::Arenas::read(mem, t.layout.minor, arenas, maxarenas).ok_or_else(|| {
        "pymalloc's arena table is empty or does not check out (PYTHONMALLOC=malloc?)".to_string()
    })
}

/// Walks the arenas and counts every object in a block that the collector's lists do not
/// hold: non-GC objects at the block's start, and untracked GC objects after their head.
/// With `blocks`, also hands over every block in use, with the object it holds.
fn arena_census(
    mem: &dyn Memory,
    layout: &ObjectLayout,
    names: &TypeNames,
    a: &super::pymalloc::Arenas,
    by_type: &mut HashMap<u64, TypeTally>,
    mut blocks: Option<&mut dyn FnMut(PyBlock)>,
) -> ArenaSummary {
    let mut typer = BlockTyper::new(layout, names);
    let (mut objects, mut other) = (0u64, 0u64);
    let walk = super::pymalloc::walk(mem, a, 48, &mut |start, size, bytes| {
        let found = typer.object(mem, start, size, bytes);
        match found {
            Some(f) if f.dead => other += 1,
            Some(f) if !f.tracked => {
                // The block is what the object takes (a str's characters are in it too).
                objects += 1;
                let t = by_type.entry(f.tp).or_default();
                t.count += 1;
                t.untracked += 1;
                t.bytes += size;
            }
            Some(_) => {}
            None => other += 1,
        }
        if let Some(out) = blocks.as_mut() {
            let keys = if found.is_none() { keys_table(layout, bytes) } else { None };
            out(PyBlock { start, size, object: found, keys });
        }
    });
    ArenaSummary { walk, objects, other_blocks: other }
}

/// A block of the Python heap: a pymalloc block in use, or a block of malloc's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyBlock {
    pub start: u64,
    pub size: u64,
    /// The object in it; `None` for an object's separate storage (a list's items, a dict's
    /// keys) or a block on a free list.
    pub object: Option<Found>,
    /// When it holds no object: a dict's keys table, if it is one.
    pub keys: Option<KeysTable>,
}

/// An object found in a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// Its type.
    pub tp: u64,
    /// Where it starts in the block: 0, or after its collector header (and pre-header).
    pub offset: u64,
    /// Bytes of pre-header at the block's start (3.11+: the managed dict or values, and the
    /// weak references): part of the object, before its collector header.
    pub preheader: u64,
    /// A GC object linked into the collector's lists (counted from the lists).
    pub tracked: bool,
    /// The bytes from the block's start that the object can use (see `Sizes::extent`): past
    /// them a block holds stale words from its last owner. `None`: not known.
    pub extent: Option<u64>,
    /// A freed container kept on a free list: no object, and its words are stale.
    pub dead: bool,
}

impl Found {
    /// The object's address in a block at `start`.
    pub fn object(&self, start: u64) -> u64 {
        start + self.offset
    }
}

/// A block that holds a dict's keys table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeysTable {
    /// Freed onto the interpreter's keys free list (`dk_refcnt` 0): its entries are stale.
    Dead,
    /// In use: the bytes it uses (header, indices, and every entry it can hold); past them the
    /// block holds stale words.
    Live { extent: u64 },
}

impl KeysTable {
    /// The bytes of the block worth scanning: a word for a dead table, the extent of a live one.
    pub fn scan_size(self, block_size: u64) -> u64 {
        match self {
            KeysTable::Dead => 8,
            KeysTable::Live { extent } => block_size.min(extent),
        }
    }
}

/// Whether a block that holds no object is a dict's keys table: `bytes` (its first 48) read as
/// a keys header (docs/design/cpython-census-layouts.md §4.3).
pub fn keys_table(layout: &ObjectLayout, bytes: &[u8]) -> Option<KeysTable> {
    let word =
        |off: usize| bytes.get(off..off + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    let refcnt = word(0)?;
    if refcnt > u64::from(u32::MAX) {
        return None;
    }
    // Index width: 1 byte up to 2^8 slots, 2 up to 2^16, 4 up to 2^32.
    let width_log2 = |log2_size: u64| match log2_size {
        ..8 => 0,
        8..16 => 1,
        _ => 2,
    };
    let extent = if layout.dict_311 {
        let (log2_size, log2_index, kind) =
            (u64::from(*bytes.get(8)?), u64::from(*bytes.get(9)?), *bytes.get(10)?);
        let (usable_left, n) = (word(16)?, word(24)?);
        let capacity = (2u64 << log2_size.min(40)) / 3;
        let entry = if kind == 0 { 24 } else { 16 };
        let ok = (3..=30).contains(&log2_size)
            && log2_index == log2_size + width_log2(log2_size)
            && kind <= 2
            && n <= capacity
            && usable_left <= capacity;
        ok.then(|| 32 + (1 << log2_index) + capacity * entry)?
    } else {
        let (size, lookup, usable_left, n) = (word(8)?, word(16)?, word(24)?, word(32)?);
        if !(8..=1 << 30).contains(&size) || !size.is_power_of_two() || lookup == 0 {
            return None;
        }
        let capacity = 2 * size / 3;
        (n <= capacity && usable_left <= capacity)
            .then(|| 40 + (size << width_log2(u64::from(size.trailing_zeros()))) + capacity * 24)?
    };
    Some(if refcnt == 0 { KeysTable::Dead } else { KeysTable::Live { extent } })
}

/// Tells the object in a block, with each type's checks done once.
pub struct BlockTyper<'a> {
    layout: &'a ObjectLayout,
    names: &'a TypeNames<'a>,
    sizes: Sizes<'a>,
    types: HashMap<u64, bool>,
}

impl<'a> BlockTyper<'a> {
    pub fn new(layout: &'a ObjectLayout, names: &'a TypeNames<'a>) -> Self {
        BlockTyper { layout, names, sizes: Sizes::new(layout), types: HashMap::new() }
    }

    pub fn layout(&self) -> &ObjectLayout {
        self.layout
    }

    /// The object in a block at `block` of `size` bytes whose first bytes (48 suffice) are
    /// `bytes`.
    pub fn object(&mut self, mem: &dyn Memory, block: u64, size: u64, bytes: &[u8]) -> Option<Found> {
        self.find(mem, block, size, bytes)
    }
}

impl BlockTyper<'_> {
    /// What a block in use holds: an object at its start (no GC head), after its GC head, or
    /// after the GC head and the 3.11+ pre-header; `None` when it is no object (an object's
    /// separate storage).
    fn find(&mut self, mem: &dyn Memory, block: u64, size: u64, bytes: &[u8]) -> Option<Found> {
        let word = |off: u64| {
            let o = off as usize;
            bytes.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        };
        for off in [0, GC_HEAD, GC_HEAD + 16] {
            let (Some(refcnt), Some(tp)) = (word(off), word(off + OB_TYPE)) else { break };
            // A live object is referenced (a freed one on a free list is at 0); immortal ones
            // (3.12+) hold at most 2^32 - 1.
            if refcnt > u64::from(u32::MAX) || tp == 0 || tp % 8 != 0 {
                continue;
            }
            if !*self.types.entry(tp).or_insert_with(|| is_type(mem, tp) && self.names.is_named(mem, tp)) {
                continue;
            }
            let Some(shape) = self.sizes.shape(mem, tp) else { continue };
            let gc = shape.flags & HAVE_GC != 0;
            let pre = if shape.flags & self.layout.preheader_flags != 0 { 16 } else { 0 };
            let expected = if gc { GC_HEAD + pre } else { 0 };
            // A str is allocated at its own length: a short compact one is smaller than
            // `PyUnicodeObject`, the type's basic size.
            let least = if tp == self.names.unicode_type {
                self.layout.str_layout.ascii_size + 1
            } else {
                shape.basic
            };
            if off != expected || least > size - off {
                continue;
            }
            if refcnt == 0 {
                // A dead container kept on one of the interpreter's free lists (its collector
                // header cleared): its words are stale, except a tuple's first item, which links
                // the tuple free list. Anything else with no reference is no object.
                // (A GC object sits after its header: `off` is at least 16 here.)
                if !gc || word(off - GC_HEAD) != Some(0) || word(off - 8) != Some(0) {
                    continue;
                }
                let link = if self.sizes.shape(mem, tp).is_some_and(|s| s.is_tuple) { 16 } else { 0 };
                return Some(Found {
                    tp,
                    offset: off,
                    preheader: 0,
                    tracked: false,
                    extent: Some(off + 16 + link),
                    dead: true,
                });
            }
            // A GC object whose head links it into a list was counted from the lists.
            let tracked = gc && word(off - GC_HEAD).is_some_and(|next| next != 0);
            let extent = if tp == self.names.unicode_type {
                // Characters only past the header: nothing to follow there.
                Some(off + self.layout.str_layout.ascii_size)
            } else {
                self.sizes.extent(mem, block.wrapping_add(off), tp)
            };
            return Some(Found { tp, offset: off, preheader: pre, tracked, extent, dead: false });
        }
        None
    }
}

/// Whether `tp` is a type object: its type is `type` (whose own type is itself) or a
/// metaclass (whose type is `type`). Needs no symbol.
fn is_type(mem: &dyn Memory, tp: u64) -> bool {
    let Some(meta) = mem.read_u64(tp.wrapping_add(OB_TYPE)).filter(|&m| m != 0) else { return false };
    let Some(meta_type) = mem.read_u64(meta.wrapping_add(OB_TYPE)).filter(|&m| m != 0) else { return false };
    meta_type == meta || mem.read_u64(meta_type.wrapping_add(OB_TYPE)) == Some(meta_type)
}

/// The main interpreter's address.
pub fn main_interpreter(
    mem: &dyn Memory,
    layout: &ObjectLayout,
    py_runtime: u64,
) -> Result<u64, ObjectsError> {
    let addr = py_runtime + layout.runtime_interp_main;
    match mem.read_u64(addr) {
        Some(p) if p != 0 => Ok(p),
        _ => Err(ObjectsError::NoInterpreter { addr }),
    }
}

/// Walks the main interpreter's GC lists: every tracked object, by type.
pub fn gc_census(mem: &dyn Memory, layout: &ObjectLayout, interp: u64) -> Result<GcCensus, ObjectsError> {
    let g = interp + layout.interp_gc;
    let collecting = mem.read_i32(g + gc::COLLECTING).ok_or(ObjectsError::NoInterpreter { addr: g })?;
    if collecting != 0 {
        return Err(ObjectsError::Collecting);
    }
    let mut out =
        GcCensus { enabled: mem.read_i32(g + gc::ENABLED).is_some_and(|e| e != 0), ..GcCensus::default() };
    let mut sizes = Sizes::new(layout);
    let mut walked = 0u64;
    const NAMES: [&str; 3] = ["generation 0", "generation 1", "generation 2"];
    for (i, name) in NAMES.into_iter().enumerate() {
        let head = g + gc::GENERATIONS + gc::GENERATION_STRIDE * i as u64;
        let n = walk_list(mem, head, name, &mut walked, &mut |obj| {
            let Some(tp) = mem.read_u64(obj.wrapping_add(OB_TYPE)) else { return };
            let bytes = sizes.of(mem, obj, tp);
            let t = out.by_type.entry(tp).or_default();
            t.count += 1;
            t.bytes += bytes;
        })?;
        out.generations[i] = n;
    }
    out.permanent = walk_list(mem, g + gc::PERMANENT, "permanent generation", &mut walked, &mut |_| {})?;
    out.garbage = mem
        .read_u64(g + gc::GARBAGE)
        .filter(|&l| l != 0)
        .and_then(|l| mem.read_u64(l.wrapping_add(OB_SIZE)))
        .unwrap_or(0);
    Ok(out)
}

/// Walks one circular list from its head, checking each node's back link; calls `each` with
/// every object. Returns the number of objects.
fn walk_list(
    mem: &dyn Memory,
    head: u64,
    list: &'static str,
    walked: &mut u64,
    each: &mut dyn FnMut(u64),
) -> Result<u64, ObjectsError> {
    let broken = |walked: u64, at: u64, why| ObjectsError::BrokenList { list, walked, at, why };
    let mut prev = head;
    let mut node = mem.read_u64(head).ok_or(broken(0, head, "its head is unreadable"))? & !1;
    let mut n = 0u64;
    while node != head {
        if node == 0 || node % 8 != 0 {
            return Err(broken(n, node, "a link is not a pointer"));
        }
        let (Some(next), Some(back)) = (mem.read_u64(node), mem.read_u64(node.wrapping_add(8))) else {
            return Err(broken(n, node, "a node is unreadable"));
        };
        // `_gc_prev` keeps two flag bits under the pointer.
        if back & !3 != prev {
            return Err(broken(n, node, "a back link does not match"));
        }
        *walked += 1;
        if *walked > MAX_OBJECTS {
            return Err(ObjectsError::TooMany);
        }
        each(node.wrapping_add(GC_HEAD));
        n += 1;
        prev = node;
        node = next & !1;
    }
    Ok(n)
}

/// Object sizes, with each type's fields read once.
struct Sizes<'a> {
    layout: &'a ObjectLayout,
    types: HashMap<u64, Option<TypeShape>>,
}

#[derive(Clone, Copy)]
struct TypeShape {
    basic: u64,
    /// `tp_itemsize` of a type whose objects keep their item count in `ob_size`; 0 for the
    /// rest.
    item: u64,
    flags: u64,
    is_int: bool,
    is_tuple: bool,
    /// Items that `ob_size` does not count (a 3.11+ generator's frame): the object's extent
    /// is not known from its type.
    open_ended: bool,
}

/// From 3.11, these types have a `tp_itemsize` (their frame's slots) but start with a plain
/// `PyObject_HEAD`: the word where `ob_size` would be is a pointer (`gi_code`, `f_back`).
const ITEMS_NOT_IN_OB_SIZE: [&[u8]; 4] = [b"generator\0", b"coroutine\0", b"async_generator\0", b"frame\0"];

impl<'a> Sizes<'a> {
    fn new(layout: &'a ObjectLayout) -> Self {
        Sizes { layout, types: HashMap::new() }
    }

    fn shape(&mut self, mem: &dyn Memory, tp: u64) -> Option<TypeShape> {
        *self.types.entry(tp).or_insert_with(|| {
            let head = mem.read_vec(tp, (TP_FLAGS + 8) as usize)?;
            let word = |off: u64| {
                u64::from_le_bytes(head[off as usize..off as usize + 8].try_into().unwrap_or_default())
            };
            // The name up to its NUL (16 bytes cover the names tested; a shorter read near
            // the end of a mapping covers "int").
            let mut buf = [0u8; 16];
            let got = [16, 4].into_iter().find(|&n| mem.read(word(TP_NAME), &mut buf[..n])).unwrap_or(0);
            let name = &buf[..buf[..got].iter().position(|&b| b == 0).map_or(got, |n| n + 1)];
            let not_var = self.layout.minor >= 11 && ITEMS_NOT_IN_OB_SIZE.contains(&name);
            Some(TypeShape {
                basic: word(TP_BASICSIZE),
                item: if not_var { 0 } else { word(TP_ITEMSIZE) },
                flags: word(TP_FLAGS),
                is_int: name == b"int\0",
                is_tuple: name == b"tuple\0",
                // 3.13 keeps an instance's attributes inline after it, as many as its class
                // has come to need.
                open_ended: not_var || (self.layout.minor >= 13 && word(TP_FLAGS) & INLINE_VALUES != 0),
            })
        })
    }

    /// The bytes from the start of the object's block (its headers included) that the object
    /// can use, rounded up to a word: its size and, for a var-sized type, one more item
    /// (`PyType_GenericAlloc` allocates it); `None` when its type does not tell.
    fn extent(&mut self, mem: &dyn Memory, obj: u64, tp: u64) -> Option<u64> {
        let s = self.shape(mem, tp)?;
        if s.open_ended {
            return None;
        }
        let bytes = self.of(mem, obj, tp).checked_add(s.item)?;
        bytes.checked_add(7).map(|b| b & !7)
    }

    /// `sys.getsizeof(obj)`, as the type's sizes give it (a type with a `__sizeof__` of its
    /// own, such as dict or list, counts its separate storage there; that is not counted here).
    fn of(&mut self, mem: &dyn Memory, obj: u64, tp: u64) -> u64 {
        let Some(s) = self.shape(mem, tp) else { return 0 };
        let mut items = 0;
        if s.item != 0 {
            let size = mem.read_u64(obj.wrapping_add(OB_SIZE)).unwrap_or(0);
            items = if s.is_int && self.layout.int_lv_tag { size >> 3 } else { (size as i64).unsigned_abs() };
        }
        let mut bytes = s.basic.saturating_add(s.item.saturating_mul(items.min(1 << 40)));
        if s.flags & HAVE_GC != 0 {
            bytes += GC_HEAD;
        }
        if s.flags & self.layout.preheader_flags != 0 {
            bytes += 16;
        }
        bytes
    }
}

/// Type names, each read once.
pub struct TypeNames<'a> {
    layout: &'a ObjectLayout,
    unicode_type: u64,
    cache: HashMap<u64, TypeName>,
}

impl<'a> TypeNames<'a> {
    pub fn new(layout: &'a ObjectLayout, unicode_type: u64) -> Self {
        TypeNames { layout, unicode_type, cache: HashMap::new() }
    }

    /// The name of the type at `tp`; `<type at 0x..>` if it cannot be read.
    pub fn name(&mut self, mem: &dyn Memory, tp: u64) -> TypeName {
        if let Some(n) = self.cache.get(&tp) {
            return n.clone();
        }
        let n = self
            .read(mem, tp)
            .unwrap_or_else(|| TypeName { module: "?".into(), qualname: format!("<type at {tp:#x}>") });
        self.cache.insert(tp, n.clone());
        n
    }

    /// Whether `tp` is a ready type with a name that reads as one: what an object found by
    /// its shape alone must have.
    pub fn is_named(&self, mem: &dyn Memory, tp: u64) -> bool {
        const READY: u64 = 1 << 12;
        let named = |n: &str| !n.is_empty() && n.len() < 200 && n.bytes().all(|b| b.is_ascii_graphic());
        mem.read_u64(tp.wrapping_add(TP_FLAGS)).is_some_and(|f| f & READY != 0)
            && self.read(mem, tp).is_some_and(|n| named(&n.qualname) && named(&n.module))
    }

    fn read(&self, mem: &dyn Memory, tp: u64) -> Option<TypeName> {
        let flags = mem.read_u64(tp.wrapping_add(TP_FLAGS))?;
        if flags & HEAPTYPE != 0 {
            let str_at = |addr| super::code::read_str(mem, addr, &self.layout.str_layout, self.unicode_type);
            let qualname = str_at(mem.read_u64(tp.wrapping_add(self.layout.ht_qualname))?)?;
            let module = mem
                .read_u64(tp.wrapping_add(TP_DICT))
                .and_then(|d| dict_str_lookup(mem, self.layout, d, "__module__", self.unicode_type))
                .and_then(str_at)
                .unwrap_or_else(|| "?".into());
            return Some(TypeName { module, qualname });
        }
        let raw = read_c_str(mem, mem.read_u64(tp.wrapping_add(TP_NAME))?, 256)?;
        Some(match raw.rsplit_once('.') {
            Some((m, q)) => TypeName { module: m.into(), qualname: q.into() },
            None => TypeName { module: "builtins".into(), qualname: raw },
        })
    }
}

/// A NUL-terminated string of at most `max` bytes, as UTF-8 (lossy).
fn read_c_str(mem: &dyn Memory, addr: u64, max: usize) -> Option<String> {
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < max {
        // Never read past a page end in one go: the string may end just before it.
        let chunk = (4096 - (at % 4096)).min(64) as usize;
        let buf = mem.read_vec(at, chunk)?;
        if let Some(z) = buf.iter().position(|&b| b == 0) {
            out.extend_from_slice(&buf[..z]);
            return Some(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend_from_slice(&buf);
        at = at.wrapping_add(chunk as u64);
    }
    None
}

/// The value of `key` (a str) in the dict at `dict`, found by reading its entries (no hashing:
/// at most [`MAX_CLASS_DICT`] entries).
pub fn dict_str_lookup(
    mem: &dyn Memory,
    layout: &ObjectLayout,
    dict: u64,
    key: &str,
    unicode_type: u64,
) -> Option<u64> {
    dict_entries(mem, layout, dict, MAX_CLASS_DICT)?
        .into_iter()
        .find(|&(k, _)| {
            super::code::read_str(mem, k, &layout.str_layout, unicode_type).as_deref() == Some(key)
        })
        .map(|(_, v)| v)
}

/// `PyDictObject` and its keys (docs/design/cpython-census-layouts.md §4.3).
mod dict {
    pub const MA_KEYS: u64 = 32;
    pub const MA_VALUES: u64 = 40;
}

/// A combined dict's (key, value) pairs, in order, skipping deleted entries; `None` if it
/// does not look like a dict's keys or has more than `max` entries. A split dict's values
/// (instances' dicts) are read from `ma_values`.
pub fn dict_entries(mem: &dyn Memory, layout: &ObjectLayout, dict: u64, max: u64) -> Option<Vec<(u64, u64)>> {
    let keys = mem.read_u64(dict.wrapping_add(dict::MA_KEYS))?;
    let values = mem.read_u64(dict.wrapping_add(dict::MA_VALUES))?;
    let (entries_at, nentries, unicode_entries) = if layout.dict_311 {
        let head = mem.read_vec(keys, 32)?;
        let (log2_size, log2_index_bytes, kind) = (head[8], head[9], head[10]);
        if log2_size > 40 || log2_index_bytes > 43 {
            return None;
        }
        let nentries = u64::from_le_bytes(head[24..32].try_into().ok()?);
        (keys.wrapping_add(32 + (1u64 << log2_index_bytes)), nentries, kind != 0)
    } else {
        let head = mem.read_vec(keys, 40)?;
        let size = u64::from_le_bytes(head[8..16].try_into().ok()?);
        if size == 0 || size > 1 << 40 || !size.is_power_of_two() {
            return None;
        }
        let nentries = u64::from_le_bytes(head[32..40].try_into().ok()?);
        let index_bytes = match size {
            0..=0xff => 1,
            0x100..=0xffff => 2,
            0x1_0000..=0xffff_ffff => 4,
            _ => 8,
        };
        (keys.wrapping_add(40 + size * index_bytes), nentries, false)
    };
    if nentries > max {
        return None;
    }
    let stride = if unicode_entries { 16 } else { 24 };
    let raw = mem.read_vec(entries_at, usize::try_from(nentries * stride).ok()?)?;
    let word = |b: &[u8], off: usize| u64::from_le_bytes(b[off..off + 8].try_into().unwrap_or_default());
    let mut out = Vec::new();
    for (i, e) in raw.chunks_exact(stride as usize).enumerate() {
        let key = if unicode_entries { word(e, 0) } else { word(e, 8) };
        let mut value = if unicode_entries { word(e, 8) } else { word(e, 16) };
        if key == 0 {
            continue;
        }
        if values != 0 {
            // Split: the values live apart, in entry order.
            value = mem.read_u64(values.wrapping_add(8 * i as u64)).unwrap_or(0);
        }
        if value != 0 {
            out.push((key, value));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// A sparse fake address space: pages written to are mapped (zeros elsewhere in them).
    #[derive(Default)]
    struct Fake(RefCell<BTreeMap<u64, u8>>, RefCell<std::collections::BTreeSet<u64>>);

    impl Fake {
        fn put(&self, addr: u64, bytes: &[u8]) {
            let mut m = self.0.borrow_mut();
            for (i, b) in bytes.iter().enumerate() {
                m.insert(addr + i as u64, *b);
                self.1.borrow_mut().insert((addr + i as u64) >> 12);
            }
        }
        fn put_u64(&self, addr: u64, v: u64) {
            self.put(addr, &v.to_le_bytes());
        }
    }

    impl Memory for Fake {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            let (m, pages) = (self.0.borrow(), self.1.borrow());
            for (i, b) in buf.iter_mut().enumerate() {
                let at = addr + i as u64;
                if !pages.contains(&(at >> 12)) {
                    return false;
                }
                *b = m.get(&at).copied().unwrap_or(0);
            }
            true
        }
    }

    const UNICODE: u64 = 0x9000;

    fn layout() -> ObjectLayout {
        ObjectLayout::for_version(PyVersion { major: 3, minor: 11, micro: None }).unwrap()
    }

    /// A compact ASCII str (3.11 layout: data at +48).
    fn put_str(m: &Fake, at: u64, s: &str) {
        m.put_u64(at + OB_TYPE, UNICODE);
        m.put_u64(at + 16, s.len() as u64);
        m.put(at + 32, &((1u32 << 5) | (1 << 6) | (1 << 7) | (1 << 2)).to_le_bytes());
        m.put(at + 48, s.as_bytes());
        m.put(at + 48 + s.len() as u64, &[0]);
    }

    fn put_static_type(m: &Fake, at: u64, name_at: u64, name: &str, basic: u64, item: u64, flags: u64) {
        m.put_u64(at + TP_NAME, name_at);
        m.put(name_at, name.as_bytes());
        m.put(name_at + name.len() as u64, &[0]);
        m.put_u64(at + TP_BASICSIZE, basic);
        m.put_u64(at + TP_ITEMSIZE, item);
        m.put_u64(at + TP_FLAGS, flags);
    }

    /// A class `mod.Qual` whose dict (3.11 layout, unicode keys) holds `__module__`.
    fn put_class(m: &Fake, at: u64, module: &str, qual: &str) {
        put_static_type(m, at, at + 0x800, "Qual", 48, 0, HEAPTYPE | HAVE_GC | MANAGED_DICT);
        put_str(m, at + 0x1000, qual);
        m.put_u64(at + 864, at + 0x1000);
        let (d, keys) = (at + 0x2000, at + 0x3000);
        m.put_u64(at + TP_DICT, d);
        m.put_u64(d + dict::MA_KEYS, keys);
        m.put_u64(d + dict::MA_VALUES, 0);
        let mut head = vec![0u8; 32];
        head[8] = 3; // 8 slots
        head[9] = 3; // 8 index bytes
        head[10] = 1; // unicode keys
        head[24..32].copy_from_slice(&2u64.to_le_bytes());
        m.put(keys, &head);
        let entries = keys + 32 + 8;
        put_str(m, at + 0x4000, "__doc__");
        put_str(m, at + 0x4100, "__module__");
        put_str(m, at + 0x4200, module);
        m.put_u64(entries, at + 0x4000);
        m.put_u64(entries + 8, at + 0x4400);
        m.put_u64(entries + 16, at + 0x4100);
        m.put_u64(entries + 24, at + 0x4200);
    }

    /// Links `objs` (object addresses) into the circular list at `head`.
    fn link(m: &Fake, head: u64, objs: &[u64]) {
        let nodes: Vec<u64> = objs.iter().map(|o| o - GC_HEAD).collect();
        let all: Vec<u64> = std::iter::once(head).chain(nodes.iter().copied()).collect();
        for (i, &n) in all.iter().enumerate() {
            let next = all[(i + 1) % all.len()];
            let prev = all[(i + all.len() - 1) % all.len()];
            m.put_u64(n, next);
            // A flag bit under the back link, as FINALIZED sets it.
            m.put_u64(n + 8, prev | if n == head { 0 } else { 1 });
        }
    }

    fn interp_with_lists(m: &Fake, gens: [&[u64]; 3]) -> u64 {
        let l = layout();
        let interp = 0x10_0000;
        let g = interp + l.interp_gc;
        m.put(g + gc::ENABLED, &0i32.to_le_bytes());
        m.put(g + gc::COLLECTING, &0i32.to_le_bytes());
        m.put_u64(g + gc::GARBAGE, 0);
        for (i, objs) in gens.iter().enumerate() {
            link(m, g + gc::GENERATIONS + 24 * i as u64, objs);
        }
        link(m, g + gc::PERMANENT, &[]);
        interp
    }

    #[test]
    fn the_lists_give_every_tracked_object_by_type_with_python_names() {
        let m = Fake::default();
        let list_t = 0x20_0000;
        put_static_type(&m, list_t, 0x20_1000, "list", 40, 0, HAVE_GC);
        let node_t = 0x30_0000;
        put_class(&m, node_t, "app", "Node");
        let objs: Vec<u64> = (0..5).map(|i| 0x40_0000 + i * 0x100).collect();
        for (i, &o) in objs.iter().enumerate() {
            m.put_u64(o + OB_TYPE, if i < 2 { list_t } else { node_t });
            m.put_u64(o + OB_SIZE, 0);
        }
        let interp = interp_with_lists(&m, [&objs[..1], &objs[1..3], &objs[3..]]);
        let c = gc_census(&m, &layout(), interp).unwrap();
        assert_eq!(c.generations, [1, 2, 2]);
        assert!(!c.enabled);
        assert_eq!(c.by_type[&list_t], TypeTally { count: 2, untracked: 0, bytes: 2 * (40 + 16) });
        // A class instance: its GC head and, on 3.11, the managed dict's pre-header.
        assert_eq!(c.by_type[&node_t], TypeTally { count: 3, untracked: 0, bytes: 3 * (48 + 16 + 16) });
        let l = layout();
        let mut names = TypeNames::new(&l, UNICODE);
        assert_eq!(names.name(&m, node_t).to_string(), "app.Node");
        assert_eq!(names.name(&m, list_t).to_string(), "list");
    }

    #[test]
    fn a_broken_list_or_a_running_collection_is_an_error_never_objects() {
        let m = Fake::default();
        let t = 0x20_0000;
        put_static_type(&m, t, 0x20_1000, "list", 40, 0, HAVE_GC);
        let objs: Vec<u64> = (0..3).map(|i| 0x40_0000 + i * 0x100).collect();
        for &o in &objs {
            m.put_u64(o + OB_TYPE, t);
        }
        let interp = interp_with_lists(&m, [&objs, &[], &[]]);
        // The middle node's back link points elsewhere.
        m.put_u64(objs[1] - GC_HEAD + 8, 0x7777_0000);
        let err = gc_census(&m, &layout(), interp).unwrap_err();
        assert!(matches!(err, ObjectsError::BrokenList { walked: 1, .. }), "{err}");
        let g = interp + layout().interp_gc;
        m.put(g + gc::COLLECTING, &1i32.to_le_bytes());
        assert_eq!(gc_census(&m, &layout(), interp).unwrap_err(), ObjectsError::Collecting);
    }

    /// `type` (its own type) at 0x50_0000, and a static type of it at `at`.
    fn put_type_of_type(m: &Fake, at: u64, name: &str, basic: u64, flags: u64) {
        let ty = 0x50_0000;
        m.put_u64(ty + OB_TYPE, ty);
        put_static_type(m, at, at + 0x800, name, basic, 0, flags);
        m.put_u64(at + OB_TYPE, ty);
    }

    #[test]
    fn a_block_holds_an_object_at_its_start_after_its_head_or_none() {
        let m = Fake::default();
        let l = layout();
        let (str_t, tuple_t, list_t) = (0x60_0000, 0x61_0000, 0x62_0000);
        const READY: u64 = 1 << 12;
        put_type_of_type(&m, str_t, "str", 48, READY);
        put_type_of_type(&m, tuple_t, "tuple", 24, HAVE_GC | READY);
        put_type_of_type(&m, list_t, "list", 40, HAVE_GC | READY);
        // A type, but not one with a name: found by shape alone, it is no object.
        put_type_of_type(&m, 0x66_0000, "\u{2}", 48, READY);
        // Something that looks like a type pointer but whose type is no type.
        m.put_u64(0x63_0000 + OB_TYPE, 0x64_0000);
        m.put_u64(0x64_0000 + OB_TYPE, 0x65_0000);
        let block = |words: &[u64]| words.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
        let names = TypeNames::new(&l, UNICODE);
        let mut typer = BlockTyper::new(&l, &names);
        let mut at = |bytes: &[u8], size| typer.object(&m, 0x70_0000, size, bytes);
        // A str: refcount, then its type, at the block's start.
        let untracked = |f: Option<Found>, tp: u64, offset: u64| {
            f.is_some_and(|f| (f.tp, f.offset, f.preheader, f.tracked) == (tp, offset, 0, false))
        };
        assert!(untracked(at(&block(&[1, str_t, 3, 0, 0, 0]), 64), str_t, 0));
        // An untracked tuple: a GC head of zeros, then the object.
        assert!(untracked(at(&block(&[0, 0, 1, tuple_t, 2, 0]), 48), tuple_t, GC_HEAD));
        // A tracked list: its head links it into a list; counted there.
        assert!(
            at(&block(&[0x7000, 0x7100, 1, list_t, 0, 0]), 64).is_some_and(|f| f.tracked && f.tp == list_t)
        );
        // A list's item array: pointers to objects, no type at any offset.
        assert!(at(&block(&[0x9100, 0x9200, 0x9300, 0x9400, 0x9500, 0x9600]), 48).is_none());
        // A pointer whose type is no type.
        assert!(at(&block(&[1, 0x63_0000, 0, 0, 0, 0]), 48).is_none());
        // A GC type at the block's start would have no head: not an object there.
        assert!(at(&block(&[1, list_t, 0, 0, 0, 0]), 48).is_none());
        // A freed object with no reference left: no object, unless a container with its
        // collector header cleared (on a free list), which is dead.
        assert!(at(&block(&[0, str_t, 3, 0, 0, 0]), 64).is_none());
        assert!(at(&block(&[0, 0, 0, tuple_t, 2, 0]), 48).is_some_and(|f| f.dead && f.extent == Some(48)));
        assert!(at(&block(&[0, 0, 0, list_t, 0, 0]), 64).is_some_and(|f| f.dead && f.extent == Some(32)));
        assert!(at(&block(&[1, 0x66_0000, 3, 0, 0, 0]), 64).is_none());
    }

    #[test]
    fn a_generator_is_sized_by_its_type_not_by_the_pointer_where_ob_size_would_be() {
        let m = Fake::default();
        let l = layout();
        let (gen_t, tuple_t) = (0x20_0000, 0x21_0000);
        put_static_type(&m, gen_t, 0x20_1000, "generator", 160, 8, HAVE_GC);
        put_static_type(&m, tuple_t, 0x21_1000, "tuple", 24, 8, HAVE_GC);
        let (g, t) = (0x40_0000, 0x40_1000);
        // 3.11+: gi_code where ob_size would be.
        m.put_u64(g + OB_SIZE, 0x7f12_3456_7000);
        m.put_u64(t + OB_SIZE, 3);
        let mut sizes = Sizes::new(&l);
        assert_eq!(sizes.of(&m, g, gen_t), 160 + GC_HEAD);
        assert_eq!(sizes.of(&m, t, tuple_t), 24 + 3 * 8 + GC_HEAD);
    }

    /// A combined dict with unicode keys (3.11 layout) at `d`, its keys at `d + 0x100`.
    fn put_dict(m: &Fake, d: u64, entries: &[(u64, u64)]) {
        let keys = d + 0x100;
        m.put_u64(d + dict::MA_KEYS, keys);
        m.put_u64(d + dict::MA_VALUES, 0);
        let mut head = vec![0u8; 32];
        head[8] = 3;
        head[9] = 3;
        head[10] = 1;
        head[24..32].copy_from_slice(&(entries.len() as u64).to_le_bytes());
        m.put(keys, &head);
        for (i, (k, v)) in entries.iter().enumerate() {
            m.put_u64(keys + 40 + 16 * i as u64, *k);
            m.put_u64(keys + 48 + 16 * i as u64, *v);
        }
    }

    #[test]
    fn named_roots_are_every_modules_globals_and_the_collectors_garbage() {
        let m = Fake::default();
        let l = layout();
        let (runtime, interp) = (0x1000, 0x10_0000);
        m.put_u64(runtime + l.runtime_interp_main, interp);
        let (modules, module, globals) = (0x20_0000, 0x21_0000, 0x22_0000);
        put_str(&m, 0x30_0000, "app");
        put_str(&m, 0x30_1000, "cache");
        put_str(&m, 0x30_2000, "not a name");
        m.put_u64(interp + 888, modules);
        put_dict(&m, modules, &[(0x30_0000, module)]);
        m.put_u64(module + 16, globals);
        put_dict(&m, globals, &[(0x30_1000, 0xaaa0), (0x30_2000, 0xbbb0)]);
        let list = 0x40_0000;
        m.put_u64(interp + l.interp_gc + GC_GARBAGE, list);
        m.put_u64(list + 16, 1);
        m.put_u64(list + 24, list + 0x100);
        m.put_u64(list + 0x100, 0xccc0);
        let t = Target {
            layout: l,
            py_runtime: runtime,
            unicode_type: UNICODE,
            static_arenas: None,
            frames: None,
            static_free_lists: None,
        };
        let r = super::super::roots::named_roots(&m, &t, &[]).unwrap();
        let got: Vec<(&str, u64)> = r.roots.iter().map(|n| (n.name.as_str(), n.value)).collect();
        assert_eq!(
            got,
            [
                ("module app, global cache", 0xaaa0),
                ("module app, global <key>", 0xbbb0),
                ("gc.garbage", 0xccc0)
            ]
        );
        assert_eq!((r.modules, r.unreadable_modules, r.dropped), (1, 0, 0));
    }

    /// A class defined in its module gives its attributes, before the module's globals; an
    /// imported one does not; each thread's frames give their set variables, after them.
    #[test]
    fn named_roots_name_class_attributes_and_frame_locals() {
        let m = Fake::default();
        let l = layout();
        let (runtime, interp) = (0x1000, 0x10_0000);
        let frames_layout = super::super::layout::Layout::for_version(3, 11).unwrap();
        let code_type = 0x9100;
        let config = super::super::walk::config(&frames_layout, runtime, code_type);
        m.put_u64(runtime + l.runtime_interp_main, interp);
        m.put_u64(config.interp_head_ptr, interp);
        let (modules, module, globals) = (0x20_0000, 0x21_0000, 0x22_0000);
        for (at, s) in [
            (0x30_0000, "app"),
            (0x30_1000, "cache"),
            (0x30_2000, "Registry"),
            (0x30_3000, "Imported"),
            (0x30_4000, "__module__"),
            (0x30_5000, "items"),
            (0x30_6000, "other"),
            (0x30_7000, "rows"),
            (0x30_8000, "unset"),
        ] {
            put_str(&m, at, s);
        }
        m.put_u64(interp + 888, modules);
        put_dict(&m, modules, &[(0x30_0000, module)]);
        m.put_u64(module + 16, globals);
        let (registry, imported, meta) = (0x50_0000, 0x53_0000, 0x51_0000);
        put_dict(&m, globals, &[(0x30_1000, 0xaaa0), (0x30_2000, registry), (0x30_3000, imported)]);
        m.put_u64(meta + TP_FLAGS, 1 << 31);
        for (class, dict, module_name) in [(registry, 0x52_0000, 0x30_0000), (imported, 0x54_0000, 0x30_6000)]
        {
            m.put_u64(class + OB_TYPE, meta);
            m.put_u64(class + TP_FLAGS, 1 << 9);
            m.put_u64(class + 264, dict);
            put_dict(&m, dict, &[(0x30_4000, module_name), (0x30_5000, 0xddd0)]);
        }
        // One thread, one frame: `rows` set, `unset` not yet.
        let (tstate, cframe, frame, code, names) = (0x60_0000, 0x61_0000, 0x62_0000, 0x63_0000, 0x64_0000);
        m.put_u64(interp + frames_layout.interp_threads_head, tstate);
        m.put_u64(tstate + 160, 812);
        m.put_u64(tstate + frames_layout.tstate_frame, cframe);
        m.put_u64(cframe + frames_layout.cframe_current_frame, frame);
        m.put_u64(frame + frames_layout.frame_code, code);
        m.put_u64(frame + frames_layout.frame_back, 0);
        m.put_u64(frame + 72, 0xeee0);
        m.put_u64(frame + 80, 0);
        m.put_u64(code + OB_TYPE, code_type);
        m.put(code + frames_layout.code.nlocals, &2i32.to_le_bytes());
        m.put_u64(code + frames_layout.code.localnames, names);
        m.put_u64(names + 16, 2);
        m.put_u64(names + 24, 0x30_7000);
        m.put_u64(names + 32, 0x30_8000);
        let frames = Frames {
            config,
            layout: frames_layout,
            types: super::super::code::TypeAddrs { code: code_type, unicode: UNICODE, bytes: 0x9200 },
        };
        let t = Target {
            layout: l,
            py_runtime: runtime,
            unicode_type: UNICODE,
            static_arenas: None,
            frames: Some(frames),
            static_free_lists: None,
        };
        let r = super::super::roots::named_roots(&m, &t, &[]).unwrap();
        let got: Vec<(&str, u64)> = r.roots.iter().map(|n| (n.name.as_str(), n.value)).collect();
        assert_eq!(
            got,
            [
                ("class app.Registry, attribute __module__", 0x30_0000),
                ("class app.Registry, attribute items", 0xddd0),
                ("module app, global cache", 0xaaa0),
                ("module app, global Registry", registry),
                ("module app, global Imported", imported),
                ("local rows in a Python function, thread 812", 0xeee0),
            ]
        );
    }

    #[test]
    fn objects_outside_the_arenas_join_their_types_rows_as_untracked() {
        let name = |m: &str, q: &str| TypeName { module: m.into(), qualname: q.into() };
        let mut c = Census {
            rows: vec![TypeRow { name: name("builtins", "bytes"), count: 10, untracked: 10, bytes: 400 }],
            enabled: true,
            garbage: 0,
            permanent: 0,
            generations: [0, 0, 5],
            arenas: Err("none".into()),
            outside_arenas: 0,
        };
        c.add_outside([(name("builtins", "bytes"), 50, 500_000), (name("builtins", "str"), 2, 2048)]);
        assert_eq!(c.outside_arenas, 52);
        assert_eq!(c.objects(), 5 + 52);
        assert_eq!(
            c.rows[0],
            TypeRow { name: name("builtins", "bytes"), count: 60, untracked: 60, bytes: 500_400 }
        );
        assert_eq!(c.rows[1], TypeRow { name: name("builtins", "str"), count: 2, untracked: 2, bytes: 2048 });
    }

    #[test]
    fn a_keys_table_is_told_live_with_its_extent_or_dead() {
        let l = layout();
        // 3.11: 8 slots (log2 3), 1-byte indices (log2 3), unicode entries (16 B), 2 used.
        let mut head = vec![0u8; 48];
        head[..8].copy_from_slice(&1u64.to_le_bytes());
        head[8] = 3;
        head[9] = 3;
        head[10] = 1;
        head[16..24].copy_from_slice(&3u64.to_le_bytes());
        head[24..32].copy_from_slice(&2u64.to_le_bytes());
        // Capacity 2*8/3 = 5 entries: 32 + 8 + 5 * 16.
        assert_eq!(keys_table(&l, &head), Some(KeysTable::Live { extent: 120 }));
        assert_eq!(KeysTable::Live { extent: 120 }.scan_size(256), 120);
        head[..8].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(keys_table(&l, &head), Some(KeysTable::Dead));
        assert_eq!(KeysTable::Dead.scan_size(256), 8);
        // Indices too wide for 8 slots: no keys table (a list's items, say).
        head[9] = 5;
        assert_eq!(keys_table(&l, &head), None);
    }

    #[test]
    fn a_static_type_with_a_dotted_name_is_split_into_module_and_name() {
        let m = Fake::default();
        put_static_type(&m, 0x1000, 0x2000, "collections.OrderedDict", 100, 0, HAVE_GC);
        let l = layout();
        let mut names = TypeNames::new(&l, UNICODE);
        let n = names.name(&m, 0x1000);
        assert_eq!((n.module.as_str(), n.qualname.as_str()), ("collections", "OrderedDict"));
        // Unreadable: named by its address, not guessed.
        assert_eq!(names.name(&m, 0x5000).qualname, "<type at 0x5000>");
    }
}
