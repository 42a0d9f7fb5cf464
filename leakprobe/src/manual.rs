//! The man pages and shell completions, generated from the clap definitions so they never
//! drift from the flags (`leakprobe completions SHELL`, and the hidden `leakprobe manpage`
//! that `cargo xtask dist` packages).

use std::{io::Write, path::Path};

use anyhow::Context as _;
use clap::CommandFactory as _;

use crate::cli::Cli;

/// Writes the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), "leakprobe", out);
}

/// Writes leakprobe.1 (the top-level page: synopsis, subcommands, examples).
pub fn manpage(out: &mut dyn Write) -> anyhow::Result<()> {
    clap_mangen::Man::new(Cli::command()).render(out).context("rendering the man page")
}

/// Writes leakprobe.1 and one page per visible subcommand (leakprobe-attach.1, ...) into `dir`.
pub fn manpages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = Cli::command();
    // Subcommand pages are named after their parent (leakprobe-attach), which clap only
    // records once the command is built.
    cmd.build();
    let top = cmd.clone();
    let write = |name: String, c: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(c).title(&name).render(&mut buf).context("rendering a man page")?;
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))
    };
    write("leakprobe".into(), top)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        write(format!("leakprobe-{}", sub.get_name()), sub.clone())?;
    }
    Ok(())
}
