"""Generated scenes: determinism, labels agree with the drawn objects, label-noise rates."""

from __future__ import annotations

import pytest
import torch

from hvpmtl.data import DataConfig, SyntheticScenes, build_dataset


def test_same_key_same_sample_and_different_index_differs():
    a, b = SyntheticScenes(100, 64, seed=3), SyntheticScenes(100, 64, seed=3)
    for i in (0, 7, 99):
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"])
        assert torch.equal(sa["labels"], sb["labels"])
        assert torch.equal(sa["masks"], sb["masks"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], SyntheticScenes(100, 64, seed=4)[0]["image"])


def test_sample_format():
    s = SyntheticScenes(10, 48)[2]
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 48, 48)
    assert s["labels"].dtype == torch.float32 and s["labels"].shape == (10,)
    n = len(s["box_labels"])
    assert s["boxes"].shape == (n, 4) and s["masks"].shape == (n, 48, 48) and s["masks"].dtype == torch.bool
    assert s["index"] == 2
    assert set(SyntheticScenes(10, 48).annotations(2)) == {"boxes", "masks", "box_labels"}


def test_labels_boxes_and_masks_match_the_objects():
    ds = SyntheticScenes(200, 64, seed=1)
    counts = torch.zeros(10)
    for i in range(len(ds)):
        s = ds[i]
        n = len(s["box_labels"])
        assert 1 <= n <= 4
        assert torch.equal(s["labels"], s["clean_labels"])
        expected = torch.zeros(10)
        expected[s["box_labels"]] = 1
        assert torch.equal(s["labels"], expected), "labels must be exactly the classes drawn"
        counts += s["labels"]
        boxes = s["boxes"]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        for box, mask in zip(boxes.long(), s["masks"]):
            assert mask.any()
            x1, y1, x2, y2 = box.tolist()
            assert mask[y1:y2, x1:x2].sum() == mask.sum(), "mask pixels outside the box"
        # masks are the visible pixels: disjoint
        assert s["masks"].sum(0).max() <= 1
    assert (counts > 0).all(), "every class appears"


def test_label_noise_rates():
    r, n = 0.2, 2000
    ds = SyntheticScenes(n, 32, seed=0, label_noise=r)
    dropped = true = added = 0
    for i in range(n):
        s = ds[i]
        clean, noisy = s["clean_labels"].bool(), s["labels"].bool()
        true += int(clean.sum())
        dropped += int((clean & ~noisy).sum())
        added += int((~clean & noisy).sum())
    assert abs(dropped / true - r) < 0.03
    assert abs(added / n - r) < 0.04
    # the same seed gives the same noise; the clean image does not depend on the noise
    again = SyntheticScenes(n, 32, seed=0, label_noise=r)
    assert torch.equal(again[5]["labels"], ds[5]["labels"])
    assert torch.equal(SyntheticScenes(n, 32, seed=0)[5]["image"], ds[5]["image"])


def test_train_and_val_are_disjoint_and_sized_by_config():
    cfg = DataConfig(dataset="synthetic", train_size=50, val_size=20, label_noise=0.3)
    train, val = build_dataset(cfg, 32, "train"), build_dataset(cfg, 32, "val")
    assert len(train) == 50 and len(val) == 20
    assert train.classes == val.classes and len(train.classes) == 10
    train_images = {train[i]["image"].numpy().tobytes() for i in range(50)}
    assert not any(val[i]["image"].numpy().tobytes() in train_images for i in range(20))
    assert val.label_noise == 0.0 and train.label_noise == 0.3


def test_bad_arguments():
    with pytest.raises(ValueError, match="label_noise"):
        SyntheticScenes(10, label_noise=1.0)
    with pytest.raises(IndexError):
        SyntheticScenes(10)[10]
