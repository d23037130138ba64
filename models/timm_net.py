"""timm models by name: ``timm:resnet10t``, ``timm:mobilenetv3_small_050``, ``timm:efficientnet_b0``,
``timm:ghostnet_050``, ``timm:fastvit_t8``, ... (CNNs with a global-pool head from ``timm.list_models()``).

Built by ``timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)``: never a
download; timm adapts the first convolution to the data's channels. ``extract`` keeps the
``Classifier`` contract through ``models.graph.SplitNet`` (traced with timm's own tracer settings,
its no-trace modules and functions):

- stages: the modules timm's feature API names (``model.feature_info``), the last one at each
  reduction, except that the deepest is the final feature map the head pools (the input of its
  ``global_pool``: after ``conv_head``/``bn2`` in EfficientNet, the last block in MobileNetV3 and
  GhostNet, whose ``conv_head`` comes after the pool); the deepest four are ``stage1``..``stage4``;
- embedding: the global average pool of the last stage;
- logits: the model's own head (pool, then e.g. MobileNetV3's ``conv_head`` + activation + flatten +
  classifier) applied to the embedding as a 1x1 map; checked against the unsplit model at construction.

The parameter names are timm's own, so a timm ``state_dict`` loads (``teacher.checkpoint``, or
``teacher.init`` / ``distill.student_init`` where the classes differ).
"""

from __future__ import annotations

from torch import nn

from models.graph import SplitNet, node_names

FAMILIES = "CNNs with a global average pool before the classifier, e.g. timm:resnet10t, timm:mobilenetv3_small_050"
# the names an unknown name's error suggests: of the families tests/test_models.py covers
SHOWN = ["resnet10t", "resnet18", "mobilenetv3_small_*", "efficientnet_b[0-2]", "ghostnet_0*", "fastvit_t*"]


def _under(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _pooled_module(net: nn.Module, names: list[str], shallower: list[str], label: str) -> str:
    """The largest module whose output is the map the head's ``global_pool`` reads (the node just
    before the pool; ``names``: the traced nodes in order), not containing a shallower stage."""
    pools = [n for n, _ in net.named_modules() if n.rpartition(".")[2] == "global_pool"]  # timm's name for it
    first = next((i for i, n in enumerate(names) if pools and _under(pools[-1], n)), 0)
    if not first:
        raise ValueError(f"{label}: no global_pool before its classifier, which stage-wise runs need; "
                         f"allowed: {FAMILIES}")
    node, parts = names[first - 1], names[first - 1].split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        if [n for n in names if _under(prefix, n)][-1] == node and not any(_under(prefix, s) for s in shallower):
            return prefix
    return node


def _stage_names(net: nn.Module, label: str, tracer: dict) -> list[str]:
    at_reduction = {info["reduction"]: info["module"] for info in net.feature_info}  # the last at each reduction
    shallower = list(at_reduction.values())[:-1]
    return [*shallower, _pooled_module(net, node_names(net, **tracer), shallower, label)][-4:]


class TimmNet(SplitNet):
    def __init__(self, name: str, num_classes: int, in_channels: int):
        import timm
        from timm.layers import get_notrace_functions, get_notrace_modules

        net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        tracer = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
        label = f"timm:{name}"
        super().__init__(label, net, _stage_names(net, label, tracer), in_channels, FAMILIES, **tracer)


def timm_model(num_classes: int, in_channels: int, name: str = "") -> TimmNet:
    import timm

    if not name or not timm.is_model(name):
        raise ValueError(f"timm:{name}: not a timm model; allowed: timm:<name> with a name from timm.list_models(), "
                         f"e.g. {', '.join(timm.list_models(SHOWN))}")
    return TimmNet(name, num_classes, in_channels)
