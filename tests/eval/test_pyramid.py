"""eval/pyramid.py: four maps at the stated strides and widths, for any input size, and weights kept."""

from __future__ import annotations

import pytest
import torch

import hvpmtl
from hvpmtl.eval.pyramid import SimpleFeaturePyramid, SwinStages, build_dense_backbone, build_pyramid
from hvpmtl.eval.weights import Weights, resolve_weights

SWIN = ["backbone.kwargs={embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 1, 1]}", "backbone.img_size=32"]


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_four_levels_at_their_strides_for_any_size(tiny_run, family):
    if family == "vit":
        weights = resolve_weights(tiny_run)  # patch 8: strides 2, 4, 8, 16
        pyramid = build_pyramid(build_dense_backbone(weights, 32), out_channels=24)
        assert isinstance(pyramid, SimpleFeaturePyramid) and pyramid.out_channels == [24] * 4
    else:
        weights = Weights(hvpmtl.load_config("cpu-swin-tiny", SWIN).backbone, None, "swin")
        pyramid = build_pyramid(build_dense_backbone(weights, 32))
        assert isinstance(pyramid, SwinStages) and pyramid.out_channels == [16, 32, 64, 128]
    for h, w in ((32, 32), (64, 96)):  # not the pre-training size, not square
        maps = pyramid(torch.randn(2, 3, h, w))
        assert len(maps) == 4
        for m, stride, c in zip(maps, pyramid.strides, pyramid.out_channels):
            assert m.shape == (2, c, h // stride, w // stride)
    assert pyramid.strides == ([2, 4, 8, 16] if family == "vit" else [4, 8, 16, 32])


def test_dense_backbone_keeps_the_pretrained_weights(tiny_run):
    weights = resolve_weights(tiny_run)
    backbone = build_dense_backbone(weights, 64)  # another size: position embedding resampled
    state = backbone.model.state_dict()
    assert torch.equal(state["blocks.0.attn.qkv.weight"], weights.state["blocks.0.attn.qkv.weight"])
    assert state["pos_embed"].shape[1] == 1 + (64 // 8) ** 2
    assert not backbone.mask_token.requires_grad  # no masking downstream
