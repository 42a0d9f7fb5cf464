//! A heap snapshot read as V8 streams it, chunk by chunk, never holding its text: the node
//! and edge arrays go straight into their compact forms (24 and 12 bytes a record instead of
//! the text's ~25 and ~15 and a parser's 8 bytes a field), and of the strings only those
//! that name something are kept (a class, a property, a variable). A string's characters
//! and a number's value are data: they are passed over, never stored. Pure.
//!
//! V8 writes `{"snapshot":{"meta":{...},...},"nodes":[...],"edges":[...],
//! "trace_function_infos":[...],...,"strings":[...]}`: the header is read whole, then each
//! array by its key; arrays this reader has no use for are skipped.

use super::{Edge, Node, Snapshot, SnapshotError, field};

#[derive(serde::Deserialize)]
struct Meta {
    node_fields: Vec<String>,
    node_types: Vec<serde_json::Value>,
    edge_fields: Vec<String>,
    edge_types: Vec<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct Counts {
    meta: Meta,
    #[serde(default)]
    node_count: usize,
    #[serde(default)]
    edge_count: usize,
}

#[derive(serde::Deserialize)]
struct Header {
    snapshot: Counts,
}

/// The longest header accepted (V8's is a few KiB).
const MAX_HEADER: usize = 1 << 20;

/// Where a record's fields are, from the meta.
struct Layout {
    nf: usize,
    ef: usize,
    n_type: usize,
    n_name: usize,
    n_id: usize,
    n_size: usize,
    n_edges: usize,
    e_type: usize,
    e_name: usize,
    e_to: usize,
    /// Node types whose name is the object's contents (strings, numbers).
    data_named: Vec<bool>,
    /// Edge types whose `name_or_index` is an index, not a string.
    indexed: Vec<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    /// Between arrays: reading the next key.
    Key,
    Nodes,
    Edges,
    Strings,
    /// An array of no use here, `depth` brackets deep.
    Skip(u32),
    Done,
}

/// Feeds on the snapshot's text in pieces of any size; [`SnapshotReader::finish`] gives the
/// [`Snapshot`].
pub struct SnapshotReader {
    state: State,
    /// The header, then the key before each array.
    text: Vec<u8>,
    layout: Option<Layout>,
    node_types: Vec<String>,
    edge_types: Vec<String>,
    /// The number being read, and the current record's fields.
    number: Option<u64>,
    record: Vec<u64>,
    nodes: Vec<Node>,
    edges: Vec<Edge>,
    /// Edges the nodes so far claim.
    claimed_edges: u64,
    /// Strings that name something (bit per string index).
    needed: Vec<u64>,
    strings: Vec<String>,
    /// The string being read (its JSON text, quotes included), and whether the last byte
    /// was an unescaped backslash.
    string: Vec<u8>,
    in_string: bool,
    escaped: bool,
}

impl Default for SnapshotReader {
    fn default() -> Self {
        Self::new()
    }
}

fn bad(why: &str) -> SnapshotError {
    SnapshotError::Format(why.to_string())
}

impl SnapshotReader {
    pub fn new() -> SnapshotReader {
        SnapshotReader {
            state: State::Header,
            text: Vec::new(),
            layout: None,
            node_types: Vec::new(),
            edge_types: Vec::new(),
            number: None,
            record: Vec::new(),
            nodes: Vec::new(),
            edges: Vec::new(),
            claimed_edges: 0,
            needed: Vec::new(),
            strings: Vec::new(),
            string: Vec::new(),
            in_string: false,
            escaped: false,
        }
    }

    /// The next piece of the snapshot's text.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), SnapshotError> {
        for &b in chunk {
            match self.state {
                State::Header => self.header_byte(b)?,
                State::Key => self.key_byte(b),
                State::Nodes | State::Edges => self.number_byte(b)?,
                State::Strings => self.string_byte(b)?,
                State::Skip(depth) => match b {
                    b'[' => self.state = State::Skip(depth + 1),
                    b']' if depth == 1 => self.state = State::Key,
                    b']' => self.state = State::Skip(depth - 1),
                    _ => {}
                },
                State::Done => {}
            }
        }
        Ok(())
    }

    fn header_byte(&mut self, b: u8) -> Result<(), SnapshotError> {
        self.text.push(b);
        const NODES: &[u8] = b"\"nodes\":[";
        if !self.text.ends_with(NODES) {
            if self.text.len() > MAX_HEADER {
                return Err(bad("no node array in the first MiB"));
            }
            return Ok(());
        }
        // `{"snapshot":{...},` and the key: the object without its arrays.
        let mut head = self.text[..self.text.len() - NODES.len()].to_vec();
        while head.last().is_some_and(|c| c.is_ascii_whitespace() || *c == b',') {
            head.pop();
        }
        head.push(b'}');
        let header: Header = serde_json::from_slice(&head).map_err(|e| bad(&e.to_string()))?;
        self.set_layout(header.snapshot)?;
        self.text.clear();
        self.state = State::Nodes;
        Ok(())
    }

    fn set_layout(&mut self, c: Counts) -> Result<(), SnapshotError> {
        let m = &c.meta;
        let types = |v: &[serde_json::Value]| -> Vec<String> {
            v.first()
                .and_then(|t| t.as_array())
                .map(|a| a.iter().map(|s| s.as_str().unwrap_or("").to_string()).collect())
                .unwrap_or_default()
        };
        self.node_types = types(&m.node_types);
        self.edge_types = types(&m.edge_types);
        let (nf, ef) = (m.node_fields.len(), m.edge_fields.len());
        if nf == 0 || ef == 0 {
            return Err(bad("no node or edge fields"));
        }
        self.layout = Some(Layout {
            nf,
            ef,
            n_type: field(&m.node_fields, "type")?,
            n_name: field(&m.node_fields, "name")?,
            n_id: field(&m.node_fields, "id")?,
            n_size: field(&m.node_fields, "self_size")?,
            n_edges: field(&m.node_fields, "edge_count")?,
            e_type: field(&m.edge_fields, "type")?,
            e_name: field(&m.edge_fields, "name_or_index")?,
            e_to: field(&m.edge_fields, "to_node")?,
            data_named: self.node_types.iter().map(|t| Snapshot::type_is_data(t)).collect(),
            indexed: self.edge_types.iter().map(|t| matches!(t.as_str(), "element" | "hidden")).collect(),
        });
        // V8 gives the counts: the arrays are sized once (a big heap's are gigabytes).
        self.nodes.reserve_exact(c.node_count.min(1 << 28));
        self.edges.reserve_exact(c.edge_count.min(1 << 30));
        Ok(())
    }

    fn key_byte(&mut self, b: u8) {
        match b {
            b'[' => {
                let key = String::from_utf8_lossy(&self.text);
                self.state = if key.contains("\"edges\"") {
                    State::Edges
                } else if key.contains("\"strings\"") {
                    State::Strings
                } else {
                    State::Skip(1)
                };
                self.text.clear();
            }
            b'}' => self.state = State::Done,
            _ if self.text.len() < 256 => self.text.push(b),
            _ => {}
        }
    }

    fn number_byte(&mut self, b: u8) -> Result<(), SnapshotError> {
        match b {
            b'0'..=b'9' => {
                let n = self.number.unwrap_or(0);
                let n = n.checked_mul(10).and_then(|n| n.checked_add(u64::from(b - b'0')));
                self.number = Some(n.ok_or_else(|| bad("a number too large"))?);
            }
            b',' | b']' | b' ' | b'\n' | b'\r' | b'\t' => {
                // V8 breaks its lines before the comma (`...,0\n,1,...`).
                if let Some(n) = self.number.take() {
                    self.record.push(n);
                    self.record_done()?;
                }
                if b == b']' {
                    if !self.record.is_empty() {
                        return Err(bad("node or edge arrays do not match their fields"));
                    }
                    self.state = State::Key;
                }
            }
            _ => return Err(bad("a node or edge field that is not a number")),
        }
        Ok(())
    }

    fn record_done(&mut self) -> Result<(), SnapshotError> {
        let Some(l) = self.layout.as_ref() else { return Err(bad("no meta")) };
        if self.state == State::Nodes && self.record.len() == l.nf {
            let r = &self.record;
            let kind = r[l.n_type];
            if !l.data_named.get(kind as usize).copied().unwrap_or(true) {
                mark(&mut self.needed, r[l.n_name]);
            }
            self.nodes.push(Node {
                kind: kind.min(255) as u8,
                name: r[l.n_name] as u32,
                id: r[l.n_id] as u32,
                self_size: r[l.n_size].min(u64::from(u32::MAX)) as u32,
                first_edge: self.claimed_edges as u32,
                edge_count: r[l.n_edges] as u32,
            });
            self.claimed_edges += r[l.n_edges];
            self.record.clear();
        } else if self.state == State::Edges && self.record.len() == l.ef {
            let r = &self.record;
            let (kind, to) = (r[l.e_type], r[l.e_to]);
            if !to.is_multiple_of(l.nf as u64) || to / l.nf as u64 >= self.nodes.len() as u64 {
                return Err(bad("an edge points past the last node"));
            }
            if !l.indexed.get(kind as usize).copied().unwrap_or(true) {
                mark(&mut self.needed, r[l.e_name]);
            }
            self.edges.push(Edge {
                kind: kind.min(255) as u8,
                name_or_index: r[l.e_name] as u32,
                to: (to / l.nf as u64) as u32,
            });
            self.record.clear();
        }
        Ok(())
    }

    fn string_byte(&mut self, b: u8) -> Result<(), SnapshotError> {
        if !self.in_string {
            match b {
                b'"' => {
                    self.in_string = true;
                    self.string.clear();
                    self.string.push(b);
                }
                b']' => self.state = State::Key,
                _ => {}
            }
            return Ok(());
        }
        let i = self.strings.len() as u64;
        let keep = is_marked(&self.needed, i);
        if keep {
            self.string.push(b);
        }
        if self.escaped {
            self.escaped = false;
        } else if b == b'\\' {
            self.escaped = true;
        } else if b == b'"' {
            self.in_string = false;
            let s = if keep {
                serde_json::from_slice::<String>(&self.string).map_err(|e| bad(&e.to_string()))?
            } else {
                String::new()
            };
            self.strings.push(s);
        }
        Ok(())
    }

    /// The snapshot, once all of it has been fed.
    pub fn finish(self) -> Result<Snapshot, SnapshotError> {
        if self.layout.is_none() {
            return Err(bad("no header"));
        }
        if self.state != State::Done && self.state != State::Key {
            return Err(bad("the snapshot ends early"));
        }
        if self.claimed_edges != self.edges.len() as u64 {
            return Err(bad("the nodes' edge counts do not add up to the edges"));
        }
        Ok(Snapshot {
            nodes: self.nodes,
            edges: self.edges,
            strings: self.strings,
            node_types: self.node_types,
            edge_types: self.edge_types,
        })
    }
}

fn mark(bits: &mut Vec<u64>, i: u64) {
    // Indices are u32s (a bogus one past that is not kept: at most 512 MiB of bits).
    if i > u64::from(u32::MAX) {
        return;
    }
    let (w, b) = ((i / 64) as usize, i % 64);
    if w >= bits.len() {
        bits.resize(w + 1, 0);
    }
    bits[w] |= 1 << b;
}

fn is_marked(bits: &[u64], i: u64) -> bool {
    bits.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0)
}
