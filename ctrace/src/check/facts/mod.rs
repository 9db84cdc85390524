//! What the checks look at, read once: kernel version, RAM, how nf_conntrack is present (module, built in, not
//! loaded), its live sysctls, the configuration that sets them, the table's contents, the per-netns counters and
//! the size of one entry.

use std::collections::BTreeMap;

use super::{
    Ctx, clean,
    config::{self, ModprobeConf, Source, SysctlConf},
    table::{self, Table},
};
use crate::{btf::Btf, ctstat::CtStats};

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
    pub release: String,
}

impl KernelVersion {
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let release = clean(release.trim());
        let mut it = release.split(|c: char| !c.is_ascii_digit());
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        Some(KernelVersion { major, minor, release })
    }

    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntrySize {
    /// sizeof(struct nf_conn) from BTF (which files), and the slab's object size when /proc/slabinfo is readable
    /// (the slab rounds entries up to cache lines).
    Btf(u32, String, Option<u32>),
    /// The `nf_conntrack` slab's object size from /proc/slabinfo.
    Slab(u32),
    Unknown,
}

impl EntrySize {
    pub fn bytes(&self) -> Option<u64> {
        match self {
            EntrySize::Btf(n, _, slab) => Some(u64::from((*n).max(slab.unwrap_or(0)))),
            EntrySize::Slab(n) => Some(u64::from(*n)),
            EntrySize::Unknown => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            EntrySize::Btf(n, from, None) => format!("{n} bytes per entry (sizeof(struct nf_conn) from {from})"),
            EntrySize::Btf(n, from, Some(slab)) => format!(
                "{} bytes per entry (sizeof(struct nf_conn) = {n} from {from}; the nf_conntrack slab allocates {slab}-byte objects, /proc/slabinfo)",
                (*n).max(*slab)
            ),
            EntrySize::Slab(n) => format!("{n} bytes per entry (nf_conntrack slab object size, /proc/slabinfo)"),
            EntrySize::Unknown => "entry size unknown (no readable BTF or /proc/slabinfo)".to_owned(),
        }
    }
}

/// The kernel's own choice of buckets and max for this RAM, computed as `nf_conntrack_init_start()` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Defaults {
    pub buckets: u64,
    pub max: u64,
    pub expect_max: u64,
    /// The rule that produced them, as evidence.
    pub rule: String,
    /// Computed from RAM by the formula (not a fixed size): the kernel used its page count at load time, which
    /// can differ from MemTotal now by a few percent, so compare with a tolerance.
    pub approximate: bool,
}

/// `hashsize` given as a module option or on the kernel command line makes `max = 8 × hashsize` (all versions);
/// otherwise buckets come from RAM (kernel-conntrack.md): before 5.15 RAM/16384/8, 16384 above 1 GiB, 65536 above
/// 4 GiB, at least 32, max = 4 × buckets; from 5.15 the same base, 65536 above 1 GiB, 262144 above 4 GiB, at
/// least 1024, max = buckets. Buckets are rounded up to a multiple of PAGE_SIZE/8 before max is derived.
pub fn kernel_defaults(kernel: &KernelVersion, mem_total_kb: u64, page_size: u64, hashsize: Option<u64>) -> Defaults {
    let page_size = page_size.max(512);
    let nr_pages = mem_total_kb.saturating_mul(1024) / page_size;
    let gib_pages = (1u64 << 30) / page_size;
    let new = kernel.at_least(5, 15);
    let mut approximate = false;
    let (buckets, factor, rule): (u64, u64, String) = match hashsize.filter(|&h| h > 0) {
        Some(h) => (h, 8, format!("hashsize={h} given: max = 8 × hashsize")),
        None => {
            let base = nr_pages.saturating_mul(page_size) / 16384 / 8;
            let (b, why) = if nr_pages > 4 * gib_pages {
                (if new { 262144 } else { 65536 }, "RAM > 4 GiB")
            } else if nr_pages > gib_pages {
                (if new { 65536 } else { 16384 }, "RAM > 1 GiB")
            } else {
                approximate = base > if new { 1024 } else { 32 };
                (
                    base,
                    "RAM / 16384 / 8, ± the memory the kernel had when it loaded nf_conntrack",
                )
            };
            let min = if new { 1024 } else { 32 };
            let b = b.max(min);
            let factor = if new { 1 } else { 4 };
            let era = if new { "5.15+" } else { "before 5.15" };
            (
                b,
                factor,
                format!(
                    "kernel {} ({era}), MemTotal {} MiB: {why} → {b} buckets, max = {factor} × buckets",
                    kernel.release,
                    mem_total_kb / 1024
                ),
            )
        }
    };
    // nf_ct_alloc_hashtable() rounds the size up before max and the expectation table are derived from it.
    let step = page_size / 8;
    let rounded = buckets.div_ceil(step) * step;
    let max = rounded * factor;
    let rule = if rounded == buckets {
        rule
    } else {
        format!("{rule}; buckets rounded up to {rounded}")
    };
    let expect_max = (rounded / 256).max(1) * 4;
    Defaults {
        buckets: rounded,
        max,
        expect_max,
        rule,
        approximate,
    }
}

impl Defaults {
    /// Whether `value` is the kernel's default for `key` (None: no known default).
    pub fn is_default(d: Option<&Defaults>, key: &str, value: &str) -> Option<bool> {
        let (def, approx) = match key {
            KEY_MAX => d.map(|d| (d.max, d.approximate))?,
            KEY_BUCKETS => d.map(|d| (d.buckets, d.approximate))?,
            KEY_EXPECT_MAX => d.map(|d| (d.expect_max, d.approximate))?,
            _ => (static_default(key)?, false),
        };
        let Ok(v) = value.trim().parse::<u64>() else {
            return Some(false);
        };
        Some(v == def || (approx && v.abs_diff(def).saturating_mul(100) <= def.saturating_mul(15)))
    }
}

/// Defaults of per-netns sysctls that have been the same from 4.18 to 6.18.
pub fn static_default(key: &str) -> Option<u64> {
    let name = key.strip_prefix("net.netfilter.nf_conntrack_")?;
    Some(match name {
        "tcp_timeout_syn_sent" => 120,
        "tcp_timeout_syn_recv" => 60,
        "tcp_timeout_established" => 432000,
        "tcp_timeout_fin_wait" => 120,
        "tcp_timeout_close_wait" => 60,
        "tcp_timeout_last_ack" => 30,
        "tcp_timeout_time_wait" => 120,
        "tcp_timeout_close" => 10,
        "tcp_timeout_max_retrans" => 300,
        "tcp_timeout_unacknowledged" => 300,
        "udp_timeout" => 30,
        "generic_timeout" => 600,
        "icmp_timeout" => 30,
        "icmpv6_timeout" => 30,
        "checksum" => 1,
        "acct" => 0,
        "timestamp" => 0,
        "log_invalid" => 0,
        "tcp_loose" => 1,
        "tcp_be_liberal" => 0,
        "tcp_max_retrans" => 3,
        _ => return None,
    })
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

fn module_state(ctx: &mut Ctx) -> ModuleState {
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

/// The `nf_conntrack` slab's object size (older kernels name the cache `nf_conntrack_<hex>` per netns).
fn slab_objsize(slabinfo: &str) -> Option<u32> {
    for line in slabinfo.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let Some(name) = cols.first() else { continue };
        let per_netns = name
            .strip_prefix("nf_conntrack_")
            .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_hexdigit()));
        if (*name == "nf_conntrack" || per_netns)
            && let Some(n) = cols.get(3).and_then(|s| s.parse().ok())
        {
            return Some(n);
        }
    }
    None
}

fn entry_size(ctx: &mut Ctx) -> EntrySize {
    let vmlinux = "/sys/kernel/btf/vmlinux";
    if ctx.fs.exists(vmlinux) {
        let split = "/sys/kernel/btf/nf_conntrack";
        let read = |abs: &str| {
            ctx.fs.read_bytes(abs).map_err(|e| crate::btf::BtfError::Read {
                path: abs.to_owned(),
                source: std::io::Error::other(e.reason()),
            })
        };
        let btf = read(vmlinux).and_then(|data| Btf::parse(&data, None)).and_then(|b| {
            if ctx.fs.exists(split) {
                read(split)
                    .and_then(|data| Btf::parse(&data, Some(&b)))
                    .map(|s| (s, format!("{vmlinux} + {split}")))
            } else {
                Ok((b, vmlinux.to_owned()))
            }
        });
        match btf.and_then(|(b, from)| b.struct_size("nf_conn").map(|n| (n, from))) {
            Ok((n, from)) if n > 0 => {
                // Read quietly: without root /proc/slabinfo is not readable, and BTF already answered.
                let slab = ctx.fs.read("/proc/slabinfo").ok().as_deref().and_then(slab_objsize);
                return EntrySize::Btf(n, from, slab);
            }
            Ok(_) => {}
            Err(e) => ctx.unreadable(vmlinux, clean(&e.to_string())),
        }
    }
    if let Some(n) = ctx.read("/proc/slabinfo").as_deref().and_then(slab_objsize) {
        return EntrySize::Slab(n);
    }
    EntrySize::Unknown
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

#[cfg(test)]
mod tests {
    use super::*;

    fn k(r: &str) -> KernelVersion {
        KernelVersion::parse(r).unwrap()
    }

    #[test]
    fn defaults_follow_the_kernel_rules() {
        // This CI host: 6.18, 24 GB.
        let d = kernel_defaults(&k("6.18.44-fc"), 24_684_092, 4096, None);
        assert_eq!((d.buckets, d.max, d.expect_max), (262144, 262144, 4096));
        // 5.15+ with 2 GiB: 65536 / 65536; before 5.15: 16384 buckets, max 65536.
        assert_eq!(kernel_defaults(&k("6.1.0-13-amd64"), 2 << 20, 4096, None).max, 65536);
        let old = kernel_defaults(&k("5.10.0"), 2 << 20, 4096, None);
        assert_eq!((old.buckets, old.max), (16384, 65536));
        let rhel = kernel_defaults(&k("4.18.0-240.el8.x86_64"), 16 << 20, 4096, None);
        assert_eq!((rhel.buckets, rhel.max), (65536, 262144));
        // 512 MiB: RAM/16384/8 = 4096 buckets; 5.15+ max = buckets, before: 4 × buckets.
        assert_eq!(kernel_defaults(&k("6.1"), 512 << 10, 4096, None).max, 4096);
        // The 1 GiB Debian 6.1 guest: MemTotal 981,xxx kB, measured max = buckets = 7680.
        let g = kernel_defaults(&k("6.1.0-56-amd64"), 981_500, 4096, None);
        assert_eq!((g.buckets, g.max), (7680, 7680));
        let g = kernel_defaults(&k("6.1.0-13-amd64"), 1_000_000, 4096, None);
        assert!(g.approximate);
        assert_eq!(Defaults::is_default(Some(&g), KEY_MAX, "7680"), Some(true));
        assert_eq!(Defaults::is_default(Some(&g), KEY_BUCKETS, "7680"), Some(true));
        assert_eq!(Defaults::is_default(Some(&g), KEY_MAX, "65536"), Some(false));
        assert_eq!(
            Defaults::is_default(Some(&d), KEY_MAX, "262000"),
            Some(false),
            "fixed sizes are exact"
        );
        assert_eq!(Defaults::is_default(None, KEY_EST, "432000"), Some(true));
        assert_eq!(
            Defaults::is_default(None, "net.netfilter.nf_conntrack_events", "1"),
            None
        );
        assert_eq!(kernel_defaults(&k("5.4"), 512 << 10, 4096, None).max, 16384);
        // Tiny RAM: the minimums.
        assert_eq!(kernel_defaults(&k("6.6"), 16 << 10, 4096, None).buckets, 1024);
        // hashsize given: max = 8 × hashsize, buckets rounded up to 512.
        let h = kernel_defaults(&k("6.1"), 8 << 20, 4096, Some(1000));
        assert_eq!((h.buckets, h.max), (1024, 8192));
    }

    #[test]
    fn kernel_versions() {
        assert!(k("6.18.44-fc-v657").at_least(5, 15));
        assert!(!k("5.10.0-28-amd64").at_least(5, 15));
        assert!(KernelVersion::parse("garbage").is_none());
    }
}
