"""benchmarks/mlc_head_alone.py: the MLC head trained alone on frozen features, scored by mAP."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mlc_head_alone as bench  # noqa: E402


def test_mean_ap_ranks_positives_first_and_skips_tags_without_any():
    y = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float)
    perfect = y * 2 - 1
    assert bench.mean_ap(perfect, y) == 100.0
    reversed_ = -perfect  # positives last: AP of tag 0 is (1/3 + 2/4) / 2, of tag 1 1/4
    expected = 100 * ((1 / 3 + 2 / 4) / 2 + 1 / 4) / 2
    assert abs(bench.mean_ap(reversed_, y) - expected) < 1e-4


def test_the_cosine_schedule_is_the_cpu_presets(capsys):
    assert bench.lr_factor(0, 300, "cosine") == 1 / 20
    assert bench.lr_factor(20, 300, "cosine") == 1.0
    assert abs(bench.lr_factor(299, 300, "cosine") - 0.01) < 1e-3
    assert bench.lr_factor(49, 300, "constant") == 0.5 and bench.lr_factor(200, 300, "constant") == 1.0


def test_a_run_prints_one_row_per_variant(monkeypatch, capsys):
    argv = ["mlc_head_alone.py", "-c", "cpu-tiny", "--train-images", "64", "--eval-images", "32", "--steps", "4",
            "--every", "2", "--variants", "linear-bce,paper,prior", "backbone.kwargs.depth=1"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == ["linear-bce", "paper", "prior"]
    for row in rows:
        scores = [float(v) for v in row.split(" | ")[1].rstrip(" |").split(" / ")]
        assert len(scores) == 2 and all(0 < v <= 100 for v in scores)
