//! Keeps a flood from drowning the terminal: above `limit` drops per second, drops are folded
//! into per-second aggregates per (reason, netns, protocol, destination address).

use std::{collections::BTreeMap, net::IpAddr};

use ctrace_common::Reason;

use crate::event::Drop;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AggKey {
    pub reason: Reason,
    /// The `possible` mask of uncertain drops (0 when the reason was exact): they aggregate apart.
    pub uncertain: u8,
    pub netns: u32,
    pub proto: Option<u8>,
    pub dst: Option<IpAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AggValue {
    pub count: u64,
    /// Destination ports seen (ICMP: type << 8 | code), up to `MAX_PORTS` distinct.
    pub dports: std::collections::BTreeSet<u16>,
    pub ports_overflow: bool,
    /// For a folded line: how many other destinations it stands for.
    pub others: u64,
}

const MAX_PORTS: usize = 64;
/// Most (reason, netns, protocol, destination) keys held in one second: past it, a flood's new destinations fold
/// straight into their (reason, netns, protocol) line, so memory stays bounded whatever the traffic (drops still
/// counted; `others` then counts at least the destinations it stands for).
pub const MAX_KEYS: usize = 10_000;

#[derive(Debug)]
pub enum Admit {
    /// Print this drop on its own.
    Print,
    /// Folded into the current second's aggregates.
    Folded,
}

#[derive(Debug)]
pub struct RateLimiter {
    limit: u64,
    in_window: u64,
    aggregating: bool,
    aggs: BTreeMap<AggKey, AggValue>,
}

/// What a window closing produced.
#[derive(Debug, Default)]
pub struct Flush {
    pub aggregates: Vec<(AggKey, AggValue)>,
    /// Some(true): aggregation starts now; Some(false): it ended.
    pub switched: Option<bool>,
}

impl RateLimiter {
    /// `limit == 0` disables aggregation.
    pub fn new(limit: u64) -> Self {
        RateLimiter {
            limit,
            in_window: 0,
            aggregating: false,
            aggs: BTreeMap::new(),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn admit(&mut self, d: &Drop, count: u64) -> Admit {
        if self.limit == 0 || (!self.aggregating && self.in_window + count <= self.limit) {
            self.in_window += count;
            return Admit::Print;
        }
        self.fold(d, count);
        Admit::Folded
    }

    /// Counts `count` drops like `d` into this second's aggregates without printing them (the kernel counted them
    /// in its own aggregates above the rate limit).
    pub fn fold(&mut self, d: &Drop, count: u64) {
        self.in_window += count;
        let mut key = AggKey {
            reason: d.reason,
            uncertain: if d.uncertain() { d.possible } else { 0 },
            netns: d.netns,
            proto: d.flow.as_ref().map(|f| f.proto),
            dst: d.flow.as_ref().map(|f| f.dst),
        };
        if self.aggs.len() >= MAX_KEYS && !self.aggs.contains_key(&key) {
            key.dst = None;
        }
        let v = self.aggs.entry(key).or_default();
        v.count += count;
        if let Some(f) = &d.flow {
            if v.dports.len() < MAX_PORTS {
                v.dports.insert(f.dport);
            } else if !v.dports.contains(&f.dport) {
                v.ports_overflow = true;
            }
        }
    }

    /// Ends the current one-second window.
    pub fn tick(&mut self) -> Flush {
        let over = self.limit != 0 && self.in_window > self.limit;
        let mut flush = Flush {
            aggregates: std::mem::take(&mut self.aggs).into_iter().collect(),
            switched: None,
        };
        if over && !self.aggregating {
            self.aggregating = true;
            flush.switched = Some(true);
        } else if !over && self.aggregating {
            self.aggregating = false;
            flush.switched = Some(false);
        }
        self.in_window = 0;
        flush
    }
}

/// At most `max_lines` aggregates for one second: the busiest destinations (two drops or more)
/// stay on their own lines, everything else folds into one line per (reason, netns, protocol)
/// that counts its destinations and keeps its ports.
pub fn fold(mut aggs: Vec<(AggKey, AggValue)>, max_lines: usize) -> Vec<(AggKey, AggValue)> {
    if aggs.len() <= max_lines {
        return aggs;
    }
    aggs.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(&b.0)));
    let keep = aggs
        .iter()
        .take(max_lines.saturating_sub(1))
        .filter(|(_, v)| v.count >= 2)
        .count();
    let rest = aggs.split_off(keep);
    let mut folded: BTreeMap<AggKey, AggValue> = BTreeMap::new();
    // Lines without a destination (headers unread, or the window's key bound reached) are folded lines
    // already: the rest joins them.
    let (kept, no_dst): (Vec<_>, Vec<_>) = aggs.into_iter().partition(|(k, _)| k.dst.is_some());
    aggs = kept;
    folded.extend(no_dst);
    for (k, v) in rest {
        let e = folded.entry(AggKey { dst: None, ..k }).or_default();
        e.count += v.count;
        e.others += 1 + v.others;
        for p in v.dports {
            if e.dports.len() < MAX_PORTS {
                e.dports.insert(p);
            } else if !e.dports.contains(&p) {
                e.ports_overflow = true;
            }
        }
        e.ports_overflow |= v.ports_overflow;
    }
    aggs.extend(folded);
    aggs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Flow;

    fn drop_to(port: u16) -> Drop {
        Drop {
            ts_ns: 0,
            reason: Reason::TableFull,
            netns: 1,
            cpu: 0,
            flow: Some(Flow {
                proto: 17,
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.0.0.2".parse().unwrap(),
                sport: 1,
                dport: port,
            }),
            process: None,
            new_baseline: false,
            detail: None,
            evicted: false,
            attribution: ctrace_common::Attribution::Counters,
            possible: 1 << ctrace_common::Reason::TableFull as u8,
        }
    }

    #[test]
    fn prints_below_limit_then_aggregates() {
        let mut rl = RateLimiter::new(3);
        let printed = (0..10)
            .filter(|i| matches!(rl.admit(&drop_to(*i), 1), Admit::Print))
            .count();
        assert_eq!(printed, 3);
        let f = rl.tick();
        assert_eq!(f.switched, Some(true));
        assert_eq!(f.aggregates.len(), 1);
        assert_eq!(f.aggregates[0].1.count, 7);
        assert_eq!(f.aggregates[0].1.dports.len(), 7);
        // Still flooding: everything folds.
        for i in 0..5 {
            assert!(matches!(rl.admit(&drop_to(i), 1), Admit::Folded));
        }
        // A quiet second ends aggregation.
        let f = rl.tick();
        assert_eq!(f.switched, None, "5 > 3: still over the limit");
        let f = rl.tick();
        assert_eq!(f.switched, Some(false));
        assert!(matches!(rl.admit(&drop_to(1), 1), Admit::Print));
    }

    #[test]
    fn folding_keeps_busy_destinations_and_counts_the_rest() {
        let mut rl = RateLimiter::new(1);
        for _ in 0..5 {
            rl.admit(&drop_to(7), 1);
        }
        for i in 0..100u16 {
            let mut d = drop_to(80);
            if let Some(f) = d.flow.as_mut() {
                f.dst = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, i as u8));
            }
            rl.admit(&d, 1);
        }
        let lines = fold(rl.tick().aggregates, 10);
        assert_eq!(lines.len(), 2, "{lines:?}");
        // 10.0.0.2 got 4 folded drops (the first was printed): it keeps its own line.
        assert_eq!(lines[0].1.count, 4);
        assert_eq!(lines[1].0.dst, None);
        assert_eq!((lines[1].1.count, lines[1].1.others), (100, 100));
        assert_eq!(lines[1].1.dports.iter().copied().collect::<Vec<_>>(), vec![80]);
    }

    #[test]
    fn zero_limit_prints_everything() {
        let mut rl = RateLimiter::new(0);
        for i in 0..1000 {
            assert!(matches!(rl.admit(&drop_to(i), 1), Admit::Print));
        }
        assert!(rl.tick().aggregates.is_empty());
    }

    #[test]
    fn a_window_holds_a_bounded_number_of_destinations() {
        let mut rl = RateLimiter::new(1);
        let flood = MAX_KEYS as u32 * 3;
        for i in 0..flood {
            let mut d = drop_to(80);
            if let Some(f) = d.flow.as_mut() {
                f.dst = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            }
            rl.admit(&d, 1);
        }
        let aggs = rl.tick().aggregates;
        assert!(aggs.len() <= MAX_KEYS + 1, "{} keys", aggs.len());
        assert_eq!(
            aggs.iter().map(|(_, v)| v.count).sum::<u64>(),
            flood as u64 - 1,
            "every folded drop counted"
        );
        let lines = fold(aggs, 10);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].1.others >= MAX_KEYS as u64 - 1,
            "at least the destinations kept apart"
        );
    }

    #[test]
    fn port_set_is_bounded() {
        let mut rl = RateLimiter::new(1);
        for i in 0..1000 {
            rl.admit(&drop_to(i), 1);
        }
        let f = rl.tick();
        let v = &f.aggregates[0].1;
        assert_eq!(v.count, 999);
        assert_eq!(v.dports.len(), MAX_PORTS);
        assert!(v.ports_overflow);
    }
}
