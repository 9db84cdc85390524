//! Reload traps: firewall configurations that unload nf_conntrack (which resets every one of its sysctls and
//! counters), and what holds the module now.

use super::{
    Ctx, Evidence, Finding, Severity, clean,
    config::{self, Source},
    facts::{Facts, ModuleState, SYS_MODULE},
    persistence::{SYSCONFIG_IP6TABLES, SYSCONFIG_IPTABLES},
};

pub const FIREWALLD_CONF: &str = "/etc/firewalld/firewalld.conf";

struct Family {
    config: &'static str,
    unload_var: &'static str,
    list_var: &'static str,
    scripts: [&'static str; 2],
}

const FAMILIES: [Family; 2] = [
    Family {
        config: SYSCONFIG_IPTABLES,
        unload_var: "IPTABLES_MODULES_UNLOAD",
        list_var: "IPTABLES_SYSCTL_LOAD_LIST",
        scripts: ["/etc/init.d/iptables", "/usr/libexec/iptables/iptables.init"],
    },
    Family {
        config: SYSCONFIG_IP6TABLES,
        unload_var: "IP6TABLES_MODULES_UNLOAD",
        list_var: "IP6TABLES_SYSCTL_LOAD_LIST",
        scripts: ["/etc/init.d/ip6tables", "/usr/libexec/iptables/ip6tables.init"],
    },
];

/// The `NF_MODULES_COMMON=(...)` line of the iptables init script: (line text, names nf_conntrack, source).
fn nf_modules_common(ctx: &mut Ctx, scripts: &[&str]) -> Option<(String, bool, Source)> {
    for path in scripts {
        let Some(text) = ctx.read(path) else { continue };
        for (i, line) in text.lines().enumerate() {
            let l = line.trim();
            if l.starts_with("NF_MODULES_COMMON=") {
                let has = l
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .any(|w| w == "nf_conntrack");
                return Some((
                    clean(l),
                    has,
                    Source {
                        path: (*path).to_owned(),
                        line: i + 1,
                    },
                ));
            }
        }
    }
    None
}

fn set_var_fix(path: &str, var: &str, value: &str, present: bool) -> String {
    if present {
        format!("sed -i 's/^{var}=.*/{var}=\"{value}\"/' {path}")
    } else {
        format!("echo '{var}=\"{value}\"' >> {path}")
    }
}

pub fn check(ctx: &mut Ctx, facts: &Facts) {
    let builtin = matches!(facts.module, ModuleState::Builtin(_));
    let mut unload = Finding::new(
        "CT-RELOAD-IPTABLES-UNLOAD",
        Severity::Warning,
        "the iptables service unloads nf_conntrack on stop and restart and does not re-apply its sysctls: every restart resets nf_conntrack_max, the timeouts and the counters to the defaults",
    );
    let mut edited = Finding::new(
        "CT-RELOAD-INITSCRIPT-EDITED",
        Severity::Warning,
        "nf_conntrack was removed from NF_MODULES_COMMON in the iptables init script to keep it loaded: the next iptables-services update restores the script and the unload",
    );
    let mut builtin_notes = vec![];
    for fam in &FAMILIES {
        let Some(text) = ctx.read(fam.config) else { continue };
        let vars = config::parse_shell_vars(&text, fam.config);
        let (unloads, unload_ev) = match vars.get(fam.unload_var) {
            Some((v, src)) => (
                v.eq_ignore_ascii_case("yes"),
                Evidence::at(format!("{}=\"{v}\"", fam.unload_var), src.to_string()),
            ),
            None => (
                true,
                Evidence::at(
                    format!("{} is not set: the init script's default is yes", fam.unload_var),
                    fam.config,
                ),
            ),
        };
        if !unloads {
            continue;
        }
        if builtin {
            builtin_notes.push(unload_ev);
            continue;
        }
        let list = vars.get(fam.list_var);
        if list.is_some_and(|(v, _)| v.contains("nf_conntrack")) {
            continue;
        }
        let list_ev = match list {
            Some((v, src)) => Evidence::at(
                format!("{}=\"{v}\" does not name nf_conntrack", fam.list_var),
                src.to_string(),
            ),
            None => Evidence::at(format!("{} is not set", fam.list_var), fam.config),
        };
        let fix_unload = set_var_fix(fam.config, fam.unload_var, "no", vars.contains_key(fam.unload_var));
        let fix_list = format!(
            "or: {}",
            set_var_fix(fam.config, fam.list_var, ".nf_conntrack", list.is_some())
        );
        match nf_modules_common(ctx, &fam.scripts) {
            Some((line, false, src)) => {
                edited = edited
                    .evidence(unload_ev)
                    .evidence(Evidence::at(format!("{line} (no nf_conntrack)"), src.to_string()))
                    .fix(fix_unload);
            }
            script => {
                unload = unload.evidence(unload_ev).evidence(list_ev);
                if let Some((line, true, src)) = script {
                    unload = unload.evidence(Evidence::at(line, src.to_string()));
                }
                unload = unload.fix(fix_unload).fix(fix_list);
            }
        }
    }
    if !unload.evidence.is_empty() {
        ctx.push(unload);
    }
    if !edited.evidence.is_empty() {
        ctx.push(edited);
    }

    if let Some(text) = ctx.read(FIREWALLD_CONF) {
        let vars = config::parse_shell_vars(&text, FIREWALLD_CONF);
        if let Some((v, src)) = vars.get("CleanupModulesOnExit")
            && v.eq_ignore_ascii_case("yes")
        {
            let ev = Evidence::at(format!("CleanupModulesOnExit={v}"), src.to_string());
            if builtin {
                builtin_notes.push(ev);
            } else {
                ctx.push(
                    Finding::new(
                        "CT-RELOAD-FIREWALLD-CLEANUP",
                        Severity::Warning,
                        "stopping or restarting firewalld unloads nf_conntrack (CleanupModulesOnExit=yes): its sysctls and counters reset",
                    )
                    .evidence(ev)
                    .fix(format!(
                        "sed -i 's/^CleanupModulesOnExit=.*/CleanupModulesOnExit=no/' {FIREWALLD_CONF}"
                    )),
                );
            }
        }
    }

    match &facts.module {
        ModuleState::Builtin(why) => {
            let mut f = Finding::new(
                "CT-RELOAD-BUILTIN",
                Severity::Info,
                "nf_conntrack is built into the kernel: no firewall stop or modprobe can reload it, its settings reset only at reboot",
            )
            .evidence(Evidence::new(why.clone()));
            for e in builtin_notes {
                f = f.evidence(Evidence {
                    text: format!("{} (no effect on a built-in nf_conntrack)", e.text),
                    source: e.source,
                });
            }
            ctx.push(f);
        }
        ModuleState::Module(h) => {
            let refcnt = h.refcnt.map_or("unknown".to_owned(), |r| r.to_string());
            let title = if h.modules.is_empty() && h.refcnt == Some(0) {
                "nothing holds nf_conntrack: `modprobe -r nf_conntrack` or a firewall stop unloads it and resets its settings"
                    .to_owned()
            } else if h.modules.is_empty() {
                format!("nf_conntrack has {refcnt} users and no holder modules")
            } else {
                format!(
                    "nf_conntrack is held by {}: it is unloaded only together with them (as an iptables stop with module unloading does)",
                    h.modules.join(", ")
                )
            };
            ctx.push(
                Finding::new("CT-RELOAD-HOLDERS", Severity::Info, title)
                    .evidence(Evidence::at(format!("refcnt {refcnt}"), format!("{SYS_MODULE}/refcnt")))
                    .evidence(Evidence::at(
                        format!(
                            "holders: {}",
                            if h.modules.is_empty() {
                                "none".to_owned()
                            } else {
                                h.modules.join(", ")
                            }
                        ),
                        format!("{SYS_MODULE}/holders/, /proc/modules"),
                    )),
            );
        }
        _ => {}
    }
}
