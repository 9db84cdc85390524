//! One module per kernel area. Program names are `<area>_<hook>`.
pub mod skb_drop;
