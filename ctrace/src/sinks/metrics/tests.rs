//! The exporter against a status and record counts made up here: series, labels, escaping, both formats.

use super::*;
use crate::{
    ctstat::CounterDelta,
    report::{NetnsStatus, ProbeState},
    summary::Split,
};
use ctrace_common::Reason;

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
