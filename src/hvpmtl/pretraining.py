"""HVP-MTL pre-training as a :class:`~hvpmtl.engine.task.TrainingTask`, and its extras as hooks.

:func:`pretrain` runs (or resumes) pre-training alone or under torchrun through the engine's one
loop (:func:`hvpmtl.engine.loop.fit`). The task is the model of :func:`hvpmtl.build` on the
pre-training data; the k-NN monitor (``eval.knn_every``), gradient shares
(``train.grad_share_every``), training pictures (``train.pictures_every``) and the test-only
faults (``HVPMTL_FAULT_*``) are step hooks handed to the loop.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from hvpmtl.config import Config
from hvpmtl.engine import checkpoint as ckpt_io
from hvpmtl.engine import loop
from hvpmtl.engine import run_dir as run_io
from hvpmtl.engine.distributed import DistEnv, cleanup_distributed, init_distributed
from hvpmtl.engine.faults import FaultHook, Faults
from hvpmtl.engine.grad_share import grad_share_keys, grad_shares
from hvpmtl.engine.known_counts import KnownCountFeed
from hvpmtl.engine.loader import DeviceFeed, build_pretrain_loader
from hvpmtl.engine.loop import NonFiniteLossError, RunResult, plan_checkpoint  # noqa: F401  (re-exported)
from hvpmtl.engine.task import StepHook, TrainingTask
from hvpmtl.engine.vocabulary import check_resume_classes, write_classes_file


class PretrainTask(TrainingTask):
    """The HVPMTL model of ``cfg`` on the pre-training data. A new run starts from
    ``backbone.pretrained`` / ``pretrained_file`` / ``init_from``; a resumed one (``checkpoint``
    set) from its checkpoint. ``cfg.data.num_classes`` is filled in from the data when unset."""

    name = "pretrain"

    def __init__(self, cfg: Config, env: DistEnv, checkpoint: Path | None = None):
        import hvpmtl
        from hvpmtl.backbones.pretrained import start_source
        from hvpmtl.data import build_pretrain_dataset

        self.cfg, self.env = cfg, env
        self.dataset = build_pretrain_dataset(cfg, "train")
        if cfg.data.num_classes is None:
            cfg.data.num_classes = len(self.dataset.classes)
        self.class_names = list(getattr(self.dataset, "classes", None) or []) or None  # logit k = class_names[k]
        torch.manual_seed(cfg.train.seed)  # the initial weights depend on train.seed only
        self.model = hvpmtl.build(cfg, cfg.data.num_classes, init_weights=checkpoint is None).to(env.device)
        if checkpoint is None and env.is_main and (start := start_source(cfg.backbone)) is not None:
            print(f"backbone starts from {start}")
        weights = self.model.weights
        self.tasks = list(weights)
        self.loss_keys = tuple(f"loss_{k}" for k in self.tasks) + self.model.logged_extras
        self.summed_losses = {k: weights[k.removeprefix("loss_")] for k in sorted(self.model.summed_losses)}
        self.total_of = {f"loss_{k}": w for k, w in weights.items()}
        self.exported: dict[str, Path] = {}

    def data(self, cfg, env: DistEnv):
        loader, sampler = build_pretrain_loader(self.dataset, cfg, env)
        # partly tagged data: MLC's means count the known tags of the whole global batch
        return loader, sampler, KnownCountFeed(DeviceFeed(cfg, env.device), cfg.train.accum_steps, env)

    def loss(self, model, batch, step: int) -> dict:
        return model(batch)

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.model.param_groups(weight_decay)

    def compile(self, mode) -> None:
        if mode == "model":
            self.model.compile_forward(retain_graph=self.cfg.train.grad_share_every > 0)
        else:  # true or "backbone"
            self.model.backbone.compile()
            if self.model.teacher is not None:
                self.model.teacher["backbone"].compile()

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def before_step(self, step: int) -> None:
        self.model.before_step()  # e.g. SwAV's frozen prototypes: no gradient, so no AdamW step

    def after_step(self, step: int) -> None:
        self.model.after_step()  # EMA teacher, prototypes back on the sphere

    def check_resume(self, state: dict, path: Path, env: DistEnv) -> None:
        warning = check_resume_classes(state.get("class_names"), self.class_names, path)  # ValueError if other
        if warning and env.is_main:
            print(warning)

    def write_run_files(self, run_dir: Path, overwrite: bool) -> None:
        # finetune-*/ detect-*/ segment-*/ trained from the weights being replaced
        if overwrite and (gone := run_io.remove_downstream_runs(run_dir)):
            print(f"train.overwrite=true: removed the replaced run's downstream folders: {', '.join(gone)}")
        if self.class_names is not None:
            write_classes_file(run_dir, self.class_names)

    def state_dict(self) -> dict:
        return {"class_names": self.class_names}

    def finish(self, trainer) -> None:
        self.exported = ckpt_io.export_weights(
            trainer.run_dir, trainer.model, trainer._config(), trainer.env, self.class_names
        )


class GradShareHook(StepHook):
    """``train.grad_share_every``: each task's share of the backbone gradient, measured on the
    first micro-batch of every N-th step (not under FSDP)."""

    def __init__(self, task: PretrainTask, every: int):
        self.task, self.every = task, every
        self.keys = tuple(grad_share_keys(task.tasks))

    def after_forward(self, out: dict, step: int, micro: int, trainer) -> dict:
        if micro == 0 and (step + 1) % self.every == 0:
            shards = trainer.env.world_size * trainer.cfg.train.accum_steps
            terms = {}
            for t in self.task.tasks:
                key = f"loss_{t}"
                term = self.task.model.weights[t] * out[key] * (shards if key in self.task.summed_losses else 1)
                terms[t] = trainer.scaler.scale(term) if trainer.scaler is not None else term
            params = [p for p in self.task.model.backbone.parameters() if p.requires_grad]
            trainer.monitored.setdefault(step + 1, {}).update(grad_shares(terms, params, trainer.env))
        return out


class MonitorHook(StepHook):
    """``eval.knn_every``: the k-NN monitor of :mod:`hvpmtl.eval.monitor` every N steps and at the end."""

    def __init__(self, monitor, every: int):
        self.monitor, self.every, self.keys = monitor, every, monitor.keys

    def after_step(self, step: int, done: bool, trainer) -> dict | None:
        if step % self.every == 0 or done:
            return self.monitor(trainer.inner, sharded=not trainer.fsdp)
        return None


class PicturesHook(StepHook):
    """``train.pictures_every``: reconstructions and attention pictures (rank 0, off under FSDP)."""

    def __init__(self, every: int):
        self.every, self.pictures = every, None

    def start(self, trainer) -> None:
        from hvpmtl.viz.pictures import training_pictures

        tb = getattr(trainer.logger, "tb", None)
        self.pictures = training_pictures(trainer.cfg, trainer.env, trainer.run_dir, tb, trainer.total_steps,
                                          trainer.fsdp)  # fmt: skip

    def after_step(self, step: int, done: bool, trainer) -> None:
        if self.pictures is not None and (step % self.every == 0 or done):
            self.pictures(trainer.inner, step)


def _grad_share_hook(trainer) -> StepHook | None:
    every, task = trainer.cfg.train.grad_share_every, trainer.task
    if not (0 < every <= trainer.total_steps and len(task.tasks) > 1):
        return None
    if trainer.fsdp:
        if trainer.env.is_main:
            print("warning: train.grad_share_every: gradient shares are not measured under FSDP")
        return None
    return GradShareHook(task, every)


def _monitor_hook(trainer) -> StepHook | None:
    every = trainer.cfg.eval.knn_every
    if not 0 < every <= trainer.total_steps:  # off for runs shorter than one period: it would never run
        return None
    from hvpmtl.eval.monitor import KNNMonitor

    try:
        return MonitorHook(KNNMonitor(trainer.cfg, trainer.env, teacher=trainer.inner.teacher is not None), every)
    except (ValueError, FileNotFoundError) as err:  # e.g. a manifest without data.val_manifest
        if trainer.env.is_main:
            print(f"warning: eval.knn_every={every}: k-NN monitor off ({err})")
        return None


def pretraining_hooks() -> tuple:
    """The hook factories of a pre-training run, in the order they run (and their columns log)."""
    return (lambda trainer: FaultHook(Faults.from_env()), _grad_share_hook, _monitor_hook,
            lambda trainer: PicturesHook(trainer.cfg.train.pictures_every))  # fmt: skip


class Trainer(loop.Trainer):
    """The engine's :class:`~hvpmtl.engine.loop.Trainer` on a :class:`PretrainTask` of ``cfg``
    (its run folder planned and locked as :func:`pretrain` does)."""

    def __init__(self, cfg: Config, env: DistEnv, resume: str | None = None):
        cfg = copy.deepcopy(cfg)
        plan = plan_checkpoint(cfg, env, resume)
        super().__init__(PretrainTask(cfg, env, plan[0]), cfg, env, plan, hooks=pretraining_hooks())


def pretrain(cfg: Config, resume: str | None = None) -> RunResult:
    """Run (or continue) pre-training as ``cfg`` describes; works alone and under torchrun."""
    env = init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_min)
    try:
        cfg = copy.deepcopy(cfg)
        trainer, result = loop.fit(lambda path: PretrainTask(cfg, env, path), cfg, env, resume,
                                   hooks=pretraining_hooks())  # fmt: skip
        result.backbone = trainer.task.exported.get("backbone")
        if env.is_main:
            from hvpmtl.data import skipped_images_summary

            if (skipped_line := skipped_images_summary(trainer.run_dir)) is not None:
                print(skipped_line)
            print(f"run folder: {trainer.run_dir}")
        return result
    finally:
        cleanup_distributed()
