"""An MLServer custom runtime for the benchmark: one ONNX file, run by onnxruntime.

model-settings.json names it as "implementation": "mlserver_onnx_runtime.OnnxRuntime" and
gives the .onnx file as parameters.uri; bench/ must be on PYTHONPATH (bench/bench.py sets it).
It runs the session with default options, as meshserve and the KServe server do.

With BENCH_BATCH_LOG set (the batching suite), each predict() call appends a line "<model> <rows>"
to that file, so the benchmark can tell the batch sizes adaptive batching made.
"""

import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self._settings, wellknown_filenames=["model.onnx"])
        self._session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self._input_name = self._session.get_inputs()[0].name
        self._output_names = [o.name for o in self._session.get_outputs()]
        log = os.environ.get("BENCH_BATCH_LOG")
        self._batch_log = open(log, "a", buffering=1) if log else None  # line-buffered
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = self.decode(payload.inputs[0], default_codec=NumpyCodec)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        results = self._session.run(self._output_names, {self._input_name: x})
        if self._batch_log is not None:
            self._batch_log.write(f"{self.name} {len(x)}\n")
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(name, y) for name, y in zip(self._output_names, results)],
        )
