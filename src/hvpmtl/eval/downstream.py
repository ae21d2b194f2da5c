"""Fine-tuning, detection and segmentation as tasks of the engine's one training loop.

A command describes what it trains as a :class:`DownstreamTask` (model, training set, loss,
evaluation, parameter groups with layer-wise lr scales); :func:`train_downstream` runs it through
:func:`hvpmtl.engine.loop.fit`, alone or under torchrun, with every guarantee of pre-training
(run folder rules, resume, skipped non-finite steps, checkpoints, metrics and loggers). What is
downstream's own: an evaluation every ``eval_every`` epochs and at the end, whose metrics go to
``eval.csv`` and into every checkpoint (a resume rewrites ``eval.csv`` from the checkpoint's
history, so evaluations after it are redone, not listed twice); a checkpoint at every epoch end
after its evaluation; an optional EMA of the weights (timm ``ModelEmaV3``) evaluated too; the
source weights and data (:mod:`hvpmtl.eval.identity`) recorded, and a resume on others refused.
"""

from __future__ import annotations

import copy
import csv
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hvpmtl.engine.distributed import DistEnv, barrier
from hvpmtl.engine.loop import fit
from hvpmtl.engine.sampler import GlobalBatchSampler
from hvpmtl.engine.task import BatchFeed, TrainingTask, seed_all, to_device
from hvpmtl.eval.identity import check_resume_identity, write_identity

__all__ = ["DownstreamResult", "DownstreamTask", "layer_decay_groups", "seed_all", "train_downstream"]

NOT_EVALUATED = "no final evaluation or checkpoint"


@dataclass
class DownstreamResult:
    metrics: dict
    ema_metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def layer_decay_groups(
    model: nn.Module, backbone: nn.Module, weight_decay: float, layer_decay: float = 1.0
) -> list[dict]:
    """AdamW groups for ``model`` whose part ``backbone`` (a timm model) gets layer-wise lr
    decay (BEiT), through timm's ``param_groups_layer_decay``: each Transformer block (Swin: the
    blocks of all stages in order) learns at ``layer_decay`` times the rate of the block above
    it, the stem (patch and position embeddings) one factor below the first block, a classifier
    head at the full rate. Every other trainable parameter of ``model`` (necks, decoders) gets
    the full rate. 1-D parameters and the backbone's ``no_weight_decay()`` names take no weight
    decay. Each group carries its factor as ``lr_scale``.
    """
    from timm.optim import param_groups_layer_decay

    skip = set(getattr(backbone, "no_weight_decay", lambda: set())())
    groups = param_groups_layer_decay(backbone, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    inside = {id(p) for p in backbone.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in inside]
    groups.append({"params": [p for p in rest if p.ndim > 1], "weight_decay": weight_decay, "lr_scale": 1.0})
    groups.append({"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": 1.0})
    return [g for g in groups if g["params"]]


def _append_csv(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _rewrite_csv(path: Path, rows: list[dict]) -> None:
    """``path`` holding just ``rows`` (those of a resumed checkpoint's history)."""
    path.unlink(missing_ok=True)
    for row in rows:
        _append_csv(path, row)


class DownstreamTask(TrainingTask):
    """What a downstream command plugs into :func:`train_downstream`.

    Attributes:
        name: command name (progress bar, messages).
        model: the module to train (unwrapped).
        train_set: indexed by ``(index, epoch)`` keys (e.g. :class:`hvpmtl.data.SeededItems`).
        collate: batches ``train_set`` items.
        loss_fn: ``(model, batch) -> {"loss": scalar, ...}``; ``model`` may be DDP-wrapped.
        evaluate_fn: ``(model, env) -> {metric: value}``; collective, runs in eval mode under
            ``no_grad``; the returned metrics must be the same on every rank.
        groups: AdamW groups; each may carry ``lr_scale`` (layer-wise decay).
        loss_keys: logged entries of ``loss_fn``'s dict.
        to_device: ``(batch, device) -> batch``.
    """

    checkpoint_each_epoch = True
    withheld = NOT_EVALUATED

    def __init__(
        self, name: str, model: nn.Module, train_set: Dataset, collate: Callable, loss_fn: Callable,
        evaluate_fn: Callable, groups: list[dict], loss_keys: tuple[str, ...] = ("loss",),
        to_device: Callable = to_device,
    ):  # fmt: skip
        self.name, self.model, self.train_set, self.collate = name, model, train_set, collate
        self.loss_fn, self.evaluate_fn, self.groups = loss_fn, evaluate_fn, groups
        self.loss_keys, self.to_device = tuple(loss_keys), to_device

    def prepare(self, env: DistEnv, batch_size: int, num_workers: int, eval_every: int,
                ema_decay: float | None, identity: dict | None) -> None:  # fmt: skip
        """Put the model on the device, start the EMA and set the run's loop options."""
        self.title, self.env = self.name, env
        self.batch_size, self.num_workers, self.eval_every = batch_size, num_workers, eval_every
        self.identity = identity
        self.model = self.model.to(env.device)
        self.ema = None
        if ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=ema_decay)
        self.history: list[dict] = []

    # --- the loop's task interface ------------------------------------------------------------
    def data(self, cfg, env: DistEnv):
        t = cfg.train
        sampler = GlobalBatchSampler(len(self.train_set), self.batch_size, env.rank, env.world_size, t.accum_steps,
                                     t.seed)  # fmt: skip
        loader = DataLoader(
            self.train_set, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=self.collate,
            pin_memory=env.device.type == "cuda", persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(t.seed),
        )  # fmt: skip
        return loader, sampler, BatchFeed(self.to_device, env.device)

    def loss(self, model, batch, step: int) -> dict:
        return self.loss_fn(model, batch)

    def compile(self, mode) -> None:
        """``train.compile=true|model``: the whole model (backbone and head) is compiled; its EMA
        copy, made before, stays eager (:func:`hvpmtl.eval.config.check_loop_keys` refuses the rest)."""
        self.model.compile()

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.groups

    def auto_impl(self, device: torch.device) -> str:
        return "fused" if device.type == "cuda" else "foreach"

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=step)

    def check_resume(self, state: dict, path: Path, env: DistEnv) -> None:
        if self.identity is None:
            return
        # other source weights or data: refused (ConfigError) before any write
        if (warning := check_resume_identity(state.get("identity"), self.identity, path)) and env.is_main:
            print(warning)

    def write_run_files(self, run_dir: Path, overwrite: bool) -> None:
        if self.identity is not None:
            write_identity(run_dir, self.identity)

    def state_dict(self) -> dict:
        state = {"history": self.history, "identity": self.identity}
        if self.ema is not None:
            state["ema"] = copy.deepcopy(self.ema.module.state_dict())
        return state

    def load_state_dict(self, state: dict, env: DistEnv) -> None:
        self.history = list(state.get("history", []))
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])
        self._rewrite = True  # eval.csv: the checkpoint's history (evaluations after it are redone)

    def start(self, loop) -> None:
        if getattr(self, "_rewrite", False) and loop.env.is_main:
            _rewrite_csv(loop.run_dir / "eval.csv", self.history)

    def evaluate(self, loop, final: bool) -> None:
        step, spe, env = loop.step, loop.sampler.steps_per_epoch, loop.env
        if final and self.history and self.history[-1]["step"] == step:
            return  # a resumed finished run: evaluated already
        metrics = {}
        for prefix, net in (("", loop.inner), ("ema_", self.ema.module if self.ema is not None else None)):
            if net is None:
                continue
            was = net.training
            net.eval()
            with torch.no_grad(), loop.autocast():
                metrics.update({f"{prefix}{k}": v for k, v in self.evaluate_fn(net, env).items()})
            net.train(was)
        row = {"step": step, "epoch": round(step / spe, 4), **metrics}
        self.history.append(row)
        if env.is_main:
            _append_csv(loop.run_dir / "eval.csv", row)
            if loop.logger.tb is not None:
                for k, v in metrics.items():
                    loop.logger.tb.add_scalar(f"eval/{k}", v, step)
            tag = "final" if final else f"epoch {step // spe}"
            values = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
            loop.logger.message(f"{self.name} {tag} step {step}: {values}")


def train_downstream(
    task: DownstreamTask, cfg, env: DistEnv, run_dir: Path, batch_size: int, num_workers: int = 1,
    eval_every: int = 1, ema_decay: float | None = None, identity: dict | None = None,
) -> DownstreamResult:  # fmt: skip
    """Train ``task`` with ``cfg.optim``, ``cfg.train`` and ``cfg.dist`` in ``run_dir`` (module
    docstring). ``identity`` (:func:`hvpmtl.eval.identity.run_identity`: source weights and data)
    goes into ``identity.json`` and every checkpoint; a resume whose identity differs is refused."""
    start = time.perf_counter()
    task.prepare(env, batch_size, num_workers, eval_every, ema_decay, identity)
    trainer, result = fit(lambda path: task, cfg, env, batch_size=batch_size, run_dir=Path(run_dir))
    barrier(env)
    final = {k: v for k, v in task.history[-1].items() if k not in ("step", "epoch")}
    return DownstreamResult(
        metrics={k: v for k, v in final.items() if not k.startswith("ema_")},
        ema_metrics={k.removeprefix("ema_"): v for k, v in final.items() if k.startswith("ema_")},
        history=task.history, steps=result.steps, seconds=time.perf_counter() - start,
    )  # fmt: skip
