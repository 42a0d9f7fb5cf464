//! **Layer: reporting.** Suppressions: LeakSanitizer's `leak:PATTERN` lines and Valgrind's
//! `Memcheck:Leak` blocks, parsed from text and matched against a site's frames. No I/O: the
//! caller reads the files.
//!
//! - LSan (`suppressions=FILE`): `leak:` then a pattern matched, as a substring, against every
//!   frame's function, source file and module; `*` matches anything, `^` and `$` anchor.
//!   `#` starts a comment.
//! - Valgrind (`--suppressions=FILE`): `{ name / Memcheck:Leak / [match-leak-kinds: ...] /
//!   locations }`, the locations matched frame by frame from the allocation function outward:
//!   `fun:` (a function; C++ names mangled, as Valgrind wants them), `obj:` (a module path),
//!   `src:FILE[:LINE]`, and `...` for any number of frames. `*` and `?` are wildcards, and the
//!   whole name must match. Blocks for other tools and kinds (`Memcheck:Cond`, ...) are read
//!   and ignored, as Valgrind ignores them when it looks for leaks.

use serde::{Deserialize, Serialize};

use super::{Report, Site};
use crate::{
    model::{trend::RunVerdict, trend::Trend},
    symbolize::{Frame, data::demangle},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SuppressError {
    #[error(
        "{origin}: {reason} (expected `leak:PATTERN` as LSan reads it, or a Valgrind block \
         `{{ name / Memcheck:Leak / fun:... }}`)"
    )]
    Parse { origin: String, reason: String },
}

/// Valgrind's leak kinds, as `match-leak-kinds:` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeakKind {
    Definite,
    Indirect,
    Possible,
    Reachable,
}

/// One suppression as written, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `FILE:LINE` of its first line.
    pub origin: String,
    /// What the user wrote: the LSan pattern, or the Valgrind block's name.
    pub text: String,
    pattern: Pattern,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Lsan(String),
    Valgrind { kinds: Option<Vec<LeakKind>>, locations: Vec<Location> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Location {
    Fun(String),
    Obj(String),
    Src {
        file: String,
        line: Option<u32>,
    },
    /// `...`: zero or more frames.
    Any,
}

/// What a site looks like to the matcher: its allocation function and its frames, innermost
/// first (the frame after the allocation function first).
pub struct Subject<'a> {
    /// `malloc`, `operator new[]`, ...: Valgrind's stacks start with it.
    pub function: &'a str,
    pub frames: &'a [Frame],
    /// The leak kinds it has blocks of, when a scan classified them; `None` without a scan.
    pub kinds: Option<&'a [LeakKind]>,
}

/// Every rule read, in order.
#[derive(Clone, Debug, Default)]
pub struct Suppressions {
    pub rules: Vec<Rule>,
}

impl Suppressions {
    /// Reads one file's text; `name` is what errors and origins call it. Both formats may
    /// share a file.
    pub fn parse(name: &str, text: &str) -> Result<Self, SuppressError> {
        let mut rules = Vec::new();
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
        while let Some((n, line)) = lines.next() {
            let origin = format!("{name}:{n}");
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line == "{" {
                if let Some(rule) = valgrind_block(&origin, &mut lines)? {
                    rules.push(rule);
                }
                continue;
            }
            let Some((kind, pattern)) = line.split_once(':') else {
                return Err(parse_error(&origin, format!("`{line}` has no `type:` prefix")));
            };
            if kind.trim() != "leak" {
                return Err(parse_error(
                    &origin,
                    format!(
                        "unknown suppression type `{}`: LSan's leak check reads only `leak:`",
                        kind.trim()
                    ),
                ));
            }
            let pattern = pattern.trim();
            if pattern.is_empty() {
                return Err(parse_error(&origin, "`leak:` with an empty pattern".into()));
            }
            rules.push(Rule {
                origin,
                text: pattern.to_string(),
                pattern: Pattern::Lsan(pattern.to_string()),
            });
        }
        Ok(Suppressions { rules })
    }

    pub fn extend(&mut self, other: Suppressions) {
        self.rules.extend(other.rules);
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule that matches the site, as LSan and Valgrind take the first.
    pub fn matching(&self, s: &Subject<'_>) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(s))
    }
}

impl Rule {
    fn matches(&self, s: &Subject<'_>) -> bool {
        match &self.pattern {
            // LSan suppresses leaks only: with a scan, a site must have lost blocks.
            Pattern::Lsan(p) => {
                s.kinds.is_none_or(|k| k.contains(&LeakKind::Definite) || k.contains(&LeakKind::Indirect))
                    && lsan_matches(p, s)
            }
            Pattern::Valgrind { kinds, locations } => {
                let kinds_ok = match (kinds, s.kinds) {
                    (Some(want), Some(have)) => want.iter().any(|k| have.contains(k)),
                    _ => true,
                };
                kinds_ok && valgrind_matches(locations, s)
            }
        }
    }

    /// `leak:PATTERN` or the Valgrind block's name, for the report.
    pub fn describe(&self) -> String {
        match &self.pattern {
            Pattern::Lsan(p) => format!("leak:{p}"),
            Pattern::Valgrind { .. } => format!("{{ {} }}", self.text),
        }
    }
}

/// What the suppressions did to a report (its `suppressions`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Applied {
    /// Every rule that matched a site, in the files' order.
    pub used: Vec<Use>,
    /// Rules that matched nothing.
    pub unused: Vec<Unused>,
}

/// A rule that matched, and what it took out: bytes lost (definitely and indirectly) when a
/// scan classified them, else bytes outstanding.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Use {
    pub rule: String,
    pub origin: String,
    pub sites: u64,
    pub count: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Unused {
    pub rule: String,
    pub origin: String,
}

/// The kinds of blocks a site has, in Valgrind's words; `None` without a scan.
fn site_kinds(s: &Site) -> Option<Vec<LeakKind>> {
    let r = s.reachability.as_ref()?;
    let all = [
        (r.definitely_lost.count, LeakKind::Definite),
        (r.indirectly_lost.count, LeakKind::Indirect),
        (r.possibly_lost.count, LeakKind::Possible),
        (r.reachable.count, LeakKind::Reachable),
    ];
    Some(all.into_iter().filter(|(n, _)| *n > 0).map(|(_, k)| k).collect())
}

/// What a suppressed site takes out of the gate: lost blocks with a scan, else outstanding.
fn site_weight(s: &Site) -> (u64, u64) {
    match &s.reachability {
        Some(r) => (r.lost_bytes(), r.definitely_lost.count + r.indirectly_lost.count),
        None => (s.outstanding_bytes, s.outstanding_count),
    }
}

/// Leaking, for the verdict: growing now, or holding lost blocks.
fn leaking(s: &Site) -> bool {
    s.trend == Trend::Growing || s.reachability.is_some_and(|r| r.lost_bytes() > 0)
}

/// Marks the sites the rules match (`Site::suppressed`), records what each rule took out, and
/// leaves suppressed sites out of the run's verdict. Sites with nothing outstanding are not
/// matched: a suppression is for what is left.
pub fn apply(report: &mut Report, rules: &Suppressions) {
    if rules.is_empty() {
        return;
    }
    let mut used: Vec<Use> = Vec::new();
    let mut hits = vec![false; rules.rules.len()];
    for site in report.sites.iter_mut().filter(|s| s.outstanding_bytes > 0) {
        let kinds = site_kinds(site);
        let subject = Subject { function: &site.function, frames: &site.frames, kinds: kinds.as_deref() };
        let Some(i) = rules.matching(&subject) else { continue };
        let rule = &rules.rules[i];
        hits[i] = true;
        site.suppressed = Some(rule.describe());
        let (bytes, count) = site_weight(site);
        match used.iter_mut().find(|u| u.origin == rule.origin) {
            Some(u) => {
                u.sites += 1;
                u.bytes += bytes;
                u.count += count;
            }
            None => {
                used.push(Use { rule: rule.describe(), origin: rule.origin.clone(), sites: 1, count, bytes })
            }
        }
    }
    let unused = rules
        .rules
        .iter()
        .zip(&hits)
        .filter(|(_, hit)| !**hit)
        .map(|(r, _)| Unused { rule: r.describe(), origin: r.origin.clone() })
        .collect();
    adjust_verdict(report, &used);
    report.suppressions = Some(Applied { used, unused });
}

fn adjust_verdict(report: &mut Report, used: &[Use]) {
    if used.is_empty() {
        return;
    }
    let (bytes, sites): (u64, u64) = used.iter().fold((0, 0), |(b, n), u| (b + u.bytes, n + u.sites));
    let left_out = format!(
        "{} in {} suppressed call site{} left out (--suppressions)",
        crate::report::text::human_bytes(bytes),
        sites,
        if sites == 1 { "" } else { "s" }
    );
    let v = &mut report.verdict;
    let bad = matches!(v.kind, RunVerdict::Leak | RunVerdict::Accumulation | RunVerdict::Cycle);
    let unsuppressed_leaking = report.sites.iter().any(|s| s.suppressed.is_none() && leaking(s));
    if bad && !unsuppressed_leaking {
        v.summary =
            format!("only suppressed call sites grow or leak: {left_out}; without them: {}", v.summary);
        v.kind = RunVerdict::Stable;
    } else {
        v.summary = format!("{}; {left_out}", v.summary);
    }
}

/// The gate's figure without the suppressed sites: `total` less their definitely lost bytes
/// (with a scan) or their outstanding bytes (without).
pub fn unsuppressed_gate(report: &Report, total: u64, scanned: bool) -> u64 {
    let suppressed: u64 = report
        .sites
        .iter()
        .filter(|s| s.suppressed.is_some())
        .map(|s| match (&s.reachability, scanned) {
            (Some(r), true) => r.definitely_lost.bytes,
            (_, true) => 0,
            (_, false) => s.outstanding_bytes,
        })
        .sum();
    total.saturating_sub(suppressed)
}

fn parse_error(origin: &str, reason: String) -> SuppressError {
    SuppressError::Parse { origin: origin.to_string(), reason }
}

/// The lines of a `{ ... }` block after its `{`. `None` for a block that is not a leak
/// suppression (Valgrind's other error kinds), which is read and skipped.
fn valgrind_block<'a>(
    origin: &str,
    lines: &mut impl Iterator<Item = (usize, &'a str)>,
) -> Result<Option<Rule>, SuppressError> {
    let mut body = Vec::new();
    loop {
        match lines.next() {
            None => return Err(parse_error(origin, "a `{` block without its `}`".into())),
            Some((_, "}")) => break,
            Some((_, l)) if l.is_empty() || l.starts_with('#') => {}
            Some((_, l)) => body.push(l),
        }
    }
    let [name, kind, rest @ ..] = body.as_slice() else {
        return Err(parse_error(origin, "a Valgrind block needs a name and a `Tool:Kind` line".into()));
    };
    let Some((tools, what)) = kind.split_once(':') else {
        return Err(parse_error(origin, format!("`{kind}` is not a `Tool:Kind` line")));
    };
    if !tools.split(',').any(|t| t.trim() == "Memcheck") || what.trim() != "Leak" {
        return Ok(None);
    }
    let mut kinds = None;
    let mut locations = Vec::new();
    for line in rest {
        if let Some(list) = line.strip_prefix("match-leak-kinds:") {
            kinds = Some(leak_kinds(origin, list)?);
        } else if *line == "..." {
            locations.push(Location::Any);
        } else if let Some(f) = line.strip_prefix("fun:") {
            locations.push(Location::Fun(f.trim().to_string()));
        } else if let Some(o) = line.strip_prefix("obj:") {
            locations.push(Location::Obj(o.trim().to_string()));
        } else if let Some(s) = line.strip_prefix("src:") {
            let s = s.trim();
            locations.push(match s.rsplit_once(':').and_then(|(f, l)| Some((f, l.parse().ok()?))) {
                Some((file, line)) => Location::Src { file: file.to_string(), line: Some(line) },
                None => Location::Src { file: s.to_string(), line: None },
            });
        } else {
            return Err(parse_error(origin, format!("`{line}` is not a fun:, obj:, src: or ... line")));
        }
    }
    if locations.is_empty() {
        return Err(parse_error(origin, format!("the block `{name}` has no fun:, obj: or src: line")));
    }
    let kinds = kinds.filter(|k: &Vec<LeakKind>| k.len() < 4);
    Ok(Some(Rule {
        origin: origin.to_string(),
        text: name.to_string(),
        pattern: Pattern::Valgrind { kinds, locations },
    }))
}

fn leak_kinds(origin: &str, list: &str) -> Result<Vec<LeakKind>, SuppressError> {
    let mut kinds = Vec::new();
    for k in list.split(',').map(str::trim) {
        match k {
            "definite" => kinds.push(LeakKind::Definite),
            "indirect" => kinds.push(LeakKind::Indirect),
            "possible" => kinds.push(LeakKind::Possible),
            "reachable" => kinds.push(LeakKind::Reachable),
            "all" => kinds.extend([
                LeakKind::Definite,
                LeakKind::Indirect,
                LeakKind::Possible,
                LeakKind::Reachable,
            ]),
            "none" => {}
            other => {
                return Err(parse_error(origin, format!("unknown leak kind `{other}` in match-leak-kinds")));
            }
        }
    }
    Ok(kinds)
}

/// LSan's rule: any frame's function, file or module contains the pattern.
fn lsan_matches(pattern: &str, s: &Subject<'_>) -> bool {
    let alloc = std::iter::once(s.function);
    let frames =
        s.frames.iter().flat_map(|f| [f.function.as_deref(), f.file.as_deref(), f.module.as_deref()]);
    alloc.chain(frames.flatten()).any(|text| template_match(pattern, text))
}

/// LSan's template: unanchored unless it starts with `^` or ends with `$`; `*` matches any run.
pub fn template_match(template: &str, text: &str) -> bool {
    if text.is_empty() {
        return false;
    }
    let (start, t) = match template.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, template),
    };
    let (end, t) = match t.strip_suffix('$') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let parts: Vec<&str> = t.split('*').collect();
    let mut at = 0;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        if part.is_empty() {
            continue;
        }
        if i == 0 && start {
            if !text.starts_with(part) {
                return false;
            }
            at = part.len();
        } else if last && end {
            // The last piece must end the text, past what the others took.
            return text.len() >= at + part.len() && text.ends_with(part);
        } else {
            match text[at..].find(part) {
                Some(p) => at += p + part.len(),
                None => return false,
            }
        }
    }
    // An end anchor after `*` (or an empty template) holds; otherwise the text must be used up.
    !end || at == text.len() || parts.last().is_some_and(|p| p.is_empty())
}

/// Valgrind's glob over the whole name: `*` any run, `?` one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut back: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            back = Some((pi, ti));
            pi += 1;
        } else if let Some((bp, bt)) = back {
            pi = bp + 1;
            ti = bt + 1;
            back = Some((bp, bt + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// One frame of a Valgrind stack: its function (as we name it), module and source.
struct VgFrame<'a> {
    function: Option<&'a str>,
    module: Option<&'a str>,
    file: Option<&'a str>,
    line: Option<u32>,
}

/// Valgrind's name for an allocation function: C++'s are mangled (x86-64's size_t).
fn valgrind_alloc_name(function: &str) -> &str {
    match function {
        "operator new" => "_Znwm",
        "operator new[]" => "_Znam",
        other => other,
    }
}

fn valgrind_matches(locations: &[Location], s: &Subject<'_>) -> bool {
    let first =
        VgFrame { function: Some(valgrind_alloc_name(s.function)), module: None, file: None, line: None };
    let rest = s.frames.iter().map(|f| VgFrame {
        function: f.function.as_deref(),
        module: f.module.as_deref(),
        file: f.file.as_deref(),
        line: f.line,
    });
    let stack: Vec<VgFrame<'_>> = std::iter::once(first).chain(rest).collect();
    match_from(locations, &stack)
}

/// Matches the locations against a prefix of the stack (Valgrind ignores the frames after
/// the last location).
fn match_from(locations: &[Location], stack: &[VgFrame<'_>]) -> bool {
    let Some((loc, more)) = locations.split_first() else {
        return true;
    };
    if *loc == Location::Any {
        return (0..=stack.len()).any(|skip| match_from(more, &stack[skip..]));
    }
    let Some((frame, outer)) = stack.split_first() else {
        return false;
    };
    location_matches(loc, frame) && match_from(more, outer)
}

fn location_matches(loc: &Location, f: &VgFrame<'_>) -> bool {
    match loc {
        Location::Fun(p) => f.function.is_some_and(|name| function_matches(p, name)),
        // The allocation function's own frame has no module here: Valgrind's is its preload
        // library (`obj:*vgpreload_memcheck*`), which nothing else can match.
        Location::Obj(p) => match f.module {
            Some(m) => glob_match(p, m),
            None => p.contains("vgpreload"),
        },
        Location::Src { file, line } => {
            f.file.is_some_and(|name| glob_match(file, name) || glob_match(file, basename(name)))
                && line.is_none_or(|l| f.line == Some(l))
        }
        Location::Any => true,
    }
}

/// A `fun:` pattern against a frame's (demangled) name: as written, or demangled when it is a
/// mangled name without wildcards, with or without the parameter list.
fn function_matches(pattern: &str, name: &str) -> bool {
    if glob_match(pattern, name) {
        return true;
    }
    if pattern.starts_with("_Z") && !pattern.contains(['*', '?']) {
        let d = demangle(pattern);
        return d == name || without_params(&d) == without_params(name);
    }
    false
}

/// `ns::f(int) const` -> `ns::f`; names without a parameter list as they are.
fn without_params(name: &str) -> &str {
    if !name.ends_with(')') && !name.ends_with(" const") {
        return name;
    }
    // The parameter list is the last top-level parenthesis group.
    let mut depth = 0i32;
    for (i, c) in name.char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' => {
                depth -= 1;
                if depth == 0 {
                    return &name[..i];
                }
            }
            _ => {}
        }
    }
    name
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, file: Option<&str>, line: Option<u32>, module: &str) -> Frame {
        Frame {
            address: 0x1000,
            function: Some(function.into()),
            file: file.map(Into::into),
            line,
            module: Some(module.into()),
            inlined: false,
            runtime: None,
            column: None,
        }
    }

    fn stack() -> Vec<Frame> {
        vec![
            frame("leak_example()", Some("/src/app/main.cpp"), Some(4), "/opt/app/bin/app"),
            frame("main", Some("/src/app/main.cpp"), Some(9), "/opt/app/bin/app"),
            frame("__libc_start_call_main", None, None, "/usr/lib/x86_64-linux-gnu/libc.so.6"),
        ]
    }

    fn matches(text: &str, function: &str, frames: &[Frame]) -> Option<usize> {
        let s = Suppressions::parse("t.supp", text).unwrap();
        s.matching(&Subject { function, frames, kinds: None })
    }

    #[test]
    fn lsan_templates_are_substrings_with_stars_and_anchors() {
        assert!(template_match("leak_example", "leak_example()"));
        assert!(template_match("leak*ple", "leak_example()"));
        assert!(template_match("^leak", "leak_example()"));
        assert!(!template_match("^example", "leak_example()"));
        assert!(template_match("main.cpp$", "/src/app/main.cpp"));
        assert!(!template_match("main$", "/src/app/main.cpp"));
        assert!(template_match("^/src/*.cpp$", "/src/app/main.cpp"));
        assert!(!template_match("^/src/*.c$", "/src/app/main.cpp"));
        assert!(template_match("*", "x"));
        assert!(!template_match("x", ""));
        assert!(template_match("a*a$", "aa"));
        assert!(!template_match("ab*ab$", "ab"));
    }

    #[test]
    fn lsan_lines_match_functions_files_and_modules() {
        let f = stack();
        assert_eq!(matches("leak:leak_example\n", "operator new[]", &f), Some(0));
        assert_eq!(matches("# known\nleak:other\nleak:main.cpp\n", "malloc", &f), Some(1));
        assert_eq!(matches("leak:libc.so.6", "malloc", &f), Some(0));
        assert_eq!(matches("leak:^malloc$", "malloc", &f), Some(0));
        assert_eq!(matches("leak:nothing_like_it", "malloc", &f), None);
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        let e = Suppressions::parse("k.supp", "leak:a\n\nrace:b\n").unwrap_err();
        assert_eq!(
            e.to_string().split(" (expected").next(),
            Some("k.supp:3: unknown suppression type `race`: LSan's leak check reads only `leak:`")
        );
        assert!(Suppressions::parse("k.supp", "leak:\n").is_err());
        assert!(Suppressions::parse("k.supp", "{\n name\n Memcheck:Leak\n fun:malloc\n").is_err());
        assert!(Suppressions::parse("k.supp", "{\n name\n Memcheck:Leak\n bogus\n}\n").is_err());
    }

    #[test]
    fn valgrind_blocks_match_from_the_allocation_function() {
        let f = stack();
        let block = "{\n   known\n   Memcheck:Leak\n   match-leak-kinds: definite\n   fun:_Znam\n   fun:_Z12leak_examplev\n   fun:main\n}\n";
        assert_eq!(matches(block, "operator new[]", &f), Some(0));
        assert_eq!(matches(block, "malloc", &f), None, "the first frame is the allocation function");
        let ellipsis = "{\n x\n Memcheck:Leak\n fun:malloc\n ...\n fun:main\n}\n";
        assert_eq!(matches(ellipsis, "malloc", &f), Some(0));
        let obj = "{\n x\n Memcheck:Leak\n obj:*vgpreload_memcheck*\n ...\n obj:/opt/app/bin/*\n}\n";
        assert_eq!(matches(obj, "malloc", &f), Some(0));
        let src = "{\n x\n Memcheck:Leak\n fun:malloc\n src:main.cpp:4\n}\n";
        assert_eq!(matches(src, "malloc", &f), Some(0));
        let wrong_line = "{\n x\n Memcheck:Leak\n fun:malloc\n src:main.cpp:5\n}\n";
        assert_eq!(matches(wrong_line, "malloc", &f), None);
        let too_deep = "{\n x\n Memcheck:Leak\n fun:malloc\n fun:*\n fun:*\n fun:*\n fun:*\n}\n";
        assert_eq!(matches(too_deep, "malloc", &f), None, "more locations than frames");
        let other_kind = "{\n x\n Memcheck:Cond\n fun:malloc\n}\nleak:main\n";
        let s = Suppressions::parse("t", other_kind).unwrap();
        assert_eq!(s.rules.len(), 1, "a Memcheck:Cond block is skipped");
    }

    #[test]
    fn match_leak_kinds_need_a_scan_class_to_apply() {
        let f = stack();
        let s =
            Suppressions::parse("t", "{\n x\n Memcheck:Leak\n match-leak-kinds: reachable\n fun:malloc\n}\n")
                .unwrap();
        let lost = [LeakKind::Definite];
        assert_eq!(s.matching(&Subject { function: "malloc", frames: &f, kinds: Some(&lost) }), None);
        let held = [LeakKind::Reachable];
        assert_eq!(s.matching(&Subject { function: "malloc", frames: &f, kinds: Some(&held) }), Some(0));
        assert_eq!(s.matching(&Subject { function: "malloc", frames: &f, kinds: None }), Some(0));
        let lsan = Suppressions::parse("t", "leak:main\n").unwrap();
        assert_eq!(
            lsan.matching(&Subject { function: "malloc", frames: &f, kinds: Some(&held) }),
            None,
            "LSan rules suppress leaks only"
        );
        assert_eq!(lsan.matching(&Subject { function: "malloc", frames: &f, kinds: Some(&lost) }), Some(0));
        assert_eq!(
            lsan.matching(&Subject { function: "malloc", frames: &f, kinds: None }),
            Some(0),
            "no scan: outstanding"
        );
    }

    #[test]
    fn globs_and_parameter_lists() {
        assert!(glob_match("_Z*", "_Znwm"));
        assert!(glob_match("ma?loc", "malloc"));
        assert!(!glob_match("malloc", "malloc2"));
        assert!(glob_match("*vgpreload*", "/usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so"));
        assert_eq!(without_params("ns::f(int) const"), "ns::f");
        assert_eq!(without_params("f(std::function<void (int)>)"), "f");
        assert_eq!(without_params("main"), "main");
    }

    fn scanned(lost: u64) -> crate::report::scan::Reachability {
        use crate::report::scan::{ClassTally, Reachability};
        Reachability { definitely_lost: ClassTally { bytes: lost, count: 1 }, ..Reachability::default() }
    }

    #[test]
    fn applied_rules_take_their_sites_out_of_the_gate_and_the_verdict() {
        let mut r = crate::report::export::testing::report();
        r.verdict.kind = RunVerdict::Leak;
        r.verdict.summary = "grows".into();
        for s in &mut r.sites {
            s.reachability = Some(scanned(s.outstanding_bytes));
            s.trend = if s.outstanding_bytes > 0 { Trend::Growing } else { Trend::Stable };
        }
        let all_lost: u64 = r.sites.iter().map(|s| s.outstanding_bytes).sum();
        let first = r.sites[0].frames[0].function.clone().unwrap();
        let rules = Suppressions::parse("k.supp", &format!("leak:{first}\nleak:no_such_function\n")).unwrap();
        apply(&mut r, &rules);
        let applied = r.suppressions.clone().unwrap();
        assert_eq!(applied.used.len(), 1);
        assert_eq!(applied.used[0].bytes, r.sites[0].outstanding_bytes);
        assert_eq!(
            applied.unused,
            [Unused { rule: "leak:no_such_function".into(), origin: "k.supp:2".into() }]
        );
        assert_eq!(r.sites[0].suppressed.as_deref(), Some(format!("leak:{first}").as_str()));
        assert_eq!(unsuppressed_gate(&r, all_lost, true), all_lost - r.sites[0].outstanding_bytes);
        assert_eq!(r.verdict.kind, RunVerdict::Leak, "another site still leaks");
        assert!(r.verdict.summary.contains("suppressed call site left out"), "{}", r.verdict.summary);

        let every = Suppressions::parse("all.supp", "leak:main\n").unwrap();
        let mut r2 = crate::report::export::testing::report();
        r2.verdict.kind = RunVerdict::Leak;
        for s in &mut r2.sites {
            s.trend = if s.outstanding_bytes > 0 { Trend::Growing } else { Trend::Stable };
        }
        apply(&mut r2, &every);
        assert_eq!(r2.verdict.kind, RunVerdict::Stable, "{}", r2.verdict.summary);
        assert_eq!(unsuppressed_gate(&r2, 4300, false), 0, "no scan: outstanding bytes taken out");
    }
}
