"""Config mistakes stop every command with one line ``error: <key or file>: ...`` and exit 2,
before any run folder exists."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from hvpmtl.config import ConfigError, load_config


@pytest.mark.parametrize("override,expected", [
    ("backbone.kwargs.depth=two", ["backbone.kwargs.depth: expected int, got 'two'"]),
    ("backbone.kwargs.dept=2", ["backbone.kwargs.dept: not an argument", "did you mean 'depth'"]),
    ("backbone.kwargs.bogus=1", ["backbone.kwargs.bogus: not an argument", "valid: ", "embed_dim"]),
    ("backbone.kwargs.img_size=32", ["backbone.kwargs.img_size: set backbone.img_size instead"]),
    ("backbone.kwargs.num_heads=5", ["backbone: timm cannot build vit_tiny_patch16_224", "num_heads=5"]),
    ("backbone.patch_size=7", ["backbone.patch_size=7: must divide backbone.img_size=64"]),
    ("backbone.img_size=60", ["backbone.patch_size=8: must divide backbone.img_size=60"]),
    ("backbone.stem_channels=[16, 0]", ["backbone.stem_channels=[16, 0]: expected positive integers"]),
    ("backbone.kwargs.embed_layer=conv", ["backbone.kwargs.embed_layer: set backbone.stem_channels instead"]),
    ("tasks.mim.mask_patch_size=4", ["tasks.mim.mask_patch_size=4: must be a multiple of the backbone's patch size 8"]),
    ("tasks.mim.mask_patch_size=24", ["tasks.mim.mask_patch_size=24: must divide backbone.img_size=64"]),
    ("train.seed=-1", ["train.seed=-1: must be in [0, 2**63)"]),
    ("optim.lr=.inf", ["optim.lr: expected a finite number, got inf"]),
    ("optim.lr=.nan", ["optim.lr: expected a finite number, got nan"]),
    ("optim.lr=0", ["optim.lr=0.0: must be positive"]),
    ("data.crop_scale=[0.5, .inf]", ["data.crop_scale[1]: expected a finite number, got inf"]),
    ("optim.weight_decay_end=-.inf", ["optim.weight_decay_end: expected a finite number, got -inf"]),
    ("data.batch_size=0", ["data.batch_size=0: must be positive"]),
    ("train.epochs=0", ["train.epochs=0: must be positive"]),
    ("eval.knn_feature=pixels", ["eval.knn_feature", "choose one of mean, pooled, both, grid"]),
])
def test_bad_value_is_one_early_line(capsys, tmp_path, override, expected):
    out = tmp_path / "run"
    status, err = run_cli(capsys, "pretrain", "-c", "cpu-tiny", override, f"train.output_dir={out}")
    assert_one_line_error(status, err, *expected)
    assert not out.exists()


def test_config_command_fails_the_same_way(capsys):
    status, err = run_cli(capsys, "config", "-c", "cpu-tiny", "backbone.kwargs.depth=two")
    assert_one_line_error(status, err, "backbone.kwargs.depth")
    assert capsys.readouterr().out == ""


def test_cuda_device_without_gpu(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    status, err = run_cli(capsys, "pretrain", "-c", "cpu-tiny", "train.device=cuda", f"train.output_dir={out}")
    assert_one_line_error(status, err, "train.device=cuda: no CUDA device is visible")
    assert not out.exists()


def test_swin_reduction_must_tile_the_image_for_mim():
    with pytest.raises(ConfigError, match="backbone.img_size=48: must be a multiple of the last stage's reduction 32"):
        load_config("cpu-swin-tiny", ["backbone.img_size=48"])
    load_config("cpu-swin-tiny", ["backbone.img_size=48", "tasks.mim.weight=0"])  # no SimMIM decoder: fine


def test_conv_stem_needs_a_vit_and_random_start():
    with pytest.raises(ConfigError, match="backbone.stem_channels: a convolutional stem needs a ViT"):
        load_config("cpu-swin-tiny", ["backbone.stem_channels=[16]"])
    with pytest.raises(ConfigError, match="backbone.stem_channels: backbone.pretrained_file has a linear patch"):
        load_config("cpu-tiny", ["backbone.stem_channels=[16]", "backbone.pretrained_file=vit.safetensors"])
    assert load_config("cpu-tiny", ["backbone.stem_channels=[16]"]).backbone.stem_channels == [16]


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def test_base_cycle_names_the_files(capsys, tmp_path):
    a = write(tmp_path / "a.yaml", "base: b.yaml\noptim: {lr: 1.0e-3}\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    out = tmp_path / "run"
    status, err = run_cli(capsys, "pretrain", "-c", str(a), f"train.output_dir={out}")
    assert_one_line_error(status, err, "b.yaml: base cycle: a.yaml -> b.yaml -> a.yaml")
    assert not out.exists()


def test_base_of_itself_is_a_cycle(tmp_path):
    me = write(tmp_path / "me.yaml", "base: me.yaml\n")
    with pytest.raises(ConfigError, match=r"base cycle: me.yaml -> me.yaml"):
        load_config(str(me))


def test_base_must_be_a_name_or_path(capsys, tmp_path):
    bad = write(tmp_path / "bad.yaml", "base: 42\n")
    status, err = run_cli(capsys, "config", "-c", str(bad))
    assert_one_line_error(status, err, f"{bad}: base must be a preset name or a YAML path, got 42")


def test_non_utf8_file_names_file_and_offset(capsys, tmp_path):
    latin1 = write(tmp_path / "latin1.yaml", b"base: cpu-tiny\n# caf\xe9\n")
    child = write(tmp_path / "child.yaml", "base: latin1.yaml\n")
    out = tmp_path / "run"
    status, err = run_cli(capsys, "pretrain", "-c", str(child), f"train.output_dir={out}")
    assert_one_line_error(status, err, f"{latin1}: not UTF-8 text (byte 0xe9 at offset 20)")
    assert not out.exists()


def test_unreadable_config_path(capsys, tmp_path):
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    status, err = run_cli(capsys, "config", "-c", str(folder))
    assert_one_line_error(status, err, f"{folder}: cannot read")


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        load_config(str(evil))
    assert not marker.exists()


def alias_bomb(levels: int) -> str:
    """``mlp_ratio`` as nested YAML aliases: ``levels`` lists of 9 references, 9**levels strings once expanded."""
    text, prev = 'backbone:\n  kwargs:\n    depth: 1\n    mlp_ratio: [&a ["x","x","x","x","x","x","x","x","x"]', "a"
    for name in "bcdefghijk"[: levels - 1]:
        text += f", &{name} [" + ",".join([f"*{prev}"] * 9) + "]"
        prev = name
    return text + "]\n"


@pytest.mark.parametrize("levels", [6, 9])  # 9: the full bomb, 387 million strings (7.5 GB, 54 s before)
def test_yaml_aliases_are_refused_at_once(capsys, tmp_path, levels):
    bomb = write(tmp_path / "bomb.yaml", alias_bomb(levels))
    start = time.monotonic()
    status, err = run_cli(capsys, "config", "-c", str(bomb))
    assert time.monotonic() - start < 10
    assert_one_line_error(status, err, f"{bomb}:4: YAML alias *a: aliases are not allowed in config files")
    with pytest.raises(ConfigError, match=r"backbone.kwargs: YAML alias \*a"):
        load_config(None, ["backbone.kwargs=[&a [1], *a]"])


@pytest.mark.parametrize("override", [
    "backbone.kwargs.mlp_ratio=[" + ",".join(["x"] * 50_000) + "]",  # a type error echoes the value
    "optim.lr=" + "f" * 50_000,
    "train.precision=" + "p" * 50_000,  # a rule of a block's validate() echoes it too
    "data.dataset=" + "d" * 50_000,
    "backbone.kwargs.global_pool=" + "g" * 50_000,
    "backbone.kwargs.act_layer=" + "a" * 50_000,  # so does a model timm cannot build
])  # fmt: skip
def test_echoed_values_are_cut_short(capsys, override):
    status, err = run_cli(capsys, "config", "-c", "cpu-tiny", override)
    assert_one_line_error(status, err, override.split("=")[0].split(".")[-1])
    assert len(err) < 600, err[:300]


def test_swav_queue_too_large_for_memory_is_refused_by_its_size(capsys):
    status, err = run_cli(capsys, "config", "-c", "cpu-tiny", "tasks.swav.queue_length=100000000000")
    assert_one_line_error(status, err, "tasks.swav.queue_length=100000000000: the queue and its prototype scores",
                          "102.4 TB", "at most 4.0 GB")  # fmt: skip  (cpu-tiny: out_dim + num_prototypes = 128)
    with pytest.raises(ConfigError, match=r"tasks.swav.queue_length=200000: .* 5.0 GB"):  # 10^8 asked for 51 GB
        load_config(None, ["tasks.swav.queue_length=200000"])  # 2 x 200000 x (128 + 3000) x 4 bytes
    assert load_config(None, ["tasks.swav.queue_length=3840"]).tasks.swav.queue_length == 3840  # SwAV's own: 96 MB
