//! Ruleset drops among accepted invalid packets (real servers see out-of-window and malformed segments all
//! the time). Truth: the DROP rule's own packet counter and the number of sends the kernel refused.

use std::{
    net::{Ipv4Addr, UdpSocket},
    ops::Range,
    time::Duration,
};

use ctrace_tests::{
    Ctrace, TestNetns,
    packets::{RawTcp, TCP_FIN, TCP_SYN},
    require_root,
};
use serde_json::Value;

use crate::{Reported, iptables};

/// Ruleset drops per case, each preceded by one accepted invalid packet.
const N: u32 = 200;
/// Rounds before ctrace has had the chance to arm the conntrack hook.
const BEFORE_HOOK: u32 = 20;
const DROP_PORT: u16 = 7;
const NOISE_PORT: u16 = 9;

/// Sends rounds of (one SYN|FIN segment to NOISE_PORT, which conntrack counts invalid and the ruleset
/// accepts; then `drop` once). Returns how many `drop` sends failed (a DROP verdict makes them fail).
fn noise_and(ns: &TestNetns, drop: fn(&RawTcp, &UdpSocket, u32) -> bool, rounds: Range<u32>) -> u32 {
    ns.in_netns(move || {
        let raw = RawTcp::open()?;
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let mut failed = 0;
        for i in rounds {
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
) -> (Reported, bool) {
    require_root();
    let ns = TestNetns::new(tag).unwrap();
    setup(&ns);
    let mut ctrace = Ctrace::start(&["--netns", &ns.name, "--rate-limit", "0"]).unwrap();
    let before = ns.counters().unwrap();
    // The first uncertain drops make ctrace arm the conntrack hook where the kernel has it (6.4+); it says so.
    let mut failed = noise_and(&ns, drop, 0..BEFORE_HOOK);
    let hook = ctrace
        .wait_for(Duration::from_secs(3), |v| {
            v["event"] == "notice" && v["message"].as_str().is_some_and(|m| m.contains("conntrack hook"))
        })
        .unwrap();
    let hooked = hook
        .as_ref()
        .is_some_and(|n| n["message"].as_str().is_some_and(|m| m.contains("armed")));
    println!(
        "case {tag}: ctrace notice: {}",
        hook.map(|n| n["message"].to_string()).unwrap_or_default()
    );
    // Its evidence counts from a moment after the links exist (packets already past the hooks have no mark).
    std::thread::sleep(Duration::from_millis(50));
    failed += noise_and(&ns, drop, BEFORE_HOOK..N);
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
    (reported, hooked)
}

/// A raw-table DROP acts before conntrack: these packets were never judged. With invalid noise since the
/// previous drop the counters cannot tell that from a conntrack verdict: uncertain, never a confident invalid.
/// Once the conntrack hook is armed (6.4+), the rest are exact.
fn assert_rule_drops_never_confidently_invalid(r: &Reported, hooked: bool) {
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
    if hooked {
        assert!(
            r.exact("netfilter_rule") >= (N - BEFORE_HOOK) as u64,
            "the armed conntrack hook left drops uncertain: {:?}",
            r.by
        );
    }
}

#[test]
fn raw_table_drops_amid_invalid_noise() {
    let (r, hooked) = run_case(
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
    assert_rule_drops_never_confidently_invalid(&r, hooked);
}

#[test]
fn raw_table_drops_amid_invalid_noise_ipv6() {
    let (r, hooked) = run_case(
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
    assert_rule_drops_never_confidently_invalid(&r, hooked);
}

#[test]
fn raw_table_drops_amid_invalid_noise_nftables() {
    let (r, hooked) = run_case(
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
    assert_rule_drops_never_confidently_invalid(&r, hooked);
}

/// NOTRACK (the usual advice for busy ports) then a DROP in filter: `_nfct` says conntrack never judged
/// these packets, so every one is an exact netfilter_rule whatever the counters do.
fn assert_all_notrack(r: &Reported) {
    let key = ("netfilter_rule".to_owned(), "notrack".to_owned(), Vec::<String>::new());
    assert_eq!(r.by.get(&key).copied(), Some(N as u64), "{:?}", r.by);
}

#[test]
fn notrack_then_filter_drop_amid_invalid_noise() {
    let (r, hooked) = run_case(
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
    let _ = hooked;
    assert_all_notrack(&r);
}

#[test]
fn notrack_then_filter_drop_amid_invalid_noise_ipv6() {
    let (r, hooked) = run_case(
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
    let _ = hooked;
    assert_all_notrack(&r);
}

#[test]
fn notrack_then_filter_drop_amid_invalid_noise_nftables() {
    let (r, hooked) = run_case(
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
    let _ = hooked;
    assert_all_notrack(&r);
}

/// A `ctstate INVALID` DROP among accepted invalid packets: these drops are conntrack's judgement, and ctrace
/// must call them invalid (certain or not), never a certain netfilter_rule.
#[test]
fn ctstate_invalid_drop_amid_invalid_noise() {
    let (r, hooked) = run_case(
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
    if hooked {
        assert!(
            r.exact("invalid") >= (N - BEFORE_HOOK) as u64,
            "the armed conntrack hook left drops uncertain: {:?}",
            r.by
        );
    }
}
