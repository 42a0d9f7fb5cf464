//! Unwind tables from `.eh_frame`, compacted into the rows the eBPF stack walker uses.
//!
//! Why unwinding in the kernel: leakprobe needs a stack id for every allocation at the moment
//! it happens (to key the live block and the call site). Copying the user stack out and
//! unwinding in user space (perf's dwarf mode) would ship kilobytes per allocation to user
//! space; walking compact tables in BPF costs two binary searches and one or two 8-byte reads
//! per frame, and equal stacks are deduplicated in the kernel.
//!
//! Each row says how to find the canonical frame address (rsp or rbp plus an offset) and
//! where the caller's rbp was saved; the return address is always at CFA - 8 on x86_64.

use std::collections::HashMap;

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, LittleEndian, RegisterRule, UnwindContext, UnwindSection as _,
    X86_64,
};
use leakprobe_common::{UnwindRow, cfa, rbp_rule};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum UnwindError {
    #[error("not a readable ELF file")]
    Parse(#[source] object::Error),
    #[error("malformed .eh_frame")]
    EhFrame(#[source] gimli::Error),
}

/// A module's rows, sorted by pc, plus what is needed to map runtime addresses to them.
#[derive(Clone, Debug, Default)]
pub struct ModuleTable {
    pub rows: Vec<UnwindRow>,
    /// (p_vaddr, p_offset) of each loadable segment, to turn file offsets into ELF addresses.
    pub segments: Vec<(u64, u64, u64)>,
}

impl ModuleTable {
    /// ELF virtual address of file offset `off` (a mapping's offset, so page aligned), if a
    /// loadable segment covers it. The loader maps each segment from its page-aligned offset,
    /// so a segment covers `off` from `p_offset & !0xfff`; when two do (the page they share),
    /// the later segment is the one mapped there.
    pub fn vaddr_of_offset(&self, off: u64) -> Option<u64> {
        self.segments
            .iter()
            .filter(|(_, o, size)| off >= (o & !0xfff) && off < o + (*size).max(1))
            .max_by_key(|(_, o, _)| *o)
            .map(|(v, o, _)| v.wrapping_add(off).wrapping_sub(*o))
    }
}

fn row_of(r: &gimli::UnwindTableRow<usize>) -> UnwindRow {
    let end = UnwindRow { pc: r.start_address(), cfa_reg: cfa::END, ..Default::default() };
    if matches!(r.register(X86_64::RA), RegisterRule::Undefined) {
        // The outermost frame (_start, clone): nothing above it.
        return end;
    }
    let (cfa_reg, off) = match r.cfa() {
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RSP => (cfa::RSP, *offset),
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RBP => (cfa::RBP, *offset),
        // Expressions (PLT stubs, signal frames) are never a return address's frame here.
        _ => return end,
    };
    let Ok(cfa_offset) = i32::try_from(off) else { return end };
    let (rbp, rbp_offset) = match r.register(X86_64::RBP) {
        RegisterRule::Offset(o) => match i16::try_from(o) {
            Ok(o) => (rbp_rule::AT_CFA_OFFSET, o),
            Err(_) => (rbp_rule::UNDEFINED, 0),
        },
        // Unmentioned callee-saved registers keep their value.
        RegisterRule::Undefined | RegisterRule::SameValue => (rbp_rule::SAME, 0),
        _ => (rbp_rule::UNDEFINED, 0),
    };
    UnwindRow { pc: r.start_address(), cfa_offset, rbp_offset, cfa_reg, rbp_rule: rbp }
}

/// Builds the table of an ELF file. A file without `.eh_frame` gets an empty table: its
/// frames fall back to frame pointers, and stacks that cannot go on are counted.
pub fn build(data: &[u8]) -> Result<ModuleTable, UnwindError> {
    let file = object::File::parse(data).map_err(UnwindError::Parse)?;
    let segments = file
        .segments()
        .map(|s| {
            let (off, size) = s.file_range();
            (s.address(), off, size)
        })
        .collect();
    let Some(section) = file.section_by_name(".eh_frame") else {
        return Ok(ModuleTable { rows: Vec::new(), segments });
    };
    let bytes = section.data().map_err(UnwindError::Parse)?;
    let eh = EhFrame::new(bytes, LittleEndian);
    let mut bases = BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = file.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }

    // (row, is_fde_end): rows of all FDEs, plus a GAP marker where each FDE stops.
    let mut raw: Vec<(UnwindRow, bool)> = Vec::new();
    let mut ctx = Box::new(UnwindContext::new());
    let mut entries = eh.entries(&bases);
    let mut cies = HashMap::new();
    while let Some(entry) = entries.next().map_err(UnwindError::EhFrame)? {
        let CieOrFde::Fde(partial) = entry else { continue };
        let Ok(fde) = partial.parse(|eh, bases, off| {
            if let Some(cie) = cies.get(&off) {
                return Ok(Clone::clone(cie));
            }
            let cie = eh.cie_from_offset(bases, off)?;
            cies.insert(off, cie.clone());
            Ok(cie)
        }) else {
            continue;
        };
        let Ok(mut table) = fde.rows(&eh, &bases, &mut ctx) else { continue };
        while let Ok(Some(row)) = table.next_row() {
            raw.push((row_of(row), false));
        }
        raw.push((UnwindRow { pc: fde.end_address(), cfa_reg: cfa::GAP, ..Default::default() }, true));
    }
    // Real rows win over a GAP marker at the same pc (the next function starts there).
    raw.sort_by_key(|(r, is_end)| (r.pc, !*is_end));
    let mut by_pc: Vec<UnwindRow> = Vec::with_capacity(raw.len());
    for (r, _) in raw {
        match by_pc.last_mut() {
            Some(last) if last.pc == r.pc => *last = r,
            _ => by_pc.push(r),
        }
    }
    // A row that repeats the previous rule adds nothing.
    let mut rows: Vec<UnwindRow> = Vec::with_capacity(by_pc.len());
    for r in by_pc {
        if rows.last().is_some_and(|last| UnwindRow { pc: last.pc, ..r } == *last) {
            continue;
        }
        rows.push(r);
    }
    Ok(ModuleTable { rows, segments })
}

/// A file by (device, inode).
type FileKey = ((i32, i32), u64);
/// Where a file's rows start in the row array, how many, and its segments (rows dropped).
type LoadedFile = (u32, u32, ModuleTable);

/// Which of a target's modules have rows loaded, and where.
#[derive(Debug, Default)]
pub struct Loaded {
    files: HashMap<FileKey, LoadedFile>,
    next_row: u32,
    /// Modules left without rows because the row array was full.
    pub skipped_for_capacity: Vec<String>,
}

impl Loaded {
    /// Builds rows for files not seen yet. `write` stores rows at an index; `capacity` is the
    /// row array's size. Returns the module table for `maps`, sorted by start.
    pub fn sync<E>(
        &mut self,
        pid: i32,
        maps: &[crate::target::Mapping],
        capacity: u32,
        mut write: impl FnMut(u32, &[UnwindRow]) -> Result<(), E>,
    ) -> Result<Vec<leakprobe_common::UnwindModule>, E> {
        let mut modules = Vec::new();
        for m in maps {
            let key = (m.dev, m.inode);
            if !self.files.contains_key(&key) {
                let table = crate::target::open_mapping(pid, m)
                    .ok()
                    .and_then(|mut f| {
                        let mut data = Vec::new();
                        std::io::Read::read_to_end(&mut f, &mut data).ok()?;
                        build(&data).ok()
                    })
                    .unwrap_or_default();
                let n = table.rows.len() as u32;
                let (start, count) = if self.next_row.saturating_add(n) <= capacity {
                    write(self.next_row, &table.rows)?;
                    let start = self.next_row;
                    self.next_row += n;
                    (start, n)
                } else {
                    self.skipped_for_capacity.push(m.path.display().to_string());
                    (0, 0)
                };
                let segments_only = ModuleTable { rows: Vec::new(), segments: table.segments };
                self.files.insert(key, (start, count, segments_only));
            }
            let (row_start, row_count, table) = &self.files[&key];
            let Some(vaddr) = table.vaddr_of_offset(m.file_offset) else { continue };
            modules.push(leakprobe_common::UnwindModule {
                start: m.start,
                end: m.end,
                bias: m.start.wrapping_sub(vaddr),
                row_start: *row_start,
                row_count: *row_count,
            });
        }
        modules.sort_by_key(|m| m.start);
        Ok(modules)
    }

    pub fn rows_used(&self) -> u32 {
        self.next_row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_table() -> ModuleTable {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        build(&exe).unwrap()
    }

    #[test]
    fn rows_are_sorted_and_compact() {
        let t = own_table();
        assert!(t.rows.len() > 100, "too few rows: {}", t.rows.len());
        assert!(t.rows.windows(2).all(|w| w[0].pc < w[1].pc));
        assert!(t.rows.windows(2).all(|w| UnwindRow { pc: 0, ..w[0] } != UnwindRow { pc: 0, ..w[1] }));
    }

    #[test]
    fn function_entry_has_cfa_at_rsp_plus_8() {
        let t = own_table();
        let pc = function_offsets_here as fn() -> u64 as usize as u64;
        // The test binary is position independent: find our runtime bias from /proc/self/maps.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let (start, off) = maps
            .lines()
            .filter(|l| l.ends_with(exe.to_str().unwrap()))
            .find_map(|l| {
                let mut it = l.split_whitespace();
                let range = it.next()?;
                let perms = it.next()?;
                let off = u64::from_str_radix(it.next()?, 16).ok()?;
                let (s, e) = range.split_once('-')?;
                let (s, e) = (u64::from_str_radix(s, 16).ok()?, u64::from_str_radix(e, 16).ok()?);
                (perms.contains('x') && pc >= s && pc < e).then_some((s, off))
            })
            .unwrap();
        let vaddr = t.vaddr_of_offset(pc - start + off).unwrap();
        // The row in force at the entry: it may start before it, where the function before
        // ends with the same rule (equal neighbours are merged).
        let idx = t.rows.partition_point(|r| r.pc <= vaddr) - 1;
        let row = t.rows[idx];
        assert!(row.pc <= vaddr, "a row covers the entry: {row:?} at {vaddr:#x}");
        assert_eq!((row.cfa_reg, row.cfa_offset), (cfa::RSP, 8));
    }

    #[inline(never)]
    fn function_offsets_here() -> u64 {
        std::hint::black_box(42)
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(build(b"not an elf").is_err());
        assert!(build(&[]).is_err());
    }
}
