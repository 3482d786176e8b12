#!/usr/bin/env bash
# Load tests of meshserve, in seven suites (docs/benchmarks.md has a section per suite):
#   sidecar   meshserve vs the KServe Python server vs MLServer vs raw onnxruntime (~9.5 min)
#   batching  dynamic batching off / on vs MLServer and Triton, and KServe's batcher through meshserve up, c1/16/64 (~9 min)
#   mesh      Envoy + the wasm router in front of a sidecar: overhead and memory (~2 min)
#   transformer  a 1024x768 JPEG through Envoy's wasm transformer vs KServe's Python transformer (~2 min)
#   logging   payload logging on vs off through Envoy, and the spool's events/s (~1.5 min)
#   tracing   every request traced over OTLP (Envoy + sidecar) vs not traced (~1.5 min)
#   graph     an InferenceGraph's 1- and 2-step Sequences vs calling the services directly (~1.5 min)
#
#   bash bench/run.sh [--suite sidecar|batching|mesh|transformer|logging|tracing|graph|all] [--update-docs] [--rounds N] [--duration S]
#                     [--warmup S] [--results-dir DIR] [--keep-workdir] [suite flags]    (--help: all)
#
# Default: --suite all (about 20 minutes on 2 cores). --update-docs also rewrites each suite's
# generated block in docs/benchmarks.md (between its <!-- bench:<suite>:begin/end --> markers).
# Needs the repo's set-up (.venv, target/release/meshserve, the wasm: bash scripts/setup.sh).
# Installs, each only when missing: h2load (Debian nghttp2-client), models/extra/mnist_mlp, and
# MLServer in its own venv .venv-bench (it pins other versions than kserve's). Then runs
# bench/bench.py, which writes bench/results/<date>-<suite>.md (and .json) and prints the reports.
# BENCH_ROUNDS / BENCH_DURATION / BENCH_WARMUP (default 2 rounds of 1 s warm-up + 4 s measured)
# are the flags' defaults. Everything listens on 127.0.0.1 only; every server is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if [ ! -x .venv/bin/python ] || [ ! -x target/release/meshserve ]; then
    echo "bench/run.sh: .venv or target/release/meshserve is missing; run: bash scripts/setup.sh" >&2
    exit 1
fi

if ! command -v h2load >/dev/null 2>&1; then
    say "installing h2load (nghttp2-client)"
    if [ "$(id -u)" -eq 0 ]; then sudo=; else sudo=sudo; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nghttp2-client >/dev/null
fi

if [ ! -x target/release/examples/otlp_receiver ]; then
    say "building the OTLP receiver (tests/examples/otlp_receiver.rs)"
    cargo build --release --locked -p meshserve-e2e --example otlp_receiver --quiet
fi

if [ ! -f models/extra/mnist_mlp/1/model.onnx ]; then
    say "generating models/extra/mnist_mlp"
    .venv/bin/python models/generate.py --extra
fi

# MLServer and its runtime's onnxruntime, pinned; reinstalled only when this list changes.
# uvloop < 0.22: MLServer 1.7.1's inference workers die at start with uvloop 0.22+
# ("There is no current event loop", SeldonIO/MLServer#2286, not fixed in a release yet).
mlserver_requirements="mlserver==1.7.1 onnxruntime==1.31.1 numpy uvloop==0.21.0"
stamp=.venv-bench/.bench-requirements
if [ ! -x .venv-bench/bin/mlserver ] || [ "$(cat "$stamp" 2>/dev/null)" != "$mlserver_requirements" ]; then
    say "installing MLServer into .venv-bench"
    python3 -m venv .venv-bench
    .venv-bench/bin/python -m pip install --quiet --upgrade pip
    # shellcheck disable=SC2086
    .venv-bench/bin/python -m pip install --quiet $mlserver_requirements
    echo "$mlserver_requirements" > "$stamp"
fi

ORT_DYLIB_PATH=$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n1)
export ORT_DYLIB_PATH

# bench.py stops its servers itself (also on Ctrl-C / SIGTERM); should it die without doing
# so, this trap kills the process groups it started, listed in the pid file.
pidfile=$(mktemp)
export BENCH_PIDFILE=$pidfile
bench=
cleanup() {
    if [ -n "$bench" ]; then kill -TERM "$bench" 2>/dev/null || true; wait "$bench" 2>/dev/null || true; fi
    while read -r pid; do
        kill -KILL -- "-$pid" 2>/dev/null || true
    done < "$pidfile"
    rm -f "$pidfile"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

.venv/bin/python bench/bench.py "$@" &
bench=$!
set +e
wait "$bench"
status=$?
set -e
bench=
exit "$status"
