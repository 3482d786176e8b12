"""Anchors and occlusion on this machine: iris anchors (one per class) and the demo CNN's
occlusion map, through a real `meshserve serve` (target/release/meshserve).

    .venv/bin/python bench/explain_rules.py
"""
import json, re, subprocess, tempfile, time, urllib.request, shutil
from pathlib import Path
import numpy as np, yaml
from sklearn import datasets
from sklearn.linear_model import LogisticRegression
from skl2onnx import to_onnx
X, y = datasets.load_iris(return_X_y=True)
m = LogisticRegression(max_iter=500).fit(X, y)
repo = Path(tempfile.mkdtemp()) / "repo"; (repo/"iris"/"1").mkdir(parents=True)
(repo/"iris"/"1"/"model.onnx").write_bytes(to_onnx(m, X[:1].astype(np.float32), options={id(m): {"zipmap": False}}).SerializeToString())
(repo/"iris"/"train.json").write_text(json.dumps(X.tolist()))
(repo/"iris"/"config.yaml").write_text(yaml.safe_dump({"explainer": {"anchors": {"background_file": "train.json"}}}))
shutil.copytree("models/repository/mnist_cnn", repo/"mnist_cnn")
cfg = repo/"mnist_cnn"/"config.yaml"
c = yaml.safe_load(cfg.read_text()) if cfg.exists() else {}
c = c or {}; c["explainer"] = {"occlusion": {"patch": 4}}
cfg.write_text(yaml.safe_dump(c))
p = subprocess.Popen(["target/release/meshserve", "serve", "--model-repository", str(repo), "--http-port", "0", "--grpc-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
addr=None
for line in p.stdout:
    mm = re.search(r"listening on http=(\S+)", line)
    if mm: addr = mm.group(1); break
def post(path, body):
    r = urllib.request.Request(f"http://{addr}{path}", json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        return json.loads(urllib.request.urlopen(r).read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())
try:
    for x in (X[0], X[60], X[120]):
        t = time.perf_counter(); a = post("/v1/models/iris:explain", {"instances": [x.tolist()]}); dt = time.perf_counter() - t
        d = a["data"]
        print(f"anchors iris class {d['raw']['prediction'][0]}: {d['anchor']} precision {d['precision']:.3f} "
              f"coverage {d['coverage']:.3f} model rows {d['raw']['num_preds']} {dt * 1000:.1f} ms")
    sample = json.loads(Path("models/samples/mnist_cnn_v2_request.json").read_text())
    body = {"inputs": [dict(sample["inputs"][0])]}
    ts=[]
    for _ in range(21):
        t = time.perf_counter(); a = post("/v2/models/mnist_cnn-explainer/infer", body); ts.append(time.perf_counter()-t)
    doc = json.loads(a["outputs"][0]["data"][0]) if "outputs" in a else a
    print("occlusion", doc.get("meta", {}).get("params"), doc.get("data", {}).get("target"), f"median {sorted(ts)[10]*1000:.1f} ms", doc.get("error"))
finally:
    p.terminate(); p.wait()
    shutil.rmtree(repo.parent, ignore_errors=True)
