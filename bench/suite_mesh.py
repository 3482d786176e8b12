"""The mesh suite: what Envoy and meshserve's wasm router add in front of a predictor sidecar.

An InferenceService (KServe schema) serving models/repository/mnist_cnn/1/model.onnx is
rendered with `meshserve render`, and one `meshserve serve` sidecar (default flags) serves it on
the upstream ports the render used, from a repository where the model is named after the
InferenceService. Compared, V2 REST batch 1, h2load as in the other suites:

  (a) the sidecar directly;
  (b) Envoy without the wasm filter: a copy of the rendered envoy.json without the http filter
      `meshserve.router`, whose only route sends everything to the revision's cluster;
  (b2) (b) with an empty proxy-wasm filter before Envoy's router (bench/wasm_floor, built here
      with cargo; left out if it cannot be): the floor every Wasm filter pays per request;
  (c) Envoy with the wasm router, as rendered (one revision: the router finds the
      InferenceService by model name and picks its only revision);
  (c2) the same with a canary taking a share of the traffic: a second render whose canary is the
      same model file; its cluster is pointed at the same sidecar, so that (c2) differs from (c)
      only in the router's split decision;
  (c3) the same as (c) with the revision marked as scaling to zero (filter config
      `scale_to_zero`, nothing to wake it) and warm: the activator's warm path (a map lookup per
      request, a readiness probe every 500 ms in the background) against (c) in the same run;
  (c0) only with --mesh-wasm-before M: (c) with another build of the filters, M (say, the
      commit before a change), rendered the same way: a change's cost side by side in one run;
  (d) Envoy with the filters answering by themselves: a request for an unknown model, which the
      router answers 404 without an upstream (a GET without a body: see `unknown_model_post`).

Every Envoy runs with --concurrency N (default 2). Answers are checked before and after the load
(200 and the right numbers for (a)-(c2), x-meshserve-revision present only through the router;
404 and a JSON error for (d)), and the router's own stats are read after each measurement of
(c)/(c2) to prove every request went through it. Then the memory: Envoy's RSS with and without
the wasm filter at --concurrency 1, 2 and 4, each a fresh Envoy after a short load.

Run through bench/run.sh --suite mesh (bench/bench.py holds the shared helpers).
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np

import bench as b

ISVC = "mnist"
MODEL = "mnist_cnn"
UNKNOWN = "no_such_model"
A, B, B2, C0, C, C2, C3, D = (
    "(a) sidecar direct",
    "(b) Envoy, no wasm",
    "(b2) Envoy + an empty wasm filter",
    "(c0) Envoy + wasm router, the module before",
    "(c) Envoy + wasm router",
    "(c2) Envoy + wasm router, canary split",
    "(c3) Envoy + wasm router, revision at zero, warm",
    "(d) Envoy + wasm, unknown model: 404 from the filter",
)
MEMORY_CONCURRENCY = (1, 2, 4)


def add_arguments(group) -> None:
    group.add_argument("--mesh-concurrency", default="1,16")
    group.add_argument("--envoy-concurrency", type=int, default=2, help="Envoy --concurrency for the load rows")
    group.add_argument("--mesh-wasm-before", type=Path, help="another meshserve_filters.wasm for a (c0) row beside (c)")
    group.add_argument("--mesh-canary-percent", type=int, default=20, help="the canary's share in (c2)")


def envoy_binary() -> Path:
    if os.environ.get("MESHSERVE_ENVOY"):
        return Path(os.environ["MESHSERVE_ENVOY"])
    found = sorted((b.ROOT / ".venv/lib").glob("python3*/site-packages/envoy/_bin/envoy"))
    if not found:
        raise b.BenchError("no Envoy in .venv (run: bash scripts/setup.sh) and MESHSERVE_ENVOY is not set")
    return found[0]


def free_pair() -> int:
    """A port P with P and P+1 free (the sidecar's REST and gRPC ports for revision 0)."""
    import socket

    for _ in range(50):
        port = b.free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise b.BenchError("no two adjacent free ports")


def isvc_yaml(model: Path, canary_percent: int | None) -> str:
    text = f"""apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {ISVC}
  namespace: default
spec:
  predictor:
    name: {ISVC}-predictor
    model:
      modelFormat:
        name: onnx
      storageUri: file://{model}
"""
    if canary_percent is not None:
        text += f"""  canary:
    - predictor:
        name: {ISVC}-canary
        model:
          modelFormat:
            name: onnx
          storageUri: file://{model}
      trafficPercent: {canary_percent}
"""
    return text


def render(workdir: Path, name: str, yaml: str, port: int, admin: int, upstream: int, wasm: Path) -> dict:
    (workdir / f"{name}.yaml").write_text(yaml)
    out = workdir / name
    run = subprocess.run(
        [str(b.ROOT / "target/release/meshserve"), "render", str(workdir / f"{name}.yaml"), "--out", str(out),
         "--port", str(port), "--admin-port", str(admin), "--upstream-base-port", str(upstream), "--wasm", str(wasm)],
        capture_output=True, text=True, timeout=60,
    )
    if run.returncode != 0:
        raise b.BenchError(f"meshserve render failed: {run.stderr[-2000:]}")
    return json.loads((out / "envoy.json").read_text())


def set_ports(config: dict, port: int, admin: int) -> dict:
    config = copy.deepcopy(config)
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = port
    return config


def point_clusters_at(config: dict, http_port: int, grpc_port: int) -> dict:
    """Every cluster's endpoint onto the one sidecar (REST clusters to its REST port, gRPC ones to gRPC)."""
    config = copy.deepcopy(config)
    for cluster in config["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                address = endpoint["endpoint"]["address"]["socket_address"]
                address["port_value"] = grpc_port if cluster["name"].endswith(".grpc") else http_port
    return config


def without_wasm(config: dict, cluster: str) -> dict:
    """The same bootstrap without the router filter: one route, straight to `cluster`."""
    config = copy.deepcopy(config)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    before = len(hcm["http_filters"])
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "meshserve.router"]
    if len(hcm["http_filters"]) != before - 1:
        raise b.BenchError("the rendered envoy.json has no http filter named meshserve.router")
    for host in hcm["route_config"]["virtual_hosts"]:
        host["routes"] = [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "60s"}}]
    return config


def floor_module(workdir: Path) -> Path | None:
    """bench/wasm_floor built for wasm32-wasip1 (a proxy-wasm filter whose every callback returns
    at once), or None when it cannot be built here."""
    crate = b.BENCH / "wasm_floor"
    target = workdir / "wasm-floor-target"
    run = subprocess.run(["cargo", "build", "--release", "--quiet", "--target", "wasm32-wasip1",
                          "--manifest-path", str(crate / "Cargo.toml"), "--target-dir", str(target)],
                         capture_output=True, text=True, timeout=600)
    module = target / "wasm32-wasip1/release/meshserve_wasm_floor.wasm"
    if run.returncode != 0 or not module.is_file():
        b.say(f"(b2) left out: bench/wasm_floor did not build: {run.stderr[-500:]}")
        return None
    return module


def with_floor(plain: dict, module: Path) -> dict:
    """(b)'s bootstrap with the empty filter before Envoy's router: what any Wasm filter costs."""
    config = copy.deepcopy(plain)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, {"name": "floor", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {"name": "floor", "root_id": "floor", "vm_config": {
            "vm_id": "floor", "runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": str(module)}}}}}})
    return config


def at_zero(workdir: Path, rendered: Path, config: dict) -> dict:
    """A copy of a rendered bootstrap whose router configuration marks the default revision
    as scaling to zero (nothing wakes it: it is warm), in its own directory."""
    out = workdir / f"{rendered.name}-at-zero"
    out.mkdir()
    ecds = json.loads((rendered / "router.ecds.json").read_text())
    value = ecds["resources"][0]["typed_config"]["config"]["configuration"]
    filters = json.loads(value["value"])
    filters["services"][0]["predictor"]["default"]["scale_to_zero"] = {"wake": None}
    value["value"] = json.dumps(filters)
    (out / "router.ecds.json").write_text(json.dumps(ecds))
    text = json.dumps(config).replace(str(rendered / "router.ecds.json"), str(out / "router.ecds.json"))
    if text == json.dumps(config):
        raise b.BenchError("the rendered envoy.json does not name its router.ecds.json")
    return json.loads(text)


def start_envoy(workdir: Path, name: str, config: dict, concurrency: int) -> b.Server:
    path = workdir / f"{name.replace(' ', '_')}.json"
    path.write_text(json.dumps(config, indent=1))
    server = b.spawn(name, [str(envoy_binary()), "-c", str(path), "--disable-hot-restart", "--concurrency",
                            str(concurrency)], workdir / f"{name.replace(' ', '_')}.log")
    server.http = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    server.grpc = config["admin"]["address"]["socket_address"]["port_value"]  # here: the admin port
    return server


def post(port: int, path: str, body: bytes | None) -> tuple[int, dict, bytes]:
    """One request on a fresh HTTP/1.1 connection: (status, lower-case headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        if body is None:
            connection.request("GET", path)
        else:
            connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def check_inference(label: str, port: int, case: b.Case, revision_header: bool | None) -> tuple[int, str | None]:
    """200 and the right numbers; x-meshserve-revision present (True) or absent (False).
    Returns (body length, revision)."""
    status, headers, body = post(port, f"/v2/models/{ISVC}/infer", case.rest_body.read_bytes())
    if status != 200:
        raise b.BenchError(f"{label}: HTTP {status}: {body[:300]!r}")
    answer = json.loads(body)
    out = {o["name"]: o for o in answer["outputs"]}["probabilities"]
    b.compare(label, "REST", case, np.asarray(out["data"], dtype=np.float32).reshape(out["shape"]))
    revision = headers.get("x-meshserve-revision")
    if revision_header is True and not revision:
        raise b.BenchError(f"{label}: no x-meshserve-revision header: the request did not go through the router")
    if revision_header is False and revision:
        raise b.BenchError(f"{label}: x-meshserve-revision {revision!r} without the router?")
    return len(body), revision


def check_unknown(label: str, port: int) -> int:
    status, headers, body = post(port, f"/v2/models/{UNKNOWN}/infer", None)
    if status != 404 or "error" not in json.loads(body) or "x-meshserve-revision" in headers:
        raise b.BenchError(f"{label}: want 404 with a JSON error from the filter, got {status} {headers} {body[:200]!r}")
    return len(body)


def unknown_model_post(port: int, case: b.Case) -> str:
    """A POST with a body for an unknown model: the filter answers at the headers, before the body,
    and Envoy then closes an HTTP/1.1 connection. Returns what the answer's headers said."""
    status, headers, _ = post(port, f"/v2/models/{UNKNOWN}/infer", case.rest_body.read_bytes())
    return f"POST with a body: HTTP {status}, connection: {headers.get('connection', '(keep-alive)')}"


def router_stats(envoy: b.Server) -> dict[str, int]:
    """The router's `meshserve.requests` counters: "<revision> <outcome>" -> count."""
    with urllib.request.urlopen(f"http://127.0.0.1:{envoy.grpc}/stats?filter=meshserve", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for m in re.finditer(r"meshserve\.requests\.isvc\.(\S+?)\.revision\.(\S+?)\.outcome\.(\S+): (\d+)", text):
        out[f"{m.group(2)} {m.group(3)}"] = out.get(f"{m.group(2)} {m.group(3)}", 0) + int(m.group(4))
    return out


def wait_through(label: str, port: int, case: b.Case, server: b.Server, revision_header: bool | None) -> None:
    deadline = time.monotonic() + 60
    last = ""
    while time.monotonic() < deadline:
        if not server.alive():
            raise b.BenchError(f"{server.name} exited during start-up; its log:\n{b.tail(server.log)}")
        try:
            check_inference(label, port, case, revision_header)
            return
        except (b.BenchError, OSError, ValueError, KeyError) as e:
            last = str(e)
        time.sleep(0.2)
    raise b.BenchError(f"{label} did not answer within 60 s ({last}); Envoy's log:\n{b.tail(server.log)}")


def memory(workdir: Path, wasm_config: dict, plain_config: dict, case: b.Case, sidecar: b.Server) -> dict:
    """Envoy's VmRSS (KiB) with and without the wasm filter, per --concurrency, each a fresh Envoy
    after 4,000 requests on 8 connections (so that every worker has served)."""
    out = {}
    for concurrency in MEMORY_CONCURRENCY:
        for kind, config, header in (("wasm", wasm_config, True), ("no wasm", plain_config, False)):
            port, admin = b.free_port(), b.free_port()
            envoy = start_envoy(workdir, f"Envoy memory {kind} c{concurrency}", set_ports(config, port, admin), concurrency)
            try:
                wait_through(f"Envoy ({kind}, --concurrency {concurrency})", port, case, envoy, header)
                subprocess.run(["h2load", "--h1", "-t", "1", "-c", "8", "-m", "1", "-n", "4000", "-d", str(case.rest_body),
                                "-H", "content-type: application/json", f"http://127.0.0.1:{port}/v2/models/{ISVC}/infer"],
                               capture_output=True, timeout=120, check=True)
                time.sleep(0.5)
                out[(kind, concurrency)] = b.rss_kib(envoy.process.pid)
            finally:
                envoy.stop()
                b.SERVERS.remove(envoy)
    return out


def run(args, info: dict, workdir: Path) -> tuple[str, dict]:
    say = b.say
    concurrencies = [int(c) for c in args.mesh_concurrency.split(",")]
    wasm = b.ROOT / "target/wasm32-wasip1/release/meshserve_filters.wasm"
    if not wasm.is_file():
        raise b.BenchError(f"{wasm} is missing (run: bash scripts/setup.sh)")
    model = b.MODELS[MODEL][0]
    case = next(c for c in b.make_cases(workdir) if c.model == MODEL and c.batch == 1)

    # The sidecar's repository: the model under the InferenceService's name.
    repo = workdir / "mesh-repository"
    (repo / ISVC / "1").mkdir(parents=True)
    (repo / ISVC / "1" / "model.onnx").symlink_to(model)
    upstream = free_pair()

    say("rendering the InferenceService (one revision, and with a canary) with meshserve render")
    single = render(workdir, "single", isvc_yaml(model, None), b.free_port(), b.free_port(), upstream, wasm)
    split = render(workdir, "canary", isvc_yaml(model, args.mesh_canary_percent), b.free_port(), b.free_port(), upstream, wasm)
    split = point_clusters_at(split, upstream, upstream + 1)
    filter_config = json.loads((workdir / "single" / "filter.json").read_text())
    default_cluster = filter_config["services"][0]["predictor"]["default"]["cluster"]
    plain = set_ports(without_wasm(single, default_cluster), b.free_port(), b.free_port())
    zero = set_ports(at_zero(workdir, workdir / "single", single), b.free_port(), b.free_port())
    floor = floor_module(workdir)

    say(f"starting the sidecar on {upstream}/{upstream + 1} and four Envoys (--concurrency {args.envoy_concurrency})")
    sidecar = b.start_meshserve(workdir, repository=repo, name="meshserve sidecar", ports=(upstream, upstream + 1))
    envoys = {
        B: start_envoy(workdir, "Envoy no wasm", plain, args.envoy_concurrency),
        C: start_envoy(workdir, "Envoy wasm", single, args.envoy_concurrency),
        C2: start_envoy(workdir, "Envoy wasm canary", split, args.envoy_concurrency),
        C3: start_envoy(workdir, "Envoy wasm at zero", zero, args.envoy_concurrency),
    }
    if floor is not None:
        envoys[B2] = start_envoy(workdir, "Envoy empty wasm", set_ports(with_floor(plain, floor), b.free_port(),
                                                                         b.free_port()), args.envoy_concurrency)
    if args.mesh_wasm_before:
        before = render(workdir, "before", isvc_yaml(model, None), b.free_port(), b.free_port(), upstream,
                        args.mesh_wasm_before.resolve())
        envoys[C0] = start_envoy(workdir, "Envoy wasm before", before, args.envoy_concurrency)
    for label, envoy in envoys.items():
        wait_through(label, envoy.http, case, envoy, label not in (B, B2))
    ports = {label: envoy.http for label, envoy in envoys.items()} | {A: sidecar.http, D: envoys[C].http}
    procs = {label: [sidecar, envoy] for label, envoy in envoys.items()} | {A: [sidecar], D: [sidecar, envoys[C]]}

    def check(when: str) -> dict:
        say(f"checking the answers {when}")
        sizes = {A: check_inference(A, ports[A], case, None)[0], B: check_inference(B, ports[B], case, False)[0],
                 C: check_inference(C, ports[C], case, True)[0], C3: check_inference(C3, ports[C3], case, True)[0],
                 D: check_unknown(D, ports[D])}
        if C0 in ports:
            sizes[C0] = check_inference(C0, ports[C0], case, True)[0]
        if B2 in ports:
            sizes[B2] = check_inference(B2, ports[B2], case, False)[0]
        seen = {check_inference(C2, ports[C2], case, True)[1] for _ in range(60)}
        if len(seen) < 2 and 0 < args.mesh_canary_percent < 100:
            raise b.BenchError(f"{C2}: 60 requests all went to {seen}; the split does not split")
        sizes[C2] = sizes[C]
        return sizes

    sizes = check("before the load")
    post_note = unknown_model_post(ports[D], case)
    rss_before = {label: b.rss_kib(e.process.pid) for label, e in envoys.items()}

    labels = [label for label in (A, B, B2, C0, C, C2, C3, D) if label in ports]
    runs: dict[tuple, list[dict]] = {}
    total = args.rounds * len(concurrencies) * len(labels)
    done = 0
    for round_ in range(1, args.rounds + 1):
        for concurrency in concurrencies:
            for label in labels:
                done += 1
                if label == D:
                    target = ["--h1", f"http://127.0.0.1:{ports[D]}/v2/models/{UNKNOWN}/infer"]
                else:
                    target = ["--h1", "-d", str(case.rest_body), "-H", "content-type: application/json",
                              f"http://127.0.0.1:{ports[label]}/v2/models/{ISVC}/infer"]
                for p in procs[label]:
                    if not p.alive():
                        raise b.BenchError(f"{p.name} died; its log:\n{b.tail(p.log)}")
                envoy = envoys.get(C if label == D else label)
                stats0 = router_stats(envoy) if envoy and label not in (B, B2) else {}
                errors0 = {p.name: b.count_errors(p) for p in procs[label]}
                r = b.h2load_target(label.split(")")[0].strip("("), target, procs[label], concurrency, args.warmup,
                                    args.duration, workdir, sizes[label], expect="404" if label == D else "2xx")
                time.sleep(0.3)
                for p in procs[label]:
                    if new := b.count_errors(p) - errors0[p.name]:
                        r["notes"].append(f"{new} warning/error lines in {p.name}'s log during or right after this run")
                if envoy and label not in (B, B2):
                    stats1 = router_stats(envoy)
                    r["router"] = {k: v - stats0.get(k, 0) for k, v in stats1.items() if v - stats0.get(k, 0)}
                    decided = sum(r["router"].values())
                    # Warm-up requests go through the router too: it must have decided at least every answer.
                    if decided < r["done"]:
                        r["notes"].append(f"the router decided {decided} requests but h2load got {r['done']} answers")
                r.update(system=label, protocol="REST", model=MODEL, batch=1)
                runs.setdefault((label, concurrency), []).append(r)
                say(b.progress(f"[{done}/{total}] round {round_} c{concurrency} {label}", r))
    rows = []
    for rs in runs.values():
        row = b.pooled(rs)
        router: dict[str, int] = {}
        for r in rs:
            for k, v in r.get("router", {}).items():
                router[k] = router.get(k, 0) + v
        row["router"] = router
        rows.append(row)

    sizes_after = check("after the load")
    rss_after = {label: b.rss_kib(e.process.pid) for label, e in envoys.items()}
    sidecar_rss = b.rss_kib(sidecar.process.pid)
    log_errors = {s.name: b.count_errors(s) for s in [sidecar, *envoys.values()]}
    for s in list(envoys.values()):
        s.stop()

    say("memory: Envoy's RSS with and without the wasm filter at --concurrency " + ", ".join(map(str, MEMORY_CONCURRENCY)))
    mem = memory(workdir, set_ports(single, 0, 0), set_ports(plain, 0, 0), case, sidecar)
    for (kind, c), v in mem.items():
        say(f"  {kind} --concurrency {c}: VmRSS {v['VmRSS'] / 1024:.1f} MiB")
    data = {"rows": rows, "memory_kib": {f"{k} c{c}": v for (k, c), v in mem.items()},
            "rss_after_kib": rss_after, "rss_before_kib": rss_before, "sidecar_rss_kib": sidecar_rss}
    text = report(rows, mem, rss_after, info, args, log_errors, concurrencies, post_note)
    return text, data


def report(rows: list[dict], mem: dict, rss_after: dict, info: dict, args, log_errors: dict, concurrencies: list[int],
           post_note: str) -> str:
    index = {(r["system"], r["concurrency"]): r for r in rows}
    order = {label: i for i, label in enumerate([A, B, B2, C0, C, C2, C3, D])}
    lines = [
        "| concurrency | path | req/s | p50 ms | p99 ms | p50 vs (a) µs | p50 vs (b) µs | req/s vs (b) | req/s by round "
        "| CPU: sidecar / Envoy / h2load / other | CPU µs per request: sidecar / Envoy | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["concurrency"], order[r["system"]])):
        a, base = index.get((A, r["concurrency"])), index.get((B, r["concurrency"]))
        vs_a = f"{(r['p50'] - a['p50']) * 1000:+.0f}" if a and r["system"] != A else ""
        vs_b = f"{(r['p50'] - base['p50']) * 1000:+.0f}" if base and r["system"] not in (A, B) else ""
        rps_b = f"{r['rps'] / base['rps']:.2f}x" if base and r["system"] not in (A, B) else ""
        by = r["server_cpu_by"]
        side = by.get("meshserve sidecar", 0.0)
        env = sum(v for k, v in by.items() if k.startswith("Envoy"))
        env_s = f"{env:.2f}" if r["system"] != A else "-"
        lines.append(
            f"| {r['concurrency']} | {r['system']} | {r['rps']:,.0f} | {r['p50']:.3f} | {r['p99']:.3f} | {vs_a} | {vs_b} "
            f"| {rps_b} | {' / '.join(f'{v:,.0f}' for v in r['round_rps'])} "
            f"| {side:.2f} / {env_s} / {r['client_cpu']:.2f} / {r['other_cpu']:.2f} "
            f"| {side / r['rps'] * 1e6:.0f} / {env / r['rps'] * 1e6 if r['system'] != A else '-':{'.0f' if r['system'] != A else ''}} "
            f"| {r['failed']} |"
        )

    checks = []
    for c in concurrencies:
        base = index.get((B, c))
        for label in (C, C2):
            r = index.get((label, c))
            if not (r and base):
                continue
            d = (r["p50"] - base["p50"]) * 1000
            checks.append((f"{label.split(' ')[0]} vs (b), concurrency {c}: wasm router adds <= 50 µs to p50",
                           f"{d:+.0f} µs ({r['p50']:.3f} vs {base['p50']:.3f} ms)", d <= 50))
            q = r["rps"] / base["rps"]
            checks.append((f"{label.split(' ')[0]} vs (b), concurrency {c}: >= 90% of the no-wasm req/s",
                           f"{q:.1%} ({r['rps']:,.0f} vs {base['rps']:,.0f} req/s)", q >= 0.9))

        env = lambda row: sum(v for k, v in row["server_cpu_by"].items() if k.startswith("Envoy")) / row["rps"] * 1e6
        for label in (C, C2):
            r = index.get((label, c))
            if r and base:
                d = env(r) - env(base)
                floor_row = index.get((B2, c))
                floor_note = f"; an empty wasm filter alone (b2): {env(floor_row) - env(base):+.0f} µs" if floor_row else ""
                checks.append((f"{label.split(' ')[0]} vs (b), concurrency {c}: wasm router adds <= 30 µs of Envoy CPU "
                               "per request", f"{d:+.0f} µs ({env(r):.0f} vs {env(base):.0f} µs per request{floor_note})",
                               d <= 30))
        for label, than, what in ((C3, C, "the activator's warm path"), (C, C0, "this module against the one before")):
            r, other = index.get((label, c)), index.get((than, c))
            if r and other:
                d = env(r) - env(other)
                checks.append((f"{label.split(' ')[0]} vs {than.split(' ')[0]}, concurrency {c}: {what} adds <= 10% of "
                               "Envoy's CPU per request",
                               f"{d:+.0f} µs ({env(r):.0f} vs {env(other):.0f} µs per request)", d <= 0.1 * env(other)))

    split = []
    for c in concurrencies:
        r = index.get((C2, c))
        if r and r["router"]:
            routed = {k.split(" ")[0]: v for k, v in r["router"].items() if k.endswith(" routed")}
            total = sum(routed.values())
            canary = sum(v for k, v in routed.items() if k.endswith("-canary"))
            split.append(f"concurrency {c}: {canary:,} of {total:,} to the canary ({canary / total:.1%})")
    router_counts = "; ".join(
        f"{r['system'].split(' ')[0]} c{r['concurrency']}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(r["router"].items()))
        for r in sorted(rows, key=lambda r: (r["concurrency"], order[r["system"]])) if r.get("router")
    )

    mib = lambda kib: kib / 1024
    mem_lines = ["| Envoy --concurrency | VmRSS without wasm MiB | VmRSS with wasm MiB | wasm adds MiB |", "|---|---|---|---|"]
    for c in MEMORY_CONCURRENCY:
        w, p = mem.get(("wasm", c)), mem.get(("no wasm", c))
        if w and p:
            mem_lines.append(f"| {c} | {mib(p['VmRSS']):.1f} | {mib(w['VmRSS']):.1f} | {mib(w['VmRSS'] - p['VmRSS']):+.1f} |")
    per_worker = []
    for lo, hi in ((1, 2), (1, 4)):
        try:
            d = ((mem[("wasm", hi)]["VmRSS"] - mem[("no wasm", hi)]["VmRSS"])
                 - (mem[("wasm", lo)]["VmRSS"] - mem[("no wasm", lo)]["VmRSS"])) / (hi - lo)
            per_worker.append(f"{mib(d):.1f} MiB per worker from --concurrency {lo} to {hi}")
        except KeyError:
            pass

    notes = []
    for r in rows:
        for n in r.get("notes", []):
            notes.append(f"{r['system']} c{r['concurrency']}: {n}")

    out = [
        f"Run on {info['date']}: `{b.run_command()}`. Each row is {args.rounds} round(s) of h2load, {args.warmup:g} s "
        f"warm-up (not counted) + {args.duration:g} s measured, interleaved and pooled as in the other suites; "
        "`h2load --h1 -c <concurrency> -m 1`, V2 REST JSON, batch 1, mnist_cnn. Everything on 127.0.0.1.",
        "",
        b.machine_line(info, f"Versions: {envoy_version()}, {info['h2load']}."),
        "",
        f"One sidecar (`meshserve serve`, default flags) serves the InferenceService `{ISVC}` "
        f"(`storageUri: file://…/models/repository/mnist_cnn/1/model.onnx`). The Envoys (`--concurrency "
        f"{args.envoy_concurrency}`) use the bootstrap `meshserve render` wrote: (b) a copy without the "
        "`meshserve.router` filter and with one route to the revision's cluster; (b2) (b) with an empty proxy-wasm "
        "filter before Envoy's router (`bench/wasm_floor`: every callback returns at once, no host call), the floor any "
        "Wasm filter pays; (c) as rendered; (c2) rendered "
        f"with a canary at {args.mesh_canary_percent}% (the same model; its cluster pointed at the same sidecar); "
        + (f"(c0) as (c) with another build of the filters (`{args.mesh_wasm_before}`); "
           if args.mesh_wasm_before else "")
        + "(c3) as (c) with the revision marked as scaling to zero (`scale_to_zero` in the router's configuration) and "
        f"warm: the activator's warm path; (d) `GET /v2/models/{UNKNOWN}/infer` (no body) through (c)'s Envoy, answered 404 by the filter. CPU: the "
        "sidecar, the Envoy serving the row, h2load, everything else (cores, warm-up included); per request: "
        "those cores divided by req/s.",
        "",
        *lines,
        "",
        "Router stats (`meshserve.requests`, warm-up included) per measurement: " + (router_counts or "none") + ".",
        "",
        *([f"Canary split measured by the router's stats: {'; '.join(split)}.", ""] if split else []),
        "Memory: Envoy's VmRSS, a fresh Envoy per line after 4,000 requests on 8 connections (`h2load -c 8 -n 4000`), "
        "with the rendered bootstrap (wasm router loaded: one V8 VM per worker plus the main thread's) and without "
        "the filter:",
        "",
        *mem_lines,
        "",
        "Wasm cost per additional worker: " + ("; ".join(per_worker) or "n/a") + ". The Envoys of the load rows after "
        "the load (--concurrency " + str(args.envoy_concurrency) + "): "
        + ", ".join(f"{k.split(')')[0]}) {mib(v['VmRSS']):.1f} MiB" for k, v in rss_after.items()) + ".",
        "",
        "Targets ((c) and (c2) against (b), (c3) and (c) against (c0), measured side by side):",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *[f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in checks],
        "",
        f"Unknown model, {post_note} (checked once, not measured).",
        "",
        *b.notes_lines(notes, log_errors),
    ]
    return "\n".join(out)


def envoy_version() -> str:
    try:
        out = subprocess.run([str(envoy_binary()), "--version"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"version: \S+?/([\d.]+)/", out)
        return f"Envoy {m.group(1)}" if m else "Envoy ?"
    except (OSError, subprocess.SubprocessError):
        return "Envoy ?"
