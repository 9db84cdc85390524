//! The VM test runner. A suite ([`Suite`], declared in `suites.rs`) is data: the kernels it boots, the modules
//! loaded at boot, the host tools its guests get, its environment, the guest's size and time limit. Its tests are
//! the `#[test]` functions of `tests/tests/<target>` (a file or a directory): built static, copied into one guest
//! per kernel with the static ctrace, and run one at a time by `tests/guest/run-tests.sh` with `--include-ignored`
//! (the tests that need a kernel with modules are ignored on this host). The tests compare ctrace with truth
//! themselves; the runner reads only their pass/fail markers, their times and the `case ...` lines they print, so
//! a new test needs no change here.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::{
    debian::{self, KernelSpec},
    guest::{GUEST_CTRACE, Tool, marker_block, marker_values, shell_vars, tool_files},
    vm::{self, ExitReason, VmRun},
};

/// A VM test suite, as data.
pub(crate) struct Suite {
    /// The step's name in `cargo xtask test` (what `--step` matches).
    pub step: &'static str,
    /// A short name for the log lines (`vm-<name> ...`).
    pub name: &'static str,
    /// The test targets of ctrace-tests whose tests the guests run (`tests/tests/<target>.rs` or `<target>/`).
    pub targets: &'static [&'static str],
    /// One guest per kernel.
    pub kernels: &'static [KernelSpec],
    /// Loaded at boot (with their dependencies): the guests cannot load modules on demand reliably.
    pub modules: &'static [&'static str],
    /// Loaded at boot on one kernel only (a module there, built into another module elsewhere).
    pub kernel_modules: &'static [(KernelSpec, &'static str)],
    pub tools: &'static [Tool],
    /// Exported to the tests.
    pub env: &'static [(&'static str, &'static str)],
    pub cpus: u32,
    pub memory_mb: u32,
    /// The whole guest, boot included.
    pub timeout: Duration,
}

/// Prefix of the lines the guest script prints for the runner; the kernel and the tests never print it.
const MARK: &str = "@@ctrace-test";
const RUN_TESTS: &str = include_str!("../../tests/guest/run-tests.sh");
/// Where the guest gets the test binaries: `<dir>/ctrace-test-<target>`, which the guest script runs.
const GUEST_TESTS: &str = "/usr/local/bin/ctrace-test-";
/// Facts longer than this in all are printed one per line.
const LONG_FACTS: usize = 400;
/// Output lines of a failed test shown in the log (the whole output is in the console log).
const FAILED_OUTPUT_LINES: usize = 30;

impl Suite {
    /// The Debian packages its guests need on the host.
    pub(crate) fn packages(&self) -> Vec<&'static str> {
        self.tools.iter().map(|t| t.package()).collect()
    }

    fn modules(&self, kernel: KernelSpec) -> Vec<String> {
        let extra = self.kernel_modules.iter().filter(|(k, _)| *k == kernel).map(|(_, m)| m);
        self.modules.iter().chain(extra).map(|m| m.to_string()).collect()
    }

    fn script(&self, only: &Selection) -> String {
        let filter = only.tests.as_deref().unwrap_or("");
        format!(
            "{}{}{RUN_TESTS}",
            shell_vars(&[("MARK", MARK), ("VM_TEST_FILTER", filter)], false),
            shell_vars(self.env, true)
        )
    }
}

/// What part of a suite to run (`cargo xtask test --kernel K --vm-test TEXT`); the default is all of it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Selection {
    /// Only this kernel (of the suite's).
    pub kernel: Option<KernelSpec>,
    /// Only the tests whose `<target>::<test>` contains this text.
    pub tests: Option<String>,
}

/// Runs a suite on each of its kernels; prints one line per test, each guest's timings and `N passed, M failed`, and
/// fails when any test failed or a guest did not run them all.
pub(crate) fn run(ws: &Path, suite: &Suite, only: &Selection) -> Result<()> {
    let kernels: Vec<KernelSpec> = suite
        .kernels
        .iter()
        .copied()
        .filter(|k| only.kernel.is_none_or(|o| o == *k))
        .collect();
    if kernels.is_empty() {
        println!("vm-{}: does not run on the kernel asked for: skipped", suite.name);
        return Ok(());
    }
    crate::setup::ensure_debian_packages(&suite.packages())?;
    let build_start = Instant::now();
    let mut files = vec![(crate::dist::build_static(ws)?, GUEST_CTRACE.to_string())];
    for (target, bin) in build_tests(ws, suite.targets)? {
        files.push((bin, format!("{GUEST_TESTS}{target}")));
    }
    files.extend(tool_files(suite.tools)?);
    println!(
        "vm-{}: built the static ctrace and the tests {} in {:.1}s",
        suite.name,
        suite.targets.join(", "),
        build_start.elapsed().as_secs_f64()
    );
    let mut results = Vec::new();
    let mut tails = Vec::new();
    for kernel in kernels {
        let (tests, tail) = run_kernel(suite, kernel, &files, only)?;
        if tests.iter().any(|t| !t.passed()) {
            tails.push(tail);
        }
        results.extend(tests);
    }
    finish(suite.step, &results, &tails)
}

/// Builds the test targets static (they run in a guest with no Rust libraries); returns (target, path) pairs.
fn build_tests(ws: &Path, targets: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let mut cmd = crate::dist::static_cargo(ws, "test")?;
    cmd.args(["--no-run", "--release", "--package", "ctrace-tests"]);
    for t in targets {
        cmd.args(["--test", t]);
    }
    cmd.args(["--message-format", "json-render-diagnostics"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("could not start cargo to build the guest tests")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut built = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let msg: Value = serde_json::from_str(&line?).unwrap_or_default();
        if msg["reason"] == "compiler-artifact"
            && let Some(name) = msg["target"]["name"].as_str().filter(|n| targets.contains(n))
            && let Some(path) = msg["executable"].as_str()
        {
            built.push((name.to_string(), PathBuf::from(path)));
        }
    }
    let status = child.wait()?;
    ensure!(status.success(), "building the guest tests failed ({status})");
    for t in targets {
        let (_, bin) = built
            .iter()
            .find(|(name, _)| name == t)
            .with_context(|| format!("cargo built no {t} test executable"))?;
        crate::dist::ensure_static(bin)?;
    }
    Ok(built)
}

/// Boots one guest and turns each test's markers into a result. Errors are host problems (no kernel, no QEMU).
fn run_kernel(
    suite: &Suite,
    spec: KernelSpec,
    files: &[(PathBuf, String)],
    only: &Selection,
) -> Result<(Vec<TestResult>, String)> {
    let name = format!("debian-{}", spec.short_name());
    let kernel = debian::fetch(spec, &debian::default_cache_root())?;
    let mut run = VmRun::new(kernel.clone(), suite.script(only));
    run.files = files.to_vec();
    run.modules = suite.modules(spec);
    run.timeout = suite.timeout;
    run.cpus = suite.cpus;
    run.memory_mb = suite.memory_mb;
    println!(
        "vm-{} {name}: booting {} ({}) under TCG, {} vCPUs, {} MiB",
        suite.name, kernel.version, kernel.package, run.cpus, run.memory_mb
    );
    let outcome = vm::run(&run)?;
    let output = outcome.script_output();
    let values = marker_values(&output, MARK);
    let mut tests = evaluate(&name, &output, &values, &outcome.exit_reason);
    if !outcome.passed && tests.iter().all(TestResult::passed) {
        // Nothing else explains the guest's failure (the script fails only when a test did).
        let mut guest = TestResult::new(&format!("{name} guest"));
        guest.failures.push(outcome.exit_reason.to_string());
        tests.push(guest);
    }
    println!(
        "vm-{} {name}: kernel {}, {} CPUs, boot {:.1}s, VM total {:.1}s",
        suite.name,
        values.get("kernel").map_or("?", String::as_str),
        values.get("cpus").map_or("?", String::as_str),
        outcome.boot_time.map_or(0.0, |d| d.as_secs_f64()),
        outcome.duration.as_secs_f64()
    );
    for test in &tests {
        println!("vm-{} {}", suite.name, test.line());
        for line in &test.output {
            println!("    | {line}");
        }
    }
    Ok((tests, outcome.console_tail(&name, 60)))
}

/// One named test of a guest run: the facts it printed, what went wrong and, when it failed, the end of its output.
struct TestResult {
    name: String,
    facts: Vec<String>,
    failures: Vec<String>,
    output: Vec<String>,
}

impl TestResult {
    fn new(name: &str) -> TestResult {
        TestResult {
            name: name.to_string(),
            facts: Vec::new(),
            failures: Vec::new(),
            output: Vec::new(),
        }
    }

    fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    fn line(&self) -> String {
        // Long facts (a soak's report) read better one per line.
        let facts = if self.facts.iter().map(String::len).sum::<usize>() > LONG_FACTS {
            self.facts.iter().map(|f| format!("\n    {f}")).collect()
        } else {
            format!(" ({})", self.facts.join(", "))
        };
        if self.passed() {
            format!("{}: ok{facts}", self.name)
        } else {
            format!("{}: FAILED: {}{facts}", self.name, self.failures.join("; "))
        }
    }
}

/// One result per test the guest listed (`list.<target>`): passed when the test exited 0; the facts are its `case`
/// lines and its time; a failure carries its panic message, and a test without a result says why the guest
/// stopped. A guest that listed nothing gives one failed result.
fn evaluate(name: &str, output: &str, values: &BTreeMap<String, String>, exit: &ExitReason) -> Vec<TestResult> {
    let mut tests = Vec::new();
    for (key, list) in values {
        let Some(target) = key.strip_prefix("list.") else {
            continue;
        };
        for test in list.split_whitespace().map(|t| format!("{target}::{t}")) {
            let mut result = TestResult::new(&format!("{name} {test}"));
            let block = marker_block(output, MARK, &format!("test.{test}")).unwrap_or_default();
            result.facts.extend(block.iter().filter_map(|l| case_line(l)));
            match values.get(&format!("result.{test}")).map(|v| parse_result(v)) {
                Some(Ok((0, seconds))) => result.facts.push(format!("{seconds:.1}s")),
                Some(Ok((rc, seconds))) => {
                    let why = block
                        .iter()
                        .skip_while(|l| !l.contains("panicked at"))
                        .take(4)
                        .map(|l| l.trim())
                        .collect::<Vec<_>>()
                        .join(" ");
                    result.failures.push(format!("exit {rc} after {seconds:.1}s: {why}"));
                    let from = block.len().saturating_sub(FAILED_OUTPUT_LINES);
                    result.output = block[from..].iter().map(|l| l.to_string()).collect();
                }
                Some(Err(err)) => result.failures.push(format!("{err:#}")),
                None => result
                    .failures
                    .push(format!("no result: the guest stopped first ({exit})")),
            }
            tests.push(result);
        }
    }
    if tests.is_empty() {
        let mut guest = TestResult::new(&format!("{name} guest"));
        let why = values.get("error").map(|e| format!(": {e}")).unwrap_or_default();
        guest.failures.push(format!("{exit}; no test ran{why}"));
        tests.push(guest);
    } else if let Some(error) = values.get("error") {
        let mut guest = TestResult::new(&format!("{name} guest"));
        guest.failures.push(error.clone());
        tests.push(guest);
    }
    tests
}

/// The `case ...` text of a line (libtest may print `test name ... ` before it on the same line).
fn case_line(line: &str) -> Option<String> {
    let at = line.find("case ")?;
    Some(line[at..].trim().to_string())
}

/// `rc start end` (uptimes in seconds) into (rc, seconds).
fn parse_result(value: &str) -> Result<(i32, f64)> {
    let words: Vec<&str> = value.split_whitespace().collect();
    let [rc, start, end] = words[..] else {
        bail!("malformed result marker {value:?}");
    };
    let secs = |w: &str| w.parse::<f64>().with_context(|| format!("{w:?} is not a time"));
    Ok((rc.parse().context("exit status")?, secs(end)? - secs(start)?))
}

/// Prints the plain `N passed, M failed` line CI reads; an error names each failed test and why, with the consoles'
/// ends (`tails`) of the failed guests.
fn finish(suite: &str, results: &[TestResult], tails: &[String]) -> Result<()> {
    let failed: Vec<&TestResult> = results.iter().filter(|t| !t.passed()).collect();
    println!("{} passed, {} failed", results.len() - failed.len(), failed.len());
    ensure!(
        !results.is_empty(),
        "no test of {suite} ran (does --vm-test match one?)"
    );
    if !failed.is_empty() {
        let each: Vec<String> = failed
            .iter()
            .map(|t| format!("  {}: {}", t.name, t.failures.join("; ")))
            .collect();
        bail!(
            "{} of {} {suite} failed:\n{}\n{}",
            failed.len(),
            results.len(),
            each.join("\n"),
            tails.join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_carry_cases_panics_and_missing_tests() {
        let out = format!(
            "{MARK} list.noise a\n{MARK} list.reload b c\n\
             {MARK} begin test.noise::a\ntest a ... case a: truth 200; ctrace 200\nok\n{MARK} end test.noise::a\n\
             {MARK} result.noise::a 0 10.0 12.5\n\
             {MARK} begin test.reload::b\nthread 'b' panicked at x.rs:1:2:\nassertion failed\n  left: 1\n  right: 2\n\
             {MARK} end test.reload::b\n{MARK} result.reload::b 101 12.5 13.0\n\
             {MARK} begin test.reload::c\ncase c: started\n"
        );
        let values = marker_values(&out, MARK);
        let timeout = ExitReason::Timeout {
            limit: Duration::from_secs(300),
        };
        let tests = evaluate("debian-6.1", &out, &values, &timeout);
        let names: Vec<&str> = tests.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["debian-6.1 noise::a", "debian-6.1 reload::b", "debian-6.1 reload::c"]
        );
        assert!(tests[0].passed());
        assert_eq!(tests[0].facts, ["case a: truth 200; ctrace 200", "2.5s"]);
        assert!(
            tests[1].failures[0].starts_with("exit 101 after 0.5s: thread 'b' panicked"),
            "{:?}",
            tests[1].failures
        );
        assert_eq!(
            tests[1].output,
            [
                "thread 'b' panicked at x.rs:1:2:",
                "assertion failed",
                "  left: 1",
                "  right: 2"
            ]
        );
        assert_eq!(
            tests[2].failures,
            ["no result: the guest stopped first (the guest did not finish within 300s)"]
        );
        // The error names every failed test and why (the summary repeats it where CI's log keeps it).
        let err = finish("VM suite", &tests, &["tail".to_string()])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "2 of 3 VM suite failed:\n  debian-6.1 reload::b: exit 101 after 0.5s: thread 'b' panicked"
            ),
            "{err}"
        );
        assert!(
            err.ends_with(
                "  debian-6.1 reload::c: no result: the guest stopped first (the guest did not finish within \
                 300s)\ntail"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_guest_that_ran_nothing_is_one_failure() {
        let out = format!("{MARK} kernel 6.1\n{MARK} error reload listed no tests\n");
        let tests = evaluate(
            "debian-6.1",
            &out,
            &marker_values(&out, MARK),
            &ExitReason::ScriptFailed { code: 1 },
        );
        assert_eq!(tests.len(), 1);
        assert_eq!(
            tests[0].line(),
            "debian-6.1 guest: FAILED: the guest script failed (exit 1); no test ran: reload listed no tests ()"
        );
    }

    #[test]
    fn suites_load_their_kernel_modules() {
        let suite = Suite {
            step: "s",
            name: "s",
            targets: &[],
            kernels: &[KernelSpec::Debian61, KernelSpec::Debian612],
            modules: &["nf_conntrack"],
            kernel_modules: &[(KernelSpec::Debian61, "nft_objref")],
            tools: &[Tool::Kmod],
            env: &[("A", "b")],
            cpus: 2,
            memory_mb: 1024,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(suite.modules(KernelSpec::Debian61), ["nf_conntrack", "nft_objref"]);
        assert_eq!(suite.modules(KernelSpec::Debian612), ["nf_conntrack"]);
        assert_eq!(suite.packages(), ["kmod"]);
        assert!(suite.script(&Selection::default()).starts_with(&format!(
            "MARK='{MARK}'\nVM_TEST_FILTER=''\nexport A='b'\n# Runs the #[test]"
        )));
    }
}
