"""NVIDIA's tritonclient (HTTP and gRPC), unchanged, against meshserve."""

from dataclasses import dataclass
from types import ModuleType

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from reference_data import NUMPY_DTYPES, REFERENCE_MODELS, Tensor, assert_tensor_close, load_reference

# identity_all maps input in_<type> to output out_<type>, both [-1, -1], for each of these.
IDENTITY_TYPES = "uint8 uint16 uint32 uint64 int8 int16 int32 int64 fp16 fp32 fp64 bool bytes".split()

# Model metadata as OIP reports it: {"inputs"|"outputs": {tensor name: (datatype, shape)}}.
SIGNATURES = {
    "mnist_cnn": {
        "inputs": {"input": ("FP32", [-1, 1, 28, 28])},
        "outputs": {"probabilities": ("FP32", [-1, 10])},
    },
    "sklearn_digits": {
        "inputs": {"input": ("FP32", [-1, 64])},
        "outputs": {"label": ("INT64", [-1]), "probabilities": ("FP32", [-1, 10])},
    },
    "fixed_shape": {
        "inputs": {"x": ("FP32", [2, 3])},
        "outputs": {"y": ("FP32", [2, 3])},
    },
    "identity_all": {
        "inputs": {f"in_{kind}": (kind.upper(), [-1, -1]) for kind in IDENTITY_TYPES},
        "outputs": {f"out_{kind}": (kind.upper(), [-1, -1]) for kind in IDENTITY_TYPES},
    },
}


@dataclass(frozen=True)
class Triton:
    """One tritonclient flavour: its module (InferInput and friends) and a connected client."""

    module: ModuleType
    client: httpclient.InferenceServerClient | grpcclient.InferenceServerClient


@pytest.fixture(scope="module")
def http_client(server):
    with httpclient.InferenceServerClient(server.http_address) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(server):
    with grpcclient.InferenceServerClient(server.grpc_address) as client:
        yield client


@pytest.fixture(params=["http", "grpc"])
def triton(request, http_client, grpc_client):
    if request.param == "http":
        return Triton(httpclient, http_client)
    return Triton(grpcclient, grpc_client)


def infer_inputs(module: ModuleType, tensors: list[Tensor], **data_options):
    return [
        module.InferInput(tensor.name, list(tensor.array.shape), tensor.datatype)
        .set_data_from_numpy(tensor.array, **data_options)
        for tensor in tensors
    ]


def assert_outputs_match(result, reference):
    for expected in reference.outputs:
        assert_tensor_close(result.as_numpy(expected.name), expected.array, reference.tolerance)


def identity_array(kind: str) -> np.ndarray:
    """A [2, 3] tensor of `kind` holding its edge values."""
    if kind == "bool":
        return np.array([[True, False, True], [False, False, True]])
    if kind == "bytes":
        # ONNX string tensors hold UTF-8 text without NUL characters.
        texts = [["", "ascii", "h\u00e9llo"], ["\u65e5\u672c \U0001f642", "x" * 300, "line\nbreak"]]
        return np.array([[text.encode() for text in row] for row in texts], dtype=np.object_)
    dtype = NUMPY_DTYPES[kind.upper()]
    if np.issubdtype(dtype, np.integer):
        limits = np.iinfo(dtype)
        return np.array([[limits.min, 0, limits.max], [1, 2, 3]], dtype=dtype)
    limits = np.finfo(dtype)
    return np.array([[limits.min, -0.0, limits.max], [limits.tiny, np.inf, np.nan]], dtype=dtype)


def http_signature(metadata: dict) -> dict:
    return {
        section: {tensor["name"]: (tensor["datatype"], list(tensor["shape"])) for tensor in metadata[section]}
        for section in ("inputs", "outputs")
    }


def grpc_signature(metadata) -> dict:
    return {
        section: {tensor.name: (tensor.datatype, list(tensor.shape)) for tensor in getattr(metadata, section)}
        for section in ("inputs", "outputs")
    }


def test_server_is_live_and_ready(triton):
    assert triton.client.is_server_live()
    assert triton.client.is_server_ready()


@pytest.mark.parametrize(
    ("model", "version"),
    [("mnist_cnn", ""), ("mnist_cnn", "1"), ("sklearn_digits", "1"), ("sklearn_digits", "2")],
)
def test_model_is_ready(triton, model, version):
    assert triton.client.is_model_ready(model, version)


@pytest.mark.parametrize(("model", "version"), [("no_such_model", ""), ("mnist_cnn", "99")])
def test_missing_model_is_not_ready(triton, model, version):
    assert not triton.client.is_model_ready(model, version)


def test_http_server_metadata(http_client):
    metadata = http_client.get_server_metadata()
    assert metadata["name"]
    assert metadata["version"]
    assert isinstance(metadata["extensions"], list)


def test_grpc_server_metadata_agrees_with_http(grpc_client, http_client):
    metadata = grpc_client.get_server_metadata()
    expected = http_client.get_server_metadata()
    assert (metadata.name, metadata.version, list(metadata.extensions)) == (
        expected["name"],
        expected["version"],
        expected["extensions"],
    )


@pytest.mark.parametrize("model", SIGNATURES)
def test_http_model_metadata(http_client, model):
    metadata = http_client.get_model_metadata(model)
    assert metadata["name"] == model
    assert http_signature(metadata) == SIGNATURES[model]


@pytest.mark.parametrize("model", SIGNATURES)
def test_grpc_model_metadata(grpc_client, model):
    metadata = grpc_client.get_model_metadata(model)
    assert metadata.name == model
    assert grpc_signature(metadata) == SIGNATURES[model]


def test_http_infer_json(http_client, reference):
    result = http_client.infer(
        reference.model,
        infer_inputs(httpclient, reference.inputs, binary_data=False),
        model_version=reference.version,
        outputs=[httpclient.InferRequestedOutput(tensor.name, binary_data=False) for tensor in reference.outputs],
    )
    for expected in reference.outputs:
        assert "data" in result.get_output(expected.name)
    assert_outputs_match(result, reference)


def test_http_infer_binary(http_client, reference):
    result = http_client.infer(
        reference.model,
        infer_inputs(httpclient, reference.inputs, binary_data=True),
        model_version=reference.version,
        outputs=[httpclient.InferRequestedOutput(tensor.name, binary_data=True) for tensor in reference.outputs],
    )
    for expected in reference.outputs:
        assert "binary_data_size" in result.get_output(expected.name)["parameters"]
    assert_outputs_match(result, reference)


def test_grpc_infer(grpc_client, reference):
    result = grpc_client.infer(
        reference.model,
        infer_inputs(grpcclient, reference.inputs),
        model_version=reference.version,
        outputs=[grpcclient.InferRequestedOutput(tensor.name) for tensor in reference.outputs],
    )
    assert_outputs_match(result, reference)


def test_identity_round_trips_every_datatype(triton):
    arrays = {kind: identity_array(kind) for kind in IDENTITY_TYPES}
    inputs = [Tensor(f"in_{kind}", kind.upper(), array) for kind, array in arrays.items()]
    # No outputs named: all of them come back, in binary over HTTP (binary_data_output).
    result = triton.client.infer("identity_all", infer_inputs(triton.module, inputs))
    for kind, array in arrays.items():
        assert_tensor_close(result.as_numpy(f"out_{kind}"), array)


def test_only_requested_outputs_are_returned(triton):
    reference = load_reference("sklearn_digits", "1")
    result = triton.client.infer(
        reference.model,
        infer_inputs(triton.module, reference.inputs),
        model_version=reference.version,
        outputs=[triton.module.InferRequestedOutput("label")],
    )
    assert result.as_numpy("probabilities") is None
    assert_tensor_close(result.as_numpy("label"), reference.output("label").array)


def test_http_request_id_is_echoed(http_client):
    reference = load_reference("fixed_shape", "1")
    result = http_client.infer(reference.model, infer_inputs(httpclient, reference.inputs), request_id="req-http-7")
    assert result.get_response()["id"] == "req-http-7"


def test_grpc_request_id_is_echoed(grpc_client):
    reference = load_reference("fixed_shape", "1")
    result = grpc_client.infer(reference.model, infer_inputs(grpcclient, reference.inputs), request_id="req-grpc-7")
    assert result.get_response().id == "req-grpc-7"


def test_http_repository_index_lists_the_models(http_client):
    names = {entry["name"] for entry in http_client.get_model_repository_index()}
    assert {model for model, _ in REFERENCE_MODELS} <= names


def test_grpc_repository_index_lists_the_models(grpc_client):
    names = {entry.name for entry in grpc_client.get_model_repository_index().models}
    assert {model for model, _ in REFERENCE_MODELS} <= names


def test_unload_then_load(triton):
    reference = load_reference("sklearn_digits", "1")
    triton.client.unload_model(reference.model)
    try:
        assert not triton.client.is_model_ready(reference.model)
        with pytest.raises(InferenceServerException):
            triton.client.infer(reference.model, infer_inputs(triton.module, reference.inputs))
    finally:
        triton.client.load_model(reference.model)
    assert triton.client.is_model_ready(reference.model, "1")
    assert triton.client.is_model_ready(reference.model, "2")


def test_unknown_model_error_names_the_model(triton):
    tensors = [Tensor("x", "FP32", np.zeros((2, 3), dtype=np.float32))]
    with pytest.raises(InferenceServerException) as raised:
        triton.client.infer("no_such_model", infer_inputs(triton.module, tensors))
    assert "no_such_model" in raised.value.message()
