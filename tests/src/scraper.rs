//! A scraper polling ctrace's metrics endpoint on a thread of its own, as Prometheus does (asking for
//! OpenMetrics): every scrape must be answered in full, and no counter may go back between two scrapes (a
//! restart, or a reload that lost counts).

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::prometheus::{PROMETHEUS_ACCEPT, http_get_accepting};

/// Failures kept for the report (the count of all of them is in `scrapes - answered`).
const KEPT_FAILURES: usize = 10;

/// The samples of one scrape: `name{labels}` (as served) to value.
pub type Samples = BTreeMap<String, f64>;

/// What the scraper saw.
#[derive(Debug, Default)]
pub struct ScrapeReport {
    pub scrapes: u64,
    /// Scrapes answered with 200 and a whole exposition (ending in `# EOF`).
    pub answered: u64,
    /// The first scrapes that failed, and why.
    pub failures: Vec<String>,
    /// Counters that were lower than at the scrape before: `series: before -> after`.
    pub went_back: Vec<String>,
    /// The last answered scrape.
    pub last: Samples,
}

/// A thread scraping `http://ADDR/metrics` every `every` until [`Scraper::finish`].
pub struct Scraper {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<ScrapeReport>,
}

impl Scraper {
    pub fn start(addr: &str, every: Duration) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let (addr, stopping) = (addr.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut report = ScrapeReport::default();
            while !stopping.load(Ordering::Relaxed) {
                let next = Instant::now() + every;
                report.scrape(&addr);
                while Instant::now() < next && !stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            report
        });
        Scraper { stop, thread }
    }

    /// One more scrape, then the report.
    pub fn finish(self, addr: &str) -> ScrapeReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = self.thread.join().unwrap_or_default();
        report.scrape(addr);
        report
    }
}

impl ScrapeReport {
    fn scrape(&mut self, addr: &str) {
        self.scrapes += 1;
        let body = match http_get_accepting(addr, "/metrics", PROMETHEUS_ACCEPT) {
            Ok(body) if body.trim_end().ends_with("# EOF") => body,
            Ok(body) => return self.failed(format!("an exposition cut short ({} bytes)", body.len())),
            Err(err) => return self.failed(format!("{err:#}")),
        };
        self.answered += 1;
        self.take(samples(&body));
    }

    /// An answered scrape: its counters against the scrape before (a series that is gone is no going back).
    fn take(&mut self, now: Samples) {
        for (series, &after) in &now {
            if let Some(&before) = self.last.get(series)
                && is_counter(series)
                && after < before
            {
                self.went_back.push(format!("{series}: {before} -> {after}"));
            }
        }
        self.last = now;
    }

    fn failed(&mut self, why: String) {
        if self.failures.len() < KEPT_FAILURES {
            self.failures.push(format!("scrape {}: {why}", self.scrapes));
        }
    }
}

/// OpenMetrics counters' samples end in `_total` (their `_created` samples are timestamps).
fn is_counter(series: &str) -> bool {
    series.split('{').next().is_some_and(|name| name.ends_with("_total"))
}

/// The samples of a text exposition: `name{labels} value` lines, comments skipped.
pub fn samples(body: &str) -> Samples {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of the samples of metric `name` whose labels include every `label="value"` of `with`.
pub fn sum(samples: &Samples, name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            n == name && with.iter().all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_by_label_and_finds_counters_that_went_back() {
        let body = "# TYPE ctrace_drops counter\n\
                    ctrace_drops_total{reason=\"table_full\",certainty=\"exact\"} 5\n\
                    ctrace_drops_total{reason=\"table_full\",certainty=\"uncertain\"} 1\n\
                    ctrace_drops_total{reason=\"invalid\",certainty=\"exact\"} 2\n\
                    ctrace_conntrack_entries{netns=\"1\",netns_name=\"\"} 9\n# EOF\n";
        let s = samples(body);
        assert_eq!(sum(&s, "ctrace_drops_total", &[("reason", "table_full")]), 6.0);
        assert_eq!(sum(&s, "ctrace_drops_total", &[]), 8.0);
        assert_eq!(sum(&s, "ctrace_conntrack_entries", &[("netns", "1")]), 9.0);
        let mut report = ScrapeReport {
            last: s,
            ..Default::default()
        };
        let later = samples(
            "ctrace_drops_total{reason=\"table_full\",certainty=\"exact\"} 4\n\
             ctrace_conntrack_entries{netns=\"1\",netns_name=\"\"} 3\n",
        );
        report.take(later);
        assert_eq!(
            report.went_back,
            ["ctrace_drops_total{reason=\"table_full\",certainty=\"exact\"}: 5 -> 4"]
        );
    }
}
