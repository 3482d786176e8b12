"""The shipped packaging: the filters' OCI image (scripts/package-wasm.py) in the layout
Istio's `oci://` URLs pull, and the Dockerfiles agreeing with the pins and ports the rest of
the repository uses."""

import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WASM = REPO_ROOT / "target" / "wasm32-wasip1" / "release" / "meshserve_filters.wasm"


def package(out: Path, tag: str = "0.1.0") -> str:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "package-wasm.py"), "--wasm", str(WASM), "--out", str(out), "--tag", tag],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def blob(layout: Path, descriptor: dict) -> bytes:
    algorithm, hexdigest = descriptor["digest"].split(":")
    data = (layout / "blobs" / algorithm / hexdigest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hexdigest, "a blob's content does not match its digest"
    assert len(data) == descriptor["size"]
    return data


def test_the_filters_image_is_what_istio_pulls(tmp_path):
    layout = tmp_path / "oci"
    printed = package(layout)
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    [entry] = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "0.1.0"
    assert entry["digest"] in printed
    manifest = json.loads(blob(layout, entry))
    assert manifest["mediaType"] == entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    # Istio's image fetcher: an OCI manifest with exactly one tar+gzip layer holding plugin.wasm.
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
    tar_bytes = gzip.decompress(blob(layout, layer))
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        [member] = tar.getmembers()
        assert member.name == "plugin.wasm"
        assert tar.extractfile(member).read() == WASM.read_bytes()
    config = json.loads(blob(layout, manifest["config"]))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()]


def test_the_filters_image_is_reproducible(tmp_path):
    package(tmp_path / "a")
    package(tmp_path / "b")
    index = lambda d: json.loads((tmp_path / d / "index.json").read_text())["manifests"][0]["digest"]
    assert index("a") == index("b")


def test_a_missing_or_foreign_module_is_refused(tmp_path):
    bogus = tmp_path / "x.wasm"
    bogus.write_bytes(b"not wasm")
    for wasm in (tmp_path / "missing.wasm", bogus):
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "package-wasm.py"), "--wasm", str(wasm), "--out", str(tmp_path / "o")],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 1 and str(wasm) in result.stderr


def test_the_sidecar_dockerfile_matches_the_pins_and_ports():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    workspace = tomllib.loads((REPO_ROOT / "Cargo.toml").read_text())
    rust = re.search(r"^ARG RUST_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert rust == workspace["workspace"]["package"]["rust-version"]
    ort = re.search(r"^ARG ONNXRUNTIME_VERSION=(\S+)$", dockerfile, re.M).group(1)
    pinned = re.search(r"^onnxruntime==(\S+)$", (REPO_ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert ort == pinned, "the image's ONNX Runtime is the one the tests run"
    assert "EXPOSE 8080 8081" in dockerfile, "the ports meshserve render gives the sidecar"
    assert 'ENTRYPOINT ["/usr/local/bin/meshserve"]' in dockerfile
    assert "--locked" in dockerfile
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert "target" in ignored and ".venv" in ignored
    wasm_dockerfile = (REPO_ROOT / "filters" / "wasm" / "Dockerfile").read_text()
    assert "COPY meshserve_filters.wasm ./plugin.wasm" in wasm_dockerfile
