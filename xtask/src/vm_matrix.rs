//! The attribution matrix in kprobe mode: the `#[test]` functions of `tests/tests/attribution`, built static,
//! run one by one in 2-vCPU Debian guests where nf_conntrack is a module and ctrace must pick kprobe mode. The
//! guest gets the tools the tests call (iproute2, nftables, legacy iptables) from this host; the guest script
//! is `tests/guest/matrix.sh`. Each test compares ctrace with truth it did not compute and prints a
//! `case ...` line, which becomes the test's facts here.

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
    guest::{TestResult, finish, iptables_files, marker_block, marker_values, program_files},
    vm::{self, VmRun},
};

/// The kernels the matrix runs on (kprobe mode on both; 5.10 counts resolved clashes as insert_failed).
const KERNELS: &[KernelSpec] = &[KernelSpec::Debian61, KernelSpec::Debian612];
/// What the tests need loaded; dependencies come with them. The guest cannot load modules on demand (nft's and
/// iptables' requests fail there), so every match, target and expression the tests use is named.
const MODULES: &[&str] = &[
    "nf_conntrack",
    "xt_conntrack",
    "iptable_filter",
    "iptable_raw",
    "iptable_nat",
    "ip6table_filter",
    "ip6table_raw",
    "xt_tcpudp",
    "xt_comment",
    "xt_statistic",
    "xt_CT",
    "xt_nat",
    "nf_tables",
    "nft_ct",
    "veth",
];

/// MODULES plus what this kernel has as a module of its own (6.12 has nft_objref inside nf_tables).
fn modules(spec: KernelSpec) -> Vec<String> {
    let mut names: Vec<String> = MODULES.iter().map(|m| m.to_string()).collect();
    if spec == KernelSpec::Debian61 {
        names.push("nft_objref".into());
    }
    names
}
/// Netns created and destroyed by the churn case in a guest (2000 on the host; emulation makes each ~0.1 s).
const CHURN_NETNS: u32 = 1000;
const VM_TIMEOUT: Duration = Duration::from_secs(900);
const MARK: &str = "@@ctrace-matrix";
const SCRIPT: &str = include_str!("../../tests/guest/matrix.sh");
/// The test binaries the guests run (every test, the ignored ones included: those need a kernel with
/// modules). Each lands in the guest as /usr/local/bin/ctrace-test-<name>.
const TEST_TARGETS: &[&str] = &["attribution", "forgery", "capability_sets", "provenance"];
const GUEST_CTRACE: &str = "/usr/local/bin/ctrace";
/// Host programs the tests run, and where the guest gets them (before busybox's applets in PATH).
const PROGRAMS: &[(&str, &str)] = &[
    ("/usr/sbin/nft", "/usr/local/sbin/nft"),
    ("/usr/sbin/ip", "/usr/local/sbin/ip"),
];

pub fn run_all(ws: &Path) -> Result<()> {
    crate::setup::ensure_debian_packages(&["iptables", "nftables", "iproute2"])?;
    let build_start = Instant::now();
    let mut files = vec![(crate::dist::build_static(ws)?, GUEST_CTRACE.to_string())];
    for (name, bin) in build_matrix(ws)? {
        files.push((bin, format!("/usr/local/bin/ctrace-test-{name}")));
    }
    files.extend(iptables_files()?);
    files.extend(program_files(PROGRAMS)?);
    println!(
        "vm-matrix: built the static ctrace and the matrix in {:.1}s",
        build_start.elapsed().as_secs_f64()
    );
    let mut results = Vec::new();
    let mut tails = Vec::new();
    for &spec in KERNELS {
        let (tests, tail) = run_kernel(spec, &files)?;
        if tests.iter().any(|t| !t.passed()) {
            tails.push(tail);
        }
        results.extend(tests);
    }
    finish("VM attribution matrix tests", &results, &tails)
}

/// Builds the TEST_TARGETS static (they run in a guest with no Rust libraries); returns (name, path) pairs.
fn build_matrix(ws: &Path) -> Result<Vec<(String, PathBuf)>> {
    let target = crate::dist::DIST_TARGET;
    let target_dir = crate::build::target_dir(ws).join("dist-build");
    let mut cmd = crate::build::cargo(ws)?;
    cmd.args(["test", "--no-run", "--release", "--package", "ctrace-tests"]);
    for t in TEST_TARGETS {
        cmd.args(["--test", t]);
    }
    cmd.args(["--target", target, "--message-format", "json-render-diagnostics"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("could not start cargo to build the matrix")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut built = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let msg: Value = serde_json::from_str(&line?).unwrap_or_default();
        if msg["reason"] == "compiler-artifact"
            && let Some(name) = msg["target"]["name"].as_str().filter(|n| TEST_TARGETS.contains(n))
            && let Some(path) = msg["executable"].as_str()
        {
            built.push((name.to_string(), PathBuf::from(path)));
        }
    }
    let status = child.wait()?;
    ensure!(status.success(), "building the guest test binaries failed ({status})");
    for t in TEST_TARGETS {
        let (_, bin) = built
            .iter()
            .find(|(name, _)| name == t)
            .with_context(|| format!("cargo built no {t} test executable"))?;
        crate::dist::ensure_static(bin)?;
    }
    Ok(built)
}

/// Boots one guest and turns each test's block into a result. Errors are host problems (no kernel, no QEMU).
fn run_kernel(spec: KernelSpec, files: &[(PathBuf, String)]) -> Result<(Vec<TestResult>, String)> {
    let name = format!("debian-{}", spec.short_name());
    let kernel = debian::fetch(spec, &debian::default_cache_root())?;
    let script = format!("MARK={MARK}\nCHURN={CHURN_NETNS}\n{SCRIPT}");
    let mut run = VmRun::new(kernel.clone(), script);
    run.files = files.to_vec();
    run.modules = modules(spec);
    run.timeout = VM_TIMEOUT;
    ensure!(run.cpus >= 2, "the matrix needs a guest with 2 vCPUs");
    println!(
        "vm-matrix {name}: booting {} ({}) under TCG, {} vCPUs",
        kernel.version, kernel.package, run.cpus
    );
    let outcome = vm::run(&run)?;
    let tail = outcome.console_tail(&name, 60);
    let output = outcome.script_output();
    let values = marker_values(&output, MARK);
    let mut tests = evaluate(&name, &output, &values);
    if tests.is_empty() {
        let mut guest = TestResult::new(&format!("{name} guest"));
        guest.failures.push(format!(
            "{}; no test ran{}",
            outcome.exit_reason,
            values.get("error").map(|e| format!(": {e}")).unwrap_or_default()
        ));
        tests.push(guest);
    }
    println!(
        "vm-matrix {name}: kernel {}, {} CPUs, boot {:.1}s, VM total {:.1}s",
        values.get("kernel").map_or("?", String::as_str),
        values.get("cpus").map_or("?", String::as_str),
        outcome.boot_time.map_or(0.0, |d| d.as_secs_f64()),
        outcome.duration.as_secs_f64()
    );
    for test in &tests {
        println!("vm-matrix {}", test.line());
    }
    Ok((tests, tail))
}

/// One result per `result.<test>` marker: passed when the test binary exited 0; the facts are the `case` lines
/// the test printed and its time; a failure carries the test's panic message.
fn evaluate(name: &str, output: &str, values: &BTreeMap<String, String>) -> Vec<TestResult> {
    let mut tests = Vec::new();
    for (key, value) in values {
        let Some(test) = key.strip_prefix("result.") else {
            continue;
        };
        let mut result = TestResult::new(&format!("{name} {test}"));
        let block = marker_block(output, MARK, &format!("test.{test}")).unwrap_or_default();
        result.facts.extend(block.iter().filter_map(|l| case_line(l)));
        match parse_result(value) {
            Ok((0, seconds)) => result.facts.push(format!("{seconds:.1}s")),
            Ok((rc, seconds)) => {
                let why = block
                    .iter()
                    .skip_while(|l| !l.contains("panicked at"))
                    .take(4)
                    .map(|l| l.trim())
                    .collect::<Vec<_>>()
                    .join(" ");
                result.failures.push(format!("exit {rc} after {seconds:.1}s: {why}"));
            }
            Err(err) => result.failures.push(format!("{err:#}")),
        }
        tests.push(result);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_carry_cases_and_panics() {
        let out = format!(
            "{MARK} begin test.noise::a\ntest noise::a ... case a: truth 200; ctrace 200\nok\n{MARK} end test.noise::a\n\
             {MARK} result.noise::a 0 10.0 12.5\n\
             {MARK} begin test.clash::b\nthread 'clash::b' panicked at x.rs:1:2:\nassertion failed\n  left: 1\n  right: 2\n\
             {MARK} end test.clash::b\n{MARK} result.clash::b 101 12.5 13.0\n"
        );
        let values = marker_values(&out, MARK);
        let tests = evaluate("debian-6.1", &out, &values);
        assert_eq!(tests.len(), 2);
        let b = &tests[0];
        assert_eq!(b.name, "debian-6.1 clash::b");
        assert!(
            b.failures[0].starts_with("exit 101 after 0.5s: thread 'clash::b' panicked"),
            "{:?}",
            b.failures
        );
        let a = &tests[1];
        assert!(a.passed());
        assert_eq!(a.facts, ["case a: truth 200; ctrace 200", "2.5s"]);
    }
}
