"""The model cache's cost: how much longer a request takes when its model is not in memory
(a cache miss: the request waits for the load) than when it is, per MB of model.

One sidecar, `--load-on-demand --model-idle-unload-secs 1`, a repository of MatMul models
with float weights of 1, 16 and 64 MiB generated here (onnx.helper). For each model, REPS
times: wait until the model is out of memory (the repository index says so), time one V2
request (the miss), then one more (warm). Prints p50 and max of each, and the added latency
per MiB. Run: .venv/bin/python bench/model_cache.py [target/release/meshserve]
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPS = 5
SIZES_MIB = [1, 16, 64]


def model(path, mib):
    n = int((mib * 1024 * 1024 / 4) ** 0.5)
    weights = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["output"])],
        "m",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(weights, "w")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    os.makedirs(os.path.dirname(path), exist_ok=True)
    onnx.save(m, path)
    return n


def post(url, body):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
        assert response.status == 200
    return time.perf_counter() - started


def main():
    exe = sys.argv[1] if len(sys.argv) > 1 else "target/release/meshserve"
    with tempfile.TemporaryDirectory() as root:
        widths = {}
        for mib in SIZES_MIB:
            widths[f"m{mib}"] = model(f"{root}/m{mib}/1/model.onnx", mib)
        proc = subprocess.Popen(
            [exe, "serve", "--model-repository", root, "--http-port", "0", "--grpc-port", "0",
             "--load-on-demand", "--model-idle-unload-secs", "1"],
            stderr=subprocess.PIPE, text=True,
        )
        try:
            base = None
            for line in proc.stderr:
                if "listening on http=" in line:
                    base = "http://" + line.split("listening on http=")[1].split()[0]
                    break
            assert base, "the sidecar did not start"
            # Its log goes on: keep reading it, so a full pipe never stalls the sidecar.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            print(f"{'model':>6} {'MiB':>4} {'miss p50 ms':>12} {'miss max':>9} {'warm p50 ms':>12} {'added ms/MiB':>13}")
            for name, n in widths.items():
                mib = int(name[1:])
                body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, n], "data": [0.5] * n}]}
                misses, warms = [], []
                for _ in range(REPS):
                    deadline = time.time() + 30
                    while True:
                        index = json.loads(urllib.request.urlopen(urllib.request.Request(
                            f"{base}/v2/repository/index", data=b"{}", method="POST")).read())
                        if all(e["state"] != "READY" for e in index if e["name"] == name):
                            break
                        assert time.time() < deadline
                        time.sleep(0.1)
                    misses.append(post(f"{base}/v2/models/{name}/infer", body))
                    warms.append(post(f"{base}/v2/models/{name}/infer", body))
                miss, warm = statistics.median(misses) * 1e3, statistics.median(warms) * 1e3
                print(f"{name:>6} {mib:>4} {miss:>12.1f} {max(misses) * 1e3:>9.1f} {warm:>12.1f} {(miss - warm) / mib:>13.2f}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
