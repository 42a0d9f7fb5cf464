//! leakprobe's kernel side: uprobes on the target's allocation functions.
//!
//! Each allocation entry saves its arguments and its stack per thread; the matching return
//! records the block in `LIVE` and adds to its call site's totals in `SITES`. Frees remove the
//! block and subtract. Everything that cannot be recorded is counted in `COUNTERS`, never
//! dropped silently. Every program returns at once for any process but the target.
#![no_std]
#![no_main]
// The BPF target has no AtomicU64::fetch_add; the intrinsic lowers to BPF's atomic add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
    ptr::read_volatile,
};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, pt_regs},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_loop, bpf_probe_read_kernel,
        bpf_probe_read_user,
    },
    macros::{map, raw_tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext},
};
use leakprobe_common::{
    AllocKind, COUNT_SCALE, ForkEvent, FreedBlock, FreedKey, HeapTotal, InFlight, LiveBlock, LiveKey,
    MAX_LAYOUTS, MAX_PY_DEPTH, MAX_STACK_DEPTH, MAX_UNWIND_MODULES, PyConfig, SiteCounters, SiteKey, Stack,
    TargetState, UnwindModule, UnwindRow, V8Config, WrapperStash, cfa, counter, js_frame, py_end, py_flavor,
    py_frame, rbp_rule, sampling, stack_end, target_flag,
};

/// `task_struct.tgid`, set by the daemon before load (0: children are never followed).
#[unsafe(no_mangle)]
static TASK_TGID: u64 = 0;
/// Frames per stack (`--max-stack`), at most MAX_STACK_DEPTH.
#[unsafe(no_mangle)]
static MAX_DEPTH: u32 = MAX_STACK_DEPTH as u32;
/// Mean bytes between samples (`--sample-bytes`); 0: every allocation is tracked.
#[unsafe(no_mangle)]
static SAMPLE_BYTES: u64 = 0;

// Sizes here are defaults; the daemon sets the real ones before load.
#[map]
static IN_FLIGHT: HashMap<u32, InFlight> = HashMap::with_max_entries(16384, 0);
#[map]
static WRAPPER_STASH: HashMap<u32, WrapperStash> = HashMap::with_max_entries(16384, 0);
/// In-process: a realloc's old block, from its realloc_old site to its alloc site. Apart from
/// IN_FLIGHT, whose records belong to uprobe calls and their return probes.
#[map]
static SITE_OLD: HashMap<u32, InFlight> = HashMap::with_max_entries(16384, 0);
#[map]
static LIVE: HashMap<LiveKey, LiveBlock> = HashMap::with_max_entries(1 << 20, 0);
/// The traced processes (`--max-processes`): the daemon adds those it attaches to, the fork
/// tracepoint the children of followed ones.
#[map]
static TARGETS: HashMap<u32, TargetState> = HashMap::with_max_entries(256, 0);
/// Followed processes' new children, for the daemon to attach to at once.
#[map]
static FORKS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);
/// A scan's window: while entry 0 is non-zero, every block allocated at or before that time
/// that leaves `LIVE` is kept in `FREED_SINCE`, so that the scan can tell what was live at the
/// instant it stopped the target, however late it reads `LIVE`. The daemon opens the window
/// (u64::MAX) before the stop and narrows it to the stop's instant once it knows it.
#[map]
static SCAN_FROM: Array<u64> = Array::with_max_entries(1, 0);
#[map]
static FREED_SINCE: HashMap<FreedKey, FreedBlock> = HashMap::with_max_entries(1 << 16, 0);
/// The key and value being kept, built here rather than on the BPF stack (the capture
/// program's frames are near the verifier's limit).
#[map]
static FREED_SCRATCH: PerCpuArray<(FreedKey, FreedBlock)> = PerCpuArray::with_max_entries(1, 0);
#[map]
static STACKS: HashMap<u64, Stack> = HashMap::with_max_entries(1 << 15, 0);
#[map]
static SITES: HashMap<SiteKey, SiteCounters> = HashMap::with_max_entries(1 << 15, 0);
/// The whole tracked heap, and its peak.
#[map]
static HEAP: Array<HeapTotal> = Array::with_max_entries(1, 0);
/// Full tracking: each thread's last allocated address, until its next free call (0 after
/// one): a free of that very address is a temporary allocation.
#[map]
static LAST_ALLOC: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);
#[map]
static SCRATCH: PerCpuArray<Stack> = PerCpuArray::with_max_entries(1, 0);
/// Slot 0: the `capture` program. Every entry probe tail-calls it, so the stack walker (the
/// costly part to verify) is verified once rather than once per probe. Slot 1:
/// `capture_python`, which `capture` tail-calls when the target runs CPython (verified on its
/// own: both walks in one program exceed the verifier's budget). Slot 2: `capture_v8`, the same
/// for a V8 target's JavaScript frames.
#[map]
static CAPTURE_PROG: ProgramArray = ProgramArray::with_max_entries(3, 0);
/// What an entry probe hands to `capture` on this CPU.
#[map]
static PENDING: PerCpuArray<Pending> = PerCpuArray::with_max_entries(1, 0);

/// The CPython runtime's layout (entry 0; flavor 0 = none), set by the daemon.
#[map]
static PY_CONFIG: Array<PyConfig> = Array::with_max_entries(1, 0);
/// The V8 runtime's frame layout (entry 0; `enabled` 0 = none), set by the daemon.
#[map]
static V8_CONFIG: Array<V8Config> = Array::with_max_entries(1, 0);
/// Per CPU: the frame pointer of each frame of the stack being captured that the native walk
/// followed by frame pointer (0 for the others), for `capture_v8`.
#[map]
static FRAME_FPS: PerCpuArray<[u64; MAX_STACK_DEPTH]> = PerCpuArray::with_max_entries(1, 0);
/// Per CPU: a copy of the user stack being walked, read in one go (see [`StackWin`]).
#[map]
static STACK_WIN: PerCpuArray<[u64; STACK_WIN_WORDS]> = PerCpuArray::with_max_entries(1, 0);
/// Per thread: the bounds of the mapping its stack pointer was last in (see [`stack_top`]).
#[map]
static STACK_BOUNDS: LruHashMap<u32, [u64; 2]> = LruHashMap::with_max_entries(1 << 14, 0);
/// Per CPU: the native walk's state (see [`NativeWalk`]).
#[map]
static NATIVE_WALK: PerCpuArray<NativeWalk> = PerCpuArray::with_max_entries(1, 0);
/// Per CPU: the fields of the Python frame or thread state being looked at, read in one go.
#[map]
static PY_READ_BUF: PerCpuArray<[u8; PY_READ_SPAN]> = PerCpuArray::with_max_entries(1, 0);
/// Per thread: its `PyThreadState`, checked against its native thread id at each use.
#[map]
static PY_TSTATE: LruHashMap<u32, u64> = LruHashMap::with_max_entries(1 << 14, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct Pending {
    sp: u64,
    bp: u64,
    size: u64,
    old_ptr: u64,
    out_ptr: u64,
    kind: u32,
    /// What `capture` does with the stack: [`then::CALL`], [`then::STASH`] or [`then::RECORD`].
    wrapper: u32,
    /// The native frames' hash, handed from `capture` to `capture_python`.
    hash: u64,
}

/// What `capture` does once it has the stack.
mod then {
    /// An allocation function's entry: keep the call until its return.
    pub const CALL: u32 = 0;
    /// C++ operator new: stash the stack for the allocation inside it.
    pub const STASH: u32 = 1;
    /// An in-process report site: the block exists already; record it now.
    pub const RECORD: u32 = 2;
}

/// The allocator module's code (in-process mode): mmap/munmap called from inside it are the
/// allocator's own bookkeeping for a block already reported at its site, not allocations.
#[unsafe(no_mangle)]
static ALLOCATOR_TEXT_START: u64 = 0;
#[unsafe(no_mangle)]
static ALLOCATOR_TEXT_END: u64 = 0;
/// In-process mode: the stub's code (see `called_from_allocator`).
#[unsafe(no_mangle)]
static STUB_TEXT_START: u64 = 0;
#[unsafe(no_mangle)]
static STUB_TEXT_END: u64 = 0;

/// Per thread: bytes left until the next sampled allocation.
#[map]
static SAMPLE_LEFT: HashMap<u32, i64> = HashMap::with_max_entries(16384, 0);
#[map]
static EXP_TABLE: Array<u64> = Array::with_max_entries(sampling::EXP_ENTRIES, 0);
#[map]
static WEIGHT_TABLE: Array<u64> = Array::with_max_entries(sampling::WEIGHT_ENTRIES, 0);

/// Unwind rows of every module, each module's rows sorted by pc.
#[map]
static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1 << 20, 0);
/// The target's executable mappings sorted by start; unused slots have start = i64::MAX.
#[map]
static UNWIND_MODULES: Array<UnwindModule> = Array::with_max_entries(MAX_LAYOUTS * MAX_UNWIND_MODULES, 0);

const EEXIST: i32 = 17;
const MAP_ANONYMOUS: u64 = 0x20;
/// A nested call (malloc inside realloc inside libc) runs within this many bytes of stack
/// below its outer call. Further away, the outer record is stale (its return was missed).
const NESTED_SP_WINDOW: u64 = 64 * 1024;
/// The C++ wrapper's stash is used only by an allocation this close below it on the stack.
const WRAPPER_SP_WINDOW: u64 = 4096;
/// Frame pointers further than this above the stack pointer are not this thread's stack.
const MAX_STACK_SPAN: u64 = 64 << 20;

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *p += 1 };
    }
}

/// The current process's entry in `TARGETS`, if it is traced (and has not called exec).
#[inline(always)]
fn current_target() -> Option<*mut TargetState> {
    traced(bpf_get_current_pid_tgid())
}

/// The entry of the process in `pid_tgid`'s upper half, if it is traced and has not exec'd.
#[inline(always)]
fn traced(pid_tgid: u64) -> Option<*mut TargetState> {
    let t = TARGETS.get_ptr_mut(&((pid_tgid >> 32) as u32))?;
    (unsafe { (*t).flags } & target_flag::EXECED == 0).then_some(t)
}

/// The current thread id if its process is traced (one helper call on every probe hit).
#[inline(always)]
fn target_tid() -> Option<u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    traced(pid_tgid).map(|_| pid_tgid as u32)
}

/// The current process's tgid (every LIVE key and site is its process's).
#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn live_key(addr: u64) -> LiveKey {
    LiveKey { addr, tgid: current_tgid(), _pad: 0 }
}

/// Marks a traced process's exec (a raw tracepoint: no tracefs involved).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn on_exec(_ctx: RawTracePointContext) -> i32 {
    if let Some(t) = current_target() {
        unsafe { (*t).flags |= target_flag::EXECED };
    }
    0
}

/// A followed process forked: its child is traced from its first instruction, in the
/// parent's layout (a fork copies the address space), and the daemon is told.
/// `sched_process_fork(parent, child)` runs in the parent, before the child can run.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn on_fork(ctx: RawTracePointContext) -> i32 {
    let Some(t) = current_target() else { return 0 };
    let parent = unsafe { *t };
    let off = unsafe { read_volatile(&raw const TASK_TGID) };
    if parent.flags & target_flag::FOLLOW == 0 || off == 0 {
        return 0;
    }
    let child_task: u64 = ctx.arg(1);
    let Ok(child) = (unsafe { bpf_probe_read_kernel((child_task + off) as *const u32) }) else { return 0 };
    let tgid = current_tgid();
    if child == tgid || child == 0 {
        return 0; // a new thread of the same process
    }
    let ns = unsafe { bpf_ktime_get_ns() };
    let state =
        TargetState { layout: parent.layout, flags: parent.flags, forked_ns: ns, ..Default::default() };
    if TARGETS.insert(&child, &state, BPF_NOEXIST as u64).is_err() {
        count(counter::PROCESSES_DROPPED);
        return 0;
    }
    if FORKS.output::<ForkEvent>(ForkEvent { parent: tgid, child, ns }, 0).is_err() {
        count(counter::FORK_EVENTS_LOST);
    }
    0
}

#[inline(always)]
fn regs(ctx: &ProbeContext) -> &pt_regs {
    unsafe { &*ctx.regs }
}

/// True when this call runs inside an outer allocation call on the same thread. An equal
/// stack pointer is a tail call (glibc's reallocarray jumps to realloc, realloc(NULL) to
/// malloc): still the outer call, whose return address is already our return trampoline.
#[inline(always)]
fn nested_in(outer_sp: u64, sp: u64, window: u64) -> bool {
    outer_sp >= sp && outer_sp - sp < window
}

/// All ones when `a <= b`, else zero, without a branch. User addresses are below 2^63, so the
/// difference's sign bit decides. Branch-free binary searches keep the verifier's work linear
/// in the number of steps instead of exponential.
#[inline(always)]
fn le_mask(a: u64, b: u64) -> u64 {
    !((b.wrapping_sub(a) as i64 >> 63) as u64)
}

/// The mapping containing `pc`: binary search over the sorted module slots.
#[inline(always)]
fn find_module(pc: u64, layout: u32) -> Option<UnwindModule> {
    let base = (layout % MAX_LAYOUTS) * MAX_UNWIND_MODULES;
    let mut lo: u32 = base;
    let mut n: u32 = MAX_UNWIND_MODULES;
    for _ in 0..8 {
        if n <= 1 {
            break;
        }
        let half = n / 2;
        let m = UNWIND_MODULES.get(lo + half)?;
        lo += half & le_mask(m.start, pc) as u32;
        n -= half;
    }
    let m = *UNWIND_MODULES.get(lo)?;
    (m.start <= pc && pc < m.end).then_some(m)
}

/// The unwind row covering ELF address `vaddr` of module `m`.
#[inline(always)]
fn find_row(m: &UnwindModule, vaddr: u64) -> Option<UnwindRow> {
    if m.row_count == 0 {
        return None;
    }
    let mut lo = m.row_start;
    let mut n = m.row_count;
    for _ in 0..24 {
        if n <= 1 {
            break;
        }
        let half = n / 2;
        let r = UNWIND_ROWS.get(lo + half)?;
        lo += half & le_mask(r.pc, vaddr) as u32;
        n -= half;
    }
    let r = *UNWIND_ROWS.get(lo)?;
    // A gap between functions is code without unwind information.
    (r.pc <= vaddr && r.cfa_reg != cfa::GAP).then_some(r)
}

/// Slots of the per-CPU row cache (a power of two).
const ROW_CACHE_SLOTS: u32 = 2048;

/// One slot of `ROW_CACHE`: the row found for a return address, in a generation of the
/// module table.
#[repr(C)]
#[derive(Clone, Copy)]
struct RowCacheSlot {
    pc: u64,
    layout: u64,
    /// `UNWIND_GEN` + 1 when filled (0: empty).
    generation: u64,
    row: UnwindRow,
    found: u64,
}

/// Per CPU, direct-mapped by return address: the unwind row of each return address seen
/// lately. A server's stacks repeat the same few hundred return addresses, and one lookup
/// here replaces two binary searches (~30 map reads a frame).
#[map]
static ROW_CACHE: PerCpuArray<RowCacheSlot> = PerCpuArray::with_max_entries(ROW_CACHE_SLOTS, 0);
/// See `leakprobe_common::maps::UNWIND_GEN`.
#[map]
static UNWIND_GEN: Array<u64> = Array::with_max_entries(1, 0);

/// The slot of address `x` in a direct-mapped per-CPU cache of `slots` entries (a power of
/// two): a multiplicative hash, so neighbouring addresses spread.
#[inline(always)]
fn cache_slot(x: u64, slots: u32) -> u32 {
    // The top bits of the product: with the mask, the verifier knows the slot's bounds.
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - slots.trailing_zeros())) as u32 & (slots - 1)
}

/// The unwind row for return address `pc` (the row of the call before it), through the cache.
#[inline(always)]
fn cached_row(pc: u64, layout: u64) -> Option<UnwindRow> {
    let generation = UNWIND_GEN.get(0).copied().unwrap_or(0).wrapping_add(1);
    let s = ROW_CACHE.get_ptr_mut(cache_slot(pc ^ (layout << 56), ROW_CACHE_SLOTS));
    if let Some(s) = s {
        let s = unsafe { &*s };
        if s.pc == pc && s.layout == layout && s.generation == generation {
            return (s.found != 0).then_some(s.row);
        }
    }
    // A return address points after the call: look up the call itself.
    let row = find_module(pc, layout as u32).and_then(|m| find_row(&m, pc - 1 - m.bias));
    if let Some(s) = s {
        unsafe {
            *s = RowCacheSlot {
                pc,
                layout,
                generation,
                row: row.unwrap_or_default(),
                found: row.is_some() as u64,
            }
        };
    }
    row
}

/// The frame-pointer convention as an unwind row: CFA = rbp + 16, caller's rbp at CFA - 16.
const FRAME_POINTER_ROW: UnwindRow = UnwindRow {
    pc: 0,
    cfa_offset: 16,
    rbp_offset: -16,
    cfa_reg: cfa::RBP,
    rbp_rule: rbp_rule::AT_CFA_OFFSET,
};

#[inline(always)]
fn plausible_fp(bp: u64, sp: u64) -> bool {
    bp >= sp && bp - sp <= MAX_STACK_SPAN && bp & 7 == 0
}

/// Thread states looked at per lookup, at most.
const MAX_PY_THREADS: u32 = 256;
/// Frames looked at per walk, at most (shim frames are skipped, not kept).
const MAX_PY_WALK: u32 = 2 * MAX_PY_DEPTH as u32 + 1;
/// `_PyInterpreterFrame.owner` of the shim frame a C call into the evaluation loop pushes.
const FRAME_OWNED_BY_CSTACK: u8 = 3;

#[inline(always)]
fn read_u64(addr: u64) -> Option<u64> {
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// Words of user stack copied per read: 4 KiB, about a dozen frames of a C++ server or of
/// CPython's evaluation loop.
const STACK_WIN_WORDS: usize = 512;
const STACK_WIN_BYTES: u64 = (STACK_WIN_WORDS * 8) as u64;

/// The user stack above the walk, copied in 4 KiB windows: each `bpf_probe_read_user` costs
/// ~80-90 ns here, most of it fixed, and a walk reads one or two words a frame.
/// A word outside the window moves the window to the frame being unwound (the walk only goes
/// up the stack); a window that could not be read whole ends at its page (the stack's top is
/// near) and is not moved again. Words it cannot give are read one by one, as before.
#[repr(C)]
struct StackWin {
    lo: u64,
    /// Bytes in the window; 0: none.
    len: u64,
    /// Whether a full window was read (so one further up may be too).
    more: u64,
    /// The end of the stack's mapping, where known (0: not): no window reads past it, so
    /// none faults.
    top: u64,
}

impl StackWin {
    #[inline(always)]
    fn new() -> Self {
        StackWin { lo: 0, len: 0, more: 1, top: 0 }
    }

    /// Copies the stack from `at` (8-aligned) into `STACK_WIN`.
    #[inline(always)]
    fn fill(&mut self, at: u64) {
        let Some(buf) = STACK_WIN.get_ptr_mut(0) else {
            self.len = 0;
            self.more = 0;
            return;
        };
        let dst = buf as *mut core::ffi::c_void;
        let src = at as *const core::ffi::c_void;
        self.lo = at;
        // Up to the stack's end where it is known, else a whole window and, if that faults
        // (the end is nearer), the rest of `at`'s page, which is mapped: `at` is on the stack.
        let mut n = STACK_WIN_BYTES;
        if self.top > at && self.top - at < STACK_WIN_BYTES {
            n = self.top - at;
            self.more = 0;
        }
        if n >= 8 && n <= STACK_WIN_BYTES {
            // SAFETY: at most the buffer's size, into this CPU's entry.
            if unsafe { aya_ebpf::helpers::generated::bpf_probe_read_user(dst, n as u32, src) } == 0 {
                self.len = n;
                return;
            }
        }
        self.more = 0;
        let n = 4096 - (at & 4095);
        let ok = n <= STACK_WIN_BYTES
            && unsafe { aya_ebpf::helpers::generated::bpf_probe_read_user(dst, n as u32, src) } == 0;
        self.len = if ok { n } else { 0 };
    }

    /// The stack word at `addr`, for a frame whose stack pointer is `sp` (<= addr): from the
    /// window, or read on its own, or `Refill` when a window starting at `sp` would hold it.
    #[inline(always)]
    fn word(&self, addr: u64, sp: u64) -> Word {
        let off = addr.wrapping_sub(self.lo);
        if addr & 7 == 0 {
            // No wrapping sums: a word just below the window is not in it.
            if addr >= self.lo && off < self.len && self.len - off >= 8 {
                return match STACK_WIN.get(0) {
                    Some(buf) => Word::Got(buf[(off >> 3) as usize & (STACK_WIN_WORDS - 1)]),
                    None => Word::Missing,
                };
            }
            if self.more != 0
                && sp != self.lo
                && sp & 7 == 0
                && sp <= addr
                && addr - sp <= STACK_WIN_BYTES - 8
            {
                return Word::Refill;
            }
        }
        match read_u64(addr) {
            Some(v) => Word::Got(v),
            None => Word::Missing,
        }
    }
}

/// Offsets of `vm_area_struct.vm_start` and `.vm_end` (from the kernel's BTF; these are the
/// layout's since 2.6).
#[unsafe(no_mangle)]
static VMA_START: u64 = 0;
#[unsafe(no_mangle)]
static VMA_END: u64 = 8;

/// `bpf_find_vma` callback: the mapping's `[start, end)` into `ctx` (two u64).
unsafe extern "C" fn vma_bounds(
    _task: *mut core::ffi::c_void,
    vma: *mut core::ffi::c_void,
    ctx: *mut core::ffi::c_void,
) -> i64 {
    let out = ctx as *mut [u64; 2];
    let at = |off: u64| unsafe { bpf_probe_read_kernel((vma as u64 + off) as *const u64) }.unwrap_or(0);
    let (start, end) = (
        at(unsafe { read_volatile(&raw const VMA_START) }),
        at(unsafe { read_volatile(&raw const VMA_END) }),
    );
    unsafe { *out = [start, end] };
    0
}

/// The end of the mapping that holds this thread's stack pointer `sp`, or 0 if it could not
/// be known: cached per thread, looked up with `bpf_find_vma` when `sp` is outside the cached
/// bounds (a new thread, a reused tid, a main stack that grew down).
#[inline(always)]
fn stack_top(tid: u32, sp: u64) -> u64 {
    if let Some(b) = unsafe { STACK_BOUNDS.get(&tid) }
        && b[0] <= sp
        && sp < b[1]
    {
        return b[1];
    }
    let mut b = [0u64; 2];
    // The BTF-typed task: bpf_find_vma takes no other.
    let task = unsafe { aya_ebpf::helpers::generated::bpf_get_current_task_btf() };
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_find_vma(
            task as *mut _,
            sp,
            vma_bounds as *mut core::ffi::c_void,
            &mut b as *mut [u64; 2] as *mut _,
            0,
        )
    };
    if rc != 0 || !(b[0] <= sp && sp < b[1]) {
        return 0;
    }
    let _ = STACK_BOUNDS.insert(&tid, &b, 0);
    b[1]
}

/// A word of the stack, as [`StackWin::word`] finds it.
enum Word {
    Got(u64),
    /// Unreadable.
    Missing,
    /// Move the window to the frame's stack pointer first.
    Refill,
}

/// State of a `bpf_loop` walk, on the calling program's stack.
#[repr(C)]
struct PyWalk {
    tid: u64,
    /// The thread state being looked at, then found (thread lookup); the frame (frame walk).
    cur: u64,
    found: u64,
    n: u64,
    h: u64,
    end: u64,
}

/// One thread state of the main interpreter's list: is it this tid's? (`bpf_loop` callback)
unsafe extern "C" fn py_thread_step(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let w = unsafe { &mut *(ctx as *mut PyWalk) };
    let Some(cfg) = PY_CONFIG.get(0) else { return 1 };
    if w.cur == 0 {
        return 1;
    }
    if read_u64(w.cur + cfg.tstate_native_thread_id) == Some(w.tid) {
        w.found = w.cur;
        return 1;
    }
    match read_u64(w.cur + cfg.tstate_next) {
        Some(next) => {
            w.cur = next;
            0
        }
        None => 1,
    }
}

/// The allocating thread's `PyThreadState` and its frame word (`frame`, `cframe` or
/// `current_frame`: `cfg.tstate_frame`): the state cached per tid, and found otherwise by
/// walking the main interpreter's thread list for the one whose `native_thread_id` is this tid.
#[inline(always)]
fn py_thread_state(cfg: &PyConfig, tid: u32) -> Option<(u64, Option<u64>)> {
    // The key the thread state holds: the tid, or (3.9, 3.10) pthread_self(), the FS base.
    let key = if cfg.task_fsbase != 0 {
        let task = unsafe { bpf_get_current_task() };
        unsafe { bpf_probe_read_kernel((task + cfg.task_fsbase) as *const u64) }.ok()?
    } else {
        tid as u64
    };
    // Cached by tid, and checked against the key at each use (a thread state freed and
    // reused by another thread holds that thread's key).
    if let Some(ts) = unsafe { PY_TSTATE.get(&tid) }.copied()
        && let Some((held, top)) = read_two(ts, cfg.tstate_native_thread_id, cfg.tstate_frame)
        && held == key
    {
        return Some((ts, Some(top)));
    }
    let interp = read_u64(cfg.interp_head_ptr)?;
    let head = read_u64(interp + cfg.interp_threads_head)?;
    let mut w = PyWalk { tid: key, cur: head, found: 0, n: 0, h: 0, end: 0 };
    unsafe {
        bpf_loop(MAX_PY_THREADS, py_thread_step as *mut core::ffi::c_void, &mut w as *mut PyWalk as *mut _, 0)
    };
    if w.found == 0 {
        return None;
    }
    let _ = PY_TSTATE.insert(&tid, &w.found, 0);
    Some((w.found, read_u64(w.found + cfg.tstate_frame)))
}

/// Bytes of a Python structure read at once: a frame's code, back, position and entry fields
/// lie within 88 bytes in every supported version, a thread state's key and frame within 160
/// (3.9's `thread_id` and `frame`).
const PY_READ_SPAN: usize = 256;

/// The fields of a Python frame the walk needs.
struct PyFrameFields {
    code: u64,
    back: u64,
    instr: u64,
    /// `is_entry` (3.11) or `owner` (3.12+); 0 for 3.9 and 3.10.
    flag: u8,
}

/// Reads a frame's fields with one `bpf_probe_read_user` of the span that holds them, or
/// field by field if that span is wider than [`PY_READ_SPAN`].
#[inline(always)]
fn py_frame_fields(cfg: &PyConfig, frame: u64) -> Option<PyFrameFields> {
    let has_flag = cfg.flavor != py_flavor::FRAME_OBJECT;
    let mut lo = cfg.frame_code.min(cfg.frame_back).min(cfg.frame_instr);
    let mut hi = (cfg.frame_code.max(cfg.frame_back).max(cfg.frame_instr)) + 8;
    if has_flag {
        lo = lo.min(cfg.frame_entry);
        hi = hi.max(cfg.frame_entry + 1);
    }
    let len = hi - lo;
    let buf = PY_READ_BUF.get_ptr_mut(0)?;
    if len > PY_READ_SPAN as u64 {
        let flag = if has_flag {
            unsafe { bpf_probe_read_user((frame + cfg.frame_entry) as *const u8) }.ok()?
        } else {
            0
        };
        return Some(PyFrameFields {
            code: read_u64(frame + cfg.frame_code)?,
            back: read_u64(frame + cfg.frame_back)?,
            instr: read_u64(frame + cfg.frame_instr)?,
            flag,
        });
    }
    let b = read_span(buf, frame + lo, len)?;
    let word = |at: u64| span_word(b, at - lo);
    let flag = if has_flag { b[(cfg.frame_entry - lo) as usize & (PY_READ_SPAN - 1)] } else { 0 };
    Some(PyFrameFields {
        code: word(cfg.frame_code),
        back: word(cfg.frame_back),
        instr: word(cfg.frame_instr),
        flag,
    })
}

/// The words at `base + a` and `base + b` of a Python structure: one read of the span between
/// them when it fits [`PY_READ_SPAN`], else two.
#[inline(always)]
fn read_two(base: u64, a: u64, b: u64) -> Option<(u64, u64)> {
    let lo = a.min(b);
    let len = a.max(b) + 8 - lo;
    let Some(buf) = PY_READ_BUF.get_ptr_mut(0).filter(|_| len <= PY_READ_SPAN as u64) else {
        return Some((read_u64(base + a)?, read_u64(base + b)?));
    };
    let span = read_span(buf, base + lo, len)?;
    Some((span_word(span, a - lo), span_word(span, b - lo)))
}

/// Reads `len` bytes (at most [`PY_READ_SPAN`], as the callers check) at `at` into this
/// CPU's `PY_READ_BUF` (`buf`) in one `bpf_probe_read_user`.
#[inline(always)]
fn read_span(buf: *mut [u8; PY_READ_SPAN], at: u64, len: u64) -> Option<&'static [u8; PY_READ_SPAN]> {
    let n = (len as u32) & (PY_READ_SPAN as u32 * 2 - 1);
    // SAFETY: at most PY_READ_SPAN bytes into this CPU's buffer; programs do not nest on a CPU.
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            buf as *mut core::ffi::c_void,
            n.min(PY_READ_SPAN as u32),
            at as *const core::ffi::c_void,
        )
    };
    (rc == 0).then(|| unsafe { &*buf })
}

/// The little-endian word at byte `o` of a span read into `PY_READ_BUF` (0 past its end).
#[inline(always)]
fn span_word(buf: &[u8; PY_READ_SPAN], o: u64) -> u64 {
    let o = o as usize & (PY_READ_SPAN - 1);
    if o + 8 > PY_READ_SPAN {
        return 0;
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&buf[o..o + 8]);
    u64::from_le_bytes(v)
}

/// Slots of the per-CPU cache of code objects seen (a power of two).
const CODE_SEEN_SLOTS: u32 = 1024;

/// Per CPU, direct-mapped by address: code objects whose type was checked. A frame holds a
/// reference to its code, so an address seen as a code object in a frame of the thread
/// being walked (which is stopped in our probe) stays one while any frame uses it.
#[map]
static CODE_SEEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(CODE_SEEN_SLOTS, 0);

/// Whether `code` is a code object (`ob_type` is `PyCode_Type`): from the cache, or read once.
#[inline(always)]
fn is_code_object(cfg: &PyConfig, code: u64) -> bool {
    let seen = CODE_SEEN.get_ptr_mut(cache_slot(code, CODE_SEEN_SLOTS));
    if let Some(seen) = seen
        && code != 0
        && unsafe { *seen } == code
    {
        return true;
    }
    if read_u64(code + 8) != Some(cfg.code_type) {
        return false;
    }
    if let Some(seen) = seen {
        unsafe { *seen = code };
    }
    true
}

/// One Python frame into `SCRATCH.py` (`bpf_loop` callback): see `PyConfig` and `py_frame`.
unsafe extern "C" fn py_frame_step(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let w = unsafe { &mut *(ctx as *mut PyWalk) };
    let (Some(cfg), Some(buf)) = (PY_CONFIG.get(0), SCRATCH.get_ptr_mut(0)) else { return 1 };
    let buf = unsafe { &mut *buf };
    let frame = w.cur;
    if frame == 0 {
        return 1;
    }
    let Some(f) = py_frame_fields(cfg, frame) else {
        w.end = py_end::BAD_FRAME as u64;
        return 1;
    };
    let (code, back, instr, flag) = (f.code, f.back, f.instr, f.flag);
    if (cfg.flavor == py_flavor::CFRAME_312 || cfg.flavor == py_flavor::CURRENT_313)
        && flag == FRAME_OWNED_BY_CSTACK
    {
        // A shim: the frame taken just before it is where that C call entered.
        let last = w.n.wrapping_sub(1) as usize;
        if last < MAX_PY_DEPTH {
            buf.runtime[last] |= py_frame::ENTRY;
        }
        w.cur = back;
        return 0;
    }
    let max = (cfg.max_frames as u64).min(MAX_PY_DEPTH as u64);
    if w.n >= max {
        w.end = py_end::MAX_DEPTH as u64;
        return 1;
    }
    // Never a frame whose code is not a code object.
    if !is_code_object(cfg, code) {
        w.end = py_end::BAD_FRAME as u64;
        return 1;
    }
    let (pos, entry) = if cfg.flavor == py_flavor::FRAME_OBJECT {
        // f_lasti is an int; negative before the first instruction.
        let lasti = instr as u32 as i32;
        (if lasti < 0 { py_frame::POS_MASK } else { lasti as u64 }, true)
    } else {
        let start = code + cfg.code_adaptive;
        let pos = if instr >= start { (instr - start) >> 1 } else { py_frame::POS_MASK };
        (pos, cfg.flavor == py_flavor::CFRAME_311 && flag != 0)
    };
    let i = w.n as usize;
    if i < MAX_PY_DEPTH {
        let word = py_frame::pack(code, pos, entry);
        buf.runtime[i] = word;
        w.h = (w.h ^ word).wrapping_mul(0x0000_0100_0000_01b3);
        w.n += 1;
    }
    w.cur = back;
    0
}

/// Walks the allocating thread's Python frames into `buf.py` (see `PyConfig` and `py_frame`;
/// `capture_stack` left it empty). Returns the FNV hash `h` extended with them. Each walk is a
/// `bpf_loop`, verified once.
#[inline(always)]
fn python_frames(buf: &mut Stack, tid: u32, h: u64) -> u64 {
    let Some(cfg) = PY_CONFIG.get(0) else { return h };
    if cfg.flavor == py_flavor::NONE {
        return h;
    }
    let Some((_, top)) = py_thread_state(cfg, tid) else {
        buf.runtime_end = py_end::NO_THREAD;
        return h;
    };
    let frame = match cfg.flavor {
        py_flavor::CFRAME_311 | py_flavor::CFRAME_312 => match top {
            Some(0) => Some(0),
            Some(cf) => read_u64(cf + cfg.cframe_current_frame),
            None => None,
        },
        _ => top,
    }
    .unwrap_or(0);
    let mut w = PyWalk { tid: tid as u64, cur: frame, found: 0, n: 0, h, end: py_end::COMPLETE as u64 };
    unsafe {
        bpf_loop(MAX_PY_WALK, py_frame_step as *mut core::ffi::c_void, &mut w as *mut PyWalk as *mut _, 0)
    };
    if w.end == py_end::COMPLETE as u64 && w.cur != 0 {
        w.end = py_end::MAX_DEPTH as u64;
    }
    buf.runtime_depth = w.n.min(MAX_PY_DEPTH as u64) as u32;
    buf.runtime_end = w.end as u32;
    w.h
}

/// Walks the user stack from an allocation function's entry into `SCRATCH`; returns its
/// hash, not yet final (see [`store_stack`]).
///
/// At entry `[rsp]` holds the return address into the direct caller, so frame 0 is exact
/// whatever the caller was compiled with. Each frame above is unwound with the module's
/// `.eh_frame` rows (loaded by the daemon); where a module has none, frame pointers are
/// followed if they look sane, and otherwise the stack ends there and is counted.
fn capture_stack(tid: u32, sp: u64, fp: u64) -> u64 {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let buf = unsafe { &mut *buf };
    let Some(w) = NATIVE_WALK.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's entry; programs do not nest on a CPU.
    let w = unsafe { &mut *w };
    // Equal addresses in two layouts are different code: the layout is part of the stack id.
    let layout = current_target().map(|t| unsafe { (*t).layout } as u64).unwrap_or(0);
    *w = NativeWalk {
        win: StackWin::new(),
        sp,
        bp: fp,
        pc: 0,
        h: fnv(0xcbf2_9ce4_8422_2325, layout),
        layout,
        depth: 1,
        end: stack_end::COMPLETE as u64,
        max_depth: unsafe { read_volatile(&raw const MAX_DEPTH) } as u64,
        // Only a V8 target needs the frame pointers kept.
        keep_fps: V8_CONFIG.get(0).is_some_and(|c| c.enabled != 0) as u64,
        refill: 0,
    };
    w.win.top = stack_top(tid, sp);
    w.win.fill(sp);
    let Word::Got(ret0) = w.win.word(sp, sp) else {
        count(counter::STACK_READ_ERROR);
        return 0;
    };
    buf.ips[0] = ret0;
    w.h = fnv(w.h, ret0);
    w.sp = sp + 8;
    w.pc = ret0;
    // The walk stops when it needs a word past the window; the window moves up and the walk
    // goes on, up to STACK_WINDOWS windows, and then word by word.
    for round in 0..STACK_WINDOWS {
        if round == STACK_WINDOWS - 1 {
            w.win.more = 0;
        }
        w.refill = 0;
        unsafe {
            bpf_loop(
                MAX_STACK_DEPTH as u32 - 1,
                native_frame_step as *mut core::ffi::c_void,
                core::ptr::null_mut(),
                0,
            )
        };
        if w.refill == 0 {
            break;
        }
        w.win.fill(w.sp);
    }
    let end = w.end as u32;
    if end == stack_end::MAX_DEPTH {
        count(counter::STACK_TRUNCATED);
    } else if end == stack_end::NO_UNWIND_INFO {
        count(counter::STACK_NO_UNWIND_INFO);
    }
    buf.depth = w.depth as u32;
    buf.truncated = end;
    buf.runtime_depth = 0;
    buf.runtime_end = py_end::COMPLETE;
    w.h ^ w.depth
}

/// FNV-1a over the frames, computed as they are found: the stack id, so equal stacks share one
/// entry.
#[inline(always)]
fn fnv(h: u64, ip: u64) -> u64 {
    (h ^ ip).wrapping_mul(0x0000_0100_0000_01b3)
}

/// State of the native walk's `bpf_loop`, per CPU in `NATIVE_WALK`: in a map rather than on
/// the stack, the verifier does not follow its values from one frame to the next, and checks
/// the step once instead of once per depth.
#[repr(C)]
struct NativeWalk {
    win: StackWin,
    /// The frame being unwound: its stack pointer, rbp and pc (a return address).
    sp: u64,
    bp: u64,
    pc: u64,
    h: u64,
    /// Frames in `SCRATCH.ips`.
    depth: u64,
    /// Why the walk stopped: a `stack_end` value.
    end: u64,
    max_depth: u64,
    /// Whether to note each frame's frame pointer in `FRAME_FPS` (V8 targets).
    keep_fps: u64,
    /// Set when the walk stopped for a word past the window (see [`Word::Refill`]).
    refill: u64,
    /// The process's module table.
    layout: u64,
}

/// Stack windows read per walk at most (16 KiB), before the rest goes word by word.
const STACK_WINDOWS: u32 = 4;

/// Unwinds one native frame into `SCRATCH.ips[depth]` (`bpf_loop` callback: verified once,
/// whatever the depth; its index is unused, so a walk resumed after a refill goes on where it
/// stopped). Returns 1 to stop.
unsafe extern "C" fn native_frame_step(_i: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(w) = NATIVE_WALK.get_ptr_mut(0) else { return 1 };
    // SAFETY: this CPU's entry; programs do not nest on a CPU.
    let w = unsafe { &mut *w };
    let Some(buf) = SCRATCH.get_ptr_mut(0) else { return 1 };
    let buf = unsafe { &mut *buf };
    let i = w.depth;
    let pc = w.pc;
    if pc == 0 || i >= MAX_STACK_DEPTH as u64 {
        return 1;
    }
    if i >= w.max_depth {
        w.end = stack_end::MAX_DEPTH as u64;
        return 1;
    }
    let (sp, bp) = (w.sp, w.bp);
    let (row, by_fp) = match cached_row(pc, w.layout) {
        Some(r) => (r, false),
        // No unwind information: follow the frame pointer if it looks like one.
        None if plausible_fp(bp, sp) => (FRAME_POINTER_ROW, true),
        None => {
            w.end = stack_end::NO_UNWIND_INFO as u64;
            return 1;
        }
    };
    if w.keep_fps != 0
        && let Some(f) = FRAME_FPS.get_ptr_mut(0)
    {
        unsafe { (*f)[(i as usize - 1) & (MAX_STACK_DEPTH - 1)] = if by_fp { bp } else { 0 } };
    }
    if row.cfa_reg == cfa::END {
        return 1;
    }
    let base = if row.cfa_reg == cfa::RSP { sp } else { bp };
    let cfa = base.wrapping_add(row.cfa_offset as i64 as u64);
    let ra = match w.win.word(cfa.wrapping_sub(8), sp) {
        Word::Got(v) => v,
        Word::Refill => {
            w.refill = 1;
            return 1;
        }
        Word::Missing => {
            count(counter::STACK_READ_ERROR);
            return 1;
        }
    };
    if ra == 0 || cfa <= sp {
        return 1;
    }
    // The caller's rbp: read from the stack only where the row says it was saved.
    let caller_bp = match row.rbp_rule {
        rbp_rule::AT_CFA_OFFSET => match w.win.word(cfa.wrapping_add(row.rbp_offset as i64 as u64), sp) {
            Word::Got(v) => v,
            Word::Refill => {
                w.refill = 1;
                return 1;
            }
            Word::Missing => 0,
        },
        rbp_rule::SAME => bp,
        _ => 0,
    };
    w.bp = caller_bp;
    buf.ips[i as usize & (MAX_STACK_DEPTH - 1)] = ra;
    w.h = fnv(w.h, ra);
    w.depth = i + 1;
    w.sp = cfa;
    w.pc = ra;
    if i as usize == MAX_STACK_DEPTH - 1 {
        w.end = stack_end::MAX_DEPTH as u64;
    }
    0
}

/// Stores the stack in `SCRATCH` under its hash; returns the stack id.
#[inline(always)]
fn store_stack(h: u64) -> u64 {
    let Some(buf) = SCRATCH.get_ptr(0) else {
        return 0;
    };
    let h = if h == 0 { 1 } else { h };
    match STACKS.insert(&h, unsafe { &*buf }, BPF_NOEXIST as u64) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {}
        Err(_) => count(counter::STACK_MAP_FULL),
    }
    h
}

#[inline(always)]
fn site_counters(key: &SiteKey) -> Option<*mut SiteCounters> {
    if let Some(p) = SITES.get_ptr_mut(key) {
        return Some(p);
    }
    // A racing thread may have created it; EEXIST is fine.
    let _ = SITES.insert(key, &SiteCounters::default(), BPF_NOEXIST as u64);
    let p = SITES.get_ptr_mut(key);
    if p.is_none() {
        count(counter::SITE_MAP_FULL);
    }
    p
}

#[inline(always)]
fn atomic_add(p: *mut u64, v: u64) {
    // The result is unused, so this is the plain BPF_XADD every kernel accepts.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// Adds `v` and returns the value after it (which may include a concurrent add).
#[inline(always)]
fn atomic_add_fetch(p: *mut u64, v: u64) -> u64 {
    atomic_add(p, v);
    unsafe { read_volatile(p) }
}

/// Raises `*p` to `v` if `v` is higher; true if it did. Racing raisers retry against what
/// they find, a bounded number of times: the highest value wins.
#[inline(always)]
fn raise_to(p: *mut u64, v: u64) -> bool {
    let mut cur = unsafe { read_volatile(p) };
    for _ in 0..8 {
        if v <= cur {
            return false;
        }
        let (seen, ok) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(p, cur, v)
        };
        if ok {
            return true;
        }
        cur = seen;
    }
    false
}

#[inline(always)]
fn account_alloc(block: &LiveBlock) {
    let key = SiteKey { stack_id: block.stack_id, kind: block.kind, tgid: block.tgid };
    if let Some(site) = site_counters(&key) {
        let count = atomic_add_fetch(unsafe { &raw mut (*site).alloc_count }, block.weight_count);
        let bytes = atomic_add_fetch(unsafe { &raw mut (*site).alloc_bytes }, block.weight_bytes);
        // A free racing with this block's own LIVE insert may be counted first: saturate.
        let (freed_count, freed_bytes) = unsafe {
            (read_volatile(&raw const (*site).free_count), read_volatile(&raw const (*site).free_bytes))
        };
        raise_to(unsafe { &raw mut (*site).peak_bytes }, bytes.saturating_sub(freed_bytes));
        raise_to(unsafe { &raw mut (*site).peak_count }, count.saturating_sub(freed_count));
    }
    if let Some(heap) = HEAP.get_ptr_mut(0) {
        heap_add(heap, block);
    }
    if let Some(t) = TARGETS.get_ptr_mut(&block.tgid) {
        heap_add(unsafe { &raw mut (*t).heap }, block);
    }
}

/// Adds a block to a heap's totals (the whole tracked heap's, or one process's).
#[inline(always)]
fn heap_add(heap: *mut HeapTotal, block: &LiveBlock) {
    let bytes = atomic_add_fetch(unsafe { &raw mut (*heap).bytes }, block.weight_bytes);
    let count = atomic_add_fetch(unsafe { &raw mut (*heap).count }, block.weight_count);
    if raise_to(unsafe { &raw mut (*heap).peak_bytes }, bytes) {
        unsafe { (*heap).peak_at_ns = block.timestamp_ns };
    }
    raise_to(unsafe { &raw mut (*heap).peak_count }, count);
}

#[inline(always)]
fn heap_sub(heap: *mut HeapTotal, block: &LiveBlock) {
    atomic_add(unsafe { &raw mut (*heap).bytes }, block.weight_bytes.wrapping_neg());
    atomic_add(unsafe { &raw mut (*heap).count }, block.weight_count.wrapping_neg());
}

/// Subtracts a freed block from its site and the heap; returns its site's counters.
#[inline(always)]
fn account_free(block: &LiveBlock) -> Option<*mut SiteCounters> {
    let key = SiteKey { stack_id: block.stack_id, kind: block.kind, tgid: block.tgid };
    let site = SITES.get_ptr_mut(&key);
    if let Some(site) = site {
        atomic_add(unsafe { &raw mut (*site).free_count }, block.weight_count);
        atomic_add(unsafe { &raw mut (*site).free_bytes }, block.weight_bytes);
    }
    if let Some(heap) = HEAP.get_ptr_mut(0) {
        heap_sub(heap, block);
    }
    if let Some(t) = TARGETS.get_ptr_mut(&block.tgid) {
        heap_sub(unsafe { &raw mut (*t).heap }, block);
    }
    site
}

/// Full tracking: this thread just allocated `addr`.
#[inline(always)]
fn note_alloc(addr: u64) {
    if sample_bytes() != 0 {
        return;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    match LAST_ALLOC.get_ptr_mut(&tid) {
        Some(last) => unsafe { *last = addr },
        None => {
            let _ = LAST_ALLOC.insert(&tid, &addr, BPF_ANY as u64);
        }
    }
}

/// Full tracking: this thread calls free on `addr`; `freed` is the tracked block and its
/// site's counters (from [`account_free`]), if it was tracked. The block is temporary if it
/// was the thread's last allocation, with no free call in between (heaptrack's rule); any
/// free call ends that chance for the last allocation.
#[inline(always)]
fn note_free(addr: u64, freed: Option<(&LiveBlock, Option<*mut SiteCounters>)>) {
    if sample_bytes() != 0 {
        return;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(last) = LAST_ALLOC.get_ptr_mut(&tid) else { return };
    let was_last = unsafe { *last } == addr;
    unsafe { *last = 0 };
    if let Some((b, Some(site))) = freed
        && was_last
    {
        atomic_add(unsafe { &raw mut (*site).temporary_count }, b.weight_count);
    }
}

/// realloc moved or freed its old block: account for it as a free call.
#[inline(always)]
fn free_realloc_old(rec: &InFlight) {
    if rec.old_ptr == 0 {
        return;
    }
    if rec.old_known != 0 {
        let site = account_free(&rec.old_block);
        note_free(rec.old_ptr, Some((&rec.old_block, site)));
    } else {
        count(counter::UNKNOWN_FREE);
        note_free(rec.old_ptr, None);
    }
}

#[inline(always)]
fn sample_bytes() -> u64 {
    unsafe { read_volatile(&raw const SAMPLE_BYTES) }
}

/// What a tracked block of `size` bytes stands for: itself in full tracking; when sampled, the
/// unbiased estimate size / P(sampled) with P = 1 - e^(-size/N), and 1/P allocations.
#[inline(always)]
fn weights(size: u64) -> (u64, u64) {
    let n = sample_bytes();
    if n == 0 {
        return (size, COUNT_SCALE);
    }
    if size == 0 {
        return (0, COUNT_SCALE);
    }
    // No 128-bit multiplies in BPF: sizes and rates are far below these bounds (the daemon
    // caps SAMPLE_BYTES at 2^40), and anything larger is simply "not scaled".
    if size >= 1 << 48 {
        return (size, COUNT_SCALE);
    }
    let idx = size.wrapping_mul(sampling::WEIGHT_STEPS_PER_UNIT) / n;
    let bytes = if idx < sampling::WEIGHT_ENTRIES as u64 {
        match WEIGHT_TABLE.get(idx as u32) {
            Some(f) => n.wrapping_mul(*f) / sampling::WEIGHT_ONE,
            None => size,
        }
    } else {
        size
    };
    (bytes, bytes.wrapping_mul(COUNT_SCALE) / size)
}

/// Poisson sampling by bytes (as tcmalloc and jemalloc do): each thread counts down a random,
/// exponentially distributed number of bytes; the allocation that crosses zero is sampled.
/// True means "track this one".
#[inline(always)]
fn sampled(tid: u32, size: u64) -> bool {
    if sample_bytes() == 0 {
        return true;
    }
    let next = || {
        let r = unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() } % sampling::EXP_ENTRIES;
        EXP_TABLE.get(r).map_or(0, |v| *v as i64)
    };
    match SAMPLE_LEFT.get_ptr_mut(&tid) {
        Some(left) => unsafe {
            *left -= size as i64;
            if *left > 0 {
                count(counter::UNSAMPLED_ALLOCS);
                return false;
            }
            *left = next();
            true
        },
        None => {
            let left = next() - size as i64;
            let _ = SAMPLE_LEFT.insert(&tid, &left.max(1), BPF_ANY as u64);
            if left > 0 {
                count(counter::UNSAMPLED_ALLOCS);
                return false;
            }
            let _ = SAMPLE_LEFT.insert(&tid, &next(), BPF_ANY as u64);
            true
        }
    }
}

fn record_alloc(addr: u64, size: u64, stack_id: u64, kind: u32) {
    note_alloc(addr);
    let (weight_bytes, weight_count) = weights(size);
    let block = LiveBlock {
        size,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        stack_id,
        weight_bytes,
        weight_count,
        kind,
        tgid: current_tgid(),
    };
    match LIVE.insert(&live_key(addr), &block, BPF_NOEXIST as u64) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {
            // The address came back while still live: its free went unseen. Retire the old
            // block so it does not show as a leak, and count the miss.
            if let Some(old) = unsafe { LIVE.get(&live_key(addr)) } {
                let old = *old;
                if kind == AllocKind::PyMem as u32 && old.kind != kind {
                    // pymalloc passed the request on to malloc, whose hook recorded this very
                    // block inside the same call (a realloc shrinking a malloc'd block into
                    // pymalloc's sizes): one block, already counted.
                    return;
                }
                let _ = account_free(&old);
                keep_for_scan(addr, &old);
            }
            count(counter::MISSED_FREE);
            if LIVE.insert(&live_key(addr), &block, BPF_ANY as u64).is_err() {
                live_map_full();
                return;
            }
        }
        Err(_) => {
            // Not recorded, so not counted: a block we cannot see freed must not become a leak.
            live_map_full();
            return;
        }
    }
    account_alloc(&block);
}

/// A block could not be recorded: counted overall and for its process.
#[inline(always)]
fn live_map_full() {
    count(counter::LIVE_MAP_FULL);
    if let Some(t) = current_target() {
        atomic_add(unsafe { &raw mut (*t).drops }, 1);
    }
}

/// Removes a live block; returns it if it was there.
#[inline(always)]
fn take_live(addr: u64) -> Option<LiveBlock> {
    let block = unsafe { LIVE.get(&live_key(addr)) }.copied()?;
    // Only the thread whose remove succeeds owns the block.
    LIVE.remove(&live_key(addr)).ok()?;
    keep_for_scan(addr, &block);
    Some(block)
}

/// A scan's window is open: keep a block that leaves `LIVE`.
#[inline(always)]
fn keep_for_scan(addr: u64, block: &LiveBlock) {
    let upto = match SCAN_FROM.get(0) {
        Some(v) => *v,
        None => return,
    };
    if upto == 0 || block.timestamp_ns > upto {
        return;
    }
    let Some(e) = FREED_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's own scratch entry; programs do not nest on a CPU.
    let e = unsafe { &mut *e };
    e.0 = FreedKey { addr, timestamp_ns: block.timestamp_ns, tgid: block.tgid, _pad: 0 };
    e.1.block = *block;
    e.1.freed_ns = unsafe { bpf_ktime_get_ns() };
    if FREED_SINCE.insert(&e.0, &e.1, BPF_ANY as u64).is_err() {
        count(counter::SCAN_FREES_LOST);
    }
}

/// The outer-call record for this thread, if this call is nested inside it. A record that
/// is not an outer call of ours is stale: its return was missed.
#[inline(always)]
fn outer_call(tid: u32, sp: u64) -> Option<*mut InFlight> {
    let f = IN_FLIGHT.get_ptr_mut(&tid)?;
    if nested_in(unsafe { (*f).sp }, sp, NESTED_SP_WINDOW) {
        return Some(f);
    }
    None
}

fn enter(ctx: &ProbeContext, kind: AllocKind, size: u64, old_ptr: u64, out_ptr: u64) -> u32 {
    let Some(tid) = target_tid() else { return 0 };
    let r = regs(ctx);
    let sp = r.rsp;
    if let Some(outer) = IN_FLIGHT.get_ptr_mut(&tid) {
        if nested_in(unsafe { (*outer).sp }, sp, NESTED_SP_WINDOW) {
            unsafe { (*outer).depth += 1 };
            return 0;
        }
        count(counter::MISSED_RETURN);
        let _ = IN_FLIGHT.remove(&tid);
    }
    // In-process: the inner part of a call a stub reports. It records nothing, so its return
    // probe finds no record either.
    if called_from_allocator(ctx) {
        return 0;
    }
    if kind == AllocKind::Mmap && out_ptr & MAP_ANONYMOUS == 0 {
        // File mappings are not heap; its return finds no record and does nothing.
        return 0;
    }
    count(counter::ALLOC_CALLS);

    if let Some(stash) = unsafe { WRAPPER_STASH.get(&tid) }.copied() {
        let _ = WRAPPER_STASH.remove(&tid);
        if nested_in(stash.sp, sp, WRAPPER_SP_WINDOW) {
            // operator new already decided whether this allocation is sampled.
            if stash.skip == 0 {
                record_call(tid, sp, size, old_ptr, out_ptr, stash.stack_id, stash.kind);
            }
            return 0;
        }
    }
    if old_ptr == 0 && !sampled(tid, size) {
        // Not sampled: no stack, no record. (A realloc is always followed, so that its old
        // block, if sampled, is retired.)
        return 0;
    }
    let pending =
        Pending { sp, bp: r.rbp, size, old_ptr, out_ptr, kind: kind as u32, wrapper: then::CALL, hash: 0 };
    to_capture(ctx, &pending);
    // Only reached if the tail call failed: record the call without a stack.
    count(counter::STACK_READ_ERROR);
    record_call(tid, sp, size, old_ptr, out_ptr, 0, kind as u32);
    0
}

/// Hands the entry to the `capture` program; returns only if the tail call failed.
#[inline(always)]
fn to_capture(ctx: &ProbeContext, pending: &Pending) {
    if PENDING.set(0, pending, 0).is_ok() {
        unsafe { CAPTURE_PROG.tail_call(ctx, 0) };
    }
}

/// Keeps an outermost allocation call's arguments until its return.
#[inline(always)]
fn record_call(tid: u32, sp: u64, size: u64, old_ptr: u64, out_ptr: u64, stack_id: u64, kind: u32) {
    let mut rec = InFlight {
        sp,
        size,
        old_ptr,
        out_ptr,
        stack_id,
        kind,
        depth: 0,
        old_block: LiveBlock::default(),
        old_known: 0,
        _pad: 0,
    };
    if old_ptr != 0 {
        // realloc: take the old block now, before libc can hand its address to another thread.
        if let Some(old) = take_live(old_ptr) {
            rec.old_block = old;
            rec.old_known = 1;
        }
    }
    if IN_FLIGHT.insert(&tid, &rec, BPF_ANY as u64).is_err() {
        count(counter::IN_FLIGHT_FULL);
        if rec.old_known != 0 {
            let _ = LIVE.insert(&live_key(old_ptr), &rec.old_block, BPF_ANY as u64);
        }
    }
}

/// Tail-called by every entry probe: walks the stack, then records the call (or, for C++
/// operator new, stashes the stack for the allocation inside it).
#[uprobe]
pub fn capture(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_tid() else { return 0 };
    let Some(p) = PENDING.get_ptr_mut(0) else { return 0 };
    let h = capture_stack(tid, unsafe { (*p).sp }, unsafe { (*p).bp });
    if PY_CONFIG.get(0).is_some_and(|c| c.flavor != py_flavor::NONE) {
        unsafe { (*p).hash = h };
        let _ = unsafe { CAPTURE_PROG.tail_call(&ctx, 1) };
        // Only reached if the tail call failed: the stack goes without its Python frames.
    } else if V8_CONFIG.get(0).is_some_and(|c| c.enabled != 0) {
        unsafe { (*p).hash = h };
        let _ = unsafe { CAPTURE_PROG.tail_call(&ctx, 2) };
        // Only reached if the tail call failed: the stack goes without its JavaScript frames.
    }
    let p = unsafe { *p };
    dispatch(tid, &p, store_stack(h));
    0
}

/// Tail-called by `capture` in a CPython target: adds the Python frames, then records.
#[uprobe]
pub fn capture_python(_ctx: ProbeContext) -> u32 {
    let Some(tid) = target_tid() else { return 0 };
    let Some(p) = PENDING.get(0).copied() else { return 0 };
    let Some(buf) = SCRATCH.get_ptr_mut(0) else { return 0 };
    let h = python_frames(unsafe { &mut *buf }, tid, p.hash);
    dispatch(tid, &p, store_stack(h));
    0
}

/// Tail-called by `capture` in a V8 target: adds the JavaScript frames, then records.
#[uprobe]
pub fn capture_v8(_ctx: ProbeContext) -> u32 {
    let Some(tid) = target_tid() else { return 0 };
    let Some(p) = PENDING.get(0).copied() else { return 0 };
    let h = js_frames(p.hash);
    dispatch(tid, &p, store_stack(h));
    0
}

/// State of the JavaScript frames' `bpf_loop`, on `capture_v8`'s stack.
#[repr(C)]
struct JsWalk {
    h: u64,
    /// Words written to `SCRATCH.runtime`.
    n: u64,
    end: u64,
}

/// Whether a V8 value is a heap object pointer (tag 01), not a Smi (tag 0).
#[inline(always)]
fn heap_object(v: u64) -> bool {
    v & 3 == 1
}

/// Native frame `i` of `SCRATCH`, if the walk followed it by frame pointer and it is a
/// JavaScript frame: its function's `SharedFunctionInfo` into `SCRATCH.runtime` (`bpf_loop`
/// callback; see `V8Config` and `js_frame`).
unsafe extern "C" fn js_frame_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let w = unsafe { &mut *(ctx as *mut JsWalk) };
    let (Some(cfg), Some(fps), Some(buf)) = (V8_CONFIG.get(0), FRAME_FPS.get(0), SCRATCH.get_ptr_mut(0))
    else {
        return 1;
    };
    let buf = unsafe { &mut *buf };
    let fp = fps[(i as usize) & (MAX_STACK_DEPTH - 1)];
    if fp == 0 {
        return 0;
    }
    let at = |off: i32| fp.wrapping_add(off as i64 as u64);
    // A typed frame (entry, exit, stub, builtin) has a frame-type Smi where a JavaScript
    // frame has its context.
    let Some(context) = read_u64(at(cfg.fp_context)) else { return 0 };
    if !heap_object(context) {
        return 0;
    }
    let Some(function) = read_u64(at(cfg.fp_function)).filter(|&f| heap_object(f)) else { return 0 };
    let Some(sfi) = read_u64(function - 1 + cfg.function_shared as u64).filter(|&s| heap_object(s)) else {
        return 0;
    };
    let n = w.n as usize;
    if n >= MAX_PY_DEPTH {
        w.end = py_end::MAX_DEPTH as u64;
        return 1;
    }
    let word = js_frame::pack(sfi, i);
    buf.runtime[n & (MAX_PY_DEPTH - 1)] = word;
    w.n += 1;
    w.h = (w.h ^ word).wrapping_mul(0x0000_0100_0000_01b3);
    0
}

/// Adds the JavaScript frames of the stack in `SCRATCH` (see [`js_frame_step`]); returns the
/// hash `h` extended with them.
#[inline(always)]
fn js_frames(h: u64) -> u64 {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else { return h };
    let buf = unsafe { &mut *buf };
    // The outermost frame was never stepped from: its slot is not set.
    let frames = (buf.depth as u64).saturating_sub(1).min(MAX_STACK_DEPTH as u64 - 1);
    let mut w = JsWalk { h, n: 0, end: py_end::COMPLETE as u64 };
    unsafe {
        bpf_loop(frames as u32, js_frame_step as *mut core::ffi::c_void, &mut w as *mut JsWalk as *mut _, 0)
    };
    buf.runtime_depth = w.n.min(MAX_PY_DEPTH as u64) as u32;
    buf.runtime_end = w.end as u32;
    w.h
}

/// What follows a captured stack: keep the call, stash it, or record the block.
#[inline(always)]
fn dispatch(tid: u32, p: &Pending, stack_id: u64) {
    match p.wrapper {
        then::STASH => {
            let stash = WrapperStash { sp: p.sp, stack_id, kind: p.kind, skip: 0 };
            if WRAPPER_STASH.insert(&tid, &stash, BPF_ANY as u64).is_err() {
                count(counter::IN_FLIGHT_FULL);
            }
        }
        then::RECORD => record_alloc(p.out_ptr, p.size, stack_id, p.kind),
        _ => record_call(tid, p.sp, p.size, p.old_ptr, p.out_ptr, stack_id, p.kind),
    }
}

fn finish_free(addr: u64) {
    match take_live(addr) {
        Some(block) => {
            let site = account_free(&block);
            note_free(addr, Some((&block, site)));
        }
        None => {
            count(counter::UNKNOWN_FREE);
            note_free(addr, None);
        }
    }
}

#[uretprobe]
pub fn alloc_exit(ctx: RetProbeContext) -> u32 {
    let Some(tid) = target_tid() else { return 0 };
    let Some(f) = IN_FLIGHT.get_ptr_mut(&tid) else { return 0 };
    let f = unsafe { &mut *f };
    if f.depth > 0 {
        f.depth -= 1;
        return 0;
    }
    let rec = *f;
    let _ = IN_FLIGHT.remove(&tid);
    let ret: u64 = ctx.ret();

    match AllocKind::from_u32(rec.kind) {
        Some(AllocKind::Realloc | AllocKind::Reallocarray | AllocKind::Rallocx) => {
            if ret != 0 || (rec.size == 0 && rec.old_ptr != 0) {
                // Success, or glibc's realloc(p, 0), which frees p and returns NULL.
                free_realloc_old(&rec);
                if ret != 0 {
                    record_alloc(ret, rec.size, rec.stack_id, rec.kind);
                }
            } else {
                count(counter::FAILED_ALLOCS);
                if rec.old_known != 0 {
                    let _ = LIVE.insert(&live_key(rec.old_ptr), &rec.old_block, BPF_ANY as u64);
                }
            }
        }
        Some(AllocKind::PosixMemalign) => {
            if ret as u32 == 0 {
                match unsafe { bpf_probe_read_user(rec.out_ptr as *const u64) } {
                    Ok(addr) if addr != 0 => record_alloc(addr, rec.size, rec.stack_id, rec.kind),
                    _ => count(counter::FAILED_ALLOCS),
                }
            } else {
                count(counter::FAILED_ALLOCS);
            }
        }
        Some(AllocKind::Mmap) => {
            // MAP_FAILED is -1; errors come back as small negative numbers.
            if (ret as i64) < 0 && (ret as i64) > -4096 {
                count(counter::FAILED_ALLOCS);
            } else {
                record_alloc(ret, rec.size, rec.stack_id, rec.kind);
            }
        }
        Some(_) => {
            if ret != 0 {
                record_alloc(ret, rec.size, rec.stack_id, rec.kind);
            } else {
                count(counter::FAILED_ALLOCS);
            }
        }
        None => {}
    }
    0
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

#[uprobe]
pub fn malloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::Malloc, arg(&ctx, 0), 0, 0)
}

#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    let size = arg(&ctx, 0).wrapping_mul(arg(&ctx, 1));
    enter(&ctx, AllocKind::Calloc, size, 0, 0)
}

#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::Realloc, arg(&ctx, 1), arg(&ctx, 0), 0)
}

#[uprobe]
pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
    let size = arg(&ctx, 1).wrapping_mul(arg(&ctx, 2));
    enter(&ctx, AllocKind::Reallocarray, size, arg(&ctx, 0), 0)
}

#[uprobe]
pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::PosixMemalign, arg(&ctx, 2), 0, arg(&ctx, 0))
}

#[uprobe]
pub fn aligned_alloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::AlignedAlloc, arg(&ctx, 1), 0, 0)
}

#[uprobe]
pub fn memalign_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::Memalign, arg(&ctx, 1), 0, 0)
}

#[uprobe]
pub fn valloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::Valloc, arg(&ctx, 0), 0, 0)
}

#[uprobe]
pub fn pvalloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::Pvalloc, arg(&ctx, 0), 0, 0)
}

/// mmap(addr, len, prot, flags, fd, off): only anonymous mappings are tracked. `flags` travels
/// in the out_ptr slot, which mmap does not otherwise use.
#[uprobe]
pub fn mmap_enter(ctx: ProbeContext) -> u32 {
    if target_tid().is_none() {
        return 0;
    }
    if called_from_py_arena(&ctx) {
        count(counter::PY_ARENA_MMAPS);
        return 0;
    }
    enter(&ctx, AllocKind::Mmap, arg(&ctx, 1), 0, arg(&ctx, 3))
}

/// True when mmap was called by pymalloc's arena allocator, once the objects inside arenas
/// are tracked (the daemon sets the range only then).
#[inline(always)]
fn called_from_py_arena(ctx: &ProbeContext) -> bool {
    let Some(cfg) = PY_CONFIG.get(0) else { return false };
    if cfg.arena_alloc_start == 0 {
        return false;
    }
    match unsafe { bpf_probe_read_user(regs(ctx).rsp as *const u64) } {
        Ok(ret) => ret >= cfg.arena_alloc_start && ret < cfg.arena_alloc_end,
        Err(_) => false,
    }
}

/// jemalloc's mallocx(size, flags).
#[uprobe]
pub fn mallocx_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::Mallocx, arg(&ctx, 0), 0, 0)
}

/// jemalloc's rallocx(ptr, size, flags): realloc semantics (ptr is never NULL).
#[uprobe]
pub fn rallocx_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::Rallocx, arg(&ctx, 1), arg(&ctx, 0), 0)
}

/// operator new defined by the allocator itself (jemalloc, tcmalloc, mimalloc): it allocates
/// through internal paths, not through the exported malloc, so it is an allocation of its own.
#[uprobe]
pub fn new_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::OperatorNew, arg(&ctx, 0), 0, 0)
}

#[uprobe]
pub fn new_array_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::OperatorNewArray, arg(&ctx, 0), 0, 0)
}

/// An allocation function the target's calls do not bind to (shadowed by another allocator):
/// counted, so that allocations leakprobe cannot see never pass silently.
#[uprobe]
pub fn untracked_enter(_ctx: ProbeContext) -> u32 {
    if target_tid().is_some() {
        count(counter::UNTRACKED_ALLOCATOR_CALLS);
    }
    0
}

/// `run --scan`: at exit(), before any atexit handler or destructor runs, the whole process
/// is stopped (SIGSTOP) so that leakprobe can scan its memory; leakprobe continues it.
#[uprobe]
pub fn exit_stop(_ctx: ProbeContext) -> u32 {
    if target_tid().is_none() {
        return 0;
    }
    count(counter::EXIT_STOPS);
    // SAFETY: a helper call with a plain signal number; it signals the current process.
    unsafe {
        aya_ebpf::helpers::bpf_send_signal(19 /* SIGSTOP */)
    };
    0
}

#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_tid() else { return 0 };
    if called_from_allocator(&ctx) {
        return 0;
    }
    let addr = arg(&ctx, 0);
    if addr == 0 {
        return 0;
    }
    // free inside realloc(p, 0) belongs to realloc, which accounts for it.
    if outer_call(tid, regs(&ctx).rsp).is_some() {
        return 0;
    }
    count(counter::FREE_CALLS);
    finish_free(addr);
    0
}

#[uprobe]
pub fn munmap_enter(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_tid() else { return 0 };
    if called_from_allocator(&ctx) {
        return 0;
    }
    let addr = arg(&ctx, 0);
    // munmap inside free() of a large block belongs to malloc's own bookkeeping.
    if outer_call(tid, regs(&ctx).rsp).is_some() {
        return 0;
    }
    match take_live(addr) {
        Some(block) if block.kind == AllocKind::Mmap as u32 => {
            let _ = account_free(&block);
        }
        Some(block) => {
            // Not a mapping we recorded; put it back untouched.
            let _ = LIVE.insert(&live_key(addr), &block, BPF_ANY as u64);
            count(counter::UNKNOWN_MUNMAP);
        }
        None => count(counter::UNKNOWN_MUNMAP),
    }
    0
}

/// C++ operator new allocates through malloc from libstdc++, which has no frame pointers.
/// Its entry is where the caller's stack is whole, so take it here and let the malloc inside
/// use it.
fn wrapper_enter(ctx: &ProbeContext, kind: AllocKind) -> u32 {
    let Some(tid) = target_tid() else { return 0 };
    if called_from_allocator(ctx) {
        return 0;
    }
    let r = regs(ctx);
    if outer_call(tid, r.rsp).is_some() {
        return 0;
    }
    // operator new[] calls operator new: the outermost wrapper holds the caller's stack.
    if let Some(outer) = unsafe { WRAPPER_STASH.get(&tid) } {
        if nested_in(outer.sp, r.rsp, WRAPPER_SP_WINDOW) {
            return 0;
        }
    }
    let pending = Pending {
        sp: r.rsp,
        bp: r.rbp,
        size: 0,
        old_ptr: 0,
        out_ptr: 0,
        kind: kind as u32,
        wrapper: then::STASH,
        hash: 0,
    };
    to_capture(ctx, &pending);
    count(counter::STACK_READ_ERROR);
    0
}

#[uprobe]
pub fn cxx_new_enter(ctx: ProbeContext) -> u32 {
    wrapper_enter(&ctx, AllocKind::OperatorNew)
}

#[uprobe]
pub fn cxx_new_array_enter(ctx: ProbeContext) -> u32 {
    wrapper_enter(&ctx, AllocKind::OperatorNewArray)
}

/// In-process mode: true when the direct caller (the return address at entry) is the
/// allocator's own code or the stub. Such a call is the inner part of a call the stub
/// reports (mimalloc's posix_memalign calls mi_malloc_aligned; malloc maps large chunks),
/// so counting it again would count one block twice. Without the stub the ranges are 0.
#[inline(always)]
fn called_from_allocator(ctx: &ProbeContext) -> bool {
    let start = unsafe { read_volatile(&raw const ALLOCATOR_TEXT_START) };
    if start == 0 {
        return false;
    }
    let end = unsafe { read_volatile(&raw const ALLOCATOR_TEXT_END) };
    let (stub_start, stub_end) =
        unsafe { (read_volatile(&raw const STUB_TEXT_START), read_volatile(&raw const STUB_TEXT_END)) };
    match unsafe { bpf_probe_read_user(regs(ctx).rsp as *const u64) } {
        Ok(ret) => (ret >= start && ret < end) || (ret >= stub_start && ret < stub_end),
        Err(_) => false,
    }
}

// In-process report sites: 5-byte NOPs in the stub the daemon placed in the target (see
// leakprobe/src/inprocess/stub.rs for their register ABI). The stub already decided what is
// sampled, so these record every report; weights still follow SAMPLE_BYTES.

/// A block came back from the real allocation function: rdi = block (0: failed), rsi = size,
/// rdx = kind; rsp is at the caller's return address, as at the function's entry.
#[uprobe]
pub fn site_alloc(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_tid() else { return 0 };
    let r = regs(&ctx);
    let (ptr, size, kind, sp) = (r.rdi, r.rsi, r.rdx as u32, r.rsp);
    count(counter::ALLOC_CALLS);
    if kind == AllocKind::Realloc as u32 || kind == AllocKind::Reallocarray as u32 {
        // The old block, taken at this same call's realloc_old site (same rsp).
        if let Some(rec) = unsafe { SITE_OLD.get(&tid) }.copied() {
            if rec.sp == sp {
                let _ = SITE_OLD.remove(&tid);
                if ptr != 0 || size == 0 {
                    free_realloc_old(&rec);
                } else {
                    // Failed: the old block is still the caller's.
                    count(counter::FAILED_ALLOCS);
                    if rec.old_known != 0 {
                        let _ = LIVE.insert(&live_key(rec.old_ptr), &rec.old_block, BPF_ANY as u64);
                    }
                    return 0;
                }
            }
        }
    }
    if ptr == 0 {
        if size != 0 {
            count(counter::FAILED_ALLOCS);
        }
        return 0;
    }
    let pending =
        Pending { sp, bp: r.rbp, size, old_ptr: 0, out_ptr: ptr, kind, wrapper: then::RECORD, hash: 0 };
    to_capture(&ctx, &pending);
    count(counter::STACK_READ_ERROR);
    record_alloc(ptr, size, 0, kind);
    0
}

/// A block is about to be freed: rdi = block.
#[uprobe]
pub fn site_free(ctx: ProbeContext) -> u32 {
    if target_tid().is_none() {
        return 0;
    }
    count(counter::FREE_CALLS);
    finish_free(regs(&ctx).rdi);
    0
}

/// realloc is about to run on a tracked block: rdi = the old block. Taken out of LIVE now,
/// before the real realloc can hand its address to another thread.
#[uprobe]
pub fn site_realloc_old(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_tid() else { return 0 };
    let r = regs(&ctx);
    let mut rec = InFlight { sp: r.rsp, old_ptr: r.rdi, ..InFlight::default() };
    if let Some(old) = take_live(r.rdi) {
        rec.old_block = old;
        rec.old_known = 1;
    }
    if SITE_OLD.insert(&tid, &rec, BPF_ANY as u64).is_err() {
        count(counter::IN_FLIGHT_FULL);
        if rec.old_known != 0 {
            let _ = LIVE.insert(&live_key(rec.old_ptr), &rec.old_block, BPF_ANY as u64);
        }
    }
    0
}

/// `--noop`: the cost floor of a naive tracer, the same hooks with programs that do nothing.
#[uprobe]
pub fn noop_enter(_ctx: ProbeContext) -> u32 {
    0
}

#[uretprobe]
pub fn noop_exit(_ctx: RetProbeContext) -> u32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
