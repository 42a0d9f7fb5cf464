//! The Python heap in the one marking: pymalloc's blocks become blocks (objects grouped by
//! type, their storage by size), every block that holds a Python object is marked from the
//! object on (its collector header links it to its neighbours on the collector's lists, which
//! is no reference), the arenas walked stop being roots, and the program's module globals
//! become named roots marked before all others. See docs/design/python-holders.md.

use std::collections::HashMap;

use super::{GroupKey, Groups, PythonHeap, mark, roots, snapshot::Snapshot};
use crate::runtimes::cpython::{
    freelists,
    objects::{self, BlockTyper, Census, ObjectsError, PyBlock, Target, TypeNames},
    roots::{self as pyroots, NamedRoot},
    walk,
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
    /// Memory the interpreter no longer counts as references (free lists' stale slots, frame
    /// stacks past their top, the arena table's slack): read as zero by the marking.
    pub dead: Vec<(u64, u64)>,
    named: Vec<NamedRoot>,
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

/// Takes the census of the Python heap and puts its blocks into the marking. The arena walk
/// hands each block over as it goes (a 1 GiB heap has some 20 million): none is kept twice.
pub(super) fn take(snap: &Snapshot, t: &Target, into: &mut Into<'_>) -> Part {
    let names = TypeNames::new(&t.layout, t.unicode_type);
    let mut typer = BlockTyper::new(&t.layout, &names);
    let mut type_names = TypeNames::new(&t.layout, t.unicode_type);
    let mut name_of = |tp: u64| type_names.name(snap, tp).to_string();
    let mut b = Builder::default();
    b.type_blocks(snap, &mut typer, &mut name_of, into);
    let mut covered: Vec<(u64, u64)> =
        into.blocks.iter().map(|b| (b.start, b.start + b.size.max(1))).collect();
    covered.sort_unstable();
    let first = into.blocks.len();
    let mut added = Vec::new();
    let census = objects::census(
        snap,
        t,
        Some(&mut |pb: PyBlock| b.arena_block(pb, &covered, first, &mut added, &mut name_of, into.groups)),
    );
    into.blocks.extend(added);
    let mut census = census;
    if let Ok(c) = &mut census {
        if let Ok(a) = &c.arenas {
            into.exclude.extend_from_slice(&a.walk.known);
        }
        b.count_outside(c, snap, t);
    }
    b.trim_list_items(snap, into.blocks);
    let mut dead = dead_words(snap, t, &b.frames);
    if let Ok(Ok(a)) = census.as_ref().map(|c| &c.arenas) {
        dead.extend(arena_table_slack(&a.walk, into.blocks));
    }
    // The marking's reader needs them in order.
    dead.sort_unstable();
    let mut part = Part { census, heap: b.heap, prefixes: b.prefixes, dead, named: Vec::new() };
    let threads: Vec<(u64, i32)> = snap.threads.iter().map(|t| (t.fs_base, t.tid)).collect();
    match pyroots::named_roots(snap, t, &threads) {
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

/// Words the interpreter no longer counts as references: its free lists' stale slots (see
/// [`freelists`]), its threads' frame stacks past their top (3.11+), and the variables and
/// value stacks of frame objects kept for reuse (3.9's zombie frames, the frame free list).
/// `frames`: the frame objects met, (object, end).
fn dead_words(snap: &Snapshot, t: &Target, frames: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let lists = match freelists::in_interpreter(t.layout.minor) {
        Some(at) => objects::main_interpreter(snap, &t.layout, t.py_runtime).ok().map(|i| at.moved(i)),
        None => t.static_free_lists,
    };
    let mut dead = lists.map_or_else(Vec::new, |l| freelists::stale_slots(snap, &l.arrays));
    if let Some(f) = &t.frames {
        dead.extend(walk::dead_frame_stacks(snap, &f.config, &f.layout));
        let free = lists
            .and_then(|l| l.frames)
            .map_or_else(Vec::new, |l| freelists::free_frames(snap, l, f.layout.frame_back));
        let word = |a: u64| crate::runtimes::Memory::read_u64(snap, a);
        for &(frame, end) in frames {
            let zombie = t.layout.minor == 9
                && word(frame + f.layout.frame_code).and_then(|c| word(c + freelists::CO_ZOMBIEFRAME_39))
                    == Some(frame);
            let from = frame + f.layout.frame_localsplus;
            if (zombie || free.contains(&frame)) && from < end {
                dead.push((from, end));
            }
        }
    }
    dead
}

/// pymalloc's arena table: its unused slots, and its allocation past its `maxarenas` slots
/// (malloc rounds it up), whose words are what the memory held before.
fn arena_table_slack(
    walk: &crate::runtimes::cpython::pymalloc::Walk,
    blocks: &[mark::Block],
) -> Vec<(u64, u64)> {
    let (start, end) = walk.table;
    let mut out = walk.unused_slots.clone();
    if let Some(b) = blocks.iter().find(|b| b.start <= start && start < b.start + b.size)
        && end < b.start + b.size
    {
        out.push((end, b.start + b.size));
    }
    out
}

/// Puts the Python heap's blocks into the marking's.
#[derive(Default)]
struct Builder {
    heap: PythonHeap,
    prefixes: Vec<mark::Prefix>,
    /// Each live list object (for its items' length).
    lists: Vec<u64>,
    is_list: HashMap<u64, bool>,
    /// The group of each type met in the arenas.
    type_sites: HashMap<u64, u32>,
    /// Objects on no collector list found in blocks already there: (type, block, size).
    untracked: Vec<(u64, u64, u64)>,
    /// Frame objects (3.9/3.10 frames are objects): (object, end).
    frames: Vec<(u64, u64)>,
    is_frame: HashMap<u64, bool>,
}

impl Builder {
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
                if let Some(keys) = objects::keys_table(typer.layout(), &head[..n]) {
                    b.size = keys.scan_size(b.size);
                }
                continue;
            };
            self.heap.objects_in_blocks += 1;
            if !found.tracked && !found.dead {
                self.untracked.push((found.tp, b.start, b.size));
            }
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
            self.shift(i, b, found, name_of);
        }
    }

    /// The block starts at its object and ends where the object can end (the rest of a
    /// larger block holds stale words of its last owner); the pre-header, if any, is its
    /// prefix.
    fn shift(
        &mut self,
        index: usize,
        b: &mut mark::Block,
        found: objects::Found,
        name_of: &mut dyn FnMut(u64) -> String,
    ) {
        let start = b.start;
        let end = found.extent.map_or(b.size, |e| e.min(b.size));
        b.start = found.object(start);
        if !found.dead && *self.is_list.entry(found.tp).or_insert_with(|| name_of(found.tp) == "list") {
            self.lists.push(b.start);
        }
        b.size = end.saturating_sub(found.offset);
        if !found.dead && *self.is_frame.entry(found.tp).or_insert_with(|| name_of(found.tp) == "frame") {
            self.frames.push((b.start, b.start + b.size));
        }
        if found.preheader > 0 {
            self.prefixes.push(mark::Prefix { block: index, start, end: start + found.preheader });
        }
    }

    /// A pymalloc block in use, unless a tracked block covers it.
    fn arena_block(
        &mut self,
        pb: PyBlock,
        covered: &[(u64, u64)],
        first: usize,
        added: &mut Vec<mark::Block>,
        name_of: &mut dyn FnMut(u64) -> String,
        groups: &mut Groups,
    ) {
        let e = pb.start + pb.size;
        let i = covered.partition_point(|t| t.0 < e);
        if i > 0 && covered[i - 1].1 > pb.start {
            return;
        }
        let site = match pb.object {
            Some(f) => {
                *self.type_sites.entry(f.tp).or_insert_with(|| groups.site(GroupKey::Python(name_of(f.tp))))
            }
            None => groups.site(GroupKey::PythonStorage(pb.size)),
        };
        let size = pb.keys.map_or(pb.size, |k| k.scan_size(pb.size));
        let mut b = mark::Block { start: pb.start, size, site };
        if let Some(f) = pb.object {
            self.shift(first + added.len(), &mut b, f, name_of);
        }
        added.push(b);
        self.heap.blocks += 1;
    }

    /// The census counts the objects found in the arenas; those in blocks outside them
    /// (malloc's, over 512 bytes) are added to it from here.
    fn count_outside(&mut self, census: &mut Census, snap: &Snapshot, t: &Target) {
        let known: &[(u64, u64)] = census.arenas.as_ref().map_or(&[], |a| &a.walk.known);
        let in_arena = |a: u64| {
            let i = known.partition_point(|k| k.0 <= a);
            i > 0 && a < known[i - 1].1
        };
        let mut by_type: HashMap<u64, (u64, u64)> = HashMap::new();
        for &(tp, _, size) in self.untracked.iter().filter(|u| !in_arena(u.1)) {
            let e = by_type.entry(tp).or_default();
            e.0 += 1;
            e.1 += size;
        }
        let mut names = TypeNames::new(&t.layout, t.unicode_type);
        census.add_outside(by_type.into_iter().map(|(tp, (n, bytes))| (names.name(snap, tp), n, bytes)));
    }

    /// A list's item array is scanned up to its length only: the capacity past it holds
    /// whatever the memory held before (a freed list's items, say), which is no reference.
    fn trim_list_items(&mut self, snap: &Snapshot, blocks: &mut [mark::Block]) {
        let mut items: Vec<(u64, u64)> = Vec::with_capacity(self.lists.len());
        for &list in &self.lists {
            let mut w = [0u8; 16];
            if !snap.read(list + 16, &mut w) {
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
}

/// Objects drawn at most by `--backrefs`, and how far up from each.
pub const BACKREF_OBJECTS: usize = 5;
const BACKREF_DEPTH: usize = 12;

/// The root a held block's retainers lead up to.
fn root_of(blocks: &[mark::BlockOutcome], mut b: usize) -> Option<mark::RootRef> {
    for _ in 0..=blocks[b].depth {
        match blocks[b].retainer {
            mark::Retainer::Root(r) => return Some(r),
            mark::Retainer::Block { index, .. } => b = index,
            mark::Retainer::Clique { .. } | mark::Retainer::None => return None,
        }
    }
    None
}

/// Which of the `candidates` (blocks of the asked type) `--backrefs` draws, as most of them
/// are: held, or lost (in cycles, say). Held ones: those under the root that holds most of
/// them (not the one a stale stack slot still points at as the process stops), the nearest
/// it first. Lost ones: spread over them (the first by address are the oldest, seldom the
/// typical).
fn choose_drawn(blocks: &[mark::BlockOutcome], candidates: Vec<usize>) -> Vec<usize> {
    let reachable = |b: usize| blocks[b].class == mark::Class::Reachable;
    let held = candidates.iter().filter(|&&b| reachable(b)).count();
    let most_held = 2 * held >= candidates.len();
    let roots: Vec<Option<mark::RootRef>> = candidates.iter().map(|&b| root_of(blocks, b)).collect();
    let mut per_root: HashMap<mark::RootRef, usize> = HashMap::new();
    for r in roots.iter().flatten() {
        *per_root.entry(*r).or_default() += 1;
    }
    let mut order: Vec<(usize, usize)> =
        candidates.into_iter().zip(roots.iter().map(|r| r.map_or(0, |r| per_root[&r]))).collect();
    order
        .sort_by_key(|&(b, under)| (reachable(b) != most_held, std::cmp::Reverse(under), blocks[b].depth, b));
    let pool = if most_held { held.max(1) } else { order.len() - held };
    let step = if most_held { 1 } else { (pool / BACKREF_OBJECTS).max(1) };
    order.iter().take(pool).step_by(step).take(BACKREF_OBJECTS).map(|&(b, _)| b).collect()
}

/// What `--backrefs` draws: the paths from roots to a few objects of one type, as objgraph's
/// `show_backrefs` does, from the marking's own retainers.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub nodes: Vec<Node>,
    /// (from, to): `from` holds a pointer to `to`.
    pub edges: Vec<(usize, usize)>,
    /// Objects of the type in the snapshot.
    pub found: u64,
}

impl Graph {
    /// The roots drawn, to be named.
    pub fn roots(&self) -> Vec<mark::RootRef> {
        self.nodes
            .iter()
            .filter_map(|n| match n.kind {
                NodeKind::Root(r) => Some(r),
                NodeKind::Block(_) => None,
            })
            .collect()
    }

    /// Labels the roots with their holders' names.
    pub fn name_roots(&mut self, holders: &HashMap<mark::RootRef, super::HolderName>) {
        for n in self.nodes.iter_mut() {
            if let NodeKind::Root(r) = n.kind {
                n.label = holders.get(&r).map_or_else(|| format!("root {}", r.root), |h| h.name.clone());
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeKind {
    Root(mark::RootRef),
    /// A block (the scan's index).
    Block(usize),
}

#[derive(Clone, Debug)]
pub struct Node {
    pub kind: NodeKind,
    /// What it is: a type and its size, or a root's name (filled in when roots are named).
    pub label: String,
    /// One of the objects asked for.
    pub target: bool,
}

/// Whether a type's name (`module.qualname`, or `qualname` for builtins) is the one asked
/// for: in full, or by its qualified name alone.
pub fn type_matches(name: &str, asked: &str) -> bool {
    name == asked || name.rsplit_once('.').is_some_and(|(_, q)| q == asked)
}

/// Builds the graph; the snapshot is read for the cycles' back edges and the labels.
pub(super) struct Backrefs<'a> {
    pub snap: &'a Snapshot,
    pub marking: &'a mark::Marking,
    pub blocks: &'a [mark::Block],
    pub groups: &'a [GroupKey],
    pub first_group: u32,
    pub heap: &'a PythonHeap,
    pub target: &'a Target,
    /// Objects' pre-headers, scanned as theirs.
    pub prefixes: &'a [mark::Prefix],
}

impl Backrefs<'_> {
    fn type_of(&self, b: usize) -> Option<&str> {
        let site = self.blocks.get(b)?.site;
        match site.checked_sub(self.first_group).and_then(|g| self.groups.get(g as usize)) {
            Some(GroupKey::Python(t)) => Some(t),
            Some(_) => None,
            None => self.heap.tracked_types.get(&site).map(String::as_str),
        }
    }

    /// Up the retainers past storage blocks (a dict's keys, a list's items) to the object
    /// that owns them, if the chain goes on.
    fn owner(&self, mut b: usize) -> usize {
        for _ in 0..4 {
            if self.type_of(b).is_some() {
                break;
            }
            match self.marking.blocks[b].retainer {
                mark::Retainer::Block { index, .. } | mark::Retainer::Clique { parent: index, .. } => {
                    b = index
                }
                _ => break,
            }
        }
        b
    }

    pub fn build(&self, asked: &str) -> Graph {
        let candidates: Vec<usize> = (0..self.blocks.len())
            .filter(|&b| self.type_of(b).is_some_and(|t| type_matches(t, asked)))
            .collect();
        let mut g = Graph { found: candidates.len() as u64, ..Graph::default() };
        let chosen = choose_drawn(&self.marking.blocks, candidates);
        let mut index: HashMap<NodeKind, usize> = HashMap::new();
        let mut node = |g: &mut Graph, kind: NodeKind| -> (usize, bool) {
            if let Some(&i) = index.get(&kind) {
                return (i, false);
            }
            g.nodes.push(Node { kind, label: String::new(), target: false });
            index.insert(kind, g.nodes.len() - 1);
            (g.nodes.len() - 1, true)
        };
        for &c in &chosen {
            let (mut cur_node, _) = node(&mut g, NodeKind::Block(c));
            g.nodes[cur_node].target = true;
            if self.marking.blocks[c].class != mark::Class::Reachable {
                self.cycle(&mut g, &mut node, c);
                continue;
            }
            let mut cur = c;
            for _ in 0..BACKREF_DEPTH {
                let (parent, kind) = match self.marking.blocks[cur].retainer {
                    mark::Retainer::Block { index, .. } | mark::Retainer::Clique { parent: index, .. } => {
                        let p = self.owner(index);
                        (Some(p), NodeKind::Block(p))
                    }
                    mark::Retainer::Root(r) => (None, NodeKind::Root(r)),
                    mark::Retainer::None => break,
                };
                let (p_node, new) = node(&mut g, kind);
                if !g.edges.contains(&(p_node, cur_node)) && p_node != cur_node {
                    g.edges.push((p_node, cur_node));
                }
                match parent {
                    Some(p) if new => {
                        cur = p;
                        cur_node = p_node;
                    }
                    _ => break,
                }
            }
        }
        for n in g.nodes.iter_mut() {
            if let NodeKind::Block(index) = n.kind {
                n.label = self.label(index);
            }
        }
        g
    }

    /// A lost object's group (its clique: what its leader reaches and nothing else does),
    /// drawn as the objects in it point at each other, their storage (an instance's values,
    /// a list's items) passed through.
    fn cycle(&self, g: &mut Graph, node: &mut dyn FnMut(&mut Graph, NodeKind) -> (usize, bool), c: usize) {
        let leader = match self.marking.blocks[c].retainer {
            mark::Retainer::Clique { leader, .. } => leader,
            _ => c,
        };
        let mut members: Vec<usize> = vec![leader];
        members.extend(
            (0..self.blocks.len())
                .filter(|&j| matches!(self.marking.blocks[j].retainer, mark::Retainer::Clique { leader: l, .. } if l == leader))
                .take(64),
        );
        let within = |v: u64| {
            members.iter().position(|&m| {
                let b = self.blocks[m];
                v >= b.start && v < b.start + b.size.max(1)
            })
        };
        // Direct pointers among the members.
        let out: Vec<Vec<usize>> = members
            .iter()
            .map(|&m| {
                let b = self.blocks[m];
                let mut words = self.words(b.start, b.size);
                if let Some(p) = self.prefixes.iter().find(|p| p.block == m) {
                    words.extend(self.words(p.start, p.end - p.start));
                }
                let mut t: Vec<usize> = words.into_iter().filter_map(within).collect();
                t.sort_unstable();
                t.dedup();
                t
            })
            .collect();
        // Object to object, through storage alone.
        let mut edges: Vec<(usize, usize)> = Vec::new();
        for (i, &m) in members.iter().enumerate() {
            if self.type_of(m).is_none() {
                continue;
            }
            let mut seen = vec![false; members.len()];
            let mut stack = out[i].clone();
            while let Some(k) = stack.pop() {
                if std::mem::replace(&mut seen[k], true) {
                    continue;
                }
                if self.type_of(members[k]).is_none() {
                    stack.extend(out[k].iter().copied());
                } else if k != i {
                    edges.push((i, k));
                }
            }
        }
        // Back references only: the objects from which `c` is reached, as objgraph draws
        // referrers, not what the objects point at.
        let Some(target) = members.iter().position(|&m| m == c) else { return };
        let mut refers = vec![false; members.len()];
        refers[target] = true;
        for _ in 0..members.len() {
            for &(a, b) in &edges {
                if refers[b] {
                    refers[a] = true;
                }
            }
        }
        for (a, b) in edges.into_iter().filter(|&(a, b)| refers[a] && refers[b]) {
            let (x, _) = node(g, NodeKind::Block(members[a]));
            let (y, _) = node(g, NodeKind::Block(members[b]));
            if !g.edges.contains(&(x, y)) {
                g.edges.push((x, y));
            }
        }
    }

    /// The words of `[start, start + len)` (at most 4 KiB of it).
    fn words(&self, start: u64, len: u64) -> Vec<u64> {
        let n = (len.min(4096) as usize) & !7;
        let mut buf = vec![0u8; n];
        if n == 0 || !self.snap.read(start, &mut buf) {
            return Vec::new();
        }
        buf.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default())).collect()
    }

    fn label(&self, b: usize) -> String {
        let mut names = TypeNames::new(&self.target.layout, self.target.unicode_type);
        match self.type_of(b) {
            Some(t) => pyroots::describe(self.snap, &mut names, self.blocks[b].start)
                .unwrap_or_else(|| t.to_string()),
            None => format!("{}-byte block", self.blocks[b].size),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mark::{BlockOutcome, Class, Retainer, RootRef, RootSlot};

    fn held(retainer: Retainer, depth: u32) -> BlockOutcome {
        BlockOutcome { class: Class::Reachable, retainer, depth, heuristic: None, indirect_bytes: 0 }
    }

    #[test]
    fn the_drawn_objects_are_those_of_the_root_that_holds_most_of_them() {
        let global = RootRef { root: 0, slot: RootSlot::Word { addr: 0x1000 } };
        let stack = RootRef { root: 3, slot: RootSlot::Word { addr: 0x7ff0 } };
        // 0: the dict the global points at; 1..=6: its bytearrays; 7: the newest bytearray,
        // which a stale stack slot reaches first (nearer a root than the dict's).
        let mut blocks = vec![held(Retainer::Root(global), 1)];
        blocks.extend((1..=6).map(|_| held(Retainer::Block { index: 0, offset: 8 }, 2)));
        blocks.push(held(Retainer::Root(stack), 1));
        let chosen = choose_drawn(&blocks, (1..=7).collect());
        assert_eq!(chosen, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn lost_objects_are_drawn_spread_over_all_of_them() {
        let lost = BlockOutcome {
            class: Class::DefinitelyLost,
            retainer: Retainer::None,
            depth: 0,
            heuristic: None,
            indirect_bytes: 0,
        };
        let blocks = vec![lost; 20];
        assert_eq!(choose_drawn(&blocks, (0..20).collect()), vec![0, 4, 8, 12, 16]);
    }
}
