//! `ctrace-testkit`: bounded test traffic and this netns's conntrack counters, for the VM tests' guests (built
//! static) and for the host.
//!
//! - `udp-flows --first F --count N --port P`: one datagram from 127.0.0.1 to each of 127.(1+i>>16).(i>>8).(i&255):P
//!   for i in F..F+N (the same destinations as `TestNetns::udp_flows`).
//! - `tcp-invalid --count N --port P`: N TCP segments with SYN and FIN set to 127.0.0.1:P through a raw socket;
//!   conntrack's `tcp_error()` rejects the flag combination ("invalid tcp flag combination"): `invalid` +1 each and
//!   the packet continues untracked (a `--ctstate INVALID -j DROP` rule then drops it).
//! - `stats`: this netns's `/proc/net/stat/nf_conntrack`, summed over CPUs.
//! - `tcp-peak --count N --port P`: a listener on 0.0.0.0:P and N TCP connections from 127.0.0.1 to the destinations
//!   above, opened without blocking and held open for `--hold-ms`: established connections are ASSURED conntrack
//!   entries, which early_drop cannot evict, so past nf_conntrack_max new SYNs are dropped (table_full) and retried
//!   by TCP. It waits until no connection completed for 250 ms (or `--wait-ms`), closes the ones still connecting
//!   (so TCP does not retry them) and prints `established=<completed> pending=<still connecting, closed>`.
//! - `write-sysctl KEY VALUE`: writes VALUE to `/proc/sys/KEY` (dots as slashes) from this process, so that the
//!   writer's comm is `ctrace-testkit`, and prints `old=<value before> new=<value after> pid=<its pid>`.
//!
//! The traffic commands print `sent=<sends that succeeded> failed=<sends that returned an error>` and the first
//! error on stderr; they fail only when they cannot start (bad arguments, no socket).

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::process::ExitCode;

use anyhow::{Context as _, Result, ensure};
use clap::{Parser, Subcommand};
use ctrace_tests::{
    Counters, MAX_FLOWS, flow_destination,
    packets::{RawTcp, TCP_FIN, TCP_SYN},
};

#[derive(Parser)]
#[command(
    name = "ctrace-testkit",
    about = "Bounded test traffic and conntrack counters for ctrace's tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One UDP datagram from 127.0.0.1 to each of COUNT destinations 127.(1+i>>16).(i>>8&255).(i&255):PORT.
    UdpFlows {
        /// The first flow index i.
        #[arg(long, default_value_t = 0)]
        first: u32,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 9)]
        port: u16,
    },
    /// COUNT TCP segments with SYN|FIN (invalid for conntrack) to 127.0.0.1:PORT through a raw socket.
    TcpInvalid {
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 9)]
        port: u16,
    },
    /// COUNT TCP connections to a local listener on 0.0.0.0:PORT, one per destination as in udp-flows, held open.
    TcpPeak {
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// How long to wait for the connections to complete.
        #[arg(long, default_value_t = 3000)]
        wait_ms: u64,
        /// How long to hold them open once they completed (or the wait ran out).
        #[arg(long, default_value_t = 1000)]
        hold_ms: u64,
    },
    /// Prints this netns's conntrack counters summed over CPUs: `drop=.. early_drop=.. insert_failed=.. invalid=..`.
    Stats,
    /// Writes VALUE to /proc/sys/KEY (KEY dotted, e.g. net.netfilter.nf_conntrack_max) from this process.
    WriteSysctl { key: String, value: String },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::UdpFlows { first, count, port } => udp_flows(first, count, port),
        Command::TcpInvalid { count, port } => tcp_invalid(count, port),
        Command::TcpPeak {
            count,
            port,
            wait_ms,
            hold_ms,
        } => tcp_peak(count, port, wait_ms, hold_ms),
        Command::Stats => stats(),
        Command::WriteSysctl { key, value } => write_sysctl(&key, &value),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ctrace-testkit: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Counts the results of a bounded run of sends and remembers the first error.
#[derive(Default)]
struct Tally {
    sent: u32,
    failed: u32,
    first_error: Option<io::Error>,
}

impl Tally {
    fn record(&mut self, result: io::Result<usize>) {
        match result {
            Ok(_) => self.sent += 1,
            Err(err) => {
                self.failed += 1;
                self.first_error.get_or_insert(err);
            }
        }
    }

    fn report(&self) {
        println!("sent={} failed={}", self.sent, self.failed);
        if let Some(err) = &self.first_error {
            eprintln!("ctrace-testkit: first send error: {err}");
        }
    }
}

fn udp_flows(first: u32, count: u32, port: u16) -> Result<()> {
    let end = first
        .checked_add(count)
        .filter(|&end| end <= MAX_FLOWS)
        .with_context(|| format!("--first + --count must be at most {MAX_FLOWS}"))?;
    let sock = UdpSocket::bind("127.0.0.1:0").context("could not bind a UDP socket to 127.0.0.1")?;
    let mut tally = Tally::default();
    for i in first..end {
        tally.record(sock.send_to(b"x", flow_destination(i, port)));
    }
    tally.report();
    Ok(())
}

/// Most connections `tcp-peak` opens (each takes two file descriptors).
const MAX_PEAK: u32 = 200_000;

fn tcp_peak(count: u32, port: u16, wait_ms: u64, hold_ms: u64) -> Result<()> {
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    ensure!(count <= MAX_PEAK, "--count must be at most {MAX_PEAK}");
    let fds = u64::from(count) * 2 + 64;
    let limit = libc::rlimit {
        rlim_cur: fds,
        rlim_max: fds,
    };
    // SAFETY: a valid rlimit; raising the hard limit needs root (CAP_SYS_RESOURCE), like the rest of the tests.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        anyhow::bail!("could not allow {fds} open files: {}", io::Error::last_os_error());
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
    std::thread::scope(|scope| -> Result<()> {
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
        // --wait-ms ran out.
        const STALL: Duration = Duration::from_millis(250);
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
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
        let pending = {
            let n = pending.len();
            drop(pending);
            n
        };
        if result.is_ok() {
            std::thread::sleep(Duration::from_millis(hold_ms));
        }
        stop.store(true, Ordering::Relaxed);
        let held = acceptor.join().unwrap_or_default();
        drop(clients);
        drop(held);
        result?;
        println!("established={} pending={pending}", count as usize - pending);
        Ok(())
    })
}

/// A TCP socket connecting to `dst` without waiting for the handshake.
fn connect_nonblocking(dst: SocketAddrV4) -> Result<OwnedFd> {
    // SAFETY: socket() has no memory preconditions; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
    ensure!(fd >= 0, "could not open a TCP socket: {}", io::Error::last_os_error());
    // SAFETY: fd is a socket this function just opened.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = sockaddr(dst);
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

fn sockaddr(dst: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: dst.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*dst.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Whether the socket's handshake completed (it has a peer).
fn is_connected(sock: &OwnedFd) -> bool {
    // SAFETY: zeroed sockaddr storage is a valid out-parameter of the size given.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: as above.
    unsafe { libc::getpeername(sock.as_raw_fd(), (&raw mut addr).cast(), &mut len) == 0 }
}

fn tcp_invalid(count: u32, port: u16) -> Result<()> {
    let sock = RawTcp::open()?;
    let mut tally = Tally::default();
    for i in 0..count {
        let sport = 40000 + (i % 20000) as u16;
        tally.record(sock.send(Ipv4Addr::LOCALHOST, sport, port, i, TCP_SYN | TCP_FIN));
    }
    tally.report();
    Ok(())
}

fn stats() -> Result<()> {
    const PATH: &str = "/proc/net/stat/nf_conntrack";
    let text =
        std::fs::read_to_string(PATH).with_context(|| format!("could not read {PATH} (is nf_conntrack loaded?)"))?;
    let c = Counters::parse(&text).with_context(|| format!("could not parse {PATH}"))?;
    println!(
        "drop={} early_drop={} insert_failed={} invalid={}",
        c.drop, c.early_drop, c.insert_failed, c.invalid
    );
    Ok(())
}

/// `/proc/sys/` + the key with dots as slashes; keys that could leave /proc/sys are refused.
fn sysctl_path(key: &str) -> Result<String> {
    ensure!(
        !key.is_empty()
            && key
                .split('.')
                .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')),
        "{key:?} is not a dotted sysctl name such as net.netfilter.nf_conntrack_max"
    );
    Ok(format!("/proc/sys/{}", key.replace('.', "/")))
}

fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = sysctl_path(key)?;
    let read = |what: &str| {
        std::fs::read_to_string(&path)
            .map(|v| v.trim().to_string())
            .with_context(|| format!("could not read {path} {what} writing it"))
    };
    let old = read("before")?;
    std::fs::write(&path, format!("{value}\n")).with_context(|| format!("could not write {value:?} to {path}"))?;
    let new = read("after")?;
    println!("old={old} new={new} pid={}", std::process::id());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_match_the_host_tests() {
        assert_eq!(flow_destination(0, 9).to_string(), "127.1.0.0:9");
        assert_eq!(flow_destination(556, 9).to_string(), "127.1.2.44:9");
        assert_eq!(flow_destination(0x1_02_03, 7).to_string(), "127.2.2.3:7");
        assert_eq!(flow_destination(MAX_FLOWS - 1, 9).to_string(), "127.255.255.255:9");
    }

    #[test]
    fn sysctl_keys_map_to_proc_sys() {
        assert_eq!(
            sysctl_path("net.netfilter.nf_conntrack_max").unwrap(),
            "/proc/sys/net/netfilter/nf_conntrack_max"
        );
        assert!(sysctl_path("net..x").is_err());
        assert!(sysctl_path("net/../../etc").is_err());
        assert!(sysctl_path("").is_err());
    }
}
