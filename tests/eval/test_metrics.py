"""eval/metrics.py: multi-label CP/CR/CF1/OP/OR/OF1 (+ top-3), mAP and top-k, on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from hvpmtl.eval.metrics import is_single_label, mean_average_precision, multilabel_metrics, topk_accuracy

Y = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.float32)
S = torch.tensor([[0.9, 0.2, 0.1], [0.6, 0.7, 0.4], [0.8, 0.3, 0.2]])


def test_threshold_metrics_match_hand_computation():
    m = multilabel_metrics(S, Y)
    # at 0.5: predictions {0}, {0,1}, {0}; class 0: 2 of 3 right, all 2 found; class 1: 1 of 1 right,
    # 1 of 2 found; class 2: nothing predicted (precision 0), 0 of 1 found
    cp, cr = (2 / 3 + 1 + 0) / 3, (1 + 0.5 + 0) / 3
    op, orr = 3 / 4, 3 / 5
    assert m["CP"] == pytest.approx(100 * cp, abs=1e-4)
    assert m["CR"] == pytest.approx(100 * cr, abs=1e-4)
    assert m["CF1"] == pytest.approx(100 * 2 * cp * cr / (cp + cr), abs=1e-4)
    assert m["OP"] == pytest.approx(100 * op, abs=1e-4)
    assert m["OR"] == pytest.approx(100 * orr, abs=1e-4)
    assert m["OF1"] == pytest.approx(100 * 2 * op * orr / (op + orr), abs=1e-4)


def test_top3_predicts_each_images_three_best():
    m = multilabel_metrics(S, Y, top_k=2)  # top-2 of 3 classes: {0,1}, {1,0}, {0,1}
    # class 0: 2 of 3 right, 2 of 2 found; class 1: 2 of 3 right, 2 of 2 found; class 2: none
    assert m["CP_top2"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 0) / 3, abs=1e-4)
    assert m["CR_top2"] == pytest.approx(100 * (1 + 1 + 0) / 3, abs=1e-4)
    assert m["OP_top2"] == pytest.approx(100 * 4 / 6, abs=1e-4)
    assert m["OR_top2"] == pytest.approx(100 * 4 / 5, abs=1e-4)


def test_map_hand_computed():
    # classes 0 and 1 rank every positive first (AP 1); class 2's positive ranks last of 3 (AP 1/3)
    assert mean_average_precision(S, Y) == pytest.approx(100 * (1 + 1 + 1 / 3) / 3, abs=1e-4)
    assert mean_average_precision(Y, Y) == pytest.approx(100.0)
    # a class without positives is left out rather than counted as 0
    y = torch.cat([Y, torch.zeros(3, 1)], 1)
    assert mean_average_precision(torch.cat([S, torch.rand(3, 1)], 1), y) == pytest.approx(100 * 7 / 9, abs=1e-4)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]])
    targets = torch.tensor([1, 1, 2, 2])
    acc = topk_accuracy(scores, targets, (1, 2, 5))
    assert acc["top1"] == pytest.approx(50.0) and acc["top2"] == pytest.approx(75.0)
    assert "top5" not in acc  # more than the 3 classes
    assert topk_accuracy(scores, torch.eye(3)[targets], (1,))["top1"] == pytest.approx(50.0)  # one-hot targets


def test_is_single_label():
    assert is_single_label(torch.eye(3), torch.eye(3)[[0, 0]])
    assert not is_single_label(torch.eye(3), Y)
