"""Spot-adaptive distillation (``distill.spots: adaptive``): Song et al., "Spot-adaptive Knowledge
Distillation", IEEE TIP 2022. Per sample and per step, a policy decides at which spots the
teacher's knowledge is distilled.

- Candidate spots: the feature method's own spots (``DistillLoss.spot_names``), ordered shallow
  -> deep, plus the output spot.
- Policy: a linear layer on the detached pooled embeddings of teacher and student, two logits per
  spot ("distil here", "not here"); a hard straight-through Gumbel-softmax (``routing.temperature``)
  picks one per sample and spot. As in the authors' configs, for a teacher and student of one
  family (ResNet-56 -> ResNet-20) its bias starts at +10 on "distil here", so training starts as the
  fixed-spot method; across families (ResNet-20 -> MobileNet) it starts at even odds
  (``routing.init``: auto, distil, even).
- The student's loss: each spot's term is computed on the samples routed to it only and rescaled
  by the routed fraction: a per-sample term counts on its own rows (so its batch mean is the mean
  over the routed samples times their fraction); a batch-level term (sp, cc, rkd, pkt) needs two
  routed samples and is multiplied by the fraction. The output spot gates a logit-KD term of
  weight ``routing.logit_weight`` (0 by default: the fixed method's own terms, nothing added).
- The policy and its adapters (``hint``: student -> teacher shape, ``anti_hint``: teacher ->
  student shape, per spot) train on the grafted forward, under their own SGD: from the first spot
  on, teacher and student stages run in turn (``Classifier.run``) and after each spot the two
  streams are mixed per sample by the action: the teacher stream gets ``(1-a)*hint(s) + a*t``, the
  student stream ``(1-a)*s + a*anti_hint(t)``, and the output mixes the logits. Its loss is the
  graft's CE, multiplied by ``routing.classify_weight`` when worse than the student's CE and divided
  by it when better, plus ``max(0, B/2 - sum(a_output))`` (at least half the batch to the teacher).
  The student runs in eval mode there and gets no gradient from it (``autograd.grad`` on the
  router's parameters only).
- Nothing of this is exported: the student is unchanged.

The first stage of both streams is the training forward's own output at the first spot (the
authors recompute it; no trainable weight reaches it, so it is the same up to the student's BN mode).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kdcompress.methods._features import EMBEDDING, feature, pool_to
from kdcompress.methods.kd import kl_per_sample
from kdcompress.types import ModelOutput, UserError

if TYPE_CHECKING:
    from kdcompress.config import RoutingConfig
    from kdcompress.data.loader import BatchLoader
    from kdcompress.methods.base import DistillLoss

LOGITS = "logits"
START_BIAS = 10.0  # routing.init distil: the policy starts by distilling everywhere


def family(arch: str | None) -> str | None:
    """``resnet`` for resnet20 and resnet56, ``tv:resnet`` for tv:resnet18; None when unknown."""
    match = re.match(r"(tv:)?[a-z]+", arch or "")
    return match.group(0) if match else None


def same_family(teacher: nn.Module, student: nn.Module) -> bool:
    """The authors' "homogeneous" pair: both models' registry names share their family."""
    names = [getattr(getattr(m, "model", m), "arch", None) for m in (teacher, student)]  # OrtTeacher keeps .model
    return family(names[0]) is not None and family(names[0]) == family(names[1])


class _Resize(nn.Module):
    """A map to ``size``: average-pooled when larger, nearest-upsampled when smaller."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < self.size[0] or x.shape[-1] < self.size[1]:
            return F.interpolate(x, size=self.size, mode="nearest")
        return pool_to(x, self.size)


def adapter(src: torch.Tensor, dst: torch.Tensor) -> nn.Module:
    """A small trainable map from tensors shaped like ``src`` to ``dst``'s shape (batch aside)."""
    if src.dim() == 2:
        return nn.Linear(src.shape[1], dst.shape[1]).to(dst.device, dst.dtype)
    return nn.Sequential(_Resize(dst.shape[-2:]), nn.Conv2d(src.shape[1], dst.shape[1], 1, bias=False),
                         nn.BatchNorm2d(dst.shape[1]), nn.ReLU()).to(dst.device, dst.dtype)


def rows(out: ModelOutput, index: torch.Tensor) -> ModelOutput:
    """The samples ``index`` of a ``ModelOutput``."""
    return ModelOutput(logits=out.logits[index], features={k: v[index] for k, v in out.features.items()},
                       embedding=None if out.embedding is None else out.embedding[index])


def build_router(spots: str, loss: DistillLoss | None, cfg: RoutingConfig, world: int) -> SpotRouter | None:
    """The router of ``distill.spots`` (None: fixed spots); one line for what cannot be routed."""
    if spots == "fixed":
        return None
    router = SpotRouter(loss, cfg)
    if world > 1:
        raise UserError(f"base.nproc: {world} processes do not run distill.spots 'adaptive' yet (its policy trains "
                        "outside DDP); allowed: base.nproc: 1")
    return router


def routing_history(history: list[dict]) -> list[dict]:
    """The routing columns of fit()'s per-epoch history (a CSV for DVC plots)."""
    return [{k: v for k, v in h.items() if k in ("epoch", "val_acc") or k.startswith(("routed_", "graft_"))}
            for h in history]


class SpotRouter(nn.Module):
    """The policy, the adapters and their optimizer; ``setup()`` builds them from a probe batch."""

    def __init__(self, loss: DistillLoss | None, cfg: RoutingConfig):
        super().__init__()
        self.spots = loss.spot_names() if loss is not None else ()
        if not self.spots:
            raise UserError(f"distill.spots: 'adaptive' routes the spots of a feature method, and method "
                            f"{getattr(loss, 'method', 'ce')!r} has none; allowed: fixed (or a feature method: "
                            "fitnet, at, sp, cc, vid, rkd, pkt, ft, fsp, nst, crd)")
        self.cfg = cfg
        self.policy: nn.Linear | None = None
        self.hints, self.anti_hints = nn.ModuleDict(), nn.ModuleDict()
        self.optimizer: torch.optim.SGD | None = None
        self.init: str | None = None  # the policy's resolved start (routing.init), set by setup()
        self.routed: torch.Tensor | None = None  # per spot, samples routed to the teacher this epoch
        self.seen = 0

    def teacher_parts(self) -> frozenset[str]:
        """What the router reads of the teacher's output besides the method's own spots."""
        return frozenset({EMBEDDING} | ({LOGITS} if self.cfg.logit_weight > 0 else set()))

    @property
    def names(self) -> list[str]:
        return [*self.spots, "output"]

    def setup(self, student: nn.Module, teacher: nn.Module, s: ModelOutput, t: ModelOutput) -> None:
        for name, model in (("student", student), ("teacher", teacher)):
            if not hasattr(model, "run"):
                raise UserError(f"distill.spots: 'adaptive' runs the {name} stage by stage, which this {name} "
                                "cannot; allowed: fixed")
            missing = [n for n in self.spots if n not in model.boundaries()]
            if missing:
                raise UserError(f"distill.spots: 'adaptive' grafts at {', '.join(self.spots)}, and the {name} has no "
                                f"{missing[0]!r}; allowed spots: {', '.join(model.boundaries()[:-1])}")
        order = student.boundaries()
        self.spots = tuple(sorted(self.spots, key=order.index))
        if self.policy is not None:
            return
        self.policy = nn.Linear(t.embedding.shape[1] + s.embedding.shape[1], 2 * len(self.names))
        self.policy.to(s.embedding.device, s.embedding.dtype)
        self.init = self.cfg.init if self.cfg.init != "auto" else "distil" if same_family(teacher, student) else "even"
        if self.init == "distil":
            with torch.no_grad():
                self.policy.bias[0::2] += START_BIAS
        print(f"spot routing at {', '.join(self.names)}; the policy starts at {self.init!r} odds")
        for name in self.spots:
            s_f, t_f = feature(s, name, "routing"), feature(t, name, "routing")
            self.hints[name], self.anti_hints[name] = adapter(s_f, t_f), adapter(t_f, s_f)
        self.optimizer = torch.optim.SGD([{"params": list(self.parameters()), "lr_scale": self.cfg.lr_scale}],
                                         lr=0.0, momentum=0.9, weight_decay=self.cfg.weight_decay)
        self.begin_epoch()

    def get_extra_state(self) -> dict:
        return {"optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def actions(self, s: ModelOutput, t: ModelOutput, sample: bool = True) -> torch.Tensor:
        """``[B, spots + 1]``: 1 where the sample is distilled at that spot (the last: the output).
        Sampled with straight-through gradients to the policy; the policy's argmax with ``sample=False``."""
        logits = self.policy(torch.cat([t.embedding.detach(), s.embedding.detach()], 1)).view(len(s.logits), -1, 2)
        if not sample:
            return (logits[..., 0] >= logits[..., 1]).to(logits.dtype)
        return F.gumbel_softmax(logits.float(), tau=self.cfg.temperature, hard=True)[..., 0]

    def distil(self, loss: DistillLoss, student: nn.Module, teacher: nn.Module, s: ModelOutput, t: ModelOutput,
               y: torch.Tensor) -> torch.Tensor:
        """The per-sample distillation term of this batch, gated by the policy's actions; in training
        also one step of the policy and adapters on the grafted forward."""
        a = self.actions(s, t)
        if self.training:
            self.routed += a.detach().sum(0)
            self.seen += len(y)
            self._policy_step(student, teacher, s, t, y, a)
        return self.gated(loss, s, t, y, a.detach() > 0.5)

    def gated(self, loss: DistillLoss, s: ModelOutput, t: ModelOutput, y: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
        """``mask [B, spots + 1]`` (bool): each spot's term on its routed samples, rescaled by their fraction."""
        n = len(y)
        kd = s.logits.new_zeros(n, dtype=torch.float32)
        for k, name in enumerate(self.spots):
            index = mask[:, k].nonzero().squeeze(1)
            if len(index) < (2 if loss.batch_level else 1):  # a relation needs two samples
                continue
            s_k, t_k, y_k = (s, t, y) if len(index) == n else (rows(s, index), rows(t, index), y[index])
            term = loss.spot_loss(name, s_k, t_k, y_k).float()
            kd = kd + term[0] * (len(index) / n) if loss.batch_level else kd.index_add(0, index, term)
        if self.cfg.logit_weight > 0:
            kl = kl_per_sample(s.logits, t.logits, self.cfg.logit_temperature)
            kd = kd + self.cfg.logit_weight * mask[:, -1] * kl
        return kd

    def graft(self, student: nn.Module, teacher: nn.Module, s: ModelOutput, t: ModelOutput,
              a: torch.Tensor) -> torch.Tensor:
        """Logits of the grafted forward under actions ``a``: gradients reach the actions and adapters."""
        s_cur, t_cur = feature(s, self.spots[0], "routing").detach(), feature(t, self.spots[0], "routing").detach()
        for k, name in enumerate(self.spots):
            gate = a[:, k].view(-1, *[1] * (t_cur.dim() - 1)).to(t_cur.dtype)
            to_t = (1 - gate) * self.hints[name](s_cur) + gate * t_cur
            to_s = (1 - gate) * s_cur + gate * self.anti_hints[name](t_cur)
            stop = self.spots[k + 1] if k + 1 < len(self.spots) else LOGITS
            t_cur, s_cur = teacher.run(to_t, name, stop), student.run(to_s, name, stop)
        out = a[:, -1:].to(t_cur.dtype)
        return (1 - out) * s_cur + out * t_cur

    def _policy_step(self, student, teacher, s, t, y, a) -> None:
        was_training = student.training
        student.eval()  # the graft must not move the student's BN statistics
        try:
            ce_graft = F.cross_entropy(self.graft(student, teacher, s, t, a).float(), y)
        finally:
            student.train(was_training)
        ce_student = F.cross_entropy(s.logits.detach().float(), y)
        weight = self.cfg.classify_weight
        ce_graft = ce_graft * torch.where(ce_graft.detach() > ce_student, weight, 1 / weight)
        objective = ce_graft + F.relu(len(y) / 2 - a[:, -1].sum())
        params = [p for p in self.parameters() if p.requires_grad]
        for p, g in zip(params, torch.autograd.grad(objective, params, allow_unused=True)):
            p.grad = g
        self.optimizer.step()

    def begin_epoch(self) -> None:
        self.routed = torch.zeros(len(self.names), device=self.policy.weight.device)
        self.seen = 0

    @torch.no_grad()
    def epoch_metrics(self, student: nn.Module, teacher: nn.Module, val: BatchLoader) -> dict[str, float]:
        """Fraction routed to the teacher per spot this epoch (the authors' ``graft_cnt``) and the
        graft's top-1 on ``val`` with the policy's argmax actions."""
        fractions = (self.routed / max(self.seen, 1)).tolist()
        metrics = {f"routed_{name}": f for name, f in zip(self.names, fractions)}
        was_training = student.training
        student.eval()
        correct = total = 0
        for x, y, _ in val.batches():
            s, t = student.extract(x), teacher.extract(x)
            correct += int((self.graft(student, teacher, s, t, self.actions(s, t, sample=False)).argmax(1) == y).sum())
            total += len(y)
        student.train(was_training)
        return {**metrics, "graft_val_acc": correct / max(total, 1)}
