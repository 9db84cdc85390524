//! One module per kernel area. Program names are `<area>_<hook>`.
pub mod conntrack;
pub mod module;
pub mod skb_drop;
pub mod sysctl;
