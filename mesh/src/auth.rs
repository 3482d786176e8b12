//! Who may call an InferenceService: JWT authentication declared with meshserve's
//! annotations, and Envoy's own filters for it in a local mesh (`jwt_authn`, and `rbac` when
//! only some subjects may call); `istio` renders the same requirement as Istio's
//! `RequestAuthentication` and `AuthorizationPolicy`. Both run after the router filter, which names the InferenceService
//! of every request in `x-meshserve-isvc` / `x-meshserve-namespace` (and removes any a client
//! sent): the token a request needs is the one its InferenceService asks for, over REST and
//! gRPC alike.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// The token's issuer (`iss`); setting it turns authentication on.
pub const JWT_ISSUER: &str = "serving.meshserve.io/jwt-issuer";
/// The issuer's keys as a JWKS document (JSON), inline.
pub const JWT_JWKS: &str = "serving.meshserve.io/jwt-jwks";
/// Where the issuer publishes its JWKS (`http://` or `https://`).
pub const JWT_JWKS_URI: &str = "serving.meshserve.io/jwt-jwks-uri";
/// Accepted `aud` values, comma-separated (default: any).
pub const JWT_AUDIENCES: &str = "serving.meshserve.io/jwt-audiences";
/// The only subjects (`sub`) allowed to call, comma-separated (default: any the issuer signs for).
pub const JWT_SUBJECTS: &str = "serving.meshserve.io/jwt-subjects";
/// Claims copied into request headers once a token is verified, `claim=header` comma-separated
/// (name a header in the logger's `metadataHeaders` to have it in the payload logs).
pub const JWT_CLAIM_HEADERS: &str = "serving.meshserve.io/jwt-claim-headers";
const ANNOTATIONS: [&str; 6] = [
    JWT_ISSUER,
    JWT_JWKS,
    JWT_JWKS_URI,
    JWT_AUDIENCES,
    JWT_SUBJECTS,
    JWT_CLAIM_HEADERS,
];
const PREFIX: &str = "serving.meshserve.io/jwt-";

/// The filter that verifies tokens, and the metadata namespace it writes payloads to.
pub const JWT_FILTER: &str = "envoy.filters.http.jwt_authn";
/// Headers the router filter sets on every request it routes.
pub const ISVC_HEADER: &str = "x-meshserve-isvc";
/// Where `jwt_authn` notes why it refused a token (dynamic metadata).
const FAILURE_KEY: &str = "failure";
const RBAC_FILTER: &str = "envoy.filters.http.rbac";
pub const NAMESPACE_HEADER: &str = "x-meshserve-namespace";

/// Where the keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Jwks {
    Inline(String),
    Uri(Url),
}

/// A JWKS URI taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub text: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

/// A claim copied into a request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimHeader {
    pub claim: String,
    pub header: String,
}

/// An InferenceService's JWT requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwt {
    pub issuer: String,
    pub jwks: Jwks,
    pub audiences: Vec<String>,
    pub subjects: Vec<String>,
    pub claim_headers: Vec<ClaimHeader>,
}

/// Reads the `serving.meshserve.io/jwt-*` annotations: `None` without an issuer. Errors
/// name the annotation at fault (`(annotation, message)`).
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Option<Jwt>, (String, String)> {
    let fail = |key: &str, message: String| Err((key.to_owned(), message));
    for key in annotations.keys() {
        if key.starts_with(PREFIX) && !ANNOTATIONS.contains(&key.as_str()) {
            return fail(
                key,
                format!("unknown annotation (known: {})", ANNOTATIONS.join(", ")),
            );
        }
    }
    let get = |key: &str| annotations.get(key).map(|v| v.trim());
    let Some(issuer) = get(JWT_ISSUER) else {
        if let Some(key) = ANNOTATIONS.iter().find(|k| annotations.contains_key(**k)) {
            return fail(key, format!("needs {JWT_ISSUER}"));
        }
        return Ok(None);
    };
    if issuer.is_empty() {
        return fail(JWT_ISSUER, "is empty".into());
    }
    let jwks = match (get(JWT_JWKS), get(JWT_JWKS_URI)) {
        (Some(_), Some(_)) => {
            return fail(
                JWT_JWKS,
                format!("give {JWT_JWKS} or {JWT_JWKS_URI}, not both"),
            );
        }
        (None, None) => {
            return fail(JWT_ISSUER, format!("needs {JWT_JWKS} or {JWT_JWKS_URI}"));
        }
        (Some(text), None) => Jwks::Inline(check_jwks(text).map_err(|m| (JWT_JWKS.into(), m))?),
        (None, Some(uri)) => Jwks::Uri(parse_url(uri).map_err(|m| (JWT_JWKS_URI.into(), m))?),
    };
    let list = |key: &str| -> Vec<String> {
        get(key)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut claim_headers = Vec::new();
    for pair in list(JWT_CLAIM_HEADERS) {
        let Some((claim, header)) = pair.split_once('=') else {
            return fail(JWT_CLAIM_HEADERS, format!("'{pair}' is not claim=header"));
        };
        let (claim, header) = (claim.trim(), header.trim().to_ascii_lowercase());
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if claim.is_empty() || !token(&header) {
            return fail(
                JWT_CLAIM_HEADERS,
                format!("'{pair}': a claim, then a header name of letters, digits, - and _"),
            );
        }
        if header.starts_with("x-meshserve-") || header == "authorization" || header == "host" {
            return fail(
                JWT_CLAIM_HEADERS,
                format!("'{header}' is a header the mesh itself uses"),
            );
        }
        claim_headers.push(ClaimHeader {
            claim: claim.to_owned(),
            header,
        });
    }
    Ok(Some(Jwt {
        issuer: issuer.to_owned(),
        jwks,
        audiences: list(JWT_AUDIENCES),
        subjects: list(JWT_SUBJECTS),
        claim_headers,
    }))
}

/// A JWKS document: a JSON object whose `keys` each have a `kty`.
fn check_jwks(text: &str) -> Result<String, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not a JWKS (JSON): {e}"))?;
    let keys = value
        .get("keys")
        .and_then(Value::as_array)
        .filter(|keys| !keys.is_empty())
        .ok_or("a JWKS needs a non-empty \"keys\" array")?;
    if keys
        .iter()
        .any(|k| k.get("kty").and_then(Value::as_str).is_none())
    {
        return Err("every key of the JWKS needs a \"kty\"".into());
    }
    Ok(value.to_string())
}

fn parse_url(text: &str) -> Result<Url, String> {
    let (tls, rest) = if let Some(rest) = text.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = text.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(format!("'{text}' is not an http:// or https:// URL"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("'{text}': '{port}' is not a port"))?,
        ),
        _ => (authority, if tls { 443 } else { 80 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('@') {
        return Err(format!("'{text}' has no host (or carries credentials)"));
    }
    Ok(Url {
        text: text.to_owned(),
        tls,
        host: host.to_owned(),
        port,
    })
}

/// A service's provider name in Envoy (`<namespace>.<name>`), also the dynamic-metadata key
/// its verified payload is written under.
pub fn provider(name: &str, namespace: &str) -> String {
    format!("{namespace}.{name}")
}

/// The JWKS cluster a remote key set is fetched through.
pub fn jwks_cluster(name: &str, namespace: &str) -> String {
    format!("meshserve.jwks.{namespace}.{name}")
}

/// Envoy header matchers for the requests the router routed to one service.
fn service_headers(name: &str, namespace: &str) -> [Value; 2] {
    [
        json!({"name": ISVC_HEADER, "string_match": {"exact": name}}),
        json!({"name": NAMESPACE_HEADER, "string_match": {"exact": namespace}}),
    ]
}

/// One service's `jwt_authn` provider.
fn envoy_provider(name: &str, namespace: &str, jwt: &Jwt) -> Value {
    let mut provider = json!({
        "issuer": jwt.issuer,
        "forward": false,
        "payload_in_metadata": provider(name, namespace),
        // Marks Envoy's reply to a bad token, for the local reply mapper.
        "failed_status_in_metadata": FAILURE_KEY,
        "claim_to_headers": jwt.claim_headers.iter()
            .map(|c| json!({"header_name": c.header, "claim_name": c.claim}))
            .collect::<Vec<_>>(),
    });
    if let Some(map) = provider.as_object_mut() {
        if !jwt.audiences.is_empty() {
            map.insert("audiences".into(), json!(jwt.audiences));
        }
        match &jwt.jwks {
            Jwks::Inline(text) => {
                map.insert("local_jwks".into(), json!({"inline_string": text}));
            }
            Jwks::Uri(url) => {
                map.insert(
                    "remote_jwks".into(),
                    json!({
                        "http_uri": {"uri": url.text, "cluster": jwks_cluster(name, namespace), "timeout": "5s"},
                        "cache_duration": "600s",
                        // Fetched when Envoy starts (and refreshed), not on a client's request.
                        "async_fetch": {},
                        "retry_policy": {"num_retries": 3},
                    }),
                );
            }
        }
    }
    provider
}

/// Envoy's HTTP filters for the services that ask for tokens (`(name, namespace, jwt)`):
/// `jwt_authn` (a token from the service's issuer is required on every request routed to
/// it), then `rbac` when some service lets only some subjects call. Empty when none asks.
pub fn envoy_filters(services: &[(String, String, Jwt)]) -> Vec<Value> {
    if services.is_empty() {
        return Vec::new();
    }
    let mut providers = serde_json::Map::new();
    let mut rules = Vec::new();
    let mut policies = serde_json::Map::new();
    for (name, namespace, jwt) in services {
        let id = provider(name, namespace);
        providers.insert(id.clone(), envoy_provider(name, namespace, jwt));
        rules.push(json!({
            "match": {"prefix": "/", "headers": service_headers(name, namespace)},
            "requires": {"provider_name": id},
        }));
        if !jwt.subjects.is_empty() {
            let allowed: Vec<Value> = jwt
                .subjects
                .iter()
                .map(|sub| {
                    json!({"sourced_metadata": {"metadata_matcher": {"filter": JWT_FILTER,
                        "path": [{"key": id}, {"key": "sub"}],
                        "value": {"string_match": {"exact": sub}}}}})
                })
                .collect();
            let mut ids: Vec<Value> = service_headers(name, namespace)
                .into_iter()
                .map(|h| json!({"header": h}))
                .collect();
            ids.push(json!({"not_id": {"or_ids": {"ids": allowed}}}));
            policies.insert(
                id,
                json!({"permissions": [{"any": true}], "principals": [{"and_ids": {"ids": ids}}]}),
            );
        }
    }
    let mut filters = vec![json!({"name": JWT_FILTER, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": providers,
        "rules": rules,
    }})];
    if !policies.is_empty() {
        filters.push(json!({"name": RBAC_FILTER, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": policies},
        }}));
    }
    filters
}

/// Envoy's HTTP connection manager's `early_header_mutation_extensions` that remove every
/// service's claim headers from what clients send, before any filter runs, so that a header
/// the backend trusts comes only from a verified token. `None` without claim headers.
pub fn envoy_claim_removal(services: &[(String, String, Jwt)]) -> Option<Value> {
    let mut headers: Vec<&str> = services
        .iter()
        .flat_map(|(_, _, jwt)| jwt.claim_headers.iter().map(|c| c.header.as_str()))
        .collect();
    headers.sort_unstable();
    headers.dedup();
    (!headers.is_empty()).then(|| {
        json!([{
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                "mutations": headers.iter().map(|h| json!({"remove": h})).collect::<Vec<_>>(),
            },
        }])
    })
}

/// Access-log filters that select Envoy's own refusals of a request for its token: a missing
/// or bad token (401, or 403 for a wrong audience; `jwt_authn` notes them in its metadata)
/// and a subject not allowed (403; `rbac` notes its verdict). The filters' own replies do not
/// match. Empty when no service asks for tokens.
pub fn envoy_refusals(services: &[(String, String, Jwt)]) -> Vec<Value> {
    if services.is_empty() {
        return Vec::new();
    }
    [
        (JWT_FILTER, FAILURE_KEY),
        (RBAC_FILTER, "enforced_engine_result"),
    ]
    .into_iter()
    .map(|(filter, key)| {
        json!({"metadata_filter": {"matcher": {"filter": filter, "path": [{"key": key}],
                "value": {"present_match": true}}}})
    })
    .collect()
}

/// The TLS a remote JWKS is fetched over for `https://` (the server's certificate checked
/// against the system's CAs, SNI its host): the JWKS cluster's `transport_socket`.
pub fn jwks_tls(url: &Url) -> Option<Value> {
    url.tls.then(|| {
        json!({"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": url.host,
            "common_tls_context": {"validation_context": {"system_root_certs": {}}},
        }})
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const JWKS: &str = r#"{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "k1"}]}"#;

    #[test]
    fn the_annotations_make_a_requirement() {
        let jwt = parse(&annotations(&[
            (JWT_ISSUER, "https://issuer.example"),
            (JWT_JWKS, JWKS),
            (JWT_AUDIENCES, "digits, fraud"),
            (JWT_SUBJECTS, "alice"),
            (JWT_CLAIM_HEADERS, "sub=X-User, email=x-email"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(jwt.audiences, ["digits", "fraud"]);
        assert_eq!(jwt.subjects, ["alice"]);
        assert_eq!(jwt.claim_headers[0].header, "x-user");
        assert_eq!(jwt.claim_headers[1].claim, "email");
        assert!(matches!(jwt.jwks, Jwks::Inline(_)));
        assert_eq!(parse(&annotations(&[("other", "x")])).unwrap(), None);
    }

    #[test]
    fn a_jwks_uri_is_taken_apart() {
        let url = parse_url("https://login.example.com/.well-known/jwks.json").unwrap();
        assert_eq!(
            (url.tls, url.host.as_str(), url.port),
            (true, "login.example.com", 443)
        );
        let url = parse_url("http://127.0.0.1:9000/jwks").unwrap();
        assert_eq!(
            (url.tls, url.host.as_str(), url.port),
            (false, "127.0.0.1", 9000)
        );
        let url = parse_url("http://[::1]:9000/jwks").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 9000));
        assert!(parse_url("ftp://x/jwks").is_err());
        assert!(parse_url("https://user:pw@host/jwks").is_err());
        assert!(parse_url("http://:80/").is_err());
    }

    #[test]
    fn mistakes_name_the_annotation() {
        let cases: [(&[(&str, &str)], &str); 8] = [
            (&[(JWT_JWKS, JWKS)], JWT_JWKS),
            (&[(JWT_ISSUER, "i")], JWT_ISSUER),
            (
                &[
                    (JWT_ISSUER, "i"),
                    (JWT_JWKS, JWKS),
                    (JWT_JWKS_URI, "https://x/"),
                ],
                JWT_JWKS,
            ),
            (&[(JWT_ISSUER, "i"), (JWT_JWKS, "{\"keys\": []}")], JWT_JWKS),
            (&[(JWT_ISSUER, "i"), (JWT_JWKS, "not json")], JWT_JWKS),
            (
                &[
                    (JWT_ISSUER, "i"),
                    (JWT_JWKS, JWKS),
                    (JWT_CLAIM_HEADERS, "sub"),
                ],
                JWT_CLAIM_HEADERS,
            ),
            (
                &[
                    (JWT_ISSUER, "i"),
                    (JWT_JWKS, JWKS),
                    (JWT_CLAIM_HEADERS, "sub=x-meshserve-isvc"),
                ],
                JWT_CLAIM_HEADERS,
            ),
            (
                &[("serving.meshserve.io/jwt-issuers", "i")],
                "serving.meshserve.io/jwt-issuers",
            ),
        ];
        for (pairs, at) in cases {
            let (key, message) = parse(&annotations(pairs)).unwrap_err();
            assert_eq!(key, at, "{pairs:?}: {message}");
        }
    }

    #[test]
    fn envoy_gets_a_provider_per_service_and_rbac_only_for_subjects() {
        let open = parse(&annotations(&[(JWT_ISSUER, "i"), (JWT_JWKS, JWKS)]))
            .unwrap()
            .unwrap();
        let filters = envoy_filters(&[("digits".into(), "default".into(), open.clone())]);
        assert_eq!(filters.len(), 1);
        let config = &filters[0]["typed_config"];
        assert_eq!(config["providers"]["default.digits"]["issuer"], "i");
        assert_eq!(
            config["rules"][0]["requires"]["provider_name"],
            "default.digits"
        );
        let mut narrow = open.clone();
        narrow.subjects = vec!["alice".into()];
        let filters = envoy_filters(&[
            ("digits".into(), "default".into(), open.clone()),
            ("fraud".into(), "risk".into(), narrow),
        ]);
        assert_eq!(filters.len(), 2);
        let policies = &filters[1]["typed_config"]["rules"]["policies"];
        assert!(policies.get("default.digits").is_none());
        assert!(policies["risk.fraud"].to_string().contains("alice"));
        assert!(envoy_filters(&[]).is_empty());
    }
}
