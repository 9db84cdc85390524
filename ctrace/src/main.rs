//! The `ctrace` command: parses the flags, checks capabilities and runs a subcommand from the library.

use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use ctrace::{
    brief, capabilities, check,
    cli::{Cli, Command},
    demo, session,
    sinks::Sinks,
};

/// The local UTC offset, read while the process is still single-threaded (the `time` crate
/// refuses to read it later).
fn local_offset() -> time::UtcOffset {
    time::UtcOffset::current_local_offset().unwrap_or(time::UtcOffset::UTC)
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

    let cx = capabilities::Context::current();
    let refusal = match &cli.command {
        Command::Demo(_) => capabilities::cannot_demo(&cx),
        _ => capabilities::cannot_run(&cx),
    };
    if let Some(msg) = refusal {
        eprintln!("ctrace: {msg}");
        return ExitCode::from(1);
    }
    capabilities::raise_memlock();

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
                let sinks = Sinks::for_run(args.json, args.quiet, args.metrics, offset).await?;
                session::run(args, sinks, session::Hooks::default()).await.map(|_| ())
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
