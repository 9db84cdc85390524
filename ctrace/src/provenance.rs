//! Who is behind a module event, up to the service that started it: the chain of processes above the caller
//! (recorded by the kernel program at event time, so a script that has exited since is still named), each one's
//! command line while it still runs (checked against its start time, so a reused pid is never read), and the
//! caller's cgroup v2 path with the systemd unit in it (`/system.slice/iptables.service`).

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use ctrace_common::{Ancestor, MAX_ANCESTORS, ModuleEvent};

use crate::sanitize::kernel_str;

/// One process of the chain behind a module event.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Link {
    /// its pid
    pub pid: u32,
    /// its name
    pub comm: String,
    /// its command line; null when it had exited, or its pid was reused, by the time ctrace looked
    pub cmdline: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Provenance {
    /// The caller's parent first, up to pid 1.
    pub chain: Vec<Link>,
    /// More ancestors than the kernel records (MAX_ANCESTORS): the chain stops short of pid 1.
    pub truncated: bool,
    /// The caller's cgroup v2 path, e.g. `/system.slice/iptables.service`.
    pub cgroup: Option<String>,
    /// The systemd unit in that path (the deepest `.service` or `.scope`).
    pub unit: Option<String>,
}

/// " <- sh[120] `/bin/sh /etc/init.d/ip6tables stop` <- init[1]; unit ip6tables.service", for the text output.
pub fn describe(chain: &[Link], truncated: bool, unit: Option<&str>) -> String {
    let mut s: String = chain
        .iter()
        .map(|l| match &l.cmdline {
            Some(c) if !c.is_empty() => format!(" <- {}[{}] `{c}`", l.comm, l.pid),
            _ => format!(" <- {}[{}]", l.comm, l.pid),
        })
        .collect();
    if truncated {
        s.push_str(" <- ...");
    }
    if let Some(u) = unit {
        s.push_str(&format!("; unit {u}"));
    }
    s
}

/// The systemd unit of a cgroup v2 path: its deepest `.service` or `.scope` component.
pub fn unit_of(cgroup: &str) -> Option<String> {
    cgroup
        .split('/')
        .rev()
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

/// Most cgroup directories looked at to find one id (a walk of the whole cgroup tree); most ids cached.
const MAX_CGROUP_WALK: usize = 50_000;
const MAX_CACHED: usize = 1024;

/// Resolves what the kernel recorded into names a person can act on, reading /proc and the cgroup2 tree.
#[derive(Debug)]
pub struct Resolver {
    proc_root: PathBuf,
    cgroup_root: Option<PathBuf>,
    /// cgroup id → path (cgroups are few and long-lived; a miss walks the tree again).
    cgroups: HashMap<u64, String>,
    /// clock ticks per second of /proc/PID/stat's starttime.
    ticks: u64,
}

impl Default for Resolver {
    fn default() -> Resolver {
        // SAFETY: sysconf has no memory preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Resolver::new(
            PathBuf::from("/proc"),
            crate::sysctl_watch::cgroup2_root(),
            u64::try_from(ticks).unwrap_or(100),
        )
    }
}

impl Resolver {
    pub fn new(proc_root: PathBuf, cgroup_root: Option<PathBuf>, ticks: u64) -> Resolver {
        Resolver {
            proc_root,
            cgroup_root,
            cgroups: HashMap::new(),
            ticks: ticks.max(1),
        }
    }

    /// The provenance of the process behind `ev`.
    pub fn resolve(&mut self, ev: &ModuleEvent) -> Provenance {
        let recorded: Vec<&Ancestor> = ev.ancestors.iter().take_while(|a| a.pid != 0).collect();
        let chain: Vec<Link> = recorded
            .iter()
            .map(|a| Link {
                pid: a.pid,
                comm: kernel_str(&a.comm),
                cmdline: self.cmdline(a),
            })
            .collect();
        let truncated = recorded.len() == MAX_ANCESTORS && recorded.last().is_some_and(|a| a.pid > 1);
        let cgroup = self.cgroup(ev.cgroup_id, ev.pid);
        Provenance {
            chain,
            truncated,
            unit: cgroup.as_deref().and_then(unit_of),
            cgroup,
        }
    }

    /// /proc/PID/cmdline of the ancestor, if PID is still that process (same start time).
    fn cmdline(&self, a: &Ancestor) -> Option<String> {
        let dir = self.proc_root.join(a.pid.to_string());
        let stat = fs::read_to_string(dir.join("stat")).ok()?;
        let start_ticks = start_time(&stat)?;
        if start_ticks != a.start_ns / (1_000_000_000 / self.ticks) {
            return None;
        }
        let raw = fs::read(dir.join("cmdline")).ok()?;
        Some(crate::modules::cmdline_string(&raw[..raw.len().min(4096)]))
    }

    /// The path of cgroup `id` under the cgroup2 mount, or (without one) from /proc/PID/cgroup while the caller
    /// runs.
    fn cgroup(&mut self, id: u64, pid: u32) -> Option<String> {
        if id == 0 {
            return None;
        }
        if let Some(p) = self.cgroups.get(&id) {
            return Some(p.clone());
        }
        let found = match &self.cgroup_root {
            Some(root) => find_cgroup(root, id),
            None => fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup"))
                .ok()
                .and_then(|t| t.lines().find_map(|l| l.strip_prefix("0::").map(str::to_owned))),
        }?;
        if self.cgroups.len() >= MAX_CACHED {
            self.cgroups.clear();
        }
        self.cgroups.insert(id, found.clone());
        Some(found)
    }
}

/// Field 22 of /proc/PID/stat (after the parenthesised comm, which may hold spaces).
fn start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The path (relative to `root`, starting with `/`) of the directory whose inode is `id`; a bounded walk.
fn find_cgroup(root: &Path, id: u64) -> Option<String> {
    if fs::metadata(root).ok()?.ino() == id {
        return Some("/".to_owned());
    }
    let mut stack = vec![root.to_path_buf()];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).ok()?.flatten() {
            seen += 1;
            if seen > MAX_CGROUP_WALK {
                return None;
            }
            let Ok(t) = e.file_type() else { continue };
            if !t.is_dir() {
                continue;
            }
            let path = e.path();
            if e.metadata().is_ok_and(|m| m.ino() == id) {
                let rel = path.strip_prefix(root).ok()?;
                return Some(format!("/{}", kernel_str(rel.as_os_str().as_encoded_bytes())));
            }
            stack.push(path);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::tests::TempTree;
    use ctrace_common::{CMDLINE_LEN, MODULE_NAME_LEN, TASK_COMM_LEN};

    fn ancestor(pid: u32, start_ns: u64, comm: &str) -> Ancestor {
        let mut a = Ancestor {
            pid,
            start_ns,
            ..Default::default()
        };
        a.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        a
    }

    fn event(ancestors: &[Ancestor], cgroup_id: u64) -> ModuleEvent {
        let mut ev = ModuleEvent {
            ts_ns: 0,
            ret: 0,
            kind: 0,
            pid: 300,
            ppid: 0,
            uid: 0,
            comm: [0; TASK_COMM_LEN],
            parent_comm: [0; TASK_COMM_LEN],
            name: [0; MODULE_NAME_LEN],
            cmdline: [0; CMDLINE_LEN],
            privileged: 1,
            _pad: 0,
            cgroup_id,
            ancestors: [Ancestor::default(); MAX_ANCESTORS],
        };
        ev.ancestors[..ancestors.len()].copy_from_slice(ancestors);
        ev
    }

    /// A fake /proc with one live process (pid 120, started at tick 500) and a cgroup tree.
    fn fixture() -> (TempTree, Resolver, u64) {
        let dir = TempTree::new();
        dir.write(
            "/proc/120/stat",
            "120 (ip6 tables) S 1 120 120 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 500 1 1\n",
        );
        dir.write("/proc/120/cmdline", "/bin/sh\0/etc/init.d/ip6tables\0stop\0");
        let proc_root = dir.path().join("proc");
        let cg = dir.path().join("cgroup");
        let unit = cg.join("system.slice/ip6tables.service");
        fs::create_dir_all(&unit).unwrap();
        let id = fs::metadata(&unit).unwrap().ino();
        (dir, Resolver::new(proc_root, Some(cg), 100), id)
    }

    #[test]
    fn names_the_chain_the_command_lines_and_the_unit() {
        let (_dir, mut r, id) = fixture();
        // 500 ticks at 100 Hz = 5 s after boot.
        let ev = event(&[ancestor(120, 5_000_000_000, "ip6tables"), ancestor(1, 0, "init")], id);
        let p = r.resolve(&ev);
        assert_eq!(p.chain.len(), 2);
        assert_eq!(
            p.chain[0].cmdline.as_deref(),
            Some("/bin/sh /etc/init.d/ip6tables stop")
        );
        assert_eq!(p.chain[1].cmdline, None, "pid 1 is not in the fake /proc");
        assert!(!p.truncated);
        assert_eq!(p.cgroup.as_deref(), Some("/system.slice/ip6tables.service"));
        assert_eq!(p.unit.as_deref(), Some("ip6tables.service"));
        assert_eq!(
            describe(&p.chain, p.truncated, p.unit.as_deref()),
            " <- ip6tables[120] `/bin/sh /etc/init.d/ip6tables stop` <- init[1]; unit ip6tables.service"
        );
        let chain = serde_json::to_value(&p.chain).unwrap();
        assert_eq!(chain[0]["comm"], "ip6tables");
        assert_eq!(chain[1]["cmdline"], serde_json::Value::Null);
    }

    #[test]
    fn a_reused_pid_is_not_read() {
        let (_dir, mut r, _) = fixture();
        // The recorded process started at 4 s; the pid now belongs to one started at 5 s.
        let p = r.resolve(&event(&[ancestor(120, 4_000_000_000, "sh")], 0));
        assert_eq!(p.chain[0].cmdline, None);
        assert_eq!(p.chain[0].comm, "sh");
        assert_eq!((p.cgroup, p.unit), (None, None));
    }

    #[test]
    fn a_long_chain_says_it_is_cut() {
        let (_dir, mut r, _) = fixture();
        let long: Vec<Ancestor> = (0..MAX_ANCESTORS as u32).map(|i| ancestor(1000 + i, 0, "sh")).collect();
        let p = r.resolve(&event(&long, 0));
        assert!(p.truncated && describe(&p.chain, p.truncated, None).ends_with(" <- ..."));
    }

    #[test]
    fn units_come_from_cgroup_paths() {
        assert_eq!(
            unit_of("/system.slice/iptables.service").as_deref(),
            Some("iptables.service")
        );
        assert_eq!(
            unit_of("/user.slice/user-0.slice/session-3.scope").as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(unit_of("/"), None);
        assert_eq!(
            start_time("7 (a) b) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 99 x"),
            Some(99)
        );
    }
}
