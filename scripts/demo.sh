#!/usr/bin/env bash
# The main job: set up, then bring up the local mesh on the bundled demo InferenceService
# (envoy-config/demo/inferenceservice.yaml: a default and a canary revision, each a predictor
# sidecar, behind Envoy running meshserve's wasm router), send the sample through Envoy, print
# the answer, the revision that served it and the URLs to try, and run until Ctrl-C. The
# predictors' payload logs go to `meshserve log-sink` on 127.0.0.1:8090, which writes them to
# .meshserve/payloads.jsonl.
#   PORT (default 8080) chooses Envoy's listener.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

port=${PORT:-8080}
# The payload logs' sink (the demo InferenceService's logger.url): every event a JSON line.
mkdir -p .meshserve
./target/release/meshserve log-sink --port 8090 --out .meshserve/payloads.jsonl &
sink=$!
./target/release/meshserve up envoy-config/demo/inferenceservice.yaml --port "$port" &
mesh=$!
trap 'kill -TERM "$mesh" "$sink" 2>/dev/null; wait "$mesh" "$sink" 2>/dev/null' EXIT INT TERM

.venv/bin/python scripts/demo_client.py "http://127.0.0.1:${port}" "$mesh"
wait "$mesh"
