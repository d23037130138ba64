"""Data-free distillation with a generator: Chen et al., "DAFL: Data-Free Learning of Student
Networks", ICCV 2019, with the batch-norm statistics prior of Yin et al., "Dreaming to Distill:
Data-free Knowledge Transfer via DeepInversion", CVPR 2020, and an optional adversarial term in
the spirit of Fang et al., "Data-Free Adversarial Distillation" (DFAD), arXiv 1912.11006, 2019.

The student never sees a real training image: ``prepare_batch`` throws the real batch away
(only its shape is used) and returns a synthetic batch from a generator the loss owns, labelled by
the frozen teacher's argmax. Per training batch the generator takes exactly one Adam step on

``oh_weight * CE(t(G(z)), argmax t(G(z)))``        (DAFL one-hot: confident teacher predictions)
``+ ie_weight * sum_c pbar_c log pbar_c``           (DAFL information entropy: pbar = batch-mean
                                                     teacher softmax; balances the classes)
``+ bn_weight * sum_l ||mu_l - mu^BN_l|| + ||var_l - var^BN_l||`` (DeepInversion: batch statistics
                                                     at every teacher BatchNorm input match the
                                                     running statistics stored in the teacher)
``- adv_weight * mean KL(p_t || p_s)``                (DFAD: seek samples where the student is
                                                     still wrong; student run in eval mode)

and the pre-step images (detached) are the student's batch. The teacher's output on them is kept
and served by ``teacher_forward`` (no second teacher pass). The student's per-sample loss is KD's
``T^2 KL`` at ``temperature``; the Distiller's CE uses the teacher's labels. The generator is
DAFL's (linear -> 2 x [upsample, conv3x3, BN, LeakyReLU] -> conv3x3 -> tanh -> BN without affine,
so its output is roughly standardised like the normalised real data), narrowed to ``gen_width``
to stay cheap on a CPU. Weights: oh 1 and ie 5 from DAFL; bn 1 for the DeepInversion term (summed
over layers); adv 0.5 is our choice (0 disables it and saves a student forward/backward).

The generator and its optimizer live in the loss, so they are not exported; the generator's
weights and its Adam moments are in the loss state_dict, so a resumed run continues exactly. The
generator's parameters are in ``loss.parameters()`` but never carry a gradient when the main
optimizer steps (it is stepped here and its grads cleared), so that optimizer leaves them alone.
Validation still uses the real validation split. Use with ``sampling: full``: SAKD's per-sample
difficulty of real indices means nothing for synthetic batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdcompress.methods._params import check_param, non_negative, positive
from kdcompress.methods.base import DistillLoss
from kdcompress.methods.kd import kl_per_sample
from kdcompress.methods.schedule import TemperatureScheduled
from kdcompress.types import ModelOutput


class Generator(nn.Module):
    def __init__(self, z_dim: int, width: int, channels: int, height: int, wide: int):
        super().__init__()
        self.size = (height, wide)
        self.init = (math.ceil(height / 4), math.ceil(wide / 4))
        self.fc = nn.Linear(z_dim, 2 * width * self.init[0] * self.init[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, 2 * width, 3, 1, 1), nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, 1, 1), nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, 1, 1), nn.Tanh(), nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(len(z), -1, *self.init)
        x = self.body(x)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return x


class DataFree(TemperatureScheduled, DistillLoss):
    method = "data_free"
    needs_teacher_grad = True  # the generator step back-propagates through the teacher and hooks its BN
    selects_samples = False  # synthetic batches: SAKD's per-index difficulty means nothing here

    def __init__(self, temperature: float = 4.0, z_dim: int = 100, gen_width: int = 32, gen_lr: float = 1e-3,
                 oh_weight: float = 1.0, ie_weight: float = 5.0, bn_weight: float = 1.0, adv_weight: float = 0.5,
                 t_schedule: str = "constant", t_end: float = 1.0):
        super().__init__()
        self.init_temperature(temperature, t_schedule, t_end)
        self.z_dim = check_param(self.method, "z_dim", z_dim, lo=1)
        self.gen_width = check_param(self.method, "gen_width", gen_width, lo=1)
        self.gen_lr = positive(self.method, "gen_lr", gen_lr)
        self.oh_weight = non_negative(self.method, "oh_weight", oh_weight)
        self.ie_weight = non_negative(self.method, "ie_weight", ie_weight)
        self.bn_weight = non_negative(self.method, "bn_weight", bn_weight)
        self.adv_weight = non_negative(self.method, "adv_weight", adv_weight)
        self.generator: Generator | None = None
        self._gen_opt: torch.optim.Optimizer | None = None
        # Plain containers, so the frozen teacher and the student are not registered as
        # sub-modules of the loss (not in its parameters or state_dict).
        self._models: dict[str, nn.Module] = {}
        self._bn_terms: list[torch.Tensor] | None = None
        self._input_shape: tuple[int, ...] | None = None
        self._cache: tuple[torch.Tensor, ModelOutput] | None = None

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None:
            raise ValueError("data_free distils a teacher: the Distiller needs one")
        self._models = {"student": student, "teacher": teacher}
        for module in teacher.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.register_forward_hook(self._bn_hook)

    def _bn_hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self._bn_terms is None or module.running_mean is None:
            return  # only while the generator step asks for it
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self._bn_terms.append(torch.linalg.vector_norm(mean - module.running_mean)
                              + torch.linalg.vector_norm(var - module.running_var))

    def teacher_forward(self, teacher: nn.Module | None, x: torch.Tensor) -> ModelOutput:
        if self._cache is not None and self._cache[0] is x:
            out, self._cache = self._cache[1], None
            return out
        self._input_shape = tuple(x.shape[1:])  # the probe batch in Distiller.setup tells the image shape
        return super().teacher_forward(teacher, x)

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput) -> None:
        if self.generator is None:
            if self._input_shape is None or len(self._input_shape) != 3:
                raise RuntimeError("data_free: setup() needs the image shape from a teacher_forward() probe first")
            c, h, w = self._input_shape
            like = teacher_out.logits
            self.generator = Generator(self.z_dim, self.gen_width, c, h, w).to(device=like.device, dtype=like.dtype)
        self._gen_opt = torch.optim.Adam(self.generator.parameters(), lr=self.gen_lr, betas=(0.5, 0.999))

    def get_extra_state(self) -> dict:
        return {"generator_optimizer": None if self._gen_opt is None else self._gen_opt.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        if state["generator_optimizer"] is not None:
            self._gen_opt.load_state_dict(state["generator_optimizer"])

    def _generator_step(self, batch: int, device: torch.device) -> tuple[torch.Tensor, ModelOutput]:
        teacher, student = self._models["teacher"], self._models["student"]
        self.generator.train()
        z = torch.randn(batch, self.z_dim, device=device, dtype=self.generator.fc.weight.dtype)
        fake = self.generator(z)
        self._bn_terms = []
        try:
            t_out = teacher.extract(fake)
            bn_terms = self._bn_terms
        finally:
            self._bn_terms = None
        logits = t_out.logits
        loss = self.oh_weight * F.cross_entropy(logits, logits.argmax(1))
        if self.ie_weight:
            p_mean = F.softmax(logits, dim=1).mean(0)
            loss = loss + self.ie_weight * (p_mean * p_mean.clamp_min(1e-12).log()).sum()
        if self.bn_weight and bn_terms:
            loss = loss + self.bn_weight * torch.stack(bn_terms).sum()
        if self.adv_weight:
            was_training = student.training
            student.eval()
            try:
                s_logits = student(fake)
            finally:
                student.train(was_training)
            loss = loss - self.adv_weight * kl_per_sample(s_logits, logits, 1.0).mean()
        params = [p for p in self.generator.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params)  # only the generator: no grads left on student/teacher
        for p, g in zip(params, grads):
            p.grad = g
        self._gen_opt.step()
        for p in params:
            p.grad = None
        detached = ModelOutput(logits.detach(), {k: v.detach() for k, v in t_out.features.items()},
                               None if t_out.embedding is None else t_out.embedding.detach())
        return fake.detach(), detached

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fake, t_out = self._generator_step(len(x), x.device)
        self._cache = (fake, t_out)
        return fake, t_out.logits.argmax(1)

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return kl_per_sample(student_out.logits, teacher_out.logits, self.temperature)
