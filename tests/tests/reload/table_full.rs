//! Table-full drops before and after a reload: ctrace's totals equal the kernel counter deltas of both module
//! instances (a reload zeroes the counters), and the drops after the `reattached` event are the new instance's.

use ctrace_tests::{
    Counters,
    checks::Checks,
    events::{drops, of_kind, summary_kernel_counters, timestamp},
    guest::{FIREWALL_MODULES, Unloaded, set_sysctl},
    require_root, traffic,
};

use crate::{
    MAX_KEY, SNAPSHOT_WAIT, check_reload_events, check_session, firewall_on, reload_while_tracing, resets, start_ctrace,
};

const TABLE_FULL_MAX: &str = "256";
const FLOWS: u32 = 556;
const PORT: u16 = 9;

/// `FLOWS` new UDP flows from flow index `first` while nf_conntrack_max is 256; the counter deltas they caused.
fn overflow(first: u32) -> Counters {
    let before = Counters::read().unwrap();
    {
        let _max = set_sysctl(MAX_KEY, TABLE_FULL_MAX).unwrap();
        traffic::udp_flows(first, FLOWS, PORT).unwrap();
    }
    Counters::read().unwrap().since(&before)
}

#[test]
#[ignore = "reloads nf_conntrack, a module only in the VM guests"]
fn table_full_drops_are_counted_across_a_reload() {
    require_root();
    let rule = firewall_on();
    let mut ctrace = start_ctrace();
    let first = overflow(0);
    std::thread::sleep(SNAPSHOT_WAIT);
    drop(rule);
    let mut c = Checks::new("table_full");
    {
        // The firewall is stopped for the reload and started again.
        let _off = Unloaded::modules(&FIREWALL_MODULES).unwrap();
        reload_while_tracing(&mut c, &mut ctrace, None);
    }
    let _rule = firewall_on();
    let second = overflow(FLOWS);
    let (events, status) = ctrace.stop_with_status().unwrap();

    check_session(&mut c, &events, status);
    let reattached = check_reload_events(&mut c, &events);
    let total = first.plus(&second);
    let summary = of_kind(&events, "summary").next().cloned().unwrap_or_default();
    let totals = &summary["drops"];
    let full: Vec<_> = drops(&events, "table_full").collect();
    let after = reattached.map_or(0, |r| {
        full.iter().filter(|v| timestamp(v).is_some_and(|ts| ts > r)).count()
    });
    c.fact(format!(
        "kernel drop +{} before and +{} after the reload, ctrace {} ({} events, {after} after reattached), \
         early_drop kernel +{} ctrace {}",
        first.drop,
        second.drop,
        totals["table_full"],
        full.len(),
        total.early_drop,
        totals["early_drop"]
    ));
    c.check(first.drop > 0 && second.drop > 0, || {
        format!(
            "the kernel counted {} and {} table-full drops: both phases need some",
            first.drop, second.drop
        )
    });
    c.equal(
        "summary drops.table_full (the kernel's drop deltas)",
        totals["table_full"].as_u64(),
        Some(total.drop),
    );
    c.equal(
        "the number of table_full events (the kernel's drop deltas)",
        full.len() as u64,
        total.drop,
    );
    c.equal(
        "table_full events after the reattached event (the reloaded module's drop delta)",
        after as u64,
        second.drop,
    );
    c.equal(
        "summary drops.early_drop (the kernel's early_drop deltas)",
        totals["early_drop"].as_u64(),
        Some(total.early_drop),
    );
    let reported = summary_kernel_counters(&summary);
    c.equal(
        "summary by_netns kernel_counters.drop, summed (the kernel's deltas)",
        reported.map(|k| k.drop),
        Some(total.drop),
    );
    c.equal(
        "summary by_netns kernel_counters.early_drop, summed (the kernel's deltas)",
        reported.map(|k| k.early_drop),
        Some(total.early_drop),
    );
    let resets = resets(&events);
    c.check(resets.is_empty(), || {
        format!(
            "nf_conntrack_max was restored 2 s before the reload, yet ctrace reported a reset: {}",
            resets[0]
        )
    });
    c.finish();
}
