//! Netns that come and go by the thousand while drops happen, as on a busy container host: each new netns
//! may reuse the inode number of a dead one and starts its counters at zero. Every netns drops 3 tracked
//! datagrams, lets one invalid segment through, then drops 2 NOTRACKed datagrams; then it dies. Truth: the
//! sends the kernel refused (a DROP verdict fails the send). The first drops of a new netns on a CPU have no
//! baseline (counted as `no_baseline`), which must not make these drops uncertain: `_nfct` settles them.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, UdpSocket},
    process::Command,
};

use ctrace_tests::{
    Ctrace,
    packets::{RawTcp, TCP_FIN, TCP_SYN},
    require_root, threads,
};

use crate::Reported;

/// Netns created and destroyed (CTRACE_TEST_CHURN_NETNS overrides it: emulated guests are slower).
const DEFAULT_NETNS: u32 = 2000;

const RULESET: &str = "table inet ctrace {
    chain raw_out { type filter hook output priority raw; policy accept; udp dport 8 notrack; }
    chain out { type filter hook output priority filter; policy accept;
        ct state new udp dport 7 drop;
        udp dport 8 drop; }
}";

/// One netns's life on a thread of its own: rules, traffic, death. Returns (inode, refused sends).
fn one_netns(ruleset: &std::path::Path) -> anyhow::Result<(u64, u64)> {
    let ruleset = ruleset.to_owned();
    std::thread::spawn(move || -> anyhow::Result<(u64, u64)> {
        let inode = threads::enter_new_netns()?;
        // A child forked by this thread starts in its netns.
        let status = Command::new("nft").arg("-f").arg(&ruleset).status()?;
        anyhow::ensure!(status.success(), "nft -f failed: {status}");
        let raw = RawTcp::open()?;
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let mut refused = 0;
        for i in 0..5u32 {
            if i == 3 {
                raw.send(Ipv4Addr::LOCALHOST, 40000, 9, i, TCP_SYN | TCP_FIN)?;
            }
            let port = if i < 3 { 7 } else { 8 };
            refused += u64::from(udp.send_to(b"x", (Ipv4Addr::LOCALHOST, port)).is_err());
        }
        Ok((inode, refused))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

#[test]
fn netns_churn_keeps_baselines_apart() {
    require_root();
    let count: u32 = std::env::var("CTRACE_TEST_CHURN_NETNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_NETNS);
    let ruleset = std::env::temp_dir().join(format!("ctrace-churn-{}.nft", std::process::id()));
    std::fs::write(&ruleset, RULESET).unwrap();
    let ctrace = Ctrace::start(&["--rate-limit", "0", "--proto", "udp"]).unwrap();
    let mut truth = 0;
    let mut inodes = BTreeSet::new();
    let started = std::time::Instant::now();
    for _ in 0..count {
        let (inode, refused) = one_netns(&ruleset).unwrap();
        inodes.insert(inode);
        truth += refused;
    }
    let elapsed = started.elapsed();
    let _ = std::fs::remove_file(&ruleset);
    let (events, summary) = ctrace.stop().unwrap();
    let r = Reported::of_any(&events, |n| inodes.contains(&n));
    println!(
        "case churn: {count} netns in {elapsed:.1?} ({} distinct inodes); truth {truth} (refused sends); ctrace {:?}; \
         attribution {}",
        inodes.len(),
        r.by,
        summary["attribution"]
    );
    assert_eq!(truth, 5 * count as u64, "every datagram met its DROP rule");
    assert_eq!(r.total(), truth, "one record per ruleset drop");
    assert_eq!(
        r.exact("netfilter_rule"),
        truth,
        "tracked and NOTRACKed drops are exact whatever the counters say"
    );
}
