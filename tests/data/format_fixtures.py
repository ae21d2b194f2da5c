"""Small files in the real layouts of COCO, Pascal VOC, Open Images and Tencent ML-Images, for
the format tests."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def _image(path: Path, size: tuple[int, int] = (20, 10), value: int = 120) -> Path:
    """A small RGB file (``size`` = width, height); the suffix picks the codec."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, value // 2)).save(path)
    return path


def _labels(ds) -> list[list[int]]:
    return [[int(v) for v in ds[i]["labels"]] for i in range(len(ds))]


# ---------------------------------------------------------------------------------------------
# fixtures in each format's own layout


def coco_layout(root: Path, annotations: list[dict] | None = None) -> Path:
    """``root/annotations/instances_train.json`` + ``root/train/*.jpg``: 4 images, categories out of id order."""
    images = [{"id": i, "file_name": f"{i:03d}.jpg", "width": 20, "height": 10} for i in (1, 2, 3, 4)]
    for im in images:
        _image(root / "train" / im["file_name"], value=10 * im["id"])
    square = [[1.0, 2.0, 5.0, 2.0, 5.0, 6.0, 1.0, 6.0]]
    default = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 4, 4], "iscrowd": 0, "segmentation": square},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [10, 0, 5, 8], "iscrowd": 0, "segmentation": square},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 10], "iscrowd": 1,
         "segmentation": {"counts": [0, 200], "size": [10, 20]}},
        {"id": 4, "image_id": 4, "category_id": 1, "bbox": [0, 0, 3, 3], "iscrowd": 0, "segmentation": square},
    ]  # fmt: skip
    data = {
        "images": images,
        "annotations": default if annotations is None else annotations,
        "categories": [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}, {"id": 2, "name": "person"}],
    }
    path = root / "annotations" / "instances_train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


VOC_OBJECT = (
    "<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{difficult}</difficult>"
    "<bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
)


def voc_xml(path: Path, objects: list[tuple[str, int, tuple]], filename: str = "") -> None:
    body = "".join(VOC_OBJECT.format(name=n, difficult=d, box=b) for n, d, b in objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f"<annotation><folder>VOC2007</folder><filename>{filename or path.stem + '.jpg'}</filename>"
        f"<size><width>20</width><height>10</height><depth>3</depth></size>{body}</annotation>\n"
    )


def voc_layout(root: Path) -> Path:
    """``VOC2007/{Annotations,JPEGImages,ImageSets/Main}``; returns ``ImageSets/Main/train.txt``."""
    voc = root / "VOC2007"
    voc_xml(voc / "Annotations/000005.xml",
            [("chair", 0, (3, 2, 10, 9)), ("chair", 1, (11, 1, 15, 5)), ("person", 1, (1, 1, 20, 10))])  # fmt: skip
    voc_xml(voc / "Annotations/000007.xml", [("car", 0, (2, 3, 4, 5))])
    voc_xml(voc / "Annotations/000009.xml", [])
    for i in ("000005", "000007", "000009"):
        _image(voc / f"JPEGImages/{i}.jpg")
    (voc / "ImageSets/Main").mkdir(parents=True)
    (voc / "ImageSets/Main/train.txt").write_text("000005\n000007\n000009\n")
    (voc / "ImageSets/Main/val.txt").write_text("000007\n")
    return voc / "ImageSets/Main/train.txt"


OI_DESCRIPTIONS = "LabelName,DisplayName\n/m/cat,Cat\n/m/dog,Dog\n/m/car,Car\n/m/jag1,Jaguar\n/m/jag2,Jaguar\n"


def oi_layout(root: Path, rows: list[str] | None = None) -> Path:
    """``train-annotations-human-imagelabels.csv`` + ``oidv6-class-descriptions.csv`` + ``images/<ImageID>.jpg``."""
    oi = root / "oi"
    oi.mkdir()
    (oi / "oidv6-class-descriptions.csv").write_text(OI_DESCRIPTIONS)
    default = [
        "000a1,verification,/m/cat,1",
        "000a1,verification,/m/dog,0",
        "000a1,machine,/m/car,0.3",
        "000b2,crowdsource-verification,/m/dog,1",
        "000b2,verification,/m/jag2,1",
        "000c3,verification,/m/cat,0",
    ]
    lines = "\n".join(default if rows is None else rows)
    (oi / "train-annotations-human-imagelabels.csv").write_text(f"ImageID,Source,LabelName,Confidence\n{lines}\n")
    for image_id in ("000a1", "000b2", "000c3"):
        _image(oi / "images" / f"{image_id}.jpg")
    return oi / "train-annotations-human-imagelabels.csv"


TENCENT_DICTIONARY = (
    "n00002452\t-1\tthing\nn00020827\t-1\tmatter\nn02084071\t0\tdog, domestic dog\n"
    "n07752966\t0\tcurrant\nn07744246\t1\tcurrant\n"
)


def tencent_layout(root: Path, lines: list[str] | None = None) -> Path:
    """An image list as ``download_im_from_url.py`` writes it + ``dictionary_and_semantic_hierarchy.txt``."""
    tc = root / "tencent"
    tc.mkdir()
    (tc / "dictionary_and_semantic_hierarchy.txt").write_text(TENCENT_DICTIONARY)
    default = [
        "im_0.jpeg\thttps://farm5.example.com/1_o.jpg\t2:0.9\t0:1",
        "im_1.jpeg\t3:0.4\t4",
        "im_2.jpeg  2:0.8  1:1.0",
    ]
    (tc / "train_im.txt").write_text("\n".join(default if lines is None else lines) + "\n")
    for i in range(3):
        _image(tc / "images" / f"im_{i}.jpeg")
    return tc / "train_im.txt"


# ---------------------------------------------------------------------------------------------
# COCO
