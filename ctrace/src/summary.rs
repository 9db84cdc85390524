//! What `ctrace run` prints at exit: exact totals (from in-kernel counters), the kernel's own
//! counter deltas per netns, and the top flows and destination ports seen in events.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use ctrace_common::Reason;

use crate::{ctstat::CounterDelta, event::Drop, kernel_counters::KernelCounters};

/// Distinct flows tracked for the top lists; beyond it new flows are only counted as `other`.
const MAX_TRACKED: usize = 100_000;
pub const TOP_N: usize = 10;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestKey {
    pub proto: u8,
    pub dst: IpAddr,
    pub dport: u16,
}

/// Per-event tallies (top flows and ports). Exact totals come from the kernel, not from here.
#[derive(Debug, Default)]
pub struct Tally {
    pub flows: HashMap<DestKey, u64>,
    pub dports: HashMap<(u8, u16), u64>,
    pub untracked: u64,
}

impl Tally {
    pub fn add(&mut self, d: &Drop, count: u64) {
        let Some(f) = &d.flow else { return };
        let key = DestKey {
            proto: f.proto,
            dst: f.dst,
            dport: f.dport,
        };
        if self.flows.len() < MAX_TRACKED || self.flows.contains_key(&key) {
            *self.flows.entry(key).or_default() += count;
        } else {
            self.untracked += count;
        }
        if self.dports.len() < MAX_TRACKED || self.dports.contains_key(&(f.proto, f.dport)) {
            *self.dports.entry((f.proto, f.dport)).or_default() += count;
        }
    }

    pub fn top_flows(&self) -> Vec<(DestKey, u64)> {
        top(self.flows.iter().map(|(k, v)| (k.clone(), *v)))
    }

    pub fn top_dports(&self) -> Vec<((u8, u16), u64)> {
        top(self.dports.iter().map(|(k, v)| (*k, *v)))
    }
}

fn top<K: Ord>(it: impl Iterator<Item = (K, u64)>) -> Vec<(K, u64)> {
    let mut v: Vec<_> = it.collect();
    // Highest count first; ties in key order so output is stable.
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(TOP_N);
    v
}

/// Drops of one reason, split by how the reason was decided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// The reason was certain (probe, NOTRACK, an attached entry, or noise-free counters).
    pub exact: u64,
    /// The evidence left another reason possible (`possible` in the drop records).
    pub uncertain: u64,
}

impl Split {
    pub fn total(&self) -> u64 {
        self.exact + self.uncertain
    }
}

/// Every time attribution had to make do with less evidence, counted in the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct AttributionStats {
    /// drops in an older netns whose counters ctrace had no starting point for on that CPU (not found at
    /// start, or its baseline evicted from the bounded map): their counter evidence counts as uncertain
    pub no_baseline: u64,
    /// kprobe verdicts that the kernel's counters contradicted; the counters' answer was used
    pub probe_disagreements: u64,
    /// baselines found stale and restarted from zero: a reused netns inode number or a reload
    pub baseline_resets: u64,
    /// baselines deleted because their netns was gone; counted in userspace, not a fallback
    pub baselines_pruned: u64,
    /// netns the conntrack hook was armed in, after an uncertain drop there
    pub hooked_netns: u64,
}

#[derive(Clone, Debug, Default)]
pub struct NetnsSummary {
    pub netns: u32,
    pub name: Option<String>,
    /// Exact per-reason totals for this netns (exact and uncertain attributions together).
    pub drops: BTreeMap<Reason, u64>,
    /// The part of `drops` whose reason was uncertain.
    pub uncertain: BTreeMap<Reason, u64>,
    /// The kernel's counter deltas over the run (None when the netns could not be read).
    pub kernel: Option<CounterDelta>,
}

#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub mode: String,
    pub duration_s: f64,
    pub drops: BTreeMap<Reason, u64>,
    /// The part of `drops` whose reason was uncertain.
    pub uncertain: BTreeMap<Reason, u64>,
    pub attribution: AttributionStats,
    pub lost: u64,
    pub netns: Vec<NetnsSummary>,
    pub top_flows: Vec<(DestKey, u64)>,
    pub top_dports: Vec<((u8, u16), u64)>,
    /// Drops of flows beyond the tracked set (top lists are then partial).
    pub untracked: u64,
    /// modprobe/rmmod runs and delete_module calls of callers that could not change a module (ignored).
    pub module_requests_unprivileged: u64,
    /// Every bound on per-netns state: its limit, whether it was reached, what it cost.
    pub bounds: crate::bounds::BoundsSummary,
}

impl Summary {
    pub fn total(&self) -> u64 {
        self.drops.values().sum()
    }
}

/// Everything the summary is made of, read when the probes are detached.
pub struct Inputs<'a> {
    pub mode: &'a str,
    pub duration_s: f64,
    /// Exact totals per reason, counted in the kernel.
    pub totals: &'a HashMap<Reason, Split>,
    /// The same per netns (bounded in the kernel: the rest is only in `totals`).
    pub per_netns: &'a HashMap<(u32, Reason), Split>,
    /// The kernel's own counter increases per watched netns.
    pub kernel: &'a KernelCounters,
    /// Whether early_drop evictions are reported (no flow filter, reason not filtered out).
    pub early_drop_wanted: bool,
    pub tally: &'a Tally,
    pub lost: u64,
    pub attribution: AttributionStats,
    pub module_requests_unprivileged: u64,
    pub bounds: crate::bounds::BoundsSummary,
}

/// The summary: the kernel's exact totals, early_drop from the kernel's counters (evictions carry no packet),
/// and per netns both ctrace's totals and the kernel's counter increases. `name` gives `ip netns` names.
pub fn assemble(i: Inputs<'_>, name: impl Fn(u32) -> Option<String>) -> Summary {
    let mut summary = Summary {
        mode: i.mode.to_owned(),
        duration_s: i.duration_s,
        lost: i.lost,
        top_flows: i.tally.top_flows(),
        top_dports: i.tally.top_dports(),
        untracked: i.tally.untracked,
        module_requests_unprivileged: i.module_requests_unprivileged,
        attribution: i.attribution,
        bounds: i.bounds,
        ..Default::default()
    };
    for (r, c) in i.totals {
        summary.drops.insert(*r, c.total());
        summary.uncertain.insert(*r, c.uncertain);
    }
    let mut by_netns: BTreeMap<u32, NetnsSummary> = BTreeMap::new();
    for ((n, r), c) in i.per_netns {
        let ns = by_netns.entry(*n).or_default();
        ns.drops.insert(*r, c.total());
        ns.uncertain.insert(*r, c.uncertain);
    }
    // Ended netns beyond the bound are summed: in the total, not per netns.
    let mut early_total = i.kernel.folded_delta.early_drop;
    for (n, delta) in i.kernel.deltas() {
        if delta.is_zero() && !by_netns.contains_key(&n) {
            continue;
        }
        let ns = by_netns.entry(n).or_default();
        if i.early_drop_wanted && delta.early_drop > 0 {
            early_total += delta.early_drop;
            ns.drops.insert(Reason::EarlyDrop, delta.early_drop);
        }
        ns.kernel = Some(delta);
    }
    if i.early_drop_wanted {
        summary.drops.insert(Reason::EarlyDrop, early_total);
    }
    for (n, mut ns) in by_netns {
        ns.netns = n;
        ns.name = name(n);
        summary.netns.push(ns);
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Flow;

    fn d(dport: u16) -> Drop {
        Drop {
            ts_ns: 0,
            reason: Reason::TableFull,
            netns: 1,
            cpu: 0,
            flow: Some(Flow {
                proto: 6,
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.0.0.2".parse().unwrap(),
                sport: 1000,
                dport,
            }),
            process: None,
            new_baseline: false,
            detail: None,
            evicted: false,
            attribution: ctrace_common::Attribution::Counters,
            possible: 1 << Reason::TableFull as u8,
        }
    }

    #[test]
    fn top_lists_are_ordered_and_bounded() {
        let mut t = Tally::default();
        for port in 0..20u16 {
            for _ in 0..=port {
                t.add(&d(port), 1);
            }
        }
        let flows = t.top_flows();
        assert_eq!(flows.len(), TOP_N);
        assert_eq!(flows[0].0.dport, 19);
        assert_eq!(flows[0].1, 20);
        assert_eq!(t.top_dports()[1], ((6, 18), 19));
    }

    #[test]
    fn the_summary_joins_kernel_totals_and_counter_evictions_per_netns() {
        let totals: HashMap<Reason, Split> = [
            (
                Reason::TableFull,
                Split {
                    exact: 10,
                    uncertain: 0,
                },
            ),
            (Reason::Invalid, Split { exact: 1, uncertain: 2 }),
        ]
        .into();
        // netns 5 had 7 table_full; 3 more came from a netns beyond the kernel's per-netns bound.
        let per_netns: HashMap<(u32, Reason), Split> = [
            ((5, Reason::TableFull), Split { exact: 7, uncertain: 0 }),
            ((5, Reason::Invalid), Split { exact: 1, uncertain: 2 }),
        ]
        .into();
        let mut kernel = KernelCounters::default();
        kernel.seed(5, crate::kernel_counters::tests::stats(0, 100));
        kernel.update(5, crate::kernel_counters::tests::stats(0, 130));
        kernel.seed(6, crate::kernel_counters::tests::stats(0, 1));
        kernel.update(6, crate::kernel_counters::tests::stats(0, 1));
        kernel.update(8, crate::kernel_counters::tests::stats(3, 4));
        let tally = Tally::default();
        let inputs = |early_drop_wanted| Inputs {
            mode: "tracepoint",
            duration_s: 1.5,
            totals: &totals,
            per_netns: &per_netns,
            kernel: &kernel,
            early_drop_wanted,
            tally: &tally,
            lost: 0,
            attribution: AttributionStats::default(),
            module_requests_unprivileged: 0,
            bounds: Default::default(),
        };
        let s = assemble(inputs(true), |n| (n == 5).then(|| "blue".to_owned()));
        assert_eq!(s.drops[&Reason::TableFull], 10);
        assert_eq!((s.drops[&Reason::Invalid], s.uncertain[&Reason::Invalid]), (3, 2));
        assert_eq!(
            s.drops[&Reason::EarlyDrop],
            34,
            "30 in netns 5, 4 in netns 8 (watched from zero)"
        );
        let netns: Vec<u32> = s.netns.iter().map(|n| n.netns).collect();
        assert_eq!(netns, [5, 8], "netns 6 saw nothing and is left out");
        assert_eq!(s.netns[0].name.as_deref(), Some("blue"));
        assert_eq!(s.netns[0].drops[&Reason::EarlyDrop], 30);
        assert_eq!(s.netns[0].kernel.unwrap().early_drop, 30);
        assert_eq!(s.total(), 10 + 3 + 34);
        let s = assemble(inputs(false), |_| None);
        assert!(
            !s.drops.contains_key(&Reason::EarlyDrop),
            "a flow filter leaves evictions out"
        );
    }

    #[test]
    fn drops_without_headers_are_not_in_top_lists() {
        let mut t = Tally::default();
        let mut x = d(1);
        x.flow = None;
        t.add(&x, 5);
        assert!(t.top_flows().is_empty());
    }
}
