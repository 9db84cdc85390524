//! early_drop evictions: in kprobe mode the eviction probe (a kprobe on nf_ct_delete, which runs for every
//! deleted entry) lists them one by one while some table is nearly full; the rest are reported from the kernel's
//! `early_drop` counters each second, so the evictions reported always add up to the kernel's total.

use std::collections::HashMap;

use crate::kernel_counters::KernelCounters;

/// The eviction probe is armed while some watched table is at least this full, and disarmed below
/// `DISARM_FILL` (hysteresis: no flapping around one value).
pub const ARM_FILL: f64 = 0.90;
pub const DISARM_FILL: f64 = 0.80;

#[derive(Debug, Default)]
pub struct Evictions {
    /// Evictions reported one by one, per netns.
    listed: HashMap<u32, u64>,
    /// Evictions reported as counter-only remainders, per netns.
    counted: HashMap<u32, u64>,
    /// Whether the eviction probe is attached.
    pub probe_armed: bool,
}

impl Evictions {
    /// An eviction the probe reported.
    pub fn listed(&mut self, netns: u32) {
        *self.listed.entry(netns).or_default() += 1;
    }

    /// Evictions the kernel counted and nobody reported yet, per netns (sorted), now counted as reported. Call
    /// after reading the counters and draining the ring buffer: an eviction's record is sent before the kernel
    /// counts it, so everything the counters show has been listed by then, and the remainder never over-counts.
    pub fn unreported(&mut self, counters: &KernelCounters) -> Vec<(u32, u64)> {
        let mut lines = vec![];
        for (netns, delta) in counters.deltas() {
            let reported =
                self.listed.get(&netns).copied().unwrap_or(0) + self.counted.get(&netns).copied().unwrap_or(0);
            let remainder = delta.early_drop.saturating_sub(reported);
            if remainder > 0 {
                *self.counted.entry(netns).or_default() += remainder;
                lines.push((netns, remainder));
            }
        }
        lines.sort();
        lines
    }

    /// Netns whose counters are no longer kept one by one (see `KernelCounters::retire_gone`).
    pub fn forget(&mut self, netns: &[u32]) {
        for n in netns {
            self.listed.remove(n);
            self.counted.remove(n);
        }
    }

    /// Whether the probe should be armed (`Some(true)`) or disarmed (`Some(false)`) at this fill of the fullest
    /// table; `None`: leave it as it is.
    pub fn steer(&self, fill: f64) -> Option<bool> {
        let arm = if self.probe_armed {
            fill >= DISARM_FILL
        } else {
            fill >= ARM_FILL
        };
        (arm != self.probe_armed).then_some(arm)
    }

    /// What to tell the user when the probe was armed or disarmed.
    pub fn notice(armed: bool, netns_label: &str, entries: u64, max: u64) -> String {
        if armed {
            format!(
                "conntrack table of netns {netns_label} is {:.0}% full ({entries}/{max}): listing each early_drop \
eviction (kprobe on nf_ct_delete, armed while a table is over {:.0}% full)",
                entries as f64 * 100.0 / max as f64,
                ARM_FILL * 100.0
            )
        } else {
            format!(
                "conntrack tables are below {:.0}% full: no longer listing evictions",
                DISARM_FILL * 100.0
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_counters::tests::stats;

    #[test]
    fn listed_and_counted_evictions_add_up_to_the_kernel_counter() {
        let mut counters = KernelCounters::default();
        counters.seed(7, stats(0, 10));
        counters.update(7, stats(0, 15));
        let mut e = Evictions::default();
        for _ in 0..3 {
            e.listed(7);
        }
        assert_eq!(e.unreported(&counters), vec![(7, 2)]);
        assert!(e.unreported(&counters).is_empty(), "nothing twice");
        // More listed than the counters showed at the last reading: nothing negative.
        for _ in 0..3 {
            e.listed(7);
        }
        assert!(e.unreported(&counters).is_empty());
        counters.update(7, stats(0, 20));
        assert_eq!(
            e.unreported(&counters),
            vec![(7, 2)],
            "10 evictions: 6 listed, 4 counted"
        );
    }

    #[test]
    fn the_probe_arms_at_90_percent_and_disarms_below_80() {
        let mut e = Evictions::default();
        assert_eq!(e.steer(0.85), None);
        assert_eq!(e.steer(0.95), Some(true));
        e.probe_armed = true;
        assert_eq!(e.steer(0.85), None, "hysteresis");
        assert_eq!(e.steer(0.5), Some(false));
        assert!(Evictions::notice(true, "7 (blue)", 95, 100).contains("95% full (95/100)"));
    }
}
