"""Waits for the demo server, sends the sample digit to mnist_cnn, prints what to try next."""

import json
import os
import sys
import time
import urllib.error
import urllib.request

base, grpc_port, server_pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
sample = "models/samples/mnist_cnn_v2_request.json"


def server_alive():
    try:
        os.kill(server_pid, 0)
        return True
    except OSError:
        return False


deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=1) as response:
            if response.status == 200:
                break
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        pass
    if not server_alive() or time.monotonic() > deadline:
        sys.exit("meshserve did not become ready; see its log above")
    time.sleep(0.1)

with open(sample, "rb") as f:
    body = f.read()
request = urllib.request.Request(
    f"{base}/v2/models/mnist_cnn/infer",
    data=body,
    headers={"Content-Type": "application/json"},
)
with urllib.request.urlopen(request, timeout=10) as response:
    answer = json.load(response)
scores = answer["outputs"][0]["data"]
digit = max(range(len(scores)), key=scores.__getitem__)

print(f"""
Sample request (a handwritten 7, 28x28, Open Inference Protocol V2):
  curl -s -H 'Content-Type: application/json' -d @{sample} {base}/v2/models/mnist_cnn/infer

Answer:
  {json.dumps(answer)[:400]}...
  -> the model says: {digit} (probability {scores[digit]:.4f})

Try:
  {base}/v2                                  server metadata
  {base}/v2/health/ready                     readiness
  {base}/v2/models/mnist_cnn                 model metadata
  curl -s -XPOST {base}/v2/repository/index  the model repository
  curl -s -d @models/samples/sklearn_digits_v1_request.json {base}/v1/models/sklearn_digits:predict   (KServe V1)
  gRPC (inference.GRPCInferenceService) on 127.0.0.1:{grpc_port}
""", flush=True)
