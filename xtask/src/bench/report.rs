//! The benchmark's report: medians over rounds, ratios paired within each round (the conditions of one round ran
//! back to back), the budgets of issue 9, as a markdown table and as JSON.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::samples::{Run, Sample};

pub const OFF: &str = "off";
pub const CTRACE: &str = "ctrace";
pub const BPFTRACE: &str = "bpftrace";

/// Workloads without drops, then the drop floods.
const NO_DROP: [&str; 2] = ["new_flows", "new_flows_full_table"];
const DROPS: [&str; 2] = ["rule_drop", "table_full"];

fn describe(workload: &str, s: Option<&Sample>, max: u64) -> String {
    let threads = s.map_or(1, |s| s.threads);
    let senders = if threads == 1 {
        "1 sender".to_string()
    } else {
        format!("{threads} senders")
    };
    match workload {
        "new_flows" => format!("new flows, empty table ({senders})"),
        "new_flows_full_table" => format!("new flows into a full table ({max}), each evicts one ({senders})"),
        "rule_drop" => format!("iptables DROP rule ({senders})"),
        "table_full" => format!("table_full, nf_conntrack_max lowered ({senders})"),
        other => other.to_string(),
    }
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Half the range, relative to the median: how much the rounds moved.
fn spread(v: &[f64]) -> Option<f64> {
    let m = median(v.to_vec())?;
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    (m > 0.0 && v.len() > 1).then(|| (hi - lo) / 2.0 / m)
}

/// Per-round pairs (a, b) of two conditions' samples of one workload.
fn pairs<'a>(run: &'a Run, workload: &str, a: &str, b: &str) -> Vec<(&'a Sample, &'a Sample)> {
    let bs = run.of(workload, b);
    run.of(workload, a)
        .into_iter()
        .filter_map(|x| Some((x, *bs.iter().find(|y| y.round == x.round)?)))
        .collect()
}

/// The numbers of one workload in one run.
#[derive(Default)]
struct Row {
    rate: BTreeMap<&'static str, (f64, Option<f64>)>,
    /// Median of per-round rate(ctrace) / rate(x).
    ctrace_vs: BTreeMap<&'static str, f64>,
    /// Median of per-round ns per packet added over nothing.
    ns_added: BTreeMap<&'static str, f64>,
    cpu_per_m: Option<f64>,
    rss_mib: Option<f64>,
    lost: u64,
    reported: u64,
    exact: BTreeMap<&'static str, (usize, usize)>,
    eviction_probe: Option<bool>,
}

fn row(run: &Run, workload: &str) -> Row {
    let mut r = Row::default();
    for c in [OFF, BPFTRACE, CTRACE] {
        let rates: Vec<f64> = run.of(workload, c).iter().map(|s| s.speed()).collect();
        if let Some(m) = median(rates.clone()) {
            r.rate.insert(c, (m, spread(&rates)));
        }
        let tracers: Vec<_> = run
            .of(workload, c)
            .into_iter()
            .filter_map(|s| s.tracer.as_ref())
            .collect();
        if !tracers.is_empty() {
            let exact = tracers.iter().filter(|t| t.mismatch.is_none()).count();
            r.exact.insert(c, (exact, tracers.len()));
        }
    }
    for c in [OFF, BPFTRACE] {
        let p = pairs(run, workload, CTRACE, c);
        if let Some(m) = median(p.iter().map(|(x, y)| x.speed() / y.speed()).collect()) {
            r.ctrace_vs.insert(c, m);
        }
    }
    for c in [BPFTRACE, CTRACE] {
        let p = pairs(run, workload, c, OFF);
        if let Some(m) = median(p.iter().map(|(x, y)| 1e9 / x.speed() - 1e9 / y.speed()).collect()) {
            r.ns_added.insert(c, m);
        }
    }
    let ctrace: Vec<&Sample> = run.of(workload, CTRACE);
    r.cpu_per_m = median(
        ctrace
            .iter()
            .filter_map(|s| {
                // Per drop where netfilter drops, per packet where it does not.
                let n = if DROPS.contains(&workload) {
                    s.truth.netfilter_drops()
                } else {
                    s.packets
                };
                Some(s.tracer.as_ref()?.cpu_s / n as f64 * 1e6)
            })
            .collect(),
    );
    r.rss_mib = ctrace
        .iter()
        .filter_map(|s| s.tracer.as_ref())
        .map(|t| t.peak_rss_kib as f64 / 1024.0)
        .reduce(f64::max);
    for s in &ctrace {
        if let Some(t) = s.tracer.as_ref().and_then(|t| t.ctrace.as_ref()) {
            r.lost += t.lost;
            r.reported += t.reported;
        }
    }
    let probes: Vec<bool> = ctrace
        .iter()
        .filter_map(|s| s.tracer.as_ref()?.eviction_probe)
        .collect();
    r.eviction_probe = (!probes.is_empty()).then(|| probes.iter().all(|&p| p));
    r
}

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

fn place(run: &Run) -> String {
    let mode = run.mode().unwrap_or("?");
    if run.indicative {
        format!("{} ({mode} mode, indicative)", run.place)
    } else {
        format!("{} ({mode} mode)", run.place)
    }
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
            None => "not measured",
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
            let per_packet = |c: &str| {
                median(
                    run.of(w, c)
                        .iter()
                        .filter_map(|s| Some(s.tracer.as_ref()?.bpf?.run_time_ns as f64 / s.packets as f64))
                        .collect(),
                )
            };
            let runs_per_packet = median(
                run.of(w, CTRACE)
                    .iter()
                    .filter_map(|s| Some(s.tracer.as_ref()?.bpf?.run_cnt as f64 / s.packets as f64))
                    .collect(),
            );
            let (Some(ctrace), bpftrace) = (per_packet(CTRACE), per_packet(BPFTRACE)) else {
                continue;
            };
            if md.is_empty() {
                md += "\n**Kernel side** (BPF program run time per packet from `kernel.bpf_stats_enabled`, which adds \
                       its own clock reads to every run)\n\n";
                md += "| where | workload | bpftrace ns per packet | ctrace ns per packet | ctrace program runs per packet |\n|---|---|---|---|---|\n";
            }
            md += &format!(
                "| {} | {} | {} | {ctrace:.0} | {} |\n",
                place(run),
                describe(w, run.of(w, OFF).first().copied(), run.machine.nf_conntrack_max),
                bpftrace.map_or("–".into(), |v| format!("{v:.0}")),
                runs_per_packet.map_or("–".into(), |v| format!("{v:.2}")),
            );
        }
    }
    md
}

/// (budget, what was measured, whether it holds: None when this run did not measure it).
pub fn budgets(runs: &[Run]) -> Vec<(String, String, Option<bool>)> {
    let mut out = Vec::new();
    let mut loss = Vec::new();
    for run in runs {
        for w in NO_DROP.iter().filter(|w| run.has(w)) {
            if let Some(v) = row(run, w).ctrace_vs.get(OFF) {
                loss.push((format!("{w}, {}", place(run)), 1.0 - v));
            }
        }
    }
    out.push((
        "≤ 1 % loss on traffic netfilter does not drop, every mode".into(),
        loss.iter()
            .map(|(w, l)| format!("{w}: {:.1} %", l * 100.0))
            .collect::<Vec<_>>()
            .join("; "),
        (!loss.is_empty()).then(|| loss.iter().all(|(_, l)| *l <= 0.01)),
    ));
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
    let times = |f: fn(&super::samples::Tracer) -> f64| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_spreads() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        assert_eq!(spread(&[90.0, 100.0, 110.0]), Some(0.1));
    }

    #[test]
    fn ratios_pair_rounds() {
        let mut run = Run::new("host", false);
        for (round, off, on) in [(0, 100.0, 50.0), (1, 200.0, 100.0), (2, 150.0, 60.0)] {
            for (c, rate) in [(OFF, off), (CTRACE, on)] {
                run.feed(
                    &json!({"sample": {"workload": "rule_drop", "condition": c, "round": round, "threads": 1,
                        "packets": 1000, "rate": rate / 3.0, "cpu_rate": rate, "truth": {"rule_drops": 1000, "drop": 0, "early_drop": 0, "insert_failed": 0},
                        "tracer": null}})
                    .to_string(),
                )
                .unwrap();
            }
        }
        let r = row(&run, "rule_drop");
        // Per round (of the CPU-time rates): 0.5, 0.5, 0.4 -> 0.5 (the medians of the rates would give 100/150).
        assert_eq!(r.ctrace_vs[OFF], 0.5);
        // 1e9/50 - 1e9/100 = 1e7, 1e9/100 - 1e9/200 = 5e6, 1e9/60 - 1e9/150 = 1e7
        assert_eq!(r.ns_added[CTRACE].round(), 1e7);
    }
}
