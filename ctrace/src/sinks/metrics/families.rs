//! The metric families: the endpoint's state encoded at each scrape, as constant counters and gauges (the state is
//! kept by the sink; nothing here counts).

use std::sync::{Arc, Mutex};

use ctrace_common::Reason;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::State;
use crate::report::Status;

#[derive(Debug)]
pub(super) struct Exporter(pub(super) Arc<Mutex<State>>);

/// A counter or gauge value.
enum Value {
    Counter(u64),
    Gauge(i64),
    Ratio(f64),
}

/// One metric family: its series, all of one type.
fn family<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (L, Value)>,
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        let metric = family.encode_family(&labels)?;
        match value {
            Value::Counter(v) => ConstCounter::new(v).encode(metric)?,
            Value::Gauge(v) => ConstGauge::new(v).encode(metric)?,
            Value::Ratio(v) => ConstGauge::new(v).encode(metric)?,
        }
    }
    Ok(())
}

type Labels = Vec<(&'static str, String)>;

fn certainty(uncertain: bool) -> &'static str {
    if uncertain { "uncertain" } else { "exact" }
}

impl Collector for Exporter {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        family(
            &mut enc,
            "ctrace_build_info",
            "ctrace's version (always 1)",
            MetricType::Gauge,
            [(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], Value::Gauge(1))],
        )?;
        family(
            &mut enc,
            "ctrace_module_events",
            "Module loads, unloads and failed unloads, by module and action",
            MetricType::Counter,
            state.module_events.iter().map(|((m, a), n)| {
                (
                    vec![("module", m.clone()), ("action", a.to_string())],
                    Value::Counter(*n),
                )
            }),
        )?;
        family(
            &mut enc,
            "ctrace_sysctl_resets",
            "Conntrack settings an nf_conntrack reload put back to another value, by key",
            MetricType::Counter,
            state
                .sysctl_resets
                .iter()
                .map(|(k, n)| (vec![("key", k.clone())], Value::Counter(*n))),
        )?;
        family(
            &mut enc,
            "ctrace_sysctl_writes",
            "Writes to conntrack sysctls, by key",
            MetricType::Counter,
            state
                .sysctl_writes
                .iter()
                .map(|(k, n)| (vec![("key", k.clone())], Value::Counter(*n))),
        )?;
        let Some(s) = &state.status else { return Ok(()) };
        encode_status(&mut enc, s)
    }
}

fn encode_status(enc: &mut DescriptorEncoder, s: &Status) -> Result<(), std::fmt::Error> {
    family(
        enc,
        "ctrace_mode_info",
        "The probe mode ctrace runs in (always 1)",
        MetricType::Gauge,
        [(vec![("mode", s.mode.to_owned())], Value::Gauge(1))],
    )?;
    // Every reason and certainty from the start, at 0: alerts on increase() see the first drop.
    let mut drops: Vec<(Labels, Value)> = vec![];
    for r in Reason::ALL {
        let split = s.drops.get(&r).copied().unwrap_or_default();
        for (uncertain, n) in [(false, split.exact), (true, split.uncertain)] {
            drops.push((
                vec![
                    ("reason", r.name().to_owned()),
                    ("certainty", certainty(uncertain).to_owned()),
                ],
                Value::Counter(n),
            ));
        }
    }
    family(
        enc,
        "ctrace_drops",
        "Packets dropped, by reason and how certain the reason is: exact totals counted in the kernel (early_drop: \
         entries evicted, from the kernel's counters)",
        MetricType::Counter,
        drops,
    )?;
    let netns_labels = |netns: u32, name: &Option<String>| -> Labels {
        vec![
            ("netns", netns.to_string()),
            ("netns_name", name.clone().unwrap_or_default()),
        ]
    };
    let mut per_netns: Vec<(Labels, Value)> = vec![];
    for (netns, n) in &s.netns {
        for (r, split) in &n.drops {
            for (uncertain, count) in [(false, split.exact), (true, split.uncertain)] {
                if count > 0 || !uncertain {
                    let mut labels = netns_labels(*netns, &n.name);
                    labels.push(("reason", r.name().to_owned()));
                    labels.push(("certainty", certainty(uncertain).to_owned()));
                    per_netns.push((labels, Value::Counter(count)));
                }
            }
        }
    }
    family(
        enc,
        "ctrace_netns_drops",
        "Packets dropped per network namespace, by reason and certainty (the kernel keeps this split for a bounded \
         number of netns; ctrace_netns_split_lost counts the rest)",
        MetricType::Counter,
        per_netns,
    )?;
    family(
        enc,
        "ctrace_netns_split_lost",
        "Drops in ctrace_drops whose network namespace the kernel could not record (more netns than its bound)",
        MetricType::Counter,
        [(Labels::new(), Value::Counter(s.netns_split_lost))],
    )?;
    let mut kernel: Vec<(Labels, Value)> = vec![];
    let mut entries: Vec<(Labels, Value)> = vec![];
    let mut fill: Vec<(Labels, Value)> = vec![];
    for (netns, n) in &s.netns {
        if let Some(k) = n.kernel {
            for (counter, v) in [
                ("drop", k.drop),
                ("early_drop", k.early_drop),
                ("insert_failed", k.insert_failed),
                ("invalid", k.invalid),
            ] {
                let mut labels = netns_labels(*netns, &n.name);
                labels.push(("stat", counter.to_owned()));
                kernel.push((labels, Value::Counter(v)));
            }
        }
        if let Some(e) = n.entries {
            entries.push((netns_labels(*netns, &n.name), Value::Gauge(e as i64)));
            if let Some(max) = s.conntrack_max.filter(|m| *m > 0) {
                fill.push((netns_labels(*netns, &n.name), Value::Ratio(e as f64 / max as f64)));
            }
        }
    }
    family(
        enc,
        "ctrace_kernel_conntrack_stat",
        "The kernel's own conntrack counters (/proc/net/stat/nf_conntrack) per network namespace: increases since \
         ctrace started, kept across nf_conntrack reloads",
        MetricType::Counter,
        kernel,
    )?;
    family(
        enc,
        "ctrace_conntrack_entries",
        "Entries in a network namespace's conntrack table",
        MetricType::Gauge,
        entries,
    )?;
    family(
        enc,
        "ctrace_conntrack_max",
        "net.netfilter.nf_conntrack_max: the limit every network namespace's table is checked against",
        MetricType::Gauge,
        s.conntrack_max.map(|m| (Labels::new(), Value::Gauge(m as i64))),
    )?;
    family(
        enc,
        "ctrace_conntrack_fill_ratio",
        "Entries / nf_conntrack_max per network namespace: new flows are dropped (table_full) at 1",
        MetricType::Gauge,
        fill,
    )?;
    family(
        enc,
        "ctrace_events_lost",
        "Drop records that did not fit in the ring buffer (the drop totals stay exact)",
        MetricType::Counter,
        [(Labels::new(), Value::Counter(s.events_lost))],
    )?;
    let a = &s.attribution;
    family(
        enc,
        "ctrace_attribution_fallbacks",
        "Drops whose reason was decided with less evidence: no counter baseline, a kprobe verdict the counters \
         contradicted, a baseline restarted",
        MetricType::Counter,
        [
            ("no_baseline", a.no_baseline),
            ("probe_disagreement", a.probe_disagreements),
            ("baseline_reset", a.baseline_resets),
        ]
        .map(|(kind, n)| (vec![("kind", kind.to_owned())], Value::Counter(n))),
    )?;
    family(
        enc,
        "ctrace_conntrack_hook_netns",
        "Network namespaces the conntrack hook was armed in (it makes ct-less drops exact amid invalid noise)",
        MetricType::Gauge,
        [(Labels::new(), Value::Gauge(a.hooked_netns as i64))],
    )?;
    family(
        enc,
        "ctrace_module_requests_unprivileged",
        "modprobe/rmmod runs and delete_module calls of callers without CAP_SYS_MODULE: ignored, no module event",
        MetricType::Counter,
        [(Labels::new(), Value::Counter(s.module_requests_unprivileged))],
    )?;
    let bounds = || crate::bounds::Bound::ALL.into_iter().map(|b| (b, s.bounds.get(b)));
    family(
        enc,
        "ctrace_bound_reached",
        "Whether a bound on per-netns state was reached (1): global totals stay exact, what it no longer splits, \
         reads or names is in the README's \"Bounds on per-netns state\"",
        MetricType::Gauge,
        bounds().map(|(b, st)| (vec![("bound", b.name().to_owned())], Value::Gauge(st.reached.into()))),
    )?;
    family(
        enc,
        "ctrace_bound_cost",
        "What each bound cost so far (per bound: drops not split by netns, baselines evicted, netns left out, ...)",
        MetricType::Gauge,
        bounds().map(|(b, st)| (vec![("bound", b.name().to_owned())], Value::Gauge(st.count as i64))),
    )?;
    family(
        enc,
        "ctrace_probe_attached",
        "Whether each kernel probe is attached now (1) or not (0: a feature is blind, e.g. nf_conntrack unloaded)",
        MetricType::Gauge,
        s.probes.iter().map(|p| {
            (
                vec![("probe", p.probe.clone()), ("kind", p.kind.to_owned())],
                Value::Gauge(p.attached.into()),
            )
        }),
    )?;
    Ok(())
}
