//! What the table holds and the kernel's counters: top destinations, NOTRACK candidates, timeouts, drops.

use super::*;

#[test]
fn load_top() {
    let t = module_host();
    t.write(
        "/proc/net/nf_conntrack",
        &table((0..5).map(|i| tcp_established("10.0.0.9", "10.0.0.1", 443, 400000 + i))),
    );
    let f = finding(&t.report(), "CT-LOAD-TOP");
    assert!(f.title.contains("tcp to port 443 (100.0 %)"), "{}", f.title);
    t.remove("/proc/net/nf_conntrack");
    let r = t.report();
    assert!(!r.ids().contains(&"CT-LOAD-TOP"));
    assert!(
        r.unreadable.iter().any(|u| u.path == "/proc/net/nf_conntrack"),
        "{:?}",
        r.unreadable
    );
}

#[test]
fn load_notrack() {
    let t = module_host();
    let dns = (0..300).map(|i| {
        udp_line(
            &format!("192.168.1.{}", i % 250),
            "10.0.0.1",
            53,
            false,
            &format!("192.168.1.{}", i % 250),
        )
    });
    let web = (0..50).map(|i| tcp_established("192.168.2.2", "10.0.0.1", 80, 431000 + i));
    t.write("/proc/net/nf_conntrack", &table(dns.chain(web)));
    let f = finding(&t.report(), "CT-LOAD-NOTRACK");
    assert_eq!(f.severity, Severity::Info);
    let fix = f.fix.join("\n");
    assert!(
        fix.contains("iptables -t raw -A PREROUTING -p udp --dport 53 -j CT --notrack"),
        "{fix}"
    );
    assert!(
        fix.contains("iptables -t raw -A OUTPUT -p udp --sport 53 -j CT --notrack"),
        "{fix}"
    );
    assert!(
        fix.contains("ip6tables -t raw -A PREROUTING -p udp --dport 53 -j CT --notrack"),
        "{fix}"
    );
    assert!(
        fix.contains("nft add rule inet raw prerouting udp dport 53 notrack"),
        "{fix}"
    );
    assert!(
        fix.contains("nft add rule inet raw output udp sport 53 notrack"),
        "{fix}"
    );
    assert!(!fix.contains("--dport 80"), "tcp/80 is below the threshold: {fix}");
    assert!(
        !fix.contains("OUTPUT -p udp --dport 53"),
        "this host is the server only: {fix}"
    );
    // The same DNS flows, DNAT'd to a backend: they cannot be exempted.
    let nat = (0..300).map(|i| udp_line(&format!("192.168.1.{}", i % 250), "10.0.0.1", 53, false, "172.16.0.5"));
    t.write("/proc/net/nf_conntrack", &table(nat));
    assert_lacks(&t, "CT-LOAD-NOTRACK");
}

#[test]
fn timeout_tcp_established() {
    let t = module_host();
    t.sysctl("nf_conntrack_max", 1000);
    t.sysctl("nf_conntrack_count", 600);
    let est = (0..600).map(|i| tcp_established("192.168.2.2", "10.0.0.1", 8080, if i < 400 { 100000 } else { 431990 }));
    t.write("/proc/net/nf_conntrack", &table(est));
    let f = finding(&t.report(), "CT-TIMEOUT-TCP-ESTABLISHED");
    assert!(
        f.evidence[1]
            .text
            .contains("600 of 600 entries are ESTABLISHED; 400 of them idle"),
        "{:?}",
        f.evidence
    );
    assert!(f.fix[0].starts_with("sysctl -w net.netfilter.nf_conntrack_tcp_timeout_established=86400"));
    t.sysctl("nf_conntrack_max", 262144);
    t.sysctl("nf_conntrack_count", 600);
    assert_lacks(&t, "CT-TIMEOUT-TCP-ESTABLISHED");
}

#[test]
fn timeout_below_keepalive() {
    let t = module_host();
    assert_lacks(&t, "CT-TIMEOUT-BELOW-KEEPALIVE");
    t.sysctl("nf_conntrack_tcp_timeout_established", 3600);
    let f = finding(&t.report(), "CT-TIMEOUT-BELOW-KEEPALIVE");
    assert_eq!(
        f.fix[0],
        "sysctl -w net.netfilter.nf_conntrack_tcp_timeout_established=7920"
    );
}

#[test]
fn timeout_unreplied() {
    let t = module_host();
    t.sysctl("nf_conntrack_max", 1000);
    let replied = (0..600).map(|i| udp_line("10.0.0.1", &format!("198.51.100.{}", i % 200), 9999, false, "10.0.0.1"));
    t.write("/proc/net/nf_conntrack", &table(replied));
    assert_lacks(&t, "CT-TIMEOUT-UNREPLIED");
    let one_way = (0..600).map(|i| udp_line("10.0.0.1", &format!("198.51.100.{}", i % 200), 9999, true, "10.0.0.1"));
    t.write("/proc/net/nf_conntrack", &table(one_way));
    let f = finding(&t.report(), "CT-TIMEOUT-UNREPLIED");
    assert!(
        f.fix
            .contains(&"sysctl -w net.netfilter.nf_conntrack_udp_timeout=10".to_owned())
    );
}

#[test]
fn counters() {
    let t = module_host();
    for id in [
        "CT-COUNTER-DROP",
        "CT-COUNTER-EARLY-DROP",
        "CT-COUNTER-INSERT-FAILED",
        "CT-COUNTER-INVALID",
    ] {
        assert_lacks(&t, id);
    }
    t.write(
        "/proc/net/stat/nf_conntrack",
        &format!("{STAT_HEADER}{}{}", stat_row(1, 2, 3, 4), stat_row(16, 0, 1, 0)),
    );
    let r = t.report();
    for (id, text) in [
        ("CT-COUNTER-DROP", "drop = 4"),
        ("CT-COUNTER-EARLY-DROP", "early_drop = 4"),
        ("CT-COUNTER-INSERT-FAILED", "insert_failed = 2"),
        ("CT-COUNTER-INVALID", "invalid = 17"),
    ] {
        let f = finding(&r, id);
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.evidence[0].text.ends_with(text), "{id}: {:?}", f.evidence);
    }
    assert_eq!(r.exit_code(), 1);
}
