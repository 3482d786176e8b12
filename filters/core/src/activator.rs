//! The activator: requests for a revision that may be scaled to zero are held in the router
//! while the revision wakes, instead of failing (Envoy's router answers 503 before any retry
//! policy when a cluster has no host; only a filter can hold a request).
//!
//! A pure state machine over the revisions the configuration marks as scaling to zero. The
//! shell feeds it requests ([`Activator::admit`]), a clock ([`Activator::tick`]), readiness
//! answers ([`Activator::probed`]) and streams that ended ([`Activator::gone`]), and applies
//! the [`Effect`]s that come back: a readiness probe through Envoy's own cluster for the
//! revision (so Envoy's view decides it is ready), a wake call, resuming or answering a held
//! stream, and the held-requests gauge. The warm path is a map lookup: no call-out.
//!
//! Each revision is `Unknown` (nothing seen yet), `Cold`, `Waking` (held requests, a wake
//! sent) or `Warm`. A warm revision is probed every `probe_ms` in the background, so its going
//! to zero is seen without a request paying for it; a waking one every `wake_probe_ms`.

use std::collections::{BTreeMap, VecDeque};

pub use crate::config::HoldLimits;
use crate::route::Reply;

/// The seconds a refused client is told to wait (`Retry-After`).
pub const RETRY_AFTER_SECS: u64 = 1;

/// What the activator knows of a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warmth {
    Unknown,
    Cold,
    Waking,
    Warm,
}

impl Warmth {
    pub fn as_str(self) -> &'static str {
        match self {
            Warmth::Unknown => "unknown",
            Warmth::Cold => "cold",
            Warmth::Waking => "waking",
            Warmth::Warm => "warm",
        }
    }
}

/// What the shell does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Ask the revision's cluster whether it is ready; answer with [`Activator::probed`].
    Probe(String),
    /// Call whatever starts the revision.
    Wake(String),
    /// Let a held stream go on.
    Resume(u32),
    /// Answer a held stream (503, `Retry-After`, gRPC `UNAVAILABLE`).
    Refuse(u32, Reply),
    /// Add to the revision's held-requests gauge.
    Held(String, i64),
}

/// What to do with a request now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Warm, or not a revision that scales to zero: route it.
    Pass,
    /// Held: the shell pauses the stream until an [`Effect::Resume`] or [`Effect::Refuse`].
    Hold,
    /// Over a cap: answer now.
    Refuse(Reply),
}

#[derive(Debug, Clone, Copy)]
struct Held {
    context: u32,
    since: u64,
    grpc: bool,
}

#[derive(Debug)]
struct RevisionState {
    warmth: Warmth,
    held: VecDeque<Held>,
    last_probe: Option<u64>,
    probing: bool,
    last_wake: Option<u64>,
}

/// The activator of one VM.
#[derive(Debug, Default)]
pub struct Activator {
    limits: HoldLimits,
    revisions: BTreeMap<String, RevisionState>,
}

fn refusal(revision: &str, grpc: bool, why: &str) -> Reply {
    Reply {
        status: 503,
        message: format!("revision {revision} is scaling up from zero and {why}; retry"),
        grpc,
    }
}

impl Activator {
    pub fn new(limits: HoldLimits) -> Activator {
        Activator {
            limits,
            revisions: BTreeMap::new(),
        }
    }

    /// The revisions that may be at zero, after a configuration: new ones start `Unknown`,
    /// known ones keep their state and held requests, others are dropped (their held requests
    /// resumed: the new configuration routes them).
    pub fn watch<'a>(&mut self, revisions: impl IntoIterator<Item = &'a str>) -> Vec<Effect> {
        let wanted: Vec<&str> = revisions.into_iter().collect();
        let mut effects = Vec::new();
        self.revisions.retain(|name, state| {
            let keep = wanted.contains(&name.as_str());
            if !keep {
                release(name, state, &mut effects);
            }
            keep
        });
        for name in wanted {
            self.revisions
                .entry(name.to_owned())
                .or_insert_with(|| RevisionState {
                    warmth: Warmth::Unknown,
                    held: VecDeque::new(),
                    last_probe: None,
                    probing: false,
                    last_wake: None,
                });
        }
        effects
    }

    /// New limits from a new configuration; held requests keep their place.
    pub fn set_limits(&mut self, limits: HoldLimits) {
        self.limits = limits;
    }

    /// Whether the stream `context` is held now.
    pub fn is_held(&self, context: u32) -> bool {
        self.revisions
            .values()
            .any(|s| s.held.iter().any(|h| h.context == context))
    }

    pub fn warmth(&self, revision: &str) -> Option<Warmth> {
        self.revisions.get(revision).map(|s| s.warmth)
    }

    /// Requests held now, in all.
    pub fn held(&self) -> usize {
        self.revisions.values().map(|s| s.held.len()).sum()
    }

    /// A request routed to `revision`, on stream `context`.
    pub fn admit(
        &mut self,
        revision: &str,
        context: u32,
        grpc: bool,
        now: u64,
    ) -> (Admit, Vec<Effect>) {
        let limits = self.limits;
        if self
            .revisions
            .get(revision)
            .is_none_or(|state| state.warmth == Warmth::Warm)
        {
            return (Admit::Pass, Vec::new());
        }
        // Counted only off the warm path.
        let total = self.held();
        let Some(state) = self.revisions.get_mut(revision) else {
            return (Admit::Pass, Vec::new());
        };
        if state.held.len() >= limits.per_revision {
            let why = format!("{} requests already wait for it", limits.per_revision);
            return (Admit::Refuse(refusal(revision, grpc, &why)), Vec::new());
        }
        if total >= limits.total {
            let why = format!("{} requests already wait for revisions", limits.total);
            return (Admit::Refuse(refusal(revision, grpc, &why)), Vec::new());
        }
        state.held.push_back(Held {
            context,
            since: now,
            grpc,
        });
        let mut effects = vec![Effect::Held(revision.to_owned(), 1)];
        if state.warmth != Warmth::Waking {
            state.warmth = Warmth::Waking;
            state.last_wake = Some(now);
            effects.push(Effect::Wake(revision.to_owned()));
        }
        if !state.probing {
            state.probing = true;
            state.last_probe = Some(now);
            effects.push(Effect::Probe(revision.to_owned()));
        }
        (Admit::Hold, effects)
    }

    /// The clock moved: expire held requests, probe, wake again.
    pub fn tick(&mut self, now: u64) -> Vec<Effect> {
        let limits = self.limits;
        let mut effects = Vec::new();
        for (name, state) in &mut self.revisions {
            let mut expired = 0;
            while let Some(first) = state.held.front().copied() {
                if now.saturating_sub(first.since) < limits.hold_ms {
                    break;
                }
                state.held.pop_front();
                let why = format!("was not ready within {}", millis(limits.hold_ms));
                effects.push(Effect::Refuse(
                    first.context,
                    refusal(name, first.grpc, &why),
                ));
                expired += 1;
            }
            if expired > 0 {
                effects.push(Effect::Held(name.clone(), -expired));
            }
            if state.warmth == Warmth::Waking && state.held.is_empty() {
                state.warmth = Warmth::Cold;
            }
            let period = match state.warmth {
                Warmth::Waking | Warmth::Unknown => limits.wake_probe_ms,
                Warmth::Warm => limits.probe_ms,
                // Nothing waits for it: probed at warm's pace, to see it wake by itself.
                Warmth::Cold => limits.probe_ms,
            };
            let due = state
                .last_probe
                .is_none_or(|t| now.saturating_sub(t) >= period);
            if due && !state.probing {
                state.probing = true;
                state.last_probe = Some(now);
                effects.push(Effect::Probe(name.clone()));
            }
            if state.warmth == Warmth::Waking
                && state
                    .last_wake
                    .is_none_or(|t| now.saturating_sub(t) >= limits.rewake_ms)
            {
                state.last_wake = Some(now);
                effects.push(Effect::Wake(name.clone()));
            }
        }
        effects
    }

    /// A readiness answer: ready resumes every request held for the revision.
    pub fn probed(&mut self, revision: &str, ready: bool, _now: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(state) = self.revisions.get_mut(revision) else {
            return effects;
        };
        state.probing = false;
        if ready {
            state.warmth = Warmth::Warm;
            let count = state.held.len() as i64;
            effects.extend(state.held.drain(..).map(|h| Effect::Resume(h.context)));
            if count > 0 {
                effects.push(Effect::Held(revision.to_owned(), -count));
            }
        } else if state.held.is_empty() {
            state.warmth = Warmth::Cold;
        }
        effects
    }

    /// A stream ended (the client went away) while it may have been held.
    pub fn gone(&mut self, context: u32) -> Vec<Effect> {
        for (name, state) in &mut self.revisions {
            if let Some(at) = state.held.iter().position(|h| h.context == context) {
                state.held.remove(at);
                return vec![Effect::Held(name.clone(), -1)];
            }
        }
        Vec::new()
    }
}

/// `1500 ms`, `60 s`.
fn millis(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
}

/// Lets every request held for a revision go on (the configuration no longer holds it).
fn release(name: &str, state: &mut RevisionState, effects: &mut Vec<Effect>) {
    let count = state.held.len() as i64;
    effects.extend(state.held.drain(..).map(|h| Effect::Resume(h.context)));
    if count > 0 {
        effects.push(Effect::Held(name.to_owned(), -count));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activator() -> Activator {
        let mut a = Activator::new(HoldLimits {
            per_revision: 2,
            total: 3,
            hold_ms: 1_000,
            probe_ms: 500,
            wake_probe_ms: 20,
            rewake_ms: 100,
        });
        assert!(a.watch(["r1", "r2"]).is_empty());
        a
    }

    #[test]
    fn a_revision_not_watched_or_warm_passes_without_a_call() {
        let mut a = activator();
        assert_eq!(a.admit("other", 1, false, 0), (Admit::Pass, vec![]));
        assert_eq!(
            a.probed("r1", true, 0),
            Vec::<Effect>::new(),
            "nothing held"
        );
        assert_eq!(a.warmth("r1"), Some(Warmth::Warm));
        assert_eq!(a.admit("r1", 2, false, 1), (Admit::Pass, vec![]));
    }

    #[test]
    fn the_first_held_request_wakes_and_probes_at_once_and_ready_resumes_all() {
        let mut a = activator();
        let (admit, effects) = a.admit("r1", 7, false, 0);
        assert_eq!(admit, Admit::Hold);
        assert_eq!(
            effects,
            vec![
                Effect::Held("r1".into(), 1),
                Effect::Wake("r1".into()),
                Effect::Probe("r1".into())
            ]
        );
        // A second one neither wakes nor probes again while a probe is out.
        assert_eq!(
            a.admit("r1", 8, true, 5).1,
            vec![Effect::Held("r1".into(), 1)]
        );
        assert!(a.probed("r1", false, 10).is_empty());
        assert_eq!(a.warmth("r1"), Some(Warmth::Waking));
        // Probed again on the wake period, woken again on the rewake period.
        assert!(!a.tick(15).contains(&Effect::Probe("r1".into())));
        assert!(a.tick(20).contains(&Effect::Probe("r1".into())));
        assert!(a.tick(100).contains(&Effect::Wake("r1".into())));
        assert_eq!(
            a.probed("r1", true, 120),
            vec![
                Effect::Resume(7),
                Effect::Resume(8),
                Effect::Held("r1".into(), -2)
            ]
        );
        assert_eq!(a.held(), 0);
        assert_eq!(a.admit("r1", 9, false, 130), (Admit::Pass, vec![]));
    }

    #[test]
    fn caps_refuse_at_once_and_the_hold_limit_refuses_late() {
        let mut a = activator();
        assert_eq!(a.admit("r1", 1, false, 0).0, Admit::Hold);
        assert_eq!(a.admit("r1", 2, false, 0).0, Admit::Hold);
        let Admit::Refuse(reply) = a.admit("r1", 3, true, 0).0 else {
            panic!("over the revision's cap")
        };
        assert_eq!((reply.status, reply.grpc), (503, true));
        assert_eq!(a.admit("r2", 4, false, 500).0, Admit::Hold);
        assert!(matches!(a.admit("r2", 5, false, 500).0, Admit::Refuse(_)));
        // The first two were held a second: refused, the gauge back down; r2's stays.
        let effects = a.tick(1_000);
        assert!(matches!(effects[0], Effect::Refuse(1, ref r) if r.status == 503));
        assert!(matches!(effects[1], Effect::Refuse(2, _)));
        assert_eq!(effects[2], Effect::Held("r1".into(), -2));
        assert_eq!(a.held(), 1);
        assert_eq!(a.warmth("r1"), Some(Warmth::Cold));
    }

    #[test]
    fn a_warm_revision_is_probed_in_the_background_and_goes_cold() {
        let mut a = activator();
        a.probed("r1", true, 0);
        a.tick(0);
        a.probed("r1", true, 0);
        assert!(!a.tick(499).contains(&Effect::Probe("r1".into())));
        assert!(a.tick(500).contains(&Effect::Probe("r1".into())));
        assert!(a.probed("r1", false, 510).is_empty());
        assert_eq!(a.warmth("r1"), Some(Warmth::Cold));
        assert_eq!(a.admit("r1", 3, false, 520).0, Admit::Hold);
    }

    #[test]
    fn a_client_that_leaves_is_forgotten_and_a_new_configuration_releases_the_held() {
        let mut a = activator();
        a.admit("r1", 1, false, 0);
        a.admit("r2", 2, false, 0);
        assert_eq!(a.gone(1), vec![Effect::Held("r1".into(), -1)]);
        assert!(a.gone(1).is_empty());
        assert_eq!(
            a.watch(["r1"]),
            vec![Effect::Resume(2), Effect::Held("r2".into(), -1)]
        );
        assert_eq!(a.warmth("r2"), None);
    }
}
