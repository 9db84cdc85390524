//! `cargo xtask`: ctrace's build, run, packaging and test tasks.
//!
//! Everything the tasks need (nightly `rust-src`, a project-local bpf-linker, Debian packages) is installed by the
//! tasks themselves, so a fresh machine only needs rustup and this repository.

mod bench;
mod build;
mod debian;
mod demo_vm;
mod deploy_checks;
mod dist;
mod guest;
mod package;
mod run;
mod setup;
mod soak;
mod suites;
mod test;
mod vm;
mod vm_suite;

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ctrace's build, run, packaging and test tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Installs everything the other tasks need: nightly rust-src, bpf-linker (in .tools/), Debian packages.
    Setup,
    /// Builds the ctrace binary (target/{debug,release}/ctrace).
    Build(build::BuildArgs),
    /// Builds ctrace and runs it as root: `cargo xtask run -- demo`.
    Run(run::RunArgs),
    /// Builds one static binary with the eBPF object embedded (target/dist/ctrace), its man pages and shell
    /// completions, and a Debian package.
    Dist,
    /// Runs the unit tests and the integration tests.
    Test(test::TestArgs),
    /// Measures what ctrace costs the traffic it watches, next to nothing attached and a bpftrace one-liner:
    /// interleaved rounds, medians, target/bench/report.md and report.json. Needs root; on a machine shared with
    /// other kernel tests, `--lock /tmp/ctrace-kernel.lock` holds their lock while the host part runs.
    Bench(bench::BenchArgs),
    /// Runs the soak in a Debian guest: drop floods, netns churn and an nf_conntrack unload and reload every
    /// minute for --minutes, while a scraper polls ctrace's metrics; totals, RSS, scrapes and what is left
    /// attached are checked at the end.
    Soak(soak::SoakArgs),
    /// Shows ctrace at work: on this host (`ctrace demo`), or with `--vm` the whole reload trap in a
    /// Debian guest (raise the limit, stop the firewall, watch the reset and the drops).
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Boot a Debian kernel in QEMU and show the module-reload trap there.
    #[arg(long)]
    vm: bool,
    /// The guest kernel for --vm: 5.10, 6.1 or 6.12.
    #[arg(default_value = "6.1", requires = "vm")]
    kernel: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ws = workspace_root();
    let result = match cli.command {
        Command::Setup => setup::setup(&ws),
        Command::Build(args) => build::build_cmd(&ws, &args),
        Command::Run(args) => run::run(&ws, args),
        Command::Dist => dist::dist(&ws).map(drop),
        Command::Test(args) => test::test(&ws, &args),
        Command::Bench(args) => bench::bench(&ws, &args),
        Command::Soak(args) => soak::soak(&ws, &args),
        Command::Demo(args) if args.vm => demo_vm::run(&ws, &args.kernel),
        Command::Demo(_) => run::run_ctrace(&ws, &["demo"]),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The Cargo workspace's root directory (the parent of xtask/).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}
