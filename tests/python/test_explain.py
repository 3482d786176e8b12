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

import base64
import io

import lightgbm
import numpy as np
import onnx
import onnxruntime
import pytest
import xgboost
import yaml
from skl2onnx import to_onnx
from sklearn import datasets
from sklearn.ensemble import GradientBoostingClassifier, RandomForestRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.tree import DecisionTreeClassifier

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
    # Anchors: a rule model on uniform features, and the iris classifier on its own data.
    rng = np.random.default_rng(3)
    uniform = rng.uniform(size=(2000, 4))
    rule = DecisionTreeClassifier(max_depth=2, random_state=0).fit(uniform, (uniform[:, 0] > 0.5).astype(int))
    for name, model, rows in (("rule", rule, uniform[:500]), ("iris_anchors", models["iris"][0], X)):
        write_model(repo / name, onnx_of(model, rows).SerializeToString(), rows,
                    {"anchors": {"background_file": "background.json"}})
        sessions[name] = session_of(repo / name)
    (repo / "region" / "1").mkdir(parents=True)
    (repo / "region" / "1" / "model.onnx").write_bytes(region_model().SerializeToString())
    (repo / "region" / "config.yaml").write_text(yaml.safe_dump({"explainer": {"occlusion": {"patch": 4}}}))
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


def write_model(directory, onnx_bytes, background, explainer):
    (directory / "1").mkdir(parents=True)
    (directory / "1" / "model.onnx").write_bytes(onnx_bytes)
    (directory / "background.json").write_text(json.dumps(np.asarray(background).tolist()))
    (directory / "config.yaml").write_text(yaml.safe_dump({"explainer": explainer}))


def session_of(directory):
    return onnxruntime.InferenceSession(str(directory / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


REGION = (slice(4, 12), slice(16, 24))


def region_model():
    """An image model `[n, 1, 28, 28] -> [n, 2]` whose scores are `[s, -s]`, `s` the sum of
    the pixels in rows 4..12, columns 16..24: it looks at that region only."""
    from onnx import TensorProto, helper, numpy_helper

    mask = np.zeros((28, 28), dtype=np.float32)
    mask[REGION] = 1.0
    weights = np.stack([mask.ravel(), -mask.ravel()], axis=1)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["scores"])],
        "region",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 28, 28])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def assert_all_the_mass_in_the_region(heat_map, inside):
    heat = np.array(heat_map)
    assert heat.shape == (28, 28)
    expected = np.zeros((28, 28))
    expected[REGION] = inside
    np.testing.assert_allclose(heat, expected, atol=1e-4)


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


def holds(anchor, rows):
    """Which rows the anchor's rule holds for, read from its structured conditions."""
    keep = np.ones(len(rows), dtype=bool)
    for c in anchor["raw"]["conditions"]:
        column = rows[:, c["feature"]]
        if c.get("lower") is not None:
            keep &= column > c["lower"]
        if c.get("upper") is not None:
            keep &= column <= c["upper"]
        if "equals" in c:
            keep &= column == c["equals"]
    return keep


def conditioned(anchor, data, n, rng):
    """`n` fresh rows under the anchor's rule, drawn with the test's own generator: rows of
    the data the rule holds for, each jittered by half the data's 0.1 cm resolution, kept
    while the rule still holds for them."""
    under = data[holds(anchor, data)]
    rows = under[rng.integers(len(under), size=4 * n)] + rng.normal(scale=0.05, size=(4 * n, data.shape[1]))
    return rows[holds(anchor, rows)][:n]


def label(session, rows):
    return session.run(None, {session.get_inputs()[0].name: rows.astype(np.float32)})[0].ravel()


def test_anchors_name_the_rule_and_hold_their_precision_on_fresh_samples(served):
    url, sessions, _, _ = served
    rng = np.random.default_rng(11)
    # f = 1[x0 > 0.5]: the rule is x0's bin and nothing else.
    status, answer = post(f"{url}/v1/models/rule:explain", {"instances": [[0.8, 0.3, 0.6, 0.1]]})
    assert status == 200, answer
    assert answer["meta"]["name"] == "AnchorTabular"
    assert answer["meta"]["params"]["threshold"] == 0.95
    data = answer["data"]
    assert data["raw"]["feature"] == [0], data
    assert data["anchor"][0].startswith("feature_0 > 0.7"), data["anchor"]
    assert data["precision"] >= 0.95 and data["raw"]["success"] is True
    uniform = np.random.default_rng(3).uniform(size=(2000, 4))[:500]
    np.testing.assert_allclose(data["coverage"], (uniform[:, 0] > data["raw"]["conditions"][0]["lower"]).mean())
    fresh = rng.uniform(size=(4000, 4))
    fresh = fresh[holds(data, fresh)]
    assert len(fresh) > 500 and (label(sessions["rule"], fresh) == 1).mean() == 1.0
    # The iris classifier: each class's anchor, re-estimated on 2,000 fresh samples.
    X, _ = datasets.load_iris(return_X_y=True)
    for x in (X[0], X[60], X[120]):
        status, answer = post(f"{url}/v1/models/iris_anchors:explain", {"instances": [x.tolist()]})
        assert status == 200, answer
        data = answer["data"]
        assert data["raw"]["success"], data
        assert 1 <= len(data["anchor"]) <= 4 and 0 < data["coverage"] <= 1
        predicted = label(sessions["iris_anchors"], x[None, :])[0]
        assert data["raw"]["prediction"] == [predicted]
        rows = conditioned(data, X, 2000, rng)
        assert len(rows) >= 1000
        precision = (label(sessions["iris_anchors"], rows) == predicted).mean()
        assert precision >= 0.95, (precision, data["anchor"])
    # Alibi explains one instance per call; so do anchors here.
    status, answer = post(f"{url}/v1/models/rule:explain", {"instances": [[0.8, 0.3, 0.6, 0.1]] * 2})
    assert status == 400 and "one instance per request" in answer["error"], answer


def test_occlusion_puts_all_the_mass_where_the_model_looks(served):
    url, _, _, _ = served
    image = np.ones((1, 28, 28))
    status, answer = post(f"{url}/v1/models/region:explain", {"instances": [image.tolist()]})
    assert status == 200, answer
    assert answer["meta"]["name"] == "Occlusion"
    assert answer["meta"]["params"]["windows"] == 49 and answer["meta"]["params"]["layout"] == "nchw"
    assert answer["data"]["target"] == [0]
    # Each 4x4 window inside the region takes 16 ones off the score.
    assert_all_the_mass_in_the_region(answer["data"]["attributions"][0], 16.0)
    # V2, two images, the other score asked for.
    body = {"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32",
                        "data": np.concatenate([image, 2 * image]).ravel().tolist()}],
            "parameters": {"target": 1}}
    status, answer = post(f"{url}/v2/models/region-explainer/infer", body)
    assert status == 200, answer
    document = json.loads(answer["outputs"][0]["data"][0])
    assert document["data"]["target"] == [1, 1]
    assert_all_the_mass_in_the_region(document["data"]["attributions"][0], -16.0)
    assert_all_the_mass_in_the_region(document["data"]["attributions"][1], -32.0)
    status, answer = post(f"{url}/v1/models/region:explain", {"instances": [np.ones((1, 27, 28)).tolist()]})
    assert status == 400 and "[1, 28, 28]" in answer["error"], answer


def test_a_photo_sent_to_explain_is_pre_processed_by_the_transformer_first(tmp_path):
    from PIL import Image

    storage = tmp_path / "region"
    (storage / "1").mkdir(parents=True)
    (storage / "1" / "model.onnx").write_bytes(region_model().SerializeToString())
    pipeline = {"request": {"field": "image", "steps": [
        "base64_decode", "image_decode", {"color": "grayscale"},
        {"resize": {"width": 28, "height": 28, "method": "area"}},
        {"scale": 1 / 255}, {"layout": "nchw"}, {"emit": {"input": "input"}}]},
        "response": {"steps": [{"argmax": {}}]}}
    spec = tmp_path / "isvc.yaml"
    spec.write_text(
        "apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\nmetadata: {name: region}\n"
        f"spec:\n  predictor: {{model: {{modelFormat: {{name: onnx}}, storageUri: 'file://{storage}'}}}}\n"
        f"  transformer: {json.dumps(pipeline)}\n"
        "  explainer: {occlusion: {patch: 4}}\n")
    # A white 56x56 photo: after the pipeline, a 28x28 tensor of ones.
    out = io.BytesIO()
    Image.new("L", (56, 56), 255).save(out, "PNG")
    photo = base64.b64encode(out.getvalue()).decode()
    up = MeshUp(spec, tmp_path / "state", BINARY, timeout_s=120)
    try:
        status, answer = post(f"{up.url}/v1/models/region:predict", {"instances": [{"image": {"b64": photo}}]})
        assert (status, answer) == (200, {"predictions": [0]}), answer
        status, answer = post(f"{up.url}/v1/models/region:explain", {"instances": [{"image": {"b64": photo}}]})
        assert status == 200, answer
        assert answer["meta"]["name"] == "Occlusion", answer
        assert_all_the_mass_in_the_region(answer["data"]["attributions"][0], 16.0)
        # The V2 form takes the photo too, and answers the explainer's own V2 response.
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [photo]}]}
        status, answer = post(f"{up.url}/v2/models/region-explainer/infer", body)
        assert status == 200, answer
        assert answer["outputs"][0]["name"] == "explanation"
        assert_all_the_mass_in_the_region(json.loads(answer["outputs"][0]["data"][0])["data"]["attributions"][0], 16.0)
        status, answer = post(f"{up.url}/v1/models/region:explain", {"instances": [{"image": "!!"}]})
        assert status == 400 and answer["error"].startswith("transformer: "), answer
        # gRPC ModelInfer to `region-explainer` (MLServer's form; gRPC passes the transformer
        # untouched, so it carries the model's tensor).
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(up.url.removeprefix("http://"))
        try:
            tensor = grpcclient.InferInput("input", [1, 1, 28, 28], "FP32")
            tensor.set_data_from_numpy(np.full((1, 1, 28, 28), 2.0, dtype=np.float32))
            result = client.infer("region-explainer", [tensor])
            [document] = result.as_numpy("explanation")
            assert_all_the_mass_in_the_region(json.loads(document)["data"]["attributions"][0], 32.0)
        finally:
            client.close()
    finally:
        up.stop()
