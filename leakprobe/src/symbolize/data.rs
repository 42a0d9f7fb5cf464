//! Data addresses to variable names: which global holds a pointer (the scan's retainers).
//!
//! blazesym resolves code; a global is an `STT_OBJECT` symbol in the module's `.symtab` or
//! `.dynsym`. Each module's table is read once, from the target's own file.

use std::{collections::HashMap, path::PathBuf};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _, SymbolKind};

/// A variable's name (demangled) and the offset of the address inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variable {
    pub name: String,
    pub offset: u64,
}

struct Table {
    /// The lowest `PT_LOAD` address, page aligned: the module's base maps there.
    first_vaddr: u64,
    /// (address, size, name), sorted by address.
    vars: Vec<(u64, u64, String)>,
}

/// Per-module tables of variables, cached.
#[derive(Default)]
pub struct DataSymbols {
    tables: HashMap<PathBuf, Option<Table>>,
}

impl DataSymbols {
    /// The variable at run-time address `addr` in the module whose file is `file` (as we can
    /// open it) and whose file offset 0 is mapped at `base`.
    pub fn lookup(&mut self, file: &std::path::Path, base: u64, addr: u64) -> Option<Variable> {
        let table = self.tables.entry(file.to_path_buf()).or_insert_with(|| load(file)).as_ref()?;
        let vaddr = addr.checked_sub(base)? + table.first_vaddr;
        let i = table.vars.partition_point(|v| v.0 <= vaddr).checked_sub(1)?;
        let (start, size, name) = &table.vars[i];
        (vaddr < start + (*size).max(1)).then(|| Variable { name: name.clone(), offset: vaddr - start })
    }
}

fn load(file: &std::path::Path) -> Option<Table> {
    let data = std::fs::read(file).ok()?;
    let elf = object::File::parse(&*data).ok()?;
    let first_vaddr = elf.segments().map(|s| s.address()).min()? & !0xfff;
    let mut vars: Vec<(u64, u64, String)> = elf
        .symbols()
        .chain(elf.dynamic_symbols())
        .filter(|s| matches!(s.kind(), SymbolKind::Data) && s.size() > 0 && s.address() != 0)
        .filter_map(|s| Some((s.address(), s.size(), demangle(s.name().ok()?))))
        .collect();
    vars.sort_unstable();
    vars.dedup_by_key(|v| v.0);
    Some(Table { first_vaddr, vars })
}

/// C++ and Rust names readable; C names as they are.
pub fn demangle(name: &str) -> String {
    // Rust: v0 (`_R`), or legacy (`_ZN...17h<hash>E`, which a C++ demangler also accepts).
    let legacy_rust = name.starts_with("_ZN") && name.ends_with('E') && name.contains("17h");
    if (name.starts_with("_R") || legacy_rust)
        && let Ok(d) = rustc_demangle::try_demangle(name)
    {
        return format!("{d:#}");
    }
    if name.starts_with("_Z")
        && let Ok(sym) = cpp_demangle::Symbol::new(name)
        && let Ok(d) = sym.demangle()
    {
        // cpp_demangle writes special names as `{vtable(Session)}`; c++filt's words read better.
        for (tag, words) in [("{vtable(", "vtable for "), ("{typeinfo(", "typeinfo for ")] {
            if let Some(inner) = d.strip_prefix(tag).and_then(|r| r.strip_suffix(")}")) {
                return format!("{words}{inner}");
            }
        }
        return d;
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_demangled() {
        assert_eq!(demangle("cache_head"), "cache_head");
        assert_eq!(demangle("_ZTV7Session"), "vtable for Session");
        assert_eq!(demangle("_ZN3app5CACHE17h0123456789abcdefE"), "app::CACHE");
    }

    #[test]
    fn finds_a_variable_of_this_test_binary() {
        // A global of ours, found through our own file and mapping.
        static mut MARKER: [u64; 4] = [1, 2, 3, 4];
        let addr = (&raw const MARKER) as u64 + 8;
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let base = maps
            .lines()
            .find(|l| l.ends_with(exe.to_str().unwrap()) && l.split_whitespace().nth(2) == Some("00000000"))
            .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
            .unwrap();
        let v = DataSymbols::default().lookup(&exe, base, addr).expect("MARKER found");
        assert!(v.name.ends_with("MARKER"), "{}", v.name);
        assert_eq!(v.offset, 8);
    }
}
