//! **Edge: progress on stderr.** On a terminal, long steps show a spinner or a bar
//! (indicatif): loading unwind tables, the `--duration` window, a scan, symbolizing many
//! stacks. Without a terminal (CI, a pipe, a log file) the same messages are the plain
//! `leakprobe: ...` lines they always were, and spinners draw nothing.
//!
//! One process, one stderr: the state is global, like the tracing subscriber's.

use std::{
    io::IsTerminal as _,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

struct State {
    quiet: bool,
    tty: bool,
    /// The tracing window's bar, and a step's spinner (when no window is shown).
    window: Option<ProgressBar>,
    step: Option<ProgressBar>,
    /// The latest message, for a view that owns the terminal (`top`).
    last: String,
}

impl State {
    fn shown(&self) -> Option<&ProgressBar> {
        self.step.as_ref().or(self.window.as_ref())
    }
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(|| {
        Mutex::new(State {
            quiet: false,
            tty: std::io::stderr().is_terminal(),
            window: None,
            step: None,
            last: String::new(),
        })
    })
}

fn with<R>(f: impl FnOnce(&mut State) -> R) -> R {
    // A panic while printing progress must not stop the detach that follows.
    let mut g = state().lock().unwrap_or_else(|p| p.into_inner());
    f(&mut g)
}

/// `-q`: no progress at all. `owned`: something else draws the terminal (`top`): messages are
/// only kept for it ([`last`]).
pub fn init(quiet: bool, owned: bool) {
    with(|s| {
        s.quiet = quiet || owned;
        s.tty &= !owned;
    });
}

/// A progress line: above the bar on a terminal, a plain line otherwise.
pub fn line(msg: std::fmt::Arguments<'_>) {
    with(|s| {
        s.last = msg.to_string();
        if s.quiet {
            return;
        }
        let text = format!("leakprobe: {msg}");
        match s.shown() {
            Some(bar) => bar.println(text),
            None => crate::say!("{text}"),
        }
    });
}

/// The latest message (for `top`'s status line).
pub fn last() -> String {
    with(|s| s.last.clone())
}

fn styled(bar: ProgressBar) -> ProgressBar {
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A step (loading unwind tables, a scan, symbolizing): a spinner with `msg` until [`done`];
/// during the window, the window's message (terminal only).
pub fn spinner(msg: impl Into<String>) {
    with(|s| {
        if s.quiet || !s.tty {
            return;
        }
        if let Some(w) = &s.window {
            w.set_message(msg.into());
            return;
        }
        let bar = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} leakprobe: {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(msg.into());
        if let Some(old) = s.step.replace(styled(bar)) {
            old.finish_and_clear();
        }
    });
}

/// The tracing window: a bar to `--duration`, or a running clock without one (terminal only).
pub fn window(duration: Option<Duration>) {
    with(|s| {
        if s.quiet || !s.tty {
            return;
        }
        if let Some(old) = s.step.take() {
            old.finish_and_clear();
        }
        let bar = match duration {
            Some(d) => ProgressBar::new(d.as_millis().max(1) as u64).with_style(
                ProgressStyle::with_template("leakprobe: [{elapsed_precise}] {wide_bar} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template(
                    "{spinner} leakprobe: [{elapsed_precise}] {msg} (Ctrl-C to stop)",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        if let Some(old) = s.window.replace(styled(bar)) {
            old.finish_and_clear();
        }
    });
}

/// Moves the window bar to `elapsed` with `msg`. Returns false when there is no bar (the
/// caller then prints `msg` as a line).
pub fn update(elapsed: Duration, msg: std::fmt::Arguments<'_>) -> bool {
    with(|s| match &s.window {
        Some(bar) => {
            bar.set_position(elapsed.as_millis() as u64);
            bar.set_message(msg.to_string());
            true
        }
        _ => false,
    })
}

/// Sets the current step's message.
pub fn message(msg: impl Into<String>) {
    with(|s| {
        if let Some(bar) = s.shown() {
            bar.set_message(msg.into());
        }
    });
}

/// Ends the current step's spinner.
pub fn done() {
    with(|s| {
        if let Some(bar) = s.step.take() {
            bar.finish_and_clear();
        }
    });
}

/// Ends the window's bar.
pub fn window_done() {
    with(|s| {
        if let Some(bar) = s.window.take() {
            bar.finish_and_clear();
        }
    });
}
