//! Several processes in one session (`--pid A,B,C`, `--children`): who is traced, each one's
//! layout and probes, and what is left of those that ended.
//!
//! One BPF object serves them all. Each process has its `TARGETS` entry and its own links of
//! the same programs (the kernel puts a uprobe's breakpoint only into the processes it is
//! attached for, so nothing else on the machine pays for it). Processes forked from one
//! another share a layout: one unwind table in the kernel, one symbol table here. A child
//! forked while traced is in `TARGETS` before it runs (the fork tracepoint); its links follow
//! as soon as the fork ring says so. Meanwhile the follower ([`crate::ptrace::follow`]) holds
//! it at its first instruction, so that nothing it does goes unseen; where it cannot (another
//! tracer, no ptrace), the gap is measured and reported as `blind_ms`.

use std::{collections::BTreeMap, os::fd::OwnedFd};

use aya::maps::{MapData, RingBuf};
use leakprobe_common::{ForkEvent, HeapTotal, MAX_LAYOUTS, TargetState};
use tokio::io::unix::AsyncFd;

use crate::{
    cli::Config,
    inprocess::{
        got::{self, PatchPlan},
        install::Installed,
        stub::counter,
    },
    kernel::{
        probe::{Probes, monotonic_ns},
        unwind,
    },
    ptrace::follow::{Follower, Release},
    report,
    symbolize::{Modules, Symbolizer},
    target::{self, Identity, Mapping, allocator::Plan},
};

/// How a process came to be traced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Named with --pid.
    Listed,
    /// A descendant of a listed process, found when the session started.
    Child,
    /// Forked by a traced process during the session.
    Forked,
    /// In the --cgroup directory (at the start, or joined it since).
    Cgroup,
}

impl Origin {
    fn name(self) -> &'static str {
        match self {
            Origin::Listed => "listed",
            Origin::Child => "child",
            Origin::Forked => "forked",
            Origin::Cgroup => "cgroup",
        }
    }
}

pub struct Member {
    pub identity: Identity,
    pub layout: u32,
    pub origin: Origin,
    pub parent: Option<u32>,
    /// Seconds since the session started when its probes went live.
    pub joined_s: f64,
    /// A forked child: milliseconds from its fork to its probes in which it ran. What it
    /// allocated and freed then was not seen (0 when it was held at birth).
    pub blind_ms: Option<f64>,
    /// A forked child held at birth: milliseconds until its probes were live.
    pub held_ms: Option<f64>,
    pub ended: Option<Ended>,
    pidfd: Option<OwnedFd>,
    /// Probes that failed to attach to it (it is traced by the rest).
    pub probe_errors: Vec<String>,
    /// `--in-process`: the stub it runs.
    stub: Option<MemberStub>,
}

/// `--in-process`: a member's stub, and what the report says of it.
struct MemberStub {
    installed: Installed,
    /// "mapped" or "inherited".
    how: &'static str,
    slots: usize,
    restored: Option<usize>,
    /// Its counters when it joined (a forked child's copy of its parent's), and last read (each
    /// interval: an exited process's are as of the interval before it ended).
    base: [u64; counter::COUNT],
    last: [u64; counter::COUNT],
}

impl MemberStub {
    /// Puts its GOT back while it runs (the follower traces it: no stop of ours), or, when it
    /// is gone (`gone`), only disarms its guard.
    fn finish(&mut self, gone: bool) -> Result<(), crate::inprocess::install::InstallError> {
        let (counters, restored) = self.installed.finish(gone, false);
        self.last = counters.unwrap_or(self.last);
        self.restored = restored?.map(|r| r.0);
        Ok(())
    }

    fn report(&self, running: bool) -> report::processes::ProcessStub {
        let now = match running && self.restored.is_none() {
            true => self.installed.counters().unwrap_or(self.last),
            false => self.last,
        };
        let own = |c: i32| now[c as usize].saturating_sub(self.base[c as usize]);
        report::processes::ProcessStub {
            how: self.how.into(),
            slots: self.slots as u64,
            restored: self.restored.map(|r| r as u64),
            sampled_allocs: own(counter::SAMPLED_ALLOCS),
            sampled_frees: own(counter::SAMPLED_FREES),
        }
    }
}

pub struct Ended {
    pub at_s: f64,
    /// "exited" or "exec".
    pub how: &'static str,
    /// What it still held when it ended.
    pub held: HeapTotal,
    pub drops: u64,
}

/// One address-space layout: the executable mappings that define it, and the plan its
/// processes are attached with.
struct Layout {
    maps: Vec<Mapping>,
    plan: Plan,
}

/// A running member as a scan needs it.
pub struct ScanMember<'f> {
    pub pid: u32,
    pub exe: &'f str,
    /// It runs the first's CPython at the first's addresses (forked from it): the object
    /// census's addresses hold here too.
    pub python: bool,
    pub plan: &'f Plan,
    /// `--in-process`: its stub's code and data (the first's is the session's).
    pub exclude: Vec<(u64, u64)>,
}

/// Ended processes kept in detail.
const MAX_ENDED: usize = 1024;

pub struct Fleet {
    pub members: BTreeMap<u32, Member>,
    layouts: Vec<Layout>,
    follow: bool,
    /// --cgroup: members join and leave with it.
    cgroup: Option<std::path::PathBuf>,
    max: usize,
    /// Processes left untraced because --max-processes was reached (found by us; the fork
    /// tracepoint counts its own in `processes_dropped`).
    pub refused: u64,
    /// Children that called exec before their probes were attached: not followed.
    pub execed_unfollowed: u64,
    /// Ended processes summarized only (past [`MAX_ENDED`]): how many.
    pub ended_forgotten: u64,
    /// `--in-process`: children not traced whose inherited GOT was put back.
    pub stubs_let_go: u64,
    ring: Option<AsyncFd<RingBuf<MapData>>>,
    /// Holds the followed processes' children at birth (when following, and it could start).
    follower: Option<Follower>,
    /// `monotonic_ns` at the session's start.
    start_ns: u64,
}

impl Fleet {
    /// The session's first process, already attached as layout 0 with `plan`.
    pub fn new(cfg: &Config, first: &Identity, plan: Plan, probes: &mut Probes, start_ns: u64) -> Fleet {
        let maps = target::exec_mappings(first.pid).unwrap_or_default();
        let ring = match Fleet::follows(cfg) {
            // SAFETY: the ring's descriptor moves into the AsyncFd and stays open, unchanged,
            // until it drops.
            true => probes.take_fork_ring().and_then(|r| unsafe { AsyncFd::register(r) }.ok()),
            false => None,
        };
        let mut members = BTreeMap::new();
        members.insert(
            first.pid as u32,
            Member {
                identity: first.clone(),
                layout: 0,
                origin: Origin::Listed,
                parent: None,
                joined_s: 0.0,
                blind_ms: None,
                held_ms: None,
                ended: None,
                pidfd: None,
                probe_errors: Vec::new(),
                stub: None,
            },
        );
        Fleet {
            members,
            layouts: vec![Layout { maps, plan }],
            follow: Fleet::follows(cfg),
            cgroup: cfg.cgroup.clone(),
            max: cfg.max_processes as usize,
            refused: 0,
            execed_unfollowed: 0,
            ended_forgotten: 0,
            stubs_let_go: 0,
            ring,
            follower: None,
            start_ns,
        }
    }

    /// More than one process is (or may become) traced.
    pub fn is_many(cfg: &Config) -> bool {
        cfg.children || !cfg.more_pids.is_empty() || cfg.cgroup.is_some()
    }

    /// The processes besides `first` that join at the start (--pid, --cgroup, and with
    /// --children the descendants): an in-process stub goes where it is free in each.
    pub fn initial_others(first: i32, cfg: &Config) -> Vec<i32> {
        let mut out: Vec<i32> = cfg.more_pids.clone();
        if let Some(dir) = &cfg.cgroup {
            out.extend(crate::cli::cgroup_members(dir).unwrap_or_default());
        }
        if cfg.children {
            for p in std::iter::once(first).chain(cfg.more_pids.iter().copied()) {
                out.extend(target::descendants(p, cfg.max_processes as usize));
            }
        }
        out.retain(|p| *p != first);
        out.sort_unstable();
        out.dedup();
        out.truncate(cfg.max_processes as usize);
        out
    }

    /// Whether children are followed: with --children, and in a cgroup (children start in
    /// their parent's, and are traced from their first instruction; one that moves out is
    /// dropped at the next look).
    pub fn follows(cfg: &Config) -> bool {
        cfg.children || cfg.cgroup.is_some()
    }

    /// The processes named after the first, and with --children every descendant of each
    /// listed process now. Returns a line per process that could not be traced.
    pub fn join_initial(&mut self, cfg: &Config, ctx: &mut Joining<'_>) -> Vec<String> {
        let mut lines = Vec::new();
        if self.follow {
            match Follower::start(self.max) {
                Ok(f) => self.follower = Some(f),
                Err(e) => lines.push(format!(
                    "children are traced from just after their fork, not held at birth: the follower did not start: {e}"
                )),
            }
        }
        let first = *self.members.keys().next().unwrap_or(&0);
        for &pid in &cfg.more_pids {
            match self.add(pid as u32, Origin::Listed, None, None, ctx) {
                Ok(note) => lines.extend(note),
                Err(e) => lines.push(format!("PID {pid}: not traced: {e:#}")),
            }
        }
        lines.extend(self.join_cgroup(ctx, false));
        if cfg.children {
            let listed: Vec<u32> =
                std::iter::once(first).chain(cfg.more_pids.iter().map(|p| *p as u32)).collect();
            for parent in listed {
                for child in target::descendants(parent as i32, self.max) {
                    if self.members.contains_key(&(child as u32)) {
                        continue;
                    }
                    match self.add(child as u32, Origin::Child, Some(parent), None, ctx) {
                        Ok(note) => lines.extend(note),
                        Err(e) => lines.push(format!("PID {child} (child of {parent}): not traced: {e:#}")),
                    }
                }
            }
        }
        lines
    }

    /// Traces `pid`: its layout (a known one, or a new one with its unwind table and
    /// symbols), its `TARGETS` entry (the fork tracepoint made a forked child's already) and
    /// its links.
    fn add(
        &mut self,
        pid: u32,
        origin: Origin,
        parent: Option<u32>,
        forked: Option<&TargetState>,
        ctx: &mut Joining<'_>,
    ) -> anyhow::Result<Option<String>> {
        let added = self.try_add(pid, origin, parent, forked, ctx);
        if added.is_err() && forked.is_some() {
            // Born traced, and not traced after all: out of TARGETS, and its copy of a
            // parent's patched GOT put back.
            ctx.probes.detach_process(pid);
            self.restore_inherited(pid, ctx);
        }
        added
    }

    fn try_add(
        &mut self,
        pid: u32,
        origin: Origin,
        parent: Option<u32>,
        forked: Option<&TargetState>,
        ctx: &mut Joining<'_>,
    ) -> anyhow::Result<Option<String>> {
        use anyhow::Context as _;
        if self.running() >= self.max {
            self.refused += 1;
            anyhow::bail!("--max-processes {} reached", self.max);
        }
        let identity = target::identify(pid as i32)?;
        let pidfd = target::pidfd_open(pid as i32).ok();
        let layout = match forked {
            // A fork copies its parent's address space.
            Some(t) => t.layout,
            None => self.layout_for(&identity, ctx)?,
        };
        let stub = match ctx.first_stub {
            Some(first) => Some(self.stub_for(pid, layout, forked.is_some(), first, ctx.cfg)?),
            None => None,
        };
        ctx.symbolizer.set_layout(pid, layout);
        if forked.is_none() {
            ctx.probes.add_target(pid, layout, self.follow).context("adding it to the traced processes")?;
        }
        let plan = &self.layouts.get(layout as usize).context("a layout without a plan")?.plan;
        let t_attach = std::time::Instant::now();
        let attached = ctx.probes.attach_process(pid, plan).and_then(|mut st| {
            if let Some((s, _)) = &stub {
                st.extend(ctx.probes.attach_process_sites(pid, &s.sites())?);
            }
            Ok(st)
        });
        tracing::info!("PID {pid}: probes attached in {:?}", t_attach.elapsed());
        let statuses = match attached {
            Ok(s) => s,
            Err(e) => {
                ctx.probes.detach_process(pid);
                return Err(e).context("attaching its probes");
            }
        };
        // Only now, with its report sites watched, does its GOT lead into its stub.
        let stub = match stub {
            Some((mut s, plan)) => {
                if let Some(plan) = plan {
                    s.patch(&plan).context("patching its GOT")?;
                }
                let base = s.counters().unwrap_or_default();
                let how = if forked.is_some() { "inherited" } else { "mapped" };
                let slots = s.patched_slots();
                Some(MemberStub { installed: s, how, slots, restored: None, base, last: base })
            }
            None => None,
        };
        let now = monotonic_ns();
        let blind_ms = forked.map(|t| now.saturating_sub(t.forked_ns) as f64 / 1e6);
        // A forked child is followed already (it was born traced, as its parent is).
        let note = if forked.is_none() { self.hold_children_of(pid) } else { None };
        let probe_errors = statuses
            .iter()
            .filter_map(|s| {
                s.error.as_ref().map(|e| format!("{} in {}: {e}", s.function, s.module.display()))
            })
            .collect();
        self.members.insert(
            pid,
            Member {
                identity,
                layout,
                origin,
                parent,
                joined_s: now.saturating_sub(self.start_ns) as f64 / 1e9,
                blind_ms,
                held_ms: None,
                ended: None,
                pidfd,
                probe_errors,
                stub,
            },
        );
        Ok(note)
    }

    /// `--in-process`: the stub `pid` runs, inherited from the process it was forked from, or
    /// mapped for it now (one stop) at the address of the first's, with the GOT plan to patch
    /// once its report sites are watched.
    fn stub_for(
        &self,
        pid: u32,
        layout: u32,
        forked: bool,
        first: &Installed,
        cfg: &Config,
    ) -> anyhow::Result<(Installed, Option<PatchPlan>)> {
        use anyhow::Context as _;
        let first_maps = &self.layouts.first().context("no first layout")?.maps;
        let maps = match layout {
            0 => first_maps.clone(),
            _ => target::exec_mappings(pid as i32)?,
        };
        let real: Vec<u64> = first.real.iter().map(|r| r.1).collect();
        if !same_code(first_maps, &maps, &real) {
            anyhow::bail!(
                "--in-process traces the processes whose allocator is mapped where the first one's is \
                 (forked from one another); this one was started on its own: trace it in a session of its own"
            );
        }
        if forked {
            let source = self.stub_source(pid, first).context("it maps no stub of ours (exec?)")?;
            return Ok((source.adopt(pid as i32)?, None));
        }
        let mem = crate::ptrace::Mem::open(pid as i32)?;
        let plan = got::plan_pid(pid as i32, |a| mem.read_u64(a).ok())?;
        let s =
            Installed::map_at(pid as i32, &plan, cfg.sample_bytes, super::IN_PROCESS_MAX_PAUSE, first.code)?;
        Ok((s, Some(plan)))
    }

    /// The stub (the first's, or a member's) that `pid` maps: the one it was forked with.
    fn stub_source<'s>(&'s self, pid: u32, first: &'s Installed) -> Option<&'s Installed> {
        std::iter::once(first)
            .chain(self.members.values().filter_map(|m| m.stub.as_ref().map(|s| &s.installed)))
            .find(|s| s.mapped_by(pid as i32))
    }

    /// `--in-process`: a child that will not be traced must not run our stub: its copy of its
    /// parent's GOT is put back (written while it runs, as the guard would).
    fn restore_inherited(&mut self, pid: u32, ctx: &Joining<'_>) {
        let Some(first) = ctx.first_stub else { return };
        if let Some(source) = self.stub_source(pid, first) {
            match source.restore_inherited(pid as i32) {
                Ok(n) if n > 0 => self.stubs_let_go += 1,
                Ok(_) => {}
                Err(e) => tracing::warn!("PID {pid}: {e:#}"),
            }
        }
    }

    /// `--in-process`, at the end: every running member's GOT put back (the first's is the
    /// session's, done between [`Fleet::restore_stubs`] and [`Fleet::restore_newborns`]).
    /// Lines for those that failed (their guards restore them when leakprobe exits).
    pub fn restore_stubs(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        for (pid, m) in self.members.iter_mut() {
            let running = m.ended.is_none();
            if let Some(st) = m.stub.as_mut().filter(|st| st.restored.is_none())
                && let Err(e) = st.finish(!running)
            {
                lines.push(format!("PID {pid}: {e:#} (its guard puts it back when leakprobe exits)"));
            }
        }
        lines
    }

    /// `--in-process`, after every member's GOT is back: children forked before that (held at
    /// birth, or not joined yet) hold a copy of a patched GOT. Each is put back, until a pass
    /// finds none.
    pub fn restore_newborns(&mut self, ctx: &mut Joining<'_>) {
        for _ in 0..8 {
            let newborns: Vec<u32> = ctx
                .probes
                .targets()
                .unwrap_or_default()
                .into_iter()
                .map(|(tgid, _)| tgid)
                .filter(|t| self.members.get(t).is_none_or(|m| m.ended.is_some()))
                .collect();
            if newborns.is_empty() {
                return;
            }
            for child in newborns {
                ctx.probes.detach_process(child);
                self.restore_inherited(child, ctx);
                if let Some(f) = self.follower.as_mut() {
                    let _ = f.release(child as i32, false);
                }
            }
        }
    }

    /// The running members a scan goes through, one at a time, each with what differs from
    /// the first's setup: our own memory in it, its allocator, and whether it runs the first's
    /// CPython where the first does (`python_code`: an address in its code).
    pub fn scan_members(&self, python_code: &[u64]) -> Vec<ScanMember<'_>> {
        let first_maps = self.layouts.first().map_or(&[][..], |l| &l.maps[..]);
        self.members
            .iter()
            .filter(|(_, m)| m.ended.is_none())
            .filter_map(|(pid, m)| {
                let layout = self.layouts.get(m.layout as usize)?;
                let exclude = m.stub.as_ref().map(|s| s.installed.ranges()).unwrap_or_default();
                let python = m.layout == 0
                    || !python_code.is_empty() && same_code(first_maps, &layout.maps, python_code);
                Some(ScanMember { pid: *pid, exe: &m.identity.exe, python, plan: &layout.plan, exclude })
            })
            .collect()
    }

    /// The follower lets go of `pid` for its scan: the ptrace server cannot stop a process
    /// another tracer holds. Its children forked meanwhile are seen from just after their fork.
    /// Returns a line if the follower has gone.
    pub fn lend(&mut self, pid: u32) -> Option<String> {
        let f = self.follower.as_mut()?;
        let e = f.unfollow(pid as i32).err()?;
        Some(self.follower_lost(e))
    }

    /// After its scan, `pid` is followed again (see [`Fleet::lend`]).
    pub fn take_back(&mut self, pid: u32) -> Option<String> {
        if self.members.get(&pid).is_none_or(|m| m.ended.is_some()) {
            return None;
        }
        self.hold_children_of(pid)
    }

    /// The follower traces `pid`, so that its children are held at birth. Returns a line if it
    /// cannot (they are then seen from just after their fork).
    fn hold_children_of(&mut self, pid: u32) -> Option<String> {
        let f = self.follower.as_mut()?;
        let e = f.follow(pid as i32).err()?;
        if matches!(e, crate::ptrace::PtraceError::Helper { .. }) {
            return Some(self.follower_lost(e));
        }
        Some(format!("PID {pid}: its children are traced from just after their fork, not held at birth: {e}"))
    }

    /// The follower failed to answer (it has gone): children are seen from just after their
    /// fork from now on. The line to say so.
    fn follower_lost(&mut self, e: crate::ptrace::PtraceError) -> String {
        self.follower = None;
        format!(
            "the follower ended ({e}): children are now traced from just after their fork, not held at birth"
        )
    }

    /// The first process is followed too (after `run`'s held command is let go: until then
    /// it is traced by us). Returns a line if it cannot be.
    pub fn follow_first(&mut self) -> Option<String> {
        let first = *self.members.keys().next()?;
        self.hold_children_of(first)
    }

    /// Lets a child held at birth go; its report then says whether it ran unseen.
    fn release(&mut self, child: u32) -> Option<String> {
        let f = self.follower.as_mut()?;
        super::test_hook_pause("LEAKPROBE_TEST_RELEASE_PAUSE_MS");
        // A child refused (--max-processes, gone) is let go by the follower too.
        let traced = self.members.get(&child).is_some_and(|m| m.ended.is_none());
        let released = match f.release(child as i32, traced) {
            Ok(r) => r,
            Err(e) => return Some(self.follower_lost(e)),
        };
        if released == Release::NotHeld && traced {
            // Forked while its parent was lent for a scan: not traced by the follower yet.
            let alive = self
                .members
                .get(&child)
                .and_then(|m| m.pidfd.as_ref())
                .is_none_or(|fd| !target::pidfd_exited(fd));
            return self.hold_children_of(child).filter(|_| alive);
        }
        let m = self.members.get_mut(&child)?;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        match released {
            Release::Held { .. } | Release::BeforeItsStop => {
                m.held_ms = m.blind_ms.take();
                m.blind_ms = Some(0.0);
            }
            Release::TimedOut { held } => {
                m.held_ms = Some(ms(held));
                m.blind_ms = m.blind_ms.map(|b| (b - ms(held)).max(0.0));
            }
            Release::NotHeld => {}
        }
        None
    }

    /// The layout whose mappings the process has, or a new one (its unwind rows, module table and
    /// symbols loaded, its allocator planned).
    fn layout_for(&mut self, identity: &Identity, ctx: &mut Joining<'_>) -> anyhow::Result<u32> {
        let pid = identity.pid as u32;
        use anyhow::Context as _;
        let maps = target::exec_mappings(pid as i32)?;
        if let Some(i) = self.layouts.iter().position(|l| same_layout(&l.maps, &maps)) {
            return Ok(i as u32);
        }
        let layout = self.layouts.len() as u32;
        if layout >= MAX_LAYOUTS {
            anyhow::bail!(
                "{MAX_LAYOUTS} address-space layouts are traced already (processes started on their own each \
                 have one; forked workers share their parent's)"
            );
        }
        let modules = target::allocator::scan(pid as i32)?;
        let plan = target::allocator::plan(
            pid as i32,
            &identity.exe,
            &modules,
            &target::allocator::preloads(pid as i32),
            &ctx.cfg.allocator,
        )?;
        // In-process, the stub takes the allocation family: its mmap/munmap keep their uprobes.
        let plan = match ctx.first_stub {
            Some(_) => super::in_process_hooks(&plan),
            None => plan,
        };
        super::sync_unwind(ctx.cfg, ctx.probes, ctx.unwind, pid as i32, layout)
            .context("loading unwind tables")?;
        let mut symbols = Modules::default();
        let _ = symbols.refresh(identity);
        let index = ctx.symbolizer.add_layout(symbols);
        debug_assert_eq!(index, layout);
        self.layouts.push(Layout { maps, plan });
        Ok(layout)
    }

    /// Waits until the fork tracepoint reports a child (never, when not following).
    pub async fn forked(&mut self) {
        match self.ring.as_mut() {
            Some(r) => {
                if let Ok(mut guard) = r.readable_mut().await {
                    guard.clear_ready();
                }
            }
            None => std::future::pending().await,
        }
    }

    /// Traces every child the fork ring reported; returns a line per child that could not be.
    pub fn take_forks(&mut self, ctx: &mut Joining<'_>) -> Vec<String> {
        let mut events = Vec::new();
        if let Some(r) = self.ring.as_mut() {
            let ring = r.get_mut();
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<ForkEvent>() {
                    // SAFETY: the tracepoint writes whole ForkEvents, a plain #[repr(C)] struct.
                    events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ForkEvent>()) });
                }
            }
        }
        let mut lines = Vec::new();
        for e in events {
            lines.extend(self.join_forked(e.child, Some(e.parent), ctx));
        }
        lines
    }

    /// --cgroup: its processes that are not traced yet join.
    fn join_cgroup(&mut self, ctx: &mut Joining<'_>, say_joins: bool) -> Vec<String> {
        let Some(dir) = self.cgroup.clone() else { return Vec::new() };
        let mut lines = Vec::new();
        for pid in crate::cli::cgroup_members(&dir).unwrap_or_default() {
            let pid = pid as u32;
            if self.members.get(&pid).is_some_and(|m| m.ended.is_none()) {
                continue;
            }
            // A process that left and came back is a member again, with a fresh entry.
            self.members.remove(&pid);
            match self.add(pid, Origin::Cgroup, None, None, ctx) {
                Ok(note) => {
                    if say_joins {
                        lines.push(format!("PID {pid} joined {}: traced", dir.display()));
                    }
                    lines.extend(note);
                }
                Err(e) => lines.push(format!("PID {pid} (in {}): not traced: {e:#}", dir.display())),
            }
        }
        lines
    }

    /// --cgroup: running members that are no longer in it.
    fn left_cgroup(&self) -> Vec<u32> {
        let Some(dir) = &self.cgroup else { return Vec::new() };
        let Ok(now) = crate::cli::cgroup_members(dir) else { return Vec::new() };
        self.members
            .iter()
            .filter(|(pid, m)| m.ended.is_none() && now.binary_search(&(**pid as i32)).is_err())
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// Seconds since the session started, on the clock `joined_s` is on.
    fn now_s(&self) -> f64 {
        monotonic_ns().saturating_sub(self.start_ns) as f64 / 1e9
    }

    /// Members still running.
    fn running(&self) -> usize {
        self.members.values().filter(|m| m.ended.is_none()).count()
    }

    /// A child in `TARGETS` that is not a member yet (forked, reported or not).
    fn trace_forked(&mut self, child: u32, parent: Option<u32>, ctx: &mut Joining<'_>) -> Option<String> {
        let state = ctx.probes.target_state(child).ok().flatten()?;
        if state.flags & leakprobe_common::target_flag::EXECED != 0 {
            // Forked and exec'd before we got to it (a shell, a helper): another program,
            // not followed (yet).
            ctx.probes.detach_process(child);
            self.execed_unfollowed += 1;
            return None;
        }
        self.add(child, Origin::Forked, parent, Some(&state), ctx)
            .err()
            .map(|e| format!("PID {child} (forked): not traced: {e:#}"))
    }

    /// A forked child joins (or is refused), and is let go if it was held at birth.
    fn join_forked(&mut self, child: u32, parent: Option<u32>, ctx: &mut Joining<'_>) -> Vec<String> {
        let joined = match self.members.get(&child) {
            // Joined already.
            Some(m) if m.ended.is_none() => return Vec::new(),
            // Its PID was an ended member's, still in the report: not traced (the fork
            // tracepoint counted it), and let go at once rather than held for nothing.
            Some(_) => {
                self.restore_inherited(child, ctx);
                None
            }
            None => self.trace_forked(child, parent, ctx),
        };
        joined.into_iter().chain(self.release(child)).collect()
    }

    /// Every interval: children whose fork event was lost, members that ended (exit or exec;
    /// their links go, what they held is kept), and whether any member still runs.
    pub fn look(&mut self, ctx: &mut Joining<'_>) -> (Vec<String>, bool) {
        let now_s = self.now_s();
        let mut lines = Vec::new();
        if self.follow
            && let Ok(targets) = ctx.probes.targets()
        {
            for (tgid, _) in targets {
                if !self.members.contains_key(&tgid) {
                    lines.extend(self.join_forked(tgid, None, ctx));
                }
            }
        }
        let left = self.left_cgroup();
        let primary = *self.members.keys().next().unwrap_or(&0);
        // Those that run on, out of the session: their children are no longer held.
        let mut unfollow = Vec::new();
        for (pid, m) in self.members.iter_mut() {
            if m.ended.is_some() {
                continue;
            }
            // Its stub's counters as of now: once it has exited they cannot be read.
            if let Some(st) = m.stub.as_mut() {
                st.last = st.installed.counters().unwrap_or(st.last);
            }
            let state = ctx.probes.target_state(*pid).ok().flatten();
            let execed = state.is_some_and(|t| t.flags & leakprobe_common::target_flag::EXECED != 0);
            // The first process's exit and exec are the session's to notice.
            let exited = *pid != primary && m.pidfd.as_ref().is_none_or(target::pidfd_exited);
            let how = match (exited, execed && *pid != primary, left.contains(pid)) {
                (true, _, _) => "exited",
                (_, true, _) => "exec",
                (_, _, true) => "left the cgroup",
                _ => continue,
            };
            let last = ctx.probes.detach_process(*pid).or(state).unwrap_or_default();
            if how != "exited" {
                unfollow.push(*pid);
            }
            // Gone (exited, or another program after exec): nothing of ours is left in it. One
            // that left the cgroup runs on: its GOT is put back.
            if let Some(st) = m.stub.as_mut()
                && let Err(e) = st.finish(how != "left the cgroup")
            {
                lines.push(format!("PID {pid}: {e:#} (its guard puts it back when leakprobe exits)"));
            }
            m.ended = Some(Ended { at_s: now_s, how, held: last.heap, drops: last.drops });
            m.pidfd = None;
            if let (true, Some(dir)) = (how == "left the cgroup", &self.cgroup) {
                lines.push(format!("PID {pid} left {}: no longer traced", dir.display()));
            }
        }
        for pid in unfollow {
            if let Some(Err(e)) = self.follower.as_mut().map(|f| f.unfollow(pid as i32)) {
                lines.push(self.follower_lost(e));
            }
        }
        lines.extend(self.join_cgroup(ctx, true));
        self.forget_oldest_ended();
        (lines, self.members.values().any(|m| m.ended.is_none()))
    }

    /// Keeps at most [`MAX_ENDED`] ended processes in detail (workers recycled for days would
    /// otherwise grow this without bound); their sites stay in the tracker.
    fn forget_oldest_ended(&mut self) {
        let ended = self.members.len() - self.running();
        if ended <= MAX_ENDED {
            return;
        }
        let mut by_end: Vec<(f64, u32)> =
            self.members.iter().filter_map(|(p, m)| m.ended.as_ref().map(|e| (e.at_s, *p))).collect();
        by_end.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (_, pid) in by_end.into_iter().take(ended - MAX_ENDED) {
            self.members.remove(&pid);
            self.ended_forgotten += 1;
        }
    }

    /// The first process ended (its pidfd said so); the session goes on while others run.
    pub fn first_ended(&mut self, probes: &Probes) -> bool {
        let now_s = self.now_s();
        let Some((pid, m)) = self.members.iter_mut().next() else { return false };
        if m.ended.is_none() {
            let last = probes.target_state(*pid).ok().flatten().unwrap_or_default();
            m.ended = Some(Ended { at_s: now_s, how: "exited", held: last.heap, drops: last.drops });
        }
        self.members.values().any(|m| m.ended.is_none())
    }

    /// The report's view of every process.
    pub fn report(&self, probes: &Probes) -> Vec<report::Process> {
        self.members
            .iter()
            .map(|(pid, m)| {
                let (held, drops) = match &m.ended {
                    Some(e) => (e.held, e.drops),
                    None => {
                        let t = probes.target_state(*pid).ok().flatten().unwrap_or_default();
                        (t.heap, t.drops)
                    }
                };
                report::Process {
                    pid: *pid,
                    exe: m.identity.exe.clone(),
                    origin: m.origin.name().into(),
                    parent: m.parent,
                    layout: m.layout,
                    joined_s: m.joined_s,
                    blind_ms: m.blind_ms,
                    held_ms: m.held_ms,
                    ended_s: m.ended.as_ref().map(|e| e.at_s),
                    ended_by: m.ended.as_ref().map(|e| e.how.into()),
                    tracked_bytes: held.bytes,
                    tracked_count: crate::kernel::probe::scaled_count(held.count),
                    peak_bytes: held.peak_bytes,
                    drops,
                    probe_errors: m.probe_errors.clone(),
                    stub: m.stub.as_ref().map(|st| st.report(m.ended.is_none())),
                    ..Default::default()
                }
            })
            .collect()
    }
}

/// What adding a process needs from the session.
pub struct Joining<'a> {
    pub cfg: &'a Config,
    pub probes: &'a mut Probes,
    pub unwind: &'a mut unwind::Loaded,
    pub symbolizer: &'a mut Symbolizer,
    /// `--in-process`: the first process's stub (every other one is at its address).
    pub first_stub: Option<&'a Installed>,
}

/// Whether the code at each of `addrs` (in `first`: the real allocation functions, CPython's
/// evaluation loop) is the same file at the same address in `other`: a worker that loaded more
/// libraries after its fork (NSS modules for its user switch, a WSGI app's extensions) is
/// another layout, but runs the first's allocator, where the eBPF side's one allocator range
/// says, and the first's interpreter, whose addresses the Python object census uses.
fn same_code(first: &[Mapping], other: &[Mapping], addrs: &[u64]) -> bool {
    let at = |maps: &[Mapping], a: u64| {
        maps.iter()
            .find(|m| m.start <= a && a < m.end)
            .map(|m| (m.start, m.end, m.file_offset, m.dev, m.inode))
    };
    addrs.iter().all(|&a| at(first, a).is_some_and(|m| Some(m) == at(other, a)))
}

/// Two processes have one layout when they map the same files at the same addresses. Our
/// own stub (`--in-process`) is left out: the first process maps it before the others.
fn same_layout(a: &[Mapping], b: &[Mapping]) -> bool {
    let theirs = |m: &&Mapping| !m.path.to_string_lossy().contains("leakprobe-stub");
    let key = |m: &Mapping| (m.start, m.end, m.file_offset, m.dev, m.inode);
    a.iter().filter(theirs).map(key).eq(b.iter().filter(theirs).map(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(start: u64, path: &str, inode: u64) -> Mapping {
        Mapping { start, end: start + 0x1000, file_offset: 0, path: path.into(), dev: (8, 1), inode }
    }

    #[test]
    fn a_layout_is_the_same_with_or_without_our_stub() {
        let worker = vec![m(0x1000, "/usr/sbin/nginx", 5), m(0x7f00_0000_0000, "/usr/lib/libc.so.6", 9)];
        // The first process maps the stub before its workers are read: still one layout.
        let mut first = worker.clone();
        first.insert(1, m(0x7eff_0000_0000, "/memfd:leakprobe-stub (deleted)", 1234));
        assert!(same_layout(&first, &worker));
        assert!(same_layout(&worker, &first));
        // Another library, or one moved by ASLR, is another layout.
        let mut moved = worker.clone();
        moved[1].start += 0x10_0000;
        assert!(!same_layout(&moved, &worker));
        let mut more = worker.clone();
        more.push(m(0x7f10_0000_0000, "/usr/lib/libz.so.1", 11));
        assert!(!same_layout(&more, &worker));
    }

    #[test]
    fn a_worker_with_more_libraries_runs_the_same_code() {
        let first = vec![m(0x1000, "/usr/sbin/nginx", 5), m(0x7f00_0000_0000, "/usr/lib/libc.so.6", 9)];
        let malloc = 0x7f00_0000_0800;
        // NSS modules loaded after the fork: another layout, the same allocator.
        let mut worker = first.clone();
        worker.push(m(0x7f20_0000_0000, "/usr/lib/libnss_systemd.so.2", 12));
        assert!(same_code(&first, &worker, &[malloc]));
        // libc elsewhere (started on its own), or another file there: not the same.
        let mut moved = first.clone();
        moved[1].start += 0x10_0000;
        moved[1].end += 0x10_0000;
        assert!(!same_code(&first, &moved, &[malloc]));
        let mut other = first.clone();
        other[1].inode = 10;
        assert!(!same_code(&first, &other, &[malloc]));
        // An address the first does not map is never the same.
        assert!(!same_code(&first, &worker, &[0x10]));
    }
}
