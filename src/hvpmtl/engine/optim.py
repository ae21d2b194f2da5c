"""AdamW on the model's parameter groups (paper Sec. 3.3: AdamW, weight decay 0.05).

``model.param_groups(wd)`` decays only >= 2-D weights; norms, biases, tokens, position and label
embeddings get 0. Each group records ``wd_scale`` (1 or 0) so a weight-decay schedule can be
applied per step. The implementation is fused where PyTorch supports it, else ``foreach``.
"""

from __future__ import annotations

import torch
from torch import nn

from hvpmtl.engine.config import OptimConfig


def _is_dtensor(p: torch.Tensor) -> bool:
    return type(p).__name__ == "DTensor"


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The one no-decay rule: >= 2-D weights decay; 1-D parameters and the names a child module
    lists in ``no_weight_decay()`` do not."""
    skip = set()
    for prefix, module in model.named_children():
        if hasattr(module, "no_weight_decay"):
            skip |= {f"{prefix}.{n}" for n in module.no_weight_decay()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``model.param_groups(cfg.weight_decay)``; ``cfg.impl`` picks fused/foreach."""
    return adamw(model.param_groups(cfg.weight_decay), cfg)


def adamw(groups: list[dict], cfg: OptimConfig, auto: str = "fused") -> torch.optim.AdamW:
    """AdamW over the non-empty ``groups``, each marked with ``wd_scale`` (1 or 0: whether it
    decays) for the per-step weight-decay schedule; ``cfg.impl=auto`` is ``auto`` for unsharded
    parameters, ``foreach`` for sharded ones."""
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["wd_scale"] = 1.0 if g.get("weight_decay", cfg.weight_decay) > 0 else 0.0
    impl = cfg.impl
    if impl == "auto":
        sharded = any(_is_dtensor(p) for g in groups for p in g["params"])
        impl = "foreach" if sharded else auto
    kwargs: dict = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    try:
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, **kwargs
        )
    except (RuntimeError, ValueError):
        if cfg.impl != "auto":
            raise
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)
