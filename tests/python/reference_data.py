"""Reference fixtures (models/reference/<model>_v<version>.json) and tensor comparison.

A fixture holds one request and the outputs Python onnxruntime computed for it:
{"model", "version", "inputs": [{"name", "datatype", "shape", "data"}], "outputs": [...],
"tolerance" (absolute), optional "expected_labels"}, with "data" flattened in row-major order
and BYTES elements as UTF-8 strings.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "models" / "reference"

# Every (model, version) that has a reference fixture.
REFERENCE_MODELS = (
    ("mnist_cnn", "1"),
    ("sklearn_digits", "1"),
    ("sklearn_digits", "2"),
    ("multi_io", "1"),
    ("identity_all", "1"),
    ("fixed_shape", "1"),
)

NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    array: np.ndarray


@dataclass(frozen=True)
class Reference:
    model: str
    version: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    tolerance: float
    expected_labels: list | None

    def output(self, name: str) -> Tensor:
        return next(tensor for tensor in self.outputs if tensor.name == name)


def load_reference(model: str, version: str) -> Reference:
    document = json.loads((REFERENCE_DIR / f"{model}_v{version}.json").read_text())
    return Reference(
        model=document["model"],
        version=str(document["version"]),
        inputs=[_tensor(tensor) for tensor in document["inputs"]],
        outputs=[_tensor(tensor) for tensor in document["outputs"]],
        tolerance=document["tolerance"],
        expected_labels=document.get("expected_labels"),
    )


def _tensor(document: dict) -> Tensor:
    datatype = document["datatype"]
    data = document["data"]
    if datatype == "BYTES":
        data = [element.encode() for element in data]
    array = np.array(data, dtype=NUMPY_DTYPES[datatype]).reshape(document["shape"])
    return Tensor(document["name"], datatype, array)


def assert_tensor_close(actual: np.ndarray | None, expected: np.ndarray, tolerance: float = 0.0):
    """Floats within the absolute `tolerance` (0: exact), everything else exactly equal.

    BYTES elements compare as bytes: clients give back `str` for JSON data and `bytes` for
    binary data.
    """
    assert actual is not None, "output missing from the response"
    assert actual.shape == expected.shape
    if expected.dtype == np.object_:
        assert [_as_bytes(element) for element in actual.flat] == list(expected.flat)
        return
    assert actual.dtype == expected.dtype
    if np.issubdtype(expected.dtype, np.floating):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance)
    else:
        np.testing.assert_array_equal(actual, expected)


def _as_bytes(element: str | bytes) -> bytes:
    return element.encode() if isinstance(element, str) else element
