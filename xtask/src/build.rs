//! `cargo xtask build`: the ctrace binary, with its eBPF object built by ctrace/build.rs.

use crate::setup;
use anyhow::{Context, Result, ensure};
use clap::Args;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Args)]
pub struct BuildArgs {
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
}

pub fn build_cmd(ws: &Path, args: &BuildArgs) -> Result<()> {
    let bin = build(ws, args.release)?;
    eprintln!("xtask: built {}", bin.display());
    Ok(())
}

/// Builds ctrace (installing what its eBPF build needs first) and returns the binary's path.
pub fn build(ws: &Path, release: bool) -> Result<PathBuf> {
    let mut cmd = cargo(ws)?;
    cmd.args(["build", "--package", "ctrace"]);
    if release {
        cmd.arg("--release");
    }
    setup::run(&mut cmd).context("building ctrace failed")?;
    let bin = target_dir(ws)
        .join(if release { "release" } else { "debug" })
        .join("ctrace");
    ensure!(bin.is_file(), "cargo built ctrace but {} does not exist", bin.display());
    Ok(bin)
}

/// A cargo command run in the workspace with the environment ctrace's eBPF build needs (bpf-linker on PATH).
pub fn cargo(ws: &Path) -> Result<Command> {
    let env = setup::ebpf_env(ws)?;
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.current_dir(ws).envs(env);
    Ok(cmd)
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` or `<ws>/target`.
pub fn target_dir(ws: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => ws.join(dir),
        None => ws.join("target"),
    }
}
