"""Start weights (backbones/pretrained.py): local files, timm's cache, a previous run's student or
teacher; nothing downloaded, mismatches named, resume never re-reads them."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

import hvpmtl
from conftest import tiny_config
from hvpmtl.backbones import BackboneConfig, build_backbone, load_start_weights
from hvpmtl.config import ConfigError, to_dict
from hvpmtl.engine.checkpoint import export_weights
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.eval.weights import resolve_weights

KW = {"depth": 1, "embed_dim": 32, "num_heads": 2}
HUB_REPO = "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # timm's default weights of the name


def vit(img_size: int = 32, seed: int = 0, **kw) -> BackboneConfig:
    return BackboneConfig("vit_tiny_patch16_224", img_size=img_size, patch_size=8, kwargs={**KW, **kw})


def timm_state(cfg: BackboneConfig, seed: int, num_classes: int = 0) -> dict[str, torch.Tensor]:
    """A timm model's own state dict (with a classifier when ``num_classes``), as a hub file holds."""
    import timm

    torch.manual_seed(seed)
    kwargs = {**cfg.kwargs, "img_size": cfg.img_size, "patch_size": cfg.patch_size}
    return timm.create_model(cfg.name, num_classes=num_classes, **kwargs).state_dict()


def assert_loaded(model: torch.nn.Module, state: dict) -> None:
    own = model.state_dict()
    assert set(own) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)


def test_safetensors_file_loads_and_teacher_starts_as_copy(tmp_path):
    state = timm_state(vit(), seed=1)
    save_file(state, tmp_path / "w.safetensors")
    cfg = tiny_config("backbone.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
                      f"backbone.pretrained_file={tmp_path / 'w.safetensors'}")  # fmt: skip
    model = hvpmtl.build(cfg)
    assert_loaded(model.backbone.model, state)
    assert_loaded(model.teacher["backbone"].model, state)  # the EMA starts from the loaded student
    assert not hvpmtl.build(cfg, init_weights=False).backbone.model.pos_embed.equal(state["pos_embed"])


def test_pth_training_checkpoint_drops_classifier_and_prefers_ema(tmp_path):
    ema, plain = timm_state(vit(), seed=2, num_classes=7), timm_state(vit(), seed=3, num_classes=7)
    torch.save({"state_dict": {f"module.{k}": v for k, v in plain.items()}, "state_dict_ema": ema, "epoch": 3},
               tmp_path / "ckpt.pth")  # fmt: skip
    cfg = vit()
    cfg.pretrained_file = str(tmp_path / "ckpt.pth")
    bb = build_backbone(cfg)
    assert "head.weight" in ema
    assert load_start_weights(bb, cfg) == str(tmp_path / "ckpt.pth")
    assert_loaded(bb.model, {k: v for k, v in ema.items() if not k.startswith("head.")})


def test_position_embedding_resampled_to_another_image_size(tmp_path):
    state = timm_state(vit(img_size=32), seed=4)  # 4x4 patch grid
    save_file(state, tmp_path / "w.safetensors")
    cfg = vit(img_size=64)  # 8x8 grid
    cfg.pretrained_file = str(tmp_path / "w.safetensors")
    bb = build_backbone(cfg)
    load_start_weights(bb, cfg)
    expected = resample_abs_pos_embed(state["pos_embed"], [8, 8], num_prefix_tokens=1)
    assert bb.model.pos_embed.shape == (1, 65, 32)
    torch.testing.assert_close(bb.model.pos_embed.detach(), expected)
    torch.testing.assert_close(bb.model.blocks[0].attn.qkv.weight.detach(), state["blocks.0.attn.qkv.weight"])


def test_weights_of_another_architecture_are_named(tmp_path):
    save_file(timm_state(vit(depth=2), seed=0), tmp_path / "deep.safetensors")
    cfg = vit()
    cfg.pretrained_file = str(tmp_path / "deep.safetensors")
    with pytest.raises(ConfigError, match=r"backbone\.pretrained_file=.*deep\.safetensors does not fit "
                       r"vit_tiny_patch16_224 \(\d+ unexpected: blocks\.1\."):  # fmt: skip
        load_start_weights(build_backbone(cfg), cfg)


@pytest.mark.parametrize(
    "write, message",
    [
        (None, r"backbone\.pretrained_file: no such file"),
        (lambda p: torch.save({"w": torch.zeros(1), "f": shutil.copy}, p), r"unsafe to load"),
        (lambda p: p.write_bytes(b"\x00" * 10), r"not a weights file.*nothing was loaded"),
        (lambda p: torch.save({"epoch": 3}, p), r"holds no tensors"),
    ],
)
def test_unusable_files_are_refused_by_key(tmp_path, write, message):
    path = tmp_path / "w.pth"
    if write is not None:
        write(path)
    cfg = vit()
    cfg.pretrained_file = str(path)
    with pytest.raises(ConfigError, match=message):
        load_start_weights(build_backbone(cfg), cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["backbone.pretrained=true", "backbone.init_from=a"], r"backbone\.pretrained, backbone\.init_from: set one"),
        (["backbone.init_from_part=ema"], r"backbone\.init_from_part='ema': choose student or teacher"),
        (["backbone.pretrained_file=w.npz"], r"backbone\.pretrained_file=w\.npz: expected one of \.safetensors"),
        (["backbone.kwargs={pretrained: true}"], r"backbone\.kwargs\.pretrained: set backbone\.pretrained instead"),
    ],
)
def test_config_refuses_conflicting_or_unknown_starts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


def test_config_load_does_not_look_for_the_files():
    cfg = tiny_config("backbone.pretrained_file=/nowhere/w.safetensors", "backbone.init_from_part=teacher")
    assert cfg.backbone.pretrained_file == "/nowhere/w.safetensors"  # checked when the weights load


def _fake_hub(cache, state, filename="model.safetensors"):
    snapshot = cache / HUB_REPO / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (cache / HUB_REPO / "refs").mkdir()
    (cache / HUB_REPO / "refs" / "main").write_text("0123abcd")
    save_file(state, snapshot / filename)
    return snapshot / filename


def test_pretrained_true_reads_timm_weights_from_the_cache_only(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = vit()
    cfg.pretrained = True
    with pytest.raises(ConfigError, match=r"backbone\.pretrained=true: timm's weights for 'vit_tiny_patch16_224' "
                       r"are not in the local cache; looked in .*hub \(Hugging Face repo timm/vit_tiny"):  # fmt: skip
        load_start_weights(build_backbone(cfg), cfg)
    state = timm_state(vit(), seed=5, num_classes=1000)
    path = _fake_hub(tmp_path / "hub", state)
    bb = build_backbone(cfg)
    assert str(path) in load_start_weights(bb, cfg)
    assert_loaded(bb.model, {k: v for k, v in state.items() if not k.startswith("head.")})


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224.nope", "vit_base_patch16_gap_224"])  # no such tag; no weights
def test_pretrained_true_for_a_model_without_weights_is_refused(name):
    with pytest.raises(ConfigError, match=rf"backbone\.pretrained=true: timm has no pretrained weights for '{name}'"):
        tiny_config(f"backbone.name={name}", "backbone.pretrained=true")


def _previous_run(tmp_path):
    """A finished run's exports, with a teacher that differs from the student."""
    cfg = tiny_config("backbone.kwargs={depth: 1, embed_dim: 32, num_heads: 2}")
    model = hvpmtl.build(cfg)
    with torch.no_grad():
        for p in model.teacher["backbone"].parameters():
            p.add_(1.0)
    paths = export_weights(tmp_path / "prev", model, to_dict(cfg), DistEnv())
    return cfg, model, paths


def test_teacher_backbone_is_exported_and_evaluable(tmp_path):
    _, model, paths = _previous_run(tmp_path)
    assert set(paths) == {"model", "backbone", "teacher_backbone", "timm", "timm_teacher"}
    assert_loaded(model.teacher["backbone"].model, load_file(paths["teacher_backbone"]))
    from safetensors import safe_open

    with safe_open(str(paths["teacher_backbone"]), "pt") as f:
        meta = f.metadata()
    assert meta["part"] == "teacher" and json.loads(meta["backbone_config"])["kwargs"]["depth"] == 1
    by_flag, by_path = resolve_weights(tmp_path / "prev", teacher=True), resolve_weights(paths["teacher_backbone"])
    assert by_flag.part == by_path.part == "teacher" and "prev teacher" in by_path.label
    for k, v in by_flag.state.items():
        assert v.equal(by_path.state[k])
    with pytest.raises(ValueError, match=r"holds the student's backbone, not a teacher; for --teacher pass"):
        resolve_weights(paths["backbone"], teacher=True)


@pytest.mark.parametrize("part", ["student", "teacher"])
def test_init_from_previous_run_part(tmp_path, part):
    cfg, previous, _ = _previous_run(tmp_path)
    source = previous.teacher["backbone"] if part == "teacher" else previous.backbone
    new_cfg = tiny_config("backbone.kwargs={depth: 1, embed_dim: 32, num_heads: 2}", "train.seed=9",
                          f"backbone.init_from={tmp_path / 'prev'}", f"backbone.init_from_part={part}")  # fmt: skip
    model = hvpmtl.build(new_cfg)
    assert_loaded(model.backbone.model, source.model.state_dict())
    assert_loaded(model.teacher["backbone"].model, source.model.state_dict())


def test_init_from_a_run_of_another_size_names_both(tmp_path):
    _previous_run(tmp_path)
    cfg = tiny_config(f"backbone.init_from={tmp_path / 'prev'}")  # depth 2, embed_dim 32
    with pytest.raises(ConfigError, match=r"backbone\.init_from=.*prev \(prev student.*\) does not fit .*missing: "
                       r"blocks\.1\."):  # fmt: skip
        hvpmtl.build(cfg)


@pytest.mark.slow
def test_resume_continues_without_the_start_weights(tmp_path):
    from engine.conftest import TINY
    from hvpmtl.cli import main

    _previous_run(tmp_path)
    small = [*TINY, "backbone.kwargs={depth: 1, embed_dim: 32, num_heads: 2}", "data.train_size=32",
             "train.max_steps=3", "train.ckpt_every=1", f"train.output_dir={tmp_path / 'run'}",
             f"backbone.init_from={tmp_path / 'prev'}", "backbone.init_from_part=teacher"]  # fmt: skip
    from hvpmtl.engine.faults import inject

    with inject(stop_after=2):
        assert main(["pretrain", *small]) == 1  # simulated crash after step 2
    shutil.rmtree(tmp_path / "prev")  # a resumed run reads its checkpoint, never the start weights
    assert main(["pretrain", *small, "train.resume=auto"]) == 0
    assert (tmp_path / "run" / "teacher_backbone.safetensors").is_file()


class _Runs:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


@pytest.mark.parametrize(
    "write",
    [
        lambda p: torch.save({"model": _Runs()}, p),  # a pickled call among the weights
        lambda p: p.write_bytes(__import__("pickle").dumps({"w": 1}, protocol=4)),  # a raw pickle, no zip
    ],
    ids=["pickled-call", "raw-pickle"],
)
def test_pickled_objects_are_refused_as_unsafe_without_torch_advice(tmp_path, write, recwarn):
    path = tmp_path / "evil.pth"
    write(path)
    cfg = vit()
    cfg.pretrained_file = str(path)
    with pytest.raises(ConfigError) as err:
        load_start_weights(build_backbone(cfg), cfg)
    message = str(err.value)
    assert message.startswith(f"backbone.pretrained_file: {path}: ") and "unsafe to load" in message
    assert "nothing was loaded" in message and "\n" not in message
    assert "weights_only" not in message and "Weights only" not in message and "PyTorch 2.6" not in message
    assert not [w for w in recwarn if "pickle" in str(w.message)]  # torch's "please file an issue" warning
