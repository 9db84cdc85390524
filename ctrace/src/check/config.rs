//! Configuration files that decide conntrack's settings at boot and at every module load: sysctl.d (with
//! systemd-sysctl's precedence), modprobe.d, modules-load.d, udev rules and shell-style `KEY=value` files.

use std::collections::BTreeMap;

use super::{Ctx, clean};

/// A line in a file, printed as `path:line`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub path: String,
    pub line: usize,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path, self.line)
    }
}

/// sysctl.d directories, highest precedence first: a file name in an earlier directory hides the same name in
/// later ones (so /etc overrides /run and /usr/lib); all files are then applied in file-name order.
pub const SYSCTL_DIRS: &[&str] = &[
    "/etc/sysctl.d",
    "/run/sysctl.d",
    "/usr/local/lib/sysctl.d",
    "/usr/lib/sysctl.d",
    "/lib/sysctl.d",
];
pub const SYSCTL_CONF: &str = "/etc/sysctl.conf";

pub const MODPROBE_DIRS: &[&str] = &[
    "/etc/modprobe.d",
    "/run/modprobe.d",
    "/usr/local/lib/modprobe.d",
    "/usr/lib/modprobe.d",
    "/lib/modprobe.d",
];

pub const MODULES_LOAD_DIRS: &[&str] = &[
    "/etc/modules-load.d",
    "/run/modules-load.d",
    "/usr/local/lib/modules-load.d",
    "/usr/lib/modules-load.d",
    "/lib/modules-load.d",
];

pub const UDEV_DIRS: &[&str] = &[
    "/etc/udev/rules.d",
    "/run/udev/rules.d",
    "/usr/local/lib/udev/rules.d",
    "/usr/lib/udev/rules.d",
    "/lib/udev/rules.d",
];

/// Files of `dirs` that end in `suffix`, as systemd and kmod pick them: one file per name (the first directory
/// wins), in name order. Returns (name, logical path).
pub fn conf_files(ctx: &mut Ctx, dirs: &[&str], suffix: &str) -> Vec<(String, String)> {
    let mut by_name: BTreeMap<String, String> = BTreeMap::new();
    for dir in dirs {
        for name in ctx.read_dir(dir).unwrap_or_default() {
            if name.ends_with(suffix) && !by_name.contains_key(&name) {
                by_name.insert(name.clone(), format!("{dir}/{name}"));
            }
        }
    }
    by_name.into_iter().collect()
}

/// One `key = value` line of a sysctl file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// Dotted and normalised: `net.nf_conntrack_max` is stored as `net.netfilter.nf_conntrack_max`.
    pub key: String,
    pub value: String,
    pub source: Source,
}

/// The sysctl files in the order they are applied, and the value each key ends with.
#[derive(Clone, Debug, Default)]
pub struct SysctlConf {
    pub files: Vec<String>,
    /// Last assignment per key (what a boot leaves, if the key exists when it is applied).
    pub effective: BTreeMap<String, Assignment>,
}

/// Normalises a sysctl key: systemd accepts `/` as separator (when the first separator is `/`, dots and slashes
/// swap), and `net.nf_conntrack_max` is the same variable as `net.netfilter.nf_conntrack_max`.
pub fn normalize_key(raw: &str) -> String {
    let raw = raw.trim().trim_start_matches('-');
    let first_sep = raw.find(['.', '/']);
    let key: String = if first_sep.is_some_and(|i| raw.as_bytes()[i] == b'/') {
        raw.chars()
            .map(|c| match c {
                '/' => '.',
                '.' => '/',
                c => c,
            })
            .collect()
    } else {
        raw.to_owned()
    };
    if key == "net.nf_conntrack_max" {
        "net.netfilter.nf_conntrack_max".to_owned()
    } else {
        key
    }
}

pub fn parse_sysctl(text: &str, path: &str) -> Vec<Assignment> {
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        let Some((k, v)) = l.split_once('=') else { continue };
        let key = normalize_key(k);
        if key.is_empty() || key.contains('*') {
            continue;
        }
        out.push(Assignment {
            key: clean(&key),
            value: clean(v.trim()),
            source: Source {
                path: path.to_owned(),
                line: i + 1,
            },
        });
    }
    out
}

/// systemd-sysctl's files, then /etc/sysctl.conf (which `sysctl --system` applies last) unless a sysctl.d file
/// already links to it (Debian's 99-sysctl.conf).
pub fn load_sysctl(ctx: &mut Ctx) -> SysctlConf {
    let mut conf = SysctlConf::default();
    let mut has_sysctl_conf = false;
    for (_, path) in conf_files(ctx, SYSCTL_DIRS, ".conf") {
        if ctx.fs.resolve(&path) == SYSCTL_CONF {
            has_sysctl_conf = true;
        }
        let Some(text) = ctx.read(&path) else { continue };
        conf.files.push(path.clone());
        for a in parse_sysctl(&text, &path) {
            conf.effective.insert(a.key.clone(), a);
        }
    }
    if !has_sysctl_conf && let Some(text) = ctx.read(SYSCTL_CONF) {
        conf.files.push(SYSCTL_CONF.to_owned());
        for a in parse_sysctl(&text, SYSCTL_CONF) {
            conf.effective.insert(a.key.clone(), a);
        }
    }
    conf
}

/// What modprobe.d says about nf_conntrack.
#[derive(Clone, Debug, Default)]
pub struct ModprobeConf {
    /// `options nf_conntrack ... hashsize=N` (the last one wins).
    pub hashsize: Option<(u64, Source)>,
    /// Any `options nf_conntrack` line.
    pub options: Vec<Source>,
    /// `install nf_conntrack ...` lines (a place to re-apply sysctls after every load).
    pub install: Vec<(String, Source)>,
}

fn module_name(s: &str) -> String {
    s.replace('-', "_")
}

/// Joins backslash-continued lines; yields (first line number, text).
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = vec![];
    let mut cur: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let (start, mut acc) = cur.take().unwrap_or((i + 1, String::new()));
        if let Some(stripped) = line.strip_suffix('\\') {
            acc.push_str(stripped);
            acc.push(' ');
            cur = Some((start, acc));
        } else {
            acc.push_str(line);
            out.push((start, acc));
        }
    }
    if let Some(c) = cur {
        out.push(c);
    }
    out
}

pub fn parse_modprobe(text: &str, path: &str, conf: &mut ModprobeConf) {
    for (line, l) in logical_lines(text) {
        let l = l.trim();
        if l.starts_with('#') {
            continue;
        }
        let mut words = l.split_whitespace();
        let (Some(cmd), Some(module)) = (words.next(), words.next()) else {
            continue;
        };
        if module_name(module) != "nf_conntrack" {
            continue;
        }
        let source = Source {
            path: path.to_owned(),
            line,
        };
        match cmd {
            "options" => {
                conf.options.push(source.clone());
                for w in words {
                    if let Some(v) = w.strip_prefix("hashsize=")
                        && let Ok(n) = v.trim_matches('"').parse::<u64>()
                    {
                        conf.hashsize = Some((n, source.clone()));
                    }
                }
            }
            "install" => conf.install.push((clean(l), source)),
            _ => {}
        }
    }
}

pub fn load_modprobe(ctx: &mut Ctx) -> ModprobeConf {
    let mut conf = ModprobeConf::default();
    for (_, path) in conf_files(ctx, MODPROBE_DIRS, ".conf") {
        if let Some(text) = ctx.read(&path) {
            parse_modprobe(&text, &path, &mut conf);
        }
    }
    if let Some(text) = ctx.read("/etc/modprobe.conf") {
        parse_modprobe(&text, "/etc/modprobe.conf", &mut conf);
    }
    conf
}

/// Modules that load nf_conntrack as a dependency when they are loaded.
const NEEDS_CONNTRACK: &[&str] = &[
    "nf_conntrack",
    "nf_conntrack_ipv4",
    "nf_conntrack_ipv6",
    "nf_conntrack_netlink",
    "nf_nat",
    "nf_nat_ipv4",
    "nf_nat_ipv6",
    "xt_conntrack",
    "xt_state",
    "xt_nat",
    "xt_masquerade",
    "xt_ct",
    "nft_ct",
    "nft_nat",
    "nft_chain_nat",
    "nft_masq",
    "iptable_nat",
    "ip6table_nat",
    "openvswitch",
];

/// A modules-load.d (or Debian /etc/modules) line that loads nf_conntrack at boot, before systemd-sysctl runs.
pub fn boot_loads_conntrack(ctx: &mut Ctx) -> Option<(String, Source)> {
    let mut files: Vec<String> = conf_files(ctx, MODULES_LOAD_DIRS, ".conf")
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    files.push("/etc/modules".to_owned());
    for path in files {
        let Some(text) = ctx.read(&path) else { continue };
        for (i, line) in text.lines().enumerate() {
            let l = line.trim();
            if l.starts_with('#') || l.starts_with(';') {
                continue;
            }
            let Some(word) = l.split_whitespace().next() else {
                continue;
            };
            let m = module_name(word).to_ascii_lowercase();
            if NEEDS_CONNTRACK.contains(&m.as_str()) {
                return Some((clean(&m), Source { path, line: i + 1 }));
            }
        }
    }
    None
}

/// A udev rule that runs sysctl when nf_conntrack is loaded (`SUBSYSTEM=="module", KERNEL=="nf_conntrack"`).
pub fn udev_reapplies(ctx: &mut Ctx) -> Option<Source> {
    for (_, path) in conf_files(ctx, UDEV_DIRS, ".rules") {
        let Some(text) = ctx.read(&path) else { continue };
        for (line, l) in logical_lines(&text) {
            let l = l.trim();
            if !l.starts_with('#') && l.contains("nf_conntrack") && l.contains("sysctl") {
                return Some(Source { path, line });
            }
        }
    }
    None
}

/// Shell-style `KEY=value` / `KEY="value"` assignments (sysconfig files, firewalld.conf); the last one wins.
pub fn parse_shell_vars(text: &str, path: &str) -> BTreeMap<String, (String, Source)> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('#') {
            continue;
        }
        let l = l.strip_prefix("export ").unwrap_or(l);
        let Some((k, v)) = l.split_once('=') else { continue };
        let k = k.trim();
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let v = v.split(" #").next().unwrap_or("").trim();
        let v = v.trim_matches(|c| c == '"' || c == '\'');
        out.insert(
            k.to_owned(),
            (
                clean(v),
                Source {
                    path: path.to_owned(),
                    line: i + 1,
                },
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{fsroot::FsRoot, tests::TempTree};

    #[test]
    fn sysctl_keys_and_precedence() {
        assert_eq!(
            normalize_key("net/netfilter/nf_conntrack_max"),
            "net.netfilter.nf_conntrack_max"
        );
        assert_eq!(normalize_key("-net.nf_conntrack_max"), "net.netfilter.nf_conntrack_max");
        assert_eq!(
            normalize_key("net.ipv4.conf.eth0/1.rp_filter"),
            "net.ipv4.conf.eth0/1.rp_filter"
        );
        let t = TempTree::new();
        t.write("/usr/lib/sysctl.d/10-a.conf", "net.netfilter.nf_conntrack_max = 100\n");
        t.write(
            "/etc/sysctl.d/10-a.conf",
            "# overrides the /usr/lib file of the same name\n",
        );
        t.write("/run/sysctl.d/20-b.conf", "net.netfilter.nf_conntrack_max=200\n");
        t.write(
            "/usr/lib/sysctl.d/30-c.conf",
            "; comment\nnet/netfilter/nf_conntrack_buckets = 4096\n",
        );
        t.write("/etc/sysctl.conf", "net.nf_conntrack_max = 300\n");
        let fs = FsRoot::new(t.path()).unwrap();
        let mut ctx = Ctx::new(&fs);
        let conf = load_sysctl(&mut ctx);
        assert_eq!(
            conf.files,
            [
                "/etc/sysctl.d/10-a.conf",
                "/run/sysctl.d/20-b.conf",
                "/usr/lib/sysctl.d/30-c.conf",
                "/etc/sysctl.conf"
            ]
        );
        let max = &conf.effective["net.netfilter.nf_conntrack_max"];
        assert_eq!(
            (max.value.as_str(), max.source.to_string()),
            ("300", "/etc/sysctl.conf:1".into())
        );
        assert_eq!(conf.effective["net.netfilter.nf_conntrack_buckets"].source.line, 2);
    }

    #[test]
    fn modprobe_options_and_installs() {
        let mut conf = ModprobeConf::default();
        parse_modprobe(
            "options nf-conntrack \\\n  hashsize=65536 expect_hashsize=1\ninstall nf_conntrack /sbin/modprobe --ignore-install nf_conntrack && sysctl -p\noptions other hashsize=1\n",
            "/etc/modprobe.d/ct.conf",
            &mut conf,
        );
        assert_eq!(conf.hashsize.as_ref().map(|h| h.0), Some(65536));
        assert_eq!(conf.hashsize.unwrap().1.line, 1);
        assert_eq!(conf.install.len(), 1);
        assert_eq!(conf.install[0].1.line, 3);
    }

    #[test]
    fn shell_vars() {
        let v = parse_shell_vars(
            "# c\nIPTABLES_MODULES_UNLOAD=\"yes\"\nexport X='a b' # note\nbad key=1\n",
            "/etc/sysconfig/iptables-config",
        );
        assert_eq!(v["IPTABLES_MODULES_UNLOAD"].0, "yes");
        assert_eq!(v["IPTABLES_MODULES_UNLOAD"].1.line, 2);
        assert_eq!(v["X"].0, "a b");
        assert!(!v.contains_key("bad key"));
    }
}
