//! `options nf_conntrack hashsize=N` in /etc/modprobe.d: the hash size survives a reload and ctrace does not call it
//! a reset, while the raised nf_conntrack_max is reset as usual (to 8 x hashsize, the default with that option).

use ctrace_tests::{
    checks::Checks,
    events::text,
    guest::{ConntrackOptions, FIREWALL_MODULES, Unloaded, set_sysctl, sysctl},
    require_root,
};
use serde_json::Value;

use crate::{
    MAX_KEY, RAISED_MAX, SNAPSHOT_WAIT, check_reload_events, check_session, reload_while_tracing, resets, start_ctrace,
};

const HASHSIZE: u64 = 16384;
const HASHSIZE_FILE: &str = "/sys/module/nf_conntrack/parameters/hashsize";
const BUCKETS_KEY: &str = "net.netfilter.nf_conntrack_buckets";
/// How ctrace names the module parameter in `sysctl_reset` events.
const HASHSIZE_KEY: &str = "nf_conntrack.hashsize";

fn hashsize() -> u64 {
    let text = std::fs::read_to_string(HASHSIZE_FILE).unwrap();
    text.trim().parse().unwrap()
}

#[test]
#[ignore = "reloads nf_conntrack, a module only in the VM guests"]
fn a_hashsize_module_option_survives_a_reload() {
    require_root();
    let _off = Unloaded::modules(&FIREWALL_MODULES).unwrap();
    // Applied by a reload now, and taken away (with another reload) when the test ends.
    let _option = ConntrackOptions::apply(&format!("hashsize={HASHSIZE}")).unwrap();
    let before = hashsize();
    assert_eq!(before, HASHSIZE, "modprobe did not apply the option in /etc/modprobe.d");
    let mut ctrace = start_ctrace();
    let _max = set_sysctl(MAX_KEY, RAISED_MAX).unwrap();
    std::thread::sleep(SNAPSHOT_WAIT);
    let mut c = Checks::new("hashsize");
    reload_while_tracing(&mut c, &mut ctrace, None);
    let after = hashsize();
    let after_max = sysctl(MAX_KEY).unwrap();
    let (events, status) = ctrace.stop_with_status().unwrap();

    check_session(&mut c, &events, status);
    check_reload_events(&mut c, &events);
    c.check(before == HASHSIZE && after == HASHSIZE, || {
        format!("hashsize was {before} before and {after} after the reload, expected {HASHSIZE} both times")
    });
    let resets = resets(&events);
    let wrong: Vec<&&Value> = resets
        .iter()
        .filter(|r| r["key"] == HASHSIZE_KEY || r["key"] == BUCKETS_KEY)
        .collect();
    c.check(wrong.is_empty(), || {
        format!("hashsize kept its value but ctrace reported a reset: {}", wrong[0])
    });
    // The raised max is reset as usual: it shows that ctrace did compare the values after this reload.
    match resets.iter().find(|r| r["key"] == MAX_KEY) {
        Some(r) => {
            c.check(
                r["before"] == RAISED_MAX && r["after"] == after_max.as_str() && r["default"] == true,
                || {
                    format!(
                        "the reset of {MAX_KEY} should say before {RAISED_MAX}, after {after_max}, default true: {r}"
                    )
                },
            );
            // With a hashsize option the kernel's default max is 8 x hashsize, not its RAM-based value.
            c.check(after_max == (8 * HASHSIZE).to_string(), || {
                format!(
                    "nf_conntrack_max is {after_max} after the reload, not 8 x hashsize = {}",
                    8 * HASHSIZE
                )
            });
            c.fact(format!(
                "hashsize {before} -> {after}, not reported; nf_conntrack_max {} -> {} (default {})",
                text(&r["before"]),
                text(&r["after"]),
                r["default"]
            ));
        }
        None => c.check(false, || {
            format!("no sysctl_reset for {MAX_KEY} (raised to {RAISED_MAX}, {after_max} after the reload)")
        }),
    }
    c.check(resets.len() == 1, || {
        let keys: Vec<String> = resets.iter().map(|r| text(&r["key"])).collect();
        format!("sysctl_reset events for {keys:?}, expected only {MAX_KEY}")
    });
    c.finish();
}
