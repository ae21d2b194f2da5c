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
DEMO_FEATURES = (("both", "both (the probe's default)"), ("mean", "mean of feature map"), ("pooled", "class token"))
# `demo --quick`: a check that the install works, about a minute on 2 CPU cores: a 2-block ViT,
# 20 steps of 32 images, one probe on 256 -> 128 images. Its scores prove the pipeline runs, not
# what pre-training learns (that takes the full demo).
QUICK_STEPS = 20
QUICK_PRETRAIN = [
    "backbone.kwargs={depth: 2, embed_dim: 96, num_heads: 3}", "tasks.mlc.dim=64", "tasks.mlc.ffn_dim=128",
    "tasks.swav.hidden_dim=128", "data.batch_size=32", "data.train_size=640", "data.val_size=128",
    "data.num_workers=0", f"train.max_steps={QUICK_STEPS}", "optim.warmup_steps=5", "train.log_every=5",
    f"train.ckpt_every={QUICK_STEPS}", "train.pictures_every=0", "eval.knn_every=0",
]  # fmt: skip
QUICK_PROBE = {"train_images": 256, "eval_images": 128}


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
    from hvpmtl.runs import CONFIG_FILE, run_folder

    if preset is None and resume:
        if not Path(resume).is_file():
            raise FileNotFoundError(f"--resume: checkpoint not found: {resume}")
        run_cfg = run_folder(resume) / CONFIG_FILE
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
    from hvpmtl.pretraining import pretrain

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

    if getattr(args, "explain", None) is not None:
        return explain_config(args)
    cfg = load_pretrain_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def explain_config(args: argparse.Namespace) -> int:
    """``hvpmtl config --explain [KEY]``: the reference of one key, a block or all, with this
    config's value where it differs from the default."""
    from hvpmtl.config_reference import explain, format_key

    docs = explain(args.explain)  # an unknown key fails before the config is built
    cfg = load_pretrain_config(args.config, args.overrides)
    for doc in docs:
        value = cfg
        for part in doc.key.split("."):
            value = getattr(value, part)
        print(format_key(doc, list(value) if isinstance(doc.default, list) else value))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Pre-train ``cpu-tiny`` on synthetic scenes, then linear-probe the frozen backbone against
    the same backbone at its random initialisation, and score the pre-trained MLC head."""
    from hvpmtl.config import load_config
    from hvpmtl.engine.distributed import DistEnv
    from hvpmtl.eval.config import FeatureEvalConfig
    from hvpmtl.eval.frozen import run_linprobe
    from hvpmtl.eval.heads import mlc_head_metrics
    from hvpmtl.eval.report import write_result
    from hvpmtl.eval.weights import resolve_weights
    from hvpmtl.pretraining import pretrain

    quick = getattr(args, "quick", False)
    out_dir = args.output_dir or f"runs/demo{'-quick' if quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    precision = "bf16" if native_bf16() else "fp32"
    cfg = load_pretrain_config(DEFAULT_PRESET, [f"train.output_dir={out_dir}", f"train.precision={precision}",
                                                *(QUICK_PRETRAIN if quick else []), *args.overrides])  # fmt: skip
    sizes, features = (QUICK_PROBE, DEMO_FEATURES[:1]) if quick else (DEMO_PROBE, DEMO_FEATURES)
    t0 = time.perf_counter()
    result = pretrain(cfg)
    t_train = time.perf_counter() - t0

    print("\nlinear probes on frozen features (multi-label; mAP on held-out val images) ...", flush=True)
    env = DistEnv()
    rows = []
    out = result.output_dir / "eval"  # every metric of each score: eval/results.md and one JSON each
    for feature, label in features:
        probe_cfg = load_config(None, [f"probe.feature={feature}", "run.progress=false", f"run.precision={precision}",
                                       *(f"{k}={v}" for k, v in sizes.items())], cls=FeatureEvalConfig,
                                base={"data": {"dataset": cfg.data.dataset, "seed": cfg.data.seed}})  # fmt: skip
        for name, random_init in (("random init", True), ("HVP-MTL", False)):
            weights = resolve_weights(result.output_dir, random_init=random_init)
            r = run_linprobe(probe_cfg, weights, env)
            stem = f"linprobe-{cfg.data.dataset}-{'random-init' if random_init else 'student'}-{feature}"
            data = f"{cfg.data.dataset} ({r['train_images']} -> {r['eval_images']})"
            write_result(out, stem, "linprobe", weights.label, data, r["metrics"], {"feature": feature}, echo=False)
            rows.append((f"{name}, {label}", r["metrics"]["mAP"], r["chosen"]["train_score"]))
    head = mlc_head_metrics(result.output_dir, probe_cfg.data, sizes["eval_images"])
    if head is not None:
        data = f"{cfg.data.dataset} (val {sizes['eval_images']})"
        write_result(out, f"mlc-head-{cfg.data.dataset}-student", "mlc-head", f"{result.output_dir.name} student "
                     "MLC head", data, head, {}, echo=False)  # fmt: skip
        rows.append(("HVP-MTL, its own MLC head (no probe)", head["mAP"], None))

    table = [f"{'backbone, features':44s}{'val mAP %':>11s}{'train mAP %':>13s}"]
    for name, v, tr in rows:
        table.append(f"{name:44s}{v:11.2f}" + (f"{tr:13.2f}" if tr is not None else f"{'-':>13s}"))
    if head is not None:
        table.append(f"(a random scorer gets ~{head['positives']:.0f}% mAP: the share of positive labels)")
    if quick:
        table.append(f"(--quick: {result.steps} steps prove the install works; hvpmtl demo shows what pre-training "
                     "learns)")  # fmt: skip
    (result.output_dir / "demo.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    print(f"every metric of each row (mAP, CP/CR/CF1, OP/OR/OF1): {out / 'results.md'}")
    total = time.perf_counter() - t0
    print(f"pre-training {t_train:.0f}s ({precision}), total {total:.0f}s; run folder: {result.output_dir}")
    return 0
