//! Same-tuple races: two CPUs send the first packet of the same flow at once, so both build an entry and
//! the second to confirm finds the first. TCP cannot merge the two (`insert_failed`, the packet is dropped);
//! UDP is the Kubernetes DNS race, here with the service's random DNAT to two backends: kernels resolve most
//! such clashes (5.10+), older ones drop them as `insert_failed`. Truth: the sends the kernel refused and its
//! `insert_failed` counter (exact from 5.10: resolved clashes are no longer counted there).

use std::{
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd as _,
};

use ctrace_tests::{
    Ctrace, TestNetns,
    packets::{RawTcp, TCP_SYN},
    require_root, threads,
};

use crate::{Reported, iptables};

/// Rounds stop once this many clashes were dropped (or at MAX_ROUNDS: the race is a race).
const ENOUGH_CLASHES: u64 = 30;
const MAX_ROUNDS: u32 = 20_000;
const ROUNDS_PER_BATCH: u32 = 500;
const TCP_PORT: u16 = 11;
const DNS_PORT: u16 = 53;
const SERVICE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);

#[derive(Debug, Default, Clone, Copy)]
struct Refused {
    tcp: u64,
    udp: u64,
}

/// A UDP socket on 127.0.0.1:`port` that another socket may bind too (both threads send from the same tuple).
fn shared_port_socket(port: u16) -> anyhow::Result<UdpSocket> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt};
    let fd = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port))?;
    Ok(UdpSocket::from(fd))
}

#[test]
fn same_tuple_races_on_two_cpus() {
    require_root();
    let ns = TestNetns::new("clash").unwrap();
    iptables(
        &ns,
        "iptables",
        &format!(
            "-t nat -A OUTPUT -d {SERVICE} -p udp --dport {DNS_PORT} -m statistic --mode random --probability 0.5 \
             -j DNAT --to-destination 127.0.0.2"
        ),
    );
    iptables(
        &ns,
        "iptables",
        &format!("-t nat -A OUTPUT -d {SERVICE} -p udp --dport {DNS_PORT} -j DNAT --to-destination 127.0.0.3"),
    );
    let ctrace = Ctrace::start(&["--netns", &ns.name, "--rate-limit", "0"]).unwrap();
    let before = ns.counters().unwrap();
    let mut refused = Refused::default();
    let mut rounds = 0;
    while rounds < MAX_ROUNDS && ns.counters().unwrap().since(&before).insert_failed < ENOUGH_CLASHES {
        let first = rounds;
        let batch = threads::on_cpus(2, &ns.name, move |_, start| {
            let raw = RawTcp::open()?;
            let mut r = Refused::default();
            for round in first..first + ROUNDS_PER_BATCH {
                // A fresh tuple per round: both threads use it, one of them second.
                let sport = 20000 + (round % 40000) as u16;
                let udp = shared_port_socket(sport)?;
                start.wait();
                r.tcp += u64::from(raw.send(Ipv4Addr::LOCALHOST, sport, TCP_PORT, round, TCP_SYN).is_err());
                r.udp += u64::from(udp.send_to(b"q", (SERVICE, DNS_PORT)).is_err());
            }
            Ok(r)
        })
        .unwrap();
        for b in batch {
            refused.tcp += b.tcp;
            refused.udp += b.udp;
        }
        rounds += ROUNDS_PER_BATCH;
    }
    let kernel = ns.counters().unwrap().since(&before);
    let (events, _) = ctrace.stop().unwrap();
    let r = Reported::of(&events, ns.inode());
    println!(
        "case clash: {rounds} rounds on 2 CPUs; truth: refused sends {refused:?}, kernel insert_failed +{} drop +{} \
         early_drop +{}; ctrace {:?}",
        kernel.insert_failed, kernel.drop, kernel.early_drop, r.by
    );
    assert!(
        kernel.insert_failed > 0,
        "no clash in {rounds} rounds: the race did not happen"
    );
    assert_eq!(kernel.drop, kernel.insert_failed, "every conntrack drop was a clash");
    assert_eq!(
        refused.tcp + refused.udp,
        kernel.drop,
        "every clash drop refused its send"
    );
    // Evictions are not dropped packets: a long race (each round is a new UDP entry) fills the table, and kprobe
    // mode then lists every early_drop eviction. They must match the kernel's early_drop counter instead.
    let evictions = r.exact("early_drop");
    assert_eq!(evictions, kernel.early_drop, "early_drop records: {:?}", r.by);
    assert_eq!(
        r.total() - evictions,
        kernel.drop,
        "one record per dropped packet: {:?}",
        r.by
    );
    assert_eq!(r.exact("insert_failed"), kernel.insert_failed, "{:?}", r.by);
}
