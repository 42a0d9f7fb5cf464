//! `run` mode: start a command held under ptrace until the probes are live.
//!
//! The child stops right after exec, before the dynamic loader has mapped libc. We step it one
//! system call at a time until libc is mapped (only loader code has run, no allocation yet),
//! then the caller attaches the probes and [`Held::release`] lets it go.
//!
//! `run --in-process` needs more: the stub is reached through GOT slots, which the loader
//! fills only when it relocates, after libc is mapped. [`Held::run_to_entry`] lets the loader
//! finish (relocation and the libraries' constructors) and holds the program at its entry
//! point (`AT_ENTRY`) with a one-byte breakpoint that is put back before anything else runs.
//! [`Held::detach_stopped`] then hands it over in a job-control stop, so that the in-process
//! install can seize it like any attached process while it stays held.

use std::{
    os::unix::process::CommandExt as _,
    process::{Child, Command},
};

use nix::{
    sys::{
        ptrace,
        signal::Signal,
        wait::{WaitStatus, waitpid},
    },
    unistd::Pid,
};
use thiserror::Error;

use crate::target;

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("cannot start {command:?}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ptrace on the new process failed")]
    Ptrace {
        #[source]
        source: nix::Error,
    },
    #[error("the new process stopped unexpectedly before exec completed ({status})")]
    UnexpectedStop { status: String },
    #[error("{command:?} exited before loading libc (status {status})")]
    ExitedEarly { command: String, status: i32 },
    #[error("{command:?} never mapped a libc within {MAX_SYSCALL_STOPS} loader system calls")]
    NoLibc { command: String },
    /// The program's entry point could not be found or written (`/proc/PID/auxv`, `/mem`).
    #[error("cannot hold PID {pid} at its entry point: {what}")]
    Entry {
        pid: i32,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A child stopped before its first allocation. Dropped without [`Held::release`] (an error
/// before tracing began), it is killed: a command we started must not run on untraced.
pub struct Held {
    child: Option<Child>,
    pub pid: i32,
    /// Handed over in a job-control stop ([`Held::detach_stopped`]): no longer traced by us.
    stopped: bool,
}

/// `AT_ENTRY` in the auxiliary vector.
const AT_ENTRY: u64 = 9;

/// Loader system calls we are willing to step through while waiting for libc.
const MAX_SYSCALL_STOPS: usize = 20_000;

/// Starts `command` and holds it at the point where libc is mapped.
pub fn spawn_held(command: &[String]) -> Result<Held, LaunchError> {
    let shown = command.join(" ");
    let (prog, args) = command.split_first().ok_or_else(|| LaunchError::Spawn {
        command: shown.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
    })?;
    let mut cmd = Command::new(prog);
    cmd.args(args);
    // SAFETY: traceme is async-signal-safe (a single syscall) between fork and exec.
    unsafe {
        cmd.pre_exec(|| ptrace::traceme().map_err(std::io::Error::from));
    }
    let child = cmd.spawn().map_err(|source| LaunchError::Spawn { command: shown.clone(), source })?;
    let pid = Pid::from_raw(child.id() as i32);
    let kill = |child: &mut Child| {
        let _ = child.kill();
        let _ = child.wait();
    };
    let mut child = child;

    // The exec stop.
    match waitpid(pid, None) {
        Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => {}
        Ok(WaitStatus::Exited(_, status)) => return Err(LaunchError::ExitedEarly { command: shown, status }),
        Ok(other) => {
            kill(&mut child);
            return Err(LaunchError::UnexpectedStop { status: format!("{other:?}") });
        }
        Err(source) => {
            kill(&mut child);
            return Err(LaunchError::Ptrace { source });
        }
    }
    // EXITKILL: if we die while it is held, it dies too rather than run untraced and stopped.
    if let Err(source) =
        ptrace::setoptions(pid, ptrace::Options::PTRACE_O_TRACESYSGOOD | ptrace::Options::PTRACE_O_EXITKILL)
    {
        kill(&mut child);
        return Err(LaunchError::Ptrace { source });
    }

    // A static executable has no loader: everything it has is mapped already.
    if is_static(pid.as_raw()) {
        return Ok(Held { child: Some(child), pid: pid.as_raw(), stopped: false });
    }
    for _ in 0..MAX_SYSCALL_STOPS {
        let ready = target::exec_mappings(pid.as_raw()).ok().is_some_and(|maps| {
            target::find_allocators(&maps).is_some_and(|a| a.cxx.is_some() || !needs_cxx(pid.as_raw()))
                && all_needed_mapped(pid.as_raw(), &maps)
        });
        if ready {
            return Ok(Held { child: Some(child), pid: pid.as_raw(), stopped: false });
        }
        if let Err(source) = ptrace::syscall(pid, None) {
            kill(&mut child);
            return Err(LaunchError::Ptrace { source });
        }
        match waitpid(pid, None) {
            Ok(WaitStatus::PtraceSyscall(_)) => {}
            Ok(WaitStatus::Exited(_, status)) => {
                return Err(LaunchError::ExitedEarly { command: shown, status });
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                return Err(LaunchError::ExitedEarly { command: shown, status: 128 + sig as i32 });
            }
            Ok(WaitStatus::Stopped(_, sig)) => {
                // A signal during loading: deliver it on the next step.
                if let Err(source) = ptrace::syscall(pid, Some(sig)) {
                    kill(&mut child);
                    return Err(LaunchError::Ptrace { source });
                }
                let _ = waitpid(pid, None);
            }
            Ok(_) => {}
            Err(source) => {
                kill(&mut child);
                return Err(LaunchError::Ptrace { source });
            }
        }
    }
    kill(&mut child);
    Err(LaunchError::NoLibc { command: shown })
}

/// Whether the executable itself needs a C++ runtime (DT_NEEDED), which the loader maps
/// before libc in that case. Runtimes pulled in later are picked up by the session.
fn needs_cxx(pid: i32) -> bool {
    let Ok(data) = std::fs::read(format!("/proc/{pid}/exe")) else { return false };
    needed_libs(&data).iter().any(|n| target::is_cxx(n))
}

fn needed_libs(data: &[u8]) -> Vec<String> {
    crate::target::elf::dynamic(data).needed
}

fn is_static(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/exe")).is_ok_and(|data| !crate::target::elf::dynamic(&data).interp)
}

/// Whether the executable's direct DT_NEEDED libraries are all mapped: an allocator linked
/// in (libjemalloc) must be there before we decide which malloc the calls bind to. musl's
/// `libc.so` is its loader, mapped under another name.
fn all_needed_mapped(pid: i32, maps: &[target::Mapping]) -> bool {
    let Ok(data) = std::fs::read(format!("/proc/{pid}/exe")) else { return true };
    needed_libs(&data)
        .iter()
        .all(|n| n == "libc.so" || maps.iter().any(|m| m.file_name().starts_with(n.as_str())))
}

impl Held {
    /// Lets the child run, untraced from here on, and hands it over.
    pub fn release(mut self) -> Result<Child, LaunchError> {
        let pid = Pid::from_raw(self.pid);
        if self.stopped {
            nix::sys::signal::kill(pid, Signal::SIGCONT).map_err(|source| LaunchError::Ptrace { source })?;
        } else {
            ptrace::detach(pid, None).map_err(|source| LaunchError::Ptrace { source })?;
        }
        Ok(self.child.take().expect("a held child is released once"))
    }

    /// Runs the loader to its end (relocation, the libraries' constructors) and holds the
    /// program at its first instruction. Signals met on the way are delivered as they come.
    pub fn run_to_entry(&mut self) -> Result<(), LaunchError> {
        let pid = Pid::from_raw(self.pid);
        let entry_err = |what, source| LaunchError::Entry { pid: self.pid, what, source };
        let auxv = std::fs::read(format!("/proc/{}/auxv", self.pid))
            .map_err(|e| entry_err("reading /proc/PID/auxv", e))?;
        let entry = auxv
            .chunks_exact(16)
            .map(|c| {
                let w = |i: usize| u64::from_le_bytes(c[i..i + 8].try_into().unwrap_or([0; 8]));
                (w(0), w(8))
            })
            .find(|(k, _)| *k == AT_ENTRY)
            .map(|(_, v)| v)
            .filter(|v| *v != 0)
            .ok_or_else(|| entry_err("finding AT_ENTRY", std::io::ErrorKind::NotFound.into()))?;
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{}/mem", self.pid))
            .map_err(|e| entry_err("opening /proc/PID/mem", e))?;
        use std::os::unix::fs::FileExt as _;
        let mut original = [0u8; 1];
        mem.read_exact_at(&mut original, entry).map_err(|e| entry_err("reading the entry point", e))?;
        // The tracer may write to read-only text through /proc/PID/mem (FOLL_FORCE); the page
        // becomes a private copy, as a debugger's breakpoint does.
        mem.write_all_at(&[0xcc], entry).map_err(|e| entry_err("placing the entry breakpoint", e))?;
        let restore = |mem: &std::fs::File| mem.write_all_at(&original, entry);
        let mut deliver = None;
        loop {
            if let Err(source) = ptrace::cont(pid, deliver.take()) {
                let _ = restore(&mem);
                return Err(LaunchError::Ptrace { source });
            }
            match waitpid(pid, None) {
                Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => {
                    let mut regs = ptrace::getregs(pid).map_err(|source| LaunchError::Ptrace { source })?;
                    if regs.rip != entry + 1 {
                        deliver = Some(Signal::SIGTRAP);
                        continue;
                    }
                    restore(&mem).map_err(|e| entry_err("removing the entry breakpoint", e))?;
                    regs.rip = entry;
                    ptrace::setregs(pid, regs).map_err(|source| LaunchError::Ptrace { source })?;
                    return Ok(());
                }
                Ok(WaitStatus::Stopped(_, sig)) => deliver = Some(sig),
                Ok(WaitStatus::Exited(_, status)) => {
                    return Err(LaunchError::ExitedEarly { command: format!("PID {}", self.pid), status });
                }
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    return Err(LaunchError::ExitedEarly {
                        command: format!("PID {}", self.pid),
                        status: 128 + sig as i32,
                    });
                }
                Ok(_) => {}
                Err(source) => {
                    let _ = restore(&mem);
                    return Err(LaunchError::Ptrace { source });
                }
            }
        }
    }

    /// Stops tracing the child but leaves it held, in a job-control stop (`SIGSTOP`), so that
    /// another ptrace user can seize it. [`Held::release`] then continues it with `SIGCONT`.
    /// Call only while something else will continue it if we die (the in-process guard).
    pub fn detach_stopped(&mut self) -> Result<(), LaunchError> {
        let pid = Pid::from_raw(self.pid);
        ptrace::detach(pid, Some(Signal::SIGSTOP)).map_err(|source| LaunchError::Ptrace { source })?;
        self.stopped = true;
        match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WUNTRACED)) {
            Ok(WaitStatus::Stopped(_, Signal::SIGSTOP)) => Ok(()),
            Ok(other) => Err(LaunchError::UnexpectedStop { status: format!("{other:?}") }),
            Err(source) => Err(LaunchError::Ptrace { source }),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
