//! Attribution under production-like noise, in tracepoint mode on this host. Each case drops packets with a
//! ruleset while conntrack counts other, accepted packets as invalid (real servers see out-of-window and
//! malformed segments all the time), and compares ctrace's totals with truth ctrace did not compute: the DROP
//! rule's own packet counter and the number of packets sent. The invariant in every case: no drop gets a
//! confident wrong reason; where the evidence cannot separate two reasons the drop says so.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, UdpSocket},
};

use ctrace_tests::{
    Ctrace, TestNetns,
    packets::{RawTcp, TCP_FIN, TCP_SYN},
    require_root,
};
use serde_json::Value;

/// Ruleset drops per case, each preceded by one accepted invalid packet.
const N: u32 = 200;
const DROP_PORT: u16 = 7;
const NOISE_PORT: u16 = 9;

/// ctrace's drop records of one netns, by (reason, attribution, possible reasons).
#[derive(Debug, Default)]
struct Reported {
    by: BTreeMap<(String, String, Vec<String>), u64>,
}

impl Reported {
    fn of(events: &[Value], netns: u64) -> Reported {
        let mut r = Reported::default();
        for v in events.iter().filter(|v| v["event"] == "drop" && v["netns"] == netns) {
            let possible: Vec<String> = v["possible"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| p.as_str().map(String::from)).collect())
                .unwrap_or_default();
            let key = (
                v["reason"].as_str().unwrap_or("?").to_owned(),
                v["attribution"].as_str().unwrap_or("?").to_owned(),
                possible,
            );
            *r.by.entry(key).or_default() += v["count"].as_u64().unwrap_or(1);
        }
        r
    }

    fn total(&self) -> u64 {
        self.by.values().sum()
    }

    fn exact(&self, reason: &str) -> u64 {
        self.by
            .iter()
            .filter(|((r, a, _), _)| r == reason && a != "uncertain")
            .map(|(_, c)| c)
            .sum()
    }

    fn uncertain(&self) -> u64 {
        self.by
            .iter()
            .filter(|((_, a, _), _)| a == "uncertain")
            .map(|(_, c)| c)
            .sum()
    }

    /// Every uncertain record must list `reason` among the possible ones.
    fn uncertain_always_allows(&self, reason: &str) -> bool {
        self.by
            .iter()
            .filter(|((_, a, _), _)| a == "uncertain")
            .all(|((_, _, p), _)| p.iter().any(|x| x == reason))
    }
}

/// Sends N rounds of (one SYN|FIN segment to NOISE_PORT, which conntrack counts invalid and the ruleset
/// accepts; then `drop` once). Returns how many `drop` sends failed (a DROP verdict makes them fail).
fn noise_and(ns: &TestNetns, drop: fn(&RawTcp, &UdpSocket, u32) -> bool) -> u32 {
    ns.in_netns(move || {
        let raw = RawTcp::open()?;
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let mut failed = 0;
        for i in 0..N {
            raw.send(Ipv4Addr::LOCALHOST, 40000 + i as u16, NOISE_PORT, i, TCP_SYN | TCP_FIN)?;
            if !drop(&raw, &udp, i) {
                failed += 1;
            }
        }
        Ok(failed)
    })
    .unwrap()
}

fn udp_v4(_: &RawTcp, udp: &UdpSocket, _: u32) -> bool {
    udp.send_to(b"x", (Ipv4Addr::LOCALHOST, DROP_PORT)).is_ok()
}

fn udp_v6(_: &RawTcp, _: &UdpSocket, _: u32) -> bool {
    UdpSocket::bind("[::1]:0")
        .and_then(|s| s.send_to(b"x", ("::1", DROP_PORT)))
        .is_ok()
}

fn tcp_invalid(raw: &RawTcp, _: &UdpSocket, i: u32) -> bool {
    raw.send(Ipv4Addr::LOCALHOST, 50000 + i as u16, DROP_PORT, i, TCP_SYN | TCP_FIN)
        .is_ok()
}

/// Runs one case: `setup` installs the ruleset, `drop` makes one ruleset drop, `truth` reads the rule's own
/// packet counter. Returns what ctrace reported for the netns, after the checks every case shares.
fn run_case(
    tag: &str,
    setup: impl FnOnce(&TestNetns),
    drop: fn(&RawTcp, &UdpSocket, u32) -> bool,
    truth: impl FnOnce(&TestNetns) -> u64,
) -> (Reported, Value) {
    require_root();
    let ns = TestNetns::new(tag).unwrap();
    setup(&ns);
    let ctrace = Ctrace::start(&["--netns", &ns.name, "--rate-limit", "0"]).unwrap();
    let before = ns.counters().unwrap();
    let failed = noise_and(&ns, drop);
    let (events, summary) = ctrace.stop().unwrap();
    let kernel = ns.counters().unwrap().since(&before);
    let truth = truth(&ns);
    let reported = Reported::of(&events, ns.inode());
    println!(
        "case {tag}: truth {truth} (rule counter), {failed} sends failed, kernel invalid +{} drop +{}; ctrace {:?}",
        kernel.invalid, kernel.drop, reported.by
    );
    assert_eq!(truth, N as u64, "the rule dropped every packet meant for it");
    assert_eq!(failed, N, "every dropped send failed");
    assert!(kernel.invalid >= N as u64, "the noise was counted invalid: {kernel:?}");
    assert_eq!(kernel.drop, 0, "conntrack itself dropped nothing");
    assert_eq!(reported.total(), truth, "one record per ruleset drop");
    for r in ["table_full", "early_drop", "insert_failed"] {
        assert_eq!(reported.exact(r), 0, "{r} reported for a ruleset drop");
    }
    let by_netns = summary["by_netns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["netns"] == ns.inode())
        .cloned()
        .unwrap_or_default();
    let total: u64 = Value::as_object(&by_netns["drops"])
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    assert_eq!(total, truth, "the in-kernel totals equal the rule counter: {by_netns}");
    (reported, summary)
}

fn iptables(ns: &TestNetns, tool: &str, args: &str) {
    let mut full = vec![tool, "-w"];
    full.extend(args.split_whitespace());
    ns.exec(&full).unwrap();
}

/// A raw-table DROP acts before conntrack: these packets were never judged. With invalid noise since the
/// previous drop the counters cannot tell that from a conntrack verdict: uncertain, never a confident invalid.
fn assert_rule_drops_never_confidently_invalid(r: &Reported) {
    assert_eq!(
        r.exact("invalid"),
        0,
        "a ruleset drop was reported as a certain invalid: {:?}",
        r.by
    );
    assert!(
        r.uncertain_always_allows("netfilter_rule"),
        "an uncertain record left out the true reason: {:?}",
        r.by
    );
    assert_eq!(r.exact("netfilter_rule") + r.uncertain(), N as u64);
}

#[test]
fn raw_table_drops_amid_invalid_noise() {
    let (r, _) = run_case(
        "raw",
        |ns| {
            iptables(
                ns,
                "iptables",
                "-t raw -A OUTPUT -p udp --dport 7 -m comment --comment truth -j DROP",
            )
        },
        udp_v4,
        |ns| ns.rule_packets("iptables", "raw", "OUTPUT", "truth").unwrap(),
    );
    assert_rule_drops_never_confidently_invalid(&r);
}

#[test]
fn raw_table_drops_amid_invalid_noise_ipv6() {
    let (r, _) = run_case(
        "raw6",
        |ns| {
            iptables(
                ns,
                "ip6tables",
                "-t raw -A OUTPUT -p udp --dport 7 -m comment --comment truth -j DROP",
            )
        },
        udp_v6,
        |ns| ns.rule_packets("ip6tables", "raw", "OUTPUT", "truth").unwrap(),
    );
    assert_rule_drops_never_confidently_invalid(&r);
}

#[test]
fn raw_table_drops_amid_invalid_noise_nftables() {
    let (r, _) = run_case(
        "rawnft",
        |ns| {
            ns.nft(
                "table inet ctrace {
                    counter truth {}
                    chain raw_out { type filter hook output priority raw; policy accept; udp dport 7 counter name truth drop; }
                }",
            )
            .unwrap()
        },
        udp_v4,
        |ns| ns.nft_counter("truth").unwrap(),
    );
    assert_rule_drops_never_confidently_invalid(&r);
}

/// NOTRACK (the usual advice for busy ports) then a DROP in filter: `_nfct` says conntrack never judged
/// these packets, so every one is an exact netfilter_rule whatever the counters do.
fn assert_all_notrack(r: &Reported) {
    let key = ("netfilter_rule".to_owned(), "notrack".to_owned(), Vec::<String>::new());
    assert_eq!(r.by.get(&key).copied(), Some(N as u64), "{:?}", r.by);
}

#[test]
fn notrack_then_filter_drop_amid_invalid_noise() {
    let (r, _) = run_case(
        "notrack",
        |ns| {
            iptables(ns, "iptables", "-t raw -A OUTPUT -p udp --dport 7 -j CT --notrack");
            iptables(
                ns,
                "iptables",
                "-I OUTPUT 1 -p udp --dport 7 -m comment --comment truth -j DROP",
            );
        },
        udp_v4,
        |ns| ns.rule_packets("iptables", "filter", "OUTPUT", "truth").unwrap(),
    );
    assert_all_notrack(&r);
}

#[test]
fn notrack_then_filter_drop_amid_invalid_noise_ipv6() {
    let (r, _) = run_case(
        "notrack6",
        |ns| {
            iptables(ns, "ip6tables", "-t raw -A OUTPUT -p udp --dport 7 -j NOTRACK");
            iptables(
                ns,
                "ip6tables",
                "-I OUTPUT 1 -p udp --dport 7 -m comment --comment truth -j DROP",
            );
        },
        udp_v6,
        |ns| ns.rule_packets("ip6tables", "filter", "OUTPUT", "truth").unwrap(),
    );
    assert_all_notrack(&r);
}

#[test]
fn notrack_then_filter_drop_amid_invalid_noise_nftables() {
    let (r, _) = run_case(
        "notracknft",
        |ns| {
            ns.nft(
                "table inet ctrace {
                    counter truth {}
                    chain raw_out { type filter hook output priority raw; policy accept; udp dport 7 notrack; }
                    chain filter_out { type filter hook output priority filter; policy accept;
                        ct state established,related accept; udp dport 7 counter name truth drop; }
                }",
            )
            .unwrap()
        },
        udp_v4,
        |ns| ns.nft_counter("truth").unwrap(),
    );
    assert_all_notrack(&r);
}

/// A `ctstate INVALID` DROP among accepted invalid packets: these drops are conntrack's judgement, and ctrace
/// must call them invalid (certain or not), never a certain netfilter_rule.
#[test]
fn ctstate_invalid_drop_amid_invalid_noise() {
    let (r, _) = run_case(
        "ctinvalid",
        |ns| {
            iptables(
                ns,
                "iptables",
                "-I OUTPUT 1 -p tcp --dport 7 -m conntrack --ctstate INVALID -m comment --comment truth -j DROP",
            )
        },
        tcp_invalid,
        |ns| ns.rule_packets("iptables", "filter", "OUTPUT", "truth").unwrap(),
    );
    assert_eq!(r.exact("netfilter_rule"), 0, "{:?}", r.by);
    assert_eq!(r.exact("invalid") + r.uncertain(), N as u64);
    assert!(r.by.keys().all(|(reason, _, _)| reason == "invalid"), "{:?}", r.by);
}

/// Netns that come and go while drops happen: each new netns reuses inode numbers of dead ones and starts
/// its counters at zero. Each iteration drops 3 tracked datagrams, lets one invalid segment through, then
/// sends 2 untracked (NOTRACK) datagrams to a raw-table DROP. Truth: the DROP rules' packet counters,
/// summed. First drops of a new netns on a CPU have no baseline (counted as `no_baseline`), which must not
/// make these drops uncertain: `_nfct` settles them.
#[test]
fn netns_churn_keeps_baselines_apart() {
    require_root();
    const ROUNDS: u32 = 120;
    let ctrace = Ctrace::start(&["--rate-limit", "0", "--proto", "udp"]).unwrap();
    let mut truth = 0;
    let mut inodes = std::collections::BTreeSet::new();
    for round in 0..ROUNDS {
        let ns = TestNetns::new(&format!("churn{round}")).unwrap();
        iptables(
            &ns,
            "iptables",
            "-I OUTPUT 1 -p udp --dport 7 -m comment --comment truth -j DROP",
        );
        iptables(&ns, "iptables", "-t raw -A OUTPUT -p udp --dport 8 -j NOTRACK");
        iptables(
            &ns,
            "iptables",
            "-I OUTPUT 1 -p udp --dport 8 -m comment --comment truth8 -j DROP",
        );
        inodes.insert(ns.inode());
        ns.in_netns(|| {
            let raw = RawTcp::open()?;
            let udp = UdpSocket::bind("127.0.0.1:0")?;
            for i in 0..5u32 {
                if i == 3 {
                    raw.send(Ipv4Addr::LOCALHOST, 40000, NOISE_PORT, i, TCP_SYN | TCP_FIN)?;
                }
                let port = if i < 3 { DROP_PORT } else { DROP_PORT + 1 };
                let _ = udp.send_to(b"x", (Ipv4Addr::LOCALHOST, port));
            }
            Ok(())
        })
        .unwrap();
        truth += ns.rule_packets("iptables", "filter", "OUTPUT", "truth").unwrap();
        truth += ns.rule_packets("iptables", "filter", "OUTPUT", "truth8").unwrap();
    }
    let (events, summary) = ctrace.stop().unwrap();
    let mut exact = 0;
    let mut uncertain = 0;
    for v in events.iter().filter(|v| v["event"] == "drop") {
        if !inodes.contains(&v["netns"].as_u64().unwrap_or(0)) {
            continue;
        }
        match (v["reason"].as_str(), v["attribution"].as_str()) {
            (Some("netfilter_rule"), Some("ct_attached" | "notrack")) => exact += 1,
            (_, Some("uncertain")) => {
                assert!(v["possible"].to_string().contains("netfilter_rule"), "{v}");
                uncertain += 1
            }
            _ => panic!("wrong reason for a ruleset drop: {v}"),
        }
    }
    println!(
        "case churn: {ROUNDS} netns ({} distinct inodes), truth {truth} (rule counters); ctrace exact netfilter_rule {exact}, uncertain {uncertain}; attribution {}",
        inodes.len(),
        summary["attribution"]
    );
    assert_eq!(truth, 5 * ROUNDS as u64);
    assert_eq!(exact + uncertain, truth, "one record per ruleset drop");
    assert_eq!(
        uncertain, 0,
        "tracked and NOTRACKed drops are exact whatever the counters say"
    );
}
