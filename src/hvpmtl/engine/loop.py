"""The pre-training loop: AdamW, per-step schedules, clipping, accumulation, AMP, EMA teacher.

One optimiser step (paper Sec. 3.3, SimMIM's clip, ALBEF's EMA): for each of ``accum_steps``
micro-batches, forward under autocast and backward; ``model.before_step()`` (SwAV's frozen
prototypes lose their gradient); clip the global gradient norm; if the loss
and the gradient are finite, step AdamW and then the EMA teacher (``model.after_step()``),
otherwise skip both, put the buffers back (BatchNorm statistics) and count the step. Per-step
values stay on the device and are read back once per ``train.log_every`` steps; the only
per-step host sync is the finite/non-finite flag. A run that ends with no successful step or
with non-finite weights raises instead of exporting them (``engine/guards.py``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import hvpmtl
from hvpmtl.backbones.pretrained import start_source
from hvpmtl.config import Config, ConfigError, save_config, to_dict
from hvpmtl.engine import checkpoint as ckpt_io
from hvpmtl.engine import run_dir as run_io
from hvpmtl.engine.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    gradient_sync,
    init_distributed,
    is_fsdp,
    unwrap,
    wrap_model,
)
from hvpmtl.engine.faults import Faults, SimulatedCrash  # noqa: F401  (SimulatedCrash: re-export)
from hvpmtl.engine.grad_share import grad_share_keys, grad_shares
from hvpmtl.engine.guards import BufferSnapshot, untrained_reason
from hvpmtl.engine.loader import DeviceFeed, build_pretrain_loader
from hvpmtl.engine.loggers import check_loggers
from hvpmtl.engine.metrics import MetricsLogger, format_summary, read_metrics, summarize
from hvpmtl.engine.optim import build_optimizer
from hvpmtl.engine.schedules import warmup_cosine, warmup_steps_for
from hvpmtl.engine.vocabulary import check_resume_classes, write_classes_file


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient, or the run ended with no
    successful step or with non-finite weights (then nothing is exported)."""


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


def pretrain(cfg: Config, resume: str | None = None) -> RunResult:
    """Run (or continue) pre-training as ``cfg`` describes; works alone and under torchrun."""
    env = init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_min)
    try:
        try:
            trainer = Trainer(cfg, env, resume)
        except ConfigError:
            raise
        except ValueError as err:  # the run cannot start with this config (sizes, folders, data)
            raise ConfigError(str(err)) from err
        try:
            return trainer.fit()
        except Exception:
            if trainer.step == 0 and env.is_main:  # nothing half-made: see remove_unstarted_outputs
                run_io.remove_unstarted_outputs(trainer.run_dir)
            raise
    finally:
        run_io.unlock_run_dir(cfg.train.output_dir)
        cleanup_distributed()


class Trainer:
    """Builds data, model, optimiser and schedules from a config; :meth:`fit` trains."""

    def __init__(self, cfg: Config, env: DistEnv, resume: str | None = None):
        cfg = copy.deepcopy(cfg)
        t = cfg.train
        self.cfg, self.env = cfg, env
        if not t.output_dir:
            raise ValueError("train.output_dir: must not be empty")
        self.run_dir = Path(t.output_dir)
        if t.precision == "fp16" and env.device.type != "cuda":
            raise ValueError("train.precision=fp16 needs CUDA (its GradScaler); use bf16 or fp32 on CPU")
        check_loggers(t.loggers)  # a missing tracker package stops the run before anything is written
        ckpt_path = self._checkpoint_to_resume(resume or t.resume)

        from hvpmtl.data import build_pretrain_dataset

        self.dataset = build_pretrain_dataset(cfg, "train")
        if cfg.data.num_classes is None:
            cfg.data.num_classes = len(self.dataset.classes)
        self.class_names = list(getattr(self.dataset, "classes", None) or []) or None  # logit k = class_names[k]
        torch.manual_seed(t.seed)  # the initial weights depend on train.seed only
        # a new run starts from backbone.pretrained / pretrained_file / init_from; a resumed one from its checkpoint
        model = hvpmtl.build(cfg, cfg.data.num_classes, init_weights=ckpt_path is None).to(env.device)
        if ckpt_path is None and env.is_main and (start := start_source(cfg.backbone)) is not None:
            print(f"backbone starts from {start}")
        if t.compile == "model":
            model.compile_forward(retain_graph=t.grad_share_every > 0)
        elif t.compile:  # true or "backbone"
            model.backbone.compile()
            if model.teacher is not None:
                model.teacher["backbone"].compile()
        torch.manual_seed(t.seed + env.rank)  # per-rank stream for dropout / drop path
        self.model = wrap_model(model, env, cfg.dist.strategy, cfg.dist.sync_bn)
        self.inner = unwrap(self.model)
        self.fsdp = is_fsdp(self.model)
        self.optimizer = build_optimizer(self.inner, cfg.optim, env.device)
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None

        self.loader, self.sampler = build_pretrain_loader(self.dataset, cfg, env)
        self.feed = DeviceFeed(cfg, env.device)
        spe = self.sampler.steps_per_epoch
        self.total_steps = t.max_steps if t.max_steps > 0 else t.epochs * spe
        warm = warmup_steps_for(cfg.optim.warmup_epochs, cfg.optim.warmup_steps, spe)
        o = cfg.optim
        self.lr = warmup_cosine(o.lr, o.min_lr, self.total_steps, warm)
        wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
        self.wd = warmup_cosine(o.weight_decay, wd_end, self.total_steps, 0)

        # which logged values are per-image sums (add over ranks) rather than means
        self.tasks = list(self.inner.weights)
        self.keys = tuple(f"loss_{k}" for k in self.tasks) + self.inner.logged_extras
        self.sum_keys = self.inner.summed_losses

        self.monitor = None  # off for runs shorter than one monitoring period: it would never run
        if 0 < cfg.eval.knn_every <= self.total_steps:
            from hvpmtl.eval.monitor import KNNMonitor

            try:
                self.monitor = KNNMonitor(cfg, env, teacher=self.inner.teacher is not None)
            except (ValueError, FileNotFoundError) as err:  # e.g. a manifest without data.val_manifest
                if env.is_main:
                    print(f"warning: eval.knn_every={cfg.eval.knn_every}: k-NN monitor off ({err})")
        self.monitored: dict[int, dict] = {}  # step -> k-NN results and gradient shares, logged with its row
        every = cfg.train.grad_share_every
        self.share_every = every if 0 < every <= self.total_steps and len(self.tasks) > 1 and not self.fsdp else 0
        if 0 < every <= self.total_steps and len(self.tasks) > 1 and self.fsdp and env.is_main:
            print("warning: train.grad_share_every: gradient shares are not measured under FSDP")
        self.share_keys = tuple(grad_share_keys(self.tasks)) if self.share_every else ()
        self.log_keys = ("loss", *self.keys, *self.share_keys, *(self.monitor.keys if self.monitor else ()))

        self.step, self.skipped, self.bad_streak = 0, 0, 0
        self.faults = Faults.from_env()  # test-only: HVPMTL_FAULT_* (engine/faults.py)
        if ckpt_path is not None:
            self._resume(ckpt_path)
        overwrite, t.overwrite = t.overwrite, False  # a one-off: the saved config must not carry it
        if env.is_main:
            run_io.open_run_dir(self.run_dir, overwrite)
            # finetune-*/ detect-*/ segment-*/ trained from the weights being replaced
            if overwrite and (gone := run_io.remove_downstream_runs(self.run_dir)):
                print(f"train.overwrite=true: removed the replaced run's downstream folders: {', '.join(gone)}")
            save_config(cfg, self.run_dir / "config.yaml")
            if self.class_names is not None:
                write_classes_file(self.run_dir, self.class_names)
            run_io.record_environment(self.run_dir, self.step, run_io.environment(env.world_size, env.device))
        barrier(env)
        self.logger = MetricsLogger(
            self.run_dir, self.log_keys, self.total_steps, self.step, cfg.data.batch_size,
            enabled=env.is_main, progress=t.progress, loggers=t.loggers, settings=t, config=to_dict(cfg),
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------
    def _checkpoint_to_resume(self, resume: str) -> Path | None:
        """Rank 0 checks and locks the run folder and picks (and loads) the checkpoint, as
        :func:`run_dir.plan_run` says (a shared file system may show files late); it tells the others."""
        path, self._resume_state = run_io.choose_checkpoint(self.run_dir, resume, self.cfg.train.overwrite, self.env)
        return path

    def _resume(self, path: Path) -> None:
        state, self._resume_state = self._resume_state or ckpt_io.load_checkpoint(path), None
        warning = check_resume_classes(state.get("class_names"), self.class_names, path)  # ValueError if other
        if warning and self.env.is_main:
            print(warning)
        changed = run_io.changed_config_keys(state.get("config", {}), to_dict(self.cfg))
        ckpt_io.check_fits(state["model"], self.model, path, changed)
        if changed and self.env.is_main:
            changes = run_io.describe_changes(state.get("config", {}), to_dict(self.cfg), changed)
            print(f"warning: resuming {path} with a changed config: {changes}")
        ckpt_io.restore(state, self.model, self.optimizer, self.scaler, self.env)
        self.step, self.skipped = int(state["step"]), int(state.get("skipped_steps", 0))
        self.bad_streak = int(state.get("bad_streak", 0))
        if self.env.is_main:
            print(f"resumed from {path} at step {self.step}")

    def _save(self) -> Path:
        path = ckpt_io.checkpoint_path(self.run_dir, self.step)
        spe = self.sampler.steps_per_epoch
        loop_state = {
            "step": self.step, "epoch": self.step // spe, "step_in_epoch": self.step % spe,
            "skipped_steps": self.skipped, "bad_streak": self.bad_streak, "class_names": self.class_names,
        }  # fmt: skip
        ckpt_io.save_checkpoint(path, self.model, self.optimizer, self.scaler, loop_state, to_dict(self.cfg), self.env)
        if self.env.is_main:
            ckpt_io.prune_checkpoints(self.run_dir, self.cfg.train.keep_ckpts)
        return path

    # ------------------------------------------------------------------------------------------
    def _objective(self, out: dict) -> torch.Tensor:
        """The loss to back-propagate so that averaging gradients over ranks and summing them over
        micro-batches gives the gradient of one process on the whole global batch: mean-reduced
        losses are divided by ``accum_steps``; image-summed losses (``model.summed_losses``) are
        multiplied by the number of ranks instead (a global sum is the sum of the local sums)."""
        loss = out["loss"]
        shards = self.env.world_size * self.cfg.train.accum_steps
        for key in self.sum_keys:
            loss = loss + (shards - 1) * self.inner.weights[key.removeprefix("loss_")] * out[key]
        return loss / self.cfg.train.accum_steps

    def _grad_shares(self, out: dict) -> dict[str, float]:
        """:func:`grad_shares` of each task's term of :meth:`_objective`, on this micro-batch."""
        shards = self.env.world_size * self.cfg.train.accum_steps
        terms = {}
        for t in self.tasks:
            term = self.inner.weights[t] * out[f"loss_{t}"] * (shards if f"loss_{t}" in self.sum_keys else 1)
            terms[t] = self.scaler.scale(term) if self.scaler is not None else term
        return grad_shares(terms, [p for p in self.inner.backbone.parameters() if p.requires_grad], self.env)

    def _micro_factors(self) -> torch.Tensor:
        a = self.cfg.train.accum_steps
        return torch.tensor([1.0 if k in self.sum_keys else 1.0 / a for k in self.keys], device=self.env.device)

    def _train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor, bool]:
        t, dev = self.cfg.train, self.env.device
        for g in self.optimizer.param_groups:
            g["lr"] = float(self.lr[self.step])
            g["weight_decay"] = float(self.wd[self.step]) * g.get("wd_scale", 1.0)
        amp = torch.autocast(dev.type, dtype=torch.bfloat16 if t.precision == "bf16" else torch.float16,
                             enabled=t.precision != "fp32")  # fmt: skip
        values = torch.zeros(len(self.keys), device=dev)
        factors = self._micro_factors()
        bad = torch.zeros((), device=dev)
        buffers = BufferSnapshot(self.inner)  # BatchNorm statistics etc., put back if the step is skipped
        for a in range(t.accum_steps):
            batch = self.feed.next(batches, self.step)
            with gradient_sync(self.model, a == t.accum_steps - 1):
                with amp:
                    out = self.model(batch)
                    out = self.faults.poison(out, self.step)
                    loss = self._objective(out)
                if a == 0 and self.share_every and (self.step + 1) % self.share_every == 0:
                    self.monitored.setdefault(self.step + 1, {}).update(self._grad_shares(out))
                (self.scaler.scale(loss) if self.scaler else loss).backward()  # outside autocast
            values += torch.stack([out[k].detach().float() for k in self.keys]) * factors
            bad += (~torch.isfinite(loss.detach())).float()
        self.inner.before_step()  # e.g. SwAV's frozen prototypes: no gradient, so no AdamW step
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
                stepped = self.scaler.get_scale() >= scale
            else:
                self.optimizer.step()
                stepped = True
            if stepped:
                self.inner.after_step()
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
        rate = len(pending) * self.cfg.data.batch_size / max(now - self._last_flush, 1e-9)
        self._last_flush = now
        spe = self.sampler.steps_per_epoch
        rows = []
        for (step, _, _, skipped), v, n in zip(pending, vals, norms):
            row = dict(zip(self.keys, v))
            row.update(self.monitored.pop(step, {}))
            row["loss"] = sum(self.inner.weights[k] * row[f"loss_{k}"] for k in self.tasks)
            row.update(step=step, epoch=round(step / spe, 4), lr=float(self.lr[step - 1]),
                       wd=float(self.wd[step - 1]), grad_norm=n, img_per_s=rate, skipped_steps=skipped)  # fmt: skip
            rows.append(row)
        self.logger.log(rows)
        pending.clear()
        return rate

    # ------------------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        t, spe = self.cfg.train, self.sampler.steps_per_epoch
        start_step, start = self.step, time.perf_counter()
        self._last_flush = start
        pending: list = []
        last_ckpt = None
        self.model.train()
        from hvpmtl.viz.pictures import training_pictures  # train.pictures_every (rank 0, off under FSDP)

        pictures = training_pictures(self.cfg, self.env, self.run_dir, getattr(self.logger, "tb", None),
                                     self.total_steps, self.fsdp)  # fmt: skip
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
                            raise NonFiniteLossError(
                                f"{self.bad_streak} consecutive steps had a non-finite loss or gradient "
                                f"(train.max_bad_steps={t.max_bad_steps}), last at step {self.step}; "
                                "lower optim.lr, use train.precision=fp32, or check the data"
                            )
                    else:
                        self.bad_streak = 0
                    pending.append((self.step, values, norm, self.skipped))
                    done = self.step >= self.total_steps
                    every = self.cfg.eval.knn_every
                    if self.monitor is not None and (self.step % every == 0 or done):
                        self.monitored.setdefault(self.step, {}).update(self.monitor(self.inner, sharded=not self.fsdp))
                    if pictures is not None and (self.step % t.pictures_every == 0 or done):
                        pictures(self.inner, self.step)
                    if self.step % t.log_every == 0 or done or self.step % t.ckpt_every == 0:
                        self._flush(pending)
                    if self.step % t.ckpt_every == 0 and not done:  # the last one after the check below
                        last_ckpt = self._save()
                    self.faults.crash_after(self.step, done)
                    if done:
                        break
                del batches
            self._flush(pending)
            if (problem := untrained_reason(self.inner, self.step, self.skipped, self.env)) is not None:
                raise NonFiniteLossError(problem)
            if self.step > start_step:
                last_ckpt = self._save()
            elif self.env.is_main:
                last_ckpt = ckpt_io.find_latest(self.run_dir)
            seconds = time.perf_counter() - start
            paths = ckpt_io.export_weights(self.run_dir, self.model, to_dict(self.cfg), self.env, self.class_names)
        finally:
            self.logger.close()
        images = (self.step - start_step) * self.cfg.data.batch_size
        result = RunResult(self.run_dir, self.step, self.skipped, seconds, images / max(seconds, 1e-9),
                           checkpoint=last_ckpt, backbone=paths.get("backbone"))  # fmt: skip
        if self.env.is_main:
            summary = summarize(read_metrics(self.run_dir / "metrics.csv"), self.log_keys)
            result.losses = summary["losses"]
            print(format_summary(summary, self.step, self.skipped, seconds, result.images_per_s))
            from hvpmtl.data import skipped_images_summary
            if (skipped_line := skipped_images_summary(self.run_dir)) is not None:
                print(skipped_line)
            print(f"run folder: {self.run_dir}")
        return result
