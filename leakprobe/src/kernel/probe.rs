//! Loading, attaching and reading the eBPF side.
//!
//! Nothing here outlives the process: links are owned file descriptors (no pins, no tracefs
//! probes), so the kernel removes every probe when leakprobe exits, however it exits.

use std::{collections::HashMap as StdHashMap, num::NonZeroU32, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, ProgramArray, RingBuf},
    programs::{
        ProgramError, RawTracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
    },
};
use leakprobe_common::{
    FreedBlock, FreedKey, HeapTotal, LiveBlock, LiveKey, MAX_LAYOUTS, MAX_UNWIND_MODULES, SiteCounters,
    SiteKey, Stack, TargetState, UnwindModule, UnwindRow, counter, globals, maps as map_names, target_flag,
};
use thiserror::Error;

use crate::{
    model::{Counters, LiveSummary, Sample},
    target::{
        Mapping,
        allocator::{CXX_WRAPPERS, Hook, Plan},
        target_path,
    },
};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leakprobe"));

#[derive(Debug, Error)]
pub enum ProbeError {
    /// The object failed to load; the verifier log, if any, is in the source.
    #[error("loading the eBPF programs failed")]
    Load {
        #[source]
        source: aya::EbpfError,
    },
    #[error("eBPF program {name} is missing from the object (build mismatch)")]
    MissingProgram { name: &'static str },
    #[error("eBPF program {name} failed to load")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("probe on {function} in {module} failed to attach")]
    Attach {
        function: &'static str,
        module: String,
        #[source]
        source: ProgramError,
    },
    #[error("required probe on {function} in {module} failed to attach: {reason}")]
    RequiredMissing { function: &'static str, module: String, reason: String },
    #[error("cannot read the symbols of {module}: {reason}")]
    Symbols { module: String, reason: String },
    #[error("eBPF map {name} is missing or has the wrong type")]
    MissingMap { name: &'static str },
    #[error("reading eBPF map {name} failed")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// Load-time settings.
#[derive(Clone, Copy, Debug)]
pub struct ProbeConfig {
    pub tgid: u32,
    /// Follow the target's children: each process it forks is traced from its first
    /// instruction, in its parent's layout, and reported in `FORKS`.
    pub follow_children: bool,
    /// Capacity of `TARGETS`: processes traced at once (`--max-processes`).
    pub max_processes: u32,
    /// Capacity of the live-block map: outstanding blocks tracked at once.
    pub max_live: u32,
    /// Capacity of the stack and site maps: distinct stacks / call sites.
    pub max_stacks: u32,
    /// Capacity of the per-thread in-flight maps.
    pub max_threads: u32,
    /// Frames per stack (1..=MAX_STACK_DEPTH).
    pub max_depth: u32,
    /// Capacity of the unwind-row array shared by all modules.
    pub max_unwind_rows: u32,
    /// Mean bytes between sampled allocations; 0 tracks every allocation.
    pub sample_bytes: u64,
    /// Attach programs that do nothing, at every hook's entry (the naive tracer's floor).
    pub noop: bool,
    /// In-process mode: the allocator's code range (start, end), so that its own mmap and
    /// munmap calls are not taken for allocations. `None` otherwise.
    pub allocator_text: Option<(u64, u64)>,
    /// In-process mode: the stub's code range.
    pub stub_text: Option<(u64, u64)>,
}

/// Where the in-process stub's report sites are: the code mapping's file (its
/// `/proc/PID/map_files` entry) and each site's offset in it.
#[derive(Clone, Debug)]
pub struct StubSites {
    pub path: PathBuf,
    pub alloc: u64,
    pub free: u64,
    pub realloc_old: u64,
}

/// One attach attempt, for the report.
#[derive(Clone, Debug)]
pub struct ProbeStatus {
    pub function: &'static str,
    pub module: PathBuf,
    pub required: bool,
    /// None when attached; the reason otherwise.
    pub error: Option<String>,
    /// Set when this function is another name for one already probed (same address); its
    /// calls are reported under that one's name.
    pub alias_of: Option<&'static str>,
    /// Set when the entry probe sits past the start of the function: (offset, why).
    pub placement: Option<(u64, &'static str)>,
    /// A shadowed definition the target's calls do not bind to: its hits are only counted
    /// (`untracked_allocator_calls`), since nothing it allocates can be tracked.
    pub watch_only: bool,
}

impl ProbeStatus {
    pub fn attached(&self) -> bool {
        self.error.is_none()
    }
}

const EXIT_PROGRAM: &str = "alloc_exit";
const CAPTURE_PROGRAM: &str = "capture";
const CAPTURE_PYTHON_PROGRAM: &str = "capture_python";
const CAPTURE_V8_PROGRAM: &str = "capture_v8";
const NOOP_ENTER: &str = "noop_enter";
const EXEC_PROGRAM: &str = "on_exec";
const FORK_PROGRAM: &str = "on_fork";
const NOOP_EXIT: &str = "noop_exit";
const WATCH_PROGRAM: &str = "untracked_enter";

pub struct Probes {
    ebpf: Ebpf,
    pid: NonZeroU32,
    /// The process the next attach calls bind to (the target, or a member of a fleet).
    attach_to: NonZeroU32,
    /// Every link made, by process, so detach can drop them all at once.
    links: Vec<(u32, &'static str, UProbeLinkId)>,
    noop: bool,
    /// In-process mode: modules whose allocation family the stub covers (reached through
    /// the patched GOT). Their family functions, and aliases of them, get no uprobe.
    stubbed: Vec<PathBuf>,
    /// Tears down the links of processes that ended, off the session's path.
    reaper: Option<Reaper>,
}

type Link = aya::programs::uprobe::UProbeLink;

/// One thread that drops links of ended processes, one at a time, and waits while links are
/// being made: the kernel tears a uprobe's perf event down under a lock that every new one
/// needs, for a grace period each.
struct Reaper {
    queue: std::sync::mpsc::Sender<Vec<Link>>,
    attaching: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// While alive, the reaper waits.
struct Hold(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Reaper {
    fn start() -> Reaper {
        use std::sync::atomic::Ordering;
        let (queue, rx) = std::sync::mpsc::channel::<Vec<Link>>();
        let attaching = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let busy = attaching.clone();
        let spawned = std::thread::Builder::new().name("leakprobe-reaper".into()).spawn(move || {
            for links in rx {
                for link in links {
                    while busy.load(Ordering::SeqCst) > 0 {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    drop(link);
                }
            }
        });
        let thread = spawned
            .map_err(|e| tracing::warn!("no reaper thread ({e}): ended processes' links stay until the end"))
            .ok();
        Reaper { queue, attaching, thread }
    }

    /// Drops what is still queued, and waits for it: at detach, when a child of ours holds a
    /// copy of every descriptor, that is quick (the child's exit is the teardown).
    fn finish(self) {
        let Reaper { queue, thread, .. } = self;
        drop(queue);
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    fn send(&self, links: Vec<Link>) {
        // No thread (it could not start): the links stay open until we exit.
        if let Err(std::sync::mpsc::SendError(links)) = self.queue.send(links) {
            std::mem::forget(links);
        }
    }

    fn hold(&self) -> Hold {
        self.attaching.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Hold(self.attaching.clone())
    }
}

impl Probes {
    pub fn load(cfg: ProbeConfig) -> Result<Self, ProbeError> {
        let pid = NonZeroU32::new(cfg.tgid).ok_or(ProbeError::MissingMap { name: map_names::TARGETS })?;
        // Children are followed only where the kernel says where a task's tgid is.
        let task_tgid: u64 = match cfg.follow_children {
            true => super::btf::offset_of("task_struct", &["tgid"]).map_err(|e| ProbeError::Symbols {
                module: super::btf::VMLINUX.into(),
                reason: error_chain(&e),
            })?,
            false => 0,
        };
        let (text_start, text_end) = cfg.allocator_text.unwrap_or((0, 0));
        let (stub_start, stub_end) = cfg.stub_text.unwrap_or((0, 0));
        let (vma_start, vma_end) = super::btf::vma_bounds_offsets();
        let ebpf = EbpfLoader::new()
            .override_global(globals::VMA_START, &vma_start, true)
            .override_global(globals::VMA_END, &vma_end, true)
            .override_global(globals::ALLOCATOR_TEXT_START, &text_start, true)
            .override_global(globals::ALLOCATOR_TEXT_END, &text_end, true)
            .override_global(globals::STUB_TEXT_START, &stub_start, true)
            .override_global(globals::STUB_TEXT_END, &stub_end, true)
            .override_global(globals::TASK_TGID, &task_tgid, true)
            .override_global(globals::MAX_DEPTH, &cfg.max_depth, true)
            .override_global(globals::SAMPLE_BYTES, &cfg.sample_bytes, true)
            .map_max_entries(map_names::UNWIND_ROWS, cfg.max_unwind_rows)
            .map_max_entries(map_names::LIVE, cfg.max_live)
            .map_max_entries(map_names::TARGETS, cfg.max_processes.max(1))
            .map_max_entries(map_names::STACKS, cfg.max_stacks)
            .map_max_entries(map_names::SITES, cfg.max_stacks)
            .map_max_entries(map_names::IN_FLIGHT, cfg.max_threads)
            .map_max_entries(map_names::SITE_OLD, cfg.max_threads)
            .map_max_entries(map_names::WRAPPER_STASH, cfg.max_threads)
            .load(EBPF_OBJECT)
            .map_err(|source| ProbeError::Load { source })?;
        let mut probes = Probes {
            ebpf,
            pid,
            attach_to: pid,
            links: Vec::new(),
            noop: cfg.noop,
            stubbed: Vec::new(),
            reaper: None,
        };
        probes.install_capture()?;
        probes.clear_unwind_modules()?;
        probes.add_target(cfg.tgid, 0, cfg.follow_children)?;
        probes.watch_exec()?;
        if cfg.follow_children {
            probes.watch_forks()?;
        }
        if cfg.sample_bytes > 0 {
            probes.fill_sampling_tables(cfg.sample_bytes)?;
        }
        Ok(probes)
    }

    /// The exponential quantiles for countdowns and the weight curve for estimates.
    fn fill_sampling_tables(&mut self, mean: u64) -> Result<(), ProbeError> {
        use leakprobe_common::sampling::*;
        let name = map_names::EXP_TABLE;
        let mut exp: Array<&mut MapData, u64> =
            Array::try_from(self.ebpf.map_mut(name).ok_or(ProbeError::MissingMap { name })?)
                .map_err(|source| ProbeError::Map { name, source })?;
        for (i, v) in crate::model::sampling::exponential_quantiles(mean, EXP_ENTRIES).into_iter().enumerate()
        {
            exp.set(i as u32, v, 0).map_err(|source| ProbeError::Map { name, source })?;
        }
        let name = map_names::WEIGHT_TABLE;
        let mut w: Array<&mut MapData, u64> =
            Array::try_from(self.ebpf.map_mut(name).ok_or(ProbeError::MissingMap { name })?)
                .map_err(|source| ProbeError::Map { name, source })?;
        for (i, v) in crate::model::sampling::weight_curve().into_iter().enumerate() {
            w.set(i as u32, v, 0).map_err(|source| ProbeError::Map { name, source })?;
        }
        Ok(())
    }

    /// Loads the stack-walking program every entry probe tail-calls.
    fn install_capture(&mut self) -> Result<(), ProbeError> {
        for (slot, program) in [(0, CAPTURE_PROGRAM), (1, CAPTURE_PYTHON_PROGRAM), (2, CAPTURE_V8_PROGRAM)] {
            let fd = self
                .program(program)?
                .fd()
                .map_err(|source| ProbeError::Program { name: program, source })?
                .try_clone()
                .map_err(|e| ProbeError::Program { name: program, source: ProgramError::IOError(e) })?;
            let name = map_names::CAPTURE_PROG;
            let mut slots: ProgramArray<&mut MapData> =
                ProgramArray::try_from(self.ebpf.map_mut(name).ok_or(ProbeError::MissingMap { name })?)
                    .map_err(|source| ProbeError::Map { name, source })?;
            slots.set(slot, &fd, 0).map_err(|source| ProbeError::Map { name, source })?;
        }
        Ok(())
    }

    /// Attaches a raw tracepoint program (no tracefs involved).
    fn attach_raw_tracepoint(&mut self, name: &'static str, tracepoint: &str) -> Result<(), ProbeError> {
        let prog: &mut RawTracePoint = self
            .ebpf
            .program_mut(name)
            .ok_or(ProbeError::MissingProgram { name })?
            .try_into()
            .map_err(|source| ProbeError::Program { name, source })?;
        prog.load().map_err(|source| ProbeError::Program { name, source })?;
        prog.attach(tracepoint).map_err(|source| ProbeError::Program { name, source })?;
        Ok(())
    }

    /// Attaches the exec watcher (sched_process_exec).
    fn watch_exec(&mut self) -> Result<(), ProbeError> {
        self.attach_raw_tracepoint(EXEC_PROGRAM, "sched_process_exec")
    }

    /// Attaches the fork follower (sched_process_fork): it runs on every fork on the machine
    /// and returns at once unless the parent is a followed target.
    fn watch_forks(&mut self) -> Result<(), ProbeError> {
        self.attach_raw_tracepoint(FORK_PROGRAM, "sched_process_fork")
    }

    /// Traces process `tgid` from now on, with the module table of `layout`; `follow`: its
    /// children too. Fails if `TARGETS` is full.
    pub fn add_target(&mut self, tgid: u32, layout: u32, follow: bool) -> Result<(), ProbeError> {
        let name = map_names::TARGETS;
        let mut map: HashMap<&mut MapData, u32, TargetState> =
            HashMap::try_from(self.ebpf.map_mut(name).ok_or(ProbeError::MissingMap { name })?)
                .map_err(|source| ProbeError::Map { name, source })?;
        let flags = if follow { target_flag::FOLLOW } else { 0 };
        let state = TargetState { layout: layout % MAX_LAYOUTS, flags, ..TargetState::default() };
        map.insert(tgid, state, 0).map_err(|source| ProbeError::Map { name, source })
    }

    /// A traced process's state (its heap, drops and flags), if it is in `TARGETS`.
    pub fn target_state(&self, tgid: u32) -> Result<Option<TargetState>, ProbeError> {
        let name = map_names::TARGETS;
        let map: HashMap<&MapData, u32, TargetState> =
            HashMap::try_from(self.map(name)?).map_err(|source| ProbeError::Map { name, source })?;
        match map.get(&tgid, 0) {
            Ok(t) => Ok(Some(t)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(ProbeError::Map { name, source }),
        }
    }

    /// Whether the target has called exec since attach (recording stopped at that moment).
    pub fn target_execed(&self) -> Result<bool, ProbeError> {
        let state = self.target_state(self.pid.get())?;
        Ok(state.is_some_and(|t| t.flags & target_flag::EXECED != 0))
    }

    /// Marks every unwind-module slot of every layout unused (start = i64::MAX keeps each
    /// table sorted).
    fn clear_unwind_modules(&mut self) -> Result<(), ProbeError> {
        for layout in 0..MAX_LAYOUTS {
            self.write_unwind_modules(layout, &[])?;
        }
        self.bump_unwind_gen()
    }

    /// Replaces the target's unwind-module table; `modules` must be sorted by start.
    pub fn set_unwind_modules(&mut self, modules: &[UnwindModule]) -> Result<(), ProbeError> {
        self.set_layout_modules(0, modules)
    }

    /// Replaces layout `layout`'s unwind-module table; `modules` must be sorted by start.
    pub fn set_layout_modules(&mut self, layout: u32, modules: &[UnwindModule]) -> Result<(), ProbeError> {
        // Before and after: a walk that read the table half-changed cached under a
        // generation that is then already gone.
        self.bump_unwind_gen()?;
        self.write_unwind_modules(layout, modules)?;
        self.bump_unwind_gen()
    }

    /// Invalidates the walkers' cached rows (see `maps::UNWIND_GEN`).
    fn bump_unwind_gen(&mut self) -> Result<(), ProbeError> {
        let name = map_names::UNWIND_GEN;
        let mut arr: Array<&mut MapData, u64> =
            Array::try_from(self.ebpf.map_mut(name).ok_or(ProbeError::MissingMap { name })?)
                .map_err(|source| ProbeError::Map { name, source })?;
        let generation = arr.get(&0, 0).map_err(|source| ProbeError::Map { name, source })?;
        arr.set(0, generation.wrapping_add(1), 0).map_err(|source| ProbeError::Map { name, source })
    }

    fn write_unwind_modules(&mut self, layout: u32, modules: &[UnwindModule]) -> Result<(), ProbeError> {
        let name = map_names::UNWIND_MODULES;
        let mut arr: Array<&mut MapData, UnwindModule> =
            Array::try_from(self.ebpf.map_mut(name).ok_or(ProbeError::MissingMap { name })?)
                .map_err(|source| ProbeError::Map { name, source })?;
        // i64::MAX, not u64::MAX: the walker compares with a sign-bit trick valid below 2^63.
        let unused = UnwindModule { start: i64::MAX as u64, end: i64::MAX as u64, ..Default::default() };
        let base = (layout % MAX_LAYOUTS) * MAX_UNWIND_MODULES;
        for i in 0..MAX_UNWIND_MODULES {
            let m = modules.get(i as usize).copied().unwrap_or(unused);
            arr.set(base + i, m, 0).map_err(|source| ProbeError::Map { name, source })?;
        }
        Ok(())
    }

    /// Writes unwind rows at `start` in the shared row array.
    pub fn write_unwind_rows(&mut self, start: u32, rows: &[UnwindRow]) -> Result<(), ProbeError> {
        let name = map_names::UNWIND_ROWS;
        let mut arr: Array<&mut MapData, UnwindRow> =
            Array::try_from(self.ebpf.map_mut(name).ok_or(ProbeError::MissingMap { name })?)
                .map_err(|source| ProbeError::Map { name, source })?;
        for (i, row) in rows.iter().enumerate() {
            arr.set(start + i as u32, *row, 0).map_err(|source| ProbeError::Map { name, source })?;
        }
        Ok(())
    }

    fn program(&mut self, name: &'static str) -> Result<&mut UProbe, ProbeError> {
        let prog: &mut UProbe = self
            .ebpf
            .program_mut(name)
            .ok_or(ProbeError::MissingProgram { name })?
            .try_into()
            .map_err(|source| ProbeError::Program { name, source })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| ProbeError::Program { name, source })?;
        }
        Ok(prog)
    }

    fn attach_one(
        &mut self,
        program: &'static str,
        function: &'static str,
        path: &PathBuf,
        offset: u64,
    ) -> Result<(), ProbeError> {
        let pid = self.attach_to;
        let prog = self.program(program)?;
        let id = prog
            .attach(UProbeAttachLocation::AbsoluteOffset(offset), path, UProbeScope::OneProcess(pid))
            .map_err(|source| ProbeError::Attach { function, module: path.display().to_string(), source })?;
        self.links.push((pid.get(), program, id));
        Ok(())
    }

    /// Attaches `plan` to another process of the session (its links are its own, dropped by
    /// [`Probes::detach_process`]).
    pub fn attach_process(&mut self, pid: u32, plan: &Plan) -> Result<Vec<ProbeStatus>, ProbeError> {
        self.attach_to = NonZeroU32::new(pid).ok_or(ProbeError::MissingMap { name: map_names::TARGETS })?;
        // Ended processes' links wait meanwhile: each teardown holds a kernel lock that
        // attaching needs for a grace period (~0.1 s here), and a new child's first
        // allocations are unseen until its links are made.
        let _hold = self.reaper.as_ref().map(Reaper::hold);
        let out = self.attach(plan);
        self.attach_to = self.pid;
        out
    }

    /// Forgets a process of the session that has ended: its `TARGETS` entry (returned: what it
    /// held at the end), and its links, torn down on a thread of their own.
    pub fn detach_process(&mut self, pid: u32) -> Option<TargetState> {
        let state = self.target_state(pid).ok().flatten();
        let name = map_names::TARGETS;
        if let Some(map) = self.ebpf.map_mut(name)
            && let Ok(mut map) = HashMap::<&mut MapData, u32, TargetState>::try_from(map)
        {
            let _ = map.remove(&pid);
        }
        let (mine, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.links).into_iter().partition(|l| l.0 == pid);
        self.links = rest;
        let owned = self.take_links(mine);
        if !owned.is_empty() {
            self.reaper.get_or_insert_with(Reaper::start).send(owned);
        }
        state
    }

    /// Every process in `TARGETS` (those the fork tracepoint added included).
    pub fn targets(&self) -> Result<Vec<(u32, TargetState)>, ProbeError> {
        let name = map_names::TARGETS;
        let map: HashMap<&MapData, u32, TargetState> =
            HashMap::try_from(self.map(name)?).map_err(|source| ProbeError::Map { name, source })?;
        let mut out = Vec::new();
        for entry in map.iter().take(1 << 16) {
            match entry {
                Ok(kv) => out.push(kv),
                Err(MapError::KeyNotFound) => continue,
                Err(source) => return Err(ProbeError::Map { name, source }),
            }
        }
        out.sort_unstable_by_key(|(t, _)| *t);
        out.dedup_by_key(|(t, _)| *t);
        Ok(out)
    }

    /// The ring the fork tracepoint reports new children on (taken once).
    pub fn take_fork_ring(&mut self) -> Option<RingBuf<MapData>> {
        RingBuf::try_from(self.ebpf.take_map(map_names::FORKS)?).ok()
    }

    fn take_links(
        &mut self,
        links: Vec<(u32, &'static str, UProbeLinkId)>,
    ) -> Vec<aya::programs::uprobe::UProbeLink> {
        let mut owned = Vec::with_capacity(links.len());
        for (_, program, id) in links {
            let link = self
                .ebpf
                .program_mut(program)
                .and_then(|p| <&mut UProbe>::try_from(p).ok())
                .and_then(|p| p.take_link(id).ok());
            if let Some(link) = link {
                owned.push(link);
            }
        }
        owned
    }

    /// Removes every probe from the target. Each uprobe's removal waits for a grace period
    /// (~0.09 s here) and the kernel serializes most of perf-event teardown; dropping the
    /// links on parallel threads still overlaps some of it (21 links: 2.1 s one by one,
    /// 1.8 s in parallel). Idempotent; also run on drop.
    pub fn detach(&mut self) {
        if let Some(r) = self.reaper.take() {
            r.finish();
        }
        let links = std::mem::take(&mut self.links);
        let owned = self.take_links(links);
        // At most 32 threads, however many processes a fleet had.
        let per_thread = owned.len().div_ceil(32).max(1);
        let mut owned = owned;
        std::thread::scope(|s| {
            while !owned.is_empty() {
                let chunk: Vec<_> = owned.drain(..per_thread.min(owned.len())).collect();
                s.spawn(move || drop(chunk));
            }
        });
    }

    fn attach_hooks(
        &mut self,
        hooks: &[&'static Hook],
        module: &Mapping,
        watch_only: bool,
        out: &mut Vec<ProbeStatus>,
    ) -> Result<(), ProbeError> {
        let path = target_path(self.attach_to.get() as i32, &module.path);
        let names: Vec<&str> = hooks.iter().map(|h| h.function).collect();
        let (syms, data) = crate::target::elf::functions(&path, &names).map_err(|e| ProbeError::Symbols {
            module: module.path.display().to_string(),
            reason: error_chain(&e),
        })?;
        let offsets: StdHashMap<String, u64> = syms.iter().map(|(n, s)| (n.clone(), s.offset)).collect();
        // Where inside each function the probes go: on the first instruction the kernel
        // emulates, when what comes before it changes nothing the probe reads (free: past its
        // NULL check). Needs the function's whole body (its symbol size) to check that no
        // branch skips the spot.
        let mut placements: StdHashMap<&'static str, crate::kernel::placement::Placement> = StdHashMap::new();
        for h in hooks {
            let Some(sym) = syms.get(h.function).filter(|s| s.size > 0) else { continue };
            let start = sym.offset as usize;
            let end = start.saturating_add(sym.size.min(1 << 16) as usize).min(data.len());
            let Some(code) = data.get(start..end) else { continue };
            use crate::kernel::placement::{ALL_ARGS, FIRST_ARG, after_null_check, first_emulated};
            let mut p = if h.null_check {
                after_null_check(code, sym.offset)
            } else {
                first_emulated(code, sym.offset, ALL_ARGS)
            };
            if p.offset == 0 && h.null_check {
                p = first_emulated(code, sym.offset, FIRST_ARG);
            }
            placements.insert(h.function, p);
        }
        let mut failed: StdHashMap<&'static str, String> = StdHashMap::new();
        // Aliases share one address (glibc's memalign is aligned_alloc): probe it once, or
        // every call would be seen twice.
        let mut first_at: StdHashMap<u64, &'static str> = StdHashMap::new();
        let mut alias_of: StdHashMap<&'static str, &'static str> = StdHashMap::new();
        for h in hooks {
            match offsets.get(h.function) {
                None => {
                    failed
                        .insert(h.function, format!("{} does not define {}", module.file_name(), h.function));
                }
                Some(off) => {
                    if let Some(first) = first_at.get(off) {
                        alias_of.insert(h.function, first);
                    } else if let Some(to) = (h.entry == "free_enter")
                        .then(|| crate::target::elf::plt_forward(&data, *off))
                        .flatten()
                        .and_then(|name| crate::target::allocator::hooked_free(&name))
                    {
                        // A free that is a bare `jmp free@plt`: seen where it lands, probing
                        // it too would count each call twice. (Allocation forwarders stay
                        // probed: libstdc++'s new[] jumps to new, and the outer kind wins.)
                        alias_of.insert(h.function, to);
                    } else {
                        first_at.insert(*off, h.function);
                    }
                }
            }
        }
        // Returns first, then entry-only hooks (frees), then allocation entries: an entry
        // without its return would leave a stale record, and an allocation seen before its
        // free's probe is live would look leaked.
        let steps = hooks
            .iter()
            .filter(|h| h.exit)
            .map(|h| (EXIT_PROGRAM, h))
            .chain(hooks.iter().filter(|h| !h.exit).map(|h| (h.entry, h)))
            .chain(hooks.iter().filter(|h| h.exit).map(|h| (h.entry, h)));
        // In-process: the stub covers the family here (and, through alias_of, its aliases).
        let stubbed_here = self.stubbed.contains(&module.path);
        let covered =
            |h: &Hook| stubbed_here && crate::inprocess::stub::Func::from_name(h.function).is_some();
        for (program, h) in steps.collect::<Vec<_>>() {
            if failed.contains_key(h.function) || alias_of.contains_key(h.function) || covered(h) {
                continue;
            }
            let Some(&offset) = offsets.get(h.function) else { continue };
            let (program, offset) = match (self.noop, program == EXIT_PROGRAM) {
                _ if watch_only && program == EXIT_PROGRAM => continue,
                _ if watch_only => (WATCH_PROGRAM, offset),
                (false, _) => (program, offset + placements.get(h.function).map_or(0, |p| p.offset)),
                (true, true) => (NOOP_EXIT, offset),
                (true, false) => (NOOP_ENTER, offset),
            };
            if let Err(e) = self.attach_one(program, h.function, &path, offset) {
                failed.insert(h.function, error_chain(&e));
            }
        }
        for h in hooks.iter().filter(|h| !covered(h)) {
            let error = failed.remove(h.function);
            if let (true, false, Some(reason)) = (h.required, watch_only, &error) {
                return Err(ProbeError::RequiredMissing {
                    function: h.function,
                    module: module.path.display().to_string(),
                    reason: reason.clone(),
                });
            }
            out.push(ProbeStatus {
                function: h.function,
                module: module.path.clone(),
                error,
                alias_of: alias_of.get(h.function).copied(),
                placement: placements
                    .get(h.function)
                    .filter(|p| p.offset > 0 && !self.noop && !watch_only)
                    .map(|p| (p.offset, p.note)),
                required: h.required && !watch_only,
                watch_only,
            });
        }
        Ok(())
    }

    /// In-process mode: the family functions of these modules are covered by the stub.
    pub fn set_stubbed_modules(&mut self, modules: Vec<PathBuf>) {
        self.stubbed = modules;
    }

    /// Attaches the programs of the in-process stub's report sites. The free and realloc_old
    /// sites go first, so that no block is reported allocated before its free can be seen.
    pub fn attach_sites(&mut self, sites: &StubSites) -> Result<Vec<ProbeStatus>, ProbeError> {
        let mut out = Vec::new();
        for (program, function, offset) in [
            ("site_free", "free (in-process site)", sites.free),
            ("site_realloc_old", "realloc (in-process site)", sites.realloc_old),
            ("site_alloc", "allocations (in-process site)", sites.alloc),
        ] {
            self.attach_one(program, function, &sites.path, offset)?;
            out.push(ProbeStatus {
                function,
                module: sites.path.clone(),
                required: true,
                error: None,
                alias_of: None,
                placement: None,
                watch_only: false,
            });
        }
        Ok(out)
    }

    /// [`Probes::attach_sites`] for another process of the session (its links are its own).
    pub fn attach_process_sites(
        &mut self,
        pid: u32,
        sites: &StubSites,
    ) -> Result<Vec<ProbeStatus>, ProbeError> {
        self.attach_to = NonZeroU32::new(pid).ok_or(ProbeError::MissingMap { name: map_names::TARGETS })?;
        let _hold = self.reaper.as_ref().map(Reaper::hold);
        let out = self.attach_sites(sites);
        self.attach_to = self.pid;
        out
    }

    /// `run --scan`: stops the target at `exit` (file offset `offset` in `path`) for the scan.
    pub fn attach_exit_stop(&mut self, path: &PathBuf, offset: u64) -> Result<ProbeStatus, ProbeError> {
        self.attach_one("exit_stop", "exit", path, offset)?;
        Ok(ProbeStatus {
            function: "exit",
            module: path.clone(),
            required: true,
            error: None,
            alias_of: None,
            placement: None,
            watch_only: true,
        })
    }

    /// Attaches every hook of the plan, each on the module its name binds to, then the
    /// watchers of shadowed definitions. Fails only if a required one fails.
    pub fn attach(&mut self, plan: &Plan) -> Result<Vec<ProbeStatus>, ProbeError> {
        let mut out = Vec::new();
        for m in &plan.hooks {
            self.attach_hooks(&m.hooks, &m.module, false, &mut out)?;
        }
        if let Some(cxx) = &plan.cxx {
            out.extend(self.attach_cxx(cxx)?);
        }
        if !self.noop {
            for m in &plan.watch {
                self.attach_hooks(&m.hooks, &m.module, true, &mut out)?;
            }
        }
        Ok(out)
    }

    /// The C++ runtime's operator new entries; also used when it is mapped after attach.
    pub fn attach_cxx(&mut self, cxx: &Mapping) -> Result<Vec<ProbeStatus>, ProbeError> {
        let mut out = Vec::new();
        let hooks: Vec<&'static Hook> = CXX_WRAPPERS.iter().collect();
        self.attach_hooks(&hooks, cxx, false, &mut out)?;
        Ok(out)
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, ProbeError> {
        self.ebpf.map(name).ok_or(ProbeError::MissingMap { name })
    }

    pub fn counters(&self) -> Result<Counters, ProbeError> {
        let name = map_names::COUNTERS;
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.map(name)?).map_err(|source| ProbeError::Map { name, source })?;
        let mut c = Counters::default();
        for idx in 0..counter::COUNT {
            let per_cpu = arr.get(&idx, 0).map_err(|source| ProbeError::Map { name, source })?;
            c.0[idx as usize] = per_cpu.iter().sum();
        }
        Ok(c)
    }

    /// The whole tracked heap and its peak, counts in whole allocations.
    fn heap(&self) -> Result<HeapTotal, ProbeError> {
        let name = map_names::HEAP;
        let arr: Array<&MapData, HeapTotal> =
            Array::try_from(self.map(name)?).map_err(|source| ProbeError::Map { name, source })?;
        let h = arr.get(&0, 0).map_err(|source| ProbeError::Map { name, source })?;
        Ok(HeapTotal { count: scaled_count(h.count), peak_count: scaled_count(h.peak_count), ..h })
    }

    /// Reads the maps into a sample. The live-block walk (ages, `min_age_ns`) costs a pair of
    /// syscalls per outstanding block, so it happens only when `read_live` is set.
    pub fn sample(&self, now_ns: u64, min_age_ns: u64, read_live: bool) -> Result<Sample, ProbeError> {
        let name = map_names::SITES;
        let sites_map: HashMap<&MapData, SiteKey, SiteCounters> =
            HashMap::try_from(self.map(name)?).map_err(|source| ProbeError::Map { name, source })?;
        let mut sites = Vec::new();
        for entry in sites_map.iter() {
            match entry {
                Ok((key, c)) => sites.push((key, unscale(c))),
                // Deleted under the iterator (an eviction): skip it.
                Err(MapError::KeyNotFound) => continue,
                Err(source) => return Err(ProbeError::Map { name, source }),
            }
        }

        let heap = self.heap()?;
        if !read_live {
            return Ok(Sample {
                at_ns: now_ns,
                sites,
                live: StdHashMap::new(),
                counters: self.counters()?,
                memory: None,
                heap,
            });
        }
        let name = map_names::LIVE;
        let live_map: HashMap<&MapData, LiveKey, LiveBlock> =
            HashMap::try_from(self.map(name)?).map_err(|source| ProbeError::Map { name, source })?;
        let mut live: StdHashMap<SiteKey, LiveSummary> = StdHashMap::new();
        // A key deleted under the iterator restarts it from the top; bound the walk.
        let limit = live_map.keys().size_hint().1.unwrap_or(usize::MAX);
        for entry in live_map.iter().take(limit.max(1 << 22)) {
            let (_, block) = match entry {
                Ok(kv) => kv,
                Err(MapError::KeyNotFound) => continue,
                Err(source) => return Err(ProbeError::Map { name, source }),
            };
            let key = SiteKey { stack_id: block.stack_id, kind: block.kind, tgid: block.tgid };
            let s = live.entry(key).or_default();
            if s.oldest_ns == 0 || block.timestamp_ns < s.oldest_ns {
                s.oldest_ns = block.timestamp_ns;
            }
            if now_ns.saturating_sub(block.timestamp_ns) >= min_age_ns {
                s.aged_count += block.weight_count;
                s.aged_bytes += block.weight_bytes;
            }
        }
        for s in live.values_mut() {
            s.aged_count = scaled_count(s.aged_count);
        }

        Ok(Sample { at_ns: now_ns, sites, live, counters: self.counters()?, memory: None, heap })
    }

    /// Every outstanding block the kernel tracks in process `tgid` (address, its record), for
    /// the reachability scan. Bounded like [`Probes::sample`]'s walk.
    pub fn live_blocks(&self, tgid: u32) -> Result<Vec<(u64, LiveBlock)>, ProbeError> {
        let name = map_names::LIVE;
        let live_map: HashMap<&MapData, LiveKey, LiveBlock> =
            HashMap::try_from(self.map(name)?).map_err(|source| ProbeError::Map { name, source })?;
        let mut out = Vec::new();
        for entry in live_map.iter().take(1 << 24) {
            match entry {
                Ok((k, b)) if k.tgid == tgid => out.push((k.addr, b)),
                Ok(_) => continue,
                Err(MapError::KeyNotFound) => continue,
                Err(source) => return Err(ProbeError::Map { name, source }),
            }
        }
        // A key deleted under the iterator restarts it from the top: keep each address once.
        out.sort_unstable_by_key(|(a, _)| *a);
        out.dedup_by_key(|(a, _)| *a);
        Ok(out)
    }

    /// Sets entry 0 of the one-entry array map `name` (a configuration or a window).
    fn set_first<T: aya::Pod>(&mut self, name: &'static str, value: &T) -> Result<(), ProbeError> {
        let mut arr: Array<&mut MapData, T> =
            Array::try_from(self.ebpf.map_mut(name).ok_or(ProbeError::MissingMap { name })?)
                .map_err(|source| ProbeError::Map { name, source })?;
        arr.set(0, value, 0).map_err(|source| ProbeError::Map { name, source })
    }

    /// Turns the Python frame walk on for the target's CPython (a zero flavor: off).
    pub fn set_python(&mut self, config: &leakprobe_common::PyConfig) -> Result<(), ProbeError> {
        self.set_first(map_names::PY_CONFIG, config)
    }

    /// Turns the JavaScript frame walk on for the target's V8 (`enabled` 0: off).
    pub fn set_v8(&mut self, config: &leakprobe_common::V8Config) -> Result<(), ProbeError> {
        self.set_first(map_names::V8_CONFIG, config)
    }

    /// Opens a scan's window: from now on every block that leaves the live map is also kept
    /// for the scan ([`Probes::live_blocks_at`]). Call it before stopping the target.
    pub fn open_scan_window(&mut self) -> Result<(), ProbeError> {
        self.drain_freed()?;
        self.set_scan_window(u64::MAX)
    }

    /// Narrows the window to the blocks allocated at or before `at_ns`, the instant the target
    /// was stopped (later blocks cannot be in its picture).
    pub fn narrow_scan_window(&mut self, at_ns: u64) -> Result<(), ProbeError> {
        self.set_scan_window(at_ns.max(1))
    }

    fn set_scan_window(&mut self, upto: u64) -> Result<(), ProbeError> {
        self.set_first(map_names::SCAN_FROM, &upto)
    }

    /// Every block that was live at `at_ns`, the instant the target stopped for a scan: those
    /// still in the live map that were allocated by then, and those that left it since (kept
    /// while the window was open), so that the scan's picture and the tracker agree however
    /// long after the stop this runs. Closes the window and empties what it kept. The second
    /// value counts the blocks taken from what the window kept.
    pub fn live_blocks_at(
        &mut self,
        tgid: u32,
        at_ns: u64,
    ) -> Result<(Vec<(u64, LiveBlock)>, u64), ProbeError> {
        let mut out: Vec<(u64, LiveBlock)> =
            self.live_blocks(tgid)?.into_iter().filter(|(_, b)| b.timestamp_ns <= at_ns).collect();
        // Closed only now: a block the walk above missed had left the map before the walk
        // passed it, so it is kept already.
        self.set_scan_window(0)?;
        let mut put_back = 0;
        for (key, f) in self.drain_freed()? {
            if key.tgid == tgid && f.block.timestamp_ns <= at_ns && at_ns < f.freed_ns {
                out.push((key.addr, f.block));
                put_back += 1;
            }
        }
        // A failed realloc puts its old block back into the live map: it is then in both.
        out.sort_unstable_by_key(|(a, b)| (*a, b.timestamp_ns));
        out.dedup_by_key(|(a, b)| (*a, b.timestamp_ns));
        Ok((out, put_back))
    }

    /// Closes a scan's window without reading it (the scan failed).
    pub fn close_scan_window(&mut self) -> Result<(), ProbeError> {
        self.set_scan_window(0)?;
        self.drain_freed().map(|_| ())
    }

    /// Takes everything a scan's window kept out of its map.
    fn drain_freed(&mut self) -> Result<Vec<(FreedKey, FreedBlock)>, ProbeError> {
        let name = map_names::FREED_SINCE;
        let mut map: HashMap<&mut MapData, FreedKey, FreedBlock> =
            HashMap::try_from(self.ebpf.map_mut(name).ok_or(ProbeError::MissingMap { name })?)
                .map_err(|source| ProbeError::Map { name, source })?;
        let mut kept = Vec::new();
        for entry in map.iter().take(1 << 20) {
            match entry {
                Ok(kv) => kept.push(kv),
                Err(MapError::KeyNotFound) => continue,
                Err(source) => return Err(ProbeError::Map { name, source }),
            }
        }
        for (key, _) in &kept {
            match map.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(ProbeError::Map { name, source }),
            }
        }
        kept.sort_unstable_by_key(|(k, _)| (k.addr, k.timestamp_ns));
        kept.dedup_by_key(|(k, _)| (k.addr, k.timestamp_ns));
        Ok(kept)
    }

    /// Forgets sites that have ended: each one's entry in the site map, only if its counters
    /// are still `expected` (a call since they were read keeps the site). Returns the sites
    /// whose entries were deleted. A call that lands between the check and the delete loses its
    /// own counts (its free is then not counted either, so outstanding figures stay right);
    /// the window is one syscall.
    pub fn evict_sites(&mut self, sites: &[(SiteKey, SiteCounters)]) -> Result<Vec<SiteKey>, ProbeError> {
        let name = map_names::SITES;
        let mut map: HashMap<&mut MapData, SiteKey, SiteCounters> =
            HashMap::try_from(self.ebpf.map_mut(name).ok_or(ProbeError::MissingMap { name })?)
                .map_err(|source| ProbeError::Map { name, source })?;
        let mut gone = Vec::new();
        for (key, expected) in sites {
            match map.get(key, 0) {
                Ok(now) if unscale(now) == *expected => {}
                Ok(_) | Err(MapError::KeyNotFound) => continue,
                Err(source) => return Err(ProbeError::Map { name, source }),
            }
            match map.remove(key) {
                Ok(()) => gone.push(*key),
                Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(ProbeError::Map { name, source }),
            }
        }
        Ok(gone)
    }

    /// Deletes stacks no site uses any more (a later call on one stores it again).
    pub fn evict_stacks(&mut self, ids: &[u64]) -> Result<(), ProbeError> {
        let name = map_names::STACKS;
        let mut stacks: HashMap<&mut MapData, u64, Stack> =
            HashMap::try_from(self.ebpf.map_mut(name).ok_or(ProbeError::MissingMap { name })?)
                .map_err(|source| ProbeError::Map { name, source })?;
        for id in ids {
            match stacks.remove(id) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(ProbeError::Map { name, source }),
            }
        }
        Ok(())
    }

    /// The frames of a stack id, innermost first, and why the walk ended (`stack_end`);
    /// None if the stack was never stored.
    pub fn stack(&self, id: u64) -> Result<Option<CapturedStack>, ProbeError> {
        let name = map_names::STACKS;
        let stacks: HashMap<&MapData, u64, Stack> =
            HashMap::try_from(self.map(name)?).map_err(|source| ProbeError::Map { name, source })?;
        match stacks.get(&id, 0) {
            Ok(s) => {
                let depth = (s.depth as usize).min(s.ips.len());
                let depth_rt = (s.runtime_depth as usize).min(s.runtime.len());
                Ok(Some(CapturedStack {
                    ips: s.ips[..depth].to_vec(),
                    end: s.truncated,
                    runtime: s.runtime[..depth_rt].to_vec(),
                    runtime_end: s.runtime_end,
                }))
            }
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(ProbeError::Map { name, source }),
        }
    }
}

/// A stack as the kernel side captured it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapturedStack {
    /// Return addresses, innermost first.
    pub ips: Vec<u64>,
    /// A `stack_end` value.
    pub end: u32,
    /// The interpreter's frames, innermost first (`py_frame` words, or `js_frame` pairs).
    pub runtime: Vec<u64>,
    /// A `py_end` value.
    pub runtime_end: u32,
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.detach();
    }
}

impl Probes {
    /// Removes the probes without making leakprobe wait for the kernel's teardown, which takes
    /// ~0.09 s per probe here and is serialized in the kernel (a jemalloc target has ~50
    /// links: over 4 s). A forked child holds a copy of every descriptor; ours are then closed
    /// at once (the child still holds them), and the child exits, and its exit is the teardown.
    /// Nothing outlives that child, and killing it only ends it sooner. Returns whether the
    /// teardown went to the background (false: fork failed and it was done here).
    pub fn detach_in_background(self) -> bool {
        let mut fds = [0i32; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            drop(self);
            return false;
        }
        let (read_end, write_end) = (fds[0], fds[1]);
        // SAFETY: the child runs only async-signal-safe calls (close, read, _exit) before it
        // exits; it touches no lock or allocation of the (multi-threaded) parent.
        match unsafe { libc::fork() } {
            0 => unsafe {
                libc::close(write_end);
                // Whoever reads our output (a pipe, a terminal) must not wait for the teardown.
                for fd in 0..3 {
                    libc::close(fd);
                }
                // Wait until the parent has closed its copies (a byte), or has died (EOF).
                let mut byte = 0u8;
                libc::read(read_end, (&raw mut byte).cast(), 1);
                libc::_exit(0)
            },
            pid if pid > 0 => {
                // SAFETY: closing descriptors this function created.
                unsafe { libc::close(read_end) };
                drop(self);
                // SAFETY: a one-byte write to our own pipe, then closing it.
                unsafe {
                    libc::write(write_end, [1u8].as_ptr().cast(), 1);
                    libc::close(write_end);
                }
                true
            }
            _ => {
                // SAFETY: closing descriptors this function created.
                unsafe {
                    libc::close(read_end);
                    libc::close(write_end);
                }
                drop(self);
                false
            }
        }
    }
}

/// Counts come from the kernel in 1/COUNT_SCALE units (a sampled block may stand for a
/// fraction of an allocation); whole numbers from here on.
pub fn scaled_count(raw: u64) -> u64 {
    (raw + leakprobe_common::COUNT_SCALE / 2) / leakprobe_common::COUNT_SCALE
}

fn unscale(c: SiteCounters) -> SiteCounters {
    SiteCounters {
        alloc_count: scaled_count(c.alloc_count),
        alloc_bytes: c.alloc_bytes,
        free_count: scaled_count(c.free_count),
        free_bytes: c.free_bytes,
        peak_bytes: c.peak_bytes,
        peak_count: scaled_count(c.peak_count),
        temporary_count: scaled_count(c.temporary_count),
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// CLOCK_MONOTONIC in ns, the clock `bpf_ktime_get_ns` uses.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64);
    ts.unwrap_or(0)
}
