"""torchvision classification models by name: ``tv:resnet18``, ``tv:mobilenet_v3_small``,
``tv:efficientnet_b0``, ``tv:shufflenet_v2_x0_5``, ``tv:regnet_y_400mf``, ... (any name that
``torchvision.models.list_models(module=torchvision.models)`` lists).

Built by ``torchvision.models.get_model(name, weights=None, num_classes=...)``: never a download.
The first convolution is rebuilt for the data's channels. ``extract`` keeps the ``Classifier``
contract through ``models.graph.SplitNet``: the traced graph (``torch.fx``) is split at the stage
outputs so that ``run`` goes from one boundary to the next as for our own nets:

- stages: among the model's top-level blocks (and the blocks of its ``features`` or
  ``trunk_output`` container), the last one at each spatial resolution of a 64-px probe; the
  deepest four are ``stage1``..``stage4`` (fewer if the model has fewer);
- embedding: the global average pool of the last stage, which is what feeds the classifier of
  every model family above (ResNet, MobileNet, EfficientNet, ShuffleNet, RegNet);
- logits: the model's own head applied to the embedding as a 1x1 map (its global pool of a 1x1
  map changes nothing); checked against the unsplit model at construction.

BatchNorm layers keep their running statistics with PyTorch's default momentum, 0.1, where torchvision sets
less (MobileNetV3 0.01, MNASNet 0.0003, tuned for hundreds of ImageNet epochs): over the few epochs of a
distillation run the slower averages lag far behind the weights, and evaluation mode collapses (a
`tv:mobilenet_v3_small` distilled for 2 epochs of 13,500 images at 64 px: val 25.0 % and 11.1 % after its
epochs with torchvision's 0.01, 73.9 % and 80.5 % with 0.1, the training losses identical). Momentum is
not in a ``state_dict``, so torchvision weights load as they are.

The parameter names are torchvision's own, so a torchvision ``state_dict`` whose classifier was
replaced for your classes loads as ``teacher.checkpoint`` (README: Models), and one for other
classes starts a model as ``teacher.init`` or ``distill.student_init``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.graph import PROBE, SplitNet

CONTAINERS = ("features", "trunk_output")  # Sequential of blocks whose outputs are stage candidates
POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)  # the global pool before the classifier is no stage
FAMILIES = "ResNet, MobileNet, EfficientNet, ShuffleNet, RegNet families"
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _first_conv(net: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for path, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_path, _, attr = path.rpartition(".")
            return net.get_submodule(parent_path) if parent_path else net, attr, module
    raise ValueError("no convolution to adapt to the data's channels")


def _stage_names(net: nn.Module, in_channels: int, label: str) -> list[str]:
    candidates = []
    for name, child in net.named_children():
        if name in CONTAINERS and isinstance(child, nn.Sequential):
            candidates += [(f"{name}.{sub}", block) for sub, block in child.named_children()]
        elif not isinstance(child, POOLS):
            candidates.append((name, child))
    seen: list[tuple[str, tuple[int, int]]] = []
    hooks = [module.register_forward_hook(lambda m, i, out, n=name: seen.append((n, tuple(out.shape[-2:])))
                                          if isinstance(out, torch.Tensor) and out.dim() == 4 else None)
             for name, module in candidates]
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, in_channels, PROBE, PROBE))
    except (RuntimeError, AssertionError) as err:  # e.g. a transformer that takes one image size only
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{label}: does not run on a {PROBE}-px image ({first}); allowed: {FAMILIES}") from None
    finally:
        for hook in hooks:
            hook.remove()
    last_at: dict[tuple[int, int], str] = {}
    for name, size in seen:
        last_at.pop(size, None)
        last_at[size] = name  # insertion order = the order the resolutions last appear
    return list(last_at.values())[-4:]


class TorchvisionNet(SplitNet):
    def __init__(self, name: str, num_classes: int, in_channels: int):
        import torchvision

        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        for layer in net.modules():
            if isinstance(layer, BATCH_NORMS):
                layer.momentum = 0.1  # see the module's docstring
        parent, attr, conv = _first_conv(net)
        if conv.in_channels != in_channels:
            setattr(parent, attr, nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                            conv.padding, conv.dilation, conv.groups, conv.bias is not None))
        label = f"tv:{name}"
        super().__init__(label, net, _stage_names(net, in_channels, label), in_channels, FAMILIES)


def torchvision_model(num_classes: int, in_channels: int, name: str = "") -> TorchvisionNet:
    import torchvision

    allowed = torchvision.models.list_models(module=torchvision.models)
    if name not in allowed:
        shown = ", ".join(n for n in allowed if n.startswith(("resnet", "mobilenet", "efficientnet_b", "shufflenet",
                                                               "regnet_y_4")))
        raise ValueError(f"tv:{name}: not a torchvision classification model; allowed: tv:<name> with a name from "
                         f"torchvision.models.list_models(), e.g. {shown}")
    return TorchvisionNet(name, num_classes, in_channels)
