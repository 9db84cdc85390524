//! Where reports go. The session hands every [`Event`] to each sink; a sink renders what it understands and
//! ignores the rest, so adding a sink (metrics, pcap) touches no other sink and not the session.

mod json;
mod metrics;
mod stdout;
mod text;

pub use json::JsonSink;
pub use metrics::{MetricsError, MetricsSink};
pub use stdout::{Destination, Stdout};
pub use text::{TextSink, summary_text};

use std::io;

use crate::report::{Event, Status};

pub trait Sink: Send {
    /// Takes one record. An error ends the run: the reader went away (`ctrace run | head`) or the sink
    /// cannot go on.
    fn record(&mut self, event: &Event) -> io::Result<()>;

    /// Pushes out what is buffered: after each batch of records, and before the run ends.
    fn flush(&mut self) -> io::Result<()>;

    /// Whether the sink's reader is gone although nothing failed yet (a quiet run's `| head`): checked once
    /// a second.
    fn reader_gone(&self) -> bool {
        false
    }

    /// Whether the sink shows the run's state (`status` is then called once a second; reading the kernel's
    /// totals costs a few map reads, so the session only does it when asked).
    fn wants_status(&self) -> bool {
        false
    }

    /// The run's state now.
    fn status(&mut self, _status: &Status) {}
}

fn stdout_sink(json: bool, offset: time::UtcOffset) -> Box<dyn Sink> {
    use std::io::IsTerminal as _;
    if json {
        Box::new(JsonSink::new(Stdout::new()))
    } else {
        Box::new(TextSink::new(Stdout::new(), offset, io::stdout().is_terminal()))
    }
}

/// Why the sinks asked the run to end.
#[derive(Debug)]
pub enum Ended {
    /// The reader went away (a closed pipe): a normal end, as for `grep`.
    ReaderGone,
    /// Writing failed otherwise.
    Failed(io::Error),
}

/// Every sink of a run.
#[derive(Default)]
pub struct Sinks {
    sinks: Vec<Box<dyn Sink>>,
    ended: Option<Ended>,
}

impl Sinks {
    pub fn new(sinks: Vec<Box<dyn Sink>>) -> Sinks {
        Sinks { sinks, ended: None }
    }

    /// The standard output of `ctrace run`: JSON Lines, or text (highlighted on a terminal).
    pub fn stdout(json: bool, offset: time::UtcOffset) -> Sinks {
        Sinks::new(vec![stdout_sink(json, offset)])
    }

    /// What `ctrace run` asked for: stdout (unless `quiet`) and the metrics endpoint (bound now, so a taken
    /// port fails before anything is attached).
    pub async fn for_run(
        json: bool,
        quiet: bool,
        metrics: Option<std::net::SocketAddr>,
        offset: time::UtcOffset,
    ) -> Result<Sinks, MetricsError> {
        let mut sinks = vec![];
        if !quiet {
            sinks.push(stdout_sink(json, offset));
        }
        if let Some(addr) = metrics {
            sinks.push(Box::new(MetricsSink::bind(addr).await?) as Box<dyn Sink>);
        }
        Ok(Sinks::new(sinks))
    }

    pub fn emit(&mut self, event: Event) {
        self.emit_ref(&event);
    }

    pub fn emit_ref(&mut self, event: &Event) {
        for sink in &mut self.sinks {
            if let Err(e) = sink.record(event) {
                Self::note(&mut self.ended, e);
            }
        }
    }

    pub fn wants_status(&self) -> bool {
        self.sinks.iter().any(|s| s.wants_status())
    }

    pub fn status(&mut self, status: &Status) {
        for sink in self.sinks.iter_mut().filter(|s| s.wants_status()) {
            sink.status(status);
        }
    }

    pub fn flush(&mut self) {
        for sink in &mut self.sinks {
            if let Err(e) = sink.flush() {
                Self::note(&mut self.ended, e);
            }
        }
    }

    fn note(ended: &mut Option<Ended>, e: io::Error) {
        if ended.is_none() {
            *ended = Some(if e.kind() == io::ErrorKind::BrokenPipe {
                Ended::ReaderGone
            } else {
                Ended::Failed(e)
            });
        }
    }

    /// Whether the run should end because of its outputs.
    pub fn ended(&self) -> Option<&Ended> {
        self.ended.as_ref()
    }

    /// Asks every sink whether its reader is gone (once a second: a quiet run writes nothing that could fail).
    pub fn check_readers(&mut self) {
        if self.ended.is_none() && self.sinks.iter().any(|s| s.reader_gone()) {
            self.ended = Some(Ended::ReaderGone);
        }
    }

    /// Takes the failure (not a gone reader) that ended the run, if any.
    pub fn take_failure(&mut self) -> Option<io::Error> {
        match self.ended.take() {
            Some(Ended::Failed(e)) => Some(e),
            other => {
                self.ended = other;
                None
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer the tests can read back.
    #[derive(Clone, Default)]
    pub struct Buf(pub Arc<Mutex<Vec<u8>>>);

    impl Buf {
        pub fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A writer whose reader has gone.
    struct Closed;
    impl stdout::Destination for Closed {}
    impl io::Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    /// A sink that counts what it was given: another sink beside the others.
    struct Counting(Arc<Mutex<usize>>);
    impl Sink for Counting {
        fn record(&mut self, _: &Event) -> io::Result<()> {
            *self.0.lock().unwrap() += 1;
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_sink_gets_every_record_and_a_closed_reader_ends_the_run() {
        let buf = Buf::default();
        let count = Arc::new(Mutex::new(0));
        let mut sinks = Sinks::new(vec![
            Box::new(JsonSink::new(buf.clone())),
            Box::new(Counting(count.clone())),
        ]);
        sinks.emit(Event::notice("one"));
        sinks.emit(Event::notice("two"));
        sinks.flush();
        assert_eq!(buf.text().lines().count(), 2);
        assert_eq!(*count.lock().unwrap(), 2);
        assert!(sinks.ended().is_none());

        let mut sinks = Sinks::new(vec![Box::new(JsonSink::new(Closed)), Box::new(Counting(count.clone()))]);
        sinks.emit(Event::notice("three"));
        sinks.flush();
        assert!(matches!(sinks.ended(), Some(Ended::ReaderGone)));
        assert!(sinks.take_failure().is_none(), "a gone reader is a normal end");
        assert_eq!(*count.lock().unwrap(), 3, "the other sinks still got the record");
    }
}
