//! `run` mode: start a command held under ptrace until the probes are live.
//!
//! The child stops right after exec, before the dynamic loader has mapped libc. We step it one
//! system call at a time until libc is mapped (only loader code has run, no allocation yet),
//! then the caller attaches the probes and [`Held::release`] lets it go.

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
}

/// A child stopped before its first allocation.
pub struct Held {
    pub child: Child,
    pub pid: i32,
}

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
        return Ok(Held { child, pid: pid.as_raw() });
    }
    for _ in 0..MAX_SYSCALL_STOPS {
        let ready = target::exec_mappings(pid.as_raw()).ok().is_some_and(|maps| {
            target::find_allocators(&maps).is_some_and(|a| a.cxx.is_some() || !needs_cxx(pid.as_raw()))
                && all_needed_mapped(pid.as_raw(), &maps)
        });
        if ready {
            return Ok(Held { child, pid: pid.as_raw() });
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
    /// Lets the child run, untraced from here on.
    pub fn release(&self) -> Result<(), LaunchError> {
        ptrace::detach(Pid::from_raw(self.pid), None).map_err(|source| LaunchError::Ptrace { source })
    }
}
