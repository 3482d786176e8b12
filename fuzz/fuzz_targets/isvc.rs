//! InferenceService YAML as `meshserve up` and `render` read it (one document, `file://`
//! paths relative to a directory that does not exist).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meshserve_mesh::isvc::InferenceService;

fuzz_target!(|data: &[u8]| {
    if let Ok(yaml) = std::str::from_utf8(data) {
        let _ = InferenceService::parse(yaml, Path::new("/nonexistent-meshserve-fuzz"));
    }
});
