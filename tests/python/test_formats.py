"""Models in scikit-learn's, XGBoost's and LightGBM's own formats, served as users have them.

Models are trained here with the real frameworks (scikit-learn's bundled iris and breast
cancer data), saved the way their users save them, and served by `meshserve serve --storage`,
which converts each to ONNX as it loads. Every answer is checked against the framework itself
on held-out rows, missing values included (trees keep the framework's comparison and missing
direction): the same labels, scores within 1e-5 relative. KServe's sample InferenceServices for
these frameworks run through `meshserve up` from an S3 server (moto's, with authentication on)
and answer KServe's sample inputs with the JSON KServe's servers give; bad artifacts and a wrong
credential get errors that name the file or the URI.

Runs in its own interpreter (see scripts/test.sh).
"""

import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import boto3
import joblib
import lightgbm
import numpy as np
import pytest
import xgboost
import yaml
from sklearn import datasets
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from conftest import MeshUp, Process, free_port, post_json

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("MESHSERVE_BIN", REPO_ROOT / "target" / "release" / "meshserve"))
RTOL = 1e-5
IRIS_SAMPLE = [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]


class Served:
    """`meshserve serve --storage DIR` of one model, until ready, or until it exits."""

    def __init__(self, storage, cache, extra=()):
        self.server = Process(
            [BINARY, "serve", "--storage", storage, "--model-name", "m", "--http-port", "0", "--grpc-port", "0",
             "--storage-cache", cache, *extra],
        )
        self.address = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.address is None:
            for line in list(self.server.lines):
                found = re.search(r"listening on http=(\S+)", line)
                if found and ready(found.group(1)):
                    self.address = found.group(1)
            if self.server.process.poll() is not None:
                break
            time.sleep(0.05)

    def text(self):
        return self.server.text()

    def exit_text(self):
        """The output of a server that was meant to refuse its storage."""
        self.server.process.wait(timeout=120)
        return self.server.text()

    def post(self, path, body):
        return post(f"http://{self.address}{path}", body)

    def v1(self, rows):
        return self.post("/v1/models/m:predict", {"instances": rows})

    def v2(self, rows, datatype="FP32"):
        rows = np.asarray(rows, dtype=np.float64)
        body = {"inputs": [{"name": "input-0", "shape": list(rows.shape), "datatype": datatype,
                            "data": rows.flatten().tolist()}]}
        return self.post("/v2/models/m/infer", body)

    def stop(self):
        self.server.stop()


def ready(address):
    try:
        return urllib.request.urlopen(f"http://{address}/v2/health/ready", timeout=1).status == 200
    except OSError:
        return False


post = post_json


@pytest.fixture()
def serve(tmp_path):
    """Serves a storage directory; stops every server when the test ends."""
    started = []

    def start(storage, extra=()):
        served = Served(storage, tmp_path / "cache", extra)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


def held_out(X, y, seed=0):
    """(train X, train y, test X) with a tenth of the test cells missing (NaN)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    cut = int(len(X) * 0.7)
    train, test = order[:cut], order[cut:]
    X_test = X[test].copy()
    X_test[rng.random(X_test.shape) < 0.1] = np.nan
    return X[train], y[train], X_test


def rows_with_nulls(X):
    """Rows for a V1 request: missing values as JSON null."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in X]


def check_close(answer, expected):
    expected = np.asarray(expected)
    got = np.asarray(answer, dtype=np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert np.allclose(got, expected, rtol=RTOL, atol=1e-7), np.max(np.abs(got - expected))


def answers_as_the_framework(served, rows, expected):
    """The served model's V1 answer to `rows` (NaN sent as null) is the framework's `expected`."""
    assert served.address, served.text()
    status, answer = served.v1(rows_with_nulls(rows))
    assert status == 200, answer
    check_close(answer["predictions"], expected)


IRIS = datasets.load_iris(return_X_y=True)
CANCER = datasets.load_breast_cancer(return_X_y=True)
DIABETES = datasets.load_diabetes(return_X_y=True)


def with_missing_in_training(X, seed=1):
    """Training data with missing values, so that trees learn where missing values go."""
    X = X.copy()
    X[np.random.default_rng(seed).random(X.shape) < 0.05] = np.nan
    return X


XGBOOST_CASES = {
    # name: (data, params, rounds, file name, how it is saved)
    "binary_logistic_json": (CANCER, {"objective": "binary:logistic", "max_depth": 4}, 30, "model.json", "json"),
    "softprob_ubj": (IRIS, {"objective": "multi:softprob", "num_class": 3, "max_depth": 3}, 20, "model.ubj", "ubj"),
    # KServe's sample: multi:softmax saved as model.bst (UBJSON since XGBoost 2.1).
    "softmax_bst": (IRIS, {"objective": "multi:softmax", "num_class": 10, "max_depth": 6, "eta": 0.1}, 10,
                    "model.bst", "ubj"),
    "regression_json_in_bst": (DIABETES, {"objective": "reg:squarederror", "max_depth": 5}, 40, "model.bst", "json"),
    "poisson_json": (DIABETES, {"objective": "count:poisson", "max_depth": 3}, 20, "model.json", "json"),
    "random_forest_json": (CANCER, {"objective": "binary:logistic", "num_parallel_tree": 8, "subsample": 0.8,
                                    "colsample_bynode": 0.8, "learning_rate": 1.0, "max_depth": 4}, 1, "model.json",
                           "json"),
    "rank_pairwise_ubj": (DIABETES, {"objective": "rank:pairwise", "max_depth": 3}, 10, "model.ubj", "ubj"),
    "dart_json": (CANCER, {"objective": "binary:logistic", "booster": "dart", "rate_drop": 0.2, "max_depth": 3},
                  15, "model.json", "json"),
}


@pytest.mark.parametrize("case", list(XGBOOST_CASES))
def test_xgboost_answers_equal_booster_predict(case, serve, tmp_path):
    (X, y), params, rounds, file, form = XGBOOST_CASES[case]
    X_train, y_train, X_test = held_out(with_missing_in_training(X), y)
    if params["objective"].split(":")[0] in ("reg", "count", "rank"):
        y_train = y_train / 100.0
    booster = xgboost.train(params, xgboost.DMatrix(X_train, label=y_train), num_boost_round=rounds)
    model_dir = tmp_path / case
    model_dir.mkdir()
    (model_dir / file).write_bytes(booster.save_raw(form))
    expected = booster.predict(xgboost.DMatrix(X_test))
    served = serve(model_dir, ["--model-format", "xgboost"])
    assert served.address, served.text()
    status, answer = served.v1(rows_with_nulls(X_test))
    assert status == 200, answer
    check_close(answer["predictions"], expected)
    status, answer = served.v2(X_test[~np.isnan(X_test).any(axis=1)])
    assert status == 200, answer
    [output] = answer["outputs"]
    assert (output["name"], output["datatype"]) == ("output-0", "FP32")
    complete = booster.predict(xgboost.DMatrix(X_test[~np.isnan(X_test).any(axis=1)]))
    assert output["shape"] == list(complete.shape)
    check_close(np.reshape(output["data"], complete.shape), complete)


@pytest.mark.parametrize("onehot", [1, 64], ids=["partition", "one_hot"])
def test_xgboost_categorical_splits_keep_their_categories(onehot, serve, tmp_path):
    rng = np.random.default_rng(4)
    n = 3000
    category = rng.integers(0, 30, n).astype(np.float64)
    X = np.column_stack([rng.normal(size=n), category])
    y = (np.isin(category, [1, 5, 7, 22]) ^ (X[:, 0] > 0.3)).astype(float)
    X[rng.random(n) < 0.05, 1] = np.nan
    train = xgboost.DMatrix(X[:2000], label=y[:2000], feature_types=["q", "c"], enable_categorical=True)
    booster = xgboost.train({"objective": "binary:logistic", "max_depth": 4, "max_cat_to_onehot": onehot},
                            train, num_boost_round=15)
    (tmp_path / "model.json").write_bytes(booster.save_raw("json"))
    test = X[2000:]
    test[:6, 1] = [-1, 31, 45, 0, 29, 2]
    expected = booster.predict(xgboost.DMatrix(test, feature_types=["q", "c"], enable_categorical=True))
    answers_as_the_framework(serve(tmp_path, ["--model-format", "xgboost"]), test, expected)


LIGHTGBM_CASES = {
    "binary_txt": (CANCER, {"objective": "binary", "num_leaves": 15}, 30, "model.txt"),
    "multiclass_bst": (IRIS, {"objective": "multiclass", "num_class": 3, "num_leaves": 7}, 25, "model.bst"),
    "regression_bst": (DIABETES, {"objective": "regression", "num_leaves": 31}, 40, "model.bst"),
    "multiclassova_txt": (IRIS, {"objective": "multiclassova", "num_class": 3, "num_leaves": 7}, 15, "model.txt"),
    "poisson_bst": (DIABETES, {"objective": "poisson", "num_leaves": 15}, 20, "model.bst"),
    "random_forest_txt": (CANCER, {"objective": "binary", "boosting": "rf", "bagging_freq": 1,
                                   "bagging_fraction": 0.7, "num_leaves": 15}, 10, "model.txt"),
}


@pytest.mark.parametrize("case", list(LIGHTGBM_CASES))
def test_lightgbm_answers_equal_booster_predict(case, serve, tmp_path):
    (X, y), params, rounds, file = LIGHTGBM_CASES[case]
    X_train, y_train, X_test = held_out(with_missing_in_training(X), y)
    booster = lightgbm.train(dict(params, verbose=-1), lightgbm.Dataset(X_train, label=y_train),
                             num_boost_round=rounds)
    model_dir = tmp_path / case
    model_dir.mkdir()
    booster.save_model(str(model_dir / file))
    expected = booster.predict(X_test)
    served = serve(model_dir, ["--model-format", "lightgbm"])
    assert served.address, served.text()
    status, answer = served.v1(rows_with_nulls(X_test))
    assert status == 200, answer
    check_close(answer["predictions"], expected)
    # FP32 rows are read as LightGBM reads them: widened to float64.
    rows = X_test[~np.isnan(X_test).any(axis=1)].astype(np.float32)
    status, answer = served.v2(rows)
    assert status == 200, answer
    [output] = answer["outputs"]
    complete = booster.predict(rows.astype(np.float64))
    assert (output["name"], output["datatype"], output["shape"]) == ("output-0", "FP64", list(complete.shape))
    check_close(np.reshape(output["data"], complete.shape), complete)


def test_a_model_of_leaves_only_answers_its_constant_whatever_the_input(serve, tmp_path):
    X = np.random.default_rng(6).normal(size=(200, 3))
    booster = lightgbm.train({"objective": "multiclass", "num_class": 3, "verbose": -1},
                             lightgbm.Dataset(X, label=np.zeros(200)), num_boost_round=3)
    booster.save_model(str(tmp_path / "model.txt"))
    served = serve(tmp_path)
    assert served.address, served.text()
    # A missing first feature and a huge one: the constant either way.
    status, answer = served.v1([[None, 1.0, 2.0], [1e308, 0.0, 0.0]])
    assert status == 200, answer
    check_close(answer["predictions"], booster.predict(np.array([[np.nan, 1.0, 2.0], [1e308, 0.0, 0.0]])))


def test_lightgbm_zero_as_missing_sends_zeros_and_nans_the_default_way(serve, tmp_path):
    rng = np.random.default_rng(5)
    n = 3000
    X = rng.normal(size=(n, 4))
    X[rng.random(X.shape) < 0.2] = 0.0
    y = X[:, 0] * 2 + (X[:, 1] == 0) * 3 + np.where(X[:, 2] > -0.2, 1.0, -1.0) + rng.normal(scale=0.1, size=n)
    booster = lightgbm.train({"objective": "regression", "num_leaves": 15, "zero_as_missing": True, "verbose": -1},
                             lightgbm.Dataset(X[:2000], label=y[:2000]), num_boost_round=20)
    assert any(int(d) & 12 == 4 for line in booster.model_to_string().splitlines()
               if line.startswith("decision_type=") for d in line.split("=")[1].split())
    booster.save_model(str(tmp_path / "model.txt"))
    test = X[2000:].copy()
    test[rng.random(test.shape) < 0.05] = np.nan
    answers_as_the_framework(serve(tmp_path, ["--model-format", "lightgbm"]), test, booster.predict(test))


def test_lightgbm_categorical_splits_keep_their_categories(serve, tmp_path):
    rng = np.random.default_rng(3)
    n = 3000
    category = rng.integers(0, 40, n).astype(np.float64)
    X = np.column_stack([rng.normal(size=n), category, rng.normal(size=n)])
    y = ((np.isin(category, [1, 5, 7, 33, 38]) ^ (X[:, 0] > 0.3)) | (X[:, 2] > 1.5)).astype(float)
    X[rng.random(n) < 0.05, 1] = np.nan
    booster = lightgbm.train({"objective": "binary", "num_leaves": 15, "verbose": -1, "min_data_per_group": 5,
                              "cat_smooth": 1}, lightgbm.Dataset(X[:2000], label=y[:2000], categorical_feature=[1]),
                             num_boost_round=20)
    assert "cat_threshold" in booster.model_to_string()
    booster.save_model(str(tmp_path / "model.txt"))
    test = X[2000:]
    # Categories never seen, and negative ones, go where LightGBM sends them too.
    test[:20, 1] = [-1, 45, 100, 39, 0, 2, 3, 4, 6, 8, 9, 10, 11, 12, 30, 31, 32, 34, 35, 36]
    answers_as_the_framework(serve(tmp_path, ["--model-format", "lightgbm"]), test, booster.predict(test))


def test_lightgbm_objects_name_features_as_kserve_reads_them(serve, tmp_path):
    X, y = IRIS
    names = ["sepal_length_(cm)", "sepal_width_(cm)", "petal_length_(cm)", "petal_width_(cm)"]
    booster = lightgbm.train({"objective": "multiclass", "num_class": 3, "verbose": -1},
                             lightgbm.Dataset(X, label=y, feature_name=names), num_boost_round=10)
    booster.save_model(str(tmp_path / "model.bst"))
    served = serve(tmp_path)
    assert served.address, served.text()
    # KServe's lightgbm sample input (a frame of columns), and its dict-of-index form in
    # another key order.
    sample = {"inputs": [{"sepal_length_(cm)": [5.1], "sepal_width_(cm)": [3.5], "petal_length_(cm)": [1.4],
                          "petal_width_(cm)": [0.2]}]}
    by_index = {"inputs": [{"sepal_width_(cm)": {"0": 3.5}, "petal_length_(cm)": {"0": 1.4},
                            "petal_width_(cm)": {"0": 0.2}, "sepal_length_(cm)": {"0": 5.1}}]}
    expected = booster.predict(np.array([[5.1, 3.5, 1.4, 0.2]]))
    for body in (sample, by_index):
        status, answer = served.post("/v1/models/m:predict", body)
        assert status == 200, answer
        check_close(answer["predictions"], expected)
    # V2 with one input per feature (KServe's content_type "pd").
    columns = {"parameters": {"content_type": "pd"}, "inputs": [
        {"name": n, "shape": [1], "datatype": "FP64", "data": [v]} for n, v in zip(names, [5.1, 3.5, 1.4, 0.2])]}
    status, answer = served.post("/v2/models/m/infer", columns)
    assert status == 200, answer
    check_close(np.reshape(answer["outputs"][0]["data"], (1, 3)), expected)


def sklearn_model(case):
    X, y = IRIS
    if case == "svc":
        return SVC(gamma="scale").fit(X, y), X
    if case == "pipeline_proba":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y), X
    if case == "string_labels":
        return SVC(gamma="scale").fit(X, np.array(["setosa", "versicolor", "virginica"])[y]), X
    Xd, yd = DIABETES
    return RandomForestRegressor(n_estimators=20, max_depth=6, random_state=0).fit(Xd, yd), Xd


@pytest.mark.parametrize("case, file, proba", [
    ("svc", "model.joblib", False),
    ("pipeline_proba", "model.pkl", True),
    ("string_labels", "model.pickle", False),
    ("forest_regressor", "model.joblib", False),
])
def test_sklearn_answers_equal_the_estimator(case, file, proba, serve, tmp_path):
    model, X = sklearn_model(case)
    joblib.dump(model, tmp_path / file)
    rows = X[::7]
    served = serve(tmp_path, ["--model-format", "sklearn"] + (["--predict-proba"] if proba else []))
    assert served.address, served.text()
    expected = model.predict_proba(rows) if proba else model.predict(rows)
    status, answer = served.v1(rows.tolist())
    assert status == 200, answer
    if expected.dtype.kind in "iUO":
        assert answer["predictions"] == expected.tolist()
    else:
        check_close(answer["predictions"], expected)
    status, answer = served.v2(rows)
    assert status == 200, answer
    [output] = answer["outputs"]
    datatype = {"i": "INT64", "f": "FP64", "U": "BYTES"}[expected.dtype.kind]
    assert (output["name"], output["datatype"], output["shape"]) == ("output-0", datatype, list(expected.shape))
    if datatype == "FP64":
        check_close(np.reshape(output["data"], expected.shape), expected)
    else:
        assert output["data"] == expected.flatten().tolist()


def test_a_pickle_from_an_older_scikit_learn_serves_and_says_so(serve, tmp_path):
    # Pickled by scikit-learn 1.5.2, KServe 0.21's pin (tests/fixtures/make_old_sklearn_pickle.py).
    fixture = REPO_ROOT / "tests" / "fixtures" / "sklearn-1.5.2-iris-pipeline.joblib"
    (tmp_path / "model.joblib").write_bytes(fixture.read_bytes())
    served = serve(tmp_path, ["--model-format", "sklearn"])
    assert served.address, served.text()
    assert "InconsistentVersionWarning" in served.text() or "1.5.2" in served.text(), served.text()
    model = joblib.load(fixture)
    rows = IRIS[0][::5]
    status, answer = served.v1(rows.tolist())
    assert status == 200 and answer["predictions"] == model.predict(rows).tolist(), answer


def test_a_restart_converts_nothing_and_a_changed_file_converts_again(serve, tmp_path):
    model, _ = sklearn_model("svc")
    joblib.dump(model, tmp_path / "model.joblib")
    first = serve(tmp_path)
    assert first.address and "converted " in first.text(), first.text()
    first.stop()
    again = serve(tmp_path)
    assert again.address and "converted before" in again.text(), again.text()
    again.stop()
    joblib.dump(make_pipeline(StandardScaler(), SVC()).fit(*IRIS), tmp_path / "model.joblib")
    changed = serve(tmp_path)
    assert changed.address and "converted before" not in changed.text(), changed.text()
    leftovers = [p.name for p in (tmp_path / "cache" / "converted").iterdir() if "partial" in p.name]
    assert not leftovers, leftovers


def test_bad_artifacts_are_named_and_nothing_is_served(serve, tmp_path):
    X, y = IRIS
    booster = xgboost.train({"objective": "multi:softprob", "num_class": 3}, xgboost.DMatrix(X, label=y), 3)
    cases = {
        "two": ({"model.json": booster.save_raw("json"), "other.ubj": booster.save_raw("ubj")},
                ["2 model files", "model.json", "other.ubj"]),
        "corrupt_pickle": ({"model.joblib": b"\x80\x04 not really a pickle"}, ["model.joblib", "cannot load the pickle"]),
        "truncated_json": ({"model.json": bytes(booster.save_raw("json"))[:5000]}, ["model.json", "not XGBoost JSON"]),
        "truncated_ubj": ({"model.ubj": bytes(booster.save_raw("ubj"))[:5000]}, ["model.ubj", "truncated"]),
        "not_lightgbm": ({"model.txt": b"tree\nversion=v4\nnum_class=1\n\nTree=0\nnum_leaves=3\n"},
                         ["model.txt", "truncated"]),
    }
    for name, (files, says) in cases.items():
        model_dir = tmp_path / name
        model_dir.mkdir()
        for file, data in files.items():
            (model_dir / file).write_bytes(data)
        served = serve(model_dir)
        text = served.exit_text()
        assert served.address is None and served.server.process.returncode != 0, text
        for word in says:
            assert word in text, f"{name}: {word!r} not in:\n{text}"
    # An isvc's format decides which files count: a LightGBM directory has no XGBoost file.
    served = serve(tmp_path / "not_lightgbm", ["--model-format", "xgboost"])
    assert "no xgboost model file" in served.exit_text()


# KServe's sample InferenceServices (docs/samples/v1beta1/{sklearn,xgboost,lightgbm} and the
# website's v2 pages), as written but for the bucket.
SAMPLES_V1 = """\
apiVersion: "serving.kserve.io/v1beta1"
kind: "InferenceService"
metadata:
  name: "sklearn-iris"
spec:
  predictor:
    sklearn:
      storageUri: "s3://kfserving-examples/models/sklearn/1.0/model"
---
apiVersion: "serving.kserve.io/v1beta1"
kind: "InferenceService"
metadata:
  name: "xgboost-iris"
spec:
  predictor:
    xgboost:
      protocolVersion: "v2"
      storageUri: "s3://kfserving-examples/models/xgboost/iris"
---
apiVersion: "serving.kserve.io/v1beta1"
kind: "InferenceService"
metadata:
  name: "lightgbm-iris"
spec:
  predictor:
    lightgbm:
      storageUri: "s3://kfserving-examples/models/lightgbm/iris"
"""

SAMPLES_V2 = """\
apiVersion: "serving.kserve.io/v1beta1"
kind: "InferenceService"
metadata:
  name: "sklearn-iris"
spec:
  predictor:
    model:
      modelFormat:
        name: sklearn
      protocolVersion: v2
      runtime: kserve-sklearnserver
      storageUri: "s3://kfserving-examples/models/sklearn/1.0/model"
---
apiVersion: "serving.kserve.io/v1beta1"
kind: "InferenceService"
metadata:
  name: "lightgbm-iris"
spec:
  predictor:
    model:
      modelFormat:
        name: lightgbm
      protocolVersion: v2
      runtime: kserve-lgbserver
      storageUri: "s3://kfserving-examples/models/lightgbm/v2/iris"
"""

SAMPLE_V2_INPUT = {"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP32", "data": IRIS_SAMPLE}]}
LIGHTGBM_V1_INPUT = {"inputs": [{"sepal_length_(cm)": [5.1], "sepal_width_(cm)": [3.5], "petal_length_(cm)": [1.4],
                                 "petal_width_(cm)": [0.2]}]}
USER = "models-reader"


def wait_port(port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"port {port} did not open within {timeout} s")


@pytest.fixture(scope="module")
def kserve_bucket(tmp_path_factory):
    """moto's S3 with authentication on after the first three calls (an IAM user, its key and
    its policy), holding the sample models as KServe's buckets do: the sklearn iris SVC
    (model.joblib), the XGBoost iris booster (model.bst) and the LightGBM iris booster with
    named features (model.bst). Yields (environment with the user's key, the models)."""
    port = free_port()
    server = Process([REPO_ROOT / ".venv" / "bin" / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                     env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        wait_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName=USER)
        key = iam.create_access_key(UserName=USER)["AccessKey"]
        iam.put_user_policy(UserName=USER, PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        s3.create_bucket(Bucket="kfserving-examples")
        root = tmp_path_factory.mktemp("samples")
        X, y = IRIS
        svc = SVC(gamma="scale").fit(X, y)
        joblib.dump(svc, root / "model.joblib")
        xgb = xgboost.train({"max_depth": 6, "eta": 0.1, "num_class": 10, "objective": "multi:softmax"},
                            xgboost.DMatrix(X, label=y))
        (root / "xgb.bst").write_bytes(xgb.save_raw("ubj"))
        names = ["sepal_length_(cm)", "sepal_width_(cm)", "petal_length_(cm)", "petal_width_(cm)"]
        lgb = lightgbm.train({"objective": "multiclass", "metric": "softmax", "num_class": 3, "verbose": -1},
                             lightgbm.Dataset(X, label=y, feature_name=names))
        lgb.save_model(str(root / "lgb.bst"))
        s3.create_bucket(Bucket="example-models")
        s3.upload_file(str(root / "model.joblib"), "example-models", "sklearn/model.joblib")
        for file, key_name in [("model.joblib", "models/sklearn/1.0/model/model.joblib"),
                               ("xgb.bst", "models/xgboost/iris/model.bst"),
                               ("lgb.bst", "models/lightgbm/iris/model.bst"),
                               ("lgb.bst", "models/lightgbm/v2/iris/model.bst")]:
            s3.upload_file(str(root / file), "kfserving-examples", key_name)
        yield env, {"sklearn": svc, "xgboost": xgb, "lightgbm": lgb}
    finally:
        server.stop()


def up_with(kserve_bucket, tmp_path, spec, name):
    env, _ = kserve_bucket
    path = tmp_path / f"{name}.yaml"
    path.write_text(spec)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return MeshUp(path, tmp_path / f"{name}-state", BINARY, timeout_s=120)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def v2_output(result):
    """What KServe's servers answer for a numpy result on V2 (kserve.utils.get_predict_response)."""
    datatype = {"int64": "INT64", "float32": "FP32", "float64": "FP64"}[str(result.dtype)]
    return {"name": "output-0", "shape": list(result.shape), "datatype": datatype, "data": result.flatten().tolist()}


def test_kserve_samples_run_through_meshserve_up_from_s3(kserve_bucket, tmp_path):
    _, models = kserve_bucket
    rows = np.array(IRIS_SAMPLE)
    mesh = up_with(kserve_bucket, tmp_path, SAMPLES_V1, "v1")
    try:
        status, answer = post(f"{mesh.url}/v1/models/sklearn-iris:predict", {"instances": IRIS_SAMPLE})
        assert (status, answer) == (200, {"predictions": [1, 1]}), answer
        status, answer = post(f"{mesh.url}/v2/models/xgboost-iris/infer", SAMPLE_V2_INPUT)
        assert status == 200, answer
        expected = v2_output(models["xgboost"].predict(xgboost.DMatrix(rows)))
        assert answer["outputs"] == [expected] and expected["data"] == [1.0, 1.0]
        status, answer = post(f"{mesh.url}/v1/models/lightgbm-iris:predict", LIGHTGBM_V1_INPUT)
        assert status == 200, answer
        expected = models["lightgbm"].predict(np.array([[5.1, 3.5, 1.4, 0.2]]))
        check_close(answer["predictions"], expected)
        assert np.argmax(answer["predictions"][0]) == 0
    finally:
        mesh.stop()
    mesh = up_with(kserve_bucket, tmp_path, SAMPLES_V2, "v2")
    try:
        status, answer = post(f"{mesh.url}/v2/models/sklearn-iris/infer", SAMPLE_V2_INPUT)
        assert status == 200 and answer["outputs"] == [v2_output(models["sklearn"].predict(rows))], answer
        assert answer["outputs"][0]["data"] == [1, 1]
        status, answer = post(f"{mesh.url}/v2/models/lightgbm-iris/infer", SAMPLE_V2_INPUT)
        assert status == 200, answer
        expected = v2_output(models["lightgbm"].predict(rows.astype(np.float32).astype(np.float64)))
        [output] = answer["outputs"]
        assert {k: output[k] for k in ("name", "shape", "datatype")} == {k: expected[k] for k in ("name", "shape", "datatype")}
        check_close(output["data"], expected["data"])
    finally:
        mesh.stop()


# KServe's docs/samples/storage/storageSpec/sklearn_storagespec.yaml, as written.
STORAGE_SPEC_SAMPLE = """\
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: example-sklearn-isvc
spec:
  predictor:
    sklearn:
      storage:
        key: localMinIO
        path: sklearn
        # schemaPath: null
        parameters:
          bucket: example-models
"""


def test_kserves_storage_spec_sample_runs_and_renders_the_secret(kserve_bucket, tmp_path, monkeypatch):
    env, _ = kserve_bucket
    # The storage-config secret's entry, as KServe's common_secret.yaml writes it (here with
    # the test's S3 and the user's key); `up` reads it from $STORAGE_CONFIG.
    entry = {"type": "s3", "access_key_id": env["AWS_ACCESS_KEY_ID"], "secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
             "endpoint_url": env["AWS_ENDPOINT_URL"], "bucket": "mlpipeline", "region": "us-south"}
    monkeypatch.setenv("STORAGE_CONFIG", json.dumps(entry))
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    spec = tmp_path / "storagespec.yaml"
    spec.write_text(STORAGE_SPEC_SAMPLE)
    mesh = MeshUp(spec, tmp_path / "state", BINARY, timeout_s=120)
    try:
        status, answer = post(f"{mesh.url}/v1/models/example-sklearn-isvc:predict", {"instances": IRIS_SAMPLE})
        assert (status, answer) == (200, {"predictions": [1, 1]}), answer
    finally:
        mesh.stop()
    assert env["AWS_SECRET_ACCESS_KEY"] not in "".join(mesh.lines)
    out = tmp_path / "rendered"
    subprocess.run([BINARY, "render", spec, "--out", out], check=True, capture_output=True)
    deployment = next(d for d in yaml.safe_load_all((out / "kubernetes" / "example-sklearn-isvc.yaml").read_text())
                      if d and d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--storage-spec-path") + 1] == "sklearn"
    assert args[args.index("--model-format") + 1] == "sklearn"
    env_vars = {e["name"]: e for e in container["env"]}
    assert env_vars["STORAGE_CONFIG"]["valueFrom"] == {"secretKeyRef": {"name": "storage-config", "key": "localMinIO"}}
    assert json.loads(env_vars["STORAGE_OVERRIDE_CONFIG"]["value"]) == {"bucket": "example-models"}


def test_a_wrong_credential_is_refused_and_never_shown(kserve_bucket, tmp_path):
    env, _ = kserve_bucket
    wrong = dict(env, AWS_SECRET_ACCESS_KEY="not-the-secret-0123456789")
    server = Process([BINARY, "serve", "--storage", "s3://kfserving-examples/models/xgboost/iris", "--model-name", "m",
                      "--http-port", "0", "--grpc-port", "0", "--storage-cache", tmp_path / "cache"], env=wrong)
    try:
        server.process.wait(timeout=180)
        text = server.text()
        assert server.process.returncode != 0, text
        assert "s3://kfserving-examples/models/xgboost/iris" in text and "403" in text, text
        assert "not-the-secret" not in text and env["AWS_SECRET_ACCESS_KEY"] not in text, text
    finally:
        server.stop()
