"""COCO instances format: export the built-in data to it, and read it back through torchvision.

Layout (as COCO 2017): ``root/<split>/<file>`` images and ``root/annotations/instances_<split>.json``
with ``images``, ``categories`` and ``annotations`` (``bbox`` as ``[x, y, w, h]`` pixels,
``segmentation`` as compressed RLE, ``area`` = mask pixel count, ``iscrowd``).

* :func:`export_coco` writes a built-in data set (items with ``image``, ``boxes``, ``masks``,
  ``box_labels``) in that layout, so that detection on built-in data goes through the very reader
  real COCO does.
* :class:`CocoInstances` reads the layout with torchvision's ``CocoDetection`` wrapped for the
  v2 transforms, which decode the RLE into per-instance masks and apply joint image/box/mask
  transforms.

>>> root = export_coco(SyntheticScenes(100, 64), "coco-data", "train")
>>> image, target = CocoInstances(root, "train")[0]  # 3 x H x W float, {"boxes", "labels", "masks", "image_id"}
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from hvpmtl.files import atomic_write

__all__ = ["CocoInstances", "annotation_file", "export_coco", "source_info"]


def annotation_file(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def source_info(dataset: Dataset) -> dict:
    """What a data set is (class, seed, stream, size, image side): the export's ``info`` block,
    compared to decide whether an earlier export can be reused."""
    fields = {k: getattr(dataset, k) for k in ("seed", "stream", "img_size") if hasattr(dataset, k)}
    return {"description": "hvpmtl export", "dataset": type(dataset).__name__, "size": len(dataset), **fields}


def _reusable(path: Path, folder: Path, info: dict) -> bool:
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if data.get("info", {}).get("source") != info or len(data.get("images", [])) != info["size"]:
        return False
    return all((folder / im["file_name"]).is_file() for im in data["images"])


def export_coco(dataset: Dataset, root: str | Path, split: str, progress: bool = True) -> Path:
    """Write every item of ``dataset`` as COCO instances under ``root`` (module docstring).

    Images become ``root/<split>/<index:08d>.png`` (image id = index + 1); category ``k + 1`` is
    ``dataset.classes[k]``; each object is one annotation with its item box (``xyxy`` ->
    ``xywh``), its mask as compressed RLE (``pycocotools.mask.encode``) and its pixel count as
    area. Objects whose mask is empty are skipped and counted (``info.skipped_empty``). The JSON
    is written last and atomically; an existing one describing the same source (``info.source``)
    and the same number of images, with its image files present, is reused as it is.

    Returns ``root``.
    """
    from PIL import Image
    from pycocotools import mask as mask_utils

    root = Path(root)
    path = annotation_file(root, split)
    folder = root / split
    info = source_info(dataset)
    if _reusable(path, folder, info):
        return root
    classes = list(getattr(dataset, "classes", None) or [])
    if not classes:
        raise ValueError(f"export_coco: {type(dataset).__name__} has no .classes (category names)")
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations, skipped = [], [], 0
    indices = range(len(dataset))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"export {split} to COCO", leave=False)
    for index in indices:
        item = dataset[index]
        image = item["image"]
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"export_coco: item {index}: expected a uint8 3 x H x W image, got {image.dtype} {tuple(image.shape)}"
            )
        h, w = image.shape[1:]
        name = f"{index:08d}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name)
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "width": int(w), "height": int(h)})
        for box, m, label in zip(item["boxes"].tolist(), item["masks"], item["box_labels"].tolist()):
            area = int(m.sum())
            if area == 0:
                skipped += 1
                continue
            rle = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON
            x0, y0, x1, y1 = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area, "iscrowd": 0, "segmentation": rle,
            })  # fmt: skip
    if skipped:
        print(f"export_coco: {split}: skipped {skipped} objects with an empty mask")
    data = {
        "info": {"source": info, "split": split, "skipped_empty": skipped},
        "images": images,
        "categories": [{"id": k + 1, "name": str(name)} for k, name in enumerate(classes)],
        "annotations": annotations,
    }
    atomic_write(path, lambda f: f.write(json.dumps(data).encode()))
    return root


class CocoInstances(Dataset):
    """COCO instances of one split, read by torchvision (``CocoDetection`` wrapped by
    ``wrap_dataset_for_transforms_v2``).

    ``dataset[i]`` is ``(image, target)``: ``image`` a float ``3 x H x W`` ``tv_tensors.Image``
    in ``[0, 1]``; ``target`` with ``boxes`` (``BoundingBoxes`` ``N x 4`` xyxy pixels),
    ``labels`` (long ``N``, contiguous ``1..K`` in category-id order; 0 is Mask R-CNN's
    background), ``masks`` (``Mask`` uint8 ``N x H x W``) and ``image_id`` (the COCO id).
    ``transforms`` (torchvision v2) act on image, boxes and masks jointly. Crowd annotations
    are dropped (as Detectron2 and mmdet ignore them in training); images without annotations
    give empty targets (``0 x 4``, ``0``, ``0 x H x W``), which Mask R-CNN accepts.

    Attributes:
        classes: category names in category-id order (label ``k`` is ``classes[k - 1]``).
        coco: the ``pycocotools.coco.COCO`` object (ground truth for ``COCOeval``).
        category_ids: COCO category id of label ``k`` at position ``k - 1``.
    """

    def __init__(self, root: str | Path, split: str, transforms=None):
        from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

        root = Path(root)
        ann, folder = annotation_file(root, split), root / split
        if not ann.is_file():
            raise FileNotFoundError(
                f"COCO annotations not found: {ann} (expected root/annotations/instances_<split>.json)"
            )
        if not folder.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {folder} (expected root/<split>/)")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its loading times
            base = CocoDetection(str(folder), str(ann))
        self.coco = base.coco
        self.category_ids = sorted(self.coco.getCatIds())
        if not self.category_ids:
            raise ValueError(f"{ann}: no categories")
        self.classes = [self.coco.cats[c]["name"] for c in self.category_ids]
        lookup = torch.zeros(max(self.category_ids) + 1, dtype=torch.long)
        lookup[self.category_ids] = torch.arange(1, len(self.category_ids) + 1)
        self._label_of = lookup
        self.root, self.split, self.ids = root, split, list(base.ids)
        self.data = wrap_dataset_for_transforms_v2(
            base, target_keys=("boxes", "labels", "masks", "image_id", "iscrowd")
        )
        self.transforms = v2.Compose(
            [v2.ToImage(), *([transforms] if transforms else []), v2.ToDtype(torch.float32, scale=True)]
        )

    def __len__(self) -> int:
        return len(self.data)

    def _target(self, image, target: dict) -> dict:
        """Empty targets filled in, crowd annotations dropped, labels made contiguous."""
        h, w = image.height, image.width  # PIL
        if "boxes" not in target:  # no annotations: the wrapper returns only the image id
            return {
                "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                "labels": torch.zeros(0, dtype=torch.long),
                "masks": tv_tensors.Mask(torch.zeros(0, h, w, dtype=torch.uint8)),
                "image_id": target["image_id"],
            }
        keep = torch.tensor(target.pop("iscrowd")) == 0
        return {
            "boxes": tv_tensors.wrap(target["boxes"][keep], like=target["boxes"]),
            "labels": self._label_of[target["labels"][keep]],
            "masks": tv_tensors.Mask(target["masks"][keep]),
            "image_id": target["image_id"],
        }

    def __getitem__(self, index: int):
        image, target = self.data[index]
        target = self._target(image, target)
        return self.transforms(image, target)
