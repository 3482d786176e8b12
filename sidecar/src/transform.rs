//! `meshserve transform`: an InferenceService's transformer run on one body from stdin, with
//! the same code as the Envoy filter's: what the model would get, or what the client would.

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use meshserve_filter_core::transform::{TransformError, Transformer, Wire};
use meshserve_proto::rest;

/// `meshserve transform`'s flags.
#[derive(Debug, Args)]
pub struct TransformArgs {
    /// A KServe InferenceService YAML file with a `spec.transformer` (or the transformer alone).
    pub file: PathBuf,
    /// Which InferenceService (default: the first with a transformer).
    #[arg(long)]
    pub isvc: Option<String>,
    /// The client's protocol: v1 (`:predict`) or v2 (`/infer`).
    #[arg(long, value_enum, default_value_t = WireArg::V1)]
    pub protocol: WireArg,
    /// Read a model's `/infer` response (JSON) instead of a client's request.
    #[arg(long)]
    pub response: bool,
}

/// The client's protocol, as `--protocol` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WireArg {
    V1,
    V2,
}

/// Runs `meshserve transform` with `transformer`, the one `args.file` holds (read by the
/// caller: an InferenceService file is the control plane's to read).
pub fn run(args: &TransformArgs, transformer: &Transformer) -> Result<(), String> {
    let wire = match args.protocol {
        WireArg::V1 => Wire::V1,
        WireArg::V2 => Wire::V2,
    };
    let mut body = Vec::new();
    std::io::stdin()
        .read_to_end(&mut body)
        .map_err(|e| format!("cannot read stdin: {e}"))?;
    let out = if args.response {
        transformer.response(wire, &body, None)
    } else if !transformer.transforms_request(wire) {
        Ok(body)
    } else {
        transformer.request(wire, &body, None).and_then(|encoded| {
            // Shown as JSON: the filter sends the same tensors in binary form.
            let request = rest::parse_infer_request(&encoded.body, encoded.header_length)
                .map_err(|e| TransformError::internal(e.0))?;
            Ok(rest::encode_infer_request(&request, false).body)
        })
    }
    .map_err(|e| format!("{} {}", e.status, e.message))?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&out)
        .and_then(|()| stdout.write_all(b"\n"))
        .map_err(|e| format!("cannot write stdout: {e}"))
}
