//! Persistence: live values against sysctl.d/sysctl.conf and modprobe.d, what the next reboot or nf_conntrack
//! reload will lose, settings that are not in effect, and the hash size set in the wrong place.

use std::collections::BTreeSet;

use super::{
    Ctx, Evidence, Finding, Severity,
    config::{self, Assignment},
    facts::{
        Defaults, Facts, HASHSIZE_PARAM, KEY_BUCKETS, KEY_COUNT, KEY_EXPECT_MAX, KEY_MAX, ModuleState, proc_path,
        same_value, static_default,
    },
    sizing::persist_hashsize,
};

pub const SYSCONFIG_IPTABLES: &str = "/etc/sysconfig/iptables-config";
pub const SYSCONFIG_IP6TABLES: &str = "/etc/sysconfig/ip6tables-config";

/// Keys that nf_conntrack.ko registers and a reload resets (frag6 belongs to nf_defrag_ipv6; count is read-only).
fn is_ct_key(key: &str) -> bool {
    key.starts_with("net.netfilter.nf_conntrack_") && !key.contains("frag6") && key != KEY_COUNT
}

fn default_of(key: &str, d: Option<&Defaults>) -> Option<u64> {
    match key {
        KEY_MAX => d.map(|d| d.max),
        KEY_BUCKETS => d.map(|d| d.buckets),
        KEY_EXPECT_MAX => d.map(|d| d.expect_max),
        _ => static_default(key),
    }
}

/// The udev rule that re-applies the sysctl files whenever nf_conntrack is loaded (sysctl.d(5) recommends this
/// for settings of modules).
pub fn udev_fix(facts: &Facts) -> String {
    udev_rule(facts.systemd_sysctl)
}

/// The same rule for a given systemd-sysctl binary (also used by `ctrace run`'s sysctl_reset fixes).
pub fn udev_rule(systemd_sysctl: &str) -> String {
    format!(
        "echo 'ACTION==\"add\", SUBSYSTEM==\"module\", KERNEL==\"nf_conntrack\", RUN+=\"{systemd_sysctl} --prefix=/net/netfilter --prefix=/net/nf_conntrack_max\"' > /etc/udev/rules.d/90-nf-conntrack-sysctl.rules"
    )
}

/// The boot-order fix: systemd-modules-load runs before systemd-sysctl.
pub const MODULES_LOAD_FIX: &str =
    "echo nf_conntrack > /etc/modules-load.d/nf_conntrack.conf   # loaded before systemd-sysctl at boot";

fn boot_load_evidence(facts: &Facts) -> Evidence {
    match &facts.boot_load {
        Some((m, src)) => Evidence::at(format!("{m} is loaded at boot by modules-load.d"), src.to_string()),
        None => Evidence::new(
            "nf_conntrack is in no modules-load.d file: it is loaded on demand by the first firewall rule that needs it, usually after systemd-sysctl has run",
        ),
    }
}

/// Something that re-applies sysctl files after a module load: a udev rule or an `install` line running sysctl.
fn reapply(facts: &Facts) -> Option<Evidence> {
    if let Some(src) = &facts.udev_reapply {
        return Some(Evidence::at(
            "a udev rule re-applies sysctl when nf_conntrack loads",
            src.to_string(),
        ));
    }
    facts
        .modprobe
        .install
        .iter()
        .find(|(l, _)| l.contains("sysctl"))
        .map(|(l, src)| Evidence::at(format!("modprobe.d re-applies sysctl on load: {l}"), src.to_string()))
}

/// `IPTABLES_SYSCTL_LOAD_LIST` naming nf_conntrack: the iptables service re-applies those keys when it starts.
fn iptables_reload_list(ctx: &mut Ctx) -> Option<Evidence> {
    for (path, var) in [
        (SYSCONFIG_IPTABLES, "IPTABLES_SYSCTL_LOAD_LIST"),
        (SYSCONFIG_IP6TABLES, "IP6TABLES_SYSCTL_LOAD_LIST"),
    ] {
        let Some(text) = ctx.read(path) else { continue };
        let vars = config::parse_shell_vars(&text, path);
        if let Some((v, src)) = vars.get(var)
            && v.contains("nf_conntrack")
        {
            return Some(Evidence::at(format!("{var}=\"{v}\""), src.to_string()));
        }
    }
    None
}

fn assignment_evidence(a: &Assignment, live: Option<&String>, d: Option<&Defaults>) -> Evidence {
    let live = live.map_or("not present".to_owned(), |l| l.clone());
    let approx = if d.is_some_and(|d| d.approximate) && [KEY_MAX, KEY_BUCKETS, KEY_EXPECT_MAX].contains(&a.key.as_str())
    {
        "≈ "
    } else {
        ""
    };
    let default = default_of(&a.key, d).map_or(String::new(), |v| format!(", default {approx}{v}"));
    Evidence::at(
        format!("{} = {} (live {live}{default})", a.key, a.value),
        a.source.to_string(),
    )
}

pub fn check(ctx: &mut Ctx, facts: &Facts) {
    let defaults = facts.defaults();
    let d = defaults.as_ref();
    let any_live = !facts.live.is_empty();
    let reloadable = facts.module.reloadable();

    // Settings in files that the kernel does not have.
    let mut not_in_effect = Finding::new(
        "CT-PERSIST-NOT-IN-EFFECT",
        Severity::Warning,
        "sysctl settings for nf_conntrack are not in effect",
    );
    let mut apply_now = vec![];
    for (key, a) in facts.sysctl.effective.iter().filter(|(k, _)| is_ct_key(k)) {
        if key == KEY_BUCKETS {
            continue; // CT-HASHSIZE-AS-SYSCTL explains it.
        }
        match facts.live.get(key) {
            Some(l) if !same_value(l, &a.value) => {
                not_in_effect = not_in_effect.evidence(assignment_evidence(a, Some(l), d));
                apply_now.push(format!("sysctl -w {key}={}", a.value));
            }
            Some(_) => {}
            None if matches!(facts.module, ModuleState::NotLoaded(_)) => {
                not_in_effect = not_in_effect.evidence(Evidence::at(
                    format!(
                        "{key} = {}: nf_conntrack is not loaded, so this was not applied at boot and will not be when something loads it",
                        a.value
                    ),
                    a.source.to_string(),
                ));
            }
            None if any_live => {
                not_in_effect = not_in_effect.evidence(Evidence::at(
                    format!("{key} = {}: this kernel has no such sysctl", a.value),
                    a.source.to_string(),
                ));
            }
            None => {}
        }
    }
    if let (ModuleState::Module(_), Some((h, src)), Some(live)) =
        (&facts.module, &facts.modprobe.hashsize, facts.live_u64(KEY_BUCKETS))
    {
        let step = facts.page_size.max(512) / 8;
        if live != h.div_ceil(step) * step {
            not_in_effect = not_in_effect.evidence(Evidence::at(
                format!("options nf_conntrack hashsize={h}, but nf_conntrack_buckets = {live} (the module was loaded before this option, or it was resized since)"),
                src.to_string(),
            ));
            apply_now.push(format!("echo {h} > {HASHSIZE_PARAM}"));
        }
    }
    if !not_in_effect.evidence.is_empty() {
        not_in_effect.fix = apply_now;
        match facts.module {
            ModuleState::Builtin(_) => {
                not_in_effect =
                    not_in_effect.fix("sysctl --system   # re-apply; then find what changed the value at runtime");
            }
            _ => {
                not_in_effect = not_in_effect.evidence(boot_load_evidence(facts));
                if facts.boot_load.is_none() {
                    not_in_effect = not_in_effect.fix(MODULES_LOAD_FIX);
                }
                if reapply(facts).is_none() {
                    not_in_effect = not_in_effect.fix(udev_fix(facts));
                }
            }
        }
        ctx.push(not_in_effect);
    }

    // Live values that differ from the default and that nothing persists.
    let mut not_persisted = Finding::new(
        "CT-PERSIST-NOT-PERSISTED",
        Severity::Warning,
        if reloadable {
            "nf_conntrack settings were changed at runtime only: the next reboot or nf_conntrack reload resets them"
        } else {
            "nf_conntrack settings were changed at runtime only: the next reboot resets them"
        },
    );
    for (key, live) in facts.live.iter().filter(|(k, _)| is_ct_key(k)) {
        let Some(def) = default_of(key, d) else { continue };
        if Defaults::is_default(d, key, live) != Some(false) || facts.sysctl.effective.contains_key(key) {
            continue;
        }
        if key == KEY_BUCKETS {
            if facts.hashsize_given().is_some() {
                continue;
            }
            not_persisted = not_persisted
                .evidence(Evidence::at(
                    format!("{key} = {live} (default {def}), set by no module option"),
                    proc_path(key),
                ))
                .fix(persist_hashsize(facts, live.parse().unwrap_or(def)));
            continue;
        }
        not_persisted = not_persisted
            .evidence(Evidence::at(
                format!("{key} = {live} (default {def}), set by no sysctl file"),
                proc_path(key),
            ))
            .fix(format!("echo '{key} = {live}' >> /etc/sysctl.d/90-nf-conntrack.conf"));
    }
    if !not_persisted.evidence.is_empty() {
        if reloadable {
            if facts.boot_load.is_none() {
                not_persisted = not_persisted.fix(MODULES_LOAD_FIX);
            }
            if reapply(facts).is_none() {
                not_persisted = not_persisted.fix(udev_fix(facts));
            }
        }
        ctx.push(not_persisted);
    }

    // Persisted only in sysctl files that nothing re-applies when the module is loaded again.
    if let ModuleState::Module(_) = facts.module
        && reapply(facts).is_none()
    {
        let mut lost = Finding::new(
            "CT-PERSIST-LOST-ON-RELOAD",
            Severity::Warning,
            "these nf_conntrack settings come from sysctl files that nothing re-applies when nf_conntrack is loaded again: a reload (firewall restart, modprobe -r) resets them to the defaults until the next boot",
        );
        let mut files = BTreeSet::new();
        for (key, a) in facts.sysctl.effective.iter().filter(|(k, _)| is_ct_key(k)) {
            let Some(l) = facts.live.get(key) else { continue };
            if key == KEY_BUCKETS || !same_value(l, &a.value) || Defaults::is_default(d, key, &a.value) == Some(true) {
                continue;
            }
            lost = lost.evidence(assignment_evidence(a, Some(l), d));
            files.insert(a.source.path.clone());
        }
        if !lost.evidence.is_empty() {
            lost = lost.evidence(Evidence::new(
                "no udev rule (SUBSYSTEM==\"module\", KERNEL==\"nf_conntrack\") and no `install nf_conntrack ... sysctl` line in modprobe.d re-applies them",
            ));
            if let Some(e) = iptables_reload_list(ctx) {
                lost.severity = Severity::Info;
                lost.title = "these nf_conntrack settings are re-applied only by the iptables service: any other reload of nf_conntrack resets them until the next boot".to_owned();
                lost = lost.evidence(e);
            }
            let files: Vec<String> = files.into_iter().collect();
            lost = lost.fix(udev_fix(facts)).fix(format!(
                "or: echo 'install nf_conntrack /sbin/modprobe --ignore-install nf_conntrack $CMDLINE_OPTS && /sbin/sysctl -q -p {}' > /etc/modprobe.d/nf_conntrack-sysctl.conf",
                files.join(" -p ")
            ));
            ctx.push(lost);
        }
    }

    // The hash size set as a sysctl.
    if let Some(a) = facts.sysctl.effective.get(KEY_BUCKETS) {
        let live = facts.live.get(KEY_BUCKETS);
        let applied = live.is_some_and(|l| same_value(l, &a.value));
        let writable = facts.buckets_writable;
        let builtin = matches!(facts.module, ModuleState::Builtin(_));
        let severity = if builtin && writable == Some(true) && applied {
            Severity::Info
        } else {
            Severity::Warning
        };
        let mut f = Finding::new(
            "CT-HASHSIZE-AS-SYSCTL",
            severity,
            "the hash size is set as net.netfilter.nf_conntrack_buckets in a sysctl file: it is a module parameter (hashsize), the sysctl is read-only outside the initial netns and on old kernels, and applies only if nf_conntrack is loaded before systemd-sysctl",
        )
        .evidence(assignment_evidence(a, live, d));
        if any_live {
            f = f.evidence(Evidence::at(
                match writable {
                    Some(true) => "the sysctl is writable here (initial netns, kernel 4.7+)",
                    Some(false) => "the sysctl is read-only here: the line does nothing",
                    None => "this kernel has no such sysctl: the line does nothing",
                },
                proc_path(KEY_BUCKETS),
            ));
        }
        if builtin {
            f = f.evidence(Evidence::new(
                "nf_conntrack is built in, so the line works at boot here; the kernel command line sizes the table once instead of resizing it",
            ));
        } else {
            f = f.evidence(Evidence::new(
                "every load of the module uses hashsize from modprobe.d (or the RAM-based default), never this line",
            ));
        }
        f = f.evidence(Evidence::new(
            "changing buckets does not change nf_conntrack_max: set both",
        ));
        let n = a.value.trim().parse::<u64>().unwrap_or(0);
        f = f.fix(persist_hashsize(facts, n)).fix(format!(
            "sed -i '{}s/^/# /' {}   # comment the sysctl line out",
            a.source.line, a.source.path
        ));
        if !applied && any_live {
            f = f.fix(format!("echo {n} > {HASHSIZE_PARAM}   # apply now"));
        }
        ctx.push(f);
    }

    // modprobe.d options for a built-in nf_conntrack.
    if matches!(facts.module, ModuleState::Builtin(_)) && !facts.modprobe.options.is_empty() {
        let mut f = Finding::new(
            "CT-HASHSIZE-MODPROBE-BUILTIN",
            Severity::Warning,
            "`options nf_conntrack` in modprobe.d is ignored: nf_conntrack is built into this kernel",
        );
        for src in &facts.modprobe.options {
            f = f.evidence(Evidence::at("options nf_conntrack ...", src.to_string()));
        }
        if let ModuleState::Builtin(why) = &facts.module {
            f = f.evidence(Evidence::new(why.clone()));
        }
        let n = facts.modprobe.hashsize.as_ref().map(|h| h.0);
        if let Some(n) = n {
            f = f
                .fix(persist_hashsize(facts, n))
                .fix(format!("echo {n} > {HASHSIZE_PARAM}   # apply now"));
        } else {
            f = f.fix("put each option on the kernel command line as nf_conntrack.NAME=VALUE (GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub)");
        }
        ctx.push(f);
    }
}
