"""The control of any clever selection: a uniform random subset of ``round(ratio * N)`` training
samples, redrawn every ``interval`` epochs (the epochs ``n`` with ``n % interval == 0``), trained on
with the base method's own loss (no per-sample weights).

The subset of the round starting at epoch ``n`` is a pure function of ``(seed, n)`` (its own stream of
``epoch_generator``), so a resumed run, and every process of a distributed one, draw the same subset
without sharing anything.
"""

from __future__ import annotations

import torch

from kdcompress.data.transforms import epoch_generator
from kdcompress.training.selection.base import SampleSelector, subset_size

SUBSET_STREAM = 3  # epoch_generator's streams 0-2 are the loaders' shuffle order and augmentation draws


class RandomSubset(SampleSelector):
    """``select(epoch)``: the sorted dataset indices of the current round's subset; one ``history``
    record per round (its epoch, size, and overlap with the previous round's subset)."""

    def __init__(self, num_samples: int, ratio: float, interval: int, seed: int = 0):
        self.num_samples = num_samples
        self.k = subset_size(ratio, num_samples)
        self.interval = int(interval)
        self.seed = int(seed)
        self.round_epoch = -1
        self.selection: torch.Tensor | None = None
        self.history: list[dict] = []

    def subset(self, round_epoch: int) -> torch.Tensor:
        """The sorted indices drawn for the round that starts at ``round_epoch``."""
        order = torch.randperm(self.num_samples, generator=epoch_generator(self.seed, round_epoch, SUBSET_STREAM))
        return order[:self.k].sort().values

    def select(self, epoch: int) -> torch.Tensor:
        start = epoch - epoch % self.interval
        if start != self.round_epoch:
            self.selection, self.round_epoch = self.subset(start), start
            if epoch == start:  # a round starts here (a run resumed mid-round only re-derives its subset)
                self.history.append(self.record(start))
        return self.selection

    def record(self, start: int) -> dict:
        overlap = 0.0
        if start > 0:
            prev = torch.zeros(self.num_samples, dtype=torch.bool)
            prev[self.subset(start - self.interval)] = True
            overlap = prev[self.selection].float().mean().item()
        return {"round": start // self.interval + 1, "epoch": start, "selected": self.k, "overlap_prev": overlap}

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.history], "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(h) for h in state["history"]]
        self.seed = int(state["seed"])  # the subsets of the run that saved it
        self.round_epoch, self.selection = -1, None
