//! What the console shows, as data: each InferenceService and its revisions, the configured
//! split (the filter configuration `meshserve up` and `meshserve canary` write) beside the split
//! Envoy's router actually made, and each revision's request rate, latency and errors, from
//! Envoy's stats and the revision's sidecar's metrics. Pure functions over text the console
//! fetched, so they are tested without a mesh.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The span the rates, the observed split and the model's latency are measured over.
pub const WINDOW: Duration = Duration::from_secs(10);
/// How long samples are kept (the oldest one in the window is the base).
const KEEP: Duration = Duration::from_secs(60);
/// The least time between two kept samples.
const MIN_GAP: Duration = Duration::from_millis(500);

/// Envoy's stats, from `GET /stats?format=json&usedonly`: counters and gauges by name, and
/// each histogram's quantiles (for Envoy's `supported_quantiles`) over its last flush interval
/// (`None` when it saw nothing then) and since start.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct EnvoyStats {
    pub values: HashMap<String, u64>,
    pub quantiles: Vec<f64>,
    pub histograms: HashMap<String, Vec<(Option<f64>, f64)>>,
}

impl EnvoyStats {
    pub fn parse(json: &str) -> Result<EnvoyStats, String> {
        let doc: Value = serde_json::from_str(json).map_err(|e| format!("Envoy's stats: {e}"))?;
        let mut out = EnvoyStats::default();
        for stat in doc["stats"].as_array().into_iter().flatten() {
            if let (Some(name), Some(value)) = (stat["name"].as_str(), stat["value"].as_u64()) {
                out.values.insert(name.to_owned(), value);
            }
            let histograms = &stat["histograms"];
            if let Some(q) = histograms["supported_quantiles"].as_array() {
                out.quantiles = q.iter().filter_map(Value::as_f64).collect();
            }
            for h in histograms["computed_quantiles"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let Some(name) = h["name"].as_str() else {
                    continue;
                };
                let values = h["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| {
                        (
                            v["interval"].as_f64(),
                            v["cumulative"].as_f64().unwrap_or(0.0),
                        )
                    })
                    .collect();
                out.histograms.insert(name.to_owned(), values);
            }
        }
        Ok(out)
    }

    fn value(&self, name: &str) -> u64 {
        self.values.get(name).copied().unwrap_or(0)
    }

    /// Latency percentiles (ms) of the first of these clusters that answered requests (its
    /// `upstream_rq_time`): over the last flush interval where it saw requests then, else since
    /// start; and which of the two.
    fn latency(&self, clusters: &[String]) -> Option<(Value, &'static str)> {
        let at = |q: f64| self.quantiles.iter().position(|s| (*s - q).abs() < 1e-9);
        let (p50, p90, p99) = (at(50.0)?, at(90.0)?, at(99.0)?);
        let answered: Vec<&Vec<(Option<f64>, f64)>> = clusters
            .iter()
            .filter(|c| self.value(&format!("{c}.upstream_rq_completed")) > 0)
            .filter_map(|c| self.histograms.get(&format!("{c}.upstream_rq_time")))
            .collect();
        let recent = answered
            .iter()
            .find(|h| h.get(p50).is_some_and(|v| v.0.is_some()));
        let (values, span) = match recent {
            Some(h) => (*h, "interval"),
            None => (*answered.first()?, "cumulative"),
        };
        let pick = |i: usize| {
            values.get(i).map(|v| {
                if span == "interval" {
                    v.0.unwrap_or(0.0)
                } else {
                    v.1
                }
            })
        };
        Some((
            json!({"p50": pick(p50), "p90": pick(p90), "p99": pick(p99)}),
            span,
        ))
    }
}

/// One Prometheus histogram of a sidecar, all its label sets summed: cumulative counts by
/// upper bound (seconds), ascending, `+Inf` last.
pub type Buckets = Vec<(f64, f64)>;

/// `request_predict_seconds` (KServe's name: validation, queue and model run) from a sidecar's
/// `/metrics`.
pub fn predict_buckets(metrics: &str) -> Buckets {
    let mut by_bound: Vec<(f64, f64)> = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("request_predict_seconds_bucket{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let bound = labels
            .split(',')
            .find_map(|l| l.trim().strip_prefix("le=\""))
            .and_then(|b| b.strip_suffix('"'))
            .and_then(|b| match b {
                "+Inf" => Some(f64::INFINITY),
                b => b.parse().ok(),
            });
        let (Some(bound), Ok(value)) = (bound, value.trim().parse::<f64>()) else {
            continue;
        };
        match by_bound.iter_mut().find(|(b, _)| *b == bound) {
            Some(entry) => entry.1 += value,
            None => by_bound.push((bound, value)),
        }
    }
    by_bound.sort_by(|a, b| a.0.total_cmp(&b.0));
    by_bound
}

/// The `q` quantile (0..1) of cumulative buckets, interpolated within its bucket as
/// Prometheus' `histogram_quantile` does; `None` with no observations.
pub fn quantile(buckets: &Buckets, q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let share = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                1.0
            };
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

/// `after` less `before`, bucket by bucket (a restarted sidecar's counts start again: then
/// `after` alone).
fn delta(after: &Buckets, before: &Buckets) -> Buckets {
    let diff: Buckets = after
        .iter()
        .map(|&(bound, count)| {
            let old = before
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0.0, |(_, c)| *c);
            (bound, count - old)
        })
        .collect();
    if diff.iter().any(|(_, c)| *c < 0.0) {
        after.clone()
    } else {
        diff
    }
}

/// A revision's counts at one moment, each since Envoy (or its sidecar) started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// Requests the router sent it.
    pub routed: u64,
    /// 5xx answers: its clusters' (client traffic) and the router's own for it.
    pub errors: u64,
    /// 4xx answers from its clusters.
    pub rejected: u64,
    /// The sidecar's predict histogram, where its metrics were read.
    pub predict: Option<Buckets>,
}

/// One reading of every revision, by `(InferenceService, revision)`.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub counts: HashMap<(String, String), Counts>,
}

/// The last minute of samples.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
}

impl History {
    /// Adds `now` (unless the newest sample is under [`MIN_GAP`] old: many pages polling add
    /// no more samples than one) and returns the sample to measure it against: the newest at
    /// least [`WINDOW`] older, else the oldest there is.
    pub fn push(&mut self, now: Sample) -> Option<Sample> {
        while self
            .samples
            .front()
            .is_some_and(|s| now.at.duration_since(s.at) > KEEP)
        {
            self.samples.pop_front();
        }
        let base = self
            .samples
            .iter()
            .rev()
            .find(|s| now.at.duration_since(s.at) >= WINDOW)
            .or_else(|| self.samples.front())
            .cloned();
        let recent = self
            .samples
            .back()
            .is_some_and(|s| now.at.duration_since(s.at) < MIN_GAP);
        if !recent {
            self.samples.push_back(now);
        }
        base
    }
}

/// A revision as the filter configuration names it.
struct Revision<'a> {
    spec: &'a Value,
    role: &'static str,
    /// Its configured share (a shadow's: the share copied to it).
    percent: i64,
}

fn revisions(predictor: &Value) -> Vec<Revision<'_>> {
    let canaries: Vec<&Value> = predictor["canaries"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let canary_total: i64 = canaries.iter().filter_map(|c| c["percent"].as_i64()).sum();
    let mut out = vec![Revision {
        spec: &predictor["default"],
        role: "default",
        percent: 100 - canary_total,
    }];
    out.extend(canaries.into_iter().map(|c| Revision {
        spec: c,
        role: "canary",
        percent: c["percent"].as_i64().unwrap_or(0),
    }));
    if predictor["shadow"].is_object() {
        out.push(Revision {
            spec: &predictor["shadow"],
            role: "shadow",
            percent: predictor["shadow"]["percent"].as_i64().unwrap_or(0),
        });
    }
    out
}

/// The router's count of requests it sent to a revision.
fn routed_stat(isvc: &str, revision: &str) -> String {
    format!("wasmcustom.meshserve.requests.isvc.{isvc}.revision.{revision}.outcome.routed")
}

/// Each revision's counts now, from Envoy's stats and the predict histograms of the sidecars
/// whose metrics were read.
pub fn counts(
    config: &Value,
    stats: &EnvoyStats,
    predict: &HashMap<(String, String), Buckets>,
) -> HashMap<(String, String), Counts> {
    let mut out = HashMap::new();
    for service in config["services"].as_array().into_iter().flatten() {
        let isvc = service["name"].as_str().unwrap_or_default();
        for revision in revisions(&service["predictor"]) {
            let name = revision.spec["name"].as_str().unwrap_or_default();
            let clusters = ["cluster", "grpc_cluster"]
                .map(|c| revision.spec[c].as_str().unwrap_or_default().to_owned());
            let answered = |what: &str| -> u64 {
                clusters
                    .iter()
                    .map(|c| stats.value(&format!("cluster.{c}.external.{what}")))
                    .sum()
            };
            let replied = format!(
                "wasmcustom.meshserve.requests.isvc.{isvc}.revision.{name}.outcome.replied_5"
            );
            let replied_5xx: u64 = stats
                .values
                .iter()
                .filter(|(n, _)| n.starts_with(&replied))
                .map(|(_, v)| v)
                .sum();
            let key = (isvc.to_owned(), name.to_owned());
            let counts = Counts {
                routed: stats.value(&routed_stat(isvc, name)),
                errors: answered("upstream_rq_5xx") + replied_5xx,
                rejected: answered("upstream_rq_4xx"),
                predict: predict.get(&key).cloned(),
            };
            out.insert(key, counts);
        }
    }
    out
}

/// The console's view of the mesh: `config` is the filter configuration, `states` the
/// revisions' states file, `now` this reading and `base` the one it is measured against.
pub fn view(
    config: &Value,
    states: &Value,
    stats: &EnvoyStats,
    now: &Sample,
    base: Option<&Sample>,
) -> Value {
    let seconds = base.map(|b| now.at.duration_since(b.at).as_secs_f64());
    let services: Vec<Value> = config["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|service| {
            let isvc = service["name"].as_str().unwrap_or_default();
            let revisions = revisions(&service["predictor"]);
            let key = |r: &Revision<'_>| {
                (
                    isvc.to_owned(),
                    r.spec["name"].as_str().unwrap_or_default().to_owned(),
                )
            };
            // A count over the window (since start without a base; a count that went down
            // was reset by a restart: then what it has now).
            let windowed = |r: &Revision<'_>, count: fn(&Counts) -> u64| {
                let k = key(r);
                let after = now.counts.get(&k).map_or(0, count);
                match base.and_then(|b| b.counts.get(&k)).map(count) {
                    Some(before) if before <= after => after - before,
                    _ => after,
                }
            };
            let routed = |c: &Counts| c.routed;
            let split_total: u64 = revisions
                .iter()
                .filter(|r| r.role != "shadow")
                .map(|r| windowed(r, routed))
                .sum();
            let rows: Vec<Value> = revisions
                .iter()
                .map(|r| {
                    let k = key(r);
                    let name = k.1.as_str();
                    let cluster = r.spec["cluster"].as_str().unwrap_or_default();
                    let grpc = r.spec["grpc_cluster"].as_str().unwrap_or_default();
                    let latency = stats.latency(&[
                        format!("cluster.{cluster}.external"),
                        format!("cluster.{grpc}.external"),
                    ]);
                    // The model's time over the window: both readings need the sidecar's
                    // metrics (none for a cold revision, or one that did not answer).
                    let after = now.counts.get(&k).and_then(|c| c.predict.as_ref());
                    let model = match base {
                        None => after.cloned(),
                        Some(b) => after.zip(b.counts.get(&k).and_then(|c| c.predict.as_ref()))
                            .map(|(after, before)| delta(after, before)),
                    };
                    let model_ms = |q| {
                        model
                            .as_ref()
                            .and_then(|m| quantile(m, q))
                            .map(|s| s * 1000.0)
                    };
                    let in_window = windowed(r, routed);
                    json!({
                        "name": name,
                        "role": r.role,
                        "percent": r.percent,
                        "state": states[isvc][name].as_str().unwrap_or("warm"),
                        "routed": now.counts.get(&k).map_or(0, |c| c.routed),
                        "observed_percent": (r.role != "shadow" && split_total > 0)
                            .then(|| 100.0 * in_window as f64 / split_total as f64),
                        "rate": seconds.filter(|s| *s > 0.0).map(|s| in_window as f64 / s),
                        "latency_ms": latency.as_ref().map(|l| l.0.clone()),
                        "latency_span": latency.as_ref().map(|l| l.1),
                        "model_ms": model_ms(0.5).map(|p50| json!({"p50": p50, "p99": model_ms(0.99)})),
                        "errors": windowed(r, |c| c.errors),
                        "rejected": windowed(r, |c| c.rejected),
                    })
                })
                .collect();
            json!({
                "name": isvc,
                "namespace": service["namespace"],
                "models": service["models"],
                "transformer": service.get("transformer").cloned().unwrap_or(Value::Null),
                "explainer": service["builtin_explainer"].as_bool().unwrap_or(false),
                "canary": revisions.iter().any(|r| r.role == "canary"),
                "revisions": rows,
                "window_requests": split_total,
            })
        })
        .collect();
    json!({
        "window_s": seconds,
        "services": services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Value {
        json!({"services": [{"name": "digits", "namespace": "default", "models": ["digits"],
            "predictor": {
                "default": {"name": "v1", "cluster": "digits.v1", "grpc_cluster": "digits.v1.grpc"},
                "canaries": [{"name": "v2", "cluster": "digits.v2", "grpc_cluster": "digits.v2.grpc", "percent": 20}],
                "shadow": {"name": "v3", "cluster": "digits.v3", "grpc_cluster": "digits.v3.grpc", "percent": 50}}}]})
    }

    /// The router's counts, and `f` times a set of failures.
    fn stats(v1: u64, v2: u64, f: u64) -> EnvoyStats {
        let text = json!({"stats": [
            {"name": routed_stat("digits", "v1"), "value": v1},
            {"name": routed_stat("digits", "v2"), "value": v2},
            {"name": "cluster.digits.v2.external.upstream_rq_5xx", "value": 2 * f},
            {"name": "cluster.digits.v2.grpc.external.upstream_rq_5xx", "value": f},
            {"name": "wasmcustom.meshserve.requests.isvc.digits.revision.v2.outcome.replied_503", "value": 4 * f},
            {"name": "wasmcustom.meshserve.requests.isvc.digits.revision.v2.outcome.replied_404", "value": 9 * f},
            {"name": "cluster.digits.v1.external.upstream_rq_4xx", "value": 3 * f},
            {"name": "cluster.digits.v1.external.upstream_rq_completed", "value": 80},
            {"name": "cluster.digits.v2.grpc.external.upstream_rq_completed", "value": 20},
            {"histograms": {"supported_quantiles": [0, 50, 90, 99, 100], "computed_quantiles": [
                {"name": "cluster.digits.v1.external.upstream_rq_time", "values": [
                    {"interval": null, "cumulative": 0.1}, {"interval": null, "cumulative": 1.5},
                    {"interval": null, "cumulative": 2.0}, {"interval": null, "cumulative": 4.0},
                    {"interval": null, "cumulative": 9.0}]},
                {"name": "cluster.digits.v2.grpc.external.upstream_rq_time", "values": [
                    {"interval": 0.2, "cumulative": 0.1}, {"interval": 0.5, "cumulative": 1.0},
                    {"interval": 0.7, "cumulative": 2.0}, {"interval": 0.9, "cumulative": 3.0},
                    {"interval": 1.0, "cumulative": 9.0}]}]}}]});
        EnvoyStats::parse(&text.to_string()).unwrap()
    }

    fn sample(at: Instant, stats: &EnvoyStats, predict: Option<Buckets>) -> Sample {
        let mut buckets = HashMap::new();
        if let Some(predict) = predict {
            buckets.insert(("digits".to_owned(), "v1".to_owned()), predict);
        }
        Sample {
            at,
            counts: counts(&config(), stats, &buckets),
        }
    }

    #[test]
    fn the_observed_split_rates_and_latency_over_the_window() {
        let start = Instant::now();
        let before = sample(
            start,
            &stats(100, 10, 1),
            Some(vec![(0.001, 4.0), (0.002, 4.0), (f64::INFINITY, 4.0)]),
        );
        let now_stats = stats(180, 30, 2);
        let now = sample(
            start + Duration::from_secs(10),
            &now_stats,
            Some(vec![(0.001, 8.0), (0.002, 12.0), (f64::INFINITY, 12.0)]),
        );
        let states = json!({"digits": {"v2": "cold"}});
        let view = view(&config(), &states, &now_stats, &now, Some(&before));
        let rows = &view["services"][0]["revisions"];
        assert_eq!(view["window_s"], 10.0);
        assert_eq!(view["services"][0]["window_requests"], 100);
        assert_eq!(rows[0]["name"], "v1");
        assert_eq!(rows[0]["percent"], 80);
        assert_eq!(rows[0]["observed_percent"], 80.0);
        assert_eq!(rows[0]["rate"], 8.0);
        assert_eq!(rows[0]["state"], "warm");
        assert_eq!(rows[0]["latency_span"], "cumulative");
        assert_eq!(
            rows[0]["latency_ms"],
            json!({"p50": 1.5, "p90": 2.0, "p99": 4.0})
        );
        assert_eq!(rows[0]["rejected"], 3);
        // The window's predictions: 4 at most 1 ms, 4 between 1 and 2 ms.
        assert_eq!(rows[0]["model_ms"]["p50"], 1.0);
        let p99 = rows[0]["model_ms"]["p99"].as_f64().unwrap();
        assert!((p99 - 1.98).abs() < 1e-9, "{p99}");
        assert_eq!(rows[1]["role"], "canary");
        assert_eq!(rows[1]["state"], "cold");
        assert_eq!(rows[1]["observed_percent"], 20.0);
        assert_eq!(rows[1]["latency_span"], "interval");
        assert_eq!(rows[1]["latency_ms"]["p50"], 0.5);
        // Over the window: the 5xx answers and the router's 503s, not its 404s.
        assert_eq!(rows[1]["errors"], 2 + 1 + 4);
        assert_eq!(rows[1]["model_ms"], Value::Null);
        assert_eq!(rows[2]["role"], "shadow");
        assert_eq!(rows[2]["percent"], 50);
        assert_eq!(rows[2]["observed_percent"], Value::Null);
    }

    #[test]
    fn no_base_and_no_traffic_show_nothing_measured() {
        let now_stats = EnvoyStats::parse(r#"{"stats": []}"#).unwrap();
        let now = sample(Instant::now(), &now_stats, None);
        let shown = view(&config(), &Value::Null, &now_stats, &now, None);
        let row = &shown["services"][0]["revisions"][0];
        assert_eq!(row["rate"], Value::Null);
        assert_eq!(row["observed_percent"], Value::Null);
        assert_eq!(row["latency_ms"], Value::Null);
        assert!(EnvoyStats::parse("not json").is_err());
        // A base without the sidecar's metrics (it was cold, or did not answer) gives no model
        // time, rather than its counts since start.
        let start = Instant::now();
        let before = sample(start, &now_stats, None);
        let buckets = vec![(0.001, 8.0), (f64::INFINITY, 8.0)];
        let now = sample(start + Duration::from_secs(10), &now_stats, Some(buckets));
        let view_of = |base| view(&config(), &Value::Null, &now_stats, &now, base);
        assert_eq!(
            view_of(Some(&before))["services"][0]["revisions"][0]["model_ms"],
            Value::Null
        );
        assert_eq!(
            view_of(None)["services"][0]["revisions"][0]["model_ms"]["p50"],
            0.5
        );
    }

    #[test]
    fn the_base_is_the_newest_sample_a_window_old() {
        let start = Instant::now();
        let mut history = History::default();
        let at = |s: u64| Sample {
            at: start + Duration::from_secs(s),
            counts: HashMap::new(),
        };
        assert!(history.push(at(0)).is_none());
        // A second page polling at the same moment adds no sample.
        let same = Sample {
            at: start + Duration::from_millis(100),
            counts: HashMap::new(),
        };
        assert_eq!(history.push(same).unwrap().at, start);
        assert_eq!(history.samples.len(), 1);
        assert_eq!(history.push(at(4)).unwrap().at, start);
        assert_eq!(history.push(at(12)).unwrap().at, start);
        assert_eq!(
            history.push(at(15)).unwrap().at,
            start + Duration::from_secs(4)
        );
        // Past a minute, old samples go.
        assert_eq!(
            history.push(at(70)).unwrap().at,
            start + Duration::from_secs(15)
        );
        assert_eq!(history.push(at(200)).map(|s| s.at), None);
    }

    #[test]
    fn predict_buckets_and_quantiles() {
        let metrics = "\
# HELP request_predict_seconds x
request_predict_seconds_bucket{model_name=\"a\",model_version=\"1\",le=\"0.001\"} 2
request_predict_seconds_bucket{model_name=\"a\",model_version=\"1\",le=\"+Inf\"} 4
request_predict_seconds_bucket{model_name=\"b\",model_version=\"1\",le=\"0.001\"} 2
request_predict_seconds_bucket{model_name=\"b\",model_version=\"1\",le=\"+Inf\"} 2
request_predict_seconds_count{model_name=\"a\",model_version=\"1\"} 4
";
        let buckets = predict_buckets(metrics);
        assert_eq!(buckets, vec![(0.001, 4.0), (f64::INFINITY, 6.0)]);
        assert_eq!(quantile(&buckets, 0.5), Some(0.00075));
        // In the +Inf bucket: the highest finite bound.
        assert_eq!(quantile(&buckets, 0.99), Some(0.001));
        assert_eq!(quantile(&Vec::new(), 0.5), None);
        assert_eq!(quantile(&vec![(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        // A restarted sidecar's counts start again.
        let after = vec![(0.001, 1.0), (f64::INFINITY, 1.0)];
        assert_eq!(delta(&after, &buckets), after);
    }
}
