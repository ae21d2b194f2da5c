"""grad_share_*: each objective's share of the backbone gradient, logged without changing training."""

from __future__ import annotations

import itertools

import pytest
import torch

import hvpmtl
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.engine.grad_share import grad_shares
from hvpmtl.engine.metrics import read_metrics
from hvpmtl.pretraining import pretrain

from .conftest import TINY

BASE = [*TINY, "tasks.mlc.dropout=0", "train.log_every=1", "data.num_workers=0", "train.max_steps=3"]
SHARES = [f"grad_share_{t}" for t in ("mlc", "swav", "mim", "distill")]
COSINES = [f"grad_cos_{a}_{b}" for a, b in itertools.combinations(("mlc", "swav", "mim", "distill"), 2)]


def _rows(tmp_path, name: str, *extra: str) -> list[dict]:
    out = tmp_path / name
    pretrain(hvpmtl.load_config("cpu-tiny", [*BASE, *extra, f"train.output_dir={out}"]))
    return read_metrics(out / "metrics.csv")


def test_shares_sum_to_one_and_scale_with_the_task_weight(tmp_path):
    a = _rows(tmp_path, "a", "train.grad_share_every=1")
    assert all(sum(r[k] for k in SHARES) == pytest.approx(1.0, abs=3e-6) for r in a)  # 6 digits each in the CSV
    assert all(0 < r[k] < 1 for r in a for k in SHARES[:3])
    assert all(-1 <= r[k] <= 1 for r in a for k in COSINES) and any(r[k] != 0 for r in a for k in COSINES)
    assert a[0]["grad_cos_mlc_distill"] == 0 and a[1]["grad_cos_mlc_distill"] != 0  # MD's gradient: 0, then not
    # at step 1 the teacher is the student: MD's loss and gradient are exactly 0, later they are not
    assert a[0]["grad_share_distill"] == 0 and a[1]["grad_share_distill"] > 0
    # step 1 is measured at the initial weights on the same batch, so the MIM term's gradient
    # norm doubles exactly with its weight while the others stay: its share ratio to MLC doubles
    b = _rows(tmp_path, "b", "train.grad_share_every=1", "tasks.mim.weight=2.0")
    ratio = lambda r: r["grad_share_mim"] / r["grad_share_mlc"]  # noqa: E731
    assert ratio(b[0]) == pytest.approx(2 * ratio(a[0]), rel=1e-4)


def test_shares_and_cosines_hand_computed():
    w, v = torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([4.0, 4.0])
    u = torch.ones(1, requires_grad=True)  # not a backbone parameter
    terms = {  # gradients over (w, v): (3, 0, 0), (4, 4, 3), (-6, 0, 0) and none at all
        "x": (a * w).sum(),
        "y": (b * w).sum() + 1.5 * v.square().sum() / 3,
        "z": -2 * (a * w).sum(),
        "off": 5 * u.sum(),
    }
    got = grad_shares(terms, [w, v], DistEnv())
    norms = {"x": 3.0, "y": (16 + 16 + 9) ** 0.5, "z": 6.0, "off": 0.0}
    for t, n in norms.items():
        assert got[f"grad_share_{t}"] == pytest.approx(n / sum(norms.values()))
    assert got["grad_cos_x_y"] == pytest.approx(12 / (3 * 41**0.5))
    assert got["grad_cos_x_z"] == pytest.approx(-1.0) and got["grad_cos_y_z"] == pytest.approx(-24 / (6 * 41**0.5))
    assert got["grad_cos_x_off"] == 0.0  # no gradient: reported as 0, not nan
    assert len(got) == 4 + 6


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
