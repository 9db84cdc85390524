//! Reading ctrace's JSON Lines records in tests: by kind, drops by reason, times, and the kernel counters its
//! summary reports.

use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::Counters;

/// The records whose `event` is `kind` (`drop`, `module`, `sysctl_reset`, ...).
pub fn of_kind<'a>(events: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    events.iter().filter(move |v| v["event"] == kind)
}

/// The `drop` records of one reason.
pub fn drops<'a>(events: &'a [Value], reason: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    of_kind(events, "drop").filter(move |v| v["reason"] == reason)
}

/// The `module` records of one action (`load`, `unload`, `unload_failed`) for one module.
pub fn module<'a>(events: &'a [Value], action: &str, name: &str) -> Vec<&'a Value> {
    of_kind(events, "module")
        .filter(|v| v["action"] == action && v["name"] == name)
        .collect()
}

/// A record's `ts` (RFC 3339, UTC), `None` when it has none or it does not parse.
pub fn timestamp(event: &Value) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(event["ts"].as_str()?, &Rfc3339).ok()
}

/// A string field as text, or its JSON text when it is not a string (`null` when absent).
pub fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

/// The strings of a JSON array field (empty when it is not an array).
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(text).collect()).unwrap_or_default()
}

/// The kernel counter deltas a summary reports (`by_netns[].kernel_counters`), summed over its netns; `None` when
/// a netns lacks one of them.
pub fn summary_kernel_counters(summary: &Value) -> Option<Counters> {
    let by_netns = summary["by_netns"].as_array()?;
    let sum = |key: &str| -> Option<u64> { by_netns.iter().map(|n| n["kernel_counters"][key].as_u64()).sum() };
    Some(Counters {
        drop: sum("drop")?,
        early_drop: sum("early_drop")?,
        insert_failed: sum("insert_failed")?,
        invalid: sum("invalid")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_compare_as_times_not_text() {
        let short = timestamp(&json!({"ts": "2026-11-22T00:35:30.08Z"})).unwrap();
        let long = timestamp(&json!({"ts": "2026-11-22T00:35:30.080527746Z"})).unwrap();
        assert!(short < long);
        assert_eq!((long - short).whole_nanoseconds(), 527_746);
        assert!(timestamp(&json!({"ts": "2026-11-22T00:35:30"})).is_none());
        assert!(timestamp(&json!({})).is_none());
    }

    #[test]
    fn summaries_sum_their_netns() {
        let summary = json!({"by_netns": [
            {"kernel_counters": {"drop": 2, "early_drop": 7, "insert_failed": 0, "invalid": 20}},
            {"kernel_counters": {"drop": 1, "early_drop": 0, "insert_failed": 1, "invalid": 0}},
        ]});
        let c = summary_kernel_counters(&summary).unwrap();
        assert_eq!((c.drop, c.early_drop, c.insert_failed, c.invalid), (3, 7, 1, 20));
        assert!(summary_kernel_counters(&json!({"by_netns": [{"kernel_counters": {"drop": 1}}]})).is_none());
    }
}
