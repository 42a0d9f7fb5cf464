//! `--js-heap`: V8's own sampling heap profiler, through the inspector, as call sites of
//! their own (kind `js-heap`) beside the native ones: same tracker, trends, verdicts, diff and
//! metrics. The inspector's rules are in [`super::inspector`].

use anyhow::Context as _;
use serde_json::json;

use super::inspector::{Inspector, InspectorError};
use crate::{
    inprocess::guard::{Guard, RestoreList},
    model::Sample,
    runtimes::v8::{
        JsFrame,
        heap_profile::{JsHeapSites, Profile},
        snapshot::{Baseline, ComparisonRow, Snapshot, SnapshotReader, compare},
    },
    symbolize::Frame,
};

/// The top growing constructors that get a retainer path.
const RETAINER_PATHS: usize = 10;
/// Constructors kept in the report's comparison (most growth first).
const COMPARISON_ROWS: usize = 50;

pub struct JsHeap {
    inspector: Inspector,
    sites: JsHeapSites,
    interval: u64,
    /// How often the profile is fetched, and when it last was.
    poll_every: std::time::Duration,
    last_poll: Option<std::time::Instant>,
    /// Closes the inspector if leakprobe is killed; disarmed once it is closed.
    guard: Option<Guard>,
    /// Profiles that could not be fetched (the figures then stay as the last one left them).
    failed_polls: u64,
    last_error: Option<String>,
    /// Fetches that worked, and their time in all and the longest.
    polls: u64,
    poll_total: std::time::Duration,
    poll_max: std::time::Duration,
    closed: Option<crate::report::JsHeapInfo>,
    /// `--js-heap-snapshot`: the first snapshot, and the pauses the snapshots took.
    first_snapshot: Option<Baseline>,
    snapshot_pauses_ms: Vec<f64>,
    comparison: Option<Vec<ComparisonRow>>,
}

/// Whether V8's profile is to be fetched now: the first time, when `every` has passed since
/// `last`, or when the caller needs it now (the end of the session). Each fetch makes V8 run a
/// full collection first, so the interval bounds that cost.
fn poll_due(
    last: Option<std::time::Instant>,
    now: std::time::Instant,
    every: std::time::Duration,
    forced: bool,
) -> bool {
    forced || last.is_none_or(|t| now.saturating_duration_since(t) >= every)
}

impl JsHeap {
    /// Opens (or finds) the inspector and starts V8's sampling every `interval` bytes.
    pub fn start(pid: i32, cfg: crate::cli::JsHeapConfig) -> anyhow::Result<(JsHeap, String)> {
        let opened = Inspector::open(pid).map_err(|e| match e {
            InspectorError::Sigusr1Disabled { .. }
            | InspectorError::PortHeld { .. }
            | InspectorError::InspectorElsewhere { .. } => anyhow::Error::new(super::Refused(e.to_string())),
            e => anyhow::Error::new(e).context("--js-heap: opening the inspector"),
        })?;
        let mut inspector = opened.inspector;
        // Armed before anything else can fail: a SIGKILL from here on still closes it.
        let guard = if inspector.opened_by_us {
            let list = RestoreList {
                pid,
                start_ticks: crate::inprocess::guard::start_ticks(pid).unwrap_or(0),
                inspector: Some((inspector.port, inspector.path.clone())),
                ..Default::default()
            };
            Some(Guard::spawn(&list).context("--js-heap: starting the guard that closes the inspector")?)
        } else {
            None
        };
        inspector
            .call("HeapProfiler.startSampling", json!({"samplingInterval": cfg.interval}))
            .context("--js-heap: starting V8's sampling heap profiler")?;
        let js = JsHeap {
            inspector,
            sites: JsHeapSites::new(),
            interval: cfg.interval,
            poll_every: cfg.poll,
            last_poll: None,
            guard,
            failed_polls: 0,
            last_error: None,
            polls: 0,
            poll_total: std::time::Duration::ZERO,
            poll_max: std::time::Duration::ZERO,
            closed: None,
            first_snapshot: None,
            snapshot_pauses_ms: Vec::new(),
            comparison: None,
        };
        Ok((js, opened.line))
    }

    /// Adds the JavaScript sites to `sample`: fetched again (V8's live sampled objects) when
    /// `--js-heap-poll` has passed since the last fetch, or when `now`; else as last fetched.
    pub fn poll_into(&mut self, sample: &mut Sample, now: bool) {
        if self.closed.is_none() && poll_due(self.last_poll, std::time::Instant::now(), self.poll_every, now)
        {
            self.last_poll = Some(std::time::Instant::now());
            match self.fetch() {
                Ok(p) => self.sites.update(&p),
                Err(e) => {
                    self.failed_polls += 1;
                    self.last_error = Some(format!("{e:#}"));
                    tracing::warn!("--js-heap: {e:#}");
                }
            }
        }
        sample.sites.extend(self.sites.sites());
    }

    fn fetch(&mut self) -> anyhow::Result<Profile> {
        let started = std::time::Instant::now();
        let r = self.inspector.call("HeapProfiler.getSamplingProfile", json!({}))?;
        let took = started.elapsed();
        self.polls += 1;
        self.poll_total += took;
        self.poll_max = self.poll_max.max(took);
        serde_json::from_value(r["profile"].clone()).context("reading V8's sampling heap profile")
    }

    /// Takes a heap snapshot (V8 stops the event loop meanwhile: the pause is measured). V8
    /// reports its progress as it goes, which shows on a terminal, keeps the connection's read
    /// timeout from firing on a big heap, and gives a line every 10 s without a terminal.
    fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        let mut reader = SnapshotReader::new();
        // A piece V8 sent that did not read: the rest is drained, then this is the error.
        let mut unread: Option<crate::runtimes::v8::snapshot::SnapshotError> = None;
        let started = std::time::Instant::now();
        let mut said = started;
        crate::progress::spinner(
            "--js-heap-snapshot: V8 is taking a heap snapshot (the event loop is stopped)",
        );
        let result = self.inspector.call_with_events(
            "HeapProfiler.takeHeapSnapshot",
            json!({"reportProgress": true}),
            |m, p| match m {
                "HeapProfiler.addHeapSnapshotChunk" => {
                    if let Some(chunk) = p["chunk"].as_str()
                        && unread.is_none()
                    {
                        unread = reader.feed(chunk.as_bytes()).err();
                    }
                }
                "HeapProfiler.reportHeapSnapshotProgress" => {
                    let (done, total) = (p["done"].as_u64().unwrap_or(0), p["total"].as_u64().unwrap_or(0));
                    let msg = format!(
                        "--js-heap-snapshot: V8 has gone through {done} of {total} objects ({:.0} s, the event loop is stopped)",
                        started.elapsed().as_secs_f64()
                    );
                    if said.elapsed() >= std::time::Duration::from_secs(10) {
                        said = std::time::Instant::now();
                        crate::progress::line(format_args!("{msg}"));
                    }
                    crate::progress::message(msg);
                }
                _ => {}
            },
        );
        crate::progress::done();
        result?;
        self.snapshot_pauses_ms.push(started.elapsed().as_secs_f64() * 1e3);
        match unread {
            Some(e) => Err(e),
            None => reader.finish(),
        }
        .context("reading V8's heap snapshot")
    }

    /// `--js-heap-snapshot`: the first of the two snapshots, at the start.
    pub fn first_snapshot(&mut self) -> anyhow::Result<String> {
        let s = self.snapshot().context("--js-heap-snapshot: the first heap snapshot")?;
        let line = format!(
            "--js-heap-snapshot: first heap snapshot, {} objects (the event loop paused {:.0} ms)",
            s.nodes.len(),
            self.snapshot_pauses_ms.last().copied().unwrap_or(0.0)
        );
        // Kept as only the ids and classes the comparison needs.
        self.first_snapshot = Some(s.baseline());
        Ok(line)
    }

    /// `--js-heap-snapshot`: the second snapshot, compared with the first.
    pub fn compare_snapshots(&mut self) -> anyhow::Result<String> {
        let Some(first) = self.first_snapshot.take() else { return Ok(String::new()) };
        let second = self.snapshot().context("--js-heap-snapshot: the second heap snapshot")?;
        let rows = compare(&first, &second, RETAINER_PATHS);
        let line = format!(
            "--js-heap-snapshot: second heap snapshot, {} objects (paused {:.0} ms); compared",
            second.nodes.len(),
            self.snapshot_pauses_ms.last().copied().unwrap_or(0.0)
        );
        self.comparison = Some(rows);
        Ok(line)
    }

    /// A JavaScript-heap site's stack, innermost first.
    pub fn frames(&self, stack_id: u64) -> Option<Vec<Frame>> {
        let stack = self.sites.stack(stack_id)?;
        Some(
            stack
                .iter()
                .map(|f| {
                    let file = f.url.strip_prefix("file://").unwrap_or(&f.url);
                    let known = |v: i64| u32::try_from(v + 1).ok().filter(|&v| v > 0);
                    let frame = JsFrame {
                        function: if f.function_name.is_empty() {
                            crate::runtimes::v8::ANONYMOUS.into()
                        } else {
                            f.function_name.clone()
                        },
                        file: (!file.is_empty()).then(|| file.to_string()),
                        line: known(f.line_number),
                        column: known(f.column_number),
                    };
                    Frame::javascript(0, frame)
                })
                .collect(),
        )
    }

    /// Stops the sampling and closes the inspector if leakprobe opened it (then disarms the
    /// guard). Safe to call twice.
    pub fn finish(&mut self) -> crate::report::JsHeapInfo {
        if let Some(done) = &self.closed {
            return done.clone();
        }
        let _ = self.inspector.call("HeapProfiler.stopSampling", json!({}));
        let closed = self.inspector.close();
        let open_for = match &closed {
            Ok(d) => *d,
            Err(_) => self.inspector.open_for(),
        };
        if closed.is_ok()
            && let Some(g) = self.guard.take()
        {
            g.disarm();
        }
        let mut info = self.info_now(open_for);
        info.close_error = closed.err().map(|e| e.to_string());
        self.closed = Some(info.clone());
        info
    }
}

impl JsHeap {
    /// The report's figures: as closed at the end, or as they stand (a snapshot meanwhile).
    pub fn info(&self) -> crate::report::JsHeapInfo {
        self.closed.clone().unwrap_or_else(|| self.info_now(self.inspector.open_for()))
    }

    fn info_now(&self, open_for: std::time::Duration) -> crate::report::JsHeapInfo {
        crate::report::JsHeapInfo {
            sampling_interval_bytes: self.interval,
            port: self.inspector.port,
            opened_by_leakprobe: self.inspector.opened_by_us,
            open_s: open_for.as_secs_f64(),
            close_error: None,
            failed_polls: self.failed_polls,
            last_error: self.last_error.clone(),
            live_samples: self.sites.live_samples() as u64,
            polls: self.polls,
            poll_ms_mean: self.poll_total.as_secs_f64() * 1e3 / self.polls.max(1) as f64,
            poll_ms_max: self.poll_max.as_secs_f64() * 1e3,
            snapshot_pauses_ms: self.snapshot_pauses_ms.clone(),
            comparison: self.comparison.clone().map(|mut rows| {
                rows.truncate(COMPARISON_ROWS);
                rows
            }),
        }
    }
}

impl Drop for JsHeap {
    /// An error or a panic ends the session early: the inspector is closed all the same.
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::poll_due;

    #[test]
    fn the_profile_is_fetched_first_then_once_per_poll_interval_or_when_forced() {
        let every = Duration::from_secs(10);
        let t0 = Instant::now();
        assert!(poll_due(None, t0, every, false), "the first interval fetches");
        assert!(!poll_due(Some(t0), t0 + Duration::from_secs(1), every, false), "1 s after: not yet");
        assert!(!poll_due(Some(t0), t0 + Duration::from_millis(9_999), every, false));
        assert!(poll_due(Some(t0), t0 + every, every, false), "10 s after: due");
        assert!(
            poll_due(Some(t0), t0 + Duration::from_secs(1), every, true),
            "the end of the session always fetches"
        );
        // A clock read before `last` (another thread's Instant) is not a negative interval.
        assert!(!poll_due(Some(t0 + Duration::from_secs(5)), t0, every, false));
    }
}
