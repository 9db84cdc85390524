//! A netns flood from an unprivileged user namespace: uid 65534, without a single capability, creates its own user
//! namespace and in it more network namespaces than ctrace's kernel-side per-netns totals can hold, each dropping
//! datagrams by a rule it set there itself (`ctrace_tests::flood`). ctrace's global totals must stay exact against
//! truth it did not compute (the sends the kernel refused, the rules' own counters), and it must say which bound
//! was reached: a notice while it runs, and the JSON summary's `bounds`.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use ctrace::bounds::Bound;
use ctrace_tests::{Ctrace, flood::FloodReport, require_root};

const NOBODY: u32 = 65534;
const PORT: u16 = 7;
/// More netns than NETNS_TOTALS has (netns, reason) pairs: each flood netns makes one pair.
const NETNS: u32 = Bound::NetnsTotals.limit() as u32 + 104;
const FLOOD_TIMEOUT: Duration = Duration::from_secs(600);

/// The user namespace limits of this host, for the failure message when the flood cannot start.
fn userns_settings() -> String {
    let read = |p: &str| std::fs::read_to_string(p).map_or_else(|_| "absent".to_owned(), |v| v.trim().to_owned());
    format!(
        "user.max_user_namespaces={} kernel.unprivileged_userns_clone={}",
        read("/proc/sys/user/max_user_namespaces"),
        read("/proc/sys/kernel/unprivileged_userns_clone")
    )
}

#[test]
fn unprivileged_netns_flood_keeps_totals_exact_and_reports_the_bound() {
    require_root();
    let ruleset = std::env::temp_dir().join(format!("ctrace-flood-{}.nft", std::process::id()));
    std::fs::write(&ruleset, ctrace_tests::flood::ruleset(PORT)).unwrap();
    let ctrace = Ctrace::start(&["--rate-limit", "0", "--proto", "udp", "--port", &PORT.to_string()]).unwrap();

    let started = std::time::Instant::now();
    let mut flood = Command::new(env!("CARGO_BIN_EXE_ctrace-testkit"))
        .args([
            "netns-flood",
            "--uid",
            &NOBODY.to_string(),
            "--count",
            &NETNS.to_string(),
        ])
        .args(["--port", &PORT.to_string(), "--sends", "2", "--ruleset"])
        .arg(&ruleset)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = flood.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(FLOOD_TIMEOUT).unwrap_or_default();
    let elapsed = started.elapsed();
    let report = FloodReport::parse(line.trim()).unwrap_or_else(|e| {
        let _ = flood.kill();
        panic!("the flood reported {line:?} ({e}); {}", userns_settings())
    });
    // The netns are still alive (the flood holds them) while ctrace stops and reads its maps.
    let stopped = ctrace.stop();
    drop(flood.stdin.take());
    let _ = flood.wait();
    let _ = std::fs::remove_file(&ruleset);
    let (events, summary) = stopped.unwrap();

    let total = summary["total"].as_u64().unwrap();
    let split: u64 = summary["by_netns"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["drops"]["netfilter_rule"].as_u64())
        .sum();
    let bound = &summary["bounds"]["netns_totals"];
    let notice_at = events.iter().position(|v| {
        v["event"] == "notice"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("bound reached (netns_totals)"))
    });
    let summary_at = events.iter().position(|v| v["event"] == "summary");
    let records = events.iter().filter(|v| v["event"] == "drop").count() as u64;
    println!(
        "case netns-flood: uid {} (CapEff {:x}) made {} netns in {elapsed:.1?}; truth sent {} refused {} rule counters \
         {}; ctrace netfilter_rule {} (uncertain {}), total {total}, {split} split by netns over {} netns, bound \
         {bound}, {records} drop records, lost {}, netns_lookups {}",
        report.uid,
        report.cap_eff,
        report.netns,
        report.sent,
        report.refused,
        report.counted,
        summary["drops"]["netfilter_rule"],
        summary["drops_uncertain"]["netfilter_rule"],
        summary["by_netns"].as_array().unwrap().len(),
        summary["lost"],
        summary["bounds"]["netns_lookups"],
    );

    assert_eq!((report.uid, report.cap_eff), (NOBODY, 0), "the flood ran unprivileged");
    assert_eq!(report.netns, u64::from(NETNS));
    assert_eq!(report.refused, report.sent, "every datagram met the DROP rule");
    assert_eq!(report.counted, report.sent, "the rules counted every datagram");
    assert_eq!(
        summary["drops"]["netfilter_rule"], report.counted,
        "the global total is exact"
    );
    assert_eq!(total, report.counted, "nothing else was counted");
    assert_eq!(
        summary["drops_uncertain"]["netfilter_rule"], 0,
        "NOTRACKed drops are exact"
    );
    assert!(
        split < total,
        "more netns than the per-netns totals hold: some drops are not split"
    );
    assert_eq!(bound["limit"], Bound::NetnsTotals.limit());
    assert_eq!(
        bound["reached"], true,
        "the summary says the bound was reached: {bound}"
    );
    assert_eq!(
        bound["count"],
        total - split,
        "it counts exactly the drops missing from the split"
    );
    assert!(
        notice_at.is_some() && notice_at < summary_at,
        "a notice said so while ctrace ran"
    );
    assert_eq!(summary["lost"], 0);
    assert_eq!(records, total, "one drop record per drop");
    assert_eq!(
        summary["bounds"]["netns_lookups"]["reached"], true,
        "drops from unknown netns came faster than one /proc rescan a second, and were not all looked up"
    );
}
