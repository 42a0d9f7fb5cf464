//! The target's CPython, if it runs one: recognised at attach (its layout goes to the kernel
//! side, which walks the allocating thread's Python frames), and its frames named as stacks
//! arrive.

use std::collections::HashMap;

use leakprobe_common::{PyConfig, py_flavor, py_frame};

use crate::{ptrace::Mem, runtimes::cpython, symbolize::Frame};

pub struct Names {
    config: PyConfig,
    resolver: cpython::CodeResolver,
    mem: Mem,
    /// By code object and position (the packed word without its entry flag): the frame, or
    /// None for one the interpreter would not show yet (3.11+: not at its first traceable
    /// instruction) or that does not check out.
    named: HashMap<u64, Option<Frame>>,
}

impl Names {
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
        (Some(Names { config, resolver, mem, named: HashMap::new() }), Some(line))
    }

    /// The layout for the kernel side.
    pub fn config(&self) -> PyConfig {
        self.config
    }

    /// Names the packed Python frames of one stack, innermost first, each with its entry
    /// flag. A frame that cannot be named is left out (never a guessed name); a frame the
    /// interpreter would not show yet hands its entry flag to the frame inside it.
    pub fn frames(&mut self, words: &[u64]) -> Vec<(Frame, bool)> {
        let mut out: Vec<(Frame, bool)> = Vec::with_capacity(words.len());
        for &w in words {
            let key = w & !py_frame::ENTRY;
            let (code, pos) = (py_frame::code(w), py_frame::pos(w));
            let (resolver, mem) = (&mut self.resolver, &self.mem);
            let named = self.named.entry(key).or_insert_with(|| match resolver.is_complete(mem, code, pos) {
                Some(true) => {
                    resolver.resolve(mem, code, pos).map(|f| Frame::python(code, f.function, f.file, f.line))
                }
                _ => None,
            });
            match named {
                Some(f) => out.push((f.clone(), py_frame::entry(w))),
                None if py_frame::entry(w) => {
                    if let Some(last) = out.last_mut() {
                        last.1 = true;
                    }
                }
                None => {}
            }
        }
        out
    }
}
