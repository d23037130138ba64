"""A third-party classifier (torchvision, timm) traced with ``torch.fx`` and cut at its stage
outputs, so that it keeps the ``Classifier`` contract of our own nets: ``run`` goes from one
boundary to the next, which spot-adaptive distillation needs to graft teacher and student stages.

``SplitNet`` does the part every family shares: trace the model with its stage outputs and logits
as return nodes, cut the traced graph into one segment per stage plus the head (for the train and
the eval graph, which differ where the model's code reads ``self.training``), and check at
construction that the segments chained through the embedding give the unsplit model's logits.
A subclass only says which modules end the stages (``models.tv``, ``models.timm_net``).

Every module type that holds its own parameters or buffers is traced as one call (a leaf), so the
segments call the model's modules themselves rather than holding copies of their tensors: moving
the model to a device or loading a state_dict reaches every segment.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from models.base import EMBEDDING, LOGITS, Classifier

PROBE = 64  # px of the construction check: the families we support downsample 32x, leaving a 2x2 map
ATOL = 1e-4  # the segments must give the unsplit model's logits within this (relative below magnitude 1)


def tracer_kwargs(net: nn.Module, leaf_modules=(), autowrap_functions=()) -> dict:
    """Tracer settings: ``leaf_modules`` (plus every module type that owns tensors directly) are
    traced as single calls, ``autowrap_functions`` as single function calls."""
    owners = {type(m) for m in net.modules() if m is not net and (next(m.parameters(recurse=False), None) is not None
                                                                 or next(m.buffers(recurse=False), None) is not None)}
    return {"leaf_modules": [*owners, *leaf_modules], "autowrap_functions": list(autowrap_functions)}


def node_names(net: nn.Module, **kwargs) -> list[str]:
    """The qualified names of the traced train-mode graph's nodes, in execution order."""
    from torchvision.models.feature_extraction import get_graph_node_names

    return get_graph_node_names(net, tracer_kwargs=tracer_kwargs(net, **kwargs), suppress_diff_warning=True)[0]


class SplitNet(Classifier):
    """``net`` split after each module of ``stage_names`` (shallow -> deep): boundaries ``stage1``..,
    ``embedding`` (the global average pool of the last stage), ``logits`` (the model's own head
    applied to the embedding as a 1x1 map, where its global pool changes nothing).

    ``label`` names the model in errors, ``families`` says which models work; ``leaf_modules`` and
    ``autowrap_functions`` are extra tracer settings (timm's own)."""

    def __init__(self, label: str, net: nn.Module, stage_names: list[str], in_channels: int, families: str,
                 leaf_modules=(), autowrap_functions=()):
        nn.Module.__init__(self)
        self.stage_names = stage_names
        self._label, self._families = label, families
        graph = self._trace(net, {"leaf_modules": leaf_modules, "autowrap_functions": autowrap_functions})
        for child_name, child in graph.named_children():  # the model's own parameter names, no prefix
            self.add_module(child_name, child)
        missing = sorted(set(net.state_dict()) - set(self.state_dict()))
        if missing:
            raise self._unsupported(f"{missing[0]} is not used by its forward pass")
        # the segments run the shared modules and are not a second registration
        object.__setattr__(self, "segments", {mode: self._segments(graph, mode) for mode in (True, False)})
        self._check(graph, in_channels)
        self.train()

    def _trace(self, net: nn.Module, kwargs: dict) -> fx.GraphModule:
        """``net`` traced in both modes, returning the stage outputs and the logits."""
        from torchvision.models.feature_extraction import create_feature_extractor

        try:
            nodes = {n: f"stage{i + 1}" for i, n in enumerate(self.stage_names)}
            nodes[node_names(net, **kwargs)[-1]] = LOGITS
            return create_feature_extractor(net.train(), return_nodes=nodes, tracer_kwargs=tracer_kwargs(net, **kwargs),
                                            suppress_diff_warning=True)
        except Exception as err:  # noqa: BLE001 - torch.fx fails in many ways on code it cannot trace
            first = (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise self._unsupported(f"torch.fx cannot trace it ({first})") from None

    def _unsupported(self, why: str) -> ValueError:
        return ValueError(f"{self._label}: {why}, which stage-wise runs need; allowed: {self._families}")

    def _segments(self, graph: fx.GraphModule, training: bool) -> dict[str, fx.GraphModule]:
        """One segment per stage (input -> stage1, stage1 -> stage2, ...) and the head, cut from the
        graph of that mode; each must read only the boundary before it."""
        from torch.fx.passes.split_module import split_module

        graph.train(training)  # a DualGraphModule: selects its train or eval graph
        returned = next(n for n in graph.graph.nodes if n.op == "output").args[0]
        ends, part, current = {v.name for k, v in returned.items() if k != LOGITS}, {}, 0
        for node in graph.graph.nodes:
            if node.op not in ("placeholder", "output"):
                part[node.name] = current
                current += node.name in ends
        split = dict(split_module(graph, graph, lambda node: part[node.name]).named_children())
        names = [*(f"stage{i + 1}" for i in range(len(ends))), LOGITS]
        segments = dict(zip(names, (split[f"submod_{i}"] for i in range(len(names)))))
        for name, segment in segments.items():
            if sum(node.op == "placeholder" for node in segment.graph.nodes) != 1:
                raise self._unsupported(f"the part ending at {name} reads more than the boundary before it (blocks "
                                        "in a chain)")
        return segments

    def _check(self, graph: fx.GraphModule, in_channels: int) -> None:
        """The segments give the unsplit model's logits, within ``ATOL`` of their largest magnitude
        (a freshly initialised net can have logits far below 1e-4)."""
        with torch.no_grad():
            probe = torch.randn(2, in_channels, PROBE, PROBE)
            ref = graph.eval()(probe)[LOGITS]
            try:
                error = (self.eval().extract(probe).logits - ref).abs().max()
            except RuntimeError:  # e.g. a classifier on the flattened map, which a 1x1 map does not fit
                error = None
            if error is None or error > ATOL * ref.abs().max().clamp(max=1.0):
                raise self._unsupported("its head is not a global average pool and a classifier")

    def boundaries(self) -> list[str]:
        return [*self.segments[True]][:-1] + [EMBEDDING, LOGITS]

    def step(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == EMBEDDING:  # the global pool, as for our own nets
            return super().step(name, x)
        return self.segments[self.training][name](x[:, :, None, None] if name == LOGITS else x)
