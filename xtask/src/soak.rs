//! `cargo xtask soak --minutes N`: the soak test (`tests/tests/soak.rs`) for N minutes in a Debian guest, one
//! firewall restart (nf_conntrack unloaded and reloaded) a minute, while a scraper polls ctrace's metrics.
//! `cargo xtask test` runs the same test for [`suites::SOAK_MINUTES`] minutes (step "VM soak").

use std::path::Path;

use anyhow::Result;
use clap::Args;

use crate::{
    debian::KernelSpec,
    setup,
    suites::{self, SOAK, soak_timeout},
    test::VM_PACKAGES,
    vm_suite::{self, Selection, Suite},
};

#[derive(Args)]
pub struct SoakArgs {
    /// How long, in minutes: one firewall restart each (at least 2: the first is the warm-up RSS is measured after).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..=1440))]
    minutes: u64,
    /// The guest kernel: 5.10, 6.1 or 6.12.
    #[arg(long, default_value = "6.1")]
    kernel: KernelSpec,
}

pub fn soak(ws: &Path, args: &SoakArgs) -> Result<()> {
    setup::ensure_debian_packages(VM_PACKAGES)?;
    setup::ebpf_env(ws)?;
    vm_suite::run(ws, &suite(args.minutes, args.kernel), &Selection::default())
}

/// The soak suite for `minutes` on `kernel`. A suite is static data; this command makes one per run, so the
/// little it leaks is freed at exit.
fn suite(minutes: u64, kernel: KernelSpec) -> Suite {
    let minutes_env: &'static str = Box::leak(minutes.to_string().into_boxed_str());
    let env = SOAK
        .env
        .iter()
        .map(|&(name, value)| {
            (
                name,
                if name == suites::SOAK_MINUTES_ENV {
                    minutes_env
                } else {
                    value
                },
            )
        })
        .collect::<Vec<_>>();
    Suite {
        kernels: Box::leak(Box::new([kernel])),
        env: Box::leak(env.into_boxed_slice()),
        timeout: soak_timeout(minutes),
        ..SOAK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suite_runs_as_long_as_asked() {
        let s = suite(30, KernelSpec::Debian612);
        assert_eq!(s.kernels, [KernelSpec::Debian612]);
        assert!(s.env.contains(&(suites::SOAK_MINUTES_ENV, "30")));
        assert!(s.env.contains(&("CTRACE_TEST_EXPECT_MODE", "kprobe")));
        assert_eq!(s.timeout, soak_timeout(30));
        // The short soak of `cargo xtask test` says its length once.
        assert!(SOAK.env.contains(&(suites::SOAK_MINUTES_ENV, "2")));
        assert_eq!(suites::SOAK_MINUTES, 2);
    }
}
