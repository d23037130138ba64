"""The GPU path: runs where CUDA is present, skipped elsewhere. One epoch of a logit method and of a
feature method on the GPU, in fp32 and bf16; the student trains on the GPU, the resume state and
the checkpoints come back on the CPU in float32. The greedy DPP takes GPU inputs and answers on the GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import FakeNet, make_split

from kdcompress.config import TrainConfig
from kdcompress.data.loader import BatchLoader
from kdcompress.methods import build_loss
from kdcompress.training.distiller import Distiller
from kdcompress.training.loop import fit
from kdcompress.training.selection import FullData
from kdcompress.training.selection.dpp import greedy_dpp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", ["kd", "at"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_epoch_on_the_gpu(method, precision):
    device = torch.device("cuda")
    train = BatchLoader(make_split(64, seed=0), [0.5], [0.25], device, batch_size=16, crop_padding=1, hflip=True)
    val = BatchLoader(make_split(32, seed=1), [0.5], [0.25], device, batch_size=32)
    torch.manual_seed(0)
    student = FakeNet(num_classes=4, in_channels=1, width=4).to(device)
    teacher = FakeNet(width=8).to(device)
    distiller = Distiller(student, teacher, build_loss(method))
    result = fit(distiller, train, val, FullData(len(train)), TrainConfig(epochs=1, batch_size=16), precision=precision)
    assert next(student.parameters()).device.type == "cuda"
    assert result.history[0]["train_loss"] == result.history[0]["train_loss"]  # not NaN
    for tensor in result.last_state["student"].values():
        assert tensor.device.type == "cpu"
        assert not tensor.is_floating_point() or tensor.dtype == torch.float32


def test_greedy_dpp_takes_gpu_inputs():
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(300, 8, generator=g), dim=1)
    quality = torch.rand(300, generator=g)
    picked = greedy_dpp(features.cuda(), quality.cuda(), 50)
    assert picked.device.type == "cuda"
    assert torch.equal(picked.cpu(), greedy_dpp(features, quality, 50))
