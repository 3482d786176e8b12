#!/usr/bin/env bash
# Every test: set up, then the Rust unit and end-to-end tests, the wasm32-wasip1 build of
# meshserve-proto, the crates' module layering, formatting and lints, and the third-party
# client tests (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

ORT_DYLIB_PATH=$(realpath "$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n1)")
export ORT_DYLIB_PATH

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

say "no module imports from a module that imports it back (scripts/check-modules.py)"
python3 scripts/check-modules.py

if cargo fmt --version >/dev/null 2>&1; then
    say "cargo fmt --check"
    cargo fmt --all -- --check
fi
if cargo clippy --version >/dev/null 2>&1; then
    say "cargo clippy"
    cargo clippy --release --locked --workspace --all-targets --quiet -- -D warnings
fi
if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    say "meshserve-proto builds for wasm32-wasip1"
    cargo build --release --locked -p meshserve-proto --target wasm32-wasip1 --quiet
fi

# The rendered compose file is checked by docker-compose itself (Debian's package reads and
# resolves a compose file without a Docker engine).
if ! command -v docker-compose >/dev/null 2>&1; then
    say "installing Debian's docker-compose (the tests check the rendered compose file with it)"
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "docker-compose is missing: apt-get install docker-compose" >&2; exit 1; }
        sudo=sudo
    fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q docker-compose >/dev/null \
        || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q docker-compose >/dev/null; }
fi

say "cargo test"
cargo test --release --locked --workspace

# kserve and tritonclient register the same protobuf names (kserve/kserve#3099), so their
# tests run in separate interpreters (the transformer's, which use tritonclient's gRPC client
# and start their own mesh, too). pytest exit 5 means "no tests collected": a failure here.
for suite in tests/python/test_tritonclient.py tests/python/test_kserve_client.py tests/python/test_transformer.py tests/python/test_render.py tests/python/test_packaging.py; do
    say "pytest $suite"
    .venv/bin/python -m pytest -q "$suite"
done
