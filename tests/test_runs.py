"""hvpmtl.runs: one reader of run folders (config, class names, weights of either part, the whole
model) and ``hvpmtl.load_backbone``, a timm model with the run's preprocessing."""

from __future__ import annotations

import json

import pytest
import torch
from timm.data import resolve_model_data_config

import hvpmtl
from hvpmtl.runs import Run, WeightsError, model_part
from tiny import TINY_MODEL

# ViT 48 px, patch 8, depth 1: a finished 2-step run in a few seconds; preprocessing not timm's defaults
SMALL_RUN = [
    *TINY_MODEL,
    "backbone.img_size=48",
    "backbone.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    "data.batch_size=8",
    "data.train_size=16",
    "data.val_size=8",
    "data.num_workers=0",
    "data.mean=[0.1, 0.2, 0.3]",
    "data.std=[0.4, 0.5, 0.6]",
    "data.eval_crop_pct=0.95",
    "optim.warmup_steps=1",
    "train.max_steps=2",
    "train.ckpt_every=1",
    "train.keep_ckpts=0",
    "train.progress=false",
    "train.pictures_every=0",
    "eval.knn_every=0",
    "train.seed=3",
]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A finished 2-step run: config.yaml, classes.json, checkpoints at steps 1 and 2, exports."""
    from hvpmtl.pretraining import pretrain

    out = tmp_path_factory.mktemp("runs") / "small"
    pretrain(hvpmtl.load_config(None, [*SMALL_RUN, f"train.output_dir={out}"]))
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_folder_checkpoint_and_files_name_the_same_run(small_run):
    sources = [small_run, small_run / "checkpoints" / "step_00000002.pt", small_run / "model.safetensors",
               small_run / "backbone.safetensors", small_run / "teacher_backbone.safetensors"]  # fmt: skip
    runs = [Run(s) for s in sources]
    names = json.loads((small_run / "classes.json").read_text())
    for run in runs:
        assert run.folder == small_run
        assert run.config["train"]["seed"] == 3 and run.config["backbone"]["img_size"] == 48
        assert run.class_names == names
    student = runs[0].weights("student").state
    for run in runs[1:4]:
        assert _same(run.weights("student").state, student)
    assert runs[1].weights().label == "small student step 2" and runs[0].weights().label == "small student"
    assert runs[0].weights_file("teacher") == small_run / "teacher_backbone.safetensors"
    assert Run(small_run / "checkpoints" / "step_00000001.pt").weights_file() == sources[1].with_name(
        "step_00000001.pt")  # fmt: skip


def test_student_and_teacher(small_run):
    run = Run(small_run)
    student, teacher = run.weights("student"), run.weights("teacher")
    assert student.part == "student" and teacher.part == "teacher"
    assert not _same(student.state, teacher.state)  # the EMA, not a copy
    assert _same(Run(small_run / "model.safetensors").weights("teacher").state, teacher.state)
    assert Run(small_run / "teacher_backbone.safetensors").weights().part == "teacher"
    with pytest.raises(WeightsError, match="holds the student's backbone, not a teacher"):
        Run(small_run / "backbone.safetensors").weights("teacher")
    with pytest.raises(WeightsError, match=r"part='ema': choose student or teacher"):
        run.weights("ema")
    model, _ = run.model()
    assert model_part(model, "teacher")[0] is model.teacher["backbone"]
    assert model_part(model, "student") == (model.backbone, model.mlc)
    model.teacher = None
    with pytest.raises(WeightsError, match=r"^RUN: no teacher \(tasks.distill was off\)$"):
        model_part(model, "teacher", "RUN")


def test_what_is_not_a_run_is_one_line(small_run, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    cases = {
        tmp_path / "missing": "no such run folder or weights file",
        tmp_path / "empty": "not an hvpmtl run folder",
        tmp_path / "notes.txt": "expected a run folder, a .pt checkpoint or a .safetensors file",
    }
    for path, message in cases.items():
        with pytest.raises(WeightsError) as err:
            Run(path)
        assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(WeightsError, match=rf"^{tmp_path / 'bad.safetensors'}: not a readable safetensors file"):
        Run(tmp_path / "bad.safetensors").weights()
    with pytest.raises(WeightsError, match="the MLC head needs the whole model"):
        Run(small_run / "backbone.safetensors").model()


def test_load_backbone_is_the_runs_backbone_with_its_preprocessing(small_run):
    model, _ = Run(small_run).model()
    x = torch.randn(2, 3, 48, 48)
    for part, backbone in (("student", model.backbone), ("teacher", model.teacher["backbone"])):
        net = hvpmtl.load_backbone(small_run, part=part)
        assert not net.training
        with torch.no_grad():
            torch.testing.assert_close(net.forward_features(x), backbone.model.forward_features(x), rtol=0, atol=0)
            torch.testing.assert_close(net(x), backbone(x)[1])
        data = resolve_model_data_config(net)
        assert data["input_size"] == (3, 48, 48) and data["crop_pct"] == 0.95 and data["crop_mode"] == "center"
        assert tuple(data["mean"]) == (0.1, 0.2, 0.3) and tuple(data["std"]) == (0.4, 0.5, 0.6)
        assert data["interpolation"] == "bilinear"
    from_ckpt = hvpmtl.load_backbone(small_run / "checkpoints" / "step_00000001.pt")
    assert not torch.equal(from_ckpt.pos_embed, hvpmtl.load_backbone(small_run).pos_embed)  # step 1, not 2


def test_init_from_reads_the_run_through_the_reader(small_run):
    """backbone.init_from of a checkpoint: hvpmtl.build hands the run's weights to the backbones
    package, which reads no run folder itself."""
    cfg = hvpmtl.load_config(None, [*SMALL_RUN, f"backbone.init_from={small_run / 'checkpoints' / 'step_00000001.pt'}",
                                    "backbone.init_from_part=teacher"])  # fmt: skip
    model = hvpmtl.build(cfg, num_classes=10)
    assert _same(model.backbone.model.state_dict(), Run(small_run / "checkpoints" / "step_00000001.pt")
                 .weights("teacher").state)  # fmt: skip
    from hvpmtl.backbones import build_backbone, load_start_weights

    with pytest.raises(ValueError, match=r"^backbone.init_from: no reader of run folders given"):
        load_start_weights(build_backbone(cfg.backbone), cfg.backbone)
    cfg.backbone.init_from = str(small_run.parent / "nowhere")
    with pytest.raises(ValueError, match=r"^backbone.init_from: .*nowhere: no such run folder or weights file$"):
        hvpmtl.build(cfg, num_classes=10)


@pytest.mark.parametrize("command", [["visualize", "attention"], ["noise-report"], ["mlc-head"]])
def test_a_damaged_checkpoint_stops_every_whole_model_command_in_one_line(tmp_path, capsys, command):
    from hvpmtl.cli import main

    junk = tmp_path / "checkpoints" / "step_00000009.pt"
    junk.parent.mkdir()
    junk.write_bytes(b"not a checkpoint" * 10)
    assert main([*command, str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {junk}: cannot read this checkpoint") and len(err.strip().splitlines()) == 1
