"""torchvision classification models by name: ``tv:resnet18``, ``tv:mobilenet_v3_small``,
``tv:efficientnet_b0``, ``tv:shufflenet_v2_x0_5``, ``tv:regnet_y_400mf``, ... (any name that
``torchvision.models.list_models(module=torchvision.models)`` lists).

Built by ``torchvision.models.get_model(name, weights=None, num_classes=...)``: never a download.
The first convolution is rebuilt for the data's channels. ``extract`` keeps the ``Classifier``
contract through ``torchvision.models.feature_extraction``, and the traced graph is split at the
stage outputs (``torch.fx``) so that ``run`` goes from one boundary to the next as for our own nets:

- stages: among the model's top-level blocks (and the blocks of its ``features`` or
  ``trunk_output`` container), the last one at each spatial resolution of a 64-px probe; the
  deepest four are ``stage1``..``stage4`` (fewer if the model has fewer);
- embedding: the global average pool of the last stage, which is what feeds the classifier of
  every model family above (ResNet, MobileNet, EfficientNet, ShuffleNet, RegNet);
- logits: the model's own head applied to the embedding as a 1x1 map (its global pool of a 1x1
  map changes nothing); checked against the unsplit model at construction.

The parameter names are torchvision's own, so a torchvision ``state_dict`` whose classifier was
replaced for your classes loads as ``teacher.checkpoint`` (README: Models).
"""

from __future__ import annotations

import torch
from torch import nn

from models.base import EMBEDDING, LOGITS, Classifier

CONTAINERS = ("features", "trunk_output")  # Sequential of blocks whose outputs are stage candidates
PROBE = 64  # px: every family above downsamples 32x, so each stage still has its own resolution
POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)  # the global pool before the classifier is no stage


def _first_conv(net: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for path, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_path, _, attr = path.rpartition(".")
            return net.get_submodule(parent_path) if parent_path else net, attr, module
    raise ValueError("no convolution to adapt to the data's channels")


def _stage_names(net: nn.Module, in_channels: int) -> list[str]:
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
    finally:
        for hook in hooks:
            hook.remove()
    last_at: dict[tuple[int, int], str] = {}
    for name, size in seen:
        last_at.pop(size, None)
        last_at[size] = name  # insertion order = the order the resolutions last appear
    return list(last_at.values())[-4:]


class TorchvisionNet(Classifier):
    def __init__(self, name: str, num_classes: int, in_channels: int):
        nn.Module.__init__(self)
        import torchvision
        from torch.fx.passes.split_module import split_module
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        parent, attr, conv = _first_conv(net)
        if conv.in_channels != in_channels:
            setattr(parent, attr, nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                            conv.padding, conv.dilation, conv.groups, conv.bias is not None))
        self.stage_names = _stage_names(net, in_channels)
        output = get_graph_node_names(net)[0][-1]
        nodes = {n: f"stage{i + 1}" for i, n in enumerate(self.stage_names)} | {output: "logits"}
        graph = create_feature_extractor(net.train(), return_nodes=nodes)
        for child_name, child in graph.named_children():  # torchvision's parameter names, no prefix
            self.add_module(child_name, child)
        # one segment per stage (input -> stage1, stage1 -> stage2, ...) and the head; they run the
        # shared modules and are not a second registration
        returned = next(n for n in graph.graph.nodes if n.op == "output").args[0]
        ends, part, current = {v.name for k, v in returned.items() if k != "logits"}, {}, 0
        for node in graph.graph.nodes:
            if node.op not in ("placeholder", "output"):
                part[node.name] = current
                current += node.name in ends
        split = dict(split_module(graph, net, lambda node: part[node.name]).named_children())
        segments = [split[f"submod_{i}"] for i in range(len(ends) + 1)]
        object.__setattr__(self, "segments", dict(zip([*(f"stage{i + 1}" for i in range(len(ends))), LOGITS],
                                                      segments)))
        with torch.no_grad():
            probe = torch.randn(2, in_channels, PROBE, PROBE)
            if not torch.allclose(self.eval().extract(probe).logits, graph.eval()(probe)["logits"], atol=1e-4):
                raise ValueError(f"tv:{name}: its head is not a global pool and a classifier, which stage-wise "
                                 "runs need; allowed: ResNet, MobileNet, EfficientNet, ShuffleNet, RegNet families")
        self.train()

    def boundaries(self) -> list[str]:
        return [*self.segments][:-1] + [EMBEDDING, LOGITS]

    def step(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == EMBEDDING:  # the global pool, as for our own nets
            return super().step(name, x)
        out = self.segments[name](x[:, :, None, None] if name == LOGITS else x)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{name}: a segment reads more than the boundary before it; stage-wise runs need a chain "
                             "of blocks")
        return out


def torchvision_model(num_classes: int, in_channels: int, name: str = "") -> TorchvisionNet:
    import torchvision

    allowed = torchvision.models.list_models(module=torchvision.models)
    if name not in allowed:
        shown = ", ".join(n for n in allowed if n.startswith(("resnet", "mobilenet", "efficientnet_b", "shufflenet",
                                                               "regnet_y_4")))
        raise ValueError(f"tv:{name}: not a torchvision classification model; allowed: tv:<name> with a name from "
                         f"torchvision.models.list_models(), e.g. {shown}")
    return TorchvisionNet(name, num_classes, in_channels)
