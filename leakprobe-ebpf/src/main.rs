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
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::read_volatile,
};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, pt_regs},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, PerCpuArray},
    programs::{ProbeContext, RetProbeContext},
};
use leakprobe_common::{
    AllocKind, InFlight, LiveBlock, MAX_STACK_DEPTH, SiteCounters, SiteKey, Stack, WrapperStash,
    counter,
};

/// Set by the daemon before load.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

// Sizes here are defaults; the daemon sets the real ones before load.
#[map]
static IN_FLIGHT: HashMap<u32, InFlight> = HashMap::with_max_entries(16384, 0);
#[map]
static WRAPPER_STASH: HashMap<u32, WrapperStash> = HashMap::with_max_entries(16384, 0);
#[map]
static LIVE: HashMap<u64, LiveBlock> = HashMap::with_max_entries(1 << 20, 0);
#[map]
static STACKS: HashMap<u64, Stack> = HashMap::with_max_entries(1 << 15, 0);
#[map]
static SITES: HashMap<SiteKey, SiteCounters> = HashMap::with_max_entries(1 << 15, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);
#[map]
static SCRATCH: PerCpuArray<Stack> = PerCpuArray::with_max_entries(1, 0);

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

/// The current thread id if it belongs to the target, else None.
#[inline(always)]
fn target_tid() -> Option<u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let target = unsafe { read_volatile(&raw const TARGET_TGID) };
    if target == 0 || tgid != target {
        return None;
    }
    Some(pid_tgid as u32)
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

/// Walks the user stack from an allocation function's entry and stores it in `STACKS`.
///
/// At entry `[rsp]` holds the return address into the direct caller, so frame 0 is exact
/// whatever the caller was compiled with. The frames above it follow the frame-pointer chain.
fn capture_stack(sp: u64, fp: u64) -> u64 {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let buf = unsafe { &mut *buf };
    let Ok(ret0) = (unsafe { bpf_probe_read_user(sp as *const u64) }) else {
        count(counter::STACK_READ_ERROR);
        return 0;
    };
    buf.ips[0] = ret0;
    let mut depth: usize = 1;
    let mut fp = fp;
    let mut truncated = 0u32;
    for i in 1..MAX_STACK_DEPTH {
        if fp < sp || fp - sp > MAX_STACK_SPAN || fp & 7 != 0 {
            break;
        }
        let Ok(ra) = (unsafe { bpf_probe_read_user((fp + 8) as *const u64) }) else {
            break;
        };
        let Ok(next) = (unsafe { bpf_probe_read_user(fp as *const u64) }) else {
            break;
        };
        if ra == 0 {
            break;
        }
        buf.ips[i] = ra;
        depth = i + 1;
        if next <= fp {
            break;
        }
        fp = next;
        if i == MAX_STACK_DEPTH - 1 {
            truncated = 1;
        }
    }
    if truncated != 0 {
        count(counter::STACK_TRUNCATED);
    }
    buf.depth = depth as u32;
    buf.truncated = truncated;

    // FNV-1a over the frames: the stack id, so equal stacks share one entry.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..MAX_STACK_DEPTH {
        if i >= depth {
            break;
        }
        h ^= buf.ips[i];
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= depth as u64;
    if h == 0 {
        h = 1;
    }
    match STACKS.insert(&h, &*buf, BPF_NOEXIST as u64) {
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

#[inline(always)]
fn account_alloc(block: &LiveBlock) {
    let key = SiteKey { stack_id: block.stack_id, kind: block.kind, _pad: 0 };
    if let Some(site) = site_counters(&key) {
        atomic_add(unsafe { &raw mut (*site).alloc_count }, 1);
        atomic_add(unsafe { &raw mut (*site).alloc_bytes }, block.size);
    }
}

#[inline(always)]
fn account_free(block: &LiveBlock) {
    let key = SiteKey { stack_id: block.stack_id, kind: block.kind, _pad: 0 };
    if let Some(site) = SITES.get_ptr_mut(&key) {
        atomic_add(unsafe { &raw mut (*site).free_count }, 1);
        atomic_add(unsafe { &raw mut (*site).free_bytes }, block.size);
    }
}

fn record_alloc(addr: u64, size: u64, stack_id: u64, kind: u32) {
    let block = LiveBlock { size, timestamp_ns: unsafe { bpf_ktime_get_ns() }, stack_id, kind, _pad: 0 };
    match LIVE.insert(&addr, &block, BPF_NOEXIST as u64) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {
            // The address came back while still live: its free went unseen. Retire the old
            // block so it does not show as a leak, and count the miss.
            if let Some(old) = unsafe { LIVE.get(&addr) } {
                let old = *old;
                account_free(&old);
            }
            count(counter::MISSED_FREE);
            if LIVE.insert(&addr, &block, BPF_ANY as u64).is_err() {
                count(counter::LIVE_MAP_FULL);
                return;
            }
        }
        Err(_) => {
            // Not recorded, so not counted: a block we cannot see freed must not become a leak.
            count(counter::LIVE_MAP_FULL);
            return;
        }
    }
    account_alloc(&block);
}

/// Removes a live block; returns it if it was there.
#[inline(always)]
fn take_live(addr: u64) -> Option<LiveBlock> {
    let block = unsafe { LIVE.get(&addr) }.copied()?;
    // Only the thread whose remove succeeds owns the block.
    LIVE.remove(&addr).ok()?;
    Some(block)
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
    if kind == AllocKind::Mmap && out_ptr & MAP_ANONYMOUS == 0 {
        // File mappings are not heap; its return finds no record and does nothing.
        return 0;
    }
    count(counter::ALLOC_CALLS);

    let mut kind = kind as u32;
    let mut stack_id = 0;
    if let Some(stash) = unsafe { WRAPPER_STASH.get(&tid) }.copied() {
        let _ = WRAPPER_STASH.remove(&tid);
        if nested_in(stash.sp, sp, WRAPPER_SP_WINDOW) {
            stack_id = stash.stack_id;
            kind = stash.kind;
        }
    }
    if stack_id == 0 {
        stack_id = capture_stack(sp, r.rbp);
    }

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
            let _ = LIVE.insert(&old_ptr, &rec.old_block, BPF_ANY as u64);
        }
    }
    0
}

fn finish_free(addr: u64) {
    match take_live(addr) {
        Some(block) => account_free(&block),
        None => count(counter::UNKNOWN_FREE),
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
        Some(AllocKind::Realloc | AllocKind::Reallocarray) => {
            if ret != 0 || (rec.size == 0 && rec.old_ptr != 0) {
                // Success, or glibc's realloc(p, 0), which frees p and returns NULL.
                if rec.old_ptr != 0 {
                    if rec.old_known != 0 {
                        account_free(&rec.old_block);
                    } else {
                        count(counter::UNKNOWN_FREE);
                    }
                }
                if ret != 0 {
                    record_alloc(ret, rec.size, rec.stack_id, rec.kind);
                }
            } else {
                count(counter::FAILED_ALLOCS);
                if rec.old_known != 0 {
                    let _ = LIVE.insert(&rec.old_ptr, &rec.old_block, BPF_ANY as u64);
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
    enter(&ctx, AllocKind::Mmap, arg(&ctx, 1), 0, arg(&ctx, 3))
}

#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_tid() else { return 0 };
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
    let addr = arg(&ctx, 0);
    // munmap inside free() of a large block belongs to malloc's own bookkeeping.
    if outer_call(tid, regs(&ctx).rsp).is_some() {
        return 0;
    }
    match take_live(addr) {
        Some(block) if block.kind == AllocKind::Mmap as u32 => account_free(&block),
        Some(block) => {
            // Not a mapping we recorded; put it back untouched.
            let _ = LIVE.insert(&addr, &block, BPF_ANY as u64);
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
    let stack_id = capture_stack(r.rsp, r.rbp);
    let stash = WrapperStash { sp: r.rsp, stack_id, kind: kind as u32, _pad: 0 };
    if WRAPPER_STASH.insert(&tid, &stash, BPF_ANY as u64).is_err() {
        count(counter::IN_FLIGHT_FULL);
    }
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
