//! How a drop's reason is decided: the evidence the kfree_skb program gathers and the decision table, kept
//! here so that the same code runs in the kernel and in unit tests.

use crate::{CtStat, Reason};

/// How a drop's reason was decided (`DropEvent::attribution`). Everything but `Uncertain` is exact
/// (within the limits the README's "How exact" table lists).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Attribution {
    /// A conntrack kprobe saw the cause for this very skb (kprobe mode), and the counters agree.
    Probe = 0,
    /// `skb->_nfct` is IP_CT_UNTRACKED (NOTRACK): conntrack never judged the packet, the ruleset dropped it.
    Notrack = 1,
    /// The skb carries a conntrack entry and no conntrack counter moved for it: conntrack accepted it, a rule
    /// dropped it.
    CtAttached = 2,
    /// This CPU's conntrack counters of the netns, and only the ones every increment of which is a dropped
    /// packet (`drop`, `insert_failed`), or none moved at all.
    Counters = 3,
    /// The evidence leaves more than one reason possible (`DropEvent::possible`).
    Uncertain = 4,
    /// ctrace's netfilter hook right after conntrack's (6.4+, armed per netns) saw this very packet leave
    /// conntrack without an entry (`invalid`), or never saw it (dropped before conntrack: `netfilter_rule`).
    Hook = 5,
}

impl Attribution {
    pub const ALL: [Attribution; 6] = [
        Attribution::Probe,
        Attribution::Notrack,
        Attribution::CtAttached,
        Attribution::Counters,
        Attribution::Uncertain,
        Attribution::Hook,
    ];

    pub fn from_u8(v: u8) -> Option<Attribution> {
        Attribution::ALL.get(v as usize).copied()
    }

    pub const fn name(self) -> &'static str {
        match self {
            Attribution::Probe => "probe",
            Attribution::Notrack => "notrack",
            Attribution::CtAttached => "ct_attached",
            Attribution::Counters => "counters",
            Attribution::Uncertain => "uncertain",
            Attribution::Hook => "hook",
        }
    }
}

/// What the kfree_skb program knows about one netfilter drop when it decides the reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    /// `skb->_nfct` has a conntrack entry pointer.
    pub has_ct: bool,
    /// `skb->_nfct == IP_CT_UNTRACKED` (NOTRACK / `CT --notrack` / nft `notrack`).
    pub untracked: bool,
    /// Counter increases on this CPU in this netns since the previous drop there.
    pub delta: CtStat,
    /// False when the baseline the delta was taken against is not known to be right (first drop of an
    /// older netns on this CPU that the loader could not seed, or an evicted baseline): `delta` is then
    /// the absolute counters.
    pub baseline_known: bool,
    /// The kernel counts resolved clashes as `insert_failed` without dropping (before 5.10, RHEL 8).
    pub insert_failed_noisy: bool,
    /// The reason a kprobe left for this very skb (kprobe mode), if any.
    pub probe: Option<Reason>,
    /// Where the conntrack hook is armed in this netns: whether this packet left conntrack's hook without an
    /// entry in its current pass through the hooks (`None`: not armed, no such evidence).
    pub passed_conntrack: Option<bool>,
}

/// The decision: a reason, how it was decided, and (when uncertain) every reason still possible.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub reason: Reason,
    pub attribution: Attribution,
    /// Bit `1 << reason` for each possible reason; only the decided one unless uncertain.
    pub possible: u8,
    /// A probe verdict that the counters contradict (counted; the counters' answer is used).
    pub disagreement: bool,
}

const fn bit(r: Reason) -> u8 {
    1 << r as u8
}

impl Verdict {
    const fn exact(reason: Reason, attribution: Attribution) -> Verdict {
        Verdict {
            reason,
            attribution,
            possible: bit(reason),
            disagreement: false,
        }
    }

    const fn uncertain(reason: Reason, other: Reason) -> Verdict {
        Verdict {
            reason,
            attribution: Attribution::Uncertain,
            possible: bit(reason) | bit(other),
            disagreement: false,
        }
    }
}

/// Who dropped the packet. Kernel facts it rests on (nf_conntrack_core.c, 5.10-6.18):
/// - every `drop` and `insert_failed` increment is a packet conntrack drops, freed by `nf_hook_slow` right
///   after, so the previous drop in this netns on this CPU consumed its own increments: these counters carry
///   no noise (before 5.10 a resolved clash bumps `insert_failed` without a drop: `insert_failed_noisy`);
/// - `invalid` and `error` also count packets that conntrack then lets through, so a delta there may belong
///   to any packet since the previous drop: it cannot tell a conntrack verdict from a ruleset drop;
/// - conntrack clears `_nfct` of a packet it judged invalid, a NOTRACKed packet carries IP_CT_UNTRACKED, and
///   a packet conntrack accepted carries its entry.
#[inline(always)]
pub fn classify(e: &Evidence) -> Verdict {
    if e.untracked {
        return Verdict::exact(Reason::NetfilterRule, Attribution::Notrack);
    }
    // A probe verdict is for this skb; the counters must agree with it.
    if let Some(p) = e.probe {
        let d = &e.delta;
        let agrees = match p {
            Reason::TableFull => !e.has_ct && (d.drop != 0 || !e.baseline_known),
            Reason::InsertFailed => e.has_ct && (d.insert_failed != 0 || !e.baseline_known),
            Reason::Invalid => !e.has_ct && (d.invalid != 0 || d.error != 0 || !e.baseline_known),
            _ => false,
        };
        if agrees {
            return Verdict::exact(p, Attribution::Probe);
        }
        let mut v = classify_by_counters(e);
        v.disagreement = true;
        return v;
    }
    classify_by_counters(e)
}

#[inline(always)]
fn classify_by_counters(e: &Evidence) -> Verdict {
    use Reason::*;
    let d = &e.delta;
    let v = if e.has_ct {
        if d.insert_failed != 0 {
            if e.insert_failed_noisy {
                Verdict::uncertain(InsertFailed, NetfilterRule)
            } else {
                Verdict::exact(InsertFailed, Attribution::Counters)
            }
        } else if d.drop != 0 {
            // Conntrack dropped a packet with an entry attached without an insert failure (an extension
            // that went away during confirm, a helper's sequence adjustment): rare, and not a rule.
            Verdict::uncertain(InsertFailed, NetfilterRule)
        } else {
            Verdict::exact(NetfilterRule, Attribution::CtAttached)
        }
    } else if d.drop != 0 {
        // No entry could be allocated. (The only ct-less drops that also count `invalid` are a TCP
        // reopen race and a truncated DCCP header; `invalid` noise does not change this.)
        Verdict::exact(TableFull, Attribution::Counters)
    } else if let Some(passed) = e.passed_conntrack {
        // Conntrack let this very packet through without an entry (it judged it invalid), or the packet never
        // got past conntrack's hook: a rule before it (raw table) dropped it. Noise cannot fool either.
        return if passed {
            Verdict::exact(Invalid, Attribution::Hook)
        } else {
            Verdict::exact(NetfilterRule, Attribution::Hook)
        };
    } else if d.invalid != 0 || d.error != 0 {
        Verdict::uncertain(Invalid, NetfilterRule)
    } else if d.insert_failed != 0 && !e.insert_failed_noisy {
        // An insert failure whose skb lost its entry: conntrack's, not the ruleset's.
        Verdict::uncertain(InsertFailed, NetfilterRule)
    } else {
        return Verdict::exact(NetfilterRule, Attribution::Counters);
    };
    if !e.baseline_known && v.attribution != Attribution::Uncertain && v.attribution != Attribution::CtAttached {
        // The delta is the counters' absolute value: it may be older than this packet.
        return Verdict::uncertain(v.reason, NetfilterRule);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(has_ct: bool, delta: CtStat) -> Evidence {
        Evidence {
            has_ct,
            delta,
            baseline_known: true,
            ..Evidence::default()
        }
    }

    const INVALID: CtStat = CtStat {
        invalid: 1,
        drop: 0,
        insert_failed: 0,
        early_drop: 0,
        error: 0,
        _pad: 0,
    };

    fn possible(v: &Verdict) -> [bool; Reason::COUNT] {
        Reason::ALL.map(|r| v.possible & (1 << r as u8) != 0)
    }

    #[test]
    fn notrack_is_a_rule_drop_whatever_the_counters_say() {
        let mut e = ev(false, INVALID);
        e.untracked = true;
        e.delta.drop = 3;
        let v = classify(&e);
        assert_eq!((v.reason, v.attribution), (Reason::NetfilterRule, Attribution::Notrack));
    }

    #[test]
    fn invalid_noise_never_makes_a_confident_invalid() {
        // A ct-less drop after accepted invalid packets: conntrack's verdict or a raw-table rule.
        let v = classify(&ev(false, CtStat { invalid: 7, ..INVALID }));
        assert_eq!(v.attribution, Attribution::Uncertain);
        assert_eq!(
            possible(&v),
            [false, false, false, true, true],
            "invalid or netfilter_rule"
        );
        // With an entry attached conntrack accepted the packet: the noise is someone else's.
        let v = classify(&ev(true, CtStat { invalid: 7, ..INVALID }));
        assert_eq!(
            (v.reason, v.attribution),
            (Reason::NetfilterRule, Attribution::CtAttached)
        );
    }

    #[test]
    fn noise_free_counters_are_exact() {
        let v = classify(&ev(
            false,
            CtStat {
                drop: 1,
                invalid: 5,
                ..INVALID
            },
        ));
        assert_eq!((v.reason, v.attribution), (Reason::TableFull, Attribution::Counters));
        let v = classify(&ev(
            true,
            CtStat {
                insert_failed: 1,
                drop: 1,
                invalid: 0,
                ..INVALID
            },
        ));
        assert_eq!((v.reason, v.attribution), (Reason::InsertFailed, Attribution::Counters));
        let v = classify(&ev(false, CtStat::default()));
        assert_eq!(
            (v.reason, v.attribution),
            (Reason::NetfilterRule, Attribution::Counters)
        );
    }

    #[test]
    fn resolved_clashes_counted_as_insert_failed_leave_it_uncertain() {
        let mut e = ev(
            true,
            CtStat {
                insert_failed: 1,
                invalid: 0,
                ..INVALID
            },
        );
        e.insert_failed_noisy = true;
        let v = classify(&e);
        assert_eq!(v.attribution, Attribution::Uncertain);
        assert_eq!(possible(&v), [false, false, true, false, true]);
    }

    #[test]
    fn unknown_baselines_make_counter_evidence_uncertain() {
        let mut e = ev(
            false,
            CtStat {
                drop: 40,
                invalid: 0,
                ..INVALID
            },
        );
        e.baseline_known = false;
        assert_eq!(classify(&e).attribution, Attribution::Uncertain);
        // Nothing ever moved: nothing to doubt.
        let mut e = ev(false, CtStat::default());
        e.baseline_known = false;
        assert_eq!(classify(&e).attribution, Attribution::Counters);
    }

    #[test]
    fn probes_win_when_the_counters_agree_and_are_counted_when_not() {
        let mut e = ev(false, INVALID);
        e.probe = Some(Reason::Invalid);
        let v = classify(&e);
        assert_eq!(
            (v.reason, v.attribution, v.disagreement),
            (Reason::Invalid, Attribution::Probe, false)
        );
        // A table-full mark with no `drop` increment belongs to another packet (nested softirq).
        let mut e = ev(false, CtStat::default());
        e.probe = Some(Reason::TableFull);
        let v = classify(&e);
        assert_eq!(
            (v.reason, v.attribution, v.disagreement),
            (Reason::NetfilterRule, Attribution::Counters, true)
        );
    }

    #[test]
    fn the_conntrack_hook_settles_ct_less_drops_amid_noise() {
        let mut e = ev(false, INVALID);
        e.passed_conntrack = Some(false);
        assert_eq!(
            classify(&e),
            Verdict::exact(Reason::NetfilterRule, Attribution::Hook),
            "never got past conntrack: a rule before it"
        );
        e.passed_conntrack = Some(true);
        assert_eq!(classify(&e), Verdict::exact(Reason::Invalid, Attribution::Hook));
        // Conntrack's own drops still come from the counters; an attached entry or NOTRACK still decides first.
        e.delta.drop = 1;
        e.passed_conntrack = Some(false);
        assert_eq!(classify(&e).reason, Reason::TableFull);
        let mut e = ev(true, CtStat::default());
        e.passed_conntrack = Some(false);
        assert_eq!(classify(&e).attribution, Attribution::CtAttached);
    }
}
