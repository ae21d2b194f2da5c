"""What the training loop (:mod:`hvpmtl.engine.loop`) trains: a :class:`TrainingTask`.

A task owns the model, its data and its loss; the loop owns everything around them (run folder,
seeding and wrapping, AdamW and its schedules, micro-batches and autocast, clipping, skipped
non-finite steps, checkpoints and resume, metrics). Pre-training (:mod:`hvpmtl.pretraining`),
fine-tuning, detection and segmentation (:mod:`hvpmtl.eval.downstream`) are tasks. Pre-training
extras that are no part of a task (the k-NN monitor, training pictures, test-only faults) are
:class:`StepHook` objects handed to the loop by their caller.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hvpmtl.engine.distributed import DistEnv
from hvpmtl.engine.optim import decay_groups


def seed_all(seed: int) -> None:
    """Seed torch's, numpy's and Python's global RNGs (new heads, Mixup's numpy draws), so that a
    run repeats whatever state the process's RNGs were in."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class BatchFeed:
    """The loop's source of micro-batches: ``next`` takes one from the epoch's iterator and puts
    it on the device; ``prefetch`` may start the next one's copy (no-op here)."""

    def __init__(self, to_device, device: torch.device):
        self.to_device, self.device = to_device, device

    def next(self, batches: Iterator, step: int) -> Any:
        return self.to_device(next(batches), self.device)

    def prefetch(self, batches: Iterator, step: int, total_steps: int, steps_per_epoch: int) -> None:
        return None


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors (also inside lists, tuples and dicts) moved to ``device``; anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class TrainingTask:
    """What one training run trains. Subclasses set ``name``, ``model`` and ``loss_keys`` and
    implement :meth:`data` and :meth:`loss`; every other method has a default that does nothing.

    Attributes:
        name: command name (progress bar, messages).
        model: the module the loop wraps (DDP/FSDP), steps and checkpoints, on the run's device.
        loss_keys: the entries of :meth:`loss`'s dict that are logged each step.
        summed_losses: ``{key: weight of that entry in "loss"}`` for entries summed (not averaged)
            over images: the loop rescales them so the gradient is the whole global batch's.
        total_of: ``{key: weight}``: the logged ``loss`` is this weighted sum of the logged entries
            (after the reduction over ranks); empty: ``loss`` is one of ``loss_keys``.
        title: names the task in messages and errors (empty: unnamed, as pre-training's).
        eval_every: epochs between :meth:`evaluate` calls (and the last step); 0: never.
        checkpoint_each_epoch: also save at every epoch end, after that epoch's evaluation.
        withheld: what a run that ends without a good step does not write (its error says so).
    """

    name: str = "train"
    title: str = ""
    model: nn.Module
    loss_keys: tuple[str, ...] = ("loss",)
    summed_losses: dict[str, float] = {}
    total_of: dict[str, float] = {}
    eval_every: int = 0
    checkpoint_each_epoch: bool = False
    withheld: str = "nothing exported (no model.safetensors, backbone.safetensors or final checkpoint)"

    # --- data and loss ------------------------------------------------------------------------
    def data(self, cfg, env: DistEnv) -> tuple[Any, Any, Any]:
        """``(loader, sampler, feed)``: the loader is iterated once per epoch after
        ``sampler.set_epoch(epoch, step_in_epoch)``; ``sampler.steps_per_epoch`` counts optimiser
        steps; ``feed`` is a :class:`BatchFeed`."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """``{"loss": scalar, **logged}`` of one micro-batch; ``model`` may be wrapped."""
        raise NotImplementedError

    # --- optimiser --------------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups (each may carry ``lr_scale``); default: the engine's one no-decay rule."""
        return decay_groups(self.model, weight_decay)

    def auto_impl(self, device: torch.device) -> str:
        """What ``optim.impl=auto`` picks for unsharded parameters."""
        return "fused"

    def compile(self, mode: bool | str) -> None:
        """``train.compile`` (true, ``backbone`` or ``model``)."""
        self.model.compile()

    # --- hooks ------------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        """Between the backward pass(es) and the optimiser step (gradient edits)."""

    def after_step(self, step: int) -> None:
        """After each optimiser step that was taken (EMA updates); ``step`` counts from 0."""

    def check_resume(self, state: dict, path: Path, env: DistEnv) -> None:
        """Before a resume writes anything: refuse (``ValueError``) a checkpoint of another task."""

    def write_run_files(self, run_dir: Path, overwrite: bool) -> None:
        """Rank 0, once the run folder is open: the task's own files in it."""

    def evaluate(self, loop, final: bool) -> None:
        """Collective, every ``eval_every`` epochs and at the end (``final``); ``loop`` is the
        :class:`~hvpmtl.engine.loop.Trainer` (its ``inner`` model, ``step``, ``logger``, ``autocast``)."""

    def seed(self, seed: int) -> None:
        """Seed the process's RNGs for this rank's stream (dropout, drop path, augmentation)."""
        seed_all(seed)

    def start(self, loop) -> None:
        """At the start of :meth:`~hvpmtl.engine.loop.Trainer.fit`."""

    def finish(self, loop) -> None:
        """Once the run's last checkpoint is written (pre-training exports its weights here)."""

    # --- checkpoint state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Extra entries of every checkpoint."""
        return {}

    def load_state_dict(self, state: dict, env: DistEnv) -> None:
        """Restore :meth:`state_dict`'s entries from a checkpoint being resumed."""


class StepHook:
    """A caller's addition to the loop (k-NN monitor, pictures, faults): logged columns
    ``keys``; called at the start of the run, after each forward and after each step."""

    keys: tuple[str, ...] = ()

    def start(self, loop) -> None:
        """At the start of :meth:`~hvpmtl.engine.loop.Trainer.fit` (the logger is open)."""

    def after_forward(self, out: dict, step: int, micro: int, loop) -> dict:
        """``out`` (possibly changed) of micro-batch ``micro`` of step ``step`` (0-based)."""
        return out

    def after_step(self, step: int, done: bool, loop) -> dict | None:
        """After step ``step`` (1-based, the number done); values to log with that step's row."""
        return None

    def after_checkpoint(self, step: int, done: bool, loop) -> None:
        """At the very end of step ``step``, after its metrics and checkpoint are written."""
