"""``hvpmtl data convert``: a users' format (COCO, VOC, Open Images, Tencent ML-Images) written as
the project's JSONL manifest and classes file.

Its options are ``key=value`` like every other command's (``format=coco annotations=... out=...``;
the ``data.*`` keys of pre-training name the same settings: ``data.dataset=coco``), with the
``--flags`` as aliases. Every key and value is checked before anything is read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# key (key=value; its --flag has dashes) -> the DataConfig field it sets ("" = an output path)
OPTIONS = {
    "format": "dataset", "annotations": "annotations", "out": "", "classes_out": "", "root": "root",
    "dictionary": "dictionary", "classes_file": "classes_file", "min_confidence": "min_confidence",
    "voc_difficult": "voc_difficult", "missing_images": "missing_images", "check_files": "check_files",
}  # fmt: skip
ALIASES = {f"data.{field}": key for key, field in OPTIONS.items() if field}  # pre-training's names
REQUIRED = ("format", "annotations", "out")
BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def convert_options(args: argparse.Namespace) -> dict[str, str]:
    """The options given as ``--flags`` and as ``key=value``, by key (``ConfigError``: an unknown
    key, an item without ``=``, a key given twice with two values, a required key missing)."""
    from hvpmtl.config import ConfigError

    given = {k: getattr(args, k) for k in OPTIONS if getattr(args, k, None) is not None}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"data convert: {item!r} is not of the form key=value (keys: {', '.join(OPTIONS)})")
        key = ALIASES.get(key.strip(), key.strip())
        if key not in OPTIONS:
            raise ConfigError(f"data convert: unknown key {key!r} (keys: {', '.join(OPTIONS)})")
        if key in given and given[key] != value:
            raise ConfigError(f"data convert: {key} given twice ({given[key]!r} and {value!r})")
        given[key] = value
    for key in REQUIRED:
        if key not in given:
            raise ConfigError(f"data convert: {key} is required (--{key.replace('_', '-')} or {key}=...)")
    return given


def convert_config(given: dict[str, str]):
    """The ``DataConfig`` the options describe, checked: types, values, the manifest's name, and
    options the format does not read (refused, not ignored)."""
    from hvpmtl.config import ConfigError
    from hvpmtl.data.config import FORMATS, SOURCE_SPECIFIC_KEYS, DataConfig, has_effect
    from hvpmtl.data.formats.convert import MANIFEST_SUFFIXES

    fmt = given["format"]
    if fmt not in FORMATS:
        raise ConfigError(f"data convert: format={fmt}: choose from {', '.join(FORMATS)}")
    if Path(given["out"]).suffix.lower() not in MANIFEST_SUFFIXES:
        raise ConfigError(f"data convert: out={given['out']}: the manifest must be a .jsonl file")
    fields: dict = {"dataset": fmt}
    for key, value in given.items():
        field = OPTIONS[key]
        if field in ("", "dataset"):
            continue
        if field in SOURCE_SPECIFIC_KEYS and not has_effect(field, fmt):
            readers = ", ".join(f for f in SOURCE_SPECIFIC_KEYS[field] if f in FORMATS)
            raise ConfigError(f"data convert: {key} has no effect with format={fmt} (read by {readers})")
        if key == "min_confidence":
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"data convert: min_confidence={value!r}: expected a number in [0, 1]") from None
        elif key == "check_files":
            if value.lower() not in BOOLEANS:
                raise ConfigError(f"data convert: check_files={value!r}: expected true or false")
            value = BOOLEANS[value.lower()]
        fields[field] = value
    cfg = DataConfig(**fields)
    try:
        cfg.validate("")
    except ValueError as err:
        raise ConfigError(f"data convert: {err}") from err
    return cfg


def cmd_convert(args: argparse.Namespace) -> int:
    from hvpmtl.config import ConfigError
    from hvpmtl.data.formats import build_format_dataset
    from hvpmtl.data.formats.convert import write_manifest
    from hvpmtl.data.manifest import read_class_names

    given = convert_options(args)
    cfg = convert_config(given)
    try:
        classes = read_class_names(cfg.classes_file) if cfg.classes_file else None
        ds = build_format_dataset(cfg, "train", classes)
        manifest, classes_file = write_manifest(ds, given["out"], given.get("classes_out"))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    print(f"{len(ds)} images ({ds.num_tagged} tagged), {len(ds.classes)} classes -> {manifest}, {classes_file}")
    print(f"pre-train on it: hvpmtl pretrain data.dataset=manifest data.manifest={manifest} "
          f"data.classes_file={classes_file}")  # fmt: skip
    return 0


def add_parser(data_sub) -> None:
    from hvpmtl.data.config import FORMATS

    c = data_sub.add_parser(
        "convert", help="write COCO, VOC, Open Images or Tencent ML-Images labels as a JSONL manifest + classes file",
        description="Read one split in a users' format (layouts: hvpmtl.data.formats) and write the project's "
        "JSONL manifest (image paths relative to it, tag names) and its classes file. Every option is also "
        f"a key=value (format=coco annotations=... out=...; data.dataset=... etc. too): {', '.join(OPTIONS)}.",
    )  # fmt: skip
    c.add_argument("--format", help=f"one of {', '.join(FORMATS)} (format=)")
    c.add_argument("--annotations",
                   help="coco: instances_<split>.json; voc: ImageSets/Main/<split>.txt; openimages: "
                   "<split>-annotations-human-imagelabels.csv; tencent: the image list")  # fmt: skip
    c.add_argument("--out", help="manifest to write (.jsonl)")
    c.add_argument("--classes-out", help="classes file to write (default: <out stem>.classes.txt beside it)")
    c.add_argument("--root", help="images' (dataset) folder (default: from the annotations' place)")
    c.add_argument("--dictionary", help="openimages: class-descriptions CSV; tencent: dictionary file")
    c.add_argument("--classes-file", help="keep only these classes (one id or name a line), in this order")
    c.add_argument("--min-confidence", help="openimages, tencent: positive at >= this (default 0.5)")
    c.add_argument("--voc-difficult", help="voc: exclude (default) | include objects marked difficult")
    c.add_argument("--missing-images", help="error (default) | drop listed images whose file is absent")
    c.add_argument("--no-check-files", dest="check_files", action="store_const", const="false",
                   help="do not check that the image files exist (check_files=false)")  # fmt: skip
    c.add_argument("overrides", nargs="*", metavar="key=value", help="the options as key=value (names above)")
    c.set_defaults(func=cmd_convert)
