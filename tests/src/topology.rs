//! A router between two hosts, all netns: `a` (10.77.1.2, fd77:1::2) — veth — `r` — veth — `b` (10.77.2.2,
//! fd77:2::2). `a` and `b` have no ruleset, so conntrack tracks only what `r` forwards: the drops of interest
//! happen in softirq on `r`'s side, as on a real router or Kubernetes node.

use std::{
    net::{Ipv4Addr, Ipv6Addr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::TestNetns;

/// Where the warm-up datagrams go (nothing listens: `b` answers with port unreachable).
pub const WARM_UP_PORT: u16 = 5;

pub const A4: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
pub const B4: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 2);
pub const A6: Ipv6Addr = Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 2);
pub const B6: Ipv6Addr = Ipv6Addr::new(0xfd77, 2, 0, 0, 0, 0, 0, 2);

pub struct Router {
    pub a: TestNetns,
    pub r: TestNetns,
    pub b: TestNetns,
}

impl Router {
    /// Builds the three netns and their links, enables forwarding in `r` and resolves the neighbours (so no
    /// test packet waits in, or is dropped from, a neighbour queue).
    pub fn new(tag: &str) -> anyhow::Result<Router> {
        let a = TestNetns::bare(&format!("{tag}-a"))?;
        let r = TestNetns::bare(&format!("{tag}-r"))?;
        let b = TestNetns::bare(&format!("{tag}-b"))?;
        for (host, host_if, router_if, net) in [(&a, "a0", "r0", 1), (&b, "b0", "r1", 2)] {
            r.exec(&[
                "ip", "link", "add", router_if, "type", "veth", "peer", "name", host_if, "netns", &host.name,
            ])?;
            r.exec(&["ip", "addr", "add", &format!("10.77.{net}.1/24"), "dev", router_if])?;
            r.exec(&[
                "ip",
                "addr",
                "add",
                &format!("fd77:{net}::1/64"),
                "dev",
                router_if,
                "nodad",
            ])?;
            r.exec(&["ip", "link", "set", router_if, "up"])?;
            host.exec(&["ip", "addr", "add", &format!("10.77.{net}.2/24"), "dev", host_if])?;
            host.exec(&[
                "ip",
                "addr",
                "add",
                &format!("fd77:{net}::2/64"),
                "dev",
                host_if,
                "nodad",
            ])?;
            host.exec(&["ip", "link", "set", host_if, "up"])?;
            host.exec(&["ip", "route", "add", "default", "via", &format!("10.77.{net}.1")])?;
            host.exec(&["ip", "-6", "route", "add", "default", "via", &format!("fd77:{net}::1")])?;
        }
        r.in_netns(|| {
            // /proc/sys/net shows the netns of the thread that opens it.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
            Ok(())
        })?;
        let router = Router { a, r, b };
        router.resolve_neighbours()?;
        Ok(router)
    }

    /// Sends a datagram across (both families) until every hop has a usable neighbour entry (at most 10 s).
    fn resolve_neighbours(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.a.in_netns(|| {
                Router::a_socket_v4()?.send_to(b"warm-up", (B4, WARM_UP_PORT))?;
                Router::a_socket_v6()?.send_to(b"warm-up", (B6, WARM_UP_PORT))?;
                Ok(())
            })?;
            std::thread::sleep(Duration::from_millis(100));
            let resolved = |ns: &TestNetns, hops: [&str; 2]| -> anyhow::Result<bool> {
                let table = ns.exec(&["ip", "neigh", "show"])?;
                Ok(hops.iter().all(|hop| {
                    table
                        .lines()
                        .any(|l| l.starts_with(&format!("{hop} ")) && l.contains("lladdr"))
                }))
            };
            if resolved(&self.a, ["10.77.1.1", "fd77:1::1"])? && resolved(&self.r, ["10.77.2.2", "fd77:2::2"])? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the router's neighbours did not resolve within 10 s");
            }
        }
    }

    /// A UDP socket in `a`'s netns for the calling thread, which must be inside `a` (see `threads::on_cpus`).
    pub fn a_socket_v4() -> std::io::Result<UdpSocket> {
        UdpSocket::bind((A4, 0))
    }

    pub fn a_socket_v6() -> std::io::Result<UdpSocket> {
        UdpSocket::bind((A6, 0))
    }
}
