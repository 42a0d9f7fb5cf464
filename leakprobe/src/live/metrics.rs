//! `--metrics ADDR:PORT`: the latest [`View`] as Prometheus metrics, over HTTP.
//!
//! [`encode`] is pure (a view in, the text exposition format out, by `prometheus-client`);
//! [`serve`] is the edge: an axum server on its own thread and runtime, so that a scrape is
//! answered while the session is busy (a scan, a symbolization) and never delays it. Only
//! `GET /metrics` and `GET /` are served; nothing of the target's memory is ever in a series,
//! only counts, sizes and symbol names.

use std::{net::SocketAddr, sync::Arc};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use super::View;

/// What can go wrong starting the exporter.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "--metrics {addr}: cannot listen there: {source} (is another exporter on that port? pick another)"
    )]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("--metrics: cannot start the exporter's thread: {0}")]
    Thread(std::io::Error),
}

/// A per-site series' labels: the stable id, its leaf function, file:line, module and the
/// allocation function; and its process with `--metrics-per-process` (none otherwise: a site
/// is then one series across the workers of a build).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct SiteLabels {
    site: String,
    function: String,
    location: String,
    module: String,
    allocator: String,
    pid: Option<u32>,
}

impl EncodeLabelSet for SiteLabels {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelSetEncoder) -> std::fmt::Result {
        let mut pairs = vec![
            ("site", self.site.clone()),
            ("function", self.function.clone()),
            ("location", self.location.clone()),
            ("module", self.module.clone()),
            ("allocator", self.allocator.clone()),
        ];
        if let Some(pid) = self.pid {
            pairs.push(("pid", pid.to_string()));
        }
        pairs.encode(encoder)
    }
}

/// A site's series by reachability class: its labels and the class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    #[prometheus(flatten)]
    site: SiteLabels,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Event {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Target {
    pid: String,
    exe: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Class {
    class: &'static str,
}

/// A Python object type: `qualname`, or `module.qualname` outside builtins.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PyType {
    r#type: String,
}

type F64Gauge = Gauge<f64, std::sync::atomic::AtomicU64>;

fn gauge(reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>, v: f64) {
    let g = F64Gauge::default();
    g.set(v);
    match unit {
        Some(u) => reg.register_with_unit(name, help, u, g),
        None => reg.register(name, help, g),
    }
}

fn counter(reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    match unit {
        Some(u) => reg.register_with_unit(name, help, u, c),
        None => reg.register(name, help, c),
    }
}

/// What the exporter serves: the top `top` sites by growth, each with a `pid` label when
/// `per_process` (several processes: one series per process instead of one per build).
#[derive(Clone, Copy, Debug)]
pub struct Export {
    pub top: usize,
    pub per_process: bool,
}

/// The view as the Prometheus text exposition format (version 0.0.4).
pub fn encode(v: &View, export: Export) -> String {
    let top = export.top;
    let mut reg = Registry::with_prefix("leakprobe");

    // The process.
    let info = Family::<Target, Gauge>::default();
    info.get_or_create(&Target { pid: v.pid.to_string(), exe: v.exe.clone(), verdict: v.verdict.clone() })
        .set(1);
    reg.register("target_info", "The traced process and the run's verdict (always 1)", info);
    gauge(&mut reg, "window", "Time since the probes went live", Some(Unit::Seconds), v.window_s);
    if let Some(rss) = v.rss {
        gauge(
            &mut reg,
            "process_resident",
            "The target's resident set (VmRSS)",
            Some(Unit::Bytes),
            rss as f64,
        );
    }
    if let Some(anon) = v.anon_rss {
        gauge(
            &mut reg,
            "process_anon_resident",
            "The target's anonymous resident memory",
            Some(Unit::Bytes),
            anon as f64,
        );
    }
    gauge(
        &mut reg,
        "tracked_heap",
        "Bytes allocated since attach and not freed (estimate when sampling)",
        Some(Unit::Bytes),
        v.heap as f64,
    );
    gauge(
        &mut reg,
        "tracked_mmap",
        "Of the tracked heap, anonymous mmap regions",
        Some(Unit::Bytes),
        v.mmap as f64,
    );

    // Activity and cost.
    counter(&mut reg, "allocations", "Allocation calls seen since attach", None, v.alloc_calls);
    counter(&mut reg, "frees", "Free calls seen since attach", None, v.free_calls);
    gauge(
        &mut reg,
        "allocation_rate",
        "Allocation calls per second over the last interval",
        None,
        v.alloc_rate,
    );
    gauge(&mut reg, "free_rate", "Free calls per second over the last interval", None, v.free_rate);
    gauge(
        &mut reg,
        "probe_hit_rate",
        "Probe hits (allocations and frees) per second over the last interval",
        None,
        v.hit_rate,
    );
    gauge(
        &mut reg,
        "estimated_overhead",
        "The target's CPU time spent in probes per second, at the measured cost per hit",
        Some(Unit::Other("ratio".into())),
        v.overhead,
    );
    gauge(
        &mut reg,
        "sample_interval",
        "Mean bytes between sampled allocations (0: every allocation tracked)",
        Some(Unit::Bytes),
        v.sample_bytes as f64,
    );
    let drops = Family::<Reason, Counter>::default();
    for d in &v.drops {
        drops.get_or_create(&Reason { reason: d.name }).inc_by(d.value);
    }
    reg.register("dropped", "Events not tracked, by reason: non-zero means figures are incomplete", drops);
    let events = Family::<Event, Counter>::default();
    for e in &v.events {
        events.get_or_create(&Event { event: e.name }).inc_by(e.value);
    }
    reg.register("events", "Counters expected in normal operation, for context", events);
    gauge(&mut reg, "sites_tracked", "Call sites tracked now", None, v.sites_tracked as f64);
    counter(
        &mut reg,
        "sites_evicted",
        "Call sites evicted (nothing outstanding, idle) since attach",
        None,
        v.sites_evicted,
    );
    let per_process = export.per_process && v.processes > 1;
    let sites = if per_process { &v.process_sites } else { &v.sites };
    let sites = &sites[..sites.len().min(top)];
    gauge(
        &mut reg,
        "sites_exported",
        "Call sites with per-site series (the top by growth, --metrics-top)",
        None,
        sites.len() as f64,
    );

    // Per site, the top N by growth.
    let out_b = Family::<SiteLabels, F64Gauge>::default();
    let out_n = Family::<SiteLabels, F64Gauge>::default();
    let alloc_b = Family::<SiteLabels, Counter>::default();
    let alloc_n = Family::<SiteLabels, Counter>::default();
    let freed_b = Family::<SiteLabels, Counter>::default();
    let freed_n = Family::<SiteLabels, Counter>::default();
    let growth = Family::<SiteLabels, F64Gauge>::default();
    let classes = Family::<ClassLabels, F64Gauge>::default();
    for s in sites {
        let l = SiteLabels {
            site: s.label.id.clone(),
            function: s.label.function.clone(),
            location: s.label.location.clone(),
            module: s.label.module.clone(),
            allocator: s.allocator.to_string(),
            pid: per_process.then_some(s.stats.key.tgid),
        };
        out_b.get_or_create(&l).set(s.stats.outstanding_bytes as f64);
        out_n.get_or_create(&l).set(s.stats.outstanding_count as f64);
        alloc_b.get_or_create(&l).inc_by(s.stats.allocated_bytes);
        alloc_n.get_or_create(&l).inc_by(s.stats.allocated_count);
        freed_b.get_or_create(&l).inc_by(s.stats.freed_bytes);
        freed_n.get_or_create(&l).inc_by(s.stats.freed_count);
        growth.get_or_create(&l).set(s.growth_bytes_per_s);
        if let Some(c) = s.classes {
            for (class, bytes) in class_pairs(&c) {
                classes.get_or_create(&ClassLabels { site: l.clone(), class }).set(bytes as f64);
            }
        }
    }
    reg.register_with_unit(
        "site_outstanding",
        "Bytes allocated at this call site since attach and not freed",
        Unit::Bytes,
        out_b,
    );
    reg.register(
        "site_outstanding_objects",
        "Blocks allocated at this call site since attach and not freed",
        out_n,
    );
    reg.register_with_unit(
        "site_allocated",
        "Bytes allocated at this call site since attach",
        Unit::Bytes,
        alloc_b,
    );
    reg.register("site_allocated_objects", "Blocks allocated at this call site since attach", alloc_n);
    reg.register_with_unit("site_freed", "Bytes of this call site freed since attach", Unit::Bytes, freed_b);
    reg.register("site_freed_objects", "Blocks of this call site freed since attach", freed_n);
    reg.register(
        "site_growth_bytes_per_second",
        "Net growth of the site's outstanding bytes (trailing fit)",
        growth,
    );
    reg.register_with_unit(
        "site_reachability",
        "Outstanding bytes of this call site by class at the latest scan (definitely_lost, indirectly_lost, possibly_lost, reachable)",
        Unit::Bytes,
        classes,
    );
    if let (Some(at), Some(t)) = (v.scan_at_s, v.scan_totals) {
        gauge(&mut reg, "scan_at", "When the latest scan was made, since attach", Some(Unit::Seconds), at);
        let totals = Family::<Class, F64Gauge>::default();
        for (class, bytes) in class_pairs(&t) {
            totals.get_or_create(&Class { class }).set(bytes as f64);
        }
        reg.register_with_unit(
            "scan_class",
            "Tracked bytes by class at the latest scan",
            Unit::Bytes,
            totals,
        );
    }

    if !v.python_objects.is_empty() {
        let (count, bytes) = (Family::<PyType, F64Gauge>::default(), Family::<PyType, F64Gauge>::default());
        for t in v.python_objects.iter().take(top) {
            let label = PyType { r#type: t.name.clone() };
            count.get_or_create(&label).set(t.count as f64);
            bytes.get_or_create(&label).set(t.bytes as f64);
        }
        reg.register(
            "python_objects",
            "Live Python objects of this type at the latest scan (the most numerous, --metrics-top)",
            count,
        );
        reg.register_with_unit(
            "python_object",
            "Bytes of the live Python objects of this type at the latest scan (sys.getsizeof summed)",
            Unit::Bytes,
            bytes,
        );
    }

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &reg);
    out
}

fn class_pairs(c: &super::Classes) -> [(&'static str, u64); 4] {
    [
        ("definitely_lost", c.definitely_lost),
        ("indirectly_lost", c.indirectly_lost),
        ("possibly_lost", c.possibly_lost),
        ("reachable", c.reachable),
    ]
}

/// `--metrics` as given: `PORT` alone means loopback.
pub fn parse_addr(v: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = v.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    v.parse::<SocketAddr>()
        .map_err(|_| format!("expected PORT or ADDR:PORT (e.g. 9464 or 127.0.0.1:9464), got {v:?}"))
}

const INDEX: &str = "<!doctype html><html><head><title>leakprobe</title></head><body>\
<h1>leakprobe</h1><p>The call sites whose memory grows in the traced process.</p>\
<p><a href=\"/metrics\">/metrics</a> (Prometheus text format)</p></body></html>\n";

/// The running exporter: dropping it stops the server.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds `addr` now (so a taken port is refused before anything is attached) and serves the
/// latest view from `views` on a thread of its own.
pub fn serve(
    addr: SocketAddr,
    views: tokio::sync::watch::Receiver<Arc<View>>,
    export: Export,
) -> Result<Server, MetricsError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    listener.set_nonblocking(true).map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| MetricsError::Bind { addr, source })?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::warn!("--metrics: no runtime for the exporter: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                use axum::{Router, http::header, routing::get};
                let metrics = move || {
                    let views = views.clone();
                    async move {
                        let view = views.borrow().clone();
                        (
                            [(
                                header::CONTENT_TYPE,
                                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                            )],
                            encode(&view, export),
                        )
                    }
                };
                let app = Router::new().route("/metrics", get(metrics)).route(
                    "/",
                    get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX) }),
                );
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!("--metrics: {e}");
                        return;
                    }
                };
                let shutdown = async {
                    let _ = stop_rx.await;
                };
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                    tracing::warn!("--metrics: the exporter stopped: {e}");
                }
            });
        })
        .map_err(MetricsError::Thread)?;
    Ok(Server { addr: bound, stop: Some(stop_tx), thread: Some(thread) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::{Classes, Count, Label, Site};
    use leakprobe_common::SiteKey;

    fn view() -> View {
        View {
            pid: 42,
            exe: "/usr/bin/server".into(),
            window_s: 12.5,
            rss: Some(10 << 20),
            anon_rss: Some(6 << 20),
            heap: 3 << 20,
            alloc_calls: 1000,
            free_calls: 400,
            drops: vec![Count { name: "live_map_full", value: 3 }],
            events: vec![Count { name: "unknown_frees", value: 9 }],
            verdict: "LEAK / GROWING".into(),
            sites: vec![Site {
                stats: crate::model::SiteStats {
                    key: SiteKey { stack_id: 1, kind: 0, tgid: 0 },
                    kind: None,
                    outstanding_bytes: 4096,
                    outstanding_count: 4,
                    allocated_bytes: 8192,
                    allocated_count: 8,
                    freed_bytes: 4096,
                    freed_count: 4,
                    interval_allocs: 0,
                    interval_frees: 0,
                    growth_bytes_per_s: 100.0,
                    oldest_age_s: None,
                    peak_bytes: 4096,
                    peak_count: 4,
                    temporary_count: 0,
                    trend: Default::default(),
                    fit: None,
                },
                label: Label {
                    id: "0123456789ab".into(),
                    function: "parse_upload".into(),
                    location: "leaky_server.c:40".into(),
                    module: "leaky_server".into(),
                },
                allocator: "malloc",
                growth_bytes_per_s: 100.0,
                history: vec![],
                classes: Some(Classes { definitely_lost: 4096, ..Classes::default() }),
                verdict: "LEAK",
            }],
            ..View::default()
        }
    }

    #[test]
    fn python_object_types_are_series_of_their_own_bounded_by_metrics_top() {
        let mut v = view();
        v.python_objects = vec![
            crate::live::PythonTypeCount { name: "__main__.Node".into(), count: 6000, bytes: 336_000 },
            crate::live::PythonTypeCount { name: "tuple".into(), count: 500, bytes: 32_000 },
        ];
        let text = encode(&v, Export { top: 20, per_process: false });
        assert!(text.contains(r#"leakprobe_python_objects{type="__main__.Node"} 6000"#), "{text}");
        assert!(text.contains(r#"leakprobe_python_object_bytes{type="tuple"} 32000"#), "{text}");
        assert!(
            !encode(&v, Export { top: 1, per_process: false }).contains(r#"type="tuple""#),
            "--metrics-top bounds the types"
        );
        assert!(
            !encode(&view(), Export { top: 20, per_process: false }).contains("python_objects"),
            "no CPython, no series"
        );
    }

    #[test]
    fn several_processes_are_one_series_per_build_unless_per_process_is_asked() {
        let mut v = view();
        let mut merged = v.sites[0].clone();
        merged.stats.outstanding_bytes = 8192;
        let mut own = [v.sites[0].clone(), v.sites[0].clone()];
        own[0].stats.key.tgid = 101;
        own[1].stats.key.tgid = 102;
        v.sites = vec![merged];
        v.process_sites = own.to_vec();
        v.processes = 2;
        let by_build = encode(&v, Export { top: 20, per_process: false });
        assert!(!by_build.contains("malloc\",pid="), "no pid label by default: {by_build}");
        assert!(by_build.contains("module=\"leaky_server\",allocator=\"malloc\"} 8192"), "{by_build}");
        let per = encode(&v, Export { top: 20, per_process: true });
        for pid in [101, 102] {
            assert!(per.contains(&format!("allocator=\"malloc\",pid=\"{pid}\"}} 4096")), "{per}");
        }
        // One process: the flag changes nothing.
        v.processes = 1;
        assert!(!encode(&v, Export { top: 20, per_process: true }).contains("malloc\",pid="));
    }

    #[test]
    fn series_carry_the_site_labels_and_figures() {
        let text = encode(&view(), Export { top: 20, per_process: false });
        assert!(
            !encode(&view(), Export { top: 0, per_process: false }).contains("parse_upload"),
            "--metrics-top bounds the sites"
        );
        let site = r#"site="0123456789ab",function="parse_upload",location="leaky_server.c:40",module="leaky_server",allocator="malloc""#;
        assert!(text.contains(&format!("leakprobe_site_outstanding_bytes{{{site}}} 4096")), "{text}");
        assert!(text.contains(&format!("leakprobe_site_allocated_bytes_total{{{site}}} 8192")), "{text}");
        assert!(
            text.contains(&format!(
                "leakprobe_site_reachability_bytes{{{site},class=\"definitely_lost\"}} 4096"
            )),
            "{text}"
        );
        assert!(text.contains("leakprobe_dropped_total{reason=\"live_map_full\"} 3"), "{text}");
        assert!(text.contains("leakprobe_process_resident_bytes 10485760"), "{text}");
        assert!(text.contains("# TYPE leakprobe_site_outstanding_bytes gauge"), "{text}");
        assert!(!text.contains("# EOF"), "the 0.0.4 text format has no EOF marker");
    }

    #[test]
    fn symbol_names_are_escaped_in_labels() {
        let mut v = view();
        v.sites[0].label.function = r#"std::map<int, "x">::insert\n"#.into();
        let text = encode(&v, Export { top: 20, per_process: false });
        assert!(text.contains(r#"function="std::map<int, \"x\">::insert\\n""#), "{text}");
    }

    #[test]
    fn addresses_default_to_loopback() {
        assert_eq!(parse_addr("9464").unwrap(), SocketAddr::from(([127, 0, 0, 1], 9464)));
        assert_eq!(parse_addr("0.0.0.0:9464").unwrap(), SocketAddr::from(([0, 0, 0, 0], 9464)));
        assert!(parse_addr("localhost").is_err());
    }
}
