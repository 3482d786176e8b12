"""Envoy's CPU per request for several builds of the filters (or whole bootstraps), side by side:
finer than the mesh suite when the question is one change's cost on a noisy machine.

    bash bench/run.sh --suite mesh --rounds 1 --keep-workdir        # prints the kept workdir
    CONC=16 .venv/bin/python bench/mesh_cpu.py WORKDIR N ROUNDS label=SPEC ...

SPEC: `plain` (the suite's (b) bootstrap, no wasm), a meshserve_filters.wasm (the suite's (c)
bootstrap with that module), or `cfg:PATH` (any Envoy bootstrap). One sidecar serves all; each
round starts a fresh Envoy per label in turn (--concurrency 2), warms it with N/4 requests, then
sends N (h2load, V2 REST, mnist_cnn batch 1, at each concurrency in CONC) and reads Envoy's
utime + stime from /proc before and after. Prints each measurement and the medians.
"""
import json, os, subprocess, sys, time, re, signal
from pathlib import Path

import bench as b

W = Path(sys.argv[1]); N = int(sys.argv[2]); ROUNDS = int(sys.argv[3]); variants = [a.split("=", 1) for a in sys.argv[4:]]
ROOT = Path(__file__).resolve().parent.parent
ENVOY = next(ROOT.glob(".venv/lib/python3*/site-packages/envoy/_bin/envoy"))
CONC = [int(c) for c in os.environ.get("CONC", "16").split(",")]
base = json.loads((W / "Envoy_wasm.json").read_text())
plain = json.loads((W / "Envoy_no_wasm.json").read_text())
ecds = json.loads((W / "single/router.ecds.json").read_text())
up = base["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"]
port = base["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
# The sidecar as the mesh suite starts it (bench.py's helper: waits until it listens).
side = b.start_meshserve(W, repository=W / "mesh-repository", name="mesh_cpu sidecar", ports=(up, up + 1))
configs = {}
for label, wasm in variants:
    if wasm == "plain":
        configs[label] = plain
        continue
    if wasm.startswith("cfg:"):
        configs[label] = json.loads(Path(wasm[4:]).read_text())
        continue
    e = json.loads(json.dumps(ecds).replace(str(ROOT / "target/wasm32-wasip1/release/meshserve_filters.wasm"), wasm))
    p = W / f"cpu-{label}.ecds.json"; p.write_text(json.dumps(e))
    configs[label] = json.loads(json.dumps(base).replace(str(W / "single/router.ecds.json"), str(p)))
body = W / "mnist_cnn_b1.json"
res = {}
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
try:
    for r in range(ROUNDS):
        for label, _ in variants:
            cfg = W / f"cpu-{label}.json"; cfg.write_text(json.dumps(configs[label]))
            port = configs[label]["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
            env_p = subprocess.Popen([str(ENVOY), "-c", str(cfg), "--concurrency", "2", "-l", "error"], stdout=subprocess.DEVNULL, stderr=open(W / f"cpu-{label}.log", "w"))
            for _ in range(100):
                try:
                    import urllib.request
                    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/mnist/infer", data=body.read_bytes(), headers={"content-type": "application/json"}), timeout=1).read()
                    break
                except Exception:
                    time.sleep(0.1)
            for c in CONC:
                h = ["h2load", "--h1", "-t", "1", "-c", str(c), "-m", "1", "-d", str(body), "-H", "content-type: application/json"]
                subprocess.run(h + ["-n", str(N // 4), f"http://127.0.0.1:{port}/v2/models/mnist/infer"], capture_output=True)
                t0 = cpu(env_p.pid); w0 = time.monotonic()
                out = subprocess.run(h + ["-n", str(N), f"http://127.0.0.1:{port}/v2/models/mnist/infer"], capture_output=True, text=True).stdout
                t1 = cpu(env_p.pid); w1 = time.monotonic()
                ok = re.search(r"(\d+) succeeded", out).group(1)
                rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
                res.setdefault((label, c), []).append(((t1 - t0) / N * 1e6, rps))
                print(f"round {r} {label} c{c}: {(t1-t0)/N*1e6:.1f} us/req envoy cpu, {rps:.0f} req/s, ok {ok}", flush=True)
            env_p.send_signal(signal.SIGTERM); env_p.wait()
finally:
    side.stop()
print("summary (median us/req, median req/s):")
import statistics
for (label, c), v in res.items():
    print(f"  {label} c{c}: {statistics.median(x[0] for x in v):.1f} us/req, {statistics.median(x[1] for x in v):.0f} req/s")
