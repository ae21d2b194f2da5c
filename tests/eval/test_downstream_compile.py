"""``train.compile`` in finetune and segment: the whole model compiled trains as the eager one
(dynamo's ``aot_eager`` backend: AOT autograd without code generation, so it runs in seconds)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from hvpmtl.engine.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import run_cli  # noqa: E402

STEPS = ["--random-init", "data.train_size=16", "data.val_size=8", "data.batch_size=8", "data.num_workers=0",
         "train.max_steps=3", "train.log_every=1", "train.progress=false"]  # fmt: skip
EXTRA = {"finetune": ["finetune.drop_path=0.0", "finetune.mixup=0.0", "finetune.cutmix=0.0"],
         "segment": ["segment.decoder_channels=16"]}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("command", ["finetune", "segment"])
def test_the_whole_model_compiled_trains_as_eager(command, capsys, tmp_path, monkeypatch):
    args = [command, *STEPS, *EXTRA[command]]
    status, err = run_cli(capsys, *args, f"train.output_dir={tmp_path / 'eager'}")
    assert status == 0, err
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    status, err = run_cli(capsys, *args, "train.compile=model", f"train.output_dir={tmp_path / 'compiled'}")
    assert status == 0, err
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])  # it was compiled
    eager = read_metrics(tmp_path / "eager" / "metrics.csv")
    compiled = read_metrics(tmp_path / "compiled" / "metrics.csv")
    assert len(eager) == len(compiled) == 3
    for e, c in zip(eager, compiled, strict=True):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-4, abs=1e-6), e["step"]
