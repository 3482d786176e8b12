//! Transformers: declarative pre- and post-processing that runs inside Envoy (and natively,
//! the same code, in the sidecar and in `meshserve transform`), in place of KServe's Python
//! transformer containers.
//!
//! A transformer is part of an InferenceService's filter configuration (`transformer`):
//!
//! ```yaml
//! request:
//!   field: image            # where each instance's image is (V1 object key, V2 input name)
//!   steps:
//!     - base64_decode       # text -> bytes (binary values pass unchanged)
//!     - image_decode        # PNG or JPEG -> pixels (0..255), under limits.max_image_pixels
//!     - color: grayscale    # or rgb
//!     - resize: {width: 28, height: 28, method: area, fit: crop}   # bilinear|area; stretch|pad|crop
//!     - invert
//!     - scale: 0.00392156862745098
//!     - normalize: {mean: [0.5], std: [0.5]}
//!     - layout: nchw        # nchw|nhwc|flat: the image becomes a tensor
//!     - cast: FP32
//!     - emit: {input: input}   # the model input the batch tensor feeds
//! response:
//!   steps: [{softmax: {}}, {top_k: {k: 3}}, {rename: {probabilities: digits}}]
//!   labels: ["zero", "one", ...]
//! limits: {max_body_bytes: 8388608, max_image_pixels: 16777216, max_batch: 64}
//! ```
//!
//! Or, for models that take numbers, `request: {inputs: [{name: x, datatype: FP32}]}`: KServe
//! V1 requests are converted to Open Inference Protocol requests for those inputs (the same
//! conversion as the sidecar's own V1 endpoint: nested lists, objects naming inputs, `{"b64":
//! ...}` for binary values).
//!
//! Every instance (V1) or element of the `field` input (V2) goes through the steps; the results
//! are stacked into one batch tensor in request order, so the answers come back in order. A V1
//! client gets a V1 answer (`{"predictions": [...]}`, one per instance); a V2 client a V2 one.

mod error;
pub mod image;
pub mod post;

use base64::Engine;
use meshserve_proto::datatype::DataType;
use meshserve_proto::infer::{InferRequest, InferResponse, InputTensor, Parameters, TensorSpec};
use meshserve_proto::rest::{self, EncodedBody};
use meshserve_proto::tensor::TensorData;
use meshserve_proto::v1;
use serde::Deserialize;
use serde_json::Value;

pub use self::error::TransformError;
use self::image::{Color, Image, Layout, Resize};
use self::post::ResponseStep;

/// The protocol the client spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// KServe V1 `:predict`.
    V1,
    /// Open Inference Protocol REST `/infer`.
    V2,
}

/// Named limits, each with its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformLimits {
    /// The largest request body the transformer reads (default 8 MiB). Envoy's buffer limit is
    /// rendered to match.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// The most pixels (width x height) of one image, checked from its header before decoding
    /// (default 16,777,216: 4096 x 4096).
    #[serde(default = "default_max_image_pixels")]
    pub max_image_pixels: u64,
    /// The most instances (images) in one request (default 64).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// The most pixels decoded for one request, all its images together (default 33,554,432:
    /// two 4096 x 4096 pictures): bounds the time and memory one request takes.
    #[serde(default = "default_max_request_pixels")]
    pub max_request_pixels: u64,
    /// The most bytes of the batch tensor the transformer builds, as 32-bit floats before any
    /// `cast` (default 64 MiB).
    #[serde(default = "default_max_tensor_bytes")]
    pub max_tensor_bytes: usize,
}

fn default_max_body_bytes() -> usize {
    8 << 20
}

fn default_max_image_pixels() -> u64 {
    4096 * 4096
}

fn default_max_batch() -> usize {
    64
}

fn default_max_request_pixels() -> u64 {
    2 * 4096 * 4096
}

fn default_max_tensor_bytes() -> usize {
    64 << 20
}

impl Default for TransformLimits {
    fn default() -> Self {
        TransformLimits {
            max_body_bytes: default_max_body_bytes(),
            max_image_pixels: default_max_image_pixels(),
            max_batch: default_max_batch(),
            max_request_pixels: default_max_request_pixels(),
            max_tensor_bytes: default_max_tensor_bytes(),
        }
    }
}

/// One request step, as written in the configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    Base64Decode,
    ImageDecode,
    Color(Color),
    Resize(Resize),
    Invert,
    Scale(f32),
    Normalize { mean: Vec<f32>, std: Vec<f32> },
    Layout(Layout),
    Cast(String),
    Emit { input: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransformer {
    #[serde(default)]
    request: Option<RawRequest>,
    #[serde(default)]
    response: RawResponse,
    #[serde(default)]
    limits: TransformLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    field: Option<String>,
    #[serde(default)]
    steps: Vec<Step>,
    #[serde(default)]
    inputs: Vec<RawInput>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    name: String,
    datatype: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResponse {
    #[serde(default)]
    steps: Vec<ResponseStep>,
    #[serde(default)]
    labels: Vec<String>,
}

/// What happens to requests.
#[derive(Debug, Clone, PartialEq)]
enum RequestPlan {
    /// Requests pass unchanged.
    Unchanged,
    /// Every instance through `steps`, stacked into `input`.
    Items {
        field: Option<String>,
        steps: Vec<Step>,
        input: String,
        datatype: DataType,
    },
    /// V1 requests converted for these model inputs.
    Convert(Vec<TensorSpec>),
}

/// A validated transformer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawTransformer")]
pub struct Transformer {
    request: RequestPlan,
    response: Vec<ResponseStep>,
    labels: Vec<String>,
    limits: TransformLimits,
}

/// What a value is between steps, for checking a pipeline before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bytes,
    Image,
    Tensor,
}

const CASTS: [DataType; 7] = [
    DataType::Fp32,
    DataType::Fp16,
    DataType::Fp64,
    DataType::Uint8,
    DataType::Int8,
    DataType::Int32,
    DataType::Int64,
];

impl TryFrom<RawTransformer> for Transformer {
    type Error = String;

    fn try_from(raw: RawTransformer) -> Result<Self, String> {
        let limits = raw.limits;
        if limits.max_body_bytes == 0
            || limits.max_image_pixels == 0
            || limits.max_batch == 0
            || limits.max_request_pixels == 0
            || limits.max_tensor_bytes == 0
        {
            return Err("transformer.limits: every limit must be above 0".into());
        }
        let request = match raw.request {
            None => RequestPlan::Unchanged,
            Some(r) => plan(r)?,
        };
        for (i, step) in raw.response.steps.iter().enumerate() {
            if let ResponseStep::TopK { k: 0, .. } = step {
                return Err(format!(
                    "transformer.response.steps[{i}].top_k: k must be at least 1"
                ));
            }
        }
        Ok(Transformer {
            request,
            response: raw.response.steps,
            labels: raw.response.labels,
            limits,
        })
    }
}

fn plan(raw: RawRequest) -> Result<RequestPlan, String> {
    match (raw.steps.is_empty(), raw.inputs.is_empty()) {
        (false, false) => {
            return Err(
                "transformer.request: give `steps` (an image pipeline) or `inputs` (V1 conversion), not both"
                    .into(),
            );
        }
        (true, true) => return Ok(RequestPlan::Unchanged),
        (true, false) => {
            let specs = raw
                .inputs
                .into_iter()
                .enumerate()
                .map(|(i, input)| {
                    let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
                        format!(
                            "transformer.request.inputs[{i}].datatype: unknown datatype '{}'",
                            input.datatype
                        )
                    })?;
                    Ok(TensorSpec {
                        name: input.name,
                        datatype,
                        shape: vec![-1],
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            return Ok(RequestPlan::Convert(specs));
        }
        (false, true) => {}
    }
    let mut kind = Kind::Bytes;
    let mut normalized = false;
    let mut channels: Option<usize> = None;
    let mut datatype = DataType::Fp32;
    let mut emit = None;
    let mut steps = Vec::new();
    let count = raw.steps.len();
    for (i, step) in raw.steps.into_iter().enumerate() {
        let at = format!("transformer.request.steps[{i}]");
        let (needs, gives) = match &step {
            Step::Base64Decode => (Kind::Bytes, Kind::Bytes),
            Step::ImageDecode => (Kind::Bytes, Kind::Image),
            Step::Color(c) => {
                channels = Some(c.channels());
                (Kind::Image, Kind::Image)
            }
            Step::Resize(r) => {
                let pixels = (r.width as u64).saturating_mul(r.height as u64);
                if r.width == 0 || r.height == 0 || pixels > 1 << 24 {
                    return Err(format!(
                        "{at}.resize: {}x{} is not a usable size",
                        r.width, r.height
                    ));
                }
                (Kind::Image, Kind::Image)
            }
            Step::Invert if normalized => {
                return Err(format!(
                    "{at}: invert after normalize has no range to invert within; invert first"
                ));
            }
            Step::Invert | Step::Scale(_) => (Kind::Image, Kind::Image),
            Step::Normalize { mean, std } => {
                let fits = |n: usize| n == 1 || channels.is_none_or(|c| c == n);
                if mean.is_empty() || std.is_empty() || !fits(mean.len()) || !fits(std.len()) {
                    return Err(format!(
                        "{at}.normalize: mean and std need one value, or one per channel{}",
                        channels.map(|c| format!(" ({c})")).unwrap_or_default()
                    ));
                }
                if std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
                    return Err(format!("{at}.normalize: std must be finite and not 0"));
                }
                normalized = true;
                (Kind::Image, Kind::Image)
            }
            Step::Layout(_) => (Kind::Image, Kind::Tensor),
            Step::Cast(name) => {
                datatype = DataType::parse(name)
                    .filter(|d| CASTS.contains(d))
                    .ok_or_else(|| {
                        format!("{at}.cast: '{name}' is not one of FP32, FP16, FP64, UINT8, INT8, INT32, INT64")
                    })?;
                (Kind::Tensor, Kind::Tensor)
            }
            Step::Emit { input } => {
                if i + 1 != count {
                    return Err(format!("{at}: emit must be the last step"));
                }
                if input.is_empty() {
                    return Err(format!("{at}.emit.input: name the model input"));
                }
                emit = Some(input.clone());
                (Kind::Tensor, Kind::Tensor)
            }
        };
        if needs != kind {
            let what = |k: Kind| match k {
                Kind::Bytes => "bytes (before image_decode)",
                Kind::Image => "an image (after image_decode, before layout)",
                Kind::Tensor => "a tensor (after layout)",
            };
            return Err(format!(
                "{at}: this step takes {} but gets {}",
                what(needs),
                what(kind)
            ));
        }
        kind = gives;
        if !matches!(step, Step::Cast(_) | Step::Emit { .. }) {
            steps.push(step);
        }
    }
    let input = emit.ok_or_else(|| {
        "transformer.request.steps: end with `emit: {input: <model input>}`".to_owned()
    })?;
    Ok(RequestPlan::Items {
        field: raw.field,
        steps,
        input,
        datatype,
    })
}

impl Transformer {
    pub fn limits(&self) -> &TransformLimits {
        &self.limits
    }

    /// Whether requests in this protocol are rewritten.
    pub fn transforms_request(&self, wire: Wire) -> bool {
        match &self.request {
            RequestPlan::Unchanged => false,
            RequestPlan::Items { .. } => true,
            RequestPlan::Convert(_) => wire == Wire::V1,
        }
    }

    /// Whether responses to requests in this protocol are rewritten: always when the request
    /// was (a V1 client gets V1 back), and V2 responses when there are response steps.
    pub fn transforms_response(&self, wire: Wire) -> bool {
        self.transforms_request(wire) || (wire == Wire::V2 && !self.response.is_empty())
    }

    /// The request to send to the model: an Open Inference Protocol `/infer` body (JSON header
    /// plus binary tensor data). `header_length` is the client's
    /// `Inference-Header-Content-Length`, if any.
    pub fn request(
        &self,
        wire: Wire,
        body: &[u8],
        header_length: Option<usize>,
    ) -> Result<EncodedBody, TransformError> {
        self.request_as(wire, body, header_length, true)
    }

    /// As [`Transformer::request`]; with `binary` false, all JSON (no
    /// `Inference-Header-Content-Length` to send, for headers that left before the body).
    pub fn request_as(
        &self,
        wire: Wire,
        body: &[u8],
        header_length: Option<usize>,
        binary: bool,
    ) -> Result<EncodedBody, TransformError> {
        self.infer_request(wire, body, header_length)
            .map(|request| rest::encode_infer_request(&request, binary))
    }

    /// The request for the model, as data (what [`Transformer::request`] encodes).
    pub fn infer_request(
        &self,
        wire: Wire,
        body: &[u8],
        header_length: Option<usize>,
    ) -> Result<InferRequest, TransformError> {
        if body.len() > self.limits.max_body_bytes {
            return Err(self.body_too_large(body.len()));
        }
        match (&self.request, wire) {
            (RequestPlan::Convert(specs), Wire::V1) => {
                v1::request_from_v1(body, specs).map_err(|e| TransformError::bad(e.0))
            }
            (
                RequestPlan::Items {
                    field,
                    steps,
                    input,
                    datatype,
                },
                wire,
            ) => {
                let (mut request, values) = match wire {
                    Wire::V1 => (InferRequest::default(), v1_values(body, field.as_deref())?),
                    Wire::V2 => match v2_values(body, header_length, field.as_deref(), input)? {
                        (request, Some(values)) => (request, values),
                        // Already the model's tensor: sent on as it is.
                        (request, None) => return Ok(request),
                    },
                };
                if values.len() > self.limits.max_batch {
                    return Err(TransformError::too_large(format!(
                        "{} instances in one request, over the limit of {} (limits.max_batch)",
                        values.len(),
                        self.limits.max_batch
                    )));
                }
                let tensor = self.batch(values, steps, input, *datatype)?;
                request.inputs.push(tensor);
                Ok(request)
            }
            _ => Err(TransformError::internal(
                "this transformer does not rewrite these requests",
            )),
        }
    }

    /// The model's tensor for these values (each binary, as V1's `{"b64": ...}` carries one):
    /// the batch tensor a request holding them becomes, by the same steps.
    pub fn tensor(&self, values: &[&[u8]]) -> Result<InputTensor, TransformError> {
        let RequestPlan::Items {
            steps,
            input,
            datatype,
            ..
        } = &self.request
        else {
            return Err(TransformError::bad(
                "this transformer has no request steps (`transformer.request.steps`)",
            ));
        };
        if values.len() > self.limits.max_batch {
            return Err(TransformError::too_large(format!(
                "{} values, over the limit of {} (limits.max_batch)",
                values.len(),
                self.limits.max_batch
            )));
        }
        let values = values
            .iter()
            .map(|v| Value2 {
                data: v.to_vec(),
                binary: true,
            })
            .collect();
        self.batch(values, steps, input, *datatype)
    }

    /// Reads an `/infer` response from the model and answers the client in `wire`.
    pub fn response(
        &self,
        wire: Wire,
        body: &[u8],
        header_length: Option<usize>,
    ) -> Result<Vec<u8>, TransformError> {
        let response = rest::parse_infer_response(body, header_length)
            .map_err(|e| TransformError::internal(format!("the model's answer: {}", e.0)))?;
        self.answer(wire, response)
    }

    /// The client's answer (JSON) from the model's response, as data.
    pub fn answer(
        &self,
        wire: Wire,
        mut response: InferResponse,
    ) -> Result<Vec<u8>, TransformError> {
        post::apply(&mut response, &self.response, &self.labels)?;
        Ok(match wire {
            Wire::V1 => rest::to_json(&v1::predictions(&response, None)),
            Wire::V2 => rest::encode_infer_response(&response, |_| false).body,
        })
    }

    /// The client's answer to a V1 `:explain` the transformer pre-processed: the built-in
    /// explainer's document, which its V2 answer carries as the BYTES output `explanation`.
    pub fn explanation(
        &self,
        body: &[u8],
        header_length: Option<usize>,
    ) -> Result<Vec<u8>, TransformError> {
        let response = rest::parse_infer_response(body, header_length)
            .map_err(|e| TransformError::internal(format!("the explainer's answer: {}", e.0)))?;
        response
            .outputs
            .into_iter()
            .find(|o| o.name == "explanation")
            .and_then(|o| match o.data {
                TensorData::Bytes(mut v) if v.len() == 1 => v.pop(),
                _ => None,
            })
            .ok_or_else(|| {
                TransformError::internal(
                    "the explainer's answer has no BYTES output 'explanation' holding one document",
                )
            })
    }

    /// The error for a body over `limits.max_body_bytes`.
    pub fn body_too_large(&self, size: usize) -> TransformError {
        TransformError::too_large(format!(
            "the request body is {size} bytes or more, over the limit of {} (limits.max_body_bytes)",
            self.limits.max_body_bytes
        ))
    }

    /// Runs every value through the steps and stacks the results in order.
    fn batch(
        &self,
        values: Vec<Value2>,
        steps: &[Step],
        input: &str,
        datatype: DataType,
    ) -> Result<InputTensor, TransformError> {
        if values.is_empty() {
            return Err(TransformError::bad("the request has no instances"));
        }
        let mut shape: Option<Vec<usize>> = None;
        let mut data: Vec<f32> = Vec::new();
        let count = values.len();
        let mut pixels_left = self.limits.max_request_pixels;
        let bytes_per_element = std::mem::size_of::<f32>();
        for (i, value) in values.into_iter().enumerate() {
            let (item_shape, item) =
                self.run(value, steps, &mut pixels_left)
                    .map_err(|e| TransformError {
                        message: if count > 1 {
                            format!("instance {i}: {}", e.message)
                        } else {
                            e.message
                        },
                        ..e
                    })?;
            match &shape {
                None => shape = Some(item_shape),
                Some(first) if *first != item_shape => {
                    return Err(TransformError::bad(format!(
                        "instance {i} becomes a tensor of shape {item_shape:?} but instance 0 one of shape {first:?}: the images differ in size or colour; add `resize` and `color` steps"
                    )));
                }
                Some(_) => {}
            }
            if (data.len() + item.len()).saturating_mul(bytes_per_element)
                > self.limits.max_tensor_bytes
            {
                return Err(TransformError::too_large(format!(
                    "the tensor for the model would pass {} bytes (limits.max_tensor_bytes) at instance {i}: add a resize step or send fewer instances",
                    self.limits.max_tensor_bytes
                )));
            }
            data.extend_from_slice(&item);
        }
        let mut dims = vec![count as i64];
        dims.extend(shape.unwrap_or_default().iter().map(|&d| d as i64));
        Ok(InputTensor {
            name: input.to_owned(),
            shape: dims,
            data: cast(data, datatype),
            parameters: Parameters::new(),
        })
    }

    fn run(
        &self,
        value: Value2,
        steps: &[Step],
        pixels_left: &mut u64,
    ) -> Result<(Vec<usize>, Vec<f32>), TransformError> {
        let mut bytes = value;
        let mut image: Option<Image> = None;
        for (i, step) in steps.iter().enumerate() {
            match step {
                Step::Base64Decode => bytes = base64_decode(bytes)?,
                Step::ImageDecode => {
                    // Decoded straight into the colour the next step asks for, if any.
                    let want = match steps.get(i + 1) {
                        Some(Step::Color(c)) => Some(*c),
                        _ => None,
                    };
                    let limit = self.limits.max_image_pixels.min(*pixels_left);
                    let decoded = image::decode(&bytes.data, limit, want).map_err(|e| {
                        if e.status == 413 && limit < self.limits.max_image_pixels {
                            TransformError::too_large(format!(
                                "the request's pictures pass {} pixels in all (limits.max_request_pixels)",
                                self.limits.max_request_pixels
                            ))
                        } else {
                            e
                        }
                    })?;
                    *pixels_left =
                        pixels_left.saturating_sub((decoded.width * decoded.height) as u64);
                    image = Some(decoded);
                }
                Step::Layout(layout) => {
                    if let Some(img) = image.take() {
                        return Ok(image::lay_out(img, *layout));
                    }
                }
                step => {
                    let Some(img) = image.take() else {
                        return Err(TransformError::internal(
                            "an image step ran before image_decode",
                        ));
                    };
                    image = Some(match step {
                        Step::Color(c) => image::color(img, *c),
                        Step::Resize(r) => image::resize(&img, r),
                        Step::Invert => image::invert(img),
                        Step::Scale(f) => image::scale(img, *f),
                        Step::Normalize { mean, std } => image::normalize(img, mean, std)?,
                        _ => img,
                    });
                }
            }
        }
        Err(TransformError::internal("the pipeline has no layout step"))
    }
}

/// Set by the transformer filter on the requests it handled, so that a sidecar that can apply
/// the same transformer (for clients that bypass Envoy) does not apply it twice.
pub const TRANSFORMED_HEADER: &str = "x-meshserve-transformed";

/// One instance's value as it enters the steps: bytes, and whether they are binary already
/// (`{"b64": ...}` in V1, non-text bytes) rather than text.
#[derive(Debug)]
struct Value2 {
    data: Vec<u8>,
    binary: bool,
}

fn base64_decode(value: Value2) -> Result<Value2, TransformError> {
    if value.binary || !value.data.is_ascii() {
        return Ok(Value2 {
            binary: true,
            ..value
        });
    }
    let text: Vec<u8> = value
        .data
        .into_iter()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let data = base64::engine::general_purpose::STANDARD
        .decode(&text)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(&text))
        .map_err(|e| TransformError::bad(format!("invalid base64: {e}")))?;
    Ok(Value2 { data, binary: true })
}

/// The instances of a V1 body: `{"instances": [...]}` or `{"inputs": [...]}` (or `{"inputs":
/// {"<field>": [...]}}`); each a base64 string, `{"b64": "..."}`, or an object with `field`.
fn v1_values(body: &[u8], field: Option<&str>) -> Result<Vec<Value2>, TransformError> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| TransformError::bad(format!("malformed V1 predict JSON: {e}")))?;
    let rows = match (body.get("instances"), body.get("inputs")) {
        (Some(Value::Array(rows)), None) | (None, Some(Value::Array(rows))) => rows,
        (None, Some(Value::Object(columns))) => match field.and_then(|f| columns.get(f)) {
            Some(Value::Array(rows)) => rows,
            _ => {
                return Err(TransformError::bad(format!(
                    "'inputs' must hold a list{}",
                    field.map(|f| format!(" under '{f}'")).unwrap_or_default()
                )));
            }
        },
        (Some(_), Some(_)) => {
            return Err(TransformError::bad(
                "give 'instances' or 'inputs', not both",
            ));
        }
        _ => {
            return Err(TransformError::bad(
                "a V1 predict request needs 'instances' (a list)",
            ));
        }
    };
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            v1_value(row, field).ok_or_else(|| {
                TransformError::bad(format!(
                    "instance {i}: expected {}a base64 string or {{\"b64\": \"...\"}}",
                    field
                        .map(|f| format!("an object with '{f}' holding "))
                        .unwrap_or_default()
                ))
            })?
        })
        .collect()
}

/// One V1 instance: a base64 string, `{"b64": "..."}`, or an object holding one of those
/// under `field`.
fn v1_value(row: &Value, field: Option<&str>) -> Option<Result<Value2, TransformError>> {
    match row {
        Value::String(s) => Some(Ok(Value2 {
            data: s.as_bytes().to_vec(),
            binary: false,
        })),
        Value::Object(map) => match (map.get("b64"), field.and_then(|f| map.get(f))) {
            (Some(Value::String(b64)), None) if map.len() == 1 => Some(
                base64_decode(Value2 {
                    data: b64.as_bytes().to_vec(),
                    binary: false,
                })
                .map_err(|e| TransformError::bad(format!("'b64': {}", e.message))),
            ),
            (_, Some(inner)) => v1_value(inner, None),
            _ => None,
        },
        _ => None,
    }
}

/// The elements of the V2 input `field` (or the only input), and the rest of the request;
/// `None` for a request without `field` that already carries the model input `emitted`.
fn v2_values(
    body: &[u8],
    header_length: Option<usize>,
    field: Option<&str>,
    emitted: &str,
) -> Result<(InferRequest, Option<Vec<Value2>>), TransformError> {
    let mut request =
        rest::parse_infer_request(body, header_length).map_err(|e| TransformError::bad(e.0))?;
    let at = match field {
        Some(f) => request.inputs.iter().position(|i| i.name == f),
        None if request.inputs.len() == 1 => Some(0),
        None => None,
    };
    let is_tensor = |i: &InputTensor| i.name == emitted && i.data.datatype() != DataType::Bytes;
    if at.is_none_or(|at| request.inputs.get(at).is_some_and(is_tensor))
        && request.inputs.iter().any(is_tensor)
    {
        return Ok((request, None));
    }
    let names: Vec<String> = request
        .inputs
        .iter()
        .map(|i| format!("'{}'", i.name))
        .collect();
    let Some(at) = at else {
        return Err(TransformError::bad(format!(
            "the images go in input {}; the request has [{}]",
            field
                .map(|f| format!("'{f}'"))
                .unwrap_or_else(|| "(the only one)".into()),
            names.join(", ")
        )));
    };
    let input = request.inputs.remove(at);
    let TensorData::Bytes(elements) = input.data else {
        return Err(TransformError::bad(format!(
            "input '{}' must be BYTES (one encoded image per element), not {}",
            input.name,
            input.data.datatype()
        )));
    };
    let values = elements
        .into_iter()
        .map(|data| Value2 {
            data,
            binary: false,
        })
        .collect();
    Ok((request, Some(values)))
}

fn cast(data: Vec<f32>, datatype: DataType) -> TensorData {
    fn round<T>(data: &[f32], convert: impl Fn(f32) -> T) -> Vec<T> {
        data.iter().map(|v| convert(v.round())).collect()
    }
    match datatype {
        DataType::Fp16 => TensorData::Fp16(data.iter().map(|&v| half::f16::from_f32(v)).collect()),
        DataType::Fp64 => TensorData::Fp64(data.iter().map(|&v| f64::from(v)).collect()),
        // `as` saturates: out-of-range values clamp to the type's bounds.
        DataType::Uint8 => TensorData::Uint8(round(&data, |v| v as u8)),
        DataType::Int8 => TensorData::Int8(round(&data, |v| v as i8)),
        DataType::Int32 => TensorData::Int32(round(&data, |v| v as i32)),
        DataType::Int64 => TensorData::Int64(round(&data, |v| v as i64)),
        _ => TensorData::Fp32(data),
    }
}

#[cfg(test)]
mod tests;
