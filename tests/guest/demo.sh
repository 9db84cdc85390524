# `cargo xtask demo --vm`: the nf_conntrack reload trap in a Debian guest, with ctrace's text output. Run by busybox
# sh as root; xtask/src/demo_vm.rs prepends MARK, CT (ctrace), KIT (ctrace-testkit), KMOD_DIR (kmod's modprobe and
# lsmod, exported for the service script), RAISED_MAX, RATE (ctrace's --rate-limit) and the bounds ATTACH_S,
# REATTACH_S and STOP_S, and prints the block between `$MARK begin demo` and `$MARK end demo`. Every wait is bounded.
# /etc/init.d/iptables is tests/guest/iptables.init.
LOG=/tmp/demo.txt
MAXF=/proc/sys/net/netfilter/nf_conntrack_max
mark() { echo "$MARK $*"; }
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
    ( sleep $STOP_S; kill -KILL "$ct" 2>/dev/null ) &
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
echo "$KMOD_DIR/modprobe" >/proc/sys/kernel/modprobe
for tool in iptables iptables-restore iptables-save; do ln -sf xtables-legacy-multi /usr/sbin/$tool; done
mkdir -p /etc/sysconfig /etc/sysctl.d

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

# service ACTION: the service's messages go to the log as whole lines (ctrace's lines come between them).
service() {
    /etc/init.d/$1 $2 2>&1 | while IFS= read -r line; do echo "$line" >>$LOG; done
}
service iptables start
grep -q filter /proc/net/ip_tables_names 2>/dev/null || finish 1 "the iptables service did not start"
default=$(cat $MAXF) || finish 1 "nf_conntrack_max is unreadable"
flows=$((default + default / 4))

$CT run --rate-limit $RATE >>$LOG 2>&1 &
ct=$!
wait_for '^ctrace: .* mode: ' $ATTACH_S || { stop_ctrace; finish 1 "ctrace did not attach within $ATTACH_S s"; }

say "step 1: nf_conntrack_max is $default, the kernel's default for this machine; an admin raises it to $RAISED_MAX for traffic peaks and persists it in /etc/sysctl.d/90-conntrack.conf"
printf 'net.netfilter.nf_conntrack_max = %s\n' "$RAISED_MAX" >/etc/sysctl.d/90-conntrack.conf
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
wait_for 'nf_conntrack is back' $REATTACH_S || { stop_ctrace; finish 1 "ctrace did not report the reload within $REATTACH_S s"; }
say "  -> nf_conntrack_max is $(cat $MAXF) again, although /etc/sysctl.d/90-conntrack.conf still says $RAISED_MAX"
say "step 5: the same peak of $flows TCP connections: past the default limit new connections are dropped (table_full)"
peak "$flows"
# ctrace reads the kernel counters once a second: let it see the last drops before it stops.
sleep 2
stop_ctrace
finish 0
