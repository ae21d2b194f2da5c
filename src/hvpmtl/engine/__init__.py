"""Training engine: the loop, schedules, sampler, checkpoints, distribution and run output.

``fit(make_task, cfg, env)`` runs (or resumes) any :class:`TrainingTask` alone or under
torchrun (pre-training's task and :func:`hvpmtl.pretraining.pretrain` live above the engine); the
pieces are usable on their own: ``GlobalBatchSampler``, ``warmup_cosine``, ``build_optimizer``,
``wrap_model``, ``save_checkpoint``/``load_checkpoint``/``restore``.

Names are imported lazily: ``hvpmtl.config`` imports ``hvpmtl.engine.config``, which runs this
file first; importing the loop here would pull the whole engine (data, backbones) into every
config import.
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
    "load_checkpoint": "checkpoint",
    "restore": "checkpoint",
    "save_checkpoint": "checkpoint",
    "NonFiniteLossError": "loop",
    "RunResult": "loop",
    "SimulatedCrash": "loop",
    "Trainer": "loop",
    "fit": "loop",
    "StepHook": "task",
    "TrainingTask": "task",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hvpmtl.engine.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hvpmtl.engine' has no attribute '{name}'")
