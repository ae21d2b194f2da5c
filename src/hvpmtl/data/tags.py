"""Which tags of a pre-training sample MLC may read: ``data.untagged``, ``data.tagged_fraction``.

An image without a tag says nothing about which classes are absent. Under ``data.untagged=
unknown`` (the default) the samples of a data set that has such images carry ``known``, bool
``(1,)``: whether the image has a tag; MLC's loss leaves the unknown ones out while SwAV, MIM and
momentum distillation train on every image. A reader may give its own per-class ``known`` (``C``,
Open Images' ``data.unannotated=unknown``); it is passed on as it is. ``negative`` keeps the
old meaning: every tag of an untagged image is an absent tag (all-zero targets), and no mask.

``data.tagged_fraction`` (generated sets, pre-training's train split only) keeps the tags of that
fraction of images (:func:`hvpmtl.data.synthetic.tagged_by_fraction`, a seeded hash of the
index) and removes the others', to study pre-training with few tagged images. Data sets keep
their tags everywhere else (downstream evaluation, the k-NN monitor, val and test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hvpmtl.data.config import has_effect
from hvpmtl.data.synthetic import tagged_by_fraction


def may_be_untagged(base: Any) -> bool:
    """Whether some image of ``base`` may have no tag: a listing (``targets``) with an empty entry,
    a generated set with label noise, any data set that lists neither."""
    targets = getattr(base, "targets", None)
    if targets is not None:
        return any(len(t) == 0 for t in targets)
    return getattr(base, "label_noise", 1.0) > 0


@dataclass(frozen=True)
class TagPolicy:
    """What :meth:`apply` does to each sample; ``mark_untagged``: add the per-image ``known``."""

    mark_untagged: bool = False
    tagged_fraction: float = 1.0
    seed: int = 0  # data.seed: which images keep their tags

    @classmethod
    def for_data(cls, base: Any, untagged: str, tagged_fraction: float = 1.0, seed: int = 0) -> TagPolicy:
        """The policy for ``base`` under ``data.untagged=untagged`` (pass ``negative`` where the key has no effect)."""
        partly = tagged_fraction < 1.0
        return cls(untagged == "unknown" and (partly or may_be_untagged(base)), tagged_fraction, seed)

    def apply(self, sample: dict, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(labels float C, known or None)`` of the sample read for image ``index``."""
        labels = sample["labels"].float()
        if not tagged_by_fraction(index, self.tagged_fraction, self.seed):
            labels = torch.zeros_like(labels)
        known = sample.get("known")
        if known is None and self.mark_untagged:
            known = labels.any().reshape(1)
        return labels, known


def pretrain_tag_policy(data: Any, base: Any, split: str) -> TagPolicy:
    """The policy of pre-training's ``split`` of ``base`` under the ``data`` config block."""
    untagged = data.untagged if has_effect("untagged", data.dataset) else "negative"
    fraction = data.tagged_fraction if split == "train" and has_effect("tagged_fraction", data.dataset) else 1.0
    return TagPolicy.for_data(base, untagged, fraction, data.seed)
