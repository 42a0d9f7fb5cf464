//! CPython's allocator slots found from outside, held to what the interpreter itself says:
//! Debian's stripped /usr/bin/python3.11 (3.11.2, non-PIE) and pyenv's 3.9.18, 3.10.13,
//! 3.11.7, 3.12.1, 3.13.0 (shared libpython, PIC).
//!
//! Each case starts `python -c SCRIPT`: the script calls `PyMem_GetAllocator` for RAW, MEM
//! and OBJ through ctypes and `_PyMem_GetCurrentAllocatorName()` ("pymalloc",
//! "pymalloc_debug", or NULL when tracemalloc wraps the tables), prints them as JSON and
//! blocks on stdin. The test then runs `detect` and `find_allocators` on its pid (reading
//! /proc/PID/mem only: nothing is attached, stopped or written) and requires:
//! - each slot's ctx and four functions are exactly what `PyMem_GetAllocator` copied out,
//!   and the 40 bytes at the slot's address are exactly those;
//! - the wrapper (none, the debug hooks, tracemalloc, an unknown one) and `pymalloc` agree
//!   with the interpreter's allocator name and the case's settings (plain, `-X
//!   tracemalloc`, `PYTHONMALLOC=debug`, `PYTHONMALLOC=malloc`, OBJ re-set by the script
//!   with a heap ctx).
//!
//! Privileged (/proc/PID/mem of another process): run as root.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
};

use leakprobe::{
    ptrace::Mem,
    runtimes::{
        Memory as _,
        cpython::{
            self,
            allocators::{self, Domain, Wrapper},
        },
    },
};
use serde_json::Value;

const SCRIPT: &str = r#"
import ctypes, json, sys
class A(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("ctx", "malloc", "calloc", "realloc", "free")]
api = ctypes.pythonapi
api.PyMem_GetAllocator.argtypes = [ctypes.c_int, ctypes.POINTER(A)]
api.PyMem_GetAllocator.restype = None
api._PyMem_GetCurrentAllocatorName.restype = ctypes.c_char_p
api.PyMem_SetAllocator.argtypes = [ctypes.c_int, ctypes.POINTER(A)]
api.PyMem_SetAllocator.restype = None
if "wrap" in sys.argv:
    # An "unknown wrapper": OBJ keeps pymalloc's functions (which ignore ctx) with a ctx in
    # the heap, as a C extension's hook would have.
    keep = ctypes.create_string_buffer(64)
    o = A()
    api.PyMem_GetAllocator(2, ctypes.byref(o))
    o.ctx = ctypes.addressof(keep)
    api.PyMem_SetAllocator(2, ctypes.byref(o))
tables = []
for domain in range(3):
    a = A()
    api.PyMem_GetAllocator(domain, ctypes.byref(a))
    tables.append([getattr(a, n) or 0 for n, _ in A._fields_])
class B(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("ctx", "alloc", "free")]
api.PyObject_GetArenaAllocator.argtypes = [ctypes.POINTER(B)]
api.PyObject_GetArenaAllocator.restype = None
b = B()
api.PyObject_GetArenaAllocator(ctypes.byref(b))
name = api._PyMem_GetCurrentAllocatorName()
print(json.dumps({"tables": tables, "arena_alloc": b.alloc, "name": name.decode() if name else None,
                  "version": list(sys.version_info[:3])}), flush=True)
sys.stdin.readline()
"#;

struct Python(Child);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Plain,
    Tracemalloc,
    Debug,
    /// `PYTHONMALLOC=malloc`: no pymalloc, RAW's functions in all three slots.
    Malloc,
    /// OBJ given a foreign ctx through `PyMem_SetAllocator`.
    Unknown,
}

fn check(python: &str, minor: u8, mode: Mode) {
    assert!(nix::unistd::geteuid().is_root(), "reading another process's memory needs root");
    assert!(Path::new(python).exists(), "{python} is missing");
    let mut cmd = Command::new(python);
    cmd.env_remove("PYTHONMALLOC").env_remove("PYTHONTRACEMALLOC").env_remove("PYTHONDEVMODE");
    match mode {
        Mode::Plain => {}
        Mode::Tracemalloc => {
            cmd.args(["-X", "tracemalloc"]);
        }
        Mode::Debug => {
            cmd.env("PYTHONMALLOC", "debug");
        }
        Mode::Malloc => {
            cmd.env("PYTHONMALLOC", "malloc");
        }
        Mode::Unknown => {}
    }
    let mut child = cmd
        .arg("-c")
        .arg(SCRIPT)
        .args((mode == Mode::Unknown).then_some("wrap"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let child = Python(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let info: Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{python} printed {line:?}: {e}"));
    let pid = child.0.id() as i32;

    let rt = cpython::detect(pid).expect("detect").expect("CPython recognised");
    assert_eq!(rt.version.minor, minor);
    let mem = Mem::open(pid).unwrap();
    let found =
        allocators::find_allocators_in(&rt, &mem).unwrap_or_else(|e| panic!("{python} {mode:?}: {e}"));

    // The slots hold exactly what PyMem_GetAllocator copies out.
    let tables = info["tables"].as_array().unwrap();
    for d in Domain::ALL {
        let want: Vec<u64> =
            tables[d as usize].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        let s = found.slot(d);
        assert_eq!(s.domain, d);
        assert_eq!(vec![s.ctx, s.malloc, s.calloc, s.realloc, s.free], want, "{python} {mode:?} {d}");
        let bytes = mem.read_vec(s.addr, 40).unwrap();
        let at: Vec<u64> = bytes.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(at, want, "{python} {mode:?} {d}: the 40 bytes at {:#x}", s.addr);
    }
    let addrs: Vec<u64> = found.slots.iter().map(|s| s.addr).collect();
    assert!(addrs[0] != addrs[1] && addrs[1] != addrs[2] && addrs[0] != addrs[2]);
    // pymalloc's arena allocator: where PyObject_GetArenaAllocator says, a short straight line.
    let arena =
        found.arena_alloc.clone().unwrap_or_else(|e| panic!("{python} {mode:?}: arena allocator: {e}"));
    assert_eq!(arena.start, info["arena_alloc"].as_u64().unwrap(), "{python} {mode:?}");
    assert!(arena.end > arena.start + 5 && arena.end < arena.start + 200, "{python} {mode:?}: {arena:#x?}");

    // What they are, as the interpreter names it.
    let name = info["name"].as_str();
    match mode {
        Mode::Plain => {
            assert_eq!(name, Some("pymalloc"));
            assert_eq!(found.wrapped, None);
            assert!(found.slots.iter().all(|s| s.wrapper.is_none()));
            assert_eq!(found.slot(Domain::Obj).malloc, found.default_pymalloc.malloc);
            assert_eq!(found.slot(Domain::Raw).malloc, found.default_raw.malloc);
        }
        Mode::Tracemalloc => {
            assert_eq!(name, None, "tracemalloc's tables have no allocator name");
            assert_eq!(found.wrapped, Some(Wrapper::Tracemalloc));
            assert!(found.slots.iter().all(|s| s.wrapper == Some(Wrapper::Tracemalloc)));
        }
        Mode::Debug => {
            assert_eq!(name, Some("pymalloc_debug"));
            assert_eq!(found.wrapped, Some(Wrapper::DebugHooks));
            assert!(found.slots.iter().all(|s| s.wrapper == Some(Wrapper::DebugHooks)));
            assert_eq!(found.wrapped.unwrap().to_string(), "debug hooks (PYTHONMALLOC=debug)");
        }
        Mode::Malloc => {
            assert_eq!(name, Some("malloc"));
            assert_eq!(found.wrapped, None);
            for s in &found.slots {
                assert_eq!((s.ctx, s.malloc, s.free), (0, found.default_raw.malloc, found.default_raw.free));
            }
        }
        Mode::Unknown => {
            assert_eq!(name, None, "not an allocator CPython knows");
            assert_eq!(found.wrapped, Some(Wrapper::Unknown));
            assert_eq!(found.slot(Domain::Obj).wrapper, Some(Wrapper::Unknown));
            assert_eq!(found.slot(Domain::Mem).wrapper, None);
            assert_eq!(found.slot(Domain::Raw).wrapper, None);
            assert_eq!(found.wrapped.unwrap().to_string(), "unknown wrapper");
        }
    }
    let pymalloc_underneath = matches!(mode, Mode::Plain | Mode::Tracemalloc | Mode::Debug);
    assert_eq!(found.pymalloc, pymalloc_underneath, "{python} {mode:?}: pymalloc underneath");
    eprintln!(
        "{python} {mode:?}: {} RAW {:#x} MEM {:#x} OBJ {:#x} wrapped {:?} pymalloc {}",
        found.found_by, addrs[0], addrs[1], addrs[2], found.wrapped, found.pymalloc
    );
}

#[test]
fn debian_3_11() {
    check("/usr/bin/python3.11", 11, Mode::Plain);
}

#[test]
fn debian_3_11_tracemalloc() {
    check("/usr/bin/python3.11", 11, Mode::Tracemalloc);
}

#[test]
fn debian_3_11_debug_hooks() {
    check("/usr/bin/python3.11", 11, Mode::Debug);
}

#[test]
fn pyenv_3_9() {
    check("/root/.pyenv/versions/3.9.18/bin/python3.9", 9, Mode::Plain);
}

#[test]
fn pyenv_3_9_tracemalloc() {
    check("/root/.pyenv/versions/3.9.18/bin/python3.9", 9, Mode::Tracemalloc);
}

#[test]
fn pyenv_3_9_debug_hooks() {
    check("/root/.pyenv/versions/3.9.18/bin/python3.9", 9, Mode::Debug);
}

#[test]
fn pyenv_3_10() {
    check("/root/.pyenv/versions/3.10.13/bin/python3.10", 10, Mode::Plain);
}

#[test]
fn pyenv_3_10_tracemalloc() {
    check("/root/.pyenv/versions/3.10.13/bin/python3.10", 10, Mode::Tracemalloc);
}

#[test]
fn pyenv_3_10_debug_hooks() {
    check("/root/.pyenv/versions/3.10.13/bin/python3.10", 10, Mode::Debug);
}

#[test]
fn pyenv_3_11() {
    check("/root/.pyenv/versions/3.11.7/bin/python3.11", 11, Mode::Plain);
}

#[test]
fn pyenv_3_11_tracemalloc() {
    check("/root/.pyenv/versions/3.11.7/bin/python3.11", 11, Mode::Tracemalloc);
}

#[test]
fn pyenv_3_11_debug_hooks() {
    check("/root/.pyenv/versions/3.11.7/bin/python3.11", 11, Mode::Debug);
}

#[test]
fn pyenv_3_12() {
    check("/root/.pyenv/versions/3.12.1/bin/python3.12", 12, Mode::Plain);
}

#[test]
fn pyenv_3_12_tracemalloc() {
    check("/root/.pyenv/versions/3.12.1/bin/python3.12", 12, Mode::Tracemalloc);
}

#[test]
fn pyenv_3_12_debug_hooks() {
    check("/root/.pyenv/versions/3.12.1/bin/python3.12", 12, Mode::Debug);
}

#[test]
fn pyenv_3_13() {
    check("/root/.pyenv/versions/3.13.0/bin/python3.13", 13, Mode::Plain);
}

#[test]
fn pyenv_3_13_tracemalloc() {
    check("/root/.pyenv/versions/3.13.0/bin/python3.13", 13, Mode::Tracemalloc);
}

#[test]
fn pyenv_3_13_debug_hooks() {
    check("/root/.pyenv/versions/3.13.0/bin/python3.13", 13, Mode::Debug);
}

#[test]
fn debian_3_11_malloc() {
    check("/usr/bin/python3.11", 11, Mode::Malloc);
}

#[test]
fn debian_3_11_unknown_wrapper() {
    check("/usr/bin/python3.11", 11, Mode::Unknown);
}

#[test]
fn pyenv_3_9_malloc() {
    check("/root/.pyenv/versions/3.9.18/bin/python3.9", 9, Mode::Malloc);
}

#[test]
fn pyenv_3_9_unknown_wrapper() {
    check("/root/.pyenv/versions/3.9.18/bin/python3.9", 9, Mode::Unknown);
}

#[test]
fn pyenv_3_10_malloc() {
    check("/root/.pyenv/versions/3.10.13/bin/python3.10", 10, Mode::Malloc);
}

#[test]
fn pyenv_3_10_unknown_wrapper() {
    check("/root/.pyenv/versions/3.10.13/bin/python3.10", 10, Mode::Unknown);
}

#[test]
fn pyenv_3_11_malloc() {
    check("/root/.pyenv/versions/3.11.7/bin/python3.11", 11, Mode::Malloc);
}

#[test]
fn pyenv_3_11_unknown_wrapper() {
    check("/root/.pyenv/versions/3.11.7/bin/python3.11", 11, Mode::Unknown);
}

#[test]
fn pyenv_3_12_malloc() {
    check("/root/.pyenv/versions/3.12.1/bin/python3.12", 12, Mode::Malloc);
}

#[test]
fn pyenv_3_12_unknown_wrapper() {
    check("/root/.pyenv/versions/3.12.1/bin/python3.12", 12, Mode::Unknown);
}

#[test]
fn pyenv_3_13_malloc() {
    check("/root/.pyenv/versions/3.13.0/bin/python3.13", 13, Mode::Malloc);
}

#[test]
fn pyenv_3_13_unknown_wrapper() {
    check("/root/.pyenv/versions/3.13.0/bin/python3.13", 13, Mode::Unknown);
}
