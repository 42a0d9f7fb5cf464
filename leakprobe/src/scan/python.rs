//! The Python heap in the one marking: pymalloc's blocks become blocks (objects grouped by
//! type, their storage by size), every block that holds a Python object is marked from the
//! object on (its collector header links it to its neighbours on the collector's lists, which
//! is no reference), the arenas walked stop being roots, and the program's module globals
//! become named roots marked before all others. See docs/design/python-holders.md.

use std::collections::HashMap;

use super::{GroupKey, Groups, PythonHeap, mark, roots, snapshot::Snapshot};
use crate::runtimes::cpython::{
    objects::{self, BlockTyper, Census, ObjectsError, PyBlock, Target, TypeNames},
    roots::{self as pyroots, NamedRoot},
};

/// Where the Python heap goes.
pub(super) struct Into<'a> {
    pub groups: &'a mut Groups,
    pub blocks: &'a mut Vec<mark::Block>,
    pub exclude: &'a mut Vec<(u64, u64)>,
}

/// The Python heap's part of a scan.
pub(super) struct Part {
    pub census: Result<Census, ObjectsError>,
    pub heap: PythonHeap,
    /// The pre-headers of 3.11+ objects: scanned as the object's.
    pub prefixes: Vec<mark::Prefix>,
    named: Vec<NamedRoot>,
    /// Every object in a block, live ones only.
    objects: Vec<Obj>,
}

struct Obj {
    addr: u64,
    tp: u64,
}

impl Part {
    /// Adds the named roots to `roots` (one root id each) and returns them for the marking.
    pub fn named_roots(&mut self, roots: &mut roots::Roots) -> Vec<mark::RootValues> {
        std::mem::take(&mut self.named)
            .into_iter()
            .map(|n| {
                let root = roots.kinds.len() as u32;
                roots.kinds.push(roots::RootKind::Python { name: n.name, value: n.value });
                mark::RootValues { root, values: vec![n.value] }
            })
            .collect()
    }
}

/// Takes the census of the Python heap and puts its blocks into the marking.
pub(super) fn take(snap: &Snapshot, t: &Target, into: &mut Into<'_>) -> Part {
    let mut arena_blocks = Vec::new();
    let census = objects::census(snap, t, Some(&mut arena_blocks));
    let mut part = Part {
        census,
        heap: PythonHeap::default(),
        prefixes: Vec::new(),
        named: Vec::new(),
        objects: Vec::new(),
    };
    let names = TypeNames::new(&t.layout, t.unicode_type);
    let mut typer = BlockTyper::new(&t.layout, &names);
    let mut type_names = TypeNames::new(&t.layout, t.unicode_type);
    let mut name_of = |tp: u64| type_names.name(snap, tp).to_string();
    part.type_blocks(snap, &mut typer, &mut name_of, into);
    if let Ok(c) = &part.census
        && let Ok(a) = &c.arenas
    {
        into.exclude.extend_from_slice(&a.walk.known);
        part.add_arena_blocks(&arena_blocks, &mut name_of, into);
    }
    part.trim_list_items(snap, into.blocks, &mut name_of);
    match pyroots::named_roots(snap, t) {
        Ok(r) => {
            part.heap.roots = r.roots.len() as u64;
            part.heap.modules = r.modules;
            part.heap.roots_dropped = r.dropped;
            part.named = r.roots;
        }
        Err(e) => part.heap.roots_error = Some(e.to_string()),
    }
    part
}

impl Part {
    /// Blocks already there (tracked, or malloc's from the heap walk) that hold a Python object:
    /// marked from the object on; the heap walk's are grouped by the object's type.
    fn type_blocks(
        &mut self,
        snap: &Snapshot,
        typer: &mut BlockTyper,
        name_of: &mut dyn FnMut(u64) -> String,
        into: &mut Into<'_>,
    ) {
        let mut head = [0u8; 48];
        for (i, b) in into.blocks.iter_mut().enumerate() {
            let n = (b.size as usize).min(head.len());
            if n < 16 || !snap.read(b.start, &mut head[..n]) {
                continue;
            }
            let Some(found) = typer.object(snap, b.start, b.size, &head[..n]) else {
                if objects::dead_keys(typer.layout(), &head[..n]) {
                    b.size = 8; // stale entries: not references
                } else if let Some(e) = objects::keys_extent(typer.layout(), &head[..n]) {
                    b.size = b.size.min(e);
                }
                continue;
            };
            self.heap.objects_in_blocks += 1;
            let name = if b.site >= into.groups.first {
                let name = name_of(found.tp);
                b.site = into.groups.site(GroupKey::Python(name));
                None
            } else {
                (!self.heap.tracked_types.contains_key(&b.site)).then(|| name_of(found.tp))
            };
            if let Some(name) = name {
                self.heap.tracked_types.insert(b.site, name);
            }
            self.shift(i, b, found);
        }
    }

    /// The block starts at its object and ends where the object can end (the rest of a
    /// larger block holds stale words of its last owner); the pre-header, if any, is its
    /// prefix.
    fn shift(&mut self, index: usize, b: &mut mark::Block, found: objects::Found) {
        let start = b.start;
        let end = found.extent.map_or(b.size, |e| e.min(b.size));
        b.start = found.object(start);
        if !found.dead {
            self.objects.push(Obj { addr: b.start, tp: found.tp });
        }
        b.size = end.saturating_sub(found.offset);
        if found.preheader > 0 {
            self.prefixes.push(mark::Prefix { block: index, start, end: start + found.preheader });
        }
    }

    /// A list's item array is scanned up to its length only: the capacity past it holds
    /// whatever the memory held before (a freed list's items, say), which is no reference.
    fn trim_list_items(
        &mut self,
        snap: &Snapshot,
        blocks: &mut [mark::Block],
        name_of: &mut dyn FnMut(u64) -> String,
    ) {
        let mut is_list: HashMap<u64, bool> = HashMap::new();
        let mut items: Vec<(u64, u64)> = Vec::new();
        for o in &self.objects {
            let list = *is_list.entry(o.tp).or_insert_with(|| name_of(o.tp) == "list");
            let mut w = [0u8; 16];
            if !list || !snap.read(o.addr + 16, &mut w) {
                continue;
            }
            let len = u64::from_le_bytes(w[..8].try_into().unwrap_or_default());
            let at = u64::from_le_bytes(w[8..].try_into().unwrap_or_default());
            if at != 0 && len < 1 << 40 {
                items.push((at, len * 8));
            }
        }
        items.sort_unstable();
        for b in blocks.iter_mut() {
            if let Ok(i) = items.binary_search_by_key(&b.start, |x| x.0) {
                b.size = b.size.min(items[i].1);
                self.heap.trimmed_item_arrays += 1;
            }
        }
    }

    /// pymalloc's blocks in use that no tracked block covers.
    fn add_arena_blocks(
        &mut self,
        arena_blocks: &[PyBlock],
        name_of: &mut dyn FnMut(u64) -> String,
        into: &mut Into<'_>,
    ) {
        let mut covered: Vec<(u64, u64)> =
            into.blocks.iter().map(|b| (b.start, b.start + b.size.max(1))).collect();
        covered.sort_unstable();
        let overlaps = |s: u64, e: u64| {
            let i = covered.partition_point(|t| t.0 < e);
            i > 0 && covered[i - 1].1 > s
        };
        let mut type_sites: HashMap<u64, u32> = HashMap::new();
        for pb in arena_blocks {
            if overlaps(pb.start, pb.start + pb.size) {
                continue;
            }
            let site = match pb.object {
                Some(f) => *type_sites
                    .entry(f.tp)
                    .or_insert_with(|| into.groups.site(GroupKey::Python(name_of(f.tp)))),
                None => into.groups.site(GroupKey::PythonStorage(pb.size)),
            };
            let index = into.blocks.len();
            let size = match (pb.dead_keys, pb.keys_extent) {
                (true, _) => 8,
                (false, Some(e)) => pb.size.min(e),
                (false, None) => pb.size,
            };
            let mut b = mark::Block { start: pb.start, size, site };
            if let Some(f) = pb.object {
                self.shift(index, &mut b, f);
            }
            into.blocks.push(b);
            self.heap.blocks += 1;
        }
    }
}
