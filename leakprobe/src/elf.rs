//! Function symbols of a target's module, as file offsets for uprobes.

use std::{collections::HashMap, path::Path};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ElfError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a readable ELF file")]
    Parse {
        path: String,
        #[source]
        source: object::Error,
    },
}

/// The GNU build-id of the ELF file at `path`, as lowercase hex; `None` if it has none or
/// cannot be read.
pub fn build_id(path: &Path) -> Option<String> {
    let data = std::fs::read(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let id = file.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// The version a glibc announces in its banner ("... release version 2.36."), if `path` is
/// one.
pub fn glibc_version(path: &Path) -> Option<String> {
    let data = std::fs::read(path).ok()?;
    const NEEDLE: &[u8] = b"release version ";
    let at = data.windows(NEEDLE.len()).position(|w| w == NEEDLE)? + NEEDLE.len();
    let rest = data.get(at..at + 16)?;
    let len = rest.iter().position(|c| !(c.is_ascii_digit() || *c == b'.'))?;
    let v = std::str::from_utf8(&rest[..len]).ok()?.trim_end_matches('.');
    (!v.is_empty()).then(|| v.to_string())
}

/// A function's place in its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionSym {
    pub offset: u64,
    pub size: u64,
}

/// The named functions that `path` defines, with their file offsets and sizes, and the file's
/// bytes. Names not found are absent. Aliases (glibc's memalign and aligned_alloc) come back
/// with the same offset.
pub fn functions(path: &Path, names: &[&str]) -> Result<(HashMap<String, FunctionSym>, Vec<u8>), ElfError> {
    let shown = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| ElfError::Read { path: shown.clone(), source })?;
    let file = object::File::parse(&*data).map_err(|source| ElfError::Parse { path: shown, source })?;
    let mut out = HashMap::new();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if !sym.is_definition() || sym.kind() != object::SymbolKind::Text {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        if !names.contains(&name) || out.contains_key(name) {
            continue;
        }
        let Some(section) = sym.section_index().and_then(|i| file.section_by_index(i).ok()) else { continue };
        let Some((sec_offset, _)) = section.file_range() else { continue };
        let Some(rel) = sym.address().checked_sub(section.address()) else { continue };
        out.insert(name.to_string(), FunctionSym { offset: sec_offset + rel, size: sym.size() });
    }
    drop(file);
    Ok((out, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_libc_malloc_and_aliases() {
        // The libc this test runs on.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let libc = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| p.contains("libc.so"))
            .expect("test binary maps libc");
        let (offs, _) = functions(Path::new(libc), &["malloc", "free", "no_such_function"]).unwrap();
        assert!(offs.contains_key("malloc") && offs.contains_key("free"));
        assert_ne!(offs["malloc"].offset, offs["free"].offset);
        assert!(offs["free"].size > 0);
        assert!(!offs.contains_key("no_such_function"));
    }
}
