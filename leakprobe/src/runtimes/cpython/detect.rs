//! Recognising CPython in a live process: /proc/PID/maps, the module's ELF symbols, and
//! /proc/PID/mem to check the version's layout against what is really there. All the I/O
//! of `runtimes::cpython` is here.

use std::collections::HashSet;

use leakprobe_common::{PyConfig, py_end};
use procfs::process::{MMapPath, Process};

use super::{
    DetectError, NativeFunction, PyVersion, Runtime, TypeAddrs,
    layout::{DebugOffsets, Layout, TP_BASICSIZE, TP_NAME},
    version_from_name, version_from_rodata,
    walk::{thread_states, walk_frames},
};
use crate::{
    ptrace::Mem,
    runtimes::Memory,
    target::{self, Mapping, elf},
};

const EVAL_FRAME: &str = "_PyEval_EvalFrameDefault";

/// Recognises CPython in `pid`: `Ok(None)` when no module of the process defines
/// `_PyRuntime`; an error saying why when it is CPython but its frames cannot be walked
/// (unsupported version or build, or a layout that does not check out in the process).
pub fn detect(pid: i32) -> Result<Option<Runtime>, DetectError> {
    // The executable, then anything named like Python (libpython3.X.so); other modules do
    // not carry CPython.
    let (maps, files) = target::runtime_candidates(pid, |name| name.contains("python"))
        .map_err(|source| DetectError::Maps { pid, source })?;

    for m in &files {
        let data = read_module(pid, m)?;
        let Ok(syms) = elf::symbols_in(&data, |n| {
            matches!(n, "_PyRuntime" | "PyCode_Type" | "PyUnicode_Type" | "PyBytes_Type" | "Py_Version")
                || n == EVAL_FRAME
                || n.strip_prefix(EVAL_FRAME).is_some_and(|s| s.starts_with('.'))
        }) else {
            continue;
        };
        let Some(runtime_sym) = syms.get("_PyRuntime") else { continue };
        let loads =
            elf::loads_in(&data).map_err(|source| DetectError::Elf { path: m.path.clone(), source })?;
        let bias = elf::load_bias(&loads, m.start, m.file_offset)
            .ok_or_else(|| DetectError::Placement { path: m.path.clone() })?;
        let addr = |name: &'static str| {
            syms.get(name)
                .map(|s| s.address + bias)
                .ok_or(DetectError::MissingSymbol { path: m.path.clone(), symbol: name })
        };
        let types = TypeAddrs {
            code: addr("PyCode_Type")?,
            unicode: addr("PyUnicode_Type")?,
            bytes: addr("PyBytes_Type")?,
        };
        let mut eval_frame: Vec<NativeFunction> = syms
            .iter()
            .filter(|(n, s)| n.starts_with(EVAL_FRAME) && s.size > 0)
            .map(|(n, s)| NativeFunction {
                name: n.clone(),
                start: s.address + bias,
                end: s.address + bias + s.size,
            })
            .collect();
        eval_frame.sort_by_key(|f| f.start);
        let mem = Mem::open(pid).map_err(|e| DetectError::Memory { pid, why: e.to_string() })?;

        // The version: Py_Version (3.11+), the file name, the PY_VERSION string.
        let by_name = version_from_name(&m.file_name());
        let version = match syms.get("Py_Version").and_then(|s| mem.read_u32(s.address + bias)) {
            Some(hex) => PyVersion::from_hex(u64::from(hex)),
            None => match by_name {
                Some((v, _)) => v,
                None => elf::section_data(&data, ".rodata")
                    .and_then(version_from_rodata)
                    .ok_or_else(|| DetectError::UnknownVersion { path: m.path.clone() })?,
            },
        };
        if by_name.is_some_and(|(_, t)| t) {
            return Err(DetectError::FreeThreaded { version });
        }
        let mut layout =
            Layout::for_version(version.major, version.minor).ok_or(DetectError::Unsupported { version })?;
        let py_runtime = runtime_sym.address + bias;
        let bad = |why: String| DetectError::Layout { version, why };

        // 3.13+: the runtime describes itself.
        let mut from_debug_offsets = false;
        if version.minor >= 13 {
            let raw = mem
                .read_vec(py_runtime, DebugOffsets::SIZE)
                .ok_or_else(|| bad("cannot read _PyRuntime".into()))?;
            let d =
                DebugOffsets::parse(&raw).ok_or_else(|| bad("no _Py_DebugOffsets at _PyRuntime".into()))?;
            let dv = PyVersion::from_hex(d.version);
            if (dv.major, dv.minor) != (version.major, version.minor) {
                return Err(bad(format!("_Py_DebugOffsets says version {dv}")));
            }
            if d.free_threaded {
                return Err(DetectError::FreeThreaded { version });
            }
            d.check(&layout).map_err(bad)?;
            layout.runtime_interp_head = d.runtime_interpreters_head;
            from_debug_offsets = true;
        }

        check_types(&mem, &layout, &types).map_err(bad)?;
        let mut rt = Runtime {
            pid,
            version,
            module: m.path.clone(),
            bias,
            py_runtime,
            types,
            eval_frame,
            layout,
            from_debug_offsets,
            threads_seen: 0,
            frames_seen: 0,
        };
        let (threads, frames) =
            check_threads(pid, &mem, &rt.bpf_config(), rt.layout.tstate_interp, &maps).map_err(bad)?;
        rt.threads_seen = threads;
        rt.frames_seen = frames;
        return Ok(Some(rt));
    }
    Ok(None)
}

fn read_module(pid: i32, m: &Mapping) -> Result<Vec<u8>, DetectError> {
    target::read_mapping(pid, m).map_err(|source| DetectError::Module { path: m.path.clone(), source })
}

fn c_string(mem: &dyn Memory, addr: u64) -> Option<String> {
    let b = mem.read_vec(addr, 16).or_else(|| mem.read_vec(addr, 8))?;
    let end = b.iter().position(|&c| c == 0)?;
    String::from_utf8(b[..end].to_vec()).ok()
}

/// The type objects are what their names say, and `PyCode_Type.tp_basicsize` is the
/// table's size of a code object (3.11+: the offset of `co_code_adaptive`).
fn check_types(mem: &dyn Memory, layout: &Layout, types: &TypeAddrs) -> Result<(), String> {
    for (addr, want) in [(types.code, "code"), (types.unicode, "str"), (types.bytes, "bytes")] {
        let name = mem.read_u64(addr + TP_NAME).and_then(|p| c_string(mem, p));
        if name.as_deref() != Some(want) {
            return Err(format!("the {want} type object's tp_name reads {name:?}"));
        }
    }
    let basic = mem.read_u64(types.code + TP_BASICSIZE);
    if basic != Some(layout.code.size) {
        return Err(format!("PyCode_Type.tp_basicsize is {basic:?}, the table says {}", layout.code.size));
    }
    Ok(())
}

/// `interpreters.head` leads to thread states that belong to that interpreter and to this
/// process's threads (3.11+: `native_thread_id` is one of its tids; 3.9/3.10: `thread_id`,
/// its `pthread_self()`, points into its memory), and their frames walk to code objects.
/// Frames change under a running process, so a walk gets three tries. Returns the thread
/// states and frames seen.
fn check_threads(
    pid: i32,
    mem: &dyn Memory,
    cfg: &PyConfig,
    tstate_interp: u64,
    maps: &procfs::process::MemoryMaps,
) -> Result<(usize, usize), String> {
    let interp = mem.read_u64(cfg.interp_head_ptr).unwrap_or(0);
    if interp == 0 {
        return Err("_PyRuntime.interpreters.head is NULL (not initialised yet, or finalised)".into());
    }
    let states = thread_states(mem, cfg);
    if states.is_empty() {
        return Err("the interpreter has no readable thread states".into());
    }
    let tids: HashSet<u64> = Process::new(pid)
        .and_then(|p| p.tasks())
        .map(|ts| ts.flatten().map(|t| t.tid as u64).collect())
        .unwrap_or_default();
    let mapped = |a: u64| {
        maps.iter().any(|m| m.address.0 <= a && a < m.address.1 && !matches!(m.pathname, MMapPath::Vsyscall))
    };
    let frame_object = cfg.flavor == leakprobe_common::py_flavor::FRAME_OBJECT;
    let mut matched = 0;
    for &t in &states {
        if mem.read_u64(t + tstate_interp) != Some(interp) {
            return Err(format!("thread state {t:#x} does not point back at its interpreter {interp:#x}"));
        }
        let id = mem.read_u64(t + cfg.tstate_native_thread_id).unwrap_or(0);
        if if frame_object { id != 0 && mapped(id) } else { tids.contains(&id) } {
            matched += 1;
        }
    }
    if matched == 0 {
        let what = if frame_object {
            "thread_id in the process's memory"
        } else {
            "native_thread_id that is a thread of the process"
        };
        return Err(format!("none of the {} thread states has a {what}", states.len()));
    }
    let mut frames = 0;
    for &t in &states {
        let mut ok = false;
        for _ in 0..3 {
            let w = walk_frames(mem, cfg, t);
            if w.end != py_end::BAD_FRAME {
                frames += w.words.len();
                ok = true;
                break;
            }
        }
        if !ok {
            return Err(format!("the frames of thread state {t:#x} do not lead to code objects"));
        }
    }
    Ok((states.len(), frames))
}
