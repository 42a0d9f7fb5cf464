//! Placing the stub in a live target and taking it out again, with ptrace alone: no function
//! of the target is ever called.
//!
//! 1. **Map** (one short stop): a memfd created in the target holds the code (uprobes need a
//!    file-backed mapping), mapped read+exec and then closed in the target; an anonymous
//!    read-write mapping holds the data. We keep our own handle on the memfd: the code is
//!    written through it, and the report sites' uprobes name it.
//! 2. The caller attaches the report sites' programs while the target runs.
//! 3. **Patch** (no stop): the [`guard`] (started at step 1) gets the restore list, then
//!    every planned GOT slot and data pointer still holding what the plan saw gets its stub's
//!    entry, free's slots first.
//! 4. **Restore** (on detach, one stop): every slot still holding our entry gets its original
//!    value back and the stub's switch goes off. The stub stays mapped, inert: a function
//!    pointer copied while the slots were patched may still lead into it.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::FileExt as _},
    path::PathBuf,
    time::Duration,
};

use thiserror::Error;

use super::{
    got::{PatchPlan, SlotKind},
    guard::{self, Guard, RestoreList},
    place,
    stub::{self, Func, Stub},
};
use crate::ptrace::{PtraceError, StopOptions, server};

/// Room for the generated code (it is about 3 KiB).
pub const CODE_LEN: u64 = 1 << 16;

#[derive(Debug, Error)]
pub enum InstallError {
    /// Stopping the target, or a system call run inside it, failed.
    #[error("in-process install on PID {pid}: {during}")]
    Ptrace {
        pid: i32,
        during: &'static str,
        #[source]
        source: PtraceError,
    },
    /// The plan has no slot through which the target reaches malloc and free.
    #[error(
        "PID {pid}: no GOT slot reaches {missing}; in-process sampling cannot see its allocations \
         (static executable, or an allocator called without a GOT): use uprobes (leave out \
         --in-process)"
    )]
    NothingToPatch { pid: i32, missing: &'static str },
    /// The code could not be generated.
    #[error("generating the in-process stub")]
    Stub {
        #[source]
        source: stub::StubError,
    },
    /// Our handle on the memfd, or writing through it, failed.
    #[error("writing the stub's code into its memfd ({path})")]
    Memfd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `run --in-process`: the started command could not be handed over held.
    #[error("holding the started command for the install")]
    Hold {
        #[source]
        source: crate::target::launch::LaunchError,
    },
    /// A forked process does not map the stub its parent runs (it called exec since).
    #[error("PID {pid} does not map the stub it was forked with")]
    NotInherited { pid: i32 },
    /// Restoring the slots through /proc/PID/mem failed.
    #[error("restoring the GOT of PID {pid}")]
    Restore {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    /// The guard process could not be started.
    #[error("starting the guard that restores the GOT if leakprobe is killed")]
    Guard {
        #[source]
        source: guard::GuardError,
    },
}

/// What the report says about the install.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Slots patched per module (module, function, count).
    pub patched: Vec<(PathBuf, &'static str, usize)>,
    /// Slots left alone, with why.
    pub skipped: Vec<(PathBuf, &'static str, String)>,
    /// The target's two pauses: mapping the stub, patching the slots.
    pub map_pause: Duration,
    pub patch_pause: Duration,
    /// Slots found holding their original value again and put back (see
    /// [`Installed::repatch_drifted`]).
    pub repatched: u64,
    /// Slots that held something else than our entry at restore (another tool wrapped them
    /// since, or the program stored its own value): left as they were, with what they held.
    pub left_at_restore: Vec<(PathBuf, &'static str, u64)>,
}

/// A word of the target to point at a stub's entry: a GOT slot, a data pointer, or a
/// function word of a runtime's allocator table (CPython's `PyMemAllocatorEx`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Word {
    pub module: PathBuf,
    pub address: u64,
    /// Its name in the summary (`malloc`, `PyObject_Malloc`).
    pub function: &'static str,
    pub func: Func,
    /// What restores it.
    pub original: u64,
    /// Where calls through it must arrive: its stub forwards there.
    pub target: u64,
    /// Why it is left alone if it holds neither `original` nor `target` when it is written.
    pub if_changed: &'static str,
}

impl Word {
    /// The GOT slots and data pointers of `plan` that may be patched; the others go to
    /// `skipped` with why.
    pub fn of_plan(plan: &PatchPlan, skipped: &mut Vec<(PathBuf, &'static str, String)>) -> Vec<Word> {
        let mut out = Vec::new();
        for s in &plan.slots {
            let Some(func) = Func::from_name(s.function) else { continue };
            let (Some(original), Some(target)) = (s.original(), s.target()) else {
                skipped.push((s.module.clone(), s.function, "unresolved slot".into()));
                continue;
            };
            out.push(Word {
                module: s.module.clone(),
                address: s.address,
                function: s.function,
                func,
                original,
                target,
                // A lazy slot bound since planning holds the target, which is fine.
                if_changed: if s.kind == SlotKind::DataPointer {
                    "the program stored another value"
                } else {
                    "changed since planning"
                },
            });
        }
        out
    }
}

/// A word pointing at our stub, and what restores it.
#[derive(Clone, Debug)]
struct Patched {
    address: u64,
    original: u64,
    entry: u64,
    module: PathBuf,
    function: &'static str,
}

impl Patched {
    /// As the guard's restore list has it.
    fn triple(&self) -> (u64, u64, u64) {
        (self.address, self.original, self.entry)
    }
}

/// The stub, mapped in the target.
pub struct Installed {
    pub pid: i32,
    pub code: u64,
    pub data: u64,
    pub stub: Stub,
    /// Our handle on the code's memfd: `/proc/self/fd/N` names it for uprobes.
    memfd: File,
    /// The real function each stub forwards to.
    pub real: Vec<(Func, u64)>,
    /// Every word written.
    patched: Vec<Patched>,
    guard: Option<Guard>,
    /// The target sits in a job-control stop of ours (`run --in-process`) until released.
    held_stopped: bool,
    pub summary: Summary,
    max_pause: Duration,
    /// The sampling period (0: exact).
    sample_bytes: u64,
}

fn ptrace_err(pid: i32, during: &'static str) -> impl FnOnce(PtraceError) -> InstallError {
    move |source| InstallError::Ptrace { pid, during, source }
}

/// One stub per function and real target the plan's slots forward to (`malloc` and
/// `mi_malloc` are two), at most [`stub::MAX_STUBS`].
pub fn choose_real(plan: &PatchPlan) -> Vec<(Func, u64)> {
    let mut out: Vec<(Func, u64)> = Vec::new();
    for s in &plan.slots {
        if let (Some(f), Some(t)) = (Func::from_name(s.function), s.target())
            && !out.contains(&(f, t))
        {
            out.push((f, t));
        }
    }
    out.sort_unstable();
    out.truncate(stub::MAX_STUBS);
    out
}

/// The code of the allocation family in the modules the real functions live in: calls made
/// from there (glibc's reallocarray calling realloc through its GOT) are nested calls.
pub fn family_code(pid: i32, real: &[(Func, u64)]) -> Vec<(u64, u64)> {
    let Ok(maps) = crate::target::exec_mappings(pid) else { return Vec::new() };
    let mut out = Vec::new();
    for m in crate::target::modules_holding(&maps, real.iter().map(|r| r.1)) {
        // A library that is only an allocator (jemalloc, tcmalloc, mimalloc): everything it
        // calls is its own bookkeeping (mimalloc's mi_malloc_aligned frees through its GOT).
        // libc is not: its strdup or fopen allocate for the program, and must be seen.
        if !crate::target::is_libc(&m.file_name()) {
            for x in maps.iter().filter(|x| x.path == m.path) {
                out.push((x.start, x.end));
            }
            continue;
        }
        let path = crate::target::target_path(pid, &m.path);
        let Ok((syms, _)) = crate::target::elf::functions(&path, super::got::FAMILY) else { continue };
        for sym in syms.values().filter(|s| s.size > 0) {
            // The executable mapping of this module that holds the function's file offset.
            if let Some(x) = maps.iter().find(|x| {
                x.path == m.path
                    && x.file_offset <= sym.offset
                    && sym.offset < x.file_offset + (x.end - x.start)
            }) {
                let start = x.start + (sym.offset - x.file_offset);
                if !out.iter().any(|(s, _)| *s == start) {
                    out.push((start, start + sym.size));
                }
            }
        }
    }
    out.sort_unstable();
    out.truncate(stub::MAX_NESTED - 1);
    out
}

impl Installed {
    /// Maps the malloc family's stub (code + data) into `pid`, for the GOT slots of `plan`.
    /// Nothing in the target points at it yet.
    ///
    /// `held`: a command `run` started and holds at its entry point. It is handed over in a
    /// job-control stop once the guard runs (which continues it if we die), and stays stopped
    /// until the caller releases it after patching.
    pub fn map(
        pid: i32,
        plan: &PatchPlan,
        sample_bytes: u64,
        max_pause: Duration,
        held: Option<&mut crate::target::launch::Held>,
        also: &[i32],
    ) -> Result<Installed, InstallError> {
        Installed::map_plan(pid, plan, sample_bytes, max_pause, held, Place::Near(also))
    }

    /// [`Installed::map`] with the code at `code_at` exactly, or an error: every process of a
    /// session runs its stub at one address (the eBPF side knows one stub range).
    pub fn map_at(
        pid: i32,
        plan: &PatchPlan,
        sample_bytes: u64,
        max_pause: Duration,
        code_at: u64,
    ) -> Result<Installed, InstallError> {
        Installed::map_plan(pid, plan, sample_bytes, max_pause, None, Place::At(code_at))
    }

    /// The stubs `plan`'s slots need (malloc and free at least), placed as `spot` says.
    fn map_plan(
        pid: i32,
        plan: &PatchPlan,
        sample_bytes: u64,
        max_pause: Duration,
        held: Option<&mut crate::target::launch::Held>,
        spot: Place<'_>,
    ) -> Result<Installed, InstallError> {
        let real = choose_real(plan);
        for needed in ["malloc", "free"] {
            if !real.iter().any(|(f, _)| Some(*f) == Func::from_name(needed)) {
                return Err(InstallError::NothingToPatch { pid, missing: needed });
            }
        }
        let nested = family_code(pid, &real);
        Installed::map_stub_at(pid, real, &nested, sample_bytes, max_pause, held, spot)
    }

    /// Maps a stub for each of `real` (function, where it forwards) into `pid`. `nested`:
    /// code whose calls into the stubs are the inner part of an outer call (see
    /// [`family_code`]); calls returning into the stub itself always are.
    pub fn map_stub(
        pid: i32,
        real: Vec<(Func, u64)>,
        nested: &[(u64, u64)],
        sample_bytes: u64,
        max_pause: Duration,
        held: Option<&mut crate::target::launch::Held>,
    ) -> Result<Installed, InstallError> {
        Installed::map_stub_at(pid, real, nested, sample_bytes, max_pause, held, Place::Near(&[]))
    }

    /// [`Installed::map_stub`], with the code placed as `spot` says.
    fn map_stub_at(
        pid: i32,
        real: Vec<(Func, u64)>,
        nested: &[(u64, u64)],
        sample_bytes: u64,
        max_pause: Duration,
        held: Option<&mut crate::target::launch::Held>,
        spot: Place<'_>,
    ) -> Result<Installed, InstallError> {
        // The guard first, with nothing to restore yet. Its pipe sits above the probes' perf
        // events (`ptrace::server::move_high`), so it learns of our death before the kernel's
        // slow uprobe teardown (~0.1 s each).
        let held_stopped = held.is_some();
        let guard = Guard::spawn(&RestoreList {
            pid,
            start_ticks: guard::start_ticks(pid).unwrap_or(0),
            held_stopped,
            ..RestoreList::default()
        })
        .map_err(|source| InstallError::Guard { source })?;
        if let Some(h) = held {
            h.detach_stopped().map_err(|source| InstallError::Hold { source })?;
        }
        let opts = StopOptions { max_pause, ..StopOptions::default() };
        let mut world =
            server::World::stop(pid, &opts, false).map_err(ptrace_err(pid, "stopping the target"))?;
        let (code, data, memfd) = {
            let mut rs = world.remote().map_err(ptrace_err(pid, "preparing remote calls"))?;
            let fd = rs
                .memfd_create("leakprobe-stub", libc::MFD_CLOEXEC)
                .map_err(ptrace_err(pid, "memfd_create"))?;
            rs.syscall("ftruncate", libc::SYS_ftruncate, [fd as u64, CODE_LEN, 0, 0, 0, 0])
                .map_err(ptrace_err(pid, "ftruncate of the memfd"))?;
            let targets: Vec<u64> = real.iter().map(|r| r.1).collect();
            let mapped = map_code_and_data(&mut rs, pid, fd, &targets, spot);
            let path = format!("/proc/{pid}/fd/{fd}");
            let memfd = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|source| InstallError::Memfd { path: path.clone(), source });
            // Closed in the target whatever happened: the mapping keeps the file alive.
            let closed = rs.close(fd).map_err(ptrace_err(pid, "closing the memfd in the target"));
            rs.finish().map_err(ptrace_err(pid, "restoring the thread's registers"))?;
            closed?;
            let (code, data) = mapped?;
            (code, data, memfd?)
        };
        let stub = stub::generate(code, data, &real, sample_bytes > 0)
            .map_err(|source| InstallError::Stub { source })?;
        let memfd_path = format!("/proc/self/fd/{}", memfd.as_raw_fd());
        memfd
            .write_all_at(&stub.code, 0)
            .map_err(|source| InstallError::Memfd { path: memfd_path, source })?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        // A call returning into the stub itself is nested too: the real function tail-called
        // another one (glibc's reallocarray jumps to realloc@plt).
        let mut all_nested = vec![(code, code + CODE_LEN)];
        all_nested.extend_from_slice(nested);
        let page = stub::data_page(sample_bytes, &real, &all_nested, seed);
        world
            .mem()
            // The set that follows is all zeros, as the fresh mapping already is: left
            // untouched, it costs the target no resident memory.
            .and_then(|m| m.write_all_at(data, &page[..stub::off::SET as usize]))
            .map_err(ptrace_err(pid, "writing the stub's data"))?;
        let map_pause = world.resume();
        Ok(Installed {
            pid,
            code,
            data,
            stub,
            memfd,
            real,
            patched: Vec::new(),
            guard: Some(guard),
            held_stopped,
            summary: Summary { map_pause, ..Summary::default() },
            max_pause,
            sample_bytes,
        })
    }

    /// Where uprobes go: our memfd handle and each report site's offset in it.
    pub fn sites(&self) -> crate::kernel::probe::StubSites {
        crate::kernel::probe::StubSites {
            path: PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), self.memfd.as_raw_fd())),
            alloc: self.stub.site_alloc - self.code,
            free: self.stub.site_free - self.code,
            realloc_old: self.stub.site_realloc_old - self.code,
        }
    }

    /// The inode of the stub's memfd: a process maps this stub when its mapping at `code` has
    /// it.
    fn memfd_inode(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt as _;
        self.memfd.metadata().ok().map(|m| m.ino())
    }

    /// Whether `pid` maps this very stub (its parent's, inherited across fork).
    pub fn mapped_by(&self, pid: i32) -> bool {
        self.memfd_inode().is_some_and(|ino| mapped_inode(pid, self.code) == Some(ino))
    }

    /// The restore list of `pid`, a process forked from this one (or from one forked from
    /// it): its GOT and data page are copies of ours, at the same addresses.
    fn restore_list_of(&self, pid: i32) -> RestoreList {
        RestoreList {
            pid,
            start_ticks: guard::start_ticks(pid).unwrap_or(0),
            held_stopped: false,
            ..self.restore_list()
        }
    }

    /// A process forked from this one runs the same stub through a copy of the patched GOT:
    /// its own `Installed` for the same words, with a guard of its own. Nothing is written
    /// and nothing stopped.
    pub fn adopt(&self, child: i32) -> Result<Installed, InstallError> {
        if !self.mapped_by(child) {
            return Err(InstallError::NotInherited { pid: child });
        }
        let memfd = self.memfd.try_clone().map_err(|source| InstallError::Memfd {
            path: format!("/proc/self/fd/{}", self.memfd.as_raw_fd()),
            source,
        })?;
        let guard =
            Guard::spawn(&self.restore_list_of(child)).map_err(|source| InstallError::Guard { source })?;
        self.reseed(child)?;
        Ok(Installed {
            pid: child,
            code: self.code,
            data: self.data,
            stub: self.stub.clone(),
            memfd,
            real: self.real.clone(),
            patched: self.patched.clone(),
            guard: Some(guard),
            held_stopped: false,
            summary: Summary { patched: self.summary.patched.clone(), ..Summary::default() },
            max_pause: self.max_pause,
            sample_bytes: self.sample_bytes,
        })
    }

    /// Sampled mode: a forked child's copy of the data page holds its parent's countdowns and
    /// draws, so every child would sample at the same bytes as its siblings (their estimates
    /// would err together). It gets draws and countdowns of its own.
    fn reseed(&self, child: i32) -> Result<(), InstallError> {
        if self.sample_bytes == 0 {
            return Ok(());
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ (child as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let page = stub::data_page(self.sample_bytes, &self.real, &[], seed);
        let exp = stub::off::EXP as usize..stub::off::EXP as usize + 8 * stub::EXP_ENTRIES as usize;
        let countdowns = stub::off::COUNTDOWN as usize
            ..stub::off::COUNTDOWN as usize
                + (stub::COUNTDOWN_SLOTS * stub::COUNTDOWN_STRIDE as u64) as usize;
        let mem = crate::ptrace::Mem::open(child).map_err(ptrace_err(child, "opening its memory"))?;
        for r in [exp, countdowns] {
            mem.write_all_at(self.data + r.start as u64, &page[r])
                .map_err(ptrace_err(child, "writing its own sampling draws"))?;
        }
        Ok(())
    }

    /// Puts back the GOT of `child`, forked from this one, that will not be traced: it must
    /// not keep running our stub. Written while it runs, as the guard would.
    pub fn restore_inherited(&self, child: i32) -> Result<usize, InstallError> {
        if !self.mapped_by(child) {
            return Ok(0);
        }
        guard::restore(&self.restore_list_of(child))
            .map_err(|source| InstallError::Restore { pid: child, source })
    }

    /// The code's address range in the target.
    pub fn code_range(&self) -> (u64, u64) {
        (self.code, self.code + CODE_LEN)
    }

    /// Our own memory in the target, data page and code: never a root of a scan.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        vec![(self.data, self.data + super::stub::DATA_SIZE), self.code_range()]
    }

    /// Points the plan's GOT slots and data pointers at the stubs. Additive: slots already
    /// patched are left as they are, so a new plan after a dlopen patches only the new
    /// module's slots. Returns the slots written and the time they took.
    pub fn patch(&mut self, plan: &PatchPlan) -> Result<(usize, Duration), InstallError> {
        let mut skipped = Vec::new();
        let words = Word::of_plan(plan, &mut skipped);
        self.summary.skipped.extend(skipped);
        self.patch_words(&words)
    }

    /// Points `words` at their stubs, after handing the guard the list that restores them.
    /// Words already patched are left as they are.
    pub fn patch_words(&mut self, words: &[Word]) -> Result<(usize, Duration), InstallError> {
        let pid = self.pid;
        let stub_of: HashMap<(Func, u64), usize> =
            self.real.iter().copied().enumerate().map(|(i, v)| (v, i)).collect();
        let done: std::collections::HashSet<u64> = self.patched.iter().map(|p| p.address).collect();
        // Which words to write, with what; judged again against their values when written.
        let mut wanted = Vec::new();
        for w in words.iter().filter(|w| !done.contains(&w.address)) {
            let Some(entry) = stub_of.get(&(w.func, w.target)).and_then(|i| self.stub.entry_at(*i)) else {
                self.summary.skipped.push((
                    w.module.clone(),
                    w.function,
                    format!(
                        "binds to {:#x}, which has no stub (more than {} targets)",
                        w.target,
                        stub::MAX_STUBS
                    ),
                ));
                continue;
            };
            wanted.push((w, entry));
        }
        let list = RestoreList {
            slots: self
                .patched
                .iter()
                .map(Patched::triple)
                .chain(wanted.iter().map(|(w, entry)| (w.address, w.original, *entry)))
                .collect(),
            ..self.restore_list()
        };
        if let Some(g) = self.guard.as_mut() {
            g.update(&list).map_err(|source| InstallError::Guard { source })?;
        }

        // Written while the target runs, without a stop (at 64 busy threads on 2 cores a stop
        // took 20 ms here): an aligned 8-byte store through /proc/PID/mem is seen whole, so a
        // call through a slot reaches either the real function or the stub, both correct.
        // Frees first, then reallocs: once an allocation slot leads into the stub, every free
        // and realloc slot already does, so no block the stub reports changes unseen.
        let mem = crate::ptrace::Mem::open(pid).map_err(ptrace_err(pid, "opening its memory"))?;
        let t0 = std::time::Instant::now();
        wanted.sort_by_key(|(w, _)| match w.func {
            Func::Free | Func::PyFree => 0,
            Func::Realloc | Func::Reallocarray | Func::PyRealloc => 1,
            _ => 2,
        });
        let mut counts: BTreeMap<(PathBuf, &'static str), usize> = BTreeMap::new();
        let mut restore = Vec::new();
        for (w, entry) in wanted {
            let cur = match mem.read_u64(w.address) {
                Ok(v) => v,
                Err(e) => {
                    self.summary.skipped.push((w.module.clone(), w.function, format!("unreadable: {e}")));
                    continue;
                }
            };
            // A lazy slot bound since planning holds the target now; restore that.
            if cur != w.original && cur != w.target {
                self.summary.skipped.push((w.module.clone(), w.function, w.if_changed.into()));
                continue;
            }
            if let Err(e) = mem.write_all_at(w.address, &entry.to_le_bytes()) {
                self.summary.skipped.push((w.module.clone(), w.function, format!("not writable: {e}")));
                continue;
            }
            restore.push(Patched {
                address: w.address,
                original: cur,
                entry,
                module: w.module.clone(),
                function: w.function,
            });
            *counts.entry((w.module.clone(), w.function)).or_default() += 1;
        }
        // Not a pause: the time the slots took to write, one after the other.
        let pause = t0.elapsed();
        let written = restore.len();
        if self.patched.is_empty() {
            self.summary.patch_pause = pause;
        }
        self.patched.extend(restore);
        // The guard restores exactly what was written (lazy slots bound meanwhile included).
        let list = self.restore_list();
        if let Some(g) = self.guard.as_mut() {
            g.update(&list).map_err(|source| InstallError::Guard { source })?;
        }
        for ((m, f), n) in counts {
            self.summary.patched.push((m, f, n));
        }
        // Said once per slot, however many plans saw it.
        let mut seen = std::collections::HashSet::new();
        self.summary.skipped.retain(|k| seen.insert(k.clone()));
        Ok((written, pause))
    }

    /// What the guard restores now.
    fn restore_list(&self) -> RestoreList {
        RestoreList {
            pid: self.pid,
            start_ticks: guard::start_ticks(self.pid).unwrap_or(0),
            slots: self.patched.iter().map(Patched::triple).collect(),
            enabled_at: self.data + stub::off::ENABLED as u64,
            code_at: self.code,
            held_stopped: self.held_stopped,
            ..RestoreList::default()
        }
    }

    /// The held target was continued (`run --in-process`): a guard that restores need not.
    pub fn held_released(&mut self) -> Result<(), InstallError> {
        if !std::mem::take(&mut self.held_stopped) {
            return Ok(());
        }
        let list = self.restore_list();
        match self.guard.as_mut() {
            Some(g) => g.update(&list).map_err(|source| InstallError::Guard { source }),
            None => Ok(()),
        }
    }

    /// Module paths with at least one slot patched.
    pub fn patched_modules(&self) -> std::collections::BTreeSet<PathBuf> {
        self.summary.patched.iter().map(|(m, _, _)| m.clone()).collect()
    }

    /// The guard, for a caller that knows nothing is left to restore (the target exited).
    pub fn take_guard(&mut self) -> Option<Guard> {
        self.patched.clear();
        self.guard.take()
    }

    /// Puts our entry back into patched slots that lost it to their original value: a lazy
    /// bind racing the patch (the loader writes the slot after we did), or the program
    /// storing the function into a data pointer again. Slots holding anything else are left
    /// alone. Returns how many were put back.
    pub fn repatch_drifted(&mut self) -> usize {
        let Ok(mem) = crate::ptrace::Mem::open(self.pid) else { return 0 };
        let real: std::collections::HashSet<u64> = self.real.iter().map(|(_, a)| *a).collect();
        let mut n = 0;
        for p in &self.patched {
            let (addr, original, entry) = p.triple();
            match mem.read_u64(addr) {
                Ok(v) if v == entry => {}
                Ok(v)
                    if (v == original || real.contains(&v))
                        && mem.write_all_at(addr, &entry.to_le_bytes()).is_ok() =>
                {
                    n += 1
                }
                _ => {}
            }
        }
        self.summary.repatched += n as u64;
        n
    }

    /// At the session's end: the stub's last counters (if readable), then every word
    /// restored; if the target is gone (exited, or another program after exec), the guard is
    /// told there is nothing to do. `Ok(None)`: nothing restored, the target is gone.
    ///
    /// `stop`: in one stop of the target. Without (a process another tracer of ours holds,
    /// the follower), written while it runs, as the guard would; the words then stay listed,
    /// for [`Installed::restore_inherited`] of children forked before.
    #[allow(clippy::type_complexity)]
    pub fn finish(
        &mut self,
        target_gone: bool,
        stop: bool,
    ) -> (Option<[u64; stub::counter::COUNT]>, Result<Option<(usize, Duration)>, InstallError>) {
        let counters = self.counters().ok();
        if target_gone {
            if let Some(g) = self.take_guard() {
                g.disarm();
            }
            return (counters, Ok(None));
        }
        if stop {
            return (counters, self.restore().map(Some));
        }
        let t0 = std::time::Instant::now();
        let restored = guard::restore(&self.restore_list())
            .map_err(|source| InstallError::Restore { pid: self.pid, source });
        if restored.is_ok()
            && let Some(g) = self.guard.take()
        {
            g.disarm();
        }
        (counters, restored.map(|n| Some((n, t0.elapsed()))))
    }

    /// Slots currently pointing at the stub.
    pub fn patched_slots(&self) -> usize {
        self.patched.len()
    }

    /// The stub's counters, read while the target runs.
    pub fn counters(&self) -> Result<[u64; stub::counter::COUNT], PtraceError> {
        let mem = crate::ptrace::Mem::open(self.pid)?;
        let mut buf = vec![0u8; stub::off::COUNTERS as usize + 8 * stub::counter::COUNT];
        mem.read_exact_at(self.data, &mut buf)?;
        Ok(stub::counters(&buf))
    }

    /// Puts every slot back and switches the stub off (one stop), then disarms the guard.
    /// Returns the slots restored and the pause.
    pub fn restore(&mut self) -> Result<(usize, Duration), InstallError> {
        let pid = self.pid;
        let opts = StopOptions { max_pause: self.max_pause, ..StopOptions::default() };
        // After an exec the memory is another program's: nothing of ours is left to restore.
        if !guard::stub_mapped(pid, self.code) {
            self.patched.clear();
            if let Some(g) = self.guard.take() {
                g.disarm();
            }
            return Ok((0, Duration::ZERO));
        }
        let world = server::World::stop(pid, &opts, false)
            .map_err(ptrace_err(pid, "stopping the target to restore"))?;
        let mem = world.mem().map_err(ptrace_err(pid, "opening its memory"))?;
        let mut restored = 0;
        for p in &self.patched {
            let (addr, original, entry) = p.triple();
            match mem.read_u64(addr) {
                Ok(v) if v == entry => {
                    if mem.write_all_at(addr, &original.to_le_bytes()).is_ok() {
                        restored += 1;
                    }
                }
                // Put back meanwhile (a lazy bind), or unreadable: nothing to say.
                Ok(v) if v == original => {}
                Err(_) => {}
                Ok(v) => self.summary.left_at_restore.push((p.module.clone(), p.function, v)),
            }
        }
        let off = mem.write_all_at(self.data + stub::off::ENABLED as u64, &0u64.to_le_bytes());
        let pause = world.resume();
        off.map_err(ptrace_err(pid, "switching the stub off"))?;
        self.patched.clear();
        if let Some(g) = self.guard.take() {
            g.disarm();
        }
        Ok((restored, pause))
    }
}

/// The inode of the stub mapping `pid` has at `code`, if any.
fn mapped_inode(pid: i32, code: u64) -> Option<u64> {
    stub_inode_in(&std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?, code)
}

/// The address ranges of every stub code mapping (ours, or an earlier leakprobe's) in
/// `pid`: empty if there is none or /proc cannot say.
pub fn stub_ranges(pid: i32) -> Vec<(u64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter(|l| l.contains("leakprobe-stub"))
        .filter_map(|l| {
            let (lo, hi) = l.split_whitespace().next()?.split_once('-')?;
            Some((u64::from_str_radix(lo, 16).ok()?, u64::from_str_radix(hi, 16).ok()?))
        })
        .collect()
}

/// The inode of the stub mapping starting at `code` in a `/proc/PID/maps` listing.
fn stub_inode_in(maps: &str, code: u64) -> Option<u64> {
    maps.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let start = f.next()?.split('-').next()?;
        (u64::from_str_radix(start, 16).ok()? == code && l.contains("leakprobe-stub"))
            .then(|| f.nth(3)?.parse().ok())?
    })
}

/// Where the stub's code goes.
#[derive(Clone, Copy, Debug)]
enum Place<'a> {
    /// Near the real functions, at a spot free in the target and in these processes too (the
    /// others of a session, whose stubs must be at the same address), else anywhere.
    Near(&'a [i32]),
    /// There, or nowhere.
    At(u64),
}

/// Maps the stub's code (from the memfd `fd`) and its data in the target, the code placed as
/// `spot` says. On an error nothing stays mapped.
fn map_code_and_data(
    rs: &mut server::Remote<'_>,
    pid: i32,
    fd: i32,
    targets: &[u64],
    spot: Place<'_>,
) -> Result<(u64, u64), InstallError> {
    // Private: the kernel puts no uprobe in a shared mapping (valid_vma refuses
    // VM_MAYSHARE). Until a page is copied on write it shows the memfd's page cache,
    // so our writes through the memfd are what the target runs.
    let prot = libc::PROT_READ | libc::PROT_EXEC;
    let fixed = libc::MAP_PRIVATE | libc::MAP_FIXED_NOREPLACE;
    let code = match spot {
        Place::At(at) => rs
            .mmap(at, CODE_LEN, prot, fixed, fd, 0)
            .map_err(ptrace_err(pid, "mapping the stub's code where the session's other stubs are"))?,
        // Near the real functions when a spot is free (a direct jump passes calls on);
        // anywhere otherwise, or if the spot was taken meanwhile.
        Place::Near(also) => match place::near_spot(
            &place::Layout::union(std::iter::once(layout(pid)).chain(also.iter().map(|p| layout(*p)))),
            targets,
            CODE_LEN,
        )
        .and_then(|at| rs.mmap(at, CODE_LEN, prot, fixed, fd, 0).ok())
        {
            Some(at) => at,
            None => rs
                .mmap(0, CODE_LEN, prot, libc::MAP_PRIVATE, fd, 0)
                .map_err(ptrace_err(pid, "mapping the stub's code"))?,
        },
    };
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    match rs.mmap(0, stub::DATA_SIZE, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) {
        Ok(data) => Ok((code, data)),
        Err(e) => {
            let _ = rs.munmap(code, CODE_LEN);
            Err(ptrace_err(pid, "mapping the stub's data")(e))
        }
    }
}

/// The target's mappings and heap room for [`place::near_spot`]; empty (so: no spot) if
/// /proc cannot say.
fn layout(pid: i32) -> place::Layout {
    let Ok(proc) = procfs::process::Process::new(pid) else { return place::Layout::default() };
    let Ok(maps) = proc.maps() else { return place::Layout::default() };
    let mut heap_end = None;
    let regions: Vec<place::Region> = maps
        .iter()
        .map(|m| {
            let kind = &m.pathname;
            if matches!(kind, procfs::process::MMapPath::Heap) {
                heap_end = Some(m.address.1);
            }
            place::Region {
                start: m.address.0,
                end: m.address.1,
                grows_down: matches!(kind, procfs::process::MMapPath::Stack),
            }
        })
        .collect();
    let brk =
        proc.stat().ok().and_then(|s| s.start_brk).map(|start| (start, heap_end.unwrap_or(start).max(start)));
    let min_addr = std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65536);
    if regions.is_empty() {
        return place::Layout::default();
    }
    place::Layout { regions, brk, min_addr }
}

#[cfg(test)]
mod tests {
    use super::stub_inode_in;

    #[test]
    fn the_stub_mapping_is_known_by_its_address_and_its_name() {
        let maps = "\
003ef000-003ff000 r-xp 00000000 00:01 4242                       /memfd:leakprobe-stub (deleted)
7f0000000000-7f0000010000 r-xp 00000000 00:01 77                         /memfd:leakprobe-stub (deleted)
7f0000020000-7f0000030000 r-xp 00000000 08:01 99                         /usr/lib/libc.so.6
";
        assert_eq!(stub_inode_in(maps, 0x3ef000), Some(4242));
        assert_eq!(stub_inode_in(maps, 0x7f0000000000), Some(77));
        // Another file at that address is not ours; nothing at an address is nothing.
        assert_eq!(stub_inode_in(maps, 0x7f0000020000), None);
        assert_eq!(stub_inode_in(maps, 0x1000), None);
    }
}
