//! **Layer: symbolization.** Addresses to functions, files and lines (blazesym), from the
//! target's own files held open. May read the target's files; knows nothing of eBPF or reports.
//!
//! Addresses to functions, files and lines, with blazesym.
//!
//! Each mapped module's file is opened once, through the target's own /proc view, and kept
//! open: symbols then resolve from the exact inode the target maps, inside containers too, and
//! still resolve after the target exits. One blazesym `Symbolizer` caches parsed files, and
//! results are cached per address, so a second report costs almost nothing.

use std::{
    collections::HashMap,
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

pub mod data;
pub mod mixed;

use blazesym::symbolize::{
    self as bz, Input, Symbolized,
    source::{Elf, Source},
};

use crate::target::{self, Identity, Mapping, TargetError};

/// One frame of a stack, innermost first. Inlined calls are frames of their own.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Frame {
    #[serde(default)]
    pub address: u64,
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    /// Set on frames that were inlined into the frame after them.
    #[serde(default)]
    pub inlined: bool,
    /// An interpreter's frame ("python", "javascript"), not machine code: its address is its
    /// code object (CPython) or its `SharedFunctionInfo` (V8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// The column (1-based), where the runtime gives one (JavaScript).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
}

impl Frame {
    pub(crate) fn unknown(address: u64, module: Option<String>) -> Self {
        Frame {
            address,
            function: None,
            file: None,
            line: None,
            module,
            inlined: false,
            runtime: None,
            column: None,
        }
    }

    /// A Python frame: `function (file:line)`, its code object at `code`.
    pub fn python(code: u64, function: String, file: String, line: Option<u32>) -> Self {
        Frame {
            address: code,
            function: Some(function),
            file: Some(file),
            line,
            module: None,
            inlined: false,
            runtime: Some(PYTHON.to_string()),
            column: None,
        }
    }

    /// A JavaScript frame: `function (file:line:column)`, its `SharedFunctionInfo` at `sfi`.
    pub fn javascript(sfi: u64, f: crate::runtimes::v8::JsFrame) -> Self {
        Frame {
            address: sfi,
            function: Some(f.function),
            file: f.file,
            line: f.line,
            module: None,
            inlined: false,
            runtime: Some(JAVASCRIPT.to_string()),
            column: f.column,
        }
    }

    /// `file:line:column`, `file:line` or `file`, as far as the frame knows.
    pub fn location(&self) -> Option<String> {
        let file = self.file.as_deref()?;
        Some(match (self.line, self.column) {
            (Some(l), Some(c)) => format!("{file}:{l}:{c}"),
            (Some(l), None) => format!("{file}:{l}"),
            _ => file.to_string(),
        })
    }

    /// The frame that names a site: the innermost interpreter frame if there is one (as
    /// tracemalloc groups by the Python line), else the innermost frame. Node's own modules
    /// (`node:buffer`) are passed over for the application's code that called them.
    pub fn headline(frames: &[Frame]) -> Option<&Frame> {
        let runtime = || frames.iter().filter(|f| f.runtime.is_some());
        runtime().find(|f| !f.is_runtime_library()).or_else(|| runtime().next()).or(frames.first())
    }

    /// A frame of the runtime's own library code: Node's built-in modules (`node:events`) and
    /// V8's builtins (which have no script).
    pub fn is_runtime_library(&self) -> bool {
        self.runtime.as_deref() == Some(JAVASCRIPT)
            && self.file.as_deref().is_none_or(|f| f.starts_with("node:") || f.starts_with("internal/"))
    }
}

/// [`Frame::runtime`] of CPython's frames.
pub const PYTHON: &str = "python";
/// [`Frame::runtime`] of V8's JavaScript frames.
pub const JAVASCRIPT: &str = "javascript";

struct Module {
    mapping: Mapping,
    /// `/proc/self/fd/N` of our open handle on the mapped file.
    handle: PathBuf,
}

/// The target's executable mappings, with their files held open.
#[derive(Default)]
pub struct Modules {
    modules: Vec<Module>,
    files: HashMap<((i32, i32), u64), (File, PathBuf)>,
}

impl Modules {
    /// Re-reads the target's mappings (new libraries appear after dlopen). Files already open
    /// are kept. A target that has gone keeps the last table, even when its PID now names
    /// another process: the new table is used only if `id` still names the same process
    /// after it was read.
    pub fn refresh(&mut self, id: &Identity) -> Result<(), TargetError> {
        let pid = id.pid;
        let maps = target::exec_mappings(pid)?;
        if maps.is_empty() {
            return Ok(());
        }
        let mut modules = Vec::with_capacity(maps.len());
        for m in maps {
            let handle = match self.files.entry((m.dev, m.inode)) {
                std::collections::hash_map::Entry::Occupied(e) => e.get().1.clone(),
                std::collections::hash_map::Entry::Vacant(slot) => match target::open_mapping(pid, &m) {
                    Ok(f) => {
                        let handle = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
                        slot.insert((f, handle.clone()));
                        handle
                    }
                    Err(e) => {
                        tracing::debug!("cannot open {}: {e}", m.path.display());
                        continue;
                    }
                },
            };
            modules.push(Module { mapping: m, handle });
        }
        modules.sort_by_key(|m| m.mapping.start);
        if !target::still_same(id) {
            return Ok(());
        }
        self.modules = modules;
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<&Module> {
        let idx = self.modules.partition_point(|m| m.mapping.start <= addr);
        let m = self.modules.get(idx.checked_sub(1)?)?;
        (addr < m.mapping.end).then_some(m)
    }

    /// Every executable mapping with the file we hold open for it (readable after the target
    /// exits and inside its mount namespace).
    pub fn iter(&self) -> impl Iterator<Item = (&Mapping, &Path)> {
        self.modules.iter().map(|m| (&m.mapping, m.handle.as_path()))
    }

    /// The module containing `addr` and the file offset it corresponds to.
    pub fn resolve(&self, addr: u64) -> Option<(&Path, u64)> {
        let m = self.find(addr)?;
        Some((&m.mapping.path, addr - m.mapping.start + m.mapping.file_offset))
    }
}

pub struct Symbolizer {
    inner: bz::Symbolizer,
    /// The first target's modules (layout 0).
    pub modules: Modules,
    cache: HashMap<u64, Vec<Frame>>,
    /// Other address-space layouts of a session with several processes (layout 1 first),
    /// each with its modules and its own cache: one address means other code in each.
    layouts: Vec<(Modules, HashMap<u64, Vec<Frame>>)>,
    /// Which layout each process's addresses are in (absent: layout 0).
    layout_of: HashMap<u32, u32>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        let inner = bz::Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            .build();
        Symbolizer {
            inner,
            modules: Modules::default(),
            cache: HashMap::new(),
            layouts: Vec::new(),
            layout_of: HashMap::new(),
        }
    }

    /// Frames for a stack of return addresses of the first target, innermost first.
    pub fn symbolize(&mut self, ips: &[u64]) -> Vec<Frame> {
        let missing: Vec<u64> = ips.iter().copied().filter(|ip| !self.cache.contains_key(ip)).collect();
        if !missing.is_empty() {
            fill(&self.inner, &self.modules, &mut self.cache, &missing);
        }
        ips.iter().flat_map(|ip| self.cache.get(ip).cloned().unwrap_or_default()).collect()
    }

    /// Frames for a stack of process `tgid` (layout 0 unless [`Symbolizer::set_layout`] said
    /// otherwise).
    pub fn symbolize_for(&mut self, tgid: u32, ips: &[u64]) -> Vec<Frame> {
        let layout = self.layout_of.get(&tgid).copied().unwrap_or(0) as usize;
        let Some((modules, cache)) = layout.checked_sub(1).and_then(|i| self.layouts.get_mut(i)) else {
            return self.symbolize(ips);
        };
        let missing: Vec<u64> = ips.iter().copied().filter(|ip| !cache.contains_key(ip)).collect();
        if !missing.is_empty() {
            fill(&self.inner, modules, cache, &missing);
        }
        ips.iter().flat_map(|ip| cache.get(ip).cloned().unwrap_or_default()).collect()
    }

    /// A new layout's modules (read by the caller from one of its processes); returns its
    /// index (1, 2, ...).
    pub fn add_layout(&mut self, modules: Modules) -> u32 {
        self.layouts.push((modules, HashMap::new()));
        self.layouts.len() as u32
    }

    /// The modules of layout `layout` (0: the first target's).
    pub fn layout_modules(&mut self, layout: u32) -> Option<&mut Modules> {
        match layout {
            0 => Some(&mut self.modules),
            l => self.layouts.get_mut(l as usize - 1).map(|(m, _)| m),
        }
    }

    /// Process `tgid`'s addresses are in layout `layout`.
    pub fn set_layout(&mut self, tgid: u32, layout: u32) {
        self.layout_of.insert(tgid, layout);
    }
}

/// Symbolizes `addrs` with `modules` into `cache`.
fn fill(inner: &bz::Symbolizer, modules: &Modules, cache: &mut HashMap<u64, Vec<Frame>>, addrs: &[u64]) {
    // One batch per module.
    let mut by_module: HashMap<PathBuf, (String, Vec<(u64, u64)>)> = HashMap::new();
    for &addr in addrs {
        match modules.find(addr) {
            Some(m) => {
                // A return address points after the call; the call is one byte back.
                let offset = addr.saturating_sub(1) - m.mapping.start + m.mapping.file_offset;
                by_module
                    .entry(m.handle.clone())
                    .or_insert_with(|| (m.mapping.path.display().to_string(), Vec::new()))
                    .1
                    .push((addr, offset));
            }
            None => {
                cache.insert(addr, vec![Frame::unknown(addr, None)]);
            }
        }
    }
    for (handle, (module, entries)) in by_module {
        let offsets: Vec<u64> = entries.iter().map(|(_, o)| *o).collect();
        let src = Source::Elf(Elf::new(handle));
        let results = inner.symbolize(&src, Input::FileOffset(&offsets));
        for (i, (addr, offset)) in entries.into_iter().enumerate() {
            let frames = match results.as_ref().ok().and_then(|r| r.get(i)) {
                Some(Symbolized::Sym(sym)) => frames_of(addr, sym, &module),
                _ => {
                    // Unknown: keep the module and offset visible.
                    let mut f = Frame::unknown(addr, Some(module.clone()));
                    f.function = Some(format!("[unknown] {}+{:#x}", short(&module), offset + 1));
                    vec![f]
                }
            };
            cache.insert(addr, frames);
        }
    }
}

fn short(module: &str) -> &str {
    module.rsplit('/').next().unwrap_or(module)
}

fn code_location(ci: Option<&bz::CodeInfo<'_>>) -> (Option<String>, Option<u32>) {
    match ci {
        Some(ci) => (Some(ci.to_path().display().to_string()), ci.line),
        None => (None, None),
    }
}

fn frames_of(addr: u64, sym: &bz::Sym<'_>, module: &str) -> Vec<Frame> {
    let frame = |name: &str, ci: Option<&bz::CodeInfo<'_>>, inlined: bool| {
        let (file, line) = code_location(ci);
        Frame {
            address: addr,
            function: Some(name.to_string()),
            file,
            line,
            module: Some(module.to_string()),
            inlined,
            runtime: None,
            column: None,
        }
    };
    // blazesym lists inlined calls outermost first; we print innermost first.
    let mut frames: Vec<Frame> =
        sym.inlined.iter().rev().map(|inl| frame(&inl.name, inl.code_info.as_ref(), true)).collect();
    frames.push(frame(&sym.name, sym.code_info.as_deref(), false));
    frames
}
