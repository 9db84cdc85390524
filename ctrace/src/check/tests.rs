//! Fixture trees built in temporary directories: one that triggers each finding id and one that does not, plus a
//! run against the real host.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use super::{IDS, Report, Severity, audit, fsroot::FsRoot};

/// A temporary directory standing for `/`, removed on drop.
pub struct TempTree {
    dir: PathBuf,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl TempTree {
    pub fn new() -> TempTree {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "ctrace-check-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        TempTree { dir }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn at(&self, abs: &str) -> PathBuf {
        self.dir.join(abs.trim_start_matches('/'))
    }

    pub fn write(&self, abs: &str, text: &str) {
        let p = self.at(abs);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    pub fn mkdir(&self, abs: &str) {
        fs::create_dir_all(self.at(abs)).unwrap();
    }

    pub fn remove(&self, abs: &str) {
        let p = self.at(abs);
        if p.is_dir() {
            fs::remove_dir_all(p).unwrap();
        } else {
            let _ = fs::remove_file(p);
        }
    }

    pub fn symlink(&self, target: &str, abs_link: &str) {
        let p = self.at(abs_link);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, p).unwrap();
    }

    pub fn sysctl(&self, name: &str, v: impl std::fmt::Display) {
        self.write(&format!("/proc/sys/net/netfilter/{name}"), &format!("{v}\n"));
    }

    fn report(&self) -> Report {
        audit(&FsRoot::new(self.path()).unwrap(), &[])
    }

    fn ids(&self) -> Vec<&'static str> {
        self.report().ids()
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

const STAT_HEADER: &str = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n";

fn stat_row(invalid: u32, insert_failed: u32, drop: u32, early_drop: u32) -> String {
    format!(
        "00000064  00000000 00000000 00000000 {invalid:08x} 00000000 00000000 00000000 00000000 {insert_failed:08x} {drop:08x} {early_drop:08x} 00000000  00000000 00000000 00000000 00000000\n"
    )
}

/// A Debian 6.1 host with 8 GiB, nf_conntrack loaded as a module at its defaults, nothing configured: only info
/// findings.
fn module_host() -> TempTree {
    let t = TempTree::new();
    t.write("/proc/sys/kernel/osrelease", "6.1.0-13-amd64\n");
    t.write("/proc/meminfo", "MemTotal:        8388608 kB\nMemFree: 1 kB\n");
    t.write(
        "/proc/modules",
        "nf_nat 61440 1 xt_MASQUERADE, Live 0x0\nnf_conntrack 176128 2 xt_conntrack,nf_nat, Live 0x0000000000000000\n",
    );
    t.write("/sys/module/nf_conntrack/initstate", "live\n");
    t.write("/sys/module/nf_conntrack/refcnt", "2\n");
    t.mkdir("/sys/module/nf_conntrack/holders/xt_conntrack");
    t.mkdir("/sys/module/nf_conntrack/holders/nf_nat");
    t.write("/sys/module/nf_conntrack/parameters/hashsize", "262144\n");
    t.sysctl("nf_conntrack_max", 262144);
    t.sysctl("nf_conntrack_buckets", 262144);
    t.sysctl("nf_conntrack_count", 100);
    t.sysctl("nf_conntrack_expect_max", 4096);
    t.sysctl("nf_conntrack_tcp_timeout_established", 432000);
    t.sysctl("nf_conntrack_tcp_timeout_syn_sent", 120);
    t.sysctl("nf_conntrack_udp_timeout", 30);
    t.sysctl("nf_conntrack_udp_timeout_stream", 120);
    t.sysctl("nf_conntrack_frag6_timeout", 60);
    t.write("/proc/sys/net/ipv4/tcp_keepalive_time", "7200\n");
    t.write("/proc/sys/net/ipv4/tcp_keepalive_intvl", "75\n");
    t.write("/proc/sys/net/ipv4/tcp_keepalive_probes", "9\n");
    t.write(
        "/proc/net/stat/nf_conntrack",
        &format!("{STAT_HEADER}{}{}", stat_row(0, 0, 0, 0), stat_row(0, 0, 0, 0)),
    );
    t.write("/proc/net/nf_conntrack", "");
    t.write(
        "/proc/net/fib_trie",
        "Local:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.0.0.1\n        /32 host LOCAL\n     |-- 127.0.0.1\n        /32 host LOCAL\n",
    );
    t.write(
        "/proc/slabinfo",
        "slabinfo - version: 2.1\nnf_conntrack_expect 0 0 208 39 2 : tunables 0 0 0 : slabdata 0 0 0\nnf_conntrack 48 112 320 16 1 : tunables 0 0 0 : slabdata 7 7 0\n",
    );
    t
}

/// The same host with nf_conntrack built in (no initstate, no /proc/modules: CONFIG_MODULES=n).
fn builtin_host() -> TempTree {
    let t = module_host();
    t.remove("/proc/modules");
    t.remove("/sys/module/nf_conntrack/initstate");
    t.remove("/sys/module/nf_conntrack/refcnt");
    t.remove("/sys/module/nf_conntrack/holders");
    t
}

fn udp_line(src: &str, dst: &str, dport: u16, unreplied: bool, reply_dst: &str) -> String {
    let u = if unreplied { " [UNREPLIED]" } else { "" };
    format!(
        "ipv4     2 udp      17 25 src={src} dst={dst} sport=40000 dport={dport}{u} src={dst} dst={reply_dst} sport={dport} dport=40000 mark=0 zone=0 use=2\n"
    )
}

fn tcp_established(src: &str, dst: &str, dport: u16, remaining: u64) -> String {
    format!(
        "ipv4     2 tcp      6 {remaining} ESTABLISHED src={src} dst={dst} sport=50000 dport={dport} src={dst} dst={src} sport={dport} dport=50000 [ASSURED] mark=0 zone=0 use=2\n"
    )
}

fn table(lines: impl Iterator<Item = String>) -> String {
    lines.collect()
}

fn assert_has(t: &TempTree, id: &str) {
    let ids = t.ids();
    assert!(ids.contains(&id), "{id} expected, got {ids:?}");
}

fn assert_lacks(t: &TempTree, id: &str) {
    let ids = t.ids();
    assert!(!ids.contains(&id), "{id} not expected, got {ids:?}");
}

fn finding(r: &Report, id: &str) -> super::Finding {
    r.findings.iter().find(|f| f.id == id).cloned().unwrap()
}

#[test]
fn a_clean_module_host_has_only_info_findings() {
    let t = module_host();
    let r = t.report();
    assert_eq!(r.ids(), ["CT-SIZE-SUMMARY", "CT-RELOAD-HOLDERS", "CT-LOAD-TOP"]);
    assert_eq!(r.exit_code(), 0);
    assert!(r.unreadable.is_empty(), "{:?}", r.unreadable);
    assert_eq!(r.nf_conntrack, "module");
    assert_eq!((r.table.max, r.table.default_max), (Some(262144), Some(262144)));
    assert_eq!(r.table.entry_size_bytes, Some(320), "slabinfo fallback without BTF");
}

#[test]
fn size_summary() {
    let t = module_host();
    let r = t.report();
    let f = finding(&r, "CT-SIZE-SUMMARY");
    let all: String = f.evidence.iter().map(|e| e.text.clone() + "\n").collect();
    assert!(all.contains("nf_conntrack_max = 262144"), "{all}");
    assert!(all.contains("max:buckets = 1.00:1"), "{all}");
    assert!(all.contains("320 bytes per entry"), "{all}");
    assert!(
        all.contains("kernel default for this RAM: nf_conntrack_max = 262144"),
        "{all}"
    );
    let nothing = TempTree::new();
    nothing.write("/proc/meminfo", "MemTotal: 1000 kB\n");
    assert_lacks(&nothing, "CT-SIZE-SUMMARY");
}

#[test]
fn size_fill() {
    let t = module_host();
    assert_lacks(&t, "CT-SIZE-FILL");
    t.sysctl("nf_conntrack_count", 200_000);
    assert_eq!(finding(&t.report(), "CT-SIZE-FILL").severity, Severity::Warning);
    t.sysctl("nf_conntrack_count", 250_000);
    let r = t.report();
    assert_eq!(finding(&r, "CT-SIZE-FILL").severity, Severity::Critical);
    assert_eq!(r.exit_code(), 1);
    assert_eq!(r.findings[0].id, "CT-SIZE-FILL", "critical first");
}

#[test]
fn size_hash_ratio() {
    let t = module_host();
    assert_lacks(&t, "CT-SIZE-HASH-RATIO");
    t.sysctl("nf_conntrack_max", 2_621_440);
    let f = finding(&t.report(), "CT-SIZE-HASH-RATIO");
    assert!(
        f.fix
            .iter()
            .any(|l| l.contains("options nf_conntrack hashsize=2621440")),
        "{:?}",
        f.fix
    );
}

#[test]
fn size_max_below_default() {
    let t = module_host();
    assert_lacks(&t, "CT-SIZE-MAX-BELOW-DEFAULT");
    t.sysctl("nf_conntrack_max", 65536);
    assert_has(&t, "CT-SIZE-MAX-BELOW-DEFAULT");
}

#[test]
fn size_max_memory() {
    let t = module_host();
    assert_lacks(&t, "CT-SIZE-MAX-MEMORY");
    t.sysctl("nf_conntrack_max", 10_000_000);
    assert_has(&t, "CT-SIZE-MAX-MEMORY");
}

#[test]
fn module_not_loaded() {
    let t = module_host();
    assert_lacks(&t, "CT-MODULE-NOT-LOADED");
    let n = TempTree::new();
    n.write("/proc/sys/kernel/osrelease", "6.1.0-13-amd64\n");
    n.write("/proc/meminfo", "MemTotal: 8388608 kB\n");
    n.write("/proc/modules", "ext4 1 0 - Live 0x0\n");
    let r = n.report();
    assert_eq!(r.ids(), ["CT-MODULE-NOT-LOADED"]);
    assert_eq!(r.exit_code(), 0);
}

#[test]
fn persist_not_persisted() {
    let t = module_host();
    t.sysctl("nf_conntrack_max", 524288);
    t.sysctl("nf_conntrack_tcp_timeout_established", 86400);
    let f = finding(&t.report(), "CT-PERSIST-NOT-PERSISTED");
    assert_eq!(f.evidence.len(), 2);
    assert!(
        f.fix
            .iter()
            .any(|l| l == "echo 'net.netfilter.nf_conntrack_max = 524288' >> /etc/sysctl.d/90-nf-conntrack.conf")
    );
    assert!(f.fix.iter().any(|l| l.contains("modules-load.d")));
    // Persisted (in a file with the Debian link to /etc/sysctl.conf): no longer reported as not persisted.
    t.write(
        "/etc/sysctl.conf",
        "net.nf_conntrack_max = 524288\nnet.netfilter.nf_conntrack_tcp_timeout_established=86400\n",
    );
    t.symlink("../sysctl.conf", "/etc/sysctl.d/99-sysctl.conf");
    assert_lacks(&t, "CT-PERSIST-NOT-PERSISTED");
}

#[test]
fn persist_not_in_effect() {
    let t = module_host();
    t.write("/etc/sysctl.d/90-ct.conf", "net.netfilter.nf_conntrack_max = 262144\n");
    assert_lacks(&t, "CT-PERSIST-NOT-IN-EFFECT");
    t.write(
        "/etc/sysctl.d/90-ct.conf",
        "# tuned\nnet.netfilter.nf_conntrack_max = 1048576\n",
    );
    let f = finding(&t.report(), "CT-PERSIST-NOT-IN-EFFECT");
    assert_eq!(f.evidence[0].source.as_deref(), Some("/etc/sysctl.d/90-ct.conf:2"));
    assert!(
        f.fix
            .contains(&"sysctl -w net.netfilter.nf_conntrack_max=1048576".to_owned())
    );
    assert!(
        f.fix
            .iter()
            .any(|l| l.contains("/etc/modules-load.d/nf_conntrack.conf"))
    );
    // A later file of the same name in /usr/lib does not matter; /etc wins.
    t.write(
        "/usr/lib/sysctl.d/90-ct.conf",
        "net.netfilter.nf_conntrack_max = 262144\n",
    );
    assert_has(&t, "CT-PERSIST-NOT-IN-EFFECT");
    // A module option that the loaded module does not have.
    let h = module_host();
    h.write(
        "/etc/modprobe.d/nf_conntrack.conf",
        "options nf_conntrack hashsize=524288\n",
    );
    h.sysctl("nf_conntrack_max", 4_194_304);
    h.write("/etc/sysctl.d/90-ct.conf", "net.netfilter.nf_conntrack_max = 4194304\n");
    h.write("/etc/udev/rules.d/90-ct.rules", "ACTION==\"add\", SUBSYSTEM==\"module\", KERNEL==\"nf_conntrack\", RUN+=\"/usr/lib/systemd/systemd-sysctl --prefix=/net/netfilter\"\n");
    let f = finding(&h.report(), "CT-PERSIST-NOT-IN-EFFECT");
    assert!(f.evidence[0].text.contains("hashsize=524288"), "{:?}", f.evidence);
    // nf_conntrack not loaded yet: the lines will not be applied when something loads it.
    let n = TempTree::new();
    n.write("/proc/meminfo", "MemTotal: 8388608 kB\n");
    n.write("/proc/modules", "");
    n.write("/etc/sysctl.d/90-ct.conf", "net.netfilter.nf_conntrack_max = 1048576\n");
    assert_has(&n, "CT-PERSIST-NOT-IN-EFFECT");
    n.write("/etc/modules-load.d/ct.conf", "nf_conntrack\n");
    let f = finding(&n.report(), "CT-PERSIST-NOT-IN-EFFECT");
    assert!(
        !f.fix.iter().any(|l| l.contains("modules-load.d")),
        "already loaded at boot: {:?}",
        f.fix
    );
}

#[test]
fn persist_lost_on_reload() {
    let t = module_host();
    t.sysctl("nf_conntrack_max", 1_048_576);
    t.write("/etc/sysctl.d/90-ct.conf", "net.netfilter.nf_conntrack_max = 1048576\n");
    let f = finding(&t.report(), "CT-PERSIST-LOST-ON-RELOAD");
    assert_eq!(f.severity, Severity::Warning);
    assert!(
        f.fix[0].contains("SUBSYSTEM==\"module\", KERNEL==\"nf_conntrack\""),
        "{:?}",
        f.fix
    );
    assert!(
        f.fix[1].contains("sysctl -q -p /etc/sysctl.d/90-ct.conf"),
        "{:?}",
        f.fix
    );
    // Only the iptables service re-applies it: info.
    t.write(
        "/etc/sysconfig/iptables-config",
        "IPTABLES_MODULES_UNLOAD=\"yes\"\nIPTABLES_SYSCTL_LOAD_LIST=\".nf_conntrack\"\n",
    );
    assert_eq!(
        finding(&t.report(), "CT-PERSIST-LOST-ON-RELOAD").severity,
        Severity::Info
    );
    // A modprobe install line re-applies it on every load.
    t.write(
        "/etc/modprobe.d/ct.conf",
        "install nf_conntrack /sbin/modprobe --ignore-install nf_conntrack $CMDLINE_OPTS && /sbin/sysctl -q -p /etc/sysctl.d/90-ct.conf\n",
    );
    assert_lacks(&t, "CT-PERSIST-LOST-ON-RELOAD");
    // Built in: nothing to reload.
    let b = builtin_host();
    b.sysctl("nf_conntrack_max", 1_048_576);
    b.write("/etc/sysctl.d/90-ct.conf", "net.netfilter.nf_conntrack_max = 1048576\n");
    assert_lacks(&b, "CT-PERSIST-LOST-ON-RELOAD");
}

#[test]
fn hashsize_as_sysctl() {
    let t = module_host();
    assert_lacks(&t, "CT-HASHSIZE-AS-SYSCTL");
    t.write(
        "/usr/lib/sysctl.d/50-ct.conf",
        "net.netfilter.nf_conntrack_buckets = 131072\n",
    );
    let f = finding(&t.report(), "CT-HASHSIZE-AS-SYSCTL");
    assert_eq!(f.severity, Severity::Warning);
    assert!(
        f.fix
            .iter()
            .any(|l| l == "echo 'options nf_conntrack hashsize=131072' > /etc/modprobe.d/nf_conntrack.conf")
    );
    assert!(
        f.fix
            .iter()
            .any(|l| l.starts_with("sed -i '1s/^/# /' /usr/lib/sysctl.d/50-ct.conf"))
    );
    let ids = t.ids();
    assert!(!ids.contains(&"CT-PERSIST-NOT-IN-EFFECT"), "explained once: {ids:?}");
}

#[test]
fn hashsize_modprobe_builtin() {
    let b = builtin_host();
    assert_lacks(&b, "CT-HASHSIZE-MODPROBE-BUILTIN");
    b.write("/etc/modprobe.d/ct.conf", "options nf_conntrack hashsize=262144\n");
    let f = finding(&b.report(), "CT-HASHSIZE-MODPROBE-BUILTIN");
    assert!(f.fix[0].contains("nf_conntrack.hashsize=262144"), "{:?}", f.fix);
    let m = module_host();
    m.write("/etc/modprobe.d/ct.conf", "options nf_conntrack hashsize=262144\n");
    assert_lacks(&m, "CT-HASHSIZE-MODPROBE-BUILTIN");
}

#[test]
fn reload_iptables_unload() {
    let t = module_host();
    t.write("/etc/sysconfig/iptables-config", "IPTABLES_MODULES_UNLOAD=\"no\"\n");
    assert_lacks(&t, "CT-RELOAD-IPTABLES-UNLOAD");
    t.write(
        "/etc/sysconfig/iptables-config",
        "IPTABLES_MODULES_UNLOAD=\"yes\"\nIPTABLES_SYSCTL_LOAD_LIST=\".bridge-nf\"\n",
    );
    t.write(
        "/etc/sysconfig/ip6tables-config",
        "# IP6TABLES_MODULES_UNLOAD not set: defaults to yes\n",
    );
    t.write(
        "/etc/init.d/iptables",
        "#!/bin/sh\nNF_MODULES_COMMON=(x_tables nf_nat nf_conntrack) # Used by netfilter v4 and v6\n",
    );
    let f = finding(&t.report(), "CT-RELOAD-IPTABLES-UNLOAD");
    let srcs: Vec<_> = f.evidence.iter().filter_map(|e| e.source.clone()).collect();
    assert!(
        srcs.contains(&"/etc/sysconfig/iptables-config:1".to_owned()),
        "{srcs:?}"
    );
    assert!(srcs.contains(&"/etc/init.d/iptables:2".to_owned()), "{srcs:?}");
    assert!(srcs.contains(&"/etc/sysconfig/ip6tables-config".to_owned()), "{srcs:?}");
    assert!(
        f.fix.contains(
            &"sed -i 's/^IPTABLES_MODULES_UNLOAD=.*/IPTABLES_MODULES_UNLOAD=\"no\"/' /etc/sysconfig/iptables-config"
                .to_owned()
        )
    );
    // Built in: rmmod cannot unload it.
    let b = builtin_host();
    b.write("/etc/sysconfig/iptables-config", "IPTABLES_MODULES_UNLOAD=yes\n");
    assert_lacks(&b, "CT-RELOAD-IPTABLES-UNLOAD");
}

#[test]
fn reload_initscript_edited() {
    let t = module_host();
    t.write("/etc/sysconfig/iptables-config", "IPTABLES_MODULES_UNLOAD=\"yes\"\n");
    t.write(
        "/usr/libexec/iptables/iptables.init",
        "NF_MODULES_COMMON=(x_tables nf_conntrack)\n",
    );
    assert_lacks(&t, "CT-RELOAD-INITSCRIPT-EDITED");
    t.write(
        "/usr/libexec/iptables/iptables.init",
        "NF_MODULES_COMMON=(x_tables nf_nat)\n",
    );
    let ids = t.ids();
    assert!(ids.contains(&"CT-RELOAD-INITSCRIPT-EDITED"), "{ids:?}");
    assert!(!ids.contains(&"CT-RELOAD-IPTABLES-UNLOAD"), "{ids:?}");
}

#[test]
fn reload_firewalld_cleanup() {
    let t = module_host();
    t.write(
        "/etc/firewalld/firewalld.conf",
        "DefaultZone=public\nCleanupModulesOnExit=no\n",
    );
    assert_lacks(&t, "CT-RELOAD-FIREWALLD-CLEANUP");
    t.write(
        "/etc/firewalld/firewalld.conf",
        "DefaultZone=public\nCleanupModulesOnExit=yes\n",
    );
    let f = finding(&t.report(), "CT-RELOAD-FIREWALLD-CLEANUP");
    assert_eq!(f.evidence[0].source.as_deref(), Some("/etc/firewalld/firewalld.conf:2"));
}

#[test]
fn reload_holders_and_builtin() {
    let t = module_host();
    let f = finding(&t.report(), "CT-RELOAD-HOLDERS");
    assert!(f.title.contains("nf_nat, xt_conntrack"), "{}", f.title);
    assert_lacks(&t, "CT-RELOAD-BUILTIN");
    t.write("/sys/module/nf_conntrack/refcnt", "0\n");
    t.remove("/sys/module/nf_conntrack/holders");
    t.write("/proc/modules", "nf_conntrack 176128 0 - Live 0x0\n");
    assert!(
        finding(&t.report(), "CT-RELOAD-HOLDERS")
            .title
            .starts_with("nothing holds")
    );
    let b = builtin_host();
    b.write("/etc/firewalld/firewalld.conf", "CleanupModulesOnExit=yes\n");
    let r = b.report();
    assert!(r.ids().contains(&"CT-RELOAD-BUILTIN"));
    assert!(!r.ids().contains(&"CT-RELOAD-HOLDERS"));
    assert!(!r.ids().contains(&"CT-RELOAD-FIREWALLD-CLEANUP"));
    assert_eq!(r.exit_code(), 0);
}

#[test]
fn load_top() {
    let t = module_host();
    t.write(
        "/proc/net/nf_conntrack",
        &table((0..5).map(|i| tcp_established("10.0.0.9", "10.0.0.1", 443, 400000 + i))),
    );
    let f = finding(&t.report(), "CT-LOAD-TOP");
    assert!(f.title.contains("tcp to port 443 (100.0 %)"), "{}", f.title);
    t.remove("/proc/net/nf_conntrack");
    let r = t.report();
    assert!(!r.ids().contains(&"CT-LOAD-TOP"));
    assert!(
        r.unreadable.iter().any(|u| u.path == "/proc/net/nf_conntrack"),
        "{:?}",
        r.unreadable
    );
}

#[test]
fn load_notrack() {
    let t = module_host();
    let dns = (0..300).map(|i| {
        udp_line(
            &format!("192.168.1.{}", i % 250),
            "10.0.0.1",
            53,
            false,
            &format!("192.168.1.{}", i % 250),
        )
    });
    let web = (0..50).map(|i| tcp_established("192.168.2.2", "10.0.0.1", 80, 431000 + i));
    t.write("/proc/net/nf_conntrack", &table(dns.chain(web)));
    let f = finding(&t.report(), "CT-LOAD-NOTRACK");
    assert_eq!(f.severity, Severity::Info);
    let fix = f.fix.join("\n");
    assert!(
        fix.contains("iptables -t raw -A PREROUTING -p udp --dport 53 -j CT --notrack"),
        "{fix}"
    );
    assert!(
        fix.contains("iptables -t raw -A OUTPUT -p udp --sport 53 -j CT --notrack"),
        "{fix}"
    );
    assert!(
        fix.contains("ip6tables -t raw -A PREROUTING -p udp --dport 53 -j CT --notrack"),
        "{fix}"
    );
    assert!(
        fix.contains("nft add rule inet raw prerouting udp dport 53 notrack"),
        "{fix}"
    );
    assert!(
        fix.contains("nft add rule inet raw output udp sport 53 notrack"),
        "{fix}"
    );
    assert!(!fix.contains("--dport 80"), "tcp/80 is below the threshold: {fix}");
    assert!(
        !fix.contains("OUTPUT -p udp --dport 53"),
        "this host is the server only: {fix}"
    );
    // The same DNS flows, DNAT'd to a backend: they cannot be exempted.
    let nat = (0..300).map(|i| udp_line(&format!("192.168.1.{}", i % 250), "10.0.0.1", 53, false, "172.16.0.5"));
    t.write("/proc/net/nf_conntrack", &table(nat));
    assert_lacks(&t, "CT-LOAD-NOTRACK");
}

#[test]
fn timeout_tcp_established() {
    let t = module_host();
    t.sysctl("nf_conntrack_max", 1000);
    t.sysctl("nf_conntrack_count", 600);
    let est = (0..600).map(|i| tcp_established("192.168.2.2", "10.0.0.1", 8080, if i < 400 { 100000 } else { 431990 }));
    t.write("/proc/net/nf_conntrack", &table(est));
    let f = finding(&t.report(), "CT-TIMEOUT-TCP-ESTABLISHED");
    assert!(
        f.evidence[1]
            .text
            .contains("600 of 600 entries are ESTABLISHED; 400 of them idle"),
        "{:?}",
        f.evidence
    );
    assert!(f.fix[0].starts_with("sysctl -w net.netfilter.nf_conntrack_tcp_timeout_established=86400"));
    t.sysctl("nf_conntrack_max", 262144);
    t.sysctl("nf_conntrack_count", 600);
    assert_lacks(&t, "CT-TIMEOUT-TCP-ESTABLISHED");
}

#[test]
fn timeout_below_keepalive() {
    let t = module_host();
    assert_lacks(&t, "CT-TIMEOUT-BELOW-KEEPALIVE");
    t.sysctl("nf_conntrack_tcp_timeout_established", 3600);
    let f = finding(&t.report(), "CT-TIMEOUT-BELOW-KEEPALIVE");
    assert_eq!(
        f.fix[0],
        "sysctl -w net.netfilter.nf_conntrack_tcp_timeout_established=7920"
    );
}

#[test]
fn timeout_unreplied() {
    let t = module_host();
    t.sysctl("nf_conntrack_max", 1000);
    let replied = (0..600).map(|i| udp_line("10.0.0.1", &format!("198.51.100.{}", i % 200), 9999, false, "10.0.0.1"));
    t.write("/proc/net/nf_conntrack", &table(replied));
    assert_lacks(&t, "CT-TIMEOUT-UNREPLIED");
    let one_way = (0..600).map(|i| udp_line("10.0.0.1", &format!("198.51.100.{}", i % 200), 9999, true, "10.0.0.1"));
    t.write("/proc/net/nf_conntrack", &table(one_way));
    let f = finding(&t.report(), "CT-TIMEOUT-UNREPLIED");
    assert!(
        f.fix
            .contains(&"sysctl -w net.netfilter.nf_conntrack_udp_timeout=10".to_owned())
    );
}

#[test]
fn counters() {
    let t = module_host();
    for id in [
        "CT-COUNTER-DROP",
        "CT-COUNTER-EARLY-DROP",
        "CT-COUNTER-INSERT-FAILED",
        "CT-COUNTER-INVALID",
    ] {
        assert_lacks(&t, id);
    }
    t.write(
        "/proc/net/stat/nf_conntrack",
        &format!("{STAT_HEADER}{}{}", stat_row(1, 2, 3, 4), stat_row(16, 0, 1, 0)),
    );
    let r = t.report();
    for (id, text) in [
        ("CT-COUNTER-DROP", "drop = 4"),
        ("CT-COUNTER-EARLY-DROP", "early_drop = 4"),
        ("CT-COUNTER-INSERT-FAILED", "insert_failed = 2"),
        ("CT-COUNTER-INVALID", "invalid = 17"),
    ] {
        let f = finding(&r, id);
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.evidence[0].text.ends_with(text), "{id}: {:?}", f.evidence);
    }
    assert_eq!(r.exit_code(), 1);
}

#[test]
fn every_id_is_covered_by_a_test_above() {
    // Keep this list in step with the tests: a new id needs a positive and a negative fixture.
    let tested = [
        "CT-SIZE-SUMMARY",
        "CT-SIZE-FILL",
        "CT-SIZE-HASH-RATIO",
        "CT-SIZE-MAX-BELOW-DEFAULT",
        "CT-SIZE-MAX-MEMORY",
        "CT-MODULE-NOT-LOADED",
        "CT-PERSIST-NOT-PERSISTED",
        "CT-PERSIST-NOT-IN-EFFECT",
        "CT-PERSIST-LOST-ON-RELOAD",
        "CT-HASHSIZE-AS-SYSCTL",
        "CT-HASHSIZE-MODPROBE-BUILTIN",
        "CT-RELOAD-IPTABLES-UNLOAD",
        "CT-RELOAD-INITSCRIPT-EDITED",
        "CT-RELOAD-FIREWALLD-CLEANUP",
        "CT-RELOAD-HOLDERS",
        "CT-RELOAD-BUILTIN",
        "CT-LOAD-TOP",
        "CT-LOAD-NOTRACK",
        "CT-TIMEOUT-TCP-ESTABLISHED",
        "CT-TIMEOUT-BELOW-KEEPALIVE",
        "CT-TIMEOUT-UNREPLIED",
        "CT-COUNTER-DROP",
        "CT-COUNTER-EARLY-DROP",
        "CT-COUNTER-INSERT-FAILED",
        "CT-COUNTER-INVALID",
    ];
    let documented: Vec<&str> = IDS.iter().map(|i| i.id).collect();
    assert_eq!(documented, tested);
    let readme = include_str!("../../../README.md");
    let table = markdown_table();
    assert!(
        readme.contains(&table),
        "the README's finding-id table is out of date; it must read:\n{table}"
    );
}

/// The README's finding-id table, generated from [`IDS`].
fn markdown_table() -> String {
    let mut t = String::from("| id | severity | meaning |\n|---|---|---|\n");
    for i in IDS {
        t.push_str(&format!("| `{}` | {} | {} |\n", i.id, i.severity, i.meaning));
    }
    t
}

#[test]
fn ignore_json_and_text() {
    let t = module_host();
    t.sysctl("nf_conntrack_count", 250_000);
    t.write(
        "/etc/sysctl.d/90-ct.conf",
        "net.netfilter.nf_conntrack_max = 2\x1b[31m\n",
    );
    let fs = FsRoot::new(t.path()).unwrap();
    let r = audit(&fs, &["CT-SIZE-FILL".to_owned(), "CT-PERSIST-NOT-IN-EFFECT".to_owned()]);
    assert_eq!(r.exit_code(), 0, "{:?}", r.ids());
    assert_eq!(r.suppressed, 2);
    let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(v["exit_code"], 0);
    assert_eq!(
        v["ignored"],
        serde_json::json!(["CT-PERSIST-NOT-IN-EFFECT", "CT-SIZE-FILL"])
    );
    let f0 = &v["findings"][0];
    for k in ["id", "severity", "title", "evidence", "fix"] {
        assert!(!f0[k].is_null(), "{k} missing in {f0}");
    }
    assert_eq!(v["findings"][0]["severity"], "info");
    assert!(v["unreadable"].is_array());
    assert_eq!(v["table"]["max"], 262144);

    let r = audit(&fs, &[]);
    let text = r.to_text();
    assert!(text.contains("\nCRITICAL (1)\n"), "{text}");
    assert!(text.contains("\n  CT-SIZE-FILL  "), "{text}");
    assert!(
        text.contains("\n    fix: sysctl -w net.netfilter.nf_conntrack_max=524288\n"),
        "{text}"
    );
    assert!(
        text.contains("net.netfilter.nf_conntrack_max = 2?[31m"),
        "escapes are masked: {text}"
    );
    assert!(!text.contains('\x1b'));
    assert!(text.ends_with("exit 1\n"), "{text}");
}

/// The real host: the check completes without root requirements and reports the kernel's own nf_conntrack_max.
#[test]
fn real_host() {
    let fs = FsRoot::new("/").unwrap();
    let r = audit(&fs, &[]);
    let live = fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    assert_eq!(r.table.max, live);
    if let Some(max) = live {
        assert!(r.ids().contains(&"CT-SIZE-SUMMARY"), "{:?}", r.ids());
        assert!(r.to_text().contains(&format!("nf_conntrack_max = {max}")));
    } else {
        assert!(r.ids().contains(&"CT-MODULE-NOT-LOADED") || r.nf_conntrack == "unknown");
        assert!(r.unreadable.iter().all(|u| !u.path.is_empty() && !u.error.is_empty()));
    }
    assert!(r.exit_code() <= 1);
}
