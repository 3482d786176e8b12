"""KServe's transformer architecture, for the transformer benchmark: a kserve.Model whose
preprocess decodes the base64 picture with Pillow and makes the 28x28 tensor (the same steps as
the demo InferenceService's meshserve pipeline: grayscale, centre crop, area resize, invert,
1/255), calls the predictor over the Open Inference Protocol (REST, as KServe's transformer
does), and whose postprocess answers the top three digits with their scores: KServe's image
transformer example (docs/samples/v1beta1/transformer), made to do meshserve's demo pipeline.

    python bench/kserve_image_transformer.py --bench-http-port P --bench-predictor 127.0.0.1:Q

One process, one uvicorn worker, per-request logs off, loopback only (as bench/kserve_onnx_server.py).
"""

import argparse
import base64
import io
import logging
import sys

import numpy as np
from PIL import Image

ours = argparse.ArgumentParser()
ours.add_argument("--bench-http-port", type=int, required=True)
ours.add_argument("--bench-predictor", required=True, metavar="HOST:PORT")
ours.add_argument("--bench-model", default="mnist")
options, rest = ours.parse_known_args()
sys.argv = [sys.argv[0], *rest]  # what kserve's own parser sees

import kserve_loopback  # noqa: E402,F401  (binds KServe's listeners to loopback)
from kserve import InferInput, InferRequest, InferResponse, Model, ModelServer  # noqa: E402
from kserve.predictor_config import PredictorConfig  # noqa: E402

LABELS = [str(d) for d in range(10)]


def image_tensor(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64))).convert("L")
    w, h = image.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    small = np.asarray(image.resize((28, 28), Image.BOX, box=box), dtype=np.float32)
    return ((255.0 - small) / 255.0)[np.newaxis]


class ImageTransformer(Model):
    def __init__(self, name: str):
        super().__init__(name)
        self.ready = True

    def preprocess(self, payload, headers=None) -> InferRequest:
        instances = payload["instances"]
        batch = np.stack([image_tensor(i["image"]["b64"]) for i in instances])
        tensor = InferInput(name="input", shape=list(batch.shape), datatype="FP32")
        tensor.set_data_from_numpy(batch, binary_data=False)
        return InferRequest(model_name=self.name, infer_inputs=[tensor], request_id=None)

    def postprocess(self, response: InferResponse, headers=None):
        probabilities = response.outputs[0].as_numpy()
        predictions = []
        for row in probabilities:
            best = np.argsort(-row, kind="stable")[:3]
            predictions.append({"digits": [LABELS[i] for i in best], "scores": [float(row[i]) for i in best]})
        return {"predictions": predictions}


if __name__ == "__main__":
    server = ModelServer(
        http_port=options.bench_http_port,
        enable_grpc=False,
        workers=1,
        enable_latency_logging=False,
        predictor_config=PredictorConfig(predictor_host=options.bench_predictor, predictor_protocol="v2"),
    )
    for noisy in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    server.start([ImageTransformer(options.bench_model)])
