//! The code placed in the target for in-process sampling, generated for the addresses it will
//! run at (iced-x86's assembler), and the layout of its data page.
//!
//! GOT slots of the allocation family point at these stubs. An **unsampled** call costs a few
//! instructions and tail-jumps to the real function: no trap. A **sampled** allocation calls
//! the real function, adds the pointer to a lock-free set, and passes a *report site*: a
//! 5-byte NOP carrying a uprobe, reached with `rsp` at the caller's return address, so the
//! eBPF capture walks the stack exactly as at malloc's entry. A free passes its report site
//! only if its pointer is in the set; a counting filter per page in front of the set
//! ([`off::FILTER`]) decides most frees with one load. In exact mode every call passes its site and no set is
//! kept. With the switch off, or if everything of ours is gone, every stub passes calls
//! straight through, so the target stays correct; a full set stops sampling and is counted.
//!
//! Report-site ABI (what the eBPF programs read):
//! - `alloc` site (`nop5; ret`): rdi = block (0: failed), rsi = size, rdx = kind
//!   ([`leakprobe_common::AllocKind`]); rax is the caller's return value, kept for the `ret`.
//! - `free` site (`nop5; jmp r8`): rdi = block; r8 = the real function, arguments untouched.
//! - `realloc_old` site (`nop5; jmp r9`): rdi = the old block, taken before the real realloc
//!   can hand its address to another thread; r9 = where the stub goes on.
//!
//! Stubs use only rax, rcx, r8-r11 as scratch where arguments live, and keep the red zone
//! unused at the sites (the kernel's optimized uprobe is a CALL that writes below rsp).
//!
//! **CPython's allocator tables** (`PyMemAllocatorEx`: `malloc(ctx, size)`, `calloc(ctx, n,
//! size)`, `realloc(ctx, ptr, size)`, `free(ctx, ptr)`) get stubs of their own ([`Func::PYMEM`]):
//! the caller's `ctx` goes on to the real function untouched, and the block is moved into rdi
//! for the report sites, with ctx kept in r9 across a free site. They report only blocks of at
//! most [`off::PY_SMALL_MAX`] bytes, the ones pymalloc serves from its arenas: a larger request
//! goes on to `PyMem_RawMalloc` and malloc, whose own hooks see it, and counting it here too
//! would count it twice (and sample it twice). A realloc reports its old block through the
//! free site before the real call (not the `realloc_old` pairing: the malloc-family stub
//! inside it may use that pairing for the same thread at the same time).

use iced_x86::{
    BlockEncoderOptions, IcedError,
    code_asm::{
        AsmRegister64, CodeAssembler, CodeLabel, dword_ptr, eax, ecx, edx, ptr, qword_ptr, r8, r9, r10, r10d,
        r11, rax, rcx, rdi, rdx, rsi, rsp,
    },
};
use leakprobe_common::AllocKind;
use thiserror::Error;

/// Thread slots for the byte countdowns, picked by a hash of the thread pointer (`fs:0`).
pub const COUNTDOWN_SLOTS: u64 = 256;
/// Bytes between two countdown slots: a cache line.
pub const COUNTDOWN_STRIDE: i32 = 64;
/// Exponential draws (mean = the sampling period), used in turn.
pub const EXP_ENTRIES: u64 = 1024;
/// Sampled pointers held at once (open addressing; half full is plenty of headroom).
pub const SET_BITS: u32 = 16;
pub const SET_CAPACITY: u64 = 1 << SET_BITS;
/// Slots probed before an insert gives up (counted) or a lookup says "not sampled".
pub const MAX_PROBE: u32 = 32;
/// A removed pointer: lookups go past it, inserts reuse it.
pub const TOMBSTONE: u64 = 1;

/// Byte offsets in the data page.
pub mod off {
    /// 1: stubs active; 0: every call passes straight through.
    pub const ENABLED: i32 = 0x00;
    /// 0: exact (every call reports); 1: sampled. For whoever reads the page: the code is
    /// generated for its mode ([`super::generate`]) and does not read this.
    pub const MODE: i32 = 0x08;
    /// Set when the pointer set could not take a sample: no more samples are taken.
    pub const SAMPLING_OFF: i32 = 0x10;
    /// Next exponential draw to use (atomic).
    pub const EXP_POS: i32 = 0x18;
    /// How many [`NESTED`] ranges are in use.
    pub const NESTED_COUNT: i32 = 0x20;
    /// CPython stubs: the largest request pymalloc serves itself (`SMALL_REQUEST_THRESHOLD`,
    /// 512 since 3.8); larger ones are left to the malloc family's hooks. For whoever reads
    /// the page: the code compares with [`super::PYMALLOC_SMALL_MAX`] itself.
    pub const PY_SMALL_MAX: i32 = 0x28;
    /// [`super::counter`] values.
    pub const COUNTERS: i32 = 0x40;
    /// The real function of each stub, in the order the stubs were generated.
    pub const REAL: i32 = 0xa00;
    /// i64 byte countdowns, one per thread slot, each on a cache line of its own: two
    /// threads' slots sharing a line cost ~150 ns a call in line transfers (measured with 2
    /// threads, 8-byte slots).
    pub const COUNTDOWN: i32 = 0x4000;
    /// (start, end) of the real allocation functions' code: a call from inside one of them
    /// (glibc's reallocarray calls realloc through the GOT) is part of the outer call, which
    /// reports it; the inner one passes straight through.
    pub const NESTED: i32 = 0xc00;
    pub const EXP: i32 = 0x1000;
    pub const SET: i32 = 0x8000;
    /// A counting filter in front of the set: a u32 per 4 KiB page (pages
    /// [`super::FILTER_PAGES`] apart share one), the number of held pointers in it. A free whose
    /// counter is 0 was not sampled, known from one load of a 16 KiB table whose lines follow
    /// the pages the program frees into, instead of a probe of the 512 KiB set at a hashed slot
    /// (which missed the cache: the stubs' largest cost under load).
    pub const FILTER: i32 = SET + (super::SET_CAPACITY * 8) as i32;
}

/// Ranges of allocator code whose calls into the family are nested calls.
pub const MAX_NESTED: usize = 64;
/// Stubs at most: one per function and real target (`malloc` and `mi_malloc` of one
/// program are two).
pub const MAX_STUBS: usize = 64;

/// The data page's size: a whole number of pages.
pub const DATA_SIZE: u64 = (off::FILTER as u64 + FILTER_PAGES * 4 + 4095) & !4095;

/// Counters in the filter: one per page, modulo this.
pub const FILTER_PAGES: u64 = 4096;

/// The stub's own counters, in the data page at [`off::COUNTERS`].
pub mod counter {
    /// Allocations sampled and added to the set.
    pub const SAMPLED_ALLOCS: i32 = 0;
    /// Frees of sampled pointers (found and removed).
    pub const SAMPLED_FREES: i32 = 1;
    /// Samples the set could not hold (sampling stops after the first).
    pub const SET_FULL: i32 = 2;
    pub const COUNT: usize = 3;
}

/// The functions a stub stands in for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Func {
    Malloc,
    Calloc,
    Realloc,
    Reallocarray,
    Free,
    PosixMemalign,
    AlignedAlloc,
    Memalign,
    Valloc,
    Pvalloc,
    /// A CPython `PyMemAllocatorEx` function (ctx first).
    PyMalloc,
    PyCalloc,
    PyRealloc,
    PyFree,
}

/// pymalloc's `SMALL_REQUEST_THRESHOLD` (CPython 3.8 and later).
pub const PYMALLOC_SMALL_MAX: u64 = 512;

impl Func {
    /// The four functions of a `PyMemAllocatorEx`, in its order.
    pub const PYMEM: [Func; 4] = [Func::PyMalloc, Func::PyCalloc, Func::PyRealloc, Func::PyFree];

    pub const ALL: [Func; 10] = [
        Func::Malloc,
        Func::Calloc,
        Func::Realloc,
        Func::Reallocarray,
        Func::Free,
        Func::PosixMemalign,
        Func::AlignedAlloc,
        Func::Memalign,
        Func::Valloc,
        Func::Pvalloc,
    ];

    /// The C name; `cfree` is glibc's old alias of free; an allocator's own name of the same
    /// function (`tc_malloc`, `mi_free`, `je_calloc`) is that function.
    pub fn from_name(name: &str) -> Option<Func> {
        let name = ["tc_", "mi_", "je_"].iter().find_map(|p| name.strip_prefix(p)).unwrap_or(name);
        Some(match name {
            "malloc" => Func::Malloc,
            "calloc" => Func::Calloc,
            "realloc" => Func::Realloc,
            "reallocarray" => Func::Reallocarray,
            "free" | "cfree" => Func::Free,
            "posix_memalign" => Func::PosixMemalign,
            "aligned_alloc" => Func::AlignedAlloc,
            "memalign" => Func::Memalign,
            "valloc" => Func::Valloc,
            "pvalloc" => Func::Pvalloc,
            _ => return None,
        })
    }

    fn kind(self) -> Option<AllocKind> {
        Some(match self {
            Func::Malloc => AllocKind::Malloc,
            Func::Calloc => AllocKind::Calloc,
            Func::Realloc => AllocKind::Realloc,
            Func::Reallocarray => AllocKind::Reallocarray,
            Func::PosixMemalign => AllocKind::PosixMemalign,
            Func::AlignedAlloc => AllocKind::AlignedAlloc,
            Func::Memalign => AllocKind::Memalign,
            Func::Valloc => AllocKind::Valloc,
            Func::Pvalloc => AllocKind::Pvalloc,
            // A realloc's old block went through the free site: the new one is a plain
            // allocation, not paired with an old one.
            Func::PyMalloc | Func::PyCalloc | Func::PyRealloc => AllocKind::PyMem,
            Func::Free | Func::PyFree => return None,
        })
    }
}

#[derive(Debug, Error)]
pub enum StubError {
    /// iced-x86 refused an instruction or could not lay out the code.
    #[error("assembling the in-process stub")]
    Assemble {
        #[source]
        source: IcedError,
    },
}

impl From<IcedError> for StubError {
    fn from(source: IcedError) -> Self {
        StubError::Assemble { source }
    }
}

/// Generated code and where its parts are.
#[derive(Clone, Debug)]
pub struct Stub {
    /// Machine code for `code_base`.
    pub code: Vec<u8>,
    /// Entry of each stub (absolute), in the order generated.
    pub entries: Vec<(Func, u64)>,
    /// The report sites (absolute addresses of the 5-byte NOPs).
    pub site_alloc: u64,
    pub site_free: u64,
    pub site_realloc_old: u64,
}

impl Stub {
    /// The first stub of `f`.
    pub fn entry(&self, f: Func) -> Option<u64> {
        self.entries.iter().find(|(g, _)| *g == f).map(|(_, a)| *a)
    }

    /// Stub number `i`.
    pub fn entry_at(&self, i: usize) -> Option<u64> {
        self.entries.get(i).map(|(_, a)| *a)
    }
}

/// The 5-byte NOP the optimized uprobe trampoline rewrites into a call.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// How a function's arguments give the size, which registers it needs back after the call,
/// and how its result is found.
struct Shape {
    /// Argument registers to keep across the real call.
    saved: &'static [AsmRegister64],
}

fn shape(f: Func) -> Shape {
    match f {
        Func::Malloc | Func::Valloc | Func::Pvalloc | Func::Free => Shape { saved: &[rdi] },
        Func::Calloc | Func::AlignedAlloc | Func::Memalign | Func::Realloc => Shape { saved: &[rdi, rsi] },
        Func::PosixMemalign | Func::Reallocarray => Shape { saved: &[rdi, rsi, rdx] },
        Func::PyMalloc | Func::PyFree => Shape { saved: &[rdi, rsi] },
        Func::PyCalloc | Func::PyRealloc => Shape { saved: &[rdi, rsi, rdx] },
    }
}

/// Puts the requested size in `dst` from the arguments (which stay untouched).
fn size_into(a: &mut CodeAssembler, f: Func, dst: AsmRegister64) -> Result<(), IcedError> {
    match f {
        Func::Malloc | Func::Valloc | Func::Pvalloc | Func::Free => a.mov(dst, rdi),
        Func::AlignedAlloc | Func::Memalign | Func::Realloc => a.mov(dst, rsi),
        Func::PosixMemalign => a.mov(dst, rdx),
        Func::Calloc => {
            a.mov(dst, rdi)?;
            a.imul_2(dst, rsi)
        }
        Func::Reallocarray | Func::PyCalloc => {
            a.mov(dst, rsi)?;
            a.imul_2(dst, rdx)
        }
        Func::PyMalloc | Func::PyFree => a.mov(dst, rsi),
        Func::PyRealloc => a.mov(dst, rdx),
    }
}

struct Gen {
    a: CodeAssembler,
    data: u64,
    /// Each stub's real function when a rel32 branch reaches it from anywhere in the code:
    /// passed through with a direct jump, the rest through the data page's `REAL` word.
    direct: Vec<Option<u64>>,
    site_alloc: CodeLabel,
    site_free: CodeLabel,
    site_realloc_old: CodeLabel,
    set_insert: CodeLabel,
    set_remove: CodeLabel,
    is_nested: CodeLabel,
    /// Sampled mode (else exact), fixed for the stub's life: decided here rather than by a
    /// load and a branch on every call.
    sampled: bool,
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

impl Gen {
    fn base(&mut self) -> Result<(), IcedError> {
        self.a.mov(r11, self.data)
    }

    /// The real function of stub number `i`, as a word in the data page.
    fn real(&self, i: usize) -> iced_x86::code_asm::AsmMemoryOperand {
        qword_ptr(r11 + (off::REAL + 8 * i as i32))
    }

    /// Goes on to stub `i`'s real function (a tail call): a direct jump when it is in reach.
    /// A far indirect jump on every call cost CPython's http.server ~7% of its throughput
    /// against a near direct one (bench/py_http.py, measured with every stub passing through).
    fn jmp_real(&mut self, i: usize) -> Result<(), IcedError> {
        match self.direct.get(i).copied().flatten() {
            Some(to) => self.a.jmp(to),
            None => {
                let real = self.real(i);
                self.a.jmp(real)
            }
        }
    }

    /// Calls stub `i`'s real function (r11 = base when it is not in reach).
    fn call_real(&mut self, i: usize) -> Result<(), IcedError> {
        match self.direct.get(i).copied().flatten() {
            Some(to) => self.a.call(to),
            None => {
                let real = self.real(i);
                self.a.call(real)
            }
        }
    }

    /// Sampled mode: counts the size down in this thread's slot; jumps to `take` when the
    /// allocation crosses zero (and refills) and sampling is still on, to `pass` otherwise.
    /// Uses rax, r10 (r11 = base).
    fn countdown(&mut self, f: Func, take: CodeLabel, pass: CodeLabel) -> Result<(), IcedError> {
        let a = &mut self.a;
        size_into(a, f, rax)?;
        // Thread slot: a multiplicative hash of the thread pointer.
        a.xor(r10d, r10d)?;
        a.mov(r10, qword_ptr(r10).fs())?;
        a.imul_3(r10, r10, 0x7f4a_7c15)?;
        a.shr(r10, 64 - COUNTDOWN_SLOTS.trailing_zeros())?;
        a.shl(r10, COUNTDOWN_STRIDE.trailing_zeros())?;
        a.sub(qword_ptr(r11 + r10 + off::COUNTDOWN), rax)?;
        a.jg(pass)?;
        // Sampled: the next countdown is the next exponential draw.
        a.mov(eax, 1)?;
        a.lock().xadd(qword_ptr(r11 + off::EXP_POS), rax)?;
        a.and(eax, (EXP_ENTRIES - 1) as u32)?;
        a.mov(rax, qword_ptr(r11 + rax * 8 + off::EXP))?;
        a.mov(qword_ptr(r11 + r10 + off::COUNTDOWN), rax)?;
        // A full set stopped sampling: checked only here, off the common path.
        a.cmp(qword_ptr(r11 + off::SAMPLING_OFF), 0)?;
        a.jne(pass)?;
        a.jmp(take)
    }

    /// Jumps to `pass` when the stub was called from inside the allocator's own functions
    /// (a nested call, reported by the outer one). Uses rax, rcx, r10; r11 = base.
    fn skip_nested(&mut self, pass: CodeLabel) -> Result<(), IcedError> {
        self.a.call(self.is_nested)?;
        self.a.test(r10, r10)?;
        self.a.jne(pass)
    }

    /// is_nested: r10 = 1 when the stub's return address ([rsp + 8] here) is inside one of
    /// the NESTED ranges. Keeps the argument registers.
    fn is_nested_body(&mut self) -> Result<(), IcedError> {
        let mut lp = self.a.create_label();
        let mut next = self.a.create_label();
        let mut no = self.a.create_label();
        let mut yes = self.a.create_label();
        let mut label = self.is_nested;
        self.a.set_label(&mut label)?;
        self.is_nested = label;
        self.a.mov(rax, qword_ptr(rsp + 8))?;
        self.a.mov(rcx, qword_ptr(r11 + off::NESTED_COUNT))?;
        self.a.test(rcx, rcx)?;
        self.a.je(no)?;
        self.a.lea(r10, qword_ptr(r11 + off::NESTED))?;
        self.a.set_label(&mut lp)?;
        self.a.cmp(rax, qword_ptr(r10))?;
        self.a.jb(next)?;
        self.a.cmp(rax, qword_ptr(r10 + 8))?;
        self.a.jb(yes)?;
        self.a.set_label(&mut next)?;
        self.a.add(r10, 16)?;
        self.a.dec(rcx)?;
        self.a.jne(lp)?;
        self.a.set_label(&mut no)?;
        self.a.xor(r10d, r10d)?;
        self.a.ret()?;
        self.a.set_label(&mut yes)?;
        self.a.mov(r10d, 1)?;
        self.a.ret()
    }

    /// Every stub's start: r11 = data base; switched off, jump to `pass`; exact mode, jump to
    /// `exact`; sampled mode falls through.
    fn prologue(
        &mut self,
        entry: &mut CodeLabel,
        pass: CodeLabel,
        exact: CodeLabel,
    ) -> Result<(), IcedError> {
        self.a.set_label(entry)?;
        self.base()?;
        self.a.cmp(qword_ptr(r11 + off::ENABLED), 0)?;
        self.a.je(pass)?;
        self.exact_jump(exact)
    }

    /// Exact mode: jumps to `exact`; sampled mode: nothing (falls through).
    fn exact_jump(&mut self, exact: CodeLabel) -> Result<(), IcedError> {
        if self.sampled { Ok(()) } else { self.a.jmp(exact) }
    }

    /// The stub of an allocation function other than realloc.
    fn alloc(&mut self, f: Func, i: usize) -> Result<CodeLabel, IcedError> {
        let mut entry = self.a.create_label();
        let mut pass = self.a.create_label();
        let mut take = self.a.create_label();
        let mut ret = self.a.create_label();
        let mut report = self.a.create_label();
        let kind = f.kind().map_or(0, |k| k as u32);
        self.prologue(&mut entry, pass, take)?;
        self.countdown(f, take, pass)?;
        self.a.set_label(&mut pass)?;
        self.jmp_real(i)?;

        self.a.set_label(&mut take)?;
        self.skip_nested(pass)?;
        let saved = shape(f).saved;
        for r in saved {
            self.a.push(*r)?;
        }
        // Entry rsp is 8 mod 16; the real call needs 0 mod 16.
        let pad = saved.len().is_multiple_of(2);
        if pad {
            self.a.sub(rsp, 8)?;
        }
        self.call_real(i)?;
        if pad {
            self.a.add(rsp, 8)?;
        }
        for r in saved.iter().rev() {
            self.a.pop(*r)?;
        }
        // rsp is at the caller's return address again; arguments are back.
        if f == Func::PosixMemalign {
            self.a.test(eax, eax)?;
            self.a.jne(ret)?;
            size_into(&mut self.a, f, rsi)?;
            self.a.mov(rdi, qword_ptr(rdi))?;
        } else {
            self.a.test(rax, rax)?;
            self.a.je(ret)?;
            size_into(&mut self.a, f, r10)?;
            self.a.mov(rsi, r10)?;
            self.a.mov(rdi, rax)?;
        }
        self.base()?;
        if self.sampled {
            self.a.call(self.set_insert)?;
            self.a.test(r10, r10)?;
            self.a.je(ret)?;
        }
        self.a.set_label(&mut report)?;
        self.a.mov(edx, kind)?;
        self.a.jmp(self.site_alloc)?;
        self.a.set_label(&mut ret)?;
        self.a.ret()?;
        Ok(entry)
    }

    fn free(&mut self, i: usize) -> Result<CodeLabel, IcedError> {
        let mut entry = self.a.create_label();
        let mut pass = self.a.create_label();
        let mut report = self.a.create_label();
        let mut exact = self.a.create_label();
        self.prologue(&mut entry, pass, exact)?;
        self.a.test(rdi, rdi)?;
        self.a.je(pass)?;
        self.filter_skip(rdi, pass)?;
        self.a.call(self.set_remove)?;
        self.a.test(r10, r10)?;
        self.a.je(pass)?;
        self.a.jmp(report)?;
        self.a.set_label(&mut exact)?;
        self.a.test(rdi, rdi)?;
        self.a.je(pass)?;
        self.a.set_label(&mut report)?;
        self.skip_nested(pass)?;
        let real = self.real(i);
        self.a.mov(r8, real)?;
        self.a.jmp(self.site_free)?;
        self.a.set_label(&mut pass)?;
        self.jmp_real(i)?;
        Ok(entry)
    }

    fn realloc(&mut self, f: Func, i: usize) -> Result<CodeLabel, IcedError> {
        let mut entry = self.a.create_label();
        let mut pass = self.a.create_label();
        let mut decide = self.a.create_label();
        let mut old_tracked = self.a.create_label();
        let mut call = self.a.create_label();
        let mut post = self.a.create_label();
        let kind = f.kind().map_or(0, |k| k as u32);
        self.prologue(&mut entry, pass, old_tracked)?;
        // Sampled: a sampled old block is followed whatever the new size.
        self.a.test(rdi, rdi)?;
        self.a.je(decide)?;
        self.filter_skip(rdi, decide)?;
        self.a.call(self.set_remove)?;
        self.a.test(r10, r10)?;
        self.a.jne(old_tracked)?;
        self.a.set_label(&mut decide)?;
        let mut sampled_new = self.a.create_label();
        self.countdown(f, sampled_new, pass)?;
        self.a.set_label(&mut sampled_new)?;
        self.skip_nested(pass)?;
        self.a.jmp(call)?;
        self.a.set_label(&mut pass)?;
        self.jmp_real(i)?;

        self.a.set_label(&mut old_tracked)?;
        self.skip_nested(pass)?;
        self.a.test(rdi, rdi)?;
        self.a.je(call)?;
        self.a.lea(r9, ptr(call))?;
        self.a.jmp(self.site_realloc_old)?;
        self.a.set_label(&mut call)?;
        for r in [rdi, rsi, rdx] {
            self.a.push(r)?;
        }
        self.base()?;
        self.call_real(i)?;
        for r in [rdx, rsi, rdi] {
            self.a.pop(r)?;
        }
        size_into(&mut self.a, f, r10)?;
        self.a.mov(rsi, r10)?;
        self.a.mov(rdi, rax)?;
        self.base()?;
        if self.sampled {
            self.a.test(rdi, rdi)?;
            self.a.je(post)?;
            self.a.call(self.set_insert)?;
            self.a.test(r10, r10)?;
            self.a.jne(post)?;
            // Not held: the old block is still retired, the new one not reported.
            self.a.xor(edx, edx)?;
            self.a.mov(rdi, rdx)?;
            self.a.mov(rsi, rdx)?;
        }
        self.a.set_label(&mut post)?;
        self.a.mov(edx, kind)?;
        self.a.jmp(self.site_alloc)?;
        Ok(entry)
    }

    /// CPython stubs: jumps to `pass` unless the request is one pymalloc serves itself
    /// (1 to PY_SMALL_MAX bytes; 0 goes on to malloc(1)). Uses rax; r11 = base.
    fn py_small_only(&mut self, f: Func, pass: CodeLabel) -> Result<(), IcedError> {
        size_into(&mut self.a, f, rax)?;
        self.a.dec(rax)?;
        self.a.cmp(rax, PYMALLOC_SMALL_MAX as i32)?;
        self.a.jae(pass)
    }

    /// After a CPython stub's real call (rax = the block, arguments back; every path here
    /// passed [`Gen::py_small_only`]): reports the block at the alloc site (sampled mode: only
    /// if the set takes it).
    fn py_report_new(&mut self, f: Func) -> Result<(), IcedError> {
        let mut ret = self.a.create_label();
        let mut report = self.a.create_label();
        self.a.test(rax, rax)?;
        self.a.je(ret)?;
        self.base()?;
        size_into(&mut self.a, f, r10)?;
        self.a.mov(rsi, r10)?;
        self.a.mov(rdi, rax)?;
        if self.sampled {
            self.a.call(self.set_insert)?;
            self.a.test(r10, r10)?;
            self.a.je(ret)?;
        }
        self.a.set_label(&mut report)?;
        self.a.mov(edx, f.kind().map_or(0, |k| k as u32))?;
        self.a.jmp(self.site_alloc)?;
        self.a.set_label(&mut ret)?;
        self.a.ret()
    }

    /// Calls the real function of stub `i` with the arguments kept, rsp at the caller's
    /// return address again afterwards.
    fn call_real_keeping(&mut self, f: Func, i: usize) -> Result<(), IcedError> {
        let saved = shape(f).saved;
        for r in saved {
            self.a.push(*r)?;
        }
        // Entry rsp is 8 mod 16; the real call needs 0 mod 16.
        let pad = saved.len().is_multiple_of(2);
        if pad {
            self.a.sub(rsp, 8)?;
        }
        self.base()?;
        self.call_real(i)?;
        if pad {
            self.a.add(rsp, 8)?;
        }
        for r in saved.iter().rev() {
            self.a.pop(*r)?;
        }
        Ok(())
    }

    /// `PyMemAllocatorEx.malloc(ctx, size)` and `.calloc(ctx, n, size)`.
    fn py_alloc(&mut self, f: Func, i: usize) -> Result<CodeLabel, IcedError> {
        let mut entry = self.a.create_label();
        let mut pass = self.a.create_label();
        let mut take = self.a.create_label();
        self.a.set_label(&mut entry)?;
        self.base()?;
        self.a.cmp(qword_ptr(r11 + off::ENABLED), 0)?;
        self.a.je(pass)?;
        self.py_small_only(f, pass)?;
        self.exact_jump(take)?;
        self.countdown(f, take, pass)?;
        self.a.set_label(&mut pass)?;
        self.jmp_real(i)?;
        self.a.set_label(&mut take)?;
        self.call_real_keeping(f, i)?;
        self.py_report_new(f)?;
        Ok(entry)
    }

    /// Reports the block in rsi at the free site, then goes on at `back` with rdi = ctx again.
    /// Uses r8, r9.
    fn py_free_site(&mut self, back: &mut CodeLabel) -> Result<(), IcedError> {
        self.a.mov(r9, rdi)?;
        self.a.mov(rdi, rsi)?;
        self.a.lea(r8, ptr(*back))?;
        self.a.jmp(self.site_free)?;
        self.a.set_label(back)?;
        self.a.mov(rdi, r9)?;
        self.base()
    }

    /// `PyMemAllocatorEx.free(ctx, ptr)`.
    fn py_free(&mut self, i: usize) -> Result<CodeLabel, IcedError> {
        let mut entry = self.a.create_label();
        let mut pass = self.a.create_label();
        let mut report = self.a.create_label();
        let mut back = self.a.create_label();
        self.a.set_label(&mut entry)?;
        self.base()?;
        self.a.cmp(qword_ptr(r11 + off::ENABLED), 0)?;
        self.a.je(pass)?;
        self.a.test(rsi, rsi)?;
        self.a.je(pass)?;
        self.exact_jump(report)?;
        self.filter_skip(rsi, pass)?;
        self.py_set_remove_rsi()?;
        self.a.test(r10, r10)?;
        self.a.je(pass)?;
        self.a.set_label(&mut report)?;
        self.py_free_site(&mut back)?;
        self.a.set_label(&mut pass)?;
        self.jmp_real(i)?;
        Ok(entry)
    }

    /// set_remove on rsi (the CPython functions' block), rdi kept. Uses r9 too.
    fn py_set_remove_rsi(&mut self) -> Result<(), IcedError> {
        self.a.mov(r9, rdi)?;
        self.a.mov(rdi, rsi)?;
        self.a.call(self.set_remove)?;
        self.a.mov(rdi, r9)
    }

    /// `PyMemAllocatorEx.realloc(ctx, ptr, size)`.
    fn py_realloc(&mut self, i: usize) -> Result<CodeLabel, IcedError> {
        let f = Func::PyRealloc;
        let mut entry = self.a.create_label();
        let mut pass = self.a.create_label();
        let mut exact = self.a.create_label();
        let mut decide = self.a.create_label();
        let mut old_tracked = self.a.create_label();
        let mut back = self.a.create_label();
        let mut call = self.a.create_label();
        self.a.set_label(&mut entry)?;
        self.base()?;
        self.a.cmp(qword_ptr(r11 + off::ENABLED), 0)?;
        self.a.je(pass)?;
        self.exact_jump(exact)?;
        // Sampled: a sampled old block is followed whatever the new size.
        self.a.test(rsi, rsi)?;
        self.a.je(decide)?;
        self.filter_skip(rsi, decide)?;
        self.py_set_remove_rsi()?;
        self.a.test(r10, r10)?;
        self.a.jne(old_tracked)?;
        self.a.set_label(&mut decide)?;
        self.py_small_only(f, pass)?;
        self.countdown(f, call, pass)?;
        self.a.set_label(&mut pass)?;
        self.jmp_real(i)?;

        self.a.set_label(&mut exact)?;
        self.a.test(rsi, rsi)?;
        self.a.jne(old_tracked)?;
        self.py_small_only(f, pass)?;
        self.a.jmp(call)?;

        self.a.set_label(&mut old_tracked)?;
        self.py_free_site(&mut back)?;
        // A new block pymalloc will not serve is malloc's hooks' to see: go on as a tail
        // call, so that their stack starts at our caller's.
        self.py_small_only(f, pass)?;
        self.a.set_label(&mut call)?;
        self.call_real_keeping(f, i)?;
        self.py_report_new(f)?;
        Ok(entry)
    }

    /// set_insert: rdi = pointer; r10 = 1 if held, 0 if the set is full (then sampling stops).
    /// Keeps rax, rdi, rsi, rdx; uses rcx, r10, r11.
    fn set_insert_body(&mut self) -> Result<(), IcedError> {
        let mut lp = self.a.create_label();
        let mut next = self.a.create_label();
        let mut ok = self.a.create_label();
        let mut label = self.set_insert;
        self.a.set_label(&mut label)?;
        self.set_insert = label;
        self.a.push(rax)?;
        self.hash_into_r10()?;
        self.a.mov(ecx, MAX_PROBE)?;
        self.a.set_label(&mut lp)?;
        self.a.mov(rax, qword_ptr(r11 + r10 * 8 + off::SET))?;
        self.a.cmp(rax, TOMBSTONE as i32)?;
        self.a.ja(next)?;
        self.a.lock().cmpxchg(qword_ptr(r11 + r10 * 8 + off::SET), rdi)?;
        self.a.je(ok)?;
        self.a.set_label(&mut next)?;
        self.a.inc(r10)?;
        self.a.and(r10, (SET_CAPACITY - 1) as i32)?;
        self.a.dec(ecx)?;
        self.a.jne(lp)?;
        self.a.lock().inc(qword_ptr(r11 + (off::COUNTERS + 8 * counter::SET_FULL)))?;
        self.a.mov(qword_ptr(r11 + off::SAMPLING_OFF), 1)?;
        self.a.xor(r10d, r10d)?;
        self.a.pop(rax)?;
        self.a.ret()?;
        self.a.set_label(&mut ok)?;
        self.a.lock().inc(qword_ptr(r11 + (off::COUNTERS + 8 * counter::SAMPLED_ALLOCS)))?;
        self.filter_index_into_rax(rdi)?;
        self.a.lock().inc(dword_ptr(r11 + rax * 4 + off::FILTER))?;
        self.a.mov(r10d, 1)?;
        self.a.pop(rax)?;
        self.a.ret()
    }

    /// Jumps to `skip` when the filter says no held pointer lies in `reg`'s page: the common
    /// free, decided without a call into set_remove (which every caller reaches only past
    /// this). Uses rax; r11 = base.
    fn filter_skip(&mut self, reg: AsmRegister64, skip: CodeLabel) -> Result<(), IcedError> {
        self.filter_index_into_rax(reg)?;
        self.a.cmp(dword_ptr(r11 + rax * 4 + off::FILTER), 0)?;
        self.a.je(skip)
    }

    /// rax = the filter counter of `reg`'s page.
    fn filter_index_into_rax(&mut self, reg: AsmRegister64) -> Result<(), IcedError> {
        self.a.mov(rax, reg)?;
        self.a.shr(rax, 12)?;
        self.a.and(eax, (FILTER_PAGES - 1) as u32)
    }

    /// set_remove: rdi = pointer, whose page the filter flags ([`Gen::filter_skip`] first);
    /// r10 = 1 if it was held (now removed), else 0. Keeps rax, rdi, rsi, rdx; uses rcx, r8,
    /// r10, r11.
    fn set_remove_body(&mut self) -> Result<(), IcedError> {
        let mut lp = self.a.create_label();
        let mut next = self.a.create_label();
        let mut absent = self.a.create_label();
        let mut found = self.a.create_label();
        let mut label = self.set_remove;
        self.a.set_label(&mut label)?;
        self.set_remove = label;
        self.a.push(rax)?;
        self.hash_into_r10()?;
        self.a.mov(ecx, MAX_PROBE)?;
        self.a.mov(r8, TOMBSTONE)?;
        self.a.set_label(&mut lp)?;
        self.a.mov(rax, qword_ptr(r11 + r10 * 8 + off::SET))?;
        self.a.test(rax, rax)?;
        self.a.je(absent)?;
        self.a.cmp(rax, rdi)?;
        self.a.jne(next)?;
        self.a.lock().cmpxchg(qword_ptr(r11 + r10 * 8 + off::SET), r8)?;
        self.a.je(found)?;
        self.a.set_label(&mut next)?;
        self.a.inc(r10)?;
        self.a.and(r10, (SET_CAPACITY - 1) as i32)?;
        self.a.dec(ecx)?;
        self.a.jne(lp)?;
        self.a.set_label(&mut absent)?;
        self.a.xor(r10d, r10d)?;
        self.a.pop(rax)?;
        self.a.ret()?;
        self.a.set_label(&mut found)?;
        self.a.lock().inc(qword_ptr(r11 + (off::COUNTERS + 8 * counter::SAMPLED_FREES)))?;
        self.filter_index_into_rax(rdi)?;
        self.a.lock().dec(dword_ptr(r11 + rax * 4 + off::FILTER))?;
        self.a.mov(r10d, 1)?;
        self.a.pop(rax)?;
        self.a.ret()
    }

    /// r11 = data base, r10 = the set slot of rdi.
    fn hash_into_r10(&mut self) -> Result<(), IcedError> {
        self.base()?;
        self.a.mov(r10, GOLDEN)?;
        self.a.imul_2(r10, rdi)?;
        self.a.shr(r10, 64 - SET_BITS)
    }

    fn sites(&mut self) -> Result<(), IcedError> {
        let mut l = self.site_alloc;
        self.a.set_label(&mut l)?;
        self.site_alloc = l;
        self.a.db(&NOP5)?;
        self.a.ret()?;
        let mut l = self.site_free;
        self.a.set_label(&mut l)?;
        self.site_free = l;
        self.a.db(&NOP5)?;
        self.a.jmp(r8)?;
        let mut l = self.site_realloc_old;
        self.a.set_label(&mut l)?;
        self.site_realloc_old = l;
        self.a.db(&NOP5)?;
        self.a.jmp(r9)
    }
}

/// Bytes of code a stub may take, with room to spare: [`in_reach`] allows for a branch anywhere
/// in them.
pub const CODE_SPAN: u64 = 1 << 16;

/// Whether a rel32 branch from anywhere in `CODE_SPAN` bytes at `code_base` reaches `target`.
pub fn in_reach(code_base: u64, target: u64) -> bool {
    let d = target as i128 - code_base as i128;
    let limit = (1i128 << 31) - CODE_SPAN as i128;
    -limit < d && d < limit
}

/// Generates one stub per entry of `real` (function, where it forwards: stub `i` forwards to
/// the i-th, as [`data_page`] lays them out), to run at `code_base` with the data page at
/// `data_base`, sampling (as `data_page` is given a `sample_bytes` > 0) or exact. A real
/// function within a rel32 branch is reached directly.
pub fn generate(
    code_base: u64,
    data_base: u64,
    real: &[(Func, u64)],
    sampled: bool,
) -> Result<Stub, StubError> {
    let mut a = CodeAssembler::new(64)?;
    let (site_alloc, site_free, site_realloc_old, set_insert, set_remove, is_nested) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    let direct = real.iter().map(|&(_, to)| in_reach(code_base, to).then_some(to)).collect();
    let mut g = Gen {
        a,
        data: data_base,
        direct,
        site_alloc,
        site_free,
        site_realloc_old,
        set_insert,
        set_remove,
        is_nested,
        sampled,
    };
    // The sites first, each on its own: a uprobe's instruction must not straddle anything.
    g.sites()?;
    g.set_insert_body()?;
    g.set_remove_body()?;
    g.is_nested_body()?;
    let mut labels = Vec::new();
    for (i, &(f, _)) in real.iter().enumerate().take(MAX_STUBS) {
        let l = match f {
            Func::PyMalloc | Func::PyCalloc => g.py_alloc(f, i)?,
            Func::PyRealloc => g.py_realloc(i)?,
            Func::PyFree => g.py_free(i)?,
            Func::Free => g.free(i)?,
            Func::Realloc | Func::Reallocarray => g.realloc(f, i)?,
            _ => g.alloc(f, i)?,
        };
        labels.push((f, l));
    }
    let result = g.a.assemble_options(code_base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let entries =
        labels.iter().map(|(f, l)| Ok((*f, result.label_ip(l)?))).collect::<Result<Vec<_>, IcedError>>()?;
    Ok(Stub {
        site_alloc: result.label_ip(&g.site_alloc)?,
        site_free: result.label_ip(&g.site_free)?,
        site_realloc_old: result.label_ip(&g.site_realloc_old)?,
        code: result.inner.code_buffer,
        entries,
    })
}

/// The initial data page: switch on, the mode, the real functions, full countdowns and the
/// exponential draws (shuffled, so taking them in turn is as good as at random).
pub fn data_page(sample_bytes: u64, real: &[(Func, u64)], nested: &[(u64, u64)], seed: u64) -> Vec<u8> {
    let mut page = vec![0u8; DATA_SIZE as usize];
    let put = |page: &mut Vec<u8>, at: i32, v: u64| {
        let at = at as usize;
        page[at..at + 8].copy_from_slice(&v.to_le_bytes());
    };
    put(&mut page, off::ENABLED, 1);
    put(&mut page, off::MODE, u64::from(sample_bytes > 0));
    put(&mut page, off::PY_SMALL_MAX, PYMALLOC_SMALL_MAX);
    for (i, (_, addr)) in real.iter().enumerate().take(MAX_STUBS) {
        put(&mut page, off::REAL + 8 * i as i32, *addr);
    }
    let nested = &nested[..nested.len().min(MAX_NESTED)];
    put(&mut page, off::NESTED_COUNT, nested.len() as u64);
    for (i, (lo, hi)) in nested.iter().enumerate() {
        put(&mut page, off::NESTED + 16 * i as i32, *lo);
        put(&mut page, off::NESTED + 16 * i as i32 + 8, *hi);
    }
    if sample_bytes > 0 {
        let mut draws = crate::model::sampling::exponential_quantiles(sample_bytes, EXP_ENTRIES as u32);
        // Fisher-Yates with xorshift64*: reproducible from the seed, no dependency.
        let mut s = seed | 1;
        for i in (1..draws.len()).rev() {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let j = (s.wrapping_mul(0x2545_f491_4f6c_dd1d) % (i as u64 + 1)) as usize;
            draws.swap(i, j);
        }
        for (i, d) in draws.iter().enumerate() {
            put(&mut page, off::EXP + 8 * i as i32, *d);
        }
        for i in 0..COUNTDOWN_SLOTS as usize {
            put(&mut page, off::COUNTDOWN + COUNTDOWN_STRIDE * i as i32, draws[i % draws.len()]);
        }
    }
    page
}

/// Reads the stub's counters out of a copy of its data page.
pub fn counters(page: &[u8]) -> [u64; counter::COUNT] {
    let mut out = [0u64; counter::COUNT];
    for (i, v) in out.iter_mut().enumerate() {
        let at = off::COUNTERS as usize + 8 * i;
        if let Some(b) = page.get(at..at + 8) {
            *v = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        }
    }
    out
}

// The data page's areas must not overlap.
const _: () = {
    assert!((off::COUNTERS as usize + 8 * counter::COUNT) <= off::REAL as usize);
    assert!(off::REAL as usize + 8 * MAX_STUBS <= off::NESTED as usize);
    assert!(off::NESTED as usize + 16 * MAX_NESTED <= off::EXP as usize);
    assert!(off::EXP as u64 + 8 * EXP_ENTRIES <= off::COUNTDOWN as u64);
    assert!(off::COUNTDOWN as u64 + COUNTDOWN_STRIDE as u64 * COUNTDOWN_SLOTS <= off::SET as u64);
};

#[cfg(test)]
mod tests {
    //! The stubs run here, in the test process: mapped executable, pointing at this process's
    //! own libc, with each report site's NOP turned into a call to a recorder (what the
    //! kernel's optimized uprobe does with it, too).

    use std::{
        ffi::c_void,
        sync::{Mutex, MutexGuard},
    };

    use super::*;

    /// (site, rdi, rsi, rdx) per report-site hit.
    static EVENTS: Mutex<Vec<(u64, u64, u64, u64)>> = Mutex::new(Vec::new());
    /// Stub tests share EVENTS: one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[unsafe(no_mangle)]
    extern "C" fn leakprobe_test_record(a0: u64, a1: u64, a2: u64, ret: u64) {
        EVENTS.lock().unwrap_or_else(|e| e.into_inner()).push((ret - 5, a0, a1, a2));
    }

    // Keeps every register the stub relies on; passes the site's return address as the 4th
    // argument. Entered with rsp at 0 mod 16 (the site's rsp is at 8, like a function entry).
    core::arch::global_asm!(
        ".globl leakprobe_test_site_hook",
        "leakprobe_test_site_hook:",
        "push rax", "push rcx", "push rdx", "push rsi", "push rdi",
        "push r8", "push r9", "push r10", "push r11",
        "sub rsp, 8",
        "mov rcx, [rsp + 80]",
        "call {rec}",
        "add rsp, 8",
        "pop r11", "pop r10", "pop r9", "pop r8",
        "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rax",
        "ret",
        rec = sym leakprobe_test_record,
    );
    unsafe extern "C" {
        fn leakprobe_test_site_hook();
    }

    struct Live {
        stub: Stub,
        data: *mut u8,
        _guard: MutexGuard<'static, ()>,
    }

    fn map(len: usize, prot: i32) -> *mut u8 {
        // SAFETY: a fresh private anonymous mapping; failure is checked.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(p, libc::MAP_FAILED);
        p.cast()
    }

    fn real_functions() -> Vec<(Func, u64)> {
        unsafe extern "C" {
            fn valloc(size: usize) -> *mut c_void;
            fn pvalloc(size: usize) -> *mut c_void;
            fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void;
        }
        vec![
            (Func::Malloc, libc::malloc as *const () as u64),
            (Func::Calloc, libc::calloc as *const () as u64),
            (Func::Realloc, libc::realloc as *const () as u64),
            (Func::Reallocarray, reallocarray as *const () as u64),
            (Func::Free, libc::free as *const () as u64),
            (Func::PosixMemalign, libc::posix_memalign as *const () as u64),
            (Func::AlignedAlloc, libc::aligned_alloc as *const () as u64),
            (Func::Memalign, libc::memalign as *const () as u64),
            (Func::Valloc, valloc as *const () as u64),
            (Func::Pvalloc, pvalloc as *const () as u64),
        ]
    }

    /// A `PyMemAllocatorEx` over libc, for the CPython stubs: each function checks that the
    /// caller's ctx arrived untouched.
    const PY_CTX: usize = 0x5eed_c0de;
    static PY_BAD_CTX: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn check_ctx(ctx: usize) {
        if ctx != PY_CTX {
            PY_BAD_CTX.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    extern "C" fn py_malloc(ctx: usize, n: usize) -> *mut c_void {
        check_ctx(ctx);
        // SAFETY: libc's malloc.
        unsafe { libc::malloc(n.max(1)) }
    }
    extern "C" fn py_calloc(ctx: usize, n: usize, size: usize) -> *mut c_void {
        check_ctx(ctx);
        // SAFETY: libc's calloc.
        unsafe { libc::calloc(n.max(1), size.max(1)) }
    }
    extern "C" fn py_realloc(ctx: usize, p: *mut c_void, n: usize) -> *mut c_void {
        check_ctx(ctx);
        // SAFETY: a block of ours or NULL.
        unsafe { libc::realloc(p, n.max(1)) }
    }
    extern "C" fn py_free(ctx: usize, p: *mut c_void) {
        check_ctx(ctx);
        // SAFETY: a block of ours or NULL.
        unsafe { libc::free(p) }
    }

    fn install(sample_bytes: u64) -> Live {
        install_funcs(sample_bytes, &real_functions())
    }

    fn install_py(sample_bytes: u64) -> Live {
        PY_BAD_CTX.store(0, std::sync::atomic::Ordering::Relaxed);
        install_funcs(
            sample_bytes,
            &[
                (Func::PyMalloc, py_malloc as *const () as u64),
                (Func::PyCalloc, py_calloc as *const () as u64),
                (Func::PyRealloc, py_realloc as *const () as u64),
                (Func::PyFree, py_free as *const () as u64),
            ],
        )
    }

    fn install_funcs(sample_bytes: u64, real: &[(Func, u64)]) -> Live {
        let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        EVENTS.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let code = map(1 << 16, libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC);
        let data = map(DATA_SIZE as usize, libc::PROT_READ | libc::PROT_WRITE);
        let stub = generate(code as u64, data as u64, real, sample_bytes > 0).unwrap();
        assert!(stub.code.len() < 1 << 16);
        let page = data_page(sample_bytes, real, &[], 42);
        // SAFETY: both mappings are ours and large enough.
        unsafe {
            std::ptr::copy_nonoverlapping(stub.code.as_ptr(), code, stub.code.len());
            std::ptr::copy_nonoverlapping(page.as_ptr(), data, page.len());
        }
        // The hook may be further than a rel32 away: reach it through `jmp [rip]` placed at
        // the end of the code mapping.
        let tramp = code as u64 + (1 << 16) - 16;
        let mut jmp = vec![0xff, 0x25, 0, 0, 0, 0];
        jmp.extend_from_slice(&(leakprobe_test_site_hook as *const () as u64).to_le_bytes());
        // SAFETY: the last 16 bytes of our mapping, past the generated code.
        unsafe { std::ptr::copy_nonoverlapping(jmp.as_ptr(), tramp as *mut u8, jmp.len()) };
        for site in [stub.site_alloc, stub.site_free, stub.site_realloc_old] {
            let at = site - code as u64;
            assert_eq!(stub.code[at as usize..at as usize + 5], NOP5);
            let rel = (tramp as i64 - (site as i64 + 5)) as i32;
            let mut call = [0xe8, 0, 0, 0, 0];
            call[1..].copy_from_slice(&rel.to_le_bytes());
            // SAFETY: the site is inside our mapping.
            unsafe { std::ptr::copy_nonoverlapping(call.as_ptr(), site as *mut u8, 5) };
        }
        Live { stub, data, _guard: guard }
    }

    impl Live {
        fn f<T>(&self, func: Func) -> T {
            let at = self.stub.entry(func).unwrap() as usize;
            // SAFETY: T is the C signature of `func`; the entry is generated code for it.
            unsafe { std::mem::transmute_copy(&at) }
        }
        fn py_malloc(&self, n: usize) -> *mut c_void {
            self.f::<extern "C" fn(usize, usize) -> *mut c_void>(Func::PyMalloc)(PY_CTX, n)
        }
        fn py_calloc(&self, n: usize, size: usize) -> *mut c_void {
            self.f::<extern "C" fn(usize, usize, usize) -> *mut c_void>(Func::PyCalloc)(PY_CTX, n, size)
        }
        fn py_realloc(&self, p: *mut c_void, n: usize) -> *mut c_void {
            self.f::<extern "C" fn(usize, *mut c_void, usize) -> *mut c_void>(Func::PyRealloc)(PY_CTX, p, n)
        }
        fn py_free(&self, p: *mut c_void) {
            self.f::<extern "C" fn(usize, *mut c_void)>(Func::PyFree)(PY_CTX, p)
        }
        fn malloc(&self, n: usize) -> *mut c_void {
            self.f::<extern "C" fn(usize) -> *mut c_void>(Func::Malloc)(n)
        }
        fn free(&self, p: *mut c_void) {
            self.f::<extern "C" fn(*mut c_void)>(Func::Free)(p)
        }
        fn word(&self, at: i32) -> u64 {
            // SAFETY: inside the data mapping.
            unsafe { (self.data.add(at as usize) as *const u64).read_volatile() }
        }
        fn set_word(&self, at: i32, v: u64) {
            // SAFETY: inside the data mapping.
            unsafe { (self.data.add(at as usize) as *mut u64).write_volatile(v) }
        }
        fn counters(&self) -> [u64; counter::COUNT] {
            // SAFETY: the whole data mapping.
            counters(unsafe { std::slice::from_raw_parts(self.data, DATA_SIZE as usize) })
        }
        /// Pointers in the set; the filter's counters must add up to the same.
        fn held(&self) -> usize {
            let held = (0..SET_CAPACITY as i32).filter(|i| self.word(off::SET + 8 * i) > TOMBSTONE).count();
            // SAFETY: the filter's u32s, inside the data mapping.
            let filter: u64 = (0..FILTER_PAGES as usize)
                .map(|i| {
                    u64::from(unsafe {
                        (self.data.add(off::FILTER as usize + 4 * i) as *const u32).read_volatile()
                    })
                })
                .sum();
            assert_eq!(filter as usize, held, "the filter counts the set");
            held
        }
    }

    fn events() -> Vec<(u64, u64, u64, u64)> {
        std::mem::take(&mut *EVENTS.lock().unwrap_or_else(|e| e.into_inner()))
    }

    #[test]
    fn exact_mode_reports_every_call_with_its_block_size_and_kind() {
        let s = install(0);
        let (alloc, free, old) = (s.stub.site_alloc, s.stub.site_free, s.stub.site_realloc_old);
        let p = s.malloc(100);
        assert!(!p.is_null());
        let c = s.f::<extern "C" fn(usize, usize) -> *mut u8>(Func::Calloc)(3, 10);
        // SAFETY: calloc'd 30 bytes.
        assert!(unsafe { std::slice::from_raw_parts(c, 30) }.iter().all(|b| *b == 0));
        let realloc = s.f::<extern "C" fn(*mut c_void, usize) -> *mut c_void>(Func::Realloc);
        let q = realloc(p, 200);
        let r = realloc(std::ptr::null_mut(), 50);
        let mut m: *mut c_void = std::ptr::null_mut();
        let rc =
            s.f::<extern "C" fn(*mut *mut c_void, usize, usize) -> i32>(Func::PosixMemalign)(&mut m, 64, 100);
        assert_eq!(rc, 0);
        assert_eq!(m as usize % 64, 0);
        let a = s.f::<extern "C" fn(usize, usize) -> *mut c_void>(Func::AlignedAlloc)(64, 128);
        let ra = s.f::<extern "C" fn(*mut c_void, usize, usize) -> *mut c_void>(Func::Reallocarray)(r, 4, 8);
        s.free(std::ptr::null_mut());
        for b in [q, c.cast(), m, a, ra] {
            s.free(b);
        }
        let k = |k: AllocKind| k as u64;
        // Alloc sites: (block, size, kind). Other sites: the block; their rsi/rdx are the
        // function's own argument registers.
        let seen: Vec<(u64, u64, u64, u64)> = events()
            .into_iter()
            .map(|(site, a0, a1, a2)| if site == alloc { (site, a0, a1, a2) } else { (site, a0, 0, 0) })
            .collect();
        assert_eq!(
            seen,
            vec![
                (alloc, p as u64, 100, k(AllocKind::Malloc)),
                (alloc, c as u64, 30, k(AllocKind::Calloc)),
                (old, p as u64, 0, 0),
                (alloc, q as u64, 200, k(AllocKind::Realloc)),
                (alloc, r as u64, 50, k(AllocKind::Realloc)),
                (alloc, m as u64, 100, k(AllocKind::PosixMemalign)),
                (alloc, a as u64, 128, k(AllocKind::AlignedAlloc)),
                (old, r as u64, 0, 0),
                (alloc, ra as u64, 32, k(AllocKind::Reallocarray)),
                (free, q as u64, 0, 0),
                (free, c as u64, 0, 0),
                (free, m as u64, 0, 0),
                (free, a as u64, 0, 0),
                (free, ra as u64, 0, 0),
            ]
        );
        assert_eq!(s.counters(), [0, 0, 0], "exact mode keeps no set");
    }

    #[test]
    fn calls_from_inside_the_allocator_pass_through_unreported() {
        let s = install(0);
        // Everything counts as called from the allocator's code: nothing is reported.
        s.set_word(off::NESTED, 0);
        s.set_word(off::NESTED + 8, u64::MAX);
        s.set_word(off::NESTED_COUNT, 1);
        let p = s.malloc(64);
        let q = s.f::<extern "C" fn(*mut c_void, usize) -> *mut c_void>(Func::Realloc)(p, 128);
        s.free(q);
        assert!(events().is_empty());
        // A range elsewhere: reported again.
        s.set_word(off::NESTED + 8, 0x1000);
        let p = s.malloc(64);
        s.free(p);
        assert_eq!(events().len(), 2);
    }

    #[test]
    fn switched_off_every_call_passes_straight_through() {
        let s = install(0);
        s.set_word(off::ENABLED, 0);
        let p = s.malloc(64);
        let q = s.f::<extern "C" fn(*mut c_void, usize) -> *mut c_void>(Func::Realloc)(p, 128);
        assert!(!q.is_null());
        s.free(q);
        assert!(events().is_empty());
    }

    #[test]
    fn sampled_mode_samples_by_bytes_and_reports_only_sampled_frees() {
        let s = install(4096);
        let n = 100_000;
        for _ in 0..n {
            let p = s.malloc(64);
            s.free(p);
        }
        let ev = events();
        let allocs = ev.iter().filter(|e| e.0 == s.stub.site_alloc).count();
        let frees = ev.iter().filter(|e| e.0 == s.stub.site_free).count();
        // P(sampled) = 1 - e^(-64/4096) per allocation: ~1550 expected, sd ~39.
        let expect = n as f64 * (1.0 - (-64.0f64 / 4096.0).exp());
        assert!(
            (allocs as f64 - expect).abs() < 6.0 * expect.sqrt(),
            "{allocs} sampled, {expect:.0} expected"
        );
        assert_eq!(frees, allocs, "every sampled block's free is reported, no other");
        // Each free names the block its allocation reported.
        for pair in ev.chunks(2) {
            assert_eq!((pair[0].0, pair[1].0), (s.stub.site_alloc, s.stub.site_free));
            assert_eq!(pair[0].1, pair[1].1);
        }
        assert_eq!(s.counters(), [allocs as u64, allocs as u64, 0]);
        assert_eq!(s.held(), 0);
    }

    #[test]
    fn a_full_set_stops_sampling_counts_it_and_reports_nothing_it_cannot_follow() {
        let s = install(1);
        let n = SET_CAPACITY as usize + 1000;
        let blocks: Vec<*mut c_void> = (0..n).map(|_| s.malloc(16)).collect();
        let held = s.held();
        let c = s.counters();
        assert!(c[counter::SET_FULL as usize] >= 1, "{c:?}");
        assert_eq!(s.word(off::SAMPLING_OFF), 1);
        assert_eq!(c[counter::SAMPLED_ALLOCS as usize], held as u64);
        let reported = events().iter().filter(|e| e.0 == s.stub.site_alloc).count();
        assert_eq!(reported, held, "only held samples are reported");
        for b in blocks {
            s.free(b);
        }
        let frees = events().iter().filter(|e| e.0 == s.stub.site_free).count();
        assert_eq!(frees, held);
        assert_eq!(s.held(), 0);
    }

    #[test]
    fn threads_sampling_at_once_lose_no_sampled_free() {
        let s = install(2048);
        let (malloc, free) =
            (s.stub.entry(Func::Malloc).unwrap() as usize, s.stub.entry(Func::Free).unwrap() as usize);
        let workers: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    // SAFETY: generated code for malloc and free.
                    let (m, f): (extern "C" fn(usize) -> *mut c_void, extern "C" fn(*mut c_void)) = unsafe {
                        (
                            std::mem::transmute::<usize, extern "C" fn(usize) -> *mut c_void>(malloc),
                            std::mem::transmute::<usize, extern "C" fn(*mut c_void)>(free),
                        )
                    };
                    let mut kept = Vec::new();
                    for i in 0..20_000 {
                        kept.push(m(16 + i % 512));
                        if kept.len() > 64 {
                            f(kept.swap_remove(i % 64));
                        }
                    }
                    kept.into_iter().for_each(|p| f(p));
                })
            })
            .collect();
        workers.into_iter().for_each(|w| w.join().unwrap());
        let ev = events();
        let allocs: std::collections::HashSet<u64> =
            ev.iter().filter(|e| e.0 == s.stub.site_alloc).map(|e| e.1).collect();
        let frees = ev.iter().filter(|e| e.0 == s.stub.site_free).count();
        assert!(allocs.len() > 100, "{} sampled", allocs.len());
        assert_eq!(frees, ev.len() - frees, "one free per sampled allocation");
        assert_eq!(s.held(), 0);
        let c = s.counters();
        assert_eq!(c[0], c[1]);
    }

    #[test]
    fn cpython_stubs_report_pymalloc_sized_blocks_and_pass_ctx_through() {
        let s = install_py(0);
        let (alloc, free) = (s.stub.site_alloc, s.stub.site_free);
        let k = |k: AllocKind| k as u64;
        let p = s.py_malloc(100);
        let big = s.py_malloc(600);
        let zero = s.py_malloc(0);
        let edge = s.py_malloc(512);
        let c = s.py_calloc(4, 25);
        let q = s.py_realloc(p, 200);
        let r = s.py_realloc(q, 1000);
        let n = s.py_realloc(std::ptr::null_mut(), 50);
        s.py_free(std::ptr::null_mut());
        for b in [big, zero, edge, c, r, n] {
            s.py_free(b);
        }
        let seen: Vec<(u64, u64, u64, u64)> = events()
            .into_iter()
            .map(|(site, a0, a1, a2)| if site == alloc { (site, a0, a1, a2) } else { (site, a0, 0, 0) })
            .collect();
        assert_eq!(
            seen,
            vec![
                (alloc, p as u64, 100, k(AllocKind::PyMem)),
                // 600 and 0 bytes: pymalloc passes them on to malloc, whose hooks see them.
                (alloc, edge as u64, 512, k(AllocKind::PyMem)),
                (alloc, c as u64, 100, k(AllocKind::PyMem)),
                // realloc: the old block through the free site, then the new one.
                (free, p as u64, 0, 0),
                (alloc, q as u64, 200, k(AllocKind::PyMem)),
                (free, q as u64, 0, 0),
                (alloc, n as u64, 50, k(AllocKind::PyMem)),
                // Exact mode reports every free (a large block's is unknown to the tracker).
                (free, big as u64, 0, 0),
                (free, zero as u64, 0, 0),
                (free, edge as u64, 0, 0),
                (free, c as u64, 0, 0),
                (free, r as u64, 0, 0),
                (free, n as u64, 0, 0),
            ]
        );
        assert_eq!(
            PY_BAD_CTX.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "ctx reached every call untouched"
        );
    }

    #[test]
    fn cpython_stubs_sample_small_blocks_and_follow_them_to_their_free() {
        let s = install_py(4096);
        let n = 100_000;
        let mut large_seen = 0;
        for i in 0..n {
            let p = s.py_malloc(64);
            let p = if i % 3 == 0 { s.py_realloc(p, 128) } else { p };
            s.py_free(p);
            let b = s.py_malloc(4096);
            s.py_free(b);
            large_seen += usize::from(events().iter().any(|e| e.1 == b as u64 && e.0 == s.stub.site_alloc));
        }
        assert_eq!(large_seen, 0, "blocks pymalloc does not serve are never sampled here");
        let c = s.counters();
        let sampled = c[counter::SAMPLED_ALLOCS as usize];
        // 64 B per call, 128 more every third: ~1.6 % of 100 000 calls, plus realloc's.
        assert!(sampled > 1000 && sampled < 4000, "{c:?}");
        assert_eq!(c[counter::SAMPLED_FREES as usize], sampled, "every sampled block's free is seen");
        assert_eq!(s.held(), 0);
        assert_eq!(PY_BAD_CTX.load(std::sync::atomic::Ordering::Relaxed), 0);
        // Switched off: straight through, nothing reported.
        s.set_word(off::ENABLED, 0);
        let p = s.py_malloc(64);
        let p = s.py_realloc(p, 100);
        s.py_free(p);
        assert!(events().is_empty());
    }

    /// What the CPython stubs add to a pymalloc-sized malloc/free pair in sampled mode
    /// (`cargo test -p leakprobe --lib stub_pair_cost -- --ignored --nocapture`): a
    /// measurement, not a check.
    #[test]
    #[ignore]
    fn stub_pair_cost() {
        let s = install_py(512 * 1024);
        let n = 5_000_000;
        let mut live = vec![std::ptr::null_mut(); 4096];
        let time = |f: &mut dyn FnMut(usize)| {
            let t0 = std::time::Instant::now();
            for i in 0..n {
                f(i);
            }
            t0.elapsed().as_nanos() as f64 / n as f64
        };
        let direct = time(&mut |i| {
            let k = i.wrapping_mul(2654435761) % 4096;
            // SAFETY: libc's malloc and free on our own blocks.
            unsafe {
                libc::free(live[k]);
                live[k] = libc::malloc(16 + i % 400);
            }
        });
        let stub = time(&mut |i| {
            let k = i.wrapping_mul(2654435761) % 4096;
            s.py_free(live[k]);
            live[k] = s.py_malloc(16 + i % 400);
        });
        for p in live {
            s.py_free(p);
        }
        events();
        println!(
            "malloc+free pair: direct {direct:.1} ns, through the stubs {stub:.1} ns (+{:.1} ns)",
            stub - direct
        );
    }

    /// The stub's own cost per unsampled call (`-- --ignored --nocapture`, release): malloc and
    /// free pairs of 16-512 B through the malloc-family stubs and the CPython ones, against
    /// the same calls made directly. A figure, not a check.
    #[test]
    #[ignore]
    fn unsampled_call_cost() {
        const N: usize = 20_000_000;
        let time = |f: &dyn Fn(usize)| {
            let t = std::time::Instant::now();
            for i in 0..N {
                f(16 + (i * 37) % 497);
            }
            t.elapsed().as_secs_f64() * 1e9 / N as f64
        };
        // SAFETY: plain malloc and free of what was just allocated.
        let direct = time(&|n| unsafe { libc::free(std::hint::black_box(libc::malloc(n))) });
        let s = install(1 << 40);
        let stubbed = time(&|n| s.free(std::hint::black_box(s.malloc(n))));
        drop(s);
        let p = install_py(1 << 40);
        let py = time(&|n| p.py_free(std::hint::black_box(p.py_malloc(n))));
        println!(
            "ns per malloc+free pair: direct {direct:.2}, through the stubs {stubbed:.2}, CPython stubs {py:.2}"
        );
    }

    /// Writes the generated code to /tmp/leakprobe-stub-N-{near,far}.bin with its entries
    /// (`-- --ignored --nocapture`), for `objdump -D -b binary -mi386:x86-64` when reading a
    /// profile by offset.
    #[test]
    #[ignore]
    fn dump_code() {
        for (n, funcs) in [&Func::PYMEM[..], &[Func::Malloc, Func::Calloc, Func::Realloc, Func::Free][..]]
            .into_iter()
            .enumerate()
        {
            // Real functions in reach (direct jumps) and out of it (read from the data page).
            for (tag, to) in [("near", 0x50_0000u64), ("far", 1 << 40)] {
                let real: Vec<(Func, u64)> = funcs.iter().map(|&f| (f, to)).collect();
                let stub = generate(0x3e_f000, 0x10_0000, &real, true).unwrap();
                let path = format!("/tmp/leakprobe-stub-{n}-{tag}.bin");
                println!("{path} (at 0x3ef000): {:x?}", stub.entries);
                std::fs::write(path, &stub.code).unwrap();
            }
        }
    }
}
