"""``hvpmtl visualize recon | attention | curves RUN``: pictures of a pre-training run.

``RUN`` is a run folder, its ``model.safetensors`` or a checkpoint (``recon`` and ``attention``
load the whole model, heads included); ``curves`` reads the run folder's ``metrics.csv`` and
``eval/*.json``. Pictures go to ``<run>/pictures/<kind>.png`` unless ``--out`` names a file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hvpmtl.config import ConfigError


def cmd_visualize(args: argparse.Namespace) -> int:
    from hvpmtl.runs import run_folder

    source = Path(args.run)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such run folder, model.safetensors or checkpoint")
    out = Path(args.out) if args.out else run_folder(source) / "pictures" / f"{args.kind}.png"
    if args.kind == "curves":
        try:
            from hvpmtl.viz.curves import plot_curves
        except ImportError as err:
            raise ConfigError(f"hvpmtl visualize curves needs matplotlib: pip install 'hvpmtl[viz]' ({err})") from None
        try:
            path = plot_curves(run_folder(source), out)
        except ValueError as err:  # an unreadable eval/*.json
            raise ConfigError(str(err)) from None
        print(f"wrote {path}")
        return 0

    top_k, teacher = getattr(args, "top_k", 3), getattr(args, "teacher", False)
    if args.count < 1 or args.scale < 0 or top_k < 1:
        raise ConfigError("--count and --top-k must be >= 1, --scale >= 0 (0: about 128 pixels per image)")
    from hvpmtl.runs import Run
    from hvpmtl.viz.grid import save_png
    from hvpmtl.viz.pictures import make_pictures, picture_set

    model, cfg = Run(source).model()
    if args.kind == "recon" and model.mim is None:
        raise ConfigError(f"{source}: this run trained no MIM decoder (tasks.mim.weight was 0)")
    if args.kind == "attention" and model.mlc is None:
        raise ConfigError(f"{source}: this run has no MLC decoder (tasks.mlc and tasks.distill were off)")
    if teacher and model.teacher is None:
        raise ConfigError(f"{source}: no teacher (tasks.distill was off)")
    try:
        seed = getattr(args, "seed", None)
        pics = picture_set(cfg, args.count, args.split, cfg.train.seed if seed is None else seed)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{args.split} images of {source}'s data: {err}") from None
    picture = make_pictures(model, pics, args.scale, top_k, teacher, kinds=(args.kind,))[args.kind]
    path = save_png(picture, out)
    print(f"wrote {path} ({picture.shape[2]} x {picture.shape[1]} pixels, {len(pics.images)} {args.split} images)")
    return 0


def add_parsers(sub) -> None:
    text = "pictures of a run: SimMIM reconstructions, label attention, curves (default: <run>/pictures/KIND.png)"
    p = sub.add_parser("visualize", help=text.split(" (")[0], description=text)
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    helps = {
        "recon": "input, masked input, reconstruction and reconstruction pasted into the input",
        "attention": "top predicted labels with their label query's cross-attention heat-map",
        "curves": "losses, learning rate, swav_collapse, gradient shares, k-NN and downstream results",
    }
    for kind, text in helps.items():
        q = kinds.add_parser(kind, help=text, description=text)
        q.add_argument("run", metavar="RUN", help="run folder" + ("" if kind == "curves" else
                       ", model.safetensors or checkpoint (.pt)"))  # fmt: skip
        q.add_argument("--out", "-o", help=f"PNG to write (default: <run>/pictures/{kind}.png)")
        if kind != "curves":
            q.add_argument("--count", "-n", type=int, default=8, help="held-out images shown (default: 8)")
            q.add_argument("--split", default="val", choices=("val", "test", "train"),
                           help="which split of the run's data (default: val)")  # fmt: skip
            q.add_argument("--scale", type=int, default=0, help="enlarge images this many times (0: to ~128 px)")
        if kind == "recon":
            q.add_argument("--seed", type=int, help="seed of the SimMIM masks (default: the run's train.seed)")
        if kind == "attention":
            q.add_argument("--top-k", type=int, default=3, help="predicted labels shown per image (default: 3)")
            q.add_argument("--teacher", action="store_true", help="the EMA teacher's backbone and MLC head")
        q.set_defaults(func=cmd_visualize)
