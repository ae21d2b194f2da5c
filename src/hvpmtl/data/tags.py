"""Which tags of a pre-training sample MLC may read: ``data.untagged``, ``data.tagged_fraction``.

An image without a tag says nothing about which classes are absent. Under ``data.untagged=
unknown`` (the default) the samples of a data set that has such images carry ``known``, bool
``(1,)``: whether the image has a tag; MLC's loss leaves the unknown ones out while SwAV, MIM and
momentum distillation train on every image. A reader may give its own per-class ``known`` (``C``,
Open Images' ``data.unannotated=unknown``); it is passed on as it is. ``negative`` keeps the
old meaning: every tag of an untagged image is an absent tag (all-zero targets), and no mask.

Verified negatives (samples with ``negatives``, float ``C``: a manifest or shards that list them):
an image is untagged when it has neither a tag nor a negative. Under ``data.unannotated=unknown``
(the default) each sample carries ``known``, bool ``C``: its tags and its negatives, every other
class unknown, as Open Images' reader gives it; an untagged image's ``known`` is all false under
``data.untagged=unknown``, all true under ``negative``. Under ``data.unannotated=negative`` every
class but the tags is absent and only untagged images are marked, as without negatives. Setting
``data.unannotated`` for a manifest or shards without negatives is refused
(:func:`check_unannotated`): the key would do nothing.

``data.tagged_fraction`` (generated sets, pre-training's train split only) keeps the tags of that
fraction of images (:func:`hvpmtl.data.synthetic.tagged_by_fraction`, a seeded hash of the
index) and removes the others', to study pre-training with few tagged images. Data sets keep
their tags everywhere else (downstream evaluation, the k-NN monitor, val and test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hvpmtl.data.config import DataConfig, has_effect
from hvpmtl.data.synthetic import tagged_by_fraction


def may_be_untagged(base: Any) -> bool:
    """Whether some image of ``base`` may have no tag: a listing (``targets``) with an entry empty
    (and no verified negative, where ``negatives`` lists them), a generated set with label noise,
    any data set that lists neither."""
    targets = getattr(base, "targets", None)
    if targets is not None:
        negatives = getattr(base, "negatives", None) or [()] * len(targets)
        return any(len(t) == 0 and len(n) == 0 for t, n in zip(targets, negatives, strict=True))
    return getattr(base, "label_noise", 1.0) > 0


def check_unannotated(data: Any, has_negatives: bool, origin: str) -> None:
    """``ValueError`` (one line) when ``data.unannotated`` is set but ``origin`` (a manifest or
    shards: sources where the key depends on the data) lists no verified negatives."""
    if data.dataset in ("manifest", "shards") and not has_negatives and data.unannotated != DataConfig.unannotated:
        what = "column or key" if data.dataset == "manifest" else "in its samples' JSON"
        raise ValueError(
            f"data.unannotated={data.unannotated} has no effect: {origin} has no 'negatives' {what} "
            "(tags verified absent); remove data.unannotated"
        )


@dataclass(frozen=True)
class TagPolicy:
    """What :meth:`apply` does to each sample; ``mark_untagged``: add the per-image ``known``;
    ``per_class``: add the per-class ``known`` of the sample's ``negatives`` (module docstring)."""

    mark_untagged: bool = False
    tagged_fraction: float = 1.0
    seed: int = 0  # data.seed: which images keep their tags
    per_class: bool = False  # data.unannotated=unknown on samples with negatives
    untagged_negative: bool = False  # per_class: an untagged image is all-known (data.untagged=negative)

    @classmethod
    def for_data(
        cls, base: Any, untagged: str, tagged_fraction: float = 1.0, seed: int = 0, unannotated: str = "negative"
    ) -> TagPolicy:
        """The policy for ``base`` under ``data.untagged=untagged`` and ``data.unannotated=unannotated``
        (pass ``negative`` where a key has no effect)."""
        partly = tagged_fraction < 1.0
        per_class = unannotated == "unknown" and getattr(base, "negatives", None) is not None
        mark = untagged == "unknown" and (partly or may_be_untagged(base))
        return cls(mark, tagged_fraction, seed, per_class, untagged == "negative")

    def apply(self, sample: dict, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(labels float C, known or None)`` of the sample read for image ``index``."""
        labels, negatives = sample["labels"].float(), sample.get("negatives")
        if not tagged_by_fraction(index, self.tagged_fraction, self.seed):
            labels = torch.zeros_like(labels)
            negatives = None if negatives is None else torch.zeros_like(negatives)
        known = sample.get("known")
        if known is None and self.per_class:
            known = (labels > 0) | (negatives > 0)
            if self.untagged_negative and not known.any():
                known = torch.ones_like(known)
        elif known is None and self.mark_untagged:
            tagged = labels.any() if negatives is None else labels.any() | negatives.any()
            known = tagged.reshape(1)
        return labels, known


def pretrain_tag_policy(data: Any, base: Any, split: str) -> TagPolicy:
    """The policy of pre-training's ``split`` of ``base`` under the ``data`` config block."""
    untagged = data.untagged if has_effect("untagged", data.dataset) else "negative"
    unannotated = data.unannotated if has_effect("unannotated", data.dataset) else "negative"
    fraction = data.tagged_fraction if split == "train" and has_effect("tagged_fraction", data.dataset) else 1.0
    if split == "train":  # the train split decides whether the key has an effect
        check_unannotated(data, getattr(base, "negatives", None) is not None, getattr(base, "manifest", data.dataset))
    return TagPolicy.for_data(base, untagged, fraction, data.seed, unannotated)
