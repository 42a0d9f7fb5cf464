//! Bytecode offset → source line, for the three line-table formats CPython 3.9–3.13 use.
//! Pure: each decoder takes the table's bytes and `co_firstlineno` and returns the ranges
//! that `PyCode_Addr2Line` would answer for, so lookups agree with the interpreter's own
//! `f_lineno` (the unit tests hold them to `PyCode_Addr2Line` of the real interpreters).
//!
//! - 3.9 `co_lnotab` (`Objects/lnotab_notes.txt`): pairs (Δbytes u8, Δline s8); the line of
//!   an offset is `firstlineno` plus the Δline of every pair whose running offset is at or
//!   below it. It never says "no line".
//! - 3.10 `co_linetable` (PEP 626): pairs (Δbytes u8, Δline s8); each pair is the range
//!   `[end, end + Δbytes)`, Δline −128 meaning "no line" (the running line is kept).
//! - 3.11+ location table (`Objects/locations.md`): entries starting with a byte that has
//!   bit 7 set; bits 3–6 the code, bits 0–2 the length − 1 in code units (2 bytes).

/// Byte offsets `[start, end)` of the bytecode that map to `line` (`None`: no line, as
/// `PyCode_Addr2Line` returning −1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineRange {
    pub start: u32,
    pub end: u32,
    pub line: Option<u32>,
}

/// Which table a code object carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineTableFormat {
    /// 3.9 `co_lnotab`.
    Lnotab,
    /// 3.10 `co_linetable`.
    Pep626,
    /// 3.11+ `co_linetable` (PEP 657 locations).
    Locations,
}

/// Decodes a table in `format`; `None` if it is malformed (3.11+ only: the older formats
/// have no invalid byte strings of even length).
pub fn decode(format: LineTableFormat, table: &[u8], firstlineno: i32) -> Option<Vec<LineRange>> {
    match format {
        LineTableFormat::Lnotab => decode_lnotab(table, firstlineno),
        LineTableFormat::Pep626 => decode_pep626(table, firstlineno),
        LineTableFormat::Locations => decode_locations(table, firstlineno),
    }
}

fn line_of(line: i64) -> Option<u32> {
    u32::try_from(line).ok()
}

fn push(out: &mut Vec<LineRange>, start: u64, end: u64, line: Option<u32>) -> Option<()> {
    if end > start {
        let (start, end) = (u32::try_from(start).ok()?, u32::try_from(end).ok()?);
        out.push(LineRange { start, end, line });
    }
    Some(())
}

/// 3.9 `co_lnotab`. The last range runs to `u32::MAX`, as `PyCode_Addr2Line` answers the
/// last line for any offset past the table.
pub fn decode_lnotab(table: &[u8], firstlineno: i32) -> Option<Vec<LineRange>> {
    let mut out = Vec::new();
    let (mut start, mut line) = (0u64, i64::from(firstlineno));
    for pair in table.chunks_exact(2) {
        let end = start + u64::from(pair[0]);
        push(&mut out, start, end, line_of(line))?;
        start = end;
        line += i64::from(pair[1] as i8);
    }
    push(&mut out, start, u64::from(u32::MAX), line_of(line))?;
    Some(out)
}

/// 3.10 `co_linetable` (PEP 626).
pub fn decode_pep626(table: &[u8], firstlineno: i32) -> Option<Vec<LineRange>> {
    let mut out = Vec::new();
    let (mut end, mut line) = (0u64, i64::from(firstlineno));
    for pair in table.chunks_exact(2) {
        let start = end;
        end += u64::from(pair[0]);
        let delta = pair[1] as i8;
        let this = if delta == -128 {
            None
        } else {
            line += i64::from(delta);
            line_of(line)
        };
        push(&mut out, start, end, this)?;
    }
    Some(out)
}

/// `_PyCodeLocationInfoKind` (`Include/cpython/code.h`).
mod kind {
    pub const ONE_LINE0: u8 = 10;
    pub const ONE_LINE2: u8 = 12;
    pub const NO_COLUMNS: u8 = 13;
    pub const LONG: u8 = 14;
    pub const NONE: u8 = 15;
}

/// A location-table varint: 6 bits a byte, bit 6 = more follow.
fn varint(table: &[u8], at: &mut usize) -> Option<u64> {
    let mut val = 0u64;
    let mut shift = 0u32;
    loop {
        let b = *table.get(*at)?;
        *at += 1;
        val |= u64::from(b & 63).checked_shl(shift)?;
        if b & 64 == 0 {
            return Some(val);
        }
        shift += 6;
        if shift > 60 {
            return None;
        }
    }
}

fn svarint(table: &[u8], at: &mut usize) -> Option<i64> {
    let u = varint(table, at)?;
    let mag = (u >> 1) as i64;
    Some(if u & 1 != 0 { -mag } else { mag })
}

/// 3.11+ location table (`Objects/locations.md`).
pub fn decode_locations(table: &[u8], firstlineno: i32) -> Option<Vec<LineRange>> {
    let mut out = Vec::new();
    let (mut end, mut line) = (0u64, i64::from(firstlineno));
    let mut at = 0usize;
    while at < table.len() {
        let first = table[at];
        if first & 0x80 == 0 {
            return None;
        }
        let code = (first >> 3) & 15;
        let len = u64::from(first & 7) + 1;
        let mut rest = at + 1;
        let delta = match code {
            kind::NO_COLUMNS | kind::LONG => svarint(table, &mut rest)?,
            kind::ONE_LINE0..=kind::ONE_LINE2 => i64::from(code - kind::ONE_LINE0),
            _ => 0,
        };
        line += delta;
        let start = end;
        end += len * 2;
        push(&mut out, start, end, if code == kind::NONE { None } else { line_of(line) })?;
        // The rest of the entry (columns, end line) up to the next entry's first byte.
        at = rest;
        while at < table.len() && table[at] & 0x80 == 0 {
            at += 1;
        }
    }
    Some(out)
}

/// The line of the instruction at byte offset `offset`; `None` when the table has no line
/// for it or does not reach it.
pub fn line_at(ranges: &[LineRange], offset: u32) -> Option<u32> {
    let i = ranges.partition_point(|r| r.end <= offset);
    let r = ranges.get(i)?;
    (r.start <= offset).then_some(r.line).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function compiled by each interpreter (`tests/targets/py_linetable_fixtures.py`):
    /// its table, and `PyCode_Addr2Line` (through ctypes) for every code unit, as runs
    /// `(start byte, end byte, line)`, −1 for no line.
    struct Fixture {
        firstlineno: i32,
        table: &'static str,
        code_bytes: u32,
        lines: &'static [(u32, u32, i32)],
    }

    include!("linetable_fixtures.rs");

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn check(fx: &Fixture, format: LineTableFormat) {
        let ranges = decode(format, &unhex(fx.table), fx.firstlineno).expect("decodes");
        let mut checked = 0;
        for &(start, end, line) in fx.lines {
            for off in (start..end).step_by(2) {
                let want = u32::try_from(line).ok();
                assert_eq!(line_at(&ranges, off), want, "offset {off} ({format:?})");
                checked += 1;
            }
        }
        assert_eq!(checked * 2, fx.code_bytes, "every code unit checked");
        // Ranges are sorted and disjoint (line_at's binary search relies on it).
        assert!(ranges.windows(2).all(|w| w[0].end <= w[1].start), "{ranges:?}");
    }

    #[test]
    fn lnotab_39_matches_addr2line() {
        check(&FX_39, LineTableFormat::Lnotab);
        // 3.9 answers the last line past the table, never "no line".
        let ranges = decode_lnotab(&unhex(FX_39.table), 1).unwrap();
        assert_eq!(line_at(&ranges, 100_000), Some(313));
    }

    #[test]
    fn pep626_310_matches_addr2line() {
        check(&FX_310, LineTableFormat::Pep626);
        let ranges = decode_pep626(&unhex(FX_310.table), 1).unwrap();
        assert_eq!(line_at(&ranges, FX_310.code_bytes), None, "past the end");
        // −128: no line, and the running line is kept for the next pair.
        let r = decode_pep626(&[2, 1, 2, 0x80, 2, 1], 10).unwrap();
        assert_eq!(r.iter().map(|r| r.line).collect::<Vec<_>>(), [Some(11), None, Some(12)]);
    }

    #[test]
    fn locations_311_matches_addr2line() {
        check(&FX_311, LineTableFormat::Locations);
    }

    #[test]
    fn locations_312_matches_addr2line() {
        check(&FX_312, LineTableFormat::Locations);
    }

    #[test]
    fn locations_313_matches_addr2line() {
        check(&FX_313, LineTableFormat::Locations);
    }

    #[test]
    fn locations_refuses_malformed_tables() {
        // Not starting at an entry.
        assert_eq!(decode_locations(&[0x01, 0x80], 1), None);
        // A long-form entry whose varint is cut off.
        assert_eq!(decode_locations(&[0x80 | (14 << 3), 0x41], 1), None);
        // Endless varint continuation.
        assert_eq!(
            decode_locations(
                &[0x80 | (13 << 3), 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f],
                1
            ),
            None
        );
        assert_eq!(decode_locations(&[], 1), Some(vec![]));
    }

    #[test]
    fn locations_signed_varints_and_kinds() {
        // NO_COLUMNS +3 (svarint 6), ONE_LINE2, NONE, LONG −2 (svarint 5) with columns.
        let t =
            [0x80 | (13 << 3), 6, 0x80 | (12 << 3) | 1, 1, 2, 0x80 | (15 << 3), 0x80 | (14 << 3), 5, 0, 1, 2];
        let r = decode_locations(&t, 100).unwrap();
        assert_eq!(
            r,
            [
                LineRange { start: 0, end: 2, line: Some(103) },
                LineRange { start: 2, end: 6, line: Some(105) },
                LineRange { start: 6, end: 8, line: None },
                LineRange { start: 8, end: 10, line: Some(103) },
            ]
        );
    }

    #[test]
    fn negative_lines_are_no_line() {
        let r = decode_lnotab(&[2, 0xfe], 1).unwrap();
        assert_eq!(line_at(&r, 0), Some(1));
        assert_eq!(line_at(&r, 2), None);
    }
}
