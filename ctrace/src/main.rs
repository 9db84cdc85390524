//! ctrace: shows which packets netfilter connection tracking dropped, and why.
//!
//! Layout: `cli` (flags) → `session` (the run loop) → `probes` (kernel hooks per mode) →
//! `event` (decoding) → `aggregate`/`summary` → `output` (text, JSON). `btf`/`layout` resolve
//! kernel offsets at start-up; `netns`/`ctstat` read the kernel's own counters; `demo` makes
//! conntrack drop packets in a throwaway netns.

mod aggregate;
mod baselines;
mod btf;
mod check;
mod cli;
mod ctstat;
mod demo;
mod event;
mod hook_steer;
mod kallsyms;
mod layout;
mod modules;
mod netns;
mod output;
mod privileges;
mod probes;
mod sanitize;
mod session;
mod summary;
mod sysctl_state;
mod sysctl_watch;

use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use cli::{Cli, Command};
use output::Output;

fn make_output(json: bool, offset: time::UtcOffset) -> Output {
    let stdout: Box<dyn std::io::Write + Send> = Box::new(output::Stdout);
    if json {
        Output::json(stdout)
    } else {
        Output::text(stdout, offset, std::io::stdout().is_terminal())
    }
}

/// The local UTC offset, read while the process is still single-threaded (the `time` crate
/// refuses to read it later).
fn local_offset() -> time::UtcOffset {
    time::UtcOffset::current_local_offset().unwrap_or(time::UtcOffset::UTC)
}

/// An error as one readable line: the context chain, with a BPF verifier log cut to its verdict
/// (the full log is thousands of lines; `RUST_LOG=debug` prints it).
pub fn brief(e: &anyhow::Error) -> String {
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    let text = chain.join(": ");
    let Some(at) = text.find("Verifier output:") else {
        return text;
    };
    log::debug!("{text}");
    let verdict: Vec<&str> = text[at..]
        .lines()
        .rev()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with(':') && !l.starts_with("verification time") && !l.starts_with("processed")
        })
        .take(2)
        .collect();
    let verdict: Vec<&str> = verdict.into_iter().rev().collect();
    format!(
        "{} (verifier: {})",
        text[..at].trim_end().trim_end_matches('.'),
        verdict.join(" / ")
    )
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line for a bad flag or value (clap adds a usage hint on further lines).
            let text = e.to_string();
            eprintln!(
                "ctrace: {}",
                text.lines().next().unwrap_or("bad usage").trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let offset = local_offset();

    // `check` reads files only and works without root: it reports what it could not read.
    let cli = match cli.command {
        Command::Check(args) => return check::main(args),
        command => Cli { command },
    };

    if let Some(msg) = privileges::check() {
        eprintln!("ctrace: {msg}");
        return ExitCode::from(1);
    }
    privileges::raise_memlock();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ctrace: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => {
                let out = make_output(args.json, offset);
                session::run(args, out, session::Hooks::default()).await.map(|_| ())
            }
            Command::Demo(args) => demo::run(args, offset).await,
            Command::Check(_) => Err(anyhow::anyhow!("check is dispatched before the privilege check")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the outermost context says what to do; the causes say why.
            eprintln!("ctrace: {}", brief(&e));
            if std::io::stderr().is_terminal() {
                log::debug!("{e:?}");
            }
            ExitCode::from(1)
        }
    }
}
