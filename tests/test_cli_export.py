"""``hvpmtl export RUN --out DIR [--part] [--push REPO]`` (cli/export.py): timm rebuilds the
exported backbone and the run's preprocessing from DIR, offline; the card names the run's data
and results; --push hands DIR to the Hub client (replaced here: nothing reaches the network)."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.data import resolve_model_data_config

import hvpmtl
from hvpmtl.cli import main
from hvpmtl.config import save_config, to_dict
from hvpmtl.engine.checkpoint import export_weights
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.eval.report import write_result

HEADS = ["tasks.mlc.dim=16", "tasks.mlc.num_heads=2", "tasks.mlc.ffn_dim=32", "tasks.swav.hidden_dim=32",
         "tasks.swav.out_dim=16", "tasks.swav.num_prototypes=8", "tasks.mim.mask_patch_size=16",
         "data.num_classes=6"]  # fmt: skip
PREPROCESSING = ["backbone.img_size=48", "data.mean=[0.1, 0.2, 0.3]", "data.std=[0.4, 0.5, 0.6]",
                 "data.eval_crop_pct=0.95"]  # fmt: skip
VIT = ["backbone.name=vit_tiny_patch16_224", "backbone.patch_size=8",
       "backbone.kwargs={depth: 1, embed_dim: 32, num_heads: 2}"]  # fmt: skip
SWIN = ["backbone.name=swin_tiny_patch4_window7_224", "backbone.window_size=3",
        "backbone.kwargs={embed_dim: 16, depths: [1, 1], num_heads: [1, 2]}"]  # fmt: skip


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded or uploaded


def make_run(folder, overrides):
    """A run folder as pre-training leaves it (config.yaml, classes.json, exports), a teacher that
    differs from the student, and one downstream result in eval/."""
    cfg = hvpmtl.load_config(None, [*HEADS, *PREPROCESSING, *overrides])
    torch.manual_seed(0)
    model = hvpmtl.build(cfg).eval()
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder.mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    (folder / "classes.json").write_text('["a", "b", "c", "d", "e", "f"]\n')
    export_weights(folder, model, to_dict(cfg), DistEnv())
    write_result(folder / "eval", "knn-synthetic-student", "knn", f"{folder.name} student", "synthetic (64 -> 32)",
                 {"mAP": 61.25}, {"k": 20}, echo=False)  # fmt: skip
    return cfg, model


@pytest.mark.parametrize("arch", [VIT, SWIN], ids=["vit", "swin"])
@pytest.mark.parametrize("part", ["student", "teacher"])
def test_timm_rebuilds_the_export_with_the_runs_preprocessing(tmp_path, capsys, arch, part):
    cfg, model = make_run(tmp_path / "run", arch)
    args = ["export", str(tmp_path / "run"), "--out", str(tmp_path / "hub")]
    assert main([*args, "--part", part] if part == "teacher" else args) == 0
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    net = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    backbone = model.teacher["backbone"] if part == "teacher" else model.backbone
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(net(x), backbone(x)[1])
        torch.testing.assert_close(net(x), hvpmtl.load_backbone(tmp_path / "run", part)(x))
    data = resolve_model_data_config(net)
    as_tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}  # config.json has lists
    assert as_tuples == resolve_model_data_config(hvpmtl.load_backbone(tmp_path / "run", part))
    assert data["input_size"] == (3, 48, 48) and data["crop_pct"] == 0.95 and data["interpolation"] == "bilinear"
    assert tuple(data["mean"]) == (0.1, 0.2, 0.3) and tuple(data["std"]) == (0.4, 0.5, 0.6)
    card = (tmp_path / "hub" / "README.md").read_text()
    assert f"# run: {part} backbone" in card and "library_name: timm" in card
    assert "- source: synthetic" in card and "- classes: 6" in card  # the run's data
    assert "| knn | synthetic (64 -> 32) | run student | mAP 61.25 |" in card  # its downstream result
    assert f"name: {cfg.backbone.name}" in card and "eval_crop_pct: 0.95" in card  # the whole config
    assert "wrote" in capsys.readouterr().out


def test_push_hands_the_exported_folder_to_the_hub(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from huggingface_hub import HfApi

    make_run(tmp_path / "run", VIT)
    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw)
        return SimpleNamespace(repo_id=repo_id)  # huggingface_hub returns a RepoUrl

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls["upload"] = (repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()))
        return "done"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hub"), "--push", "me/hvpmtl-tiny"]) == 0
    assert calls["create"][0] == "me/hvpmtl-tiny" and calls["create"][1]["exist_ok"] is True
    assert calls["upload"] == ("me/hvpmtl-tiny", ["README.md", "config.json", "model.safetensors"])
    assert "pushed" in capsys.readouterr().out


def test_push_problems_are_one_line(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    make_run(tmp_path / "run", VIT)
    out = ["--out", str(tmp_path / "hub")]
    assert main(["export", str(tmp_path / "run"), *out, "--push", "bad repo/name"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --push bad repo/name: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hub").exists()  # refused before anything was written

    def offline(self, repo_id, **kw):
        raise OSError("no connection\nsecond line")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    assert main(["export", str(tmp_path / "run"), *out, "--push", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "error: --push me/x: the upload failed (OSError: no connection)" in err
    assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "hub" / "config.json").is_file()  # the export stays


def test_convolutional_stem_exports_weights_only_and_refuses_push(tmp_path, capsys):
    make_run(tmp_path / "run", [*VIT, "backbone.stem_channels=[8]"])
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hub"), "--push", "me/stem"]) == 2
    err = capsys.readouterr().err
    assert "error: --push me/stem: backbone.stem_channels=[8]: timm cannot rebuild" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "hub").exists()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hub")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("no config.json written for timm: backbone.stem_channels=[8]: timm cannot rebuild")
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["README.md", "model.safetensors"]
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():  # the weights alone still load, with their config from the file's metadata
        torch.testing.assert_close(hvpmtl.load_backbone(tmp_path / "hub" / "model.safetensors")(x),
                                   hvpmtl.load_backbone(tmp_path / "run")(x))  # fmt: skip
    assert "hvpmtl.load_backbone" in (tmp_path / "hub" / "README.md").read_text()


def test_out_must_be_new_empty_or_an_export(tmp_path, capsys):
    make_run(tmp_path / "run", VIT)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "busy")]) == 2
    assert "error: --out " in capsys.readouterr().err and (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "hub")]) == 2
    assert "nothing: no such run folder or weights file" in capsys.readouterr().err
