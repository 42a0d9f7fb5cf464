//! Stop the world, run system calls inside the target, resume: the RAII guards that the
//! in-process sampler and the reachability scan stand on.
//!
//! - [`StoppedWorld`] seizes and interrupts every thread of a process and, when dropped,
//!   detaches every one (Frida's `ThreadSuspendScope`). Nothing else calls `PTRACE_CONT` or
//!   `PTRACE_DETACH`.
//! - [`RemoteSyscalls`] borrows one stopped thread, runs system calls in it and restores its
//!   registers when dropped (rr's `AutoRemoteSyscalls`).
//! - [`Mem`] reads and writes the target's memory through `/proc/PID/mem`.
//! - [`check_target`] refuses targets we must not stop (traced, seccomp filter, zombie...).
//!
//! If leakprobe dies mid-operation the kernel detaches every tracee and each resumes with the
//! registers it has. Every step here is arranged so that this is harmless, except two single
//! steps (the first `mmap` of our code page and its final `munmap`): see [`stub`].

mod checks;
mod error;
mod mem;
mod remote;
pub mod stub;
mod sys;
mod world;

pub use checks::{CheckOptions, ProcStatus, check_target, parse_status};
pub use error::PtraceError;
pub use mem::Mem;
pub use remote::{RemoteSyscalls, find_syscall_insn};
pub use world::{StopKind, StopOptions, StoppedWorld, Thread};
