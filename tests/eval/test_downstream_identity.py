"""Downstream runs know their source weights and data: folders and result files are named by the
data, a resume on other source weights or other data is refused, and ``pretrain --overwrite``
removes the run's own downstream folders (and nothing else)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hvpmtl.cli import main

from .test_class_names import write_manifest

FT = ["data.train_size=32", "data.val_size=16", "data.batch_size=16", "data.num_workers=0", "train.epochs=1",
      "train.progress=false"]  # fmt: skip


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def manifest(path: Path) -> list[str]:
    return ["data.dataset=manifest", f"data.manifest={path}", f"data.val_manifest={path}", f"data.root={path.parent}",
            "data.batch_size=8", "data.num_workers=0", "train.epochs=1", "train.progress=false"]  # fmt: skip


@pytest.fixture
def own_run(tiny_run, tmp_path) -> Path:
    """A copy of the tiny pre-training run (these tests change its weights), without downstream outputs."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval", "finetune-*", "detect-*", "segment-*"))
    return run


def _folders(run: Path, command: str) -> list[Path]:
    return sorted(p for p in run.iterdir() if p.name.startswith(f"{command}-"))


def test_finetune_refuses_to_resume_after_the_backbone_changed(own_run, capsys):
    assert run(capsys, "finetune", str(own_run), *FT)[0] == 0
    backbone = own_run / "backbone.safetensors"  # pre-training went on: other weights, same file
    with safe_open(str(backbone), "pt") as f:
        meta = f.metadata()
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in load_file(str(backbone)).items()},
              str(backbone), metadata=meta)  # fmt: skip
    rc, out, err = run(capsys, "finetune", str(own_run), *FT)
    assert rc == 2 and "resumed" not in out
    assert "other source weights" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    rc, out, _ = run(capsys, "finetune", str(own_run), *FT, "--overwrite")
    assert rc == 0 and "removed the previous run's" in out and "resumed" not in out
    rc, out, _ = run(capsys, "finetune", str(own_run), *FT)  # the same weights again: resumed
    assert rc == 0 and "resumed finetune from" in out


def test_pretrain_overwrite_removes_the_runs_own_downstream_folders(own_run, capsys):
    assert run(capsys, "finetune", str(own_run), *FT)[0] == 0
    [ours] = _folders(own_run, "finetune")
    foreign = own_run / "finetune-notes"  # a user's folder of that name: not ours, kept
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    args = ["pretrain", "-c", str(own_run / "config.yaml"), f"train.output_dir={own_run}", "train.max_steps=2",
            "eval.knn_every=0", "--overwrite"]  # fmt: skip
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    assert not ours.exists() and ours.name in out
    assert (foreign / "mine.txt").read_text() == "keep"


def _tag(source: Path, command: str, *overrides: str) -> str:
    from hvpmtl.cli.downstream import _prepare

    args = argparse.Namespace(args=[str(source), *overrides], config=None, teacher=False, random_init=False,
                              pretrain_config=None, overwrite=False)  # fmt: skip
    return _prepare(command, args)[3]


def test_folders_and_results_are_named_by_the_data(tiny_run, tmp_path):
    a, b = write_manifest(tmp_path / "a"), write_manifest(tmp_path / "b")  # both m.csv
    ta, tb = _tag(tiny_run, "finetune", *manifest(a)), _tag(tiny_run, "finetune", *manifest(b))
    assert ta != tb and ta.startswith("m.csv-") and tb.startswith("m.csv-") and ta.endswith("-student")
    assert _tag(tiny_run, "finetune", *manifest(a)) == ta  # stable
    assert _tag(tiny_run, "detect", f"detect.root={tmp_path / 'mycoco'}").startswith("mycoco-")
    assert _tag(tiny_run, "detect").startswith("synthetic-")
    assert _tag(tiny_run, "detect") != _tag(tiny_run, "detect", f"detect.root={tmp_path / 'synthetic'}")


def test_resume_on_other_data_is_refused(own_run, tmp_path, capsys):
    a, b = write_manifest(tmp_path / "a"), write_manifest(tmp_path / "b")
    out = f"train.output_dir={tmp_path / 'ft'}"
    rc, _, err = run(capsys, "finetune", str(own_run), *manifest(a), out)
    assert rc == 0, err
    rc, printed, err = run(capsys, "finetune", str(own_run), *manifest(b), out)
    assert rc == 2 and "resumed" not in printed
    assert "other data (data.manifest" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    results = sorted(p.name for p in (own_run / "eval").glob("finetune-m.csv-*-student.json"))
    assert len(results) == 1
    assert run(capsys, "finetune", str(own_run), *manifest(b))[0] == 0  # its own folder and result file
    assert len(list((own_run / "eval").glob("finetune-m.csv-*-student.json"))) == 2
