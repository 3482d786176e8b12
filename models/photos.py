"""Photo-like pictures of handwritten digits, for the transformer's demo and tests.

Each picture is a held-out test digit of generate.py's data set (the 28x28 images the mnist_cnn
model never trained on), drawn large in dark ink on slightly uneven, noisy paper, centred on a
camera-sized canvas, and saved as JPEG or PNG: what a client with a camera would send, where
the model wants 28x28 white-on-black. Deterministic for a given seed.

    python models/photos.py --out DIR [--count 50]   # DIR/<i>.<ext> + DIR/labels.json
    python models/photos.py --demo                   # models/samples/digit_photo.jpg
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from generate import SAMPLES, Digits

# (width, height, format, colour): sizes and kinds a camera or a scanner produces.
KINDS = [
    (1024, 768, "JPEG", "RGB"),
    (800, 600, "PNG", "L"),
    (1280, 960, "JPEG", "L"),
    (768, 1024, "JPEG", "RGB"),
    (640, 640, "PNG", "RGB"),
]


def photo(digit, width, height, colour, rng):
    """digit: (28, 28) in 0..1, white on black. Returns a PIL image of width x height."""
    side = min(width, height)
    ink = Image.fromarray(np.uint8(np.clip(digit, 0, 1) * 255)).resize((side, side), Image.BICUBIC)
    strokes = np.asarray(ink, dtype=np.float32) / 255.0
    y, x = np.mgrid[0:height, 0:width]
    # Paper: bright, lit a little unevenly, with sensor noise.
    paper = 246 + 6 * (x / width - 0.5) - 4 * (y / height - 0.5) + rng.normal(0, 2.5, (height, width))
    amount = np.zeros((height, width), dtype=np.float32)
    top, left = (height - side) // 2, (width - side) // 2
    amount[top : top + side, left : left + side] = strokes
    ink_level = 40 + rng.normal(0, 2.0, (height, width))
    gray = paper * (1 - amount) + ink_level * amount
    if colour == "L":
        return Image.fromarray(np.uint8(np.clip(gray, 0, 255)), "L")
    # A warm paper tint in colour pictures.
    tint = np.stack([gray * 1.0, gray * 0.98, gray * 0.93], axis=-1)
    return Image.fromarray(np.uint8(np.clip(tint, 0, 255)), "RGB")


def encode(image, fmt, path):
    if fmt == "JPEG":
        image.save(path, "JPEG", quality=88)
    else:
        image.save(path, "PNG")


def write_set(out, count, seed=7):
    data = Digits()
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = data.test[:count]
    labels = []
    for i, row in enumerate(rows):
        width, height, fmt, colour = KINDS[i % len(KINDS)]
        path = out / f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
        encode(photo(data.images[row, 0], width, height, colour, rng), fmt, path)
        labels.append({"file": path.name, "label": int(data.labels[row]), "width": width, "height": height})
    (out / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    return labels


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write --count pictures and labels.json here")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--demo", action="store_true", help="write models/samples/digit_photo.jpg")
    args = parser.parse_args()
    if args.out:
        labels = write_set(args.out, args.count)
        print(f"wrote {len(labels)} pictures to {args.out}")
    if args.demo:
        data = Digits()
        row = data.test[3]
        image = photo(data.images[row, 0], 1024, 768, "RGB", np.random.default_rng(11))
        path = SAMPLES / "digit_photo.jpg"
        encode(image, "JPEG", path)
        print(f"wrote {path} (1024x768, a handwritten {data.labels[row]})")


if __name__ == "__main__":
    main()
