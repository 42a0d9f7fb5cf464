//! Outstanding bytes by stack: folded stacks (Brendan Gregg's format, which inferno, speedscope
//! and flamegraph.pl read) and an SVG flame graph drawn by inferno.
//!
//! Stacks run root first; the allocation function (malloc, mmap, ...) is the leaf frame, so
//! one call site is one line.

use std::collections::BTreeMap;

use inferno::flamegraph::{self, color::BasicPalette};

use super::{ExportError, frame_label};
use crate::report::Report;

/// A frame name that cannot break the format: `;` separates frames and a line is a stack.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            ';' => ':',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect()
}

/// One line per distinct stack with outstanding bytes (`root;...;leaf;malloc BYTES`), sorted.
pub fn folded(report: &Report) -> String {
    let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
    for site in report.sites.iter().filter(|s| s.outstanding_bytes > 0) {
        let mut names: Vec<String> =
            site.frames.iter().rev().map(|f| sanitize(&frame_label(f, report))).collect();
        if names.is_empty() {
            names.push("[no stack]".into());
        }
        names.push(sanitize(&site.function));
        let total = stacks.entry(names.join(";")).or_default();
        *total = total.saturating_add(site.outstanding_bytes);
    }
    stacks.into_iter().map(|(stack, bytes)| format!("{stack} {bytes}\n")).collect()
}

/// The folded-stacks file: [`folded`] under leakprobe's authorship line.
pub fn folded_file(report: &Report) -> String {
    crate::output::mark::folded_header() + &folded(report)
}

/// What the graph measures, over which window, and whether the figures are estimates. Short:
/// inferno centres it on one line.
fn subtitle(report: &Report) -> String {
    let how = if report.sampling.estimated {
        format!("estimated (sampled, 1 per {} bytes)", report.sampling.sample_bytes)
    } else {
        "exact".to_string()
    };
    let degraded = if report.degraded { "; DEGRADED: events dropped" } else { "" };
    let exe = report.target.exe.rsplit('/').next().unwrap_or(&report.target.exe);
    format!(
        "{} bytes in {} objects not freed, allocated in {:.1} s from {}; PID {} ({exe}); {how}{degraded}",
        report.totals.outstanding_bytes,
        report.totals.outstanding_count,
        report.window.duration_s,
        report.window.start,
        report.target.pid,
    )
}

pub const TITLE: &str = "Outstanding memory by call site (leakprobe)";

/// The flame graph of outstanding bytes, as SVG.
pub fn svg(report: &Report) -> Result<Vec<u8>, ExportError> {
    let folded = folded(report);
    let mut out = Vec::new();
    if folded.is_empty() {
        // inferno refuses an empty graph; say plainly that there is nothing to draw.
        out.extend_from_slice(
            format!(
                "<?xml version=\"1.0\" standalone=\"no\"?>\n\
                 <svg version=\"1.1\" width=\"800\" height=\"60\" xmlns=\"http://www.w3.org/2000/svg\">\
                 <text x=\"10\" y=\"35\" font-family=\"Verdana\" font-size=\"16\">{TITLE}: nothing \
                 allocated in the {:.1} s window is still outstanding</text></svg>\n",
                report.window.duration_s
            )
            .as_bytes(),
        );
        return Ok(crate::output::mark::svg(&out));
    }
    let mut opts = flamegraph::Options::default();
    opts.title = TITLE.to_string();
    opts.subtitle = Some(subtitle(report));
    opts.count_name = "bytes".to_string();
    opts.colors = flamegraph::color::Palette::Basic(BasicPalette::Mem);
    // Same input, same picture.
    opts.hash = true;
    opts.deterministic = true;
    flamegraph::from_lines(&mut opts, folded.lines(), &mut out)
        .map_err(|source| ExportError::Flamegraph { source })?;
    Ok(crate::output::mark::svg(&out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::export::testing::report;

    #[test]
    fn folded_is_root_first_sorted_and_sanitized() {
        let text = folded(&report());
        assert_eq!(
            text,
            "main;[unknown] libc.so.6+0x3010;cache_put:v2 x;calloc 300\n\
             main;handle;parse;malloc 4000\n"
        );
    }

    #[test]
    fn equal_stacks_add_up() {
        let mut r = report();
        let mut again = r.sites[0].clone();
        again.outstanding_bytes = 96;
        r.sites.push(again);
        assert!(folded(&r).contains("main;handle;parse;malloc 4096\n"));
    }

    #[test]
    fn svg_names_frames_and_says_what_it_measures() {
        let svg = String::from_utf8(svg(&report()).unwrap()).unwrap();
        assert!(svg.starts_with("<?xml"), "{}", &svg[..100]);
        assert!(svg.contains(TITLE));
        assert!(svg.contains(
            "4300 bytes in 5 objects not freed, allocated in 2.5 s from 2026-01-02T03:04:05Z; PID 4242 (app); exact"
        ));
        // inferno's tooltip: name, value and share.
        assert!(svg.contains("parse (4,000 bytes, 93.02%)"), "{svg}");
        assert!(svg.contains("cache_put:v2 x (300 bytes"));
    }

    #[test]
    fn estimated_figures_say_so() {
        let mut r = report();
        r.sampling.sample_bytes = 524_288;
        r.sampling.estimated = true;
        let svg = String::from_utf8(svg(&r).unwrap()).unwrap();
        assert!(svg.contains("; estimated (sampled, 1 per 524288 bytes)"));
    }

    #[test]
    fn nothing_outstanding_is_still_a_picture() {
        let mut r = report();
        for s in &mut r.sites {
            s.outstanding_bytes = 0;
        }
        assert_eq!(folded(&r), "");
        let svg = String::from_utf8(svg(&r).unwrap()).unwrap();
        assert!(svg.contains("nothing allocated in the 2.5 s window is still outstanding"));
        assert!(crate::output::mark::recognise(svg.as_bytes()).is_some());
    }

    #[test]
    fn our_files_carry_the_mark_and_readers_of_folded_stacks_skip_it() {
        let r = report();
        let file = folded_file(&r);
        assert!(crate::output::mark::recognise(file.as_bytes()).is_some());
        assert!(crate::output::mark::recognise(folded(&r).as_bytes()).is_none());
        // inferno reads the file with its header line and draws the same stacks.
        let mut opts = flamegraph::Options::default();
        let mut out = Vec::new();
        flamegraph::from_lines(&mut opts, file.lines(), &mut out).unwrap();
        let drawn = String::from_utf8(out).unwrap();
        assert!(drawn.contains("parse (4,000 samples"), "{drawn}");
        let svg = svg(&r).unwrap();
        assert!(svg.starts_with(b"<?xml"));
        assert!(crate::output::mark::recognise(&svg).is_some());
    }
}
