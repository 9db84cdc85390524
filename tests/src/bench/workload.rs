//! The benchmark's workloads: the netns each runs in, its bursts, and the truth a tracer's totals are held against
//! (a DROP rule's packet counter and the netns's conntrack counters, neither computed by a tracer).

use serde::Serialize;
use serde_json::Value;

use super::traffic::{Burst, Flows};
use crate::{Counters, TestNetns};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Workload {
    /// New UDP flows through conntrack into an empty table, a sender per CPU: nothing is dropped by netfilter
    /// (the datagrams find no socket and are freed for that reason).
    NewFlows,
    /// The same into a table at nf_conntrack_max: every new flow evicts an unassured entry (early_drop), nothing
    /// is dropped. In kprobe mode this arms ctrace's eviction probe.
    NewFlowsFullTable,
    /// One pinned sender whose every datagram an iptables DROP rule drops.
    RuleDrop,
    /// One pinned sender of new flows while the global nf_conntrack_max is lowered: conntrack drops each
    /// (table_full).
    TableFull,
}

impl Workload {
    pub const ALL: [Workload; 4] = [
        Workload::NewFlows,
        Workload::NewFlowsFullTable,
        Workload::RuleDrop,
        Workload::TableFull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::NewFlows => "new_flows",
            Workload::NewFlowsFullTable => "new_flows_full_table",
            Workload::RuleDrop => "rule_drop",
            Workload::TableFull => "table_full",
        }
    }
}

/// Port of the flows nothing drops (no socket listens there).
const OPEN_PORT: u16 = 9;
/// Port the DROP rule drops.
const DROPPED_PORT: u16 = 7;
/// The comment that names the DROP rule in `iptables -vnxL`.
const RULE_COMMENT: &str = "ctrace-bench-drop";

/// Datagrams per burst, per workload.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Counts {
    pub new_flows: u32,
    pub evictions: u32,
    pub rule_drops: u32,
    pub table_full_drops: u32,
    /// The global nf_conntrack_max during table_full bursts.
    pub table_full_max: u32,
}

/// A workload's netns, made once and reused by every round (its table is flushed before each).
pub struct Stage {
    pub workload: Workload,
    pub ns: TestNetns,
    counts: Counts,
    cpus: usize,
}

impl Stage {
    pub fn new(workload: Workload, counts: Counts) -> anyhow::Result<Stage> {
        // Conntrack tracks the netns's traffic (a conntrack match in OUTPUT registers its hooks).
        let ns = TestNetns::new(&format!("bench-{}", workload.name().replace('_', "-")))?;
        if workload == Workload::RuleDrop {
            ns.drop_udp_to(DROPPED_PORT, RULE_COMMENT)?;
        }
        Ok(Stage {
            workload,
            ns,
            counts,
            cpus: crate::threads::cpus()?.len(),
        })
    }

    /// Empties the netns's conntrack table, so every round starts alike.
    pub fn reset(&self) -> anyhow::Result<()> {
        self.ns.exec(&["conntrack", "-F"]).map(drop)
    }

    /// The burst that fills the table first (not timed), if the workload has one: as many new flows as
    /// nf_conntrack_max allows.
    pub fn prefill(&self) -> anyhow::Result<Option<Burst>> {
        if self.workload != Workload::NewFlowsFullTable {
            return Ok(None);
        }
        let max = super::traffic::global_max()?;
        Ok(Some(self.burst(self.cpus, max, OPEN_PORT, Flows::Distinct, 0, None)))
    }

    /// The timed burst.
    pub fn burst_after(&self, prefill: Option<&Burst>) -> Burst {
        let c = self.counts;
        let first = prefill.map_or(0, |p| p.count);
        match self.workload {
            Workload::NewFlows => self.burst(self.cpus, c.new_flows, OPEN_PORT, Flows::Distinct, 0, None),
            Workload::NewFlowsFullTable => self.burst(self.cpus, c.evictions, OPEN_PORT, Flows::Distinct, first, None),
            Workload::RuleDrop => self.burst(1, c.rule_drops, DROPPED_PORT, Flows::Same, 0, None),
            Workload::TableFull => self.burst(
                1,
                c.table_full_drops,
                OPEN_PORT,
                Flows::Distinct,
                0,
                Some(c.table_full_max),
            ),
        }
    }

    fn burst(
        &self,
        threads: usize,
        count: u32,
        port: u16,
        flows: Flows,
        first: u32,
        lower_global_max: Option<u32>,
    ) -> Burst {
        Burst {
            netns: self.ns.name.clone(),
            threads,
            count: count / threads as u32 * threads as u32,
            port,
            flows,
            first,
            lower_global_max,
        }
    }

    /// The truth's counters now.
    pub fn truth(&self) -> anyhow::Result<Truth> {
        let rule_drops = if self.workload == Workload::RuleDrop {
            self.ns.rule_packets("iptables", "filter", "OUTPUT", RULE_COMMENT)?
        } else {
            0
        };
        let c = self.ns.counters()?;
        Ok(Truth {
            rule_drops,
            drop: c.drop,
            early_drop: c.early_drop,
            insert_failed: c.insert_failed,
            invalid: c.invalid,
        })
    }
}

/// What happened in the netns, from the DROP rule's counter and the kernel's conntrack counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Truth {
    /// Packets the DROP rule dropped (`iptables -vnxL`).
    pub rule_drops: u64,
    /// Conntrack's own counters: `drop` counts table_full (and other conntrack) drops.
    pub drop: u64,
    pub early_drop: u64,
    pub insert_failed: u64,
    pub invalid: u64,
}

impl Truth {
    pub fn since(&self, before: &Truth) -> Truth {
        let c = Counters {
            drop: self.drop,
            early_drop: self.early_drop,
            insert_failed: self.insert_failed,
            invalid: self.invalid,
        }
        .since(&Counters {
            drop: before.drop,
            early_drop: before.early_drop,
            insert_failed: before.insert_failed,
            invalid: before.invalid,
        });
        Truth {
            rule_drops: self.rule_drops - before.rule_drops,
            drop: c.drop,
            early_drop: c.early_drop,
            insert_failed: c.insert_failed,
            invalid: c.invalid,
        }
    }

    /// Packets netfilter dropped in the netns: by the rule, or by conntrack (table full, failed inserts).
    pub fn netfilter_drops(&self) -> u64 {
        self.rule_drops + self.drop + self.insert_failed
    }
}

/// ctrace's totals for the netns, from its summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CtraceTotals {
    pub table_full: u64,
    pub early_drop: u64,
    pub insert_failed: u64,
    pub invalid: u64,
    pub netfilter_rule: u64,
    /// Drops whose reason was uncertain (any reason).
    pub uncertain: u64,
    /// The sum of `count` over the drop records ctrace printed for the netns (single or aggregated; early_drop
    /// excluded): what was streamed, next to what was counted.
    pub reported: u64,
    /// Events lost host-wide (ring buffer full).
    pub lost: u64,
}

impl CtraceTotals {
    /// Reads the summary and the drop records of netns `inode` from ctrace's JSON Lines.
    pub fn from_output(lines: &[String], inode: u64) -> anyhow::Result<CtraceTotals> {
        let events: Vec<Value> = lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let summary = events
            .iter()
            .find(|v| v["event"] == "summary")
            .ok_or_else(|| anyhow::anyhow!("ctrace printed no summary"))?;
        let mut t = CtraceTotals {
            lost: summary["lost"].as_u64().unwrap_or(0),
            ..Default::default()
        };
        if let Some(ns) = summary["by_netns"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["netns"].as_u64() == Some(inode)))
        {
            let get = |r: &str| ns["drops"][r].as_u64().unwrap_or(0);
            t.table_full = get("table_full");
            t.early_drop = get("early_drop");
            t.insert_failed = get("insert_failed");
            t.invalid = get("invalid");
            t.netfilter_rule = get("netfilter_rule");
            t.uncertain = ns["drops_uncertain"]
                .as_object()
                .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        }
        t.reported = events
            .iter()
            .filter(|v| v["event"] == "drop" && v["netns"].as_u64() == Some(inode) && v["reason"] != "early_drop")
            .filter_map(|v| v["count"].as_u64())
            .sum();
        Ok(t)
    }

    /// None when every total equals the truth; otherwise what differs.
    pub fn mismatch(&self, truth: &Truth) -> Option<String> {
        let pairs = [
            (
                "netfilter_rule",
                self.netfilter_rule,
                truth.rule_drops,
                "the DROP rule's counter",
            ),
            ("table_full", self.table_full, truth.drop, "the kernel's drop counter"),
            (
                "early_drop",
                self.early_drop,
                truth.early_drop,
                "the kernel's early_drop counter",
            ),
            (
                "insert_failed",
                self.insert_failed,
                truth.insert_failed,
                "the kernel's insert_failed counter",
            ),
            ("invalid", self.invalid, 0, "no invalid packet was sent"),
            ("uncertain", self.uncertain, 0, "every drop here has a certain reason"),
        ];
        let mut wrong: Vec<String> = pairs
            .iter()
            .filter(|(_, got, want, _)| got != want)
            .map(|(name, got, want, what)| format!("{name} {got} != {want} ({what})"))
            .collect();
        // Every counted drop is in a record or an aggregate line, or counted as lost (host-wide).
        let counted = self.table_full + self.insert_failed + self.invalid + self.netfilter_rule;
        if self.reported > counted || counted - self.reported > self.lost {
            wrong.push(format!(
                "records and aggregate lines carry {} drops, the totals {counted}, {} lost",
                self.reported, self.lost
            ));
        }
        (!wrong.is_empty()).then(|| wrong.join(", "))
    }
}

/// The bpftrace reference's count for netns `inode`: its map, printed at exit as `@drops[<inode>]: <count>`.
pub fn bpftrace_count(lines: &[String], inode: u64) -> u64 {
    let key = format!("@drops[{inode}]:");
    lines
        .iter()
        .find_map(|l| l.trim().strip_prefix(&key)?.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrace_totals_come_from_the_netns_summary_and_records() {
        let lines: Vec<String> = [
            r#"{"event":"mode","mode":"tracepoint"}"#,
            r#"{"event":"drop","reason":"netfilter_rule","netns":7,"count":1}"#,
            r#"{"event":"drop","reason":"netfilter_rule","netns":7,"count":41,"aggregated":true}"#,
            r#"{"event":"drop","reason":"netfilter_rule","netns":8,"count":5}"#,
            r#"{"event":"drop","reason":"early_drop","netns":7,"count":3,"source":"counters"}"#,
            r#"{"event":"summary","lost":2,"by_netns":[{"netns":8,"drops":{"netfilter_rule":5}},{"netns":7,"drops":{"netfilter_rule":42,"early_drop":3},"drops_uncertain":{"netfilter_rule":0}}]}"#,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let t = CtraceTotals::from_output(&lines, 7).unwrap();
        assert_eq!((t.netfilter_rule, t.early_drop, t.reported, t.lost), (42, 3, 42, 2));
        let truth = Truth {
            rule_drops: 42,
            early_drop: 3,
            ..Default::default()
        };
        assert_eq!(t.mismatch(&truth), None);
        let off = Truth {
            rule_drops: 43,
            ..truth
        };
        assert!(t.mismatch(&off).unwrap().starts_with("netfilter_rule 42 != 43"));
    }

    #[test]
    fn bpftrace_maps_are_read_by_netns() {
        let lines: Vec<String> = ["attached", "", "@drops[4026531840]: 3", "@drops[4026532177]: 400000"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(bpftrace_count(&lines, 4026532177), 400000);
        assert_eq!(bpftrace_count(&lines, 1), 0);
    }
}
