//! The state of a run, refreshed once a second for sinks that show state rather than a stream of records (the
//! metrics endpoint). Totals are the kernel's exact in-kernel counts, not sums of the records a sink saw.

use std::collections::BTreeMap;

use ctrace_common::Reason;

use crate::{
    bounds::BoundsSummary,
    ctstat::CounterDelta,
    summary::{AttributionStats, Split},
};

/// One probe ctrace attaches, and whether it is attached now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeState {
    /// The kernel function, tracepoint or hook, e.g. `kfree_skb`, `early_drop`, `cgroup/sysctl`.
    pub probe: String,
    /// `tp_btf`, `kprobe`, `kretprobe`, `tracepoint`, `cgroup_sysctl`, `netfilter`.
    pub kind: &'static str,
    pub attached: bool,
}

/// One watched network namespace.
#[derive(Clone, Debug, Default)]
pub struct NetnsStatus {
    pub name: Option<String>,
    /// Drops per reason in this netns (early_drop from the kernel's counters).
    pub drops: BTreeMap<Reason, Split>,
    /// The kernel's own counter increases since ctrace started, across reloads.
    pub kernel: Option<CounterDelta>,
    /// Entries in its conntrack table at the last reading.
    pub entries: Option<u64>,
}

#[derive(Clone, Debug, Default)]
pub struct Status {
    /// `kprobe` or `tracepoint`.
    pub mode: &'static str,
    /// Exact totals per reason (early_drop: the kernel's counters of the watched netns).
    pub drops: BTreeMap<Reason, Split>,
    /// Per network namespace, by inode (bounded: the kernel keeps a per-netns split for a bounded number).
    pub netns: BTreeMap<u32, NetnsStatus>,
    /// Drops in the totals whose netns split the kernel could not keep (more netns than its bound).
    pub netns_split_lost: u64,
    /// nf_conntrack_max (global).
    pub conntrack_max: Option<u64>,
    /// Records that did not fit in the ring buffer.
    pub events_lost: u64,
    pub attribution: AttributionStats,
    pub module_requests_unprivileged: u64,
    pub probes: Vec<ProbeState>,
    /// The bounds on per-netns state: reached or not, and what they cost.
    pub bounds: BoundsSummary,
}
