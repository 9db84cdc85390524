//! Helpers for ctrace's real-kernel tests: throwaway network namespaces, sysctl guards that
//! restore on every exit path (panics included), the kernel's conntrack counters, bounded traffic
//! (`traffic`), ctrace as a child process (`child`), its JSON records (`events`), checks that report
//! every failure (`checks`) and what tests inside VM guests change (`guest`).
//!
//! Every test traffic goes to loopback inside a netns the test created (or inside a VM guest);
//! every loop is bounded.

use std::{fs, net::SocketAddrV4, path::PathBuf};

use anyhow::Context as _;

pub mod bench;
pub mod bpf_objects;
pub mod caps;
pub mod checks;
pub mod child;
pub mod events;
pub mod flood;
pub mod guest;
pub mod packets;
pub mod prometheus;
pub mod scraper;
pub mod soak;
pub mod threads;
pub mod topology;
pub mod traffic;

pub use child::{Ctrace, CtraceText};

/// The ctrace binary under test (`cargo xtask test` sets CTRACE_BIN).
pub fn ctrace_bin() -> PathBuf {
    let p = std::env::var_os("CTRACE_BIN")
        .map(PathBuf::from)
        .expect("CTRACE_BIN is not set: run these tests with `cargo xtask test`");
    assert!(p.exists(), "CTRACE_BIN={} does not exist", p.display());
    p
}

/// These tests need root; a skipped test would prove nothing, so they fail instead.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "real-kernel tests need root: run `sudo cargo xtask test`"
    );
}

/// Runs `args[0]` with the rest as arguments; its stdout, or an error with its stderr when it fails.
pub use ctrace::demo::sh as run;

/// A named netns (`ip netns add`), deleted on drop.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    /// Creates the netns with loopback up and conntrack enabled (IPv4 and IPv6) by a conntrack match in OUTPUT.
    pub fn new(tag: &str) -> anyhow::Result<TestNetns> {
        let ns = TestNetns::bare(tag)?;
        for tool in ["iptables", "ip6tables"] {
            ns.exec(&[&[tool, "-w"], &ctrace::demo::TRACK_OUTPUT_RULE[..]].concat())?;
        }
        Ok(ns)
    }

    /// Creates the netns with loopback up and no ruleset: conntrack does not track its traffic.
    pub fn bare(tag: &str) -> anyhow::Result<TestNetns> {
        let name = format!("ctrace-test-{}-{tag}", std::process::id());
        run(&["ip", "netns", "add", &name])?;
        let ns = TestNetns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(format!("/run/netns/{}", self.name))
            .map(|m| m.ino())
            .unwrap_or(0)
    }

    /// The kernel's conntrack counters of this netns, summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<Counters> {
        Counters::parse(&self.exec(&["cat", "/proc/net/stat/nf_conntrack"])?)
    }

    /// Sends one datagram to each of `count` distinct destinations `traffic::flow_destination(i, port)`, from a
    /// thread inside this netns. Returns the destinations used and how many sends failed.
    pub fn udp_flows(&self, first: u32, count: u32, port: u16) -> anyhow::Result<(Vec<SocketAddrV4>, u32)> {
        let sends = self.in_netns(move || traffic::udp_flows(first, count, port))?;
        let sent = (first..first + count)
            .map(|i| traffic::flow_destination(i, port))
            .collect();
        Ok((sent, sends.failed))
    }

    /// Runs `f` on a thread inside this netns (sockets it opens belong to the netns).
    pub fn in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || -> anyhow::Result<T> {
            let file = fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    }

    /// An iptables rule that drops every UDP packet this netns sends to `port`; its packet counter (read with
    /// `rule_packets(.., "filter", "OUTPUT", comment)`) is the truth for the netfilter_rule drops.
    pub fn drop_udp_to(&self, port: u16, comment: &str) -> anyhow::Result<()> {
        let port = port.to_string();
        self.exec(&[
            "iptables",
            "-w",
            "-I",
            "OUTPUT",
            "-p",
            "udp",
            "--dport",
            &port,
            "-m",
            "comment",
            "--comment",
            comment,
            "-j",
            "DROP",
        ])
        .map(drop)
    }

    /// The packet counter of the rule whose comment is `comment` (`-m comment --comment`), read with
    /// `iptables -vnxL`: the ruleset's own count of what it dropped. `tool` is iptables or ip6tables.
    pub fn rule_packets(&self, tool: &str, table: &str, chain: &str, comment: &str) -> anyhow::Result<u64> {
        let text = self.exec(&[tool, "-w", "-t", table, "-vnxL", chain])?;
        rule_packets(&text, comment)
            .with_context(|| format!("no rule /* {comment} */ in {tool} -t {table} {chain}:\n{text}"))
    }

    /// The packets of nftables named counter `name` in table `inet ctrace`.
    pub fn nft_counter(&self, name: &str) -> anyhow::Result<u64> {
        let text = self.exec(&["nft", "list", "counter", "inet", "ctrace", name])?;
        nft_packets(&text).with_context(|| format!("no packets in `nft list counter inet ctrace {name}`:\n{text}"))
    }

    /// Loads an nftables ruleset (the text of an `nft -f` file) into this netns.
    pub fn nft(&self, ruleset: &str) -> anyhow::Result<()> {
        let path = std::env::temp_dir().join(format!("{}.nft", self.name));
        fs::write(&path, ruleset)?;
        let result = self.exec(&["nft", "-f", &path.to_string_lossy()]);
        let _ = fs::remove_file(&path);
        result.map(|_| ())
    }
}

/// The `pkts` column of the `iptables -vnxL` line that carries `/* comment */`.
pub fn rule_packets(listing: &str, comment: &str) -> Option<u64> {
    let tag = format!("/* {comment} */");
    listing
        .lines()
        .find(|l| l.contains(&tag))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// N of `packets N` in `nft list counter` output.
pub fn nft_packets(listing: &str) -> Option<u64> {
    let mut words = listing.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words.next()?.parse().ok();
        }
    }
    None
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub drop: u64,
    pub early_drop: u64,
    pub insert_failed: u64,
    pub invalid: u64,
}

impl Counters {
    /// The sums over CPUs of `/proc/net/stat/nf_conntrack`, parsed by ctrace's own parser.
    pub fn parse(text: &str) -> anyhow::Result<Counters> {
        let stats = ctrace::ctstat::CtStats::parse(text)?;
        Ok(Counters {
            drop: stats.total("drop"),
            early_drop: stats.total("early_drop"),
            insert_failed: stats.total("insert_failed"),
            invalid: stats.total("invalid"),
        })
    }

    /// The counters of the calling thread's netns.
    pub fn read() -> anyhow::Result<Counters> {
        const PATH: &str = "/proc/thread-self/net/stat/nf_conntrack";
        let text = fs::read_to_string(PATH).with_context(|| format!("cannot read {PATH} (is nf_conntrack loaded?)"))?;
        Counters::parse(&text)
    }

    /// `self - before`. Panics when a counter went backwards (a module reload in between, or swapped arguments):
    /// a delta across that would be meaningless.
    pub fn since(&self, before: &Counters) -> Counters {
        let sub = |now: u64, then: u64, name: &str| {
            now.checked_sub(then)
                .unwrap_or_else(|| panic!("the kernel's {name} counter went backwards ({then} -> {now})"))
        };
        Counters {
            drop: sub(self.drop, before.drop, "drop"),
            early_drop: sub(self.early_drop, before.early_drop, "early_drop"),
            insert_failed: sub(self.insert_failed, before.insert_failed, "insert_failed"),
            invalid: sub(self.invalid, before.invalid, "invalid"),
        }
    }

    pub fn plus(&self, other: &Counters) -> Counters {
        Counters {
            drop: self.drop + other.drop,
            early_drop: self.early_drop + other.early_drop,
            insert_failed: self.insert_failed + other.insert_failed,
            invalid: self.invalid + other.invalid,
        }
    }
}

/// Sets a sysctl (by /proc/sys path) and restores the old value on drop, panics included.
pub struct SysctlGuard {
    path: String,
    old: String,
}

impl SysctlGuard {
    pub fn set(path: &str, value: &str) -> anyhow::Result<SysctlGuard> {
        let old = fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        fs::write(path, value).with_context(|| format!("cannot write {path}"))?;
        Ok(SysctlGuard {
            path: path.to_owned(),
            old: old.trim().to_owned(),
        })
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.path, &self.old) {
            eprintln!("FAILED TO RESTORE {} to {}: {e}", self.path, self.old);
        }
    }
}

/// A `/proc/PID/status` memory field (`VmRSS`, `VmHWM`) in KiB.
pub fn memory_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_counters_are_read_from_listings() {
        let ipt = "Chain OUTPUT (policy ACCEPT 0 packets, 0 bytes)\n    pkts      bytes target     prot opt in     out     source               destination\n     200     5800 DROP       17   --  *      *       0.0.0.0/0            0.0.0.0/0            udp dpt:7 /* truth */\n";
        assert_eq!(rule_packets(ipt, "truth"), Some(200));
        assert_eq!(rule_packets(ipt, "other"), None);
        let nft = "table inet ctrace {\n\tcounter truth {\n\t\tpackets 17 bytes 493\n\t}\n}\n";
        assert_eq!(nft_packets(nft), Some(17));
    }

    #[test]
    fn counters_sum_cpus() {
        let text = "entries  invalid drop early_drop insert_failed\n00000001 00000001 00000002 00000003 00000000\n00000001 00000000 000000f0 00000000 00000001\n";
        let c = Counters::parse(text).unwrap();
        assert_eq!(
            c,
            Counters {
                drop: 242,
                early_drop: 3,
                insert_failed: 1,
                invalid: 1
            }
        );
    }
}
