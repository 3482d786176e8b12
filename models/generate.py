"""Generate meshserve's test model repository, reference fixtures and sample requests.

Everything is built offline from scikit-learn's bundled digits dataset and onnx.helper,
with fixed seeds, so repeated runs produce the same files:

    .venv/bin/python models/generate.py           # repository/, reference/, samples/
    .venv/bin/python models/generate.py --extra   # also extra/ (large, git-ignored)

See models/README.md for what each model is.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parent
REPOSITORY = ROOT / "repository"
# Model files in other frameworks' formats, served as they are (converted when they load).
FRAMEWORKS = ROOT / "frameworks"
REFERENCE = ROOT / "reference"
SAMPLES = ROOT / "samples"
EXTRA = ROOT / "extra"

SEED = 0
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17
SKLEARN_OPSET = {"": OPSET, "ai.onnx.ml": 3}
PRODUCER = "meshserve models/generate.py"
IMAGE_SIZE = 28
FIXTURE_ROWS = 4
CLASSIFIER_TOLERANCE = 1e-4

MNIST_CNN_CONFIG = """\
name: mnist_cnn
max_batch_size: 256
version_policy: {latest: 1}
labels: ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
"""

OIP_DATATYPES = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(object): "BYTES",
}


# --------------------------------------------------------------------------- data


class Digits:
    """The 8x8 digits, their 28x28 upscaled images and a fixed stratified split."""

    def __init__(self):
        digits = load_digits()
        self.features = digits.data.astype(np.float32)  # (n, 64), pixel values 0..16
        self.labels = digits.target.astype(np.int64)
        scale = bilinear_matrix(8, IMAGE_SIZE)
        upscaled = scale @ digits.images @ scale.T / 16.0
        self.images = upscaled[:, np.newaxis].astype(np.float32)  # (n, 1, 28, 28), 0..1
        self.train, self.test = train_test_split(
            np.arange(len(self.labels)), test_size=0.2, random_state=SEED, stratify=self.labels
        )


def bilinear_matrix(src, dst):
    """(dst, src) matrix M such that M @ image @ M.T resizes image bilinearly (half-pixel centres)."""
    position = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, src - 1)
    weight = position - low
    matrix = np.zeros((dst, src))
    np.add.at(matrix, (np.arange(dst), low), 1 - weight)
    np.add.at(matrix, (np.arange(dst), high), weight)
    return matrix


# ------------------------------------------------------------ numpy neural networks


def he_normal(rng, shape, fan_in):
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)


def weight_and_bias(layer, name):
    """The ONNX initializers `<name>.weight` and `<name>.bias` of a Conv3x3 or Dense layer."""
    return [
        numpy_helper.from_array(layer.weight, f"{name}.weight"),
        numpy_helper.from_array(layer.bias, f"{name}.bias"),
    ]


class Conv3x3:
    """Unpadded 3x3 convolution with stride 1 on NCHW tensors."""

    def __init__(self, rng, in_channels, out_channels):
        self.weight = he_normal(rng, (out_channels, in_channels, 3, 3), in_channels * 9)
        self.bias = np.zeros(out_channels, np.float32)
        self.params = [self.weight, self.bias]

    def forward(self, x):
        n, c, h, w = x.shape
        self.input_shape = x.shape
        windows = sliding_window_view(x, (3, 3), axis=(2, 3))  # (n, c, h-2, w-2, 3, 3)
        self.columns = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * (h - 2) * (w - 2), c * 9)
        out = self.columns @ self.weight.reshape(len(self.weight), -1).T + self.bias
        return out.reshape(n, h - 2, w - 2, -1).transpose(0, 3, 1, 2)

    def backward(self, grad):
        n, c, h, w = self.input_shape
        filters = len(self.weight)
        grad = grad.transpose(0, 2, 3, 1).reshape(-1, filters)
        self.grads = [(grad.T @ self.columns).reshape(self.weight.shape), grad.sum(axis=0)]
        grad_columns = (grad @ self.weight.reshape(filters, -1)).reshape(n, h - 2, w - 2, c, 3, 3)
        grad_input = np.zeros(self.input_shape, np.float32)
        for i in range(3):
            for j in range(3):
                grad_input[:, :, i : i + h - 2, j : j + w - 2] += grad_columns[..., i, j].transpose(0, 3, 1, 2)
        return grad_input

    def to_onnx(self, name, x):
        node = helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [name], name=name, kernel_shape=[3, 3])
        return [node], weight_and_bias(self, name)


class Dense:
    """Fully connected layer y = x @ weight + bias."""

    def __init__(self, rng, n_in, n_out):
        self.weight = he_normal(rng, (n_in, n_out), n_in)
        self.bias = np.zeros(n_out, np.float32)
        self.params = [self.weight, self.bias]

    def forward(self, x):
        self.input = x
        return x @ self.weight + self.bias

    def backward(self, grad):
        self.grads = [self.input.T @ grad, grad.sum(axis=0)]
        return grad @ self.weight.T

    def to_onnx(self, name, x):
        node = helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [name], name=name)
        return [node], weight_and_bias(self, name)


class Relu:
    params = grads = ()

    def forward(self, x):
        self.active = x > 0
        return x * self.active

    def backward(self, grad):
        return grad * self.active

    def to_onnx(self, name, x):
        return [helper.make_node("Relu", [x], [name], name=name)], []


class MaxPool2x2:
    """2x2 max pooling with stride 2; odd trailing rows/columns are dropped, as ONNX MaxPool does."""

    params = grads = ()

    def forward(self, x):
        n, c, h, w = x.shape
        self.input_shape = x.shape
        blocks = x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2)
        out = blocks.max(axis=(3, 5))
        # Ties (in practice only between ReLU zeros, whose gradient is zero) all receive the gradient.
        self.winners = blocks == out[:, :, :, np.newaxis, :, np.newaxis]
        return out

    def backward(self, grad):
        n, c, h, w = self.input_shape
        grad_input = np.zeros(self.input_shape, np.float32)
        grad_blocks = self.winners * grad[:, :, :, np.newaxis, :, np.newaxis]
        grad_input[:, :, : h // 2 * 2, : w // 2 * 2] = grad_blocks.reshape(n, c, h // 2 * 2, w // 2 * 2)
        return grad_input

    def to_onnx(self, name, x):
        return [helper.make_node("MaxPool", [x], [name], name=name, kernel_shape=[2, 2], strides=[2, 2])], []


class Flatten:
    params = grads = ()

    def forward(self, x):
        self.input_shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, grad):
        return grad.reshape(self.input_shape)

    def to_onnx(self, name, x):
        return [helper.make_node("Flatten", [x], [name], name=name, axis=1)], []


def softmax(logits):
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


class Adam:
    def __init__(self, params, lr, beta1=0.9, beta2=0.999, eps=1e-8):
        self.params, self.lr, self.beta1, self.beta2, self.eps = params, lr, beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        m_scale = 1 / (1 - self.beta1**self.t)
        v_scale = 1 / (1 - self.beta2**self.t)
        for param, grad, m, v in zip(self.params, grads, self.m, self.v):
            m += (1 - self.beta1) * (grad - m)
            v += (1 - self.beta2) * (grad * grad - v)
            param -= self.lr * m * m_scale / (np.sqrt(v * v_scale) + self.eps)


class Classifier:
    """A stack of layers producing logits, trained with softmax cross-entropy and Adam."""

    def __init__(self, name, layers):
        self.name = name
        self.layers = layers

    def logits(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def predict_proba(self, x, batch_size=256):
        return np.concatenate([softmax(self.logits(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])

    def fit(self, x, y, rng, epochs, batch_size, lr):
        params = [p for layer in self.layers for p in layer.params]
        optimizer = Adam(params, lr)
        for epoch in range(epochs):
            order = rng.permutation(len(x))
            total_loss = 0.0
            for start in range(0, len(x), batch_size):
                batch = order[start : start + batch_size]
                probs = softmax(self.logits(x[batch]))
                rows = np.arange(len(batch))
                total_loss -= np.log(probs[rows, y[batch]]).sum()
                grad = probs
                grad[rows, y[batch]] -= 1
                grad /= len(batch)
                for layer in reversed(self.layers):
                    grad = layer.backward(grad)
                optimizer.step([g for layer in self.layers for g in layer.grads])
            print(f"  {self.name} epoch {epoch + 1}/{epochs}: loss {total_loss / len(x):.4f}")

    def to_onnx(self, input_dims):
        nodes, initializers, x = [], [], "input"
        for index, layer in enumerate(self.layers):
            name = f"{type(layer).__name__.lower()}_{index}"
            layer_nodes, layer_initializers = layer.to_onnx(name, x)
            nodes += layer_nodes
            initializers += layer_initializers
            x = name
        nodes.append(helper.make_node("Softmax", [x], ["probabilities"], name="softmax", axis=-1))
        return make_model(
            self.name,
            nodes,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_dims)],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
            initializers,
        )


# ---------------------------------------------------------------------- ONNX helpers


def make_model(name, nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name=PRODUCER
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model, directory, version):
    path = directory / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def tensor_json(name, array):
    """An OIP tensor with flat row-major data; tolist() yields exact Python values, so floats round-trip."""
    return {
        "name": name,
        "datatype": OIP_DATATYPES[array.dtype],
        "shape": list(array.shape),
        "data": array.ravel().tolist(),
    }


def write_json(path, document):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, ensure_ascii=False) + "\n", encoding="utf-8")


def write_reference(model_path, inputs, tolerance, expected_labels=None):
    """Run inputs through onnxruntime and store them with the outputs as models/reference/<model>_v<version>.json."""
    version_dir = model_path.parent
    model, version = version_dir.parent.name, version_dir.name
    model_session = session(model_path)
    outputs = model_session.run(None, inputs)
    output_names = [o.name for o in model_session.get_outputs()]
    document = {
        "model": model,
        "version": version,
        "inputs": [tensor_json(name, array) for name, array in inputs.items()],
        "outputs": [tensor_json(name, array) for name, array in zip(output_names, outputs)],
    }
    if expected_labels is not None:
        document["expected_labels"] = [int(label) for label in expected_labels]
    document["tolerance"] = tolerance
    write_json(REFERENCE / f"{model}_v{version}.json", document)


# -------------------------------------------------------------------------- models


def build_sklearn_digits(data):
    """Versions 1 and 2 of sklearn_digits; returns {version: (path, test accuracy)}."""
    classifiers = {
        1: LogisticRegression(max_iter=5000),
        2: RandomForestClassifier(n_estimators=10, max_depth=8, random_state=SEED),
    }
    x_train, y_train = data.features[data.train], data.labels[data.train]
    x_test, y_test = data.features[data.test], data.labels[data.test]
    results = {}
    for version, classifier in classifiers.items():
        classifier.fit(x_train, y_train)
        model = convert_sklearn(
            classifier,
            name="sklearn_digits",
            initial_types=[("input", FloatTensorType([None, 64]))],
            options={id(classifier): {"zipmap": False}},
            target_opset=SKLEARN_OPSET,
        )
        model.producer_name = PRODUCER
        path = save(model, REPOSITORY / "sklearn_digits", version)
        labels, probabilities = session(path).run(None, {"input": x_test})
        assert np.array_equal(labels, classifier.predict(x_test))
        assert np.abs(probabilities - classifier.predict_proba(x_test)).max() < 1e-4
        results[version] = (path, float((labels == y_test).mean()))
        # The explainer's background (spec.explainer.kernelShap.backgroundFile in the demo):
        # each digit's mean training image, ten rows that stand for "no feature known".
        write_json(path.parent / "background.json", digit_means(x_train, y_train))
    return results


def digit_means(features, labels):
    return [[round(float(v), 4) for v in features[labels == digit].mean(axis=0)] for digit in range(10)]


def train_and_export(data, classifier, input_dims, directory, rng, **training):
    """Train a numpy classifier on the 28x28 images, save it as version 1 in directory and check that
    onnxruntime agrees with numpy; returns (path, test accuracy)."""
    x_train = data.images[data.train].reshape(len(data.train), *input_dims[1:])
    x_test = data.images[data.test].reshape(len(data.test), *input_dims[1:])
    classifier.fit(x_train, data.labels[data.train], rng, **training)
    path = save(classifier.to_onnx(input_dims), directory, 1)
    (probabilities,) = session(path).run(None, {"input": x_test})
    difference = np.abs(probabilities - classifier.predict_proba(x_test)).max()
    assert difference < 1e-4, f"{classifier.name}: onnxruntime differs from numpy by {difference}"
    return path, float((probabilities.argmax(axis=1) == data.labels[data.test]).mean())


def build_xgboost_digits(data):
    """The digits as an XGBoost booster (multi:softprob), saved as XGBoost saves `model.bst`
    (UBJSON): what a KServe user brings to `spec.predictor.xgboost`."""
    import xgboost

    booster = xgboost.train(
        {"objective": "multi:softprob", "num_class": 10, "max_depth": 3, "eta": 0.3, "nthread": 1, "seed": SEED},
        xgboost.DMatrix(data.features[data.train], label=data.labels[data.train]),
        num_boost_round=10,
    )
    directory = FRAMEWORKS / "xgboost_digits"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.bst"
    path.write_bytes(booster.save_raw("ubj"))
    predicted = booster.predict(xgboost.DMatrix(data.features[data.test])).argmax(axis=1)
    return path, float((predicted == data.labels[data.test]).mean())


def build_mnist_cnn(data):
    rng = np.random.default_rng(SEED)
    cnn = Classifier(
        "mnist_cnn",
        [
            *(Conv3x3(rng, 1, 8), Relu(), MaxPool2x2()),  # 28x28 -> 26x26 -> 13x13
            *(Conv3x3(rng, 8, 16), Relu(), MaxPool2x2()),  # 13x13 -> 11x11 -> 5x5
            *(Flatten(), Dense(rng, 16 * 5 * 5, 10)),
        ],
    )
    directory = REPOSITORY / "mnist_cnn"
    result = train_and_export(
        data, cnn, ["batch", 1, IMAGE_SIZE, IMAGE_SIZE], directory, rng, epochs=15, batch_size=32, lr=2e-3
    )
    (directory / "config.yaml").write_text(MNIST_CNN_CONFIG)
    return result


def build_mnist_mlp(data):
    rng = np.random.default_rng(SEED)
    pixels = IMAGE_SIZE * IMAGE_SIZE
    mlp = Classifier("mnist_mlp", [Dense(rng, pixels, 512), Relu(), Dense(rng, 512, 512), Relu(), Dense(rng, 512, 10)])
    return train_and_export(data, mlp, ["batch", pixels], EXTRA / "mnist_mlp", rng, epochs=10, batch_size=32, lr=1e-3)


def build_multi_io():
    nodes = [
        helper.make_node("Mul", ["count", "two"], ["count_doubled"]),
        helper.make_node("Where", ["mask", "count", "zero"], ["masked"]),
        helper.make_node("Not", ["mask"], ["mask_not"]),
        helper.make_node("Identity", ["text"], ["text_out"]),
    ]
    model = make_model(
        "multi_io",
        nodes,
        [
            helper.make_tensor_value_info("count", TensorProto.INT64, [None, 3]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, [None, 3]),
            helper.make_tensor_value_info("text", TensorProto.STRING, [None, 1]),
        ],
        [
            helper.make_tensor_value_info("count_doubled", TensorProto.INT64, [None, 3]),
            helper.make_tensor_value_info("masked", TensorProto.INT64, [None, 3]),
            helper.make_tensor_value_info("mask_not", TensorProto.BOOL, [None, 3]),
            helper.make_tensor_value_info("text_out", TensorProto.STRING, [None, 1]),
        ],
        [numpy_helper.from_array(np.array(2, np.int64), "two"), numpy_helper.from_array(np.array(0, np.int64), "zero")],
    )
    path = save(model, REPOSITORY / "multi_io", 1)
    inputs = {
        "count": np.array([[1, 2, 3], [-4, 0, 1_000_000]], np.int64),
        "mask": np.array([[True, False, True], [False, True, True]]),
        "text": np.array([["hello"], ["wörld ✓"]], dtype=object),
    }
    write_reference(path, inputs, tolerance=0.0)
    return path


def identity_all_samples():
    """[2, 4] sample arrays, one per OIP datatype, holding each type's edge values."""
    samples = []
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        small = -1 if info.min < 0 else 2
        samples.append(np.array([[0, 1, small, 42], [info.min, info.max, info.min + 1, info.max - 1]], dtype))
    for dtype in (np.float16, np.float32, np.float64):
        info = np.finfo(dtype)
        samples.append(np.array([[0.0, 0.5, -1.25, 1e-3], [-0.0, info.min, info.max, info.smallest_subnormal]], dtype))
    samples.append(np.array([[True, False, True, False], [False, False, True, True]]))
    strings = [["", "hello", "héllo wörld", "日本語"], ["a b", "line\nbreak", '{"json": 1}', "🙂"]]
    samples.append(np.array(strings, object))
    return samples


def build_identity_all():
    inputs, outputs, nodes, feeds = [], [], [], {}
    for array in identity_all_samples():
        suffix = OIP_DATATYPES[array.dtype].lower()
        elem_type = TensorProto.STRING if array.dtype == object else helper.np_dtype_to_tensor_dtype(array.dtype)
        inputs.append(helper.make_tensor_value_info(f"in_{suffix}", elem_type, [None, None]))
        outputs.append(helper.make_tensor_value_info(f"out_{suffix}", elem_type, [None, None]))
        nodes.append(helper.make_node("Identity", [f"in_{suffix}"], [f"out_{suffix}"]))
        feeds[f"in_{suffix}"] = array
    path = save(make_model("identity_all", nodes, inputs, outputs), REPOSITORY / "identity_all", 1)
    write_reference(path, feeds, tolerance=0.0)
    return path


def build_fixed_shape():
    model = make_model(
        "fixed_shape",
        [helper.make_node("Add", ["x", "one"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    path = save(model, REPOSITORY / "fixed_shape", 1)
    write_reference(path, {"x": np.array([[1.5, -2.0, 0.0], [3.25, 1e-3, -0.5]], np.float32)}, tolerance=0.0)
    return path


# ---------------------------------------------------------------------------- main


def fixture_rows(data, predictions):
    """The first FIXTURE_ROWS test rows that every classifier gets right, so expected_labels hold for all."""
    correct = np.all([p == data.labels[data.test] for p in predictions], axis=0)
    return data.test[np.flatnonzero(correct)[:FIXTURE_ROWS]]


def describe(path):
    model = session(path)
    print(f"{path.relative_to(ROOT)}")
    for kind, args in (("input", model.get_inputs()), ("output", model.get_outputs())):
        for arg in args:
            print(f"  {kind:6} {arg.name:14} {arg.type:22} {arg.shape}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extra", action="store_true", help="also write the large benchmark-only models under extra/")
    args = parser.parse_args()

    data = Digits()
    print(f"digits: {len(data.train)} train / {len(data.test)} test samples")

    sklearn_models = build_sklearn_digits(data)
    for version, (_, accuracy) in sklearn_models.items():
        print(f"sklearn_digits v{version}: test accuracy {accuracy:.4f}")
    xgboost_path, xgboost_accuracy = build_xgboost_digits(data)
    print(f"{xgboost_path.relative_to(ROOT)}: test accuracy {xgboost_accuracy:.4f}, {xgboost_path.stat().st_size} bytes")
    cnn_path, cnn_accuracy = build_mnist_cnn(data)
    print(f"mnist_cnn v1: test accuracy {cnn_accuracy:.4f}")

    classifier_inputs = {path: data.features for path, _ in sklearn_models.values()}
    classifier_inputs[cnn_path] = data.images
    # The first output is `label` for sklearn_digits and `probabilities` for mnist_cnn.
    predictions = [session(path).run(None, {"input": x[data.test]})[0] for path, x in classifier_inputs.items()]
    rows = fixture_rows(data, [p if p.ndim == 1 else p.argmax(axis=1) for p in predictions])
    for path, x in classifier_inputs.items():
        write_reference(path, {"input": x[rows]}, CLASSIFIER_TOLERANCE, expected_labels=data.labels[rows])

    # Request bodies for the README demo: Open Inference Protocol (V2) and KServe V1.
    write_json(SAMPLES / "mnist_cnn_v2_request.json", {"inputs": [tensor_json("input", data.images[rows[:1]])]})
    write_json(SAMPLES / "sklearn_digits_v1_request.json", {"instances": data.features[rows[:2]].tolist()})

    paths = [path for path, _ in sklearn_models.values()]
    paths += [cnn_path, build_multi_io(), build_identity_all(), build_fixed_shape()]
    if args.extra:
        mlp_path, mlp_accuracy = build_mnist_mlp(data)
        print(f"mnist_mlp v1: test accuracy {mlp_accuracy:.4f}")
        paths.append(mlp_path)
    for path in paths:
        describe(path)


if __name__ == "__main__":
    main()
