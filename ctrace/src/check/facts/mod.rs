//! What the checks look at, read once: kernel version, RAM, how nf_conntrack is present (module, built in, not
//! loaded), its live sysctls, the configuration that sets them, the table's contents, the per-netns counters and
//! the size of one entry. The kernel's version and its own defaults are in `kernel`, the module's presence in
//! `module`, the entry size in `entry_size`; the rest is read here, in `gather`.

mod entry_size;
mod kernel;
mod module;

pub use entry_size::EntrySize;
pub use kernel::{Defaults, KernelVersion, kernel_defaults, static_default};
pub use module::ModuleState;

use entry_size::entry_size;
use module::module_state;

use std::collections::BTreeMap;

use super::{
    Ctx, clean,
    config::{self, ModprobeConf, Source, SysctlConf},
    table::{self, Table},
};
use crate::ctstat::CtStats;

pub const NF_SYSCTL_DIR: &str = "/proc/sys/net/netfilter";
pub const KEY_MAX: &str = "net.netfilter.nf_conntrack_max";
pub const KEY_BUCKETS: &str = "net.netfilter.nf_conntrack_buckets";
pub const KEY_COUNT: &str = "net.netfilter.nf_conntrack_count";
pub const KEY_EXPECT_MAX: &str = "net.netfilter.nf_conntrack_expect_max";
pub const KEY_EST: &str = "net.netfilter.nf_conntrack_tcp_timeout_established";
pub const SYS_MODULE: &str = "/sys/module/nf_conntrack";
pub const HASHSIZE_PARAM: &str = "/sys/module/nf_conntrack/parameters/hashsize";

/// The `/proc/sys` file of a dotted sysctl key.
pub fn proc_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

#[derive(Clone, Debug)]
pub struct NetnsStats {
    pub label: String,
    pub stats: CtStats,
}

#[derive(Debug)]
pub struct Facts {
    pub kernel: Option<KernelVersion>,
    pub mem_total_kb: Option<u64>,
    pub page_size: u64,
    pub module: ModuleState,
    /// Live nf_conntrack sysctls, by dotted key (`net.netfilter.nf_conntrack_max`).
    pub live: BTreeMap<String, String>,
    pub hashsize_param: Option<u64>,
    pub buckets_writable: Option<bool>,
    pub sysctl: SysctlConf,
    pub modprobe: ModprobeConf,
    pub cmdline_hashsize: Option<u64>,
    /// The modules-load.d line that loads nf_conntrack (or a module needing it) at boot.
    pub boot_load: Option<(String, Source)>,
    pub udev_reapply: Option<Source>,
    pub table: Option<Table>,
    pub stats: Vec<NetnsStats>,
    pub entry_size: EntrySize,
    /// tcp_keepalive_time + tcp_keepalive_intvl × tcp_keepalive_probes, and time alone.
    pub keepalive: Option<(u64, u64)>,
    /// Where systemd-sysctl lives in this tree (for the udev rule in fixes).
    pub systemd_sysctl: &'static str,
}

impl Facts {
    pub fn live_u64(&self, key: &str) -> Option<u64> {
        self.live.get(key).and_then(|v| v.trim().parse().ok())
    }

    /// The hashsize a load of the module will use when given explicitly.
    pub fn hashsize_given(&self) -> Option<u64> {
        match self.module {
            ModuleState::Builtin(_) => self.cmdline_hashsize,
            _ => self.modprobe.hashsize.as_ref().map(|h| h.0).or(self.cmdline_hashsize),
        }
    }

    pub fn defaults(&self) -> Option<Defaults> {
        Some(kernel_defaults(
            self.kernel.as_ref()?,
            self.mem_total_kb?,
            self.page_size,
            self.hashsize_given(),
        ))
    }

    /// Highest entry count among the readable netns (the global max applies to each netns).
    pub fn worst_count(&self) -> Option<(u64, String)> {
        let mut best: Option<(u64, String)> = self.live_u64(KEY_COUNT).map(|c| (c, "this netns".to_owned()));
        for s in &self.stats {
            let e = s.stats.entries();
            if best.as_ref().is_none_or(|b| e > b.0) {
                best = Some((e, s.label.clone()));
            }
        }
        best
    }
}

fn netns_stats(ctx: &mut Ctx) -> Vec<NetnsStats> {
    let mut out = vec![];
    if ctx.fs.is_host() {
        let reg = crate::netns::Registry::scan();
        let me = crate::netns::current_inode().ok();
        let mut inodes: Vec<u32> = reg.known.keys().copied().collect();
        inodes.sort();
        for ino in inodes {
            let name = reg.name(ino).map(|n| format!(" ({n})")).unwrap_or_default();
            let this = if Some(ino) == me { " [this netns]" } else { "" };
            let label = format!("netns {ino}{name}{this}");
            match reg.read_stats(ino) {
                Ok(s) => out.push(NetnsStats { label, stats: s }),
                Err(e) => ctx.unreadable(format!("counters of {label}"), clean(&format!("{e:#}"))),
            }
        }
        if !nix::unistd::geteuid().is_root() {
            ctx.unreadable(
                "/proc/*/ns/net of other users' processes",
                "permission denied: network namespaces of other users are not listed (run as root to see every netns)",
            );
        }
    } else {
        let path = "/proc/net/stat/nf_conntrack";
        if let Some(text) = ctx.read(path) {
            match CtStats::parse(&text) {
                Ok(s) => out.push(NetnsStats {
                    label: format!("netns of {path}"),
                    stats: s,
                }),
                Err(e) => ctx.unreadable(path, clean(&e.to_string())),
            }
        }
    }
    out
}

pub fn gather(ctx: &mut Ctx) -> Facts {
    let kernel = ctx
        .read_expected("/proc/sys/kernel/osrelease")
        .and_then(|s| KernelVersion::parse(&s));
    let mem_total_kb = ctx.read_expected("/proc/meminfo").and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    });
    let page_size = if ctx.fs.is_host() {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| u64::try_from(p).ok())
            .unwrap_or(4096)
    } else {
        4096
    };
    let module = module_state(ctx);

    let mut live = BTreeMap::new();
    for name in ctx.read_dir(NF_SYSCTL_DIR).unwrap_or_default() {
        if !name.starts_with("nf_conntrack_") {
            continue;
        }
        let key = format!("net.netfilter.{name}");
        if let Some(v) = ctx.read(&proc_path(&key)) {
            live.insert(clean(&key), clean(v.trim()));
        }
    }
    let hashsize_param = if ctx.fs.exists(HASHSIZE_PARAM) {
        ctx.read(HASHSIZE_PARAM).and_then(|s| s.trim().parse().ok())
    } else {
        None
    };
    let buckets_writable = ctx.fs.mode(&proc_path(KEY_BUCKETS)).map(|m| m & 0o222 != 0);
    let sysctl = config::load_sysctl(ctx);
    let modprobe = config::load_modprobe(ctx);
    let cmdline_hashsize = ctx.read("/proc/cmdline").and_then(|c| {
        c.split_whitespace()
            .filter_map(|w| w.strip_prefix("nf_conntrack.hashsize="))
            .filter_map(|v| v.parse().ok())
            .next_back()
    });
    let boot_load = config::boot_loads_conntrack(ctx);
    let udev_reapply = config::udev_reapplies(ctx);
    let est = live.get(KEY_EST).and_then(|v| v.parse().ok());
    let table = if live.contains_key(KEY_MAX) {
        table::read(ctx, est)
    } else {
        None
    };
    let stats = if live.contains_key(KEY_MAX) {
        netns_stats(ctx)
    } else {
        vec![]
    };
    let entry_size = entry_size(ctx);
    let ka = |ctx: &mut Ctx, k: &str| -> Option<u64> {
        ctx.read(&format!("/proc/sys/net/ipv4/{k}"))
            .and_then(|s| s.trim().parse().ok())
    };
    let keepalive = match (
        ka(ctx, "tcp_keepalive_time"),
        ka(ctx, "tcp_keepalive_intvl"),
        ka(ctx, "tcp_keepalive_probes"),
    ) {
        (Some(t), Some(i), Some(p)) => Some((t.saturating_add(i.saturating_mul(p)), t)),
        _ => None,
    };
    let systemd_sysctl =
        if !ctx.fs.exists("/usr/lib/systemd/systemd-sysctl") && ctx.fs.exists("/lib/systemd/systemd-sysctl") {
            "/lib/systemd/systemd-sysctl"
        } else {
            "/usr/lib/systemd/systemd-sysctl"
        };
    Facts {
        kernel,
        mem_total_kb,
        page_size,
        module,
        live,
        hashsize_param,
        buckets_writable,
        sysctl,
        modprobe,
        cmdline_hashsize,
        boot_load,
        udev_reapply,
        table,
        stats,
        entry_size,
        keepalive,
        systemd_sysctl,
    }
}

/// Numeric when both parse, else whitespace-insensitive text.
pub fn same_value(a: &str, b: &str) -> bool {
    match (a.trim().parse::<i64>(), b.trim().parse::<i64>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a.split_whitespace().eq(b.split_whitespace()),
    }
}
