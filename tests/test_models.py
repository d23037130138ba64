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
    ("tv:resnet19", "tv:resnet19: not a torchvision classification model; allowed: tv:<name>"),
    ("tv", "tv:: not a torchvision classification model"),
])
def test_bad_width_argument_is_one_clear_error(name, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, 10, 1)



# ---------------------------------------------------------------- torchvision models (tv:<name>)

TV = [pytest.param("tv:resnet18"), pytest.param("tv:mobilenet_v3_small"),
      pytest.param("tv:efficientnet_b0", marks=pytest.mark.slow),
      pytest.param("tv:shufflenet_v2_x0_5", marks=pytest.mark.slow),
      pytest.param("tv:regnet_y_400mf", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", TV)
def test_torchvision_model_keeps_the_extract_contract(name):
    import torchvision

    torch.manual_seed(0)
    model = create_model(name, 10, 1).eval()  # grey images: the first convolution is rebuilt
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        out = model.extract(x)
        assert torch.equal(model(x), out.logits) and out.logits.shape == (3, 10)
        assert list(out.features) == ["stage1", "stage2", "stage3", "stage4"]
        sizes = [f.shape[-1] for f in out.features.values()]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4  # shallow -> deep, one per resolution
        last = out.features["stage4"]
        assert out.embedding.shape == (3, last.shape[1])
        torch.testing.assert_close(out.embedding, last.mean(dim=(2, 3)))
    # a torchvision state_dict (3 channels, classifier replaced for 10 classes) has the same names
    reference = torchvision.models.get_model(name[3:], weights=None, num_classes=10).state_dict()
    colour = create_model(name, 10, 3)
    assert list(colour.state_dict()) == list(reference)
    colour.load_state_dict(reference)
    assert all(torch.equal(colour.state_dict()[k], v) for k, v in reference.items())
    assert model.state_dict()[next(iter(reference))].shape[1] == 1


def test_torchvision_model_computes_what_torchvision_does_and_its_classifier_reads_the_embedding():
    import torchvision

    torch.manual_seed(0)
    for name, classifier in (("tv:resnet18", "fc"), ("tv:mobilenet_v3_small", "classifier")):
        model = create_model(name, 10, 3).eval()
        reference = torchvision.models.get_model(name[3:], weights=None, num_classes=10).eval()
        reference.load_state_dict(model.state_dict())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            out = model.extract(x)
            torch.testing.assert_close(out.logits, reference(x))
            torch.testing.assert_close(getattr(reference, classifier)(out.embedding), out.logits)


@pytest.mark.slow
def test_torchvision_student_exports_and_distils_with_a_feature_method():
    from kdcompress.common.onnx import ort_predict, to_onnx
    from kdcompress.methods import build_loss
    from kdcompress.training.distiller import Distiller

    torch.manual_seed(0)
    student, teacher = create_model("tv:mobilenet_v3_small", 10, 1), create_model("tv:resnet18", 10, 1).eval()
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    distiller = Distiller(student, teacher, build_loss("at", {"spots": "stage2,stage3"}))
    distiller.setup(x)
    out = distiller(x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in student.parameters())
    student.eval()
    got = ort_predict(to_onnx(student, [1, 32, 32], 18, {}).SerializeToString(), [x.numpy()])
    with torch.no_grad():
        assert abs(got - student(x).numpy()).max() < 1e-4
