"""eval/linear_probe.py: logistic regression on frozen features, settings chosen on train only."""

from __future__ import annotations

import pytest
import torch

from hvpmtl.eval.config import ProbeConfig
from hvpmtl.eval.linear_probe import fit_linear, probe


def _data(n: int, seed: int, classes: int = 4, dim: int = 12):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, classes, generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, dim, generator=g) * 3 + 1.0  # not standardised: the probe must do it
    return x, torch.eye(classes)[(x @ w).argmax(1)]


def test_linearly_separable_classes_are_learned():
    (xtr, ytr), (xte, yte) = _data(400, 0), _data(200, 1)
    r = probe(xtr, ytr, xte, yte, ProbeConfig(weight_decays=[0.0, 1e-2]))
    assert r["top1"] > 90 and r["holdout_score"] > 85 and r["weight_decay"] in (0.0, 1e-2)
    noise = probe(xtr, ytr[torch.randperm(400)], xte, yte, ProbeConfig(weight_decays=[1e-2]))
    assert noise["top1"] < 50  # shuffled train labels: near chance (25 %)


def test_choice_never_sees_the_test_split():
    (xtr, ytr), (xte, yte) = _data(200, 0), _data(100, 1)
    cfg = ProbeConfig(weight_decays=[0.0, 1e-3, 1e-1])
    a = probe(xtr, ytr, xte, yte, cfg)
    b = probe(xtr, ytr, xte, yte[torch.randperm(100)], cfg)
    assert (a["weight_decay"], a["holdout_score"]) == (b["weight_decay"], b["holdout_score"])
    assert a["top1"] != b["top1"]


def test_l2_penalty_shrinks_weights_and_adamw_path_learns():
    x, y = _data(200, 0)
    x = (x - x.mean(0)) / x.std(0)
    small = fit_linear(x, y, True, epochs=50, weight_decay=0.0).weight.norm()
    large = fit_linear(x, y, True, epochs=50, weight_decay=1.0).weight.norm()
    assert large < 0.5 * small
    layer = fit_linear(x, y, True, epochs=200, lr=0.1, weight_decay=0.0, optimizer="adamw")
    assert (layer(x).argmax(1) == y.argmax(1)).float().mean() > 0.9


def test_multi_label_probe_reports_map():
    (xtr, ytr), (xte, yte) = _data(300, 0), _data(150, 1)
    ytr, yte = torch.cat([ytr, 1 - ytr[:, :1]], 1), torch.cat([yte, 1 - yte[:, :1]], 1)
    r = probe(xtr, ytr, xte, yte, ProbeConfig(optimizer="adamw", lrs=[0.1], weight_decays=[0.0], epochs=200))
    assert r["mAP"] > 90 and "CF1" in r and r["lr"] == pytest.approx(0.1)


def test_feature_kinds_hand_computed():
    """``grid`` = class token, map mean, then the map's four quadrant means (row-major)."""
    from hvpmtl.eval.features import backbone_features

    fmap = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    pooled = torch.full((2, 5), -1.0)

    def backbone(images, mask):
        return fmap, pooled

    mean = fmap.mean(dim=(2, 3))
    assert torch.equal(backbone_features(backbone, None, "both"), torch.cat([pooled, mean], 1))
    grid = backbone_features(backbone, None, "grid")
    assert grid.shape == (2, 5 + 3 + 3 * 4)
    top_right = fmap[:, :, :2, 2:].mean(dim=(2, 3))  # channel c's cells sit at 8 + 4c .. 8 + 4c + 3
    assert torch.equal(grid[:, :8], torch.cat([pooled, mean], 1))
    assert torch.allclose(grid[:, 8 + 1 :: 4], top_right)
    with pytest.raises(ValueError, match="grid"):
        backbone_features(backbone, None, "grids")
