"""HVPMTL: one backbone, four objectives in one step (Fig. 2 and Eq. (7) of the paper).

``L = a1 (L+ + L-) + a2 L_cl + a3 L_mim + a4 L_mom``. The objectives are plug-ins
(:mod:`hvpmtl.objectives.base`): the model builds every registered objective whose weight is > 0
(plus those it requires: MD needs MLC's decoder), so a task whose weight is 0 has no head, no loss
and (for MD) no teacher, which is how the ablations run.

The student runs each needed (view, masked?) pair through the backbone once, all pairs in one
batched call. With the default routing these are two passes per image: the masked view serves
MIM and its SwAV prediction, the clean view serves MLC, its SwAV prediction and MD; the teacher
reads the same clean view.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hvpmtl.backbones import BackboneConfig, build_backbone
from hvpmtl.objectives import Objective, Step, ViewPlan, objective_types

TASKS = ("mlc", "swav", "mim", "distill")  # the paper's four, built in; HVPMTL composes every registered one


class HVPMTL(nn.Module):
    """Student (backbone + heads) and EMA teacher (backbone + MLC decoder).

    Args:
        backbone: timm backbone config.
        tasks: a ``TasksConfig`` (one block per registered objective, and the view routing).
        num_classes: label vocabulary size ``C``; needed when MLC or MD is on.

    ``forward(batch)`` takes ``{"views": [v0, v1] (each B x 3 x H x W, normalised),
    "mask": B x h x w bool (SimMIM units), "labels": B x C multi-hot}`` (optionally ``"known"``:
    bool ``B x 1`` or ``B x C``, the tags MLC may read, and ``"known_counts"``, see
    :func:`hvpmtl.objectives.mlc.weighted_asymmetric_loss`) and returns
    ``{"loss": total, "loss_<task>": unweighted part, ...}``. Call :meth:`after_step` after
    each optimiser step. The heads are attributes named by their objectives (``mlc``, ``swav``,
    ``mim``, ``teacher``), None while off.
    """

    def __init__(self, backbone: BackboneConfig, tasks: Any, num_classes: int | None = None):
        super().__init__()
        self.tasks_cfg = tasks
        self.routing = tasks.routing
        if self.routing.masked_view not in (0, 1):
            raise ValueError(f"tasks.routing.masked_view={self.routing.masked_view} must be 0 or 1")
        types = objective_types()
        self.weights = {n: float(getattr(tasks, n).weight) for n in types if getattr(tasks, n).weight > 0}
        if not self.weights:
            raise ValueError(f"every task weight is 0: enable at least one of tasks.{{{','.join(types)}}}")
        needed = set(self.weights)
        for name in reversed(types):  # registration order puts what an objective requires before it
            if name in needed:
                needed |= set(types[name].requires)
        # plain dict, not a module: objectives hold configs; their modules are this model's attributes
        self.objectives: dict[str, Objective] = {n: c(getattr(tasks, n)) for n, c in types.items() if n in needed}
        self.backbone = build_backbone(backbone)
        for cls in types.values():
            for attr in cls.modules:
                if hasattr(HVPMTL, attr):
                    raise ValueError(f"objective {cls.name!r}: module name {attr!r} is an HVPMTL attribute")
                setattr(self, attr, None)
        for name, objective in self.objectives.items():  # registration order: the initial weights depend on it
            modules = objective.build(self, num_classes)
            if set(modules) != set(objective.modules):
                raise ValueError(f"objective {name!r}: build() gave {sorted(modules)}, declared {objective.modules}")
            for attr, module in modules.items():
                setattr(self, attr, module)
        self.forward_order = _forward_order(self.objectives)
        self.iteration = 0  # optimiser steps taken; persisted through get/set_extra_state
        self._compiled_step = None  # set by compile_forward()

    # ------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"iteration": self.iteration}

    def set_extra_state(self, state: dict) -> None:
        self.iteration = int(state["iteration"])

    @property
    def summed_losses(self) -> set[str]:
        """Loss keys summed (not averaged) over images: under data parallelism and gradient
        accumulation the engine rescales these so the gradient is the whole batch's."""
        return {f"loss_{n}" for n in self.weights if self.objectives[n].sums_over_images}

    @property
    def logged_extras(self) -> tuple[str, ...]:
        """Output keys besides the losses that the training loop logs (``swav_collapse``)."""
        return tuple(k for n in self.weights for k in self.objectives[n].logged)

    @property
    def has_unused_parameters(self) -> bool:
        """True when some trainable parameter gets no gradient: an objective built only for
        another's use (MLC's read-out when only MD uses the decoder); DDP then needs
        ``find_unused_parameters``."""
        return any(n not in self.weights for n in self.objectives)

    def before_step(self) -> None:
        """The one call between the backward pass(es) and the optimiser step: each objective's
        gradient edits (SwAV's frozen prototypes lose their all-zero gradient, so AdamW neither
        decays them nor counts a step for them)."""
        for objective in self.objectives.values():
            objective.before_step(self)

    @torch.no_grad()
    def after_step(self) -> None:
        """The one call after each optimiser step: each objective's update (EMA teacher, SwAV
        prototypes back onto the unit sphere), iteration count + 1."""
        for objective in self.objectives.values():
            objective.after_step(self)
        self.iteration += 1

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Trainable parameters split into decayed (>= 2-D weights) and not decayed (norms,
        biases, tokens, position and label embeddings: a module's ``no_weight_decay()``)."""
        skip = set()
        for prefix, module in self.named_children():
            if hasattr(module, "no_weight_decay"):
                skip |= {f"{prefix}.{n}" for n in module.no_weight_decay()}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or name in skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ------------------------------------------------------------------------------------------
    def _inputs(self) -> dict[str, tuple[int, bool]]:
        """Which (view index, masked?) each objective input reads, from the routing config."""
        m = self.routing.masked_view
        masking = any(o.masks_pixels for o in self.objectives.values())
        plan = ViewPlan(masked_view=m, clean_view=1 - m, masking=masking, routing=self.routing)
        need: dict[str, tuple[int, bool]] = {}
        for name, objective in self.objectives.items():
            for key, pair in objective.inputs(plan).items():
                if key in need:
                    raise ValueError(f"objective {name!r}: input name {key!r} is used by another objective")
                need[key] = pair
        return need

    def _encode(self, views, mask, keys: list[tuple[int, bool]]) -> dict:
        """One batched backbone call over the distinct (view, masked) pairs."""
        keys = sorted(set(keys))
        x = torch.cat([views[v] for v, _ in keys])
        full_mask = None
        if any(masked for _, masked in keys):
            if mask is None:
                users = ",".join(n for n, o in self.objectives.items() if o.masks_pixels)
                raise ValueError(f"batch['mask'] is required when tasks.{users} is on")
            none = torch.zeros_like(mask)
            full_mask = torch.cat([mask if masked else none for _, masked in keys])
        fmap, pooled = self.backbone(x, full_mask)
        B = views[0].shape[0]
        return {k: (fmap[i * B : (i + 1) * B], pooled[i * B : (i + 1) * B]) for i, k in enumerate(keys)}

    def compile_forward(self, retain_graph: bool = False, **kwargs: Any) -> None:
        """``torch.compile`` the whole step's forward (every backbone pass, the teacher's, the heads
        and the losses; ``kwargs`` go to ``torch.compile``). The counters stay outside it: each
        objective's :meth:`~Objective.phase` is read before and :meth:`~Objective.after_forward`
        runs after, so the compiled forward recompiles only when a phase changes (SwAV's
        prototypes unfreezing, its queue coming into use), not at every step.

        ``retain_graph``: some backward of a forward will retain its graph (the gradient shares'
        ``autograd.grad`` calls), so AOT autograd must not donate the saved activations' memory
        to the backward's outputs. This turns ``torch._functorch.config.donated_buffer`` off for
        the process (AOT autograd reads it when each backward graph compiles and runs), which
        costs some of the backward's peak memory."""
        if retain_graph and hasattr(torch._functorch.config, "donated_buffer"):
            torch._functorch.config.donated_buffer = False
        self._compiled_step = torch.compile(self._step, **kwargs)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        phases = {name: objective.phase(self, self.iteration) for name, objective in self.objectives.items()}
        out = (self._compiled_step or self._step)(batch, phases)
        for objective in self.objectives.values():
            objective.after_forward(self, batch)
        return out

    def _step(self, batch: dict, phases: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The forward proper, what :meth:`compile_forward` compiles: no host counters read."""
        views, mask = batch["views"], batch.get("mask")
        need = self._inputs()
        step = Step(views, mask, batch.get("labels"), need, self._encode(views, mask, list(need.values())), phases,
                    known=batch.get("known"), known_counts=batch.get("known_counts"))  # fmt: skip
        losses: dict[str, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for name in self.forward_order:
            result = dict(self.objectives[name].forward(self, step, name in self.weights))
            if name in self.weights:
                if "loss" not in result:
                    raise ValueError(f"objective {name!r}: forward() returned no 'loss' (keys: {sorted(result)})")
                losses[name] = result.pop("loss")
            out.update(result)
        out["loss"] = sum(self.weights[t] * v for t, v in losses.items())
        out.update({f"loss_{t}": v for t, v in losses.items()})
        return out

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """SimMIM reconstruction of ``images`` under ``mask`` (for pictures), ``B x 3 x H x W``."""
        if self.mim is None:
            raise RuntimeError("tasks.mim is off: there is no MIM decoder")
        fmap, _ = self.backbone(images, mask)
        return self.mim(fmap)


def _forward_order(objectives: dict[str, Objective]) -> list[str]:
    """Registration order, except that an objective runs right after the last of those it
    requires (MD right after MLC, whose decoder output it reads)."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or any(r not in order for r in objectives[name].requires):
            return
        order.append(name)
        for other, objective in objectives.items():
            if name in objective.requires:
                visit(other)

    for name in objectives:
        visit(name)
    return order
