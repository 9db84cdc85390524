//! How nf_conntrack is present (a loaded module and what holds it, built in, or not loaded), from /sys/module and
//! /proc/modules: it decides whether an unload and load can reset its settings without a reboot.

use super::{KEY_MAX, SYS_MODULE, proc_path};
use crate::check::{Ctx, clean};

/// What holds the loaded nf_conntrack module.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holders {
    pub refcnt: Option<u64>,
    /// /sys/module/nf_conntrack/holders/ and the "used by" column of /proc/modules, merged.
    pub modules: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleState {
    /// A loadable module, loaded now.
    Module(Holders),
    /// Built into the kernel (the reason is evidence).
    Builtin(String),
    NotLoaded(String),
    Unknown(String),
}

impl ModuleState {
    pub fn describe(&self) -> &'static str {
        match self {
            ModuleState::Module(_) => "loaded as a module",
            ModuleState::Builtin(_) => "built into the kernel",
            ModuleState::NotLoaded(_) => "not loaded",
            ModuleState::Unknown(_) => "unknown",
        }
    }

    /// Stable word for JSON.
    pub fn key(&self) -> &'static str {
        match self {
            ModuleState::Module(_) => "module",
            ModuleState::Builtin(_) => "builtin",
            ModuleState::NotLoaded(_) => "not_loaded",
            ModuleState::Unknown(_) => "unknown",
        }
    }

    /// Can be unloaded and loaded again (so its settings can reset without a reboot).
    pub fn reloadable(&self) -> bool {
        matches!(self, ModuleState::Module(_) | ModuleState::NotLoaded(_))
    }
}

pub(super) fn module_state(ctx: &mut Ctx) -> ModuleState {
    let fs = ctx.fs;
    let proc_modules = ctx.read("/proc/modules");
    let proc_line = proc_modules.as_deref().and_then(|m| {
        m.lines()
            .find(|l| l.split_whitespace().next() == Some("nf_conntrack"))
            .map(str::to_owned)
    });
    let has_live = fs.exists(&proc_path(KEY_MAX));
    let proc_present = fs.exists("/proc/meminfo");
    if fs.exists(&format!("{SYS_MODULE}/initstate")) || proc_line.is_some() {
        let mut h = Holders {
            refcnt: ctx
                .read(&format!("{SYS_MODULE}/refcnt"))
                .and_then(|s| s.trim().parse().ok()),
            modules: ctx.read_dir(&format!("{SYS_MODULE}/holders")).unwrap_or_default(),
        };
        if let Some(line) = proc_line {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if h.refcnt.is_none() {
                h.refcnt = cols.get(2).and_then(|s| s.parse().ok());
            }
            for m in cols.get(3).copied().unwrap_or("-").split(',') {
                if !m.is_empty() && m != "-" && !h.modules.iter().any(|x| x == m) {
                    h.modules.push(m.to_owned());
                }
            }
        }
        h.modules = h.modules.iter().map(|m| clean(m)).collect();
        h.modules.sort();
        return ModuleState::Module(h);
    }
    if fs.is_dir(SYS_MODULE) {
        return ModuleState::Builtin(format!(
            "{SYS_MODULE} exists without initstate: nf_conntrack is built into the kernel"
        ));
    }
    if has_live && proc_present && proc_modules.is_none() && !fs.exists("/proc/modules") {
        return ModuleState::Builtin(
            "/proc/modules does not exist (CONFIG_MODULES=n): nf_conntrack is built into the kernel".to_owned(),
        );
    }
    if has_live {
        return ModuleState::Unknown(format!("{SYS_MODULE} is not readable"));
    }
    if proc_present {
        return ModuleState::NotLoaded(format!("{} and {SYS_MODULE} do not exist", proc_path(KEY_MAX)));
    }
    ModuleState::Unknown("this tree has no /proc/meminfo: not a live system".to_owned())
}
