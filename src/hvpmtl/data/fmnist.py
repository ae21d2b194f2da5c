"""``fmnist-mosaic``: multi-label 2x2 mosaics of Fashion-MNIST items.

Four 28x28 items, drawn at random from one split's IDX files, tile a 56x56 image that is then
resized to ``img_size``; the tags are the classes present (1 to 4 of the 10). Each item keeps its
quadrant as box and its pixels above a threshold as mask. Mosaic ``i`` is a pure function of
``(seed, stream, i)``. The IDX files are read once per process (the Debian package
``dataset-fashion-mnist`` installs them under ``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from hvpmtl.data.synthetic import noisy_labels

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": "train", "val": "t10k", "test": "t10k"}
_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def _open(path: Path):
    if path.exists():
        return open(path, "rb")
    gz = path.with_name(path.name + ".gz")
    if gz.exists():
        return gzip.open(gz, "rb")
    raise FileNotFoundError(f"Fashion-MNIST file not found: {gz} (nor {path})")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (``.gz`` or not) as a uint8 array of its stated shape."""
    with _open(path) as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {arr.size} bytes of data for shape {shape}")
    return arr.reshape(shape)


def load_fashion_mnist(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images N x 28 x 28 uint8, labels N int64)`` of ``split`` (train | val | test)."""
    if split not in _FILES:
        raise ValueError(f"split '{split}' unknown (choose from {', '.join(_FILES)})")
    root = Path(root or DEFAULT_ROOT)
    key = (str(root), _FILES[split])
    if key not in _CACHE:
        name = _FILES[split]
        images = read_idx(root / f"{name}-images-idx3-ubyte")
        labels = read_idx(root / f"{name}-labels-idx1-ubyte").astype(np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{root}: {len(images)} {name} images but {len(labels)} labels")
        _CACHE[key] = (images, labels)
    return _CACHE[key]


class FashionMNISTMosaic(Dataset):
    """2x2 Fashion-MNIST mosaics (see the module docstring).

    Args:
        root: folder of the IDX files (``.gz`` or not); empty = the Debian package's folder.
        split: ``train`` reads the train files; ``val`` and ``test`` read t10k.
        size: number of mosaics.
        img_size: output side in pixels (bilinear resize of the 56x56 mosaic).
        seed, stream: which mosaics (streams separate val from test).
        label_noise: rate of :func:`hvpmtl.data.synthetic.noisy_labels`.
        mask_threshold: an item's mask is its pixels brighter than this (0..255).

    Items are dicts: ``image`` uint8 ``3 x H x W`` (grey), ``labels`` and ``clean_labels``
    float ``10``, ``boxes`` float ``4 x 4`` (the quadrants, xyxy pixels, in reading order),
    ``masks`` bool ``4 x H x W``, ``box_labels`` long ``4``, ``index``.
    """

    classes = list(CLASSES)

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        split: str = "train",
        size: int = 10000,
        img_size: int = 64,
        seed: int = 0,
        stream: int = 0,
        label_noise: float = 0.0,
        mask_threshold: int = 0,
    ):
        self.images, self.item_labels = load_fashion_mnist(root, split)
        self.size, self.img_size, self.seed, self.stream = size, img_size, seed, stream
        self.label_noise, self.mask_threshold = label_noise, mask_threshold
        self.num_classes = len(CLASSES)

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream, index, purpose])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} mosaics")
        items = self._rng(index, 0).integers(len(self.images), size=4)
        tiles = self.images[items]  # 4 x 28 x 28
        mosaic = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
        S, half = self.img_size, self.img_size / 2
        grey = torch.from_numpy(mosaic).float()[None, None]
        if S != 56:
            grey = F.interpolate(grey, size=(S, S), mode="bilinear", antialias=True, align_corners=False)
        image = grey.round().clamp(0, 255).to(torch.uint8)[0].expand(3, S, S).contiguous()
        masks = np.zeros((4, 56, 56), dtype=bool)
        for j in range(4):
            r, c = divmod(j, 2)
            masks[j, 28 * r : 28 * (r + 1), 28 * c : 28 * (c + 1)] = tiles[j] > self.mask_threshold
        masks_t = torch.from_numpy(masks)
        if S != 56:
            masks_t = F.interpolate(masks_t[None].float(), size=(S, S), mode="nearest")[0] > 0.5
        boxes = torch.tensor(
            [[c * half, r * half, (c + 1) * half, (r + 1) * half] for r in (0, 1) for c in (0, 1)],
            dtype=torch.float32,
        )
        box_labels = torch.from_numpy(self.item_labels[items])
        clean = np.zeros(self.num_classes, dtype=np.float32)
        clean[self.item_labels[items]] = 1
        labels = noisy_labels(clean, self.label_noise, self._rng(index, 1))
        return {
            "image": image,
            "labels": torch.from_numpy(labels),
            "clean_labels": torch.from_numpy(clean),
            "boxes": boxes,
            "masks": masks_t,
            "box_labels": box_labels,
            "index": index,
        }

    def annotations(self, index: int) -> dict:
        """``boxes``, ``masks`` and ``box_labels`` of mosaic ``index``."""
        return {k: v for k, v in self[index].items() if k in ("boxes", "masks", "box_labels")}


class FashionMNISTItems(Dataset):
    """Single Fashion-MNIST items, one tag each (the standard 10-way classification task).

    The first ``size`` items of the split's IDX files (all of them when ``size`` is larger),
    drawn ``scale * img_size`` pixels wide in the middle of a black ``img_size`` canvas (``scale``
    1: the item fills the image; 0.5: the size items have in ``fmnist-mosaic``, so a backbone
    pre-trained on mosaics is probed at the scale it learnt) and repeated to 3 channels.
    ``train`` reads the 60,000 training items; ``val`` and ``test`` both read the 10,000 test
    items. Items are dicts: ``image``
    uint8 ``3 x H x W``, ``labels`` float one-hot ``10``, ``target`` (the class index), ``index``.
    """

    classes = list(CLASSES)

    def __init__(
        self, root: str | Path = DEFAULT_ROOT, split: str = "train", size: int = 0, img_size: int = 28,
        scale: float = 1.0,
    ):  # fmt: skip
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"data.item_scale={scale}: must be in (0, 1]")
        self.images, self.targets = load_fashion_mnist(root, split)
        self.size = len(self.images) if size <= 0 else min(size, len(self.images))
        self.img_size, self.scale = img_size, scale
        self.num_classes = len(CLASSES)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")
        grey = torch.from_numpy(self.images[index].copy()).float()[None, None]
        S = self.img_size
        side = max(1, round(self.scale * S))
        if grey.shape[-1] != side:
            grey = F.interpolate(grey, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        if side != S:
            before = (S - side) // 2
            grey = F.pad(grey, (before, S - side - before, before, S - side - before))
        image = grey.round().clamp(0, 255).to(torch.uint8)[0].expand(3, S, S).contiguous()
        target = int(self.targets[index])
        labels = torch.zeros(self.num_classes)
        labels[target] = 1
        return {"image": image, "labels": labels, "target": target, "index": index}
