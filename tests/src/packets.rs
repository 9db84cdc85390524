//! Hand-made packets: TCP segments with flag combinations conntrack rejects, sent through a raw socket.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Result, ensure};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;

/// A raw IPv4 TCP socket (needs CAP_NET_RAW) in the netns of the thread that opened it.
pub struct RawTcp {
    sock: OwnedFd,
}

impl RawTcp {
    pub fn open() -> Result<RawTcp> {
        // SAFETY: socket() has no memory preconditions; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        ensure!(
            fd >= 0,
            "could not open a raw TCP socket (needs CAP_NET_RAW): {}",
            io::Error::last_os_error()
        );
        // SAFETY: fd is a socket just opened and owned by nothing else.
        Ok(RawTcp {
            sock: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Sends one 20-byte segment from 127.0.0.1:`sport` to `dst`:`dport`. SYN|FIN is what conntrack's
    /// `tcp_error()` rejects as "invalid tcp flag combination": `invalid` +1, the packet goes on untracked.
    pub fn send(&self, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32, flags: u8) -> io::Result<usize> {
        self.send_from(Ipv4Addr::LOCALHOST, dst, sport, dport, seq, flags)
    }

    /// As [`RawTcp::send`] from `src`, which must be the address the route to `dst` leaves from (the kernel
    /// fills in the IP header; the TCP checksum covers both addresses).
    pub fn send_from(
        &self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        seq: u32,
        flags: u8,
    ) -> io::Result<usize> {
        let segment = tcp_segment(src, dst, sport, dport, seq, flags);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the buffer and the address are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.sock.as_raw_fd(),
                segment.as_ptr().cast(),
                segment.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

/// A 20-byte TCP header (no options, no payload) with a correct checksum.
pub fn tcp_segment(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32, flags: u8) -> [u8; 20] {
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
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

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
