"""The run folder (engine/run_dir.py): early checks, the lock, previous runs, architecture on resume."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest
import yaml

from conftest import held_by_another_run
from hvpmtl.engine import run_dir as rd
from hvpmtl.engine.faults import inject
from hvpmtl.engine.metrics import read_metrics

from .conftest import TINY

DEPTH1 = "backbone.kwargs={depth: 1, embed_dim: 64, num_heads: 2}"


def _snapshot(folder) -> dict:
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folder_in_use_by_another_run_is_refused_at_once(run_cli, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with held_by_another_run(out):  # pid 4242
        rc, _, err = run_cli("pretrain", *TINY, DEPTH1, "train.max_steps=1", f"train.output_dir={out}")
        assert rc == 2
        assert err.strip() == f"error: train.output_dir={out} is in use by another run (pid 4242)"
        assert [p.name for p in out.iterdir()] == [rd.LOCK_NAME]  # nothing written
    # the lock file of a finished (or killed) run stays behind; it must not block the next run
    rc, _, _ = run_cli("pretrain", *TINY, DEPTH1, "train.max_steps=1", f"train.output_dir={out}")
    assert rc == 0 and (out / "model.safetensors").is_file()
    rd.lock_run_dir(out)  # released when the run ended
    rd.unlock_run_dir(out)


def test_lock_of_a_killed_process_is_released(tmp_path):
    holder = (
        "import fcntl, os, sys, time\n"
        "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write(f'{os.getpid()}\\n'); f.flush()\n"
        "print('locked', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / rd.LOCK_NAME)], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"locked"
        with pytest.raises(ValueError, match=f"in use by another run \\(pid {child.pid}\\)"):
            rd.lock_run_dir(tmp_path)
    finally:
        child.kill()  # SIGKILL: no clean-up code runs
        child.wait()
    rd.lock_run_dir(tmp_path)
    assert (tmp_path / rd.LOCK_NAME).read_text().strip() == str(os.getpid())
    rd.unlock_run_dir(tmp_path)


def test_failed_planning_releases_the_lock(tmp_path):
    (tmp_path / "metrics.csv").write_text("step\n1\n")
    with pytest.raises(ValueError, match="holds a previous run"):
        rd.plan_run(tmp_path, "", overwrite=False)
    with open(tmp_path / rd.LOCK_NAME) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again


@pytest.mark.parametrize("where", ["file", "under_file", "read_only"])
def test_unusable_output_dir_fails_before_anything_is_made(run_cli, tmp_path, monkeypatch, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = {"file": blocker, "under_file": blocker / "run", "read_only": tmp_path / "ro" / "sub" / "run"}[where]
    if where == "read_only":
        (tmp_path / "ro").mkdir(mode=0o555)
        real = os.access  # root ignores permission bits: answer as for another user
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real(p, mode))
    before = sorted(tmp_path.rglob("*"))
    rc, _, err = run_cli("pretrain", *TINY, "train.max_steps=1", f"train.output_dir={out}")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: train.output_dir={out}: ")
    assert {"file": "is a file", "under_file": "is not a folder", "read_only": "is not writable"}[where] in err
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_finished_run_without_checkpoints_is_not_overwritten(run_cli, tmp_path):
    out = tmp_path / "run"
    common = [*TINY, DEPTH1, "train.max_steps=2", f"train.output_dir={out}"]
    assert run_cli("pretrain", *common)[0] == 0
    for p in (out / "checkpoints").iterdir():
        p.unlink()
    (out / "checkpoints").rmdir()
    before = _snapshot(out)

    rc, _, err = run_cli("pretrain", *common, "train.seed=1")
    assert rc == 2 and "holds a previous run (config.yaml, metrics.csv, model.safetensors" in err
    assert "no checkpoint to continue from" in err and "train.overwrite=true (--overwrite)" in err
    rc, _, err = run_cli("pretrain", *common, "train.resume=auto")
    assert rc == 2 and "no checkpoint to continue from" in err
    assert _snapshot(out) == before  # weights, metrics and config untouched

    rc, stdout, _ = run_cli("pretrain", "--overwrite", *common, "train.max_steps=3")
    assert rc == 0 and "removed the previous run's config.yaml" in stdout
    assert [int(r["step"]) for r in read_metrics(out / "metrics.csv")] == [1, 2, 3]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["overwrite"] is False
    rc, _, err = run_cli("pretrain", *common, "train.resume=auto", "train.overwrite=true")
    assert rc == 2 and "contradict" in err


@pytest.mark.slow
def test_resume_with_another_architecture_is_refused(run_cli, tmp_path):
    out = tmp_path / "run"
    assert run_cli("pretrain", *TINY, DEPTH1, "train.max_steps=2", f"train.output_dir={out}")[0] == 0
    before = _snapshot(out)
    depth2 = "backbone.kwargs={depth: 2, embed_dim: 64, num_heads: 2}"
    rc, _, err = run_cli("pretrain", *TINY, depth2, "train.max_steps=4", f"train.output_dir={out}", "train.resume=auto")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"{out / 'checkpoints' / 'step_00000002.pt'} does not fit this model" in err
    assert "missing keys (backbone.model.blocks.1." in err and "backbone.kwargs" in err
    assert _snapshot(out) == before  # nothing written


@pytest.mark.slow
def test_auto_resume_restarts_a_run_killed_before_its_first_checkpoint(run_cli, tmp_path):
    out = tmp_path / "run"
    common = [*TINY, DEPTH1, "train.max_steps=3", "train.ckpt_every=100", "train.log_every=1"]
    common.append(f"train.output_dir={out}")
    with inject(stop_after=1):
        rc, _, _ = run_cli("pretrain", *common)
    assert rc != 0 and (out / "metrics.csv").exists() and not (out / "checkpoints").exists()
    rc, stdout, err = run_cli("pretrain", *common, "train.resume=auto")
    assert rc == 0, err
    assert "stopped before its first checkpoint; starting it again from step 0" in stdout
    assert [int(r["step"]) for r in read_metrics(out / "metrics.csv")] == [1, 2, 3]


def test_changed_schedule_keys_are_named_with_their_values_on_resume():
    """train.* keys that define the schedule (or the random streams) are warned; the ones that
    change by design on resume (resume, overwrite, output_dir, progress, ...) are not."""
    saved = {"train": {"epochs": 2, "max_steps": 0, "seed": 0, "accum_steps": 1, "resume": "", "overwrite": False,
                       "output_dir": "a", "progress": True, "device": "cuda", "ckpt_every": 10},
             "optim": {"lr": 1e-3, "warmup_epochs": 1.0}}  # fmt: skip
    now = {"train": {"epochs": 3, "max_steps": 0, "seed": 1, "accum_steps": 1, "resume": "auto", "overwrite": True,
                     "output_dir": "b", "progress": False, "device": "cpu", "ckpt_every": 20},
           "optim": {"lr": 1e-3, "warmup_epochs": 2.0}}  # fmt: skip
    changed = rd.changed_config_keys(saved, now)
    assert changed == ["optim.warmup_epochs", "train.epochs", "train.seed"]
    described = rd.describe_changes(saved, now, changed)
    assert described == "optim.warmup_epochs 1.0 -> 2.0, train.epochs 2 -> 3, train.seed 0 -> 1"


def test_pretraining_resumed_with_another_schedule_warns(run_cli, tmp_path):
    out = tmp_path / "run"
    common = [*TINY, DEPTH1, "train.ckpt_every=2", f"train.output_dir={out}"]
    assert run_cli("pretrain", *common, "train.max_steps=2")[0] == 0
    rc, stdout, err = run_cli("pretrain", *common, "train.max_steps=3", "train.seed=5", "train.resume=auto")
    assert rc == 0, err
    warning = [line for line in stdout.splitlines() if "with a changed config" in line]
    assert len(warning) == 1 and warning[0].endswith("train.max_steps 2 -> 3, train.seed 0 -> 5")


def test_environment_records_the_package_version():
    """The engine reads the version from the package metadata, not from the package root."""
    import torch

    import hvpmtl

    info = rd.environment(1, torch.device("cpu"))
    assert info["hvpmtl"] == hvpmtl.__version__
