"""Pre-training on partly tagged data: the known-tag counts of the global batch reach every
micro-batch (engine/known_counts.py), so MLC's mean over known tags is the same with gradient
accumulation and with N processes as with one process on the whole batch."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from hvpmtl.engine.distributed import DistEnv
from hvpmtl.engine.known_counts import KnownCountFeed
from hvpmtl.engine.metrics import read_metrics

from .conftest import TINY, torchrun

PARTLY = [*TINY, "tasks.mlc.dropout=0", "train.log_every=1", "data.num_workers=0", "data.tagged_fraction=0.5"]
MLC_ONLY = ["tasks.swav.weight=0", "tasks.mim.weight=0", "tasks.distill.weight=0"]


class _Feed:
    def __init__(self):
        self.calls = 0

    def next(self, batches, step):
        self.calls += 1
        return next(batches)

    def prefetch(self, *args):
        pass


def _micro(known: list[bool]) -> dict:
    return {"labels": torch.zeros(len(known), 3), "known": torch.tensor(known)[:, None]}


def test_feed_hands_each_micro_batch_the_global_counts_per_shard():
    inner = _Feed()
    feed = KnownCountFeed(inner, accum_steps=2, env=DistEnv())
    batches = iter([_micro([True, False]), _micro([False, False]), _micro([True, True]), _micro([True, False])])
    first, second = feed.next(batches, 0), feed.next(batches, 0)
    assert inner.calls == 2  # both read at the first call
    # step 0: 1 tagged image of 4, 3 classes -> [3 elements, 1 image] over 2 shards
    assert first["known_counts"].tolist() == second["known_counts"].tolist() == [1.5, 0.5]
    assert feed.next(batches, 1)["known_counts"].tolist() == [4.5, 1.5]
    plain = KnownCountFeed(_Feed(), accum_steps=2, env=DistEnv())
    assert "known_counts" not in plain.next(iter([{"labels": torch.zeros(2, 3)}]), 0)  # fully tagged: as before
    one = KnownCountFeed(_Feed(), accum_steps=1, env=DistEnv())
    assert "known_counts" not in one.next(iter([_micro([True, False])]), 0)  # one shard counts itself


def _run(tmp_path, name: str, args: list[str], nproc: int = 1):
    out = tmp_path / name
    full = ["pretrain", *args, "train.max_steps=3", f"train.output_dir={out}"]
    if nproc == 1:
        from hvpmtl.cli import main

        assert main(full) == 0
    else:
        r = torchrun(nproc, full)
        assert r.returncode == 0, r.stderr[-3000:]
    return read_metrics(out / "metrics.csv"), load_file(out / "model.safetensors")


def _same(a, b, keys) -> None:
    (ma, wa), (mb, wb) = a, b
    assert len(ma) == len(mb) == 3
    for x, y in zip(ma, mb):
        for k in keys:
            assert math.isfinite(x[k]) and y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k)
    diffs = torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in wa])
    assert diffs.max() < 2e-3 and diffs.median() < 1e-6, (diffs.max(), diffs.median())


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ("query2label", "per_image"))
def test_accumulation_matches_one_batch_with_untagged_images(reduction, tmp_path):
    args = [*PARTLY, *MLC_ONLY, f"tasks.mlc.reduction={reduction}"]
    one = _run(tmp_path, "one", [*args, "train.accum_steps=1"])
    two = _run(tmp_path, "two", [*args, "train.accum_steps=2"])
    _same(one, two, ("loss", "loss_mlc", "grad_norm"))


@pytest.mark.slow
def test_two_processes_match_one_with_untagged_images(tmp_path):
    # all four tasks: SwAV's Sinkhorn and MD also see the untagged images; query2label, the default
    args = [*PARTLY, "train.accum_steps=2", "tasks.swav.queue_length=16"]
    single = _run(tmp_path, "single", args)
    double = _run(tmp_path, "double", args, nproc=2)
    _same(single, double, ("loss", "loss_mlc", "loss_swav", "loss_mim", "loss_distill", "grad_norm"))
