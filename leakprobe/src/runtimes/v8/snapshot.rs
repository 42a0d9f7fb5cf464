//! V8 heap snapshots (`.heapsnapshot`, what `HeapProfiler.takeHeapSnapshot` streams): read,
//! compared as Chrome DevTools' Comparison view does (per constructor: #new, #deleted, #delta,
//! alloc size, freed size, size delta, matched by V8's stable object ids), and the shortest
//! retainer path from the GC roots to an object, as memlab prints it. Pure.
//!
//! The format is V8's own and undocumented: the field lists are read from the snapshot's
//! `meta`, as memlab does, never assumed.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::Deserialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("not a V8 heap snapshot: {0}")]
    Format(String),
    #[error("the snapshot's meta has no {0} field")]
    Field(&'static str),
}

#[derive(Deserialize)]
struct Meta {
    node_fields: Vec<String>,
    node_types: Vec<serde_json::Value>,
    edge_fields: Vec<String>,
    edge_types: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct Header {
    meta: Meta,
}

#[derive(Deserialize)]
struct Raw {
    snapshot: Header,
    nodes: Vec<u64>,
    edges: Vec<u64>,
    strings: Vec<String>,
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

fn field(fields: &[String], name: &'static str) -> Result<usize, SnapshotError> {
    fields.iter().position(|f| f == name).ok_or(SnapshotError::Field(name))
}

impl Snapshot {
    /// Reads a snapshot's JSON.
    pub fn parse(json: &[u8]) -> Result<Snapshot, SnapshotError> {
        let raw: Raw = serde_json::from_slice(json).map_err(|e| SnapshotError::Format(e.to_string()))?;
        let m = &raw.snapshot.meta;
        let types = |v: &[serde_json::Value]| -> Vec<String> {
            v.first()
                .and_then(|t| t.as_array())
                .map(|a| a.iter().map(|s| s.as_str().unwrap_or("").to_string()).collect())
                .unwrap_or_default()
        };
        let (nf, ef) = (m.node_fields.len(), m.edge_fields.len());
        if nf == 0 || ef == 0 || !raw.nodes.len().is_multiple_of(nf) || !raw.edges.len().is_multiple_of(ef) {
            return Err(SnapshotError::Format("node or edge arrays do not match their fields".into()));
        }
        let (n_type, n_name, n_id, n_size, n_edges) = (
            field(&m.node_fields, "type")?,
            field(&m.node_fields, "name")?,
            field(&m.node_fields, "id")?,
            field(&m.node_fields, "self_size")?,
            field(&m.node_fields, "edge_count")?,
        );
        let (e_type, e_name, e_to) = (
            field(&m.edge_fields, "type")?,
            field(&m.edge_fields, "name_or_index")?,
            field(&m.edge_fields, "to_node")?,
        );
        let mut nodes = Vec::with_capacity(raw.nodes.len() / nf);
        let mut first = 0u64;
        for n in raw.nodes.chunks_exact(nf) {
            nodes.push(Node {
                kind: n[n_type] as u8,
                name: n[n_name] as u32,
                id: n[n_id] as u32,
                self_size: n[n_size].min(u64::from(u32::MAX)) as u32,
                first_edge: first as u32,
                edge_count: n[n_edges] as u32,
            });
            first += n[n_edges];
        }
        if first as usize != raw.edges.len() / ef {
            return Err(SnapshotError::Format("the nodes' edge counts do not add up to the edges".into()));
        }
        let edges = raw
            .edges
            .chunks_exact(ef)
            .map(|e| Edge {
                kind: e[e_type] as u8,
                name_or_index: e[e_name] as u32,
                to: (e[e_to] as usize / nf) as u32,
            })
            .collect::<Vec<_>>();
        if edges.iter().any(|e| e.to as usize >= nodes.len()) {
            return Err(SnapshotError::Format("an edge points past the last node".into()));
        }
        Ok(Snapshot {
            nodes,
            edges,
            strings: raw.strings,
            node_types: types(&m.node_types),
            edge_types: types(&m.edge_types),
        })
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
        matches!(
            self.node_type(n),
            "string" | "concatenated string" | "sliced string" | "number" | "regexp" | "bigint"
        )
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
pub fn compare(before: &Snapshot, after: &Snapshot, paths: usize) -> Vec<ComparisonRow> {
    let before_ids: HashMap<u32, usize> = before.nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    let after_ids: HashSet<u32> = after.nodes.iter().map(|n| n.id).collect();
    let mut rows: HashMap<String, (ComparisonRow, Option<u32>)> = HashMap::new();
    for (i, n) in after.nodes.iter().enumerate() {
        if before_ids.contains_key(&n.id) {
            continue;
        }
        let (row, example) = rows.entry(after.class_name(n)).or_default();
        row.new += 1;
        row.alloc_size += u64::from(n.self_size);
        example.get_or_insert(i as u32);
    }
    for n in &before.nodes {
        if after_ids.contains(&n.id) {
            continue;
        }
        let (row, _) = rows.entry(before.class_name(n)).or_default();
        row.deleted += 1;
        row.freed_size += u64::from(n.self_size);
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
        serde_json::to_vec(&serde_json::json!({
            "snapshot": {"meta": {
                "node_fields": ["type","name","id","self_size","edge_count","trace_node_id","detachedness"],
                "node_types": [node_types, "string", "number", "number", "number", "number", "number"],
                "edge_fields": ["type","name_or_index","to_node"],
                "edge_types": [edge_types, "string_or_number", "node"],
            }, "node_count": nodes.len() / 7, "edge_count": edges.len() / 3},
            "nodes": nodes, "edges": edges, "strings": strings,
        }))
        .unwrap()
    }

    #[test]
    fn the_comparison_counts_new_and_deleted_objects_by_constructor() {
        let a = Snapshot::parse(&snapshot(3, 101)).unwrap();
        // The same three closures (ids 101, 103, 105) and 1000 more.
        let b = Snapshot::parse(&snapshot(1003, 101)).unwrap();
        let rows = compare(&a, &b, 1);
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
        let back = compare(&b, &a, 0);
        let c = back.iter().find(|r| r.constructor == "(closure)").unwrap();
        assert_eq!((c.deleted, c.delta, c.freed_size), (1000, -1000, 32_000));
    }

    #[test]
    fn retainer_paths_print_no_string_contents_or_data_keys() {
        let mut v: serde_json::Value = serde_json::from_slice(&snapshot(2, 101)).unwrap();
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
        let s = Snapshot::parse(&serde_json::to_vec(&v).unwrap()).unwrap();
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
        let mut v: serde_json::Value = serde_json::from_slice(&snapshot(1, 1)).unwrap();
        v["nodes"].as_array_mut().unwrap().pop();
        assert!(Snapshot::parse(&serde_json::to_vec(&v).unwrap()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&snapshot(1, 1)).unwrap();
        v["snapshot"]["meta"]["node_fields"][2] = "ident".into();
        assert_eq!(Snapshot::parse(&serde_json::to_vec(&v).unwrap()).err(), Some(SnapshotError::Field("id")));
    }
}
