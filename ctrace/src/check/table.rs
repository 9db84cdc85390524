//! What the conntrack table holds now: `/proc/net/nf_conntrack` (needs CONFIG_NF_CONNTRACK_PROCFS) or, on the live
//! host when that file does not exist, `conntrack -L -o extended` (netlink). Both print the same line format:
//! `ipv4 2 tcp 6 431999 ESTABLISHED src=A dst=B sport=1 dport=22 src=B dst=A sport=22 dport=1 [ASSURED] ...`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{BufRead as _, BufReader, Read},
    net::IpAddr,
    process::{Command, Stdio},
};

use super::{Ctx, clean};

pub const PROC_TABLE: &str = "/proc/net/nf_conntrack";
/// Lines read at most (a full table of millions of entries is summarised from its first lines).
const MAX_LINES: u64 = 4_000_000;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub proto: String,
    pub timeout: u64,
    pub state: Option<String>,
    pub orig: Tuple,
    pub reply: Tuple,
    pub unreplied: bool,
    pub helper: Option<String>,
}

impl Entry {
    /// The reply tuple is not the mirror of the original one: the flow is NAT'd.
    pub fn is_nat(&self) -> bool {
        self.reply.src != self.orig.dst
            || self.reply.dst != self.orig.src
            || self.reply.sport != self.orig.dport
            || self.reply.dport != self.orig.sport
    }
}

pub fn parse_entry(line: &str) -> Option<Entry> {
    let mut words = line.split_whitespace().peekable();
    if matches!(words.peek(), Some(&"ipv4") | Some(&"ipv6")) {
        words.next();
        words.next();
    }
    let proto = clean(words.next()?);
    let _protonum: u16 = words.next()?.parse().ok()?;
    let timeout: u64 = words.next()?.parse().ok()?;
    let mut e = Entry {
        proto,
        timeout,
        ..Entry::default()
    };
    let mut srcs = 0;
    for w in words {
        if w == "[UNREPLIED]" {
            e.unreplied = true;
            continue;
        }
        let Some((k, v)) = w.split_once('=') else {
            if e.state.is_none() && srcs == 0 && !w.starts_with('[') {
                e.state = Some(clean(w));
            }
            continue;
        };
        if k == "src" {
            srcs += 1;
        }
        let t = if srcs <= 1 { &mut e.orig } else { &mut e.reply };
        match k {
            "src" => t.src = v.parse().ok(),
            "dst" => t.dst = v.parse().ok(),
            "sport" => t.sport = v.parse().ok(),
            "dport" => t.dport = v.parse().ok(),
            "helper" => e.helper = Some(clean(v)),
            _ => {}
        }
    }
    Some(e)
}

/// Entries to one destination port of one protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortStat {
    pub entries: u64,
    /// NAT'd: cannot be exempted from tracking (NAT needs conntrack).
    pub nat: u64,
    /// Handled by a helper (ftp, sip, ...): cannot be exempted either.
    pub helper: u64,
    /// NAT'd or with a helper (each entry counted once).
    pub blocked: u64,
    /// This host is the destination (original direction to a local address).
    pub to_local: u64,
    /// This host is the source.
    pub from_local: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Table {
    /// Where the entries came from (`/proc/net/nf_conntrack` or `conntrack -L`).
    pub source: String,
    pub total: u64,
    pub by_proto: BTreeMap<String, u64>,
    pub by_port: HashMap<(String, u16), PortStat>,
    pub tcp_states: BTreeMap<String, u64>,
    /// ESTABLISHED entries idle for more than an hour (remaining timeout tells the idle time).
    pub established_idle_1h: u64,
    pub unreplied_by_proto: BTreeMap<String, u64>,
    /// Local addresses were known, so `to_local`/`from_local` mean something.
    pub roles_known: bool,
    pub truncated: bool,
}

impl Table {
    pub fn add(&mut self, e: &Entry, est_timeout: Option<u64>, local: Option<&HashSet<IpAddr>>) {
        self.total += 1;
        *self.by_proto.entry(e.proto.clone()).or_default() += 1;
        if e.proto == "tcp"
            && let Some(s) = &e.state
        {
            *self.tcp_states.entry(s.clone()).or_default() += 1;
            if s == "ESTABLISHED" && est_timeout.is_some_and(|t| t.saturating_sub(e.timeout) > 3600) {
                self.established_idle_1h += 1;
            }
        }
        if e.unreplied {
            *self.unreplied_by_proto.entry(e.proto.clone()).or_default() += 1;
        }
        if let Some(port) = e.orig.dport {
            let p = self.by_port.entry((e.proto.clone(), port)).or_default();
            p.entries += 1;
            if e.is_nat() {
                p.nat += 1;
            }
            if e.helper.is_some() {
                p.helper += 1;
            }
            if e.is_nat() || e.helper.is_some() {
                p.blocked += 1;
            }
            if let Some(local) = local {
                if e.orig.dst.is_some_and(|a| local.contains(&a)) {
                    p.to_local += 1;
                } else if e.orig.src.is_some_and(|a| local.contains(&a)) {
                    p.from_local += 1;
                }
            }
        }
    }

    fn read_lines(&mut self, r: impl Read, est_timeout: Option<u64>, local: Option<&HashSet<IpAddr>>) {
        let mut n = 0u64;
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            n += 1;
            if n > MAX_LINES {
                self.truncated = true;
                break;
            }
            if let Some(e) = parse_entry(&line) {
                self.add(&e, est_timeout, local);
            }
        }
    }

    /// Ports by entry count, largest first.
    pub fn top_ports(&self, n: usize) -> Vec<(&(String, u16), &PortStat)> {
        let mut v: Vec<_> = self.by_port.iter().collect();
        v.sort_by(|a, b| b.1.entries.cmp(&a.1.entries).then(a.0.cmp(b.0)));
        v.truncate(n);
        v
    }
}

/// Local addresses: `/proc/net/fib_trie` (`/32 host LOCAL`) and `/proc/net/if_inet6`.
pub fn local_addresses(ctx: &mut Ctx) -> Option<HashSet<IpAddr>> {
    let mut out = HashSet::new();
    let trie = ctx.read("/proc/net/fib_trie");
    if let Some(trie) = &trie {
        let mut last: Option<IpAddr> = None;
        for line in trie.lines() {
            let l = line.trim();
            if let Some(a) = l.strip_prefix("|-- ") {
                last = a.trim().parse().ok();
            } else if l.starts_with("/32 host LOCAL")
                && let Some(a) = last
            {
                out.insert(a);
            }
        }
    }
    let v6 = ctx.read("/proc/net/if_inet6");
    if let Some(v6) = &v6 {
        for line in v6.lines() {
            let Some(hex) = line.split_whitespace().next() else {
                continue;
            };
            if let Ok(n) = u128::from_str_radix(hex, 16)
                && hex.len() == 32
            {
                out.insert(IpAddr::V6(std::net::Ipv6Addr::from(n)));
            }
        }
    }
    (trie.is_some() || v6.is_some()).then_some(out)
}

/// Reads the table (see the module comment); None when it cannot be read, with the reason noted.
pub fn read(ctx: &mut Ctx, est_timeout: Option<u64>) -> Option<Table> {
    let local = local_addresses(ctx);
    let mut t = Table {
        roles_known: local.is_some(),
        ..Table::default()
    };
    match ctx.fs.open(PROC_TABLE) {
        Ok(f) => {
            t.source = PROC_TABLE.to_owned();
            t.read_lines(f, est_timeout, local.as_ref());
            return Some(t);
        }
        Err(e) if !e.is_not_found() => {
            if !ctx.fs.is_host() {
                ctx.note(&e);
                return None;
            }
            // Not readable (not root): conntrack -L needs CAP_NET_ADMIN, try it anyway below.
            ctx.note(&e);
        }
        Err(_) => {}
    }
    if !ctx.fs.is_host() {
        ctx.unreadable(
            PROC_TABLE,
            "no such file (the kernel lacks CONFIG_NF_CONNTRACK_PROCFS, or it is not in this tree); entries per port are unknown",
        );
        return None;
    }
    t.source = "conntrack -L -o extended".to_owned();
    for family in ["ipv4", "ipv6"] {
        let child = Command::new("conntrack")
            .args(["-L", "-o", "extended", "-f", family])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                ctx.unreadable(
                    "conntrack -L",
                    "/proc/net/nf_conntrack does not exist (CONFIG_NF_CONNTRACK_PROCFS is off) and the `conntrack` command is not installed (apt install conntrack / dnf install conntrack-tools)",
                );
                return None;
            }
            Err(e) => {
                ctx.unreadable(
                    "conntrack -L",
                    format!("cannot run conntrack: {}", clean(&e.to_string())),
                );
                return None;
            }
        };
        if let Some(out) = child.stdout.take() {
            t.read_lines(out, est_timeout, local.as_ref());
        }
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        match child.wait() {
            Ok(s) if s.success() => {}
            _ => {
                let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("failed");
                ctx.unreadable(
                    format!("conntrack -L -f {family}"),
                    format!("{} (it needs CAP_NET_ADMIN: run as root)", clean(first)),
                );
                return None;
            }
        }
    }
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_procfs_and_conntrack_lines() {
        let e = parse_entry("ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=5555 dport=22 src=10.0.0.2 dst=10.0.0.1 sport=22 dport=5555 [ASSURED] mark=0 zone=0 use=2").unwrap();
        assert_eq!(e.proto, "tcp");
        assert_eq!(e.timeout, 431999);
        assert_eq!(e.state.as_deref(), Some("ESTABLISHED"));
        assert_eq!(e.orig.dport, Some(22));
        assert_eq!(e.reply.sport, Some(22));
        assert!(!e.is_nat());
        let u = parse_entry("udp      17 29 src=192.168.1.5 dst=8.8.8.8 sport=45000 dport=53 [UNREPLIED] src=8.8.8.8 dst=203.0.113.1 sport=53 dport=45000 mark=0 use=1").unwrap();
        assert!(u.unreplied && u.state.is_none());
        assert!(u.is_nat(), "SNAT: the reply goes to another address");
        let v6 = parse_entry("ipv6     10 udp      17 20 src=0000:0000:0000:0000:0000:0000:0000:0001 dst=0000:0000:0000:0000:0000:0000:0000:0001 sport=1 dport=53 src=0000:0000:0000:0000:0000:0000:0000:0001 dst=0000:0000:0000:0000:0000:0000:0000:0001 sport=53 dport=1 helper=x mark=0").unwrap();
        assert_eq!(v6.orig.src, Some("::1".parse().unwrap()));
        assert_eq!(v6.helper.as_deref(), Some("x"));
        assert!(parse_entry("garbage").is_none());
        assert!(parse_entry("").is_none());
    }
}
