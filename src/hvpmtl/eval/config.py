"""Configs of the downstream commands: typed dataclasses, presets in ``configs/<command>/``.

Each command has one root config (``FeatureEvalConfig`` for ``knn`` and ``linprobe``,
``FinetuneRunConfig``, ``DetectRunConfig``, ``SegmentRunConfig``, ``MLCHeadEvalConfig`` for
``mlc-head``) read like the pre-training config: defaults <- the evaluated run's data block <-
preset <- ``key=value`` overrides.
Defaults are the values of the protocol each command follows (DINO's k-NN, SimMIM's
fine-tuning, Mask R-CNN 1x, UperNet 160k); the CPU presets shrink them to minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from hvpmtl.data.config import DataConfig
from hvpmtl.engine.config import (
    BACKBONE_FEATURES,
    DistConfig,
    MonitorConfig,  # noqa: F401  (re-export: the ``eval.*`` block of hvpmtl.config lives in engine.config)
    OptimConfig,
    TrainConfig,
    _checker,
)

PRESET_ROOT = Path(__file__).resolve().parents[1] / "configs"
FEATURES = (*BACKBONE_FEATURES, "pixels")
COMMANDS = ("finetune", "detect", "segment")


@dataclass
class RuntimeConfig:
    """Where and how frozen features are computed."""

    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast during feature extraction)
    batch_size: int = 256  # images per forward pass (per process)
    num_workers: int = 1
    seed: int = 0
    progress: bool = True
    output_dir: str = ""  # where results go; empty = <run folder>/eval

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.device in ("auto", "cpu", "cuda"), "device", "choose auto, cpu or cuda")
        check(self.precision in ("fp32", "bf16"), "precision", "choose fp32 or bf16")
        check(self.batch_size > 0, "batch_size", "must be positive")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")


@dataclass
class KNNConfig:
    """Weighted k-NN on frozen features (DINO: cosine similarity, votes ``exp(s / T)``)."""

    k: int = 20
    temperature: float = 0.07
    feature: str = "mean"  # mean (of the feature map) | pooled (class token) | both | grid | pixels

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.k >= 1, "k", "must be >= 1")
        check(self.temperature > 0, "temperature", "must be positive")
        check(self.feature in FEATURES, "feature", f"choose one of {', '.join(FEATURES)}")


@dataclass
class ProbeConfig:
    """Linear classifier on frozen, standardised features (logistic regression).

    Each setting is fitted on the train split minus a held-out ``holdout`` fraction and scored
    there; the best is refitted on the whole train split and scored once on the evaluation
    split. ``lbfgs`` sweeps ``weight_decays`` (an L2 penalty; its line search sets the step);
    ``adamw`` sweeps ``lrs`` x ``weight_decays``.
    """

    # mean | pooled | both | grid (both + the map averaged over 2 x 2 cells) | pixels (raw pixels:
    # logistic regression). "both" (feature-map mean and class token side by side) measured best
    # of the first three on both built-in sets, for every backbone (docs/results.md); "grid" scores
    # higher but lifts random init most (docs/journal/benchmarks.md, "Ten CPU minutes")
    feature: str = "both"
    optimizer: str = "lbfgs"  # lbfgs | adamw (full batch)
    epochs: int = 100  # L-BFGS iterations or AdamW steps
    lrs: list[float] = field(default_factory=lambda: [1e-2, 1e-1])  # adamw only
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2])
    holdout: float = 0.1  # fraction of the train split used to choose the setting

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.feature in FEATURES, "feature", f"choose one of {', '.join(FEATURES)}")
        check(self.optimizer in ("lbfgs", "adamw"), "optimizer", "choose lbfgs or adamw")
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(bool(self.lrs) and min(self.lrs) > 0, "lrs", "needs at least one positive value")
        check(bool(self.weight_decays) and min(self.weight_decays) >= 0, "weight_decays", "needs values >= 0")
        check(0 < self.holdout < 1, "holdout", "must be in (0, 1)")


@dataclass
class FeatureEvalConfig:
    """``hvpmtl knn`` and ``hvpmtl linprobe``: train split = k-NN bank / probe training set,
    ``eval_split`` = queries / test set."""

    data: DataConfig = field(default_factory=DataConfig)
    eval_split: str = "val"  # val | test
    train_images: int = 0  # use the first N images of the train split; 0 = all
    eval_images: int = 0  # use the first N images of the evaluation split; 0 = all
    knn: KNNConfig = field(default_factory=KNNConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    run: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.eval_split in ("val", "test"), "eval_split", "choose val or test")
        check(self.train_images >= 0 and self.eval_images >= 0, "train_images", "must be >= 0 (0: all)")


@dataclass
class FinetuneConfig:
    """SimMIM/BEiT fine-tuning recipe (SimMIM's ViT-B and Swin-B configs as defaults)."""

    layer_decay: float = 0.65  # per-block lr factor (SimMIM: 0.65 ViT-B, 0.9 Swin-B); 1 = off
    drop_path: float = 0.1
    global_pool: str = "avg"  # avg (mean of the final normed tokens, SimMIM) | token (class token)
    label_smoothing: float = 0.1  # single-label only
    mixup: float = 0.8  # Mixup alpha (timm); 0 = off
    cutmix: float = 1.0  # CutMix alpha (timm); 0 = off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm policy string; "" = off
    color_jitter: float = 0.4
    reprob: float = 0.25  # random erasing probability
    crop_scale: tuple[float, float] = (0.08, 1.0)
    ema: bool = False  # evaluate an EMA of the weights too (timm ModelEmaV3)
    ema_decay: float = 0.9999
    eval_every: int = 1  # epochs between evaluations (and the last epoch)
    multi_label: str = "auto"  # auto (from the labels) | true | false

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(0 < self.layer_decay <= 1, "layer_decay", "must be in (0, 1]")
        check(0 <= self.drop_path < 1, "drop_path", "must be in [0, 1)")
        check(self.global_pool in ("avg", "token"), "global_pool", "choose avg or token")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        check(self.mixup >= 0 and self.cutmix >= 0, "mixup", "alphas must be >= 0")
        check(0 <= self.reprob <= 1, "reprob", "is a probability")
        check(0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1)")
        check(self.eval_every >= 1, "eval_every", "must be >= 1")
        check(self.multi_label in ("auto", "true", "false"), "multi_label", "choose auto, true or false")


def _finetune_optim() -> OptimConfig:
    # SimMIM: base lr 1.25e-3 per 512 images, 20 warm-up epochs, min lr 2.5e-7, clip 5
    return OptimConfig(lr=2.5e-3, min_lr=5e-7, weight_decay=0.05, warmup_epochs=20.0, clip_grad=5.0)


def _finetune_train() -> TrainConfig:
    return TrainConfig(epochs=100, output_dir="", log_every=20, ckpt_every=1000, resume="auto", grad_share_every=0)


# Keys of the shared blocks that the training loop cannot apply to a downstream task (hvpmtl.eval.downstream),
# and why: a value other than the command's default stops finetune, detect and segment instead of being ignored
LOOP_IGNORES = {
    "train.grad_share_every": "gradient shares are pre-training's (one share per pre-training task)",
    "train.pictures_every": "training pictures are pre-training's",
    "train.pictures_count": "training pictures are pre-training's",
    "dist.strategy": "downstream evaluation shards the data over the processes, which FSDP's collective "
    "forward cannot follow; downstream models fit one device: DDP",
}


def _text(value) -> str:
    """A value as it is written on the command line (``true``, ``[wandb]``, ``fsdp``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return str(value)


def _differences(value, default, key: str) -> list[tuple[str, object]]:
    """``(dotted key, value)`` of each leaf of ``value`` (a dataclass block or a value) that differs."""
    if is_dataclass(value):
        return [d for f in fields(value) for d in
                _differences(getattr(value, f.name), getattr(default, f.name), f"{key}.{f.name}")]  # fmt: skip
    return [] if value == default else [(key, value)]


def check_loop_keys(cfg, command: str, prefix: str = "") -> None:
    """Raise ``ValueError`` (one line) for the first key of :data:`LOOP_IGNORES` that differs from
    ``command``'s default: set, but the downstream loop would ignore it."""
    default = type(cfg)()
    for key, why in LOOP_IGNORES.items():
        block, name = key.split(".")
        got = getattr(getattr(cfg, block), name)
        for dotted, value in _differences(got, getattr(getattr(default, block), name), key):
            where = f"{prefix}.{dotted}" if prefix else dotted
            raise ValueError(f"{where}={_text(value)} has no effect in {command} ({why}); remove it")
    compile_ = cfg.train.compile
    key = f"{prefix}.train.compile" if prefix else "train.compile"
    if compile_ and command == "detect":
        raise ValueError(f"{key}={_text(compile_)}: detect does not compile torchvision's Mask R-CNN (it takes lists "
                         "of images of any size, for which dynamo would recompile again and again); remove it")
    if compile_ == "backbone":
        raise ValueError(f"{key}=backbone: {command} compiles its whole model (backbone and head); "
                         "use train.compile=true or model")


@dataclass
class HeadRunConfig:
    """Where ``hvpmtl mlc-head`` scores the head."""

    device: str = "auto"  # auto | cpu | cuda
    batch_size: int = 128  # images per forward pass
    output_dir: str = ""  # where results go; empty = <run folder>/eval

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.device in ("auto", "cpu", "cuda"), "device", "choose auto, cpu or cuda")
        check(self.batch_size > 0, "batch_size", "must be positive")


@dataclass
class MLCHeadEvalConfig:
    """``hvpmtl mlc-head``: the pre-trained MLC head on the first ``eval_images`` images of
    ``eval_split``. ``train`` scores it on its own training images: a head near chance there too
    has not fitted its data, rather than failed to carry over to new images."""

    data: DataConfig = field(default_factory=DataConfig)
    eval_split: str = "val"  # train | val | test
    eval_images: int = 0  # the first N images of eval_split; 0 = all
    run: HeadRunConfig = field(default_factory=HeadRunConfig)

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.eval_split in ("train", "val", "test"), "eval_split", "choose train, val or test")
        check(self.eval_images >= 0, "eval_images", "must be >= 0 (0: all)")


@dataclass
class FinetuneRunConfig:
    """``hvpmtl finetune``: the whole backbone plus a new linear head, on ``data``'s train split."""

    data: DataConfig = field(default_factory=DataConfig)
    eval_split: str = "val"
    train_images: int = 0  # train on the first N images of the train split; 0 = all
    eval_images: int = 0  # evaluate on the first N images of the evaluation split; 0 = all
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=_finetune_optim)
    train: TrainConfig = field(default_factory=_finetune_train)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.eval_split in ("val", "test"), "eval_split", "choose val or test")
        check(self.train_images >= 0 and self.eval_images >= 0, "train_images", "must be >= 0 (0: all)")
        check_loop_keys(self, "finetune", prefix)


@dataclass
class DetectConfig:
    """Mask R-CNN (torchvision) on the backbone's feature pyramid; COCO-format data.

    ``root`` holds ``annotations/instances_<split>.json`` and the images of ``<split>/``; empty
    = the built-in data (``data.*``) exported to COCO format under the output folder first.
    """

    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    img_size: int = 0  # padded square input side; 0 = the backbone's img_size
    min_size: list[int] = field(default_factory=list)  # shorter side(s) when resizing; [] = img_size
    fpn_channels: int = 256
    pyramid: str = "auto"  # auto (Swin: its 4 stages; ViT: simple feature pyramid) | simple
    box_score_thresh: float = 0.05
    detections_per_img: int = 100
    hflip: float = 0.5
    eval_every: int = 1  # epochs between evaluations (and the last one)

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.img_size >= 0, "img_size", "must be >= 0 (0: the backbone's)")
        check(self.fpn_channels > 0, "fpn_channels", "must be positive")
        check(all(m > 0 for m in self.min_size), "min_size", "sizes must be positive")
        check(self.pyramid in ("auto", "simple"), "pyramid", "choose auto or simple")
        check(self.eval_every >= 1, "eval_every", "must be >= 1")


@dataclass
class SegmentConfig:
    """UperNet (segmentation-models-pytorch's decoder) on the backbone's feature pyramid.

    ``root`` is an ADE20K-layout folder: ``images/{training,validation}/*.jpg`` and
    ``annotations/{training,validation}/*.png`` (class-index PNGs); empty = the built-in data's
    masks exported in that layout under the output folder first.
    """

    root: str = ""
    train_split: str = "training"
    val_split: str = "validation"
    num_classes: int = 0  # 0 = from the data (built-in: background + its classes)
    reduce_zero_label: bool = False  # ADE20K: label 0 is "other" and ignored, 1..150 -> 0..149
    ignore_index: int = 255
    img_size: int = 0  # square training crop; 0 = the backbone's img_size
    decoder_channels: int = 512
    dropout: float = 0.1  # before the classifier (mmseg's UperNet head)
    scale_range: tuple[float, float] = (0.5, 2.0)  # random rescale of the training images (mmseg)
    pyramid: str = "auto"
    hflip: float = 0.5
    eval_every: int = 1  # epochs between evaluations (and the last one)

    def validate(self, prefix: str = "") -> None:
        check = _checker(self, prefix)
        check(self.num_classes >= 0, "num_classes", "must be >= 0 (0: from the data)")
        check(self.img_size >= 0, "img_size", "must be >= 0 (0: the backbone's)")
        check(self.pyramid in ("auto", "simple"), "pyramid", "choose auto or simple")
        check(self.eval_every >= 1, "eval_every", "must be >= 1")


def _detect_optim() -> OptimConfig:
    # Swin's Mask R-CNN 1x: AdamW lr 1e-4, wd 0.05, linear warm-up 500 iterations
    return OptimConfig(lr=1e-4, min_lr=1e-6, weight_decay=0.05, warmup_steps=500, clip_grad=0.0)


@dataclass
class DetectRunConfig:
    """``hvpmtl detect``."""

    data: DataConfig = field(default_factory=DataConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    layer_decay: float = 1.0  # per-block lr factor for the backbone (ViTDet: 0.7); 1 = off
    drop_path: float = 0.1
    optim: OptimConfig = field(default_factory=_detect_optim)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=12, output_dir="", log_every=20, resume="auto", grad_share_every=0)
    )
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self, prefix: str = "") -> None:
        check_loop_keys(self, "detect", prefix)


def _segment_optim() -> OptimConfig:
    # Swin's UperNet 160k: AdamW lr 6e-5, wd 0.01, 1500 warm-up iterations
    return OptimConfig(lr=6e-5, min_lr=0.0, weight_decay=0.01, warmup_steps=1500, clip_grad=0.0)


@dataclass
class SegmentRunConfig:
    """``hvpmtl segment``."""

    data: DataConfig = field(default_factory=DataConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    layer_decay: float = 1.0
    drop_path: float = 0.1
    optim: OptimConfig = field(default_factory=_segment_optim)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=1, max_steps=160000, output_dir="", log_every=20, resume="auto", grad_share_every=0
        )
    )
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self, prefix: str = "") -> None:
        check_loop_keys(self, "segment", prefix)


ROOTS = {
    "knn": FeatureEvalConfig,
    "linprobe": FeatureEvalConfig,
    "finetune": FinetuneRunConfig,
    "detect": DetectRunConfig,
    "segment": SegmentRunConfig,
}


def preset_dir(command: str) -> Path:
    return PRESET_ROOT / ("features" if command in ("knn", "linprobe") else command)
