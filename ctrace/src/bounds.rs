//! Every bound on per-netns state, in the kernel and in userspace, in one place: its limit, whether it was
//! reached, how much it cost, and one notice the first time. Anyone can create network namespaces by the
//! thousand (unprivileged user namespaces): past a bound ctrace keeps its global totals exact and says
//! what it no longer splits, reads or names.

use ctrace_common::{MAX_BASELINE_NETNS, MAX_HOOKED_NETNS, MAX_NETNS_REASONS};
use schemars::JsonSchema;
use serde::Serialize;

/// Kernel counters read per one-second tick; more netns are read in turn.
pub const COUNTER_READS_PER_TICK: usize = 256;
/// Ended netns whose counter changes are kept one by one for the summary; more are summed into one line.
pub const RETIRED_NETNS: usize = 4096;
/// Other netns whose per-netns sysctls are snapshotted (each snapshot enters the netns on a thread).
pub const NETNS_SYSCTLS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bound {
    /// Kernel: exact totals per (netns, reason).
    NetnsTotals,
    /// Kernel: per-CPU counter baselines per netns (an LRU).
    Baselines,
    /// Userspace: netns the conntrack hook is armed in.
    HookedNetns,
    /// Userspace: netns whose kernel counters are read each tick.
    CounterReads,
    /// Userspace: ended netns whose counter changes are listed one by one.
    RetiredNetns,
    /// Userspace: other netns whose sysctls are watched for resets.
    NetnsSysctls,
    /// Userspace: /proc rescans for drops from unknown netns (at most one a second).
    NetnsLookups,
}

impl Bound {
    pub const ALL: [Bound; 7] = [
        Bound::NetnsTotals,
        Bound::Baselines,
        Bound::HookedNetns,
        Bound::CounterReads,
        Bound::RetiredNetns,
        Bound::NetnsSysctls,
        Bound::NetnsLookups,
    ];

    /// The key in the JSON summary's `bounds` object.
    pub const fn name(self) -> &'static str {
        match self {
            Bound::NetnsTotals => "netns_totals",
            Bound::Baselines => "baselines",
            Bound::HookedNetns => "hooked_netns",
            Bound::CounterReads => "counter_reads",
            Bound::RetiredNetns => "retired_netns",
            Bound::NetnsSysctls => "netns_sysctls",
            Bound::NetnsLookups => "netns_lookups",
        }
    }

    pub const fn limit(self) -> u64 {
        match self {
            Bound::NetnsTotals => MAX_NETNS_REASONS as u64,
            Bound::Baselines => MAX_BASELINE_NETNS as u64,
            Bound::HookedNetns => MAX_HOOKED_NETNS as u64,
            Bound::CounterReads => COUNTER_READS_PER_TICK as u64,
            Bound::RetiredNetns => RETIRED_NETNS as u64,
            Bound::NetnsSysctls => NETNS_SYSCTLS as u64,
            Bound::NetnsLookups => 1,
        }
    }

    /// What the bound means for the output, said once when it is first reached.
    fn effect(self) -> String {
        let l = self.limit();
        match self {
            Bound::NetnsTotals => format!(
                "the kernel keeps per-netns totals for {l} (netns, reason) pairs and they are all taken: drops of \
                 further pairs count in the totals (still exact) but not in the per-netns split"
            ),
            Bound::Baselines => format!(
                "the kernel keeps counter baselines for {l} netns and evicts the least recently used: the next drop \
                 of such a netns on a CPU is decided without a baseline (attribution.no_baseline)"
            ),
            Bound::HookedNetns => format!(
                "the conntrack hook is armed in {l} netns, its bound: uncertain drops in further netns stay uncertain"
            ),
            Bound::CounterReads => format!(
                "more than {l} netns: their conntrack counters are read {l} a second in turn, so early_drop \
                 evictions are reported later, and not at all for a netns that ends before its turn"
            ),
            Bound::RetiredNetns => format!(
                "more than {l} ended netns changed conntrack counters: the counters of further ones are summed into \
                 one line of the summary (totals stay exact)"
            ),
            Bound::NetnsSysctls => {
                format!("more than {l} other netns: sysctl resets by an nf_conntrack reload are watched in {l} of them")
            }
            Bound::NetnsLookups => "drops arrive from netns ctrace does not know yet faster than it rescans /proc \
                                    (at most once a second): some are reported without the netns's name until the \
                                    next scan"
                .to_owned(),
        }
    }

    /// What `count` counts, for the text summary.
    fn counted(self, count: u64) -> String {
        match self {
            Bound::NetnsTotals => format!("{count} drops not split by netns (in the totals)"),
            Bound::Baselines => format!("{count} baselines evicted (at least)"),
            Bound::HookedNetns => format!("{count} netns left without the hook"),
            Bound::CounterReads => format!("{count} seconds with more netns than reads"),
            Bound::RetiredNetns => format!("{count} ended netns summed into one line"),
            Bound::NetnsSysctls => format!("{count} netns left out at the last scan"),
            Bound::NetnsLookups => format!("{count} drops from unknown netns not looked up at once"),
        }
    }
}

/// One bound as the summary shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
pub struct BoundState {
    /// the bound
    pub limit: u64,
    /// whether it was reached during the run
    pub reached: bool,
    /// what it cost so far (per bound, see "Bounds on per-netns state")
    pub count: u64,
}

/// Every bound on per-netns state, reached or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
pub struct BoundsSummary {
    /// kernel: (netns, reason) pairs with exact per-netns totals; `count`: drops in the totals but not in `by_netns`
    pub netns_totals: BoundState,
    /// kernel: netns with counter baselines (least recently used evicted); `count`: baselines evicted, at least
    pub baselines: BoundState,
    /// netns the conntrack hook is armed in; `count`: netns with uncertain drops left without it
    pub hooked_netns: BoundState,
    /// netns counter reads a second (more are read in turn); `count`: seconds with more netns than reads
    pub counter_reads: BoundState,
    /// ended netns whose counter changes are listed one by one; `count`: ended netns summed into the totals only
    pub retired_netns: BoundState,
    /// other netns whose sysctls are watched for resets; `count`: most netns left out at one scan
    pub netns_sysctls: BoundState,
    /// /proc rescans a second for drops from unknown netns; `count`: such drops not looked up at once
    pub netns_lookups: BoundState,
}

impl Default for BoundsSummary {
    fn default() -> BoundsSummary {
        let at = |b: Bound| BoundState {
            limit: b.limit(),
            ..Default::default()
        };
        BoundsSummary {
            netns_totals: at(Bound::NetnsTotals),
            baselines: at(Bound::Baselines),
            hooked_netns: at(Bound::HookedNetns),
            counter_reads: at(Bound::CounterReads),
            retired_netns: at(Bound::RetiredNetns),
            netns_sysctls: at(Bound::NetnsSysctls),
            netns_lookups: at(Bound::NetnsLookups),
        }
    }
}

impl BoundsSummary {
    pub fn get(&self, b: Bound) -> &BoundState {
        match b {
            Bound::NetnsTotals => &self.netns_totals,
            Bound::Baselines => &self.baselines,
            Bound::HookedNetns => &self.hooked_netns,
            Bound::CounterReads => &self.counter_reads,
            Bound::RetiredNetns => &self.retired_netns,
            Bound::NetnsSysctls => &self.netns_sysctls,
            Bound::NetnsLookups => &self.netns_lookups,
        }
    }

    fn get_mut(&mut self, b: Bound) -> &mut BoundState {
        match b {
            Bound::NetnsTotals => &mut self.netns_totals,
            Bound::Baselines => &mut self.baselines,
            Bound::HookedNetns => &mut self.hooked_netns,
            Bound::CounterReads => &mut self.counter_reads,
            Bound::RetiredNetns => &mut self.retired_netns,
            Bound::NetnsSysctls => &mut self.netns_sysctls,
            Bound::NetnsLookups => &mut self.netns_lookups,
        }
    }

    /// Records the cost of `bound` so far (`count` is cumulative; 0 = not reached). Returns the notice to give
    /// the first time it is reached.
    pub fn observe(&mut self, bound: Bound, count: u64) -> Option<String> {
        let state = self.get_mut(bound);
        state.count = state.count.max(count);
        if count == 0 || state.reached {
            return None;
        }
        state.reached = true;
        Some(format!("bound reached ({}): {}", bound.name(), bound.effect()))
    }
}

/// The text summary's lines for the bounds that were reached (none when none was).
pub fn summary_text(bounds: &BoundsSummary) -> String {
    let reached: Vec<String> = Bound::ALL
        .iter()
        .filter_map(|&b| {
            let s = bounds.get(b);
            s.reached
                .then(|| format!("  {:<14} limit {:<6} {}", b.name(), s.limit, b.counted(s.count)))
        })
        .collect();
    if reached.is_empty() {
        return String::new();
    }
    format!(
        "bounds reached (per-netns state is bounded; the totals above stay exact):\n{}\n",
        reached.join("\n")
    )
}

/// The first `limit` items of `items`, and how many were left out.
pub fn take_bounded<T>(items: impl IntoIterator<Item = T>, limit: usize) -> (Vec<T>, u64) {
    let mut kept = Vec::new();
    let mut left = 0u64;
    for item in items {
        if kept.len() < limit {
            kept.push(item);
        } else {
            left += 1;
        }
    }
    (kept, left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_is_announced_once_and_summarised() {
        let mut b = BoundsSummary::default();
        assert_eq!(b.observe(Bound::NetnsTotals, 0), None);
        let notice = b.observe(Bound::NetnsTotals, 3).expect("the first time");
        assert!(notice.starts_with("bound reached (netns_totals)"), "{notice}");
        assert_eq!(b.observe(Bound::NetnsTotals, 9), None, "once");
        assert_eq!(b.observe(Bound::NetnsTotals, 5), None);
        assert_eq!(
            b.netns_totals,
            BoundState {
                limit: 4096,
                reached: true,
                count: 9
            }
        );
        assert!(!b.baselines.reached);
        let json = serde_json::to_value(b).unwrap();
        assert_eq!(json["netns_totals"]["count"], 9);
        assert_eq!(json["netns_lookups"]["limit"], 1);
        let t = summary_text(&b);
        assert!(t.contains("9 drops not split by netns"), "{t}");
        assert!(!t.contains("baselines"), "{t}");
        assert_eq!(summary_text(&BoundsSummary::default()), "");
    }

    #[test]
    fn take_bounded_counts_what_it_leaves() {
        assert_eq!(take_bounded(0..10, 4), (vec![0, 1, 2, 3], 6));
        assert_eq!(take_bounded(0..2, 4), (vec![0, 1], 0));
    }
}
