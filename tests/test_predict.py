"""The edge predictor (kdcompress/deploy/predict.py) on real exported ONNX models and generated images."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from kdcompress.common.onnx import save_onnx, to_onnx
from kdcompress.deploy import predict
from kdcompress.deploy.export import metadata_for
from models import create_model

SIZE = 28
SPECS = {  # channels -> (classes, mean, std)
    1: ([f"digit{i}" for i in range(10)], [0.2860], [0.3530]),
    3: (["cat", "dog", "bird", "frog", "ship"], [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, tuple[Path, torch.nn.Module]]:
    """channels -> (ONNX path, the PyTorch model it was exported from), tinycnn on 28x28."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    out = {}
    for channels, (classes, mean, std) in SPECS.items():
        model = create_model("tinycnn", len(classes), channels).eval()
        shape = [channels, SIZE, SIZE]
        meta = metadata_for("student", "tinycnn", classes, mean, std, shape, 18)
        out[channels] = (save_onnx(to_onnx(model, shape, 18, meta), folder / f"c{channels}.onnx"), model)
    return out


def expected_probs(model: torch.nn.Module, channels: int, pixels: np.ndarray) -> np.ndarray:
    """Softmax of the PyTorch model on (x / 255 - mean) / std for uint8 [H, W] or [H, W, C] pixels."""
    _, mean, std = SPECS[channels]
    x = torch.from_numpy(pixels.reshape(SIZE, SIZE, channels).copy()).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        return torch.softmax(model(x), 1)[0].numpy()


def resized(img: Image.Image, mode: str) -> np.ndarray:
    """The centred square of side min(W, H) (the models here have no crop_fraction: 1.0), resized to SIZE
    x SIZE: the aspect ratio is kept, the longer side's ends are cut (computed here, not by predict.py)."""
    side = min(img.size)
    left, top = (img.width - side) / 2, (img.height - side) / 2
    box = (left, top, left + side, top + side)
    return np.asarray(img.convert(mode).resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box))


def write_images(folder: Path) -> dict[int, dict[str, np.ndarray]]:
    """Images of several sizes and modes -> the pixels the model should see, per model channels."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    grey28 = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    grey_wide = Image.fromarray(rng.integers(0, 256, (17, 40), dtype=np.uint8))  # W 40, H 17
    grey16 = rng.integers(0, 256, (SIZE, SIZE)).astype(np.uint16) * 257  # 16-bit grey, exact 8-bit values
    rgb28 = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    palette = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).quantize(16)
    photo = Image.fromarray(rng.integers(0, 256, (45, 33, 3), dtype=np.uint8))
    Image.fromarray(grey28).save(folder / "l28.png")
    grey_wide.save(folder / "l40x17.png")
    Image.fromarray(grey16).save(folder / "i16.png")
    Image.fromarray(rgb28).save(folder / "rgb28.png")
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    palette.save(folder / "palette.png")
    photo.save(folder / "photo.jpg", quality=90)
    with Image.open(folder / "photo.jpg") as decoded:
        jpeg_rgb = resized(decoded, "RGB")
    return {
        1: {"l28.png": grey28, "l40x17.png": resized(grey_wide, "L"), "i16.png": (grey16 // 257).astype(np.uint8),
            "rgb28.png": np.asarray(Image.fromarray(rgb28).convert("L"))},
        3: {"rgb28.png": rgb28, "rgba.png": rgba[..., :3], "palette.png": resized(palette, "RGB"),
            "photo.jpg": jpeg_rgb, "l28.png": np.repeat(grey28[..., None], 3, axis=2)},
    }


def run_main(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    code = predict.main([*map(str, argv), "--threads", "1"])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


@pytest.mark.parametrize("channels", [1, 3])
def test_standalone_without_torch_matches_pytorch(tmp_path, models, channels):
    """A copy of predict.py beside the model, run where torch and kdcompress cannot be imported,
    gives the PyTorch model's probabilities on the pre-processed pixels."""
    model_path, model = models[channels]
    images = write_images(tmp_path / "images")[channels]
    device = tmp_path / "device"
    device.mkdir()
    shutil.copy(predict.__file__, device / "predict.py")
    shutil.copy(model_path, device / "model.onnx")
    block = ("import runpy, sys; sys.modules.update(torch=None, kdcompress=None, models=None); "
             "sys.argv[0] = 'predict.py'; runpy.run_path('predict.py', run_name='__main__')")
    files = [str(tmp_path / "images" / name) for name in images]
    proc = subprocess.run([sys.executable, "-c", block, "model.onnx", *files, "--json", "--top-k", "10",
                           "--threads", "1"], cwd=device, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["file"] for r in results] == files
    classes = SPECS[channels][0]
    for result, pixels in zip(results, images.values()):
        want = expected_probs(model, channels, pixels)
        got = np.zeros(len(classes))
        for entry in result["top"]:
            assert classes[entry["index"]] == entry["class"]
            got[entry["index"]] = entry["prob"]
        assert result["top"][0]["index"] == int(want.argmax()), result["file"]
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=result["file"])


def test_text_output_json_and_top_k(tmp_path, models, capsys):
    write_images(tmp_path)
    model_path = models[3][0]
    code, out, err = run_main(capsys, model_path, tmp_path / "rgb28.png", tmp_path / "photo.jpg")
    assert code == 0 and err == [] and len(out) == 2
    for line, name in zip(out, ["rgb28.png", "photo.jpg"]):
        file, top1 = line.split("\t")  # default top-k 1
        assert file == str(tmp_path / name)
        assert top1.split(" (")[0] in SPECS[3][0] and top1.endswith(")")
    code, out, _ = run_main(capsys, model_path, tmp_path / "rgb28.png", "--json", "--top-k", "3")
    (result,) = [json.loads(line) for line in out]
    assert code == 0 and set(result) == {"file", "top"} and len(result["top"]) == 3
    probs = [t["prob"] for t in result["top"]]
    assert all(isinstance(p, float) for p in probs) and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9
    assert all(set(t) == {"class", "index", "prob"} and SPECS[3][0][t["index"]] == t["class"] for t in result["top"])
    code, out, _ = run_main(capsys, model_path, tmp_path / "rgb28.png", "--top-k", "50")  # clamped to 5 classes
    assert code == 0 and len(out[0].split("\t")) == 1 + 5


def test_folder_is_recursive_sorted_and_filtered(tmp_path, models, capsys):
    root = tmp_path / "imgs"
    for rel in ["z.png", "sub/y.JPG", "sub/deeper/x.bmp", "a.png", ".hidden.png", ".cache/w.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (10, 12), 128).save(root / rel)
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "model.onnx").write_bytes(b"\0")
    code, out, err = run_main(capsys, models[1][0], root, "--json")
    assert code == 0 and err == []
    assert [json.loads(line)["file"] for line in out] == [
        str(root / rel) for rel in ["a.png", "sub/deeper/x.bmp", "sub/y.JPG", "z.png"]]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_main(capsys, models[1][0], empty)
    assert code == 1 and out == [] and err == [f"error: {empty}: no image files in this folder"]


def test_bad_images_are_reported_and_the_rest_predicted(tmp_path, models, capsys):
    write_images(tmp_path)
    text = tmp_path / "text.png"
    text.write_text("this is not a PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "l28.png").read_bytes()[:60])
    missing = tmp_path / "missing.png"
    good = [tmp_path / "l28.png", tmp_path / "rgb28.png"]
    code, out, err = run_main(capsys, models[1][0], good[0], text, missing, truncated, good[1])
    assert code == 1
    assert [line.split("\t")[0] for line in out] == [str(p) for p in good]
    assert err[:2] == [f"error: {text}: not an image (cannot identify image file)",
                       f"error: {missing}: no such file or folder"]
    assert len(err) == 3 and err[2].startswith(f"error: {truncated}: ")
    results = predict.load(models[1][0], threads=1).predict_files([good[0], text], top_k=2)
    assert [set(r) for r in results] == [{"file", "top"}, {"file", "error"}] and len(results[0]["top"]) == 2


def test_bad_models_exit_2_with_one_line(tmp_path, models, capsys):
    write_images(tmp_path)
    image = tmp_path / "l28.png"
    proto = onnx.load(str(models[1][0]))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    proto.metadata_props.add(key="classes", value='["a"]')
    for key, value in [("input_shape", '["batch", 1, 28, 28]'), ("mean", "[0.5"), ("std", "[0.5]")]:
        proto.metadata_props.add(key=key, value=value)
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"definitely not protobuf" * 10)
    cases = {bare: "not a kdcompress model (missing metadata key 'classes')",
             broken: "not a kdcompress model (metadata key 'mean' is not JSON",
             garbage: "cannot load the ONNX model", tmp_path / "nope.onnx": "no such model file"}
    for model_path, message in cases.items():
        code, out, err = run_main(capsys, model_path, image)
        assert code == 2 and out == [] and len(err) == 1, (model_path, err)
        assert err[0].startswith(f"error: {model_path}: {message}"), err
    code, out, err = run_main(capsys, models[1][0], image, "--top-k", "0")
    assert code == 2 and out == [] and "--top-k" in err[-1]


def test_batches_match_one_at_a_time(tmp_path, models, capsys):
    write_images(tmp_path)
    files = sorted(tmp_path.glob("*.png")) + [tmp_path / "photo.jpg"]
    runs = [run_main(capsys, models[3][0], *files, "--json", "--top-k", "5", *extra)
            for extra in ([], ["--batch-size", "1"], ["--batch-size", "4"])]
    results = [[json.loads(line) for line in out] for _, out, _ in runs]
    assert len(results[0]) == len(files) == 7
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a["file"] == b["file"] and a["top"][0]["index"] == b["top"][0]["index"]
            np.testing.assert_allclose([t["prob"] for t in a["top"]], [t["prob"] for t in b["top"]], atol=1e-6)


def test_imports_only_stdlib_numpy_onnxruntime_pillow():
    tree = ast.parse(Path(predict.__file__).read_text())
    allowed = set(sys.stdlib_module_names) | {"numpy", "onnxruntime", "PIL"}
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            imported.add(node.module.split(".")[0])
    assert imported and imported <= allowed, imported - allowed
    assert {"numpy", "onnxruntime", "PIL"} <= imported
