"""``hvpmtl pretrain | demo | presets | config``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from hvpmtl.config import Config

DEFAULT_PRESET = "cpu-tiny"
DEMO_PROBE = {"train_images": 2000, "eval_images": 1000}


def native_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 (AVX512-BF16, AMX) and on recent GPUs."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def load_pretrain_config(preset: str | None, overrides: list[str], resume: str | None = None):
    """Preset/YAML + overrides; with ``--resume`` and no ``--config``, the run's own config."""
    from hvpmtl.config import load_config

    if preset is None and resume:
        if not Path(resume).is_file():
            raise FileNotFoundError(f"--resume: checkpoint not found: {resume}")
        run_cfg = Path(resume).parent.parent / "config.yaml"
        if not run_cfg.is_file():
            raise FileNotFoundError(f"--resume: {run_cfg} (the run's config) not found; pass --config")
        preset = str(run_cfg)
    cfg = load_config(preset or DEFAULT_PRESET, overrides)
    check_devices(cfg)
    return cfg


def check_devices(cfg: Config) -> None:
    """``train.device`` and ``train.precision`` must suit this machine (``ConfigError`` naming the key)."""
    import torch

    from hvpmtl.config import ConfigError

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda: no CUDA device is visible (use train.device=auto or cpu)")
    on_cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    if cfg.train.precision == "fp16" and not on_cuda:
        raise ConfigError("train.precision=fp16 needs CUDA (its GradScaler); use bf16 or fp32 on CPU")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from hvpmtl.engine.loop import pretrain

    overrides = [*args.overrides, "train.overwrite=true"] if args.overwrite else args.overrides
    cfg = load_pretrain_config(args.config, overrides, args.resume)
    pretrain(cfg, resume=args.resume)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from hvpmtl.config import PRESET_DIR, preset_names
    from hvpmtl.eval.config import ROOTS, preset_dir

    groups = [("pretrain", PRESET_DIR)] + [(c, preset_dir(c)) for c in ROOTS if c != "linprobe"]
    for command, folder in groups:
        names = preset_names(folder)
        if not names:
            continue
        title = "knn / linprobe" if command == "knn" else command
        print(f"{title}:")
        for name in names:
            lines = (folder / f"{name}.yaml").read_text().splitlines()
            about = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("#") else ""
            mark = " (default)" if command == "pretrain" and name == DEFAULT_PRESET else ""
            print(f"  {name + mark:28s} {about}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from hvpmtl.config import to_dict

    cfg = load_pretrain_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Pre-train ``cpu-tiny`` on synthetic scenes, then linear-probe the frozen backbone against
    the same backbone at its random initialisation, and score the pre-trained MLC head."""
    from hvpmtl.config import load_config
    from hvpmtl.engine.distributed import DistEnv
    from hvpmtl.engine.loop import pretrain
    from hvpmtl.eval.config import FeatureEvalConfig
    from hvpmtl.eval.frozen import run_linprobe
    from hvpmtl.eval.heads import mlc_head_metrics
    from hvpmtl.eval.report import write_result
    from hvpmtl.eval.weights import resolve_weights

    out_dir = args.output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    precision = "bf16" if native_bf16() else "fp32"
    cfg = load_pretrain_config(
        DEFAULT_PRESET, [f"train.output_dir={out_dir}", f"train.precision={precision}", *args.overrides]
    )
    t0 = time.perf_counter()
    result = pretrain(cfg)
    t_train = time.perf_counter() - t0

    print("\nlinear probes on frozen features (multi-label; mAP on held-out val images) ...", flush=True)
    env = DistEnv()
    rows = []
    features = (("both", "both (the probe's default)"), ("mean", "mean of feature map"), ("pooled", "class token"))
    for feature, label in features:
        probe_cfg = load_config(None, [f"probe.feature={feature}", "run.progress=false", f"run.precision={precision}",
                                       *(f"{k}={v}" for k, v in DEMO_PROBE.items())], cls=FeatureEvalConfig,
                                base={"data": {"dataset": cfg.data.dataset, "seed": cfg.data.seed}})  # fmt: skip
        for name, random_init in (("random init", True), ("HVP-MTL", False)):
            weights = resolve_weights(result.output_dir, random_init=random_init)
            r = run_linprobe(probe_cfg, weights, env)
            stem = f"linprobe-{cfg.data.dataset}-{'random-init' if random_init else 'student'}-{feature}"
            data = f"{cfg.data.dataset} ({r['train_images']} -> {r['eval_images']})"
            out = result.output_dir / "eval"
            write_result(out, stem, "linprobe", weights.label, data, r["metrics"], {"feature": feature})
            rows.append((f"{name}, {label}", r["metrics"]["mAP"], r["chosen"]["train_score"]))
    head = mlc_head_metrics(result.output_dir, probe_cfg.data, DEMO_PROBE["eval_images"])
    if head is not None:
        rows.append(("HVP-MTL, its own MLC head (no probe)", head["mAP"], None))

    print(f"\n{'backbone, features':44s}{'val mAP %':>11s}{'train mAP %':>13s}")
    for name, v, tr in rows:
        print(f"{name:44s}{v:11.2f}" + (f"{tr:13.2f}" if tr is not None else f"{'-':>13s}"))
    if head is not None:
        print(f"(a random scorer gets ~{head['positives']:.0f}% mAP: the share of positive labels)")
    total = time.perf_counter() - t0
    print(f"pre-training {t_train:.0f}s ({precision}), total {total:.0f}s; run folder: {result.output_dir}")
    return 0
