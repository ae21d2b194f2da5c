"""The data sources ``data.dataset`` names, in one registry: a builder per name, registered with
:func:`register_source`.

A builder is ``build(cfg, split, img_size, loading) -> Dataset``: ``cfg`` the ``data`` block
(:class:`~hvpmtl.data.config.DataConfig`), ``split`` one of :data:`SPLITS`, ``img_size`` the side
of generated images, ``loading`` the :class:`~hvpmtl.data.loading.ImageLoading` every file-backed
reader is built with. The names and the source-specific keys each source reads are declared once,
in :mod:`hvpmtl.data.config` (``DATASETS``, ``SOURCE_SPECIFIC_KEYS``; that module stays light, as the
config loader imports it): :func:`register_source` refuses a name not declared there, and
:func:`registered_source` one without a builder.

This module registers the built-in sources; :mod:`hvpmtl.data.formats` registers the users'
formats (``coco``, ``voc``, ``openimages``, ``tencent``) the same way.

>>> @register_source("synthetic")
... def synthetic(cfg, split, img_size, loading):
...     return SyntheticScenes(...)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from hvpmtl.data.config import DATASETS, SOURCE_SPECIFIC_KEYS, DataConfig
from hvpmtl.data.fmnist import DEFAULT_ROOT as FMNIST_ROOT
from hvpmtl.data.fmnist import FashionMNISTItems, FashionMNISTMosaic
from hvpmtl.data.loading import ImageLoading
from hvpmtl.data.manifest import ImageFolderImages, ManifestImages, read_class_names
from hvpmtl.data.synthetic import SyntheticScenes

__all__ = ["SPLITS", "Source", "register_source", "registered_source", "registered_sources", "vocabulary"]

SPLITS = {"train": 0, "val": 1, "test": 2}  # also the stream of generated data sets

Builder = Callable[[DataConfig, str, int, ImageLoading], Dataset]


@dataclass(frozen=True)
class Source:
    """One ``data.dataset`` value: its builder and the source-specific ``data.*`` keys it reads."""

    name: str
    build: Builder
    keys: tuple[str, ...]


_SOURCES: dict[str, Source] = {}


def source_keys(name: str) -> tuple[str, ...]:
    """The source-specific keys ``data.dataset=name`` reads (``SOURCE_SPECIFIC_KEYS``, in its order)."""
    return tuple(k for k, names in SOURCE_SPECIFIC_KEYS.items() if name in names)


def register_source(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``build`` makes the data of ``data.dataset=name`` (a name of ``DATASETS``)."""

    def register(build: Builder) -> Builder:
        if name not in DATASETS:
            raise ValueError(f"register_source({name!r}): not a data.dataset value (declare it, and the keys it "
                             "reads, in hvpmtl.data.config: DATASETS, SOURCE_SPECIFIC_KEYS)")  # fmt: skip
        old = _SOURCES.get(name)
        if old is not None and (old.build.__module__, old.build.__qualname__) != (build.__module__, build.__qualname__):
            raise ValueError(f"register_source({name!r}): registered already by {old.build.__module__}")
        _SOURCES[name] = Source(name, build, source_keys(name))
        return build

    return register


def registered_sources() -> dict[str, Source]:
    """The registered sources, ``name -> Source``, in ``DATASETS`` order."""
    return {n: _SOURCES[n] for n in DATASETS if n in _SOURCES}


def registered_source(name: str) -> Source:
    """The source ``data.dataset=name`` builds from; ``ValueError`` naming the key when there is none."""
    if name not in DATASETS:
        raise ValueError(f"data.dataset: unknown '{name}' (choose from {', '.join(DATASETS)})")
    if name not in _SOURCES:
        raise ValueError(f"data.dataset={name}: no builder registered for it (hvpmtl.data.sources.register_source)")
    return _SOURCES[name]


def vocabulary(cfg: DataConfig) -> list[str] | None:
    """The given vocabulary (``data.classes_file`` or ``data.classes``), None when the data gives it."""
    if cfg.classes_file:
        try:
            return read_class_names(cfg.classes_file)
        except (OSError, ValueError) as err:
            raise ValueError(f"data.classes_file: {err}") from err
    return list(cfg.classes) or None


def listed_file(cfg: DataConfig, split: str, train_key: str, val_key: str) -> Path:
    """The listing ``data.<train_key>`` (train) or ``data.<val_key>`` (val, test) names, checked to
    exist, with ``data.root`` when it is set."""
    key = train_key if split == "train" else val_key
    path = getattr(cfg, key)
    if not path:
        raise ValueError(f"data.{key}: not set (the {split} split of data.dataset={cfg.dataset} reads it)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"data.{key}: file not found: {path}")
    if cfg.root and not Path(cfg.root).is_dir():
        raise FileNotFoundError(f"data.root: folder not found: {cfg.root}")
    return Path(path)


def _generated(cfg: DataConfig, split: str) -> tuple[int, int, float]:
    """``(size, stream, label noise)`` of a generated split: noise on the train split only."""
    size = cfg.train_size if split == "train" else cfg.val_size
    return size, SPLITS[split], cfg.label_noise if split == "train" else 0.0


@register_source("synthetic")
def _synthetic(cfg: DataConfig, split: str, img_size: int, loading: ImageLoading) -> Dataset:
    size, stream, noise = _generated(cfg, split)
    return SyntheticScenes(size, img_size, cfg.seed, stream, noise, tags=cfg.synthetic_tags)


def _fmnist_root(cfg: DataConfig) -> str:
    root = cfg.root or FMNIST_ROOT
    if not Path(root).is_dir():
        raise FileNotFoundError(
            f"data.root: folder not found: {root} ({cfg.dataset} needs the Fashion-MNIST IDX files; "
            "on Debian/Ubuntu: apt-get install dataset-fashion-mnist)"
        )
    return root


@register_source("fmnist-mosaic")
def _fmnist_mosaic(cfg: DataConfig, split: str, img_size: int, loading: ImageLoading) -> Dataset:
    root = _fmnist_root(cfg)
    size, stream, noise = _generated(cfg, split)
    try:
        return FashionMNISTMosaic(root, split, size, img_size, cfg.seed, stream, noise)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.root: {err}") from err


@register_source("fmnist")
def _fmnist(cfg: DataConfig, split: str, img_size: int, loading: ImageLoading) -> Dataset:
    root = _fmnist_root(cfg)
    try:
        return FashionMNISTItems(root, split, _generated(cfg, split)[0], img_size, cfg.item_scale)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.root: {err}") from err


@register_source("emoji")
def _emoji(cfg: DataConfig, split: str, img_size: int, loading: ImageLoading) -> Dataset:
    from hvpmtl.data.emoji import EmojiScenes  # Pillow's font code only where asked for

    size, stream, noise = _generated(cfg, split)
    return EmojiScenes(split, size, img_size, cfg.seed, stream, noise, cfg.emoji_min_count)


@register_source("manifest")
def _manifest(cfg: DataConfig, split: str, img_size: int, loading: ImageLoading) -> Dataset:
    path = listed_file(cfg, split, "manifest", "val_manifest")
    return ManifestImages(path, cfg.root, vocabulary(cfg), cfg.check_files, loading)


@register_source("imagefolder")
def _imagefolder(cfg: DataConfig, split: str, img_size: int, loading: ImageLoading) -> Dataset:
    root = Path(cfg.root)
    if not cfg.root or not root.is_dir():
        raise FileNotFoundError(f"data.root: folder not found: {cfg.root!r} (data.dataset=imagefolder)")
    if (root / split).is_dir():
        root = root / split
    elif split != "train":
        raise FileNotFoundError(f"data.root: no '{split}' folder in {cfg.root} (data.dataset=imagefolder)")
    try:
        ds = ImageFolderImages(root, loading)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.root: {err}") from err
    vocab = vocabulary(cfg)
    if vocab is not None and vocab != ds.classes:
        raise ValueError(f"data.classes: {vocab} differ from the class folders of {root}: {ds.classes}")
    return ds


@register_source("shards")
def _shards(cfg: DataConfig, split: str, img_size: int, loading: ImageLoading) -> Dataset:
    from hvpmtl.data.shards import ShardImages, load_shard_index

    key = "shards" if split == "train" else "val_shards"
    index = load_shard_index(getattr(cfg, key), f"data.{key}", vocabulary(cfg))
    return ShardImages(index, loading)
