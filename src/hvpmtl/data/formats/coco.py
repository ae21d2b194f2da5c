"""COCO instances JSON as multi-label images: image tags from the categories of its annotations.

Layout (as COCO 2017): ``root/annotations/instances_<split>.json`` and the images under
``root/<split>/<file_name>``. ``root`` defaults to the folder above ``annotations/``; images are
looked up in ``root/<split>/`` when that folder exists, else in ``root/`` itself. A ``file_name``
is a relative path inside that folder (no ``..`` part, not absolute).

* Vocabulary: the categories in id order (as :class:`hvpmtl.data.coco.CocoInstances`), or the
  given classes (category names or ids), in their order; annotations of other categories are
  ignored with one warning.
* Tags: every category annotated on the image, crowd regions included (a crowd of people shows
  people). Images without annotations are kept, untagged.
* Boxes: the non-crowd annotations, ``bbox`` ``[x, y, w, h]`` -> ``xyxy`` pixels (crowd
  regions dropped, as detection training does). ``masks=True`` adds ``masks`` (uint8
  ``N x H x W``, one per box) decoded by pycocotools from polygons or RLE.

Errors name the file and the JSON element, e.g. ``instances_train.json: annotations[17] (id 18):
category_id 99 not in categories``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from hvpmtl.data.formats.base import (
    ClassEntry,
    FormatImages,
    ImageRecord,
    image_in_folder,
    select_classes,
    split_folder,
    warn_dropped,
)
from hvpmtl.data.loading import DEFAULT_LOADING, ImageLoading
from hvpmtl.data.manifest import read_text
from hvpmtl.reprs import short_repr

__all__ = ["CocoImages", "load_coco_json"]


def load_coco_json(path: Path) -> dict:
    """The JSON of an instances file, with ``images``, ``annotations`` and ``categories`` lists."""
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotations not found: {path}")
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: no '{key}' list (a COCO instances file has images, annotations, categories)")
    return data


def _int_field(path: Path, where: str, obj: object, key: str) -> int:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{path}: {where}: '{key}' must be an integer, got {short_repr(value)}")
    return value


def _categories(path: Path, data: dict) -> list[ClassEntry]:
    seen: dict[int, int] = {}
    entries = []
    for k, cat in enumerate(data["categories"]):
        cid = _int_field(path, f"categories[{k}]", cat, "id")
        if cid in seen:
            raise ValueError(f"{path}: categories[{k}]: id {cid} repeats categories[{seen[cid]}]")
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{path}: categories[{k}] (id {cid}): no name")
        seen[cid] = k
        entries.append(ClassEntry(str(cid), str(cid), name.strip()))
    return sorted(entries, key=lambda e: int(e.key))


def _xyxy(path: Path, where: str, bbox: object) -> list[float]:
    ok = isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
    if not ok or not all(math.isfinite(v) for v in bbox) or bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(f"{path}: {where}: bbox must be [x, y, width, height] of finite numbers with width, "
                         f"height >= 0, got {short_repr(bbox)}")  # fmt: skip
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


class CocoImages(FormatImages):
    """A COCO instances file as multi-label images with boxes (module docstring).

    Args:
        annotations: the ``instances_<split>.json`` file.
        root: dataset folder (images in ``root/<split>/`` or ``root/``); empty = the folder above
            the annotation file's folder.
        classes: vocabulary (category names or ids); None = all categories in id order.
        masks: add per-box ``masks`` to each item (decoded with pycocotools).
        check_files, missing_images, loading: as :class:`FormatImages`.
    """

    def __init__(
        self,
        annotations: str | Path,
        root: str | Path = "",
        classes: Sequence[str] | None = None,
        *,
        masks: bool = False,
        check_files: bool = True,
        missing_images: str = "error",
        loading: ImageLoading = DEFAULT_LOADING,
    ):
        path = Path(annotations)
        data = load_coco_json(path)
        categories = _categories(path, data)
        vocab = select_classes(categories, classes, str(path))
        name_of = {int(e.key): e.name for e in categories}
        match = re.fullmatch(r"instances_(.+)\.json", path.name)
        base = Path(root) if str(root) else path.parent.parent
        folder = split_folder(base, match.group(1) if match else "")
        records: dict[int, ImageRecord] = {}
        for k, im in enumerate(data["images"]):
            iid = _int_field(path, f"images[{k}]", im, "id")
            if iid in records:
                raise ValueError(f"{path}: images[{k}]: id {iid} repeats an earlier image")
            name = im.get("file_name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"{path}: images[{k}] (id {iid}): no file_name")
            if masks and not all(isinstance(im.get(d), int) and im[d] > 0 for d in ("height", "width")):
                raise ValueError(f"{path}: images[{k}] (id {iid}): masks need its 'height' and 'width'")
            file = image_in_folder(folder, name, f"{path}: images[{k}] (id {iid}): file_name")
            records[iid] = ImageRecord(file, f"{path}: images[{k}] (id {iid})", ref=(iid, []))
        dropped: dict[str, int] = {}
        for k, ann in enumerate(data["annotations"]):
            where = f"annotations[{k}] (id {ann.get('id') if isinstance(ann, dict) else '?'})"
            iid = _int_field(path, where, ann, "image_id")
            cid = _int_field(path, where, ann, "category_id")
            if iid not in records:
                raise ValueError(f"{path}: {where}: image_id {iid} not in images")
            if cid not in name_of:
                raise ValueError(f"{path}: {where}: category_id {cid} not in categories")
            label = vocab.index.get(str(cid))
            if label is None:
                dropped[name_of[cid]] = dropped.get(name_of[cid], 0) + 1
                continue
            record = records[iid]
            record.positives.add(label)
            if not ann.get("iscrowd", 0):
                if masks and not ann.get("segmentation"):
                    raise ValueError(f"{path}: {where}: no segmentation (needed for masks)")
                record.boxes.append(_xyxy(path, where, ann.get("bbox")))
                record.box_labels.append(label)
                record.ref[1].append(k)
        warn_dropped(str(path), dropped)
        super().__init__(
            list(records.values()), vocab, path, check_files=check_files, missing_images=missing_images,
            loading=loading, has_boxes=True,
        )  # fmt: skip
        self.image_ids = [iid for iid, _ in self.refs]
        self.root = folder
        self.masks = masks
        self._coco = self._mask_source(data) if masks else None

    @staticmethod
    def _mask_source(data: dict):
        """pycocotools' index over the loaded JSON (its ``annToMask`` decodes polygons and RLE)."""
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its indexing
            coco.createIndex()
        return coco

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        if self.masks:
            anns = [self._coco.dataset["annotations"][k] for k in self.refs[sample["index"]][1]]
            h, w = sample["image"].shape[1:]
            masks = [torch.from_numpy(self._coco.annToMask(a)) for a in anns]
            for a, m in zip(anns, masks):
                if m.shape != (h, w):
                    raise ValueError(
                        f"{self.annotations}: annotation id {a.get('id')}: mask {tuple(m.shape)} does not match "
                        f"image {self.paths[sample['index']]} ({h} x {w}); check images[].height/width"
                    )
            sample["masks"] = torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8)
        return sample
