"""ADE20K-layout export and reader (data/ade.py): exact class maps, reuse, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hvpmtl.data import SyntheticScenes
from hvpmtl.data.ade import ADESegmentation, class_map, export_ade


def _expected_map(item: dict) -> np.ndarray:
    """The class map built by hand: 0 background, class k -> k + 1, later objects on top."""
    out = np.zeros(item["image"].shape[1:], dtype=np.uint8)
    for mask, k in zip(item["masks"].numpy(), item["box_labels"].tolist()):
        out[mask] = k + 1
    return out


@pytest.fixture
def scenes() -> SyntheticScenes:
    return SyntheticScenes(4, img_size=32, seed=3)


def test_export_writes_exact_class_maps_and_reads_them_back(tmp_path, scenes):
    root = export_ade(scenes, tmp_path / "ade", "training", progress=False)
    assert (root / "classes.txt").read_text().splitlines() == ["background", *scenes.classes]
    data = ADESegmentation(root, "training")
    assert len(data) == 4 and data.classes == ["background", *scenes.classes]
    for i in range(4):
        item = scenes[i]
        expected = _expected_map(item)
        assert expected.max() > 0  # every scene has an object
        with Image.open(root / "annotations" / "training" / f"{i:08d}.png") as png:
            assert png.mode == "L"
            np.testing.assert_array_equal(np.array(png), expected)
        got = data[i]
        assert got["index"] == i and got["mask"].dtype == torch.long and got["image"].dtype == torch.uint8
        np.testing.assert_array_equal(got["mask"].numpy(), expected)
        assert torch.equal(got["image"], item["image"])  # PNG images: lossless


def test_later_masks_overwrite_earlier_ones():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :3, :3] = True
    masks[1, 2:, 2:] = True
    out = class_map(masks, torch.tensor([2, 5]), (4, 4))
    assert out[0, 0] == 3 and out[2, 2] == 6 and out[3, 3] == 6 and out[0, 3] == 0 and out[3, 0] == 0


def test_reduce_zero_label_maps_zero_to_ignore_and_shifts(tmp_path):
    for sub in ("images/validation", "annotations/validation"):
        (tmp_path / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((2, 3, 3), dtype=np.uint8)).save(tmp_path / "images/validation/a.jpg")
    labels = np.array([[0, 1, 3], [150, 255, 2]], dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "annotations/validation/a.png")
    (tmp_path / "classes.txt").write_text("other\nwall\nbuilding\n")
    plain = ADESegmentation(tmp_path, "validation")
    np.testing.assert_array_equal(plain[0]["mask"].numpy(), labels)
    assert plain.classes == ["other", "wall", "building"]
    reduced = ADESegmentation(tmp_path, "validation", reduce_zero_label=True, ignore_index=255)
    np.testing.assert_array_equal(reduced[0]["mask"].numpy(), [[255, 0, 2], [149, 255, 1]])
    assert reduced.classes == ["wall", "building"]
    assert reduced[0]["image"].shape == (3, 2, 3)


def test_reexport_is_reused_and_another_source_rewrites(tmp_path, scenes):
    root = export_ade(scenes, tmp_path, "training", progress=False)
    ann = root / "annotations" / "training" / "00000000.png"
    Image.fromarray(np.full((32, 32), 7, dtype=np.uint8)).save(ann)  # a cache is not rewritten
    export_ade(SyntheticScenes(4, img_size=32, seed=3), root, "training", progress=False)
    assert np.array(Image.open(ann)).max() == 7
    other = SyntheticScenes(3, img_size=32, seed=4)
    export_ade(other, root, "training", progress=False)
    np.testing.assert_array_equal(np.array(Image.open(ann)), _expected_map(other[0]))
    assert len(list((root / "annotations" / "training").glob("*.png"))) == 3
    assert len(ADESegmentation(root, "training")) == 3


def test_missing_annotation_folder_and_bad_maps_are_named(tmp_path, scenes):
    root = export_ade(scenes, tmp_path, "training", progress=False)
    (root / "annotations" / "training" / "00000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="00000002"):
        ADESegmentation(root, "training")
    with pytest.raises(FileNotFoundError, match="validation"):
        ADESegmentation(root, "validation")
    (root / "images" / "empty").mkdir()
    (root / "annotations" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ADESegmentation(root, "empty")
    colour = root / "annotations" / "training" / "00000002.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(colour)
    with pytest.raises(ValueError, match="00000002.png.*not a class-index map"):
        ADESegmentation(root, "training")[2]
