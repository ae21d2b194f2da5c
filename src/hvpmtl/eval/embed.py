"""Embeddings: one feature vector per image of a folder, a manifest or any data source, from a
run's backbone (``hvpmtl embed`` and ``hvpmtl.embed``).

Images go through the run's evaluation transform (resize the short side to ``img_size /
eval_crop_pct``, centre crop, the run's mean and std), as ``knn`` and ``linprobe`` see them, and
features are :func:`hvpmtl.eval.features.backbone_features` of that kind (``mean`` of the feature
map by default). Under torchrun each process embeds a contiguous shard and every process gets all
rows, in data order. Each row is named by its file (relative to the folder, or as the manifest
lists it) or, for generated sources, ``<dataset>:<split>:<index>``.

Files, by the extension of ``out``:

* ``.safetensors``: tensor ``features`` (N x D float32); metadata ``paths`` (a JSON list) and
  ``run``, ``part``, ``feature``, ``img_size``;
* ``.npy``: the features, with the names in ``<out>.paths.txt``, one per line;
* ``.parquet``: columns ``path`` and ``features`` (a list per row; needs ``pyarrow``).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from hvpmtl.config import ConfigError
from hvpmtl.data import EvalTransform
from hvpmtl.data.config import DataConfig
from hvpmtl.data.loading import ImageLoading
from hvpmtl.data.manifest import ImageFiles, ManifestImages
from hvpmtl.engine.distributed import DistEnv
from hvpmtl.eval.config import FEATURES
from hvpmtl.eval.features import extract_features
from hvpmtl.files import atomic_write
from hvpmtl.runs import Run, build_masked_backbone

FORMATS = (".safetensors", ".npy", ".parquet")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass
class Embeddings:
    """``features`` (N x D float32) of the images named ``paths``, in data order."""

    features: torch.Tensor
    paths: list[str]
    meta: dict[str, str] = field(default_factory=dict)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write to ``out`` in the format its extension names (module docstring); never replaces a
        file unless ``overwrite``."""
        out = Path(out)
        check_output(out, overwrite)
        if out.suffix == ".safetensors":
            from safetensors.torch import save

            meta = {**self.meta, "paths": json.dumps(self.paths)}
            blob = save({"features": self.features.contiguous()}, metadata=meta)
            atomic_write(out, lambda f: f.write(blob))
        elif out.suffix == ".npy":
            import numpy as np

            buf = io.BytesIO()
            np.save(buf, self.features.numpy())
            atomic_write(out, lambda f: f.write(buf.getvalue()))
            names = "".join(f"{p}\n" for p in self.paths).encode()
            atomic_write(paths_file(out), lambda f: f.write(names))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"path": self.paths, "features": self.features.tolist()})
            buf = io.BytesIO()
            pq.write_table(table, buf)
            atomic_write(out, lambda f: f.write(buf.getvalue()))
        return out


def paths_file(out: Path) -> Path:
    """The names beside a ``.npy`` file of features."""
    return out.with_name(out.name + ".paths.txt")


def check_output(out: Path, overwrite: bool = False) -> None:
    """A usable output file: a known format (and, for parquet, pyarrow), not an existing file
    unless ``overwrite``. Checked before any work."""
    if out.suffix not in FORMATS:
        raise ConfigError(f"--out {out}: unknown format '{out.suffix}'; give a file ending in {', '.join(FORMATS)}")
    if out.suffix == ".parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ConfigError(f"--out {out}: .parquet needs the pyarrow package: pip install pyarrow") from None
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a file")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out}: exists; pass --overwrite to replace it")


class _Transformed(Dataset):
    """``(image, 0)`` pairs of an image reader's items through the evaluation transform."""

    def __init__(self, base: ImageFiles, transform: EvalTransform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.base[i]["image"]), torch.zeros(1)


def folder_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively), sorted; a folder without any is an error."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
    return files


def image_dataset(
    data: str | Path, transform: EvalTransform, loading: ImageLoading, root: str | Path = ""
) -> tuple[Dataset, list[str]]:
    """A folder or manifest (its paths relative to ``root``, by default its own folder) as
    ``(dataset of (image, 0), names)``."""
    path = Path(data)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder (give an image folder or a .csv/.jsonl manifest)")
    if path.is_dir():
        files = folder_images(path)
        reader = ImageFiles([str(f) for f in files], [[] for _ in files], [], loading, origin=f"image folder {path}")
        return _Transformed(reader, transform), [f.relative_to(path).as_posix() for f in files]
    if path.suffix not in MANIFEST_SUFFIXES:
        raise ConfigError(f"{path}: not a folder or a .csv/.jsonl manifest")
    try:
        reader = ManifestImages(path, root, loading=loading)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    base = Path(root) if str(root) else path.parent
    names = [_relative(Path(p), base) for p in reader.paths]
    return _Transformed(reader, transform), names


def _relative(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


def source_dataset(data: DataConfig, img_size: int, split: str, limit: int = 0) -> tuple[Dataset, list[str]]:
    """Any registered data source's ``split`` as ``(dataset of (image, labels), names)``."""
    from hvpmtl.eval.frozen import eval_images

    dataset = eval_images(data, img_size, split, limit)
    return dataset, [f"{data.dataset}:{split}:{i:06d}" for i in range(len(dataset))]


def embed(
    run: str | Path | Run,
    data: str | Path | DataConfig,
    *,
    part: str = "student",
    feature: str = "mean",
    split: str = "val",
    root: str | Path = "",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    env: DistEnv | None = None,
    progress: bool = False,
) -> Embeddings:
    """The features of every image of ``data`` (a folder, a ``.csv``/``.jsonl`` manifest, or a
    :class:`DataConfig` of any source, whose ``split`` is read) under ``run``'s ``part`` backbone;
    a manifest's paths are relative to ``root`` (by default the manifest's folder).

    >>> emb = hvpmtl.embed("runs/cpu-tiny", "photos/")
    >>> emb.features.shape, emb.paths[:2]
    """
    kinds = [k for k in FEATURES if k != "pixels"]
    if feature not in kinds:
        raise ConfigError(f"feature: expected one of {', '.join(kinds)}, got '{feature}'")
    run = run if isinstance(run, Run) else Run(run)
    weights = run.weights(part)
    run_data = DataConfig(**{k: v for k, v in ((weights.pretrain or {}).get("data") or {}).items()
                             if k in ("eval_crop_pct", "mean", "std")})  # fmt: skip
    img_size = weights.backbone.img_size
    transform = EvalTransform(img_size, run_data.eval_crop_pct, run_data.mean, run_data.std)
    if isinstance(data, DataConfig):  # the run's preprocessing, whatever the source's own
        data = replace(data, eval_crop_pct=run_data.eval_crop_pct, mean=run_data.mean, std=run_data.std)
        dataset, names = source_dataset(data, img_size, split)
    else:
        dataset, names = image_dataset(data, transform, ImageLoading(), root)
    backbone = build_masked_backbone(weights)
    features, _ = extract_features(backbone, dataset, feature, batch_size, num_workers, device, env=env,
                                   progress=progress, desc="embed")  # fmt: skip
    meta = {"run": str(run.folder), "part": weights.part, "feature": feature, "img_size": str(img_size),
            "weights": weights.label}  # fmt: skip
    return Embeddings(features, names, meta)
