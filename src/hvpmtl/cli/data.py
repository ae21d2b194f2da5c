"""``hvpmtl data``: ``export`` writes the built-in data sets (with their boxes and masks) as COCO
instances files or an ADE20K-layout segmentation folder, for detection and segmentation offline;
``convert`` writes a users' format (COCO, VOC, Open Images, Tencent ML-Images) as a JSONL manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

SPLITS = {"coco": ("train", "val"), "ade20k": ("training", "validation")}


def cmd_export(args: argparse.Namespace) -> int:
    from hvpmtl.config import ConfigError, load_config
    from hvpmtl.data import build_dataset
    from hvpmtl.eval.config import FeatureEvalConfig

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


def cmd_convert(args: argparse.Namespace) -> int:
    from hvpmtl.config import ConfigError
    from hvpmtl.data.config import DataConfig
    from hvpmtl.data.formats import build_format_dataset
    from hvpmtl.data.formats.convert import write_manifest
    from hvpmtl.data.manifest import read_class_names

    cfg = DataConfig(
        dataset=args.format, annotations=args.annotations, root=args.root or "", dictionary=args.dictionary or "",
        classes_file=args.classes_file or "", min_confidence=args.min_confidence, voc_difficult=args.voc_difficult,
        missing_images=args.missing_images, check_files=not args.no_check_files,
    )  # fmt: skip
    try:
        cfg.validate("data")
        classes = read_class_names(cfg.classes_file) if cfg.classes_file else None
        ds = build_format_dataset(cfg, "train", classes)
        manifest, classes_file = write_manifest(ds, args.out, args.classes_out)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    print(f"{len(ds)} images ({ds.num_tagged} tagged), {len(ds.classes)} classes -> {manifest}, {classes_file}")
    print(f"pre-train on it: hvpmtl pretrain data.dataset=manifest data.manifest={manifest} "
          f"data.classes_file={classes_file}")  # fmt: skip
    return 0


def add_export(data_sub, over: dict) -> None:
    e = data_sub.add_parser("export", help="write the built-in data as COCO instances or an ADE20K-layout folder")
    e.add_argument("--format", choices=sorted(SPLITS), required=True)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--img-size", type=int, default=64, help="image side in pixels (default 64)")
    e.add_argument("overrides", **over)
    e.set_defaults(func=cmd_export)


def add_convert(data_sub, over: dict) -> None:
    from hvpmtl.data.config import FORMATS

    c = data_sub.add_parser(
        "convert", help="write COCO, VOC, Open Images or Tencent ML-Images labels as a JSONL manifest + classes file",
        description="Read one split in a users' format (layouts: hvpmtl.data.formats) and write the project's "
        "JSONL manifest (image paths relative to it, tag names) and its classes file.",
    )  # fmt: skip
    c.add_argument("--format", choices=FORMATS, required=True)
    c.add_argument("--annotations", required=True,
                   help="coco: instances_<split>.json; voc: ImageSets/Main/<split>.txt; openimages: "
                   "<split>-annotations-human-imagelabels.csv; tencent: the image list")  # fmt: skip
    c.add_argument("--out", required=True, help="manifest to write (.jsonl)")
    c.add_argument("--classes-out", help="classes file to write (default: <out stem>.classes.txt beside it)")
    c.add_argument("--root", help="images' (dataset) folder (default: from the annotations' place)")
    c.add_argument("--dictionary", help="openimages: class-descriptions CSV; tencent: dictionary file")
    c.add_argument("--classes-file", help="keep only these classes (one id or name a line), in this order")
    c.add_argument("--min-confidence", type=float, default=0.5, help="openimages, tencent: positive at >= this")
    c.add_argument("--voc-difficult", choices=("exclude", "include"), default="exclude")
    c.add_argument("--missing-images", choices=("error", "drop"), default="error")
    c.add_argument("--no-check-files", action="store_true", help="do not check that the image files exist")
    c.set_defaults(func=cmd_convert)


def add_parsers(sub, over: dict) -> None:
    p = sub.add_parser("data", help="data utilities (export the built-in sets, convert users' formats)")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    add_export(data_sub, over)
    add_convert(data_sub, over)
    from hvpmtl.cli import data_shard  # `data shard`: WebDataset shards

    data_shard.add_parser(data_sub, over)
    from hvpmtl.cli import data_inspect  # `data inspect`: the report before a long run

    data_inspect.add_parser(data_sub, over)
