"""Remote storage: time from `meshserve serve --storage s3://...` to ready, first (download)
and cached (a restart over unchanged objects), and the sidecar's RSS once ready, against a
real S3 API (moto's server) on loopback (docs/benchmarks.md, "Remote storage").

    .venv/bin/python bench/storage.py [--runs 5] [--big-mb 256]

Models: the demo's sklearn_digits (1 KB) and mnist_cnn (37 KB), and a synthetic ONNX model of
--big-mb MB (one large initializer, made here with onnx.helper) to show that downloads stream
(the RSS while a big model downloads is not the model's size twice). Local `--storage` of the
same files is measured in the same run, side by side. Every process started is stopped at
the end (setpriv --pdeathsig).
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import numpy as np
import onnx
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[1]
BINARY = REPO / "target" / "release" / "meshserve"


def owned(command):
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *map(str, command)] if setpriv else list(map(str, command))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def big_model(path, megabytes):
    """y = x + sum over a big constant: an initializer of `megabytes` MB the model must load."""
    n = megabytes * (1 << 20) // 4
    weights = helper.make_tensor("w", TensorProto.FLOAT, [n], np.zeros(n, dtype=np.float32).tobytes(), raw=True)
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0), helper.make_node("Add", ["x", "s"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def time_to_ready(storage, env, cache):
    """Seconds from start to /v2/health/ready, peak RSS seen while starting, RSS when ready."""
    start = time.monotonic()
    process = subprocess.Popen(
        owned([BINARY, "serve", "--storage", storage, "--model-name", "m", "--http-port", "0", "--grpc-port", "0",
               "--storage-cache", cache]),
        env=dict(os.environ, NO_COLOR="1", **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    peak = 0
    try:
        while time.monotonic() - start < 300:
            peak = max(peak, rss_kib(process.pid)) if process.poll() is None else peak
            address = next((l.split("listening on http=")[1].split()[0] for l in list(lines) if "listening on http=" in l), None)
            if address:
                try:
                    if urllib.request.urlopen(f"http://{address}/v2/health/ready", timeout=1).status == 200:
                        return time.monotonic() - start, peak, rss_kib(process.pid)
                except OSError:
                    pass
            if process.poll() is not None:
                raise SystemExit("meshserve serve exited:\n" + "".join(lines))
            time.sleep(0.005)
        raise SystemExit("not ready in 300 s")
    finally:
        process.kill()
        process.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--big-mb", type=int, default=256)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="meshserve-bench-storage-"))
    port = free_port()
    server = subprocess.Popen(owned([REPO / ".venv" / "bin" / "moto_server", "-H", "127.0.0.1", "-p", port]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.1)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                          region_name="us-east-1")
        s3.create_bucket(Bucket="models")
        big = work / "big.onnx"
        big_model(big, args.big_mb)
        models = {
            "sklearn_digits": REPO / "models" / "repository" / "sklearn_digits" / "1" / "model.onnx",
            "mnist_cnn": REPO / "models" / "repository" / "mnist_cnn" / "1" / "model.onnx",
            f"big_{args.big_mb}mb": big,
        }
        for name, file in models.items():
            s3.upload_file(str(file), "models", f"{name}/model.onnx")
        print("| model | size | ready: local file | ready: s3://, first (download) | ready: s3://, cached | RSS when ready (local / s3) | peak RSS while starting (local / s3 first) |")
        print("|---|---|---|---|---|---|---|")
        for name, file in models.items():
            local, first, cached = [], [], []
            rss_local = rss_s3 = peak = peak_local = 0
            for run in range(args.runs):
                cache = work / f"cache-{name}-{run}"
                t, peak_local, rss_local = time_to_ready(str(file), {}, cache)
                local.append(t)
                t, peak, rss_s3 = time_to_ready(f"s3://models/{name}", env, cache)
                first.append(t)
                t, _, _ = time_to_ready(f"s3://models/{name}", env, cache)
                cached.append(t)
            med = lambda xs: statistics.median(xs) * 1000
            size = file.stat().st_size
            shown = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} KB"
            print(f"| {name} | {shown} | {med(local):.0f} ms | {med(first):.0f} ms | {med(cached):.0f} ms"
                  f" | {rss_local / 1024:.0f} / {rss_s3 / 1024:.0f} MiB | {peak_local / 1024:.0f} / {peak / 1024:.0f} MiB |")
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
