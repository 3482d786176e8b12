"""KServe's InferenceGraph run by the mesh (`meshserve up`: real Envoy, the router filter
running the graph, a sidecar per InferenceService).

KServe's four samples (docs/samples/graph/): sequence, ensemble and splitter as written, over
its sklearn and XGBoost iris services as written, their gs:// buckets served by fake-gcs-server
and the models trained here; the switch sample's graph with its conditions and request as
written, its three `serviceUrl`s pointed at a stand-in of its `bgtest` image (a server that
echoes the request with `"from": <target>`). Every graph answer is checked against the steps
called one by one through the same mesh and combined the way KServe's router combines them.
Then: a splitter's shares over 2,000 requests, a failed Soft and a failed Hard step, a switch
that matches nothing, a graph timeout, the graph's name and step in payload-log events, and
that a client cannot forge the headers that mark a graph's own calls.
"""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import joblib
import numpy as np
import pytest
import xgboost
from sklearn import datasets
from sklearn.svm import SVC

from conftest import EventSink, FakeGcs, MeshUp, Recorder, post_json

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("MESHSERVE_BIN", REPO_ROOT / "target" / "release" / "meshserve"))
# docs/samples/graph/iris-input.json
IRIS_INPUT = {"instances": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]}
# The switch sample's request (docs/samples/graph/README.md, 2.3).
SWITCH_INPUT = {"source": "client1", "instances": [{"name": "blue", "intval": 0, "strval": "kserve"},
                                                   {"name": "green", "intval": 1, "strval": "1red-server1"}]}

# KServe's sample InferenceServices (each sample repeats them; once here).
SERVICES = """\
---
apiVersion: "serving.kserve.io/v1beta1"
kind: "InferenceService"
metadata:
  name: "sklearn-iris"
spec:
  predictor:
    sklearn:
      storageUri: "gs://kfserving-examples/models/sklearn/1.0/model"
---
apiVersion: "serving.kserve.io/v1beta1"
kind: "InferenceService"
metadata:
  name: "xgboost-iris"
spec:
  predictor:
    xgboost:
      storageUri: "gs://kfserving-examples/models/xgboost/iris"
"""

# The graphs of sequence.yaml, ensemble.yaml and splitter.yaml, as written.
SAMPLE_GRAPHS = """\
---
apiVersion: serving.kserve.io/v1alpha1
kind: InferenceGraph
metadata:
  name: model-chainer
spec:
  nodes:
    root:
      routerType: Sequence
      steps:
        - serviceName: sklearn-iris
        - serviceName: xgboost-iris
          data: $request
---
apiVersion: serving.kserve.io/v1alpha1
kind: InferenceGraph
metadata:
  name: ensemble-model
spec:
  nodes:
    root:
      routerType: Ensemble
      steps:
        - serviceName: sklearn-iris
          name: sklearn-iris
        - serviceName: xgboost-iris
          name: xgboost-iris
---
apiVersion: serving.kserve.io/v1alpha1
kind: InferenceGraph
metadata:
  name: splitter-model
spec:
  nodes:
    root:
      routerType: Splitter
      steps:
        - serviceName: sklearn-iris
          weight: 20
        - serviceName: xgboost-iris
          weight: 80
"""

# switch.yaml's graph, its URLs at the stand-in ({$your-domain} has no meaning here).
SWITCH_GRAPH = """\
---
apiVersion: "serving.kserve.io/v1alpha1"
kind: InferenceGraph
metadata:
  name: model-switch
spec:
  nodes:
    root:
      routerType: Switch
      steps:
      - serviceUrl: http://{bgtest}/single-1/switch
        condition: "[@this].#(source==client)" #object matching
      - serviceUrl: http://{bgtest}/single-2/switch
        condition: "instances.#(intval>10)" #array matching
      - serviceUrl: http://{bgtest}/single-3/switch
        condition: "instances.#(strval%*red-server*)" #pattern matching
"""

# Failures, a timeout and payload logging: a logged copy of the sklearn service and graphs
# whose first step is a stand-in that fails or answers late.
MORE = """\
---
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: iris-logged
spec:
  predictor:
    logger:
      mode: all
      url: http://{sink}/
    sklearn:
      storageUri: "gs://kfserving-examples/models/sklearn/1.0/model"
---
apiVersion: serving.kserve.io/v1alpha1
kind: InferenceGraph
metadata:
  name: soft-failure
spec:
  nodes:
    root:
      routerType: Sequence
      steps:
        - serviceUrl: http://{bgtest}/fail
          name: flaky
        - serviceName: iris-logged
          name: classify
          data: $request
---
apiVersion: serving.kserve.io/v1alpha1
kind: InferenceGraph
metadata:
  name: hard-failure
spec:
  nodes:
    root:
      routerType: Sequence
      steps:
        - serviceUrl: http://{bgtest}/fail
          name: flaky
          dependency: Hard
        - serviceName: sklearn-iris
          data: $request
---
apiVersion: serving.kserve.io/v1alpha1
kind: InferenceGraph
metadata:
  name: too-slow
spec:
  timeout: 1
  nodes:
    root:
      routerType: Sequence
      steps:
        - serviceUrl: http://{bgtest}/slow
"""


class BgTest(BaseHTTPRequestHandler):
    """KServe's bgtest image (docs/samples/graph/bgtest): `POST /<target>/...` answers the
    request with `"from": <target>`; `/fail` answers 500, `/slow` answers after 3 s."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.received.append((self.path, dict(self.headers), body))
        if self.path == "/fail":
            return self.answer(500, {"error": "the stand-in failed"})
        if self.path == "/slow":
            time.sleep(3)
            return self.answer(200, {"late": True})
        request = json.loads(body)
        return self.answer(200, {"from": self.path.split("/")[1], "instances": request.get("instances")})

    def answer(self, status, value):
        data = json.dumps(value).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the graph gave up on this call (the timeout test)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """fake-gcs-server holding KServe's sample iris models (trained here) at its paths."""
    emulator = FakeGcs("kfserving-examples")
    try:
        root = tmp_path_factory.mktemp("iris")
        X, y = datasets.load_iris(return_X_y=True)
        svc = SVC(gamma="scale").fit(X, y)
        joblib.dump(svc, root / "model.joblib")
        booster = xgboost.train({"max_depth": 6, "eta": 0.1, "num_class": 3, "objective": "multi:softmax"},
                                xgboost.DMatrix(X, label=y), num_boost_round=10)
        emulator.put("models/sklearn/1.0/model/model.joblib", (root / "model.joblib").read_bytes())
        emulator.put("models/xgboost/iris/model.bst", bytes(booster.save_raw("ubj")))
        yield emulator.base, {"sklearn": svc, "xgboost": booster}
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def mesh(gcs, tmp_path_factory, request):
    """One `meshserve up` of the samples and the extra graphs; (url, stand-in, sink, models)."""
    base, models = gcs
    bgtest, sink = Recorder(BgTest), Recorder(EventSink)
    root = tmp_path_factory.mktemp("graph")
    spec = root / "graphs.yaml"
    spec.write_text(SERVICES + SAMPLE_GRAPHS + SWITCH_GRAPH.replace("{bgtest}", bgtest.address)
                    + MORE.replace("{bgtest}", bgtest.address).replace("{sink}", sink.address))
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = base
    try:
        up = MeshUp(spec, root / "state", BINARY, timeout_s=180)
    finally:
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
    try:
        yield up.url, bgtest, sink, models
    finally:
        up.stop()
        bgtest.stop()
        sink.stop()
        if request.session.testsfailed:
            print("".join(up.lines))


post = post_json


def direct(url, service, body):
    status, answer = post(f"{url}/v1/models/{service}:predict", body)
    assert status == 200, answer
    return answer


def test_kserves_sample_graphs_answer_as_their_steps_combined(mesh):
    url, _, _, models = mesh
    rows = np.array(IRIS_INPUT["instances"])
    sklearn = direct(url, "sklearn-iris", IRIS_INPUT)
    xgb = direct(url, "xgboost-iris", IRIS_INPUT)
    # The steps answer as the frameworks do (KServe's README: [1, 1] from both).
    assert sklearn == {"predictions": models["sklearn"].predict(rows).tolist()} == {"predictions": [1, 1]}
    assert xgb == {"predictions": models["xgboost"].predict(xgboost.DMatrix(rows)).tolist()}
    assert xgb["predictions"] == [1.0, 1.0]

    # Sequence: the second step takes the request ($request), and its answer is the graph's.
    assert post(f"{url}/v1/graphs/model-chainer", IRIS_INPUT) == (200, xgb)
    # KServe's own address for a graph: POST / on the graph's host.
    assert post(f"{url}/", IRIS_INPUT, {"host": "model-chainer.default.example.com"}) == (200, xgb)
    # Ensemble: every step's answer under the step's name.
    assert post(f"{url}/v1/graphs/ensemble-model", IRIS_INPUT) == (
        200, {"sklearn-iris": sklearn, "xgboost-iris": xgb})


def test_the_switch_sample_takes_the_first_condition_that_matches(mesh):
    url, bgtest, _, _ = mesh
    before = len(bgtest.received)
    status, answer = post(f"{url}/v1/graphs/model-switch", SWITCH_INPUT)
    # source is "client1", no intval is above 10, "1red-server1" matches *red-server*.
    assert (status, answer) == (200, {"from": "single-3", "instances": SWITCH_INPUT["instances"]})
    [(path, headers, body)] = bgtest.received[before:]
    assert path == "/single-3/switch" and json.loads(body) == SWITCH_INPUT
    assert headers.get("x-meshserve-graph") is None, "graph headers stay inside the mesh"

    picks = {"source": "client", "instances": []}
    assert post(f"{url}/v1/graphs/model-switch", picks)[1]["from"] == "single-1"
    picks = {"source": "x", "instances": [{"intval": 11, "strval": "red-server"}]}
    assert post(f"{url}/v1/graphs/model-switch", picks)[1]["from"] == "single-2"

    status, answer = post(f"{url}/v1/graphs/model-switch", {"source": "x", "instances": [{"intval": 1}]})
    assert status == 404
    assert answer == {"error": "graph 'model-switch' node 'root': the request matches none of the Switch's conditions"}


def test_the_splitter_sample_keeps_its_weights_over_2000_requests(mesh):
    url, _, _, _ = mesh

    def one(_):
        status, answer = post(f"{url}/v1/graphs/splitter-model", IRIS_INPUT)
        assert status == 200, answer
        return answer

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(2000)))
    # sklearn-iris answers integers, xgboost-iris floats (checked in the samples test).
    to_sklearn = sum(1 for a in answers if a == {"predictions": [1, 1]} and type(a["predictions"][0]) is int)
    to_xgb = sum(1 for a in answers if type(a["predictions"][0]) is float)
    assert to_sklearn + to_xgb == 2000
    assert abs(to_sklearn / 2000 - 0.20) <= 0.03, to_sklearn


def test_soft_steps_fail_and_go_on_hard_ones_stop_naming_the_step(mesh):
    url, _, _, _ = mesh
    sklearn = direct(url, "sklearn-iris", IRIS_INPUT)
    assert post(f"{url}/v1/graphs/soft-failure", IRIS_INPUT) == (200, sklearn)
    status, answer = post(f"{url}/v1/graphs/hard-failure", IRIS_INPUT)
    assert (status, answer) == (500, {"error": "graph 'hard-failure' node 'root' step 'flaky': the stand-in failed"})
    status, answer = post(f"{url}/v1/graphs/too-slow", IRIS_INPUT)
    assert status == 504 and "graph 'too-slow' node 'root' step '0'" in answer["error"], answer
    status, answer = post(f"{url}/v1/graphs/nowhere", IRIS_INPUT)
    assert status == 404 and "nowhere" in answer["error"], answer


def test_payload_logs_name_the_graph_and_step_and_clients_cannot_forge_them(mesh):
    url, _, sink, _ = mesh
    before = len(sink.received)
    assert post(f"{url}/v1/graphs/soft-failure", IRIS_INPUT)[0] == 200
    # A client that sends the graph's own headers on a direct call: they are dropped.
    forged = {"x-meshserve-graph": "soft-failure", "x-meshserve-graph-step": "root/classify"}
    assert post(f"{url}/v1/models/iris-logged:predict", IRIS_INPUT, forged)[0] == 200
    # ... and on a graph call they do not make it look like a graph's own call.
    assert post(f"{url}/v1/graphs/soft-failure", IRIS_INPUT, forged)[0] == 200
    deadline = time.monotonic() + 20
    while len(sink.received) < before + 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    events = sink.received[before:]
    assert len(events) == 6, events
    by_id = {}
    for headers, _ in events:
        assert headers["ce-inferenceservicename"] == "iris-logged"
        by_id.setdefault(headers["ce-id"], []).append(headers)
    marks = sorted((h[0].get("ce-inferencegraph", "-"), h[0].get("ce-inferencegraphstep", "-"),
                    h[0]["ce-source"]) for h in by_id.values())
    assert marks == sorted([("soft-failure", "root/classify", "/v1/models/iris-logged:predict")] * 2
                           + [("-", "-", "/v1/models/iris-logged:predict")]), marks
    for pair in by_id.values():
        assert sorted(h["ce-type"] for h in pair) == ["org.kubeflow.serving.inference.request",
                                                     "org.kubeflow.serving.inference.response"]
        assert len({h.get("ce-inferencegraph") for h in pair}) == 1
