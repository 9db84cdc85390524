//! Turns the kernel's raw steps (module load and free, delete_module's entry and exit, modprobe/rmmod's start and
//! exit) into load / unload / unload_failed changes, each with the process behind it; callers that could not
//! change a module raise nothing, and what is kept per caller is bounded.

use std::collections::HashMap;

use ctrace_common::{ModuleEvent, module_kind};

use super::{Action, Actor, ModuleChange, cmdline_string, is_netfilter_module};
use crate::{
    provenance::{Provenance, Resolver},
    sanitize::kernel_str,
};

fn actor(ev: &ModuleEvent) -> Actor {
    Actor {
        pid: ev.pid,
        uid: ev.uid,
        comm: kernel_str(&ev.comm),
        ppid: ev.ppid,
        parent_comm: kernel_str(&ev.parent_comm),
        cmdline: cmdline_string(&ev.cmdline),
    }
}

/// A module a running modprobe/rmmod asks to remove, and what held it when the tool started.
type RemovalTarget = (String, Vec<String>);

/// Turns the raw steps into load / unload / unload_failed, pairing delete_module's entry and exit
/// and modprobe/rmmod's start and exit.
#[derive(Debug, Default)]
pub struct Correlator {
    /// delete_module in progress: pid → (module name, its holders when the request was seen).
    deleting: HashMap<u32, (String, Vec<String>)>,
    /// Running modprobe/rmmod: pid → the netfilter modules it asks to remove.
    tools: HashMap<u32, Vec<RemovalTarget>>,
    /// Tools that reached delete_module: the kernel's answer was reported already.
    asked_kernel: std::collections::HashSet<u32>,
    /// Module requests and tools of callers that could not change a module, ignored.
    pub unprivileged: u64,
    /// The provenance of each running tool or delete_module caller, read at its first event (its parents are
    /// then most likely still running).
    provenance: HashMap<u32, Provenance>,
    resolver: Resolver,
    /// The delete_module tracepoints are not attached (no perf events, or tracefs unreadable): an unload is
    /// reported when the module is freed, which happens in the caller's context.
    pub unloads_from_free: bool,
}

/// Most callers whose provenance is kept between their first and last event (a lost exit must not leak).
const MAX_PENDING: usize = 1024;

/// Inserts into a per-caller map that a lost exit record would otherwise grow for ever: past the bound the
/// pending callers are forgotten (their outcome then goes unreported, which beats unbounded memory).
fn bounded_insert<V>(map: &mut HashMap<u32, V>, pid: u32, v: V) {
    if map.len() >= MAX_PENDING && !map.contains_key(&pid) {
        map.clear();
    }
    map.insert(pid, v);
}

/// The modules a `modprobe -r ...` or `rmmod ...` command line asks to remove (empty if it is not
/// a removal). Options that take a value skip it.
pub fn removal_targets(argv: &[String]) -> Vec<String> {
    let Some(tool) = argv.first().map(|a| a.rsplit('/').next().unwrap_or(a)) else {
        return vec![];
    };
    let mut removal = tool == "rmmod";
    let mut names = vec![];
    let mut skip = false;
    for a in &argv[1..] {
        if skip {
            skip = false;
            continue;
        }
        if a == "--remove" || (a.starts_with('-') && !a.starts_with("--") && a.contains('r') && tool == "modprobe") {
            removal = true;
        } else if matches!(
            a.as_str(),
            "-C" | "--config" | "-d" | "--dirname" | "-S" | "--set-version" | "-o"
        ) {
            skip = true;
        } else if !a.starts_with('-') {
            names.push(a.replace('-', "_"));
        }
    }
    if removal { names } else { vec![] }
}

impl Correlator {
    /// `holders_of` lists what holds a module (read from /sys/module/NAME/holders in production).
    /// `loaded` tells whether a module is still in memory (after a refused unload it is).
    pub fn feed(
        &mut self,
        ev: &ModuleEvent,
        holders_of: impl Fn(&str) -> Vec<String>,
        loaded: impl Fn(&str) -> bool,
    ) -> Vec<ModuleChange> {
        let from_caller = matches!(
            ev.kind,
            module_kind::TOOL_EXEC | module_kind::TOOL_EXIT | module_kind::DELETE_ENTER | module_kind::DELETE_EXIT
        );
        if from_caller && ev.privileged == 0 {
            // Could not have changed a module (no CAP_SYS_MODULE in the init user namespace): no alert,
            // whatever the process is called and whatever it printed or returned.
            self.unprivileged += 1;
            return vec![];
        }
        let name = kernel_str(&ev.name);
        if matches!(ev.kind, module_kind::TOOL_EXEC | module_kind::DELETE_ENTER)
            && !self.provenance.contains_key(&ev.pid)
        {
            if self.provenance.len() >= MAX_PENDING {
                self.provenance.clear();
            }
            let p = self.resolver.resolve(ev);
            self.provenance.insert(ev.pid, p);
        }
        // A tool's provenance lasts until it exits; a bare delete_module caller's until its answer.
        let provenance = match ev.kind {
            module_kind::TOOL_EXIT => self.provenance.remove(&ev.pid),
            module_kind::DELETE_EXIT if !self.tools.contains_key(&ev.pid) => self.provenance.remove(&ev.pid),
            module_kind::DELETE_EXIT => self.provenance.get(&ev.pid).cloned(),
            module_kind::LOAD | module_kind::FREE if is_netfilter_module(&name) => Some(self.resolver.resolve(ev)),
            _ => None,
        }
        .unwrap_or_default();
        let change = |action, name: String, errno, holders| ModuleChange {
            ts_ns: ev.ts_ns,
            action,
            name,
            errno,
            holders,
            tool_status: None,
            actor: actor(ev),
            provenance: provenance.clone(),
        };
        match ev.kind {
            module_kind::TOOL_EXEC => {
                let argv: Vec<String> = ev
                    .cmdline
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(kernel_str)
                    .collect();
                let targets = removal_targets(&argv)
                    .into_iter()
                    .filter(|n| is_netfilter_module(n))
                    .map(|n| {
                        let h = holders_of(&n);
                        (n, h)
                    })
                    .collect();
                bounded_insert(&mut self.tools, ev.pid, targets);
                vec![]
            }
            module_kind::TOOL_EXIT => {
                let Some(targets) = self.tools.remove(&ev.pid) else {
                    return vec![];
                };
                let asked = self.asked_kernel.remove(&ev.pid);
                if ev.ret == 0 || asked {
                    return vec![];
                }
                targets
                    .into_iter()
                    .filter(|(n, _)| loaded(n))
                    .map(|(n, early)| {
                        let mut holders = holders_of(&n);
                        if holders.is_empty() {
                            holders = early;
                        }
                        let mut c = change(Action::UnloadFailed, n, None, holders);
                        c.tool_status = Some(ev.ret);
                        c
                    })
                    .collect()
            }
            module_kind::LOAD if is_netfilter_module(&name) => vec![change(Action::Load, name, None, vec![])],
            module_kind::DELETE_ENTER => {
                // Read the holders now too: a script may remove them right after a failed unload.
                let holders = if is_netfilter_module(&name) {
                    holders_of(&name)
                } else {
                    vec![]
                };
                bounded_insert(&mut self.deleting, ev.pid, (name, holders));
                if self.tools.contains_key(&ev.pid) {
                    if self.asked_kernel.len() >= MAX_PENDING {
                        self.asked_kernel.clear();
                    }
                    self.asked_kernel.insert(ev.pid);
                }
                vec![]
            }
            module_kind::DELETE_EXIT => {
                let Some((name, early_holders)) = self.deleting.remove(&ev.pid) else {
                    return vec![];
                };
                if !is_netfilter_module(&name) {
                    return vec![];
                }
                vec![if ev.ret == 0 {
                    change(Action::Unload, name, None, vec![])
                } else {
                    let mut holders = holders_of(&name);
                    if holders.is_empty() {
                        holders = early_holders;
                    }
                    change(Action::UnloadFailed, name, Some((-ev.ret) as i32), holders)
                }]
            }
            module_kind::FREE if self.unloads_from_free && is_netfilter_module(&name) => {
                vec![change(Action::Unload, name, None, vec![])]
            }
            // Otherwise the delete_module exit reports unloads with their outcome; module_free adds nothing.
            _ => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::errno_name;
    use ctrace_common::{CMDLINE_LEN, MODULE_NAME_LEN, TASK_COMM_LEN};

    fn ev(kind: u32, pid: u32, name: &str, ret: i64) -> ModuleEvent {
        let mut e = ModuleEvent {
            ts_ns: 1,
            ret,
            kind,
            pid,
            ppid: 1,
            uid: 0,
            comm: [0; TASK_COMM_LEN],
            parent_comm: [0; TASK_COMM_LEN],
            name: [0; MODULE_NAME_LEN],
            cmdline: [0; CMDLINE_LEN],
            privileged: 1,
            _pad: 0,
            cgroup_id: 0,
            ancestors: [ctrace_common::Ancestor::default(); ctrace_common::MAX_ANCESTORS],
        };
        e.name[..name.len()].copy_from_slice(name.as_bytes());
        e.comm[..5].copy_from_slice(b"rmmod");
        let cmd = b"modprobe\0-r\0nf_conntrack\0";
        e.cmdline[..cmd.len()].copy_from_slice(cmd);
        e
    }

    fn one(v: Vec<ModuleChange>) -> Option<ModuleChange> {
        assert!(v.len() <= 1, "{v:?}");
        v.into_iter().next()
    }

    #[test]
    fn pairs_delete_module_entry_and_exit() {
        let mut c = Correlator::default();
        let none = |_: &str| vec![];
        assert_eq!(
            one(c.feed(&ev(module_kind::DELETE_ENTER, 7, "nf_conntrack", 0), none, |_| true)),
            None
        );
        let ch = one(c.feed(&ev(module_kind::DELETE_EXIT, 7, "", 0), none, |_| false)).unwrap();
        assert_eq!(ch.action, Action::Unload);
        assert_eq!(ch.name, "nf_conntrack");
        assert_eq!(ch.actor.cmdline, "modprobe -r nf_conntrack");
        assert_eq!(ch.actor.comm, "rmmod");
    }

    #[test]
    fn failed_unload_names_errno_and_holders() {
        let mut c = Correlator::default();
        c.feed(
            &ev(module_kind::DELETE_ENTER, 9, "nf_conntrack", 0),
            |_| vec![],
            |_| true,
        );
        let ch = one(c.feed(
            &ev(module_kind::DELETE_EXIT, 9, "", -(libc::EBUSY as i64)),
            |n| {
                assert_eq!(n, "nf_conntrack");
                vec!["xt_conntrack".into()]
            },
            |_| true,
        ))
        .unwrap();
        // The holder was already gone when the exit was handled: the entry's view is used.
        c.feed(
            &ev(module_kind::DELETE_ENTER, 10, "nf_conntrack", 0),
            |_| vec!["xt_state".into()],
            |_| true,
        );
        let late = one(c.feed(
            &ev(module_kind::DELETE_EXIT, 10, "", -(libc::EAGAIN as i64)),
            |_| vec![],
            |_| true,
        ))
        .unwrap();
        assert_eq!(late.holders, vec!["xt_state".to_string()]);
        assert_eq!(ch.action, Action::UnloadFailed);
        assert_eq!(ch.errno, Some(libc::EBUSY));
        assert_eq!(ch.holders, vec!["xt_conntrack".to_string()]);
        assert_eq!(errno_name(libc::EBUSY), "EBUSY (in use)");
    }

    #[test]
    fn ignores_unrelated_modules_and_stray_exits() {
        let mut c = Correlator::default();
        let none = |_: &str| vec![];
        assert_eq!(
            one(c.feed(&ev(module_kind::LOAD, 1, "snd_hda_intel", 0), none, |_| true)),
            None
        );
        assert!(one(c.feed(&ev(module_kind::LOAD, 1, "nf_conntrack", 0), none, |_| true)).is_some());
        assert_eq!(
            one(c.feed(&ev(module_kind::DELETE_EXIT, 5, "", 0), none, |_| true)),
            None
        );
        c.feed(&ev(module_kind::DELETE_ENTER, 5, "btrfs", 0), none, |_| true);
        assert_eq!(
            one(c.feed(&ev(module_kind::DELETE_EXIT, 5, "", 0), none, |_| true)),
            None
        );
    }

    #[test]
    fn kmod_refusal_is_an_unload_failure_naming_the_holder() {
        let mut c = Correlator::default();
        let holders = |_: &str| vec!["nf_conntrack_ipv6".to_string()];
        // ev() puts `modprobe -r nf_conntrack` in argv.
        assert!(
            c.feed(&ev(module_kind::TOOL_EXEC, 20, "", 0), holders, |_| true)
                .is_empty()
        );
        let ch = one(c.feed(&ev(module_kind::TOOL_EXIT, 20, "", 1), holders, |_| true)).unwrap();
        assert_eq!(ch.action, Action::UnloadFailed);
        assert_eq!(
            (ch.name.as_str(), ch.errno, ch.tool_status),
            ("nf_conntrack", None, Some(1))
        );
        assert_eq!(ch.holders, vec!["nf_conntrack_ipv6".to_string()]);
        // Success, or a tool that asked the kernel (its answer was reported), adds nothing.
        c.feed(&ev(module_kind::TOOL_EXEC, 21, "", 0), holders, |_| true);
        assert!(
            c.feed(&ev(module_kind::TOOL_EXIT, 21, "", 0), holders, |_| true)
                .is_empty()
        );
        c.feed(&ev(module_kind::TOOL_EXEC, 22, "", 0), holders, |_| true);
        c.feed(&ev(module_kind::DELETE_ENTER, 22, "nf_conntrack", 0), holders, |_| true);
        c.feed(
            &ev(module_kind::DELETE_EXIT, 22, "", -(libc::EBUSY as i64)),
            holders,
            |_| true,
        );
        assert!(
            c.feed(&ev(module_kind::TOOL_EXIT, 22, "", 1), holders, |_| true)
                .is_empty()
        );
    }

    #[test]
    fn the_chain_behind_a_request_comes_from_its_first_event() {
        let mut c = Correlator::default();
        let none = |_: &str| vec![];
        let mut enter = ev(module_kind::DELETE_ENTER, 40, "nf_conntrack", 0);
        enter.ancestors[0].pid = 39;
        enter.ancestors[0].comm[..9].copy_from_slice(b"ip6tables");
        enter.ancestors[1].pid = 1;
        enter.ancestors[1].comm[..4].copy_from_slice(b"init");
        c.feed(&enter, none, |_| true);
        // The exit's own record is what the kernel saw later: the script may have been reparented by then.
        let mut exit = ev(module_kind::DELETE_EXIT, 40, "", -(libc::EBUSY as i64));
        exit.ancestors[0].pid = 1;
        let ch = one(c.feed(&exit, none, |_| true)).unwrap();
        let chain: Vec<(u32, &str)> = ch.provenance.chain.iter().map(|l| (l.pid, l.comm.as_str())).collect();
        assert_eq!(chain, [(39, "ip6tables"), (1, "init")]);
        assert!(c.provenance.is_empty(), "nothing kept after the answer");
    }

    #[test]
    fn without_delete_module_tracepoints_an_unload_is_seen_as_the_module_is_freed() {
        let none = |_: &str| vec![];
        let mut c = Correlator::default();
        assert!(
            c.feed(&ev(module_kind::FREE, 7, "nf_conntrack", 0), none, |_| false)
                .is_empty()
        );
        c.unloads_from_free = true;
        let ch = one(c.feed(&ev(module_kind::FREE, 7, "nf_conntrack", 0), none, |_| false)).unwrap();
        assert_eq!(
            (ch.action, ch.name.as_str(), ch.actor.pid),
            (Action::Unload, "nf_conntrack", 7)
        );
        assert!(
            c.feed(&ev(module_kind::FREE, 7, "btrfs", 0), none, |_| false)
                .is_empty()
        );
    }

    #[test]
    fn reads_removal_command_lines() {
        let argv = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(
            removal_targets(&argv("/sbin/modprobe -r nf_conntrack")),
            vec!["nf_conntrack"]
        );
        assert_eq!(
            removal_targets(&argv("modprobe -rv xt-state nf_conntrack")),
            vec!["xt_state", "nf_conntrack"]
        );
        assert_eq!(removal_targets(&argv("rmmod nf_conntrack")), vec!["nf_conntrack"]);
        assert_eq!(
            removal_targets(&argv("modprobe -C /etc/x.conf --remove nf_nat")),
            vec!["nf_nat"]
        );
        assert!(removal_targets(&argv("modprobe nf_conntrack hashsize=1")).is_empty());
    }

    #[test]
    fn unprivileged_callers_raise_no_alert() {
        let mut c = Correlator::default();
        let none = |_: &str| vec![];
        let forged = |kind, ret| {
            let mut e = ev(kind, 99, "nf_conntrack", ret);
            e.privileged = 0;
            e.uid = 1000;
            e
        };
        // A binary named rmmod that exits 1, and a delete_module that gets EPERM.
        assert!(c.feed(&forged(module_kind::TOOL_EXEC, 0), none, |_| true).is_empty());
        assert!(c.feed(&forged(module_kind::TOOL_EXIT, 1), none, |_| true).is_empty());
        assert!(c.feed(&forged(module_kind::DELETE_ENTER, 0), none, |_| true).is_empty());
        assert!(c.feed(&forged(module_kind::DELETE_EXIT, -1), none, |_| true).is_empty());
        assert_eq!(c.unprivileged, 4);
        // The same refused unload from root still alerts.
        let _ = c.feed(&ev(module_kind::DELETE_ENTER, 7, "nf_conntrack", 0), none, |_| true);
        let exit = c.feed(&ev(module_kind::DELETE_EXIT, 7, "nf_conntrack", -16), none, |_| true);
        assert_eq!(exit.len(), 1, "{exit:?}");
    }
}
