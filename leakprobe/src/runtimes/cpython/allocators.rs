//! CPython's allocator slots: the three `PyMemAllocatorEx` tables (RAW, MEM, OBJ) that
//! `PyMem_RawMalloc`, `PyMem_Malloc` and `PyObject_Malloc` (and their inlined copies) call
//! through, found in a live process, with what they hold.
//!
//! A table is `{void *ctx; malloc; calloc; realloc; free}`, 40 bytes. Where it lives:
//! - **3.12, 3.13**: `_PyRuntime.allocators.standard.{raw,mem,obj}`, at fixed offsets of
//!   `_PyRuntimeState` ([`RuntimeOffsets`], read with gdb from the DWARF of pyenv's 3.12.1
//!   and 3.13.0; `_Py_DebugOffsets` has no field for them). The file's initial image of
//!   `_PyRuntime` must hold the default tables there, or the offsets are refused.
//! - **3.9–3.11**: the statics `_PyMem_Raw`, `_PyMem`, `_PyObject` of `Objects/obmalloc.c`:
//!   local symbols, gone from stripped binaries (Debian's `/usr/bin/python3.11`). They are
//!   found by running the exported `PyMem_GetAllocator` and `PyMem_SetAllocator` once per
//!   domain on a tiny x86-64 evaluator ([`table_in_code`]): the 40-byte run of the module's
//!   writable data each one reads or writes (absolute addresses in a non-PIE executable,
//!   RIP-relative ones in a shared library). Both functions must agree, and the local
//!   symbols too when the module has them.
//!
//! The interpreter's own functions ("defaults") come from the file: the tables are
//! initialised data (`PYRAW_ALLOC`, `PYOBJ_ALLOC`), so the file holds RAW's `_PyMem_Raw*`
//! and MEM/OBJ's pymalloc `_PyObject_*` (with `R_X86_64_RELATIVE` addends in a shared
//! library), symbols or not. What the live tables hold is then classified:
//! - the defaults (`pymalloc`), or RAW's functions in all three (`PYTHONMALLOC=malloc`);
//! - a [`Wrapper`]: the debug hooks (`ctx` = `&_PyMem_Debug.{raw,mem,obj}`, a
//!   `{char api_id; PyMemAllocatorEx alloc}` holding `'r'`, `'m'`, `'o'`), tracemalloc
//!   (tracing on, `ctx` = `&allocators.{raw,mem,obj}` of `{mem, raw, obj}`), or an unknown
//!   one (memray, a C extension): reported, never refused.
//!
//! The decoding ([`table_in_code`], [`classify_wrapper`]) is pure; [`find_allocators`] takes
//! the module's file image, the process's executable ranges and a [`Memory`];
//! [`find_allocators_in`] does that I/O for a pid.

use std::{collections::HashMap, fmt, ops::Range};

use iced_x86::{
    ConditionCode, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic,
    OpAccess, OpKind, Register,
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use thiserror::Error;

use super::Runtime;
use crate::{runtimes::Memory, target::elf};

/// `sizeof(PyMemAllocatorEx)` on 64-bit.
pub const TABLE_SIZE: u64 = 40;
/// `sizeof(debug_alloc_api_t)`: `{char api_id; PyMemAllocatorEx alloc;}`.
pub const DEBUG_API_SIZE: u64 = 48;

/// A `PYMEM_DOMAIN_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Domain {
    Raw,
    Mem,
    Obj,
}

impl Domain {
    pub const ALL: [Domain; 3] = [Domain::Raw, Domain::Mem, Domain::Obj];

    /// The `PyMemAllocatorDomain` value.
    pub fn value(self) -> u32 {
        self as u32
    }

    /// The debug hooks' `api_id` for this domain.
    pub fn api_id(self) -> u8 {
        match self {
            Domain::Raw => b'r',
            Domain::Mem => b'm',
            Domain::Obj => b'o',
        }
    }

    /// Where tracemalloc's saved table for this domain sits in its `{mem, raw, obj}`.
    fn tracemalloc_index(self) -> u64 {
        match self {
            Domain::Mem => 0,
            Domain::Raw => 1,
            Domain::Obj => 2,
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Domain::Raw => "RAW",
            Domain::Mem => "MEM",
            Domain::Obj => "OBJ",
        })
    }
}

/// The four functions of a `PyMemAllocatorEx`, and its `ctx`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Table {
    pub ctx: u64,
    pub malloc: u64,
    pub calloc: u64,
    pub realloc: u64,
    pub free: u64,
}

impl Table {
    /// From the 40 bytes of a `PyMemAllocatorEx`.
    pub fn parse(b: &[u8]) -> Option<Table> {
        let w = |i: usize| Some(u64::from_le_bytes(b.get(i * 8..i * 8 + 8)?.try_into().ok()?));
        Some(Table { ctx: w(0)?, malloc: w(1)?, calloc: w(2)?, realloc: w(3)?, free: w(4)? })
    }

    pub fn functions(&self) -> [u64; 4] {
        [self.malloc, self.calloc, self.realloc, self.free]
    }

    fn same_functions(&self, other: &Table) -> bool {
        self.functions() == other.functions()
    }

    fn shifted(&self, by: u64) -> Table {
        let f = |a: u64| a.wrapping_add(by);
        Table {
            ctx: self.ctx,
            malloc: f(self.malloc),
            calloc: f(self.calloc),
            realloc: f(self.realloc),
            free: f(self.free),
        }
    }

    fn read(mem: &dyn Memory, addr: u64) -> Option<Table> {
        Table::parse(&mem.read_vec(addr, TABLE_SIZE as usize)?)
    }
}

/// One domain's slot in the live process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub domain: Domain,
    /// Runtime address of the `PyMemAllocatorEx`; its function words are at `addr + 8`,
    /// `+ 16`, `+ 24`, `+ 32` (aligned: each can be rewritten on its own).
    pub addr: u64,
    pub ctx: u64,
    pub malloc: u64,
    pub calloc: u64,
    pub realloc: u64,
    pub free: u64,
    /// What holds this slot when it is not the interpreter's own functions.
    pub wrapper: Option<Wrapper>,
}

impl Slot {
    pub fn table(&self) -> Table {
        Table {
            ctx: self.ctx,
            malloc: self.malloc,
            calloc: self.calloc,
            realloc: self.realloc,
            free: self.free,
        }
    }
}

/// Something that replaced the interpreter's functions in a slot (and, for the known ones,
/// forwards to the table it saved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wrapper {
    /// `tracemalloc` (`-X tracemalloc`, `PYTHONTRACEMALLOC`, `tracemalloc.start()`).
    Tracemalloc,
    /// The debug hooks (`PYTHONMALLOC=debug`, `pymalloc_debug`, `malloc_debug`, `-X dev`).
    DebugHooks,
    /// Anything else (memray's `--trace-python-allocators`, a C extension).
    Unknown,
}

impl fmt::Display for Wrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Wrapper::Tracemalloc => "tracemalloc",
            Wrapper::DebugHooks => "debug hooks (PYTHONMALLOC=debug)",
            Wrapper::Unknown => "unknown wrapper",
        })
    }
}

/// The three slots of a live CPython.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocators {
    /// RAW, MEM, OBJ, in that order.
    pub slots: [Slot; 3],
    /// MEM and OBJ end in pymalloc's own functions: directly, or under known wrappers
    /// (tracemalloc, the debug hooks) that forward to it. `false` under `PYTHONMALLOC=malloc`,
    /// or when an unknown wrapper hides what is underneath.
    pub pymalloc: bool,
    /// The outermost wrapper, when a slot does not hold the interpreter's functions: the
    /// first wrapped slot in the order OBJ, MEM, RAW.
    pub wrapped: Option<Wrapper>,
    /// How the tables were found ("_PyRuntime + 784", "PyMem_GetAllocator/SetAllocator",
    /// "symbols and PyMem_GetAllocator/SetAllocator").
    pub found_by: String,
    /// The interpreter's default RAW and pymalloc tables, at runtime addresses.
    pub default_raw: Table,
    pub default_pymalloc: Table,
    /// pymalloc's arena allocator (its code up to the `ret` after its `mmap` call), or why it
    /// is not known: its mmaps are the arenas the objects live in, not allocations of their own.
    pub arena_alloc: Result<Range<u64>, String>,
}

impl Allocators {
    pub fn slot(&self, d: Domain) -> &Slot {
        &self.slots[d as usize]
    }
}

/// Why the slots cannot be trusted. One line each.
#[derive(Debug, Error)]
pub enum AllocatorError {
    #[error("CPython {0}: allocator slots are known for 3.9 to 3.13 only")]
    Unsupported(super::PyVersion),
    #[error("cannot read {path}: {why}")]
    Module { path: String, why: String },
    #[error("cannot read the process: {0}")]
    Process(String),
    #[error("CPython {version}: {why}")]
    NotFound { version: super::PyVersion, why: String },
    #[error("the {domain} slot at {addr:#x} cannot be read")]
    Unreadable { domain: Domain, addr: u64 },
    #[error("the {domain} slot at {addr:#x}: its {field} ({value:#x}) is not in an executable mapping")]
    NotExecutable { domain: Domain, addr: u64, field: &'static str, value: u64 },
    #[error("the RAW, MEM and OBJ slots are not three distinct tables ({0:#x?})")]
    NotDistinct([u64; 3]),
}

/// Offsets in `_PyRuntimeState` (3.12+), from the DWARF of pyenv's builds:
/// `gdb -batch -ex 'print/d (long)&((_PyRuntimeState*)0)->allocators.standard.raw'` etc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuntimeOffsets {
    /// `allocators.standard.raw`; `.mem` and `.obj` follow at +40 and +80.
    pub standard: u64,
    /// `allocators.debug.raw` (`debug_alloc_api_t`, 48 bytes each).
    pub debug: u64,
    /// `tracemalloc.config.tracing` (an int).
    pub tracemalloc_tracing: u64,
    /// `tracemalloc.allocators` (`{mem, raw, obj}`).
    pub tracemalloc_allocators: u64,
    /// `allocators.obj_arena` (`PyObjectArenaAllocator`), as `PyObject_GetArenaAllocator`
    /// reads it (its code loads `_PyRuntime` through the GOT, which the evaluator cannot).
    pub obj_arena: u64,
}

impl RuntimeOffsets {
    /// 3.12.1: `allocators` at 88 (a `PyThread_type_lock mutex` first), 3.13.0: 696 (a
    /// `PyMutex`). `None` before 3.12, where the tables are statics.
    pub fn for_version(major: u8, minor: u8) -> Option<RuntimeOffsets> {
        match (major, minor) {
            (3, 12) => Some(RuntimeOffsets {
                standard: 96,
                debug: 216,
                tracemalloc_tracing: 2772,
                tracemalloc_allocators: 2784,
                obj_arena: 360,
            }),
            (3, 13) => Some(RuntimeOffsets {
                standard: 704,
                debug: 824,
                tracemalloc_tracing: 10084,
                tracemalloc_allocators: 10096,
                obj_arena: 976,
            }),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The evaluator: which table a PyMem_{Get,Set}Allocator reads or writes for a domain.

/// Machine code at an address (ELF virtual addresses of a module): a module's executable
/// sections, or pieces of them.
#[derive(Clone, Copy, Debug)]
pub struct Text<'a> {
    pub vaddr: u64,
    pub bytes: &'a [u8],
}

impl Text<'_> {
    fn decode_at(&self, ip: u64) -> Option<Instruction> {
        let off = usize::try_from(ip.checked_sub(self.vaddr)?).ok()?;
        let bytes = self.bytes.get(off..)?;
        let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
        let i = d.decode();
        (!i.is_invalid()).then_some(i)
    }
}

#[derive(Clone, Copy, Debug)]
struct Flags {
    a: u64,
    b: u64,
    bits: u32,
    test: bool,
}

impl Flags {
    fn holds(&self, cc: ConditionCode) -> Option<bool> {
        let mask = if self.bits == 64 { u64::MAX } else { (1u64 << self.bits) - 1 };
        let (a, b) = (self.a & mask, self.b & mask);
        let sign = |v: u64| (v >> (self.bits - 1)) & 1 == 1;
        let sext = |v: u64| ((v << (64 - self.bits)) as i64) >> (64 - self.bits);
        if self.test {
            let r = a & b;
            let (zf, sf) = (r == 0, sign(r));
            return Some(match cc {
                ConditionCode::e => zf,
                ConditionCode::ne => !zf,
                ConditionCode::s => sf,
                ConditionCode::ns => !sf,
                ConditionCode::le => zf || sf,
                ConditionCode::g => !zf && !sf,
                ConditionCode::l => sf,
                ConditionCode::ge => !sf,
                ConditionCode::be => zf,
                ConditionCode::a => !zf,
                ConditionCode::b => false,
                ConditionCode::ae => true,
                _ => return None,
            });
        }
        let (sa, sb) = (sext(a), sext(b));
        Some(match cc {
            ConditionCode::e => a == b,
            ConditionCode::ne => a != b,
            ConditionCode::b => a < b,
            ConditionCode::ae => a >= b,
            ConditionCode::be => a <= b,
            ConditionCode::a => a > b,
            ConditionCode::l => sa < sb,
            ConditionCode::ge => sa >= sb,
            ConditionCode::le => sa <= sb,
            ConditionCode::g => sa > sb,
            ConditionCode::s => sign(a.wrapping_sub(b)),
            ConditionCode::ns => !sign(a.wrapping_sub(b)),
            _ => return None,
        })
    }
}

#[derive(Clone, Debug)]
struct State {
    ip: u64,
    regs: [Option<u64>; 16],
    flags: Option<Flags>,
}

fn gpr(r: Register) -> Option<usize> {
    let full = r.full_register();
    let i = (full as usize).checked_sub(Register::RAX as usize)?;
    (i < 16 && r.is_gpr()).then_some(i)
}

impl State {
    fn get(&self, r: Register) -> Option<u64> {
        let v = self.regs[gpr(r)?]?;
        Some(match r.size() {
            8 => v,
            4 => v & 0xffff_ffff,
            2 => v & 0xffff,
            1 if !matches!(r, Register::AH | Register::BH | Register::CH | Register::DH) => v & 0xff,
            _ => return None,
        })
    }

    fn set(&mut self, r: Register, v: Option<u64>) {
        let Some(i) = gpr(r) else { return };
        self.regs[i] = match r.size() {
            8 => v,
            4 => v.map(|v| v & 0xffff_ffff),
            _ => None,
        };
    }

    fn operand(&self, i: &Instruction, n: u32) -> Option<u64> {
        match i.op_kind(n) {
            OpKind::Register => self.get(i.op_register(n)),
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => Some(i.immediate(n)),
            _ => None,
        }
    }

    /// The address of `i`'s memory operand, when known.
    fn address(&self, i: &Instruction) -> Option<u64> {
        if i.is_ip_rel_memory_operand() {
            return Some(i.ip_rel_memory_address());
        }
        if i.segment_prefix() != Register::None && !matches!(i.memory_segment(), Register::DS | Register::SS)
        {
            return None;
        }
        let base = match i.memory_base() {
            Register::None => 0,
            b => self.get(b)?,
        };
        let index = match i.memory_index() {
            Register::None => 0,
            x => self.get(x)?.wrapping_mul(u64::from(i.memory_index_scale())),
        };
        Some(base.wrapping_add(index).wrapping_add(i.memory_displacement64()))
    }
}

const CALLER_SAVED: [Register; 9] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
];

/// The table that the code at `entry` (`PyMem_GetAllocator` or `PyMem_SetAllocator`, both
/// `(domain, PyMemAllocatorEx *)`) reads or writes when called with `domain`: every path
/// from `entry` is followed with `edi = domain` (direct jumps anywhere in `text`, the hot
/// and cold parts of a PGO build included; branches on known values decided, others
/// taken both ways; calls skipped), and the accesses it makes to `data` (the module's
/// writable ranges) are merged into runs. Exactly one run must be 40 bytes long.
pub fn table_in_code(text: &[Text], data: &[Range<u64>], entry: u64, domain: u32) -> Result<u64, String> {
    run_in_code(text, data, entry, Some(u64::from(domain)), TABLE_SIZE)
        .map_err(|e| format!("domain {domain} from {entry:#x}: {e}"))
}

/// The run of `len` bytes of `data` that the code at `entry` reads or writes, every path
/// followed as [`table_in_code`] does, with rdi = `rdi` (unknown if `None`).
pub fn run_in_code(
    text: &[Text],
    data: &[Range<u64>],
    entry: u64,
    rdi: Option<u64>,
    len: u64,
) -> Result<u64, String> {
    const BUDGET: usize = 400;
    const MAX_PATHS: usize = 32;
    let mut regs = [None; 16];
    regs[gpr(Register::RDI).unwrap()] = rdi;
    let mut stack = vec![State { ip: entry, regs, flags: None }];
    let mut paths = 0;
    let mut steps = 0;
    let mut accesses: Vec<(u64, u64)> = Vec::new();
    let mut info = InstructionInfoFactory::new();
    let in_data = |a: u64| data.iter().any(|r| r.contains(&a));

    while let Some(mut s) = stack.pop() {
        paths += 1;
        if paths > MAX_PATHS {
            return Err(format!("more than {MAX_PATHS} paths from {entry:#x}"));
        }
        loop {
            steps += 1;
            if steps > BUDGET {
                return Err(format!("more than {BUDGET} instructions from {entry:#x}"));
            }
            let Some(i) = text.iter().find_map(|t| t.decode_at(s.ip)) else { break };
            s.ip = i.next_ip();
            // Data accesses through a memory operand.
            if i.mnemonic() != Mnemonic::Lea
                && (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory)
                && let Some(a) = s.address(&i)
                && in_data(a)
            {
                accesses.push((a, u64::from(i.memory_size().size() as u32).max(1)));
            }
            match i.mnemonic() {
                Mnemonic::Ret => break,
                Mnemonic::Jmp => {
                    if i.op0_kind() == OpKind::NearBranch64 {
                        s.ip = i.near_branch_target();
                        continue;
                    }
                    break; // an indirect tail call
                }
                Mnemonic::Call => {
                    for r in CALLER_SAVED {
                        s.set(r, None);
                    }
                    s.flags = None;
                    continue;
                }
                _ if i.is_jcc_short_or_near() => {
                    match s.flags.and_then(|f| f.holds(i.condition_code())) {
                        Some(true) => s.ip = i.near_branch_target(),
                        Some(false) => {}
                        None => {
                            let mut other = s.clone();
                            other.ip = i.near_branch_target();
                            stack.push(other);
                        }
                    }
                    continue;
                }
                _ => {}
            }
            if i.flow_control() != FlowControl::Next {
                break; // int3, ud2, indirect branches: nothing more to learn on this path
            }
            // String moves: `rep movs` with a known count and ends.
            if i.is_string_instruction()
                && matches!(
                    i.mnemonic(),
                    Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq
                )
            {
                let unit = match i.mnemonic() {
                    Mnemonic::Movsb => 1,
                    Mnemonic::Movsw => 2,
                    Mnemonic::Movsd => 4,
                    _ => 8,
                };
                let count = if i.has_rep_prefix() { s.get(Register::RCX) } else { Some(1) };
                if let Some(n) = count {
                    for r in [Register::RSI, Register::RDI] {
                        if let Some(a) = s.get(r)
                            && in_data(a)
                        {
                            accesses.push((a, n * unit));
                        }
                    }
                }
                for r in [Register::RSI, Register::RDI, Register::RCX] {
                    s.set(r, None);
                }
                continue;
            }
            let dst = (i.op_count() > 0 && i.op0_kind() == OpKind::Register).then(|| i.op0_register());
            match (i.mnemonic(), dst) {
                (Mnemonic::Mov, Some(d)) => {
                    let v = s.operand(&i, 1);
                    s.set(d, v);
                }
                (Mnemonic::Lea, Some(d)) => {
                    let v = s.address(&i);
                    s.set(d, v);
                }
                (Mnemonic::Xor, Some(d)) if i.op1_kind() == OpKind::Register && i.op1_register() == d => {
                    s.set(d, Some(0));
                    s.flags = Some(Flags { a: 0, b: 0, bits: 64, test: true });
                }
                (Mnemonic::Cmp | Mnemonic::Test, _) => {
                    let bits = match i.op_kind(0) {
                        OpKind::Register => i.op0_register().size() as u32 * 8,
                        _ => 0,
                    };
                    s.flags = match (s.operand(&i, 0), s.operand(&i, 1)) {
                        (Some(a), Some(b)) if bits > 0 => {
                            Some(Flags { a, b, bits, test: i.mnemonic() == Mnemonic::Test })
                        }
                        _ => None,
                    };
                }
                _ => {
                    for r in info.info(&i).used_registers() {
                        if matches!(
                            r.access(),
                            OpAccess::Write
                                | OpAccess::ReadWrite
                                | OpAccess::CondWrite
                                | OpAccess::ReadCondWrite
                        ) {
                            s.set(r.register(), None);
                        }
                    }
                    if i.rflags_modified() != 0 {
                        s.flags = None;
                    }
                }
            }
        }
    }

    // Merge the accesses into runs; the table is the run of exactly 40 bytes.
    accesses.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (a, n) in accesses {
        match runs.last_mut() {
            Some((_, end)) if a <= *end => *end = (*end).max(a + n),
            _ => runs.push((a, a + n)),
        }
    }
    let tables: Vec<u64> = runs.iter().filter(|(s, e)| e - s == len).map(|(s, _)| *s).collect();
    match tables[..] {
        [t] => Ok(t),
        [] => Err(format!("no {len}-byte table accessed (data runs {runs:#x?})")),
        _ => Err(format!("several {len}-byte tables {tables:#x?}")),
    }
}

/// `sizeof(PyObjectArenaAllocator)`: `{void *ctx; alloc; free}`.
pub const ARENA_TABLE_SIZE: u64 = 24;

/// The code of a small function from `entry` up to its first `ret`, read straight on
/// (conditional branches and calls passed over, at most 64 instructions): where the return
/// address of a call it makes lies. pymalloc's arena allocator is `mmap(...)`, a compare and
/// a `ret`. `None` if anything else ends the straight line first.
pub fn code_to_first_ret(text: &[Text], entry: u64) -> Option<Range<u64>> {
    let mut ip = entry;
    for _ in 0..64 {
        let i = text.iter().find_map(|t| t.decode_at(ip))?;
        ip = i.next_ip();
        match i.flow_control() {
            FlowControl::Return => return Some(entry..ip),
            FlowControl::Next | FlowControl::Call | FlowControl::ConditionalBranch => {}
            _ => return None,
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// The module's file: initial data, symbols, ranges.

/// What the module's file says, at ELF addresses.
struct ModuleFacts {
    /// `(vaddr, bytes)` of each executable `SHT_PROGBITS` section.
    text: Vec<(u64, Vec<u8>)>,
    /// Writable `PT_LOAD` ranges (`.bss` included).
    data: Vec<Range<u64>>,
    /// Executable `PT_LOAD` ranges.
    exec: Vec<Range<u64>>,
    syms: HashMap<String, elf::SymbolAddr>,
    /// Local functions whose names say which wrapper they belong to: `(start, end, name)`.
    wrapper_functions: Vec<(u64, u64, String)>,
    image: Vec<u8>,
}

const SYMBOLS: &[&str] = &[
    "PyMem_GetAllocator",
    "PyMem_SetAllocator",
    "_PyMem_Raw",
    "_PyMem",
    "_PyObject",
    "_PyMem_Debug",
    "_PyObject_Malloc",
    "_PyMem_RawMalloc",
    "_Py_tracemalloc_config",
    "PyObject_GetArenaAllocator",
    "_PyObject_ArenaMmap",
];

impl ModuleFacts {
    fn parse(image: Vec<u8>) -> Result<ModuleFacts, String> {
        use object::read::elf::{ElfFile64, ProgramHeader as _};
        let file = object::File::parse(&*image).map_err(|e| e.to_string())?;
        let text = file
            .sections()
            .filter(|s| {
                matches!(s.flags(), object::SectionFlags::Elf { sh_flags } if sh_flags & u64::from(object::elf::SHF_EXECINSTR) != 0)
                    && s.kind() == object::SectionKind::Text
            })
            .filter_map(|s| Some((s.address(), s.data().ok()?.to_vec())))
            .collect();
        let syms = elf::symbols_in(&image, |n| SYMBOLS.contains(&n)).map_err(|e| e.to_string())?;
        let wrapper_functions = file
            .symbols()
            .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 0)
            .filter_map(|s| {
                let n = s.name().ok()?;
                (n.starts_with("tracemalloc_") || n.starts_with("_PyMem_Debug"))
                    .then(|| (s.address(), s.address() + s.size(), n.to_string()))
            })
            .collect();
        let elf64 = ElfFile64::<object::Endianness>::parse(&*image).map_err(|e| e.to_string())?;
        let e = elf64.endian();
        let mut data = Vec::new();
        let mut exec = Vec::new();
        for p in elf64.elf_program_headers() {
            if p.p_type(e) != object::elf::PT_LOAD {
                continue;
            }
            let r = p.p_vaddr(e)..p.p_vaddr(e) + p.p_memsz(e);
            if p.p_flags(e) & object::elf::PF_W != 0 {
                data.push(r.clone());
            }
            if p.p_flags(e) & object::elf::PF_X != 0 {
                exec.push(r);
            }
        }
        Ok(ModuleFacts { text, data, exec, syms, wrapper_functions, image })
    }

    fn sym(&self, name: &str) -> Option<u64> {
        self.syms.get(name).map(|s| s.address)
    }

    fn texts(&self) -> Vec<Text<'_>> {
        self.text.iter().map(|(vaddr, bytes)| Text { vaddr: *vaddr, bytes }).collect()
    }

    fn table_in(&self, entry: u64, domain: Domain) -> Result<u64, String> {
        table_in_code(&self.texts(), &self.data, entry, domain.value())
    }

    /// pymalloc's arena allocator (`_PyObject_ArenaMmap`, read from the table that
    /// `PyObject_GetArenaAllocator` copies out), at runtime addresses: the code up to its
    /// first `ret`. Refused if the live table holds another allocator.
    /// `in_runtime`: the table's ELF address from [`RuntimeOffsets::obj_arena`] (3.12+).
    fn arena_alloc_code(
        &self,
        mem: &dyn Memory,
        bias: u64,
        in_runtime: Option<u64>,
    ) -> Result<Range<u64>, String> {
        let text = self.texts();
        let table = match in_runtime {
            Some(t) => t,
            None => {
                let entry =
                    self.sym("PyObject_GetArenaAllocator").ok_or("no PyObject_GetArenaAllocator symbol")?;
                run_in_code(&text, &self.data, entry, None, ARENA_TABLE_SIZE)
                    .map_err(|e| format!("PyObject_GetArenaAllocator: {e}"))?
            }
        };
        let initial = self.initial_words(&[table + 8])?[0];
        if let Some(named) = self.sym("_PyObject_ArenaMmap")
            && named != initial
        {
            return Err(format!("the arena table holds {initial:#x}, _PyObject_ArenaMmap is {named:#x}"));
        }
        let live = mem.read_u64(table + bias + 8).ok_or("the arena table cannot be read")?;
        if live != initial.wrapping_add(bias) {
            return Err(format!("the arena allocator was replaced ({live:#x})"));
        }
        let code = code_to_first_ret(&text, initial)
            .ok_or_else(|| format!("the arena allocator at {initial:#x} is not mmap then ret"))?;
        Ok(code.start + bias..code.end + bias)
    }

    /// The file's initial 8-byte words at `vaddrs`: section contents, with the addend of an
    /// `R_X86_64_RELATIVE` relocation where there is one (a shared library's pointers).
    fn initial_words(&self, vaddrs: &[u64]) -> Result<Vec<u64>, String> {
        let file = object::File::parse(&*self.image).map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(vaddrs.len());
        for &a in vaddrs {
            let sec = file
                .sections()
                .find(|s| s.address() <= a && a + 8 <= s.address() + s.size())
                .ok_or_else(|| format!("{a:#x} is in no section of the file"))?;
            let v = match sec.data() {
                Ok(d) if !d.is_empty() => {
                    let off = (a - sec.address()) as usize;
                    u64::from_le_bytes(d[off..off + 8].try_into().unwrap())
                }
                _ => 0, // .bss
            };
            out.push(v);
        }
        if let Some(relocs) = file.dynamic_relocations() {
            for (at, r) in relocs {
                if let object::RelocationFlags::Elf { r_type: object::elf::R_X86_64_RELATIVE } = r.flags()
                    && let Some(k) = vaddrs.iter().position(|&a| a == at)
                {
                    out[k] = r.addend() as u64;
                }
            }
        }
        Ok(out)
    }

    fn initial_table(&self, vaddr: u64) -> Result<Table, String> {
        let w = self.initial_words(&[vaddr, vaddr + 8, vaddr + 16, vaddr + 24, vaddr + 32])?;
        Ok(Table { ctx: w[0], malloc: w[1], calloc: w[2], realloc: w[3], free: w[4] })
    }

    fn in_exec(&self, a: u64) -> bool {
        self.exec.iter().any(|r| r.contains(&a))
    }

    fn wrapper_function(&self, a: u64) -> Option<&str> {
        self.wrapper_functions.iter().find(|(s, e, _)| *s <= a && a < *e).map(|(_, _, n)| n.as_str())
    }
}

// ---------------------------------------------------------------------------------------
// Classification.

/// What the process says about the known wrappers, at runtime addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WrapperFacts {
    /// `&_PyMem_Debug.raw` / `&_PyRuntime.allocators.debug.raw`, when known.
    pub debug_raw: Option<u64>,
    /// tracemalloc's saved `{mem, raw, obj}`, when known.
    pub tracemalloc_allocators: Option<u64>,
    /// `tracing` of tracemalloc's config, as read.
    pub tracemalloc_tracing: Option<bool>,
}

/// Which known wrapper a slot holding non-default functions is, by what it points at:
/// - debug hooks: `ctx` is `debug_raw + 48 * domain` when that is known; in any case the
///   byte at `ctx` is the domain's `api_id` and `ctx + 8` holds a table (`inner`) whose
///   functions are executable;
/// - tracemalloc: tracing is on, and `ctx` is `allocators + 40 * index` (`{mem, raw, obj}`)
///   when that is known, else `ctx` is in the interpreter's data and holds a table;
/// - `names`: the names of the slot's functions, where symbols say (`tracemalloc_*`,
///   `_PyMem_Debug*`) win over the shape.
///
/// Returns the wrapper and the table it forwards to (the debug hooks' or tracemalloc's
/// saved one), if it is a known one.
pub fn classify_wrapper(
    domain: Domain,
    slot: &Table,
    facts: &WrapperFacts,
    names: &[Option<&str>],
    mem: &dyn Memory,
    executable: &dyn Fn(u64) -> bool,
    in_module_data: &dyn Fn(u64) -> bool,
) -> (Wrapper, Option<Table>) {
    let valid = |t: &Table| t.functions().iter().all(|&f| executable(f));
    let named = |prefix: &str| names.iter().any(|n| n.is_some_and(|n| n.starts_with(prefix)));
    let ctx = slot.ctx;

    // The debug hooks.
    let debug_shape =
        mem.read_u8(ctx) == Some(domain.api_id()) && Table::read(mem, ctx + 8).filter(valid).is_some();
    let debug_place = match facts.debug_raw {
        Some(base) => ctx == base + DEBUG_API_SIZE * domain as u64,
        None => in_module_data(ctx),
    };
    if debug_shape && debug_place && (named("_PyMem_Debug") || !named("tracemalloc_")) {
        return (Wrapper::DebugHooks, Table::read(mem, ctx + 8));
    }

    // tracemalloc.
    let saved = Table::read(mem, ctx).filter(valid);
    let tm_place = match facts.tracemalloc_allocators {
        Some(base) => ctx == base + TABLE_SIZE * domain.tracemalloc_index(),
        None => in_module_data(ctx),
    };
    let tracing = facts.tracemalloc_tracing == Some(true) || named("tracemalloc_");
    if tracing && saved.is_some() && tm_place && !named("_PyMem_Debug") {
        return (Wrapper::Tracemalloc, saved);
    }
    (Wrapper::Unknown, None)
}

// ---------------------------------------------------------------------------------------
// Putting it together.

/// Finds the three slots of `runtime` (recognised by [`super::detect`]) in the process
/// `mem` reads. `image` is the file of `runtime.module`; `executable` the process's
/// executable mappings (every function word must be in one).
pub fn find_allocators(
    runtime: &Runtime,
    mem: &dyn Memory,
    image: Vec<u8>,
    executable: &[Range<u64>],
) -> Result<Allocators, AllocatorError> {
    let version = runtime.version;
    if version.major != 3 || !(9..=13).contains(&version.minor) {
        return Err(AllocatorError::Unsupported(version));
    }
    let not_found = |why: String| AllocatorError::NotFound { version, why };
    let path = runtime.module.display().to_string();
    let m = ModuleFacts::parse(image).map_err(|why| AllocatorError::Module { path: path.clone(), why })?;
    let bias = runtime.bias;
    let in_exec = |a: u64| executable.iter().any(|r| r.contains(&a));
    let runtime_offsets = RuntimeOffsets::for_version(version.major, version.minor);

    // 1. Where the tables are, as ELF addresses.
    let (elf_tables, found_by): ([u64; 3], String) = match runtime_offsets {
        Some(o) => {
            let base = runtime.py_runtime - bias;
            (
                [base + o.standard, base + o.standard + TABLE_SIZE, base + o.standard + 2 * TABLE_SIZE],
                format!("_PyRuntime + {} (allocators.standard)", o.standard),
            )
        }
        None => {
            let entry = |n: &'static str| {
                m.sym(n).ok_or_else(|| not_found(format!("no {n} symbol to find the allocator tables by")))
            };
            let (get, set) = (entry("PyMem_GetAllocator")?, entry("PyMem_SetAllocator")?);
            let mut t = [0u64; 3];
            for d in Domain::ALL {
                let by_get = m.table_in(get, d).map_err(|e| not_found(format!("PyMem_GetAllocator: {e}")))?;
                let by_set = m.table_in(set, d).map_err(|e| not_found(format!("PyMem_SetAllocator: {e}")))?;
                if by_get != by_set {
                    return Err(not_found(format!(
                        "for {d}, PyMem_GetAllocator reads {by_get:#x} but PyMem_SetAllocator writes {by_set:#x}"
                    )));
                }
                t[d as usize] = by_get;
            }
            let mut how = "PyMem_GetAllocator/SetAllocator".to_string();
            let named = [m.sym("_PyMem_Raw"), m.sym("_PyMem"), m.sym("_PyObject")];
            if named.iter().all(Option::is_some) {
                let named = named.map(Option::unwrap);
                if named != t {
                    return Err(not_found(format!(
                        "the code says the tables are {t:#x?}, the symbols _PyMem_Raw, _PyMem, _PyObject say {named:#x?}"
                    )));
                }
                how = format!("symbols and {how}");
            }
            (t, how)
        }
    };

    // 2. The interpreter's defaults: the file's initial tables.
    let initial: Vec<Table> = elf_tables
        .iter()
        .map(|&a| m.initial_table(a))
        .collect::<Result<_, _>>()
        .map_err(|e| not_found(format!("the file's initial tables: {e}")))?;
    let (raw0, mem0, obj0) = (initial[0], initial[1], initial[2]);
    for (d, t) in Domain::ALL.iter().zip(&initial) {
        if t.ctx != 0 || !t.functions().iter().all(|&f| m.in_exec(f)) {
            return Err(not_found(format!(
                "the file's initial {d} table at {:#x} is no default allocator ({t:#x?})",
                elf_tables[*d as usize]
            )));
        }
    }
    if mem0 != obj0 || raw0.same_functions(&obj0) {
        return Err(not_found(format!(
            "the file's initial tables are not RAW = malloc, MEM = OBJ = pymalloc ({initial:#x?})"
        )));
    }
    for (sym, want) in [("_PyObject_Malloc", obj0.malloc), ("_PyMem_RawMalloc", raw0.malloc)] {
        if let Some(a) = m.sym(sym)
            && a != want
        {
            return Err(not_found(format!("{sym} is {a:#x}, the default table holds {want:#x}")));
        }
    }
    let default_raw = raw0.shifted(bias);
    let default_pymalloc = obj0.shifted(bias);

    // 3. 3.12+: the debug hooks' tables must be where the offsets say (their api_id).
    let mut facts = WrapperFacts::default();
    if let Some(o) = runtime_offsets {
        let debug = runtime.py_runtime + o.debug;
        let file_debug = debug - bias;
        for d in Domain::ALL {
            let at = file_debug + DEBUG_API_SIZE * d as u64;
            let w = m.initial_words(&[at]).map_err(not_found)?;
            if w[0] & 0xff != u64::from(d.api_id()) {
                return Err(not_found(format!(
                    "_PyRuntime + {}: no debug table with api_id '{}' in the file",
                    at - (runtime.py_runtime - bias),
                    d.api_id() as char
                )));
            }
        }
        facts.debug_raw = Some(debug);
        facts.tracemalloc_allocators = Some(runtime.py_runtime + o.tracemalloc_allocators);
        facts.tracemalloc_tracing = mem.read_i32(runtime.py_runtime + o.tracemalloc_tracing).map(|v| v != 0);
    } else {
        facts.debug_raw = m.sym("_PyMem_Debug").map(|a| a + bias);
        // `_Py_tracemalloc_config` = `{initialized, tracing, max_nframe}`, exported.
        facts.tracemalloc_tracing =
            m.sym("_Py_tracemalloc_config").and_then(|a| mem.read_i32(a + bias + 4)).map(|v| v != 0);
    }

    // 4. The live slots.
    let addrs = elf_tables.map(|a| a + bias);
    if addrs[0] == addrs[1] || addrs[1] == addrs[2] || addrs[0] == addrs[2] {
        return Err(AllocatorError::NotDistinct(addrs));
    }
    let data_runtime: Vec<Range<u64>> = m.data.iter().map(|r| r.start + bias..r.end + bias).collect();
    let in_module_data = |a: u64| data_runtime.iter().any(|r| r.contains(&a));
    let mut slots = Vec::with_capacity(3);
    for d in Domain::ALL {
        let addr = addrs[d as usize];
        let t = Table::read(mem, addr).ok_or(AllocatorError::Unreadable { domain: d, addr })?;
        for (field, v) in ["malloc", "calloc", "realloc", "free"].into_iter().zip(t.functions()) {
            if !in_exec(v) {
                return Err(AllocatorError::NotExecutable { domain: d, addr, field, value: v });
            }
        }
        slots.push((d, addr, t));
    }

    // 5. What they hold.
    let is_default =
        |t: &Table| t.ctx == 0 && (t.same_functions(&default_raw) || t.same_functions(&default_pymalloc));
    let mut pymalloc = true;
    let mut out: Vec<Slot> = Vec::with_capacity(3);
    for &(d, addr, t) in &slots {
        let mut wrapper = None;
        let mut inner = t;
        for depth in 0..4 {
            if is_default(&inner) {
                break;
            }
            let names: Vec<Option<&str>> = inner
                .functions()
                .iter()
                .map(|&f| f.checked_sub(bias).and_then(|a| m.wrapper_function(a)))
                .collect();
            let (w, next) = classify_wrapper(d, &inner, &facts, &names, mem, &in_exec, &in_module_data);
            if depth == 0 {
                wrapper = Some(w);
            }
            match next {
                Some(n) => inner = n,
                None => break,
            }
        }
        if d != Domain::Raw && !(inner.ctx == 0 && inner.same_functions(&default_pymalloc)) {
            pymalloc = false;
        }
        out.push(Slot {
            domain: d,
            addr,
            ctx: t.ctx,
            malloc: t.malloc,
            calloc: t.calloc,
            realloc: t.realloc,
            free: t.free,
            wrapper,
        });
    }
    let wrapped = [Domain::Obj, Domain::Mem, Domain::Raw].iter().find_map(|&d| out[d as usize].wrapper);
    Ok(Allocators {
        slots: [out[0], out[1], out[2]],
        pymalloc,
        wrapped,
        found_by,
        default_raw,
        default_pymalloc,
        arena_alloc: m.arena_alloc_code(
            mem,
            bias,
            runtime_offsets.map(|o| runtime.py_runtime - bias + o.obj_arena),
        ),
    })
}

/// [`find_allocators`] for the process `runtime.pid`: its module's file through
/// `/proc/PID/root`, its executable mappings from `/proc/PID/maps`.
pub fn find_allocators_in(runtime: &Runtime, mem: &dyn Memory) -> Result<Allocators, AllocatorError> {
    let pid = runtime.pid;
    let path = crate::target::target_path(pid, &runtime.module);
    let image = std::fs::read(&path)
        .map_err(|e| AllocatorError::Module { path: path.display().to_string(), why: e.to_string() })?;
    let maps = procfs::process::Process::new(pid)
        .and_then(|p| p.maps())
        .map_err(|e| AllocatorError::Process(e.to_string()))?;
    let executable: Vec<Range<u64>> = maps
        .iter()
        .filter(|m| m.perms.contains(procfs::process::MMPermissions::EXECUTE))
        .map(|m| m.address.0..m.address.1)
        .collect();
    find_allocators(runtime, mem, image, &executable)
}

#[cfg(test)]
mod tests {
    use iced_x86::{
        Code, Instruction, MemoryOperand,
        code_asm::{CodeAssembler, eax, ecx, edi, esi, ptr, rax, rdi, rsi, xmm0, xmm1},
    };

    use super::*;

    /// One range (a module with a single writable segment).
    fn one(r: Range<u64>) -> [Range<u64>; 1] {
        [r]
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// Debian 12's /usr/bin/python3.11 (3.11.2, non-PIE, PGO: hot/cold split), its bytes:
    /// `PyMem_SetAllocator` (0x4f7540; MEM tail-jumps into the middle of GetAllocator),
    /// `PyMem_GetAllocator` (0x628cb0, then the copy of SetAllocator's MEM store), and the
    /// cold part GetAllocator's MEM case jumps to (0x421cb0, named `Py_PreInitialize+0x6b1`).
    const DEBIAN_SET: (u64, &str) = (
        0x4f7540,
        "85ff750dbf60a09500b90a000000f3a5c383ff01741283ff027515bf409f9500b90a000000f3a5c34889f7e980171300c3",
    );
    const DEBIAN_GET: (u64, &str) = (
        0x628cb0,
        "4889f085ff7510be60a09500b90a0000004889c7f3a5c383ff010f84e08fdfff83ff027510be409f9500b90a0000004889c7f3a5c3e9d68fdfff660f1f4400004889feb90a000000bf809f9500f3a5c3",
    );
    const DEBIAN_COLD: (u64, &str) = (0x421cb0, "be809f9500b90a0000004889c7f3a5c3");
    /// Its writable PT_LOAD (vaddr 0x945dc8, memsz 0x1832f0).
    const DEBIAN_DATA: Range<u64> = 0x945dc8..0x945dc8 + 0x1832f0;

    #[test]
    fn debian_311_tables_from_its_own_code() {
        let bytes: Vec<(u64, Vec<u8>)> =
            [DEBIAN_SET, DEBIAN_GET, DEBIAN_COLD].iter().map(|(a, h)| (*a, hex(h))).collect();
        let text: Vec<Text> = bytes.iter().map(|(a, b)| Text { vaddr: *a, bytes: b }).collect();
        let data = [DEBIAN_DATA];
        // RAW, MEM, OBJ as RUNTIMES.md §3 reads them off objdump.
        for (domain, want) in [(0, 0x95a060), (1, 0x959f80), (2, 0x959f40)] {
            assert_eq!(table_in_code(&text, &data, DEBIAN_GET.0, domain), Ok(want), "get {domain}");
            assert_eq!(table_in_code(&text, &data, DEBIAN_SET.0, domain), Ok(want), "set {domain}");
        }
        // No such domain: SetAllocator returns without touching anything.
        let err = table_in_code(&text, &data, DEBIAN_SET.0, 3).unwrap_err();
        assert!(err.contains("no 40-byte table"), "{err}");
        // Without the cold part, GetAllocator's MEM path leads nowhere.
        let err = table_in_code(&text[..2], &data, DEBIAN_GET.0, 1).unwrap_err();
        assert!(err.contains("no 40-byte table"), "{err}");
    }

    /// A shared library's `PyMem_SetAllocator` as GCC -O3 -fPIC emits it (pyenv 3.9-3.11):
    /// `cmp edi, 1; je; cmp edi, 2; je; test edi, edi; je`, then three RIP-relative copies.
    fn pic_set_allocator(ip: u64, tables: [u64; 3], raw_len: u64) -> Vec<u8> {
        let rip = |addr: u64| MemoryOperand::with_base_displ(Register::RIP, addr as i64);
        let mut a = CodeAssembler::new(64).unwrap();
        let mut labels = [a.create_label(), a.create_label(), a.create_label()];
        a.cmp(edi, 1).unwrap();
        a.je(labels[1]).unwrap();
        a.cmp(edi, 2).unwrap();
        a.je(labels[2]).unwrap();
        a.test(edi, edi).unwrap();
        a.je(labels[0]).unwrap();
        a.ret().unwrap();
        for (d, t) in tables.into_iter().enumerate() {
            a.set_label(&mut labels[d]).unwrap();
            a.movdqu(xmm0, ptr(rsi)).unwrap();
            a.add_instruction(Instruction::with2(Code::Movaps_xmmm128_xmm, rip(t), Register::XMM0).unwrap())
                .unwrap();
            a.movdqu(xmm1, ptr(rsi + 16)).unwrap();
            a.add_instruction(
                Instruction::with2(Code::Movaps_xmmm128_xmm, rip(t + 16), Register::XMM1).unwrap(),
            )
            .unwrap();
            if d != 0 || raw_len == 40 {
                a.mov(rax, ptr(rsi + 32)).unwrap();
                a.add_instruction(
                    Instruction::with2(Code::Mov_rm64_r64, rip(t + 32), Register::RAX).unwrap(),
                )
                .unwrap();
            }
            a.ret().unwrap();
        }
        a.assemble(ip).unwrap()
    }

    #[test]
    fn shared_library_tables_rip_relative() {
        let ip = 0x1ae450;
        let tables = [0x45c2e0, 0x45c2a0, 0x45c260];
        let code = pic_set_allocator(ip, tables, 40);
        let text = [Text { vaddr: ip, bytes: &code }];
        let data = one(0x446b80..0x5b9900);
        for d in 0..3 {
            assert_eq!(table_in_code(&text, &data, ip, d), Ok(tables[d as usize]));
        }
        // Tables outside the module's data are not the module's tables.
        assert!(table_in_code(&text, &one(0x1000..0x2000), ip, 0).is_err());
        // A 32-byte copy is no PyMemAllocatorEx.
        let short = pic_set_allocator(ip, tables, 32);
        let err = table_in_code(&[Text { vaddr: ip, bytes: &short }], &data, ip, 0).unwrap_err();
        assert!(err.contains("0x45c2e0"), "{err}");
    }

    /// A branch on something unknown is followed both ways; two tables reached is an error,
    /// and so is a loop that never ends.
    #[test]
    fn unknown_branches_fork_and_ambiguity_is_refused() {
        let ip = 0x1000;
        let mut a = CodeAssembler::new(64).unwrap();
        let mut other = a.create_label();
        a.test(esi, esi).unwrap(); // unknown
        a.jne(other).unwrap();
        a.mov(esi, 0x5000u32).unwrap();
        a.mov(rdi, rax).unwrap();
        a.mov(ecx, 10u32).unwrap();
        a.rep().movsd().unwrap();
        a.ret().unwrap();
        a.set_label(&mut other).unwrap();
        a.mov(eax, 0x5100u32).unwrap();
        a.mov(rsi, rax).unwrap();
        a.mov(ecx, 10u32).unwrap();
        a.rep().movsd().unwrap();
        a.ret().unwrap();
        let code = a.assemble(ip).unwrap();
        let err =
            table_in_code(&[Text { vaddr: ip, bytes: &code }], &one(0x4000..0x6000), ip, 0).unwrap_err();
        assert!(err.contains("several") && err.contains("0x5000") && err.contains("0x5100"), "{err}");

        let mut a = CodeAssembler::new(64).unwrap();
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.jmp(top).unwrap();
        let code = a.assemble(ip).unwrap();
        let err =
            table_in_code(&[Text { vaddr: ip, bytes: &code }], &one(0x4000..0x6000), ip, 0).unwrap_err();
        assert!(err.contains("instructions"), "{err}");
    }

    #[test]
    fn flags_of_cmp_and_test() {
        let cmp = |a, b| Flags { a, b, bits: 32, test: false };
        assert_eq!(cmp(1, 1).holds(ConditionCode::e), Some(true));
        assert_eq!(cmp(2, 1).holds(ConditionCode::a), Some(true));
        assert_eq!(cmp(0xffff_ffff, 1).holds(ConditionCode::l), Some(true), "-1 < 1 signed");
        assert_eq!(cmp(0xffff_ffff, 1).holds(ConditionCode::a), Some(true), "unsigned");
        let test = |a| Flags { a, b: a, bits: 32, test: true };
        assert_eq!(test(0).holds(ConditionCode::e), Some(true));
        assert_eq!(test(2).holds(ConditionCode::ne), Some(true));
        assert_eq!(test(2).holds(ConditionCode::p), None);
    }

    /// A process's memory as a few byte ranges.
    struct Fake(Vec<(u64, Vec<u8>)>);

    impl Memory for Fake {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            self.0.iter().any(|(a, b)| {
                let Some(off) = addr.checked_sub(*a) else { return false };
                let Some(src) = b.get(off as usize..off as usize + buf.len()) else { return false };
                buf.copy_from_slice(src);
                true
            })
        }
    }

    fn words(ws: &[u64]) -> Vec<u8> {
        ws.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn wrappers_by_shape() {
        let exec = |a: u64| (0x40_0000..0x80_0000).contains(&a);
        let data = |a: u64| (0x90_0000..0xa0_0000).contains(&a);
        let pymalloc = [0, 0x4f_b450, 0x50_6400, 0x51_0c00, 0x50_0fe0];
        // The debug hooks: `_PyMem_Debug` = {'r', raw}, {'m', mem}, {'o', obj}.
        let debug = 0x95_9fc0;
        let mut d = Vec::new();
        for id in [b'r', b'm', b'o'] {
            d.extend(words(&[u64::from(id)]));
            d.extend(words(&pymalloc));
        }
        let mem = Fake(vec![(debug, d)]);
        let hook = Table {
            ctx: debug + 96,
            malloc: 0x42_0000,
            calloc: 0x42_0100,
            realloc: 0x42_0200,
            free: 0x42_0300,
        };
        let none = WrapperFacts::default();
        let (w, inner) = classify_wrapper(Domain::Obj, &hook, &none, &[None; 4], &mem, &exec, &data);
        assert_eq!(w, Wrapper::DebugHooks);
        assert_eq!(inner.unwrap().malloc, 0x4f_b450);
        // The wrong domain's api_id is not the debug hooks.
        let (w, _) = classify_wrapper(Domain::Raw, &hook, &none, &[None; 4], &mem, &exec, &data);
        assert_eq!(w, Wrapper::Unknown);
        // Known place (3.12+): ctx must be exactly there.
        let placed = WrapperFacts { debug_raw: Some(debug + 8), ..none };
        let (w, _) = classify_wrapper(Domain::Obj, &hook, &placed, &[None; 4], &mem, &exec, &data);
        assert_eq!(w, Wrapper::Unknown);

        // tracemalloc: {mem, raw, obj} saved tables, tracing on.
        let saved = 0x9b_9860;
        let mem = Fake(vec![(saved, [pymalloc, pymalloc, pymalloc].iter().flat_map(|t| words(t)).collect())]);
        let hook = Table { ctx: saved + 80, ..hook };
        let on = WrapperFacts { tracemalloc_tracing: Some(true), ..none };
        let (w, inner) = classify_wrapper(Domain::Obj, &hook, &on, &[None; 4], &mem, &exec, &data);
        assert_eq!((w, inner.map(|t| t.malloc)), (Wrapper::Tracemalloc, Some(0x4f_b450)));
        // Tracing off and no names: someone else's wrapper.
        let (w, _) = classify_wrapper(Domain::Obj, &hook, &none, &[None; 4], &mem, &exec, &data);
        assert_eq!(w, Wrapper::Unknown);
        // Names win where the symbols are there.
        let names = [Some("tracemalloc_malloc_gil"), None, None, None];
        let (w, _) = classify_wrapper(Domain::Obj, &hook, &none, &names, &mem, &exec, &data);
        assert_eq!(w, Wrapper::Tracemalloc);
        // A ctx in the heap is nobody we know.
        let heap = Table { ctx: 0x5555_0000, ..hook };
        let (w, _) = classify_wrapper(Domain::Obj, &heap, &on, &[None; 4], &mem, &exec, &data);
        assert_eq!(w, Wrapper::Unknown);
    }

    #[test]
    fn tables_and_offsets() {
        let t = Table::parse(&words(&[0, 1, 2, 3, 4])).unwrap();
        assert_eq!(t.functions(), [1, 2, 3, 4]);
        assert_eq!(Table::parse(&[0u8; 39]), None);
        // gdb on pyenv 3.12.1 / 3.13.0: allocators at 88 / 696, then a mutex word.
        assert_eq!(RuntimeOffsets::for_version(3, 12).unwrap().standard, 88 + 8);
        assert_eq!(RuntimeOffsets::for_version(3, 13).unwrap().standard, 696 + 8);
        // standard = 3 x 40, then debug.
        for m in [12, 13] {
            let o = RuntimeOffsets::for_version(3, m).unwrap();
            assert_eq!(o.debug, o.standard + 3 * TABLE_SIZE);
        }
        assert_eq!(RuntimeOffsets::for_version(3, 11), None);
        assert_eq!(Domain::Obj.to_string(), "OBJ");
        assert_eq!(Wrapper::DebugHooks.to_string(), "debug hooks (PYTHONMALLOC=debug)");
    }
}
