//! `ctrace-testkit`: bounded test traffic as a program, for the VM demo's guest (built static) and for trying
//! ctrace by hand. The traffic itself is `ctrace_tests::traffic`, which the tests call directly.
//!
//! - `udp-flows --first F --count N --port P`: one datagram from 127.0.0.1 to each of 127.(1+i>>16).(i>>8).(i&255):P
//!   for i in F..F+N.
//! - `tcp-invalid --count N --port P`: N TCP segments with SYN and FIN set to 127.0.0.1:P through a raw socket
//!   (conntrack counts them `invalid`).
//! - `tcp-peak --count N --port P`: a listener on 0.0.0.0:P and N TCP connections to the destinations above, held
//!   open for `--hold-ms`; prints `established=<completed> pending=<still connecting, closed>`.
//!
//! - `netns-flood --uid U --count N --port P --sends S --ruleset FILE`: the netns flood of `ctrace_tests::flood`
//!   (as uid U, no capabilities, inside its own user namespace); prints `netns=.. sent=.. refused=.. counted=..
//!   cap_eff=.. uid=..` and holds the netns until stdin closes.
//!
//! The UDP and invalid-TCP commands print `sent=<sends that succeeded> failed=<sends that returned an error>` and the
//! first error on stderr; they fail only when they cannot start (bad arguments, no socket).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use ctrace_tests::traffic::{self, Sends};

#[derive(Parser)]
#[command(name = "ctrace-testkit", about = "Bounded test traffic for ctrace's tests and demos")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One UDP datagram from 127.0.0.1 to each of COUNT destinations 127.(1+i>>16).(i>>8&255).(i&255):PORT.
    UdpFlows {
        /// The first flow index i.
        #[arg(long, default_value_t = 0)]
        first: u32,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 9)]
        port: u16,
    },
    /// COUNT TCP segments with SYN|FIN (invalid for conntrack) to 127.0.0.1:PORT through a raw socket.
    TcpInvalid {
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 9)]
        port: u16,
    },
    /// COUNT TCP connections to a local listener on 0.0.0.0:PORT, one per destination as in udp-flows, held open.
    TcpPeak {
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// How long to wait for the connections to complete.
        #[arg(long, default_value_t = 3000)]
        wait_ms: u64,
        /// How long to hold them open once they completed (or the wait ran out).
        #[arg(long, default_value_t = 1000)]
        hold_ms: u64,
    },
    /// As uid UID without capabilities: a user namespace, then COUNT netns in it, each dropping SENDS datagrams to
    /// PORT by the rules in RULESET; prints the truth and holds the netns until stdin closes.
    NetnsFlood {
        #[arg(long, default_value_t = 65534)]
        uid: u32,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 2)]
        sends: u32,
        #[arg(long)]
        ruleset: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::UdpFlows { first, count, port } => traffic::udp_flows(first, count, port).map(report),
        Command::TcpInvalid { count, port } => traffic::tcp_invalid(count, port).map(report),
        Command::TcpPeak {
            count,
            port,
            wait_ms,
            hold_ms,
        } => peak(count, port, wait_ms, hold_ms),
        Command::NetnsFlood {
            uid,
            count,
            port,
            sends,
            ruleset,
        } => netns_flood(uid, count, port, sends, &ruleset),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ctrace-testkit: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn report(sends: Sends) {
    println!("sent={} failed={}", sends.sent, sends.failed);
    if let Some(err) = &sends.first_error {
        eprintln!("ctrace-testkit: first send error: {err}");
    }
}

fn peak(count: u32, port: u16, wait_ms: u64, hold_ms: u64) -> Result<()> {
    let peak = traffic::tcp_peak(
        count,
        port,
        Duration::from_millis(wait_ms),
        Duration::from_millis(hold_ms),
    )?;
    println!("established={} pending={}", peak.established, peak.pending);
    Ok(())
}

fn netns_flood(uid: u32, count: u32, port: u16, sends: u32, ruleset: &std::path::Path) -> Result<()> {
    use std::io::{Read as _, Write as _};
    let (report, held) = ctrace_tests::flood::flood(uid, count, port, sends, ruleset)?;
    println!("{}", report.line());
    std::io::stdout().flush()?;
    // The netns live as long as their descriptors: until the caller closes our stdin.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(held);
    Ok(())
}
