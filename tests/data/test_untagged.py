"""Untagged and partly tagged images: ``data.untagged``, ``data.unannotated`` (Open Images) and
``data.tagged_fraction`` (generated sets) up to the collated batch's known-mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from format_fixtures import coco_layout, oi_layout
from torchvision.io import write_png

import hvpmtl
from hvpmtl.data import build_pretrain_dataset, collate_pretrain
from hvpmtl.data.fmnist import DEFAULT_ROOT as FMNIST_ROOT
from hvpmtl.data.formats import OpenImagesLabels
from hvpmtl.data.shard_stream import ShardStream
from hvpmtl.data.shard_writer import write_shards
from hvpmtl.data.shards import load_shard_index
from hvpmtl.data.synthetic import tagged_by_fraction

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
SMALL = ["backbone.img_size=32", "data.num_workers=0"]


def _manifest_args(path: Path, tmp_path: Path) -> list[str]:
    return ["data.dataset=manifest", f"data.manifest={path}", f"data.root={tmp_path / 'imgs'}"]


def _manifest(tmp_path: Path, kind: str) -> Path:
    root = tmp_path / "imgs"
    for i in range(4):
        root.mkdir(exist_ok=True)
        write_png(torch.full((3, 40, 40), 30 * i, dtype=torch.uint8), str(root / f"{i}.png"))
    rows = [("0.png", ["dog"]), ("1.png", []), ("2.png", ["cat", "dog"]), ("3.png", [])]
    if kind == "csv":
        path = tmp_path / "m.csv"
        path.write_text("path,labels\n" + "".join(f"{p},{'|'.join(t)}\n" for p, t in rows))
    else:
        path = tmp_path / "m.jsonl"
        path.write_text("".join(json.dumps({"path": p, "labels": t}) + "\n" for p, t in rows))
    return path


def _pretrain(*overrides: str):
    return build_pretrain_dataset(hvpmtl.load_config(None, [*SMALL, *overrides]))


@pytest.mark.parametrize("kind", ("csv", "jsonl"))
def test_manifest_untagged_images_are_unknown_by_default(tmp_path: Path, kind: str):
    m = _manifest(tmp_path, kind)
    ds = _pretrain(*_manifest_args(m, tmp_path))
    batch = collate_pretrain([ds[i] for i in range(4)])
    assert batch["known"].shape == (4, 1) and batch["known"].flatten().tolist() == [True, False, True, False]
    assert batch["labels"][1].sum() == 0


@pytest.mark.parametrize("kind", ("csv", "jsonl"))
def test_manifest_untagged_negative_keeps_all_zero_targets(tmp_path: Path, kind: str):
    m = _manifest(tmp_path, kind)
    ds = _pretrain(*_manifest_args(m, tmp_path), "data.untagged=negative")
    batch = collate_pretrain([ds[i] for i in range(4)])
    assert "known" not in batch  # every tag of an untagged image is an absent tag, as before
    assert batch["labels"][1].sum() == 0 and batch["labels"][3].sum() == 0


def test_fully_tagged_data_carries_no_mask():
    ds = _pretrain("data.train_size=4")  # synthetic: every image has a tag
    assert "known" not in collate_pretrain([ds[i] for i in range(2)])


def test_coco_image_without_annotations_is_unknown(tmp_path: Path):
    path = coco_layout(tmp_path)  # image 3 has no annotation
    args = ["data.dataset=coco", f"data.annotations={path}", f"data.root={tmp_path / 'train'}"]
    batch = collate_pretrain([_pretrain(*args)[i] for i in range(4)])
    assert batch["known"].flatten().tolist() == [True, True, False, True]
    assert "known" not in collate_pretrain([_pretrain(*args, "data.untagged=negative")[i] for i in range(4)])


def test_openimages_unannotated_classes_are_unknown(tmp_path: Path):
    path = oi_layout(tmp_path)  # 000a1: cat 1, dog 0, car 0.3 | 000b2: dog 1, jag2 1 | 000c3: cat 0
    ds = OpenImagesLabels(path, tmp_path / "oi/images")  # classes: cat, dog, car, jag1, jag2
    assert ds[0]["known"].tolist() == [True, True, False, False, False]  # car at 0.3: neither
    assert ds[1]["known"].tolist() == [False, True, False, False, True]
    assert ds[2]["known"].tolist() == [True, False, False, False, False]  # a verified negative stays known
    assert ds[0]["labels"].tolist() == [1, 0, 0, 0, 0]
    old = OpenImagesLabels(path, tmp_path / "oi/images", unannotated="negative")
    assert "known" not in old[0] and old[0]["labels"].tolist() == [1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="unannotated='maybe'"):
        OpenImagesLabels(path, tmp_path / "oi/images", unannotated="maybe")


def test_openimages_mask_reaches_the_batch(tmp_path: Path):
    path = oi_layout(tmp_path)
    args = ["data.dataset=openimages", f"data.annotations={path}", f"data.root={tmp_path / 'oi/images'}"]
    batch = collate_pretrain([_pretrain(*args)[i] for i in range(3)])
    assert batch["known"].shape == (3, 5) and batch["known"].sum() == 5
    assert "known" not in collate_pretrain([_pretrain(*args, "data.unannotated=negative")[i] for i in range(3)])


def test_tagged_fraction_is_a_seeded_hash_of_the_index():
    picks = [tagged_by_fraction(i, 0.1, seed=0) for i in range(2000)]
    assert picks == [tagged_by_fraction(i, 0.1, seed=0) for i in range(2000)]  # any process, any order
    assert 0.08 < sum(picks) / 2000 < 0.12
    assert picks != [tagged_by_fraction(i, 0.1, seed=1) for i in range(2000)]
    assert all(tagged_by_fraction(i, 1.0, seed=0) for i in range(100))


@pytest.mark.parametrize("source", ("synthetic", "fmnist-mosaic", "emoji"))
def test_tagged_fraction_untags_train_images_only(source: str):
    if source == "fmnist-mosaic" and not Path(FMNIST_ROOT).is_dir():
        pytest.skip("Fashion-MNIST IDX files not installed")
    if source == "emoji":
        from hvpmtl.data.emoji import DEFAULT_ANNOTATIONS, DEFAULT_FONT

        if not all(Path(f).is_file() for f in (DEFAULT_FONT, *DEFAULT_ANNOTATIONS)):
            pytest.skip("Debian packages fonts-noto-color-emoji and unicode-cldr-core not installed")
    args = [f"data.dataset={source}", "data.train_size=40", "data.val_size=8", "data.tagged_fraction=0.25"]
    ds = _pretrain(*args)
    batch = collate_pretrain([ds[i] for i in range(40)])
    tagged = torch.tensor([tagged_by_fraction(i, 0.25, seed=0) for i in range(40)])
    assert batch["known"].flatten().tolist() == tagged.tolist()
    assert (batch["labels"][~tagged].sum(1) == 0).all() and (batch["labels"][tagged].sum(1) > 0).all()
    again = _pretrain(*args)  # the same images on a resume or in another process
    assert torch.equal(collate_pretrain([again[i] for i in range(40)])["labels"], batch["labels"])
    val = build_pretrain_dataset(hvpmtl.load_config(None, [*SMALL, *args]), "val")  # stays fully tagged
    assert "known" not in val[0] and all(val[i]["labels"].sum() > 0 for i in range(8))
    negative = collate_pretrain([_pretrain(*args, "data.untagged=negative")[i] for i in range(40)])
    assert "known" not in negative and torch.equal(negative["labels"], batch["labels"])


def test_empty_label_list_survives_a_shard_round_trip(tmp_path: Path):
    m = _manifest(tmp_path, "jsonl")
    cfg = hvpmtl.load_config(None, [*SMALL, *_manifest_args(m, tmp_path)])
    from hvpmtl.data import build_dataset

    index = write_shards(build_dataset(cfg.data, 32), tmp_path / "shards", samples_per_shard=2, shuffle_seed=None)
    assert index.num_tagged == 2 and index.total == 4
    shards = [*SMALL, "data.dataset=shards", f"data.shards={tmp_path / 'shards'}", "data.batch_size=4",
              "data.shard_streams=1", "data.shard_shuffle=1"]  # fmt: skip
    stream = build_pretrain_dataset(hvpmtl.load_config(None, shards))
    assert isinstance(stream, ShardStream)
    (batch,) = list(stream)
    by_index = dict(zip(batch["index"].tolist(), batch["known"].flatten().tolist()))
    assert by_index == {0: True, 1: False, 2: True, 3: False}
    negative = build_pretrain_dataset(hvpmtl.load_config(None, [*shards, "data.untagged=negative"]))
    assert "known" not in next(iter(negative))
    assert load_shard_index(str(tmp_path / "shards")).num_tagged == 2


@pytest.mark.parametrize("overrides, key", [
    (["data.dataset=imagefolder", "data.untagged=negative"], "data.untagged"),
    (["data.unannotated=negative"], "data.unannotated"),
    (["data.dataset=manifest", "data.tagged_fraction=0.5"], "data.tagged_fraction"),
    (["data.untagged=negative"], "data.untagged"),  # synthetic with every image tagged: no effect
])  # fmt: skip
def test_keys_without_effect_are_refused(overrides, key):
    with pytest.raises(ValueError, match=rf"^{key}"):
        hvpmtl.load_config(None, overrides)


@pytest.mark.parametrize("override, message", [
    ("data.untagged=maybe", "data.untagged='maybe'"),
    ("data.unannotated=skip", "data.unannotated='skip'"),
    ("data.tagged_fraction=0", "data.tagged_fraction=0"),
    ("data.tagged_fraction=1.5", "data.tagged_fraction=1.5"),
])  # fmt: skip
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        hvpmtl.load_config(None, [override, "data.dataset=synthetic"])
