"""KServe's framework servers, for the benchmark: one kserve.Model per model file that does what
KServe's sklearnserver, xgbserver and lgbserver do per request (their python/*/model.py in
kserve/kserve: read the input with kserve.utils.utils.get_predict_input, call the framework's
predict, answer with get_predict_response), with their defaults (nthread 1, one worker).
Those servers are not on PyPI; the kserve package they run on is (0.21, from requirements.txt).

    python bench/kserve_framework_server.py --bench-http-port P --bench-format xgboost \
        --bench-model NAME=FILE

Listens on 127.0.0.1 only (bench/kserve_loopback.py); kserve parses sys.argv at import time,
so this script's flags are prefixed with --bench-.
"""

import argparse
import logging
import sys

ours = argparse.ArgumentParser()
ours.add_argument("--bench-http-port", type=int, required=True)
ours.add_argument("--bench-format", choices=["sklearn", "xgboost", "lightgbm"], required=True)
ours.add_argument("--bench-model", required=True, metavar="NAME=FILE")
options, rest = ours.parse_known_args()
sys.argv = [sys.argv[0], *rest]

import kserve_loopback  # noqa: E402,F401
from kserve import Model, ModelServer  # noqa: E402
from kserve.utils.utils import get_predict_input, get_predict_response  # noqa: E402

NTHREAD = 1  # xgbserver's and lgbserver's --nthread default


class FrameworkModel(Model):
    def __init__(self, name, path, framework):
        super().__init__(name)
        self.path, self.framework = path, framework
        self.load()

    def load(self):
        if self.framework == "sklearn":
            import joblib

            self.model = joblib.load(self.path)
        elif self.framework == "xgboost":
            import xgboost

            with open(self.path, "rb") as f:
                self.model = xgboost.Booster(params={"nthread": NTHREAD}, model_file=bytearray(f.read()))
        else:
            import lightgbm

            self.model = lightgbm.Booster(params={"nthread": NTHREAD}, model_file=self.path)
        self.ready = True
        return True

    def predict(self, payload, headers=None):
        if self.framework == "xgboost":
            import xgboost

            instances = get_predict_input(payload)
            result = self.model.predict(xgboost.DMatrix(instances, nthread=NTHREAD))
        elif self.framework == "lightgbm":
            instances = get_predict_input(payload, columns=self.model.feature_name())
            result = self.model.predict(instances)
        else:
            result = self.model.predict(get_predict_input(payload))
        return get_predict_response(payload, result, self.name)


if __name__ == "__main__":
    name, _, path = options.bench_model.partition("=")
    server = ModelServer(http_port=options.bench_http_port, grpc_port=8081, enable_grpc=False, workers=1,
                         enable_latency_logging=False)
    for noisy in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    server.start([FrameworkModel(name, path, options.bench_format)])
