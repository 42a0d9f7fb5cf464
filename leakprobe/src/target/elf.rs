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

/// One `PT_LOAD` program header: what the loader maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub memsz: u64,
    pub writable: bool,
}

/// The `PT_LOAD` headers of the ELF file at `path`.
pub fn loads(path: &Path) -> Result<Vec<Load>, ElfError> {
    let shown = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| ElfError::Read { path: shown.clone(), source })?;
    loads_in(&data).map_err(|source| ElfError::Parse { path: shown, source })
}

/// The `PT_LOAD` headers of an ELF image.
pub fn loads_in(data: &[u8]) -> Result<Vec<Load>, object::Error> {
    use object::read::elf::ProgramHeader as _;
    let file = object::read::elf::ElfFile64::<object::Endianness>::parse(data)?;
    let e = file.endian();
    Ok(file
        .elf_program_headers()
        .iter()
        .filter(|p| p.p_type(e) == object::elf::PT_LOAD)
        .map(|p| Load {
            offset: p.p_offset(e),
            vaddr: p.p_vaddr(e),
            filesz: p.p_filesz(e),
            memsz: p.p_memsz(e),
            writable: p.p_flags(e) & object::elf::PF_W != 0,
        })
        .collect())
}

/// The load bias (runtime address - ELF virtual address) of a module, given any one of its
/// mappings (`start`, file `offset`).
pub fn load_bias(loads: &[Load], start: u64, offset: u64) -> Option<u64> {
    const PAGE: u64 = 4096;
    let page = |x: u64| x & !(PAGE - 1);
    let seg = loads.iter().find(|l| page(l.offset) <= offset && offset < l.offset + l.filesz.max(1))?;
    start.checked_sub(page(seg.vaddr) + (offset - page(seg.offset)))
}

/// Where a module's writable data (its last writable `PT_LOAD`, `.bss` included) ends in
/// memory, given where the mapping of its lowest file offset starts (`start`, `offset`).
pub fn data_end(loads: &[Load], start: u64, offset: u64) -> Option<u64> {
    let bias = load_bias(loads, start, offset)?;
    loads.iter().filter(|l| l.writable).map(|l| bias + l.vaddr + l.memsz).max()
}

/// A defined symbol's ELF virtual address and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymbolAddr {
    pub address: u64,
    pub size: u64,
}

/// The defined symbols (any kind: data or code) of an ELF image whose names `wanted`
/// accepts, from `.dynsym` first, then `.symtab`; the first definition of a name wins.
pub fn symbols_in(
    data: &[u8],
    wanted: impl Fn(&str) -> bool,
) -> Result<HashMap<String, SymbolAddr>, object::Error> {
    let file = object::File::parse(data)?;
    let mut out = HashMap::new();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if !sym.is_definition() {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        if wanted(name) && !out.contains_key(name) {
            out.insert(name.to_string(), SymbolAddr { address: sym.address(), size: sym.size() });
        }
    }
    Ok(out)
}

/// The file-local symbols (`static` variables) named `wanted` of one source file, from the
/// symbol table (`.symtab`), where a compiler lists each file's locals after an `STT_FILE`
/// entry with the file's name: `static` names repeat across files (`free_list`).
pub fn file_locals(
    data: &[u8],
    source: &str,
    wanted: impl Fn(&str) -> bool,
) -> Result<HashMap<String, SymbolAddr>, object::Error> {
    use object::SymbolKind;
    let file = object::File::parse(data)?;
    let mut out = HashMap::new();
    let mut inside = false;
    for sym in file.symbols() {
        if sym.kind() == SymbolKind::File {
            inside = sym.name().is_ok_and(|n| n == source);
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        if inside && sym.is_local() && sym.is_definition() && wanted(name) && !out.contains_key(name) {
            out.insert(name.to_string(), SymbolAddr { address: sym.address(), size: sym.size() });
        }
    }
    Ok(out)
}

/// The contents of the section `name` of an ELF image, if it has file data.
pub fn section_data<'a>(data: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let file = object::File::parse(data).ok()?;
    file.section_by_name(name)?.data().ok()
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
    let out = functions_in(&data, names, false).map_err(|source| ElfError::Parse { path: shown, source })?;
    Ok((out, data))
}

/// The named functions an ELF image defines. `exported_only` keeps to the dynamic symbol
/// table: what other modules can bind to (a shared library's local `malloc` binds nothing).
pub fn functions_in(
    data: &[u8],
    names: &[&str],
    exported_only: bool,
) -> Result<HashMap<String, FunctionSym>, object::Error> {
    let file = object::File::parse(data)?;
    let mut out = HashMap::new();
    let local = if exported_only { None } else { Some(file.symbols()) };
    for sym in file.dynamic_symbols().chain(local.into_iter().flatten()) {
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
    Ok(out)
}

/// What the dynamic loader reads from an image: its program interpreter (none: static),
/// its SONAME and its DT_NEEDED list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dynamic {
    pub interp: bool,
    pub soname: Option<String>,
    pub needed: Vec<String>,
}

pub fn dynamic(data: &[u8]) -> Dynamic {
    use object::read::elf::{Dyn as _, ElfFile64, ProgramHeader as _};
    let Ok(elf) = ElfFile64::<object::Endianness>::parse(data) else { return Dynamic::default() };
    let endian = elf.endian();
    let interp = elf.elf_program_headers().iter().any(|p| p.p_type(endian) == object::elf::PT_INTERP);
    let mut out = Dynamic { interp, ..Default::default() };
    let sections = elf.elf_section_table();
    let Ok(Some((dyns, link))) = sections.dynamic(endian, data) else { return out };
    let Ok(strings) = sections.strings(endian, data, link) else { return out };
    for d in dyns {
        let Some(tag) = d.tag32(endian) else { continue };
        let Ok(name) = d.string(endian, strings) else { continue };
        let name = String::from_utf8_lossy(name).into_owned();
        match tag {
            object::elf::DT_NEEDED => out.needed.push(name),
            object::elf::DT_SONAME => out.soname = Some(name),
            _ => {}
        }
    }
    out
}

/// The symbol a function forwards to when its whole body is a tail jump through the PLT
/// (jemalloc's `operator delete(void*)` is `jmp free@plt`): its calls are seen where they
/// land, so probing it as well would count every call twice. `offset` is the function's
/// file offset.
pub fn plt_forward(data: &[u8], offset: u64) -> Option<String> {
    use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic, OpKind, Register};
    use object::read::elf::{ElfFile64, Rela as _, SectionHeader as _};

    let decode_jmp = |off: u64| -> Option<iced_x86::Instruction> {
        let code = data.get(off as usize..(off as usize).checked_add(16)?.min(data.len()))?;
        let mut d = Decoder::with_ip(64, code, off, DecoderOptions::NONE);
        let mut i = d.decode();
        if i.code() == Code::Endbr64 {
            i = d.decode();
        }
        (i.mnemonic() == Mnemonic::Jmp).then_some(i)
    };
    let jmp = decode_jmp(offset)?;
    if jmp.op0_kind() != OpKind::NearBranch64 {
        return None;
    }
    let stub = decode_jmp(jmp.near_branch_target())?;
    if stub.op0_kind() != OpKind::Memory || stub.memory_base() != Register::RIP {
        return None;
    }
    // The stub's GOT slot, as a virtual address (the decoder ran on file offsets).
    let elf = ElfFile64::<object::Endianness>::parse(data).ok()?;
    let endian = elf.endian();
    let sections = elf.elf_section_table();
    let text = sections.iter().find(|s| {
        let (start, size) = (s.sh_offset(endian), s.sh_size(endian));
        s.sh_type(endian) == object::elf::SHT_PROGBITS && start <= stub.ip() && stub.ip() < start + size
    })?;
    let slot = stub.memory_displacement64() - text.sh_offset(endian) + text.sh_addr(endian);
    let dynsyms = sections.symbols(endian, data, object::elf::SHT_DYNSYM).ok()?;
    for s in sections.iter().filter(|s| s.sh_type(endian) == object::elf::SHT_RELA) {
        let Ok(Some((relas, _))) = s.rela(endian, data) else { continue };
        for r in relas {
            if r.r_offset(endian) == slot && r.r_type(endian, false) == object::elf::R_X86_64_JUMP_SLOT {
                let sym = dynsyms.symbol(object::SymbolIndex(r.r_sym(endian, false) as usize)).ok()?;
                let name = dynsyms.symbol_name(endian, sym).ok()?;
                return Some(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" {
        /// The linker's end of `.bss`, of the executable this test runs in.
        static _end: u8;
    }

    #[test]
    fn data_end_is_the_end_of_bss_from_the_program_headers() {
        // This test's own executable: its first mapping and the linker's `_end`.
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let (start, offset) = maps
            .lines()
            .filter(|l| l.ends_with(exe.to_str().unwrap()))
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let start = u64::from_str_radix(it.next()?.split('-').next()?, 16).ok()?;
                let offset = u64::from_str_radix(it.nth(1)?, 16).ok()?;
                Some((start, offset))
            })
            .min_by_key(|(_, o)| *o)
            .unwrap();
        let end = data_end(&loads(&exe).unwrap(), start, offset).unwrap();
        let linker_end = (&raw const _end) as u64;
        // `_end` may be aligned past the last byte of .bss, never before it.
        assert!(end <= linker_end && linker_end - end < 64, "{end:#x} vs _end {linker_end:#x}");
    }

    #[test]
    fn data_end_follows_the_load_bias() {
        let loads = [
            Load { offset: 0, vaddr: 0, filesz: 0x1000, memsz: 0x1000, writable: false },
            Load { offset: 0x1000, vaddr: 0x1000, filesz: 0x3000, memsz: 0x3000, writable: false },
            Load { offset: 0x4dd0, vaddr: 0x5dd0, filesz: 0x300, memsz: 0x1230, writable: true },
        ];
        assert_eq!(data_end(&loads, 0x7f00_0000_0000, 0), Some(0x7f00_0000_0000 + 0x5dd0 + 0x1230));
        // Known by a later mapping only (the first one unmapped).
        assert_eq!(data_end(&loads, 0x7f00_0000_1000, 0x1000), Some(0x7f00_0000_0000 + 0x5dd0 + 0x1230));
        // A non-PIE executable: linked at its address, no bias.
        let fixed = [Load { offset: 0, vaddr: 0x400000, filesz: 0x2000, memsz: 0x2000, writable: true }];
        assert_eq!(data_end(&fixed, 0x400000, 0), Some(0x402000));
        assert_eq!(data_end(&[], 0x400000, 0), None);
    }

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
        let data = std::fs::read(libc).unwrap();
        let d = dynamic(&data);
        assert_eq!(d.soname.as_deref(), Some("libc.so.6"));
        assert!(d.interp, "glibc's libc.so.6 has a PT_INTERP (it can be run)");
        // glibc's malloc does real work; it is no PLT forwarder.
        assert_eq!(plt_forward(&data, offs["malloc"].offset), None);
    }
}
