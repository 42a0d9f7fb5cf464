//! The raw ptrace and wait calls, each mapped to a [`PtraceError`] naming the thread.

use std::time::{Duration, Instant};

use nix::{errno::Errno, sys::ptrace, unistd::Pid};

use super::PtraceError;

pub(crate) type Regs = libc::user_regs_struct;

pub(crate) const NT_PRSTATUS: libc::c_int = 1;
pub(crate) const NT_X86_XSTATE: libc::c_int = 0x202;
/// Large enough for AVX-512 and AMX tile state.
const XSTATE_MAX: usize = 16 * 1024;

fn pid(tid: i32) -> Pid {
    Pid::from_raw(tid)
}

pub(crate) fn op_err(tid: i32, op: &'static str) -> impl FnOnce(Errno) -> PtraceError {
    move |source| PtraceError::Ptrace { tid, op, source }
}

pub(crate) fn getregs(tid: i32) -> Result<Regs, PtraceError> {
    ptrace::getregs(pid(tid)).map_err(op_err(tid, "GETREGS"))
}

pub(crate) fn setregs(tid: i32, regs: &Regs) -> Result<(), PtraceError> {
    ptrace::setregs(pid(tid), *regs).map_err(op_err(tid, "SETREGS"))
}

/// `PTRACE_GETREGSET` as raw bytes, trimmed to what the kernel filled.
pub(crate) fn getregset(tid: i32, note: libc::c_int) -> Result<Vec<u8>, PtraceError> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: iov describes buf, which outlives the call; the kernel writes at most iov_len.
    let r = unsafe {
        libc::ptrace(libc::PTRACE_GETREGSET, tid as libc::pid_t, note as usize, &mut iov as *mut libc::iovec)
    };
    if r < 0 {
        return Err(PtraceError::Ptrace { tid, op: "GETREGSET", source: Errno::last() });
    }
    buf.truncate(iov.iov_len);
    Ok(buf)
}

pub(crate) fn getsiginfo(tid: i32) -> Result<libc::siginfo_t, PtraceError> {
    ptrace::getsiginfo(pid(tid)).map_err(op_err(tid, "GETSIGINFO"))
}

pub(crate) fn setsiginfo(tid: i32, info: &libc::siginfo_t) -> Result<(), PtraceError> {
    ptrace::setsiginfo(pid(tid), info).map_err(op_err(tid, "SETSIGINFO"))
}

pub(crate) fn step(tid: i32) -> Result<(), PtraceError> {
    ptrace::step(pid(tid), None).map_err(op_err(tid, "SINGLESTEP"))
}

pub(crate) fn interrupt(tid: i32) -> Result<(), Errno> {
    ptrace::interrupt(pid(tid))
}

/// `PTRACE_DETACH` with a raw signal number (nix's `Signal` lacks the real-time ones).
pub(crate) fn detach(tid: i32, signo: i32) -> Result<(), Errno> {
    // SAFETY: plain ptrace request with integer arguments.
    let r = unsafe { libc::ptrace(libc::PTRACE_DETACH, tid as libc::pid_t, 0usize, signo as usize) };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

pub(crate) fn geteventmsg(tid: i32) -> Result<i64, PtraceError> {
    ptrace::getevent(pid(tid)).map_err(op_err(tid, "GETEVENTMSG"))
}

/// A decoded wait status. Decoded by hand: nix rejects real-time signal numbers, after the
/// status has already been consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// The thread exited or was killed.
    Gone,
    /// A ptrace stop: the signal and the `PTRACE_EVENT_*` (0 for a signal-delivery stop).
    Stopped { sig: i32, event: i32 },
}

pub(crate) fn decode(status: i32) -> Status {
    if libc::WIFSTOPPED(status) {
        Status::Stopped { sig: libc::WSTOPSIG(status), event: (status >> 16) & 0xff }
    } else {
        Status::Gone
    }
}

/// One non-blocking wait for `tid`'s next event.
pub(crate) fn poll_wait(tid: i32) -> Result<Option<Status>, Errno> {
    let mut status = 0;
    // SAFETY: plain syscall writing one int we own.
    let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
    match r {
        0 => Ok(None),
        r if r > 0 => Ok(Some(decode(status))),
        _ => match Errno::last() {
            Errno::EINTR => Ok(None),
            e => Err(e),
        },
    }
}

/// Waits for `tid`'s next event until `deadline`: `Ok(None)` on timeout. Polls, spinning
/// briefly first (stops usually land within microseconds), so the deadline holds even when a
/// thread never stops (uninterruptible sleep, a vfork parent).
pub(crate) fn wait_until(tid: i32, deadline: Instant) -> Result<Option<Status>, Errno> {
    let mut polls = 0u32;
    loop {
        if let Some(st) = poll_wait(tid)? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        polls += 1;
        backoff(polls);
    }
}

/// Spin (yielding) for the first polls, then sleep: a stop usually lands within microseconds.
pub(crate) fn backoff(polls: u32) {
    if polls < 200 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}
