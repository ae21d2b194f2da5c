"""Tencent ML-Images image lists as multi-label images, labels kept above a confidence.

Files (as the Tencent ML-Images release has them):

* an image list, one image a line: the image file, then labels ``index:confidence`` (or a bare
  ``index``, confidence 1), separated by tabs or spaces, e.g.
  ``im_0.jpeg<TAB>5177:0.9<TAB>5170:0.9``. A source URL after the file name (as
  ``download_im_from_url.py`` writes its list) is skipped. ``train_urls.txt`` itself starts with
  URLs: download the images first and read the list the download writes.
* ``dictionary_and_semantic_hierarchy.txt``: line ``i`` (from 0) is class ``i``:
  ``<WordNet id><TAB><parent index><TAB><name>``; looked up beside the list unless given.
* images under ``root`` (default: the list's folder), at the path the list names.

A label is a positive tag when its confidence is at least ``min_confidence`` (the release's
confidences are 0.8, 0.9 and 1, each image's labels already include their ancestors in the
hierarchy). Vocabulary: the dictionary's classes in its order, or the given classes (WordNet ids
such as ``n02084071`` or names), in their order; labels of other classes are ignored with one
warning. Names shared by two kept classes (the dictionary has a few) get their WordNet id appended.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hvpmtl.data.formats.base import ClassEntry, FormatImages, ImageRecord, select_classes, text_lines, warn_dropped
from hvpmtl.data.loading import DEFAULT_LOADING, ImageLoading

__all__ = ["DICTIONARY_FILE", "TencentImages", "read_tencent_dictionary"]

DICTIONARY_FILE = "dictionary_and_semantic_hierarchy.txt"


def read_tencent_dictionary(path: Path) -> list[ClassEntry]:
    """Classes by line: key = the 0-based line index the lists use, id = WordNet id. A first line
    whose parent field is not an integer is taken as a header."""
    if not path.is_file():
        raise FileNotFoundError(f"Tencent ML-Images dictionary not found: {path}")
    entries = []
    for lineno, line in enumerate(text_lines(path), 1):
        fields = [f.strip() for f in line.rstrip("\r\n").split("\t")]
        if not line.strip():
            continue
        parent_ok = len(fields) == 3 and fields[1].lstrip("-").isdigit()
        if lineno == 1 and len(fields) == 3 and not parent_ok:
            continue
        if not parent_ok or not fields[0] or not fields[2]:
            raise ValueError(
                f"{path}:{lineno}: expected '<WordNet id><TAB><parent index><TAB><name>', got {line.strip()[:120]!r}"
            )
        entries.append(ClassEntry(str(len(entries)), fields[0], fields[2]))
    if not entries:
        raise ValueError(f"{path}: no classes")
    return entries


def _label(path: Path, lineno: int, token: str, num_classes: int) -> tuple[int, float]:
    index_text, _, confidence_text = token.partition(":")
    try:
        index = int(index_text)
        confidence = float(confidence_text) if confidence_text else 1.0
    except ValueError:
        raise ValueError(f"{path}:{lineno}: label {token!r} is not 'index:confidence'") from None
    if not 0 <= index < num_classes:
        raise ValueError(f"{path}:{lineno}: label index {index} is not in the dictionary ({num_classes} classes)")
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"{path}:{lineno}: label {token!r}: confidence must be in [0, 1]")
    return index, confidence


class TencentImages(FormatImages):
    """A Tencent ML-Images image list as multi-label images (module docstring).

    Args:
        image_list: the list file (``<file> <index:confidence> ...`` lines).
        root: folder the listed files are under; empty = the list's folder.
        classes: vocabulary (WordNet ids or names); None = the whole dictionary.
        dictionary: ``dictionary_and_semantic_hierarchy.txt``; None = beside ``image_list``.
        min_confidence: a label is a positive tag at this confidence or above.
        check_files, missing_images, loading: as :class:`FormatImages`.
    """

    def __init__(
        self,
        image_list: str | Path,
        root: str | Path = "",
        classes: Sequence[str] | None = None,
        *,
        dictionary: str | Path | None = None,
        min_confidence: float = 0.5,
        check_files: bool = True,
        missing_images: str = "error",
        loading: ImageLoading = DEFAULT_LOADING,
    ):
        path = Path(image_list)
        if not path.is_file():
            raise FileNotFoundError(f"Tencent ML-Images image list not found: {path}")
        dictionary = Path(dictionary) if dictionary else path.parent / DICTIONARY_FILE
        if not dictionary.is_file():
            raise FileNotFoundError(f"Tencent ML-Images dictionary not found: {dictionary} (set data.dictionary)")
        entries = read_tencent_dictionary(dictionary)
        vocab = select_classes(entries, classes, str(dictionary))
        base = Path(root) if str(root) else path.parent
        records, dropped = [], {}
        for lineno, line in enumerate(text_lines(path), 1):
            if not line.strip():
                continue
            name, tokens = self._split(line)
            if "://" in name:
                raise ValueError(
                    f"{path}:{lineno}: {name[:80]!r} is a URL, not an image file "
                    "(download the images; read the list the download writes)"
                )
            record = ImageRecord(base / name, f"{path}:{lineno}")
            for token in tokens:
                if "://" in token:
                    continue  # the source URL of a downloaded image
                index, confidence = _label(path, lineno, token, len(entries))
                label = vocab.index.get(str(index))
                if label is None:
                    dropped[entries[index].name] = dropped.get(entries[index].name, 0) + 1
                elif confidence >= min_confidence and confidence > 0:
                    record.positives.add(label)
            records.append(record)
        warn_dropped(str(path), dropped)
        super().__init__(
            records, vocab, path, check_files=check_files, missing_images=missing_images,
            loading=loading,
        )  # fmt: skip
        self.root, self.dictionary, self.min_confidence = base, dictionary, min_confidence

    @staticmethod
    def _split(line: str) -> tuple[str, list[str]]:
        """File name and label tokens; with a tab the name is everything before it (spaces allowed)."""
        line = line.rstrip("\r\n")
        if "\t" in line:
            name, rest = line.split("\t", 1)
            return name.strip(), rest.split()
        fields = line.split()
        return fields[0], fields[1:]
