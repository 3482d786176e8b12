"""The sidecar's built-in explainers, `POST /v1/models/<m>:explain`, on real models.

Models trained here (scikit-learn's logistic regression, MLP, linear regression, gradient
boosting and random forest, exported with skl2onnx; XGBoost and LightGBM boosters converted by
the sidecar) are served by `meshserve serve` from a repository whose config.yaml gives each an
explainer and background rows, and by `meshserve up` from an InferenceService whose
`spec.explainer` does. Their Shapley values must equal the ones computed here by their
definition (every coalition, the factorial weights, the interventional value function over the
same background), with Python onnxruntime or the framework itself computing the model, for
every output; `expected_value` the mean answer over the background; the values must add up;
a linear model's must be the closed form; and bad requests get a clear 400 or 404.
"""

import itertools
import json
import math
import os
import re
import time
from pathlib import Path

import lightgbm
import numpy as np
import onnxruntime
import pytest
import xgboost
import yaml
from skl2onnx import to_onnx
from sklearn import datasets
from sklearn.ensemble import GradientBoostingClassifier, RandomForestRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.neural_network import MLPClassifier

from conftest import EventSink, MeshUp, Process, Recorder, post_json

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("MESHSERVE_BIN", REPO_ROOT / "target" / "release" / "meshserve"))


def onnx_of(model, X):
    options = {id(model): {"zipmap": False}} if hasattr(model, "classes_") else None
    return to_onnx(model, X[:1].astype(np.float32), options=options)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    X, y = datasets.load_iris(return_X_y=True)
    background = X[::15][:10]
    models = {
        "iris": (LogisticRegression(max_iter=500).fit(X, y), "kernel_shap"),
        "plain": (LogisticRegression(max_iter=500).fit(X, y), None),
        "mlp": (MLPClassifier(hidden_layer_sizes=(8,), max_iter=2000, random_state=0).fit(X, y), "kernel_shap"),
        "linear": (LinearRegression().fit(X[:, :3], X[:, 3]), "kernel_shap"),
        "boosted": (GradientBoostingClassifier(n_estimators=12, max_depth=3, random_state=0).fit(X, y), "tree_shap"),
        "forest": (RandomForestRegressor(n_estimators=6, max_depth=4, random_state=0).fit(X[:, :3], X[:, 3]),
                   "tree_shap"),
    }
    repo = tmp_path_factory.mktemp("repository")
    sessions = {}
    for name, (model, method) in models.items():
        width = 3 if name in ("linear", "forest") else 4
        onnx = onnx_of(model, X[:, :width]).SerializeToString()
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(onnx)
        sessions[name] = onnxruntime.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        if method:
            (repo / name / "background.json").write_text(json.dumps(background[:, :width].tolist()))
            (repo / name / "config.yaml").write_text(yaml.safe_dump(
                {"explainer": {method: {"background_file": "background.json"}}}))
    server = Process([BINARY, "serve", "--model-repository", repo, "--http-port", "0", "--grpc-port", "0"])
    address = None
    deadline = time.monotonic() + 60
    while address is None and time.monotonic() < deadline and server.process.poll() is None:
        found = re.search(r"listening on http=(\S+)", server.text())
        address = found and found.group(1)
        time.sleep(0.05)
    if address is None:
        server.stop()
        pytest.fail("meshserve serve did not start:\n" + server.text(), pytrace=False)
    try:
        yield f"http://{address}", sessions, {n: m for n, (m, _) in models.items()}, background
    finally:
        server.stop()


post = post_json


def shapley(f, x, background):
    """Every output's Shapley values by their definition, with `f(rows) -> [rows, outputs]`:
    (values [output][feature], the mean answer over the background, f(x))."""
    m = len(x)

    def v(coalition):
        rows = background.copy()
        rows[:, list(coalition)] = x[list(coalition)]
        return f(rows).astype(np.float64).mean(axis=0)

    k = f(background[:1]).shape[1]
    phi = np.zeros((k, m))
    for i in range(m):
        rest = [j for j in range(m) if j != i]
        for size in range(m):
            weight = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
            for s in itertools.combinations(rest, size):
                phi[:, i] += weight * (v(s + (i,)) - v(s))
    return phi, f(background).astype(np.float64).mean(axis=0), f(x[None, :])[0]


def onnx_f(session, output):
    def f(rows):
        answer = session.run([output], {session.get_inputs()[0].name: rows.astype(np.float32)})[0]
        return answer.reshape(len(rows), -1)
    return f


def assert_explains(data, f, instances, background, tolerance=1e-6):
    """`data` (an Alibi-shaped document's) holds the exact values of `f` for every instance."""
    shap_values = np.array(data["shap_values"])  # [output][instance][feature]
    for n, x in enumerate(instances):
        phi, expected, prediction = shapley(f, np.array(x, dtype=np.float64), background)
        scale = max(1.0, float(np.abs(phi).max()))
        np.testing.assert_allclose(shap_values[:, n, :], phi, rtol=tolerance, atol=tolerance * scale)
        np.testing.assert_allclose(data["expected_value"], expected, rtol=tolerance, atol=tolerance * scale)
        np.testing.assert_allclose(data["raw"]["raw_prediction"][n], prediction, rtol=tolerance,
                                   atol=tolerance * scale)
        # Efficiency: the values add up to the prediction's distance from the mean answer.
        np.testing.assert_allclose(shap_values[:, n, :].sum(axis=1),
                                   np.array(data["raw"]["raw_prediction"][n]) - data["expected_value"],
                                   atol=1e-9 * scale)


def test_kernel_shap_equals_the_shapley_values_by_definition(served):
    url, sessions, _, background = served
    instances = [[6.8, 2.8, 4.8, 1.4], [5.1, 3.5, 1.4, 0.2]]
    for name in ("iris", "mlp"):
        status, answer = post(f"{url}/v1/models/{name}:explain", {"instances": instances})
        assert status == 200, answer
        assert answer["meta"]["name"] == "KernelShap" and answer["meta"]["explanations"] == ["local"]
        data = answer["data"]
        assert data["raw"]["exact"] is True and data["raw"]["coalitions"] == 14
        assert data["feature_names"] == [f"feature_{i}" for i in range(4)]
        assert np.array(data["shap_values"]).shape == (3, 2, 4)
        assert_explains(data, onnx_f(sessions[name], "probabilities"), instances, background)


def test_a_linear_model_s_values_are_its_closed_form(served):
    url, _, models, background = served
    x = np.array([6.1, 2.9, 4.7])
    status, answer = post(f"{url}/v1/models/linear:explain", {"instances": [x.tolist()]})
    assert status == 200, answer
    closed = models["linear"].coef_ * (x - background[:, :3].mean(axis=0))
    np.testing.assert_allclose(answer["data"]["shap_values"][0][0], closed, rtol=1e-5, atol=1e-5)


def test_tree_shap_reads_skl2onnx_ensembles_exactly(served):
    url, _, models, background = served
    instances = [[6.8, 2.8, 4.8, 1.4], [5.9, 3.0, 5.1, 1.8]]
    status, answer = post(f"{url}/v1/models/boosted:explain", {"instances": instances})
    assert status == 200, answer
    meta = answer["meta"]
    assert meta["name"] == "TreeShap" and meta["params"]["operator"] == "TreeEnsembleClassifier"
    assert meta["params"]["model_output"] == "margin" and meta["params"]["post_transform"] == "SOFTMAX"
    # The margin of each class: what scikit-learn's decision_function answers.
    assert_explains(answer["data"], models["boosted"].decision_function, instances, background, 1e-5)
    status, answer = post(f"{url}/v1/models/forest:explain", {"instances": [r[:3] for r in instances]})
    assert status == 200, answer
    assert answer["meta"]["params"]["operator"] == "TreeEnsembleRegressor"
    forest = models["forest"]
    assert_explains(answer["data"], lambda rows: forest.predict(rows.astype(np.float32))[:, None],
                    [r[:3] for r in instances], background[:, :3], 1e-5)


def boosters(root):
    """An XGBoost and a LightGBM model of the same six features (LightGBM with a categorical
    feature and zeros as missing values), each in a storage directory with background rows."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(600, 6))
    X[:, 4] = np.where(rng.random(600) < 0.3, 0.0, X[:, 4])
    X[:, 5] = rng.integers(0, 4, size=600)
    y = ((X[:, 0] + X[:, 1] * X[:, 2] > 0.2) ^ (X[:, 5] == 2)).astype(np.float64)
    xgb = xgboost.train({"objective": "binary:logistic", "max_depth": 3, "base_score": 0.3},
                        xgboost.DMatrix(X, label=y), num_boost_round=8)
    lgb = lightgbm.train({"objective": "binary", "num_leaves": 8, "zero_as_missing": True,
                          "min_data_per_group": 5, "cat_smooth": 1, "verbose": -1},
                         lightgbm.Dataset(X, label=y, categorical_feature=[5]), num_boost_round=8)
    background = X[:8]
    dirs = {}
    for name, save in (("xgb", lambda d: xgb.save_model(str(d / "model.json"))),
                       ("lgb", lambda d: lgb.save_model(str(d / "model.txt")))):
        d = root / name
        d.mkdir()
        save(d)
        (d / "background.json").write_text(json.dumps(background.tolist()))
        dirs[name] = d
    margins = {
        "xgb": lambda rows: xgb.predict(xgboost.DMatrix(rows), output_margin=True)[:, None],
        "lgb": lambda rows: lgb.predict(rows, raw_score=True)[:, None],
    }
    return dirs, margins, background, X[100:103]


def test_tree_shap_through_the_mesh_explains_the_revision_a_request_reaches(tmp_path):
    dirs, margins, background, instances = boosters(tmp_path)
    sink = Recorder(EventSink)
    spec = tmp_path / "isvc.yaml"
    spec.write_text(f"""
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: churn
spec:
  predictor:
    logger: {{mode: all, url: "http://{sink.address}/"}}
    model:
      modelFormat: {{name: xgboost}}
      storageUri: file://{dirs["xgb"]}
  canary:
    - trafficPercent: 0
      predictor:
        model:
          modelFormat: {{name: lightgbm}}
          storageUri: file://{dirs["lgb"]}
  explainer:
    timeout: 20
    treeShap: {{backgroundFile: background.json}}
""")
    up = MeshUp(spec, tmp_path / "state", BINARY, timeout_s=120)
    try:
        rows = instances.tolist()
        for pin, name in ((None, "xgb"), ("canary", "lgb")):
            headers = {"x-meshserve-revision": pin} if pin else {}
            status, answer = post(f"{up.url}/v1/models/churn:explain", {"instances": rows}, headers)
            assert status == 200, answer
            assert answer["meta"]["name"] == "TreeShap", answer["meta"]
            assert answer["meta"]["params"]["operator"] == "TreeEnsemble"
            assert_explains(answer["data"], margins[name], rows, background, 1e-5)
        # MLServer's V2 form: an inference request to `<model>-explainer`.
        body = {"inputs": [{"name": "x", "shape": [3, 6], "datatype": "FP64", "data": instances.ravel().tolist()}]}
        status, answer = post(f"{up.url}/v2/models/churn-explainer/infer", body)
        assert status == 200, answer
        [output] = answer["outputs"]
        assert (output["name"], output["datatype"]) == ("explanation", "BYTES")
        assert output["parameters"]["content_type"] == "str"
        assert_explains(json.loads(output["data"][0])["data"], margins["xgb"], rows, background, 1e-5)
        status, answer = post(f"{up.url}/v1/models/churn:explain", {"instances": [[1.0] * 5]})
        assert status == 400 and "has 5 features" in answer["error"], answer
        # Explain calls to the logged default revision are logged like predictions (the
        # canary has no logger): V1 twice (one answered 400), V2 once, request and response each.
        deadline = time.monotonic() + 20
        while len(sink.received) < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        events = sorted((h["ce-source"], h["ce-type"].rsplit(".", 1)[1], h["ce-component"])
                        for h, _ in sink.received)
        assert events == sorted([("/v1/models/churn:explain", kind, "explainer")
                                 for kind in ("request", "response")] * 2
                                + [("/v2/models/churn-explainer/infer", kind, "explainer")
                                   for kind in ("request", "response")]), events
    finally:
        up.stop()
        sink.stop()


def test_bad_explain_requests_are_named(served):
    url, _, _, _ = served
    status, answer = post(f"{url}/v1/models/plain:explain", {"instances": [[1, 2, 3, 4]]})
    assert status == 404 and "has no explainer" in answer["error"], answer
    status, answer = post(f"{url}/v1/models/iris:explain", {"instances": [[1, 2, 3]]})
    assert status == 400 and "has 3 features" in answer["error"], answer
    status, answer = post(f"{url}/v1/models/iris:explain", {"rows": []})
    assert status == 400 and "instances" in answer["error"], answer
    status, answer = post(f"{url}/v1/models/iris:explain", {"instances": [[1, 2, 3, 4]] * 17})
    assert status == 400 and "1 to 16" in answer["error"], answer
