//! [`RemoteSyscalls`]: system calls run inside one stopped thread, its registers restored on
//! drop (rr's `AutoRemoteSyscalls`).

use std::time::{Duration, Instant};

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use nix::{errno::Errno, sys::ptrace::Options};

use super::{
    Mem, PtraceError, StopKind, StoppedWorld,
    stub::{self, ENTRY_CLONE, ENTRY_SYSCALL, PAGE_SIZE, SCRATCH, SCRATCH_LEN},
    sys::{self, Regs, Status},
};
use crate::target;

/// Finds `0f 05` in `code` (mapped at `base`) that decodes as `syscall`.
pub fn find_syscall_in(code: &[u8], base: u64) -> Option<u64> {
    code.windows(2).enumerate().filter(|(_, w)| w == &[0x0f, 0x05]).find_map(|(i, _)| {
        let addr = base + i as u64;
        let mut d = Decoder::with_ip(64, &code[i..], addr, DecoderOptions::NONE);
        (d.decode().mnemonic() == Mnemonic::Syscall).then_some(addr)
    })
}

/// The address of a `syscall` instruction in the target: libc's first, else any executable
/// file mapping's. Only its two bytes matter: the thread never runs past it on our watch.
pub fn find_syscall_insn(pid: i32, mem: &Mem) -> Result<u64, PtraceError> {
    let maps = target::exec_mappings(pid).map_err(|_| PtraceError::NoSyscallInsn { pid })?;
    let (libc, rest): (Vec<_>, Vec<_>) = maps.into_iter().partition(|m| target::is_libc(&m.file_name()));
    let mut buf = vec![0u8; 64 * 1024];
    for m in libc.iter().chain(&rest) {
        let mut at = m.start;
        while at < m.end {
            let want = ((m.end - at) as usize).min(buf.len());
            let Ok(n) = mem.read_at(at, &mut buf[..want]) else { break };
            if n < 2 {
                break;
            }
            if let Some(addr) = find_syscall_in(&buf[..n], at) {
                return Ok(addr);
            }
            at += n as u64 - 1; // an instruction may straddle chunks
        }
    }
    Err(PtraceError::NoSyscallInsn { pid })
}

const SYS_CLONE: i64 = libc::SYS_clone;
/// A syscall stop's signal with PTRACE_O_TRACESYSGOOD.
const SYSCALL_STOP: i32 = libc::SIGTRAP | 0x80;

/// System calls run in one stopped thread. Every register is restored on drop, on every path.
///
/// With the code page ([`RemoteSyscalls::new`]), a leakprobe killed mid-sequence leaves the
/// thread to restore itself (see [`stub`]); [`RemoteSyscalls::plain`] borrows libc's `syscall`
/// for every call and has no such net.
pub struct RemoteSyscalls<'w> {
    world: &'w mut StoppedWorld,
    tid: i32,
    saved: Regs,
    libc_syscall: u64,
    page: Option<u64>,
    restored: bool,
    /// The thread is still inside a call we gave up on: leave it to the page.
    lost: bool,
    last_child: Option<i32>,
    calls: u64,
    busy: Duration,
}

impl<'w> RemoteSyscalls<'w> {
    /// Picks a thread (an interrupted one by preference) and maps our code page into the target.
    pub fn new(world: &'w mut StoppedWorld) -> Result<RemoteSyscalls<'w>, PtraceError> {
        let tid = pick_thread(world)?;
        Self::on_thread(world, tid)
    }

    /// Like [`RemoteSyscalls::new`] on a given thread.
    pub fn on_thread(world: &'w mut StoppedWorld, tid: i32) -> Result<RemoteSyscalls<'w>, PtraceError> {
        let mut rs = Self::plain(world, tid)?;
        rs.map_page()?;
        Ok(rs)
    }

    /// Without a code page: every call runs from libc's `syscall`. A leakprobe killed between
    /// two calls leaves this thread with our registers.
    pub fn plain(world: &'w mut StoppedWorld, tid: i32) -> Result<RemoteSyscalls<'w>, PtraceError> {
        world.check_pause("starting remote system calls")?;
        let thread = world.thread(tid).ok_or(PtraceError::NoSuchThread { tid })?;
        if !thread.stop().injectable() {
            return Err(PtraceError::NoUsableThread { pid: world.pid() });
        }
        let saved = thread.read_regs()?;
        let libc_syscall = world.syscall_insn()?;
        // TRACESYSGOOD matters beyond telling stops apart: a thread left in a syscall stop by a
        // dying tracer gets its stop code sent as a signal, and SIGTRAP|0x80 is no signal.
        sys::setoptions(tid, world.ptrace_options() | Options::PTRACE_O_TRACESYSGOOD)?;
        world.remote_active = true;
        Ok(RemoteSyscalls {
            world,
            tid,
            saved,
            libc_syscall,
            page: None,
            restored: false,
            lost: false,
            last_child: None,
            calls: 0,
            busy: Duration::ZERO,
        })
    }

    fn map_page(&mut self) -> Result<(), PtraceError> {
        let args = [
            0,
            PAGE_SIZE as u64,
            (libc::PROT_READ | libc::PROT_EXEC) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ];
        // The exposed window: from loading the registers until they are back.
        self.world.window(true);
        let r = self.run(self.libc_syscall, libc::SYS_mmap, args, self.world.pause_deadline());
        let back = self.settle();
        self.world.window(false);
        let page = self.check("mmap", r)?;
        back?;
        self.page = Some(page);
        let mut bytes = stub::page_code();
        let ctx = stub::context_bytes(&stub::resume_context(&self.saved));
        bytes[stub::CONTEXT..stub::CONTEXT + ctx.len()].copy_from_slice(&ctx);
        self.world.mem()?.write_all_at(page, &bytes)
    }

    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// The registers saved at the start (and restored at the end).
    pub fn saved_regs(&self) -> &Regs {
        &self.saved
    }

    /// Our code page's address, if mapped.
    pub fn page(&self) -> Option<u64> {
        self.page
    }

    pub fn world(&self) -> &StoppedWorld {
        self.world
    }

    /// Calls made so far, and the time they took (setregs, step, wait, getregs).
    pub fn stats(&self) -> (u64, Duration) {
        (self.calls, self.busy)
    }

    /// The child of the last traced clone (`PTRACE_EVENT_CLONE`), if any.
    pub fn last_child(&self) -> Option<i32> {
        self.last_child
    }

    /// Scratch memory for arguments: in our page, else below the thread's red zone.
    fn scratch(&self) -> u64 {
        match self.page {
            Some(p) => p + SCRATCH as u64,
            None => (self.saved.rsp - 128 - SCRATCH_LEN as u64) & !15,
        }
    }

    /// Runs system call `nr` and returns its raw result (a negative errno on failure).
    pub fn syscall_raw(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, PtraceError> {
        self.check_pause()?;
        let entry = self.page.map_or(self.libc_syscall, |p| p + ENTRY_SYSCALL as u64);
        self.run(entry, nr, args, self.world.pause_deadline())
    }

    /// Runs system call `nr`; a negative result becomes [`PtraceError::Syscall`].
    pub fn syscall(&mut self, name: &'static str, nr: i64, args: [u64; 6]) -> Result<u64, PtraceError> {
        let r = self.syscall_raw(nr, args)?;
        self.check(name, Ok(r))
    }

    fn check(&self, name: &'static str, r: Result<i64, PtraceError>) -> Result<u64, PtraceError> {
        let r = r?;
        if (-4095..0).contains(&r) {
            return Err(PtraceError::Syscall {
                pid: self.world.pid(),
                name,
                source: Errno::from_raw(-r as i32),
            });
        }
        Ok(r as u64)
    }

    fn check_pause(&mut self) -> Result<(), PtraceError> {
        if self.restored {
            return Err(PtraceError::NoSuchThread { tid: self.tid });
        }
        let deadline = self.world.pause_deadline();
        if Instant::now() >= deadline || self.world.is_resumed() {
            let err = PtraceError::PauseExceeded {
                max: self.world.max_pause(),
                elapsed: self.world.stopped_for(),
                during: "running remote system calls",
            };
            self.restore();
            self.world.resume_all();
            return Err(err);
        }
        Ok(())
    }

    /// Loads the call at `entry`, runs it to its syscall-exit stop and returns rax. The thread
    /// rests in syscall stops (never in a signal-delivery stop, whose signal a dying tracer
    /// would deliver). Signals that arrive meanwhile are held for re-injection.
    fn run(&mut self, entry: u64, nr: i64, args: [u64; 6], deadline: Instant) -> Result<i64, PtraceError> {
        let t0 = Instant::now();
        let tid = self.tid;
        let mut r = self.saved;
        r.rip = entry;
        r.orig_rax = u64::MAX; // no restart logic on the way out of the current stop
        r.rax = nr as u64;
        [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9] = args;
        sys::setregs(tid, &r)?;
        let deadline = deadline.max(Instant::now() + Duration::from_millis(5));
        let mut entered = false;
        loop {
            sys::resume_to_syscall(tid)?;
            if let Some(t) = self.world.thread_mut(tid) {
                t.stop = StopKind::Syscall;
            }
            let status = match sys::wait_until(tid, deadline) {
                Ok(Some(s)) => s,
                Ok(None) => return Err(self.stuck()),
                Err(source) => return Err(PtraceError::Wait { tid, source }),
            };
            match status {
                Status::Gone => return Err(self.gone()),
                Status::Stopped { sig: SYSCALL_STOP, event: 0 } if !entered => entered = true,
                Status::Stopped { sig: SYSCALL_STOP, event: 0 } => {
                    let now = sys::getregs(tid)?;
                    self.calls += 1;
                    self.busy += t0.elapsed();
                    return Ok(now.rax as i64);
                }
                // Pending before the call: handed back at resume.
                Status::Stopped { event: 0, .. } => self.hold_signal()?,
                Status::Stopped {
                    event: libc::PTRACE_EVENT_CLONE | libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK,
                    ..
                } => {
                    self.last_child = Some(sys::geteventmsg(tid)? as i32);
                }
                // Our interrupt still pending from the stop, or a group stop: go on.
                Status::Stopped { event: libc::PTRACE_EVENT_STOP, .. } => {}
                Status::Stopped { sig, event } => {
                    return Err(PtraceError::UnexpectedStop {
                        tid,
                        status: format!("signal {sig}, event {event}"),
                        during: "a remote system call",
                    });
                }
            }
        }
    }

    /// Puts the saved registers back and parks the thread in an interrupt stop inside signal
    /// handling, where the kernel's restart logic sees them on resume (a sleep we interrupted
    /// restarts). The interrupt goes first: if we die before the registers are back, the
    /// thread is on its way through the page's restore, and after, through signal handling.
    fn settle(&mut self) -> Result<(), PtraceError> {
        let tid = self.tid;
        let _ = sys::interrupt(tid);
        sys::setregs(tid, &self.saved)?;
        let deadline = Instant::now() + Duration::from_millis(100);
        loop {
            sys::resume_to_syscall(tid)?;
            match sys::wait_until(tid, deadline) {
                Ok(Some(Status::Stopped { sig, event: libc::PTRACE_EVENT_STOP })) => {
                    if let Some(t) = self.world.thread_mut(tid) {
                        t.stop =
                            if sig == libc::SIGTRAP { StopKind::Interrupt } else { StopKind::GroupStop(sig) };
                    }
                    return Ok(());
                }
                Ok(Some(Status::Stopped { sig, event: 0 })) if sig != SYSCALL_STOP => self.hold_signal()?,
                Ok(Some(Status::Stopped { event: 0, .. })) => {
                    return Err(PtraceError::UnexpectedStop {
                        tid,
                        status: "a syscall stop".into(),
                        during: "restoring registers",
                    });
                }
                Ok(Some(Status::Stopped { .. })) => {}
                Ok(Some(Status::Gone)) => return Err(self.gone()),
                Ok(None) => {
                    return Err(PtraceError::UnexpectedStop {
                        tid,
                        status: "no stop".into(),
                        during: "restoring registers",
                    });
                }
                Err(source) => return Err(PtraceError::Wait { tid, source }),
            }
        }
    }

    fn gone(&mut self) -> PtraceError {
        self.restored = true;
        self.world.remote_active = false;
        self.world.forget(self.tid);
        PtraceError::NoSuchThread { tid: self.tid }
    }

    fn hold_signal(&mut self) -> Result<(), PtraceError> {
        let info = sys::getsiginfo(self.tid)?;
        if let Some(t) = self.world.thread_mut(self.tid) {
            t.held.push(info);
        }
        Ok(())
    }

    /// The call did not come back within the pause (a blocking call): interrupt it (it
    /// returns -ERESTART* or -EINTR to its exit stop) and settle. If it does not come back
    /// even then, leave it to the page: it restores itself whenever the call ends.
    fn stuck(&mut self) -> PtraceError {
        let tid = self.tid;
        let err = PtraceError::PauseExceeded {
            max: self.world.max_pause(),
            elapsed: self.world.stopped_for(),
            during: "waiting for a remote system call",
        };
        let _ = sys::interrupt(tid);
        match sys::wait_until(tid, Instant::now() + Duration::from_millis(100)) {
            Ok(Some(Status::Stopped { .. })) => {
                if self.settle().is_err() {
                    self.lost = true;
                }
            }
            Ok(Some(Status::Gone)) => {
                self.gone();
            }
            _ => self.lost = true,
        }
        err
    }

    // --- helpers -------------------------------------------------------------------------

    pub fn getpid(&mut self) -> Result<i32, PtraceError> {
        self.syscall("getpid", libc::SYS_getpid, [0; 6]).map(|v| v as i32)
    }

    pub fn mmap(
        &mut self,
        addr: u64,
        len: u64,
        prot: i32,
        flags: i32,
        fd: i32,
        offset: u64,
    ) -> Result<u64, PtraceError> {
        self.syscall("mmap", libc::SYS_mmap, mmap_args(addr, len, prot, flags, fd, offset))
    }

    pub fn munmap(&mut self, addr: u64, len: u64) -> Result<(), PtraceError> {
        self.syscall("munmap", libc::SYS_munmap, [addr, len, 0, 0, 0, 0]).map(drop)
    }

    pub fn mprotect(&mut self, addr: u64, len: u64, prot: i32) -> Result<(), PtraceError> {
        self.syscall("mprotect", libc::SYS_mprotect, [addr, len, prot as u64, 0, 0, 0]).map(drop)
    }

    /// `memfd_create(name, flags)`: the name is written into our scratch memory first.
    pub fn memfd_create(&mut self, name: &str, flags: u32) -> Result<i32, PtraceError> {
        let mut bytes = name.as_bytes().to_vec();
        bytes.truncate(SCRATCH_LEN.min(249) - 1); // the kernel caps names at 249 bytes
        bytes.push(0);
        let at = self.scratch();
        self.world.mem()?.write_all_at(at, &bytes)?;
        self.syscall("memfd_create", libc::SYS_memfd_create, [at, flags as u64, 0, 0, 0, 0]).map(|v| v as i32)
    }

    pub fn close(&mut self, fd: i32) -> Result<(), PtraceError> {
        self.syscall("close", libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]).map(drop)
    }

    /// Raw `clone(flags, stack, parent_tid, child_tid, tls)` from our page, whose child path
    /// is `exit_group(0)`: if it is ever let go it exits instead of running the target's code.
    /// With `PTRACE_O_TRACECLONE` set on the world the child is ours from its first
    /// instruction; [`RemoteSyscalls::last_child`] names it. Returns the child's PID.
    pub fn clone(
        &mut self,
        flags: u64,
        stack: u64,
        parent_tid: u64,
        child_tid: u64,
        tls: u64,
    ) -> Result<i32, PtraceError> {
        self.check_pause()?;
        let Some(page) = self.page else {
            return Err(PtraceError::NeedsCodePage { what: "clone" });
        };
        self.last_child = None;
        let deadline = self.world.pause_deadline();
        let r = self.run(
            page + ENTRY_CLONE as u64,
            SYS_CLONE,
            [flags, stack, parent_tid, child_tid, tls, 0],
            deadline,
        );
        self.check("clone", r).map(|v| v as i32)
    }

    /// `wait4(pid, NULL, options, NULL)`: with `__WALL|WNOHANG` it reaps a child whose exit
    /// signal is 0 without blocking.
    pub fn wait4(&mut self, pid: i32, options: i32) -> Result<i32, PtraceError> {
        self.syscall("wait4", libc::SYS_wait4, [pid as i64 as u64, 0, options as u64, 0, 0, 0])
            .map(|v| v as i32)
    }

    pub fn kill(&mut self, pid: i32, sig: i32) -> Result<(), PtraceError> {
        self.syscall("kill", libc::SYS_kill, [pid as i64 as u64, sig as u64, 0, 0, 0, 0]).map(drop)
    }

    pub fn tgkill(&mut self, tgid: i32, tid: i32, sig: i32) -> Result<(), PtraceError> {
        self.syscall("tgkill", libc::SYS_tgkill, [tgid as u64, tid as u64, sig as u64, 0, 0, 0]).map(drop)
    }

    /// Unmaps our page and restores the registers now, reporting failures.
    pub fn finish(mut self) -> Result<(), PtraceError> {
        self.restore_checked()
    }

    fn restore_checked(&mut self) -> Result<(), PtraceError> {
        if self.restored {
            return Ok(());
        }
        self.restored = true;
        if self.lost {
            // Still inside a call: the page brings it back; the page must stay.
            self.world.remote_active = false;
            return Ok(());
        }
        let mut unmapped = Ok(());
        let page = self.page.take();
        if let Some(page) = page {
            // Not bounded by the pause: one call, and the page must not stay behind.
            self.world.window(true);
            let deadline = Instant::now() + Duration::from_millis(100);
            let r = self.run(
                page + ENTRY_SYSCALL as u64,
                libc::SYS_munmap,
                [page, PAGE_SIZE as u64, 0, 0, 0, 0],
                deadline,
            );
            unmapped = self.check("munmap", r).map(drop);
        }
        let back = self.settle();
        if page.is_some() {
            self.world.window(false);
        }
        self.world.remote_active = false;
        back.and(unmapped)
    }

    fn restore(&mut self) {
        if let Err(e) = self.restore_checked() {
            tracing::warn!(tid = self.tid, "restoring after remote system calls: {e}");
        }
    }
}

impl Drop for RemoteSyscalls<'_> {
    fn drop(&mut self) {
        self.restore();
    }
}

/// `mmap(addr, len, prot, flags, fd, offset)` as system call arguments.
pub fn mmap_args(addr: u64, len: u64, prot: i32, flags: i32, fd: i32, offset: u64) -> [u64; 6] {
    [addr, len, prot as u64, flags as u64, fd as i64 as u64, offset]
}

/// An interrupted thread by preference: it holds no signal of its own.
fn pick_thread(world: &StoppedWorld) -> Result<i32, PtraceError> {
    let rank = |k: StopKind| match k {
        StopKind::Interrupt => 0,
        StopKind::GroupStop(_) => 1,
        _ => 3,
    };
    world
        .threads()
        .iter()
        .filter(|t| t.stop().injectable())
        .min_by_key(|t| rank(t.stop()))
        .map(|t| t.tid())
        .ok_or(PtraceError::NoUsableThread { pid: world.pid() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_real_syscall() {
        // mov eax, 39; syscall; ret — preceded by an imm32 holding 0f 05 at an odd offset.
        let code = [0xb8, 0x0f, 0x05, 0x00, 0x00, 0x0f, 0x05, 0xc3];
        // Any `0f 05` runs as `syscall` when rip points at it: the first one is fine.
        assert_eq!(find_syscall_in(&code, 0x1000), Some(0x1001));
        assert_eq!(find_syscall_in(&code[3..], 0x1003), Some(0x1005));
        assert_eq!(find_syscall_in(&[0x0f, 0x06, 0x05, 0x0f], 0), None);
        assert_eq!(find_syscall_in(&[], 0), None);
    }
}
