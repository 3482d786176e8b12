"""The KServe Python server, for the benchmark: a kserve.Model per ONNX file, run by onnxruntime.

    python bench/kserve_onnx_server.py --bench-http-port P [--bench-grpc-port G] \
        --bench-model NAME=PATH [--bench-model NAME=PATH ...]

Serves the Open Inference Protocol (V2) REST on 127.0.0.1:P and, with --bench-grpc-port, the
V2 gRPC service on 127.0.0.1:G (else gRPC is off). One process, one uvicorn worker: KServe's
defaults, except that the per-request log lines are off (the latency line, the timing
middleware's kserve.trace lines and uvicorn's access log: three lines per request otherwise,
which meshserve does not write either) and the listeners are bound to loopback (KServe 0.21
hard-codes 0.0.0.0 / [::]).

kserve parses sys.argv at import time (parse_known_args), so this script's own flags are
prefixed with --bench- to stay out of its way.
"""

import argparse
import logging
import sys

import numpy as np
import onnxruntime as ort

ours = argparse.ArgumentParser()
ours.add_argument("--bench-http-port", type=int, required=True)
ours.add_argument("--bench-grpc-port", type=int, default=0, help="0: gRPC off")
ours.add_argument("--bench-model", action="append", required=True, metavar="NAME=PATH")
options, rest = ours.parse_known_args()
sys.argv = [sys.argv[0], *rest]  # what kserve's own parser sees

import kserve_loopback  # noqa: E402,F401  (binds KServe's listeners to loopback)
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer  # noqa: E402
from kserve.utils.utils import generate_uuid  # noqa: E402


class OnnxModel(Model):
    """One ONNX file, one onnxruntime session with default options (as meshserve uses)."""

    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        self.session = None
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        results = self.session.run(self.output_names, {self.input_name: x})
        outputs = []
        for name, y in zip(self.output_names, results):
            output = InferOutput(name=name, shape=list(y.shape), datatype="FP32")
            output.set_data_from_numpy(y, binary_data=payload.use_binary_outputs)
            outputs.append(output)
        return InferResponse(
            response_id=payload.id or generate_uuid(),
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
        )


if __name__ == "__main__":
    models = []
    for spec in options.bench_model:
        name, _, path = spec.partition("=")
        models.append(OnnxModel(name, path))
    server = ModelServer(
        http_port=options.bench_http_port,
        grpc_port=options.bench_grpc_port or 8081,
        enable_grpc=options.bench_grpc_port != 0,
        workers=1,
        enable_latency_logging=False,
    )
    # KServe configures logging in ModelServer(); keep its start-up lines but drop the
    # per-request ones (uvicorn's access log and the timing middleware's kserve.trace lines).
    for noisy in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    server.start(models)
