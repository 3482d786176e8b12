#!/usr/bin/env python3
"""Packages meshserve_filters.wasm as an OCI image for Istio's WasmPlugin (`url: oci://...`).

Istio takes a Wasm module from an OCI image whose single layer is a gzipped tar holding
`plugin.wasm` (the "compat" variant of the Wasm image spec; a `docker build` of
filters/wasm/Dockerfile makes the same thing). This writes that image as an OCI image layout
directory, reproducibly (fixed timestamps and owners: the same module gives the same
digest), with no Docker engine:

    python3 scripts/package-wasm.py --out dist/meshserve-filters-oci --tag 0.1.0

then push it with any OCI tool, for example
    skopeo copy oci:dist/meshserve-filters-oci:0.1.0 docker://ghcr.io/meshserve/meshserve-filters:0.1.0
    oras cp --from-oci-layout dist/meshserve-filters-oci:0.1.0 ghcr.io/meshserve/meshserve-filters:0.1.0
and render with `meshserve render ... --wasm-image oci://ghcr.io/meshserve/meshserve-filters:0.1.0`.
The manifest digest printed at the end is what a WasmPlugin's `sha256` pins.
"""

import argparse
import gzip
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WASM = REPO_ROOT / "target" / "wasm32-wasip1" / "release" / "meshserve_filters.wasm"

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(module: bytes) -> bytes:
    """A tar with one file, plugin.wasm, owned by root, dated 0."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size = len(module)
        info.mode = 0o444
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(module))
    return buffer.getvalue()


def package(module: bytes, out: Path, tag: str, version: str) -> dict:
    tar = layer_tar(module)
    layer = gzip.compress(tar, mtime=0)
    config = json.dumps(
        {
            "architecture": "wasm",
            "os": "wasip1",
            "rootfs": {"type": "layers", "diff_ids": [digest(tar)]},
            "config": {},
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": digest(config), "size": len(config)},
            "layers": [
                {
                    "mediaType": LAYER,
                    "digest": digest(layer),
                    "size": len(layer),
                    "annotations": {"org.opencontainers.image.title": "plugin.wasm"},
                }
            ],
            "annotations": {
                "module.wasm.image/variant": "compat",
                "org.opencontainers.image.title": "meshserve-filters",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.source": "https://github.com/meshserve/meshserve",
            },
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for blob in (layer, config, manifest):
        (blobs / digest(blob).split(":", 1)[1]).write_bytes(blob)
    (out / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [
            {
                "mediaType": MANIFEST,
                "digest": digest(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"manifest": digest(manifest), "layer": digest(layer), "module": digest(module)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wasm", type=Path, default=DEFAULT_WASM, help="the module (default: the workspace's release build)")
    parser.add_argument("--out", type=Path, required=True, help="the OCI image layout directory to write")
    parser.add_argument("--tag", default="latest", help="the tag inside the layout")
    args = parser.parse_args()
    if not args.wasm.is_file():
        print(f"{args.wasm}: no such module; scripts/setup.sh builds it", file=sys.stderr)
        return 1
    module = args.wasm.read_bytes()
    if module[:4] != b"\0asm":
        print(f"{args.wasm} is not a WebAssembly module", file=sys.stderr)
        return 1
    digests = package(module, args.out, args.tag, args.tag)
    print(f"wrote {args.out} ({args.tag}): manifest {digests['manifest']}, module {digests['module']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
