//! Recognising V8 in a live process: the module (the `node` executable or `libnode.so`)
//! that exports V8's post-mortem constants, read from its ELF symbols and /proc/PID/mem.
//! All the I/O of `runtimes::v8` is here.

use std::{collections::HashMap, path::PathBuf};

use super::layout::{Constants, Layout, LayoutError, V8Version};
use crate::{
    ptrace::Mem,
    runtimes::Memory,
    target::{self, elf},
};

/// Why a V8 target's JavaScript frames cannot be read.
#[derive(Debug, thiserror::Error)]
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
    #[error("{path} exports V8's constants, but its mappings do not match its program headers")]
    Placement { path: PathBuf },
    #[error("cannot read the memory of PID {pid}: {why}")]
    Memory { pid: i32, why: String },
    #[error("V8 in {path}: {source}")]
    Layout {
        path: PathBuf,
        #[source]
        source: LayoutError,
    },
}

/// V8 as found in a process.
#[derive(Debug)]
pub struct Runtime {
    pub module: PathBuf,
    pub version: Option<V8Version>,
    pub layout: Layout,
}

const VERSION_SYMBOLS: [&str; 4] = [
    "_ZN2v88internal7Version6major_E",
    "_ZN2v88internal7Version6minor_E",
    "_ZN2v88internal7Version6build_E",
    "_ZN2v88internal7Version6patch_E",
];

/// Recognises V8 in `pid`: `Ok(None)` when no module of the process exports V8's
/// post-mortem constants (`v8dbg_*`), an error saying why when one does but its layout
/// cannot be used.
pub fn detect(pid: i32) -> Result<Option<Runtime>, DetectError> {
    // The executable, or a library named like Node's (libnode.so.N): nothing else carries V8.
    let (_, files) = target::runtime_candidates(pid, |name| name.starts_with("libnode"))
        .map_err(|source| DetectError::Maps { pid, source })?;
    for m in &files {
        let data = target::read_mapping(pid, m)
            .map_err(|source| DetectError::Module { path: m.path.clone(), source })?;
        let Ok(syms) = elf::symbols_in(&data, |n| n.starts_with("v8dbg_") || VERSION_SYMBOLS.contains(&n))
        else {
            continue;
        };
        if !syms.contains_key("v8dbg_off_fp_function") {
            continue;
        }
        let loads = elf::loads_in(&data).map_err(|e| DetectError::Module {
            path: m.path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let bias = elf::load_bias(&loads, m.start, m.file_offset)
            .ok_or_else(|| DetectError::Placement { path: m.path.clone() })?;
        let mem = Mem::open(pid).map_err(|e| DetectError::Memory { pid, why: e.to_string() })?;
        let read = |name: &str| syms.get(name).and_then(|s| mem.read_u32(s.address + bias));
        let constants = Constants(
            syms.keys()
                .filter_map(|n| Some((n.strip_prefix("v8dbg_")?.to_string(), read(n)?)))
                .collect::<HashMap<_, _>>(),
        );
        let v: Vec<Option<u32>> = VERSION_SYMBOLS.iter().map(|n| read(n)).collect();
        let version = match v[..] {
            [Some(major), Some(minor), Some(build), Some(patch)] => {
                Some(V8Version { major, minor, build, patch })
            }
            _ => None,
        };
        let layout = Layout::from_constants(&constants, version)
            .map_err(|source| DetectError::Layout { path: m.path.clone(), source })?;
        return Ok(Some(Runtime { module: m.path.clone(), version, layout }));
    }
    Ok(None)
}
