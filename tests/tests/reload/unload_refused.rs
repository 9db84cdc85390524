//! `modprobe -r nf_conntrack` while xt_conntrack holds it: the kernel refuses busybox's modprobe (EAGAIN or EBUSY)
//! and kmod's modprobe refuses by itself; ctrace reports both as `unload_failed` naming the holder, and no unload
//! and no reset, since the module and its settings stay.

use ctrace_tests::{
    checks::Checks,
    events::{self, strings, text},
    guest::{self, set_sysctl, sysctl},
    require_root,
};

use crate::{MAX_KEY, RAISED_MAX, SNAPSHOT_WAIT, check_session, firewall_on, resets, start_ctrace};

#[test]
#[ignore = "tries to unload nf_conntrack, a module only in the VM guests"]
fn an_unload_refused_while_xt_conntrack_holds_it_resets_nothing() {
    require_root();
    let _rule = firewall_on();
    let ctrace = start_ctrace();
    let max = set_sysctl(MAX_KEY, RAISED_MAX).unwrap();
    std::thread::sleep(SNAPSHOT_WAIT);
    let mut c = Checks::new("unload_refused");
    c.fact(format!("holders: {:?}", guest::conntrack_holders()));
    let rc = guest::modprobe(&["-r", "nf_conntrack"]).unwrap();
    let kmod_rc = guest::kmod_modprobe(&["-r", "nf_conntrack"]).unwrap();
    let live = std::fs::read_to_string("/sys/module/nf_conntrack/initstate").unwrap_or_default();
    let after_max = sysctl(MAX_KEY).unwrap();
    std::thread::sleep(SNAPSHOT_WAIT);
    drop(max);
    let (events, status) = ctrace.stop_with_status().unwrap();

    check_session(&mut c, &events, status);
    let live = live.trim();
    c.check(rc != 0 && live == "live", || {
        format!("modprobe -r nf_conntrack exited {rc} and the module is {live:?}: it should have failed")
    });
    c.check(after_max == RAISED_MAX, || {
        format!("nf_conntrack_max changed to {after_max} although the module stayed")
    });
    c.check(kmod_rc != 0, || {
        format!("kmod's modprobe -r exited {kmod_rc}: it should have refused")
    });
    let (by_kmod, by_kernel): (Vec<_>, Vec<_>) = events::module(&events, "unload_failed", "nf_conntrack")
        .into_iter()
        .partition(|f| f["refused_by_tool"] == true);
    c.check(by_kernel.len() == 1 && by_kmod.len() == 1, || {
        format!(
            "{} unload_failed events from the kernel and {} from kmod for nf_conntrack, expected one each",
            by_kernel.len(),
            by_kmod.len()
        )
    });
    if let Some(f) = by_kmod.first() {
        let holders = strings(&f["holders"]);
        c.check(
            holders.iter().any(|h| h == "xt_conntrack") && f["comm"] == "modprobe",
            || format!("kmod's refusal does not name modprobe and xt_conntrack: {f}"),
        );
        c.fact(format!(
            "kmod refused with exit status {} holders {holders:?}",
            f["exit_status"]
        ));
    }
    if let Some(f) = by_kernel.first() {
        let errno = f["errno"].as_i64();
        let holders = strings(&f["holders"]);
        c.check(
            errno == Some(i64::from(libc::EAGAIN)) || errno == Some(i64::from(libc::EBUSY)),
            || format!("errno {} is neither EAGAIN nor EBUSY", f["errno"]),
        );
        c.check(holders.iter().any(|h| h == "xt_conntrack"), || {
            format!("the holders {holders:?} do not name xt_conntrack")
        });
        c.check(f["comm"] == "modprobe", || {
            format!("the event does not name modprobe: {f}")
        });
        c.fact(format!(
            "unload_failed errno {} holders {holders:?} by {}[{}]",
            f["errno"],
            text(&f["comm"]),
            f["pid"]
        ));
    }
    let unloads = events::module(&events, "unload", "nf_conntrack");
    c.equal("the number of unload events for nf_conntrack", unloads.len(), 0);
    let resets = resets(&events);
    c.check(resets.is_empty(), || {
        format!(
            "{} sysctl_reset events without a reload, e.g. {}",
            resets.len(),
            resets[0]
        )
    });
    c.finish();
}
