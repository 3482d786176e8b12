"""Remote model storage against real servers: an S3 API (moto's server, objects put with
boto3), a GCS emulator (fake-gcs-server, objects put through its JSON API), Azure's emulator
(Azurite from tests/tools, blobs put with Azure's Python client) and an HTTP server
(Python's, serving a .tar.gz and a .zip of a model directory). `meshserve serve --storage URI`
downloads, then serves; its answers equal Python onnxruntime's on the same file; a second
start over unchanged objects downloads nothing; a missing bucket or object is an error that
names the URI and never shows a credential; `meshserve up` takes an InferenceService whose
storageUri is s3:// and `render` gives its Deployment the URI instead of a volume.

Runs in its own interpreter (see scripts/test.sh).
"""

import io
import json
import os
import subprocess
import tarfile
import threading
import time
import urllib.request
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import numpy as np
import onnxruntime
import pytest
import yaml

from conftest import FakeGcs, MeshUp, Process, free_port, wait_http

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("MESHSERVE_BIN", REPO_ROOT / "target" / "release" / "meshserve"))
DIGITS = REPO_ROOT / "models" / "repository" / "sklearn_digits"
SAMPLE = json.loads((REPO_ROOT / "models" / "samples" / "sklearn_digits_v1_request.json").read_text())
SECRET = "sEcReT-never-in-a-log-0123456789"



@pytest.fixture(scope="module")
def s3():
    port = free_port()
    server = Process([REPO_ROOT / ".venv" / "bin" / "moto_server", "-H", "127.0.0.1", "-p", str(port)])
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id="testing",
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )
        client.create_bucket(Bucket="models")
        for version in ("1", "2"):
            client.upload_file(str(DIGITS / version / "model.onnx"), "models", f"sklearn/digits/{version}/model.onnx")
        client.upload_file(str(DIGITS / "1" / "model.onnx"), "models", "single/model.onnx")
        yield env
    finally:
        server.stop()


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    with tarfile.open(root / "digits.tar.gz", "w:gz") as tar:
        tar.add(DIGITS / "1", arcname="1")
    with zipfile.ZipFile(root / "digits.zip", "w") as archive:
        archive.write(DIGITS / "2" / "model.onnx", "2/model.onnx")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def reference(version):
    session = onnxruntime.InferenceSession(str(DIGITS / version / "model.onnx"))
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.array(SAMPLE["instances"], dtype=np.float32)})


def serve(storage, env, cache, extra=()):
    """`meshserve serve --storage STORAGE` until ready: (process, REST address)."""
    server = Process(
        [BINARY, "serve", "--storage", storage, "--model-name", "digits", "--http-port", "0", "--grpc-port", "0",
         "--storage-cache", cache, *extra],
        env=env,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in server.lines:
            if "listening on http=" in line:
                address = line.split("listening on http=")[1].split()[0]
                try:
                    if urllib.request.urlopen(f"http://{address}/v2/health/ready", timeout=1).status == 200:
                        return server, address
                except OSError:
                    pass
        if server.process.poll() is not None:
            return server, None
        time.sleep(0.1)
    server.stop()
    pytest.fail("meshserve serve was not ready in 60 s:\n" + server.text())


def predict(address):
    request = urllib.request.Request(
        f"http://{address}/v2/models/digits/infer",
        data=json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                                     "data": np.array(SAMPLE["instances"]).flatten().tolist()}]}).encode(),
        headers={"content-type": "application/json"},
    )
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def check_answers(address, version):
    answer = predict(address)
    expected = reference(version)
    labels = next(o for o in answer["outputs"] if o["datatype"] == "INT64")
    assert labels["data"] == expected[0].astype(np.int64).flatten().tolist()
    scores = next(o for o in answer["outputs"] if o["datatype"] == "FP32")
    assert np.allclose(scores["data"], expected[1].flatten(), rtol=1e-5, atol=1e-6)


def check_serves(uri, env, cache, version, context=lambda: ""):
    """`meshserve serve --storage URI` answers as onnxruntime does on version `version`;
    returns its output."""
    server, address = serve(uri, env, cache)
    try:
        assert address, server.text() + context()
        check_answers(address, version)
        return server.text()
    finally:
        server.stop()


def test_s3_prefix_and_single_object_serve_and_stay_cached(s3, tmp_path):
    cache = tmp_path / "cache"
    for uri, version in [("s3://models/sklearn/digits", "2"), ("s3://models/single/model.onnx", "1")]:
        text = check_serves(uri, s3, cache, version)
        assert "storage: downloaded" in text and SECRET not in text
    # Unchanged objects: nothing downloaded again.
    server, address = serve("s3://models/sklearn/digits", s3, cache)
    try:
        assert address and "storage: already downloaded" in server.text(), server.text()
    finally:
        server.stop()
    assert not [p for p in cache.iterdir() if ".partial" in p.name], "a partial download was left"


@pytest.mark.parametrize(
    "uri, says",
    [("s3://nobucket/digits", "nobucket"), ("s3://models/nothing/here", "no object there")],
)
def test_missing_buckets_and_objects_are_named_and_nothing_is_served(s3, tmp_path, uri, says):
    server, address = serve(uri, s3, tmp_path / "cache")
    server.process.wait(timeout=120)
    text = server.text()
    assert address is None and server.process.returncode != 0, text
    assert uri in text and says in text, text
    assert SECRET not in text


def test_the_download_limit_is_named(s3, tmp_path):
    server, address = serve("s3://models/sklearn/digits", s3, tmp_path / "cache", ["--max-download-bytes", "1000"])
    server.process.wait(timeout=60)
    assert address is None and "--max-download-bytes" in server.text(), server.text()


class TruncatingHandler(SimpleHTTPRequestHandler):
    """Promises 100,000 bytes and closes the connection after 5,000."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"\0" * 5000)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_truncated_download_is_an_error_and_nothing_is_kept(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), TruncatingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}/model.onnx"
    try:
        sidecar, address = serve(uri, {}, tmp_path / "cache")
        sidecar.process.wait(timeout=120)
        text = sidecar.text()
        assert address is None and sidecar.process.returncode != 0 and uri in text, text
        assert not list((tmp_path / "cache").rglob("*.onnx")), "a truncated model was kept"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("archive, version", [("digits.tar.gz", "1"), ("digits.zip", "2")])
def test_http_archives_are_unpacked_and_served(archives, tmp_path, archive, version):
    check_serves(f"{archives}/{archive}", {}, tmp_path / "cache", version)


@pytest.fixture(scope="module")
def gcs():
    """fake-gcs-server with bucket kfserving-examples: KServe's sample paths."""
    emulator = FakeGcs("kfserving-examples")
    try:
        for v in ("1", "2"):
            emulator.put(f"models/sklearn/digits/{v}/model.onnx", (DIGITS / v / "model.onnx").read_bytes())
        # KServe's ONNX sample directory: model.onnx at the top.
        emulator.put("models/onnx/model.onnx", (DIGITS / "2" / "model.onnx").read_bytes())
        yield emulator.base, emulator
    finally:
        emulator.stop()


def test_gcs_through_its_emulator(gcs, tmp_path):
    base, emulator = gcs
    check_serves("gs://kfserving-examples/models/sklearn/digits", {"STORAGE_EMULATOR_HOST": base},
                 tmp_path / "cache", "2", emulator.text)


def test_kserve_onnx_sample_runs_as_written_from_gcs(gcs, tmp_path, monkeypatch):
    """docs/samples/v1beta1/onnx/onnx.yaml of KServe, as written (its bucket served here)."""
    base, _ = gcs
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", base)
    spec = tmp_path / "onnx.yaml"
    spec.write_text(
        'apiVersion: "serving.kserve.io/v1beta1"\n'
        'kind: "InferenceService"\n'
        "metadata:\n"
        '  name: "style-sample"\n'
        "spec:\n"
        "  predictor:\n"
        "    onnx:\n"
        '      storageUri: "gs://kfserving-examples/models/onnx"\n'
    )
    mesh = MeshUp(spec, tmp_path / "state", BINARY)
    try:
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                            "data": np.array(SAMPLE["instances"]).flatten().tolist()}]}
        request = urllib.request.Request(f"{mesh.url}/v2/models/style-sample/infer", data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=10).read())
        labels = next(o for o in answer["outputs"] if o["datatype"] == "INT64")
        assert labels["data"] == reference("2")[0].astype(np.int64).flatten().tolist()
    finally:
        mesh.stop()


def test_up_and_render_take_s3_storage(s3, tmp_path, monkeypatch):
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    spec = tmp_path / "isvc.yaml"
    spec.write_text(yaml.safe_dump({
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "digits"},
        "spec": {"predictor": {"model": {"modelFormat": {"name": "onnx"},
                                         "storageUri": "s3://models/sklearn/digits"}}},
    }))
    mesh = MeshUp(spec, tmp_path / "state", BINARY)
    try:
        request = urllib.request.Request(f"{mesh.url}/v1/models/digits:predict", data=json.dumps(SAMPLE).encode(),
                                         headers={"content-type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=10).read())
        # V1 without v1_output: one object per row with every output.
        labels = [row["label"] for row in answer["predictions"]]
        assert labels == reference("2")[0].astype(np.int64).flatten().tolist()
    finally:
        mesh.stop()
    assert SECRET not in "".join(mesh.lines)

    out = tmp_path / "rendered"
    subprocess.run([BINARY, "render", spec, "--out", out], check=True, capture_output=True)
    deployment = next(d for d in yaml.safe_load_all((out / "kubernetes" / "digits.yaml").read_text())
                      if d and d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--storage") + 1] == "s3://models/sklearn/digits"
    assert "--storage-cache" in args
    assert all(v["name"] != "models" for v in pod["volumes"])


def test_azure_blob_through_azurite(tmp_path):
    from azure.storage.blob import BlobServiceClient

    binary = REPO_ROOT / "tests" / "tools" / "node_modules" / ".bin" / "azurite-blob"
    assert binary.exists(), "Azurite is missing: scripts/test.sh installs it (npm ci --prefix tests/tools)"
    port = free_port()
    emulator = Process([binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                        "--skipApiVersionCheck", "--silent"])
    base = f"http://127.0.0.1:{port}/devstoreaccount1"
    try:
        wait_http(base)
        # Azurite's documented development account and key.
        key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
        client = BlobServiceClient(account_url=base, credential={"account_name": "devstoreaccount1", "account_key": key})
        container = client.create_container("models")
        for version in ("1", "2"):
            with open(DIGITS / version / "model.onnx", "rb") as f:
                container.upload_blob(f"sklearn/digits/{version}/model.onnx", f)
        env = {"AZURE_STORAGE_USE_EMULATOR": "true", "AZURITE_BLOB_STORAGE_URL": f"http://127.0.0.1:{port}"}
        check_serves("https://devstoreaccount1.blob.core.windows.net/models/sklearn/digits", env,
                     tmp_path / "cache", "2", emulator.text)
    finally:
        emulator.stop()
