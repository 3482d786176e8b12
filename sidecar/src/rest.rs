//! REST over HTTP/1.1 and h2c: every Open Inference Protocol endpoint and KServe V1.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/` | `{"status": "alive"}` (KServe V1 liveness) |
//! | GET | `/v2/health/live`, `/v2/health/ready` | `{"live": true}`, `{"ready": true}` (503 when not ready) |
//! | GET | `/v2` | server metadata |
//! | GET | `/v2/models/<m>[/versions/<v>]` | model metadata |
//! | GET | `/v2/models/<m>[/versions/<v>]/ready` | `{"name", "ready"}` (503 when not ready) |
//! | POST | `/v2/models/<m>[/versions/<v>]/infer` | inference, JSON or binary tensor extension |
//! | POST | `/v2/repository/index` | `[{"name", "version", "state", "reason"}]` |
//! | POST | `/v2/repository/models/<m>/load`, `.../unload` | `{}` |
//! | GET | `/v1/models`, `/v1/models/<m>` | `{"models": [...]}`, `{"name", "ready"}` |
//! | POST | `/v1/models/<m>:predict` | `{"predictions": [...]}` |
//! | POST | `/v1/models/<m>:explain` | the model's built-in explainer's document ([`crate::explain`]) |
//! | POST | `/v2/models/<m>-explainer/infer` | the same document as one BYTES output `explanation` (MLServer's form) |
//! | GET | `/metrics` | Prometheus metrics (see `meshserve_predictor::metrics`) |
//!
//! Errors are `{"error": "<message>"}` with the status [`ApiError`] maps to.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use meshserve_filter_core::protocol::percent_decode;
use meshserve_proto::rest::{
    INFERENCE_HEADER_CONTENT_LENGTH, ModelMetadata, RepositoryIndexEntry, ServerMetadata,
    encode_infer_response, error_body, parse_infer_request, to_json, wants_binary,
};
use meshserve_proto::v1;
use serde_json::{Value, json};
use tracing::Instrument as _;

use meshserve_filter_core::logger::INTAKE_PATH;
use meshserve_filter_core::transform::Wire;

use crate::error::ApiError;
use crate::payloads::recent::RECENT_PATH;
use crate::payloads::spool::SpoolError;
use crate::payloads::{IntakeError, events_from_request};
use crate::service::{EXTENSIONS, Limits, SERVER_NAME, SERVER_VERSION, Service};
use crate::telemetry::{postprocess_span, preprocess_span, record_status, server_span, timed};

/// An endpoint, parsed from the path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// `GET /`: KServe's V1 liveness (`{"status": "alive"}`).
    Root,
    /// `POST /meshserve/events`: payload logging's intake (CloudEvents, binary mode).
    Events,
    /// `GET /meshserve/events/recent`: the last events taken (`--log-recent`).
    RecentEvents,
    Live,
    Ready,
    ServerMetadata,
    ModelMetadata {
        model: String,
        version: String,
    },
    ModelReady {
        model: String,
        version: String,
    },
    Infer {
        model: String,
        version: String,
    },
    RepositoryIndex,
    Load(String),
    Unload(String),
    V1Models,
    V1Model(String),
    V1Predict(String),
    V1Explain(String),
    /// `GET /metrics`: Prometheus text exposition.
    Metrics,
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        match path {
            "/" => return Some(Route::Root),
            "/metrics" => return Some(Route::Metrics),
            INTAKE_PATH => return Some(Route::Events),
            RECENT_PATH => return Some(Route::RecentEvents),
            _ => {}
        }
        let segments: Vec<String> = path
            .strip_prefix('/')?
            .split('/')
            .map(percent_decode)
            .collect::<Option<_>>()?;
        let s: Vec<&str> = segments.iter().map(String::as_str).collect();
        let model = |m: &str, v: &str| (m.to_owned(), v.to_owned());
        Some(match s.as_slice() {
            ["v2", "health", "live"] => Route::Live,
            ["v2", "health", "ready"] => Route::Ready,
            ["v2"] | ["v2", ""] => Route::ServerMetadata,
            ["v2", "repository", "index"] => Route::RepositoryIndex,
            ["v2", "repository", "models", m, "load"] if !m.is_empty() => {
                Route::Load((*m).to_owned())
            }
            ["v2", "repository", "models", m, "unload"] if !m.is_empty() => {
                Route::Unload((*m).to_owned())
            }
            ["v2", "models", m, rest @ ..] if !m.is_empty() => {
                let (version, tail) = match rest {
                    ["versions", v, tail @ ..] if !v.is_empty() => (*v, tail),
                    tail => ("", tail),
                };
                let (model, version) = model(m, version);
                match tail {
                    [] => Route::ModelMetadata { model, version },
                    ["ready"] => Route::ModelReady { model, version },
                    ["infer"] => Route::Infer { model, version },
                    _ => return None,
                }
            }
            ["v1", "models"] => Route::V1Models,
            ["v1", "models", m] => match m.rsplit_once(':') {
                Some((name, "predict")) if !name.is_empty() => Route::V1Predict(name.to_owned()),
                Some((name, "explain")) if !name.is_empty() => Route::V1Explain(name.to_owned()),
                Some(_) => return None,
                None if !m.is_empty() => Route::V1Model((*m).to_owned()),
                None => return None,
            },
            _ => return None,
        })
    }

    fn method(&self) -> Method {
        match self {
            Route::Infer { .. }
            | Route::RepositoryIndex
            | Route::Load(_)
            | Route::Unload(_)
            | Route::V1Predict(_)
            | Route::V1Explain(_)
            | Route::Events => Method::POST,
            _ => Method::GET,
        }
    }
}

type HttpResponse = Response<Full<Bytes>>;

/// Answers one request; never fails: errors become `{"error"}` responses.
pub async fn handle(
    service: Arc<Service>,
    request: Request<Incoming>,
) -> Result<HttpResponse, std::convert::Infallible> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let span = server_span(&method, &path, request.headers());
    let response = match dispatch(&service, request).instrument(span.clone()).await {
        Ok(response) => response,
        Err(error) => {
            if error.status().is_server_error() {
                tracing::warn!(%method, %path, status = error.status().as_u16(), %error, "request failed");
            } else {
                tracing::debug!(%method, %path, status = error.status().as_u16(), %error, "request refused");
            }
            error_response(&error)
        }
    };
    record_status(&span, response.status().as_u16());
    Ok(response)
}

async fn dispatch(service: &Service, request: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let route = Route::parse(request.uri().path()).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no endpoint at {} {}",
            request.method(),
            request.uri().path()
        ))
    })?;
    let allowed = route.method();
    let method = request.method();
    let head_of_get = method == Method::HEAD && allowed == Method::GET;
    let index_by_get = route == Route::RepositoryIndex && method == Method::GET;
    if method != allowed && !head_of_get && !index_by_get {
        return Err(ApiError::MethodNotAllowed(format!(
            "{} does not accept {method}; use {allowed}",
            request.uri().path()
        )));
    }
    let repository = service.repository();
    match route {
        Route::Events => {
            let intake = service.intake().ok_or_else(|| {
                ApiError::NotFound(
                    "payload logging is not configured on this sidecar (meshserve serve --log-sink)"
                        .into(),
                )
            })?;
            let (headers, body) = read_body(request, service.limits()).await?;
            let events = events_from_request(&headers, body.to_vec())
                .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            intake.take(events).await.map_err(|e| match e {
                IntakeError::Invalid(m) => ApiError::BadRequest(m),
                IntakeError::Spool(SpoolError::Full(_)) => ApiError::Overloaded(e.to_string()),
                IntakeError::Spool(SpoolError::Io(_)) => ApiError::Internal(e.to_string()),
            })?;
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::ACCEPTED;
            Ok(response)
        }
        Route::RecentEvents => {
            // Payloads: only for a caller that names this loopback address (no page that
            // rebinds a name of its own to 127.0.0.1 reads them).
            if !names_loopback(request.headers()) {
                return Err(ApiError::Forbidden(
                    "recent payload events are served to loopback callers only".into(),
                ));
            }
            let recent = service.intake().and_then(|i| i.recent()).ok_or_else(|| {
                ApiError::NotFound(
                    "this sidecar keeps no recent payload events (meshserve serve --log-recent N)"
                        .into(),
                )
            })?;
            Ok(json_response(StatusCode::OK, to_json(&recent.to_json())))
        }
        Route::Metrics => {
            let mut response = Response::new(Full::new(Bytes::from(service.encode_metrics())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(response)
        }
        Route::Root => Ok(json_response(
            StatusCode::OK,
            to_json(&json!({"status": "alive"})),
        )),
        Route::Live => Ok(json_response(
            StatusCode::OK,
            to_json(&json!({"live": service.is_live()})),
        )),
        Route::Ready => {
            let ready = service.is_ready();
            Ok(json_response(
                ready_status(ready),
                to_json(&json!({"ready": ready})),
            ))
        }
        Route::ServerMetadata => Ok(json_response(
            StatusCode::OK,
            to_json(&ServerMetadata {
                name: SERVER_NAME.into(),
                version: SERVER_VERSION.into(),
                extensions: EXTENSIONS.iter().map(|e| (*e).to_owned()).collect(),
            }),
        )),
        Route::ModelMetadata { model, version } => {
            let found = service.model(&model, &version).await?;
            let versions = repository
                .versions(&model)?
                .iter()
                .map(u64::to_string)
                .collect();
            Ok(json_response(
                StatusCode::OK,
                to_json(&ModelMetadata {
                    name: model,
                    versions,
                    platform: meshserve_predictor::PLATFORM.into(),
                    inputs: found.inputs().to_vec(),
                    outputs: found.outputs().to_vec(),
                }),
            ))
        }
        Route::ModelReady { model, version } => {
            let ready = repository.is_model_ready(&model, &version)?;
            Ok(json_response(
                ready_status(ready),
                to_json(&json!({"name": model, "ready": ready})),
            ))
        }
        Route::Infer { model, version } => {
            if let Some(explained) = service.explained_model(&model, &version).await {
                // One permit for the whole explanation, as for V1's `:explain`.
                let _permit = service.admit()?;
                let (headers, body) = read_body(request, service.limits()).await?;
                check_content_type(&headers)?;
                let header_length = inference_header_length(&headers)?;
                // A client that bypassed Envoy gets the transformer the filter would run.
                let request = match service.transformer_for(&headers, Wire::V2) {
                    Some(t) if t.transforms_request(Wire::V2) => {
                        t.infer_request(Wire::V2, &body, header_length)?
                    }
                    _ => parse_infer_request(&body, header_length)?,
                };
                let (parameters, requested) = (request.parameters.clone(), request.outputs.clone());
                let response = crate::explain::explain_v2(explained, &model, request).await?;
                return Ok(infer_response(&response, &parameters, &requested));
            }
            let found = service.model(&model, &version).await?;
            let permit = service.admit()?;
            let (headers, body) = read_body(request, service.limits()).await?;
            check_content_type(&headers)?;
            let header_length = inference_header_length(&headers)?;
            let transformer = service.transformer_for(&headers, Wire::V2);
            let (request, took) = timed(preprocess_span(), || match transformer {
                Some(t) if t.transforms_request(Wire::V2) => t
                    .infer_request(Wire::V2, &body, header_length)
                    .map_err(ApiError::from),
                _ => parse_infer_request(&body, header_length).map_err(ApiError::from),
            });
            found.observe_preprocess(took);
            let request = request?;
            drop(body);
            let parameters = request.parameters.clone();
            let requested = request.outputs.clone();
            let response = service.infer(permit, Arc::clone(&found), request).await?;
            let (answer, took) = timed(postprocess_span(), || match transformer {
                Some(t) => t
                    .answer(Wire::V2, response)
                    .map(|answer| json_response(StatusCode::OK, answer))
                    .map_err(ApiError::from),
                None => Ok(infer_response(&response, &parameters, &requested)),
            });
            found.observe_postprocess(took);
            answer
        }
        Route::RepositoryIndex => {
            let (_, body) = read_body(request, service.limits()).await?;
            let ready_only = optional_json(&body)?
                .get("ready")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let index: Vec<RepositoryIndexEntry> = repository
                .index(ready_only)
                .into_iter()
                .map(|e| RepositoryIndexEntry {
                    name: e.name,
                    version: e.version,
                    state: e.state,
                    reason: e.reason,
                })
                .collect();
            Ok(json_response(StatusCode::OK, to_json(&index)))
        }
        Route::Load(model) => {
            let (_, body) = read_body(request, service.limits()).await?;
            reject_load_parameters(&optional_json(&body)?)?;
            service.load(&model).await?;
            Ok(json_response(StatusCode::OK, b"{}".to_vec()))
        }
        Route::Unload(model) => {
            service.unload(&model)?;
            Ok(json_response(StatusCode::OK, b"{}".to_vec()))
        }
        Route::V1Models => {
            let models = repository.servable();
            Ok(json_response(
                StatusCode::OK,
                to_json(&json!({"models": models})),
            ))
        }
        Route::V1Model(model) => {
            let ready = repository.is_model_ready(&model, "")?;
            Ok(json_response(
                ready_status(ready),
                to_json(&json!({"name": model, "ready": ready})),
            ))
        }
        Route::V1Explain(model) => {
            let found = service.model(&model, "").await?;
            // One permit for the whole explanation: its model runs are this request's.
            let _permit = service.admit()?;
            let (headers, body) = read_body(request, service.limits()).await?;
            check_content_type(&headers)?;
            // A picture is explained as the model sees it: pre-processed first, as in Envoy.
            let answer = match service.transformer_for(&headers, Wire::V1) {
                Some(t) if t.transforms_request(Wire::V1) => {
                    let request = t.infer_request(Wire::V1, &body, None)?;
                    crate::explain::explain_tensor(found, &request).await?
                }
                _ => crate::explain::explain(found, &body).await?,
            };
            Ok(json_response(StatusCode::OK, to_json(&answer)))
        }
        Route::V1Predict(model) => {
            let found = service.model(&model, "").await?;
            let permit = service.admit()?;
            let (headers, body) = read_body(request, service.limits()).await?;
            check_content_type(&headers)?;
            let transformer = service.transformer_for(&headers, Wire::V1);
            let (request, took) = timed(preprocess_span(), || match transformer {
                Some(t) => t
                    .infer_request(Wire::V1, &body, None)
                    .map_err(ApiError::from),
                None => match found.feature_matrix() {
                    Some((spec, names, objects)) => {
                        meshserve_proto::frame::request_from_v1(&body, spec, names, objects)
                            .map_err(ApiError::from)
                    }
                    None => v1::request_from_v1(&body, found.inputs()).map_err(ApiError::from),
                },
            });
            found.observe_preprocess(took);
            let request = request?;
            drop(body);
            let response = service.infer(permit, Arc::clone(&found), request).await?;
            let (answer, took) = timed(postprocess_span(), || match transformer {
                Some(t) => t.answer(Wire::V1, response).map_err(ApiError::from),
                None => Ok(to_json(&v1::predictions(
                    &response,
                    found.config().v1_output.as_deref(),
                ))),
            });
            found.observe_postprocess(took);
            Ok(json_response(StatusCode::OK, answer?))
        }
    }
}

/// A V2 response: JSON, or JSON and binary data (the binary tensor extension) for the outputs
/// the request asked that way.
fn infer_response(
    response: &meshserve_proto::InferResponse,
    parameters: &meshserve_proto::Parameters,
    requested: &[meshserve_proto::RequestedOutput],
) -> HttpResponse {
    let encoded = encode_infer_response(response, |name| wants_binary(parameters, requested, name));
    match encoded.header_length {
        None => json_response(StatusCode::OK, encoded.body),
        Some(n) => {
            let mut response = Response::new(Full::new(Bytes::from(encoded.body)));
            let headers = response.headers_mut();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(INFERENCE_HEADER_CONTENT_LENGTH, HeaderValue::from(n));
            response
        }
    }
}

fn ready_status(ready: bool) -> StatusCode {
    if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Whether the request's `Host` is a loopback address or `localhost` (with any port).
fn names_loopback(headers: &HeaderMap) -> bool {
    let Some(host) = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() && !name.ends_with(':') => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn json_response(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(error: &ApiError) -> HttpResponse {
    let mut response = json_response(error.status(), error_body(&error.to_string()));
    if matches!(error, ApiError::SlowClient(_)) {
        // The rest of a slow body is not waited for.
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads the body up to `limits.max_request_bytes`; a longer one is refused with 413 before
/// it is read whole when `Content-Length` says so, else as soon as the limit is crossed. A
/// body that takes longer than `limits.body_read_timeout` is refused with 408.
async fn read_body(
    request: Request<Incoming>,
    limits: Limits,
) -> Result<(HeaderMap, Bytes), ApiError> {
    let limit = limits.max_request_bytes;
    let too_large = |size: String| {
        ApiError::TooLarge(format!(
            "request body of {size} bytes is over the limit of {limit} bytes (--max-request-bytes)"
        ))
    };
    let (parts, body) = request.into_parts();
    if let Some(length) = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && length > limit as u64
    {
        return Err(too_large(length.to_string()));
    }
    let read = tokio::time::timeout(
        limits.body_read_timeout,
        Limited::new(body, limit).collect(),
    );
    let body = read
        .await
        .map_err(|_| {
            ApiError::SlowClient(format!(
                "the request body did not arrive within {} s (--body-read-timeout-secs)",
                limits.body_read_timeout.as_secs()
            ))
        })?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large("more than that".to_owned())
            } else {
                ApiError::BadRequest(format!("failed to read the request body: {e}"))
            }
        })?;
    Ok((parts.headers, body.to_bytes()))
}

/// Inference bodies are JSON, or JSON plus binary data (the binary tensor extension). No
/// content type is taken as JSON, as Triton does, and so is curl's default for `-d`
/// (`application/x-www-form-urlencoded`), which KServe's own examples rely on.
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some(encoding) = headers.get(CONTENT_ENCODING).and_then(|v| v.to_str().ok())
        && !encoding.eq_ignore_ascii_case("identity")
    {
        return Err(ApiError::UnsupportedMediaType(format!(
            "Content-Encoding '{encoding}' is not supported; send the body uncompressed"
        )));
    }
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return Ok(());
    };
    let media_type = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match media_type.as_str() {
        "application/json"
        | "application/octet-stream"
        | "application/vnd.sagemaker-triton.binary+json"
        | "application/x-www-form-urlencoded" => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type '{}' is not supported; send application/json (or application/octet-stream with Inference-Header-Content-Length)",
            value.to_str().unwrap_or("<not text>")
        ))),
    }
}

fn inference_header_length(headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
    headers
        .get(INFERENCE_HEADER_CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "Inference-Header-Content-Length must be a non-negative integer".to_owned(),
                    )
                })
        })
        .transpose()
}

/// An optional JSON object body (repository calls may send none).
fn optional_json(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Default::default()));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(ApiError::BadRequest(
            "the request body must be a JSON object".to_owned(),
        )),
        Err(e) => Err(ApiError::BadRequest(format!("malformed JSON: {e}"))),
    }
}

/// Triton's load can override the model's configuration or files through parameters; this
/// server loads from the repository only, so such a request is refused rather than half-done.
fn reject_load_parameters(body: &Value) -> Result<(), ApiError> {
    let Some(parameters) = body.get("parameters").and_then(Value::as_object) else {
        return Ok(());
    };
    match parameters
        .keys()
        .find(|k| *k == "config" || k.starts_with("file:"))
    {
        Some(key) => Err(ApiError::BadRequest(format!(
            "load parameter '{key}' is not supported: edit the model repository instead"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse() {
        let m = |model: &str, version: &str| (model.to_owned(), version.to_owned());
        let cases = [
            ("/v2/health/live", Some(Route::Live)),
            ("/v2/health/ready", Some(Route::Ready)),
            ("/v2", Some(Route::ServerMetadata)),
            (
                "/v2/models/a",
                Some(Route::ModelMetadata {
                    model: m("a", "").0,
                    version: String::new(),
                }),
            ),
            (
                "/v2/models/a/versions/3",
                Some(Route::ModelMetadata {
                    model: "a".into(),
                    version: "3".into(),
                }),
            ),
            (
                "/v2/models/a/versions/3/ready",
                Some(Route::ModelReady {
                    model: "a".into(),
                    version: "3".into(),
                }),
            ),
            (
                "/v2/models/a/infer",
                Some(Route::Infer {
                    model: "a".into(),
                    version: String::new(),
                }),
            ),
            (
                "/v2/models/a%2Fb/infer",
                Some(Route::Infer {
                    model: "a/b".into(),
                    version: String::new(),
                }),
            ),
            ("/v2/repository/index", Some(Route::RepositoryIndex)),
            (
                "/v2/repository/models/a/load",
                Some(Route::Load("a".into())),
            ),
            (
                "/v2/repository/models/a/unload",
                Some(Route::Unload("a".into())),
            ),
            ("/v1/models", Some(Route::V1Models)),
            ("/v1/models/a", Some(Route::V1Model("a".into()))),
            ("/v1/models/a:predict", Some(Route::V1Predict("a".into()))),
            ("/v1/models/a:explain", Some(Route::V1Explain("a".into()))),
            ("/v1/models/:predict", None),
            ("/v2/models//infer", None),
            ("/v2/models/a/versions//infer", None),
            ("/v2/models/a/other", None),
            ("/v2/models/a%zz", None),
            ("/v2/models/a%ff", None),
            ("/", Some(Route::Root)),
            ("/metrics", Some(Route::Metrics)),
            ("/meshserve/events/recent", Some(Route::RecentEvents)),
            ("//", None),
            ("", None),
        ];
        for (path, expected) in cases {
            assert_eq!(Route::parse(path), expected, "{path}");
        }
    }

    #[test]
    fn content_types() {
        let with = |name: http::HeaderName, value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(value));
            h
        };
        assert!(check_content_type(&HeaderMap::new()).is_ok());
        assert!(check_content_type(&with(CONTENT_TYPE, "application/json; charset=utf-8")).is_ok());
        assert!(check_content_type(&with(CONTENT_TYPE, "application/octet-stream")).is_ok());
        assert!(matches!(
            check_content_type(&with(CONTENT_TYPE, "text/plain")),
            Err(ApiError::UnsupportedMediaType(_))
        ));
        assert!(matches!(
            check_content_type(&with(CONTENT_ENCODING, "gzip")),
            Err(ApiError::UnsupportedMediaType(_))
        ));
    }

    #[test]
    fn load_parameters() {
        assert!(reject_load_parameters(&json!({})).is_ok());
        assert!(reject_load_parameters(&json!({"parameters": {"x": 1}})).is_ok());
        assert!(reject_load_parameters(&json!({"parameters": {"config": "{}"}})).is_err());
        assert!(
            reject_load_parameters(&json!({"parameters": {"file:1/model.onnx": "..."}})).is_err()
        );
    }

    #[test]
    fn recent_events_go_to_loopback_hosts_only() {
        let host = |h: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(http::header::HOST, HeaderValue::from_str(h).unwrap());
            names_loopback(&headers)
        };
        assert!(host("127.0.0.1:8080"));
        assert!(host("localhost:1"));
        assert!(host("LOCALHOST"));
        assert!(host("[::1]:9000"));
        assert!(host("127.8.9.10:80"));
        assert!(!host("evil.example:8080"));
        assert!(!host("10.0.0.1:8080"));
        assert!(!host("127.0.0.1.evil.example"));
        assert!(!names_loopback(&HeaderMap::new()));
    }
}
