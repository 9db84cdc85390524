//! The reload trap (issue 3) in guests where nf_conntrack is a module (Debian 5.10, 6.1 and 6.12): module unload
//! and load events, sysctl resets and writes, each case with its own `ctrace run --json`:
//! - `sysctl_write`: a write to nf_conntrack_max is attributed to its writer (pid and comm from 6.1 on);
//! - `unload_refused`: `modprobe -r nf_conntrack` while xt_conntrack holds it → `unload_failed` naming the holder,
//!   from the kernel (busybox) and from kmod (which refuses by itself), and no reset;
//! - `reset`: nf_conntrack_max (persisted in /etc/sysctl.d) and a TCP timeout raised, the module unloaded and
//!   reloaded → unload/load events by modprobe and one `sysctl_reset` per key with before, after, default and where
//!   it is persisted, also for a per-netns key in another netns, and the same in the text output;
//! - `table_full`: table-full drops before and after a reload: ctrace's totals equal the kernel counter deltas of
//!   both module instances, and the drops after the `reattached` event are reported;
//! - `hashsize`: `options nf_conntrack hashsize=N` in /etc/modprobe.d survives the reload and is not called a reset;
//! - `boot_order`: ctrace started while nf_conntrack is not loaded says kprobe mode, attaches its kprobes when the
//!   firewall loads the module (`reattached`), and decides the drops that follow by them, equal to the rules' and
//!   the kernel's counters.
//!
//! Every case starts from the guest as it boots (nf_conntrack, xt_conntrack and iptable_filter loaded, no rules) and
//! leaves it so. Guest-only (ignored here): the host's nf_conntrack is built in; `cargo xtask test --step reload`
//! runs them in the guests with `--include-ignored`.

mod boot_order;
mod hashsize;
mod reset;
mod sysctl_write;
mod table_full;
mod unload_refused;

use std::{path::Path, process::ExitStatus, time::Duration};

use ctrace_tests::{
    Ctrace, CtraceText,
    checks::Checks,
    events::{self, of_kind, text, timestamp},
    guest::{self, IptablesRule},
};
use serde_json::Value;
use time::OffsetDateTime;

use ctrace_tests::guest::MAX_KEY;
const TIMEOUT_KEY: &str = "net.netfilter.nf_conntrack_tcp_timeout_established";
/// The raised limit (the incident's value).
const RAISED_MAX: &str = "1048576";
/// ctrace refreshes its snapshot of the sysctls about once a second: a change needs this long to be in it.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(2);
const REATTACH_TIMEOUT: Duration = Duration::from_secs(30);

/// `ctrace run --json --rate-limit 0`.
fn start_ctrace() -> Ctrace {
    Ctrace::start(&["--rate-limit", "0"]).unwrap()
}

/// The firewall's rule that makes conntrack track OUTPUT (its module holds nf_conntrack); deleted on drop.
fn firewall_on() -> IptablesRule {
    guest::track_output().unwrap()
}

/// What every case checks: ctrace ended cleanly after SIGINT with one summary and lost nothing.
fn check_session(c: &mut Checks, events: &[Value], status: ExitStatus) {
    c.check(status.success(), || format!("ctrace exited with {status} after SIGINT"));
    let summaries: Vec<&Value> = of_kind(events, "summary").collect();
    c.equal("the number of summary events", summaries.len(), 1);
    if let Some(summary) = summaries.first() {
        c.equal("summary lost", summary["lost"].as_u64(), Some(0));
    }
}

/// `modprobe -r nf_conntrack` and `modprobe nf_conntrack` while ctrace runs (nothing may hold it), then ctrace's
/// `reattached` event (and the text output's line when one runs). The unload must succeed without ending ctrace.
fn reload_while_tracing(c: &mut Checks, ctrace: &mut Ctrace, text: Option<&mut CtraceText>) {
    c.fact(format!("holders before the unload: {:?}", guest::conntrack_holders()));
    let rc = guest::modprobe(&["-r", "nf_conntrack"]).unwrap();
    let gone = !Path::new("/sys/module/nf_conntrack").exists();
    let alive = ctrace.is_running();
    c.check(rc == 0 && gone && alive, || {
        format!("modprobe -r nf_conntrack while ctrace ran: exit {rc}, module gone: {gone}, ctrace alive: {alive}")
    });
    assert!(
        rc == 0,
        "modprobe -r nf_conntrack failed (exit {rc}) while ctrace ran: {:?}",
        c.failures()
    );
    assert_eq!(
        guest::modprobe(&["nf_conntrack"]).unwrap(),
        0,
        "modprobe nf_conntrack failed"
    );
    let reattached = ctrace
        .wait_for(REATTACH_TIMEOUT, |v| v["event"] == "reattached")
        .unwrap();
    assert!(
        reattached.is_some(),
        "ctrace reported no reattached event within {REATTACH_TIMEOUT:?}"
    );
    if let Some(text) = text {
        let back = text
            .wait_for(REATTACH_TIMEOUT, |l| l.contains("nf_conntrack is back"))
            .unwrap();
        assert!(
            back.is_some(),
            "ctrace (text) did not report the reattach within {REATTACH_TIMEOUT:?}"
        );
    }
}

/// The module events of a successful reload: one unload and one load of nf_conntrack by modprobe, in that order,
/// and one `reattached` event. Returns the reattached event's time.
fn check_reload_events(c: &mut Checks, events: &[Value]) -> Option<OffsetDateTime> {
    let unloads = events::module(events, "unload", "nf_conntrack");
    let loads = events::module(events, "load", "nf_conntrack");
    c.check(unloads.len() == 1 && loads.len() == 1, || {
        format!(
            "{} unload and {} load events for nf_conntrack, expected one each",
            unloads.len(),
            loads.len()
        )
    });
    for (event, unload) in unloads
        .iter()
        .map(|u| (u, true))
        .chain(loads.iter().map(|l| (l, false)))
    {
        let cmdline = text(&event["cmdline"]);
        let named =
            cmdline.contains("modprobe") && cmdline.contains(" -r ") == unload && cmdline.ends_with("nf_conntrack");
        c.check(event["comm"] == "modprobe" && named && event["pid"].is_u64(), || {
            let what = if unload {
                "modprobe -r nf_conntrack"
            } else {
                "modprobe nf_conntrack"
            };
            format!("the {} event does not name {what}: {event}", event["action"])
        });
    }
    if let Some(u) = unloads.first() {
        c.fact(format!(
            "unloaded by {}[{}] `{}`",
            text(&u["comm"]),
            u["pid"],
            text(&u["cmdline"])
        ));
    }
    if let (Some(u), Some(l)) = (unloads.first(), loads.first()) {
        let (tu, tl) = (timestamp(u), timestamp(l));
        c.check(tu.is_some() && tl.is_some() && tu < tl, || {
            format!("the load ({}) does not follow the unload ({})", l["ts"], u["ts"])
        });
    }
    let reattached: Vec<&Value> = of_kind(events, "reattached")
        .filter(|v| v["module"] == "nf_conntrack")
        .collect();
    c.equal("the number of reattached events for nf_conntrack", reattached.len(), 1);
    reattached.first().and_then(|r| timestamp(r))
}

/// The `sysctl_reset` events.
fn resets(events: &[Value]) -> Vec<&Value> {
    of_kind(events, "sysctl_reset").collect()
}
