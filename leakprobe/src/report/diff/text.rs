//! The comparison as people read it: a table of the changed call sites, largest growth first,
//! their stacks, and a summary line.

use std::fmt::Write as _;

use super::{Diff, SiteDiff};
use crate::{report::text::human_bytes, symbolize::Frame};

/// "+1.00 KiB", "-512 B", "0 B".
fn signed_bytes(v: i64) -> String {
    let sign = match v.signum() {
        1 => "+",
        -1 => "-",
        _ => "",
    };
    format!("{sign}{}", human_bytes(v.unsigned_abs()))
}

fn signed_rate(v: Option<f64>) -> String {
    match v {
        Some(r) if r.is_finite() => {
            let b = r.abs().round() as u64;
            let sign = if b == 0 {
                ""
            } else if r < 0.0 {
                "-"
            } else {
                "+"
            };
            format!("{sign}{}/s", human_bytes(b))
        }
        _ => "-".to_string(),
    }
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

fn frame_text(f: &Frame) -> String {
    let func = f.function.as_deref().unwrap_or("[unknown]");
    let loc = match (&f.file, f.line, f.column) {
        (Some(file), Some(line), Some(col)) => format!(" {}:{line}:{col}", basename(file)),
        (Some(file), Some(line), None) => format!(" {}:{line}", basename(file)),
        (Some(file), None, _) => format!(" {}", basename(file)),
        _ => String::new(),
    };
    let module = match &f.runtime {
        Some(rt) => format!(" [{rt}]"),
        None => f.module.as_deref().map(|m| format!(" ({})", basename(m))).unwrap_or_default(),
    };
    let inl = if f.inlined { " [inlined]" } else { "" };
    format!("{func}{loc}{module}{inl}")
}

/// Frames shown per call site in the text form.
const TEXT_FRAMES: usize = 6;

/// Renders the comparison for people. `top` limits the call sites shown.
pub fn render(d: &Diff, top: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "leakprobe diff: A = {}, B = {}", d.a.file, d.b.file);
    for (name, f) in [("A", &d.a), ("B", &d.b)] {
        let _ = writeln!(
            out,
            "  {name}: PID {} ({}, build-id {}), window from {} for {:.1} s, {} call sites",
            f.pid,
            f.exe,
            f.build_id.as_deref().unwrap_or("none"),
            f.window_start,
            f.duration_s,
            f.sites,
        );
    }
    if d.comparison == "same-run" {
        let _ = writeln!(
            out,
            "  same run, B {:.1} s after A: NEW and FREED are the allocations and frees between the \
             two snapshots (exact)",
            d.interval_s
        );
    } else {
        let _ = writeln!(
            out,
            "  separate windows (B ends {:.1} s after A): each file counts only blocks allocated in \
             its own window;\n  \u{394} compares what the two windows kept, NEW and FREED are B's own, \
             GROWTH is B's rate minus A's",
            d.interval_s
        );
    }
    if d.estimated {
        let _ = writeln!(
            out,
            "  ESTIMATES: sampled (--sample-bytes); figures are unbiased estimates, not counts"
        );
    }
    for w in &d.warnings {
        let _ = writeln!(out, "  warning: {w}");
    }
    let _ = writeln!(out);

    let changed: Vec<&SiteDiff> = d.sites.iter().filter(|s| s.changed()).collect();
    if changed.is_empty() {
        let _ = writeln!(out, "No call site changed between A and B.");
    } else {
        let _ = writeln!(
            out,
            "{:>4} {:>11} {:>9} {:>9} {:>9} {:>13}  CALL SITE",
            "", "\u{394} BYTES", "\u{394} COUNT", "NEW", "FREED", "GROWTH"
        );
        for (i, s) in changed.iter().take(top).enumerate() {
            // A Python site reads as tracemalloc's compare_to: by its innermost Python line.
            let site = match Frame::headline(&s.frames) {
                Some(f) => format!("{} in {}", s.function, frame_text(f)),
                None => format!("{} (stack not available)", s.function),
            };
            let mark = match s.status {
                "new" => " [new]",
                "gone" => " [gone]",
                _ => "",
            };
            let _ = writeln!(
                out,
                "{:>4} {:>11} {:>+9} {:>9} {:>9} {:>13}  {site}{mark}",
                format!("#{}", i + 1),
                signed_bytes(s.delta_bytes),
                s.delta_count,
                s.new_count,
                s.freed_count,
                signed_rate(s.growth_bytes_per_s),
            );
        }
        if changed.len() > top {
            let _ = writeln!(
                out,
                "     ... {} more changed call sites (raise --top, or see --format json)",
                changed.len() - top
            );
        }
        let _ = writeln!(out);
        for (i, s) in changed.iter().take(top).enumerate() {
            let _ = writeln!(
                out,
                "#{} {} in {:+} objects, {}{}:",
                i + 1,
                signed_bytes(s.delta_bytes),
                s.delta_count,
                s.function,
                match s.status {
                    "new" => " (only in B)",
                    "gone" => " (only in A)",
                    _ => "",
                }
            );
            let (ra, rb) =
                (s.a.as_ref().and_then(|x| x.reachability), s.b.as_ref().and_then(|x| x.reachability));
            if ra.is_some() || rb.is_some() {
                let (ra, rb) = (ra.unwrap_or_default(), rb.unwrap_or_default());
                let classes: Vec<String> = [
                    ("definitely lost", ra.definitely_lost, rb.definitely_lost),
                    ("indirectly lost", ra.indirectly_lost, rb.indirectly_lost),
                    ("possibly lost", ra.possibly_lost, rb.possibly_lost),
                    ("reachable", ra.reachable, rb.reachable),
                ]
                .iter()
                .filter(|(_, a, b)| a.count + b.count > 0)
                .map(|(name, a, b)| {
                    format!(
                        "{name} {} -> {}",
                        crate::report::text::human_bytes(a.bytes),
                        crate::report::text::human_bytes(b.bytes)
                    )
                })
                .collect();
                let _ = writeln!(out, "  scan classes, A -> B: {}", classes.join(", "));
            }
            for (j, f) in s.frames.iter().take(TEXT_FRAMES).enumerate() {
                let _ = writeln!(out, "    #{j} {}", frame_text(f));
            }
            if s.frames.len() > TEXT_FRAMES {
                let _ = writeln!(out, "    ... {} more frames", s.frames.len() - TEXT_FRAMES);
            }
        }
        let _ = writeln!(out);
    }
    let t = &d.totals;
    let _ = writeln!(
        out,
        "SUMMARY: {} outstanding ({:+} objects) from A to B; {} new, {} freed; {} call sites: {} \
         growing, {} shrinking, {} only in B, {} only in A, {} unchanged.",
        signed_bytes(t.delta_bytes),
        t.delta_count,
        t.new_count,
        t.freed_count,
        t.sites,
        t.growing_sites,
        t.shrinking_sites,
        t.new_sites,
        t.gone_sites,
        t.sites - changed.len(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_figures() {
        assert_eq!(signed_bytes(0), "0 B");
        assert_eq!(signed_bytes(-512), "-512 B");
        assert_eq!(signed_bytes(2048), "+2.00 KiB");
        assert_eq!(signed_bytes(i64::MIN), "-8192.0 PiB");
        assert_eq!(signed_rate(None), "-");
        assert_eq!(signed_rate(Some(-1024.0)), "-1.00 KiB/s");
        assert_eq!(signed_rate(Some(0.2)), "0 B/s");
    }
}
