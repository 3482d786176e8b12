//! Payload logging's records: the exchanges the logger filter sends the intake, and the
//! CloudEvent records of the spool (the same codec the spool's reader uses on disk).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshserve_filter_core::logger::{decode_exchanges, decode_record, encode_record, events};

fuzz_target!(|data: &[u8]| {
    if let Some(exchanges) = decode_exchanges(data) {
        for (exchange, mode) in &exchanges {
            for event in events(exchange, *mode) {
                let mut bytes = Vec::new();
                encode_record(&event, &mut bytes);
                let back = decode_record(&bytes);
                assert!(
                    back.is_some_and(|(e, n)| e == event && n == bytes.len()),
                    "a record does not read back"
                );
            }
        }
    }
    let mut rest = data;
    while let Some((_, used)) = decode_record(rest) {
        if used == 0 || used > rest.len() {
            break;
        }
        rest = &rest[used..];
    }
});
