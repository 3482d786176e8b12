//! The filters' Envoy stats. Names carry their labels as `.<label>.<value>` pairs, which the
//! bootstrap's `stats_tags` turn into Prometheus labels:
//!
//! | stat | labels | counts |
//! |---|---|---|
//! | `meshserve.requests` | `isvc`, `revision`, `outcome` (`routed`, or `replied_<status>` for the filter's own answers) | requests decided by the router |
//! | `meshserve.canary` | `isvc`, `revision`, `choice` (`split`, `sticky`, `pinned`, `only`) | revision choices |
//! | `meshserve.shadow` | `isvc`, `revision`, `result` (`sent`, `agree`, `disagree`, `unknown`, `error`) | shadow copies and their verdicts |
//! | `meshserve.held` (gauge) | `revision` | requests held now while the revision wakes from zero (the activator) |
//! | `meshserve.errors` | `reason` | requests the router could not decide (host-call failures) |
//! | `meshserve.logger` | `isvc`, `result` (`sent`, `dropped_<status>`, `dropped_unreachable`, `dropped_queue_full`) | payload events handed to the sidecars' intakes, or lost on the way |
//! | `meshserve.transform` | `isvc`, `phase` (`request`, `response`), `outcome` (`ok`, `refused_<status>`, `failed`, `reset`: a response that could not be rewritten after its headers had left, `hold_headers: false`) | requests and responses the transformer rewrote or refused |

use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// Counters by full name, defined on first use.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    ids: HashMap<String, u32>,
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

    fn add(&mut self, kind: MetricType, family: &str, labels: &[(&str, &str)], delta: i64) {
        let mut name = format!("meshserve.{family}");
        for (label, value) in labels {
            name.push('.');
            name.push_str(label);
            name.push('.');
            name.push_str(&clean(value));
        }
        let id = match self.ids.get(&name) {
            Some(id) => *id,
            None => match hostcalls::define_metric(kind, &name) {
                Ok(id) => {
                    self.ids.insert(name, id);
                    id
                }
                Err(status) => {
                    log::warn!("cannot define stat {name}: {status:?}");
                    return;
                }
            },
        };
        if let Err(status) = hostcalls::increment_metric(id, delta) {
            log::warn!("cannot increment stat {id}: {status:?}");
        }
    }
}
