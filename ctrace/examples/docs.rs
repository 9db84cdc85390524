//! Writes ctrace's man pages and shell completions, generated from its clap definitions (`ctrace::cli::Cli`):
//! `cargo run -p ctrace --example docs -- DIR` writes `DIR/man/ctrace.1` (and `ctrace-run.1`, `ctrace-demo.1`,
//! `ctrace-check.1`) and `DIR/completions/{ctrace.bash,_ctrace,ctrace.fish}`. `cargo xtask dist` runs it; the
//! Debian package installs what it writes.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;
use ctrace::cli::Cli;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: docs DIR (writes DIR/man and DIR/completions)");
        return ExitCode::from(2);
    };
    match write(&dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("docs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn write(dir: &std::path::Path) -> anyhow::Result<()> {
    let man = dir.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("cannot write the man pages to {}", man.display()))?;
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions).with_context(|| format!("cannot create {}", completions.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "ctrace", &completions)
            .with_context(|| format!("cannot write the {shell} completion to {}", completions.display()))?;
    }
    Ok(())
}
