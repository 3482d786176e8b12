#!/usr/bin/env bash
# Re-renders envoy-config/demo/rendered from the demo InferenceService: the local Envoy files,
# compose/, istio/ and kubernetes/ (the tests check that the committed files are current,
# that Envoy and docker-compose accept them, and that the YAML matches its schemas).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-envoy-config/demo/rendered}
# The local Envoy's files as an install would place them (a rendering of your own names the
# absolute paths of --out and of the workspace's module instead).
./target/release/meshserve render envoy-config/demo/inferenceservice.yaml --out "$out" \
    --wasm /usr/local/share/meshserve/meshserve_filters.wasm --config-dir /etc/meshserve
