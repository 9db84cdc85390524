//! Helpers for ctrace's real-kernel tests: throwaway network namespaces, sysctl guards that
//! restore on every exit path (panics included), bounded traffic, and a ctrace child process.
//!
//! Every test traffic goes to loopback inside a netns the test created; every loop is bounded.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

pub mod bench;
pub mod packets;
pub mod threads;
pub mod topology;

/// Flow indexes must keep the second address byte at most 255: 1 + (i >> 16) <= 255.
pub const MAX_FLOWS: u32 = 255 << 16;

/// The destination of flow `i`: 127.(1+i>>16).(i>>8&255).(i&255):port, one address per flow, all on loopback.
pub fn flow_destination(i: u32, port: u16) -> SocketAddrV4 {
    let [_, b, c, d] = i.to_be_bytes();
    SocketAddrV4::new(Ipv4Addr::new(127, 1 + b, c, d), port)
}

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

fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named netns (`ip netns add`), deleted on drop.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    /// Creates the netns with loopback up and conntrack enabled (IPv4 and IPv6) by a conntrack match in OUTPUT.
    pub fn new(tag: &str) -> anyhow::Result<TestNetns> {
        let ns = TestNetns::bare(tag)?;
        for tool in ["iptables", "ip6tables"] {
            ns.exec(&[
                tool,
                "-w",
                "-A",
                "OUTPUT",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW,ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ])?;
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

    /// Sends one datagram to each of `count` distinct destinations 127.(1+i>>16).(i>>8).i:port,
    /// from a thread inside this netns. Returns the destinations used and how many sends failed.
    pub fn udp_flows(&self, first: u32, count: u32, port: u16) -> anyhow::Result<(Vec<SocketAddrV4>, u32)> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || -> anyhow::Result<(Vec<SocketAddrV4>, u32)> {
            let f = fs::File::open(&path)?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let sock = UdpSocket::bind("127.0.0.1:0")?;
            let mut sent = Vec::with_capacity(count as usize);
            let mut failed = 0;
            for i in first..first + count {
                let dst = flow_destination(i, port);
                if sock.send_to(b"x", dst).is_err() {
                    failed += 1;
                }
                sent.push(dst);
            }
            Ok((sent, failed))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("traffic thread panicked"))?
    }
}

impl TestNetns {
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

    pub fn since(&self, before: &Counters) -> Counters {
        Counters {
            drop: self.drop - before.drop,
            early_drop: self.early_drop - before.early_drop,
            insert_failed: self.insert_failed - before.insert_failed,
            invalid: self.invalid - before.invalid,
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

const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// `ctrace run --json ...` as a child; stdout lines are collected as JSON values.
pub struct Ctrace {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub events: Vec<Value>,
}

impl Ctrace {
    /// Starts ctrace and waits until its probes are attached (the `mode` event), which must name the mode in
    /// CTRACE_TEST_EXPECT_MODE when that is set (the VM runs set it). The bounds are generous for emulated
    /// guests, where start-up (BTF parsing, verification) is slow.
    pub fn start(args: &[&str]) -> anyhow::Result<Ctrace> {
        let mut child = Command::new(ctrace_bin())
            .arg("run")
            .arg("--json")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start ctrace")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut c = Ctrace {
            child,
            lines: rx,
            events: vec![],
        };
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        while Instant::now() < deadline {
            match c.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
                    let is_mode = v["event"] == "mode";
                    if is_mode
                        && let Ok(want) = std::env::var("CTRACE_TEST_EXPECT_MODE")
                        && v["mode"] != want.as_str()
                    {
                        bail!(
                            "ctrace attached in {} mode, this run expects {want} mode: {v}",
                            v["mode"]
                        );
                    }
                    c.events.push(v);
                    if is_mode {
                        return Ok(c);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = c.child.try_wait()? {
                        bail!("ctrace exited before attaching: {status}");
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("ctrace closed stdout before attaching"),
            }
        }
        bail!("ctrace did not attach within {ATTACH_TIMEOUT:?}")
    }

    /// Collects output until an event for which `pred` is true arrives (returned) or `timeout` passes (None).
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Option<Value>> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
                    let hit = pred(&v);
                    self.events.push(v.clone());
                    if hit {
                        return Ok(Some(v));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("ctrace closed stdout"),
            }
        }
        Ok(None)
    }

    /// Sends SIGINT and collects the rest of the output. Returns the summary.
    pub fn stop(mut self) -> anyhow::Result<(Vec<Value>, Value)> {
        // Give the one-second counter poll a chance to see the last traffic.
        std::thread::sleep(Duration::from_millis(1500));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::SIGINT,
        )?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => self
                    .events
                    .push(serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    bail!("ctrace did not exit within {STOP_TIMEOUT:?} of SIGINT");
                }
                Err(_) => {}
            }
        }
        let status = self.child.wait()?;
        if !status.success() {
            bail!("ctrace exited with {status}");
        }
        let summaries: Vec<&Value> = self.events.iter().filter(|v| v["event"] == "summary").collect();
        if summaries.len() != 1 {
            bail!("expected exactly one summary, got {}", summaries.len());
        }
        let summary = summaries[0].clone();
        Ok((std::mem::take(&mut self.events), summary))
    }
}

impl Drop for Ctrace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
