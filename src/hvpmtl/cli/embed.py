"""``hvpmtl embed SOURCE [DATA] --out FILE``: one feature vector per image, from a run's backbone.

DATA is an image folder (searched recursively) or a ``.csv``/``.jsonl`` manifest; without DATA,
``data.*`` overrides name any data source (``data.dataset=fmnist``), whose ``--split`` is read.
The file format follows ``--out``'s extension (:mod:`hvpmtl.eval.embed`). Under torchrun each
process embeds its shard and rank 0 writes the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hvpmtl.config import ConfigError

ROOT_KEY = "data.root"


def cmd_embed(args: argparse.Namespace) -> int:
    from hvpmtl.engine.distributed import cleanup_distributed, init_distributed
    from hvpmtl.eval.embed import check_output, embed

    positional = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    if not positional or len(positional) > 2:
        raise ConfigError(f"give SOURCE (a run folder or weights file) and at most one DATA, got {positional}")
    source, data = positional[0], (positional[1] if len(positional) == 2 else None)
    out = Path(args.out)
    check_output(out, args.overwrite)
    root = ""
    if data is not None:
        extra = [o for o in overrides if o.split("=", 1)[0] != ROOT_KEY]
        if extra:
            raise ConfigError(f"{extra[0].split('=', 1)[0]}: has no effect with DATA {data} (only {ROOT_KEY} does)")
        root = next((o.split("=", 1)[1] for o in overrides), "")
        if root and not Path(data).is_file():
            raise ConfigError(f"{ROOT_KEY}: has no effect on a folder ({data}); it places a manifest's paths")
    elif not overrides:
        raise ConfigError("give DATA (an image folder or a .csv/.jsonl manifest) or a source, e.g. data.dataset=fmnist")
    env = init_distributed(args.device, "auto")
    try:
        target = data if data is not None else source_config(source, overrides)
        emb = embed(source, target, part=args.part, feature=args.feature, split=args.split, root=root,
                    batch_size=args.batch_size, num_workers=args.num_workers, device=env.device, env=env,
                    progress=not args.no_progress)  # fmt: skip
        if env.is_main:
            emb.save(out, args.overwrite)
            print(f"wrote {len(emb.paths)} x {emb.features.shape[1]} {args.feature} features of {emb.meta['weights']} "
                  f"to {out}")  # fmt: skip
    finally:
        cleanup_distributed()
    return 0


def source_config(source: str, overrides: list[str]):
    """The ``data`` block of ``overrides`` over the run's own source (a new ``data.dataset`` starts
    from the defaults), as a :class:`DataConfig`."""
    from hvpmtl.cli.downstream import run_source
    from hvpmtl.config import load_config
    from hvpmtl.runs import Run

    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise ConfigError(f"{bad[0].split('=', 1)[0]}: embed reads only data.* keys")
    run_data = Run(source).config.get("data") or {}
    new_source = any(o.startswith("data.dataset=") for o in overrides)
    base = {} if new_source else {"data": run_source(run_data)}
    return load_config(None, overrides, base=base).data


def add_parsers(sub) -> None:
    p = sub.add_parser("embed", help="features of every image of a folder, a manifest or a data source")
    p.add_argument("items", nargs="+", metavar="SOURCE [DATA] [key=value]",
                   help="a run folder or weights file; an image folder or a .csv/.jsonl manifest; or data.* "
                        "overrides naming a source (data.dataset=fmnist); data.root: a manifest's root")  # fmt: skip
    p.add_argument("--out", required=True, help="output file: .safetensors, .npy (+ .paths.txt) or .parquet")
    p.add_argument("--part", choices=("student", "teacher"), default="student", help="which backbone (default student)")
    p.add_argument("--feature", default="mean", help="mean (feature-map mean, default), pooled, both or grid")
    p.add_argument("--split", default="val", help="the split of a data source (default val)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed)
