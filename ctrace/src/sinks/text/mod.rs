//! Text for a person: one line per drop in columns, highlighted lines for module and sysctl events, the
//! summary at the end.

use std::io;

use time::{OffsetDateTime, UtcOffset};

use super::{Sink, stdout::Destination};
use crate::{
    modules::errno_name,
    report::{
        AggregatedDrops, CountedDrops, DropPlace, DropRecord, Event, FlowFields, ModuleRecord, PacketDrop,
        SysctlResetRecord, SysctlWriteRecord,
    },
};

mod summary;
pub use summary::summary_text;

pub struct TextSink<D: Destination> {
    out: D,
    offset: UtcOffset,
    header_done: bool,
    /// Terminal escapes for the lines an SRE must not miss (module and sysctl events).
    highlight: bool,
}

/// The columns of a drop line (TIME and TABLE come from the record).
struct Row {
    netns: String,
    /// The reason's name, with "?" when the evidence left another one possible.
    reason: String,
    proto: String,
    src: String,
    dst: String,
    process: String,
    /// Printed after the TABLE column (the kernel's words, "evicted").
    suffix: String,
}

fn clock(t: OffsetDateTime) -> String {
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

pub(super) fn netns_label(netns: u32, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("{netns} ({n})"),
        None if netns == 0 => "?".to_owned(),
        None => netns.to_string(),
    }
}

/// The reason column: the name, with "?" when uncertain.
fn reason_label(reason: &str, uncertain: bool) -> String {
    if uncertain {
        format!("{reason}?")
    } else {
        reason.to_owned()
    }
}

/// "  (uncertain: invalid or netfilter_rule)".
fn uncertain_suffix(possible: &Option<Vec<&'static str>>) -> String {
    match possible {
        Some(p) => format!("  (uncertain: {})", p.join(" or ")),
        None => String::new(),
    }
}

pub(super) fn endpoint(ip: std::net::IpAddr, port: Option<u16>) -> String {
    match (ip, port) {
        (std::net::IpAddr::V4(a), Some(p)) => format!("{a}:{p}"),
        (std::net::IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, None) => a.to_string(),
    }
}

fn flow_columns(f: &FlowFields) -> (String, String, String) {
    let dst = match (f.icmp_type, f.icmp_code) {
        (Some(t), Some(c)) => format!("{} type {t} code {c}", f.dst),
        _ => endpoint(f.dst, f.dport),
    };
    (f.proto.clone(), endpoint(f.src, f.sport), dst)
}

fn table(place: &DropPlace) -> String {
    match (place.table_count, place.table_max) {
        (Some(c), Some(m)) => format!("{c}/{m}"),
        _ => "-".into(),
    }
}

impl<D: Destination> TextSink<D> {
    pub fn new(out: D, offset: UtcOffset, highlight: bool) -> TextSink<D> {
        TextSink {
            out,
            offset,
            header_done: false,
            highlight,
        }
    }

    fn stamp(&self, ts: OffsetDateTime) -> String {
        clock(ts.to_offset(self.offset))
    }

    /// A highlighted line, for events that change what conntrack will do.
    fn alert(&mut self, ts: OffsetDateTime, text: &str) -> io::Result<()> {
        let stamp = self.stamp(ts);
        if self.highlight {
            writeln!(self.out, "\x1b[1;33m{stamp}  >>> {text}\x1b[0m")
        } else {
            writeln!(self.out, "{stamp}  >>> {text}")
        }
    }

    fn row(&mut self, ts: OffsetDateTime, row: Row, table: String) -> io::Result<()> {
        if !self.header_done {
            self.header_done = true;
            writeln!(
                self.out,
                "{:<12}  {:<24}  {:<14}  {:<6}  {:<28}  {:<28}  {:<20}  TABLE",
                "TIME", "NETNS", "REASON", "PROTO", "SOURCE", "DESTINATION", "PROCESS"
            )?;
        }
        writeln!(
            self.out,
            "{}  {:<24}  {:<14}  {:<6}  {:<28}  {:<28}  {:<20}  {}{}",
            self.stamp(ts),
            row.netns,
            row.reason,
            row.proto,
            row.src,
            row.dst,
            row.process,
            table,
            row.suffix
        )
    }

    fn packet(&mut self, d: &PacketDrop) -> io::Result<()> {
        let (proto, src, dst) = match &d.flow {
            Some(f) => flow_columns(f),
            None => ("?".into(), "?".into(), "?".into()),
        };
        let process = match (&d.comm, d.pid) {
            (Some(comm), Some(pid)) => format!("{comm}[{pid}]"),
            _ => "-".into(),
        };
        let mut suffix = match (&d.detail, d.evicted) {
            (Some(s), _) => format!("  \"{s}\""),
            (None, Some(true)) => "  (entry evicted to make room)".to_owned(),
            (None, _) => String::new(),
        };
        suffix.push_str(&uncertain_suffix(&d.possible));
        let row = Row {
            netns: netns_label(d.place.netns, d.place.netns_name.as_deref()),
            reason: reason_label(d.place.reason, d.uncertain()),
            proto,
            src,
            dst,
            process,
            suffix,
        };
        self.row(d.ts, row, table(&d.place))
    }

    fn aggregated(&mut self, a: &AggregatedDrops) -> io::Result<()> {
        let ports = a.ports();
        let ports = match (ports.first(), ports.last()) {
            (Some(first), _) if ports.len() == 1 => Some(format!("port {first}")),
            (Some(first), Some(last)) => {
                let more = if a.dports_truncated == Some(true) { "+" } else { "" };
                Some(format!("{}{more} ports {first}-{last}", ports.len()))
            }
            _ => None,
        };
        let others = a.other_destinations.unwrap_or(0);
        let dst = match (a.dst, &ports) {
            (Some(d), Some(p)) => format!("{d} {p}"),
            (Some(d), None) => d.to_string(),
            (None, Some(p)) if others > 0 => format!("{others} destinations, {p}"),
            (None, None) if others > 0 => format!("{others} destinations"),
            _ => "?".into(),
        };
        let row = Row {
            netns: netns_label(a.place.netns, a.place.netns_name.as_deref()),
            reason: reason_label(a.place.reason, a.possible.is_some()),
            proto: a.proto.clone().unwrap_or_else(|| "?".into()),
            src: format!("x{} in 1s (aggregated)", a.count),
            dst,
            process: "-".into(),
            suffix: uncertain_suffix(&a.possible),
        };
        self.row(a.ts, row, table(&a.place))
    }

    fn counted(&mut self, c: &CountedDrops) -> io::Result<()> {
        let row = Row {
            netns: netns_label(c.place.netns, c.place.netns_name.as_deref()),
            reason: reason_label(c.place.reason, false),
            proto: "*".into(),
            src: format!("{} entries evicted", c.count),
            dst: "(from kernel counters)".into(),
            process: "-".into(),
            suffix: String::new(),
        };
        self.row(c.ts, row, table(&c.place))
    }

    fn module(&mut self, m: &ModuleRecord) -> io::Result<()> {
        let who = format!(
            "{}[{}] (uid {}): {}{}",
            m.comm,
            m.pid,
            m.uid,
            m.cmdline,
            crate::provenance::describe(&m.chain, m.chain_truncated, m.unit.as_deref())
        );
        let text = match m.action {
            "load" => format!("MODULE {} loaded by {who}", m.name),
            "unload" => format!("MODULE {} unloaded by {who}", m.name),
            _ => {
                let why = match (m.errno.flatten(), m.exit_status) {
                    (Some(e), _) => errno_name(e),
                    (None, Some(st)) => format!("refused by {} itself, exit status {st}: in use", m.comm),
                    (None, None) => "unknown reason".to_owned(),
                };
                let held = match m.holders.as_deref() {
                    Some(h) if !h.is_empty() => format!(", held by {}", h.join(", ")),
                    _ => String::new(),
                };
                format!("MODULE {} unload failed ({why}){held} - requested by {who}", m.name)
            }
        };
        self.alert(m.ts, &text)
    }

    fn sysctl_reset(&mut self, r: &SysctlResetRecord) -> io::Result<()> {
        let place = match (r.netns, &r.netns_name) {
            (Some(_), Some(name)) => format!(" in netns {name}"),
            (Some(n), None) => format!(" in netns {n}"),
            (None, _) => String::new(),
        };
        let text = format!(
            "SYSCTL RESET by the nf_conntrack reload: {}{place} was {}, is now {}{}; {}. Fix: {}",
            r.key,
            r.before,
            r.after,
            if r.default == Some(true) {
                ", the kernel's default"
            } else {
                ""
            },
            match &r.persisted_in {
                Some(p) => format!("persisted in {p}"),
                None => "not persisted anywhere".to_owned(),
            },
            r.fix
        );
        self.alert(r.ts, &text)
    }

    fn sysctl_write(&mut self, w: &SysctlWriteRecord) -> io::Result<()> {
        let who = match (w.pid, w.uid, &w.comm) {
            (Some(pid), Some(uid), Some(comm)) => format!("{comm}[{pid}] (uid {uid})"),
            _ => "a process this kernel does not name (sysctl programs get no task helpers before 6.1)".to_owned(),
        };
        let place = match (w.netns, &w.netns_name) {
            (Some(_), Some(name)) => format!(" in netns {name}"),
            (Some(n), None) => format!(" in netns {n}"),
            (None, _) => String::new(),
        };
        let text = format!("SYSCTL WRITE {} {} -> {} by {who}{place}", w.key, w.old, w.new);
        self.alert(w.ts, &text)
    }
}

impl<D: Destination> Sink for TextSink<D> {
    fn record(&mut self, event: &Event) -> io::Result<()> {
        match event {
            Event::Mode(m) => {
                writeln!(self.out, "ctrace: {} mode: {}", m.mode, m.why)?;
                writeln!(self.out, "ctrace: {}", m.exactness)
            }
            Event::Notice(n) => writeln!(self.out, "ctrace: {}", n.message),
            Event::Drop(DropRecord::Packet(d)) => self.packet(d),
            Event::Drop(DropRecord::Aggregated(a)) => self.aggregated(a),
            Event::Drop(DropRecord::Counted(c)) => self.counted(c),
            Event::Module(m) => self.module(m),
            Event::SysctlReset(r) => self.sysctl_reset(r),
            Event::SysctlWrite(w) => self.sysctl_write(w),
            Event::Reattached(r) => {
                let text = if r.probes.is_empty() {
                    format!("{} is back: attribution restarted from its fresh counters", r.module)
                } else {
                    format!("{} is back: kprobes re-attached to {}", r.module, r.probes.join(", "))
                };
                self.alert(r.ts, &text)
            }
            Event::Summary(s) => write!(self.out, "{}", summary_text(s)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn reader_gone(&self) -> bool {
        self.out.reader_gone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::drop::tests::{blue_ctx, sample_drop};
    use crate::sinks::tests::Buf;
    use ctrace_common::Reason;

    #[test]
    fn a_drop_line_shows_flow_process_and_fill() {
        let buf = Buf::default();
        let mut sink = TextSink::new(buf.clone(), UtcOffset::UTC, false);
        let d = PacketDrop::new(OffsetDateTime::UNIX_EPOCH, &sample_drop(), &blue_ctx());
        sink.record(&Event::Drop(DropRecord::Packet(d))).unwrap();
        let text = buf.text();
        assert!(text.starts_with("TIME "), "header first: {text}");
        let line = text.lines().nth(1).unwrap();
        for part in [
            "00:00:00.000",
            "4026532177 (blue)",
            "table_full",
            "udp",
            "127.0.0.1:5000",
            "127.0.0.1:53",
            "dig[7]",
            "64/64",
        ] {
            assert!(line.contains(part), "{part} missing in {line}");
        }
    }

    #[test]
    fn an_uncertain_drop_says_which_reasons_remain() {
        let buf = Buf::default();
        let mut sink = TextSink::new(buf.clone(), UtcOffset::UTC, false);
        let mut d = sample_drop();
        d.reason = Reason::Invalid;
        d.attribution = ctrace_common::Attribution::Uncertain;
        d.possible = (1 << Reason::Invalid as u8) | (1 << Reason::NetfilterRule as u8);
        let d = PacketDrop::new(OffsetDateTime::UNIX_EPOCH, &d, &blue_ctx());
        sink.record(&Event::Drop(DropRecord::Packet(d))).unwrap();
        let line = buf.text().lines().nth(1).unwrap().to_owned();
        assert!(line.contains("invalid? "), "{line}");
        assert!(line.ends_with("(uncertain: invalid or netfilter_rule)"), "{line}");
    }

    #[test]
    fn a_module_alert_names_the_chain_and_the_unit() {
        let buf = Buf::default();
        let mut sink = TextSink::new(buf.clone(), UtcOffset::UTC, false);
        let link = |pid, comm: &str, cmdline: Option<&str>| crate::provenance::Link {
            pid,
            comm: comm.into(),
            cmdline: cmdline.map(str::to_owned),
        };
        let m = ModuleRecord {
            ts: OffsetDateTime::UNIX_EPOCH,
            action: "unload_failed",
            name: "nf_conntrack".into(),
            errno: Some(Some(libc::EBUSY)),
            holders: Some(vec!["xt_conntrack".into()]),
            refused_by_tool: None,
            exit_status: None,
            pid: 300,
            uid: 0,
            comm: "modprobe".into(),
            ppid: 290,
            parent_comm: "ip6tables".into(),
            cmdline: "/sbin/modprobe -r nf_conntrack".into(),
            chain: vec![
                link(290, "ip6tables", Some("/bin/sh /etc/init.d/ip6tables stop")),
                link(1, "systemd", None),
            ],
            chain_truncated: false,
            cgroup: Some("/system.slice/ip6tables.service".into()),
            unit: Some("ip6tables.service".into()),
        };
        sink.record(&Event::Module(m)).unwrap();
        assert_eq!(
            buf.text().trim_end(),
            "00:00:00.000  >>> MODULE nf_conntrack unload failed (EBUSY (in use)), held by xt_conntrack - requested \
             by modprobe[300] (uid 0): /sbin/modprobe -r nf_conntrack <- ip6tables[290] `/bin/sh /etc/init.d/ip6tables \
             stop` <- systemd[1]; unit ip6tables.service"
        );
    }
}
