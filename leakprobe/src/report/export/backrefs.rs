//! `--backrefs-svg`: the scan's reference paths to a few objects of one type, drawn as
//! objgraph's `show_backrefs` draws them (roots on top, the objects asked for at the bottom),
//! with a layout of our own: no Graphviz on the machine.
//!
//! Layers: the longest path from a node with no pointer into it, over the edges left once
//! the cycles' back edges are set aside. Order in a layer: by the mean position of the nodes
//! that point at it (the barycentre heuristic), one pass from the top. A few dozen nodes at
//! most, so nothing cleverer is needed.

use std::fmt::Write as _;

use super::ExportError;
use crate::report::{
    Report,
    scan::{BackrefNode, Backrefs},
};

const BOX_HEIGHT: f64 = 34.0;
const LAYER_GAP: f64 = 70.0;
const NODE_GAP: f64 = 28.0;
const MARGIN: f64 = 24.0;
const TITLE: f64 = 40.0;
const CHAR_WIDTH: f64 = 7.2;
/// Labels longer than this are cut (with "…"); the JSON has them whole.
const MAX_LABEL: usize = 72;

/// The picture of the last scan's `--backrefs` graph.
pub fn svg(report: &Report) -> Result<Vec<u8>, ExportError> {
    let graph = report
        .scan
        .as_ref()
        .and_then(|s| s.python_objects.as_ref())
        .and_then(|p| p.backrefs.as_ref())
        .ok_or(ExportError::NoBackrefs)?;
    // Marked as ours, so that the next run may replace it.
    Ok(crate::output::mark::svg(draw(graph).as_bytes()))
}

/// Where each node goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub layer: Vec<usize>,
    /// Left to right within its layer.
    pub order: Vec<usize>,
}

/// Layers and order (see the module doc).
pub fn layout(nodes: usize, edges: &[(usize, usize)]) -> Layout {
    let forward = acyclic(nodes, edges);
    let mut layer = vec![0usize; nodes];
    // Longest path: relax in rounds (a DAG of n nodes settles in n rounds).
    for _ in 0..nodes {
        let mut changed = false;
        for &(a, b) in &forward {
            if layer[b] < layer[a] + 1 {
                layer[b] = layer[a] + 1;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let layers = layer.iter().max().map_or(0, |m| m + 1);
    let mut order = vec![0usize; nodes];
    let mut pos = vec![0f64; nodes];
    for l in 0..layers {
        let mut members: Vec<(f64, usize)> = (0..nodes)
            .filter(|&n| layer[n] == l)
            .map(|n| {
                let parents: Vec<f64> =
                    forward.iter().filter(|e| e.1 == n && layer[e.0] < l).map(|e| pos[e.0]).collect();
                let bary = if parents.is_empty() {
                    n as f64
                } else {
                    parents.iter().sum::<f64>() / parents.len() as f64
                };
                (bary, n)
            })
            .collect();
        members.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (i, &(_, n)) in members.iter().enumerate() {
            order[n] = i;
            pos[n] = i as f64;
        }
    }
    Layout { layer, order }
}

/// The edges without the back edges of a depth-first search from the nodes nothing points at
/// (then from any node left, for groups that only point at each other).
fn acyclic(nodes: usize, edges: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut state = vec![0u8; nodes]; // 0 new, 1 on the path, 2 done
    let mut keep = Vec::new();
    let has_parent: Vec<bool> = (0..nodes).map(|n| edges.iter().any(|e| e.1 == n && e.0 != n)).collect();
    let starts = (0..nodes).filter(|&n| !has_parent[n]).chain(0..nodes);
    for s in starts {
        if state[s] != 0 {
            continue;
        }
        let mut stack = vec![(s, 0usize)];
        state[s] = 1;
        while let Some(&mut (n, ref mut i)) = stack.last_mut() {
            let out: Vec<usize> = edges.iter().filter(|e| e.0 == n).map(|e| e.1).collect();
            if let Some(&m) = out.get(*i) {
                *i += 1;
                match state[m] {
                    0 => {
                        keep.push((n, m));
                        state[m] = 1;
                        stack.push((m, 0));
                    }
                    2 => keep.push((n, m)),
                    _ => {} // back edge: a cycle
                }
            } else {
                state[n] = 2;
                stack.pop();
            }
        }
    }
    keep
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

fn shown(label: &str) -> String {
    if label.chars().count() <= MAX_LABEL {
        return label.to_string();
    }
    let cut: String = label.chars().take(MAX_LABEL - 1).collect();
    format!("{cut}…")
}

fn fill(n: &BackrefNode) -> &'static str {
    match n.kind.as_str() {
        "root" => "#d8f0d8",
        "target" => "#f6d5d5",
        _ => "#ffffff",
    }
}

/// The SVG document.
pub fn draw(g: &Backrefs) -> String {
    let lay = layout(g.nodes.len(), &g.edges);
    let labels: Vec<String> = g.nodes.iter().map(|n| shown(&n.label)).collect();
    let width_of = |i: usize| (labels[i].chars().count() as f64 * CHAR_WIDTH + 20.0).max(60.0);
    let layers = lay.layer.iter().max().map_or(0, |m| m + 1);
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); layers];
    for n in 0..g.nodes.len() {
        rows[lay.layer[n]].push(n);
    }
    for r in rows.iter_mut() {
        r.sort_by_key(|&n| lay.order[n]);
    }
    let row_width = |r: &Vec<usize>| {
        r.iter().map(|&n| width_of(n)).sum::<f64>() + NODE_GAP * r.len().saturating_sub(1) as f64
    };
    let rootless = !g.nodes.is_empty() && g.nodes.iter().all(|n| n.kind != "root");
    let title = format!(
        "References to {} of {} {} object{}{} (leakprobe --backrefs)",
        g.drawn,
        g.found,
        g.r#type,
        if g.found == 1 { "" } else { "s" },
        if rootless { ": no root reaches them" } else { "" }
    );
    let widest = rows.iter().map(row_width).fold(title.chars().count() as f64 * CHAR_WIDTH, f64::max);
    let width = widest + 2.0 * MARGIN;
    let height = TITLE + layers as f64 * (BOX_HEIGHT + LAYER_GAP) - LAYER_GAP + 2.0 * MARGIN;
    // Box of each node: (x, y, w).
    let mut boxes = vec![(0f64, 0f64, 0f64); g.nodes.len()];
    for (l, r) in rows.iter().enumerate() {
        let mut x = MARGIN + (widest - row_width(r)) / 2.0;
        let y = MARGIN + TITLE + l as f64 * (BOX_HEIGHT + LAYER_GAP);
        for &n in r {
            boxes[n] = (x, y, width_of(n));
            x += width_of(n) + NODE_GAP;
        }
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="monospace" font-size="12">
<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>
<rect width="100%" height="100%" fill="#fafafa"/>
<text x="{MARGIN}" y="{:.0}" font-size="14" font-weight="bold">{}</text>"##,
        MARGIN + 16.0,
        escape(&title)
    );
    if g.nodes.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="{MARGIN}" y="{:.0}">No {} object was found in the snapshot.</text>"#,
            MARGIN + TITLE + 16.0,
            escape(&g.r#type)
        );
    }
    for &(a, b) in &g.edges {
        let ((ax, ay, aw), (bx, by, bw)) = (boxes[a], boxes[b]);
        let (x1, x2) = (ax + aw / 2.0, bx + bw / 2.0);
        if lay.layer[b] > lay.layer[a] {
            let _ = writeln!(
                s,
                r##"<line x1="{x1:.1}" y1="{:.1}" x2="{x2:.1}" y2="{by:.1}" stroke="#555" marker-end="url(#arrow)"/>"##,
                ay + BOX_HEIGHT
            );
        } else {
            // Up or across (closing a cycle): a dashed curve from the top of `a` to the bottom
            // of `b`, on their right-hand quarter, so that it does not lie on the edge down.
            let (sx, ex) = (ax + aw * 0.75, bx + bw * 0.75);
            let (y1, y2) = if lay.layer[b] < lay.layer[a] {
                (ay, by + BOX_HEIGHT)
            } else {
                (ay + BOX_HEIGHT, by + BOX_HEIGHT)
            };
            let dip = if lay.layer[b] < lay.layer[a] { 0.0 } else { 30.0 };
            let _ = writeln!(
                s,
                r##"<path d="M {sx:.1} {y1:.1} C {:.1} {:.1}, {:.1} {:.1}, {ex:.1} {y2:.1}" fill="none" stroke="#a33" stroke-dasharray="4 3" marker-end="url(#arrow)"/>"##,
                sx + 25.0,
                y1 - 20.0 + dip * 2.0,
                ex + 25.0,
                y2 + 20.0 + dip
            );
        }
    }
    for (n, node) in g.nodes.iter().enumerate() {
        let (x, y, w) = boxes[n];
        let _ = writeln!(
            s,
            r##"<g><title>{}</title><rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{BOX_HEIGHT}" rx="6" fill="{}" stroke="#333"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text></g>"##,
            escape(&node.label),
            fill(node),
            x + w / 2.0,
            y + BOX_HEIGHT / 2.0 + 4.0,
            escape(&labels[n])
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(label: &str, kind: &str) -> BackrefNode {
        BackrefNode { label: label.into(), kind: kind.into() }
    }

    #[test]
    fn roots_are_on_top_and_the_objects_at_the_bottom() {
        // 0 root -> 1 dict -> 2 Node, 0 -> 3 list -> 2; 2 <-> 4 (a cycle).
        let edges = [(0, 1), (1, 2), (0, 3), (3, 2), (2, 4), (4, 2)];
        let l = layout(5, &edges);
        assert_eq!(l.layer, vec![0, 1, 2, 1, 3]);
        // The dict and the list share the layer, in the order their parent has them.
        assert_ne!(l.order[1], l.order[3]);
    }

    #[test]
    fn a_group_that_only_points_at_itself_still_gets_layers() {
        let l = layout(2, &[(0, 1), (1, 0)]);
        assert_eq!(l.layer, vec![0, 1]);
    }

    #[test]
    fn labels_are_escaped_and_every_node_is_drawn() {
        let g = Backrefs {
            r#type: "Node".into(),
            found: 3000,
            drawn: 1,
            nodes: vec![
                node("module __main__, global <cache> & co", "root"),
                node("__main__.Node", "target"),
            ],
            edges: vec![(0, 1)],
        };
        let svg = draw(&g);
        assert!(svg.contains("global &lt;cache&gt; &amp; co"), "{svg}");
        assert!(svg.contains(">__main__.Node</text>"), "{svg}");
        assert!(svg.contains("References to 1 of 3000 Node objects"), "{svg}");
        assert_eq!(svg.matches("<rect x=").count(), 2);
        assert_eq!(svg.matches("marker-end").count(), 1);
    }
}
