//! Sizing: count, max and buckets now, fill, max:buckets ratio, the memory a full table takes, and max against
//! the kernel's RAM-based default.

use super::{
    Ctx, Evidence, Finding, Severity,
    facts::{Defaults, Facts, HASHSIZE_PARAM, KEY_BUCKETS, KEY_COUNT, KEY_MAX, ModuleState, NF_SYSCTL_DIR, proc_path},
};

const FILL_WARN: f64 = 75.0;
const FILL_CRIT: f64 = 90.0;
const RATIO_WARN: u64 = 8;
const MEMORY_WARN_PCT: f64 = 25.0;

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { n as f64 * 100.0 / of as f64 }
}

/// How to persist a hash size: a module option, or the kernel command line when nf_conntrack is built in.
pub fn persist_hashsize(facts: &Facts, n: u64) -> String {
    match facts.module {
        ModuleState::Builtin(_) => format!(
            "add nf_conntrack.hashsize={n} to GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub (nf_conntrack is built in)"
        ),
        _ => format!("echo 'options nf_conntrack hashsize={n}' > /etc/modprobe.d/nf_conntrack.conf"),
    }
}

pub fn check(ctx: &mut Ctx, facts: &Facts) {
    if let ModuleState::NotLoaded(why) = &facts.module {
        ctx.push(
            Finding::new(
                "CT-MODULE-NOT-LOADED",
                Severity::Info,
                "nf_conntrack is not loaded: there are no live values to audit (configuration is still checked)",
            )
            .evidence(Evidence::new(why.clone())),
        );
        return;
    }
    let (Some(max), Some(buckets)) = (facts.live_u64(KEY_MAX), facts.live_u64(KEY_BUCKETS)) else {
        if matches!(facts.module, ModuleState::Module(_) | ModuleState::Builtin(_)) {
            ctx.unreadable(
                proc_path(KEY_MAX),
                "nf_conntrack is present but its sysctls could not be read",
            );
        }
        return;
    };
    let count = facts.live_u64(KEY_COUNT);
    let defaults = facts.defaults();
    let entry = facts.entry_size.bytes();
    let full_bytes = entry.map(|e| max.saturating_mul(e).saturating_add(buckets.saturating_mul(8)));
    let mem_bytes = facts.mem_total_kb.map(|k| k.saturating_mul(1024));

    // Summary.
    let fill_now = count.map(|c| pct(c, max));
    let mut summary = Finding::new(
        "CT-SIZE-SUMMARY",
        Severity::Info,
        format!(
            "conntrack table: {} of {max} entries ({}), {buckets} buckets, a full table takes {}",
            count.map_or("?".to_owned(), |c| c.to_string()),
            fill_now.map_or("fill unknown".to_owned(), |f| format!("{f:.1} % full")),
            full_bytes.map_or("an unknown amount of memory".to_owned(), mib)
        ),
    )
    .evidence(Evidence::at(
        format!(
            "nf_conntrack_count = {}, nf_conntrack_max = {max}, nf_conntrack_buckets = {buckets}",
            count.map_or("?".to_owned(), |c| c.to_string())
        ),
        format!("{NF_SYSCTL_DIR}/"),
    ));
    let mut by_netns: Vec<(u64, &str)> = facts
        .stats
        .iter()
        .map(|s| (s.stats.entries(), s.label.as_str()))
        .collect();
    by_netns.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (entries, label) in by_netns.iter().take(5) {
        summary = summary.evidence(Evidence::new(format!(
            "{label}: {entries} entries ({:.1} % of max)",
            pct(*entries, max)
        )));
    }
    if by_netns.len() > 5 {
        summary = summary.evidence(Evidence::new(format!("... and {} more netns", by_netns.len() - 5)));
    }
    summary = summary.evidence(Evidence::new(format!(
        "max:buckets = {:.2}:1 (each entry is hashed twice, so a full table has about {:.1} entries per bucket)",
        max as f64 / buckets.max(1) as f64,
        2.0 * max as f64 / buckets.max(1) as f64
    )));
    summary = summary.evidence(Evidence::new(facts.entry_size.describe()));
    if let Some(b) = full_bytes {
        let share = mem_bytes.map_or(String::new(), |m| format!(", {:.1} % of MemTotal", pct(b, m)));
        summary = summary.evidence(Evidence::new(format!(
            "a full table: {max} × {} bytes + {buckets} buckets × 8 bytes = {}{share} (not counting extensions such as acct or timestamp)",
            entry.unwrap_or(0),
            mib(b)
        )));
    }
    if let Some(d) = &defaults {
        summary = summary.evidence(Evidence::new(format!(
            "kernel default for this RAM: nf_conntrack_max {eq} {}, nf_conntrack_buckets {eq} {} ({})",
            d.max,
            d.buckets,
            d.rule,
            eq = if d.approximate { "≈" } else { "=" }
        )));
    }
    if let Some(h) = facts.hashsize_param {
        summary = summary.evidence(Evidence::at(format!("hashsize = {h}"), HASHSIZE_PARAM));
    }
    ctx.push(summary);

    // Fill, in the fullest netns.
    if let Some((worst, label)) = facts.worst_count() {
        let fill = pct(worst, max);
        if fill >= FILL_WARN {
            let severity = if fill >= FILL_CRIT {
                Severity::Critical
            } else {
                Severity::Warning
            };
            let new_max = max.saturating_mul(2);
            ctx.push(
                Finding::new(
                    "CT-SIZE-FILL",
                    severity,
                    format!(
                        "the conntrack table is {fill:.1} % full in {label}: new flows are dropped when it is full"
                    ),
                )
                .evidence(Evidence::new(format!(
                    "{worst} entries of nf_conntrack_max = {max} in {label}"
                )))
                .fix(format!("sysctl -w net.netfilter.nf_conntrack_max={new_max}"))
                .fix(format!(
                    "echo 'net.netfilter.nf_conntrack_max = {new_max}' > /etc/sysctl.d/90-nf-conntrack.conf"
                ))
                .fix(format!("echo {new_max} > {HASHSIZE_PARAM}   # keep buckets = max"))
                .fix("ctrace run --reason table_full,early_drop   # watch what is dropped meanwhile"),
            );
        }
    }

    // max:buckets ratio.
    if buckets > 0 && max / buckets > RATIO_WARN {
        ctx.push(
            Finding::new(
                "CT-SIZE-HASH-RATIO",
                Severity::Warning,
                format!(
                    "nf_conntrack_max is {}× nf_conntrack_buckets: a full table has long hash chains (slow lookups, insert_failed on 5.15+)",
                    max / buckets
                ),
            )
            .evidence(Evidence::at(
                format!("nf_conntrack_max = {max}, nf_conntrack_buckets = {buckets}"),
                format!("{NF_SYSCTL_DIR}/"),
            ))
            .fix(format!("echo {max} > {HASHSIZE_PARAM}"))
            .fix(persist_hashsize(facts, max)),
        );
    }

    if let Some(d) = &defaults
        && max < d.max
        && Defaults::is_default(Some(d), KEY_MAX, &max.to_string()) == Some(false)
    {
        ctx.push(
            Finding::new(
                "CT-SIZE-MAX-BELOW-DEFAULT",
                Severity::Info,
                format!(
                    "nf_conntrack_max = {max} is below the kernel's default for this RAM ({}): the table fills sooner than it has to",
                    d.max
                ),
            )
            .evidence(Evidence::at(format!("nf_conntrack_max = {max}"), proc_path(KEY_MAX)))
            .evidence(Evidence::new(format!("default: {} ({})", d.max, d.rule)))
            .fix(format!("sysctl -w net.netfilter.nf_conntrack_max={}   # if the lower limit is not deliberate", d.max)),
        );
    }

    if let (Some(b), Some(m), Some(e)) = (full_bytes, mem_bytes, entry)
        && pct(b, m) > MEMORY_WARN_PCT
    {
        let fit = (m / 10).saturating_sub(buckets.saturating_mul(8)) / e.max(1);
        ctx.push(
            Finding::new(
                "CT-SIZE-MAX-MEMORY",
                Severity::Warning,
                format!(
                    "a full table at nf_conntrack_max = {max} takes {} ({:.0} % of RAM): a flood can exhaust memory instead of being dropped",
                    mib(b),
                    pct(b, m)
                ),
            )
            .evidence(Evidence::new(facts.entry_size.describe()))
            .evidence(Evidence::at(
                format!("MemTotal = {} kB", facts.mem_total_kb.unwrap_or(0)),
                "/proc/meminfo",
            ))
            .fix(format!("sysctl -w net.netfilter.nf_conntrack_max={fit}   # about 10 % of RAM")),
        );
    }
}
