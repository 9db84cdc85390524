//! The conntrack sysctls as they are now, and what a module reload changed.
//!
//! nf_conntrack registers every `net.netfilter.nf_conntrack_*` sysctl; a reload recomputes them
//! in its init (hashsize only comes from the module option). ctrace keeps the values seen while
//! the module was live, and when the new module is live reports each key that changed.

use std::{collections::BTreeMap, fs, path::Path};

use crate::check::{
    Ctx, config,
    facts::{self, Defaults, KernelVersion},
    fsroot::FsRoot,
};

const SYSCTL_DIR: &str = "/proc/sys/net/netfilter";
const HASHSIZE: &str = "/sys/module/nf_conntrack/parameters/hashsize";
/// How `hashsize` is named in reports: it is a module option, not a sysctl.
pub const HASHSIZE_KEY: &str = "nf_conntrack.hashsize";

/// Key (sysctl dotted name, or `nf_conntrack.hashsize`) → value as the kernel prints it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub values: BTreeMap<String, String>,
}

impl Snapshot {
    /// Reads the current values (in the calling thread's netns). Empty when nf_conntrack is not loaded.
    pub fn read() -> Snapshot {
        Snapshot::read_from(Path::new(SYSCTL_DIR), Path::new(HASHSIZE))
    }

    fn read_from(dir: &Path, hashsize: &Path) -> Snapshot {
        let mut values = BTreeMap::new();
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with("nf_conntrack_") || !e.path().is_file() {
                    continue;
                }
                // Write-only or unreadable entries are skipped, not fatal.
                if let Ok(v) = fs::read_to_string(e.path()) {
                    values.insert(format!("net.netfilter.{name}"), normalize(&v));
                }
            }
        }
        if let Ok(v) = fs::read_to_string(hashsize) {
            values.insert(HASHSIZE_KEY.to_owned(), normalize(&v));
        }
        Snapshot { values }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Only the keys each netns has its own value of (timeouts, checksum, ...): the global ones
    /// (max, buckets, expect_max, hashsize) are reported once, from the initial netns.
    pub fn per_netns_only(mut self) -> Snapshot {
        self.values.retain(|k, _| !is_global(k));
        self
    }

    /// Whether a live module's sysctls were all there (an unload removes them one by one).
    pub fn is_complete(&self) -> bool {
        self.values
            .contains_key("net.netfilter.nf_conntrack_tcp_timeout_established")
    }
}

/// Keys with one value for the whole kernel (read-only mirrors in other netns).
pub fn is_global(key: &str) -> bool {
    matches!(
        key,
        "net.netfilter.nf_conntrack_max"
            | "net.netfilter.nf_conntrack_buckets"
            | "net.netfilter.nf_conntrack_expect_max"
    ) || key == HASHSIZE_KEY
}

/// Multi-value sysctls print tab-separated; compare and report them with single spaces.
fn normalize(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A key whose value differs after a reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub before: String,
    pub after: String,
}

/// What ctrace reports for a key a reload changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysctlReset {
    pub change: Change,
    /// The network namespace of a per-netns key in a netns other than ctrace's own.
    pub netns: Option<u32>,
    /// Whether `after` is the kernel's own default on this machine (None: cannot tell).
    pub default: Option<bool>,
    pub persisted_in: Option<String>,
    pub fix: String,
}

/// Builds the reports for a reload: `before` was seen while the old module was live.
pub fn resets(before: &Snapshot, after: &Snapshot) -> Vec<SysctlReset> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let kernel = KernelVersion::parse(&release);
    let mem = mem_total_kb().unwrap_or(0);
    let hashsize_option = hashsize_option();
    diff(before, after)
        .into_iter()
        // A hashsize option the reload applied is configuration, not a reset.
        .filter(|c| !(is_table_size(&c.key) && hashsize_option.is_some_and(|h| c.after == h.to_string())))
        .map(|change| {
            let persisted_in = persisted_in(&change.key);
            SysctlReset {
                netns: None,
                default: kernel
                    .as_ref()
                    .and_then(|k| is_default(&change.key, after, k, mem, hashsize_option)),
                fix: fix(&change, persisted_in.as_deref()),
                persisted_in,
                change,
            }
        })
        .collect()
}

/// Resets of per-netns keys in another network namespace: sysctl.d applies to the initial netns
/// only, so whatever created this netns has to set them again.
pub fn netns_resets(netns: u32, label: &str, before: &Snapshot, after: &Snapshot) -> Vec<SysctlReset> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let kernel = KernelVersion::parse(&release);
    diff(before, after)
        .into_iter()
        .filter(|c| !is_global(&c.key))
        .map(|change| SysctlReset {
            netns: Some(netns),
            default: kernel.as_ref().and_then(|k| is_default(&change.key, after, k, 0, None)),
            persisted_in: None,
            fix: format!(
                "sysctl.d only configures the initial netns: have whatever creates netns {label} set it again after \
every nf_conntrack load (e.g. `nsenter --net=<netns> sysctl -w {}={}`), or keep nf_conntrack from unloading",
                change.key, change.before
            ),
            change,
        })
        .collect()
}

/// Keys that changed; counters such as `nf_conntrack_count` are not settings and are skipped.
pub fn diff(before: &Snapshot, after: &Snapshot) -> Vec<Change> {
    const NOT_SETTINGS: &[&str] = &["net.netfilter.nf_conntrack_count"];
    before
        .values
        .iter()
        .filter(|(k, _)| !NOT_SETTINGS.contains(&k.as_str()))
        .filter_map(|(k, b)| {
            let a = after.values.get(k)?;
            (a != b).then(|| Change {
                key: k.clone(),
                before: b.clone(),
                after: a.clone(),
            })
        })
        .collect()
}

/// Whether `after` is what the kernel sets by itself on this machine; None when ctrace cannot tell.
/// The formulas live in `check::facts` (shared with `ctrace check`). `hashsize_option` is the
/// `options nf_conntrack hashsize=` value, if one is configured (it changes the defaults).
pub fn is_default(
    key: &str,
    after: &Snapshot,
    kernel: &KernelVersion,
    mem_kb: u64,
    hashsize_option: Option<u64>,
) -> Option<bool> {
    let value = after.get(key)?;
    // The UDP stream timeout changed in 6.1 (180 s to 120 s), so it is not in the static table.
    if key == "net.netfilter.nf_conntrack_udp_timeout_stream" {
        return Some(value == if kernel.at_least(6, 1) { "120" } else { "180" });
    }
    let defaults = facts::kernel_defaults(kernel, mem_kb, page_size(), hashsize_option);
    let key = if key == HASHSIZE_KEY { facts::KEY_BUCKETS } else { key };
    Defaults::is_default(Some(&defaults), key, value)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 { v as u64 } else { 4096 }
}

/// MemTotal in KiB (what the kernel sized its defaults from).
fn mem_total_kb() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn is_table_size(key: &str) -> bool {
    key == HASHSIZE_KEY || key == "net.netfilter.nf_conntrack_buckets"
}

/// `options nf_conntrack hashsize=N` from modprobe.d, if configured.
fn hashsize_option() -> Option<u64> {
    let fs = FsRoot::new("/").ok()?;
    let mut ctx = Ctx::new(&fs);
    config::load_modprobe(&mut ctx).hashsize.map(|(n, _)| n)
}

/// Where the value of `key` is set to survive a reboot (`path:line` in sysctl.d, or the
/// modprobe.d line for hashsize), on this host.
pub fn persisted_in(key: &str) -> Option<String> {
    let fs = FsRoot::new("/").ok()?;
    let mut ctx = Ctx::new(&fs);
    if is_table_size(key) {
        return config::load_modprobe(&mut ctx).hashsize.map(|(_, src)| src.to_string());
    }
    config::load_sysctl(&mut ctx)
        .effective
        .get(key)
        .map(|a| a.source.to_string())
}

/// The one-line fix for a reset key. `persisted_in` is the sysctl.d/modprobe.d line that holds
/// the value, if any.
pub fn fix(change: &Change, persisted_in: Option<&str>) -> String {
    if is_table_size(&change.key) {
        return format!(
            "hashsize only survives a reload as a module option: echo 'options nf_conntrack hashsize={}' > \
/etc/modprobe.d/nf_conntrack.conf",
            change.before
        );
    }
    // The same remedy `ctrace check` prints for CT-PERSIST-LOST-ON-RELOAD (sysctl.d(5)'s advice).
    let systemd_sysctl = if !Path::new("/usr/lib/systemd/systemd-sysctl").exists()
        && Path::new("/lib/systemd/systemd-sysctl").exists()
    {
        "/lib/systemd/systemd-sysctl"
    } else {
        "/usr/lib/systemd/systemd-sysctl"
    };
    let reapply = format!(
        "make it re-apply on every load: {} (with the iptables service, also name nf_conntrack in \
IPTABLES_SYSCTL_LOAD_LIST)",
        crate::check::persistence::udev_rule(systemd_sysctl)
    );
    match persisted_in {
        Some(src) => format!("{src} sets it, but only at boot; {reapply}"),
        None => format!(
            "persist it (echo '{} = {}' > /etc/sysctl.d/90-conntrack.conf) and {reapply}",
            change.key, change.before
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(pairs: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            values: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn reads_a_sysctl_tree() {
        let dir = std::env::temp_dir().join(format!("ctrace-sysctl-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("nf_conntrack_max"), "7680\n").unwrap();
        fs::write(dir.join("nf_conntrack_tcp_timeout_established"), "432000\n").unwrap();
        fs::write(dir.join("unrelated"), "1\n").unwrap();
        let hs = dir.join("hashsize");
        fs::write(&hs, "7680\n").unwrap();
        let s = Snapshot::read_from(&dir, &hs);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(s.get("net.netfilter.nf_conntrack_max"), Some("7680"));
        assert_eq!(s.get(HASHSIZE_KEY), Some("7680"));
        assert_eq!(s.values.len(), 3);
    }

    #[test]
    fn diff_reports_changed_settings_only() {
        let before = snap(&[
            ("net.netfilter.nf_conntrack_max", "1048576"),
            ("net.netfilter.nf_conntrack_count", "12"),
            ("net.netfilter.nf_conntrack_acct", "0"),
        ]);
        let after = snap(&[
            ("net.netfilter.nf_conntrack_max", "7680"),
            ("net.netfilter.nf_conntrack_count", "0"),
            ("net.netfilter.nf_conntrack_acct", "0"),
        ]);
        assert_eq!(
            diff(&before, &after),
            vec![Change {
                key: "net.netfilter.nf_conntrack_max".into(),
                before: "1048576".into(),
                after: "7680".into()
            }]
        );
    }

    #[test]
    fn defaults_match_the_kernels_measured_in_vms() {
        // A 1 GiB guest's 6.1 kernel sees about 980 MB of RAM and defaults to 7680 buckets (measured).
        let mem_kb = 980_000;
        let k61 = KernelVersion::parse("6.1.0-56-amd64").unwrap();
        let after = snap(&[
            ("net.netfilter.nf_conntrack_max", "7680"),
            ("net.netfilter.nf_conntrack_buckets", "7680"),
            (HASHSIZE_KEY, "7680"),
            ("net.netfilter.nf_conntrack_tcp_timeout_established", "432000"),
            ("net.netfilter.nf_conntrack_udp_timeout_stream", "120"),
        ]);
        for key in after.values.keys() {
            assert_eq!(is_default(key, &after, &k61, mem_kb, None), Some(true), "{key}");
        }
        let k510 = KernelVersion::parse("5.10.0-46-cloud-amd64").unwrap();
        assert_eq!(
            is_default(
                "net.netfilter.nf_conntrack_udp_timeout_stream",
                &after,
                &k510,
                mem_kb,
                None
            ),
            Some(false)
        );
        // A hashsize option makes max = 8 x hashsize.
        let opt = snap(&[
            ("net.netfilter.nf_conntrack_max", "131072"),
            ("net.netfilter.nf_conntrack_buckets", "16384"),
        ]);
        assert_eq!(
            is_default("net.netfilter.nf_conntrack_max", &opt, &k61, mem_kb, Some(16384)),
            Some(true)
        );
        assert_eq!(
            is_default("net.netfilter.nf_conntrack_events", &after, &k61, mem_kb, None),
            None
        );
    }

    #[test]
    fn other_netns_report_only_their_own_keys() {
        let before = snap(&[
            ("net.netfilter.nf_conntrack_max", "1048576"),
            ("net.netfilter.nf_conntrack_tcp_timeout_established", "7200"),
            ("net.netfilter.nf_conntrack_tcp_timeout_established_x", "1"),
        ]);
        let after = snap(&[
            ("net.netfilter.nf_conntrack_max", "7680"),
            ("net.netfilter.nf_conntrack_tcp_timeout_established", "432000"),
            ("net.netfilter.nf_conntrack_tcp_timeout_established_x", "1"),
        ]);
        let r = netns_resets(4026532200, "blue", &before, &after);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].netns, Some(4026532200));
        assert_eq!(r[0].change.key, "net.netfilter.nf_conntrack_tcp_timeout_established");
        assert!(r[0].fix.contains("netns blue"));
        assert!(
            before
                .clone()
                .per_netns_only()
                .get("net.netfilter.nf_conntrack_max")
                .is_none()
        );
        assert!(before.is_complete());
    }

    #[test]
    fn fixes_name_the_right_mechanism() {
        let hs = Change {
            key: HASHSIZE_KEY.into(),
            before: "262144".into(),
            after: "7680".into(),
        };
        assert!(fix(&hs, None).contains("options nf_conntrack hashsize=262144"));
        let max = Change {
            key: "net.netfilter.nf_conntrack_max".into(),
            before: "1048576".into(),
            after: "7680".into(),
        };
        assert!(fix(&max, None).contains("net.netfilter.nf_conntrack_max = 1048576"));
        assert!(fix(&max, Some("/etc/sysctl.d/90-ct.conf:3")).starts_with("/etc/sysctl.d/90-ct.conf:3 sets it"));
    }
}
