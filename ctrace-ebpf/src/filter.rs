//! The user's filters (`--netns`, `--proto`, `--port`, `--host`, `--reason`), applied in the
//! kernel so that the exact totals count only what the user asked about.

use ctrace_common::{DropEvent, Reason};

use crate::globals::*;

#[inline(always)]
pub fn wants_netns(netns: u32) -> bool {
    let want = filter_netns();
    want == 0 || want == netns
}

#[inline(always)]
pub fn wants_reason(reason: Reason) -> bool {
    wants_any_reason(1 << reason as u32)
}

/// `possible`: bit `1 << reason` for each reason a drop may have (more than one when uncertain).
#[inline(always)]
pub fn wants_any_reason(possible: u32) -> bool {
    let mask = filter_reasons();
    mask == 0 || mask & possible != 0
}

#[inline(always)]
pub fn wants_flow(ev: &DropEvent) -> bool {
    let proto = filter_l4proto();
    if proto != 0 && proto != ev.l4proto as u32 {
        return false;
    }
    let port = filter_port();
    if port != 0 && port != ev.sport as u32 && port != ev.dport as u32 {
        return false;
    }
    let version = filter_host_version();
    if version != 0 {
        if version != ev.ip_version as u32 {
            return false;
        }
        let host = filter_host();
        let len = if version == 4 { 4 } else { 16 };
        let mut src = true;
        let mut dst = true;
        let mut i = 0;
        while i < len {
            src &= ev.saddr[i] == host[i];
            dst &= ev.daddr[i] == host[i];
            i += 1;
        }
        if !src && !dst {
            return false;
        }
    }
    true
}
