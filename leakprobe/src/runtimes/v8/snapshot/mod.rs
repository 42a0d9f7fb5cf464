//! V8 heap snapshots (`.heapsnapshot`, what `HeapProfiler.takeHeapSnapshot` streams): read,
//! compared as Chrome DevTools' Comparison view does (per constructor: #new, #deleted, #delta,
//! alloc size, freed size, size delta, matched by V8's stable object ids), and the shortest
//! retainer path from the GC roots to an object, as memlab prints it. Pure.
//!
//! The format is V8's own and undocumented: the field lists are read from the snapshot's
//! `meta`, as memlab does, never assumed. It is read as it streams ([`SnapshotReader`]), and
//! the first of two snapshots is kept only as the ids and classes the comparison needs
//! ([`Baseline`]): a heap of 1 GiB makes a snapshot of some 30 million objects.

use std::collections::{HashMap, VecDeque};

mod reader;

pub use reader::SnapshotReader;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("not a V8 heap snapshot: {0}")]
    Format(String),
    #[error("the snapshot's meta has no {0} field")]
    Field(&'static str),
}

/// One object of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node {
    /// An index into the node type names.
    pub kind: u8,
    pub name: u32,
    pub id: u32,
    pub self_size: u32,
    /// Its first edge in [`Snapshot::edges`]; it has `edge_count`.
    first_edge: u32,
    edge_count: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    pub kind: u8,
    /// A string index (property, context variable, internal) or an element index.
    pub name_or_index: u32,
    /// A node index (not a position in the flat array).
    pub to: u32,
}

/// A heap snapshot, its nodes and edges decoded.
pub struct Snapshot {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub strings: Vec<String>,
    node_types: Vec<String>,
    edge_types: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ClassKey {
    /// An object or native object: its name (a string index) is its class.
    Named(u32),
    /// Anything else: its node type.
    Typed(u8),
}

/// A snapshot reduced to what a later one is compared against: every object's id, class
/// and size (12 bytes an object, where the snapshot itself takes some 60).
pub struct Baseline {
    /// (id, class, self size), by id.
    objects: Vec<(u32, u32, u32)>,
    classes: Vec<String>,
}

impl Baseline {
    fn contains(&self, id: u32) -> bool {
        self.objects.binary_search_by_key(&id, |o| o.0).is_ok()
    }
}

fn field(fields: &[String], name: &'static str) -> Result<usize, SnapshotError> {
    fields.iter().position(|f| f == name).ok_or(SnapshotError::Field(name))
}

impl Snapshot {
    /// Reads a snapshot's JSON, whole.
    pub fn parse(json: &[u8]) -> Result<Snapshot, SnapshotError> {
        let mut r = SnapshotReader::new();
        r.feed(json)?;
        r.finish()
    }

    /// Whether objects of this node type are named by their contents (a string's characters,
    /// a number's value): those names are data, never kept or printed.
    fn type_is_data(t: &str) -> bool {
        matches!(t, "string" | "concatenated string" | "sliced string" | "number" | "regexp" | "bigint")
    }

    fn node_type(&self, n: &Node) -> &str {
        self.node_types.get(n.kind as usize).map_or("", String::as_str)
    }

    fn edge_type(&self, e: &Edge) -> &str {
        self.edge_types.get(e.kind as usize).map_or("", String::as_str)
    }

    fn string(&self, i: u32) -> &str {
        self.strings.get(i as usize).map_or("", String::as_str)
    }

    pub fn name(&self, n: &Node) -> &str {
        self.string(n.name)
    }

    /// The constructor DevTools files an object under: its class for objects and native
    /// objects, a parenthesised kind for the rest (`(closure)`, `(string)`, `(array)`, ...).
    pub fn class_name(&self, n: &Node) -> String {
        match self.node_type(n) {
            "object" | "native" => self.name(n).to_string(),
            "hidden" | "synthetic" | "object shape" => "(system)".into(),
            "code" => "(compiled code)".into(),
            "closure" => "(closure)".into(),
            "concatenated string" => "(concatenated string)".into(),
            "sliced string" => "(sliced string)".into(),
            t => format!("({t})"),
        }
    }

    pub fn edges_of(&self, n: &Node) -> &[Edge] {
        let s = n.first_edge as usize;
        &self.edges[s..s + n.edge_count as usize]
    }

    /// An edge as DevTools shows it: `name` for properties and variables, `[i]` for
    /// elements. A name that is not identifier-like (a dictionary key is data, an e-mail
    /// address say) is printed as `<key>`: the target's memory contents stay out.
    pub fn edge_label(&self, e: &Edge) -> String {
        match self.edge_type(e) {
            "element" | "hidden" => format!("[{}]", e.name_or_index),
            _ => {
                let name = self.string(e.name_or_index);
                // V8's own names for symbols (`<symbol owner_symbol>`) are no data.
                if name.starts_with("<symbol ") && name.len() <= 64 {
                    return name.to_string();
                }
                crate::runtimes::printable_name(Some(name.to_string()))
            }
        }
    }

    /// Whether a node's name is its contents (a string's characters, a number's value).
    fn name_is_data(&self, n: &Node) -> bool {
        Snapshot::type_is_data(self.node_type(n))
    }

    /// What files a node under a constructor, cheaply: its name for objects and native
    /// objects, its type for the rest (see [`Snapshot::class_name`]).
    fn class_key(&self, n: &Node) -> ClassKey {
        match self.node_type(n) {
            "object" | "native" => ClassKey::Named(n.name),
            _ => ClassKey::Typed(n.kind),
        }
    }

    fn class_of_key(&self, k: ClassKey, example: &Node) -> String {
        match k {
            ClassKey::Named(name) => self.string(name).to_string(),
            ClassKey::Typed(_) => self.class_name(example),
        }
    }

    /// What the comparison needs of a snapshot taken earlier: each object's id and class.
    pub fn baseline(&self) -> Baseline {
        let mut keys: HashMap<ClassKey, u32> = HashMap::new();
        let mut classes = Vec::new();
        let mut objects: Vec<(u32, u32, u32)> = self
            .nodes
            .iter()
            .map(|n| {
                let k = self.class_key(n);
                let c = *keys.entry(k).or_insert_with(|| {
                    classes.push(self.class_of_key(k, n));
                    classes.len() as u32 - 1
                });
                (n.id, c, n.self_size)
            })
            .collect();
        objects.sort_unstable_by_key(|o| o.0);
        Baseline { objects, classes }
    }

    /// For every node, its parent on a shortest path from the root (node 0), over strong
    /// edges: breadth first, so the first path found is a shortest one.
    pub fn shortest_parents(&self) -> Vec<Option<(u32, u32)>> {
        let mut parent: Vec<Option<(u32, u32)>> = vec![None; self.nodes.len()];
        let mut seen = vec![false; self.nodes.len()];
        let mut q = VecDeque::new();
        if self.nodes.is_empty() {
            return parent;
        }
        seen[0] = true;
        q.push_back(0u32);
        while let Some(i) = q.pop_front() {
            let n = self.nodes[i as usize];
            for (k, e) in self.edges_of(&n).iter().enumerate() {
                // Weak references retain nothing. Shortcuts duplicate a real path, except the
                // root's, which lead to the global objects as DevTools starts from them.
                let skip = match self.edge_type(e) {
                    "weak" => true,
                    "shortcut" => i != 0,
                    _ => false,
                };
                if skip || seen[e.to as usize] {
                    continue;
                }
                seen[e.to as usize] = true;
                parent[e.to as usize] = Some((i, n.first_edge + k as u32));
                q.push_back(e.to);
            }
        }
        parent
    }

    /// The path from node `i` up to the root: `(closure) handler <- [2] in (array) <- ...`.
    pub fn retainer_path(&self, parents: &[Option<(u32, u32)>], mut i: u32, max: usize) -> Option<String> {
        let label = |i: u32| {
            let n = &self.nodes[i as usize];
            let class = self.class_name(n);
            let name = self.name(n);
            if class == name || name.is_empty() || self.name_is_data(n) {
                class
            } else {
                format!("{class} {name}")
            }
        };
        let mut out = label(i);
        let mut steps = 0;
        while let Some((p, e)) = parents.get(i as usize).copied().flatten() {
            if p == 0 {
                out.push_str(" <- (GC roots)");
                return Some(out);
            }
            steps += 1;
            if steps > max {
                out.push_str(" <- ...");
                return Some(out);
            }
            let edge = self.edge_label(&self.edges[e as usize]);
            out.push_str(&format!(" <- {edge} in {}", label(p)));
            i = p;
        }
        None
    }
}

/// One row of the Comparison view.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ComparisonRow {
    pub constructor: String,
    pub new: u64,
    pub deleted: u64,
    pub delta: i64,
    pub alloc_size: u64,
    pub freed_size: u64,
    pub size_delta: i64,
    /// The shortest retainer path of one new object, for the top growing constructors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retainers: Option<String>,
}

/// DevTools' Comparison of `after` against `before`, rows by #delta then size delta, most
/// growth first; the first `paths` rows get one new object's retainer path.
pub fn compare(before: &Baseline, after: &Snapshot, paths: usize) -> Vec<ComparisonRow> {
    // New objects by class key (one name per key, made once), deleted ones by class.
    let mut new: HashMap<ClassKey, (ComparisonRow, u32)> = HashMap::new();
    for (i, n) in after.nodes.iter().enumerate() {
        if before.contains(n.id) {
            continue;
        }
        let (row, _) = new.entry(after.class_key(n)).or_insert_with(|| (ComparisonRow::default(), i as u32));
        row.new += 1;
        row.alloc_size += u64::from(n.self_size);
    }
    let mut after_ids: Vec<u32> = after.nodes.iter().map(|n| n.id).collect();
    after_ids.sort_unstable();
    let mut rows: HashMap<String, (ComparisonRow, Option<u32>)> = HashMap::new();
    for (key, (r, example)) in new {
        let name = after.class_of_key(key, &after.nodes[example as usize]);
        let (row, ex) = rows.entry(name).or_default();
        row.new += r.new;
        row.alloc_size += r.alloc_size;
        ex.get_or_insert(example);
    }
    let mut deleted: HashMap<u32, (u64, u64)> = HashMap::new();
    for &(id, class, size) in &before.objects {
        if after_ids.binary_search(&id).is_err() {
            let d = deleted.entry(class).or_default();
            d.0 += 1;
            d.1 += u64::from(size);
        }
    }
    for (class, (count, bytes)) in deleted {
        let (row, _) = rows.entry(before.classes[class as usize].clone()).or_default();
        row.deleted += count;
        row.freed_size += bytes;
    }
    let mut out: Vec<(ComparisonRow, Option<u32>)> = rows
        .into_iter()
        .map(|(name, (mut r, ex))| {
            r.constructor = name;
            r.delta = r.new as i64 - r.deleted as i64;
            r.size_delta = r.alloc_size as i64 - r.freed_size as i64;
            (r, ex)
        })
        .collect();
    out.sort_by(|(a, _), (b, _)| {
        b.delta.cmp(&a.delta).then(b.size_delta.cmp(&a.size_delta)).then(a.constructor.cmp(&b.constructor))
    });
    let parents = if paths > 0 { after.shortest_parents() } else { Vec::new() };
    out.into_iter()
        .enumerate()
        .map(|(k, (mut r, ex))| {
            if k < paths && r.delta > 0 {
                r.retainers = ex.and_then(|i| after.retainer_path(&parents, i, 12));
            }
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot in V8's layout: root -> (GC roots)-ish global -> emitter -> _events ->
    /// listeners array -> closures; `extra` closures more in the second.
    fn snapshot(closures: u32, first_id: u32) -> Vec<u8> {
        // node fields: type name id self_size edge_count trace_node_id detachedness
        let node_types = [
            "hidden",
            "array",
            "string",
            "object",
            "code",
            "closure",
            "regexp",
            "number",
            "native",
            "synthetic",
        ];
        let edge_types = ["context", "element", "property", "internal", "hidden", "shortcut", "weak"];
        let strings = [
            "",
            "(GC roots)",
            "Window",
            "EventEmitter",
            "emitter",
            "_events",
            "Object",
            "data",
            "handler",
            "weakref",
        ];
        let mut nodes: Vec<u64> = Vec::new();
        let mut edges: Vec<u64> = Vec::new();
        let nf = 7u64;
        // 0 root(synthetic) -> 1 global(object Window) -> 2 emitter -> 3 events(Object) -> 4 array -> closures
        let fixed = 5u64;
        let push_node = |nodes: &mut Vec<u64>, t: u64, name: u64, id: u64, size: u64, ec: u64| {
            nodes.extend([t, name, id, size, ec, 0, 0]);
        };
        push_node(&mut nodes, 9, 1, 1, 0, 1);
        edges.extend([3, 0, nf]); // root -[internal]-> global
        push_node(&mut nodes, 3, 2, 3, 40, 1);
        edges.extend([2, 4, 2 * nf]); // global.emitter
        push_node(&mut nodes, 3, 3, 5, 40, 1);
        edges.extend([2, 5, 3 * nf]); // emitter._events
        push_node(&mut nodes, 3, 6, 7, 40, 1);
        edges.extend([2, 7, 4 * nf]); // _events.data
        push_node(&mut nodes, 1, 0, 9, 16, u64::from(closures) + 1);
        for k in 0..u64::from(closures) {
            edges.extend([1, k, (fixed + k) * nf]);
        }
        // A weak edge from the array to the root: never a retainer.
        edges.extend([6, 9, 0]);
        for k in 0..u64::from(closures) {
            push_node(&mut nodes, 5, 8, u64::from(first_id) + 2 * k, 32, 0);
        }
        let meta = serde_json::json!({"meta": {
                "node_fields": ["type","name","id","self_size","edge_count","trace_node_id","detachedness"],
                "node_types": [node_types, "string", "number", "number", "number", "number", "number"],
                "edge_fields": ["type","name_or_index","to_node"],
                "edge_types": [edge_types, "string_or_number", "node"],
            }, "node_count": nodes.len() / 7, "edge_count": edges.len() / 3});
        v8_text(&meta, &nodes, &edges, &strings.map(String::from))
    }

    /// A snapshot's text in V8's order (header, nodes, edges, arrays of no use, strings),
    /// with its line breaks.
    fn v8_text(meta: &serde_json::Value, nodes: &[u64], edges: &[u64], strings: &[String]) -> Vec<u8> {
        // V8's line breaks: a node or edge a line, the break before its comma.
        let ints = |v: &[u64], per: usize| {
            v.chunks(per)
                .map(|r| r.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
                .collect::<Vec<_>>()
                .join("\n,")
        };
        format!(
            "{{\"snapshot\":{meta},\n\"nodes\":[{}],\n\"edges\":[{}],\n\"trace_function_infos\":[],\n\"trace_tree\":[1,[2,[]]],\n\"samples\":[],\n\"strings\":{}}}",
            ints(nodes, 7),
            ints(edges, 3),
            serde_json::to_string(strings).unwrap()
        )
        .into_bytes()
    }

    /// A text of the form [`v8_text`] writes, from its parts as JSON values.
    fn from_value(v: &serde_json::Value) -> Vec<u8> {
        let ints = |k: &str| v[k].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect::<Vec<_>>();
        let strings: Vec<String> = serde_json::from_value(v["strings"].clone()).unwrap();
        v8_text(&v["snapshot"], &ints("nodes"), &ints("edges"), &strings)
    }

    fn to_value(text: &[u8]) -> serde_json::Value {
        serde_json::from_slice(text).unwrap()
    }

    #[test]
    fn the_comparison_counts_new_and_deleted_objects_by_constructor() {
        let a = Snapshot::parse(&snapshot(3, 101)).unwrap();
        // The same three closures (ids 101, 103, 105) and 1000 more.
        let b = Snapshot::parse(&snapshot(1003, 101)).unwrap();
        let rows = compare(&a.baseline(), &b, 1);
        let top = &rows[0];
        assert_eq!((top.constructor.as_str(), top.new, top.deleted, top.delta), ("(closure)", 1000, 0, 1000));
        assert_eq!((top.alloc_size, top.size_delta), (32_000, 32_000));
        assert_eq!(
            top.retainers.as_deref(),
            Some(
                "(closure) handler <- [3] in (array) <- data in Object <- _events in EventEmitter <- emitter in Window <- (GC roots)"
            )
        );
        // Nothing else changed.
        assert!(rows[1..].iter().all(|r| r.delta == 0 && r.new == 0));
        // The other way round: the closures were deleted.
        let back = compare(&b.baseline(), &a, 0);
        let c = back.iter().find(|r| r.constructor == "(closure)").unwrap();
        assert_eq!((c.deleted, c.delta, c.freed_size), (1000, -1000, 32_000));
    }

    #[test]
    fn retainer_paths_print_no_string_contents_or_data_keys() {
        let mut v = to_value(&snapshot(2, 101));
        // The first closure becomes a string "alice@example.com", held under the property
        // "bob@example.com" instead of an element.
        let strings = v["strings"].as_array_mut().unwrap();
        strings.push("alice@example.com".into());
        strings.push("bob@example.com".into());
        let (alice, bob) = (strings.len() as u64 - 2, strings.len() as u64 - 1);
        let nodes = v["nodes"].as_array_mut().unwrap();
        let first = 5 * 7;
        nodes[first] = 2.into(); // type string
        nodes[first + 1] = alice.into();
        let edges = v["edges"].as_array_mut().unwrap();
        let e = 4 * 3;
        edges[e] = 2.into(); // property
        edges[e + 1] = bob.into();
        let s = Snapshot::parse(&from_value(&v)).unwrap();
        let parents = s.shortest_parents();
        let path = s.retainer_path(&parents, 5, 12).unwrap();
        assert_eq!(
            path,
            "(string) <- <key> in (array) <- data in Object <- _events in EventEmitter <- emitter in Window <- (GC roots)"
        );
    }

    #[test]
    fn malformed_snapshots_are_refused() {
        assert!(matches!(Snapshot::parse(b"{}"), Err(SnapshotError::Format(_))));
        let mut v = to_value(&snapshot(1, 1));
        v["nodes"].as_array_mut().unwrap().pop();
        assert!(Snapshot::parse(&from_value(&v)).is_err());
        let mut v = to_value(&snapshot(1, 1));
        v["snapshot"]["meta"]["node_fields"][2] = "ident".into();
        assert_eq!(Snapshot::parse(&from_value(&v)).err(), Some(SnapshotError::Field("id")));
        let mut v = to_value(&snapshot(1, 1));
        v["edges"].as_array_mut().unwrap()[2] = (7 * 100).into();
        assert!(Snapshot::parse(&from_value(&v)).is_err(), "an edge past the last node");
        // Cut short anywhere: refused, never a partial snapshot.
        let text = snapshot(3, 1);
        for cut in [10, text.len() / 2, text.len() - 30] {
            assert!(Snapshot::parse(&text[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_snapshot_fed_in_pieces_of_any_size_reads_the_same_and_keeps_no_data_strings() {
        let mut v = to_value(&snapshot(4, 101));
        // The first closure becomes a string whose characters are data (and have escapes).
        let strings = v["strings"].as_array_mut().unwrap();
        strings.push("sec\"ret\u{e9}\n".into());
        let secret = strings.len() as u64 - 1;
        let nodes = v["nodes"].as_array_mut().unwrap();
        nodes[5 * 7] = 2.into();
        nodes[5 * 7 + 1] = secret.into();
        let text = from_value(&v);
        let whole = Snapshot::parse(&text).unwrap();
        assert_eq!(whole.nodes.len(), 9);
        assert_eq!(whole.name(&whole.nodes[6]), "handler");
        assert_eq!(whole.strings[secret as usize], "", "a string's characters are not kept");
        for size in [1, 2, 3, 7, 64] {
            let mut r = SnapshotReader::new();
            for piece in text.chunks(size) {
                r.feed(piece).unwrap();
            }
            let s = r.finish().unwrap();
            assert_eq!(
                (s.nodes.clone(), s.edges.clone(), s.strings.clone()),
                (whole.nodes.clone(), whole.edges.clone(), whole.strings.clone()),
                "pieces of {size}"
            );
        }
    }
}
