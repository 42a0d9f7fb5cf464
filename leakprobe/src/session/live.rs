//! The session's side of live monitoring: each interval, a [`View`] of the tracker goes to the
//! Prometheus exporter and the terminal view; ended sites are evicted so that long attaches
//! stay bounded.

use std::{collections::HashMap, sync::Arc};

use anyhow::Context as _;
use leakprobe_common::SiteKey;

use crate::{
    cli::Config,
    kernel::probe::Probes,
    live::{self, Classes, Label, Request, Tap, View, metrics},
    model::{SiteStats, Tracker},
    report::scan::Reachability,
    symbolize::Symbolizer,
};

use super::{StackCache, scan::Done, site_frames};

/// Sites shown by the terminal view (it filters and sorts them itself).
const VIEW_SITES: usize = 200;

pub(super) struct Live {
    views: tokio::sync::watch::Sender<Arc<View>>,
    /// The terminal view's requests; none without one (or once it is gone).
    requests: Option<tokio::sync::mpsc::UnboundedReceiver<Request>>,
    _server: Option<metrics::Server>,
    /// Labels by site: symbolized once.
    labels: HashMap<SiteKey, Label>,
    top: usize,
}

impl Live {
    /// Starts the exporter (binding its port now, so a taken port is refused before anything
    /// is attached) and connects the terminal view, if any.
    pub(super) fn start(cfg: &Config, tap: Option<Tap>) -> anyhow::Result<Option<Live>> {
        if cfg.metrics.is_none() && tap.is_none() {
            return Ok(None);
        }
        let (views, requests) = match tap {
            Some(t) => (t.views, Some(t.requests)),
            None => (tokio::sync::watch::channel(Arc::new(View::default())).0, None),
        };
        let server = match cfg.metrics {
            Some(addr) => {
                let export = metrics::Export { top: cfg.metrics_top, per_process: cfg.metrics_per_process };
                let s = metrics::serve(addr, views.subscribe(), export)?;
                super::progress(cfg, format_args!("serving Prometheus metrics at http://{}/metrics", s.addr));
                Some(s)
            }
            None => None,
        };
        let top = if cfg.live_view { cfg.metrics_top.max(VIEW_SITES) } else { cfg.metrics_top };
        Ok(Some(Live { views, requests, _server: server, labels: HashMap::new(), top }))
    }

    /// The next request of the terminal view (pending forever without one). A view that is
    /// gone (its thread ended) asks to detach, as `q` does.
    pub(super) async fn request(&mut self) -> Request {
        let Some(requests) = self.requests.as_mut() else { return std::future::pending().await };
        let next = requests.recv().await;
        next.unwrap_or_else(|| {
            self.requests = None;
            Request::Quit
        })
    }

    /// Publishes the view of this interval.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn publish(
        &mut self,
        cfg: &Config,
        pid: i32,
        exe: &str,
        tracker: &Tracker,
        sites: &[SiteStats],
        processes: usize,
        stacks: &StackCache,
        symbolizer: &mut Symbolizer,
        scan: Option<&Done>,
    ) {
        let by_stack: HashMap<String, (Reachability, u64)> = scan
            .map(|d| d.sites.iter().map(|s| (s.stack_id.clone(), (s.reachability, s.cycle_bytes))).collect())
            .unwrap_or_default();
        let scanned = |key: &SiteKey| by_stack.get(&format!("{:016x}", key.stack_id)).cloned();
        let totals = scan.map(|d| Classes::of(&d.scan.totals));
        let inputs = live::Inputs {
            pid,
            exe,
            sample_bytes: cfg.sample_bytes,
            top: self.top,
            sites_evicted: tracker.evicted().sites,
            scanned: &scanned,
            scan_at_s: scan.map(|d| d.scan.at_s),
            scan_totals: totals,
            python_objects: scan
                .and_then(|d| d.scan.python_objects.as_ref())
                .map(|p| {
                    p.types
                        .iter()
                        .take(self.top)
                        .map(|t| live::PythonTypeCount { name: t.label(), count: t.count, bytes: t.bytes })
                        .collect()
                })
                .unwrap_or_default(),
        };
        let labels = &mut self.labels;
        let mut view = live::compose(tracker, sites, processes, &inputs, |s| {
            labels
                .entry(s.key)
                .or_insert_with(|| {
                    let (mut frames, _) = site_frames(&s.key, stacks, symbolizer);
                    // A frame without a symbol is named by its offset in its file, as pprof
                    // does: where the module was mapped must not change the site's id.
                    for f in frames.iter_mut().filter(|f| f.function.is_none()) {
                        if let Some((m, _)) =
                            symbolizer.modules.iter().find(|(m, _)| (m.start..m.end).contains(&f.address))
                        {
                            f.address = f.address - m.start + m.file_offset;
                        }
                    }
                    live::label(s.kind.map_or("unknown", |k| k.name()), &frames)
                })
                .clone()
        });
        view.status = crate::progress::last();
        let _ = self.views.send(Arc::new(view));
    }

    /// The last view says the session is over, and why.
    pub(super) fn finish(&mut self, ended_by: &str) {
        let mut view = (**self.views.borrow()).clone();
        view.ended = Some(ended_by.to_string());
        view.status = crate::progress::last();
        let _ = self.views.send(Arc::new(view));
    }

    pub(super) fn forget(&mut self, keys: &[SiteKey]) {
        for k in keys {
            self.labels.remove(k);
        }
    }
}

/// Evicts the sites that ended `--evict-after` ago: from the kernel's maps (room for new
/// stacks), the tracker, the stack cache and the labels. Returns how many went.
pub(super) fn evict_ended(
    cfg: &Config,
    probes: &mut Probes,
    tracker: &mut Tracker,
    stacks: &mut StackCache,
    live: Option<&mut Live>,
) -> anyhow::Result<usize> {
    let ended = tracker.ended_sites(cfg.evict_after.as_nanos() as u64);
    if ended.is_empty() {
        return Ok(0);
    }
    let gone = probes.evict_sites(&ended).context("evicting ended call sites")?;
    tracker.evict(&gone);
    let in_use = tracker.stacks_in_use();
    let mut unused: Vec<u64> = gone.iter().map(|k| k.stack_id).filter(|id| !in_use.contains(id)).collect();
    unused.sort_unstable();
    unused.dedup();
    probes.evict_stacks(&unused).context("evicting the stacks of ended call sites")?;
    for id in &unused {
        stacks.remove(id);
    }
    if let Some(l) = live {
        l.forget(&gone);
    }
    Ok(gone.len())
}
