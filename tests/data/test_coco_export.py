"""COCO export of the built-in data and the torchvision reader: what goes in comes back out."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.transforms import v2

from hvpmtl.data import SyntheticScenes
from hvpmtl.data.coco import CocoInstances, annotation_file, export_coco

N, SIZE = 6, 32


@pytest.fixture(scope="module")
def scenes() -> SyntheticScenes:
    return SyntheticScenes(N, SIZE, seed=3)


@pytest.fixture(scope="module")
def root(tmp_path_factory, scenes):
    return export_coco(scenes, tmp_path_factory.mktemp("coco"), "train", progress=False)


def load_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_json_is_valid_coco_and_matches_the_items(root, scenes):
    coco = load_coco(annotation_file(root, "train"))
    assert sorted(coco.getImgIds()) == list(range(1, N + 1))
    assert [coco.cats[c]["name"] for c in sorted(coco.getCatIds())] == scenes.classes
    assert coco.dataset["info"]["source"] == {
        "description": "hvpmtl export", "dataset": "SyntheticScenes", "size": N, "seed": 3, "stream": 0,
        "img_size": SIZE,
    }  # fmt: skip
    for index in range(N):
        item = scenes[index]
        img = coco.imgs[index + 1]
        assert (img["width"], img["height"]) == (SIZE, SIZE) and (root / "train" / img["file_name"]).is_file()
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[index + 1]))
        assert len(anns) == len(item["boxes"])
        for ann, box, m, k in zip(anns, item["boxes"], item["masks"], item["box_labels"]):
            x, y, w, h = ann["bbox"]
            assert torch.equal(torch.tensor([x, y, x + w, y + h]), box)
            assert ann["area"] == int(m.sum()) and ann["iscrowd"] == 0 and ann["category_id"] == int(k) + 1
            assert isinstance(ann["segmentation"]["counts"], str)
            decoded = mask_utils.decode(coco.annToRLE(ann))  # the RLE is exact
            assert np.array_equal(decoded.astype(bool), m.numpy())
            # the synthetic boxes are the masks' tight boxes: COCO's own box of the RLE agrees
            assert np.allclose(mask_utils.toBbox(ann["segmentation"]), ann["bbox"])


def test_reader_gives_back_images_boxes_labels_masks(root, scenes):
    data = CocoInstances(root, "train")
    assert len(data) == N and data.classes == scenes.classes and isinstance(data.coco, COCO)
    for index in range(N):
        item = scenes[index]
        image, target = data[index]
        assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE)
        assert torch.equal((image * 255).round().to(torch.uint8), item["image"])  # PNG is lossless
        assert target["image_id"] == index + 1
        assert torch.equal(target["boxes"].as_subclass(torch.Tensor), item["boxes"])
        assert torch.equal(target["labels"], item["box_labels"] + 1)
        assert torch.equal(target["masks"].bool(), item["masks"])


def test_transforms_act_on_image_boxes_and_masks_jointly(root, scenes):
    plain, flipped = CocoInstances(root, "train"), CocoInstances(root, "train", v2.RandomHorizontalFlip(p=1.0))
    (img0, t0), (img1, t1) = plain[1], flipped[1]
    assert torch.equal(img1, img0.flip(-1))
    assert torch.equal(t1["masks"], t0["masks"].flip(-1))
    b0, b1 = t0["boxes"].as_subclass(torch.Tensor), t1["boxes"].as_subclass(torch.Tensor)
    assert torch.equal(b1[:, [0, 2]], SIZE - b0[:, [2, 0]]) and torch.equal(b1[:, [1, 3]], b0[:, [1, 3]])


def test_second_export_is_reused_and_another_source_is_not(tmp_path, scenes):
    export_coco(scenes, tmp_path, "val", progress=False)
    path = annotation_file(tmp_path, "val")
    stamp = path.stat().st_mtime_ns
    export_coco(scenes, tmp_path, "val", progress=False)
    assert path.stat().st_mtime_ns == stamp
    export_coco(SyntheticScenes(N, SIZE, seed=4), tmp_path, "val", progress=False)
    assert path.stat().st_mtime_ns != stamp and json.loads(path.read_text())["info"]["source"]["seed"] == 4


class _Holes:
    """Two images: one object with an empty mask beside a real one, and one with only an empty mask."""

    classes = ["a", "b"]

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict:
        masks = torch.zeros(2, 8, 8, dtype=torch.bool)
        if index == 0:
            masks[1, 2:5, 3:7] = True
        return {
            "image": torch.full((3, 8, 8), 7, dtype=torch.uint8),
            "boxes": torch.tensor([[0.0, 0, 1, 1], [3, 2, 7, 5]]),
            "masks": masks,
            "box_labels": torch.tensor([0, 1]),
        }


def test_empty_masks_are_skipped_and_empty_images_give_empty_targets(tmp_path):
    export_coco(_Holes(), tmp_path, "train", progress=False)
    data = json.loads(annotation_file(tmp_path, "train").read_text())
    assert data["info"]["skipped_empty"] == 3 and len(data["annotations"]) == 1 and len(data["images"]) == 2
    reader = CocoInstances(tmp_path, "train")
    _, full = reader[0]
    assert full["labels"].tolist() == [2] and full["masks"].shape == (1, 8, 8)
    _, empty = reader[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["masks"].shape == (0, 8, 8)
    assert empty["labels"].dtype == torch.long and empty["image_id"] == 2


def test_crowd_annotations_are_dropped(tmp_path, scenes):
    export_coco(scenes, tmp_path, "train", progress=False)
    path = annotation_file(tmp_path, "train")
    data = json.loads(path.read_text())
    first = [a for a in data["annotations"] if a["image_id"] == 1]
    first[0]["iscrowd"] = 1
    path.write_text(json.dumps(data))
    _, target = CocoInstances(tmp_path, "train")[0]
    assert len(target["labels"]) == len(first) - 1 and target["masks"].shape[0] == len(first) - 1


def test_missing_files_are_named(tmp_path, root):
    with pytest.raises(FileNotFoundError, match="instances_nope.json"):
        CocoInstances(root, "nope")
    (tmp_path / "annotations").mkdir()
    annotation_file(tmp_path, "train").write_text(annotation_file(root, "train").read_text())
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        CocoInstances(tmp_path, "train")
