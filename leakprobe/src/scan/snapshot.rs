//! Capture: a consistent picture of a live process with one short stop.
//!
//! 1. Stop every thread ([`StoppedWorld`]); keep its general and vector registers.
//! 2. Read, from the stopped target, the regions a fork does not carry over as they are
//!    (`MADV_DONTFORK`: absent in the child; `MADV_WIPEONFORK`: zeroed in it).
//! 3. Inject `clone(CLONE_FILES|CLONE_FS)` with exit signal 0 into one thread, with
//!    `PTRACE_O_TRACECLONE`: the child is a copy-on-write snapshot that is ours before its
//!    first instruction (and whose code path, if ever let go, is `exit_group`).
//! 4. Resume the target. The pause ends here; the snapshot is read at leisure through
//!    `/proc/CHILD/mem` (which, unlike `process_vm_readv`, does not unshare the pages it reads).
//! 5. [`Snapshot::release`]: kill the child and reap it by injecting `wait4` into the target
//!    (a second, shorter stop), or it would stay a zombie under the target.
//!
//! Steps 1, 3 and 5 are run by the ptrace helper ([`server`]), which holds no probe: a
//! leakprobe killed at any point leaves the target stopped no longer than the step under way,
//! and the helper reaps the snapshot child itself.
//!
//! Where no clone can be made (a seccomp filter, a memory limit), the fallback copies every
//! readable writable mapping while the target is stopped, if that fits in the pause bound.

use std::time::Duration;

use nix::sys::ptrace::Options;
use thiserror::Error;

use crate::ptrace::{
    CheckOptions, Mem, PtraceError, StopOptions,
    server::{self, ThreadView},
};

#[derive(Debug, Error)]
pub enum SnapshotError {
    /// Stopping the target, or a system call injected into it, failed.
    #[error("scan of PID {pid}: {during}")]
    Ptrace {
        pid: i32,
        during: &'static str,
        #[source]
        source: PtraceError,
    },
    /// No clone could be made and a stopped read would pause the target too long.
    #[error(
        "scan of PID {pid}: no copy-on-write snapshot ({why}), and reading its {mib} MiB of writable \
         memory while it is stopped would take about {estimate_ms} ms, over --max-pause {max_ms} ms; \
         raise --max-pause, or scan when the process is smaller"
    )]
    TooBigToStop { pid: i32, why: String, mib: u64, estimate_ms: u64, max_ms: u64 },
    /// /proc/PID/maps could not be read.
    #[error("reading the mappings of PID {pid}")]
    Maps {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

fn perr(pid: i32, during: &'static str) -> impl FnOnce(PtraceError) -> SnapshotError {
    move |source| SnapshotError::Ptrace { pid, during, source }
}

/// A register that can hold a pointer: a general register, or one 8-byte lane of a vector one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Gp(&'static str),
    /// `bank` is "xmm", "ymm" (the upper 128 bits) or "zmm" (the upper 256 bits, and
    /// zmm16-31 whole); `lane` counts 8-byte lanes from the bottom of that part.
    Vector {
        bank: &'static str,
        index: u8,
        lane: u8,
    },
}

impl std::fmt::Display for Reg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reg::Gp(n) => f.write_str(n),
            Reg::Vector { bank, index, lane } => write!(f, "{bank}{index}[{lane}]"),
        }
    }
}

/// Where a thread was when it stopped: this decides which of its registers and how much of
/// its stack can hold live values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopPlace {
    /// At an arbitrary instruction: every register and the red zone may be live.
    Anywhere,
    /// Parked in a system call, inside a libc wrapper: the caller's scratch registers and the
    /// red zone hold nothing live (the call boundary), only callee-saved registers and the
    /// stack above the stack pointer do.
    Syscall,
    /// At (or a few instructions into) the entry of a function we stopped it at (`exit()` in
    /// `run --scan`): the same as a call boundary.
    FunctionEntry,
}

/// One thread as it was stopped.
#[derive(Clone, Debug)]
pub struct ThreadState {
    pub tid: i32,
    pub stop: StopPlace,
    pub rsp: u64,
    pub rip: u64,
    /// The thread pointer (`fs_base`): glibc's TCB, with static TLS just below it.
    pub fs_base: u64,
    /// Every register value that may be a pointer (zero lanes left out).
    pub values: Vec<(Reg, u64)>,
    /// Its static TLS and TCB, when known (read from its DTV).
    pub tls: Option<(u64, u64)>,
}

const GP: [&str; 16] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15",
];

fn thread_state(t: &ThreadView, entries: &[(u64, u64)]) -> ThreadState {
    let r = t.regs();
    let stop = if entries.iter().any(|(lo, hi)| *lo <= r.rip && r.rip < *hi) {
        StopPlace::FunctionEntry
    } else if r.orig_rax as i64 >= 0 {
        StopPlace::Syscall
    } else {
        StopPlace::Anywhere
    };
    let gp = [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13,
        r.r14, r.r15,
    ];
    let mut values: Vec<(Reg, u64)> =
        GP.iter().zip(gp).filter(|(_, v)| *v != 0).map(|(n, v)| (Reg::Gp(n), v)).collect();
    // A thread in a system call has its first argument's original value only here.
    if r.orig_rax as i64 >= 0 && r.rdi != 0 {
        values.push((Reg::Gp("orig_rdi"), r.rdi));
    }
    values.extend(vector_lanes(&t.xstate));
    ThreadState { tid: t.tid, stop, rsp: r.rsp, rip: r.rip, fs_base: r.fs_base, values, tls: None }
}

/// The non-zero 8-byte lanes of the vector registers in an XSAVE area, in the standard
/// (non-compacted) layout that `PTRACE_GETREGSET(NT_X86_XSTATE)` returns: xmm0-15 at 160 in
/// the legacy area; the components present per `XSTATE_BV` (offset 512): AVX upper halves
/// (bit 2) at 576, AVX-512 upper halves of zmm0-15 (bit 6) at 1152 and zmm16-31 (bit 7) at
/// 1664.
pub fn vector_lanes(x: &[u8]) -> Vec<(Reg, u64)> {
    let word = |off: usize| x.get(off..off + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    let bv = word(512).unwrap_or(0);
    let mut out = Vec::new();
    let mut bank = |name: &'static str, at: usize, regs: u8, bytes: usize| {
        for i in 0..regs {
            for lane in 0..(bytes / 8) as u8 {
                if let Some(v) = word(at + i as usize * bytes + lane as usize * 8).filter(|v| *v != 0) {
                    let index = if name == "zmm" && bytes == 64 { i + 16 } else { i };
                    out.push((Reg::Vector { bank: name, index, lane }, v));
                }
            }
        }
    };
    bank("xmm", 160, 16, 16);
    if bv & (1 << 2) != 0 {
        bank("ymm", 576, 16, 16);
    }
    if bv & (1 << 6) != 0 {
        bank("zmm", 1152, 16, 32);
    }
    if bv & (1 << 7) != 0 {
        bank("zmm", 1664, 16, 64);
    }
    out
}

/// One line of /proc/PID/maps, with the smaps flags the scan needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    pub shared: bool,
    /// The file offset the mapping starts at.
    pub offset: u64,
    /// The path, `[heap]`, `[stack]`, an anonymous name, or empty.
    pub name: String,
    /// `MADV_DONTFORK` ("dc"): not in a forked child.
    pub dontfork: bool,
    /// `MADV_WIPEONFORK` ("wf"): zeros in a forked child.
    pub wipeonfork: bool,
    /// An I/O or PFN mapping ("io", "pf"): reading it may have side effects or fail.
    pub device: bool,
}

/// Parses /proc/PID/smaps (mappings with their VmFlags).
pub fn parse_smaps(text: &str) -> Vec<Region> {
    let mut out: Vec<Region> = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(r) = out.last_mut() {
                for f in flags.split_whitespace() {
                    match f {
                        "dc" => r.dontfork = true,
                        "wf" => r.wipeonfork = true,
                        "io" | "pf" => r.device = true,
                        _ => {}
                    }
                }
            }
            continue;
        }
        let mut it = line.split_whitespace();
        let (Some(range), Some(perms)) = (it.next(), it.next()) else { continue };
        let Some((lo, hi)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else {
            continue;
        };
        // A header line has five fields before the name; smaps' "Key: value" lines do not
        // parse as an address range.
        let offset = it.next().and_then(|o| u64::from_str_radix(o, 16).ok()).unwrap_or(0);
        let (_dev, _ino) = (it.next(), it.next());
        let name = it.collect::<Vec<_>>().join(" ");
        let p = perms.as_bytes();
        if p.len() < 4 {
            continue;
        }
        out.push(Region {
            start,
            end,
            readable: p[0] == b'r',
            writable: p[1] == b'w',
            executable: p[2] == b'x',
            shared: p[3] == b's',
            offset,
            name,
            dontfork: false,
            wipeonfork: false,
            device: false,
        });
    }
    out
}

/// Reads and parses /proc/PID/smaps.
pub fn regions(pid: i32) -> Result<Vec<Region>, SnapshotError> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map(|t| parse_smaps(&t))
        .map_err(|source| SnapshotError::Maps { pid, source })
}

impl Region {
    /// Memory the scan reads: readable, not a device, not the kernel's `[vvar]`/`[vsyscall]`.
    pub fn scannable(&self) -> bool {
        self.readable
            && !self.device
            && !matches!(self.name.as_str(), "[vvar]" | "[vvar_vclock]" | "[vsyscall]" | "[vdso]")
            && !self.name.starts_with("/dev/")
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// How the picture was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// A copy-on-write child of the target.
    Clone,
    /// The target's writable memory, copied while it was stopped.
    StoppedCopy,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Clone => "clone",
            Method::StoppedCopy => "stopped-copy",
        }
    }
}

/// Options for [`capture`].
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    pub max_pause: Duration,
    /// Never inject a clone (used when the caller knows it would be denied, and by tests).
    pub no_clone: bool,
    /// Bytes read per second from a stopped target, for judging a stopped copy in advance.
    pub copy_rate: u64,
    /// Code ranges at the entry of functions the target stops itself at (exit() in `run
    /// --scan`): a thread stopped there is at a call boundary ([`StopPlace::FunctionEntry`]).
    pub function_entries: Vec<(u64, u64)>,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            max_pause: Duration::from_millis(200),
            no_clone: false,
            copy_rate: 1 << 30,
            function_entries: Vec::new(),
        }
    }
}

/// The picture: registers, the mappings, and a way to read the memory as it was.
pub struct Snapshot {
    pub pid: i32,
    pub method: Method,
    /// Why there is no clone (the fallback's reason), if there is none.
    pub no_clone_why: Option<String>,
    pub threads: Vec<ThreadState>,
    pub regions: Vec<Region>,
    /// The target's pause: from the first interrupt until every thread ran again.
    pub pause: Duration,
    /// CLOCK_MONOTONIC (the kernel side's clock) while every thread was stopped: the picture
    /// holds exactly the allocations and frees made before it.
    pub stopped_at_ns: u64,
    /// Regions read from the stopped target (the fork lacks or zeroes them, or the fallback).
    copies: Vec<(u64, Vec<u8>)>,
    /// Regions neither the child holds nor we copied (over the budget): unknown roots.
    pub unread: Vec<(u64, u64)>,
    child: Option<Child>,
}

struct Child {
    pid: i32,
    mem: Mem,
}

/// The most we copy from the stopped target for regions a fork lacks.
const COPY_BUDGET: u64 = 64 << 20;

/// Stops `pid`, takes its registers, and forks a snapshot of it (or copies its memory), then
/// resumes it. The stop and the clone are the ptrace helper's ([`server`]): if leakprobe dies,
/// it resumes the target at once and kills and reaps the snapshot child.
pub fn capture(pid: i32, opts: &CaptureOptions) -> Result<Snapshot, SnapshotError> {
    // Read before the stop: smaps is slow on big processes and its flags rarely change.
    let regions = regions(pid)?;
    let status = crate::ptrace::check_target(pid, CheckOptions { allow_seccomp_filter: true })
        .map_err(perr(pid, "checking the target"))?;
    let filtered = status.seccomp == Some(2);
    let mut no_clone_why = if opts.no_clone {
        Some("disabled".to_string())
    } else if filtered {
        Some("the target runs under a seccomp filter, which may deny or punish an injected clone".into())
    } else {
        None
    };
    let options = StopOptions {
        ptrace_options: Options::PTRACE_O_TRACECLONE,
        max_pause: opts.max_pause,
        checks: CheckOptions { allow_seccomp_filter: true },
    };
    let mut world = server::World::stop(pid, &options, true).map_err(perr(pid, "stopping the target"))?;
    let stopped_at_ns = world.stopped_at_ns();
    let threads: Vec<ThreadState> =
        world.threads().iter().map(|t| thread_state(t, &opts.function_entries)).collect();

    // What a fork does not carry over, read now (bounded).
    let mut copies = Vec::new();
    let mut unread = Vec::new();
    let mut copied = 0u64;
    for r in regions.iter().filter(|r| r.scannable() && (r.dontfork || r.wipeonfork)) {
        if copied + r.len() > COPY_BUDGET || world.check_pause("copying DONTFORK regions").is_err() {
            unread.push((r.start, r.end));
            continue;
        }
        let mut buf = vec![0u8; r.len() as usize];
        match world.mem().and_then(|m| m.read_exact_at(r.start, &mut buf)) {
            Ok(()) => {
                copied += r.len();
                copies.push((r.start, buf));
            }
            Err(_) => unread.push((r.start, r.end)),
        }
    }

    let mut child = None;
    if no_clone_why.is_none() {
        let flags = (libc::CLONE_FILES | libc::CLONE_FS) as u64; // exit signal 0: no SIGCHLD
        let made = world.remote().and_then(|mut rs| {
            let c = rs.clone(flags);
            rs.finish()?;
            c
        });
        match made {
            Ok(c) => child = Some(c),
            Err(e) => no_clone_why = Some(format!("clone failed: {e}")),
        }
    }
    if let Some(c) = child {
        let pause = world.resume();
        let mem = match Mem::open(c) {
            Ok(m) => m,
            Err(e) => {
                let _ = server::reap(pid, c, opts.max_pause);
                return Err(perr(pid, "opening the snapshot's memory")(e));
            }
        };
        return Ok(Snapshot {
            pid,
            method: Method::Clone,
            no_clone_why: None,
            threads,
            regions,
            pause,
            stopped_at_ns,
            copies,
            unread,
            child: Some(Child { pid: c, mem }),
        });
    }

    // The fallback: copy every scannable writable mapping now, if it fits in the pause.
    let why = no_clone_why.unwrap_or_default();
    let wanted: Vec<&Region> =
        regions.iter().filter(|r| r.scannable() && r.writable && !r.dontfork && !r.wipeonfork).collect();
    let bytes: u64 = wanted.iter().map(|r| r.len()).sum();
    let left = opts.max_pause.saturating_sub(world.stopped_for());
    let estimate = Duration::from_secs_f64(bytes as f64 / opts.copy_rate.max(1) as f64);
    let too_big = || SnapshotError::TooBigToStop {
        pid,
        why: why.clone(),
        mib: bytes >> 20,
        estimate_ms: estimate.as_millis() as u64,
        max_ms: opts.max_pause.as_millis() as u64,
    };
    if estimate > left {
        return Err(too_big());
    }
    for r in wanted {
        // Past the bound the world has resumed the target already.
        if world.check_pause("copying the target's memory").is_err() {
            return Err(too_big());
        }
        let mut buf = vec![0u8; r.len() as usize];
        match world.mem().and_then(|m| m.read_exact_at(r.start, &mut buf)) {
            Ok(()) => copies.push((r.start, buf)),
            Err(_) => unread.push((r.start, r.end)),
        }
    }
    let pause = world.resume();
    Ok(Snapshot {
        pid,
        method: Method::StoppedCopy,
        no_clone_why: Some(why),
        threads,
        regions,
        pause,
        stopped_at_ns,
        copies,
        unread,
        child: None,
    })
}

impl Snapshot {
    /// Reads `buf.len()` bytes at `addr` as they were at the capture. `false` if that memory
    /// is not in the picture.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        // Runtime decoders pass addresses read from the target: any value at all.
        let Some(end) = addr.checked_add(buf.len() as u64) else { return false };
        if let Some((start, bytes)) =
            self.copies.iter().find(|(s, b)| *s <= addr && end <= *s + b.len() as u64)
        {
            let off = (addr - start) as usize;
            buf.copy_from_slice(&bytes[off..off + buf.len()]);
            return true;
        }
        match &self.child {
            Some(c) => c.mem.read_exact_at(addr, buf).is_ok(),
            None => false,
        }
    }

    /// The snapshot child's PID, if there is one.
    pub fn child_pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.pid)
    }

    /// Ends the snapshot: kills the child and reaps it through the target (a second short
    /// stop), so nothing of ours stays under it. Returns that stop's pause.
    pub fn release(mut self, max_pause: Duration) -> Result<Duration, SnapshotError> {
        let Some(child) = self.child.take() else { return Ok(Duration::ZERO) };
        server::reap(self.pid, child.pid, max_pause).map_err(perr(self.pid, "reaping the snapshot child"))
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Some(c) = self.child.take()
            && let Err(e) = server::reap(self.pid, c.pid, Duration::from_millis(200))
        {
            // The helper tries again when it ends.
            tracing::warn!("releasing the scan's snapshot: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_flags_and_names() {
        let text = "\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
VmFlags: rd wr mr mw me ac sd
7f0000000000-7f0000001000 rw-p 00000000 00:00 0 
VmFlags: rd wr mr mw me dc sd
7f0000001000-7f0000002000 rw-s 00000000 00:05 1234                       /dev/dri/card0
VmFlags: rd wr sh mr mw me ms io pf sd
7f0000002000-7f0000003000 rw-p 00000000 00:00 0                          [anon:cache]
VmFlags: rd wr mr mw me wf sd
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
VmFlags: ex
";
        let r = parse_smaps(text);
        assert_eq!(r.len(), 5);
        assert_eq!((r[0].name.as_str(), r[0].dontfork, r[0].scannable()), ("[heap]", false, true));
        assert!(r[1].dontfork && r[1].name.is_empty() && r[1].scannable());
        assert!(r[2].device && r[2].shared && !r[2].scannable());
        assert!(r[3].wipeonfork && r[3].name == "[anon:cache]");
        assert!(!r[4].scannable());
    }

    #[test]
    fn vector_lanes_follow_xstate_bv() {
        let mut x = vec![0u8; 2688];
        x[160 + 16 * 3 + 8..160 + 16 * 3 + 16].copy_from_slice(&0x5555_0000_1000u64.to_le_bytes());
        x[576..584].copy_from_slice(&0x7777u64.to_le_bytes());
        // Without the AVX bit, the upper halves are not live state.
        assert_eq!(
            vector_lanes(&x),
            vec![(Reg::Vector { bank: "xmm", index: 3, lane: 1 }, 0x5555_0000_1000)]
        );
        x[512] = 1 << 2;
        let lanes = vector_lanes(&x);
        assert!(lanes.contains(&(Reg::Vector { bank: "ymm", index: 0, lane: 0 }, 0x7777)));
        assert_eq!(lanes.len(), 2);
        assert_eq!(Reg::Vector { bank: "xmm", index: 3, lane: 1 }.to_string(), "xmm3[1]");
    }
}
