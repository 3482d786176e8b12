"""Scale to zero: the time to the first answer from zero, and the memory a held request costs.

`meshserve up` on the demo's two models (the scikit-learn digits classifier and the MNIST
CNN), each at `minReplicas: 0` with a 1 s retention period, through real Envoy and the
router's activator:

1. Time to the first answer from zero: WAKES times per model, wait until the revision is
   cold (revisions.json says so, its sidecar stopped), then time one request: the activator
   holds it, calls `meshserve up`'s wake endpoint, the sidecar starts and loads its model,
   the activator's readiness probe sees it and resumes the request. p50 and max.
2. Memory per held request: `meshserve up` is paused (SIGSTOP), so a woken revision cannot
   start; HELD concurrent requests (each on its own connection) are held by the activator;
   Envoy's resident memory with them held, against before, per request. Then `meshserve up`
   resumes and every held request must be answered right.

Run: .venv/bin/python bench/scale_to_zero.py [target/release/meshserve]
"""

import glob
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

WAKES = 20
HELD = 200
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ISVC = """apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {name}
  annotations: {{autoscaling.knative.dev/scale-to-zero-pod-retention-period: 1s}}
spec:
  predictor:
    name: {name}-predictor
    minReplicas: 0
    model:
      modelFormat: {{name: onnx}}
      storageUri: file://{model}
"""

BODIES = {
    "digits": ("/v1/models/digits:predict", {"instances": [[float(i % 16) for i in range(64)]]}),
    "mnist": (
        "/v2/models/mnist/infer",
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}]},
    ),
}


def post(url, body, timeout=120):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), time.perf_counter() - started
    except urllib.error.HTTPError as e:
        return e.code, e.read(), time.perf_counter() - started


def state(state_dir, name):
    try:
        with open(os.path.join(state_dir, "revisions.json")) as f:
            return json.load(f).get(name, {}).get(f"{name}-predictor")
    except (OSError, ValueError):
        return None


def wait_for(state_dir, name, want, seconds=30):
    deadline = time.monotonic() + seconds
    while state(state_dir, name) != want:
        assert time.monotonic() < deadline, f"{name} was not {want} within {seconds} s"
        time.sleep(0.02)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def envoy_pid(parent):
    for child in glob.glob(f"/proc/{parent}/task/*/children"):
        for pid in open(child).read().split():
            try:
                if os.readlink(f"/proc/{pid}/exe").endswith("/envoy"):
                    return int(pid)
            except OSError:
                pass
    raise RuntimeError("no Envoy under meshserve up")


def main():
    exe = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/meshserve")
    envoy = glob.glob(os.path.join(ROOT, ".venv/lib/python3*/site-packages/envoy/_bin/envoy"))[0]
    wasm = os.path.join(ROOT, "target/wasm32-wasip1/release/meshserve_filters.wasm")
    models = {
        "digits": os.path.join(ROOT, "models/repository/sklearn_digits/1/model.onnx"),
        "mnist": os.path.join(ROOT, "models/repository/mnist_cnn/1/model.onnx"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "isvc.yaml")
        with open(file, "w") as f:
            f.write("---\n".join(ISVC.format(name=n, model=m) for n, m in models.items()))
        state_dir = os.path.join(tmp, "state")
        up = subprocess.Popen(
            [exe, "up", file, "--port", "0", "--state-dir", state_dir, "--envoy", envoy, "--wasm", wasm],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        try:
            url = None
            for line in up.stdout:
                if line.startswith("meshserve is up: Envoy on "):
                    url = line.split()[5]
                    break
            assert url, "meshserve up did not come up"
            threading.Thread(target=lambda: [None for _ in up.stdout], daemon=True).start()

            print(f"time to the first answer from zero, {WAKES} wakes per model (meshserve up, 1 s retention)")
            print(f"{'model':>7} {'p50 ms':>7} {'max ms':>7} {'min ms':>7}")
            for name, (path, body) in BODIES.items():
                times = []
                for _ in range(WAKES):
                    wait_for(state_dir, name, "cold")
                    status, text, took = post(url + path, body)
                    assert status == 200, text
                    times.append(took * 1000)
                    wait_for(state_dir, name, "warm")  # the state file has caught up
                print(f"{name:>7} {statistics.median(times):7.0f} {max(times):7.0f} {min(times):7.0f}")

            # Memory per held request: nothing can start the revision while `up` is paused.
            name = "digits"
            path, body = BODIES[name]
            wait_for(state_dir, name, "cold")
            pid = envoy_pid(up.pid)
            # What the connections alone cost: as many idle ones, open to the same listener.
            host, port = url.removeprefix("http://").rsplit(":", 1)
            idle_before = rss_kib(pid)
            idle = [socket.create_connection((host, int(port))) for _ in range(HELD)]
            time.sleep(2)
            idle_after = rss_kib(pid)
            for c in idle:
                c.close()
            time.sleep(1)
            before = rss_kib(pid)
            os.kill(up.pid, signal.SIGSTOP)
            answers = []
            lock = threading.Lock()

            def one():
                answer = post(url + path, body)
                with lock:
                    answers.append(answer)

            threads = [threading.Thread(target=one) for _ in range(HELD)]
            try:
                for t in threads:
                    t.start()
                time.sleep(3)
                held = rss_kib(pid)
                with open(os.path.join(state_dir, "envoy-admin-address")) as f:
                    admin = f.read().strip()
                with urllib.request.urlopen(f"http://{admin}/stats?filter=meshserve.held", timeout=5) as r:
                    gauge = [g for g in r.read().decode().splitlines() if name in g][0]
            finally:
                os.kill(up.pid, signal.SIGCONT)
            for t in threads:
                t.join(120)
            ok = [a for a in answers if a[0] == 200]
            first = ok[0][1] if ok else b""
            same = sum(1 for a in ok if a[1] == first)
            print()
            print(f"{HELD} requests held for a revision at zero (its start paused), Envoy's RSS:")
            print(f"  the activator's gauge: {gauge}")
            print(f"  before {before} KiB, held {held} KiB: {(held - before) / HELD:.1f} KiB per held request (with its connection)")
            print(f"  {HELD} idle connections alone: {(idle_after - idle_before) / HELD:.1f} KiB each")
            print(f"  after the wake: {len(ok)} of {HELD} answered 200, {same} with the same answer, "
                  f"slowest {max(a[2] for a in answers):.1f} s")
            assert len(ok) == HELD and same == HELD
        finally:
            up.send_signal(signal.SIGCONT)
            up.terminate()
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()


if __name__ == "__main__":
    main()
