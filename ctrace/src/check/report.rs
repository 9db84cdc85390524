//! The report: text for people (grouped by severity, evidence indented, the fix on its own lines) and one JSON
//! document for machines (schema in the README).

use std::{collections::BTreeMap, fmt::Write as _};

use super::{
    Finding, IDS, Severity, clean,
    facts::{Facts, KEY_BUCKETS, KEY_COUNT, KEY_MAX},
    fsroot::FsRoot,
};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Unreadable {
    pub path: String,
    pub error: String,
}

/// The table's numbers, for machines (null when unknown).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TableFacts {
    pub count: Option<u64>,
    pub max: Option<u64>,
    pub buckets: Option<u64>,
    pub entry_size_bytes: Option<u64>,
    pub entry_size_source: String,
    pub default_max: Option<u64>,
    pub default_buckets: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Counts {
    pub critical: usize,
    pub warning: usize,
    pub info: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub root: String,
    pub kernel: Option<String>,
    /// `module`, `builtin`, `not_loaded` or `unknown`.
    pub nf_conntrack: &'static str,
    #[serde(skip)]
    pub nf_conntrack_text: &'static str,
    pub table: TableFacts,
    pub findings: Vec<Finding>,
    pub unreadable: Vec<Unreadable>,
    /// Ids given with --ignore; `suppressed` counts the findings they removed.
    pub ignored: Vec<String>,
    pub suppressed: usize,
    pub counts: Counts,
    pub exit_code: u8,
}

fn id_rank(id: &str) -> usize {
    IDS.iter().position(|i| i.id == id).unwrap_or(usize::MAX)
}

impl Report {
    pub fn build(
        fs: &FsRoot,
        facts: &Facts,
        mut findings: Vec<Finding>,
        unreadable: BTreeMap<String, String>,
        ignore: &[String],
    ) -> Report {
        let before = findings.len();
        findings.retain(|f| !ignore.iter().any(|i| i == f.id));
        let suppressed = before - findings.len();
        findings.sort_by(|a, b| b.severity.cmp(&a.severity).then(id_rank(a.id).cmp(&id_rank(b.id))));
        let mut counts = Counts::default();
        for f in &findings {
            match f.severity {
                Severity::Critical => counts.critical += 1,
                Severity::Warning => counts.warning += 1,
                Severity::Info => counts.info += 1,
            }
        }
        let exit_code = if counts.critical + counts.warning > 0 { 1 } else { 0 };
        let defaults = facts.defaults();
        let mut ignored: Vec<String> = ignore.to_vec();
        ignored.sort();
        ignored.dedup();
        Report {
            root: clean(&fs.root().to_string_lossy()),
            kernel: facts.kernel.as_ref().map(|k| k.release.clone()),
            nf_conntrack: facts.module.key(),
            nf_conntrack_text: facts.module.describe(),
            table: TableFacts {
                count: facts.live_u64(KEY_COUNT),
                max: facts.live_u64(KEY_MAX),
                buckets: facts.live_u64(KEY_BUCKETS),
                entry_size_bytes: facts.entry_size.bytes(),
                entry_size_source: facts.entry_size.describe(),
                default_max: defaults.as_ref().map(|d| d.max),
                default_buckets: defaults.as_ref().map(|d| d.buckets),
            },
            findings,
            unreadable: unreadable
                .into_iter()
                .map(|(path, error)| Unreadable { path, error })
                .collect(),
            ignored,
            suppressed,
            counts,
            exit_code,
        }
    }

    pub fn exit_code(&self) -> u8 {
        self.exit_code
    }

    #[cfg(test)]
    pub fn ids(&self) -> Vec<&'static str> {
        self.findings.iter().map(|f| f.id).collect()
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| serde_json::json!({"error": format!("cannot serialise the report: {e}")}).to_string());
        s.push('\n');
        s
    }

    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "ctrace check: root {}, kernel {}, nf_conntrack {}",
            self.root,
            self.kernel.as_deref().unwrap_or("unknown"),
            self.nf_conntrack_text
        );
        for sev in [Severity::Critical, Severity::Warning, Severity::Info] {
            let group: Vec<&Finding> = self.findings.iter().filter(|f| f.severity == sev).collect();
            if group.is_empty() {
                continue;
            }
            let _ = writeln!(o, "\n{} ({})", sev.word(), group.len());
            for f in group {
                let _ = writeln!(o, "\n  {}  {}", f.id, f.title);
                for e in &f.evidence {
                    match &e.source {
                        Some(src) => {
                            let _ = writeln!(o, "      - {}  [{src}]", e.text);
                        }
                        None => {
                            let _ = writeln!(o, "      - {}", e.text);
                        }
                    }
                }
                for (i, line) in f.fix.iter().enumerate() {
                    let lead = if i == 0 { "    fix:" } else { "        " };
                    let _ = writeln!(o, "{lead} {line}");
                }
            }
        }
        if !self.unreadable.is_empty() {
            let _ = writeln!(o, "\nCOULD NOT READ ({})", self.unreadable.len());
            for u in &self.unreadable {
                let _ = writeln!(o, "      - {}: {}", u.path, u.error);
            }
        }
        if !self.ignored.is_empty() {
            let _ = writeln!(
                o,
                "\nignored: {} ({} finding(s) suppressed)",
                self.ignored.join(", "),
                self.suppressed
            );
        }
        let _ = writeln!(
            o,
            "\nresult: {} critical, {} warning, {} info -> exit {}",
            self.counts.critical, self.counts.warning, self.counts.info, self.exit_code
        );
        o
    }
}
