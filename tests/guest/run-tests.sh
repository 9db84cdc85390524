# Runs the #[test] functions of the test binaries /usr/local/bin/ctrace-test-<target> inside a test VM, one test at
# a time, the ignored ones included (they need this guest's kernel: nf_conntrack as a module). Run by busybox sh as
# root; xtask/src/vm_suite.rs prepends MARK=<prefix> and the suite's exported environment, and reads only the MARK
# lines: `list.<target> <tests>`, each test's output between `begin`/`end test.<target>::<test>`, and
# `result.<target>::<test> <exit status> <start> <end>` (guest uptimes). Every test is bounded by its own timeouts;
# the script always reaches its last line.
mark() { echo "$MARK $*"; }
now() { cut -d' ' -f1 /proc/uptime; }

mark kernel "$(uname -r)"
mark cpus "$(grep -c ^processor /proc/cpuinfo)"
mkdir -p /run/netns
# The host's legacy iptables, when the suite copied it in, under the names the tests call.
if [ -x /usr/sbin/xtables-legacy-multi ]; then
    for tool in iptables ip6tables; do ln -sf xtables-legacy-multi "/usr/sbin/$tool"; done
fi
export CTRACE_BIN=/usr/local/bin/ctrace RUST_BACKTRACE=0
failed=0
for bin in /usr/local/bin/ctrace-test-*; do
    target=${bin##*/ctrace-test-}
    tests=$($bin --list --format terse --include-ignored 2>/dev/null | sed -n 's/: test$//p')
    [ -n "$tests" ] || { mark error "$target listed no tests"; failed=$((failed + 1)); continue; }
    # `cargo xtask test --vm-test TEXT`: only the tests whose `<target>::<test>` contains TEXT.
    if [ -n "${VM_TEST_FILTER:-}" ]; then
        tests=$(for t in $tests; do case "$target::$t" in *"$VM_TEST_FILTER"*) echo "$t" ;; esac; done)
        [ -n "$tests" ] || continue
    fi
    # shellcheck disable=SC2086 # one word per test name
    mark "list.$target" $tests
    for t in $tests; do
        mark begin "test.$target::$t"
        start=$(now)
        $bin --exact "$t" --include-ignored --test-threads=1 --nocapture 2>&1
        rc=$?
        mark end "test.$target::$t"
        mark "result.$target::$t" "$rc $start $(now)"
        [ "$rc" -eq 0 ] || failed=$((failed + 1))
    done
done
mark failed "$failed"
[ "$failed" -eq 0 ]
