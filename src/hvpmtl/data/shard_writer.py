"""Writing WebDataset shards: any data set as ``<prefix>-NNNNNN.tar`` files and their ``shards.json``
(the layout and how they are read: :mod:`hvpmtl.data.shards`)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hvpmtl.data.manifest import ImageFiles
from hvpmtl.data.shards import FORMAT, INDEX_NAME, OWN_SHARD_NAME, ShardIndex, plain_name_error, read_index_json


def _encode(image: torch.Tensor, fmt: str, quality: int) -> bytes:
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality) if fmt == "jpg" else pil.save(buf, format="PNG")
    return buf.getvalue()


def _source_bytes(dataset, i: int) -> tuple[bytes, str] | None:
    """The source file (or shard member) of sample ``i`` when it is a JPEG or PNG file, as stored."""
    if not isinstance(dataset, ImageFiles):
        return None
    data = dataset.file_bytes(i)
    if data[:3] == b"\xff\xd8\xff":
        return data, "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data, "png"
    return None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: same input, same bytes
    tar.addfile(info, io.BytesIO(data))


def _own_shards(index_file: Path) -> list[Path]:
    """The files an index being replaced lists that are this module's shards (``<prefix>-NNNNNN.tar``):
    the only ones deleted after an overwrite. An index naming files outside its folder is refused."""
    try:
        obj = read_index_json(index_file, check_names=False)
    except ValueError:
        return []  # not a shard index: nothing it names is deleted
    bad = plain_name_error(obj)
    if bad:
        raise ValueError(f"{index_file}: {bad}; refusing to overwrite (remove it to write new shards here)")
    return [index_file.parent / s["name"] for s in obj["shards"] if OWN_SHARD_NAME.fullmatch(s["name"])]


def write_shards(
    dataset,
    out: str | Path,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    shuffle_seed: int | None = 0,
    image_format: str = "auto",
    jpeg_quality: int = 95,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ShardIndex:
    """Write ``dataset`` (items with ``image`` uint8 ``3 x H x W`` and multi-hot ``labels``, and
    ``negatives`` where ``dataset.negatives`` is set; ``.classes``) as shards in ``out`` (layout in
    :mod:`hvpmtl.data.shards`); returns their index.

    ``image_format``: ``auto`` (copy JPEG/PNG source files, encode the rest as PNG), ``png`` or
    ``jpg``. Images a source skips (``data.on_bad_image=skip``) are left out and counted in the
    returned index's ``skipped``. ``overwrite`` replaces an earlier index and its shards (of the
    files it lists, only ``<prefix>-NNNNNN.tar`` ones are deleted), or ``<prefix>-*.tar`` files
    without an index (another tool's?), which are refused otherwise.
    """
    if image_format not in ("auto", "png", "jpg"):
        raise ValueError(f"image_format={image_format!r}: choose auto, png or jpg")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise ValueError(f"prefix={prefix!r}: use letters, digits, '_', '.' and '-'")
    from hvpmtl.files import atomic_write

    out = Path(out)
    index_file = out / INDEX_NAME
    old: list[Path] = []
    if index_file.exists():
        if not overwrite:
            raise FileExistsError(f"{index_file} exists (pass --overwrite to replace those shards)")
        old = _own_shards(index_file)
        index_file.unlink()  # no index may list shards being rewritten
    elif not overwrite and (found := sorted(out.glob(f"{prefix}-*.tar"))):
        more = f" and {len(found) - 1} more {prefix}-*.tar files" if len(found) > 1 else ""
        raise FileExistsError(f"{out} holds {found[0].name}{more} but no {INDEX_NAME}: files of another tool? "
                              "(pass --overwrite to replace them)")  # fmt: skip
    classes, n = list(dataset.classes), len(dataset)
    has_negatives = getattr(dataset, "negatives", None) is not None  # then every sample lists them, maybe none
    order = np.arange(n) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(n)
    width = max(8, len(str(n - 1)))
    shards, skipped, tagged, untagged = [], 0, 0, 0
    for start in range(0, n, samples_per_shard):
        name = f"{prefix}-{len(shards):06d}.tar"
        written = 0

        def write(f, chunk=order[start : start + samples_per_shard]) -> None:
            nonlocal written, skipped, tagged, untagged
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for i in map(int, chunk):
                    sample = dataset[i]
                    if int(sample.get("index", i)) != i:  # the source substituted an unreadable image
                        skipped += 1
                        continue
                    raw = _source_bytes(dataset, i) if image_format == "auto" else None
                    fmt = "png" if image_format == "auto" else image_format
                    data, ext = raw or (_encode(sample["image"], fmt, jpeg_quality), fmt)
                    names = [classes[k] for k in torch.nonzero(sample["labels"] > 0).flatten().tolist()]
                    meta = {"labels": names, "index": i}
                    if has_negatives:
                        absent = torch.nonzero(sample["negatives"] > 0).flatten().tolist()
                        meta["negatives"] = [classes[k] for k in absent]
                    key = f"{i:0{width}d}"
                    _add(tar, f"{key}.{ext}", data)
                    _add(tar, f"{key}.json", json.dumps(meta).encode())
                    written += 1
                    tagged += bool(names)
                    untagged += not names and not meta.get("negatives")

        atomic_write(out / name, write)
        if written:
            shards.append({"name": name, "samples": written})
        else:
            (out / name).unlink()
        if progress is not None:
            progress(f"{name}: {written} samples ({min(start + samples_per_shard, n)}/{n} read)")
    if not shards:
        raise ValueError(f"no sample could be written ({skipped} unreadable images skipped)")
    total = sum(s["samples"] for s in shards)
    meta = {"format": FORMAT, "version": 1, "classes": classes, "shards": shards, "samples": total,
            "num_tagged": tagged, "num_untagged": untagged, "negatives": has_negatives,
            "shuffle_seed": shuffle_seed}  # fmt: skip
    listing = ",\n".join("  " + json.dumps(s) for s in shards)  # one line per shard
    text = json.dumps(meta | {"shards": 0}).replace('"shards": 0', f'"shards": [\n{listing}\n ]') + "\n"
    atomic_write(index_file, lambda f: f.write(text.encode()))
    for path in set(old) - {out / s["name"] for s in shards}:
        path.unlink(missing_ok=True)
    return ShardIndex([out / s["name"] for s in shards], [s["samples"] for s in shards], classes,
                      str(index_file), tagged, skipped=skipped, has_negatives=has_negatives,
                      num_untagged=untagged)  # fmt: skip
