"""meshserve's load tests: one run of one or all suites, each with its own servers and report.

Run by bench/run.sh (which installs h2load and MLServer's venv first), in the repo's .venv:

    .venv/bin/python bench/bench.py [--suite sidecar|batching|mesh|all] [--update-docs] [--rounds N] ...

Suites: `sidecar` (here), `batching` (bench/suite_batching.py), `mesh` (bench/suite_mesh.py); the
last two use this module's helpers (servers, checks, h2load, pooling, report pieces). Each suite
writes bench/results/<date>-<suite>.md (and .json); --update-docs also replaces its generated
block in docs/benchmarks.md.

The sidecar suite, in order:
  1. builds the request bodies (V2 REST JSON and a gRPC-framed ModelInferRequest with
     raw_input_contents, made with tritonclient's protobuf classes) for mnist_cnn and mnist_mlp
     at batch 1 and 32, and the outputs onnxruntime computes for them in-process;
  2. starts meshserve, the KServe server (bench/kserve_onnx_server.py) and MLServer
     (bench/mlserver_onnx_runtime.py), all on 127.0.0.1, and checks that each answers every body
     it will be sent with HTTP 200 / grpc-status 0 and the right numbers (it stops otherwise);
  3. in each of --rounds rounds: times raw onnxruntime in-process (session.run in a Python
     loop, concurrency 1: the floor), then drives each (model, batch, concurrency) with h2load,
     systems interleaved so that a noisy neighbour hits them alike: a warm-up, then a fixed
     duration whose per-request latencies come from h2load's --log-file; a row pools its rounds;
  4. checks the answers again, reads meshserve's RSS, stops every server (also on error,
     Ctrl-C or SIGTERM), and writes the Markdown report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV_BENCH = ROOT / ".venv-bench"
# A real Triton Inference Server (2.51, ONNX Runtime backend) for the sidecar suite: the
# machine's peer kit (../shared/peers/triton: run_triton.sh and its backend) installs it into
# .venv-triton, against the same onnxruntime as meshserve's. Without the kit Triton is left out.
TRITON_PEER = Path(os.environ.get("MESHSERVE_TRITON_PEER", ROOT.parent / "shared/peers/triton"))
VENV_TRITON = ROOT / ".venv-triton"
MODELS = {
    "mnist_cnn": (ROOT / "models/repository/mnist_cnn/1/model.onnx", (1, 28, 28)),
    "mnist_mlp": (ROOT / "models/extra/mnist_mlp/1/model.onnx", (784,)),
}
BATCHES = (1, 32)
CONCURRENCY = (1, 16)
GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# (system, protocol, required): a required one that fails its check stops the run; an optional
# one that fails is reported and left out.
TARGETS = [
    ("meshserve", "REST", True),
    ("meshserve", "gRPC", True),
    ("KServe", "REST", True),
    ("KServe", "gRPC", False),
    ("MLServer", "REST", True),
    ("MLServer", "gRPC", False),
    # Triton with its CPU default (two model instances), and with one, as meshserve runs.
    ("Triton", "REST", False),
    ("Triton", "gRPC", False),
    ("Triton 1 instance", "REST", False),
    ("Triton 1 instance", "gRPC", False),
]


def say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Request bodies and expected answers


@dataclass
class Case:
    model: str
    batch: int
    x: np.ndarray
    expected: np.ndarray
    rest_body: Path
    grpc_body: Path


def digits() -> np.ndarray:
    """The four test digits of models/reference (28x28, 0..1), as float32 [4, 784]."""
    reference = json.loads((ROOT / "models/reference/mnist_cnn_v1.json").read_text())
    tensor = reference["inputs"][0]
    return np.asarray(tensor["data"], dtype=np.float32).reshape(4, 784)


def make_cases(workdir: Path) -> list[Case]:
    images = digits()
    cases = []
    for model, (path, item_shape) in MODELS.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for batch in BATCHES:
            x = np.ascontiguousarray(np.resize(images, (batch, 784)).reshape((batch, *item_shape)))
            (expected,) = session.run(["probabilities"], {"input": x})
            rest = {
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        # float32 -> shortest decimal that reads back as the same float32
                        "data": [float(np.format_float_positional(v, unique=True, trim="0")) for v in x.ravel()],
                    }
                ]
            }
            rest_body = workdir / f"{model}_b{batch}.json"
            rest_body.write_text(json.dumps(rest, separators=(",", ":")))
            request = pb.ModelInferRequest(model_name=model)
            tensor = request.inputs.add()
            tensor.name, tensor.datatype = "input", "FP32"
            tensor.shape.extend(x.shape)
            request.raw_input_contents.append(x.tobytes())
            message = request.SerializeToString()
            grpc_body = workdir / f"{model}_b{batch}.grpc"
            grpc_body.write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
            cases.append(Case(model, batch, x, expected, rest_body, grpc_body))
        del session
    return cases


# ---------------------------------------------------------------------------------------------
# Raw onnxruntime: the floor


def raw_ort(case: Case, warmup: float, duration: float) -> dict:
    path, _ = MODELS[case.model]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input": case.x}
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        session.run(["probabilities"], feed)
    (y,) = session.run(["probabilities"], feed)
    if not np.allclose(y, case.expected, rtol=1e-4, atol=1e-6):
        raise BenchError(f"raw onnxruntime gave different numbers for {case.model} batch {case.batch}")
    times = []
    busy0, cpu0 = machine_busy_seconds(), time.process_time()
    start = time.perf_counter()
    end = start + duration
    now = start
    while now < end:
        t0 = time.perf_counter_ns()
        session.run(["probabilities"], feed)
        times.append(time.perf_counter_ns() - t0)
        now = time.perf_counter()
    elapsed = now - start
    cpu, busy = time.process_time() - cpu0, machine_busy_seconds() - busy0
    return {
        "system": "raw ORT",
        "protocol": "in-process",
        "model": case.model,
        "batch": case.batch,
        "concurrency": 1,
        "ok": len(times),
        "seconds": elapsed,
        "wall": elapsed,
        "latencies_ms": np.asarray(times) / 1e6,
        "failed": 0,
        "server_cpu_s": cpu,
        "client_cpu_s": None,
        "other_cpu_s": max(0.0, busy - cpu),
        "notes": [],
    }


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine has been busy (all cores; steal included), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def pooled(runs: list[dict]) -> dict:
    """One row from a measurement's rounds: counts and seconds added up, latencies pooled."""
    first = runs[0]
    seconds = sum(r["seconds"] for r in runs)
    wall = sum(r["wall"] for r in runs)
    lat = np.concatenate([r["latencies_ms"] for r in runs])
    row = {k: first[k] for k in ("system", "protocol", "model", "batch", "concurrency")}
    row.update(
        rps=sum(r["ok"] for r in runs) / seconds,
        p50=float(np.percentile(lat, 50)),
        p99=float(np.percentile(lat, 99)),
        requests=sum(r["ok"] for r in runs),
        failed=sum(r["failed"] for r in runs),
        round_rps=[r["ok"] / r["seconds"] for r in runs],
        server_cpu=sum(r["server_cpu_s"] for r in runs) / wall,
        client_cpu=(sum(r["client_cpu_s"] for r in runs) / wall) if first["client_cpu_s"] is not None else None,
        other_cpu=sum(r["other_cpu_s"] for r in runs) / wall,
        server_cpu_by={k: sum(r["server_cpu_by"][k] for r in runs) / wall for k in first.get("server_cpu_by", {})},
        notes=[f"round {i + 1}: {n}" if len(runs) > 1 else n for i, r in enumerate(runs) for n in r["notes"]],
    )
    return row


# ---------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    log: Path
    http: int = 0
    grpc: int = 0
    rest_ok: bool = True
    grpc_ok: bool = True
    metrics: int = 0
    notes: list[str] = field(default_factory=list)

    def processes(self) -> list[int]:
        """The server's process group (MLServer runs inference in child processes)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == self.process.pid:  # pgrp
                pids.append(int(entry))
        return pids

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.processes():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / CLK_TCK

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of its group (MLServer's workers), by its process-group id
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


SERVERS: list[Server] = []


def spawn(name: str, argv: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> Server:
    handle = open(log, "wb")
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd or ROOT,
        start_new_session=True,  # its own process group, so that stop() gets its children too
    )
    handle.close()
    server = Server(name, process, log)
    SERVERS.append(server)
    pids = os.environ.get("BENCH_PIDFILE")
    if pids:  # run.sh's trap kills these if this script dies without cleaning up
        with open(pids, "a") as f:
            f.write(f"{process.pid}\n")
    return server


def wait_ready(server: Server, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise BenchError(f"{server.name} exited during start-up; its log:\n{tail(server.log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    raise BenchError(f"{server.name} was not ready within {timeout:.0f}s; its log:\n{tail(server.log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_meshserve(
    workdir: Path, repository: Path | None = None, name: str = "meshserve", ports: tuple[int, int] = (0, 0)
) -> Server:
    """meshserve serve, default flags. Without `repository`: the demo repository plus the
    benchmark MLP. `ports` (REST, gRPC): 0 lets the OS pick (the mesh suite needs fixed ones)."""
    if repository is None:
        # The demo repository plus the benchmark MLP, side by side, by symbolic links.
        repository = workdir / "meshserve-repository"
        repository.mkdir()
        for model in sorted((ROOT / "models/repository").iterdir()):
            if model.is_dir():
                (repository / model.name).symlink_to(model)
        (repository / "mnist_mlp").symlink_to(ROOT / "models/extra/mnist_mlp")
    env = dict(os.environ)
    env.setdefault("ORT_DYLIB_PATH", str(next((ROOT / ".venv/lib").glob("python3*/site-packages/onnxruntime/capi/libonnxruntime.so.*"))))
    log = workdir / f"{name.replace(' ', '_')}.log"
    server = spawn(
        name,
        [str(ROOT / "target/release/meshserve"), "serve", "--model-repository", str(repository),
         "--http-port", str(ports[0]), "--grpc-port", str(ports[1])],
        log,
        env=env,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (server.http and server.grpc):
        if not server.alive():
            raise BenchError(f"meshserve exited during start-up; its log:\n{tail(log)}")
        text = log.read_text(errors="replace")
        if m := re.search(r"listening on http=127\.0\.0\.1:(\d+)", text):
            server.http = int(m.group(1))
        if m := re.search(r"listening on grpc=127\.0\.0\.1:(\d+)", text):
            server.grpc = int(m.group(1))
        time.sleep(0.1)
    if not (server.http and server.grpc):
        raise BenchError(f"meshserve did not log its ports; its log:\n{tail(log)}")
    wait_ready(server, f"http://127.0.0.1:{server.http}/v2/health/ready")
    return server


def start_up(workdir: Path, spec: Path, extra: list[str] | None = None) -> Server:
    """`meshserve up` on the InferenceService file `spec` (with `extra` flags), Envoy on a free
    port (`.http`), waited for until it says it is up. Its log names the parts: see
    `sidecar_port`."""
    port = free_port()
    server = spawn("meshserve up", [str(ROOT / "target/release/meshserve"), "up", str(spec), "--port", str(port),
                                    "--state-dir", str(workdir / "state"), *(extra or [])], workdir / "up.log")
    server.http = port
    deadline = time.monotonic() + 120
    while "meshserve is up" not in server.log.read_text(errors="replace"):
        if not server.alive() or time.monotonic() > deadline:
            raise BenchError(f"meshserve up did not come up; its log:\n{tail(server.log)}")
        time.sleep(0.2)
    return server


def sidecar_port(up: Server, revision: str) -> int:
    """The REST port of the sidecar `meshserve up` started for `revision` (a name prefix)."""
    found = re.search(rf"\[{re.escape(revision)}[^\]]*\].*listening on http=127\.0\.0\.1:(\d+)",
                      up.log.read_text(errors="replace"))
    if not found:
        raise BenchError(f"no address for sidecar {revision} in the log:\n{tail(up.log)}")
    return int(found.group(1))


def start_kserve(workdir: Path) -> Server:
    http, grpc_port = free_port(), free_port()
    argv = [sys.executable, str(BENCH / "kserve_onnx_server.py"), "--bench-http-port", str(http), "--bench-grpc-port", str(grpc_port)]
    for model, (path, _) in MODELS.items():
        argv += ["--bench-model", f"{model}={path}"]
    server = spawn("KServe", argv, workdir / "kserve.log")
    server.http, server.grpc = http, grpc_port
    wait_ready(server, f"http://127.0.0.1:{http}/v2/health/ready")
    return server


def start_mlserver(
    workdir: Path, models: dict | None = None, model_settings: dict | None = None, env_extra: dict | None = None
) -> Server:
    """MLServer with the benchmark runtime. `models` (default MODELS): name -> (path, shape);
    `model_settings`: extra fields of every model-settings.json (the batching suite's adaptive
    batching); `env_extra`: extra environment variables."""
    models = MODELS if models is None else models
    root = workdir / "mlserver"
    root.mkdir()
    http, grpc_port = free_port(), free_port()
    settings = {
        "host": "127.0.0.1",
        "http_port": http,
        "grpc_port": grpc_port,
        "metrics_endpoint": None,  # no metrics server (it would be a third listener)
        "debug": False,  # no per-request access log
        "load_models_at_startup": True,
    }
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    for model, (path, _) in models.items():
        (root / model).mkdir()
        settings_json = {
            "name": model,
            "implementation": "mlserver_onnx_runtime.OnnxRuntime",
            "parameters": {"uri": str(path)},
            **(model_settings or {}),
        }
        (root / model / "model-settings.json").write_text(json.dumps(settings_json, indent=2))
    env = dict(os.environ)
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(BENCH) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("VIRTUAL_ENV", None)
    server = spawn("MLServer", [str(VENV_BENCH / "bin/mlserver"), "start", str(root)], workdir / "mlserver.log", env=env, cwd=root)
    server.http, server.grpc = http, grpc_port
    wait_ready(server, f"http://127.0.0.1:{http}/v2/health/ready", timeout=180)
    for model in models:
        wait_ready(server, f"http://127.0.0.1:{http}/v2/models/{model}/ready", timeout=60)
    return server


def triton_server() -> Path | None:
    """`tritonserver` in .venv-triton, installed from the peer kit when missing; None (and a
    note) without the kit."""
    binary = next(iter(sorted(VENV_TRITON.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver"))), None)
    stamp = VENV_TRITON / ".onnxruntime-version"
    ready = binary is not None and stamp.is_file() and stamp.read_text().strip() == ort.__version__
    if ready:
        return binary
    script = TRITON_PEER / "run_triton.sh"
    if not script.is_file():
        say(f"Triton left out: no peer kit at {TRITON_PEER} (set MESHSERVE_TRITON_PEER)")
        return None
    prebuilt = TRITON_PEER / f"libtriton_onnxruntime-r24.10-cpu-ort{ort.__version__}.so"
    source = prebuilt if prebuilt.is_file() else TRITON_PEER / "triton-ort-backend-src-r24.10.tar.gz"
    say(f"installing Triton into {VENV_TRITON.name} ({source.name}, onnxruntime=={ort.__version__})")
    env = dict(os.environ, ORT_SPEC=f"onnxruntime=={ort.__version__}", PYTHON=sys.executable)
    run = subprocess.run(["bash", str(script), "install", str(VENV_TRITON), str(source)], env=env,
                         capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise BenchError(f"installing Triton failed: {run.stderr[-2000:]}")
    stamp.write_text(ort.__version__)
    return next(iter(sorted(VENV_TRITON.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver"))))


def start_triton(workdir: Path, binary: Path, name: str, instances: int | None, models: dict | None = None,
                 intra_op: int = 1, max_batch: int = 64, extra_config: tuple[str, ...] = (), tag: str = "") -> Server:
    """tritonserver on 127.0.0.1 with the ONNX Runtime backend, `intra_op` intra-op threads (0:
    onnxruntime's default, one per core) and one inter-op thread per session as meshserve's;
    `instances`: the instance_group count (None: Triton's default, two on CPU); `extra_config`:
    more config.pbtxt lines (dynamic_batching, say). Its metrics port is `.metrics`."""
    models = MODELS if models is None else models
    repo = workdir / f"triton-repository-{instances or 'default'}{tag}"
    for model, (path, _) in models.items():
        if (repo / model).exists():  # started again: the same repository
            continue
        (repo / model / "1").mkdir(parents=True)
        (repo / model / "1" / "model.onnx").symlink_to(path)
        config = [
            f'name: "{model}"',
            'platform: "onnxruntime_onnx"',
            f"max_batch_size: {max_batch}",
            f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{intra_op}" }} }}',
            'parameters { key: "inter_op_thread_count" value: { string_value: "1" } }',
            *extra_config,
        ]
        if instances:
            config.append(f"instance_group [{{ count: {instances}, kind: KIND_CPU }}]")
        (repo / model / "config.pbtxt").write_text("\n".join(config) + "\n")
    tritonserver = binary.parent.parent
    http, grpc_port, metrics = free_port(), free_port(), free_port()
    libdir = subprocess.run([str(VENV_TRITON / "bin/python"), "-c",
                             "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
                            capture_output=True, text=True, timeout=30).stdout.strip()
    env = dict(os.environ, PATH=f"{VENV_TRITON / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    env["LD_LIBRARY_PATH"] = libdir + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    server = spawn(name, [
        str(binary), f"--model-repository={repo}", f"--backend-directory={tritonserver / 'backends'}",
        f"--cache-directory={tritonserver / 'caches'}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1", f"--http-port={http}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics}",
        "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0", "--log-warning=false",
    ], workdir / f"{name.replace(' ', '_')}.log", env=env)
    server.http, server.grpc, server.metrics = http, grpc_port, metrics
    wait_ready(server, f"http://127.0.0.1:{http}/v2/health/ready", timeout=180)
    for model in models:
        wait_ready(server, f"http://127.0.0.1:{http}/v2/models/{model}/ready", timeout=60)
    return server


def triton_version() -> str:
    try:
        run = subprocess.run([str(VENV_TRITON / "bin/python"), "-c",
                              "import importlib.metadata as m; print(m.version('nvidia-pytriton'))"],
                             capture_output=True, text=True, timeout=30)
        return f"Triton 2.51.0 (nvidia-pytriton {run.stdout.strip()}, ONNX Runtime backend r24.10)" if run.returncode == 0 else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


# ---------------------------------------------------------------------------------------------
# Correctness checks


def rest_url(server: Server, model: str) -> str:
    return f"http://127.0.0.1:{server.http}/v2/models/{model}/infer"


def check_rest(server: Server, case: Case, model: str | None = None) -> int:
    """Sends the exact body h2load will send (to `model`, default the case's); returns the
    response body's length."""
    request = urllib.request.Request(
        rest_url(server, model or case.model), data=case.rest_body.read_bytes(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, body = response.status, response.read()
            encoding = response.headers.get("Content-Encoding")
    except urllib.error.HTTPError as e:
        raise BenchError(f"{server.name} REST {case.model} b{case.batch}: HTTP {e.code}: {e.read()[:500]!r}") from e
    if status != 200:
        raise BenchError(f"{server.name} REST {case.model} b{case.batch}: HTTP {status}")
    if encoding not in (None, "identity"):
        raise BenchError(f"{server.name} REST: unexpected Content-Encoding {encoding}")
    answer = json.loads(body)
    outputs = {o["name"]: o for o in answer.get("outputs", [])}
    if "probabilities" not in outputs:
        raise BenchError(f"{server.name} REST {case.model}: no 'probabilities' output in {body[:300]!r}")
    out = outputs["probabilities"]
    y = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    compare(server.name, "REST", case, y)
    return len(body)


def check_grpc(server: Server, case: Case) -> int:
    """Sends the exact message h2load will send; returns the framed response's length."""
    message = case.grpc_body.read_bytes()[5:]
    with grpc.insecure_channel(
        f"127.0.0.1:{server.grpc}", options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        call = channel.unary_unary(GRPC_METHOD, request_serializer=None, response_deserializer=None)
        try:
            raw = call(message, timeout=30)
        except grpc.RpcError as e:
            raise BenchError(f"{server.name} gRPC {case.model} b{case.batch}: {e.code()} {e.details()}") from e
    response = pb.ModelInferResponse.FromString(raw)
    names = [o.name for o in response.outputs]
    if "probabilities" not in names:
        raise BenchError(f"{server.name} gRPC {case.model}: outputs are {names}")
    i = names.index("probabilities")
    if response.raw_output_contents:
        y = np.frombuffer(response.raw_output_contents[i], dtype=np.float32)
    else:
        y = np.asarray(response.outputs[i].contents.fp32_contents, dtype=np.float32)
    compare(server.name, "gRPC", case, y.reshape(tuple(response.outputs[i].shape)))
    return 5 + len(raw)


def compare(name: str, protocol: str, case: Case, y: np.ndarray) -> None:
    if y.shape != case.expected.shape:
        raise BenchError(f"{name} {protocol} {case.model} b{case.batch}: shape {y.shape}, want {case.expected.shape}")
    if not np.allclose(y, case.expected, rtol=1e-4, atol=1e-6):
        worst = float(np.max(np.abs(y - case.expected)))
        raise BenchError(f"{name} {protocol} {case.model} b{case.batch}: wrong numbers (max error {worst:g})")
    if not np.array_equal(y.argmax(axis=1), case.expected.argmax(axis=1)):
        raise BenchError(f"{name} {protocol} {case.model} b{case.batch}: wrong labels")


def check_all(servers: dict[str, Server], cases: list[Case], when: str) -> dict:
    """Checks every (system, protocol, case); returns the response sizes. Required failures raise."""
    sizes = {}
    for system, protocol, required in TARGETS:
        server = servers.get(system)
        if server is None:
            continue
        if (protocol == "REST" and not server.rest_ok) or (protocol == "gRPC" and not server.grpc_ok):
            continue
        for case in cases:
            try:
                size = check_rest(server, case) if protocol == "REST" else check_grpc(server, case)
                sizes[(system, protocol, case.model, case.batch)] = size
            except (BenchError, OSError, ValueError, KeyError) as e:
                if required:
                    raise BenchError(f"{when}: {e}") from e
                note = f"{system} {protocol} left out: {when} check failed: {e}"
                say(note)
                server.notes.append(note)
                if protocol == "REST":
                    server.rest_ok = False
                else:
                    server.grpc_ok = False
                break
    return sizes


# ---------------------------------------------------------------------------------------------
# Load: h2load

SUMMARY = re.compile(
    r"requests: (?P<total>\d+) total, (?P<started>\d+) started, (?P<done>\d+) done, (?P<succeeded>\d+) succeeded, "
    r"(?P<failed>\d+) failed, (?P<errored>\d+) errored, (?P<timeout>\d+) timeout"
)
CODES = re.compile(r"status codes: (?P<s2>\d+) 2xx, (?P<s3>\d+) 3xx, (?P<s4>\d+) 4xx, (?P<s5>\d+) 5xx")
TRAFFIC = re.compile(r"traffic: .*?\((?P<total>\d+)\) total, .*?\((?P<headers>\d+)\) headers .*?\((?P<data>\d+)\) data")
FINISHED = re.compile(r"finished in (?P<secs>[\d.]+)s, (?P<rps>[\d.]+) req/s")


def h2load(
    server: Server, protocol: str, case: Case, concurrency: int, warmup: float, duration: float, workdir: Path, size: int
) -> dict:
    if protocol == "REST":
        target = ["--h1", "-d", str(case.rest_body), "-H", "content-type: application/json", rest_url(server, case.model)]
    else:
        target = ["-d", str(case.grpc_body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
        target += [f"http://127.0.0.1:{server.grpc}{GRPC_METHOD}"]
    r = h2load_target(f"{server.name}_{protocol}_{case.model}_b{case.batch}", target, [server], concurrency,
                      warmup, duration, workdir, size)
    r.update(system=server.name, protocol=protocol, model=case.model, batch=case.batch, concurrency=concurrency)
    return r


def h2load_target(
    label: str,
    target: list[str],
    servers: list[Server],
    concurrency: int,
    warmup: float,
    duration: float,
    workdir: Path,
    size: int,
    expect: str = "2xx",
) -> dict:
    """One h2load run: `target` is the protocol flags, body and URL; `servers` are the processes
    whose CPU counts as the server's (their sum; each in `server_cpu_by`). `expect`: "2xx", or
    an exact status such as "404" for a path whose right answer is an error (then only that
    status counts as success). Returns the measurement without system/protocol/model fields."""
    log = workdir / f"h2load_{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}_c{concurrency}.log"
    ms = lambda seconds: f"{round(seconds * 1000)}ms"
    argv = ["h2load", "-t", "1", "-c", str(concurrency), "-m", "1", "-D", ms(duration), "--warm-up-time", ms(warmup)]
    argv += ["--log-file", str(log), *target]
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, t0 = machine_busy_seconds(), time.monotonic()
    cpus0 = [s.cpu_seconds() for s in servers]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=warmup + duration + 60)
    wall = time.monotonic() - t0
    cpus1 = [s.cpu_seconds() for s in servers]
    busy1 = machine_busy_seconds()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = children1.ru_utime + children1.ru_stime - children0.ru_utime - children0.ru_stime
    server_cpu = [b - a for a, b in zip(cpus0, cpus1)]
    out = run.stdout + run.stderr
    summary, codes, traffic = SUMMARY.search(out), CODES.search(out), TRAFFIC.search(out)
    if run.returncode != 0 or not (summary and codes and traffic):
        raise BenchError(f"h2load failed (exit {run.returncode}) against {label}:\n{out[-2000:]}")
    n = {k: int(v) for k, v in summary.groupdict().items()}
    c = {k: int(v) for k, v in codes.groupdict().items()}
    data = int(traffic.group("data"))
    wanted = (lambda status: status.startswith("2")) if expect == "2xx" else (lambda status: status == expect)
    latencies, statuses = [], {}
    for line in log.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            statuses[parts[1]] = statuses.get(parts[1], 0) + 1
            if wanted(parts[1]):
                latencies.append(int(parts[2]))
    log.unlink()
    if expect == "2xx":
        ok = n["succeeded"]
        failed = n["done"] - n["succeeded"] + n["errored"] + n["timeout"] + c["s3"] + c["s4"] + c["s5"]
    else:
        # h2load counts every 4xx as failed; here the expected status is the success. The log
        # covers the measured window only, like h2load's counts, so the two agree.
        ok = statuses.get(expect, 0)
        failed = n["done"] - ok + n["errored"] + n["timeout"]
    # A gRPC error comes back as HTTP 200 with grpc-status in the trailers and no message, so
    # h2load counts it as a success: the DATA bytes per answer tell. Every correct answer here
    # is `size` bytes long (checked before the run); an error answer is (nearly) empty.
    # size 0: an answer without a body (202 from the log intake), nothing to compare.
    data_ratio = (data / (n["done"] * size) if n["done"] else 0.0) if size else 1.0
    notes = []
    if data_ratio < 0.99:
        notes.append(f"only {data_ratio:.1%} of the expected response bytes: some answers were errors")
        failed = max(failed, round(n["done"] * (1 - data_ratio)))
    if failed:
        notes.append(f"{failed} failed of {n['done']} (h2load: {n['failed']} failed, {n['errored']} errored, "
                     f"{n['timeout']} timeout; statuses {statuses})")
    if not latencies:
        raise BenchError(f"no successful requests against {label} c{concurrency}:\n{out[-2000:]}")
    return {
        "concurrency": concurrency,
        "ok": ok,
        "done": n["done"],
        "seconds": duration,
        "wall": wall,
        "latencies_ms": np.asarray(latencies) / 1000.0,
        "failed": failed,
        "server_cpu_s": sum(server_cpu),
        "server_cpu_by": {s.name: v for s, v in zip(servers, server_cpu)},
        "client_cpu_s": client_cpu,
        "other_cpu_s": max(0.0, (busy1 - busy0) - sum(server_cpu) - client_cpu),
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------
# Report


def rss_kib(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def machine() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break

    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[-1]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    return {
        "nproc": os.cpu_count(),
        "nproc_cmd": version(["nproc"]),
        "cpu": cpu,
        "kernel": os.uname().release,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "h2load": version(["h2load", "--version"]),
        "onnxruntime": ort.__version__,
        "kserve": version([sys.executable, "-c", "import importlib.metadata as m; print(m.version('kserve'))"]),
        "mlserver": version([str(VENV_BENCH / "bin/python"), "-c", "import importlib.metadata as m; print(m.version('mlserver'))"]),
        "meshserve": version(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
        "meshserve_built": datetime.datetime.fromtimestamp(
            (ROOT / "target/release/meshserve").stat().st_mtime, datetime.timezone.utc
        ).strftime("%Y-%m-%d %H:%M UTC"),
        "mem_gib": round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1),
    }


def machine_line(info: dict, versions: str) -> str:
    """One paragraph: the machine, its load at the start, and the versions that matter."""
    return (
        f"Machine: {info['nproc']} CPUs (`nproc`: {info['nproc_cmd']}), {info['cpu']}, {info['mem_gib']} GiB, "
        f"Linux {info['kernel']}, load average at start {' '.join(info['loadavg'])}; load generator and "
        f"servers share the cores. meshserve: commit {info['meshserve']}, release binary built "
        f"{info['meshserve_built']}. {versions}"
    )


def run_command() -> str:
    """The command line that started this run, as typed to bench/run.sh."""
    return " ".join(["bash bench/run.sh", *(shlex.quote(a) for a in sys.argv[1:])])


SYSTEM_ORDER = {"meshserve": 0, "Triton": 1, "Triton 1 instance": 2, "KServe": 3, "MLServer": 4, "raw ORT": 5}
PROTOCOL_ORDER = {"REST": 0, "gRPC": 1, "in-process": 2}


def fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def report(rows: list[dict], info: dict, rss: dict, servers: dict[str, Server], settings: dict) -> str:
    index = {(r["system"], r["protocol"], r["model"], r["batch"], r["concurrency"]): r for r in rows}
    raw = {(r["model"], r["batch"]): r for r in rows if r["system"] == "raw ORT"}

    def ratio(r: dict, other: str) -> str:
        o = index.get((other, r["protocol"], r["model"], r["batch"], r["concurrency"]))
        return f"{r['rps'] / o['rps']:.1f}x" if o and o["rps"] else "n/a"

    lines = [
        "| model | batch | protocol | concurrency | system | req/s | p50 ms | p99 ms | vs Triton (default / 1 instance) "
        "| vs KServe | vs MLServer | p50 - raw ORT p50 (µs) | req/s by round | CPU: server / h2load / other | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["model"], r["batch"], PROTOCOL_ORDER[r["protocol"]], r["concurrency"], SYSTEM_ORDER[r["system"]])
    for r in sorted(rows, key=key):
        mesh = r["system"] == "meshserve"
        delta = ""
        if mesh and r["concurrency"] == 1 and (r["model"], r["batch"]) in raw:
            delta = f"{(r['p50'] - raw[(r['model'], r['batch'])]['p50']) * 1000:+.0f}"
        name = f"**{r['system']}**" if mesh else r["system"]
        client = f"{r['client_cpu']:.2f}" if r.get("client_cpu") is not None else "-"
        by_round = " / ".join(f"{v:,.0f}" for v in r["round_rps"])
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['protocol']} | {r['concurrency']} | {name} | {r['rps']:,.0f} "
            f"| {fmt_ms(r['p50'])} | {fmt_ms(r['p99'])} "
            f"| {ratio(r, 'Triton') + ' / ' + ratio(r, 'Triton 1 instance') if mesh else ''} "
            f"| {ratio(r, 'KServe') if mesh else ''} "
            f"| {ratio(r, 'MLServer') if mesh else ''} | {delta} | {by_round} "
            f"| {r['server_cpu']:.2f} / {client} / {r['other_cpu']:.2f} | {r['failed']} |"
        )

    # Targets
    checks = []
    for model in MODELS:
        m = index.get(("meshserve", "REST", model, 1, 16))
        for other, want in (("KServe", 10), ("MLServer", 5)):
            o = index.get((other, "REST", model, 1, 16))
            if m and o:
                got = m["rps"] / o["rps"]
                checks.append((f"{model}, V2 REST, batch 1, concurrency 16: meshserve >= {want}x {other} throughput",
                               f"{got:.1f}x ({m['rps']:,.0f} vs {o['rps']:,.0f} req/s)", got >= want))
    for model in MODELS:
        for batch in BATCHES:
            for protocol, limit in (("REST", 100), ("gRPC", 150)):
                m, base = index.get(("meshserve", protocol, model, batch, 1)), raw.get((model, batch))
                if m and base:
                    d = (m["p50"] - base["p50"]) * 1000
                    checks.append((f"{model}, batch {batch}, {protocol}, concurrency 1: p50 - raw ORT p50 <= {limit} µs",
                                   f"{d:+.0f} µs ({fmt_ms(m['p50'])} vs {fmt_ms(base['p50'])} ms)", d <= limit))
    for model in MODELS:
        for batch in BATCHES:
            for concurrency in CONCURRENCY:
                m, t = index.get(("meshserve", "gRPC", model, batch, concurrency)), index.get(("Triton 1 instance", "gRPC", model, batch, concurrency))
                if m and t:
                    got = m["rps"] / t["rps"]
                    checks.append((f"{model}, gRPC, batch {batch}, concurrency {concurrency}: meshserve >= Triton (1 instance each)",
                                   f"{got:.2f}x ({m['rps']:,.0f} vs {t['rps']:,.0f} req/s)", got >= 1))
    if rss:
        checks.append(("meshserve RSS < 60 MB (demo models + mnist_mlp loaded, after the load)",
                       f"VmRSS {rss['VmRSS'] * 1024 / 1e6:.1f} MB (peak VmHWM {rss['VmHWM'] * 1024 / 1e6:.1f} MB; "
                       f"{rss['idle_VmRSS'] * 1024 / 1e6:.1f} MB before the load, after one request of each kind)",
                       rss["VmRSS"] * 1024 < 60e6))

    notes = [n for s in servers.values() for n in s.notes]
    for r in sorted(rows, key=key):
        for n in r.get("notes", []):
            notes.append(f"{r['system']} {r['protocol']} {r['model']} b{r['batch']} c{r['concurrency']}: {n}")

    out = [
        f"Run on {info['date']}: `{run_command()}`. Each row is {settings['rounds']} round(s) of h2load, {settings['warmup']:g} s warm-up "
        f"(not counted) + {settings['duration']:g} s measured, the rounds interleaved across the whole run and "
        "pooled (requests added up, latencies pooled for the percentiles). h2load runs one thread, "
        "`-c <concurrency> -m 1` (one request in flight per connection); REST is HTTP/1.1 with a V2 JSON body, "
        "gRPC is h2c carrying a ModelInferRequest with raw_input_contents. Raw ORT is `session.run` in a "
        "Python loop, in-process, timed per call (servers idle). Everything on 127.0.0.1.",
        "",
        machine_line(info, f"Versions: onnxruntime {info['onnxruntime']}, kserve {info['kserve']}, "
                           f"mlserver {info['mlserver']}, {info.get('triton', 'no Triton')}, {info['h2load']}."),
        "",
        "req/s counts successful answers only. CPU is in cores (CPU-seconds per wall-second, warm-up "
        "included): the server's process group, h2load, and everything else on the machine (other "
        f"tenants, steal); {info['nproc']}.00 is the whole machine. For raw ORT, 'server' is the "
        "Python process running the loop.",
        "",
        *lines,
        "",
        *([rss_line(rss), ""] if rss else []),
        "Targets:",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *[f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in checks],
        "",
    ]
    out += notes_lines(notes, settings["log_errors"])
    return "\n".join(out)


def run_line(args, detail: str) -> str:
    """How a suite was run: the command, rounds and durations, and what each request was."""
    return (f"Command: `{run_command()}`. {args.rounds} rounds x ({args.warmup:g} s warm-up + {args.duration:g} s), "
            f"interleaved; {detail}")


def rows_table(rows: list[dict], first: str = "row") -> list[str]:
    """The results table the mesh-side suites share: throughput, latency, failures, server CPU."""
    lines = [
        f"| {first} | concurrency | req/s | p50 ms | p99 ms | failed | server CPU (cores) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['system']} | {r['concurrency']} | {r['rps']:.0f} | {fmt_ms(r['p50'])} | "
                     f"{fmt_ms(r['p99'])} | {r['failed']} | {r['server_cpu']:.2f} |")
    return lines


def rss_line(rss: dict) -> str:
    return (f"meshserve's RSS: {rss['idle_VmRSS'] * 1024 / 1e6:.1f} MB after start-up and the correctness checks, "
            f"**{rss['VmRSS'] * 1024 / 1e6:.1f} MB after the load**, peak (VmHWM) {rss['VmHWM'] * 1024 / 1e6:.1f} MB.")


def notes_lines(notes: list[str], log_errors: dict) -> list[str]:
    out = []
    if notes:
        out += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    else:
        out += ["No request failed in any row.", ""]
    out += ["Server error lines in the logs: " + ", ".join(f"{k} {v}" for k, v in log_errors.items()) + ".", ""]
    return out


def count_errors(server: Server) -> int:
    text = server.log.read_text(errors="replace")
    if server.name.startswith("meshserve"):
        return sum(1 for line in text.splitlines() if " WARN " in line or " ERROR " in line)
    if server.name.startswith("Envoy"):
        return sum(1 for line in text.splitlines() if re.search(r"\]\[(warning|error|critical)\]", line))
    return sum(1 for line in text.splitlines() if re.search(r"\b(ERROR|Traceback|CRITICAL)\b", line))


# ---------------------------------------------------------------------------------------------


def run_sidecar(args, info: dict, workdir: Path) -> tuple[str, dict]:
    """The sidecar suite: meshserve vs KServe vs MLServer vs raw ORT. Returns (report, raw data)."""
    models = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    for model in models:
        if model not in MODELS:
            raise BenchError(f"unknown model {model}; known: {', '.join(MODELS)}")
    say(f"request bodies and expected answers in {workdir}")
    cases = [c for c in make_cases(workdir) if c.model in models and c.batch in batches]

    say("starting meshserve, KServe, MLServer and Triton on 127.0.0.1")
    servers = {"meshserve": start_meshserve(workdir), "KServe": start_kserve(workdir), "MLServer": start_mlserver(workdir)}
    restarts: dict[str, tuple] = {}
    if (binary := triton_server()) is not None:
        info["triton"] = triton_version()
        for name, instances in (("Triton", None), ("Triton 1 instance", 1)):
            restarts[name] = (lambda n=name, i=instances: start_triton(workdir, binary, n, i), 3)
            servers[name] = restarts[name][0]()
    for s in servers.values():
        say(f"  {s.name}: pid {s.process.pid}, http {s.http}, grpc {s.grpc}")

    say("checking every system's answers (HTTP 200 / grpc-status 0, right numbers)")
    sizes = check_all(servers, cases, "before the load")
    rss_idle = rss_kib(servers["meshserve"].process.pid)

    # Rounds: every measurement once per round, so that each row's seconds are spread over
    # the whole run and a burst of noise from a neighbour lands on all systems alike.
    runs: dict[tuple, list[dict]] = {}
    total = args.rounds * len(cases) * (1 + len(concurrencies) * len(TARGETS))
    done = 0
    for round_ in range(1, args.rounds + 1):
        for case in cases:
            done += 1
            r = raw_ort(case, args.warmup, args.duration)
            runs.setdefault(("raw ORT", "in-process", case.model, case.batch, 1), []).append(r)
            say(f"  [{done}/{total}] round {round_} {case.model} b{case.batch} raw ORT (in-process, servers idle): "
                f"{r['ok'] / r['seconds']:,.0f} calls/s, p50 {np.percentile(r['latencies_ms'], 50):.3f} ms")
        for case in cases:
            for concurrency in concurrencies:
                for system, protocol, _ in TARGETS:
                    server = servers.get(system)
                    done += 1
                    if server is None:
                        continue
                    if (system, protocol, case.model, case.batch) not in sizes:
                        continue
                    if not server.alive() and system in restarts:
                        # Triton 2.51's frontend has crashed here (SIGSEGV in a server thread
                        # after a load ended): started again, said in the notes.
                        start, left = restarts[system]
                        if left == 0:
                            raise BenchError(f"{system} died 3 times; its log:\n{tail(server.log)}")
                        note = (f"{system} died (exit {server.process.returncode}) before {case.model} b{case.batch} "
                                f"c{concurrency} {protocol}; started again")
                        say(note)
                        old_notes = server.notes
                        server = servers[system] = start()
                        server.notes = [*old_notes, note]
                        restarts[system] = (start, left - 1)
                    if not server.alive():
                        raise BenchError(f"{system} died; its log:\n{tail(server.log)}")
                    errors_before = count_errors(server)
                    r = h2load(server, protocol, case, concurrency, args.warmup, args.duration, workdir,
                               sizes[(system, protocol, case.model, case.batch)])
                    time.sleep(0.3)  # let the server log what the end of the run caused
                    if new_errors := count_errors(server) - errors_before:
                        r["notes"].append(f"{new_errors} error lines in {system}'s log during or right after this run")
                    runs.setdefault((system, protocol, case.model, case.batch, concurrency), []).append(r)
                    say(progress(f"[{done}/{total}] round {round_} {case.model} b{case.batch} c{concurrency} {system} {protocol}", r))
    rows = [pooled(measurement) for measurement in runs.values()]

    say("checking the answers again after the load")
    check_all(servers, cases, "after the load")
    rss = rss_kib(servers["meshserve"].process.pid)
    rss["idle_VmRSS"] = rss_idle["VmRSS"]
    say(f"meshserve VmRSS {rss['VmRSS'] * 1024 / 1e6:.1f} MB, VmHWM {rss['VmHWM'] * 1024 / 1e6:.1f} MB")
    log_errors = {s.name: count_errors(s) for s in servers.values()}
    settings = {"warmup": args.warmup, "duration": args.duration, "rounds": args.rounds, "log_errors": log_errors}
    return report(rows, info, rss, servers, settings), {"rss_kib": rss, "rows": rows}


def progress(label: str, r: dict) -> str:
    return (f"  {label}: {r['ok'] / r['seconds']:,.0f} req/s, p50 {np.percentile(r['latencies_ms'], 50):.3f} ms, "
            f"p99 {np.percentile(r['latencies_ms'], 99):.3f} ms, server CPU {r['server_cpu_s'] / r['wall']:.2f}, "
            f"other CPU {r['other_cpu_s'] / r['wall']:.2f}, failed {r['failed']}")


def stop_servers() -> None:
    """Stops every server started so far (each suite stops its own before the next starts)."""
    while SERVERS:
        SERVERS.pop().stop()


SUITES = ("sidecar", "batching", "mesh", "transformer", "logging", "tracing", "graph")
SUITE_TITLES = {
    "sidecar": "meshserve vs KServe vs MLServer vs raw ONNX Runtime",
    "batching": "dynamic batching: meshserve off / on vs MLServer adaptive batching",
    "mesh": "Envoy + wasm router overhead",
    "transformer": "image classification through the wasm transformer vs KServe's Python transformer",
    "logging": "payload logging on vs off, and the spool's throughput",
    "tracing": "tracing every request over OTLP vs not tracing",
    "graph": "an InferenceGraph's steps run by the router filter vs direct calls",
}
DOCS = ROOT / "docs/benchmarks.md"


def update_docs(suite: str, block: str) -> None:
    """Replaces the generated block of `suite` in docs/benchmarks.md (between its markers)."""
    begin, end = f"<!-- bench:{suite}:begin (generated by bench/run.sh --update-docs) -->", f"<!-- bench:{suite}:end -->"
    text = DOCS.read_text()
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        say(f"docs/benchmarks.md has no markers for the {suite} suite; not updated")
        return
    DOCS.write_text(text[: i + len(begin)] + "\n" + block.rstrip() + "\n" + text[j:])
    say(f"updated the {suite} section of docs/benchmarks.md")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="all", choices=[*SUITES, "all"],
                        help="sidecar: meshserve vs KServe vs MLServer vs raw ORT; batching: dynamic batching; "
                             "mesh: Envoy + wasm router overhead; transformer: pictures through the wasm "
                             "transformer vs KServe's; logging: payload logging's cost; tracing: OTLP tracing's cost; graph: an InferenceGraph step's cost; all (default): the seven, "
                             "in that order")
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 2)),
                        help="times each measurement is taken, interleaved; a row pools its rounds")
    parser.add_argument("--duration", type=float, default=float(os.environ.get("BENCH_DURATION", 4)),
                        help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=float(os.environ.get("BENCH_WARMUP", 1)),
                        help="warm-up seconds before each measured run (not counted)")
    parser.add_argument("--results-dir", type=Path, default=BENCH / "results",
                        help="where <date>-<suite>.md and .json go (default: bench/results)")
    parser.add_argument("--update-docs", action="store_true",
                        help="also replace each suite's generated block in docs/benchmarks.md")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the bodies and server logs")
    sidecar = parser.add_argument_group("sidecar suite")
    sidecar.add_argument("--models", default=",".join(MODELS), help="comma-separated subset, for quick runs")
    sidecar.add_argument("--batches", default=",".join(map(str, BATCHES)))
    sidecar.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    import suite_batching
    import suite_graph
    import suite_mesh
    import suite_logging
    import suite_tracing
    import suite_transformer

    suite_batching.add_arguments(parser.add_argument_group("batching suite"))
    suite_mesh.add_arguments(parser.add_argument_group("mesh suite"))
    suite_transformer.add_arguments(parser.add_argument_group("transformer suite"))
    suite_logging.add_arguments(parser.add_argument_group("logging suite"))
    suite_tracing.add_arguments(parser.add_argument_group("tracing suite"))
    suite_graph.add_arguments(parser.add_argument_group("graph suite"))
    args = parser.parse_args()
    runners = {"sidecar": run_sidecar, "batching": suite_batching.run, "mesh": suite_mesh.run,
               "transformer": suite_transformer.run, "logging": suite_logging.run, "tracing": suite_tracing.run, "graph": suite_graph.run}
    suites = list(SUITES) if args.suite == "all" else [args.suite]

    for path, _ in MODELS.values():
        if not path.is_file():
            raise BenchError(f"{path} is missing (run: .venv/bin/python models/generate.py --extra)")
    if not (ROOT / "target/release/meshserve").is_file():
        raise BenchError("target/release/meshserve is missing (run: bash scripts/setup.sh)")
    if not shutil.which("h2load"):
        raise BenchError("h2load is missing (apt-get install nghttp2-client; bench/run.sh does it)")

    texts = []
    for suite in suites:
        started = datetime.datetime.now(datetime.timezone.utc)
        info = machine()
        info["date"] = started.strftime("%Y-%m-%d %H:%M UTC")
        workdir = Path(tempfile.mkdtemp(prefix=f"meshserve-bench-{suite}-"))
        say(f"suite {suite}: {SUITE_TITLES[suite]}")
        t0 = time.monotonic()
        try:
            text, data = runners[suite](args, info, workdir)
        finally:
            stop_servers()
            if args.keep_workdir:
                say(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        text += f"\nThe {suite} suite took {(time.monotonic() - t0) / 60:.1f} minutes.\n"
        out = args.results_dir / f"{started.strftime('%Y-%m-%d')}-{suite}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# meshserve benchmark, {suite} suite: {SUITE_TITLES[suite]}\n\n{text}")
        out.with_suffix(".json").write_text(json.dumps({"info": info, **data}, indent=1, default=str))
        say(f"written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
        if args.update_docs:
            update_docs(suite, text)
        texts.append(f"# {suite} suite\n\n{text}")
    print("\n".join(texts))
    return 0


def _terminate(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    # The suite modules `import bench` for these helpers: let them find this very module (its
    # SERVERS list included), not a second copy of the file.
    sys.modules.setdefault("bench", sys.modules[__name__])
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main())
    except BenchError as e:
        say(f"FAILED: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        say("interrupted; servers stopped")
        sys.exit(130)
