//! Checks that do not stop at the first failure, for tests that compare one run with several truths: each failed
//! check is kept and the test panics once, at the end, naming all of them (one wrong total would otherwise hide
//! the others). What a test saw is printed as `case <name>: <fact>` lines, which the VM runner shows next to the
//! test's result.

use std::fmt::{Debug, Display};

#[must_use = "call finish (or finish_all) to fail the test when a check failed"]
pub struct Checks {
    name: String,
    failures: Vec<String>,
    finished: bool,
}

impl Checks {
    pub fn new(name: &str) -> Checks {
        Checks {
            name: name.to_owned(),
            failures: Vec::new(),
            finished: false,
        }
    }

    /// Prints `case <name>: <fact>`.
    pub fn fact(&self, fact: impl Display) {
        println!("case {}: {fact}", self.name);
    }

    pub fn check(&mut self, ok: bool, failure: impl FnOnce() -> String) {
        if !ok {
            self.failures.push(failure());
        }
    }

    /// `got == want`, or a failure `what is <got>, expected <want>`.
    pub fn equal<T: PartialEq + Debug>(&mut self, what: &str, got: T, want: T) {
        self.check(got == want, || format!("{what} is {got:?}, expected {want:?}"));
    }

    /// Every item is `ok`; otherwise a failure `<how many> <what>, e.g. <the first that is not>`.
    pub fn all<T: Display>(&mut self, what: &str, items: impl IntoIterator<Item = T>, ok: impl Fn(&T) -> bool) {
        let bad: Vec<T> = items.into_iter().filter(|item| !ok(item)).collect();
        self.check(bad.is_empty(), || format!("{} {what}, e.g. {}", bad.len(), bad[0]));
    }

    /// The failures so far (for a test that must stop before its remaining checks make sense).
    pub fn failures(&self) -> &[String] {
        &self.failures
    }

    /// Panics when a check failed, with every failure.
    pub fn finish(self) {
        Checks::finish_all([self]);
    }

    /// Panics when a check of any of them failed, with every failure, each under its name.
    pub fn finish_all(all: impl IntoIterator<Item = Checks>) {
        let mut failures = Vec::new();
        let mut checked = 0;
        for mut checks in all {
            checks.finished = true;
            checked += 1;
            failures.extend(checks.failures.drain(..).map(|f| format!("{}: {f}", checks.name)));
        }
        assert!(
            failures.is_empty(),
            "{} failed check(s) in {checked} group(s):\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        // A test that forgot to finish must not pass with failed checks (unless it is already failing).
        if !self.finished && !self.failures.is_empty() && !std::thread::panicking() {
            panic!(
                "{}: checks failed and were never reported: {}",
                self.name,
                self.failures.join("; ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passing_checks_finish_quietly() {
        let mut c = Checks::new("ok");
        c.check(true, || unreachable!());
        c.equal("x", 1, 1);
        c.all("odd numbers", [2, 4], |n| n % 2 == 0);
        c.finish();
    }

    #[test]
    fn every_failure_is_reported_under_its_name() {
        let mut a = Checks::new("a");
        a.equal("total", 3, 2);
        let mut b = Checks::new("b");
        b.check(false, || "no event".into());
        b.check(true, || unreachable!());
        b.all("odd numbers", [2, 3, 5], |n| n % 2 == 0);
        let err = std::panic::catch_unwind(move || Checks::finish_all([a, b])).unwrap_err();
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(msg.starts_with("3 failed check(s) in 2 group(s):"), "{msg}");
        assert!(msg.contains("b: 2 odd numbers, e.g. 3"), "{msg}");
        assert!(
            msg.contains("a: total is 3, expected 2") && msg.contains("b: no event"),
            "{msg}"
        );
    }

    #[test]
    fn unfinished_failures_still_fail() {
        let err = std::panic::catch_unwind(|| {
            let mut c = Checks::new("forgotten");
            c.check(false, || "lost".into());
        })
        .unwrap_err();
        assert!(err.downcast_ref::<String>().unwrap().contains("forgotten"));
    }
}
