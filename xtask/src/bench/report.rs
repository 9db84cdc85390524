//! The benchmark's report: medians over rounds, ratios paired within each round (the conditions of one round ran
//! back to back), the budgets of issue 9, as a markdown table and as JSON.

use serde_json::{Value, json};

use super::{
    budgets::budgets,
    samples::Run,
    stats::{BPFTRACE, CTRACE, DROPS, NO_DROP, OFF, Row, describe, median, place, row},
};

fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else {
        format!("{:.0} k", v / 1e3)
    }
}

fn rate_cell(r: &Row, c: &str) -> String {
    match r.rate.get(c) {
        Some((m, Some(s))) => format!("{} ±{:.0} %", rate(*m), s * 100.0),
        Some((m, None)) => rate(*m),
        None => "–".into(),
    }
}

fn pct(v: Option<&f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.1} %", v * 100.0))
}

fn exact_cell(r: &Row) -> String {
    let cell = |c: &str, name: &str| r.exact.get(c).map(|(ok, n)| format!("{name} {ok}/{n}"));
    [cell(CTRACE, "ctrace"), cell(BPFTRACE, "bpftrace")]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ")
}

/// The markdown report.
pub fn markdown(runs: &[Run], date: &str) -> String {
    let mut md = format!(
        "Measured {date}. The conditions of each round ran back to back, in an order that changes from round to round \
         (each condition as often first, second and last); medians over rounds, ±half their range; ratios and ns per packet are medians of per-round pairs. \
         Rates are packets per second of the senders' own CPU time (CLOCK_THREAD_CPUTIME_ID: the whole send path, \
         the tracer's program included, and nothing of other load on a shared machine); wall-clock rates are in \
         report.json.\n"
    );
    for run in runs.iter().filter(|r| !r.indicative) {
        let m = &run.machine;
        md += &format!(
            "{}: {} ({} CPUs, {:.0} GiB), Linux {}, load average {:.2} before and {} after, {} rounds.\n",
            run.place,
            m.cpu_model,
            m.cpus,
            m.mem_total_kib as f64 / 1048576.0,
            m.kernel,
            m.load_1m,
            run.load_end.map_or("?".into(), |l| format!("{l:.2}")),
            m.rounds
        );
        if !m.other_tracers.is_empty() {
            md += &format!(
                "Other tracers ran during this run and cost every condition: {}.\n",
                m.other_tracers.join(", ")
            );
        }
    }
    for run in runs.iter().filter(|r| r.indicative) {
        md += &format!(
            "{}: Linux {}, {} vCPUs under QEMU TCG (emulated: compare within the row only), {} rounds.\n",
            run.place, run.machine.kernel, run.machine.cpus, run.machine.rounds
        );
    }
    md += "\n**Cost to traffic netfilter does not drop** (new conntrack flows per second)\n\n";
    md += "| where | workload | nothing | bpftrace | ctrace | ctrace vs nothing | eviction probe | ctrace CPU s per M flows | totals exact |\n|---|---|---|---|---|---|---|---|---|\n";
    for run in runs {
        for w in NO_DROP.iter().filter(|w| run.has(w)) {
            let r = row(run, w);
            md += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                place(run),
                describe(w, run.of(w, OFF).first().copied(), run.machine.nf_conntrack_max),
                rate_cell(&r, OFF),
                rate_cell(&r, BPFTRACE),
                rate_cell(&r, CTRACE),
                r.ctrace_vs
                    .get(OFF)
                    .map_or("–".into(), |v| format!("{:+.1} %", (v - 1.0) * 100.0)),
                match (run.mode(), r.eviction_probe) {
                    (Some("kprobe"), Some(true)) => "armed",
                    (Some("kprobe"), _) => "disarmed",
                    _ => "none in this mode",
                },
                r.cpu_per_m.map_or("–".into(), |v| format!("{v:.2}")),
                exact_cell(&r),
            );
        }
    }
    md += "\n**Cost per drop** (packets per second of a sender whose every packet netfilter drops)\n\n";
    md += "| where | workload | nothing | bpftrace | ctrace | ctrace / bpftrace | ns added per drop: bpftrace, ctrace | ctrace CPU s per M drops | ctrace peak RSS | events lost | totals exact |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    for run in runs {
        for w in DROPS.iter().filter(|w| run.has(w)) {
            let r = row(run, w);
            let ns = |c: &str| r.ns_added.get(c).map_or("–".into(), |v| format!("{v:.0}"));
            md += &format!(
                "| {} | {} | {} | {} | {} | {} | {}, {} | {} | {} | {} | {} |\n",
                place(run),
                describe(w, run.of(w, OFF).first().copied(), 0),
                rate_cell(&r, OFF),
                rate_cell(&r, BPFTRACE),
                rate_cell(&r, CTRACE),
                pct(r.ctrace_vs.get(BPFTRACE)),
                ns(BPFTRACE),
                ns(CTRACE),
                r.cpu_per_m.map_or("–".into(), |v| format!("{v:.2}")),
                r.rss_mib.map_or("–".into(), |v| format!("{v:.0} MiB")),
                r.lost,
                exact_cell(&r),
            );
        }
    }
    md += &bpf_table(runs);
    md += "\n**Start-up and shutdown** (launch to attached: ctrace's `mode` event, bpftrace's BEGIN; stop signal to exit)\n\n";
    md += "| where | tracer | launch to attached | signal to exit | runs |\n|---|---|---|---|---|\n";
    for run in runs {
        for c in [CTRACE, BPFTRACE] {
            let t: Vec<_> = run
                .samples
                .iter()
                .filter(|s| s.condition == c)
                .filter_map(|s| s.tracer.as_ref())
                .collect();
            if t.is_empty() {
                continue;
            }
            let cell = |v: Vec<f64>| {
                let max = v.iter().cloned().fold(0.0, f64::max);
                median(v).map_or("–".into(), |m| format!("{m:.3} s (max {max:.3} s)"))
            };
            md += &format!(
                "| {} | {c} | {} | {} | {} |\n",
                place(run),
                cell(t.iter().map(|t| t.attach_s).collect()),
                cell(t.iter().map(|t| t.detach_s).collect()),
                t.len()
            );
        }
    }
    md += "\n**Budgets** (issue 9)\n\n| budget | measured | holds |\n|---|---|---|\n";
    for (budget, measured, holds) in budgets(runs) {
        let holds = match holds {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured, or not to this precision",
        };
        md += &format!("| {budget} | {measured} | {holds} |\n");
    }
    if let Some(p) = runs.iter().find_map(|r| r.machine.bpftrace_program.as_deref()) {
        md += &format!("\nThe bpftrace reference: `bpftrace -e '{p}'`\n");
    }
    md
}

/// BPF program run time per packet of each tracer (`--bpf-stats`), or nothing when it was not recorded.
fn bpf_table(runs: &[Run]) -> String {
    let mut md = String::new();
    for run in runs {
        for w in NO_DROP.iter().chain(&DROPS).filter(|w| run.has(w)) {
            let r = row(run, w);
            let Some(ctrace) = r.bpf_ns.get(CTRACE) else {
                continue;
            };
            if md.is_empty() {
                md += "\n**Kernel side** (BPF program run time per packet from `kernel.bpf_stats_enabled`, which adds \
                       its own clock reads to every run)\n\n";
                md += "| where | workload | bpftrace ns per packet | ctrace ns per packet | share of the packet's CPU \
                       time: bpftrace, ctrace |\n|---|---|---|---|---|\n";
            }
            let percent = |v: Option<f64>| v.map_or("–".into(), |v| format!("{:.2} %", v * 100.0));
            md += &format!(
                "| {} | {} | {} | {ctrace:.0} | {}, {} |\n",
                place(run),
                describe(w, run.of(w, OFF).first().copied(), run.machine.nf_conntrack_max),
                r.bpf_ns.get(BPFTRACE).map_or("–".into(), |v| format!("{v:.0}")),
                percent(r.bpftrace_bpf_share),
                percent(r.ctrace_bpf_share),
            );
        }
    }
    md
}

/// Everything, for machines: the runs' machines and samples, and the budgets.
pub fn json(runs: &[Run], date: &str) -> Value {
    json!({
        "date": date,
        "runs": runs.iter().map(|r| json!({
            "place": r.place,
            "indicative": r.indicative,
            "mode": r.mode(),
            "machine": {
                "kernel": r.machine.kernel,
                "cpus": r.machine.cpus,
                "cpu_model": r.machine.cpu_model,
                "mem_total_kib": r.machine.mem_total_kib,
                "load_1m_before": r.machine.load_1m,
                "load_1m_after": r.load_end,
                "other_tracers": r.machine.other_tracers,
                "nf_conntrack_max": r.machine.nf_conntrack_max,
                "rounds": r.machine.rounds,
                "counts": r.machine.counts,
            },
            "error": r.error,
            "samples": r.samples.len(),
        })).collect::<Vec<_>>(),
        "budgets": budgets(runs).into_iter().map(|(b, m, h)| json!({"budget": b, "measured": m, "holds": h})).collect::<Vec<_>>(),
    })
}
