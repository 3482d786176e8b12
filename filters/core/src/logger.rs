//! Payload logging: which requests a revision logs, and the CloudEvents that carry them, in
//! KServe's format (binary mode, `org.kubeflow.serving.inference.request|response`, one `ce-id`
//! shared by a request and its response) so KServe's consumers read them unchanged.
//!
//! The `logger` filter copies the payloads as they stream past and, at the end of the stream,
//! hands the events to the revision's sidecar (its log intake at [`INTAKE_PATH`]), which spools
//! them durably and delivers them to the sink. Nothing here waits on anything: the shell passes
//! in the draw, the id and the clock.

use serde::Deserialize;

/// Where a sidecar takes events (a `POST` with the event's `ce-*` headers and payload).
pub const INTAKE_PATH: &str = "/meshserve/events";
/// The filter sends the intake what a tick gathered in one call, as exchange records
/// ([`encode_exchange`]): the sidecar makes the CloudEvents, natively, not the wasm VM.
pub const EXCHANGES_CONTENT_TYPE: &str = "application/x-meshserve-exchanges";
pub const REQUEST_TYPE: &str = "org.kubeflow.serving.inference.request";
pub const RESPONSE_TYPE: &str = "org.kubeflow.serving.inference.response";

/// Whether a request is an inference call, the only ones logged: KServe V1 `:predict` and
/// `:explain`, Open Inference Protocol `/infer` (a built-in explainer's `<m>-explainer` too),
/// gRPC `ModelInfer` (not health, metadata or repository calls).
pub fn is_inference(path: &str) -> bool {
    use crate::protocol::{GrpcMethod, Protocol, V1Verb, parse};
    match parse(path) {
        Protocol::V1 {
            verb: V1Verb::Predict | V1Verb::Explain,
            ..
        } => true,
        Protocol::V2 { model: Some(_), .. } => path
            .split(['?', '#'])
            .next()
            .is_some_and(|p| p.ends_with("/infer")),
        Protocol::Grpc {
            method: GrpcMethod::ModelScoped(m),
        } => m == "ModelInfer",
        _ => false,
    }
}

/// What a revision logs (KServe's `logger.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    All,
    Request,
    Response,
}

/// A revision's logger, as the filter configuration carries it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    #[serde(default)]
    pub mode: Mode,
    /// Request headers copied into the events' `ce-metadata` (KServe's `metadataHeaders`).
    #[serde(default)]
    pub metadata_headers: Vec<String>,
    /// The share of requests logged, in whole percent (default 100).
    #[serde(default = "default_sampling_percent")]
    pub sampling_percent: i64,
    /// The most payload bytes an event carries; longer payloads are cut there and the event
    /// says `ce-truncated: true` (default 1 MiB).
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
}

fn default_sampling_percent() -> i64 {
    100
}

fn default_max_payload_bytes() -> usize {
    1 << 20
}

impl LoggerConfig {
    /// Checks the values serde cannot; `path` names the field in messages.
    pub fn check(&self, path: &str) -> Result<(), String> {
        if !(0..=100).contains(&self.sampling_percent) {
            return Err(format!(
                "{path}.sampling_percent: {} is not between 0 and 100",
                self.sampling_percent
            ));
        }
        if self
            .metadata_headers
            .iter()
            .any(|h| h.is_empty() || h.chars().any(|c| c.is_ascii_uppercase()))
        {
            return Err(format!(
                "{path}.metadata_headers: header names must be non-empty and lower-case"
            ));
        }
        Ok(())
    }

    /// Whether a request with this uniform draw is logged.
    pub fn sampled(&self, draw: u64) -> bool {
        (draw % 100) < self.sampling_percent.clamp(0, 100) as u64
    }
}

/// A payload copied as it streamed past, up to a limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payload {
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    pub truncated: bool,
}

impl Payload {
    /// Appends a chunk, keeping at most `limit` bytes in all.
    pub fn push(&mut self, chunk: &[u8], limit: usize) {
        let room = limit.saturating_sub(self.body.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.body
            .extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
    }
}

/// One request and its answer, as the logger saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub id: String,
    /// RFC 3339, from [`rfc3339`].
    pub time: String,
    pub isvc: String,
    pub namespace: String,
    pub component: String,
    /// The revision that served it.
    pub endpoint: String,
    /// The request path, for `ce-source`.
    pub path: String,
    /// The metadata headers found on the request, in configuration order.
    pub metadata: Vec<(String, String)>,
    pub request: Payload,
    /// The response's status and payload; `None` if the stream ended without one.
    pub response: Option<(u16, Payload)>,
    /// The InferenceGraph and its step (`node/step`) that made this request, when a graph
    /// did: the events' `ce-inferencegraph` and `ce-inferencegraphstep`.
    pub graph: Option<(String, String)>,
}

/// A CloudEvent in binary mode: its headers (`ce-*` and `content-type`) and the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Event {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The events `mode` asks for: the request's, then the response's (non-2xx answers too).
pub fn events(exchange: &Exchange, mode: Mode) -> Vec<Event> {
    let mut out = Vec::with_capacity(2);
    if mode != Mode::Response {
        out.push(event(exchange, REQUEST_TYPE, &exchange.request, None));
    }
    if mode != Mode::Request
        && let Some((status, payload)) = &exchange.response
    {
        out.push(event(exchange, RESPONSE_TYPE, payload, Some(*status)));
    }
    out
}

fn event(exchange: &Exchange, kind: &str, payload: &Payload, status: Option<u16>) -> Event {
    let mut metadata = serde_json::Map::new();
    for (name, value) in &exchange.metadata {
        let values = metadata
            .entry(name.clone())
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let serde_json::Value::Array(list) = values {
            list.push(serde_json::Value::from(value.as_str()));
        }
    }
    let mut headers: Vec<(String, String)> = [
        ("ce-specversion", "1.0"),
        ("ce-id", &exchange.id),
        ("ce-type", kind),
        ("ce-source", &exchange.path),
        ("ce-time", &exchange.time),
        ("ce-inferenceservicename", &exchange.isvc),
        ("ce-namespace", &exchange.namespace),
        ("ce-component", &exchange.component),
        ("ce-endpoint", &exchange.endpoint),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    if !metadata.is_empty() {
        headers.push((
            "ce-metadata".into(),
            serde_json::Value::Object(metadata).to_string(),
        ));
    }
    if let Some((graph, step)) = &exchange.graph {
        headers.push(("ce-inferencegraph".into(), graph.clone()));
        headers.push(("ce-inferencegraphstep".into(), step.clone()));
    }
    if let Some(status) = status {
        headers.push(("ce-statuscode".into(), status.to_string()));
    }
    if payload.truncated {
        headers.push(("ce-truncated".into(), "true".into()));
    }
    headers.push((
        "content-type".into(),
        payload
            .content_type
            .clone()
            .unwrap_or_else(|| "application/octet-stream".into()),
    ));
    Event {
        headers,
        body: payload.body.clone(),
    }
}

/// One event as a record: `u32 length | u32 crc32 | payload`, little-endian; the payload is
/// `u32 header count`, each header `u16 name length | name | u32 value length | value`, then
/// the body. The sidecar's spool stores the same records.
pub fn encode_record(event: &Event, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&(event.headers.len() as u32).to_le_bytes());
    for (name, value) in &event.headers {
        out.extend_from_slice(&(name.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
        out.extend_from_slice(
            name.as_bytes()
                .get(..usize::from(u16::MAX))
                .unwrap_or(name.as_bytes()),
        );
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(&event.body);
    let payload = out.get(start + 8..).unwrap_or_default();
    let (len, crc) = (payload.len() as u32, crc32fast::hash(payload));
    if let Some(head) = out.get_mut(start..start + 8) {
        head.copy_from_slice(&[len.to_le_bytes(), crc.to_le_bytes()].concat());
    }
}

/// Reads the record at the start of `bytes`: the event and the record's size; `None` for a
/// torn or corrupt record.
pub fn decode_record(bytes: &[u8]) -> Option<(Event, usize)> {
    fn take<'a>(at: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let head = at.get(..n)?;
        *at = at.get(n..)?;
        Some(head)
    }
    fn u32_at(at: &mut &[u8]) -> Option<u32> {
        Some(u32::from_le_bytes(take(at, 4)?.try_into().ok()?))
    }
    let mut at = bytes;
    let len = u32_at(&mut at)? as usize;
    let crc = u32_at(&mut at)?;
    let payload = at.get(..len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let mut at = payload;
    let count = u32_at(&mut at)?;
    let mut headers = Vec::with_capacity(count.min(64) as usize);
    for _ in 0..count {
        let n = usize::from(u16::from_le_bytes(take(&mut at, 2)?.try_into().ok()?));
        let name = String::from_utf8(take(&mut at, n)?.to_vec()).ok()?;
        let n = u32_at(&mut at)? as usize;
        let value = String::from_utf8(take(&mut at, n)?.to_vec()).ok()?;
        headers.push((name, value));
    }
    Some((
        Event {
            headers,
            body: at.to_vec(),
        },
        8 + len,
    ))
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_payload(out: &mut Vec<u8>, payload: &Payload) {
    out.push(u8::from(payload.truncated));
    match &payload.content_type {
        Some(ct) => {
            out.push(1);
            put(out, ct.as_bytes());
        }
        None => out.push(0),
    }
    put(out, &payload.body);
}

/// One exchange and the mode it is logged in, as a record (`u32 length | u32 crc32 | payload`,
/// as [`encode_record`]), appended to `out`. Returns the number of events it makes.
pub fn encode_exchange(exchange: &Exchange, mode: Mode, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.push(match mode {
        Mode::All => 0,
        Mode::Request => 1,
        Mode::Response => 2,
    });
    for text in [
        &exchange.id,
        &exchange.time,
        &exchange.isvc,
        &exchange.namespace,
        &exchange.component,
        &exchange.endpoint,
        &exchange.path,
    ] {
        put(out, text.as_bytes());
    }
    out.extend_from_slice(&(exchange.metadata.len() as u32).to_le_bytes());
    for (name, value) in &exchange.metadata {
        put(out, name.as_bytes());
        put(out, value.as_bytes());
    }
    put_payload(out, &exchange.request);
    match &exchange.response {
        Some((status, payload)) => {
            out.push(1);
            out.extend_from_slice(&status.to_le_bytes());
            put_payload(out, payload);
        }
        None => out.push(0),
    }
    // Trailing and optional, so that records spooled before graphs existed still read.
    if let Some((graph, step)) = &exchange.graph {
        put(out, graph.as_bytes());
        put(out, step.as_bytes());
    }
    let payload = out.get(start + 8..).unwrap_or_default();
    let (len, crc) = (payload.len() as u32, crc32fast::hash(payload));
    if let Some(head) = out.get_mut(start..start + 8) {
        head.copy_from_slice(&[len.to_le_bytes(), crc.to_le_bytes()].concat());
    }
    usize::from(mode != Mode::Response)
        + usize::from(mode != Mode::Request && exchange.response.is_some())
}

/// The exchanges of an intake body; `None` if any record is torn or corrupt.
pub fn decode_exchanges(mut input: &[u8]) -> Option<Vec<(Exchange, Mode)>> {
    fn take<'a>(at: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let head = at.get(..n)?;
        *at = at.get(n..)?;
        Some(head)
    }
    fn u32_at(at: &mut &[u8]) -> Option<u32> {
        Some(u32::from_le_bytes(take(at, 4)?.try_into().ok()?))
    }
    fn bytes<'a>(at: &mut &'a [u8]) -> Option<&'a [u8]> {
        let n = u32_at(at)? as usize;
        take(at, n)
    }
    fn text(at: &mut &[u8]) -> Option<String> {
        String::from_utf8(bytes(at)?.to_vec()).ok()
    }
    fn payload(at: &mut &[u8]) -> Option<Payload> {
        let truncated = *take(at, 1)?.first()? == 1;
        let content_type = match *take(at, 1)?.first()? {
            1 => Some(text(at)?),
            _ => None,
        };
        Some(Payload {
            content_type,
            body: bytes(at)?.to_vec(),
            truncated,
        })
    }
    let mut out = Vec::new();
    while !input.is_empty() {
        let mut at = input;
        let len = u32_at(&mut at)? as usize;
        let crc = u32_at(&mut at)?;
        let mut record = take(&mut at, len)?;
        if crc32fast::hash(record) != crc {
            return None;
        }
        input = at;
        let mode = match *take(&mut record, 1)?.first()? {
            0 => Mode::All,
            1 => Mode::Request,
            _ => Mode::Response,
        };
        let mut fields = Vec::with_capacity(7);
        for _ in 0..7 {
            fields.push(text(&mut record)?);
        }
        let count = u32_at(&mut record)?;
        let mut metadata = Vec::with_capacity(count.min(64) as usize);
        for _ in 0..count {
            metadata.push((text(&mut record)?, text(&mut record)?));
        }
        let request = payload(&mut record)?;
        let response = match *take(&mut record, 1)?.first()? {
            1 => {
                let status = u16::from_le_bytes(take(&mut record, 2)?.try_into().ok()?);
                Some((status, payload(&mut record)?))
            }
            _ => None,
        };
        let graph = if record.is_empty() {
            None
        } else {
            Some((text(&mut record)?, text(&mut record)?))
        };
        let mut fields = fields.into_iter();
        let mut next = || fields.next().unwrap_or_default();
        out.push((
            Exchange {
                id: next(),
                time: next(),
                isvc: next(),
                namespace: next(),
                component: next(),
                endpoint: next(),
                path: next(),
                metadata,
                request,
                response,
                graph,
            },
            mode,
        ));
    }
    Some(out)
}

/// A time since the Unix epoch as RFC 3339 in UTC with microseconds
/// (`2026-11-25T13:12:09.123456Z`).
pub fn rfc3339(unix_nanos: u128) -> String {
    let secs = (unix_nanos / 1_000_000_000) as i64;
    let micros = (unix_nanos / 1_000 % 1_000_000) as u32;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60
    )
}

/// An event id from 128 random bits, in UUID form (version 4 bits set).
pub fn event_id(high: u64, low: u64) -> String {
    let high = (high & !0xf000) | 0x4000;
    let low = (low & !(0xc << 60)) | (0x8 << 60);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xffff,
        high & 0xffff,
        low >> 48,
        low & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange() -> Exchange {
        Exchange {
            id: "id-1".into(),
            time: rfc3339(0),
            isvc: "digits".into(),
            namespace: "default".into(),
            component: "predictor".into(),
            endpoint: "digits-v1".into(),
            path: "/v1/models/digits:predict".into(),
            metadata: vec![("x-user".into(), "ada".into())],
            request: Payload {
                content_type: Some("application/json".into()),
                body: b"{\"instances\": [1]}".to_vec(),
                truncated: false,
            },
            response: Some((
                503,
                Payload {
                    content_type: None,
                    body: b"{\"error\": \"busy\"}".to_vec(),
                    truncated: true,
                },
            )),
            graph: None,
        }
    }

    #[test]
    fn a_request_and_its_response_share_an_id_and_carry_kserves_attributes() {
        let both = events(&exchange(), Mode::All);
        assert_eq!(both.len(), 2);
        let (request, response) = (&both[0], &both[1]);
        assert_eq!(request.header("ce-id"), response.header("ce-id"));
        assert_eq!(request.header("ce-type"), Some(REQUEST_TYPE));
        assert_eq!(response.header("ce-type"), Some(RESPONSE_TYPE));
        for name in [
            "ce-specversion",
            "ce-source",
            "ce-time",
            "ce-inferenceservicename",
            "ce-namespace",
            "ce-component",
            "ce-endpoint",
            "ce-metadata",
        ] {
            assert!(request.header(name).is_some(), "{name}");
        }
        assert_eq!(request.header("ce-metadata"), Some(r#"{"x-user":["ada"]}"#));
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(request.header("ce-truncated"), None);
        assert_eq!(response.header("ce-statuscode"), Some("503"));
        assert_eq!(response.header("ce-truncated"), Some("true"));
        assert_eq!(
            response.header("content-type"),
            Some("application/octet-stream")
        );
        assert_eq!(events(&exchange(), Mode::Request).len(), 1);
        let only = events(&exchange(), Mode::Response);
        assert_eq!(only[0].header("ce-type"), Some(RESPONSE_TYPE));
    }

    #[test]
    fn payloads_are_cut_at_the_limit_and_marked() {
        let mut p = Payload::default();
        p.push(b"abcd", 6);
        assert!(!p.truncated);
        p.push(b"efgh", 6);
        assert_eq!((p.body.as_slice(), p.truncated), (&b"abcdef"[..], true));
        p.push(b"ijk", 6);
        assert_eq!(p.body.len(), 6);
    }

    #[test]
    fn sampling_takes_its_share() {
        let mut config: LoggerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config.sampling_percent, 100);
        config.sampling_percent = 30;
        let logged = (0..10_000u64)
            .filter(|d| config.sampled(d.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7))
            .count();
        assert!((2_800..3_200).contains(&logged), "{logged}");
        config.sampling_percent = 0;
        assert!(!(0..100).any(|d| config.sampled(d)));
        assert!(config.check("x").is_ok());
        config.sampling_percent = 101;
        assert!(config.check("x").unwrap_err().contains("101"));
    }

    #[test]
    fn records_and_exchanges_round_trip_and_corruption_is_caught() {
        for event in events(&exchange(), Mode::All) {
            let mut record = Vec::new();
            encode_record(&event, &mut record);
            assert_eq!(decode_record(&record), Some((event, record.len())));
        }
        let mut batch = Vec::new();
        assert_eq!(encode_exchange(&exchange(), Mode::All, &mut batch), 2);
        let mut no_answer = exchange();
        no_answer.response = None;
        assert_eq!(encode_exchange(&no_answer, Mode::Response, &mut batch), 0);
        assert_eq!(
            decode_exchanges(&batch).unwrap(),
            vec![(exchange(), Mode::All), (no_answer, Mode::Response)]
        );
        assert_eq!(decode_exchanges(&[]).unwrap(), vec![]);
        // A graph's step: its two attributes, in the record and in the events.
        let mut step = exchange();
        step.graph = Some(("chain".into(), "root/0".into()));
        let mut one = Vec::new();
        encode_exchange(&step, Mode::All, &mut one);
        assert_eq!(
            decode_exchanges(&one).unwrap(),
            vec![(step.clone(), Mode::All)]
        );
        for event in events(&step, Mode::All) {
            assert_eq!(event.header("ce-inferencegraph"), Some("chain"));
            assert_eq!(event.header("ce-inferencegraphstep"), Some("root/0"));
        }
        assert!(
            events(&exchange(), Mode::All)
                .iter()
                .all(|e| e.header("ce-inferencegraph").is_none())
        );
        let mut bad = batch.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode_exchanges(&bad).is_none());
        assert!(decode_exchanges(&batch[..batch.len() - 3]).is_none());
    }

    #[test]
    fn only_inference_calls_are_logged() {
        for path in [
            "/v1/models/m:predict",
            "/v1/models/m:explain",
            "/v2/models/m/infer",
            "/v2/models/m/versions/2/infer?x=1",
            "/inference.GRPCInferenceService/ModelInfer",
        ] {
            assert!(is_inference(path), "{path}");
        }
        for path in [
            "/v2/health/ready",
            "/v2/models/m",
            "/v1/models/m",
            "/v2/repository/models/m/load",
            "/inference.GRPCInferenceService/ModelMetadata",
        ] {
            assert!(!is_inference(path), "{path}");
        }
    }

    #[test]
    fn times_and_ids() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(1_795_612_329_123_456_789),
            "2026-11-25T13:12:09.123456Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
        let id = event_id(u64::MAX, 0);
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_eq!(&id[19..20], "8");
    }
}
