"""Any format reader's images and tags written as the project's JSONL manifest plus a classes file.

One line per image, ``{"path": ..., "labels": [tag names]}`` (plus ``"negatives"``, the tags
verified absent, on every line where the format has verified negatives: Open Images; the manifest
reader reads them, see :mod:`hvpmtl.data.manifest`), paths relative to the manifest's folder.
The classes file lists the vocabulary, one name a line, in the reader's order, so
``ManifestImages(manifest, classes=classes_file)`` gives the very labels the format reader gives.
Both files are written atomically.

>>> write_manifest(CocoImages("coco/annotations/instances_val2017.json"), "coco-val.jsonl")
(PosixPath('coco-val.jsonl'), PosixPath('coco-val.classes.txt'))
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hvpmtl.data.formats.base import FormatImages
from hvpmtl.files import atomic_write

__all__ = ["MANIFEST_SUFFIXES", "classes_path_for", "write_manifest"]


def classes_path_for(manifest: str | Path) -> Path:
    """``<name>.classes.txt`` beside ``<name>.jsonl``."""
    manifest = Path(manifest)
    return manifest.with_name(f"{manifest.stem}.classes.txt")


def _check_class_names(names: list[str], origin: object) -> None:
    """Names the classes file can hold: one line each, not blank, not a ``#`` comment, no edge spaces."""
    for name in names:
        if not name.strip() or name.startswith("#") or name != name.strip() or "\n" in name or "\r" in name:
            raise ValueError(f"{origin}: class name {name!r} cannot be written to a classes file (one name a line)")


MANIFEST_SUFFIXES = (".jsonl", ".ndjson", ".json")  # a manifest file's suffix


def write_manifest(dataset: FormatImages, out: str | Path, classes_out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``dataset`` as ``out`` (JSONL) and its vocabulary as ``classes_out`` (default
    :func:`classes_path_for`); returns both paths."""
    out = Path(out)
    if out.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ValueError(f"{out}: the manifest must be a .jsonl file")
    classes_out = Path(classes_out) if classes_out else classes_path_for(out)
    _check_class_names(dataset.classes, dataset.annotations)
    folder = out.absolute().parent
    names = dataset.classes

    def entry(i: int) -> str:
        absolute = Path(dataset.paths[i]).absolute()
        try:
            rel = Path(os.path.relpath(absolute, folder)).as_posix()
        except ValueError:  # another drive (Windows)
            rel = str(absolute)
        item = {"path": rel, "labels": [names[k] for k in dataset.targets[i]]}
        if dataset.negatives is not None:  # on every line: an empty list says "none verified absent"
            item["negatives"] = [names[k] for k in dataset.negatives[i]]
        return json.dumps(item, ensure_ascii=False) + "\n"

    def write_lines(f) -> None:
        for i in range(len(dataset)):
            f.write(entry(i).encode("utf-8"))

    atomic_write(classes_out, lambda f: f.write(("\n".join(names) + "\n").encode("utf-8")))
    atomic_write(out, write_lines)
    return out, classes_out
