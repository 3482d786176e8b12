//! Payload logging's native half: the log intake (events from the `logger` filter, on the
//! sidecar's REST port at `POST /meshserve/events`), the durable spool behind it, delivery to
//! the sink, and `meshserve log-sink`, a CloudEvents receiver to try it with.
//!
//! - [`spool`]: the on-disk queue (group-committed fsync before acknowledging; bounded).
//! - [`delivery`]: in order, at least once, with retries and backoff, to an HTTP CloudEvents
//!   sink or a JSON-lines file.
//! - [`receiver`]: writes what it gets as JSON lines (like KServe's message-dumper).

pub mod delivery;
pub mod receiver;
pub mod spool;

use std::path::PathBuf;

use base64::Engine;
use meshserve_filter_core::logger::{EXCHANGES_CONTENT_TYPE, Event, decode_exchanges, events};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use self::delivery::SinkSpec;
use self::spool::{Spool, SpoolError};

/// Payload logging's settings on a sidecar (`meshserve serve --log-*`).
#[derive(Debug, Clone)]
pub struct PayloadSettings {
    pub sink: SinkSpec,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
}

/// The metrics, on the sidecar's `/metrics`.
#[derive(Debug, Clone)]
pub struct PayloadMetrics {
    pub received: IntCounter,
    pub spool_bytes: IntGauge,
    pub delivered: IntCounter,
    pub retried: IntCounter,
    pub dropped: IntCounterVec,
}

impl PayloadMetrics {
    pub fn new(registry: &Registry) -> Result<PayloadMetrics, prometheus::Error> {
        let metrics = PayloadMetrics {
            received: IntCounter::new(
                "meshserve_payload_events_received_total",
                "Payload events the log intake acknowledged (spooled and synced)",
            )?,
            spool_bytes: IntGauge::new(
                "meshserve_payload_spool_bytes",
                "Bytes of the payload spool on disk",
            )?,
            delivered: IntCounter::new(
                "meshserve_payload_events_delivered_total",
                "Payload events the sink took",
            )?,
            retried: IntCounter::new(
                "meshserve_payload_events_retried_total",
                "Delivery attempts that failed and were retried",
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "meshserve_payload_events_dropped_total",
                    "Payload events refused or lost, by reason",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(metrics.received.clone()))?;
        registry.register(Box::new(metrics.spool_bytes.clone()))?;
        registry.register(Box::new(metrics.delivered.clone()))?;
        registry.register(Box::new(metrics.retried.clone()))?;
        registry.register(Box::new(metrics.dropped.clone()))?;
        Ok(metrics)
    }
}

/// The intake's handle: where acknowledged events go.
#[derive(Debug, Clone)]
pub struct Intake {
    spool: Spool,
    metrics: PayloadMetrics,
}

/// Why the intake did not take an event.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl Intake {
    /// Opens the spool and starts delivery (on the current tokio runtime).
    pub fn start(settings: &PayloadSettings, registry: &Registry) -> Result<Intake, String> {
        let metrics = PayloadMetrics::new(registry).map_err(|e| e.to_string())?;
        let (spool, reader) = spool::open(&settings.spool_dir, settings.spool_max_bytes)
            .map_err(|e| format!("payload spool {}: {e}", settings.spool_dir.display()))?;
        metrics
            .spool_bytes
            .set(i64::try_from(spool.bytes()).unwrap_or(i64::MAX));
        tokio::spawn(delivery::run(
            reader,
            settings.sink.clone(),
            metrics.clone(),
        ));
        Ok(Intake { spool, metrics })
    }

    /// Takes events (each with its `ce-*` and `content-type` headers and its payload), all or
    /// none; returns once they are durable.
    pub async fn take(&self, events: Vec<Event>) -> Result<(), IntakeError> {
        for event in &events {
            for required in ["ce-id", "ce-type", "ce-specversion"] {
                if event.header(required).is_none_or(str::is_empty) {
                    self.metrics
                        .dropped
                        .with_label_values(&["invalid"])
                        .inc_by(events.len() as u64);
                    return Err(IntakeError::Invalid(format!(
                        "a CloudEvent in binary mode needs the {required} header"
                    )));
                }
            }
        }
        let count = events.len() as u64;
        match self.spool.append_all(events).await {
            Ok(()) => {
                self.metrics.received.inc_by(count);
                self.metrics
                    .spool_bytes
                    .set(i64::try_from(self.spool.bytes()).unwrap_or(i64::MAX));
                Ok(())
            }
            Err(e) => {
                let reason = match e {
                    SpoolError::Full(_) => "spool_full",
                    SpoolError::Io(_) => "spool_error",
                };
                self.metrics
                    .dropped
                    .with_label_values(&[reason])
                    .inc_by(count);
                Err(e.into())
            }
        }
    }
}

/// The events of an intake request: exchanges ([`EXCHANGES_CONTENT_TYPE`], what the logger
/// filter sends; their CloudEvents are made here, natively), or one CloudEvent in binary mode.
pub fn events_from_request(
    headers: &http::HeaderMap,
    body: Vec<u8>,
) -> Result<Vec<Event>, IntakeError> {
    let exchanges = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(EXCHANGES_CONTENT_TYPE));
    if exchanges {
        let decoded = decode_exchanges(&body).ok_or_else(|| {
            IntakeError::Invalid("a torn or corrupt record in the exchanges".into())
        })?;
        return Ok(decoded
            .iter()
            .flat_map(|(exchange, mode)| events(exchange, *mode))
            .collect());
    }
    Ok(vec![event_from_headers(headers, body)])
}

/// An event from HTTP headers in CloudEvents binary mode: the `ce-*` ones and `content-type`.
pub fn event_from_headers(headers: &http::HeaderMap, body: Vec<u8>) -> Event {
    let headers = headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("ce-") || *name == http::header::CONTENT_TYPE)
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect();
    Event { headers, body }
}

/// The event in CloudEvents' JSON format, one line: its attributes (`ce-` dropped),
/// `datacontenttype`, and `data` (a JSON payload as it came, checked to be JSON) or
/// `data_base64`.
pub fn json_line(event: &Event) -> Vec<u8> {
    use serde_json::value::RawValue;

    let mut line = Vec::with_capacity(event.body.len() + 512);
    line.push(b'{');
    let field = |line: &mut Vec<u8>, name: &str| {
        if line.len() > 1 {
            line.push(b',');
        }
        // Names and string values go through serde_json for their escaping.
        let _ = serde_json::to_writer(&mut *line, name);
        line.push(b':');
    };
    let mut json_payload = false;
    for (name, value) in &event.headers {
        if let Some(attribute) = name.strip_prefix("ce-") {
            field(&mut line, attribute);
            match serde_json::from_str::<&RawValue>(value) {
                Ok(raw) if attribute == "metadata" => line.extend_from_slice(raw.get().as_bytes()),
                _ => {
                    let _ = serde_json::to_writer(&mut line, value);
                }
            }
        } else if name == "content-type" {
            json_payload = value.starts_with("application/json");
            field(&mut line, "datacontenttype");
            let _ = serde_json::to_writer(&mut line, value);
        }
    }
    match json_payload
        .then(|| serde_json::from_slice::<&RawValue>(&event.body).ok())
        .flatten()
    {
        // A JSON payload as it came (checked to be JSON): no parse into values and back.
        Some(raw) => {
            field(&mut line, "data");
            line.extend_from_slice(raw.get().as_bytes());
        }
        None => {
            field(&mut line, "data_base64");
            let _ = serde_json::to_writer(
                &mut line,
                &base64::engine::general_purpose::STANDARD.encode(&event.body),
            );
        }
    }
    line.push(b'}');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn json_lines_keep_json_payloads_as_json() {
        let event = Event {
            headers: vec![
                ("ce-id".into(), "1".into()),
                ("ce-metadata".into(), r#"{"x-user":["ada"]}"#.into()),
                ("content-type".into(), "application/json".into()),
            ],
            body: br#"{"instances": [[1, 2]]}"#.to_vec(),
        };
        let line: Value = serde_json::from_slice(&json_line(&event)).unwrap();
        assert_eq!(line["id"], "1");
        assert_eq!(line["metadata"]["x-user"][0], "ada");
        assert_eq!(line["data"]["instances"][0][1], 2);
        let binary = Event {
            headers: vec![("content-type".into(), "application/octet-stream".into())],
            body: vec![0, 255],
        };
        let line: Value = serde_json::from_slice(&json_line(&binary)).unwrap();
        assert_eq!(line["data_base64"], "AP8=");
    }
}
