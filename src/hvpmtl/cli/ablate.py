"""``hvpmtl ablate``: pre-train one preset under every task mix and seed, score each backbone
with the frozen-feature evaluations, and write a table (:mod:`hvpmtl.eval.ablation`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ABLATION_PRESET = "cpu-micro"


def add_parsers(sub, over: dict) -> None:
    from hvpmtl.eval.ablation import DEFAULT_MIXES, MIXES

    p = sub.add_parser(
        "ablate",
        help="pre-train under each task mix (the paper's Table 5 and each objective alone), score, tabulate",
        description="Every cell is a run folder OUT/<mix>-s<seed>; run the same command again to continue.",
    )
    p.add_argument("--config", "-c", help="pre-training preset or YAML (default: cpu-micro, the ablation preset)")
    p.add_argument("--out", default="runs/ablate", help="folder of the cells and of ablation.md (default runs/ablate)")
    p.add_argument("--mixes", default=",".join(DEFAULT_MIXES), metavar="MIX,MIX",
                   help=f"comma-separated task mixes from {','.join(MIXES)} (default: "
                   f"{','.join(DEFAULT_MIXES)})")  # fmt: skip
    p.add_argument("--seeds", default=None, help="comma-separated train.seed values (default 0,1,2; --smoke: 0)")
    p.add_argument("--images", nargs=2, type=int, default=[5000, 2000], metavar=("TRAIN", "EVAL"),
                   help="images of the pre-training data for its linear probe (default 5000 2000)")  # fmt: skip
    p.add_argument("--items", nargs=2, type=int, default=None, metavar=("TRAIN", "EVAL"),
                   help="Fashion-MNIST items for k-NN and probe top-1 (default 5000 2000 when the data is "
                   "fmnist-mosaic)")  # fmt: skip
    p.add_argument("--no-items", action="store_true", help="skip the Fashion-MNIST item evaluations")
    p.add_argument("--launcher", default="", help='run each step as "LAUNCHER -m hvpmtl ..." (e.g. '
                   '"torchrun --nproc_per_node=8"); default: in this process')  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="a seconds-long run of the whole pipeline (3 steps per cell)")
    p.add_argument("overrides", **over)
    p.set_defaults(func=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> int:
    from hvpmtl.cli import main
    from hvpmtl.config import ConfigError, load_config
    from hvpmtl.data.fmnist import DEFAULT_ROOT
    from hvpmtl.eval.ablation import Ablation, evaluations, mix_overrides, smoke_overrides

    preset = args.config or ABLATION_PRESET
    mixes = list(dict.fromkeys(m.strip() for m in args.mixes.split(",") if m.strip()))
    try:
        args.seeds = args.seeds or ("0" if args.smoke else "0,1,2")
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as err:
        raise ConfigError(f"--seeds {args.seeds}: give comma-separated integers") from err
    smoke = smoke_overrides(load_config(preset, args.overrides).data.dataset) if args.smoke else []
    overrides = [*smoke, *args.overrides]
    trains_mlc = False  # the MLC-head column: when some mix trains MLC
    for mix in mixes:  # every cell's config must load before anything runs
        cfg = load_config(preset, [*overrides, *mix_overrides(mix)])
        trains_mlc = trains_mlc or cfg.tasks.mlc.weight > 0
    if not mixes or not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--mixes {args.mixes} --seeds {args.seeds}: give mixes and distinct seeds >= 0")
    images = (48, 24) if args.smoke else tuple(args.images)
    items = tuple(args.items) if args.items else None
    if items is None and not args.no_items and cfg.data.dataset == "fmnist-mosaic":
        items = (100, 50) if args.smoke else (5000, 2000)
    root = Path(cfg.data.root or DEFAULT_ROOT)
    if items and not any(root.glob("t10k-images-idx3-ubyte*")):
        raise ConfigError(f"--items: no Fashion-MNIST IDX files under {root} (or pass --no-items)")
    plan = Ablation(Path(args.out), preset, overrides, mixes, seeds, evaluations(cfg.data.dataset, images, items,
                    trains_mlc), args.launcher, run_command=main)  # fmt: skip
    plan.out.mkdir(parents=True, exist_ok=True)
    try:
        plan.run()
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"table: {plan.out / 'ablation.md'}")
    return 0
