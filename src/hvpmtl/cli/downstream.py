"""``hvpmtl knn | linprobe | finetune | detect | segment | mlc-head``: one command per downstream
evaluation, each taking a run folder, a checkpoint or a ``.safetensors`` file (``SOURCE``).

The data block starts from the evaluated run's own data source (which images: dataset, root,
manifests, vocabulary, sizes, mean/std), unless the preset or the overrides name another
``data.dataset`` (then only mean/std are kept); then the command's preset, then ``key=value``
overrides. Results go to ``<run>/eval/`` as ``<command>-<data>-<hash>-<weights>.json`` plus one row
of ``<run>/eval/results.md``; training commands keep their own run folder beside it (the data's name
and hash: :mod:`hvpmtl.eval.identity`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hvpmtl.config import ConfigError, explicit_keys, load_config
from hvpmtl.data.config import has_effect

SOURCE_KEYS = ("dataset", "root", "manifest", "val_manifest", "classes", "classes_file", "check_files", "on_bad_image",
               "max_image_pixels", "seed", "train_size", "val_size", "mean", "std", "eval_crop_pct", "synthetic_tags",
               "emoji_min_count")  # fmt: skip


def run_source(data: dict, keys: tuple[str, ...] = SOURCE_KEYS) -> dict:
    """The entries ``keys`` of a run's data block that its own ``dataset`` reads (a saved config may
    hold another source's keys: those would stop the command as set but without effect)."""
    dataset = data.get("dataset", "synthetic")
    return {k: data[k] for k in keys if k in data and has_effect(k, dataset)}


def inherited_data(weights, preset: str | None, overrides: list[str], preset_dir: Path) -> dict:
    """The part of the evaluated run's data block a downstream config starts from."""
    data = (weights.pretrain or {}).get("data") or {}
    own = explicit_keys(preset, overrides, preset_dir)
    keys = ("mean", "std") if "data.dataset" in own else SOURCE_KEYS
    return {"data": run_source(data, keys)}


def _who(args: argparse.Namespace, weights=None) -> str:
    """random-init, student or teacher (a teacher_backbone.safetensors SOURCE is the teacher without --teacher)."""
    if args.random_init:
        return "random-init"
    return "teacher" if args.teacher or getattr(weights, "part", "") == "teacher" else "student"


def split_source(items: list[str]) -> tuple[str | None, list[str]]:
    """``[SOURCE] key=value ...`` in any order -> ``(SOURCE or None, overrides)``."""
    sources = [a for a in items if "=" not in a]
    if len(sources) > 1:
        raise ConfigError(f"give one SOURCE (run folder, checkpoint or .safetensors), got {sources}")
    return (sources[0] if sources else None), [a for a in items if "=" in a]


def _prepare(command: str, args: argparse.Namespace):
    """Weights, config and output folder; every problem here is a usage error (exit 2)."""
    from hvpmtl.data import build_dataset
    from hvpmtl.eval.config import ROOTS, preset_dir
    from hvpmtl.eval.identity import data_tag
    from hvpmtl.eval.weights import resolve_weights

    args.source, args.overrides = split_source(args.args)
    if getattr(args, "overwrite", False):  # a new run in place of the one there (not resumed)
        args.overrides += ["train.overwrite=true", "train.resume=''"]

    weights = resolve_weights(args.source, args.teacher, args.random_init, args.pretrain_config)
    folder = preset_dir(command)
    base = inherited_data(weights, args.config, args.overrides, folder)
    cfg = load_config(args.config, args.overrides, cls=ROOTS[command], preset_dir=folder, base=base)
    if command in ("knn", "linprobe", "finetune"):
        try:  # the data must be readable before anything runs (names the key, file or line)
            for split in ("train", cfg.eval_split):
                build_dataset(cfg.data, weights.backbone.img_size, split)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from err
    root = weights.run_dir or Path("runs") / f"random-init-{args.pretrain_config or 'cpu-tiny'}"
    tag = f"{data_tag(cfg)}-{_who(args, weights)}"  # the data's name and a hash of what identifies it
    return weights, cfg, root, tag


def cmd_downstream(args: argparse.Namespace) -> int:
    from hvpmtl.engine.distributed import cleanup_distributed, init_distributed
    from hvpmtl.eval.report import data_label, write_result

    command = args.command
    weights, cfg, root, tag = _prepare(command, args)
    if command in ("knn", "linprobe"):
        env = init_distributed(cfg.run.device, "auto")
    else:
        env = init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_min)
    try:
        settings: dict = {}
        if command == "knn":
            from hvpmtl.eval.frozen import run_knn

            out = run_knn(cfg, weights, env)
            settings = {"k": out.pop("k"), "T": cfg.knn.temperature, "feature": cfg.knn.feature}  # k as used
            tag += f"-{cfg.knn.feature}"
        elif command == "linprobe":
            from hvpmtl.eval.frozen import run_linprobe

            out = run_linprobe(cfg, weights, env)
            keys = ("lr", "weight_decay") if cfg.probe.optimizer == "adamw" else ("weight_decay",)
            settings = {
                "feature": cfg.probe.feature,
                "optimizer": cfg.probe.optimizer,
                **{k: out["chosen"][k] for k in keys},
            }
            tag += f"-{cfg.probe.feature}"
        else:
            run_dir = Path(cfg.train.output_dir) if cfg.train.output_dir else root / f"{command}-{tag}"
            out = _train_command(command, cfg, weights, run_dir, env)
            settings = {"epochs": cfg.train.epochs, "steps": out.get("steps", 0), "lr": cfg.optim.lr}
            if out.get("ema_metrics"):
                out["metrics"].update({f"ema_{k}": v for k, v in out["ema_metrics"].items()})
        if env.is_main:
            n_eval = out.get("eval_images", out.get("val_images", "?"))
            data = f"{data_label(cfg.data)} ({out.get('train_images', '?')} -> {n_eval})"
            out_dir = Path(getattr(getattr(cfg, "run", None), "output_dir", "") or root / "eval")
            extra = {k: v for k, v in out.items() if k not in ("metrics", "history")}
            write_result(out_dir, f"{command}-{tag}", command, weights.label, data, out["metrics"], settings, extra)
    finally:
        cleanup_distributed()
    return 0


def _train_command(command: str, cfg, weights, run_dir: Path, env) -> dict:
    if command == "finetune":
        from hvpmtl.eval.finetune import run_finetune

        return run_finetune(cfg, weights, run_dir, env)
    if command == "detect":
        from hvpmtl.eval.detection import run_detect

        return run_detect(cfg, weights, run_dir, env)
    from hvpmtl.eval.segmentation import run_segment

    return run_segment(cfg, weights, run_dir, env)


def cmd_mlc_head(args: argparse.Namespace) -> int:
    from hvpmtl.config import to_dict
    from hvpmtl.engine.distributed import resolve_device
    from hvpmtl.eval.config import MLCHeadEvalConfig
    from hvpmtl.eval.heads import mlc_head_metrics
    from hvpmtl.eval.identity import data_tag
    from hvpmtl.eval.report import data_label, write_result
    from hvpmtl.runs import Run

    args.source, args.overrides = split_source(args.args)
    if args.source is None:
        raise ConfigError("give the run folder, model.safetensors or checkpoint whose MLC head to score")
    run = Run(args.source)
    _, run_cfg = run.model()
    base = {"data": run_source(to_dict(run_cfg.data))}
    cfg = load_config(None, args.overrides, cls=MLCHeadEvalConfig, base=base)
    metrics = mlc_head_metrics(args.source, cfg.data, cfg.eval_images, args.teacher, cfg.eval_split,
                               resolve_device(cfg.run.device), cfg.run.batch_size)  # fmt: skip
    if metrics is None:
        raise ConfigError(f"{args.source}: this run trained no MLC head (tasks.mlc.weight was 0)")
    who = "teacher" if args.teacher else "student"
    images = f"{cfg.eval_split}{cfg.eval_images or 'all'}"  # scores on other images are other files
    data = f"{data_label(cfg.data)} ({cfg.eval_split} {cfg.eval_images or 'all'})"
    label = f"{run.folder.name} {who} MLC head"
    out = Path(cfg.run.output_dir) if cfg.run.output_dir else run.folder / "eval"
    write_result(out, f"mlc-head-{data_tag(cfg)}-{images}-{who}", "mlc-head", label, data, metrics, {})
    return 0


def add_parsers(sub) -> None:
    helps = {
        "knn": "weighted k-NN on frozen features (top-1/top-5 or mAP)",
        "linprobe": "linear probe on frozen features, settings chosen on held-out train images",
        "finetune": "full fine-tuning (layer decay, drop path, Mixup/CutMix, label smoothing)",
        "detect": "Mask R-CNN on the backbone's feature pyramid, COCO box/mask AP",
        "segment": "UperNet on the backbone's feature pyramid, mIoU",
    }
    for command, text in helps.items():
        p = sub.add_parser(command, help=text, description=text)
        p.add_argument(
            "args",
            nargs="*",
            metavar="SOURCE | key=value",
            help="run folder, checkpoint (.pt) or .safetensors file, then dotted config overrides",
        )
        p.add_argument("--config", "-c", help=f"{command} preset or YAML (hvpmtl presets lists them)")
        p.add_argument("--teacher", action="store_true",
                       help="evaluate the EMA teacher's backbone (or give its teacher_backbone.safetensors)")
        p.add_argument("--random-init", action="store_true", help="the same backbone at its initialisation")
        p.add_argument("--pretrain-config", help="pre-training preset of --random-init without SOURCE")
        if command in ("finetune", "detect", "segment"):
            p.add_argument("--overwrite", action="store_true",
                           help="replace an earlier run in the output folder instead of resuming it")  # fmt: skip
        p.set_defaults(func=cmd_downstream)
    p = sub.add_parser("mlc-head", help="score the pre-trained MLC head itself (mAP, CP/CR/CF1, OP/OR/OF1)")
    p.add_argument(
        "args",
        nargs="+",
        metavar="SOURCE | key=value",
        help="run folder, model.safetensors or checkpoint, then overrides (data.*, eval_split, eval_images, run.*)",
    )
    p.add_argument("--teacher", action="store_true", help="the EMA teacher's head")
    p.set_defaults(func=cmd_mlc_head)
