"""What the downstream tasks (eval/downstream.py) add to the one training loop: eval.csv (started
afresh by train.overwrite, rewritten from the checkpoint's history on resume), the epoch-end
checkpoint after its evaluation, the pre-training error for non-finite runs, one-line refusals at
the command line. The loop's own run-folder rules are tested on a toy task in
tests/engine/test_task_loop.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import Points, held_by_another_run
from hvpmtl.config import Config, load_config
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.engine.loop import NonFiniteLossError
from hvpmtl.engine.metrics import read_metrics
from hvpmtl.eval.downstream import DownstreamTask, train_downstream


def _task() -> DownstreamTask:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    data = Points()

    def evaluate(net, env):
        return {"top1": float((net(data.x).argmax(1) == data.y).float().mean() * 100)}

    return DownstreamTask(
        name="toy", model=model, train_set=data, collate=lambda items: tuple(torch.stack(t) for t in zip(*items)),
        loss_fn=lambda net, batch: {"loss": nn.functional.cross_entropy(net(batch[0]), batch[1])},
        evaluate_fn=evaluate, groups=[{"params": list(model.parameters())}], to_device=lambda batch, device: batch,
    )  # fmt: skip


def _cfg(*overrides: str) -> Config:
    base = ["train.epochs=2", "train.ckpt_every=2", "train.keep_ckpts=0", "train.progress=false", "train.log_every=2",
            "train.resume=auto", "train.loggers=[]", "optim.warmup_steps=1"]  # fmt: skip
    return load_config(None, [*base, *overrides])


def _train(run_dir, *overrides: str):
    return train_downstream(_task(), _cfg(*overrides), DistEnv(), run_dir, batch_size=16, num_workers=0)


def test_overwrite_starts_eval_csv_afresh(tmp_path, capsys):
    out = tmp_path / "toy"
    _train(out)
    _train(out, "train.resume=''", "train.overwrite=true", "train.epochs=1")
    assert "removed the previous run's" in capsys.readouterr().out
    assert len((out / "eval.csv").read_text().splitlines()) == 2  # header and the new run's one evaluation


def test_a_run_without_a_good_step_raises_the_pretraining_error_and_evaluates_nothing(tmp_path):
    task = _task()
    task.loss_fn = lambda net, batch: {"loss": net(batch[0]).sum() * float("nan")}  # every step non-finite
    with pytest.raises(NonFiniteLossError, match=r"toy: no step succeeded \(4 of 4 steps skipped.*no final evaluation"):
        train_downstream(task, _cfg("train.epochs=1"), DistEnv(), tmp_path / "toy", batch_size=16, num_workers=0)
    assert not (tmp_path / "toy" / "eval.csv").exists()


def test_loggers_and_the_weight_decay_schedule_apply_downstream(tmp_path):
    out = tmp_path / "toy"
    _train(out, "optim.weight_decay=0.05", "optim.weight_decay_end=0.5", "train.loggers=[]")
    rows = read_metrics(out / "metrics.csv")
    assert rows[0]["wd"] == pytest.approx(0.05) and rows[-1]["wd"] > 0.45  # cosine from 0.05 to 0.5
    assert not (out / "tb").exists()  # train.loggers=[]: metrics.csv only


def test_cli_refuses_a_folder_in_use_with_one_line(tiny_run, tmp_path, capsys):
    from hvpmtl.cli import main

    out = tmp_path / "ft"
    out.mkdir()
    with held_by_another_run(out):  # pid 4242
        rc = main(["finetune", str(tiny_run), "data.dataset=synthetic", "data.train_size=16", "data.val_size=8",
                   "data.batch_size=8", "data.num_workers=0", "train.max_steps=1", "train.progress=false",
                   f"train.output_dir={out}"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"error: train.output_dir={out} is in use by another run (pid 4242)"


class Killed(Exception):
    """A kill -9 at a chosen point, as an exception (the process's state after it is not used)."""


def _eval_rows(run_dir) -> list[int]:
    return [int(line.split(",")[0]) for line in (run_dir / "eval.csv").read_text().splitlines()[1:]]


def test_a_kill_around_the_epoch_evaluation_loses_no_evaluation_and_repeats_none(tmp_path, monkeypatch):
    """Epochs of 4 steps, checkpoints every 2: the epoch-end checkpoint at step 4 must come after
    the epoch-1 evaluation, and an evaluation redone after a resume must not be listed twice."""
    from hvpmtl.engine import checkpoint as ckpt_io

    out = tmp_path / "toy"
    task = _task()
    evaluate = task.evaluate_fn
    calls = []

    def killed_in_first_evaluation(net, env):
        calls.append(1)
        if len(calls) == 1:
            raise Killed
        return evaluate(net, env)

    task.evaluate_fn = killed_in_first_evaluation
    with pytest.raises(Killed):
        train_downstream(task, _cfg(), DistEnv(), out, batch_size=16, num_workers=0)
    result = _train(out)
    assert _eval_rows(out) == [4, 8] and [row["step"] for row in result.history] == [4, 8]

    # a kill after the epoch-1 row was written but before its checkpoint: the resume redoes it once
    out = tmp_path / "toy2"
    save = ckpt_io.save_checkpoint

    def killed_before_step_4_is_saved(path, *args, **kwargs):
        if path.name == "step_00000004.pt":
            raise Killed
        return save(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_io, "save_checkpoint", killed_before_step_4_is_saved)
    with pytest.raises(Killed):
        _train(out)
    assert _eval_rows(out) == [4]
    monkeypatch.setattr(ckpt_io, "save_checkpoint", save)
    result = _train(out)
    assert _eval_rows(out) == [4, 8] and [row["step"] for row in result.history] == [4, 8]
