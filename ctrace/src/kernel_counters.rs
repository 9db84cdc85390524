//! The kernel's own conntrack counters of every watched netns (`/proc/net/stat/nf_conntrack` there), read each
//! second and kept across nf_conntrack reloads: the table fill for each drop line, the early_drop totals, and
//! the summary's `kernel_counters`, which ctrace's totals can be checked against.

use std::collections::HashMap;

use crate::ctstat::{CounterDelta, CtStats};

/// The counters of one netns.
#[derive(Clone, Debug, Default)]
struct Watched {
    /// Counters at start (empty = zero for a netns that appeared later: a new netns's counters start at zero).
    first: CtStats,
    last: CtStats,
    /// What earlier module instances counted: a reload starts the kernel's counters at zero.
    carried: CounterDelta,
}

impl Watched {
    fn delta(&self) -> CounterDelta {
        let now = CounterDelta::between(&self.first, &self.last);
        CounterDelta {
            drop: self.carried.drop + now.drop,
            early_drop: self.carried.early_drop + now.early_drop,
            insert_failed: self.carried.insert_failed + now.insert_failed,
            invalid: self.carried.invalid + now.invalid,
        }
    }
}

#[derive(Debug, Default)]
pub struct KernelCounters {
    netns: HashMap<u32, Watched>,
}

impl KernelCounters {
    /// Starts watching `netns` from `stats` (read before the probes were attached).
    pub fn seed(&mut self, netns: u32, stats: CtStats) {
        self.netns.insert(
            netns,
            Watched {
                first: stats.clone(),
                last: stats,
                ..Default::default()
            },
        );
    }

    /// The latest reading of `netns` (a netns first seen now is watched from zero).
    pub fn update(&mut self, netns: u32, stats: CtStats) {
        self.netns.entry(netns).or_default().last = stats;
    }

    /// The module went away or came back: keep what was counted, restart from zero.
    pub fn carry_over(&mut self) {
        for w in self.netns.values_mut() {
            w.carried = w.delta();
            w.first = CtStats::default();
            w.last = CtStats::default();
        }
    }

    /// The kernel's counter increases in `netns` since ctrace started, across reloads.
    pub fn delta(&self, netns: u32) -> Option<CounterDelta> {
        self.netns.get(&netns).map(Watched::delta)
    }

    /// Every watched netns with its increases.
    pub fn deltas(&self) -> impl Iterator<Item = (u32, CounterDelta)> + '_ {
        self.netns.iter().map(|(n, w)| (*n, w.delta()))
    }

    /// Entries in `netns`'s table at the last reading.
    pub fn entries(&self, netns: u32) -> Option<u64> {
        self.netns.get(&netns).map(|w| w.last.entries())
    }

    /// The netns with the most entries, and how many.
    pub fn fullest(&self) -> Option<(u32, u64)> {
        self.netns
            .iter()
            .map(|(n, w)| (*n, w.last.entries()))
            .max_by_key(|(_, e)| *e)
    }

    /// Counters at start, per netns: the seeds of the kernel-side per-CPU baselines.
    pub fn initial(&self) -> HashMap<u32, CtStats> {
        self.netns.iter().map(|(n, w)| (*n, w.first.clone())).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn stats(entries: u64, early: u64) -> CtStats {
        CtStats::parse(&format!("entries early_drop\n{entries:08x} {early:08x}\n")).unwrap()
    }

    #[test]
    fn counts_survive_a_module_reload() {
        let mut k = KernelCounters::default();
        k.seed(7, stats(1, 10));
        k.update(7, stats(2, 15));
        k.carry_over();
        // The reloaded module counts from zero.
        k.update(7, stats(3, 4));
        assert_eq!(k.delta(7).unwrap().early_drop, 9);
        assert_eq!(k.entries(7), Some(3));
    }

    #[test]
    fn a_netns_seen_later_counts_from_zero_and_the_fullest_is_found() {
        let mut k = KernelCounters::default();
        k.seed(1, stats(5, 100));
        k.update(2, stats(50, 3));
        assert_eq!(k.delta(2).unwrap().early_drop, 3);
        assert_eq!(k.delta(1).unwrap().early_drop, 0);
        assert_eq!(k.fullest(), Some((2, 50)));
        assert!(k.delta(3).is_none());
    }
}
