//! The budgets of issue 9, judged from a report's runs.

use super::{
    samples::{Run, Tracer},
    stats::{BPFTRACE, CTRACE, DROPS, NO_DROP, OFF, median, place, row},
};

/// (budget, what was measured, whether it holds: None when this run did not measure it).
pub fn budgets(runs: &[Run]) -> Vec<(String, String, Option<bool>)> {
    let mut out = Vec::new();
    // Rates move by several % between rounds on a shared machine, more than this budget: where the programs' run
    // time was recorded (--bpf-stats), their share of the packet's CPU time says it precisely and decides. The
    // statistics add a clock read to every run, about 1 % of these packets' CPU time on its own: what decides is
    // ctrace's share above the bpftrace one-liner's, whose program on these packets is one compare (without a
    // bpftrace run, ctrace's whole share decides). Otherwise the rates decide only where their rounds agree
    // within the budget. An emulated guest decides nothing: a kprobe trap there costs microseconds of emulation
    // that the program's run time does not show and that hardware does not pay.
    for run in runs {
        let mut loss = Vec::new();
        for w in NO_DROP.iter().filter(|w| run.has(w)) {
            let r = row(run, w);
            if let Some(v) = r.ctrace_vs.get(OFF) {
                let spread = r.ctrace_vs_spread.get(OFF).copied().unwrap_or(0.0);
                let share = r
                    .ctrace_bpf_share
                    .map(|ctrace| (ctrace, r.bpftrace_bpf_share.map(|floor| ctrace - floor)));
                loss.push((w.to_string(), 1.0 - v, spread, share));
            }
        }
        if loss.is_empty() {
            continue;
        }
        let mut measured = loss
            .iter()
            .map(|(w, l, spread, share)| {
                let rates = format!("{w}: rates {:+.1} % (rounds ±{:.1} %)", -l * 100.0, spread * 100.0);
                match share {
                    Some((share, Some(above))) => format!(
                        "{rates}, program time {:.2} % of the packet's CPU with the statistics' clock reads, {:.2} % \
                         above the bpftrace one-liner's",
                        share * 100.0,
                        above * 100.0
                    ),
                    Some((share, None)) => {
                        format!("{rates}, program time {:.2} % of the packet's CPU", share * 100.0)
                    }
                    None => rates,
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        let verdicts: Vec<Option<bool>> = loss
            .iter()
            .map(|(_, l, spread, share)| match share {
                Some((_, Some(above))) => Some(*above <= 0.01),
                Some((share, None)) => Some(*share <= 0.01),
                None if *spread <= 0.01 => Some(*l <= 0.01),
                None if *l - *spread > 0.01 => Some(false),
                None => None,
            })
            .collect();
        if run.indicative {
            measured += "; emulated: no verdict (kprobe traps cost microseconds under TCG)";
        }
        out.push((
            format!("≤ 1 % loss on traffic netfilter does not drop: {}", place(run)),
            measured,
            if run.indicative {
                None
            } else if verdicts.contains(&Some(false)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A host run of new flows at 200 k packets per sender CPU second (5000 ns each) whose tracers' programs took
    /// `bpftrace_ns` and `ctrace_ns` per packet, rates equal.
    fn run_with_program_times(bpftrace_ns: u64, ctrace_ns: u64) -> Run {
        run_in("host", false, bpftrace_ns, ctrace_ns)
    }

    fn run_in(place: &str, indicative: bool, bpftrace_ns: u64, ctrace_ns: u64) -> Run {
        let mut run = Run::new(place, indicative);
        for round in 0..3 {
            for (c, ns) in [(OFF, None), (BPFTRACE, Some(bpftrace_ns)), (CTRACE, Some(ctrace_ns))] {
                let tracer = ns.map(|ns| {
                    json!({"attach_s": 0.1, "detach_s": 0.01, "cpu_s": 0.0, "peak_rss_kib": 1, "mode": "tracepoint",
                           "eviction_probe": null, "ctrace": null, "mismatch": null, "bpf": {"run_time_ns": ns * 1000}})
                });
                run.feed(
                    &json!({"sample": {"workload": "new_flows", "condition": c, "round": round, "threads": 2,
                        "packets": 1000, "rate": 100000.0, "cpu_rate": 200000.0,
                        "truth": {"rule_drops": 0, "drop": 0, "early_drop": 0, "insert_failed": 0},
                        "tracer": tracer}})
                    .to_string(),
                )
                .unwrap();
            }
        }
        run
    }

    fn no_drop_verdict(run: &Run) -> (String, Option<bool>) {
        let (_, measured, holds) = budgets(std::slice::from_ref(run)).remove(0);
        (measured, holds)
    }

    #[test]
    fn the_no_drop_budget_counts_what_ctrace_adds_above_the_statistics_floor() {
        // 52 ns of 5000 is 1.04 %, but 47 of them the bpftrace one-liner's one compare takes too: 0.10 % above.
        let (measured, holds) = no_drop_verdict(&run_with_program_times(47, 52));
        assert_eq!(holds, Some(true), "{measured}");
        assert!(measured.contains("program time 1.04 %"), "{measured}");
        assert!(measured.contains("0.10 % above the bpftrace one-liner's"), "{measured}");
        // 47 + 60 ns: ctrace's own program takes 1.2 % of the packet.
        assert_eq!(no_drop_verdict(&run_with_program_times(47, 107)).1, Some(false));
    }

    #[test]
    fn an_emulated_guest_gives_no_verdict_on_the_no_drop_budget() {
        let (measured, holds) = no_drop_verdict(&run_in("guest (Debian 6.1)", true, 47, 52));
        assert_eq!(holds, None, "{measured}");
        assert!(measured.contains("emulated: no verdict"), "{measured}");
    }
}
