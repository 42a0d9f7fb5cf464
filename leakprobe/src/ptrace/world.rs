//! [`StoppedWorld`]: every thread of a process seized and stopped; dropping it resumes them.

use std::{
    collections::HashSet,
    marker::PhantomData,
    sync::OnceLock,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::ptrace::{self, Options},
    unistd::Pid,
};

use super::{
    CheckOptions, Mem, PtraceError,
    checks::{already_traced, check_target, status_of},
    sys::{self, Regs, Status},
};

/// How a thread is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum StopKind {
    /// Our `PTRACE_INTERRUPT` (`PTRACE_EVENT_STOP` with SIGTRAP).
    Interrupt,
    /// The process was (or became) stopped by this job-control signal. It stays stopped after
    /// we detach: the kernel re-enters the group stop on detach while the stop is in effect.
    GroupStop(i32),
    /// A signal was about to be delivered; it is held and delivered when we detach.
    Signal(i32),
    /// Another ptrace event (clone, exec, exit...): the `PTRACE_EVENT_*` number.
    Event(i32),
    /// A syscall-enter or syscall-exit stop of an injected system call. Never a resting
    /// state once a [`super::RemoteSyscalls`] is done with the thread.
    Syscall,
}

impl StopKind {
    /// Whether system calls may be injected from here: not while exiting or in an exec.
    pub fn injectable(self) -> bool {
        !matches!(self, StopKind::Event(_))
    }
}

/// One stopped thread.
pub struct Thread {
    tid: i32,
    pub(crate) stop: StopKind,
    regs: Regs,
    /// Signals taken from signal-delivery stops, re-injected at resume, oldest first.
    pub(crate) held: Vec<libc::siginfo_t>,
    /// From the world's first interrupt until this thread's stop was seen.
    stopped_after: Duration,
}

impl Thread {
    pub fn tid(&self) -> i32 {
        self.tid
    }

    pub fn stop(&self) -> StopKind {
        self.stop
    }

    /// The general registers as they were when the thread stopped.
    pub fn regs(&self) -> &Regs {
        &self.regs
    }

    /// The registers now (`PTRACE_GETREGS`).
    pub fn read_regs(&self) -> Result<Regs, PtraceError> {
        sys::getregs(self.tid)
    }

    /// `NT_PRSTATUS` through `PTRACE_GETREGSET`: the general registers as raw bytes.
    pub fn prstatus(&self) -> Result<Vec<u8>, PtraceError> {
        sys::getregset(self.tid, sys::NT_PRSTATUS)
    }

    /// `NT_X86_XSTATE`: the XSAVE area (x87, xmm, ymm, and zmm where present) as raw bytes.
    /// The legacy area holds xmm0-15 at offset 160, the AVX upper halves sit at offset 576.
    pub fn xstate(&self) -> Result<Vec<u8>, PtraceError> {
        sys::getregset(self.tid, sys::NT_X86_XSTATE)
    }

    /// From the world's first interrupt until this thread's stop was seen: which thread held
    /// the stop up.
    pub fn stopped_after(&self) -> Duration {
        self.stopped_after
    }

    /// The signals held for re-injection at resume.
    pub fn held_signals(&self) -> Vec<i32> {
        self.held.iter().map(|i| i.si_signo).collect()
    }
}

/// How to stop the world.
#[derive(Clone, Debug)]
pub struct StopOptions {
    /// Set on every thread at seize: `PTRACE_O_TRACECLONE` makes an injected clone's child
    /// ours from its first instruction. Never set EXITKILL: if leakprobe dies the target must
    /// live on.
    pub ptrace_options: Options,
    /// The longest the target may stay stopped; every operation checks it and resumes the
    /// target rather than exceed it.
    pub max_pause: Duration,
    pub checks: CheckOptions,
}

impl Default for StopOptions {
    fn default() -> Self {
        StopOptions {
            ptrace_options: Options::empty(),
            max_pause: Duration::from_millis(250),
            checks: CheckOptions::default(),
        }
    }
}

/// Every thread of one process, seized and stopped. Dropping it detaches every thread (and
/// re-injects held signals) on every path.
///
/// ptrace belongs to the tracing thread, so a world must stay on the thread that made it
/// (it is `!Send`; from tokio use `spawn_blocking`).
pub struct StoppedWorld {
    pid: i32,
    threads: Vec<Thread>,
    /// Seized but not yet seen stopped.
    pending: Vec<i32>,
    /// Tids that were zombies or vanished: never retried.
    ignored: HashSet<i32>,
    options: StopOptions,
    started: Instant,
    stop_latency: Duration,
    pause: Option<Duration>,
    pub(crate) remote_active: bool,
    mem: OnceLock<Mem>,
    syscall_insn: Option<u64>,
    /// Time spent in the exposed window (see [`super::stub`]).
    exposed: Duration,
    window_since: Option<Instant>,
    window_observer: Option<Box<dyn FnMut(bool)>>,
    _not_send: PhantomData<*const ()>,
}

pub(crate) fn list_tasks(pid: i32) -> Result<Vec<i32>, PtraceError> {
    let path = format!("/proc/{pid}/task");
    let dir = match std::fs::read_dir(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(PtraceError::Exited { pid }),
        Err(source) => return Err(PtraceError::Proc { path, source }),
    };
    Ok(dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
}

impl StoppedWorld {
    /// Checks the target, then seizes and interrupts every thread of `pid`, re-reading
    /// `/proc/PID/task` until no new thread appears, and waits until each one is stopped.
    pub fn stop(pid: i32, options: StopOptions) -> Result<StoppedWorld, PtraceError> {
        check_target(pid, options.checks)?;
        let _boost = sys::Boost::new();
        let mut world = StoppedWorld {
            pid,
            threads: Vec::new(),
            pending: Vec::new(),
            ignored: HashSet::new(),
            options,
            started: Instant::now(),
            stop_latency: Duration::ZERO,
            pause: None,
            remote_active: false,
            mem: OnceLock::new(),
            syscall_insn: None,
            exposed: Duration::ZERO,
            window_since: None,
            window_observer: None,
            _not_send: PhantomData,
        };
        // On any error below, dropping `world` detaches what was seized.
        // TracerPid names the tracing thread, not its process.
        let me = nix::unistd::gettid().as_raw();
        loop {
            let tids = list_tasks(pid)?;
            let mut fresh = 0;
            for tid in tids {
                if world.ignored.contains(&tid)
                    || world.pending.contains(&tid)
                    || world.threads.iter().any(|t| t.tid == tid)
                {
                    continue;
                }
                fresh += 1;
                match ptrace::seize(Pid::from_raw(tid), world.options.ptrace_options) {
                    Ok(()) => {}
                    Err(Errno::ESRCH) => {
                        world.ignored.insert(tid);
                        continue;
                    }
                    Err(Errno::EPERM) => {
                        // Auto-attached to us through TRACECLONE, a zombie thread, or someone else's.
                        match status_of(pid, tid) {
                            Ok(st) if st.tracer_pid == me => {}
                            Ok(st) if st.state == 'Z' || st.state == 'X' => {
                                world.ignored.insert(tid);
                                continue;
                            }
                            Ok(st) if st.tracer_pid != 0 => {
                                return Err(already_traced(pid, tid, st.tracer_pid));
                            }
                            Err(_) => {
                                world.ignored.insert(tid);
                                continue;
                            }
                            Ok(_) => return Err(PtraceError::Seize { pid, tid, source: Errno::EPERM }),
                        }
                    }
                    Err(source) => return Err(PtraceError::Seize { pid, tid, source }),
                }
                // ESRCH here means it is exiting; its wait status will say so.
                let _ = sys::interrupt(tid);
                world.pending.push(tid);
            }
            if fresh == 0 && world.pending.is_empty() {
                break;
            }
            world.wait_pending()?;
        }
        if world.threads.is_empty() {
            return Err(PtraceError::Exited { pid });
        }
        world.stop_latency = world.started.elapsed();
        Ok(world)
    }

    fn deadline(&self) -> Instant {
        self.started + self.options.max_pause
    }

    /// Waits for every pending thread to report a stop (or its exit).
    fn wait_pending(&mut self) -> Result<(), PtraceError> {
        let mut since = Instant::now();
        while !self.pending.is_empty() {
            let mut progressed = false;
            let mut i = 0;
            while i < self.pending.len() {
                let tid = self.pending[i];
                match sys::poll_wait(tid) {
                    Ok(None) => i += 1,
                    Ok(Some(status)) => {
                        progressed = true;
                        self.pending.swap_remove(i);
                        self.record_stop(tid, status)?;
                    }
                    Err(Errno::ECHILD) => {
                        progressed = true;
                        self.pending.swap_remove(i);
                        self.ignored.insert(tid);
                    }
                    Err(source) => return Err(PtraceError::Wait { tid, source }),
                }
            }
            if self.pending.is_empty() {
                break;
            }
            self.check_deadline("stopping threads")?;
            if progressed {
                since = Instant::now();
            } else {
                sys::backoff(since);
            }
        }
        Ok(())
    }

    /// Files a wait status from a thread that was pending.
    fn record_stop(&mut self, tid: i32, status: Status) -> Result<(), PtraceError> {
        let Status::Stopped { sig, event } = status else {
            self.ignored.insert(tid);
            return Ok(());
        };
        let (stop, held) = match (event, sig) {
            (libc::PTRACE_EVENT_STOP, libc::SIGTRAP) => (StopKind::Interrupt, None),
            (libc::PTRACE_EVENT_STOP, sig) => (StopKind::GroupStop(sig), None),
            (0, sig) => match sys::getsiginfo(tid) {
                Ok(info) => (StopKind::Signal(sig), Some(info)),
                Err(_) => {
                    self.ignored.insert(tid);
                    return Ok(());
                }
            },
            (event, _) => (StopKind::Event(event), None),
        };
        match sys::getregs(tid) {
            Ok(regs) => {
                self.threads.push(Thread {
                    tid,
                    stop,
                    regs,
                    held: held.into_iter().collect(),
                    stopped_after: self.started.elapsed(),
                });
                Ok(())
            }
            // SIGKILLed meanwhile: it is gone.
            Err(PtraceError::Ptrace { source: Errno::ESRCH, .. }) => {
                self.ignored.insert(tid);
                Ok(())
            }
            Err(e) => {
                // Stopped but unreadable: still ours to detach.
                self.threads.push(Thread {
                    tid,
                    stop,
                    regs: unsafe_zero_regs(),
                    held: held.into_iter().collect(),
                    stopped_after: self.started.elapsed(),
                });
                Err(e)
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn threads(&self) -> &[Thread] {
        &self.threads
    }

    pub fn thread(&self, tid: i32) -> Option<&Thread> {
        self.threads.iter().find(|t| t.tid == tid)
    }

    pub(crate) fn thread_mut(&mut self, tid: i32) -> Option<&mut Thread> {
        self.threads.iter_mut().find(|t| t.tid == tid)
    }

    pub fn tids(&self) -> Vec<i32> {
        self.threads.iter().map(|t| t.tid).collect()
    }

    /// From the first interrupt until every thread was stopped.
    pub fn stop_latency(&self) -> Duration {
        self.stop_latency
    }

    /// How long the target has been stopped so far (from the first interrupt).
    pub fn stopped_for(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn ptrace_options(&self) -> Options {
        self.options.ptrace_options
    }

    pub fn max_pause(&self) -> Duration {
        self.options.max_pause
    }

    /// When the pause started: the first `PTRACE_INTERRUPT`.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The whole pause, once resumed.
    pub fn pause(&self) -> Option<Duration> {
        self.pause
    }

    pub fn is_resumed(&self) -> bool {
        self.pause.is_some()
    }

    /// `/proc/PID/mem`, opened on first use.
    pub fn mem(&self) -> Result<&Mem, PtraceError> {
        if let Some(m) = self.mem.get() {
            return Ok(m);
        }
        let m = Mem::open(self.pid)?;
        Ok(self.mem.get_or_init(|| m))
    }

    /// A `syscall` instruction in the target (found once per world).
    pub fn syscall_insn(&mut self) -> Result<u64, PtraceError> {
        if let Some(a) = self.syscall_insn {
            return Ok(a);
        }
        let a = super::find_syscall_insn(self.pid, self.mem()?)?;
        self.syscall_insn = Some(a);
        Ok(a)
    }

    /// Total time a thread spent in an exposed window: where a SIGKILL of leakprobe would
    /// leave it with our registers (the page's first mmap and last munmap).
    pub fn exposed_window(&self) -> Duration {
        self.exposed
    }

    /// Calls `f(true)` when an exposed window opens and `f(false)` when it closes (tests use
    /// it to tell a kill inside the window from one outside).
    pub fn set_window_observer(&mut self, f: impl FnMut(bool) + 'static) {
        self.window_observer = Some(Box::new(f));
    }

    pub(crate) fn window(&mut self, open: bool) {
        if open {
            self.window_since = Some(Instant::now());
        } else if let Some(t) = self.window_since.take() {
            self.exposed += t.elapsed();
        }
        if let Some(f) = self.window_observer.as_mut() {
            f(open);
        }
    }

    /// Drops a thread that exited under us.
    pub(crate) fn forget(&mut self, tid: i32) {
        self.threads.retain(|t| t.tid != tid);
        self.ignored.insert(tid);
    }

    fn check_deadline(&self, during: &'static str) -> Result<(), PtraceError> {
        let elapsed = self.started.elapsed();
        if self.pause.is_some() || elapsed >= self.options.max_pause {
            return Err(PtraceError::PauseExceeded { max: self.options.max_pause, elapsed, during });
        }
        Ok(())
    }

    /// Fails (and resumes the target at once, unless a [`super::RemoteSyscalls`] still has a
    /// thread's registers to restore) when the pause bound is reached.
    pub fn check_pause(&mut self, during: &'static str) -> Result<(), PtraceError> {
        let r = self.check_deadline(during);
        if r.is_err() && !self.remote_active {
            self.resume_all();
        }
        r
    }

    /// The deadline for one step of work, for waits that must not outlive the pause.
    pub(crate) fn pause_deadline(&self) -> Instant {
        self.deadline()
    }

    /// Resumes every thread now; returns the whole pause.
    pub fn resume(mut self) -> Duration {
        self.resume_all()
    }

    pub(crate) fn resume_all(&mut self) -> Duration {
        if let Some(p) = self.pause {
            return p;
        }
        let _rt = sys::Realtime::new();
        let mut requeue: Vec<(i32, libc::siginfo_t)> = Vec::new();
        let mut threads = std::mem::take(&mut self.threads);
        // Threads that were blocked first: they go back to sleep; running ones compete with us.
        threads.sort_by_key(|t| (t.regs.orig_rax as i64) < 0);
        for t in threads {
            let mut held = t.held.into_iter();
            // Only a signal-delivery stop can hand a signal back; others ignore detach's signal.
            let first = match t.stop {
                StopKind::Signal(_) => held.next(),
                _ => None,
            };
            let signo = first.as_ref().map_or(0, |i| i.si_signo);
            if let Err(e) = sys::detach(t.tid, signo) {
                self.detach_running(t.tid, e);
                requeue.extend(first.map(|i| (t.tid, i)));
            }
            requeue.extend(held.map(|i| (t.tid, i)));
        }
        for tid in std::mem::take(&mut self.pending) {
            self.detach_running(tid, Errno::ESRCH);
        }
        let pause = self.started.elapsed();
        self.pause = Some(pause);
        for (tid, info) in requeue {
            requeue_signal(self.pid, tid, &info);
        }
        pause
    }

    /// Detaches a thread that was not in a stop (still running after an interrupt, or
    /// exited): interrupt, wait briefly, detach; reap it if it exited.
    fn detach_running(&mut self, tid: i32, first: Errno) {
        if first != Errno::ESRCH {
            tracing::debug!(tid, %first, "detach failed");
        }
        let _ = sys::interrupt(tid);
        let deadline = Instant::now() + Duration::from_millis(100);
        match sys::wait_until(tid, deadline) {
            Ok(Some(Status::Gone)) | Err(_) => {}
            Ok(Some(_)) => {
                let _ = sys::detach(tid, 0);
            }
            Ok(None) => {
                tracing::warn!(tid, "thread did not stop to be detached; it detaches when leakprobe exits")
            }
        }
    }
}

/// Re-raises a held signal that could not be handed back from its own stop. A queued
/// signal (negative si_code: sigqueue, timers) is forwarded with its siginfo; the kernel
/// refuses forged SI_USER/SI_TKILL/kernel siginfo from another process, so those become a
/// plain tgkill (the handler sees leakprobe as the sender).
fn requeue_signal(pid: i32, tid: i32, info: &libc::siginfo_t) {
    let mut info = *info;
    // SAFETY: plain syscalls; `info` outlives them.
    unsafe {
        if info.si_code < 0
            && info.si_code != libc::SI_TKILL
            && libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, info.si_signo, &mut info as *mut _) == 0
        {
            return;
        }
        if libc::syscall(libc::SYS_tgkill, pid, tid, info.si_signo) != 0 {
            // The thread is gone: the process still gets the signal.
            libc::kill(pid, info.si_signo);
        }
    }
}

fn unsafe_zero_regs() -> Regs {
    // SAFETY: user_regs_struct is plain integers; all zeros is a valid value.
    unsafe { std::mem::zeroed() }
}

impl Drop for StoppedWorld {
    fn drop(&mut self) {
        self.resume_all();
    }
}
