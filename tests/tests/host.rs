//! Tracepoint mode on the host kernel: ctrace's totals against the kernel's own counters.

use std::collections::HashSet;

use ctrace_tests::{Ctrace, SysctlGuard, TestNetns, events::drops, require_root};
use serde_json::Value;

const MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// Overflows a throwaway netns's table: table_full must equal the kernel's `drop` delta and
/// early_drop its `early_drop` delta; every reported flow must be one this test sent.
#[test]
fn overflow_totals_equal_kernel_counters() {
    require_root();
    let ns = TestNetns::new("full").unwrap();
    let ctrace = Ctrace::start(&["--netns", &ns.name, "--rate-limit", "0"]).unwrap();
    let before = ns.counters().unwrap();

    // table_full: the global limit is lowered for a moment (restored even if this test panics).
    let (sent_full, failed) = {
        let _max = SysctlGuard::set(MAX, "256").unwrap();
        ns.udp_flows(0, 556, 9).unwrap()
    };
    assert!(failed >= 250, "only {failed} sends failed with the table full");
    // early_drop: more one-packet flows than the (restored, default) limit, no global change.
    let max: u32 = std::fs::read_to_string(MAX).unwrap().trim().parse().unwrap();
    let (_, _) = ns.udp_flows(556, max + max / 8, 9).unwrap();

    let (events, summary) = ctrace.stop().unwrap();
    let delta = ns.counters().unwrap().since(&before);
    println!("kernel deltas {delta:?}; summary {summary}");

    assert!(
        delta.drop > 0 && delta.early_drop > 0,
        "the kernel saw no drops: {delta:?}"
    );
    assert_eq!(summary["drops"]["table_full"], delta.drop, "table_full vs kernel drop");
    assert_eq!(
        summary["drops"]["early_drop"], delta.early_drop,
        "early_drop vs kernel early_drop"
    );
    assert_eq!(summary["drops"]["netfilter_rule"], 0);
    assert_eq!(summary["lost"], 0);

    let sent: HashSet<String> = sent_full.iter().map(|a| format!("{}:{}", a.ip(), a.port())).collect();
    let reported: Vec<&Value> = drops(&events, "table_full").collect();
    assert_eq!(reported.len() as u64, delta.drop, "one event per table_full drop");
    for v in reported {
        let dst = format!("{}:{}", v["dst"].as_str().unwrap(), v["dport"]);
        assert!(sent.contains(&dst), "reported flow {dst} was not sent by this test");
        assert_eq!(v["proto"], "udp");
        assert_eq!(v["netns"], ns.inode());
    }
    let early: u64 = drops(&events, "early_drop").map(|v| v["count"].as_u64().unwrap()).sum();
    assert_eq!(early, delta.early_drop);
}

/// A DROP rule in one netns is `netfilter_rule`, never a conntrack reason, while conntrack drops
/// in another netns are traced at the same time.
#[test]
fn ruleset_drops_are_not_conntrack_drops() {
    require_root();
    let ruled = TestNetns::new("rule").unwrap();
    ruled
        .exec(&[
            "iptables", "-w", "-I", "OUTPUT", "-p", "udp", "--dport", "7", "-j", "DROP",
        ])
        .unwrap();
    let ctrace = Ctrace::start(&["--rate-limit", "0", "--proto", "udp", "--port", "7"]).unwrap();
    let before = ruled.counters().unwrap();
    let (_, failed) = ruled.udp_flows(0, 40, 7).unwrap();
    assert_eq!(failed, 40, "every send should hit the DROP rule");
    let (events, summary) = ctrace.stop().unwrap();
    let delta = ruled.counters().unwrap().since(&before);
    println!("kernel deltas {delta:?}; summary {summary}");

    assert_eq!(delta.drop, 0, "conntrack itself dropped nothing");
    let ours: Vec<&Value> = drops(&events, "netfilter_rule")
        .filter(|v| v["netns"] == ruled.inode())
        .collect();
    assert_eq!(ours.len(), 40);
    for v in &ours {
        assert_eq!(v["dport"], 7);
    }
    for reason in ["table_full", "insert_failed", "invalid"] {
        assert_eq!(
            drops(&events, reason).filter(|v| v["netns"] == ruled.inode()).count(),
            0,
            "{reason} reported for a ruleset drop"
        );
    }
}

/// A write to a conntrack sysctl is reported with the writing process and its netns (cgroup/sysctl program).
#[test]
fn sysctl_writes_name_the_writer() {
    require_root();
    const KEY: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close";
    let ctrace = Ctrace::start(&["--rate-limit", "0"]).unwrap();
    let comm = std::fs::read_to_string("/proc/thread-self/comm")
        .unwrap()
        .trim()
        .to_owned();
    let old = std::fs::read_to_string(KEY).unwrap().trim().to_owned();
    let new = if old == "11" { "12" } else { "11" };
    {
        // Restored when the guard drops: a second write, also reported.
        let _g = SysctlGuard::set(KEY, new).unwrap();
    }
    // The same key written inside another netns changes only that netns: the write must say which.
    let ns = TestNetns::new("sysctlw").unwrap();
    ns.in_netns(move || Ok(std::fs::write(KEY, "13")?)).unwrap();
    let (events, _) = ctrace.stop().unwrap();
    use std::os::unix::fs::MetadataExt as _;
    let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    let in_ns: Vec<&Value> = events
        .iter()
        .filter(|v| v["event"] == "sysctl_write" && v["netns"] == ns.inode())
        .collect();
    assert_eq!(in_ns.len(), 1, "the write inside the netns names it: {in_ns:?}");
    assert_eq!(
        (in_ns[0]["new"].as_str(), in_ns[0]["netns_name"].as_str()),
        (Some("13"), Some(ns.name.as_str()))
    );
    let writes: Vec<&Value> = events
        .iter()
        .filter(|v| {
            v["event"] == "sysctl_write"
                && v["key"] == "net.netfilter.nf_conntrack_tcp_timeout_close"
                && v["netns"] != ns.inode()
        })
        .collect();
    assert_eq!(writes.len(), 2, "both writes reported: {writes:?}");
    assert_eq!(
        (writes[0]["old"].as_str(), writes[0]["new"].as_str()),
        (Some(old.as_str()), Some(new))
    );
    assert_eq!(
        (writes[1]["old"].as_str(), writes[1]["new"].as_str()),
        (Some(new), Some(old.as_str()))
    );
    for w in writes {
        assert_eq!(w["netns"], own, "written in this process's netns: {w}");
        assert_eq!(w["comm"], comm.as_str());
        assert_eq!(w["pid"], std::process::id());
        assert_eq!(w["uid"], 0);
    }
}

/// `ctrace run --json | head -1`: once the reader is gone, ctrace detaches and exits 0 by itself, even on a
/// quiet host where it has nothing more to write.
#[test]
fn a_closed_pipe_ends_the_run() {
    use std::io::{BufRead as _, BufReader};
    require_root();
    let mut child = std::process::Command::new(ctrace_tests::ctrace_bin())
        .args(["run", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    {
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        reader.read_line(&mut first).unwrap();
    } // the reader is dropped: the pipe's read end is closed
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("ctrace still runs 10 s after its stdout was closed");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(first.contains("\"event\":\"mode\""), "{first}");
    assert!(status.success(), "ctrace exited with {status}");
}
