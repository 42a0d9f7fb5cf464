//! CPython: recognising the runtime in a process, and naming its frames.
//!
//! - [`detect()`] (I/O, in `detect.rs`): finds the module that defines `_PyRuntime`, its
//!   version, and checks the version's [`Layout`] against the live process.
//! - [`Runtime::bpf_config`]: what the eBPF side needs to walk a thread's frames; the walk
//!   itself is [`walk::walk_frames`], the reference the kernel side mirrors.
//! - [`CodeResolver`]: frame words to `function (file:line)`.
//! - [`allocators::find_allocators`]: the RAW/MEM/OBJ `PyMemAllocatorEx` slots and what holds
//!   them (pymalloc, tracemalloc, the debug hooks, an unknown wrapper).
//!
//! Supported: CPython 3.9–3.13, x86_64, default (GIL, non-debug) builds. Anything else, or a
//! layout that does not check out in the process, is a [`DetectError`] saying why.

pub mod allocators;
pub mod code;
mod detect;
pub mod freelists;
pub mod layout;
pub mod linetable;
pub mod objects;
pub mod pymalloc;
pub mod roots;
pub mod walk;

use std::path::PathBuf;

pub use code::{CodeResolver, PyFrame, TypeAddrs};
pub use detect::detect;
pub use layout::{Layout, PyVersion};
use leakprobe_common::PyConfig;
use thiserror::Error;
pub use walk::{PyWalk, find_thread_state, thread_key, thread_states, walk_frames};

/// A native function of the interpreter, at runtime addresses: where a Python frame's
/// native frames begin (each `py_frame::ENTRY` frame has one C evaluation loop).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeFunction {
    pub name: String,
    pub start: u64,
    pub end: u64,
}

/// A CPython runtime recognised in a live process.
#[derive(Clone, Debug)]
pub struct Runtime {
    pub pid: i32,
    pub version: PyVersion,
    /// The module defining `_PyRuntime`: the executable or a `libpython3.X.so`.
    pub module: PathBuf,
    /// Runtime address - ELF address of `module`.
    pub bias: u64,
    /// `&_PyRuntime`.
    pub py_runtime: u64,
    /// `&PyCode_Type`, `&PyUnicode_Type`, `&PyBytes_Type`.
    pub types: TypeAddrs,
    /// `_PyEval_EvalFrameDefault` and its split-off parts (`.cold`), when the symbols say.
    pub eval_frame: Vec<NativeFunction>,
    pub layout: Layout,
    /// 3.13+: the layout was confirmed by the process's own `_Py_DebugOffsets`.
    pub from_debug_offsets: bool,
    /// Thread states seen at detection, and how many had their frames walked.
    pub threads_seen: usize,
    pub frames_seen: usize,
}

impl Runtime {
    /// The configuration of the eBPF walk ([`walk::walk_frames`] documents its meaning).
    pub fn bpf_config(&self) -> PyConfig {
        walk::config(&self.layout, self.py_runtime, self.types.code)
    }

    /// A resolver for this runtime's code objects.
    pub fn resolver(&self) -> CodeResolver {
        CodeResolver::new(self.layout.code, self.types)
    }

    /// Whether `addr` is inside the evaluation loop (to interleave Python frames with native
    /// ones at).
    pub fn in_eval_frame(&self, addr: u64) -> bool {
        self.eval_frame.iter().any(|f| f.start <= addr && addr < f.end)
    }
}

/// Why a process's CPython cannot be walked. One line each: the caller prints it and falls
/// back to native frames.
#[derive(Debug, Error)]
pub enum DetectError {
    #[error("cannot read the mappings of PID {pid}")]
    Maps {
        pid: i32,
        #[source]
        source: procfs::ProcError,
    },
    #[error("cannot read {path}")]
    Module {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} defines _PyRuntime but is not a readable 64-bit ELF file")]
    Elf {
        path: PathBuf,
        #[source]
        source: object::Error,
    },
    #[error("{path} defines _PyRuntime, but its mappings do not match its program headers")]
    Placement { path: PathBuf },
    #[error("CPython in {path}: no {symbol} symbol, so its frames cannot be found")]
    MissingSymbol { path: PathBuf, symbol: &'static str },
    #[error("CPython in {path}: cannot tell its version (no Py_Version, no version in the name)")]
    UnknownVersion { path: PathBuf },
    #[error("CPython {version}: Python frames are supported for CPython 3.9 to 3.13 only")]
    Unsupported { version: PyVersion },
    #[error("CPython {version} is a free-threaded build, whose frames leakprobe cannot walk")]
    FreeThreaded { version: PyVersion },
    #[error("cannot read the memory of PID {pid}: {why}")]
    Memory { pid: i32, why: String },
    #[error("CPython {version}: the {version} layout does not check out in this process: {why}")]
    Layout { version: PyVersion, why: String },
}

/// The version and free-threading a file name announces: `python3.11`, `libpython3.10.so.1.0`,
/// `python3.13t`, `libpython3.13t.so`. `None` without one.
pub fn version_from_name(name: &str) -> Option<(PyVersion, bool)> {
    let at = name.rfind("python")? + "python".len();
    let rest = &name[at..];
    let (major, rest) = rest.split_once('.')?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let minor: u8 = rest.get(..digits)?.parse().ok()?;
    let free_threaded = rest[digits..].starts_with('t');
    let after = rest[digits..].trim_start_matches('t');
    if !(after.is_empty() || after.starts_with('.') || after.starts_with('-')) {
        return None;
    }
    Some((PyVersion { major: major.parse().ok()?, minor, micro: None }, free_threaded))
}

/// The CPython version in a module's read-only data: the `PY_VERSION` string ("3.9.18",
/// "3.13.0rc1", "3.12.1+") that `Py_GetVersion` formats. `None` unless exactly one 3.x
/// version appears.
pub fn version_from_rodata(rodata: &[u8]) -> Option<PyVersion> {
    let mut found: Option<PyVersion> = None;
    for s in rodata.split(|&b| b == 0) {
        let Ok(s) = std::str::from_utf8(s) else { continue };
        let Some(rest) = s.strip_prefix("3.") else { continue };
        let mut parts = rest.splitn(2, '.');
        let (Some(minor), Some(tail)) = (parts.next(), parts.next()) else { continue };
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        let suffix = &tail[digits..];
        let suffix_ok = suffix.is_empty()
            || suffix == "+"
            || ["a", "b", "rc"].iter().any(|p| {
                suffix.strip_prefix(p).is_some_and(|n| {
                    let n = n.trim_end_matches('+');
                    !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                })
            });
        let (Ok(minor), Ok(micro)) = (minor.parse::<u8>(), tail[..digits].parse::<u8>()) else { continue };
        if !suffix_ok || digits == 0 {
            continue;
        }
        let v = PyVersion { major: 3, minor, micro: Some(micro) };
        match found {
            Some(f) if f != v => return None,
            _ => found = Some(v),
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_names() {
        let v = |s| version_from_name(s).map(|(v, t)| (v.to_string(), t));
        assert_eq!(v("python3.11"), Some(("3.11".into(), false)));
        assert_eq!(v("libpython3.10.so.1.0"), Some(("3.10".into(), false)));
        assert_eq!(v("libpython3.9.so"), Some(("3.9".into(), false)));
        assert_eq!(v("python3.13t"), Some(("3.13".into(), true)));
        assert_eq!(v("libpython3.13t.so.1.0"), Some(("3.13".into(), true)));
        assert_eq!(v("python3"), None);
        assert_eq!(v("python"), None);
        assert_eq!(v("uwsgi"), None);
        assert_eq!(v("python3.11x"), None);
    }

    #[test]
    fn versions_from_rodata() {
        let v = |b: &[u8]| version_from_rodata(b).map(|v| v.to_string());
        assert_eq!(v(b"junk\x003.9.18\x00%.80s (%.80s) %.80s\x00"), Some("3.9.18".into()));
        assert_eq!(v(b"\x003.13.0rc1\x00x\x003.13.0rc1\x00"), Some("3.13.0".into()));
        assert_eq!(v(b"\x003.12.1+\x00"), Some("3.12.1".into()));
        assert_eq!(v(b"\x003.1.2.3\x00"), None, "not a version");
        assert_eq!(v(b"\x003.9.18\x003.10.1\x00"), None, "ambiguous");
        assert_eq!(v(b"nothing"), None);
    }
}
