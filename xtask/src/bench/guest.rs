//! The benchmark in kprobe mode: `ctrace-bench`, built static, in a 2-vCPU Debian 6.1 guest where nf_conntrack is a
//! module and ctrace attaches its kprobes (this host has none). Emulated (QEMU TCG): its numbers compare conditions
//! within the guest and say nothing about real hardware. No bpftrace there: nothing and ctrace only.

use std::{path::Path, time::Duration};

use anyhow::Result;

use super::samples::Run;
use crate::{
    debian::{self, KernelSpec},
    guest::{Tool, tool_files},
    vm::{self, VmRun},
};

const KERNEL: KernelSpec = KernelSpec::Debian61;
const MARK: &str = "@@ctrace-bench";
const GUEST_CTRACE: &str = "/usr/local/bin/ctrace";
const GUEST_RUNNER: &str = "/usr/local/bin/ctrace-bench";
/// What the workloads need loaded (the guest cannot load modules on demand): conntrack and its iptables match,
/// the filter tables, the DROP rule's matches, and conntrack's netlink interface for the table flush.
const MODULES: &[&str] = &[
    "nf_conntrack",
    "nf_conntrack_netlink",
    "xt_conntrack",
    "iptable_filter",
    "ip6table_filter",
    "xt_tcpudp",
    "xt_comment",
];
/// Host programs the runner calls (in the guest before busybox's applets in PATH).
const TOOLS: &[Tool] = &[Tool::LegacyIptables, Tool::Iproute2, Tool::Conntrack];
const TIMEOUT: Duration = Duration::from_secs(1800);

/// Builds, boots, runs the guest scale of the benchmark and reads its samples. A guest that breaks is a `Run` with
/// an error (reported with the rest); only host problems (no QEMU, no kernel package) are errors here.
pub fn run(ws: &Path, bpf_stats: bool) -> Result<Run> {
    let mut files = vec![
        (crate::dist::build_static(ws)?, GUEST_CTRACE.to_string()),
        (
            crate::dist::build_static_bin(ws, "ctrace-tests", "ctrace-bench")?,
            GUEST_RUNNER.to_string(),
        ),
    ];
    files.extend(tool_files(TOOLS)?);
    let kernel = debian::fetch(KERNEL, &debian::default_cache_root())?;
    let script = format!(
        "mkdir -p /run/netns\n\
         for tool in iptables ip6tables; do ln -sf xtables-legacy-multi \"/usr/sbin/$tool\"; done\n\
         {GUEST_RUNNER} --ctrace {GUEST_CTRACE} --scale guest --expect-mode kprobe{} | sed 's/^/{MARK} /'\n",
        if bpf_stats { " --bpf-stats" } else { "" }
    );
    let mut vm_run = VmRun::new(kernel.clone(), script);
    vm_run.files = files;
    vm_run.modules = MODULES.iter().map(|m| m.to_string()).collect();
    vm_run.timeout = TIMEOUT;
    let place = format!("guest (Debian {})", KERNEL.short_name());
    eprintln!(
        "xtask: bench: booting {} ({}) under TCG, {} vCPUs",
        kernel.version, kernel.package, vm_run.cpus
    );
    let outcome = vm::run(&vm_run)?;
    let mut run = Run::new(&place, true);
    let prefix = format!("{MARK} ");
    for line in outcome.script_output().lines() {
        if let Some(json) = line.trim_end_matches('\r').strip_prefix(&prefix) {
            run.feed(json)?;
        }
    }
    run.finish();
    if let Some(err) = run.error.as_mut() {
        err.push('\n');
        err.push_str(&outcome.console_tail(&place, 40));
    }
    eprintln!(
        "xtask: bench: {place}: {} samples, VM total {:.0} s",
        run.samples.len(),
        outcome.duration.as_secs_f64()
    );
    Ok(run)
}
