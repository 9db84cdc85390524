//! A netns flood from an unprivileged user namespace, as any local user can make one: a process that dropped
//! root (uid/gid `uid`, no capabilities left) creates its own user namespace, then `count` network namespaces
//! in it, one after another. Each gets loopback up and an nftables ruleset (NOTRACK and a counted DROP of UDP to
//! `port`: a user namespace's root may set rules in its own netns), takes `sends` datagrams that the rule drops,
//! and stays alive through a file descriptor (so every netns keeps its own inode number) until the caller lets go.
//! The truth it reports: datagrams sent, sends the kernel refused, and the sum of the rules' own counters.
//!
//! Must run in a single-threaded process (`unshare(CLONE_NEWUSER)` refuses threaded callers): `ctrace-testkit
//! netns-flood` runs it.

use std::{
    fs,
    net::{Ipv4Addr, UdpSocket},
    os::{fd::OwnedFd, unix::fs::MetadataExt as _},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use nix::sched::{CloneFlags, unshare};

/// The nftables ruleset each netns gets (the counter is the truth for its drops).
pub fn ruleset(port: u16) -> String {
    format!(
        "table inet flood {{
    counter dropped {{ }}
    chain raw_out {{ type filter hook output priority raw; policy accept; udp dport {port} notrack; }}
    chain out {{ type filter hook output priority filter; policy accept; udp dport {port} counter name dropped drop; }}
}}
"
    )
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodReport {
    pub netns: u64,
    pub sent: u64,
    pub refused: u64,
    /// Sum of every netns's DROP rule counter.
    pub counted: u64,
    /// The effective capabilities (init user namespace) the flood ran with, from /proc/self/status.
    pub cap_eff: u64,
    pub uid: u32,
}

impl FloodReport {
    pub fn line(&self) -> String {
        format!(
            "netns={} sent={} refused={} counted={} cap_eff={:x} uid={}",
            self.netns, self.sent, self.refused, self.counted, self.cap_eff, self.uid
        )
    }

    pub fn parse(line: &str) -> anyhow::Result<FloodReport> {
        let mut r = FloodReport::default();
        for word in line.split_whitespace() {
            let (k, v) = word.split_once('=').with_context(|| format!("bad word {word:?}"))?;
            match k {
                "netns" => r.netns = v.parse()?,
                "sent" => r.sent = v.parse()?,
                "refused" => r.refused = v.parse()?,
                "counted" => r.counted = v.parse()?,
                "cap_eff" => r.cap_eff = u64::from_str_radix(v, 16)?,
                "uid" => r.uid = v.parse()?,
                _ => bail!("unknown field {k:?} in {line:?}"),
            }
        }
        Ok(r)
    }
}

/// Drops root for good: supplementary groups, gid and uid become `uid` (no capabilities survive setuid).
fn drop_root(uid: u32) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let id = nix::unistd::Uid::from_raw(uid);
    let gid = nix::unistd::Gid::from_raw(uid);
    nix::unistd::setgroups(&[]).context("setgroups")?;
    nix::unistd::setresgid(gid, gid, gid).context("setresgid")?;
    nix::unistd::setresuid(id, id, id).context("setresuid")?;
    // A uid change makes the process non-dumpable, and then its /proc/self files (uid_map) belong to root.
    // SAFETY: plain prctl.
    ensure!(
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) } == 0,
        "PR_SET_DUMPABLE failed"
    );
    Ok(())
}

/// A user namespace of our own, in which we are root (and may create netns and set their rules).
fn enter_user_namespace(uid: u32, gid: u32) -> anyhow::Result<()> {
    unshare(CloneFlags::CLONE_NEWUSER).context(
        "unshare(CLONE_NEWUSER) failed: this host does not let unprivileged users create user namespaces \
         (user.max_user_namespaces, kernel.unprivileged_userns_clone or an LSM)",
    )?;
    fs::write("/proc/self/setgroups", "deny")?;
    fs::write("/proc/self/uid_map", format!("0 {uid} 1"))?;
    fs::write("/proc/self/gid_map", format!("0 {gid} 1"))?;
    Ok(())
}

/// Lifts the soft open-file limit to the hard one, which must allow `needed`.
fn raise_open_files(needed: u64) -> anyhow::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill and then pass back.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0,
            "getrlimit: {}",
            std::io::Error::last_os_error()
        );
        ensure!(
            lim.rlim_max >= needed,
            "the hard open-file limit ({}) cannot hold {needed} netns descriptors",
            lim.rlim_max
        );
        lim.rlim_cur = lim.rlim_max;
        ensure!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn nft(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("nft").args(args).output().context("cannot run nft")?;
    ensure!(
        out.status.success(),
        "nft {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the flood; returns the report and the descriptors that keep the netns alive.
pub fn flood(
    uid: u32,
    count: u32,
    port: u16,
    sends: u32,
    ruleset_file: &Path,
) -> anyhow::Result<(FloodReport, Vec<OwnedFd>)> {
    drop_root(uid)?;
    let mut report = FloodReport {
        cap_eff: ctrace::capabilities::CapSet::read_effective()
            .context("no CapEff in /proc/self/status")?
            .0,
        uid: nix::unistd::getuid().as_raw(),
        ..Default::default()
    };
    raise_open_files(u64::from(count) + 64)?;
    enter_user_namespace(report.uid, nix::unistd::getgid().as_raw())?;
    let ruleset = ruleset_file.to_string_lossy().into_owned();
    let mut held = Vec::with_capacity(count as usize);
    for i in 0..count {
        unshare(CloneFlags::CLONE_NEWNET).with_context(|| format!("unshare(CLONE_NEWNET) #{i}"))?;
        let ns = fs::File::open("/proc/thread-self/ns/net")?;
        ensure!(ns.metadata()?.ino() != 0, "netns #{i} has no inode");
        crate::threads::loopback_up()?;
        nft(&["-f", &ruleset])?;
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        for _ in 0..sends {
            report.sent += 1;
            report.refused += u64::from(sock.send_to(b"x", (Ipv4Addr::LOCALHOST, port)).is_err());
        }
        let listing = nft(&["list", "counter", "inet", "flood", "dropped"])?;
        report.counted += crate::nft_packets(&listing).with_context(|| format!("no packets in {listing:?}"))?;
        held.push(OwnedFd::from(ns));
        report.netns += 1;
    }
    Ok((report, held))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        let r = FloodReport {
            netns: 4200,
            sent: 8400,
            refused: 8400,
            counted: 8400,
            cap_eff: 0,
            uid: 65534,
        };
        assert_eq!(FloodReport::parse(&r.line()).unwrap(), r);
        assert!(ruleset(7).contains("udp dport 7 counter name dropped drop"));
    }
}
