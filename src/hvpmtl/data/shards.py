"""WebDataset shards: any data set written as tar files, and read back by random access.

A shard folder (what :func:`hvpmtl.data.shard_writer.write_shards` and ``hvpmtl data shard`` write):

* ``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ...: ``samples_per_shard`` samples each
  (the last one may hold fewer). A sample is two tar members sharing a key, the source index
  zero-padded: ``00000042.jpg`` (or ``.png``), the image file, and ``00000042.json``,
  ``{"labels": ["dog", "grass"], "index": 42}``, with ``"negatives": ["cat"]`` (tags verified
  absent; on every sample) when the source lists them (a manifest's ``negatives``, Open Images).
  The WebDataset library and any tar tool read them.
* ``shards.json``: ``{"format": "hvpmtl-shards", "version": 1, "classes": [...], "shards":
  [{"name": "train-000000.tar", "samples": 1000}, ...], "samples": N, "num_tagged": T,
  "num_untagged": U, "negatives": false, "shuffle_seed": 0}``: the vocabulary and the sample count
  of every shard, so that a reader can plan an epoch without opening a tar (``num_untagged``:
  samples with neither a label nor a negative; ``negatives``: whether the samples list them). A
  name is a plain file name in the index's folder (no ``/``, no ``..``); an index naming other
  files is refused.

Samples are written in a seeded random order (``shuffle_seed``; ``None`` keeps the source
order), as WebDataset's authors advise: a streaming reader then mixes classes even when the
source is sorted (an image folder is). Images of a file-based source that are already JPEG or
PNG are copied byte for byte (``image_format="auto"``), so a shard decodes to exactly what the
source decodes to; other images are encoded as PNG (lossless) or JPEG. Every shard and the
index are written atomically (a crash leaves no half file).

Reading: ``data.shards`` names a shard folder, its ``shards.json``, or a brace pattern of local
``.tar`` files (``/data/train-{000000..000099}.tar``; counted, their samples checked and their
labels read at start when no ``shards.json`` beside them lists them). A sample needs an image
member and a ``.json`` one; a link member is refused (WebDataset skips links).
:class:`ShardImages` reads samples by random access (seek to the member) for evaluation and
conversion; pre-training streams them with :class:`hvpmtl.data.shard_stream.ShardStream`. Only
local files are read.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hvpmtl.data.decode import BadImageError, read_image
from hvpmtl.data.loading import DEFAULT_LOADING, ImageLoading
from hvpmtl.data.manifest import ImageFiles
from hvpmtl.reprs import short_repr

__all__ = ["INDEX_NAME", "ShardError", "ShardImages", "ShardIndex", "load_shard_index", "scan_shard"]

INDEX_NAME = "shards.json"
FORMAT = "hvpmtl-shards"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # WebDataset's key/extension split: up to the first dot
OWN_SHARD_NAME = re.compile(r"[A-Za-z0-9_.-]+-[0-9]{6}\.tar")  # the names write_shards gives its shards


class ShardError(BadImageError):
    """A shard sample or file cannot be used; a :class:`BadImageError`, so that one raised in a loader
    worker comes back as its one-line message (the CLI exits with status 2)."""


@dataclass
class ShardIndex:
    """The shards of one split, in order: ``paths``, their sample ``counts`` and the vocabulary.
    ``origin`` (the ``shards.json`` or the pattern) names them in errors."""

    paths: list[Path]
    counts: list[int]
    classes: list[str]
    origin: str
    num_tagged: int | None = None  # samples with at least one label, when the index says
    labels: dict[int, list[list[str]]] = field(default_factory=dict, repr=False)  # shard -> labels, when scanned
    skipped: int = 0  # write_shards: unreadable source images left out
    has_negatives: bool = False  # the samples list verified-absent tags ("negatives")
    num_untagged: int | None = None  # samples with neither a label nor a negative, when known
    negatives: dict[int, list[list[str]]] = field(default_factory=dict, repr=False)  # as labels

    @property
    def may_be_untagged(self) -> bool:
        """Whether some sample may have neither a label nor a negative (True when the index does not say)."""
        if self.num_untagged is not None:
            return self.num_untagged > 0
        if self.num_tagged is not None and not self.has_negatives:
            return self.num_tagged < self.total
        return True

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    @property
    def offsets(self) -> np.ndarray:
        """Position of each shard's first sample in the index order (``len(paths) + 1`` values)."""
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)


def split_key(name: str) -> tuple[str, str] | None:
    """``"00000042.jpg"`` -> ``("00000042", "jpg")`` (WebDataset's rule); None for a name without a dot."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def scan_shard(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The samples of one tar in member order: ``(key, {extension: (data offset, size)})``
    (reads the headers only: the tar is seeked through)."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if (m.issym() or m.islnk()) and split_key(m.name) is not None:  # WebDataset skips links too
                    raise ShardError(f"{path}: member {short_repr(m.name)} is a link, not a file "
                                     "(a shard holds each sample's files themselves)")  # fmt: skip
                kx = split_key(m.name) if m.isreg() else None
                if kx is None or os.path.basename(m.name).startswith("__"):
                    continue
                key, ext = kx
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{path}: not a readable tar file ({err})") from None
    return samples


def image_member(path: Path | str, key: str, members: Sequence[str]) -> str:
    """The image extension among a sample's ``members``; :class:`ShardError` naming the shard and key."""
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return ext
    found = ", ".join(sorted(m for m in members if not m.startswith("__")))  # not WebDataset's __key__, __url__
    raise ShardError(f"{path}: sample '{key}' has no image member ({found}; "
                     f"expected one of {', '.join(IMAGE_EXTENSIONS)})")  # fmt: skip


def parse_labels(data: bytes, where: str) -> tuple[list[str], list[str] | None, int | None]:
    """``(label names, negative names or None, source index or None)`` from a sample's JSON;
    :class:`ShardError` naming ``where``."""
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{where}: not valid JSON ({err})") from None
    except RecursionError:
        raise ShardError(f"{where}: not valid JSON (nested too deeply)") from None
    labels = obj.get("labels") if isinstance(obj, dict) else None
    negatives = obj.get("negatives", []) if isinstance(obj, dict) else None
    ok = isinstance(labels, list) and all(isinstance(t, str) for t in labels)
    if not ok or not (isinstance(negatives, list) and all(isinstance(t, str) for t in negatives)):
        raise ShardError(f'{where}: expected {{"labels": ["<name>", ...], "index": <int>}} (and optionally '
                         f'"negatives": ["<name>", ...]), got {str(obj)[:200]}')  # fmt: skip
    both = [t for t in negatives if t in labels]
    if both:
        raise ShardError(f"{where}: tag '{both[0]}' is in both labels and negatives")
    index = obj.get("index")
    index = index if isinstance(index, int) and not isinstance(index, bool) else None
    return labels, negatives if "negatives" in obj else None, index


def plain_name_error(obj: dict) -> str | None:
    """Why an index's names are refused (a reader would open, an overwrite delete, other files), or None."""
    for k, s in enumerate(obj["shards"]):
        name = s["name"]
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
            return f"shards[{k}] names {short_repr(name)}, not a plain file name in its folder (no '/' or '..')"
    return None


def read_index_json(path: Path, check_names: bool = True) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    ok = isinstance(obj, dict) and obj.get("format") == FORMAT and isinstance(obj.get("shards"), list)
    ok = ok and isinstance(obj.get("classes"), list) and all(isinstance(c, str) for c in obj["classes"])
    ok = ok and all(isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("samples"), int)
                    and s["samples"] > 0 for s in obj["shards"])  # fmt: skip
    if not ok or not obj["shards"]:
        raise ValueError(f"{path}: not a shard index (expected format '{FORMAT}', classes and a non-empty "
                         'shards list of {"name", "samples"}; hvpmtl data shard writes one)')  # fmt: skip
    bad = plain_name_error(obj) if check_names else None
    if bad:
        raise ValueError(f"{path}: {bad}")
    return obj


def _expand(pattern: str, key: str) -> list[str]:
    try:
        from braceexpand import braceexpand
    except ImportError:  # comes with webdataset
        raise ValueError(f"{key}={pattern}: patterns need the 'shards' extra: pip install 'hvpmtl[shards]'") from None
    return list(braceexpand(pattern))


def load_shard_index(spec: str, key: str = "data.shards", classes: Sequence[str] | None = None) -> ShardIndex:
    """The shards ``spec`` names (a folder with ``shards.json``, that file, or a brace pattern).

    ``classes`` replaces the stored vocabulary (labels outside it are errors when read).
    Missing files raise ``FileNotFoundError`` and malformed ones ``ValueError``, naming ``key``.
    """
    if not spec:
        raise ValueError(f"{key}: not set (a folder with {INDEX_NAME}, or a pattern like x-{{000000..000009}}.tar)")
    given = Path(spec)
    if given.is_dir() or given.suffix == ".json":
        file = given / INDEX_NAME if given.is_dir() else given
        if not file.is_file():
            raise FileNotFoundError(f"{key}: {file} not found (write shards with: hvpmtl data shard --out DIR)")
        try:
            obj = read_index_json(file)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
        paths = [file.parent / s["name"] for s in obj["shards"]]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"{key}: {file} lists {missing[0].name}, which is not in {file.parent}{more}")
        tagged, untagged = obj.get("num_tagged"), obj.get("num_untagged")
        return ShardIndex(paths, [s["samples"] for s in obj["shards"]], list(classes or obj["classes"]), str(file),
                          tagged if isinstance(tagged, int) and not classes else None,
                          has_negatives=obj.get("negatives") is True,
                          num_untagged=untagged if isinstance(untagged, int) and not classes else None)  # fmt: skip
    paths = [Path(p) for p in _expand(spec, key)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{key}: {missing[0]} not found ({len(missing)} of the {len(paths)} files of {spec})")
    return _scan_pattern(paths, spec, key, classes)


def _scan_pattern(paths: list[Path], spec: str, key: str, classes: Sequence[str] | None) -> ShardIndex:
    """Counts (and, without a listing ``shards.json``, labels) of pattern-named shards."""
    beside = paths[0].parent / INDEX_NAME
    if beside.is_file():
        obj = read_index_json(beside)
        listed = {(beside.parent / s["name"]).resolve(): s["samples"] for s in obj["shards"]}
        if all(p.resolve() in listed for p in paths):
            return ShardIndex(paths, [listed[p.resolve()] for p in paths], list(classes or obj["classes"]), spec,
                              has_negatives=obj.get("negatives") is True)  # fmt: skip
    counts, labels, negatives, names = [], {}, {}, set()
    for s, path in enumerate(paths):
        members = scan_shard(path)
        if not members:
            raise ValueError(f"{key}: {path} holds no samples")
        counts.append(len(members))
        labels[s], negatives[s] = [], []
        with open(path, "rb") as f:
            for k, exts in members:
                image_member(path, k, exts)  # here, before a run starts, rather than when the stream reaches it
                if "json" not in exts:
                    raise ValueError(f"{key}: {path}: sample '{k}' has no .json member (its labels)")
                f.seek(exts["json"][0])
                tags, absent, _ = parse_labels(f.read(exts["json"][1]), f"{path}: {k}.json")
                labels[s].append(tags)
                negatives[s].append(absent)
                names.update(tags, absent or ())
    tagged = sum(1 for per in labels.values() for t in per if t)
    pairs = [(t, n) for s in labels for t, n in zip(labels[s], negatives[s], strict=True)]
    has_negatives = any(n is not None for _, n in pairs)
    untagged = sum(1 for t, n in pairs if not t and not n)
    negatives = {s: [n or [] for n in per] for s, per in negatives.items()} if has_negatives else {}
    return ShardIndex(paths, counts, list(classes or sorted(names)), spec, tagged, labels,
                      has_negatives=has_negatives, num_untagged=untagged, negatives=negatives)  # fmt: skip


class ShardImages(ImageFiles):
    """The samples of a :class:`ShardIndex` by random access (seek to the member): items as
    :class:`~hvpmtl.data.manifest.ImageFiles` (``image``, ``labels``, ``index``: the position in
    the index order; ``negatives`` where the index has them) loaded as ``loading`` says; errors
    name ``shard.tar:key.ext``.
    Construction reads every tar header and label (seconds for ~10^5 samples)."""

    def __init__(self, index: ShardIndex, loading: ImageLoading = DEFAULT_LOADING):
        vocab = {name: k for k, name in enumerate(index.classes)}
        paths, targets, negatives, self.locations = [], [], [], []
        for s, path in enumerate(index.paths):
            members = scan_shard(path)
            if len(members) != index.counts[s]:
                raise ValueError(f"{path}: {len(members)} samples, {index.origin} lists {index.counts[s]}")
            with open(path, "rb") as f:
                for j, (key, exts) in enumerate(members):
                    ext = image_member(path, key, exts)
                    where = f"{path}:{key}.{ext}"
                    if s in index.labels:
                        tags, absent = index.labels[s][j], index.negatives[s][j] if index.negatives else None
                    elif "json" not in exts:
                        raise ValueError(f"{path}: sample '{key}' has no .json member (its labels)")
                    else:
                        f.seek(exts["json"][0])
                        tags, absent, _ = parse_labels(f.read(exts["json"][1]), f"{path}:{key}.json")
                    absent = absent or []
                    unknown = [t for t in (*tags, *absent) if t not in vocab]
                    if unknown:
                        raise ValueError(f"{where}: unknown label '{unknown[0]}' (not in the {len(vocab)} classes)")
                    paths.append(where)
                    targets.append(sorted({vocab[t] for t in tags}))
                    negatives.append(sorted({vocab[t] for t in absent}))
                    self.locations.append((s, *exts[ext]))
        super().__init__(paths, targets, index.classes, loading, None, f"shards {index.origin}",
                         negatives=negatives if index.has_negatives else None)  # fmt: skip
        self.shard_paths = list(index.paths)
        self.num_tagged = sum(1 for t in targets if t)

    def raw_bytes(self, i: int) -> bytes:
        """Sample ``i``'s image member, as stored."""
        s, offset, size = self.locations[i]
        with open(self.shard_paths[s], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def file_bytes(self, i: int) -> bytes:
        return self.raw_bytes(i)

    def load_image(self, i: int) -> torch.Tensor:
        data = self._prefetched.pop(i, None) or self.raw_bytes(i)
        return read_image(self.paths[i], self.loading.max_pixels, data=data, min_side=self.loading.decode_min_side)
