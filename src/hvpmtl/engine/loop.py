"""The training loop: any :class:`~hvpmtl.engine.task.TrainingTask` under one set of guarantees.

The run folder is chosen and locked (:mod:`hvpmtl.engine.run_dir`: a previous run refused unless
resumed or ``train.overwrite``, damaged checkpoints set aside); the environment is recorded; the
model is seeded per rank and wrapped (DDP/FSDP); AdamW runs with per-step warm-up + cosine lr and
weight-decay schedules. One optimiser step: for each of ``accum_steps`` micro-batches, forward
under autocast and backward; ``task.before_step`` (gradient edits); clip the global gradient
norm; if the loss and the gradient are finite, step AdamW and then ``task.after_step`` (EMA),
otherwise skip both, put the buffers back (BatchNorm statistics) and count the step;
``train.max_bad_steps`` skipped steps in a row stop the run. Per-step values stay on the device
and are read back once per ``train.log_every`` steps; the only per-step host sync is the
finite flag. A run that ends with no successful step or with non-finite weights raises instead
of saving them (``engine/guards.py``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from hvpmtl.config_io import ConfigError, to_dict
from hvpmtl.engine import checkpoint as ckpt_io
from hvpmtl.engine import run_dir as run_io
from hvpmtl.engine.distributed import DistEnv, all_reduce_sum, barrier, gradient_sync, is_fsdp, unwrap, wrap_model
from hvpmtl.engine.faults import SimulatedCrash  # noqa: F401  (re-exported: the CLI reports it)
from hvpmtl.engine.guards import BufferSnapshot, untrained_reason
from hvpmtl.engine.loggers import check_loggers
from hvpmtl.engine.metrics import MetricsLogger, format_summary, read_metrics, summarize
from hvpmtl.engine.optim import adamw
from hvpmtl.engine.schedules import warmup_cosine, warmup_steps_for
from hvpmtl.engine.task import StepHook, TrainingTask


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient, or the run ended with no
    successful step or with non-finite weights (then nothing is kept)."""


@dataclass
class RunResult:
    """What a finished run produced."""

    output_dir: Path
    steps: int
    skipped_steps: int
    seconds: float
    images_per_s: float
    losses: dict = field(default_factory=dict)  # key -> (first, last)
    checkpoint: Path | None = None
    backbone: Path | None = None


def plan_checkpoint(
    cfg, env: DistEnv, resume: str | None = None, run_dir: Path | None = None
) -> tuple[Path | None, dict | None]:
    """Rank 0 checks and locks the run folder (``run_dir`` or ``train.output_dir``) and picks (and
    loads) the checkpoint to resume (:func:`run_dir.choose_checkpoint`); every rank gets the path.
    A run that cannot start here (folder in use, a previous run, contradictions) is a :class:`ConfigError`."""
    t = cfg.train
    if run_dir is None and not t.output_dir:
        raise ConfigError("train.output_dir: must not be empty")
    try:
        return run_io.choose_checkpoint(Path(run_dir or t.output_dir), resume or t.resume, t.overwrite, env)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


class Trainer:
    """Wraps ``task.model``, builds the optimiser, schedules and data, resumes ``checkpoint``
    (``(path, state or None)`` from :func:`plan_checkpoint`) and opens the run folder;
    :meth:`fit` trains. ``hooks`` are factories ``(trainer) -> StepHook | None``, called once the
    schedules are known. ``batch_size`` is the global batch (images per optimiser step);
    ``run_dir`` defaults to ``train.output_dir``."""

    def __init__(
        self, task: TrainingTask, cfg, env: DistEnv, checkpoint: tuple[Path | None, dict | None] = (None, None),
        batch_size: int | None = None, hooks: tuple = (), run_dir: Path | None = None,
    ):  # fmt: skip
        cfg = copy.deepcopy(cfg)
        t, o = cfg.train, cfg.optim
        self.task, self.cfg, self.env = task, cfg, env
        self.run_dir = Path(run_dir or t.output_dir)
        self.batch_size = batch_size or cfg.data.batch_size
        if t.precision == "fp16" and env.device.type != "cuda":
            raise ValueError("train.precision=fp16 needs CUDA (its GradScaler); use bf16 or fp32 on CPU")
        check_loggers(t.loggers)  # a missing tracker package stops the run before anything is written
        if t.compile:
            task.compile(t.compile)
        task.seed(t.seed + env.rank)  # per-rank stream for dropout / drop path / augmentation
        self.model = wrap_model(task.model, env, cfg.dist.strategy, cfg.dist.sync_bn)
        self.inner = unwrap(self.model)
        self.fsdp = is_fsdp(self.model)
        self.optimizer = adamw(task.param_groups(o.weight_decay), o, task.auto_impl(env.device))
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None

        self.loader, self.sampler, self.feed = task.data(cfg, env)
        spe = self.sampler.steps_per_epoch
        self.total_steps = t.max_steps if t.max_steps > 0 else t.epochs * spe
        warm = warmup_steps_for(o.warmup_epochs, o.warmup_steps, spe)
        self.lr = warmup_cosine(o.lr, o.min_lr, self.total_steps, warm)
        wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
        self.wd = warmup_cosine(o.weight_decay, wd_end, self.total_steps, 0)

        self.keys = task.loss_keys  # per-step values; the image sums add over ranks, the rest average
        self.sum_keys = tuple(task.summed_losses)
        self.monitored: dict[int, dict] = {}  # step -> hook values, logged with its row
        self.hooks: list[StepHook] = [h for make in hooks if (h := make(self)) is not None]
        hook_keys = tuple(k for h in self.hooks for k in h.keys)
        self.log_keys = (*(() if "loss" in self.keys else ("loss",)), *self.keys, *hook_keys)

        self.step, self.skipped, self.bad_streak = 0, 0, 0
        path, state = checkpoint
        if path is not None:
            self._resume(path, state)
        overwrite, t.overwrite = t.overwrite, False  # a one-off: the saved config must not carry it
        if env.is_main:
            run_io.open_run_dir(self.run_dir, overwrite)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self._config(), sort_keys=False))
            task.write_run_files(self.run_dir, overwrite)
            run_io.record_environment(self.run_dir, self.step, run_io.environment(env.world_size, env.device))
        barrier(env)
        self.logger = MetricsLogger(
            self.run_dir, self.log_keys, self.total_steps, self.step, self.batch_size, enabled=env.is_main,
            progress=t.progress, desc=task.name, loggers=t.loggers, settings=t, config=self._config(),
        )  # fmt: skip

    def _config(self) -> dict:
        return to_dict(self.cfg)

    def _named(self, text: str) -> str:
        return f"{self.task.title}: {text}" if self.task.title else text

    # ------------------------------------------------------------------------------------------
    def _resume(self, path: Path, state: dict | None) -> None:
        state = state or ckpt_io.load_checkpoint(path)
        self.task.check_resume(state, path, self.env)  # ValueError: a checkpoint of another task
        config = self._config()
        changed = run_io.changed_config_keys(state.get("config", {}), config)
        ckpt_io.check_fits(state["model"], self.model, path, changed)
        if changed and self.env.is_main:
            changes = run_io.describe_changes(state.get("config", {}), config, changed)
            print(f"warning: resuming {path} with a changed config: {changes}")
        ckpt_io.restore(state, self.model, self.optimizer, self.scaler, self.env)
        self.step, self.skipped = int(state["step"]), int(state.get("skipped_steps", 0))
        self.bad_streak = int(state.get("bad_streak", 0))
        self.task.load_state_dict(state, self.env)
        if self.env.is_main:
            who = f"{self.task.title} " if self.task.title else ""
            print(f"resumed {who}from {path} at step {self.step}")

    def save(self) -> Path:
        """A checkpoint of this step (pruned to ``train.keep_ckpts``; 0 keeps all)."""
        path = ckpt_io.checkpoint_path(self.run_dir, self.step)
        spe = self.sampler.steps_per_epoch
        loop_state = {
            "step": self.step, "epoch": self.step // spe, "step_in_epoch": self.step % spe,
            "skipped_steps": self.skipped, "bad_streak": self.bad_streak, **self.task.state_dict(),
        }  # fmt: skip
        ckpt_io.save_checkpoint(path, self.model, self.optimizer, self.scaler, loop_state, self._config(), self.env)
        if self.env.is_main:
            ckpt_io.prune_checkpoints(self.run_dir, self.cfg.train.keep_ckpts)
        return path

    def autocast(self):
        t = self.cfg.train
        dtype = torch.bfloat16 if t.precision == "bf16" else torch.float16
        return torch.autocast(self.env.device.type, dtype=dtype, enabled=t.precision != "fp32")

    # ------------------------------------------------------------------------------------------
    def _objective(self, out: dict) -> torch.Tensor:
        """The loss to back-propagate so that averaging gradients over ranks and summing them over
        micro-batches gives the gradient of one process on the whole global batch: mean-reduced
        losses are divided by ``accum_steps``; image-summed losses (``task.summed_losses``) are
        multiplied by the number of ranks instead (a global sum is the sum of the local sums)."""
        loss = out["loss"]
        shards = self.env.world_size * self.cfg.train.accum_steps
        for key, weight in self.task.summed_losses.items():
            loss = loss + (shards - 1) * weight * out[key]
        return loss / self.cfg.train.accum_steps

    def _micro_factors(self) -> torch.Tensor:
        a = self.cfg.train.accum_steps
        return torch.tensor([1.0 if k in self.sum_keys else 1.0 / a for k in self.keys], device=self.env.device)

    def _train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimiser step (module docstring): ``(logged values, gradient norm, finite?)``."""
        t, dev = self.cfg.train, self.env.device
        for g in self.optimizer.param_groups:
            g["lr"] = float(self.lr[self.step]) * g.get("lr_scale", 1.0)
            g["weight_decay"] = float(self.wd[self.step]) * g.get("wd_scale", 1.0)
        values = torch.zeros(len(self.keys), device=dev)
        factors = self._micro_factors()
        bad = torch.zeros((), device=dev)
        buffers = BufferSnapshot(self.inner)  # BatchNorm statistics etc., put back if the step is skipped
        for a in range(t.accum_steps):
            batch = self.feed.next(batches, self.step)
            with gradient_sync(self.model, a == t.accum_steps - 1):
                with self.autocast():
                    out = self.task.loss(self.model, batch, self.step)
                for hook in self.hooks:  # test faults, gradient shares (on this micro-batch's graph)
                    out = hook.after_forward(out, self.step, a, self)
                loss = self._objective(out)
                (self.scaler.scale(loss) if self.scaler else loss).backward()  # outside autocast
            values += torch.stack([out[k].detach().float() for k in self.keys]) * factors
            bad += (~torch.isfinite(loss.detach())).float()
        self.task.before_step(self.step)  # e.g. SwAV's frozen prototypes: no gradient, so no AdamW step
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.inner.parameters() if p.grad is not None]
        if self.cfg.optim.clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.clip_grad)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if self.scaler is None:
            bad += (~torch.isfinite(norm)).float()  # fp16 overflows are the scaler's business
        self.feed.prefetch(batches, self.step, self.total_steps, self.sampler.steps_per_epoch)
        ok = all_reduce_sum(bad, self.env).item() == 0  # the one per-step host sync
        if ok:
            if self.scaler is not None:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                stepped = self.scaler.get_scale() >= scale  # a lowered scale: the scaler skipped the step
            else:
                self.optimizer.step()
                stepped = True
            if stepped:
                self.task.after_step(self.step)
            else:
                self.skipped += 1
                buffers.restore()
        else:
            buffers.restore()
            if self.scaler is not None:
                self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return values, norm.detach().float(), ok

    def _flush(self, pending: list) -> float:
        """Read back the buffered steps (one device sync, one all-reduce), log them; img/s."""
        if not pending:
            return 0.0
        vals = torch.stack([p[1] for p in pending])
        vals = all_reduce_sum(vals, self.env)
        ranks = torch.tensor([1.0 if k in self.sum_keys else 1.0 / self.env.world_size for k in self.keys])
        vals = (vals.cpu() * ranks).tolist()
        norms = torch.stack([p[2] for p in pending]).cpu().tolist()
        now = time.perf_counter()
        rate = len(pending) * self.batch_size / max(now - self._last_flush, 1e-9)
        self._last_flush = now
        spe = self.sampler.steps_per_epoch
        rows = []
        for (step, _, _, skipped), v, n in zip(pending, vals, norms):
            row = dict(zip(self.keys, v))
            row.update(self.monitored.pop(step, {}))
            if self.task.total_of:
                row["loss"] = sum(w * row[k] for k, w in self.task.total_of.items())
            row.update(step=step, epoch=round(step / spe, 4), lr=float(self.lr[step - 1]),
                       wd=float(self.wd[step - 1]), grad_norm=n, img_per_s=rate, skipped_steps=skipped)  # fmt: skip
            rows.append(row)
        self.logger.log(rows)
        pending.clear()
        return rate

    def _check_trained(self) -> None:
        problem = untrained_reason(self.inner, self.step, self.skipped, self.env, self.task.withheld)
        if problem is not None:
            raise NonFiniteLossError(self._named(problem))

    # ------------------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        """Train to ``train.max_steps`` (or ``train.epochs``); evaluate and save as the task asks."""
        t, spe, task = self.cfg.train, self.sampler.steps_per_epoch, self.task
        start_step, start = self.step, time.perf_counter()
        self._last_flush = start
        pending: list = []
        last_ckpt = None
        self.model.train()
        task.start(self)
        for hook in self.hooks:
            hook.start(self)
        try:
            while self.step < self.total_steps:
                epoch, pos = divmod(self.step, spe)
                self.sampler.set_epoch(epoch, pos)
                batches = iter(self.loader)
                for _ in range(pos, spe):
                    values, norm, ok = self._train_step(batches)
                    self.step += 1
                    if not ok:
                        self.skipped += 1
                        self.bad_streak += 1
                        self.logger.message(
                            f"step {self.step}: non-finite loss or gradient, step skipped "
                            f"({self.bad_streak} in a row, {self.skipped} in all)"
                        )
                        if self.bad_streak >= t.max_bad_steps:
                            pending.append((self.step, values, norm, self.skipped))
                            self._flush(pending)
                            raise NonFiniteLossError(self._named(
                                f"{self.bad_streak} consecutive steps had a non-finite loss or gradient "
                                f"(train.max_bad_steps={t.max_bad_steps}), last at step {self.step}; "
                                "lower optim.lr, use train.precision=fp32, or check the data"
                            ))  # fmt: skip
                    else:
                        self.bad_streak = 0
                    pending.append((self.step, values, norm, self.skipped))
                    done = self.step >= self.total_steps
                    for hook in self.hooks:
                        if (logged := hook.after_step(self.step, done, self)) is not None:
                            self.monitored.setdefault(self.step, {}).update(logged)
                    epoch_end = task.checkpoint_each_epoch and self.step % spe == 0
                    # the last checkpoint comes after the end-of-run check; an epoch's end after its evaluation
                    save = self.step % t.ckpt_every == 0 and not done and not epoch_end
                    if self.step % t.log_every == 0 or done or save or epoch_end:
                        self._flush(pending)
                    if save:
                        last_ckpt = self.save()
                    if epoch_end and not done:
                        if task.eval_every and (self.step // spe) % task.eval_every == 0:
                            task.evaluate(self, final=False)
                        last_ckpt = self.save()
                    for hook in self.hooks:
                        hook.after_checkpoint(self.step, done, self)
                    if done:
                        break
                del batches
            self._flush(pending)
            self._check_trained()
            if task.eval_every:
                task.evaluate(self, final=True)  # the task skips it when this step is evaluated already
            if self.step > start_step:
                last_ckpt = self.save()
            elif self.env.is_main:
                last_ckpt = ckpt_io.find_latest(self.run_dir)
            seconds = time.perf_counter() - start
            task.finish(self)  # e.g. pre-training's exported weights
        finally:
            self.logger.close()
        images = (self.step - start_step) * self.batch_size
        result = RunResult(self.run_dir, self.step, self.skipped, seconds, images / max(seconds, 1e-9),
                           checkpoint=last_ckpt)  # fmt: skip
        if self.env.is_main:
            o = self.cfg.optim  # losses are compared after warm-up (they may rise while the lr ramps up)
            warm = warmup_steps_for(o.warmup_epochs, o.warmup_steps, spe)
            summary = summarize(read_metrics(self.run_dir / "metrics.csv"), self.log_keys, warmup_steps=warm)
            result.losses = summary["losses"]
            print(format_summary(summary, self.step, self.skipped, seconds, result.images_per_s))
        return result


def fit(make_task, cfg, env: DistEnv, resume: str | None = None, batch_size: int | None = None,
        hooks: tuple = (), run_dir: Path | None = None) -> tuple[Trainer, RunResult]:  # fmt: skip
    """Plan the run folder (:func:`plan_checkpoint`), build the task (``make_task(path)``: the
    checkpoint to resume, or ``None``) and the :class:`Trainer`, train; the folder is unlocked at
    the end. A setting the run cannot start with is a :class:`ConfigError`; a run that fails
    before its first step removes what it had begun."""
    try:
        plan = plan_checkpoint(cfg, env, resume, run_dir)
        try:
            trainer = Trainer(make_task(plan[0]), cfg, env, plan, batch_size, hooks, run_dir)
        except ConfigError:
            raise
        except ValueError as err:  # the run cannot start with this config (sizes, folders, data)
            raise ConfigError(str(err)) from err
        try:
            return trainer, trainer.fit()
        except Exception:
            if trainer.step == 0 and env.is_main:  # nothing half-made: see remove_unstarted_outputs
                run_io.remove_unstarted_outputs(trainer.run_dir)
            raise
    finally:
        run_io.unlock_run_dir(run_dir or cfg.train.output_dir)
