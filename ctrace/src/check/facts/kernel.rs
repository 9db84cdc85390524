//! The running kernel's version and the conntrack sizes it picks by itself: buckets, max and expect_max from RAM
//! as `nf_conntrack_init_start()` computes them, and the fixed per-netns defaults, so that the checks can tell a
//! value someone set from the kernel's own.

use super::{KEY_BUCKETS, KEY_EXPECT_MAX, KEY_MAX};
use crate::check::clean;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
    pub release: String,
}

impl KernelVersion {
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let release = clean(release.trim());
        let mut it = release.split(|c: char| !c.is_ascii_digit());
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        Some(KernelVersion { major, minor, release })
    }

    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

/// The kernel's own choice of buckets and max for this RAM, computed as `nf_conntrack_init_start()` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Defaults {
    pub buckets: u64,
    pub max: u64,
    pub expect_max: u64,
    /// The rule that produced them, as evidence.
    pub rule: String,
    /// Computed from RAM by the formula (not a fixed size): the kernel used its page count at load time, which
    /// can differ from MemTotal now by a few percent, so compare with a tolerance.
    pub approximate: bool,
}

/// `hashsize` given as a module option or on the kernel command line makes `max = 8 × hashsize` (all versions);
/// otherwise buckets come from RAM (kernel-conntrack.md): before 5.15 RAM/16384/8, 16384 above 1 GiB, 65536 above
/// 4 GiB, at least 32, max = 4 × buckets; from 5.15 the same base, 65536 above 1 GiB, 262144 above 4 GiB, at
/// least 1024, max = buckets. Buckets are rounded up to a multiple of PAGE_SIZE/8 before max is derived.
pub fn kernel_defaults(kernel: &KernelVersion, mem_total_kb: u64, page_size: u64, hashsize: Option<u64>) -> Defaults {
    let page_size = page_size.max(512);
    let nr_pages = mem_total_kb.saturating_mul(1024) / page_size;
    let gib_pages = (1u64 << 30) / page_size;
    let new = kernel.at_least(5, 15);
    let mut approximate = false;
    let (buckets, factor, rule): (u64, u64, String) = match hashsize.filter(|&h| h > 0) {
        Some(h) => (h, 8, format!("hashsize={h} given: max = 8 × hashsize")),
        None => {
            let base = nr_pages.saturating_mul(page_size) / 16384 / 8;
            let (b, why) = if nr_pages > 4 * gib_pages {
                (if new { 262144 } else { 65536 }, "RAM > 4 GiB")
            } else if nr_pages > gib_pages {
                (if new { 65536 } else { 16384 }, "RAM > 1 GiB")
            } else {
                approximate = base > if new { 1024 } else { 32 };
                (
                    base,
                    "RAM / 16384 / 8, ± the memory the kernel had when it loaded nf_conntrack",
                )
            };
            let min = if new { 1024 } else { 32 };
            let b = b.max(min);
            let factor = if new { 1 } else { 4 };
            let era = if new { "5.15+" } else { "before 5.15" };
            (
                b,
                factor,
                format!(
                    "kernel {} ({era}), MemTotal {} MiB: {why} → {b} buckets, max = {factor} × buckets",
                    kernel.release,
                    mem_total_kb / 1024
                ),
            )
        }
    };
    // nf_ct_alloc_hashtable() rounds the size up before max and the expectation table are derived from it.
    let step = page_size / 8;
    let rounded = buckets.div_ceil(step) * step;
    let max = rounded * factor;
    let rule = if rounded == buckets {
        rule
    } else {
        format!("{rule}; buckets rounded up to {rounded}")
    };
    let expect_max = (rounded / 256).max(1) * 4;
    Defaults {
        buckets: rounded,
        max,
        expect_max,
        rule,
        approximate,
    }
}

impl Defaults {
    /// Whether `value` is the kernel's default for `key` (None: no known default).
    pub fn is_default(d: Option<&Defaults>, key: &str, value: &str) -> Option<bool> {
        let (def, approx) = match key {
            KEY_MAX => d.map(|d| (d.max, d.approximate))?,
            KEY_BUCKETS => d.map(|d| (d.buckets, d.approximate))?,
            KEY_EXPECT_MAX => d.map(|d| (d.expect_max, d.approximate))?,
            _ => (static_default(key)?, false),
        };
        let Ok(v) = value.trim().parse::<u64>() else {
            return Some(false);
        };
        Some(v == def || (approx && v.abs_diff(def).saturating_mul(100) <= def.saturating_mul(15)))
    }
}

/// Defaults of per-netns sysctls that have been the same from 4.18 to 6.18.
pub fn static_default(key: &str) -> Option<u64> {
    let name = key.strip_prefix("net.netfilter.nf_conntrack_")?;
    Some(match name {
        "tcp_timeout_syn_sent" => 120,
        "tcp_timeout_syn_recv" => 60,
        "tcp_timeout_established" => 432000,
        "tcp_timeout_fin_wait" => 120,
        "tcp_timeout_close_wait" => 60,
        "tcp_timeout_last_ack" => 30,
        "tcp_timeout_time_wait" => 120,
        "tcp_timeout_close" => 10,
        "tcp_timeout_max_retrans" => 300,
        "tcp_timeout_unacknowledged" => 300,
        "udp_timeout" => 30,
        "generic_timeout" => 600,
        "icmp_timeout" => 30,
        "icmpv6_timeout" => 30,
        "checksum" => 1,
        "acct" => 0,
        "timestamp" => 0,
        "log_invalid" => 0,
        "tcp_loose" => 1,
        "tcp_be_liberal" => 0,
        "tcp_max_retrans" => 3,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::facts::KEY_EST;

    fn k(r: &str) -> KernelVersion {
        KernelVersion::parse(r).unwrap()
    }

    #[test]
    fn defaults_follow_the_kernel_rules() {
        // This CI host: 6.18, 24 GB.
        let d = kernel_defaults(&k("6.18.44-fc"), 24_684_092, 4096, None);
        assert_eq!((d.buckets, d.max, d.expect_max), (262144, 262144, 4096));
        // 5.15+ with 2 GiB: 65536 / 65536; before 5.15: 16384 buckets, max 65536.
        assert_eq!(kernel_defaults(&k("6.1.0-13-amd64"), 2 << 20, 4096, None).max, 65536);
        let old = kernel_defaults(&k("5.10.0"), 2 << 20, 4096, None);
        assert_eq!((old.buckets, old.max), (16384, 65536));
        let rhel = kernel_defaults(&k("4.18.0-240.el8.x86_64"), 16 << 20, 4096, None);
        assert_eq!((rhel.buckets, rhel.max), (65536, 262144));
        // 512 MiB: RAM/16384/8 = 4096 buckets; 5.15+ max = buckets, before: 4 × buckets.
        assert_eq!(kernel_defaults(&k("6.1"), 512 << 10, 4096, None).max, 4096);
        // The 1 GiB Debian 6.1 guest: MemTotal 981,xxx kB, measured max = buckets = 7680.
        let g = kernel_defaults(&k("6.1.0-56-amd64"), 981_500, 4096, None);
        assert_eq!((g.buckets, g.max), (7680, 7680));
        let g = kernel_defaults(&k("6.1.0-13-amd64"), 1_000_000, 4096, None);
        assert!(g.approximate);
        assert_eq!(Defaults::is_default(Some(&g), KEY_MAX, "7680"), Some(true));
        assert_eq!(Defaults::is_default(Some(&g), KEY_BUCKETS, "7680"), Some(true));
        assert_eq!(Defaults::is_default(Some(&g), KEY_MAX, "65536"), Some(false));
        assert_eq!(
            Defaults::is_default(Some(&d), KEY_MAX, "262000"),
            Some(false),
            "fixed sizes are exact"
        );
        assert_eq!(Defaults::is_default(None, KEY_EST, "432000"), Some(true));
        assert_eq!(
            Defaults::is_default(None, "net.netfilter.nf_conntrack_events", "1"),
            None
        );
        assert_eq!(kernel_defaults(&k("5.4"), 512 << 10, 4096, None).max, 16384);
        // Tiny RAM: the minimums.
        assert_eq!(kernel_defaults(&k("6.6"), 16 << 10, 4096, None).buckets, 1024);
        // hashsize given: max = 8 × hashsize, buckets rounded up to 512.
        let h = kernel_defaults(&k("6.1"), 8 << 20, 4096, Some(1000));
        assert_eq!((h.buckets, h.max), (1024, 8192));
    }

    #[test]
    fn kernel_versions() {
        assert!(k("6.18.44-fc-v657").at_least(5, 15));
        assert!(!k("5.10.0-28-amd64").at_least(5, 15));
        assert!(KernelVersion::parse("garbage").is_none());
    }
}
