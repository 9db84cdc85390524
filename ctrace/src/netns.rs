//! Network namespaces: inode → `ip netns` name, and reading a netns's conntrack counters.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::ctstat::CtStats;

/// Where a netns can be entered from: a bind mount (`ip netns add`) or a process inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handle {
    Named(PathBuf),
    /// A task (thread) inside the netns: threads can be in other netns than their process.
    Task {
        pid: u32,
        tid: u32,
    },
}

#[derive(Clone, Debug, Default)]
pub struct NetnsInfo {
    pub name: Option<String>,
    pub handle: Option<Handle>,
}

/// All network namespaces that can be found: /run/netns (names) and /proc/*/task/*/ns/net.
#[derive(Debug, Default)]
pub struct Registry {
    pub known: HashMap<u32, NetnsInfo>,
    /// When an unknown netns last caused a rescan.
    last_lookup: Option<std::time::Instant>,
    /// Netns a rescan did not find (no bind mount, no task inside, e.g. kept by a file descriptor): drops from
    /// them rescan no more until the next periodic `rescan`, which looks for every netns anyway.
    unresolved: std::collections::HashSet<u32>,
    /// Rescans caused by drops from unknown netns.
    pub lookups: u64,
    /// Drops from an unknown netns that were not looked up at once (the rate limit, or a full `unresolved`).
    pub deferred: u64,
}

/// A drop from an unknown netns rescans /proc at most this often: anyone can create netns by the thousand
/// (unprivileged user namespaces), and a rescan reads every task's namespace link.
pub const LOOKUP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Most netns remembered as not found between two periodic rescans.
pub const MAX_UNRESOLVED: usize = 4096;

pub const NETNS_RUN_DIR: &str = "/run/netns";

fn inode(path: &Path) -> Option<u32> {
    fs::metadata(path).ok().map(|m| m.ino() as u32)
}

/// The netns inode of the calling thread.
pub fn current_inode() -> anyhow::Result<u32> {
    inode(Path::new("/proc/thread-self/ns/net")).context("cannot read /proc/thread-self/ns/net")
}

impl Registry {
    pub fn scan() -> Registry {
        let mut r = Registry::default();
        r.rescan();
        r
    }

    /// Makes sure `netns` is known if it can be: rescans when it is neither known nor already looked for since
    /// the last periodic rescan, at most once per LOOKUP_INTERVAL (until then its events carry no name).
    pub fn learn(&mut self, netns: u32) {
        self.learn_with(netns, Self::scan_tasks);
    }

    fn learn_with(&mut self, netns: u32, scan: impl FnOnce(&mut Self)) {
        if netns == 0 || self.known.contains_key(&netns) || self.unresolved.contains(&netns) {
            return;
        }
        if self.last_lookup.is_some_and(|t| t.elapsed() < LOOKUP_INTERVAL) || self.unresolved.len() >= MAX_UNRESOLVED {
            self.deferred += 1;
            return;
        }
        self.last_lookup = Some(std::time::Instant::now());
        self.lookups += 1;
        scan(self);
        if !self.known.contains_key(&netns) {
            self.unresolved.insert(netns);
        }
    }

    /// The periodic full scan: every netns is looked for again.
    pub fn rescan(&mut self) {
        self.unresolved.clear();
        self.scan_tasks();
    }

    fn scan_tasks(&mut self) {
        let mut known: HashMap<u32, NetnsInfo> = HashMap::new();
        if let Ok(dir) = fs::read_dir(NETNS_RUN_DIR) {
            for e in dir.flatten() {
                let path = e.path();
                if let Some(ino) = inode(&path) {
                    known.insert(
                        ino,
                        NetnsInfo {
                            name: Some(crate::sanitize::kernel_str(e.file_name().as_encoded_bytes())),
                            handle: Some(Handle::Named(path)),
                        },
                    );
                }
            }
        }
        let Ok(procs) = fs::read_dir("/proc") else {
            self.known = known;
            return;
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(tasks) = fs::read_dir(p.path().join("task")) else {
                continue;
            };
            for t in tasks.flatten() {
                let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some(ino) = inode(&t.path().join("ns/net")) {
                    let info = known.entry(ino).or_default();
                    if info.handle.is_none() {
                        info.handle = Some(Handle::Task { pid, tid });
                    }
                }
            }
        }
        self.known = known;
    }

    /// A path that enters `netns` (its bind mount, or a task inside it).
    pub fn ns_path(&self, netns: u32) -> Option<PathBuf> {
        match self.known.get(&netns)?.handle.as_ref()? {
            Handle::Named(p) => Some(p.clone()),
            Handle::Task { pid, tid } => Some(PathBuf::from(format!("/proc/{pid}/task/{tid}/ns/net"))),
        }
    }

    pub fn name(&self, netns: u32) -> Option<String> {
        self.known.get(&netns).and_then(|i| i.name.clone())
    }

    /// Resolves `--netns` (an `ip netns` name, an inode number, or a path such as /proc/PID/ns/net).
    pub fn resolve(&self, spec: &str) -> Result<u32, String> {
        if let Ok(n) = spec.parse::<u32>() {
            return Ok(n);
        }
        if spec.contains('/') {
            return inode(Path::new(spec)).ok_or_else(|| format!("--netns {spec}: no such namespace file"));
        }
        self.known
            .iter()
            .find(|(_, i)| i.name.as_deref() == Some(spec))
            .map(|(n, _)| *n)
            .ok_or_else(|| {
                format!("--netns {spec}: no such network namespace (see `ip netns list`, or pass an inode number)")
            })
    }

    /// Reads the conntrack counters of `netns`.
    pub fn read_stats(&self, netns: u32) -> anyhow::Result<CtStats> {
        let info = self.known.get(&netns).context("unknown netns")?;
        let text = match info.handle.as_ref().context("netns has no handle")? {
            Handle::Task { pid, tid } => fs::read_to_string(format!("/proc/{pid}/task/{tid}/net/stat/nf_conntrack"))?,
            Handle::Named(path) => read_in_netns(path, "/proc/thread-self/net/stat/nf_conntrack")?,
        };
        Ok(CtStats::parse(&text)?)
    }
}

/// Runs `f` inside the netns at `ns_path`, on a short-lived thread that enters it (setns affects
/// only the calling thread, and the thread's netns goes with it). /proc/sys and /proc/thread-self/net
/// then show that netns.
pub fn in_netns<T: Send + 'static>(ns_path: &Path, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let ns_path = ns_path.to_owned();
    std::thread::spawn(move || -> anyhow::Result<T> {
        let file = fs::File::open(&ns_path).with_context(|| format!("cannot open {}", ns_path.display()))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("cannot enter netns {}", ns_path.display()))?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// Reads `file` from inside the netns at `ns_path`.
pub fn read_in_netns(ns_path: &Path, file: &str) -> anyhow::Result<String> {
    let file = file.to_owned();
    in_netns(ns_path, move || fs::read_to_string(&file))?.map_err(Into::into)
}

/// Global `nf_conntrack_max` (it is not per netns; read it from the initial netns's view).
pub fn conntrack_max() -> Option<u64> {
    fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_inode_numbers_and_reports_unknown_names() {
        let r = Registry::default();
        assert_eq!(r.resolve("4026531840"), Ok(4026531840));
        let err = r.resolve("no-such-ns").unwrap_err();
        assert!(err.contains("no such network namespace"), "{err}");
    }

    #[test]
    fn finds_own_netns_by_pid() {
        let r = Registry::scan();
        let me = current_inode().unwrap();
        assert!(r.known.contains_key(&me));
    }

    #[test]
    fn unknown_netns_lookups_are_rate_limited_and_cached() {
        let mut r = Registry::default();
        let mut scans = 0;
        r.learn_with(u32::MAX, |_| scans += 1);
        assert_eq!((scans, r.lookups, r.deferred), (1, 1, 0), "an unknown netns rescans");
        r.learn_with(u32::MAX - 1, |_| scans += 1);
        assert_eq!((scans, r.deferred), (1, 1), "a second one within the interval does not");
        r.last_lookup = Some(std::time::Instant::now() - LOOKUP_INTERVAL);
        r.learn_with(u32::MAX, |_| scans += 1);
        assert_eq!(
            (scans, r.deferred),
            (1, 1),
            "one the last scan did not find waits for the periodic scan"
        );
        r.learn_with(u32::MAX - 1, |_| scans += 1);
        assert_eq!(scans, 2, "after the interval another unknown one rescans");
        // The scan may find it: then it is known and never looked up again.
        r.last_lookup = Some(std::time::Instant::now() - LOOKUP_INTERVAL);
        r.learn_with(7, |reg| {
            reg.known.insert(7, NetnsInfo::default());
        });
        r.learn_with(7, |_| scans += 1);
        assert_eq!((scans, r.lookups), (2, 3));
        assert!(!r.unresolved.contains(&7));
        // The periodic rescan forgets what was not found.
        r.unresolved.clear();
        r.last_lookup = None;
        r.learn_with(u32::MAX, |_| scans += 1);
        assert_eq!(scans, 3);
    }
}
