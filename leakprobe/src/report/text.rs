//! The report as people read it: header, warnings, then growing call sites in the style of
//! LeakSanitizer ("N bytes in K objects allocated from: #0 ... file:line").

use std::fmt::Write as _;

use super::{Report, Site};
use crate::model::{DROP_KINDS, RankFigures, SortBy};

/// Bytes in binary units: "512 B", "64.0 KiB", "1.50 MiB".
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v < 10.0 { format!("{v:.2} {}", UNITS[unit]) } else { format!("{v:.1} {}", UNITS[unit]) }
}

pub(crate) fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn frame_line(out: &mut String, idx: usize, f: &crate::symbolize::Frame) {
    let func = f.function.as_deref().unwrap_or("[unknown]");
    let loc = f.location().map(|l| format!(" {l}")).unwrap_or_default();
    let module =
        f.module.as_deref().map(|m| format!(" ({})", m.rsplit('/').next().unwrap_or(m))).unwrap_or_default();
    let inl = if f.inlined { " [inlined]" } else { "" };
    if let Some(rt) = &f.runtime {
        let _ = writeln!(out, "    #{idx} [{rt}] {func}{loc}");
        return;
    }
    let _ = writeln!(out, "    #{idx} {:#014x} in {func}{loc}{module}{inl}", f.address);
}

fn site_block(out: &mut String, rank: usize, s: &Site) {
    let _ = writeln!(
        out,
        "#{rank} {} outstanding in {} allocated by {}{} from:",
        human_bytes(s.outstanding_bytes),
        plural(s.outstanding_count, "object", "objects"),
        s.function,
        s.pid.map(|p| format!(" in PID {p}")).unwrap_or_default(),
    );
    for (i, f) in s.frames.iter().enumerate() {
        frame_line(out, i, f);
    }
    if s.frames.is_empty() {
        let _ = writeln!(out, "    (stack not available: see drops)");
    }
    match &*s.stack_end {
        "max-depth" => {
            let _ = writeln!(out, "    ... (stack cut at --max-stack frames)");
        }
        "no-unwind-info" => {
            let _ = writeln!(out, "    ... (stack ends: no unwind information above this frame)");
        }
        _ => {}
    }
    let trend = match (s.trend, s.fit) {
        (crate::model::trend::Trend::NotEnoughData, _) | (_, None) => "trend: not enough data".to_string(),
        (t, Some(f)) => format!(
            "trend: {} {}{}/s over the last {:.0} s (R\u{b2} {:.2}, rising in {:.0}% of intervals)",
            if t == crate::model::trend::Trend::Growing { "GROWING" } else { "stable" },
            if f.slope_per_s < 0.0 { "-" } else { "+" },
            human_bytes(f.slope_per_s.abs() as u64),
            f.span_s,
            f.r2,
            f.rising_fraction * 100.0
        ),
    };
    let _ = writeln!(out, "  {trend}");
    let oldest = s.oldest_age_s.map(|a| format!(", oldest {a:.1} s")).unwrap_or_default();
    let _ = writeln!(
        out,
        "  growth {}/s{oldest}; {} allocated ({}), {} freed; last interval +{} / -{}",
        human_bytes(s.growth_bytes_per_s.max(0.0) as u64),
        plural(s.allocated_count, "block", "blocks"),
        human_bytes(s.allocated_bytes),
        s.freed_count,
        s.interval_allocs,
        s.interval_frees,
    );
    let _ = writeln!(
        out,
        "  peak {} in {}{}",
        human_bytes(s.peak_bytes),
        plural(s.peak_count, "block", "blocks"),
        s.temporary_count.map(|t| format!("; {t} temporary")).unwrap_or_default(),
    );
    if let Some(r) = &s.reachability {
        reachability_lines(out, s, r);
    }
    out.push('\n');
}

/// "definitely lost 1000 B in 10, indirectly 0 B in 0, possibly ..., reachable ...".
pub(super) fn four_classes(r: &crate::report::scan::Reachability) -> String {
    format!(
        "definitely lost {} in {}, indirectly {} in {}, possibly {} in {}, reachable {} in {}",
        human_bytes(r.definitely_lost.bytes),
        r.definitely_lost.count,
        human_bytes(r.indirectly_lost.bytes),
        r.indirectly_lost.count,
        human_bytes(r.possibly_lost.bytes),
        r.possibly_lost.count,
        human_bytes(r.reachable.bytes),
        r.reachable.count,
    )
}

/// Python object types shown in the text report; the JSON has them all.
const PYTHON_TYPES_SHOWN: usize = 12;

/// A CPython target's live objects by type.
fn python_objects_lines(out: &mut String, p: &crate::report::scan::PythonObjects) {
    if let Some(e) = &p.error {
        let _ = writeln!(out, "  python objects: no census this time: {e}");
        return;
    }
    let _ = writeln!(
        out,
        "  python objects ({}): {} objects{}, {}, in {} types; the cycle collector is {}{}{}",
        p.source,
        p.objects,
        if p.untracked_objects > 0 {
            let large = if p.outside_arenas > 0 {
                format!(", {} of them over 512 B", p.outside_arenas)
            } else {
                String::new()
            };
            format!(" ({} not tracked by the collector{large})", p.untracked_objects)
        } else {
            String::new()
        },
        human_bytes(p.bytes),
        p.types.len(),
        if p.gc_enabled { "enabled" } else { "DISABLED (gc.disable()): cycles are never freed" },
        if p.garbage > 0 { format!("; {} objects in gc.garbage", p.garbage) } else { String::new() },
        if p.permanent > 0 {
            format!("; {} frozen (permanent generation)", p.permanent)
        } else {
            String::new()
        },
    );
    match &p.arenas_not_walked {
        Some(why) => {
            let _ = writeln!(out, "    containers only (str, int, bytes, bytearray are not counted): {why}");
        }
        None if p.bad_pools > 0 => {
            let _ = writeln!(out, "    {} pymalloc pools did not check out and were skipped", p.bad_pools);
        }
        None => {}
    }
    let width = p.types.iter().take(PYTHON_TYPES_SHOWN).map(|t| t.label().len()).max().unwrap_or(0);
    for t in p.types.iter().take(PYTHON_TYPES_SHOWN) {
        let change = match t.count_change {
            Some(c) if c != 0 => format!("  {c:+}"),
            _ => String::new(),
        };
        let made = t.sites.first().map_or_else(String::new, |s| format!("  made now by {s}"));
        let _ = writeln!(
            out,
            "    {:<width$}  {:>9}  {:>10}{change}{made}",
            t.label(),
            t.count,
            human_bytes(t.bytes)
        );
    }
    if p.types.len() > PYTHON_TYPES_SHOWN {
        let _ = writeln!(out, "    ... {} more types in the JSON report", p.types.len() - PYTHON_TYPES_SHOWN);
    }
    python_cycle_lines(out, p);
    if let Some(b) = &p.backrefs {
        backref_lines(out, b);
    }
}

/// `--backrefs`: each object's path from its root, root first (the picture is
/// `--backrefs-svg`).
fn backref_lines(out: &mut String, b: &crate::report::scan::Backrefs) {
    let _ = writeln!(out, "  backrefs {}: {} found, {} drawn", b.r#type, b.found, b.drawn);
    let mut lines: Vec<(String, u32)> = Vec::new();
    for (t, _) in b.nodes.iter().enumerate().filter(|(_, n)| n.kind == "target") {
        let mut path = vec![t];
        while let Some(&(p, _)) =
            b.edges.iter().find(|&&(p, c)| c == *path.last().unwrap_or(&t) && !path.contains(&p))
        {
            path.push(p);
            if path.len() > 16 {
                break;
            }
        }
        let root = path.last().is_some_and(|&n| b.nodes[n].kind == "root");
        let labels: Vec<&str> = path.iter().rev().map(|&n| b.nodes[n].label.as_str()).collect();
        let tail = if root { "" } else { " (no root reaches it)" };
        let line = format!("{}{tail}", labels.join(" -> "));
        match lines.iter_mut().find(|l| l.0 == line) {
            Some(l) => l.1 += 1,
            None => lines.push((line, 1)),
        }
    }
    for (line, n) in lines {
        let times = if n > 1 { format!("{n} x ") } else { String::new() };
        let _ = writeln!(out, "    {times}{line}");
    }
}

/// Cycles shown in the text report; the JSON has every shape.
const PYTHON_CYCLES_SHOWN: usize = 5;

fn python_cycle_lines(out: &mut String, p: &crate::report::scan::PythonObjects) {
    if p.cycles.is_empty() {
        return;
    }
    let total: u64 = p.cycles.iter().map(|c| c.count).sum();
    let _ = writeln!(
        out,
        "  python cycles: {total} groups of objects that only reach each other, unreachable from any root; {}",
        p.cycles_fate
    );
    for c in p.cycles.iter().take(PYTHON_CYCLES_SHOWN) {
        let members: Vec<String> =
            c.objects.iter().map(|o| format!("{} {} ({})", o.count, o.r#type, o.allocated)).collect();
        let _ = writeln!(
            out,
            "    {} {} of {}, {} in all",
            c.count,
            if c.count == 1 { "cycle" } else { "cycles" },
            members.join(" + "),
            human_bytes(c.bytes)
        );
    }
    if p.cycles.len() > PYTHON_CYCLES_SHOWN {
        let _ = writeln!(
            out,
            "    ... {} more kinds of cycle in the JSON report",
            p.cycles.len() - PYTHON_CYCLES_SHOWN
        );
    }
}

/// `--census`: the whole heap, and the groups of blocks from before attach.
fn census_lines(out: &mut String, c: &crate::report::scan::Census) {
    let _ = writeln!(
        out,
        "  census:  {} arena{}, {} from the system: {} in use in {} chunks, {} free ({} in bins, {} in the \
         thread caches and fastbins), {} at the top{}",
        c.arenas,
        if c.arenas == 1 { "" } else { "s" },
        human_bytes(c.arena_bytes),
        human_bytes(c.in_use.bytes),
        c.in_use.count,
        human_bytes(c.free.bytes + c.cached_free.bytes),
        human_bytes(c.free.bytes),
        human_bytes(c.cached_free.bytes),
        human_bytes(c.top_bytes),
        if c.mmapped.count > 0 {
            format!("; {} in {} mmapped chunks", human_bytes(c.mmapped.bytes), c.mmapped.count)
        } else {
            String::new()
        }
    );
    let _ =
        writeln!(out, "           blocks not tracked (from before attach): {}", four_classes(&c.untracked));
    for e in &c.walk_errors {
        let _ = writeln!(out, "           WALK STOPPED (figures of that heap incomplete): {e}");
    }
    for n in &c.notes {
        let _ = writeln!(out, "           note: {n}");
    }
    let lost: Vec<_> = c
        .groups
        .iter()
        .filter(|g| g.reachability.lost_bytes() + g.reachability.possibly_lost.bytes > 0)
        .take(5)
        .collect();
    if !lost.is_empty() {
        let _ = writeln!(out, "           largest unreachable groups from before attach:");
    }
    for g in lost {
        let r = &g.reachability;
        let _ = writeln!(
            out,
            "             {} lost in {} {}{}{}",
            human_bytes(r.lost_bytes() + r.possibly_lost.bytes),
            r.definitely_lost.count + r.indirectly_lost.count + r.possibly_lost.count,
            g.group,
            if r.possibly_lost.count > 0 {
                format!(" ({} only possibly)", r.possibly_lost.count)
            } else {
                String::new()
            },
            g.likely_origin
                .as_ref()
                .map(|o| format!("; since attach, such blocks come from {o}"))
                .unwrap_or_default()
        );
    }
    let mut held: Vec<_> = c.groups.iter().filter(|g| g.reachability.reachable.bytes > 0).collect();
    held.sort_by_key(|g| std::cmp::Reverse(g.reachability.reachable.bytes));
    if !held.is_empty() {
        let _ = writeln!(out, "           largest reachable groups from before attach:");
    }
    for g in held.iter().take(5) {
        let _ = writeln!(
            out,
            "             {} in {} {}{}",
            human_bytes(g.reachability.reachable.bytes),
            g.reachability.reachable.count,
            g.group,
            g.held_by.first().map(|h| format!(", held by {}", h.holder)).unwrap_or_default()
        );
    }
}

/// `--scan`: a site's classes, its verdict, and what holds it.
fn reachability_lines(out: &mut String, s: &Site, r: &crate::report::scan::Reachability) {
    let classes: Vec<String> = [
        ("definitely lost", r.definitely_lost),
        ("indirectly lost", r.indirectly_lost),
        ("possibly lost", r.possibly_lost),
        ("reachable", r.reachable),
    ]
    .iter()
    .filter(|(_, t)| t.count > 0)
    .map(|(name, t)| format!("{} {name} in {}", human_bytes(t.bytes), plural(t.count, "block", "blocks")))
    .collect();
    let why = match s.verdict.as_deref() {
        Some("LEAK") if r.definitely_lost.count + r.indirectly_lost.count > 0 => {
            " (no pointer reaches them: a missing free or delete)"
        }
        Some("LEAK") => " (only pointers into their middle reach them)",
        Some("CYCLE") => " (they only point at each other: break the cycle, e.g. a weak_ptr)",
        Some("ACCUMULATION") => " (still referenced: bound or evict what holds them)",
        Some("NOT ENOUGH DATA") => " (too few samples of this site to tell whether it grows)",
        _ => "",
    };
    let _ = writeln!(
        out,
        "  {}: {}{why}",
        s.verdict.as_deref().unwrap_or("scan"),
        if classes.is_empty() { "no blocks at the scan".to_string() } else { classes.join(", ") }
    );
    for h in s.held_by.iter().take(3) {
        let chain = match h.chain {
            0 | 1 => format!("{} of this site", plural(h.blocks, "block", "blocks")),
            n if n >= h.blocks => {
                format!(
                    "{} of this site, each linked from the previous one",
                    plural(h.blocks, "block", "blocks")
                )
            }
            n => format!("{} of this site, in chains up to {n} long", plural(h.blocks, "block", "blocks")),
        };
        let _ = writeln!(out, "  held by {} -> {chain} ({})", h.holder, human_bytes(h.bytes));
    }
    if s.held_by.len() > 3 {
        let _ = writeln!(out, "  ... and {} more holders (see --format json)", s.held_by.len() - 3);
    }
}

/// Renders the report. `top` limits how many growing call sites are printed in full.
/// The figures a site is ranked by, from the report.
fn figures(s: &Site) -> RankFigures {
    RankFigures {
        growth_bytes_per_s: crate::model::growth_rate(s.fit, s.growth_bytes_per_s),
        outstanding_bytes: s.outstanding_bytes,
        peak_bytes: s.peak_bytes,
        calls: s.allocated_count,
        temporary: s.temporary_count.unwrap_or(0),
    }
}

/// `function (file:line)`, or `function (module)` without a line.
pub(super) fn frame_name(f: &crate::symbolize::Frame) -> String {
    let func = f.function.as_deref().unwrap_or("[unknown]");
    match f.location() {
        Some(l) => format!("{func} ({l})"),
        None => format!(
            "{func} ({})",
            f.module.as_deref().map(|m| m.rsplit('/').next().unwrap_or(m)).unwrap_or("?")
        ),
    }
}

/// A site in one line: its headline frame and, when that is in a library (libstdc++'s string
/// constructor, say) or inlined (a template from a header), the function of the executable
/// `exe` it ran in: its first frame there that was not inlined.
fn site_name(s: &Site, exe: &str) -> String {
    let Some(head) = crate::symbolize::Frame::headline(&s.frames) else {
        return format!("[no stack] via {}", s.function);
    };
    let in_exe = |f: &&crate::symbolize::Frame| f.module.as_deref() == Some(exe) && !f.inlined;
    if head.runtime.is_some() || in_exe(&head) {
        return frame_name(head);
    }
    match s.frames.iter().find(in_exe) {
        Some(caller) => format!("{} <- {}", frame_name(head), frame_name(caller)),
        None => frame_name(head),
    }
}

/// heaptrack_print's four rankings, three sites each, in its order: calls, peak, leaked,
/// temporary.
fn rankings_lines(out: &mut String, r: &Report) {
    let rankings = [
        (SortBy::Calls, "MOST CALLS TO ALLOCATION FUNCTIONS"),
        (SortBy::Peak, "PEAK MEMORY CONSUMERS"),
        (SortBy::Outstanding, "MOST MEMORY LEAKED (outstanding)"),
        (SortBy::Temporary, "MOST TEMPORARY ALLOCATIONS"),
    ];
    for (by, title) in rankings {
        if by == SortBy::Temporary && r.sampling.estimated {
            let _ = writeln!(out, "{title}: not counted when sampling");
            continue;
        }
        let mut sites: Vec<&Site> = r.sites.iter().filter(|s| by.score(&figures(s)) > 0.0).collect();
        by.sort(&mut sites, |s| figures(s));
        let _ = writeln!(out, "{title}");
        if sites.is_empty() {
            let _ = writeln!(out, "  (none)");
        }
        for s in sites.iter().take(3) {
            let _ = writeln!(
                out,
                "  {:>10} calls  peak {:>10}  leaked {:>10}  {:>8} temporary  {}",
                s.allocated_count,
                human_bytes(s.peak_bytes),
                human_bytes(s.outstanding_bytes),
                s.temporary_count.map_or("-".to_string(), |t| t.to_string()),
                site_name(s, &r.target.exe)
            );
        }
    }
    let _ = writeln!(out);
}

/// The sites the report shows in full, in `sort`'s order: those with something outstanding
/// (growth, outstanding), or any with a non-zero figure (peak, calls, temporary).
fn shown_sites(r: &Report, sort: SortBy) -> Vec<&Site> {
    let open = r.sites.iter().filter(|s| s.suppressed.is_none());
    let mut sites: Vec<&Site> = match sort {
        SortBy::Growth | SortBy::Outstanding => open.filter(|s| s.outstanding_bytes > 0).collect(),
        _ => open.filter(|s| sort.score(&figures(s)) > 0.0).collect(),
    };
    // The report comes ordered by outstanding bytes already.
    if sort != SortBy::Outstanding {
        sort.sort(&mut sites, |s| figures(s));
    }
    sites
}

/// The suppressed sites, by rule, as LSan's "Suppressions used", and the rules that matched
/// nothing.
fn suppressed_lines(out: &mut String, r: &Report, applied: &crate::report::suppress::Applied) {
    if !applied.used.is_empty() {
        let _ = writeln!(out, "SUPPRESSED (--suppressions; left out of --fail-on-leak and the verdict):");
    }
    for u in &applied.used {
        let _ = writeln!(
            out,
            "  {} ({}): {} in {} from {}",
            u.rule,
            u.origin,
            human_bytes(u.bytes),
            plural(u.count, "object", "objects"),
            plural(u.sites, "call site", "call sites"),
        );
        for s in r.sites.iter().filter(|s| s.suppressed.as_deref() == Some(u.rule.as_str())) {
            let _ = writeln!(
                out,
                "      {} outstanding: {}",
                human_bytes(s.outstanding_bytes),
                site_name(s, &r.target.exe)
            );
        }
    }
    for u in &applied.unused {
        let _ = writeln!(out, "  suppression {} ({}) matched nothing", u.rule, u.origin);
    }
    out.push('\n');
}

/// The first lines: what was traced, how it ended, the target and the host.
fn header_lines(out: &mut String, r: &Report) {
    let t = &r.target;
    let _ = writeln!(
        out,
        "leakprobe {}: PID {} ({}) traced for {:.1} s from {} ({}; {} samples every {:.1} s)",
        r.leakprobe.version,
        t.pid,
        t.exe,
        r.window.duration_s,
        r.window.start,
        match t.ended_by.as_str() {
            "target-exited" => match t.exit_status {
                Some(code) => format!("ended: target exited with status {code}"),
                None => "ended: target exited".to_string(),
            },
            "target-exec" => "ended: target called exec; its new image was not traced".to_string(),
            "signal" => "ended: interrupted".to_string(),
            "overhead-budget" => format!(
                "ended: DETACHED EARLY, probe hits above --max-overhead {}/s",
                r.overhead.max_hits_per_s.unwrap_or(0)
            ),
            other => format!("ended: {other}"),
        },
        r.window.samples,
        r.window.interval_s,
    );
    if !t.cmdline.is_empty() {
        let _ = writeln!(out, "  command: {}", t.cmdline.join(" "));
    }
    let _ = writeln!(
        out,
        "  target:  started {}, exe build-id {}",
        t.start_time.as_deref().unwrap_or("unknown"),
        t.build_id.as_deref().unwrap_or("none"),
    );
    let _ = writeln!(
        out,
        "  host:    kernel {}, libc {}{}; leakprobe {} run as: {}",
        r.host.kernel,
        r.host.libc.as_deref().unwrap_or("unknown"),
        r.host.libc_version.as_deref().map(|v| format!(" (glibc {v})")).unwrap_or_default(),
        r.leakprobe.version,
        r.leakprobe.args.join(" "),
    );
}

/// The allocator hooked and the probes, by module.
fn allocator_lines(out: &mut String, r: &Report) {
    let a = &r.allocator;
    let _ = writeln!(
        out,
        "  allocator: {} in {}{} ({})",
        a.name,
        a.module,
        if a.static_executable { " (static executable)" } else { "" },
        if a.chosen_by == "auto" { "detected" } else { &a.chosen_by },
    );
    for o in &a.also {
        let _ = writeln!(out, "             also hooked: {} in {}", o.name, o.module);
    }
    if !a.shadowed.is_empty() {
        let _ =
            writeln!(out, "             shadowed (calls counted as untracked): {}", a.shadowed.join(", "));
    }
    if let Some(w) = &a.warning {
        let _ = writeln!(out, "  WARNING: {w}");
    }
    let mut by_module: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for p in r.probes.iter().filter(|p| !p.watch_only) {
        let idx = match by_module.iter().position(|(m, _, _)| *m == p.module) {
            Some(i) => i,
            None => {
                by_module.push((p.module.clone(), Vec::new(), Vec::new()));
                by_module.len() - 1
            }
        };
        if let Some(alias) = &p.alias_of {
            by_module[idx].1.push(format!("{}(={alias})", p.function));
        } else if p.attached && p.offset > 0 {
            by_module[idx].1.push(format!("{}(+{:#x})", p.function, p.offset));
        } else if p.attached {
            by_module[idx].1.push(p.function.clone());
        } else {
            by_module[idx].2.push(p.function.clone());
        }
    }
    for (module, ok, missing) in &by_module {
        let _ = writeln!(
            out,
            "  probes:  {} in {module}",
            if ok.is_empty() { "none".into() } else { ok.join(" ") }
        );
        if !missing.is_empty() {
            let _ = writeln!(out, "           not attached (optional): {}", missing.join(" "));
        }
    }
}

/// `--in-process`: the stub, its slots and what it left in the target.
fn in_process_lines(out: &mut String, r: &Report, ip: &crate::report::InProcess) {
    let slots: u64 = ip.patched.iter().map(|p| p.slots).sum();
    let modules =
        ip.patched.iter().map(|p| p.module.as_str()).collect::<std::collections::BTreeSet<_>>().len();
    let _ = writeln!(
        out,
        "  sampler: in-process stub: {slots} GOT slots in {modules} modules; target paused {:.1} ms to \
         install (slots written in {:.1} ms, no stop), {} to restore ({})",
        ip.map_pause_ms,
        ip.patch_pause_ms,
        ip.restore_pause_ms.map_or("not".to_string(), |p| format!("{p:.1} ms")),
        ip.restored_slots.map_or("target gone".to_string(), |n| format!("{n} slots restored")),
    );
    if r.sampling.estimated {
        let _ = writeln!(
            out,
            "           the stub followed {} sampled allocations and {} of their frees{}",
            ip.stub_sampled_allocs,
            ip.stub_sampled_frees,
            if ip.stub_set_full > 0 {
                format!("; DEGRADED: its pointer set was full {} times, sampling stopped", ip.stub_set_full)
            } else {
                String::new()
            }
        );
    }
    if ip.repatched_slots > 0 {
        let _ = writeln!(
            out,
            "           {} GOT slots lost the stub's address while attached and were put back at the \
             next interval (calls through them in between were not seen)",
            ip.repatched_slots
        );
    }
    if ip.from_entry {
        let _ = writeln!(
            out,
            "           installed at the program's entry point: allocations made before it (by the \
             libraries' constructors) were not seen"
        );
    }
    for s in &ip.skipped {
        let _ = writeln!(out, "           not patched: {} in {} ({})", s.function, s.module, s.reason);
    }
    let _ = writeln!(out, "           left in the target: {}", ip.left_in_target);
}

/// Estimates, drops, what the probes saw and what they cost.
fn activity_lines(out: &mut String, r: &Report) {
    if r.sampling.estimated {
        let _ = writeln!(
            out,
            "  ESTIMATES: allocations sampled about once per {} allocated (--sample-bytes);\n           \
             every figure below is an unbiased estimate, not a count",
            human_bytes(r.sampling.sample_bytes)
        );
    }
    if r.window.min_age_s > 0.0 {
        let _ = writeln!(out, "  counting only blocks at least {:.1} s old (--min-age)", r.window.min_age_s);
    }

    let dropped: Vec<(&str, u64)> = DROP_KINDS
        .iter()
        .filter_map(|(_, name, words)| r.drops.get(*name).filter(|v| **v > 0).map(|v| (*words, *v)))
        .collect();
    if dropped.is_empty() {
        let _ = writeln!(out, "  drops:   none");
    } else {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "!!! WARNING: DEGRADED REPORT: events were dropped; figures below are incomplete !!!"
        );
        for (words, v) in &dropped {
            let _ = writeln!(out, "!!!   {v} {words}");
        }
        let _ = writeln!(out);
    }
    let act = |k: &str| r.activity.get(k).copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "  seen:    {} allocation calls, {} frees, {} frees of blocks {}",
        act("alloc_calls"),
        act("free_calls"),
        act("unknown_frees"),
        if r.sampling.estimated { "not sampled or from before attach" } else { "from before attach" },
    );
    let _ = writeln!(
        out,
        "  cost:    {:.0} probe hits/s on average, {:.0}/s at peak",
        r.overhead.mean_hits_per_s, r.overhead.peak_hits_per_s
    );
    let (cut, no_info) = (act("truncated_stacks"), act("stacks_without_unwind_info"));
    if cut + no_info > 0 {
        let _ = writeln!(
            out,
            "  stacks:  {cut} cut at --max-stack, {no_info} ended at code without unwind information"
        );
    }
    let _ = writeln!(out);
}

/// The scan: its pause, its classes, the census and the Python objects.
fn scan_summary_lines(out: &mut String, sc: &crate::report::scan::Scan) {
    let t = &sc.totals;
    let _ = writeln!(
        out,
        "  scan:    at +{:.1} s, {} ({}): {} {:.1} ms (+{:.1} ms to reap), {} threads, {} read, \
         {} blocks in {:.0} ms",
        sc.at_s,
        if sc.method == "clone" { "a copy-on-write snapshot" } else { "copied while stopped" },
        sc.no_clone_why.as_deref().unwrap_or("forked inside the target, never run"),
        if sc.processes.is_empty() { "target paused" } else { "each process paused at most" },
        sc.pause_ms,
        sc.reap_pause_ms,
        sc.threads,
        human_bytes(sc.bytes_read),
        sc.blocks_scanned,
        sc.duration_ms,
    );
    let _ = writeln!(
        out,
        "           {}{}",
        four_classes(t),
        if sc.cycles.is_empty() {
            String::new()
        } else {
            format!("; {} cycles of lost blocks", sc.cycles.len() as u64 + sc.cycles_rest)
        }
    );
    process_scan_lines(out, &sc.processes);
    if let Some(c) = &sc.census {
        census_lines(out, c);
    }
    if let Some(p) = &sc.python_objects {
        python_objects_lines(out, p);
    }
    if sc.unreadable_bytes > 0 {
        let _ = writeln!(
            out,
            "           {} of memory could not be read: a pointer there could hold a block called lost",
            human_bytes(sc.unreadable_bytes)
        );
    }
    let _ = writeln!(out);
}

/// Processes whose scan is listed in the text report; the JSON has them all.
const PROCESS_SCANS_SHOWN: usize = 16;

/// Several processes: each one's scan, or why it had none.
fn process_scan_lines(out: &mut String, processes: &[crate::report::scan::ProcessScan]) {
    if processes.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "           {} scanned one at a time:",
        plural(processes.len() as u64, "process", "processes")
    );
    for p in processes.iter().take(PROCESS_SCANS_SHOWN) {
        let _ = match &p.error {
            Some(e) => writeln!(out, "             PID {}: not scanned: {e}", p.pid),
            None => writeln!(
                out,
                "             PID {}: paused {:.1} ms, {} blocks: {}",
                p.pid,
                p.pause_ms,
                p.blocks_scanned,
                four_classes(&p.totals)
            ),
        };
    }
    if processes.len() > PROCESS_SCANS_SHOWN {
        let _ =
            writeln!(out, "             and {} more (in the JSON)", processes.len() - PROCESS_SCANS_SHOWN);
    }
}

/// The verdict, then for a `run` heaptrack's rankings, then the heap's peak.
fn verdict_lines(out: &mut String, r: &Report) {
    let _ = writeln!(out, "VERDICT: {}: {}", r.verdict.label(), r.verdict.summary);
    let _ = writeln!(out);
    if r.target.is_run && !r.sites.is_empty() {
        rankings_lines(out, r);
    }
    if r.totals.peak_bytes > 0 {
        let _ = writeln!(
            out,
            "PEAK: the tracked heap held at most {} in {}, {:.1} s after attach{}.\n",
            human_bytes(r.totals.peak_bytes),
            plural(r.totals.peak_count, "block", "blocks"),
            r.totals.peak_at_s,
            if r.sampling.estimated { " (estimated)" } else { "" },
        );
    }
}

/// The sites shown in full (in `sort`'s order), the suppressed ones, and the summary.
fn sites_lines(out: &mut String, r: &Report, top: usize, sort: SortBy) {
    let growing: Vec<&Site> = r.sites.iter().filter(|s| s.outstanding_bytes > 0).collect();
    let shown = shown_sites(r, sort);
    if shown.is_empty() {
        let _ = writeln!(out, "No outstanding allocations from call sites seen since attach.");
    } else {
        if sort != SortBy::Outstanding {
            let _ = writeln!(out, "Call sites by {} (--sort):\n", sort.name());
        }
        for (i, s) in shown.iter().take(top).enumerate() {
            site_block(out, i + 1, s);
        }
        if shown.len() > top {
            let _ = writeln!(
                out,
                "... {} more call sites (raise --top, or see --format json)\n",
                shown.len() - top
            );
        }
    }
    if let Some(applied) = &r.suppressions {
        suppressed_lines(out, r, applied);
    }
    let freed_all = r.sites.len() - growing.len();
    let _ = writeln!(
        out,
        "SUMMARY: {} outstanding in {} from {} since attach{}.",
        human_bytes(r.totals.outstanding_bytes),
        plural(r.totals.outstanding_count, "object", "objects"),
        plural(growing.len() as u64, "call site", "call sites"),
        if freed_all > 0 {
            format!("; {freed_all} more call sites freed everything they allocated")
        } else {
            String::new()
        },
    );
    if r.totals.evicted_sites > 0 {
        let _ = writeln!(
            out,
            "         {} ended long ago (nothing outstanding, idle past --evict-after) and were \
             evicted to keep memory bounded; their calls are in the totals.",
            plural(r.totals.evicted_sites, "call site", "call sites"),
        );
    }
}

pub fn render(r: &Report, top: usize, sort: SortBy) -> String {
    let mut out = String::new();
    header_lines(&mut out, r);
    allocator_lines(&mut out, r);
    if let Some(ip) = &r.in_process {
        in_process_lines(&mut out, r, ip);
    }
    if let Some(rt) = &r.runtime {
        runtime_lines(&mut out, rt, r.sampling.estimated);
    }
    if let Some(js) = &r.js_heap {
        js_heap_lines(&mut out, js);
    }
    activity_lines(&mut out, r);
    if let Some(sc) = &r.scan {
        scan_summary_lines(&mut out, sc);
    }
    verdict_lines(&mut out, r);
    super::processes::render(&mut out, r, top);
    sites_lines(&mut out, r, top, sort);
    out
}

/// `--js-heap`: the sampling and the inspector's window.
fn js_heap_lines(out: &mut String, js: &crate::report::JsHeapInfo) {
    let _ = writeln!(
        out,
        "  js heap: V8's sampling heap profiler, one sample per {} on average (estimates, as js-heap sites); {} sampled objects alive at the end",
        human_bytes(js.sampling_interval_bytes),
        js.live_samples
    );
    let window = match (js.opened_by_leakprobe, &js.close_error) {
        (true, None) => format!(
            "opened by leakprobe with SIGUSR1 on 127.0.0.1:{}, open {:.1} s, closed",
            js.port, js.open_s
        ),
        (true, Some(e)) => format!("opened by leakprobe on port {}; CLOSING FAILED ({e}): check it", js.port),
        (false, _) => {
            format!("the target's own inspector on port {}, used {:.1} s and left open", js.port, js.open_s)
        }
    };
    let _ = writeln!(out, "           inspector: {window}");
    if js.polls > 0 {
        let _ = writeln!(
            out,
            "           {}, each after a full GC in the target: {:.0} ms on average, {:.0} ms at most",
            plural(js.polls, "profile fetched", "profiles fetched"),
            js.poll_ms_mean,
            js.poll_ms_max
        );
    }
    if js.failed_polls > 0 {
        let _ = writeln!(
            out,
            "           {} profiles could not be fetched (last: {})",
            js.failed_polls,
            js.last_error.as_deref().unwrap_or("?")
        );
    }
    if let Some(rows) = &js.comparison {
        comparison_lines(out, rows, &js.snapshot_pauses_ms);
    }
}

/// Constructors shown in the text comparison.
const COMPARISON_TEXT_ROWS: usize = 10;

/// `--js-heap-snapshot`: DevTools' Comparison view, and the top rows' retainer paths.
fn comparison_lines(out: &mut String, rows: &[crate::runtimes::v8::snapshot::ComparisonRow], pauses: &[f64]) {
    let pauses: Vec<String> = pauses.iter().map(|p| format!("{p:.0} ms")).collect();
    let _ = writeln!(
        out,
        "\nJS HEAP COMPARISON (last snapshot against the first; each stopped the event loop: {})",
        pauses.join(", ")
    );
    let _ = writeln!(
        out,
        "  {:<32} {:>8} {:>8} {:>8} {:>11} {:>11} {:>11}",
        "constructor", "#new", "#deleted", "#delta", "alloc size", "freed size", "size delta"
    );
    for r in rows.iter().take(COMPARISON_TEXT_ROWS) {
        let name: String = r.constructor.chars().take(32).collect();
        let sign = if r.size_delta < 0 { "-" } else { "+" };
        let _ = writeln!(
            out,
            "  {name:<32} {:>8} {:>8} {:>+8} {:>11} {:>11} {:>11}",
            r.new,
            r.deleted,
            r.delta,
            human_bytes(r.alloc_size),
            human_bytes(r.freed_size),
            format!("{sign}{}", human_bytes(r.size_delta.unsigned_abs()))
        );
    }
    for r in rows.iter().filter(|r| r.retainers.is_some()) {
        let _ = writeln!(out, "  retained: {}", r.retainers.as_deref().unwrap_or(""));
    }
}

/// The runtime found in the target: its frames, its allocator tables.
fn runtime_lines(out: &mut String, rt: &crate::report::RuntimeInfo, estimated: bool) {
    let _ =
        writeln!(out, "  runtime: {} {} in {}: its frames are in the stacks", rt.name, rt.version, rt.module);
    let kind = if rt.name == "V8" { "JavaScript" } else { "Python" };
    for (why, n) in &rt.walks_cut {
        let _ = writeln!(out, "           {n} stacks' {kind} frames were cut short ({why})");
    }
    let Some(a) = &rt.allocators else { return };
    if let Some(why) = &a.left_alone {
        let _ = writeln!(out, "           allocator tables not hooked: {why}");
    } else {
        let words: u64 = a.hooked.iter().map(|p| p.slots).sum();
        let _ = writeln!(
            out,
            "           {words} allocator-table words led into a stub (target paused {:.1} ms); {}",
            a.map_pause_ms,
            match (a.restored, a.restore_pause_ms) {
                (Some(n), Some(p)) => format!("{n} restored at detach ({p:.1} ms)"),
                _ => "not restored: the target ended".into(),
            }
        );
        if estimated {
            let _ = writeln!(
                out,
                "           the stub followed {} sampled objects and {} of their frees{}",
                a.stub_sampled_allocs,
                a.stub_sampled_frees,
                if a.stub_set_full > 0 {
                    "; DEGRADED: its pointer set was full, sampling stopped"
                } else {
                    ""
                }
            );
        }
        if a.arena_allocator.is_none() {
            let _ = writeln!(
                out,
                "           pymalloc's arena allocator not found: its arenas show as mmap sites"
            );
        }
        for s in &a.skipped {
            let _ = writeln!(out, "           not hooked: {} ({})", s.function, s.reason);
        }
        let _ = writeln!(out, "           left in the target: {}", a.left_in_target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.00 KiB");
        assert_eq!(human_bytes(64 * 1024), "64.0 KiB");
        assert_eq!(human_bytes(3 << 20), "3.00 MiB");
    }

    #[test]
    fn python_cycles_and_backrefs_read_as_lines() {
        use crate::report::scan::{BackrefNode, Backrefs, PythonCycle, PythonCycleObjects, PythonObjects};
        let node = |label: &str, kind: &str| BackrefNode { label: label.into(), kind: kind.into() };
        let p = PythonObjects {
            cycles: vec![PythonCycle {
                count: 998,
                objects: vec![PythonCycleObjects {
                    r#type: "__main__.Node".into(),
                    count: 2,
                    allocated: "from before attach".into(),
                }],
                blocks: 3992,
                bytes: 114_224,
            }],
            cycles_fate: "the cycle collector is disabled (gc.disable()): they are never freed".into(),
            backrefs: Some(Backrefs {
                r#type: "bytearray".into(),
                found: 772,
                drawn: 2,
                nodes: vec![
                    node("module __main__, global cache (dict, 772 entries)", "root"),
                    node("dict, 772 entries", "object"),
                    node("bytearray", "target"),
                    node("bytearray", "target"),
                    node("__main__.Node", "target"),
                    node("__main__.Node", "object"),
                ],
                edges: vec![(0, 1), (1, 2), (1, 3), (5, 4), (4, 5)],
            }),
            ..PythonObjects::default()
        };
        let mut out = String::new();
        python_cycle_lines(&mut out, &p);
        backref_lines(&mut out, p.backrefs.as_ref().unwrap());
        assert!(out.contains("python cycles: 998 groups of objects that only reach each other"), "{out}");
        assert!(
            out.contains("998 cycles of 2 __main__.Node (from before attach), 111.5 KiB in all"),
            "{out}"
        );
        assert!(out.contains("backrefs bytearray: 772 found, 2 drawn"), "{out}");
        // The same path twice is one line with its count; a cycle has no root.
        assert!(
            out.contains(
                "2 x module __main__, global cache (dict, 772 entries) -> dict, 772 entries -> bytearray\n"
            ),
            "{out}"
        );
        assert!(out.contains("__main__.Node -> __main__.Node (no root reaches it)"), "{out}");
    }
}
