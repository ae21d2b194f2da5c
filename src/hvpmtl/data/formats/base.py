"""What the format readers share: one record per image, the vocabulary, the sample they yield.

Every reader turns its format into :class:`ImageRecord` lists and hands them to
:class:`FormatImages`, which checks the image files, then loads images like the manifest reader
(:class:`hvpmtl.data.manifest.ImageFiles`: ``on_bad_image``, ``max_pixels``, errors naming where
the image is listed) and adds the fields the format has (``negatives``, ``boxes``,
``box_labels``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hvpmtl.data.loading import DEFAULT_LOADING, ImageLoading
from hvpmtl.data.manifest import ImageFiles, read_text
from hvpmtl.reprs import short_repr

MISSING_IMAGE_POLICIES = ("error", "drop")


class VocabularyError(ValueError):
    """A class asked for in the vocabulary (``data.classes`` / ``data.classes_file``) is not in the format's
    class list, or names more than one of its classes."""


@dataclass
class ClassEntry:
    """One class of a format's own list: ``key`` is what its annotations reference (category id, MID,
    line index), ``label_id`` the id people write (category id, MID, WordNet id), ``name`` its display name."""

    key: str
    label_id: str
    name: str


@dataclass(slots=True)
class ImageRecord:
    """One listed image: its file, where it is listed (``file:line`` or ``file: element``) and its
    labels as vocabulary indices; boxes are ``xyxy`` pixels (or ``[0, 1]`` fractions where the
    reader says so)."""

    path: Path
    source: str
    positives: set[int] = field(default_factory=set)
    negatives: set[int] = field(default_factory=set)
    boxes: list[list[float]] = field(default_factory=list)
    box_labels: list[int] = field(default_factory=list)
    ref: object = None  # the format's own handle (COCO: image id and annotation rows)


@dataclass
class Vocabulary:
    """The classes a reader keeps, in order: ``names`` (display names, made unique with their id
    where two share one) and ``label_ids``; ``index`` maps a format key to its position."""

    names: list[str]
    label_ids: list[str]
    index: dict[str, int]


def text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, streamed (a byte-order mark dropped); other bytes: ``ValueError``
    naming the file, line and column (as the manifest reader reports them)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            yield from f
    except UnicodeDecodeError:
        read_text(path)  # raises the error naming the line
        raise


def select_classes(entries: Sequence[ClassEntry], wanted: Sequence[str] | None, origin: str) -> Vocabulary:
    """All ``entries`` in their order, or the ones ``wanted`` names (by id or display name), in its order.

    A wanted name that matches no entry, or a display name shared by several entries, raises
    :class:`VocabularyError` naming ``origin`` (the class-list file).
    """
    if not entries:
        raise ValueError(f"{origin}: no classes")
    if wanted:
        by_id = {e.label_id: e for e in entries}
        by_name: dict[str, list[ClassEntry]] = {}
        for e in entries:
            by_name.setdefault(e.name, []).append(e)
        chosen = []
        for w in wanted:
            if w in by_id:
                chosen.append(by_id[w])
            elif len(by_name.get(w, [])) == 1:
                chosen.append(by_name[w][0])
            elif w in by_name:
                ids = ", ".join(e.label_id for e in by_name[w])
                raise VocabularyError(f"class '{w}' names {len(by_name[w])} classes of {origin} ({ids}); give its id")
            else:
                raise VocabularyError(f"class '{w}' is not in {origin} (give an id or a display name from it)")
        keys = [e.key for e in chosen]
        if len(set(keys)) != len(keys):
            raise VocabularyError(f"the vocabulary names one class of {origin} twice")
        entries = chosen
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.name] = counts.get(e.name, 0) + 1
    names = [e.name if counts[e.name] == 1 or e.name == e.label_id else f"{e.name} ({e.label_id})" for e in entries]
    return Vocabulary(names, [e.label_id for e in entries], {e.key: k for k, e in enumerate(entries)})


def image_in_folder(folder: Path, name: str, where: str) -> Path:
    """``folder / name`` for an image an annotation file names (``where``: the file and element);
    ``ValueError`` when ``name`` is absolute or has a ``..`` part: an annotation names images in its
    own image folder, so a hostile one cannot pull other files into reports and thumbnails."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"{where} {short_repr(name)}: must be a relative path inside {folder} (no '..', not absolute)")
    return folder / name


def split_folder(root: Path, split: str) -> Path:
    """``root/<split>`` when that folder exists (COCO's ``train2017/``, Open Images' ``train/``), else ``root``."""
    return root / split if split and (root / split).is_dir() else root


def warn_dropped(origin: str, dropped: dict[str, int]) -> None:
    """One warning for the labels of classes left out of a given vocabulary."""
    if dropped:
        total, examples = sum(dropped.values()), ", ".join(sorted(dropped)[:5])
        warnings.warn(
            f"{origin}: {total} labels of {len(dropped)} classes outside the given vocabulary are ignored "
            f"(e.g. {examples})",
            stacklevel=3,
        )


class FormatImages(ImageFiles):
    """Images of one format's records, loaded like manifest images (:class:`ImageFiles`).

    Items are dicts: ``image`` uint8 ``3 x H x W``, ``labels`` float ``C`` multi-hot of the
    positive tags, ``index``; plus, where the format has them, ``negatives`` (float ``C``
    multi-hot of verified-absent classes) and ``boxes`` (float ``N x 4`` xyxy pixels) with
    ``box_labels`` (long ``N``, vocabulary indices).

    Args:
        records: the listed images.
        vocabulary: the classes kept (``.classes`` are its names, ``.label_ids`` its ids).
        origin: the annotation file, named in errors.
        check_files: check at construction that every image file exists.
        missing_images: ``error`` (the first absent file stops construction, naming where it is
            listed) or ``drop`` (absent files are left out and counted in ``num_dropped_images``).
        loading: how images load (:class:`~hvpmtl.data.loading.ImageLoading`: ``on_bad_image``, ...).
        has_negatives, has_boxes: the format has verified negatives / boxes.
        boxes_normalized: boxes are ``[0, 1]`` fractions of the image, scaled at load time.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        vocabulary: Vocabulary,
        origin: str | Path,
        *,
        check_files: bool = True,
        missing_images: str = "error",
        loading: ImageLoading = DEFAULT_LOADING,
        has_negatives: bool = False,
        has_boxes: bool = False,
        boxes_normalized: bool = False,
    ):
        if missing_images not in MISSING_IMAGE_POLICIES:
            raise ValueError(f"missing_images='{missing_images}' must be 'error' or 'drop'")
        if not records:
            raise ValueError(f"{origin}: no images listed")
        records, self.num_dropped_images = self._check_files(records, check_files, missing_images, origin)
        super().__init__(
            [str(r.path) for r in records], [sorted(r.positives) for r in records], vocabulary.names, loading,
            [r.source for r in records], f"{origin}",
            negatives=[sorted(r.negatives) for r in records] if has_negatives else None,
        )  # fmt: skip
        self.label_ids = vocabulary.label_ids
        self.annotations = Path(origin)
        self.num_tagged = sum(1 for r in records if r.positives)
        self.boxes = [(r.boxes, r.box_labels) for r in records] if has_boxes else None
        self.boxes_normalized = boxes_normalized
        self.refs = [r.ref for r in records] if any(r.ref is not None for r in records) else None

    @staticmethod
    def _check_files(
        records: Sequence[ImageRecord], check: bool, policy: str, origin: str | Path
    ) -> tuple[list[ImageRecord], int]:
        if not check:
            return list(records), 0
        kept = [r for r in records if r.path.is_file()]
        missing = len(records) - len(kept)
        if missing and policy == "error":
            first = next(r for r in records if not r.path.is_file())
            more = f" ({missing - 1} more missing)" if missing > 1 else ""
            raise FileNotFoundError(
                f"{first.source}: image not found: {first.path}{more} "
                "(check data.root; data.missing_images=drop leaves absent images out)"
            )
        if not kept:
            raise FileNotFoundError(f"{origin}: none of the {len(records)} listed images exists (check data.root)")
        if missing:
            warnings.warn(f"{origin}: {missing} of {len(records)} listed images are absent and left out", stacklevel=3)
        return kept, missing

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        i = sample["index"]
        if self.boxes is not None:
            boxes, labels = self.boxes[i]
            sample["boxes"] = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            if self.boxes_normalized:
                h, w = sample["image"].shape[1:]
                sample["boxes"] *= torch.tensor([w, h, w, h], dtype=torch.float32)
            sample["box_labels"] = torch.tensor(labels, dtype=torch.long)
        return sample
