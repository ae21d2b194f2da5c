"""Optimisation, loop and distribution configuration (paper values as defaults, Sec. 3.3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hvpmtl.reprs import short_repr

PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
BACKENDS = ("auto", "nccl", "gloo")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_SCOPES = (False, True, "backbone", "model")  # train.compile; true is "backbone"
LOGGERS = ("tensorboard", "wandb", "mlflow")  # metrics.csv is always written
# what the backbone gives a frozen-feature evaluation (hvpmtl.eval.config.FEATURES adds "pixels")
BACKBONE_FEATURES = ("mean", "pooled", "both", "grid")


def _checker(obj, prefix: str):
    def check(ok: bool, name: str, why: str) -> None:
        if not ok:
            key = f"{prefix}.{name}" if prefix else name
            raise ValueError(f"{key}={short_repr(getattr(obj, name))}: {why}")

    return check


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, per optimiser step (paper Sec. 3.3).

    The learning rate rises linearly to ``lr`` over the warm-up (reaching it on its last step)
    and follows a cosine down to ``min_lr`` on the last step of the run. ``weight_decay_end``
    (optional) gives the decayed parameters a cosine weight-decay schedule as in DINO.
    """

    lr: float = 1e-4
    min_lr: float = 1e-7
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # None: constant weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 5.0
    warmup_steps: int = -1  # >= 0 overrides warmup_epochs (useful with train.max_steps)
    clip_grad: float = 5.0  # SimMIM's pre-training clip (global L2 norm); 0 disables
    impl: str = "auto"  # auto (fused where supported, else foreach) | fused | foreach | plain

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.lr > 0, "lr", "must be positive")
        check(0 <= self.min_lr <= self.lr, "min_lr", "must be in [0, lr]")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.weight_decay_end is None or self.weight_decay_end >= 0, "weight_decay_end", "must be >= 0")
        check(all(0 <= b < 1 for b in self.betas), "betas", "must be in [0, 1)")
        check(self.eps > 0, "eps", "must be positive")
        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(self.warmup_steps >= -1, "warmup_steps", "must be >= 0 (or -1: use warmup_epochs)")
        check(self.clip_grad >= 0, "clip_grad", "must be >= 0 (0 disables)")
        check(self.impl in ("auto", "fused", "foreach", "plain"), "impl", "choose auto, fused, foreach or plain")


@dataclass
class WandbConfig:
    """Weights & Biases run settings (``train.loggers`` with ``wandb``; extra ``hvpmtl[wandb]``)."""

    project: str = "hvpmtl"
    entity: str = ""  # "" = your default entity
    run_name: str = ""  # "" = the run folder's name
    mode: str = ""  # "" = wandb's default (WANDB_MODE) | online | offline | disabled
    tags: tuple[str, ...] = ()

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.mode in ("", "online", "offline", "disabled"), "mode", "choose online, offline or disabled")


@dataclass
class MLflowConfig:
    """MLflow run settings (``train.loggers`` with ``mlflow``; extra ``hvpmtl[mlflow]``)."""

    tracking_uri: str = ""  # "" = MLflow's default (MLFLOW_TRACKING_URI, else ./mlruns)
    experiment: str = "hvpmtl"
    run_name: str = ""  # "" = the run folder's name


@dataclass
class TrainConfig:
    """Loop length, precision, logging and checkpoints.

    ``data.batch_size`` is the global batch of one optimiser step; it is split over the
    processes and then over ``accum_steps`` micro-batches.
    """

    epochs: int = 30
    max_steps: int = 0  # > 0: stop after this many optimiser steps (overrides epochs)
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimiser step
    precision: str = "fp32"  # fp32 | bf16 (CPU and CUDA) | fp16 (CUDA, with a GradScaler)
    # torch.compile: false | backbone (true: the student's and the teacher's backbones) | model (the
    # whole forward: backbone passes, heads and losses; recompiles only when a task's phase changes)
    compile: bool | str = False
    seed: int = 0
    output_dir: str = "runs/default"  # downstream commands: empty = a folder beside the evaluated run
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10  # steps between host syncs: progress bar, metrics.csv, TensorBoard
    # steps between measurements of each objective's share of the backbone gradient (grad_share_*
    # in metrics.csv; one extra backward per objective on those steps, not under FSDP); 0 = off
    grad_share_every: int = 100
    # steps between pictures of held-out images (SimMIM reconstructions, label-query attention) into
    # <output_dir>/pictures and TensorBoard, rank 0, eval mode, global RNG untouched; 0 = off
    pictures_every: int = 0
    pictures_count: int = 8  # held-out images per picture
    ckpt_every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_ckpts: int = 2  # step checkpoints kept in <output_dir>/checkpoints (0 keeps all)
    resume: str = ""  # "" | auto (latest checkpoint in output_dir) | path to a checkpoint
    overwrite: bool = False  # replace a previous run's outputs in output_dir (else such a folder is refused)
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    progress: bool = True  # tqdm progress bar on rank 0
    # where the metrics.csv values also go (rank 0; wandb and mlflow are extras, imported only when listed)
    loggers: tuple[str, ...] = ("tensorboard",)  # any of tensorboard, wandb, mlflow; [] = metrics.csv only
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.epochs > 0, "epochs", "must be positive")
        check(0 <= self.seed < 2**63, "seed", "must be in [0, 2**63) (NumPy's and PyTorch's generators)")
        check(self.max_steps >= 0, "max_steps", "must be >= 0 (0: use epochs)")
        check(self.accum_steps >= 1, "accum_steps", "must be >= 1")
        check(self.precision in PRECISIONS, "precision", f"choose one of {', '.join(PRECISIONS)}")
        check(self.compile in COMPILE_SCOPES, "compile", "choose one of false, true (= backbone), backbone, model")
        check(self.device in DEVICES, "device", f"choose one of {', '.join(DEVICES)}")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.grad_share_every >= 0, "grad_share_every", "must be >= 0 (0: off)")
        check(self.pictures_every >= 0, "pictures_every", "must be >= 0 (0: off)")
        check(self.pictures_count >= 1, "pictures_count", "must be >= 1")
        check(self.ckpt_every >= 1, "ckpt_every", "must be >= 1")
        check(self.keep_ckpts >= 0, "keep_ckpts", "must be >= 0")
        check(self.max_bad_steps >= 1, "max_bad_steps", "must be >= 1")
        unknown = [name for name in self.loggers if name not in LOGGERS]
        check(not unknown, "loggers", f"unknown {unknown}; choose from {', '.join(LOGGERS)}")
        check(len(set(self.loggers)) == len(self.loggers), "loggers", "lists a logger twice")


@dataclass
class DistConfig:
    """Data parallelism under torchrun (``WORLD_SIZE`` > 1); ignored in a single process."""

    strategy: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard on blocks and model)
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    sync_bn: bool = True  # BatchNorm statistics over the global batch (the SwAV head's BN)
    timeout_min: int = 30  # process-group timeout

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.strategy in STRATEGIES, "strategy", f"choose one of {', '.join(STRATEGIES)}")
        check(self.backend in BACKENDS, "backend", f"choose one of {', '.join(BACKENDS)}")
        check(self.timeout_min > 0, "timeout_min", "must be positive")


@dataclass
class MonitorConfig:
    """k-NN monitoring during pre-training (``eval.*`` keys of the pre-training config).

    Every ``knn_every`` steps and at the last step (off for runs shorter than ``knn_every``),
    the student's and the teacher's features of the first ``knn_train_images`` train images
    (clean labels) classify the first ``knn_val_images`` val images; the results go to
    metrics.csv and TensorBoard as ``knn_<metric>`` and ``knn_teacher_<metric>``. The numbers
    equal ``hvpmtl knn`` on the same checkpoint with ``train_images``/``eval_images`` set alike.
    """

    knn_every: int = 0  # steps; 0 = off
    knn_train_images: int = 1000
    knn_val_images: int = 500
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_feature: str = "mean"

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.knn_every >= 0, "knn_every", "must be >= 0 (0: off)")
        check(self.knn_train_images > 0 and self.knn_val_images > 0, "knn_train_images", "must be positive")
        check(self.knn_k >= 1, "knn_k", "must be >= 1")
        check(self.knn_temperature > 0, "knn_temperature", "must be positive")
        # the monitor embeds with the backbone: no "pixels"
        check(self.knn_feature in BACKBONE_FEATURES, "knn_feature", f"choose one of {', '.join(BACKBONE_FEATURES)}")
