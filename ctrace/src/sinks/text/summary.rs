//! The summary a person reads at the end of a run: exact totals by reason, per netns, the top destinations, the
//! kernel's own counters and what was lost or bounded.

use std::fmt::Write as _;

use ctrace_common::Reason;

use super::{endpoint, netns_label};
use crate::report::{ReasonCounts, SummaryRecord};

/// "table_full=3 invalid=2 (2 uncertain)".
fn reason_list(drops: &ReasonCounts, uncertain: &ReasonCounts) -> String {
    let parts: Vec<String> = Reason::ALL
        .iter()
        .filter(|r| drops.get(**r) > 0)
        .map(|r| match uncertain.get(*r) {
            0 => format!("{}={}", r.name(), drops.get(*r)),
            u => format!("{}={} ({u} uncertain)", r.name(), drops.get(*r)),
        })
        .collect();
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(" ")
    }
}

pub fn summary_text(s: &SummaryRecord) -> String {
    let mut o = String::new();
    let _ = writeln!(o);
    let _ = writeln!(o, "=== ctrace summary ({} mode, {:.1}s) ===", s.mode, s.duration_s);
    let _ = writeln!(
        o,
        "drops by reason (exact totals, counted in the kernel; \"uncertain\": the evidence left another reason possible):"
    );
    for r in Reason::ALL {
        let total = s.drops.get(r);
        let split = match s.drops_uncertain.get(r) {
            0 => String::new(),
            u => format!("  ({} certain, {u} uncertain)", total - u.min(total)),
        };
        let _ = writeln!(o, "  {:<15} {total}{split}", r.name());
    }
    let _ = writeln!(o, "  {:<15} {}", "total", s.total);
    let a = &s.attribution;
    if a.no_baseline + a.probe_disagreements + a.baseline_resets > 0 {
        let _ = writeln!(
            o,
            "attribution fallbacks: {} drops without a counter baseline, {} probe verdicts contradicted by the counters, {} baselines restarted (reused netns inode or reload)",
            a.no_baseline, a.probe_disagreements, a.baseline_resets
        );
    }
    if a.baselines_pruned > 0 {
        let _ = writeln!(o, "baselines of {} gone netns pruned", a.baselines_pruned);
    }
    if !s.by_netns.is_empty() {
        let _ = writeln!(o, "drops by netns:");
        for n in &s.by_netns {
            let kernel = n
                .kernel_counters
                .map(|k| {
                    format!(
                        "  [kernel counters: drop={} early_drop={} insert_failed={} invalid={}]",
                        k.drop, k.early_drop, k.insert_failed, k.invalid
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "  {:<24} {}{kernel}",
                netns_label(n.netns, n.name.as_deref()),
                reason_list(&n.drops, &n.drops_uncertain)
            );
        }
    }
    if !s.top_flows.is_empty() {
        let _ = writeln!(o, "top destinations:");
        for f in &s.top_flows {
            let dst = match (f.icmp_type, f.icmp_code) {
                (Some(t), Some(c)) => format!("{} type {t} code {c}", f.dst),
                _ => endpoint(f.dst, f.dport),
            };
            let _ = writeln!(o, "  {:<6} {:<40} {}", f.proto, dst, f.count);
        }
    }
    if !s.top_dports.is_empty() {
        let _ = writeln!(o, "top destination ports:");
        for p in &s.top_dports {
            let _ = writeln!(o, "  {:<6} {:<6} {}", p.proto, p.dport, p.count);
        }
    }
    if s.untracked > 0 {
        let _ = writeln!(
            o,
            "  ({} drops of further flows are in the totals but not in the top lists)",
            s.untracked
        );
    }
    let _ = writeln!(
        o,
        "events lost: {}{}",
        s.lost,
        if s.lost > 0 {
            " (ring buffer full; totals above are still exact)"
        } else {
            ""
        }
    );
    o.push_str(&crate::bounds::summary_text(&s.bounds));
    if s.module_requests_unprivileged > 0 {
        let _ = writeln!(
            o,
            "module requests ignored: {} (callers without CAP_SYS_MODULE in the init user namespace cannot change a module)",
            s.module_requests_unprivileged
        );
    }
    o
}
