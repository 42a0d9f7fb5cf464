//! `leakprobe diff`: compare two `leakprobe/v1` reports (or snapshots) per call site, in the
//! manner of Chrome's heap-snapshot comparison and tracemalloc's `compare_to`.
//!
//! Pure: parsing from bytes, matching, arithmetic and rendering. Reading and writing files is
//! the command's edge (`session::diff`).
//!
//! How call sites are matched:
//! - **Same run** (same PID, process start time and window start: two snapshots of one
//!   attach): by allocation function plus `stack_id`. Within a run a stack id names one stack
//!   exactly, even when its symbolization changed between the snapshots (a library unloaded).
//! - **Otherwise** (another attach, another process of the same build): by allocation
//!   function plus the symbolized frames (function, file, line, module of each; not the
//!   addresses, which ASLR moves, nor the stack id, which hashes them). Sites of one file
//!   that symbolize alike (two calls on one source line) are summed before matching.

use std::{collections::BTreeMap, time::SystemTime};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    report::{Report, Site},
    symbolize::Frame,
};

mod text;
pub use text::render;

/// The schema of `leakprobe diff --format json`.
pub const SCHEMA: &str = "leakprobe/diff/v1";

/// Why two files cannot be compared.
#[derive(Debug, Error)]
pub enum DiffError {
    /// Not JSON, cut short, or a field of the wrong type.
    #[error("{file}: line {line}, column {column}: {what}: {detail}")]
    Malformed { file: String, line: usize, column: usize, what: &'static str, detail: String },
    /// Valid JSON but not a `leakprobe/v1` report.
    #[error(
        "{file}: not a leakprobe/v1 report (schema {found}); diff compares files written by \
         `leakprobe attach|run --format json` or --snapshot-dir"
    )]
    Schema { file: String, found: String },
    /// A field holds a value no report has.
    #[error("{file}: {field}: {reason}")]
    Invalid { file: String, field: &'static str, reason: String },
    /// The two files are of different programs or builds.
    #[error(
        "{a} and {b} are of {what}: {detail}; their call sites cannot be matched \
         (--force compares them anyway)"
    )]
    DifferentTarget { a: String, b: String, what: &'static str, detail: String },
    /// Two snapshots of one run given newest first.
    #[error(
        "{b} was taken before {a} in the same run ({b_s:.1} s vs {a_s:.1} s after attach): \
         give the older snapshot first"
    )]
    Reversed { a: String, b: String, a_s: f64, b_s: f64 },
}

/// A parsed file and the name it is reported under. The report is read with the types that
/// write it; fields diff does not need may be missing (older files), unknown ones are ignored.
#[derive(Clone, Debug)]
pub struct Named {
    pub file: String,
    pub report: Report,
    /// `window.start`, parsed.
    start: SystemTime,
}

fn malformed(file: &str, e: &serde_json::Error) -> DiffError {
    let what = match e.classify() {
        serde_json::error::Category::Eof => "the file ends early (truncated?)",
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Data => "not a valid leakprobe/v1 report",
        serde_json::error::Category::Io => "read error",
    };
    // serde_json appends the position; it is already in front.
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let detail = full.strip_suffix(&suffix).unwrap_or(&full).to_string();
    DiffError::Malformed { file: file.to_string(), line: e.line(), column: e.column(), what, detail }
}

/// Parses one file's contents. `file` names it in errors.
pub fn parse(file: &str, bytes: &[u8]) -> Result<Named, DiffError> {
    // The schema first, so that another kind of file is named as such rather than as a
    // missing field.
    #[derive(Deserialize)]
    struct Head {
        schema: Option<serde_json::Value>,
    }
    let head: Head = serde_json::from_slice(bytes).map_err(|e| malformed(file, &e))?;
    match head.schema {
        Some(serde_json::Value::String(s)) if s == crate::report::SCHEMA => {}
        other => {
            return Err(DiffError::Schema {
                file: file.to_string(),
                found: other.map_or_else(|| "missing".to_string(), |v| v.to_string()),
            });
        }
    }
    let report: Report = serde_json::from_slice(bytes).map_err(|e| malformed(file, &e))?;
    let invalid = |field, reason: String| DiffError::Invalid { file: file.to_string(), field, reason };
    if !(report.window.duration_s.is_finite() && report.window.duration_s >= 0.0) {
        return Err(invalid("window.duration_s", format!("{} is not a duration", report.window.duration_s)));
    }
    let start = humantime::parse_rfc3339_weak(&report.window.start).map_err(|e| {
        invalid("window.start", format!("{:?} is not an RFC 3339 time: {e}", report.window.start))
    })?;
    Ok(Named { file: file.to_string(), report, start })
}

/// Figures of one side of a call site (summed when several sites symbolize alike).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Side {
    pub outstanding_bytes: u64,
    pub outstanding_count: u64,
    pub allocated_bytes: u64,
    pub allocated_count: u64,
    pub freed_bytes: u64,
    pub freed_count: u64,
    pub growth_bytes_per_s: f64,
    /// The file's stack ids merged into this call site.
    pub stack_ids: Vec<String>,
    /// `--scan` reports: the blocks by reachability class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reachability: Option<crate::report::scan::Reachability>,
}

impl Side {
    fn add(&mut self, s: &Site) {
        self.outstanding_bytes = self.outstanding_bytes.saturating_add(s.outstanding_bytes);
        self.outstanding_count = self.outstanding_count.saturating_add(s.outstanding_count);
        self.allocated_bytes = self.allocated_bytes.saturating_add(s.allocated_bytes);
        self.allocated_count = self.allocated_count.saturating_add(s.allocated_count);
        self.freed_bytes = self.freed_bytes.saturating_add(s.freed_bytes);
        self.freed_count = self.freed_count.saturating_add(s.freed_count);
        self.growth_bytes_per_s += s.growth_bytes_per_s;
        self.stack_ids.push(s.stack_id.clone());
        if let Some(r) = &s.reachability {
            self.reachability.get_or_insert_with(Default::default).add(r);
        }
    }
}

/// One call site compared.
#[derive(Clone, Debug, Serialize)]
pub struct SiteDiff {
    /// "new" (only in B), "gone" (only in A) or "both".
    pub status: &'static str,
    /// The allocation function.
    pub function: String,
    /// B's outstanding bytes minus A's.
    pub delta_bytes: i64,
    pub delta_count: i64,
    /// Allocations counted in B's window and not in A's.
    pub new_count: i64,
    pub new_bytes: i64,
    /// Frees counted in B's window and not in A's.
    pub freed_count: i64,
    pub freed_bytes: i64,
    /// Same run: delta_bytes over the time between the snapshots (null when that is zero).
    /// Separate windows: B's growth rate minus A's.
    pub growth_bytes_per_s: Option<f64>,
    pub a: Option<Side>,
    pub b: Option<Side>,
    /// Innermost first; B's symbolization, or A's for a gone site.
    pub frames: Vec<Frame>,
}

impl SiteDiff {
    fn changed(&self) -> bool {
        self.status != "both"
            || self.delta_bytes != 0
            || self.delta_count != 0
            || self.new_count != 0
            || self.freed_count != 0
    }
}

/// One input file, as described in the diff.
#[derive(Clone, Debug, Serialize)]
pub struct FileInfo {
    pub file: String,
    pub pid: i32,
    pub exe: String,
    pub build_id: Option<String>,
    pub start_time: Option<String>,
    pub window_start: String,
    pub duration_s: f64,
    pub sites: usize,
    pub degraded: bool,
    pub sample_bytes: u64,
}

impl FileInfo {
    fn of(n: &Named) -> Self {
        let s = &n.report;
        FileInfo {
            file: n.file.clone(),
            pid: s.target.pid,
            exe: s.target.exe.clone(),
            build_id: s.target.build_id.clone(),
            start_time: s.target.start_time.clone(),
            window_start: s.window.start.clone(),
            duration_s: s.window.duration_s,
            sites: s.sites.len(),
            degraded: s.degraded,
            sample_bytes: s.sampling.sample_bytes,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DiffTotals {
    pub delta_bytes: i64,
    pub delta_count: i64,
    pub new_count: i64,
    pub new_bytes: i64,
    pub freed_count: i64,
    pub freed_bytes: i64,
    /// Call sites compared, and of them: only in B, only in A, more and less outstanding.
    pub sites: usize,
    pub new_sites: usize,
    pub gone_sites: usize,
    pub growing_sites: usize,
    pub shrinking_sites: usize,
}

/// The comparison: the `leakprobe/diff/v1` JSON object.
#[derive(Clone, Debug, Serialize)]
pub struct Diff {
    pub schema: &'static str,
    pub leakprobe_version: &'static str,
    pub a: FileInfo,
    pub b: FileInfo,
    /// "same-run" or "separate-windows".
    pub comparison: &'static str,
    /// "stack_id" or "frames".
    pub matched_by: &'static str,
    /// B's window end minus A's, in seconds.
    pub interval_s: f64,
    /// The targets differed and --force was given.
    pub forced: bool,
    /// Either file was sampled (--sample-bytes): figures are estimates.
    pub estimated: bool,
    pub warnings: Vec<String>,
    pub totals: DiffTotals,
    /// Largest growth (delta_bytes) first.
    pub sites: Vec<SiteDiff>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct FrameKey {
    function: Option<String>,
    file: Option<String>,
    line: Option<u32>,
    module: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SiteKey {
    Stack { function: String, stack_id: String },
    Frames { function: String, frames: Vec<FrameKey> },
}

fn key(s: &Site, by_stack: bool) -> SiteKey {
    if by_stack {
        SiteKey::Stack { function: s.function.clone(), stack_id: s.stack_id.clone() }
    } else {
        SiteKey::Frames {
            function: s.function.clone(),
            frames: s
                .frames
                .iter()
                .map(|f| FrameKey {
                    function: f.function.clone(),
                    file: f.file.clone(),
                    line: f.line,
                    module: f.module.clone(),
                })
                .collect(),
        }
    }
}

fn end_of(n: &Named) -> SystemTime {
    n.start + std::time::Duration::from_secs_f64(n.report.window.duration_s)
}

/// Seconds from `a` to `b` (negative when `b` is earlier).
fn seconds_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// Refuses files of different builds. With build-ids on both sides they decide (the same
/// build may sit at another path, e.g. in a container); otherwise the executable path does.
fn check_same_build(a: &Named, b: &Named, warnings: &mut Vec<String>) -> Result<(), DiffError> {
    let (ta, tb) = (&a.report.target, &b.report.target);
    let mismatch =
        |what, detail| DiffError::DifferentTarget { a: a.file.clone(), b: b.file.clone(), what, detail };
    match (nonempty(&ta.build_id), nonempty(&tb.build_id)) {
        (Some(ia), Some(ib)) if ia != ib => {
            Err(mismatch("different builds", format!("build-id {ia} ({}) vs {ib} ({})", ta.exe, tb.exe)))
        }
        (Some(_), Some(_)) => Ok(()),
        (ia, ib) => {
            for (file, id) in [(&a.file, ia), (&b.file, ib)] {
                if id.is_none() {
                    warnings.push(format!("{file} has no build-id: the build could not be checked"));
                }
            }
            if ta.exe != tb.exe {
                Err(mismatch("different programs", format!("{} vs {}", ta.exe, tb.exe)))
            } else {
                Ok(())
            }
        }
    }
}

fn sat_i64(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

fn sub(b: u64, a: u64) -> i64 {
    sat_i64(i128::from(b) - i128::from(a))
}

/// Compares A (before) with B (after).
pub fn compare(a: &Named, b: &Named, force: bool) -> Result<Diff, DiffError> {
    let mut warnings = Vec::new();
    let mut forced = false;
    if let Err(e) = check_same_build(a, b, &mut warnings) {
        if !force {
            return Err(e);
        }
        forced = true;
        warnings.push(format!("compared anyway (--force): {e}"));
    }
    let (sa, sb) = (&a.report, &b.report);
    let same_run = sa.target.pid == sb.target.pid
        && sa.target.start_time == sb.target.start_time
        && sa.window.start == sb.window.start;
    if same_run && sb.window.duration_s < sa.window.duration_s {
        return Err(DiffError::Reversed {
            a: a.file.clone(),
            b: b.file.clone(),
            a_s: sa.window.duration_s,
            b_s: sb.window.duration_s,
        });
    }
    // Within a run, window.start is shared and only the durations differ: exact.
    let interval_s = if same_run {
        sb.window.duration_s - sa.window.duration_s
    } else {
        seconds_between(end_of(a), end_of(b))
    };
    if !same_run {
        if sa.target.pid != sb.target.pid || sa.target.start_time != sb.target.start_time {
            warnings.push(format!(
                "different processes (PID {} started {}, PID {} started {}): each file counts only \
                 what its own window saw",
                sa.target.pid,
                sa.target.start_time.as_deref().unwrap_or("at an unknown time"),
                sb.target.pid,
                sb.target.start_time.as_deref().unwrap_or("at an unknown time"),
            ));
        }
        // window.start is whole seconds: overlaps under a second are rounding.
        if seconds_between(b.start, end_of(a)) > 1.0 && seconds_between(a.start, end_of(b)) > 1.0 {
            warnings.push(
                "the windows overlap: B's new and freed counts may include events A also counted".to_string(),
            );
        }
        if interval_s < 0.0 {
            warnings.push(format!("B ({}) ends before A ({}): were they given in order?", b.file, a.file));
        }
    }
    if sa.window.min_age_s != sb.window.min_age_s {
        warnings.push(format!(
            "different --min-age ({} s vs {} s): outstanding figures count different blocks",
            sa.window.min_age_s, sb.window.min_age_s
        ));
    }
    if sa.sampling.sample_bytes != sb.sampling.sample_bytes {
        warnings.push(format!(
            "different --sample-bytes ({} vs {}): estimates of different precision",
            sa.sampling.sample_bytes, sb.sampling.sample_bytes
        ));
    }
    for n in [a, b] {
        if n.report.degraded {
            warnings.push(format!(
                "{} is a degraded report (events were dropped): figures are incomplete",
                n.file
            ));
        }
    }

    let by_stack = same_run && sa.sites.iter().chain(&sb.sites).all(|s| !s.stack_id.is_empty());
    // One call site's two sides, each with the frames it was first seen with.
    type Sides = [Option<(Side, Vec<Frame>)>; 2];
    let mut merged: BTreeMap<SiteKey, Sides> = BTreeMap::new();
    for (i, snap) in [sa, sb].into_iter().enumerate() {
        for s in &snap.sites {
            let sides = merged.entry(key(s, by_stack)).or_default();
            sides[i].get_or_insert_with(|| (Side::default(), s.frames.clone())).0.add(s);
        }
    }

    let zero = Side::default();
    let mut sites: Vec<SiteDiff> = merged
        .into_iter()
        .map(|(k, [pa, pb])| {
            let (sa_, fa) = pa.map_or((None, Vec::new()), |(side, f)| (Some(side), f));
            let (sb_, fb) = pb.map_or((None, Vec::new()), |(side, f)| (Some(side), f));
            let function = match k {
                SiteKey::Stack { function, .. } | SiteKey::Frames { function, .. } => function,
            };
            let (x, y) = (sa_.as_ref().unwrap_or(&zero), sb_.as_ref().unwrap_or(&zero));
            let delta_bytes = sub(y.outstanding_bytes, x.outstanding_bytes);
            let (new_count, new_bytes, freed_count, freed_bytes) = if same_run {
                (
                    sub(y.allocated_count, x.allocated_count),
                    sub(y.allocated_bytes, x.allocated_bytes),
                    sub(y.freed_count, x.freed_count),
                    sub(y.freed_bytes, x.freed_bytes),
                )
            } else {
                (
                    sub(y.allocated_count, 0),
                    sub(y.allocated_bytes, 0),
                    sub(y.freed_count, 0),
                    sub(y.freed_bytes, 0),
                )
            };
            let growth_bytes_per_s = if same_run {
                (interval_s > 0.0).then(|| delta_bytes as f64 / interval_s)
            } else {
                Some(y.growth_bytes_per_s - x.growth_bytes_per_s)
            };
            SiteDiff {
                status: match (&sa_, &sb_) {
                    (None, _) => "new",
                    (_, None) => "gone",
                    _ => "both",
                },
                function,
                delta_bytes,
                delta_count: sub(y.outstanding_count, x.outstanding_count),
                new_count,
                new_bytes,
                freed_count,
                freed_bytes,
                growth_bytes_per_s,
                frames: if fb.is_empty() { fa } else { fb },
                a: sa_,
                b: sb_,
            }
        })
        .collect();
    // Stable: ties keep the key order, so the output is deterministic.
    sites.sort_by(|p, q| q.delta_bytes.cmp(&p.delta_bytes).then(q.delta_count.cmp(&p.delta_count)));

    let mut totals = DiffTotals { sites: sites.len(), ..DiffTotals::default() };
    for s in &sites {
        totals.delta_bytes = totals.delta_bytes.saturating_add(s.delta_bytes);
        totals.delta_count = totals.delta_count.saturating_add(s.delta_count);
        totals.new_count = totals.new_count.saturating_add(s.new_count);
        totals.new_bytes = totals.new_bytes.saturating_add(s.new_bytes);
        totals.freed_count = totals.freed_count.saturating_add(s.freed_count);
        totals.freed_bytes = totals.freed_bytes.saturating_add(s.freed_bytes);
        totals.new_sites += usize::from(s.status == "new");
        totals.gone_sites += usize::from(s.status == "gone");
        totals.growing_sites += usize::from(s.delta_bytes > 0);
        totals.shrinking_sites += usize::from(s.delta_bytes < 0);
    }

    Ok(Diff {
        schema: SCHEMA,
        leakprobe_version: env!("CARGO_PKG_VERSION"),
        a: FileInfo::of(a),
        b: FileInfo::of(b),
        comparison: if same_run { "same-run" } else { "separate-windows" },
        matched_by: if by_stack { "stack_id" } else { "frames" },
        interval_s,
        forced,
        estimated: sa.sampling.estimated || sb.sampling.estimated,
        warnings,
        totals,
        sites,
    })
}

pub fn to_json(d: &Diff) -> serde_json::Result<String> {
    let mut s = serde_json::to_string_pretty(d)?;
    s.push('\n');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn frame(func: &str, line: u32, addr: u64) -> Value {
        json!({ "address": addr, "function": func, "file": "/src/t.c", "line": line,
                "module": "/usr/bin/t", "inlined": false })
    }

    /// A site: (function, stack id, frames, outstanding bytes/count, allocated bytes/count,
    /// freed bytes/count).
    #[allow(clippy::too_many_arguments)]
    fn site(
        func: &str,
        id: &str,
        frames: Vec<Value>,
        ob: u64,
        oc: u64,
        ab: u64,
        ac: u64,
        fb: u64,
        fc: u64,
    ) -> Value {
        json!({ "function": func, "outstanding_bytes": ob, "outstanding_count": oc,
                "allocated_bytes": ab, "allocated_count": ac, "freed_bytes": fb, "freed_count": fc,
                "interval_allocs": 0, "interval_frees": 0, "growth_bytes_per_s": 0.0,
                "oldest_age_s": null, "stack_id": id, "truncated": false,
                "stack_end": "complete", "frames": frames })
    }

    fn report(pid: i32, build_id: Option<&str>, start: &str, duration: f64, sites: Vec<Value>) -> Value {
        json!({
            "schema": "leakprobe/v1",
            "leakprobe": { "version": "0.1.0", "args": [] },
            "target": { "pid": pid, "exe": "/usr/bin/t", "build_id": build_id, "cmdline": ["t"],
                        "start_time": format!("2026-01-01T10:00:0{}Z", pid % 10),
                        "ended_by": "duration", "exit_status": null },
            "window": { "start": start, "duration_s": duration, "interval_s": 1.0, "samples": 3,
                        "min_age_s": 0.0 },
            "totals": {}, "degraded": false,
            "sampling": { "sample_bytes": 0, "estimated": false },
            "some_future_field": { "x": [1, 2] },
            "sites": sites,
        })
    }

    fn named(file: &str, v: &Value) -> Named {
        parse(file, v.to_string().as_bytes()).unwrap()
    }

    fn leak_frames(addr: u64) -> Vec<Value> {
        vec![frame("leak", 10, addr), frame("main", 20, addr + 0x40)]
    }

    fn churn_frames(addr: u64) -> Vec<Value> {
        vec![frame("churn", 30, addr), frame("main", 21, addr + 0x40)]
    }

    #[test]
    fn separate_runs_match_by_frames_not_stack_id_or_address() {
        let a = report(
            11,
            Some("ab12"),
            "2026-01-01T10:00:10Z",
            5.0,
            vec![
                site("malloc", "00000000000000aa", leak_frames(0x1000), 4000, 4, 4000, 4, 0, 0),
                site("malloc", "00000000000000bb", churn_frames(0x1100), 0, 0, 500, 5, 500, 5),
            ],
        );
        // Another process of the same build: other addresses (ASLR), other stack ids.
        let b = report(
            12,
            Some("ab12"),
            "2026-01-01T10:01:00Z",
            5.0,
            vec![
                site("malloc", "00000000000000cc", leak_frames(0x9000), 12000, 12, 13000, 13, 1000, 1),
                site("malloc", "00000000000000dd", churn_frames(0x9100), 0, 0, 700, 7, 700, 7),
            ],
        );
        let d = compare(&named("a.json", &a), &named("b.json", &b), false).unwrap();
        assert_eq!(d.comparison, "separate-windows");
        assert_eq!(d.matched_by, "frames");
        assert_eq!(d.sites.len(), 2);
        let leak = &d.sites[0];
        assert_eq!(leak.status, "both");
        assert_eq!(leak.frames[0].function.as_deref(), Some("leak"));
        assert_eq!(leak.frames[0].address, 0x9000, "B's frames are shown");
        assert_eq!((leak.delta_bytes, leak.delta_count), (8000, 8));
        // B's window is separate: all its allocations and frees are not A's.
        assert_eq!(
            (leak.new_count, leak.new_bytes, leak.freed_count, leak.freed_bytes),
            (13, 13000, 1, 1000)
        );
        let churn = &d.sites[1];
        assert_eq!((churn.status, churn.delta_bytes, churn.new_count), ("both", 0, 7));
        assert!(d.warnings.iter().any(|w| w.contains("different processes")), "{:?}", d.warnings);
        assert_eq!(d.interval_s, 50.0);
    }

    #[test]
    fn same_run_matches_by_stack_id_with_exact_deltas() {
        let start = "2026-01-01T10:00:10Z";
        let a = report(
            7,
            Some("ab12"),
            start,
            2.0,
            vec![site("malloc", "00000000000000aa", leak_frames(0x1000), 3000, 3, 5000, 5, 2000, 2)],
        );
        // Same stack, but symbolized differently at B's time (e.g. its module was unloaded).
        let unknown = vec![json!({ "address": 0x1000, "function": null, "file": null, "line": null,
                                   "module": null, "inlined": false })];
        let b = report(
            7,
            Some("ab12"),
            start,
            6.0,
            vec![site("malloc", "00000000000000aa", unknown, 7000, 7, 12000, 12, 5000, 5)],
        );
        let d = compare(&named("a.json", &a), &named("b.json", &b), false).unwrap();
        assert_eq!((d.comparison, d.matched_by), ("same-run", "stack_id"));
        assert_eq!(d.interval_s, 4.0);
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        let s = &d.sites[0];
        assert_eq!(s.status, "both");
        assert_eq!((s.delta_bytes, s.delta_count), (4000, 4));
        assert_eq!((s.new_count, s.new_bytes), (7, 7000));
        assert_eq!((s.freed_count, s.freed_bytes), (3, 3000));
        assert_eq!(s.growth_bytes_per_s, Some(1000.0));
        assert_eq!(s.delta_count, s.new_count - s.freed_count);
        assert_eq!(s.a.as_ref().unwrap().stack_ids, vec!["00000000000000aa"]);
    }

    #[test]
    fn same_run_needs_same_pid_start_time_and_window() {
        let start = "2026-01-01T10:00:10Z";
        let a = report(7, Some("ab12"), start, 1.0, vec![]);
        let mut b = report(7, Some("ab12"), start, 2.0, vec![]);
        let run = |b: &Value| compare(&named("a", &a), &named("b", b), false).unwrap();
        assert_eq!(run(&b).comparison, "same-run");
        // A recycled PID: another process.
        b["target"]["start_time"] = json!("2026-01-01T09:00:00Z");
        let d = run(&b);
        assert_eq!((d.comparison, d.matched_by), ("separate-windows", "frames"));
        assert!(d.warnings.iter().any(|w| w.contains("different processes")), "{:?}", d.warnings);
        // The same process attached twice: separate windows, no warning about processes.
        b["target"]["start_time"] = a["target"]["start_time"].clone();
        b["window"]["start"] = json!("2026-01-01T10:00:20Z");
        let d = run(&b);
        assert_eq!(d.comparison, "separate-windows");
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        assert_eq!(d.interval_s, 11.0);
        // Overlapping windows (two tracers at once) are flagged.
        b["window"]["start"] = json!("2026-01-01T10:00:05Z");
        b["window"]["duration_s"] = json!(30.0);
        assert!(run(&b).warnings.iter().any(|w| w.contains("overlap")));
    }

    #[test]
    fn same_run_given_newest_first_is_refused() {
        let start = "2026-01-01T10:00:10Z";
        let a = report(7, None, start, 6.0, vec![]);
        let b = report(7, None, start, 2.0, vec![]);
        let err = compare(&named("new.json", &a), &named("old.json", &b), false).unwrap_err().to_string();
        assert!(err.contains("old.json was taken before new.json"), "{err}");
    }

    #[test]
    fn new_and_gone_sites_sorted_by_delta_bytes() {
        let a = report(
            1,
            Some("ab12"),
            "2026-01-01T10:00:00Z",
            1.0,
            vec![
                site("malloc", "1", vec![frame("gone_site", 5, 1)], 500, 5, 500, 5, 0, 0),
                site("calloc", "2", leak_frames(0x10), 100, 1, 100, 1, 0, 0),
                site("malloc", "3", vec![frame("shrinks", 6, 2)], 9000, 9, 9000, 9, 0, 0),
            ],
        );
        let b = report(
            2,
            Some("ab12"),
            "2026-01-01T10:00:05Z",
            1.0,
            vec![
                site("calloc", "4", leak_frames(0x20), 300, 3, 300, 3, 0, 0),
                site("malloc", "5", vec![frame("new_site", 7, 3)], 2048, 2, 4096, 4, 2048, 2),
                site("malloc", "6", vec![frame("shrinks", 6, 4)], 1000, 1, 1000, 1, 0, 0),
                // Same frames as "leak" but another allocation function: another call site.
                site("malloc", "7", leak_frames(0x20), 50, 1, 50, 1, 0, 0),
            ],
        );
        let d = compare(&named("a.json", &a), &named("b.json", &b), false).unwrap();
        let order: Vec<(&str, &str, i64)> = d
            .sites
            .iter()
            .map(|s| (s.frames[0].function.as_deref().unwrap(), s.status, s.delta_bytes))
            .collect();
        assert_eq!(
            order,
            vec![
                ("new_site", "new", 2048),
                ("leak", "both", 200),
                ("leak", "new", 50),
                ("gone_site", "gone", -500),
                ("shrinks", "both", -8000),
            ]
        );
        let gone = &d.sites[3];
        assert!(gone.b.is_none());
        assert_eq!((gone.delta_count, gone.new_count, gone.freed_count), (-5, 0, 0));
        assert_eq!(gone.frames[0].function.as_deref(), Some("gone_site"), "A's frames for a gone site");
        let t = &d.totals;
        assert_eq!((t.delta_bytes, t.delta_count), (2048 + 200 + 50 - 500 - 8000, 2 + 2 + 1 - 5 - 8));
        assert_eq!((t.sites, t.new_sites, t.gone_sites, t.growing_sites, t.shrinking_sites), (5, 2, 1, 3, 2));
    }

    #[test]
    fn sites_that_symbolize_alike_are_summed() {
        // Two calls on one source line: two stack ids, one call site by frames.
        let frames = || vec![frame("twice", 3, 0x1)];
        let a = report(
            1,
            None,
            "2026-01-01T10:00:00Z",
            1.0,
            vec![site("malloc", "1", frames(), 10, 1, 10, 1, 0, 0)],
        );
        let b = report(
            2,
            None,
            "2026-01-01T10:00:05Z",
            1.0,
            vec![
                site("malloc", "2", frames(), 100, 1, 100, 1, 0, 0),
                site("malloc", "3", frames(), 200, 2, 200, 2, 0, 0),
            ],
        );
        let d = compare(&named("a.json", &a), &named("b.json", &b), false).unwrap();
        assert_eq!(d.sites.len(), 1);
        assert_eq!((d.sites[0].delta_bytes, d.sites[0].delta_count), (290, 2));
        assert_eq!(d.sites[0].b.as_ref().unwrap().stack_ids, vec!["2", "3"]);
        // Neither file had a build-id: said so.
        assert_eq!(d.warnings.iter().filter(|w| w.contains("no build-id")).count(), 2, "{:?}", d.warnings);
    }

    #[test]
    fn different_builds_are_refused_unless_forced() {
        let a = report(1, Some("aaaa"), "2026-01-01T10:00:00Z", 1.0, vec![]);
        let b = report(2, Some("bbbb"), "2026-01-01T10:00:05Z", 1.0, vec![]);
        let (na, nb) = (named("a.json", &a), named("b.json", &b));
        let err = compare(&na, &nb, false).unwrap_err().to_string();
        assert!(err.contains("a.json and b.json are of different builds"), "{err}");
        assert!(err.contains("aaaa") && err.contains("bbbb") && err.contains("--force"), "{err}");
        let d = compare(&na, &nb, true).unwrap();
        assert!(d.forced);
        assert!(d.warnings.iter().any(|w| w.contains("--force") && w.contains("different builds")));
    }

    #[test]
    fn build_ids_decide_over_paths_and_paths_decide_without_them() {
        let mut a = report(1, Some("same"), "2026-01-01T10:00:00Z", 1.0, vec![]);
        let b = report(2, Some("same"), "2026-01-01T10:00:05Z", 1.0, vec![]);
        a["target"]["exe"] = json!("/container/usr/bin/t");
        assert!(compare(&named("a", &a), &named("b", &b), false).is_ok());
        a["target"]["build_id"] = Value::Null;
        let err = compare(&named("a", &a), &named("b", &b), false).unwrap_err().to_string();
        assert!(err.contains("different programs") && err.contains("/container/usr/bin/t"), "{err}");
        // A missing build_id field is the same as null.
        a["target"].as_object_mut().unwrap().remove("build_id");
        a["target"]["exe"] = json!("/usr/bin/t");
        let d = compare(&named("a", &a), &named("b", &b), false).unwrap();
        assert!(d.warnings.iter().any(|w| w.contains("a has no build-id")), "{:?}", d.warnings);
        assert!(!d.forced);
    }

    #[test]
    fn wrong_schema_is_refused_even_when_forced() {
        let mut a = report(1, None, "2026-01-01T10:00:00Z", 1.0, vec![]);
        a["schema"] = json!("leakprobe/diff/v1");
        let err = parse("d.json", a.to_string().as_bytes()).unwrap_err().to_string();
        assert!(
            err.contains("d.json: not a leakprobe/v1 report") && err.contains("leakprobe/diff/v1"),
            "{err}"
        );
        a.as_object_mut().unwrap().remove("schema");
        let err = parse("d.json", a.to_string().as_bytes()).unwrap_err().to_string();
        assert!(err.contains("schema missing"), "{err}");
    }

    #[test]
    fn truncated_and_malformed_files_name_file_and_position() {
        let a = report(
            1,
            None,
            "2026-01-01T10:00:00Z",
            1.0,
            vec![site("malloc", "1", leak_frames(1), 10, 1, 10, 1, 0, 0)],
        );
        let text = serde_json::to_string_pretty(&a).unwrap();
        let cut = text[..text.len() / 2].trim_end();
        let lines = cut.lines().count();
        let err = parse("snap/a.json", cut.as_bytes()).unwrap_err().to_string();
        assert!(err.starts_with(&format!("snap/a.json: line {lines}, column ")), "{err}");
        assert!(err.contains("ends early"), "{err}");

        let err = parse("b.json", b"{\"schema\": \"leakprobe/v1\",\n  oops").unwrap_err().to_string();
        assert!(err.starts_with("b.json: line 2, column 3: not valid JSON"), "{err}");

        // Valid JSON, wrong type: position of the bad value.
        let bad = text.replacen("\"outstanding_bytes\": 10", "\"outstanding_bytes\": \"ten\"", 1);
        let line = bad.lines().position(|l| l.contains("\"ten\"")).unwrap() + 1;
        let err = parse("c.json", bad.as_bytes()).unwrap_err().to_string();
        assert!(err.starts_with(&format!("c.json: line {line}, column ")), "{err}");
        assert!(err.contains("invalid type"), "{err}");

        // A required field missing.
        let mut m = a.clone();
        m["sites"][0].as_object_mut().unwrap().remove("allocated_count");
        let err = parse("m.json", m.to_string().as_bytes()).unwrap_err().to_string();
        assert!(err.contains("m.json: line 1") && err.contains("allocated_count"), "{err}");

        for junk in [&b""[..], b"[1, 2]", b"null", b"\xff\xfe"] {
            let err = parse("j.json", junk).unwrap_err().to_string();
            assert!(err.starts_with("j.json: "), "{err}");
        }

        let mut t = a.clone();
        t["window"]["start"] = json!("yesterday");
        let err = parse("t.json", t.to_string().as_bytes()).unwrap_err().to_string();
        assert!(err.contains("t.json: window.start"), "{err}");
        t["window"]["start"] = json!("2026-01-01T10:00:00Z");
        t["window"]["duration_s"] = json!(-1.0);
        let err = parse("t.json", t.to_string().as_bytes()).unwrap_err().to_string();
        assert!(err.contains("t.json: window.duration_s"), "{err}");
    }

    #[test]
    fn huge_figures_saturate_instead_of_panicking() {
        let a = report(
            1,
            None,
            "2026-01-01T10:00:00Z",
            1.0,
            vec![site("malloc", "1", leak_frames(1), 0, 0, 0, 0, 0, 0)],
        );
        let big = u64::MAX;
        let b = report(
            2,
            None,
            "2026-01-01T10:00:05Z",
            1.0,
            vec![
                site("malloc", "2", leak_frames(1), big, big, big, big, big, big),
                site("malloc", "3", leak_frames(1), big, big, big, big, big, big),
            ],
        );
        let d = compare(&named("a", &a), &named("b", &b), false).unwrap();
        assert_eq!(d.sites[0].delta_bytes, i64::MAX);
        let _ = render(&d, 10);
        let _ = to_json(&d).unwrap();
    }

    #[test]
    fn text_and_json_forms() {
        let a = report(
            1,
            Some("ab12"),
            "2026-01-01T10:00:00Z",
            1.0,
            vec![site("malloc", "1", leak_frames(0x10), 1024, 1, 1024, 1, 0, 0)],
        );
        let mut b_sites = vec![site("malloc", "2", leak_frames(0x20), 3072, 3, 3072, 3, 0, 0)];
        for i in 0..5 {
            b_sites.push(site(
                "malloc",
                "x",
                vec![frame(&format!("f{i}"), 1, 1)],
                10 - i,
                1,
                10 - i,
                1,
                0,
                0,
            ));
        }
        let b = report(2, Some("ab12"), "2026-01-01T10:00:05Z", 1.0, b_sites);
        let d = compare(&named("a.json", &a), &named("b.json", &b), false).unwrap();
        let text = render(&d, 3);
        assert!(text.contains("leakprobe diff: A = a.json, B = b.json"), "{text}");
        assert!(text.contains("separate windows"), "{text}");
        let row = text.lines().find(|l| l.trim_start().starts_with("#1 ")).unwrap();
        assert!(
            row.contains("+2.00 KiB") && row.contains("+2") && row.contains("malloc in leak t.c:10 (t)"),
            "{text}"
        );
        assert!(text.contains("... 3 more changed call sites"), "{text}");
        assert!(text.contains("    #1 main t.c:20 (t)"), "{text}");
        assert!(text.contains("SUMMARY: +2.04 KiB outstanding (+7 objects)"), "{text}");

        let v: Value = serde_json::from_str(&to_json(&d).unwrap()).unwrap();
        assert_eq!(v["schema"], "leakprobe/diff/v1");
        assert_eq!(v["comparison"], "separate-windows");
        assert_eq!(v["sites"].as_array().unwrap().len(), 6);
        assert_eq!(v["sites"][0]["delta_bytes"], 2048);
        assert_eq!(v["sites"][0]["a"]["outstanding_bytes"], 1024);
        assert_eq!(v["sites"][1]["a"], Value::Null);
        assert_eq!(v["sites"][0]["frames"][0]["function"], "leak");
    }

    /// One schema: a report written by `report::to_json` comes back through diff's parser
    /// with every field, so writing it again gives the same bytes.
    #[test]
    fn a_written_report_round_trips_through_the_parser_without_loss() {
        use crate::{
            model::trend::{Basis, Fit, RunVerdict, Trend},
            report::{Probe, TimelinePoint, to_json},
        };
        let mut r = crate::report::export::testing::report();
        // Every section filled, with floats that do not print short.
        let fit = Fit {
            slope_per_s: 0.1 + 0.2,
            r2: 0.987_654_321_012_345_6,
            rising_fraction: 2.0 / 3.0,
            change: 1e-7,
            points: 5,
            span_s: 4.000_000_001,
            last: 123_456.789_012_345,
        };
        r.verdict = crate::report::Verdict {
            kind: RunVerdict::Leak,
            summary: "tracked heap +4 KiB".into(),
            heap_fit: Some(fit),
            rss_fit: None,
            basis: Basis::Scan,
        };
        r.sites[0].trend = Trend::Growing;
        r.sites[0].fit = Some(fit);
        r.sites[0].oldest_age_s = Some(1.0 / 3.0);
        r.sites[0].growth_bytes_per_s = 1_234.567_890_123;
        r.timeline = vec![TimelinePoint {
            t_s: 0.1,
            rss_bytes: Some(1 << 20),
            anon_bytes: None,
            file_bytes: Some(7),
            heap_bytes: 4096,
            mmap_bytes: 0,
            allocs_per_s: 333.333_333_333,
            frees_per_s: 0.0,
        }];
        r.probes = vec![Probe {
            function: "free".into(),
            module: "/usr/lib/libc.so.6".into(),
            required: true,
            attached: true,
            error: None,
            alias_of: Some("cfree".into()),
            offset: 9,
            placement: Some("past the NULL check".into()),
            watch_only: false,
        }];
        r.drops.insert("live_map_full".into(), 3);
        r.activity.insert("unknown_frees".into(), 5);
        r.degraded = true;
        let written = to_json(&r).unwrap();
        let parsed = parse("r.json", written.as_bytes()).unwrap();
        assert_eq!(to_json(&parsed.report).unwrap(), written);
    }
}
