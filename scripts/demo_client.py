"""Waits for the demo mesh, sends the sample through Envoy, prints what to try next."""

import base64
import collections
import json
import os
import sys
import time
import urllib.error
import urllib.request

base, mesh_pid = sys.argv[1], int(sys.argv[2])
sample = "models/samples/sklearn_digits_v1_request.json"
headers = {"Content-Type": "application/json"}


def alive():
    try:
        os.kill(mesh_pid, 0)
        return True
    except OSError:
        return False


def predict(extra=None):
    with open(sample, "rb") as f:
        request = urllib.request.Request(f"{base}/v1/models/digits:predict", data=f.read(), headers={**headers, **(extra or {})})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response), response.headers.get("x-meshserve-revision")


def payload_count():
    deadline = time.monotonic() + 5
    while True:
        try:
            with open(".meshserve/payloads.jsonl") as f:
                count = sum(1 for _ in f)
        except OSError:
            count = 0
        # The demo's 101 digits predictions and one explanation make 204 events; they arrive
        # within moments.
        if count >= 204 or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


deadline = time.monotonic() + 120
while True:
    try:
        answer, revision = predict()
        break
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        if not alive() or time.monotonic() > deadline:
            sys.exit("the mesh did not come up; see the log above")
        time.sleep(0.2)

labels = [p["label"] if isinstance(p, dict) else p for p in answer["predictions"]]
served = collections.Counter(predict()[1] for _ in range(100))

# A camera-sized picture of a handwritten digit for the 28x28 CNN: the transformer in Envoy
# decodes, crops, shrinks and inverts it.
photo = "models/samples/digit_photo.jpg"
with open(photo, "rb") as f:
    picture = {"instances": [{"image": {"b64": base64.b64encode(f.read()).decode()}}]}
request = urllib.request.Request(f"{base}/v1/models/mnist:predict", data=json.dumps(picture).encode(), headers=headers)
with urllib.request.urlopen(request, timeout=10) as response:
    digit = json.load(response)["predictions"][0]
# Where the CNN looks: the same photo to `:explain`, pre-processed by the same transformer, then
# occluded patch by patch in the sidecar; the 28x28 heat map shown at half size.
request = urllib.request.Request(f"{base}/v1/models/mnist:explain", data=json.dumps(picture).encode(), headers=headers)
with urllib.request.urlopen(request, timeout=60) as response:
    occluded = json.load(response)
heat_map = occluded["data"]["attributions"][0]
cells = [[sum(heat_map[2 * y + dy][2 * x + dx] for dy in (0, 1) for dx in (0, 1)) / 4 for x in range(14)]
         for y in range(14)]
top = max(abs(v) for row in cells for v in row) or 1.0
occlusion_map = "\n".join("    " + "".join("#" if v > top / 2 else "+" if v > top / 8 else "-" if v < -top / 8 else "."
                                          for v in row) for row in cells)
# The same two digits to the XGBoost booster file, served as it is (converted when it loaded).
with open(sample, "rb") as f:
    request = urllib.request.Request(f"{base}/v1/models/digits-xgboost:predict", data=f.read(), headers=headers)
with urllib.request.urlopen(request, timeout=10) as response:
    boosted = [max(range(len(p)), key=p.__getitem__) for p in json.load(response)["predictions"]]

# Why the default revision (the logistic regression) read the first digit as it did: its
# built-in explainer's Shapley values for that class, one per pixel of the 8x8 image.
with open(sample) as f:
    first = {"instances": json.load(f)["instances"][:1]}
request = urllib.request.Request(f"{base}/v1/models/digits:explain", data=json.dumps(first).encode(),
                                 headers={**headers, "x-meshserve-revision": "default"})
with urllib.request.urlopen(request, timeout=60) as response:
    explained = json.load(response)["data"]
probabilities = explained["raw"]["raw_prediction"][0]
seen = max(range(len(probabilities)), key=probabilities.__getitem__)
values = explained["shap_values"][seen][0]
scale = max(abs(v) for v in values) or 1.0
heat = "\n".join("    " + " ".join("+" if v > scale / 4 else "-" if v < -scale / 4 else "."
                                      for v in values[row * 8:row * 8 + 8]) for row in range(8))

def console():
    try:
        with open(".meshserve/console-address") as f:
            return f"http://{f.read().strip()}/"
    except OSError:
        return "(see meshserve up's summary above)"


print(f"""
Sample request (two 8x8 handwritten digits, KServe V1) sent through Envoy:
  curl -si -d @{sample} {base}/v1/models/digits:predict

Answer: predicted digits {labels}, served by revision {revision} (x-meshserve-revision)

100 more requests, split by the canary router: {dict(served)}

A 1024x768 JPEG photo of a handwritten digit ({photo}), base64 in KServe V1, to the 28x28 CNN
through the transformer in Envoy (decode, grayscale, crop, area-resize to 28x28, invert, scale):
  the CNN says {digit["digits"][0]} (score {digit["scores"][0]:.4f}; runners-up {", ".join(digit["digits"][1:])})
  {base}/v1/models/mnist:predict   (or V2: an "image" BYTES input to {base}/v2/models/mnist/infer)
  ./target/release/meshserve transform envoy-config/demo/inferenceservice.yaml < body.json   what the model gets

Where the CNN looks in that photo (the same body to {base}/v1/models/mnist:explain: the transformer's
28x28 picture, occluded 4x4 pixels at a time in the sidecar, {occluded["meta"]["params"]["windows"]} windows; the drop in the score of {occluded["data"]["target"][0]},
# over half the largest, + over an eighth, - where hiding pixels raises it):
{occlusion_map}

Why the default revision says {seen} for the first digit (KernelSHAP in its sidecar, through Envoy):
p({seen}) = {probabilities[seen]:.3f} = {explained["expected_value"][seen]:.3f} (the mean over the background) + the sum of
each pixel's Shapley value; + pushes towards {seen} and - away (more than a quarter of the largest, {scale:.3f}):
{heat}
  curl -s -d @{sample} {base}/v1/models/digits:explain

The same digits to an XGBoost booster file served as it is (models/frameworks/xgboost_digits/model.bst,
converted to ONNX when it loaded; answers as KServe's xgbserver): digits {boosted}
  curl -s -d @{sample} {base}/v1/models/digits-xgboost:predict

Payload logs (KServe CloudEvents, a request and a response event per call, paired by id): {payload_count()} events
so far in .meshserve/payloads.jsonl, written by `meshserve log-sink` (the digits predictors' logger.url)

The web console (loopback only): {console()}
  the split configured and observed, rates, latency and errors per revision, the canary controls,
  the last payload-log events, and "try it": a picture pre-processed in the page, sent through Envoy

Try:
  {base}/v2/models/digits                    model metadata (Open Inference Protocol)
  curl -s -XPOST -d '{{"inputs": [{{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [{", ".join(["0"] * 64)}]}}]}}' {base}/v2/models/digits/infer
  curl -si -H 'x-meshserve-revision: canary' -d @{sample} {base}/v1/models/digits:predict    pin the canary
  ./target/release/meshserve canary digits --percent 50      move the split live (or --promote, --rollback)
  gRPC (inference.GRPCInferenceService) on the same address
""", flush=True)
