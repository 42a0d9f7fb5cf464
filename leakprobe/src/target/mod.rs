//! **Layer: what to hook.** The target process as /proc and its ELF files show it: identity,
//! modules, which allocator its calls bind to, `run` mode. May read /proc and files; no eBPF.
//!
//! The target process as /proc shows it: identity, liveness and mapped modules.
//!
//! Paths to a target's files always go through `/proc/PID/map_files` or `/proc/PID/root`, so a
//! target in another mount namespace resolves to its own files, not the host's.

pub mod allocator;
pub mod elf;
pub mod launch;
pub mod memory;

use std::{
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use procfs::process::{MMapPath, Process};
use thiserror::Error;

/// Why a process cannot be a target. Each message says what to do about it.
#[derive(Debug, Error)]
pub enum TargetError {
    #[error("no process with PID {pid}; check the PID (it may have exited)")]
    NoSuchProcess { pid: i32 },
    #[error("PID {pid} is leakprobe itself; give the PID of the process to trace")]
    IsSelf { pid: i32 },
    #[error("PID {pid} is a kernel thread; it has no user-space allocations to trace")]
    KernelThread { pid: i32 },
    #[error("PID {pid} is a zombie (exited, not yet reaped); there is nothing left to trace")]
    Zombie { pid: i32 },
    #[error(
        "PID {pid} exited while the probes were being attached (its PID may already belong to \
         another process); the probes were removed at once and nothing is reported"
    )]
    GoneWhileAttaching { pid: i32 },
    #[error("cannot read /proc/{pid}/{what}")]
    Proc {
        pid: i32,
        what: &'static str,
        #[source]
        source: procfs::ProcError,
    },
    #[error("cannot open {path} of PID {pid}")]
    Open {
        pid: i32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pidfd_open({pid}) failed")]
    Pidfd {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

/// Who the target is, captured at attach.
#[derive(Clone, Debug)]
pub struct Identity {
    pub pid: i32,
    pub exe: String,
    pub cmdline: Vec<String>,
    /// Start time in clock ticks since boot: with the PID, it names one process for good.
    pub start_ticks: u64,
    /// The same as wall-clock time, when the boot time is known.
    pub start_time: Option<std::time::SystemTime>,
}

const PF_KTHREAD: u32 = 0x0020_0000;

fn proc_err(pid: i32, what: &'static str) -> impl FnOnce(procfs::ProcError) -> TargetError {
    move |source| match source {
        procfs::ProcError::NotFound(_) => TargetError::NoSuchProcess { pid },
        source => TargetError::Proc { pid, what, source },
    }
}

/// Checks that `pid` names a live user-space process other than us, and says who it is.
pub fn identify(pid: i32) -> Result<Identity, TargetError> {
    if pid == std::process::id() as i32 {
        return Err(TargetError::IsSelf { pid });
    }
    if pid <= 0 {
        return Err(TargetError::NoSuchProcess { pid });
    }
    let proc = Process::new(pid).map_err(proc_err(pid, "stat"))?;
    let stat = proc.stat().map_err(proc_err(pid, "stat"))?;
    if stat.flags & PF_KTHREAD != 0 {
        return Err(TargetError::KernelThread { pid });
    }
    if stat.state == 'Z' || stat.state == 'X' {
        return Err(TargetError::Zombie { pid });
    }
    let exe = proc.exe().map(|p| p.display().to_string()).unwrap_or_else(|_| format!("[{}]", stat.comm));
    let cmdline = proc.cmdline().unwrap_or_default();
    let start_time = procfs::boot_time_secs().ok().map(|boot| {
        let ticks = procfs::ticks_per_second().max(1);
        std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(boot)
            + std::time::Duration::from_secs_f64(stat.starttime as f64 / ticks as f64)
    });
    Ok(Identity { pid, exe, cmdline, start_ticks: stat.starttime, start_time })
}

/// True while `id` still names the same running process (not exited, PID not recycled).
pub fn still_same(id: &Identity) -> bool {
    Process::new(id.pid)
        .and_then(|p| p.stat())
        .map(|s| s.starttime == id.start_ticks && s.state != 'Z' && s.state != 'X')
        .unwrap_or(false)
}

/// A file-backed executable mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
    /// The path as the target sees it.
    pub path: PathBuf,
    pub dev: (i32, i32),
    pub inode: u64,
}

impl Mapping {
    pub fn file_name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// The target's executable file mappings, in address order.
pub fn exec_mappings(pid: i32) -> Result<Vec<Mapping>, TargetError> {
    let proc = Process::new(pid).map_err(proc_err(pid, "maps"))?;
    let maps = proc.maps().map_err(proc_err(pid, "maps"))?;
    let mut out = Vec::new();
    for m in maps {
        if !m.perms.contains(procfs::process::MMPermissions::EXECUTE) {
            continue;
        }
        out.extend(Mapping::of(&m));
    }
    Ok(out)
}

impl Mapping {
    /// A file mapping as /proc/PID/maps lists it; `None` for anonymous and special ones.
    pub fn of(m: &procfs::process::MemoryMap) -> Option<Mapping> {
        let MMapPath::Path(path) = &m.pathname else { return None };
        Some(Mapping {
            start: m.address.0,
            end: m.address.1,
            file_offset: m.offset,
            path: path.clone(),
            dev: m.dev,
            inode: m.inode,
        })
    }
}

/// The distinct modules (one mapping each) whose executable mappings hold `addrs`.
pub fn modules_holding(maps: &[Mapping], addrs: impl IntoIterator<Item = u64>) -> Vec<&Mapping> {
    let mut out: Vec<&Mapping> = Vec::new();
    for addr in addrs {
        if let Some(m) = maps.iter().find(|m| m.start <= addr && addr < m.end)
            && !out.iter().any(|x| x.path == m.path)
        {
            out.push(m);
        }
    }
    out
}

/// The path through which we open a target's file: its own mount namespace's view.
pub fn target_path(pid: i32, path: &Path) -> PathBuf {
    let rel = path.strip_prefix("/").unwrap_or(path);
    PathBuf::from(format!("/proc/{pid}/root")).join(rel)
}

/// Opens the file behind a mapping, preferring `map_files` (exactly the mapped inode, even if
/// the path was replaced or deleted) over the path through the target's root.
pub fn open_mapping(pid: i32, m: &Mapping) -> Result<File, TargetError> {
    let map_file = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
    File::open(&map_file).or_else(|_| {
        let path = target_path(pid, &m.path);
        File::open(&path).map_err(|source| TargetError::Open { pid, path, source })
    })
}

/// The whole contents of the file behind a mapping.
pub fn read_mapping(pid: i32, m: &Mapping) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut open_mapping(pid, m).map_err(std::io::Error::other)?, &mut data)?;
    Ok(data)
}

/// Where a language runtime may live: the executable first, then the mapped files whose name
/// `named` accepts, one mapping each (the first in address order); and the maps read.
pub fn runtime_candidates(
    pid: i32,
    named: impl Fn(&str) -> bool,
) -> Result<(procfs::process::MemoryMaps, Vec<Mapping>), procfs::ProcError> {
    let maps = procfs::process::Process::new(pid).and_then(|p| p.maps())?;
    let exe = procfs::process::Process::new(pid).ok().and_then(|p| p.exe().ok());
    let mut files: Vec<Mapping> = Vec::new();
    for m in maps.iter() {
        if let Some(m) = Mapping::of(m)
            && !files.iter().any(|f| f.path == m.path)
        {
            files.push(m);
        }
    }
    files.retain(|m| Some(&m.path) == exe.as_ref() || named(&m.file_name()));
    files.sort_by_key(|m| Some(&m.path) != exe.as_ref());
    Ok((maps, files))
}

/// The allocator libraries found in the target.
#[derive(Clone, Debug)]
pub struct Allocators {
    pub libc: Mapping,
    /// libstdc++ or libc++, when mapped: their operator new entries name the C++ caller.
    pub cxx: Option<Mapping>,
}

/// glibc's libc, or musl's (its dynamic loader is its libc).
pub fn is_libc(name: &str) -> bool {
    name.starts_with("libc.so")
        || (name.starts_with("libc-") && name.ends_with(".so"))
        || name.starts_with("ld-musl-")
        || name.starts_with("libc.musl-")
}

pub fn is_cxx(name: &str) -> bool {
    name.starts_with("libstdc++.so") || name.starts_with("libc++.so")
}

/// Finds libc (and the C++ runtime) among the target's mappings.
pub fn find_allocators(maps: &[Mapping]) -> Option<Allocators> {
    let libc = maps.iter().find(|m| is_libc(&m.file_name()))?.clone();
    let cxx = maps.iter().find(|m| is_cxx(&m.file_name())).cloned();
    Some(Allocators { libc, cxx })
}

/// A pidfd for the target: readable once it exits, and immune to PID reuse.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, TargetError> {
    // SAFETY: plain syscall; a non-negative return is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(TargetError::Pidfd { pid, source: std::io::Error::last_os_error() });
    }
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    debug_assert!(fd.as_raw_fd() >= 0);
    Ok(fd)
}

/// Whether the process behind a pidfd has exited (it stays "exited" even if its PID is
/// reused, which is the point).
pub fn pidfd_exited(fd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// The current exe link, to notice an exec.
pub fn exe_of(pid: i32) -> Option<PathBuf> {
    Process::new(pid).ok()?.exe().ok()
}

/// The processes `pid` has forked that still run (every thread's children), and theirs, in
/// breadth-first order; at most `limit`.
pub fn descendants(pid: i32, limit: usize) -> Vec<i32> {
    let mut out: Vec<i32> = Vec::new();
    let mut queue = std::collections::VecDeque::from([pid]);
    while let Some(p) = queue.pop_front() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for task in tasks.flatten() {
            let Ok(text) = std::fs::read_to_string(task.path().join("children")) else { continue };
            for child in text.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
                if !out.contains(&child) && child != pid {
                    if out.len() >= limit {
                        return out;
                    }
                    out.push(child);
                    queue.push_back(child);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libc_names() {
        assert!(is_libc("libc.so.6"));
        assert!(is_libc("libc-2.31.so"));
        assert!(!is_libc("libcrypto.so.3"));
        assert!(!is_libc("libcap.so.2"));
        assert!(is_libc("ld-musl-x86_64.so.1"));
        assert!(is_cxx("libstdc++.so.6"));
    }

    #[test]
    fn identify_rejects_self_and_missing() {
        let me = std::process::id() as i32;
        assert!(matches!(identify(me), Err(TargetError::IsSelf { .. })));
        assert!(matches!(identify(i32::MAX), Err(TargetError::NoSuchProcess { .. })));
    }

    #[test]
    fn target_path_goes_through_root() {
        assert_eq!(
            target_path(42, Path::new("/usr/lib/libc.so.6")),
            PathBuf::from("/proc/42/root/usr/lib/libc.so.6")
        );
    }
}
