"""Types shared by the library and the model zoo (models/ may import this module only)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    """What ``model.extract(x)`` returns.

    logits:    [B, num_classes]
    features:  named spatial stage outputs, ordered shallow -> deep ([B, C, H, W] each)
    embedding: the pooled penultimate feature [B, D] that feeds the classifier
    """

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    embedding: torch.Tensor | None = None


@dataclass
class StepOutput:
    """One distiller step: the scalar loss to back-propagate, the student logits, the per-sample
    total loss (detached), which sample selectors may observe, and the labels the step trained on
    (the batch's own, unless the loss replaced the batch, as data_free does)."""

    loss: torch.Tensor
    logits: torch.Tensor
    per_sample: torch.Tensor
    target: torch.Tensor


class UserError(Exception):
    """A mistake in the user's input (params, files, arguments). Stage scripts print its message
    as one line and exit non-zero; the message names what is wrong and what is allowed."""
