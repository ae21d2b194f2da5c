"""``hvpmtl segment``: UperNet semantic segmentation on the pre-trained backbone, scored by mIoU.

The recipe is Swin's ADE20K UperNet (Liu et al. 2021, with mmseg's pipeline): the backbone's
four-level pyramid (:mod:`hvpmtl.eval.pyramid`) feeds segmentation-models-pytorch's UperNet
decoder (PPM on the coarsest map + FPN, fused at the finest level), a dropout-0.1 1x1
classifier, and a bilinear resize of the logits to the input. Training crops: the shorter side
is resized to ``S * r`` with ``r`` uniform in ``[0.5, 2]`` (mmseg's ``ratio_range``), a random
``S x S`` crop (padded with the mean colour and ``ignore_index``), a horizontal flip; loss =
pixel cross-entropy ignoring ``ignore_index``. Not reproduced: mmseg's auxiliary FCN head
(loss weight 0.4), its photometric distortion and its ``cat_max_ratio`` crop retries.

Evaluation is mmseg's "whole" mode, sharded over ranks: each image is resized so that its
shorter side is ``S`` (longer side capped at ``4 S``, both rounded to the pyramid's coarsest
stride; the built-in square scenes just become ``S x S``), segmented in one forward, and the
logits are resized back to the label map's size. torchmetrics accumulates the confusion matrix
over the whole set and syncs it over ranks: mIoU = mean over classes present in the labels or
the predictions of ``TP / (TP + FP + FN)`` (mmseg's ``nanmean``), pixel accuracy = correct /
labelled pixels, both in %.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base.heads import SegmentationHead
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from hvpmtl.data.views import SeededItems
from hvpmtl.engine.distributed import DistEnv, all_reduce_sum, barrier, broadcast_object
from hvpmtl.eval.downstream import DownstreamTask, layer_decay_groups, seed_all, train_downstream
from hvpmtl.eval.identity import run_identity
from hvpmtl.eval.pyramid import build_dense_backbone, build_pyramid
from hvpmtl.eval.weights import Weights

SCALE_RANGE = (0.5, 2.0)  # mmseg ADE20K: Resize(ratio_range=(0.5, 2.0)) around the crop size
MAX_ASPECT = 4.0  # mmseg ADE20K test scale (2048, 512): the longer side is at most 4x the shorter


class UperNet(nn.Module):
    """Pyramid (4 maps, finest first) -> smp ``UPerNetDecoder`` -> 1x1 classifier -> resize.

    Args:
        pyramid: module returning 4 ``NCHW`` maps with ``.out_channels``, ``.strides`` and
            ``.backbone`` (:func:`hvpmtl.eval.pyramid.build_pyramid`).
        num_classes: output channels ``C``.
        decoder_channels: width of the PPM/FPN decoder (Swin's UperNet: 512).
        dropout: before the classifier (mmseg's ``dropout_ratio``).

    ``forward``: ``B x 3 x H x W`` -> logits ``B x C x H x W``. smp's decoder expects the
    features of an encoder of depth 5 (strides 1, 2, 4, ..., 32) and drops the first two, so
    two placeholders go in front of our maps; it only uses relative scales, so a pyramid whose
    finest stride is not 4 (ViT patch 8: 2, 4, 8, 16) works too, the final resize undoing
    whatever the finest stride is. Parameters the forward never reaches (Swin's final norm,
    unused by its stage outputs; a ViT's pooling norm) are frozen at construction, so DDP needs
    no search for unused parameters (``has_unused_parameters = False``).
    """

    def __init__(self, pyramid: nn.Module, num_classes: int, decoder_channels: int = 512, dropout: float = 0.1):
        super().__init__()
        self.pyramid = pyramid
        self.backbone = pyramid.backbone  # the MaskedBackbone; .model is the timm model
        self.strides = list(pyramid.strides)
        self.decoder = UPerNetDecoder([0, 0, *pyramid.out_channels], encoder_depth=5, decoder_channels=decoder_channels)
        self.dropout = nn.Dropout2d(dropout)
        self.head = SegmentationHead(decoder_channels, num_classes, kernel_size=1)
        self.num_classes = num_classes
        self._freeze_unused()
        self.has_unused_parameters = False

    def _freeze_unused(self) -> None:
        """One eval-mode forward/backward on a small input finds parameters without a gradient."""
        was = self.training
        self.eval()
        side = 2 * self.strides[-1]
        self(torch.zeros(2, 3, side, side)).sum().backward()
        for p in self.parameters():
            if p.requires_grad and p.grad is None:
                p.requires_grad_(False)
            p.grad = None
        self.train(was)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2 and any(type(m) is nn.BatchNorm2d for m in self.decoder.psp.modules()):
            raise ValueError(
                "UperNet's BatchNorm needs >= 2 images per training step and process (its pooled 1x1 branch "
                "has one value per image): raise data.batch_size"
            )
        maps = self.pyramid(x)
        fused = self.decoder([None, None, *maps])  # smp skips its stride-1 and stride-2 inputs
        logits = self.head(self.dropout(fused))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_upernet(weights: Weights, cfg, num_classes: int) -> UperNet:
    """UperNet on ``weights``' backbone at ``cfg.segment.img_size`` (0: the backbone's), drop
    path ``cfg.drop_path``; the ViT's simple pyramid is ``decoder_channels`` wide."""
    s = cfg.segment
    backbone = build_dense_backbone(weights, s.img_size or weights.backbone.img_size, cfg.drop_path)
    return UperNet(build_pyramid(backbone, s.pyramid, s.decoder_channels), num_classes, s.decoder_channels, s.dropout)


def _check_labels(mask: torch.Tensor, num_classes: int, ignore_index: int, where: str) -> None:
    bad = ((mask < 0) | (mask >= num_classes)) & (mask != ignore_index)
    if bad.any():
        raise ValueError(
            f"{where}: label {int(mask[bad][0])} is outside 0..{num_classes - 1} and not ignore_index={ignore_index} "
            "(check segment.num_classes and segment.reduce_zero_label)"
        )


def _where(base: Dataset, index: int) -> str:
    files = getattr(base, "files", None)
    return str(files[index][1]) if files is not None else f"segmentation item {index}"


class SegTrainTransform:
    """``{"image": uint8 3 x H x W, "mask": long H x W}`` -> ``(float 3 x S x S, long S x S)``:
    random shorter-side resize to ``S * r``, random ``S x S`` crop (padding: the mean colour,
    ``ignore_index``), horizontal flip, normalisation (module docstring). Masks are resized
    with nearest neighbours (torchvision's rule for ``tv_tensors.Mask``)."""

    def __init__(
        self, img_size: int, num_classes: int, ignore_index: int = 255, hflip: float = 0.5,
        mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
        scale_range: tuple[float, float] = SCALE_RANGE,
    ):  # fmt: skip
        lo, hi = int(round(img_size * scale_range[0])), int(round(img_size * scale_range[1]))
        fill = {tv_tensors.Image: [round(255 * m) for m in mean], tv_tensors.Mask: ignore_index}
        steps = [v2.RandomResize(max(lo, 1), hi + 1), v2.RandomCrop(img_size, pad_if_needed=True, fill=fill)]
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        self.transform = v2.Compose(steps)
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def __call__(self, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
        _check_labels(item["mask"], self.num_classes, self.ignore_index, item.get("where", f"item {item['index']}"))
        image, mask = self.transform(tv_tensors.Image(item["image"]), tv_tensors.Mask(item["mask"]))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class _Named(Dataset):
    """Adds ``where`` (the annotation file) to each item, for the label check's message."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        return {**self.base[index], "where": _where(self.base, index)}


def eval_size(height: int, width: int, img_size: int, stride: int) -> tuple[int, int]:
    """Whole-image inference size: shorter side ``img_size``, longer side scaled (at most
    ``MAX_ASPECT`` times the shorter), both rounded to a multiple of ``stride``."""
    scale = img_size / min(height, width)
    h, w = min(height * scale, MAX_ASPECT * img_size), min(width * scale, MAX_ASPECT * img_size)
    return max(stride, round(h / stride) * stride), max(stride, round(w / stride) * stride)


class _EvalItems(Dataset):
    """``base[indices[i]]`` -> ``(normalised image at eval_size, original long mask)``."""

    def __init__(self, base, indices, img_size, stride, num_classes, ignore_index, mean, std):
        self.base, self.indices, self.img_size, self.stride = base, indices, img_size, stride
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.base[self.indices[i]]
        image, mask = item["image"], item["mask"]
        _check_labels(mask, self.num_classes, self.ignore_index, _where(self.base, self.indices[i]))
        size = eval_size(*image.shape[1:], self.img_size, self.stride)
        if tuple(image.shape[1:]) != size:
            image = v2.functional.resize(image, list(size), antialias=True)
        return self.normalise(tv_tensors.Image(image)).as_subclass(torch.Tensor), mask


def _as_lists(batch: list) -> tuple[list, list]:
    images, masks = zip(*batch)
    return list(images), list(masks)


def segmentation_metrics(num_classes: int, ignore_index: int = 255):
    """torchmetrics' mIoU (macro Jaccard over the accumulated confusion matrix) and pixel
    accuracy; ``compute()`` syncs over the process group when one is running."""
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    return MetricCollection({
        "mIoU": MulticlassJaccardIndex(num_classes, ignore_index=ignore_index, average="macro"),
        "pixel_acc": MulticlassAccuracy(num_classes, ignore_index=ignore_index, average="micro"),
    })  # fmt: skip


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module, dataset: Dataset, num_classes: int, env: DistEnv, img_size: int, stride: int = 32,
    ignore_index: int = 255, mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225), batch_size: int = 8, num_workers: int = 0,
) -> dict[str, float]:  # fmt: skip
    """Whole-image mIoU and pixel accuracy (%) of ``model`` on ``dataset`` (items with
    ``image`` uint8 and ``mask`` long), rank ``r`` taking items ``r::world``; every rank returns
    the same numbers. Images of one size in a batch go through the model together."""
    items = _EvalItems(dataset, list(range(env.rank, len(dataset), env.world_size)), img_size, stride,
                       num_classes, ignore_index, mean, std)  # fmt: skip
    loader = DataLoader(items, batch_size=batch_size, num_workers=num_workers, collate_fn=_as_lists)
    metrics = segmentation_metrics(num_classes, ignore_index).to(env.device)
    for images, masks in loader:
        groups: dict[tuple, list[int]] = {}
        for j, (image, mask) in enumerate(zip(images, masks)):
            groups.setdefault((tuple(image.shape), tuple(mask.shape)), []).append(j)
        for (_, mask_shape), js in groups.items():
            logits = model(torch.stack([images[j] for j in js]).to(env.device))
            logits = F.interpolate(logits.float(), size=mask_shape, mode="bilinear", align_corners=False)
            metrics.update(logits.argmax(1), torch.stack([masks[j] for j in js]).to(env.device))
    out = metrics.compute()
    return {k: 100.0 * float(v) for k, v in out.items()}


def segmentation_task(
    weights: Weights, cfg, train: Dataset, val: Dataset, num_classes: int, env: DistEnv
) -> DownstreamTask:
    """UperNet on ``weights`` trained on ``train`` and scored on ``val`` (ADE-style items),
    as a :class:`DownstreamTask` for :func:`train_downstream` (module docstring)."""
    s, d = cfg.segment, cfg.data
    per_process = d.batch_size // (env.world_size * cfg.train.accum_steps)
    bn_batch = per_process * env.world_size if env.distributed and cfg.dist.sync_bn else per_process
    if bn_batch < 2:
        raise ValueError(
            f"data.batch_size={d.batch_size}: UperNet's BatchNorm needs >= 2 images per step and process "
            f"(here {per_process} over {env.world_size} process(es) and train.accum_steps={cfg.train.accum_steps})"
        )
    model = build_upernet(weights, cfg, num_classes)
    size = s.img_size or weights.backbone.img_size
    transform = SegTrainTransform(size, num_classes, s.ignore_index, s.hflip, d.mean, d.std, tuple(s.scale_range))
    train_set = SeededItems(_Named(train), transform, seed=cfg.train.seed)
    ignore = s.ignore_index

    def loss(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """Mean cross-entropy over the labelled pixels of the global batch: DDP averages the
        ranks' gradients, so each rank divides its sum by the global count / world size."""
        images, masks = batch
        total = F.cross_entropy(net(images).float(), masks, ignore_index=ignore, reduction="sum")
        count = all_reduce_sum((masks != ignore).sum().float(), env) / env.world_size
        return {"loss": total / count.clamp(min=1.0)}

    def evaluate(net: nn.Module, env: DistEnv) -> dict:
        return evaluate_segmentation(
            net, val, num_classes, env, size, model.strides[-1], ignore, d.mean, d.std,
            batch_size=max(1, d.batch_size // env.world_size), num_workers=d.num_workers,
        )  # fmt: skip

    groups = layer_decay_groups(model, model.backbone.model, cfg.optim.weight_decay, cfg.layer_decay)
    return DownstreamTask("segment", model, train_set, default_collate, loss, evaluate, groups)


def _export_builtin(cfg, img_size: int, root: Path, env: DistEnv) -> None:
    """Rank 0 writes the built-in ``cfg.data`` train/val splits in ADE's layout; the others wait
    (an error on rank 0 is raised on every rank)."""
    from hvpmtl.data import build_dataset
    from hvpmtl.data.ade import export_ade

    error = None
    if env.is_main:
        try:
            for split, name in (("train", cfg.segment.train_split), ("val", cfg.segment.val_split)):
                export_ade(build_dataset(cfg.data, img_size, split), root, name, progress=cfg.train.progress)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    message = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", env)
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 could not export the built-in data: {message}")
    barrier(env)


def run_segment(cfg, weights: Weights, run_dir: Path, env: DistEnv) -> dict:
    """``hvpmtl segment``: data (``cfg.segment.root``, or the built-in ``cfg.data`` exported to
    ``run_dir/ade-data``), UperNet training with :func:`train_downstream`, final metrics.

    Returns ``{"metrics": {"mIoU", "pixel_acc"}, "train_images", "val_images", "seconds"}``.
    """
    from hvpmtl.data.ade import ADESegmentation

    start = time.perf_counter()
    seed_all(cfg.train.seed)  # the new pyramid, decoder and head: the same in every run of this config
    s, run_dir = cfg.segment, Path(run_dir)
    root = Path(s.root) if s.root else run_dir / "ade-data"
    if not s.root:
        _export_builtin(cfg, s.img_size or weights.backbone.img_size, root, env)
    train = ADESegmentation(root, s.train_split, s.reduce_zero_label, s.ignore_index)
    val = ADESegmentation(root, s.val_split, s.reduce_zero_label, s.ignore_index)
    if train.classes is not None and s.num_classes and s.num_classes != len(train.classes):
        raise ValueError(
            f"segment.num_classes={s.num_classes} but {root / 'classes.txt'} names {len(train.classes)} classes"
        )
    if not s.num_classes and train.classes is None:
        raise ValueError(f"segment.num_classes=0 and no {root / 'classes.txt'}: set segment.num_classes (ADE20K: 150)")
    num_classes = s.num_classes or len(train.classes)
    task = segmentation_task(weights, cfg, train, val, num_classes, env)
    result = train_downstream(task, cfg, env, run_dir, cfg.data.batch_size, cfg.data.num_workers, s.eval_every,
                              identity=run_identity("segment", cfg, weights))  # fmt: skip
    return {"metrics": result.metrics, "train_images": len(train), "val_images": len(val), "steps": result.steps,
            "seconds": time.perf_counter() - start}  # fmt: skip
