//! The Python frame walk the eBPF program does, in plain Rust: the reference the kernel side
//! mirrors, and what the tests hold to the interpreter's own `traceback.extract_stack()`.
//! Pure: reads through a [`Memory`].
//!
//! # The walk, step by step (all reads are 8-byte little-endian unless said otherwise)
//!
//! **Finding the thread state** ([`find_thread_state`]):
//! 1. `interp = *cfg.interp_head_ptr`; 0 → no thread (`py_end::NO_THREAD`).
//! 2. `t = *(interp + cfg.interp_threads_head)`.
//! 3. Up to [`MAX_THREADS`] times: `t == 0` → no thread; if
//!    `*(t + cfg.tstate_native_thread_id) == key` → found; else `t = *(t + cfg.tstate_next)`.
//!
//! `key` is [`thread_key`]: the kernel tid from 3.11 on (`native_thread_id`); for
//! `FRAME_OBJECT` (3.9/3.10, which have no `native_thread_id`) the field is `thread_id`,
//! i.e. `pthread_self()`, which on x86_64 glibc is the thread's FS base: the kernel side
//! compares it with `task->thread.fsbase`.
//!
//! **Walking the frames** ([`walk_frames`]), innermost first:
//! 1. First frame: `FRAME_OBJECT` and `CURRENT_313`: `f = *(tstate + cfg.tstate_frame)`;
//!    `CFRAME_311`/`CFRAME_312`: `f = *(*(tstate + cfg.tstate_frame) + cfg.cframe_current_frame)`.
//! 2. Loop (at most `2 * max_frames + 1` times; shim frames do not count as frames):
//!    - `f == 0` → `COMPLETE`.
//!    - `CFRAME_312`/`CURRENT_313`: if the byte `*(f + cfg.frame_entry) == 3`
//!      (`FRAME_OWNED_BY_CSTACK`, the shim a C call into the evaluation loop pushes): set
//!      `py_frame::ENTRY` on the last frame taken (if any), `f = *(f + cfg.frame_back)`,
//!      continue. (Its code is the trampoline or None: never taken.)
//!    - `words.len() == max_frames` → `MAX_DEPTH`.
//!    - `code = *(f + cfg.frame_code)`; `*(code + 8) != cfg.code_type` (`ob_type`) →
//!      `BAD_FRAME`.
//!    - position: `FRAME_OBJECT`: `lasti = *(i32*)(f + cfg.frame_instr)`, `pos = lasti` (or
//!      `POS_MASK` if negative: not started); else
//!      `d = *(f + cfg.frame_instr) - (code + cfg.code_adaptive)` as a signed byte
//!      distance, `pos = d >> 1` (or `POS_MASK` if negative); `pack` clamps to `POS_MASK`.
//!    - entry: `FRAME_OBJECT`: always (every frame has its own C evaluation loop);
//!      `CFRAME_311`: the byte `*(f + cfg.frame_entry) != 0` (`is_entry`); 3.12+: set later
//!      by the shim that follows it.
//!    - push `py_frame::pack(code, pos, entry)`; `f = *(f + cfg.frame_back)`.
//!    - the loop bound reached → `MAX_DEPTH`.
//! 3. Any read that fails → `BAD_FRAME`, keeping the frames taken so far.

use leakprobe_common::{MAX_PY_DEPTH, PyConfig, py_end, py_flavor, py_frame};

use super::layout::{Layout, OB_TYPE};
use crate::runtimes::Memory;

/// Thread states looked at before giving up on finding the thread.
pub const MAX_THREADS: usize = 256;
/// `FRAME_OWNED_BY_CSTACK` (3.12, 3.13).
pub const OWNED_BY_CSTACK: u8 = 3;

/// The result of [`walk_frames`]: [`leakprobe_common::Stack::py`] and `py_end`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PyWalk {
    /// [`py_frame`] words, innermost first.
    pub words: Vec<u64>,
    /// One of the [`py_end`] values.
    pub end: u32,
}

/// The [`PyConfig`] of a layout, given `&_PyRuntime` and `&PyCode_Type` (load bias
/// applied). For `FRAME_OBJECT` the thread-id field is `thread_id` (see [`thread_key`]).
pub fn config(layout: &Layout, py_runtime: u64, code_type: u64) -> PyConfig {
    PyConfig {
        flavor: layout.flavor,
        max_frames: MAX_PY_DEPTH as u32,
        interp_head_ptr: py_runtime + layout.runtime_interp_head,
        code_type,
        interp_threads_head: layout.interp_threads_head,
        tstate_next: layout.tstate_next,
        tstate_native_thread_id: layout.tstate_native_thread_id.unwrap_or(layout.tstate_thread_id),
        tstate_frame: layout.tstate_frame,
        cframe_current_frame: layout.cframe_current_frame,
        frame_code: layout.frame_code,
        frame_back: layout.frame_back,
        frame_instr: layout.frame_instr,
        frame_entry: layout.frame_entry,
        code_adaptive: if layout.flavor == py_flavor::FRAME_OBJECT { 0 } else { layout.code.size },
        // The kernel's own offset: set by the caller for FRAME_OBJECT (see the field).
        task_fsbase: 0,
        // Set by the caller once the allocator tables are hooked.
        arena_alloc_start: 0,
        arena_alloc_end: 0,
    }
}

/// What a thread state's id field holds for the thread with kernel id `tid` and FS base
/// `fsbase`: `fsbase` (= `pthread_self()` on x86_64 glibc) for `FRAME_OBJECT`, else `tid`.
pub fn thread_key(cfg: &PyConfig, tid: u32, fsbase: u64) -> u64 {
    if cfg.flavor == py_flavor::FRAME_OBJECT { fsbase } else { u64::from(tid) }
}

/// Every thread state of the interpreter `cfg.interp_head_ptr` points at, in list order
/// (at most [`MAX_THREADS`]); empty when it cannot be read.
pub fn thread_states(mem: &dyn Memory, cfg: &PyConfig) -> Vec<u64> {
    let mut out = Vec::new();
    let Some(interp) = mem.read_u64(cfg.interp_head_ptr).filter(|&i| i != 0) else { return out };
    let mut t = mem.read_u64(interp + cfg.interp_threads_head).unwrap_or(0);
    while t != 0 && out.len() < MAX_THREADS && !out.contains(&t) {
        out.push(t);
        t = mem.read_u64(t + cfg.tstate_next).unwrap_or(0);
    }
    out
}

/// Each thread's frame stack past its top (3.11+): `[datastack_top, datastack_limit)` of the
/// current chunk, where returned frames left their variables. Dead memory, as a native stack
/// below its stack pointer is. Empty before 3.11 (frames are objects there).
pub fn dead_frame_stacks(mem: &dyn Memory, cfg: &PyConfig, layout: &Layout) -> Vec<(u64, u64)> {
    let Some(top_at) = layout.tstate_datastack_top else { return Vec::new() };
    thread_states(mem, cfg)
        .into_iter()
        .filter_map(|t| {
            let (top, limit) = (mem.read_u64(t + top_at)?, mem.read_u64(t + top_at + 8)?);
            (top != 0 && top.is_multiple_of(8) && top < limit && limit - top <= 1 << 30)
                .then_some((top, limit))
        })
        .collect()
}

/// The thread state whose id field equals `key` ([`thread_key`]), as the kernel side finds it.
pub fn find_thread_state(mem: &dyn Memory, cfg: &PyConfig, key: u64) -> Option<u64> {
    let interp = mem.read_u64(cfg.interp_head_ptr).filter(|&i| i != 0)?;
    let mut t = mem.read_u64(interp + cfg.interp_threads_head)?;
    for _ in 0..MAX_THREADS {
        if t == 0 {
            return None;
        }
        if mem.read_u64(t + cfg.tstate_native_thread_id)? == key {
            return Some(t);
        }
        t = mem.read_u64(t + cfg.tstate_next)?;
    }
    None
}

/// The frame walk of the thread state `tstate` (see the module documentation).
pub fn walk_frames(mem: &dyn Memory, cfg: &PyConfig, tstate: u64) -> PyWalk {
    let (frames, end) = frames_of(mem, cfg, tstate);
    PyWalk { words: frames.into_iter().map(|(_, w)| w).collect(), end }
}

/// [`walk_frames`] with each frame's address: `(frame, word)`, innermost first, and how the
/// walk ended.
pub fn frames_of(mem: &dyn Memory, cfg: &PyConfig, tstate: u64) -> (Vec<(u64, u64)>, u32) {
    let mut frames = Vec::new();
    let end = walk_into(mem, cfg, tstate, &mut frames).unwrap_or(py_end::BAD_FRAME);
    (frames, end)
}

fn walk_into(mem: &dyn Memory, cfg: &PyConfig, tstate: u64, words: &mut Vec<(u64, u64)>) -> Option<u32> {
    let shims = matches!(cfg.flavor, py_flavor::CFRAME_312 | py_flavor::CURRENT_313);
    let max = (cfg.max_frames as usize).min(MAX_PY_DEPTH);
    let mut f = match cfg.flavor {
        py_flavor::FRAME_OBJECT | py_flavor::CURRENT_313 => mem.read_u64(tstate + cfg.tstate_frame)?,
        py_flavor::CFRAME_311 | py_flavor::CFRAME_312 => {
            let cframe = mem.read_u64(tstate + cfg.tstate_frame)?;
            if cframe == 0 {
                return Some(py_end::COMPLETE);
            }
            mem.read_u64(cframe + cfg.cframe_current_frame)?
        }
        _ => return Some(py_end::COMPLETE),
    };
    for _ in 0..2 * max + 1 {
        if f == 0 {
            return Some(py_end::COMPLETE);
        }
        if shims && mem.read_u8(f + cfg.frame_entry)? == OWNED_BY_CSTACK {
            if let Some((_, last)) = words.last_mut() {
                *last |= py_frame::ENTRY;
            }
            f = mem.read_u64(f + cfg.frame_back)?;
            continue;
        }
        if words.len() >= max {
            return Some(py_end::MAX_DEPTH);
        }
        let code = mem.read_u64(f + cfg.frame_code)?;
        if code == 0 || mem.read_u64(code + OB_TYPE)? != cfg.code_type {
            return None;
        }
        let (pos, entry) = if cfg.flavor == py_flavor::FRAME_OBJECT {
            let lasti = mem.read_i32(f + cfg.frame_instr)?;
            (u64::try_from(lasti).unwrap_or(py_frame::POS_MASK), true)
        } else {
            let instr = mem.read_u64(f + cfg.frame_instr)?;
            let d = instr.wrapping_sub(code.wrapping_add(cfg.code_adaptive)) as i64;
            let pos = if d < 0 { py_frame::POS_MASK } else { (d >> 1) as u64 };
            let entry = cfg.flavor == py_flavor::CFRAME_311 && mem.read_u8(f + cfg.frame_entry)? != 0;
            (pos, entry)
        };
        words.push((f, py_frame::pack(code, pos, entry)));
        f = mem.read_u64(f + cfg.frame_back)?;
    }
    Some(py_end::MAX_DEPTH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtimes::cpython::code::tests::{FakeMem, TYPES};

    const RUNTIME: u64 = 0x10_0000;
    const INTERP: u64 = 0x20_0000;

    /// A 3.12-shaped process: runtime → interp → two thread states, the second with a
    /// cframe and frames [inner, outer], a shim after `inner` (C called into it) and one
    /// after `outer`.
    fn process_312(mem: &FakeMem) -> (PyConfig, u64) {
        let l = Layout::for_version(3, 12).unwrap();
        let cfg = config(&l, RUNTIME, TYPES.code);
        let (t1, t2, cframe) = (0x30_0000, 0x31_0000, 0x32_0000);
        let (inner, shim1, outer, shim2) = (0x40_0000, 0x41_0000, 0x42_0000, 0x43_0000);
        let (code_a, code_b) = (0x50_0000, 0x51_0000);
        mem.put(RUNTIME, &[0; 64]);
        mem.put_u64(cfg.interp_head_ptr, INTERP);
        mem.put(INTERP, &[0; 128]);
        mem.put_u64(INTERP + cfg.interp_threads_head, t1);
        for (t, tid, next) in [(t1, 100u64, t2), (t2, 200, 0)] {
            mem.put(t, &[0; 256]);
            mem.put_u64(t + cfg.tstate_next, next);
            mem.put_u64(t + cfg.tstate_native_thread_id, tid);
        }
        mem.put_u64(t2 + cfg.tstate_frame, cframe);
        mem.put(cframe, &[0; 16]);
        mem.put_u64(cframe + cfg.cframe_current_frame, inner);
        for (f, code, back, owner, unit) in [
            (inner, code_a, shim1, 0u8, 7u64),
            (shim1, 0x777, outer, 3, 0),
            (outer, code_b, shim2, 0, 3),
            (shim2, 0, 0, 3, 0),
        ] {
            mem.put(f, &[0; 80]);
            mem.put_u64(f + cfg.frame_code, code);
            mem.put_u64(f + cfg.frame_back, back);
            mem.put_u64(f + cfg.frame_instr, code + cfg.code_adaptive + 2 * unit);
            mem.put(f + cfg.frame_entry, &[owner]);
        }
        for c in [code_a, code_b] {
            mem.put(c, &[0; 16]);
            mem.put_u64(c + 8, TYPES.code);
        }
        (cfg, t2)
    }

    #[test]
    fn finds_the_thread_by_key_and_walks_with_shims_as_entries() {
        let mem = FakeMem::default();
        let (cfg, t2) = process_312(&mem);
        assert_eq!(thread_states(&mem, &cfg), vec![0x30_0000, t2]);
        assert_eq!(find_thread_state(&mem, &cfg, 200), Some(t2));
        assert_eq!(find_thread_state(&mem, &cfg, 300), None);
        assert_eq!(thread_key(&cfg, 200, 0x7f00), 200);
        let w = walk_frames(&mem, &cfg, t2);
        assert_eq!(w.end, py_end::COMPLETE);
        assert_eq!(w.words, vec![py_frame::pack(0x50_0000, 7, true), py_frame::pack(0x51_0000, 3, true)]);
        // Depth 1: cut after the first frame (its shim still marks it).
        let w = walk_frames(&mem, &PyConfig { max_frames: 1, ..cfg }, t2);
        assert_eq!((w.words.len(), w.end), (1, py_end::MAX_DEPTH));
        assert!(py_frame::entry(w.words[0]));
    }

    /// The frame stack past its top is dead, per thread; a thread with none (top 0) has none.
    #[test]
    fn each_threads_frame_stack_past_its_top_is_dead() {
        let mem = FakeMem::default();
        let (cfg, t2) = process_312(&mem);
        let l = Layout::for_version(3, 12).unwrap();
        mem.put_u64(t2 + 240, 0x70_0100);
        mem.put_u64(t2 + 248, 0x70_4000);
        assert_eq!(dead_frame_stacks(&mem, &cfg, &l), vec![(0x70_0100, 0x70_4000)]);
        // Before 3.11 frames are objects: nothing.
        assert!(dead_frame_stacks(&mem, &cfg, &Layout::for_version(3, 10).unwrap()).is_empty());
    }

    #[test]
    fn a_frame_whose_code_is_not_code_ends_the_walk() {
        let mem = FakeMem::default();
        let (cfg, t2) = process_312(&mem);
        mem.put_u64(0x51_0000 + 8, 0x4242);
        let w = walk_frames(&mem, &cfg, t2);
        assert_eq!((w.words.len(), w.end), (1, py_end::BAD_FRAME));
        // An unreadable frame pointer.
        mem.put_u64(0x40_0000 + cfg.frame_back, 0xdead_0000);
        assert_eq!(walk_frames(&mem, &cfg, t2).end, py_end::BAD_FRAME);
    }

    #[test]
    fn frame_objects_count_lasti_and_use_the_fs_base() {
        let l = Layout::for_version(3, 9).unwrap();
        let cfg = config(&l, RUNTIME, TYPES.code);
        assert_eq!(cfg.tstate_native_thread_id, 176, "3.9 has only thread_id (pthread_t)");
        assert_eq!(thread_key(&cfg, 200, 0x7f00), 0x7f00);
        let mem = FakeMem::default();
        let (t, f1, f2, code) = (0x30_0000u64, 0x40_0000u64, 0x41_0000u64, 0x50_0000u64);
        mem.put(t, &[0; 256]);
        mem.put_u64(t + cfg.tstate_frame, f1);
        for (f, back, lasti) in [(f1, f2, 42i32), (f2, 0, -1)] {
            mem.put(f, &[0; 128]);
            mem.put_u64(f + cfg.frame_code, code);
            mem.put_u64(f + cfg.frame_back, back);
            mem.put(f + cfg.frame_instr, &lasti.to_le_bytes());
        }
        mem.put(code, &[0; 16]);
        mem.put_u64(code + 8, TYPES.code);
        let w = walk_frames(&mem, &cfg, t);
        assert_eq!(w.end, py_end::COMPLETE);
        assert_eq!(
            w.words,
            vec![py_frame::pack(code, 42, true), py_frame::pack(code, py_frame::POS_MASK, true)]
        );
    }

    #[test]
    fn configs_of_each_version() {
        for (minor, flavor, head) in [
            (9, py_flavor::FRAME_OBJECT, 32),
            (10, py_flavor::FRAME_OBJECT, 32),
            (11, py_flavor::CFRAME_311, 40),
            (12, py_flavor::CFRAME_312, 40),
            (13, py_flavor::CURRENT_313, 632),
        ] {
            let cfg = config(&Layout::for_version(3, minor).unwrap(), RUNTIME, 0x1234);
            assert_eq!((cfg.flavor, cfg.interp_head_ptr, cfg.code_type), (flavor, RUNTIME + head, 0x1234));
            assert_eq!(cfg.max_frames as usize, MAX_PY_DEPTH);
        }
    }
}
