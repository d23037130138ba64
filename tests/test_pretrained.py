"""Starting a network from pretrained weights (``init_weights``: teacher.init, distill.student_init)
and using weights as is (``load_weights``: teacher.checkpoint): kdcompress, torchvision and timm
files, the wrappers training scripts save, a classifier for other classes, and every other mismatch
as one clear line."""

from __future__ import annotations

import argparse

import pytest
import torch

from kdcompress.common.checkpoint import init_weights, load_model, load_weights, read_checkpoint, save_checkpoint
from kdcompress.types import UserError
from models import create_model

KEY = "distill.student_init"


def ours(tmp_path, classes: int = 5):
    """A kdcompress checkpoint of resnet20 at ``classes`` classes, 1 channel."""
    torch.manual_seed(1)
    model = create_model("resnet20", classes, 1)
    return save_checkpoint(tmp_path / "ours.pt", "resnet20", classes, 1, model.state_dict()), model.state_dict()


def assert_loaded(model, state: dict, head: list[str]):
    """Every tensor but the head's is the file's."""
    own = model.state_dict()
    assert sorted(own) == sorted(state)
    for key, value in state.items():
        if key not in head:
            assert torch.equal(own[key], value), key


def test_our_checkpoint_initialises_the_same_arch_for_other_classes(tmp_path, capsys):
    path, state = ours(tmp_path)
    torch.manual_seed(2)
    model = create_model("resnet20", 10, 1)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    assert init_weights(model, path, KEY) == ["head.weight", "head.bias"]
    assert_loaded(model, state, ["head.weight", "head.bias"])
    assert not torch.equal(model.state_dict()["stages.stage1.0.conv1.weight"], fresh["stages.stage1.0.conv1.weight"])
    for key in ("head.weight", "head.bias"):  # left as initialised
        assert torch.equal(model.state_dict()[key], fresh[key])
    assert capsys.readouterr().out == (f"note: {KEY}: {path}: re-initialised the classifier head (head.weight, "
                                       "head.bias): 5 classes in the file, 10 here\n")


def test_same_classes_load_every_tensor_and_print_nothing(tmp_path, capsys):
    path, state = ours(tmp_path, classes=10)
    model = create_model("resnet20", 10, 1)
    assert init_weights(model, path, KEY) == []
    assert_loaded(model, state, [])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd, "epoch": 3},  # torchvision's reference training scripts
    lambda sd: {"state_dict": sd, "arch": "resnet20", "args": argparse.Namespace(lr=0.1)},  # timm's train.py
    lambda sd: {f"module.{k}": v for k, v in sd.items()},  # saved through DistributedDataParallel
])
def test_the_files_training_scripts_save_load(tmp_path, wrap):
    _, state = ours(tmp_path, classes=10)
    torch.save(wrap(state), tmp_path / "w.pt")
    model = create_model("resnet20", 10, 1)
    assert init_weights(model, tmp_path / "w.pt", KEY) == []
    assert_loaded(model, state, [])
    assert "arch" not in read_checkpoint(tmp_path / "w.pt")  # only our own checkpoints carry an architecture
    with pytest.raises(UserError, match="not a kdcompress checkpoint"):
        load_model(tmp_path / "w.pt", torch.device("cpu"), create_model)


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """A torchvision resnet18 state_dict at its 1000 ImageNet classes, 3 channels (built here, never downloaded)."""
    import torchvision

    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None, num_classes=1000).state_dict()
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_a_torchvision_state_dict_initialises_a_tv_model(torchvision_file, capsys):
    path, state = torchvision_file
    model = create_model("tv:resnet18", 10, 3)
    assert init_weights(model, path, "teacher.init") == ["fc.weight", "fc.bias"]
    assert_loaded(model, state, ["fc.weight", "fc.bias"])
    assert capsys.readouterr().out == (f"note: teacher.init: {path}: re-initialised the classifier head (fc.weight, "
                                       "fc.bias): 1000 classes in the file, 10 here\n")


def test_a_timm_checkpoint_initialises_a_timm_model(tmp_path, capsys):
    import timm

    torch.manual_seed(4)
    state = timm.create_model("mobilenetv3_small_050", pretrained=False).state_dict()  # 1000 classes, 3 channels
    torch.save({"epoch": 9, "arch": "mobilenetv3_small_050", "state_dict": state, "version": 2,
                "args": argparse.Namespace(model="mobilenetv3_small_050")}, tmp_path / "timm.pth.tar")
    model = create_model("timm:mobilenetv3_small_050", 10, 3)
    head = ["classifier.weight", "classifier.bias"]  # the Linear after the pool, conv_head and flatten
    assert init_weights(model, tmp_path / "timm.pth.tar", KEY) == head
    assert_loaded(model, state, head)
    assert "1000 classes in the file, 10 here" in capsys.readouterr().out


def test_three_channel_weights_for_one_channel_data_are_one_clear_error(torchvision_file):
    path, _ = torchvision_file
    with pytest.raises(UserError) as err:
        init_weights(create_model("tv:resnet18", 10, 1), path, KEY)
    assert str(err.value) == (f"{KEY}: {path}: shape mismatch for conv1.weight: file (64, 3, 7, 7), model "
                              "(64, 1, 7, 7) (1 mis-shaped; another architecture, classes or input channels?)")


@pytest.mark.parametrize("change, message", [
    (lambda sd: {**sd, "extra.weight": torch.zeros(3)}, "unexpected extra.weight (0 missing, 1 unexpected keys"),
    (lambda sd: {k: v for k, v in sd.items() if k != "stem.1.running_mean"},
     "missing stem.1.running_mean (1 missing, 0 unexpected keys"),
])
def test_a_file_that_does_not_fit_names_the_first_offending_key(tmp_path, change, message):
    _, state = ours(tmp_path)
    torch.save(change(state), tmp_path / "w.pt")
    with pytest.raises(UserError) as err:
        init_weights(create_model("resnet20", 10, 1), tmp_path / "w.pt", KEY)
    assert str(err.value).startswith(f"{KEY}: {tmp_path / 'w.pt'}: the file does not fit the model: {message}")


def test_weights_used_as_is_refuse_a_classifier_for_other_classes(tmp_path):
    path, state = ours(tmp_path)
    with pytest.raises(UserError) as err:
        load_weights(create_model("resnet20", 10, 1), state, path, what="teacher.checkpoint", init_key="teacher.init")
    assert str(err.value) == (f"teacher.checkpoint {path} predicts 5 classes, the data has 10; to start from these "
                              "weights and train, use teacher.init")
    model = load_weights(create_model("resnet20", 5, 1), state, path, what="teacher.checkpoint")
    assert_loaded(model, state, [])
