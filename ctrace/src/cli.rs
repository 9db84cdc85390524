//! Command line. Bad values end in one line on stderr and exit code 2 (clap's usage errors).

use std::{net::IpAddr, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ctrace_common::Reason;

#[derive(Debug, Parser)]
#[command(
    name = "ctrace",
    version,
    about = "Shows which packets netfilter connection tracking dropped, and why",
    long_about = "Shows which packets and connections netfilter connection tracking dropped, and why: \
table full, early-drop eviction, insert failure, invalid packet, or a firewall rule."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace drops as they happen until Ctrl-C, SIGTERM or --duration.
    Run(RunArgs),
    /// Make conntrack drop packets in a throwaway network namespace and trace them.
    Demo(DemoArgs),
    /// Audit conntrack sizing, persistence, reload traps, load, timeouts and counters (no root needed).
    Check(CheckArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Pick the most exact mode this kernel supports.
    Auto,
    /// Failure-only kprobes on nf_conntrack plus skb:kfree_skb (needs CONFIG_KPROBES).
    Kprobe,
    /// skb:kfree_skb plus conntrack's per-CPU counters; works without kprobes.
    Tracepoint,
}

#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Print JSON Lines (schema in the README) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Stop after this long, e.g. 30s, 5m, 1h, 500ms.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Only this network namespace: an `ip netns` name, an inode number, or a path like /proc/PID/ns/net.
    #[arg(long)]
    pub netns: Option<String>,
    /// Only this protocol: tcp, udp, icmp, icmpv6, sctp, or a protocol number.
    #[arg(long, value_parser = parse_proto)]
    pub proto: Option<u8>,
    /// Only packets with this source or destination port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Only packets from or to this address (IPv4 or IPv6).
    #[arg(long)]
    pub host: Option<IpAddr>,
    /// Only these reasons (comma-separated): table_full, early_drop, insert_failed, invalid, netfilter_rule.
    #[arg(long, value_delimiter = ',', value_parser = parse_reason)]
    pub reason: Vec<Reason>,
    /// Probe mode.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// Above this many drops per second, print per-second aggregates instead of every drop (0: never).
    #[arg(long, default_value_t = 50)]
    pub rate_limit: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics: ADDR:PORT, or PORT alone for loopback [default when
    /// given without a value: 127.0.0.1:9863].
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = DEFAULT_METRICS_ADDR, value_parser = parse_metrics_addr)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Print nothing on stdout (with --metrics, for a daemon); errors still go to stderr.
    #[arg(long, requires = "metrics")]
    pub quiet: bool,
}

/// Where `--metrics` serves when given no address: loopback only, so a host's metrics are not published by
/// accident.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9863";

fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    let port_only = s.strip_prefix(':').unwrap_or(s);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("`{s}` is not an address to serve metrics on: use e.g. 127.0.0.1:9863, [::1]:9863 or 9863")
    })
}

#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// Print JSON Lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also show table-full drops by lowering the global net.netfilter.nf_conntrack_max to N for a
    /// moment (it is global: every netns shares it). The old value is restored on every exit,
    /// Ctrl-C included.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(16..))]
    pub lower_global_max: Option<u64>,
}

#[derive(Debug, Args, Clone)]
pub struct CheckArgs {
    /// Print one JSON document (schema in the README) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Do not report these finding ids (repeatable, or comma-separated), e.g. CT-SIZE-SUMMARY.
    #[arg(long, value_name = "ID", value_delimiter = ',', value_parser = crate::check::parse_id)]
    pub ignore: Vec<String>,
    /// Audit the system mounted at DIR (a disk image or a fixture tree): /proc, /sys and /etc are read under DIR.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: std::path::PathBuf,
    /// Print every finding id with its severity and meaning, and exit.
    #[arg(long)]
    pub list_ids: bool,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration: use e.g. 30s, 5m, 1h or 500ms"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1000.0,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}`: use ms, s, m or h")),
    };
    if !(secs > 0.0 && secs.is_finite() && secs < 366.0 * 86400.0) {
        return Err(format!("`{s}`: the duration must be positive and under a year"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_proto(s: &str) -> Result<u8, String> {
    crate::event::parse_proto(s)
        .ok_or_else(|| format!("`{s}` is not a protocol: use tcp, udp, icmp, icmpv6, sctp or a number 1-255"))
}

fn parse_reason(s: &str) -> Result<Reason, String> {
    Reason::ALL.into_iter().find(|r| r.name() == s).ok_or_else(|| {
        let names: Vec<_> = Reason::ALL.iter().map(|r| r.name()).collect();
        format!("`{s}` is not a reason: use {}", names.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addresses() {
        assert_eq!(parse_metrics_addr("9863").unwrap().to_string(), "127.0.0.1:9863");
        assert_eq!(parse_metrics_addr(":9000").unwrap().to_string(), "127.0.0.1:9000");
        assert_eq!(parse_metrics_addr("0.0.0.0:9863").unwrap().to_string(), "0.0.0.0:9863");
        assert_eq!(parse_metrics_addr("[::1]:9863").unwrap().to_string(), "[::1]:9863");
        assert!(parse_metrics_addr("localhost:x").is_err());
        let cli = Cli::try_parse_from(["ctrace", "run", "--metrics"]).unwrap();
        let Command::Run(args) = cli.command else { panic!("run") };
        assert_eq!(args.metrics.unwrap().to_string(), DEFAULT_METRICS_ADDR);
        assert!(
            Cli::try_parse_from(["ctrace", "run", "--quiet"]).is_err(),
            "--quiet alone would show nothing"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        for bad in ["", "abc", "5x", "-1s", "0s", "1e9h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn check_flags() {
        let cli = Cli::try_parse_from([
            "ctrace",
            "check",
            "--json",
            "--ignore",
            "ct-size-summary,CT-LOAD-TOP",
            "--ignore",
            "CT-COUNTER-INVALID",
            "--root",
            "/tmp",
        ])
        .unwrap();
        let Command::Check(a) = cli.command else {
            panic!("check expected")
        };
        assert!(a.json);
        assert_eq!(a.ignore, ["CT-SIZE-SUMMARY", "CT-LOAD-TOP", "CT-COUNTER-INVALID"]);
        assert_eq!(a.root, std::path::PathBuf::from("/tmp"));
        let Command::Check(d) = Cli::try_parse_from(["ctrace", "check"]).unwrap().command else {
            panic!("check expected")
        };
        assert_eq!(d.root, std::path::PathBuf::from("/"));
    }

    #[test]
    fn flags_parse_and_bad_values_are_usage_errors() {
        let cli = Cli::try_parse_from([
            "ctrace",
            "run",
            "--json",
            "--duration",
            "10s",
            "--proto",
            "udp",
            "--port",
            "53",
            "--host",
            "::1",
            "--reason",
            "table_full,invalid",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("run expected")
        };
        assert!(a.json);
        assert_eq!(a.proto, Some(17));
        assert_eq!(a.reason, vec![Reason::TableFull, Reason::Invalid]);
        for args in [
            &["ctrace", "run", "--duration", "soon"][..],
            &["ctrace", "run", "--proto", "bogus"],
            &["ctrace", "run", "--port", "0"],
            &["ctrace", "run", "--host", "300.1.1.1"],
            &["ctrace", "run", "--reason", "full"],
            &["ctrace", "run", "--mode", "magic"],
            &["ctrace", "check", "--ignore", "CT-NO-SUCH-ID"],
            &["ctrace", "check", "--bogus"],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }
}
