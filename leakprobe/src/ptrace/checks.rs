//! Refuse targets that must not be stopped, before touching them.

use super::PtraceError;

/// The `/proc/PID/status` fields the checks need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcStatus {
    pub name: String,
    /// The state letter: R, S, D, T, t, Z, X...
    pub state: char,
    /// 0 when not traced.
    pub tracer_pid: i32,
    /// The thread's process (its thread-group leader's PID).
    pub tgid: i32,
    /// 0 disabled, 1 strict, 2 filter; `None` on kernels without seccomp.
    pub seccomp: Option<u8>,
    /// `Kthread:` (6.x kernels); `None` when the line is absent.
    pub kthread: Option<bool>,
}

/// Parses the text of `/proc/PID/status`.
pub fn parse_status(text: &str) -> ProcStatus {
    let mut st = ProcStatus::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match key {
            "Name" => st.name = value.to_string(),
            "State" => st.state = value.chars().next().unwrap_or('?'),
            "TracerPid" => st.tracer_pid = value.parse().unwrap_or(0),
            "Tgid" => st.tgid = value.parse().unwrap_or(0),
            "Seccomp" => st.seccomp = value.parse().ok(),
            "Kthread" => st.kthread = value.parse::<u8>().ok().map(|v| v != 0),
            _ => {}
        }
    }
    st
}

/// The `flags` field of `/proc/PID/stat` (the comm may hold spaces and parentheses).
pub(crate) fn parse_stat_flags(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the comm: state ppid pgrp session tty_nr tpgid flags.
    rest.split_whitespace().nth(6)?.parse().ok()
}

const PF_KTHREAD: u64 = 0x0020_0000;

/// What the caller accepts beyond the safe defaults.
#[derive(Clone, Copy, Debug, Default)]
pub struct CheckOptions {
    /// Proceed even under a seccomp filter (the caller knows it allows our calls).
    pub allow_seccomp_filter: bool,
}

fn read(path: String) -> Result<String, PtraceError> {
    std::fs::read_to_string(&path).map_err(|source| PtraceError::Proc { path, source })
}

pub(crate) fn status_of(pid: i32, tid: i32) -> Result<ProcStatus, PtraceError> {
    read(format!("/proc/{pid}/task/{tid}/status")).map(|t| parse_status(&t))
}

/// Checks that `pid` may be stopped and injected into; returns its status.
pub fn check_target(pid: i32, opts: CheckOptions) -> Result<ProcStatus, PtraceError> {
    if let Ok(scope) = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        && scope.trim() == "3"
    {
        return Err(PtraceError::PtraceScopeLocked);
    }
    let text = match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(PtraceError::NoSuchProcess { pid }),
        Err(source) => return Err(PtraceError::Proc { path: format!("/proc/{pid}/status"), source }),
    };
    let st = parse_status(&text);
    let kthread = match st.kthread {
        Some(k) => k,
        None => read(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat_flags(&s))
            .is_some_and(|f| f & PF_KTHREAD != 0),
    };
    if kthread {
        return Err(PtraceError::KernelThread { pid });
    }
    if st.state == 'Z' || st.state == 'X' {
        return Err(PtraceError::Zombie { pid });
    }
    if st.tracer_pid != 0 {
        return Err(already_traced(pid, pid, st.tracer_pid));
    }
    match st.seccomp {
        Some(1) => return Err(PtraceError::SeccompStrict { pid }),
        Some(2) if !opts.allow_seccomp_filter => return Err(PtraceError::SeccompFilter { pid }),
        _ => {}
    }
    Ok(st)
}

pub(crate) fn already_traced(pid: i32, tid: i32, tracer: i32) -> PtraceError {
    let tracer_name = std::fs::read_to_string(format!("/proc/{tracer}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string());
    PtraceError::AlreadyTraced { pid, tid, tracer, tracer_name }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tredis-server\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t812\n\
        Pid:\t812\nTracerPid:\t4711\nUid:\t0\t0\t0\t0\nKthread:\t0\nSeccomp:\t2\n\
        Seccomp_filters:\t1\nSpeculation_Store_Bypass:\tthread vulnerable\n";

    #[test]
    fn status_fields() {
        let st = parse_status(STATUS);
        assert_eq!(st.name, "redis-server");
        assert_eq!(st.state, 'S');
        assert_eq!(st.tracer_pid, 4711);
        assert_eq!(st.seccomp, Some(2));
        assert_eq!(st.kthread, Some(false));
    }

    #[test]
    fn status_without_optional_lines() {
        let st = parse_status("Name:\tx\nState:\tZ (zombie)\nTracerPid:\t0\n");
        assert_eq!((st.state, st.tracer_pid, st.seccomp, st.kthread), ('Z', 0, None, None));
    }

    #[test]
    fn stat_flags_with_hostile_comm() {
        let stat = "42 (a) b (c) S 1 42 42 0 -1 2097152 0 0 0";
        assert_eq!(parse_stat_flags(stat), Some(PF_KTHREAD));
        assert_eq!(parse_stat_flags("garbage"), None);
    }

    #[test]
    fn messages_say_what_to_do() {
        let e = PtraceError::AlreadyTraced { pid: 1, tid: 1, tracer: 9, tracer_name: "gdb".into() };
        assert!(e.to_string().contains("PID 9 (gdb)"));
        assert!(PtraceError::SeccompFilter { pid: 1 }.to_string().contains("may kill it"));
    }
}
