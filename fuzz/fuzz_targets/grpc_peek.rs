//! The model name read from a gRPC request's first bytes (a length-prefixed protobuf
//! message), for every field the router looks in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshserve_filter_core::grpc::peek_model;

fuzz_target!(|data: &[u8]| {
    for (field, fallback) in [(1, None), (2, Some(1)), (3, Some(2))] {
        let _ = peek_model(data, field, fallback);
    }
});
