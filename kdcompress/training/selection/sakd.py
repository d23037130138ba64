"""SAKD: the image version of "Sample-level Adaptive Knowledge Distillation for Action Recognition"
(ACM MM 2025), as a ``SampleSelector``.

Every ``interval`` epochs (0-based epochs ``n`` with ``n % interval == 0``) one selection round:

1. ``beta_raw = 1 - (1 - n / N_epoch) ** theta``, ``beta = min(beta_raw, eta)``. ``n`` is the
   0-based epoch index (= the number of epochs already trained), so the round at epoch 0 has
   ``beta_raw = 0``: dropout zeroes nothing and the first difficulty pass sees clean images.
2. Difficulty pass over ALL training samples (no grad; teacher and student in eval mode, the
   student's mode restored after), un-augmented and interrupted: spatial dropout of
   ``floor(beta H W)`` pixel positions (all channels, fresh mask per image) when ``beta_raw <= eta``,
   else a spatial shuffle (pixel or ``patch_size`` patch permutation, fresh per image). Each image's
   mask or permutation is a pure function of ``(seed, epoch of the round, dataset index)``
   (``sample_keys``, counter-based): any number of processes, any batch size, a resumed run, all
   interrupt every sample the same way.
3. ``l_i = T^2 KL(p_t || p_s)`` on the interrupted input; ``p_i ∝ (omega_i + eps)^-1``;
   ``s_i = p_i l_i``; ``s_hat`` = min-max normalised ``s`` (``normalise: rank``, our variant: its
   rank over N - 1, whose mean stays 0.5 however skewed the losses are).
4. Diversity features: the teacher's pooled embedding ``F`` of the interrupted image; first round
   ``f = F``, later ``f = 0.1 f + 0.9 F`` (dropout regime) or unchanged (shuffle regime). The stored
   ``f`` is the fused, un-normalised feature; the DPP gets its L2-normalised rows.
5. ``alpha = s_hat`` at the first round, later ``alpha = lambda alpha + (1 - lambda) rate s_hat`` with
   ``rate = beta_raw`` (default), ``beta``, or 1 (``alpha_rate: one``, our variant: without the
   interruption factor alpha follows s_hat instead of shrinking with beta_raw early in training).
6. ``k = round(r N)`` samples by the greedy MAP of the quality–diversity DPP (``dpp.greedy_dpp``).
7. ``omega += 1`` for the selected samples.

Between rounds ``select`` returns the same subset; ``weights(index)`` returns ``alpha[index]``, which
the Distiller uses as ``2 [(1 - alpha_i) w_ce CE_i + alpha_i w_kd KD_i]`` with the method's weights
(``loss_scale: constant``, our variant: rescaled per batch so the weights total the base method's).

With a cache of the clean pass (``clean_cache``) and ``cache_interrupted``, the teacher's outputs on
the interrupted images are cached too (``interrupted_cache``): they depend only on what the clean
cache's key holds and on ``interruption_view``, so a second run of a sweep runs no teacher in any
pass (the student's forward stays live: it changes from run to run).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from kdcompress.common import distributed
from kdcompress.config import SAKDConfig
from kdcompress.data.loader import BatchLoader
from kdcompress.methods.kd import kl_per_sample
from kdcompress.training.distiller import alpha_weights
from kdcompress.training.selection.base import SampleSelector, subset_size
from kdcompress.training.selection.dpp import greedy_dpp
from kdcompress.training.selection.interruptions import sample_keys, spatial_dropout, spatial_shuffle
from kdcompress.training.teacher_cache import TeacherCache
from kdcompress.types import UserError

FEATURE_MOMENTUM = 0.1  # weight of the old fused feature in the dropout regime (the paper's step 4)
Interruption = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (normalised batch, dataset indices) -> batch


def beta_schedule(n: int, epochs: int, theta: float, eta: float) -> tuple[float, float]:
    """``(beta_raw, beta)`` of the round at 0-based epoch ``n`` out of ``epochs``."""
    frac = min(max(n / epochs, 0.0), 1.0)
    beta_raw = 1.0 - (1.0 - frac) ** theta
    return beta_raw, min(beta_raw, eta)


def normalise(s: torch.Tensor, how: str = "minmax") -> torch.Tensor:
    """``s_hat`` in [0, 1] (float32) of the scores ``s`` [N]. ``minmax``: the paper's
    ``(s - min) / (max - min)``, whose mean collapses towards 0 when a few scores lie far above the
    rest; ``rank``: each score's rank over ``N - 1`` (tied scores share their mean rank), whose mean
    is 0.5 whatever the distribution."""
    if how == "minmax":
        return ((s - s.min()) / (s.max() - s.min() + 1e-12)).float()
    if how != "rank":
        raise ValueError(f"normalise: {how!r}; allowed: minmax, rank")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    first = (counts.cumsum(0) - counts).double()  # the rank of each distinct score's first occurrence
    ranks = first + (counts.double() - 1) / 2
    return (ranks[inverse] / max(len(s) - 1, 1)).float()


def interrupted_cache(clean: TeacherCache, view: dict) -> TeacherCache:
    """The cache of the pass teacher's outputs on the interrupted images, beside ``clean`` (same
    teacher, data, runtime, device and precision: those are in its key) under a key that adds ``view``,
    what the interruptions depend on besides the round's epoch (``SAKDSelector.interruption_view``).
    One entry per round, under the round's epoch."""
    blob = json.dumps({"clean": clean.folder.name, "interruption": view}, sort_keys=True).encode()
    key = hashlib.sha256(blob).hexdigest()[:16]
    cache = TeacherCache(clean.root, key, clean.num_samples, frozenset(clean.parts), clean.max_bytes)
    print(f"teacher cache {key} (interrupted images of {clean.folder.name}): {cache.cached_epochs()} rounds "
          f"stored in {clean.root}")
    return cache


def _quantiles(x: torch.Tensor, prefix: str) -> dict[str, float]:
    q = torch.quantile(x.double().cpu(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {f"{prefix}_mean": x.double().mean().item(), f"{prefix}_p10": q[0].item(),
            f"{prefix}_p50": q[1].item(), f"{prefix}_p90": q[2].item()}


class SAKDSelector(SampleSelector):
    """SAKD sample selection + per-sample distillation strength ``alpha`` (see module docstring).

    ``distiller``: has ``.student`` and ``.teacher`` (``extract(x) -> ModelOutput`` with logits and
    the pooled ``embedding``). ``loader``: the TRAINING split's BatchLoader (iterated un-augmented,
    unshuffled, with the interruption as its ``transform``; its RNG is not touched).
    ``epochs``: N_epoch of the beta schedule. ``temperature``: of ``l_i`` (the KD method's).
    ``batch_size``: of the difficulty pass (default: the loader's). ``pass_teacher``: who runs the
    pass (default: the distiller's teacher, on a CPU the onnxruntime one; the int8 twin of that
    halves the pass's teacher time). ``clean_cache``: a ``TeacherCache`` for the pass's teacher
    outputs on clean images (the first round's, where nothing is interrupted); ``cache_interrupted``:
    those on the interrupted images are cached beside it (``interrupted_cache``). The rate in the alpha
    update is ``cfg.alpha_rate`` (the paper's step 5). ``dpp_block``: speed knob of the DPP.
    ``seed``: of the interruptions (with the round's epoch and the sample's index, see ``sample_keys``).
    ``cfg.loss_scale`` is handed to the distiller (its ``alpha_scale``).
    """

    def __init__(self, cfg: SAKDConfig, distiller: nn.Module, loader: BatchLoader, epochs: int,
                 temperature: float = 4.0, seed: int = 0, *, batch_size: int | None = None,
                 num_classes: int | None = None, dpp_block: int = 512,
                 pass_teacher: nn.Module | None = None, clean_cache: TeacherCache | None = None,
                 cache_interrupted: bool = False):
        if getattr(distiller, "teacher", None) is None:
            raise UserError("distill.sampling: sakd needs a teacher, the distiller has none (method 'ce'?)")
        self.cfg = cfg
        self.distiller = distiller
        self.pass_teacher = pass_teacher if pass_teacher is not None else distiller.teacher
        self.clean_cache = clean_cache
        self.cache_interrupted = cache_interrupted
        self._interrupted: tuple[dict, TeacherCache] | None = None  # (its view, the interrupted images' cache)
        distiller.alpha_scale = cfg.loss_scale
        self.epochs = int(epochs)
        self.temperature = float(temperature)
        self.alpha_rate = cfg.alpha_rate
        self.dpp_block = dpp_block
        if batch_size is not None and batch_size != loader.batch_size:
            loader = loader.view(batch_size)
        h, w = loader.image_shape[-2:]
        if cfg.shuffle == "patch" and (h // cfg.patch_size) * (w // cfg.patch_size) < 2:
            largest = max(p for p in range(1, max(h, w) + 1) if (h // p) * (w // p) >= 2)
            raise UserError(f"sakd.patch_size: {cfg.patch_size} leaves a single patch on {h}x{w} images, so the "
                            f"shuffle would change nothing; allowed: 1..{largest}")
        self.loader = loader
        self.device = loader.device
        self.num_samples = len(loader)
        self.num_classes = int(num_classes) if num_classes is not None else int(loader.labels.max().item()) + 1
        self.k = subset_size(cfg.ratio, self.num_samples)
        self.seed = int(seed)
        n = self.num_samples
        self.omega = torch.zeros(n, dtype=torch.long, device=self.device)
        self.alpha = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.s_hat = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.features: torch.Tensor | None = None  # fused (un-normalised) teacher features [N, D]
        self.selection: torch.Tensor | None = None  # sorted dataset indices of the current subset
        self.rounds = 0
        self.last_round_epoch = -1
        self.history: list[dict] = []
        self.split: dict[str, float] = {}  # the last difficulty pass's time: teacher, student

    # -- SampleSelector ----------------------------------------------------------------------
    def select(self, epoch: int) -> torch.Tensor:
        if self.selection is None or (epoch % self.cfg.interval == 0 and epoch != self.last_round_epoch):
            self.run_round(epoch)
        return self.selection

    def weights(self, index: torch.Tensor) -> torch.Tensor | None:
        return self.alpha[index.to(self.alpha.device)].to(index.device)

    # -- one round -----------------------------------------------------------------------------
    def interruption(self, epoch: int, beta_raw: float, beta: float) -> tuple[str, Interruption]:
        """The regime of the round at ``epoch`` and its interruption ``(x, index) -> x``, for a
        NORMALISED batch ``x`` of the samples ``index``: a dropped pixel becomes a black one."""
        if beta_raw <= self.cfg.eta:
            black = -self.loader.mean / self.loader.std  # what the loader makes of a 0 pixel
            return "dropout", lambda x, idx: spatial_dropout(x, beta, sample_keys(self.seed, epoch, idx), black)
        patch = 1 if self.cfg.shuffle == "pixel" else self.cfg.patch_size
        return "shuffle", lambda x, idx: spatial_shuffle(x, patch, sample_keys(self.seed, epoch, idx))

    def interruption_view(self) -> dict:
        """What the interrupted image of a sample depends on besides its clean image and the round's
        epoch: the beta schedule (N_epoch, theta, eta), the shuffle and its patch, the masks' seed."""
        cfg = self.cfg
        return {"epochs": self.epochs, "theta": cfg.theta, "eta": cfg.eta, "shuffle": cfg.shuffle,
                "patch_size": cfg.patch_size if cfg.shuffle == "patch" else 1, "seed": self.seed}

    def pass_cache(self, clean: bool) -> TeacherCache | None:
        """The cache of this pass's teacher outputs: ``clean_cache`` for clean images; for interrupted
        ones, with ``cache_interrupted``, the one of ``interruption_view`` (made again when it changes:
        a restored state's seed); else None."""
        if clean:
            return self.clean_cache
        if self.clean_cache is None or not self.cache_interrupted:
            return None
        view = self.interruption_view()
        if self._interrupted is None or self._interrupted[0] != view:
            self._interrupted = (view, interrupted_cache(self.clean_cache, view))
        return self._interrupted[1]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def difficulty_pass(self, transform: Interruption, clean: bool = False,
                        epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample ``l_i`` [N] and teacher embeddings [N, D] on un-augmented inputs interrupted by
        ``transform`` (see ``interruption``; ``clean``: it changes nothing, so it is skipped), the
        teacher's outputs from ``pass_cache`` where it holds them (``epoch``: the round's)."""
        cache = self.pass_cache(clean)
        if cache is not None:
            cache.begin_epoch(0 if clean else epoch)
        student, teacher = self.distiller.student, self.pass_teacher
        was_training = student.training
        teacher_was_training = teacher.training
        student.eval()
        teacher.eval()
        losses, feats, indices = [], [], []
        rank, world = distributed.world()  # several processes: each scores its share, then all gather
        self.split = {"teacher_seconds": 0.0, "student_seconds": 0.0}
        try:
            with torch.inference_mode():
                for x, _, idx in self.loader.batches(shuffle=False, augment=False, shard=(rank, world)):
                    if not clean:
                        x = transform(x, idx).contiguous(memory_format=torch.channels_last)
                    t0 = time.perf_counter()
                    t_out = cache.lookup(idx) if cache is not None else None
                    if t_out is None:
                        t_out = teacher.extract(x)
                        if cache is not None:
                            cache.store(idx, t_out)
                    self._sync()
                    t1 = time.perf_counter()
                    s_out = student.extract(x)
                    self._sync()
                    self.split["teacher_seconds"] += t1 - t0
                    self.split["student_seconds"] += time.perf_counter() - t1
                    losses.append(kl_per_sample(s_out.logits.float(), t_out.logits.float(), self.temperature))
                    emb = t_out.embedding
                    if emb is None:  # no pooled embedding: pool the deepest feature map
                        emb = next(reversed(t_out.features.values())).float().mean(dim=(2, 3))
                    feats.append(emb.float().flatten(1))
                    indices.append(idx)
        finally:
            student.train(was_training)
            teacher.train(teacher_was_training)
        if cache is not None:
            cache.end_epoch()
        # clone outside inference mode: these tensors meet autograd later (alpha * CE)
        loss, feat = torch.cat(losses).clone(), torch.cat(feats).clone()
        if world > 1:
            sizes = distributed.batch_sizes(len(loss), loss.device)
            order = distributed.gather(torch.cat(indices).clone(), sizes).argsort()
            loss, feat = distributed.gather(loss, sizes)[order], distributed.gather(feat, sizes)[order]
        return loss, feat

    def run_round(self, epoch: int) -> None:
        self._sync()
        t0 = time.perf_counter()
        cfg = self.cfg
        beta_raw, beta = beta_schedule(epoch, self.epochs, cfg.theta, cfg.eta)
        regime, transform = self.interruption(epoch, beta_raw, beta)

        h, w = self.loader.image_shape[-2:]
        clean = regime == "dropout" and math.floor(beta * h * w) == 0
        loss, feat = self.difficulty_pass(transform, clean, epoch)
        loss, feat = loss.to(self.device), feat.to(self.device)
        inv = 1.0 / (self.omega.double() + cfg.eps)
        p = inv / inv.sum()
        s = p * loss.double()
        s_hat = normalise(s, cfg.normalise)
        if self.features is None:
            self.features = feat
        elif regime == "dropout":
            self.features = FEATURE_MOMENTUM * self.features + (1 - FEATURE_MOMENTUM) * feat
        first = self.rounds == 0
        rate = {"beta_raw": beta_raw, "beta": beta, "one": 1.0}[self.alpha_rate]
        self.alpha = s_hat.clone() if first else cfg.momentum * self.alpha + (1 - cfg.momentum) * rate * s_hat
        self.s_hat = s_hat
        self._sync()
        t1 = time.perf_counter()

        f = torch.nn.functional.normalize(self.features, dim=1)
        if distributed.is_main():  # one DPP, broadcast to the other processes
            order = greedy_dpp(f, s_hat, self.k, cfg.gamma, cfg.sigma, block=self.dpp_block)
        else:
            order = torch.empty(self.k, dtype=torch.long, device=f.device)
        distributed.broadcast(order)
        self._sync()
        t2 = time.perf_counter()

        selection = order.sort().values.to(self.device)
        self.omega[selection] += 1
        if self.selection is None:
            overlap = 0.0
        else:
            prev = torch.zeros(self.num_samples, dtype=torch.bool, device=self.device)
            prev[self.selection] = True
            overlap = prev[selection].float().mean().item()
        self.selection = selection
        self.rounds += 1
        self.last_round_epoch = epoch
        hist = torch.bincount(self.loader.labels[selection], minlength=self.num_classes).tolist()
        self._sync()
        record = {
            "round": self.rounds, "epoch": epoch, "n": epoch, "beta_raw": beta_raw, "beta": beta,
            "regime": regime, "regime_shuffle": int(regime == "shuffle"), "alpha_rate": self.alpha_rate,
            "temperature": self.temperature,
            "selected": len(selection), "overlap_prev": overlap,
            "kd_interrupted_mean": loss.double().mean().item(),
            **_quantiles(self.alpha, "alpha"), **_quantiles(s_hat, "s_hat"),
            "alpha_selected_mean": self.alpha[selection].double().mean().item(),
            "weight_scale_selected": self.weight_scale(selection),
            **{f"class_{c}": int(v) for c, v in enumerate(hist)},
            "difficulty_seconds": t1 - t0, **self.split, "dpp_seconds": t2 - t1,
            "round_seconds": time.perf_counter() - t0,
        }
        self.history.append(record)

    def weight_scale(self, selection: torch.Tensor) -> float:
        """The mean per-sample weight total of the paper's loss on ``selection``, relative to the base
        method's: 1 at alpha = 0.5, what ``loss_scale: constant`` divides out."""
        w_ce, w_kd = self.distiller.ce_weight, self.distiller.kd_weight
        paper = alpha_weights(self.alpha[selection].double(), w_ce, w_kd).mean().item()
        return paper / (w_ce + w_kd) if w_ce + w_kd > 0 else 1.0

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        def cpu(t):
            return None if t is None else t.detach().cpu().clone()
        return {
            "omega": cpu(self.omega), "alpha": cpu(self.alpha), "s_hat": cpu(self.s_hat),
            "features": cpu(self.features), "selection": cpu(self.selection), "rounds": self.rounds,
            "last_round_epoch": self.last_round_epoch, "history": [dict(h) for h in self.history],
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["omega"]) != self.num_samples:
            raise ValueError(f"SAKD state is for {len(state['omega'])} training samples, this run has "
                             f"{self.num_samples}")
        def dev(t):
            return None if t is None else t.to(self.device).clone()
        self.omega, self.alpha, self.s_hat = dev(state["omega"]), dev(state["alpha"]), dev(state["s_hat"])
        self.features, self.selection = dev(state["features"]), dev(state["selection"])
        self.rounds, self.last_round_epoch = int(state["rounds"]), int(state["last_round_epoch"])
        self.history = [dict(h) for h in state["history"]]
        self.seed = int(state["seed"])  # the interruptions of the run that saved it
