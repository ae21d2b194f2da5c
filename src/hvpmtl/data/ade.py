"""Semantic segmentation data in ADE20K's layout: export of the built-in scenes, and a reader.

The layout (``ADEChallengeData2016``, as mmseg reads it)::

    root/images/<split>/<stem>.jpg         RGB images (our export writes .png: lossless)
    root/annotations/<split>/<stem>.png    uint8 class-index maps, 0 = background / "other"
    root/classes.txt                       optional: one name per line, index 0 first

An annotation PNG holds class indices, not colours: it is written and read as a single-channel
(``L``) or palette (``P``) image and never colour-converted. The built-in data's instance
masks become class maps with 0 = background and class ``k`` = ``k + 1``; objects are drawn in
order, so a later mask overwrites an earlier one where they overlap.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from hvpmtl.data.manifest import read_class_names, read_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
BACKGROUND = "background"
FORMAT = 1  # bump when the export changes, so that old caches are rewritten


def class_map(masks: torch.Tensor, labels: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """``N x H x W`` bool masks and ``N`` class indices -> ``H x W`` uint8 map (0 = background,
    class ``k`` -> ``k + 1``; a later mask overwrites an earlier one)."""
    out = np.zeros(shape, dtype=np.uint8)
    for mask, k in zip(masks.numpy().astype(bool), labels.tolist()):
        if not 0 <= k < 255:
            raise ValueError(f"class index {k} does not fit a uint8 class map (0 = background, 255 = ignore)")
        out[mask] = k + 1
    return out


def _source(dataset: Dataset) -> dict:
    """What identifies a generated data set: its type and the arguments that fix its images."""
    keys = ("seed", "stream", "img_size", "label_noise", "mask_threshold", "min_objects", "max_objects", "scale")
    info = {"dataset": type(dataset).__name__, "size": len(dataset), "format": FORMAT}
    info.update({k: getattr(dataset, k) for k in keys if hasattr(dataset, k)})
    info["classes"] = list(getattr(dataset, "classes", []) or [])
    return json.loads(json.dumps(info))  # tuples -> lists, as they read back


def export_ade(dataset: Dataset, root: str | Path, split: str, progress: bool = True) -> Path:
    """Write ``dataset`` (items with ``image`` uint8 ``3 x H x W``, ``masks`` bool ``N x H x W``,
    ``box_labels`` long ``N``) as ``root/images/<split>/<i:08d>.png`` and
    ``root/annotations/<split>/<i:08d>.png`` plus ``root/classes.txt``; returns ``root``.

    Images are PNG, not JPEG: the tiny scenes are textured at the pixel scale and JPEG's
    ringing at object edges would blur the very boundaries the segmenter learns; the reader
    accepts either. Like a cache, an export whose ``root/<split>.export.json`` records the same
    source (data set type, size, seed, stream, img_size, ...) is reused; that file is written
    last, so an interrupted export is redone.
    """
    root = Path(root)
    info_path = root / f"{split}.export.json"
    source = _source(dataset)
    if info_path.is_file():
        try:
            if json.loads(info_path.read_text()) == source:
                return root
        except json.JSONDecodeError:
            pass  # a broken record: export again
    classes = source["classes"]
    if not classes:
        raise ValueError(f"{type(dataset).__name__}: no .classes; cannot write {root / 'classes.txt'}")
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    for d in (img_dir, ann_dir):
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.png"):  # another source's files would mix in
            old.unlink()
    (root / "classes.txt").write_text("\n".join([BACKGROUND, *classes]) + "\n")
    from tqdm.auto import tqdm

    for i in tqdm(range(len(dataset)), desc=f"export {split}", disable=not progress, leave=False, unit="img"):
        item = dataset[i]
        if "masks" not in item or "box_labels" not in item:
            raise ValueError(
                f"{type(dataset).__name__}: items have no 'masks'/'box_labels'; cannot export segmentation maps"
            )
        image = item["image"]
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(img_dir / f"{i:08d}.png")
        labels = class_map(item["masks"], item["box_labels"], tuple(image.shape[1:]))
        Image.fromarray(labels).save(ann_dir / f"{i:08d}.png")
    info_path.write_text(json.dumps(source, indent=1))
    return root


def read_label_map(path: str | Path) -> torch.Tensor:
    """A class-index PNG as a long ``H x W`` tensor (palette indices or grey values, unconverted)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(
                f"{path}: mode {im.mode} is not a class-index map (expected a single-channel or palette PNG)"
            )
        return torch.from_numpy(np.array(im).astype(np.int64))


class ADESegmentation(Dataset):
    """Images and class maps of ``root/images/<split>`` and ``root/annotations/<split>``, paired
    by file stem (module docstring).

    Args:
        root: the layout's root folder (e.g. ``ADEChallengeData2016``).
        split: the sub-folder, e.g. ``training`` or ``validation``.
        reduce_zero_label: mmseg's ADE20K convention: label 0 ("other") becomes
            ``ignore_index`` and label ``k`` becomes ``k - 1`` (``ignore_index`` stays).
        ignore_index: the label of pixels that count in neither the loss nor the metrics.

    Items: ``{"image": uint8 3 x H x W, "mask": long H x W, "index": int}``. ``.classes`` comes
    from ``root/classes.txt`` when present (without its first name with ``reduce_zero_label``),
    else ``None``.
    """

    def __init__(self, root: str | Path, split: str, reduce_zero_label: bool = False, ignore_index: int = 255):
        self.root, self.split = Path(root), split
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index
        img_dir, ann_dir = self.root / "images" / split, self.root / "annotations" / split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"segmentation data: folder not found: {d} (expected ADE20K's layout)")
        images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"segmentation data: no images ({', '.join(IMAGE_SUFFIXES)}) in {img_dir}")
        labels = {p.stem: p for p in ann_dir.glob("*.png")}
        missing = [p for p in images if p.stem not in labels]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise FileNotFoundError(
                f"segmentation data: image {missing[0]} has no annotation {ann_dir / (missing[0].stem + '.png')}{more}"
            )
        self.files = [(p, labels[p.stem]) for p in images]
        classes_file = self.root / "classes.txt"
        names = read_class_names(classes_file) if classes_file.is_file() else None
        self.classes = names[1:] if names is not None and reduce_zero_label else names

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        img_path, ann_path = self.files[index]
        image, mask = read_image(img_path), read_label_map(ann_path)
        if tuple(image.shape[1:]) != tuple(mask.shape):
            raise ValueError(f"{ann_path}: size {tuple(mask.shape)} differs from its image's {tuple(image.shape[1:])}")
        if self.reduce_zero_label:
            keep = mask == self.ignore_index
            mask = torch.where(mask == 0, self.ignore_index, mask - 1)
            mask[keep] = self.ignore_index
        return {"image": image, "mask": mask, "index": index}
