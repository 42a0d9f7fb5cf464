//! Children held at birth (`--children`, `--cgroup`): none of a new worker's allocations is
//! missed.
//!
//! A child forked by a traced process is in `TARGETS` before it runs (the fork tracepoint), but
//! its uprobe links can be made only once user space has heard of it: 2-100 ms on a quiet
//! kernel, in which a pre-fork worker serves its first requests unseen. The follower closes
//! that gap. It traces every thread of each followed process with `PTRACE_O_TRACEFORK`,
//! `TRACEVFORK` and `TRACECLONE` (and `TRACEEXEC`: a process that calls exec leaves the
//! session, and the follower lets go of it there), so that the kernel starts each child in a ptrace stop, before
//! its first instruction. The child is held there until leakprobe has attached its probes and
//! calls [`Follower::release`], or for [`MAX_HOLD`] at most. A released child stays followed:
//! its own children are held in turn.
//!
//! The follower is a helper process of ours, like [`super::server`] and for the same reason: a
//! SIGKILLed leakprobe lets go of its tracees only after its perf events are closed (seconds),
//! while the follower reads EOF at once and exits, and the kernel then detaches every tracee.
//! No `PTRACE_O_EXITKILL`: whichever of us dies, every process goes on, a held child included.
//!
//! What a followed process notices is time only: a fork or a new thread costs it a round trip
//! through the follower (tens of microseconds), so does each signal it receives (the delivery
//! stop is resumed with that same signal), and a new child starts once its probes are live.
//! A group stop stays a stop (`PTRACE_LISTEN`), as job control wants. A vfork child is never
//! held (its parent waits for its exec); a child that calls exec is let go there.

use std::{
    collections::{HashMap, HashSet},
    io::Write as _,
    os::fd::{AsRawFd as _, FromRawFd as _},
    time::{Duration, Instant},
};

use nix::{errno::Errno, sys::ptrace, unistd::Pid};
use serde::{Deserialize, Serialize};

use super::{
    CheckOptions, PtraceError,
    checks::{already_traced, check_target, status_of},
    server::{Helper, read_msg, write_msg},
    sys::{self, Status},
    world::list_tasks,
};

/// The hidden first argument that makes leakprobe the follower; the second is
/// `--max-processes`.
pub const ARG: &str = "__ptrace-follower";

/// The longest a child is held at birth when leakprobe does not release it (its probes take
/// longer, or its fork was never reported): it then runs, unseen until its probes are live.
/// Attaching a child's probes takes 2-95 ms on a quiet kernel, longer while other probes are
/// being torn down (docs/benchmarks.md).
pub const MAX_HOLD: Duration = Duration::from_millis(250);

/// Children held per second at most. A parent that forks faster (a process per connection, a
/// shell loop) would wait for every child's probes; past this, its children go on at once and
/// are seen from just after their fork (`blind_ms`).
pub const HOLDS_PER_SECOND: usize = 8;

/// [`MAX_HOLD`], or for tests `LEAKPROBE_TEST_MAX_HOLD_MS`.
fn max_hold() -> Duration {
    std::env::var("LEAKPROBE_TEST_MAX_HOLD_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(MAX_HOLD, Duration::from_millis)
}

/// Released children the follower let go on its own, remembered until leakprobe asks.
const MAX_TIMED_OUT: usize = 4096;

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    /// Trace every thread of the process, so that its children are held at birth.
    Follow { pid: i32 },
    /// Let the child go: followed (its probes are live), or not (it is not traced).
    Release { pid: i32, follow: bool },
    /// Stop following the process (it left the session but runs on).
    Unfollow { pid: i32 },
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Following { threads: u32 },
    Unfollowed,
    Released(Release),
    Failed(String),
}

/// What [`Follower::release`] found.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Release {
    /// Held from its birth until now: it ran nothing unseen.
    Held { held: Duration },
    /// Not at its first stop yet: it is let go there, before its first instruction.
    BeforeItsStop,
    /// Held for [`MAX_HOLD`], then let go before its probes were live.
    TimedOut { held: Duration },
    /// Not a child the follower holds (its parent is not followed, or it has gone).
    NotHeld,
}

// ---------------------------------------------------------------------------------------------
// leakprobe's side

/// The follower process. Dropping it ends the follower, which lets every process go.
pub struct Follower {
    helper: Option<Helper>,
}

impl Follower {
    /// Starts the follower; it follows no more than `max_processes` processes at once (a child
    /// past that runs untraced by it).
    pub fn start(max_processes: usize) -> Result<Follower, PtraceError> {
        let max = max_processes.to_string();
        Ok(Follower { helper: Some(Helper::spawn(&[ARG, &max])?) })
    }

    fn ask(&mut self, req: &Request) -> Result<Reply, PtraceError> {
        let helper = self.helper.as_mut().ok_or(PtraceError::Helper {
            what: "has ended",
            source: std::io::Error::other("the follower was ended"),
        })?;
        match helper.exchange::<Reply>(req) {
            Ok(Reply::Failed(message)) => Err(PtraceError::InHelper { message }),
            Ok(r) => Ok(r),
            Err(e) => {
                // It is gone (killed, or its pipe broke): every process it followed runs on.
                if let Some(h) = self.helper.take() {
                    h.end();
                }
                Err(e)
            }
        }
    }

    /// Follows every thread of `pid`: its children are held at birth from now on. Returns how
    /// many threads it has.
    pub fn follow(&mut self, pid: i32) -> Result<u32, PtraceError> {
        match self.ask(&Request::Follow { pid })? {
            Reply::Following { threads } => Ok(threads),
            other => Err(out_of_turn(other)),
        }
    }

    /// Lets a child held at birth go. `follow`: its probes are live, and its own children are
    /// to be held in turn; otherwise it is not traced, and the follower lets go of it too.
    pub fn release(&mut self, pid: i32, follow: bool) -> Result<Release, PtraceError> {
        match self.ask(&Request::Release { pid, follow })? {
            Reply::Released(r) => Ok(r),
            other => Err(out_of_turn(other)),
        }
    }

    /// Stops following `pid` (it left the session, by exec or by leaving the cgroup, and runs
    /// on): its children are no longer held.
    pub fn unfollow(&mut self, pid: i32) -> Result<(), PtraceError> {
        match self.ask(&Request::Unfollow { pid })? {
            Reply::Unfollowed => Ok(()),
            other => Err(out_of_turn(other)),
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(h) = self.helper.take() {
            h.end();
        }
    }
}

fn out_of_turn(reply: Reply) -> PtraceError {
    PtraceError::Helper { what: "answered out of turn", source: std::io::Error::other(format!("{reply:?}")) }
}

// ---------------------------------------------------------------------------------------------
// The follower's side

/// A thread we had not heard of, at its first stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Newcomer {
    /// A new thread of a followed process.
    Thread { tgid: i32 },
    /// A new process. `early`: leakprobe released it already, to be followed or not; `over`:
    /// --max-processes are followed already.
    Process { early: Option<bool>, over: bool },
}

/// What to do with one stop (or end) of a traced thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Resume it, delivering this signal (0: none).
    Cont(i32),
    /// A group stop: it stays stopped, as job control wants, and we hear when it ends.
    Listen,
    /// A new process at its first stop: hold it until released, then deliver this signal.
    Hold(i32),
    /// A new process not to follow: let it go untraced, with this signal.
    Detach(i32),
    /// It called exec: another program, which the session does not follow. Let it go.
    Exec,
    /// It has ended.
    Forget,
}

/// The decision for one wait status: `newcomer` is set for a thread not seen before.
fn step(status: Status, newcomer: Option<Newcomer>) -> Step {
    let Status::Stopped { sig, event } = status else { return Step::Forget };
    // A signal-delivery stop (event 0) carries a signal to pass on; an event stop none.
    let pass = if event == 0 { sig } else { 0 };
    match newcomer {
        Some(Newcomer::Process { over: true, .. } | Newcomer::Process { early: Some(false), .. }) => {
            return Step::Detach(pass);
        }
        Some(Newcomer::Process { early: None, .. }) => return Step::Hold(pass),
        _ => {}
    }
    match event {
        0 => Step::Cont(sig),
        libc::PTRACE_EVENT_EXEC => Step::Exec,
        // Under PTRACE_SEIZE a group stop is an event stop with the stopping signal; every
        // other event stop (an interrupt, the end of a group stop, a new task) carries SIGTRAP.
        libc::PTRACE_EVENT_STOP if sig != libc::SIGTRAP => Step::Listen,
        _ => Step::Cont(0),
    }
}

struct Held {
    since: Instant,
    sig: i32,
}

/// Every thread the follower traces, and the children it holds.
struct Tracer {
    me: i32,
    max_processes: usize,
    /// tid → its process.
    threads: HashMap<i32, i32>,
    processes: HashSet<i32>,
    held: HashMap<i32, Held>,
    /// Released by leakprobe before their first stop was seen: to be followed or not.
    early: HashMap<i32, bool>,
    /// Let go by [`MAX_HOLD`]: how long each was held.
    timed_out: HashMap<i32, Duration>,
    max_hold: Duration,
    /// When the children of the last second were held ([`HOLDS_PER_SECOND`]).
    recent_holds: std::collections::VecDeque<Instant>,
}

const OPTIONS: ptrace::Options = ptrace::Options::PTRACE_O_TRACEFORK
    .union(ptrace::Options::PTRACE_O_TRACEVFORK)
    .union(ptrace::Options::PTRACE_O_TRACECLONE)
    .union(ptrace::Options::PTRACE_O_TRACEEXEC);

impl Tracer {
    fn new(max_processes: usize) -> Tracer {
        Tracer {
            me: std::process::id() as i32,
            max_processes: max_processes.max(1),
            threads: HashMap::new(),
            processes: HashSet::new(),
            held: HashMap::new(),
            early: HashMap::new(),
            timed_out: HashMap::new(),
            max_hold: max_hold(),
            recent_holds: std::collections::VecDeque::new(),
        }
    }

    /// Whether [`HOLDS_PER_SECOND`] children were held in the last second.
    fn holding_too_many(&mut self) -> bool {
        while self.recent_holds.front().is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
            self.recent_holds.pop_front();
        }
        self.recent_holds.len() >= HOLDS_PER_SECOND
    }

    fn handle(&mut self, req: Request) -> Reply {
        match req {
            Request::Follow { pid } => match self.follow(pid) {
                Ok(threads) => Reply::Following { threads },
                Err(e) => Reply::Failed(e.to_string()),
            },
            Request::Release { pid, follow } => Reply::Released(self.release(pid, follow)),
            Request::Unfollow { pid } => {
                self.unfollow(pid);
                Reply::Unfollowed
            }
        }
    }

    /// Seizes every thread of `pid` (re-reading its task list until no new one appears).
    fn follow(&mut self, pid: i32) -> Result<u32, PtraceError> {
        check_target(pid, CheckOptions { allow_seccomp_filter: true })?;
        let mut gone = HashSet::new();
        loop {
            let fresh: Vec<i32> = list_tasks(pid)?
                .into_iter()
                .filter(|t| !self.threads.contains_key(t) && !gone.contains(t))
                .collect();
            if fresh.is_empty() {
                break;
            }
            for tid in fresh {
                match ptrace::seize(Pid::from_raw(tid), OPTIONS) {
                    Ok(()) => {
                        self.threads.insert(tid, pid);
                    }
                    Err(Errno::ESRCH) => {
                        gone.insert(tid);
                    }
                    // Ours already (a thread born after we seized its creator), a zombie, or
                    // someone else's. What was seized stays followed: harmless.
                    Err(source) => match status_of(pid, tid) {
                        Ok(st) if st.tracer_pid == self.me => {
                            self.threads.insert(tid, pid);
                        }
                        Ok(st) if st.tracer_pid != 0 => return Err(already_traced(pid, tid, st.tracer_pid)),
                        Ok(st) if st.state != 'Z' && st.state != 'X' => {
                            return Err(PtraceError::Seize { pid, tid, source });
                        }
                        _ => {
                            gone.insert(tid);
                        }
                    },
                }
            }
        }
        let threads = self.threads_of(pid).len();
        if threads == 0 {
            return Err(PtraceError::Exited { pid });
        }
        self.processes.insert(pid);
        Ok(threads as u32)
    }

    fn release(&mut self, pid: i32, follow: bool) -> Release {
        self.reap();
        if let Some(h) = self.held.remove(&pid) {
            match follow {
                true => {
                    let _ = sys::cont(pid, h.sig);
                }
                false => {
                    let _ = sys::detach(pid, h.sig);
                    self.forget(pid);
                }
            }
            return Release::Held { held: h.since.elapsed() };
        }
        let released = match self.timed_out.remove(&pid) {
            Some(held) => Release::TimedOut { held },
            None if self.threads.contains_key(&pid) => Release::NotHeld,
            None => match status_of(pid, pid) {
                // Traced by us since its birth, its first stop still to come.
                Ok(st) if st.tracer_pid == self.me => {
                    // A vfork child stays let go untraced.
                    self.early.entry(pid).or_insert(follow);
                    return Release::BeforeItsStop;
                }
                _ => Release::NotHeld,
            },
        };
        if !follow {
            self.unfollow(pid);
        }
        released
    }

    /// Lets go of every thread of `pid`: a held one with the signal it stopped for, the others
    /// once they have stopped for our interrupt, each with the signal it stopped for, if any
    /// (a thread in a group stop reports an event stop, and stays stopped).
    fn unfollow(&mut self, pid: i32) {
        // Stops already pending are handled first (a signal-delivery stop is passed on).
        self.reap();
        let mut running = Vec::new();
        for tid in self.threads_of(pid) {
            match self.held.remove(&tid) {
                Some(h) => {
                    let _ = sys::detach(tid, h.sig);
                }
                None => {
                    let _ = sys::interrupt(tid);
                    running.push(tid);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_millis(200);
        for tid in running {
            // Bounded: a thread that never stops (a vfork parent) stays traced until we exit,
            // which is harmless.
            if let Ok(Some(Status::Stopped { sig, event })) = sys::wait_until(tid, deadline) {
                let _ = sys::detach(tid, if event == 0 { sig } else { 0 });
            }
        }
        self.forget_process(pid);
    }

    fn forget(&mut self, tid: i32) {
        if self.threads.remove(&tid) == Some(tid) {
            self.processes.remove(&tid);
        }
        self.held.remove(&tid);
        self.early.remove(&tid);
    }

    /// Every wait status pending, handled.
    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: plain syscall writing one int we own.
            let tid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL | libc::WNOHANG) };
            if tid <= 0 {
                return;
            }
            self.on_status(tid, sys::decode(status));
        }
    }

    fn newcomer(&mut self, tid: i32) -> Newcomer {
        match status_of(tid, tid) {
            Ok(st) if st.tgid == tid => Newcomer::Process {
                // Past the hold rate: as if released already, followed.
                early: self.early.remove(&tid).or_else(|| self.holding_too_many().then_some(true)),
                over: self.processes.len() >= self.max_processes,
            },
            Ok(st) => Newcomer::Thread { tgid: st.tgid },
            Err(_) => Newcomer::Thread { tgid: tid },
        }
    }

    fn on_status(&mut self, tid: i32, status: Status) {
        if status == (Status::Stopped { sig: libc::SIGTRAP, event: libc::PTRACE_EVENT_VFORK }) {
            self.vforked(tid);
        }
        let newcomer = (!self.threads.contains_key(&tid)).then(|| self.newcomer(tid));
        match step(status, newcomer) {
            Step::Forget => self.forget(tid),
            Step::Cont(sig) => {
                self.admit(tid, newcomer);
                let _ = sys::cont(tid, sig);
            }
            Step::Listen => {
                self.admit(tid, newcomer);
                let _ = sys::listen(tid);
            }
            Step::Hold(sig) => {
                self.admit(tid, newcomer);
                self.recent_holds.push_back(Instant::now());
                self.held.insert(tid, Held { since: Instant::now(), sig });
            }
            Step::Detach(sig) => {
                let _ = sys::detach(tid, sig);
            }
            Step::Exec => {
                // Its other threads are gone; the one that called exec now has the PID.
                let pid = self.threads.get(&tid).copied().unwrap_or(tid);
                let _ = sys::detach(tid, 0);
                self.forget_process(pid);
            }
        }
    }

    /// A thread seen for the first time, and followed from now on.
    fn admit(&mut self, tid: i32, newcomer: Option<Newcomer>) {
        match newcomer {
            Some(Newcomer::Thread { tgid }) => {
                self.threads.insert(tid, tgid);
            }
            Some(Newcomer::Process { .. }) => {
                self.threads.insert(tid, tid);
                self.processes.insert(tid);
            }
            None => {}
        }
    }

    /// The threads of `pid` we trace.
    fn threads_of(&self, pid: i32) -> Vec<i32> {
        self.threads.iter().filter(|(_, p)| **p == pid).map(|(t, _)| *t).collect()
    }

    /// Forgets `pid` and every thread of it.
    fn forget_process(&mut self, pid: i32) {
        for tid in self.threads_of(pid) {
            self.forget(tid);
        }
        self.processes.remove(&pid);
    }

    /// A vfork child (`posix_spawn`, `subprocess`) is not held: its parent waits for it, and it
    /// runs only until it calls exec or exits, in the parent's memory. Let it go untraced.
    fn vforked(&mut self, parent: i32) {
        let Ok(child) = sys::geteventmsg(parent).map(|c| c as i32) else { return };
        match self.held.remove(&child) {
            Some(h) => {
                let _ = sys::detach(child, h.sig);
                self.forget(child);
            }
            None => {
                self.early.insert(child, false);
            }
        }
    }

    /// Lets go the children held for [`MAX_HOLD`].
    fn expire(&mut self) {
        let late: Vec<i32> =
            self.held.iter().filter(|(_, h)| h.since.elapsed() >= self.max_hold).map(|(p, _)| *p).collect();
        for pid in late {
            if let Some(h) = self.held.remove(&pid) {
                let _ = sys::cont(pid, h.sig);
                if self.timed_out.len() >= MAX_TIMED_OUT {
                    self.timed_out.clear();
                }
                self.timed_out.insert(pid, h.since.elapsed());
            }
        }
    }

    /// Milliseconds until the next hold runs out (-1: none held).
    fn poll_timeout(&self) -> i32 {
        match self.held.values().map(|h| h.since + self.max_hold).min() {
            Some(at) => at.saturating_duration_since(Instant::now()).as_millis().min(1000) as i32 + 1,
            None => -1,
        }
    }
}

/// A descriptor that reads SIGCHLD, which the kernel sends us at every stop of a tracee.
fn sigchld_fd() -> std::io::Result<nix::sys::signalfd::SignalFd> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.thread_block().map_err(std::io::Error::from)?;
    nix::sys::signalfd::SignalFd::with_flags(
        &set,
        nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    )
    .map_err(std::io::Error::from)
}

/// The follower process's main: follow and hold until the pipe ends, then exit (the kernel
/// detaches every tracee).
pub fn run() -> std::process::ExitCode {
    // Only the pipe ends the follower.
    // SAFETY: ignoring a signal installs no handler code.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let max = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(256);
    let Ok(sigchld) = sigchld_fd() else { return std::process::ExitCode::FAILURE };
    // Unbuffered: a frame half read into a buffer would not wake poll.
    // SAFETY: descriptor 0 is our stdin, the request pipe; nothing else uses it.
    let mut input = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(0) });
    let mut output = std::io::stdout().lock();
    let mut tracer = Tracer::new(max);
    loop {
        let mut fds = [
            libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: sigchld.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, tracer.poll_timeout()) };
        if n < 0 && Errno::last() != Errno::EINTR {
            break;
        }
        if fds[1].revents != 0 {
            while let Ok(Some(_)) = sigchld.read_signal() {}
        }
        tracer.reap();
        if fds[0].revents != 0 {
            let Ok(req) = read_msg::<Request>(&mut *input) else { break };
            let reply = tracer.handle(req);
            if write_msg(&mut output, &reply).and_then(|_| output.flush()).is_err() {
                break;
            }
        }
        tracer.expire();
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    const STOP: i32 = libc::PTRACE_EVENT_STOP;

    fn stopped(sig: i32, event: i32) -> Status {
        Status::Stopped { sig, event }
    }

    #[test]
    fn a_new_process_is_held_with_the_signal_it_stopped_for() {
        let fresh = Some(Newcomer::Process { early: None, over: false });
        assert_eq!(step(stopped(libc::SIGTRAP, STOP), fresh), Step::Hold(0));
        // Stopped first by a signal: held, and the signal is passed on at release.
        assert_eq!(step(stopped(libc::SIGUSR1, 0), fresh), Step::Hold(libc::SIGUSR1));
    }

    #[test]
    fn a_process_released_early_or_over_the_limit_is_not_held() {
        let early = Some(Newcomer::Process { early: Some(true), over: false });
        assert_eq!(step(stopped(libc::SIGTRAP, STOP), early), Step::Cont(0));
        let dropped = Some(Newcomer::Process { early: Some(false), over: false });
        assert_eq!(step(stopped(libc::SIGTRAP, STOP), dropped), Step::Detach(0));
        let over = Some(Newcomer::Process { early: None, over: true });
        assert_eq!(step(stopped(libc::SIGTRAP, STOP), over), Step::Detach(0));
        assert_eq!(step(stopped(libc::SIGTERM, 0), over), Step::Detach(libc::SIGTERM));
    }

    #[test]
    fn threads_and_events_go_on_and_signals_are_passed_on() {
        assert_eq!(step(stopped(libc::SIGTRAP, STOP), Some(Newcomer::Thread { tgid: 1 })), Step::Cont(0));
        assert_eq!(step(stopped(libc::SIGTRAP, libc::PTRACE_EVENT_FORK), None), Step::Cont(0));
        assert_eq!(step(stopped(libc::SIGTRAP, libc::PTRACE_EVENT_CLONE), None), Step::Cont(0));
        assert_eq!(step(stopped(libc::SIGTRAP, libc::PTRACE_EVENT_EXEC), None), Step::Exec);
        assert_eq!(step(stopped(libc::SIGCHLD, 0), None), Step::Cont(libc::SIGCHLD));
        // A real-time signal too (nix's Signal has none).
        assert_eq!(step(stopped(libc::SIGRTMIN() + 3, 0), None), Step::Cont(libc::SIGRTMIN() + 3));
    }

    #[test]
    fn a_group_stop_stays_a_stop() {
        assert_eq!(step(stopped(libc::SIGSTOP, STOP), None), Step::Listen);
        assert_eq!(step(stopped(libc::SIGTSTP, STOP), None), Step::Listen);
        // The SIGSTOP's own delivery stop comes first, and is passed on.
        assert_eq!(step(stopped(libc::SIGSTOP, 0), None), Step::Cont(libc::SIGSTOP));
    }

    #[test]
    fn an_end_is_forgotten() {
        assert_eq!(step(Status::Gone, None), Step::Forget);
        assert_eq!(step(Status::Gone, Some(Newcomer::Process { early: None, over: false })), Step::Forget);
    }
}
