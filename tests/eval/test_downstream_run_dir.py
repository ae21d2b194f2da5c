"""The downstream training loop (eval/trainer.py) keeps the run folder's rules of pre-training:
locked, a previous run refused unless resumed or replaced, damaged checkpoints set aside."""

from __future__ import annotations

import fcntl
import json

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from conftest import held_by_another_run
from hvpmtl.config import Config, load_config
from hvpmtl.engine import run_dir as rd
from hvpmtl.engine.checkpoint import list_checkpoints
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.eval.trainer import DownstreamTask, train_downstream


class Points(Dataset):
    """Two Gaussian blobs; keys ``index`` or ``(index, epoch)`` as the sampler yields them."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 2
        self.x = torch.randn(n, 4, generator=g) + 2.0 * self.y[:, None]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        return self.x[i], self.y[i]


def _task() -> DownstreamTask:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    data = Points()

    def evaluate(net, env):
        return {"top1": float((net(data.x).argmax(1) == data.y).float().mean() * 100)}

    return DownstreamTask(
        name="toy", model=model, train_set=data, collate=lambda items: tuple(torch.stack(t) for t in zip(*items)),
        loss=lambda net, batch: {"loss": nn.functional.cross_entropy(net(batch[0]), batch[1])}, evaluate=evaluate,
        param_groups=[{"params": list(model.parameters())}], to_device=lambda batch, device: batch,
    )  # fmt: skip


def _cfg(*overrides: str) -> Config:
    base = ["train.epochs=2", "train.ckpt_every=2", "train.keep_ckpts=0", "train.progress=false", "train.log_every=2",
            "train.resume=auto", "train.loggers=[]", "optim.warmup_steps=1"]  # fmt: skip
    return load_config(None, [*base, *overrides])


def _train(run_dir, *overrides: str):
    return train_downstream(_task(), _cfg(*overrides), DistEnv(), run_dir, batch_size=16, num_workers=0)


def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp_path, capsys):
    out = tmp_path / "toy"
    first = _train(out)
    assert first.steps == 8 and [s for s, _ in list_checkpoints(out)] == [2, 4, 6, 8]
    newest = out / "checkpoints" / "step_00000008.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a write cut short
    again = _train(out)
    log = capsys.readouterr().out
    assert "skipped damaged checkpoint" in log and "resumed toy from" in log and "step_00000006.pt at step 6" in log
    assert (out / "checkpoints" / "step_00000008.pt.bad").is_file()
    assert again.steps == 8 and again.metrics == pytest.approx(first.metrics)
    starts = [json.loads(line)["start_step"] for line in (out / rd.ENVIRONMENT).read_text().splitlines()]
    assert starts == [0, 6]


def test_previous_run_is_refused_without_resume_and_replaced_with_overwrite(tmp_path, capsys):
    out = tmp_path / "toy"
    _train(out)
    with pytest.raises(ValueError, match="holds a previous run .*train.overwrite=true"):
        _train(out, "train.resume=''")
    with pytest.raises(ValueError, match="contradict"):
        _train(out, "train.overwrite=true")  # with train.resume=auto
    _train(out, "train.resume=''", "train.overwrite=true", "train.epochs=1")
    assert "removed the previous run's" in capsys.readouterr().out
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]  # the old run's 6 and 8 are gone
    assert len((out / "eval.csv").read_text().splitlines()) == 2  # header and the new run's one evaluation
    assert "overwrite: false" in (out / "config.yaml").read_text()  # a one-off, not saved


def test_folder_in_use_is_refused_and_released_after_the_run(tmp_path):
    out = tmp_path / "toy"
    out.mkdir()
    with held_by_another_run(out):  # pid 4242
        with pytest.raises(ValueError, match=r"in use by another run \(pid 4242\)"):
            _train(out)
        assert [p.name for p in out.iterdir()] == [rd.LOCK_NAME]  # nothing written
    _train(out)
    with open(out / rd.LOCK_NAME) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again once the run has ended


def test_skipped_steps_keep_batchnorm_statistics_and_a_run_without_a_good_step_fails(tmp_path):
    task = _task()
    torch.manual_seed(0)
    task.model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    task.param_groups = [{"params": list(task.model.parameters())}]
    task.loss = lambda net, batch: {"loss": net(batch[0]).sum() * float("nan")}  # every step non-finite
    bn = task.model[1]
    with pytest.raises(FloatingPointError, match=r"toy: no step succeeded \(4 of 4 steps skipped.*no final evaluation"):
        train_downstream(task, _cfg("train.epochs=1"), DistEnv(), tmp_path / "toy", batch_size=16, num_workers=0)
    assert not (tmp_path / "toy" / "eval.csv").exists()
    assert int(bn.num_batches_tracked) == 0 and not bn.running_mean.any() and torch.all(bn.running_var == 1)


def test_resume_with_another_schedule_warns_with_old_and_new_values(tmp_path, capsys):
    out = tmp_path / "toy"
    _train(out, "train.epochs=1")
    capsys.readouterr()
    _train(out, "train.epochs=2", "train.progress=true")
    warning = [line for line in capsys.readouterr().out.splitlines() if "with a changed config" in line]
    assert len(warning) == 1 and warning[0].endswith(": train.epochs 1 -> 2")  # progress is not a change to warn


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
    from hvpmtl.eval import trainer

    out = tmp_path / "toy"
    task = _task()
    evaluate = task.evaluate
    calls = []

    def killed_in_first_evaluation(net, env):
        calls.append(1)
        if len(calls) == 1:
            raise Killed
        return evaluate(net, env)

    task.evaluate = killed_in_first_evaluation
    with pytest.raises(Killed):
        train_downstream(task, _cfg(), DistEnv(), out, batch_size=16, num_workers=0)
    result = _train(out)
    assert _eval_rows(out) == [4, 8] and [row["step"] for row in result.history] == [4, 8]

    # a kill after the epoch-1 row was written but before its checkpoint: the resume redoes it once
    out = tmp_path / "toy2"
    save = trainer.ckpt_io.save_checkpoint

    def killed_before_step_4_is_saved(path, *args, **kwargs):
        if path.name == "step_00000004.pt":
            raise Killed
        return save(path, *args, **kwargs)

    monkeypatch.setattr(trainer.ckpt_io, "save_checkpoint", killed_before_step_4_is_saved)
    with pytest.raises(Killed):
        _train(out)
    assert _eval_rows(out) == [4]
    monkeypatch.setattr(trainer.ckpt_io, "save_checkpoint", save)
    result = _train(out)
    assert _eval_rows(out) == [4, 8] and [row["step"] for row in result.history] == [4, 8]
