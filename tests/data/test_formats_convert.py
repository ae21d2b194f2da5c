"""hvpmtl data convert, the formats' config keys, and pre-training on a format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from format_fixtures import (
    _labels,
    coco_layout,
    oi_layout,
    tencent_layout,
    voc_layout,
)

import hvpmtl
from conftest import tiny_config
from hvpmtl.cli import main
from hvpmtl.config import ConfigError
from hvpmtl.data import ManifestImages, build_dataset, build_pretrain_dataset
from hvpmtl.data.formats import READERS, VocabularyError


def _convert_args(tmp_path: Path, fmt: str) -> list[str]:
    """The ``hvpmtl data convert`` arguments that read the fixture of ``fmt``."""
    if fmt == "coco":
        return ["--annotations", str(coco_layout(tmp_path))]
    if fmt == "voc":
        return ["--annotations", str(voc_layout(tmp_path)), "--voc-difficult", "include"]
    if fmt == "openimages":
        return ["--annotations", str(oi_layout(tmp_path)), "--root", str(tmp_path / "oi/images")]
    return ["--annotations", str(tencent_layout(tmp_path)), "--root", str(tmp_path / "tencent/images"),
            "--min-confidence", "0.3"]  # fmt: skip


def _config_of(fmt: str, args: list[str]) -> list[str]:
    keys = {"--annotations": "annotations", "--root": "root", "--voc-difficult": "voc_difficult",
            "--min-confidence": "min_confidence"}  # fmt: skip
    return [f"data.dataset={fmt}", *(f"data.{keys[k]}={v}" for k, v in zip(args[::2], args[1::2]))]


@pytest.mark.parametrize("fmt", sorted(READERS))
def test_convert_then_manifest_gives_the_same_labels(tmp_path: Path, capsys, fmt: str):
    args = _convert_args(tmp_path, fmt)
    out = tmp_path / "out" / f"{fmt}.jsonl"
    assert main(["data", "convert", "--format", fmt, *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{out.with_name(f'{fmt}.classes.txt')}" in printed and "data.dataset=manifest" in printed
    direct = build_dataset(hvpmtl.load_config(None, _config_of(fmt, args)).data, 32)
    converted = ManifestImages(out, classes=out.with_name(f"{fmt}.classes.txt"))
    assert converted.classes == direct.classes and len(converted) == len(direct)
    assert [Path(p).resolve() for p in converted.paths] == [Path(p).resolve() for p in direct.paths]
    assert _labels(converted) == _labels(direct)
    first = json.loads(out.read_text().splitlines()[0])
    assert not Path(first["path"]).is_absolute()
    if fmt == "openimages":
        assert first["negatives"] == ["Dog"]


def test_convert_errors_exit_2(tmp_path: Path, capsys):
    path = coco_layout(tmp_path, [{"id": 17, "image_id": 1, "category_id": 99, "bbox": [0, 0, 1, 1]}])
    rc = main(["data", "convert", "--format", "coco", "--annotations", str(path), "--out", str(tmp_path / "m.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: " in err and "annotations[0] (id 17): category_id 99 not in categories" in err
    assert not (tmp_path / "m.jsonl").exists()
    rc = main(["data", "convert", "--format", "voc", "--annotations", str(tmp_path / "no.txt"), "--out", "m.jsonl"])
    assert rc == 2 and "no.txt" in capsys.readouterr().err


def test_config_keys_are_checked_and_named(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"data\.voc_difficult='maybe': must be 'exclude' or 'include'"):
        hvpmtl.load_config(None, ["data.voc_difficult=maybe"])
    with pytest.raises(ConfigError, match=r"data\.min_confidence=1\.5: must be in \[0, 1\]"):
        hvpmtl.load_config(None, ["data.min_confidence=1.5"])
    cfg = hvpmtl.load_config(None, ["data.dataset=coco"])
    with pytest.raises(ValueError, match=r"data\.annotations: not set \(the train split of data\.dataset=coco"):
        build_dataset(cfg.data, 32)
    with pytest.raises(ValueError, match=r"data\.val_annotations: not set"):
        build_dataset(cfg.data, 32, "val")
    path = tencent_layout(tmp_path)
    cfg = hvpmtl.load_config(None, ["data.dataset=tencent", f"data.annotations={path}", "data.classes=[n999]",
                                    f"data.root={tmp_path}/tencent/images"])  # fmt: skip
    with pytest.raises(VocabularyError, match=r"data\.classes: class 'n999' is not in .*dictionary"):
        build_dataset(cfg.data, 32)


def test_format_without_tags_stops_pretraining(tmp_path: Path):
    path = tencent_layout(tmp_path, ["im_0.jpeg\t2:0.8"])
    base = ["data.dataset=tencent", f"data.annotations={path}", f"data.root={tmp_path}/tencent/images"]
    with pytest.raises(ValueError, match=r"train_im\.txt: no tags: none of the 1 images has a positive label"):
        build_pretrain_dataset(tiny_config(*base, "data.min_confidence=0.9"))
    views = build_pretrain_dataset(tiny_config(*base, "data.rand_augment=false"))  # 32 x 32 views, 5 classes
    assert views[0]["labels"].tolist() == [0, 0, 1, 0, 0] and views.classes[2] == "dog, domestic dog"


@pytest.mark.slow
def test_pretrain_two_steps_on_coco(tmp_path: Path, capsys):
    path = coco_layout(tmp_path / "coco")
    out = tmp_path / "run"
    rc = main(["pretrain", "-c", "cpu-micro", "data.dataset=coco", f"data.annotations={path}", "data.batch_size=2",
               "data.num_workers=0", "data.rand_augment=false", "train.max_steps=2", "train.progress=false",
               "backbone.kwargs={depth: 1, embed_dim: 32, num_heads: 2}", "tasks.mlc.dim=32", "tasks.mlc.num_heads=2",
               "tasks.mlc.ffn_dim=64", "tasks.swav.hidden_dim=32", "tasks.swav.out_dim=16",
               "tasks.swav.num_prototypes=8", f"train.output_dir={out}"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    saved = (out / "config.yaml").read_text()
    assert "dataset: coco" in saved and "num_classes: 3" in saved
