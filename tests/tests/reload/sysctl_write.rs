//! A write to nf_conntrack_max is attributed to its writer: pid, comm and uid on 6.1 and later (the kernels that
//! give cgroup/sysctl programs the task helpers), none before.

use ctrace_tests::{
    checks::Checks,
    events::{of_kind, text},
    guest::{kernel_version, set_sysctl, sysctl},
    require_root,
};
use serde_json::Value;

use crate::{MAX_KEY, check_session, start_ctrace};

const WRITTEN_MAX: &str = "131072";

#[test]
#[ignore = "writes the global nf_conntrack_max: runs in the VM guests"]
fn a_sysctl_write_names_its_writer() {
    require_root();
    let named = kernel_version().unwrap().at_least(6, 1);
    let ctrace = start_ctrace();
    let old = sysctl(MAX_KEY).unwrap();
    let comm = std::fs::read_to_string("/proc/thread-self/comm")
        .unwrap()
        .trim()
        .to_owned();
    // Written by this thread, and put back by it when the guard drops: a second write.
    drop(set_sysctl(MAX_KEY, WRITTEN_MAX).unwrap());
    let (events, status) = ctrace.stop_with_status().unwrap();

    let mut c = Checks::new("sysctl_write");
    check_session(&mut c, &events, status);
    let writes: Vec<&Value> = of_kind(&events, "sysctl_write")
        .filter(|v| v["key"] == MAX_KEY && v["new"] == WRITTEN_MAX)
        .collect();
    c.equal(
        &format!("the number of sysctl_write events of {MAX_KEY} = {WRITTEN_MAX}"),
        writes.len(),
        1,
    );
    if let Some(w) = writes.first() {
        c.check(w["old"] == old.as_str(), || {
            format!("the write event's old value is not {old}: {w}")
        });
        if named {
            c.check(
                w["comm"] == comm.as_str() && w["pid"] == std::process::id() && w["uid"] == 0,
                || {
                    format!(
                        "the write event does not name {comm}[{}] uid 0: {w}",
                        std::process::id()
                    )
                },
            );
        } else {
            c.check(w.get("pid").is_none() && w.get("comm").is_none(), || {
                format!("this kernel gives sysctl programs no task helpers, yet the event names a process: {w}")
            });
        }
        c.fact(format!(
            "{} {} -> {} by {}",
            text(&w["key"]).trim_start_matches("net.netfilter."),
            text(&w["old"]),
            text(&w["new"]),
            if named {
                format!("{}[{}] uid {}", text(&w["comm"]), w["pid"], w["uid"])
            } else {
                "an unnamed process (no task helpers before 6.1)".to_owned()
            }
        ));
    }
    // The write that puts the old value back is seen too.
    let restores = of_kind(&events, "sysctl_write")
        .filter(|v| v["key"] == MAX_KEY && v["old"] == WRITTEN_MAX)
        .count();
    c.equal(
        &format!("the number of sysctl_write events restoring {MAX_KEY} from {WRITTEN_MAX}"),
        restores,
        1,
    );
    c.finish();
}
