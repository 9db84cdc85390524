//! JSON Lines: every record serialised as it is typed (`report`), one object per line.

use std::io;

use super::{Sink, stdout::Destination};
use crate::report::Event;

pub struct JsonSink<D: Destination> {
    out: D,
}

impl<D: Destination> JsonSink<D> {
    pub fn new(out: D) -> JsonSink<D> {
        JsonSink { out }
    }
}

impl<D: Destination> Sink for JsonSink<D> {
    fn record(&mut self, event: &Event) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, event).map_err(io::Error::from)?;
        self.out.write_all(b"\n")
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn reader_gone(&self) -> bool {
        self.out.reader_gone()
    }
}
