//! Trends over time and the verdicts drawn from them: is a series rising steadily (a leak or
//! unbounded accumulation), flat (stable), or is the process's RSS rising while the heap it
//! asked for stays flat (fragmentation / allocator retention)? Pure arithmetic, no I/O.

use serde::{Deserialize, Serialize};

/// Points kept per series; older points are thinned (every other one dropped) beyond this,
/// so memory stays bounded however long the session runs.
pub const MAX_POINTS: usize = 256;

/// Fewest points a verdict is drawn from (three intervals).
pub const MIN_POINTS: usize = 4;

/// Samples a run needs before its trailing half holds [`MIN_POINTS`].
pub const SAMPLES_FOR_VERDICT: usize = 2 * MIN_POINTS - 1;

/// A bounded time series: (seconds since attach, value).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    points: Vec<(f64, f64)>,
}

impl Series {
    pub fn push(&mut self, t: f64, y: f64) {
        if self.points.len() >= MAX_POINTS {
            // Keep the newest point and every other older one.
            let last = self.points.len() - 1;
            let mut i = 0;
            self.points.retain(|_| {
                let keep = i % 2 == 0 || i == last;
                i += 1;
                keep
            });
        }
        self.points.push((t, y));
    }

    pub fn points(&self) -> &[(f64, f64)] {
        &self.points
    }

    pub fn last(&self) -> Option<f64> {
        self.points.last().map(|p| p.1)
    }
}

/// A least-squares line through the trailing part of a series, with how well it fits.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fit {
    /// Units of the series per second.
    pub slope_per_s: f64,
    /// Coefficient of determination of the line (1: every point on it; 0: no better than
    /// the mean). 1.0 for a perfectly flat series.
    pub r2: f64,
    /// Of the intervals fitted, the fraction in which the value went up.
    pub rising_fraction: f64,
    /// Change from the first fitted point to the last.
    pub change: f64,
    /// Points fitted and the seconds they span.
    pub points: usize,
    pub span_s: f64,
    /// Value at the end.
    pub last: f64,
}

/// Fits the points from `from_s` on (the trailing part of the window).
pub fn fit(points: &[(f64, f64)], from_s: f64) -> Option<Fit> {
    let pts: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.0 >= from_s).collect();
    if pts.len() < 2 {
        return None;
    }
    let n = pts.len() as f64;
    let (mt, my) = (pts.iter().map(|p| p.0).sum::<f64>() / n, pts.iter().map(|p| p.1).sum::<f64>() / n);
    let stt: f64 = pts.iter().map(|p| (p.0 - mt).powi(2)).sum();
    let sty: f64 = pts.iter().map(|p| (p.0 - mt) * (p.1 - my)).sum();
    let syy: f64 = pts.iter().map(|p| (p.1 - my).powi(2)).sum();
    let slope = if stt > 0.0 { sty / stt } else { 0.0 };
    let r2 = if syy > 0.0 && stt > 0.0 { (sty * sty) / (stt * syy) } else { 1.0 };
    let rising = pts.windows(2).filter(|w| w[1].1 > w[0].1).count();
    let (first, last) = (pts[0], pts[pts.len() - 1]);
    Some(Fit {
        slope_per_s: slope,
        r2,
        rising_fraction: rising as f64 / (pts.len() - 1) as f64,
        change: last.1 - first.1,
        points: pts.len(),
        span_s: last.0 - first.0,
        last: last.1,
    })
}

/// What a series is doing over the trailing half of the window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trend {
    /// Rising steadily: the line fits well, most intervals rise, and the rise is material.
    Growing,
    /// Not rising materially (flat, falling, or noise around a level).
    Stable,
    #[default]
    NotEnoughData,
}

impl Trend {
    /// How the text and live views print it.
    pub fn label(self) -> &'static str {
        match self {
            Trend::Growing => "GROWING",
            Trend::Stable => "STABLE",
            Trend::NotEnoughData => "NOT ENOUGH DATA",
        }
    }
}

/// Thresholds for calling a series "growing".
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    /// The rise over the fitted span must be at least this (absolute, in the series' units)...
    pub min_change: f64,
    /// ...and at least this fraction of the final level.
    pub min_relative: f64,
    pub min_r2: f64,
    pub min_rising_fraction: f64,
}

/// For tracked heap bytes: a steady rise of at least 4 KiB and 0.5 % of the level.
pub const HEAP: Thresholds =
    Thresholds { min_change: 4096.0, min_relative: 0.005, min_r2: 0.7, min_rising_fraction: 0.5 };
/// For RSS: page-granular and noisier; 1 MiB and 2 % before calling it growth.
pub const RSS: Thresholds =
    Thresholds { min_change: 1024.0 * 1024.0, min_relative: 0.02, min_r2: 0.7, min_rising_fraction: 0.5 };

/// The trailing half of a window that ends at `end_s`: recent behaviour decides, so a cache
/// that filled early and has been flat since reads as stable.
pub fn trailing_from(points: &[(f64, f64)]) -> f64 {
    match (points.first(), points.last()) {
        (Some(a), Some(b)) => a.0 + (b.0 - a.0) / 2.0,
        _ => 0.0,
    }
}

/// The trend of a series over its trailing half.
pub fn trend(points: &[(f64, f64)], th: &Thresholds) -> (Trend, Option<Fit>) {
    let from = trailing_from(points);
    let Some(f) = fit(points, from) else { return (Trend::NotEnoughData, None) };
    if f.points < MIN_POINTS {
        return (Trend::NotEnoughData, Some(f));
    }
    let growing = f.slope_per_s > 0.0
        && f.change >= th.min_change
        && f.change >= th.min_relative * f.last.abs()
        && f.r2 >= th.min_r2
        && f.rising_fraction >= th.min_rising_fraction;
    (if growing { Trend::Growing } else { Trend::Stable }, Some(f))
}

/// What a run's verdict rests on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Basis {
    /// The fitted trends of the tracked heap and RSS (a scan may have refined the kind).
    #[default]
    Trend,
    /// The reachability scan alone: blocks no pointer reaches, with no growth fitted (a
    /// one-shot scan, a short run, or a heap that did not grow).
    Scan,
}

/// The verdict for the whole run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunVerdict {
    /// The tracked heap grows steadily: a leak, or unbounded accumulation. With
    /// [`Basis::Scan`]: nothing was seen growing, but the scan found definitely lost blocks.
    Leak,
    /// RSS grows while the tracked heap does not explain it: freed memory is not being
    /// returned (fragmentation, allocator caching), or memory comes from outside the hooks.
    Fragmentation,
    /// After a reachability scan: the growing memory is still referenced (a cache, a global
    /// list): unbounded accumulation, not a missing free.
    Accumulation,
    /// After a reachability scan: the lost memory is mostly blocks pointing at each other.
    Cycle,
    Stable,
    #[default]
    NotEnoughData,
}

impl RunVerdict {
    /// How the text and live views print it.
    pub fn label(self) -> &'static str {
        match self {
            RunVerdict::Leak => "LEAK / GROWING",
            RunVerdict::Fragmentation => "FRAGMENTATION / ALLOCATOR RETENTION",
            RunVerdict::Accumulation => "ACCUMULATION / STILL REFERENCED",
            RunVerdict::Cycle => "LEAK / CYCLE",
            RunVerdict::Stable => "STABLE",
            RunVerdict::NotEnoughData => "NOT ENOUGH DATA",
        }
    }

    /// The label with what it rests on: a leak that only the scan found is not GROWING.
    pub fn label_on(self, basis: Basis) -> &'static str {
        match (self, basis) {
            (RunVerdict::Leak, Basis::Scan) => "LEAK / DEFINITELY LOST",
            (v, _) => v.label(),
        }
    }
}

/// Heap growth must explain at least this share of RSS growth for RSS growth to be called a
/// leak rather than fragmentation.
pub const HEAP_SHARE_OF_RSS: f64 = 0.25;

/// The run's verdict from the tracked heap and RSS series, and a sentence with the numbers.
pub fn run_verdict(heap: &[(f64, f64)], rss: &[(f64, f64)]) -> (RunVerdict, String) {
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let kib = |b: f64| b / 1024.0;
    let (ht, h) = match trend(heap, &HEAP) {
        (t, Some(f)) if t != Trend::NotEnoughData => (t, f),
        _ => {
            return (
                RunVerdict::NotEnoughData,
                format!(
                    "{} samples; a verdict needs {} over the trailing half (run longer or use a shorter --interval)",
                    heap.len(),
                    SAMPLES_FOR_VERDICT
                ),
            );
        }
    };
    let describe = |what: &str, f: &Fit, unit: &dyn Fn(f64) -> f64, u: &str| {
        format!(
            "{what} {:+.1} {u} over the last {:.0} s ({:+.1} {u}/s, R\u{b2} {:.2}, rising in {:.0}% of intervals)",
            unit(f.change),
            f.span_s,
            unit(f.slope_per_s),
            f.r2,
            f.rising_fraction * 100.0
        )
    };
    let heap_growth = h.change.max(0.0);
    if let (Trend::Growing, Some(r)) = trend(rss, &RSS) {
        let rss_growth = r.change.max(0.0);
        if heap_growth < HEAP_SHARE_OF_RSS * rss_growth {
            return (
                RunVerdict::Fragmentation,
                format!(
                    "{}; {} explains {:.0}% of it: memory freed is not returned to the system \
                     (fragmentation or allocator retention), or it comes from outside the hooked allocator",
                    describe("RSS", &r, &mib, "MiB"),
                    describe("tracked heap", &h, &kib, "KiB"),
                    100.0 * heap_growth / rss_growth,
                ),
            );
        }
    }
    if ht == Trend::Growing {
        return (RunVerdict::Leak, describe("tracked heap", &h, &kib, "KiB"));
    }
    (RunVerdict::Stable, format!("{}: no steady growth", describe("tracked heap", &h, &kib, "KiB")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(ys: &[f64]) -> Vec<(f64, f64)> {
        ys.iter().enumerate().map(|(i, y)| (i as f64, *y)).collect()
    }

    #[test]
    fn steady_rise_is_growing() {
        let pts = series(&(0..10).map(|i| (i * 65536) as f64).collect::<Vec<_>>());
        let (t, f) = trend(&pts, &HEAP);
        let f = f.unwrap();
        assert_eq!(t, Trend::Growing);
        assert!((f.slope_per_s - 65536.0).abs() < 1e-6);
        assert!((f.r2 - 1.0).abs() < 1e-9);
        assert_eq!(f.rising_fraction, 1.0);
        assert_eq!(f.points, 5); // t = 4.5.. 9: points 5..9
    }

    #[test]
    fn filled_cache_is_stable() {
        // Fills over the first 4 intervals, then flat with small churn.
        let ys = [0.0, 250e3, 500e3, 750e3, 1e6, 1e6, 1.0001e6, 1e6, 0.9999e6, 1e6, 1e6, 1e6];
        assert_eq!(trend(&series(&ys), &HEAP).0, Trend::Stable);
    }

    #[test]
    fn tiny_or_noisy_rise_is_stable() {
        let tiny = series(&[100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0]);
        assert_eq!(trend(&tiny, &HEAP).0, Trend::Stable, "under 4 KiB");
        let noisy = series(&[1e6, 3e6, 1e6, 3e6, 1e6, 3e6, 1e6, 3.1e6]);
        assert_eq!(trend(&noisy, &HEAP).0, Trend::Stable, "poor fit");
    }

    #[test]
    fn too_few_points() {
        assert_eq!(trend(&series(&[1.0, 2e6, 4e6]), &HEAP).0, Trend::NotEnoughData);
        assert_eq!(run_verdict(&series(&[1.0, 2.0]), &series(&[1.0, 2.0])).0, RunVerdict::NotEnoughData);
    }

    #[test]
    fn verdicts() {
        let rising = |step: f64| series(&(0..10).map(|i| 50e6 + i as f64 * step).collect::<Vec<_>>());
        let flat = series(&[2e6; 10]);
        // Heap and RSS rise together: leak.
        assert_eq!(run_verdict(&rising(1e6), &rising(1.1e6)).0, RunVerdict::Leak);
        // Heap flat, RSS rising: fragmentation.
        let (v, why) = run_verdict(&flat, &rising(4e6));
        assert_eq!(v, RunVerdict::Fragmentation, "{why}");
        assert!(why.contains("RSS"), "{why}");
        // Heap rising a little, RSS rising a lot: still fragmentation.
        assert_eq!(run_verdict(&rising(10e3), &rising(4e6)).0, RunVerdict::Fragmentation);
        // Both flat.
        assert_eq!(run_verdict(&flat, &series(&[80e6; 10])).0, RunVerdict::Stable);
        // Heap rising, RSS flat (served from already-resident free memory): leak.
        assert_eq!(run_verdict(&rising(100e3), &series(&[80e6; 10])).0, RunVerdict::Leak);
    }

    #[test]
    fn series_stays_bounded_and_keeps_the_newest() {
        let mut s = Series::default();
        for i in 0..10_000 {
            s.push(i as f64, i as f64);
        }
        assert!(s.points().len() <= MAX_POINTS);
        assert_eq!(s.last(), Some(9999.0));
        assert_eq!(s.points()[0].0, 0.0);
        assert!(s.points().windows(2).all(|w| w[0].0 < w[1].0));
    }
}
