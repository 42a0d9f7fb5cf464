//! The guard: a small process of ours that outlives a SIGKILLed leakprobe and puts the GOT
//! slots back within a second.
//!
//! It is leakprobe itself, started with a hidden argument before any slot is patched. It
//! reads the restore list on stdin, then waits for stdin to close. A clean detach restores the
//! slots itself and writes [`DISARM`] first; any other end of the pipe (leakprobe killed,
//! crashed) makes the guard restore: for each slot still holding our stub's address, the
//! original value, and the stub's switch off. It does not stop the target: an 8-byte aligned
//! store is seen whole by any thread, and a call that still reaches the stub is passed
//! straight through, so a race with a running thread is harmless.
//!
//! Even with the guard killed too, the target stays correct: the stub forwards every call,
//! and it stops sampling once its set is full.
//!
//! The stops themselves are not the guard's: the ptrace helper (`ptrace::server`) does them,
//! and it resumes the target and reaps the scan's snapshot child if leakprobe dies.

use std::{
    io::Write as _,
    os::unix::fs::FileExt as _,
    process::{Child, Command, Stdio},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The hidden first argument that makes leakprobe a guard.
pub const ARG: &str = "__inprocess-guard";
/// Written by a clean detach before closing the pipe.
pub const DISARM: u8 = b'D';
/// Starts a restore list: the tag, its length (u64 LE), then its JSON.
const LIST: u8 = b'L';

/// What the guard puts back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreList {
    pub pid: i32,
    /// The target's start time in clock ticks (`/proc/PID/stat` field 22): with the PID, it
    /// names one process, so a recycled PID is never written to.
    pub start_ticks: u64,
    /// (slot address, original value, our stub's entry): restored only while it holds ours.
    pub slots: Vec<(u64, u64, u64)>,
    /// The stub's switch, set to 0.
    pub enabled_at: u64,
    /// Where the stub's code is mapped: if the target no longer maps it there (it called
    /// exec), its memory is another program's and nothing is written.
    pub code_at: u64,
    /// `run --in-process`: the target is held in a job-control stop until the GOT is
    /// patched. A guard that restores also continues it (`SIGCONT`), or it would stay stopped.
    #[serde(default)]
    pub held_stopped: bool,
    /// `run --scan`: our eBPF program may stop the target at exit() until it is removed; the
    /// guard keeps continuing it for a while.
    #[serde(default)]
    pub stop_at_exit: bool,
    /// `--js-heap`: the Node inspector leakprobe opened (its port and session path). A guard
    /// that restores also closes it, so no debugger port we opened is left behind.
    #[serde(default)]
    pub inspector: Option<(u16, String)>,
}

/// Whether `pid` still maps our stub's code at `code_at`.
pub fn stub_mapped(pid: i32, code_at: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|maps| maps_hold_stub(&maps, code_at))
}

/// Whether a maps listing has our stub's code mapping starting at `code_at`. The kernel pads
/// addresses to 8 hex digits, so a stub below 4 GiB reads `003ef000-`: compared as numbers.
fn maps_hold_stub(maps: &str, code_at: u64) -> bool {
    maps.lines().any(|l| {
        l.contains("leakprobe-stub")
            && l.split('-').next().and_then(|a| u64::from_str_radix(a, 16).ok()) == Some(code_at)
    })
}

#[derive(Debug, Error)]
pub enum GuardError {
    /// The guard process could not be started.
    #[error("cannot start the in-process guard ({exe})")]
    Spawn {
        exe: String,
        #[source]
        source: std::io::Error,
    },
    /// The guard did not take the restore list.
    #[error("cannot hand the restore list to the in-process guard")]
    Handoff {
        #[source]
        source: std::io::Error,
    },
}

/// A running guard. Dropping it without [`Guard::disarm`] makes it restore.
pub struct Guard {
    child: Child,
}

impl Guard {
    /// Starts the guard with `list`. Call before patching anything.
    pub fn spawn(list: &RestoreList) -> Result<Guard, GuardError> {
        let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
        let mut child = Command::new(&exe)
            .arg(ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| GuardError::Spawn { exe: exe.display().to_string(), source })?;
        // Released first when we die, before the probes' slow teardown.
        child.stdin = child.stdin.take().map(crate::ptrace::server::move_high);
        let mut guard = Guard { child };
        guard.send(list)?;
        Ok(guard)
    }

    fn send(&mut self, list: &RestoreList) -> Result<(), GuardError> {
        let json = serde_json::to_vec(list).map_err(|e| GuardError::Handoff { source: e.into() })?;
        let stdin = self.child.stdin.as_mut().ok_or(GuardError::Handoff {
            source: std::io::Error::other("the guard's stdin is not a pipe"),
        })?;
        // Tagged and length-prefixed, so the guard knows where a list ends without EOF.
        stdin
            .write_all(&[LIST])
            .and_then(|()| stdin.write_all(&(json.len() as u64).to_le_bytes()))
            .and_then(|()| stdin.write_all(&json))
            .and_then(|()| stdin.flush())
            .map_err(|source| GuardError::Handoff { source })
    }

    /// Replaces the list (slots patched later, a new module).
    pub fn update(&mut self, list: &RestoreList) -> Result<(), GuardError> {
        self.send(list)
    }

    /// The slots are restored: tell the guard to exit without touching anything.
    pub fn disarm(mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(&[DISARM]);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Closing stdin without DISARM: the guard restores. Not waited for: it may outlive us.
        drop(self.child.stdin.take());
    }
}

/// Start ticks of `pid` (field 22 of /proc/PID/stat), if it exists.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The state letter and start ticks of `pid` (`/proc/PID/stat` fields 3 and 22).
fn stat_of(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    Some((rest.first()?.chars().next()?, rest.get(19)?.parse().ok()?))
}

/// Reads messages until the pipe ends: the newest list, and whether the end was a disarm.
fn read_until_end(input: &mut impl std::io::Read) -> (Option<RestoreList>, bool) {
    let mut list = None;
    loop {
        let mut tag = [0u8; 1];
        match input.read(&mut tag) {
            Ok(1) if tag[0] == DISARM => return (list, true),
            Ok(1) if tag[0] == LIST => {}
            _ => return (list, false),
        }
        let mut len = [0u8; 8];
        if input.read_exact(&mut len).is_err() {
            return (list, false);
        }
        let n = u64::from_le_bytes(len).min(64 << 20) as usize;
        let mut json = vec![0u8; n];
        if input.read_exact(&mut json).is_err() {
            return (list, false);
        }
        if let Ok(l) = serde_json::from_slice(&json) {
            list = Some(l);
        }
    }
}

/// Puts the slots back through /proc/PID/mem if the target is still the same process.
/// Returns how many slots were restored.
pub fn restore(list: &RestoreList) -> std::io::Result<usize> {
    if start_ticks(list.pid) != Some(list.start_ticks) {
        return Ok(0);
    }
    let mem = std::fs::OpenOptions::new().read(true).write(true).open(format!("/proc/{}/mem", list.pid))?;
    // Once the file is open it names this process even if the PID is recycled; check again.
    // After an exec the PID and start time stay, but the memory is another program's.
    if start_ticks(list.pid) != Some(list.start_ticks) || !stub_mapped(list.pid, list.code_at) {
        return Ok(0);
    }
    let mut restored = 0;
    for &(addr, original, ours) in &list.slots {
        let mut cur = [0u8; 8];
        // A module unloaded since (dlclose) is skipped; the others are still put back.
        if mem.read_exact_at(&mut cur, addr).is_ok()
            && u64::from_le_bytes(cur) == ours
            && mem.write_all_at(&original.to_le_bytes(), addr).is_ok()
        {
            restored += 1;
        }
    }
    if list.enabled_at != 0 {
        mem.write_all_at(&0u64.to_le_bytes(), list.enabled_at)?;
    }
    Ok(restored)
}

/// The guard process's main: wait, then restore unless disarmed.
pub fn run() -> std::process::ExitCode {
    // Not our terminal's Ctrl-C: only the pipe ends a guard.
    // SAFETY: ignoring a signal installs no handler code.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let (list, disarmed) = read_until_end(&mut std::io::stdin().lock());
    if let (Some(list), false) = (&list, disarmed) {
        // After the slots (below) would be the natural order, but a held target must not stay
        // stopped whatever the restore does; the slots are written through /proc/PID/mem and
        // need no stop either way.
        if list.held_stopped && start_ticks(list.pid) == Some(list.start_ticks) {
            // SAFETY: kill with a valid signal; the PID was just checked to name our target.
            unsafe { libc::kill(list.pid, libc::SIGCONT) };
            // `run --scan`: our eBPF program stops the target at exit() until the kernel has
            // removed it (it closes a dead leakprobe's uprobes one by one, ~0.1 s each, after
            // this pipe): continue it again whenever it stops, for long enough.
            let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while list.stop_at_exit && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(10));
                match stat_of(list.pid) {
                    Some(('T', start)) if start == list.start_ticks => {
                        // SAFETY: as above.
                        unsafe { libc::kill(list.pid, libc::SIGCONT) };
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }
    }
    if let (Some(list), false) = (&list, disarmed)
        && let Some((port, path)) = &list.inspector
        && start_ticks(list.pid) == Some(list.start_ticks)
    {
        match crate::session::inspector::guard_close(list.pid, *port, path) {
            Ok(()) => crate::say!(
                "leakprobe guard: leakprobe ended without detaching; closed the inspector it had opened on PID {}'s port {port}",
                list.pid
            ),
            Err(e) => {
                crate::say!("leakprobe guard: closing PID {}'s inspector on port {port}: {e}", list.pid)
            }
        }
    }
    match (list, disarmed) {
        (Some(list), false) if list.code_at == 0 && list.slots.is_empty() => std::process::ExitCode::SUCCESS,
        (Some(list), false) => match restore(&list) {
            Ok(n) => {
                crate::say!(
                    "leakprobe guard: leakprobe ended without detaching; restored {n} GOT slots of PID {} and switched its stub off",
                    list.pid
                );
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                crate::say!("leakprobe guard: restoring PID {}: {e}", list.pid);
                std::process::ExitCode::FAILURE
            }
        },
        _ => std::process::ExitCode::SUCCESS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stub_is_found_below_4_gib_where_maps_pads_the_address() {
        let maps = "003ef000-003ff000 r-xp 00000000 00:01 2693   /memfd:leakprobe-stub (deleted)\n\
                    00400000-0041f000 r--p 00000000 fe:00 247706 /usr/bin/python3.11\n\
                    7f741671e000-7f741672e000 r-xp 00000000 00:01 2694 /memfd:leakprobe-stub (deleted)\n";
        assert!(maps_hold_stub(maps, 0x3ef000));
        assert!(maps_hold_stub(maps, 0x7f741671e000));
        assert!(!maps_hold_stub(maps, 0x400000));
        assert!(!maps_hold_stub(maps, 0xef000));
    }

    fn frame(list: &RestoreList) -> Vec<u8> {
        let json = serde_json::to_vec(list).unwrap();
        let mut out = vec![LIST];
        out.extend((json.len() as u64).to_le_bytes());
        out.extend(json);
        out
    }

    #[test]
    fn the_newest_list_wins_and_only_disarm_disarms() {
        let a = RestoreList {
            pid: 1,
            start_ticks: 2,
            slots: vec![(0x10, 1, 2)],
            enabled_at: 8,
            code_at: 0,
            held_stopped: false,
            stop_at_exit: false,
            inspector: None,
        };
        let b = RestoreList { slots: vec![(0x10, 1, 2), (0x18, 3, 4)], ..a.clone() };
        let mut bytes = frame(&a);
        bytes.extend(frame(&b));
        let (got, disarmed) = read_until_end(&mut bytes.as_slice());
        assert_eq!((got.as_ref(), disarmed), (Some(&b), false));
        bytes.push(DISARM);
        let (got, disarmed) = read_until_end(&mut bytes.as_slice());
        assert_eq!((got, disarmed), (Some(b), true));
        // A list cut short keeps the one before it.
        let mut cut = frame(&a);
        cut.extend(&frame(&a)[..12]);
        assert_eq!(read_until_end(&mut cut.as_slice()), (Some(a), false));
    }

    #[test]
    fn restores_only_our_values_in_the_same_process() {
        // This test process is the target: three slots in a buffer of ours, and a mapping
        // named like the stub's.
        // SAFETY: memfd_create with a valid name; the fd is ours.
        let fd = unsafe { libc::memfd_create(c"leakprobe-stub".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh private mapping of our memfd.
        let code = unsafe {
            assert_eq!(libc::ftruncate(fd, 4096), 0);
            libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ, libc::MAP_PRIVATE, fd, 0)
        };
        assert_ne!(code, libc::MAP_FAILED);
        let mut slots = [0u64; 4];
        slots[0] = 0xaaaa; // ours: restored
        slots[1] = 0xbbbb; // changed since: left alone
        slots[3] = 1; // the switch
        let base = slots.as_ptr() as u64;
        let me = std::process::id() as i32;
        let list = RestoreList {
            pid: me,
            start_ticks: start_ticks(me).unwrap(),
            slots: vec![(base, 0x1111, 0xaaaa), (base + 8, 0x2222, 0xcccc)],
            enabled_at: base + 24,
            code_at: code as u64,
            held_stopped: false,
            stop_at_exit: false,
            inspector: None,
        };
        // Not where the stub is: another image, nothing written.
        let elsewhere = RestoreList { code_at: code as u64 + 0x1000, ..list.clone() };
        assert_eq!(restore(&elsewhere).unwrap(), 0);
        assert_eq!(slots[0], 0xaaaa);
        assert_eq!(restore(&list).unwrap(), 1);
        let now: Vec<u64> =
            (0..4).map(|i| unsafe { std::ptr::read_volatile(slots.as_ptr().add(i)) }).collect();
        assert_eq!(now, vec![0x1111, 0xbbbb, 0, 0]);
        // Another process's start time: nothing written.
        let stale = RestoreList { start_ticks: list.start_ticks + 1, ..list };
        assert_eq!(restore(&stale).unwrap(), 0);
    }
}
