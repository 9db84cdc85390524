//! ctrace's kernel programs.
//!
//! One module per kernel area: `probes::skb_drop` sees every packet that netfilter drops
//! (the `skb:kfree_skb` tracepoint) and decides whether conntrack or the ruleset dropped it.
//! Everything heavy (names, netns lookups, aggregation) happens in userspace.
#![no_std]
#![no_main]

mod filter;
mod globals;
mod maps;
mod packet;
mod percpu;
mod probes;
mod stream;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects code that could get here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
