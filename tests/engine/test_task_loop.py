"""The one training loop (engine/loop.py) on a toy task (engine/task.py): the run folder's rules
(locked, a previous run refused unless resumed or replaced, damaged checkpoints set aside, every
checkpoint kept with train.keep_ckpts=0), the epoch-end checkpoint after the task's evaluation,
and skipped non-finite steps that leave no trace."""

from __future__ import annotations

import fcntl
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from conftest import Points, held_by_another_run
from hvpmtl.config import Config, load_config
from hvpmtl.engine import run_dir as rd
from hvpmtl.engine.checkpoint import list_checkpoints, load_checkpoint
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.engine.loop import NonFiniteLossError, fit
from hvpmtl.engine.sampler import GlobalBatchSampler
from hvpmtl.engine.task import BatchFeed, TrainingTask, to_device


class Toy(TrainingTask):
    """A linear classifier on :class:`Points`; evaluated every epoch (steps recorded in order,
    and in the checkpoints)."""

    name = title = "toy"
    eval_every = 1
    checkpoint_each_epoch = True

    def __init__(self, model: nn.Module | None = None, nan: bool = False):
        torch.manual_seed(0)
        self.model = model or nn.Linear(4, 2)
        self.points, self.nan = Points(), nan
        self.evaluated: list[int] = []

    def data(self, cfg, env):
        sampler = GlobalBatchSampler(len(self.points), 16, env.rank, env.world_size, cfg.train.accum_steps, 0)
        loader = DataLoader(
            self.points, batch_sampler=sampler, collate_fn=lambda items: [torch.stack(t) for t in zip(*items)]
        )
        return loader, sampler, BatchFeed(to_device, env.device)

    def loss(self, model, batch, step):
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        return {"loss": loss * float("nan") if self.nan else loss}

    def evaluate(self, loop, final):
        if not (final and self.evaluated and self.evaluated[-1] == loop.step):
            self.evaluated.append(loop.step)

    def state_dict(self):
        return {"evaluated": list(self.evaluated)}

    def load_state_dict(self, state, env):
        self.evaluated = list(state["evaluated"])


def _cfg(out, *overrides: str) -> Config:
    base = ["train.epochs=2", "train.ckpt_every=2", "train.keep_ckpts=0", "train.progress=false", "train.log_every=2",
            "train.resume=auto", "train.loggers=[]", "optim.warmup_steps=1", "data.batch_size=16",
            f"train.output_dir={out}"]  # fmt: skip
    return load_config(None, [*base, *overrides])


def _train(out, *overrides: str, task: Toy | None = None):
    task = task or Toy()
    _, result = fit(lambda path: task, _cfg(out, *overrides), DistEnv())
    return task, result


def test_every_checkpoint_is_kept_and_an_epoch_end_is_saved_after_its_evaluation(tmp_path):
    task, result = _train(tmp_path / "toy")
    assert result.steps == 8 and task.evaluated == [4, 8]
    assert [s for s, _ in list_checkpoints(tmp_path / "toy")] == [2, 4, 6, 8]  # train.keep_ckpts=0: all
    assert load_checkpoint(tmp_path / "toy" / "checkpoints" / "step_00000004.pt")["evaluated"] == [4]


def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp_path, capsys):
    out = tmp_path / "toy"
    first, _ = _train(out)
    newest = out / "checkpoints" / "step_00000008.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a write cut short
    again, result = _train(out)
    log = capsys.readouterr().out
    assert "skipped damaged checkpoint" in log and "resumed toy from" in log and "step_00000006.pt at step 6" in log
    assert (out / "checkpoints" / "step_00000008.pt.bad").is_file()
    assert result.steps == 8 and again.evaluated == [4, 8]
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)  # steps 7 and 8 trained again exactly
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
    torch.manual_seed(0)
    task = Toy(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)), nan=True)
    bn = task.model[1]
    with pytest.raises(NonFiniteLossError, match=r"toy: no step succeeded \(4 of 4 steps skipped"):
        _train(tmp_path / "toy", "train.epochs=1", task=task)
    # no evaluation, no epoch-end or final checkpoint (step 2's, of train.ckpt_every, is there)
    assert task.evaluated == [] and [s for s, _ in list_checkpoints(tmp_path / "toy")] == [2]
    assert int(bn.num_batches_tracked) == 0 and not bn.running_mean.any() and torch.all(bn.running_var == 1)


def test_resume_with_another_schedule_warns_with_old_and_new_values(tmp_path, capsys):
    out = tmp_path / "toy"
    _train(out, "train.epochs=1")
    capsys.readouterr()
    _train(out, "train.epochs=2", "train.progress=true")
    warning = [line for line in capsys.readouterr().out.splitlines() if "with a changed config" in line]
    assert len(warning) == 1 and warning[0].endswith(": train.epochs 1 -> 2")  # progress is not a change to warn
