//! Which slots to redirect for in-process sampling: every GOT slot and load-time function
//! pointer through which the target reaches its allocation family, what each holds now,
//! where calls through it must still arrive, and the value that puts it back.
//!
//! Planning only. [`read_images`] (and [`plan_pid`]) read /proc and the modules' files at the
//! edge; [`plan`] parses those bytes and asks a `read_u64` closure for each slot's current
//! value (the ptrace layer reads through /proc/PID/mem while every thread is stopped).
//! Nothing here writes to the target.
//!
//! Slots come from each module's dynamic table, as the loader reads it: `R_X86_64_JUMP_SLOT`
//! (DT_JMPREL) and `R_X86_64_GLOB_DAT` / `R_X86_64_64` (DT_RELA) whose symbol is in
//! [`FAMILY`]. ld.so is skipped: it allocates through its `__rtld_malloc` pointers, which no
//! GOT slot reaches. Static executables have no GOT and keep their uprobes.
//!
//! Hazards the plan reports rather than hides:
//! - **Lazy slots.** A `JUMP_SLOT` not yet called holds its PLT entry, not the function. The
//!   plan resolves the symbol itself, in the loader's order ([`allocator::binding_order`]),
//!   so the stub can forward there; restoring writes the PLT value back, so the slot stays
//!   lazy and the loader binds it later exactly as it would have.
//! - **RELRO.** Slots inside `PT_GNU_RELRO` are read-only at run time (libc's `malloc` and
//!   `free` are); writing them needs /proc/PID/mem (FOLL_FORCE).
//! - **Data pointers** ([`SlotKind::DataPointer`]): `R_X86_64_64` and the like outside the
//!   GOT are program data, e.g. `void (*tbl[])(void *) = { free };`. While patched, the
//!   program reads our stub's address there. Calls still work (the stub forwards), and a
//!   comparison with `free` still matches because `free`'s own GOT slot holds the stub too;
//!   after restore both hold the original again. A pointer saved aside *during* the patch
//!   keeps the stub's address past detach, which is why the stub must outlive the patch.
//!   One that no longer holds the function (the program stored something else) is left alone.
//!
//! TODO (not code yet): C++ `operator new`/`delete` manglings (`_Znwm`, `_Znam`, `_ZdlPv`,
//! `_ZdlPvm`, the `align_val_t` and `nothrow_t` forms; see `allocator::CXX_DIRECT`); DT_REL
//! tables (no x86-64 toolchain emits them); symbol versions (the family has one version
//! each in glibc); `dlmopen` namespaces (one file mapped twice is planned once).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    path::{Path, PathBuf},
};

use object::{
    Endianness, Object as _, ObjectSection as _, ObjectSymbol as _, ReadRef as _,
    elf::{self as abi, Rela64, Sym64},
    read::elf::{Dyn as _, ElfFile64, FileHeader as _, ProgramHeader as _, Rela as _, Sym as _},
};
use thiserror::Error;

use crate::target::{
    self, Mapping, allocator,
    elf::{self as telf, FunctionSym},
};

/// The allocation family whose slots are patched. The same names as the C part of
/// [`allocator::STANDARD`] (mmap and munmap aside), plus glibc's old `cfree`, and the
/// `tc_`, `mi_` and `je_` names of the same functions.
pub const FAMILY: &[&str] = &[
    "malloc",
    "free",
    "calloc",
    "realloc",
    "reallocarray",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "cfree",
    // The same functions under an allocator's own names, which programs also call through
    // their GOT (tcmalloc's are aliases; mimalloc's and jemalloc's separate entry points).
    "tc_malloc",
    "tc_free",
    "tc_calloc",
    "tc_realloc",
    "tc_reallocarray",
    "tc_posix_memalign",
    "tc_aligned_alloc",
    "tc_memalign",
    "tc_valloc",
    "tc_pvalloc",
    "mi_malloc",
    "mi_free",
    "mi_calloc",
    "mi_realloc",
    "mi_reallocarray",
    "mi_posix_memalign",
    "mi_aligned_alloc",
    "mi_memalign",
    "mi_valloc",
    "mi_pvalloc",
    "je_malloc",
    "je_free",
    "je_calloc",
    "je_realloc",
    "je_reallocarray",
    "je_posix_memalign",
    "je_aligned_alloc",
    "je_memalign",
    "je_valloc",
    "je_pvalloc",
];

/// The loader rounds RELRO and segments to pages; x86-64 user pages are 4 KiB.
const PAGE: u64 = 4096;

/// Why no plan could be made for a process at all.
#[derive(Debug, Error)]
pub enum GotError {
    /// `/proc/PID/maps` could not be read: the process is gone, or not ours to read.
    #[error("cannot read the memory map of PID {pid}")]
    Maps {
        pid: i32,
        #[source]
        source: procfs::ProcError,
    },
}

/// Why one module was left out of the plan; it lands in [`PatchPlan::skipped`], since calls
/// from a module we cannot plan are not sampled and the report must say so.
#[derive(Debug, Error)]
pub enum ModuleError {
    /// The mapped file could not be opened through map_files nor the target's root.
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: target::TargetError,
    },
    /// The file opened but could not be read to its end.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a 64-bit ELF image, or its headers or dynamic table are malformed.
    #[error("{path} is not a readable 64-bit ELF file")]
    Parse {
        path: PathBuf,
        #[source]
        source: object::Error,
    },
}

/// The error and its sources on one line, for a skip reason.
fn reason(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// One mapped file of the target, read at the edge and planned purely.
#[derive(Clone, Debug)]
pub struct Image {
    /// The path as the target sees it.
    pub path: PathBuf,
    /// Every mapping of this file (any permission), in address order.
    pub mappings: Vec<Mapping>,
    pub is_exe: bool,
    /// The file's bytes.
    pub data: Vec<u8>,
}

/// The target's code modules, and the ones whose files could not be read.
#[derive(Clone, Debug, Default)]
pub struct Images {
    pub images: Vec<Image>,
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Reads every file the target maps with some executable mapping (data files such as the
/// locale archive have no GOT), through the target's own view of its files.
pub fn read_images(pid: i32) -> Result<Images, GotError> {
    use procfs::process::{MMPermissions, Process};
    let maps = Process::new(pid).and_then(|p| p.maps()).map_err(|source| GotError::Maps { pid, source })?;
    let exe = target::exe_of(pid);
    let mut files: Vec<(Vec<Mapping>, bool)> = Vec::new();
    let mut by_inode: HashMap<((i32, i32), u64), usize> = HashMap::new();
    for m in maps {
        let Some(mapping) = Mapping::of(&m) else { continue };
        let i = *by_inode.entry((m.dev, m.inode)).or_insert_with(|| {
            files.push((Vec::new(), false));
            files.len() - 1
        });
        files[i].1 |= m.perms.contains(MMPermissions::EXECUTE);
        files[i].0.push(mapping);
    }
    let mut out = Images::default();
    for (mappings, exec) in files {
        let Some(first) = mappings.first().filter(|_| exec) else { continue };
        let path = first.path.clone();
        match read_mapped_file(pid, first) {
            Ok(data) => {
                let is_exe = exe.as_ref() == Some(&path);
                out.images.push(Image { path, mappings, is_exe, data });
            }
            Err(e) => out.unreadable.push((path, reason(&e))),
        }
    }
    Ok(out)
}

fn read_mapped_file(pid: i32, m: &Mapping) -> Result<Vec<u8>, ModuleError> {
    let mut file =
        target::open_mapping(pid, m).map_err(|source| ModuleError::Open { path: m.path.clone(), source })?;
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut data)
        .map_err(|source| ModuleError::Read { path: m.path.clone(), source })?;
    Ok(data)
}

/// Reads the target's modules and plans against them: [`read_images`], then [`plan`] with
/// the target's LD_PRELOAD.
pub fn plan_pid(pid: i32, read_u64: impl FnMut(u64) -> Option<u64>) -> Result<PatchPlan, GotError> {
    let images = read_images(pid)?;
    Ok(plan(&images, &allocator::preloads(pid), read_u64))
}

/// The relocation that fills a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RelocType {
    /// `R_X86_64_JUMP_SLOT`: a PLT call's slot, possibly lazy.
    JumpSlot,
    /// `R_X86_64_GLOB_DAT`: a GOT slot filled at load time (calls, or taking the address).
    GlobDat,
    /// `R_X86_64_64`: an absolute pointer, symbol + addend.
    Abs64,
}

impl fmt::Display for RelocType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RelocType::JumpSlot => "R_X86_64_JUMP_SLOT",
            RelocType::GlobDat => "R_X86_64_GLOB_DAT",
            RelocType::Abs64 => "R_X86_64_64",
        })
    }
}

/// What patching the slot changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SlotKind {
    /// In `.got` / `.got.plt`: only calls and address-taking go through it.
    Got,
    /// Program data holding the function's address (a table of function pointers): the
    /// program can read and compare it (see the module doc).
    DataPointer,
}

/// What a slot holds now, and so where calls through it must go on and what restores it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlotState {
    /// Holds the function the loader bound (whatever allocator that is): forward there,
    /// restore it.
    Bound { value: u64 },
    /// Holds a PLT entry (its module's lazy entry, or another module's canonical PLT entry):
    /// forward to `resolved`, the definition the loader would bind; restore `plt_value`.
    Lazy { plt_value: u64, resolved: u64 },
    /// Must not be patched: nothing known to forward to, or not ours to change.
    Unresolved { reason: String },
}

/// One slot to patch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// The module whose relocation fills the slot, as the target sees its path.
    pub module: PathBuf,
    /// The slot's run-time address (load bias + r_offset).
    pub address: u64,
    pub function: &'static str,
    pub reloc: RelocType,
    pub kind: SlotKind,
    /// Inside PT_GNU_RELRO: read-only once the loader is done, so only a FOLL_FORCE write
    /// (/proc/PID/mem) changes it. Conservative: the loader protects whole pages only.
    pub in_relro: bool,
    /// The relocation's addend (`R_X86_64_64` only; patched slots always have 0).
    pub addend: i64,
    pub state: SlotState,
}

impl Slot {
    /// The value that restores the slot, if it may be patched.
    pub fn original(&self) -> Option<u64> {
        match self.state {
            SlotState::Bound { value } => Some(value),
            SlotState::Lazy { plt_value, .. } => Some(plt_value),
            SlotState::Unresolved { .. } => None,
        }
    }

    /// Where calls through the slot must arrive, if it may be patched: the stub forwards here.
    pub fn target(&self) -> Option<u64> {
        match self.state {
            SlotState::Bound { value } => Some(value),
            SlotState::Lazy { resolved, .. } => Some(resolved),
            SlotState::Unresolved { .. } => None,
        }
    }
}

/// Every slot to patch in one target, and the modules left out with why.
#[derive(Clone, Debug, Default)]
pub struct PatchPlan {
    /// By module in address order, then by address.
    pub slots: Vec<Slot>,
    pub skipped: Vec<(PathBuf, String)>,
}

/// One module's share of a plan, for the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleSummary {
    pub module: PathBuf,
    /// Patchable slots per function, in [`FAMILY`] order.
    pub per_function: Vec<(&'static str, usize)>,
    pub in_relro: usize,
    pub data_pointers: usize,
    /// Slots that will not be patched (calls through them go unsampled).
    pub unresolved: usize,
}

impl PatchPlan {
    /// `(address, original value)` for every slot that may be patched: what detach writes
    /// back. Unresolved slots are never patched, so they have nothing to restore.
    pub fn restore_values(&self) -> Vec<(u64, u64)> {
        self.slots.iter().filter_map(|s| Some((s.address, s.original()?))).collect()
    }

    /// Per module, in plan order.
    pub fn summary(&self) -> Vec<ModuleSummary> {
        let mut out: Vec<ModuleSummary> = Vec::new();
        for s in &self.slots {
            if out.last().is_none_or(|m| m.module != s.module) {
                out.push(ModuleSummary {
                    module: s.module.clone(),
                    per_function: Vec::new(),
                    in_relro: 0,
                    data_pointers: 0,
                    unresolved: 0,
                });
            }
            let Some(m) = out.last_mut() else { continue };
            if s.target().is_none() {
                m.unresolved += 1;
                continue;
            }
            m.in_relro += usize::from(s.in_relro);
            m.data_pointers += usize::from(s.kind == SlotKind::DataPointer);
            match m.per_function.iter_mut().find(|(f, _)| *f == s.function) {
                Some((_, n)) => *n += 1,
                None => m.per_function.push((s.function, 1)),
            }
        }
        for m in &mut out {
            m.per_function.sort_by_key(|(f, _)| FAMILY.iter().position(|g| g == f));
        }
        out
    }
}

impl fmt::Display for ModuleSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.module.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let total: usize = self.per_function.iter().map(|(_, n)| n).sum();
        let funcs: Vec<String> = self.per_function.iter().map(|(f, n)| format!("{f} {n}")).collect();
        write!(f, "{name}: {total} slots ({})", funcs.join(", "))?;
        if self.in_relro > 0 {
            write!(f, ", {} in RELRO", self.in_relro)?;
        }
        if self.data_pointers > 0 {
            write!(f, ", {} data pointers", self.data_pointers)?;
        }
        if self.unresolved > 0 {
            write!(f, ", {} left unpatched", self.unresolved)?;
        }
        Ok(())
    }
}

impl fmt::Display for PatchPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in self.summary() {
            writeln!(f, "{m}")?;
        }
        for (path, why) in &self.skipped {
            writeln!(f, "{}: skipped: {why}", path.display())?;
        }
        Ok(())
    }
}

/// A PT_LOAD segment.
#[derive(Clone, Copy, Debug)]
struct Load {
    vaddr: u64,
    offset: u64,
    filesz: u64,
}

/// A family relocation, before the target is looked at.
#[derive(Clone, Debug)]
struct Reloc {
    vaddr: u64,
    reloc: RelocType,
    /// The family function (for an alias, decided where the name binds; see [`aliases_in`]).
    function: &'static str,
    /// The name the relocation asks for, when it is not a family name.
    alias: Option<String>,
    addend: i64,
}

/// What the plan needs from one ELF file. Address ranges are unrelocated (file vaddrs).
#[derive(Debug, Default)]
struct Parsed {
    loads: Vec<Load>,
    relro: Option<(u64, u64)>,
    /// `.plt`, `.plt.sec`, `.plt.got`: a slot pointing here is not yet at a function.
    plt: Vec<(u64, u64)>,
    /// `.got`, `.got.plt`: slots outside these are program data.
    got: Vec<(u64, u64)>,
    has_dynamic: bool,
    interp: Option<String>,
    /// DT_SYMBOLIC / DF_SYMBOLIC: the module binds to its own definitions first.
    symbolic: bool,
    relocs: Vec<Reloc>,
    /// Family functions it defines as ifuncs: their address is chosen by a resolver at run
    /// time, which the plan cannot call.
    ifuncs: HashSet<String>,
}

fn vaddr_to_offset(loads: &[Load], vaddr: u64) -> Option<u64> {
    loads
        .iter()
        .find(|l| l.vaddr <= vaddr && vaddr - l.vaddr < l.filesz)
        .map(|l| l.offset + (vaddr - l.vaddr))
}

fn offset_to_vaddr(loads: &[Load], offset: u64) -> Option<u64> {
    loads
        .iter()
        .find(|l| l.offset <= offset && offset - l.offset < l.filesz)
        .map(|l| l.vaddr + (offset - l.offset))
}

/// The load bias from the file's mappings: the one at file offset 0 (the first PT_LOAD)
/// when mapped, else any other mapping of a PT_LOAD.
fn load_bias(loads: &[Load], mappings: &[Mapping]) -> Option<u64> {
    let mut by_offset: Vec<&Mapping> = mappings.iter().collect();
    by_offset.sort_by_key(|m| m.file_offset != 0);
    by_offset.into_iter().find_map(|m| {
        let load = loads.iter().find(|l| {
            let start = l.offset - l.offset % PAGE;
            start <= m.file_offset && m.file_offset < l.offset.saturating_add(l.filesz)
        })?;
        let page_vaddr = (load.vaddr - load.vaddr % PAGE)
            .checked_add(m.file_offset - (load.offset - load.offset % PAGE))?;
        let bias = m.start.checked_sub(page_vaddr)?;
        (bias % PAGE == 0).then_some(bias)
    })
}

/// The dynamic-table entries the plan reads.
#[derive(Debug, Default)]
struct DynTags {
    rela: Option<u64>,
    relasz: u64,
    jmprel: Option<u64>,
    pltrelsz: u64,
    pltrel: Option<u64>,
    symtab: Option<u64>,
    strtab: Option<u64>,
    strsz: u64,
    symbolic: bool,
}

/// Parses what the plan needs. `Err` is a skip reason.
fn parse(path: &Path, data: &[u8], aliases: &HashSet<String>) -> Result<Parsed, String> {
    let bad = |source| reason(&ModuleError::Parse { path: path.to_path_buf(), source });
    let elf = ElfFile64::<Endianness>::parse(data).map_err(bad)?;
    let endian = elf.endian();
    let machine = elf.elf_header().e_machine(endian);
    if machine != abi::EM_X86_64 {
        return Err(format!("ELF machine {machine}, not x86-64: GOT planning knows x86-64 only"));
    }
    let mut p = Parsed::default();
    let mut dynamic = None;
    for ph in elf.elf_program_headers() {
        let (vaddr, memsz) = (ph.p_vaddr(endian), ph.p_memsz(endian));
        match ph.p_type(endian) {
            abi::PT_LOAD => {
                p.loads.push(Load { vaddr, offset: ph.p_offset(endian), filesz: ph.p_filesz(endian) })
            }
            abi::PT_GNU_RELRO => p.relro = Some((vaddr, vaddr.saturating_add(memsz))),
            abi::PT_INTERP => {
                let interp = ph.interpreter(endian, data).map_err(bad)?;
                p.interp = interp.map(|s| String::from_utf8_lossy(s).into_owned());
            }
            abi::PT_DYNAMIC => dynamic = ph.dynamic(endian, data).map_err(bad)?,
            _ => {}
        }
    }
    for s in elf.sections() {
        let range = (s.address(), s.address().saturating_add(s.size()));
        match s.name() {
            Ok(".plt" | ".plt.sec" | ".plt.got") => p.plt.push(range),
            Ok(".got" | ".got.plt") => p.got.push(range),
            _ => {}
        }
    }
    for sym in elf.dynamic_symbols() {
        if !sym.is_definition() || sym.elf_symbol().st_type() != abi::STT_GNU_IFUNC {
            continue;
        }
        if let Some(name) = sym.name().ok().filter(|n| FAMILY.contains(n)) {
            p.ifuncs.insert(name.to_string());
        }
    }
    let Some(dyns) = dynamic else { return Ok(p) };
    p.has_dynamic = true;

    let mut t = DynTags::default();
    for d in dyns {
        let Some(tag) = d.tag32(endian) else { continue };
        let val: u64 = d.d_val(endian);
        match tag {
            abi::DT_NULL => break,
            abi::DT_RELA => t.rela = Some(val),
            abi::DT_RELASZ => t.relasz = val,
            abi::DT_JMPREL => t.jmprel = Some(val),
            abi::DT_PLTRELSZ => t.pltrelsz = val,
            abi::DT_PLTREL => t.pltrel = Some(val),
            abi::DT_SYMTAB => t.symtab = Some(val),
            abi::DT_STRTAB => t.strtab = Some(val),
            abi::DT_STRSZ => t.strsz = val,
            abi::DT_SYMBOLIC => t.symbolic = true,
            abi::DT_FLAGS => t.symbolic |= val & u64::from(abi::DF_SYMBOLIC) != 0,
            _ => {}
        }
    }
    p.symbolic = t.symbolic;
    let (Some(symtab), Some(strtab)) = (
        t.symtab.and_then(|a| vaddr_to_offset(&p.loads, a)),
        t.strtab.and_then(|a| vaddr_to_offset(&p.loads, a)),
    ) else {
        return Ok(p);
    };
    let name_of = |index: u32| -> Option<&[u8]> {
        let at = symtab.checked_add(u64::from(index).checked_mul(size_of::<Sym64<Endianness>>() as u64)?)?;
        let sym: &Sym64<Endianness> = data.read_at(at).ok()?;
        let start = strtab.checked_add(u64::from(sym.st_name(endian)))?;
        data.read_bytes_at_until(start..strtab.checked_add(t.strsz)?, 0).ok()
    };
    // DT_JMPREL holds RELA entries on x86-64; anything else is not ours to read.
    let jmprel = t.jmprel.filter(|_| t.pltrel.is_none_or(|k| k == u64::from(abi::DT_RELA)));
    let mut seen = HashSet::new();
    for (at, size) in [(t.rela, t.relasz), (jmprel, t.pltrelsz)] {
        let Some(at) = at else { continue };
        let Some(offset) = vaddr_to_offset(&p.loads, at) else {
            return Err(format!("relocation table at {at:#x} lies outside the file's segments"));
        };
        let count = usize::try_from(size / size_of::<Rela64<Endianness>>() as u64).unwrap_or(usize::MAX);
        let relas: &[Rela64<Endianness>] = data
            .read_slice_at(offset, count)
            .map_err(|()| format!("relocation table at {at:#x} runs past the end of the file"))?;
        for r in relas {
            let reloc = match r.r_type(endian, false) {
                abi::R_X86_64_JUMP_SLOT => RelocType::JumpSlot,
                abi::R_X86_64_GLOB_DAT => RelocType::GlobDat,
                abi::R_X86_64_64 => RelocType::Abs64,
                _ => continue,
            };
            let index = r.r_sym(endian, false);
            if index == 0 {
                continue;
            }
            let Some(name) = name_of(index) else { continue };
            let (function, alias) = match FAMILY.iter().copied().find(|f| f.as_bytes() == name) {
                Some(f) => (f, None),
                None => match std::str::from_utf8(name).ok().filter(|n| aliases.contains(*n)) {
                    Some(n) => ("", Some(n.to_string())),
                    None => continue,
                },
            };
            let vaddr = r.r_offset(endian);
            // DT_RELASZ may cover DT_JMPREL too; one slot is one entry.
            if seen.insert(vaddr) {
                p.relocs.push(Reloc { vaddr, reloc, function, alias, addend: r.r_addend(endian) });
            }
        }
    }
    p.relocs.sort_by_key(|r| r.vaddr);
    Ok(p)
}

/// Other names of the family's functions in one module: exported functions at the same
/// address as a family function (tcmalloc's `operator delete` *is* its `free`). Programs call
/// them through their own GOT slots, which must lead into the stub too.
fn aliases_in(data: &[u8]) -> HashMap<String, &'static str> {
    let Ok(file) = object::File::parse(data) else { return HashMap::new() };
    let funcs: Vec<(String, u64)> = file
        .dynamic_symbols()
        .filter(|s| s.is_definition() && s.kind() == object::SymbolKind::Text)
        .filter_map(|s| Some((s.name().ok()?.to_string(), s.address())))
        .collect();
    let family: HashMap<u64, &'static str> =
        funcs.iter().filter_map(|(n, a)| FAMILY.iter().copied().find(|f| f == n).map(|f| (*a, f))).collect();
    funcs
        .into_iter()
        .filter(|(n, _)| !FAMILY.contains(&n.as_str()))
        .filter_map(|(n, a)| family.get(&a).map(|f| (n, *f)))
        .collect()
}

/// A parsed module, placed in the target.
struct Placed<'a> {
    image: &'a Image,
    parsed: Parsed,
    bias: u64,
    /// What the loader knows of it (soname, DT_NEEDED), for the binding order.
    dynamic: telf::Dynamic,
    /// Family functions it exports (and the alias names of any module, where it defines them).
    defines: HashMap<String, FunctionSym>,
    /// Its own aliases of family functions.
    aliases: HashMap<String, &'static str>,
}

impl Placed<'_> {
    fn file_name(&self) -> String {
        self.image.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    fn in_ranges(&self, ranges: &[(u64, u64)], addr: u64) -> bool {
        addr.checked_sub(self.bias).is_some_and(|v| ranges.iter().any(|(s, e)| *s <= v && v < *e))
    }

    /// The slot's initial content in the file (a lazy JUMP_SLOT's unrelocated PLT entry).
    fn file_word(&self, vaddr: u64) -> Option<u64> {
        let offset = vaddr_to_offset(&self.parsed.loads, vaddr)?;
        let bytes: &[u8; 8] = self.image.data.as_slice().read_at(offset).ok()?;
        Some(u64::from_le_bytes(*bytes))
    }
}

/// glibc's dynamic loader: named by the executable's PT_INTERP, or by its usual name.
/// musl's loader is its libc, so it is kept.
fn is_ld_so(m: &Placed, interp: Option<&str>) -> bool {
    let file = m.file_name();
    if target::is_libc(&file) {
        return false;
    }
    let soname = m.dynamic.soname.as_deref().unwrap_or("");
    let interp = interp.and_then(|i| Path::new(i).file_name()).map(|n| n.to_string_lossy().into_owned());
    interp.is_some_and(|i| i == file || i == soname)
        || file.starts_with("ld-linux")
        || soname.starts_with("ld-linux")
}

/// Plans every slot. Pure: `images` come from [`read_images`], `preload` from
/// [`allocator::preloads`], and `read_u64` reads one word of the target (`None` if it
/// cannot).
pub fn plan(images: &Images, preload: &[String], mut read_u64: impl FnMut(u64) -> Option<u64>) -> PatchPlan {
    let mut out = PatchPlan { slots: Vec::new(), skipped: images.unreadable.clone() };
    let mut placed: Vec<Placed> = Vec::new();
    let alias_maps: Vec<HashMap<String, &'static str>> =
        images.images.iter().map(|i| aliases_in(&i.data)).collect();
    let alias_names: HashSet<String> = alias_maps.iter().flat_map(|m| m.keys().cloned()).collect();
    let mut wanted: Vec<&str> = FAMILY.to_vec();
    wanted.extend(alias_names.iter().map(String::as_str));
    for (image, aliases) in images.images.iter().zip(alias_maps.iter()) {
        let parsed = match parse(&image.path, &image.data, &alias_names) {
            Ok(p) => p,
            Err(why) => {
                out.skipped.push((image.path.clone(), why));
                continue;
            }
        };
        let Some(bias) = load_bias(&parsed.loads, &image.mappings) else {
            out.skipped.push((image.path.clone(), "no mapping matches its PT_LOAD segments".into()));
            continue;
        };
        let defines = telf::functions_in(&image.data, &wanted, true).unwrap_or_default();
        let dynamic = telf::dynamic(&image.data);
        placed.push(Placed { image, parsed, bias, dynamic, defines, aliases: aliases.clone() });
    }

    // The loader's search order, over every module (ld.so included: it could define names).
    let modules: Vec<allocator::Module> = placed
        .iter()
        .map(|m| allocator::Module {
            mapping: m.image.mappings.first().cloned().unwrap_or_else(|| Mapping {
                start: 0,
                end: 0,
                file_offset: 0,
                path: m.image.path.clone(),
                dev: (0, 0),
                inode: 0,
            }),
            is_exe: m.image.is_exe,
            dynamic: m.dynamic.clone(),
            syms: m.defines.clone(),
            kind: None,
        })
        .collect();
    let order = allocator::binding_order(&modules, preload);
    let resolve = |name: &str, from: usize| -> Result<u64, String> {
        let symbolic = placed[from].parsed.symbolic.then_some(from);
        for i in symbolic.into_iter().chain(order.iter().copied()) {
            let m = &placed[i];
            let Some(sym) = m.defines.get(name) else { continue };
            if m.parsed.ifuncs.contains(name) {
                return Err(format!(
                    "{name} in {} is an ifunc: its target is picked at run time",
                    m.file_name()
                ));
            }
            let vaddr = offset_to_vaddr(&m.parsed.loads, sym.offset)
                .ok_or_else(|| format!("{name} in {} lies outside its segments", m.file_name()))?;
            return m
                .bias
                .checked_add(vaddr)
                .ok_or_else(|| format!("{name} in {}: address overflows", m.file_name()));
        }
        Err(format!("no loaded module defines {name}"))
    };

    let interp = placed.iter().find(|m| m.image.is_exe).and_then(|m| m.parsed.interp.clone());
    for (i, m) in placed.iter().enumerate() {
        if is_ld_so(m, interp.as_deref()) {
            out.skipped.push((
                m.image.path.clone(),
                "dynamic loader: it allocates through __rtld_malloc, which no GOT slot reaches".into(),
            ));
            continue;
        }
        if m.image.is_exe && (!m.parsed.has_dynamic || m.parsed.interp.is_none()) {
            out.skipped.push((m.image.path.clone(), "static executable: no GOT; keep uprobes".into()));
            continue;
        }
        for r in &m.parsed.relocs {
            let r = match &r.alias {
                None => std::borrow::Cow::Borrowed(r),
                // An alias counts where its name binds: libstdc++'s operator delete is not free.
                Some(name) => {
                    match binding(name, i, &placed, &order).and_then(|b| placed[b].aliases.get(name)) {
                        Some(f) => std::borrow::Cow::Owned(Reloc { function: f, ..r.clone() }),
                        None => continue,
                    }
                }
            };
            out.slots.push(slot(m, i, &r, &placed, &mut read_u64, &resolve));
        }
    }
    check_data_pointers(&mut out.slots, &placed, &resolve);
    out
}

/// The module a reference to `name` from module `from` binds to, in the loader's order.
fn binding(name: &str, from: usize, placed: &[Placed], order: &[usize]) -> Option<usize> {
    let symbolic = placed[from].parsed.symbolic.then_some(from);
    symbolic.into_iter().chain(order.iter().copied()).find(|i| placed[*i].defines.contains_key(name))
}

/// One slot as it stands now.
fn slot(
    m: &Placed,
    index: usize,
    r: &Reloc,
    placed: &[Placed],
    read_u64: &mut impl FnMut(u64) -> Option<u64>,
    resolve: &impl Fn(&str, usize) -> Result<u64, String>,
) -> Slot {
    let address = m.bias.wrapping_add(r.vaddr);
    let in_relro = m.parsed.relro.is_some_and(|(s, e)| s <= r.vaddr && r.vaddr.saturating_add(8) <= e);
    let kind = match (m.parsed.got.iter().any(|(s, e)| *s <= r.vaddr && r.vaddr < *e), r.reloc) {
        (true, _) => SlotKind::Got,
        // No section headers: go by what each relocation type is used for.
        (false, RelocType::JumpSlot | RelocType::GlobDat) if m.parsed.got.is_empty() => SlotKind::Got,
        (false, _) => SlotKind::DataPointer,
    };
    let unresolved = |reason: String| SlotState::Unresolved { reason };
    let state = if r.addend != 0 {
        unresolved(format!("addend {}: points inside {}, not at it", r.addend, r.function))
    } else {
        match read_u64(address) {
            None => unresolved("cannot read the slot".into()),
            Some(0) => unresolved("holds 0: not bound (a weak undefined reference?)".into()),
            Some(value) => {
                // Not "anywhere in its own module": libc's realloc slot, once bound, rightly
                // points into libc. Only a PLT entry (or the slot's unrelocated file value)
                // means "not at the function yet".
                let into_plt = placed.iter().any(|p| p.in_ranges(&p.parsed.plt, value));
                let lazy_entry = r.reloc == RelocType::JumpSlot
                    && m.file_word(r.vaddr).is_some_and(|w| w != 0 && m.bias.wrapping_add(w) == value);
                if into_plt || lazy_entry {
                    match resolve(r.alias.as_deref().unwrap_or(r.function), index) {
                        Ok(resolved) => SlotState::Lazy { plt_value: value, resolved },
                        Err(why) => unresolved(format!("points into a PLT and {why}")),
                    }
                } else {
                    SlotState::Bound { value }
                }
            }
        }
    };
    Slot {
        module: m.image.path.clone(),
        address,
        function: r.function,
        reloc: r.reloc,
        kind,
        in_relro,
        addend: r.addend,
        state,
    }
}

/// A data pointer is patched only while it still holds its function: the address the loader
/// gave it, or one a GOT slot holds for the same name. Anything else the program stored
/// there itself, and redirecting it would sample a function that is not an allocator.
fn check_data_pointers(
    slots: &mut [Slot],
    placed: &[Placed],
    resolve: &impl Fn(&str, usize) -> Result<u64, String>,
) {
    let mut known: BTreeMap<&'static str, HashSet<u64>> = BTreeMap::new();
    for s in slots.iter().filter(|s| s.kind == SlotKind::Got) {
        if let Some(t) = s.target() {
            known.entry(s.function).or_default().insert(t);
        }
    }
    for s in slots.iter_mut().filter(|s| s.kind == SlotKind::DataPointer) {
        let SlotState::Bound { value } = s.state else { continue };
        let from = placed.iter().position(|p| p.image.path == s.module);
        let loader = from.and_then(|i| resolve(s.function, i).ok());
        if loader != Some(value) && !known.get(s.function).is_some_and(|k| k.contains(&value)) {
            s.state = SlotState::Unresolved {
                reason: format!(
                    "holds {value:#x}, not {}'s address: the program stored something else there",
                    s.function
                ),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
    const LIBC_BIAS: u64 = 0x7f00_0000_0000;
    const EXE_BIAS: u64 = 0x5555_0000_0000;

    fn libc_bytes() -> Option<Vec<u8>> {
        match std::fs::read(LIBC) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("SKIPPED: {LIBC} is not readable here ({e}); the libc GOT tests need it");
                None
            }
        }
    }

    /// An image mapped at `bias`, one mapping per PT_LOAD, like the loader does.
    fn image(path: &str, data: Vec<u8>, bias: u64, is_exe: bool) -> Image {
        let elf = ElfFile64::<Endianness>::parse(data.as_slice()).unwrap();
        let e = elf.endian();
        let mappings = elf
            .elf_program_headers()
            .iter()
            .filter(|p| p.p_type(e) == abi::PT_LOAD)
            .map(|p| {
                let v = p.p_vaddr(e) - p.p_vaddr(e) % PAGE;
                Mapping {
                    start: bias + v,
                    end: bias + p.p_vaddr(e) + p.p_memsz(e),
                    file_offset: p.p_offset(e) - p.p_offset(e) % PAGE,
                    path: PathBuf::from(path),
                    dev: (0, 0),
                    inode: 0,
                }
            })
            .collect();
        Image { path: PathBuf::from(path), mappings, is_exe, data }
    }

    /// Reads a word as a freshly loaded, never-called process would hold it: with `lazy`,
    /// JUMP_SLOTs at their PLT entry; everything else at `bound(function)`.
    fn loaded<F: Fn(&str) -> u64>(
        images: &[Image],
        lazy: bool,
        bound: F,
    ) -> impl FnMut(u64) -> Option<u64> + use<F> {
        let mut words = HashMap::new();
        for im in images {
            let p = parse(&im.path, &im.data, &HashSet::new()).unwrap();
            let bias = load_bias(&p.loads, &im.mappings).unwrap();
            for r in &p.relocs {
                let file = vaddr_to_offset(&p.loads, r.vaddr)
                    .map(|o| u64::from_le_bytes(im.data[o as usize..o as usize + 8].try_into().unwrap()));
                let v = match (r.reloc, file) {
                    (RelocType::JumpSlot, Some(w)) if lazy && w != 0 => bias + w,
                    _ => bound(r.function),
                };
                words.insert(bias + r.vaddr, v);
            }
        }
        move |a| words.get(&a).copied()
    }

    /// The address `name` has in `im`, placed as it is.
    fn addr_in(im: &Image, name: &str) -> u64 {
        let p = parse(&im.path, &im.data, &HashSet::new()).unwrap();
        let f = telf::functions_in(&im.data, &[name], true).unwrap();
        load_bias(&p.loads, &im.mappings).unwrap() + offset_to_vaddr(&p.loads, f[name].offset).unwrap()
    }

    fn find<'a>(plan: &'a PatchPlan, module: &str, f: &str, kind: SlotKind) -> Vec<&'a Slot> {
        plan.slots
            .iter()
            .filter(|s| s.module.ends_with(module) && s.function == f && s.kind == kind)
            .collect()
    }

    #[test]
    fn family_matches_the_hooked_c_functions() {
        for h in allocator::STANDARD.iter().filter(|h| !matches!(h.function, "mmap" | "munmap")) {
            assert!(FAMILY.contains(&h.function), "{} hooked but not patched", h.function);
        }
    }

    #[test]
    fn libc_has_glob_dat_malloc_free_in_relro_and_jump_slot_realloc_calloc() {
        let Some(data) = libc_bytes() else { return };
        let libc = image(LIBC, data, LIBC_BIAS, false);
        let images = Images { images: vec![libc.clone()], unreadable: vec![] };
        let real = |f: &str| addr_in(&libc, f);
        let plan = plan(&images, &[], loaded(&images.images, true, real));
        eprintln!("{plan}");
        for s in &plan.slots {
            eprintln!("  {:#x} {:<14} {} relro={} {:?}", s.address, s.function, s.reloc, s.in_relro, s.state);
        }
        for f in ["malloc", "free"] {
            let s = find(&plan, "libc.so.6", f, SlotKind::Got);
            assert_eq!(s.len(), 1, "{f}: {s:?}");
            assert_eq!(s[0].reloc, RelocType::GlobDat, "{f}");
            assert!(s[0].in_relro, "{f} is in RELRO");
            assert_eq!(s[0].state, SlotState::Bound { value: real(f) });
        }
        for f in ["realloc", "calloc"] {
            let s = find(&plan, "libc.so.6", f, SlotKind::Got);
            assert_eq!(s.len(), 1, "{f}: {s:?}");
            assert_eq!(s[0].reloc, RelocType::JumpSlot, "{f}");
            assert!(!s[0].in_relro, "{f}: .got.plt is writable in a lazy-bound libc");
            // Never called yet: the slot holds libc's own PLT entry, and binds to libc's own
            // definition (libc is the only module here).
            let SlotState::Lazy { plt_value, resolved } = s[0].state else { panic!("{f}: {:?}", s[0].state) };
            assert_eq!(resolved, real(f));
            assert_ne!(plt_value, resolved);
        }
        assert!(plan.skipped.is_empty(), "{:?}", plan.skipped);
        assert_eq!(plan.restore_values().len(), plan.slots.len());
        let summary = plan.summary();
        assert_eq!(summary.len(), 1);
        assert_eq!(summary[0].in_relro, 2);
        assert_eq!(summary[0].data_pointers, 0);
    }

    #[test]
    fn ld_so_is_skipped_and_never_planned() {
        let Ok(data) = std::fs::read("/lib64/ld-linux-x86-64.so.2") else {
            eprintln!("SKIPPED: no /lib64/ld-linux-x86-64.so.2 here");
            return;
        };
        let ld = image("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", data, LIBC_BIAS, false);
        let images = Images { images: vec![ld], unreadable: vec![] };
        let plan = plan(&images, &[], |_| Some(1));
        assert!(plan.slots.is_empty());
        assert_eq!(plan.skipped.len(), 1);
        assert!(plan.skipped[0].1.contains("__rtld_malloc"), "{:?}", plan.skipped);
    }

    /// Compiles `tests/targets/got_target.c` with the flags, into a temp dir.
    fn compile(dir: &Path, name: &str, flags: &[&str]) -> Option<Vec<u8>> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/targets/got_target.c");
        let out = dir.join(name);
        let status = std::process::Command::new("gcc")
            .args(["-O2", "-fomit-frame-pointer"])
            .args(flags)
            .arg("-o")
            .arg(&out)
            .arg(&src)
            .status();
        match status {
            Ok(s) if s.success() => Some(std::fs::read(out).unwrap()),
            Ok(s) => panic!("gcc {flags:?} failed: {s}"),
            Err(e) => {
                eprintln!("SKIPPED: gcc not runnable ({e})");
                None
            }
        }
    }

    /// The test program (both link modes) with the real libc beside it.
    fn program_and_libc(flags: &[&str]) -> Option<(Image, Image)> {
        let libc = image(LIBC, libc_bytes()?, LIBC_BIAS, false);
        let dir = tempfile::tempdir().unwrap();
        let exe = image("/tmp/got_target", compile(dir.path(), "got_target", flags)?, EXE_BIAS, true);
        Some((exe, libc))
    }

    #[test]
    fn program_slots_lazy_and_now() {
        for (flags, now) in [(["-Wl,-z,lazy"], false), (["-Wl,-z,now"], true)] {
            let Some((exe, libc)) = program_and_libc(&flags) else { return };
            let images = Images { images: vec![exe.clone(), libc.clone()], unreadable: vec![] };
            let real = |f: &str| addr_in(&libc, f);
            // With BIND_NOW the loader fills every JUMP_SLOT at start: all bound.
            let read = loaded(&images.images, !now, real);
            let plan = plan(&images, &[], read);
            eprintln!("{flags:?}:\n{plan}");
            for s in plan.slots.iter().filter(|s| s.module.ends_with("got_target")) {
                eprintln!(
                    "  {:#x} {:<14} {} {:?} relro={} {:?}",
                    s.address, s.function, s.reloc, s.kind, s.in_relro, s.state
                );
            }
            for f in ["malloc", "free", "calloc", "posix_memalign"] {
                let s = find(&plan, "got_target", f, SlotKind::Got);
                assert_eq!(s.len(), 1, "{flags:?} {f}: {s:?}");
                assert_eq!(s[0].reloc, RelocType::JumpSlot, "{flags:?} {f}");
                // -z now puts .got.plt under RELRO; -z lazy cannot (the loader writes it later).
                assert_eq!(s[0].in_relro, now, "{flags:?} {f}");
                assert_eq!(s[0].target(), Some(real(f)), "{flags:?} {f}: forwards to libc's {f}");
                if now {
                    assert_eq!(s[0].state, SlotState::Bound { value: real(f) });
                } else {
                    assert!(matches!(s[0].state, SlotState::Lazy { .. }), "{flags:?} {f}: {:?}", s[0].state);
                    assert!(s[0].original().is_some_and(|v| (EXE_BIAS..EXE_BIAS + 0x10_0000).contains(&v)));
                }
            }
            // The static table { free } is a data relocation in .data.
            let tbl = find(&plan, "got_target", "free", SlotKind::DataPointer);
            assert_eq!(tbl.len(), 1, "{flags:?}: {tbl:?}");
            assert_eq!(tbl[0].reloc, RelocType::Abs64);
            assert!(!tbl[0].in_relro);
            assert_eq!(tbl[0].state, SlotState::Bound { value: real("free") });
            let sum = plan.summary();
            let exe_sum = sum.iter().find(|m| m.module.ends_with("got_target")).unwrap();
            assert_eq!(exe_sum.data_pointers, 1);
            assert_eq!(exe_sum.per_function.iter().find(|(f, _)| *f == "free"), Some(&("free", 2)));
            assert_eq!(plan.restore_values().len(), plan.slots.len());
        }
    }

    #[test]
    fn lazy_slot_resolves_in_loader_order_and_restores_its_plt_value() {
        let Some((exe, libc)) = program_and_libc(&["-Wl,-z,lazy"]) else { return };
        // A fake allocator earlier in the order that defines malloc: lazy slots bind there.
        let images = Images { images: vec![exe.clone(), libc.clone()], unreadable: vec![] };
        let real = |f: &str| addr_in(&libc, f);
        let mut read = loaded(&images.images, true, real);
        let plan_a = plan(&images, &[], &mut read);
        let malloc = find(&plan_a, "got_target", "malloc", SlotKind::Got)[0].clone();
        let SlotState::Lazy { plt_value, resolved } = malloc.state else { panic!("{:?}", malloc.state) };
        assert_eq!(resolved, real("malloc"));
        assert!(plan_a.restore_values().contains(&(malloc.address, plt_value)), "restore keeps it lazy");

        // Once called, the same slot is bound: the read value wins, whatever it is (an
        // allocator bound by the loader is respected).
        let jemalloc_like = 0x7e00_0000_1230;
        let plan_b = plan(&images, &[], |a| if a == malloc.address { Some(jemalloc_like) } else { read(a) });
        let bound = find(&plan_b, "got_target", "malloc", SlotKind::Got)[0];
        assert_eq!(bound.state, SlotState::Bound { value: jemalloc_like });

        // Unreadable slots and a table entry the program rewrote are left alone.
        let tbl = find(&plan_b, "got_target", "free", SlotKind::DataPointer)[0].address;
        let mut read = loaded(&images.images, true, real);
        let plan_c = plan(&images, &[], |a| match a {
            a if a == malloc.address => None,
            a if a == tbl => Some(0x5555_dead_0000),
            a => read(a),
        });
        let s = find(&plan_c, "got_target", "malloc", SlotKind::Got)[0];
        assert!(matches!(&s.state, SlotState::Unresolved { reason } if reason.contains("cannot read")));
        let s = find(&plan_c, "got_target", "free", SlotKind::DataPointer)[0];
        assert!(matches!(&s.state, SlotState::Unresolved { reason } if reason.contains("something else")));
        assert_eq!(plan_c.restore_values().len(), plan_c.slots.len() - 2);
        assert!(plan_c.summary().iter().any(|m| m.unresolved == 2));

        // Without libc, a lazy slot has nowhere to go.
        let alone = Images { images: vec![exe], unreadable: vec![] };
        let mut read = loaded(&alone.images, true, |_| 0);
        let plan_d = plan(&alone, &[], &mut read);
        let s = find(&plan_d, "got_target", "calloc", SlotKind::Got)[0];
        assert!(
            matches!(&s.state, SlotState::Unresolved { reason } if reason.contains("no loaded module defines calloc"))
        );
    }

    #[test]
    fn static_executable_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let Some(data) = compile(dir.path(), "got_static", &["-static"]) else { return };
        let images = Images { images: vec![image("/tmp/got_static", data, 0, true)], unreadable: vec![] };
        let plan = plan(&images, &[], |_| Some(1));
        assert!(plan.slots.is_empty());
        assert_eq!(
            plan.skipped,
            vec![(PathBuf::from("/tmp/got_static"), "static executable: no GOT; keep uprobes".into())]
        );
    }

    #[test]
    fn bias_from_the_offset_zero_mapping() {
        let loads = [
            Load { vaddr: 0, offset: 0, filesz: 0x25388 },
            Load { vaddr: 0x26000, offset: 0x26000, filesz: 0x1550fc },
            Load { vaddr: 0x1cf8d0, offset: 0x1cf8d0, filesz: 0x4f98 },
        ];
        let m = |start, file_offset| Mapping {
            start,
            end: start + PAGE,
            file_offset,
            path: PathBuf::from("/x"),
            dev: (0, 0),
            inode: 0,
        };
        assert_eq!(
            load_bias(&loads, &[m(0x7f00_0002_6000, 0x26000), m(0x7f00_0000_0000, 0)]),
            Some(0x7f00_0000_0000)
        );
        // Without the first mapping, the code mapping still places it.
        assert_eq!(load_bias(&loads, &[m(0x7f00_0002_6000, 0x26000)]), Some(0x7f00_0000_0000));
        assert_eq!(load_bias(&loads, &[m(0x7f00_001c_f000, 0x1cf000)]), Some(0x7f00_0000_0000));
        // A non-PIE executable at its link address.
        let exe = [Load { vaddr: 0x40_0000, offset: 0, filesz: 0x1000 }];
        assert_eq!(load_bias(&exe, &[m(0x40_0000, 0)]), Some(0));
        assert_eq!(load_bias(&exe, &[m(0x1000, 0)]), None);
    }
}
