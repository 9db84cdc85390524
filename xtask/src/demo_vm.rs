//! `cargo xtask demo --vm [5.10|6.1|6.12]`: the reload trap of issue 3 in a Debian guest, with ctrace's text output.
//!
//! The guest runs the incident: nf_conntrack_max raised to 1048576 and persisted in /etc/sysctl.d, a traffic peak
//! that fits, `service iptables stop` with IPTABLES_MODULES_UNLOAD=yes (which unloads nf_conntrack), `service
//! iptables start` (which loads it back with its defaults), and the same peak again, which now overflows the table.
//! ctrace runs in text mode throughout; its output, the demo's narration and the service's messages go to one file,
//! in the order they happened, which the host prints when the guest is done.

use crate::debian::{self, KernelSpec};
use crate::guest::{GUEST_TESTKIT, marker_block, marker_values};
use crate::vm::{self, VmRun};
use crate::vm_reload_tests::GUEST_CTRACE;
use anyhow::{Context, Result, bail, ensure};
use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MARK: &str = "@@ctrace-demo";
/// The whole guest, boot included (about a minute under TCG).
const VM_TIMEOUT: Duration = Duration::from_secs(300);
/// A smaller guest has a smaller default table (4096 entries on 6.1, 16384 on 5.10), so the peak is quick to make.
const MEMORY_MB: u32 = 512;
const RAISED_MAX: u64 = 1_048_576;
/// ctrace's --rate-limit: above this many drops a second it prints per-second aggregates (keeps the demo short).
const RATE_LIMIT: u32 = 10;
const ATTACH_TIMEOUT_S: u32 = 60;
const REATTACH_TIMEOUT_S: u32 = 30;
const STOP_TIMEOUT_S: u32 = 60;
/// The host's kmod (Debian package kmod), a multi-call binary: the guest gets it as modprobe and lsmod, so that the
/// service script's `modprobe -r` behaves as on RHEL (busybox's modprobe differs: it tries to unload dependencies
/// that are still in use, and fails).
const KMOD: &str = "/usr/bin/kmod";
pub(crate) const GUEST_KMOD_DIR: &str = "/usr/local/sbin";

/// Boots a guest with `kernel` ("5.10", "6.1" or "6.12"), runs the demo and prints ctrace's output.
pub fn run(ws: &Path, kernel: &str) -> Result<()> {
    let spec: KernelSpec = kernel.parse()?;
    crate::setup::ensure_debian_packages(&["iptables", "kmod"])?;
    let mut files = crate::vm_reload_tests::guest_files(ws)?;
    files.extend(kmod_files()?);
    // iptables and kmod share libraries (libc, the loader): one copy each.
    let mut seen = BTreeSet::new();
    files.retain(|(_, guest)| seen.insert(guest.clone()));
    let kernel = debian::fetch(spec, &debian::default_cache_root())?;
    let mut run = VmRun::new(kernel.clone(), guest_script());
    run.files = files;
    run.modules = ["nf_conntrack", "xt_conntrack", "iptable_filter"]
        .map(String::from)
        .to_vec();
    run.timeout = VM_TIMEOUT;
    run.memory_mb = MEMORY_MB;
    eprintln!(
        "demo --vm {}: booting {} ({}) under TCG; the demo takes about a minute",
        spec.short_name(),
        kernel.version,
        kernel.package
    );
    let started = Instant::now();
    let outcome = vm::run(&run)?;
    let output = outcome.script_output();
    let values = marker_values(&output, MARK);
    let Some(lines) = marker_block(&output, MARK, "demo") else {
        outcome.ensure_passed()?;
        bail!(
            "the guest printed no demo output (full console log: {})",
            outcome.log_path.display()
        );
    };
    let highlight = std::io::stdout().is_terminal();
    println!(
        "=== the nf_conntrack reload trap in a Debian {} guest (kernel {}, {MEMORY_MB} MiB): `ctrace run --rate-limit \
         {RATE_LIMIT}`, the demo's steps and the iptables service's messages ===",
        spec.short_name(),
        values.get("kernel").map_or("?", String::as_str)
    );
    for line in lines.iter().filter(|l| !crate::guest::is_kernel_message(l)) {
        if highlight && line.contains(" >>> ") {
            println!("\x1b[1;33m{line}\x1b[0m");
        } else if highlight && line.starts_with("demo: ") {
            println!("\x1b[1m{line}\x1b[0m");
        } else {
            println!("{line}");
        }
    }
    println!(
        "=== end of the demo ({:.0}s, console log: {}) ===",
        started.elapsed().as_secs_f64(),
        outcome.log_path.display()
    );
    if let Some(error) = values.get("error") {
        bail!("the demo stopped early: {error}");
    }
    outcome.ensure_passed().context("the demo guest failed")
}

/// The host's kmod as the guest's `modprobe` and `lsmod` in /usr/local/sbin, with the shared libraries it loads. The
/// guest calls them by path: busybox sh prefers its own applets of the same names to anything on PATH.
pub(crate) fn kmod_files() -> Result<Vec<(PathBuf, String)>> {
    ensure!(
        Path::new(KMOD).is_file(),
        "{KMOD} does not exist: install the Debian package kmod"
    );
    let out = crate::setup::capture(Command::new("ldd").arg(KMOD))
        .with_context(|| format!("could not list the libraries of {KMOD}"))?;
    let libraries: BTreeSet<String> = crate::guest::parse_ldd(&out)
        .with_context(|| format!("ldd {KMOD}: a library is missing"))?
        .into_iter()
        .collect();
    let mut files: Vec<(PathBuf, String)> = ["modprobe", "lsmod"]
        .map(|name| (PathBuf::from(KMOD), format!("{GUEST_KMOD_DIR}/{name}")))
        .to_vec();
    files.extend(libraries.into_iter().map(|lib| (PathBuf::from(&lib), lib)));
    Ok(files)
}

/// The guest's script (busybox sh). Every wait is bounded.
fn guest_script() -> String {
    const SCRIPT: &str = r#"# ctrace demo VM, generated by xtask/src/demo_vm.rs.
M=@MARK@
KIT=@TESTKIT@
CT=@CTRACE@
LOG=/tmp/demo.txt
MAXF=/proc/sys/net/netfilter/nf_conntrack_max
mark() { echo "$M $*"; }
say() { echo "demo: $*" >>$LOG; }
finish() {
    [ -n "$2" ] && mark error "$2"
    mark begin demo
    cat $LOG
    mark end demo
    exit "$1"
}
alive() {
    state=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)
    [ -n "$state" ] && [ "$state" != Z ]
}
# wait_for PATTERN SECONDS: until a line of the log matches PATTERN; fails when ctrace ends or time runs out.
wait_for() {
    i=0
    until grep -q "$1" $LOG; do
        alive "$ct" || return 1
        i=$((i + 1))
        [ "$i" -gt $(($2 * 4)) ] && return 1
        sleep 0.25
    done
}
stop_ctrace() {
    kill -INT "$ct" 2>/dev/null
    ( sleep @STOP_S@; kill -KILL "$ct" 2>/dev/null ) &
    watchdog=$!
    wait "$ct"
    kill "$watchdog" 2>/dev/null
}
# peak N: N TCP connections held open for a moment (established ones are ASSURED entries, which early_drop cannot
# evict: past nf_conntrack_max new connections are dropped).
peak() {
    result=$($KIT tcp-peak --count "$1" --port 80 --wait-ms 3000 --hold-ms 500 2>&1)
    say "  -> $result (nf_conntrack_count $(cat /proc/sys/net/netfilter/nf_conntrack_count) of max $(cat $MAXF))"
}

mark kernel "$(uname -r)"
: >$LOG
# kmod's modprobe for everyone, the kernel's module autoloading included.
echo @KMOD_DIR@/modprobe >/proc/sys/kernel/modprobe
for tool in iptables iptables-restore iptables-save; do ln -sf xtables-legacy-multi /usr/sbin/$tool; done
mkdir -p /etc/sysconfig /etc/sysctl.d /etc/init.d

# The machine of the incident: RHEL's iptables service with its default IPTABLES_MODULES_UNLOAD=yes, and rules
# that use conntrack.
cat >/etc/sysconfig/iptables-config <<'EOF'
# Unload modules on restart and stop
IPTABLES_MODULES_UNLOAD="yes"
IPTABLES_SAVE_ON_STOP="no"
IPTABLES_SYSCTL_LOAD_LIST=""
EOF
cat >/etc/sysconfig/iptables <<'EOF'
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A OUTPUT -m conntrack --ctstate NEW,RELATED,ESTABLISHED -j ACCEPT
COMMIT
EOF
cat >/etc/init.d/iptables <<'EOF'
#!/bin/sh
# /etc/init.d/iptables: a small, faithful imitation of RHEL's iptables service (iptables.init of the
# iptables-services package) for the ctrace demo. Debian has no iptables-services package, so this copies what its
# start() and stop() do: start() applies /etc/sysconfig/iptables with iptables-restore and re-applies only the
# sysctl keys in IPTABLES_SYSCTL_LOAD_LIST; stop() sets the policies to ACCEPT, flushes and deletes the chains and,
# with IPTABLES_MODULES_UNLOAD=yes (the default), unloads the table modules and ip_tables, then x_tables, nf_nat and
# nf_conntrack. rmmod_r first unloads every module that holds the one it removes (lsmod's "Used by"), then runs
# modprobe -r; modprobe and lsmod are kmod's, as on RHEL. Differences: POSIX sh instead of bash arrays and `let`,
# only the filter table's policies, and plain [  OK  ] / [FAILED] instead of the initscripts functions.
# kmod's modprobe and lsmod, as on RHEL (busybox sh would run its own applets of these names instead).
modprobe() { @KMOD_DIR@/modprobe "$@"; }
lsmod() { @KMOD_DIR@/lsmod "$@"; }
IPTABLES=iptables
IPV=${IPTABLES%tables}
IPTABLES_DATA=/etc/sysconfig/$IPTABLES
IPTABLES_CONFIG=/etc/sysconfig/${IPTABLES}-config
PROC_IPTABLES_NAMES=/proc/net/${IPV}_tables_names
IPTABLES_MODULES_UNLOAD="yes"
IPTABLES_SYSCTL_LOAD_LIST=""
[ -f "$IPTABLES_CONFIG" ] && . "$IPTABLES_CONFIG"
NF_MODULES="$(lsmod | awk "/^${IPV}table_/ {print \$1}") ${IPV}_tables"
NF_MODULES_COMMON="x_tables nf_nat nf_conntrack"
ok_or_failed() { if [ "$1" -eq 0 ]; then echo "[  OK  ]"; else echo "[FAILED]"; fi; }

rmmod_r() {
    local mod=$1
    local ret=0
    local ref=
    ref=$(lsmod | awk "/^${mod}/ { print \$4; }" | tr ',' ' ')
    for i in $ref; do
        rmmod_r $i
        ret=$((ret + $?))
    done
    if grep -q "^${mod}" /proc/modules; then
        modprobe -r $mod >/dev/null 2>&1
        res=$?
        [ $res -eq 0 ] || echo -n " $mod"
        ret=$((ret + res))
    fi
    return $ret
}

set_policy() {
    [ ! -e "$PROC_IPTABLES_NAMES" ] && return 0
    tables=$(cat "$PROC_IPTABLES_NAMES" 2>/dev/null)
    [ -z "$tables" ] && return 1
    echo -n "${IPTABLES}: Setting chains to policy $1: "
    ret=0
    for i in $tables; do
        echo -n "$i "
        case "$i" in
            filter)
                $IPTABLES -t filter -P INPUT $1 && $IPTABLES -t filter -P OUTPUT $1 \
                    && $IPTABLES -t filter -P FORWARD $1 || ret=$((ret + 1)) ;;
            *) ret=$((ret + 1)) ;;
        esac
    done
    ok_or_failed $ret
    return $ret
}

flush_n_delete() {
    [ ! -e "$PROC_IPTABLES_NAMES" ] && return 0
    NF_TABLES=$(cat "$PROC_IPTABLES_NAMES" 2>/dev/null)
    [ -z "$NF_TABLES" ] && return 1
    echo -n "${IPTABLES}: Flushing firewall rules: "
    ret=0
    for i in $NF_TABLES; do
        $IPTABLES -t $i -F; ret=$((ret + $?))
        $IPTABLES -t $i -X; ret=$((ret + $?))
        $IPTABLES -t $i -Z; ret=$((ret + $?))
    done
    ok_or_failed $ret
    return $ret
}

iptables_service_start() {
    [ ! -f "$IPTABLES_DATA" ] && return 6
    echo -n "${IPTABLES}: Applying firewall rules: "
    ${IPTABLES}-restore $IPTABLES_DATA
    ret=$?
    ok_or_failed $ret
    [ $ret -eq 0 ] || return 1
    # load_sysctl: only the keys listed in IPTABLES_SYSCTL_LOAD_LIST are applied again (none by default).
    for item in $IPTABLES_SYSCTL_LOAD_LIST; do
        grep "$item" /etc/sysctl.conf | sysctl -p - >/dev/null
    done
    return 0
}

iptables_service_stop() {
    [ ! -e "$PROC_IPTABLES_NAMES" ] && return 0
    set_policy ACCEPT
    flush_n_delete
    ret=0
    if [ "x$IPTABLES_MODULES_UNLOAD" = "xyes" ]; then
        echo -n "${IPTABLES}: Unloading modules: "
        for mod in $NF_MODULES; do
            rmmod_r $mod
            ret=$((ret + $?))
        done
        # try to unload remaining netfilter modules used by ipv4 and ipv6 netfilter
        for mod in $NF_MODULES_COMMON; do
            rmmod_r $mod >/dev/null
        done
        ok_or_failed $ret
    fi
    return $ret
}

case "$1" in
    start) iptables_service_start ;;
    stop) iptables_service_stop ;;
    *) echo "Usage: $0 {start|stop}"; exit 2 ;;
esac
EOF
chmod 755 /etc/init.d/iptables

# service ACTION: the service's messages go to the log as whole lines (ctrace's lines come between them).
service() {
    /etc/init.d/$1 $2 2>&1 | while IFS= read -r line; do echo "$line" >>$LOG; done
}
service iptables start
grep -q filter /proc/net/ip_tables_names 2>/dev/null || finish 1 "the iptables service did not start"
default=$(cat $MAXF) || finish 1 "nf_conntrack_max is unreadable"
flows=$((default + default / 4))

$CT run --rate-limit @RATE@ >>$LOG 2>&1 &
ct=$!
wait_for '^ctrace: .* mode: ' @ATTACH_S@ || { stop_ctrace; finish 1 "ctrace did not attach within @ATTACH_S@ s"; }

say "step 1: nf_conntrack_max is $default, the kernel's default for this machine; an admin raises it to @RAISED_MAX@ for traffic peaks and persists it in /etc/sysctl.d/90-conntrack.conf"
printf 'net.netfilter.nf_conntrack_max = @RAISED_MAX@\n' >/etc/sysctl.d/90-conntrack.conf
sysctl -p /etc/sysctl.d/90-conntrack.conf >/dev/null || { stop_ctrace; finish 1 "sysctl -p failed"; }
sleep 2
say "step 2: a traffic peak of $flows TCP connections fits in the raised table"
peak "$flows"
sleep 1
say "step 3: the firewall is stopped the way the incident did it: service iptables stop, with IPTABLES_MODULES_UNLOAD=yes in /etc/sysconfig/iptables-config"
service iptables stop
say "step 4: service iptables start: the rules come back and load nf_conntrack again, with its defaults"
service iptables start
grep -q filter /proc/net/ip_tables_names 2>/dev/null || { stop_ctrace; finish 1 "the iptables service did not start again"; }
wait_for 'nf_conntrack is back' @REATTACH_S@ || { stop_ctrace; finish 1 "ctrace did not report the reload within @REATTACH_S@ s"; }
say "  -> nf_conntrack_max is $(cat $MAXF) again, although /etc/sysctl.d/90-conntrack.conf still says @RAISED_MAX@"
say "step 5: the same peak of $flows TCP connections: past the default limit new connections are dropped (table_full)"
peak "$flows"
# ctrace reads the kernel counters once a second: let it see the last drops before it stops.
sleep 2
stop_ctrace
finish 0
"#;
    SCRIPT
        .replace("@MARK@", MARK)
        .replace("@TESTKIT@", GUEST_TESTKIT)
        .replace("@CTRACE@", GUEST_CTRACE)
        .replace("@RAISED_MAX@", &RAISED_MAX.to_string())
        .replace("@KMOD_DIR@", GUEST_KMOD_DIR)
        .replace("@RATE@", &RATE_LIMIT.to_string())
        .replace("@ATTACH_S@", &ATTACH_TIMEOUT_S.to_string())
        .replace("@REATTACH_S@", &REATTACH_TIMEOUT_S.to_string())
        .replace("@STOP_S@", &STOP_TIMEOUT_S.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_has_no_placeholders_left() {
        let script = guest_script();
        // `@NAME@` placeholders; the script's own `"$@"` is not one.
        let rest = script.replace(MARK, "").replace("\"$@\"", "");
        assert!(!rest.contains('@'), "{script}");
        assert!(script.contains("IPTABLES_MODULES_UNLOAD=\"yes\""));
        assert!(script.contains("iptables_service_stop() {"));
        assert!(script.contains("net.netfilter.nf_conntrack_max = 1048576"));
    }

    #[test]
    fn unknown_kernels_are_refused_before_anything_is_built() {
        let err = run(Path::new("/nonexistent"), "4.19").unwrap_err().to_string();
        assert!(err.contains("unknown kernel \"4.19\""), "{err}");
    }
}
