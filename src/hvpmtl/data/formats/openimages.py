"""Open Images image-level labels (CSV) as multi-label images, verified negatives kept apart.

Files (as Open Images V4-V7 ship them):

* ``<split>-annotations-human-imagelabels.csv`` (``oidv6-`` / ``oidv7-`` prefixed in later
  versions), header ``ImageID,Source,LabelName,Confidence``: one row per image and label.
* the class descriptions, ``LabelName,DisplayName`` rows: ``oidv6-class-descriptions.csv`` (with
  that header) or ``class-descriptions.csv`` (no header); looked up beside the labels file unless
  given.
* images ``root/<ImageID>.jpg``, or ``root/<split>/<ImageID>.jpg`` when that folder exists
  (``<split>`` is ``train``, ``validation`` or ``test`` from the labels file's name); ``root``
  defaults to the labels file's folder.
* optionally ``<split>-annotations-bbox.csv`` (``ImageID,Source,LabelName,Confidence,XMin,XMax,
  YMin,YMax,...``, fractions of the image): its boxes become ``boxes`` / ``box_labels``.

Confidence: a label is a positive tag when its confidence is at least ``min_confidence`` (and
above 0). A label with confidence 0 is a verified negative (humans checked the class is absent):
it is never a positive; it is listed in the item's ``negatives`` multi-hot (and in the manifest
that ``hvpmtl data convert`` writes, and the shards ``hvpmtl data shard`` writes, which keep it
for ``data.unannotated``). Labels between 0 and ``min_confidence`` are neither. An image listed
with only negatives is an untagged image.

Unannotated classes (neither a positive nor a verified negative of an image, confidences between 0
and ``min_confidence`` included): with ``unannotated="unknown"`` (``data.unannotated``, the default)
each item carries ``known``, bool ``C``: its positives and verified negatives, the only classes
MLC's loss reads for it; with ``"negative"`` no mask, every class but the positives is absent.

Vocabulary: the description file's classes in its order, or the given classes (MIDs such as
``/m/01g317`` or display names; ``oidv6-classes-trainable.txt`` works as a classes file), in
their order; labels of other classes are ignored with one warning. Display names shared by two
kept classes get their MID appended.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path

from hvpmtl.data.formats.base import (
    ClassEntry,
    FormatImages,
    ImageRecord,
    select_classes,
    split_folder,
    text_lines,
    warn_dropped,
)
from hvpmtl.data.loading import DEFAULT_LOADING, ImageLoading
from hvpmtl.data.manifest import read_text

__all__ = ["DESCRIPTION_FILES", "OpenImagesLabels", "read_class_descriptions"]

DESCRIPTION_FILES = ("oidv7-class-descriptions.csv", "oidv6-class-descriptions.csv", "class-descriptions.csv",
                     "class-descriptions-boxable.csv")  # fmt: skip
LABEL_COLUMNS = ("ImageID", "LabelName", "Confidence")
BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")


def read_class_descriptions(path: Path) -> list[ClassEntry]:
    """``LabelName,DisplayName`` rows (a header row of those names is skipped), in file order."""
    if not path.is_file():
        raise FileNotFoundError(f"Open Images class descriptions not found: {path}")
    entries, seen = [], {}
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    for row in reader:
        lineno = reader.line_num
        if not row or (lineno == 1 and [c.strip() for c in row] == ["LabelName", "DisplayName"]):
            continue
        if len(row) != 2 or not row[0].strip():
            raise ValueError(f"{path}:{lineno}: expected 'LabelName,DisplayName', got {','.join(row)!r}")
        mid, name = row[0].strip(), row[1].strip()
        if mid in seen:
            raise ValueError(f"{path}:{lineno}: LabelName {mid} repeats line {seen[mid]}")
        seen[mid] = lineno
        entries.append(ClassEntry(mid, mid, name or mid))
    if not entries:
        raise ValueError(f"{path}: no classes")
    return entries


def find_descriptions(labels_csv: Path) -> Path:
    """The class-description file beside ``labels_csv`` (first of :data:`DESCRIPTION_FILES`)."""
    for name in DESCRIPTION_FILES:
        if (labels_csv.parent / name).is_file():
            return labels_csv.parent / name
    raise FileNotFoundError(
        f"no class-description file ({', '.join(DESCRIPTION_FILES)}) beside {labels_csv}; set data.dictionary"
    )


def _rows(path: Path, columns: Sequence[str]):
    """``(line, {column: value})`` of a CSV whose header names ``columns``."""
    if not path.is_file():
        raise FileNotFoundError(f"Open Images annotations not found: {path}")
    reader = csv.reader(text_lines(path))
    header = [c.strip() for c in next(reader, [])]
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{path}:1: the header must name the columns {', '.join(columns)}; missing {missing}")
    at = {c: header.index(c) for c in columns}
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(header)}")
        yield reader.line_num, {c: row[i].strip() for c, i in at.items()}


def _fraction(path: Path, lineno: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{path}:{lineno}: {column} must be a number in [0, 1], got {text!r}")
    return value


class OpenImagesLabels(FormatImages):
    """Open Images image-level labels as multi-label images (module docstring).

    Args:
        labels_csv: ``<split>-annotations-human-imagelabels.csv``.
        root: image folder; empty = the labels file's folder.
        classes: vocabulary (MIDs or display names); None = every class of the descriptions.
        descriptions: class-description CSV; None = found beside ``labels_csv``.
        min_confidence: a label is a positive tag at this confidence or above.
        boxes_csv: optional ``<split>-annotations-bbox.csv`` for ``boxes`` / ``box_labels``.
        check_files, missing_images, loading: as :class:`FormatImages`.
        unannotated: ``unknown`` (items carry ``known``) or ``negative`` (module docstring).
    """

    def __init__(
        self,
        labels_csv: str | Path,
        root: str | Path = "",
        classes: Sequence[str] | None = None,
        *,
        descriptions: str | Path | None = None,
        min_confidence: float = 0.5,
        boxes_csv: str | Path | None = None,
        check_files: bool = True,
        missing_images: str = "error",
        loading: ImageLoading = DEFAULT_LOADING,
        unannotated: str = "unknown",
    ):
        if unannotated not in ("unknown", "negative"):
            raise ValueError(f"unannotated={unannotated!r} must be 'unknown' or 'negative'")
        path = Path(labels_csv)
        if not path.is_file():
            raise FileNotFoundError(f"Open Images annotations not found: {path}")
        descriptions = Path(descriptions) if descriptions else find_descriptions(path)
        entries = read_class_descriptions(descriptions)
        known = {e.key: e.name for e in entries}
        vocab = select_classes(entries, classes, str(descriptions))
        split = re.match(r"(?:oidv\d+-)?(train|validation|test)-", path.name)
        folder = split_folder(Path(root) if str(root) else path.parent, split.group(1) if split else "")
        records: dict[str, ImageRecord] = {}
        dropped: dict[str, int] = {}
        for lineno, row in _rows(path, LABEL_COLUMNS):
            image_id, mid = row["ImageID"], row["LabelName"]
            if not image_id:
                raise ValueError(f"{path}:{lineno}: empty ImageID")
            if mid not in known:
                raise ValueError(f"{path}:{lineno}: LabelName {mid!r} is not in {descriptions}")
            confidence = _fraction(path, lineno, "Confidence", row["Confidence"])
            record = records.get(image_id)
            if record is None:
                record = records[image_id] = ImageRecord(folder / f"{image_id}.jpg", f"{path}:{lineno}")
            label = vocab.index.get(mid)
            if label is None:
                dropped[known[mid]] = dropped.get(known[mid], 0) + 1
            elif confidence == 0.0:
                record.negatives.add(label)
            elif confidence >= min_confidence:
                record.positives.add(label)
        for record in records.values():
            record.negatives -= record.positives  # a positive from any row wins over a negative
        warn_dropped(str(path), dropped)
        if boxes_csv:
            self._read_boxes(Path(boxes_csv), records, vocab.index, known)
        super().__init__(
            list(records.values()), vocab, path, check_files=check_files, missing_images=missing_images,
            loading=loading, has_negatives=True, has_boxes=bool(boxes_csv),
            boxes_normalized=True,
        )  # fmt: skip
        self.root, self.descriptions, self.min_confidence = folder, descriptions, min_confidence
        self.unannotated = unannotated

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        if self.unannotated == "unknown":
            sample["known"] = (sample["labels"] > 0) | (sample["negatives"] > 0)
        return sample

    @staticmethod
    def _read_boxes(path: Path, records: dict[str, ImageRecord], index: dict[str, int], known: dict) -> None:
        """Boxes of the listed images and kept classes, as ``[0, 1]`` xyxy fractions."""
        for lineno, row in _rows(path, BOX_COLUMNS):
            if row["LabelName"] not in known:
                raise ValueError(f"{path}:{lineno}: LabelName {row['LabelName']!r} is not in the class descriptions")
            record, label = records.get(row["ImageID"]), index.get(row["LabelName"])
            if record is None or label is None:
                continue
            x0, x1, y0, y1 = (_fraction(path, lineno, c, row[c]) for c in ("XMin", "XMax", "YMin", "YMax"))
            if x1 < x0 or y1 < y0:
                raise ValueError(f"{path}:{lineno}: XMax < XMin or YMax < YMin")
            record.boxes.append([x0, y0, x1, y1])
            record.box_labels.append(label)
