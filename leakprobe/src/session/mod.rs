//! One tracing session: attach, sample every interval, stop, detach, report.
//! Data flows one way: probe -> model -> report.

mod fleet;
pub mod inspector;
mod js_heap;
mod live;
mod pyalloc;
mod python;
mod scan;
mod v8;

use std::{
    collections::HashMap, io::Write as _, os::fd::OwnedFd, path::PathBuf, process::Child, time::SystemTime,
};

use anyhow::Context as _;
use leakprobe_common::SiteKey;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use crate::{
    cli::{Config, Format, Mode, ReportFormat, Unwind},
    inprocess::guard::{self, Guard, RestoreList},
    kernel::{
        preflight,
        probe::{ProbeConfig, ProbeStatus, Probes, monotonic_ns},
        unwind,
    },
    model::{SiteStats, Totals, Tracker, total_drops},
    report::{self, text::human_bytes},
    symbolize::{Frame, Symbolizer},
    target::{self, Identity, TargetError, allocator, launch},
};

/// Loads rows for modules not seen yet and republishes the target's module table.
fn sync_unwind(
    cfg: &Config,
    probes: &mut Probes,
    loaded: &mut unwind::Loaded,
    pid: i32,
    layout: u32,
) -> anyhow::Result<()> {
    if cfg.unwind == Unwind::Fp {
        return Ok(()); // no rows: every frame follows frame pointers
    }
    let capacity = cfg.max_unwind_rows;
    let maps = target::exec_mappings(pid)?;
    if maps.is_empty() {
        return Ok(()); // gone: keep the last table
    }
    let (mut tables, mut rows_written) = (0usize, 0usize);
    let modules = loaded.sync(pid, &maps, capacity, |at, rows| {
        tables += 1;
        rows_written += rows.len();
        crate::progress::message(format!("loading unwind tables: {tables} modules, {rows_written} rows"));
        probes.write_unwind_rows(at, rows)
    })?;
    if modules.len() > leakprobe_common::MAX_UNWIND_MODULES as usize {
        tracing::warn!(
            "{} executable mappings; only the first {} are unwound",
            modules.len(),
            leakprobe_common::MAX_UNWIND_MODULES
        );
    }
    probes.set_layout_modules(layout, &modules)?;
    Ok(())
}

/// How a session ended, for the exit status.
pub struct Outcome {
    /// What --fail-on-leak judges: outstanding bytes, or with --scan definitely lost bytes.
    pub outstanding_bytes: u64,
    pub fail_on_leak: Option<u64>,
    /// The exit status when the gate trips.
    pub exit_code: u8,
    /// What the gate judged: "definitely lost" (a scan) or "outstanding growth".
    pub judged: &'static str,
    /// Suppressed sites were left out of the figure.
    pub suppressed: bool,
}

/// The scans of a session (`--scan`, `--scan-every`) and the last result.
struct Scanner {
    every: Option<std::time::Duration>,
    /// Seconds since attach of the last periodic scan.
    last_at: f64,
    history: Vec<report::scan::ScanPoint>,
    last: Option<scan::Done>,
    /// `run --scan`: the target is stopped at exit() by our probe.
    at_exit: bool,
    /// The pid, our own memory in the target, the pause bound, glibc or not, the heap walk,
    /// and where exit() is.
    setup: scan::Setup,
    /// `--census`: the heap walk's findings go into the report (on glibc the walk always runs:
    /// untracked chunks are blocks, so holders are followed through them).
    census_report: bool,
    /// `run --scan`: continues the target if leakprobe dies while it is stopped at exit().
    exit_guard: Option<Guard>,
}

impl Scanner {
    /// Our own memory in the target: never a root.
    fn exclude(inproc: &Option<InProcess>) -> Vec<(u64, u64)> {
        inproc.as_ref().map(|i| i.installed.ranges()).unwrap_or_default()
    }

    /// A member's setup: the first's, with its own pid, memory of ours and allocator.
    fn setup_for(&self, m: &fleet::ScanMember<'_>) -> scan::Setup {
        let first = m.pid == self.setup.pid as u32;
        let plan = m.plan;
        scan::Setup {
            pid: m.pid as i32,
            exclude: if first { self.setup.exclude.clone() } else { m.exclude.clone() },
            glibc: plan.allocator == allocator::AllocatorKind::Glibc,
            census: census_version(plan).ok(),
            // exit() stops only the first (`run --scan`).
            function_entries: if first { self.setup.function_entries.clone() } else { Vec::new() },
            allocator_module: allocator_module(plan, m.exe),
            python_objects: m.python,
            ..self.setup.clone()
        }
    }

    /// Several processes: each running member in turn, lent by the follower for its stop.
    fn scan_each(
        &mut self,
        cfg: &Config,
        probes: &mut Probes,
        at_s: f64,
        stacks: &StackCache,
        symbolizer: &mut Symbolizer,
        fleet: &mut fleet::Fleet,
    ) -> anyhow::Result<scan::Done> {
        let python_code = stacks.python.as_ref().map_or_else(Vec::new, |p| p.names.code_at());
        let setups: Vec<scan::Setup> =
            fleet.scan_members(&python_code).iter().map(|m| self.setup_for(m)).collect();
        let between = |pid: u32, before: bool| {
            let line = if before { fleet.lend(pid) } else { fleet.take_back(pid) };
            if let Some(line) = line {
                progress(cfg, format_args!("{line}"));
            }
        };
        scan::run_each(setups, probes, at_s, &mut self.history, stacks, symbolizer, between)
    }

    fn scan(
        &mut self,
        cfg: &Config,
        probes: &mut Probes,
        at_s: f64,
        stacks: &StackCache,
        symbolizer: &mut Symbolizer,
        fleet: Option<&mut fleet::Fleet>,
    ) {
        let result = match fleet {
            Some(f) => self.scan_each(cfg, probes, at_s, stacks, symbolizer, f),
            None => {
                crate::progress::spinner(format!(
                    "scanning PID {}'s memory for pointers{}",
                    self.setup.pid,
                    if self.setup.census.is_some() { " and walking its heap" } else { "" }
                ));
                let r = scan::run(&self.setup, probes, at_s, &mut self.history, stacks, symbolizer);
                crate::progress::done();
                r
            }
        }
        .map(|mut done| {
            if !self.census_report {
                done.scan.census = None;
            }
            done
        });
        match result {
            Ok(mut done) => {
                if let (Some(now), Some(prev)) = (
                    done.scan.python_objects.as_mut(),
                    self.last.as_ref().and_then(|l| l.scan.python_objects.as_ref()),
                ) {
                    now.set_changes(prev);
                }
                let s = &done.scan;
                progress(
                    cfg,
                    format_args!(
                        "scan: {} blocks in {:.0} ms ({} {:.1} ms{}): {} definitely lost, {} indirectly, \
                         {} possibly, {} reachable",
                        s.blocks_scanned,
                        s.duration_ms,
                        match s.processes.len() {
                            0 => "target paused".to_string(),
                            n => format!("{n} processes, each paused at most"),
                        },
                        s.pause_ms,
                        if s.method == "clone" { String::new() } else { format!(", {}", s.method) },
                        human_bytes(s.totals.definitely_lost.bytes),
                        human_bytes(s.totals.indirectly_lost.bytes),
                        human_bytes(s.totals.possibly_lost.bytes),
                        human_bytes(s.totals.reachable.bytes),
                    ),
                );
                self.last = Some(done);
            }
            Err(e) => progress(cfg, format_args!("scan failed, the target runs on untouched: {e:#}")),
        }
        self.last_at = at_s;
    }
}

/// The allocator's module for a scan, unless it is the executable: a static executable's own
/// data holds the program's globals too.
fn allocator_module(plan: &allocator::Plan, exe: &str) -> Option<String> {
    (plan.module.path.as_os_str() != exe).then(|| plan.module.path.to_string_lossy().into_owned())
}

/// `--census`: the target's glibc version, or why there is no census.
fn census_version(plan: &allocator::Plan) -> Result<crate::scan::census::GlibcVersion, Refused> {
    if plan.allocator != allocator::AllocatorKind::Glibc {
        return Err(Refused(format!(
            "--census walks glibc's heap; this target's malloc is {}'s: census not supported for \
             jemalloc/tcmalloc/mimalloc/musl (leave out --census; --scan still classifies the tracked blocks)",
            plan.allocator.name()
        )));
    }
    crate::target::elf::glibc_version(&plan.module.path)
        .and_then(|v| crate::scan::census::GlibcVersion::parse(&v))
        .ok_or_else(|| {
            Refused(format!("--census: cannot tell the glibc version of {}", plan.module.path.display()))
        })
}

/// `run --scan`: where exit() is (the file as we open it, its offset, its address in the
/// target), in libc or a static executable.
fn exit_function(pid: i32, exe: &str) -> Option<(PathBuf, u64, u64)> {
    let maps = target::exec_mappings(pid).ok()?;
    let m = maps
        .iter()
        .find(|m| target::is_libc(&m.file_name()))
        .or_else(|| maps.iter().find(|m| m.path.as_os_str() == exe))?;
    let path = target::target_path(pid, &m.path);
    let (syms, _) = target::elf::functions(&path, &["exit"]).ok()?;
    let offset = syms.get("exit")?.offset;
    let addr = maps
        .iter()
        .filter(|x| x.path == m.path)
        .find(|x| x.file_offset <= offset && offset < x.file_offset + (x.end - x.start))
        .map(|x| x.start + (offset - x.file_offset))?;
    Some((path, offset, addr))
}

impl Outcome {
    pub fn leak_gate_failed(&self) -> bool {
        self.fail_on_leak.is_some_and(|limit| self.outstanding_bytes > limit)
    }
}

/// Errors that mean "nothing was attached; fix the input": exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn progress(cfg: &Config, msg: std::fmt::Arguments<'_>) {
    if !cfg.quiet {
        crate::progress::line(msg);
    }
}

/// Several processes: each other process's memory and a runtime resolver of its own (a
/// forked worker's objects created since the fork are its own, at addresses the first may use
/// for others), by tgid. Opened at its first stack; `None` once it could not be read. Ended
/// processes leave entries: it starts over past a bound.
struct OtherProcesses<R> {
    by_tgid: HashMap<u32, Option<(crate::ptrace::Mem, R)>>,
}

impl<R> Default for OtherProcesses<R> {
    fn default() -> Self {
        OtherProcesses { by_tgid: HashMap::new() }
    }
}

impl<R> OtherProcesses<R> {
    const MAX: usize = 1024;

    /// `tgid`'s memory and resolver (made with `fresh` the first time), if it can be read.
    fn get(&mut self, tgid: u32, fresh: impl FnOnce() -> R) -> Option<(&crate::ptrace::Mem, &mut R)> {
        if self.by_tgid.len() >= Self::MAX && !self.by_tgid.contains_key(&tgid) {
            self.by_tgid.clear();
        }
        let entry = self
            .by_tgid
            .entry(tgid)
            .or_insert_with(|| crate::ptrace::Mem::open(tgid as i32).ok().map(|m| (m, fresh())));
        entry.as_mut().map(|(m, r)| (&*m, r))
    }
}

/// A stack fetched from the kernel map, its interpreter's frames named at once (their code
/// objects may be freed or moved later).
struct Fetched {
    ips: Vec<u64>,
    end: u32,
    python: Vec<(Frame, bool)>,
    /// JavaScript frames, each with the index in `ips` of the native frame it stands for.
    javascript: Vec<(usize, Frame)>,
}

/// Stacks fetched from the kernel map, by id. Stack ids never change meaning.
#[derive(Default)]
struct StackCache {
    stacks: HashMap<u64, Option<Fetched>>,
    python: Option<python::Python>,
    v8: Option<v8::V8>,
    /// `--js-heap`: the JavaScript heap's sites, from V8's sampling heap profiler.
    js_heap: Option<js_heap::JsHeap>,
}

impl StackCache {
    fn fetch_new(&mut self, probes: &Probes, sites: &[SiteStats]) -> anyhow::Result<()> {
        for site in sites {
            let id = site.key.stack_id;
            if let std::collections::hash_map::Entry::Vacant(slot) = self.stacks.entry(id) {
                let fetched = probes.stack(id).context("reading a stack")?.map(|s| {
                    let python = match self.python.as_mut() {
                        Some(py) => {
                            py.walk_ended(s.runtime_end);
                            if s.runtime.is_empty() {
                                Vec::new()
                            } else {
                                py.names.frames(site.key.tgid, &s.runtime)
                            }
                        }
                        None => Vec::new(),
                    };
                    let javascript = match self.v8.as_mut() {
                        Some(v8) => v8.frames(site.key.tgid, &s.runtime, s.runtime_end),
                        None => Vec::new(),
                    };
                    Fetched { python, javascript, ips: s.ips, end: s.end }
                });
                slot.insert(fetched);
            }
        }
        Ok(())
    }

    fn remove(&mut self, id: &u64) {
        self.stacks.remove(id);
    }

    /// A command `run` started: once its CPython is up, its frames join the stacks from then
    /// on. Returns the line to show when it is found.
    fn look_for_python(
        &mut self,
        pid: i32,
        sample_bytes: u64,
        hook: bool,
        probes: &mut Probes,
        statuses: &mut Vec<ProbeStatus>,
    ) -> anyhow::Result<Vec<String>> {
        if self.python.is_some() {
            return Ok(Vec::new());
        }
        match python::Names::detect(pid) {
            (Some(names), line) => {
                probes.set_python(&names.config()).context("loading the Python layout")?;
                let mut py = python::Python::new(names);
                let hooked = match hook {
                    true => {
                        let (hooked, st) = py.hook_allocators(sample_bytes, IN_PROCESS_MAX_PAUSE, probes);
                        statuses.extend(st);
                        hooked
                    }
                    false => py.leave_allocators(PYTHON_NOT_HOOKED_MANY),
                };
                self.python = Some(py);
                Ok(line.into_iter().chain([hooked]).collect())
            }
            (None, _) => Ok(Vec::new()),
        }
    }
}

fn refuse(e: impl std::error::Error) -> anyhow::Error {
    anyhow::Error::new(Refused(crate::kernel::probe::error_chain(&e)))
}

pub async fn run(cfg: Config) -> anyhow::Result<Outcome> {
    run_with(cfg, None).await
}

/// [`run`], with a live view (`top`) fed each interval through `tap`.
pub async fn run_with(cfg: Config, tap: Option<crate::live::Tap>) -> anyhow::Result<Outcome> {
    crate::progress::init(cfg.quiet, cfg.live_view);
    preflight::check().map_err(refuse)?;
    // Every output path is judged before anything is attached.
    let policy = cfg.output_policy;
    let outputs = cfg
        .output
        .iter()
        .map(|p| ("--output", p))
        .chain(cfg.plot.iter().map(|p| ("--plot", p)))
        .chain(cfg.exports.paths().map(|(kind, p)| (kind.flag(), p)));
    for (flag, out) in outputs {
        check_output_path(flag, out, policy).map_err(refuse)?;
    }
    if let Some(snap) = &cfg.snapshots {
        crate::output::prepare_dir(&snap.dir, policy).map_err(|e| refuse_flag("--snapshot-dir", &e))?;
    }
    // The exporter's port is taken now, before anything is attached.
    let mut live = live::Live::start(&cfg, tap).map_err(|e| anyhow::Error::new(Refused(format!("{e:#}"))))?;

    // Who we trace.
    let (pid, mut held) = match &cfg.mode {
        Mode::Attach { pid } => {
            target::identify(*pid).map_err(refuse)?;
            (*pid, None)
        }
        Mode::Run { command } => {
            let mut held = launch::spawn_held(command).map_err(refuse)?;
            // In-process, the GOT must be bound before it is planned: hold the program at its
            // entry point instead (the libraries' constructors have run by then).
            if cfg.in_process {
                held.run_to_entry().map_err(refuse)?;
            }
            (held.pid, Some(held))
        }
    };
    let identity = target::identify(pid).map_err(refuse)?;
    let pidfd = target::pidfd_open(pid).map_err(refuse)?;
    // The PID could have been recycled between identify and pidfd_open.
    if !target::still_same(&identity) {
        return Err(refuse(TargetError::NoSuchProcess { pid }));
    }
    // The allocators it really uses, and where each hook goes.
    let modules = allocator::scan(pid).map_err(refuse)?;
    let plan = allocator::plan(pid, &identity.exe, &modules, &allocator::preloads(pid), &cfg.allocator)
        .map_err(refuse)?;
    // The ptrace helper, which does every stop (see ptrace::server): started before anything
    // is attached, so that a machine where it cannot run is refused untouched.
    if cfg.in_process || cfg.scan.is_some() {
        crate::ptrace::server::start().map_err(refuse)?;
    }
    // In-process: plan the GOT, map the stub (a first short stop); the uprobes then go on its
    // report sites and on mmap/munmap only.
    let mut inproc = if cfg.in_process { Some(InProcess::map(pid, &cfg, held.as_mut())?) } else { None };
    let attach_plan = match &inproc {
        Some(_) => in_process_hooks(&plan),
        None => plan.clone(),
    };

    // A CPython target: its frames join every stack. A command `run` holds has not started its
    // interpreter yet: it is looked for at the first intervals instead (see `watch`).
    let (python_names, python_line) = match cfg.mode {
        Mode::Attach { .. } => python::Names::detect(pid),
        Mode::Run { .. } => (None, None),
    };
    if let Some(line) = python_line {
        progress(&cfg, format_args!("{line}"));
    }
    // A Node.js target: its JavaScript frames join every stack (a CPython one has none).
    let (v8, v8_line) = match (&python_names, &cfg.mode) {
        (None, Mode::Attach { .. }) => v8::V8::detect(pid),
        _ => (None, None),
    };
    match (v8_line, cfg.js_frames) {
        (Some(line), true) => progress(&cfg, format_args!("{line}")),
        (Some(_), false) if v8.is_some() => {
            progress(&cfg, format_args!("V8 recognised; JavaScript frames left out (--no-js-frames)"))
        }
        (Some(line), false) => progress(&cfg, format_args!("{line}")),
        (None, _) => {}
    }
    if cfg.js_heap.is_some() && v8.is_none() {
        return Err(anyhow::Error::new(Refused(format!(
            "--js-heap: PID {pid} runs no V8 that leakprobe recognises (not Node.js?); nothing was attached"
        ))));
    }
    // --no-js-frames: recognised (for --js-heap), but its frames stay out of the stacks.
    let v8 = v8.filter(|_| cfg.js_frames);
    let t_load = std::time::Instant::now();
    let mut probes = Probes::load(ProbeConfig {
        tgid: pid as u32,
        follow_children: fleet::Fleet::follows(&cfg),
        max_processes: cfg.max_processes,
        max_live: cfg.max_live,
        max_stacks: cfg.max_stacks,
        max_threads: 1 << 14,
        max_depth: cfg.max_stack,
        max_unwind_rows: cfg.max_unwind_rows,
        sample_bytes: cfg.sample_bytes,
        noop: cfg.noop,
        allocator_text: inproc.as_ref().and_then(|i| i.allocator_text),
        stub_text: inproc.as_ref().map(|i| i.installed.code_range()),
    })
    .context("loading eBPF programs")?;
    tracing::info!("eBPF programs loaded in {:?}", t_load.elapsed());
    if let Some(names) = &python_names {
        probes.set_python(&names.config()).context("loading the Python layout")?;
    }
    if let Some(v8) = &v8 {
        probes.set_v8(&v8.config()).context("loading the V8 layout")?;
    }
    // Unwind tables first, so the first allocation seen already gets a whole stack.
    let t_unwind = std::time::Instant::now();
    let mut unwind = unwind::Loaded::default();
    crate::progress::spinner(format!("loading the unwind tables of PID {pid}'s modules"));
    let synced = sync_unwind(&cfg, &mut probes, &mut unwind, pid, 0).context("loading unwind tables");
    crate::progress::done();
    synced?;
    tracing::info!("{} unwind rows loaded in {:?}", unwind.rows_used(), t_unwind.elapsed());
    test_hook_pause("LEAKPROBE_TEST_PAUSE_BEFORE_ATTACH_MS");
    let t_attach = std::time::Instant::now();
    let mut statuses = match &inproc {
        Some(i) => {
            probes.set_stubbed_modules(i.stubbed_modules.clone());
            probes.attach_sites(&i.installed.sites()).map_err(refuse)?
        }
        None => Vec::new(),
    };
    match probes.attach(&attach_plan) {
        Ok(s) => statuses.extend(s),
        Err(e) => {
            drop(probes);
            return Err(refuse(e));
        }
    };
    // run --scan: the target stops itself at exit() (an eBPF SIGSTOP) so that its memory can
    // be scanned before atexit handlers and destructors run.
    let mut scanner = match &cfg.scan {
        Some(s) => Some(Scanner {
            every: s.every,
            last_at: 0.0,
            history: Vec::new(),
            last: None,
            at_exit: false,
            setup: scan::Setup {
                pid,
                exclude: Scanner::exclude(&inproc),
                max_pause: s.max_pause,
                glibc: plan.allocator == allocator::AllocatorKind::Glibc,
                // On glibc the heap is always walked: what holds the blocks tracked since
                // attach is mostly memory from before it (a queue's head, a map's buckets).
                census: match census_version(&plan) {
                    Ok(v) => Some(v),
                    Err(e) if s.census => return Err(refuse(e)),
                    Err(_) => None,
                },
                function_entries: Vec::new(),
                allocator_module: allocator_module(&plan, &identity.exe),
                backrefs: s.backrefs.clone(),
                python_objects: true,
            },
            census_report: s.census,
            exit_guard: None,
        }),
        None => None,
    };
    if let (Some(sc), Mode::Run { .. }) = (scanner.as_mut(), &cfg.mode) {
        match exit_function(pid, &identity.exe) {
            Some((path, offset, addr)) => match probes.attach_exit_stop(&path, offset) {
                Ok(s) => {
                    statuses.push(s);
                    sc.at_exit = true;
                    // The probe may sit a few instructions in (on an emulated one).
                    sc.setup.function_entries.push((addr, addr + 32));
                    // Before the first exit() can stop it: whatever happens to us, the command
                    // is continued.
                    let list = RestoreList {
                        pid,
                        start_ticks: guard::start_ticks(pid).unwrap_or(0),
                        held_stopped: true,
                        stop_at_exit: true,
                        ..RestoreList::default()
                    };
                    sc.exit_guard = Some(Guard::spawn(&list).context("starting the guard of the exit stop")?);
                }
                Err(e) => progress(&cfg, format_args!("--scan: cannot watch exit() ({e}); no scan at exit")),
            },
            None => progress(&cfg, format_args!("--scan: exit() not found in libc; no scan at exit")),
        }
    }
    // Only now, with every report site watched, do the GOT slots lead into the stub.
    if let Some(i) = inproc.as_mut() {
        i.installed.patch(&i.got).context("patching the GOT")?;
        progress(
            &cfg,
            format_args!(
                "in-process: {} GOT slots point at the stub (target paused {:.1} ms; slots written in {:.1} ms)",
                i.installed.patched_slots(),
                i.installed.summary.map_pause.as_secs_f64() * 1e3,
                i.installed.summary.patch_pause.as_secs_f64() * 1e3,
            ),
        );
    }
    // Probes bind to whichever process holds the PID when they attach: if ours exited and
    // its PID went to another process meanwhile, they are on the newcomer. Detach at once.
    if target::pidfd_exited(&pidfd) || !target::still_same(&identity) {
        drop(probes);
        return Err(refuse(TargetError::GoneWhileAttaching { pid }));
    }
    // Its allocator tables lead into a stub of their own once every other hook is live:
    // what pymalloc passes on to malloc is then seen there.
    let mut python = python_names.map(python::Python::new);
    if let Some(py) = python.as_mut() {
        let line = match fleet::Fleet::is_many(&cfg) {
            false => {
                let (line, st) = py.hook_allocators(cfg.sample_bytes, IN_PROCESS_MAX_PAUSE, &mut probes);
                statuses.extend(st);
                line
            }
            true => py.leave_allocators(PYTHON_NOT_HOOKED_MANY),
        };
        progress(&cfg, format_args!("{line}"));
    }
    tracing::info!("probes attached in {:?}", t_attach.elapsed());
    let start_ns = monotonic_ns();
    let start_wall = SystemTime::now();
    // The mappings are read while a held command is still stopped: one that exits within
    // milliseconds of its release would otherwise leave no table to symbolize its stacks with.
    let mut symbolizer = Symbolizer::new();
    let _ = symbolizer.modules.refresh(&identity);
    // Several processes: the others join now (each with its links; forked workers share the
    // first one's layout), and with --children every child forked from here on.
    let mut fleet = fleet::Fleet::is_many(&cfg).then(|| {
        let mut f = fleet::Fleet::new(&cfg, &identity, attach_plan.clone(), &mut probes, start_ns);
        let mut ctx = fleet::Joining {
            cfg: &cfg,
            probes: &mut probes,
            unwind: &mut unwind,
            symbolizer: &mut symbolizer,
            first_stub: inproc.as_ref().map(|i| &i.installed),
        };
        join_the_others(&cfg, &mut f, &mut ctx);
        f
    });
    let mut child: Option<Child> = None;
    if let Some(h) = held.take() {
        child = Some(h.release().context("releasing the held command")?);
        if let Some(i) = inproc.as_mut() {
            i.installed.held_released().context("telling the guard the command runs")?;
        }
    }
    // Its children are held at birth from now on (a held command is ours to trace until here).
    if let Some(line) = fleet.as_mut().and_then(fleet::Fleet::follow_first) {
        progress(&cfg, format_args!("{line}"));
    }
    let attached = statuses.iter().filter(|s| s.attached()).count();
    progress(
        &cfg,
        format_args!(
            "attached {attached} probes to PID {pid} ({}): {} allocator in {}",
            identity.exe,
            plan.allocator.name(),
            plan.module.path.display()
        ),
    );

    let _ = symbolizer.modules.refresh(&identity);
    let mut tracker = Tracker::new(start_ns, cfg.min_age.as_nanos() as u64);
    // The JavaScript heap last: the inspector is open for as short a time as can be.
    let js_heap = match cfg.js_heap {
        Some(js_cfg) => {
            let (mut js, line) = js_heap::JsHeap::start(pid, js_cfg)?;
            progress(&cfg, format_args!("{line}"));
            if cfg.js_heap_snapshot {
                let line = js.first_snapshot()?;
                progress(&cfg, format_args!("{line}"));
            }
            Some(js)
        }
        None => None,
    };
    let mut stacks = StackCache { python, v8, js_heap, ..StackCache::default() };
    // Wrappers are added for a C++ runtime mapped later, unless the allocator's own
    // operator new is hooked (it comes first in the search order).
    // In-process: operator new reaches malloc through the C++ runtime's GOT, no uprobe needed.
    let mut cxx_attached = inproc.is_some()
        || plan.cxx.is_some()
        || statuses.iter().any(|s| s.function == "_Znwm" && s.attached() && !s.watch_only);
    let mut reporting = Reporting {
        cfg: &cfg,
        identity: &identity,
        plan: &plan,
        start_wall,
        build_ids: BuildIds::new(),
        host: None,
        snapshots_written: 0,
        snapshot_paths: std::collections::VecDeque::new(),
        processes: fleet.as_ref().map(|f| processes_report(f, &probes, inproc.as_ref())),
    };
    crate::progress::window(cfg.duration);

    let (ended_by, exit_status): (&'static str, Option<i32>) = watch(
        &cfg,
        &identity,
        pidfd,
        &mut probes,
        &mut tracker,
        &mut stacks,
        &mut symbolizer,
        &mut statuses,
        &mut cxx_attached,
        &mut child,
        &mut unwind,
        &mut reporting,
        &mut inproc,
        &mut scanner,
        &mut live,
        &mut fleet,
    )
    .await?;
    crate::progress::window_done();
    let (mut ended_by, mut exit_status) = (ended_by, exit_status);

    // Final reading, then detach before the (slower) symbolization and output.
    let mut sample =
        probes.sample(monotonic_ns(), tracker.min_age_ns(), true).context("reading the final sample")?;
    sample.memory = crate::target::memory::read(pid);
    if let Some(js) = stacks.js_heap.as_mut() {
        js.poll_into(&mut sample, true);
        if cfg.js_heap_snapshot {
            match js.compare_snapshots() {
                Ok(line) => progress(&cfg, format_args!("{line}")),
                Err(e) => progress(&cfg, format_args!("WARNING: {e:#}")),
            }
        }
        let info = js.finish();
        progress(&cfg, format_args!("{}", js_heap_line(&info)));
    }
    tracker.ingest(sample);
    stacks.fetch_new(&probes, &tracker.sites())?;
    // The last scan, with the target as the final sample saw it; in run mode it is stopped at
    // exit() and continued afterwards.
    if let Some(sc) = scanner.as_mut() {
        let exiting = ended_by == "exit-called";
        if exiting
            || !matches!(cfg.mode, Mode::Run { .. })
                && ended_by != "target-exited"
                && ended_by != "target-exec"
        {
            sc.scan(&cfg, &mut probes, tracker.window_s(), &stacks, &mut symbolizer, fleet.as_mut());
        } else if matches!(cfg.mode, Mode::Run { .. }) {
            progress(
                &cfg,
                format_args!("--scan: the command ended without calling exit(); nothing was scanned"),
            );
        }
        if exiting || probes.counters().is_ok_and(|c| c.get(leakprobe_common::counter::EXIT_STOPS) > 0) {
            // SAFETY: kill with a valid signal on the command we started.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
        if exiting {
            exit_status = child.as_mut().and_then(|c| c.wait().ok()).map(|s| {
                use std::os::unix::process::ExitStatusExt as _;
                s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
            });
            progress(&cfg, format_args!("PID {pid} exited"));
            ended_by = "target-exited";
        }
    }
    // Then CPython's tables and the GOT back (after the reading: a free between the two
    // would go unseen and its block look leaked), and only then the probes.
    if let Some(py) = stacks.python.as_mut() {
        py.finish(ended_by);
    }
    match (fleet.as_mut(), inproc.as_mut()) {
        // Several processes: each one's GOT is written back while it runs (the follower traces
        // them, so no stop of ours), then its children that were forked meanwhile.
        (Some(f), Some(i)) => {
            for line in f.restore_stubs() {
                progress(&cfg, format_args!("in-process: {line}"));
            }
            i.finish(ended_by, false);
            let mut ctx = fleet::Joining {
                cfg: &cfg,
                probes: &mut probes,
                unwind: &mut unwind,
                symbolizer: &mut symbolizer,
                first_stub: Some(&i.installed),
            };
            f.restore_newborns(&mut ctx);
        }
        (None, Some(i)) => i.finish(ended_by, true),
        _ => {}
    }
    if let Some(f) = &fleet {
        reporting.processes = Some(processes_report(f, &probes, inproc.as_ref()));
    }
    let t0 = std::time::Instant::now();
    let background = probes.detach_in_background();
    tracing::info!("detached in {:?}", t0.elapsed());
    progress(
        &cfg,
        format_args!(
            "detached from PID {pid}{}",
            if background { " (the kernel removes the probes within seconds)" } else { "" }
        ),
    );
    let _ = symbolizer.modules.refresh(&identity);

    if let Some(l) = live.as_mut() {
        let sites = tracker.sites();
        let last = scanner.as_ref().and_then(|s| s.last.as_ref());
        let processes = processes_in(fleet.as_ref());
        l.publish(&cfg, pid, &identity.exe, &tracker, &sites, processes, &stacks, &mut symbolizer, last);
        l.finish(ended_by);
    }
    let mut report = reporting.build(&tracker, &stacks, &mut symbolizer, &statuses, ended_by, exit_status);
    if let Some(f) = &fleet {
        if f.refused > 0 {
            report.drops.insert("processes_refused".into(), f.refused);
            report.degraded = true;
        }
        report.activity.insert("children_execed_unfollowed".into(), f.execed_unfollowed);
        report.activity.insert("ended_processes_summarized".into(), f.ended_forgotten);
        if inproc.is_some() {
            report.activity.insert("inprocess_children_let_go".into(), f.stubs_let_go);
        }
    }
    if let Some(i) = &inproc {
        let ip = i.report();
        if ip.stub_set_full > 0 {
            report.drops.insert("inprocess_set_full".into(), ip.stub_set_full);
            report.degraded = true;
        }
        report.in_process = Some(ip);
    }
    let mut gate_bytes = report.totals.outstanding_bytes;
    let mut scanned = false;
    if let Some(done) = scanner.as_mut().and_then(|s| s.last.take()) {
        gate_bytes = done.scan.totals.definitely_lost.bytes;
        scanned = true;
        report::scan::apply(&mut report, done.scan, done.sites);
    } else if cfg.scan.is_some() && cfg.fail_on_leak.is_some() {
        // The gate is on definitely lost bytes: without a scan it cannot be judged safely.
        progress(&cfg, format_args!("--fail-on-leak: no scan was made; judging outstanding bytes instead"));
    }
    report::suppress::apply(&mut report, &cfg.suppressions);
    if !report.processes.is_empty() {
        report::processes::fill(&mut report);
    }
    gate_bytes = report::suppress::unsuppressed_gate(&report, gate_bytes, scanned);
    if let Some(applied) = &report.suppressions {
        for u in &applied.unused {
            progress(&cfg, format_args!("suppression {} ({}) matched nothing", u.rule, u.origin));
        }
    }
    let rendered = match cfg.format {
        ReportFormat::Text => report::text::render(&report, cfg.top, cfg.sort),
        ReportFormat::Json => report::to_json(&report).context("serializing the report")?,
        ReportFormat::Lsan => report::lsan::render(&report),
    };
    // top draws on stdout: its report goes only to --output.
    if !(cfg.live_view && cfg.output.is_none()) {
        write_output(cfg.output.as_ref(), &rendered, cfg.output_policy)?;
    }
    if let Some(path) = &cfg.plot {
        let lines = top_growing_lines(&report, &tracker, 4);
        let chart = crate::report::plot::draw(path, &report, &lines).context("drawing --plot")?;
        crate::output::write_atomic(path, &chart, cfg.output_policy).context("writing --plot")?;
        progress(&cfg, format_args!("timeline chart written to {}", path.display()));
    }
    write_exports(&cfg.exports, &report, cfg.output_policy)?;
    crate::ptrace::server::shutdown();
    Ok(Outcome {
        outstanding_bytes: gate_bytes,
        fail_on_leak: cfg.fail_on_leak,
        exit_code: cfg.leak_exit_code,
        judged: if scanned { "definitely lost" } else { "outstanding growth" },
        suppressed: report.sites.iter().any(|s| s.suppressed.is_some()),
    })
}

/// Several processes: CPython's allocator tables are left alone, because children forked
/// while they point at the stub would keep pointing there after detach.
const PYTHON_NOT_HOOKED_MANY: &str = "CPython's allocators not hooked with several processes: Python frames are in \
     every stack, but small objects from pymalloc's arenas are seen as arena mmaps, not one by one";

/// The longest the target may stay stopped while the stub is mapped or the GOT restored: past
/// it, the operation is abandoned and the target resumed.
const IN_PROCESS_MAX_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// The in-process stub of this session and what the report says of it.
struct InProcess {
    got: crate::inprocess::got::PatchPlan,
    installed: crate::inprocess::install::Installed,
    /// The allocator's code, whose own mmap/munmap calls are not allocations.
    allocator_text: Option<(u64, u64)>,
    /// Slots restored at detach, and that pause.
    restored: Option<(usize, std::time::Duration)>,
    /// The modules mapped when the GOT was last planned: a new one (dlopen) is planned and
    /// patched at the next interval.
    known: std::collections::BTreeSet<std::path::PathBuf>,
    /// Modules patched after the start: (module names, slots, when, the pause).
    late: Vec<report::LatePatch>,
    /// The modules the stubs forward into.
    stubbed_modules: Vec<std::path::PathBuf>,
    counters: [u64; crate::inprocess::stub::counter::COUNT],
    /// `run`: installed while the command was held at its entry point.
    from_entry: bool,
}

impl InProcess {
    fn map(pid: i32, cfg: &Config, held: Option<&mut launch::Held>) -> anyhow::Result<InProcess> {
        let from_entry = held.is_some();
        use crate::inprocess::{got, install::Installed};
        let mem = crate::ptrace::Mem::open(pid).map_err(refuse)?;
        let got = got::plan_pid(pid, |a| mem.read_u64(a).ok()).map_err(refuse)?;
        let installed = Installed::map(
            pid,
            &got,
            cfg.sample_bytes,
            IN_PROCESS_MAX_PAUSE,
            held,
            &fleet::Fleet::initial_others(pid, cfg),
        )
        .map_err(refuse)?;
        let maps = target::exec_mappings(pid).unwrap_or_default();
        let known = maps.iter().map(|m| m.path.clone()).collect();
        let stubbed_modules: Vec<std::path::PathBuf> =
            target::modules_holding(&maps, installed.real.iter().map(|r| r.1))
                .into_iter()
                .map(|m| m.path.clone())
                .collect();
        // The allocator's code: the executable mappings of the module the real malloc is in.
        let malloc =
            installed.real.iter().find(|(f, _)| *f == crate::inprocess::stub::Func::Malloc).map(|r| r.1);
        let allocator_text = malloc.and_then(|m| {
            let module = &target::modules_holding(&maps, [m]).first()?.path;
            let (lo, hi) = maps
                .iter()
                .filter(|x| &x.path == module)
                .fold((u64::MAX, 0), |(lo, hi), x| (lo.min(x.start), hi.max(x.end)));
            (lo < hi).then_some((lo, hi))
        });
        Ok(InProcess {
            got,
            installed,
            allocator_text,
            restored: None,
            counters: [0; 3],
            known,
            late: Vec::new(),
            stubbed_modules,
            from_entry,
        })
    }

    /// Plans and patches modules mapped since the last look (dlopen). `at_s` is the time
    /// since attach, `since_s` the time of the previous look: the module was loaded in between.
    fn patch_late_modules(&mut self, pid: i32, at_s: f64, since_s: f64) -> Option<String> {
        let drifted = self.installed.repatch_drifted();
        if drifted > 0 {
            tracing::info!("{drifted} GOT slots had lost the stub's address and were put back");
        }
        let now = exec_paths(pid);
        if now.is_empty() || now.is_subset(&self.known) {
            self.known = now;
            return None;
        }
        let new: Vec<String> = now.difference(&self.known).map(|p| p.display().to_string()).collect();
        self.known = now;
        let mem = crate::ptrace::Mem::open(pid).ok()?;
        let plan = crate::inprocess::got::plan_pid(pid, |a| mem.read_u64(a).ok()).ok()?;
        match self.installed.patch(&plan) {
            Ok((0, _)) => None,
            Ok((slots, pause)) => {
                let pause_ms = pause.as_secs_f64() * 1e3;
                self.late.push(report::LatePatch {
                    modules: new.clone(),
                    slots: slots as u64,
                    at_s,
                    since_s,
                    pause_ms,
                });
                Some(format!(
                    "in-process: patched {slots} GOT slots of {} (loaded between +{since_s:.1} s and +{at_s:.1} s; \
                     its allocations before now were not seen; pause {pause_ms:.1} ms)",
                    new.join(", ")
                ))
            }
            Err(e) => Some(format!("in-process: could not patch {}: {e:#}", new.join(", "))),
        }
    }

    fn report(&self) -> report::InProcess {
        use crate::inprocess::stub::counter;
        let s = &self.installed.summary;
        report::InProcess {
            patched: patched_rows(s),
            skipped: skipped_rows(&s.skipped),
            map_pause_ms: s.map_pause.as_secs_f64() * 1e3,
            patch_pause_ms: s.patch_pause.as_secs_f64() * 1e3,
            restore_pause_ms: self.restored.map(|(_, p)| p.as_secs_f64() * 1e3),
            restored_slots: self.restored.map(|(n, _)| n as u64),
            stub_sampled_allocs: self.counters[counter::SAMPLED_ALLOCS as usize],
            stub_sampled_frees: self.counters[counter::SAMPLED_FREES as usize],
            stub_set_full: self.counters[counter::SET_FULL as usize],
            repatched_slots: s.repatched,
            late: self.late.clone(),
            left_in_target: format!(
                "the stub, switched off (every call passes straight through), at {:#x} ({} KiB of \
                 code, memfd \"leakprobe-stub\") and {:#x} ({} KiB of data): a function pointer \
                 copied while the slots were patched may still lead there",
                self.installed.code,
                crate::inprocess::install::CODE_LEN / 1024,
                self.installed.data,
                crate::inprocess::stub::DATA_SIZE / 1024,
            ),
            from_entry: self.from_entry,
        }
    }

    /// This stub as the report's processes list has it.
    fn process_stub(&self) -> report::processes::ProcessStub {
        use crate::inprocess::stub::counter;
        let now = match self.restored {
            None => self.installed.counters().unwrap_or(self.counters),
            Some(_) => self.counters,
        };
        report::processes::ProcessStub {
            how: "mapped".into(),
            slots: self.installed.summary.patched.iter().map(|(_, _, n)| *n as u64).sum(),
            restored: self.restored.map(|(n, _)| n as u64),
            sampled_allocs: now[counter::SAMPLED_ALLOCS as usize],
            sampled_frees: now[counter::SAMPLED_FREES as usize],
        }
    }

    /// Restores the GOT (unless the target is gone) and keeps the stub's last counters. `stop`:
    /// in one stop of the target; else written while it runs, as the guard would.
    fn finish(&mut self, ended_by: &str, stop: bool) {
        let gone = target_gone(ended_by);
        let (counters, restored) = self.installed.finish(gone, stop);
        self.counters = counters.unwrap_or(self.counters);
        match restored {
            Ok(r) => self.restored = r,
            Err(e) => {
                crate::say!("leakprobe: warning: restoring the GOT: {e:#} (the guard process restores it)")
            }
        }
    }
}

/// Whether the session ended because the target is gone (exited, or another program after
/// exec): then nothing of ours is left in it to restore.
fn target_gone(ended_by: &str) -> bool {
    matches!(ended_by, "target-exited" | "target-exec")
}

/// The words an install patched, per module and function, as the report lists them.
fn patched_rows(s: &crate::inprocess::install::Summary) -> Vec<report::PatchedSlots> {
    s.patched
        .iter()
        .map(|(m, f, n)| report::PatchedSlots {
            module: m.display().to_string(),
            function: f.to_string(),
            slots: *n as u64,
        })
        .collect()
}

/// Words left alone, with why, as the report lists them.
fn skipped_rows<'a>(
    skipped: impl IntoIterator<Item = &'a (std::path::PathBuf, &'static str, String)>,
) -> Vec<report::SkippedSlot> {
    skipped
        .into_iter()
        .map(|(m, f, why)| report::SkippedSlot {
            module: m.display().to_string(),
            function: f.to_string(),
            reason: why.clone(),
        })
        .collect()
}

/// The files the target maps executable.
fn exec_paths(pid: i32) -> std::collections::BTreeSet<std::path::PathBuf> {
    target::exec_mappings(pid).map(|m| m.into_iter().map(|x| x.path).collect()).unwrap_or_default()
}

/// In-process mode: the C allocation family goes through the stub; everything else the plan
/// hooks keeps its uprobes (mmap and munmap, jemalloc's mallocx family, an allocator's own
/// operator new and sized deletes, prefixed copies inside the executable). Watchers of
/// shadowed allocators would trap on every call and are left out.
/// (The family functions of the modules the stubs forward into are skipped by `Probes`, which
/// still sees them to recognise their aliases: tcmalloc's operator delete is its free.)
fn in_process_hooks(plan: &allocator::Plan) -> allocator::Plan {
    let mut p = plan.clone();
    p.watch.clear();
    p.cxx = None;
    p
}

/// Builds reports (the final one, and snapshots while running) from the session's state.
struct Reporting<'a> {
    cfg: &'a Config,
    identity: &'a Identity,
    plan: &'a crate::target::allocator::Plan,
    start_wall: SystemTime,
    build_ids: BuildIds,
    /// Kernel and libc do not change during a run: read once, at the first report.
    host: Option<report::Host>,
    snapshots_written: u32,
    /// The snapshots this session wrote, oldest first (for --snapshot-keep).
    snapshot_paths: std::collections::VecDeque<PathBuf>,
    /// Several processes: each one as last seen (refreshed every interval).
    processes: Option<Vec<report::Process>>,
}

impl Reporting<'_> {
    fn build(
        &mut self,
        tracker: &Tracker,
        stacks: &StackCache,
        symbolizer: &mut Symbolizer,
        statuses: &[ProbeStatus],
        ended_by: &str,
        exit_status: Option<i32>,
    ) -> report::Report {
        let modules = modules(symbolizer, &mut self.build_ids);
        let host = self.host.get_or_insert_with(|| host(symbolizer)).clone();
        let ctx = report::Context {
            identity: self.identity,
            is_run: matches!(self.cfg.mode, Mode::Run { .. }),
            args: self.cfg.args.clone(),
            start_wall: self.start_wall,
            interval_s: self.cfg.interval.as_secs_f64(),
            probes: statuses,
            ended_by,
            exit_status,
            sample_bytes: self.cfg.sample_bytes,
            max_overhead: self.cfg.max_overhead,
            host,
            modules,
            allocator: self.plan,
            per_process: self.processes.is_some(),
        };
        let many = tracker.totals().sites >= 1000;
        if many {
            crate::progress::spinner(format!(
                "symbolizing the stacks of {} call sites",
                tracker.totals().sites
            ));
        }
        let mut report = report::build(&ctx, tracker, |site| site_frames(&site.key, stacks, symbolizer));
        if many {
            crate::progress::done();
        }
        report.runtime = stacks
            .python
            .as_ref()
            .map(python::Python::report)
            .or_else(|| stacks.v8.as_ref().map(v8::V8::report));
        report.js_heap = stacks.js_heap.as_ref().map(js_heap::JsHeap::info);
        if let Some(p) = &self.processes {
            report.processes = p.clone();
            report::processes::fill(&mut report);
        }
        if let Some(full) = report
            .runtime
            .as_ref()
            .and_then(|r| r.allocators.as_ref())
            .map(|a| a.stub_set_full)
            .filter(|n| *n > 0)
        {
            report.drops.insert("python_stub_set_full".into(), full);
            report.degraded = true;
        }
        report
    }

    /// Writes a snapshot when one is due.
    fn snapshot_if_due(
        &mut self,
        tracker: &Tracker,
        stacks: &StackCache,
        symbolizer: &mut Symbolizer,
        statuses: &[ProbeStatus],
        scan: Option<&scan::Done>,
    ) -> anyhow::Result<()> {
        let Some(every) = self.cfg.snapshots.as_ref().and_then(|s| s.every) else { return Ok(()) };
        let due = every.as_secs_f64() * f64::from(self.snapshots_written + 1);
        // Half an interval of slack: ticks land a little after each whole interval.
        if tracker.window_s() + self.cfg.interval.as_secs_f64() / 2.0 < due {
            return Ok(());
        }
        self.snapshot(tracker, stacks, symbolizer, statuses, scan).map(|_| ())
    }

    /// Writes the report so far as leakprobe/v1 JSON into the snapshot directory (for `top`
    /// without --snapshot-dir: ./leakprobe-top-PID, made on the first `w`), then deletes this
    /// session's oldest beyond --snapshot-keep. Returns the path written.
    fn snapshot(
        &mut self,
        tracker: &Tracker,
        stacks: &StackCache,
        symbolizer: &mut Symbolizer,
        statuses: &[ProbeStatus],
        scan: Option<&scan::Done>,
    ) -> anyhow::Result<PathBuf> {
        let dir = match &self.cfg.snapshots {
            Some(s) => s.dir.clone(),
            None => {
                let dir = PathBuf::from(format!("leakprobe-top-{}", self.identity.pid));
                crate::output::prepare_dir(&dir, self.cfg.output_policy)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
                dir
            }
        };
        let mut report = self.build(tracker, stacks, symbolizer, statuses, "running", None);
        // The latest scan (--scan-every), so that `diff` can compare classes between snapshots.
        if let Some(done) = scan {
            report::scan::apply(&mut report, done.scan.clone(), done.sites.clone());
        }
        let json = report::to_json(&report).context("serializing a snapshot")?;
        self.snapshots_written += 1;
        let path = dir.join(format!("snapshot-{}-{:04}.json", self.identity.pid, self.snapshots_written));
        crate::output::write_atomic(&path, json.as_bytes(), self.cfg.output_policy)
            .context("writing a snapshot")?;
        progress(self.cfg, format_args!("snapshot written to {}", path.display()));
        self.snapshot_paths.push_back(path.clone());
        let keep = self.cfg.snapshots.as_ref().and_then(|s| s.keep).unwrap_or(usize::MAX);
        while self.snapshot_paths.len() > keep {
            if let Some(old) = self.snapshot_paths.pop_front()
                && let Err(e) = std::fs::remove_file(&old)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                progress(self.cfg, format_args!("--snapshot-keep: cannot delete {}: {e}", old.display()));
            }
        }
        Ok(path)
    }
}

/// The top growing call sites' outstanding bytes over time, labelled for the chart.
fn top_growing_lines(report: &report::Report, tracker: &Tracker, n: usize) -> Vec<crate::report::plot::Line> {
    // report.sites was built from tracker.sites(), one for one and in the same order.
    report
        .sites
        .iter()
        .zip(tracker.sites())
        .filter(|(s, _)| s.outstanding_bytes > 0)
        .take(n)
        .map(|(s, stats)| {
            let caller = s
                .frames
                .first()
                .map_or_else(|| "[no stack]".into(), |f| crate::report::export::frame_label(f, report));
            crate::report::plot::Line {
                label: format!("{} <- {caller}", s.function),
                points: tracker.site_history(&stats.key).map(<[_]>::to_vec).unwrap_or_default(),
            }
        })
        .collect()
}

/// Build-ids by the file we hold open, read once.
type BuildIds = HashMap<PathBuf, Option<String>>;

/// Every executable mapping with its build-id (read once per file, through our open handle,
/// so it works after exit and across namespaces).
fn modules(symbolizer: &Symbolizer, build_ids: &mut BuildIds) -> Vec<report::Module> {
    symbolizer
        .modules
        .iter()
        .map(|(m, handle)| report::Module {
            path: m.path.display().to_string(),
            start: m.start,
            end: m.end,
            file_offset: m.file_offset,
            build_id: build_ids
                .entry(handle.to_path_buf())
                .or_insert_with(|| crate::target::elf::build_id(handle))
                .clone(),
        })
        .collect()
}

/// The kernel, and the C library the target maps (glibc or musl's loader; none when static).
fn host(symbolizer: &Symbolizer) -> report::Host {
    let libc = symbolizer.modules.iter().find(|(m, _)| target::is_libc(&m.file_name()));
    report::Host {
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        libc: libc.map(|(m, _)| m.path.display().to_string()),
        libc_version: libc.and_then(|(_, handle)| crate::target::elf::glibc_version(handle)),
    }
}

fn site_frames(key: &SiteKey, stacks: &StackCache, symbolizer: &mut Symbolizer) -> (Vec<Frame>, u32) {
    if key.kind == leakprobe_common::AllocKind::JsHeap as u32 {
        let frames = stacks.js_heap.as_ref().and_then(|j| j.frames(key.stack_id)).unwrap_or_default();
        return (frames, leakprobe_common::stack_end::COMPLETE);
    }
    match stacks.stacks.get(&key.stack_id) {
        Some(Some(f)) => {
            let native = symbolizer.symbolize_for(key.tgid, &f.ips);
            let native = crate::symbolize::mixed::place_javascript(native, f.javascript.clone());
            let is_eval = |fr: &Frame| stacks.python.as_ref().is_some_and(|p| p.names.is_eval(fr));
            (crate::symbolize::mixed::interleave(native, f.python.clone(), is_eval), f.end)
        }
        _ => (Vec::new(), leakprobe_common::stack_end::COMPLETE),
    }
}

/// The progress line for the JavaScript heap's end.
fn js_heap_line(info: &report::JsHeapInfo) -> String {
    match (&info.close_error, info.opened_by_leakprobe) {
        (None, true) => {
            format!("--js-heap: closed the inspector on port {} (open {:.1} s)", info.port, info.open_s)
        }
        (None, false) => format!("--js-heap: left the target's own inspector on port {} open", info.port),
        (Some(e), _) => {
            format!("--js-heap: WARNING: the inspector on port {} may still be open: {e}", info.port)
        }
    }
}

/// Samples every interval until the duration, a signal, or the target's exit or exec.
#[allow(clippy::too_many_arguments)]
async fn watch(
    cfg: &Config,
    identity: &Identity,
    pidfd: OwnedFd,
    probes: &mut Probes,
    tracker: &mut Tracker,
    stacks: &mut StackCache,
    symbolizer: &mut Symbolizer,
    statuses: &mut Vec<ProbeStatus>,
    cxx_attached: &mut bool,
    child: &mut Option<Child>,
    unwind: &mut unwind::Loaded,
    reporting: &mut Reporting<'_>,
    inproc: &mut Option<InProcess>,
    scanner: &mut Option<Scanner>,
    live: &mut Option<live::Live>,
    fleet: &mut Option<fleet::Fleet>,
) -> anyhow::Result<(&'static str, Option<i32>)> {
    let pid = identity.pid;
    let mut last_look = 0.0;
    // SAFETY: the OwnedFd moves into the AsyncFd and stays open, unchanged, until it drops.
    let exited = unsafe { AsyncFd::register(pidfd) }
        .map_err(|e| e.into_parts().1)
        .context("watching the target's pidfd")?;
    let mut sigint =
        tokio::signal::unix::signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm =
        tokio::signal::unix::signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let deadline = cfg.duration.map(|d| tokio::time::Instant::now() + d);
    let sleep_until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep_until_deadline);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + cfg.interval, cfg.interval);
    // A tick held up (a slow attach, a scan) is not made up for with a burst of samples.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // run --scan: how soon we notice the target stopped itself at exit().
    let at_exit = scanner.as_ref().is_some_and(|s| s.at_exit);
    let mut exit_poll = tokio::time::interval(std::time::Duration::from_millis(10));
    let first_exe = target::exe_of(pid);

    let mut test_panic = std::env::var_os("LEAKPROBE_TEST_PANIC_AFTER_ATTACH").is_some();
    // `run`: intervals left to look for a CPython that has started since.
    let mut python_looks = if matches!(cfg.mode, Mode::Run { .. }) { 30 } else { 0 };
    // Several processes: the session goes on after the first one ends, while others run.
    let mut first_alive = true;
    loop {
        tokio::select! {
            _ = async { match fleet.as_mut() { Some(f) => f.forked().await, None => std::future::pending().await } } => {
                if let Some(f) = fleet.as_mut() {
                    let mut ctx = fleet::Joining { cfg, probes, unwind, symbolizer, first_stub: inproc.as_ref().map(|i| &i.installed) };
                    for line in f.take_forks(&mut ctx) {
                        progress(cfg, format_args!("{line}"));
                    }
                }
            }
            _ = &mut sleep_until_deadline => return Ok(("duration", None)),
            _ = sigint.recv() => return Ok(("signal", None)),
            _ = sigterm.recv() => return Ok(("signal", None)),
            req = async { match live.as_mut() { Some(l) => l.request().await, None => std::future::pending().await } } => {
                match req {
                    crate::live::Request::Quit => return Ok(("quit", None)),
                    crate::live::Request::Snapshot => {
                        let last_scan = scanner.as_ref().and_then(|s| s.last.as_ref());
                        if let Err(e) = reporting.snapshot(tracker, stacks, symbolizer, statuses, last_scan) {
                            progress(cfg, format_args!("snapshot failed: {e:#}"));
                        }
                        if let Some(l) = live.as_mut() {
                            let sites = tracker.sites();
                            let processes = processes_in(fleet.as_ref());
                            l.publish(cfg, pid, &identity.exe, tracker, &sites, processes, stacks, symbolizer, last_scan);
                        }
                    }
                }
            }
            _ = exit_poll.tick(), if at_exit => {
                if probes.counters().is_ok_and(|c| c.get(leakprobe_common::counter::EXIT_STOPS) > 0) {
                    progress(cfg, format_args!("PID {pid} called exit(); stopped there for the scan"));
                    return Ok(("exit-called", None));
                }
            }
            _ = exited.readable(), if first_alive => {
                let status = child.as_mut().and_then(|c| c.wait().ok()).map(|s| {
                    use std::os::unix::process::ExitStatusExt as _;
                    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
                });
                progress(cfg, format_args!("PID {pid} exited"));
                first_alive = false;
                let others = fleet.as_mut().is_some_and(|f| f.first_ended(probes));
                if !others {
                    return Ok(("target-exited", status));
                }
                progress(cfg, format_args!("the other processes are still traced"));
            }
            _ = ticker.tick() => {
                if let Some(f) = fleet.as_mut() {
                    let mut ctx = fleet::Joining { cfg, probes, unwind, symbolizer, first_stub: inproc.as_ref().map(|i| &i.installed) };
                    let (lines, running) = f.look(&mut ctx);
                    for line in lines {
                        progress(cfg, format_args!("{line}"));
                    }
                    reporting.processes = Some(processes_report(f, probes, inproc.as_ref()));
                    if !running {
                        return Ok(("targets-exited", None));
                    }
                }
                // Exited (perhaps its PID already reused): nothing more is read from /proc for
                // this PID; the pidfd branch ends the trace.
                if target::pidfd_exited(exited.get_ref()) && fleet.is_none() {
                    continue;
                }
                // Tests only: leakprobe's own panic while attached must leave nothing behind.
                if std::mem::take(&mut test_panic) {
                    panic!("LEAKPROBE_TEST_PANIC_AFTER_ATTACH is set");
                }
                let execed = probes.target_execed().unwrap_or(false)
                    || (target::exe_of(pid) != first_exe && target::still_same(identity));
                if execed {
                    progress(cfg, format_args!("PID {pid} called exec; stopping so images are not mixed"));
                    return Ok(("target-exec", None));
                }
                // Ages come from walking every live block: only when --min-age needs them each
                // interval; the final report always has them.
                let read_live = tracker.min_age_ns() > 0;
                let mut sample = probes
                    .sample(monotonic_ns(), tracker.min_age_ns(), read_live)
                    .context("reading eBPF maps")?;
                sample.memory = crate::target::memory::read(pid);
                if let Some(js) = stacks.js_heap.as_mut() {
                    js.poll_into(&mut sample, false);
                }
                tracker.ingest(sample);
                let _ = symbolizer.modules.refresh(identity);
                // Libraries loaded since (dlopen) get unwind rows too.
                if let Err(e) = sync_unwind(cfg, probes, unwind, pid, 0) {
                    tracing::warn!("updating unwind tables: {e:#}");
                }
                // ...and, in-process, their GOT slots point at the stub from now on.
                if let Some(i) = inproc.as_mut() {
                    let now = tracker.window_s();
                    if let Some(msg) = i.patch_late_modules(pid, now, last_look) {
                        progress(cfg, format_args!("{msg}"));
                    }
                    last_look = now;
                }
                if python_looks > 0 {
                    python_looks -= 1;
                    let lines = stacks.look_for_python(pid, cfg.sample_bytes, fleet.is_none(), probes, statuses)?;
                    for line in &lines {
                        progress(cfg, format_args!("{line}"));
                    }
                    if !lines.is_empty() {
                        python_looks = 0;
                    }
                }
                let sites = tracker.sites();
                stacks.fetch_new(probes, &sites)?;
                // Warm the symbol cache while the target's files are surely there.
                for site in sites.iter().filter(|s| s.outstanding_bytes > 0).take(cfg.top * 4) {
                    let _ = site_frames(&site.key, stacks, symbolizer);
                }
                // A C++ runtime loaded after attach (dlopen, or a dependency's dependency).
                let late_cxx = if *cxx_attached {
                    None
                } else {
                    target::exec_mappings(pid).ok().and_then(|m| target::find_allocators(&m)).and_then(|a| a.cxx)
                };
                if let Some(cxx) = late_cxx {
                    match probes.attach_cxx(&cxx) {
                        Ok(s) => statuses.extend(s),
                        Err(e) => tracing::warn!("C++ runtime mapped after attach, probes failed: {e}"),
                    }
                    *cxx_attached = true;
                }
                if let Some(budget) = cfg.max_overhead {
                    let rate = tracker.last_hit_rate();
                    if rate > budget as f64 {
                        progress(cfg, format_args!(
                            "probe hits {rate:.0}/s exceed --max-overhead {budget}/s: detaching"
                        ));
                        return Ok(("overhead-budget", None));
                    }
                }
                if let Some(sc) = scanner.as_mut()
                    && let Some(every) = sc.every
                    && tracker.window_s() + cfg.interval.as_secs_f64() / 2.0 >= sc.last_at + every.as_secs_f64()
                {
                    stacks.fetch_new(probes, &tracker.sites())?;
                    sc.scan(cfg, probes, tracker.window_s(), stacks, symbolizer, fleet.as_mut());
                }
                let last_scan = scanner.as_ref().and_then(|s| s.last.as_ref());
                if let Err(e) = reporting.snapshot_if_due(tracker, stacks, symbolizer, statuses, last_scan) {
                    tracing::warn!("{e:#}");
                    progress(cfg, format_args!("snapshot failed: {e:#}"));
                }
                // Long attaches: sites that ended long ago leave the maps and our memory.
                let sites = match live::evict_ended(cfg, probes, tracker, stacks, live.as_mut()) {
                    Ok(0) => sites,
                    // Some went (perhaps only some, on an error): read the rest again.
                    evicted => {
                        match evicted {
                            Ok(n) => tracing::info!("{n} ended call sites evicted"),
                            Err(e) => tracing::warn!("{e:#}"),
                        }
                        tracker.sites()
                    }
                };
                if let Some(l) = live.as_mut() {
                    let processes = processes_in(fleet.as_ref());
                    l.publish(cfg, pid, &identity.exe, tracker, &sites, processes, stacks, symbolizer, last_scan);
                }
                let t = Totals::of(&sites);
                let drops = total_drops(tracker.counters());
                let window = tracker.window_s();
                let msg = format!(
                    "outstanding {} in {} objects at {} growing call sites{}",
                    human_bytes(t.outstanding_bytes),
                    t.outstanding_count,
                    t.growing_sites,
                    if drops > 0 { format!(" (DEGRADED: {drops} dropped)") } else { String::new() },
                );
                // On a terminal the window's bar shows them; top shows them itself (its status
                // line keeps the last event).
                let shown = crate::progress::update(std::time::Duration::from_secs_f64(window), format_args!("{msg}"));
                if !cfg.live_view && !shown {
                    progress(cfg, format_args!("[{window:>6.1}s] {msg}"));
                }
            }
        }
    }
}

/// Processes the session has had (1 for one process): the live view merges sites across
/// them when there are several.
/// The report's processes; the first one's stub is the session's own.
fn processes_report(f: &fleet::Fleet, probes: &Probes, inproc: Option<&InProcess>) -> Vec<report::Process> {
    let mut out = f.report(probes);
    if let (Some(first), Some(i)) = (out.first_mut(), inproc) {
        first.stub = Some(i.process_stub());
    }
    out
}

fn processes_in(fleet: Option<&fleet::Fleet>) -> usize {
    fleet.map_or(1, |f| f.members.len())
}

/// Several processes: the others join (--pid, the children now, the cgroup's members), with a
/// spinner meanwhile and a line for each that could not.
fn join_the_others(cfg: &Config, f: &mut fleet::Fleet, ctx: &mut fleet::Joining<'_>) {
    crate::progress::spinner("attaching to the other processes".to_string());
    let lines = f.join_initial(cfg, ctx);
    crate::progress::done();
    for line in lines {
        progress(cfg, format_args!("{line}"));
    }
    let following = if fleet::Fleet::follows(cfg) { "; following their children" } else { "" };
    progress(cfg, format_args!("tracing {} processes{following}", f.members.len()));
}

/// Tests only: sleep where a race is to be provoked (the named variable holds milliseconds).
fn test_hook_pause(var: &str) {
    let pause = test_hook(var);
    if !pause.is_zero() {
        crate::say!("leakprobe: {var}: pausing {pause:?}");
        std::thread::sleep(pause);
    }
}

/// Tests only: the milliseconds the named variable holds (zero if unset).
fn test_hook(var: &str) -> std::time::Duration {
    let ms = std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    std::time::Duration::from_millis(ms)
}

/// Refuses output paths that are symlinks or not regular files (FIFOs, devices).
/// `leakprobe diff`: reads two reports, compares them (crate::report::diff) and writes the result.
pub fn diff(args: &crate::cli::DiffArgs, quiet: bool) -> anyhow::Result<()> {
    if let Some(out) = &args.output {
        // Not `Refused`: diff attaches nothing, so that note would mislead.
        check_output_path("--output", out, args.output_policy()).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let read = |path: &PathBuf| -> anyhow::Result<crate::report::diff::Named> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(crate::report::diff::parse(&path.display().to_string(), &bytes)?)
    };
    let (a, b) = (read(&args.a)?, read(&args.b)?);
    let d = crate::report::diff::compare(&a, &b, args.force)?;
    let rendered = match args.format {
        Format::Text => crate::report::diff::render(&d, args.top as usize),
        Format::Json => {
            // The text form shows its warnings; JSON readers get them on stderr too.
            if !quiet {
                for w in &d.warnings {
                    crate::say!("leakprobe: warning: {w}");
                }
            }
            crate::report::diff::to_json(&d).context("serializing the comparison")?
        }
    };
    write_output(args.output.as_ref(), &rendered, args.output_policy())
}

/// `FLAG PATH: why`, as a refusal (exit 2, nothing attached).
fn refuse_flag(flag: &str, e: &crate::output::OutputError) -> anyhow::Error {
    anyhow::Error::new(Refused(format!("{flag}: {}", crate::kernel::probe::error_chain(e))))
}

fn check_output_path(
    flag: &str,
    path: &std::path::Path,
    policy: crate::output::Policy,
) -> Result<(), Refused> {
    crate::output::check_file(path, policy)
        .map(|_| ())
        .map_err(|e| Refused(format!("{flag}: {}", crate::kernel::probe::error_chain(&e))))
}

/// --pprof, --flamegraph, --folded: after the report, so a failure here still leaves it.
fn write_exports(
    exports: &crate::cli::ExportOpts,
    report: &report::Report,
    policy: crate::output::Policy,
) -> anyhow::Result<()> {
    use crate::{
        cli::ExportKind,
        report::export::{backrefs, flame, pprof},
    };
    for (kind, path) in exports.paths() {
        let flag = kind.flag();
        let bytes = match kind {
            ExportKind::Pprof => pprof::encode(report),
            ExportKind::Flamegraph => flame::svg(report),
            ExportKind::Folded => Ok(flame::folded_file(report).into_bytes()),
            ExportKind::BackrefsSvg => backrefs::svg(report),
        }
        .with_context(|| format!("{flag} {}", path.display()))?;
        crate::output::write_atomic(path, &bytes, policy).with_context(|| format!("writing {flag}"))?;
    }
    Ok(())
}

fn write_output(path: Option<&PathBuf>, content: &str, policy: crate::output::Policy) -> anyhow::Result<()> {
    match path {
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(content.as_bytes()).context("writing the report to stdout")?;
            out.flush().context("writing the report to stdout")
        }
        Some(path) => {
            crate::output::write_atomic(path, content.as_bytes(), policy).context("writing the report")
        }
    }
}
