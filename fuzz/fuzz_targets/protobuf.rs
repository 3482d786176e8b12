//! gRPC ModelInfer requests as protobuf bytes, decoded and converted as the sidecar does
//! (raw_input_contents or typed contents, every datatype).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshserve_proto::grpc::{request_from_grpc, response_from_grpc};
use meshserve_proto::inference::{ModelInferRequest, ModelInferResponse};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = ModelInferRequest::decode(data) {
        let _ = request_from_grpc(request);
    }
    if let Ok(response) = ModelInferResponse::decode(data) {
        let _ = response_from_grpc(response);
    }
});
