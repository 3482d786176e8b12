//! Times the demo pipeline on a V1 body file, the same code natively or as WebAssembly: the
//! transformer's cost in wasm against native, outside Envoy.
//!
//!     cargo run --release -p meshserve-filter-core --example pipeline_timing -- BODY [RUNS]
//!     cargo build --release -p meshserve-filter-core --example pipeline_timing --target wasm32-wasip1
//!     node --no-warnings bench/wasi_run.mjs target/wasm32-wasip1/release/examples/pipeline_timing.wasm BODY [RUNS]
//!
//! Prints the median and the minimum of RUNS (default 50) runs, after 5 warm-up runs.

use std::time::Instant;

use meshserve_filter_core::transform::{Transformer, Wire};

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let body_file = args.next().ok_or("usage: pipeline_timing BODY [RUNS]")?;
    let runs: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(50);
    let body = std::fs::read(&body_file).map_err(|e| format!("{body_file}: {e}"))?;
    let transformer: Transformer = serde_json::from_str(
        r#"{"request": {"field": "image", "steps": [
            "base64_decode", "image_decode", {"color": "grayscale"},
            {"resize": {"width": 28, "height": 28, "method": "area", "fit": "crop"}},
            "invert", {"scale": 0.00392156862745098}, {"layout": "nchw"}, {"emit": {"input": "input"}}]}}"#,
    )
    .map_err(|e| e.to_string())?;
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs + 5 {
        let start = Instant::now();
        let out = transformer
            .request(Wire::V1, &body, None)
            .map_err(|e| e.to_string())?;
        std::hint::black_box(out);
        if i >= 5 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    let min = times.first().copied().unwrap_or(f64::NAN);
    println!("{runs} runs: median {median:.3} ms, min {min:.3} ms");
    Ok(())
}
