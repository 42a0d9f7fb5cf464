//! The one source of truth for what leakprobe's eBPF programs and its daemon share: map value
//! layouts, map names, counter indices and allocation kinds.
//!
//! Every struct is `#[repr(C)]` with explicit padding, so both sides agree byte for byte.
#![no_std]

/// Frames captured per allocation stack. Deeper stacks are cut here and counted as truncated.
pub const MAX_STACK_DEPTH: usize = 64;

/// Map names, as the daemon looks them up in the loaded object.
pub mod maps {
    pub const IN_FLIGHT: &str = "IN_FLIGHT";
    pub const SITE_OLD: &str = "SITE_OLD";
    pub const WRAPPER_STASH: &str = "WRAPPER_STASH";
    pub const LIVE: &str = "LIVE";
    pub const STACKS: &str = "STACKS";
    pub const SITES: &str = "SITES";
    pub const HEAP: &str = "HEAP";
    pub const COUNTERS: &str = "COUNTERS";
    pub const SCRATCH: &str = "SCRATCH";
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    pub const CAPTURE_PROG: &str = "CAPTURE_PROG";
    /// The traced processes by tgid ([`TargetState`]); every program returns at once for any
    /// other process.
    pub const TARGETS: &str = "TARGETS";
    /// Ring of [`ForkEvent`]s: a followed process forked a child, which is now in `TARGETS`.
    pub const FORKS: &str = "FORKS";
    pub const SAMPLE_LEFT: &str = "SAMPLE_LEFT";
    pub const EXP_TABLE: &str = "EXP_TABLE";
    pub const WEIGHT_TABLE: &str = "WEIGHT_TABLE";
    pub const UNWIND_MODULES: &str = "UNWIND_MODULES";
    /// Entry 0: bumped before and after each change of `UNWIND_MODULES`, so the walker's
    /// per-CPU cache of rows by return address drops what it learnt before.
    pub const UNWIND_GEN: &str = "UNWIND_GEN";
    pub const SCAN_FROM: &str = "SCAN_FROM";
    pub const FREED_SINCE: &str = "FREED_SINCE";
    pub const PY_CONFIG: &str = "PY_CONFIG";
    pub const V8_CONFIG: &str = "V8_CONFIG";
}

/// Globals the daemon sets before load.
pub mod globals {
    /// Offsets of `task_struct.pid` and `.tgid` (from the kernel's BTF): the fork
    /// tracepoint reads the child's ids with them.
    pub const TASK_PID: &str = "TASK_PID";
    pub const TASK_TGID: &str = "TASK_TGID";
    /// Frames to capture per stack (at most MAX_STACK_DEPTH).
    pub const MAX_DEPTH: &str = "MAX_DEPTH";
    /// Mean bytes between samples; 0 tracks every allocation.
    pub const SAMPLE_BYTES: &str = "SAMPLE_BYTES";
    /// In-process mode: the allocator module's code range; mmap/munmap called from inside it
    /// are its own bookkeeping, not allocations (0, 0: off).
    pub const ALLOCATOR_TEXT_START: &str = "ALLOCATOR_TEXT_START";
    pub const ALLOCATOR_TEXT_END: &str = "ALLOCATOR_TEXT_END";
    /// In-process mode: the stub's code; a call returning into it was tail-called by a real
    /// allocation function and is part of the call the stub reports.
    pub const STUB_TEXT_START: &str = "STUB_TEXT_START";
    pub const STUB_TEXT_END: &str = "STUB_TEXT_END";
    /// Offsets of `vm_area_struct.vm_start` and `.vm_end` (from the kernel's BTF): the
    /// walker learns where a thread's stack ends, and never reads past it.
    pub const VMA_START: &str = "VMA_START";
    pub const VMA_END: &str = "VMA_END";
}

/// Counts in `SiteCounters` and `LiveBlock::weight_count` are in units of 1/COUNT_SCALE, so
/// a sampled block can stand for a fractional number of allocations. In full tracking every
/// block weighs exactly COUNT_SCALE.
pub const COUNT_SCALE: u64 = 1024;

/// Sampling tables, filled by the daemon when sampling.
pub mod sampling {
    /// Entries of `EXP_TABLE`: quantiles of an exponential distribution with mean SAMPLE_BYTES,
    /// picked at random for each new countdown.
    pub const EXP_ENTRIES: u32 = 1024;
    /// Entries of `WEIGHT_TABLE`: f(x) = x / (1 - e^-x) * 65536 at x = (i + 0.5) / 256, where
    /// x = size / SAMPLE_BYTES. A sampled block of `size` bytes stands for SAMPLE_BYTES * f(x)
    /// bytes (the unbiased estimate); above the table, f(x) = x.
    pub const WEIGHT_ENTRIES: u32 = 4096;
    pub const WEIGHT_STEPS_PER_UNIT: u64 = 256;
    pub const WEIGHT_ONE: u64 = 65536;
}

/// Unwind table capacity: executable mappings of one address-space layout described at once.
pub const MAX_UNWIND_MODULES: u32 = 128;

/// Address-space layouts described at once. Processes forked from one another share their
/// parent's layout (the same modules at the same addresses); each process started on its own
/// has its own (ASLR). Layout `l` owns `UNWIND_MODULES[l * MAX_UNWIND_MODULES ..]`.
pub const MAX_LAYOUTS: u32 = 64;

/// One traced process (a `TARGETS` entry, keyed by tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetState {
    /// Its module table: an index below [`MAX_LAYOUTS`].
    pub layout: u32,
    /// [`target_flag`] bits.
    pub flags: u32,
    /// `bpf_ktime_get_ns()` when the fork tracepoint added it (0: added by the daemon).
    pub forked_ns: u64,
    /// What this process holds now and the most it held (weighted as [`SiteCounters`]).
    pub heap: HeapTotal,
    /// Blocks of this process that could not be recorded (a kernel map was full).
    pub drops: u64,
}

/// Bits of [`TargetState::flags`].
pub mod target_flag {
    /// The process called exec: nothing more is recorded for it, so the old image's figures
    /// are never mixed with the new one's.
    pub const EXECED: u32 = 1;
    /// Its children are followed: the fork tracepoint adds each new process it forks, with the
    /// same flags and layout, and reports it in `FORKS`.
    pub const FOLLOW: u32 = 2;
}

/// A followed process forked: `child` is in `TARGETS` from its first instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkEvent {
    pub parent: u32,
    pub child: u32,
    pub ns: u64,
}

/// A `LIVE` key: forked processes hand out the same addresses, so the process is part of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LiveKey {
    pub addr: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// How a row computes the canonical frame address (CFA).
pub mod cfa {
    /// No frame above: the outermost frame (return address undefined), or no rule we can
    /// evaluate. The walk ends here.
    pub const END: u8 = 0;
    /// CFA = rsp + offset.
    pub const RSP: u8 = 1;
    /// CFA = rbp + offset.
    pub const RBP: u8 = 2;
    /// Between functions: no FDE covers this pc (code without unwind information).
    pub const GAP: u8 = 3;
}

/// How a row recovers the caller's rbp.
pub mod rbp_rule {
    /// rbp is unchanged in the caller.
    pub const SAME: u8 = 0;
    /// The caller's rbp is saved at CFA + offset.
    pub const AT_CFA_OFFSET: u8 = 1;
    /// The caller's rbp cannot be recovered (we carry on without it).
    pub const UNDEFINED: u8 = 2;
}

/// One row of a module's unwind table, from `.eh_frame`: valid from `pc` (an ELF virtual
/// address of the module) to the next row's `pc`. The return address is always at CFA - 8
/// on x86_64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    pub pc: u64,
    pub cfa_offset: i32,
    pub rbp_offset: i16,
    pub cfa_reg: u8,
    pub rbp_rule: u8,
}

/// One executable mapping of the target and where its rows are in `UNWIND_ROWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindModule {
    pub start: u64,
    pub end: u64,
    /// ELF virtual address = runtime address - bias.
    pub bias: u64,
    pub row_start: u32,
    /// 0: no unwind information (fall back to frame pointers).
    pub row_count: u32,
}

/// Which allocation function produced a block. Part of a call site's identity.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AllocKind {
    Malloc = 1,
    Calloc = 2,
    Realloc = 3,
    Reallocarray = 4,
    PosixMemalign = 5,
    AlignedAlloc = 6,
    Memalign = 7,
    Valloc = 8,
    Pvalloc = 9,
    Mmap = 10,
    /// C++ `operator new` (libstdc++/libc++), which allocates through malloc.
    OperatorNew = 11,
    /// C++ `operator new[]`.
    OperatorNewArray = 12,
    /// jemalloc's `mallocx(size, flags)` (also `je_`/`_rjem_` prefixed).
    Mallocx = 13,
    /// jemalloc's `rallocx(ptr, size, flags)`: a realloc that keeps the old block on failure.
    Rallocx = 14,
    /// A block pymalloc served (CPython's `PyObject_Malloc`/`PyMem_Malloc` family, through
    /// its allocator tables).
    PyMem = 15,
    /// An object in V8's JavaScript heap, from V8's own sampling heap profiler (`--js-heap`):
    /// bump-allocated by JIT code, with no call to hook. Counted by user space, not by probes.
    JsHeap = 16,
}

impl AllocKind {
    pub const ALL: [AllocKind; 16] = [
        AllocKind::Malloc,
        AllocKind::Calloc,
        AllocKind::Realloc,
        AllocKind::Reallocarray,
        AllocKind::PosixMemalign,
        AllocKind::AlignedAlloc,
        AllocKind::Memalign,
        AllocKind::Valloc,
        AllocKind::Pvalloc,
        AllocKind::Mmap,
        AllocKind::OperatorNew,
        AllocKind::OperatorNewArray,
        AllocKind::Mallocx,
        AllocKind::Rallocx,
        AllocKind::PyMem,
        AllocKind::JsHeap,
    ];

    pub const fn from_u32(v: u32) -> Option<AllocKind> {
        match v {
            1 => Some(AllocKind::Malloc),
            2 => Some(AllocKind::Calloc),
            3 => Some(AllocKind::Realloc),
            4 => Some(AllocKind::Reallocarray),
            5 => Some(AllocKind::PosixMemalign),
            6 => Some(AllocKind::AlignedAlloc),
            7 => Some(AllocKind::Memalign),
            8 => Some(AllocKind::Valloc),
            9 => Some(AllocKind::Pvalloc),
            10 => Some(AllocKind::Mmap),
            11 => Some(AllocKind::OperatorNew),
            12 => Some(AllocKind::OperatorNewArray),
            13 => Some(AllocKind::Mallocx),
            14 => Some(AllocKind::Rallocx),
            15 => Some(AllocKind::PyMem),
            16 => Some(AllocKind::JsHeap),
            _ => None,
        }
    }

    /// The libc function name, as users know it.
    pub const fn name(self) -> &'static str {
        match self {
            AllocKind::Malloc => "malloc",
            AllocKind::Calloc => "calloc",
            AllocKind::Realloc => "realloc",
            AllocKind::Reallocarray => "reallocarray",
            AllocKind::PosixMemalign => "posix_memalign",
            AllocKind::AlignedAlloc => "aligned_alloc",
            AllocKind::Memalign => "memalign",
            AllocKind::Valloc => "valloc",
            AllocKind::Pvalloc => "pvalloc",
            AllocKind::Mmap => "mmap",
            AllocKind::OperatorNew => "operator new",
            AllocKind::OperatorNewArray => "operator new[]",
            AllocKind::Mallocx => "mallocx",
            AllocKind::Rallocx => "rallocx",
            AllocKind::PyMem => "pymalloc",
            AllocKind::JsHeap => "js-heap",
        }
    }
}

/// Indices into the per-CPU `COUNTERS` array. Drops first, then plain activity counts.
pub mod counter {
    /// A new block could not be recorded: the live-block map was full.
    pub const LIVE_MAP_FULL: u32 = 0;
    /// A stack could not be stored: the stack map was full.
    pub const STACK_MAP_FULL: u32 = 1;
    /// A call site's totals could not be created: the site map was full.
    pub const SITE_MAP_FULL: u32 = 2;
    /// An entry's arguments could not be kept until its return: the in-flight map was full.
    pub const IN_FLIGHT_FULL: u32 = 3;
    /// An entry probe ran but its return probe never did (longjmp, a thread killed mid-call).
    pub const MISSED_RETURN: u32 = 4;
    /// An address was handed out again while still recorded as live: its free was missed.
    pub const MISSED_FREE: u32 = 5;
    /// Reading the user stack failed part way.
    pub const STACK_READ_ERROR: u32 = 6;
    /// A free of an address never seen allocated (allocated before attach, or untracked).
    pub const UNKNOWN_FREE: u32 = 7;
    /// A stack reached MAX_STACK_DEPTH and was cut.
    pub const STACK_TRUNCATED: u32 = 8;
    /// An munmap of a region not recorded as an anonymous mapping.
    pub const UNKNOWN_MUNMAP: u32 = 9;
    /// Allocation calls seen (outermost only, successful or not).
    pub const ALLOC_CALLS: u32 = 10;
    /// Free calls seen (non-NULL, outermost only).
    pub const FREE_CALLS: u32 = 11;
    /// Allocations that returned NULL / failed.
    pub const FAILED_ALLOCS: u32 = 12;
    /// Stacks that ended at a frame without unwind information (JIT, stripped, unknown).
    pub const STACK_NO_UNWIND_INFO: u32 = 13;
    /// Allocations passed over by sampling (`--sample-bytes`).
    pub const UNSAMPLED_ALLOCS: u32 = 14;
    /// Calls into an allocation function that the target's own calls do not bind to (glibc's
    /// malloc shadowed by jemalloc, say): whatever it allocates is not tracked.
    pub const UNTRACKED_ALLOCATOR_CALLS: u32 = 15;
    /// `run --scan`: the target called exit() and was stopped there (SIGSTOP) for the scan.
    pub const EXIT_STOPS: u32 = 16;
    /// A scan's window was open and a block live at its start was freed, but the map that
    /// keeps such blocks for the scan was full: that block is missing from the scan.
    pub const SCAN_FREES_LOST: u32 = 17;
    /// pymalloc's arena mmaps passed over: the objects in them are tracked one by one.
    pub const PY_ARENA_MMAPS: u32 = 18;
    /// A followed process forked a child that could not be added: `TARGETS` was full
    /// (`--max-processes`). The child runs untraced.
    pub const PROCESSES_DROPPED: u32 = 19;
    /// A fork event could not be queued for the daemon (its ring was full): the child is
    /// traced, but the daemon learns of it only at its next look at `TARGETS`.
    pub const FORK_EVENTS_LOST: u32 = 20;
    pub const COUNT: u32 = 21;
}

/// Arguments of an allocation call kept from entry to return, per thread id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InFlight {
    /// Stack pointer at entry: tells a stale record (missed return) from a nested call.
    pub sp: u64,
    /// Requested bytes.
    pub size: u64,
    /// realloc's old pointer.
    pub old_ptr: u64,
    /// posix_memalign's `void **memptr`.
    pub out_ptr: u64,
    pub stack_id: u64,
    pub kind: u32,
    /// Nested allocation calls (realloc(NULL) calling malloc inside libc) seen since entry.
    pub depth: u32,
    /// realloc's old block, taken out of the live map at entry (so no other thread can reuse
    /// its address under us) and put back if realloc fails. `old_known` is 0 when the old
    /// block was never seen (allocated before attach).
    pub old_block: LiveBlock,
    pub old_known: u32,
    pub _pad: u32,
}

/// A stack captured at a wrapper's entry (C++ operator new), used by the allocation inside it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WrapperStash {
    pub sp: u64,
    pub stack_id: u64,
    /// The wrapper's AllocKind, which replaces the inner call's kind.
    pub kind: u32,
    /// Non-zero when sampling passed over this call: the allocation inside is not tracked.
    pub skip: u32,
}

/// One outstanding block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LiveBlock {
    pub size: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at allocation.
    pub timestamp_ns: u64,
    pub stack_id: u64,
    /// Bytes this block stands for: `size` in full tracking, the unbiased estimate when sampled.
    pub weight_bytes: u64,
    /// Allocations it stands for, in 1/COUNT_SCALE units.
    pub weight_count: u64,
    pub kind: u32,
    /// The process that allocated it.
    pub tgid: u32,
}

/// A block taken out of `LIVE` while a scan's window was open (`SCAN_FROM` non-zero), keyed
/// by its address and allocation time (an address can be freed, reused and freed again in
/// one window): the scan's snapshot may still hold it, so the scan puts it back into its
/// picture of what was live at the instant the target stopped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FreedKey {
    pub addr: u64,
    pub timestamp_ns: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// See [`FreedKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FreedBlock {
    pub block: LiveBlock,
    /// `bpf_ktime_get_ns()` when it left `LIVE`.
    pub freed_ns: u64,
}

/// Why a stack walk ended early (`Stack::truncated`).
pub mod stack_end {
    /// Complete: reached the outermost frame, or the walk found nothing more.
    pub const COMPLETE: u32 = 0;
    /// Cut at the maximum depth.
    pub const MAX_DEPTH: u32 = 1;
    /// The last frame's module has no unwind information and no frame pointer to follow.
    pub const NO_UNWIND_INFO: u32 = 2;
}

/// Cumulative totals for one call site (one stack id). Outstanding = alloc - free. Counts are
/// in 1/COUNT_SCALE units and bytes are weighted (estimates when sampling).
/// 64-bit counters updated with atomic adds: they do not wrap in any realistic run.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteCounters {
    pub alloc_count: u64,
    pub alloc_bytes: u64,
    pub free_count: u64,
    pub free_bytes: u64,
    /// The most the site held at once (bytes, and separately blocks), raised at each
    /// allocation: exact in full tracking, the high-water mark of the estimate when sampled.
    pub peak_bytes: u64,
    pub peak_count: u64,
    /// Allocations freed by their thread before it made another allocation or free call
    /// (heaptrack's "temporary", per thread). Full tracking only.
    pub temporary_count: u64,
}

/// The whole tracked heap (one entry of `HEAP`): what is outstanding now, the most it ever
/// was, and when (`bpf_ktime_get_ns`). Bytes and counts weighted as in [`SiteCounters`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapTotal {
    pub bytes: u64,
    pub count: u64,
    pub peak_bytes: u64,
    pub peak_count: u64,
    pub peak_at_ns: u64,
}

/// A call site: a stack and the function that allocated there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteKey {
    pub stack_id: u64,
    pub kind: u32,
    /// The process: the same stack in two processes is two sites (merged in user space).
    pub tgid: u32,
}

/// A captured user stack, innermost first. `ips[0]` is the return address into the caller
/// of the allocation function.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Stack {
    pub ips: [u64; MAX_STACK_DEPTH],
    pub depth: u32,
    /// Why the walk stopped early, if it did: one of the `stack_end` values.
    pub truncated: u32,
    /// The interpreter's frames, innermost first: in a CPython target [`py_frame`] words, in
    /// a V8 target [`js_frame`] words.
    pub runtime: [u64; MAX_PY_DEPTH],
    /// Words used in `runtime`.
    pub runtime_depth: u32,
    /// Why the interpreter's walk stopped early: one of the `py_end` values.
    pub runtime_end: u32,
}

/// The most Python frames kept per stack.
pub const MAX_PY_DEPTH: usize = 32;

/// One Python frame in [`Stack::py`]: the code object's address, the position in its
/// bytecode, and whether a new C-level evaluation loop (`_PyEval_EvalFrameDefault`) entered
/// this frame (so the native frames between it and the next one outward belong here).
pub mod py_frame {
    /// Set on a frame that a C call of the evaluation loop entered.
    pub const ENTRY: u64 = 1 << 63;
    pub const POS_SHIFT: u32 = 47;
    /// The position, clamped: `f_lasti` (3.9: bytes; 3.10: instructions) or, from 3.11, the
    /// code unit index of `prev_instr` (3.11, 3.12) or `instr_ptr` (3.13).
    pub const POS_MASK: u64 = 0xffff;
    pub const ADDR_MASK: u64 = (1 << 47) - 1;

    pub const fn pack(code: u64, pos: u64, entry: bool) -> u64 {
        let pos = if pos > POS_MASK { POS_MASK } else { pos };
        (code & ADDR_MASK) | (pos << POS_SHIFT) | if entry { ENTRY } else { 0 }
    }

    pub const fn code(w: u64) -> u64 {
        w & ADDR_MASK
    }

    pub const fn pos(w: u64) -> u64 {
        (w >> POS_SHIFT) & POS_MASK
    }

    pub const fn entry(w: u64) -> bool {
        w & ENTRY != 0
    }
}

/// Why a Python walk ended.
pub mod py_end {
    /// At the outermost frame, or no Python runtime.
    pub const COMPLETE: u32 = 0;
    /// More frames than [`super::MAX_PY_DEPTH`].
    pub const MAX_DEPTH: u32 = 1;
    /// The thread has no Python thread state (not a Python thread, or not found).
    pub const NO_THREAD: u32 = 2;
    /// A frame or code object could not be read, or was not a code object.
    pub const BAD_FRAME: u32 = 3;
}

/// How the kernel side finds and walks the Python frames of the allocating thread, from the
/// CPython runtime the daemon recognised. Offsets are in bytes. `flavor` 0 turns it off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyConfig {
    /// One of the [`py_flavor`] values.
    pub flavor: u32,
    /// Python frames to walk at most (up to [`MAX_PY_DEPTH`]).
    pub max_frames: u32,
    /// Absolute address of `_PyRuntime.interpreters.head` (a pointer to read).
    pub interp_head_ptr: u64,
    /// `&PyCode_Type`: a frame whose code object has another type is not taken.
    pub code_type: u64,
    /// `PyInterpreterState.threads.head`.
    pub interp_threads_head: u64,
    /// `PyThreadState.next`.
    pub tstate_next: u64,
    /// `PyThreadState.native_thread_id` (the kernel tid).
    pub tstate_native_thread_id: u64,
    /// `PyThreadState.frame` (3.9, 3.10), `.cframe` (3.11, 3.12) or `.current_frame` (3.13).
    pub tstate_frame: u64,
    /// `_PyCFrame.current_frame` (3.11, 3.12).
    pub cframe_current_frame: u64,
    /// The frame's code: `f_code` (to 3.12) or `f_executable` (3.13).
    pub frame_code: u64,
    /// `f_back` (3.9, 3.10) or `previous`.
    pub frame_back: u64,
    /// `f_lasti` (an int, 3.9, 3.10), `prev_instr` (3.11, 3.12) or `instr_ptr` (3.13).
    pub frame_instr: u64,
    /// `is_entry` (3.11, a bool) or `owner` (3.12+, a char; 3 = owned by the C stack).
    pub frame_entry: u64,
    /// `offsetof(PyCodeObject, co_code_adaptive)` (3.11+): the bytecode's start.
    pub code_adaptive: u64,
    /// 3.9 and 3.10 have no `native_thread_id`: the field at `tstate_native_thread_id` is
    /// `thread_id`, `pthread_self()`, which is the thread's FS base. Then this is the offset
    /// of `thread.fsbase` in the kernel's `task_struct` (from its BTF), and the walk matches
    /// on it; 0: match the kernel tid.
    pub task_fsbase: u64,
    /// pymalloc's arena allocator's code `[start, end)`, set once the allocator tables lead
    /// into the stub: an mmap returning there is an arena, whose objects are tracked one by
    /// one, not an allocation of its own. 0, 0: none.
    pub arena_alloc_start: u64,
    pub arena_alloc_end: u64,
}

/// How a CPython version keeps its frames.
pub mod py_flavor {
    pub const NONE: u32 = 0;
    /// 3.9 and 3.10: `PyFrameObject`s linked by `f_back`; every frame is an entry.
    pub const FRAME_OBJECT: u32 = 1;
    /// 3.11: `_PyInterpreterFrame`s from `tstate->cframe->current_frame`, `is_entry`.
    pub const CFRAME_311: u32 = 2;
    /// 3.12: as 3.11, with `owner == 3` shim frames marking the entries.
    pub const CFRAME_312: u32 = 3;
    /// 3.13: `tstate->current_frame`, `f_executable`, `instr_ptr`, `owner == 3` shims.
    pub const CURRENT_313: u32 = 4;
}

/// One JavaScript frame in [`Stack::runtime`]: the frame's `SharedFunctionInfo` (a tagged
/// pointer; old-space objects that rarely move, unlike the `JSFunction` a closure is) and the
/// index in [`Stack::ips`] of the native frame it stands for (the JIT code's or the
/// interpreter trampoline's return address).
pub mod js_frame {
    pub const INDEX_SHIFT: u32 = 47;
    pub const INDEX_MASK: u64 = 0x7f;
    pub const ADDR_MASK: u64 = (1 << 47) - 1;

    pub const fn pack(sfi: u64, index: u64) -> u64 {
        (sfi & ADDR_MASK) | ((index & INDEX_MASK) << INDEX_SHIFT)
    }

    pub const fn sfi(w: u64) -> u64 {
        w & ADDR_MASK
    }

    pub const fn index(w: u64) -> usize {
        ((w >> INDEX_SHIFT) & INDEX_MASK) as usize
    }
}

/// How the kernel side reads the JavaScript frames of a V8 target (Node.js), from V8's own
/// post-mortem constants (`v8dbg_*`). Frames the native walk followed by frame pointer (JIT
/// code and V8's builtins, which have no unwind tables) are looked at: a frame whose context
/// slot holds a heap object is a JavaScript frame, and its function slot leads to the
/// function's `SharedFunctionInfo`. Only builds with full 64-bit tagged values (no pointer
/// compression, as Node ships) are handled. `enabled` 0 turns it off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V8Config {
    pub enabled: u32,
    /// `v8dbg_off_fp_context_or_frame_type`: the context (JS frames) or a frame-type Smi.
    pub fp_context: i32,
    /// `v8dbg_off_fp_function`: the `JSFunction`.
    pub fp_function: i32,
    /// `JSFunction::shared`, from the object's start (untagged).
    pub function_shared: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain #[repr(C)] integer structs with explicit padding.
    unsafe impl aya::Pod for InFlight {}
    unsafe impl aya::Pod for WrapperStash {}
    unsafe impl aya::Pod for LiveBlock {}
    unsafe impl aya::Pod for FreedBlock {}
    unsafe impl aya::Pod for FreedKey {}
    unsafe impl aya::Pod for SiteCounters {}
    unsafe impl aya::Pod for HeapTotal {}
    unsafe impl aya::Pod for Stack {}
    unsafe impl aya::Pod for PyConfig {}
    unsafe impl aya::Pod for V8Config {}
    unsafe impl aya::Pod for SiteKey {}
    unsafe impl aya::Pod for TargetState {}
    unsafe impl aya::Pod for ForkEvent {}
    unsafe impl aya::Pod for LiveKey {}
    unsafe impl aya::Pod for UnwindRow {}
    unsafe impl aya::Pod for UnwindModule {}
}
