#!/usr/bin/env bash
# The main job: set up, serve the bundled demo model repository, send a sample request,
# print the answer and the URLs to try, and run until Ctrl-C.
#   HTTP_PORT (default 8080) and GRPC_PORT (default 8081) choose the ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

http_port=${HTTP_PORT:-8080}
grpc_port=${GRPC_PORT:-8081}
base="http://127.0.0.1:${http_port}"

./target/release/meshserve serve --model-repository models/repository \
    --http-port "$http_port" --grpc-port "$grpc_port" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT INT TERM

.venv/bin/python scripts/demo_client.py "$base" "$grpc_port" "$server"
echo "meshserve is running (pid $server); Ctrl-C stops it."
wait "$server"
