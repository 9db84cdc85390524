//! The summary record: exactly one, at the end of a run.

use std::{collections::BTreeMap, net::IpAddr};

use ctrace_common::Reason;
use schemars::JsonSchema;
use serde::Serialize;
use time::OffsetDateTime;

use crate::{
    ctstat::CounterDelta,
    event::{has_ports, is_icmp, proto_name},
    summary::{AttributionStats, Summary},
};

/// A count per reason, every reason present.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
pub struct ReasonCounts {
    pub table_full: u64,
    pub early_drop: u64,
    pub insert_failed: u64,
    pub invalid: u64,
    pub netfilter_rule: u64,
}

impl ReasonCounts {
    pub fn from_map(m: &BTreeMap<Reason, u64>) -> ReasonCounts {
        let get = |r| m.get(&r).copied().unwrap_or(0);
        ReasonCounts {
            table_full: get(Reason::TableFull),
            early_drop: get(Reason::EarlyDrop),
            insert_failed: get(Reason::InsertFailed),
            invalid: get(Reason::Invalid),
            netfilter_rule: get(Reason::NetfilterRule),
        }
    }

    pub fn get(&self, r: Reason) -> u64 {
        match r {
            Reason::TableFull => self.table_full,
            Reason::EarlyDrop => self.early_drop,
            Reason::InsertFailed => self.insert_failed,
            Reason::Invalid => self.invalid,
            Reason::NetfilterRule => self.netfilter_rule,
        }
    }

    pub fn total(&self) -> u64 {
        Reason::ALL.iter().map(|r| self.get(*r)).sum()
    }
}

/// One network namespace's part of the totals.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct NetnsRecord {
    /// the inode
    pub netns: u32,
    /// its `ip netns` name, when it has one
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// exact drops per reason
    pub drops: ReasonCounts,
    /// the part of each that was uncertain
    pub drops_uncertain: ReasonCounts,
    /// the kernel's own counter increases over the run, across reloads; absent when unreadable
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_counters: Option<CounterDelta>,
}

/// A destination among the most dropped.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct TopFlow {
    pub proto: String,
    pub dst: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    pub count: u64,
}

/// A destination port among the most dropped.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct TopPort {
    pub proto: String,
    pub dport: u16,
    pub count: u64,
}

/// What a run saw, at its end: the exact totals counted in the kernel, how they were decided, and the top
/// destinations.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct SummaryRecord {
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub ts: OffsetDateTime,
    /// `kprobe` or `tracepoint`
    pub mode: String,
    /// how long ctrace was attached
    pub duration_s: f64,
    /// exact totals by decided reason, counted in the kernel
    pub drops: ReasonCounts,
    /// the part of each that was `uncertain`
    pub drops_uncertain: ReasonCounts,
    /// all drops
    pub total: u64,
    /// how often attribution made do with less evidence, counted in the kernel
    pub attribution: AttributionStats,
    /// drops in the totals that reached no record and no aggregate (the ring buffer was full, or above the rate
    /// limit the kernel's aggregation maps were); the totals stay exact
    pub lost: u64,
    /// modprobe/rmmod runs and `delete_module` calls of callers without CAP_SYS_MODULE in the init user
    /// namespace: they cannot change a module, so they raise no module event
    pub module_requests_unprivileged: u64,
    /// every bound on per-netns state: its limit, whether it was reached, what it cost (see "Bounds on per-netns
    /// state"); the totals stay exact past every one
    pub bounds: crate::bounds::BoundsSummary,
    /// per network namespace
    pub by_netns: Vec<NetnsRecord>,
    /// the most dropped destinations
    pub top_flows: Vec<TopFlow>,
    /// the most dropped destination ports
    pub top_dports: Vec<TopPort>,
    /// drops of flows beyond the tracked set: in the totals, not in the top lists
    pub untracked: u64,
}

impl SummaryRecord {
    pub fn new(ts: OffsetDateTime, s: &Summary) -> SummaryRecord {
        SummaryRecord {
            ts,
            mode: s.mode.clone(),
            duration_s: (s.duration_s * 1000.0).round() / 1000.0,
            drops: ReasonCounts::from_map(&s.drops),
            drops_uncertain: ReasonCounts::from_map(&s.uncertain),
            total: s.total(),
            attribution: s.attribution,
            lost: s.lost,
            module_requests_unprivileged: s.module_requests_unprivileged,
            bounds: s.bounds,
            by_netns: s
                .netns
                .iter()
                .map(|n| NetnsRecord {
                    netns: n.netns,
                    name: n.name.clone(),
                    drops: ReasonCounts::from_map(&n.drops),
                    drops_uncertain: ReasonCounts::from_map(&n.uncertain),
                    kernel_counters: n.kernel,
                })
                .collect(),
            top_flows: s
                .top_flows
                .iter()
                .map(|(k, count)| {
                    let icmp = is_icmp(k.proto);
                    TopFlow {
                        proto: proto_name(k.proto),
                        dst: k.dst,
                        dport: has_ports(k.proto).then_some(k.dport),
                        icmp_type: icmp.then_some((k.dport >> 8) as u8),
                        icmp_code: icmp.then_some(k.dport as u8),
                        count: *count,
                    }
                })
                .collect(),
            top_dports: s
                .top_dports
                .iter()
                .filter(|((p, _), _)| has_ports(*p))
                .map(|((p, port), count)| TopPort {
                    proto: proto_name(*p),
                    dport: *port,
                    count: *count,
                })
                .collect(),
            untracked: s.untracked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::{DestKey, NetnsSummary};

    #[test]
    fn lists_every_reason_and_lost() {
        let mut s = Summary {
            mode: "tracepoint".into(),
            ..Default::default()
        };
        s.drops.insert(Reason::TableFull, 241);
        s.lost = 3;
        s.netns.push(NetnsSummary {
            netns: 1,
            ..Default::default()
        });
        s.top_flows.push((
            DestKey {
                proto: 17,
                dst: "127.0.0.1".parse().unwrap(),
                dport: 53,
            },
            241,
        ));
        let v = serde_json::to_value(crate::report::Event::Summary(Box::new(SummaryRecord::new(
            OffsetDateTime::UNIX_EPOCH,
            &s,
        ))))
        .unwrap();
        assert_eq!(v["event"], "summary");
        assert_eq!(v["drops"]["table_full"], 241);
        assert_eq!(v["drops"]["netfilter_rule"], 0);
        assert_eq!(v["lost"], 3);
        assert_eq!(v["total"], 241);
        assert_eq!(v["top_flows"][0]["dport"], 53);
        assert!(v["top_flows"][0].get("icmp_type").is_none());
        assert!(v["by_netns"][0].get("kernel_counters").is_none());
        assert_eq!(v["by_netns"][0]["drops_uncertain"]["invalid"], 0);
    }
}
