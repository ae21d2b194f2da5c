"""Command line: ``hvpmtl pretrain | demo | presets | config`` (also ``python -m hvpmtl``).

Configs are a preset name or a YAML path plus dotted ``key=value`` overrides; a bad key or value
stops the command at once with ``error: <key>: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

DEFAULT_PRESET = "cpu-tiny"
DEMO_PROBE = {"train_images": 2000, "val_images": 1000}


def _native_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 (AVX512-BF16, AMX) and on recent GPUs."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _load_config(preset: str | None, overrides: list[str], resume: str | None = None):
    """Preset/YAML + overrides; with ``--resume`` and no ``--config``, the run's own config."""
    from hvpmtl.config import load_config

    if preset is None and resume:
        if not Path(resume).is_file():
            raise FileNotFoundError(f"--resume: checkpoint not found: {resume}")
        run_cfg = Path(resume).parent.parent / "config.yaml"
        if not run_cfg.is_file():
            raise FileNotFoundError(f"--resume: {run_cfg} (the run's config) not found; pass --config")
        preset = str(run_cfg)
    return load_config(preset or DEFAULT_PRESET, overrides)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from hvpmtl.engine.loop import pretrain

    cfg = _load_config(args.config, args.overrides, args.resume)
    pretrain(cfg, resume=args.resume)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from hvpmtl.config import PRESET_DIR, preset_names

    for name in preset_names():
        lines = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()
        about = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("#") else ""
        mark = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name + mark:26s} {about}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from hvpmtl.config import to_dict

    cfg = _load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Pre-train ``cpu-tiny`` on synthetic scenes, then linear-probe the frozen backbone against
    the same backbone at its random initialisation, and score the pre-trained MLC head."""
    import torch
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader, Subset

    import hvpmtl
    from hvpmtl.data import EvalImages, build_dataset, build_eval_transform
    from hvpmtl.engine.checkpoint import load_backbone
    from hvpmtl.engine.loop import pretrain
    from hvpmtl.eval.linear_probe import linear_probe, mean_average_precision

    out_dir = args.output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    precision = "bf16" if _native_bf16() else "fp32"
    cfg = _load_config(DEFAULT_PRESET, [f"train.output_dir={out_dir}", f"train.precision={precision}", *args.overrides])
    t0 = time.perf_counter()
    result = pretrain(cfg)
    t_train = time.perf_counter() - t0

    print("\nlinear probes on frozen features (multi-label; mAP on held-out val images) ...", flush=True)
    size = cfg.backbone.img_size
    tf = build_eval_transform(cfg)
    train, val = build_dataset(cfg.data, size, "train"), build_dataset(cfg.data, size, "val")
    n_classes = len(train.classes)
    train = EvalImages(Subset(train, range(min(DEMO_PROBE["train_images"], len(train)))), tf)
    val = EvalImages(Subset(val, range(min(DEMO_PROBE["val_images"], len(val)))), tf)

    torch.manual_seed(cfg.train.seed)  # the very weights pre-training started from
    initial = hvpmtl.build(cfg, n_classes).backbone
    pretrained = load_backbone(result.output_dir / "backbone.safetensors", cfg.backbone)
    rows = []
    for feature, label in (("mean", "mean of feature map"), ("pooled", "pooled (class token)")):
        for name, backbone in (("random init", initial), ("HVP-MTL", pretrained)):
            r = linear_probe(backbone, train, val, feature=feature)
            rows.append((f"{name}, {label}", r.val_map, r.train_map))

    model = hvpmtl.build(cfg, n_classes).eval()
    missing, unexpected = model.load_state_dict(load_file(str(result.output_dir / "model.safetensors")), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    if model.mlc is not None:
        with torch.no_grad():
            pairs = [(model.mlc(model.backbone(x, None)[0])[0], y) for x, y in DataLoader(val, batch_size=128)]
        scores, labels = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        rows.append(("HVP-MTL, its own MLC head (no probe)", mean_average_precision(scores, labels), None))

    print(f"\n{'backbone, features':44s}{'val mAP %':>11s}{'train mAP %':>13s}")
    for name, v, tr in rows:
        print(f"{name:44s}{v:11.2f}" + (f"{tr:13.2f}" if tr is not None else f"{'-':>13s}"))
    positives = float(torch.stack([y for _, y in val]).mean())
    print(f"(a random scorer gets ~{100 * positives:.0f}% mAP: the share of positive labels)")
    total = time.perf_counter() - t0
    print(f"pre-training {t_train:.0f}s ({precision}), total {total:.0f}s; run folder: {result.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvpmtl",
        description="HVP-MTL pre-training: multi-label classification + SwAV + SimMIM + momentum distillation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    over = {"nargs": "*", "metavar": "key=value", "help": "dotted config overrides, e.g. optim.lr=2e-4"}

    p = sub.add_parser("pretrain", help="pre-train (alone, or under torchrun for DDP/FSDP)")
    p.add_argument("--config", "-c", help=f"preset name or YAML path (default: {DEFAULT_PRESET})")
    p.add_argument("--resume", help="checkpoint to continue from (or train.resume=auto)")
    p.add_argument("overrides", **over)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="pre-train cpu-tiny on synthetic data and report linear-probe mAP")
    p.add_argument("--output-dir", help="run folder (default: runs/demo-<time>)")
    p.add_argument("overrides", **over)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("presets", help="list the config presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("config", help="print the resolved config of a preset plus overrides")
    p.add_argument("--config", "-c", help=f"preset name or YAML path (default: {DEFAULT_PRESET})")
    p.add_argument("overrides", **over)
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hvpmtl.config import ConfigError
    from hvpmtl.engine.loop import NonFiniteLossError, SimulatedCrash

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, SimulatedCrash) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
