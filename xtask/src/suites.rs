//! The VM test suites, as data for the runner (`vm_suite.rs`). Their tests live in `tests/tests/<target>`; a new
//! guest test is a new `#[test]` there (or a new target named here).

use std::time::Duration;

use crate::{
    debian::KernelSpec,
    guest::{GUEST_KMOD_MODPROBE, Tool},
    vm_suite::Suite,
};

/// The modules of a firewall that tracks connections with iptables (legacy): they hold nf_conntrack.
const CONNTRACK_FIREWALL: &[&str] = &["nf_conntrack", "xt_conntrack", "iptable_filter"];

/// Debian 6.1 with a conntrack firewall: table_full, early_drop and invalid drops against the kernel's counters,
/// in kprobe mode (chosen by ctrace itself) and in tracepoint mode (`tests/tests/drops.rs`), and `ctrace check`
/// before and after a module reload (`tests/tests/check.rs`, which stops the firewall first).
pub(crate) const DROPS_AND_CHECK: Suite = Suite {
    step: "VM drop and check tests",
    name: "drops-check",
    targets: &["drops", "check"],
    kernels: &[KernelSpec::Debian61],
    modules: CONNTRACK_FIREWALL,
    kernel_modules: &[],
    tools: &[Tool::LegacyIptables],
    env: &[],
    cpus: 2,
    memory_mb: 1024,
    timeout: Duration::from_secs(360),
};

/// The attribution matrix (`tests/tests/attribution/`) in kprobe mode, and the forged module alerts
/// (`tests/tests/forgery.rs`), capabilities per feature (`capability_sets.rs`), the chain behind a module event
/// (`provenance.rs`). 5.10 is left out: it counts resolved clashes as insert_failed.
pub(crate) const MATRIX: Suite = Suite {
    step: "VM attribution matrix",
    name: "matrix",
    targets: &["attribution", "forgery", "capability_sets", "provenance"],
    kernels: &[KernelSpec::Debian61, KernelSpec::Debian612],
    // Every match, target and expression the tests use is named: nft's and iptables' module requests fail in the
    // guests.
    modules: &[
        "nf_conntrack",
        "xt_conntrack",
        "iptable_filter",
        "iptable_raw",
        "iptable_nat",
        "ip6table_filter",
        "ip6table_raw",
        "xt_tcpudp",
        "xt_comment",
        "xt_statistic",
        "xt_CT",
        "xt_nat",
        "nf_tables",
        "nft_ct",
        "veth",
    ],
    // 6.12 has nft_objref inside nf_tables.
    kernel_modules: &[(KernelSpec::Debian61, "nft_objref")],
    tools: &[Tool::LegacyIptables, Tool::Nftables, Tool::Iproute2],
    env: &[
        ("CTRACE_TEST_EXPECT_MODE", "kprobe"),
        // The churn case's netns (2000 on the host; emulation makes each ~0.1 s).
        ("CTRACE_TEST_CHURN_NETNS", "1000"),
    ],
    cpus: 2,
    memory_mb: 1024,
    timeout: Duration::from_secs(900),
};

/// The reload trap: module events, sysctl resets and writes, drops across a reload (`tests/tests/reload/`).
pub(crate) const RELOAD: Suite = Suite {
    step: "VM module reload tests",
    name: "reload",
    targets: &["reload"],
    kernels: &KernelSpec::ALL,
    modules: CONNTRACK_FIREWALL,
    kernel_modules: &[],
    tools: &[Tool::LegacyIptables, Tool::Kmod],
    env: &[("CTRACE_TEST_KMOD_MODPROBE", GUEST_KMOD_MODPROBE)],
    cpus: 2,
    memory_mb: 1024,
    timeout: Duration::from_secs(420),
};

/// The soak (`tests/tests/soak.rs`): drop floods, netns churn and a firewall restart (nf_conntrack unloaded and
/// reloaded) every minute while a scraper polls `--metrics`; totals against the kernel's counters and the rules',
/// RSS, scrapes, and bpftool's listing after. `cargo xtask test` runs [`SOAK_MINUTES`] minutes; `cargo xtask soak
/// --minutes N` any length (`soak::suite`).
pub(crate) const SOAK: Suite = Suite {
    step: "VM soak",
    name: "soak",
    targets: &["soak"],
    kernels: &[KernelSpec::Debian61],
    // The rules' matches are loaded at boot: the guests cannot load modules on demand reliably.
    modules: &[
        "nf_conntrack",
        "xt_conntrack",
        "iptable_filter",
        "xt_tcpudp",
        "xt_comment",
    ],
    kernel_modules: &[],
    tools: &[Tool::LegacyIptables, Tool::Iproute2, Tool::Bpftool],
    env: &[("CTRACE_TEST_EXPECT_MODE", "kprobe"), (SOAK_MINUTES_ENV, "2")],
    cpus: 2,
    memory_mb: 1024,
    timeout: soak_timeout(SOAK_MINUTES),
};

/// The short soak's length in `cargo xtask test` (as SOAK's environment says it to the test).
pub(crate) const SOAK_MINUTES: u64 = 2;
/// The variable that tells the soak test its length in minutes.
pub(crate) const SOAK_MINUTES_ENV: &str = "CTRACE_SOAK_MINUTES";

/// A soak's time limit: its minutes (each may run over while ctrace reattaches under emulation), boot and start.
pub(crate) const fn soak_timeout(minutes: u64) -> Duration {
    Duration::from_secs(minutes * 90 + 300)
}
