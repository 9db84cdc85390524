//! The kernel's own conntrack counters of every watched netns (`/proc/net/stat/nf_conntrack` there), kept across
//! nf_conntrack reloads: the table fill for each drop line, the early_drop totals, and the summary's
//! `kernel_counters`, which ctrace's totals can be checked against.
//!
//! Bounded, since anyone can create netns by the thousand: at most `bounds::COUNTER_READS_PER_TICK` reads a second
//! (in turn when there are more netns), and a netns that has ended keeps only its counter changes (one by one up to
//! `bounds::RETIRED_NETNS`, summed beyond), so neither the work per second nor the memory grows with the number of
//! netns that came and went.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::{
    bounds,
    ctstat::{CounterDelta, CtStats},
};

/// The counters ctrace follows, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Totals {
    entries: u64,
    drop: u64,
    early_drop: u64,
    insert_failed: u64,
    invalid: u64,
}

impl From<&CtStats> for Totals {
    fn from(s: &CtStats) -> Totals {
        Totals {
            entries: s.entries(),
            drop: s.total("drop"),
            early_drop: s.total("early_drop"),
            insert_failed: s.total("insert_failed"),
            invalid: s.total("invalid"),
        }
    }
}

/// The counters of one netns.
#[derive(Clone, Debug, Default)]
struct Watched {
    /// Counters at start (zero for a netns that appeared later: a new netns's counters start at zero).
    first: Totals,
    last: Totals,
    /// What earlier module instances counted: a reload starts the kernel's counters at zero.
    carried: CounterDelta,
}

impl Watched {
    fn delta(&self) -> CounterDelta {
        // The kernel's counters are unsigned int per CPU; a module reload zeroes them.
        let (a, b) = (&self.first, &self.last);
        self.carried
            + CounterDelta {
                drop: b.drop.saturating_sub(a.drop),
                early_drop: b.early_drop.saturating_sub(a.early_drop),
                insert_failed: b.insert_failed.saturating_sub(a.insert_failed),
                invalid: b.invalid.saturating_sub(a.invalid),
            }
    }
}

#[derive(Debug, Default)]
pub struct KernelCounters {
    netns: HashMap<u32, Watched>,
    /// The per-CPU counters at start, until the tracer seeds its baselines with them.
    seeds: HashMap<u32, CtStats>,
    /// Counter changes of netns that ended, one by one up to the bound.
    retired: BTreeMap<u32, CounterDelta>,
    /// Ended netns beyond the bound: how many, and their changes summed (in the totals, not per netns).
    pub folded: u64,
    pub folded_delta: CounterDelta,
    /// Netns the last scan did not find (gone after two scans in a row).
    absent_before: HashSet<u32>,
    /// Where the next tick's reads start when there are more netns than reads.
    cursor: u32,
    /// Ticks that could not read every netns.
    pub ticks_over_budget: u64,
}

impl KernelCounters {
    /// Starts watching `netns` from `stats` (read before the probes were attached).
    pub fn seed(&mut self, netns: u32, stats: CtStats) {
        let t = Totals::from(&stats);
        self.netns.insert(
            netns,
            Watched {
                first: t,
                last: t,
                ..Default::default()
            },
        );
        self.seeds.insert(netns, stats);
    }

    /// The latest reading of `netns` (a netns first seen now is watched from zero).
    pub fn update(&mut self, netns: u32, stats: CtStats) {
        self.netns.entry(netns).or_default().last = Totals::from(&stats);
    }

    /// The netns to read this tick, out of `candidates`: all of them with `all` (the last read at exit), else at
    /// most COUNTER_READS_PER_TICK, continuing where the previous tick stopped.
    pub fn due(&mut self, candidates: impl IntoIterator<Item = u32>, all: bool) -> Vec<u32> {
        let mut ids: Vec<u32> = candidates.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        let budget = bounds::COUNTER_READS_PER_TICK;
        if all || ids.len() <= budget {
            return ids;
        }
        self.ticks_over_budget += 1;
        let start = ids.partition_point(|&n| n < self.cursor);
        let chosen: Vec<u32> = ids.iter().cycle().skip(start).take(budget).copied().collect();
        self.cursor = chosen.last().map_or(0, |&n| n.wrapping_add(1));
        chosen
    }

    /// Moves the netns that two scans in a row did not find (`found` says whether the last one did) out of the
    /// watched set, keeping only their counter changes. Returns the ones no longer in `deltas` (unchanged, or
    /// summed beyond the bound): whatever else is kept per netns about them can go too.
    pub fn retire_gone(&mut self, found: impl Fn(u32) -> bool) -> Vec<u32> {
        let absent: HashSet<u32> = self.netns.keys().copied().filter(|&n| !found(n)).collect();
        let gone: Vec<u32> = absent.intersection(&self.absent_before).copied().collect();
        self.absent_before = absent.into_iter().filter(|n| !gone.contains(n)).collect();
        let mut forgotten = vec![];
        for n in gone {
            let Some(w) = self.netns.remove(&n) else { continue };
            let delta = w.delta();
            if self.retired.contains_key(&n) || (!delta.is_zero() && self.retired.len() < bounds::RETIRED_NETNS) {
                let kept = self.retired.entry(n).or_default();
                *kept = *kept + delta;
                continue;
            }
            if !delta.is_zero() {
                self.folded += 1;
                self.folded_delta = self.folded_delta + delta;
            }
            forgotten.push(n);
        }
        forgotten
    }

    /// The module went away or came back: keep what was counted, restart from zero.
    pub fn carry_over(&mut self) {
        for w in self.netns.values_mut() {
            w.carried = w.delta();
            w.first = Totals::default();
            w.last = Totals::default();
        }
    }

    /// The kernel's counter increases in `netns` since ctrace started, across reloads (an ended netns's too).
    pub fn delta(&self, netns: u32) -> Option<CounterDelta> {
        let live = self.netns.get(&netns).map(Watched::delta);
        match (live, self.retired.get(&netns)) {
            (Some(l), Some(r)) => Some(l + *r),
            (l, r) => l.or(r.copied()),
        }
    }

    /// Every netns with its increases, live and ended (an inode a newer netns reuses: both added up). The ended
    /// ones beyond the bound are not in it: see `folded_delta`.
    pub fn deltas(&self) -> impl Iterator<Item = (u32, CounterDelta)> + '_ {
        let retired_only = self
            .retired
            .iter()
            .filter(|(n, _)| !self.netns.contains_key(n))
            .map(|(n, d)| (*n, *d));
        self.netns
            .keys()
            .filter_map(|&n| Some((n, self.delta(n)?)))
            .chain(retired_only)
    }

    /// Entries in `netns`'s table at the last reading.
    pub fn entries(&self, netns: u32) -> Option<u64> {
        self.netns.get(&netns).map(|w| w.last.entries)
    }

    /// The netns with the most entries, and how many.
    pub fn fullest(&self) -> Option<(u32, u64)> {
        self.netns
            .iter()
            .map(|(n, w)| (*n, w.last.entries))
            .max_by_key(|(_, e)| *e)
    }

    /// Counters at start, per netns and CPU: the seeds of the kernel-side per-CPU baselines (handed over once).
    pub fn take_initial(&mut self) -> HashMap<u32, CtStats> {
        std::mem::take(&mut self.seeds)
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
        assert_eq!(k.take_initial().len(), 1, "the seeds, once");
        assert!(k.take_initial().is_empty());
    }

    #[test]
    fn reads_are_bounded_per_tick_and_every_netns_gets_its_turn() {
        let mut k = KernelCounters::default();
        let many: Vec<u32> = (0..1000).collect();
        let mut seen = HashSet::new();
        let ticks = 1000usize.div_ceil(bounds::COUNTER_READS_PER_TICK);
        for _ in 0..ticks {
            let due = k.due(many.iter().copied(), false);
            assert_eq!(due.len(), bounds::COUNTER_READS_PER_TICK);
            seen.extend(due);
        }
        assert_eq!(seen.len(), 1000, "all read within {ticks} ticks");
        assert_eq!(k.ticks_over_budget, ticks as u64);
        assert_eq!(
            k.due(many.iter().copied(), true).len(),
            1000,
            "the last read at exit reads all"
        );
        assert_eq!(k.due(0..10, false).len(), 10);
        assert_eq!(k.ticks_over_budget, ticks as u64, "few netns: not over the bound");
    }

    #[test]
    fn ended_netns_keep_their_changes_within_the_bound() {
        let mut k = KernelCounters::default();
        let n = bounds::RETIRED_NETNS as u32 + 10;
        for i in 0..n {
            k.update(i, stats(0, 0));
            k.update(i, stats(0, 2));
        }
        k.update(n, stats(0, 0)); // unchanged: forgotten when it ends
        assert!(
            k.retire_gone(|_| false).is_empty(),
            "one scan without them is not enough"
        );
        assert_eq!(
            k.retire_gone(|_| false).len(),
            11,
            "the unchanged one and the 10 summed are forgotten"
        );
        assert!(k.netns.is_empty());
        let listed: u64 = k.deltas().map(|(_, d)| d.early_drop).sum();
        assert_eq!(k.deltas().count(), bounds::RETIRED_NETNS);
        assert_eq!(k.folded, 10);
        assert_eq!(
            listed + k.folded_delta.early_drop,
            2 * n as u64,
            "nothing lost from the totals"
        );
        // An inode reused by a newer netns: its changes add to the ended one's.
        k.update(0, stats(0, 5));
        assert_eq!(k.delta(0).unwrap().early_drop, 7);
        assert_eq!(k.deltas().filter(|(i, _)| *i == 0).count(), 1);
    }
}
