//! Open Inference Protocol REST bodies (JSON, and JSON followed by the binary tensor
//! extension's data) and KServe V1 bodies, as requests and as responses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshserve_proto::datatype::DataType;
use meshserve_proto::infer::TensorSpec;
use meshserve_proto::{rest, v1};

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose the binary extension's header length.
    let (header, body) = match data.split_first_chunk::<2>() {
        Some((h, rest)) => (Some(usize::from(u16::from_le_bytes(*h))), rest),
        None => (None, data),
    };
    for header_length in [None, header] {
        if let Ok(request) = rest::parse_infer_request(body, header_length) {
            let encoded = rest::encode_infer_request(&request, true);
            let again = rest::parse_infer_request(&encoded.body, encoded.header_length);
            assert!(
                again.is_ok(),
                "an encoded request does not parse back: {again:?}"
            );
        }
        let _ = rest::parse_infer_response(body, header_length);
    }
    let spec = |name: &str, datatype: &str, shape: Vec<i64>| TensorSpec {
        name: name.into(),
        datatype: DataType::parse(datatype).expect("a datatype"),
        shape,
    };
    let inputs = [
        spec("input", "FP32", vec![-1, 64]),
        spec("text", "BYTES", vec![-1]),
    ];
    let _ = v1::request_from_v1(body, &inputs);
    let _ = v1::request_from_v1(body, &inputs[..1]);
});
