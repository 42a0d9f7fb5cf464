use std::time::Duration;

use nix::errno::Errno;
use thiserror::Error;

/// Why a ptrace operation on the target failed or was refused. Each message says what to do.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PtraceError {
    /// The PID does not exist (or exited before we could look at it).
    #[error("no process with PID {pid}; check the PID (it may have exited)")]
    NoSuchProcess { pid: i32 },
    /// The process has exited and waits to be reaped: there is nothing to stop.
    #[error("PID {pid} is a zombie (exited, not yet reaped); there is nothing left to stop")]
    Zombie { pid: i32 },
    /// Kernel threads have no user space to stop or inject into.
    #[error("PID {pid} is a kernel thread; it has no user space to stop")]
    KernelThread { pid: i32 },
    /// Another tracer (a debugger, strace, another leakprobe) holds the process; a process
    /// has at most one tracer.
    #[error(
        "PID {pid} (thread {tid}) is already traced by PID {tracer} ({tracer_name}); detach that \
         tracer first (a process can have only one)"
    )]
    AlreadyTraced { pid: i32, tid: i32, tracer: i32, tracer_name: String },
    /// A seccomp filter may deny the injected system calls (EPERM) or kill the process for
    /// them (SECCOMP_RET_KILL).
    #[error(
        "PID {pid} runs under a seccomp filter (Seccomp: 2): injected system calls may be denied \
         or may kill it; refusing (allow it explicitly only if you know the filter permits mmap, \
         munmap, mprotect, memfd_create, clone and wait4)"
    )]
    SeccompFilter { pid: i32 },
    /// Strict seccomp allows only read/write/exit/sigreturn: every injection would kill it.
    #[error("PID {pid} runs in strict seccomp mode (Seccomp: 1); any injected system call would kill it")]
    SeccompStrict { pid: i32 },
    /// Yama's ptrace_scope 3 forbids every attach until reboot, even for root.
    #[error(
        "kernel.yama.ptrace_scope is 3: no process can be traced until the next reboot; the \
         reachability scan and in-process sampling are unavailable on this machine"
    )]
    PtraceScopeLocked,
    /// A file under /proc could not be read.
    #[error("cannot read {path}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `PTRACE_SEIZE` was refused: usually missing CAP_SYS_PTRACE or Yama ptrace_scope >= 2.
    #[error(
        "cannot seize thread {tid} of PID {pid}: {source}; run as root (CAP_SYS_PTRACE), and \
         check kernel.yama.ptrace_scope"
    )]
    Seize {
        pid: i32,
        tid: i32,
        #[source]
        source: Errno,
    },
    /// A ptrace request other than seize failed.
    #[error("ptrace {op} on thread {tid} failed")]
    Ptrace {
        tid: i32,
        op: &'static str,
        #[source]
        source: Errno,
    },
    /// Waiting for a thread's stop failed.
    #[error("waitpid on thread {tid} failed")]
    Wait {
        tid: i32,
        #[source]
        source: Errno,
    },
    /// The world stayed stopped as long as allowed; we resumed it rather than stop it longer.
    #[error(
        "the target would stay stopped longer than the allowed {max:?} ({elapsed:?} so far, \
         while {during}); it was resumed; retry when it is less busy or allow a longer pause"
    )]
    PauseExceeded { max: Duration, elapsed: Duration, during: &'static str },
    /// Every thread exited while we were stopping or using them.
    #[error("PID {pid} exited while it was stopped")]
    Exited { pid: i32 },
    /// The thread asked for is not one of the stopped threads (it exited, or never was).
    #[error("thread {tid} is not stopped in this world (it may have exited)")]
    NoSuchThread { tid: i32 },
    /// No stopped thread is in a state we may inject into.
    #[error("no thread of PID {pid} is in a stop where system calls can be injected")]
    NoUsableThread { pid: i32 },
    /// A thread reported something we cannot handle mid-operation.
    #[error("thread {tid} stopped unexpectedly ({status}) while {during}")]
    UnexpectedStop { tid: i32, status: String, during: &'static str },
    /// The call must run from our code page (its child path exits), and there is none.
    #[error("remote {what} needs our code page in the target; use RemoteSyscalls::new, not plain")]
    NeedsCodePage { what: &'static str },
    /// No executable `0f 05` was found in the target's mappings.
    #[error("no `syscall` instruction found in the executable mappings of PID {pid}")]
    NoSyscallInsn { pid: i32 },
    /// An injected system call returned an error.
    #[error("remote {name} in PID {pid} failed")]
    Syscall {
        pid: i32,
        name: &'static str,
        #[source]
        source: Errno,
    },
    /// Reading or writing the target's memory failed.
    #[error("cannot {op} {len} bytes at {addr:#x} of PID {pid} through /proc/{pid}/mem")]
    Mem {
        pid: i32,
        op: &'static str,
        addr: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    /// leakprobe's ptrace helper process (see `ptrace::server`) could not be started or
    /// stopped answering; the next stop starts a new one.
    #[error("leakprobe's ptrace helper process {what}")]
    Helper {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// An operation the ptrace helper ran for us failed; its message.
    #[error("{message}")]
    InHelper { message: String },
}
