//! The predictor's one error taxonomy. Front ends map it once to HTTP status codes and once
//! to gRPC codes; messages are written for the client, internal detail goes to the logs.

/// Why a predictor call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PredictorError {
    /// The request does not fit the model: wrong inputs, datatypes, shapes or data.
    #[error("{0}")]
    InvalidInput(String),
    /// No model of that name is in the repository.
    #[error("unknown model '{0}'")]
    ModelNotFound(String),
    /// The model exists but not at that version.
    #[error("model '{model}' has no version '{version}' loaded")]
    VersionNotFound { model: String, version: String },
    /// The model exists but is not loaded or failed to load.
    #[error("model '{model}' is not ready: {reason}")]
    ModelNotReady { model: String, reason: String },
    /// A model (or its configuration) could not be loaded.
    #[error("failed to load model '{model}': {reason}")]
    Load { model: String, reason: String },
    /// The model's queue is full.
    #[error("{0}")]
    Overloaded(String),
    /// The request waited longer than its timeout.
    #[error("{0}")]
    Timeout(String),
    /// ONNX Runtime failed while running a request that passed validation.
    #[error("inference failed: {0}")]
    Runtime(String),
}

impl PredictorError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        PredictorError::InvalidInput(message.into())
    }

    pub(crate) fn load(model: &str, reason: impl std::fmt::Display) -> Self {
        PredictorError::Load {
            model: model.to_owned(),
            reason: reason.to_string(),
        }
    }
}

impl From<meshserve_proto::InvalidRequest> for PredictorError {
    fn from(e: meshserve_proto::InvalidRequest) -> Self {
        PredictorError::InvalidInput(e.0)
    }
}

pub type Result<T, E = PredictorError> = std::result::Result<T, E>;
