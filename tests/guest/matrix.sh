# The attribution matrix (tests/tests/attribution) and the guest-only tests (tests/tests/forgery) inside a test
# VM: the same #[test] functions as on the host, here with nf_conntrack as a module and ctrace in kprobe mode.
# Run by busybox sh as root; xtask/src/vm_matrix.rs prepends MARK=<prefix> and CHURN=<netns count> and reads the
# MARK lines. Every test runs on its own, bounded by its own timeouts; the script always reaches its last line.
mark() { echo "$MARK $*"; }
now() { cut -d' ' -f1 /proc/uptime; }

mark kernel "$(uname -r)"
mark cpus "$(grep -c ^processor /proc/cpuinfo)"
mkdir -p /run/netns
for tool in iptables ip6tables; do ln -sf xtables-legacy-multi "/usr/sbin/$tool"; done
export CTRACE_BIN=/usr/local/bin/ctrace CTRACE_TEST_EXPECT_MODE=kprobe CTRACE_TEST_CHURN_NETNS="$CHURN"
export RUST_BACKTRACE=0
failed=0
for bin in /usr/local/bin/ctrace-test-*; do
    suite=${bin##*/ctrace-test-}
    tests=$($bin --list --format terse --include-ignored 2>/dev/null | sed -n 's/: test$//p')
    [ -n "$tests" ] || { mark error "$suite listed no tests"; failed=$((failed + 1)); continue; }
    for t in $tests; do
        mark begin "test.$suite::$t"
        start=$(now)
        $bin --exact "$t" --include-ignored --test-threads=1 --nocapture 2>&1
        rc=$?
        mark end "test.$suite::$t"
        mark "result.$suite::$t" "$rc $start $(now)"
        [ "$rc" -eq 0 ] || failed=$((failed + 1))
    done
done
mark failed "$failed"
[ "$failed" -eq 0 ]
