//! The nf_conntrack reload state machine: while the module is live, ctrace keeps the values of its sysctls (the
//! per-netns ones of other network namespaces too); when it goes, the last values are kept as "before"; when a
//! reloaded module is live again, every value that changed is a `sysctl_reset`, and the session re-attaches its
//! probes and restarts attribution.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use time::OffsetDateTime;

use crate::{
    modules::{self, Action, ModuleChange},
    netns::{self, Registry},
    report::{Event, SysctlResetRecord},
    sysctl_state::{self, Snapshot},
};

/// A reloaded module that is not live after this long is given up on (said once).
const INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Most other network namespaces whose per-netns keys are kept (the session says when there are more).
const MAX_NETNS: usize = crate::bounds::NETNS_SYSCTLS;

/// What the state machine reads from the running system (a fake one in the tests).
pub trait ModuleHost {
    /// Whether nf_conntrack is loaded and its init has finished.
    fn is_live(&self) -> bool;
    /// The conntrack sysctls as ctrace's own netns sees them (and the hashsize parameter).
    fn read_sysctls(&self) -> Snapshot;
    /// The same, read inside another network namespace.
    fn read_netns_sysctls(&self, netns: u32) -> Option<Snapshot>;
    /// The `ip netns` name of a network namespace.
    fn netns_name(&self, netns: u32) -> Option<String>;
}

/// The running system, through the netns registry.
pub struct LiveHost<'a>(pub &'a Registry);

impl ModuleHost for LiveHost<'_> {
    fn is_live(&self) -> bool {
        modules::is_live("nf_conntrack")
    }

    fn read_sysctls(&self) -> Snapshot {
        Snapshot::read()
    }

    fn read_netns_sysctls(&self, netns: u32) -> Option<Snapshot> {
        let path = self.0.ns_path(netns)?;
        netns::in_netns(&path, Snapshot::read).ok()
    }

    fn netns_name(&self, netns: u32) -> Option<String> {
        self.0.name(netns)
    }
}

/// What a module event means for the session.
#[derive(Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// nf_conntrack was unloaded: its counters are gone.
    Gone,
    /// nf_conntrack was loaded; its init may still be running.
    Loading,
}

/// What `try_finish` found.
#[derive(Debug)]
pub enum Finish {
    /// No reload under way, or the module is not live yet.
    NotYet,
    /// The module never became live: what to tell the user.
    GaveUp(String),
    /// The reloaded module is live: these resets, then re-attach and restart attribution.
    Live(Vec<Event>),
}

#[derive(Debug, Default)]
pub struct ReloadWatch {
    /// nf_conntrack was loaded at this instant and is not live yet.
    pending: Option<Instant>,
    /// The conntrack sysctls while nf_conntrack was last live (None on kernels without modules: nothing to
    /// watch).
    sysctls: Option<Snapshot>,
    /// Per-netns keys of the other network namespaces, by inode.
    netns_sysctls: BTreeMap<u32, Snapshot>,
    /// nf_conntrack is gone: keep `sysctls` as the "before" of the next load.
    frozen: bool,
    /// A sysctl write was seen: refresh the snapshot soon.
    dirty: bool,
}

impl ReloadWatch {
    /// Watches the sysctls when the kernel has loadable modules (otherwise no reload can reset them).
    pub fn new(host: &impl ModuleHost, kernel_has_modules: bool) -> ReloadWatch {
        ReloadWatch {
            sysctls: kernel_has_modules.then(|| host.read_sysctls()),
            ..Default::default()
        }
    }

    pub fn module_changed(&mut self, change: &ModuleChange) -> Option<Lifecycle> {
        if change.name != "nf_conntrack" {
            return None;
        }
        match change.action {
            Action::Load => {
                self.pending = Some(Instant::now());
                Some(Lifecycle::Loading)
            }
            Action::Unload => {
                self.frozen = true;
                Some(Lifecycle::Gone)
            }
            Action::UnloadFailed => None,
        }
    }

    /// A reload is under way: poll `try_finish` this often.
    pub fn pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Once the reloaded nf_conntrack is live: the resets (before = the values while the old module was live).
    pub fn try_finish(&mut self, host: &impl ModuleHost) -> Finish {
        let Some(since) = self.pending else {
            return Finish::NotYet;
        };
        if !host.is_live() {
            if since.elapsed() > INIT_TIMEOUT {
                self.pending = None;
                return Finish::GaveUp("nf_conntrack was loaded but did not finish initialising within 30 s".into());
            }
            return Finish::NotYet;
        }
        self.pending = None;
        let mut events = vec![];
        if let Some(before) = self.sysctls.as_mut() {
            let after = host.read_sysctls();
            let now = OffsetDateTime::now_utc();
            if !before.is_empty() {
                for r in sysctl_state::resets(before, &after) {
                    events.push(Event::SysctlReset(SysctlResetRecord::new(now, &r, None)));
                }
            }
            *before = after;
            self.frozen = false;
            for (netns, before) in std::mem::take(&mut self.netns_sysctls) {
                let Some(after) = host.read_netns_sysctls(netns) else {
                    continue;
                };
                let name = host.netns_name(netns);
                let label = name.clone().unwrap_or_else(|| netns.to_string());
                for r in sysctl_state::netns_resets(netns, &label, &before, &after) {
                    events.push(Event::SysctlReset(SysctlResetRecord::new(now, &r, name.clone())));
                }
                self.netns_sysctls.insert(netns, after.per_netns_only());
            }
        }
        Finish::Live(events)
    }

    /// A sysctl write was seen: the kernel applies it right after, so refresh on the next occasion (a reload
    /// right after a write must still see the written value as "before").
    pub fn sysctl_written(&mut self) {
        self.dirty = true;
    }

    pub fn dirty(&self) -> bool {
        self.dirty
    }

    fn watching(&self) -> bool {
        !self.frozen && self.pending.is_none() && self.sysctls.is_some()
    }

    /// Keeps the snapshot current while nf_conntrack is live and no reload is under way. An unload removes the
    /// sysctls before the module is gone: a snapshot is only kept when the module was live before and after it
    /// was read and the table size is in it, so a half-torn state never replaces the values the next reload is
    /// compared with.
    pub fn refresh(&mut self, host: &impl ModuleHost) {
        self.dirty = false;
        if !self.watching() || !host.is_live() {
            return;
        }
        let now = host.read_sysctls();
        if now.is_complete() && host.is_live() {
            self.sysctls = Some(now);
        }
    }

    /// The same for the other network namespaces `ids` (bounded per call).
    pub fn refresh_netns(&mut self, host: &impl ModuleHost, ids: impl Iterator<Item = u32>) {
        if !self.watching() {
            return;
        }
        let ids: Vec<u32> = ids.take(MAX_NETNS).collect();
        self.netns_sysctls.retain(|n, _| ids.contains(n));
        for n in ids {
            if !host.is_live() {
                return;
            }
            if let Some(snap) = host.read_netns_sysctls(n)
                && snap.is_complete()
                && host.is_live()
            {
                self.netns_sysctls.insert(n, snap.per_netns_only());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::Actor;
    use std::cell::{Cell, RefCell};

    /// A system whose module state and sysctl values the test sets.
    #[derive(Default)]
    struct FakeHost {
        live: Cell<bool>,
        sysctls: RefCell<BTreeMap<String, String>>,
        netns: RefCell<BTreeMap<u32, BTreeMap<String, String>>>,
    }

    impl FakeHost {
        fn set(&self, key: &str, v: &str) {
            self.sysctls.borrow_mut().insert(key.into(), v.into());
        }
    }

    impl ModuleHost for FakeHost {
        fn is_live(&self) -> bool {
            self.live.get()
        }
        fn read_sysctls(&self) -> Snapshot {
            Snapshot {
                values: self.sysctls.borrow().clone(),
            }
        }
        fn read_netns_sysctls(&self, netns: u32) -> Option<Snapshot> {
            self.netns.borrow().get(&netns).map(|v| Snapshot { values: v.clone() })
        }
        fn netns_name(&self, netns: u32) -> Option<String> {
            (netns == 42).then(|| "blue".to_owned())
        }
    }

    fn change(action: Action) -> ModuleChange {
        ModuleChange {
            ts_ns: 0,
            action,
            name: "nf_conntrack".into(),
            errno: None,
            holders: vec![],
            tool_status: None,
            actor: Actor {
                pid: 1,
                uid: 0,
                comm: "modprobe".into(),
                ppid: 0,
                parent_comm: "sh".into(),
                cmdline: String::new(),
            },
            provenance: Default::default(),
        }
    }

    const MAX: &str = "net.netfilter.nf_conntrack_max";
    const BUCKETS: &str = "net.netfilter.nf_conntrack_buckets";
    const TIMEOUT: &str = "net.netfilter.nf_conntrack_tcp_timeout_established";

    /// key, netns, netns name, before, after.
    type Reset = (String, Option<u32>, Option<String>, String, String);

    fn resets(events: &[Event]) -> Vec<Reset> {
        events
            .iter()
            .map(|e| match e {
                Event::SysctlReset(r) => (
                    r.key.clone(),
                    r.netns,
                    r.netns_name.clone(),
                    r.before.clone(),
                    r.after.clone(),
                ),
                other => panic!("not a reset: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_reload_reports_what_changed_from_the_values_while_live() {
        let host = FakeHost::default();
        host.live.set(true);
        host.set(MAX, "262144");
        host.set(BUCKETS, "262144");
        host.set(TIMEOUT, "432000");
        host.netns
            .borrow_mut()
            .insert(42, [(TIMEOUT.to_owned(), "432000".to_owned())].into());
        let mut w = ReloadWatch::new(&host, true);
        // An admin raises the limit and a timeout (host and netns 42); ctrace's periodic refreshes see it.
        host.set(MAX, "1048576");
        host.set(TIMEOUT, "3600");
        host.netns
            .borrow_mut()
            .get_mut(&42)
            .unwrap()
            .insert(TIMEOUT.into(), "7200".into());
        w.sysctl_written();
        w.refresh(&host);
        w.refresh_netns(&host, [42].into_iter());
        assert!(!w.dirty());

        // The unload: its sysctls vanish before the module is gone; the frozen snapshot must survive that.
        assert_eq!(w.module_changed(&change(Action::Unload)), Some(Lifecycle::Gone));
        host.live.set(false);
        host.sysctls.borrow_mut().clear();
        w.refresh(&host);
        // The load: init still running, then live with the defaults.
        assert_eq!(w.module_changed(&change(Action::Load)), Some(Lifecycle::Loading));
        assert!(w.pending());
        assert!(matches!(w.try_finish(&host), Finish::NotYet));
        host.live.set(true);
        host.set(MAX, "262144");
        host.set(BUCKETS, "262144");
        host.set(TIMEOUT, "432000");
        host.netns
            .borrow_mut()
            .get_mut(&42)
            .unwrap()
            .insert(TIMEOUT.into(), "432000".into());
        let Finish::Live(events) = w.try_finish(&host) else {
            panic!("live")
        };
        let r = resets(&events);
        assert!(
            r.contains(&(MAX.into(), None, None, "1048576".into(), "262144".into())),
            "{r:?}"
        );
        assert!(
            r.contains(&(TIMEOUT.into(), None, None, "3600".into(), "432000".into())),
            "{r:?}"
        );
        assert!(
            r.contains(&(
                TIMEOUT.into(),
                Some(42),
                Some("blue".into()),
                "7200".into(),
                "432000".into()
            )),
            "{r:?}"
        );
        assert_eq!(r.len(), 3, "{r:?}");
        assert!(!w.pending());
        // A second reload with nothing changed reports nothing.
        w.module_changed(&change(Action::Unload));
        w.module_changed(&change(Action::Load));
        let Finish::Live(events) = w.try_finish(&host) else {
            panic!("live")
        };
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn failed_unloads_and_other_modules_change_nothing() {
        let host = FakeHost::default();
        let mut w = ReloadWatch::new(&host, true);
        assert_eq!(w.module_changed(&change(Action::UnloadFailed)), None);
        let mut other = change(Action::Unload);
        other.name = "xt_conntrack".into();
        assert_eq!(w.module_changed(&other), None);
        assert!(!w.pending());
        assert!(matches!(w.try_finish(&host), Finish::NotYet));
    }

    #[test]
    fn without_loadable_modules_nothing_is_snapshotted() {
        let host = FakeHost::default();
        host.live.set(true);
        host.set(MAX, "1");
        let mut w = ReloadWatch::new(&host, false);
        w.refresh(&host);
        w.module_changed(&change(Action::Load));
        let Finish::Live(events) = w.try_finish(&host) else {
            panic!("live")
        };
        assert!(events.is_empty());
    }
}
