"""A built-in multi-label data set of generated scenes: no download, any size, deterministic.

Each image shows 1-4 objects of distinct classes on a varied background (gradient, smooth noise
or stripes). A class is a shape with its own colour family and texture, drawn at a random
position, scale and rotation; later objects occlude earlier ones. Image ``i`` is a pure function
of ``(seed, stream, i)``: it is drawn on the fly from its own numpy ``Generator``, so a data set
of a million images costs nothing until read. Per-object boxes and visible-pixel masks are kept
for detection and segmentation work.

``tags="attributes"`` names each object by its shape, colour and texture instead (``"red stripes
circle"``: 10 x 6 x 4 = 240 tags), and draws the tags of an image from a Zipf law (a fixed
ranking, probability ~ 1 / rank), so that a few tags are common and most are rare, as in web-scale
tag sets; the default ``tags="shapes"`` keeps the 10 shape classes.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from torch.utils.data import Dataset

CLASSES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "crescent", "heart", "hexagon")
# class k: base hue (degrees) and texture; hues are spaced so that colour alone is a weak cue
_HUES = (0, 200, 110, 40, 280, 60, 170, 320, 350, 230)
_TEXTURES = ("solid", "stripes", "checker", "dots", "radial", "solid", "checker", "stripes", "radial", "dots")
_MIN_VISIBLE = 0.5  # an object with less of its area visible is removed (with its tag)
TAG_SETS = ("shapes", "attributes")
# tags="attributes": hue (degrees) of each colour name, 60 degrees apart so that names stay apart
ATTRIBUTE_COLOURS = {"red": 0, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "magenta": 300}
ATTRIBUTE_TEXTURES = ("solid", "stripes", "checker", "dots")
_ZIPF_EXPONENT = 1.0  # tag of rank r drawn with probability ~ r ** -1: 240 tags span a 240x range
_RANKING_SEED = 20_240  # fixes which attribute tags are common, the same for every data.seed


def attribute_tags() -> list[tuple[str, int, str, int]]:
    """``(name, shape index, texture, hue)`` of each ``tags="attributes"`` tag, in vocabulary order."""
    return [
        (f"{colour} {texture} {shape}", k, texture, hue)
        for k, shape in enumerate(CLASSES)
        for colour, hue in ATTRIBUTE_COLOURS.items()
        for texture in ATTRIBUTE_TEXTURES
    ]


def zipf_probabilities(n: int, exponent: float = _ZIPF_EXPONENT, seed: int = _RANKING_SEED) -> np.ndarray:
    """Probability of each of ``n`` tags: ``rank ** -exponent`` (normalised), ranks a seeded permutation."""
    ranks = np.random.default_rng(seed).permutation(n) + 1
    p = ranks.astype(np.float64) ** -exponent
    return p / p.sum()


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, apothem: float, phase: float) -> np.ndarray:
    """Regular convex polygon as an intersection of half-planes."""
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        a = phase + 2 * np.pi * k / sides
        inside &= u * np.cos(a) + v * np.sin(a) <= apothem
    return inside


def _shape(k: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of class ``k``'s shape in object coordinates (the shape fits the unit disc)."""
    r2 = u * u + v * v
    name = CLASSES[k]
    if name == "circle":
        return r2 <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72
    if name == "triangle":
        return _polygon(u, v, 3, 0.5, np.pi / 2)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.28) & (av <= 0.95)) | ((av <= 0.28) & (au <= 0.95))
    if name == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if name == "star":
        t = (np.arctan2(v, u) * 5 / (2 * np.pi)) % 1.0
        return np.sqrt(r2) <= 0.42 + 0.58 * np.abs(2 * t - 1)
    if name == "diamond":
        return np.abs(u) / 0.7 + np.abs(v) <= 1.0
    if name == "crescent":
        return (r2 <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.72**2)
    if name == "heart":
        x, y = u * 1.25, -v * 1.25 + 0.2
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if name == "hexagon":
        return _polygon(u, v, 6, 0.87, 0.0)
    raise IndexError(k)


def _texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blend weight in [0, 1] between an object's two colours."""
    f = rng.uniform(2.5, 4.5)
    if kind == "solid":
        return np.zeros_like(u)
    if kind == "stripes":
        return (np.sin(f * np.pi * u + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.floor(f * u) + np.floor(f * v)) % 2).astype(np.float32)
    if kind == "dots":
        return ((np.sin(f * np.pi * u) * np.sin(f * np.pi * v)) > 0.5).astype(np.float32)
    return np.clip(np.sqrt(u * u + v * v), 0, 1).astype(np.float32)  # radial


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def scene_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``H x W x 3`` float background: linear gradient, smooth noise or stripes."""
    c0, c1 = (_hsv(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.2, 0.9)) for _ in range(2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(3)
    if kind == 0:
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == 1:
        cells = int(rng.integers(3, 7))
        coarse = rng.random((cells, cells)).astype(np.float32)
        p = np.clip((np.arange(size, dtype=np.float32) + 0.5) * cells / size - 0.5, 0, cells - 1)
        i0 = np.minimum(p.astype(np.int64), cells - 2)
        w = p - i0  # bilinear upsampling of the coarse grid
        rows = coarse[i0] * (1 - w[:, None]) + coarse[i0 + 1] * w[:, None]
        t = rows[:, i0] * (1 - w) + rows[:, i0 + 1] * w
    else:
        a, f = rng.uniform(0, np.pi), rng.uniform(3, 10)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * f * (np.cos(a) * xx + np.sin(a) * yy))
    img = c0 + t[..., None] * (c1 - c0)
    return img + rng.normal(0, 0.02, img.shape).astype(np.float32)


def noisy_labels(clean: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Drop each true tag with prob ``rate``; with prob ``rate`` add one absent tag at random."""
    labels = clean.copy()
    if rate <= 0:
        return labels
    pos = np.flatnonzero(clean)
    labels[pos[rng.random(pos.size) < rate]] = 0
    neg = np.flatnonzero(clean == 0)
    if neg.size and rng.random() < rate:
        labels[rng.choice(neg)] = 1
    return labels


def tagged_by_fraction(index: int, fraction: float, seed: int = 0) -> bool:
    """Whether image ``index`` keeps its tags under ``data.tagged_fraction=fraction``: a seeded
    hash of the index (splitmix64), so every process, worker and resumed run picks the same images."""
    if fraction >= 1.0:
        return True
    mask = (1 << 64) - 1
    z = ((seed << 32) + index + 1) * 0x9E3779B97F4A7C15 & mask
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & mask
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53) < fraction


class SyntheticScenes(Dataset):
    """Generated multi-label scenes (see the module docstring).

    Args:
        size: number of images.
        img_size: side of the square images in pixels.
        seed: which data set; ``stream`` separates splits (train 0, val 1, test 2), so two
            streams of one seed share no image.
        label_noise: rate ``r`` of :func:`noisy_labels`; 0 gives the clean tags.
        min_objects, max_objects: objects per image (distinct classes).
        scale: object diameter range as fractions of ``img_size``.
        tags: ``shapes`` (10 tags, a class per shape) or ``attributes`` (240 shape x colour x
            texture tags, Zipf-distributed; see the module docstring).

    Items are dicts: ``image`` uint8 ``3 x H x W``, ``labels`` float ``C`` (noisy if asked),
    ``clean_labels`` float ``C``, ``boxes`` float ``N x 4`` (xyxy pixels, the tight box of the
    visible pixels, ``x2``/``y2`` exclusive), ``masks`` bool ``N x H x W`` (visible pixels),
    ``box_labels`` long ``N`` and ``index``.
    """

    classes = list(CLASSES)

    def __init__(
        self,
        size: int,
        img_size: int = 64,
        seed: int = 0,
        stream: int = 0,
        label_noise: float = 0.0,
        min_objects: int = 1,
        max_objects: int = 4,
        scale: tuple[float, float] = (0.25, 0.5),
        tags: str = "shapes",
    ):
        if tags not in TAG_SETS:
            raise ValueError(f"tags='{tags}' unknown (choose from {', '.join(TAG_SETS)})")
        self.tags = tags
        self._attributes = attribute_tags() if tags == "attributes" else None
        self.classes = [a[0] for a in self._attributes] if self._attributes else list(CLASSES)
        if not 1 <= min_objects <= max_objects <= len(self.classes):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(self.classes)}")
        if not 0.0 <= label_noise < 1.0:
            raise ValueError(f"label_noise={label_noise} must be in [0, 1)")
        self.size, self.img_size, self.seed, self.stream = size, img_size, seed, stream
        self.label_noise = label_noise
        self.min_objects, self.max_objects, self.scale = min_objects, max_objects, scale
        self.num_classes = len(self.classes)
        # tags="shapes" draws classes uniformly (None keeps the generator's calls as they always were)
        self.tag_probabilities = zipf_probabilities(self.num_classes) if self._attributes else None

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream, index, purpose])

    def _look(self, tag: int) -> tuple[int, float, str]:
        """Shape index, hue (degrees) and texture of an object tagged ``tag``."""
        if self._attributes:
            _, k, texture, hue = self._attributes[tag]
            return k, hue, texture
        return tag, _HUES[tag], _TEXTURES[tag]

    def _place(self, rng: np.random.Generator, n: int) -> list[tuple[float, float, float]]:
        """Centres and radii with limited overlap (rejection sampling, then accept)."""
        S, placed = self.img_size, []
        for _ in range(n):
            for _attempt in range(20):
                r = rng.uniform(*self.scale) * S / 2
                cx, cy = rng.uniform(r * 0.8, S - r * 0.8, size=2)
                if all((cx - x) ** 2 + (cy - y) ** 2 >= (0.8 * (r + q)) ** 2 for x, y, q in placed):
                    break
            placed.append((cx, cy, r))
        return placed

    def _draw(self, index: int) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
        rng, S = self._rng(index, 0), self.img_size
        img = scene_background(rng, S)
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        if self.tag_probabilities is None:
            ks = rng.choice(len(CLASSES), size=n, replace=False).tolist()
        else:
            ks = rng.choice(self.num_classes, size=n, replace=False, p=self.tag_probabilities).tolist()
        owner = np.full((S, S), -1, dtype=np.int64)
        areas = []
        for j, (k, (cx, cy, r)) in enumerate(zip(ks, self._place(rng, n))):
            x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, S)
            y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, S)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            a = rng.uniform(0, 2 * np.pi)
            du, dv = (xx + 0.5 - cx) / r, (yy + 0.5 - cy) / r
            u, v = np.cos(a) * du + np.sin(a) * dv, -np.sin(a) * du + np.cos(a) * dv
            form, hue, texture = self._look(k)
            shape = _shape(form, u, v)
            c0 = _hsv(hue / 360 + rng.uniform(-0.03, 0.03), rng.uniform(0.65, 1), rng.uniform(0.6, 1))
            c1 = c0 * rng.uniform(0.45, 0.7)
            w = _texture(texture, u, v, rng)[..., None]
            patch = img[y0:y1, x0:x1]
            patch[shape] = (c0 + w * (c1 - c0))[shape]
            owner[y0:y1, x0:x1][shape] = j
            areas.append(int(shape.sum()))
        kept, masks = [], []
        for j, k in enumerate(ks):
            m = owner == j
            if m.sum() >= max(_MIN_VISIBLE * areas[j], 1):
                kept.append(k)
                masks.append(m)
        if not kept:  # cannot happen with the last object fully visible; kept as a guard
            raise RuntimeError(f"synthetic image {index}: no visible object")
        return img, kept, masks

    def annotations(self, index: int) -> dict:
        """``boxes`` (N x 4 xyxy), ``masks`` (N x H x W bool) and ``box_labels`` (N) of image ``index``."""
        return {k: v for k, v in self[index].items() if k in ("boxes", "masks", "box_labels")}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} images")
        img, ks, masks = self._draw(index)
        image = torch.from_numpy(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)).permute(2, 0, 1)
        clean = np.zeros(self.num_classes, dtype=np.float32)
        clean[ks] = 1
        labels = noisy_labels(clean, self.label_noise, self._rng(index, 1))
        m = np.stack(masks)
        boxes = []
        for mk in m:
            ys, xs = np.nonzero(mk)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        return {
            "image": image.contiguous(),
            "labels": torch.from_numpy(labels),
            "clean_labels": torch.from_numpy(clean),
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "masks": torch.from_numpy(m),
            "box_labels": torch.tensor(ks, dtype=torch.long),
            "index": index,
        }
