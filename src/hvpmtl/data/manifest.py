"""Users' own images: a manifest file (CSV or JSONL) or a torchvision ``ImageFolder`` tree.

Manifest formats (paths relative to ``root``; an absolute path is used as is):

* CSV with a header naming the columns ``path`` and ``labels`` (others are ignored); the tags
  of one image are separated by ``|``, e.g. ``img/001.jpg,dog|grass``. An empty ``labels``
  field is an image with no tag. Quote a path that contains a comma.
* JSONL, one object per line: ``{"path": "img/001.jpg", "labels": ["dog", "grass"]}``.

Verified-absent tags (optional): a CSV column ``negatives`` (``|``-separated like ``labels``) or a
JSONL key ``negatives`` (a list of names; a line without it has none) lists the tags checked and
found absent in the image, as Open Images' human verification does (``hvpmtl data convert`` writes
them). A manifest with the column (CSV) or the key on some line (JSONL) has negatives: its items
carry ``negatives`` (float ``C`` multi-hot), and pre-training's ``data.unannotated=unknown`` makes
every tag that is neither listed nor a negative of an image unknown to MLC for that image
(:mod:`hvpmtl.data.tags`). A tag in both lists of one image is an error.

Manifests are UTF-8 text; a byte-order mark (as Excel writes) is accepted. Tags are names; blank
ones are dropped. The vocabulary is the sorted set of names in the file (those of ``labels`` and of
``negatives``: a tag verified absent everywhere is still a class), or a given list (then an unknown
name, in either list, is an error). Problems are reported early, naming the file and line: bytes
that are not UTF-8, a malformed line, an unknown tag, a missing image (checked at construction
unless ``check_files=False``).

Images are decoded by :func:`hvpmtl.data.decode.read_image` (every PIL mode, EXIF orientation,
a pixel limit). An image that cannot be used at load time raises :class:`BadImageError` naming
the file and its manifest line (``on_bad_image="error"``), or is replaced by the next readable
sample (``"skip"``): warned once per file and process, counted in ``num_skipped`` (per process),
and appended to the run's skipped-image list when ``loading.skip_log_dir`` is set (see
:mod:`hvpmtl.data.loading` and :mod:`hvpmtl.data.skipped`). ``max_bad_in_a_row`` unreadable images
in a row (or all of them) stop the data set with a :class:`BadImageError` naming the manifest.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import Dataset

from hvpmtl.data.decode import BadImageError, read_image
from hvpmtl.data.loading import DEFAULT_LOADING, BadImages, ImageLoading, LoadingSettings

__all__ = ["BadImageError", "ImageFiles", "ImageFolderImages", "ManifestImages", "read_class_names", "read_image"]

LABEL_SEP = "|"
MAX_BAD_IN_A_ROW = 100  # under on_bad_image=skip, this many unreadable images in a row stop the data set


def read_text(path: Path) -> str:
    """A UTF-8 text file (a leading byte-order mark dropped); other bytes: ``ValueError`` naming
    the file, line and column."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        lineno = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {err.start - line_start + 1}); "
            "save the file as UTF-8"
        ) from None


def read_class_names(path: str | Path) -> list[str]:
    """Class names, one per line (blank lines and ``#`` comments skipped), in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: {path}")
    names: dict[str, int] = {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name in names:
            raise ValueError(f"{path}:{lineno}: class '{name}' repeats line {names[name]}")
        names[name] = lineno
    if not names:
        raise ValueError(f"{path}: no class names")
    return list(names)


Row = tuple[int, str, list[str], list[str]]  # line, path, tags, verified-absent tags


def _stripped(tags: Sequence[str]) -> list[str]:
    """Tag names without edge spaces; blank ones dropped."""
    return [t.strip() for t in tags if t.strip()]


def _tag_list(text: str) -> list[str]:
    return _stripped(text.split(LABEL_SEP))


def _parse_csv(path: Path) -> tuple[list[Row], bool]:
    """The rows and whether the header names a ``negatives`` column."""
    rows = []
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        cols = [c.strip() for c in header] if header else []
        if "path" not in cols or "labels" not in cols:
            raise ValueError(f"{path}:1: the header must name the columns 'path' and 'labels', got {header}")
        ip, il = cols.index("path"), cols.index("labels")
        ineg = cols.index("negatives") if "negatives" in cols else None
        for row in reader:
            lineno = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(cols):
                raise ValueError(
                    f"{path}:{lineno}: malformed line: {len(row)} fields, the header has {len(cols)} "
                    f"(labels are separated by '{LABEL_SEP}'; quote a path with a comma)"
                )
            if not row[ip].strip():
                raise ValueError(f"{path}:{lineno}: malformed line: empty path")
            negatives = _tag_list(row[ineg]) if ineg is not None else []
            rows.append((lineno, row[ip].strip(), _tag_list(row[il]), negatives))
    return rows, ineg is not None


def _parse_jsonl(path: Path) -> tuple[list[Row], bool]:
    """The rows and whether some line has the ``negatives`` key."""
    rows, has_negatives = [], False
    with io.StringIO(read_text(path), newline=None) as f:  # universal newlines, as open() reads
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: malformed line: not valid JSON ({err.msg})") from None
            except RecursionError:
                raise ValueError(f"{path}:{lineno}: malformed line: not valid JSON (nested too deeply)") from None
            ok = (
                isinstance(obj, dict)
                and isinstance(obj.get("path"), str)
                and obj["path"].strip()
                and isinstance(obj.get("labels"), list)
                and all(isinstance(t, str) for t in obj["labels"])
            )
            negatives = obj.get("negatives", []) if ok else None
            if not ok or not (isinstance(negatives, list) and all(isinstance(t, str) for t in negatives)):
                raise ValueError(
                    f"{path}:{lineno}: malformed line: expected "
                    '{"path": "<file>", "labels": ["<name>", ...]} (and optionally "negatives": ["<name>", ...]), '
                    "got " + line.strip()[:200]
                )
            has_negatives = has_negatives or "negatives" in obj
            rows.append((lineno, obj["path"].strip(), _stripped(obj["labels"]), _stripped(negatives)))
    return rows, has_negatives


class ImageFiles(LoadingSettings, Dataset):
    """Images on disk with tag-index lists, loaded as ``loading`` says (:class:`ImageLoading`: the
    ``on_bad_image`` policy, the pixel limit, reduced decoding, reading threads, the skip list).

    Items are dicts: ``image`` uint8 ``3 x H x W``, ``labels`` float ``C`` multi-hot, ``index``
    (the index actually read, which differs from the asked one after a skip); with ``negatives``
    (verified-absent tag indices per image) also ``negatives``, float ``C`` multi-hot. ``origin``
    names the listing (manifest or folder) in errors.
    """

    def __init__(
        self,
        paths: Sequence[str],
        targets: Sequence[Sequence[int]],
        classes: Sequence[str],
        loading: ImageLoading = DEFAULT_LOADING,
        sources: Sequence[str] | None = None,
        origin: str = "",
        max_bad_in_a_row: int = MAX_BAD_IN_A_ROW,
        negatives: Sequence[Sequence[int]] | None = None,
    ):
        if not isinstance(loading, ImageLoading):
            raise TypeError(f"loading={loading!r}: expected an ImageLoading (e.g. ImageLoading(on_bad_image='skip'))")
        if not paths:
            raise ValueError("no images")
        self.paths, self.targets, self.classes = list(paths), list(targets), list(classes)
        self.sources = list(sources) if sources is not None else None  # "file:line" per image
        self.negatives = [list(n) for n in negatives] if negatives is not None else None
        self.loading, self.bad_images = loading, BadImages(loading)
        self.max_bad_in_a_row = max(1, max_bad_in_a_row)
        self.origin = origin or "the image list"
        self.num_classes = len(self.classes)
        self._prefetched: dict[int, bytes] = {}
        self._pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): threads do not survive a fork

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None, "_prefetched": {}}  # pickled to spawned workers

    def file_bytes(self, i: int) -> bytes:
        """Image ``i``'s file, as stored (subclasses that keep images elsewhere, e.g. in shards, override this)."""
        return Path(self.paths[i]).read_bytes()

    def prefetch(self, indices: Sequence[int]) -> None:
        """Read the files of ``indices`` on ``io_threads`` threads, for the next :meth:`load_image`
        calls to decode: on network storage a file's latency then overlaps the others'. A file
        that cannot be read is left to ``load_image``, which names it as without prefetching."""
        if self.io_threads < 2 or len(indices) < 2:
            return
        pid = os.getpid()
        if self._pool is None or self._pool[0] != pid:
            self._pool = (pid, ThreadPoolExecutor(self.io_threads, thread_name_prefix="hvpmtl-read"))
        read = zip(indices, self._pool[1].map(self._try_file_bytes, indices), strict=True)
        self._prefetched = {i: data for i, data in read if data is not None}  # the previous batch's leftovers go

    def _try_file_bytes(self, i: int) -> bytes | None:
        try:
            return self.file_bytes(i)
        except OSError:
            return None

    def load_image(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 RGB (from :meth:`prefetch`'s bytes when it read them)."""
        data = self._prefetched.pop(i, None)
        return read_image(self.paths[i], self.loading.max_pixels, data=data, min_side=self.loading.decode_min_side)

    @property
    def num_skipped(self) -> int:
        """Bad images replaced in this process (``on_bad_image=skip``)."""
        return self.bad_images.num_skipped

    @property
    def skipped_files(self) -> set[str]:
        return self.bad_images.skipped_files

    def _where(self, i: int) -> str:
        return f"{self.sources[i]}: " if self.sources else ""

    def __getitem__(self, index: int) -> dict:
        n = len(self.paths)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        tries = min(n, self.max_bad_in_a_row)

        def exhausted(i: int, err: BadImageError) -> BadImageError:
            what = f"none of the {n} images"
            if tries < n:
                what = f"{tries} images in a row (on_bad_image=skip stops there)"
            return BadImageError(f"{self.origin}: {what} can be read, e.g. {self._where(i)}{self.paths[i]}: "
                                 f"{err.reason} (check the files and data.root)", err.reason)  # fmt: skip

        i, image = self.bad_images.first_readable(
            ((index + step) % n for step in range(tries)), lambda i: (self._where(i), self.paths[i]), self.load_image,
            exhausted,
        )  # fmt: skip
        labels = torch.zeros(self.num_classes)
        labels[list(self.targets[i])] = 1
        if self.negatives is None:
            return {"image": image, "labels": labels, "index": i}
        negatives = torch.zeros(self.num_classes)
        negatives[self.negatives[i]] = 1
        return {"image": image, "labels": labels, "index": i, "negatives": negatives}


class ManifestImages(ImageFiles):
    """Images and tags listed in a CSV or JSONL manifest (format in the module docstring).

    Args:
        manifest: the ``.csv`` or ``.jsonl`` file.
        root: folder that relative paths are under; empty = the manifest's folder.
        classes: vocabulary (a list, or a path to a file of names); None = built from the file.
        check_files: check at construction that every image file exists.
        loading: how images load (:class:`ImageLoading`: ``on_bad_image``, the pixel limit, ...).

    ``num_tagged`` is the number of images with at least one tag; ``negatives`` the verified-absent
    tag indices per image, or None when the manifest has no ``negatives`` column (key).
    """

    def __init__(
        self,
        manifest: str | Path,
        root: str | Path = "",
        classes: Sequence[str] | str | Path | None = None,
        check_files: bool = True,
        loading: ImageLoading = DEFAULT_LOADING,
    ):
        manifest = Path(manifest)
        if not manifest.is_file():
            raise FileNotFoundError(f"manifest not found: {manifest}")
        suffix = manifest.suffix.lower()
        if suffix == ".csv":
            rows, has_negatives = _parse_csv(manifest)
        elif suffix in (".jsonl", ".json", ".ndjson"):
            rows, has_negatives = _parse_jsonl(manifest)
        else:
            raise ValueError(f"{manifest}: unknown manifest format '{suffix}' (use .csv or .jsonl)")
        if not rows:
            raise ValueError(f"{manifest}: no images listed")
        if isinstance(classes, (str, Path)):
            classes = read_class_names(classes)
        given = classes is not None and len(classes) > 0
        names = list(classes) if given else sorted({t for _, _, tags, neg in rows for t in (*tags, *neg)})
        index = {name: k for k, name in enumerate(names)}
        base = Path(root) if str(root) else manifest.parent
        paths, targets, negatives, sources, missing = [], [], [], [], []
        for lineno, rel, tags, absent in rows:
            both = [t for t in absent if t in tags]
            if both:
                raise ValueError(f"{manifest}:{lineno}: tag '{both[0]}' is in both labels and negatives "
                                 "(a tag is present or verified absent, not both)")  # fmt: skip
            unknown = [t for t in (*tags, *absent) if t not in index]
            if unknown:
                raise ValueError(
                    f"{manifest}:{lineno}: unknown label '{unknown[0]}' "
                    f"(not in the given vocabulary of {len(names)} classes)"
                )
            p = Path(rel) if Path(rel).is_absolute() else base / rel
            if check_files and not p.is_file():
                missing.append((lineno, p))
            paths.append(str(p))
            targets.append(sorted({index[t] for t in tags}))
            negatives.append(sorted({index[t] for t in absent}))
            sources.append(f"{manifest}:{lineno}")
        if missing:
            lineno, p = missing[0]
            more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"{manifest}:{lineno}: image not found: {p}{more}")
        super().__init__(paths, targets, names, loading, sources, f"manifest {manifest}",
                         negatives=negatives if has_negatives else None)  # fmt: skip
        self.manifest = manifest
        self.num_tagged = sum(1 for t in targets if t)


class ImageFolderImages(ImageFiles):
    """A torchvision ``ImageFolder`` tree (``root/<class>/<image>``): one tag per image, one-hot."""

    def __init__(self, root: str | Path, loading: ImageLoading = DEFAULT_LOADING):
        from torchvision.datasets import ImageFolder

        folder = ImageFolder(str(root))  # finds classes and files; reads no image
        samples = folder.samples
        super().__init__([p for p, _ in samples], [[t] for _, t in samples], folder.classes, loading,
                         origin=f"image folder {root}")  # fmt: skip
        self.root = Path(root)
