//! `cargo xtask bench`: what ctrace costs the traffic it watches, side by side with nothing attached and with a
//! bpftrace one-liner that only counts netfilter drops, in one invocation.
//!
//! The measurements are made by `ctrace-bench` (tests/src/bin/ctrace-bench.rs: bursts from pinned senders in a
//! throwaway netns, the tracers as child processes, the truth from a DROP rule's counter and the kernel's conntrack
//! counters). This module builds it, runs it on the host (tracepoint mode here) and, built static, in a Debian guest
//! (kprobe mode, emulated: indicative), and turns the samples into `target/bench/report.md` and `report.json`.
//!
//! The host run changes kernel state (netns, rules, the global nf_conntrack_max for a moment): on a machine shared
//! with other kernel tests, let it hold their lock for the host part only (`--lock /tmp/ctrace-kernel.lock`; the
//! guest part needs none).

mod budgets;
mod guest;
mod report;
mod samples;
mod stats;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Args;

use crate::{build, setup};
use samples::Run;

/// Packages the host run needs: netns and rules, conntrack's table flush, and the bpftrace reference.
pub const BENCH_PACKAGES: &[&str] = &["iproute2", "iptables", "conntrack", "bpftrace"];

#[derive(Args)]
pub struct BenchArgs {
    /// A run of seconds (one small round, host only) that fails when a total is not exact: the `cargo xtask test`
    /// step.
    #[arg(long)]
    smoke: bool,
    /// Rounds per workload on the host (default 8).
    #[arg(long, conflicts_with = "smoke")]
    rounds: Option<u32>,
    /// Skip the kprobe-mode run in a Debian guest.
    #[arg(long)]
    no_vm: bool,
    /// Only the kprobe-mode run in a Debian guest (no root needed, no host kernel state touched).
    #[arg(long, conflicts_with_all = ["no_vm", "smoke", "rounds"])]
    vm_only: bool,
    /// Record the tracers' BPF program run times (kernel.bpf_stats_enabled, on for the run and restored after).
    #[arg(long)]
    bpf_stats: bool,
    /// Measure this ctrace binary on the host instead of building one (e.g. a release to compare with).
    #[arg(long, value_name = "PATH")]
    ctrace: Option<PathBuf>,
    /// Hold this flock(2) lock while the host part runs (on a machine shared with other kernel tests).
    #[arg(long, value_name = "PATH")]
    lock: Option<PathBuf>,
}

pub fn bench(ws: &Path, args: &BenchArgs) -> Result<()> {
    let mut runs = Vec::new();
    if !args.vm_only {
        runs.push(host(ws, args)?);
    }
    if !args.smoke && !args.no_vm && runs.iter().all(|r| r.error.is_none()) {
        runs.push(guest::run(ws, args.bpf_stats)?);
    }
    let name = if args.smoke { "smoke" } else { "report" };
    write_report(ws, &runs, name)?;
    let mut problems: Vec<String> = runs
        .iter()
        .filter_map(|r| {
            r.error
                .as_ref()
                .map(|e| format!("{}: the benchmark broke: {e}", r.place))
        })
        .collect();
    problems.extend(runs.iter().flat_map(Run::mismatches));
    if !problems.is_empty() {
        bail!("{} problem(s):\n  {}", problems.len(), problems.join("\n  "));
    }
    Ok(())
}

/// The host run: tracepoint mode here, with the bpftrace reference.
fn host(ws: &Path, args: &BenchArgs) -> Result<Run> {
    ensure!(
        setup::is_root(),
        "the benchmark needs root (network namespaces, iptables, eBPF): run `cargo xtask bench` as root"
    );
    setup::ensure_debian_packages(BENCH_PACKAGES)?;
    // The smoke run checks the harness and the totals, not speed: the debug build the host tests use is enough.
    let (built, runner) = build_host(ws, !args.smoke)?;
    let ctrace = match &args.ctrace {
        Some(path) => path
            .canonicalize()
            .with_context(|| format!("{} does not exist", path.display()))?,
        None => built,
    };
    let bpftrace = which::which("bpftrace").context("bpftrace is not on PATH although its package is installed")?;
    let mut runner_args = vec![
        "--scale".to_string(),
        if args.smoke { "smoke" } else { "full" }.to_string(),
    ];
    if let Some(r) = args.rounds {
        runner_args.extend(["--rounds".to_string(), r.to_string()]);
    }
    if args.bpf_stats {
        runner_args.push("--bpf-stats".to_string());
    }
    let _lock = match &args.lock {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("could not open {}", path.display()))?;
            eprintln!("xtask: bench: waiting for {}", path.display());
            file.lock()
                .with_context(|| format!("could not lock {}", path.display()))?;
            Some(file)
        }
        None => None,
    };
    eprintln!("xtask: bench: load average {}", load_average());
    run_host(&runner, &ctrace, &bpftrace, &runner_args)
}

/// The `cargo xtask test` step: a smoke run on the host.
pub fn smoke(ws: &Path) -> Result<()> {
    bench(
        ws,
        &BenchArgs {
            smoke: true,
            rounds: None,
            no_vm: true,
            vm_only: false,
            bpf_stats: false,
            ctrace: None,
            lock: None,
        },
    )
}

/// Builds ctrace and `ctrace-bench`; returns their paths.
fn build_host(ws: &Path, release: bool) -> Result<(PathBuf, PathBuf)> {
    let ctrace = build::build(ws, release)?;
    let mut cmd = build::cargo(ws)?;
    cmd.args(["build", "--package", "ctrace-tests", "--bin", "ctrace-bench"]);
    if release {
        cmd.arg("--release");
    }
    setup::run(&mut cmd).context("building ctrace-bench failed")?;
    let runner = build::target_dir(ws)
        .join(if release { "release" } else { "debug" })
        .join("ctrace-bench");
    ensure!(
        runner.is_file(),
        "cargo built ctrace-bench but {} does not exist",
        runner.display()
    );
    let abs = |p: PathBuf| {
        p.canonicalize()
            .with_context(|| format!("could not resolve {}", p.display()))
    };
    Ok((abs(ctrace)?, abs(runner)?))
}

/// Runs `ctrace-bench` on this host and reads its samples as they come (its progress goes to stderr).
fn run_host(runner: &Path, ctrace: &Path, bpftrace: &Path, extra: &[String]) -> Result<Run> {
    let mut cmd = Command::new(runner);
    cmd.arg("--ctrace")
        .arg(ctrace)
        .arg("--bpftrace")
        .arg(bpftrace)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", setup::describe(&cmd)))?;
    let mut run = Run::new("host", false);
    let stdout = child.stdout.take().context("ctrace-bench's stdout")?;
    for line in BufReader::new(stdout).lines() {
        run.feed(&line.context("reading ctrace-bench's output")?)?;
    }
    let status = child.wait()?;
    run.finish();
    if !status.success() && run.error.is_none() {
        run.error = Some(format!("ctrace-bench failed ({status})"));
    }
    Ok(run)
}

fn write_report(ws: &Path, runs: &[Run], name: &str) -> Result<()> {
    let dir = build::target_dir(ws).join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
    let date = utc_date();
    let md = report::markdown(runs, &date);
    let json = report::json(runs, &date);
    let md_path = dir.join(format!("{name}.md"));
    let json_path = dir.join(format!("{name}.json"));
    std::fs::write(&md_path, &md).with_context(|| format!("could not write {}", md_path.display()))?;
    let mut full = json;
    full["samples"] = serde_json::Value::Array(
        runs.iter()
            .map(|r| serde_json::json!({ "place": r.place, "lines": r.raw }))
            .collect(),
    );
    std::fs::write(&json_path, serde_json::to_string_pretty(&full)?)
        .with_context(|| format!("could not write {}", json_path.display()))?;
    println!("{md}");
    eprintln!("xtask: bench: wrote {} and {}", md_path.display(), json_path.display());
    Ok(())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Today's date (UTC) as YYYY-MM-DD.
fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_from_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
    }
}
