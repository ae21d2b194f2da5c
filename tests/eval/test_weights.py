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


def _spoil_nan(key: str, value: torch.Tensor) -> torch.Tensor:
    return torch.full_like(value, float("nan")) if key == "blocks.1.mlp.fc2.weight" else value


def _spoil_int8(key: str, value: torch.Tensor) -> torch.Tensor:
    return (value * 100).to(torch.int8) if key == "norm.weight" else value


@pytest.mark.parametrize(
    "spoil, message",
    [
        (_spoil_nan, r"blocks\.1\.mlp\.fc2\.weight .*not finite"),
        (_spoil_int8, r"norm\.weight is torch\.int8 .*float32"),
    ],
)
def test_nonfinite_or_integer_weights_are_refused_naming_the_tensor(tiny_run, spoil, message):
    from hvpmtl.config import load_config
    from hvpmtl.eval.config import FinetuneRunConfig
    from hvpmtl.eval.finetune import build_classifier

    weights = resolve_weights(tiny_run)
    bad = replace(weights, state={k: spoil(k, v) for k, v in weights.state.items()})
    with pytest.raises(WeightsError, match=message):
        build_masked_backbone(bad)  # knn, linprobe, detect, segment
    with pytest.raises(WeightsError, match=message):
        build_classifier(bad, 3, load_config(None, [], cls=FinetuneRunConfig))  # finetune


def test_cli_refuses_nan_backbone_file_without_a_result(tiny_run, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hvpmtl.cli import main

    src = tiny_run / "backbone.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    (tmp_path / "nan").mkdir()
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(src)).items()},
              str(tmp_path / "nan" / "backbone.safetensors"), metadata=meta)  # fmt: skip
    rc = main(["knn", str(tmp_path / "nan" / "backbone.safetensors"), "train_images=16", "eval_images=8",
               "run.progress=false"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "not finite" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nan" / "eval").exists()


def test_malformed_json_metadata_is_one_line_naming_file_and_key(tiny_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hvpmtl.eval.heads import load_pretrained_model

    for name, key in (("backbone.safetensors", "backbone_config"), ("model.safetensors", "config")):
        src = tiny_run / name
        with safe_open(str(src), "pt") as f:
            meta = {**f.metadata(), key: "{not json"}
        bad = tmp_path / name
        save_file(load_file(str(src)), str(bad), metadata=meta)
        with pytest.raises(WeightsError, match=rf"{bad}: metadata '{key}' is not valid JSON"):
            resolve_weights(bad)
    with pytest.raises(WeightsError, match=r"metadata 'config' is not valid JSON"):
        load_pretrained_model(tmp_path / "model.safetensors")


@pytest.mark.parametrize("seed", ["x", "1.5", "[1]"])
def test_edited_config_with_a_bad_seed_names_file_and_key(tiny_run, tmp_path, seed):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "backbone.safetensors", run)
    (run / "config.yaml").write_text(f"train: {{seed: {seed}}}\n")
    with pytest.raises(WeightsError, match=rf"{run / 'config.yaml'}: train\.seed: expected an integer"):
        resolve_weights(run)
