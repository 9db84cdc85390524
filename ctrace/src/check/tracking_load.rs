//! Tracking load: what the table holds per protocol and destination port, and which ports could be exempted from
//! tracking with NOTRACK rules in the raw table (iptables and nft, both directions).

use super::{
    Ctx, Evidence, Finding, Severity,
    facts::{Facts, KEY_MAX},
    table::{PortStat, Table},
};

/// A port is a NOTRACK candidate when its exemptable entries are at least this share of the table...
const CANDIDATE_SHARE: f64 = 10.0;
/// ... and at least this many.
const CANDIDATE_MIN: u64 = 100;
const TOP_PORTS: usize = 10;
const MAX_CANDIDATES: usize = 2;

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { n as f64 * 100.0 / of as f64 }
}

/// Table fill (entries now against nf_conntrack_max) in percent, when known.
pub fn fill(facts: &Facts, t: &Table) -> Option<f64> {
    let max = facts.live_u64(KEY_MAX)?;
    let count = facts.worst_count().map_or(t.total, |(c, _)| c.max(t.total));
    Some(pct(count, max))
}

/// Rules that exempt `proto`/`port` from tracking, for the roles seen in the table.
fn notrack_rules(proto: &str, port: u16, p: &PortStat, roles_known: bool) -> Vec<String> {
    let forwarded = p.entries.saturating_sub(p.to_local + p.from_local);
    let server = !roles_known || p.to_local > 0;
    let client = !roles_known || p.from_local > 0;
    let router = !roles_known || forwarded > 0;
    // (chain, match direction) pairs, each in iptables and nft spelling.
    let mut pairs: Vec<(&str, &str, &str)> = vec![];
    if server {
        pairs.push(("PREROUTING", "dport", "this host serves it: requests in"));
        pairs.push(("OUTPUT", "sport", "this host serves it: replies out"));
    }
    if client {
        pairs.push(("OUTPUT", "dport", "this host is the client: requests out"));
        pairs.push(("PREROUTING", "sport", "this host is the client: replies in"));
    }
    if router {
        pairs.push(("PREROUTING", "dport", "forwarded: requests"));
        pairs.push(("PREROUTING", "sport", "forwarded: replies"));
    }
    let mut seen = std::collections::BTreeSet::new();
    pairs.retain(|(c, d, _)| seen.insert((*c, *d)));
    let mut out = vec![];
    for tool in ["iptables", "ip6tables"] {
        for (chain, dir, why) in &pairs {
            out.push(format!(
                "{tool} -t raw -A {chain} -p {proto} --{dir} {port} -j CT --notrack   # {why}"
            ));
        }
    }
    out.push("nft add table inet raw".to_owned());
    out.push("nft add chain inet raw prerouting '{ type filter hook prerouting priority raw; }'".to_owned());
    out.push("nft add chain inet raw output '{ type filter hook output priority raw; }'".to_owned());
    for (chain, dir, why) in &pairs {
        out.push(format!(
            "nft add rule inet raw {} {proto} {dir} {port} notrack   # {why}",
            chain.to_ascii_lowercase()
        ));
    }
    out
}

pub fn check(ctx: &mut Ctx, facts: &Facts) {
    let Some(t) = &facts.table else { return };
    let truncated = if t.truncated {
        " (the first 4,000,000 lines)"
    } else {
        ""
    };
    let mut top = Finding::new(
        "CT-LOAD-TOP",
        Severity::Info,
        match t.top_ports(1).first() {
            Some(((proto, port), p)) => format!(
                "{} entries in the table{truncated}; the most are {proto} to port {port} ({:.1} %)",
                t.total,
                pct(p.entries, t.total)
            ),
            None => format!("{} entries in the table{truncated}", t.total),
        },
    )
    .evidence(Evidence::at("entries of the netns ctrace runs in", t.source.clone()));
    if t.total > 0 {
        let protos: Vec<String> = t
            .by_proto
            .iter()
            .map(|(p, n)| format!("{p} {n} ({:.1} %)", pct(*n, t.total)))
            .collect();
        top = top.evidence(Evidence::new(format!("by protocol: {}", protos.join(", "))));
    }
    for ((proto, port), p) in t.top_ports(TOP_PORTS) {
        let roles = if t.roles_known {
            format!(
                ", {} to this host, {} from it, {} forwarded",
                p.to_local,
                p.from_local,
                p.entries.saturating_sub(p.to_local + p.from_local)
            )
        } else {
            String::new()
        };
        top = top.evidence(Evidence::new(format!(
            "{proto} dport {port}: {} entries ({:.1} %), {} NAT'd, {} with a helper{roles}",
            p.entries,
            pct(p.entries, t.total),
            p.nat,
            p.helper
        )));
    }
    ctx.push(top);

    let candidates: Vec<_> = t
        .top_ports(TOP_PORTS)
        .into_iter()
        .filter(|((proto, _), p)| {
            let free = p.entries.saturating_sub(p.blocked);
            (proto == "udp" || proto == "tcp") && free >= CANDIDATE_MIN && pct(free, t.total) >= CANDIDATE_SHARE
        })
        .take(MAX_CANDIDATES)
        .collect();
    if candidates.is_empty() {
        return;
    }
    let fill = fill(facts, t);
    let severity = if fill.is_some_and(|f| f >= 50.0) {
        Severity::Warning
    } else {
        Severity::Info
    };
    let names: Vec<String> = candidates.iter().map(|((p, n), _)| format!("{p}/{n}")).collect();
    let mut f = Finding::new(
        "CT-LOAD-NOTRACK",
        severity,
        format!(
            "{} could be exempted from connection tracking (NOTRACK in the raw table), freeing most of the table",
            names.join(" and ")
        ),
    );
    for ((proto, port), p) in &candidates {
        f = f.evidence(Evidence::new(format!(
            "{proto} dport {port}: {} of {} entries ({:.1} %) are neither NAT'd nor handled by a helper",
            p.entries - p.blocked,
            t.total,
            pct(p.entries - p.blocked, t.total)
        )));
        if p.blocked > 0 {
            f = f.evidence(Evidence::new(format!(
                "{proto} dport {port}: {} entries are NAT'd or use a helper: NAT and helpers need conntrack, so these flows must stay tracked (exclude their addresses from the rules)",
                p.blocked
            )));
        }
    }
    if let Some(fill) = fill {
        f = f.evidence(Evidence::new(format!("table fill {fill:.1} %")));
    }
    f = f.evidence(Evidence::new(
        "cannot be NOTRACKed: NAT'd flows (DNAT/SNAT/MASQUERADE need conntrack) and flows that need a helper (passive FTP data, SIP, TFTP): their related connections are only found through conntrack",
    ));
    f = f.evidence(Evidence::new(
        "untracked packets have ctstate UNTRACKED: a filter that accepts only ESTABLISHED,RELATED replies must accept them explicitly (iptables: -m conntrack --ctstate UNTRACKED -j ACCEPT; nft: ct state untracked accept)",
    ));
    if !t.roles_known {
        f = f.evidence(Evidence::new(
            "local addresses are unknown (/proc/net/fib_trie unreadable): rules for every role are printed, keep the ones that apply",
        ));
    }
    for ((proto, port), p) in &candidates {
        for line in notrack_rules(proto, *port, p, t.roles_known) {
            if !f.fix.contains(&line) {
                f.fix.push(line);
            }
        }
    }
    ctx.push(f);
}
