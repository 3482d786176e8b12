#!/usr/bin/env bash
# Re-renders envoy-config/demo/rendered from the demo InferenceService (the tests check that
# the committed files are current and that Envoy accepts them).
set -euo pipefail
cd "$(dirname "$0")/.."
./target/release/meshserve render envoy-config/demo/inferenceservice.yaml \
    --out envoy-config/demo/rendered --wasm /usr/local/share/meshserve/meshserve_filters.wasm
