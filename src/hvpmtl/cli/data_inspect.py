"""``hvpmtl data inspect``: the report on a data set to read before a long run (counts, tags per
image, the label long tail, co-occurring tags, image sizes, missing and unreadable files;
:mod:`hvpmtl.data.inspect`)."""

from __future__ import annotations

import argparse
import os


def cmd_inspect(args: argparse.Namespace) -> int:
    from hvpmtl.config import ConfigError, load_config
    from hvpmtl.data.config import has_effect
    from hvpmtl.data.inspect import inspect_dataset
    from hvpmtl.viz.dataset import plot_dataset_report

    for name, low in (("limit", 0), ("top", 1), ("workers", 0)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name}={getattr(args, name)}: must be >= {low}")
    cfg = load_config(args.config, args.overrides)
    try:
        summary = inspect_dataset(
            cfg.data, cfg.backbone.img_size, args.split, args.out, args.limit, args.verify, args.top,
            args.workers, progress=not args.quiet, plot=plot_dataset_report,
        )  # fmt: skip
    except ValueError as err:  # a malformed listing, a bad config value
        raise ConfigError(str(err)) from err
    c = summary["counts"]
    scanned = f"{c['scanned']} of {c['images']} images (random sample)" if c["sampled"] else f"{c['images']} images"
    bad = c["missing"] + c["corrupt"] + c["too_large"]
    print(f"{scanned}, {c['classes']} classes, {summary['labels_per_image']['mean']:.2f} tags per image; "
          f"missing {c['missing']}, corrupt {c['corrupt']}, over the pixel limit {c['too_large']}")  # fmt: skip
    if c["untagged"] and has_effect("untagged", cfg.data.dataset):
        what = {"unknown": "MLC leaves them out", "negative": "MLC trains them as all-negative"}[cfg.data.untagged]
        print(f"{c['untagged']} without a tag (data.untagged={cfg.data.untagged}: {what})")
    for p in summary["problems"][:5]:
        print(f"  {p['kind']}: {p['where']}: {p['reason']}")
    if bad > 5:
        print(f"  ... {bad - 5} more in {os.path.join(args.out, 'report.json')}")
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 1 if args.strict and bad else 0


def add_parser(data_sub, over: dict) -> None:
    p = data_sub.add_parser(
        "inspect", help="report on a data set before a long run: counts, tags, long tail, sizes, bad files",
        description="Scan one split of the data set the config describes and write report.md, report.json and "
        "plots (label_frequency.png, labels_per_image.png, image_sizes.png) into --out. Image files are "
        "checked by their header (fast); --verify decodes each one as training does.",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", "-c", help="preset name or YAML path (default: the built-in defaults)")
    p.add_argument("--split", choices=("train", "val", "test"), default="train", help="which split (default train)")
    p.add_argument("--limit", type=int, default=0, help="scan a random sample of N images (default 0: all)")
    p.add_argument("--verify", action="store_true", help="decode every image fully (slower) instead of its header")
    p.add_argument("--top", type=int, default=20, help="rows of the class and co-occurrence tables (default 20)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes reading images (default: up to 4; 0 = this process)")  # fmt: skip
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any file is missing or unreadable")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", **over)
    p.set_defaults(func=cmd_inspect)
