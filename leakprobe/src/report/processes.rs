//! Several processes in one report (`--pid A,B,C`, `--children`): each process's own figures,
//! and the sites merged across processes that run one build. Pure: built from the report.

use std::{borrow::Cow, collections::BTreeMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use super::{Frame, Report, Site, Trend, text::human_bytes};

/// One process of the session.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub exe: String,
    /// "listed" (--pid), "child" (a descendant when the session started) or "forked" (forked
    /// while traced).
    pub origin: Cow<'static, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u32>,
    /// Its address-space layout: processes forked from one another share one.
    pub layout: u32,
    /// Seconds after the start when its probes went live.
    pub joined_s: f64,
    /// Forked while traced: milliseconds from its fork to its probes, during which its calls
    /// were not seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blind_ms: Option<f64>,
    /// A forked child held at birth: milliseconds from its fork until its probes were live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_ms: Option<f64>,
    /// When it ended (seconds after the start), and how: "exited" or "exec".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<Cow<'static, str>>,
    /// What it held (tracked, outstanding) at the end of the window or when it ended.
    pub tracked_bytes: u64,
    pub tracked_count: u64,
    pub peak_bytes: u64,
    /// Growth of its sites' outstanding bytes, summed.
    pub growth_bytes_per_s: f64,
    /// Its call sites, and those growing.
    pub sites: u64,
    pub growing_sites: u64,
    /// Blocks of it that could not be recorded (a kernel map was full).
    pub drops: u64,
    /// "growing" or "stable": whether any of its sites grows.
    pub verdict: Cow<'static, str>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probe_errors: Vec<String>,
    /// `--in-process`: the stub in this process (mapped for it, or inherited from its parent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stub: Option<ProcessStub>,
}

/// `--in-process`, one process's stub.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProcessStub {
    /// "mapped" (leakprobe placed it) or "inherited" (forked from a process that ran it).
    pub how: Cow<'static, str>,
    /// GOT slots and data pointers that led into it.
    pub slots: u64,
    /// Put back at the end: `None` while it runs, or when the process ended first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<u64>,
    /// Blocks it sampled and frees of them it saw (its own counters, inherited ones left out).
    pub sampled_allocs: u64,
    pub sampled_frees: u64,
}

/// A call site merged across the processes that have it (same allocation function and the
/// same symbolized stack: workers of one build, whatever their ASLR).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MergedSite {
    pub function: String,
    pub outstanding_bytes: u64,
    pub outstanding_count: u64,
    pub allocated_count: u64,
    pub growth_bytes_per_s: f64,
    /// The processes that have it, and those where it grows.
    pub pids: Vec<u32>,
    pub growing_in: u32,
    /// Processes that run the same executable: "grows in 4 of 4".
    pub of: u32,
    pub frames: Vec<Frame>,
    /// `--scan`: its blocks by class in every process, added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachability: Option<super::scan::Reachability>,
}

/// A site as the merge sees it: the allocation function, and each frame's function, file and
/// line (addresses differ between processes; names do not).
type StackKey = (String, Vec<(Option<String>, Option<String>, Option<u32>)>);

/// The report's sites merged across processes, largest growth first, then largest
/// outstanding.
pub fn merge(report: &Report) -> Vec<MergedSite> {
    let exe_of: BTreeMap<u32, &str> = report.processes.iter().map(|p| (p.pid, p.exe.as_str())).collect();
    let mut by_stack: BTreeMap<StackKey, MergedSite> = BTreeMap::new();
    for s in report.sites.iter().filter(|s| s.suppressed.is_none()) {
        let Some(pid) = s.pid else { continue };
        let key = (
            s.function.clone(),
            s.frames.iter().map(|f| (f.function.clone(), f.file.clone(), f.line)).collect::<Vec<_>>(),
        );
        let m = by_stack.entry(key).or_insert_with(|| MergedSite {
            function: s.function.clone(),
            frames: s.frames.clone(),
            ..MergedSite::default()
        });
        add(m, s, pid);
    }
    let mut out: Vec<MergedSite> = by_stack.into_values().collect();
    for m in &mut out {
        let exe = m.pids.first().and_then(|p| exe_of.get(p)).copied();
        m.of = exe.map_or(0, |e| exe_of.values().filter(|x| **x == e).count() as u32);
    }
    out.sort_by(|a, b| {
        b.growth_bytes_per_s
            .total_cmp(&a.growth_bytes_per_s)
            .then(b.outstanding_bytes.cmp(&a.outstanding_bytes))
    });
    out
}

fn add(m: &mut MergedSite, s: &Site, pid: u32) {
    m.outstanding_bytes += s.outstanding_bytes;
    m.outstanding_count += s.outstanding_count;
    m.allocated_count += s.allocated_count;
    m.growth_bytes_per_s += s.growth_bytes_per_s;
    if let Some(r) = &s.reachability {
        m.reachability.get_or_insert_default().add(r);
    }
    if !m.pids.contains(&pid) {
        m.pids.push(pid);
        if s.trend == Trend::Growing {
            m.growing_in += 1;
        }
    }
}

/// Fills each process's site figures and verdict from the report's sites.
pub fn fill(report: &mut Report) {
    let mut sums: BTreeMap<u32, (f64, u64, u64)> = BTreeMap::new();
    for s in report.sites.iter().filter(|s| s.suppressed.is_none()) {
        if let Some(pid) = s.pid {
            let e = sums.entry(pid).or_default();
            e.0 += s.growth_bytes_per_s;
            e.1 += 1;
            e.2 += u64::from(s.trend == Trend::Growing);
        }
    }
    for p in &mut report.processes {
        let (growth, sites, growing) = sums.get(&p.pid).copied().unwrap_or_default();
        p.growth_bytes_per_s = growth;
        p.sites = sites;
        p.growing_sites = growing;
        p.verdict = if growing > 0 { "growing".into() } else { "stable".into() };
    }
    report.merged = merge(report);
}

/// The text report's process table and merged sites (`top` merged sites at most).
pub fn render(out: &mut String, report: &Report, top: usize) {
    if report.processes.is_empty() {
        return;
    }
    let ended = report.processes.iter().filter(|p| p.ended_s.is_some()).count();
    let _ = writeln!(
        out,
        "PROCESSES: {} traced ({} still running, {ended} ended)",
        report.processes.len(),
        report.processes.len() - ended
    );
    let _ = writeln!(
        out,
        "  {:>8} {:<8} {:>10} {:>12} {:>6}  {:<10} lived",
        "PID", "ORIGIN", "HELD", "GROWTH/s", "SITES", "VERDICT"
    );
    for p in &report.processes {
        let lived = match (p.ended_s, &p.ended_by) {
            (Some(at), Some(how)) => format!("+{:.1}s .. +{at:.1}s ({how})", p.joined_s),
            _ => format!("+{:.1}s .. end", p.joined_s),
        };
        let blind = match (p.blind_ms, p.held_ms) {
            (Some(b), _) if b > 0.0 => format!(", unseen for its first {b:.1} ms"),
            (_, Some(h)) => format!(", held at birth {h:.1} ms"),
            _ => String::new(),
        };
        let stub = match &p.stub {
            Some(st) => format!(", stub {} ({} slots)", st.how, st.slots),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "  {:>8} {:<8} {:>10} {:>12} {:>6}  {:<10} {lived}{blind}{stub}",
            p.pid,
            p.origin,
            human_bytes(p.tracked_bytes),
            format!("{}/s", human_bytes(p.growth_bytes_per_s.max(0.0) as u64)),
            p.sites,
            p.verdict,
        );
    }
    let merged: Vec<&MergedSite> = report.merged.iter().filter(|m| m.pids.len() > 1).take(top).collect();
    if !merged.is_empty() {
        let _ = writeln!(out, "\nMERGED ACROSS PROCESSES (same build and stack):");
        for (i, m) in merged.iter().enumerate() {
            let head = Frame::headline(&m.frames)
                .map(super::text::frame_name)
                .unwrap_or_else(|| format!("[no stack] via {}", m.function));
            let _ = writeln!(
                out,
                "  #{} {} outstanding in {} processes, {}/s in total; grows in {} of {}: {head}",
                i + 1,
                human_bytes(m.outstanding_bytes),
                m.pids.len(),
                human_bytes(m.growth_bytes_per_s.max(0.0) as u64),
                m.growing_in,
                m.of,
            );
            if let Some(r) = &m.reachability {
                let _ = writeln!(out, "     scan: {}", super::text::four_classes(r));
            }
        }
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::export::testing;

    fn worker(pid: u32) -> Process {
        Process { pid, exe: "/usr/sbin/server".into(), origin: "child".into(), ..Default::default() }
    }

    /// The same stack in three workers merges into one site with their sum; a process's own
    /// figures add up its sites; a site in one process only is not shown as merged.
    #[test]
    fn one_stack_in_several_workers_merges() {
        let mut r = testing::report();
        let template = r.sites[0].clone();
        r.sites.clear();
        for (pid, bytes, growth) in [(11, 1000, 10.0), (12, 3000, 30.0), (13, 2000, 0.0)] {
            let mut s = template.clone();
            s.pid = Some(pid);
            s.outstanding_bytes = bytes;
            s.growth_bytes_per_s = growth;
            s.trend = if growth > 0.0 { Trend::Growing } else { Trend::Stable };
            r.sites.push(s);
        }
        let mut other = testing::site("calloc", (64, 1), (64, 1), Vec::new());
        other.pid = Some(12);
        r.sites.push(other);
        r.processes = vec![worker(11), worker(12), worker(13)];
        fill(&mut r);

        let m = &r.merged[0];
        assert_eq!((m.outstanding_bytes, m.growth_bytes_per_s), (6000, 40.0));
        assert_eq!((m.pids.clone(), m.growing_in, m.of), (vec![11, 12, 13], 2, 3));
        assert_eq!(r.merged.len(), 2, "the calloc site of one process is its own");
        let p12 = r.processes.iter().find(|p| p.pid == 12).unwrap();
        assert_eq!((p12.sites, p12.growing_sites, p12.verdict.as_ref()), (2, 1, "growing"));
        let p13 = r.processes.iter().find(|p| p.pid == 13).unwrap();
        assert_eq!(p13.verdict, "stable");

        let mut text = String::new();
        render(&mut text, &r, 10);
        assert!(text.contains("PROCESSES: 3 traced (3 still running, 0 ended)"), "{text}");
        assert!(text.contains("in 3 processes") && text.contains("grows in 2 of 3"), "{text}");
        assert!(!text.contains("in 1 processes"), "{text}");
    }
}
