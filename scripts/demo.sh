#!/usr/bin/env bash
# The main job: set up, then bring up the local mesh on the bundled demo InferenceService
# (envoy-config/demo/inferenceservice.yaml: a default and a canary revision, each a predictor
# sidecar, behind Envoy running meshserve's wasm router), send the sample through Envoy, print
# the answer, the revision that served it and the URLs to try, and run until Ctrl-C.
#   PORT (default 8080) chooses Envoy's listener.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

port=${PORT:-8080}
./target/release/meshserve up envoy-config/demo/inferenceservice.yaml --port "$port" &
mesh=$!
trap 'kill -TERM "$mesh" 2>/dev/null; wait "$mesh" 2>/dev/null' EXIT INT TERM

.venv/bin/python scripts/demo_client.py "http://127.0.0.1:${port}" "$mesh"
wait "$mesh"
