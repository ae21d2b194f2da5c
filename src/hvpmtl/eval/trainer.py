"""The training loop that fine-tuning, detection and segmentation share.

A command describes its task as a :class:`DownstreamTask` (model, training set, loss,
evaluation, parameter groups with layer-wise lr scales); :func:`train_downstream` runs it alone
or under torchrun (DDP, global BatchNorm), with the pre-training engine's pieces: the global
batch sampler, per-step warm-up + cosine schedules, AdamW, autocast, gradient clipping and
accumulation, skipped non-finite steps, atomic checkpoints with ``train.resume=auto``, a progress
bar, ``metrics.csv``, ``environment.jsonl`` and TensorBoard, and the run folder's rules
(:mod:`hvpmtl.engine.run_dir`: locked, a previous run refused unless resumed or
``train.overwrite``, damaged checkpoints set aside for the newest good one). Evaluations run
every ``eval_every`` epochs and at the end; their metrics go to ``eval.csv``.
"""

from __future__ import annotations

import copy
import csv
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hvpmtl.config import ConfigError, save_config, to_dict
from hvpmtl.engine import checkpoint as ckpt_io
from hvpmtl.engine import run_dir as run_io
from hvpmtl.engine.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    gradient_sync,
    unwrap,
    wrap_model,
)
from hvpmtl.engine.guards import BufferSnapshot, untrained_reason
from hvpmtl.engine.metrics import MetricsLogger
from hvpmtl.engine.sampler import GlobalBatchSampler
from hvpmtl.engine.schedules import warmup_cosine, warmup_steps_for
from hvpmtl.eval.identity import check_resume_identity, write_identity

NOT_EVALUATED = "no final evaluation or checkpoint"


@dataclass
class DownstreamTask:
    """What a downstream command plugs into :func:`train_downstream`.

    Attributes:
        name: command name (progress bar, messages).
        model: the module to train (unwrapped).
        train_set: indexed by ``(index, epoch)`` keys (e.g. :class:`hvpmtl.data.SeededItems`).
        collate: batches ``train_set`` items.
        loss: ``(model, batch) -> {"loss": scalar, ...}``; ``model`` may be DDP-wrapped.
        evaluate: ``(model, env) -> {metric: value}``; collective, runs in eval mode under
            ``no_grad``; the returned metrics must be the same on every rank.
        param_groups: AdamW groups; each may carry ``lr_scale`` (layer-wise decay).
        loss_keys: logged entries of ``loss``'s dict.
        to_device: ``(batch, device) -> batch``.
    """

    name: str
    model: nn.Module
    train_set: Dataset
    collate: Callable
    loss: Callable
    evaluate: Callable
    param_groups: list[dict]
    loss_keys: tuple[str, ...] = ("loss",)
    to_device: Callable = None  # type: ignore[assignment]


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


def _default_to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, (list, tuple)):
        return type(batch)(_default_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _default_to_device(v, device) for k, v in batch.items()}
    return batch


def seed_all(seed: int) -> None:
    """Seed torch's, numpy's and Python's global RNGs (new heads, Mixup's numpy draws), so that a
    run repeats whatever state the process's RNGs were in."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def train_downstream(
    task: DownstreamTask, cfg, env: DistEnv, run_dir: Path, batch_size: int, num_workers: int = 1,
    eval_every: int = 1, ema_decay: float | None = None, identity: dict | None = None,
) -> DownstreamResult:  # fmt: skip
    """Train ``task`` with ``cfg.optim``, ``cfg.train`` and ``cfg.dist`` (module docstring).
    ``identity`` (:func:`hvpmtl.eval.identity.run_identity`: source weights and data) goes into
    ``identity.json`` and every checkpoint; a resume whose identity differs is refused."""
    run_dir = Path(run_dir)
    try:
        return _train(task, cfg, env, run_dir, batch_size, num_workers, eval_every, ema_decay, identity)
    finally:
        run_io.unlock_run_dir(run_dir)


def _train(
    task: DownstreamTask, cfg, env: DistEnv, run_dir: Path, batch_size: int, num_workers: int, eval_every: int,
    ema_decay: float | None, identity: dict | None = None,
) -> DownstreamResult:  # fmt: skip
    # the run folder as pre-training treats it: locked, a previous run refused unless train.resume
    # or train.overwrite, the newest good checkpoint resumed (damaged newer ones set aside)
    try:  # a usage error, one line at the command line, as pre-training's (folder in use, a previous run, ...)
        ckpt_path, ckpt_state = run_io.choose_checkpoint(run_dir, cfg.train.resume, cfg.train.overwrite, env)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if ckpt_path is not None and identity is not None:  # other source weights or data: refused before any write
        ckpt_state = ckpt_state or ckpt_io.load_checkpoint(ckpt_path)
        if (warning := check_resume_identity(ckpt_state.get("identity"), identity, ckpt_path)) and env.is_main:
            print(warning)
    cfg = copy.deepcopy(cfg)
    overwrite, cfg.train.overwrite = cfg.train.overwrite, False  # a one-off: the saved config must not carry it
    t, o = cfg.train, cfg.optim
    if env.is_main:
        run_io.open_run_dir(run_dir, overwrite)
        save_config(cfg, run_dir / "config.yaml")
        if identity is not None:
            write_identity(run_dir, identity)
    barrier(env)
    to_device = task.to_device or _default_to_device
    model = task.model.to(env.device)
    ema = None
    if ema_decay is not None:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=ema_decay)
    seed_all(t.seed + env.rank)  # per-rank streams for dropout / drop path and Mixup
    wrapped = wrap_model(model, env, "ddp", cfg.dist.sync_bn)  # downstream models fit one device: DDP
    inner = unwrap(wrapped)
    groups = [g for g in task.param_groups if g["params"]]
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        g["wd_scale"] = 1.0 if g.get("weight_decay", o.weight_decay) > 0 else 0.0
    fused = {"fused": True} if env.device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(
        groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, **fused
    )
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None

    sampler = GlobalBatchSampler(len(task.train_set), batch_size, env.rank, env.world_size, t.accum_steps, t.seed)
    loader = DataLoader(
        task.train_set, batch_sampler=sampler, num_workers=num_workers, collate_fn=task.collate,
        pin_memory=env.device.type == "cuda", persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(t.seed),
    )  # fmt: skip
    spe = sampler.steps_per_epoch
    total = t.max_steps if t.max_steps > 0 else t.epochs * spe
    lr = warmup_cosine(o.lr, o.min_lr, total, warmup_steps_for(o.warmup_epochs, o.warmup_steps, spe))

    step, skipped, streak, history = 0, 0, 0, []
    if ckpt_path is not None:
        state = ckpt_state or ckpt_io.load_checkpoint(ckpt_path)
        changed = run_io.changed_config_keys(state.get("config", {}), to_dict(cfg))
        ckpt_io.check_fits(state["model"], wrapped, ckpt_path, changed)
        if changed and env.is_main:
            changes = run_io.describe_changes(state.get("config", {}), to_dict(cfg), changed)
            print(f"warning: resuming {ckpt_path} with a changed config: {changes}")
        ckpt_io.restore(state, wrapped, optimizer, scaler, env)
        step, skipped = int(state["step"]), int(state.get("skipped_steps", 0))
        history = list(state.get("history", []))
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        if env.is_main:
            _rewrite_csv(run_dir / "eval.csv", history)  # evaluations after the checkpoint are redone
            print(f"resumed {task.name} from {ckpt_path} at step {step}")
    if env.is_main:
        run_io.record_environment(run_dir, step, run_io.environment(env.world_size, env.device))
    logger = MetricsLogger(run_dir, task.loss_keys, total, step, batch_size, enabled=env.is_main,
                           progress=t.progress, desc=task.name)  # fmt: skip
    amp = dict(device_type=env.device.type, dtype=torch.bfloat16 if t.precision == "bf16" else torch.float16,
               enabled=t.precision != "fp32")  # fmt: skip

    def evaluate(tag: str) -> dict:
        metrics = {}
        for name, net in (("", inner), ("ema_", ema.module if ema is not None else None)):
            if net is None:
                continue
            was = net.training
            net.eval()
            with torch.no_grad(), torch.autocast(**amp):
                metrics.update({f"{name}{k}": v for k, v in task.evaluate(net, env).items()})
            net.train(was)
        row = {"step": step, "epoch": round(step / spe, 4), **metrics}
        history.append(row)
        if env.is_main:
            _append_csv(run_dir / "eval.csv", row)
            for k, v in metrics.items():
                logger.tb.add_scalar(f"eval/{k}", v, step)
            logger.message(f"{task.name} {tag} step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        return metrics

    def save() -> None:
        loop_state = {"step": step, "skipped_steps": skipped, "history": history, "identity": identity}
        if ema is not None:
            loop_state["ema"] = copy.deepcopy(ema.module.state_dict())
        path = ckpt_io.checkpoint_path(run_dir, step)
        ckpt_io.save_checkpoint(path, wrapped, optimizer, scaler, loop_state, to_dict(cfg), env)
        if env.is_main:
            ckpt_io.prune_checkpoints(run_dir, t.keep_ckpts)  # 0 keeps all

    start, last_log, pending = time.perf_counter(), time.perf_counter(), []
    wrapped.train()
    try:
        while step < total:
            epoch, pos = divmod(step, spe)
            sampler.set_epoch(epoch, pos)
            batches = iter(loader)
            for _ in range(pos, spe):
                for g in optimizer.param_groups:
                    g["lr"] = float(lr[step]) * g["lr_scale"]
                    g["weight_decay"] = o.weight_decay * g["wd_scale"]
                values = torch.zeros(len(task.loss_keys), device=env.device)
                buffers = BufferSnapshot(inner)  # BatchNorm statistics etc., put back if the step is skipped
                for a in range(t.accum_steps):
                    batch = to_device(next(batches), env.device)
                    with gradient_sync(wrapped, a == t.accum_steps - 1):
                        with torch.autocast(**amp):
                            out = task.loss(wrapped, batch)
                        loss = out["loss"] / t.accum_steps
                        (scaler.scale(loss) if scaler else loss).backward()
                    values += torch.stack([out[k].detach().float() for k in task.loss_keys]) / t.accum_steps
                if scaler is not None:
                    scaler.unscale_(optimizer)
                params = [p for p in inner.parameters() if p.grad is not None]
                norm = (torch.nn.utils.clip_grad_norm_(params, o.clip_grad) if o.clip_grad > 0
                        else torch.nn.utils.get_total_norm([p.grad for p in params]))  # fmt: skip
                bad = (~torch.isfinite(values.sum())).float() + (0.0 if scaler else (~torch.isfinite(norm)).float())
                ok = all_reduce_sum(bad.reshape(1), env).item() == 0
                stepped = ok
                if ok and scaler is not None:
                    scale = scaler.get_scale()
                    scaler.step(optimizer)
                    scaler.update()
                    stepped = scaler.get_scale() >= scale  # a lowered scale: the scaler skipped the step
                elif ok:
                    optimizer.step()
                elif scaler is not None:
                    scaler.update()
                if stepped and ema is not None:
                    ema.update(inner, step=step)
                if not stepped:
                    buffers.restore()
                if ok:
                    streak = 0
                else:
                    skipped, streak = skipped + 1, streak + 1
                    if streak >= t.max_bad_steps:
                        raise FloatingPointError(
                            f"{task.name}: {streak} consecutive steps had a non-finite loss or gradient "
                            f"(train.max_bad_steps={t.max_bad_steps}); lower optim.lr or use train.precision=fp32"
                        )
                optimizer.zero_grad(set_to_none=True)
                step += 1
                pending.append((step, values, norm.detach().float()))
                done = step >= total
                if step % t.log_every == 0 or done or step % spe == 0:
                    vals = (all_reduce_sum(torch.stack([p[1] for p in pending]), env) / env.world_size).cpu().tolist()
                    now = time.perf_counter()
                    rate = len(pending) * batch_size / max(now - last_log, 1e-9)
                    last_log = now
                    logger.log([
                        {**dict(zip(task.loss_keys, v)), "step": s, "epoch": round(s / spe, 4), "lr": float(lr[s - 1]),
                         "wd": o.weight_decay, "grad_norm": float(n), "img_per_s": rate, "skipped_steps": skipped}
                        for (s, _, n), v in zip(pending, vals)
                    ])  # fmt: skip
                    pending.clear()
                # an epoch's end is saved after its evaluation (below): a kill between them must not skip it
                if step % t.ckpt_every == 0 and not done and step % spe != 0:
                    save()
                if done:
                    break
            del batches
            if step >= total and (problem := untrained_reason(inner, step, skipped, env, NOT_EVALUATED)) is not None:
                raise FloatingPointError(f"{task.name}: {problem}")
            epochs_done = step // spe
            if step >= total or (step % spe == 0 and epochs_done % eval_every == 0):
                evaluate("final" if step >= total else f"epoch {epochs_done}")
            save()
        if not history or history[-1]["step"] != step:
            evaluate("final")
    finally:
        logger.close()
    barrier(env)
    final = {k: v for k, v in history[-1].items() if k not in ("step", "epoch")}
    return DownstreamResult(
        metrics={k: v for k, v in final.items() if not k.startswith("ema_")},
        ema_metrics={k.removeprefix("ema_"): v for k, v in final.items() if k.startswith("ema_")},
        history=history, steps=step, seconds=time.perf_counter() - start,
    )  # fmt: skip
