"""``hvpmtl noise-report RUN``: the images whose given tags the run's teacher most strongly
contradicts, as ``noise_report.csv`` and a self-contained ``noise_report.html``.

The data block starts from the run's own data source, ``data.label_noise`` included (the tags
it was trained on), then ``key=value`` overrides (``data.*``, ``images``, ``min_score``, ``ks``,
``run.*``; see :class:`hvpmtl.eval.noise_report.NoiseReportConfig`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hvpmtl.config import ConfigError, load_config

INHERITED = ("label_noise",)  # besides the downstream commands' SOURCE_KEYS


def cmd_noise_report(args: argparse.Namespace) -> int:
    from hvpmtl.cli.downstream import SOURCE_KEYS, run_source, split_source
    from hvpmtl.config import to_dict
    from hvpmtl.eval.noise_report import NoiseReportConfig, run_noise_report
    from hvpmtl.runs import Run

    source, overrides = split_source(args.args)
    if source is None:
        raise ConfigError("give the run folder, model.safetensors or checkpoint whose teacher checks the tags")
    flags = {"split": args.split, "top": args.top, "run.output_dir": args.out}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + overrides
    run = Run(source)
    model, run_cfg = run.model()
    base = {"data": run_source(to_dict(run_cfg.data), (*SOURCE_KEYS, *INHERITED))}
    cfg = load_config(None, overrides, cls=NoiseReportConfig, base=base)
    out = Path(cfg.run.output_dir) if cfg.run.output_dir else run.folder / "eval" / f"noise-{cfg.split}"
    run_noise_report(source, cfg, out, loaded=(model, run_cfg))
    return 0


def add_parsers(sub) -> None:
    text = "rank the images whose given tags the teacher contradicts (CSV + HTML with thumbnails)"
    p = sub.add_parser("noise-report", help=text, description=text)
    p.add_argument(
        "args", nargs="+", metavar="RUN | key=value",
        help="run folder, model.safetensors or checkpoint, then overrides (data.*, images, ks, ...)",
    )  # fmt: skip
    p.add_argument("--split", help="train (default; data.label_noise applies to it), val or test")
    p.add_argument("--top", type=int, help="images shown in noise_report.html (default 50)")
    p.add_argument("--out", help="output folder (default: RUN/eval/noise-SPLIT)")
    p.set_defaults(func=cmd_noise_report)
