"""Training engine: the loop, schedules, sampler, checkpoints, distribution and run output.

``pretrain(cfg)`` runs (or resumes) pre-training alone or under torchrun; the pieces are usable
on their own: ``GlobalBatchSampler``, ``warmup_cosine``, ``build_optimizer``, ``wrap_model``,
``save_checkpoint``/``load_checkpoint``/``restore``, ``load_backbone``.

Names are imported lazily: ``hvpmtl.config`` imports ``hvpmtl.engine.config`` while the loop
imports ``hvpmtl.config``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DistConfig": "config",
    "OptimConfig": "config",
    "TrainConfig": "config",
    "DistEnv": "distributed",
    "GlobalBatchNorm": "distributed",
    "init_distributed": "distributed",
    "unwrap": "distributed",
    "wrap_model": "distributed",
    "GlobalBatchSampler": "sampler",
    "warmup_cosine": "schedules",
    "build_optimizer": "optim",
    "find_latest": "checkpoint",
    "load_backbone": "checkpoint",
    "load_checkpoint": "checkpoint",
    "restore": "checkpoint",
    "save_checkpoint": "checkpoint",
    "NonFiniteLossError": "loop",
    "RunResult": "loop",
    "SimulatedCrash": "loop",
    "Trainer": "loop",
    "pretrain": "loop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hvpmtl.engine.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hvpmtl.engine' has no attribute '{name}'")
