//! Who writes conntrack sysctls (ctrace-ebpf/src/probes/sysctl.rs): a cgroup/sysctl program on
//! the cgroup v2 root, so every process on the host is covered.

use std::{fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSysctl},
};
use ctrace_common::SysctlEvent;

use crate::sanitize::kernel_str;

/// The cgroup v2 root (where the program sees every process).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    cgroup2_in(&mounts)
}

fn cgroup2_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let (_, dir, fstype) = (it.next()?, it.next()?, it.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// cgroup/sysctl programs may call the task helpers (pid, uid, comm) since 6.1.
pub fn task_helpers(release: &str) -> bool {
    crate::check::facts::KernelVersion::parse(release).is_some_and(|k| k.at_least(6, 1))
}

pub fn attach(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let root = cgroup2_root().ok_or_else(|| anyhow!("no cgroup v2 hierarchy is mounted"))?;
    let cgroup = fs::File::open(&root).with_context(|| format!("cannot open {}", root.display()))?;
    let p: &mut CgroupSysctl = ebpf
        .program_mut("sysctl_watch")
        .context("sysctl program missing")?
        .try_into()?;
    p.load().context("the kernel refused the cgroup/sysctl program")?;
    // On 5.7+ this is a BPF link, which never displaces other programs (links take no flags).
    p.attach(cgroup, CgroupAttachMode::Single)
        .with_context(|| format!("cannot attach a cgroup/sysctl program to {}", root.display()))?;
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysctlWrite {
    pub ts_ns: u64,
    /// Dotted, e.g. `net.netfilter.nf_conntrack_max`.
    pub key: String,
    pub old: String,
    pub new: String,
    /// (pid, uid, comm) when the kernel tells.
    pub task: Option<(u32, u32, String)>,
    /// The writer's netns inode (6.1+): a per-netns key written in a container's netns changes only that one.
    pub netns: Option<u32>,
}

pub fn parse_record(bytes: &[u8]) -> Option<SysctlWrite> {
    if bytes.len() < std::mem::size_of::<SysctlEvent>() {
        return None;
    }
    // SAFETY: SysctlEvent is repr(C) plain data and `bytes` is long enough.
    let ev: SysctlEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const SysctlEvent) };
    // Values arrive as written ("1048576\n", tab-separated lists): whitespace becomes one space.
    let value = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        let spaced: Vec<u8> = b[..end]
            .iter()
            .map(|&c| if c.is_ascii_whitespace() { b' ' } else { c })
            .collect();
        kernel_str(&spaced).split_whitespace().collect::<Vec<_>>().join(" ")
    };
    Some(SysctlWrite {
        ts_ns: ev.ts_ns,
        key: kernel_str(&ev.name).replace('/', "."),
        old: value(&ev.old),
        new: value(&ev.new),
        task: (ev.has_task != 0).then(|| (ev.pid, ev.uid, kernel_str(&ev.comm))),
        netns: (ev.has_task != 0 && ev.netns != 0).then_some(ev.netns),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ctrace_common::{SYSCTL_NAME_LEN, SYSCTL_VALUE_LEN, TASK_COMM_LEN};

    #[test]
    fn finds_the_cgroup2_mount() {
        let m = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_in(m), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_in("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn decodes_a_write() {
        let mut ev = SysctlEvent {
            ts_ns: 1,
            pid: 42,
            uid: 0,
            has_task: 1,
            netns: 0,
            comm: [0; TASK_COMM_LEN],
            name: [0; SYSCTL_NAME_LEN],
            old: [0; SYSCTL_VALUE_LEN],
            new: [0; SYSCTL_VALUE_LEN],
        };
        ev.comm[..10].copy_from_slice(b"kube-proxy");
        let name = b"net/netfilter/nf_conntrack_max";
        ev.name[..name.len()].copy_from_slice(name);
        ev.old[..7].copy_from_slice(b"262144\n");
        ev.new[..7].copy_from_slice(b"131072\n");
        let bytes: &[u8] =
            unsafe { std::slice::from_raw_parts(&ev as *const _ as *const u8, std::mem::size_of::<SysctlEvent>()) };
        let w = parse_record(bytes).unwrap();
        assert_eq!(w.key, "net.netfilter.nf_conntrack_max");
        assert_eq!((w.old.as_str(), w.new.as_str()), ("262144", "131072"));
        assert_eq!(w.task, Some((42, 0, "kube-proxy".into())));
        assert!(parse_record(&bytes[..10]).is_none());
        assert!(task_helpers("6.1.0-56-amd64") && !task_helpers("5.10.0-46-cloud-amd64"));
    }
}
