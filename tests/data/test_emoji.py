"""Emoji scenes tagged with CLDR keywords (skipped where the font or the CLDR files are not installed)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hvpmtl.data import DataConfig, build_dataset
from hvpmtl.data.emoji import (
    DEFAULT_ANNOTATIONS,
    DEFAULT_FONT,
    EmojiScenes,
    emoji_split,
    load_catalog,
    read_annotations,
)

needs_emoji = pytest.mark.skipif(
    not (Path(DEFAULT_FONT).is_file() and all(Path(p).is_file() for p in DEFAULT_ANNOTATIONS)),
    reason="Debian packages fonts-noto-color-emoji and unicode-cldr-core not installed",
)


@needs_emoji
def test_at_least_100_long_tailed_tags_and_several_per_image():
    catalog = load_catalog()
    assert len(catalog.classes) >= 100 and len(set(catalog.classes)) == len(catalog.classes)
    assert "face" in catalog.classes and all(c == c.lower() for c in catalog.classes)
    assert "grinning face" not in catalog.classes  # a name, carried by one emoji: not a tag
    per_tag = np.bincount([t for tags in catalog.tags["train"] for t in tags], minlength=len(catalog.classes))
    assert per_tag.min() >= 5 and per_tag.max() / per_tag.min() >= 20
    ds = EmojiScenes("train", 40, 32)
    assert ds.num_classes == len(catalog.classes)
    tags = np.stack([ds[i]["labels"].numpy() for i in range(len(ds))]).sum(1)
    assert tags.min() >= 1 and tags.mean() >= 2.5
    fewer = load_catalog(min_count=10)
    assert set(fewer.classes) < set(catalog.classes)


@needs_emoji
def test_same_index_same_scene_and_tags():
    a, b = EmojiScenes("train", 20, 48, seed=3), EmojiScenes("train", 20, 48, seed=3)
    for i in (0, 7, 19):
        sa, sb = a[i], b[i]
        assert sa["image"].shape == (3, 48, 48) and sa["image"].dtype == torch.uint8
        assert torch.equal(sa["image"], sb["image"]) and torch.equal(sa["labels"], sb["labels"])
        assert a.emoji_at(i) == b.emoji_at(i)
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], EmojiScenes("train", 20, 48, seed=4)[0]["image"])
    copy = pickle.loads(pickle.dumps(a))  # as a spawned loader worker gets it: no font handle, no glyphs
    assert not copy._glyphs and torch.equal(copy[7]["image"], b[7]["image"])
    # the tags are the union of the keywords (in the vocabulary) of the emoji drawn
    keywords = {}
    for path in DEFAULT_ANNOTATIONS:
        keywords.update(read_annotations(path))
    for i in range(5):
        words = {w for e in a.emoji_at(i) for w in keywords[e]}
        assert {a.classes[t] for t in a[i]["labels"].nonzero().flatten().tolist()} == words & set(a.classes)


@needs_emoji
def test_val_emoji_are_never_seen_in_training():
    catalog = load_catalog()
    train, val = set(catalog.emoji["train"]), set(catalog.emoji["val"])
    assert train and val and not train & val
    assert all(emoji_split(e) == "val" for e in val)
    assert 0.1 < len(val) / (len(train) + len(val)) < 0.3
    cfg = DataConfig(dataset="emoji", train_size=30, val_size=30)
    scenes = {s: build_dataset(cfg, 32, s) for s in ("train", "val", "test")}
    shown = {s: {e for i in range(30) for e in ds.emoji_at(i)} for s, ds in scenes.items()}
    assert shown["train"] <= train and shown["val"] <= val and shown["test"] <= val
    assert not torch.equal(scenes["val"][0]["image"], scenes["test"][0]["image"])  # separate streams
    assert scenes["train"].classes == scenes["val"].classes


@needs_emoji
def test_config_keys_and_errors():
    ds = build_dataset(DataConfig(dataset="emoji", train_size=4, emoji_min_count=10), 32)
    assert ds.classes == load_catalog(min_count=10).classes
    with pytest.raises(ValueError, match="data.emoji_min_count=100000"):
        build_dataset(DataConfig(dataset="emoji", emoji_min_count=100000), 32)
    with pytest.raises(ValueError, match="data.emoji_min_count"):
        DataConfig(dataset="emoji", emoji_min_count=0).validate("data")


def test_missing_files_name_the_package(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="apt-get install unicode-cldr-core"):
        EmojiScenes(annotations=(tmp_path / "en.xml",))
    (tmp_path / "en.xml").write_text('<ldml><annotations><annotation cp="x">a | b</annotation></annotations></ldml>')
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        EmojiScenes(font=tmp_path / "none.ttf", annotations=(tmp_path / "en.xml",))
    with pytest.raises(ValueError, match="data.emoji_min_count is set but has no effect"):
        from hvpmtl.data.config import check_source_keys

        check_source_keys(DataConfig(dataset="synthetic", emoji_min_count=3))


@needs_emoji
def test_pretrain_and_inspect_on_emoji(tmp_path: Path, capsys):
    from hvpmtl.cli import main

    out = tmp_path / "run"
    status = main(["pretrain", "-c", "cpu-emoji", "backbone.kwargs.depth=1", "data.batch_size=8", "data.num_workers=0",
                   "train.max_steps=2", "data.train_size=16", "data.val_size=8", "train.progress=false",
                   f"train.output_dir={out}"])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    assert len(json.loads((out / "classes.json").read_text())) >= 100
    status = main(["data", "inspect", "-c", "cpu-emoji", "--out", str(tmp_path / "inspect"), "--split", "val",
                   "--workers", "0", "--quiet", "data.val_size=20"])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "inspect" / "report.json").read_text())
    assert report["counts"]["images"] == 20 and report["counts"]["classes"] >= 100
