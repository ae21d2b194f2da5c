"""Checkpoints (engine/checkpoint.py): atomic writes, weights_only loading, RNG, exports."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import hvpmtl
from hvpmtl.config import to_dict
from hvpmtl.engine import checkpoint as ck
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.engine.optim import build_optimizer

from .conftest import TINY


def _model_and_opt():
    cfg = hvpmtl.load_config("cpu-tiny", [o for o in TINY if o.startswith(("backbone", "tasks"))])
    torch.manual_seed(0)
    model = hvpmtl.build(cfg, num_classes=10)
    return cfg, model, build_optimizer(model, cfg.optim, torch.device("cpu"))


def _step(cfg, model, opt):
    g = torch.Generator().manual_seed(0)
    batch = {
        "views": [torch.randn(4, 3, 64, 64, generator=g) for _ in range(2)],
        "mask": hvpmtl.mask_generator(cfg)(4, generator=g),
        "labels": (torch.rand(4, 10, generator=g) < 0.3).float(),
    }
    model(batch)["loss"].backward()
    opt.step()
    opt.zero_grad()
    model.after_step()


def test_roundtrip_restores_model_optimizer_and_rng(tmp_path):
    cfg, model, opt = _model_and_opt()
    _step(cfg, model, opt)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ck.checkpoint_path(tmp_path, 1)
    ck.save_checkpoint(path, model, opt, None, {"step": 1}, to_dict(cfg), DistEnv())
    expected = (random.random(), np.random.rand(), torch.rand(1))

    state = torch.load(path, weights_only=True)  # plain tensors and types only
    assert state["step"] == 1 and state["config"]["backbone"]["img_size"] == 64
    _, model2, opt2 = _model_and_opt()
    ck.restore(ck.load_checkpoint(path), model2, opt2, None, DistEnv())
    assert model2.iteration == 1
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, msg=k)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert set(s1) == set(s2)
    for i in s1:
        torch.testing.assert_close(s1[i]["exp_avg"], s2[i]["exp_avg"], msg=str(i))
        torch.testing.assert_close(s1[i]["step"], s2[i]["step"])


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "x.pt"
    ck.atomic_write(path, lambda f: f.write(b"old"))

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ck.atomic_write(path, boom)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary file left


def test_latest_and_pruning(tmp_path):
    assert ck.find_latest(tmp_path) is None
    for step in (5, 100, 20):
        ck.atomic_write(ck.checkpoint_path(tmp_path, step), lambda f: f.write(b""))
    (tmp_path / "checkpoints" / "notes.txt").write_text("kept")
    assert ck.find_latest(tmp_path).name == "step_00000100.pt"
    ck.prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [20, 100]
    assert (tmp_path / "checkpoints" / "notes.txt").exists()


def test_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="not an hvpmtl checkpoint"):
        ck.load_checkpoint(tmp_path / "w.pt")
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "missing.pt")


def test_exported_backbone_is_timm_loadable(tmp_path):
    import timm
    from safetensors.torch import load_file

    cfg, model, opt = _model_and_opt()
    _step(cfg, model, opt)
    paths = ck.export_weights(tmp_path, model, to_dict(cfg), DistEnv())
    net = timm.create_model(cfg.backbone.name, img_size=64, patch_size=8, num_classes=0, **cfg.backbone.kwargs)
    net.load_state_dict(load_file(paths["backbone"]))  # strict: exactly timm's keys
    backbone = ck.load_backbone(paths["backbone"])  # config read from the file's metadata
    x = torch.randn(2, 3, 64, 64)
    model.eval(), backbone.eval()
    torch.testing.assert_close(backbone(x)[1], model.backbone(x)[1])
    full = load_file(paths["model"])
    assert "teacher.backbone.model.cls_token" in full
