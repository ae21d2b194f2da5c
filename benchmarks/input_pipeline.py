"""Input-pipeline throughput: loader alone, end-to-end training and model alone, in img/s.

For each data set (the built-in synthetic scenes; a JPEG manifest generated in a temporary
folder at ``--jpeg-size``; the same JPEGs as WebDataset shards, read as ``data.dataset=shards``
streams, at least one per loader worker) and each ``data.augment_on`` (``cpu``: every view made in the
workers; ``device``: workers crop to uint8, the rest batched on the device), it measures

* loader: batches out of the training DataLoader, views finished on the device, per second;
* end-to-end: training steps (``Trainer._train_step``: loader, views, forward, backward, AdamW,
  EMA) per second;
* model: training steps on one batch already on the device (no input cost at all).

All three use the ``Trainer`` a ``hvpmtl pretrain`` run builds from the preset, so the
DataLoader, sampler, precision and step are those of a real run.

    python benchmarks/input_pipeline.py --preset cpu-tiny --device cpu --workers 1 --batch 32 --steps 5
    python benchmarks/input_pipeline.py --preset paper-vit-b --device cuda --workers 14 --batch 256 --steps 90 \
        --precision bf16 --datasets jpeg shards

Prints a markdown table and writes a CSV (``--out``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import hvpmtl
from hvpmtl.data import ManifestImages
from hvpmtl.data.shard_writer import write_shards
from hvpmtl.engine.distributed import init_distributed
from hvpmtl.engine.loop import Trainer
from hvpmtl.engine.run_dir import unlock_run_dir

TAGS = [f"tag{i}" for i in range(10)]


def write_jpeg_manifest(folder: Path, count: int, size: tuple[int, int], files: int = 256) -> Path:
    """``count`` manifest lines over ``min(count, files)`` smooth random JPEGs of ``size`` (W x H)."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(min(count, files)):
        coarse = rng.integers(0, 256, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.BILINEAR)
        noise = rng.integers(-20, 21, (size[1], size[0], 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8))
        image.save(folder / "img" / f"{i:05d}.jpg", quality=90)
        names.append(f"img/{i:05d}.jpg")
    manifest = folder / "train.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        for i in range(count):
            tags = rng.choice(TAGS, size=int(rng.integers(1, 4)), replace=False)
            w.writerow([names[i % len(names)], "|".join(sorted(tags))])
    return manifest


def write_rows(rows: list[dict], path: str) -> None:
    """``rows`` as a CSV at ``path`` (its folder made), and say where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def shard_streams(workers: int, batch: int) -> int:
    """The fewest streams that give every worker one (``>= workers``) and divide ``batch``."""
    return next(k for k in range(max(workers, 1), batch + 1) if batch % k == 0)


def past_start(trainer: Trainer, warmup: int) -> int:
    """Untimed batches: at least the ones the workers made while starting (``data.prefetch_factor``
    each), so that what follows is the steady state."""
    return max(warmup, trainer.cfg.data.prefetch_factor * trainer.cfg.data.num_workers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(trainer: Trainer, warmup: int, steps: int) -> float:
    """Batches out of the loader with their views finished on the device (what a step receives).
    The batches the workers made while starting (``prefetch_factor`` = 2 each) are not timed."""
    dev = trainer.env.device
    warmup = past_start(trainer, warmup)
    trainer.sampler.set_epoch(0, 0)
    batches = iter(trainer.loader)
    for step in range(warmup):
        trainer.feed.next(batches, step)
    sync(dev)
    start = time.perf_counter()
    for step in range(steps):
        trainer.feed.next(batches, warmup + step)
    sync(dev)
    return steps * trainer.cfg.data.batch_size / (time.perf_counter() - start)


def step_rate(trainer: Trainer, batches, warmup: int, steps: int) -> float:
    """Training steps per second, counted as ``Trainer.fit`` counts them (each step ends with its
    one host sync; under ``augment_on=device`` it starts the next step's views before that sync).
    Steps from the loader need a ``warmup`` of :func:`past_start`'s length to read the steady state."""
    trainer.model.train()
    trainer.step = 0
    for _ in range(warmup):
        trainer._train_step(batches)
        trainer.step += 1
    sync(trainer.env.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer._train_step(batches)
        trainer.step += 1
    sync(trainer.env.device)
    return steps * trainer.cfg.data.batch_size / (time.perf_counter() - start)


def profile_steps(trainer: Trainer, steps: int = 4, rows: int = 30) -> str:
    """torch.profiler's table (by self CPU time) of ``steps`` end-to-end training steps."""
    from torch.profiler import ProfilerActivity, profile

    trainer.sampler.set_epoch(0, 0)
    batches = iter(trainer.loader)
    step_rate(trainer, batches, past_start(trainer, 2), 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.env.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer._train_step(batches)
            trainer.step += 1
        sync(trainer.env.device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def measure(overrides: list[str], preset: str, warmup: int, steps: int, model_only: bool, prof: bool = False) -> dict:
    cfg = hvpmtl.load_config(preset, overrides)
    env = init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_min)
    trainer = Trainer(cfg, env)
    try:
        row = {"loader": loader_rate(trainer, warmup, steps)}
        trainer.sampler.set_epoch(0, 0)
        row["end_to_end"] = step_rate(trainer, iter(trainer.loader), past_start(trainer, warmup), steps)
        if prof:
            print(profile_steps(trainer), flush=True)
        if model_only:
            trainer.sampler.set_epoch(0, 0)
            batch = trainer.feed.next(iter(trainer.loader), 0)
            trainer.feed.on_device = False  # the batch is finished: nothing left to do per step
            row["model"] = step_rate(trainer, itertools.repeat(batch), warmup, steps)
    finally:
        trainer.logger.close()
        unlock_run_dir(cfg.train.output_dir)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, nargs="+", default=[2], help="DataLoader workers (one row each)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup), rounded up to whole waves")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--datasets", nargs="+", default=["scenes", "jpeg"], choices=["scenes", "jpeg", "shards"])
    p.add_argument("--paths", nargs="+", default=["cpu", "device"], choices=["cpu", "device"])
    p.add_argument("--jpeg-size", default="500x375", help="W x H of the generated JPEGs (ImageNet's mean is ~500x375)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: the preset's")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's table of 4 end-to-end steps per row")
    p.add_argument("--out", default="runs/benchmarks/input_pipeline.csv")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True

    # Workers hand out whole batches (with shards, parts of every batch) in waves of one per
    # worker: a timed window of a whole number of waves reads the steady rate, a short one does not
    windows = {w: -(-args.steps // max(w, 1)) * max(w, 1) for w in args.workers}
    # each pass starts anew; + 1 batch for the model alone, + 5 for --profile's steps
    ahead = hvpmtl.load_config(args.preset, args.overrides).data.prefetch_factor * max(args.workers)
    count = (max(args.warmup, ahead) + max(windows.values()) + 6) * args.batch
    width, height = (int(v) for v in args.jpeg_size.lower().split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_jpeg_manifest(tmp / "jpeg", count, (width, height))
        data = {
            "scenes": lambda w: ["data.dataset=synthetic", f"data.train_size={count}"],
            "jpeg": lambda w: ["data.dataset=manifest", f"data.root={tmp / 'jpeg'}", "data.num_classes=10",
                               f"data.manifest={manifest}"],
            "shards": lambda w: ["data.dataset=shards", f"data.shards={tmp / 'shards'}",
                                 f"data.shard_streams={shard_streams(w, args.batch)}"],
        }  # fmt: skip
        if "shards" in args.datasets:
            write_shards(ManifestImages(manifest, root=tmp / "jpeg"), tmp / "shards", samples_per_shard=500)
        model_done = False
        for n, (name, workers, path) in enumerate(itertools.product(args.datasets, args.workers, args.paths)):
            overrides = [
                *data[name](workers), f"data.batch_size={args.batch}", f"data.num_workers={workers}",
                f"data.augment_on={path}", f"train.device={args.device}", "eval.knn_every=0",
                f"train.max_steps={count // args.batch}", f"train.output_dir={tmp / f'run{n}'}",
                "train.progress=false", *([f"train.precision={args.precision}"] if args.precision else []),
                *args.overrides,
            ]  # fmt: skip
            r = measure(overrides, args.preset, args.warmup, windows[workers], not model_done, args.profile)
            model_done = model_done or "model" in r
            model = r.get("model", rows[0]["model_img_s"] if rows else float("nan"))
            row = {"preset": args.preset, "device": args.device, "dataset": name, "augment_on": path,
                   "workers": workers, "batch": args.batch, "steps": windows[workers],
                   "loader_img_s": round(r["loader"], 1),
                   "end_to_end_img_s": round(r["end_to_end"], 1), "model_img_s": round(model, 1),
                   "end_to_end_vs_model": round(r["end_to_end"] / model, 3)}  # fmt: skip
            rows.append(row)
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    write_rows(rows, args.out)
    print("\n| data | augment_on | workers | loader img/s | end-to-end img/s | model img/s | end-to-end / model |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} | {r['augment_on']} | {r['workers']} | {r['loader_img_s']} | "
              f"{r['end_to_end_img_s']} | {r['model_img_s']} | {r['end_to_end_vs_model']:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
