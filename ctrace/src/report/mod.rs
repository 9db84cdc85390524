//! What ctrace reports: one type per JSON Lines record, tagged by `event`. The session builds these, every sink
//! consumes them (the JSON sink serialises them as they are, the text sink renders them), and the README's
//! schema table is generated from their field docs (`schema`), so the documented schema and the output cannot
//! drift apart.

mod alert;
pub(crate) mod drop;
pub mod schema;
mod status;
mod summary;

use schemars::JsonSchema;
use serde::Serialize;
use time::OffsetDateTime;

pub use alert::{ModuleRecord, ReattachedRecord, SysctlResetRecord, SysctlWriteRecord};
pub use drop::{AggregatedDrops, CountedDrops, DropContext, DropPlace, DropRecord, FlowFields, PacketDrop};
pub use status::{NetnsStatus, ProbeState, Status};
pub use summary::{NetnsRecord, ReasonCounts, SummaryRecord, TopFlow, TopPort};

/// One record. Every record serialises as a JSON object whose first keys are `event` (the variant's name) and
/// `ts`.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Mode(ModeRecord),
    Drop(DropRecord),
    Module(ModuleRecord),
    SysctlReset(SysctlResetRecord),
    SysctlWrite(SysctlWriteRecord),
    Reattached(ReattachedRecord),
    Notice(NoticeRecord),
    Summary(Box<SummaryRecord>),
}

impl Event {
    /// A line the user should read (aggregation on/off, the conntrack hook, warnings), stamped now.
    pub fn notice(message: impl Into<String>) -> Event {
        Event::Notice(NoticeRecord {
            ts: OffsetDateTime::now_utc(),
            message: message.into(),
        })
    }

    pub fn ts(&self) -> OffsetDateTime {
        match self {
            Event::Mode(r) => r.ts,
            Event::Drop(DropRecord::Packet(r)) => r.ts,
            Event::Drop(DropRecord::Aggregated(r)) => r.ts,
            Event::Drop(DropRecord::Counted(r)) => r.ts,
            Event::Module(r) => r.ts,
            Event::SysctlReset(r) => r.ts,
            Event::SysctlWrite(r) => r.ts,
            Event::Reattached(r) => r.ts,
            Event::Notice(r) => r.ts,
            Event::Summary(r) => r.ts,
        }
    }
}

/// Which probe mode was chosen, why, and how exact it is (the first record of a run).
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ModeRecord {
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub ts: OffsetDateTime,
    /// `"kprobe"` or `"tracepoint"`
    pub mode: &'static str,
    /// why this mode, a sentence
    pub why: String,
    /// how exact each reason is in this mode, in sentences
    pub exactness: &'static str,
}

/// Something the user should know (aggregation switched on or off, the conntrack hook armed, a warning).
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct NoticeRecord {
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub ts: OffsetDateTime,
    /// one sentence
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_starts_with_event_and_ts() {
        let e = Event::notice("hello");
        let text = serde_json::to_string(&e).unwrap();
        assert!(text.starts_with(r#"{"event":"notice","ts":""#), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["message"], "hello");
        assert_eq!(
            e.ts().unix_timestamp(),
            OffsetDateTime::parse(
                v["ts"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339
            )
            .unwrap()
            .unix_timestamp()
        );
    }
}
