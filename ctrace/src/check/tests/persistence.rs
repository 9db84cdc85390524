//! Persistence and reload traps: settings not persisted or not in effect, lost on a reload, hashsize, firewalls
//! that unload nf_conntrack.

use super::*;

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
