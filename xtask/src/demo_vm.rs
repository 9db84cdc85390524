//! `cargo xtask demo --vm [5.10|6.1|6.12]`: the reload trap of issue 3 in a Debian guest, with ctrace's text output.
//!
//! The guest runs the incident: nf_conntrack_max raised to 1048576 and persisted in /etc/sysctl.d, a traffic peak
//! that fits, `service iptables stop` with IPTABLES_MODULES_UNLOAD=yes (which unloads nf_conntrack), `service
//! iptables start` (which loads it back with its defaults), and the same peak again, which now overflows the table.
//! ctrace runs in text mode throughout; its output, the demo's narration and the service's messages go to one file,
//! in the order they happened, which the host prints when the guest is done. The guest's script is
//! `tests/guest/demo.sh`, its iptables service `tests/guest/iptables.init`; the guest is booted like the test
//! guests (`vm.rs`) with the same tools (`guest.rs`).

use crate::debian::{self, KernelSpec};
use crate::guest::{GUEST_CTRACE, GUEST_KMOD_DIR, Tool, is_kernel_message, marker_block, marker_values, shell_vars};
use crate::vm::{self, VmRun};
use anyhow::{Context, Result, bail};
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

const MARK: &str = "@@ctrace-demo";
/// The whole guest, boot included (about a minute under TCG).
const VM_TIMEOUT: Duration = Duration::from_secs(300);
/// A smaller guest has a smaller default table (4096 entries on 6.1, 16384 on 5.10), so the peak is quick to make.
const MEMORY_MB: u32 = 512;
const RAISED_MAX: &str = "1048576";
/// ctrace's --rate-limit: above this many drops a second it prints per-second aggregates (keeps the demo short).
const RATE_LIMIT: &str = "10";
/// Bounds inside the guest, in seconds.
const ATTACH_TIMEOUT_S: &str = "60";
const REATTACH_TIMEOUT_S: &str = "30";
const STOP_TIMEOUT_S: &str = "60";
const SCRIPT: &str = include_str!("../../tests/guest/demo.sh");
/// kmod's modprobe, so that the service script's `modprobe -r` behaves as on RHEL (busybox's modprobe differs: it
/// tries to unload dependencies that are still in use, and fails).
const TOOLS: &[Tool] = &[Tool::LegacyIptables, Tool::Kmod];
const GUEST_TESTKIT: &str = "/usr/local/bin/ctrace-testkit";

/// Boots a guest with `kernel` ("5.10", "6.1" or "6.12"), runs the demo and prints ctrace's output.
pub fn run(ws: &Path, kernel: &str) -> Result<()> {
    let spec: KernelSpec = kernel.parse()?;
    crate::setup::ensure_debian_packages(&TOOLS.iter().map(|t| t.package()).collect::<Vec<_>>())?;
    let mut files = vec![
        (crate::dist::build_static(ws)?, GUEST_CTRACE.to_string()),
        (
            crate::dist::build_static_bin(ws, "ctrace-tests", "ctrace-testkit")?,
            GUEST_TESTKIT.to_string(),
        ),
        (ws.join("tests/guest/iptables.init"), "/etc/init.d/iptables".to_string()),
    ];
    files.extend(crate::guest::tool_files(TOOLS)?);
    let kernel = debian::fetch(spec, &debian::default_cache_root())?;
    let mut run = VmRun::new(kernel.clone(), guest_script());
    run.files = files;
    run.modules = ["nf_conntrack", "xt_conntrack", "iptable_filter"]
        .map(String::from)
        .to_vec();
    run.timeout = VM_TIMEOUT;
    run.memory_mb = MEMORY_MB;
    eprintln!(
        "demo --vm {}: booting {} ({}) under TCG; the demo takes about a minute",
        spec.short_name(),
        kernel.version,
        kernel.package
    );
    let started = Instant::now();
    let outcome = vm::run(&run)?;
    let output = outcome.script_output();
    let values = marker_values(&output, MARK);
    let Some(lines) = marker_block(&output, MARK, "demo") else {
        outcome.ensure_passed()?;
        bail!(
            "the guest printed no demo output (full console log: {})",
            outcome.log_path.display()
        );
    };
    let highlight = std::io::stdout().is_terminal();
    println!(
        "=== the nf_conntrack reload trap in a Debian {} guest (kernel {}, {MEMORY_MB} MiB): `ctrace run --rate-limit \
         {RATE_LIMIT}`, the demo's steps and the iptables service's messages ===",
        spec.short_name(),
        values.get("kernel").map_or("?", String::as_str)
    );
    for line in lines.iter().filter(|l| !is_kernel_message(l)) {
        if highlight && line.contains(" >>> ") {
            println!("\x1b[1;33m{line}\x1b[0m");
        } else if highlight && line.starts_with("demo: ") {
            println!("\x1b[1m{line}\x1b[0m");
        } else {
            println!("{line}");
        }
    }
    println!(
        "=== end of the demo ({:.0}s, console log: {}) ===",
        started.elapsed().as_secs_f64(),
        outcome.log_path.display()
    );
    if let Some(error) = values.get("error") {
        bail!("the demo stopped early: {error}");
    }
    outcome.ensure_passed().context("the demo guest failed")
}

/// The script with its variables set in front.
fn guest_script() -> String {
    let vars = [
        ("MARK", MARK),
        ("CT", GUEST_CTRACE),
        ("KIT", GUEST_TESTKIT),
        ("KMOD_DIR", GUEST_KMOD_DIR),
        ("RAISED_MAX", RAISED_MAX),
        ("RATE", RATE_LIMIT),
        ("ATTACH_S", ATTACH_TIMEOUT_S),
        ("REATTACH_S", REATTACH_TIMEOUT_S),
        ("STOP_S", STOP_TIMEOUT_S),
    ];
    format!("{}{SCRIPT}", shell_vars(&vars, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_gets_every_variable_it_uses() {
        let script = guest_script();
        for var in [
            "MARK",
            "CT",
            "KIT",
            "KMOD_DIR",
            "RAISED_MAX",
            "RATE",
            "ATTACH_S",
            "REATTACH_S",
            "STOP_S",
        ] {
            assert!(script.contains(&format!("export {var}='")), "{var}");
            assert!(SCRIPT.contains(&format!("${var}")), "the script does not use ${var}");
        }
        assert!(script.contains("IPTABLES_MODULES_UNLOAD=\"yes\""));
    }

    #[test]
    fn unknown_kernels_are_refused_before_anything_is_built() {
        let err = run(Path::new("/nonexistent"), "4.19").unwrap_err().to_string();
        assert!(err.contains("unknown kernel \"4.19\""), "{err}");
    }
}
