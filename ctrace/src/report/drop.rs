//! Drop records: one packet (or one evicted entry), a second's aggregate of a flood, and evictions counted
//! from the kernel's counters. All three are `"event": "drop"`.

use std::net::IpAddr;

use ctrace_common::{Attribution, Reason};
use schemars::JsonSchema;
use serde::Serialize;
use time::OffsetDateTime;

use crate::{
    aggregate::{AggKey, AggValue},
    event::{Drop, Flow, has_ports, possible_reasons, proto_name},
};

/// What the kernel record does not carry and the session adds: the netns's name and table fill.
#[derive(Clone, Debug, Default)]
pub struct DropContext {
    pub netns_name: Option<String>,
    /// (entries, nf_conntrack_max) of the drop's netns, when readable.
    pub table: Option<(u64, u64)>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum DropRecord {
    Packet(PacketDrop),
    Aggregated(AggregatedDrops),
    Counted(CountedDrops),
}

/// What every drop record says first: why, where, and how full that netns's table was.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct DropPlace {
    /// `table_full`, `early_drop`, `insert_failed`, `invalid` or `netfilter_rule`
    pub reason: &'static str,
    /// the network namespace's inode
    pub netns: u32,
    /// its `ip netns` name, when it has one
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<String>,
    /// entries in the netns's conntrack table: its fill, with `table_max`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_count: Option<u64>,
    /// nf_conntrack_max
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_max: Option<u64>,
}

impl DropPlace {
    pub fn new(reason: Reason, netns: u32, ctx: &DropContext) -> DropPlace {
        DropPlace {
            reason: reason.name(),
            netns,
            netns_name: ctx.netns_name.clone(),
            table_count: ctx.table.map(|t| t.0),
            table_max: ctx.table.map(|t| t.1),
        }
    }
}

/// The flow of a packet (its headers), flattened into the drop record.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct FlowFields {
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `sctp`, ... or the protocol number
    pub proto: String,
    /// source address
    pub src: IpAddr,
    /// destination address
    pub dst: IpAddr,
    /// source port, for port protocols
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    /// destination port, for port protocols
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    /// ICMP or ICMPv6 type
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    /// ICMP code
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    /// ICMP echo id
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_id: Option<u16>,
}

impl From<&Flow> for FlowFields {
    fn from(f: &Flow) -> FlowFields {
        let ports = has_ports(f.proto);
        let icmp = f.icmp_type_code();
        FlowFields {
            proto: proto_name(f.proto),
            src: f.src,
            dst: f.dst,
            sport: ports.then_some(f.sport),
            dport: ports.then_some(f.dport),
            icmp_type: icmp.map(|(t, _)| t),
            icmp_code: icmp.map(|(_, c)| c),
            icmp_id: icmp.map(|_| f.sport),
        }
    }
}

/// One dropped packet, or (kprobe mode, `evicted`) one conntrack entry that early_drop evicted.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct PacketDrop {
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub ts: OffsetDateTime,
    #[serde(flatten)]
    pub place: DropPlace,
    /// the packet's flow (absent when its headers could not be read); for an evicted entry, its
    /// original-direction flow
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub flow: Option<FlowFields>,
    /// 1
    pub count: u64,
    /// the sending process, when a local process sent the packet
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// its name
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// kprobe mode: the kernel's words, e.g. `"invalid tcp flag combination"`, `"unresolved clash"`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// kprobe mode, `true`: not a packet but a conntrack entry early_drop evicted to make room
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evicted: Option<bool>,
    /// how the reason was decided: `probe`, `notrack`, `ct_attached`, `counters`, `hook` or `uncertain`; see
    /// "How exact"
    pub attribution: &'static str,
    /// only when `uncertain`: every reason still possible, `reason` first, e.g. `["invalid","netfilter_rule"]`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub possible: Option<Vec<&'static str>>,
    /// the CPU that freed the packet
    pub cpu: u32,
}

/// The reasons' names, `reason` first, when the attribution was uncertain.
fn possible_names(attribution: Attribution, first: Reason, mask: u8) -> Option<Vec<&'static str>> {
    (attribution == Attribution::Uncertain).then(|| possible_reasons(first, mask).iter().map(|r| r.name()).collect())
}

impl PacketDrop {
    pub fn new(ts: OffsetDateTime, d: &Drop, ctx: &DropContext) -> PacketDrop {
        PacketDrop {
            ts,
            place: DropPlace::new(d.reason, d.netns, ctx),
            flow: d.flow.as_ref().map(FlowFields::from),
            count: 1,
            pid: d.process.as_ref().map(|p| p.pid),
            comm: d.process.as_ref().map(|p| p.comm.clone()),
            detail: d.detail.clone(),
            evicted: d.evicted.then_some(true),
            attribution: d.attribution.name(),
            possible: possible_names(d.attribution, d.reason, d.possible),
            cpu: d.cpu,
        }
    }

    /// Whether another reason was still possible.
    pub fn uncertain(&self) -> bool {
        self.possible.is_some()
    }
}

/// Drops of one second folded together (above `--rate-limit` drops per second), per reason, netns and
/// destination; the busiest destinations keep their own records and the rest fold into one.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct AggregatedDrops {
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub ts: OffsetDateTime,
    #[serde(flatten)]
    pub place: DropPlace,
    /// the protocol, when the headers were read
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// the destination; absent on the record that folds the other destinations
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpAddr>,
    /// the destination port, when all the drops went to one
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    /// the destination ports, when there were several: at most 64
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dports: Option<Vec<u16>>,
    /// whether `dports` left ports out
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dports_truncated: Option<bool>,
    /// the drops folded into this record
    pub count: u64,
    /// `true`
    pub aggregated: bool,
    /// only for uncertain drops, which aggregate apart: `uncertain`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<&'static str>,
    /// only for uncertain drops: every reason still possible, `reason` first
    #[serde(skip_serializing_if = "Option::is_none")]
    pub possible: Option<Vec<&'static str>>,
    /// on the record that folds the rest: how many other destinations it stands for (at least: past 10,000
    /// destinations in a second they are no longer told apart)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_destinations: Option<u64>,
    /// the window, 1000
    pub window_ms: u64,
}

impl AggregatedDrops {
    pub fn new(ts: OffsetDateTime, key: &AggKey, v: &AggValue, ctx: &DropContext) -> AggregatedDrops {
        let ports = key.proto.is_some_and(has_ports);
        let one_port = v.dports.len() == 1 && !v.ports_overflow;
        let attribution = if key.uncertain != 0 {
            Attribution::Uncertain
        } else {
            Attribution::Counters
        };
        AggregatedDrops {
            ts,
            place: DropPlace::new(key.reason, key.netns, ctx),
            proto: key.proto.map(proto_name),
            dst: key.dst,
            dport: (ports && one_port).then(|| v.dports.iter().next().copied()).flatten(),
            dports: (ports && !one_port).then(|| v.dports.iter().copied().collect()),
            dports_truncated: (ports && !one_port).then_some(v.ports_overflow),
            count: v.count,
            aggregated: true,
            attribution: (key.uncertain != 0).then(|| attribution.name()),
            possible: possible_names(attribution, key.reason, key.uncertain),
            other_destinations: (v.others > 0).then_some(v.others),
            window_ms: 1000,
        }
    }

    /// The ports in `dports` or `dport`.
    pub fn ports(&self) -> Vec<u16> {
        match (&self.dports, self.dport) {
            (Some(p), _) => p.clone(),
            (None, Some(p)) => vec![p],
            (None, None) => vec![],
        }
    }
}

/// early_drop evictions not listed one by one, counted from the kernel's counters each second: summing
/// `count` over all early_drop records gives the kernel's exact total.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct CountedDrops {
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub ts: OffsetDateTime,
    /// `reason` is `early_drop`
    #[serde(flatten)]
    pub place: DropPlace,
    /// the evictions this record stands for
    pub count: u64,
    /// `"counters"`
    pub source: &'static str,
    /// `"counters"`
    pub attribution: &'static str,
}

impl CountedDrops {
    pub fn new(ts: OffsetDateTime, reason: Reason, netns: u32, ctx: &DropContext, count: u64) -> CountedDrops {
        CountedDrops {
            ts,
            place: DropPlace::new(reason, netns, ctx),
            count,
            source: "counters",
            attribution: Attribution::Counters.name(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::Process;
    use serde_json::Value;

    pub fn sample_drop() -> Drop {
        Drop {
            ts_ns: 0,
            reason: Reason::TableFull,
            netns: 4026532177,
            cpu: 1,
            flow: Some(Flow {
                proto: 17,
                src: "127.0.0.1".parse().unwrap(),
                dst: "127.0.0.1".parse().unwrap(),
                sport: 5000,
                dport: 53,
            }),
            process: Some(Process {
                pid: 7,
                comm: "dig".into(),
            }),
            new_baseline: false,
            detail: None,
            evicted: false,
            attribution: Attribution::Counters,
            possible: 1 << Reason::TableFull as u8,
        }
    }

    pub fn blue_ctx() -> DropContext {
        DropContext {
            netns_name: Some("blue".into()),
            table: Some((64, 64)),
        }
    }

    fn json(r: DropRecord) -> Value {
        serde_json::to_value(crate::report::Event::Drop(r)).unwrap()
    }

    #[test]
    fn a_packet_has_the_documented_fields() {
        let v = json(DropRecord::Packet(PacketDrop::new(
            OffsetDateTime::UNIX_EPOCH,
            &sample_drop(),
            &blue_ctx(),
        )));
        assert_eq!(v["event"], "drop");
        assert_eq!(v["ts"], "1970-01-01T00:00:00Z");
        assert_eq!(v["reason"], "table_full");
        assert_eq!(v["proto"], "udp");
        assert_eq!(v["src"], "127.0.0.1");
        assert_eq!(v["sport"], 5000);
        assert_eq!(v["dport"], 53);
        assert_eq!(v["netns"], 4026532177u32);
        assert_eq!(v["netns_name"], "blue");
        assert_eq!(v["count"], 1);
        assert_eq!(v["comm"], "dig");
        assert_eq!(v["table_max"], 64);
        assert_eq!(v["attribution"], "counters");
        assert!(v.get("possible").is_none() && v.get("evicted").is_none() && v.get("icmp_type").is_none());
    }

    #[test]
    fn an_uncertain_icmp_packet_lists_its_reasons_and_icmp_fields() {
        let mut d = sample_drop();
        d.reason = Reason::Invalid;
        d.attribution = Attribution::Uncertain;
        d.possible = (1 << Reason::Invalid as u8) | (1 << Reason::NetfilterRule as u8);
        let f = d.flow.as_mut().unwrap();
        f.proto = 1;
        f.sport = 77;
        f.dport = 8 << 8;
        let v = json(DropRecord::Packet(PacketDrop::new(
            OffsetDateTime::UNIX_EPOCH,
            &d,
            &DropContext::default(),
        )));
        assert_eq!(v["possible"], serde_json::json!(["invalid", "netfilter_rule"]));
        assert_eq!(
            (v["icmp_type"].as_u64(), v["icmp_code"].as_u64(), v["icmp_id"].as_u64()),
            (Some(8), Some(0), Some(77))
        );
        assert!(v.get("sport").is_none() && v.get("netns_name").is_none() && v.get("table_max").is_none());
    }

    #[test]
    fn aggregates_name_one_port_or_list_several() {
        let key = AggKey {
            reason: Reason::TableFull,
            uncertain: 0,
            netns: 9,
            proto: Some(17),
            dst: None,
        };
        let mut v = AggValue {
            count: 248,
            others: 248,
            ..Default::default()
        };
        v.dports.insert(9);
        let one = json(DropRecord::Aggregated(AggregatedDrops::new(
            OffsetDateTime::UNIX_EPOCH,
            &key,
            &v,
            &DropContext::default(),
        )));
        assert_eq!(
            (
                one["dport"].as_u64(),
                one["count"].as_u64(),
                one["other_destinations"].as_u64()
            ),
            (Some(9), Some(248), Some(248))
        );
        assert!(one.get("dports").is_none() && one.get("attribution").is_none() && one.get("dst").is_none());
        v.dports.insert(10);
        v.ports_overflow = true;
        let many = json(DropRecord::Aggregated(AggregatedDrops::new(
            OffsetDateTime::UNIX_EPOCH,
            &key,
            &v,
            &DropContext::default(),
        )));
        assert_eq!(many["dports"], serde_json::json!([9, 10]));
        assert_eq!(many["dports_truncated"], true);
        assert_eq!(many["aggregated"], true);
        assert_eq!(many["window_ms"], 1000);
    }
}
