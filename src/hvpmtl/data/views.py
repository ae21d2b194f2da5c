"""Views for pre-training (SPEC "One training step") and the plain transform for evaluation.

One uint8 image gives two augmented views (random resized crop, horizontal flip, colour jitter,
random rotation, RandAugment; then normalisation) and one SimMIM mask. The views and the mask of
a sample are a pure function of ``(seed, epoch, index)``: :class:`PretrainViews` draws them
under a forked, re-seeded torch RNG, so a resumed run or any number of processes and workers
produce the same batches, and the caller's RNG state is left as it was.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from hvpmtl.data.config import IMAGENET_MEAN, IMAGENET_STD
from hvpmtl.data.loading import ImageLoading
from hvpmtl.data.masking import MaskGenerator
from hvpmtl.data.tags import TagPolicy


def view_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixing ``(seed, epoch, index)`` (numpy ``SeedSequence``)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Torch's global CPU generator seeded with ``seed`` inside, put back after. Only the CPU
    generator: ``torch.manual_seed`` also queues a seeding of every not-yet-started accelerator,
    with a stack trace each time, which cost ~15 % of a loader worker's time per sample."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


class RandAugment(v2.RandAugment):
    """torchvision's RandAugment with the magnitude on timm's scale, as in SimMIM's
    ``rand-m9-mstd0.5``: ``magnitude`` in [0, 10] is that fraction of each op's maximum (9: 90 %,
    27 degrees of rotation), drawn per image from ``N(magnitude, magnitude_std)`` and clipped to
    [0, 10]. (torchvision's own scale is 31 bins, where 9 means 30 %.) The ops and their maxima
    are torchvision's. Each chosen op runs with probability ``op_prob`` (timm's policy: 0.5;
    1.0, torchvision's, runs both and draws nothing more). The magnitude is drawn once per call,
    so the ops of one view share it (timm draws it per op: the same distribution per op)."""

    LEVELS = 100  # magnitude resolution: 0.1 on the 0-10 scale

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, op_prob: float = 1.0):
        super().__init__(num_ops, magnitude=0, num_magnitude_bins=self.LEVELS + 1)
        self.level, self.level_std = float(magnitude), float(magnitude_std)
        self.op_prob = float(op_prob)

    def skips_op(self) -> bool:
        """Whether the op just chosen is left out (probability ``1 - op_prob``); draws only when
        ``op_prob < 1``, so the default keeps torchvision's random stream."""
        return self.op_prob < 1.0 and float(torch.rand(())) >= self.op_prob

    def _apply_image_or_video_transform(self, image, transform_id, magnitude, interpolation, fill):
        if self.skips_op():
            return image
        return super()._apply_image_or_video_transform(image, transform_id, magnitude, interpolation, fill)

    def forward(self, *inputs):
        level = self.level
        if self.level_std > 0:
            level = min(max(level + self.level_std * float(torch.randn(())), 0.0), 10.0)
        self.magnitude = round(level * self.LEVELS / 10)
        return super().forward(*inputs)


class TwoViewTransform:
    """uint8 ``3 x H x W`` image -> ``(v0, v1, mask)``: two float views and a ``g x g`` mask.

    Each view: ``RandomResizedCrop(img_size, crop_scale, crop_ratio)`` -> flip (prob ``hflip``)
    -> rotation (uniform in ``[-rotation, rotation]`` degrees) -> colour jitter (brightness,
    contrast, saturation ``color_jitter``, hue ``color_jitter / 4``, prob ``color_jitter_prob``)
    -> :class:`RandAugment` (``rand_augment_ops``, ``rand_augment_magnitude`` on timm's 0-10 scale,
    ``rand_augment_magnitude_std``, each op run with probability ``rand_augment_op_prob``) -> float
    -> normalise. A strength of 0 (or
    ``rand_augment=False``) leaves that step out. Randomness comes from the global torch RNG; seed
    it (as :class:`PretrainViews` does) for reproducible views.
    """

    def __init__(
        self,
        img_size: int,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        crop_scale: tuple[float, float] = (0.67, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float = 0.4,
        color_jitter_prob: float = 0.8,
        rotation: float = 10.0,
        rand_augment: bool = True,
        rand_augment_ops: int = 2,
        rand_augment_magnitude: float = 9.0,
        rand_augment_magnitude_std: float = 0.5,
        rand_augment_op_prob: float = 1.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        steps: list = [v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), ratio=tuple(crop_ratio))]
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        if rotation > 0:
            steps.append(v2.RandomRotation(rotation, interpolation=v2.InterpolationMode.BILINEAR))
        if color_jitter > 0 and color_jitter_prob > 0:
            s = color_jitter
            steps.append(v2.RandomApply([v2.ColorJitter(s, s, s, min(s / 4, 0.5))], p=color_jitter_prob))
        if rand_augment:
            magnitude, noise = rand_augment_magnitude, rand_augment_magnitude_std
            steps.append(RandAugment(rand_augment_ops, magnitude, noise, rand_augment_op_prob))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        self.view = v2.Compose(steps)
        self.masks = MaskGenerator(img_size, mask_patch_size, mask_ratio)
        self.img_size = img_size

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = tv_tensors.Image(image)
        v0, v1 = self.view(image), self.view(image)
        return v0.as_subclass(torch.Tensor), v1.as_subclass(torch.Tensor), self.masks(1)[0]

    def __repr__(self) -> str:
        return f"TwoViewTransform({self.view}, mask_grid={self.masks.grid}, masked={self.masks.num_masked})"


class EvalTransform:
    """uint8 image -> float ``3 x S x S``: resize the short side to ``S / crop_pct``, centre-crop
    ``S``, normalise (no randomness; for linear probe and kNN)."""

    def __init__(
        self,
        img_size: int,
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        self.transform = v2.Compose(
            [
                v2.Resize(int(round(img_size / crop_pct))),
                v2.CenterCrop(img_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(mean), list(std)),
            ]
        )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)


def _parse_key(key: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(key, (tuple, list)):
        index, epoch = key
        return int(index), int(epoch)
    return int(key), 0


def reduced_decode_side(cfg: Any) -> int:
    """How small a pre-training image may be decoded (``read_image``'s ``min_side``; 0 when
    ``data.reduced_decode`` is off). A crop of scale ``s`` and aspect ratio ``r`` of an image
    whose shorter side is ``m`` is at least ``m sqrt(s min(r, 1/r))`` on each side, so
    ``m = img_size / sqrt(s_min min(r_min, 1/r_max))`` keeps every crop the views can draw at
    ``img_size`` pixels a side or more: the views never upsample what a full decode would not."""
    d = cfg.data
    return decode_side(cfg.backbone.img_size, d.crop_scale, d.crop_ratio) if d.reduced_decode else 0


def pretrain_loading(cfg: Any) -> ImageLoading:
    """How pre-training loads image files, from a root ``Config``: ``data.*``, reduced decoding for the
    views (:func:`reduced_decode_side`) and the run folder's skipped-image list (``train.output_dir``)."""
    return ImageLoading.from_config(cfg.data, reduced_decode_side(cfg), cfg.train.output_dir or None)


def decode_side(img_size: int, crop_scale: Sequence[float], crop_ratio: Sequence[float]) -> int:
    """:func:`reduced_decode_side` for views of ``img_size`` drawn at these crop scales and ratios."""
    ratio = min(crop_ratio[0], 1.0 / crop_ratio[1])
    return math.ceil(img_size / math.sqrt(crop_scale[0] * ratio))


class PretrainViews(Dataset):
    """Pre-training samples: ``base[index]`` -> two views, one mask, its tags.

    ``dataset[i]`` is epoch 0; ``dataset[(i, epoch)]`` (what the training sampler yields) draws
    the views of that epoch. Returns ``{"views": (v0, v1), "mask": g x g bool, "labels": C
    float, "index": int}``; the views and mask depend only on ``(seed, epoch, index)``. ``tags``
    (:class:`hvpmtl.data.tags.TagPolicy`) may remove tags and add ``"known"`` (bool ``1`` or ``C``).
    """

    def __init__(self, base: Dataset, view_transform: TwoViewTransform, seed: int = 0, tags: TagPolicy | None = None):
        self.base, self.transform, self.seed = base, view_transform, seed
        self.classes = getattr(base, "classes", None)
        self.tags = tags or TagPolicy()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = _parse_key(key)
        sample = self.base[index]
        with seeded_cpu_rng(view_seed(self.seed, epoch, index)):
            v0, v1, mask = self.transform(sample["image"])
        labels, known = self.tags.apply(sample, index)
        out = {"views": (v0, v1), "mask": mask, "labels": labels, "index": index}
        return out if known is None else {**out, "known": known}

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[dict]:
        """A batch (what a ``DataLoader`` worker asks for): the base's ``prefetch`` reads the
        batch's files concurrently first (``data.io_threads``), then each sample is made as
        :meth:`__getitem__` makes it, in order, so the batch is the same either way."""
        prefetch = getattr(self.base, "prefetch", None)
        if prefetch is not None:
            prefetch([_parse_key(key)[0] for key in keys])
        return [self[key] for key in keys]


def collate_pretrain(samples: Sequence[dict]) -> dict:
    """Stack :class:`PretrainViews` samples into the batch ``HVPMTL.forward`` takes:
    ``{"views": [B x 3 x H x W] * 2, "mask": B x g x g, "labels": B x C, "index": B}``, plus
    ``"known"`` (bool ``B x 1`` or ``B x C``) when the samples carry it. Views that are recipes
    (``data.augment_on=device``) are stacked key by key, for ``DeviceViews``."""
    if isinstance(samples[0]["views"][0], dict):
        views = [{key: torch.stack([s["views"][k][key] for s in samples]) for key in samples[0]["views"][k]}
                 for k in (0, 1)]  # fmt: skip
    else:
        views = [torch.stack([s["views"][k] for s in samples]) for k in (0, 1)]
    batch = {
        "views": views,
        "mask": torch.stack([s["mask"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
    }
    if "known" in samples[0]:  # a data set marks all its samples or none (hvpmtl.data.tags)
        batch["known"] = torch.stack([s["known"] for s in samples])
    return batch


class EvalImages(Dataset):
    """``(image float 3 x S x S, labels float C)`` pairs for linear probe and kNN."""

    def __init__(self, base: Dataset, transform: EvalTransform):
        self.base, self.transform = base, transform
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.base[index]
        return self.transform(sample["image"]), sample["labels"].float()


class SeededItems(Dataset):
    """``transform(base[index])`` drawn under a seed of ``(seed, epoch, index)`` (torch and Python
    RNGs, so torchvision and timm augmentations alike), for the downstream training loops.

    Keys are ``index`` (epoch 0) or ``(index, epoch)`` as the training sampler yields; the
    caller's RNG states are left as they were.
    """

    def __init__(self, base: Dataset, transform: Callable[[dict], object], seed: int = 0):
        self.base, self.transform, self.seed = base, transform, seed
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = _parse_key(key)
        sample = self.base[index]
        s = view_seed(self.seed, epoch, index)
        py_state = random.getstate()
        try:
            random.seed(s)
            with seeded_cpu_rng(s):
                return self.transform(sample)
        finally:
            random.setstate(py_state)
