//! `ctrace check` in a guest where nf_conntrack is a module (Debian 6.1): the reload traps it reports are real there,
//! and the test reloads the module to show the trap closing.
//!
//! The test writes a sysctl.d file with nf_conntrack_max (and applies it, as systemd-sysctl would at boot), the hash
//! size as a sysctl, and an iptables-config that unloads modules; `ctrace check --json` must report the setting as
//! lost on reload, the iptables unload and the hashsize sysctl, exit 1, and name the module and its split BTF. Then
//! nf_conntrack is reloaded (`modprobe -r`, `modprobe`): the setting is gone, and the second check must report it as
//! not in effect. Guest-only (ignored here): the host's nf_conntrack is built in; `cargo xtask test --step check`
//! runs it in the guest with `--include-ignored`.

use std::{collections::BTreeSet, process::Command};

use ctrace_tests::{
    checks::Checks,
    ctrace_bin,
    guest::{FIREWALL_MODULES, FileGuard, Unloaded, reload_conntrack, set_sysctl, sysctl},
    require_root,
};
use serde_json::Value;

use ctrace_tests::guest::MAX_KEY;
/// The value the sysctl.d file sets (the 1 GiB guest's default is 7680).
const MAX: &str = "131072";
const PERSISTED: &str = "/etc/sysctl.d/90-ct.conf";

#[test]
#[ignore = "reloads nf_conntrack, a module only in the VM guests"]
fn check_reports_the_reload_trap_before_and_after_a_reload() {
    require_root();
    // The firewall is stopped: nothing holds nf_conntrack, as after `modprobe nf_conntrack` alone (its modules
    // come back when the test ends).
    let _off = Unloaded::modules(&FIREWALL_MODULES).unwrap();
    let _files = [
        (PERSISTED, format!("{MAX_KEY} = {MAX}\n")),
        (
            "/etc/sysctl.d/91-ct-hash.conf",
            "net.netfilter.nf_conntrack_buckets = 16384\n".to_owned(),
        ),
        (
            "/etc/sysconfig/iptables-config",
            "IPTABLES_MODULES_UNLOAD=\"yes\"\nIPTABLES_SYSCTL_LOAD_LIST=\"\"\n".to_owned(),
        ),
    ]
    .map(|(path, content)| FileGuard::write(path, &content).unwrap());
    // What systemd-sysctl does at boot when nf_conntrack is already loaded.
    let _max = set_sysctl(MAX_KEY, MAX).unwrap();

    let mut before = Checks::new("before");
    let report = check(&mut before);
    expect_ids(
        &mut before,
        &report,
        &[
            "CT-SIZE-SUMMARY",
            "CT-PERSIST-LOST-ON-RELOAD",
            "CT-RELOAD-IPTABLES-UNLOAD",
            "CT-HASHSIZE-AS-SYSCTL",
            "CT-RELOAD-HOLDERS",
        ],
        &["CT-PERSIST-NOT-IN-EFFECT", "CT-RELOAD-BUILTIN"],
    );

    reload_conntrack().unwrap();
    let after_max = sysctl(MAX_KEY).unwrap();
    assert_ne!(
        after_max, MAX,
        "the reload did not reset nf_conntrack_max: the guest cannot show the trap"
    );

    let mut after = Checks::new("after");
    after.fact(format!("the reload reset nf_conntrack_max to {after_max}"));
    let report = check(&mut after);
    expect_ids(
        &mut after,
        &report,
        &[
            "CT-PERSIST-NOT-IN-EFFECT",
            "CT-RELOAD-IPTABLES-UNLOAD",
            "CT-HASHSIZE-AS-SYSCTL",
        ],
        &["CT-PERSIST-LOST-ON-RELOAD"],
    );
    let not_in_effect = findings(&report)
        .find(|f| f["id"] == "CT-PERSIST-NOT-IN-EFFECT")
        .map(|f| f["evidence"].to_string())
        .unwrap_or_default();
    after.check(not_in_effect.contains(&format!("{PERSISTED}:1")), || {
        format!("CT-PERSIST-NOT-IN-EFFECT does not cite {PERSISTED}:1: {not_in_effect}")
    });
    Checks::finish_all([before, after]);
}

/// Runs `ctrace check --json` and checks what every run here must show: exit code 1 (warnings), nf_conntrack as a
/// module, the entry size from the module's split BTF. Prints the text report for the log; returns the JSON one.
fn check(c: &mut Checks) -> Value {
    let out = Command::new(ctrace_bin()).args(["check", "--json"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("ctrace check --json printed no JSON document ({e}): {stdout}"));
    let text = Command::new(ctrace_bin()).arg("check").output().unwrap();
    println!("{}", String::from_utf8_lossy(&text.stdout).trim_end());
    c.equal("the exit code", out.status.code(), Some(1));
    c.equal("the report's exit_code", report["exit_code"].as_i64(), Some(1));
    c.check(report["nf_conntrack"] == "module", || {
        format!("nf_conntrack is {}, expected module", report["nf_conntrack"])
    });
    let src = report["table"]["entry_size_source"].as_str().unwrap_or_default();
    c.check(src.contains("/sys/kernel/btf/nf_conntrack"), || {
        format!("the entry size did not come from the module's split BTF: {src}")
    });
    report
}

fn findings(report: &Value) -> impl Iterator<Item = &Value> {
    report["findings"].as_array().into_iter().flatten()
}

fn expect_ids(c: &mut Checks, report: &Value, must: &[&str], must_not: &[&str]) {
    let got: BTreeSet<&str> = findings(report).filter_map(|f| f["id"].as_str()).collect();
    c.fact(format!("findings {got:?}"));
    for id in must {
        c.check(got.contains(id), || format!("{id} missing"));
    }
    for id in must_not {
        c.check(!got.contains(id), || format!("{id} not expected"));
    }
}
