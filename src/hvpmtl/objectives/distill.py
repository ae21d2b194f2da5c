"""Momentum distillation (MD) for label denoising: EMA teacher and symmetric KL, Eqs. (5)-(6).

``S(g, Q0)`` is the vector of cosine similarities between the decoder's image embedding ``g``
and the ``C`` label embeddings ``Q0``; student and teacher vectors are softmax-normalised and
compared by a symmetric KL, the teacher side without gradient. The teacher (EMA of backbone and
MLC decoder, ALBEF style) is updated after every optimiser step: ``t <- m t + (1 - m) s``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hvpmtl.objectives.base import Objective, register_objective


@dataclass
class DistillConfig:
    """Momentum distillation; weight and momentum are the paper's."""

    weight: float = 10.0  # alpha_4
    momentum: float = 0.995  # m, constant as in ALBEF
    # softmax temperature on the cosine similarities; the paper gives none. Measured: at 1.0 the
    # softmax over cosines in [-1, 1] is nearly uniform and MD is inert (L_mom ~ 5e-5, 1-2 % of the
    # backbone gradient); at 0.1 it acts (18-86 %) and improved every frozen-feature score
    temperature: float = 0.1
    embedding: str = "query_mean"  # g: mean of the decoder's label features | "memory_mean": of its input
    teacher_queries: str = "student"  # Q0 of S(g', Q0): "student" (detached, as Eq. (6) writes) | "teacher"

    def validate(self, prefix: str = "") -> None:
        if self.embedding not in ("query_mean", "memory_mean"):
            raise ValueError(f"{prefix}.embedding: expected 'query_mean' or 'memory_mean', got '{self.embedding}'")
        if self.teacher_queries not in ("student", "teacher"):
            raise ValueError(f"{prefix}.teacher_queries: expected 'student' or 'teacher', got '{self.teacher_queries}'")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"{prefix}.momentum={self.momentum} must be in [0, 1]")


def label_similarity(g: torch.Tensor, label_embed: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Eq. (5): log-softmax over classes of ``cos(g, Q0_c) / T``. ``g: B x d``, ``Q0: C x d`` -> ``B x C``."""
    cos = F.normalize(g.float(), dim=-1) @ F.normalize(label_embed.float(), dim=-1).t()
    return F.log_softmax(cos / temperature, dim=-1)


def symmetric_kl(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor) -> torch.Tensor:
    """Eq. (6): ``(KL(P_s || P_t) + KL(P_t || P_s)) / 2`` averaged over the batch; teacher detached."""
    log_t = log_p_teacher.detach()
    kl_st = (log_p_student.exp() * (log_p_student - log_t)).sum(-1)
    kl_ts = (log_t.exp() * (log_t - log_p_student)).sum(-1)
    return 0.5 * (kl_st + kl_ts).mean()


@torch.no_grad()
def ema_update(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """``t <- m t + (1 - m) s`` for every pair, in one fused foreach op."""
    torch._foreach_lerp_(teacher, student, 1.0 - momentum)


def image_embedding(label_features: torch.Tensor, memory: torch.Tensor, kind: str) -> torch.Tensor:
    """The decoder's image embedding ``g`` (``B x d``): the mean of its ``C`` label features, or
    of the projected feature map it reads."""
    return (label_features if kind == "query_mean" else memory).mean(dim=1)


class EMATeacher(nn.ModuleDict):
    """``{"backbone", "mlc"}``: frozen copies of the student's, moved only by :func:`ema_update`;
    always in eval mode (no dropout, no drop path)."""

    def train(self, mode: bool = True) -> EMATeacher:
        return super().train(False)


@register_objective("distill", DistillConfig)
class DistillObjective(Objective):
    """Eqs. (5)-(6) between the student's MLC decoder (its output on this step, left by MLC in
    ``step.shared["mlc"]``) and the EMA teacher's, both on the pixels MLC reads. Requires MLC's
    decoder, which is built even when ``tasks.mlc.weight`` is 0."""

    modules = ("teacher",)
    requires = ("mlc",)
    reads_labels = True  # its teacher targets are MLC outputs, trained on tags

    def build(self, model: nn.Module, num_classes: int | None) -> dict[str, nn.Module]:
        teacher = EMATeacher({"backbone": copy.deepcopy(model.backbone), "mlc": copy.deepcopy(model.mlc)})
        teacher.requires_grad_(False)
        return {"teacher": teacher.eval()}

    def forward(self, model: nn.Module, step, with_loss: bool) -> dict[str, torch.Tensor]:
        cfg, teacher = self.cfg, model.teacher
        _, h, memory = step.shared["mlc"]
        images, mask = step.pixels("mlc")
        with torch.no_grad():
            t_fmap, _ = teacher["backbone"](images, mask)
            _, t_h, t_memory = teacher["mlc"](t_fmap)
            g_t = image_embedding(t_h, t_memory, cfg.embedding)
        g = image_embedding(h, memory, cfg.embedding)
        q0 = model.mlc.label_embed.weight
        q0_t = q0.detach() if cfg.teacher_queries == "student" else teacher["mlc"].label_embed.weight
        log_p, log_p_t = label_similarity(g, q0, cfg.temperature), label_similarity(g_t, q0_t, cfg.temperature)
        return {"loss": symmetric_kl(log_p, log_p_t)}

    def after_step(self, model: nn.Module) -> None:
        """EMA step ``t <- m t + (1 - m) s`` (parameters only, ALBEF)."""
        teacher = [*model.teacher["backbone"].parameters(), *model.teacher["mlc"].parameters()]
        student = [*model.backbone.parameters(), *model.mlc.parameters()]
        ema_update(teacher, student, self.cfg.momentum)
