//! What both front ends share: the repository, the limits, admission control, and handing
//! requests to the model's scheduler (whose own threads run ONNX Runtime, so the async
//! workers never block on a model).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use meshserve_predictor::{ModelVersion, Repository};
use meshserve_proto::{InferRequest, InferResponse};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use meshserve_filter_core::transform::{TRANSFORMED_HEADER, Transformer, Wire};

use crate::error::ApiError;
use crate::payloads::Intake;

/// Named limits, each with a default and a `meshserve serve` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest request body (REST) or message (gRPC) accepted, in bytes.
    pub max_request_bytes: usize,
    /// Inference requests running or waiting at once; beyond it, 429 / RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// How long a client may take to send a request's body (REST); then 408 and the
    /// connection is closed (slow-loris bodies).
    pub body_read_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 64 * 1024 * 1024,
            max_in_flight: 256,
            body_read_timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// The server's name and version, as `GET /v2` and ServerMetadata report them.
pub const SERVER_NAME: &str = "meshserve";
pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Protocol extensions served.
pub const EXTENSIONS: [&str; 3] = ["binary_tensor_data", "classification", "model_repository"];

#[derive(Debug)]
pub struct Service {
    repository: Arc<Repository>,
    limits: Limits,
    in_flight: Arc<Semaphore>,
    draining: AtomicBool,
    /// Applied to REST requests that did not come through the Envoy transformer filter.
    transformer: Option<Transformer>,
    /// Payload logging's intake, when the sidecar has a sink.
    intake: Option<Intake>,
    /// `meshserve_requests_in_flight`, read from the semaphore at each scrape.
    in_flight_gauge: prometheus::IntGauge,
}

impl Service {
    pub fn new(repository: Arc<Repository>, limits: Limits) -> Service {
        let in_flight_gauge = prometheus::IntGauge::new(
            "meshserve_requests_in_flight",
            "Inference requests admitted and not yet answered (what KEDA's concurrency trigger reads)",
        )
        .unwrap_or_else(|e| unreachable!("a constant metric: {e}"));
        if let Err(e) = repository
            .metrics()
            .registry()
            .register(Box::new(in_flight_gauge.clone()))
        {
            tracing::error!(error = %e, "cannot register meshserve_requests_in_flight");
        }
        Service {
            in_flight_gauge,
            repository,
            limits,
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            draining: AtomicBool::new(false),
            transformer: None,
            intake: None,
        }
    }

    /// Takes payload events at `POST /meshserve/events`.
    pub fn with_intake(self, intake: Intake) -> Service {
        Service {
            intake: Some(intake),
            ..self
        }
    }

    pub fn intake(&self) -> Option<&Intake> {
        self.intake.as_ref()
    }

    /// Applies `transformer` to V1 predict and V2 infer requests that bypassed Envoy.
    pub fn with_transformer(self, transformer: Transformer) -> Service {
        Service {
            transformer: Some(transformer),
            ..self
        }
    }

    /// The transformer for a REST request in `wire` with these headers: none when the Envoy
    /// filter already applied it (`x-meshserve-transformed`) or it has nothing to do.
    pub fn transformer_for(&self, headers: &http::HeaderMap, wire: Wire) -> Option<&Transformer> {
        self.transformer
            .as_ref()
            .filter(|t| t.transforms_response(wire) && !headers.contains_key(TRANSFORMED_HEADER))
    }

    /// The Prometheus text of every metric, with the gauges read now.
    pub fn encode_metrics(&self) -> String {
        let free = self.in_flight.available_permits();
        self.in_flight_gauge
            .set(self.limits.max_in_flight.saturating_sub(free) as i64);
        self.repository.encode_metrics()
    }

    pub fn repository(&self) -> &Arc<Repository> {
        &self.repository
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn is_live(&self) -> bool {
        true
    }

    /// Ready: every model loaded and not shutting down.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.repository.is_ready()
    }

    /// From now on the server reports not ready, so load balancers stop sending.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Waits until every admitted inference request has finished.
    pub async fn drained(&self) {
        let all = u32::try_from(self.limits.max_in_flight).unwrap_or(u32::MAX);
        // Acquiring every permit means nothing is in flight; the semaphore is never closed.
        if let Ok(permits) = self.in_flight.acquire_many(all).await {
            drop(permits);
        }
    }

    /// Admits one inference request, or refuses at once when the limit is reached.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.in_flight)
            .try_acquire_owned()
            .map_err(|_| {
                ApiError::Overloaded(format!(
                    "server overloaded: {} inference requests already in flight; retry later",
                    self.limits.max_in_flight
                ))
            })
    }

    /// The model version a request names (`version` `""`: the latest), loaded first when it
    /// loads on demand and is not in memory (the request waits for the load, bounded).
    pub async fn model(&self, name: &str, version: &str) -> Result<Arc<ModelVersion>, ApiError> {
        Ok(self.repository.acquire(name, version).await?)
    }

    /// The model `<m>-explainer` explains, when no model of that name is served and `<m>` has
    /// a built-in explainer (MLServer's form of `:explain`, on REST and gRPC).
    pub async fn explained_model(&self, name: &str, version: &str) -> Option<Arc<ModelVersion>> {
        let base = name.strip_suffix(crate::explain::EXPLAINER_SUFFIX)?;
        if self
            .repository
            .is_model_ready(name, version)
            .unwrap_or(false)
        {
            return None;
        }
        self.model(base, version)
            .await
            .ok()
            .filter(|m| m.config().explainer.is_some())
    }

    /// Runs an admitted request on a model version.
    pub async fn infer(
        &self,
        permit: OwnedSemaphorePermit,
        model: Arc<ModelVersion>,
        request: InferRequest,
    ) -> Result<InferResponse, ApiError> {
        let result = model.infer(request).await.map_err(ApiError::from);
        drop(permit);
        if let Err(error @ ApiError::Internal(_)) = &result {
            tracing::error!(model = %model.name(), %error, "inference failed");
        }
        result
    }

    /// Loads or reloads a model on the blocking pool, in its turn among the loads.
    pub async fn load(&self, name: &str) -> Result<(), ApiError> {
        self.repository.load_now(name).await.map_err(ApiError::from)
    }

    pub fn unload(&self, name: &str) -> Result<(), ApiError> {
        self.repository.unload(name).map_err(ApiError::from)
    }
}
