"""The transformer, checked two ways:

- golden: `meshserve transform` (the filter's own code, run natively) against the same pipeline
  made with Pillow and numpy, for PNG and JPEG pictures of several sizes and every resize
  method, fit, colour and layout;
- end to end: `meshserve up` (real Envoy, the wasm router and transformer, a predictor sidecar
  running the 28x28 CNN) answering photo-like digit pictures sent as KServe V1 and as Open
  Inference Protocol V2, several in one request, and refusing bad pictures while it keeps
  serving.

Runs in its own interpreter (see scripts/test.sh).
"""

import base64
import io
import json
import os
import re
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "models"))
import photos  # noqa: E402
from conftest import MeshUp  # noqa: E402

BINARY = Path(os.environ.get("MESHSERVE_BIN", REPO_ROOT / "target" / "release" / "meshserve"))
CNN = REPO_ROOT / "models" / "repository" / "mnist_cnn"
MAX_BODY_BYTES = 4 << 20

DIGITS_PIPELINE = {
    "request": {
        "field": "image",
        "steps": [
            "base64_decode",
            "image_decode",
            {"color": "grayscale"},
            {"resize": {"width": 28, "height": 28, "method": "area", "fit": "crop"}},
            "invert",
            {"scale": 1 / 255},
            {"layout": "nchw"},
            {"emit": {"input": "input"}},
        ],
    },
    "response": {"steps": [{"argmax": {}}], "labels": [str(d) for d in range(10)]},
    "limits": {"max_body_bytes": MAX_BODY_BYTES, "max_image_pixels": 4_000_000},
}


def isvc_yaml(name, transformer):
    # JSON is YAML: the transformer is written as the filter will read it.
    return (
        "apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\n"
        f"metadata: {{name: {name}}}\n"
        "spec:\n"
        f"  predictor: {{model: {{modelFormat: {{name: onnx}}, storageUri: 'file://{CNN}'}}}}\n"
        f"  transformer: {json.dumps(transformer)}\n"
    )


def encoded(image, fmt):
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def b64(data):
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------------------ golden


def reference(data, steps):
    """The pipeline's tensor for one picture, made with Pillow (decode, resize in float mode)
    and numpy."""
    image = Image.open(io.BytesIO(data))
    image.load()
    pixels = None
    for step in steps:
        if step == "image_decode":
            mode = "RGB" if image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else "L"
            pixels = np.asarray(image.convert(mode), dtype=np.float32)
            if pixels.ndim == 2:
                pixels = pixels[:, :, None]
        elif isinstance(step, dict) and "color" in step:
            if step["color"] == "grayscale" and pixels.shape[2] == 3:
                pixels = (pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
            elif step["color"] == "rgb" and pixels.shape[2] == 1:
                pixels = np.repeat(pixels, 3, axis=2)
        elif isinstance(step, dict) and "resize" in step:
            pixels = resize_reference(pixels, step["resize"])
        elif step == "invert":
            pixels = 255.0 - pixels
        elif isinstance(step, dict) and "scale" in step:
            pixels = pixels * step["scale"]
        elif isinstance(step, dict) and "normalize" in step:
            pixels = (pixels - np.array(step["normalize"]["mean"])) / np.array(step["normalize"]["std"])
        elif isinstance(step, dict) and "layout" in step:
            return {"nchw": pixels.transpose(2, 0, 1), "nhwc": pixels, "flat": pixels.reshape(-1)}[step["layout"]]
    raise AssertionError("no layout step")


def resize_reference(pixels, spec):
    filters = {"area": Image.BOX, "bilinear": Image.BILINEAR}
    h, w = pixels.shape[:2]
    tw, th = spec["width"], spec["height"]

    def channels(box, size):
        planes = [Image.fromarray(pixels[:, :, c], "F").resize(size, filters[spec["method"]], box=box) for c in range(pixels.shape[2])]
        return np.stack([np.asarray(p) for p in planes], axis=2)

    fit = spec.get("fit", "stretch")
    if fit == "stretch":
        return channels((0, 0, w, h), (tw, th))
    if fit == "crop":
        scale = max(tw / w, th / h)
        bw, bh = tw / scale, th / scale
        x0, y0 = (w - bw) / 2, (h - bh) / 2
        return channels((x0, y0, x0 + bw, y0 + bh), (tw, th))
    scale = min(tw / w, th / h)
    nw, nh = min(max(int(w * scale + 0.5), 1), tw), min(max(int(h * scale + 0.5), 1), th)  # half away from 0
    inner = channels((0, 0, w, h), (nw, nh))
    out = np.full((th, tw, pixels.shape[2]), spec.get("pad_value", 0.0), dtype=np.float32)
    top, left = (th - nh) // 2, (tw - nw) // 2
    out[top : top + nh, left : left + nw] = inner
    return out


# name: (steps, one pixel level in the output's units).
PIPELINES = {
    "gray-area-crop-nchw": (DIGITS_PIPELINE["request"]["steps"], 1 / 255),
    "rgb-bilinear-pad-nhwc": ([
        "base64_decode",
        "image_decode",
        {"color": "rgb"},
        {"resize": {"width": 40, "height": 30, "method": "bilinear", "fit": "pad", "pad_value": 128}},
        {"scale": 1 / 255},
        {"normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
        {"layout": "nhwc"},
        {"emit": {"input": "x"}},
    ], 1 / 255 / 0.224),
    "gray-bilinear-stretch-flat": ([
        "base64_decode",
        "image_decode",
        {"color": "grayscale"},
        {"resize": {"width": 8, "height": 8, "method": "bilinear"}},
        {"scale": 16 / 255},
        {"layout": "flat"},
        {"emit": {"input": "x"}},
    ], 16 / 255),
    "rgb-area-upscale-nchw": ([
        "base64_decode",
        "image_decode",
        {"resize": {"width": 96, "height": 64, "method": "area", "fit": "crop"}},
        {"layout": "nchw"},
        {"emit": {"input": "x"}},
    ], 1.0),
}


def pictures():
    """(name, bytes): photo-like digits and a colourful gradient, PNG and JPEG, several sizes."""
    rng = np.random.default_rng(3)
    data = photos.Digits()
    out = []
    for i, (width, height, fmt, colour) in enumerate(photos.KINDS):
        image = photos.photo(data.images[data.test[i], 0], width, height, colour, rng)
        out.append((f"digit-{width}x{height}-{colour}.{fmt.lower()}", encoded(image, fmt)))
    y, x = np.mgrid[0:75, 0:50]
    gradient = np.stack([x * 5, y * 3, (x + y) * 2], axis=-1).astype(np.uint8)
    for fmt in ("PNG", "JPEG"):
        out.append((f"gradient-50x75.{fmt.lower()}", encoded(Image.fromarray(gradient, "RGB"), fmt)))
    return out


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_the_filters_tensors_match_pillow_and_numpy(pipeline, tmp_path):
    steps, level = PIPELINES[pipeline]
    spec = tmp_path / "isvc.yaml"
    spec.write_text(isvc_yaml("golden", {"request": {"steps": steps}}))
    for name, data in pictures():
        body = json.dumps({"instances": [{"b64": b64(data)}]})
        result = subprocess.run([BINARY, "transform", spec], input=body.encode(), capture_output=True, check=False)
        assert result.returncode == 0, result.stderr.decode()
        tensor = json.loads(result.stdout)["inputs"][0]
        want = reference(data, steps)
        got = np.array(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        assert list(got.shape) == [1, *want.shape], name
        levels = np.abs(got[0] - want) / level
        # PNG: the same numbers up to float rounding. JPEG: decoders differ by a few levels on
        # single pixels (libjpeg-turbo against zune-jpeg, chroma upsampling most), under one
        # level on average.
        worst, mean = (0.05, 0.01) if name.endswith("png") else (4.0, 0.75)
        assert levels.max() <= worst and levels.mean() <= mean, f"{name}: max {levels.max():.3f}, mean {levels.mean():.3f} levels"


# -------------------------------------------------------------------------- end to end


class Mesh(MeshUp):
    def __init__(self, tmp):
        spec = tmp / "isvc.yaml"
        spec.write_text(isvc_yaml("mnist", DIGITS_PIPELINE))
        super().__init__(spec, tmp / "state", BINARY)

    def post(self, path, body, headers=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def post_watching(self, path, size):
        """POSTs `size` bytes the way curl does: stops sending when an early answer arrives
        (Envoy answers a too-large body from its headers and closes the connection)."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode())
            chunk, sent = b"x" * 65536, 0
            while sent < size and not select.select([conn], [], [], 0)[0]:
                try:
                    sent += conn.send(chunk[: size - sent])
                except OSError:
                    break
            response = b""
            while b"\r\n\r\n" not in response or len(response.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"content-length: (\d+)", response, re.I).group(1) if re.search(rb"content-length: (\d+)", response, re.I) else 0
            ):
                data = conn.recv(65536)
                if not data:
                    break
                response += data
        head, body = response.split(b"\r\n\r\n", 1)
        return int(head.split()[1]), json.loads(body)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    mesh = Mesh(tmp_path_factory.mktemp("mesh"))
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("photos")
    labels = photos.write_set(out, 50)
    return [((out / item["file"]).read_bytes(), item["label"]) for item in labels]


def test_photos_get_the_right_digit_through_envoy_as_v1_and_v2(mesh, photo_set):
    right = {"v1": 0, "v2": 0}
    for data, label in photo_set:
        status, answer = mesh.post("/v1/models/mnist:predict", {"instances": [{"image": {"b64": b64(data)}}]})
        assert status == 200, answer
        right["v1"] += answer["predictions"] == [str(label)]
        status, answer = mesh.post(
            "/v2/models/mnist/infer",
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(data)]}]},
        )
        assert status == 200, answer
        assert answer["outputs"][0]["datatype"] == "BYTES"
        right["v2"] += answer["outputs"][0]["data"] == [str(label)]
    for protocol, count in right.items():
        assert count >= 0.95 * len(photo_set), f"{protocol}: {count} of {len(photo_set)} right"


def test_several_pictures_in_one_request_come_back_in_order(mesh, photo_set):
    batch = photo_set[:8]
    single = [mesh.post("/v1/models/mnist:predict", {"instances": [{"b64": b64(d)}]})[1]["predictions"][0] for d, _ in batch]
    status, answer = mesh.post("/v1/models/mnist:predict", {"instances": [{"image": {"b64": b64(d)}} for d, _ in batch]})
    assert status == 200, answer
    assert answer["predictions"] == single
    assert answer["predictions"] == [str(label) for _, label in batch] or sum(
        p == str(label) for p, (_, label) in zip(answer["predictions"], batch)
    ) >= 7


def png_claiming(width, height):
    """A tiny PNG whose header claims width x height (a decompression bomb's first bytes)."""
    data = encoded(Image.new("L", (4, 4)), "PNG")
    header = data[12:16] + width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[24:29]
    return data[:12] + header + zlib.crc32(header).to_bytes(4, "big") + data[33:]


def test_bad_pictures_get_a_4xx_with_a_reason_and_envoy_keeps_serving(mesh, photo_set):
    good, label = photo_set[0]
    png = encoded(Image.new("L", (64, 64), 200), "PNG")
    gif = encoded(Image.new("L", (8, 8)), "GIF")
    cases = [
        ({"instances": [{"image": {"b64": b64(png[: len(png) // 2])}}]}, 400, "cannot decode"),
        ({"instances": [{"image": {"b64": b64(good[:-2000])}}]} if good[:3] == b"\xff\xd8\xff" else None, 400, "truncated"),
        ({"instances": [{"image": "this is not base64!"}]}, 400, "invalid base64"),
        ({"instances": [{"image": {"b64": b64(png_claiming(20000, 20000))}}]}, 413, "limits.max_image_pixels"),
        ({"instances": [{"image": {"b64": b64(gif)}}]}, 400, "send PNG or JPEG"),
        ({"instances": [{"image": {"b64": ""}}]}, 400, "empty"),
        ({"instances": [{"image": {"b64": b64(png_claiming(0, 4))}}]}, 400, "image"),
        ({"instances": [{"picture": {"b64": b64(good)}}]}, 400, "'image'"),
        (b"{not json", 400, "malformed"),
    ]
    for body, status, needle in cases:
        if body is None:
            continue
        got, answer = mesh.post("/v1/models/mnist:predict", body)
        assert got == status, (needle, answer)
        assert needle in answer["error"] and answer["error"].startswith("transformer: "), answer
    status, answer = mesh.post_watching("/v1/models/mnist:predict", MAX_BODY_BYTES + 1)
    assert status == 413 and "limits.max_body_bytes" in answer["error"], answer
    status, answer = mesh.post("/v1/models/mnist:predict", {"instances": [{"image": {"b64": b64(good)}}]})
    assert (status, answer["predictions"]) == (200, [str(label)])


def test_the_sidecar_applies_the_same_transformer_to_clients_that_bypass_envoy(mesh, photo_set):
    sidecar = next(
        m.group(1) for line in mesh.lines if (m := re.search(r"\[mnist-predictor[^\]]*\].*listening on http=(\S+)", line))
    )
    direct = Mesh.__new__(Mesh)
    direct.url = f"http://{sidecar}"
    for data, _ in photo_set[:5]:
        body = {"instances": [{"image": {"b64": b64(data)}}]}
        assert direct.post("/v1/models/mnist:predict", body) == mesh.post("/v1/models/mnist:predict", body)
        v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(data)]}]}
        assert direct.post("/v2/models/mnist/infer", v2) == mesh.post("/v2/models/mnist/infer", v2)
    status, answer = direct.post("/v1/models/mnist:predict", {"instances": [{"image": "!!"}]})
    assert status == 400 and answer["error"].startswith("transformer: invalid base64"), answer


def test_v2_requests_that_already_carry_the_tensor_pass_through(mesh):
    sample = json.loads((REPO_ROOT / "models" / "samples" / "mnist_cnn_v2_request.json").read_text())
    status, answer = mesh.post("/v2/models/mnist/infer", sample)
    assert status == 200, answer
    # The response steps still run: the label, not the probabilities.
    assert answer["outputs"][0]["datatype"] == "BYTES"


def test_grpc_passes_through_the_transformer_untouched(mesh):
    import tritonclient.grpc as grpcclient

    sample = json.loads((REPO_ROOT / "models" / "samples" / "mnist_cnn_v2_request.json").read_text())["inputs"][0]
    pixels = np.array(sample["data"], dtype=np.float32).reshape(sample["shape"])
    client = grpcclient.InferenceServerClient(mesh.url.removeprefix("http://"))
    tensor = grpcclient.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    result = client.infer("mnist", [tensor])
    # The model's own output: probabilities, no labels, no top-k.
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (1, 10) and abs(float(probabilities.sum()) - 1.0) < 1e-4
    client.close()
