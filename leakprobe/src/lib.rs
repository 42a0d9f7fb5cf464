//! leakprobe: find growing allocation call sites in a live process with eBPF.
//!
//! Layers, one folder each, with data flowing one way (see docs/architecture.md):
//! - [`target`]: what to hook: the process, its modules and allocator, `run` mode (/proc, ELF);
//! - [`kernel`]: the eBPF side: load, place, attach, unwind rows, read maps;
//! - [`model`]: pure tracking arithmetic, trends and verdicts (no I/O);
//! - [`symbolize`]: addresses to functions and lines;
//! - [`ptrace`]: stop the world, run system calls in the target, resume (RAII guards);
//! - [`inprocess`]: in-process sampling: the GOT plan, the stub, its install and guard;
//! - [`report`]: the report and its renderings: text, JSON, diff, exports, chart (pure);
//! - [`scan`]: the reachability scan: snapshot, roots, mark (pure), classes;
//! - the edges: [`cli`] (flags), [`session`] (the tokio loop that runs it all), [`output`]
//!   (checked, atomic result files); [`manual`] (man pages and completions from the flags).

/// `eprintln!` that cannot panic: a closed stderr (the reader of a pipe quit, `| head`,
/// `less` closed early) must not end a session, nor stop the guard between its restores.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod cli;
pub mod inprocess;
pub mod kernel;
pub mod live;
pub mod manual;
pub mod model;
pub mod output;
pub mod progress;
pub mod ptrace;
pub mod report;
pub mod runtimes;
pub mod scan;
pub mod session;
pub mod symbolize;
pub mod target;
