//! The log intake: events from the `logger` filter (on the sidecar's REST port at
//! `POST /meshserve/events`), checked, made durable in the spool, then delivered to the sink.

use std::path::PathBuf;

use meshserve_filter_core::logger::{EXCHANGES_CONTENT_TYPE, Event, decode_exchanges, events};
use meshserve_filter_core::sink::SinkSpec;
use prometheus::Registry;

use super::cloudevents::event_from_headers;
use super::delivery;
use super::metrics::PayloadMetrics;
use super::recent::Recent;
use super::spool::{self, Spool, SpoolError};

/// Payload logging's settings on a sidecar (`meshserve serve --log-*`).
#[derive(Debug, Clone)]
pub struct PayloadSettings {
    pub sink: SinkSpec,
    /// An HTTP sink gets CloudEvents' batched mode (`application/cloudevents-batch+json`).
    pub batched: bool,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    /// How many of the last events to keep in memory for `GET /meshserve/events/recent`
    /// (0: none, and no such endpoint).
    pub recent: usize,
}

/// The intake's handle: where acknowledged events go.
#[derive(Debug, Clone)]
pub struct Intake {
    spool: Spool,
    metrics: PayloadMetrics,
    recent: Option<std::sync::Arc<Recent>>,
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
            settings.batched,
            metrics.clone(),
        ));
        let recent =
            (settings.recent > 0).then(|| std::sync::Arc::new(Recent::new(settings.recent)));
        Ok(Intake {
            spool,
            metrics,
            recent,
        })
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
        // Summarised first (the spool takes the events), kept once the events are durable.
        let kept = self
            .recent
            .as_ref()
            .map(|recent| (recent, super::recent::summaries(&events)));
        match self.spool.append_all(events).await {
            Ok(()) => {
                if let Some((recent, summaries)) = kept {
                    recent.keep(summaries);
                }
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

impl Intake {
    /// The last events taken, when the sidecar keeps them (`--log-recent`).
    pub fn recent(&self) -> Option<&Recent> {
        self.recent.as_deref()
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
