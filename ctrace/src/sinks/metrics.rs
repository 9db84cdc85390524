//! Prometheus metrics: the run's state (the kernel's exact totals per reason and netns, table fill, probes, what
//! was lost) and counts of the records an operator alerts on (module events, sysctl resets and writes), served at
//! `/metrics` by axum in the OpenMetrics or the Prometheus text format (whichever the scraper asks for), encoded
//! by the Prometheus project's Rust client. Labels are bounded: reason, netns (the kernel keeps a per-netns split
//! for a bounded number), module, action, sysctl key, probe; never a flow.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use ctrace_common::Reason;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::Sink;
use crate::report::{Event, Status};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot serve metrics on {addr}: {error}; is another ctrace or exporter using that port? Choose another \
         with --metrics ADDR:PORT"
    )]
    Bind { addr: SocketAddr, error: io::Error },
}

/// What the endpoint shows: the last status and the record counts.
#[derive(Debug, Default)]
struct State {
    status: Option<Status>,
    /// (module, action) → events.
    module_events: BTreeMap<(String, &'static str), u64>,
    sysctl_resets: BTreeMap<String, u64>,
    sysctl_writes: BTreeMap<String, u64>,
}

/// The modules and actions whose series exist from the start (at 0), so that `increase()` sees the first event.
const ACTIONS: [&str; 3] = ["load", "unload", "unload_failed"];

pub struct MetricsSink {
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
    /// Where it is served (the port chosen, when 0 was asked for).
    pub addr: SocketAddr,
}

impl MetricsSink {
    /// Binds `addr` now (a taken port fails before anything is attached) and serves from the current runtime.
    pub async fn bind(addr: SocketAddr) -> Result<MetricsSink, MetricsError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|error| MetricsError::Bind { addr, error })?;
        let addr = listener
            .local_addr()
            .map_err(|error| MetricsError::Bind { addr, error })?;
        let mut state = State::default();
        for action in ACTIONS {
            state.module_events.insert(("nf_conntrack".to_owned(), action), 0);
        }
        let state = Arc::new(Mutex::new(state));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exporter(state.clone())));
        let registry = Arc::new(registry);
        let app = Router::new()
            .route(
                "/metrics",
                get(move |headers: axum::http::HeaderMap| scrape(registry.clone(), headers)),
            )
            .route("/", get(|| async { "ctrace: metrics at /metrics\n" }));
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                log::warn!("the metrics endpoint stopped: {e}");
            }
        });
        Ok(MetricsSink { state, server, addr })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for MetricsSink {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Sink for MetricsSink {
    fn record(&mut self, event: &Event) -> io::Result<()> {
        let mut state = self.state();
        match event {
            Event::Module(m) => {
                let action = ACTIONS.into_iter().find(|a| *a == m.action).unwrap_or("other");
                *state.module_events.entry((m.name.clone(), action)).or_default() += 1;
            }
            Event::SysctlReset(r) => *state.sysctl_resets.entry(r.key.clone()).or_default() += 1,
            Event::SysctlWrite(w) => *state.sysctl_writes.entry(w.key.clone()).or_default() += 1,
            _ => {}
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn wants_status(&self) -> bool {
        true
    }

    fn status(&mut self, status: &Status) {
        self.state().status = Some(status.clone());
    }
}

/// One scrape: the format the scraper prefers.
async fn scrape(registry: Arc<Registry>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let mut body = String::new();
    let (result, content_type) = if openmetrics {
        (
            prometheus_client::encoding::text::encode(&mut body, &registry),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut body, &registry),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    match result {
        Ok(()) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(_) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n",
        )
            .into_response(),
    }
}

#[derive(Debug)]
struct Exporter(Arc<Mutex<State>>);

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ctstat::CounterDelta,
        report::{NetnsStatus, ProbeState},
        summary::Split,
    };

    fn status() -> Status {
        let mut s = Status {
            mode: "tracepoint",
            conntrack_max: Some(256),
            events_lost: 3,
            ..Default::default()
        };
        s.drops.insert(
            Reason::TableFull,
            Split {
                exact: 41,
                uncertain: 0,
            },
        );
        s.drops.insert(Reason::Invalid, Split { exact: 1, uncertain: 2 });
        let mut n = NetnsStatus {
            name: Some("bl\"ue".into()),
            entries: Some(128),
            kernel: Some(CounterDelta {
                drop: 41,
                ..Default::default()
            }),
            ..Default::default()
        };
        n.drops.insert(
            Reason::TableFull,
            Split {
                exact: 41,
                uncertain: 0,
            },
        );
        s.netns.insert(4026532177, n);
        s.probes.push(ProbeState {
            probe: "kfree_skb".into(),
            kind: "tp_btf",
            attached: true,
        });
        s
    }

    fn text(state: State, openmetrics: bool) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exporter(Arc::new(Mutex::new(state)))));
        let mut body = String::new();
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut body, &registry).unwrap();
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut body, &registry).unwrap();
        }
        body
    }

    #[test]
    fn the_state_becomes_series_with_bounded_escaped_labels() {
        let body = text(
            State {
                status: Some(status()),
                ..Default::default()
            },
            true,
        );
        for line in [
            r#"ctrace_drops_total{reason="table_full",certainty="exact"} 41"#,
            r#"ctrace_drops_total{reason="invalid",certainty="uncertain"} 2"#,
            r#"ctrace_drops_total{reason="early_drop",certainty="exact"} 0"#,
            r#"ctrace_netns_drops_total{netns="4026532177",netns_name="bl\"ue",reason="table_full",certainty="exact"} 41"#,
            r#"ctrace_conntrack_fill_ratio{netns="4026532177",netns_name="bl\"ue"} 0.5"#,
            r#"ctrace_kernel_conntrack_stat_total{netns="4026532177",netns_name="bl\"ue",stat="drop"} 41"#,
            r#"ctrace_events_lost_total 3"#,
            r#"ctrace_probe_attached{probe="kfree_skb",kind="tp_btf"} 1"#,
            r#"ctrace_mode_info{mode="tracepoint"} 1"#,
            r#"ctrace_bound_reached{bound="netns_totals"} 0"#,
            r#"ctrace_bound_cost{bound="hooked_netns"} 0"#,
            "# EOF",
        ] {
            assert!(body.lines().any(|l| l == line), "{line} missing in\n{body}");
        }
    }

    #[test]
    fn module_and_sysctl_records_are_counted_and_nf_conntrack_series_start_at_zero() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut sink = MetricsSink::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let reset = crate::report::SysctlResetRecord {
                ts: time::OffsetDateTime::UNIX_EPOCH,
                key: "net.netfilter.nf_conntrack_max".into(),
                netns: None,
                netns_name: None,
                before: "1".into(),
                after: "2".into(),
                default: None,
                persisted_in: None,
                fix: String::new(),
            };
            sink.record(&Event::SysctlReset(reset)).unwrap();
            sink.status(&status());
            let body = http_get(sink.addr).await;
            assert!(
                body.contains(r#"ctrace_sysctl_resets_total{key="net.netfilter.nf_conntrack_max"} 1"#),
                "{body}"
            );
            assert!(
                body.contains(r#"ctrace_module_events_total{module="nf_conntrack",action="unload"} 0"#),
                "{body}"
            );
            assert!(
                !body.contains("# EOF"),
                "Prometheus text unless OpenMetrics is asked for"
            );
        });
    }

    /// A plain HTTP/1.0 GET (the test needs no HTTP client crate).
    async fn http_get(addr: SocketAddr) -> String {
        use std::io::{Read as _, Write as _};
        tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            assert!(
                response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
                "{response}"
            );
            response
        })
        .await
        .unwrap()
    }

    #[test]
    fn a_taken_port_is_one_clear_sentence() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let first = MetricsSink::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let Err(e) = MetricsSink::bind(first.addr).await else {
                panic!("bound twice")
            };
            let text = e.to_string();
            assert!(
                text.contains("Address already in use") || text.contains("in use"),
                "{text}"
            );
            assert!(text.contains("--metrics"), "{text}");
        });
    }
}
