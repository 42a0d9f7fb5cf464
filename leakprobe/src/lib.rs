//! leakprobe: find growing allocation call sites in a live process with eBPF.
//!
//! Layers, with data flowing one way:
//! - [`probe`]: loads the eBPF programs, attaches them, reads their maps;
//! - [`model`]: pure tracking arithmetic over samples (no I/O);
//! - [`trend`]: slopes, fits and the leak / fragmentation / stable verdicts (no I/O);
//! - [`symbolize`]: addresses to functions and lines;
//! - [`report`]: the report structure and its text and JSON forms;
//! - [`diff`]: two reports compared per call site (pure);
//! - [`export`]: the report as pprof, folded stacks and a flame graph;
//! - [`cli`], [`session`], [`launch`], [`target`], [`preflight`]: the edges.

pub mod allocator;
pub mod cli;
pub mod diff;
pub mod elf;
pub mod export;
pub mod launch;
pub mod memory;
pub mod model;
pub mod output;
pub mod placement;
pub mod plot;
pub mod preflight;
pub mod probe;
pub mod ptrace;
pub mod report;
pub mod sampling;
pub mod session;
pub mod symbolize;
pub mod target;
pub mod trend;
pub mod unwind;
