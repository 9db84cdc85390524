//! When to arm the conntrack hook (`probes/conntrack_hook.rs`): in a netns as soon as a drop there came out
//! `uncertain`, once, within the bound; with one notice each time it is armed and one if it cannot be.

use std::collections::BTreeSet;

use crate::{netns::Registry, probes::loader::Tracer, report::Event};

#[derive(Debug, Default)]
pub struct Steering {
    /// Netns with an uncertain drop that the hook has not been tried in yet.
    pub wanted: BTreeSet<u32>,
    /// Netns it was tried in (armed or failed): not tried again this run.
    tried: BTreeSet<u32>,
    said_unavailable: bool,
    /// Netns armed so far.
    pub armed: u64,
    /// Netns with uncertain drops left without the hook because MAX_HOOKED_NETNS were armed (`bounds` says so).
    pub refused: u64,
}

impl Steering {
    /// Notes an uncertain drop in `netns`.
    pub fn uncertain_drop(&mut self, netns: u32) {
        if netns != 0 && !self.tried.contains(&netns) {
            self.wanted.insert(netns);
        }
    }

    /// Arms the hook where it is wanted; returns what to tell the user.
    pub fn steer(&mut self, registry: &Registry, tracer: &mut Tracer) -> Vec<Event> {
        let mut out = vec![];
        if self.wanted.is_empty() {
            return out;
        }
        if let Some(why) = tracer.conntrack_hook_unavailable() {
            if !self.said_unavailable {
                self.said_unavailable = true;
                out.push(Event::notice(format!(
                    "some drops are uncertain (invalid or netfilter_rule); the conntrack hook that settles them \
                     is not available here: {why}"
                )));
            }
            self.tried.append(&mut self.wanted);
            return out;
        }
        for netns in std::mem::take(&mut self.wanted) {
            let label = registry.name(netns).unwrap_or_else(|| netns.to_string());
            let Some(path) = registry.ns_path(netns) else {
                // Not found (yet): the next uncertain drop there asks again.
                continue;
            };
            self.tried.insert(netns);
            match tracer.arm_conntrack_hook(netns, &path) {
                Ok(true) => {
                    self.armed += 1;
                    out.push(Event::notice(format!(
                        "netns {label}: conntrack hook armed (netfilter programs before and after conntrack's): \
                         its ct-less drops are exact from now on"
                    )));
                }
                Ok(false) => self.refused += 1,
                Err(e) => out.push(Event::notice(format!(
                    "netns {label}: the conntrack hook could not be armed: {}",
                    crate::brief(&e)
                ))),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_netns_is_wanted_once() {
        let mut s = Steering::default();
        s.uncertain_drop(7);
        s.uncertain_drop(7);
        s.uncertain_drop(0);
        assert_eq!(s.wanted.iter().copied().collect::<Vec<_>>(), [7]);
        s.tried.insert(7);
        s.wanted.clear();
        s.uncertain_drop(7);
        assert!(s.wanted.is_empty(), "tried already");
    }
}
