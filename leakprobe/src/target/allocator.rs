//! Which allocator the target really uses, and which module each hook goes on.
//!
//! A call to `malloc` binds to the first module in the dynamic loader's search order that
//! defines it: the executable, then LD_PRELOAD libraries, then DT_NEEDED libraries breadth
//! first. So with jemalloc preloaded or linked, glibc's malloc is never called and probing it
//! would report a silent zero. Every hooked name is therefore placed on the module it binds
//! to. Definitions that are shadowed get a counting probe, so that calls into them (which
//! nothing tracks) show up as a drop instead of passing unseen.

use std::{collections::HashMap, path::PathBuf};

use thiserror::Error;

use crate::target::{
    self, Mapping,
    elf::{self, FunctionSym},
};

/// An allocation-family function and the programs that watch it.
#[derive(Debug)]
pub struct Hook {
    pub function: &'static str,
    pub entry: &'static str,
    /// Whether the return is needed (to learn the returned address).
    pub exit: bool,
    pub required: bool,
    /// Starts with a NULL check of its first argument that the probe may skip (free).
    pub null_check: bool,
}

const fn alloc(function: &'static str, entry: &'static str) -> Hook {
    Hook { function, entry, exit: true, required: false, null_check: false }
}

const fn dealloc(function: &'static str) -> Hook {
    Hook { function, entry: "free_enter", exit: false, required: false, null_check: true }
}

const fn wrapper(function: &'static str, entry: &'static str) -> Hook {
    Hook { function, entry, exit: false, required: false, null_check: false }
}

/// The C allocation family. malloc and free must attach somewhere.
pub const STANDARD: &[Hook] = &[
    Hook { function: "malloc", entry: "malloc_enter", exit: true, required: true, null_check: false },
    Hook { function: "free", entry: "free_enter", exit: false, required: true, null_check: true },
    alloc("calloc", "calloc_enter"),
    alloc("realloc", "realloc_enter"),
    alloc("reallocarray", "reallocarray_enter"),
    alloc("posix_memalign", "posix_memalign_enter"),
    alloc("aligned_alloc", "aligned_alloc_enter"),
    alloc("memalign", "memalign_enter"),
    alloc("valloc", "valloc_enter"),
    alloc("pvalloc", "pvalloc_enter"),
    alloc("mmap", "mmap_enter"),
    Hook { function: "munmap", entry: "munmap_enter", exit: false, required: false, null_check: false },
];

/// Names whose shadowed definitions are watched (counted, not tracked).
const WATCHED: &[&str] = &["malloc", "calloc", "realloc"];

/// operator new/delete when the C++ runtime defines them: its operator new calls malloc, so
/// its entry only lends the C++ caller's stack to the malloc inside.
pub const CXX_WRAPPERS: &[Hook] = &[
    wrapper("_Znwm", "cxx_new_enter"),
    wrapper("_ZnwmRKSt9nothrow_t", "cxx_new_enter"),
    wrapper("_ZnwmSt11align_val_t", "cxx_new_enter"),
    wrapper("_ZnwmSt11align_val_tRKSt9nothrow_t", "cxx_new_enter"),
    wrapper("_Znam", "cxx_new_array_enter"),
    wrapper("_ZnamRKSt9nothrow_t", "cxx_new_array_enter"),
    wrapper("_ZnamSt11align_val_t", "cxx_new_array_enter"),
    wrapper("_ZnamSt11align_val_tRKSt9nothrow_t", "cxx_new_array_enter"),
];

/// operator new/delete when an allocator defines them (jemalloc, tcmalloc, mimalloc): they
/// allocate through internal paths, never through the exported malloc, so they are
/// allocation and free functions of their own.
const CXX_DIRECT: &[Hook] = &[
    alloc("_Znwm", "new_enter"),
    alloc("_ZnwmRKSt9nothrow_t", "new_enter"),
    alloc("_ZnwmSt11align_val_t", "new_enter"),
    alloc("_ZnwmSt11align_val_tRKSt9nothrow_t", "new_enter"),
    alloc("_Znam", "new_array_enter"),
    alloc("_ZnamRKSt9nothrow_t", "new_array_enter"),
    alloc("_ZnamSt11align_val_t", "new_array_enter"),
    alloc("_ZnamSt11align_val_tRKSt9nothrow_t", "new_array_enter"),
    dealloc("_ZdlPv"),
    dealloc("_ZdaPv"),
    dealloc("_ZdlPvm"),
    dealloc("_ZdaPvm"),
    dealloc("_ZdlPvRKSt9nothrow_t"),
    dealloc("_ZdaPvRKSt9nothrow_t"),
    dealloc("_ZdlPvSt11align_val_t"),
    dealloc("_ZdaPvSt11align_val_t"),
    dealloc("_ZdlPvmSt11align_val_t"),
    dealloc("_ZdaPvmSt11align_val_t"),
    dealloc("_ZdlPvSt11align_val_tRKSt9nothrow_t"),
    dealloc("_ZdaPvSt11align_val_tRKSt9nothrow_t"),
];

/// jemalloc's own API, unprefixed (Debian's libjemalloc2) and as prefixed builds name it
/// (`je_` when built with a prefix, `_rjem_` in Rust's tikv-jemallocator). sdallocx and
/// dallocx are how Rust and C++ sized deletes free, so they must be seen.
macro_rules! jemalloc_api {
    ($($p:literal),*) => {
        &[$(
            alloc(concat!($p, "mallocx"), "mallocx_enter"),
            alloc(concat!($p, "rallocx"), "rallocx_enter"),
            dealloc(concat!($p, "dallocx")),
            dealloc(concat!($p, "sdallocx")),
        )*]
    };
}
const JEMALLOC: &[Hook] = jemalloc_api!("", "je_", "_rjem_");

/// The C family under jemalloc's prefixes: a prefixed build does not override malloc, and
/// code calls these names directly.
macro_rules! prefixed_family {
    ($($p:literal),*) => {
        &[$(
            alloc(concat!($p, "malloc"), "malloc_enter"),
            dealloc(concat!($p, "free")),
            alloc(concat!($p, "calloc"), "calloc_enter"),
            alloc(concat!($p, "realloc"), "realloc_enter"),
            alloc(concat!($p, "posix_memalign"), "posix_memalign_enter"),
            alloc(concat!($p, "aligned_alloc"), "aligned_alloc_enter"),
            alloc(concat!($p, "memalign"), "memalign_enter"),
            alloc(concat!($p, "valloc"), "valloc_enter"),
        )*]
    };
}
const JEMALLOC_PREFIXED: &[Hook] = prefixed_family!("je_", "_rjem_");

/// tcmalloc's own names. In Debian's build most are aliases of the standard ones (probed
/// once); the sized free is the one that matters (`operator delete(void*, size_t)`).
const TCMALLOC: &[Hook] = &[
    alloc("tc_malloc", "malloc_enter"),
    dealloc("tc_free"),
    dealloc("tc_free_sized"),
    alloc("tc_calloc", "calloc_enter"),
    alloc("tc_realloc", "realloc_enter"),
    alloc("tc_memalign", "memalign_enter"),
    alloc("tc_posix_memalign", "posix_memalign_enter"),
    alloc("tc_valloc", "valloc_enter"),
    alloc("tc_pvalloc", "pvalloc_enter"),
    alloc("tc_malloc_skip_new_handler", "malloc_enter"),
];

/// mimalloc's own entry points that are separate functions (mi_malloc, mi_free, ... are
/// aliases of the standard names). Calls between them nest and count once.
const MIMALLOC: &[Hook] = &[
    alloc("mi_malloc", "malloc_enter"),
    dealloc("mi_free"),
    alloc("mi_calloc", "calloc_enter"),
    alloc("mi_realloc", "realloc_enter"),
    alloc("mi_zalloc", "malloc_enter"),
    alloc("mi_mallocn", "calloc_enter"),
    alloc("mi_reallocf", "realloc_enter"),
    alloc("mi_malloc_aligned", "malloc_enter"),
    alloc("mi_zalloc_aligned", "malloc_enter"),
    dealloc("mi_free_size"),
    dealloc("mi_free_aligned"),
    dealloc("mi_free_size_aligned"),
];

/// Every table, in the order hooks are planned.
const TABLES: &[&[Hook]] = &[STANDARD, JEMALLOC, JEMALLOC_PREFIXED, TCMALLOC, MIMALLOC];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocatorKind {
    Glibc,
    Jemalloc,
    Tcmalloc,
    Mimalloc,
    Musl,
    /// Defines malloc but is none of the above.
    #[value(skip)]
    Other,
}

impl AllocatorKind {
    pub fn name(self) -> &'static str {
        match self {
            AllocatorKind::Glibc => "glibc",
            AllocatorKind::Jemalloc => "jemalloc",
            AllocatorKind::Tcmalloc => "tcmalloc",
            AllocatorKind::Mimalloc => "mimalloc",
            AllocatorKind::Musl => "musl",
            AllocatorKind::Other => "other",
        }
    }
}

/// `--allocator` / `--lib`: which module the C family is hooked on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Choice {
    pub allocator: Option<AllocatorKind>,
    pub lib: Option<String>,
}

#[derive(Debug, Error)]
pub enum AllocatorError {
    #[error(
        "PID {pid} ({exe}) is statically linked and its symbol table has no malloc/free (stripped): \
         there is nothing to hook. Trace an unstripped build (keep .symtab) or a dynamically \
         linked one"
    )]
    StaticStripped { pid: i32, exe: String },
    #[error("PID {pid} ({exe}) maps no module that defines malloc and free; nothing to hook")]
    NoAllocator { pid: i32, exe: String },
    #[error("--allocator {wanted}: PID {pid} maps no {wanted} allocator (it maps: {mapped})")]
    KindNotMapped { pid: i32, wanted: &'static str, mapped: String },
    #[error("--lib {lib}: PID {pid} maps no such library (it maps: {mapped})")]
    LibNotMapped { pid: i32, lib: String, mapped: String },
    #[error("--lib {lib} is {found}, not {wanted} as --allocator says")]
    KindMismatch { lib: String, found: &'static str, wanted: &'static str },
    #[error("--lib {lib} defines no malloc and free to hook")]
    LibWithoutMalloc { lib: String },
    #[error("cannot read the target's modules")]
    Target {
        #[source]
        source: target::TargetError,
    },
}

/// One mapped file, as the loader sees it.
#[derive(Clone, Debug)]
pub struct Module {
    pub mapping: Mapping,
    pub is_exe: bool,
    pub dynamic: elf::Dynamic,
    /// Allocation functions it defines (the executable: every symbol; libraries: exported).
    pub syms: HashMap<String, FunctionSym>,
    pub kind: Option<AllocatorKind>,
}

/// What the module is, from the functions it defines.
fn kind_of(file_name: &str, syms: &HashMap<String, FunctionSym>) -> Option<AllocatorKind> {
    let has = |n: &str| syms.contains_key(n);
    if has("mallocx") || has("je_mallocx") || has("_rjem_mallocx") {
        Some(AllocatorKind::Jemalloc)
    } else if has("tc_malloc") {
        Some(AllocatorKind::Tcmalloc)
    } else if has("mi_malloc") {
        Some(AllocatorKind::Mimalloc)
    } else if file_name.starts_with("ld-musl")
        || file_name.starts_with("libc.musl")
        || has("__libc_malloc_impl")
        // Debian's musl: /lib/ld-musl-x86_64.so.1 links to .../x86_64-linux-musl/libc.so,
        // which, unlike glibc's libc, exports no __libc_malloc.
        || (file_name == "libc.so" && has("malloc") && !has("__libc_malloc"))
    {
        Some(AllocatorKind::Musl)
    } else if has("__libc_malloc") && has("malloc") {
        Some(AllocatorKind::Glibc)
    } else if has("malloc") && has("free") {
        Some(AllocatorKind::Other)
    } else {
        None
    }
}

/// The static name of a function some table hooks as a free.
pub fn hooked_free(name: &str) -> Option<&'static str> {
    TABLES
        .iter()
        .flat_map(|t| t.iter())
        .chain(CXX_DIRECT)
        .filter(|h| h.entry == "free_enter")
        .map(|h| h.function)
        .find(|f| *f == name)
}

/// Every name any table hooks, plus the ones that tell allocators apart.
fn interesting_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> =
        TABLES.iter().flat_map(|t| t.iter()).chain(CXX_DIRECT).map(|h| h.function).collect();
    names.extend(["__libc_malloc", "__libc_malloc_impl"]);
    names.sort_unstable();
    names.dedup();
    names
}

/// Reads the target's mapped files (one entry per file, in address order).
pub fn scan(pid: i32) -> Result<Vec<Module>, AllocatorError> {
    let maps = target::exec_mappings(pid).map_err(|source| AllocatorError::Target { source })?;
    let exe = target::exe_of(pid);
    let names = interesting_names();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for m in maps {
        if !seen.insert((m.dev, m.inode)) {
            continue;
        }
        let is_exe = exe.as_ref().is_some_and(|e| *e == m.path);
        let Ok(mut file) = target::open_mapping(pid, &m) else { continue };
        let mut data = Vec::new();
        if std::io::Read::read_to_end(&mut file, &mut data).is_err() {
            continue;
        }
        let syms = elf::functions_in(&data, &names, !is_exe).unwrap_or_default();
        let dynamic = elf::dynamic(&data);
        let kind = kind_of(&m.file_name(), &syms);
        out.push(Module { mapping: m, is_exe, dynamic, syms, kind });
    }
    Ok(out)
}

/// LD_PRELOAD as the target started with it (only that variable is read from its
/// environment), and /etc/ld.so.preload in its root.
pub fn preloads(pid: i32) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
        for var in env.split(|b| *b == 0) {
            if let Some(v) = var.strip_prefix(b"LD_PRELOAD=") {
                let v = String::from_utf8_lossy(v);
                out.extend(v.split([':', ' ']).filter(|s| !s.is_empty()).map(str::to_string));
            }
        }
    }
    if let Ok(f) =
        std::fs::read_to_string(target::target_path(pid, std::path::Path::new("/etc/ld.so.preload")))
    {
        out.extend(f.split_whitespace().map(str::to_string));
    }
    out
}

fn names_module(m: &Module, name: &str) -> bool {
    let file = m.mapping.file_name();
    m.mapping.path.as_os_str() == name
        || file == name
        || m.dynamic.soname.as_deref() == Some(name)
        // A preload named through a symlink (libtcmalloc_minimal.so.4 -> ...so.4.5.10).
        || (name.contains('/')
            && PathBuf::from(name).file_name().is_some_and(|n| {
                n == file.as_str() || m.dynamic.soname.as_deref().is_some_and(|s| n == s)
            }))
}

/// The loader's symbol search order over `modules`: executable, preloads, then DT_NEEDED
/// breadth first. Modules reached no way (dlopen'ed) come last, in address order.
pub fn binding_order(modules: &[Module], preload: &[String]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..modules.len()).filter(|&i| modules[i].is_exe).collect();
    let push = |order: &mut Vec<usize>, i: usize| {
        if !order.contains(&i) {
            order.push(i);
        }
    };
    for p in preload {
        if let Some(i) = modules.iter().position(|m| names_module(m, p)) {
            push(&mut order, i);
        }
    }
    let mut at = 0;
    while at < order.len() {
        let needed = modules[order[at]].dynamic.needed.clone();
        for n in needed {
            if let Some(i) = modules.iter().position(|m| names_module(m, &n)) {
                push(&mut order, i);
            }
        }
        at += 1;
    }
    for i in 0..modules.len() {
        push(&mut order, i);
    }
    order
}

/// Hooks to attach on one module.
#[derive(Clone, Debug)]
pub struct ModuleHooks {
    pub module: Mapping,
    pub hooks: Vec<&'static Hook>,
}

/// Where every hook goes.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The allocator the target's malloc binds to, and its module.
    pub allocator: AllocatorKind,
    pub module: Mapping,
    pub chosen_by: &'static str,
    /// Other allocators hooked through their own names (a `_rjem_` jemalloc inside the
    /// executable, say), by module.
    pub also: Vec<(AllocatorKind, Mapping)>,
    pub hooks: Vec<ModuleHooks>,
    /// Shadowed definitions: counted when called, not tracked.
    pub watch: Vec<ModuleHooks>,
    /// The C++ runtime, when its operator new is the one in use (wrapper hooks).
    pub cxx: Option<Mapping>,
    /// The executable is statically linked; its own symbols are hooked.
    pub static_exe: bool,
}

fn mapped_list(modules: &[Module]) -> String {
    let names: Vec<String> = modules
        .iter()
        .map(|m| match m.kind {
            Some(k) => format!("{} [{}]", m.mapping.file_name(), k.name()),
            None => m.mapping.file_name(),
        })
        .collect();
    names.join(", ")
}

/// Decides where each hook goes. Pure: `modules` and `preload` come from [`scan`] and
/// [`preloads`].
pub fn plan(
    pid: i32,
    exe: &str,
    modules: &[Module],
    preload: &[String],
    choice: &Choice,
) -> Result<Plan, AllocatorError> {
    let mut order = binding_order(modules, preload);
    let mut chosen_by = "auto";
    if let Some(lib) = &choice.lib {
        let found = modules
            .iter()
            .position(|m| names_module(m, lib) || m.mapping.file_name().starts_with(lib.as_str()));
        let Some(i) = found else {
            return Err(AllocatorError::LibNotMapped { pid, lib: lib.clone(), mapped: mapped_list(modules) });
        };
        let m = &modules[i];
        if !(m.syms.contains_key("malloc") && m.syms.contains_key("free")) {
            return Err(AllocatorError::LibWithoutMalloc { lib: lib.clone() });
        }
        if let Some(want) = choice.allocator {
            let found = m.kind.unwrap_or(AllocatorKind::Other);
            if found != want {
                return Err(AllocatorError::KindMismatch {
                    lib: lib.clone(),
                    found: found.name(),
                    wanted: want.name(),
                });
            }
        }
        order.retain(|&j| j != i);
        order.insert(0, i);
        chosen_by = "--lib";
    } else if let Some(want) = choice.allocator {
        let found = order
            .iter()
            .copied()
            .find(|&i| modules[i].kind == Some(want) && modules[i].syms.contains_key("malloc"));
        let Some(i) = found else {
            return Err(AllocatorError::KindNotMapped {
                pid,
                wanted: want.name(),
                mapped: mapped_list(modules),
            });
        };
        order.retain(|&j| j != i);
        order.insert(0, i);
        chosen_by = "--allocator";
    }

    let binds = |name: &str| order.iter().copied().find(|&i| modules[i].syms.contains_key(name));
    let static_exe = modules.iter().any(|m| m.is_exe && !m.dynamic.interp)
        && modules.iter().filter(|m| !m.is_exe).all(|m| m.kind.is_none());
    let (Some(malloc_at), Some(_)) = (binds("malloc"), binds("free")) else {
        return Err(if static_exe {
            AllocatorError::StaticStripped { pid, exe: exe.to_string() }
        } else {
            AllocatorError::NoAllocator { pid, exe: exe.to_string() }
        });
    };

    let mut per_module: HashMap<usize, Vec<&'static Hook>> = HashMap::new();
    for h in TABLES.iter().flat_map(|t| t.iter()) {
        if let Some(i) = binds(h.function) {
            per_module.entry(i).or_default().push(h);
        }
    }
    // operator new: a wrapper in the C++ runtime, an allocation function in an allocator.
    let mut cxx = None;
    if let Some(i) = binds("_Znwm") {
        if target::is_cxx(&modules[i].mapping.file_name()) {
            cxx = Some(modules[i].mapping.clone());
        } else {
            for h in CXX_DIRECT {
                if let Some(j) =
                    binds(h.function).filter(|j| !target::is_cxx(&modules[*j].mapping.file_name()))
                {
                    per_module.entry(j).or_default().push(h);
                }
            }
        }
    }
    if cxx.is_none() {
        // Mapped but unused for now (or shadowed): wrappers are harmless and catch the
        // case where it is used.
        cxx = modules.iter().find(|m| target::is_cxx(&m.mapping.file_name())).map(|m| m.mapping.clone());
        if binds("_Znwm").is_some_and(|i| !target::is_cxx(&modules[i].mapping.file_name())) {
            cxx = None;
        }
    }

    let mut watch: HashMap<usize, Vec<&'static Hook>> = HashMap::new();
    for name in WATCHED {
        let Some(bound) = binds(name) else { continue };
        let Some(h) = STANDARD.iter().find(|h| h.function == *name) else { continue };
        for (i, m) in modules.iter().enumerate() {
            if i != bound && m.syms.contains_key(*name) && !m.is_exe {
                watch.entry(i).or_default().push(h);
            }
        }
    }

    // Allocators hooked besides the one malloc binds to (glibc or musl there only lend
    // functions the allocator lacks, like mmap).
    let mut also: Vec<(usize, AllocatorKind)> = per_module
        .keys()
        .filter(|&&i| i != malloc_at)
        .filter_map(|&i| modules[i].kind.map(|k| (i, k)))
        .filter(|(_, k)| !matches!(k, AllocatorKind::Glibc | AllocatorKind::Musl))
        .collect();
    also.sort_by_key(|(i, _)| *i);
    let also = also.into_iter().map(|(i, k)| (k, modules[i].mapping.clone())).collect();

    // Hooks in binding order, so the report lists the allocator in use first.
    let to_list = |map: HashMap<usize, Vec<&'static Hook>>| {
        let mut v: Vec<(usize, Vec<&'static Hook>)> = map.into_iter().collect();
        v.sort_by_key(|(i, _)| order.iter().position(|j| j == i));
        v.into_iter().map(|(i, hooks)| ModuleHooks { module: modules[i].mapping.clone(), hooks }).collect()
    };
    Ok(Plan {
        allocator: modules[malloc_at].kind.unwrap_or(AllocatorKind::Other),
        module: modules[malloc_at].mapping.clone(),
        chosen_by,
        also,
        hooks: to_list(per_module),
        watch: to_list(watch),
        cxx,
        static_exe,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str, is_exe: bool, funcs: &[&str], needed: &[&str]) -> Module {
        let syms = funcs
            .iter()
            .enumerate()
            .map(|(i, f)| (f.to_string(), FunctionSym { offset: 0x1000 + i as u64 * 16, size: 16 }))
            .collect::<HashMap<_, _>>();
        Module {
            mapping: Mapping {
                start: 0,
                end: 0,
                file_offset: 0,
                path: PathBuf::from(format!("/usr/lib/{name}")),
                dev: (0, 0),
                inode: 0,
            },
            is_exe,
            dynamic: elf::Dynamic {
                interp: is_exe,
                soname: None,
                needed: needed.iter().map(|s| s.to_string()).collect(),
            },
            kind: kind_of(name, &syms),
            syms,
        }
    }

    #[test]
    fn only_frees_count_as_free_forwarders() {
        assert_eq!(hooked_free("free"), Some("free"));
        assert_eq!(hooked_free("sdallocx"), Some("sdallocx"));
        assert_eq!(hooked_free("_Znwm"), None);
        assert_eq!(hooked_free("malloc"), None);
    }

    fn hooked_on(p: &Plan, func: &str) -> Option<String> {
        p.hooks.iter().find(|m| m.hooks.iter().any(|h| h.function == func)).map(|m| m.module.file_name())
    }

    const GLIBC: &[&str] =
        &["malloc", "free", "calloc", "realloc", "reallocarray", "mmap", "munmap", "__libc_malloc"];
    const JE: &[&str] = &["malloc", "free", "calloc", "realloc", "mallocx", "sdallocx", "_Znwm", "_ZdlPvm"];

    #[test]
    fn linked_jemalloc_wins_over_glibc() {
        let mods = [
            module("libc.so.6", false, GLIBC, &[]),
            module("app", true, &["main"], &["libjemalloc.so.2", "libc.so.6"]),
            module("libjemalloc.so.2", false, JE, &["libc.so.6"]),
            module("libstdc++.so.6", false, &["_Znwm"], &["libc.so.6"]),
        ];
        let p = plan(1, "app", &mods, &[], &Choice::default()).unwrap();
        assert_eq!(p.allocator, AllocatorKind::Jemalloc);
        assert_eq!(hooked_on(&p, "malloc").as_deref(), Some("libjemalloc.so.2"));
        assert_eq!(hooked_on(&p, "sdallocx").as_deref(), Some("libjemalloc.so.2"));
        // What jemalloc lacks still binds to glibc.
        assert_eq!(hooked_on(&p, "reallocarray").as_deref(), Some("libc.so.6"));
        assert_eq!(hooked_on(&p, "mmap").as_deref(), Some("libc.so.6"));
        // jemalloc's operator new comes first: hooked as an allocation, no wrapper.
        assert_eq!(hooked_on(&p, "_Znwm").as_deref(), Some("libjemalloc.so.2"));
        assert!(p.cxx.is_none());
        // glibc's shadowed malloc is watched.
        assert_eq!(p.watch.len(), 1);
        assert_eq!(p.watch[0].module.file_name(), "libc.so.6");
    }

    #[test]
    fn preload_beats_needed_and_overrides_choose() {
        let tc = &["malloc", "free", "tc_malloc", "mmap", "munmap"];
        let mods = [
            module("app", true, &[], &["libc.so.6"]),
            module("libc.so.6", false, GLIBC, &[]),
            module("libtcmalloc_minimal.so.4", false, tc, &["libc.so.6"]),
        ];
        let none = plan(1, "app", &mods, &[], &Choice::default()).unwrap();
        assert_eq!(none.allocator, AllocatorKind::Glibc, "not preloaded, not needed: dlopen'ed, comes last");
        let pre = ["/usr/lib/libtcmalloc_minimal.so.4".to_string()];
        let p = plan(1, "app", &mods, &pre, &Choice::default()).unwrap();
        assert_eq!(p.allocator, AllocatorKind::Tcmalloc);
        assert_eq!(hooked_on(&p, "mmap").as_deref(), Some("libtcmalloc_minimal.so.4"));
        let forced =
            plan(1, "app", &mods, &pre, &Choice { allocator: Some(AllocatorKind::Glibc), lib: None })
                .unwrap();
        assert_eq!(forced.allocator, AllocatorKind::Glibc);
        assert_eq!(forced.chosen_by, "--allocator");
        let by_lib = plan(1, "app", &mods, &[], &Choice { allocator: None, lib: Some("libtcmalloc".into()) });
        assert_eq!(by_lib.unwrap().allocator, AllocatorKind::Tcmalloc);
        let missing =
            plan(1, "app", &mods, &[], &Choice { allocator: Some(AllocatorKind::Mimalloc), lib: None });
        assert!(missing.unwrap_err().to_string().contains("maps no mimalloc"));
        let bad_lib = plan(1, "app", &mods, &[], &Choice { allocator: None, lib: Some("libfoo.so".into()) });
        assert!(bad_lib.unwrap_err().to_string().contains("libfoo.so"));
        let mismatch = plan(
            1,
            "app",
            &mods,
            &[],
            &Choice { allocator: Some(AllocatorKind::Jemalloc), lib: Some("libc.so.6".into()) },
        );
        assert!(matches!(mismatch, Err(AllocatorError::KindMismatch { .. })));
    }

    #[test]
    fn static_executables() {
        let hooked = [module("app", false, &["malloc", "free", "__libc_malloc", "mmap"], &[])];
        let mut hooked = hooked;
        hooked[0].is_exe = true;
        let p = plan(1, "app", &hooked, &[], &Choice::default()).unwrap();
        assert!(p.static_exe);
        assert_eq!(hooked_on(&p, "malloc").as_deref(), Some("app"));
        let mut stripped = module("app", true, &[], &[]);
        stripped.dynamic.interp = false;
        let e = plan(1, "app", &[stripped], &[], &Choice::default()).unwrap_err();
        assert!(matches!(e, AllocatorError::StaticStripped { .. }), "{e}");
    }

    #[test]
    fn prefixed_jemalloc_in_the_executable_is_hooked_beside_glibc() {
        let mods = [
            module("app", true, &["_rjem_malloc", "_rjem_mallocx", "_rjem_sdallocx"], &["libc.so.6"]),
            module("libc.so.6", false, GLIBC, &[]),
        ];
        let p = plan(1, "app", &mods, &[], &Choice::default()).unwrap();
        assert_eq!(p.allocator, AllocatorKind::Glibc);
        assert_eq!(hooked_on(&p, "_rjem_sdallocx").as_deref(), Some("app"));
        assert_eq!(hooked_on(&p, "malloc").as_deref(), Some("libc.so.6"));
        assert_eq!(p.also.len(), 1);
        assert_eq!(p.also[0].0, AllocatorKind::Jemalloc);
    }
}
