//! Sizing and presence: a clean host, the table's size, fill and memory, nf_conntrack not loaded.

use super::*;

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
