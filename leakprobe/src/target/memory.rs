//! The target's resident memory as the kernel accounts it: the other side of the picture from
//! the heap we track, for telling leaks from fragmentation.

use procfs::process::Process;

use crate::model::ProcMemory;

/// RSS from /proc/PID/status, anonymous resident bytes from smaps_rollup (file-backed is the
/// rest of its Rss). None when the process is gone or unreadable.
pub fn read(pid: i32) -> Option<ProcMemory> {
    let proc = Process::new(pid).ok()?;
    let rss = proc.status().ok()?.vmrss? * 1024;
    let (mut anon, mut rollup_rss) = (0, rss);
    if let Some(m) = proc.smaps_rollup().ok().and_then(|r| r.memory_map_rollup.0.into_iter().next()) {
        anon = m.extension.map.get("Anonymous").copied().unwrap_or(0);
        rollup_rss = m.extension.map.get("Rss").copied().unwrap_or(rss);
    }
    Some(ProcMemory { rss, anon, file: rollup_rss.saturating_sub(anon) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_our_own_memory() {
        let m = super::read(std::process::id() as i32).expect("own /proc readable");
        assert!(m.rss > 0 && m.anon > 0 && m.file > 0, "{m:?}");
        assert!(m.anon <= m.rss + 1024 * 1024, "{m:?}");
    }
}
