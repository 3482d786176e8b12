//! Payload logging's metrics, on the sidecar's `/metrics`.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

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
