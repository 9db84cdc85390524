//! What `ctrace run` prints at exit: exact totals (from in-kernel counters), the kernel's own
//! counter deltas per netns, and the top flows and destination ports seen in events.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use ctrace_common::Reason;

use crate::{ctstat::CounterDelta, event::Drop};

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AttributionStats {
    /// Drops in an older netns whose counters ctrace had no starting point for on that CPU (not found at
    /// start, or its baseline evicted from the bounded map): their counter evidence counts as uncertain.
    pub no_baseline: u64,
    /// kprobe verdicts that the kernel's counters contradicted (the counters' answer was used).
    pub probe_disagreements: u64,
    /// Baselines found stale and restarted from zero: a reused netns inode number or a reload.
    pub baseline_resets: u64,
    /// Baselines deleted because their netns was gone (counted in userspace; not a fallback).
    pub baselines_pruned: u64,
    /// Netns the conntrack hook was armed in (after an uncertain drop there).
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
}

impl Summary {
    pub fn total(&self) -> u64 {
        self.drops.values().sum()
    }
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
    fn drops_without_headers_are_not_in_top_lists() {
        let mut t = Tally::default();
        let mut x = d(1);
        x.flow = None;
        t.add(&x, 5);
        assert!(t.top_flows().is_empty());
    }
}
