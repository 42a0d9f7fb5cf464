//! **Layer: reporting.** `--format lsan`: the report as LeakSanitizer prints it, so that
//! scripts written for LSan's output (and its `grep LeakSanitizer` gates) work unchanged.
//!
//! Direct leaks (definitely lost) first, then indirect ones, each largest first; then the
//! suppressions used, then `SUMMARY: leakprobe: N byte(s) leaked in M allocation(s).` As LSan
//! does, nothing more is printed when nothing leaked and no suppression matched: only the
//! first line, leakprobe's mark (`leakprobe VERSION: PID N (exe), --format lsan`), which does
//! not say "LeakSanitizer".

use std::fmt::Write as _;

use super::{Module, Report, Site};
use crate::symbolize::Frame;

/// LSan's frame #0 is its interceptor of the allocation function, named as C++ writes it.
fn allocator_name(function: &str) -> &str {
    match function {
        "operator new" => "operator new(unsigned long)",
        "operator new[]" => "operator new[](unsigned long)",
        other => other,
    }
}

/// `(module+0xoffset)` as LSan writes a frame it has no source line for.
fn module_offset(f: &Frame, modules: &[Module]) -> String {
    let Some(path) = f.module.as_deref() else {
        return "(<unknown module>)".into();
    };
    match modules.iter().find(|m| m.path == path && m.start <= f.address && f.address < m.end) {
        Some(m) => format!("({path}+{:#x})", f.address - m.start + m.file_offset),
        None => format!("({path})"),
    }
}

fn frame_line(out: &mut String, n: usize, f: &Frame, modules: &[Module]) {
    let place = match (&f.file, f.line) {
        (Some(file), Some(line)) => match f.column {
            Some(c) => format!("{file}:{line}:{c}"),
            None => format!("{file}:{line}"),
        },
        _ => module_offset(f, modules),
    };
    // LSan prints the call instruction's address, one before the return address we hold.
    let pc = if f.runtime.is_some() { f.address } else { f.address.saturating_sub(1) };
    match &f.function {
        Some(func) => {
            let _ = writeln!(out, "    #{n} {pc:#x} in {func} {place}");
        }
        None => {
            let _ = writeln!(out, "    #{n} {pc:#x}  {place}");
        }
    }
}

/// One leak block: "Direct leak of 400 byte(s) in 1 object(s) allocated from:" and the stack.
fn leak_block(out: &mut String, direct: bool, bytes: u64, count: u64, s: &Site, modules: &[Module]) {
    let _ = writeln!(
        out,
        "{} leak of {bytes} byte(s) in {count} object(s) allocated from:",
        if direct { "Direct" } else { "Indirect" }
    );
    let _ = writeln!(out, "    #0 0x000000000000 in {}", allocator_name(&s.function));
    for (i, f) in s.frames.iter().enumerate() {
        frame_line(out, i + 1, f, modules);
    }
    out.push('\n');
}

/// LeakSanitizer's report of the sites' lost blocks, leaving out suppressed sites. Needs a
/// scan (sites without a class are not leaks LSan would report).
pub fn render(r: &Report) -> String {
    // The mark leakprobe knows its own outputs by (so that the next run may replace the
    // file); it must not say "LeakSanitizer", which gates grep for.
    let mut out = format!(
        "leakprobe {}: PID {} ({}), --format lsan\n",
        r.leakprobe.version, r.target.pid, r.target.exe
    );
    let unsuppressed = || r.sites.iter().filter(|s| s.suppressed.is_none());
    let mut direct: Vec<(&Site, u64, u64)> = unsuppressed()
        .filter_map(|s| s.reachability.map(|c| (s, c.definitely_lost.bytes, c.definitely_lost.count)))
        .filter(|(_, b, n)| *b > 0 || *n > 0)
        .collect();
    let mut indirect: Vec<(&Site, u64, u64)> = unsuppressed()
        .filter_map(|s| s.reachability.map(|c| (s, c.indirectly_lost.bytes, c.indirectly_lost.count)))
        .filter(|(_, b, n)| *b > 0 || *n > 0)
        .collect();
    direct.sort_by_key(|(_, b, _)| std::cmp::Reverse(*b));
    indirect.sort_by_key(|(_, b, _)| std::cmp::Reverse(*b));
    let (bytes, count) =
        direct.iter().chain(&indirect).fold((0u64, 0u64), |(b, n), (_, sb, sn)| (b + sb, n + sn));
    if count > 0 {
        let _ = writeln!(out, "\n=================================================================");
        let _ = writeln!(
            out,
            "=={}==ERROR: LeakSanitizer: detected memory leaks (found by leakprobe)\n",
            r.target.pid
        );
        for (s, b, n) in &direct {
            leak_block(&mut out, true, *b, *n, s, &r.modules);
        }
        for (s, b, n) in &indirect {
            leak_block(&mut out, false, *b, *n, s, &r.modules);
        }
    }
    if let Some(applied) = r.suppressions.as_ref().filter(|a| !a.used.is_empty()) {
        let line = "-----------------------------------------------------";
        let _ = writeln!(out, "{line}\nSuppressions used:\n  count      bytes template");
        for u in &applied.used {
            let template = u.rule.strip_prefix("leak:").unwrap_or(&u.rule);
            let _ = writeln!(out, "{:>7} {:>10} {template}", u.count, u.bytes);
        }
        let _ = writeln!(out, "{line}\n");
    }
    if count > 0 {
        let _ = writeln!(out, "SUMMARY: leakprobe: {bytes} byte(s) leaked in {count} allocation(s).");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::scan::{ClassTally, Reachability};

    #[test]
    fn lost_blocks_read_as_lsans_report() {
        let mut r = crate::report::export::testing::report();
        let none = render(&r);
        assert_eq!(none.lines().count(), 1, "nothing scanned, nothing leaked: the mark only\n{none}");
        assert!(!none.contains("LeakSanitizer"), "a grep gate must stay green: {none}");
        r.sites[0].reachability = Some(Reachability {
            definitely_lost: ClassTally { bytes: 400, count: 1 },
            indirectly_lost: ClassTally { bytes: 96, count: 2 },
            ..Reachability::default()
        });
        let text = render(&r);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with("ERROR: LeakSanitizer: detected memory leaks (found by leakprobe)"))
        );
        let direct =
            lines.iter().position(|l| *l == "Direct leak of 400 byte(s) in 1 object(s) allocated from:");
        let indirect =
            lines.iter().position(|l| *l == "Indirect leak of 96 byte(s) in 2 object(s) allocated from:");
        assert!(direct.is_some() && indirect > direct, "direct first:\n{text}");
        let f = &r.sites[0].frames[0];
        let want = format!(
            "    #1 {:#x} in {} {}:{}",
            f.address - 1,
            f.function.as_deref().unwrap(),
            f.file.as_deref().unwrap(),
            f.line.unwrap()
        );
        assert_eq!(lines[direct.unwrap() + 2], want, "{text}");
        assert_eq!(*lines.last().unwrap(), "SUMMARY: leakprobe: 496 byte(s) leaked in 3 allocation(s).");
    }
}
