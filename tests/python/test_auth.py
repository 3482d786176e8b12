"""JWT authentication in `meshserve up`, end to end: an InferenceService's
`serving.meshserve.io/jwt-*` annotations configure Envoy's own `jwt_authn` filter (after the
router filter names the service), checked with real RS256 tokens made here: REST and gRPC
calls without a token or with a bad one are refused (401 / UNAUTHENTICATED), a good token
passes, and the claim the annotations copy into a header reaches the payload log's metadata
(a sink on Python's http.server), while a client's own copy of that header is dropped.
"""

import json
import os
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
import tritonclient.grpc as grpcclient
from cryptography.hazmat.primitives.asymmetric import rsa
from tritonclient.utils import InferenceServerException

from conftest import EventSink, MeshUp, Recorder

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("MESHSERVE_BIN", REPO_ROOT / "target" / "release" / "meshserve"))
MODEL = REPO_ROOT / "models" / "repository" / "sklearn_digits"
SAMPLE = json.loads((REPO_ROOT / "models" / "samples" / "sklearn_digits_v1_request.json").read_text())
ISSUER = "https://issuer.meshserve.test"


@pytest.fixture(scope="module")
def keys():
    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signing.public_key()))
    public.update(kid="k1", alg="RS256", use="sig")
    return signing, stranger, {"keys": [public]}


def isvc_file(path, annotations, predictor=None):
    path.write_text(  # JSON is YAML
        json.dumps(
            {
                "apiVersion": "serving.kserve.io/v1beta1",
                "kind": "InferenceService",
                "metadata": {"name": "digits", "annotations": annotations},
                "spec": {"predictor": {"model": {"modelFormat": {"name": "onnx"}, "storageUri": f"file://{MODEL}"}, **(predictor or {})}},
            }
        )
    )
    return path


def token(key, **claims):
    now = int(time.time())
    body = {"iss": ISSUER, "sub": "alice", "aud": "digits", "iat": now, "exp": now + 600, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, keys):
    tmp = tmp_path_factory.mktemp("auth")
    sink = Recorder(EventSink)
    annotations = {
        "serving.meshserve.io/jwt-issuer": ISSUER,
        "serving.meshserve.io/jwt-jwks": json.dumps(keys[2]),
        "serving.meshserve.io/jwt-audiences": "digits",
        "serving.meshserve.io/jwt-subjects": "alice, bob",
        "serving.meshserve.io/jwt-claim-headers": "sub=x-user, email=x-email",
    }
    logger = {"mode": "all", "url": f"http://{sink.address}", "metadataHeaders": ["x-user", "x-email", "x-case"]}
    spec = isvc_file(tmp / "isvc.yaml", annotations, {"logger": logger})
    up = MeshUp(spec, tmp / "state", BINARY)
    up.sink = sink
    yield up
    up.stop()
    sink.stop()


def call(mesh, path, bearer=None, headers=None, body=SAMPLE):
    headers = {"content-type": "application/json", **(headers or {})}
    if bearer is not None:
        headers["authorization"] = f"Bearer {bearer}"
    request = urllib.request.Request(mesh.url + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read() or b"{}")


def test_a_good_token_passes_and_others_get_401(mesh, keys):
    signing, stranger, _ = keys
    status, _, answer = call(mesh, "/v1/models/digits:predict", token(signing))
    assert status == 200, answer
    assert len(answer["predictions"]) == 2
    bad = {
        "no token": None,
        "not a JWT": "abc.def.ghi",
        "another key": token(stranger),
        "expired": token(signing, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600),
        "another issuer": token(signing, iss="https://elsewhere.test"),
    }
    for why, bearer in bad.items():
        status, headers, answer = call(mesh, "/v1/models/digits:predict", bearer)
        assert status == 401, f"{why}: {status} {answer}"
        # In the REST protocols' error shape.
        assert headers["content-type"] == "application/json" and answer["error"], why
    status, _, answer = call(mesh, "/v2/models/digits/infer", None, body={"inputs": []})
    assert status == 401, answer
    # A token meant for another service is refused (Envoy answers 403 to a wrong audience).
    status, headers, answer = call(mesh, "/v1/models/digits:predict", token(signing, aud="fraud"))
    assert status == 403 and answer["error"], answer


def test_only_the_allowed_subjects_may_call(mesh, keys):
    status, _, answer = call(mesh, "/v1/models/digits:predict", token(keys[0], sub="bob"))
    assert status == 200, answer
    status, headers, answer = call(mesh, "/v1/models/digits:predict", token(keys[0], sub="carol"))
    assert status == 403, answer
    assert headers["content-type"] == "application/json" and answer["error"]


def test_grpc_needs_the_token_too(mesh, keys):
    client = grpcclient.InferenceServerClient(mesh.url.removeprefix("http://"))
    try:
        with pytest.raises(InferenceServerException) as refused:
            client.is_model_ready("digits")
        assert "UNAUTHENTICATED" in str(refused.value.status()), refused.value
        assert client.is_model_ready("digits", headers={"authorization": f"Bearer {token(keys[0])}"})
    finally:
        client.close()


def test_control_apis_stay_closed_with_a_token(mesh, keys):
    status, _, answer = call(mesh, "/v2/repository/models/digits/unload", token(keys[0]), body={})
    assert status == 403, answer


def events_of(mesh, case, count=2):
    """The metadata of the events sent for the requests marked `x-case: case` (events of
    earlier tests may still be arriving)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = [json.loads(h.get("ce-metadata", "{}")) for h, _ in list(mesh.sink.received)]
        found = [m for m in found if m.pop("x-case", None) == [case]]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    pytest.fail(f"no {count} events for {case}: {mesh.sink.received}")


def test_the_claims_reach_the_payload_log_and_forged_headers_do_not(mesh, keys):
    forged = {"x-user": "mallory", "x-email": "mallory@example.com"}
    claims = token(keys[0], sub="bob", email="bob@example.com")
    status, _, _ = call(mesh, "/v1/models/digits:predict", claims, headers={**forged, "x-case": "claims"})
    assert status == 200
    assert events_of(mesh, "claims") == [{"x-user": ["bob"], "x-email": ["bob@example.com"]}] * 2
    # A token without the email claim: the client's own header is dropped, not logged as one.
    status, _, _ = call(mesh, "/v1/models/digits:predict", token(keys[0], sub="bob"), headers={**forged, "x-case": "no email"})
    assert status == 200
    assert events_of(mesh, "no email") == [{"x-user": ["bob"]}] * 2


def test_keys_fetched_from_a_jwks_uri(tmp_path, keys):
    """The issuer's keys from its JWKS URI (fetched by Envoy through a cluster of its own)."""
    document = json.dumps(keys[2]).encode()

    class Keys(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/.well-known/jwks.json" else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *args):
            pass

    issuer = ThreadingHTTPServer(("127.0.0.1", 0), Keys)
    threading.Thread(target=issuer.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{issuer.server_port}/.well-known/jwks.json"
    annotations = {"serving.meshserve.io/jwt-issuer": ISSUER, "serving.meshserve.io/jwt-jwks-uri": uri}
    spec = isvc_file(tmp_path / "isvc.yaml", annotations)
    up = MeshUp(spec, tmp_path / "state", BINARY)
    try:
        good = token(keys[0])
        deadline = time.monotonic() + 20  # the first fetch runs when Envoy starts
        status = 0
        while status != 200 and time.monotonic() < deadline:
            status, _, answer = call(up, "/v1/models/digits:predict", good)
            time.sleep(0.1)
        assert status == 200, answer
        status, _, answer = call(up, "/v1/models/digits:predict", token(keys[1]))
        assert status == 401, answer
    finally:
        up.stop()
        issuer.shutdown()
        issuer.server_close()
