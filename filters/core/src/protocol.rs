//! Recognising the protocol and the model a request names, from its path.

/// What a request is, as far as routing cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// KServe V1: `/v1/models` or `/v1/models/<m>[:predict|:explain]`.
    V1 { model: Option<String>, verb: V1Verb },
    /// Open Inference Protocol REST: `/v2/...`. `model` is set for `/v2/models/<m>/...` and
    /// `/v2/repository/models/<m>/...`.
    V2 {
        model: Option<String>,
        version: Option<String>,
    },
    /// Open Inference Protocol gRPC: `/inference.GRPCInferenceService/<method>`.
    Grpc { method: GrpcMethod },
    /// Anything else: not an inference request.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1Verb {
    /// `GET /v1/models` or `GET /v1/models/<m>`.
    Status,
    Predict,
    Explain,
}

/// The gRPC methods, by whether their request message names a model in field 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcMethod {
    /// ModelInfer, ModelMetadata, ModelReady: field 1 of the message is the model name.
    ModelScoped(String),
    /// RepositoryModelLoad / Unload: the model name is field 2 (field 1 in KServe's variant).
    Repository(String),
    /// ServerLive, ServerReady, ServerMetadata, RepositoryIndex and unknown methods.
    ServerScoped(String),
}

pub const GRPC_SERVICE_PREFIX: &str = "/inference.GRPCInferenceService/";

/// Parses a request path (query string and fragment ignored).
pub fn parse(path: &str) -> Protocol {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if let Some(method) = path.strip_prefix(GRPC_SERVICE_PREFIX) {
        let method = method.to_owned();
        return Protocol::Grpc {
            method: match method.as_str() {
                "ModelInfer" | "ModelMetadata" | "ModelReady" | "ModelStreamInfer"
                | "ModelConfig" | "ModelStatistics" => GrpcMethod::ModelScoped(method),
                "RepositoryModelLoad" | "RepositoryModelUnload" => GrpcMethod::Repository(method),
                _ => GrpcMethod::ServerScoped(method),
            },
        };
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    match segments.as_slice() {
        ["v1", "models"] => Protocol::V1 {
            model: None,
            verb: V1Verb::Status,
        },
        ["v1", "models", m] => match m.rsplit_once(':') {
            Some((name, "predict")) => v1(name, V1Verb::Predict),
            Some((name, "explain")) => v1(name, V1Verb::Explain),
            Some(_) => Protocol::Other,
            None => v1(m, V1Verb::Status),
        },
        ["v2", "models", m, "versions", v, ..] => v2(m, Some(v)),
        ["v2", "models", m, ..] => v2(m, None),
        ["v2", "repository", "models", m, ..] => v2(m, None),
        ["v2", ..] => Protocol::V2 {
            model: None,
            version: None,
        },
        _ => Protocol::Other,
    }
}

fn v1(model: &str, verb: V1Verb) -> Protocol {
    match percent_decode(model) {
        Some(m) if !m.is_empty() => Protocol::V1 {
            model: Some(m),
            verb,
        },
        _ => Protocol::Other,
    }
}

fn v2(model: &str, version: Option<&str>) -> Protocol {
    match (percent_decode(model), version.map(percent_decode)) {
        (Some(m), None) if !m.is_empty() => Protocol::V2 {
            model: Some(m),
            version: None,
        },
        (Some(m), Some(Some(v))) if !m.is_empty() && !v.is_empty() => Protocol::V2 {
            model: Some(m),
            version: Some(v),
        },
        _ => Protocol::Other,
    }
}

/// Open Inference Protocol (and Triton) REST resources under `/v2/` that change or reveal
/// the server's state rather than run inference: the model repository (index, load, unload),
/// shared-memory regions, trace and log settings.
pub const CONTROL_RESOURCES: [&str; 5] = [
    "repository",
    "systemsharedmemory",
    "cudasharedmemory",
    "trace",
    "logging",
];

/// Per-model REST resources of the same kind: statistics and trace settings.
pub const CONTROL_MODEL_RESOURCES: [&str; 2] = ["stats", "trace"];

/// gRPC methods of the same kind.
pub const CONTROL_METHODS: [&str; 12] = [
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "ModelStatistics",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
];

/// Whether a request is a control API call: one that changes or reveals the server's state
/// (the model repository, statistics, shared memory, trace and log settings) instead of
/// running or describing a model. Segments are compared percent-decoded and empty ones
/// skipped, so `/v2//%72epository/index` is one too.
pub fn is_control(path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if let Some(method) = path.strip_prefix(GRPC_SERVICE_PREFIX) {
        return CONTROL_METHODS.contains(&method);
    }
    // On every request: no allocation unless a segment is percent-encoded.
    let mut segments = path.split('/').filter(|s| !s.is_empty()).map(|s| {
        if s.contains('%') {
            // An undecodable segment is kept as written: it names nothing the server serves.
            std::borrow::Cow::Owned(percent_decode(s).unwrap_or_else(|| s.to_owned()))
        } else {
            std::borrow::Cow::Borrowed(s)
        }
    });
    if segments.next().as_deref() != Some("v2") {
        return false;
    }
    let Some(resource) = segments.next() else {
        return false;
    };
    if CONTROL_RESOURCES.contains(&&*resource) {
        return true;
    }
    if resource != "models" || segments.next().is_none() {
        return false;
    }
    // `/v2/models/<m>[/versions/<v>]/<resource>`
    let mut resource = segments.next();
    if resource.as_deref() == Some("versions") {
        let _version = segments.next();
        resource = segments.next();
    }
    resource.is_some_and(|r| CONTROL_MODEL_RESOURCES.contains(&&*r))
}

/// Percent-decodes one path segment; `None` for a bad escape or invalid UTF-8.
pub fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1m(m: &str, verb: V1Verb) -> Protocol {
        Protocol::V1 {
            model: Some(m.into()),
            verb,
        }
    }

    fn v2m(m: &str, v: Option<&str>) -> Protocol {
        Protocol::V2 {
            model: Some(m.into()),
            version: v.map(Into::into),
        }
    }

    #[test]
    fn control_apis_are_told_from_inference() {
        for control in [
            "/v2/repository/index",
            "/v2/repository/models/digits/load",
            "/v2/repository/models/digits/unload?x=1",
            "/v2//repository/index",
            "/v2/%72epository/index",
            "/v2/systemsharedmemory/status",
            "/v2/cudasharedmemory/region/r/register",
            "/v2/trace/setting",
            "/v2/logging",
            "/v2/models/digits/stats",
            "/v2/models/digits/versions/1/stats",
            "/v2/models/digits/trace/setting",
            "/inference.GRPCInferenceService/RepositoryIndex",
            "/inference.GRPCInferenceService/RepositoryModelLoad",
            "/inference.GRPCInferenceService/RepositoryModelUnload",
            "/inference.GRPCInferenceService/ModelStatistics",
            "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
            "/inference.GRPCInferenceService/CudaSharedMemoryUnregister",
            "/inference.GRPCInferenceService/TraceSetting",
            "/inference.GRPCInferenceService/LogSettings",
        ] {
            assert!(is_control(control), "{control}");
        }
        for inference in [
            "/v1/models/digits:predict",
            "/v1/models/repository:predict",
            "/v1/models",
            "/v2",
            "/v2/health/ready",
            "/v2/models/digits",
            "/v2/models/digits/ready",
            "/v2/models/digits/infer",
            "/v2/models/repository/infer",
            "/v2/models/stats/infer",
            "/v2/models/digits/versions/1/infer",
            "/v2/models/digits/config",
            "/",
            "/inference.GRPCInferenceService/ModelInfer",
            "/inference.GRPCInferenceService/ModelMetadata",
            "/inference.GRPCInferenceService/ServerReady",
        ] {
            assert!(!is_control(inference), "{inference}");
        }
    }

    #[test]
    fn every_path_form() {
        let cases = [
            (
                "/v1/models",
                Protocol::V1 {
                    model: None,
                    verb: V1Verb::Status,
                },
            ),
            ("/v1/models/digits", v1m("digits", V1Verb::Status)),
            ("/v1/models/digits:predict", v1m("digits", V1Verb::Predict)),
            ("/v1/models/digits:explain", v1m("digits", V1Verb::Explain)),
            ("/v1/models/a:b:predict", v1m("a:b", V1Verb::Predict)),
            ("/v1/models/digits:train", Protocol::Other),
            ("/v1/models/:predict", Protocol::Other),
            ("/v2/models/digits/infer", v2m("digits", None)),
            ("/v2/models/digits/infer?x=1", v2m("digits", None)),
            ("/v2/models/digits", v2m("digits", None)),
            ("/v2/models/digits/ready", v2m("digits", None)),
            (
                "/v2/models/digits/versions/3/infer",
                v2m("digits", Some("3")),
            ),
            ("/v2/models/digits/versions//infer", Protocol::Other),
            ("/v2/models/my%20model/infer", v2m("my model", None)),
            ("/v2/models/bad%zz/infer", Protocol::Other),
            ("/v2/models/bad%ff/infer", Protocol::Other),
            ("/v2/models//infer", Protocol::Other),
            ("/v2/repository/models/digits/load", v2m("digits", None)),
            (
                "/v2/repository/index",
                Protocol::V2 {
                    model: None,
                    version: None,
                },
            ),
            (
                "/v2/health/ready",
                Protocol::V2 {
                    model: None,
                    version: None,
                },
            ),
            (
                "/v2",
                Protocol::V2 {
                    model: None,
                    version: None,
                },
            ),
            ("/", Protocol::Other),
            ("", Protocol::Other),
            ("/metrics", Protocol::Other),
            ("/v3/models/x", Protocol::Other),
            (
                "/inference.GRPCInferenceService/ModelInfer",
                Protocol::Grpc {
                    method: GrpcMethod::ModelScoped("ModelInfer".into()),
                },
            ),
            (
                "/inference.GRPCInferenceService/ModelReady",
                Protocol::Grpc {
                    method: GrpcMethod::ModelScoped("ModelReady".into()),
                },
            ),
            (
                "/inference.GRPCInferenceService/ServerLive",
                Protocol::Grpc {
                    method: GrpcMethod::ServerScoped("ServerLive".into()),
                },
            ),
            (
                "/inference.GRPCInferenceService/RepositoryModelLoad",
                Protocol::Grpc {
                    method: GrpcMethod::Repository("RepositoryModelLoad".into()),
                },
            ),
            (
                "/inference.GRPCInferenceService/Nope",
                Protocol::Grpc {
                    method: GrpcMethod::ServerScoped("Nope".into()),
                },
            ),
            ("/other.Service/ModelInfer", Protocol::Other),
        ];
        for (path, expected) in cases {
            assert_eq!(parse(path), expected, "{path}");
        }
    }

    #[test]
    fn garbage_paths_are_other_and_do_not_panic() {
        for path in [
            "%",
            "/v2/models/%",
            "/v2/models/%4",
            "/v1/models/%e2%82:predict",
            "////",
            "/v2/models/\u{0}/infer",
        ] {
            let _ = parse(path);
        }
        assert_eq!(
            parse(&"/v2/".repeat(10_000)),
            Protocol::V2 {
                model: None,
                version: None
            }
        );
    }
}
