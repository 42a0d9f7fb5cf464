//! The target's V8 (Node.js), if it runs one: recognised at attach (its frame layout goes to
//! the kernel side, which keeps each JavaScript frame's function), and its frames named as
//! stacks arrive.

use leakprobe_common::V8Config;

use crate::{
    ptrace::Mem,
    runtimes::v8::{self, Resolver},
    symbolize::Frame,
};

pub struct V8 {
    /// The process it was recognised in (the session's first).
    pid: i32,
    runtime: v8::detect::Runtime,
    resolver: Resolver,
    mem: Mem,
    /// Several processes: the others' memory and resolvers.
    others: super::OtherProcesses<Resolver>,
    /// Distinct stacks whose JavaScript walk ended early, by why.
    walks_cut: std::collections::BTreeMap<String, u64>,
    /// JavaScript frames the kernel side kept that did not check out (left out).
    unnamed: u64,
}

impl V8 {
    /// The target's V8, or None; the line says what was found, or why its frames are left
    /// out (shown once).
    pub fn detect(pid: i32) -> (Option<V8>, Option<String>) {
        let runtime = match v8::detect::detect(pid) {
            Ok(None) => return (None, None),
            Ok(Some(r)) => r,
            Err(e) => {
                let why = crate::kernel::probe::error_chain(&e);
                return (None, Some(format!("{why}; JavaScript frames left out, native frames only")));
            }
        };
        let mem = match Mem::open(pid) {
            Ok(m) => m,
            Err(e) => return (None, Some(format!("V8: {e}; JavaScript frames left out"))),
        };
        let version = runtime.version.map(|v| format!("V8 {v}")).unwrap_or_else(|| "V8".into());
        let line = format!("{version} in {}: JavaScript frames in every stack", runtime.module.display());
        let resolver = Resolver::new(runtime.layout.clone());
        let v8 = V8 {
            pid,
            runtime,
            resolver,
            mem,
            others: Default::default(),
            walks_cut: Default::default(),
            unnamed: 0,
        };
        (Some(v8), Some(line))
    }

    /// The layout for the kernel side.
    pub fn config(&self) -> V8Config {
        self.runtime.layout.bpf_config()
    }

    /// Names the `js_frame` pairs of one stack of process `tgid`, each with the index of its
    /// native frame. Another process of the session is read in its own memory.
    pub fn frames(&mut self, tgid: u32, words: &[u64], end: u32) -> Vec<(usize, Frame)> {
        if end == leakprobe_common::py_end::MAX_DEPTH {
            *self.walks_cut.entry("max-depth".into()).or_default() += 1;
        }
        let named = if tgid == 0 || tgid == self.pid as u32 {
            self.resolver.name_stack(&self.mem, words)
        } else {
            let layout = &self.runtime.layout;
            match self.others.get(tgid, || Resolver::new(layout.clone())) {
                Some((mem, r)) => r.name_stack(mem, words),
                None => Vec::new(),
            }
        };
        self.unnamed += words.len().saturating_sub(named.len()) as u64;
        named.into_iter().map(|(i, sfi, f)| (i, Frame::javascript(sfi, f))).collect()
    }

    pub fn report(&self) -> crate::report::RuntimeInfo {
        let mut walks_cut = self.walks_cut.clone();
        if self.unnamed > 0 {
            walks_cut.insert("unnamed-frames".into(), self.unnamed);
        }
        crate::report::RuntimeInfo {
            name: "V8".into(),
            version: self.runtime.version.map(|v| v.to_string()).unwrap_or_default(),
            module: self.runtime.module.display().to_string(),
            walks_cut,
            allocators: None,
        }
    }
}
