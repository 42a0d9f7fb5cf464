//! The ptrace helper: a small process of ours that stops the target and runs the injected
//! calls, so that a SIGKILLed leakprobe never leaves the target stopped for long.
//!
//! Why a process: the kernel lets go of a dead tracer's tracees only in `exit_notify`, after
//! it has closed every file of the tracer, and each uprobe's perf event takes ~0.1 s to close.
//! A leakprobe killed inside a stop held the target stopped for 0.1 s per probe (2 s with 12
//! probes and its unwind maps). The helper is leakprobe itself, started with a hidden argument
//! ([`start`]): it holds no perf event (every descriptor of ours is close-on-exec), and it
//! reads EOF on its request pipe as soon as the kernel starts releasing a dying leakprobe's
//! files. An exiting task's files are released last descriptor first (each `fput` is a task
//! work, run newest first), so the pipe's end is moved to a descriptor above all others
//! ([`move_high`]). It then ends what it was doing (registers put back, every thread detached), kills and reaps the scan's snapshot
//! child, and exits. The stop after a SIGKILL is thus bounded by the stop itself.
//!
//! The helper keeps its own clock too: a world left stopped past its `max_pause` with no
//! request (leakprobe frozen by SIGSTOP, swapped out, stuck) is resumed, and the requests
//! that follow for it fail with [`PtraceError::InHelper`].
//!
//! leakprobe keeps reading and writing the target's memory itself (`/proc/PID/mem` needs no
//! tracer for root). Protocol: one request, one reply, each a `u32` length and a postcard body,
//! on the helper's stdin and stdout.

use std::{
    collections::HashSet,
    io::{Read, Write},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use nix::sys::ptrace::Options;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{CheckOptions, Mem, PtraceError, RemoteSyscalls, StopKind, StopOptions, StoppedWorld, sys::Regs};

/// The hidden first argument that makes leakprobe the ptrace helper.
pub const ARG: &str = "__ptrace-helper";

/// The longest message either side accepts (a stop of 10,000 threads with their XSAVE areas).
const MAX_MESSAGE: usize = 256 << 20;

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Stop {
        pid: i32,
        options: i32,
        max_pause: Duration,
        allow_seccomp_filter: bool,
        xstate: bool,
    },
    BeginRemote,
    Call(Call),
    FinishRemote,
    Resume,
    /// Kill the snapshot child, collect it as its tracer, and reap its zombie in the target.
    Reap {
        pid: i32,
        child: i32,
        max_pause: Duration,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum Call {
    Syscall {
        name: String,
        nr: i64,
        args: [u64; 6],
    },
    /// `clone(flags, 0, 0, 0, 0)` from our code page: its child path is `exit_group`.
    Clone {
        flags: u64,
    },
    MemfdCreate {
        name: String,
        flags: u32,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Stopped { threads: Vec<ThreadView>, stopped_at_ns: u64 },
    Done,
    Value(u64),
    Pause(Duration),
    Failed(String),
}

/// One thread of a world the helper holds stopped, as it was when it stopped.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ThreadView {
    pub tid: i32,
    pub stop: StopKind,
    /// `user_regs_struct` as its 27 words.
    regs: Vec<u64>,
    /// `NT_X86_XSTATE`, when asked for and readable; empty otherwise.
    pub xstate: Vec<u8>,
    /// From the world's first interrupt until this thread's stop was seen.
    pub stopped_after: Duration,
}

const REGS_WORDS: usize = std::mem::size_of::<Regs>() / 8;
const _: () = assert!(std::mem::size_of::<Regs>() == REGS_WORDS * 8);

impl ThreadView {
    /// The general registers as they were when the thread stopped.
    pub fn regs(&self) -> libc::user_regs_struct {
        // SAFETY: user_regs_struct is plain u64 fields; all zeros is a valid value.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        let n = self.regs.len().min(REGS_WORDS);
        // SAFETY: `r` is REGS_WORDS u64 words long and we write at most that many.
        unsafe { std::ptr::copy_nonoverlapping(self.regs.as_ptr(), &mut r as *mut Regs as *mut u64, n) };
        r
    }

    fn of(t: &super::Thread, xstate: bool) -> ThreadView {
        let r = t.regs();
        // SAFETY: as above, read as REGS_WORDS words.
        let words = unsafe { std::slice::from_raw_parts(r as *const Regs as *const u64, REGS_WORDS) };
        ThreadView {
            tid: t.tid(),
            stop: t.stop(),
            regs: words.to_vec(),
            xstate: if xstate { t.xstate().unwrap_or_default() } else { Vec::new() },
            stopped_after: t.stopped_after(),
        }
    }
}

pub(super) fn write_msg(w: &mut impl Write, msg: &impl Serialize) -> std::io::Result<()> {
    let body = postcard::to_stdvec(msg).map_err(std::io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend((body.len() as u32).to_le_bytes());
    frame.extend(body);
    w.write_all(&frame)?;
    w.flush()
}

pub(super) fn read_msg<T: DeserializeOwned>(r: &mut impl Read) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::other(format!("a {len}-byte message is over the limit")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    postcard::from_bytes(&body).map_err(std::io::Error::other)
}

/// The error and its causes on one line, for a reply.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// leakprobe's side

/// One of our helper processes (this one, or the follower of `super::follow`): leakprobe
/// itself started with a hidden argument, spoken to in frames on its stdin and stdout.
pub(super) struct Helper {
    child: Child,
    input: ChildStdin,
    output: ChildStdout,
}

static HELPER: Mutex<Option<Helper>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<Helper>> {
    HELPER.lock().unwrap_or_else(|p| p.into_inner())
}

fn lost(what: &'static str) -> impl FnOnce(std::io::Error) -> PtraceError {
    move |source| PtraceError::Helper { what, source }
}

impl Helper {
    pub(super) fn spawn(args: &[&str]) -> Result<Helper, PtraceError> {
        let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(lost("cannot be started"))?;
        let (Some(input), Some(output)) = (child.stdin.take().map(move_high), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(PtraceError::Helper {
                what: "has no pipes",
                source: std::io::Error::other("stdin or stdout not piped"),
            });
        };
        Ok(Helper { child, input, output })
    }

    /// One request, one reply.
    pub(super) fn exchange<R: DeserializeOwned>(&mut self, req: &impl Serialize) -> Result<R, PtraceError> {
        write_msg(&mut self.input, req).map_err(lost("stopped reading requests"))?;
        read_msg(&mut self.output).map_err(lost("stopped answering"))
    }

    /// Whether it has exited.
    pub(super) fn exited(&mut self) -> bool {
        self.child.try_wait().map_or(true, |s| s.is_some())
    }

    /// Closes its pipe and waits a little for it to exit.
    pub(super) fn end(mut self) {
        drop(self.input);
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if self.child.try_wait().is_ok_and(|s| s.is_some()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Moves `fd` above every descriptor we are likely to open, so that it is released first when
/// we die: an exiting task releases its files highest descriptor first (each `fput` is queued
/// as a task work, and task works run newest first), and a perf event of a uprobe takes ~0.1 s
/// to release. The helper's and the guards' pipes use it: they learn of our death before the
/// probes are torn down. Falls back to `fd` as it is.
pub fn move_high<F: From<OwnedFd> + Into<OwnedFd>>(fd: F) -> F {
    let fd: OwnedFd = fd.into();
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid pointer to an rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    // Room above for the few pipes of ours that want the same; a table of 64 Ki at most.
    let floor = lim.rlim_cur.min(1 << 16).saturating_sub(64) as i32;
    if floor <= fd.as_raw_fd() {
        return fd.into();
    }
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own; the new one is ours alone.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) };
    if high < 0 {
        return fd.into();
    }
    // SAFETY: `high` is a fresh descriptor nothing else owns.
    unsafe { OwnedFd::from_raw_fd(high) }.into()
}

/// The helper, started if it is not running. A helper that died is started again.
fn ensure(slot: &mut Option<Helper>) -> Result<&mut Helper, PtraceError> {
    if slot.as_mut().is_some_and(Helper::exited) {
        *slot = None;
    }
    if slot.is_none() {
        *slot = Some(Helper::spawn(&[ARG])?);
    }
    slot.as_mut()
        .ok_or(PtraceError::Helper { what: "is not running", source: std::io::Error::other("not started") })
}

/// One request on a locked helper; an I/O failure forgets it, so the next use starts another.
fn ask(slot: &mut Option<Helper>, req: &Request) -> Result<Reply, PtraceError> {
    let r = ensure(slot)?.exchange(req);
    if let Err(PtraceError::Helper { .. }) = &r
        && let Some(h) = slot.take()
    {
        h.end();
    }
    r
}

fn unexpected(reply: Reply) -> PtraceError {
    match reply {
        Reply::Failed(message) => PtraceError::InHelper { message },
        other => PtraceError::Helper {
            what: "answered out of turn",
            source: std::io::Error::other(format!("{other:?}")),
        },
    }
}

/// Starts the helper now. Call it before attaching any probe: its pipe then has a lower
/// descriptor than every perf event, and it learns of our death first.
pub fn start() -> Result<(), PtraceError> {
    ensure(&mut lock()).map(drop)
}

/// Ends the helper (at the end of a session).
pub fn shutdown() {
    if let Some(h) = lock().take() {
        h.end();
    }
}

/// Kills the snapshot child `child` of `pid`, collects it, and reaps the zombie it leaves under
/// the target (a second short stop). Returns that stop's pause.
pub fn reap(pid: i32, child: i32, max_pause: Duration) -> Result<Duration, PtraceError> {
    match ask(&mut lock(), &Request::Reap { pid, child, max_pause })? {
        Reply::Pause(p) => Ok(p),
        other => Err(unexpected(other)),
    }
}

/// Tests only: `LEAKPROBE_TEST_STOP_HOLD_MS` holds every world stopped that long (at most half
/// its pause bound), so that a test's SIGKILL can land inside a stop.
fn test_hold() -> Duration {
    static HOLD: OnceLock<Duration> = OnceLock::new();
    *HOLD.get_or_init(|| {
        std::env::var("LEAKPROBE_TEST_STOP_HOLD_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::ZERO, Duration::from_millis)
    })
}

/// Every thread of one process, stopped by the helper. Dropping it resumes them. While it
/// lives, it holds the helper: nothing else of ours stops a process meanwhile.
pub struct World {
    helper: MutexGuard<'static, Option<Helper>>,
    pid: i32,
    threads: Vec<ThreadView>,
    stopped_at_ns: u64,
    /// Just before the stop was asked for: our clock is never behind the helper's.
    started: Instant,
    max_pause: Duration,
    mem: OnceLock<Mem>,
    pause: Option<Duration>,
}

impl World {
    /// Stops every thread of `pid` (see [`StoppedWorld::stop`]), with each one's XSAVE area
    /// if `xstate`.
    pub fn stop(pid: i32, options: &StopOptions, xstate: bool) -> Result<World, PtraceError> {
        let mut helper = lock();
        let started = Instant::now();
        let req = Request::Stop {
            pid,
            options: options.ptrace_options.bits(),
            max_pause: options.max_pause,
            allow_seccomp_filter: options.checks.allow_seccomp_filter,
            xstate,
        };
        match ask(&mut helper, &req)? {
            Reply::Stopped { threads, stopped_at_ns } => {
                std::thread::sleep(test_hold().min(options.max_pause / 2));
                Ok(World {
                    helper,
                    pid,
                    threads,
                    stopped_at_ns,
                    started,
                    max_pause: options.max_pause,
                    mem: OnceLock::new(),
                    pause: None,
                })
            }
            other => Err(unexpected(other)),
        }
    }

    fn ask(&mut self, req: &Request) -> Result<Reply, PtraceError> {
        ask(&mut self.helper, req)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn threads(&self) -> &[ThreadView] {
        &self.threads
    }

    /// CLOCK_MONOTONIC while every thread was stopped.
    pub fn stopped_at_ns(&self) -> u64 {
        self.stopped_at_ns
    }

    /// `/proc/PID/mem`, opened on first use (read and written by us, not the helper).
    pub fn mem(&self) -> Result<&Mem, PtraceError> {
        if let Some(m) = self.mem.get() {
            return Ok(m);
        }
        let m = Mem::open(self.pid)?;
        Ok(self.mem.get_or_init(|| m))
    }

    /// How long the target has been stopped so far (never less than the helper's figure).
    pub fn stopped_for(&self) -> Duration {
        self.started.elapsed()
    }

    /// Fails, and resumes the target at once, when the pause bound is reached.
    pub fn check_pause(&mut self, during: &'static str) -> Result<(), PtraceError> {
        let elapsed = self.stopped_for();
        if self.pause.is_none() && elapsed < self.max_pause {
            return Ok(());
        }
        self.resume_now();
        Err(PtraceError::PauseExceeded { max: self.max_pause, elapsed, during })
    }

    /// System calls run in one stopped thread (see [`RemoteSyscalls::new`]); its registers are
    /// restored when the returned value is finished or dropped.
    pub fn remote(&mut self) -> Result<Remote<'_>, PtraceError> {
        match self.ask(&Request::BeginRemote)? {
            Reply::Done => Ok(Remote { world: self, finished: false }),
            other => Err(unexpected(other)),
        }
    }

    /// Resumes every thread now; returns the whole pause.
    pub fn resume(mut self) -> Duration {
        self.resume_now()
    }

    fn resume_now(&mut self) -> Duration {
        if let Some(p) = self.pause {
            return p;
        }
        let p = match self.ask(&Request::Resume) {
            Ok(Reply::Pause(p)) => p,
            // The helper is gone: its death let go of every thread.
            _ => self.started.elapsed(),
        };
        self.pause = Some(p);
        p
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.resume_now();
    }
}

/// System calls run by the helper in one stopped thread of a [`World`].
pub struct Remote<'w> {
    world: &'w mut World,
    finished: bool,
}

impl Remote<'_> {
    fn value(&mut self, call: Call) -> Result<u64, PtraceError> {
        match self.world.ask(&Request::Call(call))? {
            Reply::Value(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Runs system call `nr`; a negative result is an error.
    pub fn syscall(&mut self, name: &str, nr: i64, args: [u64; 6]) -> Result<u64, PtraceError> {
        self.value(Call::Syscall { name: name.to_string(), nr, args })
    }

    /// `clone(flags, 0, 0, 0, 0)` from our code page (its child path is `exit_group`). With
    /// `PTRACE_O_TRACECLONE` the child is the helper's from its first instruction, and the
    /// helper kills and reaps it if leakprobe dies before [`reap`]. Returns the child's PID.
    pub fn clone(&mut self, flags: u64) -> Result<i32, PtraceError> {
        self.value(Call::Clone { flags }).map(|v| v as i32)
    }

    pub fn memfd_create(&mut self, name: &str, flags: u32) -> Result<i32, PtraceError> {
        self.value(Call::MemfdCreate { name: name.to_string(), flags }).map(|v| v as i32)
    }

    pub fn close(&mut self, fd: i32) -> Result<(), PtraceError> {
        self.syscall("close", libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]).map(drop)
    }

    pub fn mmap(
        &mut self,
        addr: u64,
        len: u64,
        prot: i32,
        flags: i32,
        fd: i32,
        off: u64,
    ) -> Result<u64, PtraceError> {
        self.syscall("mmap", libc::SYS_mmap, super::remote::mmap_args(addr, len, prot, flags, fd, off))
    }

    pub fn munmap(&mut self, addr: u64, len: u64) -> Result<(), PtraceError> {
        self.syscall("munmap", libc::SYS_munmap, [addr, len, 0, 0, 0, 0]).map(drop)
    }

    /// Restores the thread's registers and unmaps our code page, reporting failures.
    pub fn finish(mut self) -> Result<(), PtraceError> {
        self.finished = true;
        match self.world.ask(&Request::FinishRemote)? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

impl Drop for Remote<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.world.ask(&Request::FinishRemote);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The helper's side

/// What came in on the pipe.
enum Next {
    Request(Request),
    /// The world's pause bound passed with no request.
    Timeout,
    /// leakprobe is gone (or sent garbage): end everything.
    End,
}

/// How a phase ended.
enum Flow {
    Continue,
    End,
}

/// How a remote phase ended.
enum RemoteEnd {
    Finished,
    /// Resume the world now (the pause bound passed, or a resume came with calls open).
    Resume {
        reply: bool,
    },
    End,
}

struct Server {
    input: std::io::Stdin,
    output: std::io::Stdout,
    /// Snapshot children made and not yet reaped: (target, child).
    children: Vec<(i32, i32)>,
    /// The pause of the last world, for a late resume request.
    last_pause: Duration,
    names: HashSet<&'static str>,
}

impl Server {
    fn next(&mut self, deadline: Option<Instant>) -> Next {
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            let mut fd = libc::pollfd { fd: self.input.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut fd, 1, ms.max(if left.is_zero() { 0 } else { 1 })) };
            if n == 0 {
                return Next::Timeout;
            }
        }
        match read_msg(&mut self.input.lock()) {
            Ok(r) => Next::Request(r),
            Err(_) => Next::End,
        }
    }

    fn reply(&mut self, r: Reply) {
        // A leakprobe that is gone shows as the end of its requests; nothing to do here.
        let _ = write_msg(&mut self.output.lock(), &r);
    }

    fn failed(&mut self, e: &dyn std::error::Error) {
        self.reply(Reply::Failed(chain(e)));
    }

    /// System call names live as long as the helper (`PtraceError` holds `&'static str`).
    fn intern(&mut self, name: String) -> &'static str {
        if let Some(n) = self.names.get(name.as_str()) {
            return n;
        }
        let n: &'static str = Box::leak(name.into_boxed_str());
        self.names.insert(n);
        n
    }

    fn serve(&mut self) {
        loop {
            let req = match self.next(None) {
                Next::Request(r) => r,
                Next::Timeout => continue,
                Next::End => break,
            };
            if let Flow::End = self.idle(req) {
                break;
            }
        }
        self.clean_up();
    }

    /// A request with no world stopped.
    fn idle(&mut self, req: Request) -> Flow {
        match req {
            Request::Stop { pid, options, max_pause, allow_seccomp_filter, xstate } => {
                let opts = StopOptions {
                    ptrace_options: Options::from_bits_truncate(options),
                    max_pause,
                    checks: CheckOptions { allow_seccomp_filter },
                };
                match StoppedWorld::stop(pid, opts) {
                    Ok(world) => {
                        let stopped_at_ns = crate::kernel::probe::monotonic_ns();
                        let threads = world.threads().iter().map(|t| ThreadView::of(t, xstate)).collect();
                        self.reply(Reply::Stopped { threads, stopped_at_ns });
                        return self.stopped(world);
                    }
                    Err(e) => self.failed(&e),
                }
            }
            Request::Reap { pid, child, max_pause } => {
                let r = reap_child(pid, child, max_pause);
                self.children.retain(|&(_, c)| c != child);
                match r {
                    Ok(p) => self.reply(Reply::Pause(p)),
                    Err(e) => self.failed(&e),
                }
            }
            // Requests for a world resumed already (its pause bound passed).
            Request::FinishRemote => self.reply(Reply::Done),
            Request::Resume => self.reply(Reply::Pause(self.last_pause)),
            Request::BeginRemote | Request::Call(_) => self.reply(Reply::Failed(format!(
                "the target was resumed: it had been stopped for {:?}, its limit",
                self.last_pause
            ))),
        }
        Flow::Continue
    }

    /// Serves one stopped world until it is resumed.
    fn stopped(&mut self, mut world: StoppedWorld) -> Flow {
        loop {
            let deadline = world.started() + world.max_pause();
            let req = match self.next(Some(deadline)) {
                Next::Request(r) => r,
                Next::Timeout => {
                    self.last_pause = world.resume();
                    return Flow::Continue;
                }
                Next::End => return Flow::End,
            };
            match req {
                Request::Resume => {
                    self.last_pause = world.resume();
                    self.reply(Reply::Pause(self.last_pause));
                    return Flow::Continue;
                }
                Request::BeginRemote => {
                    let rs = match RemoteSyscalls::new(&mut world) {
                        Ok(rs) => rs,
                        Err(e) => {
                            self.failed(&e);
                            continue;
                        }
                    };
                    self.reply(Reply::Done);
                    match self.remote(rs) {
                        RemoteEnd::Finished => {}
                        RemoteEnd::Resume { reply } => {
                            self.last_pause = world.resume();
                            if reply {
                                self.reply(Reply::Pause(self.last_pause));
                            }
                            return Flow::Continue;
                        }
                        RemoteEnd::End => return Flow::End,
                    }
                }
                Request::FinishRemote => self.reply(Reply::Done),
                Request::Call(_) => self.reply(Reply::Failed("no remote calls are open".into())),
                Request::Stop { .. } | Request::Reap { .. } => {
                    self.reply(Reply::Failed("another process is stopped; resume it first".into()))
                }
            }
        }
    }

    /// Serves remote calls in one thread until they are finished.
    fn remote(&mut self, mut rs: RemoteSyscalls<'_>) -> RemoteEnd {
        loop {
            let deadline = rs.world().started() + rs.world().max_pause();
            let req = match self.next(Some(deadline)) {
                Next::Request(r) => r,
                Next::Timeout => return RemoteEnd::Resume { reply: false },
                Next::End => return RemoteEnd::End,
            };
            match req {
                Request::Call(call) => {
                    let r = self.call(&mut rs, call);
                    match r {
                        Ok(v) => self.reply(Reply::Value(v)),
                        Err(e) => self.failed(&e),
                    }
                }
                Request::FinishRemote => {
                    match rs.finish() {
                        Ok(()) => self.reply(Reply::Done),
                        Err(e) => self.failed(&e),
                    }
                    return RemoteEnd::Finished;
                }
                Request::Resume => return RemoteEnd::Resume { reply: true },
                Request::BeginRemote | Request::Stop { .. } | Request::Reap { .. } => {
                    self.reply(Reply::Failed("remote calls are open; finish them first".into()))
                }
            }
        }
    }

    fn call(&mut self, rs: &mut RemoteSyscalls<'_>, call: Call) -> Result<u64, PtraceError> {
        match call {
            Call::Syscall { name, nr, args } => {
                let name = self.intern(name);
                rs.syscall(name, nr, args)
            }
            Call::Clone { flags } => {
                let child = rs.clone(flags, 0, 0, 0, 0)?;
                self.children.push((rs.world().pid(), child));
                Ok(child as u64)
            }
            Call::MemfdCreate { name, flags } => rs.memfd_create(&name, flags).map(|fd| fd as u64),
        }
    }

    /// leakprobe is gone: reap the snapshot children it left.
    fn clean_up(&mut self) {
        for (pid, child) in std::mem::take(&mut self.children) {
            match reap_child(pid, child, Duration::from_millis(200)) {
                Ok(_) => crate::say!(
                    "leakprobe helper: leakprobe ended mid-scan; its snapshot child {child} under PID {pid} is reaped"
                ),
                Err(e) => crate::say!(
                    "leakprobe helper: leakprobe ended mid-scan; reaping its snapshot child {child} under PID {pid}: {}",
                    chain(&e)
                ),
            }
        }
    }
}

/// Kills `child` (ours by ptrace), collects it as its tracer, then reaps the zombie it leaves
/// under `pid` by injecting `wait4(child, __WALL|WNOHANG)`. Returns the target's pause.
fn reap_child(pid: i32, child: i32, max_pause: Duration) -> Result<Duration, PtraceError> {
    // SAFETY: plain system calls on a process we created.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        let mut status = 0;
        // As its tracer we see its death first; the zombie then belongs to the target.
        libc::waitpid(child, &mut status, libc::__WALL);
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut paused = Duration::ZERO;
    loop {
        let opts = StopOptions {
            max_pause,
            checks: CheckOptions { allow_seccomp_filter: true },
            ..StopOptions::default()
        };
        let mut world = StoppedWorld::stop(pid, opts)?;
        let got = {
            let mut rs = RemoteSyscalls::new(&mut world)?;
            let r = rs.wait4(child, libc::__WALL | libc::WNOHANG);
            rs.finish()?;
            r
        };
        paused += world.resume();
        match got {
            Ok(c) if c == child => return Ok(paused),
            // Not a zombie yet (the kill is still being delivered): try again shortly.
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(_) => return Ok(paused),
            Err(e) => return Err(e),
        }
    }
}

/// The helper process's main: serve requests until the pipe ends.
pub fn run() -> std::process::ExitCode {
    // Not our terminal's Ctrl-C: only the pipe ends the helper, after it has resumed the
    // target.
    // SAFETY: ignoring a signal installs no handler code.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let mut server = Server {
        input: std::io::stdin(),
        output: std::io::stdout(),
        children: Vec::new(),
        last_pause: Duration::ZERO,
        names: HashSet::new(),
    };
    server.serve();
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_in_frames() {
        let mut buf = Vec::new();
        write_msg(
            &mut buf,
            &Request::Call(Call::Syscall { name: "wait4".into(), nr: 61, args: [1, 2, 3, 4, 5, 6] }),
        )
        .unwrap();
        write_msg(&mut buf, &Request::Resume).unwrap();
        let mut r = buf.as_slice();
        match read_msg::<Request>(&mut r).unwrap() {
            Request::Call(Call::Syscall { name, nr, args }) => {
                assert_eq!((name.as_str(), nr, args), ("wait4", 61, [1, 2, 3, 4, 5, 6]))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(read_msg::<Request>(&mut r).unwrap(), Request::Resume));
        // A frame cut short is an error, never a half message.
        let cut = &buf[..buf.len() - 1];
        let mut r = cut;
        read_msg::<Request>(&mut r).unwrap();
        assert!(read_msg::<Request>(&mut r).is_err());
        // A length over the limit is refused before anything is allocated.
        let huge = (u32::MAX).to_le_bytes();
        assert!(read_msg::<Request>(&mut huge.as_slice()).is_err());
    }

    #[test]
    fn thread_views_keep_every_register() {
        // SAFETY: plain integers.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.rip = 0x1234;
        r.rsp = 0x7fff_0000;
        r.orig_rax = u64::MAX;
        r.fs_base = 0x7f00_0000_1000;
        // SAFETY: as in ThreadView::of.
        let words = unsafe { std::slice::from_raw_parts(&r as *const Regs as *const u64, REGS_WORDS) };
        let view = ThreadView {
            tid: 7,
            stop: StopKind::Interrupt,
            regs: words.to_vec(),
            xstate: vec![],
            stopped_after: Duration::ZERO,
        };
        let mut buf = Vec::new();
        write_msg(&mut buf, &view).unwrap();
        let back: ThreadView = read_msg(&mut buf.as_slice()).unwrap();
        let b = back.regs();
        assert_eq!((b.rip, b.rsp, b.orig_rax, b.fs_base), (0x1234, 0x7fff_0000, u64::MAX, 0x7f00_0000_1000));
        assert_eq!(back.stop, StopKind::Interrupt);
    }
}
