//! The attribution matrix: ctrace's per-reason totals against truth it did not compute (the DROP rules' own
//! packet counters, the packets sent and arrived, the kernel's counters where they are exact), under noise,
//! NOTRACK, raw-table rules, forwarding in softirq on several CPUs, same-tuple races and netns churn. The same
//! binary runs on this host (tracepoint mode) and in 2-vCPU guests (kprobe mode, `cargo xtask test --step matrix`).
//! The invariant in every case: no drop gets a confident wrong reason; where the evidence cannot separate two
//! reasons the drop says so.

mod churn;
mod clash;
mod forwarding;
mod noise;

use std::collections::BTreeMap;

use ctrace_tests::TestNetns;
use serde_json::Value;

/// ctrace's drop records of one netns, by (reason, attribution, possible reasons).
#[derive(Debug, Default)]
pub struct Reported {
    by: BTreeMap<(String, String, Vec<String>), u64>,
}

impl Reported {
    pub fn of(events: &[Value], netns: u64) -> Reported {
        Reported::of_any(events, |n| n == netns)
    }

    /// The drop records of every netns for which `netns` is true.
    pub fn of_any(events: &[Value], netns: impl Fn(u64) -> bool) -> Reported {
        let mut r = Reported::default();
        for v in events
            .iter()
            .filter(|v| v["event"] == "drop" && netns(v["netns"].as_u64().unwrap_or(0)))
        {
            let possible: Vec<String> = v["possible"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| p.as_str().map(String::from)).collect())
                .unwrap_or_default();
            let key = (
                v["reason"].as_str().unwrap_or("?").to_owned(),
                v["attribution"].as_str().unwrap_or("?").to_owned(),
                possible,
            );
            *r.by.entry(key).or_default() += v["count"].as_u64().unwrap_or(1);
        }
        r
    }

    pub fn total(&self) -> u64 {
        self.by.values().sum()
    }

    pub fn exact(&self, reason: &str) -> u64 {
        self.by
            .iter()
            .filter(|((r, a, _), _)| r == reason && a != "uncertain")
            .map(|(_, c)| c)
            .sum()
    }

    /// Records that name `reason`, for certain or as one of the possible reasons.
    pub fn possibly(&self, reason: &str) -> u64 {
        self.by
            .iter()
            .filter(|((r, a, p), _)| {
                r == reason && a != "uncertain" || a == "uncertain" && p.iter().any(|x| x == reason)
            })
            .map(|(_, c)| c)
            .sum()
    }

    /// The reasons the records name, certain or not.
    pub fn reasons(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.by.keys().map(|(r, _, _)| r.as_str()).collect();
        v.dedup();
        v
    }

    pub fn uncertain(&self) -> u64 {
        self.by
            .iter()
            .filter(|((_, a, _), _)| a == "uncertain")
            .map(|(_, c)| c)
            .sum()
    }

    /// Every uncertain record must list `reason` among the possible ones.
    pub fn uncertain_always_allows(&self, reason: &str) -> bool {
        self.by
            .iter()
            .filter(|((_, a, _), _)| a == "uncertain")
            .all(|((_, _, p), _)| p.iter().any(|x| x == reason))
    }
}

/// Runs `tool -w ARGS` (iptables, ip6tables) in `ns`; ARGS split at whitespace.
fn iptables(ns: &TestNetns, tool: &str, args: &str) {
    let mut full = vec![tool, "-w"];
    full.extend(args.split_whitespace());
    ns.exec(&full).unwrap();
}
