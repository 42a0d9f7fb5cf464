use std::process::ExitCode;

use clap::Parser as _;
use leakprobe::{
    cli::{Cli, Command, Config},
    session::{self, Refused},
};

fn main() -> ExitCode {
    // The in-process guard (started by leakprobe itself, never by users).
    if std::env::args_os().nth(1).is_some_and(|a| a == leakprobe::inprocess::guard::ARG) {
        return leakprobe::inprocess::guard::run();
    }
    // The ptrace helper (likewise started by leakprobe itself).
    if std::env::args_os().nth(1).is_some_and(|a| a == leakprobe::ptrace::server::ARG) {
        return leakprobe::ptrace::server::run();
    }
    // The follower, which holds followed processes' children at birth (likewise).
    if std::env::args_os().nth(1).is_some_and(|a| a == leakprobe::ptrace::follow::ARG) {
        return leakprobe::ptrace::follow::run();
    }
    match run() {
        Ok(code) => code,
        Err(err) => {
            // A closed pipe (`leakprobe ... | head`) is not an error.
            if err.chain().any(|e| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            leakprobe::say!("leakprobe: error: {err:#}");
            if err.downcast_ref::<Refused>().is_some() {
                leakprobe::say!("leakprobe: nothing was attached; the target is untouched");
            }
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LEAKPROBE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    match &cli.command {
        Command::Doctor(args) => {
            let json = args.format == leakprobe::cli::DoctorFormat::Json;
            let passed = leakprobe::kernel::doctor::main(json, &mut std::io::stdout().lock())?;
            return Ok(if passed { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        Command::Completions(args) => {
            leakprobe::manual::completions(args.shell, &mut std::io::stdout().lock());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Manpage(args) => {
            match &args.out_dir {
                Some(dir) => leakprobe::manual::manpages(dir)?,
                None => leakprobe::manual::manpage(&mut std::io::stdout().lock())?,
            }
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    if let Command::Diff(args) = &cli.command {
        session::diff(args, cli.quiet)?;
        return Ok(ExitCode::SUCCESS);
    }
    let config = Config::try_from(cli).map_err(|e| anyhow::Error::new(Refused(e.to_string())))?;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from)?;
    if config.live_view {
        return top(&runtime, config);
    }
    let outcome = runtime.block_on(session::run(config))?;
    if outcome.leak_gate_failed() {
        leakprobe::say!(
            "leakprobe: {} {} bytes{} is above --fail-on-leak {} bytes",
            outcome.judged,
            outcome.outstanding_bytes,
            if outcome.suppressed { " (suppressed sites left out)" } else { "" },
            outcome.fail_on_leak.unwrap_or(0)
        );
        return Ok(ExitCode::from(outcome.exit_code));
    }
    Ok(ExitCode::SUCCESS)
}

/// `leakprobe top`: the terminal view on a thread of its own, the session on this one.
fn top(runtime: &tokio::runtime::Runtime, config: Config) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal as _;
    if !std::io::stdout().is_terminal() {
        anyhow::bail!(Refused(
            "leakprobe top draws on a terminal and stdout is not one: use `leakprobe attach` (or run top in a terminal, tmux or screen)"
                .into()
        ));
    }
    let pid = match config.mode {
        leakprobe::cli::Mode::Attach { pid } => pid,
        leakprobe::cli::Mode::Run { .. } => 0,
    };
    let (tap, viewer) = leakprobe::live::channel();
    let ui =
        std::thread::Builder::new().name("top".into()).spawn(move || leakprobe::live::top::run(viewer))?;
    let outcome = runtime.block_on(session::run_with(config, Some(tap)));
    let drawn = ui.join().map_err(|_| anyhow::anyhow!("the terminal view panicked"))?;
    drawn.map_err(|e| anyhow::anyhow!("drawing on the terminal: {e}"))?;
    outcome?;
    leakprobe::say!("leakprobe: top ended; detached from PID {pid}, which runs on");
    Ok(ExitCode::SUCCESS)
}
