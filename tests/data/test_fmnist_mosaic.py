"""Fashion-MNIST 2x2 mosaics (skipped when the IDX files are not installed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hvpmtl.data import DataConfig, FashionMNISTMosaic, build_dataset
from hvpmtl.data.fmnist import DEFAULT_ROOT

needs_files = pytest.mark.skipif(
    not (Path(DEFAULT_ROOT) / "t10k-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST IDX files absent"
)


@needs_files
def test_labels_are_the_item_classes_and_boxes_the_quadrants():
    ds = FashionMNISTMosaic(split="val", size=50, img_size=64, seed=1)
    assert ds.classes[0] == "T-shirt/top" and len(ds.classes) == 10
    quadrants = torch.tensor([[0, 0, 32, 32], [32, 0, 64, 32], [0, 32, 32, 64], [32, 32, 64, 64]]).float()
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 64, 64) and s["image"].dtype == torch.uint8
        expected = torch.zeros(10)
        expected[s["box_labels"]] = 1
        assert torch.equal(s["labels"], expected)
        assert torch.equal(s["boxes"], quadrants)
        for box, mask in zip(s["boxes"].long(), s["masks"]):
            x1, y1, x2, y2 = box.tolist()
            assert mask.any() and mask[y1:y2, x1:x2].sum() == mask.sum()
    assert torch.equal(ds[3]["image"], FashionMNISTMosaic(split="val", size=50, seed=1)[3]["image"])
    assert not torch.equal(ds[3]["image"], ds[4]["image"])


@needs_files
def test_build_from_config_and_native_size():
    cfg = DataConfig(dataset="fmnist-mosaic", train_size=20, val_size=10)
    train, val = build_dataset(cfg, 56, "train"), build_dataset(cfg, 56, "val")
    assert len(train) == 20 and len(val) == 10
    s = train[0]
    assert s["image"].shape == (3, 56, 56) and s["masks"].shape == (4, 56, 56)


def test_missing_files_name_the_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        FashionMNISTMosaic(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="data.root"):
        build_dataset(DataConfig(dataset="fmnist-mosaic", root=str(tmp_path)), 64)
    with pytest.raises(FileNotFoundError, match="data.root: folder not found"):
        build_dataset(DataConfig(dataset="fmnist-mosaic", root=str(tmp_path / "nope")), 64)


@needs_files
def test_items_at_the_mosaic_scale_are_the_raw_item_centred_on_black():
    from hvpmtl.data import FashionMNISTItems
    from hvpmtl.data.fmnist import load_fashion_mnist

    raw = torch.from_numpy(load_fashion_mnist(DEFAULT_ROOT, "test")[0][:3].copy())
    cfg = DataConfig(dataset="fmnist", train_size=3, val_size=3, item_scale=0.5)
    items = build_dataset(cfg, 56, "val")
    for i in range(3):
        image = items[i]["image"]
        assert image.shape == (3, 56, 56)
        assert torch.equal(image[0, 14:42, 14:42], raw[i])  # native 28 px, no resampling
        border = image.clone()
        border[:, 14:42, 14:42] = 0
        assert not border.any()
    whole = FashionMNISTItems(DEFAULT_ROOT, "val", 3, 28)[1]["image"]
    assert torch.equal(whole[0], raw[1])  # scale 1 at 28 px: the item itself
    with pytest.raises(ValueError, match="data.item_scale"):
        DataConfig(dataset="fmnist", item_scale=1.5).validate("data")
