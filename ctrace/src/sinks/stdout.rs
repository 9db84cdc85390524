//! Standard output as a sink's destination: buffered (one write per batch of records, not per line) and
//! watched for a reader that went away, so `ctrace run --json | head -1` ends by itself as `grep` does.

use std::{
    io::{self, Write},
    os::fd::AsFd as _,
};

/// Where a text or JSON sink writes.
pub trait Destination: Write + Send {
    /// Whether the reader is gone although no write failed yet (a quiet run writes nothing for long).
    fn reader_gone(&self) -> bool {
        false
    }
}

/// Standard output behind a 64 KiB buffer (Rust's own stdout writes every line at once). Rust ignores
/// SIGPIPE, so a closed pipe is an EPIPE write error.
pub struct Stdout {
    out: io::BufWriter<Box<dyn Write + Send>>,
}

impl Stdout {
    pub fn new() -> Stdout {
        // A duplicate of fd 1 as a plain file: unbuffered, so the BufWriter decides when to write.
        let out: Box<dyn Write + Send> = match io::stdout().as_fd().try_clone_to_owned() {
            Ok(fd) => Box::new(std::fs::File::from(fd)),
            Err(_) => Box::new(io::stdout()),
        };
        Stdout {
            out: io::BufWriter::with_capacity(64 * 1024, out),
        }
    }
}

impl Default for Stdout {
    fn default() -> Self {
        Stdout::new()
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl Destination for Stdout {
    fn reader_gone(&self) -> bool {
        let mut fd = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let n = unsafe { libc::poll(&mut fd, 1, 0) };
        n == 1 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
    }
}

impl Destination for io::Sink {}

#[cfg(test)]
impl Destination for super::tests::Buf {}
