//! VM tests: ctrace in a Debian guest kernel, where nf_conntrack is a module, checked against that kernel's own
//! conntrack counters.
//!
//! One boot per kernel. The guest gets the host's legacy iptables (with its libraries and extensions) to make
//! conntrack track OUTPUT and drop INVALID packets, starts `ctrace run --json --rate-limit 0`, makes three kinds of
//! conntrack drops with `ctrace-testkit` (table_full, early_drop, invalid), stops ctrace with SIGINT and prints its
//! output, the counters and timings between marker lines. The host parses that and compares ctrace's exact totals
//! with the kernel's counter deltas.

use crate::debian::{self, KernelSpec};
use crate::guest::{Counters, TestResult, finish};
use crate::guest::{GUEST_TESTKIT, TESTKIT, build_testkit, iptables_files, marker_block, marker_values, parse_events};
use crate::vm::{self, VmOutcome, VmRun};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One guest boot: a kernel, how ctrace is started and what it must do there.
#[derive(Clone, Copy, Debug)]
pub struct VmCase {
    pub kernel: KernelSpec,
    /// ctrace's `--mode` (`None`: auto).
    pub mode_flag: Option<&'static str>,
    /// The mode ctrace must report (the `mode` event and the summary); `None` accepts any mode.
    pub expect_mode: Option<&'static str>,
    /// When set, every `invalid` drop event must carry exactly this `detail` (the kernel's reason text, which only
    /// kprobe mode reads).
    pub expect_invalid_detail: Option<&'static str>,
}

/// The VM test cases: Debian 6.1 (nf_conntrack as a module, kprobes available) with the mode ctrace picks by
/// itself, which must be kprobe mode with the kernel's reason text, and forced into tracepoint mode.
pub const CASES: &[VmCase] = &[
    VmCase {
        kernel: KernelSpec::Debian61,
        mode_flag: None,
        expect_mode: Some("kprobe"),
        expect_invalid_detail: Some("invalid tcp flag combination"),
    },
    VmCase {
        kernel: KernelSpec::Debian61,
        mode_flag: Some("tracepoint"),
        expect_mode: Some("tracepoint"),
        expect_invalid_detail: None,
    },
];

impl VmCase {
    /// `debian-6.1 auto`, `debian-6.1 tracepoint`.
    pub fn name(&self) -> String {
        format!(
            "debian-{} {}",
            self.kernel.short_name(),
            self.mode_flag.unwrap_or("auto")
        )
    }
}

/// The workload, the same as the host tests': nf_conntrack_max lowered to 256 for 556 new UDP flows (table_full),
/// then max + max/8 more flows at the default max (early_drop), then 20 SYN|FIN segments (invalid).
const TABLE_FULL_MAX: u32 = 256;
const TABLE_FULL_FLOWS: u32 = 556;
const INVALID_SEGMENTS: u32 = 20;
const PORT: u16 = 9;
/// Bounds inside the guest (TCG is slow: ctrace's start-up reads the kernel's BTF).
const ATTACH_TIMEOUT_S: u32 = 60;
const STOP_TIMEOUT_S: u32 = 60;
/// The whole guest, boot included.
const VM_TIMEOUT: Duration = Duration::from_secs(240);

const GUEST_CTRACE: &str = "/usr/local/bin/ctrace";
/// Prefix of the lines the guest script prints for the host; the kernel and the programs never print it.
const MARK: &str = "@@ctrace-vmtest";

/// Runs every case in [`CASES`]; prints one line per test, the timings and `N passed, M failed`, and fails with the
/// first failures and the end of the console when any test failed.
pub fn run_all(ws: &Path) -> Result<()> {
    crate::setup::ensure_debian_packages(&["iptables"])?;
    let build_start = Instant::now();
    let ctrace = crate::dist::build_static(ws)?;
    let testkit = build_testkit(ws)?;
    let mut files = vec![(ctrace, GUEST_CTRACE.to_string()), (testkit, GUEST_TESTKIT.to_string())];
    files.extend(iptables_files()?);
    println!(
        "vm-test: built the static ctrace and {TESTKIT} in {:.1}s",
        build_start.elapsed().as_secs_f64()
    );

    let mut results = Vec::new();
    let mut tails = Vec::new();
    for case in CASES {
        let (tests, tail) = run_case(case, &files)?;
        if tests.iter().any(|t| !t.passed()) {
            tails.push(tail);
        }
        results.extend(tests);
    }

    finish("VM tests", &results, &tails)
}

/// Boots one guest and evaluates what it printed. Errors are host problems (no kernel, no QEMU); the guest's own
/// failures become failed tests. Also returns the end of the console for the error message.
fn run_case(case: &VmCase, files: &[(PathBuf, String)]) -> Result<(Vec<TestResult>, String)> {
    let name = case.name();
    let kernel = debian::fetch(case.kernel, &debian::default_cache_root())?;
    let mut spec = VmRun::new(kernel.clone(), guest_script(case.mode_flag));
    spec.files = files.to_vec();
    spec.modules = ["nf_conntrack", "xt_conntrack", "iptable_filter"]
        .map(String::from)
        .to_vec();
    spec.timeout = VM_TIMEOUT;
    println!(
        "vm-test {name}: booting {} ({}) under TCG",
        kernel.version, kernel.package
    );
    let outcome = vm::run(&spec)?;
    let tail = outcome.console_tail(&name, 40);

    let output = outcome.script_output();
    let tests = match GuestReport::parse(&output) {
        Ok(report) => {
            print_timings(&name, &outcome, &report);
            if let Some(summary) = report.events.iter().find(|v| v["event"] == "summary") {
                let mut brief = summary.clone();
                if let Some(fields) = brief.as_object_mut() {
                    fields.retain(|key, _| !key.starts_with("top_"));
                }
                println!("vm-test {name}: ctrace summary (top lists left out): {brief}");
            }
            if !report.ctrace_stderr.trim().is_empty() {
                println!("vm-test {name}: ctrace's stderr:\n{}", report.ctrace_stderr.trim_end());
            }
            let mut tests = evaluate(case, &report);
            if let Err(err) = outcome.ensure_passed() {
                let mut guest = TestResult::new("guest");
                guest.failures.push(first_line(&format!("{err:#}")));
                tests.push(guest);
            }
            tests
        }
        Err(err) => {
            let mut guest = TestResult::new("guest");
            guest.failures.push(format!(
                "{}; the guest's report is unusable: {err:#}",
                outcome.exit_reason
            ));
            vec![guest]
        }
    };
    for test in &tests {
        println!("vm-test {name} {}", test.line());
    }
    Ok((tests, tail))
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

fn print_timings(name: &str, outcome: &VmOutcome, report: &GuestReport) {
    let mut parts = vec![format!("kernel {}", report.kernel)];
    if let Some(boot) = outcome.boot_time {
        parts.push(format!("boot {:.1}s", boot.as_secs_f64()));
    }
    let steps = [
        ("start", "attached", "ctrace attach"),
        ("attached", "table_full", "table_full"),
        ("table_full", "early_drop", "early_drop"),
        ("early_drop", "invalid", "invalid"),
        ("invalid", "stopped", "ctrace stop"),
    ];
    for (from, to, label) in steps {
        if let (Some(a), Some(b)) = (report.times.get(from), report.times.get(to)) {
            parts.push(format!("{label} {:.1}s", b - a));
        }
    }
    parts.push(format!("VM total {:.1}s", outcome.duration.as_secs_f64()));
    println!("vm-test {name}: {}", parts.join(", "));
}

/// The guest's script (busybox sh). Every wait is bounded; whatever happens, it prints ctrace's output and stderr.
fn guest_script(mode_flag: Option<&str>) -> String {
    const SCRIPT: &str = r#"# ctrace VM test, generated by xtask/src/vm_tests.rs.
M=@MARK@
KIT=@TESTKIT@
PORT=@PORT@
now() { cut -d' ' -f1 /proc/uptime; }
mark() { echo "$M $*"; }
block() { mark begin "$1"; cat "$2" 2>/dev/null; echo; mark end "$1"; }
finish() {
    [ -n "$2" ] && mark error "$2"
    block ctrace.json /tmp/ct.json
    block ctrace.err /tmp/ct.err
    iptables -L OUTPUT -v -n -x > /tmp/rules 2>&1
    block iptables /tmp/rules
    exit "$1"
}
# Whether ctrace has ended (a zombie, not reaped yet, counts as ended).
ended() {
    state=$(cut -d' ' -f3 "/proc/$ct/stat" 2>/dev/null)
    [ -z "$state" ] || [ "$state" = Z ]
}

mark time.start "$(now)"
mark kernel "$(uname -r)"
ln -sf xtables-legacy-multi /usr/sbin/iptables
iptables -A OUTPUT -m conntrack --ctstate NEW,ESTABLISHED,RELATED -j ACCEPT || finish 1 "iptables could not add the conntrack rule"
iptables -I OUTPUT -m conntrack --ctstate INVALID -j DROP || finish 1 "iptables could not add the INVALID DROP rule"
max=$(cat /proc/sys/net/netfilter/nf_conntrack_max) || finish 1 "nf_conntrack_max is unreadable"
mark max "$max"

@CTRACE@ run --json --rate-limit 0 @MODE@>/tmp/ct.json 2>/tmp/ct.err &
ct=$!
i=0
until grep -q '"event":"mode"' /tmp/ct.json; do
    if ended; then
        wait "$ct"
        mark ctrace.exit "$?"
        finish 1 "ctrace exited before attaching"
    fi
    i=$((i + 1))
    if [ "$i" -gt $((@ATTACH_S@ * 2)) ]; then
        kill -KILL "$ct"
        finish 1 "ctrace did not attach within @ATTACH_S@ s"
    fi
    sleep 0.5
done
mark time.attached "$(now)"
mark stats.before "$($KIT stats)"

sysctl -w net.netfilter.nf_conntrack_max=@FULL_MAX@ >/dev/null || finish 1 "could not lower nf_conntrack_max"
mark flows.table_full "$($KIT udp-flows --first 0 --count @FULL_FLOWS@ --port $PORT)"
sysctl -w net.netfilter.nf_conntrack_max="$max" >/dev/null || finish 1 "could not restore nf_conntrack_max"
mark stats.table_full "$($KIT stats)"
mark time.table_full "$(now)"

# Fill to 95% and hold it for ctrace's once-a-second poll (it lists evictions while a table is
# over 90% full), then overflow.
fill=$((max * 95 / 100))
mark flows.early_fill "$($KIT udp-flows --first @FULL_FLOWS@ --count $fill --port $PORT)"
sleep 2.5
mark flows.early_drop "$($KIT udp-flows --first $((@FULL_FLOWS@ + fill)) --count $((max + max / 8 - fill)) --port $PORT)"
mark stats.early_drop "$($KIT stats)"
mark time.early_drop "$(now)"

mark flows.invalid "$($KIT tcp-invalid --count @INVALID@ --port $PORT)"
mark stats.invalid "$($KIT stats)"
mark time.invalid "$(now)"

# ctrace reads the counters once a second: let it see the last traffic before it stops.
sleep 2
kill -INT "$ct"
( sleep @STOP_S@; kill -KILL "$ct" 2>/dev/null ) &
watchdog=$!
wait "$ct"
mark ctrace.exit "$?"
kill "$watchdog" 2>/dev/null
mark time.stopped "$(now)"
finish 0
"#;
    SCRIPT
        .replace("@MARK@", MARK)
        .replace("@TESTKIT@", GUEST_TESTKIT)
        .replace("@CTRACE@", GUEST_CTRACE)
        .replace("@MODE@", &mode_flag.map_or(String::new(), |m| format!("--mode {m} ")))
        .replace("@PORT@", &PORT.to_string())
        .replace("@FULL_MAX@", &TABLE_FULL_MAX.to_string())
        .replace("@FULL_FLOWS@", &TABLE_FULL_FLOWS.to_string())
        .replace("@INVALID@", &INVALID_SEGMENTS.to_string())
        .replace("@ATTACH_S@", &ATTACH_TIMEOUT_S.to_string())
        .replace("@STOP_S@", &STOP_TIMEOUT_S.to_string())
}

/// `sent=N failed=M` from `ctrace-testkit udp-flows` / `tcp-invalid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sends {
    sent: u32,
    failed: u32,
}

fn parse_sends(line: &str) -> Result<Sends> {
    let number = |key: &str| -> Result<u32> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .with_context(|| format!("{line:?} has no {key}="))?
            .parse()
            .with_context(|| format!("{key} is not a number in {line:?}"))
    };
    Ok(Sends {
        sent: number("sent")?,
        failed: number("failed")?,
    })
}

/// Everything the guest reported.
#[derive(Debug)]
struct GuestReport {
    kernel: String,
    /// The default nf_conntrack_max, read before the test lowered it.
    default_max: u32,
    /// Counters before the workload and after each of its three phases.
    before: Counters,
    after_table_full: Counters,
    after_early_drop: Counters,
    after_invalid: Counters,
    table_full_sends: Sends,
    early_drop_sends: Sends,
    invalid_sends: Sends,
    events: Vec<Value>,
    ctrace_exit: Option<i32>,
    ctrace_stderr: String,
    /// Guest uptime in seconds at each step.
    times: BTreeMap<String, f64>,
}

impl GuestReport {
    fn parse(output: &str) -> Result<GuestReport> {
        let values = marker_values(output, MARK);
        let events = match marker_block(output, MARK, "ctrace.json") {
            Some(lines) => parse_events(&lines)?,
            None => Vec::new(),
        };
        let ctrace_stderr = marker_block(output, MARK, "ctrace.err").unwrap_or_default().join("\n");
        if let Some(error) = values.get("error") {
            let stderr = ctrace_stderr.trim();
            if stderr.is_empty() {
                bail!("the guest script stopped: {error}");
            }
            bail!("the guest script stopped: {error}; ctrace's stderr: {stderr}");
        }
        let value = |key: &str| {
            values
                .get(key)
                .map(String::as_str)
                .with_context(|| format!("the guest did not report {key}"))
        };
        let stats = |key: &str| Counters::parse(value(key)?).with_context(|| format!("the guest's {key}"));
        let sends = |key: &str| parse_sends(value(key)?).with_context(|| format!("the guest's {key}"));
        let times = values
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("time.")?.to_string(), v.parse().ok()?)))
            .collect();
        Ok(GuestReport {
            kernel: value("kernel")?.to_string(),
            default_max: value("max")?
                .parse()
                .context("the guest's nf_conntrack_max is not a number")?,
            before: stats("stats.before")?,
            after_table_full: stats("stats.table_full")?,
            after_early_drop: stats("stats.early_drop")?,
            after_invalid: stats("stats.invalid")?,
            table_full_sends: sends("flows.table_full")?,
            early_drop_sends: sends("flows.early_drop")?,
            invalid_sends: sends("flows.invalid")?,
            events,
            ctrace_exit: values.get("ctrace.exit").and_then(|v| v.parse().ok()),
            ctrace_stderr,
            times,
        })
    }
}

/// The destination of flow `i` (as `ctrace-testkit udp-flows` sends it): 127.(1+i>>16).(i>>8&255).(i&255).
fn flow_destination(i: u32, port: u16) -> SocketAddrV4 {
    let [_, b, c, d] = i.to_be_bytes();
    SocketAddrV4::new(Ipv4Addr::new(127, b.saturating_add(1), c, d), port)
}

fn drop_events<'a>(events: &'a [Value], reason: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    events
        .iter()
        .filter(move |v| v["event"] == "drop" && v["reason"] == reason)
}

/// The checks, grouped into the tests `table_full`, `early_drop`, `invalid` and `session`.
fn evaluate(case: &VmCase, r: &GuestReport) -> Vec<TestResult> {
    let deltas = (
        r.after_invalid.since(&r.before),
        r.after_table_full.since(&r.before),
        r.after_early_drop.since(&r.after_table_full),
        r.after_invalid.since(&r.after_early_drop),
    );
    let (total, phase_full, phase_early, phase_invalid) = match deltas {
        (Ok(t), Ok(a), Ok(b), Ok(c)) => (t, a, b, c),
        (t, a, b, c) => {
            let mut test = TestResult::new("counters");
            for err in [t.err(), a.err(), b.err(), c.err()].into_iter().flatten() {
                test.failures.push(format!("{err:#}"));
            }
            return vec![test];
        }
    };
    let summaries: Vec<&Value> = r.events.iter().filter(|v| v["event"] == "summary").collect();
    let summary = summaries.first().copied().unwrap_or(&Value::Null);
    let drops = &summary["drops"];

    let mut full = TestResult::new("table_full");
    let events: Vec<&Value> = drop_events(&r.events, "table_full").collect();
    full.facts.push(format!(
        "kernel drop +{} (+{} while the max was {TABLE_FULL_MAX}), ctrace {}, {} events, {} of {TABLE_FULL_FLOWS} sends failed",
        total.drop, phase_full.drop, drops["table_full"], events.len(), r.table_full_sends.failed
    ));
    full.check(total.drop > 0, || "the kernel counted no table-full drop".to_string());
    full.check_equal(
        "summary drops.table_full",
        &drops["table_full"],
        total.drop,
        "drop delta",
    );
    full.check(events.len() as u64 == total.drop, || {
        format!(
            "{} table_full events for a kernel drop delta of {}",
            events.len(),
            total.drop
        )
    });
    let early_flows = r.default_max.saturating_add(r.default_max / 8);
    let sent: HashSet<String> = (0..TABLE_FULL_FLOWS.saturating_add(early_flows))
        .map(|i| flow_destination(i, PORT).to_string())
        .collect();
    let strangers: Vec<String> = events
        .iter()
        .map(|v| format!("{}:{}", v["dst"].as_str().unwrap_or("?"), v["dport"]))
        .filter(|dst| !sent.contains(dst))
        .collect();
    if let Some(stranger) = strangers.first() {
        full.failures.push(format!(
            "{} table_full events name destinations the guest never sent to, e.g. {stranger}",
            strangers.len()
        ));
    }
    let odd = events.iter().filter(|v| v["proto"] != "udp" || v["count"] != 1).count();
    full.check(odd == 0, || format!("{odd} table_full events are not single udp drops"));

    let mut early = TestResult::new("early_drop");
    let counted: u64 = drop_events(&r.events, "early_drop")
        .filter_map(|v| v["count"].as_u64())
        .sum();
    early.facts.push(format!(
        "kernel early_drop +{} (+{} from {early_flows} flows at max {}), ctrace {}, events sum {counted}",
        total.early_drop, phase_early.early_drop, r.default_max, drops["early_drop"]
    ));
    early.check(total.early_drop > 0, || "the kernel counted no early_drop".to_string());
    // Not asserted: early_drop scans only 8 buckets, so a few sends may still hit table_full.
    early.facts.push(format!(
        "early_drop phase: {} sent, {} failed",
        r.early_drop_sends.sent, r.early_drop_sends.failed
    ));
    early.check_equal(
        "summary drops.early_drop",
        &drops["early_drop"],
        total.early_drop,
        "early_drop delta",
    );
    early.check(counted == total.early_drop, || {
        format!(
            "early_drop events sum to {counted}, the kernel's early_drop delta is {}",
            total.early_drop
        )
    });
    // kprobe mode lists each eviction (flow of the evicted entry) while the table is nearly full.
    let evicted: Vec<&Value> = drop_events(&r.events, "early_drop")
        .filter(|v| v["evicted"] == true)
        .collect();
    early
        .facts
        .push(format!("{} evictions listed with their flow", evicted.len()));
    if case.expect_mode == Some("kprobe") {
        early.check(!evicted.is_empty(), || {
            "no eviction was listed with its flow".to_string()
        });
        let odd = evicted
            .iter()
            .filter(|v| v["proto"] != "udp" || v["dport"] != PORT || v["count"] != 1)
            .count();
        early.check(odd == 0, || {
            format!("{odd} evicted entries are not the guest's udp flows to port {PORT}")
        });
    }

    let mut invalid = TestResult::new("invalid");
    let events: Vec<&Value> = drop_events(&r.events, "invalid").collect();
    invalid.facts.push(format!(
        "kernel invalid +{} (+{} in the invalid phase), ctrace {}, {} events, {} of {INVALID_SEGMENTS} sends failed",
        total.invalid,
        phase_invalid.invalid,
        drops["invalid"],
        events.len(),
        r.invalid_sends.failed
    ));
    invalid.check_equal(
        "summary drops.invalid",
        &drops["invalid"],
        u64::from(INVALID_SEGMENTS),
        "segments sent",
    );
    invalid.check(total.invalid >= u64::from(INVALID_SEGMENTS), || {
        format!(
            "the kernel's invalid delta is {}, fewer than the {INVALID_SEGMENTS} segments",
            total.invalid
        )
    });
    invalid.check(r.invalid_sends.failed == INVALID_SEGMENTS, || {
        format!(
            "only {} of {INVALID_SEGMENTS} SYN|FIN sends failed: the INVALID DROP rule did not drop them all",
            r.invalid_sends.failed
        )
    });
    invalid.check(events.len() as u64 == u64::from(INVALID_SEGMENTS), || {
        format!(
            "{} invalid events for {INVALID_SEGMENTS} dropped segments",
            events.len()
        )
    });
    let odd = events
        .iter()
        .filter(|v| v["proto"] != "tcp" || v["dst"] != "127.0.0.1" || v["dport"] != PORT)
        .count();
    invalid.check(odd == 0, || {
        format!("{odd} invalid events are not tcp to 127.0.0.1:{PORT}")
    });
    if let Some(detail) = case.expect_invalid_detail {
        let wrong = events.iter().filter(|v| v["detail"] != detail).count();
        invalid.check(wrong == 0, || {
            format!("{wrong} invalid events lack the detail {detail:?}")
        });
    }

    let mut session = TestResult::new("session");
    let modes: Vec<&str> = r
        .events
        .iter()
        .filter(|v| v["event"] == "mode")
        .map(|v| v["mode"].as_str().unwrap_or("?"))
        .collect();
    let mode = modes.first().copied().unwrap_or("none");
    session.facts.push(format!(
        "mode {mode}, lost {}, netfilter_rule {}, insert_failed {} (kernel +{}), exit {}",
        summary["lost"],
        drops["netfilter_rule"],
        drops["insert_failed"],
        total.insert_failed,
        r.ctrace_exit.map_or("?".to_string(), |c| c.to_string())
    ));
    session.check(modes.len() == 1, || {
        format!("{} mode events, expected one", modes.len())
    });
    if let Some(expected) = case.expect_mode {
        session.check(mode == expected, || {
            format!("ctrace chose {mode} mode, expected {expected}")
        });
    }
    session.check(summaries.len() == 1, || {
        format!("{} summary events, expected one", summaries.len())
    });
    session.check(summary["mode"] == mode, || {
        format!("the summary's mode is {}, the mode event's {mode}", summary["mode"])
    });
    session.check(r.ctrace_exit == Some(0), || {
        format!("ctrace exited with {:?} after SIGINT", r.ctrace_exit)
    });
    session.check_equal("summary lost", &summary["lost"], 0, "expected");
    session.check_equal("summary drops.netfilter_rule", &drops["netfilter_rule"], 0, "expected");
    session.check_equal(
        "summary drops.insert_failed",
        &drops["insert_failed"],
        total.insert_failed,
        "insert_failed delta",
    );
    let by_netns = summary["by_netns"].as_array().map(Vec::as_slice).unwrap_or_default();
    let reported = |key: &str| -> Option<u64> { by_netns.iter().map(|n| n["kernel_counters"][key].as_u64()).sum() };
    for (key, kernel) in [
        ("drop", total.drop),
        ("early_drop", total.early_drop),
        ("insert_failed", total.insert_failed),
        ("invalid", total.invalid),
    ] {
        let got = reported(key);
        session.check(got == Some(kernel), || {
            format!("summary by_netns kernel_counters.{key} is {got:?}, the guest's own delta {kernel}")
        });
    }
    vec![full, early, invalid, session]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{is_kernel_message, parse_ldd};

    fn mark(line: &str) -> String {
        format!("{MARK} {line}\n")
    }

    #[test]
    fn stats_lines_parse_in_any_order() {
        let c = Counters::parse("drop=291 early_drop=2 insert_failed=0 invalid=20").unwrap();
        assert_eq!(
            c,
            Counters {
                drop: 291,
                early_drop: 2,
                insert_failed: 0,
                invalid: 20
            }
        );
        let swapped = Counters::parse(" invalid=20 insert_failed=0  early_drop=2 drop=291\r").unwrap();
        assert_eq!(swapped, c);
        assert_eq!(c.since(&Counters::default()).unwrap(), c);
    }

    #[test]
    fn bad_stats_lines_are_errors() {
        let err = Counters::parse("drop=1 early_drop=2 invalid=3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no insert_failed"), "{err}");
        let err = Counters::parse("drop=x early_drop=2 insert_failed=0 invalid=3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("drop is not a number"), "{err}");
        let err = Counters::parse("drop 1").unwrap_err().to_string();
        assert!(err.contains("not key=value"), "{err}");
        assert!(Counters::parse("").is_err());
        let before = Counters {
            drop: 5,
            ..Counters::default()
        };
        let err = Counters::default().since(&before).unwrap_err().to_string();
        assert!(err.contains("drop counter went backwards"), "{err}");
    }

    #[test]
    fn send_lines_parse() {
        assert_eq!(
            parse_sends("sent=265 failed=291").unwrap(),
            Sends { sent: 265, failed: 291 }
        );
        assert!(parse_sends("sent=1").is_err());
        assert!(parse_sends("").is_err());
    }

    #[test]
    fn markers_and_blocks_are_extracted() {
        let output = [
            "init: noise before\n".to_string(),
            mark("kernel 6.1.0-56-amd64"),
            mark("stats.before drop=0 early_drop=0 insert_failed=0 invalid=0\r"),
            "@@ctrace-vmtestkernel not-a-marker\n".to_string(),
            mark("kernel second-value-ignored"),
            mark("begin ctrace.json"),
            "{\"event\":\"mode\",\"mode\":\"tracepoint\"}\n".to_string(),
            "[   12.345678] nf_conntrack: table full, dropping packet\n".to_string(),
            "\n".to_string(),
            "{\"event\":\"summary\"}\n".to_string(),
            mark("end ctrace.json"),
            mark("begin ctrace.err"),
            mark("end ctrace.err"),
            mark("begin unterminated"),
            "x\n".to_string(),
        ]
        .concat();
        let values = marker_values(&output, MARK);
        assert_eq!(values["kernel"], "6.1.0-56-amd64");
        assert_eq!(values["stats.before"], "drop=0 early_drop=0 insert_failed=0 invalid=0");
        assert!(!values.contains_key("begin") && !values.contains_key("end"));
        assert_eq!(values.len(), 2);

        let json = marker_block(&output, MARK, "ctrace.json").unwrap();
        assert_eq!(json.len(), 4);
        let events = parse_events(&json).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["mode"], "tracepoint");
        assert_eq!(marker_block(&output, MARK, "ctrace.err").unwrap(), Vec::<&str>::new());
        assert_eq!(marker_block(&output, MARK, "unterminated"), None);
        assert_eq!(marker_block(&output, MARK, "missing"), None);

        let err = parse_events(&["{\"event\":\"drop\"}", "garbage"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("non-JSON line: garbage"), "{err}");
    }

    #[test]
    fn kernel_messages_are_recognised() {
        assert!(is_kernel_message("[    7.123456] random: crng init done"));
        assert!(!is_kernel_message("[1,2,3]"));
        assert!(!is_kernel_message("[] x"));
        assert!(!is_kernel_message("{\"event\":\"drop\"}"));
    }

    #[test]
    fn ldd_output_lists_libraries_and_the_loader() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibxtables.so.12 => /lib/x86_64-linux-gnu/libxtables.so.12 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libxtables.so.12",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        let err = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err().to_string();
        assert!(err.contains("libfoo.so.1 not found"), "{err}");
    }

    #[test]
    fn flow_destinations_match_the_testkit() {
        assert_eq!(flow_destination(0, 9).to_string(), "127.1.0.0:9");
        assert_eq!(flow_destination(556, 9).to_string(), "127.1.2.44:9");
        assert_eq!(flow_destination(0x1_02_03, 9).to_string(), "127.2.2.3:9");
    }

    #[test]
    fn the_script_has_no_placeholders_left() {
        let script = guest_script(None);
        assert!(!script.replace(MARK, "").contains('@'), "{script}");
        assert!(script.contains("--count 556"));
        assert!(script.contains("run --json --rate-limit 0 >/tmp/ct.json"));
        let script = guest_script(Some("tracepoint"));
        assert!(script.contains("run --json --rate-limit 0 --mode tracepoint >/tmp/ct.json"));
    }

    /// A full report as the guest prints it, evaluated: everything consistent passes, a wrong total fails.
    #[test]
    fn a_consistent_report_passes_and_a_wrong_total_fails() {
        let table_full_event =
            r#"{"event":"drop","reason":"table_full","proto":"udp","dst":"127.1.1.44","dport":9,"count":1}"#;
        let invalid_event =
            r#"{"event":"drop","reason":"invalid","proto":"tcp","dst":"127.0.0.1","dport":9,"count":1}"#;
        let summary = |table_full: u64| {
            format!(
                r#"{{"event":"summary","mode":"tracepoint","lost":0,"drops":{{"table_full":{table_full},"early_drop":7,"insert_failed":0,"invalid":20,"netfilter_rule":0}},"by_netns":[{{"netns":1,"kernel_counters":{{"drop":2,"early_drop":7,"insert_failed":0,"invalid":20}}}}]}}"#
            )
        };
        let report = |table_full: u64| {
            let mut out = [
                "time.start 1.0",
                "kernel 6.1.0-56-amd64",
                "max 7680",
                "time.attached 9.5",
                "stats.before drop=0 early_drop=0 insert_failed=0 invalid=1",
                "flows.table_full sent=265 failed=2",
                "stats.table_full drop=2 early_drop=3 insert_failed=0 invalid=1",
                "flows.early_drop sent=8640 failed=0",
                "stats.early_drop drop=2 early_drop=7 insert_failed=0 invalid=1",
                "flows.invalid sent=0 failed=20",
                "stats.invalid drop=2 early_drop=7 insert_failed=0 invalid=21",
                "ctrace.exit 0",
                "begin ctrace.json",
            ]
            .map(mark)
            .concat();
            out += "{\"event\":\"mode\",\"mode\":\"tracepoint\"}\n";
            out += &format!("{table_full_event}\n{table_full_event}\n");
            out += "{\"event\":\"drop\",\"reason\":\"early_drop\",\"count\":7,\"source\":\"counters\"}\n";
            for _ in 0..INVALID_SEGMENTS {
                out += &format!("{invalid_event}\n");
            }
            out += &format!("{}\n", summary(table_full));
            out += &mark("end ctrace.json");
            out
        };
        let case = VmCase {
            kernel: KernelSpec::Debian61,
            mode_flag: None,
            expect_mode: Some("tracepoint"),
            expect_invalid_detail: None,
        };

        let good = GuestReport::parse(&report(2)).unwrap();
        assert_eq!(good.times["attached"], 9.5);
        let tests = evaluate(&case, &good);
        let names: Vec<&str> = tests.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["table_full", "early_drop", "invalid", "session"]);
        for t in &tests {
            assert!(t.passed(), "{}", t.line());
        }

        let bad = GuestReport::parse(&report(3)).unwrap();
        let tests = evaluate(&case, &bad);
        assert!(!tests[0].passed());
        assert!(
            tests[0]
                .line()
                .contains("summary drops.table_full is 3, the kernel's drop delta 2"),
            "{}",
            tests[0].line()
        );
        assert!(tests[1..].iter().all(TestResult::passed));

        let kprobe = VmCase {
            expect_mode: Some("kprobe"),
            expect_invalid_detail: Some("invalid tcp flag combination"),
            ..case
        };
        let tests = evaluate(&kprobe, &good);
        assert!(
            tests[2].line().contains("20 invalid events lack the detail"),
            "{}",
            tests[2].line()
        );
        assert!(
            tests[3]
                .line()
                .contains("ctrace chose tracepoint mode, expected kprobe"),
            "{}",
            tests[3].line()
        );
    }

    #[test]
    fn a_script_error_is_reported() {
        let out = [mark("kernel 6.1"), mark("error ctrace did not attach within 60 s")].concat();
        let err = GuestReport::parse(&out).unwrap_err().to_string();
        assert!(err.contains("ctrace did not attach within 60 s"), "{err}");
        let err = GuestReport::parse(&mark("kernel 6.1")).unwrap_err().to_string();
        assert!(err.contains("did not report max"), "{err}");
    }
}
