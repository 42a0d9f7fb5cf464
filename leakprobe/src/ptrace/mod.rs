//! Stop the world, run system calls inside the target, resume: the RAII guards that the
//! in-process sampler and the reachability scan stand on.
//!
//! - [`StoppedWorld`] seizes and interrupts every thread of a process and, when dropped,
//!   detaches every one (Frida's `ThreadSuspendScope`). Nothing else calls `PTRACE_CONT` or
//!   `PTRACE_DETACH`.
//! - [`RemoteSyscalls`] borrows one stopped thread, runs system calls in it and restores its
//!   registers when dropped (rr's `AutoRemoteSyscalls`).
//! - [`Mem`] reads and writes the target's memory through `/proc/PID/mem`.
//! - [`server`]: the helper process that does all of the above for leakprobe, so that a
//!   SIGKILLed leakprobe never holds the target stopped while the kernel closes its probes.
//! - [`follow`]: the follower process, which holds the followed processes' children at birth
//!   until their probes are live.
//! - [`check_target`] refuses targets we must not stop (traced, seccomp filter, zombie...).
//!
//! If leakprobe dies mid-operation the kernel detaches every tracee and each resumes with the
//! registers it has. Every step here is arranged so that this is harmless, except two system
//! calls (the first `mmap` of our code page and its final `munmap`): see [`stub`].
//!
//! Kernel behaviour this rests on (measured on 6.18):
//! - A tracee left in a *signal-delivery* stop by a dying tracer gets that signal: a thread
//!   parked on a single-step trap dies of SIGTRAP. So injected calls run to syscall stops
//!   (`PTRACE_SYSCALL`), never single steps, with `PTRACE_O_TRACESYSGOOD`: a syscall stop left
//!   behind "re-sends" SIGTRAP|0x80, which is no signal (without TRACESYSGOOD it is SIGTRAP).
//! - Interrupt and event stops left behind deliver nothing, and a detached thread in a group
//!   stop stays stopped: resuming is `PTRACE_DETACH`, never `PTRACE_CONT`.
//! - An interrupted sleep (`orig_rax` 230, `rax` -ERESTART_RESTARTBLOCK) restarts only from a
//!   stop inside signal handling; a thread sent back from a syscall-exit stop returns the raw
//!   -516. So the last step of every sequence parks the thread in an interrupt stop.
//! - `TracerPid` names the tracing *thread*; ptrace requests work only from that thread.

mod checks;
mod error;
pub mod follow;
mod mem;
mod remote;
pub mod server;
pub mod stub;
mod sys;
mod world;

pub use checks::{CheckOptions, ProcStatus, check_target, parse_status};
pub use error::PtraceError;
pub use mem::Mem;
pub use remote::{RemoteSyscalls, find_syscall_insn};
pub use world::{StopKind, StopOptions, StoppedWorld, Thread};
