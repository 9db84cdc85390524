//! The kernel's own conntrack counters: `/proc/net/stat/nf_conntrack`, one row per possible CPU
//! (hex), read in a given netns. They are the oracle for exact totals.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum CtStatError {
    #[error("empty nf_conntrack stat file")]
    Empty,
    #[error("bad value `{0}` in nf_conntrack stat file")]
    BadValue(String),
}

/// Counters of one netns: per-CPU rows and their sums.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CtStats {
    pub per_cpu: Vec<BTreeMap<String, u64>>,
}

impl CtStats {
    pub fn parse(text: &str) -> Result<CtStats, CtStatError> {
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().ok_or(CtStatError::Empty)?.split_whitespace().collect();
        let mut per_cpu = vec![];
        for line in lines {
            if line.trim().is_empty() {
                continue;
            }
            let mut row = BTreeMap::new();
            for (name, v) in header.iter().zip(line.split_whitespace()) {
                let n = u64::from_str_radix(v, 16).map_err(|_| CtStatError::BadValue(v.to_owned()))?;
                row.insert((*name).to_owned(), n);
            }
            per_cpu.push(row);
        }
        Ok(CtStats { per_cpu })
    }

    /// Sum over CPUs of counter `name` (0 when this kernel has no such counter).
    pub fn total(&self, name: &str) -> u64 {
        self.per_cpu.iter().filter_map(|r| r.get(name)).sum()
    }

    /// One CPU's value of counter `name`.
    pub fn cpu(&self, cpu: usize, name: &str) -> u64 {
        self.per_cpu.get(cpu).and_then(|r| r.get(name)).copied().unwrap_or(0)
    }

    /// Current number of entries (the `entries` column is the netns-wide count on every row).
    pub fn entries(&self) -> u64 {
        self.per_cpu
            .first()
            .and_then(|r| r.get("entries"))
            .copied()
            .unwrap_or(0)
    }
}

/// The counters ctrace compares, as deltas between two snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct CounterDelta {
    pub drop: u64,
    pub early_drop: u64,
    pub insert_failed: u64,
    pub invalid: u64,
}

impl CounterDelta {
    pub fn between(before: &CtStats, after: &CtStats) -> CounterDelta {
        // The kernel's counters are unsigned int per CPU; a module reload zeroes them.
        let d = |name: &str| after.total(name).saturating_sub(before.total(name));
        CounterDelta {
            drop: d("drop"),
            early_drop: d("early_drop"),
            insert_failed: d("insert_failed"),
            invalid: d("invalid"),
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == CounterDelta::default()
    }
}

impl std::ops::Add for CounterDelta {
    type Output = CounterDelta;
    fn add(self, o: CounterDelta) -> CounterDelta {
        CounterDelta {
            drop: self.drop + o.drop,
            early_drop: self.early_drop + o.early_drop,
            insert_failed: self.insert_failed + o.insert_failed,
            invalid: self.invalid + o.invalid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
00000040  00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000000 00000000 00000000 00000002 00000000  00000000 00000000 00000000 00000000\n\
00000040  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000003 000000f1 00000000 00000000  00000000 00000000 00000000 00000000\n";

    #[test]
    fn parses_per_cpu_rows() {
        let s = CtStats::parse(SAMPLE).unwrap();
        assert_eq!(s.per_cpu.len(), 2);
        assert_eq!(s.total("drop"), 241);
        assert_eq!(s.cpu(0, "early_drop"), 2);
        assert_eq!(s.cpu(1, "insert_failed"), 3);
        assert_eq!(s.entries(), 64);
        assert_eq!(s.total("clash_resolve"), 0);
    }

    #[test]
    fn deltas_between_snapshots() {
        let before = CtStats::parse(SAMPLE).unwrap();
        let after = CtStats::parse(&SAMPLE.replace("000000f1", "000000f5")).unwrap();
        let d = CounterDelta::between(&before, &after);
        assert_eq!(
            d,
            CounterDelta {
                drop: 4,
                ..Default::default()
            }
        );
        assert!(
            CounterDelta::between(&after, &before).drop == 0,
            "a reset never goes negative"
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(CtStats::parse("").is_err());
        assert!(CtStats::parse("entries drop\nzz 1\n").is_err());
    }
}
