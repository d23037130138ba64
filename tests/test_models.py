"""Model names with a width argument (``tinycnn:C1-C2-C3``, ``mobilenet:W``) build what they say,
round-trip through checkpoints and ONNX metadata by name, and bad arguments are one clear error.
torchvision (``tv:``) and timm (``timm:``) models keep the Classifier contract stage by stage, compute
what the unsplit model does, export to ONNX and distil with feature methods."""

import copy

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
    ("timm:resnet19", r"timm:resnet19: not a timm model; allowed: timm:<name> .* e\.g\. .*resnet10t"),
    ("timm", "timm:: not a timm model"),
    ("timm:vit_tiny_patch16_224", "timm:vit_tiny_patch16_224: no global_pool before its classifier, which stage-wise "
                                  "runs need; allowed: CNNs"),
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


def test_torchvision_batch_norms_follow_their_batches_at_pytorchs_momentum():
    """MobileNetV3's BatchNorm momentum of 0.01 (torchvision's) is 0.1 here: five training batches move
    the first running mean 1 - 0.9^5 of the way to the batches' mean, where 0.01 would move it 5 %."""
    torch.manual_seed(0)
    model = create_model("tv:mobilenet_v3_small", 10, 1).train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and {m.momentum for m in norms} == {0.1}
    x = torch.randn(8, 1, 32, 32) + 3.0
    with torch.no_grad():
        first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        target = first_conv(x).mean(dim=(0, 2, 3))
        norms[0].reset_running_stats()
        for _ in range(5):
            model(x)
    torch.testing.assert_close(norms[0].running_mean, (1 - 0.9 ** 5) * target, rtol=1e-4, atol=1e-5)


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


# ---------------------------------------------------------------- timm models (timm:<name>)

def close(actual, expected):
    """Equal up to float error relative to the expected values' magnitude (fresh timm nets have tiny logits)."""
    scale = expected.detach().abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * scale)


def timm_pair(name: str, channels: int = 1):
    """A timm: model and the unsplit timm model with the same weights (a strict load: timm's own names)."""
    import timm

    torch.manual_seed(0)
    model = create_model(f"timm:{name}", 10, channels)
    reference = timm.create_model(name, pretrained=False, num_classes=10, in_chans=channels)
    reference.load_state_dict(model.state_dict())
    assert sorted(model.state_dict()) == sorted(reference.state_dict())
    return model, reference


TIMM = [pytest.param("resnet10t", ["layer1", "layer2", "layer3", "layer4"]),
        pytest.param("mobilenetv3_small_050", ["blocks.0", "blocks.1", "blocks.3", "blocks.5"]),  # pool, conv_head
        pytest.param("efficientnet_b0", ["blocks.1", "blocks.2", "blocks.4", "bn2"], marks=pytest.mark.slow),
        pytest.param("ghostnet_050", ["blocks.1", "blocks.3", "blocks.5", "blocks.9"], marks=pytest.mark.slow),
        pytest.param("fastvit_t8", ["stages.0", "stages.1", "stages.2", "final_conv"], marks=pytest.mark.slow)]


@pytest.mark.parametrize("name, stages", TIMM)
def test_timm_model_keeps_the_extract_contract_and_computes_what_timm_does(name, stages):
    model, reference = timm_pair(name)
    model.eval(), reference.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        out, expected = model.extract(x), reference(x)
        close(out.logits, expected)
        assert model.stage_names == stages and list(out.features) == ["stage1", "stage2", "stage3", "stage4"]
        sizes = [f.shape[-1] for f in out.features.values()]
        assert sizes == [16, 8, 4, 2]  # one stage per reduction, 4x to 32x
        # the last stage is the map timm's head pools; the embedding its global average pool
        close(out.features["stage4"], reference.forward_features(x))
        close(out.embedding, out.features["stage4"].mean(dim=(2, 3)))
        # run() continues from any boundary
        hidden = model.run(x, None, "stage4")
        close(model.run(hidden, "stage4", "logits"), expected)
        close(model.run(out.features["stage1"], "stage1", "stage3"), out.features["stage3"])
        close(model.run(out.embedding, "embedding", "logits"), expected)


def test_timm_model_trains_like_timm_and_its_segments_share_its_tensors():
    """Train mode (batch statistics, running-stat updates) follows timm's; after a cast, a
    state_dict load and a deep copy (online_ema, dml), every segment reads its own model's tensors."""
    model, reference = timm_pair("mobilenetv3_small_050")
    x = torch.randn(4, 1, 64, 64)
    close(model.train()(x), reference.train()(x))
    for ours, theirs in zip(model.state_dict().values(), [reference.state_dict()[k] for k in model.state_dict()]):
        torch.testing.assert_close(ours, theirs)  # running statistics updated alike
    model.double(), reference.double()
    with torch.no_grad():
        reference.classifier.weight.mul_(3.0)
        model.load_state_dict(reference.state_dict())
        close(model.eval()(x.double()), reference.eval()(x.double()))
        twin, logits = copy.deepcopy(model), model(x.double())
        twin.classifier.bias.add_(1.0)
        close(twin(x.double()), logits + 1.0)
        assert torch.equal(model(x.double()), logits)


@pytest.mark.parametrize("name", [pytest.param("mobilenetv3_small_050"),
                                  *(pytest.param(n, marks=pytest.mark.slow)
                                    for n in ("resnet10t", "efficientnet_b0", "ghostnet_050", "fastvit_t8"))])
def test_timm_model_exports_to_onnx_that_matches_pytorch(name):
    from kdcompress.common.onnx import ort_predict, to_onnx

    model, _ = timm_pair(name)
    x = torch.randn(3, 1, 64, 64)
    got = ort_predict(to_onnx(model, [1, 64, 64], 18, {}).SerializeToString(), [x.numpy()])
    with torch.no_grad():
        close(torch.from_numpy(got), model.eval()(x))


@pytest.mark.parametrize("spots", ["fixed", "adaptive"])
def test_timm_student_distils_from_our_teacher_with_a_feature_method(spots):
    """Fixed spots read the stage outputs; adaptive spots also graft the student's stages onto the
    teacher's and back (``run`` across the two models)."""
    from kdcompress.config import RoutingConfig
    from kdcompress.methods import build_loss
    from kdcompress.training.distiller import Distiller
    from kdcompress.training.routing import SpotRouter

    student, reference = timm_pair("resnet10t")
    teacher = create_model("resnet20", 10, 1).eval()
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    loss = build_loss("fitnet", {"spots": "stage2,stage3"})
    router = SpotRouter(loss, RoutingConfig(init="distil")) if spots == "adaptive" else None
    distiller = Distiller(student, teacher, loss, router=router)
    distiller.setup(x)
    distiller.train()
    distiller.on_epoch_start(0, 1)
    out = distiller(x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None and torch.isfinite(p.grad).all()
                                            for p in student.parameters())
    before = student.eval()(x).detach()
    torch.optim.SGD(distiller.trainable_parameters(), lr=0.1).step()
    with torch.no_grad():  # the step reached the segments: the student computes what timm does with its new weights
        reference.load_state_dict(student.state_dict())
        after = student(x)
        assert not torch.allclose(after, before)
        close(after, reference.eval()(x))


# ---------------------------------------------------------------- the shared split (models.graph)

class TwoStageNet(torch.nn.Module):
    """Two strided stages ``a`` and ``b``, then a head: 1x1 convolution, global pool, classifier. ``relu_first``
    puts a ReLU between the convolution and the pool; ``skip`` lets the head read stage ``a`` too."""

    def __init__(self, relu_first: bool = False, skip: bool = False):
        super().__init__()
        nn = torch.nn
        self.a, self.b = nn.Conv2d(1, 4, 3, 2, 1), nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU())
        self.conv, self.pool, self.fc = nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)
        self.relu_first, self.skip = relu_first, skip

    def forward(self, x):
        a = self.a(x)
        h = self.conv(self.b(a))
        if self.skip:
            h = h + a.mean(dim=1, keepdim=True)[:, :, ::4, ::4]
        return self.fc(torch.flatten(self.pool(torch.relu(h) if self.relu_first else h), 1))


@pytest.mark.parametrize("kind, message", [
    ({}, None),
    ({"relu_first": True}, "test:net: its head is not a global average pool and a classifier, which "
                            "stage-wise runs need; allowed: chains"),
    ({"skip": True}, "test:net: the part ending at logits reads more than the boundary before it"),
])
def test_split_net_checks_that_the_stages_chain_and_the_head_pools_first(kind, message):
    from models.graph import SplitNet

    torch.manual_seed(0)
    net = TwoStageNet(**kind)
    if message is not None:
        with pytest.raises(ValueError, match=message):
            SplitNet("test:net", net, ["a", "b"], 1, "chains")
        return
    model, x = SplitNet("test:net", net, ["a", "b"], 1, "chains").eval(), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert model.boundaries() == ["stage1", "stage2", "embedding", "logits"]
        close(model(x), net.eval()(x))
