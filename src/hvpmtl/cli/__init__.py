"""Command line: ``hvpmtl COMMAND`` (also ``python -m hvpmtl``).

Pre-training: ``pretrain``, ``demo`` (``demo --quick``: a one-minute check of the install),
``presets``, ``config``; ``hvpmtl --version`` prints the installed version. Downstream evaluation
of any run, checkpoint or backbone file: ``knn``, ``linprobe``, ``finetune``, ``detect``,
``segment``, ``mlc-head``. Data: ``data export | convert | shard | inspect``. Ablations:
``ablate``. Pictures: ``visualize``. Configs are a preset name or a YAML path plus dotted
``key=value`` overrides; a bad key, value, file or checkpoint stops the command at once with
``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from hvpmtl.cli.pretrain import DEFAULT_PRESET, cmd_config, cmd_demo, cmd_presets, cmd_pretrain

__all__ = ["build_parser", "main"]


def package_version() -> str:
    """The installed distribution's version; the source tree's when run without installing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hvpmtl")
    except PackageNotFoundError:
        from hvpmtl import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    from hvpmtl.cli import ablate, data, downstream, embed, export, noise_report, visualize

    parser = argparse.ArgumentParser(
        prog="hvpmtl",
        description="HVP-MTL pre-training (multi-label classification + SwAV + SimMIM + momentum distillation) "
        "and its downstream evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"hvpmtl {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    over = {"nargs": "*", "metavar": "key=value", "help": "dotted config overrides, e.g. optim.lr=2e-4"}

    p = sub.add_parser("pretrain", help="pre-train (alone, or under torchrun for DDP/FSDP)")
    p.add_argument("--config", "-c", help=f"preset name or YAML path (default: {DEFAULT_PRESET})")
    p.add_argument("--resume", help="checkpoint to continue from (or train.resume=auto)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's outputs in train.output_dir (train.overwrite=true)")  # fmt: skip
    p.add_argument("overrides", **over)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="pre-train cpu-tiny on synthetic data and report linear-probe mAP")
    p.add_argument("--output-dir", help="run folder (default: runs/demo-<time>)")
    p.add_argument("--quick", action="store_true",
                   help="a one-minute check that the install works: a tiny model, 20 steps, one probe")  # fmt: skip
    p.add_argument("overrides", **over)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("presets", help="list the config presets of every command")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("config", help="print the resolved pre-training config of a preset plus overrides")
    p.add_argument("--config", "-c", help=f"preset name or YAML path (default: {DEFAULT_PRESET})")
    p.add_argument("--explain", nargs="?", const="", metavar="KEY",
                   help="print each key's type, default and help (a key, a block such as tasks.mlc, or all)")
    p.add_argument("overrides", **over)
    p.set_defaults(func=cmd_config)

    downstream.add_parsers(sub)
    data.add_parsers(sub, over)
    ablate.add_parsers(sub, over)
    visualize.add_parsers(sub)
    noise_report.add_parsers(sub)
    export.add_parsers(sub)
    embed.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hvpmtl.config import ConfigError
    from hvpmtl.data.decode import BadImageError
    from hvpmtl.engine.checkpoint import DiskFullError
    from hvpmtl.engine.loop import NonFiniteLossError, SimulatedCrash
    from hvpmtl.eval.weights import WeightsError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # "SOURCE -c PRESET k=v", "k=v --resume X k2=v2": argparse stops collecting positionals at an option
        field = "args" if hasattr(args, "args") else "overrides"
        if not hasattr(args, field) or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, field, [*getattr(args, field), *extra])
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, WeightsError, BadImageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, SimulatedCrash, FloatingPointError, DiskFullError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
