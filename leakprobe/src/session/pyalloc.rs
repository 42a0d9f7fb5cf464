//! CPython's allocator tables pointed at the stub: the MEM and OBJ `PyMemAllocatorEx`
//! function words lead into the stub's CPython entries, so that every block pymalloc serves
//! (most Python objects, which leakprobe would otherwise see only as 1 MiB arena mmaps) is
//! tracked with its stack, in exact mode or sampled by bytes like malloc's.
//!
//! The rules (RUNTIMES.md §2.4): only the 8-byte function words are written, never `ctx`;
//! each stub forwards to the function it replaced with the caller's `ctx`; the stub is
//! lock-free and calls nothing of the interpreter; RAW is left to malloc's own hooks (what
//! pymalloc passes on to malloc is counted once, by them); a table that already holds someone
//! else's functions (tracemalloc, the debug hooks, memray) is left alone, with one line saying
//! so. At detach a word is restored only if it still holds our entry: one wrapped since keeps
//! the stub, switched off, passing every call straight through.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use leakprobe_common::PyConfig;

use crate::{
    inprocess::{
        install::{Installed, Word},
        stub::Func,
    },
    kernel::probe::{ProbeStatus, Probes},
    report,
    runtimes::cpython::{
        Runtime,
        allocators::{Allocators, Domain, find_allocators_in},
    },
};

/// The names of a table's four functions, as the summary shows them.
fn names(d: Domain) -> [&'static str; 4] {
    match d {
        Domain::Mem => ["PyMem_Malloc", "PyMem_Calloc", "PyMem_Realloc", "PyMem_Free"],
        Domain::Obj => ["PyObject_Malloc", "PyObject_Calloc", "PyObject_Realloc", "PyObject_Free"],
        Domain::Raw => ["PyMem_RawMalloc", "PyMem_RawCalloc", "PyMem_RawRealloc", "PyMem_RawFree"],
    }
}

/// The words to point at the stub: MEM's and OBJ's four functions, when both hold pymalloc's
/// own functions. Otherwise why they are left alone (one line).
pub fn words(a: &Allocators, module: &Path) -> Result<Vec<Word>, String> {
    if let Some(w) = a.wrapped {
        return Err(format!(
            "its allocator tables hold {w}'s hooks: left alone, so Python's small objects are not \
             tracked (blocks from malloc are)"
        ));
    }
    if !a.pymalloc {
        return Err("PYTHONMALLOC=malloc: every Python object comes from malloc, tracked already".into());
    }
    let mut out = Vec::new();
    for d in [Domain::Mem, Domain::Obj] {
        let s = a.slot(d);
        let functions = [s.malloc, s.calloc, s.realloc, s.free];
        if s.ctx != 0 || functions != a.default_pymalloc.functions() {
            return Err(format!("its {d} table holds functions other than pymalloc's: left alone"));
        }
        for (k, ((func, name), value)) in Func::PYMEM.into_iter().zip(names(d)).zip(functions).enumerate() {
            out.push(Word {
                module: module.to_path_buf(),
                address: s.addr + 8 * (k as u64 + 1),
                function: name,
                func,
                original: value,
                target: value,
                if_changed: "another allocator was installed meanwhile",
            });
        }
    }
    Ok(out)
}

/// Whether a MEM or OBJ function lies in a stub an earlier leakprobe left mapped.
fn leads_into_an_earlier_stub(pid: i32, a: &Allocators) -> bool {
    let stubs = crate::inprocess::install::stub_ranges(pid);
    [Domain::Mem, Domain::Obj].iter().any(|&d| {
        let s = a.slot(d);
        [s.malloc, s.calloc, s.realloc, s.free].iter().any(|f| stubs.iter().any(|(lo, hi)| lo <= f && f < hi))
    })
}

/// The stub's real functions for `words`: one per function and target.
fn real_of(words: &[Word]) -> Vec<(Func, u64)> {
    let mut out: Vec<(Func, u64)> = Vec::new();
    for w in words {
        if !out.contains(&(w.func, w.target)) {
            out.push((w.func, w.target));
        }
    }
    out
}

/// The hooked tables of a session.
pub struct PyAllocHooks {
    installed: Installed,
    /// The words restored at detach and that pause; `None` until then (or the target ended).
    restored: Option<(usize, Duration)>,
    arena_alloc: Option<(u64, u64)>,
    counters: [u64; crate::inprocess::stub::counter::COUNT],
}

/// What [`PyAllocHooks::install`] did: the hooks (if any), the report sites' probes, and the
/// line to show.
pub struct Installing {
    pub hooks: Option<PyAllocHooks>,
    pub statuses: Vec<ProbeStatus>,
    pub line: String,
    /// Why the tables were left alone, for the report.
    pub left_alone: Option<String>,
}

impl PyAllocHooks {
    /// Finds the tables, maps a stub for them, attaches its report sites and points the
    /// words at it; then tells the kernel side where pymalloc's arena allocator is. Never
    /// fails the session: what went wrong is the line.
    pub fn install(
        runtime: &Runtime,
        config: &PyConfig,
        sample_bytes: u64,
        max_pause: Duration,
        probes: &mut Probes,
    ) -> Installing {
        let left = |why: String| Installing {
            hooks: None,
            statuses: Vec::new(),
            line: format!("CPython {}: {why}", runtime.version),
            left_alone: Some(why),
        };
        let mem = match crate::ptrace::Mem::open(runtime.pid) {
            Ok(m) => m,
            Err(e) => return left(format!("allocator tables not read ({e})")),
        };
        let allocators = match find_allocators_in(runtime, &mem) {
            Ok(a) => a,
            Err(e) => {
                return left(format!("allocator tables not found ({e}): small objects are not tracked"));
            }
        };
        if leads_into_an_earlier_stub(runtime.pid, &allocators) {
            return left(
                "its allocator tables lead into the stub of an earlier leakprobe (switched off, passing \
                 calls on: another tool wrapped them while it was attached, then put it back): left \
                 alone, so Python's small objects are not tracked"
                    .into(),
            );
        }
        let words = match words(&allocators, &runtime.module) {
            Ok(w) => w,
            Err(why) => return left(why),
        };
        let mut installed =
            match Installed::map_stub(runtime.pid, real_of(&words), &[], sample_bytes, max_pause, None) {
                Ok(i) => i,
                Err(e) => return left(format!("allocator tables not hooked: {e:#}")),
            };
        let statuses = match probes.attach_sites(&installed.sites()) {
            Ok(s) => s,
            Err(e) => {
                // Nothing points at the stub: the guard has nothing to restore.
                if let Some(g) = installed.take_guard() {
                    g.disarm();
                }
                return left(format!("allocator tables not hooked: {e}"));
            }
        };
        // Arenas are no sites from now on: set before the words are written, so that no arena
        // mapped once its objects are tracked is counted. (One mapped in between holds objects
        // made before the words led into the stub: untracked, like those from before attach.)
        let arena_alloc = allocators.arena_alloc.as_ref().ok().map(|r| (r.start, r.end));
        if let Some((start, end)) = arena_alloc {
            let cfg = PyConfig { arena_alloc_start: start, arena_alloc_end: end, ..*config };
            if let Err(e) = probes.set_python(&cfg) {
                tracing::warn!("pymalloc's arena allocator not passed to the kernel side: {e}");
            }
        }
        let (written, _) = match installed.patch_words(&words) {
            Ok(w) => w,
            Err(e) => {
                // Arenas are sites again; the guard, dropped with the stub, puts back any word
                // written.
                let _ = probes.set_python(config);
                return left(format!("allocator tables not hooked: {e:#}"));
            }
        };
        let arenas = match &allocators.arena_alloc {
            Ok(_) => String::new(),
            Err(e) => format!("; pymalloc's arenas still show as mmap sites ({e})"),
        };
        // Exact: every object the interpreter makes stops at a probe.
        let exact = if sample_bytes == 0 {
            "\n  exact mode: every Python object made stops at a probe (microseconds each; a busy \
             interpreter runs tens of times slower); under load, use --in-process --sample-bytes 512KiB"
        } else {
            ""
        };
        let line = format!(
            "CPython {}: {written} allocator functions (MEM, OBJ) lead into the stub (target paused {:.1} ms): \
             Python objects are tracked one by one{arenas}{exact}",
            runtime.version,
            installed.summary.map_pause.as_secs_f64() * 1e3
        );
        let hooks = PyAllocHooks { installed, restored: None, arena_alloc, counters: [0; 3] };
        Installing { hooks: Some(hooks), statuses, line, left_alone: None }
    }

    /// Restores the words (unless the target is gone) and keeps the stub's last counters.
    pub fn finish(&mut self, ended_by: &str) {
        let (counters, restored) = self.installed.finish(super::target_gone(ended_by), true);
        self.counters = counters.unwrap_or(self.counters);
        match restored.context("restoring CPython's allocator tables") {
            Ok(r) => self.restored = r,
            Err(e) => crate::say!("leakprobe: warning: {e:#} (the guard process restores them)"),
        }
    }

    pub fn report(&self) -> report::PythonAllocators {
        use crate::inprocess::stub::counter;
        let s = &self.installed.summary;
        let skipped: Vec<_> = s
            .skipped
            .iter()
            .cloned()
            .chain(s.left_at_restore.iter().map(|(m, f, v)| {
                (m.clone(), *f, format!("held {v:#x} at detach (wrapped since): left as it was"))
            }))
            .collect();
        report::PythonAllocators {
            hooked: super::patched_rows(s),
            left_alone: None,
            skipped: super::skipped_rows(&skipped),
            map_pause_ms: s.map_pause.as_secs_f64() * 1e3,
            restore_pause_ms: self.restored.map(|(_, p)| p.as_secs_f64() * 1e3),
            restored: self.restored.map(|(n, _)| n as u64),
            stub_sampled_allocs: self.counters[counter::SAMPLED_ALLOCS as usize],
            stub_sampled_frees: self.counters[counter::SAMPLED_FREES as usize],
            stub_set_full: self.counters[counter::SET_FULL as usize],
            arena_allocator: self.arena_alloc.map(|(a, b)| format!("{a:#x}-{b:#x}")),
            left_in_target: format!(
                "a stub for the allocator tables, switched off (every call passes straight through), at \
                 {:#x} (memfd \"leakprobe-stub\") and {:#x}: {}",
                self.installed.code,
                self.installed.data,
                match s.left_at_restore.len() {
                    0 => "a wrapper installed while attached (tracemalloc.start(), say) may still call it"
                        .to_string(),
                    n => format!("{n} table word(s) wrapped while attached still lead there"),
                },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtimes::cpython::allocators::{Slot, Table, Wrapper};

    fn tables(obj: Table, wrapper: Option<Wrapper>, pymalloc: bool) -> Allocators {
        let raw = Table { ctx: 0, malloc: 0x100, calloc: 0x110, realloc: 0x120, free: 0x130 };
        let pym = Table { ctx: 0, malloc: 0x200, calloc: 0x210, realloc: 0x220, free: 0x230 };
        let slot = |domain, addr, t: Table, wrapper| Slot {
            domain,
            addr,
            ctx: t.ctx,
            malloc: t.malloc,
            calloc: t.calloc,
            realloc: t.realloc,
            free: t.free,
            wrapper,
        };
        Allocators {
            slots: [
                slot(Domain::Raw, 0x1000, raw, None),
                slot(Domain::Mem, 0x1028, pym, None),
                slot(Domain::Obj, 0x1050, obj, wrapper),
            ],
            pymalloc,
            wrapped: wrapper,
            found_by: "test".into(),
            default_raw: raw,
            default_pymalloc: pym,
            arena_alloc: Err("test".into()),
        }
    }

    #[test]
    fn pymalloc_tables_give_their_eight_function_words_never_ctx() {
        let pym = Table { ctx: 0, malloc: 0x200, calloc: 0x210, realloc: 0x220, free: 0x230 };
        let w = words(&tables(pym, None, true), Path::new("/usr/bin/python3.11")).unwrap();
        let got: Vec<(u64, Func, &str, u64)> =
            w.iter().map(|w| (w.address, w.func, w.function, w.original)).collect();
        assert_eq!(
            got,
            vec![
                (0x1030, Func::PyMalloc, "PyMem_Malloc", 0x200),
                (0x1038, Func::PyCalloc, "PyMem_Calloc", 0x210),
                (0x1040, Func::PyRealloc, "PyMem_Realloc", 0x220),
                (0x1048, Func::PyFree, "PyMem_Free", 0x230),
                (0x1058, Func::PyMalloc, "PyObject_Malloc", 0x200),
                (0x1060, Func::PyCalloc, "PyObject_Calloc", 0x210),
                (0x1068, Func::PyRealloc, "PyObject_Realloc", 0x220),
                (0x1070, Func::PyFree, "PyObject_Free", 0x230),
            ]
        );
        assert!(w.iter().all(|w| w.target == w.original));
        // MEM and OBJ forward to the same functions: one stub each.
        assert_eq!(real_of(&w).len(), 4);
    }

    #[test]
    fn tables_someone_else_holds_are_left_alone_with_why() {
        let tm = Table { ctx: 0x9000, malloc: 0x300, calloc: 0x310, realloc: 0x320, free: 0x330 };
        let why = words(&tables(tm, Some(Wrapper::Tracemalloc), true), Path::new("/p")).unwrap_err();
        assert!(why.contains("tracemalloc") && why.contains("left alone"), "{why}");
        let raw = Table { ctx: 0, malloc: 0x100, calloc: 0x110, realloc: 0x120, free: 0x130 };
        let why = words(&tables(raw, None, false), Path::new("/p")).unwrap_err();
        assert!(why.contains("PYTHONMALLOC=malloc"), "{why}");
        // OBJ holds something else that no classifier caught: still not ours to take.
        let odd = Table { ctx: 0, malloc: 0x200, calloc: 0x210, realloc: 0x220, free: 0x999 };
        let why = words(&tables(odd, None, true), Path::new("/p")).unwrap_err();
        assert!(why.contains("OBJ"), "{why}");
    }
}
