//! Arming and disarming the conntrack hook (`conntrack_hook`) per netns, and telling the kfree_skb program
//! which netns are hooked and where conntrack's own hook functions are.

use std::path::Path;

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap},
};
use ctrace_common::MAX_HOOKED_NETNS;

use super::Tracer;

impl Tracer {
    /// Why the conntrack hook cannot be armed on this kernel (None: it can).
    pub fn conntrack_hook_unavailable(&self) -> Option<&str> {
        self.conntrack_hook.as_ref().err().map(String::as_str)
    }

    /// The netns where the conntrack hook is armed.
    pub fn hooked_netns(&self) -> Vec<u32> {
        self.conntrack_hook
            .as_ref()
            .map(|h| h.armed().collect())
            .unwrap_or_default()
    }

    /// Arms the conntrack hook in `netns`, entered through `path`. Ok(false): not possible here, or
    /// MAX_HOOKED_NETNS are armed already.
    pub fn arm_conntrack_hook(&mut self, netns: u32, path: &Path) -> anyhow::Result<bool> {
        let Ok(hook) = self.conntrack_hook.as_mut() else {
            return Ok(false);
        };
        if hook.is_armed(netns) {
            return Ok(true);
        }
        if hook.armed().count() >= MAX_HOOKED_NETNS as usize {
            return Ok(false);
        }
        let since_ns = hook.arm(netns, path)?;
        if !self.hook_functions_set {
            set_conntrack_hook_functions(&mut self.ebpf)?;
            self.hook_functions_set = true;
        }
        let mut hooked: BpfHashMap<_, u32, u64> =
            BpfHashMap::try_from(self.ebpf.map_mut("HOOKED").context("HOOKED map missing")?)?;
        hooked.insert(netns, since_ns, 0)?;
        self.count_hooked()?;
        Ok(true)
    }

    /// Tells the kfree_skb program how many netns are hooked (none: it skips looking).
    fn count_hooked(&mut self) -> anyhow::Result<()> {
        let hooked: BpfHashMap<_, u32, u64> =
            BpfHashMap::try_from(self.ebpf.map("HOOKED").context("HOOKED map missing")?)?;
        let n = hooked.keys().filter(Result::is_ok).count() as u32;
        let mut count: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut("HOOKED_COUNT").context("HOOKED_COUNT map missing")?)?;
        count.set(0, n, 0)?;
        Ok(())
    }

    /// Unlinks the conntrack hook from `netns` (first the kernel side stops using its evidence).
    pub fn disarm_conntrack_hook(&mut self, netns: u32) {
        if let Some(map) = self.ebpf.map_mut("HOOKED")
            && let Ok(mut hooked) = BpfHashMap::<_, u32, u64>::try_from(map)
        {
            let _ = hooked.remove(&netns);
        }
        let _ = self.count_hooked();
        if let Ok(hook) = self.conntrack_hook.as_mut() {
            hook.disarm(netns);
        }
    }
}

/// Tells the kfree_skb program where conntrack's LOCAL_OUT hook functions are (to see whether conntrack
/// runs for a family in a netns); 0 where not found (nf_conntrack not loaded): no hook evidence then.
pub(super) fn set_conntrack_hook_functions(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let found = crate::kallsyms::addresses(&["ipv4_conntrack_local", "ipv6_conntrack_local"])?;
    let mut fns: Array<_, u64> = Array::try_from(ebpf.map_mut("CT_HOOK_FNS").context("CT_HOOK_FNS map missing")?)?;
    for (i, addr) in found.into_iter().enumerate() {
        fns.set(i as u32, addr.unwrap_or(0), 0)?;
    }
    Ok(())
}
