//! `ctrace-bench`: the measurements behind `cargo xtask bench` (see `ctrace_tests::bench`), on this machine.
//!
//! Prints JSON Lines: `{"machine":{...}}` first, then `{"sample":{...}}` per measurement, then `{"done":{...}}`, or
//! `{"error":"..."}` when the harness broke (exit code 1). It needs root: it creates netns, adds iptables rules,
//! lowers the global nf_conntrack_max for table_full bursts (restored on every exit path but SIGKILL) and runs the
//! tracers. Hold /tmp/ctrace-kernel.lock on a machine shared with other kernel tests.

use std::{io::Write as _, path::PathBuf, process::ExitCode};

use clap::Parser;
use ctrace_tests::bench::{self, Config, workload::Counts, workload::Workload};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scale {
    /// A few seconds: one round of the three main workloads with small bursts (the `cargo xtask test` step).
    Smoke,
    /// The full host benchmark.
    Full,
    /// Bursts sized for an emulated 2-vCPU guest with a 1 GiB table limit.
    Guest,
}

#[derive(Parser)]
#[command(name = "ctrace-bench", about = "Measures what ctrace costs the traffic it watches")]
struct Cli {
    /// The ctrace binary to measure.
    #[arg(long)]
    ctrace: PathBuf,
    /// bpftrace, for the reference condition (left out without it).
    #[arg(long)]
    bpftrace: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "full")]
    scale: Scale,
    /// Rounds per workload (default: 1 smoke, 8 full, 4 guest).
    #[arg(long)]
    rounds: Option<u32>,
    /// Workloads to run (repeatable; default: all, smoke: all but new_flows_full_table).
    #[arg(long, value_enum)]
    workload: Vec<Workload>,
    /// Conditions to measure (repeatable; default: off, ctrace, and bpftrace when given), e.g. only ctrace while
    /// `perf record -a` profiles it.
    #[arg(long, value_enum)]
    condition: Vec<bench::Condition>,
    /// Datagrams per timed burst, for every workload (default: the scale's).
    #[arg(long)]
    packets: Option<u32>,
    /// The mode ctrace must attach in.
    #[arg(long)]
    expect_mode: Option<String>,
    /// Enable kernel.bpf_stats_enabled for the run (restored after) and record the tracers' BPF program run
    /// times: the kernel-side cost per packet. The statistics themselves cost every program run a little.
    #[arg(long)]
    bpf_stats: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = run(&cli);
    let mut out = std::io::stdout().lock();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(out, "{}", json!({ "error": format!("{err:#}") }));
            eprintln!("ctrace-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    ctrace_tests::require_root();
    bench::catch_signals()?;
    let (rounds, counts, default_workloads) = match cli.scale {
        Scale::Smoke => (
            1,
            Counts {
                new_flows: 20_000,
                evictions: 5_000,
                rule_drops: 20_000,
                table_full_drops: 20_000,
                table_full_max: 256,
            },
            vec![Workload::NewFlows, Workload::RuleDrop, Workload::TableFull],
        ),
        Scale::Full => (
            8,
            Counts {
                new_flows: 200_000,
                evictions: 100_000,
                rule_drops: 1_000_000,
                table_full_drops: 1_000_000,
                table_full_max: 256,
            },
            Workload::ALL.to_vec(),
        ),
        Scale::Guest => (
            4,
            Counts {
                new_flows: 5_000,
                evictions: 3_000,
                rule_drops: 20_000,
                table_full_drops: 20_000,
                table_full_max: 256,
            },
            Workload::ALL.to_vec(),
        ),
    };
    let reference = cli.bpftrace.as_deref().map(bench::Reference::prepare).transpose()?;
    let counts = match cli.packets {
        Some(n) => Counts {
            new_flows: n,
            evictions: n,
            rule_drops: n,
            table_full_drops: n,
            ..counts
        },
        None => counts,
    };
    let config = Config {
        ctrace: cli.ctrace.clone(),
        workloads: if cli.workload.is_empty() {
            default_workloads
        } else {
            cli.workload.clone()
        },
        rounds: cli.rounds.unwrap_or(rounds),
        counts,
        expect_mode: cli.expect_mode.clone(),
        bpf_stats: cli.bpf_stats,
        conditions: cli.condition.clone(),
    };
    let _stats = cli
        .bpf_stats
        .then(|| ctrace_tests::SysctlGuard::set("/proc/sys/kernel/bpf_stats_enabled", "1"))
        .transpose()?;
    let machine = json!({
        "kernel": nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
        "cpus": ctrace_tests::threads::cpus()?.len(),
        "cpu_model": cpu_model(),
        "mem_total_kib": meminfo("MemTotal"),
        "load_1m": load_1m(),
        "other_tracers": other_tracers(),
        "nf_conntrack_max": bench::traffic::global_max()?,
        "rounds": config.rounds,
        "bpf_stats": config.bpf_stats,
        "counts": config.counts,
        "workloads": config.workloads,
        "bpftrace_program": reference.as_ref().map(|r| r.program.clone()),
    });
    if let Some(list) = machine["other_tracers"].as_array().filter(|l| !l.is_empty()) {
        eprintln!("ctrace-bench: other tracers are running and cost every condition: {list:?}");
    }
    emit(&json!({ "machine": machine }));
    bench::run(&config, reference.as_ref(), |sample| {
        eprintln!(
            "ctrace-bench: {} {:?} round {}: {:.0} packets/s, {:.0} per sender CPU second{}",
            sample.workload.name(),
            sample.condition,
            sample.round,
            sample.rate,
            sample.cpu_rate,
            sample
                .tracer
                .as_ref()
                .and_then(|t| t.mismatch.as_ref())
                .map(|m| format!(" -- NOT EXACT: {m}"))
                .unwrap_or_default()
        );
        emit(&json!({ "sample": sample }));
    })?;
    emit(&json!({ "done": { "load_1m": load_1m() } }));
    Ok(())
}

/// Tracers of other people that run now (`comm pid`): they hook the same kernel paths and cost every condition.
fn other_tracers() -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm = comm.trim();
        if ["ctrace", "bpftrace", "pwru", "retis"].contains(&comm) {
            found.push(format!("{comm} {pid}"));
        }
    }
    found
}

fn emit(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_string())
            })
        })
        .unwrap_or_default()
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix(key)?
                    .strip_prefix(':')?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

fn load_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}
