//! `ctrace run --metrics` scraped by a real Prometheus (Debian's) while drops happen: what Prometheus stored must
//! equal what the DROP rule and the kernel counted.

use ctrace_tests::{
    Ctrace, SysctlGuard, TestNetns,
    prometheus::{Prometheus, free_port, tempdir},
    require_root,
};
use serde_json::Value;

const MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
#[test]
fn prometheus_scrapes_the_exact_drop_counts() {
    require_root();
    let ns = TestNetns::new("metrics").unwrap();
    ns.drop_udp_to(7, "truth").unwrap();
    let port = free_port();
    let target = format!("127.0.0.1:{port}");
    let ctrace = Ctrace::start(&["--netns", &ns.name, "--rate-limit", "0", "--metrics", &target]).unwrap();
    let dir = tempdir("metrics");
    let prometheus = Prometheus::start(&dir, &target);
    assert_eq!(
        prometheus.wait_for("up", 1.0),
        Some(1.0),
        "Prometheus never scraped ctrace"
    );

    let before = ns.counters().unwrap();
    let (_, refused) = ns.udp_flows(0, 40, 7).unwrap();
    let (_, failed) = {
        let _max = SysctlGuard::set(MAX, "256").unwrap();
        ns.udp_flows(100, 556, 9).unwrap()
    };
    let rule = ns.rule_packets("iptables", "filter", "OUTPUT", "truth").unwrap();
    let delta = ns.counters().unwrap().since(&before);
    println!(
        "truth: rule counter {rule} ({refused} sends refused); kernel drop +{}; {failed} table-full sends failed",
        delta.drop
    );
    assert!(
        rule == 40 && delta.drop >= 250,
        "the workload did not drop: rule {rule}, {delta:?}"
    );

    let netns = ns.inode();
    let rule_seen = prometheus.wait_for(
        &format!(r#"sum(ctrace_netns_drops_total{{netns="{netns}",reason="netfilter_rule"}})"#),
        rule as f64,
    );
    let full_seen = prometheus.wait_for(
        &format!(r#"sum(ctrace_netns_drops_total{{netns="{netns}",reason="table_full"}})"#),
        delta.drop as f64,
    );
    let global_full = prometheus.wait_for(r#"sum(ctrace_drops_total{reason="table_full"})"#, delta.drop as f64);
    let kernel = prometheus.wait_for(
        &format!(r#"ctrace_kernel_conntrack_stat_total{{netns="{netns}",stat="drop"}}"#),
        delta.drop as f64,
    );
    let name = prometheus.query(&format!(r#"ctrace_conntrack_entries{{netns="{netns}"}}"#));
    println!(
        "Prometheus: netfilter_rule {rule_seen:?}, table_full {full_seen:?} (all netns {global_full:?}), kernel stat drop \
         {kernel:?}, entries series {name:?}"
    );
    assert_eq!(
        rule_seen,
        Some(rule as f64),
        "netfilter_rule in Prometheus vs the DROP rule's counter"
    );
    assert_eq!(
        full_seen,
        Some(delta.drop as f64),
        "table_full in Prometheus vs the kernel's drop counter"
    );
    assert_eq!(
        global_full,
        Some(delta.drop as f64),
        "the only table_full drops were this netns's"
    );
    assert_eq!(kernel, Some(delta.drop as f64));
    assert_eq!(
        name.first().map(|(m, _)| m["netns_name"].clone()),
        Some(Value::from(ns.name.clone()))
    );
    let lost = prometheus.query("ctrace_events_lost_total");
    assert_eq!(lost.first().map(|(_, v)| *v), Some(0.0));
    drop(prometheus);
    let (_, summary) = ctrace.stop().unwrap();
    assert_eq!(
        summary["drops"]["table_full"], delta.drop,
        "the summary agrees with the metrics"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
