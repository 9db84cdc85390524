//! The numbers of one run: medians over rounds, spreads, and ratios paired within each round (the conditions of
//! one round ran back to back).

use std::collections::BTreeMap;

use super::samples::{Run, Sample};

pub const OFF: &str = "off";
pub const CTRACE: &str = "ctrace";
pub const BPFTRACE: &str = "bpftrace";

/// Workloads without drops, then the drop floods.
pub const NO_DROP: [&str; 2] = ["new_flows", "new_flows_full_table"];
pub const DROPS: [&str; 2] = ["rule_drop", "table_full"];

pub fn describe(workload: &str, s: Option<&Sample>, max: u64) -> String {
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
pub fn spread(v: &[f64]) -> Option<f64> {
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
pub struct Row {
    pub rate: BTreeMap<&'static str, (f64, Option<f64>)>,
    /// Median of per-round rate(ctrace) / rate(x).
    pub ctrace_vs: BTreeMap<&'static str, f64>,
    /// Half the range of those per-round ratios: how far one round's comparison can be off.
    pub ctrace_vs_spread: BTreeMap<&'static str, f64>,
    /// Median of per-round ns per packet added over nothing.
    pub ns_added: BTreeMap<&'static str, f64>,
    pub cpu_per_m: Option<f64>,
    pub rss_mib: Option<f64>,
    pub lost: u64,
    pub reported: u64,
    pub exact: BTreeMap<&'static str, (usize, usize)>,
    pub eviction_probe: Option<bool>,
    /// Median run time of a tracer's BPF programs per packet (with `--bpf-stats`).
    pub bpf_ns: BTreeMap<&'static str, f64>,
    /// Median share of the senders' CPU time per packet that ctrace's programs took (with `--bpf-stats`): what
    /// ctrace costs the traffic, measured with a precision the rates do not have.
    pub ctrace_bpf_share: Option<f64>,
    /// The same share for the bpftrace one-liner's program. On packets that are not netfilter drops it loads one
    /// field and compares it, so its time is the floor that the statistics' own clock reads put under every
    /// program's: ctrace's share above it is what ctrace's program itself costs.
    pub bpftrace_bpf_share: Option<f64>,
}

pub fn row(run: &Run, workload: &str) -> Row {
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
        let ratios: Vec<f64> = pairs(run, workload, CTRACE, c)
            .iter()
            .map(|(x, y)| x.speed() / y.speed())
            .collect();
        if let Some(m) = median(ratios.clone()) {
            r.ctrace_vs.insert(c, m);
        }
        if ratios.len() > 1 {
            let (lo, hi) = ratios
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            r.ctrace_vs_spread.insert(c, (hi - lo) / 2.0);
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
    for c in [BPFTRACE, CTRACE] {
        let ns = run
            .of(workload, c)
            .iter()
            .filter_map(|s| Some(s.tracer.as_ref()?.bpf?.run_time_ns as f64 / s.packets as f64))
            .collect();
        if let Some(m) = median(ns) {
            r.bpf_ns.insert(c, m);
        }
    }
    let share = |c: &str| {
        median(
            run.of(workload, c)
                .iter()
                .filter(|s| s.cpu_rate > 0.0)
                .filter_map(|s| Some(s.tracer.as_ref()?.bpf?.run_time_ns as f64 / s.packets as f64 * s.cpu_rate / 1e9))
                .collect(),
        )
    };
    r.ctrace_bpf_share = share(CTRACE);
    r.bpftrace_bpf_share = share(BPFTRACE);
    r
}

pub fn place(run: &Run) -> String {
    let mode = run.mode().unwrap_or("?");
    if run.indicative {
        format!("{} ({mode} mode, indicative)", run.place)
    } else {
        format!("{} ({mode} mode)", run.place)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
