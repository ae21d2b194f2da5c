"""Read throughput of loose JPEG files (a manifest) vs. WebDataset shards, in img/s: decode +
labels, no augmentation, no model.

Makes ``--images`` JPEG files of ``--size`` px (generated scenes, quality 90) and a JSONL
manifest, shards them with ``hvpmtl.data.shard_writer.write_shards`` (the JPEG bytes are copied), then
reads one epoch of each, ``--repeats`` times per loader-worker count:

* ``files``: ``ManifestImages`` in a shuffled order through a ``DataLoader`` (one file open per image);
* ``shards, streamed``: ``ShardStream`` through ``ShardLoader`` (what ``data.dataset=shards``
  pre-training reads: sequential tar reads, shuffle windows);
* ``shards, random access``: ``ShardImages`` in a shuffled order (a seek per image; evaluation's reader).

The files stay in the page cache after they are written, so this measures the CPU side (open,
seek, tar parsing, decode); on a cold disk or a network file system, where one sequential read
per shard replaces one open per image, shards gain more.

    python benchmarks/shards_vs_files.py --images 2000 --size 224 --workers 0 2
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from hvpmtl.data import ManifestImages, SyntheticScenes
from hvpmtl.data.shard_stream import ShardStream
from hvpmtl.data.shard_writer import write_shards
from hvpmtl.data.shards import ShardImages
from hvpmtl.engine.loader import ShardLoader


def make_files(folder: Path, n: int, size: int) -> Path:
    """``n`` JPEG files and their manifest in ``folder``."""
    scenes = SyntheticScenes(n, size, seed=0, stream=0)
    rows = []
    for i in range(n):
        s = scenes[i]
        name = f"img/{i:06d}.jpg"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(s["image"].permute(1, 2, 0).numpy()).save(folder / name, quality=90)
        tags = [scenes.classes[k] for k in torch.nonzero(s["labels"]).flatten().tolist()]
        rows.append(json.dumps({"path": name, "labels": tags}))
    manifest = folder / "train.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def _count(batches) -> int:
    return sum(len(b) for b in batches)


def read_files(ds, workers: int, batch: int) -> int:
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=list,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    return _count(loader)


def read_stream(index, workers: int, batch: int, streams: int, window: int) -> int:
    stream = ShardStream(index, None, seed=0, global_batch=batch, streams=streams, shuffle_window=window)
    stream.check_workers(workers)
    return _count(ShardLoader(stream, workers))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts to measure")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--streams", type=int, default=8, help="data.shard_streams")
    p.add_argument("--window", type=int, default=1000, help="data.shard_shuffle")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", help="work folder (default: a temporary one)")
    p.add_argument("--out", default="runs/benchmarks/shards_vs_files.csv")
    args = p.parse_args()
    torch.set_num_threads(1)  # as in a loader worker

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        manifest = make_files(folder, args.images, args.size)
        files = ManifestImages(manifest)
        index = write_shards(files, folder / "shards", samples_per_shard=args.samples_per_shard, overwrite=True)
        mib = sum(p.stat().st_size for p in index.paths) / 2**20
        print(f"{args.images} JPEGs of {args.size} px ({mib:.1f} MiB in {len(index.paths)} shards), "
              f"made in {time.perf_counter() - t:.0f} s")  # fmt: skip
        readers = {
            "files": lambda w: read_files(files, w, args.batch),
            "shards, streamed": lambda w: read_stream(index, w, args.batch, args.streams, args.window),
            "shards, random access": lambda w: read_files(ShardImages(index), w, args.batch),
        }
        rows = []
        for workers in args.workers:
            for name, read in readers.items():
                rates = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    n = read(workers)
                    rates.append(n / (time.perf_counter() - t))
                median, best = round(statistics.median(rates), 1), round(max(rates), 1)
                rows.append({"reader": name, "workers": workers, "images": n, "size": args.size,
                             "img_per_s": median, "best": best})  # fmt: skip
                print(f"{name:22s} workers={workers}: {rows[-1]['img_per_s']:8.1f} img/s (best {rows[-1]['best']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\n| reader | workers | img/s (median) | best |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['reader']} | {r['workers']} | {r['img_per_s']} | {r['best']} |")


if __name__ == "__main__":
    main()
