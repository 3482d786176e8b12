//! The sidecar's error taxonomy, mapped once to HTTP status codes and once to gRPC codes.

use http::StatusCode;
use meshserve_predictor::PredictorError;
use meshserve_proto::InvalidRequest;

/// Why a request failed, as the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Malformed or unfit input: 400 / INVALID_ARGUMENT.
    #[error("{0}")]
    BadRequest(String),
    /// Unknown model, version or route: 404 / NOT_FOUND.
    #[error("{0}")]
    NotFound(String),
    /// The model or the server cannot serve now: 503 / UNAVAILABLE.
    #[error("{0}")]
    Unavailable(String),
    /// The body is over the configured limit: 413 / RESOURCE_EXHAUSTED.
    #[error("{0}")]
    TooLarge(String),
    /// Too many requests in flight: 429 / RESOURCE_EXHAUSTED.
    #[error("{0}")]
    Overloaded(String),
    /// The request waited past its timeout: 504 / DEADLINE_EXCEEDED.
    #[error("{0}")]
    Timeout(String),
    /// The client did not send its body in time: 408.
    #[error("{0}")]
    SlowClient(String),
    /// 415: the body is not in a form the endpoint reads.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 405: the path exists, the method does not.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 403 / PERMISSION_DENIED: not for this caller.
    #[error("{0}")]
    Forbidden(String),
    /// The server failed: 500 / INTERNAL.
    #[error("{0}")]
    Internal(String),
}

impl From<meshserve_filter_core::transform::TransformError> for ApiError {
    fn from(e: meshserve_filter_core::transform::TransformError) -> Self {
        let message = format!("transformer: {}", e.message);
        match e.status {
            400 => ApiError::BadRequest(message),
            413 => ApiError::TooLarge(message),
            _ => ApiError::Internal(message),
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::SlowClient(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            ApiError::BadRequest(_) | ApiError::UnsupportedMediaType(_) => {
                tonic::Status::invalid_argument(message)
            }
            ApiError::NotFound(_) => tonic::Status::not_found(message),
            ApiError::Timeout(_) | ApiError::SlowClient(_) => {
                tonic::Status::deadline_exceeded(message)
            }
            ApiError::Unavailable(_) => tonic::Status::unavailable(message),
            ApiError::TooLarge(_) | ApiError::Overloaded(_) => {
                tonic::Status::resource_exhausted(message)
            }
            ApiError::MethodNotAllowed(_) => tonic::Status::unimplemented(message),
            ApiError::Forbidden(_) => tonic::Status::permission_denied(message),
            ApiError::Internal(_) => tonic::Status::internal(message),
        }
    }
}

impl From<PredictorError> for ApiError {
    fn from(e: PredictorError) -> Self {
        let message = e.to_string();
        match e {
            PredictorError::InvalidInput(_) | PredictorError::Load { .. } => {
                ApiError::BadRequest(message)
            }
            PredictorError::ModelNotFound(_) | PredictorError::VersionNotFound { .. } => {
                ApiError::NotFound(message)
            }
            PredictorError::ModelNotReady { .. } => ApiError::Unavailable(message),
            PredictorError::Overloaded(_) => ApiError::Overloaded(message),
            PredictorError::Timeout(_) => ApiError::Timeout(message),
            PredictorError::Runtime(_) => ApiError::Internal(message),
        }
    }
}

impl From<InvalidRequest> for ApiError {
    fn from(e: InvalidRequest) -> Self {
        ApiError::BadRequest(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_maps_to_one_status_and_one_code() {
        let cases = [
            (
                PredictorError::InvalidInput("x".into()),
                400,
                tonic::Code::InvalidArgument,
            ),
            (
                PredictorError::ModelNotFound("m".into()),
                404,
                tonic::Code::NotFound,
            ),
            (
                PredictorError::VersionNotFound {
                    model: "m".into(),
                    version: "9".into(),
                },
                404,
                tonic::Code::NotFound,
            ),
            (
                PredictorError::ModelNotReady {
                    model: "m".into(),
                    reason: "r".into(),
                },
                503,
                tonic::Code::Unavailable,
            ),
            (
                PredictorError::Runtime("boom".into()),
                500,
                tonic::Code::Internal,
            ),
        ];
        for (error, status, code) in cases {
            let api = ApiError::from(error);
            assert_eq!(api.status().as_u16(), status, "{api:?}");
            assert_eq!(api.to_status().code(), code, "{api:?}");
        }
        assert_eq!(
            ApiError::Overloaded("busy".into()).status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            ApiError::Overloaded("busy".into()).to_status().code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            ApiError::TooLarge("big".into()).status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
