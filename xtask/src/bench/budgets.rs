//! The budgets of issue 9, judged from a report's runs.

use super::{
    samples::{Run, Tracer},
    stats::{BPFTRACE, CTRACE, DROPS, NO_DROP, OFF, median, place, row},
};

/// (budget, what was measured, whether it holds: None when this run did not measure it).
pub fn budgets(runs: &[Run]) -> Vec<(String, String, Option<bool>)> {
    let mut out = Vec::new();
    // Rates move by several % between rounds on a shared machine, more than this budget: where the programs' run
    // time was recorded (--bpf-stats), their share of the packet's CPU time says it precisely (and, with the
    // statistics' own clock reads in it, rather too high) and decides; otherwise the rates decide only where
    // their rounds agree within the budget.
    for run in runs {
        let mut loss = Vec::new();
        for w in NO_DROP.iter().filter(|w| run.has(w)) {
            let r = row(run, w);
            if let Some(v) = r.ctrace_vs.get(OFF) {
                let spread = r.ctrace_vs_spread.get(OFF).copied().unwrap_or(0.0);
                loss.push((w.to_string(), 1.0 - v, spread, r.ctrace_bpf_share));
            }
        }
        if loss.is_empty() {
            continue;
        }
        let measured = loss
            .iter()
            .map(|(w, l, spread, share)| {
                let rates = format!("{w}: rates {:+.1} % (rounds ±{:.1} %)", -l * 100.0, spread * 100.0);
                match share {
                    Some(share) => format!("{rates}, program time {:.2} % of the packet's CPU", share * 100.0),
                    None => rates,
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        let verdicts: Vec<Option<bool>> = loss
            .iter()
            .map(|(_, l, spread, share)| match share {
                Some(share) => Some(*share <= 0.01),
                None if *spread <= 0.01 => Some(*l <= 0.01),
                None if *l - *spread > 0.01 => Some(false),
                None => None,
            })
            .collect();
        out.push((
            format!("≤ 1 % loss on traffic netfilter does not drop: {}", place(run)),
            measured,
            if verdicts.contains(&Some(false)) {
                Some(false)
            } else if verdicts.iter().all(|v| *v == Some(true)) {
                Some(true)
            } else {
                None
            },
        ));
    }
    // The flood, CPU and start-up budgets are for this host; an emulated guest says nothing about them.
    let empty = Run::default();
    let host = runs.iter().find(|r| !r.indicative).unwrap_or(&empty);
    let flood: Vec<(&str, f64)> = DROPS
        .iter()
        .filter_map(|w| Some((*w, *row(host, w).ctrace_vs.get(BPFTRACE)?)))
        .collect();
    out.push((
        "drop flood: sender rate with ctrace ≥ 90 % of the rate with the bpftrace one-liner".into(),
        flood
            .iter()
            .map(|(w, v)| format!("{w}: {:.0} %", v * 100.0))
            .collect::<Vec<_>>()
            .join("; "),
        (!flood.is_empty()).then(|| flood.iter().all(|(_, v)| *v >= 0.9)),
    ));
    let cpu: Vec<(&str, f64)> = DROPS
        .iter()
        .filter_map(|w| Some((*w, row(host, w).cpu_per_m?)))
        .collect();
    out.push((
        "ctrace CPU ≤ 0.3 s per million drops".into(),
        cpu.iter()
            .map(|(w, v)| format!("{w}: {v:.2} s"))
            .collect::<Vec<_>>()
            .join("; "),
        (!cpu.is_empty()).then(|| cpu.iter().all(|(_, v)| *v <= 0.3)),
    ));
    let mismatches: Vec<String> = runs.iter().flat_map(Run::mismatches).collect();
    let checked: usize = runs
        .iter()
        .map(|r| r.samples.iter().filter(|s| s.tracer.is_some()).count())
        .sum();
    let lost: u64 = runs
        .iter()
        .flat_map(|r| &r.samples)
        .filter_map(|s| s.tracer.as_ref()?.ctrace.as_ref())
        .map(|t| t.lost)
        .sum();
    out.push((
        "totals exact at the highest drop rate, losses counted".into(),
        format!(
            "{} of {checked} tracer runs exact; {lost} events lost (counted in ctrace's summary)",
            checked - mismatches.len()
        ),
        (checked > 0).then_some(mismatches.is_empty()),
    ));
    let times = |f: fn(&Tracer) -> f64| {
        median(
            host.samples
                .iter()
                .filter(|s| s.condition == CTRACE)
                .filter_map(|s| Some(f(s.tracer.as_ref()?)))
                .collect(),
        )
    };
    let attach = times(|t| t.attach_s);
    out.push((
        "attach ≤ 0.5 s".into(),
        attach.map_or("–".into(), |v| format!("{v:.3} s (median)")),
        attach.map(|v| v <= 0.5),
    ));
    let detach = times(|t| t.detach_s);
    out.push((
        "detach ≤ 0.2 s".into(),
        detach.map_or("–".into(), |v| format!("{v:.3} s (median)")),
        detach.map(|v| v <= 0.2),
    ));
    out
}
