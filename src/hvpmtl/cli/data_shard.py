"""``hvpmtl data shard``: any data set a config describes, written as WebDataset tar shards
(layout in :mod:`hvpmtl.data.shards`), for ``data.dataset=shards``."""

from __future__ import annotations

import argparse


def cmd_shard(args: argparse.Namespace) -> int:
    from hvpmtl.config import ConfigError, load_config
    from hvpmtl.data import build_dataset
    from hvpmtl.data.shard_writer import write_shards

    if not 1 <= args.quality <= 100:
        raise ConfigError(f"--quality={args.quality}: JPEG quality must be in [1, 100]")
    cfg = load_config(args.config, args.overrides)
    try:
        ds = build_dataset(cfg.data, cfg.backbone.img_size, args.split)
        index = write_shards(
            ds, args.out, args.prefix or args.split, args.samples_per_shard,
            None if args.no_shuffle else args.shuffle_seed, args.image_format, args.quality, args.overwrite,
            progress=None if args.quiet else print,
        )  # fmt: skip
    except (ValueError, FileExistsError) as err:
        raise ConfigError(str(err)) from err
    skipped = f", {index.skipped} unreadable images left out" if index.skipped else ""
    print(f"{index.total} samples ({index.num_tagged} tagged), {len(index.classes)} classes in "
          f"{len(index.paths)} shards{skipped} -> {index.origin}")  # fmt: skip
    key = "data.shards" if args.split == "train" else "data.val_shards"
    print(f"pre-train on it: hvpmtl pretrain data.dataset=shards {key}={args.out}")
    return 0


def add_parser(data_sub, over: dict) -> None:
    s = data_sub.add_parser(
        "shard", help="write a data set (any data.dataset) as WebDataset tar shards + shards.json",
        description="Write one split of the data set the config describes as tar shards (<key>.jpg|png + "
        "<key>.json with its labels) and a shards.json index; pre-train from them with "
        "data.dataset=shards data.shards=OUT.",
    )  # fmt: skip
    s.add_argument("--out", required=True, help="output folder (gets <prefix>-000000.tar ... and shards.json)")
    s.add_argument("--config", "-c", help="preset name or YAML path (default: the built-in defaults)")
    s.add_argument("--split", choices=("train", "val", "test"), default="train", help="which split (default train)")
    s.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar file (default 1000)")
    s.add_argument("--prefix", help="shard file prefix (default: the split)")
    s.add_argument("--image-format", choices=("auto", "png", "jpg"), default="auto",
                   help="auto: copy JPEG/PNG source files as they are, encode other images as PNG")  # fmt: skip
    s.add_argument("--quality", type=int, default=95, help="JPEG quality for --image-format jpg (default 95)")
    s.add_argument("--shuffle-seed", type=int, default=0, help="seed of the order samples are written in")
    s.add_argument("--no-shuffle", action="store_true", help="write samples in the source order")
    s.add_argument("--overwrite", action="store_true", help="replace shards written to --out before")
    s.add_argument("--quiet", action="store_true", help="no line per shard")
    s.add_argument("overrides", **over)
    s.set_defaults(func=cmd_shard)
