#!/usr/bin/env bash
# Every test: set up, then the Rust unit and end-to-end tests, the wasm32-wasip1 build of
# meshserve-proto, the crates' module layering, formatting and lints, the npm package's tests
# (node --test), and the third-party client tests (pytest).
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

# Debian packages the tests use: docker-compose checks the rendered compose file (it reads and
# resolves one without a Docker engine); chromium, headless, and chromium-driver run the web
# console's browser test (tests/python/test_console.py). Installed as root, or through sudo.
missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian's ${missing[*]} (the tests use them)"
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "missing: apt-get install ${missing[*]}" >&2; exit 1; }
        sudo=sudo
    fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q "${missing[@]}" >/dev/null \
        || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "${missing[@]}" >/dev/null; }
fi

# Servers from the npm registry that the tests start (Azurite, Azure Storage's emulator), at
# the versions tests/tools/package-lock.json pins.
stamp=tests/tools/node_modules/.package-lock.sha256
want=$(sha256sum tests/tools/package-lock.json | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing the test servers in tests/tools (npm ci)"
    npm ci --prefix tests/tools --no-audit --no-fund --loglevel=error
    echo "$want" > "$stamp"
fi

# Every process a test starts must be gone when the tests end: this checkout's meshserve and
# Envoy processes are listed before and after, and any new one fails the run.
ours() {
    local link exe pid
    for link in /proc/[0-9]*/exe; do
        exe=$(readlink "$link" 2>/dev/null) || continue
        case "$exe" in
            "$PWD"/target/*/meshserve | "$PWD"/.venv/lib/python3*/site-packages/envoy/_bin/envoy)
                pid=${link#/proc/}
                echo "${pid%/exe}"
                ;;
        esac
    done | sort
}
before=$(ours)

say "cargo test"
cargo test --release --locked --workspace

say "node --test filters/web/test (the browser and Node package against meshserve)"
node --test filters/web/test/

# kserve and tritonclient register the same protobuf names (kserve/kserve#3099), so their
# tests run in separate interpreters (the transformer's, which use tritonclient's gRPC client
# and start their own mesh, too). Every tests/python/test_*.py runs, so that a new file is
# never left out. pytest exit 5 means "no tests collected": a failure here.
for suite in tests/python/test_*.py; do
    say "pytest $suite"
    .venv/bin/python -m pytest -q "$suite"
done

say "no test left a process running"
leftover=""
for _ in $(seq 50); do
    leftover=$(comm -13 <(echo "$before") <(ours) | tr '\n' ' ')
    [ -z "${leftover// /}" ] && break
    sleep 0.2
done
if [ -n "${leftover// /}" ]; then
    echo "processes the tests started are still running:" >&2
    # shellcheck disable=SC2086
    ps -o pid,etime,args -p "$(echo $leftover | tr " " ",")" >&2 || true
    # shellcheck disable=SC2086
    kill -9 $leftover 2>/dev/null || true
    exit 1
fi
