"""Which training samples each epoch uses, and with which per-sample distillation weight."""

from __future__ import annotations

import torch


def subset_size(ratio: float, num_samples: int) -> int:
    """``round(ratio * N)`` samples, at least one and at most all: the size of a subset selector's picks."""
    return max(1, min(num_samples, round(ratio * num_samples)))


class SampleSelector:
    """``select(epoch)`` -> indices of the training samples for this epoch;
    ``weights(index)`` -> per-sample KD weight ``alpha`` [B] for those dataset indices, or None
    (then the distiller uses its fixed ce/kd weights); ``observe(index, per_sample)`` sees each
    batch's per-sample loss. ``history`` holds one dict of scalars per selection round."""

    history: list[dict]

    def select(self, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def weights(self, index: torch.Tensor) -> torch.Tensor | None:
        return None

    def observe(self, index: torch.Tensor, per_sample: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
