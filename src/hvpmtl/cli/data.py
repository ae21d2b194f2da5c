"""``hvpmtl data``: ``export`` writes the built-in data sets (with their boxes and masks) as COCO
instances files or an ADE20K-layout segmentation folder, for detection and segmentation offline;
``convert`` writes a users' format (COCO, VOC, Open Images, Tencent ML-Images) as a JSONL manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

SPLITS = {"coco": ("train", "val"), "ade20k": ("training", "validation")}
MIN_EXPORT_SIDE = 4  # pixels; at 1 a synthetic scene has no visible object


def cmd_export(args: argparse.Namespace) -> int:
    from hvpmtl.config import ConfigError, load_config
    from hvpmtl.data import build_dataset
    from hvpmtl.eval.config import FeatureEvalConfig

    if args.img_size < MIN_EXPORT_SIDE:
        raise ConfigError(f"--img-size={args.img_size}: must be >= {MIN_EXPORT_SIDE} (smaller scenes hold no object)")
    cfg = load_config(None, args.overrides, cls=FeatureEvalConfig).data
    if cfg.dataset not in ("synthetic", "fmnist-mosaic"):
        raise ConfigError(
            f"data.dataset={cfg.dataset}: only the built-in synthetic and fmnist-mosaic keep boxes and masks"
        )
    names = SPLITS[args.format]
    for split, name in zip(("train", "val"), names):
        ds = build_dataset(cfg, args.img_size, split)
        if args.format == "coco":
            from hvpmtl.data.coco import export_coco

            path = export_coco(ds, args.out, name)
        else:
            from hvpmtl.data.ade import export_ade

            path = export_ade(ds, args.out, name)
        print(f"{split}: {len(ds)} images -> {path}")
    print(f"done: {Path(args.out)}")
    return 0


def add_export(data_sub, over: dict) -> None:
    e = data_sub.add_parser("export", help="write the built-in data as COCO instances or an ADE20K-layout folder")
    e.add_argument("--format", choices=sorted(SPLITS), required=True)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--img-size", type=int, default=64, help="image side in pixels (default 64)")
    e.add_argument("overrides", **over)
    e.set_defaults(func=cmd_export)


def add_parsers(sub, over: dict) -> None:
    p = sub.add_parser("data", help="data utilities (export the built-in sets, convert users' formats)")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    add_export(data_sub, over)
    from hvpmtl.cli import data_convert  # `data convert`: users' formats -> a manifest

    data_convert.add_parser(data_sub)
    from hvpmtl.cli import data_shard  # `data shard`: WebDataset shards

    data_shard.add_parser(data_sub, over)
    from hvpmtl.cli import data_inspect  # `data inspect`: the report before a long run

    data_inspect.add_parser(data_sub, over)
