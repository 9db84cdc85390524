//! Bounded test traffic from the calling thread's netns: distinct UDP flows, invalid TCP segments and a peak of
//! held TCP connections. Used by the tests and by `ctrace-testkit` (the VM demo's traffic).

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

pub use ctrace::demo::flow_destination;

use crate::packets::{RawTcp, TCP_FIN, TCP_SYN};

/// Flow indexes must keep the second address byte at most 255: 1 + (i >> 16) <= 255.
pub const MAX_FLOWS: u32 = 255 << 16;
/// Most connections `tcp_peak` opens (each takes two file descriptors).
pub const MAX_PEAK: u32 = 200_000;

/// The result of a bounded run of sends: how many succeeded, how many the kernel refused, the first error.
#[derive(Debug, Default)]
pub struct Sends {
    pub sent: u32,
    pub failed: u32,
    pub first_error: Option<io::Error>,
}

impl Sends {
    fn record<T>(&mut self, result: io::Result<T>) {
        match result {
            Ok(_) => self.sent += 1,
            Err(err) => {
                self.failed += 1;
                self.first_error.get_or_insert(err);
            }
        }
    }
}

/// One datagram from 127.0.0.1 to `flow_destination(i, port)` for i in first..first + count.
pub fn udp_flows(first: u32, count: u32, port: u16) -> anyhow::Result<Sends> {
    let end = first
        .checked_add(count)
        .filter(|&end| end <= MAX_FLOWS)
        .with_context(|| format!("first + count must be at most {MAX_FLOWS}"))?;
    let sock = UdpSocket::bind("127.0.0.1:0").context("could not bind a UDP socket to 127.0.0.1")?;
    let mut sends = Sends::default();
    for i in first..end {
        sends.record(sock.send_to(b"x", flow_destination(i, port)));
    }
    Ok(sends)
}

/// `count` TCP segments with SYN and FIN set to 127.0.0.1:port through a raw socket: conntrack's `tcp_error()`
/// rejects the flag combination ("invalid tcp flag combination"), counts `invalid` and lets the packet on
/// untracked (a `--ctstate INVALID -j DROP` rule then drops it).
pub fn tcp_invalid(count: u32, port: u16) -> anyhow::Result<Sends> {
    let sock = RawTcp::open()?;
    let mut sends = Sends::default();
    for i in 0..count {
        let sport = 40000 + (i % 20000) as u16;
        sends.record(sock.send(Ipv4Addr::LOCALHOST, sport, port, i, TCP_SYN | TCP_FIN));
    }
    Ok(sends)
}

/// What `tcp_peak` saw: connections that completed, and those still connecting when it gave up (closed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peak {
    pub established: u32,
    pub pending: u32,
}

/// A listener on 0.0.0.0:port and `count` TCP connections from 127.0.0.1 to the flow destinations, opened without
/// blocking and held open for `hold`: established connections are ASSURED conntrack entries, which early_drop
/// cannot evict, so past nf_conntrack_max new SYNs are dropped (table_full) and retried by TCP. It waits until no
/// connection completed for 250 ms (or `wait` ran out), closes the ones still connecting (so TCP does not retry
/// them), holds the rest, then closes everything.
pub fn tcp_peak(count: u32, port: u16, wait: Duration, hold: Duration) -> anyhow::Result<Peak> {
    ensure!(count <= MAX_PEAK, "count must be at most {MAX_PEAK}");
    let fds = u64::from(count) * 2 + 64;
    let limit = libc::rlimit {
        rlim_cur: fds,
        rlim_max: fds,
    };
    // SAFETY: a valid rlimit; raising the hard limit needs root (CAP_SYS_RESOURCE), like the rest of the tests.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        bail!("could not allow {fds} open files: {}", io::Error::last_os_error());
    }
    let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("could not listen on port {port}"))?;
    // A second listen() only raises the backlog (std's default is smaller); the kernel caps it at somaxconn.
    // SAFETY: listen() on a socket this function owns.
    unsafe { libc::listen(listener.as_raw_fd(), 65535) };
    listener
        .set_nonblocking(true)
        .context("could not make the listener non-blocking")?;
    let stop = AtomicBool::new(false);
    let accepted = AtomicU32::new(0);
    std::thread::scope(|scope| {
        let acceptor = scope.spawn(|| {
            let mut held: Vec<TcpStream> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        held.push(stream);
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            held
        });
        let mut clients = Vec::with_capacity(count as usize);
        let mut result = Ok(());
        for i in 0..count {
            match connect_nonblocking(flow_destination(i, port)) {
                Ok(fd) => clients.push(fd),
                Err(err) => {
                    result = Err(err);
                    break;
                }
            }
        }
        // Wait until every connection is accepted, or none was for STALL (the rest wait for a SYN retransmit), or
        // the wait ran out.
        const STALL: Duration = Duration::from_millis(250);
        let deadline = Instant::now() + wait;
        let (mut seen, mut progress) = (0, Instant::now());
        while result.is_ok() && seen < count && Instant::now() < deadline && progress.elapsed() < STALL {
            std::thread::sleep(Duration::from_millis(20));
            let now = accepted.load(Ordering::Relaxed);
            if now != seen {
                (seen, progress) = (now, Instant::now());
            }
        }
        // Connections still in SYN_SENT are closed at once, so that TCP does not retry them while the others are held.
        let (clients, pending): (Vec<OwnedFd>, Vec<OwnedFd>) = clients.into_iter().partition(is_connected);
        let pending = pending.len() as u32;
        if result.is_ok() {
            std::thread::sleep(hold);
        }
        stop.store(true, Ordering::Relaxed);
        let held = acceptor.join().unwrap_or_default();
        drop(clients);
        drop(held);
        result?;
        Ok(Peak {
            established: count - pending,
            pending,
        })
    })
}

/// A TCP socket connecting to `dst` without waiting for the handshake.
fn connect_nonblocking(dst: SocketAddrV4) -> anyhow::Result<OwnedFd> {
    // SAFETY: socket() has no memory preconditions; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
    ensure!(fd >= 0, "could not open a TCP socket: {}", io::Error::last_os_error());
    // SAFETY: fd is a socket this function just opened.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: dst.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*dst.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the address is valid for the length given.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let err = io::Error::last_os_error();
    ensure!(
        rc == 0 || err.raw_os_error() == Some(libc::EINPROGRESS),
        "could not connect to {dst}: {err}"
    );
    Ok(sock)
}

/// Whether the socket's handshake completed (it has a peer).
fn is_connected(sock: &OwnedFd) -> bool {
    // SAFETY: zeroed sockaddr storage is a valid out-parameter of the size given.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: as above.
    unsafe { libc::getpeername(sock.as_raw_fd(), (&raw mut addr).cast(), &mut len) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_past_the_address_space_are_refused() {
        let err = udp_flows(MAX_FLOWS - 1, 2, 9).unwrap_err().to_string();
        assert!(err.contains("at most"), "{err}");
    }
}
