"""KServe's Python clients (InferenceRESTClient for V1 and V2, InferenceGRPCClient), unchanged,
against meshserve.

kserve and tritonclient.grpc both add the protobuf package `inference` to protobuf's
process-wide descriptor pool, so whichever is imported second fails (kserve/kserve#3099).
kserve is therefore imported by the `kserve` fixture, and this module runs only in a pytest
process that has not loaded tritonclient.grpc:

    pytest tests/python/test_tritonclient.py
    pytest tests/python/test_kserve_client.py
"""

import asyncio
import importlib
import sys

import pytest

from reference_data import Reference, assert_tensor_close, load_reference

# kserve's client refuses to put FP16 into JSON, which rules out identity_all there.
JSON_MODELS = ("mnist_cnn", "multi_io", "fixed_shape")
BINARY_MODELS = (*JSON_MODELS, "identity_all")


@pytest.fixture(scope="module")
def kserve():
    if "tritonclient.grpc" in sys.modules:
        pytest.skip("kserve cannot share a process with tritonclient.grpc (kserve/kserve#3099): run this module alone")
    return importlib.import_module("kserve")


class AsyncClientRunner:
    """Calls a method of an async kserve client; each call opens the client on a fresh event loop."""

    def __init__(self, open_client, *leading_args):
        self._open_client = open_client
        self._leading_args = leading_args

    def __call__(self, method: str, *args, **kwargs):
        async def call():
            async with self._open_client() as client:
                return await getattr(client, method)(*self._leading_args, *args, **kwargs)

        return asyncio.run(call())


@pytest.fixture
def rest_v1(kserve, server):
    return AsyncClientRunner(lambda: kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v1")), server.http_url)


@pytest.fixture
def rest_v2(kserve, server):
    return AsyncClientRunner(lambda: kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2")), server.http_url)


@pytest.fixture
def grpc_v2(kserve, server):
    return AsyncClientRunner(lambda: kserve.InferenceGRPCClient(server.grpc_address))


def infer_request(kserve, reference: Reference, binary: bool):
    inputs = []
    for tensor in reference.inputs:
        infer_input = kserve.InferInput(tensor.name, list(tensor.array.shape), tensor.datatype)
        infer_input.set_data_from_numpy(tensor.array, binary_data=binary)
        inputs.append(infer_input)
    return kserve.InferRequest(
        model_name=reference.model,
        model_version=reference.version,
        infer_inputs=inputs,
        request_id=f"kserve-{reference.model}",
        parameters={"binary_data_output": True} if binary else None,
    )


def assert_response_matches(response, reference: Reference):
    assert response.model_name == reference.model
    assert response.id == f"kserve-{reference.model}"
    for expected in reference.outputs:
        output = response.get_output_by_name(expected.name)
        assert output is not None, f"output {expected.name} missing from the response"
        assert_tensor_close(output.as_numpy(), expected.array, reference.tolerance)


def test_rest_v2_server_is_live_and_ready(rest_v2):
    assert rest_v2("is_server_live") is True
    assert rest_v2("is_server_ready") is True


def test_rest_v2_model_readiness(rest_v2):
    assert rest_v2("is_model_ready", "mnist_cnn") is True
    assert rest_v2("is_model_ready", "no_such_model") is False


@pytest.mark.parametrize("model", JSON_MODELS)
def test_rest_v2_infer_json(kserve, rest_v2, model):
    reference = load_reference(model, "1")
    response = rest_v2("infer", infer_request(kserve, reference, binary=False), model_name=model)
    assert_response_matches(response, reference)


@pytest.mark.parametrize("model", BINARY_MODELS)
def test_rest_v2_infer_binary(kserve, rest_v2, model):
    reference = load_reference(model, "1")
    response = rest_v2("infer", infer_request(kserve, reference, binary=True), model_name=model)
    assert_response_matches(response, reference)


def test_rest_v1_server_is_live(rest_v1):
    assert rest_v1("is_server_live") is True


def test_rest_v1_model_is_ready(rest_v1):
    assert rest_v1("is_model_ready", "sklearn_digits") is True


def test_rest_v1_predict_gives_the_expected_labels(rest_v1):
    # expected_labels are the true labels, which every version of the model predicts.
    reference = load_reference("sklearn_digits", "1")
    instances = reference.inputs[0].array.tolist()
    response = rest_v1("infer", {"instances": instances}, model_name="sklearn_digits")
    # config.yaml's v1_output (label) fills `predictions`, as KServe's scikit-learn server answers.
    assert response["predictions"] == reference.expected_labels


def test_grpc_server_is_live_and_ready(grpc_v2):
    assert grpc_v2("is_server_live") is True
    assert grpc_v2("is_server_ready") is True


def test_grpc_model_is_ready(grpc_v2):
    assert grpc_v2("is_model_ready", "mnist_cnn") is True


@pytest.mark.parametrize("model", BINARY_MODELS)
def test_grpc_infer_raw_contents(kserve, grpc_v2, model):
    reference = load_reference(model, "1")
    response = grpc_v2("infer", infer_request(kserve, reference, binary=True))
    assert_response_matches(response, reference)


@pytest.mark.parametrize("model", JSON_MODELS)
def test_grpc_infer_typed_contents(kserve, grpc_v2, model):
    reference = load_reference(model, "1")
    inputs = [
        kserve.InferInput(tensor.name, list(tensor.array.shape), tensor.datatype, data=tensor.array.flatten().tolist())
        for tensor in reference.inputs
    ]
    request = kserve.InferRequest(
        model_name=model, model_version="1", infer_inputs=inputs, request_id=f"kserve-{model}"
    )
    assert_response_matches(grpc_v2("infer", request), reference)
