"""Non-finite steps (engine/guards.py, engine/loop.py): a skipped step leaves no trace, a run
never ends in success with untrained or non-finite weights, and the end-of-run table says how
many steps were skipped."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import hvpmtl
from hvpmtl.engine.checkpoint import list_checkpoints, load_checkpoint
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.engine.faults import inject
from hvpmtl.engine.metrics import format_summary, summarize
from hvpmtl.pretraining import NonFiniteLossError, Trainer, pretrain

from .conftest import TINY, torchrun

FAST = [*TINY, "data.num_workers=0", "data.train_size=64"]
EXPORTS = ("model.safetensors", "backbone.safetensors")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _assert_bitwise_equal(now: dict, before: dict) -> None:
    assert now.keys() == before.keys()
    for k in before:
        assert torch.equal(now[k], before[k]), k


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_skipped_step_restores_every_buffer(tmp_path, accum_steps):
    cfg = hvpmtl.load_config("cpu-tiny", [*FAST, f"train.accum_steps={accum_steps}", f"train.output_dir={tmp_path}"])
    trainer = Trainer(cfg, DistEnv())
    trainer.sampler.set_epoch(0)
    loader = iter(trainer.loader)
    micro = [next(loader) for _ in range(accum_steps)]
    micro[-1]["views"][0][0, 0, 0, 0] = math.nan  # one NaN pixel in the step's last micro-batch
    bn = trainer.inner.swav.projection[1]
    assert isinstance(bn, torch.nn.BatchNorm1d)
    before = _state(trainer.inner)  # student, teacher, every buffer

    _, _, ok = trainer._train_step(iter(micro))
    assert not ok and trainer.inner.iteration == 0
    _assert_bitwise_equal(_state(trainer.inner), before)

    _, _, ok = trainer._train_step(iter([next(loader) for _ in range(accum_steps)]))
    assert ok and int(bn.num_batches_tracked) == accum_steps  # a good step still updates them
    assert torch.isfinite(bn.running_mean).all() and not torch.equal(bn.running_mean, before[
        "swav.projection.1.running_mean"])  # fmt: skip


def test_skipped_step_keeps_the_swav_queue_fill_count(tmp_path):
    # 32 rows of queue, 16 images a step: a skipped second step must not count the queue full
    # (its rows are put back with the buffers), or the next step would use 16 rows never filled
    args = [*FAST, "tasks.swav.queue_length=32", f"train.output_dir={tmp_path}"]
    with inject(nan_at_step=1):
        trainer = Trainer(hvpmtl.load_config("cpu-tiny", args), DistEnv())
    trainer.sampler.set_epoch(0)
    batches, head = iter(trainer.loader), trainer.inner.swav
    assert trainer._train_step(batches)[2] and head.queue_filled == 16
    trainer.step = 1
    assert not trainer._train_step(batches)[2]
    assert head.queue_filled == 16 and int(head.queue_rows) == 16
    assert not trainer.inner.objectives["swav"].phase(trainer.inner, trainer.inner.iteration)["use_queue"]


def test_run_without_a_good_step_fails_and_exports_nothing(run_cli, tmp_path):
    out = tmp_path / "run"
    args = [*FAST, "train.max_steps=3", "train.max_bad_steps=5", f"train.output_dir={out}"]
    with inject(nan_at_step=0):
        rc, stdout, err = run_cli("pretrain", *args)
    assert rc == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: no step succeeded (3 of 3 steps skipped") and "nothing exported" in line
    assert "Traceback" not in err and "throughput" not in stdout
    assert not any((out / name).exists() for name in EXPORTS) and list_checkpoints(out) == []


def test_nonfinite_weights_fail_naming_the_tensor(tmp_path):
    # a finite learning rate beyond float32's range turns the weights into infinities and NaNs
    cfg = hvpmtl.load_config("cpu-tiny", [*FAST, "train.max_steps=3", "optim.lr=1e39", "optim.warmup_steps=0",
                                          "train.max_bad_steps=5", f"train.output_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(NonFiniteLossError) as info:
        pretrain(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert "non-finite weights (2 of 3 steps skipped" in message
    assert "first non-finite tensor: backbone." in message and "nothing exported" in message
    assert not any((tmp_path / name).exists() for name in EXPORTS) and list_checkpoints(tmp_path) == []


def test_partly_skipped_run_succeeds_and_counts_skips(run_cli, tmp_path):
    out = tmp_path / "run"
    args = [*FAST, "train.max_steps=3", "train.max_bad_steps=5", "train.ckpt_every=1",
            "train.keep_ckpts=0", f"train.output_dir={out}"]  # fmt: skip
    with inject(nan_at_step=1):
        rc, stdout, _ = run_cli("pretrain", *args)
    assert rc == 0
    assert "skipped steps: 2 of 3 (non-finite loss or gradient)" in stdout
    loss_line = next(line for line in stdout.splitlines() if line.startswith("loss_mlc"))
    assert loss_line.split()[-1] == "—"  # one finite row: no change to report
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    # the skipped steps 2 and 3 left the buffers as step 1 made them
    step1 = load_checkpoint(out / "checkpoints" / "step_00000001.pt")["model"]
    assert int(weights["swav.projection.1.num_batches_tracked"]) == 1
    for k in ("swav.projection.1.running_mean", "swav.projection.1.running_var"):
        assert torch.equal(weights[k], step1[k]), k


def test_summary_marks_changes_from_fewer_than_two_rows():
    nan = math.nan
    rows = [{"loss": 2.0, "loss_mim": nan}, {"loss": nan, "loss_mim": nan}, {"loss": nan, "loss_mim": 1.0}]
    rows += [{"loss": 1.0, "loss_mim": nan}]
    summary = summarize(rows, ("loss", "loss_mim", "loss_swav"))
    assert summary["finite_rows"] == {"loss": 2, "loss_mim": 1, "loss_swav": 0}
    table = format_summary(summary, 4, 2, 1.0, 10.0).splitlines()
    assert table[1].split() == ["loss", "2", "1", "-50.0%"]
    assert table[2].split() == ["loss_mim", "1", "1", "—"]
    assert table[3].split() == ["loss_swav", "—", "—", "—"]
    assert table[4] == "skipped steps: 2 of 4 (non-finite loss or gradient)"
    assert "skipped steps" not in format_summary(summarize(rows[:1], ("loss",)), 1, 0, 1.0, 10.0)


@pytest.mark.slow
def test_ddp_skipped_steps_keep_buffers(tmp_path):
    out = tmp_path / "run"
    args = [*FAST, "train.max_steps=3", "train.max_bad_steps=5", "train.ckpt_every=1",
            "train.keep_ckpts=0", f"train.output_dir={out}"]  # fmt: skip
    with inject(nan_at_step=1):  # the ranks inherit the environment
        r = torchrun(2, ["pretrain", *args])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped steps: 2 of 3" in r.stdout
    weights = load_file(out / "model.safetensors")
    step1 = load_checkpoint(out / "checkpoints" / "step_00000001.pt")["model"]
    buffers = [k for k in weights if "running_" in k or "num_batches_tracked" in k]
    assert buffers
    for k in buffers:
        assert torch.equal(weights[k], step1[k]), k
