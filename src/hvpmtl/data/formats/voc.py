"""Pascal VOC XML as multi-label images: image tags from the ``<object>`` names of each annotation.

Layout (as ``VOCdevkit/VOC2007``): ``root/ImageSets/Main/<split>.txt`` lists image ids, one a
line; ``root/Annotations/<id>.xml`` describes each image; ``root/JPEGImages/<id>.jpg`` holds it
(else ``JPEGImages/<filename>`` of the XML: a relative path inside ``JPEGImages/``, with no
``..`` part). ``root`` defaults to the folder above ``ImageSets/Main/``.

* Vocabulary: the given classes in their order, else the sorted names found in the split's XML
  files (for VOC2007/2012 the 20 classes in their usual order). Objects of other classes are
  ignored with one warning.
* ``difficult``: ``exclude`` (default, as VOC's evaluation ignores them) drops objects marked
  ``<difficult>1</difficult>`` from tags and boxes; ``include`` keeps them.
* Boxes: ``<bndbox>`` corners, VOC's 1-based pixel indices -> 0-based ``xyxy`` (``xmin - 1``,
  ``ymin - 1``, ``xmax``, ``ymax``, as Detectron2 reads VOC).
* An XML without ``<object>`` is an image without tags.

Errors name the file and element, e.g. ``Annotations/000005.xml: <object> 2 (dog): <bndbox> has no
<xmax>``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from hvpmtl.data.formats.base import (
    ClassEntry,
    FormatImages,
    ImageRecord,
    image_in_folder,
    select_classes,
    warn_dropped,
)
from hvpmtl.data.loading import DEFAULT_LOADING, ImageLoading
from hvpmtl.data.manifest import read_text
from hvpmtl.reprs import short_repr

__all__ = ["DIFFICULT_POLICIES", "VocImages", "voc_root"]

DIFFICULT_POLICIES = ("exclude", "include")


def voc_root(image_set: Path) -> Path:
    """The VOC year folder of ``<root>/ImageSets/Main/<split>.txt``."""
    main = image_set.parent
    if main.name != "Main" or main.parent.name != "ImageSets":
        raise ValueError(f"{image_set}: not in <root>/ImageSets/Main/; set data.root to the VOC folder")
    return main.parent.parent


def _image_ids(image_set: Path) -> list[tuple[int, str]]:
    if not image_set.is_file():
        raise FileNotFoundError(f"VOC image set not found: {image_set}")
    ids = []
    for lineno, line in enumerate(read_text(image_set).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:
            raise ValueError(
                f"{image_set}:{lineno}: expected one image id per line, got {line.strip()!r} "
                "(use ImageSets/Main/<split>.txt, not a per-class <class>_<split>.txt)"
            )
        ids.append((lineno, fields[0]))
    if not ids:
        raise ValueError(f"{image_set}: no image ids")
    return ids


def _number(xml: Path, where: str, element: ET.Element, tag: str) -> float:
    text = element.findtext(tag)
    if text is None or not text.strip():
        raise ValueError(f"{xml}: {where}: <{element.tag}> has no <{tag}>")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{xml}: {where}: <{tag}> is not a number: {short_repr(text.strip())}") from None
    if not math.isfinite(value):  # float() reads "nan" and "inf"
        raise ValueError(f"{xml}: {where}: <{tag}> is not a finite number: {short_repr(text.strip())}")
    return value


def parse_voc_xml(xml: Path) -> tuple[str, list[tuple[str, bool, list[float]]]]:
    """``(<filename> or "", [(name, difficult, xyxy box), ...])`` of one annotation file."""
    if not xml.is_file():
        raise FileNotFoundError(f"VOC annotation not found: {xml}")
    try:
        root = ET.fromstring(read_text(xml))
    except ET.ParseError as err:
        line = err.position[0] if err.position else 0
        raise ValueError(f"{xml}:{line}: not valid XML ({err})") from None
    if root.tag != "annotation":
        raise ValueError(f"{xml}: expected an <annotation> element, got <{root.tag}>")
    objects = []
    for j, obj in enumerate(root.findall("object"), 1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise ValueError(f"{xml}: <object> {j}: no <name>")
        where = f"<object> {j} ({name})"
        difficult_text = (obj.findtext("difficult") or "0").strip()
        if difficult_text not in ("0", "1"):
            raise ValueError(f"{xml}: {where}: <difficult> must be 0 or 1, got {difficult_text!r}")
        box = obj.find("bndbox")
        if box is None:
            raise ValueError(f"{xml}: {where}: no <bndbox>")
        x0, y0, x1, y1 = (_number(xml, where, box, t) for t in ("xmin", "ymin", "xmax", "ymax"))
        if x1 < x0 or y1 < y0:
            raise ValueError(f"{xml}: {where}: <bndbox> has xmax < xmin or ymax < ymin ({x0}, {y0}, {x1}, {y1})")
        objects.append((name, difficult_text == "1", [x0 - 1.0, y0 - 1.0, x1, y1]))
    return (root.findtext("filename") or "").strip(), objects


class VocImages(FormatImages):
    """A Pascal VOC image set as multi-label images with boxes (module docstring).

    Args:
        image_set: ``ImageSets/Main/<split>.txt``.
        root: the VOC folder (``Annotations/``, ``JPEGImages/``); empty = from ``image_set``.
        classes: vocabulary (names); None = sorted names in the split.
        difficult: ``exclude`` | ``include`` objects marked difficult.
        check_files, missing_images, loading: as :class:`FormatImages`.
    """

    def __init__(
        self,
        image_set: str | Path,
        root: str | Path = "",
        classes: Sequence[str] | None = None,
        *,
        difficult: str = "exclude",
        check_files: bool = True,
        missing_images: str = "error",
        loading: ImageLoading = DEFAULT_LOADING,
    ):
        if difficult not in DIFFICULT_POLICIES:
            raise ValueError(f"difficult='{difficult}' must be 'exclude' or 'include'")
        image_set = Path(image_set)
        ids = _image_ids(image_set)
        root = Path(root) if str(root) else voc_root(image_set)
        parsed = [(lineno, i, parse_voc_xml(root / "Annotations" / f"{i}.xml")) for lineno, i in ids]
        found = sorted({name for _, _, (_, objects) in parsed for name, _, _ in objects})
        if classes:
            entries = [ClassEntry(name, name, name) for name in classes]
        elif found:
            entries = [ClassEntry(name, name, name) for name in found]
        else:
            raise ValueError(f"{image_set}: no <object> in any of the {len(ids)} annotation files")
        vocab = select_classes(entries, None, str(image_set))
        records, dropped = [], {}
        for lineno, image_id, (filename, objects) in parsed:
            path = root / "JPEGImages" / f"{image_id}.jpg"
            if filename and not path.is_file():
                xml = root / "Annotations" / f"{image_id}.xml"
                path = image_in_folder(root / "JPEGImages", filename, f"{xml}: <filename>")
            record = ImageRecord(path, f"{image_set}:{lineno}")
            for name, is_difficult, box in objects:
                if is_difficult and difficult == "exclude":
                    continue
                label = vocab.index.get(name)
                if label is None:
                    dropped[name] = dropped.get(name, 0) + 1
                    continue
                record.positives.add(label)
                record.boxes.append(box)
                record.box_labels.append(label)
            records.append(record)
        warn_dropped(str(image_set), dropped)
        super().__init__(
            records, vocab, image_set, check_files=check_files, missing_images=missing_images,
            loading=loading, has_boxes=True,
        )  # fmt: skip
        self.root, self.difficult = root, difficult
