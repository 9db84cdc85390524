//! Timeouts against what the table holds: the 5-day ESTABLISHED default with a table full of established
//! entries, an ESTABLISHED timeout shorter than TCP keepalive, and a table of UNREPLIED entries.

use super::{
    Ctx, Evidence, Finding, Severity,
    facts::{Facts, KEY_EST, proc_path},
    tracking_load::fill,
};

const KEY_UDP: &str = "net.netfilter.nf_conntrack_udp_timeout";
const KEY_SYN_SENT: &str = "net.netfilter.nf_conntrack_tcp_timeout_syn_sent";
/// The table must be at least this full for its contents to matter.
const FILL_MIN: f64 = 50.0;
const EST_LONG: u64 = 86400;

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { n as f64 * 100.0 / of as f64 }
}

fn persist(key: &str, v: u64) -> String {
    format!("echo '{key} = {v}' >> /etc/sysctl.d/90-nf-conntrack.conf")
}

pub fn check(ctx: &mut Ctx, facts: &Facts) {
    let est = facts.live_u64(KEY_EST);

    if let (Some(est), Some((ka_total, ka_time))) = (est, facts.keepalive)
        && est < ka_time
    {
        let v = ka_total.div_ceil(60) * 60;
        ctx.push(
            Finding::new(
                "CT-TIMEOUT-BELOW-KEEPALIVE",
                Severity::Warning,
                format!(
                    "nf_conntrack_tcp_timeout_established = {est}s is shorter than TCP keepalive ({ka_time}s): idle connections lose their entry before the first keepalive, and their next packet is INVALID (or goes out un-NAT'd)"
                ),
            )
            .evidence(Evidence::at(format!("{KEY_EST} = {est}"), proc_path(KEY_EST)))
            .evidence(Evidence::at(
                format!(
                    "net.ipv4.tcp_keepalive_time = {ka_time} (with intvl × probes: {ka_total})"
                ),
                "/proc/sys/net/ipv4/tcp_keepalive_time",
            ))
            .fix(format!("sysctl -w {KEY_EST}={v}"))
            .fix(persist(KEY_EST, v)),
        );
    }

    let Some(t) = &facts.table else { return };
    let Some(fill) = fill(facts, t) else { return };
    if fill < FILL_MIN || t.total == 0 {
        return;
    }

    let established = t.tcp_states.get("ESTABLISHED").copied().unwrap_or(0);
    if let Some(est) = est
        && est > EST_LONG
        && pct(established, t.total) >= 50.0
    {
        let v = facts.keepalive.map_or(EST_LONG, |(total, _)| EST_LONG.max(total));
        ctx.push(
            Finding::new(
                "CT-TIMEOUT-TCP-ESTABLISHED",
                Severity::Warning,
                format!(
                    "the table is {fill:.0} % full and {:.0} % of it is ESTABLISHED entries kept up to {:.1} days after the last packet",
                    pct(established, t.total),
                    est as f64 / 86400.0
                ),
            )
            .evidence(Evidence::at(format!("{KEY_EST} = {est}"), proc_path(KEY_EST)))
            .evidence(Evidence::at(
                format!(
                    "{established} of {} entries are ESTABLISHED; {} of them idle for more than an hour",
                    t.total, t.established_idle_1h
                ),
                t.source.clone(),
            ))
            .fix(format!("sysctl -w {KEY_EST}={v}   # longer than any legitimate idle period and TCP keepalive"))
            .fix(persist(KEY_EST, v)),
        );
    }

    let unreplied: u64 = t.unreplied_by_proto.values().sum();
    if pct(unreplied, t.total) >= 50.0 {
        let per: Vec<String> = t.unreplied_by_proto.iter().map(|(p, n)| format!("{p} {n}")).collect();
        let mut f = Finding::new(
            "CT-TIMEOUT-UNREPLIED",
            Severity::Warning,
            format!(
                "the table is {fill:.0} % full and {:.0} % of it is UNREPLIED entries (one-way traffic, scans or floods) waiting for their timeout",
                pct(unreplied, t.total)
            ),
        )
        .evidence(Evidence::at(
            format!("UNREPLIED entries: {} of {} ({})", unreplied, t.total, per.join(", ")),
            t.source.clone(),
        ));
        let udp = t.unreplied_by_proto.get("udp").copied().unwrap_or(0);
        let tcp = t.unreplied_by_proto.get("tcp").copied().unwrap_or(0);
        if udp > 0 {
            let cur = facts.live_u64(KEY_UDP).map_or("?".to_owned(), |v| v.to_string());
            f = f
                .evidence(Evidence::at(format!("{KEY_UDP} = {cur}"), proc_path(KEY_UDP)))
                .fix(format!("sysctl -w {KEY_UDP}=10"))
                .fix(persist(KEY_UDP, 10));
        }
        if tcp > 0 {
            let cur = facts.live_u64(KEY_SYN_SENT).map_or("?".to_owned(), |v| v.to_string());
            f = f
                .evidence(Evidence::at(format!("{KEY_SYN_SENT} = {cur}"), proc_path(KEY_SYN_SENT)))
                .fix(format!("sysctl -w {KEY_SYN_SENT}=30"))
                .fix(persist(KEY_SYN_SENT, 30));
        }
        f = f.fix("ctrace run --reason early_drop,table_full   # see whose flows are evicted or dropped");
        ctx.push(f);
    }
}
