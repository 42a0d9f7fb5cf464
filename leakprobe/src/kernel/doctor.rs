//! `leakprobe doctor`: every kernel feature and privilege leakprobe uses, whether this machine
//! has it, and what fails without it. Each check tries the real thing where it can (loads the
//! embedded eBPF programs, opens a pidfd, writes through /proc/self/mem, maps a memfd for
//! execution), so the answer holds for this kernel, its configuration and these privileges,
//! not for a version number.

use std::{
    fs::OpenOptions,
    os::{fd::FromRawFd as _, unix::fs::FileExt as _},
    path::Path,
    time::Instant,
};

use serde::Serialize;

use super::{
    preflight,
    probe::{ProbeConfig, Probes},
};

/// The oldest kernel whose features cover everything in the eBPF object (see README
/// "Minimum kernel"): the entry programs tail-call the stack walker from a BPF subprogram,
/// which the x86-64 JIT allows since 5.10 (before, tail calls and bpf-to-bpf calls could not
/// be mixed). The newest helper used, `bpf_probe_read_user`, is from 5.5.
pub const MIN_KERNEL: (u32, u32) = (5, 10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// An optional feature is missing: one mode or speed-up is unavailable.
    Warn,
    /// A required feature is missing: tracing would be refused.
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// Whether `attach` needs it (a failure is then FAIL, else warn).
    pub required: bool,
    /// What was found.
    pub detail: String,
    /// What does not work without it.
    pub without: &'static str,
}

impl Check {
    fn new(name: &'static str, required: bool, has: bool, detail: String, without: &'static str) -> Self {
        let status = match (has, required) {
            (true, _) => Status::Ok,
            (false, true) => Status::Fail,
            (false, false) => Status::Warn,
        };
        Check { name, status, required, detail, without }
    }
}

#[derive(Debug, Serialize)]
pub struct Doctor {
    pub schema: &'static str,
    pub kernel: String,
    pub checks: Vec<Check>,
}

impl Doctor {
    /// Whether every required check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    pub fn text(&self) -> String {
        let mut s = format!("leakprobe {} doctor: kernel {}\n", env!("CARGO_PKG_VERSION"), self.kernel);
        for c in &self.checks {
            s.push_str(&format!(
                "{:<4} {}: {} — without it: {}\n",
                c.status.label(),
                c.name,
                c.detail,
                c.without
            ));
        }
        let fails = self.checks.iter().filter(|c| c.status == Status::Fail).count();
        let warns = self.checks.iter().filter(|c| c.status == Status::Warn).count();
        s.push_str(&match (fails, warns) {
            (0, 0) => "every check passed\n".to_string(),
            (0, w) => format!("every required check passed; {w} optional feature(s) missing\n"),
            (f, _) => format!("{f} required check(s) failed: attach and run would be refused\n"),
        });
        s
    }
}

const CAP_SYS_PTRACE: u32 = 19;

/// Runs every check against this kernel and this process's privileges.
pub fn run() -> Doctor {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = preflight::effective_caps(&status);
    let release =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let privileged = preflight::check_caps(cap_eff).is_ok();
    let sys = Path::new("/sys");
    let checks = vec![
        kernel_version(&release),
        privileges(cap_eff),
        Check::new(
            "btf",
            true,
            preflight::check_btf(sys).is_ok(),
            match preflight::check_btf(sys) {
                Ok(()) => "/sys/kernel/btf/vmlinux present".into(),
                Err(e) => e.to_string(),
            },
            "attach, run and census refuse to start (CONFIG_DEBUG_INFO_BTF=y is needed)",
        ),
        Check::new(
            "uprobes",
            true,
            preflight::check_uprobes(sys).is_ok(),
            match preflight::check_uprobes(sys) {
                Ok(()) => "uprobe PMU present (/sys/bus/event_source/devices/uprobe)".into(),
                Err(e) => e.to_string(),
            },
            "no allocation function can be probed: attach and run refuse to start",
        ),
        ebpf_load(),
        send_signal(privileged),
        pidfd(),
        ptrace(cap_eff),
        lockdown(),
        memfd_exec(),
        proc_mem_write(),
        uprobe_trampoline(),
    ];
    Doctor { schema: "leakprobe/doctor/v1", kernel: release, checks }
}

fn kernel_version(release: &str) -> Check {
    let mut nums = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let version = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    let (maj, min) = MIN_KERNEL;
    Check::new(
        "kernel",
        false,
        version >= MIN_KERNEL,
        format!(
            "{release} (leakprobe needs {maj}.{min} or later; the checks below test each feature itself)"
        ),
        "some programs may not load; a vendor kernel may have the features backported (see the checks below)",
    )
}

fn privileges(cap_eff: u64) -> Check {
    let (has, detail) = match preflight::check_caps(cap_eff) {
        Ok(()) => {
            let names: Vec<&str> = [(21, "CAP_SYS_ADMIN"), (39, "CAP_BPF"), (38, "CAP_PERFMON")]
                .into_iter()
                .filter(|(c, _)| cap_eff & (1u64 << c) != 0)
                .map(|(_, n)| n)
                .collect();
            (true, format!("effective capabilities include {}", names.join(", ")))
        }
        Err(e) => (false, format!("{e} (effective set {cap_eff:#x})")),
    };
    Check::new("privileges", true, has, detail, "no eBPF program can be loaded and no uprobe opened")
}

/// Loads the embedded programs exactly as a trace does (verifier included), attaches nothing
/// but the exec watcher on ourselves, and closes everything again.
fn ebpf_load() -> Check {
    let start = Instant::now();
    let cfg = ProbeConfig {
        tgid: std::process::id(),
        // The fork follower is loaded and verified too.
        follow_children: true,
        max_processes: 4,
        max_live: 1024,
        max_stacks: 1024,
        max_threads: 64,
        max_depth: leakprobe_common::MAX_STACK_DEPTH as u32,
        max_unwind_rows: 1024,
        sample_bytes: 0,
        noop: false,
        allocator_text: None,
        stub_text: None,
    };
    let (has, detail) = match Probes::load(cfg) {
        Ok(p) => {
            drop(p);
            (
                true,
                format!(
                    "the embedded programs loaded and passed the verifier in {:.2} s",
                    start.elapsed().as_secs_f64()
                ),
            )
        }
        Err(e) => (false, format!("loading the embedded programs failed: {}", super::probe::error_chain(&e))),
    };
    Check::new(
        "ebpf",
        true,
        has,
        detail,
        "nothing can be traced (bpf(2) denied, or a helper or map type this kernel lacks)",
    )
}

fn send_signal(privileged: bool) -> Check {
    use aya::{
        programs::ProgramType,
        sys::{BpfHelper, is_helper_supported},
    };
    let (has, detail) = if !privileged {
        (false, "not probed: loading a probe program needs the privileges above".to_string())
    } else {
        match is_helper_supported(ProgramType::KProbe, BpfHelper::BPF_FUNC_send_signal) {
            Ok(true) => (true, "bpf_send_signal is available to uprobe programs".into()),
            Ok(false) => {
                (false, "bpf_send_signal is not available to uprobe programs (kernel < 5.3?)".into())
            }
            Err(e) => (false, format!("probing bpf_send_signal failed: {e}")),
        }
    };
    Check::new(
        "bpf_send_signal",
        false,
        has,
        detail,
        "`run --scan` cannot stop the command at exit() to scan it",
    )
}

fn pidfd() -> Check {
    // SAFETY: pidfd_open on our own PID; the fd is owned (and closed) below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    let (has, detail) = if fd >= 0 {
        // SAFETY: a fresh fd we own.
        drop(unsafe { std::fs::File::from_raw_fd(fd as i32) });
        (true, "pidfd_open works".to_string())
    } else {
        (false, format!("pidfd_open failed: {} (needs Linux 5.3)", std::io::Error::last_os_error()))
    };
    Check::new(
        "pidfd",
        true,
        has,
        detail,
        "the target's exit and a recycled PID cannot be told apart: attach refuses to start",
    )
}

fn ptrace(cap_eff: u64) -> Check {
    let sys_ptrace = cap_eff & (1u64 << CAP_SYS_PTRACE) != 0;
    let scope =
        std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok().map(|s| s.trim().to_string());
    let (has, detail) = match (scope.as_deref(), sys_ptrace) {
        (Some("3"), _) => (
            false,
            "kernel.yama.ptrace_scope is 3: no process can be traced until the next reboot".to_string(),
        ),
        (None, true) => (true, "no Yama restrictions; CAP_SYS_PTRACE in the effective set".to_string()),
        (Some(s), true) => {
            (true, format!("kernel.yama.ptrace_scope is {s}; CAP_SYS_PTRACE in the effective set"))
        }
        (s, false) => (
            false,
            format!(
                "no CAP_SYS_PTRACE (ptrace_scope {}): only this user's own processes{} can be traced",
                s.unwrap_or("absent"),
                if s == Some("1") { " that are its descendants" } else { "" }
            ),
        ),
    };
    Check::new(
        "ptrace",
        false,
        has,
        detail,
        "run (holding the command), --in-process, --scan and census are refused; attach with uprobes still works",
    )
}

fn lockdown() -> Check {
    let level = std::fs::read_to_string("/sys/kernel/security/lockdown").ok().and_then(|s| {
        let open = s.find('[')?;
        let close = s[open..].find(']')? + open;
        Some(s[open + 1..close].to_string())
    });
    let detail = match level.as_deref() {
        None => "no lockdown LSM (/sys/kernel/security/lockdown absent)".to_string(),
        Some("none") => "lockdown: none".to_string(),
        Some("integrity") => {
            "lockdown: integrity (blocks bpf_probe_write_user, which leakprobe does not use)".to_string()
        }
        Some("confidentiality") => "lockdown: confidentiality (blocks BPF reads of kernel memory; leakprobe \
                                    reads only user memory with bpf_probe_read_user)"
            .to_string(),
        Some(other) => format!("lockdown: {other}"),
    };
    Check::new(
        "lockdown",
        false,
        true,
        detail,
        "nothing: no lockdown level blocks the helpers leakprobe uses (the ebpf check above loads them)",
    )
}

/// --in-process maps its stub from a memfd for execution (uprobes need a file-backed mapping);
/// vm.memfd_noexec=1/2 (6.3+) makes memfds non-executable.
fn memfd_exec() -> Check {
    let noexec = std::fs::read_to_string("/proc/sys/vm/memfd_noexec").ok().map(|s| s.trim().to_string());
    let (has, detail) = match try_memfd_exec() {
        Ok(()) => (true, "a memfd maps read+exec".to_string()),
        Err(e) => (false, format!("mapping a memfd read+exec failed: {e}")),
    };
    let detail = match noexec {
        Some(v) => format!("{detail} (vm.memfd_noexec = {v})"),
        None => detail,
    };
    Check::new(
        "memfd_exec",
        false,
        has,
        detail,
        "--in-process cannot map its stub (uprobes need it file-backed); uprobe mode is unaffected",
    )
}

fn try_memfd_exec() -> std::io::Result<()> {
    // SAFETY: memfd_create with a valid name; the fd is owned by `file` below.
    let fd = unsafe { libc::memfd_create(c"leakprobe-doctor".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(4096)?;
    use std::os::fd::AsRawFd as _;
    // SAFETY: a new shared mapping of our own memfd, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p, 4096) };
    Ok(())
}

/// --in-process patches GOT slots in read-only (RELRO) pages through /proc/PID/mem, and its
/// guard puts them back without being the tracer. That needs FOLL_FORCE for a non-tracer:
/// proc_mem.force_override=always (the default since 6.12; before, always allowed).
fn proc_mem_write() -> Check {
    let param = std::fs::read_to_string("/proc/cmdline").ok().and_then(|c| {
        c.split_whitespace().find_map(|w| w.strip_prefix("proc_mem.force_override=")).map(String::from)
    });
    let (has, detail) = match try_write_readonly_self() {
        Ok(()) => (true, "a write to a read-only page through /proc/self/mem went through".to_string()),
        Err(e) => (false, format!("a write to a read-only page through /proc/self/mem was refused: {e}")),
    };
    let detail = match param {
        Some(p) => format!("{detail} (proc_mem.force_override={p})"),
        None => detail,
    };
    Check::new(
        "proc_mem_write",
        false,
        has,
        detail,
        "--in-process cannot patch or restore read-only GOT slots (RELRO); uprobe mode is unaffected",
    )
}

fn try_write_readonly_self() -> std::io::Result<()> {
    // SAFETY: a new private anonymous read-only page, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let result = (|| {
        let mem = OpenOptions::new().read(true).write(true).open("/proc/self/mem")?;
        mem.write_all_at(&[0x5a], p as u64)?;
        // SAFETY: the page is mapped and readable.
        let seen = unsafe { std::ptr::read_volatile(p as *const u8) };
        if seen == 0x5a { Ok(()) } else { Err(std::io::Error::other("the write did not land")) }
    })();
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p, 4096) };
    result
}

/// The x86-64 optimized uprobe (6.18): a uprobe on a 5-byte NOP becomes a call into a
/// trampoline that enters the kernel through the `uprobe` system call (336). Called from
/// anywhere else it fails with ENXIO (6.18 here); a kernel without it returns ENOSYS. Tried in
/// a child, in case a kernel answers with SIGILL as the `uretprobe` call (335) does.
fn uprobe_trampoline() -> Check {
    let without = "each --in-process report-site hit is a trap (~1.13 µs here) instead of a call (~0.78 µs)";
    if !cfg!(target_arch = "x86_64") {
        return Check::new("uprobe_trampoline", false, false, "x86-64 only".into(), without);
    }
    const SYS_UPROBE: libc::c_long = 336;
    // SAFETY: the child only makes system calls and exits; it never returns into Rust code.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: async-signal-safe calls only. No core dump for the expected SIGILL.
        unsafe {
            let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::setrlimit(libc::RLIMIT_CORE, &zero);
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
            let r = libc::syscall(SYS_UPROBE);
            let errno = *libc::__errno_location();
            libc::_exit(match (r, errno) {
                (-1, libc::ENOSYS) => 1,
                (-1, libc::ENXIO) => 2,
                _ => 3,
            });
        }
    }
    let (has, detail) = if pid < 0 {
        (false, format!("could not test: fork failed: {}", std::io::Error::last_os_error()))
    } else {
        let mut st = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        if libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGILL {
            (true, "the uprobe system call exists (5-byte NOP probes become calls)".to_string())
        } else if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 1 {
            (false, "no uprobe system call (ENOSYS): a kernel before 6.18".to_string())
        } else if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 2 {
            (true, "the uprobe system call exists (ENXIO from outside its trampoline)".to_string())
        } else if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 3 {
            (false, "system call 336 is something else here: no optimized uprobes".to_string())
        } else {
            (false, format!("could not tell (child status {st:#x})"))
        }
    };
    Check::new("uprobe_trampoline", false, has, detail, without)
}

/// `leakprobe doctor`: prints the checks; exit status 0 when every required one passed.
pub fn main(json: bool, out: &mut dyn std::io::Write) -> anyhow::Result<bool> {
    let d = run();
    if json {
        serde_json::to_writer_pretty(&mut *out, &d)?;
        writeln!(out)?;
    } else {
        out.write_all(d.text().as_bytes())?;
    }
    Ok(d.passed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_requiredness() {
        assert_eq!(Check::new("a", true, false, String::new(), "").status, Status::Fail);
        assert_eq!(Check::new("a", false, false, String::new(), "").status, Status::Warn);
        assert_eq!(Check::new("a", true, true, String::new(), "").status, Status::Ok);
    }

    #[test]
    fn kernel_version_is_compared_numerically() {
        assert_eq!(kernel_version("6.18.44-fc-v657").status, Status::Ok);
        assert_eq!(kernel_version("5.10.0-28-amd64").status, Status::Ok);
        assert_eq!(kernel_version("5.9.16").status, Status::Warn);
        assert_eq!(kernel_version("5.4.0-150-generic").status, Status::Warn);
        assert_eq!(kernel_version("4.19.0").status, Status::Warn);
    }

    #[test]
    fn passed_is_false_only_on_a_required_failure() {
        let mk = |checks| Doctor { schema: "", kernel: String::new(), checks };
        assert!(mk(vec![Check::new("a", false, false, String::new(), "")]).passed());
        assert!(!mk(vec![Check::new("a", true, false, String::new(), "")]).passed());
    }
}
