# The attribution matrix (tests/tests/attribution) inside a test VM: the same #[test] functions as on the host,
# here with nf_conntrack as a module and ctrace in kprobe mode. Run by busybox sh as root; xtask/src/vm_matrix.rs
# prepends MARK=<prefix> and CHURN=<netns count> and reads the MARK lines. Every test runs on its own, bounded by
# its own timeouts; the script always reaches its last line.
mark() { echo "$MARK $*"; }
now() { cut -d' ' -f1 /proc/uptime; }

mark kernel "$(uname -r)"
mark cpus "$(grep -c ^processor /proc/cpuinfo)"
mkdir -p /run/netns
for tool in iptables ip6tables; do ln -sf xtables-legacy-multi "/usr/sbin/$tool"; done
export CTRACE_BIN=/usr/local/bin/ctrace CTRACE_TEST_EXPECT_MODE=kprobe CTRACE_TEST_CHURN_NETNS="$CHURN"
export RUST_BACKTRACE=0
MATRIX=/usr/local/bin/ctrace-attribution

tests=$($MATRIX --list --format terse 2>/dev/null | sed -n 's/: test$//p')
[ -n "$tests" ] || { mark error "the matrix binary listed no tests"; exit 1; }
failed=0
for t in $tests; do
    mark begin "test.$t"
    start=$(now)
    $MATRIX --exact "$t" --test-threads=1 --nocapture 2>&1
    rc=$?
    mark end "test.$t"
    mark "result.$t" "$rc $start $(now)"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
done
mark failed "$failed"
[ "$failed" -eq 0 ]
