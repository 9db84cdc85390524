//! The kernel's conntrack counters per network namespace (`/proc/net/stat/nf_conntrack` read in each netns):
//! `drop`, `early_drop`, `insert_failed` and `invalid` since boot, or since nf_conntrack was last loaded.

use super::{
    Ctx, Evidence, Finding, Severity,
    facts::{Facts, KEY_MAX, ModuleState},
};

struct Counter {
    id: &'static str,
    name: &'static str,
    title: &'static str,
}

const COUNTERS: [Counter; 4] = [
    Counter {
        id: "CT-COUNTER-DROP",
        name: "drop",
        title: "conntrack dropped packets because the table was full (or dropped packets it could not handle)",
    },
    Counter {
        id: "CT-COUNTER-EARLY-DROP",
        name: "early_drop",
        title: "conntrack evicted unassured entries to make room: the table has been full",
    },
    Counter {
        id: "CT-COUNTER-INSERT-FAILED",
        name: "insert_failed",
        title: "new conntrack entries could not be confirmed (unresolved clashes, hash chains too long, dying entries): their packets were dropped",
    },
    Counter {
        id: "CT-COUNTER-INVALID",
        name: "invalid",
        title: "conntrack saw packets it could not track (invalid): they pass untracked, or a ctstate INVALID rule drops them",
    },
];

pub fn check(ctx: &mut Ctx, facts: &Facts) {
    if facts.stats.is_empty() {
        return;
    }
    let since = match facts.module {
        ModuleState::Module(_) => "since nf_conntrack was loaded (a reload zeroes them)",
        _ => "since boot",
    };
    let max = facts.live_u64(KEY_MAX).unwrap_or(0);
    for c in &COUNTERS {
        let hits: Vec<(&str, u64)> = facts
            .stats
            .iter()
            .map(|s| (s.label.as_str(), s.stats.total(c.name)))
            .filter(|(_, n)| *n > 0)
            .collect();
        if hits.is_empty() {
            continue;
        }
        let total: u64 = hits.iter().map(|h| h.1).sum();
        let mut f = Finding::new(
            c.id,
            Severity::Warning,
            format!("{} ({} = {total} {since})", c.title, c.name),
        );
        for (label, n) in &hits {
            f = f.evidence(Evidence::at(
                format!("{label}: {} = {n}", c.name),
                "/proc/net/stat/nf_conntrack",
            ));
        }
        if c.name == "insert_failed" {
            let chain: u64 = facts.stats.iter().map(|s| s.stats.total("chaintoolong")).sum();
            let clash: u64 = facts.stats.iter().map(|s| s.stats.total("clash_resolve")).sum();
            if chain > 0 || clash > 0 {
                f = f.evidence(Evidence::new(format!(
                    "chaintoolong = {chain}, clash_resolve = {clash} (summed over netns)"
                )));
            }
        }
        f = match c.name {
            "drop" | "early_drop" => f
                .fix(format!(
                    "ctrace run --reason {}   # see which flows, live",
                    if c.name == "drop" { "table_full" } else { "early_drop" }
                ))
                .fix(format!(
                    "sysctl -w net.netfilter.nf_conntrack_max={}   # if the table is too small for the load",
                    max.saturating_mul(2).max(65536)
                )),
            "insert_failed" => f
                .fix("ctrace run --reason insert_failed   # see which flows, and why (kprobe mode)")
                .fix("conntrack -S   # per-CPU clash_resolve and chaintoolong tell clashes from long chains"),
            _ => f
                .fix("ctrace run --reason invalid   # see which packets, and the kernel's reason (kprobe mode)")
                .fix("sysctl -w net.netfilter.nf_conntrack_log_invalid=255   # or: the kernel logs why, see dmesg"),
        };
        ctx.push(f);
    }
}
