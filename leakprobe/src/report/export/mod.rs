//! The report in other tools' formats: pprof's profile.proto, folded stacks and a flame graph.
//!
//! Each encoder takes the finished [`Report`] and returns bytes; writing them is the caller's
//! business.

pub mod backrefs;
pub mod flame;
pub mod pprof;

use crate::{report::Report, symbolize::Frame};

/// Errors of the encoders.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// gzip failed while compressing the encoded profile.
    #[error("compressing the pprof profile")]
    Gzip {
        #[source]
        source: std::io::Error,
    },
    /// inferno could not draw the flame graph.
    #[error("drawing the flame graph")]
    Flamegraph {
        #[source]
        source: std::io::Error,
    },
    /// `--backrefs-svg` with no graph: no scan, or a target that is not CPython.
    #[error("no --backrefs graph to draw: the target is not CPython, or no scan was taken (see the report)")]
    NoBackrefs,
}

/// A frame's name for tools that only show names: the function, or where the address is when
/// it has no symbol (`[unknown] libfoo.so+0x1234`, or the bare address outside any module).
pub fn frame_label(frame: &Frame, report: &Report) -> String {
    if let (Some(_), Some(f)) = (&frame.runtime, &frame.function) {
        // An interpreter's frame: its line matters as much as its function (py-spy's form).
        let file = frame.file.as_deref().map(|p| p.rsplit('/').next().unwrap_or(p)).unwrap_or("?");
        return match (frame.line, frame.column) {
            (Some(l), Some(c)) => format!("{f} ({file}:{l}:{c})"),
            (Some(l), None) => format!("{f} ({file}:{l})"),
            _ => format!("{f} ({file})"),
        };
    }
    if let Some(f) = &frame.function {
        return f.clone();
    }
    match report.modules.iter().find(|m| (m.start..m.end).contains(&frame.address)) {
        Some(m) => {
            let name = m.path.rsplit('/').next().unwrap_or(&m.path);
            let offset = frame.address - m.start + m.file_offset;
            format!("[unknown] {name}+{offset:#x}")
        }
        None => format!("{:#x}", frame.address),
    }
}

/// Frames grouped by address, innermost first: an inlined frame shares the address of the
/// frame it was inlined into, and ends up in the same group, before it.
pub(crate) fn by_address(frames: &[Frame]) -> Vec<&[Frame]> {
    let mut groups = Vec::new();
    let mut start = 0;
    for (i, f) in frames.iter().enumerate() {
        let last = i + 1 == frames.len();
        if !f.inlined || last || frames[i + 1].address != f.address {
            groups.push(&frames[start..=i]);
            start = i + 1;
        }
    }
    groups
}

#[cfg(test)]
pub(crate) mod testing {
    //! A small report with known figures for the encoders' tests.

    use crate::{
        report::{Host, Module, Overhead, Report, Sampling, Site, Target, Tool, Totals, Window},
        symbolize::Frame,
    };

    pub fn frame(address: u64, function: Option<&str>, line: Option<u32>, inlined: bool) -> Frame {
        Frame {
            address,
            function: function.map(str::to_string),
            file: line.map(|_| "/src/app.c".to_string()),
            line,
            module: Some("/usr/bin/app".into()),
            inlined,
            runtime: None,
            column: None,
        }
    }

    pub fn site(function: &str, outstanding: (u64, u64), allocated: (u64, u64), frames: Vec<Frame>) -> Site {
        Site {
            function: function.into(),
            outstanding_bytes: outstanding.0,
            outstanding_count: outstanding.1,
            allocated_bytes: allocated.0,
            allocated_count: allocated.1,
            freed_bytes: allocated.0 - outstanding.0,
            freed_count: allocated.1 - outstanding.1,
            interval_allocs: 0,
            interval_frees: 0,
            growth_bytes_per_s: 0.0,
            oldest_age_s: None,
            peak_bytes: outstanding.0,
            peak_count: outstanding.1,
            temporary_count: Some(0),
            trend: crate::model::trend::Trend::NotEnoughData,
            fit: None,
            stack_id: "0000000000000001".into(),
            truncated: false,
            stack_end: "complete".into(),
            frames,
            reachability: None,
            held_by: Vec::new(),
            verdict: None,
            suppressed: None,
            pid: None,
        }
    }

    /// Two leaking call sites under `main`: `parse` (inlined into `handle`) by malloc, and
    /// `cache_put` by calloc; a third site that freed everything; one frame without symbol.
    pub fn report() -> Report {
        let main = || frame(0x1900, Some("main"), Some(90), false);
        Report {
            schema: crate::report::SCHEMA.into(),
            leakprobe: Tool { version: "0.1.0".into(), args: vec!["leakprobe".into()] },
            host: Host { kernel: "6.1.0".into(), libc: None, libc_version: None },
            target: Target {
                pid: 4242,
                exe: "/usr/bin/app".into(),
                build_id: Some("abcd".into()),
                cmdline: vec!["/usr/bin/app".into()],
                start_time: None,
                ended_by: "duration".into(),
                exit_status: None,
                is_run: false,
            },
            allocator: crate::report::Allocator {
                name: "glibc".into(),
                module: "/usr/lib/libc.so.6".into(),
                chosen_by: "auto".into(),
                static_executable: false,
                also: Vec::new(),
                shadowed: Vec::new(),
                warning: None,
            },
            window: Window {
                start: "2026-01-02T03:04:05Z".into(),
                duration_s: 2.5,
                interval_s: 1.0,
                samples: 3,
                min_age_s: 0.0,
            },
            probes: vec![],
            totals: Totals {
                outstanding_bytes: 4300,
                outstanding_count: 5,
                allocated_count: 12,
                freed_count: 7,
                sites: 3,
                growing_sites: 2,
                evicted_sites: 0,
                ..Default::default()
            },
            drops: Default::default(),
            activity: Default::default(),
            degraded: false,
            sampling: Sampling { sample_bytes: 0, estimated: false },
            overhead: Overhead { mean_hits_per_s: 0.0, peak_hits_per_s: 0.0, max_hits_per_s: None },
            verdict: crate::report::Verdict {
                kind: crate::model::trend::RunVerdict::NotEnoughData,
                summary: String::new(),
                heap_fit: None,
                rss_fit: None,
                ..Default::default()
            },
            timeline: Vec::new(),
            sites: vec![
                site(
                    "malloc",
                    (4000, 4),
                    (4000, 4),
                    vec![
                        frame(0x1100, Some("parse"), Some(40), true),
                        frame(0x1100, Some("handle"), Some(69), false),
                        main(),
                    ],
                ),
                site(
                    "calloc",
                    (300, 1),
                    (600, 2),
                    vec![
                        frame(0x1200, Some("cache_put;v2\nx"), Some(12), false),
                        frame(0x7f00_0000_1010, None, None, false),
                        main(),
                    ],
                ),
                site("malloc", (0, 0), (500, 6), vec![frame(0x1300, Some("churn"), None, false), main()]),
            ],
            modules: vec![
                Module {
                    path: "/usr/lib/libc.so.6".into(),
                    start: 0x7f00_0000_0000,
                    end: 0x7f00_0010_0000,
                    file_offset: 0x2000,
                    build_id: None,
                },
                Module {
                    path: "/usr/bin/app".into(),
                    start: 0x1000,
                    end: 0x2000,
                    file_offset: 0,
                    build_id: Some("abcd".into()),
                },
            ],
            in_process: None,
            runtime: None,
            js_heap: None,
            scan: None,
            suppressions: None,
            processes: Vec::new(),
            merged: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::*, *};

    #[test]
    fn labels_fall_back_to_module_offset_then_address() {
        let r = report();
        assert_eq!(frame_label(&frame(0x1100, Some("parse"), None, false), &r), "parse");
        assert_eq!(
            frame_label(&frame(0x7f00_0000_1010, None, None, false), &r),
            "[unknown] libc.so.6+0x3010"
        );
        assert_eq!(frame_label(&frame(0x42, None, None, false), &r), "0x42");
    }

    #[test]
    fn inlined_frames_group_with_their_caller() {
        let frames = vec![
            frame(1, Some("a"), None, true),
            frame(1, Some("b"), None, true),
            frame(1, Some("c"), None, false),
            frame(2, Some("d"), None, false),
            // A stale flag at the end, or before another address, does not swallow frames.
            frame(3, Some("e"), None, true),
            frame(4, Some("f"), None, true),
        ];
        let names: Vec<Vec<&str>> = by_address(&frames)
            .iter()
            .map(|g| g.iter().map(|f| f.function.as_deref().unwrap()).collect())
            .collect();
        assert_eq!(names, [vec!["a", "b", "c"], vec!["d"], vec!["e"], vec!["f"]]);
    }
}
