//! The two outputs: human text (one line per drop, highlighted notices) and JSON Lines
//! (one object per line, schema in the README; keep it stable).

use std::io::Write;

use ctrace_common::{Attribution, Reason};
use serde_json::{Value, json};
use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};

use crate::{
    aggregate::{AggKey, AggValue},
    event::{Drop, Flow, has_ports, is_icmp, possible_reasons, proto_name},
    modules::{Action, ModuleChange, errno_name},
    summary::Summary,
    sysctl_state::SysctlReset,
    sysctl_watch::SysctlWrite,
};

/// Context that the kernel event does not carry, added by the session.
#[derive(Clone, Debug, Default)]
pub struct DropContext {
    pub netns_name: Option<String>,
    /// (entries, nf_conntrack_max) of the drop's netns, when readable.
    pub table: Option<(u64, u64)>,
}

/// The columns of a text line (TIME and TABLE come from the caller).
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

/// Whether stdout's reader has gone (`ctrace run --json | head -1`): a write failed with EPIPE, or the
/// pipe reports an error without one (a quiet run writes nothing for long stretches). The run then ends
/// cleanly, as `grep` does.
pub fn stdout_closed() -> bool {
    if STDOUT_BROKEN.load(std::sync::atomic::Ordering::Relaxed) {
        return true;
    }
    let mut fd = libc::pollfd {
        fd: libc::STDOUT_FILENO,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n == 1 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

static STDOUT_BROKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// stdout, remembering a broken pipe (Rust ignores SIGPIPE, so writes fail with EPIPE instead).
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        watch(std::io::stdout().write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        watch(std::io::stdout().flush())
    }
}

fn watch<T>(r: std::io::Result<T>) -> std::io::Result<T> {
    if let Err(e) = &r
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        STDOUT_BROKEN.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    r
}

pub enum Output {
    Text {
        out: Box<dyn Write + Send>,
        offset: UtcOffset,
        header_done: bool,
        /// Terminal escapes for the lines an SRE must not miss (module and sysctl events).
        highlight: bool,
    },
    Json {
        out: Box<dyn Write + Send>,
    },
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn netns_label(netns: u32, name: &Option<String>) -> String {
    match name {
        Some(n) => format!("{netns} ({n})"),
        None if netns == 0 => "?".to_owned(),
        None => netns.to_string(),
    }
}

/// The fields every drop record shares: event, ts, reason, netns (and name), table fill.
fn drop_json(ts: OffsetDateTime, reason: Reason, netns: u32, ctx: &DropContext) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("event".into(), json!("drop"));
    m.insert("ts".into(), json!(rfc3339(ts)));
    m.insert("reason".into(), json!(reason.name()));
    m.insert("netns".into(), json!(netns));
    if let Some(n) = &ctx.netns_name {
        m.insert("netns_name".into(), json!(n));
    }
    if let Some((c, max)) = ctx.table {
        m.insert("table_count".into(), json!(c));
        m.insert("table_max".into(), json!(max));
    }
    m
}

fn flow_json(f: &Flow) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("proto".into(), json!(proto_name(f.proto)));
    m.insert("src".into(), json!(f.src.to_string()));
    m.insert("dst".into(), json!(f.dst.to_string()));
    if has_ports(f.proto) {
        m.insert("sport".into(), json!(f.sport));
        m.insert("dport".into(), json!(f.dport));
    } else if let Some((t, c)) = f.icmp_type_code() {
        m.insert("icmp_type".into(), json!(t));
        m.insert("icmp_code".into(), json!(c));
        m.insert("icmp_id".into(), json!(f.sport));
    }
    m
}

/// The reason column: the name, with "?" when uncertain.
fn reason_label(reason: Reason, uncertain: bool) -> String {
    if uncertain {
        format!("{}?", reason.name())
    } else {
        reason.name().to_owned()
    }
}

/// "invalid or netfilter_rule".
fn alternatives(reasons: &[Reason]) -> String {
    reasons.iter().map(|r| r.name()).collect::<Vec<_>>().join(" or ")
}

/// `attribution` and, when uncertain, `possible` of a drop record.
fn attribution_json(m: &mut serde_json::Map<String, Value>, attribution: Attribution, possible: &[Reason]) {
    m.insert("attribution".into(), json!(attribution.name()));
    if attribution == Attribution::Uncertain {
        m.insert(
            "possible".into(),
            json!(possible.iter().map(|r| r.name()).collect::<Vec<_>>()),
        );
    }
}

fn reasons_json(drops: &std::collections::BTreeMap<Reason, u64>) -> Value {
    let mut m = serde_json::Map::new();
    for r in Reason::ALL {
        m.insert(r.name().into(), json!(drops.get(&r).copied().unwrap_or(0)));
    }
    Value::Object(m)
}

impl Output {
    pub fn text(out: Box<dyn Write + Send>, offset: UtcOffset, highlight: bool) -> Output {
        Output::Text {
            out,
            offset,
            header_done: false,
            highlight,
        }
    }

    /// A highlighted text line, or a JSON object, for events that change what conntrack will do.
    fn alert(&mut self, ts: OffsetDateTime, text: &str, json: serde_json::Map<String, Value>) {
        match self {
            Output::Text {
                out, offset, highlight, ..
            } => {
                let t = ts.to_offset(*offset);
                let stamp = format!(
                    "{:02}:{:02}:{:02}.{:03}",
                    t.hour(),
                    t.minute(),
                    t.second(),
                    t.millisecond()
                );
                let _ = if *highlight {
                    writeln!(out, "\x1b[1;33m{stamp}  >>> {text}\x1b[0m")
                } else {
                    writeln!(out, "{stamp}  >>> {text}")
                };
                let _ = out.flush();
            }
            Output::Json { out } => Self::emit(out, Value::Object(json)),
        }
    }

    pub fn module(&mut self, ts: OffsetDateTime, c: &ModuleChange) {
        let who = format!(
            "{}[{}] (uid {}, parent {}[{}]): {}",
            c.actor.comm, c.actor.pid, c.actor.uid, c.actor.parent_comm, c.actor.ppid, c.actor.cmdline
        );
        let text = match c.action {
            Action::Load => format!("MODULE {} loaded by {who}", c.name),
            Action::Unload => format!("MODULE {} unloaded by {who}", c.name),
            Action::UnloadFailed => format!(
                "MODULE {} unload failed ({}){} - requested by {who}",
                c.name,
                match (c.errno, c.tool_status) {
                    (Some(e), _) => errno_name(e),
                    (None, Some(st)) => format!("refused by {} itself, exit status {st}: in use", c.actor.comm),
                    (None, None) => "unknown reason".to_owned(),
                },
                if c.holders.is_empty() {
                    String::new()
                } else {
                    format!(", held by {}", c.holders.join(", "))
                }
            ),
        };
        let mut m = serde_json::Map::new();
        m.insert("event".into(), json!("module"));
        m.insert("ts".into(), json!(rfc3339(ts)));
        m.insert("action".into(), json!(c.action.name()));
        m.insert("name".into(), json!(c.name));
        if c.action == Action::UnloadFailed {
            m.insert("errno".into(), json!(c.errno));
            m.insert("holders".into(), json!(c.holders));
            if let Some(st) = c.tool_status {
                m.insert("refused_by_tool".into(), json!(true));
                m.insert("exit_status".into(), json!(st));
            }
        }
        m.insert("pid".into(), json!(c.actor.pid));
        m.insert("uid".into(), json!(c.actor.uid));
        m.insert("comm".into(), json!(c.actor.comm));
        m.insert("ppid".into(), json!(c.actor.ppid));
        m.insert("parent_comm".into(), json!(c.actor.parent_comm));
        m.insert("cmdline".into(), json!(c.actor.cmdline));
        self.alert(ts, &text, m);
    }

    pub fn sysctl_reset(&mut self, ts: OffsetDateTime, r: &SysctlReset) {
        let default = match r.default {
            Some(true) => ", the kernel's default",
            Some(false) => "",
            None => "",
        };
        let text = format!(
            "SYSCTL RESET by the nf_conntrack reload: {}{} was {}, is now {}{}; {}. Fix: {}",
            r.change.key,
            r.netns.map(|n| format!(" in netns {n}")).unwrap_or_default(),
            r.change.before,
            r.change.after,
            default,
            match &r.persisted_in {
                Some(p) => format!("persisted in {p}"),
                None => "not persisted anywhere".to_owned(),
            },
            r.fix
        );
        let mut m = serde_json::Map::new();
        m.insert("event".into(), json!("sysctl_reset"));
        m.insert("ts".into(), json!(rfc3339(ts)));
        m.insert("key".into(), json!(r.change.key));
        if let Some(n) = r.netns {
            m.insert("netns".into(), json!(n));
        }
        m.insert("before".into(), json!(r.change.before));
        m.insert("after".into(), json!(r.change.after));
        m.insert("default".into(), json!(r.default));
        m.insert("persisted_in".into(), json!(r.persisted_in));
        m.insert("fix".into(), json!(r.fix));
        self.alert(ts, &text, m);
    }

    /// A sysctl write; `netns_name` is the `ip netns` name of the writer's netns, when it has one.
    pub fn sysctl_write(&mut self, ts: OffsetDateTime, w: &SysctlWrite, netns_name: Option<&str>) {
        let who = match &w.task {
            Some((pid, uid, comm)) => format!("{comm}[{pid}] (uid {uid})"),
            None => "a process this kernel does not name (sysctl programs get no task helpers before 6.1)".to_owned(),
        };
        let place = match (w.netns, netns_name) {
            (Some(_), Some(name)) => format!(" in netns {name}"),
            (Some(n), None) => format!(" in netns {n}"),
            (None, _) => String::new(),
        };
        let text = format!("SYSCTL WRITE {} {} -> {} by {who}{place}", w.key, w.old, w.new);
        let mut m = serde_json::Map::new();
        m.insert("event".into(), json!("sysctl_write"));
        m.insert("ts".into(), json!(rfc3339(ts)));
        m.insert("key".into(), json!(w.key));
        m.insert("old".into(), json!(w.old));
        m.insert("new".into(), json!(w.new));
        if let Some((pid, uid, comm)) = &w.task {
            m.insert("pid".into(), json!(pid));
            m.insert("comm".into(), json!(comm));
            m.insert("uid".into(), json!(uid));
        }
        if let Some(n) = w.netns {
            m.insert("netns".into(), json!(n));
            if let Some(name) = netns_name {
                m.insert("netns_name".into(), json!(name));
            }
        }
        self.alert(ts, &text, m);
    }

    pub fn reattached(&mut self, ts: OffsetDateTime, module: &str, probes: &[String]) {
        let text = if probes.is_empty() {
            format!("{module} is back: attribution restarted from its fresh counters")
        } else {
            format!("{module} is back: kprobes re-attached to {}", probes.join(", "))
        };
        let mut m = serde_json::Map::new();
        m.insert("event".into(), json!("reattached"));
        m.insert("ts".into(), json!(rfc3339(ts)));
        m.insert("module".into(), json!(module));
        m.insert("probes".into(), json!(probes));
        self.alert(ts, &text, m);
    }

    pub fn json(out: Box<dyn Write + Send>) -> Output {
        Output::Json { out }
    }

    fn emit(out: &mut Box<dyn Write + Send>, v: Value) {
        // A closed stdout (e.g. `| head`) must not panic; the session notices on the next write.
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }

    /// Says which probe mode was chosen, why, and how exact it is.
    pub fn mode(&mut self, mode: &str, why: &str, exactness: &str) {
        match self {
            Output::Text { out, .. } => {
                let _ = writeln!(out, "ctrace: {mode} mode: {why}");
                let _ = writeln!(out, "ctrace: {exactness}");
                let _ = out.flush();
            }
            Output::Json { out } => Self::emit(
                out,
                json!({"event":"mode","ts":rfc3339(OffsetDateTime::now_utc()),"mode":mode,"why":why,"exactness":exactness}),
            ),
        }
    }

    /// A line the user should read (aggregation on/off, netns events, warnings).
    pub fn notice(&mut self, msg: &str) {
        match self {
            Output::Text { out, .. } => {
                let _ = writeln!(out, "ctrace: {msg}");
                let _ = out.flush();
            }
            Output::Json { out } => Self::emit(
                out,
                json!({"event":"notice","ts":rfc3339(OffsetDateTime::now_utc()),"message":msg}),
            ),
        }
    }

    /// One text line in the drop table's columns.
    fn text_row(
        out: &mut Box<dyn Write + Send>,
        header_done: &mut bool,
        t: OffsetDateTime,
        row: Row,
        ctx: &DropContext,
    ) {
        Self::text_header(out, header_done);
        let table = ctx.table.map(|(c, m)| format!("{c}/{m}")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:02}:{:02}:{:02}.{:03}  {:<24}  {:<14}  {:<6}  {:<28}  {:<28}  {:<20}  {}{}",
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond(),
            row.netns,
            row.reason,
            row.proto,
            row.src,
            row.dst,
            row.process,
            table,
            row.suffix
        );
        let _ = out.flush();
    }

    fn text_header(out: &mut Box<dyn Write + Send>, done: &mut bool) {
        if !*done {
            let _ = writeln!(
                out,
                "{:<12}  {:<24}  {:<14}  {:<6}  {:<28}  {:<28}  {:<20}  TABLE",
                "TIME", "NETNS", "REASON", "PROTO", "SOURCE", "DESTINATION", "PROCESS"
            );
            *done = true;
        }
    }

    pub fn drop(&mut self, ts: OffsetDateTime, d: &Drop, ctx: &DropContext) {
        match self {
            Output::Text {
                out,
                offset,
                header_done,
                ..
            } => {
                let (proto, src, dst) = match &d.flow {
                    Some(f) => (proto_name(f.proto), f.src_string(), f.dst_string()),
                    None => ("?".into(), "?".into(), "?".into()),
                };
                let process = d
                    .process
                    .as_ref()
                    .map(|p| format!("{}[{}]", p.comm, p.pid))
                    .unwrap_or_else(|| "-".into());
                let mut detail = match (&d.detail, d.evicted) {
                    (Some(s), _) => format!("  \"{s}\""),
                    (None, true) => "  (entry evicted to make room)".to_owned(),
                    (None, false) => String::new(),
                };
                if d.uncertain() {
                    detail.push_str(&format!("  (uncertain: {})", alternatives(&d.possible_reasons())));
                }
                let row = Row {
                    netns: netns_label(d.netns, &ctx.netns_name),
                    reason: reason_label(d.reason, d.uncertain()),
                    proto,
                    src,
                    dst,
                    process,
                    suffix: detail,
                };
                Self::text_row(out, header_done, ts.to_offset(*offset), row, ctx);
            }
            Output::Json { out } => {
                let mut m = drop_json(ts, d.reason, d.netns, ctx);
                if let Some(f) = &d.flow {
                    m.extend(flow_json(f));
                }
                m.insert("count".into(), json!(1));
                if let Some(p) = &d.process {
                    m.insert("pid".into(), json!(p.pid));
                    m.insert("comm".into(), json!(p.comm));
                }
                if let Some(text) = &d.detail {
                    m.insert("detail".into(), json!(text));
                }
                if d.evicted {
                    m.insert("evicted".into(), json!(true));
                }
                attribution_json(&mut m, d.attribution, &d.possible_reasons());
                m.insert("cpu".into(), json!(d.cpu));
                Self::emit(out, Value::Object(m));
            }
        }
    }

    /// Early-drop evictions counted from the kernel counters (the evicted flows are not exposed
    /// in tracepoint mode).
    pub fn counted_drops(&mut self, ts: OffsetDateTime, reason: Reason, netns: u32, ctx: &DropContext, count: u64) {
        match self {
            Output::Text {
                out,
                offset,
                header_done,
                ..
            } => {
                let row = Row {
                    netns: netns_label(netns, &ctx.netns_name),
                    reason: reason_label(reason, false),
                    proto: "*".into(),
                    src: format!("{count} entries evicted"),
                    dst: "(from kernel counters)".into(),
                    process: "-".into(),
                    suffix: String::new(),
                };
                Self::text_row(out, header_done, ts.to_offset(*offset), row, ctx);
            }
            Output::Json { out } => {
                let mut m = drop_json(ts, reason, netns, ctx);
                m.insert("count".into(), json!(count));
                m.insert("source".into(), json!("counters"));
                m.insert("attribution".into(), json!(Attribution::Counters.name()));
                Self::emit(out, Value::Object(m));
            }
        }
    }

    pub fn aggregate(&mut self, ts: OffsetDateTime, key: &AggKey, v: &AggValue, ctx: &DropContext) {
        let ports = describe_ports(key.proto, v);
        match self {
            Output::Text {
                out,
                offset,
                header_done,
                ..
            } => {
                let dst = match (key.dst, &ports) {
                    (Some(d), Some(p)) => format!("{d} {p}"),
                    (Some(d), None) => d.to_string(),
                    (None, Some(p)) if v.others > 0 => format!("{} destinations, {p}", v.others),
                    (None, None) if v.others > 0 => format!("{} destinations", v.others),
                    _ => "?".into(),
                };
                let uncertain = key.uncertain != 0;
                let row = Row {
                    netns: netns_label(key.netns, &ctx.netns_name),
                    reason: reason_label(key.reason, uncertain),
                    proto: key.proto.map(proto_name).unwrap_or_else(|| "?".into()),
                    src: format!("x{} in 1s (aggregated)", v.count),
                    dst,
                    process: "-".into(),
                    suffix: if uncertain {
                        format!(
                            "  (uncertain: {})",
                            alternatives(&possible_reasons(key.reason, key.uncertain))
                        )
                    } else {
                        String::new()
                    },
                };
                Self::text_row(out, header_done, ts.to_offset(*offset), row, ctx);
            }
            Output::Json { out } => {
                let mut m = drop_json(ts, key.reason, key.netns, ctx);
                if let Some(p) = key.proto {
                    m.insert("proto".into(), json!(proto_name(p)));
                }
                if let Some(d) = key.dst {
                    m.insert("dst".into(), json!(d.to_string()));
                }
                if key.proto.is_some_and(has_ports) {
                    if v.dports.len() == 1 && !v.ports_overflow {
                        m.insert("dport".into(), json!(v.dports.iter().next()));
                    } else {
                        m.insert("dports".into(), json!(v.dports.iter().collect::<Vec<_>>()));
                        m.insert("dports_truncated".into(), json!(v.ports_overflow));
                    }
                }
                m.insert("count".into(), json!(v.count));
                m.insert("aggregated".into(), json!(true));
                if key.uncertain != 0 {
                    attribution_json(
                        &mut m,
                        Attribution::Uncertain,
                        &possible_reasons(key.reason, key.uncertain),
                    );
                }
                if v.others > 0 {
                    m.insert("other_destinations".into(), json!(v.others));
                }
                m.insert("window_ms".into(), json!(1000));
                Self::emit(out, Value::Object(m));
            }
        }
    }

    pub fn summary(&mut self, s: &Summary) {
        match self {
            Output::Text { out, .. } => {
                let _ = write!(out, "{}", summary_text(s));
                let _ = out.flush();
            }
            Output::Json { out } => {
                let netns: Vec<Value> = s
                    .netns
                    .iter()
                    .map(|n| {
                        let mut m = serde_json::Map::new();
                        m.insert("netns".into(), json!(n.netns));
                        if let Some(name) = &n.name {
                            m.insert("name".into(), json!(name));
                        }
                        m.insert("drops".into(), reasons_json(&n.drops));
                        m.insert("drops_uncertain".into(), reasons_json(&n.uncertain));
                        if let Some(k) = &n.kernel {
                            m.insert("kernel_counters".into(), json!(k));
                        }
                        Value::Object(m)
                    })
                    .collect();
                let flows: Vec<Value> = s
                    .top_flows
                    .iter()
                    .map(|(k, c)| {
                        let mut m = serde_json::Map::new();
                        m.insert("proto".into(), json!(proto_name(k.proto)));
                        m.insert("dst".into(), json!(k.dst.to_string()));
                        if has_ports(k.proto) {
                            m.insert("dport".into(), json!(k.dport));
                        } else if is_icmp(k.proto) {
                            m.insert("icmp_type".into(), json!(k.dport >> 8));
                            m.insert("icmp_code".into(), json!(k.dport & 0xff));
                        }
                        m.insert("count".into(), json!(c));
                        Value::Object(m)
                    })
                    .collect();
                let ports: Vec<Value> = s
                    .top_dports
                    .iter()
                    .filter(|((p, _), _)| has_ports(*p))
                    .map(|((p, port), c)| json!({"proto":proto_name(*p),"dport":port,"count":c}))
                    .collect();
                Self::emit(
                    out,
                    json!({
                        "event": "summary",
                        "ts": rfc3339(OffsetDateTime::now_utc()),
                        "mode": s.mode,
                        "duration_s": (s.duration_s * 1000.0).round() / 1000.0,
                        "drops": reasons_json(&s.drops),
                        "drops_uncertain": reasons_json(&s.uncertain),
                        "total": s.total(),
                        "attribution": s.attribution,
                        "lost": s.lost,
                        "module_requests_unprivileged": s.module_requests_unprivileged,
                        "by_netns": netns,
                        "top_flows": flows,
                        "top_dports": ports,
                    }),
                );
            }
        }
    }
}

fn describe_ports(proto: Option<u8>, v: &AggValue) -> Option<String> {
    let p = proto?;
    if !has_ports(p) || v.dports.is_empty() {
        return None;
    }
    let first = *v.dports.iter().next()?;
    let last = *v.dports.iter().next_back()?;
    Some(if v.dports.len() == 1 {
        format!("port {first}")
    } else {
        let more = if v.ports_overflow { "+" } else { "" };
        format!("{}{more} ports {first}-{last}", v.dports.len())
    })
}

pub fn summary_text(s: &Summary) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o);
    let _ = writeln!(o, "=== ctrace summary ({} mode, {:.1}s) ===", s.mode, s.duration_s);
    let _ = writeln!(
        o,
        "drops by reason (exact totals, counted in the kernel; \"uncertain\": the evidence left another reason possible):"
    );
    for r in Reason::ALL {
        let total = s.drops.get(&r).copied().unwrap_or(0);
        let uncertain = s.uncertain.get(&r).copied().unwrap_or(0);
        let split = if uncertain > 0 {
            format!("  ({} certain, {uncertain} uncertain)", total - uncertain.min(total))
        } else {
            String::new()
        };
        let _ = writeln!(o, "  {:<15} {total}{split}", r.name());
    }
    let _ = writeln!(o, "  {:<15} {}", "total", s.total());
    let a = &s.attribution;
    if a.no_baseline + a.probe_disagreements + a.baseline_resets > 0 {
        let _ = writeln!(
            o,
            "attribution fallbacks: {} drops without a counter baseline, {} probe verdicts contradicted by the counters, {} baselines restarted (reused netns inode or reload)",
            a.no_baseline, a.probe_disagreements, a.baseline_resets
        );
    }
    if a.baselines_pruned > 0 {
        let _ = writeln!(o, "baselines of {} gone netns pruned", a.baselines_pruned);
    }
    if !s.netns.is_empty() {
        let _ = writeln!(o, "drops by netns:");
        for n in &s.netns {
            let reasons: Vec<String> = n
                .drops
                .iter()
                .filter(|(_, c)| **c > 0)
                .map(|(r, c)| match n.uncertain.get(r).copied().unwrap_or(0) {
                    0 => format!("{}={c}", r.name()),
                    u => format!("{}={c} ({u} uncertain)", r.name()),
                })
                .collect();
            let kernel = n
                .kernel
                .map(|k| {
                    format!(
                        "  [kernel counters: drop={} early_drop={} insert_failed={} invalid={}]",
                        k.drop, k.early_drop, k.insert_failed, k.invalid
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "  {:<24} {}{}",
                netns_label(n.netns, &n.name),
                if reasons.is_empty() {
                    "-".to_owned()
                } else {
                    reasons.join(" ")
                },
                kernel
            );
        }
    }
    if !s.top_flows.is_empty() {
        let _ = writeln!(o, "top destinations:");
        for (k, c) in &s.top_flows {
            let dst = if has_ports(k.proto) {
                match k.dst {
                    std::net::IpAddr::V4(a) => format!("{a}:{}", k.dport),
                    std::net::IpAddr::V6(a) => format!("[{a}]:{}", k.dport),
                }
            } else if is_icmp(k.proto) {
                format!("{} type {} code {}", k.dst, k.dport >> 8, k.dport & 0xff)
            } else {
                k.dst.to_string()
            };
            let _ = writeln!(o, "  {:<6} {:<40} {c}", proto_name(k.proto), dst);
        }
    }
    let ports: Vec<_> = s.top_dports.iter().filter(|((p, _), _)| has_ports(*p)).collect();
    if !ports.is_empty() {
        let _ = writeln!(o, "top destination ports:");
        for ((p, port), c) in ports {
            let _ = writeln!(o, "  {:<6} {:<6} {c}", proto_name(*p), port);
        }
    }
    if s.untracked > 0 {
        let _ = writeln!(
            o,
            "  ({} drops of further flows are in the totals but not in the top lists)",
            s.untracked
        );
    }
    let _ = writeln!(
        o,
        "events lost: {}{}",
        s.lost,
        if s.lost > 0 {
            " (ring buffer full; totals above are still exact)"
        } else {
            ""
        }
    );
    if s.module_requests_unprivileged > 0 {
        let _ = writeln!(
            o,
            "module requests ignored: {} (callers without CAP_SYS_MODULE in the init user namespace cannot change a module)",
            s.module_requests_unprivileged
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::{DestKey, NetnsSummary};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn sample_drop() -> Drop {
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
            process: Some(crate::event::Process {
                pid: 7,
                comm: "dig".into(),
            }),
            new_baseline: false,
            detail: None,
            evicted: false,
            attribution: ctrace_common::Attribution::Counters,
            possible: 1 << ctrace_common::Reason::TableFull as u8,
        }
    }

    #[test]
    fn json_drop_has_the_documented_fields() {
        let buf = Buf::default();
        let mut o = Output::json(Box::new(buf.clone()));
        let ctx = DropContext {
            netns_name: Some("blue".into()),
            table: Some((64, 64)),
        };
        o.drop(OffsetDateTime::UNIX_EPOCH, &sample_drop(), &ctx);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
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
    }

    #[test]
    fn json_summary_lists_every_reason_and_lost() {
        let buf = Buf::default();
        let mut o = Output::json(Box::new(buf.clone()));
        let mut s = Summary {
            mode: "tracepoint".into(),
            ..Default::default()
        };
        s.drops.insert(Reason::TableFull, 241);
        s.lost = 3;
        s.netns.push(NetnsSummary {
            netns: 1,
            ..Default::default()
        });
        s.top_flows.push((
            DestKey {
                proto: 17,
                dst: "127.0.0.1".parse().unwrap(),
                dport: 53,
            },
            241,
        ));
        o.summary(&s);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["event"], "summary");
        assert_eq!(v["drops"]["table_full"], 241);
        assert_eq!(v["drops"]["netfilter_rule"], 0);
        assert_eq!(v["lost"], 3);
        assert_eq!(v["total"], 241);
        assert_eq!(v["top_flows"][0]["dport"], 53);
    }

    #[test]
    fn text_line_shows_flow_process_and_fill() {
        let buf = Buf::default();
        let mut o = Output::text(Box::new(buf.clone()), UtcOffset::UTC, false);
        o.drop(
            OffsetDateTime::UNIX_EPOCH,
            &sample_drop(),
            &DropContext {
                netns_name: Some("blue".into()),
                table: Some((64, 64)),
            },
        );
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
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
}
