"""Data: readers, views and masks, from a ``DataConfig`` to the batches ``HVPMTL`` takes.

Public entry points:

* ``build_dataset(cfg_data, img_size, split="train")`` -> a data set with ``.classes`` whose
  items are dicts with at least ``image`` (uint8 ``3 x H x W``) and ``labels`` (float multi-hot
  ``C``); ``cfg_data.dataset`` picks ``synthetic``, ``manifest``, ``imagefolder``,
  ``fmnist-mosaic`` or ``fmnist`` (single items, for downstream evaluation), ``emoji`` (scenes of
  2-4 emoji tagged with their CLDR keywords: ~130 tags, ``hvpmtl.data.emoji``), or one of the users'
  formats ``coco``, ``voc``, ``openimages``, ``tencent`` (``hvpmtl.data.formats``). Splits:
  ``train``, ``val``, ``test``. Each name is a builder registered with ``register_source``
  (``hvpmtl.data.sources``; ``registered_sources()`` lists them); file-backed readers load images
  as one ``ImageLoading`` says (``hvpmtl.data.loading``: bad-image policy, pixel limit, ...).
* ``build_view_transform(cfg)`` and ``build_eval_transform(cfg)`` take the root
  ``hvpmtl.config.Config`` (they read ``cfg.backbone.img_size``, ``cfg.tasks.mim`` and
  ``cfg.data``).
* ``data.augment_on=device``: ``build_view_transform`` gives ``TwoViewCrops`` (uint8 crops and
  the other steps' parameters per sample) and ``DeviceViews(transform)(batch, device)`` finishes
  a collated batch on the device.
* ``build_pretrain_dataset(cfg, split)`` = ``PretrainViews(build_dataset(...),
  build_view_transform(cfg), seed=cfg.train.seed)``, images loaded as ``pretrain_loading(cfg)``
  says; batch it with ``collate_pretrain``. Images it skips (``data.on_bad_image=skip``) are listed
  in ``cfg.train.output_dir``;
  ``skipped_images_summary(run_dir)`` merges that list and gives the line a run prints at its end.
* ``read_image(path, max_pixels)`` decodes any image file to uint8 RGB (``hvpmtl.data.decode``);
  unusable images raise ``BadImageError`` naming the file (and its manifest line).

Where each split comes from: generated sets (synthetic, fmnist-mosaic, emoji) use ``data.train_size``
/ ``data.val_size`` images from disjoint streams of ``data.seed``, with ``data.label_noise``
applied to the train split only (emoji: val and test scenes show only emoji that train scenes never
show); ``fmnist`` takes the first ``data.train_size`` (train) or
``data.val_size`` (val, test: the official test items) items, 0 meaning all; ``manifest``
reads ``data.manifest`` (train) or ``data.val_manifest``; ``imagefolder`` reads
``root/<split>`` when that folder exists, else ``root`` itself for train (and fails for val/test);
the users' formats read ``data.annotations`` (train) or ``data.val_annotations``; ``shards``
reads ``data.shards`` (train) or ``data.val_shards`` (``hvpmtl.data.shards``).
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from hvpmtl.data.config import DATASETS, DataConfig
from hvpmtl.data.decode import BadImageError
from hvpmtl.data.device_views import DeviceViews, TwoViewCrops
from hvpmtl.data.fmnist import FashionMNISTItems, FashionMNISTMosaic
from hvpmtl.data.formats import FormatImages  # registers the formats' sources
from hvpmtl.data.loading import ImageLoading
from hvpmtl.data.manifest import ImageFiles, ImageFolderImages, ManifestImages, read_class_names, read_image
from hvpmtl.data.masking import MaskGenerator, upsample_mask
from hvpmtl.data.skipped import skipped_images_summary
from hvpmtl.data.sources import SPLITS, register_source, registered_source, registered_sources, vocabulary
from hvpmtl.data.synthetic import SyntheticScenes, noisy_labels
from hvpmtl.data.tags import pretrain_tag_policy
from hvpmtl.data.views import (
    EvalImages,
    EvalTransform,
    PretrainViews,
    SeededItems,
    TwoViewTransform,
    collate_pretrain,
    pretrain_loading,
    reduced_decode_side,
    view_seed,
)

__all__ = [
    "DATASETS",
    "BadImageError",
    "DataConfig",
    "DeviceViews",
    "EvalImages",
    "EvalTransform",
    "FashionMNISTItems",
    "FashionMNISTMosaic",
    "ImageFiles",
    "ImageFolderImages",
    "ImageLoading",
    "ManifestImages",
    "MaskGenerator",
    "PretrainViews",
    "SeededItems",
    "SyntheticScenes",
    "TwoViewCrops",
    "TwoViewTransform",
    "build_dataset",
    "build_eval_transform",
    "build_pretrain_dataset",
    "build_view_transform",
    "collate_pretrain",
    "noisy_labels",
    "read_class_names",
    "read_image",
    "reduced_decode_side",
    "register_source",
    "registered_sources",
    "skipped_images_summary",
    "upsample_mask",
    "view_seed",
]


def build_dataset(
    cfg_data: DataConfig, img_size: int, split: str = "train", loading: ImageLoading | None = None
) -> Dataset:
    """The ``split`` of the data set ``cfg_data`` describes (see the module docstring), from the builder
    registered for ``cfg_data.dataset`` (:mod:`hvpmtl.data.sources`); file-backed readers load images as
    ``loading`` says (default: ``ImageLoading.from_config(cfg_data)``)."""
    cfg = cfg_data
    if split not in SPLITS:
        raise ValueError(f"split '{split}' unknown (choose from {', '.join(SPLITS)})")
    source = registered_source(cfg.dataset)
    ds = source.build(cfg, split, img_size, loading or ImageLoading.from_config(cfg))
    if cfg.num_classes is not None and cfg.num_classes != len(ds.classes):
        raise ValueError(f"data.num_classes={cfg.num_classes} but the {cfg.dataset} data has {len(ds.classes)} classes")
    return ds


def build_view_transform(cfg: Any) -> TwoViewTransform:
    """Two views and a SimMIM mask, from a root ``Config`` (backbone size, tasks.mim, data); with
    ``data.augment_on=device`` the worker half only (``TwoViewCrops``: crops and parameters)."""
    d, mim = cfg.data, cfg.tasks.mim
    kind = TwoViewCrops if d.augment_on == "device" else TwoViewTransform
    return kind(
        cfg.backbone.img_size,
        mim.mask_patch_size,
        mim.mask_ratio,
        crop_scale=d.crop_scale,
        crop_ratio=d.crop_ratio,
        hflip=d.hflip,
        color_jitter=d.color_jitter,
        color_jitter_prob=d.color_jitter_prob,
        rotation=d.rotation,
        rand_augment=d.rand_augment,
        rand_augment_ops=d.rand_augment_ops,
        rand_augment_magnitude=d.rand_augment_magnitude,
        rand_augment_magnitude_std=d.rand_augment_magnitude_std,
        rand_augment_op_prob=d.rand_augment_op_prob,
        mean=d.mean,
        std=d.std,
    )


def build_eval_transform(cfg: Any) -> EvalTransform:
    """Resize, centre-crop and normalise, from a root ``Config``."""
    return EvalTransform(cfg.backbone.img_size, cfg.data.eval_crop_pct, cfg.data.mean, cfg.data.std)


def build_pretrain_dataset(cfg: Any, split: str = "train") -> Dataset:
    """``PretrainViews`` over ``build_dataset(cfg.data, ...)``, augmentations seeded by ``train.seed``
    (``data.dataset=shards``, train split: a streamed ``hvpmtl.data.shard_stream.ShardStream``)."""
    if cfg.data.dataset == "shards" and split == "train":
        from hvpmtl.data.shard_stream import pretrain_stream

        return pretrain_stream(cfg, vocabulary(cfg.data), build_view_transform(cfg))
    base = build_dataset(cfg.data, cfg.backbone.img_size, split, pretrain_loading(cfg))
    _check_tags(base, cfg.tasks.label_readers())
    tags = pretrain_tag_policy(cfg.data, base, split)  # data.untagged, data.tagged_fraction
    return PretrainViews(base, build_view_transform(cfg), seed=cfg.train.seed, tags=tags)


def _check_tags(base: Dataset, readers: list[str]) -> None:
    """A manifest (or format) without a single tag cannot train the tasks that read tags (``readers``:
    their ``tasks.<name>`` keys, :meth:`hvpmtl.objectives.base.TasksConfig.label_readers`)."""
    if isinstance(base, FormatImages) and base.num_tagged == 0 and readers:
        raise ValueError(
            f"{base.annotations}: no tags: none of the {len(base)} images has a positive label, and "
            f"{' and '.join(readers)} need tags (check data.min_confidence, data.voc_difficult, the vocabulary; "
            f"or set {' '.join(r + '.weight=0' for r in readers)})"
        )
    if isinstance(base, ManifestImages) and base.num_tagged == 0 and readers:
        raise ValueError(
            f"{base.manifest}: no tags: the 'labels' column is empty on all {len(base)} lines, and "
            f"{' and '.join(readers)} need tags (fill it: tags separated by '|'; or set "
            f"{' '.join(r + '.weight=0' for r in readers)})"
        )
