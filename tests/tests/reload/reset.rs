//! nf_conntrack_max raised (and persisted in /etc/sysctl.d) and a TCP timeout raised, here and in another netns;
//! then the module is unloaded and loaded again while ctrace runs: unload and load events by modprobe, and one
//! `sysctl_reset` per key with its value before and after, whether the new value is the kernel's default, where the
//! setting is persisted, and the fix; the text output says the same in words.

use std::collections::BTreeSet;

use ctrace_tests::{
    CtraceText,
    checks::Checks,
    events::text,
    guest::{FIREWALL_MODULES, FileGuard, Unloaded, set_sysctl, sysctl},
    require_root,
    threads::HeldNetns,
};
use serde_json::Value;

use crate::{
    MAX_KEY, RAISED_MAX, SNAPSHOT_WAIT, TIMEOUT_KEY, check_reload_events, check_session, reload_while_tracing, resets,
    start_ctrace,
};

const RAISED_TIMEOUT: &str = "3600";
/// The per-netns timeout set in the other network namespace.
const NETNS_TIMEOUT: &str = "7200";
/// The kernel's compiled-in nf_conntrack_tcp_timeout_established (5 days), the same on every tested kernel.
const DEFAULT_TIMEOUT: &str = "432000";
/// The sysctl.d file, and the line of it that sets nf_conntrack_max.
const SYSCTL_FILE: &str = "/etc/sysctl.d/90-ct.conf";
const SYSCTL_FILE_LINE: u32 = 2;

#[test]
#[ignore = "reloads nf_conntrack, a module only in the VM guests"]
fn a_reload_resets_raised_settings_and_says_so() {
    require_root();
    // The firewall is stopped: nothing holds nf_conntrack (its modules come back when the test ends).
    let _off = Unloaded::modules(&FIREWALL_MODULES).unwrap();
    let _persisted = FileGuard::write(
        SYSCTL_FILE,
        &format!("# written by the ctrace reload VM test\n{MAX_KEY} = {RAISED_MAX}\n"),
    )
    .unwrap();
    // Another network namespace with its own value of a per-netns key: a reload resets it too.
    let other = HeldNetns::new(|| {
        std::fs::write(ctrace::check::proc_path(TIMEOUT_KEY), NETNS_TIMEOUT)?;
        Ok(())
    })
    .unwrap();
    // Both ctrace instances start at once (attaching is slow under emulation).
    let text_mode = std::thread::spawn(|| CtraceText::start(&["--rate-limit", "0"]));
    let mut ctrace = start_ctrace();
    let mut text_mode = text_mode.join().unwrap().unwrap();
    let _max = set_sysctl(MAX_KEY, RAISED_MAX).unwrap();
    let _timeout = set_sysctl(TIMEOUT_KEY, RAISED_TIMEOUT).unwrap();
    std::thread::sleep(SNAPSHOT_WAIT);
    let mut c = Checks::new("reset");
    reload_while_tracing(&mut c, &mut ctrace, Some(&mut text_mode));
    let after_max = sysctl(MAX_KEY).unwrap();
    let after_timeout = sysctl(TIMEOUT_KEY).unwrap();
    // Both stop at once, as they started.
    let text_stop = std::thread::spawn(move || text_mode.stop());
    let (events, status) = ctrace.stop_with_status().unwrap();
    let (lines, text_status) = text_stop.join().unwrap().unwrap();

    check_session(&mut c, &events, status);
    check_reload_events(&mut c, &events);
    let (netns_resets, resets): (Vec<&Value>, Vec<&Value>) =
        resets(&events).into_iter().partition(|r| r.get("netns").is_some());
    // The other netns: its own timeout, reset and reported with its inode; no global key twice.
    c.check(
        netns_resets.len() == 1
            && netns_resets[0]["netns"] == other.inode
            && netns_resets[0]["key"] == TIMEOUT_KEY
            && netns_resets[0]["before"] == NETNS_TIMEOUT
            && netns_resets[0]["after"] == DEFAULT_TIMEOUT,
        || {
            format!(
                "expected one reset of {TIMEOUT_KEY} in netns {} from {NETNS_TIMEOUT}, got {netns_resets:?}",
                other.inode
            )
        },
    );
    c.fact(format!(
        "netns {}: timeout {NETNS_TIMEOUT} -> {DEFAULT_TIMEOUT} reported",
        other.inode
    ));
    let keys: BTreeSet<String> = resets.iter().map(|r| text(&r["key"])).collect();
    let expected: BTreeSet<String> = [MAX_KEY, TIMEOUT_KEY].map(String::from).into();
    c.check(keys == expected && resets.len() == 2, || {
        format!(
            "sysctl_reset events for {keys:?} ({} events), expected one each for {expected:?}",
            resets.len()
        )
    });
    let persisted = Value::from(format!("{SYSCTL_FILE}:{SYSCTL_FILE_LINE}"));
    for (key, before, after, persisted_in) in [
        (MAX_KEY, RAISED_MAX, after_max.as_str(), persisted),
        (TIMEOUT_KEY, RAISED_TIMEOUT, DEFAULT_TIMEOUT, Value::Null),
    ] {
        let Some(r) = resets.iter().find(|r| r["key"] == key) else {
            continue;
        };
        c.check(
            r["before"] == before
                && r["after"] == after
                && r["default"] == true
                && r["persisted_in"] == persisted_in
                && !text(&r["fix"]).is_empty(),
            || {
                format!(
                    "the reset of {key} should say before {before}, after {after}, default true, persisted_in \
                     {persisted_in}, with a fix: {r}"
                )
            },
        );
        c.fact(format!(
            "{} {} -> {} (default {}, persisted_in {})",
            key.trim_start_matches("net.netfilter."),
            text(&r["before"]),
            text(&r["after"]),
            r["default"],
            r["persisted_in"]
        ));
    }
    c.check(after_timeout == DEFAULT_TIMEOUT, || {
        format!("the timeout after the reload is {after_timeout}, not the default {DEFAULT_TIMEOUT}")
    });
    // The text output says the same in words.
    c.check(text_status.success(), || {
        format!("ctrace (text) exited with {text_status}")
    });
    for needle in [
        "MODULE nf_conntrack unloaded by modprobe".to_owned(),
        "MODULE nf_conntrack loaded by modprobe".to_owned(),
        format!("SYSCTL RESET by the nf_conntrack reload: {MAX_KEY} was {RAISED_MAX}"),
        format!("SYSCTL RESET by the nf_conntrack reload: {TIMEOUT_KEY} was {RAISED_TIMEOUT}"),
        "nf_conntrack is back".to_owned(),
    ] {
        c.check(lines.iter().any(|l| l.contains(&needle)), || {
            format!("the text output has no line with {needle:?}")
        });
    }
    println!("ctrace's text output:\n  {}", lines.join("\n  "));
    c.finish();
}
