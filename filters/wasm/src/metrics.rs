//! The filters' Envoy stats. Names carry their labels as `.<label>.<value>` pairs, which the
//! bootstrap's `stats_tags` turn into Prometheus labels:
//!
//! | stat | labels | counts |
//! |---|---|---|
//! | `meshserve.requests` | `isvc`, `revision`, `outcome` (`routed`, or `replied_<status>` for the filter's own answers) | requests decided by the router |
//! | `meshserve.canary` | `isvc`, `revision`, `choice` (`split`, `sticky`, `pinned`, `only`) | revision choices |
//! | `meshserve.shadow` | `isvc`, `revision`, `result` (`sent`, `agree`, `disagree`, `unknown`, `error`) | shadow copies and their verdicts |
//! | `meshserve.held` (gauge) | `revision` | requests held now while the revision wakes from zero (the activator) |
//! | `meshserve.logger` | `isvc`, `result` (`sent`, `dropped_<status>`, `dropped_unreachable`, `dropped_queue_full`) | payload events handed to the sidecars' intakes, or lost on the way |
//! | `meshserve.transform` | `isvc`, `phase` (`request`, `response`), `outcome` (`ok`, `refused_<status>`, `failed`, `reset`: a response that could not be rewritten after its headers had left, `hold_headers: false`) | requests and responses the transformer rewrote or refused |

use std::collections::HashMap;

use meshserve_filter_core::route::Choice;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// Counters by full name, defined on first use.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    ids: HashMap<String, u32>,
    /// The ids a routed request adds to, by InferenceService and revision: found without
    /// building their names, on the hot path.
    routed: HashMap<String, HashMap<String, RoutedIds>>,
}

/// A revision's `requests … outcome.routed` id, and its `canary … choice.<choice>` ids as they
/// are first used.
#[derive(Debug, Default)]
struct RoutedIds {
    requests: Option<u32>,
    canary: HashMap<&'static str, u32>,
}

/// The `choice` label of `meshserve.canary`.
fn choice_label(choice: Choice) -> &'static str {
    match choice {
        Choice::Split => "split",
        Choice::Sticky => "sticky",
        Choice::Pinned => "pinned",
        Choice::Only => "only",
    }
}

/// A stat-name segment: dots would split labels, so they become underscores.
fn clean(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c == '.' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

impl Counters {
    /// Adds one to `meshserve.<family>` with the given labels.
    pub(crate) fn increment(&mut self, family: &str, labels: &[(&str, &str)]) {
        self.add(MetricType::Counter, family, labels, 1);
    }

    /// Adds `delta` to the gauge `meshserve.<family>` (shared by every worker's VM: each adds
    /// its own changes).
    pub(crate) fn add_to_gauge(&mut self, family: &str, labels: &[(&str, &str)], delta: i64) {
        self.add(MetricType::Gauge, family, labels, delta);
    }

    /// Counts a routed request: `requests{isvc, revision, outcome="routed"}` and
    /// `canary{isvc, revision, choice}`.
    pub(crate) fn routed(&mut self, isvc: &str, revision: &str, choice: Choice) {
        let label = choice_label(choice);
        let cached = self
            .routed
            .get(isvc)
            .and_then(|r| r.get(revision))
            .and_then(|ids| Some((ids.requests?, *ids.canary.get(label)?)));
        let (requests, canary) = match cached {
            Some(ids) => ids,
            None => {
                let (isvc_label, revision_label) = (("isvc", isvc), ("revision", revision));
                let requests = self.id(
                    MetricType::Counter,
                    "requests",
                    &[isvc_label, revision_label, ("outcome", "routed")],
                );
                let canary = self.id(
                    MetricType::Counter,
                    "canary",
                    &[isvc_label, revision_label, ("choice", label)],
                );
                // A stat Envoy could not define is logged by `id`.
                let (Some(requests), Some(canary)) = (requests, canary) else {
                    return;
                };
                let ids = self
                    .routed
                    .entry(isvc.to_owned())
                    .or_default()
                    .entry(revision.to_owned())
                    .or_default();
                ids.requests = Some(requests);
                ids.canary.insert(label, canary);
                (requests, canary)
            }
        };
        bump(requests, 1);
        bump(canary, 1);
    }

    fn add(&mut self, kind: MetricType, family: &str, labels: &[(&str, &str)], delta: i64) {
        if let Some(id) = self.id(kind, family, labels) {
            bump(id, delta);
        }
    }

    /// The id of `meshserve.<family>` with `labels`, defined on first use.
    fn id(&mut self, kind: MetricType, family: &str, labels: &[(&str, &str)]) -> Option<u32> {
        let mut name = format!("meshserve.{family}");
        for (label, value) in labels {
            name.push('.');
            name.push_str(label);
            name.push('.');
            name.push_str(&clean(value));
        }
        if let Some(id) = self.ids.get(&name) {
            return Some(*id);
        }
        match hostcalls::define_metric(kind, &name) {
            Ok(id) => {
                self.ids.insert(name, id);
                Some(id)
            }
            Err(status) => {
                log::warn!("cannot define stat {name}: {status:?}");
                None
            }
        }
    }
}

fn bump(id: u32, delta: i64) {
    if let Err(status) = hostcalls::increment_metric(id, delta) {
        log::warn!("cannot increment stat {id}: {status:?}");
    }
}
