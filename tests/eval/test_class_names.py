"""Class names travel with a pre-training run: stored in its checkpoints, model.safetensors and
classes.json; a resume on another vocabulary is refused; the MLC head is scored by tag name."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hvpmtl
from hvpmtl.cli import main
from hvpmtl.config import ConfigError, load_config
from hvpmtl.engine.checkpoint import write_checksum
from hvpmtl.pretraining import pretrain

from .conftest import TINY_RUN

TAGS = ["cat", "dog", "grass", "sky"]


def write_manifest(folder: Path, name: str = "m.csv", rename: dict[str, str] | None = None) -> Path:
    """16 random 32 px PNGs in ``folder`` and a manifest tagging each with two of :data:`TAGS`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["path,labels"]
    for i in range(16):
        image = folder / f"{i:02d}.png"
        if not image.exists():
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
        tags = [(rename or {}).get(t, t) for t in (TAGS[i % 4], TAGS[(i + 1) % 4])]
        lines.append(f"{image.name},{'|'.join(tags)}")
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def manifest_config(folder: Path, *extra: str) -> hvpmtl.Config:
    data = ["data.dataset=manifest", f"data.manifest={folder / 'm.csv'}", f"data.val_manifest={folder / 'm.csv'}",
            f"data.root={folder}", "data.batch_size=8", "eval.knn_every=0", "train.max_steps=2"]  # fmt: skip
    tiny = [o for o in TINY_RUN if not o.startswith(("data.train_size", "data.val_size"))]  # generated data only
    return hvpmtl.load_config(None, [*tiny, *data, f"train.output_dir={folder / 'run'}", *extra])


@pytest.fixture(scope="module")
def tag_run(tmp_path_factory) -> Path:
    """A 2-step run on a manifest of {cat, dog, grass, sky}; returns its data folder (run in ``run/``)."""
    folder = tmp_path_factory.mktemp("tags")
    write_manifest(folder)
    pretrain(manifest_config(folder))
    return folder


def test_class_names_are_stored_with_the_run(tag_run):
    from safetensors import safe_open

    run = tag_run / "run"
    ckpt = torch.load(run / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert ckpt["class_names"] == TAGS
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["class_names"]) == TAGS
    assert json.loads((run / "classes.json").read_text()) == TAGS


def test_resume_on_another_vocabulary_of_the_same_size_is_refused(tmp_path):
    write_manifest(tmp_path)
    pretrain(manifest_config(tmp_path))
    write_manifest(tmp_path, rename={"cat": "zebra"})  # [cat, dog, grass, sky] -> [dog, grass, sky, zebra]
    with pytest.raises(ConfigError, match=r"class names differ .*index 0: 'cat' in the run, 'dog' in the data"):
        pretrain(manifest_config(tmp_path, "train.max_steps=4", "train.resume=auto"))


def test_resume_of_a_checkpoint_without_class_names_warns(tmp_path, capsys):
    write_manifest(tmp_path)
    pretrain(manifest_config(tmp_path))
    path = tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["class_names"]  # as written before class names were stored
    torch.save(ckpt, path)
    write_checksum(path)
    capsys.readouterr()
    pretrain(manifest_config(tmp_path, "train.max_steps=4", "train.resume=auto"))
    out = capsys.readouterr().out
    assert "warning:" in out and "no class names" in out and "cannot be checked" in out


def _data(folder: Path, *extra: str):
    from hvpmtl.eval.config import FeatureEvalConfig

    over = ["data.dataset=manifest", f"data.manifest={folder / 'm.csv'}", f"data.val_manifest={folder / 'm.csv'}",
            f"data.root={folder}", *extra]  # fmt: skip
    return load_config(None, over, cls=FeatureEvalConfig).data


def test_mlc_head_maps_a_reordered_vocabulary_by_name_and_refuses_an_unknown_tag(tag_run, tmp_path):
    from hvpmtl.eval.heads import mlc_head_metrics
    from hvpmtl.eval.weights import WeightsError

    run = tag_run / "run"
    same = mlc_head_metrics(run, _data(tag_run))
    reordered = mlc_head_metrics(run, _data(tag_run, "data.classes=[sky, grass, dog, cat]"))
    assert reordered == pytest.approx(same)
    other = tmp_path / "other"
    write_manifest(other, rename={"cat": "zebra"})  # same count, one tag the run never saw
    with pytest.raises(WeightsError, match=r"'zebra'.*not one of the run's 4 classes"):
        mlc_head_metrics(run, _data(other))


def _report(capsys, run: Path, out: Path, *extra: str) -> tuple[int, str]:
    rc = main(["noise-report", str(run), "--out", str(out), "run.num_workers=0", "min_score=0", *extra])
    return rc, capsys.readouterr().err


def test_noise_report_maps_a_reordered_vocabulary_by_name_and_refuses_an_unknown_tag(tag_run, tmp_path, capsys):
    run = tag_run / "run"
    assert _report(capsys, run, tmp_path / "a")[0] == 0
    assert _report(capsys, run, tmp_path / "b", "data.classes=[sky, grass, dog, cat]")[0] == 0

    def pairs(folder):
        rows = csv.DictReader(io.StringIO((folder / "noise_report.csv").read_text()))
        return {(r["image"], r["tag"]): r["p_teacher"] for r in rows}

    assert pairs(tmp_path / "b") == pairs(tmp_path / "a")
    other = tmp_path / "other"
    write_manifest(other, rename={"cat": "zebra"})
    rc, err = _report(capsys, run, tmp_path / "c", f"data.manifest={other / 'm.csv'}", f"data.root={other}")
    assert rc == 2 and "'zebra'" in err and len(err.strip().splitlines()) == 1
