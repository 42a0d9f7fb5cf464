//! Python frames from outside, against real interpreters: Debian's stripped
//! /usr/bin/python3.11 and pyenv's 3.9.18, 3.10.13, 3.12.1, 3.13.0 (shared libpython).
//!
//! `tests/targets/py_frames.py` blocks in `sys.stdin.readline()` at a known stack and prints
//! what the interpreter says that stack is (its frames' code ids, names and lines, and
//! `traceback.extract_stack()`). Each test then:
//! 1. `detect(pid)`: the module, version, and the `PyConfig` for the eBPF side;
//! 2. finds the main thread's state through `interp_head_ptr` → threads, by its kernel tid
//!    (3.11+) or its FS base (3.9/3.10, read with ptrace: it must equal `pthread_self()`);
//! 3. walks the frames with `walk_frames` (the walk the eBPF mirrors) through /proc/PID/mem
//!    and names them with `CodeResolver`, and requires exactly the interpreter's own stack:
//!    code addresses, functions, files, lines, and which frames are C-entered.
//!
//! Privileged (ptrace, /proc/PID/mem of another process): run as root.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
};

use common::*;
use leakprobe::{
    ptrace::{Mem, StopOptions, StoppedWorld},
    runtimes::cpython::{self, walk},
};
use leakprobe_common::{MAX_PY_DEPTH, py_end, py_flavor, py_frame};
use serde_json::Value;

struct Python(Child);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `python` on the target script; returns it and the line it printed.
fn start(python: &str) -> (Python, Value) {
    assert!(Path::new(python).exists(), "{python} is missing");
    let script = repo_root().join("tests/targets/py_frames.py");
    let mut child = Command::new(python)
        .arg(&script)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let info: Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{python} printed {line:?}: {e}"));
    (Python(child), info)
}

/// The FS bases of threads `tids`, read with ptrace (the world is resumed at once).
fn fs_bases(pid: i32, tids: &[i32]) -> Vec<u64> {
    let world = StoppedWorld::stop(pid, StopOptions::default()).expect("stop the target");
    let bases = tids.iter().map(|&t| world.thread(t).expect("thread").regs().fs_base).collect();
    world.resume();
    bases
}

fn check(python: &str, minor: u8, flavor: u32, module_has: &str) {
    require_root();
    let (child, info) = start(python);
    let pid = child.0.id() as i32;

    // 1. Detection and the configuration.
    let rt = cpython::detect(pid).expect("detect").expect("CPython recognised");
    let want_version: Vec<u64> =
        info["version"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(
        (u64::from(rt.version.major), u64::from(rt.version.minor)),
        (want_version[0], want_version[1])
    );
    assert_eq!(rt.version.minor, minor);
    if let Some(micro) = rt.version.micro {
        assert_eq!(u64::from(micro), want_version[2]);
    }
    assert!(rt.module.to_string_lossy().contains(module_has), "{}", rt.module.display());
    assert_eq!(rt.from_debug_offsets, minor >= 13);
    assert!(rt.eval_frame.iter().any(|f| f.name == "_PyEval_EvalFrameDefault" && f.end > f.start));
    let cfg = rt.bpf_config();
    assert_eq!(cfg.flavor, flavor);
    assert_eq!(cfg.max_frames as usize, MAX_PY_DEPTH);
    assert_eq!(cfg.code_type, rt.types.code);
    assert!(cfg.interp_head_ptr > rt.py_runtime && cfg.interp_head_ptr < rt.py_runtime + 4096);

    // 2. The main thread's state, found as the kernel side will. A worker thread started
    //    first is at the head of the list: finding main follows `tstate_next`.
    let mem = Mem::open(pid).unwrap();
    let worker_tid = info["worker_native_tid"].as_u64().unwrap() as i32;
    assert_eq!(info["native_tid"].as_u64().unwrap(), pid as u64);
    let (key, worker_key) = if flavor == py_flavor::FRAME_OBJECT {
        let bases = fs_bases(pid, &[pid, worker_tid]);
        assert_eq!(bases[0], info["pthread"].as_u64().unwrap(), "pthread_self() is the FS base");
        assert_eq!(bases[1], info["worker_pthread"].as_u64().unwrap(), "pthread_self() is the FS base");
        (walk::thread_key(&cfg, pid as u32, bases[0]), walk::thread_key(&cfg, worker_tid as u32, bases[1]))
    } else {
        (walk::thread_key(&cfg, pid as u32, 0), walk::thread_key(&cfg, worker_tid as u32, 0))
    };
    let states = walk::thread_states(&mem, &cfg);
    assert_eq!(states.len(), 2, "main and worker");
    let tstate = walk::find_thread_state(&mem, &cfg, key).expect("the main thread's state");
    let worker = walk::find_thread_state(&mem, &cfg, worker_key).expect("the worker's state");
    assert_eq!((states[0], states[1]), (worker, tstate), "newest first");
    assert_eq!(walk::find_thread_state(&mem, &cfg, key ^ 0x5a5a_0000), None);

    // 3. The walk, named, is the interpreter's own stack.
    let w = walk::walk_frames(&mem, &cfg, tstate);
    assert_eq!(w.end, py_end::COMPLETE, "{w:x?}");
    let frames = info["frames"].as_array().unwrap();
    let stack = info["stack"].as_array().unwrap();
    assert_eq!(frames.len(), stack.len());
    let codes: Vec<u64> = w.words.iter().map(|&x| py_frame::code(x)).collect();
    let want_codes: Vec<u64> = frames.iter().map(|f| f["code"].as_u64().unwrap()).collect();
    assert_eq!(codes, want_codes, "code objects, innermost first");

    let mut resolver = rt.resolver();
    let named = resolver.resolve_stack(&mem, &w.words);
    let got: Vec<(String, String, Option<u32>)> = named
        .iter()
        .map(|f| {
            let f = f.as_ref().expect("every frame resolves");
            (f.function.clone(), f.file.clone(), f.line)
        })
        .collect();
    let want: Vec<(String, String, Option<u32>)> = frames
        .iter()
        .map(|f| {
            let line = f["line"].as_u64().map(|l| l as u32);
            (f["function"].as_str().unwrap().to_string(), f["file"].as_str().unwrap().to_string(), line)
        })
        .collect();
    assert_eq!(got, want, "functions, files, lines");
    // And the same as traceback.extract_stack() (which gives co_name).
    for ((frame, s), named) in frames.iter().zip(stack).zip(&named) {
        let named = named.as_ref().unwrap();
        assert_eq!(s["name"], frame["name"]);
        assert_eq!(s["file"].as_str(), Some(named.file.as_str()));
        assert_eq!(s["line"].as_u64(), named.line.map(u64::from));
    }
    let funcs: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
    let method = if minor >= 11 { "Klass.method" } else { "method" };
    assert_eq!(funcs, ["block", "gen", "𠀀", "函数", "grüße", method, "main", "<module>"]);

    // Entries: every frame in 3.9/3.10; from 3.11 the ones a C function called.
    let entries: Vec<&str> =
        got.iter().zip(&w.words).filter(|(_, w)| py_frame::entry(**w)).map(|(g, _)| g.0.as_str()).collect();
    if flavor == py_flavor::FRAME_OBJECT {
        assert_eq!(entries, funcs);
    } else {
        let want: Vec<&str> =
            info["entries"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let mut want_in_order: Vec<&str> = funcs.iter().copied().filter(|f| want.contains(f)).collect();
        want_in_order.dedup();
        assert_eq!(entries, want_in_order);
    }

    // The worker's walk ends in worker() waiting, under threading's bootstrap frames.
    let ww = walk::walk_frames(&mem, &cfg, worker);
    assert_eq!(ww.end, py_end::COMPLETE);
    let wnamed = resolver.resolve_stack(&mem, &ww.words);
    let wfuncs: Vec<&str> = wnamed.iter().map(|f| f.as_ref().expect("resolves").function.as_str()).collect();
    assert!(wfuncs.contains(&"worker"), "{wfuncs:?}");
    assert!(wfuncs.last().unwrap().ends_with("_bootstrap"), "{wfuncs:?}");

    // The cache answers the same the second time.
    assert_eq!(resolver.resolve_stack(&mem, &w.words), named);
    eprintln!(
        "{python}: CPython {} in {}, {} thread state(s), {} frames: {}",
        rt.version,
        rt.module.display(),
        rt.threads_seen,
        named.len(),
        named.iter().map(|f| f.as_ref().unwrap().to_string()).collect::<Vec<_>>().join(" <- ")
    );
}

#[test]
fn debian_python3_11() {
    check("/usr/bin/python3.11", 11, py_flavor::CFRAME_311, "/usr/bin/python3.11");
}

#[test]
fn pyenv_3_9() {
    check("/root/.pyenv/versions/3.9.18/bin/python3.9", 9, py_flavor::FRAME_OBJECT, "libpython3.9.so");
}

#[test]
fn pyenv_3_10() {
    check("/root/.pyenv/versions/3.10.13/bin/python3.10", 10, py_flavor::FRAME_OBJECT, "libpython3.10.so");
}

#[test]
fn pyenv_3_11() {
    check("/root/.pyenv/versions/3.11.7/bin/python3.11", 11, py_flavor::CFRAME_311, "libpython3.11.so");
}

#[test]
fn pyenv_3_12() {
    check("/root/.pyenv/versions/3.12.1/bin/python3.12", 12, py_flavor::CFRAME_312, "libpython3.12.so");
}

#[test]
fn pyenv_3_13() {
    check("/root/.pyenv/versions/3.13.0/bin/python3.13", 13, py_flavor::CURRENT_313, "libpython3.13.so");
}

#[test]
fn not_cpython_is_none_and_old_cpython_says_why() {
    require_root();
    // A process with no _PyRuntime.
    let mut sleep = Command::new("sleep").arg("30").spawn().unwrap();
    let got = cpython::detect(sleep.id() as i32);
    let _ = sleep.kill();
    let _ = sleep.wait();
    assert!(matches!(got, Ok(None)), "{got:?}");
    // CPython 3.8: recognised, refused with a reason.
    let (child, _) = start_plain("/root/.pyenv/versions/3.8.18/bin/python3.8");
    let err = cpython::detect(child.0.id() as i32).expect_err("3.8 is not supported");
    assert!(err.to_string().contains("3.9 to 3.13"), "{err}");
}

/// Starts `python` blocking on stdin after printing a line.
fn start_plain(python: &str) -> (Python, ()) {
    let mut child = Command::new(python)
        .args(["-c", "import sys; print('ready', flush=True); sys.stdin.readline()"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    (Python(child), ())
}
