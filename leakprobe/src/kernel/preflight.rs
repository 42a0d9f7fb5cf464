//! Checks made before anything is loaded or attached: privileges and kernel features.
//! Each failure names what is missing and what to do.

use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PreflightError {
    #[error(
        "missing privileges: {missing} (run as root, or grant CAP_BPF and CAP_PERFMON, \
         or CAP_SYS_ADMIN)"
    )]
    Capabilities { missing: String },
    #[error(
        "this kernel has no BTF ({path} is missing); leakprobe needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf { path: String },
    #[error(
        "this kernel has no uprobe support ({path} is missing); leakprobe needs \
         CONFIG_UPROBE_EVENTS=y"
    )]
    NoUprobes { path: String },
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Parses the effective capability mask from /proc/self/status text.
pub fn effective_caps(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

/// What is missing from `cap_eff` to load BPF and attach uprobes, if anything.
pub fn check_caps(cap_eff: u64) -> Result<(), PreflightError> {
    let has = |c: u32| cap_eff & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    let mut missing = Vec::new();
    if !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    missing.push("(or CAP_SYS_ADMIN)");
    Err(PreflightError::Capabilities { missing: missing.join(", ") })
}

/// Kernel features, looked up under `sys_root` (normally `/sys`).
pub fn check_kernel(sys_root: &Path) -> Result<(), PreflightError> {
    check_btf(sys_root)?;
    check_uprobes(sys_root)
}

/// The kernel's own BTF.
pub fn check_btf(sys_root: &Path) -> Result<(), PreflightError> {
    let btf = sys_root.join("kernel/btf/vmlinux");
    if !btf.exists() {
        return Err(PreflightError::NoBtf { path: btf.display().to_string() });
    }
    Ok(())
}

/// The uprobe PMU (perf_event_open uprobes, no tracefs).
pub fn check_uprobes(sys_root: &Path) -> Result<(), PreflightError> {
    let uprobe = sys_root.join("bus/event_source/devices/uprobe/type");
    if !uprobe.exists() {
        return Err(PreflightError::NoUprobes { path: uprobe.display().to_string() });
    }
    Ok(())
}

/// Both checks, against this process and this kernel.
pub fn check() -> Result<(), PreflightError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    check_caps(effective_caps(&status))?;
    check_kernel(Path::new("/sys"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps() {
        assert!(check_caps(1 << CAP_SYS_ADMIN).is_ok());
        assert!(check_caps((1 << CAP_BPF) | (1 << CAP_PERFMON)).is_ok());
        let err = check_caps(1 << CAP_BPF).unwrap_err().to_string();
        assert!(err.contains("CAP_PERFMON") && !err.contains("CAP_BPF,"), "{err}");
        assert!(check_caps(0).unwrap_err().to_string().contains("CAP_BPF, CAP_PERFMON"));
        assert_eq!(effective_caps("Name:\tx\nCapEff:\t000001ffffffffff\n"), 0x1ff_ffff_ffff);
    }

    #[test]
    fn kernel_features() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(check_kernel(dir.path()), Err(PreflightError::NoBtf { .. })));
        std::fs::create_dir_all(dir.path().join("kernel/btf")).unwrap();
        std::fs::write(dir.path().join("kernel/btf/vmlinux"), b"").unwrap();
        assert!(matches!(check_kernel(dir.path()), Err(PreflightError::NoUprobes { .. })));
        std::fs::create_dir_all(dir.path().join("bus/event_source/devices/uprobe")).unwrap();
        std::fs::write(dir.path().join("bus/event_source/devices/uprobe/type"), b"9").unwrap();
        assert!(check_kernel(dir.path()).is_ok());
    }
}
