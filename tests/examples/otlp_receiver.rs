//! An OTLP/gRPC trace receiver for load tests (bench/suite_tracing.py): listens on
//! 127.0.0.1 (an OS-picked port unless given), prints `listening on otlp=ADDR`, then the count
//! of spans received once a second, until killed. It keeps no spans.

use std::io::Write;
use std::time::Duration;

use meshserve_e2e::otlp::OtlpReceiver;

fn main() {
    let receiver = OtlpReceiver::start_counting();
    println!("listening on otlp={}", receiver.addr);
    loop {
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs(1));
        println!("spans {}", receiver.count());
    }
}
