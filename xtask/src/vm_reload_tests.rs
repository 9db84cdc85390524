//! VM tests of the reload trap (issue 3): module unload/reload events, sysctl resets and writes, in Debian 5.10, 6.1
//! and 6.12 guests, where nf_conntrack is a module.
//!
//! One boot per kernel runs five cases in sequence, each with its own `ctrace run --json` (case a also with a second
//! ctrace in text mode), in this order so that each starts from the state the previous one left:
//! - e: a sysctl write by `ctrace-testkit write-sysctl` is attributed to it (pid and comm from 6.1 on);
//! - b: `modprobe -r nf_conntrack` while xt_conntrack holds it → `unload_failed` naming the holder, no reset;
//! - a: nf_conntrack_max and a TCP timeout raised, max persisted in /etc/sysctl.d, the module unloaded and reloaded
//!   while ctrace runs → unload/load events by modprobe and one `sysctl_reset` per key, with before, after, default
//!   and where it is persisted;
//! - d: table-full drops before and after a reload: ctrace's totals equal the kernel counter deltas of both module
//!   instances, and drops after the `reattached` event are reported;
//! - c: `options nf_conntrack hashsize=N` in /etc/modprobe.d: hashsize survives the reload and is not called a reset.
//!
//! The guest prints marker lines and ctrace's output between markers; the host parses them, prints one line per
//! case and `N passed, M failed`.

use crate::debian::{self, KernelSpec};
use crate::guest::{Counters, TestResult, finish, key_values};
use crate::guest::{GUEST_TESTKIT, TESTKIT, build_testkit, iptables_files, marker_block, marker_values, parse_events};
use crate::vm::{self, VmOutcome, VmRun};
use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(crate) const GUEST_CTRACE: &str = "/usr/local/bin/ctrace";
/// Prefix of the lines the guest script prints for the host; the kernel and the programs never print it.
const MARK: &str = "@@ctrace-reload";

const MAX_KEY: &str = "net.netfilter.nf_conntrack_max";
const TIMEOUT_KEY: &str = "net.netfilter.nf_conntrack_tcp_timeout_established";
const BUCKETS_KEY: &str = "net.netfilter.nf_conntrack_buckets";
/// How ctrace names the module parameter in `sysctl_reset` events.
const HASHSIZE_KEY: &str = "nf_conntrack.hashsize";
/// The raised limit (the incident's value) and timeout.
const RAISED_MAX: u64 = 1_048_576;
const RAISED_TIMEOUT: u64 = 3600;
/// The per-netns timeout set in another network namespace (case a).
const NETNS_TIMEOUT: u64 = 7200;
/// The kernel's compiled-in nf_conntrack_tcp_timeout_established (5 days), the same on every tested kernel.
const DEFAULT_TIMEOUT: u64 = 432_000;
/// The sysctl.d file case a writes, and the line that sets nf_conntrack_max in it.
const SYSCTL_FILE: &str = "/etc/sysctl.d/90-ct.conf";
const SYSCTL_FILE_LINE: u32 = 2;
/// Case c's module option.
const HASHSIZE: u64 = 16384;
/// Case e's write.
const WRITTEN_MAX: u64 = 131_072;
/// Case d's workload, as in vm_tests: nf_conntrack_max lowered to 256 for 556 new UDP flows.
const TABLE_FULL_MAX: u32 = 256;
const TABLE_FULL_FLOWS: u32 = 556;
const PORT: u16 = 9;
/// Bounds inside the guest (TCG is slow: ctrace's start-up reads the kernel's BTF).
const ATTACH_TIMEOUT_S: u32 = 60;
const REATTACH_TIMEOUT_S: u32 = 30;
const STOP_TIMEOUT_S: u32 = 60;
/// The whole guest, boot included.
const VM_TIMEOUT: Duration = Duration::from_secs(420);
/// The order of the report (the guest runs them in the order e, b, a, d, c).
const CASES: [&str; 5] = ["a", "b", "c", "d", "e"];

/// Runs the five cases on every kernel in [`KernelSpec::ALL`]; prints one line per case, ctrace's text output of
/// case a, the timings and `N passed, M failed`, and fails when any case failed.
pub fn run_all(ws: &Path) -> Result<()> {
    crate::setup::ensure_debian_packages(&["iptables"])?;
    let build_start = Instant::now();
    let files = guest_files(ws)?;
    println!(
        "vm-reload: built the static ctrace and {TESTKIT} in {:.1}s",
        build_start.elapsed().as_secs_f64()
    );

    let mut results = Vec::new();
    let mut tails = Vec::new();
    for kernel in KernelSpec::ALL {
        let (tests, tail) = run_kernel(kernel, &files)?;
        if tests.iter().any(|t| !t.passed()) {
            tails.push(tail);
        }
        results.extend(tests);
    }

    finish("reload VM tests", &results, &tails)
}

/// The static ctrace and ctrace-testkit and the host's legacy iptables, as `(host path, guest path)` pairs.
pub(crate) fn guest_files(ws: &Path) -> Result<Vec<(PathBuf, String)>> {
    let ctrace = crate::dist::build_static(ws)?;
    let testkit = build_testkit(ws)?;
    let mut files = vec![(ctrace, GUEST_CTRACE.to_string()), (testkit, GUEST_TESTKIT.to_string())];
    files.extend(iptables_files()?);
    // kmod's modprobe, which refuses to unload a module in use without asking the kernel.
    for f in crate::demo_vm::kmod_files()? {
        if !files.iter().any(|(_, guest)| *guest == f.1) {
            files.push(f);
        }
    }
    Ok(files)
}

/// Boots one guest and evaluates what it printed. Errors are host problems (no kernel, no QEMU); the guest's own
/// failures become failed cases. Also returns the end of the console for the error message.
fn run_kernel(spec: KernelSpec, files: &[(PathBuf, String)]) -> Result<(Vec<TestResult>, String)> {
    let name = spec.short_name();
    let kernel = debian::fetch(spec, &debian::default_cache_root())?;
    let mut run = VmRun::new(kernel.clone(), guest_script());
    run.files = files.to_vec();
    run.modules = ["nf_conntrack", "xt_conntrack", "iptable_filter"]
        .map(String::from)
        .to_vec();
    run.timeout = VM_TIMEOUT;
    println!(
        "vm-reload {name}: booting {} ({}) under TCG",
        kernel.version, kernel.package
    );
    let outcome = vm::run(&run)?;
    let tail = outcome.console_tail(name, 40);
    let guest = Guest::parse(&outcome.script_output());
    print_timings(name, &outcome, &guest);
    let mut tests = evaluate(&guest);
    if let Err(err) = outcome.ensure_passed() {
        let mut t = TestResult::new("guest");
        t.failures.push(first_line(&format!("{err:#}")));
        tests.push(t);
    }
    for test in &mut tests {
        test.name = format!("{name} {}", test.name);
        println!("vm-reload {}", test.line());
    }
    for case in CASES {
        for (what, block) in [
            ("stderr", format!("{case}.err")),
            ("text stderr", format!("{case}.txt.err")),
        ] {
            let text = guest.block(&block).unwrap_or_default().join("\n");
            if !text.trim().is_empty() {
                println!("vm-reload {name} {case}: ctrace's {what}:\n{}", text.trim_end());
            }
        }
    }
    match guest.block("a.txt") {
        Some(lines) => {
            println!("vm-reload {name} a: ctrace's text output:");
            for line in lines.iter().filter(|l| !l.trim().is_empty()) {
                println!("    {line}");
            }
        }
        None => println!("vm-reload {name} a: no text output from ctrace"),
    }
    Ok((tests, tail))
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

fn print_timings(name: &str, outcome: &VmOutcome, guest: &Guest) {
    let mut parts = vec![format!("kernel {}", guest.value("kernel").unwrap_or("?"))];
    if let Some(boot) = outcome.boot_time {
        parts.push(format!("boot {:.1}s", boot.as_secs_f64()));
    }
    for case in ["e", "b", "a", "d", "c"] {
        if let Some(secs) = guest.case_seconds(case) {
            parts.push(format!("{case} {secs:.1}s"));
        }
    }
    parts.push(format!("VM total {:.1}s", outcome.duration.as_secs_f64()));
    println!("vm-reload {name}: {}", parts.join(", "));
}

/// The guest's script (busybox sh). Every wait is bounded; a step that cannot go on prints `error` and ctrace's
/// output so far, and ends the script.
fn guest_script() -> String {
    const SCRIPT: &str = r#"# ctrace reload VM test, generated by xtask/src/vm_reload_tests.rs.
M=@MARK@
KIT=@TESTKIT@
CT=@CTRACE@
MAXF=/proc/sys/net/netfilter/nf_conntrack_max
TOF=/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established
HSF=/sys/module/nf_conntrack/parameters/hashsize
# busybox sh runs its own applets (modprobe, rmmod) in a forked shell without exec unless the command has a path:
# /proc/PID/cmdline, and so ctrace's events, would show the shell's command line. With the path it is a real exec,
# as kmod's modprobe always is.
MODPROBE=/sbin/modprobe
now() { cut -d' ' -f1 /proc/uptime; }
mark() { echo "$M $*"; }
block() { mark begin "$1"; cat "$2" 2>/dev/null; echo; mark end "$1"; }
die() { mark error "$*"; exit 1; }
# Whether process $1 still runs (a zombie, not reaped yet, counts as ended).
alive() {
    state=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)
    [ -n "$state" ] && [ "$state" != Z ]
}
# wait_for FILE PATTERN SECONDS PID: until a line of FILE matches PATTERN; fails when PID ends or time runs out.
wait_for() {
    i=0
    until grep -q "$2" "$1" 2>/dev/null; do
        alive "$4" || return 1
        i=$((i + 1))
        [ "$i" -gt $(($3 * 4)) ] && return 1
        sleep 0.25
    done
}
# ct_start CASE [text]: ctrace --json into /tmp/CASE.json, and with "text" a second ctrace in text mode.
ct_start() {
    mark time.$1.start "$(now)"
    $CT run --json --rate-limit 0 >/tmp/$1.json 2>/tmp/$1.err &
    ctj=$!
    ctt=
    if [ "$2" = text ]; then
        $CT run --rate-limit 0 >/tmp/$1.txt 2>/tmp/$1.txt.err &
        ctt=$!
    fi
    wait_for /tmp/$1.json '"event":"mode"' @ATTACH_S@ "$ctj" || ct_die "$1" "ctrace did not attach within @ATTACH_S@ s"
    if [ -n "$ctt" ]; then
        wait_for /tmp/$1.txt '^ctrace: .* mode: ' @ATTACH_S@ "$ctt" || ct_die "$1" "ctrace (text) did not attach within @ATTACH_S@ s"
    fi
    mark time.$1.attached "$(now)"
}
# ct_stop CASE: SIGINT, a bounded wait, then ctrace's output between markers.
ct_stop() {
    for p in $ctj $ctt; do kill -INT "$p" 2>/dev/null; done
    ( sleep @STOP_S@; kill -KILL $ctj $ctt 2>/dev/null ) &
    watchdog=$!
    wait "$ctj"
    mark $1.exit "$?"
    if [ -n "$ctt" ]; then
        wait "$ctt"
        mark $1.text.exit "$?"
    fi
    kill "$watchdog" 2>/dev/null
    mark time.$1.stopped "$(now)"
    block $1.json /tmp/$1.json
    block $1.err /tmp/$1.err
    if [ -n "$ctt" ]; then
        block $1.txt /tmp/$1.txt
        block $1.txt.err /tmp/$1.txt.err
    fi
    ctj=
    ctt=
}
ct_die() { ct_stop "$1"; die "case $1: $2"; }
firewall_on() {
    iptables -A OUTPUT -m conntrack --ctstate NEW,ESTABLISHED,RELATED -j ACCEPT || die "iptables could not add the conntrack rule"
}
# No rules, and none of the modules that hold nf_conntrack (rmmod: modprobe -r would take nf_conntrack too).
firewall_off() {
    iptables -F OUTPUT || die "iptables -F OUTPUT failed"
    for m in xt_conntrack iptable_filter; do
        if grep -q "^$m " /proc/modules; then rmmod "$m" || die "rmmod $m failed"; fi
    done
}
# reload CASE: modprobe -r nf_conntrack and modprobe nf_conntrack while ctrace runs, then wait for its reattached event.
reload() {
    mark $1.holders "$(ls /sys/module/nf_conntrack/holders | tr '\n' ' ')"
    $MODPROBE -r nf_conntrack
    rc=$?
    mark $1.unload.rc "$rc"
    if [ -e /sys/module/nf_conntrack ]; then mark $1.gone no; else mark $1.gone yes; fi
    if alive "$ctj"; then mark $1.ctrace_alive yes; else mark $1.ctrace_alive no; fi
    [ "$rc" -eq 0 ] || ct_die "$1" "modprobe -r nf_conntrack failed (exit $rc) while ctrace ran"
    $MODPROBE nf_conntrack || ct_die "$1" "modprobe nf_conntrack failed"
    wait_for /tmp/$1.json '"event":"reattached"' @REATTACH_S@ "$ctj" || ct_die "$1" "ctrace reported no reattached event within @REATTACH_S@ s"
    if [ -n "$ctt" ]; then
        wait_for /tmp/$1.txt 'nf_conntrack is back' @REATTACH_S@ "$ctt" || ct_die "$1" "ctrace (text) did not report the reattach within @REATTACH_S@ s"
    fi
}

mark kernel "$(uname -r)"
ln -sf xtables-legacy-multi /usr/sbin/iptables
mkdir -p /etc/sysctl.d /etc/modprobe.d
max=$(cat $MAXF) || die "nf_conntrack_max is unreadable"
mark default.max "$max"
mark default.timeout "$(cat $TOF)"
mark default.hashsize "$(cat $HSF)"
if [ -e /sys/module/nf_conntrack/parameters/enable_hooks ]; then mark enable_hooks yes; else mark enable_hooks no; fi

# e: a sysctl write by a named process.
ct_start e
mark e.write "$($KIT write-sysctl @MAX_KEY@ @WRITTEN@)"
sysctl -w @MAX_KEY@="$max" >/dev/null || ct_die e "could not restore nf_conntrack_max"
sleep 1
ct_stop e

# b: an unload while xt_conntrack holds nf_conntrack fails, and nothing is reset.
firewall_on
ct_start b
sysctl -w @MAX_KEY@=@RAISED_MAX@ >/dev/null || ct_die b "could not raise nf_conntrack_max"
sleep 2
mark b.holders "$(ls /sys/module/nf_conntrack/holders | tr '\n' ' ')"
$MODPROBE -r nf_conntrack
mark b.unload.rc "$?"
# kmod's modprobe checks the holders itself and never calls delete_module.
@KMOD_DIR@/modprobe -r nf_conntrack 2>/dev/null
mark b.kmod.rc "$?"
mark b.live "$(cat /sys/module/nf_conntrack/initstate 2>/dev/null)"
mark b.after.max "$(cat $MAXF)"
sleep 2
sysctl -w @MAX_KEY@="$max" >/dev/null || ct_die b "could not restore nf_conntrack_max"
sleep 1
ct_stop b

# a: raised max (persisted in sysctl.d) and timeout, unload and reload while ctrace runs.
firewall_off
printf '# written by the ctrace reload VM test\n@MAX_KEY@ = @RAISED_MAX@\n' > @SYSCTL_FILE@
# Another network namespace with its own value of a per-netns key: a reload resets it too.
unshare -n sleep 600 &
nspid=$!
sleep 0.5
nsenter -t "$nspid" -n sysctl -w @TIMEOUT_KEY@=@NETNS_TIMEOUT@ >/dev/null || ct_die a "could not set the timeout in a netns"
mark a.netns "$(readlink /proc/$nspid/ns/net | tr -dc 0-9)"
ct_start a text
sysctl -w @MAX_KEY@=@RAISED_MAX@ >/dev/null || ct_die a "could not raise nf_conntrack_max"
sysctl -w @TIMEOUT_KEY@=@RAISED_TIMEOUT@ >/dev/null || ct_die a "could not set the timeout"
# ctrace refreshes its snapshot of the sysctls about once a second.
sleep 2
reload a
mark a.after.max "$(cat $MAXF)"
mark a.after.timeout "$(cat $TOF)"
sleep 1
ct_stop a
kill "$nspid" 2>/dev/null

# d: table-full drops before and after a reload.
firewall_on
ct_start d
mark d.stats0 "$($KIT stats)"
sysctl -w @MAX_KEY@=@FULL_MAX@ >/dev/null || ct_die d "could not lower nf_conntrack_max"
mark d.flows1 "$($KIT udp-flows --first 0 --count @FULL_FLOWS@ --port @PORT@)"
sysctl -w @MAX_KEY@="$max" >/dev/null || ct_die d "could not restore nf_conntrack_max"
mark d.stats1 "$($KIT stats)"
sleep 2
firewall_off
reload d
firewall_on
max2=$(cat $MAXF)
mark d.stats2 "$($KIT stats)"
sysctl -w @MAX_KEY@=@FULL_MAX@ >/dev/null || ct_die d "could not lower nf_conntrack_max"
mark d.flows2 "$($KIT udp-flows --first @FULL_FLOWS@ --count @FULL_FLOWS@ --port @PORT@)"
sysctl -w @MAX_KEY@="$max2" >/dev/null || ct_die d "could not restore nf_conntrack_max"
mark d.stats3 "$($KIT stats)"
# ctrace reads the counters once a second: let it see the last traffic before it stops.
sleep 2
ct_stop d

# c: hashsize set as a module option survives the reload.
firewall_off
echo 'options nf_conntrack hashsize=@HASHSIZE@' > /etc/modprobe.d/nf_conntrack.conf
$MODPROBE -r nf_conntrack || die "modprobe -r nf_conntrack failed before case c"
$MODPROBE nf_conntrack || die "modprobe nf_conntrack failed before case c"
hs=$(cat $HSF)
mark c.hashsize.before "$hs"
[ "$hs" = @HASHSIZE@ ] || die "modprobe did not apply /etc/modprobe.d/nf_conntrack.conf: hashsize is $hs"
ct_start c
sysctl -w @MAX_KEY@=@RAISED_MAX@ >/dev/null || ct_die c "could not raise nf_conntrack_max"
sleep 2
reload c
mark c.hashsize.after "$(cat $HSF)"
mark c.after.max "$(cat $MAXF)"
sleep 1
ct_stop c
exit 0
"#;
    SCRIPT
        .replace("@MARK@", MARK)
        .replace("@KMOD_DIR@", crate::demo_vm::GUEST_KMOD_DIR)
        .replace("@TESTKIT@", GUEST_TESTKIT)
        .replace("@CTRACE@", GUEST_CTRACE)
        .replace("@MAX_KEY@", MAX_KEY)
        .replace("@TIMEOUT_KEY@", TIMEOUT_KEY)
        .replace("@RAISED_MAX@", &RAISED_MAX.to_string())
        .replace("@RAISED_TIMEOUT@", &RAISED_TIMEOUT.to_string())
        .replace("@NETNS_TIMEOUT@", &NETNS_TIMEOUT.to_string())
        .replace("@SYSCTL_FILE@", SYSCTL_FILE)
        .replace("@HASHSIZE@", &HASHSIZE.to_string())
        .replace("@WRITTEN@", &WRITTEN_MAX.to_string())
        .replace("@FULL_MAX@", &TABLE_FULL_MAX.to_string())
        .replace("@FULL_FLOWS@", &TABLE_FULL_FLOWS.to_string())
        .replace("@PORT@", &PORT.to_string())
        .replace("@ATTACH_S@", &ATTACH_TIMEOUT_S.to_string())
        .replace("@REATTACH_S@", &REATTACH_TIMEOUT_S.to_string())
        .replace("@STOP_S@", &STOP_TIMEOUT_S.to_string())
}

/// Nanoseconds since the Unix epoch of an RFC 3339 UTC time as ctrace prints it (`2026-11-22T00:35:30.0805Z`).
fn parse_ts(ts: &str) -> Option<i128> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, m, s) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 || frac.len() > 9 {
        return None;
    }
    let nanos: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse::<i64>().ok()? * 10_i64.pow(9 - frac.len() as u32)
    };
    // Days from 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + m * 60 + s;
    Some(i128::from(secs) * 1_000_000_000 + i128::from(nanos))
}

/// (major, minor) of a release string such as `6.1.0-56-amd64`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(['.', '-']).map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
}

/// Everything the guest printed between the script's start and end.
#[derive(Debug)]
struct Guest {
    output: String,
    values: BTreeMap<String, String>,
}

impl Guest {
    fn parse(output: &str) -> Guest {
        Guest {
            output: output.to_string(),
            values: marker_values(output, MARK),
        }
    }

    fn value(&self, key: &str) -> Result<&str> {
        self.values.get(key).map(String::as_str).with_context(|| {
            let stopped = self
                .values
                .get("error")
                .map(|e| format!(" (the guest script stopped: {e})"))
                .unwrap_or_default();
            format!("the guest did not report {key}{stopped}")
        })
    }

    fn number(&self, key: &str) -> Result<u64> {
        let v = self.value(key)?;
        v.parse()
            .with_context(|| format!("the guest's {key} is not a number: {v:?}"))
    }

    fn counters(&self, key: &str) -> Result<Counters> {
        Counters::parse(self.value(key)?).with_context(|| format!("the guest's {key}"))
    }

    fn block(&self, name: &str) -> Option<Vec<&str>> {
        marker_block(&self.output, MARK, name)
    }

    /// ctrace's JSON events of one case.
    fn events(&self, case: &str) -> Result<Vec<Value>> {
        let lines = self.block(&format!("{case}.json")).with_context(|| {
            let stopped = self
                .values
                .get("error")
                .map(|e| format!(" (the guest script stopped: {e})"))
                .unwrap_or_default();
            format!("the guest printed no ctrace output for case {case}{stopped}")
        })?;
        parse_events(&lines).with_context(|| format!("case {case}"))
    }

    /// Guest seconds from ctrace's start to its stop in one case.
    fn case_seconds(&self, case: &str) -> Option<f64> {
        let t = |what: &str| self.values.get(&format!("time.{case}.{what}"))?.parse::<f64>().ok();
        Some(t("stopped")? - t("start")?)
    }

    /// Whether the guest kernel gives cgroup/sysctl programs the task helpers (pid, comm, uid): 6.1 and later.
    fn names_sysctl_writers(&self) -> Result<bool> {
        let release = self.value("kernel")?;
        let version = kernel_version(release).with_context(|| format!("unreadable kernel release {release:?}"))?;
        Ok(version >= (6, 1))
    }
}

fn events_of<'a>(events: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    events.iter().filter(move |v| v["event"] == kind)
}

fn module_events<'a>(events: &'a [Value], action: &str, name: &str) -> Vec<&'a Value> {
    events_of(events, "module")
        .filter(|v| v["action"] == action && v["name"] == name)
        .collect()
}

/// A JSON string field, or its JSON text when it is not a string (`null` when absent).
fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// Checks every case shares: ctrace ended cleanly after SIGINT with one summary and lost nothing.
fn check_session(g: &Guest, case: &str, events: &[Value], t: &mut TestResult) {
    let exit = g.value(&format!("{case}.exit")).unwrap_or("?").to_string();
    t.check(exit == "0", || format!("ctrace exited with {exit} after SIGINT"));
    let summaries: Vec<&Value> = events_of(events, "summary").collect();
    t.check(summaries.len() == 1, || {
        format!("{} summary events, expected one", summaries.len())
    });
    if let Some(summary) = summaries.first() {
        t.check(summary["lost"] == 0, || {
            format!("ctrace lost {} events", summary["lost"])
        });
    }
    if let Some(secs) = g.case_seconds(case) {
        t.facts.push(format!("{secs:.1}s"));
    }
}

/// The module events of a successful reload: one unload and one load of nf_conntrack by modprobe, in that order,
/// while ctrace ran; and the `reattached` event that follows. Returns the reattached event's time.
fn check_reload(g: &Guest, case: &str, events: &[Value], t: &mut TestResult) -> Result<Option<i128>> {
    let rc = g.number(&format!("{case}.unload.rc"))?;
    let gone = g.value(&format!("{case}.gone"))?;
    let alive = g.value(&format!("{case}.ctrace_alive"))?;
    t.check(rc == 0 && gone == "yes" && alive == "yes", || {
        format!("modprobe -r nf_conntrack while ctrace ran: exit {rc}, module gone: {gone}, ctrace alive: {alive}")
    });
    let unloads = module_events(events, "unload", "nf_conntrack");
    let loads = module_events(events, "load", "nf_conntrack");
    t.check(unloads.len() == 1 && loads.len() == 1, || {
        format!(
            "{} unload and {} load events for nf_conntrack, expected one each",
            unloads.len(),
            loads.len()
        )
    });
    if let Some(u) = unloads.first() {
        let cmdline = text(&u["cmdline"]);
        let named = cmdline.contains("modprobe") && cmdline.contains(" -r ") && cmdline.ends_with("nf_conntrack");
        t.check(u["comm"] == "modprobe" && named && u["pid"].is_u64(), || {
            format!("the unload event does not name modprobe -r nf_conntrack: {u}")
        });
        t.facts
            .push(format!("unloaded by {}[{}] `{cmdline}`", text(&u["comm"]), u["pid"]));
    }
    if let Some(l) = loads.first() {
        let cmdline = text(&l["cmdline"]);
        let named = cmdline.contains("modprobe") && !cmdline.contains(" -r ") && cmdline.ends_with("nf_conntrack");
        t.check(l["comm"] == "modprobe" && named && l["pid"].is_u64(), || {
            format!("the load event does not name modprobe nf_conntrack: {l}")
        });
    }
    if let (Some(u), Some(l)) = (unloads.first(), loads.first()) {
        let (tu, tl) = (parse_ts(&text(&u["ts"])), parse_ts(&text(&l["ts"])));
        t.check(tu.is_some() && tl.is_some() && tu < tl, || {
            format!("the load ({}) does not follow the unload ({})", l["ts"], u["ts"])
        });
    }
    let reattached: Vec<&Value> = events_of(events, "reattached")
        .filter(|v| v["module"] == "nf_conntrack")
        .collect();
    t.check(reattached.len() == 1, || {
        format!("{} reattached events for nf_conntrack, expected one", reattached.len())
    });
    Ok(reattached.first().and_then(|r| parse_ts(&text(&r["ts"]))))
}

fn resets(events: &[Value]) -> Vec<&Value> {
    events_of(events, "sysctl_reset").collect()
}

/// The checks of one case: failures go into the result; an `Err` is data the guest did not report.
type CaseCheck = fn(&Guest, &mut TestResult) -> Result<()>;

fn evaluate(g: &Guest) -> Vec<TestResult> {
    let cases: [(&str, CaseCheck); 5] = [
        ("a", case_a),
        ("b", case_b),
        ("c", case_c),
        ("d", case_d),
        ("e", case_e),
    ];
    cases
        .iter()
        .map(|(name, check)| {
            let mut t = TestResult::new(name);
            if let Err(err) = check(g, &mut t) {
                t.failures.push(format!("{err:#}"));
            }
            t
        })
        .collect()
}

/// a: raised max and timeout, unload + reload → unload/load events, one reset per key with the right fields.
fn case_a(g: &Guest, t: &mut TestResult) -> Result<()> {
    let events = g.events("a")?;
    check_session(g, "a", &events, t);
    check_reload(g, "a", &events, t)?;
    let after_max = g.value("a.after.max")?;
    let after_timeout = g.value("a.after.timeout")?;
    let (netns_resets, resets): (Vec<&Value>, Vec<&Value>) =
        resets(&events).into_iter().partition(|r| r.get("netns").is_some());
    // The other netns: its own timeout, reset and reported with its inode; no global key twice.
    let netns = g.number("a.netns")?;
    t.check(
        netns_resets.len() == 1
            && netns_resets[0]["netns"] == netns
            && netns_resets[0]["key"] == TIMEOUT_KEY
            && netns_resets[0]["before"] == NETNS_TIMEOUT.to_string().as_str()
            && netns_resets[0]["after"] == DEFAULT_TIMEOUT.to_string().as_str(),
        || format!("expected one reset of {TIMEOUT_KEY} in netns {netns} from {NETNS_TIMEOUT}, got {netns_resets:?}"),
    );
    t.facts.push(format!(
        "netns {netns}: timeout {NETNS_TIMEOUT} -> {DEFAULT_TIMEOUT} reported"
    ));
    let keys: BTreeSet<String> = resets.iter().map(|r| text(&r["key"])).collect();
    let expected: BTreeSet<String> = [MAX_KEY, TIMEOUT_KEY].map(String::from).into();
    t.check(keys == expected && resets.len() == 2, || {
        format!(
            "sysctl_reset events for {keys:?} ({} events), expected one each for {expected:?}",
            resets.len()
        )
    });
    let persisted = format!("{SYSCTL_FILE}:{SYSCTL_FILE_LINE}");
    let expectations = [
        (
            MAX_KEY,
            RAISED_MAX.to_string(),
            after_max.to_string(),
            Value::from(persisted),
        ),
        (
            TIMEOUT_KEY,
            RAISED_TIMEOUT.to_string(),
            DEFAULT_TIMEOUT.to_string(),
            Value::Null,
        ),
    ];
    for (key, before, after, persisted_in) in expectations {
        let Some(r) = resets.iter().find(|r| r["key"] == key) else {
            continue;
        };
        let fix = text(&r["fix"]);
        t.check(
            r["before"] == before.as_str()
                && r["after"] == after.as_str()
                && r["default"] == true
                && r["persisted_in"] == persisted_in
                && !fix.is_empty(),
            || {
                format!(
                    "the reset of {key} should say before {before}, after {after}, default true, persisted_in \
                     {persisted_in}, with a fix: {r}"
                )
            },
        );
        t.facts.push(format!(
            "{} {} -> {} (default {}, persisted_in {})",
            key.trim_start_matches("net.netfilter."),
            text(&r["before"]),
            text(&r["after"]),
            r["default"],
            r["persisted_in"]
        ));
    }
    t.check(after_timeout == DEFAULT_TIMEOUT.to_string(), || {
        format!("the guest's timeout after the reload is {after_timeout}, not the default {DEFAULT_TIMEOUT}")
    });
    // The text output says the same in words.
    let text_exit = g.value("a.text.exit").unwrap_or("?");
    t.check(text_exit == "0", || format!("ctrace (text) exited with {text_exit}"));
    let lines = g.block("a.txt").unwrap_or_default();
    for needle in [
        "MODULE nf_conntrack unloaded by modprobe".to_string(),
        "MODULE nf_conntrack loaded by modprobe".to_string(),
        format!("SYSCTL RESET by the nf_conntrack reload: {MAX_KEY} was {RAISED_MAX}"),
        format!("SYSCTL RESET by the nf_conntrack reload: {TIMEOUT_KEY} was {RAISED_TIMEOUT}"),
        "nf_conntrack is back".to_string(),
    ] {
        t.check(lines.iter().any(|l| l.contains(&needle)), || {
            format!("the text output has no line with {needle:?}")
        });
    }
    Ok(())
}

/// b: an unload while xt_conntrack holds nf_conntrack → unload_failed naming the holder, nothing reset.
fn case_b(g: &Guest, t: &mut TestResult) -> Result<()> {
    let events = g.events("b")?;
    check_session(g, "b", &events, t);
    let rc = g.number("b.unload.rc")?;
    let live = g.value("b.live")?;
    t.check(rc != 0 && live == "live", || {
        format!("modprobe -r nf_conntrack exited {rc} and the module is {live:?}: it should have failed")
    });
    t.check(g.value("b.after.max")? == RAISED_MAX.to_string(), || {
        "nf_conntrack_max changed although the module stayed".to_string()
    });
    let all_failed = module_events(&events, "unload_failed", "nf_conntrack");
    let (by_kmod, failed): (Vec<_>, Vec<_>) = all_failed.into_iter().partition(|f| f["refused_by_tool"] == true);
    t.check(failed.len() == 1 && by_kmod.len() == 1, || {
        format!(
            "{} unload_failed events from the kernel and {} from kmod for nf_conntrack, expected one each",
            failed.len(),
            by_kmod.len()
        )
    });
    let kmod_rc = g.number("b.kmod.rc")?;
    t.check(kmod_rc != 0, || {
        format!("kmod's modprobe -r exited {kmod_rc}: it should have refused")
    });
    if let Some(f) = by_kmod.first() {
        let holders: Vec<String> = f["holders"]
            .as_array()
            .map(|h| h.iter().map(text).collect())
            .unwrap_or_default();
        t.check(
            holders.iter().any(|h| h == "xt_conntrack") && f["comm"] == "modprobe",
            || format!("kmod's refusal does not name modprobe and xt_conntrack: {f}"),
        );
        t.facts.push(format!(
            "kmod refused with exit status {} holders {holders:?}",
            f["exit_status"]
        ));
    }
    if let Some(f) = failed.first() {
        let errno = f["errno"].as_i64();
        let holders: Vec<String> = f["holders"]
            .as_array()
            .map(|h| h.iter().map(text).collect())
            .unwrap_or_default();
        t.check(
            errno == Some(i64::from(libc::EAGAIN)) || errno == Some(i64::from(libc::EBUSY)),
            || format!("errno {} is neither EAGAIN nor EBUSY", f["errno"]),
        );
        t.check(holders.iter().any(|h| h == "xt_conntrack"), || {
            format!("the holders {holders:?} do not name xt_conntrack")
        });
        t.check(f["comm"] == "modprobe", || {
            format!("the event does not name modprobe: {f}")
        });
        t.facts.push(format!(
            "unload_failed errno {} holders {holders:?} by {}[{}]",
            f["errno"],
            text(&f["comm"]),
            f["pid"]
        ));
    }
    let unloads = module_events(&events, "unload", "nf_conntrack");
    t.check(unloads.is_empty(), || {
        format!("{} unload events for nf_conntrack", unloads.len())
    });
    let resets = resets(&events);
    t.check(resets.is_empty(), || {
        format!(
            "{} sysctl_reset events without a reload, e.g. {}",
            resets.len(),
            resets[0]
        )
    });
    Ok(())
}

/// c: hashsize as a module option: the reload keeps it and ctrace does not call it a reset.
fn case_c(g: &Guest, t: &mut TestResult) -> Result<()> {
    let events = g.events("c")?;
    check_session(g, "c", &events, t);
    check_reload(g, "c", &events, t)?;
    let (before, after) = (g.number("c.hashsize.before")?, g.number("c.hashsize.after")?);
    t.check(before == HASHSIZE && after == HASHSIZE, || {
        format!("hashsize was {before} before and {after} after the reload, expected {HASHSIZE} both times")
    });
    let resets = resets(&events);
    let wrong: Vec<&&Value> = resets
        .iter()
        .filter(|r| r["key"] == HASHSIZE_KEY || r["key"] == BUCKETS_KEY)
        .collect();
    t.check(wrong.is_empty(), || {
        format!("hashsize kept its value but ctrace reported a reset: {}", wrong[0])
    });
    // The raised max is reset as usual: it shows that ctrace did compare the values after this reload.
    let after_max = g.value("c.after.max")?;
    match resets.iter().find(|r| r["key"] == MAX_KEY) {
        Some(r) => {
            // With a hashsize option the kernel's default max is 8 x hashsize, not its RAM-based value.
            t.check(
                r["before"] == RAISED_MAX.to_string().as_str() && r["after"] == after_max && r["default"] == true,
                || {
                    format!(
                        "the reset of {MAX_KEY} should say before {RAISED_MAX}, after {after_max}, default true: {r}"
                    )
                },
            );
            t.check(after_max == (8 * HASHSIZE).to_string(), || {
                format!(
                    "nf_conntrack_max is {after_max} after the reload, not 8 x hashsize = {}",
                    8 * HASHSIZE
                )
            });
            t.facts.push(format!(
                "hashsize {before} -> {after}, not reported; nf_conntrack_max {} -> {} (default {})",
                text(&r["before"]),
                text(&r["after"]),
                r["default"]
            ));
        }
        None => t.failures.push(format!(
            "no sysctl_reset for {MAX_KEY} (raised to {RAISED_MAX}, {after_max} after the reload)"
        )),
    }
    t.check(resets.len() == 1, || {
        let keys: Vec<String> = resets.iter().map(|r| text(&r["key"])).collect();
        format!("sysctl_reset events for {keys:?}, expected only {MAX_KEY}")
    });
    Ok(())
}

/// d: table-full drops before and after a reload; ctrace's totals equal the kernel counter deltas of both module
/// instances.
fn case_d(g: &Guest, t: &mut TestResult) -> Result<()> {
    let events = g.events("d")?;
    check_session(g, "d", &events, t);
    let reattached = check_reload(g, "d", &events, t)?;
    let first = g.counters("d.stats1")?.since(&g.counters("d.stats0")?)?;
    let second = g.counters("d.stats3")?.since(&g.counters("d.stats2")?)?;
    let total = first.plus(&second);
    let summary = events_of(&events, "summary").next().cloned().unwrap_or(Value::Null);
    let drops = &summary["drops"];
    let full: Vec<&Value> = events_of(&events, "drop")
        .filter(|v| v["reason"] == "table_full")
        .collect();
    let after = match reattached {
        Some(r) => full
            .iter()
            .filter(|v| parse_ts(&text(&v["ts"])).is_some_and(|ts| ts > r))
            .count() as u64,
        None => 0,
    };
    t.facts.push(format!(
        "kernel drop +{} before and +{} after the reload, ctrace {} ({} events, {after} after reattached), \
         early_drop kernel +{} ctrace {}",
        first.drop,
        second.drop,
        drops["table_full"],
        full.len(),
        total.early_drop,
        drops["early_drop"]
    ));
    t.check(first.drop > 0 && second.drop > 0, || {
        format!(
            "the kernel counted {} and {} table-full drops: both phases need some",
            first.drop, second.drop
        )
    });
    t.check(drops["table_full"].as_u64() == Some(total.drop), || {
        format!(
            "summary drops.table_full is {}, the kernel's drop deltas sum to {}",
            drops["table_full"], total.drop
        )
    });
    t.check(full.len() as u64 == total.drop, || {
        format!(
            "{} table_full events for kernel drop deltas summing to {}",
            full.len(),
            total.drop
        )
    });
    t.check(after == second.drop, || {
        format!(
            "{after} table_full events after the reattached event, the reloaded module counted {}",
            second.drop
        )
    });
    t.check(drops["early_drop"].as_u64() == Some(total.early_drop), || {
        format!(
            "summary drops.early_drop is {}, the kernel's early_drop deltas sum to {}",
            drops["early_drop"], total.early_drop
        )
    });
    let by_netns = summary["by_netns"].as_array().map(Vec::as_slice).unwrap_or_default();
    for (key, kernel) in [("drop", total.drop), ("early_drop", total.early_drop)] {
        let got: Option<u64> = by_netns.iter().map(|n| n["kernel_counters"][key].as_u64()).sum();
        t.check(got == Some(kernel), || {
            format!("summary by_netns kernel_counters.{key} is {got:?}, the kernel's deltas sum to {kernel}")
        });
    }
    let resets = resets(&events);
    t.check(resets.is_empty(), || {
        format!(
            "nf_conntrack_max was restored 2 s before the reload, yet ctrace reported a reset: {}",
            resets[0]
        )
    });
    Ok(())
}

/// e: a sysctl write by ctrace-testkit is attributed to it (pid, comm and uid from 6.1 on, none before).
fn case_e(g: &Guest, t: &mut TestResult) -> Result<()> {
    let events = g.events("e")?;
    check_session(g, "e", &events, t);
    let write = g.value("e.write")?;
    let fields = key_values(write).with_context(|| "the guest's e.write")?;
    let field = |k: &str| {
        fields
            .get(k)
            .copied()
            .with_context(|| format!("the guest's e.write {write:?} has no {k}"))
    };
    let (old, pid) = (field("old")?, field("pid")?);
    let named = g.names_sysctl_writers()?;
    let writes: Vec<&Value> = events_of(&events, "sysctl_write")
        .filter(|v| v["key"] == MAX_KEY && v["new"] == WRITTEN_MAX.to_string().as_str())
        .collect();
    t.check(writes.len() == 1, || {
        format!(
            "{} sysctl_write events of {MAX_KEY} = {WRITTEN_MAX}, expected one",
            writes.len()
        )
    });
    if let Some(w) = writes.first() {
        t.check(w["old"] == old, || {
            format!("the write event's old value is not {old}: {w}")
        });
        if named {
            t.check(
                w["comm"] == TESTKIT
                    && w["pid"].as_u64().map(|p| p.to_string()).as_deref() == Some(pid)
                    && w["uid"] == 0,
                || format!("the write event does not name {TESTKIT}[{pid}] uid 0: {w}"),
            );
        } else {
            t.check(w.get("pid").is_none() && w.get("comm").is_none(), || {
                format!("this kernel gives sysctl programs no task helpers, yet the event names a process: {w}")
            });
        }
        t.facts.push(format!(
            "{} {} -> {} by {}",
            text(&w["key"]).trim_start_matches("net.netfilter."),
            text(&w["old"]),
            text(&w["new"]),
            if named {
                format!("{}[{}] uid {}", text(&w["comm"]), w["pid"], w["uid"])
            } else {
                "an unnamed process (no task helpers before 6.1)".to_string()
            }
        ));
    }
    // The restore by busybox sysctl is seen too.
    let restores = events_of(&events, "sysctl_write")
        .filter(|v| v["key"] == MAX_KEY && v["old"] == WRITTEN_MAX.to_string().as_str())
        .count();
    t.check(restores == 1, || {
        format!("{restores} sysctl_write events restoring {MAX_KEY} from {WRITTEN_MAX}, expected one")
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{is_kernel_message, parse_ldd};

    fn mark(line: &str) -> String {
        format!("{MARK} {line}\n")
    }

    #[test]
    fn stats_lines_parse_and_subtract() {
        let c = Counters::parse("drop=291 early_drop=2 insert_failed=0 invalid=20").unwrap();
        assert_eq!(c.drop, 291);
        let swapped = Counters::parse(" invalid=20 insert_failed=0  early_drop=2 drop=291\r").unwrap();
        assert_eq!(swapped, c);
        assert_eq!(c.since(&Counters::default()).unwrap(), c);
        assert_eq!(c.plus(&c).drop, 582);
        let err = Counters::default().since(&c).unwrap_err().to_string();
        assert!(err.contains("drop counter went backwards (291 -> 0)"), "{err}");
        let err = Counters::parse("drop=1 early_drop=2 invalid=3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no insert_failed"), "{err}");
        let err = Counters::parse("drop=x early_drop=2 insert_failed=0 invalid=3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("drop is not a number"), "{err}");
        assert!(Counters::parse("").is_err());
        assert!(Counters::parse("drop 1").is_err());
    }

    #[test]
    fn key_values_parse() {
        let kv = key_values("old=7680 new=131072 pid=123").unwrap();
        assert_eq!(kv["old"], "7680");
        assert_eq!(kv["pid"], "123");
        assert!(key_values("old=1 junk").is_err());
        assert!(key_values("  ").is_err());
    }

    #[test]
    fn timestamps_parse_to_comparable_nanoseconds() {
        assert_eq!(parse_ts("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_ts("1970-01-02T00:00:01.5Z"), Some(86_401_500_000_000));
        // 2000-03-01 is day 11017.
        assert_eq!(parse_ts("2000-03-01T00:00:00Z"), Some(11_017 * 86_400 * 1_000_000_000));
        // Fractions of different lengths compare as numbers, not as text.
        let short = parse_ts("2026-11-22T00:35:30.08Z").unwrap();
        let long = parse_ts("2026-11-22T00:35:30.080527746Z").unwrap();
        assert!(short < long);
        assert_eq!(long - short, 527_746);
        assert!(parse_ts("2026-11-22T23:59:59.9Z").unwrap() < parse_ts("2026-11-23T00:00:00Z").unwrap());
        assert_eq!(parse_ts("2026-11-22 00:35:30Z"), None);
        assert_eq!(parse_ts("2026-13-22T00:35:30Z"), None);
        assert_eq!(parse_ts("2026-11-22T00:35:30"), None);
        assert_eq!(parse_ts("2026-11-22T00:35:30.1234567890Z"), None);
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.1.0-56-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.10.0-35-cloud-amd64"), Some((5, 10)));
        assert_eq!(kernel_version("6.12.57+deb12-amd64"), Some((6, 12)));
        assert_eq!(kernel_version("x"), None);
    }

    #[test]
    fn markers_and_blocks_are_extracted() {
        let output = [
            "init: noise before\n".to_string(),
            mark("kernel 6.1.0-56-amd64"),
            mark("d.stats0 drop=0 early_drop=0 insert_failed=0 invalid=0\r"),
            "@@ctrace-reloadkernel not-a-marker\n".to_string(),
            mark("kernel second-value-ignored"),
            mark("begin a.json"),
            "{\"event\":\"mode\",\"mode\":\"kprobe\"}\n".to_string(),
            "[   12.345678] nf_conntrack: table full, dropping packet\n".to_string(),
            "\n".to_string(),
            "{\"event\":\"summary\"}\n".to_string(),
            mark("end a.json"),
            mark("begin unterminated"),
            "x\n".to_string(),
        ]
        .concat();
        let g = Guest::parse(&output);
        assert_eq!(g.value("kernel").unwrap(), "6.1.0-56-amd64");
        assert_eq!(g.counters("d.stats0").unwrap(), Counters::default());
        assert_eq!(g.values.len(), 2);
        let events = g.events("a").unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["mode"], "kprobe");
        assert_eq!(g.block("unterminated"), None);
        let err = g.events("b").unwrap_err().to_string();
        assert!(err.contains("no ctrace output for case b"), "{err}");
        let err = parse_events(&["{\"event\":\"drop\"}", "garbage"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("non-JSON line: garbage"), "{err}");
        assert!(g.names_sysctl_writers().unwrap());
        let stopped = Guest::parse(&[mark("kernel 5.10.0-35-cloud-amd64"), mark("error case a: boom")].concat());
        assert!(!stopped.names_sysctl_writers().unwrap());
        let err = stopped.value("a.exit").unwrap_err().to_string();
        assert_eq!(
            err,
            "the guest did not report a.exit (the guest script stopped: case a: boom)"
        );
    }

    #[test]
    fn kernel_messages_are_recognised() {
        assert!(is_kernel_message("[    7.123456] random: crng init done"));
        assert!(!is_kernel_message("[1,2,3]"));
        assert!(!is_kernel_message("{\"event\":\"drop\"}"));
    }

    #[test]
    fn ldd_output_lists_libraries_and_the_loader() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibxtables.so.12 => /lib/x86_64-linux-gnu/libxtables.so.12 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            ["/lib/x86_64-linux-gnu/libxtables.so.12", "/lib64/ld-linux-x86-64.so.2"]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn the_script_has_no_placeholders_left() {
        let script = guest_script();
        assert!(!script.replace(MARK, "").contains('@'), "{script}");
        assert!(script.contains("options nf_conntrack hashsize=16384"));
        assert!(script.contains("net.netfilter.nf_conntrack_max = 1048576\\n' > /etc/sysctl.d/90-ct.conf"));
        // The max line is the file's second line, as SYSCTL_FILE_LINE says.
        assert!(script.contains("printf '# written by the ctrace reload VM test\\nnet.netfilter.nf_conntrack_max"));
    }

    /// A report as a 6.1 guest prints it for cases a, b and e: consistent events pass, wrong ones fail.
    fn report(reset_default: bool, errno: i32) -> String {
        let ts = |s: u32| format!("2026-11-22T00:00:{s:02}.5Z");
        let module = |action: &str, s: u32, extra: &str| {
            format!(
                r#"{{"event":"module","ts":"{}","action":"{action}","name":"nf_conntrack"{extra},"pid":90,"uid":0,"comm":"modprobe","ppid":1,"parent_comm":"sh","cmdline":"/sbin/modprobe {}nf_conntrack"}}"#,
                ts(s),
                if action == "load" { "" } else { "-r " }
            )
        };
        let reset = |key: &str, before: &str, after: &str, persisted: &str| {
            format!(
                r#"{{"event":"sysctl_reset","ts":"{}","key":"{key}","before":"{before}","after":"{after}","default":{reset_default},"persisted_in":{persisted},"fix":"persist it"}}"#,
                ts(5)
            )
        };
        let summary = r#"{"event":"summary","lost":0,"drops":{"table_full":0,"early_drop":0}}"#;
        let mut out = [
            "kernel 6.1.0-56-amd64",
            "e.write old=7680 new=131072 pid=77",
            "e.exit 0",
            "begin e.json",
        ]
        .map(mark)
        .concat();
        out += &format!(
            r#"{{"event":"sysctl_write","ts":"{}","key":"{MAX_KEY}","old":"7680","new":"131072","pid":77,"comm":"ctrace-testkit","uid":0}}"#,
            ts(1)
        );
        out += "\n";
        out += &format!(
            r#"{{"event":"sysctl_write","ts":"{}","key":"{MAX_KEY}","old":"131072","new":"7680","pid":78,"comm":"sysctl","uid":0}}"#,
            ts(2)
        );
        out += &format!("\n{summary}\n");
        out += &[
            "end e.json",
            "b.unload.rc 1",
            "b.kmod.rc 1",
            "b.live live",
            "b.after.max 1048576",
            "b.exit 0",
            "begin b.json",
        ]
        .map(mark)
        .concat();
        out += &module(
            "unload_failed",
            3,
            &format!(r#","errno":{errno},"holders":["xt_conntrack"]"#),
        );
        out += "\n";
        out += &module(
            "unload_failed",
            3,
            r#","errno":null,"holders":["xt_conntrack"],"refused_by_tool":true,"exit_status":1"#,
        );
        out += &format!("\n{summary}\n");
        out += &[
            "end b.json",
            "a.netns 4026532300",
            "a.unload.rc 0",
            "a.gone yes",
            "a.ctrace_alive yes",
            "a.after.max 7680",
            "a.after.timeout 432000",
            "a.exit 0",
            "a.text.exit 0",
            "begin a.json",
        ]
        .map(mark)
        .concat();
        for line in [
            module("unload", 3, ""),
            module("load", 4, ""),
            reset(MAX_KEY, "1048576", "7680", "\"/etc/sysctl.d/90-ct.conf:2\""),
            reset(TIMEOUT_KEY, "3600", "432000", "null"),
            format!(
                r#"{{"event":"sysctl_reset","ts":"{}","key":"{TIMEOUT_KEY}","netns":4026532300,"before":"7200","after":"432000","default":{reset_default},"persisted_in":null,"fix":"set it again"}}"#,
                ts(5)
            ),
            format!(
                r#"{{"event":"reattached","ts":"{}","module":"nf_conntrack","probes":["a"]}}"#,
                ts(6)
            ),
            summary.to_string(),
        ] {
            out += &format!("{line}\n");
        }
        out += &[mark("end a.json"), mark("begin a.txt")].concat();
        for line in [
            "00:00:03.500  >>> MODULE nf_conntrack unloaded by modprobe[90] (uid 0, parent sh[1]): modprobe -r nf_conntrack",
            "00:00:04.500  >>> MODULE nf_conntrack loaded by modprobe[90] (uid 0, parent sh[1]): modprobe nf_conntrack",
            "00:00:05.500  >>> SYSCTL RESET by the nf_conntrack reload: net.netfilter.nf_conntrack_max was 1048576, is now 7680",
            "00:00:05.500  >>> SYSCTL RESET by the nf_conntrack reload: net.netfilter.nf_conntrack_tcp_timeout_established was 3600, is now 432000",
            "00:00:06.500  >>> nf_conntrack is back: kprobes re-attached to a",
        ] {
            out += &format!("{line}\n");
        }
        out += &mark("end a.txt");
        out
    }

    #[test]
    fn a_consistent_report_passes_and_wrong_fields_fail() {
        let tests = evaluate(&Guest::parse(&report(true, libc::EAGAIN)));
        let by_name = |name: &str| tests.iter().find(|t| t.name == name).unwrap();
        for name in ["a", "b", "e"] {
            assert!(by_name(name).passed(), "{}", by_name(name).line());
        }
        // c and d did not run: they fail with a sentence, not a panic.
        assert!(
            by_name("c").line().contains("no ctrace output for case c"),
            "{}",
            by_name("c").line()
        );

        let tests = evaluate(&Guest::parse(&report(false, libc::ENOENT)));
        let a = tests.iter().find(|t| t.name == "a").unwrap();
        assert!(a.line().contains("default true"), "{}", a.line());
        let b = tests.iter().find(|t| t.name == "b").unwrap();
        assert!(b.line().contains("errno 2 is neither EAGAIN nor EBUSY"), "{}", b.line());

        // A 5.10 guest must not name the writer.
        let old = report(true, libc::EBUSY).replace("kernel 6.1.0-56-amd64", "kernel 5.10.0-35-cloud-amd64");
        let tests = evaluate(&Guest::parse(&old));
        let e = tests.iter().find(|t| t.name == "e").unwrap();
        assert!(e.line().contains("no task helpers, yet"), "{}", e.line());
    }
}
