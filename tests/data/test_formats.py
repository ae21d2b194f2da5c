"""Users' formats (COCO, VOC, Open Images, Tencent ML-Images): labels, vocabularies, boxes, switches,
errors naming file and element (fixtures in format_fixtures.py; convert and pre-training in
test_formats_convert.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from format_fixtures import (
    TENCENT_DICTIONARY,
    _image,
    _labels,
    coco_layout,
    oi_layout,
    tencent_layout,
    voc_layout,
    voc_xml,
)

import hvpmtl
from hvpmtl.data import build_dataset
from hvpmtl.data.formats import CocoImages, OpenImagesLabels, TencentImages, VocabularyError, VocImages


def test_coco_labels_vocabulary_boxes(tmp_path: Path):
    ds = CocoImages(coco_layout(tmp_path))
    assert ds.classes == ["cat", "person", "dog"] and ds.label_ids == ["1", "2", "3"]  # category-id order
    assert _labels(ds) == [[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0]]  # crowd tags count, image 3 untagged
    s = ds[0]
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 10, 20) and s["index"] == 0
    assert s["boxes"].tolist() == [[1, 2, 5, 6], [10, 0, 15, 8]] and s["box_labels"].tolist() == [0, 2]
    assert ds[1]["boxes"].shape == (0, 4) and ds[1]["box_labels"].dtype == torch.long  # the crowd box dropped
    assert ds.num_tagged == 3 and ds.image_ids == [1, 2, 3, 4] and ds.root == tmp_path / "train"


def test_coco_masks_from_polygons(tmp_path: Path):
    ds = CocoImages(coco_layout(tmp_path), masks=True)
    masks = ds[0]["masks"]
    assert masks.shape == (2, 10, 20) and masks.dtype == torch.uint8
    assert masks[0, 4, 3] == 1 and masks[0, 9, 19] == 0  # inside / outside the square (1..5, 2..6)
    assert ds[1]["masks"].shape == (0, 10, 20)


def test_coco_given_vocabulary_reorders_and_drops(tmp_path: Path):
    with pytest.warns(
        UserWarning, match=r"1 labels of 1 classes outside the given vocabulary are ignored \(e.g. person"
    ):
        ds = CocoImages(coco_layout(tmp_path), classes=["dog", "1"])  # a name and a category id
    assert ds.classes == ["dog", "cat"] and _labels(ds) == [[1, 1], [0, 0], [0, 0], [0, 1]]
    assert ds[0]["box_labels"].tolist() == [1, 0]
    with pytest.raises(VocabularyError, match=r"class 'horse' is not in .*instances_train\.json"):
        CocoImages(coco_layout(tmp_path), classes=["horse"])


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ({"id": 18, "image_id": 1, "category_id": 99, "bbox": [0, 0, 1, 1]},
         r"instances_train\.json: annotations\[0\] \(id 18\): category_id 99 not in categories"),
        ({"id": 7, "image_id": 42, "category_id": 1, "bbox": [0, 0, 1, 1]},
         r"annotations\[0\] \(id 7\): image_id 42 not in images"),
        ({"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1]},
         r"annotations\[0\] \(id 5\): bbox must be \[x, y, width, height\]"),
        ({"id": 6, "image_id": 1, "category_id": "1"}, r"annotations\[0\] \(id 6\): 'category_id' must be an integer"),
    ],
)  # fmt: skip
def test_coco_errors_name_file_and_element(tmp_path: Path, annotation: dict, message: str):
    with pytest.raises(ValueError, match=message):
        CocoImages(coco_layout(tmp_path, [annotation]))


def test_coco_bad_json_and_missing_image(tmp_path: Path):
    path = coco_layout(tmp_path)
    path.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(ValueError, match=r"instances_train\.json:2: not valid JSON"):
        CocoImages(path)
    path = coco_layout(tmp_path / "b")
    (tmp_path / "b/train/003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"images\[2\] \(id 3\): image not found: .*003\.jpg"):
        CocoImages(path)
    with pytest.warns(UserWarning, match="1 of 4 listed images are absent"):
        ds = CocoImages(path, missing_images="drop")
    assert len(ds) == 3 and ds.num_dropped_images == 1 and ds.image_ids == [1, 2, 4]
    assert _labels(ds)[2] == [1, 0, 0]


# ---------------------------------------------------------------------------------------------
# VOC


def test_voc_difficult_switch(tmp_path: Path):
    image_set = voc_layout(tmp_path)
    ds = VocImages(image_set)
    assert ds.classes == ["car", "chair", "person"]  # sorted names of the split, difficult ones included
    assert _labels(ds) == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]  # the difficult-only person is not a tag
    assert ds[0]["boxes"].tolist() == [[2, 1, 10, 9]] and ds[0]["box_labels"].tolist() == [1]  # 1-based -> 0-based
    assert ds.root == tmp_path / "VOC2007" and ds.num_tagged == 2
    inc = VocImages(image_set, difficult="include")
    assert _labels(inc)[0] == [0, 1, 1] and inc[0]["boxes"].shape == (3, 4)
    assert inc[0]["box_labels"].tolist() == [1, 1, 2]
    cfg = hvpmtl.load_config(None, ["data.dataset=voc", f"data.annotations={image_set}", "data.voc_difficult=include"])
    assert _labels(build_dataset(cfg.data, 32)) == _labels(inc)
    val_keys = [
        "data.dataset=voc",
        f"data.val_annotations={image_set.parent}/val.txt",
        "data.classes=[car,chair,person]",
    ]
    val = build_dataset(hvpmtl.load_config(None, val_keys).data, 32, "val")
    assert _labels(val) == [[1, 0, 0]]


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<annotation><object><difficult>0</difficult></object></annotation>", r"000007\.xml: <object> 1: no <name>"),
        ("<annotation><object><name>car</name><bndbox><xmin>1</xmin><ymin>1</ymin><ymax>4</ymax></bndbox>"
         "</object></annotation>", r"000007\.xml: <object> 1 \(car\): <bndbox> has no <xmax>"),
        ("<annotation><object><name>car</name><difficult>yes</difficult></object></annotation>",
         r"<object> 1 \(car\): <difficult> must be 0 or 1"),
        ("<annotation>\n<object><name>car</name>\n</annotation>", r"000007\.xml:3: not valid XML"),
    ],
)  # fmt: skip
def test_voc_errors_name_file_and_element(tmp_path: Path, xml: str, message: str):
    image_set = voc_layout(tmp_path)
    (image_set.parents[2] / "Annotations/000007.xml").write_text(xml)
    with pytest.raises(ValueError, match=message):
        VocImages(image_set)


def test_voc_per_class_list_and_layout_errors(tmp_path: Path):
    image_set = voc_layout(tmp_path)
    image_set.write_text("000005  1\n")
    with pytest.raises(ValueError, match=r"train\.txt:1: expected one image id per line"):
        VocImages(image_set)
    loose = tmp_path / "list.txt"
    loose.write_text("000005\n")
    with pytest.raises(ValueError, match=r"not in <root>/ImageSets/Main/; set data\.root"):
        VocImages(loose)
    assert _labels(VocImages(loose, tmp_path / "VOC2007")) == [[1, 0]]  # chair; person only difficult


# ---------------------------------------------------------------------------------------------
# Open Images


def test_openimages_confidence_negatives_vocabulary(tmp_path: Path):
    path = oi_layout(tmp_path)
    ds = OpenImagesLabels(path, tmp_path / "oi/images")
    assert ds.classes == ["Cat", "Dog", "Car", "Jaguar (/m/jag1)", "Jaguar (/m/jag2)"]
    assert ds.label_ids == ["/m/cat", "/m/dog", "/m/car", "/m/jag1", "/m/jag2"]
    assert _labels(ds) == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 0, 0, 0]]  # car at 0.3: not a positive
    assert ds[0]["negatives"].tolist() == [0, 1, 0, 0, 0] and ds[2]["negatives"].tolist() == [1, 0, 0, 0, 0]
    assert "boxes" not in ds[0]
    low = OpenImagesLabels(path, tmp_path / "oi/images", min_confidence=0.3)
    assert _labels(low)[0] == [1, 0, 1, 0, 0]
    with pytest.warns(
        UserWarning, match=r"2 labels of 2 classes outside the given vocabulary .*\(e\.g\. Car, Jaguar\)"
    ):
        trainable = OpenImagesLabels(path, tmp_path / "oi/images", classes=["/m/dog", "Cat"])
    assert trainable.classes == ["Dog", "Cat"] and _labels(trainable) == [[0, 1], [1, 0], [0, 0]]
    with pytest.raises(VocabularyError, match=r"class 'Jaguar' names 2 classes .*\(/m/jag1, /m/jag2\); give its id"):
        OpenImagesLabels(path, tmp_path / "oi/images", classes=["Jaguar"])


def test_openimages_old_descriptions_split_folder_and_boxes(tmp_path: Path):
    path = oi_layout(tmp_path)
    (tmp_path / "oi/oidv6-class-descriptions.csv").unlink()
    (tmp_path / "oi/class-descriptions.csv").write_text(
        "/m/cat,Cat\n/m/dog,Dog\n/m/car,Car\n/m/jag1,Jaguar\n/m/jag2,Jag\n"
    )
    (tmp_path / "oi/images").rename(tmp_path / "oi/train")  # root/<split>/ is found from the file name
    boxes = tmp_path / "oi/train-annotations-bbox.csv"
    boxes.write_text(
        "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside\n"
        "000b2,xclick,/m/dog,1,0.1,0.5,0.2,0.6,0,0,0,0,0\n000zz,xclick,/m/dog,1,0,1,0,1,0,0,0,0,0\n"
    )
    ds = OpenImagesLabels(path, boxes_csv=boxes)
    assert ds.classes[3:] == ["Jaguar", "Jag"] and ds.root == tmp_path / "oi/train"
    assert ds[1]["boxes"].shape == (1, 4)
    assert ds[1]["boxes"][0].tolist() == pytest.approx([2, 2, 10, 6])  # fractions of the 20 x 10 image
    assert ds[1]["box_labels"].tolist() == [1] and ds[0]["boxes"].shape == (0, 4)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            "000a1,verification,/m/horse,1",
            r"train-annotations-human-imagelabels\.csv:2: LabelName '/m/horse' is not in",
        ),
        ("000a1,verification,/m/cat,high", r"imagelabels\.csv:2: Confidence must be a number in \[0, 1\], got 'high'"),
        ("000a1,verification,/m/cat", r"imagelabels\.csv:2: 3 fields, the header has 4"),
    ],
)
def test_openimages_errors_name_file_and_line(tmp_path: Path, row: str, message: str):
    with pytest.raises(ValueError, match=message):
        OpenImagesLabels(oi_layout(tmp_path, [row]), tmp_path / "oi/images")


# ---------------------------------------------------------------------------------------------
# Tencent ML-Images


def test_tencent_list_dictionary_threshold(tmp_path: Path):
    path = tencent_layout(tmp_path)
    ds = TencentImages(path, tmp_path / "tencent/images")
    assert ds.classes == ["thing", "matter", "dog, domestic dog", "currant (n07752966)", "currant (n07744246)"]
    assert ds.label_ids == ["n00002452", "n00020827", "n02084071", "n07752966", "n07744246"]
    assert _labels(ds) == [[1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 1, 1, 0, 0]]  # 3:0.4 under 0.5; bare 4 = 1.0
    assert _labels(TencentImages(path, tmp_path / "tencent/images", min_confidence=0.4))[1] == [0, 0, 0, 1, 1]
    assert _labels(TencentImages(path, tmp_path / "tencent/images", min_confidence=0.85)) == [
        [1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 1, 0, 0, 0],
    ]  # fmt: skip
    with pytest.warns(UserWarning, match=r"3 labels of 3 classes outside the given vocabulary"):
        sub = TencentImages(path, tmp_path / "tencent/images", classes=["n07744246", "dog, domestic dog"])
    assert sub.classes == ["currant", "dog, domestic dog"] and _labels(sub) == [[0, 1], [1, 0], [0, 1]]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("im_0.jpeg\t9:1", r"train_im\.txt:1: label index 9 is not in the dictionary \(5 classes\)"),
        ("im_0.jpeg\t2:x", r"train_im\.txt:1: label '2:x' is not 'index:confidence'"),
        ("im_0.jpeg\t2:1.5", r"train_im\.txt:1: label '2:1.5': confidence must be in \[0, 1\]"),
        ("https://c4.example.com/1_o.jpg  3:1", r"train_im\.txt:1: 'https://.*' is a URL, not an image file"),
    ],
)
def test_tencent_errors_name_file_and_line(tmp_path: Path, line: str, message: str):
    with pytest.raises(ValueError, match=message):
        TencentImages(tencent_layout(tmp_path, [line]), tmp_path / "tencent/images")


def test_tencent_bad_dictionary_line(tmp_path: Path):
    path = tencent_layout(tmp_path)
    (tmp_path / "tencent/dictionary_and_semantic_hierarchy.txt").write_text(TENCENT_DICTIONARY + "n0123 dog\n")
    with pytest.raises(ValueError, match=r"dictionary_and_semantic_hierarchy\.txt:6: expected '<WordNet id><TAB>"):
        TencentImages(path, tmp_path / "tencent/images")


# ---------------------------------------------------------------------------------------------
# config keys, convert, pre-training


# ---------------------------------------------------------------------------------------------
# hostile or broken annotation files


@pytest.mark.parametrize("bbox", [[float("nan"), 5, 20, 20], [0, 0, float("inf"), 1], [0, float("-inf"), 1, 1]])
def test_coco_non_finite_bbox_names_the_element(tmp_path: Path, bbox: list):
    annotation = {"id": 9, "image_id": 1, "category_id": 1, "bbox": bbox}
    with pytest.raises(ValueError, match=r"instances_train\.json: annotations\[0\] \(id 9\): bbox must be .*finite"):
        CocoImages(coco_layout(tmp_path, [annotation]))


@pytest.mark.parametrize("text", ["nan", "inf", "-Infinity"])
def test_voc_non_finite_corner_names_the_element(tmp_path: Path, text: str):
    image_set = voc_layout(tmp_path)
    voc_xml(image_set.parents[2] / "Annotations/000007.xml", [("car", 0, (1, 1, text, 4))])
    with pytest.raises(ValueError, match=rf"000007\.xml: <object> 1 \(car\): <xmax> is not a finite number: '{text}'"):
        VocImages(image_set)


def test_coco_json_nested_too_deeply_is_one_line(tmp_path: Path):
    path = coco_layout(tmp_path)
    path.write_text('{"images":' + "[" * 100_000 + "]" * 100_000 + ',"annotations":[],"categories":[]}')
    with pytest.raises(ValueError, match=r"instances_train\.json: not valid JSON \(nested too deeply\)$"):
        CocoImages(path)


@pytest.mark.parametrize("name", ["../outside.jpg", "sub/../../outside.jpg", "ABSOLUTE"])
def test_coco_file_name_must_stay_in_the_image_folder(tmp_path: Path, name: str):
    path = coco_layout(tmp_path)
    outside = _image(tmp_path / "outside.jpg")
    name = str(outside) if name == "ABSOLUTE" else name
    data = json.loads(path.read_text())
    data["images"][1]["file_name"] = name
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_train\.json: images\[1\] \(id 2\): file_name .* inside "):
        CocoImages(path)
    data["images"][1]["file_name"] = "sub/../002.jpg"  # a '..' that stays inside is refused as well
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"images\[1\] \(id 2\): file_name 'sub/../002.jpg'"):
        CocoImages(path)


@pytest.mark.parametrize("name", ["../../outside.jpg", "ABSOLUTE"])
def test_voc_filename_must_stay_in_jpegimages(tmp_path: Path, name: str):
    image_set = voc_layout(tmp_path)
    voc = image_set.parents[2]
    outside = _image(tmp_path / "outside.jpg")
    (voc / "JPEGImages/000007.jpg").unlink()  # <filename> is used only when <id>.jpg is absent
    voc_xml(voc / "Annotations/000007.xml", [("car", 0, (2, 3, 4, 5))], str(outside) if name == "ABSOLUTE" else name)
    with pytest.raises(ValueError, match=r"000007\.xml: <filename> .* inside .*JPEGImages"):
        VocImages(image_set)
    voc_xml(voc / "Annotations/000007.xml", [("car", 0, (2, 3, 4, 5))], "000005.jpg")  # another image inside: fine
    assert len(VocImages(image_set)) == 3
