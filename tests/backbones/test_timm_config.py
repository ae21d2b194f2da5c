"""Exported backbones as timm ``local-dir:`` folders (backbones/timm_config.py): timm rebuilds the
model and the run's preprocessing from them, offline."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.data import resolve_data_config, resolve_model_data_config

import hvpmtl
from hvpmtl.backbones.timm_config import backbone_pretrained_cfg
from hvpmtl.config import to_dict
from hvpmtl.engine.checkpoint import export_weights
from hvpmtl.engine.distributed import DistEnv

SMALL = [
    "backbone.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    "tasks.mlc.dim=16",
    "tasks.mlc.num_heads=2",
    "tasks.mlc.ffn_dim=32",
    "tasks.swav.hidden_dim=32",
    "tasks.swav.out_dim=16",
    "tasks.swav.num_prototypes=8",
]
# not timm's defaults for the name (224 pixels, ImageNet's mean and std, crop 0.875, bicubic)
RUN = ["backbone.img_size=48", "data.mean=[0.1, 0.2, 0.3]", "data.std=[0.4, 0.5, 0.6]", "data.eval_crop_pct=0.95"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded


def _export(tmp_path, overrides):
    cfg = hvpmtl.load_config("cpu-tiny", [*SMALL, *overrides])
    torch.manual_seed(0)
    model = hvpmtl.build(cfg, num_classes=10)
    with torch.no_grad():  # a teacher that differs from the student
        for p in model.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return cfg, model, export_weights(tmp_path, model, to_dict(cfg), DistEnv())


def test_timm_rebuilds_the_backbones_and_the_runs_preprocessing(tmp_path):
    cfg, model, paths = _export(tmp_path, RUN)
    assert paths["timm"] == tmp_path / "timm" and paths["timm_teacher"] == tmp_path / "timm_teacher"
    assert (tmp_path / "timm" / "model.safetensors").read_bytes() == paths["backbone"].read_bytes()
    x = torch.randn(2, 3, 48, 48)
    model.eval()
    for folder, backbone in (("timm", model.backbone), ("timm_teacher", model.teacher.backbone)):
        net = timm.create_model(f"local-dir:{tmp_path / folder}", pretrained=True).eval()
        for data in (resolve_data_config({}, model=net), resolve_model_data_config(net)):
            assert data["input_size"] == (3, 48, 48)
            assert tuple(data["mean"]) == (0.1, 0.2, 0.3) and tuple(data["std"]) == (0.4, 0.5, 0.6)
            assert data["crop_pct"] == 0.95 and data["crop_mode"] == "center"
            assert data["interpolation"] == "bilinear"
        with torch.no_grad():
            torch.testing.assert_close(net(x), backbone(x)[1])


def test_config_names_the_architecture_and_its_arguments():
    cfg = hvpmtl.load_config("cpu-tiny", [*SMALL, *RUN])
    hf = backbone_pretrained_cfg(to_dict(cfg))
    assert hf["architecture"] == cfg.backbone.name and hf["num_classes"] == 0 and hf["num_features"] == 32
    assert hf["model_args"]["img_size"] == [48, 48] and hf["model_args"]["depth"] == 1
    assert hf["model_args"]["embed_dim"] == 32 and "drop_path_rate" not in hf["model_args"]
    assert "tag" not in hf["pretrained_cfg"] and "license" not in hf["pretrained_cfg"]  # not timm's weights


def test_swin_folder_rebuilds_the_backbone(tmp_path):
    cfg = hvpmtl.load_config("cpu-swin-tiny", ["data.std=[0.3, 0.3, 0.3]"])
    torch.manual_seed(0)
    model = hvpmtl.build(cfg, num_classes=10).eval()
    paths = export_weights(tmp_path, model, to_dict(cfg), DistEnv())
    net = timm.create_model(f"local-dir:{paths['timm']}", pretrained=True).eval()
    size = cfg.backbone.img_size
    assert resolve_model_data_config(net)["input_size"] == (3, size, size)
    assert tuple(resolve_model_data_config(net)["std"]) == (0.3, 0.3, 0.3)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model.backbone(x)[1])


def test_convolutional_stem_gets_no_folder_and_one_line(tmp_path, capsys):
    _, _, paths = _export(tmp_path, ["backbone.stem_channels=[8]"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no timm/, timm_teacher/ written for timm: backbone.stem_channels")
    assert "timm" not in paths and not (tmp_path / "timm").exists() and paths["backbone"].is_file()
    with pytest.raises(ValueError, match=r"^backbone.stem_channels=\[8\]: timm cannot rebuild"):
        backbone_pretrained_cfg({"backbone": {"name": "vit_tiny_patch16_224", "img_size": 64, "stem_channels": [8]}})
