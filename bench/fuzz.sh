#!/usr/bin/env bash
# Fuzzes everything that reads bytes from a client or a file (fuzz/fuzz_targets/, one target
# each: the router's decision on paths, hosts, headers and gRPC bodies; the gRPC model-name
# peek; V1/V2 JSON and the binary tensor extension; protobuf ModelInfer; pictures through the
# transformer under its pixel limit; payload-log exchanges and spool records; InferenceService
# YAML; the filter configuration; an InferenceGraph run on fuzzed requests, answers and
# conditions), each for SECONDS (default 60), with libFuzzer.
#
#   bash bench/fuzz.sh [SECONDS] [TARGET ...]
#
# Stable Rust, no cargo-fuzz: libfuzzer-sys links libFuzzer, and rustc's stable -C options add
# the coverage instrumentation cargo-fuzz would (sancov: inline 8-bit counters, PC table,
# compare tracing), with debug assertions and overflow checks on. No AddressSanitizer (it needs
# nightly's -Zsanitizer): the code under test is safe Rust (unsafe_code is forbidden in the
# workspace), so what is hunted is panics, overflows, aborts, hangs and runaway memory.
# A crash leaves its input in fuzz/artifacts/<target>/; keep it as a unit test next to the code.
# Figures: bench/results/<date>-fuzz.md, copied into docs/fuzzing.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
all=(paths grpc_peek rest_json protobuf image records isvc filter_config graph)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all[@]}")

triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target: the instrumentation goes into the fuzzed code only, not build scripts and macros.
cargo build --release --manifest-path fuzz/Cargo.toml --target "$triple" --target-dir fuzz/target --bins --quiet

seed() {  # target, files...
    local dir=fuzz/corpus/$1
    shift
    mkdir -p "$dir"
    for f in "$@"; do [ -f "$f" ] && cp "$f" "$dir/seed-$(basename "$f")"; done
    return 0
}
seed rest_json models/samples/*.json models/reference/*.json
seed image models/samples/digit_photo.jpg
seed isvc envoy-config/demo/inferenceservice.yaml envoy-config/examples/*.yaml
seed filter_config envoy-config/demo/rendered/filter.json
mkdir -p fuzz/corpus/paths
printf '/v2/models/digits/infer\nlatest-digits.default.example.com\ncanary\nalice\n' > fuzz/corpus/paths/seed-v2
printf '/inference.GRPCInferenceService/ModelInfer\n\n\n\n\x00\x00\x00\x00\x08\x0a\x06digits' > fuzz/corpus/paths/seed-grpc

mkdir -p fuzz/corpus/graph
printf '\x00\xff{"source":"client1","instances":[{"name":"blue","intval":0,"strval":"kserve"},{"name":"green","intval":1,"strval":"1red-server1"}]}\xffinstances.#(intval>0)\xff\x64{"predictions":[1,1]}\xff\x90{"error":"x"}' > fuzz/corpus/graph/seed-switch

out=bench/results/$(date -u +%F)-fuzz.md
mkdir -p bench/results
{
    echo "Command: \`bash bench/fuzz.sh $seconds ${*:-}\` at commit $(git rev-parse --short HEAD), $(date -u '+%F %H:%M') UTC, $(nproc) CPUs."
    echo
    echo "| target | seconds | runs | runs/s | coverage (edges) | features | corpus | crashes |"
    echo "|---|---|---|---|---|---|---|---|"
} > "$out"
failed=0
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    log=$(mktemp)
    status=0
    "fuzz/target/$triple/release/$target" -max_total_time="$seconds" -rss_limit_mb=2048 \
        -timeout=10 -max_len=1048576 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$target/" "fuzz/corpus/$target" > "$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    line=$(grep -E '^#[0-9]+' "$log" | tail -1)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$line")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$line")
    corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$line")
    crashes=$(find "fuzz/artifacts/$target" -type f | wc -l)
    echo "| $target | $seconds | ${runs:-?} | ${speed:-?} | ${cov:-?} | ${ft:-?} | ${corp:-?} | $crashes |" >> "$out"
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        echo "==> $target: exit $status, $crashes crash file(s) in fuzz/artifacts/$target/" >&2
        tail -40 "$log" >&2
    else
        echo "==> $target: ${runs:-?} runs, ${speed:-?}/s, cov ${cov:-?}, no crash" >&2
    fi
    rm -f "$log"
done
cat "$out"
exit "$failed"
