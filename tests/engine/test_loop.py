"""End-to-end pre-training runs (engine/loop.py): loss falls, files, exact resume, NaN steps."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hvpmtl.engine.checkpoint import list_checkpoints, load_checkpoint
from hvpmtl.engine.faults import inject
from hvpmtl.engine.metrics import read_metrics

from .conftest import TINY

pytestmark = pytest.mark.slow


def test_pretrain_loss_falls_and_writes_run_folder(run_cli, tmp_path):
    out = tmp_path / "run"
    rc, stdout, _ = run_cli("pretrain", *TINY, "train.max_steps=30", "train.ckpt_every=10", f"train.output_dir={out}")
    assert rc == 0
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first, (first, last)
    for name in ("config.yaml", "backbone.safetensors", "model.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "tb").iterdir())
    assert [s for s, _ in list_checkpoints(out)] == [20, 30]  # keep_ckpts=2
    ckpt = load_checkpoint(out / "checkpoints" / "step_00000030.pt")
    assert ckpt["step"] == 30 and ckpt["model"]["_extra_state"]["iteration"] == 30
    assert ckpt["config"]["data"]["num_classes"] == 10
    assert "loss_mlc" in stdout and "throughput" in stdout
    assert {"backbone.model.cls_token", "teacher.backbone.model.cls_token"} <= set(load_file(out / "model.safetensors"))
    assert "cls_token" in load_file(out / "backbone.safetensors")


# mid-epoch; inside the prototypes' freeze; with SwAV's queue (2 steps to fill, in use from step 3)
@pytest.mark.parametrize("ckpt_every, crash, queue", [(5, 8, 0), (2, 3, 0), (5, 8, 32)])
def test_killed_run_resumes_exactly(run_cli, tmp_path, ckpt_every, crash, queue):
    # 4 steps per epoch; MLC dropout on, so the restored RNG states matter
    common = [*TINY, "data.train_size=64", "train.max_steps=12", f"train.ckpt_every={ckpt_every}", "train.log_every=1",
              f"tasks.swav.queue_length={queue}"]  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("pretrain", *common, f"train.output_dir={a}")[0] == 0
    with inject(stop_after=crash):
        rc, _, err = run_cli("pretrain", *common, f"train.output_dir={b}")
    assert rc == 1 and f"simulated crash after step {crash}" in err
    last = crash // ckpt_every * ckpt_every
    assert [s for s, _ in list_checkpoints(b)][-1] == last
    assert max(r["step"] for r in read_metrics(b / "metrics.csv")) > last  # rows past the checkpoint
    assert run_cli("pretrain", *common, f"train.output_dir={b}", "train.resume=auto")[0] == 0

    ra, rb = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    for x, y in zip(ra, rb):
        for k in x:
            if k != "img_per_s":
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (x["step"], k)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=k)
    # each start of a run adds a line: what its numbers depend on besides the config
    starts = [json.loads(line) for line in (b / "environment.jsonl").read_text().splitlines()]
    assert [s["start_step"] for s in starts] == [0, last]
    assert all(s["torch_threads"] == torch.get_num_threads() and s["world_size"] == 1 for s in starts)
    assert starts[0]["torch"] == torch.__version__ and starts[0]["device"] == "cpu"


def test_fresh_run_refuses_folder_with_checkpoints(run_cli, tmp_path):
    out = tmp_path / "run"
    assert run_cli("pretrain", *TINY, "train.max_steps=2", f"train.output_dir={out}")[0] == 0
    rc, _, err = run_cli("pretrain", *TINY, "train.max_steps=2", f"train.output_dir={out}")
    assert rc == 2 and "train.resume=auto" in err


def test_resume_from_path_continues_to_longer_run(run_cli, tmp_path):
    out = tmp_path / "run"
    assert run_cli("pretrain", *TINY, "train.max_steps=4", f"train.output_dir={out}")[0] == 0
    path = out / "checkpoints" / "step_00000004.pt"
    rc, stdout, _ = run_cli("pretrain", "--resume", str(path), "train.max_steps=6")
    assert rc == 0 and "resumed from" in stdout
    assert [int(r["step"]) for r in read_metrics(out / "metrics.csv")] == list(range(1, 7))


def test_nonfinite_steps_are_skipped_then_abort(run_cli, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "train.max_steps=20", "train.max_bad_steps=4", f"train.output_dir={out}"]
    with inject(nan_at_step=3):
        rc, _, err = run_cli("pretrain", *args)
    assert rc == 1
    assert "4 consecutive steps had a non-finite loss" in err and "train.max_bad_steps=4" in err
    assert "step 4: non-finite loss or gradient, step skipped (1 in a row" in err
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["skipped_steps"]) for r in rows] == [0, 0, 0, 1, 2, 3, 4]


def test_skipped_step_leaves_weights_and_teacher_untouched(tmp_path):
    import hvpmtl
    from hvpmtl.engine.distributed import DistEnv
    from hvpmtl.pretraining import Trainer

    overrides = [*TINY, "train.max_steps=3", f"train.output_dir={tmp_path}"]
    cfg = hvpmtl.load_config("cpu-tiny", overrides)
    with inject(nan_at_step=1):
        trainer = Trainer(cfg, DistEnv())
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.loader)
    _, _, ok = trainer._train_step(batches)
    trainer.step += 1
    assert ok and trainer.inner.iteration == 1
    before = {k: v.clone() for k, v in trainer.inner.state_dict().items() if isinstance(v, torch.Tensor)}
    state = trainer.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    _, _, ok = trainer._train_step(batches)
    assert not ok and trainer.inner.iteration == 1
    for k, v in trainer.inner.state_dict().items():
        if isinstance(v, torch.Tensor) and "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(v, before[k], msg=k)
    torch.testing.assert_close(trainer.optimizer.state_dict()["state"][0]["exp_avg"], state)
    assert all(p.grad is None for p in trainer.inner.parameters())


@pytest.mark.parametrize("reduction", ["global_sum", "per_image", "query2label"])
def test_gradient_accumulation_matches_one_big_batch(run_cli, tmp_path, reduction):
    # without SwAV (its BatchNorm and Sinkhorn see the micro-batch) and dropout, two micro-batches
    # of 8 give the step of one batch of 16 -- under each of MLC's reductions, the image-summed one
    # (rescaled by the loop) and the per-image means
    common = [*TINY, "tasks.swav.weight=0", "tasks.mlc.dropout=0", "train.max_steps=3", "train.log_every=1",
              f"tasks.mlc.reduction={reduction}"]  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("pretrain", *common, f"train.output_dir={a}")[0] == 0
    assert run_cli("pretrain", *common, "train.accum_steps=2", f"train.output_dir={b}")[0] == 0
    for x, y in zip(read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")):
        for k in ("loss", "loss_mlc", "loss_mim", "loss_distill", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k)


def test_initial_weights_depend_on_the_seed_only(tmp_path):
    import hvpmtl
    from hvpmtl.engine.distributed import DistEnv
    from hvpmtl.pretraining import Trainer

    cfg = hvpmtl.load_config("cpu-tiny", [*TINY, f"train.output_dir={tmp_path}", "train.seed=7"])
    trainer = Trainer(cfg, DistEnv())
    torch.manual_seed(7)  # what the demo does to get the "random init" baseline
    fresh = hvpmtl.build(cfg, 10)
    for (k, a), b in zip(fresh.state_dict().items(), trainer.inner.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, msg=k)


def test_bf16_autocast_runs_on_cpu(run_cli, tmp_path):
    out = tmp_path / "run"
    assert run_cli("pretrain", *TINY, "train.max_steps=3", "train.precision=bf16", f"train.output_dir={out}")[0] == 0
    rows = read_metrics(out / "metrics.csv")
    assert len(rows) == 3 and all(r["skipped_steps"] == 0 and r["loss"] == r["loss"] for r in rows)
