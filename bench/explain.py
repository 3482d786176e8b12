"""Built-in explainers against the Python reference (docs/benchmarks.md, "Explainers"):

1. KernelSHAP: one explanation of one row by `POST /v1/models/<m>:explain` on meshserve's
   sidecar against `shap.KernelExplainer` calling onnxruntime in-process on the same ONNX model,
   background and coalition budget (`nsamples`, `l1_reg=False`: the plain weighted least
   squares meshserve solves), on an MLP of 10 features (every coalition, exact) and scikit-learn's
   digits logistic regression (64 features, 2,048 sampled coalitions).
2. TreeSHAP: the same for a 100-tree XGBoost booster of 20 features (`model.json`, converted to
   ONNX by the sidecar) against `shap.TreeExplainer(booster, background,
   feature_perturbation="interventional", model_output="raw")` on the booster itself.
3. The sidecars' RSS once ready and after the explanations.

The two answers are compared first (largest difference printed). Latencies are medians of
--runs explanations, the two systems interleaved.

    .venv/bin/pip install shap && .venv/bin/python bench/explain.py [--runs 20]

Needs target/release/meshserve. Every process started is stopped at the end.
"""

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime
import shap
import xgboost
import yaml
from skl2onnx import to_onnx
from sklearn.datasets import load_digits, make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from formats import Proc, wait_ready  # noqa: E402
from storage import BINARY, rss_kib  # noqa: E402


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def started(argv, log):
    proc = Proc(argv, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"listening on http=(\S+)", Path(log).read_text())
        if found:
            url = f"http://{found.group(1)}"
            wait_ready(f"{url}/v2/health/ready", proc)
            return proc, url
        time.sleep(0.05)
    proc.stop()
    raise SystemExit(f"meshserve did not start:\n{Path(log).read_text()}")


def kernel_models(repo):
    """(name, ONNX session, background, instance, coalitions) for each KernelSHAP case."""
    X, y = make_classification(n_samples=2000, n_features=10, n_informative=6, random_state=0)
    mlp = MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=500, random_state=0).fit(X, y)
    digits = load_digits()
    lr = LogisticRegression(max_iter=2000).fit(digits.data, digits.target)
    cases = []
    for name, model, data, coalitions, rows in (("mlp10", mlp, X, 2 ** 10 - 2, 50),
                                                ("digits64", lr, digits.data, 2048, 20)):
        onnx = to_onnx(model, data[:1].astype(np.float32), options={id(model): {"zipmap": False}})
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(onnx.SerializeToString())
        background = data[:: len(data) // rows][:rows].astype(np.float64)
        (repo / name / "background.json").write_text(json.dumps(background.tolist()))
        (repo / name / "config.yaml").write_text(yaml.safe_dump(
            {"explainer": {"kernel_shap": {"background_file": "background.json", "max_coalitions": coalitions}}}))
        session = onnxruntime.InferenceSession(onnx.SerializeToString(), providers=["CPUExecutionProvider"])
        cases.append((name, session, background, data[-1].astype(np.float64), coalitions))
    return cases


def timed(f, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="meshserve-explain-bench-"))
    repo = work / "repository"
    cases = kernel_models(repo)

    rng = np.random.default_rng(0)
    X = rng.normal(size=(5000, 20))
    y = (X[:, 0] + X[:, 1] * X[:, 2] - X[:, 3] ** 2 > 0).astype(np.float64)
    booster = xgboost.train({"objective": "binary:logistic", "max_depth": 6, "nthread": 1},
                            xgboost.DMatrix(X, label=y), num_boost_round=100)
    tree_dir = work / "xgb"
    tree_dir.mkdir()
    booster.save_model(str(tree_dir / "model.json"))
    tree_background = X[:100]
    (tree_dir / "background.json").write_text(json.dumps(tree_background.tolist()))

    procs = []
    rows = []
    try:
        kernel, kernel_url = started([BINARY, "serve", "--model-repository", repo, "--http-port", "0",
                                      "--grpc-port", "0"], work / "kernel.log")
        procs.append(kernel)
        tree, tree_url = started([BINARY, "serve", "--storage", tree_dir, "--model-name", "xgb",
                                  "--model-format", "xgboost", "--storage-cache", work / "cache",
                                  "--explainer", json.dumps({"tree_shap": {"background_file": "background.json"}}),
                                  "--http-port", "0", "--grpc-port", "0"], work / "tree.log")
        procs.append(tree)
        ready_rss = {"kernel": rss_kib(kernel.process.pid), "tree": rss_kib(tree.process.pid)}

        for name, session, background, x, coalitions in cases:
            input_name = session.get_inputs()[0].name

            def f(rows, session=session, input_name=input_name):
                return session.run(["probabilities"], {input_name: rows.astype(np.float32)})[0]

            explainer = shap.KernelExplainer(f, background, link="identity")

            def reference(explainer=explainer, x=x, coalitions=coalitions):
                return explainer.shap_values(x[None, :], nsamples=coalitions, l1_reg=False, silent=True)

            def ours(name=name, x=x):
                return post(f"{kernel_url}/v1/models/{name}:explain", {"instances": [x.tolist()]})

            theirs, mine = np.asarray(reference()), ours()
            # shap answers [rows, features, outputs]; meshserve [outputs][rows][features].
            theirs = np.moveaxis(theirs.reshape(1, len(x), -1), 2, 0)
            gap = float(np.abs(theirs - np.array(mine["data"]["shap_values"])).max())
            a, b = [], []
            for _ in range(args.runs):
                a.append(timed(reference, 1))
                b.append(timed(ours, 1))
            rows.append((f"KernelSHAP, {name} ({len(x)} features, {len(background)} background rows, "
                         f"{coalitions} coalitions{', exact' if mine['data']['raw']['exact'] else ''})",
                         "shap.KernelExplainer + onnxruntime", statistics.median(a), statistics.median(b), gap))

        tree_explainer = shap.TreeExplainer(booster, data=tree_background, feature_perturbation="interventional",
                                            model_output="raw")
        x = X[-1]

        def tree_reference():
            return tree_explainer.shap_values(x[None, :], check_additivity=False)

        def tree_ours():
            return post(f"{tree_url}/v1/models/xgb:explain", {"instances": [x.tolist()]})

        theirs, mine = np.asarray(tree_reference()).reshape(-1), tree_ours()
        gap = float(np.abs(theirs - np.array(mine["data"]["shap_values"][0][0])).max())
        a, b = [], []
        for _ in range(args.runs):
            a.append(timed(tree_reference, 1))
            b.append(timed(tree_ours, 1))
        rows.append(("TreeSHAP, XGBoost 100 trees depth 6 (20 features, 100 background rows)",
                     "shap.TreeExplainer (interventional, C++)", statistics.median(a), statistics.median(b), gap))
        after_rss = {"kernel": rss_kib(kernel.process.pid), "tree": rss_kib(tree.process.pid)}
    finally:
        for proc in procs:
            proc.stop()

    print(f"shap {shap.__version__}, onnxruntime {onnxruntime.__version__}, xgboost {xgboost.__version__}, "
          f"median of {args.runs} explanations of one row\n")
    print("| explanation | reference | reference (ms) | meshserve, over HTTP (ms) | speed-up | largest difference |")
    print("|---|---|---|---|---|---|")
    for what, ref, theirs, ours, gap in rows:
        print(f"| {what} | {ref} | {theirs:.1f} | {ours:.2f} | {theirs / ours:.1f}x | {gap:.1e} |")
    print("\n| sidecar | RSS ready | RSS after the explanations |")
    print("|---|---|---|")
    for key, what in (("kernel", "KernelSHAP (two models)"), ("tree", "TreeSHAP (XGBoost)")):
        print(f"| {what} | {ready_rss[key] / 1024:.0f} MiB | {after_rss[key] / 1024:.0f} MiB |")


if __name__ == "__main__":
    main()
