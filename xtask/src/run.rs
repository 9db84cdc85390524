//! `cargo xtask run -- <ctrace args>`: builds ctrace and runs it as root.

use crate::{build, setup};
use anyhow::{Context, Result, bail};
use clap::Args;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

#[derive(Args)]
pub struct RunArgs {
    /// Build and run the release profile.
    #[arg(long)]
    release: bool,
    /// Arguments for ctrace (put them after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "CTRACE_ARGS")]
    args: Vec<OsString>,
}

/// `cargo xtask demo` without --vm: the same as `cargo xtask run -- demo`.
pub fn run_ctrace(ws: &Path, args: &[&str]) -> Result<()> {
    run(
        ws,
        RunArgs {
            release: false,
            args: args.iter().map(OsString::from).collect(),
        },
    )
}

/// Builds ctrace and replaces this process with it (so its exit code and signals pass straight through).
pub fn run(ws: &Path, args: RunArgs) -> Result<()> {
    setup::ensure_debian_packages(setup::RUN_PACKAGES)?;
    let bin = build::build(ws, args.release)?;
    let mut cmd = if setup::is_root() {
        Command::new(&bin)
    } else {
        let Ok(sudo) = which::which("sudo") else {
            bail!(
                "ctrace needs root to load eBPF programs and sudo is not installed: run {} as root",
                bin.display()
            );
        };
        eprintln!("xtask: ctrace needs root; running it with sudo");
        let mut cmd = Command::new(sudo);
        cmd.arg("-E").arg(&bin);
        cmd
    };
    cmd.args(&args.args);
    let err = cmd.exec();
    Err(err).with_context(|| format!("could not start `{}`", setup::describe(&cmd)))
}
