//! The session's state driven by synthetic kernel records: rate limiting and aggregates, listed and counted
//! evictions, garbage.

use ctrace_common::{Reason, flags};
use serde_json::Value;

use super::state::Session;
use crate::{
    event::tests::{raw, record_bytes},
    kernel_counters::tests::stats,
    netns::Registry,
    reload::ReloadWatch,
    sinks::{JsonSink, Sinks, tests::Buf},
};

fn session(rate_limit: u64) -> (Session, Buf) {
    let buf = Buf::default();
    let sinks = Sinks::new(vec![Box::new(JsonSink::new(buf.clone()))]);
    let s = Session::new(
        sinks,
        Registry::default(),
        None,
        true,
        rate_limit,
        ReloadWatch::default(),
    );
    (s, buf)
}

fn records(buf: &Buf) -> Vec<Value> {
    buf.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn drops_print_until_the_rate_limit_then_fold_into_aggregates() {
    let (mut s, buf) = session(3);
    for port in 0..10 {
        let mut ev = raw();
        ev.event.dport = port;
        s.handle_record(&record_bytes(&ev));
    }
    s.flush_aggregates();
    s.sinks.flush();
    let r = records(&buf);
    let packets: Vec<&Value> = r
        .iter()
        .filter(|v| v["event"] == "drop" && v.get("aggregated").is_none())
        .collect();
    assert_eq!(packets.len(), 3);
    assert_eq!(packets[0]["reason"], "table_full");
    assert_eq!(packets[0]["comm"], "py?thon", "kernel strings are sanitised");
    assert!(
        r.iter()
            .any(|v| v["event"] == "notice" && v["message"].as_str().unwrap().starts_with("more than 3 drops"))
    );
    let agg: Vec<&Value> = r.iter().filter(|v| v["aggregated"] == true).collect();
    assert_eq!(agg.len(), 1);
    assert_eq!(agg[0]["count"], 7);
    assert_eq!(agg[0]["dports"], serde_json::json!([3, 4, 5, 6, 7, 8, 9]));
    let top = s.tally.top_dports();
    assert_eq!(
        top.iter().map(|(_, c)| c).sum::<u64>(),
        10,
        "every drop is tallied, printed or not"
    );
}

#[test]
fn listed_evictions_and_counted_remainders_add_up_to_the_kernel_counter() {
    let (mut s, buf) = session(0);
    let netns = raw().event.netns;
    s.counters.seed(netns, stats(90, 10));
    let mut ev = raw();
    ev.event.reason = Reason::EarlyDrop as u8;
    ev.event.flags |= flags::EVICTED;
    for _ in 0..2 {
        s.handle_record(&record_bytes(&ev));
    }
    s.counters.update(netns, stats(100, 15));
    s.report_counted_evictions();
    s.sinks.flush();
    let r = records(&buf);
    let listed = r.iter().filter(|v| v["evicted"] == true).count() as u64;
    let counted: u64 = r
        .iter()
        .filter(|v| v["source"] == "counters")
        .map(|v| v["count"].as_u64().unwrap())
        .sum();
    assert_eq!((listed, counted), (2, 3));
    assert!(
        s.tally.top_flows().is_empty(),
        "evicted entries are not dropped packets"
    );
}

#[test]
fn garbage_records_are_skipped() {
    let (mut s, buf) = session(0);
    s.handle_record(&[1, 2, 3]);
    let mut ev = raw();
    ev.event.reason = 99;
    s.handle_record(&record_bytes(&ev));
    s.sinks.flush();
    assert!(buf.text().is_empty());
}
