//! `cargo xtask test`: the project's test steps, in order, with a summary.
//!
//! A step is one entry in [`STEPS`]: its name, its kind (which `--*-only` flag selects it), the Debian packages
//! it needs and what runs it (a function, or a VM suite for the runner). Every step runs even when an earlier one
//! failed; the command fails when any step failed.

use crate::{
    build, setup, suites,
    vm_suite::{self, Suite},
};
use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use std::path::Path;
use std::time::{Duration, Instant};

/// Packages the host integration tests use (netns, iptables and nftables rules, conntrack statistics).
pub const HOST_PACKAGES: &[&str] = &["iptables", "nftables", "conntrack", "iproute2", "prometheus", "bpftool"];
/// Packages the VM tests use (QEMU, busybox initramfs, depmod).
pub const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod", "cpio"];

#[derive(Args)]
pub struct TestArgs {
    /// Run only the tests that run on this machine: unit tests and host integration tests (no VM).
    #[arg(long, conflicts_with_all = ["vm_only", "unit_only"])]
    host_only: bool,
    /// Run only the VM tests.
    #[arg(long, conflicts_with = "unit_only")]
    vm_only: bool,
    /// Run only the unit tests (`cargo test` of the workspace's host crates).
    #[arg(long)]
    unit_only: bool,
    /// Run only the steps whose name contains this text (case-insensitive), e.g. `--step matrix`.
    #[arg(long, value_name = "TEXT")]
    step: Option<String>,
    /// VM suites: boot only this kernel (5.10, 6.1 or 6.12).
    #[arg(long, value_name = "VERSION")]
    kernel: Option<crate::debian::KernelSpec>,
    /// VM suites: run only the tests whose `<target>::<test>` contains this text, e.g. `--vm-test clash`.
    #[arg(long, value_name = "TEXT")]
    vm_test: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unit,
    Host,
    Vm,
}

struct Step {
    name: &'static str,
    kind: Kind,
    packages: &'static [&'static str],
    run: Run,
}

enum Run {
    Function(fn(&Path) -> Result<()>),
    Suite(&'static Suite),
}

impl Step {
    const fn new(
        name: &'static str,
        kind: Kind,
        packages: &'static [&'static str],
        run: fn(&Path) -> Result<()>,
    ) -> Self {
        Self {
            name,
            kind,
            packages,
            run: Run::Function(run),
        }
    }

    /// A VM suite: its tests run in guests by `vm_suite::run`.
    const fn vm(suite: &'static Suite) -> Self {
        Self {
            name: suite.step,
            kind: Kind::Vm,
            packages: VM_PACKAGES,
            run: Run::Suite(suite),
        }
    }

    fn packages(&self) -> Vec<&'static str> {
        let mut packages = self.packages.to_vec();
        if let Run::Suite(suite) = self.run {
            packages.extend(suite.packages());
        }
        packages
    }

    fn run(&self, ws: &Path, only: &vm_suite::Selection) -> Result<()> {
        match self.run {
            Run::Function(run) => run(ws),
            Run::Suite(suite) => vm_suite::run(ws, suite, only),
        }
    }
}

/// The steps, in order. Adding a step is one line here (a VM suite is declared in suites.rs).
const STEPS: &[Step] = &[
    Step::new("unit tests", Kind::Unit, &[], unit_tests),
    Step::new("host integration tests", Kind::Host, HOST_PACKAGES, host_tests),
    Step::new(
        "bench smoke run",
        Kind::Host,
        crate::bench::BENCH_PACKAGES,
        crate::bench::smoke,
    ),
    Step::new(
        "deployment files",
        Kind::Host,
        crate::deploy_checks::PACKAGES,
        crate::deploy_checks::run,
    ),
    Step::new(
        "Debian package",
        Kind::Host,
        crate::package::PACKAGES,
        crate::package::test_package,
    ),
    Step::vm(&suites::DROPS_AND_CHECK),
    Step::vm(&suites::MATRIX),
    Step::vm(&suites::RELOAD),
    Step::vm(&suites::SOAK),
];

pub fn test(ws: &Path, args: &TestArgs) -> Result<()> {
    let kinds: &[Kind] = if args.unit_only {
        &[Kind::Unit]
    } else if args.host_only {
        &[Kind::Unit, Kind::Host]
    } else if args.vm_only {
        &[Kind::Vm]
    } else {
        &[Kind::Unit, Kind::Host, Kind::Vm]
    };
    let named = |step: &Step| {
        args.step
            .as_ref()
            .is_none_or(|text| step.name.to_lowercase().contains(&text.to_lowercase()))
    };
    let steps: Vec<&Step> = STEPS
        .iter()
        .filter(|step| kinds.contains(&step.kind) && named(step))
        .collect();
    ensure!(
        !steps.is_empty(),
        "no test step matches the options given; the steps are: {}",
        STEPS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
    );

    let setup_start = Instant::now();
    let mut packages: Vec<&str> = Vec::new();
    for pkg in steps.iter().flat_map(|step| step.packages()) {
        if !packages.contains(&pkg) {
            packages.push(pkg);
        }
    }
    setup::ensure_debian_packages(&packages)?;
    setup::ebpf_env(ws)?;
    let setup_time = setup_start.elapsed();

    let only = vm_suite::Selection {
        kernel: args.kernel,
        tests: args.vm_test.clone(),
    };
    let mut results = Vec::new();
    for step in &steps {
        eprintln!("xtask: ==== {} ====", step.name);
        let start = Instant::now();
        let result = step.run(ws, &only);
        if let Err(err) = &result {
            // The whole reason (for a VM suite, with the guests' console ends) is in the summary below.
            let why = format!("{err:#}");
            eprintln!(
                "xtask: {} failed: {}",
                step.name,
                why.lines().next().unwrap_or_default()
            );
        }
        results.push((step.name, start.elapsed(), result));
    }

    eprintln!("xtask: ==== summary ====");
    eprintln!("xtask: {:<8} {:<24} {}", "ok", "setup", secs(setup_time));
    for (name, time, result) in &results {
        let status = if result.is_ok() { "ok" } else { "FAILED" };
        eprintln!("xtask: {status:<8} {name:<24} {}", secs(*time));
    }
    // Why each step failed, again at the end: CI keeps a log's head and tail, and the step's own report may be in
    // the part it cut.
    for (name, _, result) in &results {
        if let Err(err) = result {
            eprintln!("xtask: {name} failed: {err:#}");
        }
    }
    let failed = results.iter().filter(|(_, _, result)| result.is_err()).count();
    if failed > 0 {
        bail!("{failed} of {} test steps failed", results.len());
    }
    Ok(())
}

fn secs(time: Duration) -> String {
    format!("{:.1} s", time.as_secs_f64())
}

/// `cargo test` of every host crate except the integration tests. ctrace-ebpf is excluded: it is a `no_std`
/// program for the BPF target, built (and checked) by ctrace/build.rs.
fn unit_tests(ws: &Path) -> Result<()> {
    let mut cmd = build::cargo(ws)?;
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        "ctrace-tests",
        "--exclude",
        "ctrace-ebpf",
    ]);
    setup::run(&mut cmd)
}

/// The integration tests in tests/ against a freshly built ctrace, one at a time (they share the host's
/// conntrack settings). They need root: without it this step fails rather than skipping them.
fn host_tests(ws: &Path) -> Result<()> {
    ensure!(
        setup::is_root(),
        "the host integration tests need root (network namespaces, iptables, eBPF): run `cargo xtask test` as root"
    );
    let bin = build::build(ws, false)?;
    let bin = bin
        .canonicalize()
        .with_context(|| format!("could not resolve {}", bin.display()))?;
    let mut cmd = build::cargo(ws)?;
    // --nocapture: each case prints the truth next to ctrace's totals, which belongs in the log.
    cmd.args([
        "test",
        "--package",
        "ctrace-tests",
        "--",
        "--test-threads=1",
        "--nocapture",
    ])
    .env("CTRACE_BIN", &bin);
    setup::run(&mut cmd)
}
