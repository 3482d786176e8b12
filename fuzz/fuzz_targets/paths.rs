//! The router's whole decision on a request it could be sent: path, host, headers and the
//! first bytes of a gRPC body (protocol and gRPC-method parsing, control-API detection, the
//! gRPC model-name peek, host and revision pinning), against the demo's configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshserve_filter_core::config::Config;
use meshserve_filter_core::protocol::{is_control, parse};
use meshserve_filter_core::route::{Request, decide};

const CONFIG: &str = r#"{"services": [
  {"name": "digits", "models": ["digits", "mnist_cnn"], "sticky": {"header": "x-user"},
   "predictor": {"default": {"name": "v1", "cluster": "d1", "grpc_cluster": "d1g"},
                 "canaries": [{"name": "v2", "cluster": "d2", "percent": 20}],
                 "shadow": {"name": "v3", "cluster": "d3", "percent": 10}},
   "explainer": {"name": "e", "cluster": "e"}},
  {"name": "text", "namespace": "nlp", "public_control_api": true,
   "predictor": {"default": {"name": "t1", "cluster": "t"}}, "sticky": {"cookie": "s"}}]}"#;

fuzz_target!(|data: &[u8]| {
    // path \n authority \n pin \n cookie \n body
    let mut parts = data.splitn(5, |b| *b == b'\n');
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    let (path, authority, pin, cookie) = (
        text(parts.next()),
        text(parts.next()),
        text(parts.next()),
        text(parts.next()),
    );
    let body = parts.next().unwrap_or_default();
    let _ = parse(&path);
    let _ = is_control(&path);
    let Ok(config) = Config::parse(CONFIG.as_bytes()) else {
        return;
    };
    let header = |name: &str| match name {
        "x-meshserve-revision" if !pin.is_empty() => Some(pin.clone()),
        "cookie" | "x-user" if !cookie.is_empty() => Some(cookie.clone()),
        _ => None,
    };
    for end_of_body in [false, true] {
        let _ = decide(
            &config,
            &Request {
                path: &path,
                authority: (!authority.is_empty()).then_some(authority.as_str()),
                header: &header,
                body,
                end_of_body,
                draw: body.len() as u64,
                shadow_draw: path.len() as u64,
            },
        );
    }
});
