//! `ctrace check`: audits conntrack's sizing, the persistence of its settings across reboots and module reloads,
//! the firewall configurations that unload nf_conntrack, what the table holds, its timeouts and the kernel's drop
//! counters. Every finding has a stable id (see [`IDS`] and the README), a severity, evidence and the exact fix.
//!
//! It needs no root: what cannot be read is listed as unreadable. With `--root DIR` every file is read under DIR
//! through [`fsroot::FsRoot`]; sources that only exist on a live host (other network namespaces, the `conntrack`
//! command) are used only when the root is `/`.

pub(crate) mod config;
mod counters;
pub(crate) mod facts;
pub mod fsroot;
pub(crate) mod persistence;
mod reload_traps;
mod report;
mod sizing;
mod table;
mod timeouts;
mod tracking_load;

#[cfg(test)]
pub(crate) mod tests;

use std::{collections::BTreeMap, process::ExitCode};

use crate::cli::CheckArgs;
/// The kernel-version parser and the `/proc/sys` path of a key, for the tests.
pub use facts::{KernelVersion, proc_path};
use fsroot::{FsRoot, ReadError};
pub use report::Report;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn word(self) -> &'static str {
        match self {
            Severity::Info => "INFO",
            Severity::Warning => "WARNING",
            Severity::Critical => "CRITICAL",
        }
    }
}

/// One fact that supports a finding; `source` is `file` or `file:line` when it came from one.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Evidence {
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl Evidence {
    pub fn new(text: impl Into<String>) -> Evidence {
        Evidence {
            text: text.into(),
            source: None,
        }
    }

    pub fn at(text: impl Into<String>, source: impl Into<String>) -> Evidence {
        Evidence {
            text: text.into(),
            source: Some(source.into()),
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Finding {
    pub id: &'static str,
    pub severity: Severity,
    pub title: String,
    pub evidence: Vec<Evidence>,
    /// Commands or config lines, in the order to apply them; empty when there is nothing to fix.
    pub fix: Vec<String>,
}

impl Finding {
    pub fn new(id: &'static str, severity: Severity, title: impl Into<String>) -> Finding {
        debug_assert!(IDS.iter().any(|i| i.id == id), "undocumented finding id {id}");
        Finding {
            id,
            severity,
            title: title.into(),
            evidence: vec![],
            fix: vec![],
        }
    }

    pub fn evidence(mut self, e: Evidence) -> Finding {
        self.evidence.push(e);
        self
    }

    pub fn fix(mut self, line: impl Into<String>) -> Finding {
        self.fix.push(line.into());
        self
    }
}

/// A documented finding id: the README's table is generated from the same words.
pub struct IdInfo {
    pub id: &'static str,
    pub severity: &'static str,
    pub meaning: &'static str,
}

/// Every finding id `ctrace check` can print. Ids are stable: new ones may be added, none renamed.
pub const IDS: &[IdInfo] = &[
    IdInfo {
        id: "CT-SIZE-SUMMARY",
        severity: "info",
        meaning: "count/max/buckets now, fill, max:buckets ratio, memory that max implies, max vs the RAM-based default",
    },
    IdInfo {
        id: "CT-SIZE-FILL",
        severity: "warning ≥ 75 %, critical ≥ 90 %",
        meaning: "a netns's table is nearly full: new flows are dropped (table_full) once it is",
    },
    IdInfo {
        id: "CT-SIZE-HASH-RATIO",
        severity: "warning",
        meaning: "nf_conntrack_max is more than 8 × nf_conntrack_buckets: long hash chains at a full table",
    },
    IdInfo {
        id: "CT-SIZE-MAX-BELOW-DEFAULT",
        severity: "info",
        meaning: "nf_conntrack_max is below what the kernel would choose for this RAM",
    },
    IdInfo {
        id: "CT-SIZE-MAX-MEMORY",
        severity: "warning",
        meaning: "a full table at nf_conntrack_max would take more than 25 % of RAM",
    },
    IdInfo {
        id: "CT-MODULE-NOT-LOADED",
        severity: "info",
        meaning: "nf_conntrack is not loaded: no live values to audit",
    },
    IdInfo {
        id: "CT-PERSIST-NOT-PERSISTED",
        severity: "warning",
        meaning: "a live value differs from the default and no sysctl file (or module option) sets it: lost at reboot and reload",
    },
    IdInfo {
        id: "CT-PERSIST-NOT-IN-EFFECT",
        severity: "warning",
        meaning: "a sysctl file (or module option) sets a value the kernel does not have (typically nf_conntrack loaded after systemd-sysctl ran)",
    },
    IdInfo {
        id: "CT-PERSIST-LOST-ON-RELOAD",
        severity: "warning (info when only the iptables service re-applies it)",
        meaning: "a value persisted only in sysctl files, which nothing re-applies when nf_conntrack is loaded again",
    },
    IdInfo {
        id: "CT-HASHSIZE-AS-SYSCTL",
        severity: "warning (info when built in and applied)",
        meaning: "the hash size is set as net.netfilter.nf_conntrack_buckets in a sysctl file instead of a module option",
    },
    IdInfo {
        id: "CT-HASHSIZE-MODPROBE-BUILTIN",
        severity: "warning",
        meaning: "`options nf_conntrack` in modprobe.d while nf_conntrack is built in: ignored, use the kernel command line",
    },
    IdInfo {
        id: "CT-RELOAD-IPTABLES-UNLOAD",
        severity: "warning",
        meaning: "iptables-config/ip6tables-config unload nf_conntrack on stop/restart and do not re-apply its sysctls",
    },
    IdInfo {
        id: "CT-RELOAD-INITSCRIPT-EDITED",
        severity: "warning",
        meaning: "NF_MODULES_COMMON was edited in the iptables init script to keep nf_conntrack: a package update reverts it",
    },
    IdInfo {
        id: "CT-RELOAD-FIREWALLD-CLEANUP",
        severity: "warning",
        meaning: "firewalld.conf CleanupModulesOnExit=yes: stopping firewalld unloads nf_conntrack",
    },
    IdInfo {
        id: "CT-RELOAD-HOLDERS",
        severity: "info",
        meaning: "what holds the nf_conntrack module now, so whether a firewall stop can unload it",
    },
    IdInfo {
        id: "CT-RELOAD-BUILTIN",
        severity: "info",
        meaning: "nf_conntrack is built in: no reload trap, settings reset only at reboot",
    },
    IdInfo {
        id: "CT-LOAD-TOP",
        severity: "info",
        meaning: "entries per protocol and destination port now",
    },
    IdInfo {
        id: "CT-LOAD-NOTRACK",
        severity: "info (warning when the table is ≥ 50 % full)",
        meaning: "a destination port holds many entries and could be exempted with NOTRACK (rules printed)",
    },
    IdInfo {
        id: "CT-TIMEOUT-TCP-ESTABLISHED",
        severity: "warning",
        meaning: "a long nf_conntrack_tcp_timeout_established with most of a half-full table in ESTABLISHED",
    },
    IdInfo {
        id: "CT-TIMEOUT-BELOW-KEEPALIVE",
        severity: "warning",
        meaning: "nf_conntrack_tcp_timeout_established is shorter than TCP keepalive: idle connections lose their entry",
    },
    IdInfo {
        id: "CT-TIMEOUT-UNREPLIED",
        severity: "warning",
        meaning: "most of a half-full table is UNREPLIED entries waiting for their (udp/syn_sent) timeout",
    },
    IdInfo {
        id: "CT-COUNTER-DROP",
        severity: "warning",
        meaning: "`drop` counter non-zero: packets dropped because the table was full",
    },
    IdInfo {
        id: "CT-COUNTER-EARLY-DROP",
        severity: "warning",
        meaning: "`early_drop` counter non-zero: unassured entries evicted because the table was full",
    },
    IdInfo {
        id: "CT-COUNTER-INSERT-FAILED",
        severity: "warning",
        meaning: "`insert_failed` counter non-zero: new entries could not be confirmed (clashes, long chains)",
    },
    IdInfo {
        id: "CT-COUNTER-INVALID",
        severity: "warning",
        meaning: "`invalid` counter non-zero: packets conntrack could not track",
    },
];

/// `--ignore` value parser: a known id, case-insensitive.
pub fn parse_id(s: &str) -> Result<String, String> {
    let up = s.trim().to_ascii_uppercase();
    if IDS.iter().any(|i| i.id == up) {
        Ok(up)
    } else {
        Err(format!("`{s}` is not a finding id (see `ctrace check` in the README)"))
    }
}

/// Reading state shared by the checks: the file system and what could not be read.
pub struct Ctx<'a> {
    pub fs: &'a FsRoot,
    unreadable: BTreeMap<String, String>,
    findings: Vec<Finding>,
}

impl<'a> Ctx<'a> {
    pub fn new(fs: &'a FsRoot) -> Ctx<'a> {
        Ctx {
            fs,
            unreadable: BTreeMap::new(),
            findings: vec![],
        }
    }

    /// Reads `abs`; a missing file is None without a note, any other failure is noted as unreadable.
    pub fn read(&mut self, abs: &str) -> Option<String> {
        match self.fs.read(abs) {
            Ok(s) => Some(s),
            Err(e) if e.is_not_found() => None,
            Err(e) => {
                self.note(&e);
                None
            }
        }
    }

    /// Reads `abs`, noting it as unreadable even when it is missing (files that should exist).
    pub fn read_expected(&mut self, abs: &str) -> Option<String> {
        match self.fs.read(abs) {
            Ok(s) => Some(s),
            Err(e) => {
                self.note(&e);
                None
            }
        }
    }

    /// Directory entries of `abs` (sorted), None when missing; other failures are noted.
    pub fn read_dir(&mut self, abs: &str) -> Option<Vec<String>> {
        match self.fs.read_dir(abs) {
            Ok(v) => Some(v),
            Err(e) if e.is_not_found() => None,
            Err(e) => {
                self.note(&e);
                None
            }
        }
    }

    pub fn note(&mut self, e: &ReadError) {
        self.unreadable.insert(e.path.clone(), e.reason());
    }

    pub fn unreadable(&mut self, what: impl Into<String>, why: impl Into<String>) {
        self.unreadable.insert(what.into(), why.into());
    }

    pub fn push(&mut self, f: Finding) {
        self.findings.push(f);
    }
}

/// Text from a file or the kernel, made safe to print: control and non-ASCII bytes become `?`, at most 200 chars.
pub fn clean(s: &str) -> String {
    let mut out = crate::sanitize::kernel_str(s.as_bytes());
    if out.len() > 200 {
        out.truncate(197);
        out.push_str("...");
    }
    out
}

/// Runs every check against `fs` and returns the report (ignored ids already removed).
pub fn audit(fs: &FsRoot, ignore: &[String]) -> Report {
    let mut ctx = Ctx::new(fs);
    let facts = facts::gather(&mut ctx);
    sizing::check(&mut ctx, &facts);
    persistence::check(&mut ctx, &facts);
    reload_traps::check(&mut ctx, &facts);
    tracking_load::check(&mut ctx, &facts);
    timeouts::check(&mut ctx, &facts);
    counters::check(&mut ctx, &facts);
    Report::build(fs, &facts, ctx.findings, ctx.unreadable, ignore)
}

/// `ctrace check`: prints the report and returns 0 (clean or info only), 1 (a warning or worse), 2 (usage).
pub fn main(args: CheckArgs) -> ExitCode {
    if args.list_ids {
        for i in IDS {
            println!("{:<30} {:<45} {}", i.id, i.severity, i.meaning);
        }
        return ExitCode::SUCCESS;
    }
    let fs = match FsRoot::new(&args.root) {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("ctrace: {e}");
            return ExitCode::from(2);
        }
    };
    let report = audit(&fs, &args.ignore);
    let text = if args.json { report.to_json() } else { report.to_text() };
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("ctrace: cannot write the report: {e}");
        return ExitCode::from(1);
    }
    ExitCode::from(report.exit_code())
}
