//! Fixture trees built in temporary directories: one that triggers each finding id and one that does not, plus a
//! run against the real host.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use super::{IDS, Report, Severity, audit, fsroot::FsRoot};

mod load;
mod persistence;
mod sizing;

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
    let readme = include_str!("../../../../README.md");
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
