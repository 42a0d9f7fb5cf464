//! The target's CPython, if it runs one: recognised at attach (its layout goes to the kernel
//! side, which walks the allocating thread's Python frames), and its frames named as stacks
//! arrive.

use leakprobe_common::{PyConfig, py_flavor};

use crate::{ptrace::Mem, runtimes::cpython, symbolize::Frame};

pub struct Names {
    /// What was recognised.
    pub runtime: cpython::Runtime,
    config: PyConfig,
    resolver: cpython::CodeResolver,
    mem: Mem,
    /// Several processes: the others' memory and resolvers.
    others: super::OtherProcesses<cpython::CodeResolver>,
    /// Where the evaluation loop's code is: its frames are where Python frames go.
    eval: Vec<cpython::NativeFunction>,
    /// Before 3.12: pymalloc's static `arenas` and `maxarenas` (runtime addresses), found in
    /// the module's file at the first census.
    static_arenas: std::cell::OnceCell<Option<(u64, u64)>>,
    /// 3.9: the file-static free lists (runtime addresses), found at the first census.
    static_free_lists: std::cell::OnceCell<Option<cpython::freelists::FreeLists>>,
}

impl Names {
    /// Where the object census reads; `None` for a version without a verified table.
    pub fn objects_target(&self) -> Option<cpython::objects::Target> {
        let r = &self.runtime;
        Some(cpython::objects::Target {
            layout: cpython::objects::ObjectLayout::for_version(r.version)?,
            py_runtime: r.py_runtime,
            unicode_type: r.types.unicode,
            static_arenas: if r.version.minor < 12 {
                *self.static_arenas.get_or_init(|| self.find_static_arenas())
            } else {
                None
            },
            static_free_lists: if r.version.minor == 9 {
                *self.static_free_lists.get_or_init(|| self.find_static_free_lists())
            } else {
                None
            },
            frames: Some(cpython::objects::Frames { config: self.config, layout: r.layout, types: r.types }),
        })
    }

    /// Something found in the file of the module that defines `_PyRuntime` (its symbols), or
    /// `None` with a log line saying why (`what` names it).
    fn in_module_file<T>(&self, what: &str, find: impl FnOnce(&[u8]) -> Result<T, String>) -> Option<T> {
        let r = &self.runtime;
        let path = crate::target::target_path(r.pid, &r.module);
        let found =
            std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display())).and_then(|i| find(&i));
        found.map_err(|why| tracing::info!("{what} not found in {}: {why}", r.module.display())).ok()
    }

    fn find_static_free_lists(&self) -> Option<cpython::freelists::FreeLists> {
        let lists = self.in_module_file("CPython's free lists", cpython::freelists::static_lists)?;
        Some(lists.moved(self.runtime.bias))
    }

    fn find_static_arenas(&self) -> Option<(u64, u64)> {
        let bias = self.runtime.bias;
        let (a, m) = self.in_module_file("pymalloc's arenas", cpython::pymalloc::static_arenas)?;
        Some((a.wrapping_add(bias), m.wrapping_add(bias)))
    }

    /// The target's CPython, or None; the line says what was found, or why its frames are
    /// left out (shown once).
    pub fn detect(pid: i32) -> (Option<Names>, Option<String>) {
        let runtime = match cpython::detect(pid) {
            Ok(None) => return (None, None),
            Ok(Some(r)) => r,
            Err(e) => return (None, Some(format!("{e}; Python frames left out, native frames only"))),
        };
        let mut config = runtime.bpf_config();
        if config.flavor == py_flavor::FRAME_OBJECT {
            // 3.9 and 3.10 know a thread by pthread_self(): its FS base, in the kernel's task.
            match crate::kernel::btf::offset_of("task_struct", &["thread", "fsbase"]) {
                Ok(off) => config.task_fsbase = off,
                Err(e) => {
                    let why = crate::kernel::probe::error_chain(&e);
                    return (
                        None,
                        Some(format!(
                            "CPython {}: its threads are found by FS base, and {why}; Python frames left out",
                            runtime.version
                        )),
                    );
                }
            }
        }
        let mem = match Mem::open(pid) {
            Ok(m) => m,
            Err(e) => {
                return (None, Some(format!("CPython {}: {e}; Python frames left out", runtime.version)));
            }
        };
        let line = format!(
            "CPython {} in {}: Python frames in every stack",
            runtime.version,
            runtime.module.display()
        );
        let resolver = runtime.resolver();
        let eval = runtime.eval_frame.clone();
        let names = Names {
            runtime,
            config,
            resolver,
            mem,
            others: Default::default(),
            eval,
            static_arenas: Default::default(),
            static_free_lists: Default::default(),
        };
        (Some(names), Some(line))
    }

    /// The layout for the kernel side.
    pub fn config(&self) -> PyConfig {
        self.config
    }

    /// Names the packed Python frames of one stack of process `tgid`, innermost first, each
    /// with its entry flag (see [`cpython::CodeResolver::name_stack`]). Another process of the
    /// session (a forked worker) is read in its own memory, with its own cache.
    pub fn frames(&mut self, tgid: u32, words: &[u64]) -> Vec<(Frame, bool)> {
        let named = if tgid == 0 || tgid == self.runtime.pid as u32 {
            self.resolver.name_stack(&self.mem, words)
        } else {
            let resolver = &self.resolver;
            match self.others.get(tgid, || resolver.fresh()) {
                Some((mem, r)) => r.name_stack(mem, words),
                None => Vec::new(),
            }
        };
        named
            .into_iter()
            .map(|(code, f, entry)| (Frame::python(code, f.function, f.file, f.line), entry))
            .collect()
    }

    /// An address in the interpreter's code (its evaluation loop): a process that maps the
    /// same file there runs this CPython at these addresses.
    pub fn code_at(&self) -> Vec<u64> {
        self.eval.first().map(|e| e.start).into_iter().collect()
    }

    /// Whether a native frame is the evaluation loop's own (not a caller's inlined wrapper).
    pub fn is_eval(&self, f: &Frame) -> bool {
        f.runtime.is_none()
            && !f.inlined
            && self.eval.iter().any(|e| e.start <= f.address && f.address < e.end)
    }
}

/// The target's CPython in a session: its frames' names, its allocator tables' hooks, and
/// how its walks went.
pub struct Python {
    pub names: Names,
    alloc: Option<super::pyalloc::PyAllocHooks>,
    /// Why the allocator tables were left alone.
    alloc_left: Option<String>,
    /// Distinct stacks whose Python walk ended early, by why.
    walks_cut: std::collections::BTreeMap<String, u64>,
}

impl Python {
    pub fn new(names: Names) -> Python {
        Python { names, alloc: None, alloc_left: None, walks_cut: Default::default() }
    }

    /// Points the allocator tables at a stub (see [`super::pyalloc`]); returns the line to
    /// show and the report sites' probes.
    pub fn hook_allocators(
        &mut self,
        sample_bytes: u64,
        max_pause: std::time::Duration,
        probes: &mut crate::kernel::probe::Probes,
    ) -> (String, Vec<crate::kernel::probe::ProbeStatus>) {
        let done = super::pyalloc::PyAllocHooks::install(
            &self.names.runtime,
            &self.names.config(),
            sample_bytes,
            max_pause,
            probes,
        );
        self.alloc = done.hooks;
        self.alloc_left = done.left_alone;
        (done.line, done.statuses)
    }

    /// The allocator tables are left alone, for `why` (said in the report); returns the line.
    pub fn leave_allocators(&mut self, why: &str) -> String {
        self.alloc_left = Some(why.to_string());
        why.to_string()
    }

    /// Counts a fetched stack's Python walk that ended early.
    pub fn walk_ended(&mut self, end: u32) {
        let why = match end {
            leakprobe_common::py_end::MAX_DEPTH => "max-depth",
            leakprobe_common::py_end::BAD_FRAME => "bad-frame",
            _ => return,
        };
        *self.walks_cut.entry(why.to_string()).or_default() += 1;
    }

    /// Restores the allocator tables (before the probes go).
    pub fn finish(&mut self, ended_by: &str) {
        if let Some(a) = self.alloc.as_mut() {
            a.finish(ended_by);
        }
    }

    pub fn report(&self) -> crate::report::RuntimeInfo {
        let r = &self.names.runtime;
        let allocators = match &self.alloc {
            Some(a) => a.report(),
            None => {
                crate::report::PythonAllocators { left_alone: self.alloc_left.clone(), ..Default::default() }
            }
        };
        crate::report::RuntimeInfo {
            name: "CPython".into(),
            version: r.version.to_string(),
            module: r.module.display().to_string(),
            walks_cut: self.walks_cut.clone(),
            allocators: Some(allocators),
        }
    }
}
