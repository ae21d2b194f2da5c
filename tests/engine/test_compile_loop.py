"""``train.compile=model`` in the pre-training loop (dynamo's ``aot_eager`` backend: AOT
autograd's forward and backward graphs without code generation, so it runs in seconds)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from hvpmtl.engine.metrics import read_metrics

from .conftest import TINY

# SwAV's prototypes unfreeze after step 2; its queue (48 rows, 16 images a step) is full after
# step 3: one graph per phase, three in all.
PHASES = ["tasks.swav.freeze_prototypes_iters=2", "tasks.swav.queue_length=48"]


@pytest.mark.slow
def test_pretrain_with_the_whole_forward_compiled_matches_eager(run_cli, tmp_path, monkeypatch):
    """The loop's ``train.compile=model`` (under AOT autograd, gradient shares' retained graph
    included) trains as the eager loop does."""
    args = [*TINY, *PHASES, "train.max_steps=6", "train.log_every=1",
            "train.grad_share_every=2", "data.num_workers=0"]  # fmt: skip
    rc, _, err = run_cli("pretrain", *args, f"train.output_dir={tmp_path / 'eager'}")
    assert rc == 0, err
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    rc, _, err = run_cli("pretrain", *args, "train.compile=model", f"train.output_dir={tmp_path / 'model'}")
    assert rc == 0, err
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    eager, compiled = read_metrics(tmp_path / "eager" / "metrics.csv"), read_metrics(tmp_path / "model" / "metrics.csv")
    assert len(eager) == len(compiled) == 6
    for e, c in zip(eager, compiled, strict=True):
        for key in ("loss", "loss_mlc", "loss_swav", "loss_mim", "loss_distill", "grad_share_mim", "grad_share_mlc"):
            assert c[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6, nan_ok=True), (e["step"], key)
    assert sum(math.isfinite(r["grad_share_mim"]) for r in compiled) == 3  # steps 2, 4, 6
