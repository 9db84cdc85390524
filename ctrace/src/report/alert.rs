//! Records of events that change what conntrack will do: module loads and unloads, sysctl resets and writes,
//! and ctrace following a reloaded module.

use schemars::JsonSchema;
use serde::Serialize;
use time::OffsetDateTime;

use crate::{
    modules::{Action, ModuleChange},
    sysctl_state::SysctlReset,
    sysctl_watch::SysctlWrite,
};

/// A module loaded, unloaded, or an unload that failed.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ModuleRecord {
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub ts: OffsetDateTime,
    /// `load`, `unload` or `unload_failed`
    pub action: &'static str,
    /// the module
    pub name: String,
    /// unload_failed: the kernel's errno; null when the tool, modprobe or rmmod, refused by itself
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<Option<i32>>,
    /// unload_failed: the modules that held it, as lsmod's "Used by"
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holders: Option<Vec<String>>,
    /// `true` when the tool refused by itself
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_by_tool: Option<bool>,
    /// the tool's exit status, when it refused by itself
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i64>,
    /// the requesting process
    pub pid: u32,
    /// its uid
    pub uid: u32,
    /// its name
    pub comm: String,
    /// its parent
    pub ppid: u32,
    /// the parent's name
    pub parent_comm: String,
    /// its command line
    pub cmdline: String,
    /// the processes behind it, parent first, up to pid 1 (at most 8; read in the kernel at event time)
    pub chain: Vec<crate::provenance::Link>,
    /// whether there were more ancestors than the 8 recorded
    pub chain_truncated: bool,
    /// its cgroup v2 path, e.g. `/system.slice/iptables.service`; null when unknown
    pub cgroup: Option<String>,
    /// the systemd unit in that path (its deepest `.service` or `.scope`), or null
    pub unit: Option<String>,
}

impl ModuleRecord {
    pub fn new(ts: OffsetDateTime, c: &ModuleChange) -> ModuleRecord {
        let failed = c.action == Action::UnloadFailed;
        ModuleRecord {
            ts,
            action: c.action.name(),
            name: c.name.clone(),
            errno: failed.then_some(c.errno),
            holders: failed.then(|| c.holders.clone()),
            refused_by_tool: (failed && c.tool_status.is_some()).then_some(true),
            exit_status: c.tool_status.filter(|_| failed),
            pid: c.actor.pid,
            uid: c.actor.uid,
            comm: c.actor.comm.clone(),
            ppid: c.actor.ppid,
            parent_comm: c.actor.parent_comm.clone(),
            cmdline: c.actor.cmdline.clone(),
            chain: c.provenance.chain.clone(),
            chain_truncated: c.provenance.truncated,
            cgroup: c.provenance.cgroup.clone(),
            unit: c.provenance.unit.clone(),
        }
    }
}

/// A conntrack setting that an nf_conntrack reload put back to another value.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct SysctlResetRecord {
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub ts: OffsetDateTime,
    /// `net.netfilter.nf_conntrack_max`, ..., or `nf_conntrack.hashsize`
    pub key: String,
    /// only for a per-netns key in another network namespace: its inode
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    /// and its `ip netns` name, when it has one
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<String>,
    /// the value before the reload
    pub before: String,
    /// the value after it
    pub after: String,
    /// whether `after` is the kernel's default on this machine; null when unknown
    pub default: Option<bool>,
    /// where `before` is persisted, e.g. `"/etc/sysctl.d/90-ct.conf:3"`, or null
    pub persisted_in: Option<String>,
    /// how to make the setting survive reloads
    pub fix: String,
}

impl SysctlResetRecord {
    pub fn new(ts: OffsetDateTime, r: &SysctlReset, netns_name: Option<String>) -> SysctlResetRecord {
        SysctlResetRecord {
            ts,
            key: r.change.key.clone(),
            netns: r.netns,
            netns_name: netns_name.filter(|_| r.netns.is_some()),
            before: r.change.before.clone(),
            after: r.change.after.clone(),
            default: r.default,
            persisted_in: r.persisted_in.clone(),
            fix: r.fix.clone(),
        }
    }
}

/// A write to a conntrack sysctl, seen before the kernel applies it.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct SysctlWriteRecord {
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub ts: OffsetDateTime,
    /// the dotted key
    pub key: String,
    /// the value before the write
    pub old: String,
    /// the value written
    pub new: String,
    /// the writer, on 6.1+ kernels
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// its name, 6.1+
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// its uid, 6.1+
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// the writer's netns, 6.1+: a per-netns key written in a container changes only that netns
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    /// its `ip netns` name, when it has one
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<String>,
}

impl SysctlWriteRecord {
    pub fn new(ts: OffsetDateTime, w: &SysctlWrite, netns_name: Option<String>) -> SysctlWriteRecord {
        SysctlWriteRecord {
            ts,
            key: w.key.clone(),
            old: w.old.clone(),
            new: w.new.clone(),
            pid: w.task.as_ref().map(|t| t.0),
            comm: w.task.as_ref().map(|t| t.2.clone()),
            uid: w.task.as_ref().map(|t| t.1),
            netns: w.netns,
            netns_name: netns_name.filter(|_| w.netns.is_some()),
        }
    }
}

/// ctrace follows a reloaded module: its probes attached again, attribution restarted.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ReattachedRecord {
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub ts: OffsetDateTime,
    /// `nf_conntrack`
    pub module: String,
    /// the functions probed again
    pub probes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::Actor;
    use crate::report::Event;

    fn change(action: Action, tool_status: Option<i64>) -> ModuleChange {
        ModuleChange {
            ts_ns: 0,
            action,
            name: "nf_conntrack".into(),
            errno: None,
            holders: vec!["xt_conntrack".into()],
            tool_status,
            actor: Actor {
                pid: 135,
                uid: 0,
                comm: "rmmod".into(),
                ppid: 115,
                parent_comm: "sh".into(),
                cmdline: "rmmod nf_conntrack".into(),
            },
            provenance: crate::provenance::Provenance {
                chain: vec![crate::provenance::Link {
                    pid: 115,
                    comm: "ip6tables".into(),
                    cmdline: Some("/bin/sh /etc/init.d/ip6tables stop".into()),
                }],
                truncated: false,
                cgroup: Some("/system.slice/ip6tables.service".into()),
                unit: Some("ip6tables.service".into()),
            },
        }
    }

    #[test]
    fn a_failed_unload_carries_errno_null_and_the_holders() {
        let v = serde_json::to_value(Event::Module(ModuleRecord::new(
            OffsetDateTime::UNIX_EPOCH,
            &change(Action::UnloadFailed, Some(1)),
        )))
        .unwrap();
        assert_eq!(v["event"], "module");
        assert_eq!(v["action"], "unload_failed");
        assert!(v["errno"].is_null() && v.get("errno").is_some());
        assert_eq!(v["holders"], serde_json::json!(["xt_conntrack"]));
        assert_eq!(
            (v["refused_by_tool"].as_bool(), v["exit_status"].as_i64()),
            (Some(true), Some(1))
        );
        assert_eq!(v["parent_comm"], "sh");
        assert_eq!(v["chain"][0]["cmdline"], "/bin/sh /etc/init.d/ip6tables stop");
        assert_eq!(
            (v["chain_truncated"].as_bool(), v["unit"].as_str()),
            (Some(false), Some("ip6tables.service"))
        );
        assert_eq!(v["cgroup"], "/system.slice/ip6tables.service");
    }

    #[test]
    fn a_load_has_no_failure_fields() {
        let v = serde_json::to_value(ModuleRecord::new(
            OffsetDateTime::UNIX_EPOCH,
            &change(Action::Load, None),
        ))
        .unwrap();
        for k in ["errno", "holders", "refused_by_tool", "exit_status"] {
            assert!(v.get(k).is_none(), "{k} in {v}");
        }
    }

    #[test]
    fn a_reset_always_says_default_and_persisted_in() {
        let r = SysctlReset {
            change: crate::sysctl_state::Change {
                key: "net.netfilter.nf_conntrack_max".into(),
                before: "1048576".into(),
                after: "7680".into(),
            },
            netns: None,
            default: None,
            persisted_in: None,
            fix: "persist it".into(),
        };
        let v = serde_json::to_value(SysctlResetRecord::new(
            OffsetDateTime::UNIX_EPOCH,
            &r,
            Some("blue".into()),
        ))
        .unwrap();
        assert!(v["default"].is_null() && v["persisted_in"].is_null());
        assert!(
            v.get("netns").is_none() && v.get("netns_name").is_none(),
            "host-wide keys name no netns"
        );
    }
}
