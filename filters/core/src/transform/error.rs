//! Why the transformer refused or failed a request: an HTTP status and a message for the client.

use meshserve_proto::rest;

/// A request the transformer refuses (400, 413) or a response it cannot make (500), with the
/// message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TransformError {
    pub status: u16,
    pub message: String,
}

impl TransformError {
    pub fn bad(message: impl Into<String>) -> Self {
        TransformError {
            status: 400,
            message: message.into(),
        }
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        TransformError {
            status: 413,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        TransformError {
            status: 500,
            message: message.into(),
        }
    }

    /// The protocol's error body: `{"error": "transformer: ..."}`.
    pub fn body(&self) -> Vec<u8> {
        rest::error_body(&format!("transformer: {}", self.message))
    }
}
