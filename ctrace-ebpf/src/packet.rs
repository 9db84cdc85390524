//! Decodes the flow of a dropped skb from its IP and transport headers.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use ctrace_common::{DropEvent, flags};

use crate::globals::layout;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_DCCP: u8 = 33;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;

#[inline(always)]
unsafe fn read<T>(addr: u64) -> Option<T> {
    unsafe { bpf_probe_read_kernel(addr as *const T).ok() }
}

/// The address of the skb's network header and its first byte (IP version << 4 | IHL).
#[inline(always)]
pub unsafe fn network_header(skb: u64) -> Option<(u64, u8)> {
    unsafe {
        let head: u64 = read(skb + layout!(skb_head) as u64)?;
        let nh_off: u16 = read(skb + layout!(skb_network_header) as u64)?;
        if head == 0 || nh_off == u16::MAX {
            return None;
        }
        let nh = head + nh_off as u64;
        Some((nh, read(nh)?))
    }
}

/// Bytes read at the network header at once: an IPv6 header (40) or an IPv4 header without options (20), and
/// the first 6 bytes of the transport header (ports, or ICMP type, code and id).
const HEADERS: usize = 48;

/// Fills the address, protocol and port fields of `ev` from the skb behind the BTF pointer `skb` (the
/// tracepoint's argument): its header offsets are direct loads, the headers one probe read (two for IPv4 with
/// options). Leaves them zero (and HEADERS_OK unset) when the headers cannot be read.
#[inline(always)]
pub fn decode(skb: *const u8, ev: &mut DropEvent) {
    let _ = unsafe { try_decode(skb, ev) };
}

#[inline(always)]
unsafe fn try_decode(skb: *const u8, ev: &mut DropEvent) -> Option<()> {
    unsafe {
        let head = *(skb.add(layout!(skb_head) as usize) as *const u64);
        let nh_off = *(skb.add(layout!(skb_network_header) as usize) as *const u16);
        if head == 0 || nh_off == u16::MAX {
            return None;
        }
        let nh = head + nh_off as u64;
        let h: [u8; HEADERS] = read(nh)?;
        let transport: [u8; 6] = match h[0] >> 4 {
            4 => {
                // struct iphdr: ihl:4 version:4, ..., frag_off@6, protocol@9, saddr@12, daddr@16
                let ihl = (h[0] & 0x0f) as u64;
                if ihl < 5 {
                    return None;
                }
                ev.ip_version = 4;
                ev.l4proto = h[9];
                ev.saddr[..4].copy_from_slice(&h[12..16]);
                ev.daddr[..4].copy_from_slice(&h[16..20]);
                // Only the first fragment carries the transport header.
                if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
                    ev.flags |= flags::HEADERS_OK;
                    return Some(());
                }
                if ihl == 5 {
                    [h[20], h[21], h[22], h[23], h[24], h[25]]
                } else {
                    read(nh + ihl * 4)?
                }
            }
            6 => {
                // struct ipv6hdr: nexthdr@6, saddr@8, daddr@24. Extension headers are not walked.
                ev.ip_version = 6;
                ev.l4proto = h[6];
                ev.saddr.copy_from_slice(&h[8..24]);
                ev.daddr.copy_from_slice(&h[24..40]);
                [h[40], h[41], h[42], h[43], h[44], h[45]]
            }
            _ => return None,
        };
        match ev.l4proto {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP | IPPROTO_DCCP => {
                ev.sport = u16::from_be_bytes([transport[0], transport[1]]);
                ev.dport = u16::from_be_bytes([transport[2], transport[3]]);
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                // type@0 code@1 id@4
                ev.dport = u16::from_be_bytes([transport[0], transport[1]]);
                ev.sport = u16::from_be_bytes([transport[4], transport[5]]);
            }
            _ => {}
        }
        ev.flags |= flags::HEADERS_OK;
        Some(())
    }
}

/// A hash of the header fields that stay the same while a packet crosses the netfilter hooks (not the
/// TTL, checksum or TOS, which forwarding and mangle rules change), plus the first 8 bytes of its
/// transport header. skb addresses are reused as soon as a packet is freed: this tells the packet a
/// kprobe judged from the next one in the same skb. 0 when the headers cannot be read.
#[inline(always)]
pub fn fingerprint(skb: u64) -> u64 {
    unsafe { try_fingerprint(skb) }.unwrap_or(0)
}

#[inline(always)]
fn mix(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
}

#[inline(always)]
unsafe fn try_fingerprint(skb: u64) -> Option<u64> {
    unsafe {
        let (nh, first) = network_header(skb)?;
        let mut h: u64 = 0x51_7cc1_b727_220a;
        let l4 = match first >> 4 {
            4 => {
                let ip: [u8; 20] = read(nh)?;
                // tot_len, id, frag_off | protocol | saddr | daddr
                h = mix(
                    h,
                    u64::from_ne_bytes([ip[2], ip[3], ip[4], ip[5], ip[6], ip[7], ip[9], 4]),
                );
                h = mix(
                    h,
                    u64::from_ne_bytes([ip[12], ip[13], ip[14], ip[15], ip[16], ip[17], ip[18], ip[19]]),
                );
                if (u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff) != 0 {
                    return Some(h | 1);
                }
                nh + ((ip[0] & 0x0f) as u64) * 4
            }
            6 => {
                let ip: [u8; 40] = read(nh)?;
                // flow label, payload length, next header | saddr | daddr
                h = mix(
                    h,
                    u64::from_ne_bytes([ip[1] & 0x0f, ip[2], ip[3], ip[4], ip[5], ip[6], 6, 0]),
                );
                let mut i = 8;
                while i < 40 {
                    h = mix(
                        h,
                        u64::from_ne_bytes([
                            ip[i],
                            ip[i + 1],
                            ip[i + 2],
                            ip[i + 3],
                            ip[i + 4],
                            ip[i + 5],
                            ip[i + 6],
                            ip[i + 7],
                        ]),
                    );
                    i += 8;
                }
                nh + 40
            }
            _ => return None,
        };
        // Ports and sequence number (TCP), ports, length and checksum (UDP), type, code, id, sequence (ICMP).
        if let Some(t) = read::<u64>(l4) {
            h = mix(h, t);
        }
        Some(h | 1)
    }
}
