//! The timeline as a chart (plotters): RSS and its anonymous and file parts, the tracked heap,
//! mmap'd bytes and the top growing call sites over time, with allocation and free rates
//! below. SVG or PNG by file extension.

use std::path::{Path, PathBuf};

use plotters::{
    coord::Shift,
    prelude::*,
    style::{FontStyle, register_font},
};
use thiserror::Error;

use crate::report::Report;

#[derive(Debug, Error)]
pub enum PlotError {
    #[error("no TrueType font found for the chart's labels (looked in {0}); install fonts-dejavu-core")]
    NoFont(String),
    #[error("drawing {path}: {reason}")]
    Draw { path: PathBuf, reason: String },
}

/// Fonts looked for, in order.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
];

fn load_font() -> Result<(), PlotError> {
    for path in FONTS {
        if let Ok(bytes) = std::fs::read(path) {
            // register_font wants 'static bytes; one font per process run.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Ok(());
            }
        }
    }
    Err(PlotError::NoFont(FONTS.join(", ")))
}

/// One line on the chart.
pub struct Line {
    pub label: String,
    /// (seconds since attach, bytes)
    pub points: Vec<(f64, f64)>,
}

const MIB: f64 = 1024.0 * 1024.0;

/// A line: label, colour, (seconds, value).
type Series = (String, RGBColor, Vec<(f64, f64)>);

/// One chart: axes from 0 to `t_max` and `y_max`, a line per series, and a legend.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: Option<String>,
    t_max: f64,
    y_max: f64,
    y_desc: &str,
    lines: Vec<Series>,
    marks: Option<Series>,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let mut builder = ChartBuilder::on(area);
    if let Some(caption) = caption {
        builder.caption(caption, ("sans-serif", 22));
    }
    let mut chart = builder
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("seconds since attach")
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    for (label, color, pts) in lines {
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    // Each reachability scan: a marker at its time, at the bytes it found definitely lost.
    if let Some((label, color, pts)) = marks.filter(|m| !m.2.is_empty()) {
        chart
            .draw_series(pts.into_iter().map(|p| TriangleMarker::new(p, 9, color.filled())))
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 7, color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    Ok(())
}

/// Draws the chart (`png`: PNG, else SVG), with leakprobe's authorship mark
/// (crate::output::mark) so that a later run may replace it. `sites` are the call sites to draw
/// besides the process-wide series, largest growth first.
pub fn draw(path: &Path, report: &Report, sites: &[Line]) -> Result<Vec<u8>, PlotError> {
    load_font()?;
    let png = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let (w, h) = (1200u32, 800u32);
    let draw_err = |reason: String| PlotError::Draw { path: path.to_path_buf(), reason };
    if png {
        let mut rgb = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
            render(&root, report, sites)
                .and_then(|()| root.present().map_err(|e| e.to_string()))
                .map_err(draw_err)?;
        }
        encode_png(&rgb, w, h).map_err(|e| draw_err(e.to_string()))
    } else {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
            render(&root, report, sites)
                .and_then(|()| root.present().map_err(|e| e.to_string()))
                .map_err(draw_err)?;
        }
        Ok(crate::output::mark::svg(svg.as_bytes()))
    }
}

fn encode_png(rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let (keyword, text) = crate::output::mark::png_text();
    enc.add_text_chunk(keyword, text)?;
    let mut writer = enc.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

fn render<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, r: &Report, sites: &[Line]) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let tl = &r.timeline;
    let t_max = tl.last().map_or(1.0, |p| p.t_s).max(1.0);
    let memory: Vec<Series> = vec![
        (
            "RSS".to_string(),
            RGBColor(0, 0, 0),
            tl.iter().filter_map(|p| Some((p.t_s, p.rss_bytes? as f64 / MIB))).collect(),
        ),
        (
            "anonymous RSS".to_string(),
            RGBColor(120, 120, 120),
            tl.iter().filter_map(|p| Some((p.t_s, p.anon_bytes? as f64 / MIB))).collect(),
        ),
        (
            "file RSS".to_string(),
            RGBColor(180, 180, 180),
            tl.iter().filter_map(|p| Some((p.t_s, p.file_bytes? as f64 / MIB))).collect(),
        ),
        (
            "tracked heap".to_string(),
            RGBColor(220, 30, 30),
            tl.iter().map(|p| (p.t_s, p.heap_bytes as f64 / MIB)).collect(),
        ),
        (
            "mmap'd (tracked)".to_string(),
            RGBColor(30, 90, 220),
            tl.iter().map(|p| (p.t_s, p.mmap_bytes as f64 / MIB)).collect(),
        ),
    ];
    let palette = [RGBColor(230, 120, 0), RGBColor(0, 150, 80), RGBColor(150, 0, 170), RGBColor(0, 160, 170)];
    let y_max = memory
        .iter()
        .flat_map(|(_, _, pts)| pts.iter().map(|p| p.1))
        .chain(sites.iter().flat_map(|s| s.points.iter().map(|p| p.1 / MIB)))
        .fold(0.0f64, f64::max)
        .max(0.001)
        * 1.1;

    let (upper, lower) = root.split_vertically(560);
    let title = format!(
        "PID {} ({}): {} | verdict: {}",
        r.target.pid,
        Path::new(&r.target.exe).file_name().map_or(r.target.exe.clone(), |n| n.to_string_lossy().into()),
        if r.sampling.estimated { "memory (sampled estimates)" } else { "memory" },
        serde_json::to_value(r.verdict.kind)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
    );
    let mut upper_lines: Vec<Series> = memory.into_iter().filter(|(_, _, pts)| !pts.is_empty()).collect();
    for (i, site) in sites.iter().enumerate() {
        let points = site.points.iter().map(|p| (p.0, p.1 / MIB)).collect();
        upper_lines.push((site.label.clone(), palette[i % palette.len()], points));
    }
    let scans = r.scan.as_ref().map(|sc| {
        (
            "scan: definitely lost".to_string(),
            RGBColor(120, 0, 0),
            sc.history.iter().map(|p| (p.t_s.min(t_max), p.definitely_lost_bytes as f64 / MIB)).collect(),
        )
    });
    panel(&upper, Some(title), t_max, y_max, "MiB", upper_lines, scans)?;

    let rate_max = tl.iter().map(|p| p.allocs_per_s.max(p.frees_per_s)).fold(0.0f64, f64::max).max(1.0) * 1.1;
    let rates = vec![
        (
            "allocations/s".to_string(),
            RGBColor(220, 30, 30),
            tl.iter().map(|p| (p.t_s, p.allocs_per_s)).collect(),
        ),
        ("frees/s".to_string(), RGBColor(30, 90, 220), tl.iter().map(|p| (p.t_s, p.frees_per_s)).collect()),
    ];
    panel(&lower, None, t_max, rate_max, "calls/s", rates, None)?;
    Ok(())
}
