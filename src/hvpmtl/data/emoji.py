"""``emoji``: multi-label scenes of 2-4 emoji, tagged with their CLDR keywords (a many-tag source).

The emoji and their keywords come from the Unicode CLDR English annotations (``annotations`` and
``annotationsDerived``; Debian package ``unicode-cldr-core``), the pictures from the Noto Color
Emoji font (``fonts-noto-color-emoji``), drawn with Pillow. A tag is a keyword (lower-cased; not
the text-to-speech name) that at least ``min_count`` train emoji carry: with CLDR 41, 130 tags at the
default 5, from ``flag`` (206 train emoji) down to 5. One emoji carries ~1.5 of them, so a scene of
2-4 emoji (the union of their tags, ~4 per image) is a genuinely multi-label task with tags that
co-occur across objects, as in web images; a single emoji per image would be close to
single-label. Skin-tone variants (near-copies of their base emoji, which would put the val emoji
in the train set) and sequences the font draws empty or as more than one glyph (without Pillow's
raqm layout, the ZWJ sequences) are left out.

Each emoji belongs to train or val by a hash of its code points (``VAL_PERCENT`` % val), so val
scenes show only emoji never seen in training; ``val`` and ``test`` draw val emoji from separate
streams. Scene ``i`` is a pure function of ``(seed, stream, i)``: background (as in
:mod:`hvpmtl.data.synthetic`), which emoji, their sizes and positions (limited overlap). An emoji
less than half visible under later ones loses its tags. Which emoji the font draws is found once
per process (5-10 s: each of ~2,200 candidates is drawn once); glyphs are cached per data set at
the largest size a scene draws (~1,300 of ~35 x 35 RGBA pixels at 64 px: 6 MB).
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from hvpmtl.data.synthetic import noisy_labels, scene_background

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
DEFAULT_ANNOTATIONS = (
    "/usr/share/unicode/cldr/common/annotations/en.xml",
    "/usr/share/unicode/cldr/common/annotationsDerived/en.xml",
)
FONT_PACKAGE, CLDR_PACKAGE = "fonts-noto-color-emoji", "unicode-cldr-core"
FONT_SIZE = 109  # Noto Color Emoji is a bitmap (CBDT) font: its one size, 136 x 128 pixels a glyph
VAL_PERCENT = 20  # share of the emoji that only the val/test splits show
SCALE = (0.3, 0.55)  # emoji side range as fractions of the image side
_SKIN_TONES = range(0x1F3FB, 0x1F400)
_MIN_VISIBLE = 0.5
_DRAWABLE: dict[tuple, tuple[dict[str, list[str]], list[str], int]] = {}


def emoji_split(text: str) -> str:
    """``train`` or ``val``: a fixed hash of the code points, ``VAL_PERCENT`` % val."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") % 100 < VAL_PERCENT else "train"


def read_annotations(path: str | Path) -> dict[str, list[str]]:
    """CLDR annotations file -> ``{emoji: keywords}`` (lower-cased, in file order, no repeats);
    the ``type="tts"`` names are not keywords and are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CLDR annotations not found: {path} (on Debian/Ubuntu: apt-get install {CLDR_PACKAGE})"
        )
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path}: not a CLDR annotations file ({err})") from err
    out: dict[str, list[str]] = {}
    for node in root.iter("annotation"):
        if node.get("type") == "tts" or not node.get("cp") or not node.text:
            continue
        words = [w.strip().lower() for w in node.text.split("|")]
        out[node.get("cp")] = list(dict.fromkeys(w for w in words if w))
    return out


def open_font(path: str | Path = DEFAULT_FONT) -> ImageFont.FreeTypeFont:
    """The emoji font at its bitmap size, or a one-line error naming the package to install."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"emoji font not found: {path} (on Debian/Ubuntu: apt-get install {FONT_PACKAGE})")
    return ImageFont.truetype(str(path), FONT_SIZE)


def render(font: ImageFont.FreeTypeFont, text: str) -> Image.Image | None:
    """``text`` as an RGBA image cropped to its visible pixels; None when the font draws it empty
    or as more than one glyph (a sequence it does not know, or laid out without raqm)."""
    width, height = round(font.size * 1.25), round(font.size * 1.18)  # one glyph: 136 x 128 at size 109
    if font.getlength(text) > width:
        return None
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    return canvas.crop(box) if box else None


@dataclass
class EmojiCatalog:
    """The tag vocabulary and, per split, the emoji that carry at least one of its tags."""

    classes: list[str]
    emoji: dict[str, list[str]]  # split (train | val) -> emoji
    tags: dict[str, list[list[int]]]  # split -> tag indices of each of its emoji
    skipped: int  # candidates the font cannot draw as one glyph


def drawable_emoji(
    font_path: str | Path = DEFAULT_FONT, annotation_paths: tuple[str | Path, ...] = DEFAULT_ANNOTATIONS
) -> tuple[dict[str, list[str]], list[str], int]:
    """``(keywords of every annotated emoji, the candidates the font draws, how many it does not)``;
    the candidates are the annotated emoji less the skin-tone variants. Drawn once per process."""
    key = (str(font_path), tuple(map(str, annotation_paths)))
    if key not in _DRAWABLE:
        keywords: dict[str, list[str]] = {}
        for path in annotation_paths:
            keywords.update(read_annotations(path))
        font = open_font(font_path)
        candidates = [e for e in keywords if len(e) == 1 or not any(ord(c) in _SKIN_TONES for c in e)]
        drawable = [e for e in candidates if render(font, e) is not None]
        if not drawable:
            raise ValueError(f"{font_path}: draws none of the {len(candidates)} CLDR emoji (a Pillow without "
                             "colour bitmap support?)")  # fmt: skip
        _DRAWABLE[key] = (keywords, drawable, len(candidates) - len(drawable))
    return _DRAWABLE[key]


def load_catalog(
    font_path: str | Path = DEFAULT_FONT,
    annotation_paths: tuple[str | Path, ...] = DEFAULT_ANNOTATIONS,
    min_count: int = 5,
) -> EmojiCatalog:
    """Keywords of at least ``min_count`` train emoji become the tags."""
    keywords, drawable, skipped = drawable_emoji(font_path, annotation_paths)
    by_split = {s: [e for e in drawable if emoji_split(e) == s] for s in ("train", "val")}
    counts = Counter(w for e in by_split["train"] for w in keywords[e])
    classes = sorted(w for w, n in counts.items() if n >= min_count)
    if not classes:
        top, most = counts.most_common(1)[0]
        raise ValueError(f"data.emoji_min_count={min_count}: no CLDR keyword is shared by that many train emoji "
                         f"(the most common, '{top}', by {most})")  # fmt: skip
    index = {w: i for i, w in enumerate(classes)}
    emoji: dict[str, list[str]] = {}
    tags: dict[str, list[list[int]]] = {}
    for split, pool in by_split.items():
        pairs = [(e, [index[w] for w in keywords[e] if w in index]) for e in pool]
        pairs = [(e, t) for e, t in pairs if t]
        emoji[split], tags[split] = [e for e, _ in pairs], [t for _, t in pairs]
    return EmojiCatalog(classes, emoji, tags, skipped)


class EmojiScenes(Dataset):
    """Scenes of 2-4 emoji on a varied background (see the module docstring).

    Args:
        split: ``train`` draws train emoji; ``val`` and ``test`` draw the val emoji.
        size: number of scenes.
        img_size: output side in pixels.
        seed, stream: which scenes (streams separate val from test).
        label_noise: rate of :func:`hvpmtl.data.synthetic.noisy_labels`.
        min_count: a keyword is a tag when at least this many train emoji carry it.
        font, annotations: the font file and the CLDR annotation files.

    Items are dicts: ``image`` uint8 ``3 x H x W``, ``labels`` and ``clean_labels`` float ``C``
    and ``index``; :meth:`emoji_at` names the emoji a scene shows.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10000,
        img_size: int = 64,
        seed: int = 0,
        stream: int = 0,
        label_noise: float = 0.0,
        min_count: int = 5,
        font: str | Path = DEFAULT_FONT,
        annotations: tuple[str | Path, ...] = DEFAULT_ANNOTATIONS,
        min_emoji: int = 2,
        max_emoji: int = 4,
    ):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split '{split}' unknown (choose from train, val, test)")
        if not 0.0 <= label_noise < 1.0:
            raise ValueError(f"label_noise={label_noise} must be in [0, 1)")
        self.catalog = load_catalog(font, tuple(annotations), min_count)
        part = "train" if split == "train" else "val"
        self.pool, self.pool_tags = self.catalog.emoji[part], self.catalog.tags[part]
        if not 1 <= min_emoji <= max_emoji <= len(self.pool):
            raise ValueError(f"need 1 <= min_emoji <= max_emoji <= {len(self.pool)} (the {part} emoji)")
        self.classes = list(self.catalog.classes)
        self.num_classes = len(self.classes)
        self.size, self.img_size, self.seed, self.stream = size, img_size, seed, stream
        self.label_noise, self.min_emoji, self.max_emoji = label_noise, min_emoji, max_emoji
        self.font_path = str(font)
        self._font: ImageFont.FreeTypeFont | None = None  # opened on first use (in each loader worker)
        self._glyphs: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream, index, purpose])

    def _glyph(self, k: int) -> Image.Image:
        """Pool emoji ``k`` as RGBA, its longer side the largest a scene draws (cached)."""
        if k not in self._glyphs:
            if self._font is None:
                self._font = open_font(self.font_path)
            glyph = render(self._font, self.pool[k])
            if glyph is None:  # the catalogue drew it: only a changed font file gets here
                raise RuntimeError(f"{self.font_path}: emoji {self.pool[k]!r} now draws empty")
            side = max(1, round(SCALE[1] * self.img_size))
            f = side / max(glyph.size)
            self._glyphs[k] = glyph.resize((max(1, round(glyph.width * f)), max(1, round(glyph.height * f))),
                                           Image.Resampling.LANCZOS)  # fmt: skip
        return self._glyphs[k]

    def _scene(self, index: int) -> tuple[np.ndarray, list[int]]:
        """``H x W x 3`` uint8 scene and the pool indices of its (at least half) visible emoji."""
        rng, S = self._rng(index, 0), self.img_size
        background = np.clip(scene_background(rng, S) * 255 + 0.5, 0, 255).astype(np.uint8)
        canvas = Image.fromarray(background).convert("RGBA")
        n = int(rng.integers(self.min_emoji, self.max_emoji + 1))
        ks = rng.choice(len(self.pool), size=n, replace=False).tolist()
        owner = np.full((S, S), -1, dtype=np.int64)
        areas: list[int] = []
        placed: list[tuple[float, float, float]] = []  # centre x, centre y, half the longer side
        for j, k in enumerate(ks):
            glyph = self._glyph(k)
            f = rng.uniform(*SCALE) / SCALE[1]
            glyph = glyph.resize((max(1, round(glyph.width * f)), max(1, round(glyph.height * f))),
                                 Image.Resampling.LANCZOS)  # fmt: skip
            w, h = glyph.size
            for _attempt in range(20):  # limited overlap (rejection sampling, then accept)
                x, y = int(rng.integers(0, max(S - w, 0) + 1)), int(rng.integers(0, max(S - h, 0) + 1))
                cx, cy, r = x + w / 2, y + h / 2, max(w, h) / 2
                if all((cx - a) ** 2 + (cy - b) ** 2 >= (0.8 * (r + q)) ** 2 for a, b, q in placed):
                    break
            placed.append((cx, cy, r))
            layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
            layer.paste(glyph, (x, y))
            canvas = Image.alpha_composite(canvas, layer)
            solid = np.asarray(layer.getchannel("A")) >= 128
            owner[solid] = j
            areas.append(int(solid.sum()))
        visible = [k for j, k in enumerate(ks) if (owner == j).sum() >= max(_MIN_VISIBLE * areas[j], 1)]
        return np.asarray(canvas.convert("RGB")), visible

    def emoji_at(self, index: int) -> list[str]:
        """The emoji scene ``index`` shows (at least half visible), in drawing order."""
        return [self.pool[k] for k in self._scene(index)[1]]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} scenes")
        pixels, visible = self._scene(index)
        clean = np.zeros(self.num_classes, dtype=np.float32)
        for k in visible:
            clean[self.pool_tags[k]] = 1
        labels = noisy_labels(clean, self.label_noise, self._rng(index, 1))
        return {
            "image": torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous(),
            "labels": torch.from_numpy(labels),
            "clean_labels": torch.from_numpy(clean),
            "index": index,
        }

    def __getstate__(self) -> dict:
        # loader workers open their own font (a FreeType handle does not pickle) and fill their own cache
        return {**self.__dict__, "_font": None, "_glyphs": {}}
