"""Models in other frameworks' formats (docs/benchmarks.md, "Framework formats"):

1. V2 REST throughput at concurrency 16 (h2load, one row of 20 features per request), meshserve's
   sidecar serving the model file as is (converted to ONNX when it loads) against KServe's
   server for that framework on the same file (bench/kserve_framework_server.py: what
   sklearnserver, xgbserver and lgbserver do, on kserve 0.21), side by side, rounds interleaved:
   a 100-tree XGBoost classifier, a 100-tree LightGBM classifier and a scikit-learn pipeline
   (StandardScaler + LogisticRegression), all on 20 features.
2. Time from `meshserve serve --storage s3://...` to ready for each format: download and
   conversion on the first start, neither on a restart over the same objects; the sidecar's RSS
   once ready, against moto's S3 on loopback.

    .venv/bin/python bench/formats.py [--rounds 2] [--duration 5] [--runs 3]

Needs h2load (bash bench/run.sh installs it) and target/release/meshserve. Every process
started is stopped at the end.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import joblib
import lightgbm
import numpy as np
import xgboost
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from storage import BINARY, REPO, free_port, owned, rss_kib, time_to_ready  # noqa: E402

FEATURES = 20


def train(work):
    """The three models, each in its own directory as KServe's storage holds them."""
    X, y = make_classification(n_samples=5000, n_features=FEATURES, n_informative=12, random_state=0)
    dirs = {f: work / f for f in ("xgboost", "lightgbm", "sklearn")}
    for d in dirs.values():
        d.mkdir()
    booster = xgboost.train({"objective": "binary:logistic", "max_depth": 6, "nthread": 1},
                            xgboost.DMatrix(X, label=y), num_boost_round=100)
    booster.save_model(str(dirs["xgboost"] / "model.json"))
    lightgbm.train({"objective": "binary", "num_leaves": 31, "verbose": -1, "num_threads": 1},
                   lightgbm.Dataset(X, label=y), num_boost_round=100).save_model(str(dirs["lightgbm"] / "model.bst"))
    joblib.dump(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X, y),
                dirs["sklearn"] / "model.joblib")
    return dirs, X[:1]


class Proc:
    def __init__(self, argv, log, env=None):
        self.log = log
        self.process = subprocess.Popen(owned(argv), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                        env=dict(os.environ, NO_COLOR="1", **(env or {})), cwd=REPO)

    def stop(self):
        self.process.kill()
        self.process.wait()


def wait_ready(url, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        if proc.process.poll() is not None:
            raise SystemExit(f"{proc.log} exited:\n{Path(proc.log).read_text()[-2000:]}")
        time.sleep(0.1)
    raise SystemExit(f"not ready: {url}")


def start_meshserve(model_dir, fmt, work):
    log = work / f"meshserve-{fmt}.log"
    proc = Proc([BINARY, "serve", "--storage", model_dir, "--model-name", "m", "--model-format", fmt,
                 "--http-port", "0", "--grpc-port", "0", "--storage-cache", work / "cache"], log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"listening on http=(\S+)", Path(log).read_text())
        if found:
            wait_ready(f"http://{found.group(1)}/v2/health/ready", proc)
            return proc, f"http://{found.group(1)}/v2/models/m/infer"
        time.sleep(0.05)
    raise SystemExit(f"meshserve did not start:\n{Path(log).read_text()}")


def start_kserve(model_dir, fmt, work):
    port = free_port()
    file = next(p for p in model_dir.iterdir() if p.is_file())
    proc = Proc([REPO / ".venv" / "bin" / "python", REPO / "bench" / "kserve_framework_server.py",
                 "--bench-http-port", port, "--bench-format", fmt, "--bench-model", f"m={file}"],
                work / f"kserve-{fmt}.log")
    wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
    return proc, f"http://127.0.0.1:{port}/v2/models/m/infer"


def answer(url, body):
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=10).read())["outputs"][0]["data"]


def h2load(url, body_file, concurrency, duration):
    run = subprocess.run(["h2load", "--h1", "-t", "1", "-c", str(concurrency), "-m", "1", "-D", f"{duration}",
                          "--warm-up-time", "1", "-d", str(body_file), "-H", "content-type: application/json", url],
                         capture_output=True, text=True, timeout=duration + 60)
    out = run.stdout
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if run.returncode != 0 or not rate or not codes or int(codes.group(3)) + int(codes.group(4)):
        raise SystemExit(f"h2load failed against {url}:\n{out[-1500:]}{run.stderr[-500:]}")
    return float(rate.group(1))


def throughput(args, dirs, row, work):
    body = work / "row.json"
    body.write_text(json.dumps({"inputs": [{"name": "input-0", "shape": [1, FEATURES], "datatype": "FP32",
                                            "data": row.astype(np.float32).flatten().tolist()}]}))
    print("| model | KServe's server (req/s) | meshserve sidecar (req/s) | ratio | RSS KServe / meshserve |")
    print("|---|---|---|---|---|")
    names = {"xgboost": "XGBoost, 100 trees (xgbserver)", "lightgbm": "LightGBM, 100 trees (lgbserver)",
             "sklearn": "scikit-learn pipeline (sklearnserver)"}
    for fmt, model_dir in dirs.items():
        ours, our_url = start_meshserve(model_dir, fmt, work)
        theirs, their_url = start_kserve(model_dir, fmt, work)
        try:
            a, b = answer(our_url, body.read_bytes()), answer(their_url, body.read_bytes())
            assert np.allclose(a, b, rtol=1e-5), (fmt, a, b)
            rates = {"kserve": [], "meshserve": []}
            for _ in range(args.rounds):
                rates["kserve"].append(h2load(their_url, body, 16, args.duration))
                rates["meshserve"].append(h2load(our_url, body, 16, args.duration))
            k, m = statistics.median(rates["kserve"]), statistics.median(rates["meshserve"])
            print(f"| {names[fmt]} | {k:,.0f} | {m:,.0f} | {m / k:.1f}x"
                  f" | {rss_kib(theirs.process.pid) / 1024:.0f} / {rss_kib(ours.process.pid) / 1024:.0f} MiB |")
        finally:
            ours.stop()
            theirs.stop()


def readiness(args, dirs, work):
    port = free_port()
    server = subprocess.Popen(owned([REPO / ".venv" / "bin" / "moto_server", "-H", "127.0.0.1", "-p", port]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                          region_name="us-east-1")
        for _ in range(100):
            try:
                s3.create_bucket(Bucket="models")
                break
            except Exception:
                time.sleep(0.1)
        for fmt, model_dir in dirs.items():
            for file in model_dir.iterdir():
                s3.upload_file(str(file), "models", f"{fmt}/{file.name}")
        print()
        print("| model | file | ready: s3://, first (download + convert) | ready: s3://, restart (cached) | RSS when ready |")
        print("|---|---|---|---|---|")
        for fmt, model_dir in dirs.items():
            first, cached, rss = [], [], 0
            file = next(model_dir.iterdir())
            for run in range(args.runs):
                cache = work / f"ready-{fmt}-{run}"
                t, _, rss = time_to_ready(f"s3://models/{fmt}", env, cache)
                first.append(t)
                t, _, _ = time_to_ready(f"s3://models/{fmt}", env, cache)
                cached.append(t)
            med = lambda xs: statistics.median(xs) * 1000
            print(f"| {fmt} | {file.name}, {file.stat().st_size / 1e3:.0f} KB | {med(first):.0f} ms | {med(cached):.0f} ms"
                  f" | {rss / 1024:.0f} MiB |")
    finally:
        server.kill()
        server.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=5, help="seconds measured per h2load run")
    parser.add_argument("--runs", type=int, default=3, help="starts per format for the readiness table")
    args = parser.parse_args()
    if not shutil.which("h2load"):
        raise SystemExit("h2load is missing: apt-get install nghttp2-client (bash bench/run.sh does)")
    work = Path(tempfile.mkdtemp(prefix="meshserve-bench-formats-"))
    try:
        dirs, row = train(work)
        throughput(args, dirs, row, work)
        readiness(args, dirs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
