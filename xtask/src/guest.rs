//! What every VM test guest gets and how its console is read: the static ctrace-testkit, the host's legacy
//! iptables with its libraries, `MARK key value` lines and `MARK begin/end name` blocks, ctrace's JSON Lines.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

pub(crate) const TESTKIT: &str = "ctrace-testkit";
pub(crate) const GUEST_TESTKIT: &str = "/usr/local/bin/ctrace-testkit";
/// The host's legacy iptables (Debian package `iptables`): one multi-call binary, its libraries and extensions.
pub(crate) const XTABLES_MULTI: &str = "/usr/sbin/xtables-legacy-multi";
pub(crate) const XTABLES_EXTENSIONS: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// Builds `ctrace-testkit` static (glibc, `+crt-static`) next to the static ctrace and returns its path.
pub(crate) fn build_testkit(ws: &Path) -> Result<PathBuf> {
    build_static_test_bin(ws, TESTKIT)
}

/// Builds the ctrace-tests binary `bin` static (glibc, `+crt-static`) next to the static ctrace and returns its path.
pub(crate) fn build_static_test_bin(ws: &Path, bin: &str) -> Result<PathBuf> {
    let target = crate::dist::DIST_TARGET;
    let target_dir = crate::build::target_dir(ws).join("dist-build");
    let mut cmd = crate::build::cargo(ws)?;
    cmd.args([
        "build",
        "--release",
        "--package",
        "ctrace-tests",
        "--bin",
        bin,
        "--target",
        target,
    ])
    .arg("--target-dir")
    .arg(&target_dir)
    .env("RUSTFLAGS", "-C target-feature=+crt-static")
    .env_remove("CARGO_ENCODED_RUSTFLAGS")
    .env_remove("CARGO_BUILD_TARGET");
    crate::setup::run(&mut cmd).with_context(|| format!("building the static {bin} failed"))?;
    let path = target_dir.join(target).join("release").join(bin);
    crate::dist::ensure_static(&path)?;
    Ok(path)
}

/// The host's legacy iptables for the guest, at the same paths: the multi-call binary, every extension, and every
/// shared library they load (the ELF loader included). The guest script adds the `iptables` symlinks.
pub(crate) fn iptables_files() -> Result<Vec<(PathBuf, String)>> {
    let binary = Path::new(XTABLES_MULTI);
    ensure!(
        binary.is_file(),
        "{XTABLES_MULTI} does not exist: install the Debian package iptables"
    );
    let extensions = dir_files(Path::new(XTABLES_EXTENSIONS), XTABLES_EXTENSIONS)?;
    ensure!(
        !extensions.is_empty(),
        "{XTABLES_EXTENSIONS} holds no iptables extensions"
    );
    let mut libraries = BTreeSet::new();
    for object in std::iter::once(binary).chain(extensions.iter().map(|(host, _)| host.as_path())) {
        let out = crate::setup::capture(Command::new("ldd").arg(object))
            .with_context(|| format!("could not list the libraries of {}", object.display()))?;
        libraries.extend(parse_ldd(&out).with_context(|| format!("ldd {}: a library is missing", object.display()))?);
    }
    let mut files = vec![(binary.to_path_buf(), XTABLES_MULTI.to_string())];
    files.extend(extensions);
    files.extend(libraries.into_iter().map(|lib| (PathBuf::from(&lib), lib)));
    Ok(files)
}

/// Host programs for the guest, `(host path, guest path)`, each with every shared library it loads (at the same
/// paths, the ELF loader included). A host path may be a symbolic link.
pub(crate) fn program_files(programs: &[(&str, &str)]) -> Result<Vec<(PathBuf, String)>> {
    let mut files = Vec::new();
    let mut libraries = BTreeSet::new();
    for &(host, guest) in programs {
        let path = Path::new(host);
        ensure!(
            path.is_file(),
            "{host} does not exist: install the Debian package that provides it"
        );
        let out = crate::setup::capture(Command::new("ldd").arg(path))
            .with_context(|| format!("could not list the libraries of {host}"))?;
        libraries.extend(parse_ldd(&out).with_context(|| format!("ldd {host}: a library is missing"))?);
        files.push((path.to_path_buf(), guest.to_string()));
    }
    files.extend(libraries.into_iter().map(|lib| (PathBuf::from(&lib), lib)));
    Ok(files)
}

/// The regular files in `host_dir` (symbolic links to files included, as copies), sorted, as
/// `(host path, guest_dir/name)` pairs; subdirectories are skipped.
fn dir_files(host_dir: &Path, guest_dir: &str) -> Result<Vec<(PathBuf, String)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(host_dir).with_context(|| format!("could not read {}", host_dir.display()))? {
        let path = entry
            .with_context(|| format!("could not read {}", host_dir.display()))?
            .path();
        // `is_file` follows symbolic links.
        if path.is_file()
            && let Some(name) = path.file_name().and_then(|n| n.to_str())
        {
            files.push((path.clone(), format!("{}/{name}", guest_dir.trim_end_matches('/'))));
        }
    }
    files.sort();
    Ok(files)
}

/// The absolute library paths in `ldd` output (the loader's line included, the vDSO skipped); an error names a
/// library that was not found.
pub(crate) fn parse_ldd(out: &str) -> Result<Vec<String>> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim) {
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                ensure!(!rest.starts_with("not found"), "{} not found", name.trim());
                rest
            }
            None => line,
        };
        if let Some(path) = target.split_whitespace().next().filter(|p| p.starts_with('/')) {
            libs.push(path.to_string());
        }
    }
    Ok(libs)
}

/// The `MARK key value` lines of the script's output (`begin`/`end` block delimiters excluded); a repeated key keeps
/// its first value.
pub(crate) fn marker_values(output: &str, mark: &str) -> BTreeMap<String, String> {
    let mut values = BTreeMap::new();
    for line in output.lines() {
        let Some(rest) = line.trim_end().strip_prefix(mark).and_then(|r| r.strip_prefix(' ')) else {
            continue;
        };
        let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
        if key != "begin" && key != "end" {
            values
                .entry(key.to_string())
                .or_insert_with(|| value.trim().to_string());
        }
    }
    values
}

/// The lines between `MARK begin name` and `MARK end name`; `None` when either marker is missing.
pub(crate) fn marker_block<'a>(output: &'a str, mark: &str, name: &str) -> Option<Vec<&'a str>> {
    let begin = format!("{mark} begin {name}");
    let end = format!("{mark} end {name}");
    let mut lines = output.lines().map(|l| l.trim_end_matches('\r'));
    lines.by_ref().find(|l| l.trim_end() == begin)?;
    let mut block = Vec::new();
    for line in lines {
        if line.trim_end() == end {
            return Some(block);
        }
        block.push(line);
    }
    None
}

/// A kernel message on the console (`[   12.345678] ...`), which can land between the script's lines.
pub(crate) fn is_kernel_message(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .is_some_and(|(stamp, _)| {
            !stamp.trim().is_empty() && stamp.trim().chars().all(|c| c.is_ascii_digit() || c == '.')
        })
}

/// Parses ctrace's JSON Lines, skipping blank lines and kernel messages; any other line is an error.
pub(crate) fn parse_events(lines: &[&str]) -> Result<Vec<Value>> {
    let mut events = Vec::new();
    for line in lines {
        let line = line.trim();
        if line.is_empty() || is_kernel_message(line) {
            continue;
        }
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("ctrace printed a non-JSON line: {line}"))?;
        events.push(value);
    }
    Ok(events)
}

/// The kernel's conntrack counters of one netns, summed over CPUs (`ctrace-testkit stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) drop: u64,
    pub(crate) early_drop: u64,
    pub(crate) insert_failed: u64,
    pub(crate) invalid: u64,
}

impl Counters {
    /// Parses `drop=1 early_drop=2 insert_failed=0 invalid=3` (every field required, in any order).
    pub(crate) fn parse(line: &str) -> Result<Counters> {
        let fields = key_values(line)?;
        let get = |key: &str| {
            fields
                .get(key)
                .with_context(|| format!("the stats line {line:?} has no {key}"))?
                .parse::<u64>()
                .with_context(|| format!("{key} is not a number in the stats line {line:?}"))
        };
        Ok(Counters {
            drop: get("drop")?,
            early_drop: get("early_drop")?,
            insert_failed: get("insert_failed")?,
            invalid: get("invalid")?,
        })
    }

    /// `self - before`; an error if a counter went backwards (a reload in between, or swapped lines).
    pub(crate) fn since(&self, before: &Counters) -> Result<Counters> {
        let sub = |now: u64, then: u64, name: &str| {
            now.checked_sub(then)
                .with_context(|| format!("the kernel's {name} counter went backwards ({then} -> {now})"))
        };
        Ok(Counters {
            drop: sub(self.drop, before.drop, "drop")?,
            early_drop: sub(self.early_drop, before.early_drop, "early_drop")?,
            insert_failed: sub(self.insert_failed, before.insert_failed, "insert_failed")?,
            invalid: sub(self.invalid, before.invalid, "invalid")?,
        })
    }

    pub(crate) fn plus(&self, other: &Counters) -> Counters {
        Counters {
            drop: self.drop + other.drop,
            early_drop: self.early_drop + other.early_drop,
            insert_failed: self.insert_failed + other.insert_failed,
            invalid: self.invalid + other.invalid,
        }
    }
}

/// `key=value` words (`old=7680 new=131072 pid=123`, `sent=265 failed=291`), whitespace-separated.
pub(crate) fn key_values(line: &str) -> Result<BTreeMap<&str, &str>> {
    ensure!(
        !line.trim().is_empty(),
        "an empty line where key=value pairs were expected"
    );
    line.split_whitespace()
        .map(|word| {
            word.split_once('=')
                .with_context(|| format!("{word:?} is not key=value in {line:?}"))
        })
        .collect()
}

/// One named test of a guest run: the facts it saw and what went wrong.
pub(crate) struct TestResult {
    pub(crate) name: String,
    pub(crate) facts: Vec<String>,
    pub(crate) failures: Vec<String>,
}

impl TestResult {
    pub(crate) fn new(name: &str) -> TestResult {
        TestResult {
            name: name.to_string(),
            facts: Vec::new(),
            failures: Vec::new(),
        }
    }

    pub(crate) fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    pub(crate) fn check(&mut self, ok: bool, failure: impl FnOnce() -> String) {
        if !ok {
            self.failures.push(failure());
        }
    }

    /// `ctrace_value == kernel`, where the ctrace side is a JSON number.
    pub(crate) fn check_equal(&mut self, what: &str, ctrace_value: &Value, kernel: u64, kernel_what: &str) {
        self.check(ctrace_value.as_u64() == Some(kernel), || {
            format!("{what} is {ctrace_value}, the kernel's {kernel_what} {kernel}")
        });
    }

    pub(crate) fn line(&self) -> String {
        let facts = self.facts.join(", ");
        if self.passed() {
            format!("{}: ok ({facts})", self.name)
        } else {
            format!("{}: FAILED: {} ({facts})", self.name, self.failures.join("; "))
        }
    }
}

/// Prints the plain `N passed, M failed` line CI reads; an error names the first failure and carries the consoles'
/// ends (`tails`) of the failed guests.
pub(crate) fn finish(suite: &str, results: &[TestResult], tails: &[String]) -> Result<()> {
    let failed: Vec<&TestResult> = results.iter().filter(|t| !t.passed()).collect();
    println!("{} passed, {} failed", results.len() - failed.len(), failed.len());
    if let Some(first) = failed.first() {
        anyhow::bail!(
            "{} of {} {suite} failed; first: {}: {}\n{}",
            failed.len(),
            results.len(),
            first.name,
            first.failures.join("; "),
            tails.join("\n")
        );
    }
    Ok(())
}
