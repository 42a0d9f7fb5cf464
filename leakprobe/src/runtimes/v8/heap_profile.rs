//! V8's sampling heap profile (CDP `HeapProfiler.getSamplingProfile`) turned into call sites
//! with the same cumulative counters the kernel side keeps for native ones. Pure.
//!
//! Each profile lists the sampled objects still alive, each with a unique `ordinal` and the
//! node of the allocating JavaScript stack. Between two profiles, an ordinal that appears was
//! allocated, one that is gone was collected. Each sample's size is V8's own estimate of the
//! bytes it stands for (measured on Node 20: about the interval for small objects), so bytes
//! are estimates, like `--sample-bytes`; counts are the sampled objects.

use std::collections::{HashMap, HashSet};

use leakprobe_common::{AllocKind, SiteCounters, SiteKey};
use serde::Deserialize;

/// `Runtime.CallFrame`: line and column are 0-based.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct CallFrame {
    pub function_name: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub line_number: i64,
    #[serde(default)]
    pub column_number: i64,
}

/// `HeapProfiler.SamplingHeapProfileNode`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub call_frame: CallFrame,
    pub id: u64,
    #[serde(default)]
    pub children: Vec<Node>,
}

/// `HeapProfiler.SamplingHeapProfileSample`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    pub size: u64,
    pub node_id: u64,
    pub ordinal: f64,
}

/// `HeapProfiler.SamplingHeapProfile`.
#[derive(Clone, Debug, Deserialize)]
pub struct Profile {
    pub head: Node,
    #[serde(default)]
    pub samples: Vec<Sample>,
}

impl Profile {
    /// Each node's stack, innermost first, without V8's synthetic root: by node id.
    fn stacks(&self) -> HashMap<u64, Vec<CallFrame>> {
        let mut out = HashMap::new();
        // (node, its callers' stack outermost first)
        let mut todo: Vec<(&Node, Vec<CallFrame>)> = vec![(&self.head, Vec::new())];
        while let Some((n, mut path)) = todo.pop() {
            if n.call_frame.function_name != "(root)" || !path.is_empty() {
                path.push(n.call_frame.clone());
            }
            for c in &n.children {
                todo.push((c, path.clone()));
            }
            out.insert(n.id, path.into_iter().rev().collect());
        }
        out
    }
}

/// One live sampled object: its site and what it stands for.
#[derive(Clone, Copy, Debug)]
struct Live {
    site: u64,
    bytes: u64,
    count: u64,
}

/// The JavaScript heap's call sites, from successive profiles.
#[derive(Debug, Default)]
pub struct JsHeapSites {
    live: HashMap<u64, Live>,
    counters: HashMap<u64, SiteCounters>,
    stacks: HashMap<u64, Vec<CallFrame>>,
}

/// FNV-1a over a stack's frames: the site's stack id (its key's kind keeps it apart from the
/// native stacks' ids).
fn stack_id(frames: &[CallFrame]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h = (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for f in frames {
        eat(f.function_name.as_bytes());
        eat(&[0]);
        eat(f.url.as_bytes());
        eat(&f.line_number.to_le_bytes());
        eat(&f.column_number.to_le_bytes());
    }
    h.max(1)
}

impl JsHeapSites {
    pub fn new() -> Self {
        JsHeapSites::default()
    }

    /// Takes the live samples of a new profile: new ordinals are allocations, vanished ones
    /// frees.
    pub fn update(&mut self, p: &Profile) {
        let stacks = p.stacks();
        let mut seen = HashSet::with_capacity(p.samples.len());
        for s in &p.samples {
            let ordinal = s.ordinal as u64;
            seen.insert(ordinal);
            if self.live.contains_key(&ordinal) {
                continue;
            }
            let Some(stack) = stacks.get(&s.node_id) else { continue };
            let site = stack_id(stack);
            self.stacks.entry(site).or_insert_with(|| stack.clone());
            // V8 reports each sample's size already scaled to the bytes it stands for; the
            // object's own size cannot be recovered from it, so it counts as one object.
            let (bytes, count) = (s.size, 1);
            let c = self.counters.entry(site).or_default();
            c.alloc_bytes += bytes;
            c.alloc_count += count;
            self.live.insert(ordinal, Live { site, bytes, count });
        }
        let gone: Vec<u64> = self.live.keys().filter(|o| !seen.contains(o)).copied().collect();
        for o in gone {
            if let Some(l) = self.live.remove(&o) {
                let c = self.counters.entry(l.site).or_default();
                c.free_bytes += l.bytes;
                c.free_count += l.count;
            }
        }
    }

    /// Every site's cumulative counters, keyed as the tracker keys native sites.
    pub fn sites(&self) -> Vec<(SiteKey, SiteCounters)> {
        self.counters
            .iter()
            .map(|(&id, c)| (SiteKey { stack_id: id, kind: AllocKind::JsHeap as u32, tgid: 0 }, *c))
            .collect()
    }

    /// The stack of a site, innermost first.
    pub fn stack(&self, id: u64) -> Option<&[CallFrame]> {
        self.stacks.get(&id).map(Vec::as_slice)
    }

    /// Live sampled objects now.
    pub fn live_samples(&self) -> usize {
        self.live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> Profile {
        serde_json::from_value(json).unwrap()
    }

    fn frame(name: &str, line: i64) -> serde_json::Value {
        serde_json::json!({"functionName": name, "scriptId": "1", "url": "file:///srv/app.js", "lineNumber": line, "columnNumber": 4})
    }

    fn tree() -> serde_json::Value {
        serde_json::json!({
            "callFrame": {"functionName": "(root)", "scriptId": "0", "url": "", "lineNumber": -1, "columnNumber": -1},
            "selfSize": 0, "id": 1,
            "children": [{
                "callFrame": frame("handle", 10), "selfSize": 0, "id": 2,
                "children": [
                    {"callFrame": frame("subscribe", 20), "selfSize": 0, "id": 3, "children": []},
                    {"callFrame": frame("churn", 30), "selfSize": 0, "id": 4, "children": []}
                ]
            }]
        })
    }

    #[test]
    fn new_ordinals_are_allocations_and_vanished_ones_frees() {
        let mut sites = JsHeapSites::new();
        let p1 = profile(serde_json::json!({"head": tree(), "samples": [
            {"size": 100, "nodeId": 3, "ordinal": 1.0},
            {"size": 100, "nodeId": 4, "ordinal": 2.0},
        ]}));
        sites.update(&p1);
        let p2 = profile(serde_json::json!({"head": tree(), "samples": [
            {"size": 100, "nodeId": 3, "ordinal": 1.0},
            {"size": 100, "nodeId": 3, "ordinal": 3.0},
        ]}));
        sites.update(&p2);
        let by_name = |name: &str| {
            sites
                .sites()
                .into_iter()
                .find(|(k, _)| sites.stack(k.stack_id).unwrap()[0].function_name == name)
                .unwrap()
                .1
        };
        let sub = by_name("subscribe");
        let churn = by_name("churn");
        // Each sample stands for its (already scaled) size, and counts once.
        assert_eq!((sub.alloc_bytes, sub.free_bytes, sub.alloc_count), (200, 0, 2));
        assert_eq!((churn.alloc_bytes, churn.free_bytes, churn.free_count), (100, 100, 1));
        assert_eq!(sites.live_samples(), 2);
        // Stacks innermost first, without the root.
        let stack = sites
            .stack(
                sites
                    .sites()
                    .iter()
                    .find(|(k, _)| sites.stack(k.stack_id).unwrap()[0].function_name == "subscribe")
                    .unwrap()
                    .0
                    .stack_id,
            )
            .unwrap();
        assert_eq!(
            stack.iter().map(|f| f.function_name.as_str()).collect::<Vec<_>>(),
            ["subscribe", "handle"]
        );
        assert!(sites.sites().iter().all(|(k, _)| k.kind == AllocKind::JsHeap as u32));
    }
}
