"""The sidecar's built-in KernelSHAP explainer, `POST /v1/models/<m>:explain`, on a real model.

A scikit-learn logistic regression trained here on iris, exported with skl2onnx, served by
`meshserve serve` from a repository whose config.yaml gives it the explainer and ten background
rows. Its Shapley values must equal the ones computed here by their definition (every coalition,
the factorial weights, the interventional value function over the same background) with Python
onnxruntime running the same file, for every class; `expected_value` the model's mean answer
over the background; and bad requests get a clear 400 or 404.
"""

import itertools
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import yaml
from skl2onnx import to_onnx
from sklearn import datasets
from sklearn.linear_model import LogisticRegression

from conftest import Process, post_json

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("MESHSERVE_BIN", REPO_ROOT / "target" / "release" / "meshserve"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    X, y = datasets.load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(X, y)
    onnx = to_onnx(model, X[:1].astype(np.float32), options={id(model): {"zipmap": False}})
    repo = tmp_path_factory.mktemp("repository")
    for name, explained in (("iris", True), ("plain", False)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(onnx.SerializeToString())
    background = X[::15][:10]
    (repo / "iris" / "background.json").write_text(json.dumps(background.tolist()))
    (repo / "iris" / "config.yaml").write_text(yaml.safe_dump(
        {"explainer": {"kernel_shap": {"background_file": "background.json"}}}))
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
    session = onnxruntime.InferenceSession(onnx.SerializeToString(), providers=["CPUExecutionProvider"])
    try:
        yield f"http://{address}", session, background
    finally:
        server.stop()


post = post_json


def shapley(session, x, background):
    """Every class's Shapley values by their definition."""
    m = len(x)

    def f(rows):
        return session.run(["probabilities"], {session.get_inputs()[0].name: rows.astype(np.float32)})[0]

    def v(coalition):
        rows = background.copy()
        rows[:, list(coalition)] = x[list(coalition)]
        return f(rows).astype(np.float64).mean(axis=0)

    phi = np.zeros((3, m))
    for i in range(m):
        rest = [j for j in range(m) if j != i]
        for size in range(m):
            weight = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
            for s in itertools.combinations(rest, size):
                phi[:, i] += weight * (v(s + (i,)) - v(s))
    return phi, f(background).astype(np.float64).mean(axis=0), f(x[None, :])[0]


def test_kernel_shap_equals_the_shapley_values_by_definition(served):
    url, session, background = served
    instances = [[6.8, 2.8, 4.8, 1.4], [5.1, 3.5, 1.4, 0.2]]
    status, answer = post(f"{url}/v1/models/iris:explain", {"instances": instances})
    assert status == 200, answer
    assert answer["meta"]["name"] == "KernelShap" and answer["meta"]["explanations"] == ["local"]
    data = answer["data"]
    assert data["raw"]["exact"] is True and data["raw"]["coalitions"] == 14
    assert data["feature_names"] == [f"feature_{i}" for i in range(4)]
    shap_values = np.array(data["shap_values"])  # [class][instance][feature]
    assert shap_values.shape == (3, 2, 4)
    for n, x in enumerate(instances):
        phi, expected, prediction = shapley(session, np.array(x), background)
        np.testing.assert_allclose(shap_values[:, n, :], phi, atol=1e-6)
        np.testing.assert_allclose(data["expected_value"], expected, atol=1e-6)
        np.testing.assert_allclose(data["raw"]["raw_prediction"][n], prediction, atol=1e-6)
        # Efficiency: the values add up to the prediction's distance from the mean answer.
        np.testing.assert_allclose(shap_values[:, n, :].sum(axis=1), prediction - expected, atol=1e-6)


def test_bad_explain_requests_are_named(served):
    url, _, _ = served
    status, answer = post(f"{url}/v1/models/plain:explain", {"instances": [[1, 2, 3, 4]]})
    assert status == 404 and "has no explainer" in answer["error"], answer
    status, answer = post(f"{url}/v1/models/iris:explain", {"instances": [[1, 2, 3]]})
    assert status == 400 and "has 3 features" in answer["error"], answer
    status, answer = post(f"{url}/v1/models/iris:explain", {"rows": []})
    assert status == 400 and "instances" in answer["error"], answer
    status, answer = post(f"{url}/v1/models/iris:explain", {"instances": [[1, 2, 3, 4]] * 17})
    assert status == 400 and "1 to 16" in answer["error"], answer
