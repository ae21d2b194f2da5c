"""A key that is set but has no effect in the command stops it with one line naming the key and
what would make it count, before any run folder exists: a data source's own keys under another
``data.dataset``, and the loop keys the downstream training loop does not read."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import assert_one_line_error, run_cli
from hvpmtl.cli import main
from hvpmtl.config import PRESET_DIR, load_config, preset_names

# a pre-training that finishes in a second, should a key be ignored
QUICK_PRETRAIN = ["backbone.kwargs.depth=1", "data.train_size=16", "data.val_size=8", "data.batch_size=8",
                  "data.num_workers=0", "train.max_steps=1", "train.progress=false", "train.pictures_every=0",
                  "eval.knn_every=0"]  # fmt: skip
# a downstream training of one step on the cpu-tiny backbone at its initialisation
QUICK_DOWNSTREAM = ["--random-init", "data.train_size=16", "data.val_size=8", "data.batch_size=8",
                    "data.num_workers=0", "train.max_steps=1", "train.progress=false"]  # fmt: skip


def test_a_manifest_under_the_synthetic_default_stops_pretraining(capsys, tmp_path):
    out = tmp_path / "run"
    status, err = run_cli(capsys, "pretrain", "data.manifest=my.csv", "data.root=/images", *QUICK_PRETRAIN,
                          f"train.output_dir={out}")  # fmt: skip
    assert_one_line_error(
        status, err, "data.manifest is set but has no effect with data.dataset=synthetic",
        "set data.dataset=manifest (or remove data.manifest)",
    )  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize("overrides, expected", [
    (["data.annotations=a.json"], "data.annotations is set but has no effect with data.dataset=synthetic: "
     "set data.dataset to one of coco, voc, openimages, tencent (or remove data.annotations)"),
    (["data.val_manifest=v.csv"], "set data.dataset=manifest (or remove data.val_manifest)"),
    (["data.shards=/shards"],
     "data.shards is set but has no effect with data.dataset=synthetic: set data.dataset=shards"),
    (["data.dataset=coco", "data.voc_difficult=include"],
     "data.voc_difficult is set but has no effect with data.dataset=coco: set data.dataset=voc"),
    (["data.dataset=voc", "data.min_confidence=0.7"], "data.min_confidence is set but has no effect with "
     "data.dataset=voc: set data.dataset to one of openimages, tencent"),
    (["data.dataset=manifest", "data.manifest=m.csv", "data.val_size=10"],
     "data.val_size is set but has no effect with data.dataset=manifest"),
    (["data.dataset=imagefolder", "data.root=/x", "data.seed=3"],
     "data.seed is set but has no effect with data.dataset=imagefolder: set data.dataset to one of synthetic"),
    (["data.dataset=fmnist", "data.label_noise=0.2"],
     "data.label_noise is set but has no effect with data.dataset=fmnist"),
    (["data.item_scale=0.5"],
     "data.item_scale is set but has no effect with data.dataset=synthetic: set data.dataset=fmnist"),
    (["data.shard_streams=4"], "data.shard_streams is set but has no effect"),
    (["data.on_bad_image=skip"], "data.on_bad_image is set but has no effect with data.dataset=synthetic"),
])  # fmt: skip
def test_a_key_of_another_source_is_one_line(capsys, overrides, expected):
    status, err = run_cli(capsys, "config", *overrides)
    assert_one_line_error(status, err, expected)


def test_a_key_set_to_its_default_and_the_keys_of_the_chosen_source_pass(capsys):
    assert run_cli(capsys, "config", "data.manifest=", "data.voc_difficult=exclude")[0] == 0
    assert run_cli(capsys, "config", "data.dataset=voc", "data.annotations=a.txt", "data.voc_difficult=include",
                   "data.root=/x", "data.missing_images=drop")[0] == 0  # fmt: skip


def test_overriding_the_source_drops_the_presets_keys_for_its_own_source(capsys, tmp_path):
    from hvpmtl.config import ConfigError
    from hvpmtl.data.config import DataConfig

    cfg = load_config("cpu-tiny", ["data.dataset=manifest", "data.manifest=m.csv"])  # cpu-tiny: synthetic sizes
    assert cfg.data.train_size == DataConfig().train_size and cfg.data.manifest == "m.csv"
    preset = tmp_path / "mine.yaml"  # a preset setting a key its own source does not read is refused
    preset.write_text("data: {dataset: manifest, manifest: m.csv, seed: 3}\n")
    with pytest.raises(ConfigError, match=r"^data.seed is set but has no effect with data.dataset=manifest"):
        load_config(str(preset))
    with pytest.raises(ConfigError, match=r"^data.seed is set but .* data.dataset=imagefolder"):
        load_config(str(preset), ["data.dataset=imagefolder"])  # not the preset's source: seed was never its key


def test_the_same_rule_holds_in_the_data_and_downstream_commands(capsys, tmp_path):
    status, err = run_cli(capsys, "data", "shard", "--out", str(tmp_path / "s"), "data.annotations=a.json")
    assert_one_line_error(status, err, "data.annotations is set but has no effect")
    assert not (tmp_path / "s").exists()
    status, err = run_cli(capsys, "knn", *QUICK_DOWNSTREAM[:4], "data.voc_difficult=include")
    assert_one_line_error(status, err, "data.voc_difficult is set but has no effect with data.dataset=synthetic")
    out = tmp_path / "ft"
    status, err = run_cli(capsys, "finetune", *QUICK_DOWNSTREAM, "data.shards=/s", f"train.output_dir={out}")
    assert_one_line_error(status, err, "data.shards is set but has no effect with data.dataset=synthetic")
    assert not out.exists()


def test_downstream_commands_inherit_only_the_keys_of_the_runs_own_source(tmp_path):
    from hvpmtl.cli.downstream import inherited_data
    from hvpmtl.eval.config import preset_dir

    weights = SimpleNamespace(pretrain={"data": {"dataset": "manifest", "manifest": "m.csv", "seed": 3,
                                                 "train_size": 99, "mean": [0.5, 0.5, 0.5]}})  # fmt: skip
    data = inherited_data(weights, None, [], preset_dir("knn"))["data"]
    assert data == {"dataset": "manifest", "manifest": "m.csv", "mean": [0.5, 0.5, 0.5]}


LOOP_KEYS = [
    ("train.grad_share_every=10", "train.grad_share_every=10 has no effect in finetune"),
    ("train.pictures_every=10", "train.pictures_every=10 has no effect in finetune"),
    ("dist.strategy=fsdp", "dist.strategy=fsdp has no effect in finetune"),
]


@pytest.mark.parametrize("command", ["finetune", "detect", "segment"])
def test_downstream_commands_take_the_loop_keys_the_one_loop_applies(command):
    from hvpmtl.eval.config import ROOTS

    cfg = load_config(None, ["train.loggers=[]", "optim.impl=plain", "optim.weight_decay_end=0.1"],
                      cls=ROOTS[command])  # fmt: skip
    assert not cfg.train.loggers and cfg.optim.impl == "plain" and cfg.optim.weight_decay_end == 0.1


@pytest.mark.parametrize("override, expected", LOOP_KEYS)
def test_finetune_refuses_the_loop_keys_it_does_not_read(capsys, tmp_path, override, expected):
    out = tmp_path / "ft"
    status, err = run_cli(capsys, "finetune", *QUICK_DOWNSTREAM, override, f"train.output_dir={out}")
    assert_one_line_error(status, err, expected, "; remove it")
    assert not out.exists()


@pytest.mark.parametrize("command, override", [
    ("detect", "dist.strategy=fsdp"),
    ("segment", "train.pictures_every=10"), ("segment", "train.grad_share_every=10"),
])  # fmt: skip
def test_detect_and_segment_refuse_them_too(capsys, tmp_path, command, override):
    out = tmp_path / command
    extra = ["detect.fpn_channels=16"] if command == "detect" else ["segment.decoder_channels=16"]
    status, err = run_cli(capsys, command, *QUICK_DOWNSTREAM, *extra, override, f"train.output_dir={out}")
    assert_one_line_error(status, err, f"{override.split('=')[0]}=", f"has no effect in {command}")
    assert not out.exists()


@pytest.mark.parametrize("command, override, expected", [
    ("detect", "train.compile=true", "detect does not compile torchvision's Mask R-CNN"),
    ("finetune", "train.compile=backbone", "finetune compiles its whole model"),
    ("segment", "train.compile=backbone", "use train.compile=true or model"),
])  # fmt: skip
def test_downstream_compile_scopes_that_cannot_apply_are_refused(capsys, tmp_path, command, override, expected):
    out = tmp_path / command
    status, err = run_cli(capsys, command, *QUICK_DOWNSTREAM, override, f"train.output_dir={out}")
    assert_one_line_error(status, err, override.split("=")[0], expected)
    assert not out.exists()


def test_every_preset_and_the_downstream_defaults_load_cleanly():
    from hvpmtl.eval.config import ROOTS, preset_dir

    for name in preset_names():
        load_config(name)
    for command, cls in ROOTS.items():
        load_config(None, [], cls=cls)  # the command's own defaults
        for name in preset_names(preset_dir(command)):
            load_config(name, [], cls=cls, preset_dir=preset_dir(command))
    assert PRESET_DIR.is_dir()


def test_finetune_honours_train_and_eval_images(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --random-init without SOURCE: results go under ./runs
    out = tmp_path / "ft"
    status = main(["finetune", *QUICK_DOWNSTREAM, "train_images=8", "eval_images=4", f"train.output_dir={out}"])
    assert status == 0, capsys.readouterr().err
    record = json.loads(next(Path("runs").glob("*/eval/finetune-*.json")).read_text())
    assert record["train_images"] == 8 and record["eval_images"] == 4
