//! Decoding of the kernel's `DropEvent` records into flows people can read.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ctrace_common::{AggKey, Attribution, DETAIL_LEN, DropDetail, DropEvent, Reason, flags};

use crate::sanitize::kernel_str;

/// IP protocol numbers ctrace names; others print as their number.
pub fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        33 => "dccp".into(),
        47 => "gre".into(),
        50 => "esp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        n => n.to_string(),
    }
}

/// Inverse of `proto_name`, for `--proto`.
pub fn parse_proto(s: &str) -> Option<u8> {
    match s.to_ascii_lowercase().as_str() {
        "icmp" => Some(1),
        "tcp" => Some(6),
        "udp" => Some(17),
        "dccp" => Some(33),
        "gre" => Some(47),
        "esp" => Some(50),
        "icmpv6" | "ipv6-icmp" => Some(58),
        "sctp" => Some(132),
        "udplite" => Some(136),
        n => n.parse().ok().filter(|&v| v != 0),
    }
}

pub fn is_icmp(p: u8) -> bool {
    p == 1 || p == 58
}

pub fn has_ports(p: u8) -> bool {
    matches!(p, 6 | 17 | 33 | 132 | 136)
}

/// The sending process, when the drop happened in its context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
}

/// One dropped packet, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drop {
    pub ts_ns: u64,
    pub reason: Reason,
    pub netns: u32,
    pub cpu: u32,
    /// None when the headers could not be read.
    pub flow: Option<Flow>,
    pub process: Option<Process>,
    pub new_baseline: bool,
    /// The kernel's own words about the drop (kprobe mode), e.g. "invalid tcp flag combination".
    pub detail: Option<String>,
    /// Not a packet but a conntrack entry that early_drop evicted (kprobe mode).
    pub evicted: bool,
    /// How `reason` was decided.
    pub attribution: Attribution,
    /// Bit `1 << reason` for every reason still possible (more than one when uncertain).
    pub possible: u8,
}

impl Drop {
    pub fn uncertain(&self) -> bool {
        self.attribution == Attribution::Uncertain
    }

    /// The reasons the evidence leaves possible, `reason` first.
    pub fn possible_reasons(&self) -> Vec<Reason> {
        possible_reasons(self.reason, self.possible)
    }
}

/// The reasons in a `possible` mask, `first` first.
pub fn possible_reasons(first: Reason, mask: u8) -> Vec<Reason> {
    let mut v = vec![first];
    v.extend(
        Reason::ALL
            .into_iter()
            .filter(|r| *r != first && mask & (1 << *r as u8) != 0),
    );
    v
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Ports for TCP/UDP/SCTP/...; for ICMP `sport` is the echo id and `dport` is type << 8 | code.
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    pub fn icmp_type_code(&self) -> Option<(u8, u8)> {
        is_icmp(self.proto).then_some(((self.dport >> 8) as u8, self.dport as u8))
    }

    pub fn src_string(&self) -> String {
        endpoint(self.src, has_ports(self.proto).then_some(self.sport))
    }

    pub fn dst_string(&self) -> String {
        match self.icmp_type_code() {
            Some((t, c)) => format!("{} type {t} code {c}", self.dst),
            None => endpoint(self.dst, has_ports(self.proto).then_some(self.dport)),
        }
    }
}

fn endpoint(ip: IpAddr, port: Option<u16>) -> String {
    match (ip, port) {
        (IpAddr::V4(a), Some(p)) => format!("{a}:{p}"),
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, None) => a.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("event record of {0} bytes, expected {expected} or more", expected = std::mem::size_of::<DropEvent>())]
pub struct BadRecord(usize);

/// One ring buffer record: a `DropEvent`, and the kernel's words about it when the record is a `DropDetail`.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    pub event: DropEvent,
    pub detail: Option<[u8; DETAIL_LEN]>,
}

/// Copies a ring buffer record out (records are not aligned for us); its size says which kind it is.
pub fn parse_record(bytes: &[u8]) -> Result<Record, BadRecord> {
    if bytes.len() >= std::mem::size_of::<DropDetail>() {
        // SAFETY: DropDetail is repr(C) plain data and `bytes` is long enough.
        let d = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const DropDetail) };
        return Ok(Record {
            event: d.event,
            detail: Some(d.detail),
        });
    }
    if bytes.len() < std::mem::size_of::<DropEvent>() {
        return Err(BadRecord(bytes.len()));
    }
    // SAFETY: DropEvent is repr(C) plain data and `bytes` is long enough.
    let event = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const DropEvent) };
    Ok(Record { event, detail: None })
}

pub fn decode(rec: &Record) -> Option<Drop> {
    let ev = &rec.event;
    let reason = Reason::from_u8(ev.reason)?;
    let attribution = Attribution::from_u8(ev.attribution)?;
    let flow = if ev.flags & flags::HEADERS_OK != 0 {
        Some(flow(ev.ip_version, ev.l4proto, ev.saddr, ev.daddr, ev.sport, ev.dport)?)
    } else {
        None
    };
    let process = (ev.flags & flags::LOCAL_SENDER != 0).then(|| Process {
        pid: ev.pid,
        comm: kernel_str(&ev.comm),
    });
    Some(Drop {
        ts_ns: ev.ts_ns,
        reason,
        netns: ev.netns,
        cpu: u32::from(ev.cpu),
        flow,
        process,
        new_baseline: ev.flags & flags::NEW_BASELINE != 0,
        detail: rec.detail.map(|d| kernel_str(&d)).filter(|s| !s.is_empty()),
        evicted: ev.flags & flags::EVICTED != 0,
        attribution,
        possible: ev.possible | 1 << reason as u8,
    })
}

fn flow(ip_version: u8, proto: u8, saddr: [u8; 16], daddr: [u8; 16], sport: u16, dport: u16) -> Option<Flow> {
    let (src, dst) = match ip_version {
        4 => (
            IpAddr::V4(Ipv4Addr::new(saddr[0], saddr[1], saddr[2], saddr[3])),
            IpAddr::V4(Ipv4Addr::new(daddr[0], daddr[1], daddr[2], daddr[3])),
        ),
        6 => (IpAddr::V6(Ipv6Addr::from(saddr)), IpAddr::V6(Ipv6Addr::from(daddr))),
        _ => return None,
    };
    Some(Flow {
        proto,
        src,
        dst,
        sport,
        dport,
    })
}

/// Drops the kernel counted in one aggregate (above the stream limit), as the drop they share and their count.
/// The flow has the destination only (the source is unspecified); `coarse` aggregates kept no destination.
pub fn decode_aggregate(key: &AggKey, coarse: bool) -> Option<Drop> {
    let reason = Reason::from_u8(key.reason)?;
    let attribution = Attribution::from_u8(key.attribution)?;
    let flow = if coarse || key.ip_version == 0 {
        None
    } else {
        Some(flow(key.ip_version, key.l4proto, [0; 16], key.daddr, 0, key.dport)?)
    };
    Some(Drop {
        ts_ns: 0,
        reason,
        netns: key.netns,
        cpu: 0,
        flow,
        process: None,
        new_baseline: false,
        detail: None,
        evicted: false,
        attribution,
        possible: key.uncertain | 1 << reason as u8,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ring buffer record as the kernel writes it (a `DropDetail` when it carries the kernel's words).
    pub(crate) fn record_bytes(rec: &Record) -> Vec<u8> {
        match rec.detail {
            // SAFETY: DropEvent and DropDetail are repr(C) plain data; each slice covers exactly one value.
            None => unsafe {
                std::slice::from_raw_parts(
                    &rec.event as *const DropEvent as *const u8,
                    std::mem::size_of::<DropEvent>(),
                )
            }
            .to_vec(),
            Some(detail) => {
                let d = DropDetail {
                    event: rec.event,
                    detail,
                };
                unsafe {
                    std::slice::from_raw_parts(&d as *const DropDetail as *const u8, std::mem::size_of::<DropDetail>())
                }
                .to_vec()
            }
        }
    }

    /// A table-full UDP drop from 10.0.0.1:5000 to 10.0.0.2:53 in netns 4026532177, sent by "py?thon".
    pub(crate) fn raw() -> Record {
        Record {
            event: DropEvent {
                ts_ns: 5,
                netns: 4026532177,
                cpu: 1,
                pid: 42,
                flags: flags::HEADERS_OK | flags::LOCAL_SENDER,
                comm: *b"py\x1bthon\0\0\0\0\0\0\0\0\0",
                reason: Reason::TableFull as u8,
                ip_version: 4,
                l4proto: 17,
                sport: 5000,
                dport: 53,
                saddr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                daddr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                attribution: Attribution::Counters as u8,
                possible: 1 << Reason::TableFull as u8,
                _pad: [0; 3],
            },
            detail: None,
        }
    }

    #[test]
    fn uncertain_drops_list_every_possible_reason_decided_one_first() {
        let mut ev = raw();
        ev.event.reason = Reason::Invalid as u8;
        ev.event.attribution = Attribution::Uncertain as u8;
        ev.event.possible = (1 << Reason::Invalid as u8) | (1 << Reason::NetfilterRule as u8);
        let d = decode(&ev).unwrap();
        assert!(d.uncertain());
        assert_eq!(d.possible_reasons(), vec![Reason::Invalid, Reason::NetfilterRule]);
        ev.event.attribution = 42;
        assert!(decode(&ev).is_none(), "unknown attribution codes are rejected");
    }

    #[test]
    fn decodes_ipv4_udp_with_sanitised_comm() {
        let d = decode(&raw()).unwrap();
        assert_eq!(d.reason, Reason::TableFull);
        let f = d.flow.unwrap();
        assert_eq!(f.src_string(), "10.0.0.1:5000");
        assert_eq!(f.dst_string(), "10.0.0.2:53");
        assert_eq!(d.process.unwrap().comm, "py?thon");
        assert_eq!(d.detail, None);
    }

    #[test]
    fn decodes_ipv6_and_icmp() {
        let mut ev = raw();
        ev.event.ip_version = 6;
        ev.event.saddr = Ipv6Addr::LOCALHOST.octets();
        ev.event.daddr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        let f = decode(&ev).unwrap().flow.unwrap();
        assert_eq!(f.src_string(), "[::1]:5000");
        ev.event.l4proto = 58;
        ev.event.dport = 128 << 8; // echo request, code 0
        let f = decode(&ev).unwrap().flow.unwrap();
        assert_eq!(f.icmp_type_code(), Some((128, 0)));
        assert_eq!(f.dst_string(), "2001:db8::1 type 128 code 0");
        assert_eq!(f.src_string(), "::1");
    }

    #[test]
    fn records_carry_the_kernel_words_only_when_they_are_long_enough() {
        let rec = raw();
        let mut bytes = vec![0u8; std::mem::size_of::<DropDetail>()];
        // SAFETY: the buffer holds a DropDetail.
        unsafe {
            std::ptr::write_unaligned(
                bytes.as_mut_ptr() as *mut DropDetail,
                DropDetail {
                    event: rec.event,
                    detail: {
                        let mut d = [0u8; DETAIL_LEN];
                        d[..16].copy_from_slice(b"unresolved clash");
                        d
                    },
                },
            )
        };
        let d = decode(&parse_record(&bytes).unwrap()).unwrap();
        assert_eq!(d.detail.as_deref(), Some("unresolved clash"));
        let d = decode(&parse_record(&bytes[..std::mem::size_of::<DropEvent>()]).unwrap()).unwrap();
        assert_eq!(d.detail, None);
    }

    #[test]
    fn aggregates_keep_the_destination_unless_coarse() {
        let key = AggKey {
            netns: 7,
            reason: Reason::Invalid as u8,
            attribution: Attribution::Uncertain as u8,
            uncertain: (1 << Reason::Invalid as u8) | (1 << Reason::NetfilterRule as u8),
            ip_version: 4,
            l4proto: 17,
            dport: 53,
            daddr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            _pad: 0,
        };
        let d = decode_aggregate(&key, false).unwrap();
        assert!(d.uncertain());
        assert_eq!(d.possible_reasons(), vec![Reason::Invalid, Reason::NetfilterRule]);
        assert_eq!(d.flow.unwrap().dst_string(), "10.0.0.2:53");
        assert!(decode_aggregate(&key, true).unwrap().flow.is_none());
    }

    #[test]
    fn unknown_reason_and_short_records_are_rejected() {
        let mut ev = raw();
        ev.event.reason = 99;
        assert!(decode(&ev).is_none());
        assert!(parse_record(&[0u8; 10]).is_err());
    }

    #[test]
    fn no_headers_no_flow_and_no_process_without_local_sender() {
        let mut ev = raw();
        ev.event.flags = 0;
        let d = decode(&ev).unwrap();
        assert!(d.flow.is_none());
        assert!(d.process.is_none());
    }

    #[test]
    fn proto_names_round_trip() {
        for p in [1u8, 6, 17, 58, 132] {
            assert_eq!(parse_proto(&proto_name(p)), Some(p));
        }
        assert_eq!(parse_proto("TCP"), Some(6));
        assert_eq!(parse_proto("47"), Some(47));
        assert_eq!(parse_proto("bogus"), None);
        assert_eq!(parse_proto("0"), None);
    }
}
