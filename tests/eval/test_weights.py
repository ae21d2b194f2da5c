"""eval/weights.py: what SOURCE names, random init = the run's start, clear errors on misfits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import hvpmtl
from hvpmtl.eval.weights import WeightsError, build_masked_backbone, resolve_weights


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_folder_checkpoint_and_files_give_the_same_student(tiny_run):
    folder = resolve_weights(tiny_run)
    assert _same(folder.state, load_file(str(tiny_run / "backbone.safetensors")))
    ckpt = resolve_weights(tiny_run / "checkpoints" / "step_00000004.pt")
    assert _same(ckpt.state, folder.state) and "step 4" in ckpt.label and ckpt.run_dir == tiny_run
    model_file = resolve_weights(tiny_run / "model.safetensors")
    assert _same(model_file.state, folder.state)
    earlier = resolve_weights(tiny_run / "checkpoints" / "step_00000002.pt")
    assert not _same(earlier.state, folder.state)
    assert folder.backbone.img_size == 32 and folder.backbone.kwargs["depth"] == 2


def test_backbone_file_in_a_run_folder_brings_the_runs_config(tiny_run, tmp_path):
    """backbone.safetensors stores only the backbone config: data source and train.seed (hence the
    random init) come from the run's config.yaml beside it; outside a run folder there is none."""
    import shutil

    import yaml

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "backbone.safetensors", run)
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    config["data"]["dataset"], config["train"]["seed"] = "fmnist-mosaic", 5
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for source in (run, run / "backbone.safetensors"):
        w = resolve_weights(source)
        assert w.pretrain["data"]["dataset"] == "fmnist-mosaic" and w.seed == 5
        assert w.backbone == resolve_weights(tiny_run).backbone
    seeded = build_masked_backbone(resolve_weights(run, random_init=True)).state_dict()
    default = build_masked_backbone(resolve_weights(tiny_run, random_init=True)).state_dict()
    assert not _same(seeded, default)  # seed 5, not the default 0
    (run / "config.yaml").unlink()
    alone = resolve_weights(run / "backbone.safetensors")
    assert alone.seed == 0 and "data" not in (alone.pretrain or {})


def test_teacher_is_the_ema_not_the_student(tiny_run):
    teacher = resolve_weights(tiny_run, teacher=True)
    student = resolve_weights(tiny_run)
    assert teacher.state.keys() == student.state.keys() and not _same(teacher.state, student.state)
    assert "teacher" in teacher.label
    with pytest.raises(WeightsError, match="not a teacher"):
        resolve_weights(tiny_run / "backbone.safetensors", teacher=True)


def test_random_init_is_the_weights_the_run_started_from(tiny_run):
    weights = resolve_weights(tiny_run, random_init=True)
    assert weights.state is None and weights.label.startswith("random init")
    cfg = hvpmtl.load_config(str(tiny_run / "config.yaml"))
    torch.manual_seed(cfg.train.seed)
    start = hvpmtl.build(cfg, cfg.data.num_classes).backbone.model.state_dict()
    assert _same(build_masked_backbone(weights).model.state_dict(), start)
    no_source = resolve_weights(None, random_init=True, pretrain_preset="cpu-swin-tiny")
    assert "swin" in no_source.backbone.name


def test_misfits_are_named(tiny_run, tmp_path):
    weights = resolve_weights(tiny_run)
    deeper = replace(weights, backbone=replace(weights.backbone, kwargs={**weights.backbone.kwargs, "depth": 3}))
    with pytest.raises(WeightsError, match=r"missing: blocks\.2\."):
        build_masked_backbone(deeper)
    wider = replace(weights, backbone=replace(weights.backbone, kwargs={**weights.backbone.kwargs, "embed_dim": 64}))
    with pytest.raises(WeightsError, match="other shapes"):
        build_masked_backbone(wider)
    junk = tmp_path / "step_00000009.pt"
    junk.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="cannot read this checkpoint"):
        resolve_weights(junk)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="not an hvpmtl run folder"):
        resolve_weights(tmp_path / "empty")
    with pytest.raises(WeightsError, match="no such run folder"):
        resolve_weights(tmp_path / "missing")
    with pytest.raises(WeightsError, match="--random-init"):
        resolve_weights(None)


def test_vit_position_embedding_is_resampled_for_another_size(tiny_run):
    weights = resolve_weights(tiny_run)
    big = build_masked_backbone(weights, img_size=64)
    assert big.model.pos_embed.shape[1] == 1 + 8 * 8
    fmap, _ = big(torch.randn(1, 3, 64, 64))
    assert fmap.shape[-2:] == (8, 8)
