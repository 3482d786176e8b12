#!/usr/bin/env bash
# Re-renders envoy-config/demo/rendered from the demo InferenceService: the local Envoy files,
# compose/, istio/ and kubernetes/ (the tests check that the committed files are current,
# that Envoy and docker-compose accept them, and that the YAML matches its schemas).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-envoy-config/demo/rendered}
./target/release/meshserve render envoy-config/demo/inferenceservice.yaml --out "$out" \
    --wasm /usr/local/share/meshserve/meshserve_filters.wasm
