"""The batching suite: meshserve's dynamic batching off and on, against MLServer's adaptive
batching, with batch-1 requests (one row each) at concurrency 1, 16 and 64.

One meshserve process serves a temporary repository holding two copies of each model: `<model>`
(no dynamic batching) and `<model>_batched` (a config.yaml with `dynamic_batching`); both copies
get the same `max_batch_size`, `instance_count` and `intra_op_threads`, so that batching is the
only difference. MLServer (bench/mlserver_onnx_runtime.py, as in the sidecar suite) runs the same
.onnx files with `max_batch_size` and `max_batch_time` set to the same size and delay. Every
measurement reads meshserve's /metrics before and after (rows and executions: the mean batch
size) and the batch log of the MLServer runtime. The compute time of a full batch comes from raw
ONNX Runtime in-process, with meshserve's session options (intra-op threads as configured, no
spinning), servers idle.

Run through bench/run.sh --suite batching (bench/bench.py holds the shared helpers).
"""

from __future__ import annotations

import json
import re
import threading
import time
import types
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort

import bench as b

MODELS = ("mnist_mlp", "mnist_cnn")
CONCURRENCY = (1, 16, 64)
OFF, ON, ALT, MLS = ("meshserve, batching off", "meshserve, batching on", "meshserve, batching on, short delay",
                      "MLServer, adaptive batching")
TRT = "Triton, dynamic batching"
TRT1 = "Triton, dynamic batching, 1 intra-op thread"
UP_OFF, UP_ON = "meshserve up, no batcher", "meshserve up, KServe batcher"


def systems(args) -> list[tuple[str, str, str, int]]:
    """(label, server key, model-name suffix, queue delay in µs) of every system measured."""
    out = [(OFF, "meshserve", "", 0), (ON, "meshserve", "_batched", args.batching_delay_us)]
    if args.batching_short_delay_us:
        out.append((ALT, "meshserve", "_batched_short", args.batching_short_delay_us))
    out.append((MLS, "MLServer", "", args.batching_delay_us))
    if getattr(args, "batching_triton", False):
        out.append((TRT, "Triton", "", args.batching_delay_us))
        out.append((TRT1, "Triton 1 thread", "", args.batching_delay_us))
    if args.batching_up:
        out += [(UP_OFF, "up", "", 0), (UP_ON, "up", "-batched", up_latency_ms(args) * 1000)]
    return out


def up_latency_ms(args) -> int:
    """KServe's batcher takes its maxLatency in whole milliseconds."""
    return max(1, round(args.batching_delay_us / 1000))


def served_name(key: str, model: str, suffix: str) -> str:
    """The model name a system serves `model` under: behind `meshserve up`, the InferenceService's
    name (a DNS label: no underscores)."""
    return (model.replace("_", "-") if key == "up" else model) + suffix


def up_spec(workdir: Path, args, models: list[str]) -> Path:
    """An InferenceService file with each model twice: without and with KServe's batcher (the
    same size and delay as meshserve's batching on)."""
    docs = []
    for model in models:
        for suffix, batcher in (("", ""), ("-batched", f"    batcher:\n      maxBatchSize: {args.batching_max_batch}\n"
                                                      f"      maxLatency: {up_latency_ms(args)}\n")):
            docs.append("apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\n"
                        f"metadata:\n  name: {served_name('up', model, suffix)}\nspec:\n  predictor:\n{batcher}"
                        f"    model:\n      modelFormat: {{name: onnx}}\n      storageUri: file://{b.MODELS[model][0]}\n")
    spec = workdir / "batching-up.yaml"
    spec.write_text("---\n".join(docs))
    return spec


def triton_config(args) -> tuple[str, ...]:
    """Triton's dynamic batcher with meshserve's batching-on settings."""
    return (f"instance_group [{{ count: {args.batching_instances}, kind: KIND_CPU }}]",
            f"dynamic_batching {{ max_queue_delay_microseconds: {args.batching_delay_us} "
            f"preferred_batch_size: [ {args.batching_max_batch} ] }}")


def add_arguments(group) -> None:
    group.add_argument("--batching-models", default=",".join(MODELS))
    group.add_argument("--batching-concurrency", default=",".join(map(str, CONCURRENCY)))
    group.add_argument("--batching-max-batch", type=int, default=32,
                       help="max_batch_size (meshserve and MLServer) and meshserve's preferred_batch_size")
    group.add_argument("--batching-delay-us", type=int, default=2000,
                       help="max_queue_delay_microseconds (meshserve); max_batch_time (MLServer) in µs")
    group.add_argument("--batching-short-delay-us", type=int, default=500,
                       help="a third meshserve copy with this queue delay, measured beside the others (0: none)")
    group.add_argument("--batching-instances", type=int, default=1, help="meshserve instance_count (all copies)")
    group.add_argument("--batching-no-up", dest="batching_up", action="store_false",
                       help="leave out the rows through `meshserve up` (KServe's batcher on and off behind Envoy)")
    group.add_argument("--batching-intra-op-threads", type=int, default=0,
                       help="meshserve intra_op_threads (all copies; 0: one per core)")


def repository(workdir: Path, args) -> Path:
    """<model>, <model>_batched (and <model>_batched_short) for each model, by symbolic links, with
    their config.yaml."""
    repo = workdir / "batching-repository"
    repo.mkdir()
    for model in MODELS:
        source = b.MODELS[model][0].parent  # <model>/1
        common = (f"max_batch_size: {args.batching_max_batch}\ninstance_count: {args.batching_instances}\n"
                  f"intra_op_threads: {args.batching_intra_op_threads}\n")
        batching = lambda delay: ("dynamic_batching:\n"
                                  f"  max_queue_delay_microseconds: {delay}\n"
                                  f"  preferred_batch_size: [{args.batching_max_batch}]\n")
        copies = [(model, common), (f"{model}_batched", common + batching(args.batching_delay_us))]
        if args.batching_short_delay_us:
            copies.append((f"{model}_batched_short", common + batching(args.batching_short_delay_us)))
        for name, config in copies:
            (repo / name).mkdir()
            (repo / name / "1").symlink_to(source)
            (repo / name / "config.yaml").write_text(config)
    return repo


def metrics(server: b.Server) -> dict[tuple[str, str], float]:
    """meshserve's /metrics: (metric name, model) -> value, for the series this suite reads."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = re.match(r"(meshserve_inference_[a-z_]+)\{([^}]*)\} (\S+)$", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if "le" in labels:
            continue
        key = (m.group(1), labels.get("model", ""))
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def triton_metrics(server: b.Server) -> dict[tuple[str, str], float]:
    """Triton's metrics, in meshserve's names: rows, executions and compute time per model."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    names = {"nv_inference_count": ("meshserve_inference_count_total", 1.0),
             "nv_inference_exec_count": ("meshserve_inference_exec_count_total", 1.0),
             "nv_inference_compute_infer_duration_us": ("meshserve_inference_compute_duration_seconds_sum", 1e-6),
             "nv_inference_queue_duration_us": ("meshserve_inference_queue_duration_seconds_sum", 1e-6),
             "nv_inference_request_success": ("meshserve_inference_queue_duration_seconds_count", 1.0)}
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = re.match(r"([a-z_]+)\{([^}]*)\} (\S+)$", line)
        if not m or m.group(1) not in names:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        name, scale = names[m.group(1)]
        key = (name, labels.get("model", ""))
        out[key] = out.get(key, 0.0) + float(m.group(3)) * scale
    return out


def mlserver_batches(log: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            model, _, rows = line.partition(" ")
            if rows.isdigit():
                out.setdefault(model, []).append(int(rows))
    return out


def raw_ort_full_batch(model: str, rows: int, threads: int, warmup: float, duration: float) -> dict:
    """One execution of a full batch in onnxruntime, with meshserve's session options."""
    path, item_shape = b.MODELS[model]
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(np.resize(b.digits(), (rows, 784)).reshape((rows, *item_shape)))
    feed = {"input": x}
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        session.run(["probabilities"], feed)
    times = []
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        t0 = time.perf_counter_ns()
        session.run(["probabilities"], feed)
        times.append(time.perf_counter_ns() - t0)
    return {"latencies_ms": np.asarray(times) / 1e6}


def check_concurrent(server: b.Server, model: str, item_shape: tuple, expected: np.ndarray, bodies: list[bytes],
                     threads: int = 64, per_thread: int = 4) -> None:
    """Many different single-row requests at once, so that they are batched together: each must
    get exactly its own row back."""
    errors: list[str] = []

    def worker(i: int) -> None:
        for k in range(per_thread):
            j = (i + k) % len(bodies)
            request = urllib.request.Request(f"http://127.0.0.1:{server.http}/v2/models/{model}/infer",
                                             data=bodies[j], headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                out = {o["name"]: o for o in answer["outputs"]}["probabilities"]
                y = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
                if not np.allclose(y, expected[j : j + 1], rtol=1e-4, atol=1e-6):
                    errors.append(f"request of digit {j} got another row's answer or wrong numbers")
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"{type(e).__name__}: {e}")

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise b.BenchError(f"{server.name} {model}: {len(errors)} of {threads * per_thread} concurrent requests wrong: "
                           f"{errors[:3]}")


def run(args, info: dict, workdir: Path) -> tuple[str, dict]:
    models = [m for m in args.batching_models.split(",") if m]
    concurrencies = [int(c) for c in args.batching_concurrency.split(",")]
    for model in models:
        if model not in MODELS:
            raise b.BenchError(f"unknown model {model} for the batching suite; known: {', '.join(MODELS)}")
    cases = {c.model: c for c in b.make_cases(workdir) if c.batch == 1 and c.model in models}

    say = b.say
    say("starting meshserve (each model plain and batched) and MLServer (adaptive batching) on 127.0.0.1")
    repo = repository(workdir, args)
    batch_log = workdir / "mlserver-batches.log"
    servers = {
        "meshserve": b.start_meshserve(workdir, repository=repo),
        "MLServer": b.start_mlserver(
            workdir,
            models={m: b.MODELS[m] for m in models},
            model_settings={"max_batch_size": args.batching_max_batch, "max_batch_time": args.batching_delay_us / 1e6},
            env_extra={"BENCH_BATCH_LOG": str(batch_log)},
        ),
    }
    binary = b.triton_server()
    args.batching_triton = binary is not None
    if binary is not None:
        info["triton"] = b.triton_version()
        say("starting Triton with its dynamic batcher (the same size, delay, instances and threads)")
        servers["Triton"] = b.start_triton(workdir, binary, "Triton batching", args.batching_instances,
                                           models={m: b.MODELS[m] for m in models},
                                           intra_op=args.batching_intra_op_threads, max_batch=args.batching_max_batch,
                                           extra_config=triton_config(args), tag="-batching")
        # onnxruntime's intra-op threads spin in Triton (its backend has no setting for it), so
        # its own default of one thread per core fights the load generator for the 2 cores: also
        # with one intra-op thread, the sidecar suite's setting.
        servers["Triton 1 thread"] = b.start_triton(workdir, binary, "Triton batching 1 thread", args.batching_instances,
                                                    models={m: b.MODELS[m] for m in models}, intra_op=1,
                                                    max_batch=args.batching_max_batch,
                                                    extra_config=triton_config(args), tag="-batching-1t")
    sidecars: dict[str, types.SimpleNamespace] = {}
    if args.batching_up:
        say("starting meshserve up: each model without and with KServe's batcher, behind Envoy and the wasm router")
        servers["up"] = b.start_up(workdir, up_spec(workdir, args, models))
        for model in models:
            for suffix in ("", "-batched"):
                name = served_name("up", model, suffix)
                sidecars[name] = types.SimpleNamespace(http=b.sidecar_port(servers["up"], f"{name}-predictor"))
    for s in servers.values():
        say(f"  {s.name}: pid {s.process.pid}, http {s.http}")

    # The four reference digits, each as its own single-row request: for the concurrent check.
    digits = b.digits()
    singles: dict[str, tuple[list[bytes], np.ndarray]] = {}
    for model in models:
        path, item_shape = b.MODELS[model]
        x = digits.reshape((4, *item_shape))
        (expected,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probabilities"], {"input": x})
        bodies = [json.dumps({"inputs": [{"name": "input", "shape": [1, *item_shape], "datatype": "FP32",
                                          "data": x[i].ravel().tolist()}]}).encode() for i in range(4)]
        singles[model] = (bodies, expected)

    def check(when: str) -> dict:
        say(f"checking every system's answers {when} (HTTP 200, right numbers; 256 different requests at once "
            "on the batched ones, each must get its own row)")
        sizes = {}
        for label, key, suffix, _ in systems(args):
            for model in models:
                try:
                    name = served_name(key, model, suffix)
                    sizes[(label, model)] = b.check_rest(servers[key], cases[model], name)
                    if label not in (OFF, UP_OFF):
                        check_concurrent(servers[key], name, b.MODELS[model][1], singles[model][1],
                                         singles[model][0])
                except (OSError, ValueError, KeyError) as e:
                    raise b.BenchError(f"{when}: {label} {model}: {e}") from e
        return sizes

    sizes = check("before the load")
    runs: dict[tuple, list[dict]] = {}
    compute: dict[str, list[dict]] = {}
    total = args.rounds * len(models) * (1 + len(concurrencies) * len(systems(args)))
    done = 0
    for round_ in range(1, args.rounds + 1):
        for model in models:
            done += 1
            r = raw_ort_full_batch(model, args.batching_max_batch, args.batching_intra_op_threads, args.warmup, args.duration)
            compute.setdefault(model, []).append(r)
            say(f"  [{done}/{total}] round {round_} {model} raw ORT batch {args.batching_max_batch} (servers idle): "
                f"p50 {np.percentile(r['latencies_ms'], 50):.3f} ms, p99 {np.percentile(r['latencies_ms'], 99):.3f} ms")
        for model in models:
            case = cases[model]
            for concurrency in concurrencies:
                for label, key, suffix, _ in systems(args):
                    done += 1
                    server = servers[key]
                    if not server.alive():
                        raise b.BenchError(f"{server.name} died; its log:\n{b.tail(server.log)}")
                    name = served_name(key, model, suffix)
                    target = ["--h1", "-d", str(case.rest_body), "-H", "content-type: application/json",
                              b.rest_url(server, name)]
                    errors_before = b.count_errors(server)
                    read = {"meshserve": lambda: metrics(server), "Triton": lambda: triton_metrics(server),
                            "Triton 1 thread": lambda: triton_metrics(server),
                            "up": lambda: metrics(sidecars[name])}.get(key)
                    m0 = read() if read else None
                    n0 = len(mlserver_batches(batch_log).get(model, [])) if key == "MLServer" else 0
                    r = b.h2load_target(f"{label}_{model}", target, [server], concurrency, args.warmup, args.duration,
                                        workdir, sizes[(label, model)])
                    time.sleep(0.3)
                    if read:
                        m1 = read()
                        d = lambda metric: m1.get((metric, name), 0.0) - m0.get((metric, name), 0.0)
                        r["rows"], r["execs"] = d("meshserve_inference_count_total"), d("meshserve_inference_exec_count_total")
                        r["compute_s"] = d("meshserve_inference_compute_duration_seconds_sum")
                        r["queue_s"] = d("meshserve_inference_queue_duration_seconds_sum")
                        r["queued"] = d("meshserve_inference_queue_duration_seconds_count")
                    else:
                        sizes_seen = mlserver_batches(batch_log).get(model, [])[n0:]
                        r["rows"], r["execs"] = float(sum(sizes_seen)), float(len(sizes_seen))
                    if new_errors := b.count_errors(server) - errors_before:
                        r["notes"].append(f"{new_errors} error lines in {server.name}'s log during or right after this run")
                    r.update(system=label, protocol="REST", model=model, batch=1)
                    runs.setdefault((label, model, concurrency), []).append(r)
                    mean = f", mean batch {r['rows'] / r['execs']:.1f}" if r.get("execs") else ""
                    say(b.progress(f"[{done}/{total}] round {round_} {model} c{concurrency} {label}", r) + mean)

    rows = []
    for runs_ in runs.values():
        row = b.pooled(runs_)
        for k in ("rows", "execs", "compute_s", "queue_s", "queued"):
            if k in runs_[0]:
                row[k] = sum(r[k] for r in runs_)
        rows.append(row)
    full = {}
    for model, rs in compute.items():
        lat = np.concatenate([r["latencies_ms"] for r in rs])
        full[model] = {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "calls": len(lat)}

    check("after the load")
    log_errors = {s.name: b.count_errors(s) for s in servers.values()}
    return report(rows, full, info, args, log_errors, models, concurrencies), {"rows": rows, "full_batch_ms": full}


def report(rows: list[dict], full: dict, info: dict, args, log_errors: dict, models: list[str],
           concurrencies: list[int]) -> str:
    index = {(r["system"], r["model"], r["concurrency"]): r for r in rows}
    measured = systems(args)
    order = {label: i for i, (label, _, _, _) in enumerate(measured)}
    delays = {label: delay for label, _, _, delay in measured}
    delay_ms = args.batching_delay_us / 1000
    mb = args.batching_max_batch

    def ratio(r: dict, other: str) -> str:
        o = index.get((other, r["model"], r["concurrency"]))
        return f"{r['rps'] / o['rps']:.2f}x" if o and o["rps"] else "n/a"

    def best_triton(model: str, concurrency: int) -> str:
        """The faster of Triton's two settings at this point."""
        found = [index[k] for k in ((TRT, model, concurrency), (TRT1, model, concurrency)) if k in index]
        return max(found, key=lambda r: r["rps"])["system"] if found else TRT

    lines = [
        "| model | concurrency | system | queue delay µs | req/s | p50 ms | p99 ms | vs batching off | vs MLServer "
        "| vs Triton | mean batch (rows/exec) | mean compute per exec ms | req/s by round | CPU: server / h2load / other "
        "| failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (models.index(r["model"]), r["concurrency"], order[r["system"]])):
        on = r["system"] in (ON, ALT)
        off = UP_OFF if r["system"] == UP_ON else OFF
        batch = f"{r['rows'] / r['execs']:.1f}" if r.get("execs") else "n/a"
        comp = f"{r['compute_s'] / r['execs'] * 1000:.3f}" if r.get("execs") and "compute_s" in r else ""
        name = f"**{r['system']}**" if r["system"] == ON else r["system"]
        lines.append(
            f"| {r['model']} | {r['concurrency']} | {name} | {delays[r['system']] or '-'} | {r['rps']:,.0f} "
            f"| {b.fmt_ms(r['p50'])} | {b.fmt_ms(r['p99'])} | {ratio(r, off) if on or off == UP_OFF else ''} "
            f"| {ratio(r, MLS) if on else ''} | {ratio(r, best_triton(r['model'], r['concurrency'])) if on and args.batching_triton else ''} "
            f"| {batch} | {comp} | {' / '.join(f'{v:,.0f}' for v in r['round_rps'])} "
            f"| {r['server_cpu']:.2f} / {r['client_cpu']:.2f} / {r['other_cpu']:.2f} | {r['failed']} |"
        )

    # The targets, for the main setting (ON); the other figures are context.
    checks = []
    m_on, m_off, m_mls = (index.get((s, "mnist_mlp", 64)) for s in (ON, OFF, MLS))
    if m_on and m_off:
        got = m_on["rps"] / m_off["rps"]
        checks.append(("mnist_mlp, concurrency 64: batching on >= 1.5x batching off (req/s)",
                       f"{got:.2f}x ({m_on['rps']:,.0f} vs {m_off['rps']:,.0f} req/s)", got >= 1.5))
    if m_on and m_mls:
        got = m_on["rps"] / m_mls["rps"]
        checks.append(("mnist_mlp, concurrency 64: batching on >= 5x MLServer with adaptive batching (req/s)",
                       f"{got:.2f}x ({m_on['rps']:,.0f} vs {m_mls['rps']:,.0f} req/s)", got >= 5))
    for model in models:
        on, trt = index.get((ON, model, 64)), index.get((best_triton(model, 64), model, 64))
        if on and trt:
            got = on["rps"] / trt["rps"]
            checks.append((f"{model}, concurrency 64: batching on >= Triton's dynamic batcher, its faster setting (req/s)",
                           f"{got:.2f}x ({on['rps']:,.0f} vs {trt['rps']:,.0f} req/s, {trt['system']})", got >= 1))
    u_on, u_off = index.get((UP_ON, "mnist_mlp", 64)), index.get((UP_OFF, "mnist_mlp", 64))
    if u_on and u_off:
        got = u_on["rps"] / u_off["rps"]
        checks.append(("mnist_mlp, concurrency 64, through `meshserve up`: KServe's batcher >= 1.5x without it (req/s)",
                       f"{got:.2f}x ({u_on['rps']:,.0f} vs {u_off['rps']:,.0f} req/s)", got >= 1.5))
    bounds = {m: delay_ms + v["p50"] for m, v in full.items()}
    if m_on and "mnist_mlp" in full:
        checks.append((f"mnist_mlp, concurrency 64: batching-on p99 <= delay + compute of a full batch "
                       f"({delay_ms:g} + {full['mnist_mlp']['p50']:.3f} = {bounds['mnist_mlp']:.3f} ms)",
                       f"p99 {b.fmt_ms(m_on['p99'])} ms", m_on["p99"] <= bounds["mnist_mlp"]))
    for model in models:
        on, off = index.get((ON, model, 1)), index.get((OFF, model, 1))
        if on and off:
            d = (on["p50"] - off["p50"]) * 1000
            checks.append((f"{model}, concurrency 1: batching adds <= the delay ({args.batching_delay_us} µs) to p50",
                           f"{d:+.0f} µs ({b.fmt_ms(on['p50'])} vs {b.fmt_ms(off['p50'])} ms)", d <= args.batching_delay_us))
    context = []
    for model in models:
        for c in concurrencies:
            r = index.get((ON, model, c))
            if r and model in bounds and not (model == "mnist_mlp" and c == 64):
                context.append(f"{model} c{c} p99 {b.fmt_ms(r['p99'])} ms vs {bounds[model]:.3f}")
    c_on, c_off, c_mls = (index.get((s, "mnist_cnn", 64)) for s in (ON, OFF, MLS))
    if c_on and c_off and c_mls:
        context.append(f"mnist_cnn c64 batching on vs off {c_on['rps'] / c_off['rps']:.2f}x, vs MLServer "
                       f"{c_on['rps'] / c_mls['rps']:.2f}x")
    for model in models:
        alt, off = index.get((ALT, model, 1)), index.get((OFF, model, 1))
        if alt and off:
            context.append(f"{model} c1 with the short delay ({args.batching_short_delay_us} µs): "
                           f"{(alt['p50'] - off['p50']) * 1000:+.0f} µs to p50")

    notes = []
    for r in rows:
        for n in r.get("notes", []):
            notes.append(f"{r['system']} {r['model']} c{r['concurrency']}: {n}")

    common = (f"max_batch_size: {mb}, instance_count: {args.batching_instances}, intra_op_threads: "
              f"{args.batching_intra_op_threads}")
    batching = lambda delay: (f"dynamic_batching: {{max_queue_delay_microseconds: {delay}, "
                              f"preferred_batch_size: [{mb}]}}")
    short = (f" Batching on, short delay: the same with `max_queue_delay_microseconds: {args.batching_short_delay_us}`."
             if args.batching_short_delay_us else "")
    out = [
        f"Run on {info['date']}: `{b.run_command()}`. Each row is {args.rounds} round(s) of h2load, {args.warmup:g} s "
        f"warm-up (not counted) + {args.duration:g} s measured, interleaved and pooled as in the sidecar suite; "
        "`h2load --h1 -c <concurrency> -m 1`, V2 REST JSON, one row per request (the same body every time). "
        "Everything on 127.0.0.1.",
        "",
        b.machine_line(info, f"Versions: onnxruntime {info['onnxruntime']}, mlserver {info['mlserver']}, {info['h2load']}."),
        "",
        f"meshserve: one process, default flags, a repository with a copy of each model per setting "
        f"(`config.yaml`). Batching off: `{common}`. **Batching on** (the setting the targets are read on): "
        f"`{common}, {batching(args.batching_delay_us)}`.{short} MLServer (one inference worker, as in the sidecar "
        f"suite): `\"max_batch_size\": {mb}, \"max_batch_time\": {args.batching_delay_us / 1e6:g}` in each "
        "model-settings.json."
        + (f" Triton ({info.get('triton', 'Triton')}): the same .onnx files, `max_batch_size: {mb}`, "
           f"`{' '.join(triton_config(args))}`, intra-op threads {args.batching_intra_op_threads} "
           "(0: onnxruntime's default, one per core, as meshserve's; these spin, and Triton's backend has no setting "
           "for that) and, as a second Triton, 1 intra-op thread; one inter-op thread; vs Triton: against the faster of "
           "the two at that point; its mean batch and compute "
           "from its metrics (`nv_inference_count` / `nv_inference_exec_count`, `nv_inference_compute_infer_duration_us`)."
           if getattr(args, "batching_triton", False) else " Triton: not installed here (no peer kit), left out.")
        + (" `meshserve up`: one InferenceService per model without `batcher` and one with KServe's "
           f"`batcher: {{maxBatchSize: {mb}, maxLatency: {up_latency_ms(args)}}}` (milliseconds), all behind one Envoy "
           "(the wasm router) with a sidecar each, on the same 2 cores; CPU `server` is Envoy and the sidecars together, "
           "mean batch from each sidecar's own metrics." if args.batching_up else "")
        + " Before and after the load, every system answers the exact body right, and every "
        "batching one answers 256 different single-row requests sent 64 at a time, each with its own row.",
        "",
        "Mean batch: rows per model execution over the whole measurement (warm-up included), from meshserve's "
        "`meshserve_inference_count_total` / `meshserve_inference_exec_count_total`, and for MLServer from the rows its "
        "runtime's `predict` received. Mean compute per exec: `meshserve_inference_compute_duration_seconds` sum / "
        "executions (the session run alone, under this load). CPU as in the sidecar suite.",
        "",
        *lines,
        "",
        f"Compute time of a full batch ({mb} rows), raw onnxruntime in-process with meshserve's session options "
        f"(intra-op threads: {args.batching_intra_op_threads or 'one per core'}, no spinning), servers idle: "
        + "; ".join(f"{m} p50 {v['p50']:.3f} ms, p99 {v['p99']:.3f} ms ({v['calls']:,} calls)" for m, v in full.items())
        + ". The p99 bound is the configured delay plus that p50.",
        "",
        "Targets (batching on, against batching off, MLServer and Triton in the same run):",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *[f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in checks],
        "",
        *([f"Not targets, for context: {'; '.join(context)}.", ""] if context else []),
        *b.notes_lines(notes, log_errors),
    ]
    return "\n".join(out)
