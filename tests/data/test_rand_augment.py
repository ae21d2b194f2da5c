"""RandAugment (data/views.py) against timm's ``rand-m9-mstd0.5-inc1``, the policy SimMIM uses:
the per-op probability (``data.rand_augment_op_prob``) and the magnitude distribution, each
measured over a few thousand draws of both implementations under fixed seeds."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torchvision.transforms import v2

import hvpmtl
from hvpmtl.config import ConfigError
from hvpmtl.data import build_pretrain_dataset
from hvpmtl.data.views import RandAugment, TwoViewTransform

DRAWS = 3000
TIMM_POLICY = "rand-m9-mstd0.5-inc1"


def _timm_draws() -> tuple[float, np.ndarray]:
    """timm's policy: the fraction of chosen ops that run and the magnitude each one ran at."""
    policy = rand_augment_transform(TIMM_POLICY, {})
    assert policy.num_layers == 2 and policy.choice_weights is None
    assert {(op.prob, op.magnitude, op.magnitude_std) for op in policy.ops} == {(0.5, 9, 0.5)}
    levels: list[float] = []
    for op in policy.ops:  # record the magnitude an applied op passes on, run nothing
        op.level_fn = lambda m, hparams, record=levels: record.append(m) or ()
        op.aug_fn = lambda img, *args, **kwargs: img
    random.seed(0)
    np.random.seed(0)
    image = Image.new("RGB", (8, 8))
    for _ in range(DRAWS):
        policy(image)
    return len(levels) / (2 * DRAWS), np.array(levels)


def _our_draws(monkeypatch, op_prob: float) -> tuple[float, np.ndarray]:
    """Ours with ``op_prob``: the same two numbers, from the ops torchvision is asked to apply."""
    ra = RandAugment(2, magnitude=9.0, magnitude_std=0.5, op_prob=op_prob)
    levels: list[float] = []

    def record(self, image, transform_id, magnitude, interpolation, fill):
        levels.append(self.magnitude * 10 / self.LEVELS)
        return image

    monkeypatch.setattr(v2.RandAugment, "_apply_image_or_video_transform", record)
    torch.manual_seed(0)
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    for _ in range(DRAWS):
        ra(image)
    return len(levels) / (2 * DRAWS), np.array(levels)


def test_op_probability_and_magnitudes_match_timms_policy(monkeypatch):
    timm_rate, timm_levels = _timm_draws()
    rate, levels = _our_draws(monkeypatch, op_prob=0.5)
    # binomial over 6,000 ops: std 0.0065
    assert abs(timm_rate - 0.5) < 0.03 and abs(rate - 0.5) < 0.03 and abs(rate - timm_rate) < 0.03
    # N(9, 0.5) clipped to [0, 10]: mean 8.99, 2.3 % at the clip; ours is on a 0.1 grid
    for sample in (timm_levels, levels):
        assert sample.min() >= 0.0 and sample.max() <= 10.0
        assert abs(sample.mean() - 8.99) < 0.04 and abs(sample.std() - 0.49) < 0.04
        assert 0.01 < (sample >= 10.0).mean() < 0.04
    q = [0.05, 0.25, 0.5, 0.75, 0.95]
    assert np.abs(np.quantile(levels, q) - np.quantile(timm_levels, q)).max() <= 0.1 + 1e-9


def test_op_probability_one_applies_every_op(monkeypatch):
    rate, _ = _our_draws(monkeypatch, op_prob=1.0)
    assert rate == 1.0


def test_op_probability_is_a_config_value():
    cfg = hvpmtl.load_config("cpu-tiny", ["data.rand_augment_op_prob=0.5", "data.train_size=4"])
    ra = next(s for s in build_pretrain_dataset(cfg).transform.view.transforms if isinstance(s, RandAugment))
    assert ra.op_prob == 0.5
    assert hvpmtl.load_config("cpu-tiny").data.rand_augment_op_prob == 1.0  # every op applied (not timm's 0.5)
    with pytest.raises(ConfigError, match=r"data\.rand_augment_op_prob=1\.5"):
        hvpmtl.load_config("cpu-tiny", ["data.rand_augment_op_prob=1.5"])


def test_op_probability_zero_leaves_the_view_unaugmented():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    plain = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, color_jitter=0.0, rotation=0.0)
    off = TwoViewTransform(16, 8, rand_augment=False, **plain)
    skipped = TwoViewTransform(16, 8, rand_augment_op_prob=0.0, **plain)
    torch.testing.assert_close(skipped(image)[0], off(image)[0], rtol=0, atol=0)
