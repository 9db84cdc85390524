//! `ctrace-testkit`: bounded test traffic and this netns's conntrack counters, for the VM tests' guests (built
//! static) and for the host.
//!
//! - `udp-flows --first F --count N --port P`: one datagram from 127.0.0.1 to each of 127.(1+i>>16).(i>>8).(i&255):P
//!   for i in F..F+N (the same destinations as `TestNetns::udp_flows`).
//! - `tcp-invalid --count N --port P`: N TCP segments with SYN and FIN set to 127.0.0.1:P through a raw socket;
//!   conntrack's `tcp_error()` rejects the flag combination ("invalid tcp flag combination"): `invalid` +1 each and
//!   the packet continues untracked (a `--ctstate INVALID -j DROP` rule then drops it).
//! - `stats`: this netns's `/proc/net/stat/nf_conntrack`, summed over CPUs.
//!
//! The traffic commands print `sent=<sends that succeeded> failed=<sends that returned an error>` and the first
//! error on stderr; they fail only when they cannot start (bad arguments, no socket).

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::process::ExitCode;

use anyhow::{Context as _, Result, ensure};
use clap::{Parser, Subcommand};
use ctrace_tests::Counters;

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
    /// Prints this netns's conntrack counters summed over CPUs: `drop=.. early_drop=.. insert_failed=.. invalid=..`.
    Stats,
}

/// Flow indexes must keep the second address byte at most 255: 1 + (i >> 16) <= 255.
const MAX_FLOWS: u32 = 255 << 16;

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::UdpFlows { first, count, port } => udp_flows(first, count, port),
        Command::TcpInvalid { count, port } => tcp_invalid(count, port),
        Command::Stats => stats(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ctrace-testkit: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The destination of flow `i`: 127.(1+i>>16).(i>>8&255).(i&255).
fn flow_destination(i: u32, port: u16) -> SocketAddrV4 {
    let [_, b, c, d] = i.to_be_bytes();
    SocketAddrV4::new(Ipv4Addr::new(127, 1 + b, c, d), port)
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

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;

fn tcp_invalid(count: u32, port: u16) -> Result<()> {
    // SAFETY: socket() has no memory preconditions; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    ensure!(
        fd >= 0,
        "could not open a raw TCP socket (needs CAP_NET_RAW): {}",
        io::Error::last_os_error()
    );
    // SAFETY: fd is a socket this function just opened and owns nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let dst = Ipv4Addr::LOCALHOST;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut tally = Tally::default();
    for i in 0..count {
        let sport = 40000 + (i % 20000) as u16;
        let segment = tcp_segment(Ipv4Addr::LOCALHOST, dst, sport, port, i, TCP_SYN | TCP_FIN);
        // SAFETY: the buffer and the address are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                segment.as_ptr().cast(),
                segment.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        tally.record(usize::try_from(n).map_err(|_| io::Error::last_os_error()));
    }
    tally.report();
    Ok(())
}

/// A 20-byte TCP header (no options, no payload) with a correct checksum.
fn tcp_segment(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32, flags: u8) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[12] = 5 << 4; // data offset: 5 words
    h[13] = flags;
    h[14..16].copy_from_slice(&1024u16.to_be_bytes()); // window
    let mut pseudo = Vec::with_capacity(12 + h.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
    pseudo.extend_from_slice(&(h.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&h);
    h[16..18].copy_from_slice(&internet_checksum(&pseudo).to_be_bytes());
    h
}

/// RFC 1071 one's-complement sum.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
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
    fn tcp_checksum_verifies() {
        let (src, dst) = (Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST);
        let h = tcp_segment(src, dst, 40000, 9, 7, TCP_SYN | TCP_FIN);
        assert_eq!(h[13], 0x03);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&h);
        // A segment with its checksum in place sums to all ones.
        assert_eq!(internet_checksum(&pseudo), 0);
    }
}
