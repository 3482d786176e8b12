"""Hostile clients against the mesh and the sidecar (docs/benchmarks.md, "Hostile clients").

    .venv/bin/python bench/hostile.py [--connections 2000] [--probe 300] [--skip-slow-body]

1. N idle keep-alive connections (each sent one request, then left open) held against Envoy
   (`meshserve up`) and, separately, against a sidecar (`meshserve serve`): the servers' RSS
   before and while they are held, and the latency of requests from another client meanwhile
   against the same client with no idle connections (ratios: one run, side by side).
2. A huge `Content-Length` through Envoy: how soon the 413 comes (no body is sent).
3. A slow body through Envoy (all but one byte, then nothing): how soon it is cut off (Envoy's
   request_timeout, 60 s) and what the client gets.

Everything listens on 127.0.0.1 on OS-picked ports; every process started is stopped at the
end (and gets SIGTERM if this script dies: setpriv --pdeathsig).
"""

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BINARY = REPO / "target" / "release" / "meshserve"
MODEL = REPO / "models" / "repository" / "sklearn_digits"
BODY = (REPO / "models" / "samples" / "sklearn_digits_v1_request.json").read_bytes()


def owned(command):
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *map(str, command)] if setpriv else list(map(str, command))


def start(command, pattern, timeout=90):
    process = subprocess.Popen(owned(command), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found, lines = {}, []
    ready = threading.Event()

    def read():
        for line in process.stdout:
            lines.append(line)
            match = re.search(pattern, line)
            if match and not ready.is_set():
                found["match"] = match
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout) or "match" not in found:
        process.kill()
        sys.exit("did not start:\n" + "".join(lines))
    return process, found["match"]


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid):
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [(int(p), a) for p, a in (line.strip().split(None, 1) for line in out.splitlines() if line.strip())]


def request(host, port, path="/v1/models/digits:predict", body=BODY, conn=None):
    own = conn is None
    conn = conn or socket.create_connection((host, port), timeout=10)
    conn.sendall(
        f"POST {path} HTTP/1.1\r\nHost: digits.default.example.com\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    while len(rest) < length:
        rest += conn.recv(65536)
    if own:
        conn.close()
    return int(head.split()[1])


def probe(host, port, count):
    """`count` requests on one keep-alive connection: latencies in ms."""
    conn = socket.create_connection((host, port), timeout=10)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        status = request(host, port, conn=conn)
        times.append((time.perf_counter() - started) * 1000)
        assert status == 200, status
    conn.close()
    return times


def hold(host, port, count):
    conns = []
    for _ in range(count):
        conn = socket.create_connection((host, port), timeout=10)
        assert request(host, port, conn=conn) == 200
        conns.append(conn)
    return conns


def summary(times):
    times = sorted(times)
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def idle_case(name, host, port, pids, args):
    before = {n: rss_kib(p) for n, p in pids.items()}
    base = probe(host, port, args.probe)
    started = time.monotonic()
    conns = hold(host, port, args.connections)
    opened = time.monotonic() - started
    time.sleep(1)
    held = {n: rss_kib(p) for n, p in pids.items()}
    loaded = probe(host, port, args.probe)
    alive = sum(1 for c in conns if request(host, port, conn=c) == 200)
    for c in conns:
        c.close()
    (b50, b99), (l50, l99) = summary(base), summary(loaded)
    rows = [
        f"| {name} | {n} | {before[n] / 1024:.1f} | {held[n] / 1024:.1f} | {(held[n] - before[n]) / args.connections:.1f} |"
        for n in pids
    ]
    return {
        "rss": rows,
        "latency": f"| {name} | {args.connections} ({opened:.1f} s to open) | {b50:.2f} / {b99:.2f} | {l50:.2f} / {l99:.2f} | "
        f"{l50 / b50:.2f} / {l99 / b99:.2f} | {alive}/{args.connections} |",
    }


def raw(host, port, text, timeout):
    conn = socket.create_connection((host, port), timeout=timeout)
    conn.sendall(text)
    started = time.monotonic()
    data = b""
    try:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data and re.search(rb"content-length: 0\r\n", data, re.I):
                break
            if b"\r\n\r\n" in data and data.rstrip().endswith(b"}"):
                break
    except socket.timeout:
        pass
    took = time.monotonic() - started
    conn.close()
    first = data.split(b"\r\n", 1)[0].decode(errors="replace") or "(closed, no answer)"
    return took, first, data.split(b"\r\n\r\n", 1)[-1][:120].decode(errors="replace")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--probe", type=int, default=300, help="requests per latency probe")
    parser.add_argument("--skip-slow-body", action="store_true", help="skip the 60 s slow-body case")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="meshserve-hostile-"))
    spec = work / "isvc.yaml"
    spec.write_text(
        json.dumps(
            {
                "apiVersion": "serving.kserve.io/v1beta1",
                "kind": "InferenceService",
                "metadata": {"name": "digits"},
                "spec": {"predictor": {"model": {"modelFormat": {"name": "onnx"}, "storageUri": f"file://{MODEL}"}}},
            }
        )
    )
    results = {}
    up, match = start([BINARY, "up", spec, "--port", "0", "--state-dir", work / "state"], r"meshserve is up: Envoy on http://([\d.]+):(\d+)")
    try:
        host, port = match.group(1), int(match.group(2))
        kids = children(up.pid)
        envoy = next(p for p, a in kids if "envoy" in a.split()[0])
        sidecar = next(p for p, a in kids if " serve " in f" {a} ")
        results["envoy"] = idle_case("Envoy (meshserve up)", host, port, {"Envoy": envoy, "sidecar": sidecar}, args)
        big = (
            f"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10**12}\r\n\r\n"
        ).encode()
        results["huge"] = raw(host, port, big, 30)
        if not args.skip_slow_body:
            slow = (
                f"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(BODY)}\r\n\r\n"
            ).encode() + BODY[:-1]
            results["slow"] = raw(host, port, slow, 120)
    finally:
        stop(up)
    serve, match = start(
        [BINARY, "serve", "--storage", MODEL, "--model-name", "digits", "--http-port", "0", "--grpc-port", "0"],
        r"listening on http=([\d.]+):(\d+)",
    )
    try:
        time.sleep(0.5)
        host, port = match.group(1), int(match.group(2))
        results["sidecar"] = idle_case("sidecar (meshserve serve)", host, port, {"sidecar": serve.pid}, args)
    finally:
        stop(serve)
    shutil.rmtree(work, ignore_errors=True)

    print("\n| held against | process | RSS before (MiB) | RSS with the idle connections (MiB) | KiB per connection |")
    print("|---|---|---|---|---|")
    for case in ("envoy", "sidecar"):
        print("\n".join(results[case]["rss"]))
    print("\n| held against | idle connections | another client: p50 / p99 ms, none held | with them held | ratio | idle ones still served |")
    print("|---|---|---|---|---|---|")
    for case in ("envoy", "sidecar"):
        print(results[case]["latency"])
    took, first, body = results["huge"]
    print(f"\nhuge Content-Length (10^12, no body) through Envoy: {first} after {took * 1000:.1f} ms: {body}")
    if "slow" in results:
        took, first, body = results["slow"]
        print(f"slow body through Envoy (all but one byte, then nothing): {first} after {took:.1f} s: {body}")


if __name__ == "__main__":
    main()
