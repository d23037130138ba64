"""Model names with a width argument (``tinycnn:C1-C2-C3``, ``mobilenet:W``) build what they say,
round-trip through checkpoints and ONNX metadata by name, and bad arguments are one clear error."""

import pytest
import torch

from models import create_model


@pytest.mark.parametrize("name, channels", [
    ("tinycnn", [16, 32, 64]), ("tinycnn:16-48-96", [16, 48, 96]), ("mobilenet", [64, 128, 128]),
    ("mobilenet:16", [32, 64, 64]),
])
def test_width_argument_sets_the_stage_widths(name, channels):
    model = create_model(name, 10, 1).eval()
    assert model.arch == name
    out = model.extract(torch.zeros(2, 1, 28, 28))
    assert [f.shape[1] for f in out.features.values()] == channels and out.logits.shape == (2, 10)


@pytest.mark.parametrize("name, message", [
    ("tinycnn:16-48", "expected three positive channel counts, e.g. tinycnn:16-48-96"),
    ("tinycnn:16,48,96", "expected three positive channel counts"),
    ("mobilenet:wide", "expected a positive stem width, e.g. mobilenet:16"),
    ("resnet20:8", "model 'resnet20' takes no argument after ':'"),
    ("bignet:3", "unknown model 'bignet:3'; allowed:"),
])
def test_bad_width_argument_is_one_clear_error(name, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, 10, 1)
