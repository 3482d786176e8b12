#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine with Rust, Python 3 and pip:
#   - the wasm32-wasip1 target (the filters and meshserve-proto build for it),
#   - ./.venv with the pinned Python packages (ONNX Runtime's library, Envoy, test clients),
#   - a release build of the workspace, and the Envoy filters as meshserve_filters.wasm,
#   - the browser and Node package of the filter core, filters/web/pkg (scripts/build-web.sh).
# Each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if command -v rustup >/dev/null 2>&1; then
    if ! rustup target list --installed | grep -qx wasm32-wasip1; then
        say "adding the wasm32-wasip1 target"
        rustup target add wasm32-wasip1
    fi
else
    say "rustup not found: skipping the wasm32-wasip1 target"
fi

stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing Python packages into .venv (requirements.txt)"
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements.txt
    echo "$want" > "$stamp"
fi

ORT_DYLIB_PATH=$(realpath "$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n1)")
export ORT_DYLIB_PATH

say "building meshserve (release) and meshserve_filters.wasm"
cargo build --release --locked --workspace --quiet
# The module without debug info: Envoy keeps a copy per worker (3.4 MB with, 0.3 MB without).
CARGO_PROFILE_RELEASE_STRIP=debuginfo cargo build --release --locked -p meshserve-filters --target wasm32-wasip1 --quiet
bash scripts/build-web.sh
