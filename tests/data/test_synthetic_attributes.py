"""Generated scenes with many tags (``data.synthetic_tags=attributes``), and the default kept as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hvpmtl.data import DataConfig, SyntheticScenes, build_dataset
from hvpmtl.data.synthetic import ATTRIBUTE_COLOURS, ATTRIBUTE_TEXTURES, CLASSES

# Items of the default scenes (synthetic_tags=shapes) as the generator drew them before the
# attributes mode existed: index, per-channel pixel sums, noisy tags, clean tags, box labels,
# boxes, mask areas.
BEFORE = {
    (64, 0, 0, 0.0): [
        (0, [570699, 440356, 381541], [5, 6], [5, 6], [6, 5], [[12, 0, 29, 23], [32, 31, 58, 57]], [200, 339]),
        (1, [420384, 439749, 465993], [4], [4], [4], [[0, 0, 29, 29]], [484]),
        (5, [526271, 468941, 494630], [1, 6, 8], [1, 6, 8], [6, 8, 1],
         [[26, 19, 41, 40], [7, 30, 24, 47], [0, 5, 24, 30]], [167, 215, 326]),
    ],
    (48, 3, 1, 0.3): [
        (0, [284977, 370136, 310648], [6], [3, 6], [6, 3], [[15, 18, 28, 32], [0, 1, 15, 16]], [127, 103]),
        (1, [279850, 206604, 222035], [2, 3, 9], [3, 9], [9, 3], [[15, 14, 26, 26], [26, 10, 45, 29]], [100, 179]),
        (5, [170736, 205512, 196003], [8], [6, 9], [6, 9], [[32, 14, 48, 26], [17, 33, 34, 48]], [119, 185]),
    ],
}  # fmt: skip


@pytest.mark.parametrize("key", list(BEFORE))
def test_default_tags_draw_the_same_scenes_as_before(key):
    img_size, seed, stream, noise = key
    for ds in (SyntheticScenes(6, img_size, seed, stream, noise), SyntheticScenes(6, img_size, seed, stream, noise,
                                                                                  tags="shapes")):  # fmt: skip
        assert ds.classes == list(CLASSES)
        for i, sums, labels, clean, box_labels, boxes, areas in BEFORE[key]:
            item = ds[i]
            assert item["labels"].nonzero().flatten().tolist() == labels
            assert item["clean_labels"].nonzero().flatten().tolist() == clean
            assert item["box_labels"].tolist() == box_labels
            assert item["boxes"].long().tolist() == boxes
            assert item["masks"].sum((1, 2)).tolist() == areas
            # a pixel may round the other way where sin/cos differ in the last bit between CPUs
            got = item["image"].long().sum((1, 2)).tolist()
            assert all(abs(g - s) <= 8 for g, s in zip(got, sums)), (got, sums)


def test_attributes_vocabulary_is_shape_colour_texture():
    ds = SyntheticScenes(10, 32, tags="attributes")
    assert ds.num_classes == len(ds.classes) == len(CLASSES) * len(ATTRIBUTE_COLOURS) * len(ATTRIBUTE_TEXTURES)
    assert ds.num_classes >= 100 and len(set(ds.classes)) == ds.num_classes
    assert "red stripes circle" in ds.classes
    item = ds[3]
    assert item["labels"].shape == (ds.num_classes,)
    assert item["clean_labels"].nonzero().flatten().tolist() == sorted(item["box_labels"].tolist())


def test_attributes_are_deterministic_and_differ_from_the_shapes():
    a, b = SyntheticScenes(20, 32, seed=2, tags="attributes"), SyntheticScenes(20, 32, seed=2, tags="attributes")
    for i in (0, 7, 19):
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert torch.equal(a[i]["labels"], b[i]["labels"])
    assert not torch.equal(a[0]["image"], SyntheticScenes(20, 32, seed=2)[0]["image"])


def test_attribute_tags_have_a_long_tail():
    ds = SyntheticScenes(600, 16, seed=0, tags="attributes")
    probs = ds.tag_probabilities
    assert probs.shape == (ds.num_classes,) and abs(probs.sum() - 1) < 1e-9 and probs.min() > 0
    assert probs.max() / probs.min() >= 100
    counts = np.zeros(ds.num_classes)
    for i in range(len(ds)):
        counts += ds[i]["clean_labels"].numpy()
    assert counts.sum() >= 1.5 * len(ds)  # several objects per image
    # head tag against the median tag: a Zipf-like law, not a flat one (flat would give ~1-3)
    assert counts.max() >= 20 * max(np.median(counts), 1)


def test_synthetic_tags_is_a_data_key():
    cfg = DataConfig(dataset="synthetic", train_size=8, val_size=4, synthetic_tags="attributes")
    train, val = build_dataset(cfg, 32, "train"), build_dataset(cfg, 32, "val")
    assert train.classes == val.classes and len(train.classes) >= 100
    with pytest.raises(ValueError, match="data.synthetic_tags"):
        DataConfig(synthetic_tags="words").validate("data")
    with pytest.raises(ValueError, match="tags"):
        SyntheticScenes(4, tags="words")


def test_downstream_commands_keep_the_tag_set_of_the_run():
    from hvpmtl.cli.downstream import run_source
    from hvpmtl.eval.identity import data_identity

    run = {"dataset": "synthetic", "synthetic_tags": "attributes", "seed": 1, "emoji_min_count": 9}
    assert run_source(run) == {"dataset": "synthetic", "synthetic_tags": "attributes", "seed": 1}
    assert run_source({"dataset": "emoji", "emoji_min_count": 9})["emoji_min_count"] == 9

    class Cfg:
        data = DataConfig(synthetic_tags="attributes")

    assert data_identity(Cfg)["data.synthetic_tags"] == "attributes"
    Cfg.data = DataConfig(dataset="emoji", emoji_min_count=4)
    assert data_identity(Cfg)["data.emoji_min_count"] == 4
