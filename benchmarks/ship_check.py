"""Acceptance check of what ships: the raw IDX test images written as PNG files, classified by the
shipped `predict.py` in a fresh process (as on a device), against the shipped model's reported accuracy.

    python -m benchmarks.ship_check [--ship artifacts/ship] [--raw /usr/share/datasets/fashion-mnist]

Reads `artifacts/metrics/summary.json` for the reported test top-1 of the shipped model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from kdcompress.data.sources import read_idx


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ship", default="artifacts/ship")
    p.add_argument("--raw", default="/usr/share/datasets/fashion-mnist", help="folder with t10k-*-idx*-ubyte[.gz]")
    p.add_argument("--summary", default="artifacts/metrics/summary.json")
    args = p.parse_args(argv)
    raw, ship = Path(args.raw), Path(args.ship)
    images = read_idx(next(raw.glob("t10k-images-idx3-ubyte*")))
    labels = read_idx(next(raw.glob("t10k-labels-idx1-ubyte*")))
    with tempfile.TemporaryDirectory() as tmp:
        for i, image in enumerate(images):
            Image.fromarray(image, mode="L").save(Path(tmp) / f"{i:05d}.png")
        start = time.perf_counter()
        out = subprocess.run([sys.executable, str(ship / "predict.py"), str(ship / "model.onnx"), tmp, "--json"],
                             capture_output=True, text=True, check=True).stdout
        seconds = time.perf_counter() - start
    predicted = [json.loads(line)["top"][0]["index"] for line in out.splitlines()]
    accuracy = sum(int(p == y) for p, y in zip(predicted, labels.tolist())) / len(labels)
    reported = json.loads(Path(args.summary).read_text())["test"]["top1"]
    print(f"predict.py on {len(predicted)} PNG files from the raw test set: top-1 {accuracy:.4%} "
          f"(reported for the shipped model: {reported:.4%}; {seconds:.1f} s including start-up)")
    if abs(accuracy - reported) > 1e-9:
        raise SystemExit("the predictor disagrees with the reported accuracy")


if __name__ == "__main__":
    main()
