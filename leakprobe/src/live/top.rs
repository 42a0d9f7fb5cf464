//! `leakprobe top`: the live terminal view (ratatui). Call sites sorted by growth with a
//! sparkline each, RSS against the tracked heap, the verdict; keys to sort, filter, freeze
//! and write a snapshot.
//!
//! [`App`] (keys, sorting, filtering) and [`draw`] are pure over a [`View`]; [`run`] owns the
//! terminal. The terminal is restored on every way out: `q`, the session ending, an error,
//! and a panic on any thread (the hook restores it before anything is printed).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ratatui::{
    Frame,
    crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, LineGauge, Paragraph, Row, Table},
};

use super::{Request, Site, View, Viewer};
use crate::model::SortBy;
use crate::report::text::human_bytes;

/// How the sites are ordered.
/// What a key asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    Snapshot,
}

/// The view's state: sort, filter, freeze.
#[derive(Debug, Default)]
pub struct App {
    pub sort: SortBy,
    /// Sites whose function, module or allocation function contains this (case-insensitive).
    pub filter: String,
    /// Typing a filter after `/`.
    pub editing: bool,
    /// The view shown while frozen.
    pub frozen: Option<Arc<View>>,
    /// With several processes: each process's own sites rather than sites merged per build.
    pub per_process: bool,
}

impl App {
    /// Handles a key. `latest` is the newest view (kept when freezing).
    pub fn key(&mut self, key: KeyEvent, latest: &Arc<View>) -> Action {
        if key.kind == KeyEventKind::Release {
            return Action::None;
        }
        let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
        if ctrl_c {
            return Action::Quit;
        }
        if self.editing {
            match key.code {
                KeyCode::Enter => self.editing = false,
                KeyCode::Esc => {
                    self.editing = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            return Action::None;
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
            KeyCode::Char('s') => {
                self.sort = self.sort.next();
                Action::None
            }
            KeyCode::Char('/') => {
                self.editing = true;
                self.filter.clear();
                Action::None
            }
            KeyCode::Char('f') => {
                self.frozen = match self.frozen.take() {
                    Some(_) => None,
                    None => Some(latest.clone()),
                };
                Action::None
            }
            KeyCode::Char('w') => Action::Snapshot,
            KeyCode::Char('p') => {
                self.per_process = !self.per_process;
                Action::None
            }
            _ => Action::None,
        }
    }

    /// Whether the rows are each process's own sites (several processes, and `p` pressed).
    pub fn shows_processes(&self, view: &View) -> bool {
        self.per_process && view.processes > 1
    }

    /// The sites to show, filtered and sorted.
    pub fn rows<'v>(&self, view: &'v View) -> Vec<&'v Site> {
        let needle = self.filter.to_lowercase();
        let sites = if self.shows_processes(view) { &view.process_sites } else { &view.sites };
        let mut rows: Vec<&Site> = sites
            .iter()
            .filter(|s| {
                needle.is_empty()
                    || s.label.function.to_lowercase().contains(&needle)
                    || s.label.module.to_lowercase().contains(&needle)
                    || s.allocator.to_lowercase().contains(&needle)
            })
            .collect();
        self.sort.sort(&mut rows, |s| s.stats.figures());
        rows
    }
}

/// A series as eight-level block characters, scaled to its own range.
pub fn sparkline(points: &[u64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let tail = &points[points.len().saturating_sub(width)..];
    let (lo, hi) = tail.iter().fold((u64::MAX, 0), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    tail.iter()
        .map(|&v| {
            let level = if hi > lo { ((v - lo) * 7 / (hi - lo)) as usize } else { 0 };
            BARS[level.min(7)]
        })
        .collect()
}

fn rate(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn signed_bytes(v: f64) -> String {
    let sign = if v < 0.0 { "-" } else { "+" };
    format!("{sign}{}/s", human_bytes(v.abs() as u64))
}

/// Draws the view.
pub fn draw(frame: &mut Frame<'_>, app: &App, view: &View) {
    let [head, gauge, table, foot] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let verdict_style = match view.verdict.as_str() {
        v if v.starts_with("LEAK") || v.starts_with("ACCUMULATION") || v.starts_with("FRAGMENTATION") => {
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
        }
        _ => Style::new().fg(Color::Green),
    };
    let state = match (&view.ended, &app.frozen) {
        (Some(why), _) => format!("  ENDED ({why}): press q"),
        (None, Some(_)) => "  FROZEN (f to resume)".into(),
        (None, None) => String::new(),
    };
    let rss = view.rss.map_or_else(|| "?".into(), human_bytes);
    let drops = if view.dropped_total > 0 {
        Span::styled(format!("  DEGRADED: {} dropped", view.dropped_total), Style::new().fg(Color::Yellow))
    } else {
        Span::raw("")
    };
    let lines = vec![
        Line::from(vec![
            Span::styled("leakprobe top", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!(
                "  PID {} {}{}  {:.0} s",
                view.pid,
                view.exe,
                match view.processes {
                    0 | 1 => String::new(),
                    n => format!(" and {} other processes", n - 1),
                },
                view.window_s
            )),
            Span::styled(state, Style::new().fg(Color::Yellow)),
        ]),
        Line::from(vec![Span::raw("VERDICT: "), Span::styled(view.verdict.clone(), verdict_style)]),
        Line::from(vec![
            Span::raw(format!(
                "RSS {rss} (anon {})  tracked heap {} (mmap {})  allocs {}/s frees {}/s  probe hits {}/s ({:.1}% of a CPU){}  sites {} ({} evicted)",
                view.anon_rss.map_or_else(|| "?".into(), human_bytes),
                human_bytes(view.heap),
                human_bytes(view.mmap),
                rate(view.alloc_rate),
                rate(view.free_rate),
                rate(view.hit_rate),
                view.overhead * 100.0,
                if view.sample_bytes > 0 {
                    format!(" sampling 1/{}", human_bytes(view.sample_bytes))
                } else {
                    String::new()
                },
                view.sites_tracked,
                view.sites_evicted,
            )),
            drops,
        ]),
    ];
    frame.render_widget(Paragraph::new(lines), head);

    let ratio = match view.rss {
        Some(rss) if rss > 0 => (view.heap as f64 / rss as f64).clamp(0.0, 1.0),
        _ => 0.0,
    };
    frame.render_widget(
        LineGauge::default()
            .filled_style(Style::new().fg(Color::Cyan))
            .label(format!("tracked heap / RSS {:>5.1}%", ratio * 100.0))
            .ratio(ratio),
        gauge,
    );

    let rows = app.rows(view);
    let spark_width = 20usize;
    // Several processes: a PID column (a site merged across processes says "all").
    let many = view.processes > 1;
    let header = Row::new(
        [
            "SITE",
            "PID",
            "GROWTH",
            "OUTSTANDING",
            "PEAK",
            "OBJECTS",
            "ALLOCS",
            "TEMP",
            "VERDICT",
            "TREND",
            "FUNCTION",
            "LOCATION",
            "MODULE",
        ]
        .into_iter()
        .filter(|h| many || *h != "PID")
        .map(|h| Cell::from(h).style(Style::new().add_modifier(Modifier::BOLD))),
    );
    let body = rows.iter().map(|s| {
        let verdict_style = match s.verdict {
            "LEAK" | "CYCLE" | "GROWING" | "ACCUMULATION" => Style::new().fg(Color::Red),
            _ => Style::new(),
        };
        let pid = match s.stats.key.tgid {
            0 => "all".to_string(),
            p => p.to_string(),
        };
        Row::new([Cell::from(s.label.id.clone())].into_iter().chain(many.then(|| Cell::from(pid))).chain([
            Cell::from(signed_bytes(s.growth_bytes_per_s)),
            Cell::from(human_bytes(s.stats.outstanding_bytes)),
            Cell::from(human_bytes(s.stats.peak_bytes)),
            Cell::from(s.stats.outstanding_count.to_string()),
            Cell::from(s.stats.allocated_count.to_string()),
            Cell::from(if view.sample_bytes > 0 {
                "-".to_string()
            } else {
                s.stats.temporary_count.to_string()
            }),
            Cell::from(s.verdict).style(verdict_style),
            Cell::from(sparkline(&s.history, spark_width)).style(Style::new().fg(Color::Cyan)),
            Cell::from(format!("{} <- {}", s.allocator, s.label.function)),
            Cell::from(s.label.location.clone()),
            Cell::from(s.label.module.clone()),
        ]))
    });
    let scope = match (many, app.shows_processes(view)) {
        (false, _) => String::new(),
        (true, false) => format!(", merged across {} processes per build", view.processes),
        (true, true) => format!(", per process ({})", view.processes),
    };
    let title = format!(
        " call sites by {}{scope}{} ({} of {}) ",
        app.sort.name(),
        if app.filter.is_empty() { String::new() } else { format!(", matching {:?}", app.filter) },
        rows.len(),
        if app.shows_processes(view) { view.process_sites.len() } else { view.sites.len() },
    );
    let widths = [
        Some(Constraint::Length(12)),
        many.then_some(Constraint::Length(8)),
        Some(Constraint::Length(13)),
        Some(Constraint::Length(11)),
        Some(Constraint::Length(11)),
        Some(Constraint::Length(8)),
        Some(Constraint::Length(9)),
        Some(Constraint::Length(8)),
        Some(Constraint::Length(15)),
        Some(Constraint::Length(spark_width as u16)),
        Some(Constraint::Min(20)),
        Some(Constraint::Length(20)),
        Some(Constraint::Length(14)),
    ]
    .into_iter()
    .flatten();
    frame.render_widget(
        Table::new(body, widths).header(header).block(Block::new().borders(Borders::TOP).title(title)),
        table,
    );

    let footer = if app.editing {
        Line::from(vec![
            Span::raw("filter (function or module): "),
            Span::raw(app.filter.clone()),
            Span::raw("_"),
        ])
    } else {
        Line::from(vec![
            Span::styled(
                match many {
                    true => "q quit  s sort  / filter  f freeze  w snapshot  p merged/per process",
                    false => "q quit  s sort  / filter  f freeze  w snapshot",
                },
                Style::new().add_modifier(Modifier::REVERSED),
            ),
            Span::raw(format!("  {}", view.status)),
        ])
    };
    frame.render_widget(Paragraph::new(footer), foot);
}

/// Set by the panic hook: the terminal is restored, draw no more.
static STOP: AtomicBool = AtomicBool::new(false);

fn restore() {
    ratatui::restore();
    let _ = ratatui::crossterm::execute!(std::io::stdout(), ratatui::crossterm::cursor::Show);
}

/// Takes the terminal and draws the session's views until `q` (or the session ends without a
/// view to show: an error before attaching). Returns when the terminal is restored.
pub fn run(mut viewer: Viewer) -> std::io::Result<()> {
    let mut terminal = ratatui::try_init()?;
    // ratatui's hook leaves raw mode and the alternate screen; ours also stops this thread's
    // drawing and shows the cursor, whichever thread panicked.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        STOP.store(true, Ordering::SeqCst);
        let _ = ratatui::crossterm::execute!(std::io::stdout(), ratatui::crossterm::cursor::Show);
        previous(info);
    }));
    let result = (|| -> std::io::Result<()> {
        let mut app = App::default();
        loop {
            if STOP.load(Ordering::SeqCst) {
                return Ok(());
            }
            let latest = viewer.views.borrow_and_update().clone();
            // The session is gone: after an error before any view, leave at once; after a
            // signal, too; otherwise keep the last view until `q`.
            let closed = viewer.views.has_changed().is_err();
            if closed && (latest.ended.is_none() || latest.ended.as_deref() == Some("signal")) {
                return Ok(());
            }
            let shown = app.frozen.clone().unwrap_or_else(|| latest.clone());
            terminal.draw(|f| {
                if shown.window_s == 0.0 && shown.ended.is_none() && shown.exe.is_empty() {
                    f.render_widget(Paragraph::new("leakprobe top: attaching... (q to give up)"), f.area());
                } else {
                    draw(f, &app, &shown);
                }
            })?;
            if event::poll(Duration::from_millis(200))?
                && let Event::Key(key) = event::read()?
            {
                match app.key(key, &latest) {
                    Action::Quit => {
                        let _ = viewer.requests.send(Request::Quit);
                        return Ok(());
                    }
                    Action::Snapshot => {
                        let _ = viewer.requests.send(Request::Snapshot);
                    }
                    Action::None => {}
                }
            }
        }
    })();
    restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::Label;
    use leakprobe_common::SiteKey;
    use ratatui::{Terminal, backend::TestBackend};

    fn site(id: u64, function: &str, module: &str, outstanding: u64, allocs: u64, growth: f64) -> Site {
        Site {
            stats: crate::model::SiteStats {
                key: SiteKey { stack_id: id, kind: 0, tgid: 0 },
                kind: None,
                outstanding_bytes: outstanding,
                outstanding_count: 1,
                allocated_bytes: outstanding,
                allocated_count: allocs,
                freed_bytes: 0,
                freed_count: 0,
                interval_allocs: 0,
                interval_frees: 0,
                growth_bytes_per_s: growth,
                oldest_age_s: None,
                peak_bytes: outstanding,
                peak_count: 1,
                temporary_count: 0,
                trend: Default::default(),
                fit: None,
            },
            label: Label {
                id: format!("{id:012x}"),
                function: function.into(),
                location: "x.c:1".into(),
                module: module.into(),
            },
            allocator: "malloc",
            growth_bytes_per_s: growth,
            history: vec![1, 2, 3, 4],
            classes: None,
            verdict: "GROWING",
        }
    }

    fn view() -> Arc<View> {
        Arc::new(View {
            pid: 9,
            exe: "/srv/app".into(),
            window_s: 3.0,
            rss: Some(8 << 20),
            heap: 2 << 20,
            verdict: "LEAK / GROWING".into(),
            sites: vec![
                site(1, "parse_upload", "app", 100, 5, 900.0),
                site(2, "cache_put", "libcache.so", 5000, 1, 10.0),
                site(3, "log_line", "app", 10, 999, 1.0),
            ],
            ..View::default()
        })
    }

    fn key(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    #[test]
    fn keys_sort_filter_and_freeze() {
        let v = view();
        let mut app = App::default();
        let order = |app: &App| app.rows(&v).iter().map(|s| s.stats.key.stack_id).collect::<Vec<_>>();
        assert_eq!(order(&app), [1, 2, 3], "by growth, as ranked");
        app.key(key(KeyCode::Char('s')), &v);
        assert_eq!(order(&app), [2, 1, 3], "by outstanding");
        app.key(key(KeyCode::Char('s')), &v);
        assert_eq!(order(&app), [2, 1, 3], "by peak (each site's peak is what it holds here)");
        app.key(key(KeyCode::Char('s')), &v);
        assert_eq!(order(&app), [3, 1, 2], "by calls");
        app.key(key(KeyCode::Char('s')), &v);
        assert_eq!(app.sort, SortBy::Temporary);
        app.key(key(KeyCode::Char('s')), &v);
        assert_eq!(order(&app), [1, 2, 3], "back to growth");
        app.key(key(KeyCode::Char('/')), &v);
        for c in "LIBC".chars() {
            app.key(key(KeyCode::Char(c)), &v);
        }
        assert_eq!(app.key(key(KeyCode::Char('q')), &v), Action::None, "q is text while editing");
        app.key(key(KeyCode::Backspace), &v);
        app.key(key(KeyCode::Enter), &v);
        assert_eq!(order(&app), [2], "module matches, case-insensitively");
        app.key(key(KeyCode::Char('f')), &v);
        assert!(app.frozen.is_some());
        app.key(key(KeyCode::Char('f')), &v);
        assert!(app.frozen.is_none());
        assert_eq!(app.key(key(KeyCode::Char('w')), &v), Action::Snapshot);
        assert_eq!(app.key(key(KeyCode::Char('q')), &v), Action::Quit);
        assert_eq!(app.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL), &v), Action::Quit);
    }

    #[test]
    fn several_processes_get_a_pid_column_and_p_switches_to_each_ones_sites() {
        let mut v = (*view()).clone();
        let mut own =
            [site(1, "parse_upload", "app", 60, 3, 500.0), site(1, "parse_upload", "app", 40, 2, 400.0)];
        own[0].stats.key.tgid = 4243;
        own[1].stats.key.tgid = 4244;
        v.process_sites = own.to_vec();
        v.processes = 3;
        let v = Arc::new(v);
        let mut app = App::default();
        let pids = |app: &App| app.rows(&v).iter().map(|s| s.stats.key.tgid).collect::<Vec<_>>();
        assert_eq!(pids(&app), [0, 0, 0], "merged per build first");
        app.key(key(KeyCode::Char('p')), &v);
        assert_eq!(pids(&app), [4243, 4244], "each process's own");
        let mut t = Terminal::new(TestBackend::new(220, 20)).unwrap();
        t.draw(|f| draw(f, &app, &v)).unwrap();
        let text: String = t.backend().buffer().content().iter().map(|c| c.symbol()).collect();
        assert!(text.contains("PID") && text.contains("4243") && text.contains("per process (3)"), "{text}");
        app.key(key(KeyCode::Char('p')), &v);
        t.draw(|f| draw(f, &app, &v)).unwrap();
        let text: String = t.backend().buffer().content().iter().map(|c| c.symbol()).collect();
        assert!(text.contains("all") && text.contains("merged across 3 processes"), "{text}");
        // One process: no PID column.
        t.draw(|f| draw(f, &App::default(), &view())).unwrap();
        let text: String = t.backend().buffer().content().iter().map(|c| c.symbol()).collect();
        assert!(!text.contains(" PID  "), "{text}");
    }

    #[test]
    fn sparklines_scale_to_their_range() {
        assert_eq!(sparkline(&[0, 7, 14], 10), "▁▄█");
        assert_eq!(sparkline(&[5, 5], 10), "▁▁");
        assert_eq!(sparkline(&[1, 2, 3, 4], 2), "▁█");
    }

    #[test]
    fn draws_the_fastest_growing_site_first() {
        let mut t = Terminal::new(TestBackend::new(200, 20)).unwrap();
        let app = App::default();
        t.draw(|f| draw(f, &app, &view())).unwrap();
        let text: String = t.backend().buffer().content().iter().map(|c| c.symbol()).collect();
        let first = text.find("parse_upload").expect("drawn");
        assert!(first < text.find("cache_put").unwrap());
        assert!(text.contains("LEAK / GROWING"));
        assert!(text.contains("call sites by growth"));
    }
}
