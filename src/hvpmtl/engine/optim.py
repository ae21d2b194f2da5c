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


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``model.param_groups(cfg.weight_decay)``; ``cfg.impl`` picks fused/foreach."""
    groups = [g for g in model.param_groups(cfg.weight_decay) if g["params"]]
    for g in groups:
        g["wd_scale"] = 1.0 if g["weight_decay"] > 0 else 0.0
    impl = cfg.impl
    if impl == "auto":
        sharded = any(_is_dtensor(p) for g in groups for p in g["params"])
        impl = "foreach" if sharded else "fused"
    kwargs: dict = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)
    except (RuntimeError, ValueError):
        if cfg.impl != "auto":
            raise
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)
