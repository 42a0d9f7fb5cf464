//! V8's source positions: a script's line ends (script offset → line and column). Pure.

/// The 1-based line and column of script offset `pos`, from the offsets where lines end
/// (V8's `Script::line_ends`: the offset of each line's terminator).
pub fn line_column(line_ends: &[u32], pos: u32) -> Option<(u32, u32)> {
    let idx = line_ends.partition_point(|&e| e < pos);
    if idx >= line_ends.len() && line_ends.last().is_some_and(|&e| pos > e) {
        return None;
    }
    let start = if idx == 0 { 0 } else { line_ends[idx - 1] + 1 };
    Some((idx as u32 + 1, pos - start + 1))
}

/// Line ends computed from a script's source, as V8 does when it has not kept them.
pub fn line_ends_of(source: &str) -> Vec<u32> {
    let mut ends: Vec<u32> =
        source.char_indices().filter(|&(_, c)| c == '\n').map(|(i, _)| i as u32).collect();
    ends.push(source.len() as u32);
    ends
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_map_to_lines_and_columns() {
        let src = "const a = 1;\nfunction f() {\n  return a;\n}\n";
        let ends = line_ends_of(src);
        assert_eq!(line_column(&ends, 0), Some((1, 1)));
        let f = src.find("function").unwrap() as u32;
        assert_eq!(line_column(&ends, f), Some((2, 1)));
        let r = src.find("return").unwrap() as u32;
        assert_eq!(line_column(&ends, r), Some((3, 3)));
        assert_eq!(line_column(&ends, 10_000), None);
    }
}
