#!/usr/bin/env bash
# Builds the npm package of the filter core, @meshserve/web, into filters/web/pkg:
#   node/  CommonJS for Node 20+ (wasm-bindgen --target nodejs)
#   web/   an ES module for browsers and bundlers (--target web); `meshserve up`'s console
#          serves this one
# with filters/web/npm's package.json and README. wasm-bindgen-cli comes from crates.io at the
# version filters/web/Cargo.toml pins (the two must match), installed into .tools/.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

want=$(sed -n 's/^wasm-bindgen = "=\([0-9.]*\)".*/\1/p' filters/web/Cargo.toml)
[ -n "$want" ] || { echo "filters/web/Cargo.toml pins no wasm-bindgen version" >&2; exit 1; }
bindgen=.tools/bin/wasm-bindgen
if [ "$("$bindgen" --version 2>/dev/null)" != "wasm-bindgen $want" ]; then
    say "installing wasm-bindgen-cli $want into .tools (cargo install)"
    # Not --locked: the lock file published with 0.2.130 names webpki-roots 1.0.11, which the
    # registry here does not have; the resolved versions are the CLI's own dependencies and
    # change nothing in the package it writes.
    cargo install --quiet wasm-bindgen-cli --version "$want" --root .tools
fi
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    say "adding the wasm32-unknown-unknown target"
    rustup target add wasm32-unknown-unknown
fi

say "building @meshserve/web (filters/web/pkg)"
cargo build --profile web --locked -p meshserve-web --target wasm32-unknown-unknown --quiet
module=target/wasm32-unknown-unknown/web/meshserve_web.wasm
out=filters/web/pkg
rm -rf "$out.new"
mkdir -p "$out.new"
"$bindgen" --target nodejs --out-dir "$out.new/node" "$module"
"$bindgen" --target web --out-dir "$out.new/web" "$module"
cp filters/web/npm/package.json filters/web/npm/README.md "$out.new/"
rm -rf "$out"
mv "$out.new" "$out"
printf '@meshserve/web: %s bytes of wasm, %s gzipped\n' \
    "$(wc -c < "$out/web/meshserve_web_bg.wasm")" "$(gzip -9c "$out/web/meshserve_web_bg.wasm" | wc -c)" >&2
