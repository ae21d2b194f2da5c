"""Data configuration: which data set, its size, and how views are made."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, replace

from hvpmtl.reprs import short_repr

# The data.dataset values, declared here beside the keys (checking a config needs no reader), each built by
# the builder registered for it in hvpmtl.data.sources (register_source refuses a name not listed here;
# tests/data/test_sources.py checks that every name has one, and SOURCE_SPECIFIC_KEYS names only these).
FORMATS = ("coco", "voc", "openimages", "tencent")  # readers in hvpmtl.data.formats
DATASETS = ("synthetic", "manifest", "imagefolder", "fmnist-mosaic", "fmnist", "emoji", *FORMATS, "shards")
BAD_IMAGE_POLICIES = ("error", "skip")
UNKNOWN_POLICIES = ("unknown", "negative")  # data.untagged, data.unannotated: what a missing tag means to MLC
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_GENERATED = ("synthetic", "fmnist-mosaic", "emoji")
_FILES = ("manifest", "imagefolder", *FORMATS)  # image files read one by one (hvpmtl.data.manifest.ImageFiles)
_VOCABULARY = (*_FILES, "shards")  # sources whose classes come from the data (or a given vocabulary)
# Each source-specific key -> the data.dataset values it has an effect with (the builders of
# hvpmtl.data.sources and the readers they call; Source.keys is this table read per source); every other
# data.* key applies to any source. A key set (its value differs from
# the default) for a source that does not read it is refused (check_source_keys) instead of ignored.
SOURCE_SPECIFIC_KEYS: dict[str, tuple[str, ...]] = {
    "manifest": ("manifest",),
    "val_manifest": ("manifest",),
    "annotations": FORMATS,
    "val_annotations": FORMATS,
    "dictionary": ("openimages", "tencent"),
    "min_confidence": ("openimages", "tencent"),
    "voc_difficult": ("voc",),
    "missing_images": FORMATS,
    "shards": ("shards",),
    "val_shards": ("shards",),
    "shard_streams": ("shards",),
    "shard_shuffle": ("shards",),
    "root": (*_FILES, "fmnist-mosaic", "fmnist"),
    "classes": _VOCABULARY,
    "classes_file": _VOCABULARY,
    "check_files": ("manifest", *FORMATS),
    "on_bad_image": _VOCABULARY,
    "max_image_pixels": _VOCABULARY,
    "reduced_decode": _VOCABULARY,
    "io_threads": _FILES,
    "seed": _GENERATED,
    "train_size": (*_GENERATED, "fmnist"),
    "val_size": (*_GENERATED, "fmnist"),
    "label_noise": _GENERATED,
    "item_scale": ("fmnist",),
    "synthetic_tags": ("synthetic",),
    "emoji_min_count": ("emoji",),
    # sources where an image may have no tag (imagefolder and fmnist: every image has its class;
    # openimages: data.unannotated instead); generated sets: with tagged_fraction < 1 (or label noise)
    "untagged": ("manifest", "shards", "coco", "voc", "tencent", *_GENERATED),
    # sources with verified negatives (manifest, shards: when they list them; hvpmtl.data.tags checks)
    "unannotated": ("openimages", "manifest", "shards"),
    "tagged_fraction": _GENERATED,
}


@dataclass
class DataConfig:
    """Where images come from and how the two views (one patch-masked) are generated.

    The paper names the augmentations (random resized crop, colour jitter, random rotation,
    RandAugment) but not their strengths; the defaults below follow the methods it cites:
    crop scale (0.67, 1) and ratio (3/4, 4/3) from SimMIM (large crops keep most of an image's
    tags true), RandAugment n2 m9 on timm's 0-10 scale with magnitude noise 0.5 (SimMIM's
    ``rand-m9-mstd0.5``: 90 % of each op's maximum, e.g. 27 degrees of rotation) with both ops
    always applied (timm's policy runs each with probability 0.5: ``rand_augment_op_prob``),
    timm's colour jitter 0.4. docs/method.md lists each choice.
    """

    dataset: str = "synthetic"  # synthetic | manifest | imagefolder | fmnist-mosaic | fmnist (single items) | emoji
    # | coco | voc | openimages | tencent (users' formats) | shards (WebDataset tars, hvpmtl.data.shards)
    root: str = ""  # images' root folder (manifest, imagefolder) or IDX folder (fmnist-mosaic)
    manifest: str = ""  # train manifest (.csv or .jsonl); relative image paths are under root
    val_manifest: str = ""  # manifest of the val/test split
    classes: list[str] = field(default_factory=list)  # vocabulary; empty = sorted names in data
    classes_file: str = ""  # vocabulary as a file, one name per line (instead of classes)
    num_classes: int | None = None  # set from the data set when None; checked when given
    check_files: bool = True  # manifest and formats: every image file must exist at construction
    on_bad_image: str = "error"  # error | skip (substitute the next sample, list the file in <run>/skipped_images.txt)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are bad images (decompression bombs); 0 = no limit
    untagged: str = "unknown"  # an image without a tag: unknown (MLC skips it; SwAV, MIM, MD train on it) | negative
    # a class neither verified present nor absent (openimages; a manifest or shards with negatives): unknown | negative
    unannotated: str = "unknown"

    # users' formats (dataset coco | voc | openimages | tencent; layouts in hvpmtl.data.formats)
    annotations: str = ""  # train split: instances_<split>.json | ImageSets/Main/<split>.txt | Open Images
    # <split>-annotations-human-imagelabels.csv | Tencent image list; root = the images' (dataset) folder
    val_annotations: str = ""  # the same for the val/test split
    dictionary: str = ""  # openimages: class-descriptions CSV; tencent: dictionary file; "" = beside annotations
    min_confidence: float = 0.5  # openimages, tencent: a label is a positive tag at this confidence or above
    voc_difficult: str = "exclude"  # voc: exclude | include objects marked <difficult>1</difficult>
    missing_images: str = "error"  # formats: error | drop listed images whose file is absent (check_files=true)

    # shards (dataset shards; written by `hvpmtl data shard`, read as hvpmtl.data.shard_stream says)
    shards: str = ""  # train split: folder with shards.json, that file, or a pattern dir/train-{000000..000009}.tar
    val_shards: str = ""  # the same for the val/test split (read by random access)
    shard_streams: int = 8  # pre-training reads an epoch as this many streams; a multiple of the processes
    shard_shuffle: int = 1000  # samples per shuffle window of a stream (1 = read order)

    # generated data sets (synthetic, fmnist-mosaic, emoji)
    seed: int = 0  # which generated data set; augmentations are seeded by train.seed
    train_size: int = 10000
    val_size: int = 2000
    label_noise: float = 0.0  # train split only: drop each tag / add a spurious one with prob r
    tagged_fraction: float = 1.0  # pre-training's train split: this fraction of images keeps its tags (seeded by index)
    item_scale: float = 1.0  # fmnist: item side / image side (0.5 = the items' size in fmnist-mosaic)
    synthetic_tags: str = "shapes"  # synthetic: shapes (10 tags) | attributes (240 shape x colour x texture, Zipf)
    emoji_min_count: int = 5  # emoji: keep CLDR keywords of at least this many train emoji (5: 130 tags with CLDR 41)

    # loading
    batch_size: int = 64  # global batch, split over processes
    num_workers: int = 2
    pin_memory: bool = True
    persistent_workers: bool = True  # ignored when num_workers is 0
    prefetch_factor: int = 2  # items each worker keeps ready (a batch; with shards, its part of one)
    augment_on: str = "cpu"  # cpu | device: workers only crop (uint8); flip, jitter, rotation, RandAugment batched
    # pre-training: decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when every crop the views
    # can draw still keeps backbone.img_size pixels a side: 1.2-3.5x faster samples from 1-12 MP photos, the
    # views of a data set resized offline to that size (docs/performance.md); off: images decode as stored
    reduced_decode: bool = False
    # > 1: each loader worker reads a batch's image files on this many threads before decoding them in
    # order (the same batch), so that file latency on network storage overlaps; 0: one file after another
    io_threads: int = 0

    # views (SPEC: random resized crop, flip, colour jitter, rotation, RandAugment)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_scale: tuple[float, float] = (0.67, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.5  # probability
    color_jitter: float = 0.4  # brightness = contrast = saturation = s, hue = s / 4; 0 = off
    color_jitter_prob: float = 0.8
    rotation: float = 10.0  # degrees, uniform in [-r, r]; 0 = off
    rand_augment: bool = True
    rand_augment_ops: int = 2
    rand_augment_magnitude: float = 9.0  # timm's 0..10 scale (SimMIM's rand-m9: 90 % of each op's maximum)
    rand_augment_magnitude_std: float = 0.5  # per-image Gaussian noise on the magnitude (timm's mstd0.5)
    # probability that each chosen op runs: 0.5 is timm's policy (SimMIM's rand-m9-mstd0.5-inc1); 1.0
    # (every op, torchvision's) is kept as the default until the two are measured against each other
    rand_augment_op_prob: float = 1.0
    eval_crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, then centre-crop

    def validate(self, prefix: str = "") -> None:
        """Raise ``ValueError`` naming ``{prefix}.field`` for the first bad value."""

        def key(name: str) -> str:
            return f"{prefix}.{name}" if prefix else name

        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"{key(name)}={short_repr(getattr(self, name))}: {why}")

        check(self.dataset in DATASETS, "dataset", f"unknown (choose from {', '.join(DATASETS)})")
        check(self.on_bad_image in BAD_IMAGE_POLICIES, "on_bad_image", "must be 'error' or 'skip'")
        check(self.max_image_pixels >= 0, "max_image_pixels", "must be >= 0 (0 = no limit)")
        check(self.untagged in UNKNOWN_POLICIES, "untagged", "must be 'unknown' or 'negative'")
        check(self.unannotated in UNKNOWN_POLICIES, "unannotated", "must be 'unknown' or 'negative'")
        check(0.0 < self.tagged_fraction <= 1.0, "tagged_fraction", "must be in (0, 1]")
        untagged_possible = self.tagged_fraction < 1.0 or self.label_noise > 0.0
        check(self.untagged == "unknown" or self.dataset not in _GENERATED or untagged_possible, "untagged",
              f"has no effect: every {self.dataset} image is tagged (set data.tagged_fraction < 1)")  # fmt: skip
        check(self.io_threads >= 0, "io_threads", "must be >= 0 (0: read files one after another)")
        check(0.0 <= self.min_confidence <= 1.0, "min_confidence", "must be in [0, 1]")
        check(self.voc_difficult in ("exclude", "include"), "voc_difficult", "must be 'exclude' or 'include'")
        check(self.missing_images in ("error", "drop"), "missing_images", "must be 'error' or 'drop'")
        check(not (self.classes and self.classes_file), "classes", "give classes or classes_file, not both")
        check(len(set(self.classes)) == len(self.classes), "classes", "names must be unique")
        check(self.num_classes is None or self.num_classes > 0, "num_classes", "must be positive")
        check(self.seed >= 0, "seed", "must be >= 0")
        sizes_ok = (lambda n: n >= 0) if self.dataset == "fmnist" else (lambda n: n > 0)  # fmnist: 0 = all
        check(sizes_ok(self.train_size), "train_size", "must be positive (fmnist: >= 0, 0 = all)")
        check(sizes_ok(self.val_size), "val_size", "must be positive (fmnist: >= 0, 0 = all)")
        check(0.0 <= self.label_noise < 1.0, "label_noise", "must be in [0, 1)")
        check(0.0 < self.item_scale <= 1.0, "item_scale", "must be in (0, 1]")
        check(self.synthetic_tags in ("shapes", "attributes"), "synthetic_tags", "must be 'shapes' or 'attributes'")
        check(self.emoji_min_count >= 1, "emoji_min_count", "must be >= 1")
        check(self.batch_size > 0, "batch_size", "must be positive")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(self.shard_streams >= 1, "shard_streams", "must be >= 1")
        check(self.prefetch_factor >= 1, "prefetch_factor", "must be >= 1")
        check(self.shard_shuffle >= 1, "shard_shuffle", "must be >= 1 (1 = read order)")
        check(self.augment_on in ("cpu", "device"), "augment_on", "must be 'cpu' or 'device'")
        check(len(self.mean) == 3, "mean", "needs 3 values (RGB)")
        check(len(self.std) == 3 and min(self.std) > 0, "std", "needs 3 positive values (RGB)")
        lo, hi = self.crop_scale
        check(0.0 < lo <= hi <= 1.0, "crop_scale", "needs 0 < min <= max <= 1")
        lo, hi = self.crop_ratio
        check(0.0 < lo <= hi, "crop_ratio", "needs 0 < min <= max")
        check(0.0 <= self.hflip <= 1.0, "hflip", "is a probability in [0, 1]")
        check(self.color_jitter >= 0.0, "color_jitter", "must be >= 0")
        check(0.0 <= self.color_jitter_prob <= 1.0, "color_jitter_prob", "is a probability in [0, 1]")
        check(0.0 <= self.rotation <= 180.0, "rotation", "must be in [0, 180] degrees")
        check(self.rand_augment_ops >= 1, "rand_augment_ops", "must be >= 1")
        check(0 <= self.rand_augment_magnitude <= 10, "rand_augment_magnitude", "must be in [0, 10] (timm's scale)")
        check(self.rand_augment_magnitude_std >= 0, "rand_augment_magnitude_std", "must be >= 0")
        check(0.0 <= self.rand_augment_op_prob <= 1.0, "rand_augment_op_prob", "is a probability in [0, 1]")
        check(0.0 < self.eval_crop_pct <= 1.0, "eval_crop_pct", "must be in (0, 1]")


def has_effect(key: str, dataset: str) -> bool:
    """Whether ``data.<key>`` is read when the data comes from ``dataset`` (SOURCE_SPECIFIC_KEYS)."""
    return dataset in SOURCE_SPECIFIC_KEYS.get(key, (dataset,))


def check_source_keys(
    data: DataConfig, overridden: Collection[str] | None = None, preset_dataset: str | None = None,
    prefix: str = "data",
) -> DataConfig:
    """Raise ``ValueError`` (one line) when a source-specific key differs from its default but
    ``data.dataset`` does not read it; of several, the one the fewest sources read (the clearest
    sign of the source meant).

    ``overridden`` (the ``data.*`` keys the ``key=value`` overrides set) and ``preset_dataset``
    (the source of the defaults, base and preset under them): when the overrides choose another
    source, the keys the preset set for its own source are put back to their defaults (they went
    with that source, e.g. ``-c cpu-tiny data.dataset=manifest``: cpu-tiny's synthetic sizes) and
    the data block is returned with them; every other such key is refused.
    """
    default = DataConfig()
    unused = [k for k in SOURCE_SPECIFIC_KEYS if getattr(data, k) != getattr(default, k)]
    unused = [k for k in unused if not has_effect(k, data.dataset)]
    if overridden is not None and preset_dataset not in (None, data.dataset):
        dropped = [k for k in unused if k not in overridden and has_effect(k, preset_dataset)]
        data = replace(data, **{k: getattr(default, k) for k in dropped})
        unused = [k for k in unused if k not in dropped]
    if not unused:
        return data
    key = min(unused, key=lambda k: len(SOURCE_SPECIFIC_KEYS[k]))
    sources = SOURCE_SPECIFIC_KEYS[key]
    fix = f"={sources[0]}" if len(sources) == 1 else f" to one of {', '.join(sources)}"
    raise ValueError(
        f"{prefix}.{key} is set but has no effect with {prefix}.dataset={data.dataset}: "
        f"set {prefix}.dataset{fix} (or remove {prefix}.{key})"
    )
