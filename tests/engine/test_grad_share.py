"""grad_share_*: each objective's share of the backbone gradient, logged without changing training."""

from __future__ import annotations

import pytest

import hvpmtl
from hvpmtl.engine.loop import pretrain
from hvpmtl.engine.metrics import read_metrics

from .conftest import TINY

BASE = [*TINY, "tasks.mlc.dropout=0", "train.log_every=1", "data.num_workers=0", "train.max_steps=3"]
SHARES = [f"grad_share_{t}" for t in ("mlc", "swav", "mim", "distill")]


def _rows(tmp_path, name: str, *extra: str) -> list[dict]:
    out = tmp_path / name
    pretrain(hvpmtl.load_config("cpu-tiny", [*BASE, *extra, f"train.output_dir={out}"]))
    return read_metrics(out / "metrics.csv")


def test_shares_sum_to_one_and_scale_with_the_task_weight(tmp_path):
    a = _rows(tmp_path, "a", "train.grad_share_every=1")
    assert all(sum(r[k] for k in SHARES) == pytest.approx(1.0, abs=1e-6) for r in a)
    assert all(0 < r[k] < 1 for r in a for k in SHARES[:3])
    # at step 1 the teacher is the student: MD's loss and gradient are exactly 0, later they are not
    assert a[0]["grad_share_distill"] == 0 and a[1]["grad_share_distill"] > 0
    # step 1 is measured at the initial weights on the same batch, so the MIM term's gradient
    # norm doubles exactly with its weight while the others stay: its share ratio to MLC doubles
    b = _rows(tmp_path, "b", "train.grad_share_every=1", "tasks.mim.weight=2.0")
    ratio = lambda r: r["grad_share_mim"] / r["grad_share_mlc"]  # noqa: E731
    assert ratio(b[0]) == pytest.approx(2 * ratio(a[0]), rel=1e-4)


def test_measuring_shares_does_not_change_training(tmp_path):
    on = _rows(tmp_path, "on", "train.grad_share_every=1")
    off = _rows(tmp_path, "off", "train.grad_share_every=0")
    assert not any(k.startswith("grad_share") for k in off[0])
    for x, y in zip(on, off):
        for k in ("loss", "loss_mlc", "loss_swav", "loss_mim", "loss_distill", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-9), (x["step"], k)


def test_shares_only_where_they_can_be_measured(tmp_path):
    every2 = _rows(tmp_path, "every2", "train.grad_share_every=2")
    assert [r["grad_share_mlc"] == r["grad_share_mlc"] for r in every2] == [False, True, False]
    one_task = _rows(tmp_path, "one", "train.grad_share_every=1", "tasks.swav.weight=0", "tasks.mim.weight=0",
                     "tasks.distill.weight=0")  # fmt: skip
    assert not any(k.startswith("grad_share") for k in one_task[0])  # a single objective has all of it
    short = _rows(tmp_path, "short", "train.grad_share_every=5")  # longer than the run
    assert not any(k.startswith("grad_share") for k in short[0])
