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

/// `PTRACE_SYSCALL`: run to the next syscall-enter or syscall-exit stop.
pub(crate) fn resume_to_syscall(tid: i32) -> Result<(), PtraceError> {
    ptrace::syscall(pid(tid), None).map_err(op_err(tid, "SYSCALL"))
}

pub(crate) fn setoptions(tid: i32, options: ptrace::Options) -> Result<(), PtraceError> {
    ptrace::setoptions(pid(tid), options).map_err(op_err(tid, "SETOPTIONS"))
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

/// `PTRACE_CONT` with a raw signal number.
pub(crate) fn cont(tid: i32, signo: i32) -> Result<(), Errno> {
    // SAFETY: plain ptrace request with integer arguments.
    let r = unsafe { libc::ptrace(libc::PTRACE_CONT, tid as libc::pid_t, 0usize, signo as usize) };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// `PTRACE_LISTEN`: a seized thread in a group stop stays stopped, and reports when it ends.
pub(crate) fn listen(tid: i32) -> Result<(), Errno> {
    // SAFETY: plain ptrace request with integer arguments.
    let r = unsafe { libc::ptrace(libc::PTRACE_LISTEN, tid as libc::pid_t, 0usize, 0usize) };
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

/// Waits for `tid`'s next event until `deadline`: `Ok(None)` on timeout. Polls, so the
/// deadline holds even when a thread never stops (uninterruptible sleep, a vfork parent).
pub(crate) fn wait_until(tid: i32, deadline: Instant) -> Result<Option<Status>, Errno> {
    let start = Instant::now();
    loop {
        if let Some(st) = poll_wait(tid)? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        backoff(start);
    }
}

/// Spin first: a stopped world leaves the other CPUs to the one thread we run, which stops
/// again within microseconds. Then sleep briefly, so threads still on their way to a stop
/// get a CPU. Never `sched_yield`: next to a CPU-bound thread it gives away a whole slice.
pub(crate) fn backoff(since: Instant) {
    if since.elapsed() > Duration::from_micros(200) {
        std::thread::sleep(Duration::from_micros(20));
    } else {
        std::hint::spin_loop();
    }
}

/// Raises the calling thread's priority (nice -20) while it stops or resumes a world, and
/// puts it back: otherwise the target's resumed CPU-bound threads preempt us between
/// detaches and keep the rest stopped for whole time slices. Without CAP_SYS_NICE it does
/// nothing.
pub(crate) struct Boost {
    old: Option<i32>,
}

impl Boost {
    pub(crate) fn new() -> Boost {
        // SAFETY: plain syscalls on our own thread (who 0 = the calling thread on Linux).
        unsafe {
            *libc::__errno_location() = 0;
            let old = libc::getpriority(libc::PRIO_PROCESS, 0);
            if *libc::__errno_location() != 0 || old <= -20 {
                return Boost { old: None };
            }
            let ok = libc::setpriority(libc::PRIO_PROCESS, 0, -20) == 0;
            Boost { old: ok.then_some(old) }
        }
    }
}

/// The kernel's `struct sched_param`. The system calls are made directly: musl's
/// `sched_setscheduler` and friends return ENOSYS by design (POSIX wants them per process,
/// Linux applies them per thread), which would silently lose the boost in the static build.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct SchedParam {
    sched_priority: libc::c_int,
}

/// Runs the calling thread SCHED_FIFO while it detaches a world, and puts the old policy
/// back: a loop of `PTRACE_DETACH` calls that never waits, so it cannot starve anything for
/// long, while the resumed CPU-bound threads would otherwise preempt it for whole slices.
/// Without CAP_SYS_NICE it falls back to [`Boost`].
pub(crate) struct Realtime {
    old: Option<(i32, SchedParam)>,
    _nice: Option<Boost>,
}

impl Realtime {
    pub(crate) fn new() -> Realtime {
        // SAFETY: plain syscalls on our own thread (pid 0 = the calling thread).
        unsafe {
            let policy = libc::syscall(libc::SYS_sched_getscheduler, 0) as i32;
            let mut old = SchedParam { sched_priority: 0 };
            if policy < 0 || libc::syscall(libc::SYS_sched_getparam, 0, &mut old) != 0 {
                return Realtime { old: None, _nice: Some(Boost::new()) };
            }
            let rt = SchedParam { sched_priority: 1 };
            if policy == libc::SCHED_OTHER
                && libc::syscall(libc::SYS_sched_setscheduler, 0, libc::SCHED_FIFO, &rt) == 0
            {
                return Realtime { old: Some((policy, old)), _nice: None };
            }
            Realtime { old: None, _nice: Some(Boost::new()) }
        }
    }
}

impl Drop for Realtime {
    fn drop(&mut self) {
        if let Some((policy, param)) = self.old {
            // SAFETY: plain syscall on our own thread.
            unsafe { libc::syscall(libc::SYS_sched_setscheduler, 0, policy, &param) };
        }
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        if let Some(old) = self.old {
            // SAFETY: plain syscall on our own thread.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, old) };
        }
    }
}
