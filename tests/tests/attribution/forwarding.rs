//! Forwarded traffic: senders on every CPU at once push UDP flows (IPv4 and IPv6) and invalid TCP through a
//! router netns whose table overflows and whose FORWARD chain drops one port. The drops happen in softirq on
//! the router, the way they do on NAT gateways and Kubernetes nodes. Truth: the router's DROP rule counters,
//! and for table_full the packets sent minus the packets that arrived (counted by raw-table rules in `b`,
//! which then drop them: a third truth, ctrace's rule drops in `b`).

use ctrace_tests::{
    Ctrace, SysctlGuard,
    packets::{RawTcp, TCP_FIN, TCP_SYN},
    require_root, threads,
    topology::{A4, B4, B6, Router},
};

use crate::{Reported, iptables};

const MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
/// The table holds 256 entries; every sender makes more new flows than that on its own.
const TABLE_MAX: &str = "256";
const FLOWS_PER_SENDER: u32 = 400;
const RULE_PORT: u16 = 7;
const NOISE_PORT: u16 = 9;
/// Flow ports: each sender has its own range, every datagram opens a new flow.
const FIRST_FLOW_PORT: u16 = 10000;
const FLOW_PORTS: &str = "10000:60000";

/// What one sender sent (sends that the local stack accepted; the drops happen later, on the router).
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    flows: u64,
    rule_port: u64,
    noise: u64,
}

#[test]
fn forwarded_drops_on_every_cpu_with_a_full_table() {
    require_root();
    let net = Router::new("fwd").unwrap();
    for tool in ["iptables", "ip6tables"] {
        iptables(
            &net.r,
            tool,
            &format!("-A FORWARD -p udp --dport {RULE_PORT} -m comment --comment truth -j DROP"),
        );
        // Conntrack tracks what the router forwards; invalid packets are accepted, as by most rulesets.
        iptables(
            &net.r,
            tool,
            "-A FORWARD -m conntrack --ctstate NEW,ESTABLISHED,RELATED,INVALID -j ACCEPT",
        );
        iptables(
            &net.b,
            tool,
            &format!("-t raw -A PREROUTING -p udp --dport {FLOW_PORTS} -m comment --comment arrived -j DROP"),
        );
    }
    iptables(
        &net.b,
        "iptables",
        &format!("-t raw -A PREROUTING -p tcp --dport {NOISE_PORT} -m comment --comment noise -j DROP"),
    );
    let cpus = threads::cpus().unwrap().len().min(4);
    assert!(cpus >= 2, "forwarding from several CPUs needs 2 CPUs, found {cpus}");
    let _max = SysctlGuard::set(MAX, TABLE_MAX).unwrap();
    let ctrace = Ctrace::start(&["--rate-limit", "0"]).unwrap();
    let before = net.r.counters().unwrap();
    let sent = threads::on_cpus(cpus, &net.a.name, |i, start| {
        let udp4 = Router::a_socket_v4()?;
        let udp6 = Router::a_socket_v6()?;
        let raw = RawTcp::open()?;
        let mut sent = Sent::default();
        start.wait();
        for k in 0..FLOWS_PER_SENDER {
            let port = FIRST_FLOW_PORT + (i as u16) * 10000 + k as u16;
            let ok = if k % 4 == 3 {
                udp6.send_to(b"x", (B6, port)).is_ok()
            } else {
                udp4.send_to(b"x", (B4, port)).is_ok()
            };
            sent.flows += u64::from(ok);
            if k % 4 == 0 {
                sent.rule_port += u64::from(udp4.send_to(b"x", (B4, RULE_PORT)).is_ok());
                sent.rule_port += u64::from(udp6.send_to(b"x", (B6, RULE_PORT)).is_ok());
            }
            if k % 4 == 1 {
                let ok = raw.send_from(A4, B4, 40000 + k as u16, NOISE_PORT, k, TCP_SYN | TCP_FIN);
                sent.noise += u64::from(ok.is_ok());
            }
        }
        Ok(sent)
    })
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let kernel = net.r.counters().unwrap().since(&before);
    let (events, _summary) = ctrace.stop().unwrap();

    let total = sent.iter().fold(Sent::default(), |t, s| Sent {
        flows: t.flows + s.flows,
        rule_port: t.rule_port + s.rule_port,
        noise: t.noise + s.noise,
    });
    let rule = net.r.rule_packets("iptables", "filter", "FORWARD", "truth").unwrap()
        + net.r.rule_packets("ip6tables", "filter", "FORWARD", "truth").unwrap();
    let arrived = net.b.rule_packets("iptables", "raw", "PREROUTING", "arrived").unwrap()
        + net.b.rule_packets("ip6tables", "raw", "PREROUTING", "arrived").unwrap();
    let noise_arrived = net.b.rule_packets("iptables", "raw", "PREROUTING", "noise").unwrap();
    // A rule-port datagram either met the DROP rule or found no room in the table; a flow or a noise segment
    // either arrived or found no room (conntrack needs an entry before it can judge a segment invalid).
    let table_full = (total.flows - arrived) + (total.rule_port - rule) + (total.noise - noise_arrived);
    let at_r = Reported::of(&events, net.r.inode());
    let at_b = Reported::of(&events, net.b.inode());
    println!(
        "case forwarding ({cpus} CPUs): sent {total:?}; truth: rule {rule} (FORWARD counters), table_full {table_full} \
         (sent - arrived), arrived {arrived} + {noise_arrived} noise (b's raw counters); kernel at r: drop +{} early_drop +{} invalid +{}; \
         ctrace at r {:?}; at b {:?}",
        kernel.drop, kernel.early_drop, kernel.invalid, at_r.by, at_b.by
    );
    assert!(rule > 0 && table_full > 0, "the case made both kinds of drops");
    assert_eq!(
        kernel.drop, table_full,
        "every packet that did not arrive was a conntrack drop"
    );
    assert!(
        kernel.invalid >= noise_arrived,
        "the noise that got through was counted invalid"
    );
    assert_eq!(at_r.exact("netfilter_rule"), rule, "{:?}", at_r.by);
    assert_eq!(at_r.exact("table_full"), table_full, "{:?}", at_r.by);
    assert_eq!(at_r.uncertain(), 0, "forwarded drops are exact: {:?}", at_r.by);
    assert_eq!(
        at_r.total() - at_r.exact("early_drop"),
        rule + table_full,
        "no other drops at r: {:?}",
        at_r.by
    );
    assert_eq!(at_b.exact("netfilter_rule"), arrived + noise_arrived, "{:?}", at_b.by);
    assert_eq!(at_b.total(), arrived + noise_arrived, "{:?}", at_b.by);
}
