//! The JSON Lines `ctrace-bench` prints (tests/src/bin/ctrace-bench.rs, types in `ctrace_tests::bench`), read back.

use anyhow::{Context as _, Result};
use serde::Deserialize;
use serde_json::Value;

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total_kib: u64,
    pub load_1m: f64,
    /// Tracers of others that ran at the start (`comm pid`).
    #[serde(default)]
    pub other_tracers: Vec<String>,
    pub nf_conntrack_max: u64,
    pub rounds: u32,
    pub counts: Value,
    pub bpftrace_program: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Sample {
    pub workload: String,
    pub condition: String,
    pub round: u32,
    pub threads: usize,
    pub packets: u64,
    /// Wall-clock datagrams per second.
    pub rate: f64,
    /// Datagrams per second of the senders' CPU time.
    #[serde(default)]
    pub cpu_rate: f64,
    pub truth: Truth,
    pub tracer: Option<Tracer>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct Truth {
    pub rule_drops: u64,
    pub drop: u64,
    pub insert_failed: u64,
}

impl Sample {
    /// The rate the report compares: per second of sender CPU time (other load on the machine does not move it),
    /// wall-clock where it was not measured.
    pub fn speed(&self) -> f64 {
        if self.cpu_rate > 0.0 { self.cpu_rate } else { self.rate }
    }
}

impl Truth {
    pub fn netfilter_drops(&self) -> u64 {
        self.rule_drops + self.drop + self.insert_failed
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Tracer {
    pub attach_s: f64,
    pub detach_s: f64,
    pub cpu_s: f64,
    pub peak_rss_kib: u64,
    #[serde(default)]
    pub bpf: Option<BpfStats>,
    pub mode: Option<String>,
    pub eviction_probe: Option<bool>,
    pub ctrace: Option<CtraceTotals>,
    pub mismatch: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct BpfStats {
    pub run_time_ns: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CtraceTotals {
    pub reported: u64,
    pub lost: u64,
}

/// Everything one `ctrace-bench` run printed.
#[derive(Clone, Debug, Default)]
pub struct Run {
    /// Where it ran: `host`, `guest (Debian 6.1)`.
    pub place: String,
    /// Emulated guests: their numbers only say how things compare.
    pub indicative: bool,
    pub machine: Machine,
    pub samples: Vec<Sample>,
    /// The samples as printed, for the JSON report.
    pub raw: Vec<Value>,
    pub load_end: Option<f64>,
    /// The harness broke (the runner's `error` line, or no `done` line).
    pub error: Option<String>,
}

impl Run {
    pub fn new(place: &str, indicative: bool) -> Run {
        Run {
            place: place.to_string(),
            indicative,
            ..Default::default()
        }
    }

    /// Takes one line of the runner's output; lines that are not its JSON are ignored.
    pub fn feed(&mut self, line: &str) -> Result<()> {
        let Ok(v) = serde_json::from_str::<Value>(line.trim()) else {
            return Ok(());
        };
        if let Some(m) = v.get("machine") {
            self.machine = serde_json::from_value(m.clone()).context("a malformed machine line")?;
        } else if let Some(s) = v.get("sample") {
            self.samples
                .push(serde_json::from_value(s.clone()).with_context(|| format!("a malformed sample: {s}"))?);
            self.raw.push(s.clone());
        } else if let Some(d) = v.get("done") {
            self.load_end = d["load_1m"].as_f64();
        } else if let Some(e) = v.get("error") {
            self.error = Some(e.as_str().unwrap_or("unknown error").to_string());
        }
        Ok(())
    }

    /// After the last line: a run without its `done` line broke off.
    pub fn finish(&mut self) {
        if self.error.is_none() && self.load_end.is_none() {
            self.error = Some("the benchmark runner stopped before it finished".into());
        }
    }

    /// The samples of one workload and condition, by round.
    pub fn of(&self, workload: &str, condition: &str) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.workload == workload && s.condition == condition)
            .collect()
    }

    pub fn has(&self, workload: &str) -> bool {
        self.samples.iter().any(|s| s.workload == workload)
    }

    /// ctrace's mode in this run.
    pub fn mode(&self) -> Option<&str> {
        self.samples.iter().find_map(|s| s.tracer.as_ref()?.mode.as_deref())
    }

    /// Tracer samples whose totals differed from the truth, as sentences.
    pub fn mismatches(&self) -> Vec<String> {
        self.samples
            .iter()
            .filter_map(|s| {
                let m = s.tracer.as_ref()?.mismatch.as_ref()?;
                Some(format!(
                    "{}: {} {} round {}: {m}",
                    self.place, s.workload, s.condition, s.round
                ))
            })
            .collect()
    }
}
