"""HVPMTL: one backbone, four objectives in one step (Fig. 2 and Eq. (6) of the paper).

``L = a1 (L+ + L-) + a2 L_cl + a3 L_mim + a4 L_mom``. A task whose weight is 0 is not built:
its head, its loss and (for MD) the teacher do not exist, which is how the ablations run.

The student runs each needed (view, masked?) pair through the backbone once, all pairs in one
batched call. With the default routing these are two passes per image: the masked view serves
MIM and its SwAV prediction, the clean view serves MLC, its SwAV prediction and MD; the teacher
reads the same clean view.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from hvpmtl.backbones import BackboneConfig, build_backbone
from hvpmtl.objectives.distill import ema_update, image_embedding, label_similarity, symmetric_kl
from hvpmtl.objectives.mim import SimMIMDecoder, masked_l1_loss
from hvpmtl.objectives.mlc import Query2LabelDecoder, weighted_asymmetric_loss
from hvpmtl.objectives.swav import SwAVHead, swav_loss

TASKS = ("mlc", "swav", "mim", "distill")


class HVPMTL(nn.Module):
    """Student (backbone + heads) and EMA teacher (backbone + MLC decoder).

    Args:
        backbone: timm backbone config.
        tasks: a ``TasksConfig`` (the four objectives and the view routing).
        num_classes: label vocabulary size ``C``; needed when MLC or MD is on.

    ``forward(batch)`` takes ``{"views": [v0, v1] (each B x 3 x H x W, normalised),
    "mask": B x h x w bool (SimMIM units), "labels": B x C multi-hot}`` and returns
    ``{"loss": total, "loss_<task>": unweighted part, ...}``. Call :meth:`after_step` after
    each optimiser step.
    """

    def __init__(self, backbone: BackboneConfig, tasks: Any, num_classes: int | None = None):
        super().__init__()
        self.tasks_cfg = tasks
        self.weights = {t: float(getattr(tasks, t).weight) for t in TASKS if getattr(tasks, t).weight > 0}
        self.routing = tasks.routing
        if self.routing.masked_view not in (0, 1):
            raise ValueError(f"tasks.routing.masked_view={self.routing.masked_view} must be 0 or 1")
        if not self.weights:
            raise ValueError("every task weight is 0: enable at least one of tasks.{mlc,swav,mim,distill}")
        self.backbone = build_backbone(backbone)
        d0 = self.backbone.num_features
        self.mlc = self.swav = self.mim = self.teacher = None
        if "mlc" in self.weights or "distill" in self.weights:
            if not num_classes:
                raise ValueError("num_classes (data.num_classes) must be set when tasks.mlc or tasks.distill is on")
            self.mlc = Query2LabelDecoder(d0, num_classes, tasks.mlc)
        if "swav" in self.weights:
            self.swav = SwAVHead(d0, tasks.swav)
        if "mim" in self.weights:
            self.mim = SimMIMDecoder(d0, self.backbone.reduction)
        if "distill" in self.weights:
            self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(self.backbone), "mlc": copy.deepcopy(self.mlc)})
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        self.iteration = 0  # optimiser steps taken; persisted through get/set_extra_state

    # ------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> HVPMTL:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never uses dropout / drop path
        return self

    def get_extra_state(self) -> dict:
        return {"iteration": self.iteration}

    def set_extra_state(self, state: dict) -> None:
        self.iteration = int(state["iteration"])

    @property
    def summed_losses(self) -> set[str]:
        """Loss keys summed (not averaged) over images: under data parallelism and gradient
        accumulation the engine rescales these so the gradient is the whole batch's."""
        on = "mlc" in self.weights and self.tasks_cfg.mlc.reduction == "global_sum"
        return {"loss_mlc"} if on else set()

    @property
    def has_unused_parameters(self) -> bool:
        """True when some trainable parameter gets no gradient (MLC's read-out when only MD uses
        the decoder); DDP then needs ``find_unused_parameters``."""
        return self.mlc is not None and "mlc" not in self.weights

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA step ``t <- m t + (1 - m) s`` (parameters only, ALBEF)."""
        if self.teacher is not None:
            teacher = [*self.teacher["backbone"].parameters(), *self.teacher["mlc"].parameters()]
            student = [*self.backbone.parameters(), *self.mlc.parameters()]
            ema_update(teacher, student, self.tasks_cfg.distill.momentum)

    @torch.no_grad()
    def after_step(self) -> None:
        """The one call after each optimiser step: EMA teacher update, SwAV prototypes back onto
        the unit sphere (SwAV normalises them before every step), iteration count + 1."""
        self.update_teacher()
        if self.swav is not None:
            self.swav.normalize_prototypes()
        self.iteration += 1

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Trainable parameters split into decayed (>= 2-D weights) and not decayed (norms,
        biases, tokens, position and label embeddings)."""
        skip = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        if self.mlc is not None:
            skip |= {f"mlc.{n}" for n in self.mlc.no_weight_decay()}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or name in skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ------------------------------------------------------------------------------------------
    def _inputs(self) -> dict[str, tuple[int, bool]]:
        """Which (view index, masked?) each consumer reads, from the routing config."""
        r, has_mim = self.routing, "mim" in self.weights
        m, c = r.masked_view, 1 - r.masked_view
        need = {}
        if has_mim:
            need["mim"] = (m, True)
        if self.mlc is not None:
            need["mlc"] = (m, has_mim) if r.mlc_masked else (c, False)
        if self.swav is not None:
            need["swav_a"] = (m, has_mim and r.swav_masked)
            need["swav_b"] = (c, False)
        return need

    def _encode(self, views, mask, keys: list[tuple[int, bool]]) -> dict:
        """One batched backbone call over the distinct (view, masked) pairs."""
        keys = sorted(set(keys))
        x = torch.cat([views[v] for v, _ in keys])
        full_mask = None
        if any(masked for _, masked in keys):
            if mask is None:
                raise ValueError("batch['mask'] is required when tasks.mim is on")
            none = torch.zeros_like(mask)
            full_mask = torch.cat([mask if masked else none for _, masked in keys])
        fmap, pooled = self.backbone(x, full_mask)
        B = views[0].shape[0]
        return {k: (fmap[i * B : (i + 1) * B], pooled[i * B : (i + 1) * B]) for i, k in enumerate(keys)}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        views, mask, labels = batch["views"], batch.get("mask"), batch.get("labels")
        need = self._inputs()
        feats = self._encode(views, mask, list(need.values()))
        losses: dict[str, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}

        if self.mlc is not None:
            fmap, _ = feats[need["mlc"]]
            logits, h, memory = self.mlc(fmap)
            out["logits"] = logits.detach()
            if "mlc" in self.weights:
                if labels is None:
                    raise ValueError("batch['labels'] (B x C multi-hot) is required when tasks.mlc is on")
                c = self.tasks_cfg.mlc
                gp, gn = c.gammas
                reduction = {"global_sum": "sum"}.get(c.reduction, c.reduction)
                loss = weighted_asymmetric_loss(logits, labels, c.eta, gp, gn, c.clip, reduction, c.detach_focusing)
                losses["mlc"] = loss * c.sum_images if c.reduction == "per_image" else loss
            if "distill" in self.weights:
                losses["distill"] = self._distill(views, mask, h, memory)

        if self.swav is not None:
            (_, pa), (_, pb) = feats[need["swav_a"]], feats[need["swav_b"]]
            frozen = self.iteration < self.tasks_cfg.swav.freeze_prototypes_iters
            scores, _ = self.swav(torch.cat([pa, pb]), freeze_prototypes=frozen)
            sa, sb = scores.chunk(2)
            losses["swav"], out["swav_collapse"] = swav_loss(sa, sb, self.tasks_cfg.swav)

        if self.mim is not None:
            fmap, _ = feats[need["mim"]]
            recon = self.mim(fmap)
            losses["mim"] = masked_l1_loss(recon, views[self.routing.masked_view], mask)

        out["loss"] = sum(self.weights[t] * v for t, v in losses.items())
        out.update({f"loss_{t}": v for t, v in losses.items()})
        return out

    def _distill(self, views, mask, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        cfg = self.tasks_cfg.distill
        view, masked = self._inputs()["mlc"]
        with torch.no_grad():
            t_fmap, _ = self.teacher["backbone"](views[view], mask if masked else None)
            _, t_h, t_memory = self.teacher["mlc"](t_fmap)
            g_t = image_embedding(t_h, t_memory, cfg.embedding)
        g = image_embedding(h, memory, cfg.embedding)
        q0 = self.mlc.label_embed.weight
        q0_t = q0.detach() if cfg.teacher_queries == "student" else self.teacher["mlc"].label_embed.weight
        return symmetric_kl(label_similarity(g, q0, cfg.temperature), label_similarity(g_t, q0_t, cfg.temperature))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """SimMIM reconstruction of ``images`` under ``mask`` (for pictures), ``B x 3 x H x W``."""
        if self.mim is None:
            raise RuntimeError("tasks.mim is off: there is no MIM decoder")
        fmap, _ = self.backbone(images, mask)
        return self.mim(fmap)
