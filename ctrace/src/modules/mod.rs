//! Module loads and unloads around nf_conntrack, and the process behind each: the kernel side is
//! ctrace-ebpf/src/probes/module.rs. Kernels without CONFIG_MODULES (nf_conntrack built in)
//! have nothing to watch: `attach` says so and the session goes on without it.
//!
//! `programs` sets up and attaches the kernel side, `correlator` pairs its records into changes; here are the
//! changes themselves and what the host says about a module now (holders, loaded, live).

mod correlator;
mod programs;

pub use correlator::{Correlator, removal_targets};
pub use programs::{TRACEFS, attach, kernel_has_modules, layout};

use std::{fs, path::Path};

use ctrace_common::ModuleEvent;

use crate::{provenance::Provenance, sanitize::kernel_str};

/// Modules around conntrack: the ones whose load or unload changes what conntrack does.
pub fn is_netfilter_module(name: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "nf_",
        "nft_",
        "xt_",
        "ipt_",
        "ip6t_",
        "iptable_",
        "ip6table_",
        "arptable_",
        "ebtable",
        "nfnetlink",
        "x_tables",
        "ip_tables",
        "ip6_tables",
        "ip_set",
        "ip_vs",
        "openvswitch",
        "act_ct",
        "nf_tables",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    pub pid: u32,
    pub uid: u32,
    pub comm: String,
    pub ppid: u32,
    pub parent_comm: String,
    pub cmdline: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// In memory, init about to run.
    Load,
    Unload,
    UnloadFailed,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Load => "load",
            Action::Unload => "unload",
            Action::UnloadFailed => "unload_failed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleChange {
    pub ts_ns: u64,
    pub action: Action,
    pub name: String,
    /// Positive errno of a failed unload.
    pub errno: Option<i32>,
    /// What held the module when an unload failed (lsmod's "Used by").
    pub holders: Vec<String>,
    /// Exit status of a modprobe/rmmod that refused the unload itself (kmod checks the holders
    /// and never asks the kernel), when that is how it failed.
    pub tool_status: Option<i64>,
    pub actor: Actor,
    /// The processes behind the actor up to the service that started it, and its systemd unit.
    pub provenance: Provenance,
}

/// The process's argv as one line: NULs become spaces, unprintable bytes are masked.
pub fn cmdline_string(raw: &[u8]) -> String {
    let end = raw.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let spaced: Vec<u8> = raw[..end].iter().map(|&b| if b == 0 { b' ' } else { b }).collect();
    kernel_str(&spaced)
}

pub fn parse_record(bytes: &[u8]) -> Option<ModuleEvent> {
    if bytes.len() < std::mem::size_of::<ModuleEvent>() {
        return None;
    }
    // SAFETY: ModuleEvent is repr(C) plain data and `bytes` is long enough.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const ModuleEvent) })
}

/// Modules that hold `name` now (/sys/module/NAME/holders), sorted.
pub fn holders(name: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(Path::new("/sys/module").join(name).join("holders"))
        .map(|d| {
            d.flatten()
                .map(|e| kernel_str(e.file_name().as_encoded_bytes()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether a module is in memory.
pub fn is_loaded(name: &str) -> bool {
    Path::new("/sys/module").join(name).join("initstate").exists()
}

/// True once the module's init has finished (its sysctls then hold their new values).
pub fn is_live(name: &str) -> bool {
    fs::read_to_string(Path::new("/sys/module").join(name).join("initstate")).is_ok_and(|s| s.trim() == "live")
}

pub fn errno_name(errno: i32) -> String {
    match errno {
        libc::EBUSY => "EBUSY (in use)".into(),
        // rmmod's O_NONBLOCK turns "in use" into EAGAIN.
        libc::EAGAIN => "EAGAIN (in use)".into(),
        libc::ENOENT => "ENOENT (not loaded)".into(),
        libc::EPERM => "EPERM (not permitted)".into(),
        n => format!("errno {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_one_sanitised_line() {
        assert_eq!(
            cmdline_string(b"modprobe\0-r\0nf_conntrack\0\0\0"),
            "modprobe -r nf_conntrack"
        );
        assert_eq!(cmdline_string(b"evil\x1b[2J\0"), "evil?[2J");
        assert_eq!(cmdline_string(b""), "");
    }
}
